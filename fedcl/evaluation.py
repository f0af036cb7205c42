"""Central evaluation: the global model's test accuracy on every task of the scenario.

Each call counts correct predictions per task *and per dataset class*
(:meth:`Evaluator.counts`), so an accuracy can be taken on any subset of the classes
afterwards (:func:`accuracies`): after an erasure request, fedcl measures on what was not
erased. Classes erased everywhere (:attr:`Evaluator.excluded`) are left out of the test split;
a task whose every class is erased everywhere keeps its full test set (there is nothing else
to measure it on; summary.json lists it under ``erasure_view.fully_erased_tasks``).

What is counted is the global model, unless the run's strategy reports other models for a task
(:meth:`fedcl.strategy.ContinualStrategy.task_counts`: FedWeIT's clients' own task models,
their counts summed).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord

from fedcl import plugins
from fedcl.config import Config
from fedcl.data.datasets import to_float
from fedcl.data.scenarios import Scenario
from fedcl.erasure import original_test_labels
from fedcl.strategy import ContinualStrategy, TaskCounts

#: Per task, ``{dataset class: [correct, total]}`` of one evaluation.
ClassCounts = list[dict[int, list[int]]]


def task_accuracy(counts: dict[int, list[int]], excluded: Iterable[int] = ()) -> float:
    """Correct over total on the classes not in ``excluded``; on every class when that leaves
    no sample (a task whose every class is excluded); 0.0 for an empty test set."""
    gone = set(excluded)
    kept = [v for c, v in counts.items() if c not in gone]
    if not sum(t for _, t in kept):
        kept = list(counts.values())
    correct, total = sum(c for c, _ in kept), sum(t for _, t in kept)
    return correct / total if total else 0.0


def accuracies(counts: ClassCounts, excluded: Iterable[int] = ()) -> list[float]:
    """One accuracy per task from :meth:`Evaluator.counts`, leaving ``excluded`` classes out."""
    gone = set(excluded)
    return [task_accuracy(c, gone) for c in counts]


def fully_excluded(counts: ClassCounts, excluded: Iterable[int]) -> list[int]:
    """The tasks whose every test sample is of an ``excluded`` class."""
    gone = set(excluded)
    return [t for t, c in enumerate(counts)
            if c and not sum(v[1] for k, v in c.items() if k not in gone)]


def erasure_view(matrix: list[list[float]], matrix_counts: list[ClassCounts],
                 baseline: list[float], baseline_counts: ClassCounts,
                 excluded: Iterable[int]) -> dict[str, object]:
    """What the end metrics are taken on after erasures: ``matrix`` and ``baseline`` again from
    their counts, every row alike on the classes not in ``excluded`` (those erased everywhere
    by the end of the run), so that forgetting compares like with like and the requested
    forgetting of a class is not counted as catastrophic forgetting. Also
    ``excluded_classes``, ``fully_erased_tasks`` (measured on their full test set) and, when a
    class was left out, ``accuracy_matrix_all_classes`` (every class, as measured). A run
    resumed from a checkpoint without counts keeps the matrix as measured live."""
    gone = sorted(set(excluded))
    if len(matrix_counts) != len(matrix) or not baseline_counts:
        return {"matrix": matrix, "baseline": baseline, "excluded_classes": gone,
                "fully_erased_tasks": []}
    view: dict[str, object] = {
        "matrix": [accuracies(c, gone) for c in matrix_counts],
        "baseline": accuracies(baseline_counts, gone), "excluded_classes": gone,
        "fully_erased_tasks": fully_excluded(baseline_counts, gone)}
    if gone:
        view["accuracy_matrix_all_classes"] = [accuracies(c) for c in matrix_counts]
    return view


class Evaluator:
    """Test accuracy of a set of global arrays on every task of the scenario.

    ``evaluator(arrays)`` -> one accuracy in [0, 1] per task (seen and unseen), on the first
    ``eval_samples_per_task`` test samples of each (all when 0), less the classes in
    :attr:`excluded` (those erased everywhere so far). The test sets stay on ``device``;
    :attr:`model` is the run's model, reloaded with each call's arrays."""

    def __init__(self, scenario: Scenario, config: Config, device: torch.device) -> None:
        self.scenario = scenario
        self.device = device
        self.batch_size = config.eval_batch_size
        self.model = plugins.build_model(config, scenario).to(device)
        # test sets stay on the device: moved once, not after every round
        self.test = [tuple(v.to(device) for v in scenario.test_data(
            t, config.eval_samples_per_task, config.seed)) for t in range(len(scenario.tasks))]
        # each test sample's dataset class (task-IL targets are positions within the task)
        self.classes = [original_test_labels(scenario, t, y).cpu()
                        for t, (_, y) in enumerate(self.test)]
        self.excluded: set[int] = set()

    def __call__(self, arrays: ArrayRecord) -> list[float]:
        return accuracies(self.counts(arrays), self.excluded)

    @torch.no_grad()
    def counts(self, arrays: ArrayRecord, strategy: ContinualStrategy | None = None
               ) -> ClassCounts:
        """Per task, ``{dataset class: [correct, total]}`` of the model ``arrays`` (eval mode),
        or what ``strategy`` reports for the task instead
        (:meth:`~fedcl.strategy.ContinualStrategy.task_counts`)."""
        state = arrays.to_torch_state_dict()
        loaded = [False]  # whether the model holds `state` (a strategy's models replace it)

        def count(model: dict[str, torch.Tensor], task: int) -> TaskCounts:
            loaded[0] = False
            return self.task_counts(model, task)

        out: ClassCounts = []
        for t in range(len(self.test)):
            got = None if strategy is None else strategy.task_counts(
                t, arrays, lambda model, t=t: count(model, t))
            if got is None:
                if not loaded[0]:
                    self.model.load_state_dict(state)
                    loaded[0] = True
                got = self._count(t)
            out.append(got)
        return out

    @torch.no_grad()
    def task_counts(self, state: dict[str, torch.Tensor], task: int) -> TaskCounts:
        """``{dataset class: [correct, total]}`` of the model ``state`` (a ``state_dict`` of
        the run's model, evaluated in eval mode) on task ``task``'s test samples."""
        self.model.load_state_dict(state)
        return self._count(task)

    def _count(self, task: int) -> TaskCounts:
        """:meth:`task_counts` of the model :attr:`model` holds now."""
        was_training = self.model.training
        self.model.eval()
        ds = self.scenario.dataset
        x, y = self.test[task]
        head = self.scenario.head_for(task)
        hits = torch.zeros(len(y), dtype=torch.bool)
        for start in range(0, len(y), self.batch_size):
            xb = to_float(x[start:start + self.batch_size].to(self.device), ds.mean, ds.std)
            pred = self.model(xb, head).argmax(dim=1)
            hits[start:start + len(pred)] = (pred == y[start:start + self.batch_size]
                                             .to(self.device)).cpu()
        self.model.train(was_training)
        classes = self.classes[task]
        return {int(c): [int(hits[classes == c].sum()), int((classes == c).sum())]
                for c in torch.unique(classes).tolist()}


__all__ = ["ClassCounts", "Evaluator", "accuracies", "erasure_view", "fully_excluded",
           "task_accuracy"]
