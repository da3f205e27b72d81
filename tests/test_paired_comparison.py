"""The paired comparison behind every verdict of the report: method minus baseline on the seeds
both finished, with a 95% Student-t interval, on hand-made results; the OOD column; and the t
quantile at each number of degrees of freedom, against an independent integration of the t
density."""
import math

import pytest

from eval_forgetting import (T_80, detectable_difference, method_values, paired_difference,
                             paired_rows, paired_table, t_quantile, verdict)


def run(R, response_kl=0.0):
    """One run (a method, a seed) as results.json holds it: its accuracy matrix, and records of
    which only the last stage's measures are read."""
    last = {"param_drift": {"overall": 0.01, "subspace_angle": 2.0}, "response_kl": response_kl,
            "response_similarity": 90.0, "artifacts": {"repetition_frac": 0.0}}
    return {"R": R, "records": [{}] * (len(R) - 1) + [last]}


def two_stage_run(forgetting, ood):
    """Tasks A, B (trained in this order) and probe P: A learnt to 0.6 at stage 1, then forgets
    `forgetting` at stage 2; the probe moves by `ood` from its base 0.5.
    ACC = (0.6 - forgetting + 0.7) / 2."""
    return run([[0.2, 0.2, 0.5], [0.6, 0.2, 0.5], [0.6 - forgetting, 0.7, 0.5 + ood]])


# grpo finished seeds 0, 1, 2 (3 unfinished); sdpo finished 2, 1, 3, listed out of order.
# The seeds both finished are 1 and 2: forgetting sdpo - grpo = 0.3 - 0.1 and 0.4 - 0.0.
RESULTS = {"tasks": ["A", "B", "P"], "trained": [0, 1], "runs": {
    "grpo": {"0": two_stage_run(0.1, 0.3), "1": two_stage_run(0.1, 0.0),
             "2": two_stage_run(0.0, 0.1), "3": run([[0.2, 0.2, 0.5], [0.6, 0.2, 0.5]])},
    "sdpo": {"2": two_stage_run(0.4, -0.1), "1": two_stage_run(0.3, -0.2),
             "3": two_stage_run(0.9, 0.0)}}}
T_1 = 12.706                                   # t(0.975) with 1 degree of freedom (2 pairs)


def test_a_paired_difference_is_the_mean_of_a_minus_b_with_a_t_interval():
    d = paired_difference([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])      # differences 1, 2, 3: sd 1
    half = 4.303 * 1.0 / math.sqrt(3)                            # t(0.975, 2) * sd / sqrt(n)
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0)
    assert (d["low"], d["high"]) == pytest.approx((2.0 - half, 2.0 + half))


def test_a_paired_difference_is_negative_when_a_is_lower():
    d = paired_difference([1.0, 2.0], [2.0, 4.0])                # differences -1, -2
    assert d["mean"] == pytest.approx(-1.5) and d["high"] == pytest.approx(
        -1.5 + T_1 * math.sqrt(0.5) / math.sqrt(2))


def test_a_paired_difference_skips_pairs_with_a_missing_value():
    d = paired_difference([1.0, None, 5.0], [0.0, 2.0, None])
    assert d == {"n": 1, "mean": 1.0, "low": None, "high": None,   # one pair: no interval
                 "detectable": None}
    assert paired_difference([None], [1.0])["n"] == 0


def test_the_verdict_is_beyond_noise_only_when_the_interval_excludes_zero():
    # differences 0.01, 0.02, 0.03: an interval holding 0, read with what 3 seeds could detect
    assert verdict(paired_difference([0.03, 0.05, 0.07], [0.02, 0.03, 0.04])) == (
        "not detected (would detect >= 3.1 points)")
    assert verdict(paired_difference([5.0, 6.0, 7.0], [1.0, 1.0, 1.0])) == "beyond noise"
    assert verdict(paired_difference([1.0, 1.0, 1.0], [5.0, 6.0, 7.0])) == "beyond noise"
    assert verdict(paired_difference([1.0], [0.0])) == "one seed, no interval"


def test_the_detectable_difference_at_80_percent_power_by_hand():
    """(t(0.975, n-1) + t(0.8, n-1)) sd / sqrt(n): 3 seeds, sd 1 -> (4.303 + 1.061) / sqrt(3)
    = 3.097; 5 seeds, sd 2 -> (2.776 + 0.941) 2 / sqrt(5) = 3.325; one seed: none."""
    assert detectable_difference(1.0, 3) == pytest.approx((4.303 + 1.061) / math.sqrt(3))
    assert detectable_difference(2.0, 5) == pytest.approx((2.776 + 0.941) * 2 / math.sqrt(5))
    assert detectable_difference(1.0, 1) is None
    d = paired_difference([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])           # differences 1, 2, 3
    assert d["detectable"] == pytest.approx(3.0969, abs=1e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 10, 30, 120])
def test_the_80_percent_t_quantile_leaves_20_percent_above_it(df):
    q = t_quantile(df, T_80)
    assert 0.5 + t_coverage(q, df) / 2 == pytest.approx(0.80, abs=2e-4)


def test_paired_rows_are_method_minus_baseline_on_the_seeds_both_finished():
    rows = paired_rows(RESULTS, "grpo")
    assert set(rows) == {"sdpo"}                                  # the baseline is not paired
    forgetting = rows["sdpo"]["forgetting"]                       # differences 0.2 and 0.4
    sd = math.sqrt(((0.2 - 0.3) ** 2 + (0.4 - 0.3) ** 2) / 1)
    assert forgetting["n"] == 2 and forgetting["mean"] == pytest.approx(0.3)
    assert forgetting["low"] == pytest.approx(0.3 - T_1 * sd / math.sqrt(2))
    acc = rows["sdpo"]["acc"]                                     # ACC falls by half of it
    assert acc["mean"] == pytest.approx(-0.15)
    assert rows["sdpo"]["bwt"]["mean"] == pytest.approx(-0.3)


def test_paired_rows_against_the_other_method_flip_the_sign():
    assert paired_rows(RESULTS, "sdpo")["grpo"]["forgetting"]["mean"] == pytest.approx(-0.3)


def test_the_ood_column_is_the_probes_final_minus_base_accuracy():
    # probe deltas sdpo - grpo on seeds 1 and 2: (-0.2 - 0.0) and (-0.1 - 0.1)
    ood = paired_rows(RESULTS, "grpo")["sdpo"]["ood"]
    assert (ood["mean"], ood["low"], ood["high"]) == pytest.approx((-0.2, -0.2, -0.2))


def test_method_values_ood_averages_the_probe_columns_only():
    # columns A, P1, B, P2; A and B trained (A first); P1 falls 0.2, P2 rises 0.1
    R = [[0.1, 0.5, 0.2, 0.4], [0.9, 0.6, 0.2, 0.4], [0.3, 0.3, 0.8, 0.5]]
    results = {"tasks": ["A", "P1", "B", "P2"], "trained": [0, 2]}
    values = method_values(results, run(R, response_kl=0.25))
    assert values["ood"] == pytest.approx((-0.2 + 0.1) / 2)
    assert values["forgetting"] == pytest.approx(0.9 - 0.3)
    assert values["response_kl"] == 0.25
    assert method_values({"tasks": ["A", "B"], "trained": [0, 1]},
                         run([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]))["ood"] is None


def test_the_paired_table_prints_signed_points_and_says_which_way():
    text = paired_table(RESULTS, "grpo")
    row = next(line for line in text.splitlines() if line.startswith("| sdpo |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    half = 100 * T_1 * math.sqrt(0.02) / math.sqrt(2)            # forgetting's half width
    assert cells[:2] == ["sdpo", "2"]
    detects = 100 * (12.706 + 1.376) * math.sqrt(0.02) / math.sqrt(2)   # 2 seeds, sd 0.141
    assert cells[3] == (f"+30.0 [{30.0 - half:+.1f}, {30.0 + half:+.1f}] "
                        f"(detects {detects:.1f})")                           # Forgetting
    assert cells[6] == "-20.0 [-20.0, -20.0] (detects 0.0)"                 # OOD
    assert (f"sdpo forgets 30.0 points more than grpo (not detected (would detect >= "
            f"{detects:.1f} points)) and ends with an ACC 15.0 points lower (not detected") in text


def t_coverage(q, df, steps=4000):
    """P(|T| <= q) for Student's t with df degrees of freedom: Simpson's rule on the density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = q / steps
    area = f(0) + f(q) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 2 * area * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 30, 60, 120])
def test_the_t_quantile_of_a_tabled_df_covers_95_percent(df):
    assert t_coverage(t_quantile(df), df) == pytest.approx(0.95, abs=2e-4)


@pytest.mark.parametrize("df", [11, 13, 14, 16, 19, 25, 40, 59, 100, 119, 500])
def test_between_tabled_dfs_the_interval_is_never_narrower_than_95_percent(df):
    q = t_quantile(df)
    assert 0.95 <= t_coverage(q, df) <= 0.96 and q > 1.959964
