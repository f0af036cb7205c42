"""federaser: FedEraser's calibrated unlearning (Liu et al., IWQoS 2021), in a task stream.

Research notes §9.1. During the run the server stores, every ``interval`` rounds (and in every
task's last round), the global model the round started from and every participating client's
returned model, on disk under ``<output>/federaser/`` (``storage_mb`` in the request's entry).
To forget, it walks the stored rounds in order from the initial model:

* the first stored round (round 1, whose start carries no information about anyone) becomes
  the weighted average of the stored models of the clients that remain (a class erasure
  calibrates this round too: every stored model saw the class);
* every later stored round ``t``: the round's remaining clients train from the new global model
  ``newGM_t`` for ``ceil(epoch_ratio * local_epochs)`` epochs on their data of that round's task
  (erased classes left out), through the run's own strategy (so FOT projects and, in a task's
  last round, sketches: its basis is rebuilt on the way); with ``oldU`` the stored update
  (weighted mean of the remaining clients' stored models less ``GM_t``) and ``newU`` the
  calibration update, ``newGM_{t+1} = newGM_t + ||oldU|| newU / ||newU||`` per tensor
  (:func:`fedcl.unlearning.federaser_calibrate`).

The strategy that walked the stored rounds is the one the run goes on with. Deviations: the
paper has every client in every round; here each stored round has the clients sampled in it.
Client weights follow the run's strategy (sample counts, or FOT's uniform weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message

from fedcl import protocol
from fedcl.errors import ConfigError
from fedcl.unlearning import federaser_calibrate, weighted_mean
from strategies.unlearning import UnlearningJob, UnlearningMethod, register

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


class FedEraser(UnlearningMethod):
    def __init__(self, params: FedEraserParams, out_dir: Any) -> None:
        super().__init__(params, out_dir)
        self.store = Path(out_dir or "outputs") / STORE_DIR

    def observe_round(self, info: Any, arrays_before: ArrayRecord, replies: list[Message],
                      erased: Any) -> None:
        if (info.round - 1) % self.params.interval and not info.last_of_task:
            return
        self.store.mkdir(parents=True, exist_ok=True)
        clients = {}
        for msg in replies:
            pid = int(msg.content[protocol.CLIENT_INFO][protocol.PARTITION_ID])
            metrics = msg.content[protocol.METRICS]
            clients[pid] = {"state": msg.content[protocol.ARRAYS].to_torch_state_dict(),
                            protocol.NUM_EXAMPLES: float(metrics[protocol.NUM_EXAMPLES]),
                            protocol.UNIT_WEIGHT: float(metrics[protocol.UNIT_WEIGHT])}
        path = self.store / f"round_{info.round:06d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"round": info.round, "task": info.task, "task_round": info.task_round,
                    "global": arrays_before.to_torch_state_dict(), "clients": clients}, tmp)
        tmp.replace(path)

    def stored_rounds(self, upto: int) -> list[Path]:
        files = sorted(self.store.glob("round_*.pt")) if self.store.is_dir() else []
        return [f for f in files if int(f.stem.split("_")[1]) <= upto]

    def unlearn(self, job: UnlearningJob) -> tuple[ArrayRecord, Any]:
        from fedcl.server_app import RoundInfo, train_round
        from strategies import registry

        config, req = job.config, job.request
        strategy = registry.build(config)
        weight_key = getattr(strategy, "weighted_by_key", protocol.NUM_EXAMPLES)
        calib_epochs = max(1, math.ceil(self.params.epoch_ratio * config.local_epochs))
        calib_json = replace(config, local_epochs=calib_epochs).to_json()
        rounds = config.rounds_per_task
        files = self.stored_rounds(job.progress.global_round)
        self.storage_bytes = sum(f.stat().st_size for f in self.stored_rounds(10**9))
        if not files:
            raise ValueError(f"no stored updates under {self.store}")
        new_gm: ArrayRecord | None = None
        task = -1
        self.calibrated = 0
        for f in files:
            stored = torch.load(f, weights_only=False)
            if stored["task"] != task:
                if new_gm is None:
                    new_gm = ArrayRecord(stored["global"])
                task = stored["task"]
                new_gm = strategy.begin_task(task, new_gm)
            remaining = {pid: c for pid, c in stored["clients"].items()
                         if pid not in job.after.clients}
            if not remaining:
                continue
            info = RoundInfo(task, stored["task_round"], rounds, stored["round"])
            old_states = [(c[weight_key], c["state"]) for c in remaining.values()]
            if sum(w for w, _ in old_states) == 0:
                continue
            if stored["round"] == 1 and req.kind == "client" and not info.last_of_task:
                mean = weighted_mean(old_states)
                new_gm = ArrayRecord({k: mean[k].to(v.dtype) for k, v in
                                      new_gm.to_torch_state_dict().items()})  # type: ignore[union-attr]
                continue
            start = new_gm.to_torch_state_dict()  # type: ignore[union-attr]
            outcome = train_round(job.grid, job.roster, strategy, config, calib_json, new_gm,  # type: ignore[arg-type]
                                  info, sorted(remaining), job.cancel, replay=True,
                                  erased=job.after)
            calibrated = outcome.arrays.to_torch_state_dict()
            old_mean = weighted_mean(old_states)
            gm_t = stored["global"]
            float_keys = [k for k, v in start.items() if v.is_floating_point()]
            old_u = {k: old_mean[k] - gm_t[k].double() for k in float_keys}
            new_u = {k: calibrated[k].double() - start[k].double() for k in float_keys}
            stepped = federaser_calibrate({k: start[k] for k in float_keys}, old_u, new_u)
            new_gm = ArrayRecord({**calibrated, **stepped})
            self.calibrated += 1
            if info.last_of_task:
                new_gm = strategy.end_task(task, new_gm)
        p = job.progress
        if p.task_started and p.task > task:  # the current task began, none of its rounds
            new_gm = strategy.begin_task(p.task, new_gm)  # type: ignore[arg-type]
        return new_gm, strategy  # type: ignore[return-value]

    def report(self) -> dict[str, Any]:
        if not hasattr(self, "storage_bytes"):
            return {}
        return {"storage_mb": self.storage_bytes / 2**20, "calibrated_rounds": self.calibrated}


@register("federaser", "FedEraser: stored client updates, calibrated by short retraining of "
          "the remaining clients (Liu et al. 2021).", params=FedEraserParams)
def build_federaser(params: FedEraserParams, out_dir: Any) -> FedEraser:
    return FedEraser(params, out_dir)
