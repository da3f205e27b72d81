"""It learns: on a lab base that holds both the right tool-call habit and a wrong one (arguments
in prompt order), 15 seeded steps of GRPO, and of SDPO, raise greedy test accuracy by at least
8 points. Measured when this test was written (2 cores, torch 2.13 CPU): 23% -> 36% (GRPO) and
23% -> 38% (SDPO), seed 0."""
import copy

import pytest

import sdpo_cl as s

MARGIN = 0.08


@pytest.fixture(scope="module")
def tool_base():
    model, tok = s.build_lab_base(s.LabRecipe(families=("tool",), steps=300), verbose=False)
    return model, tok, s.make_lab_task("tool", n_test=100)


@pytest.mark.parametrize("loss_mode", ["grpo", "sdpo"])
def test_a_few_dozen_steps_raise_tool_accuracy(tool_base, loss_mode):
    model, tok, task = tool_base
    cfg = s.lab_config(loss_mode=loss_mode, steps_per_task=15, seed=0)
    records = s.continual_sequence(cfg, copy.deepcopy(model), tok, [task])
    before, after = records[0]["accuracy"]["tool"], records[1]["accuracy"]["tool"]
    assert 0.05 < before < 0.6, "the base must be partial for the test to mean anything"
    assert after >= before + MARGIN, f"{loss_mode}: {before:.2f} -> {after:.2f}"
