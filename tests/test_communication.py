"""Communication accounting (fedcl.communication): hand-counted bytes of records, messages,
cohort replies and a run's summary block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedcl import protocol
from fedcl.communication import (
    communication_summary,
    content_bytes,
    record_bytes,
    round_traffic,
    value_bytes,
)

#: NumPy's .npy header, which Flower's Array.data carries before the raw data (padded to 128
#: bytes for these small shapes)
NPY = 128


def test_value_bytes_by_type() -> None:
    assert value_bytes("héllo") == 6  # UTF-8: é is two bytes
    assert value_bytes(b"\x00\x01\x02") == 3
    assert value_bytes(True) == 1
    assert value_bytes(7) == 8 and value_bytes(0.5) == 8
    assert value_bytes([1, 2, 3]) == 24
    assert value_bytes(["ab", "c"]) == 3
    with pytest.raises(TypeError, match="cannot size a record value of type dict"):
        value_bytes({"a": 1})


def test_record_bytes_counts_array_data_and_config_keys_and_values() -> None:
    arrays = ArrayRecord({"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=torch.float64),
                          "n": torch.zeros((), dtype=torch.int64)})
    assert record_bytes(arrays) == (12 * 4 + NPY) + (4 * 8 + NPY) + (8 + NPY)
    assert record_bytes(ConfigRecord({"lr": 0.1, "name": "abc"})) == (2 + 8) + (4 + 3)
    assert record_bytes(MetricRecord({"num-examples": 10})) == 12 + 8


def test_a_sparse_upload_counts_as_sparse() -> None:
    dense = torch.zeros(100, 10)
    dense[[3, 50, 97]] = 1.0  # 3 of 100 rows kept
    kept = torch.tensor([3, 50, 97], dtype=torch.int32)
    sparse = ArrayRecord({"index": kept, "values": dense[kept.long()]})
    assert record_bytes(sparse) == (3 * 4 + NPY) + (3 * 10 * 4 + NPY)
    assert record_bytes(ArrayRecord({"w": dense})) == 100 * 10 * 4 + NPY


def _message(node: int, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def _reply(to: Message, content: RecordDict) -> Message:
    reply = Message(content, reply_to=to)
    return reply


def test_round_traffic_counts_each_client_and_a_cohort_mean_once_per_member(
        flower_identity: None) -> None:
    model = ArrayRecord({"w": torch.zeros(10)})  # 40 bytes + NPY = 168
    config = ConfigRecord({"r": 1})  # 1 + 8 bytes
    sent = [_message(n, RecordDict({"arrays": model, "config": config})) for n in (1, 2, 3, 4)]
    one = _reply(sent[0], RecordDict({"arrays": model,
                                     "metrics": MetricRecord({"n": 5})}))  # 40; 1 + 8
    reduced = _reply(sent[1], RecordDict({
        "arrays": model, "metrics": MetricRecord({"n": 5}),
        protocol.COHORT_MEMBERS: ConfigRecord({protocol.MEMBER_IDS: [1, 2],
                                               protocol.MEMBERS_EMPTY: [3]})}))
    failed = Message(Error(code=0, reason="boom"), reply_to=sent[3])
    traffic = round_traffic(sent, [one, reduced, failed])
    assert traffic.down == {"arrays": 4 * 168, "config": 4 * 9}
    # the reduced reply stands for the two members averaged into it; its member list is a
    # simulation device, not traffic
    assert traffic.up == {"arrays": 168 + 2 * 168, "metrics": 9 + 2 * 9}
    assert traffic.bytes_down == 4 * 177 and traffic.bytes_up == 3 * 177


def test_content_bytes_by_record_name() -> None:
    content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2, dtype=torch.float16)}),
                          "lwf.teacher": ArrayRecord({"w": torch.zeros(5)})})
    assert content_bytes(content) == {"arrays": 4 + NPY, "lwf.teacher": 20 + NPY}


def test_communication_summary_by_hand() -> None:
    rounds = [
        {"task": 0, "bytes_down": 100, "bytes_up": 60, "sampled": [0, 1], "clients": 2,
         "bytes_by_record": {"down": {"arrays": 100}, "up": {"arrays": 60}}},
        {"task": 0, "bytes_down": 100, "bytes_up": 90, "sampled": [0, 1], "clients": 2,
         "bytes_by_record": {"down": {"arrays": 100}, "up": {"arrays": 60, "fot.sketch": 30}}},
        {"task": 1, "bytes_down": 150, "bytes_up": 30, "sampled": [2], "clients": 1,
         "bytes_by_record": {"down": {"arrays": 50, "fot.basis": 100}, "up": {"arrays": 30}}},
    ]
    s = communication_summary(rounds, payload_keys=("fot.sketch",))
    assert s["bytes_down"] == 350 and s["bytes_up"] == 180
    assert s["per_round"] == {"bytes_down": pytest.approx(350 / 3),
                              "bytes_up": pytest.approx(60.0)}
    assert s["per_client_round"] == {"bytes_down": pytest.approx(350 / 5),
                                     "bytes_up": pytest.approx(180 / 5)}
    assert s["by_record"] == {"down": {"arrays": 250, "fot.basis": 100},
                              "up": {"arrays": 150, "fot.sketch": 30}}
    assert s["tasks"] == [
        {"task": 0, "bytes_down": 200, "bytes_up": 150, "payload_bytes_up": 30},
        {"task": 1, "bytes_down": 150, "bytes_up": 30, "payload_bytes_up": 0}]
    assert communication_summary([])["per_round"] == {"bytes_down": 0.0, "bytes_up": 0.0}


def test_uint8_arrays_count_one_byte_an_entry() -> None:
    assert record_bytes(ArrayRecord([np.zeros((2, 3), dtype=np.uint8)])) == 6 + NPY


def test_client_reports_give_each_gpu_its_peak(flower_identity: None) -> None:
    """Per GPU (worker node and physical index), the largest peak of the replies trained there."""
    from fedcl.rounds import client_reports

    def reply(node: str, gpu: str | None, peak_mib: float) -> Message:
        info = {protocol.WORKER_NODE: node, protocol.HANDLER_SECONDS: 1.0}
        if gpu is not None:
            info[protocol.GPU_ID] = gpu
            info[protocol.GPU_PEAK_BYTES] = int(peak_mib * 2**20)
        sent = _message(1, RecordDict({"config": ConfigRecord({"r": 1})}))
        return _reply(sent, RecordDict({protocol.CLIENT_INFO: ConfigRecord(info)}))

    out = client_reports([reply("a", "0", 100), reply("a", "1", 300), reply("a", "0", 250),
                          reply("b", "0", 50), reply("c", None, 0)])
    assert out["client_gpus"] == {"a/gpu0": {"peak_mb": 250.0, "replies": 2},
                                  "a/gpu1": {"peak_mb": 300.0, "replies": 1},
                                  "b/gpu0": {"peak_mb": 50.0, "replies": 1}}
    assert out["client_gpu_peak_mb"] == 300.0
    assert out["client_nodes"] == {"a": 3, "b": 1, "c": 1}


def test_physical_gpu_reads_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcl.client_app import physical_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert physical_gpu(torch.device("cuda", 1)) == "1"
    assert physical_gpu(torch.device("cuda", 0)) == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert physical_gpu(torch.device("cuda", 2)) == "2"
