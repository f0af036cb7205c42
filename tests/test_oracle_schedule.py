"""The retrain oracle replays the original schedule: each round's sampled clients minus the
erased ones, with partial participation too (no redraw from the smaller pool)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ArrayRecord

from fedcl import unlearning_run
from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.erasure import ErasedData
from fedcl.results import RoundRecord
from fedcl.rounds import RoundOutcome, sample_clients
from fedcl.unlearning_run import Erasures


class _Strategy:
    def begin_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        return arrays

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        return arrays


def _record(task: int, task_round: int, round_: int, sampled: list[int]) -> RoundRecord:
    return RoundRecord(task=task, round=round_, task_round=task_round, acc_per_task=[0.0],
                       avg_acc=0.0, min_acc=None, wc_acc=0.0, train_loss=None,
                       clients=len(sampled), failures=0, seconds=0.0, sampled=sampled)


def _oracle_rounds(monkeypatch: pytest.MonkeyPatch, config: Config, records: list[RoundRecord],
                   erased: ErasedData) -> dict[int, list[int]]:
    """The clients each round of the oracle's replay trains (train_round recorded, not run)."""
    seen: dict[int, list[int]] = {}

    def fake_train_round(grid: Any, roster: Any, strategy: Any, cfg: Any, cfg_json: Any,
                         arrays: ArrayRecord, info: Any, pids: list[int], *args: Any,
                         **kwargs: Any) -> RoundOutcome:
        seen[info.round] = list(pids)
        return RoundOutcome(arrays, [], [], 0, None, list(pids))

    monkeypatch.setattr(unlearning_run, "train_round", fake_train_round)
    erasures = Erasures.__new__(Erasures)
    erasures.config, erasures.scenario, erasures.grid = config, build_scenario(config), None
    progress = SimpleNamespace(records=records, task=records[-1].task + 1, task_started=False)
    erasures.retrain(progress, erased, _Strategy(), None, None)  # type: ignore[arg-type]
    return seen


def test_oracle_replays_each_rounds_sample_minus_the_erased_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(clients=10, fraction_train=0.5, tasks=2, rounds_per_task=3, seed=11)
    # the original schedule: 5 of 10 clients each round, drawn from everyone
    original = {r: sample_clients(list(range(10)), 0.5, config.seed, r) for r in range(1, 7)}
    records = [_record((r - 1) // 3, (r - 1) % 3 + 1, r, original[r]) for r in range(1, 7)]
    erased_client = 4
    assert sum(erased_client in s for s in original.values()) >= 2  # it trained in the run
    seen = _oracle_rounds(monkeypatch, config, records, ErasedData(clients=(erased_client,)))
    assert seen == {r: [q for q in s if q != erased_client] for r, s in original.items()}


def test_a_round_that_sampled_only_erased_clients_keeps_the_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients 0..2, one sampled a round: where the original round trained only the erased
    client, the oracle's round trains nobody (the model stays), and no other client is drawn in
    its place."""
    config = Config(clients=3, fraction_train=0.34, tasks=1, rounds_per_task=3, seed=0)
    records = [_record(0, r, r, s) for r, s in ((1, [1]), (2, [2]), (3, [1]))]
    seen = _oracle_rounds(monkeypatch, config, records, ErasedData(clients=(1,)))
    assert seen == {2: [2]}
