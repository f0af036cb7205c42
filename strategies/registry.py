"""The strategy registry: each strategy registers itself by name with a decorator.

An entry pairs the server half (a Flower ``Strategy`` built from the run config and the
strategy's typed parameters) with the client half (a :class:`fedcl.training.LocalTrainer`).
``fedcl strategies`` lists the entries; ``Config.validate`` checks names and parameters here.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcl.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fedcl.config import Config
    from fedcl.data.scenarios import Scenario
    from fedcl.strategy import ContinualStrategy
    from fedcl.training import LocalTrainer


@dataclass(frozen=True)
class NoParams:
    """A strategy without parameters of its own."""


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    summary: str
    params: type
    build: Callable[[Config, Any], ContinualStrategy]
    trainer: Callable[[Any], LocalTrainer]
    # wraps the config's model for the method (PRD adds a projector and prototypes)
    model: Callable[[Any, Scenario, nn.Module], nn.Module] | None = None


_REGISTRY: dict[str, StrategyEntry] = {}


def register(name: str, summary: str, *, params: type = NoParams,
             trainer: Callable[[Any], LocalTrainer] | None = None,
             model: Callable[[Any, Scenario, nn.Module], nn.Module] | None = None
             ) -> Callable[[Callable[[Config, Any], ContinualStrategy]],
                           Callable[[Config, Any], ContinualStrategy]]:
    """Register ``build(config, params) -> strategy`` under ``name``."""

    def deco(build: Callable[[Config, Any], ContinualStrategy]
             ) -> Callable[[Config, Any], ContinualStrategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy '{name}' registered twice")
        from fedcl.training import LocalTrainer

        _REGISTRY[name] = StrategyEntry(name, summary, params, build,
                                        trainer or (lambda _p: LocalTrainer()), model)
        return build

    return deco


def _load_all() -> None:
    import strategies  # noqa: F401  (importing the package registers every strategy)


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> StrategyEntry:
    _load_all()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown strategy '{name}'{hint}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


def typed_params(params_type: type, values: Mapping[str, Any], owner: str) -> Any:
    """``params_type`` (a dataclass) from plain values; unknown keys and bad types refused
    with one line naming ``owner``; the dataclass's ``check()`` runs when it has one."""
    known = {f.name: f for f in dataclasses.fields(params_type)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            listing = ", ".join(known) or "none"
            raise ConfigError(f"unknown parameter '{key}' for {owner} (its parameters: "
                              f"{listing})")
        default = known[key].default
        typ = type(default) if default is not dataclasses.MISSING else str
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise ConfigError(f"parameter '{key}' of {owner} must be {typ.__name__}, "
                              f"got {value!r}")
        kwargs[key] = value
    params = params_type(**kwargs)
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def parse_params(name: str, values: Mapping[str, Any]) -> Any:
    """The strategy's typed parameters from plain values; unknown keys and bad types refused."""
    return typed_params(get(name).params, values, f"strategy '{name}'")


def validate(name: str, values: Mapping[str, Any]) -> None:
    parse_params(name, values)


def build(config: Config) -> ContinualStrategy:
    """The server half of ``config.strategy``."""
    entry = get(config.strategy)
    return entry.build(config, parse_params(config.strategy, config.strategy_params))


def build_trainer(config: Config) -> LocalTrainer:
    """The client half of ``config.strategy``."""
    entry = get(config.strategy)
    return entry.trainer(parse_params(config.strategy, config.strategy_params))


def build_model(config: Config, scenario: Scenario) -> nn.Module:
    """The run's model, initialised from ``config.seed`` (server and clients build the same),
    wrapped by the strategy when it needs more than the plain model."""
    import torch

    from fedcl.models import build_model as build_base

    torch.manual_seed(config.seed)
    model = build_base(config.model, scenario.dataset.input_shape, scenario.classes_per_head,
                       scenario.num_heads)
    entry = get(config.strategy)
    if entry.model is not None:
        model = entry.model(parse_params(config.strategy, config.strategy_params), scenario,
                            model)
    return model
