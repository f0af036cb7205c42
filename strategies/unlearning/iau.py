"""IAU: Influence Approximation Unlearning (Liu, Wu, Lian, Chen; arXiv 2507.23257), federated.

"Efficient Machine Unlearning via Influence Approximation": removing a sample is, to first
order, adding a counter-sample whose gradient is the negative of its own, so unlearning is one
incremental gradient step and the inverse Hessian of influence functions is never formed. The
method has two parts:

* **training** with the gradient-restriction (GR) loss, ``CE + alpha * sum over parameter
  tensors of ||grad CE||_2`` (alpha 0.005), which keeps gradients small so that one step
  approximates the removal well. In fedcl this is an option of every strategy's local
  training, the config field ``gradient_restriction`` (``--gradient-restriction 0.005``;
  :class:`fedcl.training.LocalTrainer`, :func:`fedcl.unlearning_math.gradient_restriction_term`),
  independent of ``--unlearning``: IAU works on a model trained without it too, less well by
  the paper's account;
* **the unlearning step** (this module): one optimizer step on ``L_r - L_f``, the mean
  cross-entropy on the retain data minus that on the forget data, at the global model the
  request finds.

Federated, in one exchange with the clients (raw data never leaves a client; only gradients
and sample counts do):

* the clients holding the request's data
  (:meth:`~fedcl.unlearning_api.UnlearningJob.forget_clients`) send ``grad`` of their mean
  cross-entropy on their forget samples, with their count;
* the clients that keep data (:meth:`~fedcl.unlearning_api.UnlearningJob.retain_clients`),
  or a seeded ``retain_fraction`` of them, send ``grad`` of their mean cross-entropy on their
  retain samples, with their count; a client in both sends both from one message;
* the server pools each, weighted by samples: ``g_f`` and ``g_r`` are exactly the gradients
  of the mean losses over the pooled forget and retain samples; then
  ``theta <- step(theta, g_r - g_f)``, one step of ``optimizer``.

What is forget and retain data per request, on each client, over the tasks seen so far
(:func:`fedcl.erasure.request_split`, as for SSD and projection):

* ``client=u``: client u's samples are all forget data, it has no retain data (it leaves);
  every other client's samples are retain data;
* ``class=c``: on every client still in the federation, its samples of class c are forget
  data and its other samples retain data;
* ``client=u,class=c``: client u's samples of class c are forget data; u's other samples and
  every other client's samples are retain data.

**Adam's first step.** The authors' code takes one step of a fresh ``torch.optim.Adam`` at lr
1e-3. With both moments zero and the bias corrections applied, that step is
``lr * g / (|g| + eps)``: about ``lr * sign(g)`` on every coordinate whose gradient is not tiny,
so each such parameter moves by about lr whatever its gradient's size, and the step's length
grows with the square root of the parameter count. ``optimizer = "adam"`` (the default)
implements that step exactly (:func:`fedcl.unlearning_math.fresh_adam_step`, eps 1e-8, betas
(0.9, 0.999) as PyTorch's, which cancel in the first step), to reproduce the method as its
authors ran it; ``optimizer = "sgd"`` takes the plain gradient step ``theta - lr * g`` instead
(:func:`fedcl.unlearning_math.sgd_step`), whose length follows the gradient's, the influence
approximation's own form; its lr needs tuning to the gradient's scale (lr 1e-3 on a
cross-entropy gradient barely moves a model).

Deviations from the paper:

1. the gradients are computed on the clients and pooled on the server, not in one batch on
   the whole retain and forget sets; pooled by samples, the result is the same gradient;
   with ``retain_fraction`` < 1 the retain gradient is that of the sampled clients' data only;
2. the gradients are those of the global model when the request comes, in eval mode (no
   dropout; batch norm's running statistics), each task's samples scored by its own head in
   task-IL (the paper has one task, one head);
3. the retrain oracle the request is judged against trains the way the run does, with the GR
   loss when the run uses it;
4. one request is one step; requests later in the stream each take their own, at the model
   they find.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedcl.client_ops import ClientData, mean_gradient, operation
from fedcl.errors import ConfigError
from fedcl.plugins import register_unlearning
from fedcl.unlearning_api import UnlearningJob, UnlearningMethod
from fedcl.unlearning_math import fresh_adam_step, sgd_step, weighted_mean

log = logging.getLogger("fedcl")

GRAD_FORGET = "iau.grad-forget"
GRAD_RETAIN = "iau.grad-retain"
STATS = "iau.stats"
FORGET_CLIENTS = "iau.forget-clients"  # settings: who sends which gradient
RETAIN_CLIENTS = "iau.retain-clients"
OPTIMIZERS = ("adam", "sgd")
SAMPLE_SALT = 29  # tells IAU's retain sample apart from other methods' (UnlearningJob.sample)


@dataclass(frozen=True)
class IAUParams:
    lr: float = 1e-3
    """Learning rate of the one unlearning step (the authors' code: 1e-3, with Adam)."""
    optimizer: str = "adam"
    """adam: a fresh Adam's first step, lr * g / (|g| + eps), about lr * sign(g) (the
    authors'); sgd: theta - lr * g."""
    retain_fraction: float = 1.0
    """Share of the clients that keep data asked for their retain gradient, in (0, 1]
    (at least one; seeded by the run seed and the request's round)."""

    def check(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"iau lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"iau optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                              f"'{self.optimizer}'")
        if not 0 < self.retain_fraction <= 1:
            raise ConfigError(f"iau retain_fraction must be in (0, 1], got "
                              f"{self.retain_fraction}")


@operation("iau.gradients")
def client_gradients(data: ClientData) -> dict[str, Any]:
    """The gradient of the client's mean cross-entropy on its forget samples (where the server
    lists it in ``iau.forget-clients``) and on its retain samples (``iau.retain-clients``),
    each with its sample count and loss in ``iau.stats``; a set with no sample sends
    nothing."""
    out: dict[str, Any] = {}
    stats = ConfigRecord({"forget_n": 0, "retain_n": 0, "forget_loss": 0.0,
                          "retain_loss": 0.0})
    for which, key, listed in (("forget", GRAD_FORGET, FORGET_CLIENTS),
                               ("retain", GRAD_RETAIN, RETAIN_CLIENTS)):
        asked = data.partition_id in [int(q) for q in data.settings[listed]]  # type: ignore[union-attr]
        if asked and data.count(which):
            grads, loss, n = mean_gradient(data, which)
            out[key] = ArrayRecord(grads)
            stats[f"{which}_n"] = n
            stats[f"{which}_loss"] = loss
    out[STATS] = stats
    return out


def pooled(parts: list[tuple[int, dict[str, torch.Tensor], float]]
           ) -> tuple[dict[str, torch.Tensor] | None, int, float | None]:
    """The sample-weighted mean gradient and loss of ``(count, gradient, loss)`` parts, and the
    total count; ``(None, 0, None)`` with none."""
    total = sum(n for n, _, _ in parts)
    if not total:
        return None, 0, None
    grad = weighted_mean([(n, g) for n, g, _ in parts])
    return grad, total, sum(n * loss for n, _, loss in parts) / total


class IAU(UnlearningMethod):
    def unlearn(self, job: UnlearningJob) -> tuple[ArrayRecord, Any]:
        prm = self.params
        forget = job.forget_clients()
        pool = job.retain_clients()
        sampled = (job.sample(pool, 0, salt=SAMPLE_SALT, fraction=prm.retain_fraction)
                   if pool else [])
        replies = job.ask(sorted({*forget, *sampled}), "iau.gradients", required=forget,
                          **{FORGET_CLIENTS: forget or [-1], RETAIN_CLIENTS: sampled or [-1]})
        f_parts, r_parts = [], []
        for pid, reply in replies.items():
            stats = reply[STATS]
            if pid in forget and int(stats["forget_n"]):
                f_parts.append((int(stats["forget_n"]),
                                reply[GRAD_FORGET].to_torch_state_dict(),
                                float(stats["forget_loss"])))
            if pid in sampled and int(stats["retain_n"]):
                r_parts.append((int(stats["retain_n"]),
                                reply[GRAD_RETAIN].to_torch_state_dict(),
                                float(stats["retain_loss"])))
        g_f, n_f, loss_f = pooled(f_parts)
        if g_f is None:
            raise ValueError("no client holds samples of the request")
        g_r, n_r, loss_r = pooled(r_parts)
        if g_r is None:
            log.warning("iau: no retain gradient (no answering client keeps data); the step "
                        "ascends the forget loss alone")
        direction = {k: (g_r[k] if g_r is not None else 0.0) - g for k, g in g_f.items()}
        state = job.arrays.to_torch_state_dict()
        if prm.optimizer == "adam":
            new = fresh_adam_step(state, direction, prm.lr)
        else:
            new = sgd_step(state, direction, prm.lr)
        self.numbers = {
            "forget_samples": n_f, "retain_samples": n_r,
            "retain_clients": len(r_parts), "forget_loss_before": loss_f,
            "retain_loss_before": loss_r,
            "step_norm": math.sqrt(sum(float(((new[k].double() - state[k].double()) ** 2).sum())
                                       for k in new))}
        state.update(new)
        return ArrayRecord(state), None

    def report(self) -> dict[str, Any]:
        """The step's inputs and size: forget and retain samples pooled, retain clients that
        sent a gradient, the mean losses at the model before the step (None without retain
        data), and the step's L2 norm over all parameters."""
        return dict(getattr(self, "numbers", {}))


@register_unlearning("iau", "Influence Approximation Unlearning: one optimizer step on the "
                     "retain loss minus the forget loss, from the clients' gradients; train "
                     "with --gradient-restriction 0.005 for the paper's setting (Liu et al. "
                     "2025).", params=IAUParams)
def build_iau(params: IAUParams, out_dir: Any) -> IAU:
    return IAU(params, out_dir)
