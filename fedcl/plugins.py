"""The registry of fedcl's extension points: strategies, unlearning methods, models, datasets.

Each kind is registered with a decorator that records a spec (name, summary, typed
parameters, builders) and attaches it to the decorated function as ``fedcl_spec``:

=================== ========================================== ======================
kind                decorator, on                              entry point group
=================== ========================================== ======================
strategy            :func:`register_strategy`,                 ``fedcl.strategies``
                    ``build(config, params) -> strategy``
unlearning method   :func:`register_unlearning`,               ``fedcl.unlearning``
                    ``build(params, out_dir) -> method``
model               :func:`register_model`,                    ``fedcl.models``
                    ``build(input_shape, classes_per_head,
                    num_heads) -> nn.Module``
dataset             :func:`register_dataset`,                  ``fedcl.datasets``
                    ``load(data_dir, download) -> Dataset``
=================== ========================================== ======================

A name in a config (``strategy = "fedprox"``) is resolved in this order:

1. a spec registered already in this process;
2. a built-in: strategies and unlearning methods are named by string reference in
   :data:`BUILTIN_STRATEGIES` / :data:`BUILTIN_UNLEARNING` and imported only when asked (client
   processes start often, and a run needs one strategy of several); models and datasets are
   declared in :data:`fedcl.models.MODELS` and :data:`fedcl.data.datasets.DATASETS`;
3. an installed package's entry point of that name in the kind's group, e.g. in its
   ``pyproject.toml``::

       [project.entry-points."fedcl.strategies"]
       mystrategy = "mypkg.strategy:build_mystrategy"

4. a ``package.module:Name`` reference (the name contains ``:``) to a decorated function or
   to a spec object.

An unknown name is a one-line :class:`~fedcl.errors.ConfigError` with a close match and the known
names; a plugin that cannot be imported, or is not a registered object of its kind, is a one-line
:class:`PluginError` naming the reference and the reason. Both reach the user before a run
starts (:func:`fedcl.run_setup.setup_run`).

fedcl never imports the ``strategies`` package statically: its built-ins load like any plugin.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import math
import textwrap
import traceback
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from fedcl.config import Config
from fedcl.data.datasets import BUILTIN_DATASETS, DATASETS, DatasetInfo, add_dataset
from fedcl.data.scenarios import Scenario
from fedcl.data.scenarios import build_scenario as build_builtin_scenario
from fedcl.errors import ConfigError, FedclError
from fedcl.models import MODELS, ModelSpec
from fedcl.strategy import Capabilities, ContinualStrategy
from fedcl.training import LocalTrainer

__all__ = [
    "BUILTIN_STRATEGIES",
    "BUILTIN_UNLEARNING",
    "DatasetInfo",
    "ModelSpec",
    "NoParams",
    "ParamDoc",
    "PluginError",
    "StrategySpec",
    "UnlearningSpec",
    "build_model",
    "build_scenario",
    "build_strategy",
    "build_trainer",
    "build_unlearning",
    "dataset_names",
    "get_dataset",
    "get_model",
    "get_strategy",
    "get_unlearning",
    "model_names",
    "param_docs",
    "parse_strategy_params",
    "parse_unlearning_params",
    "register_dataset",
    "register_model",
    "register_strategy",
    "register_unlearning",
    "strategy_names",
    "typed_params",
    "unlearning_names",
]

#: The built-in strategies: name -> ``module:function`` reference, imported when first asked.
BUILTIN_STRATEGIES: dict[str, str] = {
    "fedavg": "strategies.fedavg:build_fedavg",
    "feder": "strategies.baselines.replay:build_feder",
    "fedderpp": "strategies.baselines.replay:build_fedderpp",
    "fedewc": "strategies.baselines.ewc:build_fedewc",
    "fedlwf": "strategies.baselines.lwf:build_fedlwf",
    "fedprox": "strategies.fedprox:build_fedprox",
    "fedweit": "strategies.baselines.fedweit:build_fedweit",
    "fot": "strategies.fot:build_fot",
    "glfc": "strategies.baselines.glfc:build_glfc",
    "prd": "strategies.prd:build_prd",
    "target": "strategies.baselines.target:build_target",
}

#: The built-in unlearning methods, as :data:`BUILTIN_STRATEGIES`.
BUILTIN_UNLEARNING: dict[str, str] = {
    "federaser": "strategies.unlearning.federaser:build_federaser",
    "gs-lora": "strategies.unlearning.gs_lora:build_gs_lora",
    "iau": "strategies.unlearning.iau:build_iau",
    "projection": "strategies.unlearning.projection:build_projection",
    "retrain": "strategies.unlearning.retrain:build_retrain",
    "ssd": "strategies.unlearning.ssd:build_ssd",
}


class PluginError(ConfigError):
    """A plugin named in the config cannot be imported, or is not a registered fedcl object of
    its kind. One line naming the reference and the reason; the CLI exits with status 2."""


# ---------------------------------------------------------------------------------------------
# Typed parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoParams:
    """A strategy or method without parameters of its own."""


def typed_params(params_type: type, values: Mapping[str, Any], owner: str) -> Any:
    """``params_type`` (a dataclass) from plain values.

    Each value must be of its field's annotated type (``float``, ``int``, ``bool``, ``str``,
    or one of them ``| None``; the default's type where the annotation cannot be read); ints
    are accepted for float fields. Raises a one-line :class:`ConfigError` naming ``owner``
    (e.g. ``"strategy 'fedprox'"``) for an unknown key, a value of the wrong type, a float
    that is not finite (inf, nan), a field
    without a default that is not given, or parameters that the dataclass refuses: its
    ``check()`` runs when it has one (a ConfigError it raises is kept as it is, any other
    exception from ``check()`` or ``__post_init__`` becomes a ConfigError with its message).
    """
    known = {f.name: f for f in dataclasses.fields(params_type)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            listing = ", ".join(known) or "none"
            raise ConfigError(f"unknown parameter '{key}' for {owner} (its parameters: "
                              f"{listing})")
        typ = _param_type(params_type, known[key])
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise ConfigError(f"parameter '{key}' of {owner} must be {typ.__name__}, "
                              f"got {value!r}")
        if typ is float and not math.isfinite(value):  # a weight of inf or nan trains NaN
            raise ConfigError(f"parameter '{key}' of {owner} must be a finite number, "
                              f"got {value!r}")
        kwargs[key] = value
    required = [name for name, f in known.items() if name not in kwargs
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    if required:
        raise ConfigError(f"parameter '{required[0]}' of {owner} has no default and must be "
                          "given")
    try:
        params = params_type(**kwargs)
        check = getattr(params, "check", None)
        if check is not None:
            check()
    except ConfigError:
        raise
    except Exception as err:  # the method's own refusal, in its own words, on one line
        raise ConfigError(f"parameters of {owner} refused: {one_line(err)}") from None
    return params


def _param_type(params_type: type, fld: dataclasses.Field[Any]) -> type:
    """The type a parameter's value must have: its annotation (``X | None`` read as ``X``),
    else the type of its default, else ``str``."""
    try:
        hint: Any = typing.get_type_hints(params_type).get(fld.name)
    except Exception:  # an annotation naming what the module imports only for type checkers
        hint = None
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    origin = typing.get_origin(hint)
    if isinstance(origin, type):  # tuple[int, int] -> tuple
        return origin
    if isinstance(hint, type):
        return hint
    if fld.default is not dataclasses.MISSING and fld.default is not None:
        return type(fld.default)
    return str


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


@dataclass(frozen=True)
class ParamDoc:
    """One parameter of a strategy or method, as ``fedcl strategies`` lists it."""

    name: str
    type: str  # as annotated, e.g. "float"
    default: str  # repr of the default, "" when the field has none
    doc: str  # the field's docstring on one line, "" when it has none


def param_docs(params_type: type) -> list[ParamDoc]:
    """The fields of a parameter dataclass with their type, default and docstring (the string
    literal under each field, read from the class's source when it is available)."""
    docs = _field_docstrings(params_type)
    out = []
    for f in dataclasses.fields(params_type):
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            try:
                default = repr(f.default_factory())
            except Exception:  # listing the parameters must not fail on a plugin's factory
                default = f"{getattr(f.default_factory, '__name__', 'factory')}()"
        else:
            default = ""
        out.append(ParamDoc(f.name, typ, default, docs.get(f.name, "")))
    return out


def _field_docstrings(cls: type) -> dict[str, str]:
    """The docstrings under the fields of ``cls`` and of the dataclasses it derives from (a
    subclass's own win)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object and dataclasses.is_dataclass(klass):
            docs.update(_own_field_docstrings(klass))
    return docs


def _own_field_docstrings(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for stmt, after in zip(body, [*body[1:], None], strict=True):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def _plain_trainer(params: Any) -> LocalTrainer:
    """The client half of a strategy that trains the plain way (cross-entropy)."""
    return LocalTrainer()


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: the server half ``build(config, params) -> ContinualStrategy``,
    the client half ``trainer(params) -> LocalTrainer``, and, when the
    method needs more than the config's model, ``model(params, scenario, model) -> nn.Module``
    (PRD adds a projector and prototypes)."""

    name: str
    summary: str
    params: type
    build: Callable[[Config, Any], ContinualStrategy]
    trainer: Callable[[Any], LocalTrainer] = _plain_trainer
    model: Callable[[Any, Scenario, nn.Module], nn.Module] | None = None


@dataclass(frozen=True)
class UnlearningSpec:
    """A registered unlearning method: ``build(params, out_dir) -> UnlearningMethod``."""

    name: str
    summary: str
    params: type
    build: Callable[[Any, Any], Any]


S = TypeVar("S")


class _Registry(Generic[S]):
    """The specs of one kind and how a name resolves to one (see the module docstring)."""

    def __init__(self, kind: str, word: str, group: str, spec_type: type[S], decorator: str,
                 what: str, builtins: Mapping[str, str | S]) -> None:
        self.kind = kind  # "unlearning method": in messages about one
        self.word = word  # "unlearning": the config key, in "unknown unlearning 'x'"
        self.group = group
        self.spec_type = spec_type
        self.decorator = decorator
        self.what = what  # "build function"
        self.builtins = builtins
        self.registered: dict[str, S] = {}
        self.functions: dict[str, Callable[..., Any]] = {}  # the decorated function of each
        self.resolved: dict[str, S] = {}  # name or reference as asked -> spec

    def add(self, spec: S, build: Callable[..., Any]) -> None:
        name: str = spec.name  # type: ignore[attr-defined]
        if not isinstance(name, str) or not name or ":" in name or not name.isprintable() \
                or any(ch.isspace() for ch in name):
            raise ValueError(f"{self.kind} name {name!r} is not a name: give a non-empty string "
                             "without spaces or ':' (':' marks a package.module:Name reference)")
        builtin = self.builtins.get(name)
        if builtin is not None and builtin != f"{build.__module__}:{build.__qualname__}":
            raise ValueError(f"{self.kind} '{name}' is a built-in name; register yours under "
                             "another")
        known = self.functions.get(name)
        if known is not None and not _same_function(known, build):
            raise ValueError(f"{self.kind} '{name}' registered twice (by "
                             f"{known.__module__}.{known.__qualname__} and "
                             f"{build.__module__}.{build.__qualname__})")
        self.registered[name] = spec
        self.functions[name] = build
        self.resolved.pop(name, None)

    def names(self) -> list[str]:
        """Registered, built-in and entry-point names, without importing anything."""
        eps = {ep.name for ep in importlib.metadata.entry_points(group=self.group)}
        return sorted(set(self.registered) | set(self.builtins) | eps)

    def get(self, name: str) -> S:
        spec = self.resolved.get(name)
        if spec is None:
            spec = self._resolve(name)
            self.resolved[name] = spec
        return spec

    def _resolve(self, name: str) -> S:
        label = f"{self.kind} '{name}'"
        if name in self.registered:
            return self.registered[name]
        builtin = self.builtins.get(name)
        if isinstance(builtin, str):
            module, _, attr = builtin.partition(":")
            return self._spec_of(_load(label, module, attr), label, builtin)
        if builtin is not None:
            return builtin
        for ep in importlib.metadata.entry_points(group=self.group).select(name=name):
            label = f"{label} (entry point {ep.value} in {self.group})"
            return self._spec_of(_load(label, ep.module, ep.attr), label, ep.value)
        if ":" in name:
            module, _, attr = name.partition(":")
            if not _dotted(module) or not _dotted(attr):
                raise PluginError(f"{label}: not a package.module:Name reference")
            return self._spec_of(_load(label, module, attr), label, name)
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown {self.word} '{name}'{hint}; choose one of "
                          f"{', '.join(known)} (or a package.module:Name reference)")

    def _spec_of(self, obj: Any, label: str, ref: str) -> S:
        spec = obj if isinstance(obj, self.spec_type) else getattr(obj, "fedcl_spec", None)
        if not isinstance(spec, self.spec_type):
            raise PluginError(f"{label}: {ref} is not a registered fedcl {self.kind} "
                              f"(decorate its {self.what} with fedcl.plugins.{self.decorator})")
        return spec


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same function, or its new copy after its module was imported again."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _load(label: str, module: str, attr: str | None) -> Any:
    """``module.attr`` (the module itself when ``attr`` is empty), or a one-line PluginError
    starting with ``label``."""
    try:
        obj: Any = importlib.import_module(module)
    except (Exception, SystemExit) as err:  # a plugin may fail any way at import: one line
        if isinstance(err, SystemExit):  # a script's argparse or sys.exit() at module level
            reason = f"the module exits when imported (SystemExit: {err.code!r})"
        elif isinstance(err, ImportError):
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        else:
            reason = one_line(err)
        raise PluginError(f"{label}: cannot import {module}: {reason}") from None
    for part in attr.split(".") if attr else ():
        if not hasattr(obj, part):
            raise PluginError(f"{label}: {module} has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


_STRATEGIES: _Registry[StrategySpec] = _Registry(
    "strategy", "strategy", "fedcl.strategies", StrategySpec, "register_strategy",
    "build function", BUILTIN_STRATEGIES)
_UNLEARNING: _Registry[UnlearningSpec] = _Registry(
    "unlearning method", "unlearning", "fedcl.unlearning", UnlearningSpec,
    "register_unlearning", "build function", BUILTIN_UNLEARNING)
_MODELS: _Registry[ModelSpec] = _Registry(
    "model", "model", "fedcl.models", ModelSpec, "register_model", "build function", MODELS)
_DATASETS: _Registry[DatasetInfo] = _Registry(
    "dataset", "dataset", "fedcl.datasets", DatasetInfo, "register_dataset", "load function",
    BUILTIN_DATASETS)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def _check_params_type(params: Any, owner: str) -> None:
    """Refuse, when a plugin registers, a ``params`` that is not a dataclass type."""
    if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        raise TypeError(f"params of {owner} must be a dataclass type (see "
                        f"fedcl.plugins.NoParams), got {params!r}")


def register_strategy(name: str, summary: str, *, params: type = NoParams,
                      trainer: Callable[[Any], LocalTrainer] | None = None,
                      model: Callable[[Any, Scenario, nn.Module], nn.Module] | None = None
                      ) -> Callable[[F], F]:
    """Register ``build(config, params) -> ContinualStrategy`` as strategy ``name``.

    ``summary`` is the one line ``fedcl strategies`` shows; ``params`` the dataclass of the
    strategy's own parameters (``[strategy_params]``, typed by :func:`typed_params`);
    ``trainer(params) -> LocalTrainer`` the client half (default: plain ``LocalTrainer``);
    ``model(params, scenario, model) -> nn.Module`` wraps the config's model when the method
    needs more. The decorated function is returned unchanged, its :class:`StrategySpec` attached
    as ``build.fedcl_spec``. Raises ``ValueError`` when ``name`` is taken by another function.
    """

    _check_params_type(params, f"strategy {name!r}")

    def deco(build: F) -> F:
        spec = StrategySpec(name, summary, params, build, trainer or _plain_trainer, model)
        _STRATEGIES.add(spec, build)
        build.fedcl_spec = spec  # type: ignore[attr-defined]
        return build

    return deco


def register_unlearning(name: str, summary: str, *, params: type = NoParams
                        ) -> Callable[[F], F]:
    """Register ``build(params, out_dir) -> UnlearningMethod`` as unlearning method ``name``
    (``--unlearning NAME``, parameters ``[unlearning_params]``). The function is returned
    unchanged with its :class:`UnlearningSpec` as ``build.fedcl_spec``. Raises ``ValueError``
    when ``name`` is taken by another function."""

    _check_params_type(params, f"unlearning method {name!r}")

    def deco(build: F) -> F:
        spec = UnlearningSpec(name, summary, params, build)
        _UNLEARNING.add(spec, build)
        build.fedcl_spec = spec  # type: ignore[attr-defined]
        return build

    return deco


def register_model(name: str, *, batch_norm: bool = False) -> Callable[[F], F]:
    """Register ``build(input_shape, classes_per_head, num_heads) -> nn.Module`` as model
    ``name``: ``input_shape`` is (C, H, W); the module's ``forward(x, task)`` returns logits
    ``[N, classes_per_head]`` of head ``task`` (see :class:`fedcl.models.ContinualModel`).
    ``batch_norm`` declares running statistics (no cohort_size > 1). The function is returned
    unchanged with its :class:`~fedcl.models.ModelSpec` as ``build.fedcl_spec``. Raises
    ``ValueError`` when ``name`` is taken by another function."""

    def deco(build: F) -> F:
        spec = ModelSpec(name, build, batch_norm)
        _MODELS.add(spec, build)
        build.fedcl_spec = spec  # type: ignore[attr-defined]
        return build

    return deco


def register_dataset(name: str, summary: str, *, num_classes: int) -> Callable[[F], F]:
    """Register ``load(data_dir: str, download: bool) -> Dataset`` as dataset ``name`` of
    ``num_classes`` classes (labels ``0..num_classes - 1``; images uint8 ``[N, C, H, W]``, see
    :class:`fedcl.data.datasets.Dataset`). The function is returned unchanged with its
    :class:`~fedcl.data.datasets.DatasetInfo` as ``load.fedcl_spec``. Raises ``ValueError`` when
    ``name`` is taken by another function."""

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TypeError(f"num_classes of dataset {name!r} must be a positive int, got "
                        f"{num_classes!r}")

    def deco(load: F) -> F:
        spec = DatasetInfo(name, summary, num_classes, load)
        _DATASETS.add(spec, load)
        load.fedcl_spec = spec  # type: ignore[attr-defined]
        return load

    return deco


# ---------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------
def strategy_names() -> list[str]:
    """Built-in, registered and installed (entry point) strategy names, sorted; imports none."""
    return _STRATEGIES.names()


def unlearning_names() -> list[str]:
    """Built-in, registered and installed unlearning method names, sorted; imports none."""
    return _UNLEARNING.names()


def model_names() -> list[str]:
    """Built-in, registered and installed model names, sorted; imports none."""
    return _MODELS.names()


def dataset_names() -> list[str]:
    """Built-in, registered and installed dataset names, sorted; imports none."""
    return _DATASETS.names()


def get_strategy(name: str) -> StrategySpec:
    """The strategy ``name`` (a registered, built-in or entry-point name, or a
    ``package.module:Name`` reference). Raises :class:`ConfigError` for an unknown name,
    :class:`PluginError` for a plugin that cannot be loaded or is not a strategy."""
    return _STRATEGIES.get(name)


def get_unlearning(name: str) -> UnlearningSpec:
    """The unlearning method ``name``; resolved and refused as :func:`get_strategy`."""
    return _UNLEARNING.get(name)


def get_model(name: str) -> ModelSpec:
    """The model ``name``; resolved and refused as :func:`get_strategy`."""
    return _MODELS.get(name)


def get_dataset(name: str) -> DatasetInfo:
    """The dataset ``name``; resolved and refused as :func:`get_strategy`. A plugin dataset is
    also made loadable as ``name`` by :func:`fedcl.data.datasets.load_dataset` (and so by
    ``build_scenario``) in this process: a process that loads a plugin dataset calls this
    first."""
    info = _DATASETS.get(name)
    if DATASETS.get(name) is not info:
        add_dataset(name, info)
    return info


def parse_strategy_params(name: str, values: Mapping[str, Any]) -> Any:
    """Strategy ``name``'s typed parameters (its ``params`` dataclass) from plain values.
    Raises a one-line :class:`ConfigError` for an unknown strategy, key or bad type."""
    return typed_params(get_strategy(name).params, values, f"strategy '{name}'")


def parse_unlearning_params(name: str, values: Mapping[str, Any]) -> Any:
    """Unlearning method ``name``'s typed parameters; refused as
    :func:`parse_strategy_params`."""
    return typed_params(get_unlearning(name).params, values, f"unlearning method '{name}'")


# ---------------------------------------------------------------------------------------------
# Building a run's parts
# ---------------------------------------------------------------------------------------------
def built(label: str, what: str, expected: type, build: Callable[..., Any], *args: Any
          ) -> Any:
    """``build(*args)``, which a plugin wrote: an exception it raises (other than fedcl's own
    one-line errors) or a result that is not an ``expected`` is a one-line
    :class:`PluginError` starting with ``label`` and naming ``what`` failed and where."""
    try:
        obj = build(*args)
    except FedclError:
        raise
    except Exception as err:
        raise PluginError(f"{label}: its {what} failed: {one_line(err)}{raised_at(err)}"
                          ) from err
    if not isinstance(obj, expected):
        name = ("torch.nn.Module" if expected is nn.Module
                else f"{expected.__module__}.{expected.__qualname__}")
        raise PluginError(f"{label}: its {what} returned {type(obj).__name__}, not a {name}")
    return obj


def raised_at(err: BaseException) -> str:
    """`` (raised at FILE:LINE in FUNCTION)``: the innermost frame of ``err``'s traceback, or
    the empty string when it has none."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (raised at {last.filename}:{last.lineno} in {last.name})"


def build_strategy(config: Config) -> ContinualStrategy:
    """The server half of ``config.strategy`` with its typed ``config.strategy_params``.
    Raises a one-line :class:`PluginError` when its build function fails or returns something
    other than a :class:`~fedcl.strategy.ContinualStrategy`."""
    spec = get_strategy(config.strategy)
    params = parse_strategy_params(config.strategy, config.strategy_params)
    strategy: ContinualStrategy = built(f"strategy {config.strategy!r}", "build function",
                                        ContinualStrategy, spec.build, config, params)
    if not isinstance(strategy.capabilities, Capabilities):
        raise PluginError(f"strategy {config.strategy!r}: its capabilities are "
                          f"{type(strategy.capabilities).__name__}, not a "
                          "fedcl.strategy.Capabilities")
    return strategy


def build_trainer(config: Config) -> LocalTrainer:
    """The client half of ``config.strategy`` (a :class:`fedcl.training.LocalTrainer`); refused
    as :func:`build_strategy`."""
    spec = get_strategy(config.strategy)
    params = parse_strategy_params(config.strategy, config.strategy_params)
    trainer: LocalTrainer = built(f"strategy {config.strategy!r}", "trainer", LocalTrainer,
                                  spec.trainer, params)
    return trainer


def build_model(config: Config, scenario: Scenario) -> nn.Module:
    """The run's model ``config.model`` for ``scenario`` (its input shape, classes per head and
    heads), wrapped by the strategy when it needs more than the plain model.

    The weights are drawn from torch's CPU generator seeded with ``config.seed``, so the server
    and every client build the same initial model; the caller's RNG state is left as it was
    (the generator is forked around the build).
    """
    spec = get_model(config.model)
    strategy = get_strategy(config.strategy)
    params = (parse_strategy_params(config.strategy, config.strategy_params)
              if strategy.model is not None else None)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(config.seed)
        model = built(f"model {config.model!r}", "build function", nn.Module, spec.build,
                      scenario.dataset.input_shape, scenario.classes_per_head,
                      scenario.num_heads)
        if strategy.model is not None:
            model = built(f"strategy {config.strategy!r}", "model function", nn.Module,
                          strategy.model, params, scenario, model)
    return model


def build_scenario(config: Config, data_dir: str | None = None) -> Scenario:
    """The run's scenario (:func:`fedcl.data.scenarios.build_scenario`) once its dataset is
    resolved: a plugin dataset is imported first, in this process (each client's too)."""
    get_dataset(config.dataset)
    return build_builtin_scenario(config, data_dir)


def build_unlearning(config: Config, out_dir: Any = None) -> Any:
    """The server half of ``config.unlearning`` (an ``UnlearningMethod``) with its typed
    ``config.unlearning_params``; ``out_dir`` is where it may keep files."""
    spec = get_unlearning(config.unlearning)
    params = parse_unlearning_params(config.unlearning, config.unlearning_params)
    return built(f"unlearning method {config.unlearning!r}", "build function", object,
                 spec.build, params, out_dir)

