"""SDPO: divergences, top-k support, sampled-token mode, IS clip, empty targets."""
import math

import pytest
import torch

from sdpo_cl import generalized_jsd, log_tail, sdpo_loss, topk_support

torch.manual_seed(0)
S_LOGITS = torch.randn(2, 3, 6)                        # [B, T, V]
T_LOGITS = torch.randn(2, 3, 6)
IDS = torch.randint(0, 6, (2, 3))
MASK = torch.ones(2, 3)


def full(alpha, **kw):
    kw = {"topk": None, "is_clip": None, **kw}
    return sdpo_loss(S_LOGITS, T_LOGITS, IDS, MASK, alpha=alpha, **kw)[0].item()


def kl(p, q):                                          # explicit sum p log(p/q), [..., V] -> [...]
    return (p * (p.log() - q.log())).sum(-1)


def test_alpha_0_is_forward_kl_teacher_to_student():
    p_s, p_t = S_LOGITS.softmax(-1), T_LOGITS.softmax(-1)
    assert full(0.0) == pytest.approx(kl(p_t, p_s).mean().item(), abs=1e-6)


def test_alpha_1_is_reverse_kl_student_to_teacher():
    p_s, p_t = S_LOGITS.softmax(-1), T_LOGITS.softmax(-1)
    assert full(1.0) == pytest.approx(kl(p_s, p_t).mean().item(), abs=1e-6)


def test_jsd_at_one_half_on_a_hand_made_pair():
    s, t = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    # the mixture m = (s + t) / 2 = [0.7, 0.3]
    expected = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) \
        + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
    assert generalized_jsd(s.log(), t.log(), 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_jsd_at_one_quarter_weighs_the_student_three_times_the_teacher():
    s, t = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    # alpha = 0.25: the mixture m = 0.75 s + 0.25 t = [0.6, 0.4]
    expected = 0.75 * (0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)) \
        + 0.25 * (0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4))
    assert generalized_jsd(s.log(), t.log(), 0.25).item() == pytest.approx(expected, abs=1e-6)


def test_swapping_student_and_teacher_is_swapping_alpha_and_one_minus_alpha():
    s, t = S_LOGITS.log_softmax(-1), T_LOGITS.log_softmax(-1)
    assert torch.allclose(generalized_jsd(s, t, 0.25), generalized_jsd(t, s, 0.75), atol=1e-6)
    assert not torch.allclose(generalized_jsd(s, t, 0.25), generalized_jsd(s, t, 0.75), atol=1e-3)


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.8])
def test_the_loss_at_any_alpha_is_the_mean_generalised_jsd(alpha):
    p_s, p_t = S_LOGITS.softmax(-1), T_LOGITS.softmax(-1)
    m = (1 - alpha) * p_s + alpha * p_t
    expected = ((1 - alpha) * kl(p_s, m) + alpha * kl(p_t, m)).mean().item()
    assert full(alpha) == pytest.approx(expected, abs=1e-6)


def test_jsd_is_zero_for_identical_distributions_and_positive_otherwise():
    assert sdpo_loss(S_LOGITS, S_LOGITS, IDS, MASK, topk=None)[0].item() == pytest.approx(0, abs=1e-6)
    assert full(0.5) > 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_with_tail_equals_full_vocabulary_when_k_is_v(alpha):
    assert full(alpha, topk=6) == pytest.approx(full(alpha), abs=1e-5)


def test_tail_bucket_holds_the_remaining_mass():
    logp = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    assert log_tail(logp[:2]).exp().item() == pytest.approx(0.2, abs=1e-6)


def test_topk_support_uses_the_students_top_tokens():
    s = torch.log(torch.tensor([[[0.1, 0.6, 0.3]]]))
    t = torch.log(torch.tensor([[[0.5, 0.2, 0.3]]]))
    s_k, t_k = topk_support(s, t, topk=2, add_tail=True)
    assert torch.allclose(s_k.exp(), torch.tensor([[[0.6, 0.3, 0.1]]]), atol=1e-6)
    assert torch.allclose(t_k.exp(), torch.tensor([[[0.2, 0.3, 0.5]]]), atol=1e-6)


def test_renormalised_topk_divergence():
    s = torch.log(torch.tensor([[[0.1, 0.6, 0.3]]]))
    t = torch.log(torch.tensor([[[0.5, 0.2, 0.3]]]))
    loss, _ = sdpo_loss(s, t, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), alpha=0.0,
                        topk=2, add_tail=False, is_clip=None)
    p_s, p_t = torch.tensor([0.6, 0.3]) / 0.9, torch.tensor([0.2, 0.3]) / 0.5
    assert loss.item() == pytest.approx(kl(p_t, p_s).item(), abs=1e-6)


def test_sampled_token_mode_is_reinforce_on_the_reverse_kl():
    s_logits = S_LOGITS.clone().requires_grad_(True)
    loss, _ = sdpo_loss(s_logits, T_LOGITS, IDS, MASK, alpha=1.0, full_logits=False,
                        is_clip=None)
    ls = s_logits.log_softmax(-1).gather(-1, IDS[..., None]).squeeze(-1)
    lt = T_LOGITS.log_softmax(-1).gather(-1, IDS[..., None]).squeeze(-1)
    assert loss.item() == pytest.approx(((ls - lt) * ls).mean().item(), abs=1e-6)
    loss.backward()
    surrogate = ((ls - lt).detach() * ls).mean()       # gradient = (ls - lt) * d ls
    grad, = torch.autograd.grad(surrogate, s_logits)
    assert torch.allclose(s_logits.grad, grad, atol=1e-6)


def test_importance_weight_is_clipped():
    logp = S_LOGITS.log_softmax(-1).gather(-1, IDS[..., None]).squeeze(-1)
    base = full(0.5)
    for log_ratio, weight in ((math.log(3.0), 2.0), (math.log(0.5), 0.5)):
        old = logp - log_ratio                         # pi / pi_old = exp(log_ratio)
        loss, _ = sdpo_loss(S_LOGITS, T_LOGITS, IDS, MASK, old_logprobs=old, topk=None,
                            is_clip=2.0)
        assert loss.item() == pytest.approx(weight * base, rel=1e-5)


def test_empty_mask_gives_a_graph_connected_zero():
    s_logits = S_LOGITS.clone().requires_grad_(True)
    loss, _ = sdpo_loss(s_logits, T_LOGITS, IDS, torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert s_logits.grad is not None and torch.all(s_logits.grad == 0)


def test_masked_tokens_do_not_count():
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    only_first = sdpo_loss(S_LOGITS[:1, :1], T_LOGITS[:1, :1], IDS[:1, :1], torch.ones(1, 1),
                           topk=None)[0]
    assert sdpo_loss(S_LOGITS, T_LOGITS, IDS, mask, topk=None)[0].item() == pytest.approx(
        only_first.item(), abs=1e-6)


@pytest.mark.parametrize("alpha, topk", [(0.0, None), (0.5, 3), (1.0, 3)])
def test_a_gradient_step_moves_the_student_toward_the_teacher(alpha, topk):
    s_logits = S_LOGITS.clone().requires_grad_(True)
    before, _ = sdpo_loss(s_logits, T_LOGITS, IDS, MASK, alpha=alpha, topk=topk)
    before.backward()
    with torch.no_grad():
        stepped = s_logits - 0.5 * s_logits.grad
    full_kl = lambda z: kl(T_LOGITS.softmax(-1), z.softmax(-1)).mean().item()
    assert full_kl(stepped) < full_kl(S_LOGITS)        # closer to the teacher in full KL
    assert sdpo_loss(stepped, T_LOGITS, IDS, MASK, alpha=alpha, topk=topk)[0] < before


def test_teacher_receives_no_gradient():
    t_logits = T_LOGITS.clone().requires_grad_(True)
    s_logits = S_LOGITS.clone().requires_grad_(True)
    sdpo_loss(s_logits, t_logits, IDS, MASK)[0].backward()
    assert t_logits.grad is None
