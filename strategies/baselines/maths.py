"""The maths of the four continual-learning baselines: tensor in, tensor out, each function
pinned by hand-worked numbers in ``tests/test_baselines_math.py``. The wiring into fedcl's
round loop is in :mod:`strategies.baselines.ewc`, :mod:`~strategies.baselines.lwf` and
:mod:`~strategies.baselines.replay`.

* EWC (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017):
  :func:`ewc_penalty`, :func:`diagonal_fisher`, and :class:`FisherAnchor`, which keeps every
  past task's quadratic, or online EWC's running one (Schwarz et al., "Progress & Compress",
  ICML 2018), as one pair (F, anchor) with the same gradient; :func:`sgd_stability_limit`, the
  curvature past which the penalty makes local SGD diverge.
* LwF (Li and Hoiem, "Learning without Forgetting", ECCV 2016): :func:`distillation_loss`.
* Experience replay with a reservoir (Chaudhry et al., "On Tiny Episodic Memories in Continual
  Learning", 2019; mammoth's ``utils/buffer.py``): :func:`reservoir_slots`,
  :func:`reservoir_add`, :func:`replay_draw`, and :class:`TrainingReservoir` (the buffer on the
  training device while a client trains).
* DER / DER++ (Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS
  2020): :func:`logit_matching`, :func:`derpp_terms`.
* :func:`outputs_by_head`: a batch whose rows belong to different heads (task-IL replay).
* TARGET (Zhang, Chen, Zhuang and Lyu, "TARGET: Federated Class-Continual Learning via
  Exemplar-Free Distillation", ICCV 2023), wired in :mod:`~strategies.baselines.target`: the
  generator :class:`SynthesisGenerator`; its losses :func:`bn_statistics_loss` (through
  :class:`BNStatisticsHooks`), :func:`adversarial_disagreement` and
  :func:`class_cross_entropy`; the server student's :func:`kl_distillation`; the first-order
  meta step :func:`accumulate_meta_gradients`; :func:`random_crop_flip` and
  :func:`quantise_images`; the clients' loss :func:`target_client_loss`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn import functional as F

from fedcl.api import SampleBuffer, host_to_device

__all__ = [
    "BNStatisticsHooks",
    "FisherAnchor",
    "SynthesisGenerator",
    "TrainingReservoir",
    "accumulate_meta_gradients",
    "adversarial_disagreement",
    "batch_statistics",
    "bn_statistics_loss",
    "class_cross_entropy",
    "derpp_terms",
    "diagonal_fisher",
    "distillation_loss",
    "ewc_penalty",
    "kl_distillation",
    "logit_matching",
    "outputs_by_head",
    "quantise_images",
    "random_crop_flip",
    "replay_draw",
    "reservoir_add",
    "reservoir_slots",
    "sgd_stability_limit",
    "target_client_loss",
]


# --------------------------------------------------------------------------------------------
# EWC
# --------------------------------------------------------------------------------------------
def ewc_penalty(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor],
                fisher: Sequence[torch.Tensor], weight: float) -> torch.Tensor:
    """``(weight / 2) * sum_i F_i (theta_i - theta*_i)^2`` over every element of every
    tensor, matched by position (the EWC penalty, Kirkpatrick et al. 2017, eq. 3). Shapes of
    ``params[i]``, ``anchor[i]`` and ``fisher[i]`` agree; a scalar tensor in the loss's units
    (mammoth's ``ewc_on`` drops the ½: its ``e_lambda`` is ``weight / 2``). Raises ValueError
    when the lists differ in length."""
    if not len(params) == len(anchor) == len(fisher):
        raise ValueError(f"EWC penalty over {len(params)} parameters with {len(anchor)} "
                         f"anchors and {len(fisher)} Fisher diagonals")
    total = sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchor, fisher, strict=True))
    return 0.5 * weight * total  # type: ignore[return-value]


def diagonal_fisher(model: nn.Module, batches: Iterable[torch.Tensor], head: int | None,
                    chunk: int = 16) -> tuple[dict[str, torch.Tensor], int]:
    """The diagonal of the Fisher information of ``model`` (eval mode: no dropout) at its
    current weights over the inputs ``batches`` (float tensors ``[B, C, H, W]``, model-ready),
    through head ``head``: for every parameter element i,

        F_i = (1/N) sum_n sum_c p(c | x_n) (d log p(c | x_n) / d theta_i)^2,

    the expectation over the model's own predictive distribution (the true Fisher of the EWC
    paper, computed exactly over the classes, not sampled; not the empirical Fisher of the
    labels). Per-sample Jacobians come from :func:`torch.func.jacrev`, ``chunk`` samples at a
    time (memory: ``chunk x classes x parameters`` floats; the cost grows with the classes:
    ~5 s for 256 MNIST samples through the 0.48 M-parameter MLP on one CPU core).
    Returns (parameter name -> F, same shape as the parameter, float32; N, the samples). A
    parameter the head does not reach (another task's head) gets zeros. The model's mode is
    restored."""
    was_training = model.training
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}

    def log_probs(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, weights, (x.unsqueeze(0),), {"task": head})
        return F.log_softmax(out, dim=1)[0]

    jacobian = vmap(jacrev(log_probs), in_dims=(None, 0))
    n = 0
    try:
        for batch in batches:
            for part in batch.split(chunk):
                with torch.no_grad():
                    probs = F.softmax(model(part, head), dim=1)  # [b, C]
                jac = jacobian(params, part)  # name -> [b, C, *shape]
                for name, j in jac.items():
                    weighted = probs.reshape(*probs.shape, *([1] * (j.dim() - 2))) * j.pow(2)
                    fisher[name] += weighted.sum(dim=(0, 1)).float()
                n += int(part.shape[0])
    finally:
        model.train(was_training)
    if n:
        fisher = {name: f / n for name, f in fisher.items()}
    return fisher, n


@dataclass
class FisherAnchor:
    """The EWC penalties of every past task as one quadratic ``F (theta - anchor)^2``.

    Standard EWC (``online`` False) penalises ``sum_s F_s (theta - theta*_s)^2``. Its
    gradient is that of ``F (theta - anchor)^2`` with ``F = sum_s F_s`` and
    ``anchor = sum_s F_s theta*_s / F`` (the penalty differs by a constant), so two tensors per
    parameter hold any number of tasks: :meth:`add` keeps the running sums ``F`` and
    ``F_theta = sum_s F_s theta*_s``. Where ``F`` is 0 the anchor is the latest task's.

    Online EWC (``online`` True; Schwarz et al. 2018): ``F <- gamma * F + F_t`` and the anchor
    is the latest task's weights ``theta*_t``.

    All tensors are keyed by parameter name, float32 (the running sums in float64)."""

    online: bool = False
    gamma: float = 1.0
    fisher: dict[str, torch.Tensor] | None = None
    weighted: dict[str, torch.Tensor] | None = None  # F_theta (standard EWC)
    latest: dict[str, torch.Tensor] | None = None  # theta*_t of the last task added

    def add(self, fisher: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
        """Add a finished task: its Fisher diagonal ``fisher`` at its final weights
        ``weights`` (name -> tensor; every name of ``fisher`` must be in ``weights``)."""
        f_new = {k: v.double() for k, v in fisher.items()}
        w_new = {k: weights[k].double() for k in fisher}
        if self.fisher is None:
            self.fisher = f_new
            self.weighted = {k: f_new[k] * w_new[k] for k in f_new}
        elif self.online:
            self.fisher = {k: self.gamma * self.fisher[k] + f_new[k] for k in f_new}
        else:
            assert self.weighted is not None
            self.fisher = {k: self.fisher[k] + f_new[k] for k in f_new}
            self.weighted = {k: self.weighted[k] + f_new[k] * w_new[k] for k in f_new}
        self.latest = w_new

    def quadratic(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(F, anchor) as float32 tensors by name, or None before any task."""
        if self.fisher is None or self.latest is None:
            return None
        if self.online:
            anchor = self.latest
        else:
            assert self.weighted is not None
            anchor = {k: torch.where(self.fisher[k] > 0,
                                     self.weighted[k] / self.fisher[k].clamp(min=1e-300),
                                     self.latest[k]) for k in self.fisher}
        return ({k: v.float() for k, v in self.fisher.items()},
                {k: v.float() for k, v in anchor.items()})

    def state_dict(self) -> dict[str, object]:
        return {"fisher": self.fisher, "weighted": self.weighted, "latest": self.latest}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.fisher = state["fisher"]  # type: ignore[assignment]
        self.weighted = state["weighted"]  # type: ignore[assignment]
        self.latest = state["latest"]  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# LwF
# --------------------------------------------------------------------------------------------
def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """Knowledge distillation in LwF's cross-entropy form (Li and Hoiem 2016, eq. 2; TARGET's
    ``KD_loss``): ``-(1/B) sum_b sum_c softmax(t_b/T)_c log softmax(s_b/T)_c`` for logits
    ``student`` and ``teacher`` ``[B, C]``; no T² factor. Its value at ``student == teacher``
    is the teacher's entropy, not 0 (its gradient is 0 there). A scalar; 0 for ``B == 0``."""
    if student.shape != teacher.shape:
        raise ValueError(f"distillation over student logits {tuple(student.shape)} and "
                         f"teacher logits {tuple(teacher.shape)}")
    if student.shape[0] == 0:
        return student.sum() * 0.0
    target = F.softmax(teacher.detach() / temperature, dim=1)
    return -(target * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()


def sgd_stability_limit(lr: float, momentum: float = 0.0) -> float:
    """The largest curvature ``h`` of a quadratic ``h x^2 / 2`` on which SGD with learning rate
    ``lr`` and heavy-ball momentum ``momentum`` (PyTorch's form: ``v = m v + g``,
    ``x -= lr v``) does not diverge: ``2 (1 + momentum) / lr``. The iteration
    ``x' = (1 + m - lr h) x - m x_prev`` is stable iff ``|m| < 1`` and
    ``0 < lr h < 2 (1 + m)`` (Polyak 1964); plain SGD's is ``lr h < 2``. Raises ValueError
    for ``lr`` <= 0."""
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0, got {lr}")
    return 2.0 * (1.0 + momentum) / lr


# --------------------------------------------------------------------------------------------
# Reservoir replay
# --------------------------------------------------------------------------------------------
def reservoir_slots(seen: int, filled: int, capacity: int, offers: int,
                    generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Reservoir sampling of ``offers`` new examples into a buffer of ``capacity`` rows that
    holds ``filled`` and has been offered ``seen`` examples before (mammoth's
    ``utils/buffer.py``: offer n, counted from 0, goes to a free row while there is one, else
    to row j for j drawn uniformly from {0..n}, if j < capacity: every offer is then kept
    with probability capacity/(n+1)).

    Deviation: a free row is filled whenever there is one (``filled < capacity``), not only
    while ``n < capacity``, so rows freed by an erasure's purge fill again; without purges the
    two agree. One uniform is drawn from ``generator`` per offer (``offers`` float64 draws),
    used or not, so the stream of draws does not depend on the buffer's state.

    Returns (positions, rows): the offers kept (their positions in the batch) and the rows
    they go to, rows ``< filled`` overwritten in place, rows ``filled, filled + 1, ...``
    appended in that order; where two offers of the batch pick the same row, only the later
    one is listed (it overwrites the earlier)."""
    uniforms = torch.rand(offers, generator=generator, dtype=torch.float64).tolist()
    target: dict[int, int] = {}  # row -> last offer that lands there
    rows = filled
    for i, u in enumerate(uniforms):
        if rows < capacity:
            target[rows] = i
            rows += 1
            continue
        j = int(u * (seen + i + 1))  # uniform on {0..n}, n = seen + i
        if j < capacity:
            target[j] = i
    order = sorted(target)
    return [target[r] for r in order], order


class TrainingReservoir:
    """A client's reservoir buffer while it trains: the :class:`~fedcl.api.SampleBuffer`'s
    columns and classes on the training device, so a
    step's draw (:meth:`rows`) and offer (:meth:`offer`) are indexing on the device and never
    make the host wait for the GPU. Rows are allocated as offers need them, doubling up to
    ``capacity``. The reservoir's choices (:func:`reservoir_slots`) depend on
    counts and the generator alone and are made on the CPU; the index tensors go to the device
    with :func:`fedcl.api.host_to_device`. Columns named in ``on_host`` are kept on the CPU
    only (offered as CPU tensors, read with :meth:`host_rows`), for decisions the host makes
    per step without asking the GPU (which heads a task-IL draw holds). :meth:`save` writes
    the rows back to the buffer, one copy per column, at the end of training.

    On the CPU this is the same computation as offering to the buffer directly; on a GPU it
    stores the same rows (per-client FedDER++ on an H200 spent 64 % of its training time
    waiting in per-step copies before)."""

    def __init__(self, buffer: SampleBuffer, capacity: int, device: torch.device | str,
                 on_host: Sequence[str] = ()) -> None:
        self.device = torch.device(device)
        self.capacity = max(int(capacity), 0)
        self.filled = len(buffer)
        # rows allocated: what the buffer holds, grown by doubling up to the capacity as
        # offers need them (a capacity far above a client's data costs nothing)
        self.size = self.filled
        self.on_host = tuple(on_host)
        self.columns = {name: self._to_device(col) for name, col in buffer.columns.items()
                        if name not in self.on_host}
        self.classes = self._to_device(buffer.classes)
        self.host = {name: col.clone() for name, col in buffer.columns.items()
                     if name in self.on_host}

    def __len__(self) -> int:
        return self.filled

    def _to_device(self, column: torch.Tensor) -> torch.Tensor:
        """A copy of ``column`` on the device (never the buffer's own tensor: offers write)."""
        out = torch.empty_like(column, device=self.device)
        out.copy_(host_to_device(column.contiguous(), self.device))
        return out

    def rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``rows`` (CPU indices ``[R]``, each < :attr:`filled`) of every column but the
        ``on_host`` ones, on the device, ``[R, ...]``."""
        index = host_to_device(rows, self.device)
        return {name: column[index] for name, column in self.columns.items()}

    def host_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of column ``name`` from its host copy (``on_host``), on the CPU."""
        return self.host[name][rows]

    def offer(self, seen: int, generator: torch.Generator, classes: torch.Tensor,
              **columns: torch.Tensor) -> int:
        """Offer a batch by reservoir sampling (:func:`reservoir_slots`): ``classes`` ``[B]``
        and one ``[B, ...]`` tensor per column (every column of the buffer, none else; the
        first batch names them; ``on_host`` columns on the CPU, the others anywhere). Returns
        the new count of examples offered, ``seen + B``; nothing is kept for capacity 0.
        Raises ValueError for other columns than the buffer's."""
        b = int(classes.shape[0])
        if self.capacity <= 0 or b == 0:
            return seen + b
        known = {*self.columns, *self.host}
        if known and set(columns) != known:
            raise ValueError(f"a reservoir offer needs columns {sorted(known)}, got "
                             f"{sorted(columns)}")
        positions, rows = reservoir_slots(seen, self.filled, self.capacity, b, generator)
        if not positions:
            return seen + b
        self._grow(rows[-1] + 1)
        pos_cpu = torch.tensor(positions, dtype=torch.long)
        row_cpu = torch.tensor(rows, dtype=torch.long)
        pos, row = host_to_device(pos_cpu, self.device), host_to_device(row_cpu, self.device)
        for name, value in columns.items():
            if name in self.on_host:
                if name not in self.host:  # the first offer names the columns
                    self.host[name] = value.new_zeros((self.size, *value.shape[1:]))
                self.host[name][row_cpu] = value.detach()[pos_cpu].to(self.host[name].dtype)
                continue
            if name not in self.columns:
                self.columns[name] = torch.zeros((self.size, *value.shape[1:]),
                                                 dtype=value.dtype, device=self.device)
            column = self.columns[name]
            column[row] = host_to_device(value.detach(), self.device)[pos].to(column.dtype)
        self.classes[row] = host_to_device(classes.detach(), self.device)[pos].to(torch.int64)
        self.filled = max(self.filled, rows[-1] + 1)  # fresh rows are filled, filled+1, ...
        return seen + b

    def _grow(self, rows: int) -> None:
        """Make room for ``rows`` rows: double the allocation (capped at the capacity) until
        it holds them, keeping every column's rows, its host copy's and the classes'."""
        if rows <= self.size:
            return
        size = min(max(2 * self.size, rows), max(self.capacity, rows))

        def grown(column: torch.Tensor) -> torch.Tensor:
            out = column.new_zeros((size, *column.shape[1:]))
            out[:column.shape[0]] = column
            return out

        self.columns = {name: grown(column) for name, column in self.columns.items()}
        self.host = {name: grown(column) for name, column in self.host.items()}
        self.classes = grown(self.classes)
        self.size = size

    def save(self, buffer: SampleBuffer) -> None:
        """Write the rows held back to ``buffer`` (on the CPU): its columns and classes become
        this reservoir's first :attr:`filled` rows."""
        if not (self.columns or self.host):  # nothing was ever offered to an empty buffer
            return
        buffer.columns = {**{name: column[:self.filled].cpu()
                             for name, column in self.columns.items()},
                          **{name: column[:self.filled].clone()
                             for name, column in self.host.items()}}
        buffer.classes = self.classes[:self.filled].cpu()
        buffer.check()


def reservoir_add(buffer: SampleBuffer, seen: int, capacity: int, generator: torch.Generator,
                  classes: torch.Tensor, **columns: torch.Tensor) -> int:
    """Offer a batch to ``buffer`` by reservoir sampling (:func:`reservoir_slots`): rows of
    ``classes`` ``[B]`` and of each column ``[B, ...]`` (the buffer's columns; the first batch
    names them). Returns the new count of examples offered, ``seen + B``. Nothing is added for
    ``capacity`` 0. One offer of :class:`TrainingReservoir` on the CPU."""
    reservoir = TrainingReservoir(buffer, capacity, "cpu")
    seen = reservoir.offer(seen, generator, classes, **columns)
    reservoir.save(buffer)
    return seen


def replay_draw(filled: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``min(size, filled)`` distinct rows of a buffer holding ``filled``, drawn uniformly
    (one permutation from ``generator``); empty for an empty buffer."""
    if filled <= 0 or size <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.randperm(filled, generator=generator)[:size]


def outputs_by_head(model: nn.Module, inputs: torch.Tensor, heads: torch.Tensor | None
                    ) -> torch.Tensor:
    """``model``'s logits for a batch whose rows may belong to different heads: ``heads``
    ``[N]`` (long; -1 or None for the single head) gives each row's head. Rows of one head go
    through one forward; the logits come back in row order, ``[N, K]`` (every head has K
    outputs). ``heads`` on the CPU (a :class:`TrainingReservoir`'s host copy) lets the host
    group the rows without waiting for the GPU."""
    if heads is None or bool((heads < 0).all()):
        return model(inputs, None)
    out: torch.Tensor | None = None
    for h in torch.unique(heads).tolist():
        rows = host_to_device((heads == h).nonzero(as_tuple=True)[0], inputs.device)
        logits = model(inputs[rows], None if h < 0 else int(h))
        if out is None:
            out = logits.new_zeros((inputs.shape[0], logits.shape[1]))
        out = out.index_put((rows,), logits)
    assert out is not None
    return out


# --------------------------------------------------------------------------------------------
# DER / DER++
# --------------------------------------------------------------------------------------------
def logit_matching(outputs: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """DER's dark-knowledge term: the mean over rows and logits of ``(outputs - stored)^2``
    (``F.mse_loss``, as mammoth's ``models/der.py``), ``[B, K]`` each; ``stored`` is treated
    as a constant. A scalar; 0 for ``B == 0``."""
    if outputs.shape[0] == 0:
        return outputs.sum() * 0.0
    return F.mse_loss(outputs, stored.detach().to(outputs.dtype))


def derpp_terms(outputs_logits: torch.Tensor, stored_logits: torch.Tensor,
                outputs_labels: torch.Tensor, stored_labels: torch.Tensor, alpha: float,
                beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DER++'s two replay terms (Buzzega et al. 2020, eq. 6): ``alpha`` times
    :func:`logit_matching` of the model's logits ``outputs_logits`` ``[B', K]`` on a buffer draw
    against their stored logits, and ``beta`` times the cross-entropy of the logits
    ``outputs_labels`` ``[B'', K]`` on a second, independent draw against their stored labels
    ``[B'']``. Either is 0 on an empty draw."""
    match = alpha * logit_matching(outputs_logits, stored_logits)
    if outputs_labels.shape[0] == 0:
        ce = outputs_labels.sum() * 0.0
    else:
        ce = F.cross_entropy(outputs_labels, stored_labels)
    return match, beta * ce


# --------------------------------------------------------------------------------------------
# TARGET
# --------------------------------------------------------------------------------------------
BATCH_NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and biased variance of a batch-norm layer's input ``x``
    ``[N, C, ...]`` (channels on dimension 1, every other dimension pooled), each ``[C]``: what
    the layer would normalise with in train mode."""
    if x.dim() < 2:
        raise ValueError(f"batch statistics of an input of shape {tuple(x.shape)}: need "
                         "[N, C, ...]")
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def bn_statistics_loss(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor,
                       momentum_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                       momentum: float = 0.9) -> torch.Tensor:
    """One batch-norm layer's term of TARGET's L_BN (DeepInversion's feature-statistics
    prior, as TARGET's ``DeepInversionHook``): ``||running_var - v||_2 + ||running_mean -
    m||_2``, plain L2 norms (not squared) over the ``[C]`` channels. ``(m, v)`` is the batch's
    ``(mean, var)``, or, given ``momentum_stats`` (the running blend of earlier synthesis
    calls' statistics), ``(1 - momentum) * batch + momentum * momentum_stats``. A scalar.

    By hand: running (0, 1), a batch of mean 1 and variance 1: ``|1 - 1| + |0 - 1| = 1``."""
    if momentum_stats is not None:
        mean = (1 - momentum) * mean + momentum * momentum_stats[0]
        var = (1 - momentum) * var + momentum * momentum_stats[1]
    return torch.linalg.vector_norm(running_var - var) + \
        torch.linalg.vector_norm(running_mean - mean)


class BNStatisticsHooks:
    """L_BN of a teacher: forward hooks on each of ``model``'s batch-norm layers with running
    statistics (``BatchNorm1d/2d/3d``) that record, on every forward, the layer's
    :func:`bn_statistics_loss` for the batch it sees. :meth:`loss` sums them over the layers
    (a model without batch norm, fedcl's MLP, has none: L_BN is 0 and the generator learns from
    its other terms); :meth:`update_momentum` folds the last forward's statistics into the
    running blend, once per synthesis call (TARGET's ``bn_mmt``: the first call compares the
    plain batch statistics, later ones the blend). :meth:`remove` takes the hooks off."""

    def __init__(self, model: nn.Module, momentum: float) -> None:
        self.momentum = momentum
        self.layers = [m for m in model.modules() if isinstance(m, BATCH_NORM_LAYERS)
                       and getattr(m, "running_mean", None) is not None]
        self.terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self.last: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.blend: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.handles = [layer.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(self.layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def _hook(self, i: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
                 ) -> None:
            mean, var = batch_statistics(inputs[0])
            self.terms[i] = bn_statistics_loss(mean, var, module.running_mean,  # type: ignore[arg-type]
                                               module.running_var,  # type: ignore[arg-type]
                                               self.blend[i], self.momentum)
            self.last[i] = (mean.detach(), var.detach())
        return hook

    def loss(self, like: torch.Tensor) -> torch.Tensor:
        """The sum of the layers' terms from the last forward (a scalar of ``like``'s dtype
        and device; 0 without batch-norm layers)."""
        total = like.new_zeros(())
        for term in self.terms:
            if term is not None:
                total = total + term
        return total

    def update_momentum(self) -> None:
        """``blend <- last`` at the first call, ``momentum * blend + (1 - momentum) * last``
        after (TARGET's ``update_mmt``)."""
        m = self.momentum
        for i, last in enumerate(self.last):
            if last is None:
                continue
            old = self.blend[i]
            self.blend[i] = last if old is None else (m * old[0] + (1 - m) * last[0],
                                                      m * old[1] + (1 - m) * last[1])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def class_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, columns: torch.Tensor
                        ) -> torch.Tensor:
    """Cross-entropy over the logit columns ``columns`` ``[K]`` (long) only, each label of
    ``labels`` ``[B]`` (a class, i.e. a column of ``logits`` ``[B, C]``) taken as its position
    among ``columns``: TARGET's ``CE(z[:, C_old:], y - C_old)`` when ``columns`` are
    ``C_old .. C_t - 1``. Raises ValueError for a label outside ``columns``. 0 for ``B == 0``."""
    if labels.shape[0] == 0:
        return logits.sum() * 0.0
    hit = labels.reshape(-1, 1) == columns.reshape(1, -1)
    if not bool(hit.any(dim=1).all()):
        missing = sorted(set(labels[~hit.any(dim=1)].tolist()))
        raise ValueError(f"labels {missing} are not among the columns {columns.tolist()}")
    return F.cross_entropy(logits[:, columns], hit.int().argmax(dim=1))


def adversarial_disagreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """TARGET's L_adv (from Fang et al.'s data-free adversarial distillation):
    ``-(1/B) sum_b KL(softmax(t_b) || softmax(s_b)) * 1[argmax s_b == argmax t_b]``, logits
    ``[B, C]`` each, temperature 1: minimising it drives the generator to inputs on which the
    student, where it still agrees with the teacher, is furthest from it. Gradients flow through
    both (TARGET does not detach the teacher's logits here). A scalar, <= 0."""
    agree = (student.argmax(dim=1) == teacher.argmax(dim=1)).to(student.dtype)
    kl = F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher, dim=1),
                  reduction="none").sum(dim=1)
    return -(kl * agree).mean()


def kl_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float
                    ) -> torch.Tensor:
    """``T^2 * (1/B) sum_b KL(softmax(t_b/T) || softmax(s_b/T))`` (TARGET's ``KLDiv``, which
    trains the server's student on the synthetic data; T = 20), logits ``[B, C]``; the
    teacher's are treated as constants. A scalar, 0 when they agree."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher.detach() / t, dim=1),
                    reduction="batchmean") * (t * t)


def target_client_loss(real_logits: torch.Tensor, labels: torch.Tensor,
                       new_columns: torch.Tensor, syn_logits: torch.Tensor | None,
                       teacher_logits: torch.Tensor | None, old_columns: torch.Tensor,
                       kd_weight: float, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A TARGET client's two terms for one step (METHODS.md 16.1 item 3): the cross-entropy of
    the real batch's logits ``real_logits`` ``[B, C]`` over the current task's columns
    ``new_columns`` alone (:func:`class_cross_entropy`), and ``kd_weight`` times LwF's
    distillation (:func:`distillation_loss`, temperature ``temperature``) of the synthetic
    batch's logits ``syn_logits`` ``[B', C]`` towards the frozen previous global model's
    ``teacher_logits`` ``[B', C]``, both over the old classes' columns ``old_columns`` alone.
    Returns (CE, weighted KD); the KD is 0 without a synthetic batch or old columns (the first
    task). E.g. 20 old classes and label 23 in a task of classes 20..29: the CE reads logits
    20.. with target 3, the KD logits 0..19 only."""
    ce = class_cross_entropy(real_logits, labels, new_columns)
    if syn_logits is None or teacher_logits is None or old_columns.numel() == 0:
        return ce, ce.new_zeros(())
    kd = distillation_loss(syn_logits[:, old_columns], teacher_logits[:, old_columns],
                           temperature)
    return ce, kd_weight * kd


class SynthesisGenerator(nn.Module):
    """TARGET's generator (its ``Generator``, after Fang et al.'s fast data-free synthesis),
    sized for the dataset: ``z`` ``[B, latent_dim]`` -> Linear to ``2w x h0 x w0`` (``h0, w0 =
    ceil(H/4), ceil(W/4)``: 8 x 8 for 32 x 32 images, 7 x 7 for MNIST's 28 x 28) -> BN ->
    upsample to ``2 h0 x 2 w0`` -> conv3x3(2w, 2w) -> BN -> LeakyReLU(0.2) -> upsample to
    ``H x W`` -> conv3x3(2w, w) -> BN -> LeakyReLU(0.2) -> conv3x3(w, C) -> sigmoid: images in
    [0, 1], ``[B, C, H, W]``, before the dataset's normalisation. ``w`` is ``width`` (TARGET:
    64); nearest-neighbour upsampling (×2 twice when H and W are multiples of 4)."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 256, width: int = 64
                 ) -> None:
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        self.input_shape = (c, h, w)
        self.latent_dim = latent_dim
        self.init_size = (-(-h // 4), -(-w // 4))
        h0, w0 = self.init_size
        self.l1 = nn.Sequential(nn.Linear(latent_dim, 2 * width * h0 * w0))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(size=(2 * h0, 2 * w0)),
            nn.Conv2d(2 * width, 2 * width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(size=(h, w)),
            nn.Conv2d(2 * width, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, c, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z)
        out = out.view(out.shape[0], -1, *self.init_size)
        return self.conv_blocks(out)


def accumulate_meta_gradients(base: nn.Module, fast: nn.Module) -> None:
    """Add each parameter's gradient in ``fast`` (the generator clone of one synthesis call)
    to the same parameter's gradient in ``base`` (zeros where it has none): TARGET's
    ``fomaml_grad``, the first-order MAML step whose sum over the call's inner steps the
    base generator's optimizer then takes. Parameters are matched by position."""
    for p, q in zip(base.parameters(), fast.parameters(), strict=True):
        if q.grad is None:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(q.grad)


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator
                     ) -> torch.Tensor:
    """TARGET's augmentation before the teacher (kornia's ``RandomCrop(padding=4)`` and
    ``RandomHorizontalFlip``), per image: ``x`` ``[B, C, H, W]`` zero-padded by ``pad`` on
    every side and cropped back to ``H x W`` at an offset drawn uniformly from
    ``{0..2 pad}^2``, then, if ``flip``, mirrored left-right with probability 1/2.
    Differentiable in ``x``. Draws ``2B`` offsets (then ``B`` uniforms if ``flip``) from
    ``generator`` (a CPU generator)."""
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        rows = oy[:, None] + torch.arange(h, device=x.device)[None, :]  # [B, H]
        cols = ox[:, None] + torch.arange(w, device=x.device)[None, :]  # [B, W]
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def quantise_images(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] ``[B, C, H, W]`` as the uint8 values TARGET's 8-bit PNGs hold:
    ``floor(255 * clamp(x, 0, 1))`` (its ``(x * 255).astype('uint8')``), on the CPU."""
    return (x.detach().clamp(0, 1) * 255).to(torch.uint8).cpu()


def frozen_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``state`` (a ``state_dict``), in eval mode, no parameter
    requiring a gradient: the frozen teacher that FedLwF, TARGET and GLFC distill from."""
    teacher = copy.deepcopy(model)
    teacher.load_state_dict(state)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
