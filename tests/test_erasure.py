"""Erasure requests: the text form and the checks made before a run starts."""

from __future__ import annotations

import pytest

from fedcl.erasure import ErasureRequest, parse_erasure, validate_requests
from fedcl.errors import ConfigError
from fedcl.run_setup import setup_run

RUN = {"clients": 10, "tasks": 5, "rounds_per_task": 4, "classes": 10}


def test_parse_the_three_kinds_and_two_points() -> None:
    assert parse_erasure("client=7,after-task=2") == ErasureRequest(7, None, 2, None)
    assert parse_erasure(" class=3 , after-task=0") == ErasureRequest(None, 3, 0, None)
    req = parse_erasure("client=7,class=3,task=1,round=4")
    assert req == ErasureRequest(7, 3, 1, 4)
    assert req.kind == "client-class"
    assert req.describe() == "client 7's class 3 at round 4 of task 1"
    assert parse_erasure(req.to_text()) == req
    assert parse_erasure("class=3,after-task=2").describe() == "class 3 after task 2"


@pytest.mark.parametrize(("text", "phrase"), [
    ("client=7", "say when"),
    ("after-task=2", "say what to erase"),
    ("client=7,task=2", "say when"),
    ("client=x,after-task=2", "client must be an integer, got 'x'"),
    ("client=-1,after-task=2", "client must be 0 or more"),
    ("client=1,task=0,round=0", "round must be 1 or more"),
    ("client=1,after-task=2,round=3", "not both"),
    ("client=1,client=2,after-task=0", "client given twice"),
    ("clients=1,after-task=0", "'clients=1' is not one of client=N, class=N"),
    ("client 1", "is not one of"),
])
def test_parse_errors_are_one_line(text: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase) as err:
        parse_erasure(text)
    assert "\n" not in str(err.value)


def test_a_good_schedule_passes() -> None:
    validate_requests([parse_erasure(t) for t in (
        "client=7,after-task=2", "class=3,after-task=2", "client=1,class=4,task=0,round=4",
        "client=1,after-task=4")], **RUN)


@pytest.mark.parametrize(("texts", "phrase"), [
    (["client=10,after-task=0"], "no client 10 (clients are 0..9)"),
    (["class=10,after-task=0"], "no class 10 (classes are 0..9)"),
    (["client=1,after-task=5"], "task 5 is outside the run (tasks are 0..4)"),
    (["client=1,task=2,round=5"], "round 5 is outside task 2 (rounds are 1..4)"),
    (["client=1,after-task=1", "client=1,after-task=3"], "client 1's data is already erased"),
    # order is the stream's, not the list's: the later one is refused
    (["client=1,class=2,after-task=3", "client=1,after-task=1"],
     "erasure 'client=1,class=2,after-task=3': client 1's data is already erased"),
    (["class=2,after-task=0", "class=2,task=1,round=1"], "class 2 is already erased"),
    (["client=1,class=2,after-task=0", "client=1,class=2,after-task=1"],
     "client 1's class 2 is already erased"),
    ([f"client={c},after-task=0" for c in range(10)], "would erase every client"),
    ([f"class={k},after-task={k % 5}" for k in range(10)], "would erase every class"),
])
def test_bad_schedules_are_refused_with_one_line(texts: list[str], phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        validate_requests([parse_erasure(t) for t in texts], **RUN)


def test_schedule_text_and_points() -> None:
    """';' separates requests; an after-task request comes after the task's last round
    (round rounds_per_task + 1), an at-round one before that round."""
    from fedcl.erasure import parse_schedule

    schedule = parse_schedule("client=1,after-task=0; ;client=2,task=1,round=2")
    assert [r.to_text() for r in schedule] == ["client=1,after-task=0", "client=2,task=1,round=2"]
    assert [r.point(4) for r in schedule] == [(0, 5), (1, 2)]
    assert (0, 4) < schedule[0].point(4) < (1, 0) < (1, 1) < schedule[1].point(4)


def test_config_checks_the_schedule_and_the_method() -> None:
    from fedcl.config import Config

    requests = setup_run(Config(clients=4, tasks=2, erasures="client=3,after-task=1; "
                                "client=0,task=0,round=2")).schedule
    assert [r.to_text() for r in requests] == ["client=0,task=0,round=2", "client=3,after-task=1"]
    setup_run(Config(erasures="class=1,after-task=0"))  # every kind runs
    with pytest.raises(ConfigError, match="unknown unlearning 'ssdd' \\(did you mean 'ssd'"):
        setup_run(Config(unlearning="ssdd"))
    with pytest.raises(ConfigError, match=r"task 2 is outside the run \(tasks are 0..1\)"):
        setup_run(Config(tasks=2, erasures="client=0,after-task=2"))
