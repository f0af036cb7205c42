"""projection: forget-gradient projection, adapted from Geometric-Disentanglement Unlearning.

Geometric-disentanglement Unlearning (GU; Zhou, Zhang et al., arXiv 2511.17100) is an LLM
method, adapted here to cross-entropy gradients of a vision model in a federation. Each step
is one exchange with the clients:

* the client(s) holding the request's data send the gradient of their mean cross-entropy on
  the forget samples, and a sample of the other clients (``fraction_train`` of them, seeded per
  step) the gradient on their retain samples; the server averages each, weighted by samples;
* the forget direction is gradient *ascent* on the forget loss, ``g_f = -grad CE_f``; the server
  removes its component along the retain gradient ``g_r`` with one dot product over all
  parameters (:func:`fedcl.unlearning_math.project_forget_gradient`, GU's rank-1 projection), so to
  first order the retain loss does not change, and steps
  ``theta -= lr * (forget_weight * g_f_perp + retain_weight * g_r)`` (plain SGD: GU's Adam-metric
  whitening, step 2, is left out);
* it stops after ``steps`` steps, or once the forget loss reaches ``bound``. ``bound = 0``
  (auto) is, for a client or client-class erasure, the global model's cross-entropy on the
  test samples of the forget data's classes (what data the model never trained on scores: a
  retrained model sees the erased client's data as such); a class erased everywhere has no
  such reference and runs every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedcl import plugins
from fedcl.client_ops import ClientData, mean_gradient, operation
from fedcl.data.datasets import to_float
from fedcl.erasure import original_labels, original_test_labels, request_split
from fedcl.errors import ConfigError
from fedcl.plugins import register_unlearning
from fedcl.unlearning_api import UnlearningJob, UnlearningMethod
from fedcl.unlearning_math import project_forget_gradient, weighted_mean

GRAD_FORGET = "projection.grad-forget"
GRAD_RETAIN = "projection.grad-retain"
STATS = "projection.stats"


@dataclass(frozen=True)
class ProjectionParams:
    steps: int = 10
    """Most projected steps."""
    lr: float = 0.01
    """Step size."""
    forget_weight: float = 1.0
    """gamma: weight of the projected forget direction."""
    retain_weight: float = 1.0
    """alpha: weight of the retain gradient (descent on the retain loss)."""
    bound: float = 0.0
    """Stop once the forget cross-entropy reaches this; 0 = auto (see the module)."""

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"projection steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"projection lr must be positive, got {self.lr}")
        if self.bound < 0:
            raise ConfigError(f"projection bound must be >= 0, got {self.bound}")


@operation("projection.gradients")
def client_gradients(data: ClientData) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stats = ConfigRecord({"forget_n": 0, "retain_n": 0, "forget_loss": 0.0})
    for which, key in (("forget", GRAD_FORGET), ("retain", GRAD_RETAIN)):
        if data.count(which) and bool(data.settings[f"projection.{which}"]):
            grads, loss, n = mean_gradient(data, which)
            out[key] = ArrayRecord(grads)
            stats[f"{which}_n"] = n
            if which == "forget":
                stats["forget_loss"] = loss
    out[STATS] = stats
    return out


def test_loss(job: UnlearningJob, arrays: ArrayRecord, classes: set[int]) -> float:
    """The model's mean cross-entropy on the test samples of ``classes`` in the seen tasks."""
    scenario, config = job.scenario, job.config
    model = plugins.build_model(config, scenario)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for task in job.tasks:
            x, y = scenario.test_data(task, config.eval_samples_per_task, config.seed)
            keep = torch.isin(original_test_labels(scenario, task, y),
                              torch.tensor(sorted(classes), dtype=y.dtype))
            x, y = x[keep], y[keep]
            for start in range(0, len(y), 1000):
                xb = to_float(x[start:start + 1000], scenario.dataset.mean, scenario.dataset.std)
                logits = model(xb, scenario.head_for(task))
                total += float(torch.nn.functional.cross_entropy(
                    logits, y[start:start + 1000], reduction="sum"))
                n += len(xb)
    return total / n if n else math.inf


def forget_classes(job: UnlearningJob) -> set[int]:
    """The classes of the request's data."""
    req = job.request
    if req.klass is not None:
        return {req.klass}
    found: set[int] = set()
    for task in job.tasks:
        forget, _ = request_split(job.config, job.scenario, req, req.client, task,
                                  job.config.data_dir, job.before)
        found |= set(int(c) for c in np.unique(original_labels(job.scenario, task, forget)))
    return found


class Projection(UnlearningMethod):
    def unlearn(self, job: UnlearningJob) -> tuple[ArrayRecord, Any]:
        prm = self.params
        bound = prm.bound
        if bound == 0:
            bound = (math.inf if job.request.kind == "class"
                     else test_loss(job, job.arrays, forget_classes(job)))
        forget = job.forget_clients()
        retain = job.retain_clients()
        arrays = job.arrays
        self.steps_taken, self.forget_loss = 0, math.nan
        for step in range(prm.steps):
            sampled = job.sample(retain, step, salt=23)
            asked = sorted({*forget, *sampled})
            replies = job.ask(asked, "projection.gradients", arrays=arrays, required=forget,
                              **{"projection.forget": True, "projection.retain": True})
            f_parts, r_parts, f_loss = [], [], 0.0
            for pid, reply in replies.items():
                stats = reply[STATS]
                if pid in forget and int(stats["forget_n"]):
                    n = int(stats["forget_n"])
                    f_parts.append((n, reply[GRAD_FORGET].to_torch_state_dict()))
                    f_loss += n * float(stats["forget_loss"])
                if pid in sampled and int(stats["retain_n"]):
                    r_parts.append((int(stats["retain_n"]),
                                    reply[GRAD_RETAIN].to_torch_state_dict()))
            if not f_parts:
                raise ValueError("no client holds samples of the request")
            self.forget_loss = f_loss / sum(n for n, _ in f_parts)
            if self.forget_loss >= bound:
                break
            ascent = {k: -g for k, g in weighted_mean(f_parts).items()}
            g_r = weighted_mean(r_parts) if r_parts else {k: torch.zeros_like(g)
                                                     for k, g in ascent.items()}
            ortho = project_forget_gradient(ascent, g_r)
            state = arrays.to_torch_state_dict()
            for key in ortho:
                step_dir = prm.forget_weight * ortho[key] + prm.retain_weight * g_r[key]
                state[key] = state[key] - prm.lr * step_dir.to(state[key].dtype)
            arrays = ArrayRecord(state)
            self.steps_taken += 1
        self.bound = bound
        return arrays, None

    def report(self) -> dict[str, Any]:
        if not hasattr(self, "steps_taken"):
            return {}
        return {"steps": self.steps_taken,
                "forget_loss_bound": None if math.isinf(self.bound) else self.bound,
                "forget_loss_last": self.forget_loss}


@register_unlearning("projection", "Forget-gradient projection (adapted from "
                     "Geometric-Disentanglement Unlearning): gradient ascent on the forget data, "
                     "orthogonal to the retain gradient.", params=ProjectionParams)
def build_projection(params: ProjectionParams, out_dir: Any) -> Projection:
    return Projection(params, out_dir)
