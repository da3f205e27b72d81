"""The remedies and reference points run in the same harness: replay of earlier tasks' prompts,
all tasks mixed from the start, supervised fine-tuning on the gold answers, distilling the
final answer only, and the KL anchor for SDPO."""
import copy
import math
import random

import pytest
import torch

import sdpo_cl as s
from harness import lab
import run_sequence


def rows(name, n):
    return [{"prompt": f"{name}{i}", "answer": str(i)} for i in range(n)]


def task(name, n=40, budget=None):
    return s.Task(name, rows(name, n), rows(name, 4),
                  lambda c, ex, name=name: float(c == name), max_new_tokens=budget)


def test_replay_draws_its_share_from_earlier_tasks_and_the_rest_in_order():
    cfg = lab.lab_config(prompts_per_step=32, replay_fraction=0.25)
    current, earlier = task("cur"), [task("old1", budget=4), task("old2", budget=9)]
    order = []
    examples, batch_task = s.next_batch(current, earlier, cfg, random.Random(0), order)
    names = [ex["task"] for ex in examples]
    assert names[:24] == ["cur"] * 24 and set(names[24:]) <= {"old1", "old2"}
    assert len(order) == 40 - 24                      # the pass over the current task goes on
    assert batch_task.reward("old2", examples[-1]) == float(examples[-1]["task"] == "old2")


def test_without_replay_the_batch_is_the_task_alone():
    cfg = lab.lab_config(prompts_per_step=8)
    current = task("cur")
    examples, batch_task = s.next_batch(current, [task("old")], cfg, random.Random(0), [])
    assert batch_task is current and all("task" not in ex for ex in examples)


def test_multitask_draws_every_prompt_from_all_tasks():
    cfg = lab.lab_config(prompts_per_step=400, multitask=True)
    everything = [task("a"), task("b"), task("c")]
    examples, _ = s.next_batch(everything[0], everything, cfg, random.Random(0), [])
    counts = {n: sum(ex["task"] == n for ex in examples) for n in "abc"}
    assert all(100 < c < 170 for c in counts.values())    # about a third each


def test_a_mixture_scores_each_example_with_its_own_task():
    mixed = s.mix_tasks([task("a", budget=4), task("b", budget=9)])
    assert mixed.reward("a", {"task": "a"}) == 1.0 and mixed.reward("a", {"task": "b"}) == 0.0
    assert mixed.max_new_tokens == 9


def test_sft_loss_is_the_mean_negative_log_likelihood_of_the_gold_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))   # [1, 2, 3]
    targets, mask = torch.tensor([[0, 1]]), torch.ones(1, 2)
    expected = (-math.log(0.5) - math.log(0.8)) / 2
    assert s.sft_loss(logits, targets, mask).item() == pytest.approx(expected, abs=1e-6)
    assert s.sft_loss(logits, targets, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        -math.log(0.5), abs=1e-6)


def test_an_sft_step_raises_the_likelihood_of_the_gold_answers():
    model, tok = run_sequence.load_policy("lab")
    math_task = lab.make_lab_task("math")
    examples = [math_task.train[i] for i in range(16)]
    cfg = lab.lab_config(loss_mode="sft", prompts_per_step=16)
    policy = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    first = s.sft_step(policy, tok, opt, sched, math_task, examples, cfg)["loss"]
    for _ in range(3):
        last = s.sft_step(policy, tok, opt, sched, math_task, examples, cfg)["loss"]
    assert last < first


def test_final_answer_distillation_masks_the_chain_of_thought():
    tok = lab.build_lab_tokenizer()
    ids = tok(["3+4=7#7", "no marker"], add_special_tokens=False, padding=True,
              return_tensors="pt").input_ids
    mask = s.final_answer_mask(tok, ids, "#")
    assert mask[0, :7].tolist() == [0.0] * 6 + [1.0] and mask[1].sum() == 0   # then padding


def test_the_kl_anchor_also_applies_to_sdpo():
    model, tok = run_sequence.load_policy("lab")
    t = lab.make_lab_task("math")
    cfg = lab.lab_config(loss_mode="sdpo", kl_loss_coef=0.1, steps_per_task=3, warmup_steps=0,
                         prompts_per_step=8)
    policy = copy.deepcopy(model)
    history = s.train_task(policy, tok, s.Teacher(policy, cfg), t, cfg,
                           rng=s.seed_everything(0), reference=copy.deepcopy(model))
    assert history[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6) and history[-1]["kl_ref"] > 0


def test_evaluating_during_a_stage_leaves_the_training_unchanged():
    model, tok = run_sequence.load_policy("lab")
    t = lab.make_lab_task("math")
    params = []
    for every in (0, 1):
        cfg = lab.lab_config(loss_mode="grpo", steps_per_task=2, prompts_per_step=8,
                             eval_every=every, eval_examples=8, warmup_steps=0)
        policy = copy.deepcopy(model)
        history = s.train_task(policy, tok, None, t, cfg, rng=s.seed_everything(0),
                               curve=lambda step: s.curve_point(
                                   policy, tok, [t], cfg, (0, "curve", step)))
        params.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
        assert ("curve" in history[0]) == (every == 1)
    assert torch.equal(params[0], params[1])
