"""The run's clock starts with the fedcl program, also when a shell exec'd it late."""

from __future__ import annotations

import time

import pytest

import fedcl
from fedcl import run_clock
from fedcl.run_clock import EXEC_GAP_S, RunClock


def test_a_process_that_ran_a_shell_first_counts_from_fedcls_import(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported 2 s ago: a process 3 s old counts from its start (3 s); one 120 s old (a
    shell that ran a 118 s setup, then exec'd fedcl) counts from the import (2 s)."""
    monkeypatch.setattr(fedcl, "IMPORTED_AT", time.monotonic() - 2.0)
    monkeypatch.setattr(run_clock, "process_age_s", lambda: 3.0)
    assert RunClock.from_process_start().elapsed() == pytest.approx(3.0, abs=0.5)
    monkeypatch.setattr(run_clock, "process_age_s", lambda: 120.0)
    assert RunClock.from_process_start().elapsed() == pytest.approx(2.0, abs=0.5)
    monkeypatch.setattr(run_clock, "process_age_s", lambda: 2.0 + EXEC_GAP_S - 0.1)
    assert RunClock.from_process_start().elapsed() == pytest.approx(1.9 + EXEC_GAP_S, abs=0.5)
