"""The task-stream driver: the one place where the order of a strategy's continual hooks is
written.

A walk over the task stream visits rounds in order. Before the first round it visits of a
task it calls ``strategy.begin_task``; after a task's last round, ``strategy.end_task``; and
around them the caller's hooks. Every walk fedcl makes goes through :class:`TaskStreamDriver`:

* the live run (:mod:`fedcl.server_app`): every round of every task, with erasure requests
  carried out at their points, evaluation, tracking and checkpoints;
* the retrain oracle (:mod:`fedcl.unlearning_run`): every round so far again, from the
  initial model, each with the clients it sampled in the run minus the erased ones, without
  the erased data;
* rebuilding a strategy's task-end state after unlearning (:mod:`fedcl.unlearning_run`): the
  last round of every finished task, untrained;
* FedEraser's calibration (:mod:`strategies.unlearning.federaser`): the stored rounds.

Each caller subclasses the driver and overrides only what differs: :meth:`run_round` (always)
and the hooks (:meth:`before_task`, :meth:`before_round`, :meth:`after_task`,
:meth:`after_round`). The order of calls for a walk over ``rounds``::

    for info in rounds:
        if info.task is not the open task:
            before_task(task); arrays = strategy.begin_task(task, arrays); task_begun(task)
        before_round(info)
        run_round(info)                       # sets self.arrays
        if info.last_of_task:
            last = arrays; arrays = strategy.end_task(task, arrays); after_task(task, last)
        after_round(info)
    if then_open is given and not open: arrays = strategy.begin_task(then_open, arrays)

A hook may replace :attr:`strategy` and :attr:`arrays` (the live run does, when an erasure
request comes due), and the walk goes on with them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import ArrayRecord

from fedcl.errors import RunAborted
from fedcl.strategy import ContinualStrategy, RoundInfo, strategy_label
from fedcl.validation import model_problem


class TaskStreamDriver:
    """Walks rounds of the task stream, calling the strategy's task hooks in order.

    ``strategy``: the server half the walk trains with; ``arrays``: the global model the walk
    starts from. :attr:`open_task` is the task whose ``begin_task`` ran and whose
    ``end_task`` has not (None between tasks)."""

    def __init__(self, strategy: ContinualStrategy, arrays: ArrayRecord) -> None:
        self.strategy = strategy
        self.arrays = arrays
        self.open_task: int | None = None
        #: this walk's name: a walk that replays rounds passes it to
        #: :func:`fedcl.rounds.train_round`, and its clients' trainers keep a store of the
        #: walk's own, begun empty (:class:`fedcl.training.ClientStore`)
        self.walk_id = uuid.uuid4().hex[:12]

    # --- what a caller says differs ------------------------------------------------------
    def run_round(self, info: RoundInfo) -> None:
        """Run round ``info`` and set :attr:`arrays` to the model after it."""
        raise NotImplementedError

    def before_task(self, task: int) -> None:
        """Before ``begin_task`` of ``task`` (the live run: requests due before the task)."""

    def task_begun(self, task: int) -> None:
        """Right after ``begin_task`` of ``task``."""

    def before_round(self, info: RoundInfo) -> None:
        """Before round ``info`` (the live run: requests due at this round)."""

    def after_task(self, task: int, last_round_arrays: ArrayRecord) -> None:
        """After ``end_task`` of ``task``; ``last_round_arrays``: the model before
        ``end_task`` (the accuracy matrix row is its accuracy unless ``end_task`` changed
        it), :attr:`arrays`: the model after."""

    def after_round(self, info: RoundInfo) -> None:
        """After round ``info`` and, in a task's last round, after :meth:`after_task`."""

    # --- the sequence, written once -------------------------------------------------------
    def walk(self, rounds: Iterable[RoundInfo], *, open_task: int | None = None,
             then_open: int | None = None) -> ArrayRecord:
        """Visit ``rounds`` in order; returns the model after the walk.

        ``open_task``: a task whose ``begin_task`` already ran before the walk (a resumed run,
        or a walk that continues a task). ``then_open``: a task to begin after the last round
        unless it is open already (a task that had begun, none of whose rounds the walk
        replays). ``rounds`` may be a generator that reads state the hooks change."""
        self.open_task = open_task
        for info in rounds:
            if self.open_task != info.task:
                self.before_task(info.task)
                self.arrays = self.task_hook("begin_task", info.task)
                self.open_task = info.task
                self.task_begun(info.task)
            self.before_round(info)
            self.run_round(info)
            if info.last_of_task:
                last = self.arrays
                self.arrays = self.task_hook("end_task", info.task)
                self.open_task = None
                self.after_task(info.task, last)
            self.after_round(info)
        if then_open is not None and self.open_task != then_open:
            self.arrays = self.task_hook("begin_task", then_open)
            self.open_task = then_open
        return self.arrays

    def task_hook(self, hook: str, task: int) -> ArrayRecord:
        """The strategy's ``begin_task`` or ``end_task`` of ``task`` on :attr:`arrays`; the
        model it returns must fit the model it was given (a one-line
        :class:`~fedcl.errors.RunAborted` names the hook otherwise)."""
        arrays = getattr(self.strategy, hook)(task, self.arrays)
        problem = model_problem(arrays, self.arrays)
        if problem is not None:
            raise RunAborted(f"{strategy_label(self.strategy)}.{hook} (task {task}) returned "
                             f"{problem}")
        return arrays


__all__ = ["TaskStreamDriver"]
