"""The task-stream driver: the order of a strategy's task hooks and the walker's hooks, for
every kind of walk fedcl makes (whole stream, a resumed task, the last rounds only, replay that
ends inside a task)."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedcl.strategy import RoundInfo
from fedcl.stream import TaskStreamDriver


class Recording:
    """A strategy that records its task hooks; its task hooks change the model's marker."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def begin_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        self.log.append(f"begin {task}")
        return arrays

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        self.log.append(f"end {task}")
        return ArrayRecord()  # a new object: end_task changed the model


class Walk(TaskStreamDriver):
    def __init__(self, log: list[str]) -> None:
        super().__init__(Recording(log), ArrayRecord())  # type: ignore[arg-type]
        self.log = log

    def before_task(self, task: int) -> None:
        self.log.append(f"before_task {task}")

    def task_begun(self, task: int) -> None:
        self.log.append(f"task_begun {task}")

    def before_round(self, info: RoundInfo) -> None:
        self.log.append(f"before_round {info.round}")

    def run_round(self, info: RoundInfo) -> None:
        self.log.append(f"round {info.task}.{info.task_round}")

    def after_task(self, task: int, last_round_arrays: ArrayRecord) -> None:
        changed = last_round_arrays is not self.arrays
        self.log.append(f"after_task {task} changed={changed}")

    def after_round(self, info: RoundInfo) -> None:
        self.log.append(f"after_round {info.round}")


def rounds(*spec: tuple[int, int], per_task: int = 2) -> list[RoundInfo]:
    return [RoundInfo(t, r, per_task, t * per_task + r) for t, r in spec]


def test_a_whole_stream_in_order() -> None:
    log: list[str] = []
    walk = Walk(log)
    walk.walk(rounds((0, 1), (0, 2), (1, 1), (1, 2)))
    assert log == [
        "before_task 0", "begin 0", "task_begun 0",
        "before_round 1", "round 0.1", "after_round 1",
        "before_round 2", "round 0.2", "end 0", "after_task 0 changed=True", "after_round 2",
        "before_task 1", "begin 1", "task_begun 1",
        "before_round 3", "round 1.1", "after_round 3",
        "before_round 4", "round 1.2", "end 1", "after_task 1 changed=True", "after_round 4"]
    assert walk.open_task is None


def test_a_resumed_task_does_not_begin_again() -> None:
    log: list[str] = []
    Walk(log).walk(rounds((0, 2)), open_task=0)
    assert log == ["before_round 2", "round 0.2", "end 0", "after_task 0 changed=True",
                   "after_round 2"]


def test_last_rounds_only_then_the_current_task_opens() -> None:
    """The rebuild after unlearning: each finished task's last round, then the task that had
    begun is begun again (once)."""
    log: list[str] = []
    walk = Walk(log)
    walk.walk(rounds((0, 2), (1, 2)), then_open=2)
    assert [e for e in log if e.split()[0] in ("begin", "end", "round")] == [
        "begin 0", "round 0.2", "end 0", "begin 1", "round 1.2", "end 1", "begin 2"]
    assert walk.open_task == 2


def test_a_replay_ending_inside_the_current_task_leaves_it_open() -> None:
    """The oracle replays the current task's first round: the task is open, then_open adds
    nothing."""
    log: list[str] = []
    walk = Walk(log)
    walk.walk(rounds((0, 1), (0, 2), (1, 1)), then_open=1)
    assert [e for e in log if e.startswith(("begin", "end"))] == ["begin 0", "end 0",
                                                                  "begin 1"]
    assert walk.open_task == 1


def test_an_empty_walk_only_opens() -> None:
    log: list[str] = []
    Walk(log).walk([], then_open=0)
    assert log == ["begin 0"]
    log.clear()
    Walk(log).walk([])
    assert log == []
