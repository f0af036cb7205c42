"""Errors that reach the user as one clear line.

Anything raised as a :class:`FedclError` is printed by the CLI as ``fedcl: error: <message>``
with a non-zero exit status and no traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal


def one_line(text: str) -> str:
    """``text`` on one line: control characters and line separators (which a message may echo
    from the user's input: a value of ``"\\n"``) written as Python escapes."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class FedclError(Exception):
    """A problem the user can fix: bad input, missing files, a run that cannot go on. Its
    message is kept on one line (:func:`one_line`), whatever input it quotes."""

    exit_code = 1

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0]),)
        super().__init__(*args)


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
