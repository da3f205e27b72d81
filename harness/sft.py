"""Sequential supervised fine-tuning on the gold answers: the reference point for forgetting
(`--methods sft`; the lab's interference is calibrated on it, docs/lab.md), not one of the two
methods the paper compares, so it lives here rather than in sdpo_cl.py. The same prompts and
batches as GRPO and SDPO (sdpo_cl.train_task draws them); its step takes the place of
sdpo_cl.train_step through the hooks: `hooks.train_step = sft_step` (Config.loss_mode='sft').
"""
from __future__ import annotations

import time

import torch

import sdpo_cl as sc


def sft_loss(logits, target_ids, mask, agg="token-mean"):
    """Negative log-likelihood of the target tokens. logits: [B, T, V] with position t
    predicting target_ids[:, t]; mask: [B, T]."""
    return sc.aggregate(-sc.token_logprobs(logits, target_ids), mask, agg)


def sft_step(policy, tokenizer, optimizer, scheduler, task, examples, cfg) -> dict:
    """One optimizer step on the gold answers of `examples` (each followed by the EOS),
    accumulated over micro-batches, then the lr schedule moves. Returns its metrics."""
    t_start, device = time.time(), policy.device
    prompts = [sc.format_prompt(tokenizer, ex["prompt"], ex.get("system"), cfg.enable_thinking)
               for ex in examples]
    prompt_ids, prompt_mask = sc.tokenize_prompts(tokenizer, prompts, device)
    answers = [tokenizer(ex["answer"], add_special_tokens=False).input_ids
               + [tokenizer.eos_token_id] for ex in examples]
    answer_ids = sc.pad_cat(answers, tokenizer.pad_token_id).to(device)            # [B, T]
    answer_mask = sc.pad_cat([[1.0] * len(a) for a in answers], 0).to(device)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for rows in torch.arange(len(examples)).split(cfg.micro_batch_size or len(examples)):
        with sc.autocast_for(cfg, policy):
            logits = sc.response_scores(policy, prompt_ids[rows], prompt_mask[rows],
                                        answer_ids[rows], answer_mask[rows])
        share = sc.aggregation_share(answer_mask[rows], answer_mask, cfg.loss_agg_mode)
        loss = share * sft_loss(logits, answer_ids[rows], answer_mask[rows], cfg.loss_agg_mode)
        sc.backward_finite(loss)
        total += loss.item()
    grad_norm = sc.clipped_optimizer_step(policy, optimizer, cfg.grad_clip)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return {"loss": total, "grad_norm": grad_norm, "lr": lr, "updates": 1,
            "seconds": time.time() - t_start}


class Hooks(sc.Hooks):
    """sdpo_cl's plain hooks with SFT's step: what train_task and continual_sequence need to
    train loss_mode='sft' outside a run folder (run_sequence.run_in_folder sets train_step on
    its own hooks)."""
    train_step = staticmethod(sft_step)
