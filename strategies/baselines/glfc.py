"""GLFC: Global-Local Forgetting Compensation (Dong, Wang, Fang, Sun, Xu, Wang, Zhu, "Federated
Class-Incremental Learning", CVPR 2022, arXiv 2203.11473; code ``conditionWang/FCIL``), in
fedcl's class-IL task stream. The maths is in :mod:`strategies.baselines.glfc_maths`.

**Clients** train on their current data together with an exemplar memory of raw samples of
their earlier classes, on

    L = 0.5 * L_GC + 0.5 * L_RD        (L_GC alone while there is no old model)

* ``L_GC``, class-aware gradient compensation: a BCE over every output, each sample weighted by
  ``w_i = g_i / mean(g)`` over the batch's samples of its group (old classes, i.e. the classes
  of the earlier tasks, or new ones), ``g_i = |sigmoid(z_{i,y_i}) - 1|`` (every ``w_i`` 1 in
  the first task);
* ``L_RD``, class-semantic relation distillation: a BCE against the one-hot label with the old
  classes' columns replaced by the sigmoid outputs of the *old model*.

**The exemplar memory** (raw samples, on the client: the no-retention premise of exemplar-free
continual learning does not hold). Its budget is ``buffer_size`` samples per client
(``buffer_scope = "client"``; the paper's 2,000) or in total across the federation split among
the clients (``"total"``, as FedER's), split evenly over the classes the client has learned
(:func:`~strategies.baselines.glfc_maths.class_quotas`), each class's rows chosen by iCaRL
herding on the L2-normalised features of the client's model
(:func:`~strategies.baselines.glfc_maths.herding`); when more classes share the budget, each
class keeps the first rows of its herding order. Each row holds the uint8 image, its target
and its dataset class. It lives in the client's :class:`~fedcl.api.ClientStore` as a
:class:`~fedcl.api.SampleBuffer`, exactly as FedER's buffer: summary.json's ``client_state``
reports each client's ``buffer_samples``, ``buffer_bytes`` and ``buffer_classes``; an erasure
request removes the erased samples from every memory before the next round (fedcl purges by
each row's dataset class; an erased client's whole store goes), and the retrain oracle's
clients keep memories of their own, begun empty. When a client trains in a task, the memory's
rows of the earlier tasks' classes are added to its current data (one shuffled set, as iCaRL's
and the code's); after the round, the rows of the current task's classes are chosen again
from the client's data with the model it has just trained, so the memory holds them from the
client's last round in the task on.

**Prototype gradients and the proxy server.** In its first round of a task, after training,
a client takes for each class of the task in its data the sample nearest the class's mean
normalised feature, perturbs it (``perturb_steps`` SGD steps of ``perturb_lr`` on the BCE of
the client's model: the code's 50 and 0.2), and uploads the gradient of the cross-entropy of
that one sample on a fixed random LeNet (three sigmoid convolutions of 12 channels, then one
linear layer; 13,426 parameters for MNIST's 28x28 images, 85,036 for CIFAR-100's 32x32): the
record ``glfc.proto_grads`` (one row of gradient values per class, no label), client ->
server. The server, as the proxy, reads each gradient's label from its last layer
(:func:`~strategies.baselines.glfc_maths.recover_label`), inverts it by L-BFGS from noise
(``inversion_steps``, ``inversion_lr``; :func:`~strategies.baselines.glfc_maths.invert_gradient`)
and keeps the last ``inversion_keep`` iterates as labelled samples. After every round it scores
the new global model on the task's reconstructions (argmax accuracy) and keeps the best one;
at the task's end that best model becomes the **old model** of the next task, which the
server sends with every round of the later tasks (the record ``glfc.old_model``, P values
down per round). The global model the server evaluates and sends is always FedAvg's
aggregate: the proxy only chooses the old model. The proxy holds near-copies of client images
(deliberate single-image gradient inversion): the inversion's count and losses are in
summary.json's ``strategy_state`` (``glfc_reconstructions``, ``glfc_dropped``,
``glfc_match_loss``, ``glfc_old_model_score``).

Design choices and deviations from the paper and its code:

* **Task switches:** fedcl runs a fixed task schedule, so a client knows when a task begins
  (its trainer's ``begin_task``); the code's detection of a new task by a rise of more than 1.2
  in the mean prediction entropy is not used.
* **Data setting:** every client follows fedcl's one task sequence, with its share of each
  task's classes from fedcl's partition (Dirichlet by default); the code gives each client 6
  random classes of a task with all their images, adds 10 clients per task and lets 10 % of
  the old clients keep their old classes. None of that is reproduced.
* **Outputs:** fedcl's models output logits over all the dataset's classes; the BCE (sigmoid
  per output, iCaRL-style) is taken over all of them, the classes not seen yet with target 0
  (the code's head only has the classes seen so far). Evaluation is fedcl's argmax over the
  logits, as the code's.
* **Optimiser and loss scale:** fedcl's local training settings (``lr``, ``local_epochs``,
  ``batch_size``, optimiser) are used, not the code's SGD at lr 2.0 with weight decay 1e-5,
  20 local epochs and staged decay. To make fedcl's learning rate mean what it means for the
  other methods, the BCE is summed over the C outputs and averaged over the samples: C times
  the code's mean over outputs, so the code's lr 2.0 on its mean (C = 10 to 100) is lr 0.2 to
  0.02 here. The prototype's perturbation keeps the code's mean BCE and step size.
* **Old model:** it is the proxy's best-scoring global model of the previous task, chosen on
  the reconstructions of all the uploads received during that task (the code keeps only the
  last round's uploads and moves its "previous best" whenever any client uploads, mid-task
  too; its best score is never reset between tasks: here it is). A task without
  reconstructions (no upload, or every inversion diverged) hands on its last global model, as
  FedLwF's teacher. When the reconstructions grow in a round, the kept best model is scored
  again on the larger set before the new one is compared with it (ties go to the newer).
  It is re-sent with every round rather than kept on clients: it is the server's choice, and a
  client first sampled mid-task would otherwise lack it.
* **Inputs:** prototypes, their perturbation, the gradients and the reconstructions are in the
  model's normalised input space (the code perturbs and inverts unnormalised [0, 1] images and
  normalises the reconstructions before scoring them).
* **Proxy network:** server and clients build the same LeNet from the run's seed, so it never
  travels (the code shares one object); its weights are uniform on [-0.5, 0.5] as the code's.
  A reconstruction whose matching loss ends non-finite or not below its start is dropped.
* **Inversion budget:** ``inversion_steps`` defaults to 30 L-BFGS steps with the last 10
  iterates kept (the paper's code: 250 and 20). An MNIST gradient inverted alone is mostly
  matched to within 1e-4 after 15 to 20 steps (1.5 to 2.5 s per reconstruction on a 2-core
  host). Every client uploads in its first round of a task, so that round waits for
  (clients x classes held) inversions on the server.
* **Inversions together:** the code inverts one gradient at a time; fedcl's proxy, by
  default (``inversion_batch`` 0), runs one L-BFGS over all of a round's gradients at once
  (their matching losses summed, each sample's gradient its own; step size and curvature
  history shared). Measured on the gradients of 20 MNIST images on a 2-core host, 30 steps
  (``benchmarks/glfc_inversion.py``): 3.8 s against 41.0 s one at a time; median final
  matching loss 6.5e-3 against 9.8e-7, worst 0.43 against 1.3e-4; median mean absolute pixel
  error of the last iterate 0.031 against 0.0004 (normalised units): faster, less exact.
  ``inversion_batch=1`` inverts one at a time, as the code.
* **Herding** picks a sample once (the code may pick a row twice); a remainder of the budget
  goes one row each to the lowest-numbered classes. Features come from the client's model
  after its round's training (the code uses the global model at the task switch).
* **Aggregation:** fedcl's sample-weighted FedAvg over the current task's samples (the code
  averages clients uniformly); a client's memory rows do not count in its weight.
* Class-IL only (the method is defined for it); clients keep a store, so no batched cohorts.
* After an erasure the strategy is built afresh (``task_end_state`` false): the proxy drops its
  reconstructions and the old model of the later tasks is the unlearned model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcl.api import (
    Capabilities,
    ConfigError,
    ContinualStrategy,
    LocalTrainer,
    RoundContext,
    RoundInfo,
    SampleBuffer,
    TrainResult,
    build_model,
    build_scenario,
    flower_kwargs,
    register_strategy,
)
from strategies.baselines.glfc_maths import (
    class_quotas,
    glfc_loss,
    herding,
    invert_gradients,
    nearest_to_mean,
    perturb_prototype,
    prototype_gradient,
    proxy_network,
    reconstruction_accuracy,
    recover_label,
    unflatten,
)
from strategies.baselines.maths import frozen_copy

OLD_MODEL = "glfc.old_model"  # ArrayRecord server -> clients: the proxy's old model
PROTO_GRADS = "glfc.proto_grads"  # ArrayRecord client -> server: {"grads": [classes, P]}
BUFFER = "glfc"  # the exemplar memory's name in the client's store
SCOPES = ("total", "client")
PROXY_SEED_OFFSET = 0x61FC  # the proxy network's seed is the run's seed plus this


def proxy_seed(seed: int) -> int:
    """The seed of the proxy network of a run of seed ``seed`` (server and clients agree)."""
    return int(seed) + PROXY_SEED_OFFSET


@dataclass(frozen=True)
class GLFCParams:
    buffer_size: int = 200
    """The exemplar memory's budget in samples: across the whole federation (buffer_scope
    total) or for each client (buffer_scope client; the paper: 2000 per client); 0: none."""
    buffer_scope: str = "total"
    """total: buffer_size is split among the clients (the first buffer_size % K get one more);
    client: every client holds buffer_size."""
    perturb_steps: int = 50
    """SGD steps that perturb each prototype before its gradient is taken (the code: 50)."""
    perturb_lr: float = 0.2
    """Step size of the prototype's perturbation (the code: lr / 10 = 0.2)."""
    inversion_steps: int = 30
    """L-BFGS steps of the proxy's gradient inversion (the code: 250); 0: no prototype
    gradients are sent and the old model is each task's last global model."""
    inversion_lr: float = 0.1
    """L-BFGS step size of the gradient inversion (the code: 0.1)."""
    inversion_keep: int = 10
    """Iterates of the last inversion steps kept as reconstructed samples (the code: 20)."""
    inversion_batch: int = 0
    """Gradients inverted together by one L-BFGS (glfc_maths.invert_gradients): 0, all of a
    round's uploads at once; 1, one at a time (the code)."""

    def check(self) -> None:
        if self.buffer_size < 0:
            raise ConfigError(f"glfc buffer_size must be >= 0, got {self.buffer_size}")
        if self.buffer_scope not in SCOPES:
            raise ConfigError(f"glfc buffer_scope must be total or client, got "
                              f"'{self.buffer_scope}'")
        for name in ("perturb_steps", "inversion_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"glfc {name} must be >= 0, got {getattr(self, name)}")
        for name in ("perturb_lr", "inversion_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"glfc {name} must be > 0, got {getattr(self, name)}")
        if self.inversion_keep < 1:
            raise ConfigError(f"glfc inversion_keep must be >= 1, got {self.inversion_keep}")
        if self.inversion_batch < 0:
            raise ConfigError(f"glfc inversion_batch must be >= 0, got {self.inversion_batch}")

    def capacity(self, partition_id: int, clients: int) -> int:
        """Client ``partition_id``'s memory rows in a federation of ``clients``."""
        if self.buffer_scope == "client":
            return self.buffer_size
        return self.buffer_size // clients + (1 if partition_id < self.buffer_size % clients
                                              else 0)


def server_device(name: str) -> torch.device:
    """Where the proxy works: CUDA when the run's device asks for it (or ``auto``) and there
    is a GPU, else the CPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class GLFC(ContinualStrategy, FedAvg):
    """FedAvg, plus the proxy server: it reconstructs samples from the clients' prototype
    gradients, scores every new global model on them, and hands the best of each task on as
    the next tasks' old model."""

    payload_keys = (PROTO_GRADS,)
    # FedAvg's mean; payloads per client, so no cohort mean; the proxy's state is built from
    # client uploads, but after unlearning it starts afresh (the old model is then the
    # unlearned one), so nothing is rebuilt from task ends
    capabilities = Capabilities(scenarios=("class-il",), fedavg_aggregate=True,
                                cohort_mean=False, task_end_state=False)

    def __init__(self, params: GLFCParams, config: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.config = config
        self.device = server_device(str(config.device))
        self.old: ArrayRecord | None = None  # the old model, sent from the next task on
        self.best: ArrayRecord | None = None  # the best global model of the open task
        self.best_score: float | None = None
        self.task = 0
        self.recon_x = torch.zeros(0)
        self.recon_y = torch.zeros(0, dtype=torch.long)
        self.inversions = 0  # in the open task
        self.dropped = 0
        self.match_loss = 0.0  # sum of the kept inversions' final matching losses
        self.last: dict[str, float] = {}  # the finished task's figures (state_metrics)
        self._model: nn.Module | None = None
        self._net: nn.Module | None = None

    # --- the proxy ---------------------------------------------------------------------
    def _networks(self) -> tuple[nn.Module, nn.Module]:
        """The run's model (to score global models) and the proxy network, built once."""
        if self._model is None or self._net is None:
            scenario = build_scenario(self.config)
            self._model = build_model(self.config, scenario).to(self.device).eval()
            self._net = proxy_network(scenario.dataset.input_shape,
                                      scenario.dataset.num_classes,
                                      proxy_seed(self.config.seed)).to(self.device)
        return self._model, self._net

    def score(self, arrays: ArrayRecord) -> float:
        """``arrays``' accuracy on the open task's reconstructions."""
        model, _ = self._networks()
        model.load_state_dict(arrays.to_torch_state_dict())
        x = self.recon_x.to(self.device)
        return reconstruction_accuracy(lambda v: model(v, None), x, self.recon_y)

    def reconstruct(self, grads: torch.Tensor) -> int:
        """Invert every row of ``grads`` ``[n, P]`` (one sample's gradient each),
        ``inversion_batch`` rows at a time, and add the reconstructions to the open task's
        set; returns how many samples were added."""
        _, net = self._networks()
        shape = build_scenario(self.config).dataset.input_shape
        rows = list(grads.float())
        size = self.params.inversion_batch or max(1, len(rows))
        added = 0
        for first in range(0, len(rows), size):
            targets = [unflatten(net, row.to(self.device)) for row in rows[first:first + size]]
            labels = [recover_label(t[-2]) for t in targets]  # the last linear layer's weight
            generators = []
            for _ in targets:
                seed = ((self.config.seed * 1_000_003 + self.task) * 1_000_003
                        + self.inversions) % 2**63
                self.inversions += 1
                generators.append(torch.Generator().manual_seed(seed))
            inversions = invert_gradients(net, targets, labels, shape,
                                          self.params.inversion_steps,
                                          self.params.inversion_lr,
                                          self.params.inversion_keep, generators)
            for label, inv in zip(labels, inversions, strict=True):
                if not (inv.end_loss < inv.start_loss) or inv.images.shape[0] == 0:
                    self.dropped += 1
                    continue
                self.match_loss += inv.end_loss
                k = int(inv.images.shape[0])
                self.recon_x = (inv.images if self.recon_x.numel() == 0
                                else torch.cat([self.recon_x, inv.images]))
                self.recon_y = torch.cat([self.recon_y,
                                          torch.full((k,), label, dtype=torch.long)])
                added += k
        return added

    def after_aggregate(self, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        """The proxy's work after FedAvg: the round's uploads reconstructed, the new global
        model scored, the best kept. The aggregate itself is returned unchanged."""
        uploads = [record.to_torch_state_dict()["grads"] for pid in sorted(self.payloads)
                   if (record := self.payloads[pid].get(PROTO_GRADS)) is not None]
        added = self.reconstruct(torch.cat(uploads)) if uploads else 0
        if self.recon_y.numel() == 0:  # nothing to score on: the latest model stands
            self.best, self.best_score = arrays, None
            return arrays
        if self.best is not None and (added or self.best_score is None):
            self.best_score = self.score(self.best)
        score = self.score(arrays)
        if self.best is None or self.best_score is None or score >= self.best_score:
            self.best, self.best_score = arrays, score
        return arrays

    # --- the task stream ------------------------------------------------------------------
    def begin_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        self.task = task
        return arrays

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        """The best model of ``task`` (its last global model without reconstructions)
        becomes the old model; the task's reconstructions are dropped."""
        kept = int(self.recon_y.numel())
        self.last = {"glfc_reconstructions": float(kept),
                     "glfc_inversions": float(self.inversions),
                     "glfc_dropped": float(self.dropped),
                     "glfc_match_loss": (self.match_loss / max(1, self.inversions - self.dropped)),
                     "glfc_old_model_score": (-1.0 if self.best_score is None
                                              else self.best_score)}
        self.old = self.best if self.best is not None else arrays
        self.best, self.best_score = None, None
        self.recon_x, self.recon_y = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        self.inversions, self.dropped, self.match_loss = 0, 0, 0.0
        return arrays

    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        return {OLD_MODEL: self.old} if self.old is not None else {}

    def state_metrics(self) -> dict[str, float]:
        """After each task: the task's reconstructed samples kept, gradients inverted and
        dropped, the kept inversions' mean final matching loss, and the old model's score on
        the reconstructions (-1: none, the task's last model was handed on)."""
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        def sd(a: ArrayRecord | None) -> Any:
            return None if a is None else a.to_torch_state_dict()

        return {"old": sd(self.old), "best": sd(self.best), "best_score": self.best_score,
                "task": self.task, "recon_x": self.recon_x, "recon_y": self.recon_y,
                "inversions": self.inversions, "dropped": self.dropped,
                "match_loss": self.match_loss, "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def ar(s: Any) -> ArrayRecord | None:
            return None if s is None else ArrayRecord(s)

        self.old, self.best = ar(state["old"]), ar(state["best"])
        self.best_score, self.task = state["best_score"], int(state["task"])
        self.recon_x, self.recon_y = state["recon_x"], state["recon_y"]
        self.inversions, self.dropped = int(state["inversions"]), int(state["dropped"])
        self.match_loss, self.last = float(state["match_loss"]), dict(state["last"])


class GLFCTrainer(LocalTrainer):
    """A client of GLFC: current data plus the exemplar memory, ``0.5 L_GC + 0.5 L_RD``;
    after the round, the memory's current classes chosen again by herding and, in the
    client's first round of a task, the prototype gradients added to the reply."""

    keeps_client_store = True  # the exemplar memory lives on the client, round to round
    batchable = False  # its own loss, data and store: no cohort
    adds_reply_records = True  # the prototype gradients

    def __init__(self, params: GLFCParams) -> None:
        self.params = params
        self._first_round = False
        self._old: nn.Module | None = None
        self._old_classes = torch.zeros(0, dtype=torch.long)

    def begin_task(self, ctx: RoundContext) -> None:
        self._first_round = True  # the client's first round of the task: it uploads

    def memory(self, ctx: RoundContext) -> SampleBuffer:
        return ctx.store.buffer(BUFFER)

    def current_classes(self, ctx: RoundContext) -> list[int]:
        assert ctx.scenario is not None
        return list(ctx.scenario.tasks[ctx.task].classes)

    def train(self, ctx: RoundContext) -> TrainResult:
        """The round's training on the current data and the memory's rows of the earlier
        tasks' classes, one shuffled set; the result counts the current samples only (FedAvg's
        weight) and reports the memory rows trained on (metric ``glfc_replayed``)."""
        x, y = ctx.x, ctx.y
        buf = self.memory(ctx)
        replayed = 0
        if len(buf):
            rows = ~torch.isin(buf.classes, torch.tensor(self.current_classes(ctx)))
            replayed = int(rows.sum())
            ctx.x = torch.cat([x, buf.columns["x"][rows]])
            ctx.y = torch.cat([y, buf.columns["y"][rows]])
        try:
            result = super().train(ctx)
        finally:
            ctx.x, ctx.y = x, y
        result.num_examples = int(y.shape[0])
        result.extra_metrics["glfc_replayed"] = float(replayed)
        return result

    def before_training(self, ctx: RoundContext, model: nn.Module) -> None:
        """The old model from the round's message (none in the first task) and the earlier
        tasks' classes."""
        assert ctx.scenario is not None
        old = sorted(c for t in ctx.scenario.tasks[:ctx.task] for c in t.classes)
        self._old_classes = torch.tensor(old, dtype=torch.long, device=ctx.device)
        record = ctx.message.get(OLD_MODEL) if ctx.message is not None else None
        self._old = None
        if record is None or ctx.task == 0:
            return
        self._old = frozen_copy(model, record.to_torch_state_dict())

    def batch_loss(self, ctx: RoundContext, model: nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
        outputs = model(inputs, ctx.head)
        old_logits = None
        if self._old is not None:
            with torch.no_grad():
                old_logits = self._old(inputs, ctx.head)[:, self._old_classes]
        loss, _, _ = glfc_loss(outputs, targets, self._old_classes, old_logits)
        return loss

    @torch.no_grad()
    def _features(self, ctx: RoundContext, model: nn.Module) -> torch.Tensor:
        out = []
        for start in range(0, int(ctx.y.shape[0]), 1000):
            xb = self.batch_inputs(ctx, ctx.x[start:start + 1000].to(ctx.device))
            out.append(model.features(xb).float().cpu())  # type: ignore[operator]
        return torch.cat(out)

    def update_memory(self, ctx: RoundContext, features: torch.Tensor) -> None:
        """The memory after the round: the budget split over the classes learned (the
        memory's earlier classes and the current task's classes in the client's data), the
        earlier classes cut to their share, the current ones chosen again by herding."""
        buf = self.memory(ctx)
        current = set(self.current_classes(ctx))
        classes = ctx.dataset_classes(ctx.y).cpu()
        here = sorted(int(c) for c in torch.unique(classes).tolist())
        earlier = sorted({int(c) for c in buf.classes.tolist()} - current)
        quota = class_quotas(earlier + here, self.params.capacity(ctx.partition_id,
                                                                  ctx.config.clients))
        if len(buf):  # the earlier classes' first rows (herding order) up to their share
            keep = torch.zeros(len(buf), dtype=torch.bool)
            for c in earlier:
                rows = (buf.classes == c).nonzero(as_tuple=True)[0][:quota.get(c, 0)]
                keep[rows] = True
            buf.keep(keep)
        for c in here:
            rows = (classes == c).nonzero(as_tuple=True)[0]
            picked = rows[herding(features[rows], quota.get(c, 0))]
            if picked.numel():
                buf.append(classes[picked], x=ctx.x[picked].cpu(), y=ctx.y[picked].cpu())

    def prototype_gradients(self, ctx: RoundContext, model: nn.Module,
                            features: torch.Tensor) -> torch.Tensor:
        """One row per current class in the client's data (ascending): the flattened
        gradient of the proxy network's cross-entropy on the class's perturbed prototype."""
        assert ctx.scenario is not None
        dataset = ctx.scenario.dataset
        net = proxy_network(dataset.input_shape, dataset.num_classes,
                            proxy_seed(ctx.config.seed)).to(ctx.device)
        classes = ctx.dataset_classes(ctx.y).cpu()
        rows = []
        for c in sorted(int(k) for k in torch.unique(classes).tolist()):
            idx = (classes == c).nonzero(as_tuple=True)[0]
            i = int(idx[nearest_to_mean(features[idx])])
            x = self.batch_inputs(ctx, ctx.x[i:i + 1].to(ctx.device))[0]
            x = perturb_prototype(lambda v: model(v, ctx.head), x, c,
                                  ctx.scenario.classes_per_head, self.params.perturb_steps,
                                  self.params.perturb_lr)
            rows.append(prototype_gradient(net, x, c).cpu())
        return torch.stack(rows)

    def after_training(self, ctx: RoundContext, result: TrainResult) -> TrainResult:
        model = ctx.model
        was_training = model.training
        model.eval()
        try:
            features = self._features(ctx, model)
            if self.params.capacity(ctx.partition_id, ctx.config.clients) > 0:
                self.update_memory(ctx, features)
            if self._first_round and self.params.inversion_steps > 0:
                result.records[PROTO_GRADS] = ArrayRecord(
                    {"grads": self.prototype_gradients(ctx, model, features)})
        finally:
            model.train(was_training)
        return result


@register_strategy("glfc", "GLFC (Dong et al. 2022): exemplar memory of raw samples, "
                   "class-aware gradient compensation and relation distillation on clients; "
                   "a proxy server picks the old model on samples it reconstructs from "
                   "prototype gradients.", params=GLFCParams, trainer=GLFCTrainer)
def build_glfc(config: Any, params: GLFCParams) -> GLFC:
    return GLFC(params, config, **flower_kwargs(config))


__all__ = ["GLFC", "GLFCParams", "GLFCTrainer", "build_glfc", "proxy_seed"]
