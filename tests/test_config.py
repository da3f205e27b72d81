"""Config validation: a value of the wrong type or out of range, or a combination that cannot
run, is refused with the field, the value and what is allowed."""
import pytest

import sdpo_cl as s


@pytest.mark.parametrize("field, value, allowed", [
    ("alpha", 1.5, r"\[0.0, 1.0\]"),
    ("distillation_topk", 0, "integer >= 1"),
    ("group_size", 1, "integer >= 2"),
    ("teacher_regularization", "slow", "'ema', 'trust-region', 'frozen', 'live'"),
    ("loss_agg_mode", "sum", "'token-mean'"),
    ("loss_mode", "ppo", "'grpo', 'sdpo'"),
    ("mask_ratio", -0.1, r"\[0.0, 1.0\]"),
    ("clip_ratio_c", 0.5, "> 1"),
    ("eval_mode", "beam", "'greedy', 'sample'"),
])
def test_bad_config_values_name_the_field_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=rf"Config\.{field}={value!r} is invalid: allowed .*{allowed}"):
        s.Config(**{field: value})


def test_sampled_token_mode_requires_reverse_kl():
    with pytest.raises(ValueError, match="Config.alpha=0.5.*full_logit_distillation=False"):
        s.Config(full_logit_distillation=False)


def test_teacher_path_needs_a_teacher_with_its_own_weights():
    with pytest.raises(ValueError, match="Config.teacher_path='ckpt' is invalid"):
        s.Config(teacher_path="ckpt", teacher_regularization="live")


def test_templates_must_keep_their_fields():
    with pytest.raises(ValueError, match="reprompt_template"):
        s.Config(reprompt_template="{prompt} only")
