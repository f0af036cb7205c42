"""``fedcl compare``: the runs of one or more MLflow experiments side by side.

Each run is labelled by its strategy and the settings in which the compared runs differ
(``fedavg lr=0.05``, ``fot threshold=0.9``; a strategy's or an unlearning method's parameters
count as differing when runs of that strategy or method differ in them), not by its run name.
Everything comes from what a run logs to MLflow (:mod:`fedcl.tracking`): its params (the whole
config), its final metrics, its erasures' metrics ``erasure_<i>_<name>`` (request ``i`` in the
order the run carried its ``erasures`` out) and the tag ``fedcl.error`` (why it failed).

Three forms: a table for reading (the runs; their erasures, one row per request; why runs
failed), and JSON or CSV for scripts: one flat row per run, numbers as numbers, erasure
metrics as ``<request> <metric>`` (``client=7@t1 forget_acc``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedcl.config import Config, resolve_tracking_uri
from fedcl.erasure import in_stream_order, parse_schedule
from fedcl.errors import ConfigError, FedclError
from fedcl.tracking import fetch_runs

#: Settings shown for every run in JSON and CSV (in the table: once, when every run shares them).
CONFIG_COLUMNS = ("strategy", "scenario", "dataset", "clients", "tasks", "rounds_per_task",
                  "partition", "seed", "cohort_size")
#: The final metrics, in this order (those no run has are left out of the table).
METRICS = ("acc", "forgetting", "forgetting_at_task_end", "learning_accuracy", "intransigence",
           "bwt", "fwt", "bytes_down_per_round", "bytes_up_per_round", "wall_time_s")
#: Bytes, shown in the table in MB (10^6 bytes; JSON and CSV keep bytes).
BYTES = {"bytes_down_per_round", "bytes_up_per_round"}
PERCENT = {"acc", "forgetting", "forgetting_at_task_end", "learning_accuracy", "intransigence",
           "bwt", "fwt"}
#: Where and how a run was stored, not what it did: never part of a label.
BOOKKEEPING = {"tracking_uri", "tracking_wait_s", "experiment", "run_name", "output",
               "data_dir", "download"}
#: Parameter groups that belong to the setting named by the key: runs of different strategies
#: (methods) do not differ in each other's parameters.
PARAM_GROUPS = {"strategy_params.": "strategy", "unlearning_params.": "unlearning"}
#: Settings that matter only to runs with erasure requests.
WITH_ERASURES = ("unlearning", "unlearning_params.")
#: The table's headers (JSON and CSV keep MLflow's metric names).
HEADERS = {"acc": "ACC %", "forgetting": "forgetting %",
           "forgetting_at_task_end": "forgetting at\ntask end %",
           "learning_accuracy": "learning\naccuracy %", "intransigence": "intransigence %",
           "bwt": "BWT %", "fwt": "FWT %", "wall_time_s": "wall\ntime s",
           "bytes_down_per_round": "MB down\n/round", "bytes_up_per_round": "MB up\n/round",
           "oracle_forget_acc": "oracle\nforget_acc %", "oracle_retain_acc": "oracle\nretain_acc %",
           "oracle_test_acc": "oracle\ntest_acc %", "oracle_mia": "oracle\nmia %",
           "oracle_seconds": "oracle\nseconds",
           "weights": "weights: distance\nto the oracle's"}
#: The table's runs' labels wrap (at spaces) down to this width before lines grow longer.
LABEL_WIDTH = 24
#: The plot's run labels wrap (at spaces) at this width.
PLOT_LABEL_WIDTH = 40
#: An erasure's metrics (MLflow ``erasure_<i>_<name>``): the method's, the retrained oracle's,
#: and their distance.
ERASURE_METRICS = ("forget_acc", "retain_acc", "test_acc", "mia", "seconds",
                   "oracle_forget_acc", "oracle_retain_acc", "oracle_test_acc", "oracle_mia",
                   "oracle_seconds", "weights", "cka_forget", "cka_retain")
ERASURE_PERCENT = {"forget_acc", "retain_acc", "test_acc", "mia", "oracle_forget_acc",
                   "oracle_retain_acc", "oracle_test_acc", "oracle_mia"}

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


@dataclass
class Comparison:
    """What ``fedcl compare`` shows: one flat row per run (the JSON and CSV rows), and what
    the table needs to lay them out."""

    rows: list[dict[str, Any]]
    experiments: list[str]
    varying: list[str] = field(default_factory=list)  # the settings in the labels
    common: dict[str, Any] = field(default_factory=dict)  # CONFIG_COLUMNS every run shares
    requests: list[str] = field(default_factory=list)  # erasure requests, first seen first


def typed(text: str | None) -> Any:
    """A logged param (MLflow keeps them as text) as the value it was: an integer, a finite
    float, a boolean, None for an empty one; any other text as it is."""
    if text is None or text == "":
        return None
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return {"True": True, "False": False}.get(text, text)


def fetch(experiments: Iterable[str], tracking_uri: str) -> tuple[list[str], list[dict]]:
    """(experiment names, their runs: each experiment's newest first, with ``experiment``
    added). A name with commas that is not an experiment is read as a list of names; a name
    MLflow lacks is a one-line ConfigError."""
    names: list[str] = []
    runs: list[dict[str, Any]] = []

    def add(name: str) -> None:
        if name in names:
            return
        try:
            found = fetch_runs(tracking_uri, name)
        except FedclError:  # ConfigError: no such experiment
            raise
        except Exception as err:  # a server that cannot be reached, a store MLflow refuses
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise FedclError(f"cannot read MLflow at '{tracking_uri}': {first}") from None
        names.append(name)
        runs.extend({**run, "experiment": name} for run in found)

    for value in experiments:
        try:
            add(value)
        except ConfigError:
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if len(parts) < 2:
                raise
            for part in parts:
                add(part)
    return names, runs


def _field_order() -> dict[str, int]:
    return {name: i for i, name in enumerate(Config().to_dict())}


def _group(key: str) -> str | None:
    return next((setting for prefix, setting in PARAM_GROUPS.items()
                 if key.startswith(prefix)), None)


def _short(key: str, keys: Iterable[str]) -> str:
    """``strategy_params.mu`` as ``mu`` (unless another group has a ``mu`` too)."""
    for prefix in PARAM_GROUPS:
        if key.startswith(prefix):
            name = key[len(prefix):]
            clash = [k for k in keys if k != key and k.split(".", 1)[-1] == name
                     and _group(k) is not None]
            return key if clash else name
    return key


def _concerns(run: dict[str, Any], key: str) -> bool:
    """Whether setting ``key`` matters to ``run``: the unlearning method and its parameters
    only where the run has erasure requests."""
    return not key.startswith(WITH_ERASURES) or bool(run["params"].get("erasures"))


def varying_settings(runs: list[dict[str, Any]]) -> list[str]:
    """The params (not bookkeeping, not the strategy itself) in which the runs differ, in
    the config's order: a strategy's (method's) parameters compared among the runs of that
    strategy (method) only; the unlearning method among the runs with erasure requests."""
    order = _field_order()
    keys = {k for run in runs for k in run["params"]} - BOOKKEEPING - {"strategy"}

    def position(key: str) -> tuple[int, str]:
        base = key.split(".", 1)[0]
        return order.get(base, len(order)), key

    varying = []
    for key in sorted(keys, key=position):
        group = _group(key)
        by_group: dict[Any, set[str | None]] = {}
        for run in runs:
            if _concerns(run, key):
                owner = run["params"].get(group) if group else None
                by_group.setdefault(owner, set()).add(run["params"].get(key))
        if any(len(values) > 1 for values in by_group.values()):
            varying.append(key)
    return varying


def _request_labels(params: dict[str, str], count: int | None = None) -> list[str]:
    """Short names (``client=7@t1``) of a run's erasure requests (the first ``count``), in the
    order the run carried them out; ``e<i>`` where its ``erasures`` param cannot be read."""
    try:
        requests = in_stream_order(parse_schedule(params.get("erasures", "")),
                                   int(params.get("rounds_per_task", "1")))
    except (ConfigError, ValueError):
        requests = []
    labels = [req.label() for req in requests][:count]
    return labels + [f"e{i}" for i in range(len(labels), count or 0)]


def _erasure_count(metrics: dict[str, float]) -> int:
    count = 0
    while any(f"erasure_{count}_{m}" in metrics for m in ERASURE_METRICS):
        count += 1
    return count


def _label(run: dict[str, Any], varying: list[str]) -> str:
    params = run["params"]
    parts = [params.get("strategy") or "?"]
    for key in varying:
        value = params.get(key) if _concerns(run, key) else None
        if not value:
            continue  # a setting this run does not have (another strategy's parameter), or
            # one left empty (no erasures)
        if key == "erasures":
            value = ";".join(_request_labels(params))
        parts.append(f"{_short(key, varying)}={value}")
    return " ".join(parts)


def compare_runs(runs: list[dict[str, Any]], experiments: list[str]) -> Comparison:
    """Label the runs and flatten them into rows (see the module's docstring)."""
    varying = varying_settings(runs)
    labels = [_label(run, varying) for run in runs]
    for label in set(labels):  # runs that differ in nothing: numbered in the order shown
        same = [i for i, other in enumerate(labels) if other == label]
        if len(same) > 1:
            for n, i in enumerate(same, 1):
                labels[i] = f"{label} #{n}"
    erasures = [_erasure_count(run["metrics"]) for run in runs]
    names = [_request_labels(run["params"], n) if n else [] for run, n in zip(
        runs, erasures, strict=True)]
    requests = list(dict.fromkeys(name for run_names in names for name in run_names))
    extra = [k for k in varying if k not in CONFIG_COLUMNS]
    rows = []
    for run, label, run_names in zip(runs, labels, names, strict=True):
        params, metrics = run["params"], run["metrics"]
        row: dict[str, Any] = {"label": label, "experiment": run["experiment"],
                               "run_name": run["run_name"], "status": run["status"],
                               "error": run["tags"].get("fedcl.error")}
        row.update({key: typed(params.get(key)) for key in CONFIG_COLUMNS})
        row.update({_short(key, varying): typed(params.get(key)) for key in extra})
        if requests:  # the method of a run that carried out requests; None for the others
            row["unlearning"] = params.get("unlearning") if run_names else None
        row.update({m: metrics.get(m) for m in METRICS})
        for request in requests:
            i = run_names.index(request) if request in run_names else None
            row.update({f"{request} {m}": None if i is None
                        else metrics.get(f"erasure_{i}_{m}") for m in ERASURE_METRICS})
        row["run_id"] = run["run_id"]
        rows.append(row)
    common = {key: rows[0][key] for key in CONFIG_COLUMNS
              if rows and all(row[key] == rows[0][key] for row in rows)}
    return Comparison(rows, experiments, varying, common, requests)


# ---------------------------------------------------------------------------------------------
# The three forms
# ---------------------------------------------------------------------------------------------
def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    metric = key.rsplit(" ", 1)[-1]
    if key in PERCENT or metric in ERASURE_PERCENT:
        return f"{float(value) * 100:.2f}"
    if key in BYTES:
        return f"{float(value) / 1e6:.3f}"
    if key == "wall_time_s" or metric.endswith("seconds"):
        return f"{float(value):.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _header(key: str) -> str:
    return HEADERS.get(key) or key + (" %" if key in ERASURE_PERCENT else "")


def format_table(comparison: Comparison, width: int | None = None) -> str:
    """The runs (label, status, the final metrics any run has, run id); below, the settings
    every run shares, the erasures (one row per run and request) and why runs failed.
    ``width``: the terminal's (160 when it is not a terminal)."""
    from rich.console import Console

    rows = comparison.rows
    if not rows:
        names = ", ".join(f"'{name}'" for name in comparison.experiments)
        return f"no runs in MLflow experiment{'s' * (len(comparison.experiments) > 1)} {names}"
    width = width or shutil.get_terminal_size((160, 24)).columns
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, highlight=False)
    several = len(comparison.experiments) > 1
    metrics = [m for m in METRICS if any(row[m] is not None for row in rows)]
    table = _table(["run", *(["experiment"] if several else []), "status"],
                   [_header(m) for m in metrics] + ["run id"])  # its first 8 characters
    for row in rows:
        table.add_row(row["label"], *([row["experiment"]] if several else []), row["status"],
                      *(_cell(m, row[m]) for m in metrics), row["run_id"][:8])
    _print(console, table, [row["label"] for row in rows])
    if comparison.common:
        console.print("same in every run: " + "  ".join(
            f"{k}={_cell(k, v)}" for k, v in comparison.common.items()))
    if comparison.requests:
        console.print()
        _print(console, _erasure_table(comparison), [row["label"] for row in rows])
    failed = [row for row in rows if row["error"] and row["status"] != "FINISHED"]
    if failed:
        console.print()
    for row in failed:
        console.print(f"{row['label']}: {row['status']}: {row['error']}")
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()).strip("\n")


def _table(left: list[str], right: list[str], title: str | None = None) -> Any:
    """A plain rich table: text columns ``left`` (the first, the runs' labels, wrapped at
    spaces where the terminal is narrow), then columns ``right`` (numbers), never cut."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  title_justify="left")
    for i, name in enumerate(left):
        table.add_column(name, no_wrap=i > 0, overflow="fold")
    for name in right:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _print(console: Any, table: Any, labels: list[str]) -> None:
    """Print ``table`` at the console's width where it fits with its labels wrapped down to
    :data:`LABEL_WIDTH`; wider where it does not (long lines rather than cut numbers)."""
    from rich.console import Console

    wide = Console(file=io.StringIO(), width=100_000, color_system=None)
    wide.print(table)
    natural = max(len(line.rstrip()) for line in wide.file.getvalue().splitlines())
    longest = max(len(label) for label in labels)
    console.width = max(console.width, natural - max(0, longest - LABEL_WIDTH))
    console.print(table)


def _erasure_table(comparison: Comparison) -> Any:
    rows = comparison.rows
    present = [m for m in ERASURE_METRICS
               if any(row[f"{r} {m}"] is not None for row in rows for r in comparison.requests)]
    table = _table(["run", "request", "unlearning"], [_header(m) for m in present],
                   title="erasures")
    for row in rows:
        for request in comparison.requests:
            values = [row[f"{request} {m}"] for m in present]
            if all(v is None for v in values):
                continue
            table.add_row(row["label"], request, row["unlearning"] or "-",
                          *(_cell(m, v) for m, v in zip(present, values, strict=True)))
    return table


def format_json(comparison: Comparison) -> str:
    return json.dumps(comparison.rows, indent=2, allow_nan=False)


def format_csv(comparison: Comparison) -> str:
    buf = io.StringIO()
    cols = list(comparison.rows[0]) if comparison.rows else [
        "label", "experiment", "run_name", "status", "error", *CONFIG_COLUMNS, *METRICS,
        "run_id"]
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(comparison.rows)
    return buf.getvalue().rstrip("\n")


def bar_chart(comparison: Comparison) -> Any:
    """ACC and forgetting per run (a matplotlib Figure): horizontal bars, one pair per run,
    top to bottom in the table's order, each labelled as in the table, its label written out
    level (a run without them says its status); the legend below the axes, off the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison.rows

    def percent(row: dict[str, Any], key: str) -> float:
        return math.nan if row[key] is None else 100 * float(row[key])

    # a label wraps at spaces as in the table (a long one would squeeze the bars)
    labels = [textwrap.fill(r["label"], PLOT_LABEL_WIDTH, break_on_hyphens=False)
              for r in rows]
    lines = sum(label.count("\n") + 1 for label in labels)
    ys = range(len(rows))
    fig, ax = plt.subplots(figsize=(9.0, 1.4 + 0.3 * max(lines, 2) + 0.15 * len(rows)))
    height = 0.4
    acc = [percent(r, "acc") for r in rows]
    forgetting = [percent(r, "forgetting") for r in rows]
    ax.barh([y - height / 2 for y in ys], acc, height, label="ACC")
    ax.barh([y + height / 2 for y in ys], forgetting, height, label="forgetting")
    for y, row in zip(ys, rows, strict=True):
        if row["acc"] is None:  # no bars: say why (FAILED, RUNNING)
            ax.text(1.0, y, row["status"], ha="left", va="center", fontsize=7)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()  # the first run on top, as in the table
    # forgetting below 0 (a later task improved an earlier one) shows left of the zero line
    lowest = min([0.0, *(v for v in acc + forgetting if not math.isnan(v))])
    ax.set_xlim(lowest - (5.0 if lowest < 0 else 0.0), 100)
    ax.axvline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("%")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 / fig.get_figheight() * 2.5),
              ncol=2, borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    return fig


def plot(comparison: Comparison, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = bar_chart(comparison)
    try:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    except (OSError, ValueError) as err:  # a folder that is not there, an unknown format
        raise ConfigError(f"--plot {path}: {str(err).strip().splitlines()[0]}") from None
    finally:
        plt.close(fig)


def compare(experiments: str | Iterable[str], tracking_uri: str | None = None,
            fmt: str = "table", plot_path: str | None = None) -> str:
    """The runs of ``experiments`` (a name, or several) as ``fmt`` (table, json or csv);
    with ``plot_path``, also a bar chart of ACC and forgetting there."""
    uri = resolve_tracking_uri(Config(tracking_uri=tracking_uri))
    names = [experiments] if isinstance(experiments, str) else list(experiments)
    found, runs = fetch(names, uri)
    comparison = compare_runs(runs, found)
    if plot_path:
        plot(comparison, plot_path)
    if fmt == "json":
        return format_json(comparison)
    if fmt == "csv":
        return format_csv(comparison)
    return format_table(comparison)
