"""The methods run_sequence.py compares: the Config values each one fixes, as the paper and the
README describe them, on top of the run's settings."""
import pytest

import run_sequence
import sdpo_cl as s
from harness import lab

# what each method must set, written out from the paper (SDPO_0, SDPO_5%, ...) and the README
EXPECTED = {
    "grpo": dict(loss_mode="grpo", ppo_mini_batch_size=8, kl_loss_coef=0.0),
    "grpo_one_step": dict(loss_mode="grpo", ppo_mini_batch_size=0),
    "sdpo": dict(loss_mode="sdpo", teacher_regularization="ema", teacher_update_rate=0.05,
                 distillation_weight=1.0, reset_teacher_each_task=True),
    "sdpo_frozen": dict(loss_mode="sdpo", teacher_update_rate=0.0, reset_teacher_each_task=True),
    "sdpo_frozen_base": dict(loss_mode="sdpo", teacher_update_rate=0.0,
                             reset_teacher_each_task=False),
    "sdpo_ema01": dict(loss_mode="sdpo", teacher_update_rate=0.01, teacher_update_every=1),
    "sdpo_ema02": dict(loss_mode="sdpo", teacher_update_rate=0.02, teacher_update_every=1),
    "stable_sdpo": dict(loss_mode="sdpo", teacher_update_rate=0.4, teacher_update_every=10,
                        reset_teacher_each_task=True),
    "sdpo_live": dict(loss_mode="sdpo", teacher_regularization="live"),
    "sdpo_trust_region": dict(loss_mode="sdpo", teacher_regularization="trust-region",
                              teacher_update_rate=0.05),
    "sdpo_mask50": dict(loss_mode="sdpo", mask_ratio=0.5),
    "hybrid": dict(loss_mode="sdpo", distillation_weight=0.5),
    "sdpo_ema50": dict(loss_mode="sdpo", teacher_update_rate=0.5),
    "sdpo_frozen_answer": dict(loss_mode="sdpo", teacher_update_rate=0.0,
                               distill_scope="final_answer",
                               remove_thinking_from_demonstration=True),
    "sdpo_frozen_cot": dict(loss_mode="sdpo", teacher_update_rate=0.0,
                            remove_thinking_from_demonstration=False),
    "replay": dict(loss_mode="sdpo", replay_fraction=0.25),
    "grpo_replay": dict(loss_mode="grpo", ppo_mini_batch_size=8, replay_fraction=0.25),
    "sdpo_kl": dict(loss_mode="sdpo", kl_loss_coef=0.1),
    "sft": dict(loss_mode="sft", kl_loss_coef=0.0),
    "multitask": dict(loss_mode="sdpo", multitask=True),
    "grpo_multitask": dict(loss_mode="grpo", ppo_mini_batch_size=8, multitask=True),
    "grpo_lr_tenth": dict(loss_mode="grpo", ppo_mini_batch_size=8, lr=1e-4 / 10),
    "sdpo_content50": dict(loss_mode="sdpo", misleading_share=0.5, misleading_kind="content"),
    "sdpo_content100": dict(loss_mode="sdpo", misleading_share=1.0, misleading_kind="content"),
    "sdpo_format50": dict(loss_mode="sdpo", misleading_share=0.5, misleading_kind="format"),
    "sdpo_format100": dict(loss_mode="sdpo", misleading_share=1.0, misleading_kind="format"),
    "grpo_lora": dict(loss_mode="grpo", ppo_mini_batch_size=8, lora_rank=8, lr=10 * 1e-4),
    "sdpo_lora": dict(loss_mode="sdpo", teacher_update_rate=0.05, lora_rank=8, lr=10 * 1e-4),
}


def test_every_method_is_specified_here():
    assert set(EXPECTED) == set(run_sequence.METHODS)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_each_method_fixes_its_settings(method):
    cfg = run_sequence.method_config(method, {"prompts_per_step": 32}, {}, lab.lab_config)
    assert {key: getattr(cfg, key) for key in EXPECTED[method]} == EXPECTED[method]


def test_grpo_takes_four_optimizer_steps_per_batch_and_grpo_one_step_one():
    settings = {"prompts_per_step": 16}
    four = run_sequence.method_config("grpo", settings, {}, lab.lab_config)
    one = run_sequence.method_config("grpo_one_step", settings, {}, lab.lab_config)
    assert len(s.minibatches(four, [1] * 16 * four.group_size)) == 4
    assert len(s.minibatches(one, [1] * 16 * one.group_size)) == 1


def test_grpo_needs_a_batch_of_a_multiple_of_four_prompts():
    with pytest.raises(ValueError, match="prompts_per_step=6 must be a multiple of 4"):
        run_sequence.method_config("grpo", {"prompts_per_step": 6}, {}, lab.lab_config)


def test_the_other_settings_are_the_runs():
    cfg = run_sequence.method_config("hybrid", {"prompts_per_step": 8, "alpha": 1.0},
                                     {"alpha": 1.0}, lab.lab_config)
    assert (cfg.prompts_per_step, cfg.alpha, cfg.lr) == (8, 1.0, lab.lab_config().lr)


def test_the_readme_lists_every_method_and_no_other():
    """The README's Methods section names each method of run_sequence.METHODS (`name`); every
    other name there is a Config field or a lab task, not a method that does not exist."""
    import dataclasses
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z][a-z0-9_]*)`", section))
    other = {f.name for f in dataclasses.fields(s.Config)} | set(lab.LABS["lab"].families)
    assert set(run_sequence.METHODS) <= named
    assert named - other - set(run_sequence.METHODS) == set()
