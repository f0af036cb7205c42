"""``fedcl compare``: the runs of one MLflow experiment side by side."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from fedcl.config import Config, resolve_tracking_uri
from fedcl.tracking import fetch_runs

# (column, where it comes from, key)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run_name", "run", "run_name"),
    ("status", "run", "status"),
    ("strategy", "params", "strategy"),
    ("scenario", "params", "scenario"),
    ("dataset", "params", "dataset"),
    ("clients", "params", "clients"),
    ("tasks", "params", "tasks"),
    ("rounds_per_task", "params", "rounds_per_task"),
    ("partition", "params", "partition"),
    ("seed", "params", "seed"),
    ("acc", "metrics", "acc"),
    ("forgetting", "metrics", "forgetting"),
    ("learning_acc", "metrics", "learning_accuracy"),
    ("intransigence", "metrics", "intransigence"),
    ("bwt", "metrics", "bwt"),
    ("fwt", "metrics", "fwt"),
    ("wall_time_s", "metrics", "wall_time_s"),
    ("run_id", "run", "run_id"),
)
PERCENT = {"acc", "forgetting", "learning_acc", "intransigence", "bwt", "fwt"}
# An erasure's MLflow metrics (``erasure_<i>_<name>``) shown when a run has them, as
# ``e<i>_<name>``: the method's, the retrained oracle's, and their distance.
ERASURE_METRICS = ("forget_acc", "retain_acc", "test_acc", "mia", "seconds",
                   "oracle_forget_acc", "oracle_retain_acc", "oracle_test_acc", "oracle_mia",
                   "oracle_seconds", "weights", "cka_forget", "cka_retain")
ERASURE_PERCENT = {"forget_acc", "retain_acc", "test_acc", "mia", "oracle_forget_acc",
                   "oracle_retain_acc", "oracle_test_acc", "oracle_mia"}


def columns_for(runs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The columns: :data:`COLUMNS`, and where any run carried out erasures, its unlearning
    method and every erasure's metrics (before ``run_id``)."""
    count = 0
    for run in runs:
        while any(f"erasure_{count}_{m}" in run["metrics"] for m in ERASURE_METRICS):
            count += 1
    if not count:
        return list(COLUMNS)
    extra = [("unlearning", "params", "unlearning")]
    extra += [(f"e{i}_{m}", "metrics", f"erasure_{i}_{m}")
              for i in range(count) for m in ERASURE_METRICS]
    return [*COLUMNS[:-1], *extra, COLUMNS[-1]]


def rows_for(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        row: dict[str, Any] = {}
        for col, src, key in columns_for(runs):
            row[col] = run[key] if src == "run" else run[src].get(key)
        rows.append(row)
    return rows


def _is_percent(col: str) -> bool:
    return col in PERCENT or (col.startswith("e") and col.split("_", 1)[-1] in ERASURE_PERCENT
                              and col.split("_", 1)[0][1:].isdigit())


def _cell(col: str, value: Any) -> str:
    if value is None:
        return "-"
    if _is_percent(col):
        return f"{float(value) * 100:.2f}"
    if col == "wall_time_s" or col.endswith("seconds"):
        return f"{float(value):.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0]) if rows else [c for c, _, _ in COLUMNS]
    header = [c + (" %" if _is_percent(c) else "") for c in cols]
    cells = [[_cell(c, r[c]) for c in cols] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def format_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = list(rows[0]) if rows else [c for c, _, _ in COLUMNS]
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().rstrip("\n")


def plot_rows(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["run_name"]) for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows)), 3.5))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [100 * float(r["acc"] or 0) for r in rows], width,
           label="ACC")
    ax.bar([x + width / 2 for x in xs], [100 * float(r["forgetting"] or 0) for r in rows], width,
           label="forgetting")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(experiment: str, tracking_uri: str | None = None, fmt: str = "table",
            plot: str | None = None) -> str:
    uri = resolve_tracking_uri(Config(tracking_uri=tracking_uri))
    rows = rows_for(fetch_runs(uri, experiment))
    if plot:
        plot_rows(rows, plot)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        return format_csv(rows)
    return format_table(rows)
