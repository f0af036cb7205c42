"""Hostile or broken client replies are rejected before aggregation: with one good reply and
one bad reply of each kind, the aggregate equals the good reply alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedcl import plugins, protocol
from fedcl.config import Config
from fedcl.validation import reply_problem, screen_replies

pytestmark = pytest.mark.usefixtures("flower_identity")


GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}


def _msg(
    arrays: dict | None = None,
    n: object = 10,
    pid: int = 0,
    metrics: dict | None = None,
    drop: str | None = None,
) -> Message:
    request = Message(
        content=RecordDict({"config": ConfigRecord({"x": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(
                arrays if arrays is not None else {"w": torch.ones(2, 3), "b": torch.ones(2)}
            ),
            protocol.METRICS: MetricRecord(
                metrics
                if metrics is not None
                else {protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: 0.5}
            ),
            protocol.CLIENT_INFO: ConfigRecord({protocol.PARTITION_ID: pid}),
        }
    )
    if drop:
        del content[drop]
    return Message(content, reply_to=request)


def _bad() -> dict[str, tuple[Message, str]]:
    return {
        "nan": (
            _msg({"w": torch.full((2, 3), float("nan")), "b": torch.ones(2)}),
            "array w has non-finite values",
        ),
        "inf": (
            _msg({"w": torch.ones(2, 3), "b": torch.tensor([1.0, float("inf")])}),
            "array b has non-finite values",
        ),
        "shape": (
            _msg({"w": torch.ones(3, 2), "b": torch.ones(2)}),
            "array w is float32[3, 2], expected float32[2, 3]",
        ),
        "dtype": (
            _msg({"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(2)}),
            "array w is float64[2, 3], expected float32[2, 3]",
        ),
        "missing array": (
            _msg({"w": torch.ones(2, 3)}),
            "arrays differ from the model's (missing ['b'], extra [])",
        ),
        "extra array": (
            _msg({"w": torch.ones(2, 3), "b": torch.ones(2), "evil": torch.ones(1)}),
            "arrays differ from the model's (missing [], extra ['evil'])",
        ),
        "no arrays": (_msg(drop=protocol.ARRAYS), "no model arrays"),
        "no metrics": (_msg(drop=protocol.METRICS), "no num-examples metric"),
        "no identity": (_msg(drop=protocol.CLIENT_INFO), "no client identity"),
        "zero samples": (_msg(n=0), "num-examples 0 is not a positive number"),
        "nan loss": (
            _msg(metrics={protocol.NUM_EXAMPLES: 5, protocol.TRAIN_LOSS: float("nan")}),
            "metric train-loss is nan",
        ),
        "absurd norm": (
            _msg({"w": torch.full((2, 3), 1e6), "b": torch.ones(2)}),
            "update norm 2.45e+06 exceeds 100",
        ),
    }


KINDS = [
    "nan",
    "inf",
    "shape",
    "dtype",
    "missing array",
    "extra array",
    "no arrays",
    "no metrics",
    "no identity",
    "zero samples",
    "nan loss",
    "absurd norm",
]


@pytest.mark.parametrize("kind", KINDS)
def test_each_bad_reply_is_rejected_and_does_not_move_the_model(kind: str) -> None:
    bad, reason = _bad()[kind]
    reference = ArrayRecord(GLOBAL)
    assert reply_problem(bad, reference, 100.0) == reason
    good = _msg({"w": torch.full((2, 3), 2.0), "b": torch.full((2,), 3.0)}, pid=1)
    kept, reasons = screen_replies([good, bad], reference, 100.0)
    assert kept == [good] and reasons == [reason]
    strategy = plugins.build_strategy(Config())
    new, _ = strategy.aggregate_train(1, kept)
    got = new.to_torch_state_dict()
    assert torch.equal(got["w"], torch.full((2, 3), 2.0))
    assert torch.equal(got["b"], torch.full((2,), 3.0))


def test_good_reply_passes_and_norm_limit_scales_with_model() -> None:
    reference = ArrayRecord({"w": torch.full((2, 3), 10.0), "b": torch.zeros(2)})
    # ||reference|| = sqrt(6 * 100) = 24.49; a distance of 50 passes at ratio 3 (limit 73.5)
    ok = _msg({"w": torch.full((2, 3), 10.0 + 50 / np.sqrt(6)), "b": torch.zeros(2)})
    assert reply_problem(ok, reference, 3.0) is None
    assert reply_problem(ok, reference, 2.0) == "update norm 50 exceeds 49"


def test_aggregate_keeps_integer_buffers_integer() -> None:
    from fedcl.rounds import keep_dtypes

    # Flower's weighted mean of BatchNorm's num_batches_tracked (3 and 6) comes back float64
    averaged = ArrayRecord({"bn.num_batches_tracked": torch.tensor(4.6, dtype=torch.float64),
                            "w": torch.ones(2)})
    previous = ArrayRecord({"bn.num_batches_tracked": torch.tensor(3), "w": torch.zeros(2)})
    kept = keep_dtypes(averaged, previous)
    assert kept["bn.num_batches_tracked"].dtype == "int64"
    assert int(kept["bn.num_batches_tracked"].numpy()) == 5
    assert kept["w"].dtype == "float32"
    # so a client's next reply (int64 again) passes the screening
    reply = _msg({"bn.num_batches_tracked": torch.tensor(7), "w": torch.ones(2)})
    assert reply_problem(reply, kept, 100.0) is None


@pytest.mark.parametrize("make", [
    lambda: np.arange(12, dtype=np.float32).reshape(3, 4),
    lambda: np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    lambda: np.array(7, dtype=np.int64),
    lambda: np.zeros((0, 5), dtype=np.float32),
    lambda: np.arange(6, dtype=np.uint8).reshape(2, 3, 1),
], ids=["c-float32", "fortran-float64", "scalar-int64", "empty", "uint8-3d"])
def test_array_view_reads_what_numpy_reads_without_copying(make) -> None:  # type: ignore[no-untyped-def]
    from flwr.app import Array

    from fedcl.validation import array_view

    original = make()
    array = Array(original)
    view = array_view(array)
    expected = array.numpy()
    assert view.dtype == expected.dtype and view.shape == expected.shape
    np.testing.assert_array_equal(view, expected)
    if original.size:
        assert not view.flags.writeable  # a view of the message's bytes, not a copy


def test_a_round_that_stops_names_what_happened() -> None:
    """`--lr 1e6`: all four replied and all were rejected for a NaN loss; the stop line says
    so and hints at the learning rate, instead of "0 of 4 replied"."""
    from fedcl.rounds import round_stop_reason
    from fedcl.strategy import RoundInfo

    line = round_stop_reason(RoundInfo(0, 1, 2, 1), False, [0, 1, 2, 3], [], [], [],
                             ["metric train-loss is nan"] * 4, 1)
    assert line == ("round 1 (task 0): 0 of 4 sampled clients sent a usable update, 4 "
                    "rejected (metric train-loss is nan; metric train-loss is nan); fewer than "
                    "min_train_clients=1; NaN or infinite values: a smaller learning rate (lr) "
                    "may help")
    line = round_stop_reason(RoundInfo(1, 2, 2, 4), True, [0, 1, 2], [], [], [2], [], 2)
    assert line == ("round 4 (task 1) (replayed for an erasure): 0 of 3 sampled clients sent "
                    "a usable update, 1 hold no data, 2 did not answer within round_timeout_s; "
                    "fewer than min_train_clients=2")
