"""Drift measures: the principal angles between the top singular subspaces of a weight matrix
before and after, the relative L2 drift, the response KL(base || model) per token on the base's
answers, and the similarity of answers to the base model's."""
import math
from types import SimpleNamespace

import pytest
import torch

from harness import lab
from harness import measures


def rotated(theta):
    """diag(3, 2, 1) with its top singular direction turned by theta in the (e1, e2) plane."""
    c, si = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -si, 0.0], [si, c, 0.0], [0.0, 0.0, 1.0]])
    return rotation @ torch.diag(torch.tensor([3.0, 2.0, 1.0]))


@pytest.mark.parametrize("degrees", [0.0, 20.0, 45.0, 90.0])
def test_principal_angle_of_a_turned_top_direction(degrees):
    w0, w = rotated(0.0), rotated(math.radians(degrees))
    assert measures.subspace_angle(w0, w) == pytest.approx(degrees, abs=1e-3)   # k = 1 of 3


def turned_in_the_e2_e3_plane(theta):
    """diag(4, 3, 2, 1) with its second singular direction turned by theta toward e3."""
    c, si = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[1.0, 0, 0, 0], [0, c, -si, 0], [0, si, c, 0], [0, 0, 0, 1.0]])
    return rotation @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))


def test_the_angle_of_a_two_dimensional_subspace_is_the_mean_of_its_two_principal_angles():
    """k = 2 of 4: span(e1, e2) against span(e1, cos t e2 + sin t e3), principal angles 0 and t."""
    w0, w = turned_in_the_e2_e3_plane(0.0), turned_in_the_e2_e3_plane(math.radians(60.0))
    assert measures.subspace_angle(w0, w, fraction=0.5) == pytest.approx(30.0, abs=1e-3)
    assert measures.subspace_angle(w0, w, fraction=0.25) == pytest.approx(0.0, abs=1e-3)


def test_principal_angle_ignores_the_scale_and_the_sign_of_the_directions():
    w0 = rotated(0.3)
    assert measures.subspace_angle(w0, -5.0 * w0) == pytest.approx(0.0, abs=1e-3)


def test_parameter_drift_reports_l2_and_angles_per_layer_type():
    tok = lab.build_lab_tokenizer()
    base = lab.build_lab_model(tok, seed=0)
    moved = lab.build_lab_model(tok, seed=0)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if "mlp" in name:
                p.mul_(1.1)                 # 10% larger: L2 drift 0.1, directions unchanged
    drift = measures.parameter_drift(moved, base)
    assert drift["mlp"] == pytest.approx(0.1, rel=1e-4) and drift["attention"] == 0.0
    assert drift["subspace_angle"] == pytest.approx(0.0, abs=0.5)


def test_response_similarity_is_the_share_of_matching_characters():
    assert measures.response_similarity(["abc", "xyz"], ["abc", "xyz"]) == pytest.approx(100.0)
    assert measures.response_similarity(["abcd"], ["abzz"]) == pytest.approx(50.0)
    assert measures.response_similarity(["abc"], ["xyz"]) == 0.0


class NextTokenTable(torch.nn.Module):
    """A stand-in language model whose next-token distribution depends only on the current token:
    row `token` of `probs` [V, V]."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probs).log())

    def forward(self, input_ids, logits_to_keep=0, **_):
        return SimpleNamespace(logits=self.logits[input_ids][:, -logits_to_keep:])


# After token 1 the two models differ; after token 2 they agree (token 0 is padding).
BASE = [[1 / 3] * 3, [0.5, 0.25, 0.25], [0.2, 0.4, 0.4]]
MODEL = [[1 / 3] * 3, [0.1, 0.6, 0.3], [0.2, 0.4, 0.4]]
KL_BASE_MODEL = (0.5 * math.log(0.5 / 0.1) + 0.25 * math.log(0.25 / 0.6)
                 + 0.25 * math.log(0.25 / 0.3))


def test_response_kl_is_kl_from_the_base_to_the_model_averaged_over_tokens():
    """Three answers after the prompt [1], in chunks of two: [2, 2, 2] (KLs KL, 0, 0), an empty
    one (skipped), and [1] (KL). The mean over the 4 tokens is KL / 2 (not the mean of the
    per-answer means, 2 KL / 3, nor KL(model || base))."""
    sequences = [([1], [2, 2, 2]), ([1], []), ([1], [1])]
    kl = measures.response_kl(NextTokenTable(MODEL), NextTokenTable(BASE), sequences,
                                     batch_size=2)
    assert kl == pytest.approx(KL_BASE_MODEL / 2, abs=1e-6)
    assert measures.response_kl(NextTokenTable(BASE), NextTokenTable(BASE),
                                       sequences) == pytest.approx(0.0, abs=1e-7)
