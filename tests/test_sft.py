"""Supervised fine-tuning on the gold answers, the reference point for forgetting (harness/
sft.py): its loss is the mean negative log-likelihood of the gold tokens, its steps raise their
likelihood, and it trains through sdpo_cl's loop only as the hooks' train_step."""
import copy
import json
import math

import pytest
import torch

import run_sequence
import sdpo_cl as s
from conftest import tiny_argv
from harness import lab, sft


def test_sft_loss_is_the_mean_negative_log_likelihood_of_the_gold_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))   # [1, 2, 3]
    targets, mask = torch.tensor([[0, 1]]), torch.ones(1, 2)
    expected = (-math.log(0.5) - math.log(0.8)) / 2
    assert sft.sft_loss(logits, targets, mask).item() == pytest.approx(expected, abs=1e-6)
    assert sft.sft_loss(logits, targets, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
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
    first = sft.sft_step(policy, tok, opt, sched, task, examples, cfg)["loss"]
    assert first == pytest.approx(sum(expected) / 4, abs=1e-5)
    for _ in range(3):
        last = sft.sft_step(policy, tok, opt, sched, task, examples, cfg)["loss"]
    assert last < first                                   # the steps raise their likelihood


def test_the_core_refuses_to_train_sft_without_its_step(short_lab):
    """loss_mode='sft' would otherwise run train_step with no SDPO weight: GRPO, silently."""
    model, tok = short_lab
    cfg = lab.lab_config("lab-short", loss_mode="sft", prompts_per_step=2, steps_per_task=1)
    task = lab.make_lab_task("math", "lab-short")
    with pytest.raises(ValueError, match=r"loss_mode='sft' has no step in sdpo_cl.py: pass "
                                         r"hooks=harness.sft.Hooks\(\)"):
        s.train_task(copy.deepcopy(model), tok, None, task, cfg, rng=s.seed_everything(0))


@pytest.mark.parametrize("mode, hooks", [("sft", s.Hooks()), ("grpo", sft.Hooks())])
def test_the_sequence_refuses_a_step_that_does_not_match_the_loss_mode(short_lab, mode, hooks):
    """Before the base's evaluation: SFT without its step, or a method run with SFT's step (a
    run labelled GRPO that trained SFT)."""
    model, tok = short_lab
    cfg = lab.lab_config("lab-short", loss_mode=mode, prompts_per_step=2, steps_per_task=1)
    with pytest.raises(ValueError, match=f"Config.loss_mode='{mode}' with hooks.train_step="):
        s.continual_sequence(cfg, copy.deepcopy(model), tok,
                             [lab.make_lab_task("math", "lab-short")], hooks=hooks)


def test_the_loop_trains_sft_with_the_hooks_step(short_lab):
    """train_task with sft.Hooks runs sft_step on the batches it draws: one update a batch, the
    same loss as sft_step on the same examples from the same weights."""
    model, tok = short_lab
    cfg = lab.lab_config("lab-short", loss_mode="sft", prompts_per_step=4, steps_per_task=2)
    task = lab.make_lab_task("math", "lab-short")
    history = s.train_task(copy.deepcopy(model), tok, None, task, cfg, rng=s.seed_everything(0),
                           hooks=sft.Hooks())
    assert [h["updates"] for h in history] == [1, 1]
    first = s.next_batch(task, (), cfg, s.seed_everything(0), [])[0]
    policy = copy.deepcopy(model).train()
    opt, sched = s.make_optimizer(policy, cfg)
    assert history[0]["loss"] == pytest.approx(
        sft.sft_step(policy, tok, opt, sched, task, first, cfg)["loss"], abs=1e-6)


def test_the_driver_trains_sft_with_its_step_and_draws_no_empty_figure(tmp_path, recwarn):
    """`--methods sft` goes through the driver's hooks: every logged step is an SFT step (one
    update, no reward: nothing is sampled), and the report draws no collapse figure (SFT has no
    rollouts to measure) and warns of nothing."""
    run_sequence.main(tiny_argv(methods="sft", steps="2") + ["--out", str(tmp_path), "--name", "r"])
    logged = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    steps = [line for line in logged if "step" in line]
    assert len(steps) == 2 and all(h["updates"] == 1 and "reward" not in h for h in steps)
    assert (tmp_path / "r" / "accuracy.png").exists()
    assert not (tmp_path / "r" / "collapse.png").exists()
    assert not [w for w in recwarn if "legend" in str(w.message)]
