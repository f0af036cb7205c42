"""Screening of client replies before aggregation: one broken or hostile client must not
poison the global model.

A reply is rejected (and counted, with its reason) when it lacks the model arrays, the metrics
or the client's identity; when its arrays do not have exactly the global model's names, shapes
and dtypes; when any value is NaN or infinite; when ``num-examples`` is not a positive number;
or when its distance to the global model is absurd: larger than ``max_update_norm_ratio`` times
the global model's norm (at least 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedcl import protocol


def reply_problem(msg: Message, reference: ArrayRecord, max_update_norm_ratio: float,
                  _ref: dict[str, np.ndarray] | None = None) -> str | None:
    """Why ``msg`` must not be aggregated, or None when it is fine."""
    content = msg.content
    arrays = content.get(protocol.ARRAYS)
    metrics = content.get(protocol.METRICS)
    info = content.get(protocol.CLIENT_INFO)
    if not isinstance(arrays, ArrayRecord):
        return "no model arrays"
    if not isinstance(metrics, MetricRecord) or protocol.NUM_EXAMPLES not in metrics:
        return "no num-examples metric"
    if not isinstance(info, ConfigRecord) or protocol.PARTITION_ID not in info:
        return "no client identity"
    n = metrics[protocol.NUM_EXAMPLES]
    if isinstance(n, list) or not math.isfinite(float(n)) or float(n) <= 0:
        return f"num-examples {n!r} is not a positive number"
    for key, value in metrics.items():
        if not isinstance(value, list) and not math.isfinite(float(value)):
            return f"metric {key} is {value}"
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"arrays differ from the model's (missing {missing[:3]}, extra {extra[:3]})"
    ref_arrays = _ref if _ref is not None else _numpy(reference)
    diff2 = 0.0
    for key, r in ref_arrays.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(r.shape) or got.dtype != reference[key].dtype:
            return (f"array {key} is {got.dtype}{list(got.shape)}, "
                    f"expected {reference[key].dtype}{list(r.shape)}")
        if r.dtype.kind == "f":
            d = (got.numpy() - r).ravel()
            sq = float(np.dot(d, d))
            if not math.isfinite(sq):
                return f"array {key} has non-finite values"
            diff2 += sq
    limit = max_update_norm_ratio * max(_norm(ref_arrays), 1.0)
    if math.sqrt(diff2) > limit:
        return f"update norm {math.sqrt(diff2):.3g} exceeds {limit:.3g}"
    return None


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.dot(a.ravel(), a.ravel()))
                         for a in arrays.values() if a.dtype.kind == "f"))


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def screen_replies(replies: Iterable[Message], reference: ArrayRecord,
                   max_update_norm_ratio: float) -> tuple[list[Message], list[str]]:
    """The replies fit to aggregate, and the reasons of the rejected ones."""
    ref = _numpy(reference)
    good, reasons = [], []
    for msg in replies:
        problem = reply_problem(msg, reference, max_update_norm_ratio, ref)
        if problem is None:
            good.append(msg)
        else:
            reasons.append(problem)
    return good, reasons
