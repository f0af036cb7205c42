"""The client half of unlearning methods: named operations on the client's own data.

The server sends a QUERY message whose config names the operation (``protocol.OP``), the
erasure request, the tasks whose data to read and the classes erased earlier, with the global
model; :func:`run_operation` builds the client's *forget* samples (what the request erases from
this client) and *retain* samples (what the client keeps), calls the operation registered with
:func:`operation`, and replies with its records. Data never leaves the client; only what the
operation computes does (importances, gradients, adapter weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcl import protocol


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

    config: Any
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
        from fedcl.training import to_float

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


def run_operation(msg: Message, context: Context,
                  info: Callable[..., ConfigRecord]) -> Message:
    import time

    from fedcl.client_app import client_identity
    from fedcl.config import Config
    from fedcl.data.scenarios import build_scenario
    from fedcl.erasure import ErasedData, parse_erasure, request_split
    from fedcl.training import resolve_device
    from strategies import registry
    from strategies.unlearning import _load_all

    started = time.perf_counter()
    _load_all()
    cfg = msg.content[protocol.CONFIG]
    name = str(cfg[protocol.OP])
    if name not in _OPERATIONS:
        raise ValueError(f"unknown unlearning operation '{name}'")
    config = Config.from_json(str(cfg[protocol.RUN_CONFIG_JSON]))
    pid, _ = client_identity(context)
    data_dir = str(context.node_config.get(protocol.NODE_DATA_DIR, config.data_dir))
    scenario = build_scenario(config, data_dir)
    request = parse_erasure(str(cfg[protocol.OP_REQUEST]))
    before = ErasedData.decode(str(cfg.get(protocol.ERASED_CLASSES, "")))
    tasks = []
    for task in (int(t) for t in cfg[protocol.OP_TASKS] if int(t) >= 0):
        forget, retain = request_split(config, scenario, request, pid, task, data_dir, before)
        tasks.append(TaskData(task, scenario.head_for(task), scenario.train_data(task, forget),
                              scenario.train_data(task, retain)))
    device = resolve_device(config.device)
    model = registry.build_model(config, scenario)
    model.load_state_dict(msg.content[protocol.ARRAYS].to_torch_state_dict())
    data = ClientData(config, model.to(device), tasks, device, scenario.dataset.mean,
                      scenario.dataset.std, cfg, pid, msg.content)
    records = _OPERATIONS[name](data)
    content = RecordDict({**records, protocol.CLIENT_INFO: info(context, device,
                                                                started=started)})
    return Message(content, reply_to=msg)


def cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  head: int | None) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x, head), y)


__all__ = ["ClientData", "TaskData", "cross_entropy", "operation", "run_operation"]
