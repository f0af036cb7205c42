"""fedcl: federated continual learning on Flower."""

import logging as _logging
import time as _time

#: ``time.monotonic()`` when this package was first imported: the earliest mark of a fedcl
#: program inside its process (:func:`fedcl.run_clock.RunClock.from_process_start`)
IMPORTED_AT = _time.monotonic()

#: The logger of fedcl's status lines (an erasure request being carried out, buffers purged):
#: its INFO records show on ``fedcl simulate``'s live display as ``fedcl: <text>``
#: (:class:`fedcl.progress.ConsoleWarnings`); fedcl's warnings go to the ``fedcl`` logger.
STATUS_LOGGER = "fedcl.status"
_logging.getLogger(STATUS_LOGGER).setLevel(_logging.INFO)


def log_line_kind(record: _logging.LogRecord) -> str | None:
    """What a log record of fedcl's is to whoever shows a run's progress: ``"warning"`` (WARNING
    and above), ``"note"`` (an INFO line of :data:`STATUS_LOGGER`), None (neither)."""
    if record.levelno >= _logging.WARNING:
        return "warning"
    return "note" if record.name == STATUS_LOGGER else None
