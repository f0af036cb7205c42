"""Errors that reach the user as one clear line.

Anything raised as a :class:`FedclError` is printed by the CLI as ``fedcl: error: <message>``
with a non-zero exit status and no traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
