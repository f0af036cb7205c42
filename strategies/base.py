"""The seams that fedcl's continual server loop calls on a strategy.

:class:`ContinualStrategy` is a mixin placed before a Flower strategy class
(``class FedAvgCL(ContinualStrategy, FedAvg)``). Flower's ``configure_train`` /
``aggregate_train`` stay in charge of a round; the mixin adds:

* task-boundary hooks, :meth:`begin_task` and :meth:`end_task`, called by the server loop at
  the start and end of every task (FOT extracts its subspace in ``end_task``);
* :meth:`train_config`, extra keys sent to clients with every training message;
* extra client payloads: records named in :attr:`payload_keys` (activation sketches, Fisher
  diagonals, prototypes, ...) are taken out of each reply before Flower's FedAvg validates and
  averages it, and kept in :attr:`payloads` (by partition id) for the strategy to use;
* :meth:`on_erasure`, where erasure requests arrive (not used by the baselines).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict

from fedcl import protocol


class ContinualStrategy:
    """Continual-learning hooks for a Flower strategy. Defaults do nothing."""

    #: names of extra records clients add to their train replies
    payload_keys: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.payloads: dict[int, RecordDict] = {}

    def begin_task(self, task: int, arrays: ArrayRecord) -> None:
        """Called before the first round of ``task``."""

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        """Called after the last round of ``task``; may return changed global arrays."""
        return arrays

    def train_config(self, task: int) -> dict[str, Any]:
        """Extra config keys for this task's training messages."""
        return {}

    def on_erasure(self, request: Any) -> None:
        """Called when an erasure request comes due (unlearning strategies override it)."""

    def take_payloads(self, replies: Iterable[Message]) -> list[Message]:
        """Move :attr:`payload_keys` records out of the replies into :attr:`payloads`."""
        replies = list(replies)
        self.payloads = {}
        if not self.payload_keys:
            return replies
        for msg in replies:
            if msg.has_error():
                continue
            extra = RecordDict()
            for key in self.payload_keys:
                if key in msg.content:
                    extra[key] = msg.content[key]
                    del msg.content[key]
            pid = int(msg.content[protocol.CLIENT_INFO][protocol.PARTITION_ID])
            self.payloads[pid] = extra
        return replies

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, Any]:
        return super().aggregate_train(server_round, self.take_payloads(replies))  # type: ignore[misc]
