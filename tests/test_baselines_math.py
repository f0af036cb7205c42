"""The baselines' maths (strategies/baselines/maths.py) against numbers worked out by hand:
the EWC penalty and its gradient, the Fisher diagonal, online EWC's running Fisher, LwF's
distillation term, reservoir sampling's retention probability, DER++'s two terms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedcl.api import RoundContext, SampleBuffer
from fedcl.config import Config
from strategies.baselines.ewc import PENALTY_ANCHOR, PENALTY_FISHER, EWCParams, EWCTrainer
from strategies.baselines.lwf import TEACHER, LwFParams, LwFTrainer
from strategies.baselines.maths import (
    FisherAnchor,
    TrainingReservoir,
    derpp_terms,
    diagonal_fisher,
    distillation_loss,
    ewc_penalty,
    logit_matching,
    outputs_by_head,
    replay_draw,
    reservoir_add,
    reservoir_slots,
    sgd_stability_limit,
)
from strategies.baselines.replay import DERPPParams, ReplayParams


# --- EWC ---------------------------------------------------------------------------------
def test_ewc_penalty_and_its_gradient_by_hand() -> None:
    # theta = (1, 2), theta* = (0, 1), F = (0.5, 2), lambda = 2:
    # (2/2) * (0.5 * 1 + 2 * 1) = 2.5; gradient lambda * F * (theta - theta*) = (1, 4)
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    penalty = ewc_penalty([theta], [torch.tensor([0.0, 1.0])], [torch.tensor([0.5, 2.0])], 2.0)
    assert float(penalty.detach()) == 2.5
    penalty.backward()
    assert theta.grad.tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="2 parameters with 1 anchors"):
        ewc_penalty([theta, theta], [theta], [theta, theta], 1.0)


class Tiny(nn.Module):
    """Two logits w * x of a scalar input x (no bias): d log p_c / d w_k = x (1[c=k] - p_k),
    so F_k = x^2 p_k (1 - p_k) for one sample."""

    def __init__(self, w: tuple[float, float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.heads = nn.ModuleList()

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        return x.reshape(-1, 1) * self.w


def test_diagonal_fisher_by_hand() -> None:
    # w = 0: p = (1/2, 1/2), F_k = x^2 / 4; samples x = 1 and x = 2: (1/4 + 4/4) / 2 = 5/8
    fisher, n = diagonal_fisher(Tiny((0.0, 0.0)), [torch.tensor([[1.0], [2.0]])], None)
    assert n == 2
    assert fisher["w"].tolist() == pytest.approx([5 / 8, 5 / 8], abs=1e-7)
    # w = (ln 3, 0), x = 1: p = (3/4, 1/4), F_k = 3/16
    fisher, _ = diagonal_fisher(Tiny((math.log(3), 0.0)), [torch.tensor([[1.0]])], None)
    assert fisher["w"].tolist() == pytest.approx([3 / 16, 3 / 16], abs=1e-7)


def test_online_fisher_decays_and_anchors_at_the_last_task() -> None:
    # F~ = (1, 0), F_new = (0, 2), gamma = 0.5 -> (0.5, 2); the anchor is the last task's
    q = FisherAnchor(online=True, gamma=0.5)
    q.add({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([5.0, 5.0])})
    q.add({"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([2.0, 1.0])})
    fisher, anchor = q.quadratic()  # type: ignore[misc]
    assert fisher["w"].tolist() == [0.5, 2.0]
    assert anchor["w"].tolist() == [2.0, 1.0]


def test_standard_ewc_folds_every_task_into_one_quadratic_with_the_same_gradient() -> None:
    # F1 = (1, 0) at (0, 0), F2 = (1, 2) at (2, 1): F = (2, 2), anchor = (2/2, 2/2) = (1, 1),
    # where F1 = 0 the anchor is F2's alone: 2*1/2 = 1
    q = FisherAnchor()
    assert q.quadratic() is None
    f1, t1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    f2, t2 = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    q.add({"w": f1}, {"w": t1})
    q.add({"w": f2}, {"w": t2})
    fisher, anchor = q.quadratic()  # type: ignore[misc]
    assert fisher["w"].tolist() == [2.0, 2.0] and anchor["w"].tolist() == [1.0, 1.0]
    theta = torch.tensor([3.0, 3.0], requires_grad=True)
    two = ewc_penalty([theta, theta], [t1, t2], [f1, f2], 1.0)
    one = ewc_penalty([theta], [anchor["w"]], [fisher["w"]], 1.0)
    g_two, = torch.autograd.grad(two, theta)
    g_one, = torch.autograd.grad(one, theta)
    assert g_two.tolist() == g_one.tolist() == [4.0, 4.0]
    # a parameter no task found important anchors at the last task's weights
    q = FisherAnchor()
    q.add({"w": torch.zeros(1)}, {"w": torch.ones(1)})
    assert q.quadratic()[1]["w"].tolist() == [1.0]  # type: ignore[index]


def _ctx(model: nn.Module, message: RecordDict | None = None, **kw: object) -> RoundContext:
    cfg = Config(clients=3, batch_size=2, local_epochs=1, lr=0.1, seed=0)
    fields = dict(config=cfg, model=model, x=None, y=None, head=None, task=1, round=2,
                  partition_id=0, device=torch.device("cpu"), mean=(0.0,), std=(1.0,),
                  message=message)
    fields.update(kw)
    return RoundContext(**fields)  # type: ignore[arg-type]


def test_ewc_trainer_penalises_the_weights_it_steps() -> None:
    """TARGET's FedEWC applies its penalty to the server's model object, so no gradient reaches
    the client's weights: here the gradient is on the parameters being stepped."""
    model = Tiny((1.0, 2.0))
    message = RecordDict({PENALTY_FISHER: ArrayRecord({"w": torch.tensor([0.5, 2.0])}),
                          PENALTY_ANCHOR: ArrayRecord({"w": torch.tensor([0.0, 1.0])})})
    trainer = EWCTrainer(EWCParams(ewc_lambda=2.0))
    params = list(model.parameters())
    term = trainer.regularizer(_ctx(model, message), params, [])
    assert float(term.detach()) == 2.5  # type: ignore[union-attr]
    term.backward()  # type: ignore[union-attr]
    assert model.w.grad.tolist() == [1.0, 4.0]
    # no quadratic in the message (the first task): no term
    assert EWCTrainer(EWCParams()).regularizer(_ctx(model, RecordDict()), params, []) is None


# --- LwF ---------------------------------------------------------------------------------
def test_distillation_by_hand() -> None:
    # teacher (0, ln 3) at T = 2: target softmax(0, ln 3 / 2) = (1, sqrt 3) / (1 + sqrt 3)
    teacher = torch.tensor([[0.0, math.log(3)]])
    target = torch.softmax(teacher / 2, dim=1)
    assert target[0].tolist() == pytest.approx([0.3660, 0.6340], abs=1e-4)
    student = teacher.clone().requires_grad_(True)
    kd = distillation_loss(student, teacher, 2.0)
    entropy = -(target * target.log()).sum()
    value = float(kd.detach())
    assert value == pytest.approx(float(entropy)) and value == pytest.approx(0.657, abs=1e-3)
    kd.backward()
    assert student.grad.abs().max() < 1e-7  # the target's entropy, at its minimum
    assert float(distillation_loss(torch.zeros(1, 2), teacher, 2.0)) == pytest.approx(
        math.log(2))


class Heads(nn.Module):
    """Logits of head h: x + bias + h (every row), ``width`` classes per head; x is
    [B, width]."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        return x + self.bias + (0.0 if task is None else float(task))


def test_lwf_distils_only_the_old_classes_in_class_il() -> None:
    """Class-IL, task 1 of classes (2, 3) after task 0's (0, 1): only logits 0 and 1 are
    distilled; the teacher's outputs are the student's plus (0, ln 3) on them."""
    scenario = SimpleNamespace(kind="class-il", tasks=[SimpleNamespace(classes=(0, 1)),
                                                       SimpleNamespace(classes=(2, 3))])
    student = Heads(4)
    teacher_state = {"bias": torch.tensor([0.0, math.log(3), 5.0, 7.0])}
    trainer = LwFTrainer(LwFParams(alpha=3.0, temperature=2.0))
    ctx = _ctx(student, RecordDict({TEACHER: ArrayRecord(teacher_state)}), scenario=scenario)
    trainer.before_training(ctx, student)
    inputs = torch.zeros(1, 4)
    outputs = student(inputs, None)
    # student logits (0, 0) on the old classes: 3 * ln 2, whatever the new classes' logits
    extra = trainer.extra_loss(ctx, outputs, inputs, torch.tensor([2]))
    assert float(extra) == pytest.approx(3 * math.log(2))  # type: ignore[arg-type]
    # the first task has no teacher
    trainer.before_training(_ctx(student, RecordDict({TEACHER: ArrayRecord(teacher_state)}),
                                 task=0, scenario=scenario), student)
    assert trainer.extra_loss(ctx, outputs, inputs, torch.tensor([2])) is None


def test_lwf_distils_every_old_head_in_task_il() -> None:
    """Task 2 of task-IL: heads 0 and 1 distilled, each ln 2 for student logits (h, h) and a
    teacher whose logits differ by ln 3, summed."""
    student = Heads()
    teacher_state = {"bias": torch.tensor([0.0, math.log(3)])}
    trainer = LwFTrainer(LwFParams(alpha=1.0, temperature=2.0))
    ctx = _ctx(student, RecordDict({TEACHER: ArrayRecord(teacher_state)}), task=2, head=2)
    trainer.before_training(ctx, student)
    inputs = torch.zeros(1, 2)
    extra = trainer.extra_loss(ctx, student(inputs, 2), inputs, torch.tensor([0]))
    assert float(extra) == pytest.approx(2 * math.log(2))  # type: ignore[arg-type]


# --- Reservoir ---------------------------------------------------------------------------
def test_reservoir_fills_then_replaces_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    # capacity 2: items 0 and 1 fill rows 0 and 1
    assert reservoir_slots(0, 0, 2, 2, gen) == ([0, 1], [0, 1])
    # item 2 (n = 2) enters only for j = floor(u * 3) in {0, 1}: with u from the generator
    gen = torch.Generator().manual_seed(1)
    u = float(torch.rand(1, generator=gen, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    j = int(u * 3)
    assert reservoir_slots(2, 2, 2, 1, gen) == (([0], [j]) if j < 2 else ([], []))
    # a buffer a purge left with one free row takes the next offer there, whatever n
    gen = torch.Generator().manual_seed(2)
    assert reservoir_slots(1000, 1, 2, 1, gen) == ([0], [1])


def test_reservoir_keeps_each_item_with_probability_k_over_n() -> None:
    """Over 10^5 seeded streams of 10 items into 2 rows, each item is kept with frequency
    2/10 = 0.2 +- 0.01 (mammoth's {0..n} draw; the A-GEM code's {0..n-1} would keep the first
    two with 0.2 * 10/9 and fail this)."""
    gen = torch.Generator().manual_seed(123)
    kept = torch.zeros(10)
    streams = 100_000
    for _ in range(streams):
        positions, _rows = reservoir_slots(0, 0, 2, 10, gen)
        kept[positions] += 1
    freq = kept / streams
    assert torch.all((freq - 0.2).abs() < 0.01), freq.tolist()
    assert float(kept.sum()) == 2 * streams  # both rows always hold exactly one item


def test_reservoir_add_offered_one_by_one_or_in_batches_is_the_same() -> None:
    """Offers of one batch land where the same offers one at a time land (the later of two
    offers for one row wins), and the buffer holds the rows' classes and columns."""
    items = torch.arange(20)

    def run(batches: list[int]) -> SampleBuffer:
        buf, seen, start = SampleBuffer(), 0, 0
        gen = torch.Generator().manual_seed(5)
        for size in batches:
            part = items[start:start + size]
            seen = reservoir_add(buf, seen, 4, gen, part % 10, x=part.float().unsqueeze(1))
            start += size
        assert seen == 20
        return buf

    one_by_one, batched = run([1] * 20), run([5, 7, 8])
    assert len(one_by_one) == len(batched) == 4
    assert one_by_one.columns["x"].tolist() == batched.columns["x"].tolist()
    assert batched.classes.tolist() == [int(v) % 10 for v in batched.columns["x"][:, 0]]


def test_training_reservoir_keeps_what_reservoir_add_keeps_and_writes_it_back() -> None:
    """A round of offers to a TrainingReservoir (the buffer held on the training device while
    a client trains) leaves the buffer exactly as the same offers made one by one with
    reservoir_add; rows drawn from it are the buffer's rows; the host copy of an on_host
    column agrees with the device column; the first offer names the columns and a later one
    with other columns is refused."""
    items = torch.arange(30)
    reference, seen_ref = SampleBuffer(), 0
    gen = torch.Generator().manual_seed(7)
    for start in range(0, 30, 6):
        part = items[start:start + 6]
        seen_ref = reservoir_add(reference, seen_ref, 5, gen, part % 10,
                                 x=part.float().unsqueeze(1), head=part % 3)

    buffer = SampleBuffer()
    reservoir = TrainingReservoir(buffer, 5, "cpu", on_host=("head",))
    gen, seen = torch.Generator().manual_seed(7), 0
    for start in range(0, 30, 6):
        part = items[start:start + 6]
        seen = reservoir.offer(seen, gen, part % 10, x=part.float().unsqueeze(1),
                               head=part % 3)
    assert seen == seen_ref == 30 and len(reservoir) == 5
    assert len(buffer) == 0  # nothing written back before save()
    reservoir.save(buffer)
    assert buffer.columns["x"].tolist() == reference.columns["x"].tolist()
    assert buffer.classes.tolist() == reference.classes.tolist()
    rows = torch.tensor([4, 0, 2])
    drawn = reservoir.rows(rows)
    assert drawn["x"].tolist() == reference.columns["x"][rows].tolist()
    assert reservoir.host_rows("head", rows).tolist() == reference.columns["head"][rows].tolist()
    wanted = r"a reservoir offer needs columns \['head', 'x'\], got \['x'\]"
    with pytest.raises(ValueError, match=wanted):
        reservoir.offer(seen, gen, items[:2], x=items[:2].float().unsqueeze(1))

    # a buffer a purge left short takes the next offers in its free rows, from its old rows on
    buffer.keep(torch.tensor([0, 1, 2]))
    again = TrainingReservoir(buffer, 5, "cpu", on_host=("head",))
    assert len(again) == 3 and again.host_rows("head", torch.tensor([2])).tolist() == (
        buffer.columns["head"][[2]].tolist())
    seen = again.offer(seen, torch.Generator().manual_seed(0), torch.tensor([1, 2]),
                       x=torch.tensor([[100.0], [101.0]]), head=torch.tensor([1, 2]))
    again.save(buffer)
    assert len(buffer) == 5 and buffer.columns["x"][3:].tolist() == [[100.0], [101.0]]
    assert buffer.classes[3:].tolist() == [1, 2] and seen == 32


def test_training_reservoir_allocates_what_it_holds_not_its_capacity() -> None:
    """A capacity of 10^9 rows with 30 samples offered allocates rows by doubling as the
    offers need them (6, 12, 24, 24, 48 after each batch of 6), not 10^9; a capacity of 5
    stops at 5."""
    reservoir = TrainingReservoir(SampleBuffer(), 10**9, "cpu", on_host=("head",))
    gen, seen = torch.Generator().manual_seed(0), 0
    for start in range(0, 30, 6):
        part = torch.arange(start, start + 6)
        seen = reservoir.offer(seen, gen, part % 10, x=part.float().unsqueeze(1), head=part)
    assert len(reservoir) == 30 and reservoir.size == 48
    assert reservoir.columns["x"].shape[0] == reservoir.host["head"].shape[0] == 48
    buffer = SampleBuffer()
    reservoir.save(buffer)
    assert buffer.columns["x"][:, 0].tolist() == [float(v) for v in range(30)]
    small = TrainingReservoir(SampleBuffer(), 5, "cpu")
    small.offer(0, gen, torch.arange(6), x=torch.zeros(6, 1))
    assert small.size == 5 and len(small) == 5


def test_sgd_stability_limit_is_where_torch_sgd_starts_to_diverge() -> None:
    """lr 0.1: the limit is 2/0.1 = 20 plain, 2(1 + 0.5)/0.1 = 30 with momentum 0.5. PyTorch's
    SGD on h x^2 / 2 from x = 1, in float64: at 0.99 times the limit |x| falls below 1e-2
    within 2000 steps, at 1.01 times it grows past 1e2 (the iteration's spectral radius is
    just below and just above 1 there)."""
    assert sgd_stability_limit(0.1) == pytest.approx(20.0)
    assert sgd_stability_limit(0.1, 0.5) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="the learning rate must be > 0, got 0"):
        sgd_stability_limit(0.0)
    for momentum in (0.0, 0.5, 0.9):
        limit = sgd_stability_limit(0.1, momentum)
        ends = []
        for h in (0.99 * limit, 1.01 * limit):
            x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
            opt = torch.optim.SGD([x], lr=0.1, momentum=momentum)
            for _ in range(2000):
                opt.zero_grad()
                (0.5 * h * x.pow(2)).sum().backward()
                opt.step()
            ends.append(abs(float(x)))
        assert ends[0] < 1e-2 and ends[1] > 1e2, (momentum, ends)


def test_replay_draw_takes_distinct_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = replay_draw(5, 3, gen)
    assert len(rows) == 3 and len(set(rows.tolist())) == 3 and max(rows.tolist()) < 5
    assert sorted(replay_draw(2, 10, gen).tolist()) == [0, 1]
    assert replay_draw(0, 10, gen).numel() == 0


def test_buffer_budget_total_or_per_client() -> None:
    total = ReplayParams(buffer_size=200)
    assert [total.capacity(k, 50) for k in (0, 49)] == [4, 4]
    ten = ReplayParams(buffer_size=10)
    assert [ten.capacity(k, 3) for k in range(3)] == [4, 3, 3]
    assert sum(ten.capacity(k, 3) for k in range(3)) == 10
    assert ReplayParams(buffer_size=200, buffer_scope="client").capacity(7, 50) == 200
    assert DERPPParams(buffer_size=500).capacity(0, 50) == 10


def test_sample_buffer_purge_keeps_order() -> None:
    buf = SampleBuffer()
    buf.append(torch.tensor([3, 1, 3, 2]), x=torch.tensor([[10], [11], [12], [13]]))
    assert buf.purge([3]) == 2
    assert buf.classes.tolist() == [1, 2] and buf.columns["x"].tolist() == [[11], [13]]
    assert buf.nbytes == 2 * 8 + 2 * 8


# --- DER / DER++ -------------------------------------------------------------------------
def test_der_logit_matching_by_hand() -> None:
    # z' = (1, 0, -1), f = (0, 0, 0): MSE 2/3; x alpha 0.2 = 0.1333; gradient 2(f - z')/(B C)
    f = torch.zeros(1, 3, requires_grad=True)
    z = torch.tensor([[1.0, 0.0, -1.0]])
    mse = logit_matching(f, z)
    assert float(mse.detach()) == pytest.approx(2 / 3)
    mse.backward()
    assert f.grad[0].tolist() == pytest.approx([-2 / 3, 0.0, 2 / 3])
    match, ce = derpp_terms(torch.zeros(1, 3), z, torch.tensor([[0.0, math.log(3)]]),
                            torch.tensor([1]), alpha=0.2, beta=0.5)
    assert float(match) == pytest.approx(0.2 * 2 / 3)
    # CE of logits (0, ln 3) for label 1: -log(3/4); x beta 0.5
    assert float(ce) == pytest.approx(-0.5 * math.log(0.75))
    match, ce = derpp_terms(torch.zeros(0, 3), z[:0], torch.zeros(0, 2),
                            torch.zeros(0, dtype=torch.long), 1.0, 1.0)
    assert float(match) == 0.0 and float(ce) == 0.0


def test_outputs_by_head_keeps_row_order() -> None:
    model = Heads()
    x = torch.zeros(3, 2)
    out = outputs_by_head(model, x, torch.tensor([1, 0, 1]))
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    assert outputs_by_head(model, x, torch.tensor([-1, -1, -1])).tolist() == [[0.0, 0.0]] * 3
