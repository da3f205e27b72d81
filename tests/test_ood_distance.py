"""The distance between a training set and an evaluation set, as the paper measures it: the MMD
with an RBF kernel, 0 for a set against itself and growing as the two sets part."""
import math

import pytest
import torch

import eval_forgetting as ef


def test_mmd_of_a_set_with_itself_is_zero():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    assert ef.mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)


def test_mmd_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=gen), torch.randn(50, 4, generator=gen)
    shifts = [ef.mmd_rbf(x, y + d, bandwidth=2.0) for d in (0.0, 0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts) and shifts[0] < 0.05 < shifts[-1]


def test_mmd_by_hand_for_two_points():
    # k(a, a) = 1, k(a, b) = exp(-|a - b|^2 / 2) at h = 1: MMD^2 = 1 + 1 - 2 exp(-1/2)
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    assert ef.mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(2 - 2 * math.exp(-0.5), abs=1e-12)
