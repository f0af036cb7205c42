"""Wire keys of the messages between fedcl's ServerApp and ClientApp, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Message

# Records in a message's RecordDict (Flower's FedAvg defaults for the first two).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Keys inside the ConfigRecord sent to clients.
RUN_CONFIG_JSON = "fedcl.config"  # the whole run Config as JSON
TASK = "fedcl.task"  # 0-based index of the task being trained
ROUND = "fedcl.round"  # 1-based round counter over the whole run
TASK_ROUND = "fedcl.task-round"  # 1-based round within the task
LAST_ROUND_OF_TASK = "fedcl.last-round-of-task"  # True in a task's last round
SERVER_ROUND = "server-round"  # Flower's own key (set by FedAvg.configure_train)
REPLAY = "fedcl.replay"  # True in the retrain oracle's rounds: clients leave Context.state alone
COHORT = "fedcl.cohort"  # partition ids a cohort leader trains together (cohort_size > 1)
ERASED_CLASSES = "fedcl.erased-classes"  # classes a client must not train on ("client:class;...")
NO_TRAIN = "fedcl.no-train"  # True: reply with the global model untrained (task-end payloads only)
MODEL_REPLY = "fedcl.model-reply"  # False: reply with an empty model record (the strategy's
# update travels in its own records: Capabilities.model_replies); absent means True
COHORT_MEAN_KEY = "fedcl.cohort-mean-key"  # a cohort may reply with its members' mean, weighted
# by this metric (one reply instead of one per member; see fedcl/cohort_wire.py)
WALK = "fedcl.walk"  # in a replayed round: the walk it belongs to (its trainers' stores are the
# walk's own, empty when the walk begins; see fedcl.training.ClientStore)

# Keys of a query asking every client to purge its store after an erasure (a QUERY message).
PURGE = "fedcl.purge"  # True: remove the erased samples from the client's buffers
ERASED_CLIENTS = "fedcl.erased-clients"  # clients erased so far: their stores are emptied

# Keys of a client operation of an unlearning method (a QUERY message; see
# strategies/unlearning/client_ops.py).
OP = "fedcl.op"  # the operation's name
OP_REQUEST = "fedcl.op.request"  # the erasure request, in its text form
OP_TASKS = "fedcl.op.tasks"  # the tasks whose data the operation reads

# Keys inside reply MetricRecords (averaged by FedAvg, weighted by num-examples).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
UNIT_WEIGHT = "unit-weight"  # always 1: weight by it for uniform (not sample-count) averaging

# A ConfigRecord in every reply saying which client answered (never averaged).
CLIENT_INFO = "fedcl.client-info"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
STATE_KEYS = "state-keys"  # the records the client keeps in Context.state (comma-joined)
STATE_BYTES = "state-bytes"  # and the bytes their values take
GPU_PEAK_BYTES = "gpu-peak-bytes"  # CUDA memory the round's training peaked at (GPU clients)
GPU_RESERVED_BYTES = "gpu-reserved-bytes"  # and what the process's allocator holds afterwards
HANDLER_SECONDS = "handler-seconds"  # how long the ClientApp's train handler ran
GPU_ID = "gpu"  # the physical index of the GPU it trained on (its CUDA_VISIBLE_DEVICES entry)
WORKER_NODE = "worker-node"  # where it ran: the Ray node's id in a simulation, else the host
BUFFER_SAMPLES = "buffer-samples"  # raw samples the client's trainer keeps (ClientStore buffers)
BUFFER_BYTES = "buffer-bytes"  # and the bytes they take
BUFFER_CLASSES = "buffer-classes"  # the dataset classes they belong to (sorted)
PURGED_SAMPLES = "purged-samples"  # in a purge reply: the samples the purge removed

# A ConfigRecord in a cohort's reduced reply (one reply standing for several members).
COHORT_MEMBERS = "fedcl.cohort-members"
MEMBER_IDS = "partition-ids"  # the members averaged into the reply's arrays
MEMBERS_REJECTED = "rejected"  # "client N: reason" for members left out by screening
MEMBERS_EMPTY = "empty"  # members with no sample left to train on (not a fault)

# Node config keys (Flower's simulation engine sets the first two; deployments set all three).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_DIR = "data-dir"

# Query message asking a client who it is (sent once at start-up).
QUERY_IDENTITY = "fedcl.identity"
# In every message's CONFIG record under ``fedcl simulate``: the partition id the server
# assigned to the destination node, which stands for the node config's (fedcl.rounds.AssignedGrid).
ASSIGNED_PARTITION_ID = "assigned-partition-id"

# The client's own slice of Context.state.
CLIENT_STATE = "fedcl.client"
# What its trainer keeps there (fedcl.training.ClientStore): the live run's, and a replayed
# walk's (with that walk's id and counters in REPLAY_STATE).
STORE = "fedcl.store"
REPLAY_STORE = "fedcl.replay-store"
REPLAY_STATE = "fedcl.replay-client"


def reply_partition_id(reply: Message) -> int:
    """The partition id of the client that sent ``reply`` (its :data:`CLIENT_INFO` record):
    the one place the server reads a reply's identity. Raises KeyError when it is missing
    (the reply screening refuses such replies first)."""
    return int(reply.content[CLIENT_INFO][PARTITION_ID])  # type: ignore[index]


def is_empty_reply(reply: Message) -> bool:
    """Whether ``reply`` comes from a client with no sample of the task left to train on
    (every one erased): its ``num-examples`` is exactly 0. Such a client is not a fault; it
    has nothing to contribute this round."""
    metrics = reply.content.get(METRICS)
    try:
        return metrics is not None and float(metrics[NUM_EXAMPLES]) == 0  # type: ignore[index,arg-type]
    except (KeyError, TypeError, ValueError):
        return False
