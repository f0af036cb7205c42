"""The one typed config of a fedcl run.

Every setting lives in :class:`Config`, documented per field. The same object is read from TOML
files (``simulations/*.toml``), overridden by CLI flags (one flag per field, generated here), and
converted to Flower's kebab-case run config (``[tool.flwr.app.config]``) in one place:
:meth:`Config.to_run_config` / :meth:`Config.from_run_config`.

Defaults live only in the dataclass below. This module is a leaf: it imports nothing of fedcl
but :mod:`fedcl.errors`, so any part of fedcl can read a config. Checks that need the
registries or the datasets run in :func:`fedcl.run_setup.setup_run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcl.errors import ConfigError

SCENARIOS = ("class-il", "task-il", "domain-il")
DOMAIN_SHIFTS = ("permute", "rotate")
PARTITIONS = ("iid", "dirichlet", "shards")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")
FAULT_MODES = ("raise", "hang", "vanish")

# Prefix of strategy parameters in Flower's flat run config: "strategy-param.proximal-mu".
RUN_CONFIG_STRATEGY_PREFIX = "strategy-param."
# ... and of unlearning parameters: "unlearning-param.alpha".
RUN_CONFIG_UNLEARNING_PREFIX = "unlearning-param."
#: The table fields (a flag per entry, ``--strategy-param KEY=VALUE``) and their run config
#: prefixes.
PARAM_TABLES = {"strategy_params": RUN_CONFIG_STRATEGY_PREFIX,
                "unlearning_params": RUN_CONFIG_UNLEARNING_PREFIX}
#: ... and the one run config key each also takes as a list, ``"beta=0.5,anchor=0.1"``: Flower
#: refuses run config keys that the app's defaults (pyproject.toml) do not declare, and a
#: method's parameters cannot be declared there in advance.
RUN_CONFIG_PARAM_LISTS = {"strategy_params": "strategy-params",
                          "unlearning_params": "unlearning-params"}

StrategyParam = bool | int | float | str


def param_value(text: str) -> StrategyParam:
    """A parameter's value as written on a command line: true/false, an int, a float, else
    the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_param(text: str) -> tuple[str, StrategyParam]:
    """``KEY=VALUE`` -> (key with ``-`` as ``_``, :func:`param_value`); ConfigError without
    a key and an ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"a parameter needs KEY=VALUE, got '{text}'")
    return key.strip().replace("-", "_"), param_value(value.strip())


def parse_param_list(text: str, key: str) -> dict[str, StrategyParam]:
    """``"beta=0.5,anchor=0.1"`` (commas or spaces between entries; empty: none) -> a dict;
    one ConfigError line naming run config ``key`` otherwise."""
    out: dict[str, StrategyParam] = {}
    for entry in text.replace(",", " ").split():
        try:
            name, value = parse_param(entry)
        except ConfigError:
            raise ConfigError(f"run config {key}: each entry needs KEY=VALUE, got "
                              f"'{entry}'") from None
        out[name] = value
    return out


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class Config:
    """Settings of one continual federated run. Each field is documented in its ``help``."""

    # --- federation ------------------------------------------------------------------------
    clients: int = field(default=50, metadata=_doc("Number of clients (Flower SuperNodes)."))
    fraction_train: float = field(
        default=1.0,
        metadata=_doc("Fraction of clients sampled for training each round, in (0, 1]."),
    )
    min_train_clients: int = field(
        default=1,
        metadata=_doc(
            "Fewest successful client replies a round accepts; with fewer the run stops "
            "with an error."
        ),
    )
    round_timeout_s: float = field(
        default=600.0,
        metadata=_doc("Seconds the server waits for a round's replies before going on without."),
    )
    max_update_norm_ratio: float = field(
        default=100.0,
        metadata=_doc(
            "A client reply whose distance to the global model exceeds this multiple of the "
            "model's norm is rejected as absurd (with NaNs, wrong shapes, missing keys)."
        ),
    )
    client_fault_rate: float = field(
        default=0.0,
        metadata=_doc(
            "Fault injection: the share of sampled clients that raise an error in each round "
            "(drawn from seed, round and client), to test how a run copes with failures."
        ),
    )
    client_fault_mode: str = field(
        default="raise",
        metadata=_doc(
            "How an injected fault shows: raise (the client raises), hang (it answers only "
            "after round_timeout_s has passed) or vanish (its process exits)."
        ),
    )
    # --- data and scenario -----------------------------------------------------------------
    dataset: str = field(
        default="mnist",
        metadata=_doc(
            "mnist (bundled, needs no files), mnist-torchvision, fashion-mnist, cifar10 or "
            "cifar100 (torchvision files under data_dir)."
        ),
    )
    scenario: str = field(
        default="class-il",
        metadata=_doc(
            "class-il (split classes, one head, no task id at test time), task-il (split "
            "classes, one head per task, task id given) or domain-il (same classes, shifted "
            "inputs, one head)."
        ),
    )
    domain_shift: str = field(
        default="permute",
        metadata=_doc(
            "domain-il only: permute (Permuted-MNIST style, task 0 unpermuted) or rotate "
            "(task t rotated by 180*t/tasks degrees)."
        ),
    )
    tasks: int = field(default=5, metadata=_doc("Number of tasks in the stream."))
    task_order_seed: int | None = field(
        default=None,
        metadata=_doc(
            "Seed that shuffles the class order (split scenarios) or the order of rotations; "
            "unset keeps the natural order. Permutations always come from seed."
        ),
    )
    partition: str = field(
        default="dirichlet",
        metadata=_doc("How each task's data is split across clients: iid, dirichlet or shards."),
    )
    dirichlet_alpha: float = field(
        default=0.5, metadata=_doc("Concentration of the dirichlet partition (smaller: more skew).")
    )
    shards_per_client: int = field(
        default=2, metadata=_doc("Label-sorted shards per client for the shards partition.")
    )
    data_dir: str = field(
        default="data",
        metadata=_doc("Folder holding torchvision datasets (<data_dir>/MNIST/raw, ...)."),
    )
    download: bool = field(
        default=True,
        metadata=_doc("Try to download a missing torchvision dataset into data_dir."),
    )
    # --- model and local training ----------------------------------------------------------
    model: str = field(
        default="mlp",
        metadata=_doc("mlp (784-400-400), mlp-fot (784-400-400-400, FOT's code), cnn (small "
                      "CNN) or resnet18 (reduced)."),
    )
    rounds_per_task: int = field(default=3, metadata=_doc("Federated rounds on each task."))
    local_epochs: int = field(default=1, metadata=_doc("Local epochs per round on each client."))
    batch_size: int = field(default=32, metadata=_doc("Local mini-batch size."))
    optimizer: str = field(default="sgd", metadata=_doc("Local optimizer: sgd or adam."))
    lr: float = field(default=0.01, metadata=_doc("Local learning rate."))
    momentum: float = field(default=0.0, metadata=_doc("SGD momentum."))
    weight_decay: float = field(default=0.0, metadata=_doc("Local weight decay."))
    gradient_restriction: float = field(
        default=0.0,
        metadata=_doc(
            "Weight alpha of the gradient-restriction loss in local training, for every "
            "strategy: each step minimises L + alpha * sum over parameter tensors of "
            "||grad L||_2, L the batch's loss before any regularizer (the cross-entropy, and a "
            "method's own loss terms), by double backprop; small gradients let one gradient "
            "step approximate removing data (IAU, Liu et al., arXiv 2507.23257; the paper's "
            "alpha is 0.005). 0 turns it off; not with "
            "cohort_size > 1."
        ),
    )
    # --- strategy --------------------------------------------------------------------------
    strategy: str = field(
        default="fedavg", metadata=_doc("Server strategy by name (see `fedcl strategies`).")
    )
    strategy_params: dict[str, StrategyParam] = field(
        default_factory=dict,
        metadata=_doc(
            "The strategy's own parameters (TOML table [strategy_params], flag "
            "--strategy-param KEY=VALUE); unknown keys are refused."
        ),
    )
    # --- evaluation ------------------------------------------------------------------------
    eval_samples_per_task: int = field(
        default=0,
        metadata=_doc(
            "Test samples per task the server evaluates on after every round (a fixed, "
            "seeded subset); 0 uses the whole test split."
        ),
    )
    eval_batch_size: int = field(default=1000, metadata=_doc("Batch size of server evaluation."))
    intransigence_reference: str = field(
        default="",
        metadata=_doc(
            "Intransigence's reference A*: one accuracy per task in [0, 1], comma-separated, "
            "A*_k being task k's accuracy of a model trained jointly on tasks 0..k with the "
            "same split, rounds and optimizer (Chaudhry et al. 2018; fedcl does not train it). "
            "Empty: intransigence is not reported (null)."
        ),
    )
    # --- runtime ---------------------------------------------------------------------------
    seed: int = field(
        default=0,
        metadata=_doc("Seed of model init, partitions, client sampling and local training."),
    )
    device: str = field(
        default="auto", metadata=_doc("auto (cuda when there is one), cpu or cuda.")
    )
    client_cpus: float = field(default=1.0, metadata=_doc("CPUs reserved per simulated client."))
    client_gpus: float = field(
        default=0.0, metadata=_doc("GPUs per simulated client (fractions share a GPU).")
    )
    cohort_size: int = field(
        default=1,
        metadata=_doc(
            "Simulated clients trained together in one ClientApp call as one batched (vmap) "
            "computation; 1 trains each client on its own. Same results to float rounding "
            "(not for dropout masks); no batch-norm models; simulation only."
        ),
    )
    ray_address: str = field(
        default="",
        metadata=_doc(
            "Ray cluster the simulated clients run on: empty starts a private Ray instance on "
            "this machine (stopped at the end); 'auto' joins the cluster that `ray start` "
            "runs on this machine; HOST:PORT joins the cluster whose head listens there. A "
            "cluster fedcl joined is left running. Simulation only."
        ),
    )
    # --- erasure requests and unlearning -----------------------------------------------------
    erasures: str = field(
        default="",
        metadata=_doc(
            "Erasure requests, separated by ';' (flag: repeat --erase), e.g. "
            "'client=7,after-task=2', 'class=3,after-task=2' or 'client=3,class=1,task=1,"
            "round=2' (tasks from 0, rounds within a task from 1). An erased client leaves the "
            "federation; an erased class is left out of the clients' data from then on."
        ),
    )
    unlearning: str = field(
        default="retrain",
        metadata=_doc(
            "How the model forgets an erasure: retrain (the exact oracle: retrain from the "
            "initial model without the data: each round's sampled clients minus the erased ones, "
            "same seeds), ssd, federaser, "
            "projection, gs-lora or iau (see `fedcl strategies`)."
        ),
    )
    unlearning_params: dict[str, StrategyParam] = field(
        default_factory=dict,
        metadata=_doc(
            "The unlearning method's own parameters (TOML table [unlearning_params], flag "
            "--unlearning-param KEY=VALUE); unknown keys are refused."
        ),
    )
    # --- tracking and output ---------------------------------------------------------------
    tracking_uri: str | None = field(
        default=None,
        metadata=_doc(
            "MLflow tracking URI; unset uses $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
        ),
    )
    tracking_wait_s: float = field(
        default=60.0,
        metadata=_doc(
            "At the end of a run, seconds to wait for an unreachable MLflow server; metrics "
            "still unsent then stay in <output>/mlflow_outbox.jsonl for `fedcl sync`."
        ),
    )
    experiment: str = field(default="fedcl", metadata=_doc("MLflow experiment name."))
    run_name: str | None = field(
        default=None,
        metadata=_doc(
            "MLflow run name (at most 250 characters; without '/' when it names the output "
            "folder); unset: <strategy>-<scenario>-<time>."
        ),
    )
    output: str | None = field(
        default=None,
        metadata=_doc(
            "Folder for summary.json and plots: a new or empty one (or the one --resume "
            "continues); unset: outputs/<run name>, or $FEDCL_OUTPUTS/<run name>."
        ),
    )

    # -----------------------------------------------------------------------------------------
    def validate(self) -> Config:
        """Check the fields on their own and against each other; raise :class:`ConfigError`
        naming the first bad one. Names resolved through the registries (dataset, model,
        strategy, unlearning and their parameters) and the erasure schedule are checked by
        :func:`fedcl.run_setup.setup_run`, which calls this first."""
        positive = ("clients", "tasks", "rounds_per_task", "local_epochs", "batch_size",
                    "shards_per_client", "eval_batch_size", "min_train_clients", "cohort_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("seed", "task_order_seed"):  # numpy and torch take seeds in [0, 2^63)
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**63:
                raise ConfigError(f"{name} must be an integer from 0 to 2^63 - 1, got {value}")
        if self.eval_samples_per_task < 0:
            raise ConfigError(
                f"eval_samples_per_task must be 0 or more, got {self.eval_samples_per_task}"
            )
        if not (0.0 < self.fraction_train <= 1.0):
            raise ConfigError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        for name in ("lr", "dirichlet_alpha", "round_timeout_s", "client_cpus",
                     "max_update_norm_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        for name in ("momentum", "weight_decay", "gradient_restriction", "client_gpus",
                     "tracking_wait_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value}")
        if not 0.0 <= self.client_fault_rate <= 1.0:
            raise ConfigError(f"client_fault_rate must be in [0, 1], got {self.client_fault_rate}")
        if self.momentum >= 1:
            raise ConfigError(f"momentum must be below 1, got {self.momentum}")
        if self.gradient_restriction > 0 and self.cohort_size > 1:
            raise ConfigError("gradient_restriction > 0 cannot train in cohorts (cohort_size > "
                              "1): its double backprop is not batched across a cohort's "
                              "members; use cohort_size = 1")
        _check_choice("client_fault_mode", self.client_fault_mode, FAULT_MODES)
        _check_choice("scenario", self.scenario, SCENARIOS)
        _check_choice("domain_shift", self.domain_shift, DOMAIN_SHIFTS)
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("device", self.device, DEVICES)
        check_ray_address(self.ray_address)
        reference = reference_accuracies(self.intransigence_reference)
        if reference is not None and len(reference) != self.tasks:
            raise ConfigError(
                f"intransigence_reference needs one accuracy per task ({self.tasks}), got "
                f"{len(reference)}")
        if not self.experiment.strip():
            raise ConfigError("experiment must be a non-empty name")
        min_clients, sampled = self.min_train_clients, sample_size(self.clients,
                                                                   self.fraction_train)
        if min_clients > self.clients:
            raise ConfigError(
                f"min_train_clients ({min_clients}) is larger than clients ({self.clients})"
            )
        if min_clients > sampled:
            raise ConfigError(
                f"min_train_clients ({min_clients}) is larger than the {sampled} clients "
                f"sampled per round (clients x fraction_train)")
        return self

    # --- conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        """TOML that :func:`load_toml` reads back to an equal config (unset fields left out)."""
        import tomli_w

        flat = {k: v for k, v in self.to_dict().items()
                if v is not None and k not in PARAM_TABLES}
        for table in PARAM_TABLES:
            flat[table] = dict(getattr(self, table))
        return tomli_w.dumps(flat)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flower's flat, kebab-case run config. Every field is present (Flower refuses
        overrides of keys its defaults lack); an unset field is the empty string. It also
        holds :data:`RESUME_KEY`, empty: a run's output folder there makes a deployment run
        continue that run from its checkpoint instead (:func:`fedcl.server_app.run_config_job`)."""
        out: dict[str, bool | int | float | str] = {RESUME_KEY: ""}
        for key, value in self.to_dict().items():
            if key in PARAM_TABLES:
                out[RUN_CONFIG_PARAM_LISTS[key]] = ""
                for pkey, pvalue in value.items():
                    out[PARAM_TABLES[key] + pkey.replace("_", "-")] = pvalue
            else:
                out[key.replace("_", "-")] = "" if value is None else value
        return out

    @classmethod
    def from_run_config(cls, run_config: typing.Mapping[str, Any]) -> Config:
        """Inverse of :meth:`to_run_config` (the empty string unsets an optional field).
        ``strategy-params`` / ``unlearning-params`` take a list ``"beta=0.5,anchor=0.1"``, so
        ``flwr run --run-config`` can set parameters the app's defaults do not declare."""
        values: dict[str, Any] = {}
        tables: dict[str, dict[str, Any]] = {}
        lists = {k: t for t, k in RUN_CONFIG_PARAM_LISTS.items()}
        for key, value in run_config.items():
            if key == RESUME_KEY:  # not a setting: which run to continue (read by the ServerApp)
                continue
            table = next((t for t, prefix in PARAM_TABLES.items() if key.startswith(prefix)),
                         None)
            if key in lists:  # "strategy-params": a list of KEY=VALUE
                if not isinstance(value, str):
                    raise ConfigError(f"run config {key} must be a string of KEY=VALUE "
                                      f"entries, got {value!r}")
                tables.setdefault(lists[key], {}).update(parse_param_list(value, key))
            elif table is not None:
                name = key[len(PARAM_TABLES[table]):].replace("-", "_")
                tables.setdefault(table, {})[name] = value
            else:
                name = key.replace("-", "_")
                unset = value == "" and name in FIELDS and field_type(name)[1]
                values[name] = None if unset else value
        values.update(tables)
        return config_from_dict(values, source="the Flower run config")

    @classmethod
    def from_json(cls, text: str) -> Config:
        return config_from_dict(json.loads(text), source="a config message")


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Config)}

#: The Flower run config's key naming the output folder of a stopped deployment run to continue
#: from its checkpoint (``flwr run --run-config "resume='DIR'"``, ``fedcl submit --resume
#: DIR``); not a :class:`Config` field: the run goes on with the config in its checkpoint.
RESUME_KEY = "resume"
_HINTS = typing.get_type_hints(Config)


def field_type(name: str) -> tuple[type, bool]:
    """The scalar type of a field and whether it may be unset (None)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    if typing.get_origin(hint) is dict:
        return dict, False
    return hint, False


def check_ray_address(address: str) -> None:
    """``ray_address`` is empty, ``auto`` or ``HOST:PORT`` (port 1-65535); else
    :class:`ConfigError` naming the forms."""
    if address in ("", "auto"):
        return
    host, sep, port = address.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536 and "/" not in host:
        return
    raise ConfigError(f"ray_address must be empty, 'auto' or HOST:PORT (e.g. 10.0.0.5:6379), "
                      f"got {address!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} '{value}'{_suggest(value, choices)}; "
                          f"choose one of {', '.join(choices)}")


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(name: str, value: Any, source: str) -> Any:
    """Check that a TOML/JSON value fits field ``name``'s type; ints are accepted for floats."""
    typ, optional = field_type(name)
    where = f" in {source}" if source else ""
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{name}'{where} cannot be empty")
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{name}'{where} must be a table of KEY = VALUE")
        for key, item in value.items():
            if not isinstance(item, bool | int | float | str):
                raise ConfigError(
                    f"{name.removesuffix('_params')} parameter '{key}'{where} must be a number, "
                    "string or boolean"
                )
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{name}'{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{name}'{where} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"config key '{name}'{where} must be a finite number")
            return value
        raise ConfigError(f"config key '{name}'{where} must be a number, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"config key '{name}'{where} must be a string, got {value!r}")


def config_from_dict(values: typing.Mapping[str, Any], source: str = "", base: Config | None = None
                     ) -> Config:
    """Build a config from plain values, refusing unknown keys and wrong types."""
    out = dataclasses.replace(base) if base is not None else Config()
    for key, value in values.items():
        if key not in FIELDS:
            where = f" in {source}" if source else ""
            raise ConfigError(f"unknown config key '{key}'{where}{_suggest(key, FIELDS)}")
        setattr(out, key, coerce(key, value, source))
    return out


def load_toml(path: str | os.PathLike[str], base: Config | None = None) -> Config:
    """Read a TOML config file over ``base`` (defaults when None)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        values = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"malformed TOML in {file}: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not UTF-8 text") from None
    return config_from_dict(values, source=str(file), base=base)



def reference_accuracies(text: str) -> list[float] | None:
    """``intransigence_reference`` as numbers (None when empty); raises :class:`ConfigError`
    for anything but comma-separated fractions in [0, 1]."""
    if not text.strip():
        return None
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"intransigence_reference: {part.strip()!r} is not a number "
                              "(comma-separated accuracies in [0, 1])") from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"intransigence_reference: {value:g} is not an accuracy in "
                              "[0, 1] (fractions, not percent)")
        values.append(value)
    return values


def sample_size(available: int, fraction: float) -> int:
    """Clients sampled in a round from ``available`` connected ones: ``max(1, int(f * n))``."""
    return max(1, int(available * fraction))


def resolve_tracking_uri(config: Config) -> str:
    """The tracking URI in force: the config's, else $MLFLOW_TRACKING_URI, else local sqlite."""
    return config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
