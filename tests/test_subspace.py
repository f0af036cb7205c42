"""Tests for fedcl.subspace (FOT's subspace math): hand-worked cases with explicit numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedcl.models import build_model
from fedcl.subspace import (
    adjusted_threshold,
    collect_representations,
    energy_ratio,
    expand_basis,
    layer_inputs,
    project_out,
    projected_layers,
    residualize,
    select_rank,
    sketch,
)

F64 = torch.float64


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _eye_cols(d: int, *idx: int) -> torch.Tensor:
    return torch.eye(d, dtype=F64)[:, list(idx)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=_gen(seed), dtype=F64))
    return q


# ---------------------------------------------------------------------------------------------
# project_out
# ---------------------------------------------------------------------------------------------

U12 = _eye_cols(4, 0, 1)  # span(e1, e2) in R^4


def test_update_inside_span_projects_to_zero() -> None:
    delta = _t([[1.0, 2.0, 0.0, 0.0], [3.0, -1.0, 0.0, 0.0]])
    assert project_out(delta, U12).abs().max() < 1e-6


def test_update_orthogonal_to_span_passes_unchanged() -> None:
    delta = _t([[0.0, 0.0, 5.0, -2.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(project_out(delta, U12), delta, atol=1e-6, rtol=0)


def test_mixed_update_keeps_exactly_its_orthogonal_component() -> None:
    delta = _t([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 2.0, 5.0]])
    expected = _t([[0.0, 0.0, 3.0, 4.0], [0.0, 0.0, 2.0, 5.0]])
    torch.testing.assert_close(project_out(delta, U12), expected, atol=1e-6, rtol=0)
    # A rotated basis of the same span gives the same projection.
    rot = _t([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]])
    torch.testing.assert_close(project_out(delta, U12 @ rot), expected, atol=1e-6, rtol=0)


def test_project_out_without_basis_is_identity_copy() -> None:
    delta = _t([[1.0, 2.0]])
    for basis in (None, torch.empty(2, 0, dtype=F64)):
        out = project_out(delta, basis)
        assert torch.equal(out, delta) and out.data_ptr() != delta.data_ptr()


def test_project_out_conv_reshape_semantics() -> None:
    delta = torch.randn(3, 2, 3, 3, generator=_gen(1), dtype=F64)
    U = _orthonormal(18, 4, seed=2)
    out = project_out(delta, U)
    assert out.shape == delta.shape
    d2 = delta.reshape(3, 18)  # manual flatten, (C, kh, kw) order
    expected = (d2 - d2 @ U @ U.T).reshape(3, 2, 3, 3)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert (out.reshape(3, -1) @ U).abs().max() < 1e-12
    # U = e_j with j = c*9 + a*3 + b zeroes exactly the weights delta[:, c, a, b].
    c, a, b = 1, 2, 0
    out = project_out(delta, _eye_cols(18, c * 9 + a * 3 + b))
    assert torch.all(out[:, c, a, b] == 0)
    mask = torch.ones_like(delta, dtype=torch.bool)
    mask[:, c, a, b] = False
    assert torch.equal(out[mask], delta[mask])


def test_project_out_checks_shapes() -> None:
    with pytest.raises(ValueError, match="flattens"):
        project_out(torch.zeros(3, 5, dtype=F64), U12)
    with pytest.raises(ValueError, match=">= 2 dims"):
        project_out(torch.zeros(4, dtype=F64), U12)


def test_projected_conv_update_keeps_outputs_on_old_inputs() -> None:
    """End to end: im2col basis + projection leave the layer's output on old inputs unchanged."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dtype=F64)
    x = torch.randn(1, 2, 5, 5, generator=_gen(3), dtype=F64)
    R = layer_inputs(conv, x)  # (18, 9): rank 9 < 18
    P, S, _ = torch.linalg.svd(R, full_matrices=False)
    U = P[:, S > 1e-10]
    delta = torch.randn_like(conv.weight, dtype=F64)
    with torch.no_grad():
        before = conv(x)
        conv.weight += project_out(delta, U)
        after = conv(x)
        assert (after - before).abs().max() < 1e-10
        conv.weight += delta  # an unprojected update does change it
        assert (conv(x) - before).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# select_rank, adjusted_threshold
# ---------------------------------------------------------------------------------------------

S3210 = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9/14, 13/14, 14/14


@pytest.mark.parametrize(
    ("threshold", "k"),
    [(0.5, 1), (0.9, 2), (0.95, 3), (9 / 14, 2), (0.0, 0), (-0.3, 0), (1.0, 3), (2.0, 3)],
)
def test_select_rank_known_spectrum(threshold: float, k: int) -> None:
    assert select_rank(S3210, threshold) == k


def test_select_rank_edge_cases() -> None:
    assert select_rank(torch.zeros(5), 0.5) == 0
    assert select_rank(torch.tensor([1.0, 2.0, 3.0, 0.0]), 0.5) == 1  # sorted internally
    assert select_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.99) == 4  # at most len(s)
    with pytest.raises(ValueError):
        select_rank(S3210, float("nan"))


def test_adjusted_threshold_hand_computed() -> None:
    # r_bar = 0.25*0.5 + 0.75*1.0 = 0.875; eps' = (0.875 - 0.04) / 0.875 = 0.9542857...
    got = adjusted_threshold(0.96, [0.5, 1.0], [100, 300])
    assert got == pytest.approx(0.835 / 0.875, abs=1e-12)
    assert got == pytest.approx(0.9542857142857143, abs=1e-12)
    # No basis (all r = 1): eps' = eps.
    assert adjusted_threshold(0.94, [1.0, 1.0, 1.0], [5, 7, 9]) == pytest.approx(0.94)
    # Equal counts: plain mean r_bar = 0.8 -> eps' = (0.8 - 0.1) / 0.8 = 0.875.
    assert adjusted_threshold(0.9, [0.6, 1.0], [10, 10]) == pytest.approx(0.875)


def test_adjusted_threshold_nothing_to_add() -> None:
    # r_bar = 0.03 <= 1 - eps = 0.04 -> (0.03 - 0.04) / 0.03 = -1/3: add nothing.
    got = adjusted_threshold(0.96, [0.03], [10])
    assert got == pytest.approx(-1 / 3)
    assert select_rank(S3210, got) == 0
    assert adjusted_threshold(0.96, [0.04], [10]) == pytest.approx(0.0, abs=1e-12)
    assert adjusted_threshold(0.96, [0.0, 0.0], [1, 2]) == 0.0


def test_adjusted_threshold_validates() -> None:
    with pytest.raises(ValueError):
        adjusted_threshold(0.9, [0.5], [1, 2])
    with pytest.raises(ValueError):
        adjusted_threshold(0.9, [], [])
    with pytest.raises(ValueError):
        adjusted_threshold(0.9, [0.5], [0])
    with pytest.raises(ValueError):
        adjusted_threshold(1.5, [0.5], [1])


# ---------------------------------------------------------------------------------------------
# residualize, energy_ratio
# ---------------------------------------------------------------------------------------------


def test_residualize_hand_computed() -> None:
    R = _t([[1.0, 2.0], [2.0, 0.0], [2.0, 1.0]])  # ||R||_F^2 = 14
    e1 = _eye_cols(3, 0)
    R_hat, r = residualize(R, e1)
    torch.testing.assert_close(R_hat, _t([[0.0, 0.0], [2.0, 0.0], [2.0, 1.0]]))
    # ||R_hat||_F^2 = 9 -> r = 3 / sqrt(14) = 0.8018; energy = 9/14 = 0.6429.
    assert r == pytest.approx(3 / math.sqrt(14), abs=1e-12)
    assert r == pytest.approx(0.8017837257372732, abs=1e-12)
    energy = energy_ratio(R, e1)
    assert energy == pytest.approx(9 / 14, abs=1e-12)
    assert energy == pytest.approx(r * r, abs=1e-12)
    assert r - energy > 0.15  # the two criteria differ ...
    # ... and so do the thresholds they lead to: 1 - 0.04/r vs 1 - 0.04/r^2.
    assert adjusted_threshold(0.96, [r], [1]) == pytest.approx(1 - 0.04 / r)
    assert adjusted_threshold(0.96, [r], [1]) > adjusted_threshold(0.96, [energy], [1]) + 0.01


def test_residualize_edge_cases() -> None:
    R = _t([[1.0, 2.0], [2.0, 0.0], [2.0, 1.0]])
    for basis in (None, torch.empty(3, 0, dtype=F64)):
        R_hat, r = residualize(R, basis)
        assert torch.equal(R_hat, R) and r == 1.0
        assert energy_ratio(R, basis) == 1.0
    R_hat, r = residualize(torch.zeros(3, 4, dtype=F64), _eye_cols(3, 0))
    assert r == 0.0 and torch.all(R_hat == 0)
    # R inside span(U): residual ~0 and r ~0.
    R_hat, r = residualize(_eye_cols(3, 0, 1) @ _t([[1.0, 2.0], [3.0, 4.0]]), _eye_cols(3, 0, 1))
    assert R_hat.abs().max() < 1e-12 and r < 1e-12
    with pytest.raises(ValueError):
        residualize(R, _eye_cols(4, 0))


# ---------------------------------------------------------------------------------------------
# layer_inputs, collect_representations
# ---------------------------------------------------------------------------------------------


def test_layer_inputs_conv_im2col_matches_hand_built_patches() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dtype=F64)
    x = torch.randn(1, 2, 5, 5, generator=_gen(4), dtype=F64)
    R = layer_inputs(conv, x)
    # out = floor((5 + 2 - 3) / 2) + 1 = 3 per side -> L = 9; d = 2*3*3 = 18.
    assert R.shape == (18, 9)
    xp = torch.zeros(2, 7, 7, dtype=F64)
    xp[:, 1:6, 1:6] = x[0]
    cols = []
    for i in range(3):
        for j in range(3):
            patch = [
                xp[c, 2 * i + a, 2 * j + b].item()
                for c in range(2)
                for a in range(3)
                for b in range(3)
            ]
            cols.append(patch)
    expected = torch.tensor(cols, dtype=F64).T
    torch.testing.assert_close(R, expected, atol=0, rtol=0)
    # The patches are exactly what the layer multiplies.
    with torch.no_grad():
        out = conv(x)
        manual = conv.weight.view(3, -1) @ R + conv.bias.view(3, 1)
    torch.testing.assert_close(manual.reshape(1, 3, 3, 3), out, atol=1e-12, rtol=0)


def test_layer_inputs_conv_columns_are_sample_major() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dtype=F64)
    x = torch.randn(2, 2, 5, 5, generator=_gen(5), dtype=F64)
    R = layer_inputs(conv, x)
    assert R.shape == (18, 18)
    torch.testing.assert_close(R[:, :9], layer_inputs(conv, x[:1]), atol=0, rtol=0)
    torch.testing.assert_close(R[:, 9:], layer_inputs(conv, x[1:]), atol=0, rtol=0)


def test_layer_inputs_conv_1x1_strided_shortcut() -> None:
    conv = nn.Conv2d(4, 6, kernel_size=1, stride=2, bias=False, dtype=F64)
    x = torch.randn(1, 4, 6, 6, generator=_gen(6), dtype=F64)
    R = layer_inputs(conv, x)
    assert R.shape == (4, 9)
    torch.testing.assert_close(R, x[0, :, ::2, ::2].reshape(4, 9), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            (conv.weight.view(6, -1) @ R).reshape(1, 6, 3, 3), conv(x), atol=1e-12, rtol=0
        )


def test_layer_inputs_linear_columns_are_input_vectors() -> None:
    lin = nn.Linear(4, 2, dtype=F64)
    x = _t([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.0, -1.0, 0.0, 1.0]])
    R = layer_inputs(lin, x)
    assert R.shape == (4, 3)
    for j in range(3):
        assert torch.equal(R[:, j], x[j])
    with pytest.raises(ValueError):
        layer_inputs(lin, torch.zeros(3, 5))
    with pytest.raises(TypeError):
        layer_inputs(nn.ReLU(), x)  # type: ignore[arg-type]


def test_collect_representations_mlp() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 3)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names == ["heads.0", "body.2", "body.5"]  # body.1 is the input Dropout
    model.train()
    x1 = torch.randn(5, 1, 4, 4, generator=_gen(7))
    x2 = torch.randn(3, 1, 4, 4, generator=_gen(8))
    reps = collect_representations(model, ["body.2", "body.5"], [(x1, None), (x2, None)])
    flat = torch.cat([x1, x2]).reshape(8, 16)
    assert reps["body.2"].shape == (16, 8)
    # Equal to the raw flattened inputs: dropout is off in eval mode.
    assert torch.equal(reps["body.2"], flat.T)
    with torch.no_grad():
        hidden = torch.relu(model.body[2](flat))
    torch.testing.assert_close(reps["body.5"], hidden.T)
    # Hooks are removed and the training flags restored.
    for name in ("body.2", "body.5"):
        assert len(model.get_submodule(name)._forward_pre_hooks) == 0
    assert model.training and all(m.training for m in model.modules())


def test_collect_representations_removes_hooks_on_error() -> None:
    model = build_model("mlp", (1, 4, 4), 3, num_heads=2)
    model.train()
    x = torch.randn(2, 1, 4, 4)
    # The body's hooks fire, then the head lookup fails (task 7 of 2).
    with pytest.raises(ValueError, match="out of range"):
        collect_representations(model, ["body.2", "body.5"], [(x, 0), (x, 7)])
    for name in ("body.2", "body.5"):
        assert len(model.get_submodule(name)._forward_pre_hooks) == 0
    assert model.training
    with pytest.raises(RuntimeError, match="no input"):
        collect_representations(model, ["body.2"], [])
    with pytest.raises(TypeError):
        collect_representations(model, ["body.1"], [(torch.randn(1, 1, 4, 4), None)])


def test_collect_representations_conv_and_heads() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 2, num_heads=2)
    x = torch.randn(3, 1, 8, 8, generator=_gen(9))
    reps = collect_representations(model, ["body.0", "body.3"], [(x, 1)], dtype=F64)
    assert reps["body.0"].shape == (9, 3 * 64) and reps["body.0"].dtype == F64
    assert reps["body.3"].shape == (32 * 9, 3 * 16)
    torch.testing.assert_close(reps["body.0"], layer_inputs(model.body[0], x).to(F64))


# ---------------------------------------------------------------------------------------------
# sketch
# ---------------------------------------------------------------------------------------------


def test_sketch_shape_bound_and_determinism() -> None:
    R_hat = torch.randn(6, 40, generator=_gen(10), dtype=F64)
    Y = sketch(R_hat, 9, _gen(11))
    assert Y.shape == (6, 9) and Y.dtype == F64
    # |G| <= 1 entrywise -> |Y_ij| <= sum_l |R_hat_il|.
    assert torch.all(Y.abs() <= R_hat.abs().sum(dim=1, keepdim=True) + 1e-12)
    assert torch.equal(Y, sketch(R_hat, 9, _gen(11)))
    assert not torch.equal(Y, sketch(R_hat, 9, _gen(12)))
    # G is U[-1, 1] (uniform) or N(0, 1) (normal) from the given generator.
    G = torch.rand(40, 9, generator=_gen(11), dtype=F64) * 2 - 1
    torch.testing.assert_close(Y, R_hat @ G)
    G = torch.randn(40, 9, generator=_gen(11), dtype=F64)
    torch.testing.assert_close(sketch(R_hat, 9, _gen(11), dist="normal"), R_hat @ G)
    assert torch.all(sketch(torch.zeros(6, 40, dtype=F64), 9, _gen(11)) == 0)
    with pytest.raises(ValueError):
        sketch(R_hat, 9, _gen(11), dist="laplace")


def test_sketch_column_space_inside_residual_column_space() -> None:
    A = torch.randn(5, 2, generator=_gen(13), dtype=F64)
    R_hat = A @ torch.randn(2, 30, generator=_gen(14), dtype=F64)  # rank 2 in R^5
    Q, _ = torch.linalg.qr(A)
    for dist in ("uniform", "normal"):
        Y = sketch(R_hat, 5, _gen(15), dist=dist)
        assert (Y - Q @ (Q.T @ Y)).abs().max() < 1e-10
        assert Y.abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# expand_basis
# ---------------------------------------------------------------------------------------------


def _projector(U: torch.Tensor) -> torch.Tensor:
    return U @ U.T


def test_expand_basis_from_scratch_spans_sketch() -> None:
    A = torch.randn(5, 2, generator=_gen(16), dtype=F64)
    Y = A @ torch.randn(2, 7, generator=_gen(17), dtype=F64)  # column space of dim 2
    U = expand_basis(None, Y, 0.99)
    assert U.shape == (5, 2)
    torch.testing.assert_close(U.T @ U, torch.eye(2, dtype=F64), atol=1e-6, rtol=0)
    Q, _ = torch.linalg.qr(A)
    torch.testing.assert_close(_projector(U), _projector(Q), atol=1e-6, rtol=0)


def test_expand_basis_grows_existing_basis_without_duplicates() -> None:
    e1 = _eye_cols(5, 0)
    Y = _t([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0] * 3, [0.0] * 3, [0.0] * 3])  # e1, e2 dirs
    U = expand_basis(e1, Y, 0.999)
    # The e1 direction is already in the basis: only e2 is added, no spurious third column.
    assert U.shape == (5, 2)
    torch.testing.assert_close(U.T @ U, torch.eye(2, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(U[:, :1], e1, atol=1e-12, rtol=0)  # old column kept as is
    e2 = _eye_cols(5, 1)
    assert (e2 - _projector(U) @ e2).norm() < 1e-6


def test_expand_basis_orthogonal_new_directions() -> None:
    U0 = _eye_cols(4, 0)
    Y = _t([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # e2 (energy 4/5), e3 (1/5)
    U = expand_basis(U0, Y, 0.5)  # 4/5 > 0.5 -> only e2
    assert U.shape == (4, 2)
    torch.testing.assert_close(_projector(U), _projector(_eye_cols(4, 0, 1)), atol=1e-12, rtol=0)
    U = expand_basis(U0, Y, 0.9)  # needs both
    torch.testing.assert_close(_projector(U), _projector(_eye_cols(4, 0, 1, 2)), atol=1e-12, rtol=0)


def test_expand_basis_caps() -> None:
    Y = torch.randn(3, 10, generator=_gen(18), dtype=F64)
    U = expand_basis(_eye_cols(3, 0, 1), Y, 0.999999)
    assert U.shape == (3, 3)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=F64), atol=1e-6, rtol=0)
    full = expand_basis(U, Y, 0.999999)  # already d columns: unchanged
    assert full is U
    assert expand_basis(None, Y, 0.999999).shape == (3, 3)
    # max_dim keeps the strongest direction only.
    top = expand_basis(None, Y, 0.999999, max_dim=1)
    P, _, _ = torch.linalg.svd(Y)
    torch.testing.assert_close(_projector(top), _projector(P[:, :1]), atol=1e-10, rtol=0)


def test_expand_basis_nothing_to_add() -> None:
    Y = torch.randn(4, 6, generator=_gen(19), dtype=F64)
    U0 = _eye_cols(4, 0)
    assert expand_basis(U0, Y, 0.0) is U0
    assert expand_basis(U0, Y, -0.2) is U0
    empty = expand_basis(None, Y, -0.2)
    assert empty.shape == (4, 0)
    assert expand_basis(U0, torch.zeros(4, 6, dtype=F64), 0.9) is U0


# ---------------------------------------------------------------------------------------------
# projected_layers
# ---------------------------------------------------------------------------------------------


def test_projected_layers_mlp() -> None:
    single = build_model("mlp", (1, 4, 4), 3)
    assert projected_layers(single) == ["heads.0", "body.2", "body.5"]
    multi = build_model("mlp", (1, 4, 4), 3, num_heads=4)
    assert projected_layers(multi) == ["body.2", "body.5"]


def test_projected_layers_cnn() -> None:
    for heads in (1, 3):
        model = build_model("cnn", (1, 8, 8), 3, num_heads=heads)
        assert projected_layers(model) == ["body.0", "body.3", "body.7"]


def test_projected_layers_resnet() -> None:
    model = build_model("resnet18", (3, 32, 32), 5, num_heads=5)
    names = projected_layers(model)
    assert len(names) == 20
    modules = [model.get_submodule(n) for n in names]
    assert all(isinstance(m, nn.Conv2d) for m in modules)
    assert sum(m.kernel_size == (3, 3) for m in modules) == 17
    assert sum(m.kernel_size == (1, 1) for m in modules) == 3
    assert names[0] == "conv1" and "layer2.0.shortcut.0" in names
    assert not any(n.startswith("heads") for n in names)


def test_projected_layers_unknown_model() -> None:
    with pytest.raises(TypeError):
        projected_layers(nn.Linear(2, 2))
