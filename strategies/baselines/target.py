"""TARGET: exemplar-free federated class-continual learning by distillation on server-made data
(Zhang, Chen, Zhuang and Lyu, "TARGET: Federated Class-Continual Learning via Exemplar-Free
Distillation", ICCV 2023, arXiv 2303.06937; code ``zj-jayzhang/Federated-Class-Continual-
Learning``, ``methods/target.py``). METHODS.md section 16.

**Server, after every task** (but the last): the global model becomes the *teacher* and the
server synthesises unlabelled images from it, data-free, with a generator
(:class:`~strategies.baselines.maths.SynthesisGenerator`). Each of ``synthesis_calls`` calls
draws fresh latents ``z`` ``[synthesis_batch, latent_dim]`` and labels uniform over the classes
seen so far; a clone of the generator and ``z`` take ``generator_steps`` Adam steps
(``lr_generator``, ``lr_latent``, betas (0.5, 0.999)) on

    L_G = bn_weight * L_BN + ce_weight * CE(teacher(aug(G(z))), y) + adv_weight * L_adv

(:func:`~strategies.baselines.maths.bn_statistics_loss` summed over the teacher's batch-norm
layers, with the statistics blended across calls at ``bn_momentum``;
:func:`~strategies.baselines.maths.adversarial_disagreement` against a *student*, from call
``warmup`` on); the lowest-loss batch of the call joins the synthetic set as 8-bit images, and
the base generator takes one Adam step (lr ``lr_generator * generator_steps``) on the clone's
gradients summed over the steps (first-order MAML). From call ``warmup`` on, the student (a
re-initialised copy of the network) is distilled from the teacher on the images so far for
``student_steps`` steps (:func:`~strategies.baselines.maths.kl_distillation` at
``student_temperature``; SGD lr 0.2, momentum 0.9, weight decay 1e-4, cosine schedule over 200
calls down to 2e-4). ``aug`` is a random crop of the zero-padded image (``augment_pad``), a
horizontal flip if ``augment_flip``, and the dataset's normalisation.

**Clients, task t >= 1** (counting from 0): every real batch is paired with a batch of the
synthetic set (:func:`~strategies.baselines.maths.target_client_loss`):

    L = CE(z(x)[:, new], y - C_old) + kd_weight * KD_T(z(x_syn)[:, old], z_old(x_syn)[:, old])

the cross-entropy over the current task's classes alone, the distillation (LwF's CE form, no
T^2; METHODS.md section 14) over the old classes alone, towards the frozen global model of the
end of the previous task. In task 0 the loss is the cross-entropy over task 0's classes (the
code's network has no other outputs yet). The synthetic images are augmented as the server's
(crop, flip) from the round's seeded generator.

**What travels, what is kept.** The server sends, with every training round of tasks >= 1, the
teacher (``target.teacher``: P float32 values) and the synthetic set (``target.synthetic``: one
uint8 array ``images`` ``[N, C, H, W]``, what the code's 8-bit PNGs hold, N*C*H*W bytes: 2,560
MNIST images are 2.0 MB). Clients keep nothing between rounds: no store, no sample, no model.
Both are re-sent each round, not kept in a client's ``Context.state`` for the task, because a
client first sampled in the middle of a task (``fraction_train`` < 1) would otherwise hold
neither, a resumed run's clients start empty, and an erasure's replayed rounds must see the
rebuilt ones; at the defaults the set costs less than the teacher (MNIST's MLP: 1.9 MB). No
real sample of any task is stored anywhere: the synthetic set is made from the global model
alone, its images carry no real sample and no label, and the server holds nothing else.

**Erasures.** The teacher and the synthetic set depend on the global model alone (no client
payload): ``Capabilities.task_end_state`` is false, so after unlearning fedcl builds a fresh
strategy and replays its ``end_task`` on the unlearned model, and both are made again from it;
under ``retrain`` the oracle's own strategy made them from the retrained models. The synthesis
runs lazily, in the first training round that needs the set (so a replay of several task ends
synthesises once, from the last), and draws its labels from the seen classes minus the
classes erased on every client (read from the round's ``fedcl.erased-classes``): no image is
made to look like an erased class. A class erased on some clients only stays (the others still
hold it).

**Scenario.** Class-IL only, the paper's. Task-IL has no joint label space over the old tasks
for the generator's cross-entropy (one softmax per head; a per-head synthesis would be a method
of our own), nor domain-IL a split of old and new classes (every task has the same classes, so
"CE on the new logits only" is undefined); FedLwF covers both without synthetic data.

**Defaults.** The code's CIFAR-100 values, except where a CPU run on MNIST needs smaller
ones: ``synthesis_batch`` 128 (code 256, so 10 calls make 1,280 images, not 2,560) and
``generator_width`` 32 (code 64); with them a synthesis against the MLP takes 12-18 s on a
2-core CPU, about a quarter of the code's sizes' time, for the same Split-MNIST accuracy in a
10-client, 3-rounds-per-task run (ACC 52.8 % either way). As in the code on CIFAR-100,
``warmup`` 20 > ``synthesis_calls`` 10: no student and no L_adv run (METHODS.md 16.2);
``warmup=0`` turns them on (``student_steps`` 400 each call, the most expensive part). The
code's sizes: ``synthesis_batch=256 generator_width=64``.

**Batch norm.** L_BN reads the teacher's ``BatchNorm1d/2d/3d`` layers (the code: 2d only).
fedcl's MLP and small CNN have none: L_BN is then 0 and the generator learns from the
cross-entropy (and L_adv when on) alone; ``resnet18`` has batch norm.

Deviations from the code, beside the defaults above:

* an epoch covers all of a client's real data, pairing each real batch with the next
  synthetic batch (a new permutation of the set whenever it is used up); the code zips the two
  loaders, so its epoch ends with the shorter one (about 6 real batches on CIFAR-100).
  ``synthetic_batch`` 0 sizes the synthetic batch as the code means to, ``N //
  real batches per epoch`` (the code's ``nums / ceil(N_real / batch)`` with ``nums`` 8000),
  but never below the run's ``batch_size`` (or the whole set when it is smaller): a small set
  spread over many real batches gave batches of one image, and one image at weight 25
  diverged to NaN within 30 steps (64 images, 41 real batches of 64, lr 0.01);
* ``synthetic_size`` > 0 sends a seeded uniform subset of that many of the images made (the
  code keeps the first ``nums`` files by name), and the student trains on all of them;
* aggregation is uniform over the replying clients (the code's ``average_weights``) by default,
  ``weighting=samples`` for FedAvg's sample-weighted mean; the local optimizer is the run's
  (the code: SGD lr 0.01, momentum 0.9, weight decay 5e-4, 5 epochs, batch 128);
* the teacher's and student's logits are those of the classes seen so far (the code's
  network has no others); the student is re-initialised as the code's ``weight_init`` (Xavier
  normal weights, N(0, 1) Linear biases, N(1, 0.02) BN scales); ``reset_l0`` at call 120 and the
  Tiny-ImageNet setting's Reptile step are left out;
* the crop pads with zeros (kornia's default) and flips only with ``augment_flip`` (digits
  are not mirror-symmetric: off by default; the code flips CIFAR images); the clients' real
  batches are not augmented (fedcl's loop; the code crops and flips them too);
* the synthesis is seeded from the run's seed and the task, reproducible on the CPU.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.nn import functional as F

from fedcl.api import (
    Capabilities,
    ConfigError,
    ContinualStrategy,
    LocalTrainer,
    RoundContext,
    RoundInfo,
    build_model,
    build_scenario,
    flower_kwargs,
    protocol,
    register_strategy,
)
from strategies.baselines.maths import (
    BNStatisticsHooks,
    SynthesisGenerator,
    accumulate_meta_gradients,
    adversarial_disagreement,
    class_cross_entropy,
    frozen_copy,
    kl_distillation,
    quantise_images,
    random_crop_flip,
    target_client_loss,
)

TEACHER = "target.teacher"  # ArrayRecord server -> clients: the previous task's global model
SYNTHETIC = "target.synthetic"  # ArrayRecord server -> clients: the synthetic set
IMAGES = "images"  # its one array: uint8 [N, C, H, W]
EVERY_CLIENT = -1  # the client of a class erased everywhere in fedcl.erased-classes
WEIGHTINGS = ("uniform", "samples")


@dataclass(frozen=True)
class TargetParams:
    kd_weight: float = 25.0
    """Weight of the clients' distillation on synthetic data (TARGET: 25)."""
    temperature: float = 2.0
    """Temperature of the clients' distillation (TARGET: 2)."""
    synthesis_calls: int = 10
    """Synthesis calls per task end, each adding one batch to the set (TARGET's syn_round:
    10 on CIFAR-100)."""
    synthesis_batch: int = 128
    """Images per synthesis call (TARGET: 256; 128 here for a CPU)."""
    synthetic_size: int = 0
    """Images sent to the clients: 0 = all made (synthesis_calls x synthesis_batch), else a
    seeded uniform subset of that many."""
    synthetic_batch: int = 0
    """Synthetic images per client step: 0 = the set's size over the real batches of an epoch
    (TARGET's sizing), at least the run's batch_size (or the whole set), else this many."""
    generator_steps: int = 10
    """Adam steps of the generator clone and latents per call (TARGET's g_steps: 10)."""
    student_steps: int = 400
    """Distillation steps of the server's student per call from call warmup on (TARGET's
    kd_steps: 400)."""
    warmup: int = 20
    """First call (from 0) with the student and L_adv (TARGET: 20, more than its 10 calls)."""
    lr_generator: float = 0.002
    """Adam learning rate of the generator clone (the meta step's is it x generator_steps)."""
    lr_latent: float = 0.01
    """Adam learning rate of the latents z."""
    bn_weight: float = 10.0
    """Weight of L_BN (TARGET: 10 on CIFAR-100); 0 in effect for a teacher without batch norm."""
    ce_weight: float = 0.5
    """Weight of the teacher's cross-entropy to the drawn labels (TARGET's oh: 0.5)."""
    adv_weight: float = 1.0
    """Weight of L_adv, the student-teacher disagreement (TARGET: 1.0)."""
    bn_momentum: float = 0.9
    """Blend of the batch statistics across calls in L_BN (TARGET's bn_mmt: 0.9)."""
    student_temperature: float = 20.0
    """Temperature of the student's distillation on the server (TARGET: 20)."""
    latent_dim: int = 256
    """Size of the generator's input z (TARGET: 256)."""
    generator_width: int = 32
    """Generator channels w (2w, then w; TARGET's ngf: 64, 32 here for a CPU)."""
    augment_pad: int = 4
    """Zero padding of the random crop before the teacher (TARGET: 4); 0 = no crop."""
    augment_flip: bool = False
    """Random horizontal flips as well (TARGET on CIFAR: yes; off for digits)."""
    weighting: str = "uniform"
    """Client weights of the average: uniform (TARGET's code) or samples (FedAvg's)."""

    def check(self) -> None:
        for name in ("synthesis_calls", "synthesis_batch", "generator_steps", "latent_dim",
                     "generator_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"target {name} must be >= 1, got {getattr(self, name)}")
        for name in ("synthetic_size", "synthetic_batch", "student_steps", "warmup",
                     "augment_pad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"target {name} must be >= 0, got {getattr(self, name)}")
        for name in ("kd_weight", "bn_weight", "ce_weight", "adv_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"target {name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "student_temperature", "lr_generator", "lr_latent"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"target {name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.bn_momentum < 1:
            raise ConfigError(f"target bn_momentum must be in [0, 1), got {self.bn_momentum}")
        made = self.synthesis_calls * self.synthesis_batch
        if self.synthetic_size > made:
            raise ConfigError(f"target synthetic_size {self.synthetic_size} is more than the "
                              f"{made} images made (synthesis_calls {self.synthesis_calls} x "
                              f"synthesis_batch {self.synthesis_batch})")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"target weighting must be uniform or samples, got "
                              f"'{self.weighting}'")


# ---------------------------------------------------------------------------------------------
# Synthesis on the server
# ---------------------------------------------------------------------------------------------
def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Images in [0, 1] ``[B, C, H, W]`` normalised per channel, as fedcl feeds its models."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m) / s


def reinitialise(model: nn.Module) -> nn.Module:
    """``model``'s weights drawn afresh as TARGET's ``weight_init`` draws its student's: Xavier
    normal weights of Linear and Conv layers, N(0, 1) Linear and Conv biases, batch-norm
    scales N(1, 0.02) and shifts 0 (torch's global RNG). Returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            if m.weight is not None:
                nn.init.normal_(m.weight, mean=1.0, std=0.02)
                nn.init.zeros_(m.bias)
    return model


@dataclass
class SynthesisResult:
    """What one task end's synthesis made: the images (uint8 ``[N, C, H, W]``, on the CPU),
    the label each was drawn for (``[N]``, never sent), and how it went."""

    images: torch.Tensor
    labels: torch.Tensor
    call_losses: list[tuple[float, float]] = field(default_factory=list)  # (first, best)
    teacher_agreement: float = 0.0  # the share of images the teacher gives their drawn label
    bn_layers: int = 0
    seconds: float = 0.0


class Synthesizer:
    """TARGET's synthesis at one task end (its ``GlobalSynthesizer`` and ``data_generation``):
    the generator, the student and their optimizers, against ``teacher`` (put in eval mode,
    its parameters frozen), whose logits ``columns`` (the classes seen so far) are the ones
    read; labels are drawn uniformly from ``labels`` (a subset of ``columns``). Images have
    ``input_shape`` (C, H, W) and the model reads them normalised with ``mean`` / ``std``.
    Every draw comes from a CPU generator seeded with ``seed``, every weight initialisation
    from torch's CPU RNG seeded with it too (restored afterwards)."""

    def __init__(self, teacher: nn.Module, columns: list[int], labels: list[int],
                 input_shape: tuple[int, int, int], mean: tuple[float, ...],
                 std: tuple[float, ...], params: TargetParams, seed: int,
                 device: torch.device) -> None:
        if not labels or not set(labels) <= set(columns):
            raise ValueError(f"synthesis labels {labels} must be a non-empty subset of the "
                             f"columns {columns}")
        self.params, self.device = params, device
        self.mean, self.std, self.input_shape = mean, std, input_shape
        self.teacher = teacher.to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.columns = torch.tensor(columns, dtype=torch.long, device=device)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.rng = torch.Generator().manual_seed(seed)
        with self._own_rng():
            torch.manual_seed(seed)
            self.generator = SynthesisGenerator(input_shape, params.latent_dim,
                                                params.generator_width).to(device).train()
            self.student = reinitialise(copy.deepcopy(self.teacher)).to(device)
        for p in self.student.parameters():
            p.requires_grad_(True)
        self.meta_optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=params.lr_generator * params.generator_steps,
            betas=(0.5, 0.999))
        self.student_optimizer = torch.optim.SGD(self.student.parameters(), lr=0.2,
                                                 momentum=0.9, weight_decay=1e-4)
        self.student_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.student_optimizer, 200, eta_min=2e-4)
        self.hooks = BNStatisticsHooks(self.teacher, params.bn_momentum)
        self.pool: list[torch.Tensor] = []
        self.pool_labels: list[torch.Tensor] = []
        self.calls = 0

    def _own_rng(self):  # type: ignore[no-untyped-def]
        """torch's global RNG (and the GPU's, when synthesising on one) restored afterwards:
        the seeding inside leaves the caller's draws as they were."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda"
                                     else [])

    def _teacher_view(self, x: torch.Tensor) -> torch.Tensor:
        """The augmented, normalised input the teacher (and student) read."""
        p = self.params
        return normalise(random_crop_flip(x, p.augment_pad, p.augment_flip, self.rng),
                         self.mean, self.std)

    def call(self) -> tuple[float, float]:
        """One synthesis call: ``generator_steps`` steps of a generator clone and fresh latents,
        the lowest-loss batch added to the pool (quantised), the base generator's meta step and
        the L_BN statistics' blend. Returns the call's (first, lowest) loss."""
        p, device = self.params, self.device
        adversarial = p.adv_weight > 0 and self.calls >= p.warmup
        self.student.eval()
        z = torch.randn(p.synthesis_batch, p.latent_dim, generator=self.rng).to(device)
        z.requires_grad_(True)
        drawn = self.labels[torch.randint(len(self.labels), (p.synthesis_batch,),
                                          generator=self.rng)]
        targets = (drawn.to(device)[:, None] == self.columns[None, :]).int().argmax(dim=1)
        fast = copy.deepcopy(self.generator)
        for q in fast.parameters():
            q.grad = None
        optimizer = torch.optim.Adam([{"params": fast.parameters()},
                                      {"params": [z], "lr": p.lr_latent}],
                                     lr=p.lr_generator, betas=(0.5, 0.999))
        best: torch.Tensor | None = None
        best_cost = first = math.inf
        for step in range(p.generator_steps):
            x = fast(z)
            view = self._teacher_view(x)
            t_out = self.teacher(view)[:, self.columns]
            loss = p.bn_weight * self.hooks.loss(t_out) + p.ce_weight * F.cross_entropy(
                t_out, targets)
            if adversarial:
                s_out = self.student(view)[:, self.columns]
                loss = loss + p.adv_weight * adversarial_disagreement(s_out, t_out)
            cost = float(loss.detach())
            if step == 0:
                first = cost
            if best is None or cost < best_cost:
                best_cost, best = cost, x.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                self.meta_optimizer.zero_grad(set_to_none=True)
            accumulate_meta_gradients(self.generator, fast)
            if step == p.generator_steps - 1:
                self.meta_optimizer.step()
            optimizer.step()
        self.student.zero_grad(set_to_none=True)
        self.hooks.update_momentum()
        assert best is not None
        self.pool.append(quantise_images(best))
        self.pool_labels.append(drawn)
        self.calls += 1
        return first, best_cost

    def train_student(self) -> float:
        """``student_steps`` distillation steps of the student from the teacher on the pool
        (shuffled batches of ``synthesis_batch``, a new pass whenever one ends; augmented as
        the teacher's input), then one step of its cosine schedule. Returns the last loss."""
        p = self.params
        pool = torch.cat(self.pool)
        self.student.train()
        order = torch.randperm(len(pool), generator=self.rng)
        cursor, loss = 0, torch.zeros(())
        for _ in range(p.student_steps):
            if cursor >= len(pool):
                order, cursor = torch.randperm(len(pool), generator=self.rng), 0
            rows = order[cursor:cursor + p.synthesis_batch]
            cursor += p.synthesis_batch
            x = self._teacher_view(pool[rows].to(self.device).float() / 255.0)
            with torch.no_grad():
                t_out = self.teacher(x)[:, self.columns]
            loss = kl_distillation(self.student(x)[:, self.columns], t_out,
                                   p.student_temperature)
            self.student_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.student_optimizer.step()
        self.student_schedule.step()
        return float(loss.detach())

    def run(self) -> SynthesisResult:
        """Every call, with the student's distillation after each from call ``warmup`` on;
        the images kept (``synthetic_size``) and how the teacher labels them."""
        started = time.monotonic()
        p = self.params
        losses = []
        with self._own_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.rng)))
            for i in range(p.synthesis_calls):
                losses.append(self.call())
                if i >= p.warmup and p.student_steps > 0:
                    self.train_student()
        self.hooks.remove()
        images, labels = torch.cat(self.pool), torch.cat(self.pool_labels)
        if 0 < p.synthetic_size < len(images):
            keep = torch.randperm(len(images), generator=self.rng)[:p.synthetic_size].sort()[0]
            images, labels = images[keep], labels[keep]
        agreement = self.agreement(images, labels)
        return SynthesisResult(images, labels, losses, agreement, len(self.hooks),
                               time.monotonic() - started)

    @torch.no_grad()
    def agreement(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The share of ``images`` (uint8, not augmented) whose teacher prediction among the
        columns is the label they were drawn for."""
        hits = 0
        for start in range(0, len(images), 512):
            x = normalise(images[start:start + 512].to(self.device).float() / 255.0,
                          self.mean, self.std)
            pred = self.columns[self.teacher(x)[:, self.columns].argmax(dim=1)].cpu()
            hits += int((pred == labels[start:start + 512]).sum())
        return hits / max(len(images), 1)


def synthesis_seed(seed: int, task: int) -> int:
    """The synthesis's seed after task ``task`` of a run seeded ``seed``."""
    return ((seed * 1_000_003 + task) * 1_000_003 + 7_919) % 2**63


def erased_everywhere(text: str) -> set[int]:
    """The classes erased on every client in a round's ``fedcl.erased-classes``
    (``client:class;...``, client -1 for every client)."""
    out = set()
    for part in text.split(";"):
        if part:
            client, _, klass = part.partition(":")
            if int(client) == EVERY_CLIENT:
                out.add(int(klass))
    return out


def resolve_device(name: str) -> torch.device:
    """The run's device setting as a device (``auto``: CUDA when there is a GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# The server half
# ---------------------------------------------------------------------------------------------
class Target(ContinualStrategy, FedAvg):
    """FedAvg (uniform by default); at each task end the global model becomes the teacher, and
    the synthetic set is made from it before the next task's first round; both go to the
    clients with every round of the later tasks."""

    # FedAvg's mean (a cohort could average, but TARGET's clients cannot train in cohorts); the
    # teacher and the synthetic set come from the global model alone, so after unlearning a
    # fresh strategy replays end_task on the unlearned model and synthesises from it
    capabilities = Capabilities(scenarios=("class-il",), fedavg_aggregate=True,
                                cohort_mean=True, task_end_state=False)

    def __init__(self, params: TargetParams, config: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params, self.config = params, config
        self.teacher: ArrayRecord | None = None
        self.teacher_task: int | None = None
        self.synthetic: torch.Tensor | None = None  # uint8 [N, C, H, W], once made
        self.excluded: list[int] = []  # classes left out of the last synthesis (erased)
        self.metrics: dict[str, float] = {}

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        self.teacher, self.teacher_task, self.synthetic = arrays, task, None
        return arrays

    def configure_round(self, info: RoundInfo, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """The round's messages, after the synthesis when the set is due (the first round
        after a task end), with the classes erased everywhere left out of its labels."""
        if self.teacher is not None and self.synthetic is None:
            self.synthesise(erased_everywhere(str(config.get(protocol.ERASED_CLASSES, ""))))
        return super().configure_round(info, arrays, config, grid)

    def synthesise(self, erased: Iterable[int] = ()) -> SynthesisResult:
        """Make the synthetic set from the teacher (the global model after task
        ``teacher_task``): labels over the classes of tasks 0..``teacher_task`` minus
        ``erased``. Raises RuntimeError before any task end."""
        if self.teacher is None or self.teacher_task is None:
            raise RuntimeError("TARGET synthesises only after a task end")
        scenario = build_scenario(self.config)
        model = build_model(self.config, scenario)
        model.load_state_dict(self.teacher.to_torch_state_dict())
        columns = sorted(c for t in scenario.tasks[:self.teacher_task + 1] for c in t.classes)
        gone = set(erased)
        labels = [c for c in columns if c not in gone] or columns
        self.excluded = sorted(set(columns) - set(labels))
        synthesizer = Synthesizer(model, columns, labels, scenario.dataset.input_shape,
                                  scenario.dataset.mean, scenario.dataset.std, self.params,
                                  synthesis_seed(self.config.seed, self.teacher_task),
                                  resolve_device(self.config.device))
        result = synthesizer.run()
        self.synthetic = result.images
        self.metrics = {
            "target_synthetic_images": float(len(result.images)),
            "target_synthetic_bytes": float(result.images.numel()),
            "target_synthesis_seconds": result.seconds,
            "target_teacher_agreement": result.teacher_agreement,
            "target_generator_loss": result.call_losses[-1][1],
            "target_bn_layers": float(result.bn_layers),
            "target_classes_left_out": float(len(self.excluded)),
        }
        return result

    def train_records(self, info: RoundInfo) -> dict[str, ArrayRecord | ConfigRecord]:
        if self.teacher is None or self.synthetic is None:
            return {}
        return {TEACHER: self.teacher, SYNTHETIC: ArrayRecord({IMAGES: self.synthetic})}

    def state_metrics(self) -> dict[str, float]:
        """The synthetic set the task just finished trained with (none after task 0): its
        images and bytes, the synthesis's seconds, the share of images the teacher gives the
        label they were made for, the last call's lowest generator loss, and the teacher's
        batch-norm layers that L_BN read, and how many seen classes its labels left out
        (erased on every client)."""
        return dict(self.metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.to_torch_state_dict(),
                "teacher_task": self.teacher_task, "synthetic": self.synthetic,
                "excluded": list(self.excluded), "metrics": dict(self.metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher = None if state["teacher"] is None else ArrayRecord(state["teacher"])
        self.teacher_task = state["teacher_task"]
        self.synthetic = state["synthetic"]
        self.excluded = list(state["excluded"])
        self.metrics = dict(state["metrics"])


# ---------------------------------------------------------------------------------------------
# The client half
# ---------------------------------------------------------------------------------------------
class TargetTrainer(LocalTrainer):
    """Cross-entropy over the current task's classes, plus, from the second task on,
    ``kd_weight`` times the distillation of the old classes' outputs on a synthetic batch per
    step towards the teacher in the round's message."""

    batchable = False  # its loss needs the synthetic batches and the teacher's outputs

    def __init__(self, params: TargetParams) -> None:
        self.params = params
        self._teacher: nn.Module | None = None
        self._synthetic: torch.Tensor | None = None  # uint8 [N, C, H, W] on the device
        self._new = self._old = torch.zeros(0, dtype=torch.long)
        self._batch = 0
        self._order = torch.zeros(0, dtype=torch.long)
        self._cursor = 0

    def before_training(self, ctx: RoundContext, model: nn.Module) -> None:
        """The current and old classes' columns, and from the second task on the frozen
        teacher and the synthetic set from the message (none without them: then the loss is
        the cross-entropy alone)."""
        scenario = ctx.scenario
        if scenario is None or scenario.kind != "class-il":
            raise ValueError("TARGET trains class-IL tasks only (RoundContext.scenario)")
        self._new = torch.tensor(sorted(scenario.tasks[ctx.task].classes), dtype=torch.long,
                                 device=ctx.device)
        self._old = torch.tensor(sorted(c for t in scenario.tasks[:ctx.task] for c in t.classes),
                                 dtype=torch.long, device=ctx.device)
        self._teacher = self._synthetic = None
        message = ctx.message
        if ctx.task == 0 or self.params.kd_weight == 0 or message is None:
            return
        teacher_record, synthetic_record = message.get(TEACHER), message.get(SYNTHETIC)
        if teacher_record is None or synthetic_record is None:
            return
        images = synthetic_record.to_torch_state_dict()[IMAGES]
        if len(images) == 0:
            return
        self._teacher = frozen_copy(model, teacher_record.to_torch_state_dict())
        self._synthetic = images.to(ctx.device)
        real_batches = max(1, math.ceil(int(ctx.y.shape[0]) / ctx.config.batch_size))
        self._batch = self.params.synthetic_batch or max(
            len(images) // real_batches, min(len(images), ctx.config.batch_size))

    def before_epoch(self, ctx: RoundContext, epoch: int) -> None:
        if self._synthetic is not None:
            self._order = torch.randperm(len(self._synthetic), generator=ctx.generator)
            self._cursor = 0

    def synthetic_batch(self, ctx: RoundContext) -> torch.Tensor:
        """The next synthetic batch, augmented and normalised (a new permutation of the set
        when it is used up)."""
        assert self._synthetic is not None
        if self._cursor >= len(self._synthetic):
            self._order = torch.randperm(len(self._synthetic), generator=ctx.generator)
            self._cursor = 0
        rows = self._order[self._cursor:self._cursor + self._batch].to(ctx.device)
        self._cursor += self._batch
        x = self._synthetic[rows].float() / 255.0
        x = random_crop_flip(x, self.params.augment_pad, self.params.augment_flip,
                             ctx.generator)
        return normalise(x, ctx.mean, ctx.std)

    def batch_loss(self, ctx: RoundContext, model: nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
        outputs = model(inputs, ctx.head)
        if self._teacher is None:
            return class_cross_entropy(outputs, targets, self._new)
        x_syn = self.synthetic_batch(ctx)
        syn_logits = model(x_syn, ctx.head)
        with torch.no_grad():
            teacher_logits = self._teacher(x_syn, ctx.head)
        ce, kd = target_client_loss(outputs, targets, self._new, syn_logits, teacher_logits,
                                    self._old, self.params.kd_weight, self.params.temperature)
        return ce + kd


@register_strategy("target", "TARGET: the server synthesises data from the global model at "
                   "each task end; clients distill the old classes on it from the previous "
                   "model (Zhang et al. 2023).", params=TargetParams, trainer=TargetTrainer)
def build_target(config: Any, params: TargetParams) -> Target:
    kwargs = flower_kwargs(config)
    if params.weighting == "uniform":
        kwargs["weighted_by_key"] = protocol.UNIT_WEIGHT
    return Target(params, config, **kwargs)


__all__ = ["Target", "TargetParams", "TargetTrainer", "build_target"]
