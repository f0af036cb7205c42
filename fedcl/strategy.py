"""The server half of a strategy: the seams fedcl's task-stream driver calls, and what a
strategy declares it supports.

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
* :meth:`on_erasure`, where erasure requests arrive (not used by the baselines);
* :meth:`task_counts`, what the central evaluation reports for a task: by default the global
  model's test counts; a method whose clients hold models of their own (FedWeIT) reports those
  models' counts instead.

A strategy declares what it supports in :attr:`ContinualStrategy.capabilities`
(:class:`Capabilities`) instead of fedcl guessing from which methods it overrides (as Mammoth's
models declare their ``COMPATIBILITY``). Where it declares ``fedavg_aggregate`` (FedAvg,
FedProx, FOT, PRD), the arrays are averaged by :func:`fedcl.aggregation.weighted_average` (the
same average as Flower's FedAvg, read in place); Flower's reply checks and metric aggregation
stay. Otherwise the Flower strategy's own ``aggregate_train`` runs (FedAdam, Krum, ...).

:class:`StrategyWrapper` adds behaviour around any strategy, as Flower's differential-privacy
strategies wrap an inner one (FedEraser's recording of client updates is one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcl import protocol
from fedcl.aggregation import weighted_average
from fedcl.config import Config

SCENARIOS = ("class-il", "task-il", "domain-il")

#: One task's test counts, ``{dataset class: [correct, total]}`` (:mod:`fedcl.evaluation`).
TaskCounts = dict[int, list[int]]
#: Counts a model (a ``state_dict`` of the run's model) on one task's test samples.
CountModel = Callable[[dict[str, torch.Tensor]], TaskCounts]


def flower_kwargs(config: Config) -> dict[str, object]:
    """Settings every fedcl strategy gives Flower's FedAvg family.

    fedcl's server loop samples the round's clients itself (one seeded stream, the same for every
    strategy) and hands Flower a grid that shows only those; Flower then takes all of them.
    Evaluation is central, on the server, so federated evaluation is off.
    """
    return {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1,
            "min_evaluate_nodes": 0, "min_available_nodes": 1}


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


@dataclass(frozen=True)
class Capabilities:
    """What a strategy supports, declared by the strategy (checked before a run starts).

    The defaults are the safe ones: a strategy that declares nothing runs Flower's own
    aggregation, gets one reply per client, and is rebuilt after unlearning by replaying its
    task ends."""

    scenarios: tuple[str, ...] = SCENARIOS
    """The scenarios the method is defined for (``class-il``, ``task-il``, ``domain-il``)."""
    fedavg_aggregate: bool = False
    """The Flower strategy's ``aggregate_train`` is FedAvg's weighted mean of the client arrays
    (by ``weighted_by_key``), so fedcl may average in place with the same result."""
    cohort_mean: bool = False
    """A cohort of clients (``cohort_size`` > 1) may reply with its members' weighted mean
    instead of one reply each: true when the round's aggregate is FedAvg's weighted mean and
    nothing else is read per client (no payloads, no per-reply :meth:`after_aggregate`)."""
    task_end_state: bool = True
    """The strategy keeps state built at task ends (FOT's basis from client sketches, PRD's
    previous model) that must be built again without erased data after unlearning; false for
    a strategy whose ``begin_task``/``end_task`` depend on nothing but the global model."""
    model_replies: bool = True
    """Clients reply with the whole model's arrays, screened against the global model. False:
    fedcl tells the clients to reply with an empty model record, screens the rest of each
    reply (metrics, identity), and the update travels in the strategy's own records
    (:attr:`ContinualStrategy.payload_keys`), which its ``aggregate_train`` checks and
    aggregates (FedWeIT's sparse base). Such a strategy cannot train in batched cohorts."""

    def __post_init__(self) -> None:
        # a plugin's declaration is checked where it is written (at its import), not at the
        # first run that reads it: "class-il" (a string) would pass `in` checks for "il"
        if isinstance(self.scenarios, str) or not isinstance(self.scenarios, tuple | list) \
                or not all(s in SCENARIOS for s in self.scenarios):
            raise ValueError(f"Capabilities.scenarios must be a tuple of scenario names "
                             f"({', '.join(SCENARIOS)}), got {self.scenarios!r}")
        object.__setattr__(self, "scenarios", tuple(self.scenarios))


class ContinualStrategy:
    """Continual-learning hooks for a Flower strategy. Defaults do nothing."""

    #: names of extra records clients add to their train replies
    payload_keys: tuple[str, ...] = ()
    #: what the strategy supports (:class:`Capabilities`)
    capabilities: Capabilities = Capabilities()

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

    def task_counts(self, task: int, arrays: ArrayRecord, count: CountModel
                    ) -> TaskCounts | None:
        """The test counts fedcl reports for ``task`` (every round, and for the accuracy
        matrix): None for the default, ``count`` of the global model ``arrays``. A method whose
        clients hold models of their own returns the counts of those models, summed over them
        (each class's correct and total added), so the accuracy is the mean over the models:
        ``count(state_dict)`` counts a model of the run's architecture on the task's test
        samples (eval mode). Called with the global model after every round and once before
        the first (the random-init baseline)."""
        return None

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
            self.payloads[protocol.reply_partition_id(msg)] = extra
        return replies

    def after_aggregate(self, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        """Adjust Flower's aggregate (the replies still hold each client's arrays)."""
        return arrays

    def cohort_mean_key(self, info: RoundInfo) -> str | None:
        """The metric a cohort may weight its members' mean by, to send that one reply instead
        of one per member (``cohort_size`` > 1), or None for a reply per member: the weighting
        metric where :attr:`capabilities` declares ``cohort_mean``. A strategy whose answer
        changes by round overrides this (FOT: payloads only in a task's last round)."""
        if self.capabilities.cohort_mean:
            return str(self.weighted_by_key)  # type: ignore[attr-defined]
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, Any]:
        """Payloads out of the replies, then the aggregate (fedcl's in-place weighted mean
        where :attr:`capabilities` declares ``fedavg_aggregate``, else the Flower strategy's),
        then :meth:`after_aggregate`."""
        replies = self.take_payloads(replies)
        if self.capabilities.fedavg_aggregate:
            # FedAvg's own checks and metrics, fedcl's in-place weighted average of the arrays
            valid, _ = self._check_and_log_replies(replies, is_train=True)  # type: ignore[attr-defined]
            arrays = metrics = None
            if valid:
                contents = [m.content for m in valid]
                key = self.weighted_by_key  # type: ignore[attr-defined]
                arrays = weighted_average(contents, key)
                metrics = self.train_metrics_aggr_fn(contents, key)  # type: ignore[attr-defined]
        else:
            arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            arrays = self.after_aggregate(arrays, [m for m in replies if not m.has_error()])
        return arrays, metrics


def strategy_label(strategy: ContinualStrategy) -> str:
    """``strategy <class name>`` of a strategy under any wrappers (FedEraser's recorder), for
    messages about what it did."""
    while isinstance(strategy, StrategyWrapper):
        strategy = strategy.inner
    return f"strategy {type(strategy).__qualname__}"


class StrategyWrapper(ContinualStrategy):
    """A strategy that delegates every seam to an inner strategy; subclasses add behaviour
    around the calls they override (as Flower's ``DifferentialPrivacyServerSideFixedClipping``
    wraps an inner strategy). Attributes it does not define are read from the inner one."""

    def __init__(self, inner: ContinualStrategy) -> None:
        self.inner = inner

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.inner.capabilities

    @property
    def payload_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.payload_keys

    @property
    def payloads(self) -> dict[int, RecordDict]:  # type: ignore[override]
        return self.inner.payloads

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def begin_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        return self.inner.begin_task(task, arrays)

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        return self.inner.end_task(task, arrays)

    def train_config(self, info: RoundInfo) -> dict[str, Any]:
        return self.inner.train_config(info)

    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        return self.inner.train_records(info)

    def state_metrics(self) -> dict[str, float]:
        return self.inner.state_metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def save_state(self, out_dir: Path) -> list[Path]:
        return self.inner.save_state(out_dir)

    def configure_round(self, info: RoundInfo, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        return self.inner.configure_round(info, arrays, config, grid)

    def on_erasure(self, request: Any) -> None:
        self.inner.on_erasure(request)

    def task_counts(self, task: int, arrays: ArrayRecord, count: CountModel
                    ) -> TaskCounts | None:
        return self.inner.task_counts(task, arrays, count)

    def take_payloads(self, replies: Iterable[Message]) -> list[Message]:
        return self.inner.take_payloads(replies)

    def after_aggregate(self, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        return self.inner.after_aggregate(arrays, replies)

    def cohort_mean_key(self, info: RoundInfo) -> str | None:
        return self.inner.cohort_mean_key(info)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, Any]:
        return self.inner.aggregate_train(server_round, replies)
