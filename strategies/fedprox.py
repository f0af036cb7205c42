"""FedProx (Li et al., 2020): Flower's FedProx on the server, a proximal term on clients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.serverapp.strategy import FedProx

from fedcl import protocol
from fedcl.config import Config
from fedcl.errors import ConfigError
from fedcl.plugins import register_strategy
from fedcl.strategy import Capabilities, ContinualStrategy, flower_kwargs
from fedcl.training import LocalTrainer, RoundContext

PROXIMAL_MU = "proximal-mu"  # Flower's FedProx key in the training messages' config


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
    """Cross-entropy plus (mu/2)*||w - w_global||^2, w_global being the round's global model.

    mu is the one the server sends with the round (Flower's FedProx puts ``proximal-mu`` in
    every training message): the strategy's parameter is read in one place, on the server."""

    uses_round_start_weights = True
    regularizer_reads_context = False  # the round's mu: the same whichever member trains

    def regularizer(self, ctx: RoundContext, params: list[torch.Tensor],
                    reference: list[torch.Tensor]) -> torch.Tensor | None:
        mu = round_mu(ctx)
        if mu == 0:
            return None
        return proximal_term(params, reference, mu)


def round_mu(ctx: RoundContext) -> float:
    """The round's proximal weight, from its training message. Raises ValueError when the
    message does not carry one (a trainer used outside a FedProx round)."""
    config = ctx.message.get(protocol.CONFIG) if ctx.message is not None else None
    if config is None or PROXIMAL_MU not in config:
        raise ValueError(f"FedProx's client needs the round's '{PROXIMAL_MU}' from the server")
    return float(config[PROXIMAL_MU])  # type: ignore[arg-type]


def proximal_term(params: list[torch.Tensor], reference: list[torch.Tensor],
                  mu: float) -> torch.Tensor:
    """(mu/2) * sum_i ||params_i - reference_i||^2."""
    total = sum(((p - r) ** 2).sum() for p, r in zip(params, reference, strict=True))
    return 0.5 * mu * total  # type: ignore[return-value]


@register_strategy("fedprox", "FedAvg with a proximal term (mu/2)||w - w_global||^2 in each "
                   "client's loss (Li et al. 2020).", params=FedProxParams,
                   trainer=lambda _params: FedProxTrainer())
def build_fedprox(config: Config, params: FedProxParams) -> FedProxCL:
    return FedProxCL(proximal_mu=params.proximal_mu, **flower_kwargs(config))
