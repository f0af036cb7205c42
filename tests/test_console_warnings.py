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


def test_status_lines_show_without_the_warning_label() -> None:
    """An erasure being carried out is news, not a warning: ``fedcl: erasure: ...``; other
    INFO records of fedcl stay out."""
    from fedcl import STATUS_LOGGER

    stream = io.StringIO()
    display = LiveDisplay(stream, RunClock.since(0.0))
    handler = ConsoleWarnings(display)
    log = logging.getLogger("fedcl")
    log.addHandler(handler)
    try:
        logging.getLogger(STATUS_LOGGER).info("erasure: %s (%s)", "client 1 after task 0", "ssd")
        log.info("an info line stays out")
        logging.getLogger("fedcl.other").info("and so does this one")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == "fedcl: erasure: client 1 after task 0 (ssd)\n"


def test_a_round_line_names_a_long_task_end() -> None:
    """A round's time includes its task end (the strategy's and the erasures due then): the
    line says how much of it that was, from 1 s on."""
    from fedcl.config import Config
    from fedcl.results import RoundRecord

    stream = io.StringIO()
    display = LiveDisplay(stream, RunClock.since(0.0))
    display.on_start(Config(tasks=2, rounds_per_task=2, clients=4), 4, "r", "mlruns")

    def record(seconds: float, phases: dict[str, float]) -> RoundRecord:
        return RoundRecord(task=0, round=2, task_round=2, acc_per_task=[0.5, 0.0],
                           avg_acc=0.5, min_acc=None, wc_acc=0.5, train_loss=None, clients=4,
                           failures=0, seconds=seconds, phases=phases)

    display.on_round(record(165.04, {"clients": 3.0, "end_task": 106.24}))
    display.on_round(record(4.0, {"clients": 3.0, "end_task": 0.4}))
    lines = stream.getvalue().splitlines()[1:]
    assert "165.0s (task end 106.2s)  run" in lines[0], lines[0]
    assert "4.0s  run" in lines[1] and "task end" not in lines[1], lines[1]
