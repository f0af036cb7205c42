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


# --------------------------------------------------------------------------------------------
# What is erased, and which samples that leaves
# --------------------------------------------------------------------------------------------
EVERY_CLIENT = -1  # the client of a class erased everywhere


@dataclass(frozen=True)
class ErasedData:
    """Everything erased so far: clients that left, and classes erased on every client
    (``(EVERY_CLIENT, k)``) or on one client (``(c, k)``)."""

    clients: tuple[int, ...] = ()
    classes: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, progress: Any) -> ErasedData:
        return cls(tuple(progress.erased_clients),
                   tuple((int(c), int(k)) for c, k in progress.erased_classes))

    def add(self, req: ErasureRequest) -> ErasedData:
        if req.kind == "client":
            return ErasedData(tuple(sorted({*self.clients, req.client})),  # type: ignore[arg-type]
                              self.classes)
        owner = EVERY_CLIENT if req.client is None else req.client
        return ErasedData(self.clients, (*self.classes, (owner, req.klass)))  # type: ignore[arg-type]

    def classes_of(self, client: int) -> set[int]:
        """The classes ``client`` must no longer train on."""
        return {k for c, k in self.classes if c in (EVERY_CLIENT, client)}

    def classes_everywhere(self) -> set[int]:
        return {k for c, k in self.classes if c == EVERY_CLIENT}

    def encode(self) -> str:
        """The class erasures as the clients receive them (erased clients never train)."""
        return ";".join(f"{c}:{k}" for c, k in self.classes)

    @classmethod
    def decode(cls, text: str) -> ErasedData:
        pairs = [part.split(":") for part in text.split(";") if part]
        return cls((), tuple((int(c), int(k)) for c, k in pairs))


def original_labels(scenario: Any, task: int, positions: np.ndarray) -> np.ndarray:
    """The dataset classes of task ``task``'s training samples at ``positions``."""
    idx = scenario.tasks[task].train_idx[positions]
    return scenario.dataset.train.y.numpy()[idx]


def held_positions(config: Any, scenario: Any, client: int, task: int, data_dir: str,
                   erased: ErasedData) -> np.ndarray:
    """Positions of task ``task``'s training samples that ``client`` still trains on: its
    partition less the classes erased for it (empty once the client is erased)."""
    from fedcl.data.partition import client_positions

    if client in erased.clients:
        return np.zeros(0, dtype=np.int64)
    positions = client_positions(config, client, task, data_dir)
    classes = erased.classes_of(client)
    if not classes:
        return positions
    return positions[~np.isin(original_labels(scenario, task, positions), sorted(classes))]


def request_split(config: Any, scenario: Any, req: ErasureRequest, client: int, task: int,
                  data_dir: str, before: ErasedData) -> tuple[np.ndarray, np.ndarray]:
    """(forget, retain) positions of ``client`` in task ``task`` for request ``req``: the samples
    the request erases, and those the client keeps after it (``before``: erased earlier)."""
    held = held_positions(config, scenario, client, task, data_dir, before)
    if req.kind == "client":
        mine = client == req.client
        return (held, held[:0]) if mine else (held[:0], held)
    if req.client is not None and client != req.client:
        return held[:0], held
    hit = original_labels(scenario, task, held) == req.klass
    return held[hit], held[~hit]


def check_requests_hold_data(config: Any, scenario: Any, requests: list[ErasureRequest],
                             data_dir: str) -> None:
    """Refuse (one line) a request whose data no client holds by its point in the stream: a
    class not trained before the request, or a client without samples of the class."""
    for req in requests:
        tasks = range(req.task + 1)
        if req.kind == "client":
            continue
        clients = range(config.clients) if req.client is None else [req.client]
        if not any(len(request_split(config, scenario, req, c, t, data_dir,
                                     ErasedData())[0]) for t in tasks for c in clients):
            who = "no client holds" if req.client is None else f"client {req.client} holds no"
            raise ConfigError(f"erasure '{req.to_text()}': {who} samples of class "
                              f"{req.klass} in tasks 0..{req.task}; nothing to erase")


# --------------------------------------------------------------------------------------------
# Carrying out requests in a run
# --------------------------------------------------------------------------------------------
class UnlearningFailed(FedclError):
    """An unlearning method failed; the global model before the request stays in force."""


class Erasures:
    """Carries out erasure requests in a running task loop with the run's unlearning method,
    and judges each against the retrain oracle.

    The oracle (Liu et al.'s federated retrain, research notes §9.2) replays every round run
    so far from the initial model with a fresh strategy, the same per-round sampling seeds and
    client seeds, erased clients left out of the pool each round samples from and erased
    classes left out of every client's data. With ``unlearning = "retrain"`` the run goes on
    from the oracle's model *and strategy*: under FOT the basis is rebuilt without the erased
    data, because the oracle's strategy built it from the replayed rounds alone. Other methods
    return their own model; the strategy state built from client payloads at task ends (FOT's
    basis, PRD's old model) is then rebuilt from it without the erased data
    (:meth:`rebuild_strategy`), unless the method rebuilt it itself (FedEraser's calibration
    walks every stored round with a fresh strategy).

    Metrics (summary.json ``erasures``): ``forget_acc`` on the erased training samples of the
    tasks seen so far, ``retain_acc`` on a seeded subset of the training samples every client
    keeps, ``test_acc`` on the test sets of those tasks (less classes erased everywhere),
    ``mia`` (SSD's entropy attack: retain-train samples are members, test samples non-members;
    the share of forget samples judged members), for the run's model and for the oracle;
    ``distance_to_oracle`` holds the relative L2 distance of the weights and linear CKA of the
    penultimate features on the forget and retain samples.
    """

    def __init__(self, grid: Any, config: Any, scenario: Any, evaluator: Any, tracker: Any,
                 out_dir: Any = None) -> None:
        from strategies import unlearning

        self.grid, self.config, self.scenario = grid, config, scenario
        self.evaluator, self.tracker = evaluator, tracker
        self.data_dir = config.data_dir
        self.method = unlearning.build(config, out_dir)

    @property
    def observes_rounds(self) -> bool:
        """Whether the unlearning method keeps each client's reply of the run's rounds
        (FedEraser's stored updates), so that cohorts must not average theirs."""
        from strategies.unlearning import UnlearningMethod

        return type(self.method).observe_round is not UnlearningMethod.observe_round

    def observe_round(self, p: Any, info: Any, arrays_before: Any, outcome: Any) -> None:
        """Every training round of the run passes here (FedEraser stores its updates)."""
        self.method.observe_round(info, arrays_before, outcome.ok, ErasedData.of(p))

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)

    def apply(self, req: ErasureRequest, p: Any, strategy: Any, roster: Any,
              cancel: threading.Event | None) -> Any:
        """Carry out ``req`` on the progress ``p``; returns the strategy to go on with. A
        failing method raises :class:`UnlearningFailed` and leaves ``p`` as it was."""
        from strategies import registry
        from strategies.unlearning import UnlearningJob

        name = self.config.unlearning
        log.warning("erasure: %s (%s)", req.describe(), name)
        before = ErasedData.of(p)
        after = before.add(req)
        seen = list(range(p.task + 1 if p.task_started else p.task))
        job = UnlearningJob(request=req, config=self.config, scenario=self.scenario,
                            grid=self.grid, roster=roster, cancel=cancel, arrays=p.arrays,
                            before=before, after=after, tasks=seen, progress=p)
        method_seconds = 0.0
        if name != "retrain":
            started = time.monotonic()
            try:
                arrays, method_strategy = self.method.unlearn(job)
                check_finite(arrays)
                if method_strategy is None:
                    method_strategy, arrays = self.rebuild_strategy(job, arrays)
            except (RunCancelled, KeyboardInterrupt):
                raise
            except Exception as err:
                reason = str(err) if isinstance(err, FedclError) else (
                    f"{type(err).__name__}: {err}")
                raise UnlearningFailed(f"unlearning '{name}' failed on erasure "
                                       f"'{req.to_text()}': {reason}; the global model before "
                                       "the request is kept in the checkpoint") from None
            method_seconds = time.monotonic() - started
        started = time.monotonic()
        oracle_strategy = registry.build(self.config)
        oracle_arrays = self.retrain(p, after, oracle_strategy, roster, cancel)
        oracle_seconds = time.monotonic() - started
        if name == "retrain":
            arrays, method_strategy, method_seconds = (oracle_arrays, oracle_strategy,
                                                       oracle_seconds)
        entry = self.judge(req, p, before, after, arrays, oracle_arrays)
        entry["seconds"] = method_seconds
        entry["oracle"]["seconds"] = oracle_seconds
        entry.update(self.method.report())
        p.erased_clients = list(after.clients)
        p.erased_classes = [list(pair) for pair in after.classes]
        p.erasures.append(entry)
        index = len(p.erasures) - 1
        flat = {f"erasure_{index}_{k}": float(v) for k, v in entry.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}
        flat.update({f"erasure_{index}_oracle_{k}": v for k, v in entry["oracle"].items()})
        flat.update({f"erasure_{index}_{k}": v
                     for k, v in entry["distance_to_oracle"].items()})
        self.tracker.log_metrics(flat, step=p.global_round)
        p.arrays = arrays
        return method_strategy

    def rebuild_strategy(self, job: Any, arrays: Any) -> tuple[Any, Any]:
        """A fresh strategy whose task-end state (FOT's basis, PRD's old model) is built again
        from ``arrays`` without the erased data: for every finished task, the clients of its
        last round (erased ones left out) send their task-end payloads without training, and
        the strategy's ``end_task`` takes them. Strategies without such state (FedAvg,
        FedProx) are simply built fresh."""
        from fedcl.server_app import RoundInfo, train_round
        from strategies import registry

        strategy = registry.build(self.config)
        if not strategy.state_dict():
            return strategy, arrays
        p, rounds = job.progress, self.config.rounds_per_task
        last_rounds = {r.task: r for r in p.records if r.task_round == rounds}
        for task in job.tasks:
            arrays = strategy.begin_task(task, arrays)
            record = last_rounds.get(task)
            if record is None:  # the current task, still running
                continue
            pids = [q for q in record.sampled if q not in job.after.clients]
            info = RoundInfo(task, rounds, rounds, record.round)
            train_round(self.grid, job.roster, strategy, self.config, self.config.to_json(),
                        arrays, info, pids, job.cancel, replay=True,
                        erased=job.after, train=False)
            arrays = strategy.end_task(task, arrays)
        return strategy, arrays

    def retrain(self, p: Any, erased: ErasedData, strategy: Any, roster: Any,
                cancel: threading.Event | None) -> Any:
        """The oracle: every round so far again, from the initial model, without the erased
        data."""
        from flwr.app import ArrayRecord

        from fedcl.server_app import RoundInfo, sample_clients, train_round
        from strategies import registry

        config = self.config
        rng = torch.get_rng_state()
        arrays = ArrayRecord(registry.build_model(config, self.scenario).state_dict())
        torch.set_rng_state(rng)
        pool = [q for q in range(config.clients) if q not in erased.clients]
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
                                 pids, cancel, replay=True, erased=erased).arrays
            if record.task_round == rounds:
                arrays = strategy.end_task(record.task, arrays)
        if p.task_started and p.task_round == 1:  # the current task began, none of its rounds
            arrays = strategy.begin_task(p.task, arrays)
        return arrays

    # --- judging --------------------------------------------------------------------------
    def _samples(self, task: int, positions: np.ndarray, salt: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.config.eval_samples_per_task or 1000
        if len(positions) > cap:
            rng = np.random.default_rng([self.config.seed, task, salt])
            positions = np.sort(rng.choice(positions, size=cap, replace=False))
        return self.scenario.train_data(task, positions)

    def judge(self, req: ErasureRequest, p: Any, before: ErasedData, after: ErasedData,
              arrays: Any, oracle_arrays: Any) -> dict[str, Any]:
        from fedcl.unlearning import linear_cka, relative_distance

        config, scenario = self.config, self.scenario
        # the tasks whose data the clients have held: those trained so far, and the current
        # one when the request comes at a round of it
        seen = list(range(p.task + 1 if p.task_started else p.task))
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
        if not forget:
            raise UnlearningFailed(f"erasure '{req.to_text()}': no training sample to judge "
                                   "forgetting on")
        model = self._scores(arrays, forget, retain, test)
        oracle = self._scores(oracle_arrays, forget, retain, test)
        distance = {
            "weights": relative_distance(arrays.to_torch_state_dict(),
                                         oracle_arrays.to_torch_state_dict()),
            "cka_forget": linear_cka(model.pop("_f_forget"), oracle.pop("_f_forget")),
            "cka_retain": linear_cka(model.pop("_f_retain"), oracle.pop("_f_retain"))}
        return {"request": req.to_text(), "kind": req.kind, "method": config.unlearning,
                "round": p.global_round, **model, "oracle": oracle,
                "distance_to_oracle": distance}

    def _scores(self, arrays: Any, forget: list, retain: list, test: list) -> dict[str, Any]:
        """Accuracies, the MIA and penultimate features of one model."""
        from fedcl.unlearning import entropy_mia, prediction_entropy

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
            out[f"{name}_acc"] = correct / total if total else 0.0
        out["mia"] = entropy_mia(torch.cat(ents["retain"]).numpy(),
                                 torch.cat(ents["test"]).numpy(),
                                 torch.cat(ents["forget"]).numpy())
        out["_f_forget"] = torch.cat(feats["forget"])
        out["_f_retain"] = torch.cat(feats["retain"])
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


def original_test_labels(scenario: Any, task: int, y: torch.Tensor) -> torch.Tensor:
    """Dataset classes of head targets ``y`` of task ``task`` (task-IL targets are positions
    in the task's class list)."""
    if scenario.kind != "task-il":
        return y
    classes = torch.tensor(scenario.tasks[task].classes, dtype=y.dtype, device=y.device)
    return classes[y]


def check_finite(arrays: Any) -> None:
    for key, value in arrays.to_torch_state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FedclError(f"the unlearned model's {key} is not finite (the method "
                             f"diverged; a smaller step may help)")


__all__ = ["ErasedData", "ErasureRequest", "Erasures", "UnlearningFailed",
           "held_positions", "parse_erasure", "parse_schedule", "request_split",
           "validate_requests"]
