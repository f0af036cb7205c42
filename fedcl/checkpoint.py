"""Checkpoints: a run's whole state at a round boundary, written atomically, and resume.

After every round (and after a task's end-of-task work) the server writes
``<output>/checkpoint.pt``: the global model, the strategy's state (FOT's basis, PRD's frozen
model, ...), the position in the task stream, every record so far, the RNG states, the MLflow run
id and the config. It is written to a temporary file and renamed, so a kill at any moment leaves
either the previous checkpoint or the new one. ``fedcl simulate --resume DIR`` continues the run
from ``DIR/checkpoint.pt`` in the same MLflow run. Client sampling, local training and sketches
are seeded per (seed, task, round, client), so a resumed run computes what the uninterrupted
one would have.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedcl.config import Config, config_from_dict
from fedcl.errors import ConfigError, FedclError
from fedcl.processes import ray_session_dir
from fedcl.results import RoundRecord
from fedcl.strategy import strategy_label

if TYPE_CHECKING:
    from fedcl.strategy import ContinualStrategy

FILE = "checkpoint.pt"
VERSION = 1


@dataclass
class RunState:
    """Everything a run has done so far: what a checkpoint holds, and where it resumes."""

    arrays: ArrayRecord
    baseline: list[float]
    task: int = 0  # the next round to run: its task ...
    task_round: int = 1  # ... and its round within the task
    task_started: bool = False  # whether begin_task already ran for ``task``
    global_round: int = 0
    matrix: list[list[float]] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)
    round_task: list[int] = field(default_factory=list)
    strategy_state: list[dict[str, float]] = field(default_factory=list)
    client_state: dict[int, dict[str, Any]] = field(default_factory=dict)
    erased_clients: list[int] = field(default_factory=list)  # left the federation on request
    # classes erased everywhere ([-1, class]) or on one client ([client, class])
    erased_classes: list[list[int]] = field(default_factory=list)
    erasures_done: int = 0  # requests of the schedule carried out so far
    erasures: list[dict[str, Any]] = field(default_factory=list)  # summary.json's `erasures`
    wall_time_before_s: float = 0.0  # wall time of the sessions before this one ...
    startup_before_s: float = 0.0  # ... of which start-up (fedcl.run_clock); the rest, rounds
    # per matrix row (and for the initial model), each task's {class: [correct, total]}: the
    # end metrics are taken on the classes not erased (fedcl.evaluation)
    matrix_counts: list[list[dict[int, list[int]]]] = field(default_factory=list)
    baseline_counts: list[dict[int, list[int]]] = field(default_factory=list)
    # every resume: after which round, and whether the clients' stores started empty
    resumes: list[dict[str, Any]] = field(default_factory=list)


def save(path: Path, progress: RunState, strategy: ContinualStrategy, config: Config,
         run_id: str | None, wall_time_s: float, extra: dict[str, Any] | None = None,
         startup_s: float = 0.0) -> None:
    """Write the checkpoint atomically (temporary file, then rename); ``wall_time_s``: the
    run's time so far, ``startup_s`` of it start-up (:mod:`fedcl.run_clock`); ``extra``: more
    state by name (the unlearning method's)."""
    fields = {f.name: getattr(progress, f.name) for f in dataclasses.fields(progress)}
    fields["arrays"] = progress.arrays.to_torch_state_dict()
    fields["records"] = [r.to_dict() for r in progress.records]
    fields["wall_time_before_s"] = wall_time_s
    fields["startup_before_s"] = startup_s
    payload = {"version": VERSION, "config": config.to_dict(), "mlflow_run_id": run_id,
               "progress": fields, "strategy": strategy.state_dict(),
               "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
               "ray_session_dir": ray_session_dir(), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # nothing half-written is left
        if not isinstance(err, Exception) or isinstance(err, OSError):
            raise
        # fedcl's own part is tensors, numbers and strings: what fails is a strategy's or an
        # unlearning method's state_dict()
        text = str(err).strip().splitlines()
        raise FedclError(f"cannot write checkpoint {path}: {type(err).__name__}: "
                         f"{text[0] if text else ''} (the state_dict() of the "
                         f"{strategy_label(strategy)} and of the unlearning method must "
                         "hold only tensors, numbers, strings, lists and dicts)") from err
    os.replace(tmp, path)


def load(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint to resume the run in ``folder`` (a run's output folder) from
    (:func:`read`). Raises a one-line :class:`ConfigError` (bad input, exit 2) also for a
    folder whose run finished (its ``summary.json`` is written: nothing is left to run)."""
    path = Path(folder)
    where = path if path.is_dir() else path.parent
    if (where / "summary.json").is_file():
        raise ConfigError(f"the run in {where} finished (its summary.json is written): "
                          "nothing to resume; start a new run with another output folder")
    return read(folder)


def read(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint in ``folder`` (a run's output folder, or the file), checked for
    completeness. Raises a one-line :class:`ConfigError` for a folder without one (a run
    stopped before its first round ended saves none: it is started anew, with the same output),
    a file that cannot be read or is not a fedcl checkpoint."""
    path = Path(folder)
    path = path / FILE if path.is_dir() else path
    if not path.is_file():
        hint = ("; the run there stopped before its first round was saved: start it again "
                "with the same --output" if (path.parent / "flower.log").is_file() else "")
        raise ConfigError(f"no checkpoint to resume from: {path} does not exist{hint}")
    try:
        payload = torch.load(path, weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"cannot read checkpoint {path}: {type(err).__name__}") from None
    if not isinstance(payload, dict) or payload.get("version") != VERSION:
        raise ConfigError(f"{path} is not a fedcl checkpoint (version {VERSION})")
    return payload


def config_of(payload: dict[str, Any]) -> Config:
    return config_from_dict(payload["config"], source="the checkpoint").validate()


def restore(payload: dict[str, Any], strategy: ContinualStrategy) -> RunState:
    """The run's progress, with the strategy's state and the RNGs put back."""
    fields = dict(payload["progress"])
    fields["arrays"] = ArrayRecord(fields["arrays"])
    fields["records"] = [RoundRecord(**r) for r in fields["records"]]
    fields["client_state"] = {int(k): v for k, v in fields["client_state"].items()}
    strategy.load_state_dict(payload["strategy"])
    torch.set_rng_state(payload["torch_rng"])
    np.random.set_state(payload["numpy_rng"])
    return RunState(**fields)
