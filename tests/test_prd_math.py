"""Tests for fedcl.prd (PRD's math): hand-worked cases with explicit numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fedcl.prd import (
    aggregate_prototypes,
    augment,
    cosine_logits,
    prototype_logits,
    prototype_loss,
    relation_distillation,
    supcon_loss,
)

F64 = torch.float64


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _unit(angles: list[float]) -> torch.Tensor:
    return _t([[math.cos(a), math.sin(a)] for a in angles])


def _direct_supcon(angles: list[float], labels: list[int], tau: float, base: float) -> float:
    """SupCon written out with python loops and math.exp (no torch)."""
    z = [(math.cos(a), math.sin(a)) for a in angles]
    n = len(z)

    def dot(i: int, j: int) -> float:
        return z[i][0] * z[j][0] + z[i][1] * z[j][1]

    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(dot(i, a) / tau) for a in range(n) if a != i)
        l_i = -sum(math.log(math.exp(dot(i, p) / tau) / denominator) for p in positives)
        losses.append(l_i / len(positives))
    return (tau / base) * sum(losses) / len(losses)


# ------------------------------------------------------------------------------- supcon_loss


ANGLES = [0.0, 1.2, 0.3, 2.0]  # rows: sample 0 view 1, sample 1 view 1, sample 0 view 2, ...
LABELS = [0, 1, 0, 1]


def test_supcon_matches_direct_computation() -> None:
    got = supcon_loss(_unit(ANGLES), torch.tensor(LABELS), temperature=0.1, base_temperature=0.07)
    want = _direct_supcon(ANGLES, LABELS, 0.1, 0.07)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # A second temperature, and the default arguments.
    got = supcon_loss(_unit(ANGLES), torch.tensor(LABELS), temperature=0.5, base_temperature=0.3)
    assert got.item() == pytest.approx(_direct_supcon(ANGLES, LABELS, 0.5, 0.3), rel=1e-10)
    got = supcon_loss(_unit(ANGLES), torch.tensor(LABELS))
    assert got.item() == pytest.approx(_direct_supcon(ANGLES, LABELS, 0.1, 0.07), rel=1e-10)


def test_supcon_temperature_scaling() -> None:
    z, y = _unit(ANGLES), torch.tensor(LABELS)
    unscaled = supcon_loss(z, y, temperature=0.1, base_temperature=0.1)
    scaled = supcon_loss(z, y, temperature=0.1, base_temperature=0.07)
    assert scaled.item() == pytest.approx(unscaled.item() * 0.1 / 0.07, rel=1e-12)
    assert unscaled.item() == pytest.approx(_direct_supcon(ANGLES, LABELS, 0.1, 0.1), rel=1e-10)


def test_supcon_by_hand_two_rows() -> None:
    # Two rows with the same label: one positive, which is also the whole denominator, so each
    # l_i = -log(1) = 0; with different labels no anchor has a positive and the loss is 0.
    z = _unit([0.0, 1.0])
    assert supcon_loss(z, torch.tensor([3, 3])).item() == pytest.approx(0.0, abs=1e-12)
    assert supcon_loss(z, torch.tensor([3, 4])).item() == 0.0


def test_supcon_skips_anchors_without_positives() -> None:
    angles, labels = [0.0, 0.4, 2.5], [0, 0, 1]  # anchor 2 has no positive
    got = supcon_loss(_unit(angles), torch.tensor(labels), temperature=0.2, base_temperature=0.2)
    # Only anchors 0 and 1: each has one positive and two candidates in A(i).
    tau = 0.2
    l0 = -math.log(
        math.exp(math.cos(0.4) / tau)
        / (math.exp(math.cos(0.4) / tau) + math.exp(math.cos(2.5) / tau))
    )
    l1 = -math.log(
        math.exp(math.cos(0.4) / tau)
        / (math.exp(math.cos(0.4) / tau) + math.exp(math.cos(2.1) / tau))
    )
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-10)
    assert got.item() == pytest.approx(_direct_supcon(angles, labels, tau, tau), rel=1e-10)


def test_supcon_stable_at_small_temperature_and_has_gradient() -> None:
    z = torch.nn.functional.normalize(
        torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    )
    z.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3]).repeat(2)
    loss = supcon_loss(z, labels, temperature=0.001)
    assert torch.isfinite(loss)
    loss.backward()
    assert z.grad is not None
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().sum().item() > 0


def test_supcon_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        supcon_loss(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        supcon_loss(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------- prototype loss/logits


def test_prototype_loss_by_hand() -> None:
    h = _t([[1, 0], [0, 2]])
    protos = _t([[1, 0], [1, 1]])
    got = prototype_loss(h, protos, torch.tensor([0, 1]))
    assert got.item() == pytest.approx((1 - 0.70710678118654752) / 2, rel=1e-12)


def test_prototype_loss_trains_only_prototypes_with_detached_h() -> None:
    h = _t([[1, 0], [0, 2]]).requires_grad_(True)
    protos = _t([[1, 0.5], [1, 1]]).requires_grad_(True)
    prototype_loss(h.detach(), protos, torch.tensor([0, 1])).backward()
    assert h.grad is None
    assert protos.grad is not None
    assert protos.grad.abs().sum().item() > 0


def test_prototype_logits_normalise_prototypes_only() -> None:
    h = _t([[3, 4]])
    protos = _t([[1, 0], [0, 2], [1, 1]])
    got = prototype_logits(h, protos)
    assert got.tolist()[0] == pytest.approx([3.0, 4.0, 7 / math.sqrt(2)], rel=1e-12)


def test_cosine_logits_by_hand() -> None:
    h = _t([[3, 4], [0, -2]])
    protos = _t([[1, 0], [0, 2], [1, 1]])
    got = cosine_logits(h, protos).tolist()
    assert got[0] == pytest.approx([0.6, 0.8, 7 / (5 * math.sqrt(2))], rel=1e-12)
    assert got[1] == pytest.approx([0.0, -1.0, -1 / math.sqrt(2)], abs=1e-12)


# --------------------------------------------------------------------- relation_distillation


def _hand_kl(s_old: list[float], s_new: list[float], temp: float) -> float:
    e_old = [math.exp(s / temp) for s in s_old]
    e_new = [math.exp(s / temp) for s in s_new]
    p = [e / sum(e_old) for e in e_old]
    q = [e / sum(e_new) for e in e_new]
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def test_relation_distillation_by_hand() -> None:
    # s_old = [1, 2] (unit prototypes); s_new = [2, 1] (prototypes [3,0],[0,2] normalise to I).
    h_old, p_old = _t([[1, 2]]), _t([[1, 0], [0, 1]])
    h_new, p_new = _t([[2, 1]]), _t([[3, 0], [0, 2]])
    e = math.e
    p = [1 / (1 + e), e / (1 + e)]
    q = [e / (1 + e), 1 / (1 + e)]
    want = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])
    assert want == pytest.approx((e - 1) / (e + 1), rel=1e-12)  # (p1 − p0) · log(p1 / p0), log = 1
    got = relation_distillation(h_new, h_old, [p_new], [p_old])
    assert got.item() == pytest.approx(want, rel=1e-12)
    # Temperature 2.
    got = relation_distillation(h_new, h_old, [p_new], [p_old], temperature=2.0)
    assert got.item() == pytest.approx(_hand_kl([1, 2], [2, 1], 2.0), rel=1e-12)


def test_relation_distillation_sums_tasks_and_averages_batch() -> None:
    h_old, h_new = _t([[1, 2], [0, 1]]), _t([[2, 1], [1, 1]])
    t0_old, t0_new = _t([[1, 0], [0, 1]]), _t([[3, 0], [0, 2]])
    t1_old, t1_new = _t([[1, 1], [1, -1], [0, 1]]), _t([[1, 0], [1, -1], [0, 5]])
    r2 = 1 / math.sqrt(2)
    want = 0.0
    for ho, hn in zip(h_old.tolist(), h_new.tolist(), strict=True):
        want += _hand_kl(ho, hn, 1.0) / 2  # task 0: identity-like prototypes
        s_old = [(ho[0] + ho[1]) * r2, (ho[0] - ho[1]) * r2, ho[1]]
        s_new = [hn[0], (hn[0] - hn[1]) * r2, hn[1]]
        want += _hand_kl(s_old, s_new, 1.0) / 2
    got = relation_distillation(h_new, h_old, [t0_new, t1_new], [t0_old, t1_old])
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_relation_distillation_zero_when_equal_positive_when_different() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, generator=g, dtype=F64)
    protos = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(2, 4, generator=g, dtype=F64)]
    same = relation_distillation(h, h.clone(), protos, [p.clone() for p in protos])
    assert same.item() == pytest.approx(0.0, abs=1e-15)
    moved = relation_distillation(
        h + 0.5 * torch.randn(5, 4, generator=g, dtype=F64), h, protos, protos
    )
    assert moved.item() > 1e-4


def test_relation_distillation_empty_is_zero() -> None:
    h = torch.randn(3, 4, requires_grad=True)
    got = relation_distillation(h, h.detach(), [], [])
    assert got.shape == ()
    assert got.item() == 0.0
    assert got.device == h.device


def test_relation_distillation_gradients_reach_new_not_old() -> None:
    g = torch.Generator().manual_seed(2)
    h_new = torch.randn(6, 4, generator=g).requires_grad_(True)
    h_old = torch.randn(6, 4, generator=g).requires_grad_(True)
    p_new = [torch.randn(3, 4, generator=g).requires_grad_(True) for _ in range(2)]
    p_old = [torch.randn(3, 4, generator=g).requires_grad_(True) for _ in range(2)]
    loss = relation_distillation(h_new, h_old.detach(), p_new, [p.detach() for p in p_old])
    assert loss.item() > 0
    loss.backward()
    assert h_new.grad is not None and h_new.grad.abs().sum().item() > 0
    for p in p_new:
        assert p.grad is not None and p.grad.abs().sum().item() > 0
    assert h_old.grad is None
    assert all(p.grad is None for p in p_old)


def test_relation_distillation_rejects_mismatch() -> None:
    h = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        relation_distillation(h, h, [torch.ones(2, 3)], [])
    with pytest.raises(ValueError):
        relation_distillation(h, h, [torch.ones(2, 3)], [torch.ones(4, 3)])


# ---------------------------------------------------------------------- aggregate_prototypes


def test_aggregate_prototypes_by_hand() -> None:
    old = _t([[0, 0], [5, 5], [9, 9]])
    client0 = _t([[1, 0], [7, 7], [100, 100]])
    client1 = _t([[4, 2], [8, 8], [2, 4]])
    counts0 = torch.tensor([1, 0, 0])  # class 2 absent from client 0
    counts1 = torch.tensor([3, 0, 2])  # class 1 absent from both
    got = aggregate_prototypes(old, [client0, client1], [counts0, counts1])
    want = _t(
        [
            [(1 * 1 + 3 * 4) / 4, (1 * 0 + 3 * 2) / 4],  # [3.25, 1.5]
            [5, 5],  # nobody touched class 1: keeps the old prototype
            [2, 4],  # only client 1 touched class 2: its prototype, undiluted
        ]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got.dtype == old.dtype
    assert old.tolist() == [[0, 0], [5, 5], [9, 9]]  # not modified in place


def test_aggregate_prototypes_no_clients_keeps_old() -> None:
    old = _t([[1, 2], [3, 4]])
    torch.testing.assert_close(aggregate_prototypes(old, [], []), old)


def test_aggregate_prototypes_validates() -> None:
    old = torch.zeros(3, 2)
    with pytest.raises(ValueError):
        aggregate_prototypes(old, [torch.zeros(3, 2)], [])
    with pytest.raises(ValueError):
        aggregate_prototypes(old, [torch.zeros(2, 2)], [torch.ones(3)])
    with pytest.raises(ValueError):
        aggregate_prototypes(old, [torch.zeros(3, 2)], [torch.ones(2)])
    with pytest.raises(ValueError):
        aggregate_prototypes(old, [torch.zeros(3, 2)], [torch.tensor([1.0, -1.0, 0.0])])
    with pytest.raises(ValueError):
        aggregate_prototypes(torch.zeros(3), [], [])


# ----------------------------------------------------------------------------------- augment


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 32, 32)])
def test_augment_shape_dtype_reproducible(shape: tuple[int, int, int, int]) -> None:
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = torch.get_rng_state()
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), before)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    # Each sample gets its own draw: identical inputs give different outputs.
    same = x[:1].repeat(4, 1, 1, 1)
    out = augment(same, torch.Generator().manual_seed(3))
    assert not torch.equal(out[0], out[1])


def test_augment_advances_generator() -> None:
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    g = torch.Generator().manual_seed(5)
    first = augment(x, g)
    second = augment(x, g)
    assert not torch.equal(first, second)


def test_augment_rejects_bad_input() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 1, 8, 8), g)  # float
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), g)  # 2 channels
    with pytest.raises(ValueError):
        augment(torch.zeros(1, 8, 8, dtype=torch.uint8), g)
