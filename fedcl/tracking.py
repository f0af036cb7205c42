"""MLflow tracking: the only module of fedcl that imports mlflow.

One MLflow run per simulation. Params: the whole config (strategy parameters as
``strategy_params.<name>``). Metrics per round (step = round over the run): ``acc_task_<j>``,
``avg_acc``, ``min_acc``, ``wc_acc``, ``train_loss``, ``round_seconds``, ``clients``,
``failures``, ``rejected``, ``empty``, ``tracking_wait_s``, ``tracking_queued`` (and
``client_gpu_peak_mb``, ``client_gpu_reserved_mb`` with GPU clients). At the end: ``acc``,
``forgetting``, ``forgetting_at_task_end``, ``bwt``, ``fwt``, ``learning_accuracy``,
``intransigence`` (only with a reference), and the run's time: ``time_startup_s``,
``time_rounds_s``, ``time_shutdown_s``, ``wall_time_s`` (:mod:`fedcl.run_clock`; the MLflow
run starts when the run started and ends when they were taken, so its duration is
``wall_time_s``). Artifacts: config.toml,
summary.json, accuracy_matrix.csv, accuracy_matrix.png and accuracy_per_round.png. Tags:
``fedcl.strategy``, ``fedcl.scenario``, ``fedcl.dataset``, ``fedcl.status`` and, when a run
fails, ``fedcl.error`` (the reason). The experiment carries :data:`EXPERIMENT_KIND_TAG`, so that
MLflow's UI shows it as model training.

The client is used directly (no fluent API, no global active run), so the tracker is safe to use
from the ServerApp's thread.

**Never in the way.** Everything logged after the run starts is queued and sent, in order, by
one background thread: the round loop never waits on the server, be it slow, frozen (a
network black hole: each request waits out MLflow's HTTP timeout) or gone. What the loop did
spend in logging calls, and what is still queued, are recorded per round
(``tracking_wait_s``, ``tracking_queued``).

**Outages.** When the tracking server cannot be reached, operations stay queued (and are written to
``<output>/mlflow_outbox.jsonl``, so that a kill during the outage loses nothing) while the run
goes on. The sender retries every ``retry_every_s``; at the end of the run the tracker waits
up to ``tracking_wait_s`` for the server, and whatever is still unsent stays in the
outbox file for ``fedcl sync``. A resumed run sends the outbox it finds first. Metrics keep their
original step and timestamp, so a late write is indistinguishable from a timely one. Errors the
server *answers* with (HTTP 4xx: a request MLflow refuses) are not outages: they fail the run.
Starting a run needs the server: a wrong URI is reported at once.

**Runs started together** on one local store take turns at setting it up
(:func:`store_lock`); an experiment two runs make at once is one experiment.

**Before the run.** :func:`check_store` checks, without creating anything, the files a local
store writes: the sqlite file or file store folder, and the artifacts folder of the run's
experiment (the one it was created with, else ``./mlruns``, MLflow's default for a local
database); and that the experiment is not deleted. :data:`MAX_RUN_NAME` and
:data:`MAX_EXPERIMENT_NAME` are MLflow's limits on names.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from fedcl.errors import ConfigError, FedclError
from fedcl.paths import check_file, check_folder, quoted, shown
from fedcl.results import RoundRecord
from fedcl.run_clock import TIME_KEYS

FINAL_METRICS = ("acc", "forgetting", "forgetting_at_task_end", "bwt", "fwt",
                 "learning_accuracy", "intransigence", *TIME_KEYS)

#: Where a run keeps what it could not send yet (in its output folder).
OUTBOX_FILE = "mlflow_outbox.jsonl"

#: Seconds a run waits for other runs to finish setting up the same local store.
STORE_LOCK_TIMEOUT_S = 300.0

#: Seconds between attempts to reach an unreachable tracking server (at least MIN_RETRY_S).
RETRY_EVERY_S = 5.0
MIN_RETRY_S = 0.05

#: Seconds a failing run waits for the server to hear that it failed.
FAIL_WAIT_S = 10.0

# MLflow's own HTTP retries (7, with exponential back-off: minutes per call) would stall the
# task loop during an outage; fedcl queues instead, so one quick retry is enough. The user's
# own settings win.
# MLflow also prints a "View run at" link for server URIs on every run end; fedcl prints its own
# line about the run.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}

#: The experiment-level tag that tells MLflow's UI (3.x) what kind of experiment it is, and the
#: value for classic model training. fedcl sets it on every experiment it logs to. Sources, in
#: the installed package: the UI's "Experiment type" selector writes this tag
#: (``setExperimentTag({key: "mlflow.experimentKind", value: kind})`` in
#: ``mlflow/server/js/build/static/js``, with the kinds ``genai_development``,
#: ``custom_model_development``, ...), and MLflow's own demo sets ``genai_development`` on its
#: GenAI experiment (``mlflow/demo/generators/traces.py``). A UI that picks the page by this tag
#: opens a ``custom_model_development`` experiment on its runs ("Model training"), not on the
#: GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Kinds that nobody chose (empty, or what MLflow's UI inferred): replaced by EXPERIMENT_KIND.
UNCHOSEN_KINDS = ("", "no_inferred_type", "genai_development_inferred",
                  "custom_model_development_inferred")

#: MLflow 3.17's UI also keeps a GenAI / Model training switch per browser (default GenAI, in
#: its local storage) and takes the page from it rather than from the tag; a link may set it
#: with this query, which the UI itself adds to its own links. fedcl's links carry it, so they
#: open with the runs' navigation.
UI_WORKFLOW_QUERY = "workflowType=machine_learning"

#: Where ``mlflow ui`` serves by default.
MLFLOW_UI_ADDRESS = "http://127.0.0.1:5000"

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
    if local_store(tracking_uri) is None:  # a server sets its store up itself
        return MlflowClient(tracking_uri=tracking_uri)
    with store_lock(tracking_uri):  # MLflow makes a new local store's tables on first use
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    return client


@contextlib.contextmanager
def store_lock(tracking_uri: str, timeout_s: float = STORE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold, across processes, the lock of a local store (an ``flock`` on the nearest existing
    folder of its sqlite file or file store; nothing is created); a server's store holds its
    own. MLflow makes a new sqlite store's tables (and migrates an old one) on first use, and
    two processes doing so at once fail ("table ... already exists"): runs started together
    on one store take turns at this step only. Raises FedclError after ``timeout_s``."""
    store = local_store(tracking_uri)
    if store is None:
        yield
        return
    folder = store[1].absolute().parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder this process cannot open: MLflow will say what is wrong
        yield
        return
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FedclError(f"MLflow store {shown(tracking_uri)}: another process "
                                     f"held its set-up for {timeout_s:.0f} s") from None
                time.sleep(0.05)
            except OSError:  # a file system without flock: go on unlocked
                break
        yield
    finally:
        os.close(fd)  # closing frees the lock


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, made if the store lacks it, with the
    :data:`EXPERIMENT_KIND` tag (set too on an experiment made before without it, or with a
    kind MLflow's UI only inferred; a kind the user chose stays). Runs started together may
    both find it missing: the one whose create fails takes the other's."""
    for attempt in range(2):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise FedclError(f"MLflow experiment '{name}' is deleted; "
                                 "restore it or choose another name")
            if exp.tags.get(EXPERIMENT_KIND_TAG, "") in UNCHOSEN_KINDS:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG,
                                          EXPERIMENT_KIND)
            return str(exp.experiment_id)
        try:
            return str(client.create_experiment(name,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
        except Exception:
            if attempt:  # not made by another run: the store's own refusal
                raise
    raise AssertionError("unreachable")


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str,
                 server: str | None = None) -> str:
    """The address of a run's page in MLflow's UI: on the tracking server ``tracking_uri``
    (http or https), or on ``server`` (an ``mlflow ui`` of a local store)."""
    base = (server or tracking_uri).rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_WORKFLOW_QUERY}"


def ui_command(tracking_uri: str) -> str | None:
    """The ``mlflow ui`` command that shows a local store (an sqlite file or a file store) from
    any folder: its path made absolute. None for a server or another scheme."""
    import shlex

    store = local_store(tracking_uri)
    if store is None:
        return None
    kind, path = store
    uri = f"sqlite:///{path.absolute()}" if kind == "sqlite" else path.absolute().as_uri()
    return f"{mlflow_program()} ui --backend-store-uri {shlex.quote(uri)}"


def mlflow_program() -> str:
    """How to call the ``mlflow`` of fedcl's own environment from any shell: its path (the
    README's commands never activate the environment, and a launcher such as ``uv run`` puts
    it on fedcl's PATH but not on the user's shell's), else ``<python> -m mlflow``."""
    import shlex

    ours = Path(sys.executable).with_name("mlflow")
    if ours.is_file() and os.access(ours, os.X_OK):
        return shlex.quote(str(ours))
    return f"{shlex.quote(sys.executable)} -m mlflow"


def where_to_view(tracking_uri: str, experiment_id: str | None, run_id: str) -> list[str]:
    """Lines that say how to open a run in MLflow's UI: the run page's address on a tracking
    server; for a local store, the ``mlflow ui`` command, then the address it serves the run
    at. [] when neither applies (another scheme)."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return [f"  {run_page_url(tracking_uri, experiment_id, run_id)}"] if experiment_id else []
    command = ui_command(tracking_uri)
    if command is None:
        return []
    lines = [f"  view it with: {command}"]
    if experiment_id:
        url = run_page_url(tracking_uri, experiment_id, run_id, MLFLOW_UI_ADDRESS)
        lines.append(f"  then open {url}")
    return lines


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
    """Logs one fedcl run to MLflow from a background sender, queueing what cannot be sent
    during an outage (see the module's docstring).

    Starting (:meth:`start`, :meth:`resume`) talks to the server directly; after that every
    call only queues and returns: one sender thread sends the queue in order, so a server
    that is slow, frozen or gone never holds the caller up. A request the server refuses
    (HTTP 4xx) is raised as :class:`FedclError` by the caller's next call."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str,
                 outbox: Path | None = None, retry_every_s: float = RETRY_EVERY_S) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.outbox = outbox
        self.retry_every_s = retry_every_s
        self._client: Any = None
        self._pending: list[dict[str, Any]] = []  # in order; the sender sends the first
        self._cond = threading.Condition()  # guards everything below and the outbox file
        self._next_try = 0.0
        self._down_since: float | None = None
        self._sent_while_down = 0
        self._refused: FedclError | None = None
        self._sender: threading.Thread | None = None
        self._stopping = False
        self._waited = 0.0

    @property
    def pending(self) -> int:
        """Operations not yet written to the tracking server."""
        with self._cond:
            return len(self._pending)

    @property
    def unreachable(self) -> bool:
        """Whether the last attempt to reach the server failed (an outage is going on)."""
        with self._cond:
            return self._down_since is not None

    def take_waited(self) -> float:
        """Seconds the caller spent in this tracker's logging calls since it last asked
        (queueing, and writing the outbox during an outage), and start counting afresh."""
        waited, self._waited = self._waited, 0.0
        return waited

    def start(self, config: dict[str, Any], start_unix: float | None = None) -> str:
        """Make the run (starting at ``start_unix``, Unix seconds; default now) with the
        config as params; returns its id."""
        from mlflow.entities import Param, RunTag

        try:
            client = _client(self.tracking_uri)
            exp_id = _experiment_id(client, self.experiment)
            tags = {"fedcl.strategy": config["strategy"], "fedcl.scenario": config["scenario"],
                    "fedcl.dataset": config["dataset"], "mlflow.runName": self.run_name}
            run = client.create_run(exp_id, run_name=self.run_name, tags=tags,
                                    start_time=_ms(start_unix))
        except FedclError:
            raise
        except Exception as err:
            raise FedclError(f"cannot use MLflow tracking URI '{self.tracking_uri}': "
                             f"{_first_line(err)}") from None
        self._client = client
        self.run_id = run.info.run_id
        self.experiment_id = exp_id
        params = [Param(k, v[:6000]) for k, v in flatten_params(config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(self.run_id, params=params[i:i + 100],
                             tags=[RunTag("fedcl.status", "running")] if i == 0 else [])
        self._start_sender()
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
        self.experiment_id = str(run.info.experiment_id)
        if self.outbox is not None and self.outbox.exists():
            self._pending = read_outbox(self.outbox, run_id)[1]
        self._start_sender()
        self._submit({"op": "status", "status": "RUNNING"})
        self._submit({"op": "tag", "key": "fedcl.status", "value": "running"})
        self._submit({"op": "tag", "key": "fedcl.resumed", "value": "true"})
        return run_id

    # --- what the task loop logs ----------------------------------------------------------
    def log_round(self, record: RoundRecord) -> None:
        values: dict[str, float | None] = {
            f"acc_task_{j}": a for j, a in enumerate(record.acc_per_task)}
        values.update(avg_acc=record.avg_acc, min_acc=record.min_acc, wc_acc=record.wc_acc,
                      train_loss=record.train_loss,
                      clients=record.clients, failures=record.failures,
                      rejected=record.rejected, empty=record.empty, task=record.task,
                      client_gpu_peak_mb=record.client_gpu_peak_mb,
                      client_gpu_reserved_mb=record.client_gpu_reserved_mb,
                      client_compute_s=record.client_compute_s,
                      clients_connected=record.connected,
                      tracking_wait_s=record.tracking_wait_s,
                      tracking_queued=record.tracking_queued,
                      bytes_down=record.bytes_down, bytes_up=record.bytes_up)
        self.log_metrics(values, step=record.round)

    def log_metrics(self, values: dict[str, float | None], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [[k, float(v), now, step] for k, v in values.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self._submit({"op": "metrics", "metrics": batch})

    def finish(self, summary: dict[str, Any], files: Iterable[Path],
               wait_s: float = 0.0, end_unix: float | None = None) -> int:
        """Final metrics, artifacts, FINISHED (ending at ``end_unix``, Unix seconds; default
        when the server hears it). Waits until everything is sent, or the server has been
        found unreachable and ``wait_s`` seconds have passed (a frozen server is found so
        after MLflow's HTTP timeout). Returns the number of operations left unsent (kept in
        the outbox file)."""
        self.log_metrics({k: summary.get(k) for k in FINAL_METRICS}, step=0)
        if comm := summary.get("communication"):
            self.log_metrics({"bytes_down_per_round": comm["per_round"]["bytes_down"],
                              "bytes_up_per_round": comm["per_round"]["bytes_up"],
                              "bytes_down_total": comm["bytes_down"],
                              "bytes_up_total": comm["bytes_up"]}, step=0)
        for path in files:
            self._submit({"op": "artifact", "path": str(Path(path).resolve())})
        self._submit({"op": "tag", "key": "fedcl.status", "value": "finished"})
        status: dict[str, Any] = {"op": "status", "status": "FINISHED"}
        if end_unix is not None:
            status["end_time"] = _ms(end_unix)
        self._submit(status)
        if not self._drain(time.monotonic() + wait_s, verdict=True):
            log.warning("MLflow at %s unreachable: %d operations kept in %s",
                        self.tracking_uri, self.pending, self.outbox)
        self._stop()
        return self.pending

    def fail(self, reason: str, status: str = "FAILED", wait_s: float = FAIL_WAIT_S) -> None:
        """Mark the run FAILED (or KILLED), keeping everything logged so far; waits at most
        ``wait_s`` for the server (what is left stays in the outbox)."""
        if self.run_id is None or self._client is None:
            return
        with self._cond:
            self._refused = None  # the run is failing already: say why, if the server hears
        for op in ({"op": "tag", "key": "fedcl.error", "value": reason[:5000]},
                   {"op": "tag", "key": "fedcl.status", "value": status.lower()},
                   {"op": "status", "status": status}):
            self._submit(op)
        with contextlib.suppress(FedclError):
            self._drain(time.monotonic() + wait_s, verdict=False)
        self._stop()

    def persist(self) -> None:
        """Write what is still queued to the outbox file (a resumed run sends it first), so
        that a checkpoint taken now loses nothing to a kill; nothing is written when the
        queue is empty. An operation sent meanwhile may be sent twice after a kill: MLflow
        keeps one copy of a metric logged twice with the same step and timestamp, and tags
        and status are set, not added."""
        t0 = time.monotonic()
        with self._cond:
            if self._pending:
                self._save_outbox()
        self._waited += time.monotonic() - t0

    def wait_sent(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for everything queued to be sent; whether it was. Raises
        the server's refusal of a request."""
        return self._drain(time.monotonic() + timeout_s, verdict=False)

    # --- the sender -------------------------------------------------------------------------
    def _start_sender(self) -> None:
        self._sender = threading.Thread(target=self._send_loop, name="fedcl-mlflow",
                                        daemon=True)
        self._sender.start()

    def _submit(self, op: dict[str, Any]) -> None:
        t0 = time.monotonic()
        with self._cond:
            if self._refused is not None:
                raise self._refused
            self._pending.append(op)
            if self._down_since is not None:  # a kill during the outage loses nothing
                self._append_outbox(op)
            self._cond.notify_all()
        self._waited += time.monotonic() - t0

    def _drain(self, deadline: float, verdict: bool) -> bool:
        """Wait for the queue to empty, until ``deadline`` (with ``verdict``: and until an
        attempt has found the server unreachable). Whether everything was sent."""
        with self._cond:
            while self._pending and self._refused is None:
                if self._sender is None or not self._sender.is_alive():
                    break
                left = deadline - time.monotonic()
                if left <= 0 and (not verdict or self._down_since is not None):
                    break
                self._cond.wait(max(left, 0.05))
            if self._refused is not None:
                raise self._refused
            return not self._pending

    def _stop(self) -> None:
        """Stop the sender; what it has not sent goes to the outbox file."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            if self._pending:
                self._save_outbox()
        if self._sender is not None and self._sender is not threading.current_thread():
            self._sender.join(timeout=1.0)  # one stuck on a frozen server is left behind

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    if self._pending:
                        wait = self._next_try - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
            try:
                self._send_first()
            except FedclError as err:
                with self._cond:
                    self._refused = err
                    self._cond.notify_all()
                return

    def _send_first(self) -> bool:
        """Send the oldest queued operation; False when the server could not be reached.
        One thread at a time: the sender, or ``fedcl sync``'s caller."""
        with self._cond:
            op = self._pending[0]
        try:
            apply_operation(self._client, self.run_id, op)
        except Exception as err:
            if not is_outage(err):
                raise FedclError(f"MLflow at {self.tracking_uri} refused {op['op']}: "
                                 f"{_first_line(err)}") from None
            with self._cond:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self._sent_while_down = 0
                    if self.run_name:  # a run's tracker says so; `fedcl sync` does not
                        log.warning("MLflow at %s unreachable (%s); queueing",
                                    self.tracking_uri, _first_line(err))
                self._next_try = time.monotonic() + max(self.retry_every_s, MIN_RETRY_S)
                self._save_outbox()
                self._cond.notify_all()
            return False
        with self._cond:
            self._pending.pop(0)
            if self._down_since is not None:
                self._sent_while_down += 1
            if not self._pending:
                if self._down_since is not None:
                    log.warning("MLflow at %s back after %.0f s; %d queued operations sent",
                                self.tracking_uri, time.monotonic() - self._down_since,
                                self._sent_while_down)
                    self._down_since = None
                if self.outbox is not None:
                    self.outbox.unlink(missing_ok=True)
            elif self._stopping:  # sent after the outbox was written: not again
                self._save_outbox()
            self._cond.notify_all()
        return True

    def _save_outbox(self) -> None:
        if self.outbox is not None:
            write_outbox(self.outbox, self.tracking_uri, str(self.run_id), self._pending)

    def _append_outbox(self, op: dict[str, Any]) -> None:
        if self.outbox is None:
            return
        if not self.outbox.exists():
            self._save_outbox()
            return
        with self.outbox.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(op) + "\n")


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
            client.set_terminated(run_id, op["status"], end_time=op.get("end_time"))
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
    while tracker._pending:  # in this thread: no sender
        if not tracker._send_first():
            raise FedclError(f"MLflow at {uri} is still unreachable; {tracker.pending} "
                             f"operations kept in {path}")
    return header["run_id"], len(ops)


def _ms(unix_s: float | None) -> int | None:
    """Unix seconds as MLflow's milliseconds."""
    return None if unix_s is None else round(unix_s * 1000)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def terminate_run(tracking_uri: str, run_id: str, status: str = "FAILED",
                  reason: str | None = None) -> str:
    """Mark a run as ended from outside the ServerApp (after a signal, a backend failure)
    unless it already ended; returns its status afterwards."""
    client = _client(tracking_uri)
    current = str(client.get_run(run_id).info.status)
    if current != "RUNNING":
        return current
    if reason:
        client.set_tag(run_id, "fedcl.error", reason[:5000])
    client.set_tag(run_id, "fedcl.status", status.lower())
    client.set_terminated(run_id, status)
    return status


def run_status(tracking_uri: str, run_id: str) -> str:
    return str(_client(tracking_uri).get_run(run_id).info.status)


def fetch_runs(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every run of ``experiment``, newest first, as plain dicts (params, metrics, tags)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment named '{experiment}' at {tracking_uri}")
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
