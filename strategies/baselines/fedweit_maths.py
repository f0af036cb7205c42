"""FedWeIT's maths (Yoon, Jeong, Lee, Yang and Hwang, "Federated Continual Learning with
Weighted Inter-client Transfer", ICML 2021): tensor in, tensor out, each function pinned by
hand-worked numbers in ``tests/test_fedweit.py``. The wiring into fedcl's round loop is
:mod:`strategies.baselines.fedweit`.

Shapes: a decomposed layer's weight is ``[out, ...]`` (a Linear's ``[out, in]``, a Conv2d's
``[out, in, kh, kw]``); its mask ``m`` has one value per output channel, ``[out]``, broadcast over
the rest; the knowledge base is a stack ``[K, out, ...]`` with one attention weight per member,
``[K]``.

* :func:`compose_weight`: ``theta = B * sigmoid(m) + A + sum_j alpha_j * A_hat_j``.
* :func:`threshold`: the hard threshold ``x * (|x| > level)`` (A at evaluation and for the
  knowledge base; sigmoid(m) at evaluation, by ``lambda_mask``).
* :func:`fedweit_penalty`: every term of the local loss beside the cross-entropy (METHODS.md
  17.1), with :class:`PastTask` for the drift term.
* :func:`keep_channels`, :func:`channel_values`, :func:`dense_channels`: the client's sparse
  base (the output channels of the lowest ``client_sparsity`` fraction of ``|m|`` dropped).
* :func:`masked_mean`: the server's per-entry mean over the clients that kept an entry.
* :func:`sparse_entries`, :func:`dense_entries`: element-wise sparse tensors (the thresholded
  adaptive weights), a bitmap of the non-zero entries and their values.
* :func:`initial_mask`: a new task's mask, the same on every client and on the server.
* :func:`add_counts`: test counts of several models summed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "EPSILON",
    "PastTask",
    "add_counts",
    "channel_values",
    "compose_weight",
    "dense_channels",
    "dense_entries",
    "fedweit_penalty",
    "initial_mask",
    "keep_channels",
    "masked_mean",
    "sparse_entries",
    "threshold",
]

#: The server mean's guard, ``sum_c b_c * B_c / (sum_c b_c + EPSILON)`` (the authors' code).
EPSILON = 1e-15


def per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` ``[out]`` shaped ``[out, 1, ...]`` to broadcast over a weight ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def threshold(x: torch.Tensor, level: float) -> torch.Tensor:
    """``x * (|x| > level)``: the entries at or below ``level`` in magnitude set to 0 (the
    authors' ``l1_pruning``). Differentiable where it keeps an entry."""
    return x * (x.abs() > level).to(x.dtype)


def compose_weight(base: torch.Tensor, mask_logits: torch.Tensor, adaptive: torch.Tensor,
                   kb: torch.Tensor | None = None, attention: torch.Tensor | None = None, *,
                   evaluate: bool = False, lambda_l1: float = 0.0, lambda_mask: float = 0.0
                   ) -> torch.Tensor:
    """A decomposed layer's weight, ``theta = B * sigmoid(m) + A + sum_j alpha_j * A_hat_j``.

    ``base`` B and ``adaptive`` A ``[out, ...]``; ``mask_logits`` m ``[out]`` (pre-sigmoid, one
    per output channel); ``kb`` the knowledge base ``[K, out, ...]`` and ``attention`` alpha
    ``[K]`` (both None, or K = 0, for no term). ``evaluate``: the weight used at test time, A
    hard-thresholded at ``lambda_l1`` and sigmoid(m) at ``lambda_mask`` (the authors' code;
    with ``lambda_mask`` 0 the mask is untouched). Raises ValueError on shapes that disagree."""
    if adaptive.shape != base.shape or mask_logits.shape != base.shape[:1]:
        raise ValueError(f"compose_weight: base {tuple(base.shape)}, adaptive "
                         f"{tuple(adaptive.shape)} and mask {tuple(mask_logits.shape)} disagree")
    mask = torch.sigmoid(mask_logits)
    if evaluate:
        mask, adaptive = threshold(mask, lambda_mask), threshold(adaptive, lambda_l1)
    theta = base * per_channel(mask, base) + adaptive
    if kb is not None and attention is not None and kb.shape[0]:
        if kb.shape[1:] != base.shape or attention.shape != kb.shape[:1]:
            raise ValueError(f"compose_weight: knowledge base {tuple(kb.shape)} and attention "
                             f"{tuple(attention.shape)} do not fit base {tuple(base.shape)}")
        theta = theta + torch.tensordot(attention, kb, dims=1)
    return theta


@dataclass
class PastTask:
    """A past task's frozen parts in the drift term, one tensor per decomposed layer:
    ``masks`` m_i ``[out]``, ``adaptives`` A_i and ``anchors`` theta*_i ``[out, ...]`` (the
    task's weights rebuilt at the start of the current task)."""

    masks: Sequence[torch.Tensor]
    adaptives: Sequence[torch.Tensor]
    anchors: Sequence[torch.Tensor]


def fedweit_penalty(bases: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                    adaptives: Sequence[torch.Tensor], past: Sequence[PastTask], *,
                    first_task: bool, wd: float, lambda_l1: float, lambda_mask: float,
                    lambda_l2: float) -> torch.Tensor:
    """FedWeIT's local loss beside the cross-entropy (METHODS.md 17.1), summed over the
    decomposed layers (one tensor per layer in each list)::

        wd * (||A_t||^2 / 2 + ||m_t||^2 / 2) + lambda_l1 * ||A_t||_1 + lambda_mask * ||m_t||_1
        + [first task] * wd * ||B||^2 / 2
        + sum_{i < t} (lambda_l2 * ||B * sigmoid(m_i) + A_i - theta*_i||^2 / 2
                       + lambda_l1 * ||A_i||_1)

    With past parts frozen, the drift term constrains only B; it is 0 while B equals the B
    the anchors were built from. A scalar tensor."""
    total = bases[0].new_zeros(())
    for layer, (base, mask, adaptive) in enumerate(zip(bases, masks, adaptives, strict=True)):
        total = total + wd * 0.5 * (adaptive.pow(2).sum() + mask.pow(2).sum())
        total = total + lambda_l1 * adaptive.abs().sum() + lambda_mask * mask.abs().sum()
        if first_task:
            total = total + wd * 0.5 * base.pow(2).sum()
        for task in past:
            rebuilt = (base * per_channel(torch.sigmoid(task.masks[layer]), base)
                       + task.adaptives[layer])
            total = total + lambda_l2 * 0.5 * (rebuilt - task.anchors[layer]).pow(2).sum()
            total = total + lambda_l1 * task.adaptives[layer].abs().sum()
    return total


def keep_channels(mask_logits: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The output channels a client sends: all but the ``floor(sparsity * out)`` with the
    smallest ``|m|`` (pre-sigmoid; ties dropped from the lowest index), as sorted indices
    ``[kept]`` (int64). Raises ValueError for a sparsity outside [0, 1)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n = int(mask_logits.shape[0])
    drop = math.floor(sparsity * n)
    order = torch.sort(mask_logits.detach().abs(), stable=True).indices
    return torch.sort(order[drop:]).values


def channel_values(weight: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The kept output channels' rows of ``weight``, ``[kept, ...]``."""
    return weight[kept]


def dense_channels(kept: torch.Tensor, values: torch.Tensor, shape: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense weight of ``shape`` with rows ``kept`` set to ``values`` and every other
    output channel 0, and its 0/1 channel mask ``[out]`` (float). Raises ValueError when the
    indices or values do not fit ``shape``."""
    out = int(shape[0])
    if kept.dim() != 1 or values.shape != (kept.shape[0], *shape[1:]):
        raise ValueError(f"sparse channels: {tuple(kept.shape)} indices and values "
                         f"{tuple(values.shape)} do not fit a weight {tuple(shape)}")
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= out
                         or torch.unique(kept).numel() != kept.numel()):
        raise ValueError(f"sparse channels: indices out of range or repeated for {out} "
                         "channels")
    dense = values.new_zeros(tuple(shape))
    dense[kept.long()] = values
    mask = values.new_zeros(out)
    mask[kept.long()] = 1.0
    return dense, mask


def masked_mean(weights: Sequence[torch.Tensor], channel_masks: Sequence[torch.Tensor],
                previous: torch.Tensor | None = None) -> torch.Tensor:
    """The server's base ``B = sum_c b_c * B_c / (sum_c b_c + EPSILON)``: per entry, the
    uniform mean over the clients whose channel mask ``b_c`` ``[out]`` kept it (``weights``
    ``[out, ...]``, the dropped channels 0). An entry that no client kept is 0 (the authors'
    code) or, with ``previous``, keeps its value there."""
    num = torch.zeros_like(weights[0])
    den = torch.zeros_like(channel_masks[0])
    for weight, mask in zip(weights, channel_masks, strict=True):
        num = num + per_channel(mask, weight) * weight
        den = den + mask
    mean = num / (per_channel(den, num) + EPSILON)
    if previous is None:
        return mean
    return torch.where(per_channel(den, num) > 0, mean, previous.to(mean.dtype))


def sparse_entries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``'s non-zero entries as a bitmap and values: (``ceil(numel / 8)`` uint8, bit ``i %
    8`` of byte ``i // 8`` set when flat entry i is non-zero; the non-zero values ``[nnz]`` in
    flat order). ``numel / 8 + nnz * itemsize`` bytes: never more than 1/32 over the dense
    float32 tensor, and a fraction of it for a sparse one."""
    flat = x.detach().reshape(-1).cpu()
    hit = flat != 0
    bits = np.packbits(hit.numpy(), bitorder="little")
    return torch.from_numpy(bits), flat[hit]


def dense_entries(bits: torch.Tensor, values: torch.Tensor, shape: Sequence[int]
                  ) -> torch.Tensor:
    """The dense tensor of ``shape`` that :func:`sparse_entries` encoded. Raises ValueError
    when the bitmap and values do not fit."""
    numel = math.prod(int(s) for s in shape)
    if bits.dtype != torch.uint8 or bits.shape != ((numel + 7) // 8,) or values.dim() != 1:
        raise ValueError(f"sparse entries: a bitmap {tuple(bits.shape)} {bits.dtype} and "
                         f"values {tuple(values.shape)} do not fit {numel} entries")
    unpacked = np.unpackbits(bits.numpy(), bitorder="little")
    hit = torch.from_numpy(unpacked[:numel].astype(bool))
    if unpacked[numel:].any() or int(hit.sum()) != values.shape[0]:
        raise ValueError(f"sparse entries: {int(unpacked.sum())} bits set, {values.shape[0]} "
                         "values")
    flat = values.new_zeros(numel)
    flat[hit] = values
    return flat.reshape(tuple(int(s) for s in shape))


def initial_mask(out: int, seed: int, task: int, layer: int) -> torch.Tensor:
    """Task ``task``'s initial mask logits for decomposed layer ``layer`` (0-based, in the
    model's order), ``[out]`` float32: the authors' variance-scaling initialiser (truncated
    normal, standard deviation ``sqrt(1 / out) / 0.8796`` cut at two), drawn from a generator
    seeded by the run's ``seed``, the task and the layer, so every client and the server draw
    the same."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + task) * 1_000_003 + layer)
                                        % 2**63)
    std = math.sqrt(1.0 / out) / 0.87962566103423978
    return torch.nn.init.trunc_normal_(torch.empty(out), 0.0, std, -2 * std, 2 * std,
                                       generator=gen)


def add_counts(total: dict[int, list[int]], more: dict[int, list[int]]) -> dict[int, list[int]]:
    """``total`` with ``more`` added, class by class (``{class: [correct, total]}``, in
    place); returns ``total``."""
    for klass, (correct, count) in more.items():
        entry = total.setdefault(int(klass), [0, 0])
        entry[0] += int(correct)
        entry[1] += int(count)
    return total
