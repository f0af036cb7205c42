"""The client half of unlearning methods: named operations on the client's own data.

The server sends a QUERY message whose config names the operation (``protocol.OP``), the
erasure request, the tasks whose data to read and the classes erased earlier, with the global
model; the ClientApp (:func:`fedcl.client_app.run_operation`) builds the client's *forget*
samples (what the request erases from this client) and *retain* samples (what the client
keeps) as :class:`ClientData`, calls the operation registered with :func:`operation`, and
replies with its records. Data never leaves the client; only what the
operation computes does (importances, gradients, adapter weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from fedcl.config import Config
from fedcl.data.datasets import to_float


@dataclass
class TaskData:
    """One task's forget and retain samples on this client (uint8 images, head targets)."""

    task: int
    head: int | None
    forget: tuple[torch.Tensor, torch.Tensor]
    retain: tuple[torch.Tensor, torch.Tensor]


@dataclass
class ClientData:
    """Everything an operation gets."""

    config: Config
    model: torch.nn.Module  # the global model, on ``device``
    tasks: list[TaskData]
    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    settings: ConfigRecord  # the message's config (operation settings)
    partition_id: int
    records: RecordDict  # the whole message content (extra records of the operation)

    def count(self, which: str) -> int:
        return sum(len(getattr(t, which)[1]) for t in self.tasks)

    def batches(self, which: str, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int | None]]:
        """Normalised mini-batches ``(x, y, head)`` of the forget or retain samples, task by
        task, in order (shuffled within a task when ``generator`` is given)."""
        for t in self.tasks:
            x, y = getattr(t, which)
            order = (torch.randperm(len(y), generator=generator) if generator is not None
                     else torch.arange(len(y)))
            for start in range(0, len(y), batch_size):
                idx = order[start:start + batch_size]
                yield (to_float(x[idx].to(self.device), self.mean, self.std),
                       y[idx].to(self.device), t.head)


Operation = Callable[[ClientData], dict[str, Any]]
_OPERATIONS: dict[str, Operation] = {}


def operation(name: str) -> Callable[[Operation], Operation]:
    """Register a client operation under ``name``."""

    def deco(fn: Operation) -> Operation:
        _OPERATIONS[name] = fn
        return fn

    return deco


def find_operation(name: str) -> Operation:
    """The operation registered under ``name``; ValueError if none is (the method that
    registers it must be imported first: :func:`fedcl.plugins.get_unlearning` does)."""
    if name not in _OPERATIONS:
        raise ValueError(f"unknown unlearning operation '{name}'")
    return _OPERATIONS[name]


def cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  head: int | None) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x, head), y)


def mean_gradient(data: ClientData, which: str) -> tuple[dict[str, torch.Tensor], float, int]:
    """The gradient of the mean cross-entropy over the client's ``which`` (``"forget"`` or
    ``"retain"``) samples of every task, each scored by its task's head, with the model in
    eval mode (no dropout; batch norm's running statistics); that mean loss; and the sample
    count. Gradients (one CPU tensor per trainable parameter, by name; zero where the loss
    does not reach) are summed over batches of 256, so the result is the whole set's gradient
    whatever the batching. With no sample: zeros, 0.0 and 0."""
    model = data.model
    model.eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    n = data.count(which)
    total = 0.0
    for x, y, head in data.batches(which, 256):
        loss = torch.nn.functional.cross_entropy(model(x, head), y, reduction="sum") / n
        got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for k, g in zip(params, got, strict=True):
            if g is not None:
                grads[k] += g
        total += float(loss.detach())
    return {k: g.cpu() for k, g in grads.items()}, total, n


__all__ = ["ClientData", "TaskData", "cross_entropy", "find_operation", "mean_gradient",
           "operation"]
