"""Federated unlearning methods: how a run forgets an erasure request.

Each method registers itself by name (``--unlearning NAME``, config ``unlearning``) with its
typed parameters (``--unlearning-param KEY=VALUE``, TOML table ``[unlearning_params]``). A
method wraps the run's training strategy: it gets an :class:`UnlearningJob` (the request, the
global model, what is erased, the clients and the grid) and returns the unlearned model, and
optionally the training strategy to go on with. Work on client data runs on the clients, as
named operations of a QUERY message (:mod:`strategies.unlearning.client_ops`); training rounds
go through the run's own strategy (:func:`fedcl.server_app.train_round`).

Methods: ``retrain`` (the exact oracle, also what every other method is judged against),
``ssd``, ``federaser``, ``projection``, ``gs-lora``; see each module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedcl.errors import ConfigError
from fedcl.unlearning_api import UnlearningMethod
from strategies.registry import NoParams, typed_params


@dataclass(frozen=True)
class MethodEntry:
    name: str
    summary: str
    params: type
    build: Callable[[Any, Any], UnlearningMethod]


_METHODS: dict[str, MethodEntry] = {}


def register(name: str, summary: str, *, params: type = NoParams
             ) -> Callable[[Callable[[Any, Any], UnlearningMethod]],
                           Callable[[Any, Any], UnlearningMethod]]:
    """Register ``build(params, out_dir) -> UnlearningMethod`` under ``name``."""

    def deco(build: Callable[[Any, Any], UnlearningMethod]
             ) -> Callable[[Any, Any], UnlearningMethod]:
        if name in _METHODS:
            raise ValueError(f"unlearning method '{name}' registered twice")
        _METHODS[name] = MethodEntry(name, summary, params, build)
        return build

    return deco


def _load_all() -> None:
    from strategies.unlearning import (  # noqa: F401  (registration by import)
        federaser,
        gs_lora,
        projection,
        retrain,
        ssd,
    )


def names() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get(name: str) -> MethodEntry:
    _load_all()
    if name not in _METHODS:
        raise ConfigError(f"unknown unlearning '{name}'; choose one of {', '.join(names())}")
    return _METHODS[name]


def parse_params(name: str, values: Mapping[str, Any]) -> Any:
    entry = get(name)
    return typed_params(entry.params, values, f"unlearning method '{name}'")


def build(config: Any, out_dir: Any = None) -> UnlearningMethod:
    entry = get(config.unlearning)
    return entry.build(parse_params(config.unlearning, config.unlearning_params), out_dir)


__all__ = ["MethodEntry", "build", "get", "names", "parse_params", "register"]
