"""Evaluation (sdpo_cl.task_accuracy): the accuracy is the mean over test prompts of each
prompt's mean reward over its samples, and its standard error is that of the per-prompt means,
whatever the batching; it samples with the evaluation settings; an evaluation in the middle of a
stage leaves the training unchanged."""
import collections
import copy
import math

import pytest
import torch

import sdpo_cl as s
from harness import lab
from conftest import alternating_reward, flat_params

# the rewards of the 4 samples of each of the 3 test prompts, in the order they are sampled
OUTCOMES = [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]


def scripted_task():
    """The lab's math family with 3 test prompts, whose reward gives the i-th sample of the j-th
    prompt OUTCOMES[j][i], whatever the completion."""
    task = lab.make_lab_task("math", "lab-short", n_train=1, n_test=3)
    index = {ex["prompt"]: j for j, ex in enumerate(task.test)}
    asked = collections.Counter()

    def reward(completion, example):
        j = index[example["prompt"]]
        asked[j] += 1
        return OUTCOMES[j][asked[j] - 1]
    task.reward = reward
    return task


@pytest.mark.parametrize("batch_size", [100, 2])
def test_accuracy_and_standard_error_are_over_the_per_prompt_means(random_lab, batch_size):
    model, tok = random_lab
    cfg = lab.lab_config("lab-short", eval_examples=3, eval_samples=4, max_new_tokens=2)
    result = s.task_accuracy(model, tok, scripted_task(), cfg, batch_size=batch_size)
    # per-prompt means 1, 0, 0.5: mean 0.5, sample variance (0.25 + 0.25 + 0) / 2
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    assert len(result["completions"]) == 12 and len(result["sequences"]) == 12


@pytest.mark.parametrize("mode, expected", [
    ("sample", dict(sample=True, temperature=0.3, top_p=0.8, num_return_sequences=4)),
    ("greedy", dict(sample=False, temperature=0.3, top_p=0.8, num_return_sequences=1))])
def test_evaluation_samples_with_the_evaluation_settings(random_lab, monkeypatch, mode,
                                                         expected):
    """eval_temperature and eval_top_p (the official val_kwargs), never the training
    temperature; eval_samples per prompt, or one greedy answer."""
    model, tok = random_lab
    calls, generate = [], s.generate
    monkeypatch.setattr(s, "generate", lambda *a, **kw: calls.append(kw) or generate(*a, **kw))
    cfg = lab.lab_config("lab-short", eval_mode=mode, eval_examples=3, eval_samples=4, max_new_tokens=2,
                         temperature=1.7, eval_temperature=0.3, eval_top_p=0.8)
    result = s.task_accuracy(model, tok, lab.make_lab_task("math", "lab-short", n_train=1, n_test=3), cfg)
    assert calls == [expected]
    assert len(result["completions"]) == 3 * expected["num_return_sequences"]


def test_evaluating_during_a_stage_leaves_the_training_unchanged(random_lab):
    model, tok = random_lab
    held_out = lab.make_lab_task("math", "lab-short", n_train=1, n_test=4)
    params = []
    for every in (0, 1):
        task = lab.make_lab_task("math", "lab-short", n_train=8, n_test=1)
        task.reward = alternating_reward()                # asked by the training only
        cfg = lab.lab_config("lab-short", loss_mode="grpo", steps_per_task=2, prompts_per_step=2,
                             group_size=4, max_new_tokens=4, eval_every=every, eval_examples=4,
                             warmup_steps=0, lr=1e-2)
        policy = copy.deepcopy(model)
        history = s.train_task(policy, tok, None, task, cfg, rng=s.seed_everything(0),
                               curve=lambda step: s.curve_point(policy, tok, [held_out], cfg,
                                                                (0, "curve", step)))
        params.append(flat_params(policy))
        assert ("curve" in history[0]) == (every == 1)
    assert not torch.equal(params[0], flat_params(model))          # the stage trained
    assert torch.equal(params[0], params[1])
