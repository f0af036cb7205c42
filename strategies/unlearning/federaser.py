"""federaser: FedEraser's calibrated unlearning (Liu et al., IWQoS 2021), in a task stream.

During the run the server stores (:class:`UpdateRecorder`, a wrapper
around the run's strategy), every ``interval`` rounds (and in every
task's last round), the global model the round started from and every participating client's
returned model, on disk under ``<output>/federaser/`` (``storage_mb`` in the request's entry).
To forget, it walks the stored rounds in order from the initial model:

* the first stored round (round 1, whose start carries no information about anyone) becomes
  the weighted average of the stored models of the clients that remain (a class erasure
  calibrates this round too: every stored model saw the class; so does a client erasure
  after a class erasure, whose stored round-1 models saw the erased class and would bring it
  back);
* every later stored round ``t``: the round's remaining clients train from the new global model
  ``newGM_t`` for ``ceil(epoch_ratio * local_epochs)`` epochs on their data of that round's task
  (erased classes left out), through the run's own strategy (so FOT projects and, in a task's
  last round, sketches: its basis is rebuilt on the way); with ``oldU`` the stored update
  (weighted mean of the remaining clients' stored models less ``GM_t``) and ``newU`` the
  calibration update, ``newGM_{t+1} = newGM_t + ||oldU|| newU / ||newU||`` per tensor
  (:func:`fedcl.unlearning_math.federaser_calibrate`).

**The paper's current global model, not the code's next one.** fedcl measures the stored update
of round ``t`` from ``GM_t``, the global model round ``t`` started from, as the paper writes it
(``oldU = mean_k CM_t,k - GM_t``), and the calibration clients train from ``newGM_t``. The
authors' public code calibrates with the next global model (``GM_{t+1}``) instead. The two
differ in the stored update's length, which sets the calibrated step: fedcl follows the paper
(``tests/test_federaser_calibration.py`` pins it on a hand-made round).

The walk over the stored rounds is a walk of the task-stream driver (:class:`CalibrationWalk`):
``begin_task`` before a task's first stored round, ``end_task`` after its last round. The
strategy that walked the stored rounds is the one the run goes on with. Deviations: the paper
has every client in every round; here each stored round has the clients sampled in it. Client
weights follow the run's strategy (sample counts, or FOT's uniform weights). A stored round
left without clients by the request is skipped (the model passes through unchanged).

**Only what a request can still use is kept.** The requests are known before the run (the
config's erasure schedule, :meth:`FedEraser.check_requests`), and a request walks the stored
rounds before it. So a round at or after the last request's point is not stored at all; once
the checkpoint on disk holds a client erasure as carried out, that client's stored models go
(every later request leaves the client out); and once it holds the last request, the whole
store goes (:meth:`FedEraser.prune`, before a checkpoint, so that a resume never needs what
was deleted; the end of the run prunes the rest). summary.json's ``unlearning_storage``
counts the bytes stored and pruned (:class:`StoreUse`); each request's entry has the store's
size when it ran (``storage_bytes``, ``storage_mb``).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedcl import plugins, protocol
from fedcl.config import Config
from fedcl.data.scenarios import Scenario
from fedcl.erasure import ErasureRequest
from fedcl.errors import ConfigError
from fedcl.plugins import register_unlearning
from fedcl.rounds import train_round
from fedcl.strategy import ContinualStrategy, RoundInfo, StrategyWrapper
from fedcl.stream import TaskStreamDriver
from fedcl.unlearning_api import UnlearningJob, UnlearningMethod
from fedcl.unlearning_math import federaser_calibrate, weighted_mean

STORE_DIR = "federaser"


@dataclass(frozen=True)
class FedEraserParams:
    interval: int = 1
    """Store the clients' updates every this many rounds (N_itv; the code's default 1)."""
    epoch_ratio: float = 0.5
    """Calibration epochs as a share of local_epochs (rounded up; the code's 0.5)."""

    def check(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"federaser interval must be >= 1, got {self.interval}")
        if not 0 < self.epoch_ratio <= 1:
            raise ConfigError(f"federaser epoch_ratio must be in (0, 1], got {self.epoch_ratio}")


@dataclass
class StoreUse:
    """FedEraser's disk use over a run (summary.json's ``unlearning_storage``)."""

    bytes_stored: int = 0  # written over the run (a round written again counts once)
    bytes_pruned: int = 0  # deleted once no request still to come could use them
    rounds_stored: int = 0
    rounds_not_stored: int = 0  # due for storing, but after the last request's point
    bytes_kept: int = 0  # on disk at the end of the run


class UpdateRecorder(StrategyWrapper):
    """The run's strategy, recording each stored round's clients' models as it aggregates
    them (every ``interval`` rounds and every task's last round, before ``last_point``, the
    last request's (task, round) point): the global model the round started from and each
    reply's arrays, sample count and unit weight, to ``<store>/round_<round>.pt``. Every
    client's own reply is needed, so cohorts do not average their members
    (``cohort_mean_key`` is None)."""

    def __init__(self, inner: ContinualStrategy, store: Path, interval: int,
                 last_point: tuple[int, int] | None = None, use: StoreUse | None = None
                 ) -> None:
        super().__init__(inner)
        self.store, self.interval, self.last_point = store, interval, last_point
        self.use = use if use is not None else StoreUse()
        self._round: tuple[RoundInfo, ArrayRecord] | None = None

    def cohort_mean_key(self, info: RoundInfo) -> str | None:
        return None

    def configure_round(self, info: RoundInfo, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self._round = (info, arrays)
        return self.inner.configure_round(info, arrays, config, grid)

    def take_payloads(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)  # a round whose clients all hold no samples ends here
        self._record(replies)
        return self.inner.take_payloads(replies)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, Any]:
        replies = list(replies)
        self._record(replies)
        return self.inner.aggregate_train(server_round, replies)

    def _record(self, replies: list[Message]) -> None:
        if self._round is None:
            return
        info, arrays_before = self._round
        self._round = None
        if (info.round - 1) % self.interval and not info.last_of_task:
            return
        if self.last_point is not None and (info.task, info.task_round) >= self.last_point:
            self.use.rounds_not_stored += 1  # no request comes after it: none can use it
            return
        self.store.mkdir(parents=True, exist_ok=True)
        clients = {}
        for msg in replies:
            metrics = msg.content[protocol.METRICS]
            clients[protocol.reply_partition_id(msg)] = {
                "state": msg.content[protocol.ARRAYS].to_torch_state_dict(),
                protocol.NUM_EXAMPLES: float(metrics[protocol.NUM_EXAMPLES]),
                protocol.UNIT_WEIGHT: float(metrics[protocol.UNIT_WEIGHT])}
        path = self.store / f"round_{info.round:06d}.pt"
        before = path.stat().st_size if path.exists() else 0  # written again after a resume
        tmp = path.with_suffix(".tmp")
        torch.save({"round": info.round, "task": info.task, "task_round": info.task_round,
                    "global": arrays_before.to_torch_state_dict(), "clients": clients}, tmp)
        tmp.replace(path)
        self.use.bytes_stored += path.stat().st_size - before
        self.use.rounds_stored += 0 if before else 1


class CalibrationWalk(TaskStreamDriver):
    """FedEraser's walk over the stored rounds (the task-stream driver calls the strategy's
    task hooks, so FOT's basis grows again on the way)."""

    def __init__(self, strategy: ContinualStrategy, arrays: ArrayRecord, job: UnlearningJob,
                 stored: dict[int, Path], calib_json: str) -> None:
        super().__init__(strategy, arrays)
        self.job, self.stored, self.calib_json = job, stored, calib_json
        self.weight_key = getattr(strategy, "weighted_by_key", protocol.NUM_EXAMPLES)
        self.calibrated = 0

    def run_round(self, info: RoundInfo) -> None:
        job = self.job
        stored = torch.load(self.stored[info.round], weights_only=False)
        remaining = {pid: c for pid, c in stored["clients"].items()
                     if pid not in job.after.clients}
        old_states = [(c[self.weight_key], c["state"]) for c in remaining.values()]
        if not remaining or sum(w for w, _ in old_states) == 0:
            return  # nobody left who trained in this round: nothing to calibrate
        # the round-1 shortcut holds only while no class erasure is in force: the stored models
        # of round 1 trained on every class, and averaging them would bring an erased class back
        if (info.round == 1 and job.request.kind == "client" and not job.after.classes
                and not info.last_of_task):
            mean = weighted_mean(old_states)
            self.arrays = ArrayRecord({k: mean[k].to(v.dtype) for k, v in
                                       self.arrays.to_torch_state_dict().items()})
            return
        start = self.arrays.to_torch_state_dict()
        outcome = train_round(job.grid, job.roster, self.strategy, job.config, self.calib_json,
                              self.arrays, info, sorted(remaining), job.cancel, replay=True,
                              erased=job.after, walk=self.walk_id)
        calibrated = outcome.arrays.to_torch_state_dict()
        old_mean = weighted_mean(old_states)
        gm_t = stored["global"]
        float_keys = [k for k, v in start.items() if v.is_floating_point()]
        old_u = {k: old_mean[k] - gm_t[k].double() for k in float_keys}
        new_u = {k: calibrated[k].double() - start[k].double() for k in float_keys}
        stepped = federaser_calibrate({k: start[k] for k in float_keys}, old_u, new_u)
        self.arrays = ArrayRecord({**calibrated, **stepped})
        self.calibrated += 1


class FedEraser(UnlearningMethod):
    def __init__(self, params: FedEraserParams, out_dir: Any) -> None:
        super().__init__(params, out_dir)
        self.store = Path(out_dir or "outputs") / STORE_DIR
        self.requests: list[ErasureRequest] | None = None  # the schedule, once known
        self.rounds_per_task = 0
        self.use = StoreUse()
        self.pruned_for = 0  # requests whose storage has been pruned

    def check_requests(self, config: Config, scenario: Scenario,
                       requests: list[ErasureRequest]) -> list[str]:
        """Keeps the schedule: which rounds a request can use, and when none can."""
        self.requests, self.rounds_per_task = list(requests), config.rounds_per_task
        return []

    def last_point(self) -> tuple[int, int] | None:
        """The last request's (task, round) point; rounds from there on are not stored."""
        if self.requests is None:
            return None  # schedule unknown: store every round
        if not self.requests:
            return (0, 0)  # no request: no round is stored
        return max(r.point(self.rounds_per_task) for r in self.requests)

    def wrap(self, strategy: ContinualStrategy) -> ContinualStrategy:
        return UpdateRecorder(strategy, self.store, self.params.interval, self.last_point(),
                              self.use)

    def prune(self, requests_done: int) -> None:
        """Delete what no request after the first ``requests_done`` can use: every stored
        model of a client erased by them, and the whole store after the last request."""
        if self.requests is None or requests_done <= self.pruned_for:
            return
        files = self.stored_rounds(10**9)
        if requests_done >= len(self.requests):
            self.use.bytes_pruned += sum(f.stat().st_size for f in files)
            shutil.rmtree(self.store, ignore_errors=True)
        else:
            gone = {r.client for r in self.requests[:requests_done] if r.kind == "client"}
            for path in files if gone else []:
                stored = torch.load(path, weights_only=False)
                if not gone & set(stored["clients"]):
                    continue
                before = path.stat().st_size
                stored["clients"] = {pid: c for pid, c in stored["clients"].items()
                                     if pid not in gone}
                tmp = path.with_suffix(".tmp")
                torch.save(stored, tmp)
                tmp.replace(path)
                self.use.bytes_pruned += before - path.stat().st_size
        self.pruned_for = requests_done

    def storage(self) -> dict[str, Any]:
        self.use.bytes_kept = sum(f.stat().st_size for f in self.stored_rounds(10**9))
        return asdict(self.use)

    def state_dict(self) -> dict[str, Any]:
        return {"use": asdict(self.use), "pruned_for": self.pruned_for}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "use" in state:  # in place: the recorder wrapping the run's strategy counts too
            for key, value in state["use"].items():
                setattr(self.use, key, value)
            self.pruned_for = int(state["pruned_for"])

    def stored_rounds(self, upto: int) -> list[Path]:
        files = sorted(self.store.glob("round_*.pt")) if self.store.is_dir() else []
        return [f for f in files if int(f.stem.split("_")[1]) <= upto]

    def unlearn(self, job: UnlearningJob) -> tuple[ArrayRecord, ContinualStrategy]:
        config = job.config
        strategy = plugins.build_strategy(config)
        calib_epochs = max(1, math.ceil(self.params.epoch_ratio * config.local_epochs))
        calib_json = replace(config, local_epochs=calib_epochs).to_json()
        rounds = config.rounds_per_task
        files = self.stored_rounds(job.progress.global_round)
        self.storage_bytes = sum(f.stat().st_size for f in self.stored_rounds(10**9))
        if not files:
            raise ValueError(f"no stored updates under {self.store}")
        stored = {int(f.stem.split("_")[1]): f for f in files}
        # every task has rounds_per_task rounds: a round's number says where it stands
        plan = [RoundInfo((r - 1) // rounds, (r - 1) % rounds + 1, rounds, r) for r in stored]
        first = torch.load(files[0], weights_only=False)["global"]
        walk = CalibrationWalk(strategy, ArrayRecord(first), job, stored, calib_json)
        p = job.progress
        arrays = walk.walk(plan, then_open=p.task if p.task_started else None)
        self.calibrated = walk.calibrated
        return arrays, strategy

    def report(self) -> dict[str, Any]:
        if not hasattr(self, "storage_bytes"):
            return {}
        return {"storage_bytes": self.storage_bytes, "storage_mb": self.storage_bytes / 2**20,
                "calibrated_rounds": self.calibrated}


@register_unlearning("federaser", "FedEraser: stored client updates, calibrated by short "
                     "retraining of the remaining clients (Liu et al. 2021).",
                     params=FedEraserParams)
def build_federaser(params: FedEraserParams, out_dir: Any) -> FedEraser:
    return FedEraser(params, out_dir)
