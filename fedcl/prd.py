"""Math of PRD (Prototype-Sample Relation Distillation; Asadi et al., ICML 2023).

Pure tensor-in, tensor-out functions; no federated plumbing lives here. The spec is the
paper and its authors' public code. A client training task ``t`` with encoder ``f``,
projection head ``g`` and one prototype matrix ``P_j`` (``C_j x D``, in the feature space of
``h = f(x)``) per task ``j ≤ t`` minimises

    L = L_SupCon + λ_p · L_proto + λ_d · L_RD

* **L_SupCon** (:func:`supcon_loss`): Khosla et al.'s supervised contrastive loss on the
  L2-normalised projections ``z = g(h) / ‖g(h)‖`` of two augmented views per image
  (:func:`augment`), stacked ``[view1; view2]`` with the labels repeated twice; τ = 0.1 and the
  loss is scaled by ``τ / 0.07`` (the code's base temperature).
* **L_proto** (:func:`prototype_loss`): ``mean_i (1 − cos(h_i, p_{y_i}))`` over the current
  task's prototypes, with ``h`` detached by the caller so that it trains only the prototypes.
* **L_RD** (:func:`relation_distillation`): for every previous task ``j < t``,
  ``KL(softmax(s_old_j / T) ‖ softmax(s_new_j / T))`` with ``s = h · (P / ‖P‖_row)ᵀ``
  (:func:`prototype_logits`), where ``h_new, P_j`` are the live model's and ``h_old, P_j,old``
  come from the frozen copy saved at the end of the previous task. Gradients reach the encoder
  and the *live* prototypes of previous tasks (which keep drifting with the representation);
  the frozen copy gets none.
* **Inference** (:func:`cosine_logits`): cosine similarity of the normalised feature with the
  normalised prototypes; argmax over one task's prototypes (Task-IL) or all of them (Class-IL).
* **Federation** (:func:`aggregate_prototypes`): the server averages the clients' prototypes
  class by class, weighted by how many samples each client used for that class.

Choices and deviations, each tested in ``tests/test_prd_math.py``:

1. **L_proto is the code's ``1 − cos``**, not the softmax/CE over cosine similarities that the
   paper may describe (not checked against the paper's text); the commented-out "prototype
   contrast" term of the code is not implemented.
2. **SupCon anchors without a positive are skipped** (the mean runs over anchors with
   ``|P(i)| > 0``, as in the current SupContrast code); with two views every anchor has its
   other view as a positive, so this only matters for hand-built batches. If no anchor has a
   positive the loss is ``0`` (still attached to the graph of ``z``) instead of NaN.
3. **Features are not normalised in the distillation**, only the prototypes (as the code);
   :func:`cosine_logits` (inference) normalises both.
4. **No detaching inside the library.** :func:`prototype_loss` expects ``h.detach()`` and
   :func:`relation_distillation` expects detached ``h_old`` / ``protos_old``; the functions
   themselves never detach, so the caller decides (and a test checks the intended use).
5. **Prototype aggregation is ours** (PRD is not federated): per class, a sample-count-weighted
   mean of the clients' prototypes; a client with count 0 for a class does not dilute it, and a
   class no client touched keeps its previous global prototype.
6. **Like with like in L_RD**: ``h_new`` and ``h_old`` must come from the same computation
   (the same mode, no random masks), or the loss is not 0 for identical weights. The caller
   (``strategies/prd.py``) takes dropout out of the encoder and runs the frozen copy in the
   trained model's mode.
7. **Augmentations**: the usual SupCon CIFAR recipe for 3-channel images and a milder
   crop + rotation for 1-channel (MNIST-sized) images, drawn per sample and reproducibly from a
   ``torch.Generator`` without touching the caller's global RNG.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "aggregate_prototypes",
    "augment",
    "cosine_logits",
    "prototype_logits",
    "prototype_loss",
    "relation_distillation",
    "supcon_loss",
]


def supcon_loss(
    z: Tensor, labels: Tensor, temperature: float = 0.1, base_temperature: float = 0.07
) -> Tensor:
    """Supervised contrastive loss (Khosla et al., 2020), "L_out" variant.

    ``z`` is ``(2N, D)``: L2-normalised projections of two views stacked ``[view1; view2]``;
    ``labels`` is ``(2N,)`` (the ``N`` labels repeated twice). For each anchor ``i``, with
    ``P(i) = {p ≠ i : y_p = y_i}`` and ``A(i) = {a ≠ i}``::

        l_i = −(1/|P(i)|) Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )
        loss = (τ / base_τ) · mean_{i : |P(i)| > 0} l_i

    The row maximum is subtracted before exponentiating (it cancels in the ratio). Returns a
    scalar; ``0`` (attached to ``z``'s graph) when no anchor has a positive.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be (2N, D), got shape {tuple(z.shape)}")
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(
            f"labels must be ({z.shape[0]},) to match z, got shape {tuple(labels.shape)}"
        )
    if temperature <= 0 or base_temperature <= 0:
        raise ValueError("temperature and base_temperature must be > 0")
    n = z.shape[0]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    positive = (labels.view(-1, 1) == labels.view(1, -1)) & not_self

    logits = (z @ z.T) / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    # log Σ_{a≠i} exp(logit_ia): the diagonal is excluded by filling it with −inf.
    log_denominator = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1)
    log_prob = logits - log_denominator.view(-1, 1)

    n_positive = positive.sum(dim=1)
    has_positive = n_positive > 0
    if not bool(has_positive.any()):
        return (z * 0.0).sum()
    # torch.where, not a product with the mask: a row with only itself has log_prob = +inf.
    summed = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    mean_log_prob_pos = summed[has_positive] / n_positive[has_positive].to(z.dtype)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def prototype_loss(h: Tensor, prototypes: Tensor, targets: Tensor) -> Tensor:
    """The code's prototype loss: ``L_proto = mean_i (1 − cos(h_i, p_{targets_i}))``.

    ``h`` is ``(N, D)``, ``prototypes`` ``(C, D)`` (the current task's head), ``targets``
    ``(N,)`` indices into the rows of ``prototypes``. The caller must pass ``h.detach()``: this
    loss trains the prototypes only, never the encoder.
    """
    if h.dim() != 2 or prototypes.dim() != 2 or h.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"h (N, D) and prototypes (C, D) must share D, got {tuple(h.shape)} and "
            f"{tuple(prototypes.shape)}"
        )
    if targets.dim() != 1 or targets.shape[0] != h.shape[0]:
        raise ValueError(f"targets must be ({h.shape[0]},), got shape {tuple(targets.shape)}")
    cos = F.cosine_similarity(h, prototypes[targets], dim=1)
    return (1.0 - cos).mean()


def prototype_logits(h: Tensor, prototypes: Tensor) -> Tensor:
    """Prototype-sample similarities used by the distillation: ``s = h · (P / ‖P‖_row)ᵀ``.

    ``h`` is ``(N, D)`` and is *not* normalised; ``prototypes`` ``(C, D)`` are row-normalised.
    Returns ``(N, C)``.
    """
    return h @ F.normalize(prototypes, dim=1).T


def relation_distillation(
    h_new: Tensor,
    h_old: Tensor,
    protos_new: list[Tensor],
    protos_old: list[Tensor],
    temperature: float = 1.0,
) -> Tensor:
    """Prototype-sample relation distillation ``L_RD``.

    For each previous task ``j``, ``s_new_j = prototype_logits(h_new, protos_new[j])`` and
    ``s_old_j = prototype_logits(h_old, protos_old[j])``; with ``p = softmax(s_old_j / T)`` and
    ``q = softmax(s_new_j / T)`` row-wise::

        L_RD = Σ_j mean_i Σ_c p_ic (log p_ic − log q_ic)      (Σ_j KL(p ‖ q), batch mean)

    ``h_new`` and ``protos_new`` are the live model's features and previous-task prototypes and
    receive gradients. ``h_old`` and ``protos_old`` come from the frozen copy of the model and
    must be passed detached by the caller (nothing is detached here). Returns a scalar zero on
    ``h_new``'s device when there is no previous task.
    """
    if len(protos_new) != len(protos_old):
        raise ValueError(
            f"protos_new and protos_old must have one entry per previous task, got "
            f"{len(protos_new)} and {len(protos_old)}"
        )
    if h_new.shape != h_old.shape:
        raise ValueError(
            f"h_new and h_old must have the same shape, got {tuple(h_new.shape)} and "
            f"{tuple(h_old.shape)}"
        )
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    if not protos_new:
        return torch.zeros((), device=h_new.device, dtype=h_new.dtype)
    total = h_new.new_zeros(())
    for p_new, p_old in zip(protos_new, protos_old, strict=True):
        if p_new.shape != p_old.shape:
            raise ValueError(
                f"new and old prototypes of a task must match, got {tuple(p_new.shape)} and "
                f"{tuple(p_old.shape)}"
            )
        log_q = F.log_softmax(prototype_logits(h_new, p_new) / temperature, dim=1)
        log_p = F.log_softmax(prototype_logits(h_old, p_old) / temperature, dim=1)
        total = total + (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return total


def cosine_logits(h: Tensor, prototypes: Tensor) -> Tensor:
    """Inference scores: ``cos(h_i, p_c) = (h_i / ‖h_i‖) · (p_c / ‖p_c‖)``, shape ``(N, C)``.

    The prediction is the argmax over the given prototypes (one task's for Task-IL, all tasks'
    concatenated for Class-IL).
    """
    return F.normalize(h, dim=1) @ F.normalize(prototypes, dim=1).T


def aggregate_prototypes(
    old: Tensor, client_protos: list[Tensor], client_counts: list[Tensor]
) -> Tensor:
    """Server-side, sample-count-weighted mean of the clients' prototypes, class by class.

    ``old`` is the ``(C, D)`` global prototype matrix; client ``k`` sends ``P_k`` ``(C, D)`` and
    ``c_k`` ``(C,)``, the number of its samples that trained each class's prototype (0 for
    classes it did not touch)::

        p_c = Σ_k c_k[c] P_k[c] / Σ_k c_k[c]    if Σ_k c_k[c] > 0
        p_c = old[c]                             otherwise

    Returns a new tensor in ``old``'s dtype and device. Raises ``ValueError`` on mismatched
    lengths or shapes or on negative counts.
    """
    if old.dim() != 2:
        raise ValueError(f"old must be (C, D), got shape {tuple(old.shape)}")
    if len(client_protos) != len(client_counts):
        raise ValueError(
            f"one count vector per client is needed, got {len(client_protos)} prototype "
            f"matrices and {len(client_counts)} count vectors"
        )
    n_classes = old.shape[0]
    weighted = torch.zeros_like(old)
    total = torch.zeros(n_classes, dtype=old.dtype, device=old.device)
    for k, (protos, counts) in enumerate(zip(client_protos, client_counts, strict=True)):
        if protos.shape != old.shape:
            raise ValueError(
                f"client {k}: prototypes must be {tuple(old.shape)}, got {tuple(protos.shape)}"
            )
        if counts.shape != (n_classes,):
            raise ValueError(
                f"client {k}: counts must be ({n_classes},), got {tuple(counts.shape)}"
            )
        c = counts.to(dtype=old.dtype, device=old.device)
        if bool((c < 0).any()):
            raise ValueError(f"client {k}: counts must be >= 0")
        weighted = weighted + c.view(-1, 1) * protos.to(dtype=old.dtype, device=old.device)
        total = total + c
    touched = total > 0
    mean = weighted / total.clamp_min(1e-12).view(-1, 1)
    return torch.where(touched.view(-1, 1), mean, old)


def _transform(channels: int, height: int, width: int) -> Any:
    # torchvision's transforms take 2 s to import: only PRD's clients pay for them
    from torchvision.transforms import v2

    if channels == 1:
        return v2.Compose(
            [
                v2.RandomResizedCrop(size=(height, width), scale=(0.6, 1.0), antialias=True),
                v2.RandomAffine(degrees=10),
            ]
        )
    return v2.Compose(
        [
            v2.RandomResizedCrop(size=(height, width), scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per-sample random augmentation of a uint8 image batch ``(N, C, H, W)`` -> same shape.

    * ``C == 1`` (MNIST-sized): RandomResizedCrop((H, W), scale=(0.6, 1.0)), RandomAffine(10°).
    * ``C == 3`` (CIFAR-sized, the SupCon recipe): RandomResizedCrop((H, W), scale=(0.2, 1.0)),
      RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, RandomGrayscale(0.2).

    Each sample gets its own random draw (torchvision v2 on a batch tensor would share one).
    torchvision draws from torch's global CPU RNG, so the loop runs inside
    ``torch.random.fork_rng`` with the global RNG seeded from an integer drawn from
    ``generator``: the caller's global RNG is left untouched and the same ``generator`` state
    gives the same output.
    """
    if x.dim() != 4 or x.dtype != torch.uint8:
        raise ValueError(
            f"x must be a uint8 (N, C, H, W) batch, got dtype {x.dtype} shape {tuple(x.shape)}"
        )
    _, channels, height, width = x.shape
    if channels not in (1, 3):
        raise ValueError(f"augment supports 1 or 3 channels, got {channels}")
    transform = _transform(channels, height, width)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    # Only the CPU RNG is forked and reseeded (torch.manual_seed would also reseed CUDA's).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        out = torch.stack([transform(sample) for sample in x])
    return out
