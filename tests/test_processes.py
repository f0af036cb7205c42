"""The pieces that end a run cleanly, without Ray: the output folder's one live owner (a lock
the kernel frees when its holder dies), finding a session's processes by the files they hold
(not by their command lines, which Ray's processes rewrite), and the termination signals'
handlers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fedcl import cli, processes, run_setup
from fedcl.config import Config
from fedcl.errors import OutputInUse, Terminated
from fedcl.processes import OutputOwner
from fedcl.run_setup import check_output
from fedcl.signals import TerminationSignals
from tests.conftest import ROOT, alive, wait_until_gone

HOLDER = textwrap.dedent("""
    import subprocess, sys, time
    from fedcl.processes import OutputOwner
    owner = OutputOwner.claim(sys.argv[1])
    child = subprocess.Popen(["sleep", "300"])  # a process the run started
    owner.note_processes(force=True)
    print(child.pid, flush=True)
    time.sleep(300)
""")


def _hold(folder: Path) -> tuple[subprocess.Popen[str], psutil.Process]:
    """A process that owns ``folder`` and has started a child; (process, child)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    return proc, psutil.Process(int(proc.stdout.readline()))


def test_a_folder_a_live_run_owns_is_refused_by_the_output_check(tmp_path: Path) -> None:
    """Before any claim, a new run (or a resume) on a folder whose lock a live run holds is
    told so, even where the folder also holds that run's checkpoint; the owner itself (its
    ServerApp checks the folder it runs in) and folders without a live holder pass."""
    out = tmp_path / "out"
    assert processes.live_owner(out) is None  # no folder, no lock: nothing made
    assert not out.exists()
    holder, child = _hold(out)
    try:
        (out / "checkpoint.pt").write_bytes(b"")
        assert processes.live_owner(out)["pid"] == holder.pid
        for resume in (False, True):
            with pytest.raises(OutputInUse) as refused:
                check_output(out, resume=resume)
            assert str(refused.value) == (f"{out} belongs to a run that is still going (pid "
                                          f"{holder.pid}); stop that run or choose another "
                                          "output folder")
        holder.kill()
        holder.wait(30)
        assert processes.live_owner(out) is None
        check_output(out, resume=True)  # a killed run's folder is resumed
        owner = OutputOwner.claim(out)
        assert processes.live_owner(out) is None  # this process's own claim
        assert owner.stop_leftovers() == 1
        owner.release()
    finally:
        holder.kill()
        child.kill()


def test_a_live_owner_keeps_the_folder_and_a_killed_one_frees_it(tmp_path: Path) -> None:
    holder, child = _hold(tmp_path / "out")
    try:
        with pytest.raises(OutputInUse) as refused:
            OutputOwner.claim(tmp_path / "out")
        assert refused.value.exit_code == 2
        assert str(refused.value) == (f"{tmp_path / 'out'} belongs to a run that is still "
                                      f"going (pid {holder.pid}); stop that run or choose "
                                      f"another output folder")
        holder.kill()  # kill -9: no handler runs, the kernel frees the lock
        holder.wait(30)
        assert alive([child]) == [child]  # the killed owner's child lives on ...
        owner = OutputOwner.claim(tmp_path / "out")
        assert owner.previous["pid"] == holder.pid
        assert owner.stop_leftovers() == 1  # ... until the next owner stops it
        assert wait_until_gone([child], 10) == []
        owner.release()
        OutputOwner.claim(tmp_path / "out").release()  # released: free again
    finally:
        holder.kill()
        child.kill()


def test_a_session_s_processes_are_found_by_the_files_they_hold(tmp_path: Path) -> None:
    """A process that renamed itself (as Ray's agents and workers do: ``ray::...``) and does
    not work in the session's folder is still found by the log it holds open there, with its
    children; a process of another session is not."""
    session, other = tmp_path / "session_1", tmp_path / "session_2"
    for folder in (session, other):
        (folder / "logs").mkdir(parents=True)
    script = "sleep 300 & exec -a ray::FakeAgent sleep 300"
    with (session / "logs" / "agent.out").open("w") as log:
        agent = subprocess.Popen(["bash", "-c", script], stdout=log, cwd="/")
    with (other / "logs" / "agent.out").open("w") as log:
        stranger = subprocess.Popen(["sleep", "300"], stdout=log, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while "ray::FakeAgent" not in " ".join(psutil.Process(agent.pid).cmdline()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert str(session) not in " ".join(psutil.Process(agent.pid).cmdline())
        found = processes.session_processes(session)
        assert {p.pid for p in found} == {agent.pid, *(c.pid for c in
                                                       psutil.Process(agent.pid).children())}
        assert processes.kill(found) == 2
        assert alive(found) == []
        assert stranger.poll() is None
    finally:
        for proc in (agent, stranger):
            proc.kill()
            proc.wait(30)


@pytest.fixture
def signals():  # type: ignore[no-untyped-def]
    caught = TerminationSignals().install()
    yield caught
    caught.restore()


def test_the_first_signal_raises_and_repeats_do_not(signals: TerminationSignals) -> None:
    with pytest.raises(Terminated) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in the main thread before this ends
    assert stopped.value.exit_code == 143 and str(stopped.value) == "interrupted by SIGTERM"
    # `timeout` signals its child and then the child's group: the same stop, twice
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert signals.received == signal.SIGTERM and not signals.hurried
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGINT)  # a second request, later: hurry
    time.sleep(0.1)
    assert signals.hurried


def test_held_sections_end_before_the_signal_is_raised(signals: TerminationSignals) -> None:
    done = []
    with pytest.raises(Terminated) as stopped:
        with signals.held():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
            done.append("the section ran to its end")
    assert done and stopped.value.exit_code == 129
    signals.hold()
    os.kill(os.getpid(), signal.SIGINT)  # held for good: recorded only
    time.sleep(0.1)
    assert signals.received == signal.SIGHUP


def test_a_signal_the_process_was_started_ignoring_stays_ignored() -> None:
    """``nohup fedcl simulate ... &``: SIGHUP was ignored when fedcl started, so the run
    outlives its terminal; SIGTERM and SIGINT still end it."""
    saved = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    caught = TerminationSignals()
    try:
        caught.install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == caught._handle
        caught.install()  # again (the CLI takes them over once more): still ignored
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.1)
        assert caught.received is None
        caught.restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        caught.restore()
        signal.signal(signal.SIGHUP, saved)
    # and under the real nohup, in a process of its own
    code = ("import os, signal, time; from fedcl.signals import TerminationSignals; "
            "s = TerminationSignals().install(); os.kill(os.getpid(), signal.SIGHUP); "
            "time.sleep(0.2); print('survived', s.received)")
    res = subprocess.run(["nohup", sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "survived None", res.stderr


def test_a_derived_output_folder_taken_in_the_same_second_moves_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs started together derive the same ``outputs/<strategy>-<scenario>-<second>``: a
    later one takes the next free ``-2``, ``-3``, ... (a finished run's folder and a live
    run's are passed over, untouched); a folder the user named is refused instead."""
    monkeypatch.chdir(tmp_path)
    base = "fedavg-class-il-20261201-000000"
    monkeypatch.setattr(run_setup, "default_run_name",
                        lambda config: config.run_name or base)
    finished = tmp_path / "outputs" / base
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}\n", encoding="utf-8")
    holder, child = _hold(tmp_path / "outputs" / f"{base}-2")
    try:
        config = Config()
        owner = cli._claim_new(config, TerminationSignals())
        assert (config.run_name, config.output) == (f"{base}-3", f"outputs/{base}-3")
        assert sorted(p.name for p in finished.iterdir()) == ["summary.json"]
        owner.release()
        named = Config(output=f"outputs/{base}-2")
        with pytest.raises(OutputInUse):
            cli._claim_new(named, TerminationSignals())
    finally:
        holder.kill()
        child.kill()
