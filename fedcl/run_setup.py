"""The one setup step of a run: everything about a config that needs fedcl's registries.

:meth:`fedcl.config.Config.validate` checks the fields on their own. :func:`setup_run` then
resolves the dataset, the model, the strategy and the unlearning method by name (built-ins,
installed plugins, ``package.module:Name`` references: :mod:`fedcl.plugins`), types their
parameters, checks the erasure schedule against the run and what cohorts can train, and
derives and checks the paths the run writes (:func:`check_names`, :func:`check_paths`). The CLI
calls it before any process starts, and the ServerApp before it starts the run (also under
``flwr run``), so every problem it finds is one line and exit status 2.

**The output folder** (``output``, else ``outputs/<run name>``) must be a folder this process
can write, or one it can make, of names and length the file system takes. A run never writes
into a folder that already holds files, except a folder holding only what ``fedcl simulate``
itself writes before the run begins (``flower.log``, the lock ``fedcl.lock`` of
:mod:`fedcl.processes`), and the folder of the run that ``--resume`` continues: one that holds
a finished run (``summary.json``), a stopped one (``checkpoint.pt``: resume it instead) or
anything else is refused, and so is a folder whose lock a live run holds, resumed or not.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedcl import checkpoint, plugins
from fedcl.config import Config, resolve_tracking_uri
from fedcl.data.datasets import DatasetInfo
from fedcl.data.scenarios import split_classes
from fedcl.erasure import ErasureRequest, in_stream_order, parse_schedule, validate_requests
from fedcl.errors import ConfigError
from fedcl.models import ModelSpec
from fedcl.paths import NAME_MAX, check_folder, name_bytes, quoted, shown
from fedcl.processes import LOCK_FILE, in_use, live_owner
from fedcl.results import SUMMARY_FILE
from fedcl.strategy import Capabilities
from fedcl.tracking import MAX_EXPERIMENT_NAME, MAX_RUN_NAME, check_store

__all__ = ["RunSetup", "check_names", "check_output", "check_paths", "default_run_name",
           "make_output", "output_folder", "setup_run"]

#: What ``fedcl simulate`` writes into the output folder before the run begins: a folder
#: holding nothing else is the run's own (or that of one that stopped before it began).
STARTUP_FILES = frozenset({"flower.log", LOCK_FILE})

#: Bytes kept free in the output folder's path for the names fedcl writes inside it
#: (``federaser/round_00012.pt.tmp``, a strategy's state file, ...).
OUTPUT_RESERVE = 64


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
    run_name: str  # the config's, else <strategy>-<scenario>-<time>
    output: Path  # the output folder: the config's, else outputs/<run name>


def setup_run(config: Config, *, resume: bool = False, paths: bool = True) -> RunSetup:
    """Check ``config`` (:meth:`Config.validate`, then everything that needs the registries)
    and resolve what it names; then the run's names (:func:`check_names`) and, with
    ``paths``, what the file system holds where it will write (:func:`check_paths`: not for
    ``fedcl config``, which only prints a config). ``resume``: the run continues the one in
    its output folder.

    Raises a one-line :class:`ConfigError` for the first problem: an unknown dataset, model,
    strategy or unlearning method (with a close match), a parameter they do not have or of the
    wrong type, an erasure request the run cannot carry out (unknown client or class, a point
    outside the stream, a class erased before it is trained), classes that the tasks do not
    split evenly, a scenario the strategy does not declare in its ``Capabilities``, or
    ``cohort_size > 1`` with a batch-norm model or a strategy whose trainer is not batchable
    or keeps a store on its clients,
    a name or path the run cannot use; a :class:`~fedcl.plugins.PluginError` (a ConfigError)
    for a plugin that cannot be loaded. A plugin dataset is made loadable by name in this
    process. Nothing is created.
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
        if trainer.keeps_client_store:
            raise ConfigError(f"cohort_size > 1 cannot train strategy {config.strategy!r}: its "
                              "clients keep a store between rounds (a replay buffer, an old "
                              "model), which a cohort's leader cannot hold for its members; "
                              "use cohort_size = 1")
        if not capabilities.model_replies:
            raise ConfigError(f"cohort_size > 1 cannot train strategy {config.strategy!r}: its "
                              "clients reply with records of their own instead of the model, "
                              "which a cohort does not send; use cohort_size = 1")
        if not trainer.batchable:
            raise ConfigError(f"cohort_size > 1 cannot train strategy {config.strategy!r}: its "
                              "clients train their own way (its trainer overrides hooks that a "
                              "batched cohort does not run); use cohort_size = 1")
    check_names(config)
    run_name = default_run_name(config)
    output = output_folder(config, run_name)
    if paths:
        check_paths(config, output, resume=resume)
    return RunSetup(config, strategy, strategy_params, unlearning, unlearning_params, schedule,
                    dataset, model, run_name, output)


def default_run_name(config: Config) -> str:
    """The run's name: the config's, else ``<strategy>-<scenario>-<UTC time>``, a strategy
    given by reference (``package.module:Name``) written ``package.module.Name``: the name is
    also the output folder's, where ``:`` is awkward in shells and invalid on Windows."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return config.run_name or f"{config.strategy.replace(':', '.')}-{config.scenario}-{stamp}"


#: The environment variable naming the folder that holds the runs' output folders when
#: ``output`` is not given (default: ``outputs`` in the working folder). For a SuperLink,
#: whose ServerApps run in its own working folder, it is where their outputs land.
OUTPUTS_ENV = "FEDCL_OUTPUTS"


def output_folder(config: Config, run_name: str) -> Path:
    """The output folder: ``output``, else ``<$FEDCL_OUTPUTS or outputs>/<run name>``."""
    if config.output:
        return Path(config.output)
    return Path(os.environ.get(OUTPUTS_ENV) or "outputs") / run_name


def _control_character(text: str) -> str | None:
    """The first control character (NUL, a newline, ...) or line separator in ``text``."""
    return next((repr(ch)[1:-1] for ch in text
                 if unicodedata.category(ch) in ("Cc", "Zl", "Zp")), None)


def check_names(config: Config) -> None:
    """The experiment's and the run's names: no control characters (NUL among them), within
    MLflow's lengths; a run name that names the output folder (no ``output``) must be a
    single file name: no '/', not '.' or '..', at most 255 bytes. Raises one ConfigError
    line; looks at nothing on disk."""
    bad = _control_character(config.experiment)
    if bad:
        raise ConfigError(f"experiment {quoted(config.experiment)} contains the control "
                          f"character '{bad}'")
    if len(config.experiment) > MAX_EXPERIMENT_NAME:
        raise ConfigError(f"experiment {quoted(config.experiment)} is too long: MLflow takes "
                          f"names of at most {MAX_EXPERIMENT_NAME} characters")
    name = config.run_name
    if not name:
        return
    bad = _control_character(name)
    if bad:
        raise ConfigError(f"run_name {quoted(name)} contains the control character '{bad}'")
    if not config.output:
        if "/" in name or name.strip() in (".", ".."):
            raise ConfigError(f"run_name {quoted(name)} cannot name the output folder "
                              "outputs/<run name>: it must be one file name, without '/' and "
                              "not '.' or '..'; set output to choose the folder")
        size = name_bytes(name)
        if size > NAME_MAX:
            raise ConfigError(f"run_name {quoted(name)} is too long to name the output folder "
                              f"outputs/<run name>: {size} bytes, and a file name takes at "
                              f"most {NAME_MAX}; shorten it or set output")
    if len(name) > MAX_RUN_NAME:
        raise ConfigError(f"run_name {quoted(name)} is too long: MLflow takes run names of at "
                          f"most {MAX_RUN_NAME} characters")


def check_paths(config: Config, output: Path, *, resume: bool = False) -> None:
    """Where the run writes, as the file system holds it now: the output folder
    (:func:`check_output`), the tracking URI's local files (:func:`fedcl.tracking.check_store`:
    the sqlite file, the experiment's artifacts folder), and that the sqlite file is not
    where one of those folders must be. Raises one ConfigError line; creates nothing."""
    check_output(output, resume=resume)
    database, folders = check_store(resolve_tracking_uri(config), config.experiment)
    if database is None:
        return
    for folder, what in [(output, "output folder"),
                         *((f, "MLflow artifacts folder") for f in folders)]:
        folder = Path(os.path.abspath(folder))
        if database == folder or database in folder.parents:
            raise ConfigError(f"the MLflow database {shown(str(database))} and the {what} "
                              f"{shown(str(folder))} cannot both be made: one path would be "
                              "a file and a folder")


def check_output(output: Path, *, resume: bool = False) -> None:
    """The output folder can be written or made (:func:`fedcl.paths.check_folder`, with room
    for the files fedcl writes in it) and holds no files of another run or of anything else
    (the module's docstring says which it takes). Raises one ConfigError line."""
    check_folder(output, "output folder", reserve=OUTPUT_RESERVE)
    if not output.is_dir():
        return
    owner = live_owner(output)  # (None for this process's own: see there)
    if owner is not None:
        raise in_use(shown(str(output)), owner)
    if resume:
        return
    try:
        entries = sorted(os.listdir(output))
    except OSError as err:
        raise ConfigError(f"output folder {shown(str(output))} cannot be read: "
                          f"{err.strerror or err}") from None
    others = [e for e in entries if e not in STARTUP_FILES]
    if not others:
        return
    where = shown(str(output))
    if SUMMARY_FILE in others:
        raise ConfigError(f"output folder {where} holds a finished run ({SUMMARY_FILE}) that "
                          "this run would overwrite; choose another output or run_name")
    if checkpoint.FILE in others:
        raise ConfigError(f"output folder {where} holds a run that did not finish "
                          f"({checkpoint.FILE}): continue it with `fedcl simulate --resume "
                          f"{where}`, or choose another output or run_name")
    listed = ", ".join(shown(e, 30) for e in others[:3]) + (", ..." if len(others) > 3 else "")
    raise ConfigError(f"output folder {where} already holds files that are not a fedcl run's "
                      f"({listed}); choose a new or empty folder as output")


def make_output(output: Path) -> Path:
    """Make the (checked) output folder; a failure (another process got there first) is one
    ConfigError line."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output folder {shown(str(output))} cannot be made: "
                          f"{err.strerror or err}") from None
    return output


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
    return in_stream_order(requests, config.rounds_per_task)
