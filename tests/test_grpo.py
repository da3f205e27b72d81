"""GRPO: advantages, clipped loss, k3 KL and loss aggregation, on hand-computable tensors."""
import math

import pytest
import torch

from sdpo_cl import aggregate, aggregation_share, grpo_advantages, grpo_loss


def test_advantages_are_group_mean_centred():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(rewards, group_size=4)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_advantages_divided_by_unbiased_group_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(rewards, group_size=4, norm_by_std=True, eps=0.0 + 1e-6)
    std = math.sqrt(4 * 0.25 / 3)                       # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6)
    assert torch.allclose(adv[:4], expected, atol=1e-5)
    assert torch.all(adv[4:] == 0)                      # an all-equal group teaches nothing


def per_token(ratio, advantage, **kw):
    """grpo_loss on a single token with the given ratio pi/pi_old and advantage."""
    logp = torch.tensor([[math.log(ratio)]])
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), **kw)
    return loss.item()


@pytest.mark.parametrize("ratio, advantage, expected", [
    (1.0, 1.0, -1.0),      # on-policy: plain -A
    (1.5, 1.0, -1.28),     # A > 0: the gain is capped at 1 + clip_high
    (0.5, 1.0, -0.5),      # A > 0, ratio fell: no clip (pessimistic side)
    (0.5, -1.0, 0.8),      # A < 0: the ratio is floored at 1 - clip_low
    (1.5, -1.0, 1.5),      # A < 0, ratio rose: unclipped (pessimistic side)
    (5.0, -1.0, 3.0),      # A < 0, huge ratio: the dual clip caps the loss at -c * A
])
def test_clipped_surrogate_with_dual_clip(ratio, advantage, expected):
    assert per_token(ratio, advantage) == pytest.approx(expected, abs=1e-6)


def test_dual_clip_can_be_turned_off():
    assert per_token(5.0, -1.0, dual_clip=None) == pytest.approx(5.0)


def test_asymmetric_clip_bounds():
    assert per_token(2.0, 1.0, clip_high=0.5) == pytest.approx(-1.5)
    assert per_token(0.1, -1.0, clip_low=0.3) == pytest.approx(0.7)


def test_beta_adds_the_k3_estimate_of_kl_to_the_reference():
    logp = torch.tensor([[0.0, 0.0]])
    ref = torch.tensor([[0.0, math.log(2.0)]])          # d = ref - logp = 0 and log 2
    loss, metrics = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref,
                              beta=0.5)
    k3 = [0.0, 2.0 - math.log(2.0) - 1.0]              # e^d - d - 1
    assert metrics["kl_ref"] == pytest.approx(sum(k3) / 2)
    assert loss.item() == pytest.approx(0.5 * sum(k3) / 2)


RAGGED = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
RAGGED_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_token_mean_weighs_every_token_equally():
    assert aggregate(RAGGED, RAGGED_MASK, "token-mean").item() == pytest.approx(10 / 4)


def test_seq_mean_token_mean_averages_sequences():
    # (1+2+3)/3 = 2 and 4/1 = 4; the empty third sequence is left out
    assert aggregate(RAGGED, RAGGED_MASK, "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_seq_mean_token_sum_norm_divides_by_constant_length():
    # (6/3 + 4/3) / 2, T = 3 for every sequence (Dr. GRPO)
    assert aggregate(RAGGED, RAGGED_MASK, "seq-mean-token-sum-norm").item() == pytest.approx(5 / 3)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_shares_add_up_to_the_whole_batch(agg):
    whole = aggregate(RAGGED, RAGGED_MASK, agg)
    parts = sum(aggregation_share(RAGGED_MASK[s], RAGGED_MASK, agg) * aggregate(
        RAGGED[s], RAGGED_MASK[s], agg) for s in (slice(0, 1), slice(1, 3)))
    assert parts.item() == pytest.approx(whole.item())


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="loss_agg_mode='sum'"):
        aggregate(RAGGED, RAGGED_MASK, "sum")


def test_gradient_raises_good_answers_and_lowers_bad_ones():
    logp = torch.zeros(2, 1, requires_grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[1, 0]       # descent raises logp[0], lowers logp[1]
