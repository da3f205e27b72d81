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
