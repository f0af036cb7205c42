"""A strategy that misbehaves in the middle of a run: what its hooks return is checked where
the task-stream driver and the round take it, screened replies that all fail say why, and a
state that cannot be saved leaves no half-written checkpoint. Each ends in one line naming the
hook, never in a traceback from wherever the bad value surfaced later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedcl import checkpoint, plugins, protocol, tracking
from fedcl.checkpoint import RunState
from fedcl.config import Config
from fedcl.errors import FedclError, RunAborted
from fedcl.rounds import Roster, train_round
from fedcl.server_app import run_continual
from fedcl.strategy import ContinualStrategy, RoundInfo, flower_kwargs
from fedcl.stream import TaskStreamDriver
from strategies.fedavg import FedAvgCL

pytestmark = pytest.mark.usefixtures("flower_identity")

MODEL = {"w": torch.zeros(2, 3), "b": torch.zeros(2), "steps": torch.zeros((), dtype=torch.int64)}


def _model(**changes: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({**{k: v.clone() for k, v in MODEL.items()}, **changes})


class EndTask(ContinualStrategy):
    """end_task returns whatever the test gives it."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        return self.result


class Walk(TaskStreamDriver):
    def run_round(self, info: RoundInfo) -> None:
        pass


@pytest.mark.parametrize(("result", "problem"), [
    (None, "NoneType, not an ArrayRecord"),
    ({"w": torch.zeros(2, 3)}, "dict, not an ArrayRecord"),
    (ArrayRecord({"w": torch.zeros(2, 3)}),
     "arrays that differ from the model's (missing ['b', 'steps'], extra [])"),
    (_model(w=torch.zeros(3, 3)), "array w as float32[3, 3], the model's is float32[2, 3]"),
    (_model(b=torch.tensor([0.0, float("nan")])), "non-finite values in array b"),
])
def test_what_end_task_returns_must_fit_the_model(result: Any, problem: str) -> None:
    walk = Walk(EndTask(result), _model())
    with pytest.raises(RunAborted) as err:
        walk.walk([RoundInfo(0, 1, 1, 1)])
    assert str(err.value) == f"strategy EndTask.end_task (task 0) returned {problem}"


def test_a_model_that_fits_goes_on() -> None:
    changed = _model(w=torch.ones(2, 3))
    walk = Walk(EndTask(changed), _model())
    assert walk.walk([RoundInfo(0, 1, 1, 1)]) is changed


# --- one round with hand-made replies --------------------------------------------------------
class ReplyingGrid:
    """A grid whose nodes 10, 11, 12 (partitions 0, 1, 2) answer each message at once: a
    query with their identity, a training message with ``reply(partition id, message)``'s
    arrays and metrics."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.waiting: list[Message] = []
        self.sent = 0

    def get_node_ids(self) -> list[int]:
        return [10, 11, 12]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            pid = msg.metadata.dst_node_id - 10
            info = ConfigRecord({protocol.PARTITION_ID: pid, protocol.NUM_PARTITIONS: 3})
            content = RecordDict({protocol.CLIENT_INFO: info})
            if msg.metadata.message_type == MessageType.TRAIN:
                arrays, metrics = self.reply(pid, msg)
                content[protocol.ARRAYS] = ArrayRecord(arrays)
                content[protocol.METRICS] = MetricRecord(metrics)
            self.waiting.append(Message(content, reply_to=msg))
            ids.append(f"m{self.sent}")
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        got, self.waiting = self.waiting, []
        return got


def _round(strategy: ContinualStrategy, reply: Any) -> Any:
    config = Config(clients=3, tasks=1, round_timeout_s=5)
    roster = Roster({0: 10, 1: 11, 2: 12}, 3)
    return train_round(ReplyingGrid(reply), roster, strategy, config, config.to_json(),
                       _model(), RoundInfo(0, 1, 1, 1), [0, 1, 2], None)


def _good(pid: int, msg: Message | None = None
          ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    return ({k: v + 0.1 if v.is_floating_point() else v for k, v in MODEL.items()},
            {protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 0.5})


def test_replies_that_all_fail_screening_say_so() -> None:
    def nan_loss(pid: int, msg: Message) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        arrays, _ = _good(pid)
        return arrays, {protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: float("nan")}

    with pytest.raises(RunAborted) as err:
        _round(FedAvgCL(**flower_kwargs(Config())), nan_loss)
    assert str(err.value) == ("round 1 (task 0): 0 of 3 sampled clients sent a usable update, "
                              "3 rejected (metric train-loss is nan; metric train-loss is nan); "
                              "fewer than min_train_clients=1; NaN or infinite values: a "
                              "smaller learning rate (lr) may help")


class BadAggregate(FedAvgCL):
    def after_aggregate(self, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        state = arrays.to_torch_state_dict()
        state["w"] = state["w"].flatten()
        return ArrayRecord(state)


def test_an_aggregate_that_does_not_fit_the_model_names_the_strategy() -> None:
    assert _round(FedAvgCL(**flower_kwargs(Config())), _good).arrays["w"].shape == (2, 3)
    with pytest.raises(RunAborted) as err:
        _round(BadAggregate(**flower_kwargs(Config())), _good)
    assert str(err.value) == ("strategy BadAggregate's aggregate_train of round 1 (task 0) "
                              "returned array w as float32[6], the model's is float32[2, 3]")


# --- checkpoints -----------------------------------------------------------------------------
class Unpicklable(ContinualStrategy):
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": lambda step: 0.1 * step}


def test_a_state_that_cannot_be_saved_leaves_no_half_written_checkpoint(tmp_path: Path
                                                                         ) -> None:
    path = tmp_path / "out" / checkpoint.FILE
    state = RunState(arrays=_model(), baseline=[0.0])
    checkpoint.save(path, state, ContinualStrategy(), Config(), None, 1.0)
    saved = path.read_bytes()
    with pytest.raises(FedclError) as err:
        checkpoint.save(path, state, Unpicklable(), Config(), None, 2.0)
    assert str(err.value).startswith(f"cannot write checkpoint {path}: AttributeError: ")
    assert str(err.value).endswith("(the state_dict() of the strategy Unpicklable and of the "
                                   "unlearning method must hold only tensors, numbers, "
                                   "strings, lists and dicts)")
    assert sorted(p.name for p in path.parent.iterdir()) == [checkpoint.FILE]
    assert path.read_bytes() == saved  # the previous checkpoint stands


# --- the live run ----------------------------------------------------------------------------
class RaisingEndTask(FedAvgCL):
    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        raise ValueError(f"no basis for task {task}\nsecond line")


@pytest.fixture
def raising_strategy() -> Any:
    """A strategy registered for this test only (the registry is restored after it)."""
    reg = plugins._STRATEGIES
    saved = (dict(reg.registered), dict(reg.functions), dict(reg.resolved))

    def build(config: Config, params: Any) -> RaisingEndTask:
        return RaisingEndTask(**flower_kwargs(config))

    plugins.register_strategy("raising-end-task", "end_task raises.")(build)
    yield "raising-end-task"
    reg.registered, reg.functions, reg.resolved = saved


def test_a_hook_that_raises_mid_run_is_one_line_and_the_mlflow_run_failed(
        tmp_path: Path, raising_strategy: str, caplog: pytest.LogCaptureFixture) -> None:
    def echo(pid: int, msg: Message) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return (msg.content[protocol.ARRAYS].to_torch_state_dict(),
                {protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 0.5})

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = Config(strategy=raising_strategy, clients=3, tasks=2, rounds_per_task=1,
                    eval_samples_per_task=20, tracking_uri=uri, experiment="faults",
                    output=str(tmp_path / "out"), round_timeout_s=10)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "flower.log").touch()  # as fedcl simulate makes it
    with pytest.raises(RunAborted) as err:
        run_continual(ReplyingGrid(echo), config)
    here = Path(__file__).resolve()
    line = next(i for i, text in enumerate(here.read_text().splitlines(), 1)
                if "raise ValueError(f\"no basis" in text)
    assert str(err.value) == (
        f"the run failed: ValueError: no basis for task 0 (raised at {here}:{line} in "
        f"end_task); traceback in {tmp_path / 'out' / 'flower.log'}")
    assert isinstance(err.value.__cause__, ValueError)
    assert any(r.exc_info and r.exc_info[1] is err.value.__cause__ for r in caplog.records)
    runs = tracking.fetch_runs(uri, "faults")
    assert [r["status"] for r in runs] == ["FAILED"]
    assert runs[0]["tags"]["fedcl.error"] == str(err.value)
