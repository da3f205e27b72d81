"""The distance between a training set and an evaluation set, as the paper measures it: the MMD
with an RBF kernel, 0 for a set against itself and growing as the two sets part."""
import math

import pytest
import torch

import eval_forgetting as ef
from harness import lab_families, measures


def test_mmd_of_a_set_with_itself_is_zero():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    assert measures.mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)


def test_mmd_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=gen), torch.randn(50, 4, generator=gen)
    shifts = [measures.mmd_rbf(x, y + d, bandwidth=2.0) for d in (0.0, 0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts) and shifts[0] < 0.05 < shifts[-1]


def test_mmd_by_hand_for_two_points():
    # k(a, a) = 1, k(a, b) = exp(-|a - b|^2 / 2) at h = 1: MMD^2 = 1 + 1 - 2 exp(-1/2)
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    assert measures.mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(2 - 2 * math.exp(-0.5), abs=1e-12)


def test_one_bandwidth_makes_the_distances_of_a_ladder_compare(shipped_lab):
    """task_distances on the shipped base: a set against its own family's other split is nearer
    than against another family, and the probe of math's content lies between math and tool."""
    from harness import lab
    model, tok = shipped_lab
    tasks = {n: lab.make_lab_task(n, n_train=30, n_test=30)
             for n in ("math", "math_words", "tool")}
    d = measures.task_distances(model, tok, [tasks["math"]], list(tasks.values()), n=30)["math"]
    assert d["math"] < d["math_words"] < d["tool"]


def pairs_with(changes):
    """ood_pairs' rows for one trained task 'a' and six evaluated sets at distances 1..6, with
    the change of each over two seeds."""
    return [("a", "a", 0.0, {"0": 0.5, "1": 0.5})] + [
        ("a", f"e{d}", float(d), {"0": c, "1": c + 0.02}) for d, c in zip(range(1, 7), changes)]


def test_the_paper_floors_gain_and_forgetting_at_zero_each_in_its_panel():
    pairs = pairs_with([0.1, -0.3, 0.0, 0.0, 0.0, 0.0])
    gain, forgetting = ef.floored(pairs, +1), ef.floored(pairs, -1)
    assert gain[1][3] == pytest.approx({"0": 0.1, "1": 0.12})
    assert forgetting[1][3] == {"0": 0.0, "1": 0.0}              # a gain is no forgetting
    assert forgetting[2][3] == pytest.approx({"0": 0.3, "1": 0.28})
    assert gain[2][3] == {"0": 0.0, "1": 0.0}


def test_a_peak_is_forgetting_at_intermediate_distance_above_both_near_and_far():
    """Floored forgetting per seed (the near tercile's gains count 0, not below it): near 0,
    intermediate 0.3 and 0.28, far 0 and 0 -> a peak of 0.29 above both."""
    got = ef.ood_peak(ef.floored(pairs_with([0.1, 0.1, -0.3, -0.3, 0.0, 0.0]), -1))
    assert [round(f, 3) for _, _, f in got["bins"].values()] == [0.0, 0.29, 0.0]
    assert got["above_near"]["mean"] == pytest.approx(0.29) and got["above_near"]["low"] > 0
    assert got["above_far"]["mean"] == pytest.approx(0.29) and got["above_far"]["low"] > 0


def test_forgetting_that_grows_with_distance_is_no_peak():
    got = ef.ood_peak(ef.floored(pairs_with([0.0, 0.0, -0.1, -0.1, -0.3, -0.3]), -1))
    assert got["above_near"]["mean"] > 0 and got["above_far"]["mean"] < 0
    assert ef.peak_reading(got["above_near"], got["above_far"]) == "no"


def test_the_relative_change_is_in_units_of_the_base_accuracy_of_the_set():
    """The paper's unit: a set at 0.4 in the base falling from 0.5 to 0.4 loses 25% (0.1 / 0.4);
    a set at 0 in the base is read in points (0 -> 0.3: +0.3)."""
    results = {"tasks": ["a", "b"], "trained": [0], "runs": {"m": {"0": {
        "R": [[0.2, 0.4], [0.6, 0.3]]}}}}
    distances = {"a": {"a": 0.0, "b": 0.3}}
    got = {b: c["0"] for _, b, _, c in ef.ood_pairs(results, distances, "m", relative=True)}
    assert got == pytest.approx({"a": 2.0, "b": -0.25})
    results["runs"]["m"]["0"]["R"][0][1] = 0.0
    assert ef.ood_pairs(results, distances, "m", relative=True)[1][3]["0"] == pytest.approx(0.3)


def test_the_quadratic_fit_recovers_a_parabola_with_a_band_that_holds_it():
    xs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    ys = [2 + 10 * x - 20 * x * x for x in xs]                          # exact: no noise
    fit, low, high = ef.quadratic_fit(xs, ys, [0.25])
    assert fit[0] == pytest.approx(2 + 2.5 - 1.25) and high[0] - low[0] == pytest.approx(0, abs=1e-6)
    noisy = [y + (0.3 if i % 2 else -0.3) for i, y in enumerate(ys)]
    fit, low, high = ef.quadratic_fit(xs, noisy, [0.25])
    assert low[0] < 2 + 2.5 - 1.25 < high[0] and high[0] - low[0] > 0.1


def test_the_pairs_are_each_sets_change_during_each_stage():
    results = {"tasks": ["a", "b", "p"], "trained": [0, 1], "runs": {"m": {"0": {
        "R": [[0.1, 0.2, 0.3], [0.6, 0.1, 0.2], [0.5, 0.7, 0.4]]}}}}
    distances = {"a": {"a": 0.0, "b": 0.5, "p": 0.2}, "b": {"a": 0.5, "b": 0.0, "p": 0.4}}
    got = {(a, b): (d, round(c["0"], 6)) for a, b, d, c in ef.ood_pairs(results, distances, "m")}
    assert got[("a", "a")] == (0.0, 0.5) and got[("a", "p")] == (0.2, -0.1)
    assert got[("b", "a")] == (0.5, -0.1) and got[("b", "p")] == (0.4, 0.2)


@pytest.mark.parametrize("trained, evaluated, shares", [
    ("math", "math_words", "both"),          # math asked in words, answered in \boxed{}
    ("math", "mcq_math", "content"),         # math's sums in science's <answer> tags
    ("science", "mcq_math", "format"),
    ("code", "math_fenced", "format"),       # math's sums in code's fence
    ("math", "math_fenced", "content"),
    ("tool", "math_fenced", "neither"),
    ("math", "gsm8k", None),                 # outside the lab: no relation
])
def test_the_ladder_relates_each_set_to_a_trained_family(trained, evaluated, shares):
    assert lab_families.relation(trained, evaluated) == shares


def test_forgetting_by_relation_averages_the_pairs_of_each_relation_per_seed():
    pairs = [("math", "math", 0.0, {"0": 0.5, "1": 0.4}),            # itself: left out
             ("math", "math_words", 0.1, {"0": 0.3, "1": 0.2}),       # both
             ("math", "mcq_math", 0.2, {"0": -0.1, "1": 0.0}),        # content
             ("math", "math_fenced", 0.2, {"0": -0.3, "1": -0.2}),    # content
             ("math", "tool", 0.6, {"0": 0.0, "1": 0.1})]             # neither
    results = {"relations": {"math": {b: lab_families.relation("math", b)
                                      for b in ("math", "math_words", "mcq_math", "math_fenced",
                                                "tool")}}}
    got = ef.forgetting_by_relation(results, pairs)
    assert set(got) == {"both", "content", "neither"}
    assert got["both"] == pytest.approx({"0": -0.3, "1": -0.2})
    assert got["content"] == pytest.approx({"0": 0.2, "1": 0.1})
    assert got["neither"] == pytest.approx({"0": 0.0, "1": -0.1})


def test_methods_are_compared_per_relation_on_the_seeds_both_finished():
    """sdpo finished seeds 0 and 2 only: its seed 2 pairs with grpo's seed 2, not its seed 1."""
    run = lambda change: {"R": [[0.5, 0.5], [0.5 + change, 0.5]]}           # noqa: E731
    results = {"tasks": ["math", "tool"], "trained": [1], "runs": {
        "grpo": {"0": run(-0.1), "1": run(-0.5), "2": run(-0.2)},
        "sdpo": {"0": run(-0.2), "2": run(-0.4), "1": {"R": [[0.5, 0.5]]}}}}
    distances = {"tool": {"math": 0.8, "tool": 0.0}}
    results["relations"] = {"tool": {"math": "neither", "tool": "both"}}
    table = ef.relation_table(results, distances, "grpo")
    assert "| sdpo − grpo | +15.0 [" in table                        # (10 + 20) / 2 points


def test_a_run_embeds_its_sets_with_the_embedding_model_it_is_given(tmp_path):
    """--embedding-model: any transformers encoder (here a tiny BERT with the lab's tokenizer)
    embeds the sets for the distances, once per run; the results say which model it was."""
    import json

    import run_sequence
    from conftest import tiny_argv
    from harness import lab
    from transformers import BertConfig, BertModel
    tok = lab.build_lab_tokenizer("lab-short")
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32))
    encoder.save_pretrained(tmp_path / "encoder")
    tok.save_pretrained(tmp_path / "encoder")
    results = run_sequence.main(tiny_argv(probes="code") + [
        "--out", str(tmp_path), "--embedding-model", str(tmp_path / "encoder")])
    distances = json.loads((tmp_path / "quick" / "distances.json").read_text())
    assert set(distances) == {"math"} and set(distances["math"]) == {"math", "code"}
    assert distances["math"]["math"] < distances["math"]["code"]
    assert results["distances_from"] == str(tmp_path / "encoder")
    assert results["distances"] == distances
