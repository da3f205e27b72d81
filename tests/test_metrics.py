"""Continual-learning metrics on hand-made accuracy matrices: GEM (ACC, BWT, FWT), the forgetting
measure of Chaudhry et al., plasticity, the paper's relative change, mean and std over seeds, and
Pearson's r of RL's Razor. (The paired comparison of methods: test_paired_comparison.py.)"""
import math

import pytest

from eval_forgetting import mean_std, relative_change, summarize

# columns: task A, task B, task C (trained in this order), probe P
R = [[0.2, 0.1, 0.3, 0.5],    # base
     [0.5, 0.2, 0.3, 0.4],    # after A
     [0.9, 0.8, 0.4, 0.45],   # after B: A keeps improving after its own stage (peak 0.9)
     [0.6, 0.6, 0.9, 0.3]]    # after C
TRAINED = [0, 1, 2]


def test_average_accuracy_is_over_trained_tasks_after_the_last_stage():
    assert summarize(R, TRAINED)["acc"] == pytest.approx((0.6 + 0.6 + 0.9) / 3)


def test_backward_transfer_compares_final_with_just_learnt():
    assert summarize(R, TRAINED)["bwt"] == pytest.approx(((0.6 - 0.5) + (0.6 - 0.8)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy_so_it_differs_from_minus_bwt():
    m = summarize(R, TRAINED)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.6)) / 2)
    assert m["forgetting"] != pytest.approx(-m["bwt"])


def test_forward_transfer_is_before_training_versus_base():
    assert summarize(R, TRAINED)["fwt"] == pytest.approx(((0.2 - 0.1) + (0.4 - 0.3)) / 2)


def test_plasticity_is_what_each_stage_teaches_its_own_task():
    assert summarize(R, TRAINED)["plasticity"] == pytest.approx((0.3 + 0.6 + 0.5) / 3)


def test_training_order_need_not_follow_column_order():
    # train C first, then A: C is learnt at stage 1, A at stage 2
    R2 = [[0.1, 0.0, 0.2], [0.3, 0.0, 0.9], [0.8, 0.0, 0.5]]
    m = summarize(R2, [2, 0])
    assert m["acc"] == pytest.approx((0.8 + 0.5) / 2)
    assert m["bwt"] == pytest.approx(0.5 - 0.9)
    assert m["forgetting"] == pytest.approx(0.9 - 0.5)
    assert m["fwt"] == pytest.approx(0.3 - 0.1)
    assert m["plasticity"] == pytest.approx(((0.9 - 0.2) + (0.8 - 0.3)) / 2)


def test_no_forgetting_when_nothing_is_lost():
    R3 = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    m = summarize(R3, [0, 1])
    assert m["bwt"] == 0 and m["forgetting"] == 0 and m["acc"] == 1


def test_single_task_has_no_transfer_metrics():
    m = summarize([[0.2], [0.6]], [0])
    assert m["acc"] == pytest.approx(0.6) and m["plasticity"] == pytest.approx(0.4)
    assert m["bwt"] is None and m["forgetting"] is None and m["fwt"] is None


def test_relative_change_with_a_zero_base_falls_back_to_points():
    rel, absolute = relative_change([[0.5, 0.0], [0.75, 0.2]])
    assert rel[1] == pytest.approx([50.0, 20.0]) and absolute == [1]


def test_mean_and_sample_std_over_seeds_ignore_missing_values():
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert mean_std([None]) == (None, None)


def test_forgetting_stage_by_stage():
    from eval_forgetting import forgetting_so_far
    assert forgetting_so_far(R, TRAINED, 2) == pytest.approx(0.5 - 0.9)   # A after B: rose
    assert forgetting_so_far(R, TRAINED, 3) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.6)) / 2)


def test_pearson_r_with_a_fisher_interval():
    from eval_forgetting import pearson
    c = pearson([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0])
    assert c["r"] == pytest.approx(0.8)                          # sxy 8 / sqrt(10 * 10)
    half = 1.959964 / (5 - 3) ** 0.5
    assert c["low"] == pytest.approx(math.tanh(math.atanh(0.8) - half))
    assert c["high"] == pytest.approx(math.tanh(math.atanh(0.8) + half))
    assert pearson([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["r"] is None   # too few points


# ---- The verdicts' own metric, pinned: a matrix on which each plausible variant of each metric
# gives another number than the definition (ALGORITHMS.md 5). Columns A, B, C, D trained in this
# order, probe P. A peaks after B (0.75), not at its own stage (0.70) nor at the stage before last
# (0.60); D falls before its stage (negative forward transfer).
PINNED = [[0.10, 0.20, 0.30, 0.40, 0.50],    # base
          [0.70, 0.25, 0.35, 0.30, 0.45],    # after A
          [0.75, 0.80, 0.30, 0.45, 0.40],    # after B
          [0.60, 0.55, 0.90, 0.20, 0.55],    # after C
          [0.40, 0.65, 0.70, 0.85, 0.35]]    # after D
ORDER = [0, 1, 2, 3]


def test_pinned_acc_is_the_final_row_over_the_trained_columns():
    # not with the probe (0.59), not the mean over every row
    assert summarize(PINNED, ORDER)["acc"] == pytest.approx((0.40 + 0.65 + 0.70 + 0.85) / 4)


def test_pinned_bwt_is_final_minus_just_learnt_over_all_but_the_last_task():
    # A -0.30, B -0.15, C -0.20; not against the base (+0.38), not with D's 0 (-0.1625)
    assert summarize(PINNED, ORDER)["bwt"] == pytest.approx((-0.30 - 0.15 - 0.20) / 3)


def test_pinned_forgetting_is_the_best_since_learnt_minus_final():
    """A 0.75 - 0.40, B 0.80 - 0.65, C 0.90 - 0.70: 0.2333. The variants give 0.1000 (the stage
    before last: 0.60, 0.55, 0.90), 0.2167 (minus BWT: the accuracy just learnt) and 0.2333 only
    with the maximum over the rows from the task's own stage to the one before last."""
    m = summarize(PINNED, ORDER)
    assert m["forgetting"] == pytest.approx((0.35 + 0.15 + 0.20) / 3)
    assert m["forgetting"] != pytest.approx(((0.60 - 0.40) + (0.55 - 0.65) + (0.90 - 0.70)) / 3)
    assert m["forgetting"] != pytest.approx(-m["bwt"])


def test_pinned_fwt_is_just_before_training_minus_base():
    # B 0.25 - 0.20, C 0.30 - 0.30, D 0.20 - 0.40: -0.05; after training instead: +0.3833
    assert summarize(PINNED, ORDER)["fwt"] == pytest.approx((0.05 + 0.0 - 0.20) / 3)


def test_pinned_plasticity_is_what_each_stage_adds_to_its_own_task():
    # 0.60, 0.55, 0.60, 0.65 from just before each stage; from the base instead: 0.5625
    assert summarize(PINNED, ORDER)["plasticity"] == pytest.approx((0.60 + 0.55 + 0.60 + 0.65) / 4)


def test_pinned_relative_change_is_against_the_base_row():
    rel, absolute = relative_change(PINNED)
    assert rel[4] == pytest.approx([300.0, 225.0, 100 * 0.40 / 0.30, 112.5, -30.0])
    assert rel[2][0] == pytest.approx(650.0) and absolute == []     # not against the row before
