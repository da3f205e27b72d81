"""One training step (sdpo_cl.train_step) on the tiny lab base: micro-batches and gradient
checkpointing leave the update unchanged, the step reports what its batch looked like, a batch
without any demonstration is an empty-target step, and a non-finite loss stops with the step."""
import copy

import pytest
import torch

import sdpo_cl as s
from harness import lab
from conftest import alternating_reward, flat_params

PROMPTS = 4


def one_step(model, tok, cfg, reward=None):
    """train_step with SGD at cfg.lr on PROMPTS math prompts, the alternating reward unless
    another is given (a fresh one per call, so that compared runs see the same rewards)."""
    task = lab.make_lab_task("math", "lab-short", n_train=PROMPTS, n_test=1)
    task.reward = reward or alternating_reward()
    teacher = s.Teacher(model, cfg) if cfg.loss_mode == "sdpo" else None
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    torch.manual_seed(0)
    return s.train_step(model, tok, teacher, optimizer, scheduler, task,
                        [task.train[i] for i in range(PROMPTS)], cfg)


@pytest.mark.parametrize("kw", [dict(loss_mode="grpo"), dict(loss_mode="sdpo"),
                                dict(loss_mode="sdpo", distillation_weight=0.25),
                                dict(loss_mode="sdpo", loss_agg_mode="seq-mean-token-mean"),
                                dict(loss_mode="grpo", loss_agg_mode="token-mean")])
def test_micro_batches_give_the_update_and_loss_of_the_whole_mini_batch(tiny_base, kw):
    model, tok = tiny_base
    params, losses = [], []
    for micro in (0, 8):                                  # 32 rows at once, or 4 x 8
        m = copy.deepcopy(model)
        cfg = lab.lab_config("lab-short", prompts_per_step=PROMPTS, micro_batch_size=micro, lr=1.0, **kw)
        losses.append(one_step(m, tok, cfg)["loss"])
        params.append(flat_params(m))
    assert (params[0] - flat_params(model)).abs().max() > 1e-4      # the step did something
    assert torch.allclose(params[0], params[1], atol=1e-5)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_gradient_checkpointing_leaves_the_update_unchanged(tiny_base):
    model, tok = tiny_base
    params = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model)
        if checkpointing:
            m.activation_checkpointing_enable()
        one_step(m, tok, lab.lab_config("lab-short", loss_mode="sdpo", prompts_per_step=PROMPTS, lr=1.0))
        params.append(flat_params(m))
    assert (params[0] - flat_params(model)).abs().max() > 1e-4
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_a_step_reports_its_batch_and_the_distillation(tiny_base):
    """Alternating rewards: half of every group solved, so every sample has a demonstration."""
    model, tok = copy.deepcopy(tiny_base[0]), tiny_base[1]
    m = one_step(model, tok, lab.lab_config("lab-short", loss_mode="sdpo", prompts_per_step=PROMPTS))
    assert m["reward"] == 0.5 and m["solved_groups"] == 1.0 and m["zero_adv_groups"] == 0.0
    assert m["distill_frac"] == 1.0 and not m["empty_target"] and m["updates"] == 1
    assert m["loss"] == pytest.approx(m["loss_sdpo"]) and m["loss_sdpo"] > 0
    assert 1 <= m["response_length"] <= 24
    for key in ("divergence", "entropy", "grad_norm", "t_rollout", "t_teacher"):
        assert key in m


def test_every_teacher_kind_is_the_policy_itself_at_the_first_step(tiny_base):
    """ema, frozen, trust-region and live teachers all start as the policy, so the first step's
    distillation loss is the same whichever runs it (live scores with the training policy)."""
    losses = []
    for kind in s.TEACHER_KINDS:
        model = copy.deepcopy(tiny_base[0])
        model.activation_checkpointing_enable()
        cfg = lab.lab_config("lab-short", loss_mode="sdpo", teacher_regularization=kind,
                             prompts_per_step=PROMPTS)
        losses.append(one_step(model, tiny_base[1], cfg)["loss_sdpo"])
    assert losses[0] > 0
    assert losses == pytest.approx([losses[0]] * len(losses), abs=1e-6)


def test_a_step_without_any_demonstration_is_an_empty_target_step(tiny_base):
    model, tok = copy.deepcopy(tiny_base[0]), tiny_base[1]
    before = flat_params(model)
    m = one_step(model, tok, lab.lab_config("lab-short", loss_mode="sdpo", prompts_per_step=PROMPTS, lr=1.0),
                 reward=lambda c, ex: 0.0)
    assert m["empty_target"] and m["distill_frac"] == 0 and m["loss"] == 0
    assert torch.equal(flat_params(model), before)


def test_a_non_finite_loss_stops_with_the_step_and_the_last_metrics(tiny_base):
    model, tok = copy.deepcopy(tiny_base[0]), tiny_base[1]
    task = lab.make_lab_task("math", "lab-short", n_train=8, n_test=1)
    calls = []

    def nan_from_the_second_step(completion, example):
        calls.append(1)
        return float("nan") if len(calls) > 8 else float(len(calls) % 2)
    task.reward = nan_from_the_second_step
    cfg = lab.lab_config("lab-short", loss_mode="grpo", steps_per_task=2, prompts_per_step=2, group_size=4)
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite loss nan; last finite "
                                                 r"metrics: \{'reward': 0.5"):
        s.train_task(model, tok, None, task, cfg, rng=s.seed_everything(0))
