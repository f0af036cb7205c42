"""Subspace math of FOT (Federated Orthogonal Training; Bakman et al., ICLR 2024).

Pure tensor-in, tensor-out functions; no federated plumbing lives here. The protocol
(Bakman et al., ICLR 2024, and the authors' public code) uses them as follows. For every projected
layer ``l`` (:func:`projected_layers`) the server keeps an orthonormal basis ``U_l`` (``d_l x k_l``)
of the input space already used by earlier tasks.

* **Server aggregation** (every round once a basis exists): the FedAvg update of the layer
  weight, ``Δ = W_old - W_avg`` reshaped to ``(out, d_l)``, is replaced by
  ``Δ (I - U Uᵀ)`` (:func:`project_out`), so the new global weight does not change the layer's
  output on inputs inside ``span(U)``.
* **Task end, client side (GPSE)**: the client's locally trained model is run in eval mode on
  all its task data to get the representation matrix ``R`` (``d_l x n``; :func:`layer_inputs`,
  :func:`collect_representations`), which is residualized against the global basis,
  ``R̂ = R - U Uᵀ R`` with ratio ``r = ‖R̂‖_F / ‖R‖_F`` (:func:`residualize`), and sketched with
  a private random matrix, ``Y = R̂ G`` (:func:`sketch`). The client uploads ``(Y, r, n)``.
* **Task end, server side**: ``Y_sum = Σ_k Y_k`` (the only thing SecAgg would reveal),
  ``r̄ = Σ_k n_k r_k / Σ_k n_k`` and ``ε' = (r̄ - (1 - ε)) / r̄`` (:func:`adjusted_threshold`);
  the top-``k`` left singular vectors of ``Y_sum`` with energy fraction ``> ε'``
  (:func:`select_rank`) are appended to ``U`` and the result re-orthonormalized by QR
  (:func:`expand_basis`).

Choices and deviations from the authors' code, each tested in ``tests/test_subspace.py``:

1. **Conv patches honour the layer's geometry.** :func:`layer_inputs` unfolds a ``Conv2d`` input
   with the module's own ``kernel_size``, ``stride``, ``padding`` and ``dilation``, so each column
   is exactly a patch the layer multiplies (``conv(x) = W.view(out, -1) @ R + b``). The FOT code
   unfolds its AlexNet convs with stride 1 / padding 0 (those convs are unpadded, but the
   stride-1 patches include positions the strided layer never sees) and the ImageNet ResNet's
   stride-2 ``conv1`` with stride 1; our choice matches the code's reduced-ResNet variant.
2. **Un-squared ratio, as the code.** :func:`residualize` returns ``r = ‖R̂‖_F / ‖R‖_F`` (the
   authors' code), not GPM's energy fraction ``‖R̂‖_F² / ‖R‖_F²`` (:func:`energy_ratio`, kept
   for comparison). Since ``r ≥ r²`` for ``r ≤ 1``, the un-squared ratio gives a larger ``r̄``,
   hence a larger ``ε'`` and more basis directions per task (less plasticity, less forgetting).
3. **Nothing to add.** If ``r̄ ≤ 1 - ε`` the old basis already holds the target energy:
   :func:`adjusted_threshold` returns ``ε' ≤ 0`` and :func:`select_rank` then returns 0.
4. **No zero-energy directions.** :func:`select_rank` never counts singular values equal to
   zero (for ``ε' ≥ 1`` it returns the number of non-zero ones, not ``len(s)``): their singular
   vectors are arbitrary completions that would block updates for no reason.
5. **No duplicate directions.** :func:`expand_basis` removes from the new directions their
   component inside ``span(U)`` and drops any direction whose residual is numerically zero
   before the QR; the code concatenates and QRs directly, which on a rank-deficient
   ``[U, U_new]`` would yield arbitrary extra columns. Because clients residualize against
   ``U`` before sketching, the two agree up to round-off in the protocol. The QR is
   sign-normalized (``diag(R) ≥ 0``), so the old columns of ``U`` come back unchanged, and the
   basis never exceeds ``d`` (or ``max_dim``) columns.
6. **Projected layers** (:func:`projected_layers`) follow the authors' code on fedcl's models: the
   MLP's Linear layers, with the head projected only on a single-head MLP (PMNIST-style); on a
   multi-head model the task heads aggregate as plain FedAvg. fedcl's MLP has two hidden layers,
   so this is three Linear weights on a single-head MLP.
7. **Sketch randomness** comes from the client's private ``torch.Generator``; ``G`` is drawn on
   the generator's device in ``R̂``'s dtype and is never returned or stored.

Precision: functions keep their inputs' dtype (promoting when a basis and a matrix differ);
norms and ratios are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedcl.models import MLP, ReducedResNet18, SmallCNN

__all__ = [
    "SKETCH_DISTS",
    "adjusted_threshold",
    "collect_representations",
    "energy_ratio",
    "expand_basis",
    "layer_inputs",
    "project_out",
    "projected_layers",
    "residualize",
    "select_rank",
    "sketch",
]

#: Distributions accepted by :func:`sketch`.
SKETCH_DISTS: tuple[str, ...] = ("uniform", "normal")


# ---------------------------------------------------------------------------------------------
# Representation matrices
# ---------------------------------------------------------------------------------------------


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected a 2-tuple, got {value!r}")
    return (int(value[0]), int(value[1]))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's padding as a symmetric ``(ph, pw)`` pair usable by ``F.unfold``."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        # "same" (stride 1): total padding dilation*(k-1) per dim, split left/right.
        kh, kw = _pair(conv.kernel_size)
        dh, dw = _pair(conv.dilation)
        totals = (dh * (kh - 1), dw * (kw - 1))
        if any(t % 2 for t in totals):
            raise ValueError(
                "layer_inputs: padding='same' with an even effective kernel pads "
                "asymmetrically, which unfold cannot express"
            )
        return (totals[0] // 2, totals[1] // 2)
    return _pair(padding)


def layer_inputs(module: nn.Linear | nn.Conv2d, inputs: Tensor) -> Tensor:
    """Representation matrix ``R`` (``d x n``) of the inputs a layer multiplies.

    * ``nn.Linear``: ``inputs`` of shape ``(N, ..., in_features)`` are flattened to
      ``(n, in_features)`` and transposed, so column ``j`` is the ``j``-th input vector and
      ``d = in_features``.
    * ``nn.Conv2d``: im2col, ``R = unfold(x)`` with the module's own kernel size, stride,
      padding (zeros) and dilation, so each column is one ``C_in·kh·kw`` patch flattened in
      ``(C, kh, kw)`` order and ``n = N·L`` (``L`` output positions per sample), sample-major:
      column ``i·L + p`` is sample ``i`` at output position ``p`` (row-major over the output
      grid). Then ``conv(x)[i, :, p] = W.view(C_out, -1) @ R[:, i·L + p] + b``.

    Deviation (module docstring, item 1): the FOT code unfolds AlexNet convs with stride 1 and
    padding 0; here every conv's stride and padding are honoured, as in the ResNet variant.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError("layer_inputs: grouped convolutions are not supported")
        if module.padding_mode != "zeros":
            raise ValueError(
                f"layer_inputs: padding_mode {module.padding_mode!r} is not supported "
                "(only 'zeros')"
            )
        x = inputs.unsqueeze(0) if inputs.dim() == 3 else inputs
        if x.dim() != 4:
            raise ValueError(f"Conv2d inputs must be (N, C, H, W), got shape {tuple(inputs.shape)}")
        cols = F.unfold(
            x,
            kernel_size=_pair(module.kernel_size),
            dilation=_pair(module.dilation),
            padding=_conv_padding(module),
            stride=_pair(module.stride),
        )  # (N, d, L)
        n_samples, d, n_pos = cols.shape
        return cols.permute(1, 0, 2).reshape(d, n_samples * n_pos)
    if isinstance(module, nn.Linear):
        if inputs.shape[-1] != module.in_features:
            raise ValueError(
                f"Linear inputs must end in in_features={module.in_features}, "
                f"got shape {tuple(inputs.shape)}"
            )
        return inputs.reshape(-1, module.in_features).T
    raise TypeError(f"layer_inputs supports nn.Linear and nn.Conv2d, got {type(module).__name__}")


def collect_representations(
    model: nn.Module,
    layer_names: list[str],
    batches: Iterable[tuple[Tensor, int | None]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    on_chunk: Callable[[str, Tensor], None] | None = None,
) -> dict[str, Tensor]:
    """Representation matrices ``{name: R_name}`` of the named layers over all ``batches``.

    Runs ``model(x, head)`` for every ``(x, head)`` in eval mode under ``torch.no_grad()`` with
    a forward pre-hook on each ``model.get_submodule(name)`` that records
    :func:`layer_inputs` of the layer's input; the per-batch matrices are concatenated along
    the columns, ``R = [R_batch1, R_batch2, ...]`` (``d x Σ n_batch``).

    ``x`` is moved to the device of the model's first parameter. Each recorded chunk is
    optionally cast to ``dtype`` and moved to ``device`` (e.g. ``"cpu"`` to spare GPU memory).
    The hooks are always removed and every submodule's train/eval flag restored, even when the
    forward pass raises. With ``on_chunk``, each per-batch matrix is handed to
    ``on_chunk(name, R_batch)`` instead of being kept (streaming, e.g. into
    :class:`StreamingSketch`), and the returned dict is empty.
    """
    if not layer_names:
        raise ValueError("collect_representations: layer_names is empty")
    modules: dict[str, nn.Module] = {}
    for name in layer_names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear | nn.Conv2d):
            raise TypeError(f"layer {name!r} is a {type(module).__name__}, not Linear/Conv2d")
        modules[name] = module
    param = next(model.parameters(), None)
    model_device = param.device if param is not None else None
    chunks: dict[str, list[Tensor]] = {name: [] for name in layer_names}
    seen = dict.fromkeys(layer_names, 0)

    def make_hook(name: str) -> Callable[[nn.Module, tuple[object, ...]], None]:
        def hook(mod: nn.Module, args: tuple[object, ...]) -> None:
            (inp, *_) = args
            r = layer_inputs(mod, inp)  # type: ignore[arg-type]
            if dtype is not None or device is not None:
                r = r.to(device=device, dtype=dtype)
            seen[name] += 1
            if on_chunk is not None:
                on_chunk(name, r)
            else:
                chunks[name].append(r)

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in layer_names]
    try:
        model.eval()
        with torch.no_grad():
            for x, head in batches:
                if model_device is not None:
                    x = x.to(model_device)
                model(x, head)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    missing = [name for name in layer_names if not seen[name]]
    if missing:
        raise RuntimeError(
            f"collect_representations: no input reached layer(s) {missing} "
            "(no batches, or the layer is not on the forward path for these heads)"
        )
    if on_chunk is not None:
        return {}
    return {name: torch.cat(chunks[name], dim=1) for name in layer_names}


def input_dim(module: nn.Linear | nn.Conv2d) -> int:
    """``d``, the rows of the layer's representation matrix (``in`` or ``C_in·kh·kw``)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = _pair(module.kernel_size)
        return module.in_channels * kh * kw
    return module.in_features


# ---------------------------------------------------------------------------------------------
# Residualization, sketching and the threshold
# ---------------------------------------------------------------------------------------------


def _has_basis(U: Tensor | None) -> bool:
    return U is not None and U.dim() == 2 and U.shape[1] > 0


def _residual(R: Tensor, U: Tensor) -> Tensor:
    if R.dim() != 2 or U.dim() != 2 or U.shape[0] != R.shape[0]:
        raise ValueError(
            f"R must be (d, n) and U (d, k) with the same d; got {tuple(R.shape)} and "
            f"{tuple(U.shape)}"
        )
    dt = torch.promote_types(R.dtype, U.dtype)
    Rp = R.to(dt)
    Up = U.to(device=R.device, dtype=dt)
    return Rp - Up @ (Up.T @ Rp)


def _fro64(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


def residualize(R: Tensor, U: Tensor | None) -> tuple[Tensor, float]:
    """Residual of ``R`` outside ``span(U)`` and the (un-squared) ratio of norms.

    ``R̂ = R - U Uᵀ R`` and ``r = ‖R̂‖_F / ‖R‖_F`` for an orthonormal ``U`` (``d x k``).
    With no basis (``U`` is ``None`` or has zero columns) ``R̂ = R`` (returned as is) and
    ``r = 1.0``, as in the code; otherwise ``r = 0.0`` when ``‖R‖_F = 0``.

    The server uses this **un-squared** ratio in :func:`adjusted_threshold`, following the
    authors' code; GPM's criterion is the squared one (:func:`energy_ratio`). It matters
    because ``r ≥ r²``: e.g. ``r = 0.5`` and ``ε = 0.96`` give ``ε' = 1 - 0.04/0.5 = 0.92``,
    while the energy ``0.25`` would give ``ε' = 1 - 0.04/0.25 = 0.84``, so the un-squared
    ratio keeps more directions per task.
    """
    if not _has_basis(U):
        if R.dim() != 2:
            raise ValueError(f"R must be (d, n), got shape {tuple(R.shape)}")
        return R, 1.0
    assert U is not None
    R_hat = _residual(R, U)
    norm = _fro64(R)
    return R_hat, (_fro64(R_hat) / norm if norm > 0 else 0.0)


def energy_ratio(R: Tensor, U: Tensor | None) -> float:
    """GPM's energy fraction outside ``span(U)``: ``‖R - U Uᵀ R‖_F² / ‖R‖_F²``.

    The square of :func:`residualize`'s ratio (same edge cases: ``1.0`` with no basis, ``0.0``
    when ``‖R‖_F = 0``). Provided for comparison; the FOT server uses the un-squared ratio.
    """
    _, r = residualize(R, U)
    return r * r


def sketch(
    R_hat: Tensor, m: int, generator: torch.Generator, dist: str = "uniform"
) -> Tensor:
    """Random sketch ``Y = R̂ G`` (``d x m``) of a residual matrix ``R̂`` (``d x n``).

    ``G`` (``n x m``) is drawn from the client's private ``generator``, entrywise
    ``U[-1, 1]`` (``dist="uniform"``, FOT's MLP/PMNIST setting, ``m = d``) or ``N(0, 1)``
    (``dist="normal"``, FOT's conv/ResNet setting, ``m = d`` or ``5·d``). ``G`` is drawn on the
    generator's device in ``R̂``'s dtype and never returned, so ``Y`` is all that leaves the
    client. ``E[G Gᵀ] ∝ I`` makes ``E[Y Yᵀ] ∝ R̂ R̂ᵀ``, so ``Y``'s top left singular vectors
    estimate ``R̂``'s, and ``col(Y) ⊆ col(R̂)`` always.
    """
    if R_hat.dim() != 2:
        raise ValueError(f"R_hat must be (d, n), got shape {tuple(R_hat.shape)}")
    if m < 1:
        raise ValueError(f"sketch width m must be >= 1, got {m}")
    if dist not in SKETCH_DISTS:
        raise ValueError(f"unknown sketch dist {dist!r}; choose one of {SKETCH_DISTS}")
    n = R_hat.shape[1]
    if dist == "uniform":
        G = torch.rand(n, m, generator=generator, dtype=R_hat.dtype, device=generator.device)
        G = G.mul_(2.0).sub_(1.0)
    else:
        G = torch.randn(n, m, generator=generator, dtype=R_hat.dtype, device=generator.device)
    return R_hat @ G.to(R_hat.device)


class StreamingSketch:
    """``(Y, r)`` of :func:`residualize` + :func:`sketch`, accumulated over column blocks.

    For ``R = [R_1, R_2, ...]`` (blocks of columns, e.g. one per batch) and
    ``G = [G_1; G_2; ...]`` (the matching row blocks, drawn block by block from the private
    generator), ``Y = R̂ G = Σ_b R̂_b G_b`` and ``‖R̂‖² = Σ_b ‖R̂_b‖²``, so the result equals the
    one-shot computation for that ``G`` while memory stays ``d x m`` whatever ``n`` is (a conv
    layer's im2col matrix has one column per sample and output position).
    """

    def __init__(self, U: Tensor | None, m: int, generator: torch.Generator,
                 dist: str = "uniform") -> None:
        if m < 1:
            raise ValueError(f"sketch width m must be >= 1, got {m}")
        if dist not in SKETCH_DISTS:
            raise ValueError(f"unknown sketch dist {dist!r}; choose one of {SKETCH_DISTS}")
        self.U = U if _has_basis(U) else None
        self.m, self.generator, self.dist = m, generator, dist
        self.Y: Tensor | None = None
        self.norm2, self.norm2_residual, self.n = 0.0, 0.0, 0

    def add(self, R_block: Tensor) -> None:
        r_hat = R_block if self.U is None else _residual(R_block, self.U)
        self.norm2 += _fro64(R_block) ** 2
        self.norm2_residual += _fro64(r_hat) ** 2
        self.n += R_block.shape[1]
        part = sketch(r_hat, self.m, self.generator, self.dist)
        self.Y = part if self.Y is None else self.Y + part

    def result(self) -> tuple[Tensor, float]:
        """The sketch ``Y`` and the ratio ``r = ‖R̂‖_F / ‖R‖_F`` (1.0 with no basis)."""
        if self.Y is None:
            raise ValueError("StreamingSketch: no columns were added")
        if self.U is None:
            return self.Y, 1.0
        return self.Y, 0.0 if self.norm2 == 0 else math.sqrt(self.norm2_residual / self.norm2)


def adjusted_threshold(eps: float, ratios: Sequence[float], counts: Sequence[int]) -> float:
    """FOT's threshold on the residual sketch's energy.

    ``r̄ = Σ_k (n_k / Σ_j n_j) r_k`` and ``ε' = (r̄ - (1 - ε)) / r̄``: the old basis is taken
    to explain ``1 - r̄`` of the representation, so the new directions must explain the
    fraction ``ε'`` of the residual for the total to reach ``ε`` (exact when ``r`` is an
    energy fraction; the code plugs in the un-squared ratio, see :func:`residualize`).

    If ``r̄ ≤ 1 - ε`` the result is ``≤ 0``, meaning "add nothing" (:func:`select_rank`
    returns 0); ``r̄ = 0`` returns ``0.0``.
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    if len(ratios) != len(counts):
        raise ValueError(f"{len(ratios)} ratios but {len(counts)} counts")
    if len(ratios) == 0:
        raise ValueError("adjusted_threshold needs at least one client")
    if any(c < 0 for c in counts) or sum(counts) <= 0:
        raise ValueError(f"counts must be >= 0 with a positive sum, got {list(counts)}")
    if any(not math.isfinite(r) or r < 0 for r in ratios):
        raise ValueError(f"ratios must be finite and >= 0, got {list(ratios)}")
    total = float(sum(counts))
    r_bar = sum(float(r) * c / total for r, c in zip(ratios, counts, strict=True))
    if r_bar <= 0.0:
        return 0.0
    return (r_bar - (1.0 - eps)) / r_bar


# ---------------------------------------------------------------------------------------------
# Rank selection, basis expansion, projection
# ---------------------------------------------------------------------------------------------


def select_rank(singular_values: Tensor, threshold: float) -> int:
    """Smallest ``k`` with ``Σ_{i≤k} s_i² / Σ_i s_i² > threshold``.

    ``s`` is sorted in descending order first. Returns 0 when ``threshold ≤ 0`` or all
    ``s_i = 0``; when no ``k`` qualifies (``threshold ≥ 1``, up to round-off) it returns the
    number of non-zero singular values, never ``len(s)`` if trailing ones are zero.
    """
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    s = torch.sort(singular_values.detach().reshape(-1).to(torch.float64), descending=True).values
    energy = s * s
    total = float(energy.sum())
    if threshold <= 0 or total <= 0:
        return 0
    cum = torch.cumsum(energy, 0) / total
    above = torch.nonzero(cum > threshold)
    if above.numel() > 0:
        return int(above[0, 0]) + 1
    return int((s > 0).sum())


def _sign_fixed_qr(M: Tensor) -> Tensor:
    Q, Rm = torch.linalg.qr(M, mode="reduced")
    signs = torch.sign(torch.diagonal(Rm))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs


def expand_basis(
    U: Tensor | None, Y_sum: Tensor, threshold: float, max_dim: int | None = None
) -> Tensor:
    """Append the dominant directions of the summed sketch to the basis.

    ``Y_sum = P S Vᵀ`` (SVD), ``k = select_rank(S, threshold)``, ``U_new = P[:, :k]``, and the
    result is ``QR([U, U_new])``'s ``Q`` (reduced, sign-normalized so ``diag(R) ≥ 0``), of shape
    ``d x (k_old + k)``. Before the QR, ``U_new``'s component in ``span(U)`` is removed and
    directions with a numerically zero residual (norm ``≤ √eps_dtype``) are dropped, so the
    result may gain fewer than ``k`` columns; it is capped at ``min(d, max_dim)`` columns,
    keeping the strongest new directions. With ``k = 0`` (or no room) ``U`` is returned
    unchanged, or an empty ``d x 0`` tensor when ``U`` is ``None``.
    """
    if Y_sum.dim() != 2:
        raise ValueError(f"Y_sum must be (d, m), got shape {tuple(Y_sum.shape)}")
    d = Y_sum.shape[0]
    has_basis = _has_basis(U)
    if U is not None and (U.dim() != 2 or U.shape[0] != d):
        raise ValueError(f"U must be ({d}, k), got shape {tuple(U.shape)}")
    if max_dim is not None and max_dim < 0:
        raise ValueError(f"max_dim must be >= 0, got {max_dim}")
    dt = Y_sum.dtype if U is None else torch.promote_types(U.dtype, Y_sum.dtype)
    k_old = U.shape[1] if (U is not None and has_basis) else 0
    cap = d if max_dim is None else min(d, max_dim)

    def unchanged() -> Tensor:
        if U is not None:
            return U
        return torch.empty(d, 0, dtype=Y_sum.dtype, device=Y_sum.device)

    if k_old >= cap:
        return unchanged()
    P, S, _ = torch.linalg.svd(Y_sum.to(dt), full_matrices=False)
    k = select_rank(S, threshold)
    if k == 0:
        return unchanged()
    new = P[:, :k]
    if has_basis:
        assert U is not None
        Ud = U.to(device=Y_sum.device, dtype=dt)
        resid = new - Ud @ (Ud.T @ new)
        Pr, Sr, _ = torch.linalg.svd(resid, full_matrices=False)
        tol = math.sqrt(torch.finfo(dt).eps)
        new = Pr[:, Sr > tol]
        M = torch.cat([Ud, new[:, : cap - k_old]], dim=1)
    else:
        M = new[:, :cap]
    if M.shape[1] == k_old:
        return unchanged()
    return _sign_fixed_qr(M)


def project_out(delta: Tensor, U: Tensor | None) -> Tensor:
    """Remove from a weight update its action on ``span(U)``: ``Δ ← Δ (I - U Uᵀ)``.

    ``delta`` of shape ``(out, *rest)`` (Linear ``(out, in)``, Conv2d ``(out, in, kh, kw)``) is
    viewed as ``Δ2 = delta.reshape(out, d)`` with ``d = prod(rest)``, the same ``(C, kh, kw)``
    flattening as :func:`layer_inputs`' patches; the result ``Δ2 - (Δ2 U) Uᵀ`` is reshaped back
    to ``delta``'s shape and dtype. Then ``(W + Δ_proj)`` and ``W`` give the same output on any
    input column in ``span(U)``. With no basis ``delta`` is returned (a copy) unchanged.
    """
    if delta.dim() < 2:
        raise ValueError(f"delta must be (out, ...) with >= 2 dims, got {tuple(delta.shape)}")
    if not _has_basis(U):
        return delta.clone()
    assert U is not None
    d2 = delta.reshape(delta.shape[0], -1)
    if U.shape[0] != d2.shape[1]:
        raise ValueError(
            f"basis has d={U.shape[0]} rows but delta {tuple(delta.shape)} flattens to "
            f"d={d2.shape[1]}"
        )
    dt = torch.promote_types(delta.dtype, U.dtype)
    d2 = d2.to(dt)
    Ud = U.to(device=delta.device, dtype=dt)
    return (d2 - (d2 @ Ud) @ Ud.T).to(delta.dtype).reshape(delta.shape)


def projected_layers(model: nn.Module) -> list[str]:
    """Names (``model.named_modules()`` order) of the layers FOT projects (as the authors' code).

    * :class:`~fedcl.models.MLP`: every ``nn.Linear`` of the body; the head ``heads.0`` too on a
      single-head MLP (PMNIST's 10-way head is projected, as in the paper), but never the task
      heads of a multi-head MLP (they aggregate as plain FedAvg).
    * :class:`~fedcl.models.SmallCNN`: its two convs and its hidden Linear; never the heads.
    * :class:`~fedcl.models.ReducedResNet18`: all 20 ``nn.Conv2d`` (17 3x3 + 3 1x1 shortcuts);
      never BatchNorm or the heads.

    Other models raise ``TypeError``. Since fedcl registers ``heads`` before the body, a
    single-head MLP lists ``heads.0`` first.
    """
    if isinstance(model, MLP):
        kinds: tuple[type[nn.Module], ...] = (nn.Linear,)
        include_heads = not model.multi_head
    elif isinstance(model, SmallCNN):
        kinds, include_heads = (nn.Conv2d, nn.Linear), False
    elif isinstance(model, ReducedResNet18):
        kinds, include_heads = (nn.Conv2d,), False
    else:
        raise TypeError(
            f"projected_layers knows MLP, SmallCNN and ReducedResNet18, got {type(model).__name__}"
        )
    names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if name.startswith("heads.") and not include_heads:
            continue
        names.append(name)
    return names
