"""The paper's four parameter measures (NSS, the largest principal angle, principal-mask overlap
and update), each on a matrix moved in a known way: 0 or 1 at no change, the value worked out
by hand for a rotation, a rescaling, or a change of chosen entries."""
import math

import pytest
import torch

import eval_forgetting as ef
from harness import measures


def rotation(degrees):
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))


def test_nss_is_zero_for_a_rotation_and_the_relative_change_of_a_rescaling():
    assert measures.normalised_spectral_shift(W0, rotation(40) @ W0) == pytest.approx(0.0, abs=1e-12)
    assert measures.normalised_spectral_shift(W0, 1.1 * W0) == pytest.approx(0.1, abs=1e-12)
    # one singular value from 1 to 2: ||(0, 0, 1)|| / ||(3, 2, 1)||
    moved = torch.diag(torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64))
    assert measures.normalised_spectral_shift(W0, moved) == pytest.approx(1 / math.sqrt(14), abs=1e-12)


def turn(degrees):
    """A rotation by `degrees` about e1: it moves e2 toward e3."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)


def test_the_largest_principal_angle_is_the_rotation_of_the_top_directions():
    # the top-2 left singular subspace (e1, e2) turned by 25 degrees about e1: angles 0 and 25
    assert measures.max_principal_angle(W0, turn(25) @ W0, k=2) == pytest.approx(25.0, abs=1e-6)
    assert measures.subspace_angle(W0, turn(25) @ W0, fraction=2 / 3) == pytest.approx(
        12.5, abs=1e-6)
    assert measures.max_principal_angle(W0, 2.0 * W0, k=2) == pytest.approx(0.0, abs=1e-6)


def test_the_largest_principal_angle_reads_the_right_singular_vectors_too():
    """W0 R^T turns the directions W0 reads from (V) by 30 degrees and leaves those it writes to
    (U): the left angles are all 0, the right ones 0 and 30; the measure takes the largest of
    both, as the restatement defines it. A left-only angle (this project's mean) sees nothing."""
    moved = W0 @ turn(30).T
    assert measures.principal_angles(W0, moved, 2, "left").max().item() == pytest.approx(
        0.0, abs=1e-6)
    assert measures.principal_angles(W0, moved, 2, "right").max().item() == pytest.approx(
        30.0, abs=1e-6)
    assert measures.max_principal_angle(W0, moved, k=2) == pytest.approx(30.0, abs=1e-6)
    assert measures.subspace_angle(W0, moved, fraction=2 / 3) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("shape, k", [((2560, 9728), 512), ((576, 1536), 512),
                                      ((96, 256), 9), ((96, 96), 9), ((4, 4), 1)])
def test_k_is_the_sources_512_where_the_matrix_is_larger_and_a_tenth_of_it_below(shape, k):
    assert measures.principal_k(shape) == k


def test_the_principal_mask_is_the_largest_entries_of_the_low_rank_reconstruction():
    w = torch.tensor([[4.0, 0.1], [0.2, 0.0]], dtype=torch.float64)
    full = measures.principal_mask(w, rank=2, alpha=0.5)                 # top 2 of the 4 entries of w
    assert full.tolist() == [[True, False], [True, False]]
    rank1 = measures.principal_mask(w, rank=1, alpha=0.25)               # of u1 s1 v1^T: the 4.0
    assert rank1.tolist() == [[True, False], [False, False]]


def test_the_update_mask_counts_what_bf16_can_see():
    w0 = torch.tensor([[1.0, 1.0, 256.0, 0.0]])
    w = torch.tensor([[1.0, 1.5, 256.5, 0.001]])      # 256.5 rounds to 256 in bf16
    assert measures.update_mask(w0, w).tolist() == [[False, True, False, True]]


def test_pm_overlap_and_update_on_a_known_change():
    torch.manual_seed(0)
    w0 = torch.randn(8, 8, dtype=torch.float64)
    assert measures.principal_mask_overlap(w0, w0.clone()) == 1.0
    assert measures.principal_mask_update(w0, w0.clone()) == 0.0
    mask = measures.principal_mask(w0)                      # 32 of 64 entries
    w = w0.clone()
    chosen = mask.nonzero()[:8]                       # change 8 principal entries by 10%
    w[chosen[:, 0], chosen[:, 1]] *= 1.1
    assert measures.principal_mask_update(w0, w) == pytest.approx(8 / 32)
    off = (~mask).nonzero()[:8]                       # and 8 others: no principal entry more
    w[off[:, 0], off[:, 1]] *= 1.1
    assert measures.principal_mask_update(w0, w) == pytest.approx(8 / 32)
    assert measures.principal_mask_overlap(w0, -w0) == 1.0  # a sign flip keeps every magnitude


def test_paper_drift_averages_over_attention_and_mlp_matrices(random_lab):
    import copy
    base, _ = random_lab
    moved = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if p.dim() == 2 and ("attn" in name or "mlp" in name):
                p.mul_(1.1)
    out = measures.paper_drift(moved, base)
    assert out["nss"] == pytest.approx(0.1, abs=1e-6)           # every matrix rescaled by 1.1
    assert out["max_angle"] == pytest.approx(0.0, abs=1e-3)
    assert out["pm_overlap"] == pytest.approx(1.0)
    assert out["pm_update"] == pytest.approx(1.0)               # every entry changed by 10%


def drift(value):
    return {"param_drift": {"overall": value}, "paper_drift": {
        "nss": value, "max_angle": 10 * value, "pm_overlap": 1 - value, "pm_update": value}}


def test_drift_at_matched_gain_reads_each_run_where_its_gain_reaches_the_smallest_final_gain():
    """Two methods, one stage: grpo gains 20 points with drift 0.1 -> 0.3 over its curve, sdpo 40
    points with drift 0.2 -> 0.8; g* = 20, where grpo ends (0.3) and sdpo is halfway between its
    curve point at 10 points (0.2) and its end at 40 (0.8): 0.4."""
    def run(curve_gain, curve_drift, end_gain, end_drift):
        records = [drift(0.0), {**drift(end_drift), "curve": [
            {"step": 5, "accuracy": {"math": 0.2 + curve_gain}, **drift(curve_drift)}]}]
        return {"R": [[0.2], [0.2 + end_gain]], "records": records}
    results = {"tasks": ["math"], "trained": [0], "runs": {
        "grpo": {"0": run(0.10, 0.1, 0.20, 0.3)}, "sdpo": {"0": run(0.10, 0.2, 0.40, 0.8)}}}
    paths = {m: ef.drift_path(results, r["0"], 1) for m, r in results["runs"].items()}
    assert ef.at_gain(paths["grpo"], 0.2, "nss") == pytest.approx(0.3)
    assert ef.at_gain(paths["sdpo"], 0.2, "nss") == pytest.approx(0.4)
    assert ef.at_gain(paths["sdpo"], 0.5, "nss") is None               # never that high
    table = ef.matched_gain_table(results)
    assert "| 1 math | 20.0 | sdpo | 40.00 | 400.00 | 4.00 | 60.00 | 40.00 |" in table


def test_a_matrix_changed_in_place_is_decomposed_again():
    # the decompositions are kept per matrix (a run's base once): an optimizer step changes the
    # weights in place, and the next measure must see the new ones (doubled: NSS 1)
    w0 = torch.randn(8, 6)
    w = w0.clone()
    assert measures.normalised_spectral_shift(w0, w) == pytest.approx(0.0, abs=1e-12)
    w.mul_(2.0)
    assert measures.normalised_spectral_shift(w0, w) == pytest.approx(1.0, abs=1e-12)


def test_a_matrix_changed_in_place_gets_a_new_principal_mask():
    w = torch.tensor([[4.0, 0.1], [0.2, 0.0]], dtype=torch.float64)
    assert measures.principal_mask(w, rank=2, alpha=0.25).tolist() == [[True, False], [False, False]]
    w[0, 0] = 0.0                                       # in place, as an optimizer step
    assert measures.principal_mask(w, rank=2, alpha=0.25).tolist() == [[False, False], [True, False]]
