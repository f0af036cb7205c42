"""Errors that reach the user as one clear line.

Anything raised as a :class:`FedclError` is printed by the CLI as ``fedcl: error: <message>``
with a non-zero exit status and no traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal


class FedclError(Exception):
    """A problem the user can fix: bad input, missing files, a run that cannot go on."""

    exit_code = 1


class ConfigError(FedclError):
    """An invalid setting in a config file, a flag or the Flower run config."""

    exit_code = 2


class DataError(FedclError):
    """A dataset that cannot be found, read or split as asked."""

    exit_code = 2


class RunAborted(FedclError):
    """The run stopped before its end: too few clients replied, a backend failed, or Ctrl-C."""

    exit_code = 1


class RunCancelled(RunAborted):
    """The driver asked the ServerApp to stop (a backend failure or Ctrl-C came first)."""


class OutputInUse(FedclError):
    """The output folder belongs to another run that is still alive."""

    exit_code = 2


class Terminated(BaseException):
    """A termination signal (SIGINT, SIGTERM, SIGHUP) ended the command. Not an ``Exception``,
    so that no ``except Exception`` on the way swallows it; the CLI prints ``fedcl: <message>``
    and exits with 128 + the signal's number, as a shell reports a process the signal
    killed."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum, detail)
        self.signum = signum
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return f"interrupted by {self.signal_name}{self.detail}"
