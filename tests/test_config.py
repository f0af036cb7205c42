"""Tests for fedcl.config: defaults, conversions (TOML, Flower run config, JSON), type checks,
validation messages, tracking URI resolution, the shipped simulations/*.toml files and the
[tool.flwr.app.config] table of pyproject.toml."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedcl.config import (
    RUN_CONFIG_STRATEGY_PREFIX,
    Config,
    config_from_dict,
    load_toml,
    resolve_tracking_uri,
)
from fedcl.errors import ConfigError
from fedcl.run_setup import setup_run

ROOT = Path(__file__).resolve().parents[1]
SIMULATIONS = ROOT / "simulations"
SIMULATION_FILES = sorted(SIMULATIONS.glob("*.toml")) if SIMULATIONS.is_dir() else []


def _custom() -> Config:
    """A config away from the defaults, with strategy parameters and Optional fields set."""
    return Config(
        clients=7, fraction_train=0.5, tasks=2, rounds_per_task=4, dataset="mnist",
        scenario="task-il", partition="shards", shards_per_client=3, model="cnn", lr=0.05,
        strategy="fedprox", strategy_params={"proximal_mu": 0.1}, task_order_seed=11,
        run_name="my-run", tracking_uri="sqlite:///elsewhere.db", download=False,
    )


# --- defaults and round trips ---------------------------------------------------------------
def test_defaults_validate() -> None:
    config = Config()
    assert config.validate() is config
    assert setup_run(config).config is config


def test_custom_config_validates() -> None:
    _custom().validate()
    setup = setup_run(_custom())
    assert setup.strategy.name == "fedprox" and setup.strategy_params.proximal_mu == 0.1


@pytest.mark.parametrize("config", [Config(), _custom()], ids=["defaults", "custom"])
def test_toml_round_trip(config: Config, tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    loaded = load_toml(path)
    assert loaded == config
    assert setup_run(loaded).config == config


def test_toml_leaves_unset_fields_out() -> None:
    values = tomllib.loads(Config().to_toml())
    assert "task_order_seed" not in values
    assert "run_name" not in values
    assert values["strategy_params"] == {}


def test_load_toml_over_base(tmp_path: Path) -> None:
    path = tmp_path / "part.toml"
    path.write_text("tasks = 2\n", encoding="utf-8")
    loaded = load_toml(path, base=Config(clients=9))
    assert (loaded.clients, loaded.tasks) == (9, 2)


@pytest.mark.parametrize("config", [Config(), _custom()], ids=["defaults", "custom"])
def test_run_config_round_trip(config: Config) -> None:
    run_config = config.to_run_config()
    assert all("_" not in key for key in run_config)
    assert Config.from_run_config(run_config) == config


def test_run_config_strategy_params_are_prefixed() -> None:
    run_config = _custom().to_run_config()
    assert run_config["strategy-param.proximal-mu"] == 0.1
    assert RUN_CONFIG_STRATEGY_PREFIX == "strategy-param."
    assert run_config["strategy-params"] == "" == run_config["unlearning-params"]
    assert run_config["task-order-seed"] == 11
    assert run_config["output"] == ""  # unset fields are the empty string (Flower needs every key)
    assert Config.from_run_config(run_config).output is None


def test_run_config_takes_a_methods_parameters_as_one_list() -> None:
    """``flwr run --run-config "strategy-params='mu=0.3,flag=true'"``: Flower refuses keys the
    app's defaults do not declare, so one declared key carries any method's parameters;
    entries are typed as on the command line and win over the prefixed keys."""
    run_config = {**Config().to_run_config(), "strategy": "fedprox",
                  "strategy-params": "proximal-mu=0.3, flag=true name=x",
                  "unlearning-params": "alpha=2"}
    config = Config.from_run_config(run_config)
    assert config.strategy_params == {"proximal_mu": 0.3, "flag": True, "name": "x"}
    assert config.unlearning_params == {"alpha": 2}
    with pytest.raises(ConfigError, match=r"^run config strategy-params: each entry needs "
                                          r"KEY=VALUE, got 'mu'$"):
        Config.from_run_config({**run_config, "strategy-params": "mu"})
    with pytest.raises(ConfigError, match=r"^run config unlearning-params must be a string"):
        Config.from_run_config({**run_config, "unlearning-params": 3})


@pytest.mark.parametrize("config", [Config(), _custom()], ids=["defaults", "custom"])
def test_json_round_trip(config: Config) -> None:
    assert Config.from_json(config.to_json()) == config


# --- config_from_dict: keys and types -------------------------------------------------------
@pytest.mark.parametrize(("key", "suggestion"), [
    ("clinets", "clients"),
    ("rounds_per_tsk", "rounds_per_task"),
    ("strategy_param", "strategy_params"),
])
def test_unknown_key_suggests_close_match(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'") as err:
        config_from_dict({key: 3}, source="x.toml")
    assert f"did you mean '{suggestion}'" in str(err.value)
    assert "in x.toml" in str(err.value)


def test_unknown_key_without_close_match() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'zzzzzz'") as err:
        config_from_dict({"zzzzzz": 1})
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize(("key", "value", "phrase"), [
    ("clients", "many", "must be an integer"),
    ("clients", True, "must be an integer"),
    ("clients", 3.0, "must be an integer"),
    ("tasks", 2.5, "must be an integer"),
    ("lr", "fast", "must be a number"),
    ("lr", True, "must be a number"),
    ("lr", float("inf"), "must be a finite number"),
    ("download", 1, "must be true or false"),
    ("dataset", 5, "must be a string"),
    ("clients", None, "cannot be empty"),
    ("strategy_params", 3, "must be a table"),
    ("strategy_params", {"proximal_mu": [1, 2]}, "must be a number, string or boolean"),
])
def test_wrong_types_refused(key: str, value: Any, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase) as err:
        config_from_dict({key: value})
    assert key in str(err.value) or key == "strategy_params"


def test_int_accepted_for_float() -> None:
    config = config_from_dict({"lr": 1, "fraction_train": 1, "round_timeout_s": 30})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert isinstance(config.fraction_train, float)
    assert isinstance(config.round_timeout_s, float)


def test_none_accepted_for_optional() -> None:
    config = config_from_dict({"task_order_seed": None, "run_name": None})
    assert config.task_order_seed is None and config.run_name is None


def test_from_dict_leaves_base_untouched() -> None:
    base = Config()
    out = config_from_dict({"clients": 3}, base=base)
    assert out.clients == 3 and base.clients == 50


# --- validate() -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clients", "tasks", "rounds_per_task", "local_epochs",
                                  "batch_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_counts(name: str, value: int) -> None:
    config = dataclasses.replace(Config(), **{name: value})
    with pytest.raises(ConfigError, match=rf"^{name} must be a positive integer, got {value}$"):
        config.validate()


@pytest.mark.parametrize("name", ["seed", "task_order_seed"])
@pytest.mark.parametrize("value", [-1, 2**63])
def test_seeds_outside_what_numpy_and_torch_take(name: str, value: int) -> None:
    """A negative seed once reached numpy's SeedSequence and came out as a traceback."""
    config = dataclasses.replace(Config(), **{name: value})
    with pytest.raises(ConfigError, match=rf"^{name} must be an integer from 0 to 2\^63 - 1, "
                                          rf"got {value}$"):
        config.validate()
    dataclasses.replace(Config(), **{name: 2**63 - 1}).validate()


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_fraction_train_out_of_range(value: float) -> None:
    with pytest.raises(ConfigError, match=r"fraction_train must be in \(0, 1\]"):
        Config(fraction_train=value).validate()


def test_fraction_train_one_is_fine() -> None:
    Config(fraction_train=1.0).validate()


@pytest.mark.parametrize(("name", "value", "suggestion"), [
    ("scenario", "class_il", "class-il"),
    ("dataset", "mnits", "mnist"),
    ("model", "resnet", "resnet18"),
    ("strategy", "fedprx", "fedprox"),
    ("partition", "dirichlt", "dirichlet"),
    ("device", "cude", "cuda"),
])
def test_unknown_choices(name: str, value: str, suggestion: str) -> None:
    config = dataclasses.replace(Config(), **{name: value})
    with pytest.raises(ConfigError, match=rf"unknown {name} '{value}'") as err:
        setup_run(config)
    message = str(err.value)
    assert f"did you mean '{suggestion}'" in message
    assert "choose one of" in message and suggestion in message


def test_unknown_choice_without_suggestion() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; choose one of") as err:
        setup_run(Config(dataset="imagenet"))
    assert "did you mean" not in str(err.value)


def test_unknown_strategy_parameter() -> None:
    config = Config(strategy="fedavg", strategy_params={"proximal_mu": 0.1})
    with pytest.raises(ConfigError, match="unknown parameter 'proximal_mu' for strategy 'fedavg'"):
        setup_run(config)


def test_unknown_fedprox_parameter_lists_known_ones() -> None:
    config = Config(strategy="fedprox", strategy_params={"mu": 0.1})
    with pytest.raises(ConfigError, match=r"its parameters: proximal_mu"):
        setup_run(config)


@pytest.mark.parametrize("value", ["big", True])
def test_proximal_mu_wrong_type(value: Any) -> None:
    config = Config(strategy="fedprox", strategy_params={"proximal_mu": value})
    with pytest.raises(ConfigError,
                       match=r"parameter 'proximal_mu' of strategy 'fedprox' must be float"):
        setup_run(config)


def test_proximal_mu_int_accepted() -> None:
    setup = setup_run(Config(strategy="fedprox", strategy_params={"proximal_mu": 1}))
    assert setup.strategy_params.proximal_mu == 1.0


def test_negative_proximal_mu() -> None:
    config = Config(strategy="fedprox", strategy_params={"proximal_mu": -0.5})
    with pytest.raises(ConfigError, match=r"proximal_mu must be >= 0, got -0.5"):
        setup_run(config)


def test_min_train_clients_above_clients() -> None:
    with pytest.raises(ConfigError,
                       match=r"min_train_clients \(5\) is larger than clients \(4\)"):
        Config(clients=4, min_train_clients=5).validate()
    Config(clients=4, min_train_clients=4).validate()


def test_min_train_clients_above_the_sampled_clients() -> None:
    """10 clients x 0.25 samples 2 per round: a minimum of 3 could never be met."""
    with pytest.raises(ConfigError, match=r"min_train_clients \(3\) is larger than the 2 "
                                          r"clients sampled per round"):
        Config(clients=10, fraction_train=0.25, min_train_clients=3).validate()
    Config(clients=10, fraction_train=0.25, min_train_clients=2).validate()


# --- tracking URI ---------------------------------------------------------------------------
def test_tracking_uri_from_config_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(Config(tracking_uri="sqlite:///cfg.db")) == "sqlite:///cfg.db"


def test_tracking_uri_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(Config()) == "http://env:5000"


def test_tracking_uri_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(Config()) == "sqlite:///mlflow.db"


# --- shipped files --------------------------------------------------------------------------
def test_simulations_folder_has_toml_files_if_not_empty() -> None:
    if SIMULATIONS.is_dir() and any(p.is_file() for p in SIMULATIONS.iterdir()):
        assert SIMULATION_FILES, f"{SIMULATIONS} has files but no *.toml"


@pytest.mark.parametrize("path", SIMULATION_FILES, ids=[p.name for p in SIMULATION_FILES])
def test_simulation_file_loads_and_validates(path: Path) -> None:
    setup_run(load_toml(path))


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML reads dotted keys (``strategy-param.proximal-mu``) as nested tables; flatten them
    back the way Flower does."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_pyproject_flower_config_matches_defaults() -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        pyproject = tomllib.load(fh)
    table = _flatten(pyproject["tool"]["flwr"]["app"]["config"])
    expected = Config().to_run_config()
    assert table == expected
    # == treats 50 and 50.0 as equal; the types must agree too.
    assert {k: type(v) for k, v in table.items()} == {k: type(v) for k, v in expected.items()}
    assert Config.from_run_config(table) == Config()
