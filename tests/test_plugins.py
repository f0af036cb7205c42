"""fedcl.plugins: strategies, unlearning methods, models and datasets found by name, installed
entry point or ``package.module:Name`` reference, with one-line errors; the setup step that
checks a run against them; config.py as a leaf; build_model's seeding.

Plugins here are real modules written into a temp folder on ``sys.path``; an installed package
is a real ``*.dist-info`` folder with an ``entry_points.txt`` beside them, found by
importlib.metadata as any installed distribution is.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcl import plugins
from fedcl.cli import main
from fedcl.config import Config
from fedcl.data import datasets
from fedcl.data.scenarios import build_scenario
from fedcl.errors import ConfigError
from fedcl.models import build_model as build_architecture
from fedcl.run_setup import setup_run

ROOT = Path(__file__).resolve().parents[1]

STRATEGY_MODULE = '''
from dataclasses import dataclass

from fedcl.plugins import register_strategy
from fedcl.training import LocalTrainer
from strategies.fedavg import FedAvgCL, flower_kwargs


@dataclass(frozen=True)
class ToyParams:
    alpha: float = 0.25
    """Weight alpha of nothing in particular."""
    rounds: int = 3


class ToyTrainer(LocalTrainer):
    def __init__(self, params):
        self.alpha = params.alpha


@register_strategy("{name}", "A toy strategy: FedAvg by another name.", params=ToyParams,
                   trainer=ToyTrainer)
def build_toy(config, params):
    strategy = FedAvgCL(**flower_kwargs(config))
    strategy.toy_alpha = params.alpha
    return strategy


def helper(config, params):
    return None
'''


@pytest.fixture
def registries() -> Iterator[None]:
    """What the registries and the loadable datasets hold, restored after the test."""
    kinds = (plugins._STRATEGIES, plugins._UNLEARNING, plugins._MODELS, plugins._DATASETS)
    saved = [(dict(r.registered), dict(r.functions), dict(r.resolved)) for r in kinds]
    loadable = dict(datasets.DATASETS)
    yield
    for reg, (registered, functions, resolved) in zip(kinds, saved, strict=True):
        reg.registered, reg.functions, reg.resolved = registered, functions, resolved
    datasets.DATASETS.clear()
    datasets.DATASETS.update(loadable)


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None
               ) -> Iterator[Path]:
    """A folder on sys.path; the modules imported from it are forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and \
                str(sys.modules[name].__file__).startswith(str(folder)):
            del sys.modules[name]


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _write_strategy(folder: Path) -> tuple[str, str]:
    """A module with a decorated strategy; returns (module name, strategy name)."""
    module, name = _unique("toymod"), _unique("toy")
    (folder / f"{module}.py").write_text(STRATEGY_MODULE.format(name=name), encoding="utf-8")
    return module, name


def _install(folder: Path, group: str, entries: dict[str, str]) -> None:
    """An installed distribution declaring ``entries`` (name -> module:attr) in ``group``."""
    dist = _unique("fedcl_toy_dist")
    info = folder / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n",
                                   encoding="utf-8")
    lines = [f"[{group}]", *(f"{k} = {v}" for k, v in entries.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- finding plugins ------------------------------------------------------------------------
def test_module_reference_resolves_builds_and_types_its_parameters(plugin_dir: Path) -> None:
    module, name = _write_strategy(plugin_dir)
    ref = f"{module}:build_toy"
    config = Config(strategy=ref, strategy_params={"alpha": 2})
    setup = setup_run(config)
    assert setup.strategy.name == name and setup.strategy_params.alpha == 2.0
    assert plugins.get_strategy(ref) is setup.strategy
    strategy = plugins.build_strategy(config)
    assert type(strategy).__name__ == "FedAvgCL" and strategy.toy_alpha == 2.0
    trainer = plugins.build_trainer(config)
    assert type(trainer).__name__ == "ToyTrainer" and trainer.alpha == 2.0
    # importing the module registered the strategy under its own name as well
    assert name in plugins.strategy_names()
    assert plugins.get_strategy(name) is setup.strategy


def test_a_spec_object_resolves_too(plugin_dir: Path) -> None:
    module, name = _write_strategy(plugin_dir)
    (plugin_dir / f"{module}_spec.py").write_text(
        f"from {module} import build_toy\nSPEC = build_toy.fedcl_spec\n", encoding="utf-8")
    assert plugins.get_strategy(f"{module}_spec:SPEC").name == name


def test_entry_point_is_found_by_name_and_listed(plugin_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    module, name = _write_strategy(plugin_dir)
    broken = _unique("broken")
    _install(plugin_dir, "fedcl.strategies", {name: f"{module}:build_toy",
                                              broken: "no_such_module_xyz:build"})
    # listed without importing anything
    assert {name, broken} <= set(plugins.strategy_names())
    assert module not in sys.modules
    spec = plugins.get_strategy(name)
    assert spec.name == name and spec.params.__name__ == "ToyParams"
    assert setup_run(Config(strategy=name)).strategy is spec

    code, out, err = _cli(["strategies"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    entry = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
    assert "A toy strategy: FedAvg by another name." in lines[entry]
    assert f"[plugin {module}]" in lines[entry]
    assert lines[entry + 1] == "  scenarios: class-il, task-il, domain-il"  # it declares all
    assert lines[entry + 2] == "  alpha: float = 0.25  Weight alpha of nothing in particular."
    assert lines[entry + 3] == "  rounds: int = 3"
    # a plugin that cannot be loaded is listed with the reason (wrapped like any summary)
    at = next(i for i, line in enumerate(lines) if line.startswith(broken + " "))
    text = " ".join(" ".join(line.split()) for line in lines[at:at + 3])
    assert (f"{broken} (cannot be loaded: strategy '{broken}' (entry point "
            "no_such_module_xyz:build in fedcl.strategies): cannot import no_such_module_xyz: "
            "No module named 'no_such_module_xyz')") in text


def test_builtins_load_only_when_asked_and_fedcl_imports_no_strategy() -> None:
    code = textwrap.dedent("""
        import sys
        import fedcl.cli, fedcl.run_setup, fedcl.plugins as p
        assert not any(m == "strategies" or m.startswith("strategies.") for m in sys.modules)
        p.get_strategy("fedavg")
        assert "strategies.fedavg" in sys.modules and "strategies.fot" not in sys.modules
        assert "strategies.unlearning" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- one-line errors ------------------------------------------------------------------------
def test_unknown_name_suggests_and_lists_builtins_and_installed(plugin_dir: Path) -> None:
    installed = _unique("installed")
    _install(plugin_dir, "fedcl.strategies", {installed: "not_imported_xyz:build"})
    with pytest.raises(ConfigError) as err:
        plugins.get_strategy("fedprx")
    message = str(err.value)
    assert message.startswith("unknown strategy 'fedprx' (did you mean 'fedprox'?); choose "
                              "one of ")
    assert "fedavg, fedot" not in message and "fedavg" in message and installed in message
    assert "\n" not in message and not isinstance(err.value, plugins.PluginError)
    with pytest.raises(ConfigError, match=r"^unknown model 'resnet' \(did you mean 'resnet18'"):
        plugins.get_model("resnet")
    with pytest.raises(ConfigError, match=r"^unknown unlearning 'sdd' \(did you mean 'ssd'"):
        plugins.get_unlearning("sdd")


def test_import_failure_is_one_line_and_exit_status_2(tmp_path: Path, registries: None,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["simulate", "--strategy", "mypkg_missing_xyz.m:Thing"], capsys)
    assert code == 2 and out == ""
    assert err == ("fedcl: error: strategy 'mypkg_missing_xyz.m:Thing': cannot import "
                   "mypkg_missing_xyz.m: No module named 'mypkg_missing_xyz'\n")
    assert list(tmp_path.iterdir()) == []


def test_a_plugin_raising_at_import_is_one_line(plugin_dir: Path) -> None:
    module = _unique("raising")
    (plugin_dir / f"{module}.py").write_text("raise RuntimeError('boom\\nsecond line')\n",
                                             encoding="utf-8")
    with pytest.raises(plugins.PluginError) as err:
        plugins.get_unlearning(f"{module}:build")
    assert str(err.value) == (f"unlearning method '{module}:build': cannot import {module}: "
                              "RuntimeError: boom")


def test_not_a_strategy_and_missing_names_are_one_line(plugin_dir: Path) -> None:
    module, _ = _write_strategy(plugin_dir)
    with pytest.raises(plugins.PluginError) as err:
        plugins.get_strategy(f"{module}:helper")
    assert str(err.value) == (
        f"strategy '{module}:helper': {module}:helper is not a registered fedcl strategy "
        "(decorate its build function with fedcl.plugins.register_strategy)")
    with pytest.raises(plugins.PluginError, match=rf"^strategy '{module}:nothing': {module} "
                                                  r"has no attribute 'nothing'$"):
        plugins.get_strategy(f"{module}:nothing")
    # a strategy is not an unlearning method
    with pytest.raises(plugins.PluginError, match="is not a registered fedcl unlearning "
                                                  "method .decorate its build function with "
                                                  r"fedcl.plugins.register_unlearning\)$"):
        plugins.get_unlearning(f"{module}:build_toy")
    with pytest.raises(plugins.PluginError, match=r"not a package.module:Name reference$"):
        plugins.get_strategy("../evil:x")


def test_entry_point_that_fails_names_the_entry_point(plugin_dir: Path) -> None:
    name = _unique("broken")
    _install(plugin_dir, "fedcl.unlearning", {name: "gone_module_xyz:build"})
    with pytest.raises(plugins.PluginError) as err:
        setup_run(Config(unlearning=name))
    assert str(err.value) == (f"unlearning method '{name}' (entry point gone_module_xyz:build "
                              "in fedcl.unlearning): cannot import gone_module_xyz: No module "
                              "named 'gone_module_xyz'")


@pytest.mark.parametrize(("params", "message"), [
    ({"alpha": "big"}, "parameter 'alpha' of strategy '{ref}' must be float, got 'big'"),
    ({"rounds": 1.5}, "parameter 'rounds' of strategy '{ref}' must be int, got 1.5"),
    ({"beta": 1}, "unknown parameter 'beta' for strategy '{ref}' (its parameters: alpha, "
                  "rounds)"),
])
def test_plugin_parameters_are_typed(plugin_dir: Path, params: dict, message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    module, _ = _write_strategy(plugin_dir)
    ref = f"{module}:build_toy"
    with pytest.raises(ConfigError) as err:
        setup_run(Config(strategy=ref, strategy_params=params))
    assert str(err.value) == message.format(ref=ref)
    key, value = next(iter(params.items()))
    code, _, err_line = _cli(["config", "--strategy", ref, "--strategy-param",
                              f"{key}={value}"], capsys)
    assert code == 2 and err_line == f"fedcl: error: {message.format(ref=ref)}\n"


def test_a_builtin_name_cannot_be_taken(registries: None) -> None:
    with pytest.raises(ValueError, match="strategy 'fedavg' is a built-in name"):
        plugins.register_strategy("fedavg", "mine")(lambda config, params: None)
    with pytest.raises(ValueError, match="model 'mlp' is a built-in name"):
        plugins.register_model("mlp")(lambda shape, classes, heads: None)


# --- models, datasets, unlearning methods ---------------------------------------------------
MODEL_AND_DATA_MODULE = '''
import torch
from torch import nn

from fedcl.data.datasets import ArrayDataset, Dataset
from fedcl.plugins import register_dataset, register_model, register_unlearning
from fedcl.unlearning_api import UnlearningMethod


@register_model("{model}", batch_norm=True)
def build_net(input_shape, classes_per_head, num_heads):
    """A linear layer per head on batch-normed pixels."""
    c, h, w = input_shape

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm2d(c)
            self.heads = nn.ModuleList(nn.Linear(c * h * w, classes_per_head)
                                       for _ in range(num_heads))

        def forward(self, x, task=None):
            return self.heads[task or 0](self.norm(x).flatten(1))

    return Net()


@register_dataset("{dataset}", "Four classes of random 4x4 images.", num_classes=4)
def load_tiny(data_dir, download):
    g = torch.Generator().manual_seed(0)
    def split(n):
        return ArrayDataset(torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8),
                            torch.arange(n) % 4)
    return Dataset("{dataset}", split(64), split(16), 4, (0.5,), (0.25,))


class Forget(UnlearningMethod):
    pass


@register_unlearning("{method}", "Forgets nothing.")
def build_forget(params, out_dir):
    return Forget(params, out_dir)
'''


def test_model_dataset_and_method_plugins(plugin_dir: Path) -> None:
    module = _unique("parts")
    model, dataset, method = _unique("net"), _unique("tiny"), _unique("forget")
    (plugin_dir / f"{module}.py").write_text(
        MODEL_AND_DATA_MODULE.format(model=model, dataset=dataset, method=method),
        encoding="utf-8")
    config = Config(dataset=f"{module}:load_tiny", model=f"{module}:build_net", tasks=2,
                    clients=2, unlearning=f"{module}:build_forget",
                    erasures="class=3,after-task=1")
    setup = setup_run(config)
    assert setup.dataset.num_classes == 4 and setup.model.batch_norm
    assert [r.to_text() for r in setup.schedule] == ["class=3,after-task=1"]
    # the class split is checked against the plugin's 4 classes, not MNIST's 10
    with pytest.raises(ConfigError, match="class 3 is first trained in task 1, after the "
                                          "request"):
        setup_run(dataclasses.replace(config, erasures="class=3,after-task=0"))
    with pytest.raises(ConfigError, match=r"no class 7 \(classes are 0..3\)"):
        setup_run(dataclasses.replace(config, erasures="class=7,after-task=1"))
    with pytest.raises(ConfigError, match=f"cohort_size > 1 cannot train model "
                                          f"'{module}:build_net'"):
        setup_run(dataclasses.replace(config, cohort_size=2))
    scenario = build_scenario(config)  # the data layer loads the plugin dataset by name
    assert scenario.dataset.num_classes == 4 and scenario.dataset.input_shape == (1, 4, 4)
    net = plugins.build_model(config, scenario)
    assert net(torch.zeros(3, 1, 4, 4)).shape == (3, 4)
    assert type(plugins.build_unlearning(config)).__name__ == "Forget"
    assert {model, dataset, method} <= (set(plugins.model_names()) | set(plugins.dataset_names())
                                        | set(plugins.unlearning_names()))


def test_builtin_models_and_datasets_resolve_to_their_declarations() -> None:
    assert plugins.get_model("resnet18").batch_norm and not plugins.get_model("mlp").batch_norm
    assert plugins.get_dataset("cifar100").num_classes == 100
    assert plugins.model_names() == ["cnn", "mlp", "mlp-fot", "resnet18"]


# --- config is a leaf -----------------------------------------------------------------------
def test_config_imports_nothing_of_fedcl_but_errors() -> None:
    tree = ast.parse((ROOT / "fedcl" / "config.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):  # function-local imports included
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            if node.module == "fedcl":
                imported |= {f"fedcl.{alias.name}" for alias in node.names}
    ours = {name for name in imported
            if name.split(".")[0] in ("fedcl", "strategies") or not name}
    assert ours == {"fedcl.errors"}


def test_plugins_does_not_import_strategies() -> None:
    tree = ast.parse((ROOT / "fedcl" / "plugins.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not any(n.split(".")[0] == "strategies" for n in names), names


# --- build_model ----------------------------------------------------------------------------
def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# sha256 of the initial state_dict as the registry built it before fedcl.plugins (it reseeded
# the global RNG with torch.manual_seed(config.seed) and built in place)
INITIAL_WEIGHTS = [
    ({"model": "mlp"}, "de6406f9c7825074"),
    ({"model": "cnn", "scenario": "task-il", "seed": 3}, "d2cb1d8955f495ec"),
    ({"model": "resnet18", "seed": 7, "scenario": "domain-il", "tasks": 2}, "44106e2f786943c2"),
    ({"model": "mlp", "strategy": "prd", "seed": 5}, "3e0bb1f56a2cd949"),
    ({"model": "cnn", "strategy": "prd", "scenario": "task-il", "seed": 1}, "343add18cc513988"),
]


@pytest.mark.parametrize(("fields", "digest"), INITIAL_WEIGHTS,
                         ids=[f"{f.get('strategy', 'fedavg')}-{f['model']}"
                              for f, _ in INITIAL_WEIGHTS])
def test_build_model_weights_unchanged_and_caller_rng_untouched(fields: dict, digest: str
                                                                ) -> None:
    config = Config(**fields)
    scenario = build_scenario(config)
    torch.manual_seed(12345)
    torch.rand(3)
    state = torch.get_rng_state()
    model = plugins.build_model(config, scenario)
    assert torch.equal(torch.get_rng_state(), state)
    assert _digest(model) == digest
    # the same seed gives the same weights, whatever the caller's RNG did in between
    torch.rand(100)
    assert _digest(plugins.build_model(config, scenario)) == digest
    if "strategy" not in fields:  # the old recipe, live
        torch.manual_seed(config.seed)
        old = build_architecture(config.model, scenario.dataset.input_shape,
                                 scenario.classes_per_head, scenario.num_heads)
        assert _digest(old) == digest


TASK_IL_ONLY = '''
from fedcl.plugins import register_strategy
from fedcl.strategy import Capabilities
from strategies.fedavg import FedAvgCL, flower_kwargs


class TaskILOnly(FedAvgCL):
    capabilities = Capabilities(scenarios=("task-il",), fedavg_aggregate=True)


@register_strategy("{name}", "Defined for task-IL only.")
def build(config, params):
    return TaskILOnly(**flower_kwargs(config))
'''


def test_a_scenario_the_strategy_does_not_declare_is_refused(plugin_dir: Path) -> None:
    module, name = _unique("taskilmod"), _unique("taskil")
    (plugin_dir / f"{module}.py").write_text(TASK_IL_ONLY.format(name=name), encoding="utf-8")
    ref = f"{module}:build"
    assert setup_run(Config(strategy=ref, scenario="task-il")).strategy.name == name
    with pytest.raises(ConfigError) as err:
        setup_run(Config(strategy=ref, scenario="class-il"))
    assert str(err.value) == (f"strategy '{ref}' is not defined for scenario 'class-il' "
                              "(it declares task-il)")


# --- what a researcher's plugin gets wrong: one line each, before anything starts ----------
ODD_PARAMS_MODULE = '''
from dataclasses import dataclass
from typing import Optional

from fedcl.plugins import register_strategy
from strategies.fedavg import FedAvgCL, flower_kwargs


@dataclass(frozen=True)
class OddParams:
    clip: Optional[float] = None
    """Clip norm; None: no clipping."""
    tag: str | None = None
    mu: float = 0
    """A float field with an int default."""
    required: int = 1

    def check(self):
        if self.clip is not None and self.clip <= 0:
            raise ValueError("clip must be > 0")
        assert self.mu < 10, "mu too big"


@register_strategy("{name}", "Odd parameters.", params=OddParams)
def build(config, params):
    return FedAvgCL(**flower_kwargs(config))


@dataclass(frozen=True)
class NeedsParams:
    lam: float
    """No default: must be given."""

    def __post_init__(self):
        if self.lam < 0:
            raise ValueError("lam must be >= 0")


@register_strategy("{name}-needs", "A parameter without a default.", params=NeedsParams)
def build_needs(config, params):
    return FedAvgCL(**flower_kwargs(config))
'''


@pytest.mark.parametrize(("params", "message"), [
    ({"clip": 0.5, "tag": "x", "mu": 2}, None),  # Optional and int-default fields take values
    ({"clip": 1}, None),
    ({"clip": "big"}, "parameter 'clip' of strategy '{ref}' must be float, got 'big'"),
    ({"clip": -1.0}, "parameters of strategy '{ref}' refused: ValueError: clip must be > 0"),
    ({"mu": 11}, "parameters of strategy '{ref}' refused: AssertionError: mu too big"),
])
def test_parameters_typed_by_their_annotation_and_refused_in_one_line(
        plugin_dir: Path, capsys: pytest.CaptureFixture[str], params: dict,
        message: str | None) -> None:
    module, name = _unique("oddmod"), _unique("odd")
    (plugin_dir / f"{module}.py").write_text(ODD_PARAMS_MODULE.format(name=name),
                                             encoding="utf-8")
    ref = f"{module}:build"
    if message is None:
        typed = setup_run(Config(strategy=ref, strategy_params=params)).strategy_params
        assert {k: getattr(typed, k) for k in params} == params
        assert all(type(getattr(typed, k)) is type(v) or isinstance(v, int)
                   for k, v in params.items())
        return
    with pytest.raises(ConfigError) as err:
        setup_run(Config(strategy=ref, strategy_params=params))
    assert str(err.value) == message.format(ref=ref)
    flags = [arg for k, v in params.items() for arg in ("--strategy-param", f"{k}={v}")]
    code, out, err_line = _cli(["config", "--strategy", ref, *flags], capsys)
    assert (code, out, err_line) == (2, "", f"fedcl: error: {message.format(ref=ref)}\n")


def test_a_parameter_without_default_must_be_given(plugin_dir: Path) -> None:
    module, _ = _unique("needsmod"), None
    (plugin_dir / f"{module}.py").write_text(ODD_PARAMS_MODULE.format(name=_unique("odd")),
                                             encoding="utf-8")
    ref = f"{module}:build_needs"
    with pytest.raises(ConfigError) as err:
        setup_run(Config(strategy=ref))
    assert str(err.value) == (f"parameter 'lam' of strategy '{ref}' has no default and must "
                              "be given")
    assert setup_run(Config(strategy=ref, strategy_params={"lam": 2})).strategy_params.lam == 2.0
    with pytest.raises(ConfigError, match=r"^parameters of strategy .* refused: ValueError: "
                                          r"lam must be >= 0$"):
        setup_run(Config(strategy=ref, strategy_params={"lam": -1}))


BROKEN_PARTS_MODULE = '''
import os

from flwr.serverapp.strategy import FedAvg

from fedcl.plugins import register_dataset, register_model, register_strategy
from fedcl.strategy import flower_kwargs
from fedcl.training import LocalTrainer
from strategies.fedavg import FedAvgCL


@register_strategy("{name}-raises", "Its build raises.")
def build_raises(config, params):
    raise RuntimeError("no GPU for you")


@register_strategy("{name}-none", "Its build returns None.")
def build_none(config, params):
    return None


@register_strategy("{name}-flower", "A plain Flower FedAvg, without fedcl's hooks.")
def build_flower(config, params):
    return FedAvg(**flower_kwargs(config))


def bad_trainer(params):
    raise KeyError("trainer")


@register_strategy("{name}-trainer", "Its trainer raises.", trainer=bad_trainer)
def build_trainer(config, params):
    return FedAvgCL(**flower_kwargs(config))


@register_model("{name}-model")
def build_model(input_shape, classes_per_head, num_heads):
    raise RuntimeError("model exploded")


@register_model("{name}-nomodel")
def build_no_model(input_shape, classes_per_head, num_heads):
    return "not a module"


@register_dataset("{name}-data", "Its loader raises.", num_classes=4)
def load(data_dir, download):
    raise FileNotFoundError(os.path.join(data_dir, "missing.bin"))
'''


def test_a_plugin_whose_build_fails_is_one_line_before_anything_starts(
        plugin_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    module = _unique("brokenparts")
    (plugin_dir / f"{module}.py").write_text(BROKEN_PARTS_MODULE.format(name=_unique("b")),
                                             encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    where = f"(raised at {plugin_dir / module}.py:"
    cases = [
        (["--strategy", f"{module}:build_raises"],
         f"strategy '{module}:build_raises': its build function failed: RuntimeError: no GPU "
         f"for you {where}"),
        (["--strategy", f"{module}:build_none"],
         f"strategy '{module}:build_none': its build function returned NoneType, not a "
         "fedcl.strategy.ContinualStrategy"),
        (["--strategy", f"{module}:build_flower"],
         f"strategy '{module}:build_flower': its build function returned FedAvg, not a "
         "fedcl.strategy.ContinualStrategy"),
        (["--strategy", f"{module}:build_trainer"],
         f"strategy '{module}:build_trainer': its trainer failed: KeyError: 'trainer' {where}"),
        (["--model", f"{module}:build_model"],
         f"model '{module}:build_model': its build function failed: RuntimeError: model "
         f"exploded {where}"),
        (["--model", f"{module}:build_no_model"],
         f"model '{module}:build_no_model': its build function returned str, not a "
         "torch.nn.Module"),
        (["--dataset", f"{module}:load"],
         f"dataset '{module}:load' cannot be loaded from data_dir 'data': FileNotFoundError: "
         "data/missing.bin"),
    ]
    for flags, message in cases:
        code, out, err = _cli(["simulate", *flags, "--clients", "2", "--tasks", "2"], capsys)
        assert code == 2 and out == "", (flags, err)
        assert err.startswith(f"fedcl: error: {message}") and err.count("\n") == 1, err
        assert list(work.iterdir()) == []  # nothing written, no run made


def test_a_plugin_that_exits_at_import_is_one_line(plugin_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A research script with argparse at module level exits when fedcl imports it."""
    module = _unique("script")
    (plugin_dir / f"{module}.py").write_text("import sys\nsys.exit(3)\n", encoding="utf-8")
    code, out, err = _cli(["config", "--strategy", f"{module}:build"], capsys)
    assert (code, out) == (2, "")
    assert err == (f"fedcl: error: strategy '{module}:build': cannot import {module}: the "
                   "module exits when imported (SystemExit: 3)\n")


@pytest.mark.parametrize(("decorator", "message"), [
    (lambda: plugins.register_strategy("a:b", "x"), "strategy name 'a:b' is not a name"),
    (lambda: plugins.register_strategy("", "x"), "strategy name '' is not a name"),
    (lambda: plugins.register_strategy("my method", "x"),
     "strategy name 'my method' is not a name"),
    (lambda: plugins.register_strategy(7, "x"), "strategy name 7 is not a name"),
    (lambda: plugins.register_model("a:b"), "model name 'a:b' is not a name"),
    (lambda: plugins.register_strategy("ok-name", "x", params=dict),
     "params of strategy 'ok-name' must be a dataclass type"),
    (lambda: plugins.register_unlearning("ok-name", "x", params=object()),
     "params of unlearning method 'ok-name' must be a dataclass type"),
    (lambda: plugins.register_dataset("ok-name", "x", num_classes="4"),
     "num_classes of dataset 'ok-name' must be a positive int, got '4'"),
    (lambda: plugins.register_dataset("ok-name", "x", num_classes=0),
     "num_classes of dataset 'ok-name' must be a positive int, got 0"),
], ids=["colon", "empty", "space", "int", "model-colon", "params-dict", "params-instance",
        "classes-str", "classes-zero"])
def test_bad_registrations_are_refused_at_import(registries: None, decorator: Any,
                                                 message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=f"^{message}"):
        decorator()(lambda *args: None)


def test_a_name_registered_twice_names_both_functions(registries: None) -> None:
    def first(config: Config, params: object) -> None: ...

    def second(config: Config, params: object) -> None: ...

    name = _unique("twice")
    plugins.register_strategy(name, "first")(first)
    with pytest.raises(ValueError) as err:
        plugins.register_strategy(name, "second")(second)
    assert str(err.value) == (
        f"strategy '{name}' registered twice (by {__name__}."
        "test_a_name_registered_twice_names_both_functions.<locals>.first and "
        f"{__name__}.test_a_name_registered_twice_names_both_functions.<locals>.second)")


@pytest.mark.parametrize("scenarios", ["class-il", ("class_il",), ["class-il", "bogus"]])
def test_capabilities_refuse_scenarios_that_are_not_scenario_names(scenarios: object) -> None:
    from fedcl.strategy import Capabilities

    with pytest.raises(ValueError, match=r"^Capabilities.scenarios must be a tuple of scenario "
                                         r"names \(class-il, task-il, domain-il\), got "):
        Capabilities(scenarios=scenarios)  # type: ignore[arg-type]
    assert Capabilities(scenarios=["task-il"]).scenarios == ("task-il",)  # type: ignore[arg-type]


def test_strategies_lists_a_plugin_whose_default_factory_raises(
        plugin_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module, name = _unique("factorymod"), _unique("factory")
    (plugin_dir / f"{module}.py").write_text(textwrap.dedent(f'''
        from dataclasses import dataclass, field
        from fedcl.plugins import register_strategy

        def widths():
            raise RuntimeError("needs a GPU")

        @dataclass(frozen=True)
        class P:
            widths: list = field(default_factory=widths)

        @register_strategy("{name}", "A factory default.", params=P)
        def build(config, params):
            return None
    '''), encoding="utf-8")
    _install(plugin_dir, "fedcl.strategies", {name: f"{module}:build"})
    code, out, err = _cli(["strategies"], capsys)
    assert code == 0 and err == ""
    assert "  widths: list = widths()" in out.splitlines()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_float_parameter_must_be_finite(value: float) -> None:
    """inf or nan as a weight trains to NaN a task later (a run that stops naming the
    learning rate): every method's float parameters are refused up front, one line."""
    for name, key in (("fedprox", "proximal_mu"), ("fedewc", "ewc_lambda"),
                      ("fedderpp", "alpha")):
        with pytest.raises(ConfigError) as err:
            plugins.parse_strategy_params(name, {key: value})
        assert str(err.value) == (f"parameter '{key}' of strategy '{name}' must be a finite "
                                  f"number, got {value!r}")


def test_a_strategy_by_reference_names_its_run_without_a_colon() -> None:
    """The derived run name is also the output folder's: ``package.module:Name`` is written
    ``package.module.Name`` there (``:`` is awkward in shells and invalid on Windows)."""
    import re

    from fedcl.config import Config
    from fedcl.run_setup import default_run_name, output_folder

    config = Config(strategy="my_pkg.methods:build_l2", scenario="task-il")
    name = default_run_name(config)
    assert re.fullmatch(r"my_pkg\.methods\.build_l2-task-il-\d{8}-\d{6}", name), name
    assert ":" not in str(output_folder(config, name))
    assert default_run_name(Config(strategy="fedavg", run_name="given:name")) == "given:name"
