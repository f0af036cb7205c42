"""fedcl's ClientApp: local training on the client's share of the current task.

A client is identified by ``partition-id`` / ``num-partitions`` in its node config (set by
Flower's simulation engine, or by ``--node-config`` on a SuperNode, which may also give
``data-dir``). Each training message carries the run config, the task and the round; the
client loads its partition of that task (cached per process), trains with the strategy's
:class:`~fedcl.training.LocalTrainer`, and replies with its weights and metrics.

Per-client continual state lives in ``context.state[protocol.CLIENT_STATE]`` (a ConfigRecord):
the task the client trained last and how many rounds it trained, so a trainer's ``begin_task``
runs exactly once per task per client. A trainer that keeps a
:class:`~fedcl.training.ClientStore` (``keeps_client_store``) finds it in
``context.state[protocol.STORE]``; a replayed walk (the retrain oracle, FedEraser's calibration)
keeps its own counters and store apart (``REPLAY_STATE``, ``REPLAY_STORE``), begun afresh with
every walk. Every train message names the classes erased so far: they leave the client's data
and its buffers before it trains; a purge query (:func:`purge`, sent after every erasure)
removes them from every client's buffers at once, and empties an erased client's store.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl import plugins, protocol
from fedcl.client_ops import ClientData, TaskData, find_operation
from fedcl.cohort_training import TrainedCohort, train_stacked, trainer_regularizers
from fedcl.cohort_wire import member_key
from fedcl.config import Config
from fedcl.data.partition import client_positions
from fedcl.erasure import ErasedData, held_positions, parse_erasure, request_split
from fedcl.training import ClientStore, RoundContext, TrainResult, resolve_device
from fedcl.validation import stacked_problems

app = ClientApp()


def adopt_assigned_partition(msg: Message, context: Context) -> None:
    """Under ``fedcl simulate`` the server assigns every node its partition id and sends it in
    each message (:class:`fedcl.rounds.AssignedGrid`); it stands for the node config's for
    this call. Messages without one (a deployment's) leave the node config as it is."""
    cfg = msg.content.get(protocol.CONFIG)
    if isinstance(cfg, ConfigRecord) and protocol.ASSIGNED_PARTITION_ID in cfg:
        context.node_config[protocol.NODE_PARTITION_ID] = int(
            cfg[protocol.ASSIGNED_PARTITION_ID])  # type: ignore[arg-type]


def client_identity(context: Context) -> tuple[int, int]:
    try:
        return (int(context.node_config[protocol.NODE_PARTITION_ID]),
                int(context.node_config[protocol.NODE_NUM_PARTITIONS]))
    except KeyError as err:
        raise ValueError(f"node config lacks {err}; start the SuperNode with --node-config "
                         "'partition-id=N num-partitions=M'") from None


def state_footprint(context: Context) -> tuple[list[str], int]:
    """The record names in ``context.state`` and the bytes their values take, so the server
    can show that no client keeps data samples between rounds."""
    total = 0
    for record in context.state.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        else:
            total += sum(len(str(v)) for v in record.values())
    return sorted(context.state.keys()), total


# --------------------------------------------------------------------------------------------
# The trainer's store in Context.state
# --------------------------------------------------------------------------------------------
def encode_store(store: ClientStore) -> ArrayRecord:
    """A :class:`~fedcl.training.ClientStore` as one ArrayRecord: ``a:<name>`` for its arrays,
    ``b:<buffer>:<column>`` for its buffers' columns (``b:<buffer>:`` for their classes).
    Raises ValueError for a buffer whose columns disagree or whose name holds ':'."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in store.arrays.items():
        tensors[f"a:{name}"] = value.detach().cpu()
    for name, buf in store.buffers.items():
        if ":" in name:
            raise ValueError(f"a ClientStore buffer name cannot hold ':', got {name!r}")
        buf.check()
        tensors[f"b:{name}:"] = buf.classes
        for column, value in buf.columns.items():
            tensors[f"b:{name}:{column}"] = value.detach().cpu()
    return ArrayRecord({k: v.contiguous() for k, v in tensors.items()})


def decode_store(record: ArrayRecord | None) -> ClientStore:
    """The :class:`~fedcl.training.ClientStore` that :func:`encode_store` wrote (an empty one
    for None)."""
    store = ClientStore()
    if record is None:
        return store
    for key, value in record.to_torch_state_dict().items():
        kind, _, rest = key.partition(":")
        if kind == "a":
            store.arrays[rest] = value
            continue
        name, _, column = rest.partition(":")
        buf = store.buffer(name)
        if column:
            buf.columns[column] = value
        else:
            buf.classes = value
    return store


def _stored(context: Context, key: str) -> ArrayRecord | None:
    record = context.state.get(key)
    return record if isinstance(record, ArrayRecord) else None


def buffer_report(store: ClientStore) -> dict[str, int | list[int]]:
    """What a client's buffers hold, as its info record reports it."""
    return {protocol.BUFFER_SAMPLES: store.buffered_samples,
            protocol.BUFFER_BYTES: store.buffered_bytes,
            protocol.BUFFER_CLASSES: store.buffered_classes()}


@functools.cache
def worker_node() -> str:
    """Where this client runs: the id of its Ray node when it runs in a Ray worker (the
    simulation engine, a cluster fedcl joined), else the host's name (a SuperNode)."""
    ray = sys.modules.get("ray")  # imported by every Ray worker; never imported here for this
    if ray is not None:
        with contextlib.suppress(Exception):
            if ray.is_initialized():
                return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()


def physical_gpu(device: torch.device) -> str:
    """The physical index of CUDA ``device``: its position in ``CUDA_VISIBLE_DEVICES`` (which
    Ray sets for each actor to the GPUs it was given) where that names GPUs, else the index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def _info(context: Context, device: torch.device | None = None,
          partition_id: int | None = None, started: float | None = None,
          store: ClientStore | None = None) -> ConfigRecord:
    """The client's info record: who it is, what it keeps in Context.state, what its live
    store's buffers hold (``store``, else the one in Context.state, where there is one)."""
    pid, num = client_identity(context)
    pid = pid if partition_id is None else partition_id
    keys, size = state_footprint(context)
    info = ConfigRecord({protocol.PARTITION_ID: pid, protocol.NUM_PARTITIONS: num,
                         protocol.STATE_KEYS: ",".join(keys), protocol.STATE_BYTES: size})
    if store is None and protocol.STORE in context.state:
        store = decode_store(_stored(context, protocol.STORE))
    if store is not None:
        info.update(buffer_report(store))  # type: ignore[arg-type]
    if started is not None:
        info[protocol.HANDLER_SECONDS] = time.perf_counter() - started
        info[protocol.WORKER_NODE] = worker_node()
    if device is not None and device.type == "cuda":
        info[protocol.GPU_PEAK_BYTES] = int(torch.cuda.max_memory_allocated(device))
        info[protocol.GPU_RESERVED_BYTES] = int(torch.cuda.memory_reserved(device))
        info[protocol.GPU_ID] = physical_gpu(device)
    return info


def injected_fault(config: Config, round_: int, partition_id: int) -> bool:
    """Whether fault injection makes this client fail in this round (seeded, reproducible)."""
    if config.client_fault_rate <= 0:
        return False
    draw = np.random.default_rng([config.seed, round_, partition_id, 13]).random()
    return bool(draw < config.client_fault_rate)


def training_positions(config: Config, scenario: object, pid: int, task: int, data_dir: str,
                       cfg_record: ConfigRecord) -> np.ndarray:
    """The client's samples of ``task``, less the classes erased for it."""
    erased = str(cfg_record.get(protocol.ERASED_CLASSES, ""))
    if not erased:
        return client_positions(config, pid, task, data_dir)
    return held_positions(config, scenario, pid, task, data_dir, ErasedData.decode(erased))


def reply_metrics(result: TrainResult) -> MetricRecord:
    """A train reply's metrics: sample count (FedAvg's weight), loss, unit weight (0 for a
    client left without samples by erasures), extras."""
    return MetricRecord({protocol.NUM_EXAMPLES: result.num_examples,
                         protocol.TRAIN_LOSS: result.loss,
                         protocol.UNIT_WEIGHT: 1 if result.num_examples else 0,
                         **result.extra_metrics})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say who this client is (the server's roster call at start-up), or run an unlearning
    method's operation on this client's data (:mod:`fedcl.client_ops`)."""
    adopt_assigned_partition(msg, context)
    cfg_record = msg.content.get(protocol.CONFIG)
    if cfg_record is not None and protocol.OP in cfg_record:
        return run_operation(msg, context)
    if cfg_record is not None and bool(cfg_record.get(protocol.PURGE, False)):
        return purge(msg, context)
    return Message(RecordDict({protocol.CLIENT_INFO: _info(context)}), reply_to=msg)


def erased_of(cfg_record: ConfigRecord) -> ErasedData:
    """What a message says is erased so far: its classes, and its clients where it names
    them (a purge query)."""
    classes = ErasedData.decode(str(cfg_record.get(protocol.ERASED_CLASSES, "")))
    clients = tuple(int(c) for c in cfg_record.get(protocol.ERASED_CLIENTS, []))  # type: ignore[union-attr]
    return ErasedData(clients, classes.classes)


def purge(msg: Message, context: Context) -> Message:
    """Remove what is erased from this client's store (after an erasure, before the next
    round): the samples of its erased classes from every buffer, or, for an erased client,
    the whole store; a replayed walk's store goes too. Replies with its info record and how
    many samples were removed."""
    pid, _ = client_identity(context)
    erased = erased_of(msg.content[protocol.CONFIG])  # type: ignore[arg-type]
    removed = 0
    if protocol.STORE in context.state:
        store = decode_store(_stored(context, protocol.STORE))
        if pid in erased.clients:
            removed = store.clear()
            del context.state[protocol.STORE]
        else:
            removed = store.purge(erased.classes_of(pid))
            if removed:
                context.state[protocol.STORE] = encode_store(store)
    for key in (protocol.REPLAY_STORE, protocol.REPLAY_STATE):
        if key in context.state:
            del context.state[key]
    info = _info(context)
    info[protocol.PURGED_SAMPLES] = removed
    return Message(RecordDict({protocol.CLIENT_INFO: info}), reply_to=msg)


def run_operation(msg: Message, context: Context) -> Message:
    """Run the unlearning operation the message names (``protocol.OP``) on this client's
    forget and retain samples of the request, and reply with the records it computes (never
    the samples). The run's unlearning method is looked up first, which registers its
    operations."""
    started = time.perf_counter()
    cfg = msg.content[protocol.CONFIG]
    config = Config.from_json(str(cfg[protocol.RUN_CONFIG_JSON]))
    plugins.get_unlearning(config.unlearning)  # imports the method: its operations register
    operation = find_operation(str(cfg[protocol.OP]))
    pid, _ = client_identity(context)
    data_dir = str(context.node_config.get(protocol.NODE_DATA_DIR, config.data_dir))
    scenario = plugins.build_scenario(config, data_dir)
    request = parse_erasure(str(cfg[protocol.OP_REQUEST]))
    before = ErasedData.decode(str(cfg.get(protocol.ERASED_CLASSES, "")))
    tasks = []
    for task in (int(t) for t in cfg[protocol.OP_TASKS] if int(t) >= 0):
        forget, retain = request_split(config, scenario, request, pid, task, data_dir, before)
        tasks.append(TaskData(task, scenario.head_for(task), scenario.train_data(task, forget),
                              scenario.train_data(task, retain)))
    device = resolve_device(config.device)
    model = plugins.build_model(config, scenario)
    model.load_state_dict(msg.content[protocol.ARRAYS].to_torch_state_dict())
    data = ClientData(config, model.to(device), tasks, device, scenario.dataset.mean,
                      scenario.dataset.std, cfg, pid, msg.content)
    records = operation(data)
    content = RecordDict({**records, protocol.CLIENT_INFO: _info(context, device,
                                                                started=started)})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    adopt_assigned_partition(msg, context)
    cfg_record = msg.content[protocol.CONFIG]
    config = Config.from_json(str(cfg_record[protocol.RUN_CONFIG_JSON]))
    task = int(cfg_record[protocol.TASK])
    round_ = int(cfg_record[protocol.ROUND])
    pid, _ = client_identity(context)
    if injected_fault(config, round_, pid):
        if config.client_fault_mode == "vanish":
            os._exit(17)  # the client's process dies without a word
        if config.client_fault_mode == "hang":
            time.sleep(config.round_timeout_s + 2)
        raise RuntimeError(f"injected fault (client_fault_rate={config.client_fault_rate}) "
                           f"in client {pid}, round {round_}")
    data_dir = str(context.node_config.get(protocol.NODE_DATA_DIR, config.data_dir))
    if protocol.COHORT in cfg_record:
        return train_cohort(msg, context, config, data_dir,
                            [int(q) for q in cfg_record[protocol.COHORT]], started)

    scenario = plugins.build_scenario(config, data_dir)
    x, y = scenario.train_data(task, training_positions(config, scenario, pid, task, data_dir,
                                                        cfg_record))
    model = plugins.build_model(config, scenario)
    model.load_state_dict(msg.content[protocol.ARRAYS].to_torch_state_dict())

    trainer = plugins.build_trainer(config)
    state, store = round_state(context, cfg_record, trainer.keeps_client_store)
    if trainer.keeps_client_store:  # erased samples leave the buffers before anything trains
        store.purge(erased_of(cfg_record).classes_of(pid))
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ctx = RoundContext(config=config, model=model, x=x, y=y, head=scenario.head_for(task),
                       task=task, round=round_, partition_id=pid,
                       device=device, mean=scenario.dataset.mean,
                       std=scenario.dataset.std,
                       last_of_task=bool(cfg_record.get(protocol.LAST_ROUND_OF_TASK, False)),
                       message=msg.content, scenario=scenario, store=store)
    if int(state["task"]) != task:
        trainer.begin_task(ctx)
        state["task"] = task
    if bool(cfg_record.get(protocol.NO_TRAIN, False)) or len(y) == 0:
        # task-end payloads only, or every sample of this client's task erased
        trained = TrainResult(num_examples=len(y), loss=0.0, steps=0)
    else:
        trained = trainer.train(ctx)
    result = trainer.after_training(ctx, trained) if len(y) else trained
    state["rounds"] = int(state["rounds"]) + 1
    live = keep_round_state(context, cfg_record, state, store, trainer.keeps_client_store)

    # the trained model, unless the strategy's own records carry its update
    sends_model = bool(cfg_record.get(protocol.MODEL_REPLY, True))
    content = RecordDict({protocol.ARRAYS: (ArrayRecord(model.to("cpu").state_dict())
                                            if sends_model else ArrayRecord()),
                          protocol.METRICS: reply_metrics(result),
                          protocol.CLIENT_INFO: _info(context, device, started=started,
                                                      store=live),
                          **result.records})
    return Message(content, reply_to=msg)


def round_state(context: Context, cfg_record: ConfigRecord, keeps_store: bool
                ) -> tuple[ConfigRecord, ClientStore]:
    """The client's counters (a copy) and its trainer's store for this round: the live run's,
    or, in a replayed round of a walk (``protocol.WALK``) and for a trainer that keeps a
    store, that walk's own (fresh when the walk is new to this client). A replayed round
    outside a walk sees the live counters and an empty store."""
    fresh = {"task": -1, "rounds": 0}
    if not bool(cfg_record.get(protocol.REPLAY, False)):
        state = context.state.get(protocol.CLIENT_STATE)
        state = ConfigRecord(dict(state) if isinstance(state, ConfigRecord) else fresh)
        store = decode_store(_stored(context, protocol.STORE)) if keeps_store else ClientStore()
        return state, store
    walk = str(cfg_record.get(protocol.WALK, ""))
    if keeps_store and walk:
        replay = context.state.get(protocol.REPLAY_STATE)
        if isinstance(replay, ConfigRecord) and str(replay.get("walk", "")) == walk:
            return (ConfigRecord(dict(replay)),
                    decode_store(_stored(context, protocol.REPLAY_STORE)))
        return ConfigRecord({**fresh, "walk": walk}), ClientStore()
    state = context.state.get(protocol.CLIENT_STATE)
    state = ConfigRecord(dict(state) if isinstance(state, ConfigRecord) else fresh)
    return state, ClientStore()  # a copy: replays leave the live state alone


def keep_round_state(context: Context, cfg_record: ConfigRecord, state: ConfigRecord,
                     store: ClientStore, keeps_store: bool) -> ClientStore | None:
    """Save the round's counters and store where :func:`round_state` found them (a replayed
    round outside a walk keeps nothing); returns the live store when it is the one saved."""
    if not bool(cfg_record.get(protocol.REPLAY, False)):
        context.state[protocol.CLIENT_STATE] = state
        if keeps_store:
            context.state[protocol.STORE] = encode_store(store)
            return store
        return None
    if keeps_store and cfg_record.get(protocol.WALK, ""):
        context.state[protocol.REPLAY_STATE] = state
        context.state[protocol.REPLAY_STORE] = encode_store(store)
    return None


# A cohort leader's members' images and targets for the task it trains now, on the training
# device: a task's data is the same every round, and copying and shifting it costs a cohort
# more than its training (8 ms per member and round on a 2-core CPU). Only the current task's
# (and erasures') entries are kept.
_MEMBER_DATA: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def member_data(config: Config, scenario: object, pid: int, task: int, data_dir: str,
                cfg_record: ConfigRecord, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``pid``'s training images and targets of ``task`` on ``device``, cached for the
    task (:data:`_MEMBER_DATA`)."""
    # the run's config fixes the scenario and the partition (a long-lived process may serve
    # several runs)
    generation = (config.to_json(), data_dir, task,
                  str(cfg_record.get(protocol.ERASED_CLASSES, "")), str(device))
    if any(key[:-1] != generation for key in _MEMBER_DATA):
        _MEMBER_DATA.clear()
    key = (*generation, pid)
    if key not in _MEMBER_DATA:
        x, y = scenario.train_data(  # type: ignore[attr-defined]
            task, training_positions(config, scenario, pid, task, data_dir, cfg_record))
        _MEMBER_DATA[key] = (x.to(device), y.to(device))
    return _MEMBER_DATA[key]


def train_cohort(msg: Message, context: Context, config: Config, data_dir: str,
                 members: list[int], started: float) -> Message:
    """Train a cohort of clients as one batched computation (:mod:`fedcl.cohort_training`).
    The reply holds each member's records under ``<record>.<partition id>``; or, when the
    server asks for it (``cohort-mean-key`` in the config) and no member has records of its own
    to send, the members' weighted mean weights (:func:`reduced_reply`)."""
    cfg_record = msg.content[protocol.CONFIG]
    task = int(cfg_record[protocol.TASK])
    round_ = int(cfg_record[protocol.ROUND])
    scenario = plugins.build_scenario(config, data_dir)
    device = resolve_device(config.device)
    data = [(pid, *member_data(config, scenario, pid, task, data_dir, cfg_record, device))
            for pid in members]
    model = plugins.build_model(config, scenario)
    start = msg.content[protocol.ARRAYS].to_torch_state_dict()
    model.load_state_dict(start)
    trainer = plugins.build_trainer(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    head = scenario.head_for(task)
    last_of_task = bool(cfg_record.get(protocol.LAST_ROUND_OF_TASK, False))
    contexts = [RoundContext(config=config, model=model, x=x, y=y, head=head, task=task,
                             round=round_, partition_id=pid, device=device,
                             mean=scenario.dataset.mean, std=scenario.dataset.std,
                             last_of_task=last_of_task, message=msg.content,
                             scenario=scenario)
                for pid, x, y in data]
    trained = train_stacked(
        model, data, config=config, task=task, round_=round_, head=head, device=device,
        mean=scenario.dataset.mean, std=scenario.dataset.std,
        regularizer=trainer_regularizers(trainer, contexts))
    mean_key = str(cfg_record.get(protocol.COHORT_MEAN_KEY, ""))
    own_records = trainer.adds_reply_records
    if mean_key and not own_records:
        reply = reduced_reply(msg, context, config, trained, start, mean_key, device, started)
        if reply is not None:
            return reply
    replies = []
    for ctx, res in zip(contexts, trained.members(), strict=True):
        result = TrainResult(num_examples=res.num_examples, loss=res.loss, steps=res.steps)
        if own_records:
            model.load_state_dict(res.state)
            result = trainer.after_training(ctx, result)
        records = {protocol.ARRAYS: ArrayRecord(res.state),
                   protocol.METRICS: reply_metrics(result), **result.records}
        replies.append((ctx.partition_id, records))
    content = RecordDict()
    for pid, records in replies:  # every member reports the whole handler's time
        records[protocol.CLIENT_INFO] = _info(context, device, pid, started)
        for key, record in records.items():
            content[member_key(key, pid)] = record
    return Message(content, reply_to=msg)


def reduced_reply(msg: Message, context: Context, config: Config,
                  trained: TrainedCohort, start: dict[str, torch.Tensor], mean_key: str,
                  device: torch.device, started: float) -> Message | None:
    """One reply for the whole cohort: the weighted mean (by ``mean_key``, the strategy's
    weighting metric) of the members that pass the server's reply screening
    (:func:`fedcl.validation.stacked_problems`), with metrics that FedAvg's weighted averages
    turn into exactly what the members' own replies would give: ``mean_key`` summed, every
    other metric averaged with those weights. The members it stands for, why any were left
    out, and those with no sample left (erased), are in its ``cohort-members`` record. None
    (a reply per member) when no member is left, or the weighting metric is not one the
    members report."""
    metrics = [reply_metrics(TrainResult(num_examples=n, loss=loss, steps=steps))
               for n, loss, steps in zip(trained.num_examples, trained.losses, trained.steps,
                                         strict=True)]
    if any(mean_key not in m for m in metrics):
        return None
    reference = {name: start[name].to(device) for name in trained.stacked}
    problems = stacked_problems(
        trained.stacked, reference, trained.num_examples,
        {key: [float(m[key]) for m in metrics] for key in metrics[0]},  # type: ignore[arg-type]
        config.max_update_norm_ratio)
    # a member left without samples by erasures is not a fault: named apart, not averaged
    empty = [i for i, n in enumerate(trained.num_examples) if n == 0]
    kept = [i for i, problem in enumerate(problems)
            if problem is None and float(metrics[i][mean_key]) > 0]  # type: ignore[arg-type]
    if not kept:
        return None
    weights = [float(metrics[i][mean_key]) if i in kept else 0.0  # type: ignore[arg-type]
               for i in range(len(metrics))]
    total = sum(weights)
    reduced = MetricRecord({key: sum(w * float(m[key])  # type: ignore[arg-type]
                                     for w, m in zip(weights, metrics, strict=True)) / total
                            for key in metrics[0]})
    for key in (mean_key, protocol.NUM_EXAMPLES, protocol.UNIT_WEIGHT):
        reduced[key] = sum(metrics[i][key] for i in kept)  # type: ignore[misc]
    members = ConfigRecord({protocol.MEMBER_IDS: [trained.partition_ids[i] for i in kept]})
    rejected = [f"client {trained.partition_ids[i]}: {problem}"
                for i, problem in enumerate(problems) if problem is not None and i not in empty]
    if rejected:
        members[protocol.MEMBERS_REJECTED] = rejected
    if empty:
        members[protocol.MEMBERS_EMPTY] = [trained.partition_ids[i] for i in empty]
    content = RecordDict({protocol.ARRAYS: ArrayRecord(trained.mean_state(weights)),
                          protocol.METRICS: reduced,
                          protocol.CLIENT_INFO: _info(context, device, trained.partition_ids[0],
                                                      started),
                          protocol.COHORT_MEMBERS: members})
    return Message(content, reply_to=msg)
