"""FedWeIT: Federated Weighted Inter-client Transfer (Yoon, Jeong, Lee, Yang and Hwang,
"Federated Continual Learning with Weighted Inter-client Transfer", ICML 2021; the authors'
TensorFlow code ``wyjeong/FedWeIT``), task-IL only.

**The decomposition.** Every Linear and Conv2d layer of the run's model outside its heads (the
MLP's two hidden layers; the CNN's convolutions and hidden layer) is decomposed on each client
c, for task t, as (:func:`~strategies.baselines.fedweit_maths.compose_weight`)::

    theta_{c,t} = B_c * sigmoid(m_{c,t}) + A_{c,t} + sum_j alpha_{c,t,j} * A_hat_j

B the shared base (the only part the server averages), m_t one mask logit per output channel,
A_t the task's sparse adaptive weights (initialised to B / 3), A_hat_j the knowledge base (the
thresholded adaptive weights of the clients of the previous task's last round, their own
included, as the authors' code) and alpha_t one attention weight per member. Each task has its
own bias per layer and its own head (fedcl's task-IL model: one head per task, picked by the
task id). The local loss is the cross-entropy plus every term of METHODS.md 17.1
(:func:`~strategies.baselines.fedweit_maths.fedweit_penalty`): weight decay on A_t and m_t (and
on B in the first task), L1 on A_t (``lambda_l1``) and m_t (``lambda_mask``), and the drift
penalty ``lambda_l2 / 2 * ||B * sigmoid(m_i) + A_i - theta*_i||^2`` over past tasks i, theta*_i
rebuilt from the B the client holds when it begins the current task. Trained: B, m_t, A_t, the
biases, alpha_t (not in the first task, whose knowledge base is empty) and the head; past
tasks' parts are frozen (the code's retroactive option off).

**What travels.** Client -> server, every round, ``fedweit.base``: B with the output channels of
the lowest ``client_sparsity`` fraction of ``|m_t|`` dropped, as a real sparse encoding: per
layer the kept channels' indices (int32) and their rows of B (float32), about
``1 - client_sparsity`` of B's bytes. The 0/1 channel mask of METHODS.md 17.2 is the indicator
of those indices, so it travels as them and is not sent twice. In a task's last round also
``fedweit.adaptive``, the task's A hard-thresholded at ``lambda_l1`` (per layer a bitmap of its
non-zero entries and their values: 1/32 of the dense bytes plus 4 bytes per entry kept), and
``fedweit.parts``, the task's m, alpha, biases and head (about 0.5 % of the MLP's size).
Server -> client: the global model every round (dense B in the decomposed layers' weights; the
biases and heads in it are the initial ones, which clients read only when they begin a task),
and ``fedweit.kb``, the knowledge base (sparse, as it came), in a client's first round of each
new task. The server's base is the masked mean of 17.2, uniform over the clients that kept an
entry (:func:`~strategies.baselines.fedweit_maths.masked_mean`). The strategy declares
``Capabilities.model_replies`` false: replies carry an empty model record, so the sparse base
is all a client sends of B. ``summary.json``'s ``strategy_state`` holds, per task, the mean
bytes each reply carried up (``fedweit_up_bytes_per_reply``; ``fedweit_base_bytes_per_reply``
its base; ``fedweit_dense_base_bytes`` and ``fedweit_dense_model_bytes`` the dense base's and
model's, for comparison) and each message carried down (``fedweit_down_bytes_per_message``).

**What clients keep** (their ``ClientStore``, no raw data): the current task's m, A, alpha,
biases and head, the B they began the task with and the knowledge base; per past task its m,
A, alpha, biases, head and the knowledge-base term ``sum_j alpha_j A_hat_j``, which is fixed once
the task is over (the drift term needs only m_i, A_i and the starting B, so theta*_i is not
stored).

**Evaluation: the clients' own models.** FedWeIT has no global model: each client's model for
task i is ``theta_{c,i}`` with its own parts. fedcl's central evaluation counts those
(:meth:`FedWeIT.task_counts`, the counts of all clients summed, i.e. the mean accuracy over the
clients' models on the same test set): with a task's ``fedweit.adaptive`` and ``fedweit.parts``
and its own copy of the knowledge base, the server rebuilds ``theta_{c,i}`` exactly as client c
holds it once it receives the round's B (at test time A thresholded at ``lambda_l1``, as the
authors' code). A task's parts travel in its last round; a client not sampled then sends them
in its next round (evaluation only; they are not added to the knowledge base). In a task's other
rounds the server holds no client model of the current task, so each sampled client counts its
own current model on the task's test samples (the same ``eval_samples_per_task`` draw, right
after its local training, as the authors' clients do) and sends the counts (``fedweit.eval``,
a few integers); the round's current-task accuracy is theirs. A task no client has begun is
scored on the model every client begins it with: ``B * sigmoid(m_init) + B / 3``, the initial
bias and head (the initialisations are seeded by run seed, task and layer, the same on every
client and on the server; attention starts at 0). The global model alone is never scored.

**Task-IL only** (``Capabilities.scenarios``): inference needs the task id to pick m_t, A_t,
alpha_t, the bias and the head. Class-IL and domain-IL give no task id at test time, and FedWeIT
defines no task-agnostic model (averaging the task models would be a model no client has).

Deviations from the paper and its code, and choices:

* fedcl's clients all learn the same task sequence (the scenario's), each from its share of
  the task's data; in the paper each client learns its own sequence of tasks from different
  datasets and is tested on its own tasks. Here every client's model of a task is tested on the
  task's whole test set, and its head, biases and adaptive weights are its own (never
  averaged): under label skew (fedcl's default Dirichlet split) a client that saw few of a
  task's classes holds a model that knows few of them, and the mean over clients shows it.
* Local optimisation is fedcl's: the run's optimizer (``--optimizer``, ``--lr``,
  ``--momentum``; ``--optimizer adam --lr 0.000333`` is the paper's Adam at 1e-3/3), fresh every
  round as for every fedcl method, with no plateau decay of the learning rate (the authors
  divide it by 3 after 3 epochs without validation improvement; fedcl has no validation
  split). The run's ``weight_decay`` is not used: FedWeIT's own ``wd`` is in the loss. Under
  SGD (fedcl's default) the L1 term moves an adaptive weight by only ``lr * lambda_l1`` a step,
  so A stays nearly dense and its uploads and the knowledge base cost about the dense size;
  under Adam (the paper's) each step moves it by about ``lr`` and A becomes sparse.
* A base entry that no client kept keeps the previous global value (the authors' server sets it
  to 0 and their clients keep their own value there); so the base a client holds is the
  global one, which the server's evaluation needs to rebuild its models.
* Each round the client drops ``floor(client_sparsity * out)`` channels (the code also drops
  the channel at the threshold, one more).
* The knowledge base travels sparse (the code sends it dense) and only to clients that have not
  received the current task's yet; a client sampled first in a task's later round gets it then.
* alpha starts at 0 (the code draws it from its initialiser); each task's biases start from the
  model's initial biases (the code draws them).
* The drift anchor theta*_i is rebuilt from the global B the client receives in its first round
  of the new task (the code: the client's own B after its last local round).
* Erasure requests are refused. An erasure would have to remove a client's A from the
  knowledge base of every task and from every other client's past models (their
  ``sum_j alpha_j A_hat_j`` terms), and its share from B; fedcl's unlearning replaces the
  strategy with a fresh or replayed one and judges the global model, and FedWeIT's models live
  on the clients. ``Capabilities.task_end_state`` is true all the same: the knowledge base is
  built at task ends from client data.
* A resumed run's clients start with empty stores (fedcl's client stores do not survive a
  resume): they lose their past tasks' parts, so the drift penalty then restrains nothing; the
  server's copy of their parts keeps the evaluation going.
* Models: Linear and Conv2d layers and heads only (no batch norm); IAU's gradient restriction
  and batched cohorts are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedcl.api import (
    Capabilities,
    ConfigError,
    ContinualStrategy,
    LocalTrainer,
    RoundContext,
    RoundInfo,
    Scenario,
    TrainResult,
    flower_kwargs,
    protocol,
    register_strategy,
)
from strategies.baselines.fedweit_maths import (
    PastTask,
    add_counts,
    channel_values,
    compose_weight,
    dense_channels,
    dense_entries,
    fedweit_penalty,
    initial_mask,
    keep_channels,
    masked_mean,
    sparse_entries,
    threshold,
)

log = logging.getLogger("fedcl")

BASE = "fedweit.base"  # ArrayRecord client -> server, every round: the sparse base
ADAPTIVE = "fedweit.adaptive"  # ArrayRecord client -> server, a task's end: thresholded A
PARTS = "fedweit.parts"  # ArrayRecord client -> server with it: m, alpha, biases, head
EVAL = "fedweit.eval"  # ConfigRecord client -> server, a task's other rounds: its counts
KB = "fedweit.kb"  # ArrayRecord server -> client, its first round of a task: knowledge base
MEMBERS = "members"  # the knowledge base's key of its members' partition ids

# the client's store (ClientStore.arrays)
S = "fedweit."
TASK = S + "task"  # the task the current parts belong to
SENT = S + "sent"  # whether the current task's parts were sent (its last round)
PAST = S + "past"  # the past tasks whose parts are kept
CUR = S + "cur."  # the current task's parts
KB_STORE = S + "kb."  # the current task's knowledge base, as it came


@dataclass(frozen=True)
class FedWeITParams:
    lambda_l1: float = 1e-3
    """lambda_1: the L1 weight on the adaptive weights A, and their hard threshold |A| >
    lambda_1 at evaluation and in the knowledge base (the authors' code: 1e-3)."""
    lambda_l2: float = 100.0
    """lambda_2: the weight of the drift penalty on past tasks' rebuilt weights (code: 100)."""
    lambda_mask: float = 0.0
    """The L1 weight on the mask logits m, and the threshold of sigmoid(m) at evaluation
    (code: 0)."""
    wd: float = 1e-4
    """Weight decay (as ||x||^2 / 2) on A_t and m_t, and on B in the first task (code: 1e-4);
    the run's weight_decay is not used."""
    client_sparsity: float = 0.3
    """The fraction of each layer's output channels (lowest |m|) a client leaves out of the
    base it sends (code: 0.3); 0 sends all of B."""
    adaptive_factor: float = 3.0
    """A new task's adaptive weights start at B / adaptive_factor (code: 3)."""

    def check(self) -> None:
        for name in ("lambda_l1", "lambda_l2", "lambda_mask", "wd"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"fedweit {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.client_sparsity < 1:
            raise ConfigError(f"fedweit client_sparsity must be in [0, 1), got "
                              f"{self.client_sparsity}")
        if not self.adaptive_factor > 0:
            raise ConfigError(f"fedweit adaptive_factor must be > 0, got "
                              f"{self.adaptive_factor}")


# --- the decomposed layers ------------------------------------------------------------------
def decomposed_keys(state: dict[str, torch.Tensor]) -> list[tuple[str, str | None]]:
    """The decomposed layers of a model ``state`` (its ``state_dict``), in order: (weight key,
    bias key or None) of every weight with two or more dimensions outside ``heads`` (the
    Linear and Conv2d layers :func:`check_model` admits)."""
    return [(key, key[:-len("weight")] + "bias" if key[:-len("weight")] + "bias" in state
             else None)
            for key, value in state.items()
            if key.endswith(".weight") and value.dim() >= 2 and not key.startswith("heads.")]


def head_keys(state: dict[str, torch.Tensor], head: int | None) -> list[str]:
    """The state keys of task-IL head ``head`` (``heads.0`` for a single head)."""
    prefix = f"heads.{0 if head is None else head}."
    return [key for key in state if key.startswith(prefix)]


def check_model(params: FedWeITParams, scenario: Scenario, model: nn.Module) -> nn.Module:
    """The run's model, unchanged, once it is one FedWeIT can decompose: a ``heads`` list and,
    outside it, parameters in Linear and Conv2d layers only, and no buffers (batch norm's
    running statistics). Raises a one-line ConfigError otherwise."""
    if not isinstance(getattr(model, "heads", None), nn.ModuleList):
        raise ConfigError(f"fedweit needs a model with one head per task (a heads list, as "
                          f"fedcl's models have); {type(model).__name__} has none")
    for name, module in model.named_modules():
        if name == "heads" or name.startswith("heads."):
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if own and not isinstance(module, nn.Linear | nn.Conv2d):
            raise ConfigError(f"fedweit decomposes Linear and Conv2d layers only; the model's "
                              f"{name} is a {type(module).__name__} (use model mlp or cnn)")
    return model


# --- the wire -------------------------------------------------------------------------------
def nbytes(record: ArrayRecord | None) -> int:
    """The bytes a record's arrays take in a message (their serialised buffers)."""
    return 0 if record is None else sum(len(array.data) for array in record.values())


def encode_base(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                sparsity: float) -> ArrayRecord:
    """The sparse base a client sends: for each decomposed weight key k, ``k.channels``, the
    kept output channels (int32, sorted), and ``k.values``, their rows of B (float32)."""
    out: dict[str, torch.Tensor] = {}
    for key, weight in weights.items():
        kept = keep_channels(masks[key], sparsity)
        out[f"{key}.channels"] = kept.to(torch.int32)
        out[f"{key}.values"] = channel_values(weight.detach(), kept).float().cpu().contiguous()
    return ArrayRecord(out)


def decode_base(record: ArrayRecord, shapes: dict[str, torch.Size]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`encode_base`'s record as, per weight key, (the dense base with its dropped
    channels 0, its 0/1 channel mask). Raises ValueError for a record that does not fit the
    model's ``shapes`` or holds non-finite values."""
    arrays = record.to_torch_state_dict()
    expected = {f"{k}.{part}" for k in shapes for part in ("channels", "values")}
    if set(arrays) != expected:
        raise ValueError(f"base record keys {sorted(set(arrays) ^ expected)[:3]} differ from "
                         "the model's")
    out = {}
    for key, shape in shapes.items():
        values = arrays[f"{key}.values"]
        if not torch.isfinite(values).all():
            raise ValueError(f"non-finite values in the base of {key}")
        out[key] = dense_channels(arrays[f"{key}.channels"].long(), values.float(), shape)
    return out


def encode_entries(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Element-wise sparse tensors: ``<prefix><key>.bits`` (uint8, the bitmap of the non-zero
    entries) and ``.values`` (float32) of each tensor
    (:func:`~strategies.baselines.fedweit_maths.sparse_entries`)."""
    out = {}
    for key, value in tensors.items():
        bits, vals = sparse_entries(value.detach().cpu().float())
        out[f"{prefix}{key}.bits"] = bits
        out[f"{prefix}{key}.values"] = vals.contiguous()
    return out


def decode_entries(arrays: dict[str, torch.Tensor], prefix: str,
                   shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The dense tensors :func:`encode_entries` wrote under ``prefix``. Raises ValueError (or
    KeyError for a missing key) when they do not fit ``shapes`` or are not finite."""
    out = {}
    for key, shape in shapes.items():
        values = arrays[f"{prefix}{key}.values"].float()
        if not torch.isfinite(values).all():
            raise ValueError(f"non-finite adaptive weights in {key}")
        out[key] = dense_entries(arrays[f"{prefix}{key}.bits"], values, shape)
    return out


def kb_stack(kb: dict[str, torch.Tensor], key: str, shape: torch.Size,
             prefix: str = "") -> torch.Tensor | None:
    """The knowledge base's members of weight ``key`` as one dense stack ``[K, ...]`` (None
    for an empty one): ``kb`` holds ``<prefix>members`` and :func:`encode_entries`'s arrays
    under ``<prefix><j>/``."""
    members = kb.get(f"{prefix}{MEMBERS}")
    if members is None or members.numel() == 0:
        return None
    return torch.stack([decode_entries(kb, f"{prefix}{j}/", {key: shape})[key]
                        for j in range(int(members.numel()))])


def same_counts(counts: dict[int, list[int]]) -> dict[int, list[int]]:
    return {int(k): [int(c), int(n)] for k, (c, n) in counts.items()}


# --- the server half ------------------------------------------------------------------------
@dataclass
class Traffic:
    """Bytes carried in one task's messages (array buffers), and how many messages."""

    up: int = 0
    base: int = 0
    replies: int = 0
    down: int = 0
    kb: int = 0
    messages: int = 0
    dense_model: int = 0
    dense_base: int = 0

    def metrics(self) -> dict[str, float]:
        per_reply = max(self.replies, 1)
        per_message = max(self.messages, 1)
        return {"fedweit_up_bytes_per_reply": self.up / per_reply,
                "fedweit_base_bytes_per_reply": self.base / per_reply,
                "fedweit_down_bytes_per_message": self.down / per_message,
                "fedweit_kb_bytes_sent": float(self.kb),
                "fedweit_dense_model_bytes": float(self.dense_model),
                "fedweit_dense_base_bytes": float(self.dense_base)}


class FedWeIT(ContinualStrategy, FedAvg):
    """The server of FedWeIT: the masked mean of the clients' sparse bases, the knowledge base
    built at every task end, and the clients' task models rebuilt for evaluation."""

    payload_keys = (BASE, ADAPTIVE, PARTS, EVAL)
    capabilities = Capabilities(scenarios=("task-il",), fedavg_aggregate=False,
                                cohort_mean=False, task_end_state=True, model_replies=False)

    def __init__(self, params: FedWeITParams, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params, self.seed = params, seed
        #: task -> the knowledge base its clients begin with (the wire record's arrays)
        self.kb: dict[int, dict[str, torch.Tensor]] = {}
        #: task -> partition id -> the client's parts of it (adaptive and parts arrays)
        self.parts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self.task = -1
        self.traffic: dict[int, Traffic] = {}
        self._global: ArrayRecord | None = None
        self._info: RoundInfo | None = None
        self._kb_nodes: set[int] = set()  # nodes that hold the current task's knowledge base
        self._kb_record: tuple[int, ArrayRecord] | None = None
        self._candidates: dict[int, dict[str, torch.Tensor]] = {}  # last round's adaptives
        self._reports: dict[int, dict[int, list[int]]] = {}  # task -> the round's client counts
        self._state: tuple[ArrayRecord, dict[str, torch.Tensor]] | None = None

    # --- task boundaries --------------------------------------------------------------------
    def begin_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        self.task = task
        self._kb_nodes = set()
        self._reports = {}
        return arrays

    def end_task(self, task: int, arrays: ArrayRecord) -> ArrayRecord:
        """The next task's knowledge base: the thresholded adaptive weights of this task's
        last-round clients, by partition id."""
        members = sorted(self._candidates)
        kb: dict[str, torch.Tensor] = {MEMBERS: torch.tensor(members, dtype=torch.int32)}
        for j, pid in enumerate(members):
            for key, value in self._candidates[pid].items():
                kb[f"{j}/{key}"] = value
        self.kb[task + 1] = kb
        self._candidates = {}
        return arrays

    # --- a round ------------------------------------------------------------------------------
    def configure_round(self, info: RoundInfo, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """Flower's messages; the knowledge base added to those for nodes that do not hold
        the task's yet."""
        self._info, self._global, self._reports = info, arrays, {}
        messages = super().configure_round(info, arrays, config, grid)
        kb = self.kb_record(info.task)
        traffic = self.traffic.setdefault(info.task, Traffic())
        traffic.dense_model = nbytes(arrays)
        traffic.dense_base = sum(len(arrays[k].data) for k, _ in decomposed_keys(
            arrays.to_torch_state_dict()))
        for msg in messages:
            traffic.messages += 1
            traffic.down += nbytes(arrays)
            if kb is not None and msg.metadata.dst_node_id not in self._kb_nodes:
                # Flower's messages share one content record: this one gets its own
                msg.content = RecordDict(dict(msg.content.items()))
                msg.content[KB] = kb
                traffic.down += nbytes(kb)
                traffic.kb += nbytes(kb)
        return messages

    def kb_record(self, task: int) -> ArrayRecord | None:
        """Task ``task``'s knowledge base as sent (None when it has no member)."""
        kb = self.kb.get(task)
        if kb is None or kb[MEMBERS].numel() == 0:
            return None
        if self._kb_record is None or self._kb_record[0] != task:
            self._kb_record = (task, ArrayRecord({k: v.contiguous() for k, v in kb.items()}))
        return self._kb_record[1]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, Any]:
        """The masked mean of the replies' sparse bases (17.2); their task parts and counts
        kept. A reply whose records do not fit the model is left out with a warning."""
        replies = self.take_payloads(replies)
        assert self._global is not None and self._info is not None
        info, state = self._info, self._global.to_torch_state_dict()
        keys = decomposed_keys(state)
        shapes = {k: state[k].shape for k, _ in keys}
        traffic = self.traffic.setdefault(info.task, Traffic())
        bases, used = [], []
        for msg in replies:
            if msg.has_error():
                continue
            pid = protocol.reply_partition_id(msg)
            payload = self.payloads.get(pid, RecordDict())
            try:
                if BASE not in payload:
                    raise ValueError("no base record")
                base = decode_base(payload[BASE], shapes)  # type: ignore[arg-type]
                parts = self.read_parts(payload, state)
            except (ValueError, KeyError, TypeError) as err:
                log.warning("FedWeIT: round %d: the reply of client %d is left out: %s",
                            server_round, pid, err)
                continue
            bases.append(base)
            used.append(msg)
            self._kb_nodes.add(msg.metadata.src_node_id)
            for task, client_parts in parts.items():
                self.parts.setdefault(task, {})[pid] = client_parts
                if task == info.task and info.last_of_task:  # a member of the next task's KB
                    self._candidates[pid] = {k[len("adaptive/"):]: v
                                             for k, v in client_parts.items()
                                             if k.startswith("adaptive/")}
            if EVAL in payload:
                self.read_counts(payload[EVAL], info.task)  # type: ignore[arg-type]
            traffic.replies += 1
            traffic.base += nbytes(payload[BASE])  # type: ignore[arg-type]
            traffic.up += sum(nbytes(r) for r in payload.values()
                              if isinstance(r, ArrayRecord))
        if not bases:
            return None, None
        new = dict(state)
        for key, _ in keys:
            new[key] = masked_mean([b[key][0] for b in bases], [b[key][1] for b in bases],
                                   previous=state[key].float()).to(state[key].dtype)
        metrics = self.train_metrics_aggr_fn([m.content for m in used],  # type: ignore[attr-defined]
                                             self.weighted_by_key)  # type: ignore[attr-defined]
        return ArrayRecord(new), metrics

    def read_parts(self, payload: RecordDict, state: dict[str, torch.Tensor]
                   ) -> dict[int, dict[str, torch.Tensor]]:
        """The task parts in a reply (``fedweit.adaptive`` and ``fedweit.parts``), by task:
        ``adaptive/<key>.bits|values``, ``mask/<key>``, ``attention/<key>`` per decomposed
        weight key and ``param/<key>`` for the biases and the head. Raises ValueError when they
        do not fit the model."""
        if ADAPTIVE not in payload and PARTS not in payload:
            return {}
        adaptive = payload[ADAPTIVE].to_torch_state_dict()  # type: ignore[union-attr]
        parts = payload[PARTS].to_torch_state_dict()  # type: ignore[union-attr]
        keys = decomposed_keys(state)
        tasks = sorted({int(k.split("/", 1)[0]) for k in parts})
        out = {}
        for task in tasks:
            got: dict[str, torch.Tensor] = {}
            dense = decode_entries(adaptive, f"{task}/", {k: state[k].shape for k, _ in keys})
            members = self.kb.get(task, {}).get(MEMBERS)
            size = 0 if members is None else int(members.numel())
            for key, _ in keys:
                got.update(encode_entries({key: threshold(dense[key],
                                                          self.params.lambda_l1)},
                                          "adaptive/"))
                mask = parts[f"{task}/mask/{key}"].float()
                attention = parts[f"{task}/attention/{key}"].float()
                if mask.shape != state[key].shape[:1] or attention.numel() not in (0, size):
                    raise ValueError(f"task {task}'s mask or attention of {key} does not fit")
                got[f"mask/{key}"], got[f"attention/{key}"] = mask, attention
            params = {k.split("/param/", 1)[1]: v for k, v in parts.items()
                      if k.startswith(f"{task}/param/")}
            for key, value in params.items():
                if key not in state or value.shape != state[key].shape:
                    raise ValueError(f"task {task}'s {key} does not fit the model")
                got[f"param/{key}"] = value.to(state[key].dtype)
            if not all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point()):
                raise ValueError(f"non-finite parts of task {task}")
            out[task] = got
        return out

    def read_counts(self, record: ConfigRecord, task: int) -> None:
        """A client's counts of its current model on ``task`` (a task's rounds but the
        last), added to the round's."""
        if int(record["task"]) != task:  # type: ignore[arg-type]
            return
        counts = {int(k): [int(c), int(n)] for k, c, n in zip(
            record["classes"], record["correct"], record["total"], strict=True)}  # type: ignore[arg-type]
        add_counts(self._reports.setdefault(task, {}), counts)

    # --- evaluation ---------------------------------------------------------------------------
    def task_counts(self, task: int, arrays: ArrayRecord,
                    count: Callable[[dict[str, torch.Tensor]], dict[int, list[int]]]
                    ) -> dict[int, list[int]] | None:
        """The summed counts of every client's model of ``task`` (rebuilt from its parts and
        the global base), or, for the current task before its parts arrive, of the models
        the round's clients counted themselves; for a task no client has begun, of the model
        every client begins it with."""
        if self._state is None or self._state[0] is not arrays:
            self._state = (arrays, arrays.to_torch_state_dict())
        state = self._state[1]
        clients = self.parts.get(task)
        if clients:
            total: dict[int, list[int]] = {}
            stacks = self.kb_stacks(task, state)
            for pid in sorted(clients):
                add_counts(total, count(self.client_model(task, pid, state, stacks)))
            return total
        if task == self.task and self._reports.get(task):
            return same_counts(self._reports[task])
        return count(self.fresh_model(task, state))

    def kb_stacks(self, task: int, state: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor | None]:
        """Task ``task``'s knowledge base, a dense stack per decomposed weight key."""
        kb = self.kb.get(task, {})
        return {key: kb_stack(kb, key, state[key].shape) for key, _ in decomposed_keys(state)}

    def client_model(self, task: int, pid: int, state: dict[str, torch.Tensor],
                     stacks: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Client ``pid``'s model of ``task`` with the global base of ``state``, as the client
        evaluates it (a ``state_dict`` of the run's model)."""
        parts = self.parts[task][pid]
        model = dict(state)
        for key, _ in decomposed_keys(state):
            adaptive = decode_entries(parts, "adaptive/", {key: state[key].shape})[key]
            attention = parts[f"attention/{key}"]
            model[key] = compose_weight(
                state[key].float(), parts[f"mask/{key}"], adaptive,
                stacks[key] if attention.numel() else None, attention, evaluate=True,
                lambda_l1=self.params.lambda_l1, lambda_mask=self.params.lambda_mask)
        for key, value in parts.items():
            if key.startswith("param/"):
                model[key[len("param/"):]] = value
        return model

    def fresh_model(self, task: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model every client begins ``task`` with, given the global base of ``state``."""
        model = dict(state)
        for layer, (key, _) in enumerate(decomposed_keys(state)):
            base = state[key].float()
            model[key] = compose_weight(
                base, initial_mask(base.shape[0], self.seed, task, layer),
                base / self.params.adaptive_factor, evaluate=True,
                lambda_l1=self.params.lambda_l1, lambda_mask=self.params.lambda_mask)
        return model

    # --- state --------------------------------------------------------------------------------
    def state_metrics(self) -> dict[str, float]:
        """After each task: the knowledge base the next task begins with (members, and the
        density of its adaptive weights), the clients whose models of the task are evaluated,
        and the task's traffic (:class:`Traffic`)."""
        out: dict[str, float] = {}
        kb = self.kb.get(self.task + 1)
        if kb is not None:
            out["fedweit_kb_members"] = float(kb[MEMBERS].numel())
            nnz = sum(int(v.numel()) for k, v in kb.items() if k.endswith(".values"))
            entries = sum(8 * int(v.numel()) for k, v in kb.items() if k.endswith(".bits"))
            if entries:  # the bitmaps' bits: every entry, rounded up to whole bytes per layer
                out["fedweit_kb_density"] = nnz / entries
        out["fedweit_client_models"] = float(len(self.parts.get(self.task, {})))
        if self.task in self.traffic:
            out.update(self.traffic[self.task].metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"kb": self.kb, "parts": self.parts, "task": self.task,
                "traffic": {t: vars(v) for t, v in self.traffic.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kb = dict(state["kb"])
        self.parts = {t: dict(v) for t, v in state["parts"].items()}
        self.task = int(state["task"])
        self.traffic = {int(t): Traffic(**v) for t, v in state["traffic"].items()}


# --- the client half ------------------------------------------------------------------------
@dataclass
class Layer:
    """One decomposed layer's tensors in a round."""

    key: str
    bias_key: str | None
    base: nn.Parameter
    mask: nn.Parameter
    adaptive: nn.Parameter
    bias: nn.Parameter | None
    attention: torch.Tensor
    kb: torch.Tensor | None

    def weight(self, evaluate: bool, params: FedWeITParams) -> torch.Tensor:
        return compose_weight(self.base, self.mask, self.adaptive, self.kb, self.attention,
                              evaluate=evaluate, lambda_l1=params.lambda_l1,
                              lambda_mask=params.lambda_mask)


@dataclass
class Round:
    """What a client's round trains and reads: its decomposed layers, its head's keys, its
    past tasks' frozen parts (for the drift term)."""

    layers: list[Layer] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    past: list[PastTask] = field(default_factory=list)


class FedWeITTrainer(LocalTrainer):
    """A client's FedWeIT: the decomposed model of its current task trained on the full loss;
    the sparse base sent every round, the task's parts at its end, its counts otherwise."""

    keeps_client_store = True  # every task's parts and the knowledge base, round to round
    batchable = False  # its own forward pass and loss
    adds_reply_records = True

    def __init__(self, params: FedWeITParams) -> None:
        self.params = params
        self.round = Round()

    # --- task boundaries ----------------------------------------------------------------------
    def begin_task(self, ctx: RoundContext) -> None:
        """The previous task's parts put away (its knowledge-base term summed once), the new
        task's begun from the global model the client received."""
        store = ctx.store.arrays
        state = ctx.model.state_dict()
        keys = decomposed_keys(state)
        if TASK in store and int(store[TASK]) != ctx.task:
            self.put_away(store, int(store[TASK]), keys, state)
        kb = ctx.message.get(KB) if ctx.message is not None else None
        kb_arrays = kb.to_torch_state_dict() if isinstance(kb, ArrayRecord) else {}
        size = int(kb_arrays[MEMBERS].numel()) if MEMBERS in kb_arrays else 0
        for key, value in kb_arrays.items():
            store[KB_STORE + key] = value
        for layer, (key, bias) in enumerate(keys):
            base = state[key].detach().float()
            store[f"{CUR}{key}.B0"] = base.clone()
            store[f"{CUR}mask/{key}"] = initial_mask(base.shape[0], ctx.config.seed, ctx.task,
                                                     layer)
            store[f"{CUR}adaptive/{key}"] = base / self.params.adaptive_factor
            store[f"{CUR}attention/{key}"] = torch.zeros(size)
            if bias is not None:
                store[f"{CUR}param/{bias}"] = state[bias].detach().clone()
        for key in head_keys(state, ctx.head):
            store[f"{CUR}param/{key}"] = state[key].detach().clone()
        store[TASK] = torch.tensor(ctx.task)
        store[SENT] = torch.tensor(0)

    def put_away(self, store: dict[str, torch.Tensor], task: int,
                 keys: list[tuple[str, str | None]], state: dict[str, torch.Tensor]) -> None:
        """Task ``task``'s parts from the current slots to its own (``fedweit.<task>.``), with
        its knowledge-base term ``sum_j alpha_j A_hat_j`` summed; the knowledge base dropped."""
        kb = {k[len(KB_STORE):]: v for k, v in store.items() if k.startswith(KB_STORE)}
        prefix = f"{S}{task}."
        for key, _ in keys:
            stack = kb_stack(kb, key, state[key].shape)
            attention = store[f"{CUR}attention/{key}"]
            if stack is not None and attention.numel():
                store[f"{prefix}kbterm/{key}"] = torch.tensordot(attention, stack, dims=1)
            del store[f"{CUR}{key}.B0"]
        for name in [k for k in store if k.startswith(CUR)]:
            store[prefix + name[len(CUR):]] = store.pop(name)
        for name in [k for k in store if k.startswith(KB_STORE)]:
            del store[name]
        store[prefix + "sent"] = store.pop(SENT)
        past = store.get(PAST, torch.zeros(0, dtype=torch.int64))
        store[PAST] = torch.cat([past, torch.tensor([task])])

    # --- a round ------------------------------------------------------------------------------
    def optimizers(self, ctx: RoundContext, model: nn.Module) -> list[torch.optim.Optimizer]:
        """The round's parameters (B from the global model; the current task's parts from the
        store, the head loaded into the model) and one optimizer of the run's kind over them,
        without weight decay (FedWeIT's is in its loss)."""
        store, dev = ctx.store.arrays, ctx.device
        state = model.state_dict()
        kb = {k[len(KB_STORE):]: v for k, v in store.items() if k.startswith(KB_STORE)}
        rnd = Round(head=head_keys(state, ctx.head))
        with torch.no_grad():
            for key in rnd.head:
                model.get_parameter(key).copy_(store[f"{CUR}param/{key}"])
        for key, bias in decomposed_keys(state):
            attention = store[f"{CUR}attention/{key}"].to(dev)
            stack = kb_stack(kb, key, state[key].shape)
            rnd.layers.append(Layer(
                key, bias, nn.Parameter(state[key].detach().clone()),
                nn.Parameter(store[f"{CUR}mask/{key}"].to(dev).clone()),
                nn.Parameter(store[f"{CUR}adaptive/{key}"].to(dev).clone()),
                None if bias is None else nn.Parameter(store[f"{CUR}param/{bias}"].to(dev)
                                                      .clone()),
                nn.Parameter(attention.clone()) if attention.numel() else attention,
                None if stack is None else stack.to(dev)))
        for task in store.get(PAST, torch.zeros(0, dtype=torch.int64)).tolist():
            prefix = f"{S}{task}."
            masks, adaptives, anchors = [], [], []
            for layer in rnd.layers:
                mask = store[f"{prefix}mask/{layer.key}"].to(dev)
                adaptive = store[f"{prefix}adaptive/{layer.key}"].to(dev)
                start = store[f"{CUR}{layer.key}.B0"].to(dev)
                masks.append(mask)
                adaptives.append(adaptive)
                anchors.append(compose_weight(start, mask, adaptive))  # theta*_i
            rnd.past.append(PastTask(masks, adaptives, anchors))
        self.round = rnd
        params: list[torch.Tensor] = []
        for layer in rnd.layers:
            params += [layer.base, layer.mask, layer.adaptive]
            params += [p for p in (layer.bias, layer.attention) if isinstance(p, nn.Parameter)]
        params += [model.get_parameter(key) for key in rnd.head]
        config = ctx.config
        if config.optimizer == "adam":
            return [torch.optim.Adam(params, lr=config.lr)]
        return [torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)]

    def forward(self, ctx: RoundContext, model: nn.Module, inputs: torch.Tensor,
                evaluate: bool = False) -> torch.Tensor:
        """The decomposed model's logits of the current task's head."""
        overrides: dict[str, torch.Tensor] = {}
        for layer in self.round.layers:
            overrides[layer.key] = layer.weight(evaluate, self.params)
            if layer.bias is not None and layer.bias_key is not None:
                overrides[layer.bias_key] = layer.bias
        return functional_call(model, overrides, (inputs, ctx.head))  # type: ignore[no-any-return]

    def batch_loss(self, ctx: RoundContext, model: nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.forward(ctx, model, inputs), targets)

    def regularizer(self, ctx: RoundContext, params: list[torch.Tensor],
                    reference: list[torch.Tensor]) -> torch.Tensor | None:
        layers, p = self.round.layers, self.params
        return fedweit_penalty([lay.base for lay in layers], [lay.mask for lay in layers],
                               [lay.adaptive for lay in layers], self.round.past,
                               first_task=ctx.task == 0, wd=p.wd, lambda_l1=p.lambda_l1,
                               lambda_mask=p.lambda_mask, lambda_l2=p.lambda_l2)

    def after_training(self, ctx: RoundContext, result: TrainResult) -> TrainResult:
        """The current task's parts back to the store; the reply's records: the sparse base,
        and the task's parts (its last round) or the client's counts (its other rounds), and
        the parts of a past task not sent yet."""
        store, rnd = ctx.store.arrays, self.round
        with torch.no_grad():
            for layer in rnd.layers:
                store[f"{CUR}mask/{layer.key}"] = layer.mask.detach().cpu().clone()
                store[f"{CUR}adaptive/{layer.key}"] = layer.adaptive.detach().cpu().clone()
                store[f"{CUR}attention/{layer.key}"] = layer.attention.detach().cpu().clone()
                if layer.bias is not None:
                    store[f"{CUR}param/{layer.bias_key}"] = layer.bias.detach().cpu().clone()
            for key in rnd.head:
                store[f"{CUR}param/{key}"] = ctx.model.get_parameter(key).detach().cpu().clone()
        result.records[BASE] = encode_base({lay.key: lay.base for lay in rnd.layers},
                                           {lay.key: lay.mask for lay in rnd.layers},
                                           self.params.client_sparsity)
        adaptive: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        for task in store.get(PAST, torch.zeros(0, dtype=torch.int64)).tolist():
            if not int(store[f"{S}{task}.sent"]):
                self.add_parts(store, f"{S}{task}.", task, adaptive, parts)
                store[f"{S}{task}.sent"] = torch.tensor(1)
        if ctx.last_of_task:
            self.add_parts(store, CUR, ctx.task, adaptive, parts)
            store[SENT] = torch.tensor(1)
        else:
            result.records[EVAL] = self.own_counts(ctx)
        if parts:
            result.records[ADAPTIVE] = ArrayRecord(adaptive)
            result.records[PARTS] = ArrayRecord({k: v.contiguous() for k, v in parts.items()})
        return result

    def add_parts(self, store: dict[str, torch.Tensor], prefix: str, task: int,
                  adaptive: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]) -> None:
        """Task ``task``'s parts (under ``prefix`` in the store) into the reply's records."""
        for layer in self.round.layers:
            key = layer.key
            adaptive.update(encode_entries(
                {key: threshold(store[f"{prefix}adaptive/{key}"], self.params.lambda_l1)},
                f"{task}/"))
            parts[f"{task}/mask/{key}"] = store[f"{prefix}mask/{key}"]
            parts[f"{task}/attention/{key}"] = store[f"{prefix}attention/{key}"].float()
        for name, value in store.items():
            if name.startswith(prefix + "param/"):
                parts[f"{task}/param/{name[len(prefix + 'param/'):]}"] = value

    @torch.no_grad()
    def own_counts(self, ctx: RoundContext) -> ConfigRecord:
        """The client's current model (as evaluated: A thresholded) on the current task's
        test samples, ``eval_samples_per_task`` of them as the server draws them: per dataset
        class, correct and total."""
        config, scenario = ctx.config, ctx.scenario
        assert scenario is not None
        x, y = scenario.test_data(ctx.task, config.eval_samples_per_task, config.seed)
        model = ctx.model
        was_training = model.training
        model.eval()
        hits = torch.zeros(len(y), dtype=torch.bool)
        for start in range(0, len(y), config.eval_batch_size):
            xb = self.batch_inputs(ctx, x[start:start + config.eval_batch_size].to(ctx.device))
            pred = self.forward(ctx, model, xb, evaluate=True).argmax(dim=1).cpu()
            hits[start:start + len(pred)] = pred == y[start:start + config.eval_batch_size]
        model.train(was_training)
        classes = scenario.classes_of(ctx.task, y)
        kinds = torch.unique(classes).tolist()
        return ConfigRecord({"task": ctx.task, "classes": [int(k) for k in kinds],
                             "correct": [int(hits[classes == k].sum()) for k in kinds],
                             "total": [int((classes == k).sum()) for k in kinds]})


def check_run(config: Any) -> None:
    """Refuse, in one line, what FedWeIT cannot run: erasure requests, IAU's gradient
    restriction."""
    if str(config.erasures).strip():
        raise ConfigError("fedweit does not support erasure requests: its models live on the "
                          "clients (each client's task parts, knowledge bases holding other "
                          "clients' adaptive weights), which fedcl's unlearning can neither "
                          "rebuild nor judge")
    if config.gradient_restriction > 0:
        raise ConfigError("fedweit trains its own decomposed parameters; gradient_restriction "
                          "(IAU's training) is not supported")


@register_strategy("fedweit", "Task-IL FedWeIT: each layer decomposed into a shared sparse base, "
                   "task masks and adaptive weights, and other clients' adaptive weights "
                   "(Yoon et al. 2021).", params=FedWeITParams, trainer=FedWeITTrainer,
                   model=check_model)
def build_fedweit(config: Any, params: FedWeITParams) -> FedWeIT:
    check_run(config)
    return FedWeIT(params, int(config.seed), **flower_kwargs(config))


__all__ = ["FedWeIT", "FedWeITParams", "FedWeITTrainer", "build_fedweit", "check_model",
           "decomposed_keys"]
