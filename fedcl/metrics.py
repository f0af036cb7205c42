"""Continual-learning metrics for fedcl.

All functions are pure (inputs are never mutated) and depend on numpy only.

Conventions
-----------
Accuracy matrix ``R`` is a ``T x T`` array with ``R[i, j]`` = test accuracy
(a fraction in ``[0, 1]``) on task ``j`` after training task ``i`` (0-based).

Plasticity beside stability: learning accuracy (each task's accuracy right after its own
training) and intransigence (against a jointly trained reference the caller gives).

Stability-gap metrics (De Lange et al., ICLR 2023) work per federated round:
``curves`` is an ``n_rounds x T`` array with ``curves[r, k]`` = accuracy on
task ``k`` after round ``r``, and ``round_task[r]`` is the (0-based) task
trained in round ``r`` (non-decreasing).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forgetting_at_task_end",
    "forward_transfer",
    "intransigence",
    "intransigence_per_task",
    "learning_accuracy",
    "min_acc_per_round",
    "summarize",
    "wc_acc_per_round",
]


# --------------------------------------------------------------------------
# validation helpers (always return fresh copies, never views of the input)
# --------------------------------------------------------------------------


def _check_fractions(arr: np.ndarray, name: str) -> None:
    if arr.size == 0:
        return
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must contain only finite values (no nan/inf)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} values must lie in [0, 1] (accuracy fractions), "
            f"got min={lo:g}, max={hi:g}"
        )


def _as_matrix(R: npt.ArrayLike) -> np.ndarray:
    """Validate and copy an accuracy matrix (square, non-empty, in [0, 1])."""
    arr = np.array(R, dtype=float)  # np.array copies
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"R must be a square T x T matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("R must contain at least one task (T >= 1), got T=0")
    _check_fractions(arr, "R")
    return arr


def _as_baseline(baseline: npt.ArrayLike, T: int) -> np.ndarray:
    arr = np.array(baseline, dtype=float)
    if arr.ndim != 1 or arr.shape[0] != T:
        raise ValueError(
            f"baseline must be a 1-D array of length T={T} (one entry per task), "
            f"got shape {arr.shape}"
        )
    _check_fractions(arr, "baseline")
    return arr


def _as_curves(
    curves: npt.ArrayLike, round_task: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and copy ``curves`` (n_rounds x T) and ``round_task`` (n_rounds)."""
    c = np.array(curves, dtype=float)
    if c.ndim != 2:
        raise ValueError(
            f"curves must be a 2-D (rounds x tasks) array, got shape {c.shape}"
        )
    n_rounds, T = c.shape
    if T == 0:
        raise ValueError("curves must have at least one task column, got 0")
    _check_fractions(c, "curves")

    rt_raw = np.array(round_task)
    if rt_raw.ndim != 1:
        raise ValueError(f"round_task must be a 1-D sequence, got shape {rt_raw.shape}")
    if rt_raw.shape[0] != n_rounds:
        raise ValueError(
            f"round_task has length {rt_raw.shape[0]} but curves has "
            f"{n_rounds} rounds; they must match"
        )
    if rt_raw.size == 0:
        return c, np.zeros(0, dtype=np.int64)
    integral_floats = (
        rt_raw.dtype.kind == "f"
        and bool(np.all(np.isfinite(rt_raw)))
        and bool(np.all(rt_raw == np.round(rt_raw)))
    )
    if rt_raw.dtype.kind in "iu" or integral_floats:
        rt = rt_raw.astype(np.int64)
    else:
        raise ValueError(
            f"round_task must contain integer task indices, got dtype {rt_raw.dtype}"
        )
    if rt.min() < 0 or rt.max() > T - 1:
        raise ValueError(
            f"round_task values must lie in [0, {T - 1}] (curves has {T} tasks), "
            f"got min={int(rt.min())}, max={int(rt.max())}"
        )
    drops = np.flatnonzero(np.diff(rt) < 0)
    if drops.size:
        r = int(drops[0]) + 1
        raise ValueError(
            f"round_task must be non-decreasing, but round_task[{r}]={int(rt[r])} "
            f"< round_task[{r - 1}]={int(rt[r - 1])}"
        )
    return c, rt


# --------------------------------------------------------------------------
# end-of-sequence metrics on the accuracy matrix
# --------------------------------------------------------------------------


def average_accuracy(R: npt.ArrayLike) -> float:
    """Average accuracy after the last task: ACC = (1/T) sum_j R[T-1, j]."""
    arr = _as_matrix(R)
    return float(arr[-1].mean())


def forgetting(R: npt.ArrayLike) -> float:
    """Max-based forgetting (Chaudhry et al., 2018), the standard definition.

    F = 1/(T-1) sum_{j<T-1} ( max_{l in j..T-2} R[l, j] - R[T-1, j] ),
    i.e. the best accuracy on task j at or after its own training (before the last row) minus
    the final one. Rows before task j was trained do not count: in domain-IL an untrained
    task's accuracy is well above zero, and a task learnt worse than that would show forgetting
    it never had. nan when T == 1. :func:`forgetting_at_task_end` is the variant that takes
    the accuracy right after the task's training instead of the best.
    """
    arr = _as_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return math.nan
    # cells of rows before each column's own task are masked out of the max
    rows = np.arange(T - 1)[:, None]
    cols = np.arange(T - 1)[None, :]
    trained = np.where(rows >= cols, arr[: T - 1, : T - 1], -np.inf)
    best = trained.max(axis=0)
    return float((best - arr[T - 1, : T - 1]).mean())


def forgetting_at_task_end(R: npt.ArrayLike) -> float:
    """Forgetting w.r.t. accuracy right after learning each task (the end-of-task variant,
    the FOT paper's FGT and De Lange et al.'s FORG).

    F_end = 1/(T-1) sum_{j<T-1} ( R[j, j] - R[T-1, j] ). nan when T == 1.
    """
    arr = _as_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return math.nan
    diag = np.diagonal(arr)[: T - 1]
    return float((diag - arr[T - 1, : T - 1]).mean())


def backward_transfer(R: npt.ArrayLike) -> float:
    """Backward transfer (Lopez-Paz & Ranzato, 2017).

    BWT = 1/(T-1) sum_{j<T-1} ( R[T-1, j] - R[j, j] ). nan when T == 1.
    """
    arr = _as_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return math.nan
    diag = np.diagonal(arr)[: T - 1]
    return float((arr[T - 1, : T - 1] - diag).mean())


def learning_accuracy(R: npt.ArrayLike) -> float:
    """Learning accuracy (Riemer et al., ICLR 2019): LA = (1/T) sum_j R[j, j], each task's
    accuracy right after its own training. Plasticity beside forgetting's stability: a method
    that stops learning shows no forgetting, and a low LA."""
    arr = _as_matrix(R)
    return float(np.diagonal(arr).mean())


def intransigence_per_task(R: npt.ArrayLike, reference: npt.ArrayLike) -> list[float]:
    """Intransigence (Chaudhry et al., "Riemannian Walk", ECCV 2018), per task:
    I_k = reference[k] - R[k, k].

    ``reference[k]`` (A*_k) is the accuracy on task k of a reference model of the same
    architecture trained *jointly* on the data of tasks 0..k (class-IL: one head over all their
    classes); federated, the reference of task k is a run that trains tasks 0..k together with
    the same split, rounds and optimizer. fedcl does not train it: the user gives it. Positive:
    the continual learner learnt task k worse than the reference (it resists new knowledge)."""
    arr = _as_matrix(R)
    ref = _as_baseline(reference, arr.shape[0])
    return [float(v) for v in ref - np.diagonal(arr)]


def intransigence(R: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """Mean intransigence over tasks, (1/T) sum_k (reference[k] - R[k, k]): see
    :func:`intransigence_per_task`."""
    return float(np.mean(intransigence_per_task(R, reference)))


def forward_transfer(R: npt.ArrayLike, baseline: npt.ArrayLike) -> float:
    """Forward transfer (Lopez-Paz & Ranzato, 2017).

    FWT = 1/(T-1) sum_{j>=1} ( R[j-1, j] - baseline[j] ), where baseline[j] is
    the accuracy of the randomly initialised model on task j. nan when T == 1.
    """
    arr = _as_matrix(R)
    T = arr.shape[0]
    base = _as_baseline(baseline, T)
    if T == 1:
        return math.nan
    j = np.arange(1, T)
    return float((arr[j - 1, j] - base[1:]).mean())


# --------------------------------------------------------------------------
# stability-gap metrics (per federated round)
# --------------------------------------------------------------------------


def min_acc_per_round(
    curves: npt.ArrayLike, round_task: npt.ArrayLike
) -> list[float | None]:
    """Per-round min-ACC (De Lange et al., ICLR 2023).

    With c = round_task[r]:
    min-ACC(r) = 1/c sum_{k<c} min{ curves[s, k] : s <= r, round_task[s] > k },
    the mean over old tasks of the lowest accuracy each has had since its own
    training ended (up to and including round r). None when c == 0.
    """
    c_arr, rt = _as_curves(curves, round_task)
    T = c_arr.shape[1]
    running_min = np.full(T, np.inf)  # per task, over rounds after its training
    out: list[float | None] = []
    for r in range(c_arr.shape[0]):
        cur = int(rt[r])
        if cur > 0:
            running_min[:cur] = np.minimum(running_min[:cur], c_arr[r, :cur])
            out.append(float(running_min[:cur].mean()))
        else:
            out.append(None)
    return out


def wc_acc_per_round(curves: npt.ArrayLike, round_task: npt.ArrayLike) -> list[float]:
    """Per-round worst-case accuracy (De Lange et al., ICLR 2023).

    With c = round_task[r] (so c+1 tasks seen):
    WC-ACC(r) = 1/(c+1) * curves[r, c] + (1 - 1/(c+1)) * min-ACC(r),
    which reduces to curves[r, 0] when c == 0.
    """
    c_arr, rt = _as_curves(curves, round_task)
    mins = min_acc_per_round(c_arr, rt)
    out: list[float] = []
    for r, m in enumerate(mins):
        cur = int(rt[r])
        if m is None:
            out.append(float(c_arr[r, cur]))
        else:
            w = 1.0 / (cur + 1)
            out.append(float(w * c_arr[r, cur] + (1.0 - w) * m))
    return out


# --------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(R: npt.ArrayLike, baseline: npt.ArrayLike,
              reference: npt.ArrayLike | None = None) -> dict[str, float | None]:
    """All end-of-sequence metrics in one dict (nan -> None).

    Keys: "acc", "forgetting", "forgetting_at_task_end", "bwt", "fwt", "learning_accuracy",
    "intransigence" (None without a ``reference``: see :func:`intransigence_per_task`).
    """
    arr = _as_matrix(R)
    base = _as_baseline(baseline, arr.shape[0])
    return {
        "acc": _nan_to_none(average_accuracy(arr)),
        "forgetting": _nan_to_none(forgetting(arr)),
        "forgetting_at_task_end": _nan_to_none(forgetting_at_task_end(arr)),
        "bwt": _nan_to_none(backward_transfer(arr)),
        "fwt": _nan_to_none(forward_transfer(arr, base)),
        "learning_accuracy": _nan_to_none(learning_accuracy(arr)),
        "intransigence": None if reference is None else _nan_to_none(
            intransigence(arr, reference)),
    }
