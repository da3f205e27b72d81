"""The KL anchor to the frozen initial model (kl_loss_coef = beta, with GRPO and with SDPO): it
adds beta times the mean k3 estimate of KL(pi || pi_ref) to the loss, so it changes the gradient
by exactly beta times the gradient of that mean, computed here independently; it is zero, with a
zero gradient, where the policy is the reference; and a step refuses to run without the
reference."""
import copy
import dataclasses

import pytest
import torch

import sdpo_cl as s
from harness import lab
from conftest import flat_grad, rollout_batch

BETA, TEMPERATURE = 0.5, 0.7


def moved(model, scale=0.05, seed=1):
    """A copy of the model with every weight moved by Gaussian noise: a policy that has left its
    reference."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return out


def config(mode, beta):
    return lab.lab_config("lab-short", loss_mode=mode, prompts_per_step=2, group_size=4, max_new_tokens=6,
                          temperature=TEMPERATURE, kl_loss_coef=beta)


def loss_and_gradient(policy, reference, batch, cfg):
    """micro_batch_loss on the whole batch (one micro-batch, one mini-batch): its metrics and
    the gradient it leaves on the policy."""
    teacher = s.Teacher(policy, cfg) if cfg.loss_mode == "sdpo" else None
    policy.zero_grad(set_to_none=True)
    loss, metrics = s.micro_batch_loss(policy, teacher, reference, batch.rollout, batch.targets,
                                       batch.rows, batch.rows, cfg)
    loss.backward()
    return metrics, flat_grad(policy)


def mean_k3(policy, reference, rollout):
    """The anchor written out: k3 = exp(d) - d - 1 with d = log pi_ref - log pi on each sampled
    token, both at the training temperature, averaged over each response's tokens, then over the
    responses (micro1-token-mean)."""
    inputs = s.sequence_inputs(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                               rollout.response_mask)
    ids = rollout.response_ids[..., None]
    logp = torch.log_softmax(policy(**inputs).logits[:, :-1] / TEMPERATURE, -1).gather(-1, ids)
    with torch.no_grad():
        ref = torch.log_softmax(reference(**inputs).logits[:, :-1] / TEMPERATURE, -1
                                ).gather(-1, ids)
    d = (ref - logp).squeeze(-1)
    k3, mask = torch.exp(d) - d - 1, rollout.response_mask
    return ((k3 * mask).sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize("mode", ["grpo", "sdpo"])
def test_the_anchor_adds_beta_times_the_gradient_of_the_mean_k3(random_lab, mode):
    reference, tok = random_lab
    policy = moved(reference)
    batch = rollout_batch(policy, tok, config(mode, BETA))
    without, g_without = loss_and_gradient(policy, reference, batch, config(mode, 0.0))
    with_anchor, g_with = loss_and_gradient(policy, reference, batch, config(mode, BETA))
    policy.zero_grad(set_to_none=True)
    k3 = mean_k3(policy, reference, batch.rollout)
    k3.backward()
    g_k3 = flat_grad(policy)
    assert k3.item() > 1e-3 and g_k3.norm() > 1e-2          # the policy has left its reference
    assert with_anchor["kl_ref"] == pytest.approx(k3.item(), rel=1e-4)
    assert with_anchor["loss"] == pytest.approx(without["loss"] + BETA * k3.item(), abs=1e-5)
    assert torch.allclose(g_with - g_without, BETA * g_k3, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["grpo", "sdpo"])
def test_the_anchor_is_zero_with_a_zero_gradient_where_the_policy_is_the_reference(random_lab,
                                                                                  mode):
    model, tok = random_lab
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    batch = rollout_batch(policy, tok, config(mode, BETA))
    _, g_without = loss_and_gradient(policy, reference, batch, config(mode, 0.0))
    with_anchor, g_with = loss_and_gradient(policy, reference, batch, config(mode, BETA))
    assert with_anchor["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(g_with, g_without, atol=1e-7)


def test_a_step_with_an_anchor_needs_the_reference(random_lab):
    model, tok = random_lab
    cfg = dataclasses.replace(config("grpo", BETA), prompts_per_step=1)
    task = lab.make_lab_task("math", "lab-short", n_train=1, n_test=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pytest.raises(ValueError, match="kl_loss_coef > 0 needs the frozen reference"):
        s.train_step(model, tok, None, optimizer, scheduler, task, [task.train[0]], cfg)
