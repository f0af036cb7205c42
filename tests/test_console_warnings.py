"""fedcl's warnings during `fedcl simulate` reach the console (one line each), not only
flower.log, where the process's stderr goes while a simulation runs."""

from __future__ import annotations

import io
import logging

from fedcl.progress import ConsoleWarnings, LiveDisplay
from fedcl.run_clock import RunClock


def test_a_fedcl_warning_is_one_console_line_and_info_is_not() -> None:
    stream = io.StringIO()  # not a terminal: no live bar, lines as they come
    display = LiveDisplay(stream, RunClock.since(0.0))
    handler = ConsoleWarnings(display)
    log = logging.getLogger("fedcl")
    log.addHandler(handler)
    try:
        log.warning("FedEWC: after task %d the penalty's largest curvature ...", 3)
        log.info("an info line stays out")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == (
        "fedcl: warning: FedEWC: after task 3 the penalty's largest curvature ...\n")


def test_a_warning_after_the_reader_has_gone_does_not_raise() -> None:
    stream = io.StringIO()
    display = LiveDisplay(stream, RunClock.since(0.0))
    stream.close()  # as `fedcl simulate ... | head` once head has exited
    handler = ConsoleWarnings(display)
    record = logging.LogRecord("fedcl", logging.WARNING, __file__, 1, "late", None, None)
    handler.emit(record)
    assert display.gone
