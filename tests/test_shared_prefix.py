"""The shared teacher prefix (Part II's speed-up): each distinct teacher prompt runs once and the
responses are scored on copies of its KV cache; the logits equal one full forward per sequence."""
import pytest
import torch

import sdpo_cl as s
from harness import lab


def prefixes_and_responses():
    """Three left-padded teacher prefixes of different lengths and five responses (two ending
    early with EOS) on a randomly initialised lab model."""
    tok = lab.build_lab_tokenizer()
    model = lab.build_lab_model(tok, seed=3)
    prefix_ids, prefix_mask = s.tokenize_prompts(tok, ["12+5=\nCorrect: 17\n", "7+1=", "a"], "cpu")
    torch.manual_seed(0)
    response_ids = torch.randint(5, 60, (5, 6))
    response_mask = torch.ones(5, 6)
    response_mask[1, 3:] = 0
    response_mask[4, 1:] = 0
    return model, prefix_ids, prefix_mask, torch.tensor([0, 0, 1, 2, 1]), response_ids, \
        response_mask


def test_shared_prefix_scoring_equals_one_forward_per_sequence():
    model, p_ids, p_mask, rows, r_ids, r_mask = prefixes_and_responses()
    with torch.no_grad():
        full = model(**s.sequence_inputs(p_ids[rows], p_mask[rows], r_ids, r_mask)).logits[:, :-1]
    shared = s.shared_prefix_logits(model, p_ids, p_mask, rows, r_ids, r_mask)
    assert shared.shape == full.shape == (5, 6, model.config.vocab_size)
    valid = r_mask.bool()
    assert torch.allclose(shared[valid], full[valid], atol=1e-5)


def test_shared_prefix_scoring_of_a_one_token_response():
    model, p_ids, p_mask, rows, r_ids, r_mask = prefixes_and_responses()
    with torch.no_grad():
        full = model(**s.sequence_inputs(p_ids[rows], p_mask[rows], r_ids[:, :1], r_mask[:, :1])
                     ).logits[:, :-1]
    shared = s.shared_prefix_logits(model, p_ids, p_mask, rows, r_ids[:, :1], r_mask[:, :1])
    assert torch.allclose(shared, full, atol=1e-5)


def test_a_training_policy_with_gradient_checkpointing_still_scores_with_its_prefix():
    """The live teacher is the policy in training mode; the prefix cache must not be dropped."""
    model, p_ids, p_mask, rows, r_ids, r_mask = prefixes_and_responses()
    expected = s.shared_prefix_logits(model, p_ids, p_mask, rows, r_ids, r_mask)
    model.activation_checkpointing_enable()
    model.train()
    got = s.shared_prefix_logits(model, p_ids, p_mask, rows, r_ids, r_mask)
    assert model.training
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_teacher_scores_with_and_without_the_shared_prefix_agree(share_prefix):
    model, p_ids, p_mask, rows, r_ids, r_mask = prefixes_and_responses()
    with torch.no_grad():
        full = model(**s.sequence_inputs(p_ids[rows], p_mask[rows], r_ids, r_mask)).logits[:, :-1]
        got = s.teacher_scores(model, p_ids, p_mask, rows, r_ids, r_mask, share_prefix)
    valid = r_mask.bool()
    assert torch.allclose(got[valid], full[valid], atol=1e-5)
