"""Which response tokens SDPO distils (the distillation mask): every token of a sample that has a
teacher context; with distill_scope='final_answer' only the tokens after the last answer marker;
with mask_ratio a random share of them dropped (SDPO-CL); and the tokens the mask leaves out
carry no loss."""
import pytest
import torch

import sdpo_cl as s
from harness import lab

ANSWERS = ["3+4=7#7", "1#2#5", "no marker", "#1"]       # two groups of two, every sample solved


def hand_batch(tok, answers, **cfg_kw):
    """A hand-made batch of the lab's prompt '3+4=' with the given answers as responses, every
    reward 1 (so each sample's sibling is its demonstration), and its loss targets."""
    cfg = lab.lab_config("lab-short", loss_mode="sdpo", group_size=2, prompts_per_step=len(answers) // 2,
                         **cfg_kw)
    prompts = [s.format_prompt(tok, "3+4=")] * len(answers)
    prompt_ids, prompt_mask = s.tokenize_prompts(tok, prompts, "cpu")
    rows = [tok(a, add_special_tokens=False).input_ids for a in answers]
    mask = s.pad_cat([[1.0] * len(r) for r in rows], 0)
    rollout = s.Rollout(prompt_ids, prompt_mask, s.pad_cat(rows, tok.pad_token_id), mask,
                        torch.zeros_like(mask), list(answers))
    task = s.Task("t", [], [], lambda c, ex: 1.0)
    samples = [{"prompt": "3+4=", "answer": "7"}] * len(answers)
    targets = s.loss_targets(rollout, samples, torch.ones(len(answers)), task, tok, cfg)
    return cfg, rollout, targets


def test_final_answer_mask_keeps_the_tokens_after_the_last_marker(random_lab):
    _, tok = random_lab
    ids = tok(["3+4=7#7", "no marker"], add_special_tokens=False, padding=True,
              padding_side="right", return_tensors="pt").input_ids   # not what a rollout left
    mask = s.final_answer_mask(tok, ids, "#")
    assert mask[0, :7].tolist() == [0.0] * 6 + [1.0] and mask[1].sum() == 0   # then padding


def test_every_token_of_a_sample_with_a_teacher_is_distilled_by_default(random_lab):
    _, tok = random_lab
    _, rollout, targets = hand_batch(tok, ANSWERS)
    assert torch.equal(targets.distill_mask, rollout.response_mask)


def test_final_answer_scope_distils_only_what_follows_the_last_marker(random_lab):
    _, tok = random_lab
    _, _, targets = hand_batch(tok, ANSWERS, distill_scope="final_answer")
    expected = [[0, 0, 0, 0, 0, 0, 1, 0, 0],              # 3+4=7#7
                [0, 0, 0, 0, 1, 0, 0, 0, 0],              # 1#2#5: after the last one
                [0] * 9,                                  # no marker: nothing
                [0, 1, 0, 0, 0, 0, 0, 0, 0]]              # #1
    assert targets.distill_mask.tolist() == expected


@pytest.mark.parametrize("ratio", [0.25, 0.6])
def test_mask_ratio_drops_that_share_of_the_distilled_tokens(random_lab, ratio):
    _, tok = random_lab
    torch.manual_seed(0)
    _, rollout, targets = hand_batch(tok, ["abcdefgh" * 6] * 8, mask_ratio=ratio)
    kept, n = targets.distill_mask, rollout.response_mask.sum().item()      # 384 tokens
    assert torch.all((kept == 0) | (kept == rollout.response_mask))         # a subset of them
    share = kept.sum().item() / n
    assert abs(share - (1 - ratio)) <= 3 * (ratio * (1 - ratio) / n) ** 0.5   # 3 s.e.


def test_mask_ratio_one_drops_every_token(random_lab):
    _, tok = random_lab
    _, _, targets = hand_batch(tok, ANSWERS, mask_ratio=1.0)
    assert targets.distill_mask.sum() == 0


@pytest.mark.parametrize("cfg_kw", [dict(distill_scope="final_answer"), dict(mask_ratio=1.0)])
def test_tokens_outside_the_mask_carry_no_loss(random_lab, cfg_kw):
    model, tok = random_lab
    answers = ["no marker", "none here"]                  # final_answer: nothing to distil
    cfg, rollout, targets = hand_batch(tok, answers, **cfg_kw)
    _, everything, full_targets = hand_batch(tok, answers)
    rows = torch.arange(len(answers))
    _, metrics = s.micro_batch_loss(model, s.Teacher(model, cfg), None, rollout, targets, rows,
                                    rows, cfg)
    _, full = s.micro_batch_loss(model, s.Teacher(model, cfg), None, everything, full_targets,
                                 rows, rows, cfg)
    assert metrics["loss_sdpo"] == 0.0 and full["loss_sdpo"] > 1e-6
