"""The processes of a run: who owns its output folder, and what it started.

**One live owner per output folder.** ``fedcl simulate`` holds an exclusive ``flock`` on
``<output>/fedcl.lock`` for as long as it lives. The kernel releases it when the process ends,
however it ends (``kill -9`` included), so the lock is never stale; a second run on the folder
(``--resume`` or a fresh run with the same ``--output``) while the owner lives is refused. The
descriptor is not inherited by the processes the owner starts (Python's descriptors are
close-on-exec), so Ray's processes do not keep the folder locked.

**What the owner started.** The lock file also holds the owner's record (JSON): its pid, its
Ray session's folder, and the pids (with start times, against pid reuse) of the processes it
started. Ray's agents and workers rename themselves (``ray::RuntimeEnvAgent``,
``ray::ClientAppActor``), so their command lines no longer name the session; a killed
driver's leftovers are found instead by what they hold: every Ray process of a session keeps
files open under the session's folder (its logs). Whoever owns the folder next stops the
recorded processes and every process holding the session's files, with the children of both.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from fedcl.errors import FedclError, OutputInUse

LOCK_FILE = "fedcl.lock"

#: Seconds to wait for killed processes to be gone.
KILL_WAIT_S = 10.0

#: Start times within this many seconds are the same process (psutil rounds them).
SAME_START_S = 0.05

#: Seconds between two looks at the processes a run started (:meth:`OutputOwner.note_processes`).
NOTE_EVERY_S = 1.0


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _recorded(pid: int, started: float) -> psutil.Process | None:
    """The process ``pid`` if it is still the one that started at ``started``."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) <= SAME_START_S and _alive(proc):
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        pass
    return None


def session_processes(session_dir: str | os.PathLike[str]) -> list[psutil.Process]:
    """Live processes (other than this one) of the Ray session whose folder is
    ``session_dir``: those that hold a file open under it (their logs) or name it on their
    command line (Ray's services), with all their children."""
    roots = {str(session_dir).rstrip("/"), os.path.realpath(session_dir)}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            mentions = any(root in part for part in proc.info["cmdline"] or ()
                           for root in roots)
            if mentions or any(f.path.startswith(root + "/") for f in proc.open_files()
                               for root in roots):
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return _with_children(found.values())


def _with_children(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    found = {p.pid: p for p in procs}
    for proc in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    return [p for p in found.values() if p.pid != os.getpid() and _alive(p)]


def kill(procs: Iterable[psutil.Process], wait_s: float = KILL_WAIT_S) -> int:
    """SIGKILL ``procs`` and wait (up to ``wait_s``) until they are gone; returns how many
    were signalled."""
    procs = [p for p in procs if p.pid != os.getpid()]
    sent = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(signal.SIGKILL)
            sent.append(proc)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_alive(p) for p in sent):
        with contextlib.suppress(psutil.Error, ChildProcessError):
            psutil.wait_procs([p for p in sent if _alive(p)], timeout=0.2)
    return len(sent)


def ray_session_dir() -> str | None:
    """The folder of the Ray session this process started, while it runs; None when there is
    none or when the process joined a cluster it did not start (``ray_address``): that
    cluster's processes are never the run's to stop."""
    try:
        import ray

        if ray.is_initialized():
            node = ray._private.worker.global_worker.node
            if not getattr(node, "ray_init_cluster", True):  # joined, not started here
                return None
            return str(node.get_session_dir_path())
    except Exception:
        pass
    return None


def descendants() -> dict[int, psutil.Process]:
    """This process's live descendants by pid."""
    with contextlib.suppress(psutil.Error):
        return {p.pid: p for p in psutil.Process().children(recursive=True) if _alive(p)}
    return {}


class OutputOwner:
    """This process's ownership of a run's output folder (see the module's docstring)."""

    def __init__(self, folder: Path, fd: int, previous: dict[str, Any]) -> None:
        self.folder = folder
        self.previous = previous  # the record of the last owner (dead by now), if any
        self._fd: int | None = fd
        self._record: dict[str, Any] = {"pid": os.getpid(),
                                        "started": psutil.Process().create_time()}
        self._before: set[int] = set(descendants())  # not ours to stop
        self._noted_at = 0.0
        self._write()

    @classmethod
    def claim(cls, folder: str | os.PathLike[str]) -> OutputOwner:
        """Own ``folder`` (made if missing), or :class:`~fedcl.errors.OutputInUse` when a live
        run owns it."""
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise FedclError(f"cannot use output folder {path}: {err.strerror or err}"
                             ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read(fd)
            os.close(fd)
            raise in_use(path, record) from None
        except OSError as err:
            os.close(fd)
            raise FedclError(f"cannot lock {path / LOCK_FILE}: {err.strerror or err}"
                             ) from None
        return cls(path, fd, _read(fd))

    @property
    def session_dir(self) -> str | None:
        return self._record.get("ray_session_dir")

    def note_session(self, session_dir: str | None) -> None:
        """Record the run's Ray session (once Ray runs)."""
        if session_dir:
            self._record["ray_session_dir"] = session_dir
            self.note_processes(force=True)

    def started(self) -> list[psutil.Process]:
        """The live processes this run started (this process's descendants that were not
        there when it claimed the folder)."""
        return [p for pid, p in descendants().items() if pid not in self._before]

    def note_processes(self, force: bool = False) -> None:
        """Record the processes the run started so far (at most every few seconds)."""
        now = time.monotonic()
        if not force and now - self._noted_at < NOTE_EVERY_S:
            return
        self._noted_at = now
        procs = []
        for proc in self.started():
            with contextlib.suppress(psutil.Error):
                procs.append([proc.pid, proc.create_time()])
        known = {pid for pid, _ in self._record.get("processes", [])}
        if {pid for pid, _ in procs} - known:
            kept = [p for p in self._record.get("processes", []) if _recorded(*p)]
            self._record["processes"] = kept + [p for p in procs if p[0] not in known]
            self._write()

    def stop_leftovers(self, sessions: Iterable[str | None] = ()) -> int:
        """Stop what the folder's previous owner (dead, since this one holds the lock) left
        running: its recorded processes that still live and every process of its Ray
        session (and of ``sessions``, e.g. the one a checkpoint names). Returns how many were
        stopped."""
        return kill(_leftovers(self.previous, sessions))

    def stop_started(self) -> int:
        """Stop every process this run started that still lives: its descendants, the
        processes it recorded (a worker whose raylet died is no longer a descendant) and the
        processes of its Ray session."""
        found = {p.pid: p for p in self.started()}
        for proc in _leftovers(self._record):
            found.setdefault(proc.pid, proc)
        return kill(found.values())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with the descriptor
            self._fd = None

    def _write(self) -> None:
        if self._fd is None:
            return
        data = json.dumps(self._record).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)


def _leftovers(record: dict[str, Any], sessions: Iterable[str | None] = ()
               ) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for entry in record.get("processes", []):
        with contextlib.suppress(TypeError, ValueError):
            proc = _recorded(int(entry[0]), float(entry[1]))
            if proc is not None:
                found[proc.pid] = proc
    for session in {record.get("ray_session_dir"), *sessions}:
        if session:
            for proc in session_processes(session):
                found.setdefault(proc.pid, proc)
    return _with_children(found.values())


def in_use(folder: str | os.PathLike[str], record: dict[str, Any]) -> OutputInUse:
    """The one-line refusal of ``folder``, owned by the live run that ``record`` describes."""
    return OutputInUse(f"{folder} belongs to a run that is still going (pid "
                       f"{record.get('pid', 'unknown')}); stop that run or choose another "
                       "output folder")


def live_owner(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of the live run that owns ``folder`` (its ``pid``, ...), or None when no
    live process holds its lock. Makes nothing: a folder without a lock file has no owner."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held (BlockingIOError), or a lock this file system refuses
        record = _read(fd) or {"pid": "unknown"}
        # this process's own claim (the ServerApp checks the folder of the run it is in)
        return None if record.get("pid") == os.getpid() else record
    finally:
        os.close(fd)  # closing drops a lock taken here
    return None


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 1 << 20, 0)
        record = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
