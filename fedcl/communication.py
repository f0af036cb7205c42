"""Communication accounting: the bytes a run's messages carry to and from its clients.

fedcl counts what the Flower messages of the training rounds actually carry, record by record
(:func:`content_bytes`):

* an ``ArrayRecord``: the bytes of its arrays' data as Flower serializes them for the wire
  (``Array.data``: NumPy's ``.npy`` format, the raw data plus a header of 128 bytes for most
  shapes; a float32 tensor of n entries is 4n + 128 bytes; a sparse upload sent as indices
  and values counts as exactly those);
* a ``ConfigRecord`` or ``MetricRecord``: its values (a string's UTF-8 bytes, ``bytes`` as is,
  8 bytes per int or float, 1 per bool, lists element by element) and its keys' UTF-8 bytes.

Not counted: the protobuf framing and the message metadata (ids, node ids, the run's headers),
a few hundred bytes a message whatever the strategy, and the transport's own overhead (gRPC,
TLS). A batched cohort (``cohort_size`` > 1) is a simulation device: the messages are counted
as the clients of a federation would send them, one per client (a cohort's reply that stands
for its members' mean counts as one model upload per member that trained).

Directions: *down* is server to clients (the global model, the round's config, a strategy's
extra records: LwF's teacher, FOT's basis), *up* is clients to server (the trained model, the
metrics, a strategy's payloads: FOT's and PRD's task-end records, FedWeIT's sparse base).

summary.json gets ``rounds[].bytes_down`` and ``rounds[].bytes_up`` (all the round's clients
together) and a ``communication`` block (:func:`communication_summary`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict

from fedcl import protocol

#: what summary.json's ``communication.counted`` says was counted
COUNTED = ("record payloads as carried in the training rounds' Flower messages: array data "
           "bytes, config and metric keys and values; not counted: protobuf framing, message "
           "metadata, transport overhead, erasure and unlearning exchanges")


def value_bytes(value: Any) -> int:
    """Bytes of one config or metric value: UTF-8 for ``str``, as is for ``bytes``, 8 per int
    or float, 1 per bool, the sum over a list's elements."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, int | float):
        return 8
    if isinstance(value, list | tuple):
        return sum(value_bytes(v) for v in value)
    raise TypeError(f"cannot size a record value of type {type(value).__name__}")


def record_bytes(record: Any) -> int:
    """Bytes one record carries: an ``ArrayRecord``'s array data; a config or metric record's
    keys and values (:func:`value_bytes`)."""
    if isinstance(record, ArrayRecord):
        return sum(len(array.data) for array in record.values())
    if isinstance(record, Mapping):
        return sum(len(str(k).encode()) + value_bytes(v) for k, v in record.items())
    raise TypeError(f"cannot size a record of type {type(record).__name__}")


def content_bytes(content: RecordDict) -> dict[str, int]:
    """Bytes per record name of a message's content."""
    return {name: record_bytes(record) for name, record in content.items()}


def _add(into: dict[str, int], sizes: Mapping[str, int], times: int = 1) -> None:
    for name, size in sizes.items():
        into[name] = into.get(name, 0) + size * times


@dataclass
class RoundTraffic:
    """Bytes of one round's messages by record name, ``down`` (to the clients) and ``up``."""

    down: dict[str, int] = field(default_factory=dict)
    up: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_down(self) -> int:
        return sum(self.down.values())

    @property
    def bytes_up(self) -> int:
        return sum(self.up.values())


def round_traffic(messages: Iterable[Message], replies: Iterable[Message]) -> RoundTraffic:
    """The bytes of a round: ``messages``, one per sampled client, as the strategy made them;
    ``replies``, one per client or one per cohort that stands for its members' mean (counted
    once per member averaged into it; the member list itself is not counted). Error replies
    carry nothing."""
    traffic = RoundTraffic()
    for msg in messages:
        _add(traffic.down, content_bytes(msg.content))
    for reply in replies:
        if reply.has_error():
            continue
        sizes = content_bytes(reply.content)
        members = reply.content.get(protocol.COHORT_MEMBERS)
        if members is None:
            _add(traffic.up, sizes)
            continue
        sizes.pop(protocol.COHORT_MEMBERS)
        _add(traffic.up, sizes, len(members[protocol.MEMBER_IDS]))  # type: ignore[index,arg-type]
    return traffic


def communication_summary(rounds: list[dict[str, Any]],
                          payload_keys: Iterable[str] = ()) -> dict[str, Any]:
    """summary.json's ``communication`` block from its ``rounds`` entries (each with
    ``bytes_down``, ``bytes_up``, ``bytes_by_record`` and ``replies``/``clients``):

    * ``bytes_down``, ``bytes_up``: the run's totals (bytes);
    * ``per_round``: mean bytes a round, down and up (all its clients together);
    * ``per_client_round``: mean bytes one sampled client receives, and one client that
      trained sends, a round;
    * ``by_record``: totals by record name, down and up;
    * ``tasks``: per task, its rounds' bytes down and up, and ``payload_bytes_up``: the bytes
      of the strategy's own payload records (its ``payload_keys``) in those rounds: task-end
      payloads for FOT and PRD, but FedWeIT's sparse base goes up every round and GLFC's
      prototype gradients in a task's first round (``by_record`` names each);
    * ``counted``: what is and is not counted (:data:`COUNTED`).
    """
    payload = set(payload_keys)
    down: dict[str, int] = {}
    up: dict[str, int] = {}
    tasks: dict[int, dict[str, int]] = {}
    sampled = trained = 0
    for r in rounds:
        by_record = r.get("bytes_by_record") or {}
        _add(down, by_record.get("down", {}))
        _add(up, by_record.get("up", {}))
        entry = tasks.setdefault(int(r["task"]), {"bytes_down": 0, "bytes_up": 0,
                                                  "payload_bytes_up": 0})
        entry["bytes_down"] += int(r.get("bytes_down", 0))
        entry["bytes_up"] += int(r.get("bytes_up", 0))
        entry["payload_bytes_up"] += sum(v for k, v in by_record.get("up", {}).items()
                                          if k in payload)
        sampled += len(r.get("sampled") or [])
        trained += int(r.get("clients", 0))
    n = len(rounds)
    total_down, total_up = sum(down.values()), sum(up.values())
    return {
        "bytes_down": total_down, "bytes_up": total_up,
        "per_round": {"bytes_down": total_down / n if n else 0.0,
                      "bytes_up": total_up / n if n else 0.0},
        "per_client_round": {"bytes_down": total_down / sampled if sampled else 0.0,
                             "bytes_up": total_up / trained if trained else 0.0},
        "by_record": {"down": dict(sorted(down.items())), "up": dict(sorted(up.items()))},
        "tasks": [{"task": t, **v} for t, v in sorted(tasks.items())],
        "counted": COUNTED,
    }


__all__ = ["COUNTED", "RoundTraffic", "communication_summary", "content_bytes",
           "record_bytes", "round_traffic", "value_bytes"]
