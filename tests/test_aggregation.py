"""The in-place weighted average equals Flower's FedAvg aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcl.aggregation import weighted_average


def _content(arrays: dict[str, np.ndarray], n: float) -> RecordDict:
    from flwr.app import Array

    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": n, "unit-weight": 1})})


def test_weighted_average_by_hand() -> None:
    """Weights 1 and 3: (1*[1, 2] + 3*[5, 6]) / 4 = [4, 5]; an int64 counter 2 and 6 -> 5.0;
    by unit weight the plain mean [3, 4]."""
    replies = [_content({"w": np.array([1.0, 2.0], np.float32), "n": np.array(2)}, 1),
               _content({"w": np.array([5.0, 6.0], np.float32), "n": np.array(6)}, 3)]
    avg = weighted_average(replies, "num-examples")
    assert avg["w"].numpy().tolist() == [4.0, 5.0]
    assert avg["w"].numpy().dtype == np.float32
    assert avg["n"].numpy() == pytest.approx(5.0)
    assert weighted_average(replies, "unit-weight")["w"].numpy().tolist() == [3.0, 4.0]


def test_weighted_average_equals_flowers() -> None:
    rng = np.random.default_rng(0)
    shapes = {"conv": (8, 3, 3, 3), "fc": (10, 32), "bias": (10,)}
    replies = [_content({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()},
                        float(rng.integers(1, 500))) for _ in range(7)]
    ours = weighted_average(replies, "num-examples")
    flowers = aggregate_arrayrecords(replies, "num-examples")
    assert list(ours.keys()) == list(flowers.keys())
    for key in shapes:
        np.testing.assert_allclose(ours[key].numpy(), flowers[key].numpy(), rtol=1e-6,
                                   atol=1e-7)
        assert ours[key].numpy().dtype == flowers[key].numpy().dtype
