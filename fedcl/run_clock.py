"""A run's time, in one set of figures that summary.json, MLflow and the console share.

A run's time is cut at two marks, the first round's start and the last round's end:

``time_startup_s``   from the start of the run to the first round's start: for ``fedcl
                     simulate`` from the start of its process (Python, torch, Flower and Ray
                     imports, the input checks, Ray and the client actors starting, the
                     MLflow run being made); under ``flwr run``, from the ServerApp's start
``time_rounds_s``    the rounds, erasure requests carried out between them included: the sum
                     of ``rounds[].seconds``
``time_shutdown_s``  from the last round's end until the run's results are final: the output
                     files, and for ``fedcl simulate`` Ray's shutdown and the stopping of every
                     process the run started
``wall_time_s``      their sum, the run's whole time

A resumed run adds its sessions: start-up and rounds of the sessions before (from the
checkpoint: what a session did after its last checkpoint is not counted), and the last
session's shutdown. The MLflow run starts at the process's start and ends at the end of the
shutdown, so its duration is ``wall_time_s`` (a resumed run's spans the time between its
sessions too). The live display's clock counts from the same start. What comes after the
figures are taken (the last MLflow requests, the closing table, the interpreter's exit) takes
a fraction of a second.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

import fedcl

#: Longer than Python ever takes to start before it imports fedcl: a process older than that
#: beyond fedcl's import ran another program first (an exec'ing shell)
EXEC_GAP_S = 5.0

#: The keys of the figures, in summary.json and as MLflow metrics.
TIME_KEYS = ("time_startup_s", "time_rounds_s", "time_shutdown_s", "wall_time_s")


def process_age_s() -> float:
    """Seconds since this process started. Linux: the start time the kernel keeps (clock ticks
    since boot, ``/proc/self/stat``) against the boot-time clock, to 10 ms; elsewhere psutil's
    create time (whole seconds of boot time)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            stat = fh.read()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME)
                   - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return max(0.0, time.time() - psutil.Process().create_time())


@dataclass
class RunClock:
    """One session's marks (``time.monotonic()`` seconds) and the sessions before it.

    ``origin``: the session's start; ``origin_unix``: the same moment as Unix time (the MLflow
    run's start). :attr:`rounds_began` and :attr:`rounds_ended` are set by the run."""

    origin: float
    origin_unix: float
    startup_before_s: float = 0.0  # start-up and rounds of the sessions before (resume)
    rounds_before_s: float = 0.0
    rounds_began: float | None = None
    rounds_ended: float | None = None
    ended: float | None = None  # set by :meth:`figures` with ``final``

    @classmethod
    def since(cls, seconds_ago: float = 0.0) -> RunClock:
        """A clock whose session began ``seconds_ago``."""
        now, now_unix = time.monotonic(), time.time()
        return cls(origin=now - seconds_ago, origin_unix=now_unix - seconds_ago)

    @classmethod
    def from_process_start(cls) -> RunClock:
        """A clock whose session began with this process: its age, unless that is more than
        :data:`EXEC_GAP_S` beyond the time since fedcl was first imported; then the process
        ran something else before it became fedcl (``bash -c 'setup && fedcl ...'`` ends
        by exec'ing fedcl in the shell's process) and the clock starts at that import."""
        since_import = time.monotonic() - fedcl.IMPORTED_AT
        age = process_age_s()
        return cls.since(age if age - since_import <= EXEC_GAP_S else since_import)

    def resume_from(self, startup_before_s: float, rounds_before_s: float) -> None:
        self.startup_before_s, self.rounds_before_s = startup_before_s, rounds_before_s

    def elapsed(self) -> float:
        """Seconds since the session began, with the sessions before (the live display)."""
        return self.startup_before_s + self.rounds_before_s + time.monotonic() - self.origin

    def so_far(self, now: float | None = None) -> tuple[float, float]:
        """(start-up, rounds) up to ``now`` (default: now), this session's and the ones
        before; what a checkpoint keeps."""
        now = time.monotonic() if now is None else now
        began = self.rounds_began if self.rounds_began is not None else now
        ended = self.rounds_ended if self.rounds_ended is not None else now
        return (self.startup_before_s + began - self.origin,
                self.rounds_before_s + max(0.0, min(ended, now) - began))

    def figures(self, final: bool = False) -> dict[str, float]:
        """The four figures with the shutdown up to now (:data:`TIME_KEYS`); ``final``: now
        is the run's end (kept for :meth:`end_unix`)."""
        now = time.monotonic()
        if final:
            self.ended = now
        startup, rounds = self.so_far(now)
        ended = self.rounds_ended if self.rounds_ended is not None else now
        shutdown = max(0.0, now - ended)
        return {"time_startup_s": startup, "time_rounds_s": rounds,
                "time_shutdown_s": shutdown, "wall_time_s": startup + rounds + shutdown}

    def start_unix(self) -> float:
        """The session's start as Unix time (the MLflow run's start)."""
        return self.origin_unix

    def end_unix(self) -> float:
        """The run's end (:meth:`figures` with ``final``) as Unix time."""
        end = self.ended if self.ended is not None else time.monotonic()
        return self.origin_unix + end - self.origin


__all__ = ["TIME_KEYS", "RunClock", "process_age_s"]
