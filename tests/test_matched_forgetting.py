"""Forgetting at matched in-domain gain: a method that learns the new stage more may forget the
old one more; reading each run's forgetting where its own gain reaches the same g* tells "forgets
less" from "learned less". Hand-made runs with learning curves."""
import pytest

import eval_forgetting as ef


def run(curve_gain, curve_drop, end_gain, end_drop):
    """Tasks A, B trained in order. A learnt to 0.9 at stage 1; during stage 2 B gains
    `curve_gain` by the curve point (A has dropped `curve_drop` there) and `end_gain` by the end
    (A dropped `end_drop`)."""
    start = [0.9, 0.2]
    curve = {"step": 5, "accuracy": {"A": 0.9 - curve_drop, "B": 0.2 + curve_gain}}
    return {"R": [[0.3, 0.2], start, [0.9 - end_drop, 0.2 + end_gain]],
            "records": [{}, {}, {"curve": [curve]}]}


RESULTS = {"tasks": ["A", "B"], "trained": [0, 1], "runs": {
    "grpo": {"0": run(0.10, 0.05, 0.20, 0.10), "1": run(0.10, 0.05, 0.20, 0.12)},
    "sdpo": {"0": run(0.20, 0.05, 0.40, 0.40), "1": run(0.20, 0.07, 0.40, 0.40)}}}


def test_the_path_is_gain_against_the_earlier_tasks_drop():
    path = ef.forgetting_path(RESULTS, RESULTS["runs"]["sdpo"]["0"], 2)
    assert [x for point in path for x in point] == pytest.approx([0, 0, 0.2, 0.05, 0.4, 0.4])


def test_at_matched_gain_a_method_that_learned_more_may_forget_no_more():
    """g* = 0.20, grpo's final gain: grpo reads its end (drops 0.10, 0.12); sdpo reaches 0.20 at
    its curve point (drops 0.05, 0.07), though at its end it forgot 0.40: at matched gain it
    forgets 5 points less (differences -0.05, -0.05)."""
    table = ef.matched_forgetting_table(RESULTS, "grpo")
    assert "| 2 B | 20.0 | grpo | +11.0 |  |" in table
    sdpo = next(line for line in table.splitlines() if "| sdpo |" in line)
    assert sdpo.startswith("| 2 B | 20.0 | sdpo | +6.0 | -5.0 [-5.0, -5.0]")


def test_a_stage_without_curves_reads_the_line_between_its_ends():
    no_curve = {"R": [[0.3, 0.2], [0.9, 0.2], [0.5, 0.6]], "records": [{}, {}, {}]}
    path = ef.forgetting_path(RESULTS, no_curve, 2)
    assert [x for point in path for x in point] == pytest.approx([0, 0, 0.4, 0.4])
    assert ef.at_gain([(g, {"drop": d}) for g, d in path], 0.2, "drop") == pytest.approx(0.2)
