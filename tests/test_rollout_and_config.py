"""Rollout masks and log-probs on the lab's real tokenizer and model; config validation; lab
tasks and rewards."""
import pytest
import torch

import sdpo_cl as s
from harness import data
from harness import lab


def test_mask_keeps_the_first_eos_and_drops_what_follows():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9]])       # eos = 2, pad = 0
    mask = s.response_mask_from_positions(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]   # no EOS: all tokens count


def test_mask_is_right_when_pad_equals_eos():
    ids = torch.tensor([[5, 2, 2, 2, 2]])                         # pad == eos == 2
    assert s.response_mask_from_positions(ids, [2]).tolist() == [[1, 1, 0, 0, 0]]


def test_mask_with_several_eos_ids():
    ids = torch.tensor([[5, 9, 2, 0], [3, 3, 3, 9]])
    assert s.response_mask_from_positions(ids, [2, 9]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.fixture(scope="module")
def untrained():
    tok = lab.build_lab_tokenizer()
    return lab.build_lab_model(tok), tok


def test_lab_tokenizer_is_character_level_with_a_chat_template(untrained):
    _, tok = untrained
    text = s.format_prompt(tok, "3+4=")
    assert text == "<|user|>3+4=<|assistant|>"
    ids = tok(text + "7", add_special_tokens=False).input_ids
    assert len(ids) == 1 + 4 + 1 + 1                            # specials are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == "3+4=7"


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_rollout_masks_and_sampling_logprobs(untrained, pad_is_eos):
    model, tok = untrained
    if pad_is_eos:
        tok = lab.build_lab_tokenizer()
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)   # an untrained model: EOS comes at random, in some rows only
    prompts = [s.format_prompt(tok, p) for p in ("3+4=", "rev(abcd)")]
    ro = s.generate(model, tok, prompts, 40, num_return_sequences=4)
    assert ro.response_ids.shape[0] == 8 and len(ro.completions) == 8
    eos = tok.eos_token_id
    assert 0 < (ro.response_ids == eos).any(1).sum() < 8
    for ids, m in zip(ro.response_ids, ro.response_mask):
        n = int(m.sum())
        hit = (ids == eos).nonzero()
        if len(hit):                               # the mask ends exactly at the first EOS
            assert n == hit[0].item() + 1 and ids[n - 1] == eos
        else:
            assert n == ids.shape[0]
    # old log-probs = log-probs of the same tokens under a full forward pass of the same model
    logits = model(**s.sequence_inputs(ro.prompt_ids, ro.prompt_mask, ro.response_ids,
                                       ro.response_mask)).logits[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, ro.response_ids[..., None]).squeeze(-1)
    assert torch.allclose(lp * ro.response_mask, ro.old_logprobs, atol=1e-4)


def test_completions_are_decoded_without_eos_and_padding(untrained):
    _, tok = untrained
    ids = torch.tensor([[tok.convert_tokens_to_ids("7"), tok.eos_token_id, tok.pad_token_id]])
    assert s.decode_completions(tok, ids, s.response_mask_from_positions(ids, [tok.eos_token_id])
                                ) == ["7"]


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


def test_lab_rewards_and_feedback():
    assert lab.number_reward("42 is it", {"answer": "42"}) == 1.0
    assert lab.number_feedback("40", {"answer": "42"}) == "Your answer 40 is too small."
    assert data.mcq_reward("<answer>A</answer> no, <answer>C</answer>",
                           {"answer": "<answer>C</answer>"}) == 1.0
    assert data.mcq_reward("C", {"answer": "<answer>C</answer>"}) == 1.0   # no tag: the whole text
    assert data.mcq_reward("<answer>c</answer>", {"answer": "C"}) == 0.0   # case-sensitive
    assert lab.tool_feedback("send(ann,3,hi,mon)", {"answer": "send(ann,4,hi,mon)"}) == \
        "Argument 2 ('3') is wrong."
    assert lab.string_feedback("abd", {"answer": "abc"}) == \
        "Test failed: the output is wrong at position 3."


def test_lab_tasks_have_unique_test_prompts_right_answers_and_wrong_habits():
    for name in lab.LAB_FAMILIES:
        task = lab.make_lab_task(name, n_train=50, n_test=40)
        assert len(set(task.test["prompt"])) == 40
        for ex in task.test:                        # the gold answer earns 1, the habit 0
            assert task.reward(ex["answer"], ex) == 1.0
            assert task.reward(ex["habit"], ex) == 0.0
