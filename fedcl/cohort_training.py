"""Cohort training, the client side: several simulated clients trained in one ClientApp call
as one batched computation (``cohort_size`` > 1).

On a small model a GPU spends a client's round launching kernels, not doing arithmetic, and a
simulation pays one Flower message and one Ray task per client. A cohort trains K sampled
clients together: their parameters are stacked along a new leading dimension, and one step of
all K is one forward and backward pass of the members' summed losses through
:func:`stacked_forward` (every convolution one grouped convolution, every ``Linear`` one
batched matmul), followed by one batched optimizer update. A model whose layers
:func:`stacked_forward` does not know takes :func:`torch.func.vmap` of
:func:`torch.func.grad_and_value` over :func:`torch.func.functional_call` instead.

Each member trains exactly as :meth:`fedcl.training.LocalTrainer.train` would train it alone:
its own data, its batches drawn from the same seeded generator (:func:`member_batches`), the
mean cross-entropy over its batch (a ragged last batch is masked, not padded into the mean),
the same regularizer with its own round context (:func:`trainer_regularizers`), and SGD or Adam
with PyTorch's update rules (:func:`sgd_step`, :func:`adam_step`). A member whose epoch has run
out of batches while others go on is frozen (its weights and optimizer state are left as they
are); parameters the loss does not reach (other tasks' heads) are not updated, as PyTorch's
optimizers skip them. The results agree with per-client training to float rounding
(``tests/test_cohort.py`` compares them). Batched kernels round differently, and local SGD
amplifies rounding: a ReLU or max-pool whose inputs nearly tie sends a gradient another way. On
Split-MNIST with the CNN, members agree with per-client training to ~1e-7 of the update over
tens of steps, but over 50 steps of FedProx with momentum a perturbation of 1e-7 in the
starting weights alone moves per-client training's own result by up to 5% of the update; cohort
training lands within that spread.

Deviations, by design:

* dropout masks are drawn for all members at once from one generator, so a model with
  dropout (the MLP) trains with different masks than it would alone (from the same
  distribution); models without dropout (the CNN) agree to rounding;
* batch norm is refused: its running statistics are module state that vmap cannot batch;
* fault injection (``client_fault_rate``) draws once per cohort, for its leader: a faulty
  cohort fails all its members;
* a cohort is a simulation device. The leader (the first member's node) loads every member's
  partition from its own data dir, so on a real federation each node must be a cohort of one.

Where the round's aggregate allows it (:mod:`fedcl.cohort_wire`), the leader screens each member
by the server's own rules (:func:`fedcl.validation.stacked_problems`) and takes the weighted mean
of those that pass on the device (:func:`stacked_weighted_mean`) to reply once for them
(:func:`fedcl.client_app.reduced_reply`). The server side of cohorts, forming them and
splitting their replies, is :mod:`fedcl.cohort_wire`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from fedcl.config import Config
from fedcl.data.datasets import to_float
from fedcl.models import MLP, ContinualModel, SmallCNN
from fedcl.training import LocalTrainer, RoundContext, round_seed

Regularizer = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor | None]
"""A member's regularizer: its trained parameters and their values at the round's start (in
``named_parameters`` order, only those its loss reaches) to a scalar term added to its loss,
or None (:meth:`fedcl.training.LocalTrainer.regularizer` bound to the member's context)."""


@dataclass
class MemberResult:
    """One member's locally trained weights (on the CPU) and its training figures."""

    partition_id: int
    state: dict[str, torch.Tensor]
    num_examples: int
    loss: float
    steps: int


@dataclass
class TrainedCohort:
    """A cohort's trained weights, still stacked on the training device, and its figures."""

    partition_ids: list[int]
    stacked: dict[str, torch.Tensor]  # trained parameters, [K, ...] (member i in row i)
    fixed: dict[str, torch.Tensor]  # what training leaves alone (buffers, other heads)
    keys: list[str]  # the model's state_dict order
    num_examples: list[int]
    losses: list[float]  # each member's mean loss over its steps
    steps: list[int]

    def members(self) -> list[MemberResult]:
        """Each member's weights copied to the CPU (one wait for all of them)."""
        host = to_host(self.stacked)
        fixed = to_host(self.fixed)
        return [MemberResult(pid, {key: host[key][i] if key in host else fixed[key]
                                   for key in self.keys},
                             self.num_examples[i], self.losses[i], self.steps[i])
                for i, pid in enumerate(self.partition_ids)]

    def mean_state(self, weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """The members' weighted mean weights (:func:`stacked_weighted_mean`), on the CPU."""
        first = next(iter(self.stacked.values()))
        w = torch.tensor(list(weights), dtype=torch.float64)
        mean = stacked_weighted_mean(self.stacked, w.to(first.device))
        host = to_host({**mean, **self.fixed})
        return {key: host[key] for key in self.keys}


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------
def member_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator
                   ) -> list[list[torch.Tensor]]:
    """The index batches a client trains on, epoch by epoch: a fresh permutation of ``range(n)``
    from ``generator`` each epoch, cut into batches (the last may be short). The same draws as
    :meth:`fedcl.training.LocalTrainer.train`."""
    epochs_out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        epochs_out.append([order[s:s + batch_size] for s in range(0, n, batch_size)])
    return epochs_out


def stack_step(batches: Sequence[Sequence[torch.Tensor]], step: int, batch_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' index batches for one step as a ``[K, batch_size]`` index tensor and a mask
    (False where a member's batch is short or its epoch is over)."""
    k = len(batches)
    index = torch.zeros((k, batch_size), dtype=torch.long)
    mask = torch.zeros((k, batch_size), dtype=torch.bool)
    for i, member in enumerate(batches):
        if step < len(member):
            b = member[step]
            index[i, :len(b)] = b
            mask[i, :len(b)] = True
    return index, mask


def stacked_weighted_mean(stacked: dict[str, torch.Tensor], weights: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """``sum_i w_i x_i / sum_i w_i`` of every stacked floating-point array (member i in row i),
    one matrix-vector product per array: the average FedAvg takes of the members' replies
    (:func:`fedcl.aggregation.weighted_average`, also in the arrays' precision), taken before
    they leave the cohort."""
    share = weights.to(torch.float64) / weights.to(torch.float64).sum()
    return {name: torch.tensordot(share.to(x.dtype), x, dims=1) for name, x in stacked.items()}


def _per_member(flag: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flag.view(-1, *([1] * (like.dim() - 1)))


def sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             momentum_buffers: dict[str, torch.Tensor | None], active: torch.Tensor, *,
             lr: float, momentum: float, weight_decay: float, all_active: bool = False) -> None:
    """``torch.optim.SGD`` (no dampening, no Nesterov) on stacked parameters, in place; a
    member with ``active`` False keeps its weights and momentum. After the first step every
    tensor is updated in place, so a CUDA graph of a step can be replayed. ``all_active``
    (every ``active`` True, known to the caller) updates without selecting: the same
    arithmetic (bit for bit on a CPU) with two fewer passes over the weights."""
    for name, p in params.items():
        d = grads[name]
        if weight_decay:
            d = d + weight_decay * p
        if momentum:
            buf = momentum_buffers.get(name)
            if buf is None:  # PyTorch starts the buffer at the first gradient
                buf = momentum_buffers[name] = d.clone()
            elif all_active:
                buf.mul_(momentum).add_(d)
            else:
                buf.copy_(torch.where(_per_member(active, p), momentum * buf + d, buf))
            d = buf
        if all_active:
            p.sub_(lr * d)
        else:
            p.copy_(torch.where(_per_member(active, p), p - lr * d, p))


def adam_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
              moments: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: torch.Tensor,
              active: torch.Tensor, *, lr: float, weight_decay: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              all_active: bool = False) -> None:
    """``torch.optim.Adam`` (L2 weight decay, no AMSGrad) on stacked parameters, in place.
    ``steps`` counts each member's own updates (already including this one). ``all_active``:
    as for :func:`sgd_step`."""
    b1, b2 = betas
    for name, p in params.items():
        on = _per_member(active, p)
        d = grads[name]
        if weight_decay:
            d = d + weight_decay * p
        if name not in moments:
            moments[name] = (torch.zeros_like(p), torch.zeros_like(p))
        m, v = moments[name]
        if all_active:
            m.lerp_(d, 1 - b1)
            v.mul_(b2).add_((1 - b2) * d * d)
        else:
            m.copy_(torch.where(on, m.lerp(d, 1 - b1), m))
            v.copy_(torch.where(on, v * b2 + (1 - b2) * d * d, v))
        # bias corrections in double precision, as PyTorch computes them (Python floats)
        t = steps.clamp(min=1).to(torch.float64)
        step_size = _per_member((lr / (1 - b1 ** t)).to(p.dtype), p)
        bc2_sqrt = _per_member(((1 - b2 ** t) ** 0.5).to(p.dtype), p)
        denom = v.sqrt() / bc2_sqrt + eps
        if all_active:
            p.sub_(step_size * m / denom)
        else:
            p.copy_(torch.where(on, p - step_size * m / denom, p))


def trained_parameters(model: nn.Module, x: torch.Tensor, head: int | None,
                       mean: tuple[float, ...], std: tuple[float, ...],
                       regularizers: Sequence[Regularizer] = ()) -> set[str]:
    """The names of the parameters the loss (with the members' regularizers) reaches with this
    ``head``, from one sample's forward: what per-client training's optimizer would update."""
    named = list(model.named_parameters())
    loss = model(to_float(x, mean, std), head).sum()
    params = [p for _, p in named]
    for regularizer in regularizers:
        extra = regularizer(params, [p.detach() for p in params])
        if extra is not None:
            loss = loss + extra
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {name for (name, _), g in zip(named, grads, strict=True) if g is not None}


def trainer_regularizers(trainer: LocalTrainer, contexts: Sequence[RoundContext]
                         ) -> Regularizer | list[Regularizer]:
    """``trainer``'s :meth:`~fedcl.training.LocalTrainer.regularizer` for a cohort whose
    members' round contexts are ``contexts``: each member's bound to its own context, or, when
    the trainer declares that its regularizer does not read the context
    (``regularizer_reads_context`` False), one for all members. ``reference`` reaches it only
    where the trainer declares ``uses_round_start_weights``, as in per-client training."""

    def bound(ctx: RoundContext) -> Regularizer:
        def regularizer(params: list[torch.Tensor], reference: list[torch.Tensor]
                        ) -> torch.Tensor | None:
            return trainer.regularizer(ctx, params,
                                       reference if trainer.uses_round_start_weights else [])

        return regularizer

    if not trainer.regularizer_reads_context:
        return bound(contexts[0])
    return [bound(ctx) for ctx in contexts]


def member_terms(regularizers: Sequence[Regularizer | None], params: list[torch.Tensor],
                 reference: list[torch.Tensor]) -> torch.Tensor:
    """Every member's regularizer term, ``[K]``: member i's regularizer called on row i of
    every stacked parameter ``[K, ...]`` and of its reference, 0 for a member without one.
    ``unbind`` gives the rows, so the backward pass puts each parameter's K gradients together
    in one stack."""
    rows = [p.unbind(0) for p in params]
    ref_rows = [r.unbind(0) for r in reference]
    terms = []
    for i, regularizer in enumerate(regularizers):
        term = None if regularizer is None else regularizer([r[i] for r in rows],
                                                            [r[i] for r in ref_rows])
        terms.append(params[0].new_zeros(()) if term is None else term)
    return torch.stack(terms)


def check_batchable(model: nn.Module) -> None:
    """Refuse a model whose training mutates module state (batch norm's running statistics)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.training \
                and module.track_running_stats:
            raise ValueError(f"cohort training cannot batch {type(module).__name__} "
                             f"({name or 'model'}): its running statistics are module state; "
                             "use cohort_size = 1 with this model")


# --------------------------------------------------------------------------------------------
# Stacked layers: the members' forward as grouped convolutions and batched matmuls
# --------------------------------------------------------------------------------------------
STACKED_LAYERS = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Dropout)
_BODY_ONLY_FEATURES = (MLP.features, SmallCNN.features)  # features(x) is self.body(x)


def stacked_body(model: nn.Module) -> nn.Sequential | None:
    """The model's ``body`` when :func:`stacked_forward` can run all members through it: a
    :class:`ContinualModel` whose features are exactly its Sequential ``body`` (the MLP, the
    CNN) built only of :data:`STACKED_LAYERS` (zero-padded convolutions, whole-sample
    flattening); else None, and the cohort falls back to ``vmap`` of ``functional_call``."""
    body = getattr(model, "body", None)
    if not isinstance(model, ContinualModel) or not isinstance(body, nn.Sequential) \
            or type(model).features not in _BODY_ONLY_FEATURES:
        return None
    for layer in body:
        if type(layer) not in STACKED_LAYERS \
                or (isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros") \
                or (isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1)):
            return None
    return body


def _ungroup(h: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, K*C, H, W]`` (members side by side in the channels) to ``[K, B, C, H, W]``."""
    return h.view(h.shape[0], k, -1, *h.shape[2:]).transpose(0, 1)


def _stacked_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    """Member i's ``Linear`` on ``h[i]``: ``h`` ``[K, ..., in]``, ``weight`` ``[K, out, in]``."""
    flat = h.reshape(h.shape[0], -1, h.shape[-1])
    out = torch.bmm(flat, weight.transpose(1, 2)) if bias is None \
        else torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.view(*h.shape[:-1], weight.shape[1])


def stacked_forward(body: nn.Sequential, head_prefix: str, weights: dict[str, torch.Tensor],
                    x: torch.Tensor) -> torch.Tensor:
    """Every member's logits, ``[K, B, classes]``, for inputs ``x`` ``[K, B, ...]`` (member i's
    batch in row i), with member i's weights in row i of ``weights`` (the body's and the head's
    parameters by state_dict name; ``head_prefix`` is the head's, ``"heads.1."``). The same
    arithmetic as ``head(body(x[i]))`` member by member, as few kernels: image activations
    are kept as ``[B, K*C, H, W]``, members side by side in the channels, so a convolution of
    all members is one convolution with ``K`` times the groups (what ``vmap`` makes of it,
    without moving the activations back and forth), pooling is per channel anyway, and a
    ``Linear`` of all members is one batched matmul. ReLU and dropout are element-wise
    (dropout draws every member's mask from the one generator)."""
    k, batch = int(x.shape[0]), int(x.shape[1])
    h, grouped = x, False
    for i, layer in enumerate(body):
        w = weights.get(f"body.{i}.weight")
        b = weights.get(f"body.{i}.bias")
        if isinstance(layer, nn.Conv2d):
            if not grouped:
                h, grouped = h.transpose(0, 1).reshape(batch, -1, *h.shape[3:]), True
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                         layer.stride, layer.padding, layer.dilation, layer.groups * k)
        elif isinstance(layer, nn.MaxPool2d):
            h = layer(h) if grouped else layer(h.flatten(0, 1)).unflatten(0, (k, batch))
        elif isinstance(layer, nn.Flatten):
            h = h.reshape(batch, k, -1).transpose(0, 1) if grouped else h.flatten(2)
            grouped = False
        elif isinstance(layer, nn.Linear):
            h = _stacked_linear(_ungroup(h, k) if grouped else h, w, b)
            grouped = False
        else:  # ReLU, Dropout
            h = layer(h)
    if grouped:
        h = _ungroup(h, k)
    return _stacked_linear(h, weights[head_prefix + "weight"], weights.get(head_prefix + "bias"))


# --------------------------------------------------------------------------------------------
# Training a cohort
# --------------------------------------------------------------------------------------------
GRAPH_WARMUP_STEPS = 3  # eager steps before capture (cuDNN/cuBLAS set-up, optimizer state)
# Cohorts up to this size replay a CUDA graph by default. Measured on an H200 (small CNN,
# 500 samples per member, batch 32, `benchmarks/cohort_profile.py`, stacked layers): a graph
# trains 1 member in 0.025 s against 0.041 s eager, but 5 in 0.066 against 0.050 and 50 in
# 0.315 against 0.127: past a member or two the step is GPU-bound, dispatch hides behind it,
# and capturing costs more than it saves.
GRAPH_MAX_MEMBERS = 1


_GRAPH_RESOURCES: dict[torch.device, tuple[torch.cuda.Stream, object]] = {}


def _graph_resources(device: torch.device) -> tuple[torch.cuda.Stream, object]:
    """One side stream and one graph memory pool per device for the whole process: a new
    stream per call would give cuBLAS a new workspace each time (32 MiB per stream, never
    freed), and a new pool per graph leaves the old graph's blocks reserved."""
    if device not in _GRAPH_RESOURCES:
        _GRAPH_RESOURCES[device] = (torch.cuda.Stream(device=device),
                                    torch.cuda.graph_pool_handle())
    return _GRAPH_RESOURCES[device]


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors to the CPU; from a GPU into page-locked memory, one wait for all of them
    (a copy into pageable memory runs at a fraction of the bus's speed: 0.15 s for a cohort of
    50 small CNNs)."""
    first = next(iter(tensors.values()), None)
    if first is None or first.device.type != "cuda":
        return {name: t.detach().cpu() for name, t in tensors.items()}
    out = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
           for name, t in tensors.items()}
    for name, t in tensors.items():
        out[name].copy_(t.detach(), non_blocking=True)
    torch.cuda.current_stream(first.device).synchronize()
    return out


def run_steps(step: Callable[[torch.Tensor, torch.Tensor, bool], None], indices: torch.Tensor,
              masks: torch.Tensor, *, cuda_graph: bool, full: Sequence[bool] | None = None
              ) -> None:
    """Run ``step(indices[t], masks[t], full[t])`` for every ``t``, in order (``full[t]``: every
    member takes step ``t``, so the step may skip selecting; False by default, and always
    in a graph, which must fit every step). With ``cuda_graph`` the
    first :data:`GRAPH_WARMUP_STEPS` run eagerly (on a side stream, as capture requires), one
    step is captured in a CUDA graph, and the graph is replayed for every remaining step with
    that step's indices and mask copied into the captured inputs: one launch per step instead of
    a few hundred kernels dispatched through Python and vmap. The kernels are the same, so
    results are the eager ones. ``step`` must update its state in place and never wait for the
    GPU."""
    n = int(indices.shape[0])
    full = list(full) if full is not None else [False] * n
    if not cuda_graph or n <= GRAPH_WARMUP_STEPS:
        for t in range(n):
            step(indices[t], masks[t], full[t])
        return
    side, pool = _graph_resources(indices.device)
    side.wait_stream(torch.cuda.current_stream(indices.device))
    with torch.cuda.stream(side):
        for t in range(GRAPH_WARMUP_STEPS):
            step(indices[t], masks[t], False)
    torch.cuda.current_stream(indices.device).wait_stream(side)
    index, mask = indices[0].clone(), masks[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        step(index, mask, False)  # recorded, not run
    for t in range(GRAPH_WARMUP_STEPS, n):
        index.copy_(indices[t])
        mask.copy_(masks[t])
        graph.replay()


def train_cohort(model: nn.Module, members: Sequence[tuple[int, torch.Tensor, torch.Tensor]], *,
                 config: Config, task: int, round_: int, head: int | None,
                 device: torch.device, mean: tuple[float, ...], std: tuple[float, ...],
                 regularizer: Regularizer | Sequence[Regularizer] | None = None,
                 cuda_graph: bool | None = None, generic: bool = False) -> list[MemberResult]:
    """Train every ``(partition_id, x, y)`` member from ``model``'s weights, as one batched
    computation (:func:`train_stacked`); each member's result on the CPU."""
    return train_stacked(model, members, config=config, task=task, round_=round_, head=head,
                         device=device, mean=mean, std=std, regularizer=regularizer,
                         cuda_graph=cuda_graph, generic=generic).members()


def train_stacked(model: nn.Module, members: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
                  *, config: Config, task: int, round_: int, head: int | None,
                  device: torch.device, mean: tuple[float, ...], std: tuple[float, ...],
                  regularizer: Regularizer | Sequence[Regularizer] | None = None,
                  cuda_graph: bool | None = None, generic: bool = False) -> TrainedCohort:
    """Train every ``(partition_id, x, y)`` member from ``model``'s weights, as one batched
    computation; ``x`` are uint8 images and ``y`` head targets, as for one client (on
    ``device`` already, or copied there). With ``cuda_graph`` (by default: on CUDA, for up to
    :data:`GRAPH_MAX_MEMBERS` members) the step is captured once in a CUDA graph and replayed
    (:func:`run_steps`). The trained weights stay stacked on ``device``.

    ``regularizer`` adds a term to each member's loss: a sequence holds each member's own (in
    member order), called for every member every step (:func:`member_terms`); one callable
    serves every member, called once a step under ``vmap``, and so must not depend on which
    member it serves. A member's regularizer that gives None at the round's start gives no
    term all round.

    A model :func:`stacked_body` accepts runs through :func:`stacked_forward`, and one backward
    pass of the members' summed losses gives every member its own gradient (members share no
    weights); any other model, or ``generic``, takes ``vmap`` of ``grad_and_value`` over
    ``functional_call``. The two agree to float rounding; the first is faster (H200, 50 CNN
    members: 92 against 105 ms an epoch; 10 members: 42 against 76 ms)."""
    model = model.to(device).train()
    check_batchable(model)
    k = len(members)
    shared = regularizer if callable(regularizer) else None
    own = None if regularizer is None or shared is not None else list(regularizer)
    if own is not None and len(own) != k:
        raise ValueError(f"{len(own)} regularizers for a cohort of {k} members")
    used = trained_parameters(model, members[0][1][:1].to(device), head, mean, std,
                              [shared] if shared is not None else own or [])
    start = {name: p.detach() for name, p in model.named_parameters() if name in used}
    params = {name: p.unsqueeze(0).repeat(k, *([1] * p.dim())).clone()
              for name, p in start.items()}
    # what the loss does not reach (other tasks' heads) has no gradient: PyTorch's optimizers
    # skip it (no weight decay either), and so does the cohort
    buffers = {name: b for name, b in model.named_buffers()}
    buffers.update({name: p.detach() for name, p in model.named_parameters() if name not in used})
    names = list(params)
    start_list = [start[n] for n in names]
    member_regularizers = None if own is None else [
        r if r(start_list, start_list) is not None else None for r in own]
    if member_regularizers is not None and all(r is None for r in member_regularizers):
        member_regularizers = None
    sizes = [int(y.shape[0]) for _, _, y in members]
    x_all = torch.zeros((k, max(sizes), *members[0][1].shape[1:]), dtype=members[0][1].dtype,
                        device=device)
    y_all = torch.zeros((k, max(sizes)), dtype=members[0][2].dtype, device=device)
    generators = []
    for i, (pid, x, y) in enumerate(members):
        x_all[i, :sizes[i]] = x.to(device)
        y_all[i, :sizes[i]] = y.to(device)
        gen = torch.Generator().manual_seed(round_seed(config.seed, task, round_, pid))
        dropout_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        if i == 0:
            torch.manual_seed(dropout_seed)  # one generator draws every member's dropout masks
        generators.append(gen)
    batches = [member_batches(n, config.batch_size, config.local_epochs, g)
               for n, g in zip(sizes, generators, strict=True)]
    reference = {name: p.unsqueeze(0).expand(k, *p.shape) for name, p in start.items()}

    def member_loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                    mb: torch.Tensor, ref: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(model, {**p, **buffers}, (xb,), {"task": head})
        ce = nn.functional.cross_entropy(out, yb, reduction="none")
        loss = (ce * mb).sum() / mb.sum().clamp(min=1.0)
        if shared is not None:
            extra = shared([p[n] for n in names], [ref[n] for n in names])
            if extra is not None:
                loss = loss + extra
        return loss

    body = None if generic else stacked_body(model)
    if body is None:
        step_fn = vmap(grad_and_value(member_loss), randomness="different")
        if member_regularizers is not None:
            step_fn = _with_member_terms(step_fn, names, member_regularizers)
    else:
        step_fn = _stacked_step(model, body, head, k, names, buffers, shared,
                                member_regularizers)
    rows = torch.arange(k, device=device).unsqueeze(1)
    total = torch.zeros(k, device=device)
    steps = torch.zeros(k, dtype=torch.long, device=device)
    momentum: dict[str, torch.Tensor | None] = {}
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    bs = config.batch_size

    def step(index: torch.Tensor, mask: torch.Tensor, full: bool) -> None:
        """One step of every member; all state is updated in place (a CUDA graph replays it)."""
        xb = to_float(x_all[rows, index].flatten(0, 1), mean, std).view(k, bs, *x_all.shape[2:])
        yb = y_all[rows, index]
        grads, losses = step_fn(params, xb, yb, mask.to(torch.float32), reference)
        active = mask.any(dim=1)
        steps.add_(active)
        total.add_(torch.where(active, losses.detach(), torch.zeros_like(losses)))
        with torch.no_grad():
            if config.optimizer == "adam":
                adam_step(params, grads, moments, steps, active, lr=config.lr,
                          weight_decay=config.weight_decay, all_active=full)
            else:
                sgd_step(params, grads, momentum, active, lr=config.lr,
                         momentum=config.momentum, weight_decay=config.weight_decay,
                         all_active=full)

    # every step's indices and masks go to the device at once: a small copy per step would
    # make the host wait for the GPU every step
    stacked = []
    for epoch in range(config.local_epochs):
        epoch_batches = [b[epoch] for b in batches]
        stacked += [stack_step(epoch_batches, s, bs)
                    for s in range(max(len(b) for b in epoch_batches))]
    indices = torch.stack([i for i, _ in stacked]).to(device)
    masks_host = torch.stack([m for _, m in stacked])
    full = masks_host.any(dim=2).all(dim=1).tolist()  # steps every member takes
    masks = masks_host.to(device)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and k <= GRAPH_MAX_MEMBERS
    run_steps(step, indices, masks, cuda_graph=cuda_graph, full=full)
    state = model.state_dict()
    fixed = {name: b.detach() for name, b in state.items() if name not in params}
    losses_host, steps_host = total.cpu().tolist(), steps.cpu().tolist()
    return TrainedCohort(
        partition_ids=[pid for pid, _, _ in members], stacked=params, fixed=fixed,
        keys=list(state), num_examples=sizes,
        losses=[loss / max(n, 1) for loss, n in zip(losses_host, steps_host, strict=True)],
        steps=[int(n) for n in steps_host])


StepFn = Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]


def _with_member_terms(step_fn: StepFn, names: list[str],
                       regularizers: Sequence[Regularizer | None]) -> StepFn:
    """``step_fn`` (``vmap`` of ``grad_and_value`` of the members' losses) with each member's
    own regularizer term (:func:`member_terms`) added to its loss and its gradient added to
    the loss's: the two gradients per-client training's backward pass sums."""

    def step(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
             mb: torch.Tensor, ref: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        grads, losses = step_fn(params, xb, yb, mb, ref)
        leaves = [params[n].detach().requires_grad_(True) for n in names]
        terms = member_terms(regularizers, leaves, [ref[n] for n in names])
        extra = torch.autograd.grad(terms.sum(), leaves, allow_unused=True)
        return ({n: grads[n] if g is None else grads[n] + g
                 for n, g in zip(names, extra, strict=True)}, losses + terms.detach())

    return step


def _stacked_step(model: nn.Module, body: nn.Sequential, head: int | None, k: int,
                  names: list[str], fixed: dict[str, torch.Tensor],
                  regularizer: Regularizer | None,
                  member_regularizers: Sequence[Regularizer | None] | None) -> StepFn:
    """A step function with ``vmap(grad_and_value(member_loss))``'s signature and results
    (each member's gradients and loss) that runs the members through :func:`stacked_forward`
    and takes one backward pass of their summed losses (with ``regularizer``, one for all
    members, vmapped, or each member's own of ``member_regularizers``)."""
    head_module = model.head_for(head)  # type: ignore[operator]
    index = next(i for i, h in enumerate(model.heads) if h is head_module)  # type: ignore[arg-type]
    prefix = f"heads.{index}."
    # what training leaves alone but the forward reads (a frozen layer): the same for everyone
    frozen = {name: t.unsqueeze(0).expand(k, *t.shape) for name, t in fixed.items()
              if name.startswith(("body.", prefix))}
    start = [model.get_parameter(n).detach() for n in names]
    batched_regularizer = None
    if regularizer is not None and regularizer(start, start) is not None:
        batched_regularizer = vmap(regularizer, randomness="different")

    def step_fn(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                mb: torch.Tensor, ref: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        leaves = {name: params[name].detach().requires_grad_(True) for name in names}
        out = stacked_forward(body, prefix, {**frozen, **leaves}, xb)
        ce = F.cross_entropy(out.flatten(0, 1), yb.flatten(), reduction="none").view_as(mb)
        losses = (ce * mb).sum(dim=1) / mb.sum(dim=1).clamp(min=1.0)
        if batched_regularizer is not None:
            losses = losses + batched_regularizer([leaves[n] for n in names],
                                                  [ref[n] for n in names])
        elif member_regularizers is not None:
            losses = losses + member_terms(member_regularizers, [leaves[n] for n in names],
                                           [ref[n] for n in names])
        grads = torch.autograd.grad(losses.sum(), [leaves[n] for n in names],
                                    allow_unused=True)
        return ({name: torch.zeros_like(leaves[name]) if g is None else g
                 for name, g in zip(names, grads, strict=True)}, losses.detach())

    return step_fn
