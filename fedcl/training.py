"""Local training and evaluation loops, shared by clients and the server.

:class:`LocalTrainer` is the client half of a strategy: cross-entropy SGD on the current task's
data, with hooks that a method overrides (an extra loss term, work at a task boundary). The
server half lives in ``strategies/``; both are registered together by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedcl.config import Config
from fedcl.data.datasets import to_float


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU; ``cuda`` without one is an error."""
    from fedcl.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but no CUDA GPU is visible")
    return torch.device(name)


def make_optimizer(params: Any, config: Config) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def round_seed(seed: int, task: int, round_: int, partition_id: int) -> int:
    """One seed per (run seed, task, round, client): local shuffling and dropout are
    reproducible wherever the client runs."""
    return (((seed * 1_000_003 + task) * 1_000_003 + round_) * 1_000_003 + partition_id) % 2**63


@dataclass
class RoundContext:
    """Everything a client's local training step needs for one round."""

    config: Config
    model: nn.Module
    x: torch.Tensor  # uint8 images of the current task, already shifted
    y: torch.Tensor  # head targets
    head: int | None
    task: int
    round: int
    partition_id: int
    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    last_of_task: bool = False  # the task's last round (task-end work such as FOT's sketches)
    message: Any = None  # the incoming RecordDict, for strategy records (a basis, prototypes)


@dataclass
class TrainResult:
    num_examples: int
    loss: float
    steps: int
    extra_metrics: dict[str, float] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)  # extra reply records (payloads)


class LocalTrainer:
    """Cross-entropy training on the current task. Subclasses override only what they change,
    and declare what they need in the class attributes below."""

    batchable: bool = True
    """Whether clients of this trainer can train as a batched cohort (``cohort_size`` > 1). A
    cohort runs only :meth:`regularizer` and :meth:`after_training` of a subclass: one that
    changes anything else of the loop sets this False."""
    uses_round_start_weights: bool = False
    """Whether :meth:`regularizer` needs the round's starting weights (its ``reference``):
    FedProx's proximal term. Without it ``reference`` is empty and no copy is made."""
    adds_reply_records: bool = False
    """Whether :meth:`after_training` adds records to the reply (FOT's sketches): a cohort then
    replies per member, never with its members' mean."""

    def regularizer(self, ctx: RoundContext, params: list[torch.Tensor],
                    reference: list[torch.Tensor]) -> torch.Tensor | None:
        """An extra loss term added to cross-entropy each step (FedProx's proximal term...),
        from the trained parameters (in ``named_parameters`` order) and their values at the
        round's start, matched by position. Pure tensor code: a cohort calls it under ``vmap``
        with only the parameters its loss reaches."""
        return None

    def begin_task(self, ctx: RoundContext) -> None:
        """Called once when this client first trains on a new task."""

    def after_training(self, ctx: RoundContext, result: TrainResult) -> TrainResult:
        """Called after local training with the locally trained model (payloads go here)."""
        return result

    def train(self, ctx: RoundContext) -> TrainResult:
        model = ctx.model.to(ctx.device)
        model.train()
        gen = torch.Generator().manual_seed(round_seed(ctx.config.seed, ctx.task, ctx.round,
                                                      ctx.partition_id))
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        optimizer = make_optimizer(model.parameters(), ctx.config)
        params = list(model.parameters())
        reference = ([p.detach().clone() for p in params] if self.uses_round_start_weights
                     else [])
        n = int(ctx.y.shape[0])
        # the loss is summed on the device: a float() per step would wait for the GPU each step
        total, steps = torch.zeros((), device=ctx.device), 0
        x_dev, y_dev = ctx.x.to(ctx.device), ctx.y.to(ctx.device)
        for _ in range(ctx.config.local_epochs):
            order = torch.randperm(n, generator=gen).to(ctx.device)
            for start in range(0, n, ctx.config.batch_size):
                batch = order[start:start + ctx.config.batch_size]
                inputs = to_float(x_dev[batch], ctx.mean, ctx.std)
                loss = nn.functional.cross_entropy(model(inputs, ctx.head), y_dev[batch])
                extra = self.regularizer(ctx, params, reference)
                if extra is not None:
                    loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                steps += 1
        return TrainResult(num_examples=n, loss=float(total) / max(steps, 1), steps=steps)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, head: int | None,
             mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 images ``x`` with head targets ``y``."""
    if len(y) == 0:
        return 0.0
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        xb = to_float(x[start:start + batch_size].to(device), mean, std)
        pred = model(xb, head).argmax(dim=1)
        correct += int((pred == y[start:start + batch_size].to(device)).sum())
    model.train(was_training)
    return correct / len(y)
