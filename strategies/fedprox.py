"""FedProx (Li et al., 2020): Flower's FedProx on the server, a proximal term on clients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.serverapp.strategy import FedProx

from fedcl.config import Config
from fedcl.errors import ConfigError
from fedcl.plugins import register_strategy
from fedcl.strategy import Capabilities, ContinualStrategy
from fedcl.training import LocalTrainer, RoundContext
from strategies.fedavg import flower_kwargs


@dataclass(frozen=True)
class FedProxParams:
    proximal_mu: float = 0.01
    """Weight mu of the proximal term (mu/2)*||w - w_global||^2 in every client's loss."""

    def check(self) -> None:
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu}")


class FedProxCL(ContinualStrategy, FedProx):
    """Flower's FedProx (sends ``proximal-mu`` to clients), with fedcl's continual hooks."""

    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=True, task_end_state=False)


class FedProxTrainer(LocalTrainer):
    """Cross-entropy plus (mu/2)*||w - w_global||^2, w_global being the round's global model."""

    uses_round_start_weights = True
    regularizer_reads_context = False  # the same term whichever client trains

    def __init__(self, params: FedProxParams) -> None:
        self.mu = params.proximal_mu

    def regularizer(self, ctx: RoundContext, params: list[torch.Tensor],
                    reference: list[torch.Tensor]) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        return proximal_term(params, reference, self.mu)


def proximal_term(params: list[torch.Tensor], reference: list[torch.Tensor],
                  mu: float) -> torch.Tensor:
    """(mu/2) * sum_i ||params_i - reference_i||^2."""
    total = sum(((p - r) ** 2).sum() for p, r in zip(params, reference, strict=True))
    return 0.5 * mu * total  # type: ignore[return-value]


@register_strategy("fedprox", "FedAvg with a proximal term (mu/2)||w - w_global||^2 in each "
                   "client's loss (Li et al. 2020).", params=FedProxParams,
                   trainer=FedProxTrainer)
def build_fedprox(config: Config, params: FedProxParams) -> FedProxCL:
    return FedProxCL(proximal_mu=params.proximal_mu, **flower_kwargs(config))
