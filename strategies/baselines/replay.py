"""FedER and FedDER++: experience replay from a reservoir buffer of raw samples on every client
(Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019), and Dark Experience
Replay++ (Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple
Baseline", NeurIPS 2020), federated; the server averages as FedAvg.

**Every client keeps raw samples of its past tasks on its device** (the client's
:class:`~fedcl.api.ClientStore`): nothing more crosses the network than FedAvg's weights, but
the no-retention premise of exemplar-free continual learning does not hold. summary.json's
``client_state`` reports each client's buffered samples, bytes and classes; an erasure
request removes the erased samples from every buffer before the next round (fedcl purges the
buffers by each row's dataset class).

The buffer (mammoth's ``utils/buffer.py``): a reservoir of ``capacity`` rows; each row holds
the uint8 image as trained (with the task's input shift: a Permuted-MNIST sample is stored
permuted), its head target, its head (task-IL) and its dataset class, and for DER++ the
model's logits at the step it was offered. Every batch a client trains on is offered to the
buffer after the step's loss is computed from the samples drawn before it (mammoth's order),
in every epoch and round: a sample is offered again each time it is trained on, and each offer
is kept with probability capacity/(offers so far). The draws come from the round's seeded
generator.

* **FedER** (``feder``): each step's loss is the mean cross-entropy over the union of the
  current batch and ``min(replay_batch, filled)`` distinct buffered samples.
* **FedDER++** (``fedderpp``): the current batch's cross-entropy, plus ``alpha`` times the mean
  squared error between the model's logits on a buffer draw and the stored ones, plus ``beta``
  times the cross-entropy of a second, independent draw against its stored labels; ``beta``
  0 gives DER.

The memory budget: ``buffer_size`` samples, in total across the federation
(``buffer_scope = "total"``: client k of K holds ``buffer_size // K``, plus one for the first
``buffer_size % K`` clients) or per client (``buffer_scope = "client"``).

Deviations and choices: the stored logits are those of the client's local model when the
sample was offered (they go stale across rounds and tasks by design, as in the paper); a
client's rows freed by a purge fill again with the next offers
(:func:`~strategies.baselines.maths.reservoir_slots`); task-IL replays a sample through its own
task's head; the logits kept are those of the sample's head (task-IL) or of the single head.
The clients keep a store between rounds, so neither method trains in batched cohorts
(``cohort_size`` > 1 is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.nn import functional as F

from fedcl.api import (
    Capabilities,
    ConfigError,
    ContinualStrategy,
    LocalTrainer,
    RoundContext,
    SampleBuffer,
    TrainResult,
    flower_kwargs,
    register_strategy,
)
from strategies.baselines.maths import (
    TrainingReservoir,
    derpp_terms,
    outputs_by_head,
    replay_draw,
)

BUFFER = "replay"  # the buffer's name in the client's store
SEEN = "replay.seen"  # the store's count of examples offered to the buffer
SCOPES = ("total", "client")


@dataclass(frozen=True)
class ReplayParams:
    method: ClassVar[str] = "feder"  # the name its refusals give

    buffer_size: int = 200
    """The memory budget in samples: across the whole federation (buffer_scope total) or
    for each client (buffer_scope client)."""
    buffer_scope: str = "total"
    """total: buffer_size is split among the clients (the first buffer_size % K get one
    more); client: every client holds buffer_size."""
    replay_batch: int = 0
    """Buffered samples drawn per step (each draw); 0 = the run's batch_size."""

    def check(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"{self.method} buffer_size must be >= 1, got "
                              f"{self.buffer_size}")
        if self.buffer_scope not in SCOPES:
            raise ConfigError(f"{self.method} buffer_scope must be total or client, got "
                              f"'{self.buffer_scope}'")
        if self.replay_batch < 0:
            raise ConfigError(f"{self.method} replay_batch must be >= 0, got "
                              f"{self.replay_batch}")

    def capacity(self, partition_id: int, clients: int) -> int:
        """Client ``partition_id``'s buffer rows in a federation of ``clients``."""
        if self.buffer_scope == "client":
            return self.buffer_size
        return self.buffer_size // clients + (1 if partition_id < self.buffer_size % clients
                                              else 0)


@dataclass(frozen=True)
class DERPPParams(ReplayParams):
    method: ClassVar[str] = "fedderpp"

    alpha: float = 0.2
    """Weight of the logit-matching term (DER++ on S-MNIST, buffer 200: 0.2)."""
    beta: float = 1.0
    """Weight of the replayed labels' cross-entropy (S-MNIST, buffer 200: 1.0); 0 = DER."""

    def check(self) -> None:
        super().check()
        for name in ("alpha", "beta"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"fedderpp {name} must be >= 0, got {getattr(self, name)}")


class FedReplay(ContinualStrategy, FedAvg):
    """FedAvg: the replay happens on the clients."""

    # FedAvg's mean; nothing at task ends (the buffers are the clients', purged by fedcl)
    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=True, task_end_state=False)


class ReplayTrainer(LocalTrainer):
    """Local training with a reservoir buffer of the client's own samples: the buffer draw's
    loss (:meth:`replay_loss`) beside the current batch's, then the batch offered to the
    buffer."""

    keeps_client_store = True  # the buffer lives on the client, round to round
    batchable = False  # its own loss and store: no cohort
    stores_logits = False

    def __init__(self, params: ReplayParams) -> None:
        self.params = params
        self._images: torch.Tensor | None = None
        self._reservoir: TrainingReservoir | None = None

    def buffer(self, ctx: RoundContext) -> SampleBuffer:
        return ctx.store.buffer(BUFFER)

    def capacity(self, ctx: RoundContext) -> int:
        return self.params.capacity(ctx.partition_id, ctx.config.clients)

    def train(self, ctx: RoundContext) -> TrainResult:
        """The round's training with the buffer on the training device
        (:class:`~strategies.baselines.maths.TrainingReservoir`), written back to the client's
        store when it ends."""
        buffer = self.buffer(ctx)
        self._reservoir = TrainingReservoir(buffer, self.capacity(ctx), ctx.device,
                                            on_host=("head",))
        try:
            result = super().train(ctx)
            self._reservoir.save(buffer)
        finally:
            self._reservoir = None
        return result

    @property
    def reservoir(self) -> TrainingReservoir:
        if self._reservoir is None:
            raise RuntimeError("the replay buffer is on the device only during train()")
        return self._reservoir

    def draw(self, ctx: RoundContext) -> tuple[torch.Tensor, torch.Tensor | None,
                                               dict[str, torch.Tensor]]:
        """A draw of ``min(replay_batch, filled)`` buffered rows: (model-ready inputs on
        ``ctx.device``, their heads on the CPU or None (single head), their other columns on
        ``ctx.device``)."""
        reservoir = self.reservoir
        rows = replay_draw(len(reservoir), self.params.replay_batch or ctx.config.batch_size,
                           ctx.generator)
        columns = reservoir.rows(rows)  # the heads stay on the host
        inputs = super().batch_inputs(ctx, columns.pop("x"))
        heads = None if ctx.head is None else reservoir.host_rows("head", rows)
        return inputs, heads, columns

    def batch_inputs(self, ctx: RoundContext, images: torch.Tensor) -> torch.Tensor:
        self._images = images  # offered to the buffer once the step's loss is built
        return super().batch_inputs(ctx, images)

    def batch_loss(self, ctx: RoundContext, model: nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
        outputs = model(inputs, ctx.head)
        loss = self.replay_loss(ctx, model, outputs, targets)
        self.offer(ctx, targets, outputs)
        return loss

    def replay_loss(self, ctx: RoundContext, model: nn.Module, outputs: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
        """ER: the mean cross-entropy over the union of the batch and a buffer draw."""
        inputs, heads, columns = self.draw(ctx) if len(self.reservoir) else (None, None, {})
        if inputs is None or inputs.shape[0] == 0:
            return F.cross_entropy(outputs, targets)
        replayed = outputs_by_head(model, inputs, heads)
        ce = torch.cat([F.cross_entropy(outputs, targets, reduction="none"),
                        F.cross_entropy(replayed, columns["y"], reduction="none")])
        return ce.mean()

    def offer(self, ctx: RoundContext, targets: torch.Tensor, outputs: torch.Tensor) -> None:
        """Offer the step's batch to the buffer (reservoir sampling)."""
        assert self._images is not None
        seen = int(ctx.store.arrays.get(SEEN, torch.zeros((), dtype=torch.int64)))
        head = -1 if ctx.head is None else ctx.head
        columns = {"x": self._images, "y": targets,
                   "head": torch.full((targets.shape[0],), head, dtype=torch.long)}
        if self.stores_logits:
            columns["logits"] = outputs.detach().float()
        seen = self.reservoir.offer(seen, ctx.generator, ctx.dataset_classes(targets),
                                    **columns)
        ctx.store.arrays[SEEN] = torch.tensor(seen, dtype=torch.int64)


class DERPPTrainer(ReplayTrainer):
    """DER++: the batch's cross-entropy, ``alpha`` times the logit matching on one buffer
    draw, ``beta`` times the cross-entropy on another."""

    stores_logits = True

    def __init__(self, params: DERPPParams) -> None:
        super().__init__(params)
        self.der = params

    def replay_loss(self, ctx: RoundContext, model: nn.Module, outputs: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(outputs, targets)
        if not len(self.reservoir):
            return loss
        x1, h1, c1 = self.draw(ctx)
        logits1 = outputs_by_head(model, x1, h1)
        if self.der.beta:  # a second, independent draw for the labels' term
            x2, h2, c2 = self.draw(ctx)
            logits2, labels2 = outputs_by_head(model, x2, h2), c2["y"]
        else:  # DER
            logits2, labels2 = logits1[:0], c1["y"][:0]
        match, ce = derpp_terms(logits1, c1["logits"], logits2, labels2, self.der.alpha,
                                self.der.beta)
        return loss + match + ce


@register_strategy("feder", "FedAvg with experience replay: a reservoir buffer of raw samples "
                   "on every client, mixed into each local batch (Chaudhry et al. 2019).",
                   params=ReplayParams, trainer=ReplayTrainer)
def build_feder(config: Any, params: ReplayParams) -> FedReplay:
    return FedReplay(**flower_kwargs(config))


@register_strategy("fedderpp", "FedAvg with DER++ on clients: a reservoir buffer of raw "
                   "samples with their logits, logit matching plus replayed labels (Buzzega "
                   "et al. 2020).", params=DERPPParams, trainer=DERPPTrainer)
def build_fedderpp(config: Any, params: DERPPParams) -> FedReplay:
    return FedReplay(**flower_kwargs(config))


__all__ = [
    "DERPPParams",
    "DERPPTrainer",
    "FedReplay",
    "ReplayParams",
    "ReplayTrainer",
    "build_fedderpp",
    "build_feder",
]
