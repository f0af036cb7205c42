"""A termination signal in the instants between one phase of ``fedcl simulate`` and the next
(after the handlers are installed but before the checks' ``try``; after the output folder is
claimed but before the simulation's own handling starts) ends the command like a signal during
the checks: ``fedcl: interrupted by SIG... before the run started``, exit status 128 + the
signal, nothing of a run made. Real signals, sent by this process to itself at each point;
``fedcl.cli.main`` runs in this process, the simulation replaced by a stub that fails the test
(a signal that went unnoticed would otherwise start Ray)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedcl import progress, simulation
from fedcl.run_clock import RunClock
from tests.test_input_checks import RunStarted, _simulate


@pytest.fixture
def own_handlers() -> Iterator[None]:
    """This process's handlers for the termination signals, put back after the test."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in sigs}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _signalling(original: Callable[..., Any], sig: int) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), sig)  # the handler runs at the next instruction of this thread
        return original(*args, **kwargs)
    return wrapped


POINTS = {
    # handlers installed, the checks not begun
    "before-the-checks": (RunClock, "from_process_start"),
    # the output folder claimed, the live display being made
    "after-the-claim": (progress.LiveDisplay, "__init__"),
    # inside fedcl.simulation.simulate, before the run's own handling of signals
    "simulate-entered": (simulation, "default_run_name"),
}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["TERM", "HUP", "INT"])
@pytest.mark.parametrize("point", list(POINTS))
def test_a_signal_between_phases_ends_before_the_run_started(
        point: str, sig: int, tmp_path: Path, own_handlers: None,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*args: object, **kwargs: object) -> dict:
        raise RunStarted
    monkeypatch.setattr(simulation, "_run", started)
    owner, name = POINTS[point]
    original = getattr(owner, name)
    if isinstance(owner, type) and isinstance(owner.__dict__[name], classmethod):
        original = owner.__dict__[name].__func__
        monkeypatch.setattr(owner, name, classmethod(_signalling(original, sig)))
    else:
        monkeypatch.setattr(owner, name, _signalling(original, sig))
    result = _simulate(["--clients", "3", "--tasks", "2", "--output", "out"], tmp_path, capsys,
                       monkeypatch)
    assert result.returncode == 128 + sig, result.stderr
    assert result.stderr.splitlines() == [
        f"fedcl: interrupted by {signal.Signals(sig).name} before the run started"]
    assert result.stdout == ""
    made = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    # at most the folder and its lock: no checkpoint, no MLflow store, no log
    assert made <= {"out", "out/fedcl.lock"}, made


def test_a_signal_before_a_resumed_run_takes_over_says_how_to_go_on(
        tmp_path: Path, own_handlers: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--resume``: stopped before the checkpoint is read (or the folder claimed), the run
    is where it was, and the line says so."""
    def started(*args: object, **kwargs: object) -> dict:
        raise RunStarted
    monkeypatch.setattr(simulation, "_run", started)
    original = RunClock.__dict__["from_process_start"].__func__
    monkeypatch.setattr(RunClock, "from_process_start",
                        classmethod(_signalling(original, signal.SIGTERM)))
    result = _simulate(["--resume", "runs/one"], tmp_path, capsys, monkeypatch)
    assert result.returncode == 143, result.stderr
    assert result.stderr.splitlines() == [
        "fedcl: interrupted by SIGTERM before the run resumed; `fedcl simulate --resume "
        "runs/one` continues it"]
    assert list(tmp_path.iterdir()) == []
