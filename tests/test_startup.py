"""Start-up progress: while clients register, the run says how many have, every few seconds."""

from __future__ import annotations

import pytest

from fedcl import rounds
from fedcl.errors import RunAborted


class RegisteringGrid:
    """Node ids that appear a batch per call, as a large federation's register."""

    def __init__(self, batches: list[int]) -> None:
        self.batches = batches
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        n = self.batches[min(self.calls, len(self.batches) - 1)]
        self.calls += 1
        return list(range(n))


def test_wait_for_nodes_reports_registrations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rounds, "STARTUP_REPORT_S", 0.0)
    monkeypatch.setattr(rounds.time, "sleep", lambda s: None)
    lines: list[str] = []
    ids = rounds.wait_for_nodes(RegisteringGrid([0, 400, 900, 1000]), 1000, 60.0, None,
                                progress=lines.append)
    assert len(ids) == 1000
    assert [line.split(" (")[0] for line in lines] == [
        "0 of 1000 clients registered", "400 of 1000 clients registered",
        "900 of 1000 clients registered"]


def test_wait_for_nodes_gives_up_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rounds.time, "sleep", lambda s: None)
    with pytest.raises(RunAborted, match=r"^only 3 of 5 clients connected within 0 s: hint$"):
        rounds.wait_for_nodes(RegisteringGrid([3]), 5, 0.0, None, ": hint")
