"""The round machinery below the task-stream driver: messages to clients and their replies,
the roster of connected nodes, client sampling, and one training round.

:func:`train_round` is one round of any walk over the task stream (the live run, the retrain
oracle, rebuilding a strategy after unlearning, FedEraser's calibration): it lets the strategy
build the round's messages, sends them (as cohorts where ``cohort_size`` > 1), screens the
replies (:mod:`fedcl.validation`) and lets the strategy aggregate them.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcl import protocol
from fedcl.cohort_wire import (
    form_cohorts,
    members_empty,
    members_rejected,
    reply_members,
    split_cohort_replies,
)
from fedcl.communication import RoundTraffic, round_traffic
from fedcl.config import Config, sample_size
from fedcl.erasure import ErasedData
from fedcl.errors import RunAborted, RunCancelled
from fedcl.strategy import ContinualStrategy, RoundInfo, strategy_label
from fedcl.validation import model_problem, screen_replies

log = logging.getLogger("fedcl")
# How often the server asks for replies: each reply waits half of it on average, and a round
# of 50 clients trained as one cohort takes ~0.3 s on a GPU (BENCHMARKS.md).
POLL_S = 0.01
# The first contact with the clients waits at least this long: it includes starting their
# processes (Ray actors, SuperNode app processes) and importing torch.
CLIENT_STARTUP_TIMEOUT_S = 300.0


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                     cancel: threading.Event | None = None) -> list[Message]:
    """Push messages and collect replies until all arrived, ``timeout`` passed, or cancel."""
    ids = [mid for mid in grid.push_messages(list(messages)) if mid]
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            raise RunCancelled("run cancelled")
        got = list(grid.pull_messages(list(pending)))
        for msg in got:
            pending.discard(msg.metadata.reply_to_message_id)
        replies += got
        if pending:
            time.sleep(POLL_S)
    return replies


class SampledGrid:
    """A view of the grid that shows only the round's sampled nodes (what Flower samples from)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(reason: str, limit: int = 300) -> str:
    """One line from a client's error reason (Ray wraps the client's traceback in it): the
    first line naming an exception (the client's own), without colour codes."""
    lines = [_ANSI.sub("", line).strip() for line in reason.splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("^~ ")]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    text = named[0] if named else (lines or [""])[-1]
    return text[:limit]


def query_partitions(grid: Grid, node_ids: list[int], expected: int, timeout: float,
                     cancel: threading.Event | None, unanswered: list[str] | None = None
                     ) -> tuple[dict[int, int], list[str]]:
    """Ask ``node_ids`` for their partition ids: (partition id -> node id, one problem line per
    node that failed to answer properly). With ``unanswered``, the lines of nodes whose
    answer was an error (a node gone but not yet dropped, a ClientApp that failed to start) go
    there instead of into the problems."""
    messages = [Message(content=RecordDict({protocol.CONFIG: ConfigRecord(
        {protocol.QUERY_IDENTITY: True})}), message_type=MessageType.QUERY, dst_node_id=nid)
        for nid in node_ids]
    replies = send_and_receive(grid, messages, timeout, cancel)
    found: dict[int, int] = {}
    problems: list[str] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            (problems if unanswered is None else unanswered).append(
                f"client on node {node} failed to start: {error_line(msg.error.reason)}")
            continue
        info = msg.content[protocol.CLIENT_INFO]
        pid, num = int(info[protocol.PARTITION_ID]), int(info[protocol.NUM_PARTITIONS])
        if num != expected:
            problems.append(f"client {pid} says the federation has {num} partitions, "
                            f"the config says clients = {expected}")
        elif pid in found:
            problems.append(f"two nodes claim partition-id {pid}")
        else:
            found[pid] = node
    return found, problems


#: Nodes asked who they are when the server assigns the partitions (:func:`assign_partitions`):
#: enough for every client process of a simulation to load the ClientApp before round 1.
WARMUP_NODES = 64


class AssignedGrid:
    """A view of the grid for a federation whose partition ids the server assigns (``fedcl
    simulate``): the nodes, in the order of their node ids, serve partitions 0, 1, ...; every
    message pushed through it carries its destination's partition id in its CONFIG record
    (:data:`~fedcl.protocol.ASSIGNED_PARTITION_ID`), which the client takes for its node
    config's. No node is asked anything to learn the roster, so start-up costs nothing per
    client that is never sampled (a query per node would: one ClientApp call each, about
    30 ms under Flower's simulation engine, minutes for 10^4 clients)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.partition_of: dict[int, int] = {}  # node id -> partition id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        stamped = []
        for msg in messages:
            pid = self.partition_of.get(msg.metadata.dst_node_id)
            if pid is not None:  # a copy: Flower's strategies share one content record
                content = RecordDict(dict(msg.content.items()))
                cfg = msg.content.get(protocol.CONFIG)
                config = ConfigRecord(dict(cfg) if isinstance(cfg, ConfigRecord) else {})
                config[protocol.ASSIGNED_PARTITION_ID] = pid
                content[protocol.CONFIG] = config
                msg.content = content
            stamped.append(msg)
        return self._grid.push_messages(stamped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


#: Seconds between two start-up progress lines while clients register.
STARTUP_REPORT_S = 5.0

#: Receives one line of start-up progress (``RunObserver.on_startup``).
Progress = Callable[[str], None]


def wait_for_nodes(grid: Grid | AssignedGrid, expected: int, timeout: float,
                   cancel: threading.Event | None, hint: str = "",
                   progress: Progress | None = None) -> list[int]:
    """The node ids connected once ``expected`` are; raises :class:`RunCancelled` on cancel
    and :class:`RunAborted` (its line ending in ``hint``) after ``timeout`` seconds.
    ``progress`` hears how many are connected, every :data:`STARTUP_REPORT_S` seconds while
    some are missing."""
    start = time.monotonic()
    deadline, next_report = start + timeout, start + STARTUP_REPORT_S
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if cancel is not None and cancel.is_set():
            raise RunCancelled("run cancelled")
        now = time.monotonic()
        if now > deadline:
            raise RunAborted(f"only {len(node_ids)} of {expected} clients connected within "
                             f"{timeout:.0f} s{hint}")
        if progress is not None and now >= next_report:
            progress(f"{len(node_ids)} of {expected} clients registered "
                     f"({now - start:.0f} s)")
            next_report = now + STARTUP_REPORT_S
        time.sleep(0.2)
    return node_ids


def assign_partitions(grid: AssignedGrid, expected: int, timeout: float,
                      cancel: threading.Event | None, progress: Progress | None = None
                      ) -> dict[int, int]:
    """Once ``expected`` nodes are registered, assign partition ids by node id order and ask
    the first :data:`WARMUP_NODES` who they are (which starts their client processes and checks
    that they take the assignment); returns partition id -> node id. Raises
    :class:`~fedcl.errors.RunAborted` with one line when too few nodes register in
    ``timeout`` or a node answers wrongly."""
    node_ids = sorted(wait_for_nodes(grid, expected, timeout, cancel, progress=progress))
    nodes = dict(enumerate(node_ids[:expected]))
    grid.partition_of = {node: pid for pid, node in nodes.items()}
    warm = node_ids[:min(expected, WARMUP_NODES)]
    if progress is not None:
        progress(f"{expected} clients registered; starting the client processes "
                 f"(the first {len(warm)} clients answer)")
    found, problems = query_partitions(grid, warm, expected, timeout, cancel)  # type: ignore[arg-type]
    if problems:
        raise RunAborted(problems[0])
    took = sum(grid.partition_of[node] == pid for pid, node in found.items())
    if took < len(warm):
        raise RunAborted(f"{len(warm) - took} of {len(warm)} clients asked at start-up did not "
                         "take the partition id the server assigned")
    return nodes


def discover_clients(grid: Grid, expected: int, timeout: float,
                     cancel: threading.Event | None, startup_timeout: float | None = None,
                     progress: Progress | None = None) -> dict[int, int]:
    """Wait up to ``timeout`` seconds for ``expected`` nodes to connect, then ask each for its
    partition id, waiting up to ``startup_timeout`` (default ``timeout``) for the replies,
    which include starting the nodes' ClientApp processes; returns partition id -> node id."""
    node_ids = wait_for_nodes(grid, expected, timeout, cancel,
                              " (round_timeout_s): start one SuperNode per client, or run with "
                              "fewer clients", progress)
    if progress is not None:
        progress(f"{expected} clients connected; asking each for its partition id")
    unanswered: list[str] = []
    roster, problems = query_partitions(grid, node_ids, expected,
                                        timeout if startup_timeout is None else startup_timeout,
                                        cancel, unanswered)
    if problems:
        raise RunAborted(problems[0])
    missing = sorted(set(range(expected)) - set(roster))
    if missing:
        raise RunAborted(unanswered[0] if unanswered else
                         f"no reply from clients with partition-id {missing[:10]}")
    for line in unanswered:  # e.g. a SuperNode killed before, not dropped yet by the SuperLink
        log.warning("left out at start-up, every partition being served by others: %s", line)
    return roster


@dataclass
class Roster:
    """Which node serves each partition id, kept current from round to round.

    A SuperNode that stops (killed, crashed, cut off) stops sending heartbeats, and Flower's
    SuperLink drops it from ``grid.get_node_ids()`` once two heartbeat intervals have passed;
    until then messages to it end in Flower's "Node Unavailable" error reply or the round's
    timeout. A node that connects later (a restarted SuperNode, which may come back under a new
    node id) is asked its partition id and serves that partition again. Under simulation every
    node stays connected and this changes nothing.
    """

    nodes: dict[int, int]  # partition id -> node id
    expected: int
    offline: set[int] = field(default_factory=set)  # partition ids not connected now
    unknown: set[int] = field(default_factory=set)  # connected node ids that serve no partition

    def refresh(self, grid: Grid, timeout: float, cancel: threading.Event | None
                ) -> tuple[list[int], list[int], list[int]]:
        """(connected partition ids, partitions lost since the last refresh, partitions back)."""
        live = set(grid.get_node_ids())
        self.unknown &= live
        new_nodes = sorted(live - set(self.nodes.values()) - self.unknown)
        if new_nodes:
            found, problems = query_partitions(grid, new_nodes, self.expected, timeout, cancel)
            for problem in problems:
                log.warning("a node that joined was not admitted: %s", problem)
            for pid, node in found.items():
                if pid < self.expected and self.nodes.get(pid) not in live:
                    self.nodes[pid] = node
            self.unknown |= set(new_nodes) - set(self.nodes.values())
        connected = sorted(pid for pid, node in self.nodes.items() if node in live)
        offline = set(self.nodes) - set(connected)
        lost, back = sorted(offline - self.offline), sorted(self.offline - offline)
        self.offline = offline
        if lost:
            log.warning("clients with partition-id %s left the federation", lost)
        if back:
            log.warning("clients with partition-id %s are back", back)
        return connected, lost, back

    def node_to_pid(self) -> dict[int, int]:
        return {node: pid for pid, node in self.nodes.items()}


class PhaseClock:
    """Seconds a round spends in each of its phases (``rounds[].phases`` in summary.json)."""

    def __init__(self, start: float) -> None:
        self.last = start
        self.phases: dict[str, float] = {}

    def __call__(self, phase: str) -> None:
        """Close ``phase``: the time since the previous phase ended is added to it."""
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now


def client_reports(replies: list[Message]) -> dict[str, Any]:
    """From the clients' own reports: the longest time a train handler ran (s), the largest
    CUDA memory peak and allocator reserve (MiB), None where no reply said; and how many
    replies came from each worker node (``client_nodes``: Ray node id or host name -> count);
    per GPU (``client_gpus``: ``<worker node>/gpu<physical index>`` -> ``peak_mb``, the
    largest CUDA memory peak of a reply that trained there, and ``replies``)."""
    out: dict[str, Any] = {}
    for field_name, key, scale in (("client_compute_s", protocol.HANDLER_SECONDS, 1.0),
                                   ("client_gpu_peak_mb", protocol.GPU_PEAK_BYTES, 2**-20),
                                   ("client_gpu_reserved_mb", protocol.GPU_RESERVED_BYTES,
                                    2**-20)):
        values = [float(m.content[protocol.CLIENT_INFO][key]) for m in replies
                  if key in m.content[protocol.CLIENT_INFO]]
        out[field_name] = max(values) * scale if values else None
    nodes: dict[str, int] = {}
    for m in replies:
        node = m.content[protocol.CLIENT_INFO].get(protocol.WORKER_NODE)
        if node is not None:
            nodes[str(node)] = nodes.get(str(node), 0) + 1
    out["client_nodes"] = dict(sorted(nodes.items()))
    gpus: dict[str, dict[str, float]] = {}
    for m in replies:
        info = m.content[protocol.CLIENT_INFO]
        if protocol.GPU_ID in info and protocol.GPU_PEAK_BYTES in info:
            where = f"{info.get(protocol.WORKER_NODE, '')}/gpu{info[protocol.GPU_ID]}"
            entry = gpus.setdefault(where, {"peak_mb": 0.0, "replies": 0})
            entry["peak_mb"] = max(entry["peak_mb"], float(info[protocol.GPU_PEAK_BYTES]) * 2**-20)
            entry["replies"] += 1
    out["client_gpus"] = dict(sorted(gpus.items()))
    return out


def keep_dtypes(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``arrays`` with the dtypes of ``like``: Flower's weighted average turns integer buffers
    (BatchNorm's ``num_batches_tracked``) into float64, which clients would then send back as
    int64 and the reply screening would refuse. Integers are rounded."""
    state = arrays.to_torch_state_dict()
    ref = like.to_torch_state_dict()
    for key, value in state.items():
        target = ref[key].dtype if key in ref else value.dtype
        if value.dtype != target:
            if not target.is_floating_point and value.is_floating_point():
                value = value.round()
            state[key] = value.to(target)
    return ArrayRecord(state)


def connected_clients(roster: Roster, grid: Grid, config: Config, where: str,
                      cancel: threading.Event | None) -> tuple[list[int], list[int], list[int]]:
    """The partition ids connected for a round, with those lost and back since the last round.

    With too few connected to sample ``min_train_clients``, waits up to ``round_timeout_s`` for
    nodes to come back, then stops the run with one line."""
    deadline = time.monotonic() + config.round_timeout_s
    lost: list[int] = []
    back: list[int] = []
    while True:
        connected, gone, returned = roster.refresh(grid, min(config.round_timeout_s, 60.0),
                                                   cancel)
        lost, back = lost + gone, back + returned
        if sample_size(len(connected), config.fraction_train) >= config.min_train_clients:
            return connected, sorted(set(lost)), sorted(set(back))
        if time.monotonic() > deadline:
            raise RunAborted(
                f"{where}: only {len(connected)} of {config.clients} clients are connected "
                f"(partition-ids {sorted(roster.offline)[:10]} left), too few to sample "
                f"min_train_clients={config.min_train_clients}")
        if cancel is not None and cancel.is_set():
            raise RunCancelled("run cancelled")
        time.sleep(1.0)


def sample_clients(available: list[int], fraction: float, seed: int, round_: int) -> list[int]:
    """The round's clients: ``max(1, int(fraction * N))`` of the available partition ids, drawn
    from one seeded stream, so every strategy sees the same clients in the same round."""
    k = sample_size(len(available), fraction)
    rng = np.random.default_rng([seed, round_, 5])
    return sorted(int(p) for p in rng.choice(sorted(available), size=k, replace=False))


@dataclass
class RoundOutcome:
    arrays: ArrayRecord  # the new global arrays
    ok: list[Message]  # the replies aggregated, by partition id
    rejected: list[str]  # why replies (or cohort members) were refused
    failures: int  # sampled clients that failed, did not answer or were rejected
    train_metrics: Any  # the strategy's aggregated metrics (a MetricRecord), None if none
    clients: list[int]  # the partition ids aggregated (a cohort's reduced reply stands for all
    # its members)
    empty: list[int] = field(default_factory=list)  # sampled clients with no sample left to
    # train on (erased): neither aggregated nor counted as failures
    traffic: RoundTraffic = field(default_factory=RoundTraffic)  # the round's bytes


def train_round(grid: Grid, roster: Roster, strategy: ContinualStrategy, config: Config,
                config_json: str, arrays: ArrayRecord, info: RoundInfo, pids: list[int],
                cancel: threading.Event | None, clock: PhaseClock | None = None,
                replay: bool = False, erased: ErasedData | None = None,
                train: bool = True, min_clients: int | None = None,
                walk: str = "") -> RoundOutcome:
    """Send the round's training messages to clients ``pids``, screen the replies and let the
    strategy aggregate them. ``replay``: a round run by an erasure (the retrain oracle, an
    unlearning method): clients leave their Context.state alone; ``walk``: the replayed walk
    the round belongs to (:attr:`fedcl.stream.TaskStreamDriver.walk_id`), whose rounds share
    their trainers' stores apart from the live run's. ``erased``: the classes
    clients must leave out of their data. ``train=False``: clients send their task-end payloads
    for the global model without training it. ``min_clients``: the fewest usable answers the
    round needs (default ``config.min_train_clients``; the oracle's replay of a round that lost
    erased clients asks at most for those left). Cohorts may reply with their members' weighted
    mean where the strategy allows it this round (its ``cohort_mean_key``).

    A client left without samples by erasures replies with ``num-examples`` 0: it is counted
    in :attr:`RoundOutcome.empty`, not as a failure or a rejection, and not aggregated; a
    round where no sampled client holds data keeps the model (the strategy still takes the
    replies' payloads).

    Raises :class:`~fedcl.errors.RunAborted` when fewer than ``min_train_clients`` clients
    answer usably (an update or "no data"), naming how many were sampled, answered, rejected
    (first reasons), failed (first error) and a hint; :class:`~fedcl.errors.RunCancelled` on
    cancel."""
    train_config = ConfigRecord({
        protocol.RUN_CONFIG_JSON: config_json, protocol.TASK: info.task,
        protocol.ROUND: info.round, protocol.TASK_ROUND: info.task_round,
        protocol.LAST_ROUND_OF_TASK: info.last_of_task, protocol.REPLAY: replay,
        protocol.ERASED_CLASSES: erased.encode() if erased else "",
        protocol.NO_TRAIN: not train})
    if replay and walk:
        train_config[protocol.WALK] = walk
    model_replies = strategy.capabilities.model_replies
    if not model_replies:  # the strategy's own records carry the update
        train_config[protocol.MODEL_REPLY] = False
    messages = strategy.configure_round(
        info, arrays, train_config,
        SampledGrid(grid, [roster.nodes[q] for q in pids]))  # type: ignore[arg-type]
    if config.cohort_size > 1 and train:
        node_to_pid = roster.node_to_pid()
        mean_key = strategy.cohort_mean_key(info)
        cohorts = form_cohorts(messages, node_to_pid, config.cohort_size, mean_key)
        replies = send_and_receive(grid, [leader for leader, _ in cohorts],
                                   config.round_timeout_s, cancel)
        replies = split_cohort_replies(replies, cohorts, node_to_pid)
    else:
        replies = send_and_receive(grid, messages, config.round_timeout_s, cancel)
    if clock:
        clock("clients")
    traffic = round_traffic(messages, replies)  # before the payloads leave the replies
    pid = protocol.reply_partition_id
    answered = [m for m in replies if not m.has_error()]
    empty_replies = [m for m in answered if protocol.is_empty_reply(m) and _has_id(m)
                     and pid(m) in pids]
    ok, rejected = screen_replies([m for m in answered if m not in empty_replies],
                                  arrays if model_replies else None,
                                  config.max_update_norm_ratio)
    if clock:
        clock("screen")
    rejected += [reason for m in ok for reason in members_rejected(m)]
    ok = sorted((m for m in ok if pid(m) in pids), key=pid)
    clients = sorted(q for m in ok for q in reply_members(m))
    empty = sorted({pid(m) for m in empty_replies} | {q for m in ok for q in members_empty(m)})
    if rejected:
        log.warning("round %d: rejected %d replies: %s", info.round, len(rejected),
                    "; ".join(rejected[:5]))
    needed = config.min_train_clients if min_clients is None else min_clients
    if len(clients) + len(empty) < needed:
        raise RunAborted(round_stop_reason(info, replay, pids, replies, clients, empty,
                                           rejected, needed))
    failures = len(pids) - len(clients) - len(empty)
    if not clients:
        # no sampled client holds data of the task any more (erased): nothing to learn
        log.warning("round %d: the sampled clients hold no samples after erasures", info.round)
        strategy.take_payloads(empty_replies)
        return RoundOutcome(arrays, [], rejected, failures, None, clients, empty, traffic)
    new_arrays, train_metrics = strategy.aggregate_train(info.round, ok)
    if new_arrays is not None:  # None: Flower's "no aggregate", the model stays
        fitted = (keep_dtypes(new_arrays, arrays) if isinstance(new_arrays, ArrayRecord)
                  else new_arrays)
        problem = model_problem(fitted, arrays)
        if problem is not None:
            raise RunAborted(f"{strategy_label(strategy)}'s aggregate_train of round "
                             f"{info.round} (task {info.task}) returned {problem}")
        arrays = fitted
    if clock:
        clock("aggregate")
    return RoundOutcome(arrays, ok, rejected, failures, train_metrics, clients, empty, traffic)


def purge_stores(grid: Grid, roster: Roster, erased: ErasedData, timeout: float,
                 cancel: threading.Event | None) -> dict[int, ConfigRecord]:
    """Ask every connected client to remove what ``erased`` names from its trainer's store
    (:func:`fedcl.client_app.purge`): the samples of its erased classes from its buffers, the
    whole store of an erased client. Returns each answering client's info record (partition id
    -> record, with ``purged-samples``); a client that fails or does not answer within
    ``timeout`` is logged and purges at its next training round, whose message names the
    erased classes (an erased client trains no more)."""
    live = set(grid.get_node_ids())
    targets = {node: pid for pid, node in roster.nodes.items() if node in live}
    config = ConfigRecord({protocol.PURGE: True,
                           protocol.ERASED_CLASSES: erased.encode(),
                           protocol.ERASED_CLIENTS: list(erased.clients)})
    messages = [Message(content=RecordDict({protocol.CONFIG: ConfigRecord(dict(config))}),
                        message_type=MessageType.QUERY, dst_node_id=node) for node in targets]
    replies = send_and_receive(grid, messages, timeout, cancel)
    infos: dict[int, ConfigRecord] = {}
    for msg in replies:
        if msg.has_error():
            log.warning("client on node %s could not purge its store: %s",
                        msg.metadata.src_node_id, error_line(msg.error.reason))
            continue
        info = msg.content[protocol.CLIENT_INFO]
        infos[int(info[protocol.PARTITION_ID])] = info  # type: ignore[index,arg-type]
    missing = sorted(set(targets.values()) - set(infos))
    if missing:
        log.warning("clients %s did not confirm the purge of their stores; they purge before "
                    "they next train", missing[:10])
    return infos


def _has_id(reply: Message) -> bool:
    try:
        protocol.reply_partition_id(reply)
    except (KeyError, TypeError, ValueError):
        return False
    return True


def round_stop_reason(info: RoundInfo, replay: bool, pids: list[int], replies: list[Message],
                      clients: list[int], empty: list[int], rejected: list[str],
                      min_train_clients: int) -> str:
    """The one line a round that cannot go on stops the run with: how many clients were
    sampled, sent an update, hold no data, were rejected (first reasons), failed (first
    error) or did not answer, and a hint where the reasons suggest one."""
    errors = [error_line(m.error.reason) for m in replies if m.has_error()]
    silent = len(pids) - len(clients) - len(empty) - len(rejected) - len(errors)
    parts = [f"{len(clients)} of {len(pids)} sampled clients sent a usable update"]
    if empty:
        parts.append(f"{len(empty)} hold no data")
    if rejected:
        parts.append(f"{len(rejected)} rejected ({'; '.join(rejected[:2])})")
    if errors:
        parts.append(f"{len(errors)} failed (first error: {errors[0]})")
    if silent > 0:
        parts.append(f"{silent} did not answer within round_timeout_s")
    text = " ".join(rejected).lower()
    hint = ""
    if "non-finite" in text or " nan" in text or " inf" in text:
        hint = "; NaN or infinite values: a smaller learning rate (lr) may help"
    elif "update norm" in text:
        hint = ("; updates far from the global model: a smaller lr, or a larger "
                "max_update_norm_ratio")
    where = " (replayed for an erasure)" if replay else ""
    return (f"round {info.round} (task {info.task}){where}: {', '.join(parts)}; fewer than "
            f"min_train_clients={min_train_clients}{hint}")


__all__ = ["CLIENT_STARTUP_TIMEOUT_S", "AssignedGrid", "PhaseClock", "Roster", "RoundOutcome",
           "SampledGrid", "assign_partitions", "client_reports", "connected_clients",
           "discover_clients", "error_line",
           "keep_dtypes", "purge_stores", "query_partitions", "sample_clients",
           "send_and_receive", "train_round"]
