"""Judging an erasure request: how far the unlearned model forgot, against the retrain oracle.

For the run's model and for the oracle's: accuracy on the erased training samples of the tasks
seen so far (``forget_acc``), on a seeded subset of the training samples every client keeps
(``retain_acc``) and on the test sets of those tasks less classes erased everywhere
(``test_acc``); a membership inference attack (``mia``: SSD's entropy attack, retain-train
samples as members and test samples as non-members, the share of forget samples judged
members); and the distance between the two (relative L2 distance of the weights, linear CKA of
the penultimate features on forget and retain samples). Maths: :mod:`fedcl.unlearning_math`.
The entry also says what the request changes in the test split the run is measured on
(``test_split``) and starts the forget set's accuracy curve (``forget_curve``), which the run
extends after every later round.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedcl.checkpoint import RunState
from fedcl.config import Config
from fedcl.data.datasets import to_float
from fedcl.data.scenarios import Scenario
from fedcl.erasure import ErasedData, ErasureRequest, original_test_labels, request_split
from fedcl.errors import FedclError
from fedcl.evaluation import Evaluator
from fedcl.unlearning_math import entropy_mia, linear_cka, prediction_entropy, relative_distance


class UnlearningFailed(FedclError):
    """An unlearning method failed; the global model before the request stays in force."""


def test_split(req: ErasureRequest) -> str:
    """What a request changes in the test split the run is measured on (summary.json's
    ``erasures[].test_split``)."""
    if req.kind == "client":
        return ("unchanged: test samples belong to no client, so a client's data cannot be "
                "separated from the test split; the erased client's training samples are "
                "tracked as forget_curve")
    if req.client is not None:
        return (f"unchanged: only client {req.client}'s samples of class {req.klass} are "
                "erased and the class stays learnable from the others; those samples are "
                "tracked as forget_curve")
    return (f"class {req.klass} left out of the test split of every task from now on (and of "
            "every row of the final accuracy matrix); its erased training samples are tracked "
            "as forget_curve")


class ErasureJudge:
    """Scores an unlearned model against the oracle's on one request's data (``judge(...)``).
    Uses the run's :class:`~fedcl.evaluation.Evaluator` (its model and test sets)."""

    def __init__(self, config: Config, scenario: Scenario, evaluator: Evaluator) -> None:
        self.config, self.scenario, self.evaluator = config, scenario, evaluator
        self.data_dir = config.data_dir

    def _samples(self, task: int, positions: np.ndarray, salt: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.config.eval_samples_per_task or 1000
        if len(positions) > cap:
            rng = np.random.default_rng([self.config.seed, task, salt])
            positions = np.sort(rng.choice(positions, size=cap, replace=False))
        return self.scenario.train_data(task, positions)

    def __call__(self, req: ErasureRequest, p: RunState, before: ErasedData,
                 after: ErasedData, arrays: ArrayRecord, oracle_arrays: ArrayRecord
                 ) -> dict[str, Any]:
        """The request's summary entry: ``request``, ``kind``, ``method``, ``round``, the
        model's ``forget_acc``, ``retain_acc``, ``test_acc`` (in [0, 1]) and ``mia`` (share of
        forget samples judged members), the same for the oracle under ``oracle``, and
        ``distance_to_oracle`` (``weights``: relative L2 distance; ``cka_forget``,
        ``cka_retain``: linear CKA of the penultimate features). Where the clients keep no
        training sample of the tasks seen (every class of them erased), ``retain_acc``,
        ``mia`` and ``cka_retain`` are None: there is nothing to measure them on. ``p``: the
        run before the
        request; ``before``/``after``: what was erased before it and with it. Raises
        :class:`UnlearningFailed` when no training sample is left to judge forgetting on."""
        # the tasks whose data the clients have held: those trained so far, and the current
        # one when the request comes at a round of it
        seen = list(range(p.task + 1 if p.task_started else p.task))
        forget, retain, test = self.sample_sets(req, before, after, seen)
        self.last_forget = forget  # the forget set, tracked after every later round
        if not forget:
            raise UnlearningFailed(f"erasure '{req.to_text()}': no training sample to judge "
                                   "forgetting on")
        model = self._scores(arrays, forget, retain, test)
        oracle = self._scores(oracle_arrays, forget, retain, test)
        distance = {
            "weights": relative_distance(arrays.to_torch_state_dict(),
                                         oracle_arrays.to_torch_state_dict()),
            "cka_forget": linear_cka(model.pop("_f_forget"), oracle.pop("_f_forget")),
            "cka_retain": (linear_cka(model.pop("_f_retain"), oracle.pop("_f_retain"))
                           if retain else None)}
        return {"request": req.to_text(), "kind": req.kind, "method": self.config.unlearning,
                "round": p.global_round, **model, "oracle": oracle,
                "distance_to_oracle": distance, "tasks_seen": seen,
                "test_split": test_split(req),
                "forget_curve": [{"round": p.global_round, "acc": model["forget_acc"]}]}

    def sample_sets(self, req: ErasureRequest, before: ErasedData, after: ErasedData,
                    seen: list[int]) -> tuple[list, list, list]:
        """(forget, retain, test) of the tasks ``seen``: the request's training samples, a
        seeded subset of those the clients keep, and the test sets less the classes erased
        everywhere; each a list of ``(task, x, y)``."""
        config, scenario = self.config, self.scenario
        gone = sorted(after.classes_everywhere())
        forget, retain, test = [], [], []
        for task in seen:
            splits = [request_split(config, scenario, req, c, task, self.data_dir, before)
                      for c in range(config.clients)]
            f_pos = np.sort(np.concatenate([f for f, _ in splits]))
            r_pos = np.sort(np.concatenate([r for _, r in splits]))
            if len(f_pos):
                forget.append((task, *self._samples(task, f_pos, 11)))
            if len(r_pos):
                retain.append((task, *self._samples(task, r_pos, 12)))
            x, y = self.evaluator.test[task]
            keep = ~torch.isin(original_test_labels(scenario, task, y).to(y.device),
                               torch.tensor(gone, dtype=y.dtype, device=y.device))
            test.append((task, x[keep], y[keep]))
        return forget, retain, test

    def forget_accuracy(self, arrays: ArrayRecord, forget: list) -> float | None:
        """Accuracy of the model ``arrays`` on a request's forget set (``sample_sets``)."""
        model = self.evaluator.model
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        correct = total = 0
        for task, x, y in forget:
            logits, _ = self._forward(model, x, self.scenario.head_for(task))
            correct += int((logits.argmax(1) == y.to(logits.device)).sum())
            total += len(y)
        return correct / total if total else None

    def _scores(self, arrays: ArrayRecord, forget: list, retain: list, test: list
                ) -> dict[str, Any]:
        """Accuracies, the MIA and penultimate features of one model."""
        model = self.evaluator.model
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        out: dict[str, Any] = {}
        ents: dict[str, list[torch.Tensor]] = {}
        feats: dict[str, list[torch.Tensor]] = {}
        for name, sets in (("forget", forget), ("retain", retain), ("test", test)):
            correct, total = 0, 0
            ents[name], feats[name] = [], []
            for task, x, y in sets:
                logits, feat = self._forward(model, x, self.scenario.head_for(task))
                correct += int((logits.argmax(1) == y.to(logits.device)).sum())
                total += len(y)
                ents[name].append(prediction_entropy(logits).cpu())
                feats[name].append(feat.cpu())
            out[f"{name}_acc"] = correct / total if total else None
        # the attack is fitted on retain-train samples (members) against test samples
        out["mia"] = (entropy_mia(torch.cat(ents["retain"]).numpy(),
                                  torch.cat(ents["test"]).numpy(),
                                  torch.cat(ents["forget"]).numpy())
                      if ents["retain"] and ents["test"] else None)
        out["_f_forget"] = torch.cat(feats["forget"])
        out["_f_retain"] = torch.cat(feats["retain"]) if feats["retain"] else None
        return out

    @torch.no_grad()
    def _forward(self, model: Any, x: torch.Tensor, head: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.scenario.dataset
        logits, feats = [], []
        for start in range(0, len(x), self.config.eval_batch_size):
            xb = to_float(x[start:start + self.config.eval_batch_size].to(self.evaluator.device),
                          ds.mean, ds.std)
            feats.append(model.features(xb))
            logits.append(model(xb, head))
        if not logits:
            empty = torch.zeros(0)
            return empty.reshape(0, 1), empty.reshape(0, 1)
        return torch.cat(logits), torch.cat(feats)


__all__ = ["ErasureJudge", "UnlearningFailed", "test_split"]
