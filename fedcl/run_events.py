"""A run's progress as lines in its log, for whoever follows it from afar (``fedcl submit``).

Under ``flwr run`` the ServerApp runs on the SuperLink's host, and all that reaches the one
who submitted it is the run's log (Flower mirrors the ServerApp's stdout and stderr to the
SuperLink, which streams it through its Control API) and the run's final status. So the
ServerApp prints one line per event, ``fedcl-event <JSON>``:

``start``
    the run began training: its config, rounds in all, MLflow run id and tracking URI, and
    the run's time so far (``run_elapsed_s``: its start-up, :mod:`fedcl.run_clock`)
``round``
    a round ended: its :class:`~fedcl.results.RoundRecord`
``erasure``
    an erasure request was carried out: its entry in summary.json
``warning``
    something fedcl logged at WARNING or above (a client left, a request it cannot act on)
``note``
    a status line of fedcl's (:data:`fedcl.STATUS_LOGGER`: an erasure request being carried
    out)
``end``
    the run finished: the summary's scores and where its outputs and MLflow run are
``failed``
    the run stopped: fedcl's one-line error

:func:`parse` reads such a line back. Paths in ``end`` are absolute on the SuperLink's host.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, TextIO

from fedcl import log_line_kind
from fedcl.config import Config
from fedcl.results import RoundRecord
from fedcl.run_clock import RunClock

PREFIX = "fedcl-event "

#: summary.json's keys left out of the ``end`` event: per-round and per-client detail that
#: summary.json on the SuperLink's host holds anyway
BULKY_KEYS = ("rounds", "config", "client_state", "strategy_state", "erasure_view")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def format_event(kind: str, payload: dict[str, Any]) -> str:
    """One event as one line (no newline in it: JSON escapes those in strings)."""
    return PREFIX + json.dumps({"event": kind, **_json_safe(payload)}, separators=(",", ":"),
                               default=str)


def parse(line: str) -> tuple[str, dict[str, Any]] | None:
    """``(kind, payload)`` of an event line, None for any other line (Flower's own)."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        data = json.loads(line[start + len(PREFIX):])
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return None
    return data.pop("event"), data


def absolute_uri(uri: str) -> str:
    """A local MLflow store's URI with its path made absolute (``sqlite:///mlflow.db`` ->
    ``sqlite:////srv/fedcl/mlflow.db``): it names the place on this host, whatever the
    reader's working folder."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            path = uri[len(scheme):]
            if path and not path.startswith("/") and path != ":memory:":
                return scheme + os.path.abspath(path)
    if "://" not in uri and uri:  # a bare folder: MLflow's file store
        return os.path.abspath(uri)
    return uri


class EventPrinter:
    """A :class:`~fedcl.server_app.RunObserver` that prints the events to ``stream`` (the
    ServerApp's stdout, which Flower sends to the SuperLink)."""

    def __init__(self, stream: TextIO | None = None, clock: RunClock | None = None) -> None:
        self.stream = stream
        self.clock = clock  # the run's (its start event says how far it has gone)
        self.experiment = ""

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        stream = self.stream or sys.stdout
        stream.write(format_event(kind, payload) + "\n")
        stream.flush()

    def on_start(self, config: Config, total_rounds: int, run_id: str | None,
                 tracking_uri: str) -> None:
        self.experiment = config.experiment
        self.emit("start", {"config": config.to_dict(), "total_rounds": total_rounds,
                            "mlflow_run_id": run_id,
                            "mlflow_tracking_uri": absolute_uri(tracking_uri),
                            **({} if self.clock is None
                               else {"run_elapsed_s": self.clock.elapsed()})})

    def on_round(self, record: RoundRecord) -> None:
        self.emit("round", record.to_dict())

    def on_erasure(self, entry: dict[str, Any]) -> None:
        self.emit("erasure", entry)

    def on_end(self, summary: dict[str, Any]) -> None:
        payload = {k: v for k, v in summary.items() if k not in BULKY_KEYS}
        payload["output_dir"] = os.path.abspath(summary["output_dir"])
        if summary.get("mlflow_outbox"):
            payload["mlflow_outbox"] = os.path.abspath(summary["mlflow_outbox"])
        payload["mlflow_tracking_uri"] = absolute_uri(summary.get("mlflow_tracking_uri") or "")
        payload["experiment"] = self.experiment or summary.get("config", {}).get("experiment")
        self.emit("end", payload)

    def on_failed(self, message: str) -> None:
        self.emit("failed", {"error": message})


class WarningEvents(logging.Handler):
    """Sends fedcl's log records of WARNING and above as ``warning`` events, and its status
    lines (:data:`fedcl.STATUS_LOGGER`) as ``note`` events."""

    def __init__(self, printer: EventPrinter) -> None:
        super().__init__(logging.INFO)
        self.printer = printer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = log_line_kind(record)
            if kind is not None:
                self.printer.emit(kind, {"message": record.getMessage()})
        except Exception:  # a log line is never worth the run
            self.handleError(record)


__all__ = ["PREFIX", "EventPrinter", "WarningEvents", "absolute_uri", "format_event", "parse"]
