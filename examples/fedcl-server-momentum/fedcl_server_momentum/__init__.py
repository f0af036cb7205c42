"""Server momentum with an L2 anchor to the previous task's model: a fedcl method in a package
of its own, built only on :mod:`fedcl.api`.

Server half (:class:`ServerMomentum`): FedAvg, then momentum on the server (FedAvgM; Hsu, Qi and
Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019). With ``w`` the round's global model and ``w_avg`` the clients' weighted
mean, per floating-point array::

    v     <- beta * v + (w - w_avg)
    w_new <- w - server_lr * v

At each task's end the server keeps the global model as the *anchor* and sends it with every
round of the later tasks.

Client half (:class:`AnchoredTrainer`): cross-entropy plus ``(anchor / 2) * ||w - w_anchor||^2``
over the trained parameters, the L2 baseline of continual learning (Kirkpatrick et al., PNAS
2017, compare EWC against it): old tasks' weights are pulled back towards where they were.

Deviations and choices: the velocity restarts from zero when ``reset_at_task`` is set (FedAvgM
has no tasks); after an erasure fedcl rebuilds the strategy fresh (``task_end_state`` False): the
velocity, built from updates that saw the erased data, restarts at zero, and so does the anchor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcl.api import (
    Capabilities,
    ConfigError,
    ContinualStrategy,
    LocalTrainer,
    RoundContext,
    RoundInfo,
    flower_kwargs,
    register_strategy,
)

ANCHOR = "server-momentum.anchor"  # ArrayRecord server -> clients: the previous task's model


@dataclass(frozen=True)
class MomentumParams:
    server_lr: float = 1.0
    """Server learning rate: w_new = w - server_lr * v."""
    beta: float = 0.9
    """Momentum: v = beta * v + (w - w_avg); 0 gives FedAvg (server_lr 1)."""
    anchor: float = 0.0
    """Weight of the clients' pull (anchor/2)*||w - w_anchor||^2 to the previous task's model."""
    reset_at_task: bool = False
    """Restart the velocity from zero when a task begins."""

    def check(self) -> None:
        if not self.server_lr > 0:
            raise ConfigError(f"server-momentum server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"server-momentum beta must be in [0, 1), got {self.beta}")
        if not self.anchor >= 0:
            raise ConfigError(f"server-momentum anchor must be >= 0, got {self.anchor}")


class ServerMomentum(ContinualStrategy, FedAvg):
    """FedAvg's weighted mean, then server momentum; the previous task's model as anchor."""

    # FedAvg's mean, read in place; the momentum step needs only that mean and the round's
    # global model, so a cohort may send its members' mean; the velocity is rebuilt fresh
    # after unlearning
    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=True, task_end_state=False)

    def __init__(self, params: MomentumParams, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.velocity: dict[str, torch.Tensor] = {}
        self.anchor: ArrayRecord | None = None
        self._global: ArrayRecord | None = None

    def begin_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        if self.params.reset_at_task:
            self.velocity = {}
        return arrays

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        self.anchor = arrays
        return arrays

    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        return {ANCHOR: self.anchor} if self.anchor is not None else {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays  # the round's global model, for the momentum step
        return super().configure_train(server_round, arrays, config, grid)

    def after_aggregate(self, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        assert self._global is not None
        return ArrayRecord(momentum_step(self._global.to_torch_state_dict(),
                                         arrays.to_torch_state_dict(), self.velocity,
                                         self.params.beta, self.params.server_lr))

    def state_metrics(self) -> dict[str, float]:
        """The velocity's L2 norm after each task (summary.json ``strategy_state``, MLflow)."""
        squares = sum(float((v.double() ** 2).sum()) for v in self.velocity.values())
        return {"server_momentum_velocity_norm": math.sqrt(squares)}

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": dict(self.velocity),
                "anchor": None if self.anchor is None else self.anchor.to_torch_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocity = dict(state["velocity"])
        self.anchor = None if state["anchor"] is None else ArrayRecord(state["anchor"])


def momentum_step(global_state: dict[str, torch.Tensor], mean_state: dict[str, torch.Tensor],
                  velocity: dict[str, torch.Tensor], beta: float, server_lr: float
                  ) -> dict[str, torch.Tensor]:
    """One server momentum step, per array: ``v = beta * v + (w - w_avg)`` (``velocity`` is
    updated in place; a missing entry starts at zero), ``w - server_lr * v`` returned.
    Integer arrays (BatchNorm's counters) take the mean unchanged."""
    new = {}
    for key, w in global_state.items():
        if not w.is_floating_point():
            new[key] = mean_state[key]
            continue
        v = (w - mean_state[key]) + (beta * velocity[key] if key in velocity else 0.0)
        velocity[key] = v
        new[key] = w - server_lr * v
    return new


class AnchoredTrainer(LocalTrainer):
    """Cross-entropy plus ``(anchor / 2) * ||w - w_anchor||^2``, ``w_anchor`` the previous
    task's global model, which the server sends with every round (none in the first task)."""

    # the anchor is read once per round in before_training, a hook a batched cohort does not
    # run: cohort_size > 1 is refused with one line before the run starts
    batchable = False

    def __init__(self, params: MomentumParams) -> None:
        self.weight = params.anchor
        self._anchor: list[torch.Tensor] = []

    def before_training(self, ctx: RoundContext, model: nn.Module) -> None:
        record = ctx.message.get(ANCHOR) if ctx.message is not None else None
        if record is None or self.weight == 0:
            self._anchor = []
            return
        state = record.to_torch_state_dict()
        self._anchor = [state[name].to(ctx.device) for name, _ in model.named_parameters()]

    def regularizer(self, ctx: RoundContext, params: list[torch.Tensor],
                    reference: list[torch.Tensor]) -> torch.Tensor | None:
        if not self._anchor:
            return None
        return anchor_term(params, self._anchor, self.weight)


def anchor_term(params: list[torch.Tensor], anchor: list[torch.Tensor], weight: float
                ) -> torch.Tensor:
    """``(weight / 2) * sum_i ||params_i - anchor_i||^2``, matched by position."""
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    return 0.5 * weight * total  # type: ignore[return-value]


@register_strategy("server-momentum", "FedAvg with server momentum (FedAvgM, Hsu et al. 2019) "
                   "and an L2 pull to the previous task's model on clients.",
                   params=MomentumParams, trainer=AnchoredTrainer)
def build_server_momentum(config: Any, params: MomentumParams) -> ServerMomentum:
    return ServerMomentum(params, **flower_kwargs(config))


__all__ = ["ANCHOR", "AnchoredTrainer", "MomentumParams", "ServerMomentum", "anchor_term",
           "build_server_momentum", "momentum_step"]
