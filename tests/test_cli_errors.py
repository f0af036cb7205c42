"""The ``fedcl`` command on bad input: one line ``fedcl: error: ...`` on stderr, a non-zero
exit, no traceback, and nothing written to the working folder.

Every ``simulate`` case here fails before Flower or Ray start (on the config, the data or the
device), so these tests stay fast. The ``cuda`` case is skipped where a GPU exists, as there it
would start a real run. The many flag and config cases call the command's entry point,
``fedcl.cli.main``, in this process (an exception escaping it fails the test, as a traceback
would); the missing-dataset and ``strategies`` cases start the real ``fedcl`` executable.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

# A run that got past validation would start Ray; fail the test long before it finishes.
TIMEOUT_S = 120

CONFIG_FILES = {
    "malformed.toml": "clients = = 3\n",
    "unknown-key.toml": "clinets = 3\n",
    "wrong-type.toml": 'clients = "many"\n',
}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _assert_one_line_error(result: subprocess.CompletedProcess[str], phrase: str,
                           cwd: Path, exit_code: int | None = 2) -> str:
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    if exit_code is None:
        assert result.returncode != 0, everything
    else:
        assert result.returncode == exit_code, everything
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("fedcl: error: "), line
    assert phrase in line, f"{phrase!r} not in {line!r}"
    assert not (cwd / "mlflow.db").exists()
    assert not (cwd / "outputs").exists()
    assert not (cwd / "mlruns").exists()
    return line


SIMULATE_CASES = [
    pytest.param(["--strategy", "nope"], "unknown strategy 'nope'", id="strategy"),
    pytest.param(["--dataset", "nope"], "unknown dataset 'nope'", id="dataset"),
    pytest.param(["--scenario", "nope"], "unknown scenario 'nope'", id="scenario"),
    pytest.param(["--clients", "0"], "clients must be a positive integer, got 0", id="clients-0"),
    pytest.param(["--clients", "-3"], "clients must be a positive integer, got -3",
                 id="clients-negative"),
    pytest.param(["--tasks", "0"], "tasks must be a positive integer", id="tasks-0"),
    pytest.param(["--rounds-per-task", "0"], "rounds_per_task must be a positive integer",
                 id="rounds-per-task-0"),
    pytest.param(["--fraction-train", "0"], "fraction_train must be in (0, 1]",
                 id="fraction-train-0"),
    pytest.param(["--fraction-train", "1.5"], "fraction_train must be in (0, 1], got 1.5",
                 id="fraction-train-1.5"),
    pytest.param(["--clients", "abc"], "--clients needs an integer, got 'abc'",
                 id="clients-not-int"),
    pytest.param(["--frobnicate", "1"], "unrecognized arguments: --frobnicate",
                 id="unknown-flag"),
    pytest.param(["--config", "missing.toml"], "config file not found: missing.toml",
                 id="config-missing"),
    pytest.param(["--config", "malformed.toml"], "malformed TOML in malformed.toml",
                 id="config-malformed"),
    pytest.param(["--config", "unknown-key.toml"],
                 "unknown config key 'clinets' in unknown-key.toml (did you mean 'clients'?)",
                 id="config-unknown-key"),
    pytest.param(["--config", "wrong-type.toml"],
                 "config key 'clients' in wrong-type.toml must be an integer, got 'many'",
                 id="config-wrong-type"),
    pytest.param(["--scenario", "class-il", "--tasks", "3"],
                 "3 tasks do not split 10 classes evenly", id="classes-not-divisible"),
    pytest.param(["--strategy-param", "proximal_mu=0.1"],
                 "unknown parameter 'proximal_mu' for strategy 'fedavg'",
                 id="param-unknown-for-fedavg"),
    pytest.param(["--strategy", "fedprox", "--strategy-param", "proximal_mu=-1"],
                 "proximal_mu must be >= 0", id="param-negative-mu"),
    pytest.param(["--gradient-restriction", "-0.005"],
                 "gradient_restriction must be a number >= 0, got -0.005",
                 id="gradient-restriction-negative"),
    pytest.param(["--gradient-restriction", "nan"],
                 "config key 'gradient_restriction' in the command line must be a finite number",
                 id="gradient-restriction-nan"),
    pytest.param(["--gradient-restriction", "0.005", "--cohort-size", "2"],
                 "gradient_restriction > 0 cannot train in cohorts (cohort_size > 1)",
                 id="gradient-restriction-cohort"),
    pytest.param(["--unlearning", "iau", "--unlearning-param", "optimizer=rmsprop"],
                 "iau optimizer must be one of adam, sgd, got 'rmsprop'", id="iau-optimizer"),
    pytest.param(["--unlearning", "iau", "--unlearning-param", "retain_fraction=1.5"],
                 "iau retain_fraction must be in (0, 1], got 1.5", id="iau-retain-fraction"),
    pytest.param(["--unlearning", "iau", "--unlearning-param", "lr=-1"],
                 "iau lr must be a positive number, got -1", id="iau-lr"),
    pytest.param(["--unlearning", "iau", "--unlearning-param", "steps=2"],
                 "unknown parameter 'steps' for unlearning method 'iau'", id="iau-unknown"),
    pytest.param(["--strategy-param", "novalue"],
                 "--strategy-param needs KEY=VALUE, got 'novalue'", id="param-no-equals"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", id="device-cuda",
                 marks=pytest.mark.skipif(_cuda_available(),
                                          reason="a GPU is visible: this would start a run")),
]


def _in_process(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess[str]:
    """``fedcl ARGS`` through ``fedcl.cli.main`` in this process, run in ``cwd``."""
    from fedcl.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["fedcl", *args], code, captured.out, captured.err)


@pytest.mark.parametrize(("args", "phrase"), SIMULATE_CASES)
def test_simulate_bad_input(args: list[str], phrase: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name, text in CONFIG_FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = _in_process(["simulate", *args], tmp_path, capsys, monkeypatch)
    _assert_one_line_error(result, phrase, tmp_path)


def test_simulate_missing_dataset_names_expected_folder(tmp_path: Path, fedcl_cmd) -> None:
    data_dir = tmp_path / "no-data"
    data_dir.mkdir()
    result = fedcl_cmd("simulate", "--dataset", "cifar10", "--data-dir", str(data_dir),
                       "--no-download", cwd=tmp_path, timeout=TIMEOUT_S)
    line = _assert_one_line_error(result, "cifar10 not found", tmp_path)
    assert str(data_dir / "cifar-10-batches-py") in line
    assert list(data_dir.iterdir()) == []


def test_compare_unknown_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "x.db"
    result = _in_process(["compare", "--experiment", "nothere", "--tracking-uri",
                          f"sqlite:///{db}"], tmp_path, capsys, monkeypatch)
    line = _assert_one_line_error(result, "no MLflow experiment", tmp_path)  # exit 2
    assert "'nothere'" in line
    assert result.stdout == ""


def test_strategies_lists_each_with_its_summary_and_parameters(tmp_path: Path,
                                                                fedcl_cmd) -> None:
    from fedcl import plugins

    result = fedcl_cmd("strategies", cwd=tmp_path, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    sections = result.stdout.strip().split("\n\n")
    assert [s.split(" (", 1)[0] for s in sections] == ["strategies", "unlearning methods",
                                                       "models", "datasets"]
    # an entry starts at the line's first column; its wrapped summary and parameters are indented
    entries = [[line.split()[0] for line in section.splitlines()[1:] if not line[0].isspace()]
               for section in sections]
    assert entries == [plugins.strategy_names(), plugins.unlearning_names(),
                       plugins.model_names(), plugins.dataset_names()]
    for section in sections[:2]:
        for line in section.splitlines()[1:]:
            if not line[0].isspace():
                assert len(line.split()) > 1, f"no summary: {line!r}"
    assert entries[1] == ["federaser", "gs-lora", "iau", "projection", "retrain", "ssd"]
    assert {"fedavg", "fedprox", "fot", "prd"} <= set(entries[0])
    assert {"mlp", "cnn", "resnet18"} <= set(entries[2]) and "mnist" in entries[3]
    assert "\n  proximal_mu: float = 0.01  Weight mu of the proximal term" in result.stdout
    # each strategy says which scenarios it declares, on the line after its summary's
    for name, scenarios in (("fedavg", "class-il, task-il, domain-il"), ("target", "class-il"),
                            ("glfc", "class-il"), ("fedweit", "task-il")):
        lines = sections[0].split(f"\n{name} ", 1)[1].splitlines()
        own = lines[:next((i for i, ln in enumerate(lines[1:], 1) if not ln[0].isspace()),
                          len(lines))]
        assert f"  scenarios: {scenarios}" in own, own


def test_config_prints_toml_with_flag_applied(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    result = _in_process(["config", "--clients", "7"], tmp_path, capsys, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert "clients = 7" in result.stdout.splitlines()
    assert tomllib.loads(result.stdout)["clients"] == 7


@pytest.mark.parametrize(("extra", "phrase"), [
    ([], "give --insecure"),
    (["--root-certificates", "missing-ca.crt"], "cannot read --root-certificates"),
])
def test_superexec_bad_input(extra: list[str], phrase: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    result = _in_process(["superexec", "--runtime-api-address", "127.0.0.1:9", *extra],
                         tmp_path, capsys, monkeypatch)
    _assert_one_line_error(result, phrase, tmp_path, exit_code=None)


def test_stopped_run_exits_even_with_a_thread_left_running(tmp_path: Path) -> None:
    """A run that ends early (Ctrl-C, an error) must not hang in interpreter shutdown on a
    thread a library left running: the program ends with its code within the grace."""
    script = ("import sys, threading, time\n"
              "from fedcl import cli\n"
              "cli.EXIT_GRACE_S = 1.0\n"
              "threading.Thread(target=time.sleep, args=(300,)).start()  # never joined in time\n"
              "cli.main = lambda argv=None: 130\n"
              "sys.exit(cli.entry())\n")
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert res.returncode == 130, res.stderr
    assert time.monotonic() - started < 60  # the lingering thread would hold it for 300 s
    assert res.stderr == ""


def test_a_reader_that_goes_away_is_not_an_error(tmp_path: Path) -> None:
    """`fedcl strategies | head -1`: the pipe closes early; no traceback, status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "fedcl.cli", "strategies"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"strategies")
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == b""


def test_help_shows_each_flags_default(tmp_path: Path) -> None:
    """Every config flag with a fixed default says it; compare's flags are explained."""
    from fedcl.config import Config
    from tests.conftest import run_fedcl

    res = run_fedcl("simulate", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    defaults = Config()
    for flag, shown in (("--clients", defaults.clients), ("--strategy", defaults.strategy),
                        ("--lr", defaults.lr), ("--fraction-train", defaults.fraction_train),
                        ("--experiment", defaults.experiment)):
        help_of_flag = text.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {shown})" in help_of_flag, (flag, help_of_flag)
    cmp_ = run_fedcl("compare", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    text = " ".join(cmp_.stdout.split())
    assert f"MLflow experiment name (default: {defaults.experiment}," in text
    assert "table (for reading), json or csv (for scripts); default: table" in text


def test_an_error_quoting_a_control_character_stays_on_one_line() -> None:
    """Every fedcl error escapes what it quotes: a choice of "\\n" or a line separator."""
    from fedcl.config import Config
    from fedcl.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        Config(client_fault_mode="\n").validate()
    assert str(err.value) == ("unknown client_fault_mode '\\n'; choose one of raise, hang, "
                              "vanish")
    assert str(ConfigError("a\u2028b\tc")) == "a\\u2028b\\tc"
