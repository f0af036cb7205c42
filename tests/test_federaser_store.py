"""FedEraser keeps only what a request still to come can use: no round after the last request's
point is stored, an erased client's stored models go once the checkpoint holds its request, the
whole store goes after the last request, and summary.json's ``unlearning_storage`` counts the
bytes."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedcl import protocol
from fedcl.config import Config
from fedcl.erasure import parse_schedule
from fedcl.strategy import ContinualStrategy, RoundInfo
from strategies.unlearning.federaser import FedEraser, FedEraserParams

ROUNDS = 2  # per task


def federaser(tmp_path: Path, schedule: str) -> FedEraser:
    method = FedEraser(FedEraserParams(), tmp_path)
    assert method.check_requests(Config(rounds_per_task=ROUNDS), None,  # type: ignore[arg-type]
                                 parse_schedule(schedule)) == []
    return method


def record(method: FedEraser, recorder: ContinualStrategy, task: int, task_round: int) -> None:
    """What the recorder stores of one round whose clients 0, 1 and 2 replied (their stored
    models written as the recorder writes them)."""
    info = RoundInfo(task, task_round, ROUNDS, task * ROUNDS + task_round)
    recorder._round = (info, ArrayRecord({"w": torch.zeros(1000)}))  # type: ignore[attr-defined]
    recorder._record([])  # type: ignore[attr-defined]
    path = method.store / f"round_{info.round:06d}.pt"
    if path.exists():  # the clients' models, as if they had replied
        before = path.stat().st_size
        stored = torch.load(path, weights_only=False)
        stored["clients"] = {pid: {"state": {"w": torch.full((1000,), float(pid))},
                                   protocol.NUM_EXAMPLES: 10.0, protocol.UNIT_WEIGHT: 1.0}
                             for pid in (0, 1, 2)}
        torch.save(stored, path)
        method.use.bytes_stored += path.stat().st_size - before


def stored(method: FedEraser) -> dict[int, list[int]]:
    return {int(p.stem.split("_")[1]): sorted(torch.load(p, weights_only=False)["clients"])
            for p in method.stored_rounds(10**9)}


def test_rounds_after_the_last_request_are_not_stored_and_erased_clients_are_pruned(
        tmp_path: Path) -> None:
    # client 1 leaves after task 0; class 3 is erased before round 2 of task 2
    method = federaser(tmp_path, "client=1,after-task=0; class=3,task=2,round=2")
    assert method.last_point() == (2, 2)
    recorder = method.wrap(ContinualStrategy())
    for task, task_round in ((0, 1), (0, 2), (1, 1), (1, 2), (2, 1)):
        record(method, recorder, task, task_round)
    assert stored(method) == {r: [0, 1, 2] for r in (1, 2, 3, 4, 5)}
    record(method, recorder, 2, 2)  # at the last request's point: no request can use it
    assert 6 not in stored(method)
    written = method.use.bytes_stored
    assert written == sum(p.stat().st_size for p in method.stored_rounds(10**9))

    method.prune(0)  # the checkpoint holds no request yet: nothing goes
    assert stored(method) == {r: [0, 1, 2] for r in (1, 2, 3, 4, 5)}
    method.prune(1)  # ... now client 1's request: its stored models go from every round
    assert stored(method) == {r: [0, 2] for r in (1, 2, 3, 4, 5)}
    kept = sum(p.stat().st_size for p in method.stored_rounds(10**9))
    assert method.use.bytes_pruned == written - kept > 5 * 1000 * 4  # five float32 models
    method.prune(1)  # once only
    assert method.use.bytes_pruned == written - kept
    method.prune(2)  # the last request ran: the whole store goes
    assert not method.store.exists()
    assert method.storage() == {"bytes_stored": written, "bytes_pruned": written,
                                "rounds_stored": 5, "rounds_not_stored": 1, "bytes_kept": 0}


def test_no_request_stores_nothing_and_an_unknown_schedule_everything(tmp_path: Path) -> None:
    method = federaser(tmp_path / "none", "")
    recorder = method.wrap(ContinualStrategy())
    record(method, recorder, 0, 1)
    assert stored(method) == {} and method.use.rounds_not_stored == 1
    unknown = FedEraser(FedEraserParams(), tmp_path / "unknown")  # check_requests not called
    recorder = unknown.wrap(ContinualStrategy())
    record(unknown, recorder, 0, 1)
    assert stored(unknown) == {1: [0, 1, 2]}


def test_the_counts_survive_a_resume(tmp_path: Path) -> None:
    method = federaser(tmp_path, "client=1,after-task=0; client=2,after-task=1")
    recorder = method.wrap(ContinualStrategy())
    for task_round in (1, 2):
        record(method, recorder, 0, task_round)
    method.prune(1)
    state = method.state_dict()
    again = federaser(tmp_path, "client=1,after-task=0; client=2,after-task=1")
    recorder = again.wrap(ContinualStrategy())  # wrapped before the state is loaded, as a
    again.load_state_dict(state)  # resumed run does
    record(again, recorder, 1, 1)
    assert again.use.rounds_stored == 3 and again.use.bytes_pruned == method.use.bytes_pruned
    again.prune(1)  # done already before the resume
    assert stored(again) == {1: [0, 2], 2: [0, 2], 3: [0, 1, 2]}
