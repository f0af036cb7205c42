"""PRD's wiring: the prototype model's inference, per-class prototype aggregation on hand-made
replies, the client's sample counts, and a tiny end-to-end run whose clients keep no sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedcl import plugins, protocol
from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.training import RoundContext
from strategies.prd import (
    COUNTS,
    OLD_MODEL,
    PRD,
    PRDModel,
    PRDParams,
    PRDTrainer,
    _positions,
    prototype_rows,
)

pytestmark = pytest.mark.usefixtures("flower_identity")


class _Encoder(torch.nn.Module):
    feature_dim = 2

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_prototype_rows_per_scenario() -> None:
    assert prototype_rows(build_scenario(Config(scenario="task-il"))) == [
        [0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert prototype_rows(build_scenario(Config(scenario="class-il", task_order_seed=None)))[
        1] == [2, 3]
    assert prototype_rows(build_scenario(Config(scenario="domain-il", tasks=2))) == [
        list(range(10)), list(range(10))]


def test_inference_is_cosine_to_the_right_prototypes() -> None:
    model = PRDModel(_Encoder(), [[0, 1], [2, 3]], task_il=False)
    with torch.no_grad():
        model.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[2.0, 0.1], [-3.0, 0.0]])
    # class-IL after task 0: only classes 0 and 1 can win; the others are -inf
    out = model(x)
    assert torch.isinf(out[:, 2:]).all()
    assert out.argmax(1).tolist() == [0, 1]  # [-3, 0] is closer (cos 0 > -1) to class 1
    model.seen_tasks.fill_(2)
    assert model(x).argmax(1).tolist() == [0, 2]
    # task-IL: the task's own prototypes, as positions within the task
    til = PRDModel(_Encoder(), [[0, 1], [2, 3]], task_il=True)
    with torch.no_grad():
        til.prototypes.copy_(model.prototypes)
    assert til(x, 1).shape == (2, 2)
    assert til(x, 1).argmax(1).tolist() == [1, 0]  # cos([2, .1], [1, 1]) > cos(., [-1, 0])
    with pytest.raises(ValueError, match="needs a task id"):
        til(x)


def _reply(pid: int, state: dict[str, torch.Tensor], n: int, counts: list[int]) -> Message:
    request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}),
                      dst_node_id=10 + pid, message_type=MessageType.TRAIN)
    return Message(RecordDict({
        protocol.ARRAYS: ArrayRecord(state),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: 1.0}),
        protocol.CLIENT_INFO: ConfigRecord({protocol.PARTITION_ID: pid,
                                            protocol.NUM_PARTITIONS: 2}),
        COUNTS: ConfigRecord({"rows": counts})}), reply_to=request)


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [10, 11]


def test_prototypes_averaged_per_class_by_samples() -> None:
    from fedcl.strategy import flower_kwargs

    strategy = PRD(**flower_kwargs(Config()))
    old = {"w": torch.zeros(2), "prototypes": torch.full((3, 2), 9.0)}
    strategy.configure_train(1, ArrayRecord(old), ConfigRecord(), _Grid())
    a = {"w": torch.tensor([1.0, 1.0]), "prototypes": torch.tensor([[1.0, 0.0], [5.0, 5.0],
                                                                    [7.0, 7.0]])}
    b = {"w": torch.tensor([4.0, 4.0]), "prototypes": torch.tensor([[3.0, 0.0], [6.0, 6.0],
                                                                    [1.0, 1.0]])}
    # client 0: 10 samples of class 0, none of 1 or 2; client 1: 30 of class 0, 30 of class 2
    new, _ = strategy.aggregate_train(1, [_reply(0, a, 10, [10, 0, 0]),
                                          _reply(1, b, 30, [30, 0, 30])])
    got = new.to_torch_state_dict()
    # encoder weights: FedAvg by num-examples, (10*1 + 30*4)/40 = 3.25
    assert torch.allclose(got["w"], torch.full((2,), 3.25))
    # class 0: (10*[1,0] + 30*[3,0])/40 = [2.5, 0]; class 1: nobody -> old [9, 9];
    # class 2: only client 1 -> [1, 1]
    assert torch.allclose(got["prototypes"], torch.tensor([[2.5, 0.0], [9.0, 9.0], [1.0, 1.0]]))


def test_trainer_counts_and_no_distillation_on_first_task() -> None:
    cfg = Config(strategy="prd", scenario="class-il", tasks=5, clients=1, batch_size=16)
    sc = build_scenario(cfg)
    x, y = sc.train_data(1)
    x, y = x[:40], y[:40]
    model = plugins.build_model(cfg, sc)
    trainer = PRDTrainer(PRDParams())
    before = model.prototypes.detach().clone()
    ctx = RoundContext(config=cfg, model=model, x=x, y=y, head=None, task=1, round=4,
                       partition_id=0, device=torch.device("cpu"), mean=sc.dataset.mean,
                       std=sc.dataset.std, message=RecordDict())
    result = trainer.after_training(ctx, trainer.train(ctx))
    counts = list(result.records[COUNTS]["rows"])
    # task 1 holds classes 2 and 3: their counts are the client's samples of each; task 0's
    # rows (0, 1) count every sample (they only move through the distillation); later classes 0
    assert counts[2] == int((y == 2).sum()) and counts[3] == int((y == 3).sum())
    assert counts[2] + counts[3] == 40
    assert counts[0] == counts[1] == 40
    assert counts[4:] == [0] * 6
    # only the current task's prototypes moved: no frozen model was sent, so no distillation
    moved = (model.prototypes.detach() - before).abs().sum(1)
    assert moved[2] > 0 and moved[3] > 0
    assert moved[0] == 0 and moved[4:].abs().sum() == 0
    assert result.num_examples == 40 and result.loss > 0


# Recorded from the PRD trainer with the encoder's dropout taken out and the frozen copy in the
# trained model's mode (x86-64 CPU, torch 2.14): (sum of all weights, sum of their squares, sum
# of the prototypes, mean loss), each step with SupCon on two augmented views, the prototype
# loss and the relation distillation
PINNED = {"sgd": (-160.57786707715735, 491.1442039669638, 0.8611383740399106,
                  7.0855452219645185),
          "adam": (-231.4182830791992, 487.0349957523868, 0.8495418551192415,
                   7.676067590713501)}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_trainer_weights_and_loss_are_pinned(optimizer: str) -> None:
    """Class-IL task 1 with the previous task's model (distillation on), 40 samples, two
    epochs of batches of 16 (6 steps): the trained weights and the mean loss are the recorded
    ones. They were equal to the last digit on the machine that recorded them; the tolerance
    leaves room for another CPU's float kernels, while a changed loss term, weight, batch order
    or random draw (augmentations, dropout) moves them by far more."""
    cfg = Config(strategy="prd", scenario="class-il", tasks=5, clients=1, batch_size=16,
                 local_epochs=2, optimizer=optimizer, lr=0.002 if optimizer == "adam" else 0.05,
                 momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-4, seed=5)
    sc = build_scenario(cfg)
    x, y = sc.train_data(1)
    x, y = x[:40], y[:40]
    torch.manual_seed(1)
    old = plugins.build_model(cfg, sc)
    torch.manual_seed(2)
    model = plugins.build_model(cfg, sc)
    ctx = RoundContext(config=cfg, model=model, x=x, y=y, head=None, task=1, round=4,
                       partition_id=3, device=torch.device("cpu"), mean=sc.dataset.mean,
                       std=sc.dataset.std,
                       message=RecordDict({OLD_MODEL: ArrayRecord(old.state_dict())}))
    trainer = PRDTrainer(PRDParams())
    result = trainer.after_training(ctx, trainer.train(ctx))
    state = model.state_dict()
    got = (sum(float(v.double().sum()) for v in state.values()),
           sum(float(v.double().pow(2).sum()) for v in state.values()),
           float(state["prototypes"].double().sum()), result.loss)
    assert got == pytest.approx(PINNED[optimizer], rel=1e-6, abs=1e-6)
    assert result.steps == 6
    assert list(result.records[COUNTS]["rows"]) == [40, 40, 19, 21, 0, 0, 0, 0, 0, 0]

@pytest.mark.e2e
def test_prd_run_keeps_no_sample_on_clients(tmp_path: Path) -> None:
    from tests.conftest import run_fedcl
    from tests.pinned import assert_pinned

    out = tmp_path / "out"
    res = run_fedcl("simulate", "--strategy", "prd", "--scenario", "task-il", "--tasks", "5",
                    "--clients", "12", "--fraction-train", "0.25", "--rounds-per-task", "1",
                    "--partition", "iid",
                    "--eval-samples-per-task", "300", "--output", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["strategy"] == "prd"
    assert s["accuracy_matrix"][0][0] > 0.8
    assert_pinned("prd_task_il", s)  # the same seed, the same matrix as recorded
    states = s["client_state"]
    assert len(states) >= 3
    for state in states.values():
        # only fedcl's own bookkeeping (task and round counters), a few bytes: no sample
        # (one MNIST image alone is 784 bytes) and no model copy
        assert state["keys"] == [protocol.CLIENT_STATE]
        assert state["bytes"] < 64


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "resnet18"])
def test_distillation_is_zero_for_identical_models(model_name: str) -> None:
    """The frozen copy and the trained model compute the distilled feature alike: with the same
    weights, L_RD is 0 to float32 rounding on every built-in model, so λ_d adds nothing. The
    term is read as the difference of the batch loss with λ_d = 1 and λ_d = 0 (same inputs,
    same global RNG state), from the live model in train mode as the loop runs it."""
    cfg = Config(strategy="prd", scenario="class-il", tasks=5, clients=1, batch_size=16,
                 model=model_name, seed=3)
    sc = build_scenario(cfg)
    x, y = sc.train_data(1)
    x, y = x[:16], y[:16]
    torch.manual_seed(0)
    model = plugins.build_model(cfg, sc)
    with torch.no_grad():  # features of some norm: the old gap grew with it
        for q in model.parameters():
            q.mul_(3.0)
    message = RecordDict({OLD_MODEL: ArrayRecord(model.state_dict())})
    ctx = RoundContext(config=cfg, model=model, x=x, y=y, head=None, task=1, round=4,
                       partition_id=0, device=torch.device("cpu"), mean=sc.dataset.mean,
                       std=sc.dataset.std, message=message)
    inputs = PRDTrainer(PRDParams()).batch_inputs(ctx, x)
    losses = {}
    for lambda_d in (0.0, 1.0):
        trainer = PRDTrainer(PRDParams(lambda_distill=lambda_d))
        model.train()
        trainer.before_training(ctx, model)
        torch.manual_seed(7)
        losses[lambda_d] = trainer.batch_loss(ctx, model, inputs, y).detach()
    distill = float(losses[1.0] - losses[0.0])
    # float32 rounding of a sum of O(loss) terms, a few ulps of the loss
    tolerance = 8 * torch.finfo(torch.float32).eps * max(1.0, float(losses[0.0].abs()))
    assert abs(distill) <= tolerance, f"L_RD of identical models = {distill}"


def test_class_il_labels_become_positions_in_the_tasks_prototype_rows() -> None:
    """Task rows [7, 2, 5]: labels 5, 7, 7, 2 are positions 2, 0, 0, 1, whatever their order."""
    assert _positions(torch.tensor([5, 7, 7, 2]), [7, 2, 5]).tolist() == [2, 0, 0, 1]
    assert _positions(torch.tensor([], dtype=torch.long), [3]).tolist() == []
