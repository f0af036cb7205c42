"""Federated unlearning methods: how a run forgets an erasure request.

Each method registers itself by name (``--unlearning NAME``, config ``unlearning``) with its
typed parameters (``--unlearning-param KEY=VALUE``, TOML table ``[unlearning_params]``). A
method wraps the run's training strategy: it gets an :class:`UnlearningJob` (the request, the
global model, what is erased, the clients and the grid) and returns the unlearned model, and
optionally the training strategy to go on with. Work on client data runs on the clients, as
named operations of a QUERY message (:mod:`strategies.unlearning.client_ops`); training rounds
go through the run's own strategy (:func:`fedcl.server_app.train_round`).

Methods: ``retrain`` (the exact oracle, also what every other method is judged against),
``ssd``, ``federaser``, ``projection``, ``gs-lora``; see each module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedcl import protocol
from fedcl.errors import ConfigError, FedclError
from strategies.registry import NoParams, typed_params


class UnlearningMethod:
    """A method's server half. Defaults: no storage, nothing to report."""

    def __init__(self, params: Any, out_dir: Any = None) -> None:
        self.params = params
        self.out_dir = out_dir

    def observe_round(self, info: Any, arrays_before: ArrayRecord, replies: list[Message],
                      erased: Any) -> None:
        """Called after every training round of the run (FedEraser stores updates here)."""

    def unlearn(self, job: UnlearningJob) -> tuple[ArrayRecord, Any]:
        """The unlearned global model, and the strategy to go on with (None: the server
        rebuilds the strategy's task-end state from the unlearned model)."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """Extra numbers for the request's summary entry (FedEraser's storage)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class MethodEntry:
    name: str
    summary: str
    params: type
    build: Callable[[Any, Any], UnlearningMethod]


_METHODS: dict[str, MethodEntry] = {}


def register(name: str, summary: str, *, params: type = NoParams
             ) -> Callable[[Callable[[Any, Any], UnlearningMethod]],
                           Callable[[Any, Any], UnlearningMethod]]:
    """Register ``build(params, out_dir) -> UnlearningMethod`` under ``name``."""

    def deco(build: Callable[[Any, Any], UnlearningMethod]
             ) -> Callable[[Any, Any], UnlearningMethod]:
        if name in _METHODS:
            raise ValueError(f"unlearning method '{name}' registered twice")
        _METHODS[name] = MethodEntry(name, summary, params, build)
        return build

    return deco


def _load_all() -> None:
    from strategies.unlearning import (  # noqa: F401  (registration by import)
        federaser,
        gs_lora,
        projection,
        retrain,
        ssd,
    )


def names() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get(name: str) -> MethodEntry:
    _load_all()
    if name not in _METHODS:
        raise ConfigError(f"unknown unlearning '{name}'; choose one of {', '.join(names())}")
    return _METHODS[name]


def parse_params(name: str, values: Mapping[str, Any]) -> Any:
    entry = get(name)
    return typed_params(entry.params, values, f"unlearning method '{name}'")


def build(config: Any, out_dir: Any = None) -> UnlearningMethod:
    entry = get(config.unlearning)
    return entry.build(parse_params(config.unlearning, config.unlearning_params), out_dir)


# --------------------------------------------------------------------------------------------
# One request's work
# --------------------------------------------------------------------------------------------
@dataclass
class UnlearningJob:
    """What a method needs to carry out one request."""

    request: Any  # fedcl.erasure.ErasureRequest
    config: Any
    scenario: Any
    grid: Any
    roster: Any
    cancel: threading.Event | None
    arrays: ArrayRecord  # the global model when the request came
    before: Any  # fedcl.erasure.ErasedData: erased before this request
    after: Any  # ... and with it
    tasks: list[int]  # the tasks whose data clients hold
    progress: Any  # fedcl.checkpoint.Progress (records, rounds so far)

    def connected(self) -> list[int]:
        live = set(self.grid.get_node_ids())
        return sorted(pid for pid, node in self.roster.nodes.items() if node in live)

    def forget_clients(self) -> list[int]:
        """Clients holding the request's data (the erased client, or every client still in
        the federation for a class)."""
        if self.request.client is not None:
            return [self.request.client]
        return [q for q in self.connected() if q not in self.before.clients]

    def retain_clients(self) -> list[int]:
        """Clients that keep data after the request."""
        return [q for q in self.connected() if q not in self.after.clients]

    def sample(self, pool: list[int], step: int, salt: int) -> list[int]:
        """``max(1, int(fraction_train * len(pool)))`` clients of ``pool`` for step ``step`` of
        a method (``salt`` tells methods apart), seeded by the run seed and the request's
        round."""
        import numpy as np

        from fedcl.config import sample_size

        k = sample_size(len(pool), self.config.fraction_train)
        rng = np.random.default_rng([self.config.seed, self.progress.global_round, step, salt])
        return sorted(int(q) for q in rng.choice(pool, size=k, replace=False))

    def ask(self, pids: list[int], op: str, arrays: ArrayRecord | None = None,
            required: list[int] | None = None, records: dict[str, Any] | None = None,
            **settings: Any) -> dict[int, RecordDict]:
        """Run client operation ``op`` on ``pids`` for this request (with the global model, or
        ``arrays``, and any extra ``records``); returns the replies' records by partition id.
        A client in ``required`` (default: all) that fails or does not answer stops the method
        with one line; others are left out with a warning."""
        from fedcl.server_app import error_line, send_and_receive

        required = pids if required is None else required
        cfg = ConfigRecord({protocol.OP: op, protocol.RUN_CONFIG_JSON: self.config.to_json(),
                            protocol.OP_REQUEST: self.request.to_text(),
                            protocol.OP_TASKS: list(self.tasks) or [-1],
                            protocol.ERASED_CLASSES: self.before.encode(), **settings})
        model = arrays if arrays is not None else self.arrays
        messages = [Message(content=RecordDict({protocol.CONFIG: cfg, protocol.ARRAYS: model,
                                                **(records or {})}),
                            message_type=MessageType.QUERY, dst_node_id=self.roster.nodes[q])
                    for q in pids]
        replies = send_and_receive(self.grid, messages, self.config.round_timeout_s,
                                   self.cancel)
        by_node = {node: pid for pid, node in self.roster.nodes.items()}
        out: dict[int, RecordDict] = {}
        failed: dict[int, str] = {}
        for msg in replies:
            pid = by_node.get(msg.metadata.src_node_id, -1)
            if msg.has_error():
                failed[pid] = error_line(msg.error.reason)
            else:
                out[pid] = msg.content
        for pid in required:
            if pid not in out:
                why = failed.get(pid, "no reply within round_timeout_s")
                raise FedclError(f"client {pid} failed the '{op}' step: {why}")
        if failed or len(out) < len(pids):
            import logging

            logging.getLogger("fedcl").warning("unlearning: %d of %d clients failed the '%s' "
                                               "step", len(pids) - len(out), len(pids), op)
        return out


__all__ = ["MethodEntry", "UnlearningJob", "UnlearningMethod", "build", "get", "names",
           "parse_params", "register"]
