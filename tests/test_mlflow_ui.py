"""MLflow's UI shows fedcl's runs: the experiment is tagged as model training, the end of a run
says where to see it (the run page on a tracking server; the ``mlflow ui`` command for a local
store), and headless Chromium renders that run page with the run's name and ACC."""

from __future__ import annotations

import html.parser
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedcl import tracking
from tests.conftest import run_fedcl
from tests.test_e2e import TINY, ray_env  # noqa: F401  (the fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)"


class _Text(html.parser.HTMLParser):
    """The text a page shows (scripts and styles left out), one space between pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:  # type: ignore[type-arg]
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(" ".join(data.split()))


def _rendered(url: str, profile: Path, expect: list[str]) -> tuple[str, str]:
    """(DOM, text) of ``url`` after MLflow's JS app rendered it in headless Chromium; waits
    longer (up to three tries) until every string of ``expect`` is in the text."""
    dom = text = ""
    for budget_ms in (15_000, 30_000, 60_000):
        res = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
             "--no-first-run", f"--user-data-dir={profile}",
             f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, text=True, timeout=180)
        dom = res.stdout
        parser = _Text()
        parser.feed(dom)
        text = " " + " ".join(parser.parts) + " "
        if all(e in text for e in expect):
            break
    return dom, text


def _js_number(value: float) -> str:
    """A number as JavaScript (MLflow's UI) prints it: Python's shortest round trip, no ``.0``
    on whole numbers (within [1e-6, 1e21), where both print digits, not exponents)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@pytest.mark.e2e
def test_a_run_on_a_server_prints_its_page_and_chromium_shows_it(
        tmp_path: Path, ray_env: dict, mlflow_server) -> None:  # noqa: F811
    out = tmp_path / "out"
    res = run_fedcl("simulate", *TINY, "--output", str(out), "--experiment", "ui-page",
                    "--run-name", "ui-check-run", "--tracking-uri", mlflow_server.uri,
                    cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    run_id = summary["mlflow_run_id"]
    exp = tracking._client(mlflow_server.uri).get_experiment_by_name("ui-page")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    url = (f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}/runs/{run_id}"
           "?workflowType=machine_learning")
    tail = res.stdout.strip().splitlines()[-2:]
    assert tail == [f"MLflow run {run_id} in {mlflow_server.uri} (experiment 'ui-page')",
                    f"  {url}"]

    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    acc = f" acc {_js_number(summary['acc'])} "
    dom, text = _rendered(url, tmp_path / "chromium", ["ui-check-run", acc])
    assert "ui-check-run" in text, text[:2000]
    assert acc in text, text[:2000]  # the run's metrics table: name, then value
    assert f" Run ID {run_id} " in text
    # the run page is in MLflow's model training navigation: its link back to the experiment
    # goes to the runs list (in the GenAI navigation it goes to "evaluation-runs")
    assert (f'data-testid="experiment-runs-link" href="#/experiments/{exp.experiment_id}/runs"'
            in dom)


def test_a_run_in_a_local_store_prints_the_mlflow_ui_command_that_shows_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The printed ``mlflow ui`` command, run from another folder, serves the run at the
    printed address (the real tracker writes the store; the real ``mlflow ui`` reads it)."""
    work = (tmp_path / "work").resolve()
    work.mkdir()
    monkeypatch.chdir(work)  # a relative store, as `fedcl simulate` makes by default
    tracker = tracking.Tracker("sqlite:///mlflow.db", "local-ui", "local-run")
    run_id = tracker.start({"strategy": "fedavg", "scenario": "class-il", "dataset": "mnist"})
    assert tracker.finish({"acc": 0.625}, []) == 0
    lines = tracking.where_to_view("sqlite:///mlflow.db", tracker.experiment_id, run_id)
    command = (f"{tracking.mlflow_program()} ui --backend-store-uri "
               f"sqlite:///{work / 'mlflow.db'}")
    url = (f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{run_id}"
           "?workflowType=machine_learning")
    assert lines == [f"  view it with: {command}", f"  then open {url}"]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = shlex.split(command)  # as printed: the shell's PATH is this process's
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.Popen([*argv, "--port", str(port), "--workers", "1"], cwd=elsewhere,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(api, timeout=5) as resp:
                    run = json.loads(resp.read())["run"]
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow ui failed"
                time.sleep(0.3)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    assert run["info"]["run_name"] == "local-run"
    assert run["info"]["experiment_id"] == tracker.experiment_id
    assert run["info"]["status"] == "FINISHED"
    assert {"key": "acc", "value": 0.625} in [
        {k: m[k] for k in ("key", "value")} for m in run["data"]["metrics"]]


def test_experiments_are_tagged_as_model_training_unless_the_user_chose_a_kind(
        tmp_path: Path) -> None:
    """A new experiment gets the tag; one made before without it (or with a kind MLflow's UI
    only inferred) gets it on the next run; a kind someone chose stays."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking._client(uri)
    client.create_experiment("before")
    client.create_experiment("inferred",
                             tags={"mlflow.experimentKind": "genai_development_inferred"})
    client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    config = {"strategy": "fedavg", "scenario": "class-il", "dataset": "mnist"}
    for name in ("new", "before", "inferred", "chosen"):
        tracking.Tracker(uri, name, f"run-{name}").start(config)
    kinds = {name: MlflowClient(uri).get_experiment_by_name(name).tags["mlflow.experimentKind"]
             for name in ("new", "before", "inferred", "chosen")}
    assert kinds == {"new": "custom_model_development", "before": "custom_model_development",
                     "inferred": "custom_model_development", "chosen": "genai_development"}


@pytest.mark.parametrize(("uri", "expected"), [
    ("http://mlflow.example.org:5000/", ["  http://mlflow.example.org:5000/#/experiments/7/runs/"
                                         "abc?workflowType=machine_learning"]),
    ("https://example.org/mlflow", ["  https://example.org/mlflow/#/experiments/7/runs/abc"
                                    "?workflowType=machine_learning"]),
    ("sqlite:////data/runs/my db.sqlite",
     ["  view it with: MLFLOW ui --backend-store-uri 'sqlite:////data/runs/my db.sqlite'",
      "  then open http://127.0.0.1:5000/#/experiments/7/runs/abc"
      "?workflowType=machine_learning"]),
    ("file:///data/mlruns",
     ["  view it with: MLFLOW ui --backend-store-uri file:///data/mlruns",
      "  then open http://127.0.0.1:5000/#/experiments/7/runs/abc"
      "?workflowType=machine_learning"]),
    ("databricks://profile", []),
])
def test_where_to_view(uri: str, expected: list[str]) -> None:
    expected = [line.replace("MLFLOW", tracking.mlflow_program()) for line in expected]
    assert tracking.where_to_view(uri, "7", "abc") == expected


def test_where_to_view_makes_a_relative_store_absolute(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path.resolve()
    monkeypatch.chdir(here)
    mlflow = tracking.mlflow_program()
    assert tracking.ui_command("sqlite:///mlflow.db") == (
        f"{mlflow} ui --backend-store-uri sqlite:///{here / 'mlflow.db'}")
    assert tracking.ui_command("mlruns") == (
        f"{mlflow} ui --backend-store-uri {(here / 'mlruns').as_uri()}")


def test_the_mlflow_program_printed_is_the_one_of_fedcls_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path of fedcl's own ``mlflow``, whatever the PATH (a shell other than fedcl's may
    not find it, or find another), else ``python -m mlflow``."""
    ours = Path(sys.executable).with_name("mlflow")
    assert ours.is_file()
    monkeypatch.setenv("PATH", f"{ours.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert tracking.mlflow_program() == shlex.quote(str(ours))
    monkeypatch.setenv("PATH", f"/usr/bin{os.pathsep}/bin")
    assert tracking.mlflow_program() == shlex.quote(str(ours))
    # no mlflow beside the interpreter: the interpreter's module, a command that works
    real = sys.executable
    fake_python = tmp_path / "env" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    assert tracking.mlflow_program() == f"{fake_python} -m mlflow"
    res = subprocess.run([real, "-m", "mlflow", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "version" in res.stdout, res.stderr
