"""Erasure requests in the task stream: what to forget, when, and which samples that covers.

A request names the data (a client's, a class's everywhere, or one client's share of one
class) and a point in the stream: after task ``t``'s last round, or at round ``r`` of task
``t`` (before that round trains). Tasks count from 0, as in summary.json; rounds within a
task from 1. The text form (``--erase``) is a comma-separated list of ``key=value``::

    client=7,after-task=2         client 7 leaves; all its data is forgotten
    class=3,after-task=2          class 3 is forgotten on every client
    client=7,class=3,task=1,round=5   client 7's samples of class 3, at round 5 of task 1

:func:`validate_requests` checks a whole schedule against the run before anything starts.
Carrying requests out is :mod:`fedcl.unlearning_run`; judging them, :mod:`fedcl.erasure_judge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fedcl.config import Config
from fedcl.data.partition import client_positions
from fedcl.data.scenarios import Scenario
from fedcl.errors import ConfigError


class ErasureRecord(Protocol):
    """What a run records of its erasures (:class:`fedcl.checkpoint.RunState` does)."""

    erased_clients: list[int]
    erased_classes: list[list[int]]  # [client or EVERY_CLIENT, class]

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

    def label(self) -> str:
        """A short name (``fedcl compare``): ``client=7@t1`` (after task 1), ``class=3@t2``,
        ``client=3,class=1@t1r2`` (at round 2 of task 1)."""
        what = ",".join([*([] if self.client is None else [f"client={self.client}"]),
                         *([] if self.klass is None else [f"class={self.klass}"])])
        return f"{what}@t{self.task}" + ("" if self.round is None else f"r{self.round}")

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


def in_stream_order(requests: list[ErasureRequest], rounds_per_task: int
                    ) -> list[ErasureRequest]:
    """The requests in the order a run carries them out (:meth:`ErasureRequest.point`; those
    at the same point as given): the order of summary.json's ``erasures`` and of MLflow's
    ``erasure_<i>_*`` metrics."""
    return sorted(requests, key=lambda r: r.point(rounds_per_task))


def validate_requests(requests: list[ErasureRequest], *, clients: int, tasks: int,
                      rounds_per_task: int, classes: int) -> None:
    """Refuse (one-line :class:`ConfigError`) a schedule that names an unknown client or class,
    a point outside the run, data erased twice, or that would erase every client or class."""
    erased_clients: set[int] = set()
    erased_classes: set[int] = set()
    erased_pairs: set[tuple[int, int]] = set()
    for req in in_stream_order(requests, rounds_per_task):
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
    def of(cls, progress: ErasureRecord) -> ErasedData:
        """What the run ``progress`` has erased so far."""
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


def original_labels(scenario: Scenario, task: int, positions: np.ndarray) -> np.ndarray:
    """The dataset classes of task ``task``'s training samples at ``positions``."""
    idx = scenario.tasks[task].train_idx[positions]
    return scenario.dataset.train.y.numpy()[idx]


def held_positions(config: Config, scenario: Scenario, client: int, task: int, data_dir: str,
                   erased: ErasedData) -> np.ndarray:
    """Positions of task ``task``'s training samples that ``client`` still trains on: its
    partition less the classes erased for it (empty once the client is erased)."""
    if client in erased.clients:
        return np.zeros(0, dtype=np.int64)
    positions = client_positions(config, client, task, data_dir)
    classes = erased.classes_of(client)
    if not classes:
        return positions
    return positions[~np.isin(original_labels(scenario, task, positions), sorted(classes))]


def request_split(config: Config, scenario: Scenario, req: ErasureRequest, client: int, task: int,
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


def check_requests_hold_data(config: Config, scenario: Scenario, requests: list[ErasureRequest],
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


def original_test_labels(scenario: Scenario, task: int, y: torch.Tensor) -> torch.Tensor:
    """Dataset classes of head targets ``y`` of task ``task`` (task-IL targets are positions
    in the task's class list)."""
    return scenario.classes_of(task, y)


__all__ = ["EVERY_CLIENT", "ErasedData", "ErasureRequest", "check_requests_hold_data",
           "held_positions", "original_labels", "original_test_labels", "parse_erasure",
           "parse_schedule", "request_split", "validate_requests"]
