"""`python sdpo_cl.py` walks through one rollout batch with the module's own functions: the
losses it prints are the ones the training step computes on the same batch, and the same
command prints the same trace."""
import copy

import pytest
import torch

import run_sequence
import sdpo_cl as s
from harness import lab
from harness.walkthrough import walkthrough


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    printed = []
    result = walkthrough(prompts=4, group_size=8, out=out, echo=printed.append)
    return result, printed, out


def test_it_writes_the_page_and_the_figure(walk):
    _, printed, out = walk
    page = (out / "walkthrough.md").read_text()
    assert page.startswith("# Walkthrough") and "(walkthrough.png)" in page
    assert (out / "walkthrough.png").stat().st_size > 1000
    for part in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert any(line.startswith(part) for line in printed), part


@pytest.mark.parametrize("mode", ["grpo", "sdpo"])
def test_its_losses_are_the_training_steps_on_the_same_batch(walk, mode):
    result, _, _ = walk
    model, tok = run_sequence.load_policy("lab")
    task = lab.make_lab_task("math")
    cfg = lab.lab_config(loss_mode=mode, prompts_per_step=4, group_size=8, warmup_steps=0,
                         ppo_mini_batch_size=1 if mode == "grpo" else 0)
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    s.seed_everything(0, "walkthrough")               # the walkthrough's rollout, drawn again
    metrics = s.train_step(policy, tok, s.Teacher(policy, cfg) if mode == "sdpo" else None,
                           optimizer, scheduler, task, [task.train[i] for i in range(4)], cfg)
    assert metrics["loss"] == pytest.approx(result[mode]["loss"], abs=1e-6)


def test_the_same_command_prints_the_same_trace(walk, tmp_path):
    _, printed, _ = walk
    again = []
    walkthrough(prompts=4, group_size=8, out=tmp_path, echo=again.append)
    assert again == printed
