"""Supervised fine-tuning on the gold answers, the reference point for forgetting: its loss is
the mean negative log-likelihood of the gold tokens, and its steps raise their likelihood."""
import copy
import math

import pytest
import torch

import sdpo_cl as s
from harness import lab


def test_sft_loss_is_the_mean_negative_log_likelihood_of_the_gold_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))   # [1, 2, 3]
    targets, mask = torch.tensor([[0, 1]]), torch.ones(1, 2)
    expected = (-math.log(0.5) - math.log(0.8)) / 2
    assert s.sft_loss(logits, targets, mask).item() == pytest.approx(expected, abs=1e-6)
    assert s.sft_loss(logits, targets, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        -math.log(0.5), abs=1e-6)


def test_an_sft_step_is_the_mean_nll_of_each_gold_answer_and_its_eos(short_lab):
    """Each example alone, unpadded: the mean over its answer tokens and the EOS of -log p, then
    the mean over examples (micro1-token-mean), before the step's update."""
    model, tok = short_lab
    task = lab.make_lab_task("math", "lab-short")
    examples = [task.train[i] for i in range(4)]
    expected = []
    with torch.no_grad():
        for ex in examples:
            prompt = tok(s.format_prompt(tok, ex["prompt"]), add_special_tokens=False).input_ids
            answer = tok(ex["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            expected.append(-logp.gather(-1, torch.tensor(answer)[:, None]).mean().item())
    cfg = lab.lab_config("lab-short", loss_mode="sft", prompts_per_step=4)
    policy = copy.deepcopy(model)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    first = s.sft_step(policy, tok, opt, sched, task, examples, cfg)["loss"]
    assert first == pytest.approx(sum(expected) / 4, abs=1e-5)
    for _ in range(3):
        last = s.sft_step(policy, tok, opt, sched, task, examples, cfg)["loss"]
    assert last < first                                   # the steps raise their likelihood
