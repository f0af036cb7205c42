"""The maths of GLFC (Dong et al., "Federated Class-Incremental Learning", CVPR 2022; code
``conditionWang/FCIL``): tensor in, tensor out, each function pinned by hand-worked numbers in
``tests/test_glfc.py``. The wiring into fedcl's round loop is :mod:`strategies.baselines.glfc`.

Client loss (the code's ``src/GLFC.py``):

* :func:`gradient_magnitudes`, :func:`group_weights`: the class-aware gradient compensation's
  per-sample weights ``w_i = g_i / mean(g over i's group)``, ``g_i = |sigmoid(z_{i,y_i}) - 1|``,
  the groups being the samples of old classes and those of new ones;
* :func:`relation_target`: the class-semantic relation distillation's target, the one-hot
  label with the old classes' columns replaced by the old model's sigmoid outputs;
* :func:`glfc_loss`: ``0.5 * L_GC + 0.5 * L_RD`` (``L_GC`` alone without an old model);
* :func:`herding`: iCaRL's exemplar selection on normalised features;
  :func:`class_quotas`: a memory budget split evenly over the learned classes.

Prototype gradients and the proxy server (``src/GLFC.py`` ``prototype_mask``,
``src/ProxyServer.py``):

* :func:`proxy_network`: the fixed random LeNet the gradients are taken on;
* :func:`nearest_to_mean`, :func:`perturb_prototype`, :func:`prototype_gradient`: what a
  client uploads for each of its new classes;
* :func:`recover_label`: the label from the last layer's gradient;
* :func:`invert_gradient`: gradient inversion by L-BFGS (Zhu et al., "Deep Leakage from
  Gradients", NeurIPS 2019), keeping the last iterates as reconstructed samples;
* :func:`reconstruction_accuracy`: a model's score on the reconstructions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Inversion",
    "batched_gradient_match_loss",
    "bce_per_sample",
    "class_quotas",
    "glfc_loss",
    "gradient_magnitudes",
    "gradient_match_loss",
    "group_weights",
    "herding",
    "invert_gradient",
    "invert_gradients",
    "nearest_to_mean",
    "perturb_prototype",
    "prototype_gradient",
    "proxy_network",
    "reconstruction_accuracy",
    "recover_label",
    "relation_target",
    "unflatten",
]


# --------------------------------------------------------------------------------------------
# The client's loss
# --------------------------------------------------------------------------------------------
def gradient_magnitudes(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``g_i = |sigmoid(z_{i, y_i}) - 1|``, the magnitude of the BCE gradient on each sample's
    own-class logit (``logits`` ``[B, C]``, ``targets`` ``[B]`` long); ``[B]``, detached."""
    own = logits.detach().gather(1, targets.view(-1, 1)).squeeze(1)
    return (torch.sigmoid(own) - 1).abs()


def group_weights(g: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """The gradient compensation's weights ``w_i = g_i / mean_{j in group(i)} g_j``, the two
    groups being the samples whose label is an old class (``old`` ``[B]`` bool, True) and the
    others; ``g`` ``[B]``. ``old`` None (no old class yet): every weight is 1. A group whose
    ``g`` are all 0 gets weights 0 (the code would divide by zero). ``[B]``, detached."""
    g = g.detach()
    if old is None:
        return torch.ones_like(g)
    w = torch.zeros_like(g)
    for mask in (old, ~old):
        if bool(mask.any()):
            mean = g[mask].mean()
            if float(mean) > 0:
                w[mask] = g[mask] / mean
    return w


def relation_target(targets: torch.Tensor, num_classes: int, old_columns: torch.Tensor,
                    old_logits: torch.Tensor) -> torch.Tensor:
    """The relation distillation's target ``[B, num_classes]``: the one-hot of ``targets``
    ``[B]`` with the columns ``old_columns`` ``[K]`` (long: the old classes) replaced by
    ``sigmoid(old_logits)``, ``old_logits`` ``[B, K]`` the old model's logits of those classes
    (also where the label is an old class, as in the code)."""
    target = F.one_hot(targets, num_classes).to(old_logits.dtype)
    target[:, old_columns] = torch.sigmoid(old_logits.detach())
    return target


def bce_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``logits`` against ``target`` (both ``[B, C]``, target in
    [0, 1]) summed over the C outputs: ``[B]``."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1)


def glfc_loss(logits: torch.Tensor, targets: torch.Tensor, old_classes: torch.Tensor,
              old_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor | None]:
    """GLFC's local loss on a batch: ``logits`` ``[B, C]``, ``targets`` ``[B]`` (long, the
    classes), ``old_classes`` ``[K]`` (long; empty in the first task), ``old_logits``
    ``[B, K]`` the old model's logits of the old classes, or None without an old model.

    ``L_GC = (1/B) sum_i w_i sum_c BCE(z_ic, onehot_ic)`` with :func:`group_weights` (every
    ``w_i`` 1 while ``old_classes`` is empty); ``L_RD = (1/B) sum_i sum_c BCE(z_ic, y~_ic)``
    with :func:`relation_target`. Returns ``(loss, L_GC, L_RD)``: ``loss`` is
    ``0.5 * L_GC + 0.5 * L_RD`` with an old model, ``L_GC`` (and ``L_RD`` None) without.
    The BCE is summed over the outputs (the code averages over them: see the module
    :mod:`strategies.baselines.glfc` on the learning rate). 0 for ``B == 0``."""
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return zero, zero, None if old_logits is None else zero
    num_classes = logits.shape[1]
    onehot = F.one_hot(targets, num_classes).to(logits.dtype)
    old = torch.isin(targets, old_classes) if old_classes.numel() else None
    w = group_weights(gradient_magnitudes(logits, targets), old)
    gc = (w * bce_per_sample(logits, onehot)).mean()
    if old_logits is None:
        return gc, gc, None
    rd = bce_per_sample(logits, relation_target(targets, num_classes, old_classes,
                                                old_logits)).mean()
    return 0.5 * gc + 0.5 * rd, gc, rd


# --------------------------------------------------------------------------------------------
# The exemplar memory
# --------------------------------------------------------------------------------------------
def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL's herding (Rebuffi et al., CVPR 2017, Algorithm 4) on the rows of ``features``
    ``[N, D]``, L2-normalised here: ``mu`` is the mean of the normalised rows; the k-th pick
    (k from 1) is the row ``i`` not picked yet that minimises
    ``||mu - (S + f_i) / k||``, ``S`` the sum of the rows picked before. Returns the first
    ``min(m, N)`` picks in order (long ``[min(m, N)]``); truncating it is iCaRL's reduction.
    Ties go to the lowest index. (The code may pick a row twice; here a row is picked once.)"""
    n = int(features.shape[0])
    m = max(0, min(int(m), n))
    f = F.normalize(features.detach().double(), dim=1)
    mu = f.mean(dim=0)
    picked: list[int] = []
    free = torch.ones(n, dtype=torch.bool)
    total = torch.zeros_like(mu)
    for k in range(1, m + 1):
        dist = (mu - (total + f) / k).norm(dim=1)
        dist[~free] = float("inf")
        i = int(torch.argmin(dist))
        picked.append(i)
        free[i] = False
        total = total + f[i]
    return torch.tensor(picked, dtype=torch.long)


def class_quotas(classes: Sequence[int], capacity: int) -> dict[int, int]:
    """The memory's ``capacity`` rows split evenly over ``classes`` (the classes learned):
    ``capacity // n`` each, one more for the first ``capacity % n`` classes in ascending order
    (the code's ``memory_size // n``, with the remainder used). Empty for no class."""
    ordered = sorted({int(c) for c in classes})
    if not ordered:
        return {}
    share, extra = divmod(max(0, int(capacity)), len(ordered))
    return {c: share + (1 if i < extra else 0) for i, c in enumerate(ordered)}


# --------------------------------------------------------------------------------------------
# Prototype gradients
# --------------------------------------------------------------------------------------------
class _LeNet(nn.Module):
    def __init__(self, channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), nn.Sigmoid())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def proxy_network(input_shape: Sequence[int], num_classes: int, seed: int) -> nn.Module:
    """The fixed random network the prototype gradients are taken on (the code's ``LeNet``:
    three 5x5 convolutions of 12 channels, strides 2, 2, 1, padding 2, sigmoid after each,
    then one linear layer to ``num_classes``; every weight and bias uniform on [-0.5, 0.5]),
    for inputs ``input_shape`` ``(C, H, W)``: the linear layer has
    ``12 * ceil(H/4) * ceil(W/4)`` inputs (768 for 32x32, 588 for 28x28). The same ``seed``
    gives the same network anywhere (its own CPU generator; the global RNG is untouched).
    Returned in float32, eval mode, its parameters requiring grad."""
    c, h, w = (int(v) for v in input_shape)
    hidden = 12 * (-(-h // 4)) * (-(-w // 4))
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        net = _LeNet(c, hidden, num_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return net.eval()


def prototype_gradient(net: nn.Module, x: torch.Tensor, label: int) -> torch.Tensor:
    """The gradient of the cross-entropy of ``net`` on one sample ``x`` ``[C, H, W]`` with
    ``label``, with respect to ``net``'s parameters, flattened in ``parameters()`` order:
    ``[P]``, float32, detached."""
    out = net(x.unsqueeze(0))
    loss = F.cross_entropy(out, torch.tensor([int(label)], device=out.device))
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).detach().float()


def unflatten(net: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    """``flat`` ``[P]`` cut into tensors shaped like ``net``'s parameters, in order. Raises
    ValueError when the sizes differ."""
    sizes = [p.numel() for p in net.parameters()]
    if int(flat.numel()) != sum(sizes):
        raise ValueError(f"a gradient of {flat.numel()} values for a network of {sum(sizes)} "
                         "parameters")
    return [part.reshape(p.shape) for part, p in zip(flat.split(sizes), net.parameters(),
                                                      strict=True)]


def recover_label(last_weight_grad: torch.Tensor) -> int:
    """The label of a single sample's cross-entropy gradient, from the gradient of the last
    linear layer's weight ``[num_classes, hidden]``: the row with the smallest sum (row c is
    ``(p_c - y_c) h`` with ``h > 0`` after a sigmoid, so only the label's row is negative;
    iDLG, Zhao et al. 2020; the code's ``gradient2label``)."""
    return int(torch.argmin(last_weight_grad.sum(dim=-1)))


def nearest_to_mean(features: torch.Tensor) -> int:
    """The row of ``features`` ``[N, D]`` (L2-normalised here) nearest to the mean of the
    normalised rows (the code's prototype: the sample nearest its class's mean feature)."""
    f = F.normalize(features.detach().double(), dim=1)
    return int(torch.argmin((f.mean(dim=0) - f).norm(dim=1)))


def perturb_prototype(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      label: int, num_classes: int, steps: int, lr: float,
                      weight_decay: float = 1e-5) -> torch.Tensor:
    """The prototype ``x`` ``[C, H, W]`` perturbed by ``steps`` steps of SGD (``lr``,
    ``weight_decay`` on the input) on the BCE of ``forward(x)`` (logits ``[1, num_classes]``,
    averaged over the outputs, as the code) against the one-hot ``label``. The model is not
    changed (its gradients are not kept). Returns the new input, detached."""
    data = x.detach().clone().unsqueeze(0).requires_grad_(True)
    target = F.one_hot(torch.tensor([int(label)]), num_classes).to(data.dtype).to(data.device)
    opt = torch.optim.SGD([data], lr=lr, weight_decay=weight_decay)
    for _ in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(forward(data), target)
        (grad,) = torch.autograd.grad(loss, [data])
        data.grad = grad
        opt.step()
    return data.detach().squeeze(0)


# --------------------------------------------------------------------------------------------
# The proxy server
# --------------------------------------------------------------------------------------------
def gradient_match_loss(net: nn.Module, x: torch.Tensor, label: int,
                        target: Sequence[torch.Tensor], create_graph: bool = False
                        ) -> torch.Tensor:
    """``sum_l ||grad_l(x) - target_l||^2``: the squared distance between the gradient of
    ``net``'s cross-entropy on ``x`` ``[1, C, H, W]`` with ``label`` and ``target`` (one tensor
    per parameter, in order). ``create_graph`` keeps the graph for a step on ``x``."""
    out = net(x)
    loss = F.cross_entropy(out, torch.tensor([int(label)], device=out.device))
    grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=create_graph)
    return sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))  # type: ignore[return-value]


@dataclass
class Inversion:
    """What :func:`invert_gradient` returns: ``images`` ``[k, C, H, W]`` (the last ``k``
    iterates, finite ones only), the matching loss at the start (the noise) and at the end."""

    images: torch.Tensor
    start_loss: float
    end_loss: float


def invert_gradient(net: nn.Module, target: Sequence[torch.Tensor], label: int,
                    shape: Sequence[int], steps: int, lr: float, keep: int,
                    generator: torch.Generator) -> Inversion:
    """Gradient inversion (the code's ``ProxyServer.reconstruction``): from Gaussian noise of
    ``shape`` ``(C, H, W)`` drawn from ``generator``, ``steps`` steps of
    ``torch.optim.LBFGS`` (``lr``, its default 20 evaluations per step at most) on
    :func:`gradient_match_loss` against ``target`` with ``label``; the iterate after each of
    the last ``keep`` steps is kept (the code: 250 steps, lr 0.1, 20 kept). Iterates with a
    non-finite value are left out, and the steps stop at the first one. ``net``'s parameters
    are not changed. On ``net``'s device. :func:`invert_gradients` with one gradient."""
    return invert_gradients(net, [target], [label], shape, steps, lr, keep, [generator])[0]


def batched_gradient_match_loss(net: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                                targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`gradient_match_loss` of every row at once: ``x`` ``[n, C, H, W]``, ``labels``
    ``[n]`` (long), ``targets`` one tensor per parameter of ``net`` with a leading ``n``
    (row ``i`` is sample ``i``'s target gradient). Returns ``[n]``: row ``i`` is
    ``sum_l ||grad_l(x_i) - targets_l[i]||^2``, each sample's gradient taken alone (per-sample
    gradients by ``torch.func``). Differentiable in ``x``; ``net`` must have no buffers."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def one(xi: torch.Tensor, yi: torch.Tensor, ti: tuple[torch.Tensor, ...]) -> torch.Tensor:
        def ce(p: dict[str, torch.Tensor]) -> torch.Tensor:
            out = torch.func.functional_call(net, p, (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0))

        grads = torch.func.grad(ce)(params)
        return sum(((grads[k] - t) ** 2).sum() for k, t in zip(params, ti, strict=True))  # type: ignore[return-value]

    return torch.func.vmap(one)(x, labels, tuple(targets))


def invert_gradients(net: nn.Module, targets: Sequence[Sequence[torch.Tensor]],
                     labels: Sequence[int], shape: Sequence[int], steps: int, lr: float,
                     keep: int, generators: Sequence[torch.Generator]) -> list[Inversion]:
    """:func:`invert_gradient` for ``n`` gradients at once: row ``i`` starts from Gaussian
    noise of ``shape`` ``(C, H, W)`` drawn from ``generators[i]`` and matches ``targets[i]``
    (one tensor per parameter) with ``labels[i]``. One ``torch.optim.LBFGS`` (``lr``, at most
    20 evaluations per step) minimises the *sum* of the rows' matching losses
    (:func:`batched_gradient_match_loss`) over all rows for ``steps`` steps; the iterate of
    each row after each of the last ``keep`` steps is kept.

    **Deviation (speed):** the code inverts one gradient at a time. The sum's gradient in row
    ``i`` is row ``i``'s own gradient (the losses are separate), but L-BFGS's step size and
    curvature history are shared by the rows, so for ``n > 1`` each row's path differs from
    its own inversion's (with ``n == 1`` it is that inversion). One call of a few hundred
    evaluations replaces ``n`` such calls: on a GPU the rows cost about what one costs. When
    any row turns non-finite the shared state is lost: the steps stop for all rows, which
    keep the iterates kept so far, and the rows that are non-finite end with a NaN loss.

    Returns one :class:`Inversion` per row, in order; ``images`` on the CPU. Raises
    ValueError when the lengths of ``targets``, ``labels`` and ``generators`` differ."""
    n = len(targets)
    if len(labels) != n or len(generators) != n:
        raise ValueError(f"{n} targets, {len(labels)} labels and {len(generators)} generators")
    if n == 0:
        return []
    device = next(net.parameters()).device
    dims = tuple(int(s) for s in shape)
    data = torch.stack([torch.randn(dims, generator=g) for g in generators]).to(device)
    data.requires_grad_(True)
    y = torch.tensor([int(v) for v in labels], dtype=torch.long, device=device)
    stacked = [torch.stack([t[j].to(device) for t in targets])
               for j in range(len(targets[0]))]
    opt = torch.optim.LBFGS([data], lr=lr)

    def losses(x: torch.Tensor) -> torch.Tensor:
        return batched_gradient_match_loss(net, x, y, stacked)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        total = losses(data).sum()
        (grad,) = torch.autograd.grad(total, [data])
        data.grad = grad
        return total.detach()

    with torch.no_grad():
        start = losses(data.detach()).tolist()
    kept: list[torch.Tensor] = []
    for step in range(int(steps)):
        opt.step(closure)  # type: ignore[arg-type]
        if not bool(torch.isfinite(data).all()):
            break
        if step >= steps - keep:
            kept.append(data.detach().clone())
    with torch.no_grad():
        end = losses(data.detach())
        end = torch.where(torch.isfinite(data.detach().flatten(1)).all(dim=1), end,
                          torch.full_like(end, float("nan"))).tolist()
    images = (torch.stack(kept, dim=1).cpu() if kept
              else torch.zeros((n, 0, *dims)))
    return [Inversion(images[i], float(start[i]), float(end[i])) for i in range(n)]


@torch.no_grad()
def reconstruction_accuracy(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            y: torch.Tensor, batch_size: int = 256) -> float:
    """The share of ``x`` ``[N, C, H, W]`` whose argmax over ``forward``'s logits is ``y``
    ``[N]``: the proxy's score of a model. 0.0 for ``N == 0``."""
    n = int(y.shape[0])
    if n == 0:
        return 0.0
    correct = 0
    for start in range(0, n, batch_size):
        pred = forward(x[start:start + batch_size]).argmax(dim=1).cpu()
        correct += int((pred == y[start:start + batch_size].cpu()).sum())
    return correct / n
