"""Continual-learning scenarios: how a dataset becomes a sequence of tasks.

* ``class-il``: the classes are split into ``tasks`` disjoint groups (Split-MNIST: 5 tasks of 2
  classes). One head over all classes; no task id at test time, so a prediction is the argmax
  over every class of the single head.
* ``task-il``: the same split, but one head per task and the task id is given at test time;
  labels are mapped to their position inside the task (0..classes_per_task-1).
* ``domain-il``: every task has all classes and the whole dataset, with inputs shifted per task:
  ``permute`` applies a fixed random pixel permutation (task 0 is unpermuted, as in the FOT
  paper's Permuted-MNIST), ``rotate`` rotates task t by 180*t/tasks degrees. One head.

Images stay uint8; shifts are applied to uint8 images, normalisation happens per batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedcl.config import Config
from fedcl.data.datasets import Dataset, host_to_device, load_dataset
from fedcl.errors import ConfigError, DataError, FedclError


@dataclass(frozen=True)
class Task:
    """One task of the stream: which classes and samples it holds, and its input shift."""

    index: int
    classes: tuple[int, ...]
    train_idx: np.ndarray  # positions in dataset.train
    test_idx: np.ndarray  # positions in dataset.test
    permutation: np.ndarray | None = None  # pixel permutation (domain-il permute)
    rotation: float | None = None  # degrees (domain-il rotate)


@dataclass(frozen=True)
class Scenario:
    kind: str
    dataset: Dataset
    tasks: tuple[Task, ...]
    num_heads: int
    classes_per_head: int

    @property
    def task_id_at_test(self) -> bool:
        """Whether the model is told the task at test time (task-IL only)."""
        return self.kind == "task-il"

    def head_for(self, task: int) -> int | None:
        """The head to use for ``task``: its own in task-IL, None (the single head) otherwise."""
        return task if self.num_heads > 1 else None

    def targets(self, task: int, y: torch.Tensor) -> torch.Tensor:
        """Labels as the task's head sees them (task-local positions in task-IL)."""
        if self.kind != "task-il":
            return y
        lookup = torch.full((self.dataset.num_classes,), -1, dtype=torch.int64)
        lookup[list(self.tasks[task].classes)] = torch.arange(len(self.tasks[task].classes))
        return lookup[y]

    def classes_of(self, task: int, targets: torch.Tensor) -> torch.Tensor:
        """The dataset classes of head targets of ``task`` (the inverse of :meth:`targets`):
        the targets themselves, except in task-IL, where they are positions in the task's
        class list."""
        if self.kind != "task-il":
            return targets
        classes = torch.tensor(self.tasks[task].classes, dtype=targets.dtype)
        return host_to_device(classes, targets.device)[targets]

    def shift(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """Apply task ``task``'s input shift to uint8 images ``x`` (N x C x H x W)."""
        t = self.tasks[task]
        if t.permutation is not None:
            n, c, h, w = x.shape
            perm = torch.as_tensor(t.permutation)
            return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)
        if t.rotation:
            from torchvision.transforms.v2 import InterpolationMode
            from torchvision.transforms.v2 import functional as tvf

            return tvf.rotate(x, t.rotation, interpolation=InterpolationMode.BILINEAR)
        return x

    def train_data(self, task: int, positions: np.ndarray | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted images and head targets of the task's training samples (or a subset:
        ``positions`` index into the task's own training samples)."""
        idx = self.tasks[task].train_idx
        if positions is not None:
            idx = idx[positions]
        idx_t = torch.as_tensor(idx, dtype=torch.int64)
        x = self.shift(task, self.dataset.train.x[idx_t])
        return x, self.targets(task, self.dataset.train.y[idx_t])

    def test_data(self, task: int, max_samples: int = 0, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted images and head targets of the task's test samples; a fixed seeded subset
        of ``max_samples`` when that is positive and smaller than the split."""
        idx = self.tasks[task].test_idx
        if 0 < max_samples < len(idx):
            rng = np.random.default_rng([seed, task, 7])
            idx = np.sort(rng.choice(idx, size=max_samples, replace=False))
        idx_t = torch.as_tensor(idx, dtype=torch.int64)
        x = self.shift(task, self.dataset.test.x[idx_t])
        return x, self.targets(task, self.dataset.test.y[idx_t])


def split_classes(num_classes: int, tasks: int, order_seed: int | None) -> list[tuple[int, ...]]:
    """Split class ids into ``tasks`` equal groups, in natural or seeded-shuffled order."""
    if num_classes % tasks:
        raise ConfigError(
            f"{tasks} tasks do not split {num_classes} classes evenly; "
            f"choose a number of tasks that divides {num_classes}"
        )
    order = np.arange(num_classes)
    if order_seed is not None:
        order = np.random.default_rng(order_seed).permutation(num_classes)
    per = num_classes // tasks
    return [tuple(int(c) for c in order[i * per:(i + 1) * per]) for i in range(tasks)]


def pixel_permutations(num_pixels: int, tasks: int, seed: int) -> list[np.ndarray | None]:
    """Task 0 keeps pixel order; task t > 0 gets a permutation drawn from (seed, t)."""
    return [None] + [np.random.default_rng([seed, t, 11]).permutation(num_pixels)
                     for t in range(1, tasks)]


def rotation_angles(tasks: int, order_seed: int | None) -> list[float]:
    """Evenly spaced angles 180*t/tasks, in natural or seeded-shuffled order."""
    angles = [180.0 * t / tasks for t in range(tasks)]
    if order_seed is not None:
        angles = [angles[i] for i in np.random.default_rng(order_seed).permutation(tasks)]
    return angles


def make_scenario(dataset: Dataset, kind: str, tasks: int, *, domain_shift: str = "permute",
                  task_order_seed: int | None = None, seed: int = 0) -> Scenario:
    """Cut ``dataset`` into a task stream of the given ``kind``."""
    train_y = dataset.train.y.numpy()
    test_y = dataset.test.y.numpy()
    if kind in ("class-il", "task-il"):
        groups = split_classes(dataset.num_classes, tasks, task_order_seed)
        task_list = tuple(
            Task(t, g, np.flatnonzero(np.isin(train_y, g)), np.flatnonzero(np.isin(test_y, g)))
            for t, g in enumerate(groups)
        )
        if kind == "task-il":
            return Scenario(kind, dataset, task_list, tasks, len(groups[0]))
        return Scenario(kind, dataset, task_list, 1, dataset.num_classes)
    if kind == "domain-il":
        all_classes = tuple(range(dataset.num_classes))
        train_all, test_all = np.arange(len(train_y)), np.arange(len(test_y))
        _, h, w = dataset.input_shape
        if domain_shift == "permute":
            perms = pixel_permutations(h * w, tasks, seed)
            task_list = tuple(Task(t, all_classes, train_all, test_all, permutation=p)
                              for t, p in enumerate(perms))
        elif domain_shift == "rotate":
            task_list = tuple(Task(t, all_classes, train_all, test_all, rotation=a)
                              for t, a in enumerate(rotation_angles(tasks, task_order_seed)))
        else:
            raise ConfigError(f"unknown domain_shift '{domain_shift}'")
        return Scenario(kind, dataset, task_list, 1, dataset.num_classes)
    raise ConfigError(f"unknown scenario '{kind}'")


@functools.lru_cache(maxsize=4)
def _cached_scenario(dataset: str, data_dir: str, download: bool, kind: str, tasks: int,
                     domain_shift: str, task_order_seed: int | None, seed: int) -> Scenario:
    return make_scenario(load_dataset(dataset, data_dir, download), kind, tasks,
                         domain_shift=domain_shift, task_order_seed=task_order_seed, seed=seed)


def build_scenario(config: Config, data_dir: str | None = None) -> Scenario:
    """The scenario a config describes; cached per process (clients share one copy). Data
    that cannot be cut into the tasks (a plugin dataset's images not N x C x H x W, say)
    raises one :class:`DataError` line."""
    try:
        return _cached_scenario(config.dataset, data_dir or config.data_dir, config.download,
                                config.scenario, config.tasks, config.domain_shift,
                                config.task_order_seed, config.seed)
    except FedclError:
        raise
    except Exception as err:
        lines = str(err).strip().splitlines()
        raise DataError(f"dataset '{config.dataset}' cannot be cut into {config.tasks} "
                        f"{config.scenario} tasks: {type(err).__name__}: "
                        f"{lines[0] if lines else '(no message)'}") from None
