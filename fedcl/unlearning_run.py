"""Carrying out erasure requests in a run: the method, the retrain oracle, and rebuilding the
strategy's task-end state.

The oracle (federated retraining from scratch without the erased data, the
exact baseline of Liu et al., "FedEraser", IWQoS 2021) replays every round run so far
from the initial model with a fresh strategy and the same client seeds: each round trains the
clients that round sampled in the run, minus the erased ones (never a new draw from the smaller
pool, which at ``fraction_train`` < 1 would change about half of every round's clients and put
sampling noise into every gap measured against the oracle), with erased classes left out of
every client's data. A round whose sampled clients were all erased trains nobody and keeps the
model. With ``unlearning = "retrain"`` the run goes on from the oracle's model
*and strategy*: under FOT the basis is rebuilt without the erased data, because the oracle's
strategy built it from the replayed rounds alone. Other methods return their own model; the
strategy state built from client payloads at task ends (FOT's basis, PRD's old model) is then
rebuilt from it without the erased data (:meth:`Erasures.rebuild_strategy`), unless the method
rebuilt it itself (FedEraser's calibration walks every stored round with a fresh strategy).
Both walks are walks of the task-stream driver (:mod:`fedcl.stream`). Every request is judged
against the oracle (:mod:`fedcl.erasure_judge`) and its entry added to summary.json's
``erasures`` and to MLflow (``erasure_<i>_*``). From then on the run is measured on what was not
erased (classes erased everywhere leave the test split: :mod:`fedcl.evaluation`), and the
request's forget-set accuracy is tracked after every round (``forget_curve``).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedcl import STATUS_LOGGER, plugins, protocol
from fedcl.checkpoint import RunState
from fedcl.config import Config
from fedcl.data.scenarios import Scenario
from fedcl.erasure import ErasedData, ErasureRequest
from fedcl.erasure_judge import ErasureJudge, UnlearningFailed
from fedcl.errors import FedclError, RunCancelled
from fedcl.evaluation import Evaluator
from fedcl.results import client_state_entry
from fedcl.rounds import Roster, purge_stores, sample_clients, train_round
from fedcl.strategy import ContinualStrategy, RoundInfo
from fedcl.stream import TaskStreamDriver
from fedcl.tracking import Tracker
from fedcl.unlearning_api import UnlearningJob, UnlearningMethod

log = logging.getLogger("fedcl")
status = logging.getLogger(STATUS_LOGGER)  # status lines on the live display


class OracleWalk(TaskStreamDriver):
    """The retrain oracle's walk: every round of ``state.records`` again, each round with the
    clients it sampled in the run (``schedule``: round -> partition ids) minus the erased ones,
    erased classes left out, clients leaving their Context.state alone (a replay).

    A round missing from ``schedule`` (a record without its sample) is drawn again from the
    clients never erased with the round's own seed. A round left with no client keeps the
    model; one left with fewer than ``min_train_clients`` needs all of them to answer."""

    def __init__(self, strategy: ContinualStrategy, arrays: ArrayRecord, grid: Grid,
                 roster: Roster, config: Config, erased: ErasedData,
                 cancel: threading.Event | None,
                 schedule: dict[int, list[int]] | None = None) -> None:
        super().__init__(strategy, arrays)
        self.grid, self.roster, self.config = grid, roster, config
        self.erased, self.cancel = erased, cancel
        self.schedule = schedule or {}
        self.pool = [q for q in range(config.clients) if q not in erased.clients]
        self.config_json = config.to_json()

    def clients_of(self, info: RoundInfo) -> list[int]:
        """The partition ids round ``info`` trains in the replay."""
        sampled = self.schedule.get(info.round)
        if not sampled:
            return sample_clients(self.pool, self.config.fraction_train, self.config.seed,
                                  info.round)
        return [q for q in sampled if q not in self.erased.clients]

    def run_round(self, info: RoundInfo) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RunCancelled("run cancelled")
        pids = self.clients_of(info)
        if not pids:
            log.info("oracle: round %d sampled only erased clients; the model stays",
                     info.round)
            return
        self.arrays = train_round(self.grid, self.roster, self.strategy, self.config,
                                  self.config_json, self.arrays, info, pids, self.cancel,
                                  replay=True, erased=self.erased,
                                  min_clients=min(self.config.min_train_clients,
                                                  len(pids)),
                                  walk=self.walk_id).arrays


class RebuildWalk(TaskStreamDriver):
    """Rebuilding a strategy's task-end state from a given model: for every finished task, its
    last round again with the clients sampled then (erased ones left out), who send their
    task-end payloads for the model untrained; ``end_task`` takes them. A strategy that
    declares no task-end state (``Capabilities.task_end_state``) only has its hooks called."""

    def __init__(self, strategy: ContinualStrategy, arrays: ArrayRecord, job: UnlearningJob,
                 clients: dict[int, list[int]]) -> None:
        super().__init__(strategy, arrays)
        self.job, self.clients = job, clients

    def run_round(self, info: RoundInfo) -> None:
        if not self.strategy.capabilities.task_end_state:
            return
        job = self.job
        pids = [q for q in self.clients[info.round] if q not in job.after.clients]
        train_round(job.grid, job.roster, self.strategy, job.config, job.config.to_json(),
                    self.arrays, info, pids, job.cancel, replay=True, erased=job.after,
                    train=False, walk=self.walk_id)


def check_finite(arrays: ArrayRecord) -> None:
    """Refuse an unlearned model with NaN or infinite weights (one line)."""
    for key, value in arrays.to_torch_state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FedclError(f"the unlearned model's {key} is not finite (the method "
                             f"diverged; a smaller step may help)")


class Erasures:
    """Carries out erasure requests in a running task stream with the run's unlearning
    method (:attr:`method`), and judges each against the retrain oracle."""

    def __init__(self, grid: Grid, config: Config, scenario: Scenario, evaluator: Evaluator,
                 tracker: Tracker, out_dir: Path | None = None) -> None:
        self.grid, self.config, self.scenario = grid, config, scenario
        self.tracker = tracker
        self.method: UnlearningMethod = plugins.build_unlearning(config, out_dir)
        self.judge = ErasureJudge(config, scenario, evaluator)
        self.forget_sets: dict[int, list[Any]] = {}  # request index -> its forget samples

    @property
    def keeps_stores(self) -> bool:
        """Whether the run's clients keep stores (its trainer's ``keeps_client_store``)."""
        return plugins.build_trainer(self.config).keeps_client_store

    def purge(self, p: RunState, erased: ErasedData, roster: Roster,
              cancel: threading.Event | None) -> int:
        """Remove the erased samples from every client's store now, before the next round
        (:func:`fedcl.rounds.purge_stores`); each answering client's ``client_state`` is
        updated from its reply. Returns the samples removed."""
        infos = purge_stores(self.grid, roster, erased, self.config.round_timeout_s, cancel)
        removed = 0
        for pid, info in infos.items():
            removed += int(info.get(protocol.PURGED_SAMPLES, 0))  # type: ignore[arg-type]
            p.client_state[pid] = client_state_entry(info)
        status.info("erasure: %d buffered samples purged from the clients' stores", removed)
        return removed

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def track_forgetting(self, p: RunState, schedule: list[ErasureRequest]) -> None:
        """After a round: every carried-out request's forget-set accuracy, appended to its
        entry's ``forget_curve`` and logged to MLflow (``erasure_<i>_forget_curve``, step =
        round). A resumed run draws the forget sets again from the schedule."""
        erased = ErasedData()
        for i, entry in enumerate(p.erasures):
            if i not in self.forget_sets:
                seen = entry.get("tasks_seen")
                self.forget_sets[i] = ([] if seen is None else self.judge.sample_sets(
                    schedule[i], erased, erased.add(schedule[i]), list(seen))[0])
            erased = erased.add(schedule[i])
            acc = self.judge.forget_accuracy(p.arrays, self.forget_sets[i])
            if acc is None:
                continue
            entry.setdefault("forget_curve", []).append({"round": p.global_round, "acc": acc})
            self.tracker.log_metrics({f"erasure_{i}_forget_curve": acc}, step=p.global_round)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)

    def apply(self, req: ErasureRequest, p: RunState, strategy: ContinualStrategy,
              roster: Roster, cancel: threading.Event | None) -> ContinualStrategy:
        """Carry out ``req`` on the run ``p``; returns the strategy to go on with (wrapped by
        the method, as the run's first one was). A failing method raises
        :class:`UnlearningFailed` and leaves ``p`` as it was."""
        name = self.config.unlearning
        status.info("erasure: %s (%s)", req.describe(), name)
        before = ErasedData.of(p)
        after = before.add(req)
        seen = list(range(p.task + 1 if p.task_started else p.task))
        job = UnlearningJob(request=req, config=self.config, scenario=self.scenario,
                            grid=self.grid, roster=roster, cancel=cancel, arrays=p.arrays,
                            before=before, after=after, tasks=seen, progress=p)
        method_seconds = 0.0
        if name != "retrain":
            started = time.monotonic()
            try:
                arrays, method_strategy = self.method.unlearn(job)
                check_finite(arrays)
                if method_strategy is None:
                    method_strategy, arrays = self.rebuild_strategy(job, arrays)
            except (RunCancelled, KeyboardInterrupt):
                raise
            except Exception as err:
                reason = str(err) if isinstance(err, FedclError) else (
                    f"{type(err).__name__}: {err}")
                raise UnlearningFailed(f"unlearning '{name}' failed on erasure "
                                       f"'{req.to_text()}': {reason}; the global model before "
                                       "the request is kept in the checkpoint") from None
            method_seconds = time.monotonic() - started
        started = time.monotonic()
        oracle_strategy = plugins.build_strategy(self.config)
        oracle_arrays = self.retrain(p, after, oracle_strategy, roster, cancel)
        oracle_seconds = time.monotonic() - started
        if name == "retrain":
            arrays, method_strategy, method_seconds = (oracle_arrays, oracle_strategy,
                                                       oracle_seconds)
        entry = self.judge(req, p, before, after, arrays, oracle_arrays)
        self.forget_sets[len(p.erasures)] = self.judge.last_forget
        entry["seconds"] = method_seconds
        entry["oracle"]["seconds"] = oracle_seconds
        entry.update(self.method.report())
        p.erased_clients = list(after.clients)
        p.erased_classes = [list(pair) for pair in after.classes]
        # from now on the run is measured on what was not erased
        self.judge.evaluator.excluded = after.classes_everywhere()
        if self.keeps_stores:
            entry["purged_samples"] = self.purge(p, after, roster, cancel)
        p.erasures.append(entry)
        index = len(p.erasures) - 1
        flat = {f"erasure_{index}_{k}": float(v) for k, v in entry.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}
        flat.update({f"erasure_{index}_oracle_{k}": v for k, v in entry["oracle"].items()})
        flat.update({f"erasure_{index}_{k}": v
                     for k, v in entry["distance_to_oracle"].items()})
        self.tracker.log_metrics(flat, step=p.global_round)
        p.arrays = arrays
        return self.method.wrap(method_strategy)

    def rebuild_strategy(self, job: UnlearningJob, arrays: ArrayRecord
                         ) -> tuple[ContinualStrategy, ArrayRecord]:
        """A fresh strategy whose task-end state (FOT's basis, PRD's old model) is built again
        from ``arrays`` without the erased data (:class:`RebuildWalk`); returns it with the
        model after the walk."""
        strategy = plugins.build_strategy(self.config)
        p, rounds = job.progress, self.config.rounds_per_task
        last_rounds = {r.task: r for r in p.records if r.task_round == rounds}
        finished = [t for t in job.tasks if t in last_rounds]
        walk = RebuildWalk(strategy, arrays, job,
                           {last_rounds[t].round: list(last_rounds[t].sampled) for t in finished})
        arrays = walk.walk([RoundInfo(t, rounds, rounds, last_rounds[t].round) for t in finished],
                           then_open=p.task if p.task_started else None)
        return strategy, arrays

    def retrain(self, p: RunState, erased: ErasedData, strategy: ContinualStrategy,
                roster: Roster, cancel: threading.Event | None) -> ArrayRecord:
        """The oracle: every round so far again, from the initial model, with each round's
        sampled clients minus the erased ones and without the erased data
        (:class:`OracleWalk`)."""
        config = self.config
        rng = torch.get_rng_state()
        arrays = ArrayRecord(plugins.build_model(config, self.scenario).state_dict())
        torch.set_rng_state(rng)
        rounds = config.rounds_per_task
        schedule = {r.round: list(r.sampled) for r in p.records}
        walk = OracleWalk(strategy, arrays, self.grid, roster, config, erased, cancel, schedule)
        return walk.walk([RoundInfo(r.task, r.task_round, rounds, r.round) for r in p.records],
                         then_open=p.task if p.task_started else None)


__all__ = ["Erasures", "OracleWalk", "RebuildWalk", "UnlearningFailed", "check_finite"]
