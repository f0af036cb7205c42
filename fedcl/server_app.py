"""fedcl's ServerApp: the continual task loop.

For each task: ``strategy.begin_task``; then every round: sample clients from one seeded stream,
let the Flower strategy build the training messages and aggregate the replies, and evaluate the
global model centrally on the test split of every task (seen and unseen); then
``strategy.end_task``. The accuracy after each task's last round is a row of the accuracy matrix.

The same :data:`app` runs under ``flwr run`` (config from ``[tool.flwr.app.config]``) and under
``fedcl simulate`` (which builds it with :func:`build_server_app` around its own config).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedcl import checkpoint, protocol
from fedcl.cohort_wire import form_cohorts, members_rejected, reply_members, split_cohort_replies
from fedcl.config import Config, resolve_tracking_uri, sample_size
from fedcl.data.scenarios import Scenario, build_scenario
from fedcl.erasure import ErasedData, Erasures, UnlearningFailed, check_requests_hold_data
from fedcl.errors import FedclError, RunAborted, RunCancelled
from fedcl.results import RoundRecord, build_summary, stability_metrics, write_outputs
from fedcl.tracking import OUTBOX_FILE, Tracker
from fedcl.training import accuracy, resolve_device
from fedcl.validation import screen_replies
from strategies import registry
from strategies.base import RoundInfo

log = logging.getLogger("fedcl")
# How often the server asks for replies: each reply waits half of it on average, and a round
# of 50 clients trained as one cohort takes ~0.3 s on a GPU (BENCHMARKS.md).
POLL_S = 0.01
# The first contact with the clients waits at least this long: it includes starting their
# processes (Ray actors, SuperNode app processes) and importing torch.
CLIENT_STARTUP_TIMEOUT_S = 300.0


class RunObserver(Protocol):
    """Receives a run's progress (the CLI's live display)."""

    def on_start(self, config: Config, total_rounds: int, run_id: str | None,
                 tracking_uri: str) -> None: ...

    def on_round(self, record: RoundRecord) -> None: ...


@dataclass
class RunControl:
    """Shared between the ServerApp thread and whoever drives it (``fedcl simulate``)."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    observer: RunObserver | None = None
    summary: dict[str, Any] | None = None
    error: BaseException | None = None
    run_id: str | None = None
    tracking_uri: str | None = None
    resume: dict[str, Any] | None = None  # a checkpoint to continue from (fedcl.checkpoint)


# --------------------------------------------------------------------------------------------
# Messaging helpers
# --------------------------------------------------------------------------------------------
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
                     cancel: threading.Event | None) -> tuple[dict[int, int], list[str]]:
    """Ask ``node_ids`` for their partition ids: (partition id -> node id, one problem line per
    node that failed to answer properly)."""
    messages = [Message(content=RecordDict({protocol.CONFIG: ConfigRecord(
        {protocol.QUERY_IDENTITY: True})}), message_type=MessageType.QUERY, dst_node_id=nid)
        for nid in node_ids]
    replies = send_and_receive(grid, messages, timeout, cancel)
    found: dict[int, int] = {}
    problems: list[str] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            problems.append(f"client on node {node} failed to start: "
                            f"{error_line(msg.error.reason)}")
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


def discover_clients(grid: Grid, expected: int, timeout: float,
                     cancel: threading.Event | None) -> dict[int, int]:
    """Ask every connected node for its partition id; returns partition id -> node id."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if cancel is not None and cancel.is_set():
            raise RunCancelled("run cancelled")
        if time.monotonic() > deadline:
            raise RunAborted(f"only {len(node_ids)} of {expected} clients connected within "
                             f"{timeout:.0f} s")
        time.sleep(0.2)
    roster, problems = query_partitions(grid, node_ids, expected, timeout, cancel)
    if problems:
        raise RunAborted(problems[0])
    missing = sorted(set(range(expected)) - set(roster))
    if missing:
        raise RunAborted(f"no reply from clients with partition-id {missing[:10]}")
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


def client_reports(replies: list[Message]) -> dict[str, float | None]:
    """From the clients' own reports: the longest time a train handler ran (s), and the
    largest CUDA memory peak and allocator reserve (MiB); None where no reply said."""
    out: dict[str, float | None] = {}
    for field_name, key, scale in (("client_compute_s", protocol.HANDLER_SECONDS, 1.0),
                                   ("client_gpu_peak_mb", protocol.GPU_PEAK_BYTES, 2**-20),
                                   ("client_gpu_reserved_mb", protocol.GPU_RESERVED_BYTES,
                                    2**-20)):
        values = [float(m.content[protocol.CLIENT_INFO][key]) for m in replies
                  if key in m.content[protocol.CLIENT_INFO]]
        out[field_name] = max(values) * scale if values else None
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


def _pid(msg: Message) -> int:
    return int(msg.content[protocol.CLIENT_INFO][protocol.PARTITION_ID])


def sample_clients(available: list[int], fraction: float, seed: int, round_: int) -> list[int]:
    """The round's clients: ``max(1, int(fraction * N))`` of the available partition ids, drawn
    from one seeded stream, so every strategy sees the same clients in the same round."""
    k = sample_size(len(available), fraction)
    rng = np.random.default_rng([seed, round_, 5])
    return sorted(int(p) for p in rng.choice(sorted(available), size=k, replace=False))


# --------------------------------------------------------------------------------------------
# Central evaluation
# --------------------------------------------------------------------------------------------
class Evaluator:
    """Test accuracy of a set of global arrays on every task of the scenario."""

    def __init__(self, scenario: Scenario, config: Config, device: torch.device) -> None:
        self.scenario = scenario
        self.device = device
        self.batch_size = config.eval_batch_size
        self.model = registry.build_model(config, scenario).to(device)
        # test sets stay on the device: moved once, not after every round
        self.test = [tuple(v.to(device) for v in scenario.test_data(
            t, config.eval_samples_per_task, config.seed)) for t in range(len(scenario.tasks))]

    def __call__(self, arrays: ArrayRecord) -> list[float]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        ds = self.scenario.dataset
        return [accuracy(self.model, x, y, self.scenario.head_for(t), ds.mean, ds.std,
                         self.device, self.batch_size)
                for t, (x, y) in enumerate(self.test)]


# --------------------------------------------------------------------------------------------
# One training round
# --------------------------------------------------------------------------------------------
@dataclass
class RoundOutcome:
    arrays: ArrayRecord  # the new global arrays
    ok: list[Message]  # the replies aggregated, by partition id
    rejected: list[str]  # why replies (or cohort members) were refused
    failures: int  # sampled clients that failed, did not answer or were rejected
    train_metrics: Any
    clients: list[int]  # the partition ids aggregated (a cohort's reduced reply stands for all
    # its members)


def train_round(grid: Grid, roster: Roster, strategy: Any, config: Config, config_json: str,
                arrays: ArrayRecord, info: RoundInfo, pids: list[int],
                cancel: threading.Event | None, clock: PhaseClock | None = None,
                replay: bool = False, erased: ErasedData | None = None,
                train: bool = True, reduce: bool = True) -> RoundOutcome:
    """Send the round's training messages to clients ``pids``, screen the replies and let the
    strategy aggregate them. ``replay``: a round run by an erasure (the retrain oracle, an
    unlearning method): clients leave their Context.state alone. ``erased``: the classes
    clients must leave out of their data. ``train=False``: clients send their task-end payloads
    for the global model without training it. ``reduce``: cohorts may reply with their members'
    weighted mean where the strategy allows it this round (its ``cohort_mean_key``); False
    where every client's own reply is needed."""
    train_config = ConfigRecord({
        protocol.RUN_CONFIG_JSON: config_json, protocol.TASK: info.task,
        protocol.ROUND: info.round, protocol.TASK_ROUND: info.task_round,
        protocol.LAST_ROUND_OF_TASK: info.last_of_task, protocol.REPLAY: replay,
        protocol.ERASED_CLASSES: erased.encode() if erased else "",
        protocol.NO_TRAIN: not train})
    messages = strategy.configure_round(
        info, arrays, train_config,
        SampledGrid(grid, [roster.nodes[q] for q in pids]))  # type: ignore[arg-type]
    if config.cohort_size > 1 and train:
        node_to_pid = roster.node_to_pid()
        mean_key = strategy.cohort_mean_key(info) if reduce else None
        cohorts = form_cohorts(messages, node_to_pid, config.cohort_size, mean_key)
        replies = send_and_receive(grid, [leader for leader, _ in cohorts],
                                   config.round_timeout_s, cancel)
        replies = split_cohort_replies(replies, cohorts, node_to_pid)
    else:
        replies = send_and_receive(grid, messages, config.round_timeout_s, cancel)
    if clock:
        clock("clients")
    ok, rejected = screen_replies([m for m in replies if not m.has_error()], arrays,
                                  config.max_update_norm_ratio)
    if clock:
        clock("screen")
    rejected += [reason for m in ok for reason in members_rejected(m)]
    ok = sorted((m for m in ok if _pid(m) in pids), key=_pid)
    clients = sorted(q for m in ok for q in reply_members(m))
    if rejected:
        log.warning("round %d: rejected %d replies: %s", info.round, len(rejected),
                    "; ".join(rejected[:5]))
    if len(clients) < config.min_train_clients:
        reasons = [m.error.reason for m in replies if m.has_error()]
        detail = f"; first error: {error_line(reasons[0])}" if reasons else ""
        raise RunAborted(
            f"round {info.round} (task {info.task}){' of the retrain oracle' if replay else ''}"
            f": {len(clients)} of {len(pids)} clients replied, fewer than "
            f"min_train_clients={config.min_train_clients}{detail}")
    if ok and all(int(m.content[protocol.METRICS][protocol.NUM_EXAMPLES]) == 0 for m in ok):
        # every sampled client's data of the task is erased: nothing to learn this round
        log.warning("round %d: the sampled clients hold no samples after erasures", info.round)
        strategy.take_payloads(ok)
        return RoundOutcome(arrays, ok, rejected, len(pids) - len(clients), None, clients)
    new_arrays, train_metrics = strategy.aggregate_train(info.round, ok)
    if new_arrays is not None:
        arrays = keep_dtypes(new_arrays, arrays)
    if clock:
        clock("aggregate")
    return RoundOutcome(arrays, ok, rejected, len(pids) - len(clients), train_metrics, clients)


# --------------------------------------------------------------------------------------------
# The task loop
# --------------------------------------------------------------------------------------------
def _in_background(fn: Any, *args: Any) -> Future[Any]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcl")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def default_run_name(config: Config) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return config.run_name or f"{config.strategy}-{config.scenario}-{stamp}"


def run_continual(grid: Grid, config: Config, control: RunControl | None = None) -> dict[str, Any]:
    """Run the whole task stream on ``grid`` (or the rest of it, when ``control.resume`` holds
    a checkpoint); returns the summary (also written to disk)."""
    control = control or RunControl()
    started = time.monotonic()
    config.validate()
    run_name = default_run_name(config)
    config.run_name = run_name
    out_dir = Path(config.output or Path("outputs") / run_name)
    tracking_uri = resolve_tracking_uri(config)
    scenario = build_scenario(config)
    device = resolve_device(config.device)
    strategy = registry.build(config)
    evaluator = Evaluator(scenario, config, device)
    schedule = config.erasure_requests()
    check_requests_hold_data(config, scenario, schedule, config.data_dir)  # before any run
    tracker = Tracker(tracking_uri, config.experiment, run_name, outbox=out_dir / OUTBOX_FILE)
    control.tracking_uri = tracking_uri
    starting: Future[str] | None = None
    if control.resume is not None:
        progress = checkpoint.restore(control.resume, strategy)
        control.run_id = tracker.resume(control.resume["mlflow_run_id"])
    else:
        arrays = ArrayRecord(registry.build_model(config, scenario).state_dict())
        progress = checkpoint.Progress(arrays=arrays, baseline=evaluator(arrays))
        # the MLflow run is created while the clients start up (each takes seconds)
        starting = _in_background(tracker.start, config.to_dict())
    try:
        roster = Roster(discover_clients(grid, config.clients,
                                         max(config.round_timeout_s, CLIENT_STARTUP_TIMEOUT_S),
                                         control.cancel), config.clients)
        if starting is not None:
            control.run_id = starting.result()
        num_tasks, rounds = len(scenario.tasks), config.rounds_per_task
        if control.observer:
            control.observer.on_start(config, num_tasks * rounds, control.run_id, tracking_uri)
        config_json = config.to_json()
        p = progress
        erasures = Erasures(grid, config, scenario, evaluator, tracker, out_dir)
        if control.resume is not None:
            erasures.load_state_dict(control.resume.get("unlearning", {}))
        ckpt = out_dir / checkpoint.FILE

        def save_checkpoint() -> None:
            checkpoint.save(ckpt, p, strategy, config, control.run_id,
                            p.wall_time_before_s + time.monotonic() - started,
                            extra={"unlearning": erasures.state_dict()})

        def carry_out_erasures(point: tuple[int, int]) -> Any:
            """Apply the schedule's requests due at or before ``point``; returns the strategy."""
            current = strategy
            while (p.erasures_done < len(schedule)
                   and schedule[p.erasures_done].point(rounds) <= point):
                try:
                    current = erasures.apply(schedule[p.erasures_done], p, current, roster,
                                             control.cancel)
                except UnlearningFailed:
                    save_checkpoint()  # the model before the request, for --resume
                    raise
                p.erasures_done += 1
            return current
        t0 = time.monotonic()  # a round's seconds run from the previous round's end
        while p.task < num_tasks:
            clock = PhaseClock(t0)
            task = p.task
            if not p.task_started:
                # requests of the previous task's end still pending (a resume after a failed
                # unlearning) come before this task begins
                strategy = carry_out_erasures((task, 0))
                p.arrays = strategy.begin_task(task, p.arrays)
                p.task_started = True
            task_round = p.task_round
            strategy = carry_out_erasures((task, task_round))
            p.global_round += 1
            connected, lost, back = connected_clients(
                roster, grid, config, f"round {p.global_round} (task {task})", control.cancel)
            pool = [q for q in connected if q not in p.erased_clients]
            pids = sample_clients(pool, config.fraction_train, config.seed, p.global_round)
            info = RoundInfo(task, task_round, rounds, p.global_round)
            outcome = train_round(grid, roster, strategy, config, config_json, p.arrays, info,
                                  pids, control.cancel, clock, erased=ErasedData.of(p),
                                  reduce=not erasures.observes_rounds)
            erasures.observe_round(p, info, p.arrays, outcome)
            ok, rejected, failures = outcome.ok, outcome.rejected, outcome.failures
            for m in ok:
                info_rec = m.content[protocol.CLIENT_INFO]
                for q in reply_members(m):  # a cohort's members report its leader's state
                    p.client_state[q] = {
                        "keys": [k for k in str(info_rec.get(protocol.STATE_KEYS, "")).split(",")
                                 if k],
                        "bytes": int(info_rec.get(protocol.STATE_BYTES, 0))}
            p.arrays, train_metrics = outcome.arrays, outcome.train_metrics
            acc = evaluator(p.arrays)
            clock("evaluate")
            p.curves.append(acc)
            p.round_task.append(task)
            min_acc, wc_acc = stability_metrics(p.curves, p.round_task)
            loss = train_metrics.get(protocol.TRAIN_LOSS) if train_metrics else None
            record = RoundRecord(
                task=task, round=p.global_round, task_round=task_round, acc_per_task=acc,
                avg_acc=float(np.mean(acc[:task + 1])), min_acc=min_acc, wc_acc=wc_acc,
                train_loss=None if loss is None else float(loss),
                clients=len(outcome.clients), replies=len(ok),
                failures=failures, rejected=len(rejected), connected=len(connected),
                lost=lost, back=back, sampled=pids, seconds=time.monotonic() - t0,
                ended_at=time.time(), phases=clock.phases, **client_reports(ok))
            p.records.append(record)
            tracker.log_round(record)
            if control.observer:
                control.observer.on_round(record)
            clock("log")
            if info.last_of_task:
                ended = strategy.end_task(task, p.arrays)
                # the matrix row is the round's accuracy unless end_task changed the model
                p.matrix.append(acc if ended is p.arrays else evaluator(ended))
                p.arrays = ended
                state = strategy.state_metrics()
                if state:
                    tracker.log_metrics(state, step=p.global_round)
                    p.strategy_state.append({"task": task, **state})
                p.task, p.task_round, p.task_started = task + 1, 1, False
                strategy = carry_out_erasures((task, rounds + 1))
                clock("end_task")
            else:
                p.task_round += 1
            save_checkpoint()
            clock("checkpoint")
            t0 = clock.last
        summary = build_summary(
            strategy=config.strategy, config=config.to_dict(), matrix=p.matrix,
            baseline=p.baseline, rounds=p.records,
            wall_time_s=p.wall_time_before_s + time.monotonic() - started,
            mlflow_run_id=control.run_id, tracking_uri=tracking_uri)
        summary["strategy_state"] = p.strategy_state
        summary["erasures"] = p.erasures
        summary["client_state"] = {str(k): v for k, v in sorted(p.client_state.items())}
        files = write_outputs(summary, out_dir, config.to_toml())
        files += strategy.save_state(out_dir)
        summary["output_dir"] = str(out_dir)
        unsent = tracker.finish(summary, files, wait_s=config.tracking_wait_s)
        if unsent:
            summary["mlflow_outbox"] = str(out_dir / OUTBOX_FILE)
        return summary
    except BaseException as err:
        if starting is not None and starting.exception() is None:
            control.run_id = starting.result()  # the run to mark
        reason = str(err) if isinstance(err, FedclError) else f"{type(err).__name__}: {err}"
        tracker.fail(reason, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


def build_server_app(config: Config | None = None, control: RunControl | None = None
                     ) -> ServerApp:
    """A ServerApp running :func:`run_continual` with ``config`` (or, when None, the config
    Flower passes in ``context.run_config``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ctl = control or RunControl()
        try:
            cfg = config if config is not None else Config.from_run_config(context.run_config)
            ctl.summary = run_continual(grid, cfg, ctl)
        except BaseException as err:
            ctl.error = err
            if control is None:  # under `flwr run`: let Flower report it
                raise
        finally:
            ctl.done.set()

    return app


#: The ServerApp that ``flwr run`` loads (``[tool.flwr.app.components]``).
app = build_server_app()

__all__ = ["RunControl", "RunObserver", "app", "build_server_app", "run_continual",
           "sample_clients", "send_and_receive"]
