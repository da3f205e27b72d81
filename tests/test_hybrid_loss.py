"""The hybrid loss (1 - w) GRPO + w SDPO (distillation_weight = w) on one batch: at w = 0.25,
where a swap of the two weights would show, its value, its gradient and its reported parts are
those of the pure GRPO (w = 0) and pure SDPO (w = 1) losses of the same batch, weighted."""
import dataclasses

import pytest
import torch

import sdpo_cl as s
from harness import lab
from conftest import flat_grad, rollout_batch

W = 0.25


@pytest.fixture(scope="module")
def losses(random_lab):
    """{w: (metrics, gradient)} of micro_batch_loss at w = 0.25, 0 and 1 on the same off-policy
    batch (old log-probs shifted, so that GRPO's loss is not 0 and its ratios not 1)."""
    model, tok = random_lab
    cfg = lab.lab_config("lab-short", loss_mode="sdpo", distillation_weight=W, prompts_per_step=2,
                         group_size=4, max_new_tokens=6)
    batch = rollout_batch(model, tok, cfg)
    shift = 0.3 * (batch.rows % 2 * 2 - 1).float()                     # +-0.3 by row
    batch.rollout.old_logprobs = (batch.rollout.old_logprobs + shift[:, None]) \
        * batch.rollout.response_mask
    out = {}
    for w in (W, 0.0, 1.0):
        weighted = dataclasses.replace(cfg, distillation_weight=w)
        model.zero_grad(set_to_none=True)
        loss, metrics = s.micro_batch_loss(model, s.Teacher(model, weighted), None, batch.rollout,
                                           batch.targets, batch.rows, batch.rows, weighted)
        loss.backward()
        out[w] = metrics, flat_grad(model)
    model.zero_grad(set_to_none=True)
    return out


def test_the_pure_losses_are_not_zero_and_differ(losses):
    grpo, sdpo = losses[0.0], losses[1.0]
    assert abs(grpo[0]["loss"]) > 1e-3 and sdpo[0]["loss"] > 1e-3
    assert "loss_sdpo" not in grpo[0] and "loss_grpo" not in sdpo[0]
    assert (grpo[1] - sdpo[1]).norm() > 0.1 * sdpo[1].norm()


def test_the_hybrid_loss_is_three_quarters_grpo_plus_one_quarter_sdpo(losses):
    hybrid, grpo, sdpo = losses[W][0], losses[0.0][0], losses[1.0][0]
    assert hybrid["loss"] == pytest.approx((1 - W) * grpo["loss"] + W * sdpo["loss"], abs=1e-6)
    assert hybrid["loss_grpo"] == pytest.approx(grpo["loss_grpo"], abs=1e-6)   # unweighted parts
    assert hybrid["loss_sdpo"] == pytest.approx(sdpo["loss_sdpo"], abs=1e-6)


def test_the_hybrid_gradient_is_the_same_mixture(losses):
    expected = (1 - W) * losses[0.0][1] + W * losses[1.0][1]
    assert torch.allclose(losses[W][1], expected, atol=1e-6, rtol=1e-4)
