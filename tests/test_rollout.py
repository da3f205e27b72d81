"""Rollout: the response mask ends at the first EOS (also when pad == eos), generate() records
the sampling log-probs of the tokens it draws, completions are decoded without EOS and padding,
and rollouts sampled in chunks are concatenated with the right padding."""
import pytest
import torch

import sdpo_cl as s
from harness import lab


def test_mask_keeps_the_first_eos_and_drops_what_follows():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9]])       # eos = 2, pad = 0
    mask = s.response_mask_from_positions(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]   # no EOS: all tokens count


def test_mask_is_right_when_pad_equals_eos():
    ids = torch.tensor([[5, 2, 2, 2, 2]])                         # pad == eos == 2
    assert s.response_mask_from_positions(ids, [2]).tolist() == [[1, 1, 0, 0, 0]]


def test_the_mask_ends_at_the_first_of_several_eos_ids():
    ids = torch.tensor([[5, 9, 2, 0], [3, 3, 3, 9]])
    assert s.response_mask_from_positions(ids, [2, 9]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_generate_masks_each_answer_at_its_eos_and_records_its_log_probs(random_lab, pad_is_eos):
    model, tok = random_lab
    if pad_is_eos:
        tok = lab.build_lab_tokenizer()
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)   # an untrained model: EOS comes at random, in about a third of rows
    prompts = [s.format_prompt(tok, p) for p in ("3+4=", "rev(abcd)")]
    ro = s.generate(model, tok, prompts, 40, num_return_sequences=8)
    assert ro.response_ids.shape[0] == 16 and len(ro.completions) == 16
    eos = tok.eos_token_id
    assert 0 < (ro.response_ids == eos).any(1).sum() < 16
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


def test_completions_are_decoded_without_eos_and_padding(random_lab):
    _, tok = random_lab
    ids = torch.tensor([[tok.convert_tokens_to_ids("7"), tok.eos_token_id, tok.pad_token_id]])
    assert s.decode_completions(tok, ids, s.response_mask_from_positions(ids, [tok.eos_token_id])
                                ) == ["7"]


def test_rollouts_in_chunks_are_concatenated_with_padding():
    tok = lab.build_lab_tokenizer()
    a = s.Rollout(torch.tensor([[5, 6]]), torch.ones(1, 2), torch.tensor([[7]]), torch.ones(1, 1),
                  torch.tensor([[-0.5]]), ["x"])
    b = s.Rollout(torch.tensor([[5]]), torch.ones(1, 1), torch.tensor([[8, 9]]), torch.ones(1, 2),
                  torch.tensor([[-0.1, -0.2]]), ["yz"])
    r = s.concat_rollouts([a, b], tok.pad_token_id)
    pad = tok.pad_token_id
    assert r.prompt_ids.tolist() == [[5, 6], [pad, 5]]
    assert r.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert r.response_ids.tolist() == [[7, pad], [8, 9]]
    assert r.response_mask.tolist() == [[1, 0], [1, 1]] and r.completions == ["x", "yz"]
    assert torch.allclose(r.old_logprobs, torch.tensor([[-0.5, 0.0], [-0.1, -0.2]]))
