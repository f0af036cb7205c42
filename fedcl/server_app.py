"""fedcl's ServerApp: the live run of the task stream.

For each task: ``strategy.begin_task``; then every round: sample clients from one seeded stream,
let the Flower strategy build the training messages and aggregate the replies, and evaluate the
global model centrally on the test split of every task (seen and unseen; or, for a task the
strategy reports its own models on, those: ``ContinualStrategy.task_counts``); then
``strategy.end_task``. The accuracy after each task's last round is a row of the accuracy matrix.
Erasure requests are carried out at their points in the stream (:mod:`fedcl.unlearning_run`).
The order of these calls is the task-stream driver's (:mod:`fedcl.stream`); the round machinery
is :mod:`fedcl.rounds`.

The same :data:`app` runs under ``flwr run`` (config from ``[tool.flwr.app.config]``) and under
``fedcl simulate`` (which builds it with :func:`build_server_app` around its own config).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedcl import checkpoint, plugins, protocol
from fedcl.checkpoint import RunState
from fedcl.cohort_wire import reply_members
from fedcl.communication import communication_summary
from fedcl.config import RESUME_KEY, Config, resolve_tracking_uri
from fedcl.data.partition import check_partitions
from fedcl.erasure import ErasedData, check_requests_hold_data
from fedcl.errors import FedclError, RunAborted, RunCancelled
from fedcl.evaluation import Evaluator, accuracies, erasure_view
from fedcl.results import (
    RoundRecord,
    build_summary,
    client_state_entry,
    stability_metrics,
    write_outputs,
    write_times,
)
from fedcl.rounds import (
    CLIENT_STARTUP_TIMEOUT_S,
    AssignedGrid,
    PhaseClock,
    Roster,
    assign_partitions,
    client_reports,
    connected_clients,
    discover_clients,
    sample_clients,
    send_and_receive,
    train_round,
)
from fedcl.run_clock import RunClock
from fedcl.run_events import EventPrinter, WarningEvents
from fedcl.run_setup import make_output, output_folder, setup_run
from fedcl.strategy import RoundInfo
from fedcl.stream import TaskStreamDriver
from fedcl.tracking import OUTBOX_FILE, Tracker
from fedcl.training import resolve_device
from fedcl.unlearning_run import Erasures, UnlearningFailed

log = logging.getLogger("fedcl")


class RunObserver(Protocol):
    """Receives a run's progress (the CLI's live display)."""

    def on_start(self, config: Config, total_rounds: int, run_id: str | None,
                 tracking_uri: str) -> None: ...

    def on_round(self, record: RoundRecord) -> None:
        """A round is complete: evaluated, its task end and the erasure requests due after it
        carried out, its checkpoint written (``record.seconds`` is the whole round)."""

    def on_startup(self, line: str) -> None:
        """What the run is doing before its first round (data and partitions, clients
        registering, client processes starting): one line at a time, every few seconds while
        clients register."""


@dataclass
class RunControl:
    """Shared between the ServerApp thread and whoever drives it (``fedcl simulate``)."""

    cancel: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)  # the ServerApp runs
    done: threading.Event = field(default_factory=threading.Event)
    observer: RunObserver | None = None
    summary: dict[str, Any] | None = None
    error: BaseException | None = None
    run_id: str | None = None
    tracking_uri: str | None = None
    resume: dict[str, Any] | None = None  # a checkpoint to continue from (fedcl.checkpoint)
    stop_reason: str | None = None  # why ``cancel`` was set (e.g. "interrupted by SIGTERM")
    #: the run's time (:mod:`fedcl.run_clock`): ``fedcl simulate`` starts it with its process;
    #: without one, the run starts it when the ServerApp starts
    clock: RunClock | None = None
    #: whether the driver ends the run itself once its engine has stopped (:meth:`close`):
    #: ``fedcl simulate`` does, so that the shutdown (Ray's included) is part of the run's
    #: time, in summary.json and in the MLflow run's duration alike
    close_later: bool = False
    closing: Callable[[], None] | None = None  # what :meth:`close` does, once there is a run
    # Called before every round; raises a FedclError to stop the run with its line (fedcl
    # simulate's check that no node left the Ray cluster it joined).
    health: Callable[[], None] | None = None
    # The server assigns partition ids to nodes (fedcl simulate, where every node is a
    # simulated client of this run) instead of asking each node for its node config's.
    assign_partitions: bool = False

    def check(self) -> None:
        """Raise :class:`~fedcl.errors.RunCancelled` once the driver asked the run to stop."""
        if self.cancel.is_set():
            raise RunCancelled(self.stop_reason or "run cancelled")

    def close(self) -> None:
        """End a finished run whose ending was left to the driver (``close_later``): the
        time figures taken now go into summary.json and the MLflow run, which is marked
        FINISHED with this end. Does nothing the second time, or before the run finished."""
        closing, self.closing = self.closing, None
        if closing is not None:
            closing()


# --------------------------------------------------------------------------------------------
# The live run
# --------------------------------------------------------------------------------------------
def _in_background(fn: Any, *args: Any) -> Future[Any]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcl")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


class LiveRun(TaskStreamDriver):
    """The run itself as a walk over the task stream: every round samples its clients from
    those connected and not erased, trains, is evaluated, tracked and checkpointed; erasure
    requests are carried out at their points (before a task, before a round, after a task's
    last round), and the run goes on with the model and strategy they leave. The walk's
    position lives in :attr:`state` (a :class:`~fedcl.checkpoint.RunState`), so a checkpoint
    taken after any round resumes exactly there."""

    def __init__(self, grid: Grid, config: Config, state: RunState, strategy: Any,
                 roster: Roster, evaluator: Evaluator, tracker: Tracker, erasures: Erasures,
                 schedule: list[Any], control: RunControl, ckpt: Path, run_clock: RunClock
                 ) -> None:
        self.state = state
        super().__init__(strategy, state.arrays)
        self.grid, self.config, self.roster = grid, config, roster
        self.evaluator, self.tracker, self.erasures = evaluator, tracker, erasures
        self.schedule, self.control, self.ckpt = schedule, control, ckpt
        self.run_clock = run_clock
        self.saved_requests_done = state.erasures_done  # what the checkpoint on disk holds
        self.config_json = config.to_json()
        self.rounds = config.rounds_per_task
        # a round's seconds run from the previous round's end; the first round's from the
        # rounds' start
        self.t0 = run_clock.rounds_began = time.monotonic()
        self.clock = PhaseClock(self.t0)

    @property  # type: ignore[override]
    def arrays(self) -> ArrayRecord:
        return self.state.arrays

    @arrays.setter
    def arrays(self, value: ArrayRecord) -> None:
        self.state.arrays = value

    def rounds_left(self, num_tasks: int) -> Iterator[RoundInfo]:
        """The rounds from the state's position to the end (read as the walk moves it)."""
        p = self.state
        while p.task < num_tasks:
            self.clock = PhaseClock(self.t0)
            yield RoundInfo(p.task, p.task_round, self.rounds, p.global_round + 1)

    def save_checkpoint(self) -> None:
        p = self.state
        self.tracker.persist()  # what a resume from this checkpoint must still send
        # storage only the requests the last checkpoint holds as done could use
        self.erasures.method.prune(self.saved_requests_done)
        startup, rounds = self.run_clock.so_far()
        checkpoint.save(self.ckpt, p, self.strategy, self.config, self.control.run_id,
                        startup + rounds, startup_s=startup,
                        extra={"unlearning": self.erasures.state_dict()})
        self.saved_requests_done = p.erasures_done

    def carry_out_erasures(self, point: tuple[int, int]) -> None:
        """Carry out the schedule's requests due at or before ``point``; the run goes on with
        the model and strategy each leaves."""
        p = self.state
        while (p.erasures_done < len(self.schedule)
               and self.schedule[p.erasures_done].point(self.rounds) <= point):
            try:
                self.strategy = self.erasures.apply(self.schedule[p.erasures_done], p,
                                                    self.strategy, self.roster,
                                                    self.control.cancel)
            except UnlearningFailed:
                self.save_checkpoint()  # the model before the request, for --resume
                raise
            p.erasures_done += 1
            on_erasure = getattr(self.control.observer, "on_erasure", None)
            if on_erasure is not None:
                on_erasure(p.erasures[-1])

    # --- the hooks ----------------------------------------------------------------------
    def before_task(self, task: int) -> None:
        # requests of the previous task's end still pending (a resume after a failed
        # unlearning) come before this task begins
        self.carry_out_erasures((task, 0))

    def task_begun(self, task: int) -> None:
        self.state.task_started = True

    def before_round(self, info: RoundInfo) -> None:
        self.carry_out_erasures((info.task, info.task_round))

    def run_round(self, info: RoundInfo) -> None:
        p, config, clock = self.state, self.config, self.clock
        if self.control.health is not None:
            self.control.health()
        p.global_round = info.round
        connected, lost, back = connected_clients(
            self.roster, self.grid, config, f"round {info.round} (task {info.task})",
            self.control.cancel)
        pool = [q for q in connected if q not in p.erased_clients]
        pids = sample_clients(pool, config.fraction_train, config.seed, info.round)
        outcome = train_round(self.grid, self.roster, self.strategy, config, self.config_json,
                              p.arrays, info, pids, self.control.cancel, clock,
                              erased=ErasedData.of(p))
        for m in outcome.ok:
            info_rec = m.content[protocol.CLIENT_INFO]
            for q in reply_members(m):  # a cohort's members report its leader's state
                p.client_state[q] = client_state_entry(info_rec)
        p.arrays, train_metrics = outcome.arrays, outcome.train_metrics
        self.counts = self.evaluator.counts(p.arrays, self.strategy)
        acc = accuracies(self.counts, self.evaluator.excluded)
        self.erasures.track_forgetting(p, self.schedule)  # each request's forget set
        clock("evaluate")
        p.curves.append(acc)
        p.round_task.append(info.task)
        self.acc = acc
        min_acc, wc_acc = stability_metrics(p.curves, p.round_task)
        loss = train_metrics.get(protocol.TRAIN_LOSS) if train_metrics else None
        record = RoundRecord(
            task=info.task, round=info.round, task_round=info.task_round, acc_per_task=acc,
            avg_acc=float(np.mean(acc[:info.task + 1])), min_acc=min_acc, wc_acc=wc_acc,
            train_loss=None if loss is None else float(loss),
            clients=len(outcome.clients), replies=len(outcome.ok), empty=len(outcome.empty),
            failures=outcome.failures, rejected=len(outcome.rejected),
            connected=len(connected), lost=lost, back=back, sampled=pids,
            seconds=time.monotonic() - self.t0, ended_at=time.time(), phases=clock.phases,
            tracking_wait_s=self.tracker.take_waited(), tracking_queued=self.tracker.pending,
            bytes_down=outcome.traffic.bytes_down, bytes_up=outcome.traffic.bytes_up,
            bytes_by_record={"down": outcome.traffic.down, "up": outcome.traffic.up},
            **client_reports(outcome.ok))
        p.records.append(record)
        self.tracker.log_round(record)
        clock("log")

    def after_task(self, task: int, last_round_arrays: ArrayRecord) -> None:
        p = self.state
        # the matrix row is the round's accuracy unless end_task changed the model
        if p.arrays is not last_round_arrays:
            self.counts = self.evaluator.counts(p.arrays, self.strategy)
            self.acc = accuracies(self.counts, self.evaluator.excluded)
        p.matrix.append(self.acc)
        p.matrix_counts.append(self.counts)
        state = self.strategy.state_metrics()
        if state:
            self.tracker.log_metrics(state, step=p.global_round)
            p.strategy_state.append({"task": task, **state})
        p.task, p.task_round, p.task_started = task + 1, 1, False
        self.carry_out_erasures((task, self.rounds + 1))
        self.clock("end_task")

    def after_round(self, info: RoundInfo) -> None:
        p = self.state
        if not info.last_of_task:
            p.task_round += 1
        record = p.records[-1]
        record.seconds = time.monotonic() - self.t0  # what the checkpoint holds
        self.save_checkpoint()
        self.clock("checkpoint")
        # the round's whole time, its task end and erasure requests due after it included:
        # the rounds' seconds add up to the run's time_rounds_s (fedcl.run_clock)
        record.seconds = self.clock.last - self.t0
        self.t0 = self.clock.last
        self.tracker.log_metrics({"round_seconds": record.seconds}, step=record.round)
        if self.control.observer:
            self.control.observer.on_round(record)


def run_continual(grid: Grid, config: Config, control: RunControl | None = None) -> dict[str, Any]:
    """Run the whole task stream on ``grid`` (or the rest of it, when ``control.resume`` holds
    a checkpoint); returns the summary (also written to disk)."""
    control = control or RunControl()
    clock = control.clock = control.clock or RunClock.since(0.0)
    # the same checks as the CLI's, under `flwr run` too: names, paths, then the data
    setup = setup_run(config, resume=control.resume is not None)
    run_name = config.run_name = setup.run_name
    out_dir = setup.output
    tracking_uri = resolve_tracking_uri(config)
    startup = getattr(control.observer, "on_startup", None)
    if startup is not None:
        startup(f"preparing {config.dataset} and {config.clients} clients' partitions")
    scenario = plugins.build_scenario(config)
    check_partitions(config)  # every task's, before anything starts (as `fedcl simulate`)
    device = resolve_device(config.device)
    evaluator = Evaluator(scenario, config, device)
    schedule = setup.schedule
    check_requests_hold_data(config, scenario, schedule, config.data_dir)  # before any run
    make_output(out_dir)
    tracker = Tracker(tracking_uri, config.experiment, run_name, outbox=out_dir / OUTBOX_FILE)
    control.tracking_uri = tracking_uri
    if control.assign_partitions:  # fedcl simulate: no node is asked who it is at start-up
        grid = AssignedGrid(grid)  # type: ignore[assignment]
    erasures = Erasures(grid, config, scenario, evaluator, tracker, out_dir)
    for line in erasures.method.check_requests(config, scenario, schedule):
        log.warning(line)  # a request the method cannot act on (SSD's selection bound)
    # the unlearning method may wrap the run's strategy (FedEraser records client updates)
    strategy = erasures.method.wrap(plugins.build_strategy(config))
    starting: Future[str] | None = None
    control.check()  # stopped before it began: no MLflow run to make
    if control.resume is not None:
        try:
            state = checkpoint.restore(control.resume, strategy)
            erasures.load_state_dict(control.resume.get("unlearning", {}))
        except FedclError:
            raise
        except Exception as err:  # a plugin's load_state_dict that cannot read its own state
            raise RunAborted(f"cannot resume from the checkpoint: {plugins.one_line(err)}"
                             f"{plugins.raised_at(err)}") from err
        control.run_id = tracker.resume(control.resume["mlflow_run_id"])
        clock.resume_from(state.startup_before_s, state.wall_time_before_s
                          - state.startup_before_s)
        # what was erased everywhere before the checkpoint stays out of the test split
        evaluator.excluded = ErasedData.of(state).classes_everywhere()
        stores_lost = plugins.build_trainer(config).keeps_client_store
        state.resumes.append({"after_round": state.global_round,
                              "client_stores_lost": stores_lost})
        if stores_lost:
            log.warning("resuming: the clients' stores (replay buffers) lived in the stopped "
                        "run's client processes and start empty; the rest of the run differs "
                        "from an uninterrupted one")
    else:
        arrays = ArrayRecord(plugins.build_model(config, scenario).state_dict())
        counts = evaluator.counts(arrays, strategy)
        state = RunState(arrays=arrays, baseline=accuracies(counts), baseline_counts=counts)
        # the MLflow run is created while the clients start up (each takes seconds)
        starting = _in_background(tracker.start, config.to_dict(), clock.start_unix())
    try:
        startup_s = max(config.round_timeout_s, CLIENT_STARTUP_TIMEOUT_S)
        if isinstance(grid, AssignedGrid):
            nodes = assign_partitions(grid, config.clients, startup_s, control.cancel, startup)
        else:
            # too few nodes connected: the run stops after round_timeout_s; those connected
            # get longer to answer, since their first answer starts their ClientApp processes
            nodes = discover_clients(grid, config.clients, config.round_timeout_s,
                                     control.cancel, startup_timeout=startup_s,
                                     progress=startup)
        roster = Roster(nodes, config.clients)
        if starting is not None:
            control.run_id = starting.result()
        num_tasks = len(scenario.tasks)
        if control.observer:
            control.observer.on_start(config, num_tasks * config.rounds_per_task,
                                      control.run_id, tracking_uri)
        run = LiveRun(grid, config, state, strategy, roster, evaluator, tracker, erasures,
                      schedule, control, out_dir / checkpoint.FILE, clock)
        run.walk(run.rounds_left(num_tasks),
                 open_task=state.task if state.task_started else None)
        clock.rounds_ended = run.t0  # the last round's end
        control.check()  # stopped after its last round: FAILED, resumable, not half written
        erasures.method.prune(len(schedule))  # every request is done: nothing is needed
        p = state
        view = erasure_view(p.matrix, p.matrix_counts, p.baseline, p.baseline_counts,
                            evaluator.excluded)
        summary = build_summary(
            strategy=config.strategy, config=config.to_dict(), matrix=view.pop("matrix"),
            baseline=view.pop("baseline"), rounds=p.records, times=clock.figures(),
            mlflow_run_id=control.run_id, tracking_uri=tracking_uri)
        summary["erasure_view"] = view
        summary["communication"] = communication_summary(summary["rounds"],
                                                         run.strategy.payload_keys)
        summary["strategy_state"] = p.strategy_state
        summary["erasures"] = p.erasures
        summary["client_state"] = {str(k): v for k, v in sorted(p.client_state.items())}
        summary["resumes"] = p.resumes
        if storage := erasures.method.storage():
            summary["unlearning_storage"] = storage
        files = write_outputs(summary, out_dir, config.to_toml())
        files += run.strategy.save_state(out_dir)
        summary["output_dir"] = str(out_dir)
        summary["mlflow_experiment_id"] = tracker.experiment_id  # for the UI's address

        def close() -> None:
            summary.update(clock.figures(final=True))
            write_times(out_dir, summary)
            try:
                unsent = tracker.finish(summary, files, wait_s=config.tracking_wait_s,
                                        end_unix=clock.end_unix())
            except FedclError as err:  # MLflow refused the last requests
                if control.close_later:  # (otherwise the handler below marks the run)
                    tracker.fail(str(err))
                raise
            if unsent:
                summary["mlflow_outbox"] = str(out_dir / OUTBOX_FILE)

        if control.close_later:
            control.closing = close
        else:
            close()
        return summary
    except BaseException as err:
        if starting is not None and starting.exception() is None:
            control.run_id = starting.result()  # the run to mark
        failure: BaseException = err
        if isinstance(err, Exception) and not isinstance(err, FedclError):
            # a bug, most often in a plugin's hook: one line for the user, naming where it was
            # raised, and the whole traceback in the run's log
            log.error("the run failed", exc_info=err)
            logged = out_dir / "flower.log"
            where = logged if logged.is_file() else "the ServerApp's log"
            failure = RunAborted(f"the run failed: {plugins.one_line(err)}"
                                 f"{plugins.raised_at(err)}; traceback in {where}")
        reason = (control.stop_reason if isinstance(err, RunCancelled) and control.stop_reason
                  else str(failure) if isinstance(failure, FedclError)
                  else f"{type(err).__name__}: {err}")
        tracker.fail(reason, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        if failure is not err:
            raise failure from err
        raise


def run_config_job(run_config: Mapping[str, Any]) -> tuple[Config, dict[str, Any] | None]:
    """The config and the checkpoint (None for a new run) a deployment run starts with, from
    Flower's run config: with :data:`~fedcl.config.RESUME_KEY` set to a stopped run's output
    folder (as the ServerApp's host sees it), that run's checkpoint and its own config (the
    other keys are not read: a run goes on as it began); else a new run of the config the
    keys give. Raises a one-line :class:`~fedcl.errors.ConfigError` for a folder without a
    readable checkpoint."""
    folder = str(run_config.get(RESUME_KEY, "") or "")
    if not folder:
        return Config.from_run_config(run_config), None
    payload = checkpoint.load(folder)
    return checkpoint.config_of(payload), payload


def resume_hint(config: Config | None) -> str:
    """For a failed deployment run whose output folder holds a checkpoint: how to continue it
    (empty when there is none to continue from)."""
    if config is None or not (config.output or config.run_name):
        return ""
    folder = output_folder(config, config.run_name or "")
    if not (folder / checkpoint.FILE).is_file():
        return ""
    return (f"; `fedcl submit --resume {folder}` (run config resume='{folder}') continues it "
            "from its last saved round")


def build_server_app(config: Config | None = None, control: RunControl | None = None
                     ) -> ServerApp:
    """A ServerApp running :func:`run_continual` with ``config`` (or, when None, the config
    Flower passes in ``context.run_config``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if control is not None:  # `fedcl simulate`: its driver reports the run
            control.started.set()
            try:
                cfg = config if config is not None else Config.from_run_config(
                    context.run_config)
                control.summary = run_continual(grid, cfg, control)
            except BaseException as err:
                control.error = err
            finally:
                control.done.set()
            return
        # under `flwr run`: the run's log carries its progress and outcome to whoever follows
        # it (fedcl.run_events, `fedcl submit`), and Flower marks a failed run failed
        clock = RunClock.since(0.0)  # the run's time starts with the ServerApp here
        events = EventPrinter(clock=clock)
        warnings = WarningEvents(events)
        log.addHandler(warnings)
        cfg: Config | None = config
        try:
            resume = None
            if cfg is None:
                cfg, resume = run_config_job(context.run_config)
            summary = run_continual(grid, cfg, RunControl(observer=events, clock=clock,
                                                          resume=resume))
            events.on_end(summary)
        except BaseException as err:
            message = (str(err) if isinstance(err, FedclError)
                       else f"{type(err).__name__}: {err}")
            events.on_failed(message + resume_hint(cfg))
            raise
        finally:
            log.removeHandler(warnings)

    return app


#: The ServerApp that ``flwr run`` loads (``[tool.flwr.app.components]``).
app = build_server_app()

__all__ = ["LiveRun", "RunControl", "RunObserver", "app", "build_server_app", "run_continual",
           "sample_clients", "send_and_receive"]
