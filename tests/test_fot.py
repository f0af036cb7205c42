"""FOT's wiring, pinned on hand-made replies: the projected aggregation, the basis growth at a
task's end, the client's sketches, and a tiny end-to-end run against FedAvg."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedcl import plugins, protocol, subspace
from fedcl.config import Config
from fedcl.errors import ConfigError
from fedcl.models import build_model
from fedcl.strategy import RoundInfo, flower_kwargs
from fedcl.training import RoundContext, TrainResult
from strategies.fot import BASIS, FOT, SKETCH, STATS, FOTParams, FOTTrainer

pytestmark = pytest.mark.usefixtures("flower_identity")


def _reply(pid: int, arrays: dict[str, torch.Tensor], n: int, extra: dict | None = None
           ) -> Message:
    request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}),
                      dst_node_id=10 + pid, message_type=MessageType.TRAIN)
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord(arrays),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: 0.5,
                                        protocol.UNIT_WEIGHT: 1}),
        protocol.CLIENT_INFO: ConfigRecord({protocol.PARTITION_ID: pid,
                                            protocol.NUM_PARTITIONS: 2}),
        **(extra or {})})
    return Message(content, reply_to=request)


def _fot(**params: object) -> FOT:
    kwargs = flower_kwargs(Config())
    kwargs["weighted_by_key"] = protocol.UNIT_WEIGHT
    return FOT(FOTParams(**params), ["fc"], **kwargs)  # type: ignore[arg-type]


def test_first_task_is_plain_uniform_fedavg() -> None:
    fot = _fot()
    old = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}
    fot.configure_train(1, ArrayRecord(old), ConfigRecord(), _NoGrid())
    a = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.ones(2)}
    b = {"fc.weight": 3 * torch.ones(2, 3), "fc.bias": 3 * torch.ones(2)}
    # 10 and 30 samples, but FOT weighs clients uniformly: the mean is 2, not 2.5
    new, _ = fot.aggregate_train(1, [_reply(0, a, 10), _reply(1, b, 30)])
    got = new.to_torch_state_dict()
    assert torch.allclose(got["fc.weight"], torch.full((2, 3), 2.0))
    assert torch.allclose(got["fc.bias"], torch.full((2,), 2.0))


def test_update_projected_off_the_basis_bias_untouched() -> None:
    fot = _fot()
    fot.basis = {"fc": torch.tensor([[1.0], [0.0], [0.0]])}  # span(e1) of the 3 inputs
    old = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}
    fot.configure_train(5, ArrayRecord(old), ConfigRecord(), _NoGrid())
    upd = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    a = {"fc.weight": upd, "fc.bias": torch.tensor([1.0, 1.0])}
    new, _ = fot.aggregate_train(5, [_reply(0, a, 10), _reply(1, a, 10)])
    got = new.to_torch_state_dict()
    # Delta = old - avg = -upd; Delta (I - e1 e1^T) zeroes column 0: new = [[0,2,3],[0,5,6]]
    assert torch.allclose(got["fc.weight"], torch.tensor([[0.0, 2.0, 3.0], [0.0, 5.0, 6.0]]))
    assert torch.allclose(got["fc.bias"], torch.tensor([1.0, 1.0]))  # plain FedAvg
    # the new layer computes the old outputs on an input inside span(U)
    x = torch.tensor([2.5, 0.0, 0.0])
    assert torch.allclose(got["fc.weight"] @ x, old["fc.weight"] @ x)


def test_end_task_grows_basis_from_summed_sketches(tmp_path: Path) -> None:
    fot = _fot(eps=0.9)
    # two clients whose sketches live in span(e1, e2) of R^4, with e1 dominant
    y1 = torch.tensor([[3.0, 0.0], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]])
    y2 = torch.tensor([[2.0, 0.0], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]])
    fot.payloads = {
        0: RecordDict({SKETCH: ArrayRecord({"fc": y1}), STATS: ConfigRecord({"n": 10,
                                                                            "fc.r": 1.0})}),
        1: RecordDict({SKETCH: ArrayRecord({"fc": y2}), STATS: ConfigRecord({"n": 30,
                                                                            "fc.r": 1.0})}),
    }
    fot.end_task(0, ArrayRecord({"fc.weight": torch.zeros(2, 4)}))
    # r_bar = 1, eps' = (1 - 0.1)/1 = 0.9; Y_sum = [[5,0],[0,.2],0,0]: energies 25/25.04 > 0.9
    # so k = 1 and the basis is +-e1
    U = fot.basis["fc"]
    assert U.shape == (4, 1)
    assert torch.allclose(U.abs().flatten(), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=U.dtype))
    metrics = fot.state_metrics()
    assert set(metrics) == {"fot_basis_dim.fc", "fot_basis_mb.fc"}
    assert metrics["fot_basis_dim.fc"] == 1.0
    assert metrics["fot_basis_mb.fc"] == 4 * 1 * U.element_size() / 2**20  # d x k entries
    assert set(fot.step_seconds) == {"fc"} and 0 < fot.step_seconds["fc"] < 60
    saved = fot.save_state(tmp_path)
    state = torch.load(saved[0])
    assert state["dims_per_task"] == [{"fc": 1}]
    assert torch.equal(state["basis"]["fc"], U)
    # the basis travels to clients in a task's last round only
    assert fot.train_records(RoundInfo(1, 1, 3, 4)) == {}
    sent = fot.train_records(RoundInfo(1, 3, 3, 6))[BASIS].to_torch_state_dict()["fc"]
    assert torch.allclose(sent, U.float())


def test_end_task_without_sketches_keeps_the_basis(caplog: pytest.LogCaptureFixture) -> None:
    """No client of the task's last round holds data any more (all erased): the task adds no
    direction, eps still grows, the run goes on."""
    fot = _fot(eps_inc=0.01)
    fot.basis = {"fc": torch.eye(4)[:, :1]}
    arrays = ArrayRecord({"fc.weight": torch.zeros(2, 4)})
    with caplog.at_level("WARNING", logger="fedcl"):
        assert fot.end_task(1, arrays) is arrays
    assert fot.basis["fc"].shape == (4, 1) and fot.history == [{"fc": 1}]
    assert fot.eps == pytest.approx(FOTParams().eps + 0.01)
    assert "no client of task 1's last round holds data" in caplog.text


def test_client_sketches_only_in_last_round_and_ratio_against_basis() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 3)
    x = torch.randint(0, 255, (20, 1, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 3, (20,))
    cfg = Config(batch_size=8)

    def local(last: bool, message: RecordDict | None) -> RoundContext:
        return RoundContext(config=cfg, model=model, x=x, y=y, head=None, task=0, round=1,
                            partition_id=0, device=torch.device("cpu"), mean=(0.5,), std=(0.5,),
                            last_of_task=last, message=message)

    trainer = FOTTrainer(FOTParams())
    assert trainer.after_training(local(False, None), TrainResult(20, 0.1, 3)).records == {}
    res = trainer.after_training(local(True, RecordDict()), TrainResult(20, 0.1, 3))
    layers = subspace.projected_layers(model)
    sk = res.records[SKETCH].to_torch_state_dict()
    stats = res.records[STATS]
    assert int(stats["n"]) == 20
    assert set(sk) == set(layers)
    assert sk["body.2"].shape == (16, 16)  # d = 16 inputs, m = d for the MLP
    assert sk["heads.0"].shape == (400, 400)
    assert all(float(stats[f"{name}.r"]) == 1.0 for name in layers)  # no basis yet
    # with a basis spanning all 16 inputs, nothing is left: ratio 0
    full = RecordDict({BASIS: ArrayRecord({"body.2": torch.eye(16)})})
    res2 = trainer.after_training(local(True, full), TrainResult(20, 0.1, 3))
    assert float(res2.records[STATS]["body.2.r"]) == pytest.approx(0.0, abs=1e-6)
    assert float(res2.records[STATS]["body.5.r"]) == 1.0
    # energy ratio = norm ratio squared
    half = torch.zeros(16, 8)
    half[:8, :8] = torch.eye(8)
    r_norm = float(FOTTrainer(FOTParams()).after_training(
        local(True, RecordDict({BASIS: ArrayRecord({"body.2": half})})),
        TrainResult(20, 0.1, 3)).records[STATS]["body.2.r"])
    r_energy = float(FOTTrainer(FOTParams(ratio="energy")).after_training(
        local(True, RecordDict({BASIS: ArrayRecord({"body.2": half})})),
        TrainResult(20, 0.1, 3)).records[STATS]["body.2.r"])
    assert 0 < r_norm < 1
    assert r_energy == pytest.approx(r_norm**2, rel=1e-5)


@pytest.mark.parametrize(("params", "message"), [
    ({"eps": 1.2}, "eps must be in (0, 1)"),
    ({"eps_inc": -0.1}, "eps_inc must be in [0, 1)"),
    ({"sketch_dist": "cauchy"}, "sketch_dist must be auto, uniform or normal"),
    ({"weighting": "median"}, "weighting must be uniform or samples"),
    ({"ratio": "cube"}, "ratio must be norm or energy"),
])
def test_bad_parameters(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        plugins.parse_strategy_params("fot", params)


class _NoGrid:
    def get_node_ids(self) -> list[int]:
        return [10, 11]


@pytest.mark.e2e
def test_fot_forgets_less_than_fedavg_on_permuted_mnist(tmp_path: Path) -> None:
    from tests.conftest import run_fedcl
    from tests.pinned import assert_pinned

    args = ("--scenario", "domain-il", "--tasks", "2", "--clients", "6", "--rounds-per-task",
            "2", "--partition", "iid", "--batch-size", "64", "--eval-samples-per-task", "500",
            "--fraction-train", "0.5", "--experiment", "fot-e2e")
    out = {}
    for strategy in ("fot", "fedavg"):
        res = run_fedcl("simulate", *args, "--strategy", strategy, "--output",
                        str(tmp_path / strategy), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        out[strategy] = json.loads((tmp_path / strategy / "summary.json").read_text())
    fot, fedavg = out["fot"], out["fedavg"]
    assert_pinned("fot_domain_il", fot)  # the same seed, the same matrices as recorded
    assert_pinned("fedavg_domain_il", fedavg)
    # the same task 0 (FOT is FedAvg until a basis exists)
    assert fot["accuracy_matrix"][0] == fedavg["accuracy_matrix"][0]
    assert fot["forgetting"] < fedavg["forgetting"]
    dims = fot["strategy_state"]
    assert [d["task"] for d in dims] == [0, 1]
    assert 0 < dims[0]["fot_basis_dim.body.2"] < dims[1]["fot_basis_dim.body.2"] <= 784
    assert (tmp_path / "fot" / "fot_basis.pt").is_file()
    basis = torch.load(tmp_path / "fot" / "fot_basis.pt")["basis"]["body.2"]
    assert basis.shape == (784, int(dims[1]["fot_basis_dim.body.2"]))
    assert np.allclose((basis.T @ basis).numpy(), np.eye(basis.shape[1]), atol=1e-6)
    assert fedavg["strategy_state"] == []


def test_sketch_width_follows_paper_with_cap() -> None:
    from strategies.fot import sketch_columns, sketch_settings

    mlp = build_model("mlp", (1, 28, 28), 10)
    cnn = build_model("cnn", (1, 28, 28), 2, 2)
    assert sketch_settings(mlp, FOTParams()) == ("uniform", 1.0)
    assert sketch_settings(cnn, FOTParams()) == ("normal", 5.0)
    assert sketch_settings(cnn, FOTParams(sketch_dist="uniform", sketch_width=2)) == (
        "uniform", 2.0)
    assert sketch_columns(mlp.get_submodule("body.2"), 1.0, 2048) == 784
    # conv 32 -> 64 channels, 3x3: d = 288, m = 5d = 1440
    assert sketch_columns(cnn.get_submodule("body.3"), 5.0, 2048) == 1440
    # hidden Linear of 64*7*7 = 3136 inputs: 5d = 15680 capped at 2048
    assert sketch_columns(cnn.get_submodule("body.7"), 5.0, 2048) == 2048


@pytest.mark.e2e
@pytest.mark.parametrize(("model", "scenario"), [("cnn", "domain-il"), ("resnet18", "task-il")])
def test_fot_with_conv_models(tmp_path: Path, model: str, scenario: str) -> None:
    """FOT on the small CNN in domain-IL (rotated MNIST) and on the reduced ResNet-18 in
    task-IL: every conv and hidden Linear layer gets a basis; norms and heads get none."""
    from tests.conftest import run_fedcl

    res = run_fedcl("simulate", "--strategy", "fot", "--strategy-param", "repr_samples=32",
                    "--model", model, "--scenario", scenario, "--domain-shift", "rotate",
                    "--partition", "iid", "--tasks", "2", "--clients", "80",
                    "--fraction-train", "0.0375", "--rounds-per-task", "1",
                    "--eval-samples-per-task", "200", "--lr", "0.05", "--output",
                    str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["scenario"] == scenario
    dims = s["strategy_state"][-1]
    expected = 3 if model == "cnn" else 20  # 2 convs + hidden Linear, or 17 + 3 convs
    assert len([k for k in dims if k.startswith("fot_basis_dim.")]) == expected
    assert all(v >= 1 for k, v in dims.items() if k.startswith("fot_basis_dim."))
    assert not any("heads" in k or "bn" in k for k in dims)
    matrix = s["accuracy_matrix"]
    if model == "cnn":
        # one round of training already beats the untrained model, and rotation by 90 degrees
        # (task 1 of 2) is another domain: the model trained on task 0 does worse there
        assert matrix[0][0] > s["random_init_accuracy"][0] + 0.02
        assert matrix[0][0] > matrix[0][1]
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
