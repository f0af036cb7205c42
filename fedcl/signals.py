"""Termination signals: SIGINT (Ctrl-C), SIGTERM (``timeout``, batch schedulers, container
stops, CI limits) and SIGHUP (a closed terminal) all end ``fedcl simulate`` the same way.

The first of them raises :class:`~fedcl.errors.Terminated` in the main thread, wherever it is,
except inside :meth:`TerminationSignals.held` sections (a few lines that must not be cut in
half: file descriptors being swapped, the owner file being written), where it is raised as the
section ends. Later signals never raise, so that the stop they started is not cut short
itself: ``timeout`` signals its child and then the child's whole group, so the same stop
arrives twice within microseconds. A repeat that comes a while after the first (a second
Ctrl-C) only sets :attr:`TerminationSignals.hurried`, which tells the stop not to wait for
the run to wind down gracefully.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from fedcl.errors import Terminated

#: The signals that end a run.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: A repeat closer than this to the first signal is the same request seen twice.
REPEAT_AFTER_S = 1.0


class TerminationSignals:
    """The process's handlers for :data:`SIGNALS` (installed from the main thread)."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self.hurried = False  # a later signal asked to stop without waiting
        self._first_at = 0.0
        self._held = 0
        self._pending = False
        self._previous: dict[int, Any] = {}

    def install(self) -> TerminationSignals:
        """Take over the signals (a no-op outside the main thread, where Python cannot). A
        signal the process was started ignoring stays ignored, as POSIX tools do: ``nohup``
        ignores SIGHUP so that the run outlives its terminal, and a shell ignores SIGINT in
        the background jobs of a script."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if sig not in self._previous and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._previous.setdefault(sig, signal.signal(sig, self._handle))
        return self

    def reinstall(self) -> None:
        """Take the signals back from a library that installed its own handlers."""
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers found by :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signum, now
            if self._held:
                self._pending = True
                return
            raise Terminated(signum)
        if now - self._first_at >= REPEAT_AFTER_S:
            self.hurried = True

    @contextmanager
    def held(self) -> Iterator[None]:
        """A section that a signal must not interrupt: the signal is raised as it ends."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._pending:
            self._pending = False
            raise Terminated(self.received or signal.SIGTERM)

    def hold(self) -> None:
        """From now on, signals are only recorded (:attr:`received`), never raised."""
        self._held += 1


@contextmanager
def shielded_children() -> Iterator[None]:
    """Block :data:`SIGNALS` in this thread meanwhile: the processes it starts inherit the
    blocked set (a signal mask survives fork and exec), so a signal to the whole process group
    (``timeout``, Ctrl-C, a closed terminal) leaves them alone and reaches this process only,
    which then stops them in order. Ray does this itself for SIGINT; without it, SIGHUP kills
    Ray's raylet at once and Ray's core then ends the driver (exit status 1) as its object
    store goes away, and SIGTERM makes Ray's workers abort. The process-directed signals
    still reach this process's other threads (the main thread handles them)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
