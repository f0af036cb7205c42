"""Test hygiene: Flower, Ray, MLflow, matplotlib, Hugging Face and fedcl's cache live under a
temp dir, telemetry is off, and every test that runs fedcl does so in its own working folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="fedcl-tests-"))

HYGIENE_ENV = {
    "FLWR_HOME": str(_HOME / "flwr"),
    "RAY_TMPDIR": str(_HOME / "ray"),
    "HF_HOME": str(_HOME / "hf"),
    "FEDCL_CACHE_DIR": str(_HOME / "fedcl-cache"),
    "HF_DATASETS_CACHE": str(_HOME / "hf" / "datasets"),
    "MPLCONFIGDIR": str(_HOME / "mpl"),
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}
os.environ.update(HYGIENE_ENV)
os.environ.pop("MLFLOW_TRACKING_URI", None)
for value in HYGIENE_ENV.values():
    if value.startswith(str(_HOME)):
        Path(value).mkdir(parents=True, exist_ok=True)

# A suite started as a script's background job (`cmd &`) or under nohup inherits SIGINT and
# SIGHUP ignored, and so would every fedcl it starts, which keeps a signal it was started
# ignoring (fedcl.signals): the suite's processes take the usual dispositions, so the tests of
# termination signals test fedcl, not how the suite was launched.
for _sig, _usual in ((signal.SIGINT, signal.default_int_handler), (signal.SIGHUP, signal.SIG_DFL)):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        try:
            signal.signal(_sig, _usual)
        except ValueError:  # not the main thread: nothing to inherit from here
            pass


def run_fedcl(*args: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real ``fedcl`` command (as a user would) in ``cwd``."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)  # each test's runs land in its own cwd
    return subprocess.run([sys.executable, "-m", "fedcl.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def fedcl_cmd():  # type: ignore[no-untyped-def]
    return run_fedcl


@pytest.fixture
def flower_identity():  # type: ignore[no-untyped-def]
    """Flower's Message needs a run identity outside a running app (hand-made replies)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


def processes_mentioning(text: str) -> list:  # type: ignore[type-arg]
    """Live processes with ``text`` in their command line (to check nothing is left behind)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in (proc.info["cmdline"] or [])):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def alive(procs: list) -> list:  # type: ignore[type-arg]
    """The processes of ``procs`` (psutil) that still run: the same process (psutil checks
    its start time, against pid reuse) and not a zombie."""
    import psutil

    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return left


def ray_session_processes(root: str | Path) -> list:  # type: ignore[type-arg]
    """Live processes of the Ray sessions under ``root`` (a test's RAY_TMPDIR, or one
    session's folder), with their children: those that name it on their command line, hold a
    file open under it or work in it. Ray's agents and workers rename themselves
    (``ray::RuntimeEnvAgent``), so their command lines alone do not tell."""
    import psutil

    roots = {str(root).rstrip("/"), os.path.realpath(root)}
    under = lambda path: any(path == r or path.startswith(r + "/") for r in roots)  # noqa: E731
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            if (any(r in part for part in proc.info["cmdline"] or () for r in roots)
                    or under(proc.cwd()) or any(under(f.path) for f in proc.open_files())):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return alive(list(found.values()))


def wait_until_gone(procs: list, timeout: float = 30) -> list:  # type: ignore[type-arg]
    """Wait (up to ``timeout``) for ``procs`` to end; returns those still alive."""
    import time

    deadline = time.monotonic() + timeout
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


class MlflowServer:
    """A real ``mlflow server`` (sqlite store, proxied artifacts) that a test can stop (kill -9,
    as a crash would) and start again on the same port and store."""

    def __init__(self, root: Path) -> None:
        import socket

        self.root = root
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []  # more `mlflow server` options

    def start(self, timeout: float = 120) -> None:
        import time
        import urllib.request

        if self.proc is not None and self.proc.poll() is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("mlflow")
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", *self.extra_args],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # no background job workers (MLflow's GenAI jobs): idle processes that poll the CPU
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_text = (self.root / "server.log").read_text()
                raise RuntimeError(f"mlflow server exited: {log_text}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not answer within the timeout")

    def freeze(self, frozen: bool = True) -> None:
        """Stop (SIGSTOP) or continue the server: frozen, it still takes connections but never
        answers, as behind a network black hole."""
        import signal

        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        import signal

        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # (also a frozen one)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="session")
def _mlflow_server_session():  # type: ignore[no-untyped-def]
    server = MlflowServer(_HOME / "mlflow-server")
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_mlflow_server_session):  # type: ignore[no-untyped-def]
    """The session's real MLflow tracking server, running (started again if a test stopped
    it); stopped at the end of the session."""
    _mlflow_server_session.start()
    return _mlflow_server_session
