"""What a run produces: per-round records, the summary, and the files in the output folder.

``summary.json`` keys (a stable format; fractions are in [0, 1], missing values are null):

=====================  ====================================================================
``strategy``           the strategy's registered name
``scenario``           class-il, task-il or domain-il
``dataset``            dataset name
``num_clients``        clients in the federation
``num_tasks``          tasks in the stream
``accuracy_matrix``    T x T list; row i = after training task i, column j = test accuracy
                       on task j (every cell filled, unseen tasks included), on the classes
                       not erased everywhere (``erasure_view``)
``random_init_accuracy``  accuracy of the initial (untrained) model on each task, FWT's baseline
``acc``                mean of the last row (ACC)
``forgetting``         mean over old tasks of the best accuracy at or after its own training
                       (before the last row) minus final (Chaudhry; no row from before the
                       task was trained)
``forgetting_at_task_end``  mean over old tasks of accuracy right after its own training minus
                       final (the FOT paper's FGT)
``bwt``                backward transfer: mean over old tasks of final minus right-after-training
``fwt``                forward transfer: mean over j>=1 of R[j-1, j] minus random-init accuracy
``learning_accuracy``  mean over tasks of the accuracy right after its own training, R[j, j]
                       (plasticity; Riemer et al. 2019)
``intransigence``      mean over tasks of A*_k minus R[k, k], A* the config's
                       ``intransigence_reference`` (a model trained jointly on tasks 0..k;
                       Chaudhry et al. 2018); null without one: fedcl does not train it
``intransigence_per_task``  the same per task; null without a reference
``rounds``             one entry per federated round: ``task`` (0-based), ``round`` (1-based,
                       over the run), ``task_round`` (1-based within the task),
                       ``acc_per_task`` (test accuracy on every task after the round),
                       ``avg_acc`` (mean over seen tasks), ``min_acc`` (mean over old tasks of the
                       lowest accuracy since their training ended; null on the first task),
                       ``wc_acc`` (worst-case accuracy, De Lange et al. 2023), ``train_loss``
                       (mean client loss), ``clients`` (replies aggregated), ``failures``
                       (sampled clients that failed, did not answer or were rejected),
                       ``rejected`` (replies refused by ``fedcl.validation``), ``empty``
                       (sampled clients with no sample of the task left after erasures: they
                       send no update and are not failures), ``seconds``
                       (since the previous round ended: its training, evaluation, MLflow
                       logging, task end, the erasure requests due before or right after
                       it and its checkpoint; the rounds' seconds add up to
                       ``time_rounds_s``), ``ended_at`` (Unix time, when it was
                       evaluated), ``client_gpu_peak_mb`` and
                       ``client_gpu_reserved_mb`` (GPU clients: the largest CUDA memory peak
                       of the round's training, and the largest CUDA memory an allocator held
                       after it, over the replies; null on CPU), ``client_compute_s`` (the
                       longest a client's train handler ran: the rest of the ``clients``
                       phase is messaging and scheduling), ``client_nodes`` (replies per
                       worker node: Ray node id in a simulation, host name in a deployment),
                       ``phases`` (seconds of the
                       round in each phase: ``clients`` (sampling, sending, local training,
                       replies), ``screen``, ``aggregate``, ``evaluate``, ``log`` (MLflow and
                       the display), ``end_task`` (in a task's last round), ``checkpoint``; they
                       add up to ``seconds``), ``connected`` (clients connected when the
                       round began: the round samples from these; MLflow metric
                       ``clients_connected``), ``lost`` and ``back`` (partition ids whose node
                       left, or came back, since the previous round: a deployment's SuperNodes),
                       ``sampled`` (the partition ids sampled for the round),
                       ``bytes_down`` and ``bytes_up`` (bytes the round's messages carried to
                       and from all its clients; ``bytes_by_record``: the same by record name:
                       :mod:`fedcl.communication`), ``client_gpus`` (GPU clients: per GPU, as
                       ``<worker node>/gpu<physical index>``, the largest CUDA memory peak of
                       the round's training there in MiB and how many replies trained there),
                       ``tracking_wait_s`` (seconds the run spent in MLflow logging calls
                       since the previous round was recorded, that round's logging
                       included: a background thread sends, so this stays near zero even
                       when the server is slow, frozen or gone) and ``tracking_queued``
                       (MLflow operations not sent yet; above zero during an outage)
``erasures``           one entry per erasure request (``fedcl.erasure``): ``request``,
                       ``method``, ``round`` (the last round before it), ``forget_acc``,
                       ``retain_acc``, ``test_acc``, ``mia``, ``seconds``, ``oracle`` (the
                       same for the retrained model), ``distance_to_oracle`` (``weights``,
                       ``cka_forget``, ``cka_retain``), ``test_split`` (what the request
                       changes in the test split: a class erased everywhere leaves it; a
                       client's data cannot be separated from it), ``forget_curve``
                       (``round``, ``acc``: the forget set's accuracy right after unlearning,
                       then after every later round; MLflow ``erasure_<i>_forget_curve``),
                       ``tasks_seen``; where clients keep stores,
                       ``purged_samples`` (buffered samples the request removed from them)
``unlearning_storage``  for an unlearning method that keeps storage (FedEraser), what it kept
                       on disk: ``bytes_stored`` (written over the run), ``bytes_pruned``
                       (deleted once no request still to come could use them),
                       ``bytes_kept`` (left at the end: none once every request ran),
                       ``rounds_stored``, ``rounds_not_stored`` (due for storing after the
                       last request, which nothing could use)
``communication``      the run's traffic (:func:`fedcl.communication.communication_summary`):
                       ``bytes_down`` and ``bytes_up`` (totals), ``per_round`` and
                       ``per_client_round`` (means), ``by_record`` (totals by record name),
                       ``tasks`` (per task: bytes down and up, and ``payload_bytes_up``, the
                       strategy's own payload records: FOT's task-end sketches, FedWeIT's
                       sparse base), ``counted`` (what is counted)
``erasure_view``       what the accuracy matrix and the end metrics are measured on after
                       erasures: ``excluded_classes`` (erased everywhere: left out of every
                       row, so the requested forgetting is not counted as catastrophic
                       forgetting), ``fully_erased_tasks`` (every class erased: scored on
                       the full test set) and, when a class was left out,
                       ``accuracy_matrix_all_classes`` (every class, as measured); the
                       rounds' ``acc_per_task`` leave a class out from its request on
``strategy_state``     the strategy's state after each task (e.g. FOT's basis dimension per
                       layer), one entry per task with ``task``; empty for the baselines
``client_state``       per client (partition id), what it keeps in Flower's ``Context.state``
                       after its last round (or the purge of its store after an erasure):
                       ``keys`` (record names) and ``bytes``; for a strategy whose clients keep
                       a store (``LocalTrainer.keeps_client_store``), also ``buffer_samples``
                       (raw samples in its replay buffers), ``buffer_bytes`` (the bytes they
                       take) and ``buffer_classes`` (their dataset classes, sorted)
``resumes``            one entry per ``--resume`` of the run: ``after_round`` (the last round
                       the checkpoint held) and ``client_stores_lost`` (true for a method
                       whose clients keep stores, e.g. replay buffers: they start empty, so
                       the rest of the run differs from an uninterrupted one); empty for a
                       run that was never stopped
``time_startup_s``     seconds from the run's start (``fedcl simulate``: its process's start;
                       ``flwr run``: the ServerApp's) to the first round's start
``time_rounds_s``      seconds of the rounds (erasure requests between them included): the
                       sum of ``rounds[].seconds``
``time_shutdown_s``    seconds from the last round's end until the results were final (output
                       files; ``fedcl simulate``: Ray's shutdown too)
``wall_time_s``        the run's whole time: the sum of the three (:mod:`fedcl.run_clock`; the
                       MLflow run's duration); a resumed run's sessions add up
``mlflow_run_id``      the MLflow run holding the same numbers
``mlflow_tracking_uri``  where that run is stored
``config``             the full run config
=====================  ====================================================================
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcl import metrics, protocol
from fedcl.config import reference_accuracies
from fedcl.plots import save_figures
from fedcl.run_clock import TIME_KEYS

#: The summary's file in the output folder.
SUMMARY_FILE = "summary.json"


@dataclass
class RoundRecord:
    task: int
    round: int
    task_round: int
    acc_per_task: list[float]
    avg_acc: float
    min_acc: float | None
    wc_acc: float
    train_loss: float | None
    clients: int
    failures: int
    seconds: float
    rejected: int = 0
    ended_at: float = 0.0
    client_gpu_peak_mb: float | None = None
    client_gpu_reserved_mb: float | None = None
    client_compute_s: float | None = None
    client_nodes: dict[str, int] = field(default_factory=dict)  # replies per worker node
    client_gpus: dict[str, dict[str, float]] = field(default_factory=dict)  # peak MiB per GPU
    phases: dict[str, float] = field(default_factory=dict)
    connected: int | None = None  # clients connected at the round's start
    lost: list[int] = field(default_factory=list)  # partition ids gone since the last round
    back: list[int] = field(default_factory=list)  # partition ids reconnected since then
    sampled: list[int] = field(default_factory=list)  # partition ids sampled for the round
    replies: int | None = None  # train replies aggregated (a cohort's mean counts once)
    empty: int = 0  # sampled clients with no sample left to train on (erased): not failures
    tracking_wait_s: float = 0.0  # seconds the run spent in MLflow logging calls (see above)
    tracking_queued: int = 0  # MLflow operations not sent yet when the round was recorded
    bytes_down: int = 0  # bytes the round's messages carried to its clients (fedcl.communication)
    bytes_up: int = 0  # and from them
    bytes_by_record: dict[str, dict[str, int]] = field(default_factory=dict)  # down/up by record

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def client_state_entry(info: Any) -> dict[str, Any]:
    """A client's ``client_state`` entry in summary.json from its info record
    (``protocol.CLIENT_INFO``): the records it keeps in ``Context.state`` and their bytes,
    and what its buffers hold where it reports them."""
    entry: dict[str, Any] = {
        "keys": [k for k in str(info.get(protocol.STATE_KEYS, "")).split(",") if k],
        "bytes": int(info.get(protocol.STATE_BYTES, 0))}
    if protocol.BUFFER_SAMPLES in info:
        entry["buffer_samples"] = int(info[protocol.BUFFER_SAMPLES])
        entry["buffer_bytes"] = int(info[protocol.BUFFER_BYTES])
        entry["buffer_classes"] = [int(k) for k in info[protocol.BUFFER_CLASSES]]
    return entry


def stability_metrics(curves: list[list[float]], round_task: list[int]
                      ) -> tuple[float | None, float]:
    """min-ACC and WC-ACC of the latest round, from all rounds so far."""
    min_acc = metrics.min_acc_per_round(np.array(curves), np.array(round_task))[-1]
    wc_acc = metrics.wc_acc_per_round(np.array(curves), np.array(round_task))[-1]
    return min_acc, wc_acc


def build_summary(*, strategy: str, config: dict[str, Any], matrix: list[list[float]],
                  baseline: list[float], rounds: list[RoundRecord], times: dict[str, float],
                  mlflow_run_id: str | None, tracking_uri: str | None) -> dict[str, Any]:
    """The summary (the module's docstring lists its keys); ``times``: the run's time
    figures (:data:`fedcl.run_clock.TIME_KEYS`)."""
    reference = reference_accuracies(config.get("intransigence_reference") or "")
    if reference is not None:
        reference = reference[:len(matrix)]  # a run stopped early has fewer rows
    scores = metrics.summarize(np.array(matrix), np.array(baseline), reference)
    return {
        "strategy": strategy,
        "scenario": config["scenario"],
        "dataset": config["dataset"],
        "num_clients": config["clients"],
        "num_tasks": len(matrix),
        "accuracy_matrix": matrix,
        "random_init_accuracy": baseline,
        **scores,
        "intransigence_per_task": (None if reference is None
                                   else metrics.intransigence_per_task(matrix, reference)),
        "rounds": [r.to_dict() for r in rounds],
        **{key: times[key] for key in TIME_KEYS},
        "mlflow_run_id": mlflow_run_id,
        "mlflow_tracking_uri": tracking_uri,
        "config": config,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_times(out_dir: Path, summary: dict[str, Any]) -> None:
    """Put ``summary``'s time figures (:data:`~fedcl.run_clock.TIME_KEYS`) into the
    summary.json already written in ``out_dir``, leaving the rest of the file as it is."""
    path = out_dir / SUMMARY_FILE
    written = json.loads(path.read_text(encoding="utf-8"))
    written.update({key: summary[key] for key in TIME_KEYS})
    write_atomic(path, json.dumps(_json_safe(written), indent=2) + "\n")


def write_outputs(summary: dict[str, Any], out_dir: Path, config_toml: str) -> list[Path]:
    """summary.json, config.toml, accuracy_matrix.csv and the two plots; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    path = out_dir / "config.toml"
    write_atomic(path, config_toml)
    files.append(path)
    path = out_dir / "accuracy_matrix.csv"
    matrix = summary["accuracy_matrix"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["after_task"] + [f"task_{j}" for j in range(len(matrix))])
        for i, row in enumerate(matrix):
            writer.writerow([i] + [f"{v:.6f}" for v in row])
    os.replace(tmp, path)
    files.append(path)
    files += plot_outputs(summary, out_dir)
    path = out_dir / SUMMARY_FILE
    write_atomic(path, json.dumps(_json_safe(summary), indent=2) + "\n")
    files.append(path)
    return files


def plot_outputs(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """The accuracy matrix as a heatmap and each task's accuracy over rounds, as PNG
    (:mod:`fedcl.plots`)."""
    return save_figures(summary, out_dir)
