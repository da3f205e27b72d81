"""It learns: from the shipped lab base, a few seeded steps of GRPO, and of SDPO, raise the
sampled test accuracy on math by a wide margin. The base is the same file on every machine; the
margin (15 points, where runs on two CPUs gained 50-65 in 15 steps) absorbs the float rounding
in which CPUs differ."""
import copy

import pytest

import sdpo_cl as s
from harness import lab
import run_sequence

MARGIN = 0.15


@pytest.fixture(scope="module")
def base():
    model, tok = run_sequence.load_policy("lab")
    return model, tok, lab.make_lab_task("math")


@pytest.mark.parametrize("loss_mode", ["grpo", "sdpo"])
def test_eight_steps_raise_math_accuracy(base, loss_mode):
    model, tok, task = base
    cfg = lab.lab_config(loss_mode=loss_mode, steps_per_task=8, seed=0,
                         ppo_mini_batch_size=8 if loss_mode == "grpo" else 0)
    records = s.continual_sequence(cfg, copy.deepcopy(model), tok, [task])
    before, after = records[0]["accuracy"]["math"], records[1]["accuracy"]["math"]
    assert after >= before + MARGIN, f"{loss_mode}: {before:.2f} -> {after:.2f}"
