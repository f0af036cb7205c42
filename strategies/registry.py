"""The old name of the strategy registry, kept while callers move to :mod:`fedcl.plugins`.

Every name here is :mod:`fedcl.plugins`'s: ``register`` is
:func:`~fedcl.plugins.register_strategy`, ``get`` :func:`~fedcl.plugins.get_strategy`, and so on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcl.plugins import NoParams, StrategySpec, build_model, build_trainer, typed_params
from fedcl.plugins import build_strategy as build
from fedcl.plugins import get_strategy as get
from fedcl.plugins import parse_strategy_params as parse_params
from fedcl.plugins import register_strategy as register
from fedcl.plugins import strategy_names as names

StrategyEntry = StrategySpec


def validate(name: str, values: Mapping[str, Any]) -> None:
    """Raise :class:`~fedcl.errors.ConfigError` unless ``values`` are strategy ``name``'s
    parameters."""
    parse_params(name, values)


__all__ = ["NoParams", "StrategyEntry", "build", "build_model", "build_trainer", "get", "names",
           "parse_params", "register", "typed_params", "validate"]
