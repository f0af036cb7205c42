"""Erasure requests in the task stream: what to forget, and when.

A request names the data (a client's, a class's everywhere, or one client's share of one
class) and a point in the stream: after task ``t``'s last round, or at round ``r`` of task
``t`` (before that round trains). Tasks count from 0, as in summary.json; rounds within a
task from 1. The text form (``--erase``) is a comma-separated list of ``key=value``::

    client=7,after-task=2         client 7 leaves; all its data is forgotten
    class=3,after-task=2          class 3 is forgotten on every client
    client=7,class=3,task=1,round=5   client 7's samples of class 3, at round 5 of task 1

:func:`validate_requests` checks a whole schedule against the run before anything starts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedcl.errors import ConfigError, FedclError, RunCancelled

log = logging.getLogger("fedcl")

_KEYS = ("client", "class", "after-task", "task", "round")


@dataclass(frozen=True)
class ErasureRequest:
    """One request. ``client`` and/or ``klass`` say what; ``task`` and ``round`` say when
    (``round`` None: after the task's last round)."""

    client: int | None
    klass: int | None
    task: int
    round: int | None = None

    @property
    def kind(self) -> str:
        if self.klass is None:
            return "client"
        return "class" if self.client is None else "client-class"

    def point(self, rounds_per_task: int) -> tuple[int, int]:
        """(task, round before which it applies); after a task = before the next task's first
        round, ordered after every round of the task."""
        return (self.task, rounds_per_task + 1) if self.round is None else (self.task,
                                                                            self.round)

    def describe(self) -> str:
        what = {"client": f"client {self.client}", "class": f"class {self.klass}",
                "client-class": f"client {self.client}'s class {self.klass}"}[self.kind]
        when = (f"after task {self.task}" if self.round is None
                else f"at round {self.round} of task {self.task}")
        return f"{what} {when}"

    def to_text(self) -> str:
        parts = [] if self.client is None else [f"client={self.client}"]
        parts += [] if self.klass is None else [f"class={self.klass}"]
        parts += ([f"after-task={self.task}"] if self.round is None
                  else [f"task={self.task}", f"round={self.round}"])
        return ",".join(parts)


def parse_erasure(text: str) -> ErasureRequest:
    """An :class:`ErasureRequest` from its text form; one-line :class:`ConfigError` if bad."""
    fields: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise ConfigError(f"erasure {text!r}: {part!r} is not one of "
                              f"{', '.join(k + '=N' for k in _KEYS)}")
        if key in fields:
            raise ConfigError(f"erasure {text!r}: {key} given twice")
        try:
            number = int(value.strip())
        except ValueError:
            raise ConfigError(f"erasure {text!r}: {key} must be an integer, got "
                              f"{value.strip()!r}") from None
        if number < (1 if key == "round" else 0):
            raise ConfigError(f"erasure {text!r}: {key} must be "
                              f"{'1 or more' if key == 'round' else '0 or more'}")
        fields[key] = number
    if "client" not in fields and "class" not in fields:
        raise ConfigError(f"erasure {text!r}: say what to erase (client=N, class=N or both)")
    if "after-task" in fields:
        if "task" in fields or "round" in fields:
            raise ConfigError(f"erasure {text!r}: give after-task=T, or task=T with round=R, "
                              "not both")
        task, round_ = fields["after-task"], None
    elif "task" in fields and "round" in fields:
        task, round_ = fields["task"], fields["round"]
    else:
        raise ConfigError(f"erasure {text!r}: say when (after-task=T, or task=T with round=R)")
    return ErasureRequest(fields.get("client"), fields.get("class"), task, round_)


def parse_schedule(text: str) -> list[ErasureRequest]:
    """Requests separated by ';' (empty parts ignored)."""
    return [parse_erasure(part) for part in text.split(";") if part.strip()]


def validate_requests(requests: list[ErasureRequest], *, clients: int, tasks: int,
                      rounds_per_task: int, classes: int) -> None:
    """Refuse (one-line :class:`ConfigError`) a schedule that names an unknown client or class,
    a point outside the run, data erased twice, or that would erase every client or class."""
    erased_clients: set[int] = set()
    erased_classes: set[int] = set()
    erased_pairs: set[tuple[int, int]] = set()
    order = sorted(requests, key=lambda r: r.point(rounds_per_task))
    for req in order:
        where = f"erasure '{req.to_text()}'"
        if req.client is not None and not 0 <= req.client < clients:
            raise ConfigError(f"{where}: no client {req.client} (clients are 0..{clients - 1})")
        if req.klass is not None and not 0 <= req.klass < classes:
            raise ConfigError(f"{where}: no class {req.klass} (classes are 0..{classes - 1})")
        if not 0 <= req.task < tasks:
            raise ConfigError(f"{where}: task {req.task} is outside the run "
                              f"(tasks are 0..{tasks - 1})")
        if req.round is not None and req.round > rounds_per_task:
            raise ConfigError(f"{where}: round {req.round} is outside task {req.task} "
                              f"(rounds are 1..{rounds_per_task})")
        if req.client is not None and req.client in erased_clients:
            raise ConfigError(f"{where}: client {req.client}'s data is already erased")
        if req.klass is not None and req.klass in erased_classes:
            raise ConfigError(f"{where}: class {req.klass} is already erased")
        if req.kind == "client-class" and (req.client, req.klass) in erased_pairs:
            raise ConfigError(f"{where}: client {req.client}'s class {req.klass} is already "
                              "erased")
        if req.kind == "client":
            erased_clients.add(req.client)  # type: ignore[arg-type]
        elif req.kind == "class":
            erased_classes.add(req.klass)  # type: ignore[arg-type]
        else:
            erased_pairs.add((req.client, req.klass))  # type: ignore[arg-type]
        if len(erased_clients) == clients:
            raise ConfigError(f"{where}: it would erase every client")
        if len(erased_classes) == classes:
            raise ConfigError(f"{where}: it would erase every class")


def due(schedule: list[ErasureRequest], task: int, round_: int, rounds_per_task: int
        ) -> list[ErasureRequest]:
    """The requests that apply before round ``round_`` of ``task`` (``rounds_per_task + 1``:
    after the task's last round)."""
    return [r for r in schedule if r.point(rounds_per_task) == (task, round_)]


# --------------------------------------------------------------------------------------------
# Carrying out requests in a run
# --------------------------------------------------------------------------------------------
class Erasures:
    """Carries out erasure requests in a running task loop and judges each against the retrain
    oracle.

    The oracle (Liu et al.'s federated retrain, research notes §9.2) replays every round run
    so far from the initial model with a fresh strategy, the same per-round sampling seeds and
    client seeds, and the erased clients left out of the pool each round samples from. With
    ``unlearning = "retrain"`` the run goes on from the oracle's model *and strategy*: under
    FOT the basis is rebuilt without the erased client's representations, because the
    oracle's strategy built it from the replayed rounds alone.

    Metrics (summary.json ``erasures``): ``forget_acc`` on the erased client's training samples
    of the tasks seen so far, ``retain_acc`` on a seeded subset of the other clients' training
    samples of those tasks, ``test_acc`` on their test sets, ``mia`` (SSD's entropy attack:
    retain-train samples are members, test samples non-members; the share of forget samples
    judged members), for the run's model and for the oracle; ``distance_to_oracle`` holds the
    relative L2 distance of the weights and linear CKA of the penultimate features on the forget
    and retain samples.
    """

    def __init__(self, grid: Any, config: Any, scenario: Any, evaluator: Any, tracker: Any
                 ) -> None:
        self.grid, self.config, self.scenario = grid, config, scenario
        self.evaluator, self.tracker = evaluator, tracker
        self.data_dir = config.data_dir

    def apply(self, req: ErasureRequest, p: Any, strategy: Any, roster: Any,
              cancel: threading.Event | None) -> Any:
        """Carry out ``req`` on the progress ``p``; returns the strategy to go on with."""
        from strategies import registry

        log.warning("erasure: %s (%s)", req.describe(), self.config.unlearning)
        p.erased_clients = sorted({*p.erased_clients, req.client})
        started = time.monotonic()
        oracle_strategy = registry.build(self.config)
        oracle_arrays = self.retrain(p, oracle_strategy, roster, cancel)
        oracle_seconds = time.monotonic() - started
        # the only method so far is the oracle itself
        arrays, method_strategy, seconds = oracle_arrays, oracle_strategy, oracle_seconds
        entry = self.judge(req, p, arrays, oracle_arrays)
        entry["seconds"] = seconds
        entry["oracle"]["seconds"] = oracle_seconds
        p.erasures.append(entry)
        index = len(p.erasures) - 1
        flat = {f"erasure_{index}_{k}": v for k, v in entry.items()
                if isinstance(v, float)}
        flat.update({f"erasure_{index}_oracle_{k}": v for k, v in entry["oracle"].items()})
        flat.update({f"erasure_{index}_{k}": v
                     for k, v in entry["distance_to_oracle"].items()})
        self.tracker.log_metrics(flat, step=p.global_round)
        p.arrays = arrays
        return method_strategy

    def retrain(self, p: Any, strategy: Any, roster: Any, cancel: threading.Event | None
                ) -> Any:
        """The oracle: every round so far again, from the initial model, without the erased
        clients."""
        from flwr.app import ArrayRecord

        from fedcl.server_app import RoundInfo, sample_clients, train_round
        from strategies import registry

        config = self.config
        rng = torch.get_rng_state()
        arrays = ArrayRecord(registry.build_model(config, self.scenario).state_dict())
        torch.set_rng_state(rng)
        pool = [q for q in range(config.clients) if q not in p.erased_clients]
        config_json = config.to_json()
        rounds = config.rounds_per_task
        for record in p.records:
            if cancel is not None and cancel.is_set():
                raise RunCancelled("run cancelled")
            if record.task_round == 1:
                arrays = strategy.begin_task(record.task, arrays)
            pids = sample_clients(pool, config.fraction_train, config.seed, record.round)
            info = RoundInfo(record.task, record.task_round, rounds, record.round)
            arrays = train_round(self.grid, roster, strategy, config, config_json, arrays, info,
                                 pids, cancel, replay=True).arrays
            if record.task_round == rounds:
                arrays = strategy.end_task(record.task, arrays)
        if p.task_started and p.task_round == 1:  # the current task began, none of its rounds
            arrays = strategy.begin_task(p.task, arrays)
        return arrays

    # --- judging --------------------------------------------------------------------------
    def _samples(self, task: int, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.config.eval_samples_per_task or 1000
        if len(positions) > cap:
            rng = np.random.default_rng([self.config.seed, task, 11])
            positions = np.sort(rng.choice(positions, size=cap, replace=False))
        return self.scenario.train_data(task, positions)

    def judge(self, req: ErasureRequest, p: Any, arrays: Any, oracle_arrays: Any
              ) -> dict[str, Any]:
        from fedcl.data.partition import client_positions
        from fedcl.unlearning import relative_distance

        config = self.config
        # the tasks whose data the client has held: those trained so far, and the current one
        # when the request comes at a round of it
        seen = list(range(p.task + 1 if p.task_started else p.task))
        forget, retain, test = [], [], []
        for task in seen:
            mine = client_positions(config, req.client, task, self.data_dir)
            erased = np.concatenate([client_positions(config, c, task, self.data_dir)
                                     for c in p.erased_clients])
            others = np.setdiff1d(np.arange(len(self.scenario.tasks[task].train_idx)), erased)
            forget.append((task, *self._samples(task, mine)))
            retain.append((task, *self._samples(task, others)))
            test.append((task, *self.evaluator.test[task]))
        model = self._scores(arrays, forget, retain, test)
        oracle = self._scores(oracle_arrays, forget, retain, test)
        from fedcl.unlearning import linear_cka

        distance = {
            "weights": relative_distance(arrays.to_torch_state_dict(),
                                         oracle_arrays.to_torch_state_dict()),
            "cka_forget": linear_cka(model.pop("_f_forget"), oracle.pop("_f_forget")),
            "cka_retain": linear_cka(model.pop("_f_retain"), oracle.pop("_f_retain"))}
        return {"request": req.to_text(), "method": config.unlearning, "round": p.global_round,
                **model, "oracle": oracle, "distance_to_oracle": distance}

    def _scores(self, arrays: Any, forget: list, retain: list, test: list) -> dict[str, Any]:
        """Accuracies, the MIA and penultimate features of one model."""
        from fedcl.unlearning import entropy_mia, prediction_entropy

        model = self.evaluator.model
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        out: dict[str, Any] = {}
        parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, sets in (("forget", forget), ("retain", retain), ("test", test)):
            correct, total = 0, 0
            ents, feats = [], []
            for task, x, y in sets:
                logits, feat = self._forward(model, x, self.scenario.head_for(task))
                correct += int((logits.argmax(1) == y.to(logits.device)).sum())
                total += len(y)
                ents.append(prediction_entropy(logits).cpu())
                feats.append(feat.cpu())
            out[f"{name}_acc"] = correct / total if total else 0.0
            parts[name] = (ents, feats, [])
        if sum(len(e) for e in parts["forget"][0]) == 0:
            raise FedclError("the erased client holds no training samples to judge forgetting on")
        out["mia"] = entropy_mia(torch.cat(parts["retain"][0]).numpy(),
                                 torch.cat(parts["test"][0]).numpy(),
                                 torch.cat(parts["forget"][0]).numpy())
        out["_f_forget"] = torch.cat(parts["forget"][1])
        out["_f_retain"] = torch.cat(parts["retain"][1])
        return out

    @torch.no_grad()
    def _forward(self, model: Any, x: torch.Tensor, head: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        from fedcl.training import to_float

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


__all__ = ["ErasureRequest", "Erasures", "due", "parse_erasure", "parse_schedule",
           "validate_requests"]
