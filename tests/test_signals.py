"""Termination signals and the output folder's one owner, with real processes: the CLI as a
subprocess in a process group of its own (so that a signal to the group reaches it and its Ray
processes, as from `timeout`, a terminal or a container stop, and nothing else), real Ray, a
real sqlite MLflow store. After a signal: the conventional exit status (128 + the signal), one
line on stderr, the MLflow run read back as FAILED, the checkpoint kept and resumable, and no
process of the run left (by pid, and by what holds files of its Ray session)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from fedcl import tracking
from fedcl.errors import FedclError
from tests.conftest import alive, ray_session_processes, run_fedcl, wait_until_gone
from tests.test_e2e import ray_env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.e2e

SMALL = ("--clients", "3", "--batch-size", "64", "--eval-samples-per-task", "200",
         "--round-timeout-s", "120", "--experiment", "signals")
DEADLINE_S = 300.0  # for a state of the run to show up on a loaded machine


class Run:
    """``fedcl simulate ARGS`` in a session (and process group) of its own, its output read
    as it comes, and every process it starts remembered (psutil, by pid and start time)."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str) -> None:
        self.out = cwd / "out"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedcl.cli", "simulate", *args],
            cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.seen: list[psutil.Process] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                         for stream, into in ((self.proc.stdout, self.lines),
                                              (self.proc.stderr, self.errors))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            into.append(line.rstrip("\n"))

    def look(self) -> list[psutil.Process]:
        """The run's processes now (remembered in :attr:`seen`)."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        self.seen += [p for p in procs if p not in self.seen]
        return procs

    def printed(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for(self, what: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, f"fedcl ended early: {self.errors}"
            assert time.monotonic() < deadline, f"timed out; output so far: {self.lines}"
            self.look()
            time.sleep(0.05)

    def send(self, sig: int, group: bool = True) -> None:
        self.look()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 120) -> tuple[int, list[str]]:
        """(exit status, stderr lines) once the command ended."""
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(10)
        return code, self.errors

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        for proc in alive(self.seen):
            proc.kill()


@pytest.fixture
def start(tmp_path: Path, ray_env: dict) -> Iterator[Callable[..., Run]]:  # noqa: F811
    runs: list[Run] = []

    def start_run(*args: str) -> Run:
        runs.append(Run(tmp_path, ray_env, *args))
        return runs[-1]

    yield start_run
    for run in runs:
        run.stop()


def mlflow_runs(tmp_path: Path) -> list[dict]:
    if not (tmp_path / "mlflow.db").exists():
        return []
    try:
        return tracking.fetch_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "signals")
    except FedclError:  # no experiment yet
        return []


def assert_nothing_left(run: Run, ray_tmp: str) -> None:
    """No process the run started, and no process of its Ray sessions, is alive."""
    assert wait_until_gone(run.seen, 10) == []
    assert ray_session_processes(ray_tmp) == []


RESUME = "; `fedcl simulate --resume out` continues it"  # the runs' --output is "out"


def test_timeout_sigterm_to_the_group_mid_round_then_resume(tmp_path: Path, start,
                                                           ray_env: dict) -> None:  # noqa: F811
    """`timeout` sends SIGTERM to the whole process group, Ray's processes included: the run
    ends with 143 and one line, FAILED in MLflow, nothing left running; --resume finishes
    it in the same MLflow run."""
    run = start(*SMALL, "--tasks", "2", "--rounds-per-task", "3", "--output", "out")
    run.wait_for(lambda: run.printed("task 0 of 0-1  round 1/3"))
    run.send(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143, err
    assert err == ["fedcl: interrupted by SIGTERM; the MLflow run is marked FAILED"
                   + RESUME]
    [failed] = mlflow_runs(tmp_path)
    assert failed["status"] == "FAILED"
    assert failed["tags"]["fedcl.error"] == "interrupted by SIGTERM"
    assert (run.out / "checkpoint.pt").is_file() and not (run.out / "summary.json").exists()
    assert_nothing_left(run, ray_env["RAY_TMPDIR"])

    res = run_fedcl("simulate", "--resume", "out", cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr
    [finished] = mlflow_runs(tmp_path)
    assert finished["run_id"] == failed["run_id"] and finished["status"] == "FINISHED"
    steps = tracking.metric_history(f"sqlite:///{tmp_path / 'mlflow.db'}",
                                    finished["run_id"], "avg_acc")
    assert [step for step, _ in steps] == list(range(1, 7))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_every_termination_signal_ends_a_run_alike(tmp_path: Path, start, ray_env: dict,  # noqa: F811
                                                   sig: signal.Signals) -> None:
    """Ctrl-C in a terminal and a hang-up reach the whole foreground group too."""
    run = start(*SMALL, "--tasks", "2", "--rounds-per-task", "3", "--output", "out")
    run.wait_for(lambda: run.printed("round 1/3"))
    run.send(sig)
    code, err = run.finish()
    assert code == 128 + sig, err
    assert err == [f"fedcl: interrupted by {sig.name}; the MLflow run is marked FAILED"
                   + RESUME]
    assert [r["status"] for r in mlflow_runs(tmp_path)] == ["FAILED"]
    assert (run.out / "checkpoint.pt").is_file()
    assert_nothing_left(run, ray_env["RAY_TMPDIR"])


def _catches(pid: int, *sigs: int) -> bool:
    """Whether process ``pid`` has handlers for ``sigs`` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("SigCgt:")), 16)
    return all(mask >> (sig - 1) & 1 for sig in sigs)


def test_signal_before_ray_starts(tmp_path: Path, start, ray_env: dict) -> None:  # noqa: F811
    run = start(*SMALL, "--tasks", "2", "--output", "out")
    # as soon as fedcl handles the signals: it is still importing and checking its input
    run.wait_for(lambda: _catches(run.proc.pid, signal.SIGTERM, signal.SIGHUP), timeout=120)
    run.send(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143, err
    assert err == ["fedcl: interrupted by SIGTERM before the run started"]
    assert mlflow_runs(tmp_path) == [] and not (run.out / "checkpoint.pt").exists()
    assert_nothing_left(run, ray_env["RAY_TMPDIR"])


def test_signal_while_clients_start(tmp_path: Path, start, ray_env: dict) -> None:  # noqa: F811
    run = start(*SMALL, "--tasks", "2", "--output", "out")

    def ray_up_no_round_yet() -> bool:
        assert not run.printed("round 1/"), "the first round ended before Ray was seen"
        names = []
        for proc in run.look():
            with contextlib.suppress(psutil.Error):
                names.append(proc.name())
        return "raylet" in names

    run.wait_for(ray_up_no_round_yet)
    run.send(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143, err
    # no round ended: nothing to resume; the MLflow run, if it was made yet, is FAILED
    assert err in (["fedcl: interrupted by SIGTERM; the MLflow run is marked FAILED"],
                   ["fedcl: interrupted by SIGTERM before the run started"])
    assert [r["status"] for r in mlflow_runs(tmp_path)] in ([], ["FAILED"])
    assert not (run.out / "checkpoint.pt").exists()
    assert_nothing_left(run, ray_env["RAY_TMPDIR"])


def test_signal_at_the_end(tmp_path: Path, start, ray_env: dict) -> None:  # noqa: F811
    """After the last round: the run either ends FAILED and resumable (the signal came before
    MLflow heard FINISHED) or finished (it came while Ray shut down); the exit status and the
    one line say which, and nothing is left running."""
    run = start(*SMALL, "--tasks", "1", "--rounds-per-task", "2", "--output", "out")
    run.wait_for(lambda: run.printed("round 2/2"))
    run.send(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143, err
    assert_nothing_left(run, ray_env["RAY_TMPDIR"])
    [tracked] = mlflow_runs(tmp_path)
    if err == ["fedcl: interrupted by SIGTERM after the run finished; results in out"]:
        assert tracked["status"] == "FINISHED" and (run.out / "summary.json").is_file()
        return
    assert err == ["fedcl: interrupted by SIGTERM; the MLflow run is marked FAILED"
                   + RESUME]
    assert tracked["status"] == "FAILED" and not (run.out / "summary.json").exists()
    res = run_fedcl("simulate", "--resume", "out", cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr
    assert [r["status"] for r in mlflow_runs(tmp_path)] == ["FINISHED"]


def test_a_live_run_owns_its_output_folder(tmp_path: Path, start, ray_env: dict) -> None:  # noqa: F811
    """--resume (or a new run) on the folder of a run that still goes is refused with one
    line and status 2, and leaves that run alone; SIGTERM to the run's process alone (not
    its group) ends it as usual."""
    run = start(*SMALL, "--tasks", "2", "--rounds-per-task", "20", "--output", "out")
    run.wait_for(lambda: run.printed("round 1/20"))
    before = []  # Ray's services and the clients (Ray may retire an idle worker meanwhile)
    for proc in run.look():
        with contextlib.suppress(psutil.Error):
            if proc.name() in ("raylet", "gcs_server") or "ClientAppActor" in proc.name():
                before.append(proc)
    assert len(before) >= 3
    refused = (f"fedcl: error: out belongs to a run that is still going (pid {run.proc.pid}); "
               f"stop that run or choose another output folder")
    for args in (("--resume", "out"), (*SMALL, "--output", "out")):
        res = run_fedcl("simulate", *args, cwd=tmp_path, env=ray_env)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [refused]
    assert alive(before) == before  # the live run's processes were not touched ...
    run.wait_for(lambda: run.printed("round 3/20"))  # ... and it goes on
    run.send(signal.SIGTERM, group=False)
    code, err = run.finish()
    assert code == 143, err
    assert err == ["fedcl: interrupted by SIGTERM; the MLflow run is marked FAILED"
                   + RESUME]
    assert [r["status"] for r in mlflow_runs(tmp_path)] == ["FAILED"]
    assert_nothing_left(run, ray_env["RAY_TMPDIR"])
