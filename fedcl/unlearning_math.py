"""The math of federated unlearning and of judging it, as pure functions on tensors.

Each function follows the method's paper (and its authors' public code where the paper leaves a
detail open); the unlearning methods in ``strategies/unlearning/`` are built on these.

- :func:`fisher_importance`: SSD's diagonal importances, the mean over mini-batches of the
  squared mini-batch gradient of the cross-entropy, the model in eval mode (Foster, Schoepf
  and Brintrup, "Fast Machine Unlearning without Retraining through Selective Synaptic
  Dampening", AAAI 2024).
- :func:`ssd_dampen`: Selective Synaptic Dampening: a parameter whose forget importance exceeds
  ``alpha`` times its full importance is scaled by ``min(lam * I_D / I_f, 1)`` (never up).
- :func:`ssd_selection_bound`: the largest ``I_f / I_D`` any parameter can have, ``B / B_f``,
  when the importance on all data averages ``B`` mini-batches of which ``B_f`` are the forget
  set's: ``alpha`` at or above it selects nothing.
- :func:`federaser_calibrate`: FedEraser's calibrated step, per tensor: the stored update's
  length along the calibration update's direction (Liu et al., "FedEraser", IWQoS 2021).
- :func:`project_forget_gradient`: the forget gradient less its component along the retain
  gradient, with one dot product over all tensors (Geometric-Disentanglement Unlearning's
  rank-1 projection, Zhou, Zhang et al., arXiv 2511.17100, adapted to cross-entropy gradients
  of a vision model and without its optimizer-metric whitening).
- :func:`linear_cka`: linear CKA of two feature matrices on the same inputs (Kornblith et al.,
  ICML 2019; as "Are We Truly Forgetting?", Kim, Cha and Kim, arXiv 2503.06991, uses it).
- :func:`entropy_mia`: SSD's membership-inference attack (Foster et al., AAAI 2024): a
  class-balanced logistic regression on the prediction entropy, retain-train samples as
  members and test samples as non-members; returns the share of forget samples judged
  members (lower: more forgotten; the target is the retrained model's value).
- :func:`mean_lora_update`: the federated average of LoRA adapters as the mean of the
  clients' products ``B_k A_k`` (what merging each client's adapters would add, averaged), not
  ``mean(B) mean(A)``.
- :func:`relative_distance`: relative L2 distance between two sets of weights.
- :func:`gradient_restriction_term`: IAU's gradient-restriction (GR) term, the sum over
  parameter tensors of the L2 norm of the loss's gradient, differentiable (double backprop)
  so that training can minimise it (Liu, Wu, Lian and Chen, "Efficient Machine Unlearning via
  Influence Approximation", arXiv 2507.23257, and their code).
- :func:`fresh_adam_step` and :func:`sgd_step`: IAU's one unlearning step on a given
  gradient; a fresh Adam's bias-corrected first step is ``lr * g / (|g| + eps)``, about
  ``lr * sign(g)`` per coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

Tensors = Mapping[str, torch.Tensor]


def fisher_importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]
                      ) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of the squared gradient of the batch's mean cross-entropy, per
    parameter, with the model in eval mode (restored afterwards). A batch is ``(x, y)`` or
    ``(x, y, head)`` (scored by ``model(x, head)``)."""
    was_training = model.training
    model.eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    try:
        for x, y, *head in batches:
            loss = nn.functional.cross_entropy(model(x, *head), y)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), grad in zip(params.items(), grads, strict=True):
                if grad is not None:
                    total[name] += grad.detach() ** 2
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no batches to compute importances from")
    return {name: value / count for name, value in total.items()}


def ssd_dampen(params: Tensors, importance_all: Tensors, importance_forget: Tensors,
               alpha: float, lam: float) -> dict[str, torch.Tensor]:
    """SSD: where ``I_f > alpha * I_D``, multiply the parameter by ``min(lam * I_D / I_f, 1)``;
    elsewhere keep it. Returns new tensors (the inputs are not changed)."""
    if alpha <= 0 or lam <= 0:
        raise ValueError(f"alpha and lam must be positive, got alpha={alpha}, lam={lam}")
    out = {}
    for name, theta in params.items():
        i_all, i_forget = importance_all[name], importance_forget[name]
        selected = i_forget > alpha * i_all
        beta = torch.clamp(lam * i_all / torch.where(selected, i_forget, 1.0), max=1.0)
        out[name] = torch.where(selected, beta * theta, theta)
    return out


def ssd_selection_bound(batches_all: int, batches_forget: int) -> float:
    """``B / B_f``: with ``I_D`` the mean of squared gradients over ``B`` mini-batches, ``B_f``
    of them the forget set's (whose mean is ``I_f``), and the others' squares non-negative,
    ``I_D >= (B_f / B) I_f`` for every parameter; so ``I_f > alpha I_D`` (SSD's selection)
    needs ``alpha < B / B_f``, and at ``alpha >= B / B_f`` SSD dampens nothing. ``inf`` when
    there is no forget batch."""
    if batches_forget < 0 or batches_all < batches_forget:
        raise ValueError(f"need 0 <= batches_forget <= batches_all, got {batches_forget} and "
                         f"{batches_all}")
    return math.inf if batches_forget == 0 else batches_all / batches_forget


def federaser_calibrate(new_global: Tensors, old_update: Tensors, new_update: Tensors
                        ) -> dict[str, torch.Tensor]:
    """``new_global + ||old_update|| * new_update / ||new_update||`` per tensor (a tensor whose
    calibration update is zero keeps the new global value)."""
    out = {}
    for name, base in new_global.items():
        new = new_update[name].to(torch.float64)
        norm_new = torch.linalg.vector_norm(new)
        if norm_new == 0:
            out[name] = base.clone()
            continue
        step = torch.linalg.vector_norm(old_update[name].to(torch.float64)) * new / norm_new
        out[name] = (base.to(torch.float64) + step).to(base.dtype)
    return out


def project_forget_gradient(forget: Tensors, retain: Tensors) -> dict[str, torch.Tensor]:
    """``g_f - (<g_f, g_r> / <g_r, g_r>) g_r`` with the dot products summed over all tensors
    (``g_f`` unchanged when the retain gradient is zero)."""
    dot = sum(float((forget[n].double() * retain[n].double()).sum()) for n in forget)
    norm2 = sum(float((retain[n].double() ** 2).sum()) for n in forget)
    if norm2 == 0.0:
        return {n: g.clone() for n, g in forget.items()}
    coef = dot / norm2
    return {n: g - coef * retain[n] for n, g in forget.items()}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features ``x`` (n, d1) and ``y`` (n, d2) of the same n inputs:
    ``HSIC(XX', YY') / sqrt(HSIC(XX', XX') HSIC(YY', YY'))`` with centred Gram matrices, in the
    feature-space form ``||Yc' Xc||_F^2 / (||Xc' Xc||_F ||Yc' Yc||_F)``."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"CKA needs the same n >= 2 inputs, got {x.shape[0]} and {y.shape[0]}")
    xc = x.double() - x.double().mean(0)
    yc = y.double() - y.double().mean(0)
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    denom = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(cross / denom) if denom > 0 else 0.0


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row's softmax."""
    logp = torch.log_softmax(logits.double(), dim=1)
    return -(logp.exp() * logp).sum(1)


def entropy_mia(member: np.ndarray, nonmember: np.ndarray, forget: np.ndarray) -> float:
    """Share of ``forget`` samples a class-balanced logistic regression on the entropy, fitted
    on ``member`` (label 1) and ``nonmember`` (label 0) entropies, judges members."""
    from sklearn.linear_model import LogisticRegression

    if len(member) == 0 or len(nonmember) == 0 or len(forget) == 0:
        raise ValueError("the attack needs member, non-member and forget samples")
    features = np.concatenate([member, nonmember]).reshape(-1, 1)
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    attack = LogisticRegression(class_weight="balanced").fit(features, labels)
    return float(attack.predict(np.asarray(forget).reshape(-1, 1)).mean())


def weighted_mean(parts: list[tuple[float, Tensors]]) -> dict[str, torch.Tensor]:
    """``sum(w * tensors) / sum(w)`` per name, in float64: how the server pools what clients
    send (importances weighted by mini-batches, gradients and adapters by samples)."""
    total = sum(w for w, _ in parts)
    if not parts or total <= 0:
        raise ValueError("nothing to average: no part with a positive weight")
    return {k: sum(w * t[k].double() for w, t in parts) / total  # type: ignore[misc]
            for k in parts[0][1]}


def mean_lora_update(parts: list[tuple[float, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]],
                     scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Per adapted layer, ``scale * sum_k w_k B_k A_k / sum_k w_k`` in float64: the weight
    update that is the weighted mean of the clients' merged LoRA updates. ``parts`` holds one
    ``(w_k, {layer: (A_k, B_k)})`` per client, ``A`` being ``(r, in)`` and ``B`` ``(out, r)``;
    ``scale`` is LoRA's ``lora_alpha / r``. Averaging ``A`` and ``B`` separately would merge
    ``mean(B) mean(A)``, which is not the mean of the products (cross terms ``B_j A_k``)."""
    total = sum(w for w, _ in parts)
    if not parts or total <= 0:
        raise ValueError("nothing to average: no part with a positive weight")
    out: dict[str, torch.Tensor] = {}
    for w, layers in parts:
        for name, (a, b) in layers.items():
            prod = (w / total) * (b.double() @ a.double())
            out[name] = out[name] + prod if name in out else prod
    return {name: scale * value for name, value in out.items()}


def relative_distance(a: Tensors, b: Tensors) -> float:
    """``||a - b|| / ||b||`` over all floating-point tensors together."""
    num = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b
              if b[n].is_floating_point())
    den = sum(float((b[n].double() ** 2).sum()) for n in b if b[n].is_floating_point())
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def gradient_restriction_term(loss: torch.Tensor, params: Iterable[torch.Tensor]
                              ) -> torch.Tensor:
    """``sum_i ||d loss / d params_i||_2`` over the tensors ``params`` (each norm over all of
    the tensor's entries), as a scalar tensor that stays differentiable in ``params``: the
    gradient is taken with ``create_graph=True``, so ``backward`` of a loss holding this term
    differentiates through it (double backprop). A tensor the loss does not reach (another
    task's head) adds 0. ``loss`` is a scalar with a graph to ``params``; raises ValueError for
    a non-scalar loss. The norm's gradient at a zero gradient is taken as 0 (PyTorch's
    subgradient). IAU trains with ``CE + alpha * gradient_restriction_term(CE, params)``,
    alpha 0.005 (Liu et al., arXiv 2507.23257)."""
    if loss.dim() != 0:
        raise ValueError(f"the gradient-restriction term needs a scalar loss, got shape "
                         f"{tuple(loss.shape)}")
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    norms = [torch.linalg.vector_norm(g) for g in grads if g is not None]
    if not norms:
        return loss.new_zeros(())
    return torch.stack(norms).sum()


def fresh_adam_step(params: Tensors, grads: Tensors, lr: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                    ) -> dict[str, torch.Tensor]:
    """One step of Adam from a fresh state (moments zero, step 1), as ``torch.optim.Adam``
    takes it (no weight decay, no amsgrad), for every name in ``grads``:
    ``m = (1 - b1) g``, ``v = (1 - b2) g^2``, ``m_hat = m / (1 - b1)``,
    ``v_hat = v / (1 - b2)``, ``theta - lr * m_hat / (sqrt(v_hat) + eps)``. The bias
    corrections cancel the moments' factors, so the step is ``lr * g / (|g| + eps)``: about
    ``lr * sign(g)`` wherever ``|g| >> eps``, whatever the gradient's scale. Computed in
    float64 and returned in each parameter's dtype; a parameter without a gradient is left
    out. Raises ValueError for ``lr <= 0`` or betas outside [0, 1)."""
    b1, b2 = betas
    if not lr > 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"Adam needs lr > 0 and betas in [0, 1), got lr={lr}, betas={betas}")
    out = {}
    for name, g in grads.items():
        theta, g64 = params[name], g.double()
        m_hat = (1 - b1) * g64 / (1 - b1)
        v_hat = (1 - b2) * g64 * g64 / (1 - b2)
        step = lr * m_hat / (v_hat.sqrt() + eps)
        out[name] = (theta.double() - step).to(theta.dtype)
    return out


def sgd_step(params: Tensors, grads: Tensors, lr: float) -> dict[str, torch.Tensor]:
    """``theta - lr * g`` for every name in ``grads``, in float64, returned in each
    parameter's dtype. Raises ValueError for ``lr <= 0``."""
    if not lr > 0:
        raise ValueError(f"SGD needs lr > 0, got {lr}")
    return {name: (params[name].double() - lr * g.double()).to(params[name].dtype)
            for name, g in grads.items()}


__all__ = ["entropy_mia", "federaser_calibrate", "fisher_importance", "fresh_adam_step",
           "gradient_restriction_term", "linear_cka", "prediction_entropy",
           "project_forget_gradient", "relative_distance", "sgd_step", "ssd_dampen",
           "weighted_mean"]
