"""MLflow tracking: the only module of fedcl that imports mlflow.

One MLflow run per simulation. Params: the whole config (strategy parameters as
``strategy_params.<name>``). Metrics per round (step = round over the run): ``acc_task_<j>``,
``avg_acc``, ``min_acc``, ``wc_acc``, ``train_loss``, ``round_seconds``, ``clients``,
``failures``, ``rejected``, ``empty`` (and ``client_gpu_peak_mb``, ``client_gpu_reserved_mb``
with GPU clients). At the end: ``acc``, ``forgetting``, ``forgetting_at_task_end``,
``bwt``, ``fwt``, ``learning_accuracy``, ``intransigence`` (only with a reference),
``wall_time_s``. Artifacts: config.toml, summary.json, accuracy_matrix.csv,
accuracy_matrix.png and accuracy_per_round.png. Tags: ``fedcl.strategy``, ``fedcl.scenario``,
``fedcl.dataset``.

The client is used directly (no fluent API, no global active run), so the tracker is safe to use
from the ServerApp's thread.

**Outages.** Everything logged after the run starts goes through an outbox: operations are sent
in order, and when the tracking server cannot be reached they stay queued (and are written to
``<output>/mlflow_outbox.jsonl``, so that a kill during the outage loses nothing) while the run
goes on. Every later call retries (at most every ``retry_every_s``); at the end of the run the
tracker waits up to ``tracking_wait_s`` for the server, and whatever is still unsent stays in the
outbox file for ``fedcl sync``. A resumed run sends the outbox it finds first. Metrics keep their
original step and timestamp, so a late write is indistinguishable from a timely one. Errors the
server *answers* with (HTTP 4xx: a request MLflow refuses) are not outages: they fail the run.
Starting a run needs the server: a wrong URI is reported at once.

**Before the run.** :func:`check_store` checks, without creating anything, the files a local
store writes: the sqlite file or file store folder, and the artifacts folder of the run's
experiment (the one it was created with, else ``./mlruns``, MLflow's default for a local
database); and that the experiment is not deleted. :data:`MAX_RUN_NAME` and
:data:`MAX_EXPERIMENT_NAME` are MLflow's limits on names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from fedcl.errors import ConfigError, FedclError
from fedcl.paths import check_file, check_folder, quoted, shown
from fedcl.results import RoundRecord

FINAL_METRICS = ("acc", "forgetting", "forgetting_at_task_end", "bwt", "fwt",
                 "learning_accuracy", "intransigence", "wall_time_s")

#: Where a run keeps what it could not send yet (in its output folder).
OUTBOX_FILE = "mlflow_outbox.jsonl"

#: Seconds between attempts to reach an unreachable tracking server.
RETRY_EVERY_S = 5.0

# MLflow's own HTTP retries (7, with exponential back-off: minutes per call) would stall the
# task loop during an outage; fedcl queues instead, so one quick retry is enough. The user's
# own settings win.
# MLflow also prints a "View run at" link for server URIs on every run end; fedcl prints its own
# line about the run.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}

#: MLflow's limits: a run's name (its ``runs.name`` column) and an experiment's name.
MAX_RUN_NAME = 250
MAX_EXPERIMENT_NAME = 500

#: Where MLflow keeps the artifacts of a local database's new experiments (relative to the
#: working folder of the process that creates them).
DEFAULT_ARTIFACT_ROOT = "mlruns"

log = logging.getLogger(__name__)


def _client(tracking_uri: str) -> Any:
    # MLflow's sqlite store announces its table creation at INFO and trips a SQLAlchemy
    # deprecation notice of its own; neither is the user's business.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    # no mlflow.set_tracking_uri(): it also sets $MLFLOW_TRACKING_URI for every process
    # started afterwards, which would steer their runs into this store
    return MlflowClient(tracking_uri=tracking_uri)


def flatten_params(config: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            for sub, item in value.items():
                out[f"{key}.{sub}"] = str(item)
        else:
            out[key] = "" if value is None else str(value)
    return out


class Tracker:
    """Logs one fedcl run to MLflow, queueing what cannot be sent during an outage."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str,
                 outbox: Path | None = None, retry_every_s: float = RETRY_EVERY_S) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self.outbox = outbox
        self.retry_every_s = retry_every_s
        self._client: Any = None
        self._pending: list[dict[str, Any]] = []
        self._next_try = 0.0
        self._down_since: float | None = None

    @property
    def pending(self) -> int:
        """Operations not yet written to the tracking server."""
        return len(self._pending)

    def start(self, config: dict[str, Any]) -> str:
        from mlflow.entities import Param, RunTag

        try:
            client = _client(self.tracking_uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                exp_id = client.create_experiment(self.experiment)
            elif exp.lifecycle_stage == "deleted":
                raise FedclError(f"MLflow experiment '{self.experiment}' is deleted; "
                                 "restore it or choose another name")
            else:
                exp_id = exp.experiment_id
            tags = {"fedcl.strategy": config["strategy"], "fedcl.scenario": config["scenario"],
                    "fedcl.dataset": config["dataset"], "mlflow.runName": self.run_name}
            run = client.create_run(exp_id, run_name=self.run_name, tags=tags)
        except FedclError:
            raise
        except Exception as err:
            raise FedclError(f"cannot use MLflow tracking URI '{self.tracking_uri}': "
                             f"{_first_line(err)}") from None
        self._client = client
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flatten_params(config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(self.run_id, params=params[i:i + 100],
                             tags=[RunTag("fedcl.status", "running")] if i == 0 else [])
        return self.run_id

    def resume(self, run_id: str) -> str:
        """Continue logging into an existing run (``fedcl simulate --resume``), first sending
        what the killed run left in its outbox."""
        try:
            client = _client(self.tracking_uri)
            run = client.get_run(run_id)
        except Exception:
            raise FedclError(f"cannot resume: MLflow run {run_id} not found at "
                             f"{self.tracking_uri}") from None
        self._client, self.run_id = client, run.info.run_id
        if self.outbox is not None and self.outbox.exists():
            self._pending = read_outbox(self.outbox, run_id)[1]
        self._submit({"op": "status", "status": "RUNNING"})
        self._submit({"op": "tag", "key": "fedcl.status", "value": "running"})
        self._submit({"op": "tag", "key": "fedcl.resumed", "value": "true"})
        return run_id

    # --- what the task loop logs ----------------------------------------------------------
    def log_round(self, record: RoundRecord) -> None:
        values: dict[str, float | None] = {
            f"acc_task_{j}": a for j, a in enumerate(record.acc_per_task)}
        values.update(avg_acc=record.avg_acc, min_acc=record.min_acc, wc_acc=record.wc_acc,
                      train_loss=record.train_loss, round_seconds=record.seconds,
                      clients=record.clients, failures=record.failures,
                      rejected=record.rejected, empty=record.empty, task=record.task,
                      client_gpu_peak_mb=record.client_gpu_peak_mb,
                      client_gpu_reserved_mb=record.client_gpu_reserved_mb,
                      client_compute_s=record.client_compute_s,
                      clients_connected=record.connected)
        self.log_metrics(values, step=record.round)

    def log_metrics(self, values: dict[str, float | None], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [[k, float(v), now, step] for k, v in values.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self._submit({"op": "metrics", "metrics": batch})

    def finish(self, summary: dict[str, Any], files: Iterable[Path],
               wait_s: float = 0.0) -> int:
        """Final metrics, artifacts, FINISHED; waits up to ``wait_s`` for an unreachable
        server. Returns the number of operations left unsent (kept in the outbox file)."""
        self.log_metrics({k: summary.get(k) for k in FINAL_METRICS}, step=0)
        for path in files:
            self._pending.append({"op": "artifact", "path": str(Path(path).resolve())})
        self._pending.append({"op": "tag", "key": "fedcl.status", "value": "finished"})
        self._pending.append({"op": "status", "status": "FINISHED"})
        deadline = time.monotonic() + wait_s
        while not self._flush(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("MLflow at %s unreachable: %d operations kept in %s",
                            self.tracking_uri, self.pending, self.outbox)
                break
            time.sleep(min(self.retry_every_s, left))
        return self.pending

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """Mark the run FAILED (or KILLED), keeping everything logged so far."""
        if self.run_id is None or self._client is None:
            return
        self._pending.append({"op": "tag", "key": "fedcl.error", "value": reason[:5000]})
        self._pending.append({"op": "tag", "key": "fedcl.status", "value": status.lower()})
        self._pending.append({"op": "status", "status": status})
        try:
            self._flush(force=True)
        except Exception:
            pass

    # --- the outbox ---------------------------------------------------------------------------
    def _submit(self, op: dict[str, Any]) -> None:
        self._pending.append(op)
        self._flush()

    def _flush(self, force: bool = False) -> bool:
        """Send queued operations in order; False when the server could not be reached."""
        if not self._pending:
            return True
        now = time.monotonic()
        if not force and now < self._next_try:
            self._save_outbox()
            return False
        sent = 0
        while self._pending:
            try:
                apply_operation(self._client, self.run_id, self._pending[0])
            except Exception as err:
                if not is_outage(err):
                    raise FedclError(f"MLflow at {self.tracking_uri} refused "
                                     f"{self._pending[0]['op']}: {_first_line(err)}") from None
                if self._down_since is None:
                    self._down_since = now
                    if self.run_name:  # a run's tracker says so; `fedcl sync` does not
                        log.warning("MLflow at %s unreachable (%s); queueing",
                                    self.tracking_uri, _first_line(err))
                self._next_try = time.monotonic() + self.retry_every_s
                self._save_outbox()
                return False
            self._pending.pop(0)
            sent += 1
        if self._down_since is not None:
            log.warning("MLflow at %s back after %.0f s; %d queued operations sent",
                        self.tracking_uri, now - self._down_since, sent)
            self._down_since = None
        if self.outbox is not None:
            self.outbox.unlink(missing_ok=True)
        return True

    def _save_outbox(self) -> None:
        if self.outbox is not None:
            write_outbox(self.outbox, self.tracking_uri, str(self.run_id), self._pending)


def apply_operation(client: Any, run_id: str | None, op: dict[str, Any]) -> None:
    """Send one queued operation (``metrics``, ``tag``, ``artifact`` or ``status``)."""
    from mlflow.entities import Metric

    kind = op["op"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step)
                                          for k, v, ts, step in op["metrics"]])
    elif kind == "tag":
        client.set_tag(run_id, op["key"], op["value"])
    elif kind == "artifact":
        client.log_artifact(run_id, op["path"])
    elif kind == "status":
        if op["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, op["status"])
    else:
        raise FedclError(f"unknown MLflow outbox operation '{kind}'")


def is_outage(err: BaseException) -> bool:
    """Whether ``err`` means the server could not be reached (or failed inside, HTTP 5xx), as
    opposed to a request it answered and refused (HTTP 4xx)."""
    from mlflow.exceptions import RestException

    if isinstance(err, RestException):
        return err.get_http_status_code() >= 500
    return not isinstance(err, FedclError)


def write_outbox(path: Path, tracking_uri: str, run_id: str, ops: list[dict[str, Any]]) -> None:
    """Atomically write the queue: a header line, then one operation per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}) + "\n")
        for op in ops:
            fh.write(json.dumps(op) + "\n")
    os.replace(tmp, path)


def read_outbox(path: Path, run_id: str | None = None
                ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(header, operations) of an outbox file; FedclError when unreadable or not ``run_id``'s."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        ops = [json.loads(line) for line in lines[1:] if line.strip()]
        if not isinstance(header, dict) or "run_id" not in header or not all(
                isinstance(op, dict) and "op" in op for op in ops):
            raise ValueError("not an outbox")
    except FileNotFoundError:
        raise FedclError(f"no MLflow outbox at {path}: nothing to send") from None
    except (OSError, ValueError, IndexError):
        raise FedclError(f"{path} is not a fedcl MLflow outbox") from None
    if run_id is not None and header["run_id"] != run_id:
        raise FedclError(f"{path} belongs to MLflow run {header['run_id']}, not {run_id}")
    return header, ops


def sync_outbox(path: Path, tracking_uri: str | None = None) -> tuple[str, int]:
    """Send an outbox left by a run (``fedcl sync``); removes it when everything is sent.
    Returns (run id, operations sent)."""
    header, ops = read_outbox(path)
    uri = tracking_uri or header["tracking_uri"]
    tracker = Tracker(uri, "", "", outbox=path, retry_every_s=0.0)
    tracker._client, tracker.run_id, tracker._pending = _client(uri), header["run_id"], list(ops)
    if not tracker._flush(force=True):
        raise FedclError(f"MLflow at {uri} is still unreachable; {tracker.pending} operations "
                         f"kept in {path}")
    return header["run_id"], len(ops)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def terminate_run(tracking_uri: str, run_id: str, status: str = "FAILED") -> None:
    """Mark a run as ended from outside the ServerApp (the CLI after Ctrl-C)."""
    client = _client(tracking_uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def run_status(tracking_uri: str, run_id: str) -> str:
    return str(_client(tracking_uri).get_run(run_id).info.status)


def fetch_runs(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every run of ``experiment``, newest first, as plain dicts (params, metrics, tags)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise FedclError(f"no MLflow experiment named '{experiment}' at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=10000)
    out = []
    for run in runs:
        out.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        })
    return out


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of one run, by step."""
    client = _client(tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------------
# Before the run: the files a local store writes
# ---------------------------------------------------------------------------------------------
def local_store(tracking_uri: str) -> tuple[str, Path] | None:
    """``("sqlite", file)`` or ``("file", folder)`` for a tracking URI that MLflow keeps on
    this machine; None for a server, an in-memory database or another scheme."""
    if tracking_uri.startswith("sqlite:"):
        rest = tracking_uri[len("sqlite:"):]
        path = rest[3:].split("?", 1)[0] if rest.startswith("///") else ""
        return None if path in ("", ":memory:") else ("sqlite", Path(path))
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "file":
        return "file", Path(url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a drive letter)
        return "file", Path(tracking_uri)
    return None


def _experiment_rows(db: Path, experiment: str) -> list[tuple[str | None, str]]:
    """(artifact_location, lifecycle_stage) of every experiment named ``experiment`` in the
    MLflow database ``db``, read without writing to it; [] when it has none (or no tables
    yet). Raises ConfigError for a file that is not an SQLite database."""
    try:
        with sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT artifact_location, lifecycle_stage FROM experiments "
                                "WHERE name = ?", (experiment,)).fetchall()
    except sqlite3.OperationalError:  # no MLflow tables yet, or busy: MLflow will tell
        return []
    except sqlite3.DatabaseError:
        raise ConfigError(f"tracking URI: {shown(str(db))} is not an SQLite database") from None


def _local_folder(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return Path(location)
    return None  # an object store or MLflow's artifact proxy: not this machine's


def check_store(tracking_uri: str, experiment: str) -> tuple[Path | None, list[Path]]:
    """Raise a one-line ConfigError when a local store cannot be written: its sqlite file or
    file store folder (:func:`fedcl.paths.check_file`, :func:`~fedcl.paths.check_folder`),
    the artifacts folder of ``experiment`` (or ``./mlruns`` for a new one in a database), or
    an ``experiment`` that the store holds as deleted. Creates nothing; servers are not
    contacted (starting the MLflow run reports them). Returns the absolute paths the store
    will write on this machine: its database file (None for a file store or a server) and
    its folders."""
    store = local_store(tracking_uri)
    if store is None:
        return None, []
    kind, path = store
    if kind == "file":
        return None, [check_folder(path, f"MLflow store {shown(tracking_uri)}: folder")]
    db = check_file(path, f"MLflow store {shown(tracking_uri)}: database")
    rows = _experiment_rows(db, experiment) if db.is_file() else []
    if rows and all(stage == "deleted" for _, stage in rows):
        raise ConfigError(f"MLflow experiment {quoted(experiment)} is deleted in "
                          f"{shown(tracking_uri)}; restore it or choose another experiment")
    if not rows:
        return db, [check_folder(DEFAULT_ARTIFACT_ROOT, "MLflow artifacts folder")]
    folders = []
    for location, stage in rows:
        folder = _local_folder(location or "") if stage != "deleted" and location else None
        if folder is not None:
            folders.append(check_folder(folder, "MLflow artifacts folder of experiment "
                                                f"{quoted(experiment)}"))
    return db, folders
