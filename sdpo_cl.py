"""sdpo_cl.py: GRPO vs SDPO in continual post-training, in one readable file.

Both methods learn from the model's own samples. For each prompt, sample a group of G answers and
score each with a verifier (a reward in [0, 1]). Then:

GRPO (DeepSeekMath, arXiv 2402.03300) gives every answer one number, its advantage
A_i = r_i - mean_j r_j over the group, and raises the log-probability of each token of an answer
in proportion to it, through a PPO-style clipped ratio. Every token of an answer gets the same
scalar, and a group whose answers all score the same gives no gradient at all.

SDPO (Hübotter et al., arXiv 2601.20802) uses the same samples with a dense signal. The model is
its own teacher: shown a successful sibling answer (or textual feedback) in its prompt, it scores
every token of the student's answer, and the student is pulled toward the teacher's next-token
distribution at each position (a KL or Jensen-Shannon divergence on the student's top-k tokens).
SDPO replaces the GRPO loss; rewards only pick the demonstrations.

The experiment (Wang et al., "Denser != Better", arXiv 2607.01763) trains tasks T1..TN one after
another, evaluates every task after every stage, and asks which method forgets more.

Where this code departs from the official (verl) implementation, and why:
- The sampling log-probs are recorded while sampling, not recomputed by another forward pass:
  the same numbers, one pass fewer. With one optimizer step per rollout batch (SDPO) the PPO
  ratio is exactly 1; the GRPO baseline's four mini-batches per batch make it move.
- The SDPO teacher scores a group's failed samples on one shared KV cache of their common
  teacher prompt (share_teacher_prefix): the same logits up to rounding, less work.
- The SDPO teacher is carried from stage to stage; verl re-creates it with each stage's run
  (reset_teacher_each_task). The built-in lab scales the paper's settings down.
- seq-mean-token-sum-norm divides by the batch's padded length (verl: the generation budget).
- Additions the paper does not have: the k3 KL anchor for SDPO too (verl refuses it with SDPO),
  the live teacher, replay, multitask and SFT.
The rest follows the official code: the loss averaging its runs computed, the GRPO baseline's
mini-batches, the templates, the rewards, the warm-up, the sampled evaluation.

Reading order. Part I, the tutorial: Config -> the task contract -> rollout -> GRPO -> SDPO (the
teacher's context, the divergence, the loss) -> teachers -> one training step -> a task ->
evaluation -> the continual sequence -> drift. Part II, after its banner: the lab, real models
and data with the official rewards, the code sandbox, checkpoints, config checks, the training
step's plumbing and the walkthrough.
"""


from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


# ================================================================================================
# PART I: the methods and the experiment, in reading order
# ================================================================================================


# ================================================================================================
# Config: every knob, with the official names and defaults
# ================================================================================================


LOSS_MODES = ("grpo", "sdpo", "sft")
LOSS_AGG_MODES = ("micro1-token-mean", "token-mean", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm")
TEACHER_KINDS = ("ema", "trust-region", "frozen", "live")
EVAL_MODES = ("greedy", "sample")


# The official templates as the official SDPO config file renders them (block scalars `|-`: no
# trailing newline; the dataclass defaults of the official code end in newlines it drops).
REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
FEEDBACK_TEMPLATE = ("\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                     "{feedback_raw}")


@dataclass
class Config:
    """Every knob of one training run, with the official defaults (the paper's runs) unless a
    line says otherwise, and the official option name in the line where this name differs;
    fields the official code does not have say so. lab_config() in Part II scales them down."""

    # --- model and run --------------------------------------------------------------------------
    model: str = "lab"
    """'lab' (the built-in tiny model), a hub id, a local folder, or a .gguf file; recorded with
    the run (run_sequence.py loads the model from its --model)"""
    seed: int = 0
    """seeds python, torch and the rollout sampling"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'"""

    # --- rollout --------------------------------------------------------------------------------
    prompts_per_step: int = 32
    """prompts per rollout batch (data.train_batch_size)"""
    group_size: int = 8
    """G: completions sampled per prompt (actor_rollout_ref.rollout.n)"""
    max_new_tokens: int = 1024
    """generation budget per completion; a task may ask for less"""
    temperature: float = 1.0
    """sampling temperature for training rollouts"""
    rollout_chunk_size: int = 0
    """prompts per generate() call; 0 = all at once (smaller: less KV-cache memory)"""
    enable_thinking: bool = False
    """the chat template's thinking switch (Qwen3); off, as in the official runs"""

    # --- evaluation (the official val_kwargs) -----------------------------------------------------
    eval_mode: str = "sample"
    """'sample' (mean accuracy of eval_samples samples per prompt) or 'greedy'"""
    eval_temperature: float = 0.6
    """temperature when eval_mode='sample'"""
    eval_top_p: float = 0.95
    """nucleus mass when eval_mode='sample'"""
    eval_samples: int = 4
    """samples per test prompt when eval_mode='sample' (val_kwargs.n)"""
    eval_examples: int = 200
    """at most this many test examples per task (the first ones, so every stage sees the same)"""

    # --- optimiser ------------------------------------------------------------------------------
    ppo_mini_batch_size: int = 0
    """prompts per optimizer step, 0 = all (one step per rollout batch, SDPO's official 32 of
    32); the GRPO baseline's 8 of 32 takes four, its PPO ratio and clip acting from the second"""
    ppo_epochs: int = 1
    """passes over the rollout batch"""
    lr: float = 1e-5
    """AdamW learning rate (actor_rollout_ref.actor.optim.lr)"""
    warmup_steps: int = 10
    """verl's warm-up: rollout batch k (from 0) gets lr * k / warmup_steps, the first lr 0"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    adam_betas: tuple = (0.9, 0.999)
    """AdamW betas"""
    grad_clip: float = 1.0
    """max global gradient norm"""
    micro_batch_size: int = 0
    """sequences per forward/backward (accumulated); 0 = a mini-batch at once; same update"""
    gradient_checkpointing: bool = False
    """trade compute for activation memory (real models on small GPUs)"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU, where everything runs in fp32)"""

    # --- which loss -----------------------------------------------------------------------------
    loss_mode: str = "sdpo"
    """'grpo' or 'sdpo' (verl's policy_loss.loss_mode vanilla / sdpo); 'sft' trains on the gold
    answers instead, the usual reference point for forgetting"""
    distillation_weight: float = 1.0
    """w in (1-w)*GRPO + w*SDPO when loss_mode='sdpo'; 1.0 = pure SDPO (official; TRL's knob)"""

    # --- GRPO -----------------------------------------------------------------------------------
    norm_adv_by_std_in_grpo: bool = False
    """divide group-centred rewards by their std (the paper's baseline: off)"""
    clip_ratio_low: float = 0.2
    """epsilon_low of the PPO clip"""
    clip_ratio_high: float = 0.28
    """epsilon_high of the PPO clip"""
    clip_ratio_c: float | None = 3.0
    """dual-clip bound c for negative advantages (must be > 1)"""
    kl_loss_coef: float = 0.0
    """beta of the k3 KL to the frozen initial model (the paper: 0, no reference model kept)"""
    loss_agg_mode: str = "micro1-token-mean"
    """per-token losses -> one number (see aggregate); micro1-token-mean is what the paper's runs
    computed, verl's token-mean with one sequence per micro-batch"""

    # --- SDPO -----------------------------------------------------------------------------------
    alpha: float = 0.5
    """0 = KL(teacher||student), 1 = KL(student||teacher), between = generalised JSD"""
    full_logit_distillation: bool = True
    """distil distributions; False = sampled-token REINFORCE estimate (alpha must be 1)"""
    distillation_topk: int | None = 100
    """support = student's top-k tokens; None = the full vocabulary"""
    distillation_add_tail: bool = True
    """top-k: add a tail bucket for the remaining mass (True) or renormalise over k (False)"""
    is_clip: float | None = 2.0
    """cap of the detached importance weight pi/pi_old; None = no weight"""
    success_reward_threshold: float = 0.5
    """a sibling with reward >= this is a demonstration"""
    dont_reprompt_on_self_success: bool = True
    """never show a sample its own answer as the demonstration"""
    remove_thinking_from_demonstration: bool = True
    """strip <think>...</think> from the demonstration"""
    include_environment_feedback: bool = False
    """put the task's textual feedback on a failed sample in the teacher context"""
    environment_feedback_only_without_solution: bool = True
    """use feedback only when no demonstration exists"""
    reprompt_template: str = REPROMPT_TEMPLATE
    """teacher context; fields {prompt} {solution} {feedback}"""
    solution_template: str = SOLUTION_TEMPLATE
    """field {successful_previous_attempt}"""
    feedback_template: str = FEEDBACK_TEMPLATE
    """field {feedback_raw}"""
    teacher_regularization: str = "ema"
    """'ema', 'trust-region', 'frozen' (initial model) or 'live' (current student, no grad)"""
    teacher_update_rate: float = 0.05
    """tau of ema / trust-region; ema with 0.0 is the paper's frozen SDPO_0"""
    teacher_path: str | None = None
    """SDPO-CL: initialise the teacher from this checkpoint instead of the starting policy"""
    teacher_init_alpha: float = 1.0
    """SDPO-CL: teacher = a*checkpoint + (1-a)*student when teacher_path is set"""
    reset_teacher_each_task: bool = False
    """re-initialise the teacher from the policy at every task boundary (False = carry it over)"""
    mask_ratio: float = 0.0
    """SDPO-CL: drop this fraction of distilled tokens at random (less dense supervision)"""
    distill_scope: str = "all"
    """distil 'all' response tokens (a chain of thought too) or only the 'final_answer'"""
    answer_marker: str = "#"
    """with distill_scope='final_answer', the answer is what follows the last token holding it"""
    share_teacher_prefix: bool = True
    """score responses on one shared KV cache per teacher prompt (False: in full, as verl)"""

    # --- continual sequence and its remedies ---------------------------------------------------
    steps_per_task: int = 50
    """rollout batches per task"""
    replay_fraction: float = 0.0
    """share of each batch's prompts drawn from earlier tasks' training sets (replay)"""
    multitask: bool = False
    """draw every batch from all tasks of the sequence at once (the upper bound)"""
    eval_every: int = 0
    """also evaluate every this many rollout batches during a stage (learning curves)"""
    teacher_lift_every_stage: bool = False
    """measure the teacher lift after every stage too (always on the base model)"""

    def __post_init__(self):
        check_config(self)     # types, ranges and combinations: Part II


# ================================================================================================
# Tasks: examples, a verifiable reward in [0, 1], and optional rich feedback
# ================================================================================================


@dataclass
class Task:
    """A task = train/test examples (columns `prompt`, `answer`, optional `system`) and a
    verifier. `reward(completion, example)` returns a float in [0, 1]; `feedback(completion,
    example)` returns a short text saying what was wrong (usually without the answer), or None."""
    name: str
    train: Sequence[dict]         # a datasets.Dataset or a list of dicts
    test: Sequence[dict]          # a datasets.Dataset (evaluate selects rows from it)
    reward: Callable[[str, dict], float]
    feedback: Callable[[str, dict], str | None] | None = None
    max_new_tokens: int | None = None
    """a task's own generation budget (the lab's are short); None = Config.max_new_tokens"""
    well_formed: Callable[[str, dict], bool] | None = None
    """whether a completion has the task's answer format, right or wrong (the format-artifact
    measure of the collapse finding); None: not measured"""


def generation_budget(cfg, task) -> int:
    return min(cfg.max_new_tokens, task.max_new_tokens or cfg.max_new_tokens)


# ================================================================================================
# Rollout: G completions per prompt, response masks, the sampling policy's log-probs
# ================================================================================================


@dataclass
class Rollout:
    """A batch of sampled completions. Row i is completion i of prompt i // G.
    The prompt part is left-padded and the response part right-padded, as generate() returns."""
    prompt_ids: torch.Tensor       # [B, P]
    prompt_mask: torch.Tensor      # [B, P]  1 on real prompt tokens
    response_ids: torch.Tensor     # [B, T]
    response_mask: torch.Tensor    # [B, T]  1 up to and including the first EOS, float
    old_logprobs: torch.Tensor     # [B, T]  log pi_old(y_t) under the sampling distribution
    completions: list              # B decoded strings, without the EOS
    finished: torch.Tensor | None = None   # [B] bool: the answer ended with an EOS


@torch.no_grad()
def generate(model, tokenizer, prompt_texts, max_new_tokens, *, sample=True, temperature=1.0,
             top_p=1.0, num_return_sequences=1) -> Rollout:
    """Batched sampling (KV cache) of `num_return_sequences` completions per prompt text."""
    ids, attn = tokenize_prompts(tokenizer, prompt_texts, model.device)
    recorder = _RecordSampledLogprobs(temperature if sample else 1.0)
    eos = eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=sample,
        **(dict(temperature=temperature, top_p=top_p, top_k=0) if sample else {}),
        repetition_penalty=1.0, num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, logits_processor=[recorder])
    model.train(was_training)
    P = ids.shape[1]
    response_ids = out[:, P:]                                              # [B, T]
    mask = response_mask_from_positions(response_ids, eos)
    old_logprobs = recorder.finish(response_ids[:, -1]) * mask
    finished = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device)).any(1)
    return Rollout(ids.repeat_interleave(num_return_sequences, 0),
                   attn.repeat_interleave(num_return_sequences, 0), response_ids, mask,
                   old_logprobs, decode_completions(tokenizer, response_ids, mask), finished)


def response_mask_from_positions(response_ids, eos_token_ids):
    """[B, T] float mask: 1 on every token up to and including the first EOS, 0 after it.
    Built from positions, not from `ids != pad`, which would drop the EOS when pad == eos."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    T = response_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), T)   # no EOS -> all T valid
    return (torch.arange(T, device=response_ids.device)[None, :] <= first[:, None]).float()


# ================================================================================================
# GRPO: group-relative advantages and the clipped policy-gradient loss
# ================================================================================================


def grpo_advantages(rewards, group_size, norm_by_std=False, eps=1e-6):
    """A_i = r_i - mean_j r_j over each group of `group_size` consecutive rewards, optionally
    divided by the group's (unbiased) std + eps. rewards: [N] -> advantages: [N]."""
    r = rewards.float().view(-1, group_size)                  # [N / G, G]
    advantages = r - r.mean(dim=1, keepdim=True)
    if norm_by_std:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


def aggregate(per_token, mask, agg="token-mean"):
    """Reduce a [B, T] per-token loss to a scalar (verl's loss_agg_mode).
    micro1-token-mean: each sequence's mean over its valid tokens, averaged over all B sequences,
    those without a valid token counting as 0. This is what verl computes with one sequence per
    micro-batch (the paper's runs): a sample without an SDPO target still counts in B, so the
    update shrinks with the share of samples that have one, and long answers weigh less per token.
    token-mean: every valid token of the batch weighs the same (no length bias).
    seq-mean-token-mean: mean per sequence, then over the sequences that have a valid token
    (original GRPO; favours short answers). seq-mean-token-sum-norm: per-sequence sum over a
    constant T (Dr. GRPO), here the padded length of the batch, mask.shape[1].
    An all-zero mask gives a zero that is still connected to the graph."""
    masked = per_token * mask
    if agg == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if agg == "micro1-token-mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / max(mask.shape[0], 1)
    has_tokens = (mask.sum(1) > 0).float()                    # [B]
    if agg == "seq-mean-token-mean":
        per_seq = masked.sum(1) / mask.sum(1).clamp(min=1)
    elif agg == "seq-mean-token-sum-norm":
        per_seq = masked.sum(1) / mask.shape[1]
    else:
        raise ValueError(f"loss_agg_mode={agg!r} is invalid: allowed {', '.join(LOSS_AGG_MODES)}")
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def k3_kl(logprobs, ref_logprobs):
    """k3 = exp(ref - logp) - (ref - logp) - 1 per token: >= 0 and an unbiased estimate of
    KL(pi || ref) on tokens sampled from pi (verl's low_var_kl, before its clamp)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.28,
              dual_clip=3.0, ref_logprobs=None, beta=0.0, agg="token-mean"):
    """The clipped policy-gradient loss. logprobs, old_logprobs, ref_logprobs, mask: [B, T];
    advantages: [B] (one per sequence, broadcast over its tokens) or [B, T].
    Per token: -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A), capped at -dual_clip*A when
    A < 0 (a huge ratio on a bad answer cannot blow up the loss), plus beta*k3 to a reference."""
    A = advantages[:, None] if advantages.dim() == 1 else advantages
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # as verl: exp cannot overflow
    ratio = torch.exp(log_ratio)
    unclipped = -A * ratio
    clipped = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(A < 0, torch.minimum(per_token, -A * dual_clip), per_token)
    metrics = {"clip_frac": aggregate((clipped > unclipped).float(), mask).item(),
               "ratio_mean": aggregate(ratio.detach(), mask).item()}
    if ref_logprobs is not None and beta > 0:
        k3 = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * k3
        metrics["kl_ref"] = aggregate(k3.detach(), mask).item()
    return aggregate(per_token, mask, agg), metrics


# ================================================================================================
# SDPO: the teacher's context, the divergence, the loss
# ================================================================================================


# --- 1-3. The teacher's context: the prompt plus a successful sibling and/or feedback ----------


def strip_thinking(text: str) -> str:
    """Drop every <think>...</think> block, then everything up to a remaining unmatched </think>
    (a model whose template opens the block in the prompt), as SDPO-CL does."""
    text = re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)
    return re.sub(r"^.*?</think>\s*", "", text, flags=re.DOTALL)


def teacher_prompt(prompt, cfg, demonstration=None, feedback=None) -> str:
    """The user text the self-teacher sees: the prompt, a correct solution and/or feedback, and
    the instruction to solve the original question (the official templates). The teacher
    contexts, the teacher-lift evaluation and the lab's pre-training all build it here."""
    solution = ("" if demonstration is None else
                cfg.solution_template.format(successful_previous_attempt=demonstration))
    feedback = "" if feedback is None else cfg.feedback_template.format(feedback_raw=feedback)
    return cfg.reprompt_template.format(prompt=prompt, solution=solution, feedback=feedback)


def teacher_contexts(prompts, completions, rewards, feedbacks, group_size, cfg) -> list:
    """One teacher prompt per sample (the raw user text; the chat template is applied later), or
    None when there is neither a demonstration nor feedback: that sample's distillation mask is
    0. prompts: the prompt of each sample (length N, repeated G times); rewards: N floats;
    feedbacks: N strings or None."""
    contexts = []
    for i in range(len(completions)):
        group = range(i - i % group_size, i - i % group_size + group_size)
        demos = [j for j in group if rewards[j] >= cfg.success_reward_threshold
                 and not (cfg.dont_reprompt_on_self_success and j == i)]
        demo = feedback = None
        if demos:   # the first success: rollouts are i.i.d., so this is a random one (official)
            demo = completions[demos[0]]
            if cfg.remove_thinking_from_demonstration:
                demo = strip_thinking(demo)
        if (cfg.include_environment_feedback and feedbacks[i] and feedbacks[i].strip()
                and not (demos and cfg.environment_feedback_only_without_solution)):
            feedback = feedbacks[i]
        contexts.append(None if demo is None and feedback is None
                        else teacher_prompt(prompts[i], cfg, demo, feedback))
    return contexts


# --- 5. The divergence between the student's and the teacher's next-token distributions --------


def log_tail(logp_k):
    """log(1 - sum_k p_k) for log-probs [..., k] -> [..., 1]: the mass outside the support. The
    logsumexp is clamped below 0 so the tail never becomes log(0), and expm1 keeps precision when
    the support holds nearly all the mass."""
    lse = torch.logsumexp(logp_k, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.log(-torch.expm1(lse))


def topk_support(student_logp, teacher_logp, topk, add_tail=True):
    """Restrict both distributions to the student's top-k tokens at each position.
    Inputs are log-probs over the full vocabulary [B, T, V]; outputs [B, T, k+1] with the tail
    bucket (a proper distribution: k tokens plus "everything else"), or [B, T, k] renormalised
    over the k tokens."""
    k = min(topk, student_logp.shape[-1])
    student_k, index = student_logp.topk(k, dim=-1)
    teacher_k = teacher_logp.gather(-1, index)
    if add_tail:
        return (torch.cat([student_k, log_tail(student_k)], dim=-1),
                torch.cat([teacher_k, log_tail(teacher_k)], dim=-1))
    return (student_k - torch.logsumexp(student_k, -1, keepdim=True),
            teacher_k - torch.logsumexp(teacher_k, -1, keepdim=True))


def kl_divergence(logp, logq):
    """KL(p || q) summed over the last dimension, from log-probs. [..., K] -> [...]"""
    return (logp.exp() * (logp - logq)).sum(-1)


def generalized_jsd(student_logp, teacher_logp, alpha):
    """alpha = 0: KL(teacher || student) (forward); alpha = 1: KL(student || teacher) (reverse);
    otherwise (1-alpha) KL(S || M) + alpha KL(T || M) with M = (1-alpha) S + alpha T, computed in
    log space. The JSD itself tends to 0 at both ends, hence the two KL special cases."""
    if alpha == 0.0:
        return kl_divergence(teacher_logp, student_logp)
    if alpha == 1.0:
        return kl_divergence(student_logp, teacher_logp)
    log_m = torch.logsumexp(torch.stack([student_logp + math.log(1 - alpha),
                                         teacher_logp + math.log(alpha)]), dim=0)
    return ((1 - alpha) * kl_divergence(student_logp, log_m)
            + alpha * kl_divergence(teacher_logp, log_m))


# --- 4-7. The loss -----------------------------------------------------------------------------


def sdpo_loss(student_logits, teacher_logits, response_ids, mask, *, old_logprobs=None,
              alpha=0.5, topk=100, add_tail=True, full_logits=True, is_clip=2.0,
              agg="token-mean"):
    """Self-distillation loss on the student's own response tokens.
    student_logits, teacher_logits: [B, T, V], position t predicts response_ids[:, t]; the teacher
    saw the teacher context, the student the plain prompt. mask: [B, T], the response mask times
    the per-sample distillation mask (times the mask_ratio keep-mask). The teacher is a fixed
    target (stop-gradient). Both sides are normalised over the full vocabulary before top-k."""
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)         # [B, T, V]
    teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1).detach()
    logp = student_logp.gather(-1, response_ids[..., None]).squeeze(-1)      # [B, T]
    if full_logits:
        if topk is not None:
            student_logp, teacher_logp = topk_support(student_logp, teacher_logp, topk, add_tail)
        per_token = generalized_jsd(student_logp, teacher_logp, alpha)
    else:   # REINFORCE estimate of KL(student || teacher) from the sampled token alone
        teacher_tok = teacher_logp.gather(-1, response_ids[..., None]).squeeze(-1)
        per_token = (logp - teacher_tok).detach() * logp
    metrics = {"divergence": aggregate(per_token.detach(), mask).item()}
    if is_clip is not None and old_logprobs is not None:
        # importance weight pi/pi_old for off-policy steps; 1 on the first step of a batch
        weight = torch.exp((logp.detach() - old_logprobs).clamp(-20.0, 20.0)).clamp(max=is_clip)
        per_token = per_token * weight
    return aggregate(per_token, mask, agg), metrics


# ================================================================================================
# Teachers: where the teacher's weights come from (teacher_regularization)
# ================================================================================================


@torch.no_grad()
def ema_update_(teacher, student, tau):
    """theta_T <- (1 - tau) theta_T + tau theta_S, in place."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach().to(t.dtype), tau)


def trust_region_logits(ref_logits, student_logits, tau):
    """The trust-region teacher: lerp(ref, student, tau) in logit space."""
    return torch.lerp(ref_logits, student_logits, tau)


class Teacher:
    """Scores response tokens after a teacher context, without gradients.
    ema: its own weights (`model`), moved toward the student once per rollout batch (tau = 0:
    frozen, the paper's SDPO_0). frozen: its own weights, never moved. live: the current student.
    trust-region: lerp(reference, student, tau) in logit space, `reference` being the frozen
    initial model."""

    def __init__(self, policy, cfg: Config):
        self.kind, self.tau, self.cfg = cfg.teacher_regularization, cfg.teacher_update_rate, cfg
        self.model = self.reference = None
        self.reset(policy)

    def reset(self, policy):
        """(Re-)initialise from the policy, or from teacher_path mixed in by teacher_init_alpha."""
        if self.kind == "live":
            return
        weights = copy.deepcopy(policy).eval().requires_grad_(False)
        if self.cfg.teacher_path:
            from transformers import AutoModelForCausalLM
            ckpt = AutoModelForCausalLM.from_pretrained(self.cfg.teacher_path)
            for t, c in zip(weights.parameters(), ckpt.parameters()):
                t.lerp_(c.to(t.device, t.dtype), self.cfg.teacher_init_alpha)
        if self.kind == "trust-region":
            self.reference = weights
        else:
            self.model = weights

    @property
    def weights(self):
        """The teacher's own weights (ema, frozen) or its reference (trust-region): what a
        checkpoint must keep. None for the live teacher."""
        return self.model if self.model is not None else self.reference

    @torch.no_grad()
    def logits(self, policy, score):
        """The teacher's logits, where score(model) runs a model on the teacher's inputs."""
        if self.kind == "live":
            return score(policy)
        if self.kind == "trust-region":
            return trust_region_logits(score(self.reference), score(policy), self.tau)
        return score(self.model)

    def after_rollout_batch(self, policy):
        """The EMA teacher moves once per rollout batch, after all of its optimizer steps."""
        if self.kind == "ema" and self.tau > 0:
            ema_update_(self.model, policy, self.tau)


# ================================================================================================
# One training step: rollout -> rewards -> targets -> loss per micro-batch -> optimizer -> teacher
# ================================================================================================


@dataclass
class Targets:
    """What the losses need besides the rollout, computed once per rollout batch."""
    rewards: torch.Tensor                   # [B]
    advantages: torch.Tensor | None         # [B]     GRPO: group-centred rewards
    distill_mask: torch.Tensor | None       # [B, T]  SDPO: response mask x has a teacher context
    teacher_ids: torch.Tensor | None        # [U, P'] the U distinct teacher prompts, left-padded
    teacher_mask: torch.Tensor | None       # [U, P']
    teacher_of: torch.Tensor | None         # [B]     row -> index into U (-1: no context)
    malformed: torch.Tensor | None = None   # [B]     1 where a sample breaks the task's format


def sample_rollout(policy, tokenizer, task, examples, cfg):
    """G completions per prompt at the training temperature, and their rewards."""
    prompts = [format_prompt(tokenizer, ex["prompt"], ex.get("system"), cfg.enable_thinking)
               for ex in examples]
    chunk = cfg.rollout_chunk_size or len(prompts)
    with autocast_for(cfg, policy):
        rollout = concat_rollouts([
            generate(policy, tokenizer, prompts[i:i + chunk], generation_budget(cfg, task),
                     sample=True, temperature=cfg.temperature, num_return_sequences=cfg.group_size)
            for i in range(0, len(prompts), chunk)], tokenizer.pad_token_id)
    samples = [examples[i // cfg.group_size] for i in range(len(rollout.completions))]
    rewards = torch.tensor([float(task.reward(c, ex))
                            for c, ex in zip(rollout.completions, samples)])
    return rollout, samples, rewards


def distillation_weight(cfg) -> float:
    """w in (1 - w) * GRPO + w * SDPO: 0 for GRPO, distillation_weight for SDPO."""
    return cfg.distillation_weight if cfg.loss_mode == "sdpo" else 0.0


def loss_targets(rollout, samples, rewards, task, tokenizer, cfg) -> Targets:
    """GRPO's advantages and SDPO's teacher inputs (each distinct teacher prompt tokenized once)."""
    device, sdpo_weight = rollout.response_ids.device, distillation_weight(cfg)
    targets = Targets(rewards, None, None, None, None, None)
    if task.well_formed is not None:   # a measure only: the format artifacts of the samples
        targets.malformed = torch.tensor([0.0 if task.well_formed(c, ex) else 1.0 for c, ex in
                                          zip(rollout.completions, samples)], device=device)
    if sdpo_weight < 1:
        targets.advantages = grpo_advantages(rewards, cfg.group_size,
                                             cfg.norm_adv_by_std_in_grpo).to(device)
    if sdpo_weight > 0:
        feedbacks = [task.feedback(c, ex) if task.feedback and cfg.include_environment_feedback
                     else None for c, ex in zip(rollout.completions, samples)]
        contexts = teacher_contexts([ex["prompt"] for ex in samples], rollout.completions,
                                    rewards.tolist(), feedbacks, cfg.group_size, cfg)
        texts = [None if c is None else format_prompt(tokenizer, c, ex.get("system"),
                                                      cfg.enable_thinking)
                 for c, ex in zip(contexts, samples)]
        distinct = list(dict.fromkeys(t for t in texts if t is not None))
        index = {t: u for u, t in enumerate(distinct)}
        targets.teacher_of = torch.tensor([index.get(t, -1) for t in texts], device=device)
        has_context = (targets.teacher_of >= 0).float()
        targets.distill_mask = rollout.response_mask * has_context[:, None]
        if cfg.distill_scope == "final_answer":   # not the chain of thought, only the answer
            targets.distill_mask = targets.distill_mask * final_answer_mask(
                tokenizer, rollout.response_ids, cfg.answer_marker)
        if cfg.mask_ratio > 0:   # SDPO-CL: drop a share of the distilled tokens at random
            keep = torch.rand_like(targets.distill_mask) >= cfg.mask_ratio
            targets.distill_mask = targets.distill_mask * keep
        if distinct:
            targets.teacher_ids, targets.teacher_mask = tokenize_prompts(tokenizer, distinct,
                                                                         device)
    return targets


def grpo_part(logprobs, rollout, targets, rows, minibatch, cfg):
    """(share of the mini-batch, GRPO loss of `rows`, metrics weighted by the share)."""
    mask = rollout.response_mask
    share = aggregation_share(mask[rows], mask[minibatch], cfg.loss_agg_mode)
    loss, m = grpo_loss(logprobs, rollout.old_logprobs[rows], targets.advantages[rows],
                        mask[rows], clip_low=cfg.clip_ratio_low, clip_high=cfg.clip_ratio_high,
                        dual_clip=cfg.clip_ratio_c, agg=cfg.loss_agg_mode)
    tokens = aggregation_share(mask[rows], mask[minibatch], "token-mean")
    return share, loss, {"loss_grpo": share * loss.item(), "clip_frac": tokens * m["clip_frac"],
                         "ratio_mean": tokens * m["ratio_mean"]}


def sdpo_part(policy, teacher, student_logits, rollout, targets, rows, minibatch, cfg):
    """(share of the mini-batch, SDPO loss, metrics) for the rows of `rows` that have a teacher
    context, or None when none has. student_logits: [b, T, V] of all of `rows`."""
    local = (targets.teacher_of[rows] >= 0).nonzero().squeeze(1)    # rows with a context
    if len(local) == 0:
        return None
    ids, mask = rollout.response_ids[rows][local], rollout.response_mask[rows][local]
    distill = targets.distill_mask[rows][local]
    share = aggregation_share(distill, targets.distill_mask[minibatch], cfg.loss_agg_mode)
    t0 = time.time()
    used, prefix_of = targets.teacher_of[rows][local].unique(return_inverse=True)
    with autocast_for(cfg, policy):
        teacher_logits = teacher.logits(policy, lambda model: teacher_scores(
            model, targets.teacher_ids[used], targets.teacher_mask[used], prefix_of, ids, mask,
            cfg.share_teacher_prefix))                                          # [l, T, V]
    t_teacher = time.time() - t0
    loss, m = sdpo_loss(student_logits[local], teacher_logits.float() / cfg.temperature, ids,
                        distill, old_logprobs=rollout.old_logprobs[rows][local], alpha=cfg.alpha,
                        topk=cfg.distillation_topk, add_tail=cfg.distillation_add_tail,
                        full_logits=cfg.full_logit_distillation, is_clip=cfg.is_clip,
                        agg=cfg.loss_agg_mode)
    metrics = {"loss_sdpo": share * loss.item(), "divergence": share * m["divergence"],
               "t_teacher": t_teacher}
    if targets.malformed is not None:
        metrics.update(artifact_gap(student_logits[local], teacher_logits, ids, distill,
                                    targets.malformed[rows][local], cfg.temperature))
    return share, loss, metrics


def micro_batch_loss(policy, teacher, reference, rollout, targets, rows, minibatch, cfg):
    """The loss of `rows` (a micro-batch) scaled to its share of `minibatch` (the rows of one
    optimizer step), so that the micro-batches' losses add up to the mini-batch's loss:
    (1 - w) GRPO + w SDPO (+ the KL anchor). Returns (loss, metrics weighted the same way)."""
    mask, ids, sdpo_weight = rollout.response_mask, rollout.response_ids, distillation_weight(cfg)
    with autocast_for(cfg, policy):
        logits = policy(**sequence_inputs(rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                          ids[rows], mask[rows]), use_cache=False).logits
    logits = logits[:, :-1].float() / cfg.temperature          # [b, T, V]: pi = softmax(z / temp)
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, ids[rows, :, None]).squeeze(-1)          # [b, T]
    with torch.no_grad():                                                   # a metric only
        entropy = -(logp_all.exp() * logp_all).sum(-1)                      # [b, T]
    metrics = {"entropy": aggregation_share(mask[rows], mask[minibatch], "token-mean")
               * aggregate(entropy, mask[rows]).item()}
    loss = logits.sum() * 0.0   # graph-connected zero: the step runs even without any target
    parts = []                  # (weight, (share, loss, metrics)) of each term
    if sdpo_weight < 1:
        parts.append((1 - sdpo_weight, grpo_part(logprobs, rollout, targets, rows, minibatch, cfg)))
    if sdpo_weight > 0:
        parts.append((sdpo_weight, sdpo_part(policy, teacher, logits, rollout, targets, rows,
                                             minibatch, cfg)))
    if cfg.kl_loss_coef > 0:
        parts.append((cfg.kl_loss_coef, kl_anchor(logprobs, reference, rollout, rows, minibatch,
                                                  cfg)))
    for weight, part in parts:
        if part is not None:
            share, part_loss, part_metrics = part
            loss = loss + weight * share * part_loss
            metrics.update(part_metrics)
    metrics["loss"] = loss.item()
    return loss, metrics


def minibatches(cfg, n_rows) -> list:
    """Row indices of each optimizer step: ppo_epochs passes over consecutive groups of
    ppo_mini_batch_size prompts (verl splits the batch in order, without shuffling)."""
    rows_per_step = (cfg.ppo_mini_batch_size or cfg.prompts_per_step) * cfg.group_size
    steps = [torch.arange(r0, min(r0 + rows_per_step, n_rows))
             for r0 in range(0, n_rows, rows_per_step)]
    return steps * cfg.ppo_epochs


def train_step(policy, tokenizer, teacher, optimizer, scheduler, task, examples, cfg,
               reference=None) -> dict:
    """One rollout batch: sample and reward, compute the targets of each loss, then update the
    policy on them. examples: `prompts_per_step` task rows. reference: the frozen initial model,
    needed only for the k3 KL anchor (kl_loss_coef > 0)."""
    if cfg.kl_loss_coef > 0 and reference is None:
        raise ValueError("Config.kl_loss_coef > 0 needs the frozen reference model")
    t_start = time.time()
    rollout, samples, rewards = sample_rollout(policy, tokenizer, task, examples, cfg)
    t_rollout = time.time() - t_start
    targets = loss_targets(rollout, samples, rewards, task, tokenizer, cfg)
    totals = update(policy, teacher, optimizer, scheduler, rollout, targets, cfg, reference)
    return step_metrics(rollout, targets, totals, cfg) | {
        "seconds": time.time() - t_start, "t_rollout": t_rollout}


def update(policy, teacher, optimizer, scheduler, rollout, targets, cfg, reference=None) -> dict:
    """One optimizer step per mini-batch (gradients accumulated over micro-batches), then the
    learning-rate schedule and the EMA teacher move once. Returns the loss metrics, averaged
    over the optimizer steps."""
    totals, updates = {}, minibatches(cfg, len(targets.rewards))
    for minibatch in updates:
        optimizer.zero_grad(set_to_none=True)
        for micro in minibatch.split(cfg.micro_batch_size or len(minibatch)):
            loss, metrics = micro_batch_loss(policy, teacher, reference, rollout, targets, micro,
                                             minibatch, cfg)
            backward_finite(loss)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / len(updates)
        grad_norm = clipped_optimizer_step(policy, optimizer, cfg.grad_clip)
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm / len(updates)
    totals["t_teacher"] = totals.get("t_teacher", 0.0) * len(updates)      # a sum, not a mean
    totals.update(updates=len(updates), lr=scheduler.get_last_lr()[0])
    scheduler.step()
    if teacher is not None:
        teacher.after_rollout_batch(policy)
    return totals


# ================================================================================================
# A task: steps_per_task rollout batches with a fresh optimizer
# ================================================================================================


def seed_everything(*keys):
    """Seed python and torch from any keys, e.g. (seed, stage): a stage's randomness depends only
    on them, so a resumed run repeats an uninterrupted one exactly (on CPU)."""
    s = int(hashlib.sha256(repr(keys).encode()).hexdigest()[:8], 16)
    random.seed(s)
    torch.manual_seed(s)
    return random.Random(s)


def train_task(policy, tokenizer, teacher, task, cfg, *, rng, reference=None, log=None,
               desc="train", others=(), curve=None) -> list:
    """`steps_per_task` rollout batches on one task. A fresh AdamW with verl's warm-up per task,
    as each stage of the paper is a new verl run started from the previous checkpoint.
    others: the tasks that replay_fraction or multitask draw prompts from. curve(step): an
    evaluation during the stage, every eval_every batches."""
    policy.train()
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    # fused=True: one kernel for all parameters (transformers' Trainer default), several times
    # faster than the per-tensor loop on a 100M-parameter model
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(     # verl's warm-up: batch s gets lr * s / W
        optimizer, lambda s: min(1.0, s / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    order, history = [], []
    bar = tqdm(range(cfg.steps_per_task), desc=desc, leave=False, disable=None)
    for step in bar:
        examples, batch_task = next_batch(task, others, cfg, rng, order)
        try:
            if cfg.loss_mode == "sft":
                metrics = sft_step(policy, tokenizer, optimizer, scheduler, batch_task, examples,
                                   cfg)
            else:
                metrics = train_step(policy, tokenizer, teacher, optimizer, scheduler,
                                     batch_task, examples, cfg, reference)
        except FloatingPointError as e:
            last = history[-1] if history else {}
            raise FloatingPointError(f"{desc}: step {step}: {e}; last finite metrics: {last}")
        metrics["step"] = step
        if curve is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            metrics["curve"] = curve(step + 1)
        history.append(metrics)
        if log is not None:
            log(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
    policy.eval()
    return history


def next_batch(task, others, cfg, rng, order):
    """The prompts of one rollout batch and the task that scores them: the next ones of a
    shuffled pass over the task's training set (order: the rest of the pass); with
    replay_fraction, that share drawn at random from the earlier tasks `others`; with multitask,
    every prompt from one of `others` (all tasks) uniformly."""
    n_other = (cfg.prompts_per_step if cfg.multitask
               else round(cfg.replay_fraction * cfg.prompts_per_step) if others else 0)
    n_own = cfg.prompts_per_step - n_other
    if n_own and len(order) < n_own:     # a new shuffled pass over the train set
        order[:] = rng.sample(range(len(task.train)), len(task.train))
    examples = [task.train[i] for i in order[:n_own]]
    del order[:n_own]
    if n_other == 0:
        return examples, task
    drawn = [others[rng.randrange(len(others))] for _ in range(n_other)]
    mixed = ([dict(ex, task=task.name) for ex in examples]
             + [dict(t.train[rng.randrange(len(t.train))], task=t.name) for t in drawn])
    return mixed, mix_tasks([task, *others])


def sft_loss(logits, target_ids, mask, agg="token-mean"):
    """Negative log-likelihood of the target tokens. logits: [B, T, V] with position t
    predicting target_ids[:, t]; mask: [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target_ids[..., None])
    return aggregate(-logp.squeeze(-1), mask, agg)


def sft_step(policy, tokenizer, optimizer, scheduler, task, examples, cfg) -> dict:
    """The reference point for forgetting: one optimizer step of supervised fine-tuning on the
    gold answers (+ EOS) of the batch's prompts, the budget of one rollout batch."""
    t_start, device = time.time(), policy.device
    prompts = [format_prompt(tokenizer, ex["prompt"], ex.get("system"), cfg.enable_thinking)
               for ex in examples]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device)
    answers = [tokenizer(ex["answer"], add_special_tokens=False).input_ids
               + [tokenizer.eos_token_id] for ex in examples]
    answer_ids, answer_mask = pad_right(answers, tokenizer.pad_token_id, device)   # [B, T]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for rows in torch.arange(len(examples)).split(cfg.micro_batch_size or len(examples)):
        with autocast_for(cfg, policy):
            logits = policy(**sequence_inputs(prompt_ids[rows], prompt_mask[rows],
                                              answer_ids[rows], answer_mask[rows])).logits
        share = aggregation_share(answer_mask[rows], answer_mask, cfg.loss_agg_mode)
        loss = share * sft_loss(logits[:, :-1], answer_ids[rows], answer_mask[rows],
                                cfg.loss_agg_mode)
        backward_finite(loss)
        total += loss.item()
    grad_norm = clipped_optimizer_step(policy, optimizer, cfg.grad_clip)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return {"loss": total, "grad_norm": grad_norm, "lr": lr, "updates": 1,
            "seconds": time.time() - t_start}


# ================================================================================================
# Evaluation: accuracy with the task's own reward, and the signal each method will get
# ================================================================================================


@torch.no_grad()
def evaluate(model, tokenizer, task, cfg, *, with_demonstration=False, batch_size=100) -> dict:
    """Accuracy on the first `eval_examples` test rows, as the official code evaluates: the mean
    reward of `eval_samples` samples per prompt at eval_temperature / eval_top_p (or greedy).
    `stderr` is the standard error of that mean over prompts (samples of one prompt are not
    independent, so it is taken from the per-prompt means). With `with_demonstration`, every
    prompt carries its gold answer as a demonstration, as the SDPO teacher sees it."""
    examples = task.test.select(range(min(cfg.eval_examples, len(task.test))))
    sample = cfg.eval_mode == "sample"
    n = cfg.eval_samples if sample else 1
    per_prompt, completions, sequences = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        texts = [format_prompt(tokenizer, teacher_prompt(ex["prompt"], cfg, ex["answer"])
                               if with_demonstration else ex["prompt"], ex.get("system"),
                               cfg.enable_thinking) for ex in chunk]
        ro = generate(model, tokenizer, texts, generation_budget(cfg, task),
                      sample=sample, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                      num_return_sequences=n)
        scores = [task.reward(c, chunk[i // n]) for i, c in enumerate(ro.completions)]
        per_prompt += [sum(scores[i:i + n]) / n for i in range(0, len(scores), n)]
        completions += ro.completions
        sequences += [(p[pm > 0].tolist(), r[m > 0].tolist()) for p, pm, r, m in zip(
            ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)]
    mean = sum(per_prompt) / len(per_prompt)
    var = sum((x - mean) ** 2 for x in per_prompt) / max(len(per_prompt) - 1, 1)
    return {"accuracy": mean, "stderr": math.sqrt(var / len(per_prompt)),
            "completions": completions, "sequences": sequences}


@torch.no_grad()
def rollout_signal(model, tokenizer, task, cfg, n_prompts=64) -> dict:
    """What GRPO and SDPO will have to learn from, before any training: on n_prompts training
    prompts, G samples each at the training temperature, the mean reward, the share of groups
    with at least one success (SDPO's demonstrations) and of groups whose rewards are all equal
    (no GRPO advantage)."""
    examples = [task.train[i] for i in range(min(n_prompts, len(task.train)))]
    _, _, rewards = sample_rollout(model, tokenizer, task, examples, cfg)
    groups = rewards.view(-1, cfg.group_size)
    return {"reward": rewards.mean().item(),
            "solved_groups": (groups.max(1).values >= cfg.success_reward_threshold
                              ).float().mean().item(),
            "zero_adv_groups": (groups.std(1) == 0).float().mean().item()}


def signal_warnings(signal) -> list:
    """Plain warnings where a method will have almost no signal to learn from."""
    warnings = []
    if signal["solved_groups"] < 0.1:
        warnings.append("fewer than 10% of groups have a success: SDPO will have almost no "
                        "demonstration")
    if signal["zero_adv_groups"] > 0.9:
        warnings.append("more than 90% of groups score all alike: GRPO will have almost no "
                        "advantage")
    if signal["teacher_lift"] < 0.05:
        warnings.append("a correct demonstration barely helps: the self-teacher has little to add")
    return warnings


def signal_check(model, tokenizer, task, cfg, n_prompts=64) -> dict:
    """rollout_signal, the test accuracy without and with a correct demonstration in the
    prompt (the teacher lift: what a self-teacher can add), and the warnings."""
    plain = evaluate(model, tokenizer, task, cfg)
    demo = evaluate(model, tokenizer, task, cfg, with_demonstration=True)
    signal = {**rollout_signal(model, tokenizer, task, cfg, n_prompts),
              "accuracy": plain["accuracy"], "stderr": plain["stderr"],
              "with_demonstration": demo["accuracy"],
              "teacher_lift": demo["accuracy"] - plain["accuracy"]}
    return {**signal, "warnings": signal_warnings(signal)}


def evaluate_during_stage(policy, tokenizer, tasks, cfg, keys) -> dict:
    """Accuracy on each task in the middle of a stage (a learning curve), seeded by `keys`
    without disturbing the training's random state: the run trains exactly as without it."""
    python_state = random.getstate()
    devices = [policy.device.index or 0] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed_everything(*keys)
        accuracy = {t.name: evaluate(policy, tokenizer, t, cfg)["accuracy"] for t in tasks}
    random.setstate(python_state)
    return accuracy


# ================================================================================================
# The continual sequence: train T1..TN in order, evaluate every task after every stage
# ================================================================================================


def evaluate_stage(policy, tokenizer, tasks, cfg, base, base_sequences, lift=False):
    """Row k of the accuracy matrix (with standard errors) plus the drift and artifact measures,
    and with `lift` the teacher lift: the model's accuracy with a correct demonstration in its
    prompt (the SDPO teacher's view) minus its plain accuracy, what a self-teacher can add.
    Returns (record, sequences): the (prompt, response) token ids of one sample per test prompt,
    on which later stages measure response drift when this is the base model."""
    record = {"accuracy": {}, "stderr": {}, "samples": {}}
    completions, sequences = [], []
    for task in tasks:
        plain = evaluate(policy, tokenizer, task, cfg)
        record["accuracy"][task.name] = plain["accuracy"]
        record["stderr"][task.name] = plain["stderr"]
        record["samples"][task.name] = plain["completions"][:3]
        completions += plain["completions"]
        n = cfg.eval_samples if cfg.eval_mode == "sample" else 1
        sequences += plain["sequences"][::n]
        if lift:
            demo = evaluate(policy, tokenizer, task, cfg, with_demonstration=True)
            record.setdefault("teacher_lift", {})[task.name] = demo["accuracy"] - plain["accuracy"]
    record["artifacts"] = format_artifacts(completions)
    record["param_drift"] = parameter_drift(policy, base)
    record["response_kl"] = response_kl(policy, base, base_sequences or sequences)
    record["response_similarity"] = response_similarity(
        [tokenizer.decode(r, skip_special_tokens=True) for _, r in sequences],
        [tokenizer.decode(r, skip_special_tokens=True) for _, r in base_sequences or sequences])
    return record, sequences


def base_evaluation(base, tokenizer, tasks, cfg) -> dict:
    """Row 0, the base model on every task with its teacher lift, and the base's own answers that
    response drift is measured on. Seeded independently of cfg.seed, so every method and seed of
    a run starts from the same row 0 and a run computes it once."""
    t0 = time.time()
    seed_everything("base-eval")
    record, sequences = evaluate_stage(base, tokenizer, tasks, cfg, base, None, lift=True)
    return {"record": {"stage": 0, "task": "base", **record, "seconds": time.time() - t0},
            "sequences": sequences}


def continual_sequence(cfg, policy, tokenizer, sequence, probes=(), *, steps=None, folder=None,
                       log=None, desc="", base_eval=None) -> list:
    """Train the tasks of `sequence` one after another, starting from `policy`; evaluate every
    task of sequence + probes before the first stage (row 0, the base model) and after each.
    Returns one record per stage; record["accuracy"] is row k of the accuracy matrix R.
    With a folder, each finished stage is checkpointed (policy and teacher) and a rerun resumes
    after the last finished stage. The SDPO teacher is carried over from stage to stage unless
    reset_teacher_each_task (then it restarts from the policy at each new task). `steps` may
    give each task its own number of steps (default: cfg.steps_per_task for every task).
    base_eval: row 0 from base_evaluation(), when the caller shares it between runs."""
    eval_tasks = list(sequence) + [p for p in probes if p.name not in {t.name for t in sequence}]
    base = copy.deepcopy(policy).eval().requires_grad_(False)
    teacher = Teacher(policy, cfg) if cfg.loss_mode == "sdpo" else None
    done = last_finished_stage(folder)
    records = [json.loads((Path(folder) / f"stage{k}" / "stage.json").read_text())
               for k in range(done + 1)]
    if done >= 0:
        base_eval = {"record": records[0], "sequences": json.loads(
            (Path(folder) / "stage0" / "base_sequences.json").read_text())}
    if done > 0:
        load_stage_weights(folder, done, policy, teacher)
    if base_eval is None:
        base_eval = base_evaluation(base, tokenizer, eval_tasks, cfg)
    for k in range(done + 1, len(sequence) + 1):
        t0 = time.time()
        if k == 0:
            record = dict(base_eval["record"])
        else:
            task = sequence[k - 1]
            rng = seed_everything(cfg.seed, "train", k)
            if teacher is not None and cfg.reset_teacher_each_task and k > 1:
                teacher.reset(policy)
            stage_cfg = dataclasses.replace(cfg, steps_per_task=steps[k - 1]) if steps else cfg
            history = train_task(
                policy, tokenizer, teacher, task, stage_cfg, rng=rng, reference=base,
                log=(lambda m: log({"stage": k, "task": task.name, **m})) if log else None,
                desc=f"{desc} stage {k}/{len(sequence)} {task.name}".strip(),
                others=list(sequence) if cfg.multitask else list(sequence[:k - 1]),
                curve=lambda step: evaluate_during_stage(policy, tokenizer, eval_tasks, cfg,
                                                         (cfg.seed, "curve", k, step)))
            record = {"stage": k, "task": task.name, "train": stage_summary(history),
                      "curve": [{"step": h["step"] + 1, "accuracy": h["curve"]}
                                for h in history if "curve" in h]}
            seed_everything(cfg.seed, "eval", k)
            record.update(evaluate_stage(policy, tokenizer, eval_tasks, cfg, base,
                                         base_eval["sequences"], cfg.teacher_lift_every_stage)[0])
            record["seconds"] = time.time() - t0
        records.append(record)
        if folder is not None:
            save_stage(folder, k, record, policy, tokenizer, teacher,
                       {"base_sequences.json": base_eval["sequences"]} if k == 0 else None)
    return records


# ================================================================================================
# Drift and artifacts: how far the model moved, in parameters and in responses
# ================================================================================================


def layer_type(name: str) -> str:
    for key, kind in (("embed", "embedding"), ("lm_head", "embedding"), ("attn", "attention"),
                      ("mlp", "mlp"), ("norm", "norm")):
        if key in name:
            return kind
    return "other"


@torch.no_grad()
def parameter_drift(model, base) -> dict:
    """||theta - theta_0|| / ||theta_0||, overall and per layer type (attention, mlp, ...), and
    the mean principal angle between the top singular subspaces of each attention and MLP
    weight matrix before and after ("subspace_angle", degrees; the paper's analysis)."""
    diff, ref, angles = {}, {}, []
    for (name, p), p0 in zip(model.named_parameters(), base.parameters()):
        kind = layer_type(name)
        diff[kind] = diff.get(kind, 0.0) + (p.float() - p0.float()).pow(2).sum().item()
        ref[kind] = ref.get(kind, 0.0) + p0.float().pow(2).sum().item()
        if p.dim() == 2 and kind in ("attention", "mlp"):
            angles.append(subspace_angle(p0, p))
    out = {"overall": math.sqrt(sum(diff.values()) / sum(ref.values()))}
    out.update({k: math.sqrt(diff[k] / ref[k]) for k in sorted(diff)})
    out["subspace_angle"] = sum(angles) / len(angles) if angles else 0.0
    return out


@torch.no_grad()
def subspace_angle(w0, w, fraction=0.1) -> float:
    """Mean principal angle (degrees) between the top-k left singular subspaces of a weight
    matrix before (w0) and after (w), k = `fraction` of its smaller side (at least 1), as in
    "The Path Not Taken" (arXiv 2511.08567): 0 when training kept the directions the matrix
    writes to, 90 when it replaced them."""
    k = max(1, int(fraction * min(w.shape)))
    # float64: arccos is steep near 1, and float32 rounding alone reads as 0.02 degrees
    u0 = torch.linalg.svd(w0.double(), full_matrices=False).U[:, :k]      # [m, k]
    u = torch.linalg.svd(w.double(), full_matrices=False).U[:, :k]
    cosines = torch.linalg.svdvals(u0.T @ u).clamp(max=1.0)                 # [k]
    return torch.rad2deg(torch.arccos(cosines)).mean().item()


@torch.no_grad()
def response_kl(model, base, sequences, batch_size=64) -> float:
    """Mean per-token KL(base || model) on fixed (prompt ids, response ids) pairs: the base
    model's own evaluation responses, so every stage is measured on the same tokens."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        chunk = [s for s in sequences[start:start + batch_size] if s[1]]
        if not chunk:
            continue
        inputs, response_mask = pad_sequences(chunk, device)
        logp = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)     # [b, T, V]
        logp0 = torch.log_softmax(base(**inputs).logits[:, :-1].float(), -1)
        total += (kl_divergence(logp0, logp) * response_mask).sum().item()
        count += response_mask.sum().item()
    return total / max(count, 1)


def response_similarity(completions, base_completions) -> float:
    """Mean similarity (0-100, difflib's ratio of matching characters) of each answer to the base
    model's answer to the same prompt: the paper's response-drift view, 100 = unchanged."""
    import difflib
    ratios = [difflib.SequenceMatcher(None, a, b).ratio()
              for a, b in zip(completions, base_completions)]
    return 100 * sum(ratios) / max(len(ratios), 1)


@torch.no_grad()
def artifact_gap(student_logits, teacher_logits, ids, distill_mask, malformed, temperature):
    """Does a format artifact feed on itself? On the distilled tokens of malformed samples, the
    sum of log p_teacher(token) - log p_student(token) and the token count: a positive mean
    means the teacher's targets pull the student further toward the artifact."""
    bad = malformed.bool()
    if not bad.any():
        return {"artifact_gap_sum": 0.0, "artifact_tokens": 0.0}
    s_logp = torch.log_softmax(student_logits[bad].float(), -1).gather(-1, ids[bad, :, None])
    t_logp = torch.log_softmax(teacher_logits[bad].float() / temperature, -1).gather(
        -1, ids[bad, :, None])                                                  # [n, T, 1]
    mask = distill_mask[bad]
    return {"artifact_gap_sum": ((t_logp - s_logp).squeeze(-1) * mask).sum().item(),
            "artifact_tokens": mask.sum().item()}


def format_artifacts(completions, n=3, min_repeats=3) -> dict:
    """How often responses repeat themselves, the collapse mode of the paper: the fraction of
    responses in which some word/symbol n-gram occurs >= min_repeats times, and the n-gram
    repeated in most responses."""
    counts, repetitive = {}, 0
    for text in completions:
        toks = re.findall(r"\w+|[^\w\s]", text)
        grams = {}
        for i in range(len(toks) - n + 1):
            g = " ".join(toks[i:i + n])
            grams[g] = grams.get(g, 0) + 1
        repeated = [g for g, c in grams.items() if c >= min_repeats]
        repetitive += bool(repeated)
        for g in repeated:
            counts[g] = counts.get(g, 0) + 1
    top = max(counts, key=counts.get) if counts else ""
    return {"repetition_frac": repetitive / max(len(completions), 1), "top_repeated": top,
            "top_repeated_frac": counts.get(top, 0) / max(len(completions), 1),
            "mean_chars": sum(map(len, completions)) / max(len(completions), 1)}




# ================================================================================================
# PART II: read on only to change the lab, the data or the machinery
# ================================================================================================


# ================================================================================================
# The lab: a tiny model, task families and a shipped base model
# ================================================================================================


# --- Families and their rewards ----------------------------------------------------------------


def first_number(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def mcq_choice(text: str) -> str:
    """The official multiple-choice extraction: the text after the last <answer> up to the next
    </answer>, stripped; without any tag, the whole text (cut at a stray </answer>)."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def number_reward(completion: str, example: dict) -> float:
    return float(first_number(completion) == int(example["answer"]))


def number_feedback(completion: str, example: dict) -> str | None:
    guess, gold = first_number(completion), int(example["answer"])
    if guess is None:
        return "Your answer contains no number."
    if guess == gold:
        return None
    return f"Your answer {guess} is too {'small' if guess < gold else 'large'}."


def mcq_reward(completion: str, example: dict) -> float:
    """1 iff the chosen text equals the gold letter, exactly (case-sensitive), as the official
    `mcq` reward. The gold may be written `B` or `<answer>B</answer>`."""
    return float(mcq_choice(completion) == mcq_choice(example["answer"]))


def exact_reward(completion: str, example: dict) -> float:
    return float(normalize(completion) == normalize(example["answer"]))


def tool_feedback(completion: str, example: dict) -> str | None:
    """Names the first wrong argument of a call `name(a,b,c)`, never its right value."""
    got = re.fullmatch(r"\s*(\w+)\(([^()]*)\)\s*", completion)
    want = re.fullmatch(r"(\w+)\(([^()]*)\)", example["answer"])
    if got is None:
        return "Your answer is not a call of the form name(arg,arg,arg)."
    if got.group(1) != want.group(1):
        return f"Unknown tool '{got.group(1)}'."
    got_args, want_args = got.group(2).split(","), want.group(2).split(",")
    if len(got_args) != len(want_args):
        return f"The call has {len(got_args)} arguments; the tool takes {len(want_args)}."
    for i, (g, w) in enumerate(zip(got_args, want_args)):
        if g.strip() != w:
            return f"Argument {i + 1} ('{g.strip()}') is wrong."
    return None


def string_feedback(completion: str, example: dict) -> str | None:
    """Like a failing unit test: the first wrong position, not the expected output."""
    got, want = completion.strip(), example["answer"]
    if got == want:
        return None
    if len(got) != len(want):
        return f"Test failed: the output has {len(got)} characters, expected {len(want)}."
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return f"Test failed: the output is wrong at position {i + 1}."


def final_answer_reward(completion: str, example: dict) -> float:
    """A worked answer `... #12` is right iff the number after the last '#' is right."""
    return float(first_number(completion.split("#")[-1]) == first_number(
        example["answer"].split("#")[-1]) and "#" in completion)


# --- The lab's synthetic task families ----------------------------------------------------------
# Four trained domains mirror the paper's Math -> Science -> ToolUse -> Code sequence; two held-out
# probes share a format or a content with them (the out-of-distribution columns), and one family
# with a short worked solution serves the chain-of-thought finding. Each family is a generator
# `make(rng) -> {"prompt", "answer", "habit"}` with a reward and, where natural, rich feedback.
# `habit` is a plausible wrong answer made by a systematic slip (an off-by-one sum, the first
# option, the arguments in prompt order, the string left unreversed). The base model is
# pre-trained on the habit in half of the plain examples of every family, so that, like a real base
# model, it holds a right and a wrong behaviour side by side and samples both: RL and self-
# distillation then have something to select, which missing skills would not give them in a few
# dozen steps. Every family's skill itself is small enough for the tiny model to master, so the
# choice between the two behaviours, not the skill, is what a stage can change.

NAMES = ("ann", "bob", "cai", "dan", "eve", "fay")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def make_math(rng):                       # Math: single-digit addition
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "habit": str(a + b + 1)}


def _mcq(rng, question, right, wrong):
    """The question, then the options; the answer is the chosen option inside <answer> tags (the
    official multiple-choice format, with the option itself where the official data has its
    letter: a model this small does not learn to map an option to its letter within the lab's
    budget). The right option is never the first one; the habit answers the first one."""
    options = list(wrong)
    options.insert(rng.randrange(1, len(options) + 1), right)
    return {"prompt": f"{question} " + " ".join(map(str, options)),
            "answer": f"<answer>{right}</answer>", "habit": f"<answer>{options[0]}</answer>"}


def make_science(rng):                    # Science: multiple choice with an <answer> tag
    want_even = rng.random() < 0.5        # the one even digit among odd ones, or the reverse
    right = rng.choice([d for d in range(10) if (d % 2 == 0) == want_even])
    wrong = rng.sample([d for d in range(10) if (d % 2 == 0) != want_even], 3)
    return _mcq(rng, "even?" if want_even else "odd?", right, wrong)


def make_tool(rng):                       # ToolUse: arguments in any order -> a canonical call
    to, at, on = rng.choice(NAMES), rng.randrange(1, 13), rng.choice(DAYS)
    canonical = [f"to {to}", f"at {at}", f"on {on}"]
    parts = list(canonical)
    while parts == canonical:             # never the canonical order: the habit is always wrong
        rng.shuffle(parts)
    return {"prompt": "send " + " ".join(parts), "answer": f"send({to},{at},{on})",
            "habit": "send(" + ",".join(p.split(" ")[1] for p in parts) + ")"}


def make_code(rng):                       # Code: a string program, checked by its output
    s = ""
    while s == s[::-1]:                   # no palindromes: the habit must be wrong
        s = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(3, 5)))
    return {"prompt": f"rev({s})", "answer": s[::-1], "habit": s}


def make_mcq_math(rng):                   # probe: Science's format with Math's content
    a, b = rng.randrange(10), rng.randrange(10)
    return _mcq(rng, f"{a}+{b}?", a + b, rng.sample([v for v in range(19) if v != a + b], 3))


def make_math_words(rng):                 # probe: Math's content in words
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"add {a} and {b}", "answer": str(a + b), "habit": str(a + b + 1)}


def make_math_cot(rng):                   # chain of thought: three numbers, a worked solution
    a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
    ab, abc = a + b, a + b + c
    return {"prompt": f"{a}+{b}+{c}=", "answer": f"{a}+{b}={ab},{ab}+{c}={abc}#{abc}",
            "habit": f"{a}+{b}={a + b + 1},{a + b + 1}+{c}={a + b + c + 1}#{a + b + c + 1}"}


LAB_FAMILIES = {
    # name: (generator, reward, feedback, max_new_tokens)
    "math": (make_math, number_reward, number_feedback, 4),
    "science": (make_science, mcq_reward, None, 5),
    "tool": (make_tool, exact_reward, tool_feedback, 20),
    "code": (make_code, exact_reward, string_feedback, 8),
    "mcq_math": (make_mcq_math, mcq_reward, None, 5),
    "math_words": (make_math_words, number_reward, number_feedback, 4),
    "math_cot": (make_math_cot, final_answer_reward, None, 22),
}
LAB_FORMATS = {   # an answer of the family's form, right or wrong (the format-artifact measure)
    "math": r"\d+", "science": r"<answer>\d+</answer>", "tool": r"send\(\w+,\w+,\w+\)",
    "code": r"[a-h]+", "mcq_math": r"<answer>\d+</answer>", "math_words": r"\d+",
    "math_cot": r"\d+\+\d+=\d+,\d+\+\d+=\d+#\d+"}
LAB_SEQUENCE = ("math", "science", "tool", "code")
LAB_PROBES = ("mcq_math", "math_words")


def make_lab_task(name: str, n_train: int = 2000, n_test: int = 100, seed: int = 0) -> Task:
    """Draw a family's train and test sets independently from its generator (test prompts are
    unique). A family is a skill drill: the small ones (math has 100 distinct prompts) repeat
    their test prompts in training, the large ones (tool, code) mostly do not."""
    make, reward, feedback, max_new = LAB_FAMILIES[name]
    rng = random.Random(f"{name}-{seed}")
    test = {}
    for _ in range(100 * n_test):
        if len(test) == n_test:
            break
        ex = make(rng)
        test.setdefault(ex["prompt"], ex)
    train = [make(rng) for _ in range(n_train)]
    from datasets import Dataset
    form = re.compile(LAB_FORMATS[name])
    return Task(name, Dataset.from_list(train), Dataset.from_list(list(test.values())),
                reward, feedback, max_new,
                well_formed=lambda completion, _: form.fullmatch(completion.strip()) is not None)


# --- The tokenizer, the model and the base -----------------------------------------------------


LAB_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LAB_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
LAB_WORD_TOKENS = ("<answer>", "</answer>")   # plain text, but one token each (as in most LLMs)


def build_lab_tokenizer():
    """A character-level tokenizer that is a real transformers tokenizer (chat template, pad and
    eos tokens, save_pretrained), so the lab runs through exactly the code path of a hub model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]   # 95 printable + "\n"
    vocab = {tok: i for i, tok in enumerate(LAB_SPECIAL_TOKENS + LAB_WORD_TOKENS + tuple(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(LAB_SPECIAL_TOKENS))
    tok.add_tokens([AddedToken(w, normalized=False) for w in LAB_WORD_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|end|>", chat_template=LAB_CHAT_TEMPLATE)


def build_lab_model(tokenizer, seed: int = 0):
    """A 0.45M-parameter Llama: 4 layers of width 96, tied embeddings. Eager attention: at these
    tiny shapes it is faster on a CPU than the SDPA kernel (a third less time in generate)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=None, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


@dataclass
class LabRecipe:
    """How the lab's base model is made: supervised pre-training on a mixture of every lab family.
    In plain examples the target is the family's habit with probability `habit_fraction`, else
    the right answer; a `reprompt_fraction` of the batches are in the SDPO teacher's format (the
    gold answer as a demonstration in context), so the self-teacher can use a demonstration the
    way an instruction-tuned LLM does."""
    families: tuple = tuple(LAB_FAMILIES)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    reprompt_fraction: float = 0.3
    habit_fraction: float = 0.5
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + LAB_VERSION
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


LAB_VERSION = "4"   # bump when the lab's tokenizer, model or families change


def lab_pretraining_batch(tokenizer, tasks, rng, recipe):
    """A right-padded batch of (chat prompt, answer + EOS); loss only on the answer tokens.
    A batch is either all plain or all re-prompt format: mixing them would pad every short row
    to the long re-prompt length and double the cost of a step."""
    rows = []
    reprompt = rng.random() < recipe.reprompt_fraction
    cfg = Config()                                     # the official teacher templates
    for _ in range(recipe.batch_size):
        task = tasks[rng.randrange(len(tasks))]
        ex = task.train[rng.randrange(len(task.train))]
        prompt, target = ex["prompt"], ex["answer"]
        if reprompt:                                   # the teacher's view: a demo in context
            prompt = teacher_prompt(prompt, cfg, demonstration=ex["answer"])
        elif rng.random() < recipe.habit_fraction:
            target = ex["habit"]                       # the wrong habit the base also learns
        p = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        a = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((p, a))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, labels, (ids != tokenizer.pad_token_id).long()


def pretrain_lab_base(recipe: LabRecipe, verbose: bool = True):
    """Run the recipe: a fresh lab model pre-trained on the family mixture. Deterministic for a
    given machine; another CPU rounds differently and gets a slightly different model, which is
    why the default base is shipped as a file rather than rebuilt (see `lab_base`)."""
    tokenizer = build_lab_tokenizer()
    model = build_lab_model(tokenizer, recipe.seed)
    tasks = [make_lab_task(name) for name in recipe.families]
    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(   # 5% warm-up, then cosine to 10%
        opt, lambda s: min(1.0, (s + 1) / (0.05 * recipe.steps))
        * (0.55 + 0.45 * math.cos(math.pi * s / recipe.steps)))
    model.train()
    bar = tqdm(range(recipe.steps), desc="pre-training a lab base model",
               disable=None if verbose else True)
    for _ in bar:
        ids, labels, attn = lab_pretraining_batch(tokenizer, tasks, rng, recipe)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), tokenizer


LAB_BASE_FILE = Path(__file__).resolve().with_name("lab_base.safetensors")
# Recorded when the shipped file was written by write_lab_base() (pre-training took 454 s on 2
# cores of an AMD EPYC with AVX2 only): its SHA-256, and its accuracy on each family as
# base_evaluation() measures it (100 test prompts x 4 samples at temperature 0.6, seeded).
LAB_BASE_SHA256 = "502496388d0c8fc76dec7f687cc0a593e81c07fe45748aa325591f2e8d269033"
LAB_BASE_ACCURACY = {"math": 0.4575, "science": 0.395, "tool": 0.45, "code": 0.4375,
                     "mcq_math": 0.23, "math_words": 0.5475}


def save_lab_weights(model, path: Path, recipe: LabRecipe):
    """The weights (the tied output matrix once) and the recipe, in one safetensors file."""
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={
        "recipe": json.dumps(dataclasses.asdict(recipe)), "lab_version": LAB_VERSION}))


def load_lab_weights(path: Path):
    """(model, tokenizer, recipe dict) from a file written by save_lab_weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tokenizer = build_lab_tokenizer()
    model = build_lab_model(tokenizer)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{path} does not hold lab weights of this version (missing {missing}, "
                         f"unexpected {unexpected})")
    model.tie_weights()
    return model.eval(), tokenizer, json.loads(meta["recipe"]) | {"version": meta["lab_version"]}


def write_lab_base(path: Path = LAB_BASE_FILE) -> dict:
    """Rebuild the shipped base from the default recipe; returns what to record above. Run it
    only when the lab itself changes (then bump LAB_VERSION): another machine rounds
    differently, so its file, hash and accuracies will differ a little from the shipped ones."""
    model, tokenizer = pretrain_lab_base(LabRecipe())
    save_lab_weights(model, path, LabRecipe())
    tasks = [make_lab_task(name) for name in LAB_SEQUENCE + LAB_PROBES]
    record = base_evaluation(model, tokenizer, tasks, lab_config())["record"]
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "accuracy": {k: round(v, 4) for k, v in record["accuracy"].items()}}


def lab_base(recipe: LabRecipe = LabRecipe(), verbose: bool = True):
    """The lab's base model. The default recipe loads the file shipped with the code, so every
    machine starts from the same weights: the lab's greedy choices between a right answer and a
    habit sit close together, and a rebuild on another CPU (other float rounding) would move
    them. Any other recipe is pre-trained once and cached on disk, keyed by the recipe."""
    if recipe == LabRecipe() and LAB_BASE_FILE.exists():
        model, tokenizer, _ = load_lab_weights(LAB_BASE_FILE)
        return model, tokenizer
    path = cache_dir() / f"lab-{recipe.key()}.safetensors"
    if path.exists():
        model, tokenizer, _ = load_lab_weights(path)
        return model, tokenizer
    model, tokenizer = pretrain_lab_base(recipe, verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lab_weights(model, path, recipe)
    return model, tokenizer


def lab_config(**overrides) -> Config:
    """The official settings scaled down to the tiny lab: the paper's 32 prompts x 8 rollouts, a
    learning rate for a 0.45M-parameter model (3e-4), a short warm-up, 15 steps per task, short
    answers, top-20 distillation (the vocabulary has 104 tokens, so top-100 would be all of it),
    and 100 test prompts x 4 samples per evaluation, on the CPU (the model is too small for a GPU
    to help; --set device=cuda moves it). Everything else stays official."""
    settings = dict(model="lab", prompts_per_step=32, group_size=8, max_new_tokens=24, lr=3e-4,
                    warmup_steps=2, distillation_topk=20, steps_per_task=15, eval_examples=100,
                    eval_samples=4, device="cpu")
    settings.update(overrides)
    return Config(**settings)


# ================================================================================================
# Real models and data: loading, the official rewards, prompt lengths
# ================================================================================================


def load_policy(name: str, device: str = "cpu", recipe: LabRecipe | None = None):
    """(model, tokenizer) for 'lab', a hub id, a local folder, or a .gguf file."""
    if name == "lab":
        model, tokenizer = lab_base(recipe or LabRecipe())
        return model.to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    path = Path(name)
    if path.suffix == ".gguf":       # transformers de-quantises GGUF weights (needs `gguf`)
        if not path.is_file():
            raise FileNotFoundError(f"model {name!r}: no such GGUF file")
        name, kwargs = str(path.parent), {"gguf_file": path.name}
    elif not path.exists():          # a hub id
        offline_unless_reachable(f"the model {name!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ValueError(f"model {name!r} could not be loaded: allowed are 'lab', a hub id, a "
                         f"folder saved with save_pretrained, or a .gguf file ({e})") from e
    if kwargs:   # GGUF: the weights are de-quantised fp32 tensors now, but transformers still
        # marks the model as GGUF-quantised and would refuse save_pretrained (checkpoints)
        # and training in transformers' Trainer (the TRL benchmark)
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token_id is None:   # batched generation needs a pad token
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def offline_unless_reachable(what: str, timeout: float = 3.0):
    """Without a network, the hub libraries retry for most of a minute before they give up.
    When the hub cannot be reached, switch them to offline mode (the local cache only) at once,
    so a missing model or data set fails in seconds with a clear message."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        import datasets.config
        import huggingface_hub.constants
        print(f"note: {host} cannot be reached; looking for {what} in the local cache only "
              f"(as with HF_HUB_OFFLINE=1)")
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True


def cache_dir() -> Path:
    return Path(os.environ.get("SDPO_CL_CACHE", Path.home() / ".cache" / "sdpo_cl"))


# --- Real data: the official SDPO layout, its rewards, and GSM8K -------------------------------
# The official code picks a reward by each row's data source; here by its `kind` (the official
# layout's field for it): mcq (SciKnowEval, GPQA), tooluse (ToolAlpaca), math (DAPO-Math,
# MATH-500, GSM8K) and code. A row without a kind is scored by normalised exact match, an
# addition of this project. Model-written code runs only in a separate, limited process.

OFFICIAL_KINDS = ("mcq", "tooluse", "math", "code", "")
MATH_PROMPT_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def tool_calls(text: str):
    """The official tool-use parse: every name after `Action:` (a multiset), and the JSON objects
    after `Action Input:` merged into one dict (later keys win; unparsable ones are skipped).
    The object match stops at the first `}`, so nested objects do not parse, as officially."""
    names = re.findall(r"Action:\s*(\w+)", text)
    merged = {}
    for block in re.findall(r"Action Input:\s*({.*?})", text, flags=re.DOTALL):
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            merged.update(value)
    return names, merged


def gold_tool_calls(answer: str):
    """The gold calls of a tooluse row: a JSON list of {"Action", "Action_Input"}, where the
    input is a JSON object or a string holding one."""
    names, merged = [], {}
    for call in json.loads(answer):
        names.append(call["Action"])
        value = call.get("Action_Input", {})
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = {}
        merged.update(value if isinstance(value, dict) else {})
    return names, merged


def tooluse_reward(completion: str, example: dict) -> float:
    """1 iff the called names equal the gold ones as a multiset and the merged inputs equal the
    merged gold inputs exactly (types and empty fields included)."""
    names, inputs = tool_calls(completion)
    gold_names, gold_inputs = gold_tool_calls(example["answer"])
    return float(Counter(names) == Counter(gold_names) and inputs == gold_inputs)


def tooluse_feedback(completion: str, example: dict) -> str | None:
    """What did not match. Like the official feedback, it shows the expected calls: it reaches
    the teacher only with include_environment_feedback (off in the paper's runs)."""
    names, inputs = tool_calls(completion)
    gold_names, gold_inputs = gold_tool_calls(example["answer"])
    parts = []
    if Counter(names) != Counter(gold_names):
        parts.append(f"Actions mismatch: predicted {names}, expected {gold_names}")
    if inputs != gold_inputs:
        parts.append(f"Action inputs mismatch: predicted {inputs}, expected {gold_inputs}")
    return "; ".join(parts) or None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in the last 100 characters (the official window), or
    None without one; '' when its braces do not close."""
    tail = text[-100:]
    start = tail.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(tail)):
        depth += {"{": 1, "}": -1}.get(tail[j], 0)
        if depth == 0:
            return tail[i:j]
    return ""


def math_reward(completion: str, example: dict) -> float:
    """The last boxed answer equals the gold as a string, or math-verify finds them equal
    (parse both, verify, 5 s timeouts), as the official math reward."""
    answer = last_boxed(completion)
    if not answer:
        return 0.0
    if answer == example["answer"]:
        return 1.0
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("the math reward needs the math-verify package: "
                          "pip install math-verify") from None
    try:
        return float(verify(parse(example["answer"]), parse(answer)))
    except Exception:                      # a parse the verifier cannot handle scores 0
        return 0.0


def math_feedback(completion: str, example: dict) -> str | None:
    """Only the format, never the answer (the official default)."""
    if last_boxed(completion):
        return None
    return ("Your answer had the wrong format. The solution must be given in the format: "
            "\\boxed{your_answer}.")


def code_block(text: str) -> str | None:
    """The longest fenced code block (```python ... ```), as the official code reward takes it."""
    blocks = re.findall(r"```[\w+-]*\n(.*?)```", text, flags=re.DOTALL)
    return max(blocks, key=len) if blocks else None


def code_tests(example: dict) -> dict:
    """A code row's tests, the official format: {"inputs": [...], "outputs": [...],
    "testtype": "stdin" or "functional", "fn_name": name for functional tests}."""
    tests = example["tests"]
    return json.loads(tests) if isinstance(tests, str) else tests


def code_result(completion: str, example: dict) -> dict:
    """Run the completion's code on the row's tests in a sandbox (see run_untrusted_code)."""
    code = code_block(completion)
    if code is None:
        return {"passed": False, "feedback": "Incorrect format: put your code inside a "
                                             "```python ... ``` block."}
    tests = code_tests(example)
    return run_untrusted_code(code, tests)


def code_reward(completion: str, example: dict) -> float:
    """1 iff every test passes."""
    return float(code_result(completion, example)["passed"])


def code_feedback(completion: str, example: dict) -> str | None:
    """The first failing test or error, shortened."""
    result = code_result(completion, example)
    return None if result["passed"] else result["feedback"]


OFFICIAL_REWARDS = {"mcq": (mcq_reward, None), "tooluse": (tooluse_reward, tooluse_feedback),
                    "math": (math_reward, math_feedback), "code": (code_reward, code_feedback)}


def official_reward(completion: str, example: dict) -> float:
    """The official reward of the row's kind; a row without a kind: normalised exact match of
    the text inside the last <answer> tag, or of the whole completion without one."""
    if example["kind"] in OFFICIAL_REWARDS:
        return OFFICIAL_REWARDS[example["kind"]][0](completion, example)
    return float(normalize(mcq_choice(completion)) == normalize(example["answer"]))


def official_well_formed(completion: str, example: dict) -> bool:
    """Whether a completion has the form its reward parses, right or wrong (the format-artifact
    measure): mcq one capital letter (inside the last <answer> tag, or the whole completion);
    tooluse an `Action:` line; math a \\boxed{} in the last 100 characters; code a fenced block.
    Rows without a kind are not judged."""
    kind = example["kind"]
    if kind == "mcq":
        return re.fullmatch(r"[A-Z]", mcq_choice(completion).strip()) is not None
    if kind == "tooluse":
        return re.search(r"Action:\s*\w+", completion) is not None
    if kind == "math":
        return bool(last_boxed(completion))
    if kind == "code":
        return code_block(completion) is not None
    return True


def official_feedback(completion: str, example: dict) -> str | None:
    reward_and_feedback = OFFICIAL_REWARDS.get(example["kind"])
    if reward_and_feedback is None or reward_and_feedback[1] is None:
        return None
    return reward_and_feedback[1](completion, example)


def read_official_rows(path: Path) -> list:
    """JSON lines with `prompt` and `answer` (strings), optional `system`, `kind` (one of
    OFFICIAL_KINDS) and, for code rows, `tests`. A malformed row raises one error naming the
    file, the line and the field."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt and answer")
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{where}: field {key!r} must be a non-empty string")
        for key in ("system", "kind", "dataset"):
            if key in row and row[key] is not None and not isinstance(row[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string")
        kind = row.get("kind") or ""
        if kind not in OFFICIAL_KINDS:
            raise ValueError(f"{where}: kind {kind!r} is unknown; allowed: "
                             f"{', '.join(repr(k) for k in OFFICIAL_KINDS)}")
        check_official_answer(where, kind, row)
        rows.append({"prompt": row["prompt"], "answer": row["answer"],
                     "system": row.get("system") or None, "kind": kind,
                     "dataset": row.get("dataset") or "",
                     "tests": json.dumps(row["tests"]) if kind == "code" else ""})
    return rows


def check_official_answer(where, kind, row):
    """A row whose gold answer its reward can never match is refused at load time."""
    if kind == "mcq" and not re.fullmatch(r"[A-Z]", mcq_choice(row["answer"])):
        raise ValueError(f"{where}: a mcq answer must be one capital letter (A, B, ...), "
                         f"got {row['answer']!r}")
    if kind == "tooluse":
        try:
            gold_tool_calls(row["answer"])
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
            raise ValueError(f"{where}: a tooluse answer must be a JSON list of "
                             f'{{"Action": ..., "Action_Input": ...}}, got {row["answer"][:80]!r}'
                             ) from None
    if kind == "code":
        tests = row.get("tests")
        try:
            tests = json.loads(tests) if isinstance(tests, str) else tests
            ok = (isinstance(tests, dict) and len(tests["inputs"]) == len(tests["outputs"])
                  and tests.get("testtype", "stdin") in ("stdin", "functional")
                  and (tests.get("testtype", "stdin") == "stdin" or tests.get("fn_name")))
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{where}: a code row needs `tests`: {{\"inputs\": [...], "
                             f"\"outputs\": [...], \"testtype\": \"stdin\" or \"functional\" "
                             f"(with \"fn_name\")}}")


def load_official_task(folder) -> Task:
    """A task in the official SDPO data layout: a folder with train.json and test.json."""
    folder = Path(folder)
    rows = {}
    for split in ("train", "test"):
        path = folder / f"{split}.json"
        if not path.is_file():
            raise ValueError(f"task folder {str(folder)!r} has no {split}.json (the official "
                             f"layout: train.json and test.json, JSON lines)")
        rows[split] = read_official_rows(path)
        if not rows[split]:
            raise ValueError(f"{path}: no examples")
    from datasets import Dataset
    return Task(folder.name, Dataset.from_list(rows["train"]), Dataset.from_list(rows["test"]),
                official_reward, official_feedback, well_formed=official_well_formed)


def gsm8k_example(row: dict) -> dict:
    """A GSM8K row (`question`, `answer` = worked solution ending in '#### 42') -> our schema,
    with the official math prompt (reason step by step, the answer in \\boxed{})."""
    return {"prompt": row["question"].strip() + MATH_PROMPT_SUFFIX,
            "answer": row["answer"].split("####")[-1].strip().replace(",", ""),
            "system": None, "kind": "math", "dataset": "gsm8k", "tests": ""}


def gsm8k_task(dataset_dict, name="gsm8k") -> Task:
    """GSM8K from a datasets.DatasetDict with train and test splits in the hub schema, scored
    by the official math reward."""
    return Task(name, dataset_dict["train"].map(gsm8k_example, remove_columns=["question"]),
                dataset_dict["test"].map(gsm8k_example, remove_columns=["question"]),
                official_reward, official_feedback, well_formed=official_well_formed)


def load_task(name: str) -> Task:
    """A task by name: a lab family (LAB_FAMILIES), `gsm8k` (from the hub), or a folder in the
    official SDPO layout (train.json and test.json)."""
    if name in LAB_FAMILIES:
        return make_lab_task(name)
    if name == "gsm8k":
        from datasets import load_dataset
        offline_unless_reachable("the gsm8k data set")
        try:
            return gsm8k_task(load_dataset("openai/gsm8k", "main"))
        except (OSError, ConnectionError, ValueError) as e:
            raise ValueError(f"task 'gsm8k' could not be loaded from the hub or the local cache "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
    if Path(name).is_dir():
        return load_official_task(name)
    raise ValueError(f"unknown task {name!r}: allowed are the lab families "
                     f"{', '.join(LAB_FAMILIES)}, 'gsm8k', or a folder with train.json and "
                     f"test.json")


def fit_prompts(task, tokenizer, model, cfg, with_teacher=False, policy="error") -> str | None:
    """Check that every prompt fits the model's context with the generation budget (and, with
    with_teacher, the SDPO teacher's prompt: the template and a demonstration as long as the
    budget). policy: 'error' (refuse, naming how many rows and the longest), 'drop' or
    'truncate' (cut the prompt's end). Returns a note on what was done, or None."""
    limit = getattr(model.config, "max_position_embeddings", None)
    budget = generation_budget(cfg, task)
    if not limit:
        return None

    def need(ex):
        plain = len(tokenizer(format_prompt(tokenizer, ex["prompt"], ex.get("system"),
                                            cfg.enable_thinking), add_special_tokens=False
                              ).input_ids) + budget
        if not with_teacher:
            return plain
        teacher = format_prompt(tokenizer, teacher_prompt(ex["prompt"], cfg, ""), ex.get("system"),
                                cfg.enable_thinking)
        return max(plain, len(tokenizer(teacher, add_special_tokens=False).input_ids) + 2 * budget)

    notes = []
    for split in ("train", "test"):
        data = getattr(task, split)
        needs = [need(ex) for ex in data]
        over = [i for i, n in enumerate(needs) if n > limit]
        if not over:
            continue
        what = (f"task {task.name!r}: {len(over)} of {len(needs)} {split} prompts do not fit "
                f"the model's context ({limit} positions with a generation budget of {budget}"
                f"{' and the SDPO teacher prompt' if with_teacher else ''}); the longest needs "
                f"{max(needs)}")
        if policy == "error":
            raise ValueError(what + "; drop them with --long-prompts drop, or cut them with "
                                    "--long-prompts truncate")
        if policy == "drop":
            data = data.select([i for i in range(len(data)) if needs[i] <= limit])
            if len(data) == 0:
                raise ValueError(what + "; none would be left")
        else:
            excess = {i: needs[i] - limit for i in over}
            data = data.map(lambda ex, i: {"prompt": tokenizer.decode(tokenizer(
                ex["prompt"], add_special_tokens=False).input_ids[:-excess[i]])}
                if i in excess else {}, with_indices=True)
        setattr(task, split, data)
        notes.append(what + f": {'dropped' if policy == 'drop' else 'cut to fit'}")
    return "; ".join(notes) or None


# --- Running model-written code: a separate process with limits ---------------------------------
# The program runs in a fresh `python -I -B` process (no user site, no environment variables
# read, no bytecode written) in an empty temporary directory, with a minimal environment, limits
# on memory, CPU time, file size and open files, a per-test alarm and a wall-clock kill. An audit
# hook installed before the program runs refuses what a test never needs: writing, deleting or
# renaming outside the working directory, starting processes, sockets, ctypes, raising limits.
# A guard against accidents of model-written code, not a security boundary against an attacker.


SANDBOX_RUNNER = r'''
import io, json, os, resource, signal, sys
job = json.loads(sys.stdin.read())
mem = job["memory_mb"] * 2 ** 20
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (job["cpu_seconds"], job["cpu_seconds"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 24, 2 ** 24))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
root = os.path.realpath(os.getcwd())
out = os.fdopen(os.dup(1), "w")

def inside(path):
    if isinstance(path, int):
        return True
    return os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)

WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.truncate", "os.chmod",
               "os.chown", "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.move"}
FORBIDDEN = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
             "subprocess.Popen", "os.kill", "os.killpg", "socket.connect", "socket.bind",
             "ctypes.dlopen", "resource.setrlimit", "os.setuid", "os.chroot", "pty.spawn"}

def guard(event, args):
    if event == "open" and args[0] is not None and (args[2] or 0) & WRITES and not inside(args[0]):
        raise PermissionError(f"sandbox: writing {args[0]} outside the working directory")
    if event in PATH_EVENTS and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
        raise PermissionError(f"sandbox: {event} outside the working directory")
    if event in FORBIDDEN:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in ("ctypes", "_ctypes", "multiprocessing"):
        raise PermissionError(f"sandbox: import {args[0]} is not allowed")

def alarm(signum, frame):
    raise TimeoutError("time limit exceeded")

signal.signal(signal.SIGALRM, alarm)
sys.addaudithook(guard)
tests, results = job["tests"], []
for given, expected in zip(tests["inputs"], tests["outputs"]):
    stdout = io.StringIO()
    text = given if isinstance(given, str) else json.dumps(given)
    sys.stdin, sys.stdout = io.StringIO(text), stdout
    signal.setitimer(signal.ITIMER_REAL, job["seconds_per_test"])
    try:
        scope = {"__name__": "__main__"}
        exec(compile(job["code"], "<model code>", "exec"), scope)
        if tests.get("testtype", "stdin") == "functional":
            args = (given if isinstance(given, list)
                    else [json.loads(a) for a in given.split("\n") if a.strip()])
            got = scope[tests["fn_name"]](*args)
            want = json.loads(expected) if isinstance(expected, str) else expected
            ok = json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
        else:
            got = stdout.getvalue()
            ok = got.split() == str(expected).split()
        results.append({"ok": ok, "got": repr(got)[:200]})
    except BaseException as e:
        results.append({"ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout = sys.__stdout__
    if not results[-1]["ok"]:
        break
out.write(job["marker"] + json.dumps(results) + "\n")
out.flush()
'''


def run_untrusted_code(code: str, tests: dict, *, seconds_per_test: float = 2.0,
                       memory_mb: int = 512) -> dict:
    """Run `code` on each (input, expected output) of `tests` in a limited subprocess, stopping at
    the first failure. Returns {"passed": bool, "feedback": the first failure, shortened}."""
    import subprocess
    import tempfile
    n = len(tests["inputs"])
    marker = f"@@results-{os.urandom(8).hex()}@@"
    job = {"code": code, "tests": tests, "seconds_per_test": seconds_per_test,
           "memory_mb": memory_mb, "cpu_seconds": int(seconds_per_test * n) + 2, "marker": marker}
    with tempfile.TemporaryDirectory(prefix="sdpo-cl-code-") as work:
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        try:
            done = subprocess.run([sys.executable, "-I", "-B", "-c", SANDBOX_RUNNER],
                                  input=json.dumps(job), capture_output=True, text=True, cwd=work,
                                  env=env, timeout=seconds_per_test * n + 5,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            return {"passed": False, "feedback": "Time limit exceeded."}
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        return {"passed": False, "feedback": f"The program was killed (exit code "
                                             f"{done.returncode}): {done.stderr.strip()[-200:]}"}
    results = json.loads(lines[-1][len(marker):])
    for i, (r, given, want) in enumerate(zip(results, tests["inputs"], tests["outputs"])):
        if not r["ok"]:
            what = r.get("error") or f"output {r['got']}, expected {str(want)[:100]!r}"
            return {"passed": False,
                    "feedback": f"Test {i + 1} failed on input {str(given)[:100]!r}: {what}"}
    return {"passed": len(results) == n, "feedback": None}


# ================================================================================================
# Checkpoints: atomic writes, manifests, strict JSON
# ================================================================================================


def strict_json(obj):
    """obj with every non-finite float replaced by None, so that json.dumps writes strict JSON
    (a bare NaN is not JSON, and other readers refuse it)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write(path, content):
    """Write a file so that a crash leaves the old file or the new one, never half of one:
    content (text, or a function that writes a given path) goes to a temporary file that is then
    renamed over the target. save_stage does the same for a whole folder."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    content(tmp) if callable(content) else tmp.write_text(content)
    os.replace(tmp, path)


def file_digests(folder: Path) -> dict:
    """SHA-256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def stage_problem(stage: Path) -> str | None:
    """What is wrong with a finished stage's folder (a missing or changed file), or None."""
    try:
        manifest = json.loads((stage / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "its manifest.json is missing or damaged"
    found = file_digests(stage)
    for name, digest in manifest.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} was changed or damaged"
    return None


def last_finished_stage(folder, on_damage=None) -> int:
    """The index k of the last stage such that stages 0..k are finished and intact, or -1. A
    stage is finished when its folder exists (stages are renamed into place when complete), and
    intact when every file matches its manifest; on_damage(k, problem) hears of the first one
    that does not, which is then recomputed with everything after it."""
    k = -1
    while folder is not None and (Path(folder) / f"stage{k + 1}").is_dir():
        problem = stage_problem(Path(folder) / f"stage{k + 1}")
        if problem:
            if on_damage:
                on_damage(k + 1, problem)
            break
        k += 1
    return k


def save_stage(folder, k, record, policy, tokenizer, teacher, extra=None):
    """Write stage k atomically: a temporary folder renamed into place, so a crash leaves either
    the whole stage or nothing, with a manifest of its files' digests that a resume checks. The
    teacher is saved with the policy: resuming needs it. extra: more JSON files, {name: obj}."""
    final, tmp = Path(folder) / f"stage{k}", Path(folder) / f"stage{k}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    if teacher is not None and teacher.weights is not None:
        teacher.weights.save_pretrained(tmp / "teacher")
    for name, obj in (extra or {}).items():
        (tmp / name).write_text(json.dumps(obj))
    (tmp / "stage.json").write_text(json.dumps(strict_json(record), indent=1, allow_nan=False))
    (tmp / "manifest.json").write_text(json.dumps(file_digests(tmp), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_stage_weights(folder, k, policy, teacher):
    from transformers import AutoModelForCausalLM

    stage = Path(folder) / f"stage{k}"
    with torch.no_grad():
        for target, sub in ((policy, "policy"), (teacher and teacher.weights, "teacher")):
            if target is not None:
                saved = AutoModelForCausalLM.from_pretrained(stage / sub)
                target.load_state_dict(saved.state_dict())


# ================================================================================================
# Config checks
# ================================================================================================


CONFIG_TYPES = {   # what a Config field of each declared type accepts (bool is not a number)
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v), "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple": (lambda v: isinstance(v, (tuple, list)), "a list of numbers"),
}
CONFIG_CHOICES = {"loss_mode": LOSS_MODES, "loss_agg_mode": LOSS_AGG_MODES,
                  "teacher_regularization": TEACHER_KINDS, "eval_mode": EVAL_MODES,
                  "distill_scope": ("all", "final_answer"),
                  "device": ("auto", "cpu", "cuda")}
CONFIG_RANGES = {   # name: (low, high, low excluded)
    "alpha": (0, 1, False), "distillation_weight": (0, 1, False),
    "teacher_update_rate": (0, 1, False), "teacher_init_alpha": (0, 1, False),
    "mask_ratio": (0, 1, False), "success_reward_threshold": (0, 1, False),
    "lr": (0, 1, True), "temperature": (0, 100, True), "eval_temperature": (0, 100, True),
    "eval_top_p": (0, 1, True), "clip_ratio_low": (0, 1, False), "clip_ratio_high": (0, 100, False),
    "kl_loss_coef": (0, 1e6, False), "weight_decay": (0, 1e6, False), "grad_clip": (0, 1e9, True),
    "prompts_per_step": (1, 1e9, False), "max_new_tokens": (1, 1e9, False),
    "eval_samples": (1, 1e9, False), "eval_examples": (1, 1e9, False),
    "steps_per_task": (1, 1e9, False), "ppo_epochs": (1, 1e9, False),
    "group_size": (2, 1e9, False), "warmup_steps": (0, 1e9, False),
    "micro_batch_size": (0, 1e9, False), "ppo_mini_batch_size": (0, 1e9, False),
    "rollout_chunk_size": (0, 1e9, False), "eval_every": (0, 1e9, False),
    "replay_fraction": (0, 0.99, False),
}


def check_config(cfg):
    """Refuse a Config that cannot run, naming the field, its value and what is allowed."""
    def bad(name, allowed):
        raise ValueError(f"Config.{name}={getattr(cfg, name)!r} is invalid: allowed {allowed}")

    for f in dataclasses.fields(cfg):      # types first: lr=true or lr=NaN never pass
        value, kind = getattr(cfg, f.name), str(f.type).replace(" | None", "")
        if value is None and str(f.type).endswith("| None"):
            continue
        if not CONFIG_TYPES[kind][0](value):
            bad(f.name, CONFIG_TYPES[kind][1] + (", or None" if "None" in str(f.type) else ""))
    for name, options in CONFIG_CHOICES.items():
        if getattr(cfg, name) not in options:
            bad(name, "one of " + ", ".join(repr(o) for o in options))
    for name, (lo, hi, lo_open) in CONFIG_RANGES.items():
        v = getattr(cfg, name)
        if not lo <= v <= hi or (lo_open and v == lo):
            if isinstance(v, int) and hi == 1e9:
                bad(name, f"an integer >= {lo}" + (" (a group of one has no baseline and no "
                                                   "sibling)" if name == "group_size" else ""))
            bad(name, f"a number in {'(' if lo_open else '['}{float(lo)}, {float(hi)}]")
    if cfg.prompts_per_step % max(cfg.ppo_mini_batch_size, 1):
        bad("ppo_mini_batch_size", f"0 or a divisor of prompts_per_step={cfg.prompts_per_step}")
    if cfg.clip_ratio_c is not None and cfg.clip_ratio_c <= 1.0:
        bad("clip_ratio_c", "a number > 1, or None to disable the dual clip")
    if cfg.distillation_topk is not None and cfg.distillation_topk <= 0:
        bad("distillation_topk", "an integer >= 1, or None for the full vocabulary")
    if cfg.is_clip is not None and cfg.is_clip <= 0:
        bad("is_clip", "a number > 0, or None for no importance weight")
    if cfg.teacher_path and cfg.teacher_regularization == "live":
        bad("teacher_path", "None with teacher_regularization='live' (the live teacher is the "
                            "student itself and has no weights of its own)")
    if cfg.loss_mode == "sft" and cfg.kl_loss_coef:
        bad("kl_loss_coef", "0 with loss_mode='sft' (supervised fine-tuning keeps no anchor)")
    if not cfg.full_logit_distillation and cfg.alpha != 1.0:
        bad("alpha", "1.0 when full_logit_distillation=False (the sampled-token estimate exists "
                     "only for the reverse KL)")
    for name, fields in (("reprompt_template", ("{prompt}", "{solution}", "{feedback}")),
                         ("solution_template", ("{successful_previous_attempt}",)),
                         ("feedback_template", ("{feedback_raw}",))):
        if not all(f in getattr(cfg, name) for f in fields):
            bad(name, "a string containing " + " ".join(fields))
    if len(cfg.adam_betas) != 2 or not all(CONFIG_TYPES["float"][0](b) and 0 <= b < 1
                                           for b in cfg.adam_betas):
        bad("adam_betas", "two numbers in [0, 1), e.g. [0.9, 0.999]")
    cfg.adam_betas = tuple(cfg.adam_betas)


# ================================================================================================
# The training step's plumbing: prompts, recorded log-probs, shares, metrics, inputs
# ================================================================================================


def format_prompt(tokenizer, prompt: str, system: str | None = None,
                  enable_thinking: bool = False) -> str:
    """The text the model sees before its answer: the tokenizer's chat template when it has one
    (with thinking off, as the official runs, when the template has the switch, e.g. Qwen3);
    otherwise a plain fallback "{system}\\n\\nUser: {prompt}\\nAssistant:" (base models)."""
    if tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        switch = ({"enable_thinking": enable_thinking}
                  if "enable_thinking" in str(tokenizer.chat_template) else {})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **switch)
    return (f"{system}\n\n" if system else "") + f"User: {prompt}\nAssistant:"


class _RecordSampledLogprobs:
    """A logits processor that records log pi(y_t) of each sampled token during generate(),
    keeping one [B, V] tensor at a time (output_logits=True would keep [B, T, V]). At step t it
    sees the token sampled at step t-1 as the last input id; the final token is read afterwards.
    Custom processors run before the temperature warper, so it divides by the temperature."""

    def __init__(self, temperature: float):
        self.temperature, self.previous, self.logprobs = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(-1, input_ids[:, -1:]))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_ids):                           # -> [B, T]
        self.logprobs.append(self.previous.gather(-1, last_ids[:, None]))
        return torch.cat(self.logprobs, dim=1)


def aggregation_share(mask_part, mask_all, agg="token-mean"):
    """The weight of aggregate(part) in aggregate(all) when `part` is a subset of the rows of
    `all`: summing share * aggregate over the parts gives the aggregate of the whole. Its share
    of the valid tokens (token-mean), of the rows (micro1-token-mean), or of the rows that have a
    valid token (the seq-mean modes)."""
    if agg == "token-mean":
        return (mask_part.sum() / mask_all.sum().clamp(min=1)).item()
    if agg == "micro1-token-mean":
        return mask_part.shape[0] / max(mask_all.shape[0], 1)
    return ((mask_part.sum(1) > 0).sum() / (mask_all.sum(1) > 0).sum().clamp(min=1)).item()


def kl_anchor(logprobs, reference, rollout, rows, minibatch, cfg):
    """(share, k3 KL to the frozen initial model on `rows`, metrics): the anchor of GRPO and
    SDPO (not of SFT), weighted by kl_loss_coef."""
    mask = rollout.response_mask
    with torch.no_grad(), autocast_for(cfg, reference):
        ref_logits = reference(**sequence_inputs(
            rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.response_ids[rows],
            mask[rows])).logits[:, :-1].float() / cfg.temperature
    ref_logprobs = torch.log_softmax(ref_logits, -1).gather(
        -1, rollout.response_ids[rows, :, None]).squeeze(-1)                   # [b, T]
    share = aggregation_share(mask[rows], mask[minibatch], cfg.loss_agg_mode)
    kl = aggregate(k3_kl(logprobs, ref_logprobs), mask[rows], cfg.loss_agg_mode)
    return share, kl, {"kl_ref": share * kl.item()}


def step_metrics(rollout, targets, totals, cfg) -> dict:
    """What one rollout batch looked like: reward, signal (groups with a success, groups whose
    rewards are all equal and so give GRPO nothing), loss parts, lengths, distilled share."""
    groups = targets.rewards.view(-1, cfg.group_size)
    success = [c for c, r in zip(rollout.completions, targets.rewards.tolist())
               if r >= cfg.success_reward_threshold]
    metrics = {"reward": targets.rewards.mean().item(),
               "solved_groups": (groups.max(1).values >= cfg.success_reward_threshold
                                 ).float().mean().item(),
               "zero_adv_groups": (groups.std(1) == 0).float().mean().item(),
               **totals, "response_length": rollout.response_mask.sum(1).mean().item(),
               # the collapse measures: repeated n-grams in the samples, and in the successful
               # ones, the pool SDPO's demonstrations (the teacher's targets) come from
               "repetition_rate": format_artifacts(rollout.completions)["repetition_frac"],
               "demo_repetition_rate": format_artifacts(success)["repetition_frac"],
               "unfinished_rate": None if rollout.finished is None
               else 1.0 - rollout.finished.float().mean().item()}
    if targets.malformed is not None:      # format artifacts, and whether the teacher feeds them
        metrics["malformed_rate"] = targets.malformed.mean().item()
    gap_sum, tokens = metrics.pop("artifact_gap_sum", None), metrics.pop("artifact_tokens", 0.0)
    if gap_sum is not None:
        metrics["artifact_gap"] = gap_sum / tokens if tokens else None
    if targets.distill_mask is not None:
        mask = rollout.response_mask
        metrics["distill_frac"] = (targets.distill_mask.sum() / mask.sum().clamp(min=1)).item()
        metrics["empty_target"] = bool(targets.distill_mask.sum() == 0)
    return metrics


def stage_summary(history) -> dict:
    """A stage's training in a few numbers: the reward at its start and end, seconds per step,
    and the means of the signal measures over its steps (None where a method has no rollout)."""
    def mean(key, part=slice(None)):
        values = [h[key] for h in history[part] if key in h]
        return sum(values) / len(values) if values else None
    return {"reward_first": history[0].get("reward"), "reward_first5": mean("reward", slice(0, 5)),
            "reward_last5": mean("reward", slice(-5, None)), "seconds_per_step": mean("seconds"),
            "zero_adv_groups_first": history[0].get("zero_adv_groups"),
            "distill_frac": mean("distill_frac"),
            "series": {key: [h.get(key) for h in history] for key in SERIES}}


SERIES = ("reward", "distill_frac", "repetition_rate", "demo_repetition_rate", "unfinished_rate",
          "malformed_rate", "artifact_gap")


def mix_tasks(tasks) -> Task:
    """One task scoring examples of several: each example names its task in "task"."""
    by_name = {t.name: t for t in tasks}

    def reward(completion, ex):
        return by_name[ex["task"]].reward(completion, ex)

    def feedback(completion, ex):
        own = by_name[ex["task"]].feedback
        return own(completion, ex) if own else None

    def well_formed(completion, ex):
        return by_name[ex["task"]].well_formed(completion, ex)
    budgets = [t.max_new_tokens for t in tasks]
    measured = all(t.well_formed for t in tasks)
    return Task("+".join(by_name), [], [], reward, feedback,
                None if None in budgets else max(budgets), well_formed if measured else None)


def backward_finite(loss):
    """loss.backward(), refusing a non-finite loss before it reaches any gradient."""
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    loss.backward()


def clipped_optimizer_step(policy, optimizer, max_norm) -> float:
    """Clip the gradient norm and step, refusing a non-finite norm before it reaches the
    weights. Returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm).item()
    if not math.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm {grad_norm}")
    optimizer.step()
    return grad_norm


def pad_right(sequences, pad_id, device):
    """Token id lists as a right-padded [B, T] tensor and its mask."""
    T = max(len(x) for x in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(sequences), T, device=device)
    for i, x in enumerate(sequences):
        ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x, device=device), 1
    return ids, mask


def final_answer_mask(tokenizer, response_ids, marker) -> torch.Tensor:
    """[B, T]: 1 on the tokens after the last one whose text holds `marker` (the final answer),
    0 before it, and 0 everywhere in a response without one."""
    rows = []
    for ids in response_ids.tolist():
        pieces = tokenizer.convert_ids_to_tokens(ids)
        last = max((t for t, piece in enumerate(pieces) if piece and marker in piece),
                   default=None)
        rows.append([float(last is not None and t > last) for t in range(len(ids))])
    return torch.tensor(rows, device=response_ids.device)


def concat_rollouts(rollouts, pad_id) -> Rollout:
    """One Rollout from several (rollout_chunk_size): prompts left-padded and responses
    right-padded to the widest."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    T = max(r.response_ids.shape[1] for r in rollouts)

    def pad(x, width, value, left):
        extra = width - x.shape[1]
        return F.pad(x, (extra, 0) if left else (0, extra), value=value)

    return Rollout(torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in rollouts]),
                   torch.cat([pad(r.prompt_mask, P, 0, True) for r in rollouts]),
                   torch.cat([pad(r.response_ids, T, pad_id, False) for r in rollouts]),
                   torch.cat([pad(r.response_mask, T, 0, False) for r in rollouts]),
                   torch.cat([pad(r.old_logprobs, T, 0, False) for r in rollouts]),
                   [c for r in rollouts for c in r.completions],
                   None if any(r.finished is None for r in rollouts)
                   else torch.cat([r.finished for r in rollouts]))


def sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    """Model inputs for prompt + response. Logits are kept only for the last T+1 positions:
    logits[:, :-1] is then [B, T, V] with position t predicting response_ids[:, t]. Position ids
    count real tokens only, as generate() does with left padding."""
    attn = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return dict(input_ids=torch.cat([prompt_ids, response_ids], dim=1), attention_mask=attn,
                position_ids=real_token_positions(attn),
                logits_to_keep=response_ids.shape[1] + 1)


def real_token_positions(attention_mask):
    """Positions that count real tokens only, as generate() gives them with left padding."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def teacher_scores(model, prefix_ids, prefix_mask, rows, response_ids, response_mask,
                   share_prefix=True):
    """Logits [b, T, V] of b responses, response i after teacher prompt rows[i] of the U distinct
    prompts prefix_ids [U, P]. share_prefix: each distinct prompt runs once and the responses on
    copies of its KV cache (response_logits); else one full forward per (prompt + response)."""
    if share_prefix:
        return response_logits(model, prefix_ids, prefix_mask, rows, response_ids, response_mask)
    was_training = model.training
    model.eval()
    try:
        return model(**sequence_inputs(prefix_ids[rows], prefix_mask[rows], response_ids,
                                       response_mask)).logits[:, :-1]
    finally:
        model.train(was_training)


@torch.no_grad()
def response_logits(model, prefix_ids, prefix_mask, rows, response_ids, response_mask):
    """Logits [b, T, V] of b responses, response i following prefix rows[i]; position t predicts
    response_ids[:, t]. prefix_ids, prefix_mask: [U, P], left-padded; rows: [b] indices into U.
    Why not one forward over each (prefix + response)? Within a group every failed sample sees the
    same demonstration (the first success), so a group has at most two distinct teacher contexts.
    The U distinct prefixes go through the model once, their KV cache is copied to the b rows, and
    only the responses are run on top of it: the same numbers up to float rounding, for about
    U/b of the prefix cost. The model runs in eval mode (no dropout; and transformers before 5.24
    drops the cache of a training-mode model with gradient checkpointing)."""
    from transformers import DynamicCache
    was_training = model.training
    model.eval()
    try:
        T, P = response_ids.shape[1], prefix_ids.shape[1]
        cache, cache_arg = DynamicCache(config=model.config), _cache_argument(model)
        attn = torch.cat([prefix_mask[rows], response_mask.long()], dim=1)      # [b, P + T]
        last = model(input_ids=prefix_ids, attention_mask=prefix_mask,
                     position_ids=real_token_positions(prefix_mask), logits_to_keep=1,
                     use_cache=True, **{cache_arg: cache}).logits               # [U, 1, V]
        if cache.get_seq_length() != P:
            raise RuntimeError(f"{type(model).__name__} did not fill its KV cache; shared-"
                               "prefix teacher scoring needs a transformers DynamicCache")
        logits = [last[rows]]
        if T > 1:   # the last response token predicts nothing we need
            cache.batch_select_indices(rows)
            logits.append(model(input_ids=response_ids[:, :-1], attention_mask=attn[:, :-1],
                                position_ids=real_token_positions(attn)[:, P:-1], use_cache=True,
                                **{cache_arg: cache}).logits)                   # [b, T-1, V]
    finally:
        model.train(was_training)
    return torch.cat(logits, dim=1)


def _cache_argument(model) -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def pad_sequences(pairs, device):
    """Model inputs for (prompt ids, response ids) pairs, prompts left-padded and responses
    right-padded, and the response mask [b, T]."""
    P, T = max(len(p) for p, _ in pairs), max(len(r) for _, r in pairs)
    prompt_ids = torch.zeros(len(pairs), P, dtype=torch.long, device=device)
    prompt_mask = torch.zeros_like(prompt_ids)
    response_ids = torch.zeros(len(pairs), T, dtype=torch.long, device=device)
    response_mask = torch.zeros(len(pairs), T, device=device)
    for i, (p, r) in enumerate(pairs):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), 1
        response_ids[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), 1
    return sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask), response_mask


def device_of(cfg: Config) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def autocast_for(cfg, model):
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=cfg.bf16 and model.device.type == "cuda")


def eos_ids(model, tokenizer) -> list:
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted(set(ids) | {tokenizer.eos_token_id} - {None})


def tokenize_prompts(tokenizer, texts, device):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def decode_completions(tokenizer, response_ids, response_mask):
    return [tokenizer.decode(ids[m > 0], skip_special_tokens=True)
            for ids, m in zip(response_ids, response_mask)]


# ================================================================================================
# The walkthrough: `python sdpo_cl.py` shows the two signals side by side on one rollout batch
# ================================================================================================

def walkthrough(prompts=4, group_size=8, family="math", seed=0, out="docs", echo=print) -> dict:
    """One rollout batch of the lab's base model, narrated: a group's answers, rewards and GRPO
    advantages; the teacher prompt of one failed answer; along that answer, token by token,
    GRPO's weight next to SDPO's divergence; the two distributions where they differ most; the
    two losses, and how far each method's update on this batch (GRPO: the paper's four optimizer
    steps on quarters of it; SDPO: one) moves the answer's log-probability.
    Every number comes from this module's own functions. Writes out/walkthrough.md and
    out/walkthrough.png; returns the numbers."""
    model, tokenizer = load_policy("lab")
    task, G = make_lab_task(family), group_size
    cfg = lab_config(loss_mode="sdpo", prompts_per_step=prompts, group_size=G, seed=seed,
                     warmup_steps=0)
    seed_everything(seed, "walkthrough")
    examples = [task.train[i] for i in range(prompts)]
    rollout, samples, rewards = sample_rollout(model, tokenizer, task, examples, cfg)
    targets = loss_targets(rollout, samples, rewards, task, tokenizer, cfg)
    advantages = grpo_advantages(rewards, G)
    lines = []

    def say(text=""):
        lines.append(text)
        echo(text)

    alike = (rewards.view(-1, G).std(1) == 0).tolist()
    mixed = [g for g, flat in enumerate(alike) if not flat]
    say(f"# Walkthrough: one rollout batch of GRPO and SDPO on the lab's {family} family")
    say()
    say(f"{prompts} prompts x {G} answers sampled at temperature {cfg.temperature:g} from the "
        f"lab's base model (`sample_rollout`), rewarded by the task's verifier.")
    if not mixed:
        say("Every group scored all alike: no GRPO advantage and no SDPO demonstration here.")
        return {}
    g = mixed[0]
    rows = range(g * G, (g + 1) * G)
    say()
    say("## 1. One prompt's group (`sample_rollout`, `grpo_advantages`)")
    say()
    say(f"Prompt: `{samples[g * G]['prompt']}` (gold answer `{samples[g * G]['answer']}`)")
    say()
    say("| answer | reward | advantage A_i = r_i - mean(r) |\n|---|---|---|")
    for i in rows:
        say(f"| `{rollout.completions[i]}` | {rewards[i]:.0f} | {advantages[i]:+.3f} |")
    say()
    say(f"Groups of this batch whose answers all scored the same: {sum(alike)} of {len(alike)}. "
        "In such a group every advantage is 0, so GRPO takes no gradient from it (its "
        "\"selective update\"), and a group without a success gives SDPO no demonstration "
        "either.")
    i = next(r for r in rows if rewards[r] < cfg.success_reward_threshold
             and targets.teacher_of[r] >= 0)
    u = targets.teacher_of[i].item()
    teacher_text = tokenizer.decode(targets.teacher_ids[u][targets.teacher_mask[u] > 0])
    say()
    say(f"## 2. The teacher's view of the failed answer `{rollout.completions[i]}` "
        f"(`teacher_contexts`, `teacher_prompt`, `format_prompt`)")
    say()
    say("The first successful sibling is the demonstration; the teacher sees this prompt, exactly "
        "as tokenized, and then scores the student's own answer tokens:")
    say()
    say("```\n" + teacher_text + "\n```")

    # --- 3. token by token: the student's and the teacher's distributions over the answer --------
    n = int(rollout.response_mask[i].sum())
    ids = rollout.response_ids[i:i + 1]                                         # [1, T]
    with torch.no_grad():
        student_logits = model(**sequence_inputs(
            rollout.prompt_ids[i:i + 1], rollout.prompt_mask[i:i + 1], ids,
            rollout.response_mask[i:i + 1])).logits[:, :-1] / cfg.temperature  # [1, T, V]
        teacher = Teacher(model, cfg)
        teacher_logits = teacher.logits(model, lambda m: teacher_scores(
            m, targets.teacher_ids[[u]], targets.teacher_mask[[u]], torch.tensor([0]), ids,
            rollout.response_mask[i:i + 1])) / cfg.temperature                 # [1, T, V]
    student_logp = torch.log_softmax(student_logits.float(), -1)
    teacher_logp = torch.log_softmax(teacher_logits.float(), -1)
    divergence = generalized_jsd(*topk_support(student_logp, teacher_logp, cfg.distillation_topk,
                                               cfg.distillation_add_tail), cfg.alpha)[0, :n]
    p_student = student_logp.gather(-1, ids[..., None])[0, :n, 0].exp()
    p_teacher = teacher_logp.gather(-1, ids[..., None])[0, :n, 0].exp()
    tokens = [tokenizer.decode([t]) or tokenizer.convert_ids_to_tokens(t)
              for t in ids[0, :n].tolist()]
    say()
    say("## 3. The two signals along the answer, token by token (`generalized_jsd` on "
        "`topk_support`)")
    say()
    say("GRPO weighs every token of the answer by the same advantage; SDPO gives each token its "
        "own target, the teacher's next-token distribution, and its own divergence (here the "
        f"Jensen-Shannon divergence, alpha = {cfg.alpha}, on the student's top-"
        f"{cfg.distillation_topk} tokens plus a tail bucket).")
    say()
    say("| t | token | GRPO weight (advantage) | SDPO divergence | p_student(token) "
        "| p_teacher(token) |\n|---|---|---|---|---|---|")
    for t in range(n):
        say(f"| {t} | `{tokens[t]!r}` | {advantages[i]:+.3f} | {divergence[t]:.4f} | "
            f"{p_student[t]:.3f} | {p_teacher[t]:.3f} |")
    t_max = int(divergence.argmax())
    top_s, top_t = student_logp[0, t_max].exp().topk(5), teacher_logp[0, t_max].exp().topk(5)
    say()
    say(f"## 4. Where they differ most: token {t_max} (`{tokens[t_max]!r}`)")
    say()
    say("| rank | student's top-5 | p | teacher's top-5 | p |\n|---|---|---|---|---|")
    for r in range(5):
        say(f"| {r + 1} | `{tokenizer.convert_ids_to_tokens(int(top_s.indices[r]))}` | "
            f"{top_s.values[r]:.3f} | `{tokenizer.convert_ids_to_tokens(int(top_t.indices[r]))}` "
            f"| {top_t.values[r]:.3f} |")
    say(f"| tail | (the rest) | {1 - top_s.values.sum():.3f} | (the rest) | "
        f"{1 - top_t.values.sum():.3f} |")

    # --- 5. the two losses and each method's update on this same batch ---------------------------
    result = {"group": g, "answer": i, "divergence": divergence.tolist(),
              "advantage": advantages[i].item()}
    say()
    say("## 5. The two losses on this batch, and one update of each (`update`, the training "
        "step's own: GRPO takes the paper's four optimizer steps, one per quarter of the batch, "
        "the quarter holding this group among them; SDPO one step on the whole batch)")
    say()
    say("| method | loss | log p(answer) before | after the update | change |\n|---|---|---|---|---|")
    before = float((student_logp.gather(-1, ids[..., None])[0, :n, 0]).sum())
    for mode in ("grpo", "sdpo"):
        mode_cfg = dataclasses.replace(cfg, loss_mode=mode,
                                       ppo_mini_batch_size=max(1, prompts // 4) if mode == "grpo"
                                       else 0)
        policy = copy.deepcopy(model).train()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        mode_targets = loss_targets(rollout, samples, rewards, task, tokenizer, mode_cfg)
        totals = update(policy, Teacher(policy, mode_cfg) if mode == "sdpo" else None, optimizer,
                        scheduler, rollout, mode_targets, mode_cfg)
        with torch.no_grad():
            logits = policy.eval()(**sequence_inputs(
                rollout.prompt_ids[i:i + 1], rollout.prompt_mask[i:i + 1], ids,
                rollout.response_mask[i:i + 1])).logits[:, :-1] / cfg.temperature
        after = float(torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[0, :n]
                      .sum())
        result[mode] = {"loss": totals["loss"], "log_p_before": before, "log_p_after": after}
        say(f"| {mode} | {totals['loss']:.4f} | {before:.3f} | {after:.3f} | "
            f"{after - before:+.3f} |")
    say()
    say("GRPO pushes the failed answer down as a whole, by its one advantage; SDPO moves each "
        "token toward what the teacher, shown the demonstration, would have said.")
    write_walkthrough(Path(out), lines, tokens, advantages[i].item(), divergence,
                      p_teacher - p_student)
    return result


def write_walkthrough(out: Path, lines, tokens, advantage, divergence, lift):
    """docs/walkthrough.md and its figure: GRPO's flat per-token weight against SDPO's per-token
    divergence and the teacher-minus-student probability of each sampled token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3))
    x = range(len(tokens))
    ax.plot(x, [advantage] * len(tokens), color="tab:blue", label="GRPO: advantage (every token)")
    ax.bar([t - 0.2 for t in x], divergence.tolist(), width=0.4, color="tab:orange",
           label="SDPO: divergence to the teacher")
    ax.bar([t + 0.2 for t in x], lift.tolist(), width=0.4, color="tab:green",
           label="p_teacher - p_student (sampled token)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(list(x), [repr(t) for t in tokens])
    ax.set_xlabel("answer tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "walkthrough.png", dpi=100)
    plt.close(fig)
    atomic_write(out / "walkthrough.md", "\n".join(lines) + "\n\n![per-token signals]"
                 "(walkthrough.png)\n")


if __name__ == "__main__":
    walkthrough()
