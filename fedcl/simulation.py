"""``fedcl simulate``: the ServerApp and ClientApp under Flower's Ray simulation engine, in
process, with guards so that a failed backend, a crashing client or a termination signal ends
the run with a clear error instead of a hang, and no Ray process outlives the command.

Ray and Flower's engine run in a thread of their own (:class:`_Engine`); the main thread only
watches it, and handles SIGINT, SIGTERM and SIGHUP (:mod:`fedcl.signals`). On a signal it asks
the ServerApp to stop (``RunControl.cancel``, seen while the ServerApp waits for clients), which
marks the MLflow run FAILED and keeps the last checkpoint; Flower's engine and Ray then shut
down; whatever the run started and is still alive is killed; and the signal is raised as
:class:`~fedcl.errors.Terminated`. Each wait is bounded, and the main thread is never inside
Ray or Flower, so a signal sent to the whole process group (which kills Ray's own processes
at the same moment) ends the run the same way.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcl.client_app import app as client_app
from fedcl.config import Config, resolve_tracking_uri
from fedcl.errors import ConfigError, FedclError, RunAborted, RunCancelled, Terminated
from fedcl.flower_simulation import SimulationEngine, load_engine
from fedcl.processes import OutputOwner, ray_session_dir
from fedcl.run_clock import RunClock
from fedcl.run_setup import check_output, default_run_name, output_folder
from fedcl.server_app import RunControl, RunObserver, build_server_app
from fedcl.signals import TerminationSignals, shielded_children
from fedcl.tracking import terminate_run

# Seconds the ServerApp gets to end its run after a failure or a signal ...
SHUTDOWN_GRACE_S = 30.0
# ... and then, after a signal, Flower's engine and Ray to shut down (a few seconds) before
# what is left of them is killed.
ENGINE_GRACE_S = 15.0
# Seconds to wait for a Ray cluster's head to accept a connection (ray_address).
JOIN_PROBE_S = 10.0
# Seconds between the main thread's looks at the engine.
POLL_S = 0.25

# Defaults fedcl sets for the processes it starts, unless the user set them: telemetry off,
# and Ray's notice about accelerator variables silenced by choosing its future behaviour.
RUNTIME_ENV_DEFAULTS = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
                        "MLFLOW_DISABLE_TELEMETRY": "true",
                        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}

# Ray's documented switch for its C++ failure-signal handler (see _import_engine).
RAY_FAILURE_HANDLER_OFF = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
# Where Ray tears down the processes of a node it started (see _hasten_ray_teardown).
RAY_NODE_FILE = os.path.join("ray", "_private", "node.py")


def _route_flower_logs(log_file: Path | None, verbose: bool) -> None:
    """Flower's own log goes to ``log_file`` (its console output only with --verbose)."""
    logger = logging.getLogger("flwr")
    for handler in list(logger.handlers):
        if getattr(handler, "_fedcl", False):
            logger.removeHandler(handler)
            handler.close()
    if verbose:
        return
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL + 1)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh._fedcl = True  # type: ignore[attr-defined]
        logger.addHandler(fh)


def backend_config(config: Config) -> dict[str, Any]:
    return {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": False,
                      "include_dashboard": False, "configure_logging": False},
    }


def simulate(config: Config, observer: RunObserver | None = None, verbose: bool = False,
             resume: dict[str, Any] | None = None, signals: TerminationSignals | None = None,
             owner: OutputOwner | None = None, clock: RunClock | None = None
             ) -> dict[str, Any]:
    """Run ``config`` under the Ray simulation engine (continuing the checkpoint ``resume``
    when given); returns the run's summary.

    ``clock``: the run's time (:mod:`fedcl.run_clock`), begun when the run began (the CLI's:
    with its process); without it, the run's time begins now. The run ends, for its time
    figures and its MLflow run, once Ray has shut down and every process it started is
    stopped.

    ``signals``: the process's termination signals, already taken over (the CLI's); without
    them, :func:`simulate` takes them over itself while it runs (from the main thread).
    ``owner``: the output folder, already claimed (:class:`~fedcl.processes.OutputOwner`);
    without it, :func:`simulate` claims it, stopping what a killed previous owner left.
    A signal ends the run as :class:`~fedcl.errors.Terminated`."""
    own_signals = signals is None
    signals = signals or TerminationSignals().install()
    own_folder = owner is None
    try:
        for key, value in RUNTIME_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        config.run_name = default_run_name(config)
        out_dir = output_folder(config, config.run_name)
        config.output = str(out_dir)
        if owner is None:
            check_output(out_dir, resume=resume is not None)  # before anything goes there
            with signals.held():
                owner = OutputOwner.claim(out_dir)
            owner.stop_leftovers([(resume or {}).get("ray_session_dir")])
        return _run(config, observer, verbose, resume, signals, owner, out_dir,
                    clock or RunClock.since(0.0))
    finally:
        if own_folder and owner is not None:
            owner.release()
        if own_signals:
            signals.restore()


class _Engine(threading.Thread):
    """Ray and Flower's simulation engine, off the main thread.

    fedcl starts Ray itself, here, rather than letting Flower do it (Flower uses a running Ray
    as it finds it): ``ray.init`` in the main thread would install Ray's own SIGTERM handler
    there (``sys.exit`` wherever the main thread happens to be). Ray ties its services' lives
    to the thread that started them (they get SIGKILL when it ends), so this one thread starts
    Ray, runs the simulation and shuts Ray down."""

    def __init__(self, config: Config, control: RunControl, verbose: bool,
                 engine: SimulationEngine) -> None:
        super().__init__(name="fedcl-engine", daemon=True)
        self.config, self.control, self.verbose = config, control, verbose
        self.server_app = build_server_app(config, control)
        self.engine = engine
        self.session_dir: str | None = None
        self.ray_up = threading.Event()
        self.error: BaseException | None = None
        self.hastened = False  # see _hasten_ray_teardown

    def run(self) -> None:
        try:
            with shielded_children():  # Ray's processes ignore the group's signals: see there
                _start_ray(self.config)
            if self.config.ray_address:
                self.control.health = cluster_watch(Path(self.config.output))
            self.session_dir = ray_session_dir()
            self.ray_up.set()
            if not self.control.cancel.is_set():
                self.engine(self.server_app, client_app, self.config.clients,
                            backend_config(self.config), self.verbose)
        except BaseException as err:  # the Ray backend failed to start or crashed
            self.error = err
        finally:
            _shutdown_ray()


def _run(config: Config, observer: RunObserver | None, verbose: bool,
         resume: dict[str, Any] | None, signals: TerminationSignals, owner: OutputOwner,
         out_dir: Path, clock: RunClock) -> dict[str, Any]:
    control = RunControl(observer=observer, resume=resume, clock=clock, close_later=True,
                         assign_partitions=True)
    if resume is not None:  # the MLflow run to mark, should a signal come before it resumes
        control.run_id = resume.get("mlflow_run_id")
        control.tracking_uri = resolve_tracking_uri(config)
    engine: _Engine | None = None
    saved_fds = None
    stopped: Terminated | None = None
    try:
        try:
            simulation_engine = _import_engine()
            _route_flower_logs(out_dir / "flower.log", verbose)
            with signals.held():
                saved_fds = None if verbose else _output_to(out_dir / "flower.log")
            signals.hold()  # from here on a signal is recorded, and seen by _watch
            if (startup := getattr(observer, "on_startup", None)) is not None:
                startup(f"Flower's simulation engine for {config.clients} clients on "
                        + (f"the Ray cluster at {config.ray_address}" if config.ray_address
                           else "a private Ray instance"))
            engine = _Engine(config, control, verbose, simulation_engine)
            engine.start()
            _watch(engine, signals, owner)
        except Terminated:
            signals.hold()  # the run is ending: later signals are only recorded
        if signals.received is not None:
            control.stop_reason = str(Terminated(signals.received))
            control.cancel.set()
            _wind_down(control, engine, signals, owner)
        elif engine is not None and engine.error is not None:
            control.cancel.set()
            if control.started.is_set():
                control.done.wait(SHUTDOWN_GRACE_S)
        elif control.started.is_set():
            control.done.wait(SHUTDOWN_GRACE_S)
    finally:
        with signals.held():
            if signals.received is not None:  # the MLflow run is marked before Ray is killed
                stopped = Terminated(signals.received, _stop_detail(control, out_dir))
            if engine is not None:  # a signal may have ended _watch before Ray was up
                owner.note_session(engine.session_dir)
            owner.stop_started()
            _route_flower_logs(None, verbose=True)
            if saved_fds is not None:
                _restore_output(saved_fds)
    # a finished run ends here, Ray's shutdown included in its time (also after a signal
    # that came once its results were complete)
    control.close()
    if stopped is not None:
        raise stopped from None
    if engine is not None and engine.error is not None:
        if isinstance(control.error, FedclError) and not isinstance(control.error, RunCancelled):
            raise control.error
        if isinstance(engine.error, FedclError):  # e.g. a cluster that cannot be joined
            _mark_failed(control, str(engine.error))
            raise engine.error
        cause = engine.error
        while cause.__cause__ is not None:  # Flower wraps the backend's error twice
            cause = cause.__cause__
        _mark_failed(control, f"simulation backend failed: {cause}")
        raise RunAborted(f"simulation backend failed: {_first_line(cause)} "
                         f"(details in {out_dir / 'flower.log'})") from None
    if control.error is not None:
        raise control.error
    if control.summary is None:
        raise RunAborted("the ServerApp ended without a result")
    return control.summary


def _watch(engine: _Engine, signals: TerminationSignals, owner: OutputOwner) -> None:
    """Wait until the engine ends or a signal comes, recording the processes the run starts
    (for whoever owns the folder after a ``kill -9``)."""
    noted_session = False
    while engine.is_alive() and signals.received is None:
        engine.join(POLL_S)
        if engine.ray_up.is_set() and not noted_session:
            noted_session = True
            signals.reinstall()  # should Ray have taken SIGTERM after all
            owner.note_session(engine.session_dir)
        owner.note_processes()
        _hasten_ray_teardown(engine, owner)


def _hasten_ray_teardown(engine: _Engine, owner: OutputOwner) -> None:
    """Once the engine thread is inside Ray's own teardown of its processes
    (``ray._private.node.Node.kill_all_processes``, which ``ray.shutdown`` runs after the
    driver has disconnected from them), kill them at once: Ray sends each a SIGTERM and waits
    1 s for it, and Ray's processes block SIGTERM (:func:`fedcl.signals.shielded_children`).
    Ray then finds them gone and moves on. Should Ray's teardown look otherwise, this finds
    nothing and Ray takes its time."""
    frame = None if engine.hastened else sys._current_frames().get(engine.ident or -1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "kill_all_processes" and code.co_filename.endswith(RAY_NODE_FILE):
            engine.hastened = True
            owner.stop_started()
            return
        frame = frame.f_back


def _wind_down(control: RunControl, engine: _Engine | None, signals: TerminationSignals,
               owner: OutputOwner) -> None:
    """After a signal: the ServerApp, if it started, ends its run (it sees ``control.cancel``
    while it waits for clients), then Flower's engine stops and Ray shuts down; each within
    its grace, and at once when the signal is repeated (``signals.hurried``)."""
    if engine is None:
        return
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while (engine.is_alive() and control.started.is_set() and not control.done.is_set()
           and not signals.hurried and time.monotonic() < deadline):
        engine.join(POLL_S)
    deadline = time.monotonic() + ENGINE_GRACE_S
    while engine.is_alive() and not signals.hurried and time.monotonic() < deadline:
        engine.join(POLL_S)
        _hasten_ray_teardown(engine, owner)


def _stop_detail(control: RunControl, out_dir: Path) -> str:
    """What a signal left: the rest of the one line the CLI prints after 'interrupted by
    SIGTERM'."""
    if control.summary is not None:
        return f" after the run finished; results in {out_dir}"
    status = _mark_failed(control, control.stop_reason or "interrupted")
    detail = "; the MLflow run is marked FAILED" if status == "FAILED" else ""
    if (out_dir / "checkpoint.pt").is_file():
        detail += f"; `fedcl simulate --resume {out_dir}` continues it"
    return detail or " before the run started"


def _import_engine() -> SimulationEngine:
    """Flower's simulation engine (:mod:`fedcl.flower_simulation`), with Ray imported for this
    process first.

    Ray's C++ core installs Abseil's failure-signal handler in the driver process, and that
    handler takes SIGTERM too: it prints a C++ stack trace and arms a 3 s alarm that aborts
    the process (exit 134), whatever the application does about SIGTERM. fedcl handles
    SIGTERM itself, so the driver turns that handler off with Ray's documented switch
    (``RAY_DISABLE_FAILURE_SIGNAL_HANDLER``), which Ray reads once, on import; the switch
    leaves the environment again before Ray starts its processes, which keep their handler."""
    if "ray" not in sys.modules and RAY_FAILURE_HANDLER_OFF not in os.environ:
        os.environ[RAY_FAILURE_HANDLER_OFF] = "1"
        try:
            import ray  # noqa: F401  (reads the switch)
        finally:
            del os.environ[RAY_FAILURE_HANDLER_OFF]
    return load_engine()  # ~1 s


def _start_ray(config: Config) -> None:
    """``ray.init`` as Flower's Ray backend would call it (its backend config's init args; the
    driver's ``sys.path`` as the workers' PYTHONPATH), on a private instance or, with
    ``config.ray_address``, joining that cluster (:func:`join_cluster`)."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if config.ray_address:
        join_cluster(config.ray_address, runtime_env, backend_config(config)["init_args"])
    else:
        ray.init(runtime_env=runtime_env, **backend_config(config)["init_args"])
    check_client_resources(config, ray.nodes())


def check_client_resources(config: Config, nodes: list[dict[str, Any]]) -> None:
    """Refuse, with one :class:`~fedcl.errors.ConfigError` line, a run whose clients (or
    cohorts) fit on no Ray node: each asks for ``client_cpus`` CPUs and ``client_gpus`` GPUs,
    and Flower's actor pool needs one node with both (``nodes``: ``ray.nodes()``; dead nodes
    are left out). Flower's own refusal ("ActorPool is empty") names neither the flags nor
    the node's resources."""
    cpus, gpus = float(config.client_cpus), float(config.client_gpus)
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if any(r.get("CPU", 0.0) >= cpus and r.get("GPU", 0.0) >= gpus for r in alive):
        return
    best = max(alive, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    where = ("this machine" if not config.ray_address
             else f"any node of the Ray cluster at {config.ray_address}")
    raise ConfigError(
        f"no client fits on {where}: each asks for {cpus:g} CPUs and {gpus:g} GPUs "
        f"(client_cpus, client_gpus), the largest node has {best.get('CPU', 0.0):g} CPUs and "
        f"{best.get('GPU', 0.0):g} GPUs; lower client_cpus or client_gpus")


def join_cluster(address: str, runtime_env: dict[str, Any], init_args: dict[str, Any]) -> None:
    """Join the Ray cluster at ``address`` (``auto`` or ``HOST:PORT``) as its driver.

    The ServerApp stays in this process; Flower's engine sizes its pool of client actors from
    every node's resources (``ray.nodes()``), so actors and cohorts land on every node with
    the CPUs (and GPUs) a client asks for. Each worker gets the driver's ``sys.path`` as its
    PYTHONPATH (``runtime_env``): fedcl and the data must sit at the same paths on every
    node. Leaving (:func:`_shutdown_ray`) only disconnects: the job's actors end with it, the
    cluster runs on. Raises :class:`~fedcl.errors.RunAborted` with one line when nothing
    answers at ``address`` (a TCP probe of ``HOST:PORT`` first, within
    :data:`JOIN_PROBE_S`: Ray itself would retry for minutes)."""
    import ray

    if address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=JOIN_PROBE_S).close()
        except OSError as err:
            raise RunAborted(f"cannot join the Ray cluster at ray_address={address!r}: nothing "
                             f"answers there ({err.strerror or err}); start its head with "
                             f"`ray start --head --port={port}`") from None
    try:
        ray.init(address=address, runtime_env=runtime_env, **init_args)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise RunAborted(f"cannot join the Ray cluster at ray_address={address!r}: "
                         f"{_first_line(err)}") from None


def _alive_nodes() -> dict[str, str]:
    """The Ray cluster's live nodes: node id -> address."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}


def cluster_watch(out_dir: Path) -> Callable[[], None]:
    """A check, run before every round, that every node of the joined cluster that was alive
    when the run joined still is. Flower's engine keeps a lost node's client actors in its
    pool, and every message sent to them fails, so a run that went on would lose those
    clients' updates round after round; it stops instead with one line
    (:class:`~fedcl.errors.RunAborted`), its MLflow run FAILED and its last checkpoint kept:
    ``fedcl simulate --resume`` continues it on the nodes the cluster has then. A node that
    joins later is welcome and not watched."""
    joined = _alive_nodes()

    def check() -> None:
        alive = _alive_nodes()
        gone = sorted(set(joined) - set(alive))
        if gone:
            hint = (f"; `fedcl simulate --resume {out_dir}` continues it on the nodes left"
                    if (out_dir / "checkpoint.pt").is_file() else "")
            raise RunAborted(f"Ray node {gone[0][:12]} ({joined[gone[0]]}) left the cluster "
                             f"({len(alive)} of {len(joined)} nodes left); the run stops "
                             f"here{hint}")

    return check


def _output_to(path: Path) -> tuple[int, int]:
    """Send file descriptors 1 and 2 (where Ray's services and core print, past Python's
    logging) to ``path``; returns duplicates of the old ones for :func:`_restore_output`.
    The live display keeps its own duplicate of the terminal (``fedcl.cli``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


def _restore_output(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), saved, strict=True):
        os.dup2(fd, target)
        os.close(fd)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _mark_failed(control: RunControl, reason: str) -> str | None:
    """Mark the run's MLflow run FAILED unless it already ended; returns its status then
    (None when there is no run or the store cannot be read)."""
    if control.run_id and control.tracking_uri:
        try:
            return terminate_run(control.tracking_uri, control.run_id, "FAILED", reason)
        except Exception:
            pass
    return None


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
        time.sleep(0.1)
