"""The one setup step of a run: everything about a config that needs fedcl's registries.

:meth:`fedcl.config.Config.validate` checks the fields on their own. :func:`setup_run` then
resolves the dataset, the model, the strategy and the unlearning method by name (built-ins,
installed plugins, ``package.module:Name`` references: :mod:`fedcl.plugins`), types their
parameters, checks the erasure schedule against the run and what cohorts can train. The CLI
calls it before any process starts, so every problem it finds is one line and exit status 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fedcl import plugins
from fedcl.config import Config
from fedcl.data.datasets import DatasetInfo
from fedcl.data.scenarios import split_classes
from fedcl.erasure import ErasureRequest, parse_schedule, validate_requests
from fedcl.errors import ConfigError
from fedcl.models import ModelSpec
from fedcl.strategy import Capabilities

__all__ = ["RunSetup", "setup_run"]


@dataclass(frozen=True)
class RunSetup:
    """A config checked against the registries, with what it names resolved."""

    config: Config
    strategy: plugins.StrategySpec
    strategy_params: Any  # an instance of strategy.params
    unlearning: plugins.UnlearningSpec
    unlearning_params: Any  # an instance of unlearning.params
    schedule: list[ErasureRequest]  # the erasure requests, in stream order
    dataset: DatasetInfo
    model: ModelSpec


def setup_run(config: Config) -> RunSetup:
    """Check ``config`` (:meth:`Config.validate`, then everything that needs the registries)
    and resolve what it names.

    Raises a one-line :class:`ConfigError` for the first problem: an unknown dataset, model,
    strategy or unlearning method (with a close match), a parameter they do not have or of the
    wrong type, an erasure request the run cannot carry out (unknown client or class, a point
    outside the stream, a class erased before it is trained), classes that the tasks do not
    split evenly, a scenario the strategy does not declare in its ``Capabilities``, or
    ``cohort_size > 1`` with a batch-norm model or a strategy whose trainer is not batchable;
    a :class:`~fedcl.plugins.PluginError` (a ConfigError) for a plugin that cannot be loaded.
    A plugin dataset is made loadable by name in this process.
    """
    config.validate()
    dataset = plugins.get_dataset(config.dataset)
    model = plugins.get_model(config.model)
    unlearning = plugins.get_unlearning(config.unlearning)
    unlearning_params = plugins.parse_unlearning_params(config.unlearning,
                                                        config.unlearning_params)
    schedule = erasure_schedule(config, dataset.num_classes)
    strategy = plugins.get_strategy(config.strategy)
    strategy_params = plugins.parse_strategy_params(config.strategy, config.strategy_params)
    capabilities = declared_capabilities(config)
    if config.scenario not in capabilities.scenarios:
        raise ConfigError(f"strategy {config.strategy!r} is not defined for scenario "
                          f"{config.scenario!r} (it declares "
                          f"{', '.join(capabilities.scenarios) or 'none'})")
    trainer = plugins.build_trainer(config)  # the clients' half, refused here if it fails
    if config.cohort_size > 1:
        if model.batch_norm:
            raise ConfigError(f"cohort_size > 1 cannot train model {config.model!r}: its batch "
                              "norm keeps running statistics that a batched cohort cannot "
                              "share; use cohort_size = 1 or model mlp/cnn")
        if not trainer.batchable:
            raise ConfigError(f"cohort_size > 1 cannot train strategy {config.strategy!r}: its "
                              "clients train their own way; use cohort_size = 1")
    return RunSetup(config, strategy, strategy_params, unlearning, unlearning_params, schedule,
                    dataset, model)


def declared_capabilities(config: Config) -> Capabilities:
    """What the strategy declares it supports: its server half's ``capabilities``, from an
    instance built for ``config`` (Flower's notices while building it, such as "federated
    evaluation will be skipped", stay quiet: the run itself logs them). A build function that
    fails or returns no ContinualStrategy is a one-line PluginError here, before any run."""
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    flower_log.setLevel(logging.ERROR)
    try:
        return plugins.build_strategy(config).capabilities
    finally:
        flower_log.setLevel(level)


def erasure_schedule(config: Config, num_classes: int) -> list[ErasureRequest]:
    """``config.erasures`` parsed and checked against a run of ``num_classes`` classes, in
    stream order (:meth:`ErasureRequest.point`). In a split scenario (class-il, task-il) the
    classes must split evenly into the tasks, and a class may be erased only once its task has
    begun. Raises a one-line :class:`ConfigError`."""
    requests = parse_schedule(config.erasures)
    validate_requests(requests, clients=config.clients, tasks=config.tasks,
                      rounds_per_task=config.rounds_per_task, classes=num_classes)
    if config.scenario in ("class-il", "task-il"):
        groups = split_classes(num_classes, config.tasks, config.task_order_seed)
        for req in requests:
            first = next((t for t, g in enumerate(groups) if req.klass in g), None)
            if req.klass is not None and first is not None and first > req.task:
                raise ConfigError(f"erasure '{req.to_text()}': class {req.klass} is first "
                                  f"trained in task {first}, after the request")
    return sorted(requests, key=lambda r: r.point(config.rounds_per_task))
