"""Drift measures: the principal angle between the top singular subspaces of a weight matrix
before and after, the relative L2 drift, and the similarity of answers to the base model's."""
import math

import pytest
import torch

import sdpo_cl as s
from harness import lab
import eval_forgetting


def rotated(theta):
    """diag(3, 2, 1) with its top singular direction turned by theta in the (e1, e2) plane."""
    c, si = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -si, 0.0], [si, c, 0.0], [0.0, 0.0, 1.0]])
    return rotation @ torch.diag(torch.tensor([3.0, 2.0, 1.0]))


@pytest.mark.parametrize("degrees", [0.0, 20.0, 45.0, 90.0])
def test_principal_angle_of_a_turned_top_direction(degrees):
    w0, w = rotated(0.0), rotated(math.radians(degrees))
    assert eval_forgetting.subspace_angle(w0, w) == pytest.approx(degrees, abs=1e-3)   # k = 1 of 3


def test_principal_angle_ignores_the_scale_and_the_sign_of_the_directions():
    w0 = rotated(0.3)
    assert eval_forgetting.subspace_angle(w0, -5.0 * w0) == pytest.approx(0.0, abs=1e-3)


def test_parameter_drift_reports_l2_and_angles_per_layer_type():
    tok = lab.build_lab_tokenizer()
    base = lab.build_lab_model(tok, seed=0)
    moved = lab.build_lab_model(tok, seed=0)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if "mlp" in name:
                p.mul_(1.1)                 # 10% larger: L2 drift 0.1, directions unchanged
    drift = eval_forgetting.parameter_drift(moved, base)
    assert drift["mlp"] == pytest.approx(0.1, rel=1e-4) and drift["attention"] == 0.0
    assert drift["subspace_angle"] == pytest.approx(0.0, abs=0.5)


def test_response_similarity():
    assert eval_forgetting.response_similarity(["abc", "xyz"], ["abc", "xyz"]) == pytest.approx(100.0)
    assert eval_forgetting.response_similarity(["abcd"], ["abzz"]) == pytest.approx(50.0)
    assert eval_forgetting.response_similarity(["abc"], ["xyz"]) == 0.0
