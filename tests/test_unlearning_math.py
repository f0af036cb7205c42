"""The unlearning math on hand-worked tensors (fedcl.unlearning_math)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedcl.unlearning_math import (
    entropy_mia,
    federaser_calibrate,
    fisher_importance,
    linear_cka,
    prediction_entropy,
    project_forget_gradient,
    relative_distance,
    ssd_dampen,
)


def test_fisher_importance_is_the_mean_squared_batch_gradient() -> None:
    """W = 0 gives softmax (1/2, 1/2); d CE / dW = (p - onehot) x. Batch 1 (x=2, y=0):
    [[-1], [1]], squared [[1], [1]]; batch 2 (x=4, y=1): [[2], [-2]], squared [[4], [4]];
    mean [[2.5], [2.5]]. Dropout is off (eval mode) and the mode is restored."""
    model = nn.Sequential(nn.Dropout(0.9), nn.Linear(1, 2, bias=False))
    nn.init.zeros_(model[1].weight)
    model.train()
    batches = [(torch.tensor([[2.0]]), torch.tensor([0])),
               (torch.tensor([[4.0]]), torch.tensor([1]))]
    imp = fisher_importance(model, batches)
    assert torch.allclose(imp["1.weight"], torch.tensor([[2.5], [2.5]]))
    assert model.training
    with pytest.raises(ValueError, match="no batches"):
        fisher_importance(model, [])


def test_ssd_dampens_only_selected_parameters_and_never_scales_up() -> None:
    """alpha 10, lam 1. I_D = [1, 1, 1, 0.5], I_f = [5, 20, 40, 100]: the first is not
    selected (5 <= 10); the others get beta = 1/20, 1/40, 0.5/100."""
    theta = {"w": torch.tensor([2.0, 2.0, 2.0, 2.0])}
    out = ssd_dampen(theta, {"w": torch.tensor([1.0, 1.0, 1.0, 0.5])},
                     {"w": torch.tensor([5.0, 20.0, 40.0, 100.0])}, alpha=10, lam=1)
    assert torch.allclose(out["w"], torch.tensor([2.0, 0.1, 0.05, 0.01]))
    assert torch.equal(theta["w"], torch.tensor([2.0, 2.0, 2.0, 2.0]))
    # lam large: beta = min(lam I_D / I_f, 1) = 1, no parameter grows
    same = ssd_dampen(theta, {"w": torch.ones(4)}, {"w": torch.full((4,), 20.0)}, alpha=10,
                      lam=100)
    assert torch.equal(same["w"], theta["w"])
    with pytest.raises(ValueError, match="positive"):
        ssd_dampen(theta, {"w": torch.ones(4)}, {"w": torch.ones(4)}, alpha=0, lam=1)


def test_federaser_takes_length_from_the_stored_update_and_direction_from_calibration() -> None:
    """||oldU|| = ||(3, 4)|| = 5; newU = (0, 2) has direction (0, 1): new global (1, 1) + (0, 5).
    A tensor with a zero calibration update keeps the new global value."""
    out = federaser_calibrate({"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([7.0])},
                              {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])},
                              {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0])})
    assert torch.allclose(out["a"], torch.tensor([1.0, 6.0]))
    assert torch.equal(out["b"], torch.tensor([7.0]))


def test_forget_gradient_projection_uses_one_dot_product_over_all_tensors() -> None:
    """g_f = (1 | 1), g_r = (1 | 0) split over two tensors: <g_f, g_r> = 1, <g_r, g_r> = 1,
    so g_f - g_r = (0 | 1), which is orthogonal to g_r."""
    gf = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
    gr = {"a": torch.tensor([1.0]), "b": torch.tensor([0.0])}
    out = project_forget_gradient(gf, gr)
    assert torch.allclose(out["a"], torch.tensor([0.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0]))
    # g_f = (2, 1), g_r = (1, 1): coefficient 3/2, result (0.5, -0.5)
    out = project_forget_gradient({"a": torch.tensor([2.0, 1.0])}, {"a": torch.tensor([1.0, 1.0])})
    assert torch.allclose(out["a"], torch.tensor([0.5, -0.5]))
    zero = project_forget_gradient(gf, {"a": torch.zeros(1), "b": torch.zeros(1)})
    assert torch.equal(zero["a"], gf["a"]) and torch.equal(zero["b"], gf["b"])


def test_linear_cka_hand_worked_and_invariances() -> None:
    """1-d features: CKA is the squared cosine of the centred vectors. x = (1, 2, 3) centres to
    (-1, 0, 1), y = (1, 1, -2): dot -3, norms^2 2 and 6, CKA 9/12 = 0.75."""
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [1.0], [-2.0]])
    assert linear_cka(x, y) == pytest.approx(0.75)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 8, generator=gen)
    assert linear_cka(feats, feats) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    assert linear_cka(feats, feats @ q) == pytest.approx(1.0)
    assert linear_cka(feats, 3.5 * feats) == pytest.approx(1.0)
    other = torch.randn(50, 8, generator=gen)
    assert linear_cka(feats, other) < 0.5
    with pytest.raises(ValueError, match="same n"):
        linear_cka(feats, other[:10])


def test_entropy_and_membership_attack() -> None:
    """Uniform logits over 4 classes have entropy ln 4. Members (low entropy) and non-members
    (high entropy) are separable: low-entropy forget samples are judged members, high ones are
    not, a half-and-half forget set gives 0.5."""
    ent = prediction_entropy(torch.zeros(2, 4))
    assert torch.allclose(ent, torch.full((2,), np.log(4), dtype=torch.float64))
    member = np.array([0.05, 0.1, 0.15, 0.2])
    nonmember = np.array([1.8, 2.0, 2.2, 2.4])
    assert entropy_mia(member, nonmember, np.array([0.1, 0.12])) == 1.0
    assert entropy_mia(member, nonmember, np.array([2.1, 2.3])) == 0.0
    assert entropy_mia(member, nonmember, np.array([0.1, 2.1])) == 0.5
    with pytest.raises(ValueError, match="needs member"):
        entropy_mia(member, nonmember, np.array([]))


def test_relative_distance() -> None:
    """b = (0, 0 | 1), a = (3, 4 | 1): ||a - b|| / ||b|| = sqrt(25) / sqrt(1) = 5; integer
    tensors are left out."""
    a = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0]), "n": torch.tensor([5])}
    b = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0]), "n": torch.tensor([1])}
    assert relative_distance(a, b) == pytest.approx(5.0)
    assert relative_distance(b, b) == 0.0
