"""Screening of client replies before aggregation: one broken or hostile client must not
poison the global model.

A reply is rejected (and counted, with its reason) when it lacks the model arrays, the metrics
or the client's identity; when its arrays do not have exactly the global model's names, shapes
and dtypes; when any value is NaN or infinite; when ``num-examples`` is not a positive number;
or when its distance to the global model is absurd: larger than ``max_update_norm_ratio`` times
the global model's norm (at least 1). For a strategy whose replies carry no model
(``Capabilities.model_replies`` false) the model record must be empty, and the strategy checks
its own records.

Screening reads each reply's arrays in place (:func:`array_view`, no copy) and gets the distance
from dot products, ``|g - r|^2 = g.g - 2 g.r + r.r``, without forming ``g - r``: two passes over
the reply's memory. The rounding of that formula is about 1e-7 of ``|r|^2``, far below the
threshold it is compared with; a NaN or infinity anywhere makes ``g.g`` non-finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from fedcl import protocol


class Reference:
    """The global model's arrays as NumPy, with each float array's squared norm (computed once
    per round, for every reply)."""

    def __init__(self, record: ArrayRecord) -> None:
        self.record = record
        self.arrays = {key: array.numpy() for key, array in record.items()}
        self.flat = {key: a.ravel() for key, a in self.arrays.items()}
        self.sq = {key: float(np.dot(a, a)) for key, a in self.flat.items()
                   if a.dtype.kind == "f"}
        self.norm = math.sqrt(sum(self.sq.values()))


def reply_problem(msg: Message, reference: ArrayRecord | Reference | None,
                  max_update_norm_ratio: float) -> str | None:
    """Why ``msg`` must not be aggregated, or None when it is fine. ``reference`` None: the
    reply must carry an empty model record (``Capabilities.model_replies`` false)."""
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
    if reference is None:
        return f"{len(arrays)} model arrays in a reply that carries no model" if len(
            arrays) else None
    ref = reference if isinstance(reference, Reference) else Reference(reference)
    reference = ref.record
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"arrays differ from the model's (missing {missing[:3]}, extra {extra[:3]})"
    diff2 = 0.0
    for key, r in ref.arrays.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(r.shape) or got.dtype != reference[key].dtype:
            return (f"array {key} is {got.dtype}{list(got.shape)}, "
                    f"expected {reference[key].dtype}{list(r.shape)}")
        if r.dtype.kind == "f":
            g = array_view(got).ravel()
            gg = float(np.dot(g, g))
            if not math.isfinite(gg):
                return f"array {key} has non-finite values"
            diff2 += gg - 2.0 * float(np.dot(g, ref.flat[key])) + ref.sq[key]
    update = math.sqrt(max(diff2, 0.0))
    limit = update_limit(ref.norm, max_update_norm_ratio)
    if update > limit:
        return f"update norm {update:.3g} exceeds {limit:.3g}"
    return None


def update_limit(reference_norm: float, max_update_norm_ratio: float) -> float:
    """The largest distance from the global model a reply may have."""
    return max_update_norm_ratio * max(reference_norm, 1.0)


def stacked_problems(stacked: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     num_examples: Sequence[int], metrics: dict[str, Sequence[float]],
                     max_update_norm_ratio: float) -> list[str | None]:
    """:func:`reply_problem` for the members of a cohort before it averages them: row ``i`` of
    every ``stacked`` array is member ``i``'s trained value of that ``reference`` (global)
    array; the arrays the cohort did not train equal the reference. Why each member must not
    be averaged (non-finite values or metrics, no samples, an update too large), or None.
    Names, shapes and dtypes need no check: the cohort built them from the reference."""
    ref_sq = sum(float(v.double().pow(2).sum()) for v in reference.values()
                 if v.is_floating_point())
    limit = update_limit(math.sqrt(ref_sq), max_update_norm_ratio)
    k = len(num_examples)
    diff2 = torch.zeros(k, dtype=torch.float64)
    finite: dict[str, list[bool]] = {}
    for name, x in stacked.items():
        rows = x.flatten(1)
        finite[name] = torch.isfinite(rows).all(dim=1).tolist()
        diff = rows - reference[name].reshape(1, -1).to(rows.dtype)
        diff2 += diff.pow_(2).sum(dim=1, dtype=torch.float64).cpu()
    problems: list[str | None] = []
    for i in range(k):
        problem = None
        n = num_examples[i]
        bad_metric = next((key for key, values in metrics.items()
                           if not math.isfinite(float(values[i]))), None)
        bad_array = next((name for name, ok in finite.items() if not ok[i]), None)
        if n <= 0:
            problem = f"num-examples {n!r} is not a positive number"
        elif bad_metric is not None:
            problem = f"metric {bad_metric} is {metrics[bad_metric][i]}"
        elif bad_array is not None:
            problem = f"array {bad_array} has non-finite values"
        elif math.sqrt(float(diff2[i])) > limit:
            problem = f"update norm {math.sqrt(float(diff2[i])):.3g} exceeds {limit:.3g}"
        problems.append(problem)
    return problems


def array_view(array: Array) -> np.ndarray:
    """The values of a Flower ``Array`` (NumPy-serialised) as a read-only view of its bytes,
    without the copy that ``Array.numpy()`` makes. Shape and dtype come from the Array's
    metadata; only the header's length and order are read from the ``.npy`` bytes."""
    data = array.data
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2, 3):
        return array.numpy()
    if data[6] == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    else:
        start = 12 + int.from_bytes(data[8:12], "little")
    fortran = b"'fortran_order': True" in data[:start]
    dtype = np.dtype(array.dtype)
    shape = tuple(array.shape)
    if start + math.prod(shape) * dtype.itemsize != len(data):
        return array.numpy()  # not what the metadata says: let NumPy parse (and complain)
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start)
    return flat.reshape(shape, order="F" if fortran else "C")


def model_problem(arrays: object, reference: ArrayRecord) -> str | None:
    """Why ``arrays``, which a strategy returned as the global model (from ``begin_task``,
    ``end_task`` or its aggregate), cannot replace ``reference``: not an ArrayRecord, other
    names, shapes or dtypes, or non-finite values; None when it can."""
    if not isinstance(arrays, ArrayRecord):
        return f"{type(arrays).__name__}, not an ArrayRecord"
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"arrays that differ from the model's (missing {missing[:3]}, extra {extra[:3]})"
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            return (f"array {key} as {got.dtype}{list(got.shape)}, the model's is "
                    f"{ref.dtype}{list(ref.shape)}")
        values = array_view(got)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"non-finite values in array {key}"
    return None


def screen_replies(replies: Iterable[Message], reference: ArrayRecord | None,
                   max_update_norm_ratio: float) -> tuple[list[Message], list[str]]:
    """The replies fit to aggregate, and the reasons of the rejected ones; ``reference`` None
    for replies that carry no model (:func:`reply_problem`)."""
    ref = None if reference is None else Reference(reference)
    good, reasons = [], []
    for msg in replies:
        problem = reply_problem(msg, ref, max_update_norm_ratio)
        if problem is None:
            good.append(msg)
        else:
            reasons.append(problem)
    return good, reasons
