"""The seams that fedcl's continual server loop calls on a strategy.

:class:`ContinualStrategy` is a mixin placed before a Flower strategy class
(``class FedAvgCL(ContinualStrategy, FedAvg)``). Flower's ``configure_train`` /
``aggregate_train`` stay in charge of a round; the mixin adds:

* task-boundary hooks, :meth:`begin_task` and :meth:`end_task`, called by the server loop at
  the start and end of every task (FOT extracts its subspace in ``end_task``);
* :meth:`train_config` and :meth:`train_records`, extra config keys and extra records (a basis,
  prototypes, ...) sent to clients with a round's training messages;
* extra client payloads: records named in :attr:`payload_keys` (activation sketches, Fisher
  diagonals, prototypes, ...) are taken out of each reply before Flower's FedAvg validates and
  averages it, and kept in :attr:`payloads` (by partition id) for the strategy to use;
* :meth:`state_metrics` and :meth:`save_state`, the strategy's own state as metrics (logged by
  the server loop after each task) and as files (logged as artifacts at the end);
* :meth:`on_erasure`, where erasure requests arrive (not used by the baselines).

Where the Flower strategy aggregates as FedAvg does (FedAvg, FedProx), the arrays are averaged
by :func:`fedcl.aggregation.weighted_average` (the same average, read in place); Flower's reply
checks and metric aggregation stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcl import protocol
from fedcl.aggregation import weighted_average


@dataclass(frozen=True)
class RoundInfo:
    """Where a training round stands in the task stream."""

    task: int
    task_round: int  # 1-based within the task
    rounds_per_task: int
    round: int  # 1-based over the run

    @property
    def last_of_task(self) -> bool:
        return self.task_round == self.rounds_per_task


class ContinualStrategy:
    """Continual-learning hooks for a Flower strategy. Defaults do nothing."""

    #: names of extra records clients add to their train replies
    payload_keys: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.payloads: dict[int, RecordDict] = {}

    def begin_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        """Called before the first round of ``task``; may return changed global arrays."""
        return arrays

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        """Called after the last round of ``task``; may return changed global arrays."""
        return arrays

    def train_config(self, info: RoundInfo) -> dict[str, Any]:
        """Extra config keys for this round's training messages."""
        return {}

    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        """Extra records added to this round's training messages."""
        return {}

    def state_metrics(self) -> dict[str, float]:
        """The strategy's state as metrics, logged after each task."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state between rounds, for checkpoints (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (on resume)."""

    def save_state(self, out_dir: Path) -> list[Path]:
        """Write the strategy's final state to ``out_dir``; returns the files written."""
        return []

    def configure_round(self, info: RoundInfo, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """Flower's ``configure_train`` plus this round's :meth:`train_records`."""
        for key, value in self.train_config(info).items():
            config[key] = value
        messages = list(self.configure_train(info.round, arrays, config, grid))  # type: ignore[attr-defined]
        records = self.train_records(info)
        for msg in messages:
            for key, record in records.items():
                if key not in msg.content:
                    msg.content[key] = record
        return messages

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

    def after_aggregate(self, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        """Adjust Flower's aggregate (the replies still hold each client's arrays)."""
        return arrays

    def cohort_mean_key(self, info: RoundInfo) -> str | None:
        """The metric a cohort may weight its members' mean by, to send that one reply instead
        of one per member (``cohort_size`` > 1), or None for a reply per member. Averaging
        inside a cohort changes nothing where the round's aggregate is FedAvg's weighted
        average and nothing else is read per client: Flower's aggregation (the fedcl path of
        :meth:`aggregate_train`), no client payloads, :meth:`after_aggregate` not overridden.
        A strategy that knows better overrides this (FOT: payloads only in a task's last
        round)."""
        flower = super().aggregate_train  # type: ignore[misc]
        if (getattr(flower, "__func__", None) is FedAvg.aggregate_train
                and not self.payload_keys
                and type(self).after_aggregate is ContinualStrategy.after_aggregate):
            return str(self.weighted_by_key)  # type: ignore[attr-defined]
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, Any]:
        replies = self.take_payloads(replies)
        flower = super().aggregate_train  # type: ignore[misc]
        if getattr(flower, "__func__", None) is FedAvg.aggregate_train:
            # FedAvg's own checks and metrics, fedcl's in-place weighted average of the arrays
            valid, _ = self._check_and_log_replies(replies, is_train=True)  # type: ignore[attr-defined]
            arrays = metrics = None
            if valid:
                contents = [m.content for m in valid]
                key = self.weighted_by_key  # type: ignore[attr-defined]
                arrays = weighted_average(contents, key)
                metrics = self.train_metrics_aggr_fn(contents, key)  # type: ignore[attr-defined]
        else:
            arrays, metrics = flower(server_round, replies)
        if arrays is not None:
            arrays = self.after_aggregate(arrays, [m for m in replies if not m.has_error()])
        return arrays, metrics
