"""Pinned behaviour: the accuracy matrices (and erasure metrics) that the end-to-end tests' real
runs gave on CPU with their fixed seed, kept in ``pinned_behaviour.json``. A change in fedcl
that moves any of them changes what a run computes, not just how."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PINNED_FILE = Path(__file__).with_name("pinned_behaviour.json")

# float metrics that are sums of float32 weights in float64: compared to a relative tolerance;
# everything else (accuracies: correct predictions over fixed test sets) is compared exactly
REL_TOL = {"weights": 1e-6}
ERASURE_ACCS = ("forget_acc", "retain_acc", "test_acc")


def pinned(name: str) -> dict[str, Any]:
    entries = json.loads(PINNED_FILE.read_text())
    if name not in entries or name == "about":
        raise KeyError(f"no pinned run {name!r} in {PINNED_FILE.name}")
    return entries[name]


def _erasure_view(entry: dict[str, Any]) -> dict[str, Any]:
    """The part of a summary's ``erasures`` entry that is pinned."""
    return {"request": entry["request"], **{k: entry[k] for k in ERASURE_ACCS},
            "oracle": {k: entry["oracle"][k] for k in ERASURE_ACCS},
            "distance_to_oracle": {"weights": entry["distance_to_oracle"]["weights"]}}


def _mismatches(expected: Any, got: Any, path: str) -> list[str]:
    if isinstance(expected, dict) and isinstance(got, dict):
        if expected.keys() != got.keys():
            return [f"{path}: keys {sorted(expected)} expected, got {sorted(got)}"]
        return [m for k in expected for m in _mismatches(expected[k], got[k], f"{path}.{k}")]
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{path}: {len(expected)} entries expected, got {len(got)}"]
        return [m for i, (e, g) in enumerate(zip(expected, got, strict=True))
                for m in _mismatches(e, g, f"{path}[{i}]")]
    key = path.rsplit(".", 1)[-1]
    if key in REL_TOL and isinstance(expected, float) and isinstance(got, int | float):
        same = math.isclose(expected, got, rel_tol=REL_TOL[key], abs_tol=0.0)
    else:
        same = expected == got
    return [] if same else [f"{path}: expected {expected!r}, got {got!r}"]


def assert_pinned(name: str, summary: dict[str, Any]) -> None:
    """``summary`` (a run's summary.json) gives exactly the accuracy matrix pinned as ``name``
    (and, where pinned, the same erasure metrics)."""
    expected = {k: v for k, v in pinned(name).items() if k != "test"}
    got: dict[str, Any] = {"accuracy_matrix": summary["accuracy_matrix"]}
    if "erasures" in expected:
        got["erasures"] = [_erasure_view(e) for e in summary.get("erasures", [])]
    problems = _mismatches(expected, got, name)
    assert not problems, (
        f"run {name!r} differs from {PINNED_FILE.name} (recorded on commit 22d5792):\n  "
        + "\n  ".join(problems)
        + f"\nexpected: {json.dumps(expected)}\ngot:      {json.dumps(got)}")
