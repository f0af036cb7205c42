"""Local training and evaluation loops, shared by clients and the server.

:class:`LocalTrainer` is the client half of a strategy: cross-entropy SGD on the current task's
data, one training loop with hooks that a method overrides to change only its part (the batch's
inputs, its loss, an extra term, a regularizer, the optimizers, work before and after), as
Avalanche's plugins hook its loop (``before_backward``, ``after_training_exp``). The server half
lives in ``strategies/``; both are registered together by name.

What a trainer keeps on its client from round to round and task to task (an old model, a
statistic, a replay memory of raw samples) is a :class:`ClientStore`, ``ctx.store``: the client
app loads it before the round and saves it after, for a trainer that declares
:attr:`LocalTrainer.keeps_client_store`. Raw samples go only into its :class:`SampleBuffer` objects,
whose rows carry their dataset class: fedcl removes the erased ones before the next round and
reports what every client holds (summary.json ``client_state``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedcl.config import Config
from fedcl.data.datasets import to_float
from fedcl.data.scenarios import Scenario
from fedcl.errors import ConfigError
from fedcl.unlearning_math import gradient_restriction_term


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU; ``cuda`` without one is a
    :class:`~fedcl.errors.ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but no CUDA GPU is visible")
    return torch.device(name)


def make_optimizer(params: Any, config: Config) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def round_seed(seed: int, task: int, round_: int, partition_id: int) -> int:
    """One seed per (run seed, task, round, client): local shuffling and dropout are
    reproducible wherever the client runs."""
    return (((seed * 1_000_003 + task) * 1_000_003 + round_) * 1_000_003 + partition_id) % 2**63


CLASSES = "classes"
"""The column of a :class:`SampleBuffer` that holds each row's dataset class."""


@dataclass
class SampleBuffer:
    """Raw samples a trainer keeps on its client between rounds (a replay memory): rows of
    named columns of equal length, each a tensor ``[M, ...]`` on the CPU (images as uint8
    ``[M, C, H, W]``, head targets ``[M]``, logits ``[M, K]``, ...), and the dataset class of
    every row in :attr:`classes` (``[M]``, int64), by which fedcl removes erased samples
    (:meth:`purge`). A trainer edits :attr:`columns` and :attr:`classes` freely (append with
    :meth:`append`, overwrite rows in place) as long as every column keeps one row per
    sample."""

    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    classes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    @property
    def nbytes(self) -> int:
        """The bytes the buffer's tensors hold (its classes column included)."""
        return sum(t.numel() * t.element_size() for t in (*self.columns.values(), self.classes))

    def check(self) -> None:
        """Raise ValueError unless every column has one row per sample."""
        for name, column in self.columns.items():
            if name == CLASSES:
                raise ValueError(f"a SampleBuffer column cannot be named '{CLASSES}' (the "
                                 "dataset classes are its classes attribute)")
            if column.shape[:1] != self.classes.shape[:1]:
                raise ValueError(f"SampleBuffer column '{name}' has {column.shape[0]} rows, "
                                 f"classes has {len(self)}")

    def append(self, classes: torch.Tensor, **columns: torch.Tensor) -> None:
        """Add rows: ``classes`` ``[n]`` and one ``[n, ...]`` tensor per column (every column
        of the buffer, none else; the first append names them). Tensors are copied to the
        CPU."""
        if self.columns and set(columns) != set(self.columns):
            raise ValueError(f"SampleBuffer.append needs columns {sorted(self.columns)}, got "
                             f"{sorted(columns)}")
        for name, value in columns.items():
            value = value.detach().cpu()
            old = self.columns.get(name)
            self.columns[name] = value.clone() if old is None else torch.cat([old, value])
        self.classes = torch.cat([self.classes, classes.detach().cpu().to(torch.int64)])
        self.check()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (a boolean mask ``[M]`` or indices), in their order."""
        self.columns = {name: column[rows] for name, column in self.columns.items()}
        self.classes = self.classes[rows]

    def purge(self, classes: Iterable[int]) -> int:
        """Remove every row of a dataset class in ``classes``; returns how many were
        removed. The rows left keep their order."""
        erased = torch.tensor(sorted({int(k) for k in classes}), dtype=torch.int64)
        if len(self) == 0 or erased.numel() == 0:
            return 0
        hit = torch.isin(self.classes, erased)
        removed = int(hit.sum())
        if removed:
            self.keep(~hit)
        return removed


@dataclass
class ClientStore:
    """What a trainer keeps on its client between rounds and tasks (``ctx.store``), for a
    trainer that declares :attr:`LocalTrainer.keeps_client_store`: the client app loads it
    from Flower's ``Context.state`` before :meth:`LocalTrainer.begin_task` and saves it after
    :meth:`LocalTrainer.after_training`.

    ``arrays``: tensors by name (an old model, a Fisher diagonal, counters): never samples.
    ``buffers``: raw samples by name (:class:`SampleBuffer`), the only place a trainer may keep
    data: fedcl removes the samples of erased classes from every buffer before the next round
    (and empties an erased client's), and summary.json's ``client_state`` reports each
    client's buffered samples, bytes and classes.

    In the rounds an erasure replays (the retrain oracle, FedEraser's calibration) a trainer
    sees a store of that walk's own, empty when the walk begins: the replay never reads what
    the live run kept, and leaves it as it was."""

    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, SampleBuffer] = field(default_factory=dict)

    def buffer(self, name: str) -> SampleBuffer:
        """The buffer ``name``, made empty the first time it is asked for."""
        if name not in self.buffers:
            self.buffers[name] = SampleBuffer()
        return self.buffers[name]

    @property
    def buffered_samples(self) -> int:
        return sum(len(b) for b in self.buffers.values())

    @property
    def buffered_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def buffered_classes(self) -> list[int]:
        """The dataset classes of every buffered sample, sorted, each once."""
        held: set[int] = set()
        for b in self.buffers.values():
            held.update(int(k) for k in torch.unique(b.classes).tolist())
        return sorted(held)

    def purge(self, classes: Iterable[int]) -> int:
        """Remove the samples of ``classes`` from every buffer; returns how many."""
        classes = list(classes)
        return sum(b.purge(classes) for b in self.buffers.values())

    def clear(self) -> int:
        """Forget everything (an erased client's store); returns the samples removed."""
        removed = self.buffered_samples
        self.arrays.clear()
        self.buffers.clear()
        return removed


@dataclass
class RoundContext:
    """Everything a client's local training step needs for one round."""

    config: Config
    model: nn.Module
    x: torch.Tensor  # uint8 images of the current task, already shifted, [N, C, H, W]
    y: torch.Tensor  # head targets, [N]
    head: int | None
    task: int
    round: int
    partition_id: int
    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    last_of_task: bool = False  # the task's last round (task-end work such as FOT's sketches)
    message: Any = None  # the incoming RecordDict, for strategy records (a basis, prototypes)
    generator: torch.Generator = field(default_factory=torch.Generator, repr=False)
    """The round's random stream: :meth:`LocalTrainer.train` seeds it (:func:`round_seed`)
    before any hook runs; each epoch's batch order, and whatever a hook draws (PRD's
    augmentations), come from it in the loop's order."""
    scenario: Scenario | None = field(default=None, repr=False)
    """The run's task stream (its kind, each task's classes, the heads): what a method needs
    to know which outputs belong to old tasks. Set by the client app."""
    store: ClientStore = field(default_factory=ClientStore, repr=False)
    """What the trainer keeps on this client between rounds (:class:`ClientStore`): loaded
    before the round and saved after it where the trainer declares
    :attr:`LocalTrainer.keeps_client_store`, a fresh empty one otherwise."""

    def dataset_classes(self, targets: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """The dataset classes of head targets ``targets`` ``[N]`` of ``task`` (this round's
        by default): the targets themselves in class- and domain-IL, the task's classes at
        those positions in task-IL. What a :class:`SampleBuffer` row's class must be. Raises
        ValueError without a scenario."""
        if self.scenario is None:
            raise ValueError("RoundContext.dataset_classes needs the round's scenario")
        return self.scenario.classes_of(self.task if task is None else task, targets)


@dataclass
class TrainResult:
    num_examples: int
    loss: float
    steps: int
    extra_metrics: dict[str, float] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)  # extra reply records (payloads)


class LocalTrainer:
    """Local training of one client for one round: cross-entropy on the current task. One loop,
    :meth:`train`; a method overrides the hooks it changes and declares what it needs in the
    class attributes below. For one round (``B`` = ``config.batch_size``; an epoch's last batch
    may be shorter), in this order::

        begin_task(ctx)                     # the client app, once per task and client
        train(ctx):
            model to ctx.device, train mode; ctx.generator seeded; torch's global RNG seeded
            from one draw of it (dropout)
            optimizers(ctx, model)
            before_training(ctx, model)
            for epoch in range(config.local_epochs):
                before_epoch(ctx, epoch)
                the epoch's batch order (one permutation drawn from ctx.generator)
                for every batch (uint8 images [B, C, H, W], targets [B], on ctx.device):
                    inputs = batch_inputs(ctx, images)
                    loss = batch_loss(ctx, model, inputs, targets)
                        # by default cross-entropy of model(inputs, ctx.head),
                        # + extra_loss(ctx, outputs, inputs, targets) unless None
                    loss = loss + alpha * sum_i ||d loss / d w_i||_2  # unless alpha = 0
                    loss = loss + regularizer(ctx, params, reference)  # unless None
                    every optimizer's zero_grad; loss.backward(); every optimizer's step
                after_epoch(ctx, epoch)
        after_training(ctx, result)         # the client app, with the trained model

    ``alpha`` is the run's ``config.gradient_restriction``: IAU's gradient-restriction term
    (:func:`~fedcl.unlearning_math.gradient_restriction_term`, by double backprop over the
    model's trainable parameters), on the loss :meth:`batch_loss` returns, whatever the
    trainer; so every strategy's clients can train with it. It never sees the regularizer
    (FedProx's proximal term).

    A cohort (``cohort_size`` > 1, :mod:`fedcl.cohort_training`) trains its members as one
    batched computation that runs only :meth:`regularizer` (each member with its own context)
    and :meth:`after_training` of a subclass, not even :meth:`begin_task`: one that overrides
    any other hook declares ``batchable = False``."""

    batchable: bool = True
    """Whether clients of this trainer can train as a batched cohort (``cohort_size`` > 1):
    true only where the trainer changes nothing but :meth:`regularizer` and
    :meth:`after_training`."""
    uses_round_start_weights: bool = False
    """Whether :meth:`regularizer` needs the round's starting weights (its ``reference``):
    FedProx's proximal term. Without it ``reference`` is empty and no copy is made."""
    adds_reply_records: bool = False
    """Whether :meth:`after_training` adds records to the reply (FOT's sketches): a cohort then
    replies per member, never with its members' mean."""
    regularizer_reads_context: bool = True
    """Whether :meth:`regularizer` reads its ``ctx``. A cohort calls it for each member with
    that member's own context, one call per member and step; a regularizer that reads nothing
    of its context (FedProx's) sets this False, and a cohort calls it once a step for all its
    members (vmapped, with its first member's context): the same terms in a few kernels
    instead of a few per member."""
    keeps_client_store: bool = False
    """Whether the trainer keeps a :class:`ClientStore` on its client between rounds
    (``ctx.store``: an old model, statistics, replay buffers of raw samples): the client app
    then loads it before :meth:`begin_task` and saves it after :meth:`after_training`, and
    fedcl purges its buffers on erasures. A cohort's leader cannot hold its members' stores,
    so such a trainer cannot train in cohorts (``cohort_size`` > 1 is refused)."""
    loss_sum_dtype: torch.dtype = torch.float32
    """The dtype the steps' losses are summed in for the round's mean loss
    (:attr:`TrainResult.loss`). float32, on the training device: no wait for the GPU per step."""

    def begin_task(self, ctx: RoundContext) -> None:
        """Called by the client app once when this client first trains on a new task, before
        :meth:`train` (never in a cohort)."""

    def optimizers(self, ctx: RoundContext, model: nn.Module) -> list[torch.optim.Optimizer]:
        """The optimizers of the round, made once at its start (after the model is on
        ``ctx.device``), before :meth:`before_training`. Every step zeroes all their gradients
        before the backward pass and steps them in list order after it. Default: the run's
        optimizer over all of ``model``'s parameters (:func:`make_optimizer`). A method whose
        parameters need other settings returns several (PRD: plain SGD for its prototypes,
        whatever the run's optimizer: one torch optimizer's parameter groups cannot mix SGD
        and Adam)."""
        return [make_optimizer(model.parameters(), ctx.config)]

    def before_training(self, ctx: RoundContext, model: nn.Module) -> None:
        """Called once per round after :meth:`optimizers`, before the first epoch, with the
        model on ``ctx.device`` in train mode (``model`` is ``ctx.model``): per-round set-up
        that the hooks below read (PRD's frozen copy of the previous task's model)."""

    def before_epoch(self, ctx: RoundContext, epoch: int) -> None:
        """Called at the start of every epoch (``epoch`` from 0), before the epoch's batch
        order is drawn from ``ctx.generator``."""

    def batch_inputs(self, ctx: RoundContext, images: torch.Tensor) -> torch.Tensor:
        """The model's inputs for one batch, called first in every step: ``images`` are the
        batch's uint8 images ``[B, C, H, W]`` on ``ctx.device``. Default: normalised float32
        images of the same shape (:func:`~fedcl.data.datasets.to_float`). A method may return
        more rows (PRD: two augmented views of each image, ``[2B, C, H, W]``); what it returns
        is what :meth:`batch_loss` receives."""
        return to_float(images, ctx.mean, ctx.std)

    def batch_loss(self, ctx: RoundContext, model: nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
        """The batch's loss, a scalar tensor that the step back-propagates (after adding
        :meth:`regularizer`'s term): ``inputs`` from :meth:`batch_inputs`, ``targets`` the
        batch's head targets ``[B]`` (long) on ``ctx.device``. Default: the cross-entropy of
        ``model(inputs, ctx.head)`` (logits ``[B, classes]``), plus :meth:`extra_loss` of those
        outputs when it is not None. A method with its own loss (PRD) overrides this, and then
        :meth:`extra_loss` is called only if it calls it."""
        outputs = model(inputs, ctx.head)
        loss = nn.functional.cross_entropy(outputs, targets)
        extra = self.extra_loss(ctx, outputs, inputs, targets)
        if extra is not None:
            loss = loss + extra
        return loss

    def extra_loss(self, ctx: RoundContext, outputs: torch.Tensor, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor | None:
        """A term added to the batch's cross-entropy from the batch's ``outputs`` (the logits
        ``[B, classes]`` of ``model(inputs, ctx.head)``), ``inputs`` ``[B, C, H, W]`` and
        ``targets`` ``[B]`` (a distillation from the outputs, say); a scalar tensor, or None
        for no term. Called by the default :meth:`batch_loss` every step, after the
        cross-entropy and before :meth:`regularizer`."""
        return None

    def regularizer(self, ctx: RoundContext, params: list[torch.Tensor],
                    reference: list[torch.Tensor]) -> torch.Tensor | None:
        """A term added to every step's loss after :meth:`batch_loss` (FedProx's proximal
        term), from the trained parameters ``params`` (``model.parameters()``, in
        ``named_parameters`` order) and ``reference``, their values at the round's start
        matched by position (empty unless :attr:`uses_round_start_weights`); a scalar tensor, or
        None for no term. Pure tensor code: a cohort calls it for each member with that
        member's context and parameters, only those its loss reaches, and decides once, at the
        round's start, whether a member has a term at all."""
        return None

    def after_epoch(self, ctx: RoundContext, epoch: int) -> None:
        """Called at the end of every epoch (``epoch`` from 0), after its last step."""

    def after_training(self, ctx: RoundContext, result: TrainResult) -> TrainResult:
        """Called by the client app after :meth:`train` with ``ctx.model`` trained (in a
        cohort, loaded with the member's trained weights, and only when
        :attr:`adds_reply_records`); returns the result with any reply records (payloads)
        added. Not called for a client with no samples left."""
        return result

    def train(self, ctx: RoundContext) -> TrainResult:
        """The round's local training, calling the hooks in the order the class docstring
        gives; the model in ``ctx.model`` is trained in place."""
        model = ctx.model.to(ctx.device)
        model.train()
        gen = ctx.generator.manual_seed(round_seed(ctx.config.seed, ctx.task, ctx.round,
                                                   ctx.partition_id))
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        optimizers = self.optimizers(ctx, model)
        params = list(model.parameters())
        reference = ([p.detach().clone() for p in params] if self.uses_round_start_weights
                     else [])
        n = int(ctx.y.shape[0])
        # the loss is summed on the device: a float() per step would wait for the GPU each step
        total = torch.zeros((), dtype=self.loss_sum_dtype, device=ctx.device)
        steps = 0
        x_dev, y_dev = ctx.x.to(ctx.device), ctx.y.to(ctx.device)
        self.before_training(ctx, model)
        restriction = ctx.config.gradient_restriction
        trainable = [p for p in params if p.requires_grad]
        for epoch in range(ctx.config.local_epochs):
            self.before_epoch(ctx, epoch)
            order = torch.randperm(n, generator=gen).to(ctx.device)
            for start in range(0, n, ctx.config.batch_size):
                batch = order[start:start + ctx.config.batch_size]
                inputs = self.batch_inputs(ctx, x_dev[batch])
                loss = self.batch_loss(ctx, model, inputs, y_dev[batch])
                if restriction > 0:
                    loss = loss + restriction * gradient_restriction_term(loss, trainable)
                extra = self.regularizer(ctx, params, reference)
                if extra is not None:
                    loss = loss + extra
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
                total += loss.detach()
                steps += 1
            self.after_epoch(ctx, epoch)
        return TrainResult(num_examples=n, loss=float(total) / max(steps, 1), steps=steps)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, head: int | None,
             mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 images ``x`` with head targets ``y``."""
    if len(y) == 0:
        return 0.0
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        xb = to_float(x[start:start + batch_size].to(device), mean, std)
        pred = model(xb, head).argmax(dim=1)
        correct += int((pred == y[start:start + batch_size].to(device)).sum())
    model.train(was_training)
    return correct / len(y)
