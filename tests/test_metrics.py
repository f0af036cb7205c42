"""Tests for fedcl.metrics, pinned against hand-computed values."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from fedcl.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forgetting_at_task_end,
    forward_transfer,
    intransigence,
    intransigence_per_task,
    learning_accuracy,
    min_acc_per_round,
    summarize,
    wc_acc_per_round,
)

# --------------------------------------------------------------------------
# Accuracy matrix used throughout (rows: after training task i, cols: task j)
#
#            task0 task1 task2
#   after 0 [ 0.6,  0.1,  0.2 ]
#   after 1 [ 0.8,  0.7,  0.3 ]   <- task0 *improves* while training task1
#   after 2 [ 0.5,  0.5,  0.9 ]
#
# ACC                = (0.5 + 0.5 + 0.9) / 3                 = 1.9/3 = 0.633333
# forgetting (max)   j=0: max(0.6, 0.8) - 0.5 = 0.3
#                    j=1: max(0.1, 0.7) - 0.5 = 0.2          -> mean 0.25
#   (the max for task0 is R[1,0]=0.8, NOT the diagonal R[0,0]=0.6)
# forgetting_at_end  j=0: R[0,0] - R[2,0] = 0.6 - 0.5 = 0.1
#                    j=1: R[1,1] - R[2,1] = 0.7 - 0.5 = 0.2  -> mean 0.15
# BWT                j=0: 0.5 - 0.6 = -0.1
#                    j=1: 0.5 - 0.7 = -0.2                   -> mean -0.15
# FWT (baseline = [0.1, 0.1, 0.25])
#                    j=1: R[0,1] - b[1] = 0.1 - 0.1  = 0.0
#                    j=2: R[1,2] - b[2] = 0.3 - 0.25 = 0.05  -> mean 0.025
# --------------------------------------------------------------------------
R3 = np.array(
    [
        [0.6, 0.1, 0.2],
        [0.8, 0.7, 0.3],
        [0.5, 0.5, 0.9],
    ]
)
B3 = np.array([0.1, 0.1, 0.25])


def test_average_accuracy_3x3() -> None:
    assert average_accuracy(R3) == pytest.approx(1.9 / 3)


def test_forgetting_uses_max_over_earlier_rows() -> None:
    assert forgetting(R3) == pytest.approx(0.25)
    assert forgetting_at_task_end(R3) == pytest.approx(0.15)
    # the two definitions differ exactly because R[1,0] > R[0,0]
    assert forgetting(R3) - forgetting_at_task_end(R3) == pytest.approx(0.1)


def test_forgetting_max_skips_rows_before_task_was_trained() -> None:
    # The max runs over rows l = j..T-2 only: a row before task j was trained says nothing
    # about what was learnt and then lost.
    #   R = [[0.5, 0.9, 0.0],
    #        [0.5, 0.7, 0.0],
    #        [0.4, 0.6, 0.8]]
    # j=0: max(0.5, 0.5) - 0.4 = 0.1
    # j=1: max(0.7) - 0.6 = 0.1  (row 0's 0.9, before task 1 was trained, does not count)
    # forgetting = (0.1 + 0.1) / 2 = 0.1
    # at-task-end: (0.5-0.4) + (0.7-0.6) = 0.2 / 2 = 0.1
    R = [[0.5, 0.9, 0.0], [0.5, 0.7, 0.0], [0.4, 0.6, 0.8]]
    assert forgetting(R) == pytest.approx(0.1)
    assert forgetting_at_task_end(R) == pytest.approx(0.1)


def test_forgetting_on_a_domain_il_matrix_where_the_definitions_differ() -> None:
    # Domain-IL: one head, so a task is well above chance before it is trained (0.70 for
    # task 1 after task 0), and task 1 then learns worse than that (0.65).
    #            task0 task1 task2
    #   after 0 [ 0.90, 0.70, 0.40 ]
    #   after 1 [ 0.93, 0.65, 0.45 ]   <- task 0 still improves while task 1 trains
    #   after 2 [ 0.80, 0.60, 0.95 ]
    # forgetting (standard: best at or after its own training, before the last row)
    #   j=0: max(0.90, 0.93) - 0.80 = 0.13
    #   j=1: max(0.65)       - 0.60 = 0.05           -> mean 0.09
    # forgetting_at_task_end (right after its own training)
    #   j=0: 0.90 - 0.80 = 0.10 ; j=1: 0.65 - 0.60 = 0.05 -> mean 0.075
    # the old reading (best over all earlier rows, untrained ones included) gave
    #   j=1: max(0.70, 0.65) - 0.60 = 0.10, so a mean of 0.115: 0.025 of false forgetting
    R = [[0.90, 0.70, 0.40], [0.93, 0.65, 0.45], [0.80, 0.60, 0.95]]
    assert forgetting(R) == pytest.approx(0.09)
    assert forgetting_at_task_end(R) == pytest.approx(0.075)
    assert summarize(R, [0.1, 0.1, 0.1])["forgetting"] == pytest.approx(0.09)


def test_forgetting_ignores_last_row_and_last_column() -> None:
    # Only rows 0..T-2 enter the max, and only columns j < T-1 are averaged.
    #   R = [[0.4, 0.0],
    #        [1.0, 1.0]]
    # j=0: max(R[0,0]) - R[1,0] = 0.4 - 1.0 = -0.6 (improvement -> negative)
    assert forgetting([[0.4, 0.0], [1.0, 1.0]]) == pytest.approx(-0.6)
    assert forgetting_at_task_end([[0.4, 0.0], [1.0, 1.0]]) == pytest.approx(-0.6)


def test_backward_transfer_3x3() -> None:
    assert backward_transfer(R3) == pytest.approx(-0.15)


def test_forward_transfer_3x3() -> None:
    assert forward_transfer(R3, B3) == pytest.approx(0.025)


def test_2x2_all_metrics() -> None:
    #   R = [[0.9, 0.3],
    #        [0.6, 0.8]],  baseline = [0.5, 0.1]
    # ACC = (0.6 + 0.8)/2 = 0.7
    # forgetting = 0.9 - 0.6 = 0.3 ; at-end = 0.9 - 0.6 = 0.3
    # BWT = 0.6 - 0.9 = -0.3 ; FWT = R[0,1] - b[1] = 0.3 - 0.1 = 0.2
    R = [[0.9, 0.3], [0.6, 0.8]]
    assert average_accuracy(R) == pytest.approx(0.7)
    assert forgetting(R) == pytest.approx(0.3)
    assert forgetting_at_task_end(R) == pytest.approx(0.3)
    assert backward_transfer(R) == pytest.approx(-0.3)
    assert forward_transfer(R, [0.5, 0.1]) == pytest.approx(0.2)


def test_single_task_edge_cases() -> None:
    R = [[0.7]]
    assert average_accuracy(R) == pytest.approx(0.7)
    assert math.isnan(forgetting(R))
    assert math.isnan(forgetting_at_task_end(R))
    assert math.isnan(backward_transfer(R))
    assert math.isnan(forward_transfer(R, [0.1]))
    assert summarize(R, [0.1]) == {
        "acc": pytest.approx(0.7),
        "forgetting": None,
        "forgetting_at_task_end": None,
        "bwt": None,
        "fwt": None,
        "learning_accuracy": pytest.approx(0.7),
        "intransigence": None,
    }


def test_summarize_3x3() -> None:
    out = summarize(R3, B3)
    assert set(out) == {"acc", "forgetting", "forgetting_at_task_end", "bwt", "fwt",
                        "learning_accuracy", "intransigence"}
    assert out["acc"] == pytest.approx(1.9 / 3)
    assert out["forgetting"] == pytest.approx(0.25)
    assert out["forgetting_at_task_end"] == pytest.approx(0.15)
    assert out["bwt"] == pytest.approx(-0.15)
    assert out["fwt"] == pytest.approx(0.025)
    assert out["learning_accuracy"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert out["intransigence"] is None  # no reference given
    assert all(type(v) is float for k, v in out.items() if k != "intransigence")


def test_learning_accuracy_and_intransigence_by_hand() -> None:
    # Chaudhry et al.'s intransigence against a jointly trained reference A*, Riemer et al.'s
    # learning accuracy (the cells above the diagonal do not enter either):
    #   R  = [[0.90, 0.10, 0.10],
    #         [0.70, 0.80, 0.10],
    #         [0.60, 0.65, 0.85]],   A* = (0.95, 0.90, 0.92)
    # ACC = (0.60 + 0.65 + 0.85)/3 = 0.700 ; LA = (0.90 + 0.80 + 0.85)/3 = 0.850
    # FGT = (max(0.90, 0.70) - 0.60 + 0.80 - 0.65)/2 = 0.225
    # I = (0.95 - 0.90, 0.90 - 0.80, 0.92 - 0.85) = (0.05, 0.10, 0.07), mean 0.0733
    R = [[0.90, 0.10, 0.10], [0.70, 0.80, 0.10], [0.60, 0.65, 0.85]]
    ref = [0.95, 0.90, 0.92]
    assert average_accuracy(R) == pytest.approx(0.700)
    assert learning_accuracy(R) == pytest.approx(0.850)
    assert forgetting(R) == pytest.approx(0.225)
    assert intransigence_per_task(R, ref) == pytest.approx([0.05, 0.10, 0.07])
    assert intransigence(R, ref) == pytest.approx(0.22 / 3)
    out = summarize(R, [0.1, 0.1, 0.1], ref)
    assert out["learning_accuracy"] == pytest.approx(0.850)
    assert out["intransigence"] == pytest.approx(0.22 / 3)
    with pytest.raises(ValueError, match="length T=3"):
        intransigence(R, [0.9, 0.9])


def test_a_learner_that_stops_learning_shows_no_forgetting_but_low_plasticity() -> None:
    # Only task 0 is ever learnt (class-IL, 1 of 2 classes per task seen): forgetting 0 says
    # nothing; learning accuracy and intransigence show it
    R = [[0.99, 0.0, 0.0], [0.99, 0.0, 0.0], [0.99, 0.0, 0.0]]
    assert forgetting(R) == 0.0
    assert learning_accuracy(R) == pytest.approx(0.33)
    assert intransigence(R, [0.99, 0.95, 0.93]) == pytest.approx((0.95 + 0.93) / 3)


# --------------------------------------------------------------------------
# Stability gap.  3 tasks, 7 rounds:
#
#   r  task  curves[r] (task0, task1, task2)
#   0   0    [0.5,  0.0, 0.0 ]
#   1   0    [0.8,  0.1, 0.0 ]
#   2   1    [0.4,  0.2, 0.1 ]   task0 dips to 0.4 (stability gap)
#   3   1    [0.6,  0.6, 0.1 ]   task0 recovers
#   4   1    [0.7,  0.8, 0.2 ]
#   5   2    [0.2,  0.5, 0.7 ]   task0 dips lower (0.2); task1's training ended
#   6   2    [0.65, 0.6, 0.85]   both recover
#
# min-ACC (only rounds s with round_task[s] > k count for task k):
#   r0, r1: c=0 -> None
#   r2: task0 min{0.4}              = 0.4           -> 0.4
#   r3: task0 min{0.4, 0.6}         = 0.4 (dip kept) -> 0.4
#   r4: task0 min{0.4, 0.6, 0.7}    = 0.4           -> 0.4
#   r5: task0 min{.., 0.2} = 0.2; task1 min{0.5} = 0.5
#       (task1's 0.1/0.2/0.6/0.8 from rounds 1-4 do NOT count)  -> 0.35
#   r6: task0 min = 0.2; task1 min{0.5, 0.6} = 0.5              -> 0.35
#
# WC-ACC = 1/(c+1) * curves[r, c] + (1 - 1/(c+1)) * min-ACC:
#   r0: c=0 -> curves[0,0] = 0.5
#   r1: c=0 -> curves[1,0] = 0.8
#   r2: 1/2*0.2 + 1/2*0.4  = 0.3
#   r3: 1/2*0.6 + 1/2*0.4  = 0.5
#   r4: 1/2*0.8 + 1/2*0.4  = 0.6
#   r5: 1/3*0.7 + 2/3*0.35 = (0.7 + 0.7)/3  = 1.4/3
#   r6: 1/3*0.85 + 2/3*0.35 = (0.85 + 0.7)/3 = 1.55/3
# --------------------------------------------------------------------------
CURVES = np.array(
    [
        [0.5, 0.0, 0.0],
        [0.8, 0.1, 0.0],
        [0.4, 0.2, 0.1],
        [0.6, 0.6, 0.1],
        [0.7, 0.8, 0.2],
        [0.2, 0.5, 0.7],
        [0.65, 0.6, 0.85],
    ]
)
ROUND_TASK = [0, 0, 1, 1, 1, 2, 2]


def test_min_acc_keeps_dip_after_recovery() -> None:
    out = min_acc_per_round(CURVES, ROUND_TASK)
    assert out[:2] == [None, None]
    assert out[2:] == pytest.approx([0.4, 0.4, 0.4, 0.35, 0.35])
    assert len(out) == 7


def test_wc_acc_per_round() -> None:
    out = wc_acc_per_round(CURVES, ROUND_TASK)
    assert out == pytest.approx([0.5, 0.8, 0.3, 0.5, 0.6, 1.4 / 3, 1.55 / 3])


def test_wc_acc_on_task0_only_equals_current_accuracy() -> None:
    curves = [[0.3, 0.0], [0.55, 0.1], [0.9, 0.2]]
    rt = [0, 0, 0]
    assert min_acc_per_round(curves, rt) == [None, None, None]
    assert wc_acc_per_round(curves, rt) == pytest.approx([0.3, 0.55, 0.9])


def test_stability_gap_when_a_task_is_skipped() -> None:
    # round_task jumps 0 -> 2; task1 was never trained but its "training ended"
    # at round 1 (round_task[1] = 2 > 1), so it counts as an old task.
    #   r0 (c=0): [0.9, 0.1, 0.0] -> min None, wc 0.9
    #   r1 (c=2): [0.6, 0.2, 0.7] -> min (0.6 + 0.2)/2 = 0.4
    #             wc = 1/3*0.7 + 2/3*0.4 = (0.7 + 0.8)/3 = 0.5
    curves = [[0.9, 0.1, 0.0], [0.6, 0.2, 0.7]]
    rt = [0, 2]
    assert min_acc_per_round(curves, rt) == [None, pytest.approx(0.4)]
    assert wc_acc_per_round(curves, rt) == pytest.approx([0.9, 0.5])


def test_stability_gap_empty_rounds() -> None:
    assert min_acc_per_round(np.zeros((0, 3)), []) == []
    assert wc_acc_per_round(np.zeros((0, 3)), []) == []


# --------------------------------------------------------------------------
# Purity: inputs are never mutated
# --------------------------------------------------------------------------


def test_inputs_are_not_mutated() -> None:
    R = R3.copy()
    B = B3.copy()
    C = CURVES.copy()
    rt = np.array(ROUND_TASK)
    rt_copy = rt.copy()
    rt_list = list(ROUND_TASK)

    average_accuracy(R)
    forgetting(R)
    forgetting_at_task_end(R)
    backward_transfer(R)
    forward_transfer(R, B)
    summarize(R, B)
    min_acc_per_round(C, rt)
    wc_acc_per_round(C, rt)
    min_acc_per_round(C, rt_list)

    np.testing.assert_array_equal(R, R3)
    np.testing.assert_array_equal(B, B3)
    np.testing.assert_array_equal(C, CURVES)
    np.testing.assert_array_equal(rt, rt_copy)
    assert rt_list == ROUND_TASK


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def test_non_square_matrix_raises() -> None:
    msg = "R must be a square T x T matrix, got shape (2, 3)"
    for fn in (average_accuracy, forgetting, forgetting_at_task_end, backward_transfer):
        with pytest.raises(ValueError, match=re.escape(msg)):
            fn(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=re.escape(msg)):
        forward_transfer(np.zeros((2, 3)), [0.0, 0.0])
    with pytest.raises(ValueError, match=re.escape(msg)):
        summarize(np.zeros((2, 3)), [0.0, 0.0])


def test_one_dimensional_matrix_raises() -> None:
    with pytest.raises(
        ValueError, match=re.escape("R must be a square T x T matrix, got shape (3,)")
    ):
        average_accuracy([0.1, 0.2, 0.3])


def test_empty_matrix_raises() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("R must contain at least one task (T >= 1), got T=0"),
    ):
        average_accuracy(np.zeros((0, 0)))


def test_values_outside_unit_interval_raise() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "R values must lie in [0, 1] (accuracy fractions), got min=0, max=85"
        ),
    ):
        average_accuracy([[85.0, 0.0], [0.0, 0.0]])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "R values must lie in [0, 1] (accuracy fractions), got min=-0.1"
        ),
    ):
        forgetting([[0.5, 0.0], [-0.1, 0.2]])


def test_nan_in_matrix_raises() -> None:
    with pytest.raises(
        ValueError, match=re.escape("R must contain only finite values (no nan/inf)")
    ):
        backward_transfer([[0.5, math.nan], [0.1, 0.2]])


def test_baseline_wrong_length_raises() -> None:
    msg = "baseline must be a 1-D array of length T=3 (one entry per task), got shape (2,)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        forward_transfer(R3, [0.1, 0.1])
    with pytest.raises(ValueError, match=re.escape(msg)):
        summarize(R3, [0.1, 0.1])


def test_baseline_out_of_range_raises() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "baseline values must lie in [0, 1] (accuracy fractions), got min=0.1, max=10"
        ),
    ):
        forward_transfer(R3, [0.1, 10.0, 0.2])


def test_curves_round_task_length_mismatch_raises() -> None:
    msg = "round_task has length 6 but curves has 7 rounds; they must match"
    with pytest.raises(ValueError, match=re.escape(msg)):
        min_acc_per_round(CURVES, ROUND_TASK[:-1])
    with pytest.raises(ValueError, match=re.escape(msg)):
        wc_acc_per_round(CURVES, ROUND_TASK[:-1])


def test_decreasing_round_task_raises() -> None:
    msg = "round_task must be non-decreasing, but round_task[3]=0 < round_task[2]=1"
    rt = [0, 0, 1, 0, 1, 2, 2]
    with pytest.raises(ValueError, match=re.escape(msg)):
        min_acc_per_round(CURVES, rt)
    with pytest.raises(ValueError, match=re.escape(msg)):
        wc_acc_per_round(CURVES, rt)


def test_round_task_out_of_range_raises() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "round_task values must lie in [0, 2] (curves has 3 tasks), got min=0, max=3"
        ),
    ):
        min_acc_per_round(CURVES, [0, 0, 1, 1, 1, 2, 3])


def test_round_task_non_integer_raises() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "round_task must contain integer task indices, got dtype float64"
        ),
    ):
        min_acc_per_round(CURVES, [0, 0, 0.5, 1, 1, 2, 2])


def test_curves_not_2d_raises() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("curves must be a 2-D (rounds x tasks) array, got shape (3,)"),
    ):
        min_acc_per_round([0.1, 0.2, 0.3], [0, 0, 0])


def test_curves_out_of_range_raises() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "curves values must lie in [0, 1] (accuracy fractions), got min=0, max=1.5"
        ),
    ):
        wc_acc_per_round([[1.5, 0.0]], [0])


def test_round_task_integral_floats_are_accepted() -> None:
    # [0.0, 1.0] is treated as [0, 1]:
    #   r1 (c=1): min-ACC = curves[1,0] = 0.3 ; WC = 1/2*0.9 + 1/2*0.3 = 0.6
    curves = [[0.8, 0.1], [0.3, 0.9]]
    assert min_acc_per_round(curves, [0.0, 1.0]) == [None, pytest.approx(0.3)]
    assert wc_acc_per_round(curves, np.array([0.0, 1.0])) == pytest.approx([0.8, 0.6])
