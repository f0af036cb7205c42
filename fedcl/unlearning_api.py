"""The API of an unlearning method: its server half and what it gets for one request.

A method (``--unlearning NAME``) registers a build function with
:func:`fedcl.plugins.register_unlearning`; the run calls :meth:`UnlearningMethod.wrap` on its
strategy, and :meth:`UnlearningMethod.unlearn` with an :class:`UnlearningJob` when a request
comes due (:mod:`fedcl.unlearning_run`). Work on client data runs on the clients, as named
operations of a QUERY message (:meth:`UnlearningJob.ask`, :mod:`fedcl.client_ops`); training
rounds go through the run's own strategy (:func:`fedcl.rounds.train_round`) or a walk of the
task-stream driver (:mod:`fedcl.stream`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcl import protocol
from fedcl.checkpoint import RunState
from fedcl.config import Config, sample_size
from fedcl.data.scenarios import Scenario
from fedcl.erasure import ErasedData, ErasureRequest
from fedcl.errors import FedclError
from fedcl.rounds import Roster, error_line, send_and_receive
from fedcl.strategy import ContinualStrategy

log = logging.getLogger("fedcl")


class UnlearningMethod:
    """A method's server half. Defaults: no storage, nothing to report."""

    def __init__(self, params: Any, out_dir: Any = None) -> None:
        self.params = params
        self.out_dir = out_dir

    def wrap(self, strategy: ContinualStrategy) -> ContinualStrategy:
        """The run's strategy, wrapped if the method must see its rounds (FedEraser records
        every client's update through a :class:`~fedcl.strategy.StrategyWrapper`). Called for
        the strategy the live run starts with and for every strategy it goes on with after
        a request; never for the walks of an erasure (oracle, rebuild, calibration)."""
        return strategy

    def unlearn(self, job: UnlearningJob) -> tuple[ArrayRecord, ContinualStrategy | None]:
        """The unlearned global model, and the strategy to go on with (None: the server
        rebuilds the strategy's task-end state from the unlearned model). Any exception
        becomes :class:`~fedcl.unlearning_run.UnlearningFailed`: the run stops with one line
        and keeps the model from before the request."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """Extra numbers for the request's summary entry (FedEraser's storage)."""
        return {}

    def prune(self, requests_done: int) -> None:
        """Called before each checkpoint with the number of requests the checkpoint on disk
        already holds as carried out (a resume never repeats them), and once more at the end
        of the run with every request: storage that only those requests could use may go.
        Default: nothing is stored."""

    def storage(self) -> dict[str, Any]:
        """What the method kept on disk over the run, for summary.json's
        ``unlearning_storage`` (FedEraser: bytes stored and pruned); empty: nothing."""
        return {}

    def check_requests(self, config: Config, scenario: Scenario,
                       requests: list[ErasureRequest]) -> list[str]:
        """Called before the run starts with the whole erasure schedule: one warning line per
        request the method can tell in advance it will not act on (SSD's selection bound).
        Default: none."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------------
# One request's work
# --------------------------------------------------------------------------------------------
@dataclass
class UnlearningJob:
    """What a method needs to carry out one request."""

    request: ErasureRequest
    config: Config
    scenario: Scenario
    grid: Grid
    roster: Roster
    cancel: threading.Event | None
    arrays: ArrayRecord  # the global model when the request came
    before: ErasedData  # erased before this request
    after: ErasedData  # ... and with it
    tasks: list[int]  # the tasks whose data clients hold
    progress: RunState  # the run so far (records, rounds)

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

    def sample(self, pool: list[int], step: int, salt: int, fraction: float | None = None
               ) -> list[int]:
        """``max(1, int(fraction * len(pool)))`` clients of ``pool`` (``fraction``: the run's
        ``fraction_train`` unless given) for step ``step`` of a method (``salt`` tells methods
        apart), seeded by the run seed and the request's round."""
        share = self.config.fraction_train if fraction is None else fraction
        k = sample_size(len(pool), share)
        rng = np.random.default_rng([self.config.seed, self.progress.global_round, step, salt])
        return sorted(int(q) for q in rng.choice(pool, size=k, replace=False))

    def ask(self, pids: list[int], op: str, arrays: ArrayRecord | None = None,
            required: list[int] | None = None, records: dict[str, Any] | None = None,
            **settings: Any) -> dict[int, RecordDict]:
        """Run client operation ``op`` on ``pids`` for this request (with the global model, or
        ``arrays``, and any extra ``records``); returns the replies' records by partition id.
        A client in ``required`` (default: all) that fails or does not answer stops the method
        with one line; others are left out with a warning."""
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
        by_node = self.roster.node_to_pid()
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
            log.warning("unlearning: %d of %d clients failed the '%s' "
                                               "step", len(pids) - len(out), len(pids), op)
        return out


__all__ = ["UnlearningJob", "UnlearningMethod"]
