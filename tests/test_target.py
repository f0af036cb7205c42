"""TARGET (strategies/baselines/target.py, its maths in strategies/baselines/maths.py): the
hand tests of METHODS.md 16.3 (L_BN, the clients' CE and KD columns, the KD weight), the
generator's step, the synthetic set the server sends, what a client keeps (nothing), and a
tiny run of the real ``fedcl simulate``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn
from torch.nn import functional as F

from fedcl import client_app, plugins, protocol
from fedcl.api import build_model, build_scenario
from fedcl.config import Config
from fedcl.errors import ConfigError
from fedcl.run_setup import setup_run
from strategies.baselines.maths import (
    BNStatisticsHooks,
    SynthesisGenerator,
    accumulate_meta_gradients,
    adversarial_disagreement,
    bn_statistics_loss,
    class_cross_entropy,
    kl_distillation,
    quantise_images,
    random_crop_flip,
    target_client_loss,
)
from strategies.baselines.target import (
    IMAGES,
    SYNTHETIC,
    TEACHER,
    Synthesizer,
    Target,
    TargetParams,
    TargetTrainer,
    build_target,
    erased_everywhere,
)
from tests.conftest import run_fedcl
from tests.pinned import assert_pinned
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Small tensors on one thread: with two xdist workers on two cores, torch's own threads
    made one synthesis call 100x slower (12.6 s against 0.09 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: a synthesis small enough for a test: 2 calls of 16 images, a narrow generator
SMALL = {"synthesis_calls": 2, "synthesis_batch": 16, "generator_width": 4, "latent_dim": 16,
         "generator_steps": 3}


# --- METHODS.md 16.3: hand tests ------------------------------------------------------------
def test_bn_statistics_loss_by_hand() -> None:
    """Running mean 0 and variance 1, a batch of mean 1 and variance 1: |1 - 1| + |0 - 1| = 1.
    Through the hooks on a BatchNorm1d: the batch (0, 2) has mean 1 and biased variance 1;
    once blended (momentum 0.9), a batch (2, 4) of mean 3 reads as 0.1 * 3 + 0.9 * 1 = 1.2."""
    one = torch.ones(1)
    assert float(bn_statistics_loss(one, one, torch.zeros(1), one)) == 1.0
    # two channels, norms not squared: mean (3, 4) against (0, 0) is 5
    assert float(bn_statistics_loss(torch.tensor([3.0, 4.0]), torch.ones(2), torch.zeros(2),
                                    torch.ones(2))) == 5.0
    bn = nn.BatchNorm1d(1).eval()  # running (0, 1), as a fresh layer's
    hooks = BNStatisticsHooks(nn.Sequential(bn), momentum=0.9)
    assert len(hooks) == 1
    x = torch.tensor([[0.0], [2.0]])
    bn(x)
    assert float(hooks.loss(x)) == pytest.approx(1.0, abs=1e-6)
    hooks.update_momentum()
    bn(x + 2.0)  # mean 3, variance 1
    assert float(hooks.loss(x)) == pytest.approx(1.2, abs=1e-6)
    hooks.remove()
    bn(x)  # the hooks are off: the terms stay as they were
    assert float(hooks.loss(x)) == pytest.approx(1.2, abs=1e-6)


def test_bn_statistics_loss_is_zero_without_batch_norm() -> None:
    """fedcl's MLP has no batch norm: no hook, L_BN is 0 whatever the input."""
    cfg = Config(strategy="target", tasks=5)
    mlp = build_model(cfg, build_scenario(cfg))
    hooks = BNStatisticsHooks(mlp, momentum=0.9)
    out = mlp(torch.randn(4, 1, 28, 28))
    assert len(hooks) == 0 and float(hooks.loss(out)) == 0.0
    resnet = build_model(Config(strategy="target", tasks=5, model="resnet18"),
                         build_scenario(cfg))
    assert len(BNStatisticsHooks(resnet, 0.9)) == 20  # 17 after convs, 3 in shortcuts


def test_client_loss_reads_new_classes_for_ce_and_old_ones_for_kd() -> None:
    """C_old = 20, a task of classes 20..29, label 23: the CE is that of logits 20.. with
    target 3 and reads no old logit; the KD reads logits 0..19 only."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(1, 30, generator=gen, requires_grad=True)
    syn = torch.randn(3, 30, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 30, generator=gen)
    old, new = torch.arange(20), torch.arange(20, 30)
    label = torch.tensor([23])
    ce, kd = target_client_loss(real, label, new, syn, teacher, old, 25.0, 2.0)
    expected = F.cross_entropy(real.detach()[:, 20:], torch.tensor([3]))
    assert float(ce.detach()) == pytest.approx(float(expected), abs=1e-6)
    (ce + kd).backward()
    assert torch.all(real.grad[:, :20] == 0) and torch.all(real.grad[:, 20:] != 0)
    assert torch.all(syn.grad[:, 20:] == 0) and torch.all(syn.grad[:, :20] != 0)
    # the future and current columns of the synthetic batch, and the old ones of the real
    # batch, change nothing
    moved_real = real.detach().clone()
    moved_real[:, :20] += 5.0
    moved_syn = syn.detach().clone()
    moved_syn[:, 20:] -= 3.0
    ce2, kd2 = target_client_loss(moved_real, label, new, moved_syn, teacher, old, 25.0, 2.0)
    assert float(ce2) == pytest.approx(float(ce.detach()), abs=1e-6)
    assert float(kd2) == pytest.approx(float(kd.detach()), abs=1e-5)
    with pytest.raises(ValueError, match=r"labels \[5\] are not among the columns"):
        class_cross_entropy(real, torch.tensor([5]), new)
    # the first task: no teacher, no KD
    first = target_client_loss(real.detach(), label, new, None, None, old[:0], 25.0, 2.0)
    assert float(first[1]) == 0.0


def test_kd_by_hand_times_25() -> None:
    """METHODS.md 14's example x 25: teacher old logits (0, ln 3) at T = 2 give the target
    (0.366, 0.634); identical student logits give 25 x 0.6568 = 16.42 (the target's entropy,
    with a zero gradient); student logits (0, 0) give 25 ln 2 = 17.33."""
    teacher = torch.tensor([[0.0, math.log(3.0), 9.0]])  # a third, new-class logit
    student = teacher.clone().requires_grad_(True)
    old, new = torch.arange(2), torch.tensor([2])
    real = torch.zeros(1, 3)
    _, kd = target_client_loss(real, torch.tensor([2]), new, student, teacher, old, 25.0, 2.0)
    assert float(kd.detach()) == pytest.approx(16.42, abs=5e-3)
    kd.backward()
    assert float(student.grad.abs().max()) < 1e-6
    _, kd0 = target_client_loss(real, torch.tensor([2]), new, torch.zeros(1, 3), teacher, old,
                                25.0, 2.0)
    assert float(kd0) == pytest.approx(25 * math.log(2.0), abs=1e-5)


def test_student_and_adversarial_terms_by_hand() -> None:
    """The student's KL at T = 20 is 0 for equal logits and T^2 KL otherwise; L_adv counts only
    the rows where student and teacher agree on the top class."""
    t = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert float(kl_distillation(t, t, 20.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # agrees on row 0 only
    p, q = F.softmax(t[0], 0), F.softmax(s[0], 0)
    kl0 = float((p * (p.log() - q.log())).sum())
    assert float(adversarial_disagreement(s, t)) == pytest.approx(-kl0 / 2, abs=1e-6)
    pt, ps = F.softmax(t / 20, 1), F.softmax(s / 20, 1)
    expected = 400 * float((pt * (pt.log() - ps.log())).sum(1).mean())
    assert float(kl_distillation(s, t, 20.0)) == pytest.approx(expected, rel=1e-4)


def test_crop_quantise_and_the_meta_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(5, 1, 6, 6, generator=gen)
    assert torch.equal(random_crop_flip(x, 0, False, gen), x)
    shifted = random_crop_flip(x, 2, True, torch.Generator().manual_seed(4))
    assert shifted.shape == x.shape
    assert torch.equal(shifted, random_crop_flip(x, 2, True, torch.Generator().manual_seed(4)))
    # a one-pixel image is cropped to a shift of itself: its value survives or falls outside
    dot = torch.zeros(64, 1, 6, 6)
    dot[:, :, 3, 3] = 1.0
    sums = random_crop_flip(dot, 2, False, gen).sum(dim=(1, 2, 3))
    assert set(sums.tolist()) <= {0.0, 1.0} and sums.sum() > 32  # |shift| <= 2: mostly kept
    # the 8-bit values of the code's PNGs: floor(255 x), clamped
    assert quantise_images(torch.tensor([0.0, 0.5, 0.999, 1.0, 1.3, -0.2])).tolist() == \
        [0, 127, 254, 255, 255, 0]
    base, fast = nn.Linear(2, 1), nn.Linear(2, 1)
    for step in range(2):
        fast.zero_grad()
        fast(torch.ones(1, 2) * (step + 1)).sum().backward()
        accumulate_meta_gradients(base, fast)
    assert base.weight.grad.tolist() == [[3.0, 3.0]] and base.bias.grad.tolist() == [2.0]


# --- the generator -----------------------------------------------------------------------
class TinyBN(nn.Module):
    """conv -> BN -> ReLU -> mean pool -> linear: four classes of 1 x 8 x 8 images, with
    running statistics far from a fresh generator's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.bn.running_mean.fill_(0.5)
        self.bn.running_var.fill_(2.0)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_the_generator_fits_the_input_shape() -> None:
    for shape, init in (((1, 28, 28), (7, 7)), ((3, 32, 32), (8, 8)), ((1, 30, 30), (8, 8))):
        g = SynthesisGenerator(shape, latent_dim=8, width=4)
        out = g(torch.randn(3, 8)).detach()
        assert g.init_size == init and out.shape == (3, *shape)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # sigmoid


def test_a_synthesis_call_lowers_the_generator_loss() -> None:
    """One call on a tiny BN teacher (seed 0): the clone's steps bring L_G down from the first
    step's value, the base generator takes its meta step, the call's images join the pool as
    uint8, and the same seed makes the same images."""
    torch.manual_seed(0)
    teacher = TinyBN()
    params = TargetParams(synthesis_calls=1, synthesis_batch=32, generator_steps=20,
                          generator_width=8, latent_dim=16, augment_pad=1, warmup=0,
                          student_steps=5)

    def synthesizer() -> Synthesizer:
        return Synthesizer(teacher, [0, 1, 2, 3], [0, 1, 2, 3], (1, 8, 8), (0.5,), (0.25,),
                           params, seed=11, device=torch.device("cpu"))

    s = synthesizer()
    before = [p.detach().clone() for p in s.generator.parameters()]
    first, best = s.call()
    assert len(s.hooks) == 1 and s.hooks.blend[0] is not None  # L_BN read and blended
    assert best < 0.85 * first, (first, best)  # 60.4 -> 47.3 when written
    assert any(not torch.equal(a, b) for a, b in zip(before, s.generator.parameters(),
                                                     strict=True))
    assert s.pool[0].dtype == torch.uint8 and s.pool[0].shape == (32, 1, 8, 8)
    loss = s.train_student()
    assert math.isfinite(loss)
    again = synthesizer()
    again.call()
    assert torch.equal(again.pool[0], s.pool[0])


# --- the server: the synthetic set --------------------------------------------------------
def _trained_teacher(cfg: Config) -> nn.Module:
    """The run's MLP after a few steps on task 0 (classes 0 and 1; dropout seeded)."""
    torch.manual_seed(0)
    scenario = build_scenario(cfg)
    model = build_model(cfg, scenario)
    x, y = scenario.train_data(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        rows = torch.randint(len(y), (64,), generator=gen)
        xb = (x[rows].float() / 255 - 0.1307) / 0.3081
        loss = F.cross_entropy(model(xb)[:, :2], y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_the_synthetic_set_the_server_sends(tmp_path: Path) -> None:
    """After task 0 the strategy holds the teacher; before task 1's first round it makes the
    set: uint8 [N, 1, 28, 28], N = calls x batch or synthetic_size, labels only from the
    seen classes (0, 1) minus those erased everywhere. The round sends the teacher and the
    set, nothing before task 0 ends; the state survives a checkpoint; the same seed makes the
    same set."""
    cfg = Config(strategy="target", tasks=5, device="cpu", output=str(tmp_path))
    teacher = ArrayRecord(_trained_teacher(cfg).state_dict())
    strategy = build_target(cfg, TargetParams(**SMALL))
    assert isinstance(strategy, Target)
    assert strategy.capabilities.scenarios == ("class-il",)
    assert not strategy.capabilities.task_end_state
    assert strategy.weighted_by_key == protocol.UNIT_WEIGHT  # uniform, as TARGET's code
    assert strategy.train_records(None) == {}  # type: ignore[arg-type]
    strategy.end_task(0, teacher)
    assert strategy.train_records(None) == {}  # type: ignore[arg-type]  # not made yet
    result = strategy.synthesise()
    records = strategy.train_records(None)  # type: ignore[arg-type]
    images = records[SYNTHETIC][IMAGES].numpy()  # type: ignore[index]
    assert images.dtype.name == "uint8" and images.shape == (32, 1, 28, 28)
    assert records[TEACHER] is teacher
    assert set(result.labels.tolist()) == {0, 1}
    metrics = strategy.state_metrics()
    assert metrics["target_synthetic_images"] == 32
    assert metrics["target_synthetic_bytes"] == 32 * 784
    assert metrics["target_bn_layers"] == 0  # the MLP: L_BN is 0
    assert 0.0 <= metrics["target_teacher_agreement"] <= 1.0

    restored = build_target(cfg, TargetParams(**SMALL))
    restored.load_state_dict(strategy.state_dict())
    assert torch.equal(restored.synthetic, strategy.synthetic)  # type: ignore[arg-type]
    same = build_target(cfg, TargetParams(**SMALL))
    same.end_task(0, teacher)
    same.synthesise()
    assert torch.equal(same.synthetic, strategy.synthetic)  # type: ignore[arg-type]

    sized = build_target(cfg, TargetParams(**SMALL, synthetic_size=10))
    sized.end_task(0, teacher)
    erased = sized.synthesise(erased_everywhere("-1:1;4:0"))  # class 1 everywhere, 0 on 4
    assert sized.synthetic.shape == (10, 1, 28, 28)  # type: ignore[union-attr]
    assert set(erased.labels.tolist()) == {0} and sized.excluded == [1]
    with pytest.raises(RuntimeError, match="only after a task end"):
        build_target(cfg, TargetParams(**SMALL)).synthesise()


def test_parameters_are_refused_in_one_line() -> None:
    for values, line in (({"synthetic_size": 33, "synthesis_calls": 2, "synthesis_batch": 16},
                          "target synthetic_size 33 is more than the 32 images made "
                          "(synthesis_calls 2 x synthesis_batch 16)"),
                         ({"kd_weight": -1.0}, "target kd_weight must be >= 0, got -1.0"),
                         ({"temperature": 0.0}, "target temperature must be > 0, got 0.0"),
                         ({"synthesis_calls": 0}, "target synthesis_calls must be >= 1, got 0"),
                         ({"bn_momentum": 1.0}, "target bn_momentum must be in [0, 1), got 1.0"),
                         ({"weighting": "size"},
                          "target weighting must be uniform or samples, got 'size'")):
        with pytest.raises(ConfigError) as err:
            plugins.parse_strategy_params("target", values)
        assert str(err.value) == line
    for scenario in ("task-il", "domain-il"):
        with pytest.raises(ConfigError) as err:
            setup_run(Config(strategy="target", scenario=scenario), paths=False)
        assert str(err.value) == (f"strategy 'target' is not defined for scenario "
                                  f"'{scenario}' (it declares class-il)")
    with pytest.raises(ConfigError, match="cannot train strategy 'target': its clients train "
                       "their own way"):
        setup_run(Config(strategy="target", cohort_size=2), paths=False)


# --- the client --------------------------------------------------------------------------
def _context(pid: int, clients: int) -> Context:
    return Context(run_id=1, node_id=10 + pid, state=RecordDict(), run_config={},
                   node_config={"partition-id": pid, "num-partitions": clients})


def test_a_client_trains_on_synthetic_data_and_keeps_no_sample(flower_identity: None,
                                                                tmp_path: Path) -> None:
    """Client 0 of 200 in task 1 (classes 2 and 3), through the real ClientApp handler, with
    the teacher and 40 synthetic images in the message: the distillation changes the trained
    model (against the same round without the set), and the client's Context.state holds
    only fedcl's own counters, a few bytes: no sample (one MNIST image alone is 784 bytes),
    no synthetic image, no model."""
    config = Config(strategy="target", clients=200, tasks=5, partition="iid", device="cpu",
                    batch_size=16, output=str(tmp_path))
    scenario = build_scenario(config)
    model = build_model(config, scenario)
    arrays = ArrayRecord(model.state_dict())
    gen = torch.Generator().manual_seed(5)
    synthetic = torch.randint(0, 256, (40, 1, 28, 28), generator=gen, dtype=torch.uint8)
    teacher = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
               for k, v in model.state_dict().items()}

    def train(records: dict[str, ArrayRecord]) -> tuple[Context, RecordDict]:
        context = _context(0, 200)
        cfg = ConfigRecord({protocol.RUN_CONFIG_JSON: config.to_json(), protocol.TASK: 1,
                            protocol.ROUND: 2, protocol.TASK_ROUND: 1,
                            protocol.LAST_ROUND_OF_TASK: False, protocol.ERASED_CLASSES: "",
                            protocol.REPLAY: False})
        msg = Message(RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: cfg, **records}),
                      dst_node_id=context.node_id, message_type=MessageType.TRAIN)
        return context, client_app.train(msg, context).content

    context, reply = train({TEACHER: ArrayRecord(teacher),
                            SYNTHETIC: ArrayRecord({IMAGES: synthetic})})
    _, plain = train({})
    trained = reply[protocol.ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
    alone = plain[protocol.ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
    assert max(float((trained[k] - alone[k]).abs().max()) for k in trained) > 1e-4
    info = reply[protocol.CLIENT_INFO]
    assert list(context.state.keys()) == [protocol.CLIENT_STATE]
    assert str(info[protocol.STATE_KEYS]) == protocol.CLIENT_STATE
    assert int(info[protocol.STATE_BYTES]) < 64  # type: ignore[arg-type]
    assert protocol.BUFFER_SAMPLES not in info
    assert not TargetTrainer(TargetParams()).keeps_client_store


# --- a tiny run of the real command ------------------------------------------------------
@pytest.mark.e2e
def test_target_class_il_run_keeps_no_sample_on_clients(tmp_path: Path,
                                                        ray_env: dict) -> None:  # noqa: F811
    """Split-MNIST class-IL, 3 clients, 2 tasks of one round, a class of task 0 erased after
    it (the retrain oracle's strategy goes on): the same seed gives the pinned matrix; the set
    is made once, before task 1, 64 images whose labels leave the erased class out, and no
    client keeps anything but fedcl's counters."""
    klass = build_scenario(Config(tasks=2)).tasks[0].classes[0]
    out = tmp_path / "out"
    args = [a for k, v in SMALL.items() for a in ("--strategy-param", f"{k}={v}")]
    res = run_fedcl("simulate", *TINY, "--strategy", "target", *args, "--strategy-param",
                    "synthesis_batch=32", "--erase", f"class={klass},after-task=0",
                    "--output", str(out), cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["strategy"] == "target" and s["scenario"] == "class-il" and s["num_tasks"] == 2
    assert_pinned("target_class_il", s)  # the same seed, the same matrix as recorded
    matrix = s["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert matrix[0][0] > 0.8
    assert s["acc"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    [erasure] = s["erasures"]
    assert erasure["method"] == "retrain" and erasure["forget_acc"] == 0.0
    assert [e["task"] for e in s["strategy_state"]] == [1]
    made = s["strategy_state"][0]
    assert made["target_synthetic_images"] == 64 and made["target_bn_layers"] == 0
    assert made["target_synthetic_bytes"] == 64 * 784
    assert made["target_classes_left_out"] == 1
    states = s["client_state"]
    assert len(states) == 3
    for state in states.values():
        assert state["keys"] == [protocol.CLIENT_STATE] and state["bytes"] < 64
        assert "buffer_samples" not in state
