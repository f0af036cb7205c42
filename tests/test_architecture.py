"""fedcl's architecture as contracts: the layers, the core free of strategy implementations,
mlflow only in the tracking module, the baselines on fedcl.api alone (import-linter, configured
in pyproject.toml), no function-local imports of fedcl's own modules, and Flower's deprecated
``run_simulation`` behind one adapter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    res = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in res.stdout


def local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of fedcl's or strategies' own modules inside a function
    or method body of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(node.lineno, n) for n in names
                      if n.split(".")[0] in ("fedcl", "strategies")]
    return found


def test_no_function_local_imports_of_fedcl_modules() -> None:
    """A local import would be a way out of an import cycle; only the CLI defers the
    commands' modules (each pulls torch, Flower or Ray), so that `fedcl --help` and bad flags
    answer at once."""
    offenders = {}
    for path in sorted([*ROOT.joinpath("fedcl").rglob("*.py"),
                        *ROOT.joinpath("strategies").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "fedcl/cli.py":
            continue
        if found := local_imports(path):
            offenders[rel] = found
    assert offenders == {}


def flower_simulation_imports(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every import of ``flwr.simulation`` (or of something from it) in
    ``path``, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name == "flwr.simulation" or a.name.startswith("flwr.simulation.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            if module == "flwr.simulation" or module.startswith("flwr.simulation."):
                found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
            elif module == "flwr":
                found += [(node.lineno, f"flwr.{a.name}") for a in node.names
                          if a.name == "simulation"]
    return found


def test_only_the_adapter_imports_flowers_simulation_entry_point(tmp_path: Path) -> None:
    """``flwr.simulation.run_simulation`` is deprecated in Flower 1.42: fedcl keeps it behind
    ``fedcl/flower_simulation.py`` (whose docstring says why the supported ``flwr run`` path
    cannot serve ``fedcl simulate`` yet), so that its removal changes one module."""
    importers = {}
    for path in sorted([*ROOT.joinpath("fedcl").rglob("*.py"),
                        *ROOT.joinpath("strategies").rglob("*.py")]):
        if found := flower_simulation_imports(path):
            importers[path.relative_to(ROOT).as_posix()] = found
    assert set(importers) == {"fedcl/flower_simulation.py"}, importers
    assert [name for _, name in importers["fedcl/flower_simulation.py"]] == [
        "flwr.simulation.run_simulation"]
    # and the check sees the forms an import can take
    probe = tmp_path / "probe.py"
    probe.write_text("import flwr.simulation\nfrom flwr import simulation\n"
                     "def f():\n    from flwr.simulation.app import flwr_simulation\n")
    assert sorted(n for _, n in flower_simulation_imports(probe)) == [
        "flwr.simulation", "flwr.simulation", "flwr.simulation.app.flwr_simulation"]


def test_ruff_finds_nothing() -> None:
    """The lint rules of pyproject.toml hold for the package, the tests, the benchmarks and
    the example plugin."""
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                          "fedcl", "strategies", "tests", "benchmarks", "examples"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
