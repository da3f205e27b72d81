"""It learns: from the shipped lab base, eight seeded steps of GRPO, and of SDPO, raise the sampled
test accuracy on math beyond noise: by more than 3 standard errors of the difference between the
two evaluations (runs on two CPUs gained 50-65 points in 15 steps; 3 standard errors are about 15
points), so the check holds on any CPU."""
import copy
import math

import pytest

import run_sequence
import sdpo_cl as s
from conftest import computed_ahead
from harness import lab


@computed_ahead("learning_records")
def eight_steps_of_each(_folder):
    """{loss mode: the records of eight steps of it on lab-short's math}. Computed beside the
    tests (conftest.py)."""
    model, tok = run_sequence.load_policy("lab-short")
    out = {}
    for loss_mode in ("grpo", "sdpo"):
        cfg = lab.lab_config("lab-short", loss_mode=loss_mode, steps_per_task=8, seed=0,
                             ppo_mini_batch_size=8 if loss_mode == "grpo" else 0)
        out[loss_mode] = s.continual_sequence(cfg, copy.deepcopy(model), tok,
                                              [lab.make_lab_task("math", "lab-short")])
    return out


@pytest.mark.parametrize("loss_mode", ["grpo", "sdpo"])
def test_eight_steps_raise_math_accuracy_beyond_noise(learning_records, loss_mode):
    (before, after), (se_before, se_after) = (
        [r[key]["math"] for r in learning_records[loss_mode]] for key in ("accuracy", "stderr"))
    noise = 3 * math.sqrt(se_before ** 2 + se_after ** 2)
    assert after - before > noise, f"{loss_mode}: {before:.2f} -> {after:.2f} (3 s.e. {noise:.2f})"
