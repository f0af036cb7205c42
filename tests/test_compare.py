"""``fedcl compare`` on an MLflow store that fedcl's real tracker wrote: runs of several
experiments, labelled by strategy and the settings that differ, JSON numbers as numbers,
erasure columns named by their request, why runs failed, and a chart whose legend is off the
bars."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from fedcl import tracking
from fedcl.compare import compare
from fedcl.config import Config
from fedcl.errors import ConfigError
from tests.conftest import run_fedcl

FINAL = {"acc": 0.5, "forgetting": 0.25, "forgetting_at_task_end": 0.125, "bwt": -0.25,
         "fwt": 0.0625, "learning_accuracy": 0.75, "wall_time_s": 12.5}
FAILURE = "round 1 (task 0): 0 of 3 sampled clients sent a usable update"


def _log(uri: str, experiment: str, name: str, final: dict | None, erasure_metrics=None,
         **settings) -> str:
    """One run as `fedcl simulate` logs it: the whole config as params, then the erasures'
    metrics and the final metrics (or a failure)."""
    config = Config(clients=3, tasks=2, rounds_per_task=1, **settings)
    tracker = tracking.Tracker(uri, experiment, name)
    run_id = tracker.start(config.to_dict())
    if erasure_metrics:
        tracker.log_metrics(erasure_metrics, step=2)
    if final is None:
        tracker.fail(FAILURE)
    else:
        assert tracker.finish(final, []) == 0
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ids = {
        "base": _log(uri, "cmp-a", "base", FINAL),
        "lr": _log(uri, "cmp-a", "lr", {**FINAL, "acc": 0.625}, lr=0.05),
        "mu1": _log(uri, "cmp-a", "mu1", {**FINAL, "acc": 0.375}, strategy="fedprox",
                    strategy_params={"proximal_mu": 0.1}),
        "mu5": _log(uri, "cmp-a", "mu5", {**FINAL, "acc": 0.25}, strategy="fedprox",
                    strategy_params={"proximal_mu": 0.5}),
        "failed": _log(uri, "cmp-a", "failed", None, lr=0.5),
        # another experiment: cohorts of 4, two erasure requests given out of stream order
        # (class 3 after task 1, client 2 after task 0): erasure 0 is client 2's
        "erased": _log(uri, "cmp-b", "erased", {**FINAL, "intransigence": 0.125},
                       erasure_metrics={"erasure_0_forget_acc": 0.5,
                                        "erasure_0_oracle_forget_acc": 0.25,
                                        "erasure_0_seconds": 3.25,
                                        "erasure_1_forget_acc": 0.125,
                                        "erasure_1_weights": 0.0625},
                       cohort_size=4, erasures="class=3,after-task=1;client=2,after-task=0",
                       unlearning="ssd"),
    }
    return {"uri": uri, "root": root, "ids": ids}


def test_json_labels_runs_by_strategy_and_the_settings_that_differ(store: dict) -> None:
    rows = json.loads(compare("cmp-a", store["uri"], fmt="json"))
    by_id = {row["run_id"]: row for row in rows}
    ids = store["ids"]
    assert set(by_id) == {ids[k] for k in ("base", "lr", "mu1", "mu5", "failed")}
    # lr differs among all runs; proximal_mu among the fedprox runs (fedavg has none)
    assert by_id[ids["base"]]["label"] == "fedavg lr=0.01"
    assert by_id[ids["lr"]]["label"] == "fedavg lr=0.05"
    assert by_id[ids["mu1"]]["label"] == "fedprox lr=0.01 proximal_mu=0.1"
    assert by_id[ids["mu5"]]["label"] == "fedprox lr=0.01 proximal_mu=0.5"
    assert by_id[ids["failed"]]["label"] == "fedavg lr=0.5"
    row = by_id[ids["mu1"]]
    # numbers stay numbers (MLflow keeps params as text)
    assert row["clients"] == 3 and row["tasks"] == 2 and row["seed"] == 0
    assert row["cohort_size"] == 1 and row["lr"] == 0.01 and row["proximal_mu"] == 0.1
    assert row["acc"] == 0.375 and row["forgetting_at_task_end"] == 0.125
    assert row["learning_accuracy"] == 0.75 and row["intransigence"] is None
    assert row["wall_time_s"] == 12.5
    assert row["run_name"] == "mu1" and row["experiment"] == "cmp-a"
    assert row["status"] == "FINISHED" and row["error"] is None
    failed = by_id[ids["failed"]]
    assert failed["status"] == "FAILED" and failed["error"] == FAILURE
    assert failed["acc"] is None
    assert by_id[ids["base"]]["proximal_mu"] is None


def test_several_experiments_in_one_call_and_erasures_named_by_request(store: dict) -> None:
    uri = store["uri"]
    rows = json.loads(compare(["cmp-a", "cmp-b"], uri, fmt="json"))
    assert json.loads(compare(["cmp-a,cmp-b"], uri, fmt="json")) == rows
    assert [r["experiment"] for r in rows] == ["cmp-a"] * 5 + ["cmp-b"]
    erased = rows[-1]
    assert erased["run_id"] == store["ids"]["erased"]
    # cohort_size and erasures differ now: the labels say so (the unlearning method matters
    # only with erasures: one run has them)
    assert erased["label"] == "fedavg lr=0.01 cohort_size=4 erasures=client=2@t0;class=3@t1"
    base = next(r for r in rows if r["run_id"] == store["ids"]["base"])
    assert base["label"] == "fedavg lr=0.01 cohort_size=1"
    assert erased["cohort_size"] == 4 and erased["unlearning"] == "ssd"
    # a run without requests has no unlearning method to show (its config's default is moot)
    assert all(r["unlearning"] is None for r in rows[:-1])
    assert erased["intransigence"] == 0.125
    # erasure 0 is client 2's (the first in the stream), erasure 1 class 3's
    assert erased["client=2@t0 forget_acc"] == 0.5
    assert erased["client=2@t0 oracle_forget_acc"] == 0.25
    assert erased["client=2@t0 seconds"] == 3.25
    assert erased["class=3@t1 forget_acc"] == 0.125
    assert erased["class=3@t1 weights"] == 0.0625
    assert erased["class=3@t1 mia"] is None and rows[0]["client=2@t0 forget_acc"] is None
    assert not any(key.startswith("e0_") for key in erased)


def _cells(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


def test_the_table_shows_labels_metrics_erasures_and_why_runs_failed(store: dict) -> None:
    from fedcl.compare import compare_runs, fetch, format_table

    names, runs = fetch(["cmp-a", "cmp-b"], store["uri"])
    lines = format_table(compare_runs(runs, names), width=250).splitlines()
    assert _cells(lines[0]) == ["forgetting at", "learning", "wall"]
    assert _cells(lines[1]) == ["run", "experiment", "status", "ACC %", "forgetting %",
                                "task end %", "accuracy %", "intransigence %", "BWT %", "FWT %",
                                "time s", "run id"]
    ids = store["ids"]
    rows = {cells[0]: cells[1:] for cells in map(_cells, lines[3:9])}
    assert rows["fedprox lr=0.01 proximal_mu=0.1 cohort_size=1"] == [
        "cmp-a", "FINISHED", "37.50", "25.00", "12.50", "75.00", "-", "-25.00", "6.25", "12.5",
        ids["mu1"][:8]]
    assert rows["fedavg lr=0.01 cohort_size=4 erasures=client=2@t0;class=3@t1"][1:7] == [
        "FINISHED", "50.00", "25.00", "12.50", "75.00", "12.50"]  # ... with intransigence
    assert rows["fedavg lr=0.5 cohort_size=1"] == ["cmp-a", "FAILED", *["-"] * 8,
                                                   ids["failed"][:8]]
    assert lines[9] == ("same in every run: scenario=class-il  dataset=mnist  clients=3  "
                        "tasks=2  rounds_per_task=1  partition=dirichlet  seed=0")
    # the erasures: one row per run and request, the metrics any run has
    at = lines.index("erasures")
    assert _cells(lines[at + 1]) == ["oracle", "weights: distance"]
    assert _cells(lines[at + 2]) == ["run", "request", "unlearning", "forget_acc %", "seconds",
                                     "forget_acc %", "to the oracle's"]
    assert [_cells(line)[1:] for line in lines[at + 4:at + 6]] == [
        ["client=2@t0", "ssd", "50.00", "3.2", "25.00", "-"],
        ["class=3@t1", "ssd", "12.50", "-", "-", "0.0625"]]
    assert lines[-1] == f"fedavg lr=0.5 cohort_size=1: FAILED: {FAILURE}"


def test_a_narrow_table_wraps_labels_and_keeps_numbers_whole(store: dict) -> None:
    from fedcl.compare import LABEL_WIDTH, compare_runs, fetch, format_table

    names, runs = fetch(["cmp-a"], store["uri"])
    lines = format_table(compare_runs(runs, names), width=100).splitlines()
    assert "…" not in "\n".join(lines)
    # the labels' column is wrapped down to LABEL_WIDTH; the numbers keep their widths (the
    # lines grow past 100 rather than cut them)
    at = next(i for i, line in enumerate(lines) if line.startswith("fedprox lr=0.01 "))
    assert LABEL_WIDTH < lines[at].index("FINISHED") < len("fedprox lr=0.01 proximal_mu=0.5")
    assert _cells(lines[at]) == ["fedprox lr=0.01", "FINISHED", "25.00", "25.00", "12.50",
                                 "75.00", "-25.00", "6.25", "12.5", store["ids"]["mu5"][:8]]
    assert lines[at + 1].strip() == "proximal_mu=0.5"


def test_the_cli_compares_several_experiments_and_refuses_an_unknown_one(
        store: dict, tmp_path: Path) -> None:
    uri = store["uri"]
    res = run_fedcl("compare", "--experiment", "cmp-a", "--experiment", "cmp-b",
                    "--tracking-uri", uri, "--format", "csv", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["experiment"] for r in rows] == ["cmp-a"] * 5 + ["cmp-b"]
    assert rows[-1]["client=2@t0 forget_acc"] == "0.5"
    res = run_fedcl("compare", "--experiment", "cmp-a,nothere", "--tracking-uri", uri,
                    cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"fedcl: error: no MLflow experiment named 'nothere' at {uri}"]


def test_the_plot_keeps_its_legend_off_the_bars(store: dict, tmp_path: Path) -> None:
    from fedcl.compare import bar_chart, compare_runs, fetch

    names, runs = fetch(["cmp-a"], store["uri"])
    comparison = compare_runs(runs, names)
    fig = bar_chart(comparison)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())
    for bar in ax.patches:
        assert not legend.overlaps(bar.get_window_extent())
    # the labels written out level, beside the bars, the first run on top
    labels = ax.get_yticklabels()
    assert [t.get_text() for t in labels] == [r["label"] for r in comparison.rows]
    assert all(t.get_rotation() == 0 for t in labels)
    tops = [t.get_window_extent().y0 for t in labels]
    assert tops == sorted(tops, reverse=True)
    # the bars get most of the figure's width, whatever the labels' length
    assert ax.get_window_extent().width > 0.5 * fig.bbox.width
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ACC", "forgetting"]
    assert [t.get_text() for t in ax.texts] == ["FAILED"]  # the failed run has no bars
    path = tmp_path / "cmp.png"
    compare("cmp-a", store["uri"], plot_path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match=r"--plot .*nofolder"):
        compare("cmp-a", store["uri"], plot_path=str(tmp_path / "nofolder" / "x.png"))


def test_the_plot_shows_negative_forgetting_and_wraps_long_labels() -> None:
    """Forgetting below 0 (a later task improved an earlier one) is a bar left of the zero
    line, not a missing one; a label of 25 erasure requests wraps, without matplotlib's
    layout warning, and the bars keep most of the width."""
    import warnings

    from fedcl.compare import PLOT_LABEL_WIDTH, Comparison, bar_chart

    long = "fedewc erasures=" + ";".join(f"client={i}@t0" for i in range(25))
    rows = [{"label": "fedewc lr=0.01", "acc": 0.5, "forgetting": -0.12, "status": "FINISHED"},
            {"label": long, "acc": 0.25, "forgetting": 0.5, "status": "FINISHED"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = bar_chart(Comparison(rows=rows, experiments=["x"]))
        fig.canvas.draw()
    ax = fig.axes[0]
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    assert widths == [-12.0, 25.0, 50.0, 50.0]
    assert ax.get_xlim()[0] < -12.0 and ax.get_xlim()[1] == 100
    label = ax.get_yticklabels()[1].get_text()
    assert label.replace("\n", "") == long and label.count("\n") >= 5
    assert max(len(line) for line in label.splitlines()) <= PLOT_LABEL_WIDTH
    assert ax.get_window_extent().width > 0.5 * fig.bbox.width


def test_an_experiment_without_runs_says_so(store: dict) -> None:
    tracking._client(store["uri"]).create_experiment("cmp-empty")
    assert compare("cmp-empty", store["uri"]) == "no runs in MLflow experiment 'cmp-empty'"
    assert json.loads(compare("cmp-empty", store["uri"], fmt="json")) == []
