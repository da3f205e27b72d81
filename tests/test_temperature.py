"""Training at a temperature T other than 1: pi = softmax(z / T) everywhere. The log-probs
generate() records are those of the tempered distribution it samples from; the student's logits
are divided by T (so a fresh batch is on-policy: every ratio is 1); the teacher's logits too (a
teacher shown the student's own prompt is the student: no divergence); and the reference's (a
reference equal to the policy: no KL)."""
import copy

import pytest
import torch

import sdpo_cl as s
from harness import lab
from conftest import rollout_batch

T = 0.5


def config(mode, **kw):
    return lab.lab_config("lab-short", loss_mode=mode, prompts_per_step=2, group_size=4, max_new_tokens=6,
                          temperature=T, **kw)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_generate_records_the_log_probs_of_the_tempered_distribution(random_lab, temperature):
    model, tok = random_lab
    torch.manual_seed(0)
    prompts = [s.format_prompt(tok, p) for p in ("3+4=", "rev(abcd)")]
    ro = s.generate(model, tok, prompts, 8, temperature=temperature, num_return_sequences=2)
    with torch.no_grad():
        logits = model(**s.sequence_inputs(ro.prompt_ids, ro.prompt_mask, ro.response_ids,
                                           ro.response_mask)).logits[:, :-1]
    expected = torch.log_softmax(logits / temperature, -1).gather(
        -1, ro.response_ids[..., None]).squeeze(-1) * ro.response_mask
    assert torch.allclose(ro.old_logprobs, expected, atol=1e-4)


def test_a_fresh_batch_is_on_policy_at_the_training_temperature(random_lab):
    """sample_rollout samples at T and the loss divides the student's logits by T: pi / pi_old
    is 1 on every token, so nothing is clipped."""
    model, tok = random_lab
    cfg = config("grpo")
    batch = rollout_batch(model, tok, cfg)
    _, metrics = s.micro_batch_loss(model, None, None, batch.rollout, batch.targets, batch.rows,
                                    batch.rows, cfg)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["clip_frac"] == 0.0


def test_the_teachers_logits_are_divided_by_the_temperature_too(random_lab):
    """A teacher whose context is the student's own prompt scores exactly what the student does;
    dividing both sides by T keeps the divergence at zero."""
    model, tok = random_lab
    cfg = config("sdpo")
    batch = rollout_batch(model, tok, cfg)
    ro, G = batch.rollout, cfg.group_size
    firsts = torch.arange(0, len(batch.rows), G)                     # one row per prompt
    own_prompt = s.Targets(batch.rewards, None, ro.response_mask, ro.prompt_ids[firsts],
                           ro.prompt_mask[firsts], batch.rows // G)
    _, metrics = s.micro_batch_loss(model, s.Teacher(model, cfg), None, ro, own_prompt,
                                    batch.rows, batch.rows, cfg)
    assert metrics["loss_sdpo"] == pytest.approx(0.0, abs=1e-6)
    _, real = s.micro_batch_loss(model, s.Teacher(model, cfg), None, ro, batch.targets,
                                 batch.rows, batch.rows, cfg)
    assert real["loss_sdpo"] > 1e-4                       # with a demonstration it is not zero


def test_the_reference_logits_are_divided_by_the_temperature_too(random_lab):
    model, tok = random_lab
    cfg = config("grpo", kl_loss_coef=1.0)
    batch = rollout_batch(model, tok, cfg)
    _, metrics = s.micro_batch_loss(model, None, copy.deepcopy(model), batch.rollout,
                                    batch.targets, batch.rows, batch.rows, cfg)
    assert metrics["kl_ref"] == pytest.approx(0.0, abs=1e-7)
