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
    fresh_adam_step,
    gradient_restriction_term,
    linear_cka,
    prediction_entropy,
    project_forget_gradient,
    relative_distance,
    sgd_step,
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


# --- IAU --------------------------------------------------------------------------------------
def _softmax_regression() -> nn.Linear:
    """Two classes, one input: logits ``z = W x + b``, ``W`` (2, 1) and ``b`` (2,) zero."""
    model = nn.Linear(1, 2).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def test_gradient_restriction_term_by_hand() -> None:
    """x = 2, y = 0, W = 0, b = 0: p = (1/2, 1/2), dCE/dz = p - e_0 = (-1/2, 1/2), so
    dCE/dW = (p - e_0) x = (-1, 1) (norm sqrt 2) and dCE/db = (-1/2, 1/2) (norm sqrt(1/2)):
    the term is sqrt 2 + sqrt(1/2) = 1.5 sqrt 2.

    Its own gradient, by hand: with two classes p - e_0 = (-s, s), s = sigmoid(z_1 - z_0), so
    the term is R = sqrt 2 s (|x| + 1); dR/dz_1 = sqrt 2 (|x| + 1) s (1 - s) = 0.75 sqrt 2 at
    s = 1/2, x = 2. So dR/db = (-0.75 sqrt 2, 0.75 sqrt 2) and dR/dW = dR/db * x =
    (-1.5 sqrt 2, 1.5 sqrt 2): what backward through the term (double backprop) gives."""
    model = _softmax_regression()
    x, y = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([0])
    loss = nn.functional.cross_entropy(model(x), y)
    term = gradient_restriction_term(loss, model.parameters())
    root2 = 2 ** 0.5
    assert float(term.detach()) == pytest.approx(1.5 * root2, rel=1e-12)
    term.backward()
    torch.testing.assert_close(model.weight.grad,
                               torch.tensor([[-1.5 * root2], [1.5 * root2]], dtype=torch.float64))
    torch.testing.assert_close(model.bias.grad,
                               torch.tensor([-0.75 * root2, 0.75 * root2], dtype=torch.float64))
    # a tensor the loss does not reach adds nothing; a non-scalar loss is refused
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    loss = nn.functional.cross_entropy(model(x), y)
    assert float(gradient_restriction_term(loss, [*model.parameters(), unused]).detach()) \
        == pytest.approx(1.5 * root2, rel=1e-12)
    with pytest.raises(ValueError, match="scalar loss"):
        gradient_restriction_term(model(x).sum(1), model.parameters())


def test_gradient_restriction_gradient_matches_finite_differences() -> None:
    """A two-layer tanh network in float64 at random weights: the gradient of
    CE + 0.005 * GR that backward gives (through the gradient's own graph) agrees with central
    differences of its value, entry by entry, to 1e-6 relative (step 1e-6: float64's
    differences are good to about 1e-9 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    params = list(model.parameters())

    def objective() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss + 0.005 * gradient_restriction_term(loss, params)

    objective().backward()
    analytic = [p.grad.clone() for p in params]
    h = 1e-6
    with torch.no_grad():
        for p, grad in zip(params, analytic, strict=True):
            flat, gflat = p.view(-1), grad.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + h
                with torch.enable_grad():
                    up = float(objective().detach())
                flat[i] = old - h
                with torch.enable_grad():
                    down = float(objective().detach())
                flat[i] = old
                assert (up - down) / (2 * h) == pytest.approx(float(gflat[i]), rel=1e-6,
                                                              abs=1e-9)
    # and the term is not a constant: its share of the gradient is measurable
    for p in params:
        p.grad = None
    nn.functional.cross_entropy(model(x), y).backward()
    assert any(not torch.allclose(p.grad, g, rtol=0, atol=1e-6)
               for p, g in zip(params, analytic, strict=True))


def test_fresh_adam_step_by_hand_and_as_torch_takes_it() -> None:
    """lr 0.01, eps 1e-8: the step is lr g / (|g| + eps). g = 2 -> 0.01 * 2 / (2 + 1e-8);
    g = -1e-3 -> -0.01 * 1e-3 / (1e-3 + 1e-8); g = 0 -> 0; g = 1e-8 -> 0.01 / 2 (the one
    coordinate where eps matters). Equal to torch.optim.Adam's first step on the same
    gradient (float64), and its dtype is the parameter's."""
    theta = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64),
             "b": torch.tensor([0.5], dtype=torch.float64)}
    g = {"w": torch.tensor([2.0, -1e-3, 0.0, 1e-8], dtype=torch.float64),
         "b": torch.tensor([-4.0], dtype=torch.float64)}
    out = fresh_adam_step(theta, g, lr=0.01)
    expect = [1 - 0.01 * 2 / (2 + 1e-8), 1 + 0.01 * 1e-3 / (1e-3 + 1e-8), 1.0, 1 - 0.005]
    for got, want in zip(out["w"].tolist(), expect, strict=True):
        assert got == pytest.approx(want, rel=1e-14)
    assert float(out["b"][0]) == pytest.approx(0.5 + 0.01 * 4 / (4 + 1e-8), rel=1e-14)
    params = {k: nn.Parameter(v.clone()) for k, v in theta.items()}
    opt = torch.optim.Adam(params.values(), lr=0.01)
    for k, p in params.items():
        p.grad = g[k].clone()
    opt.step()
    for k, p in params.items():
        torch.testing.assert_close(out[k], p.detach(), rtol=1e-14, atol=0)
    assert torch.equal(theta["w"], torch.ones(4, dtype=torch.float64))  # inputs unchanged
    half = fresh_adam_step({"w": torch.ones(2)}, {"w": torch.tensor([3.0, -3.0])}, lr=0.5)
    assert half["w"].dtype == torch.float32
    torch.testing.assert_close(half["w"], torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="lr > 0"):
        fresh_adam_step(theta, g, lr=0.0)


def test_sgd_step_by_hand() -> None:
    """theta - lr g: (1, 2) - 0.5 (4, -2) = (-1, 3), exact in float32."""
    out = sgd_step({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, -2.0])}, lr=0.5)
    assert torch.equal(out["w"], torch.tensor([-1.0, 3.0]))
    with pytest.raises(ValueError, match="lr > 0"):
        sgd_step({"w": torch.ones(1)}, {"w": torch.ones(1)}, lr=-1.0)
