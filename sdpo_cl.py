"""sdpo_cl.py: GRPO and SDPO in continual post-training. The methods alone, in reading order.

GRPO (DeepSeekMath, arXiv 2402.03300) samples a group of G answers per prompt, scores each with a
verifier (a reward in [0, 1]), gives answer i the advantage A_i = r_i - mean_j r_j, and raises
the log-probability of each of its tokens in proportion, through a PPO-style clipped ratio. Every
token of an answer gets the same number; a group whose answers all score the same gives no gradient.

SDPO (Hübotter et al., arXiv 2601.20802) uses the same samples with a dense signal. The model is
its own teacher: shown a successful sibling answer (or textual feedback) in its prompt, it scores
every token of the student's answer, and the student is pulled toward the teacher's next-token
distribution at each position. SDPO replaces the GRPO loss; rewards only pick demonstrations.

The experiment (Wang et al., "Denser != Better", arXiv 2607.01763) trains tasks T1..TN one after
another, evaluates every task after every stage, and asks which method forgets more.

No function uses a name defined further down; the lab, the paper's data, loading, measures, run
folders, the SFT baseline and the verl bridge live in harness/, the driver in run_sequence.py, the
reports in eval_forgetting.py. A comment marks each departure from the official (verl) code (docs/
departures.md lists them). `python sdpo_cl.py` runs the walkthrough.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


# ==== 1. GRPO: group-relative advantages, the loss averaging modes, the clipped loss =============

def grpo_advantages(rewards, group_size, norm_by_std=False, eps=1e-6):
    """A_i = r_i - mean_j r_j over each group of `group_size` consecutive rewards, optionally
    divided by the group's (unbiased) std + eps. rewards: [N] -> advantages: [N]."""
    r = rewards.float().view(-1, group_size)                  # [N / G, G]
    advantages = r - r.mean(dim=1, keepdim=True)
    if norm_by_std:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


LOSS_AGG_MODES = ("micro1-token-mean", "token-mean", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm")


def aggregate(per_token, mask, agg="token-mean"):
    """Reduce a [B, T] per-token loss to a scalar (verl's loss_agg_mode). micro1-token-mean: each
    sequence's mean over its valid tokens, averaged over all B sequences (those without a valid
    token add 0): what verl computes with one sequence per micro-batch, as the paper's runs did;
    the update shrinks with the share of samples that have an SDPO target. token-mean: every
    valid token weighs the same. seq-mean-token-mean: mean per sequence, then over sequences with
    a token (original GRPO). seq-mean-token-sum-norm: per-sequence sum over a constant T (Dr.
    GRPO), here the padded length (departure: verl uses the generation budget). An all-zero mask
    gives a zero still connected to the graph."""
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


def aggregation_share(mask_part, mask_all, agg="token-mean"):
    """The weight of aggregate(part) in aggregate(all), `part` a subset of the rows of `all`, so
    that micro-batches add up to their mini-batch: its share of the valid tokens (token-mean), of
    the rows (micro1-token-mean), or of the rows with a valid token (the seq-mean modes)."""
    if agg == "token-mean":
        return (mask_part.sum() / mask_all.sum().clamp(min=1)).item()
    if agg == "micro1-token-mean":
        return mask_part.shape[0] / max(mask_all.shape[0], 1)
    return ((mask_part.sum(1) > 0).sum() / (mask_all.sum(1) > 0).sum().clamp(min=1)).item()


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


# ==== 2. SDPO: the divergence between student and teacher, and the loss ==========================

def token_logprobs(logits, ids):
    """log softmax(logits) at the given tokens: logits [..., V], ids [...] -> [...]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def log_tail(logp_k):
    """log(1 - sum_k p_k) for log-probs [..., k] -> [..., 1]: the mass outside the support. The
    logsumexp is clamped below 0 so the tail never becomes log(0), and expm1 keeps precision when
    the support holds nearly all the mass."""
    lse = torch.logsumexp(logp_k, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.log(-torch.expm1(lse))


def topk_support(student_logp, teacher_logp, topk, add_tail=True):
    """Restrict both distributions to the student's top-k tokens at each position. Inputs are
    log-probs over the full vocabulary [B, T, V]; outputs [B, T, k+1] with the tail bucket (a proper
    distribution: k tokens plus "everything else"), or [B, T, k] renormalised over the k tokens."""
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


# ==== 3. Tasks: examples, a verifiable reward in [0, 1], optional rich feedback ==================

@dataclass
class Task:
    """Train/test examples (`prompt`, `answer`, optional `system`) and a verifier: reward(
    completion, example) in [0, 1]; feedback(completion, example) says what was wrong, or None.
    The lab's families and the paper's data (harness/) are Tasks."""
    name: str
    train: Sequence[dict]         # a datasets.Dataset or a list of dicts
    test: Sequence[dict]          # a datasets.Dataset (evaluation selects rows from it)
    reward: Callable[[str, dict], float]
    feedback: Callable[[str, dict], str | None] | None = None
    max_new_tokens: int | None = None        # the task's own generation budget, or None
    well_formed: Callable[[str, dict], bool] | None = None   # has the task's answer format,
    #                                         right or wrong (a collapse measure); None: not known


def generation_budget(cfg, task) -> int:
    return min(cfg.max_new_tokens, task.max_new_tokens or cfg.max_new_tokens)


def mix_tasks(tasks) -> Task:
    """One task scoring examples of several (replay, multitask), each naming its task in "task"."""
    own = {t.name: t for t in tasks}
    budgets = [t.max_new_tokens for t in tasks]
    return Task("+".join(own), [], [], lambda c, ex: own[ex["task"]].reward(c, ex),
                lambda c, ex: own[ex["task"]].feedback(c, ex) if own[ex["task"]].feedback else None,
                None if None in budgets else max(budgets),
                (lambda c, ex: own[ex["task"]].well_formed(c, ex))
                if all(t.well_formed for t in tasks) else None)


# ==== 4. Config: every knob, with the official names and defaults, and its checks ================

TEACHER_KINDS = ("ema", "trust-region", "frozen", "live")
# The official templates as the official SDPO config file renders them (block scalars `|-`: no
# trailing newline; the dataclass defaults of the official code end in newlines it drops).
REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
FEEDBACK_TEMPLATE = ("\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                     "{feedback_raw}")


def knob(default, *, low=None, high=None, strict=False, choices=None, none=None):
    """A Config field and what it allows besides its default's kind (an int field takes whole
    numbers, a float field finite numbers, a bool field true or false): numbers from `low` (not
    low itself when strict) up to `high`, or one of `choices`; and None where `none` says what
    None means."""
    return dataclasses.field(default=default, metadata=dict(
        low=low, high=high, strict=strict, choices=choices, none=none))


def knob_problem(f, value) -> str | None:
    """What field f's knob allows, when `value` is not allowed; None when it is."""
    rule, kind = f.metadata, type(f.default)
    if rule["choices"]:
        return None if value in rule["choices"] else "one of " + ", ".join(
            map(repr, rule["choices"]))
    if value is None and rule["none"]:
        return None
    if kind in (bool, str):
        return None if isinstance(value, kind) else "true or false" if kind is bool else "a string"
    low, high, strict = rule["low"], rule["high"], rule["strict"]
    wanted = (f"an integer >= {low}" if kind is int
              else f"a finite number {'>' if strict else '>='} {low}" if high is None
              else f"a number in {'(' if strict else '['}{float(low)}, {float(high)}]")
    wanted += f", or None ({rule['none']})" if rule["none"] else ""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (not number or not math.isfinite(value) or kind is int and not isinstance(value, int)
            or low is not None and (value < low or strict and value == low)
            or high is not None and value > high):
        return wanted
    return None


def check_config(c) -> None:
    """Refuse a Config that cannot run, naming the field, its value and what is allowed: each
    knob's own rule, then the settings that cannot go together."""
    def refuse(name, allowed):
        raise ValueError(f"Config.{name}={getattr(c, name)!r} is invalid: allowed {allowed}")

    for f in dataclasses.fields(c):
        if f.metadata and knob_problem(f, getattr(c, f.name)):
            refuse(f.name, knob_problem(f, getattr(c, f.name)))
    for name, keys in (("reprompt_template", ("{prompt}", "{solution}", "{feedback}")),
                       ("solution_template", ("{successful_previous_attempt}",)),
                       ("feedback_template", ("{feedback_raw}",))):
        if not all(k in getattr(c, name) for k in keys):
            refuse(name, "a string containing " + " ".join(keys))
    if not (isinstance(c.adam_betas, (tuple, list)) and len(c.adam_betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
            for b in c.adam_betas)):
        refuse("adam_betas", "two numbers in [0, 1), e.g. [0.9, 0.999]")
    if c.prompts_per_step % max(c.ppo_mini_batch_size, 1):
        refuse("ppo_mini_batch_size", f"0 or a divisor of prompts_per_step={c.prompts_per_step}")
    if c.teacher_path and (c.teacher_regularization == "live" or c.lora_rank):
        refuse("teacher_path", "None with teacher_regularization='live' (no weights of its "
                               "own) or lora_rank > 0 (adapters)")
    if c.loss_mode == "sft" and c.kl_loss_coef:
        refuse("kl_loss_coef", "0 with loss_mode='sft' (supervised fine-tuning keeps no anchor)")
    if not c.full_logit_distillation and c.alpha != 1.0:
        refuse("alpha", "1.0 when full_logit_distillation=False (the sampled-token estimate is "
                        "a reverse KL)")
    c.adam_betas = tuple(c.adam_betas)


@dataclass
class Config:
    """Every knob of one run, with the official defaults (the paper's runs) unless a comment says
    otherwise, and what it allows (knob); harness/verl.py maps the names onto verl's keys, and
    harness/lab.py's lab_config() scales the defaults down to the lab."""
    seed: int = 0                               # seeds python, torch and the rollout sampling
    # --- rollout ----------------------------------------------------------------------------------
    prompts_per_step: int = knob(32, low=1)     # prompts per rollout batch
    group_size: int = knob(8, low=2)            # G: answers sampled per prompt
    max_new_tokens: int = knob(8192, low=1)     # the answer budget (a task may ask for less)
    temperature: float = knob(1.0, low=0, strict=True)   # of the training rollouts
    rollout_chunk_size: int = knob(0, low=0)    # prompts per generate() call, 0 = all at once
    enable_thinking: bool = knob(False)         # the chat template's thinking switch (Qwen3)
    # --- evaluation -------------------------------------------------------------------------------
    eval_mode: str = knob("sample", choices=("greedy", "sample"))   # the mean of eval_samples
    eval_temperature: float = knob(0.6, low=0, strict=True)
    eval_top_p: float = knob(0.95, low=0, high=1, strict=True)
    eval_samples: int = knob(16, low=1)         # answers per test prompt (the paper's scripts)
    eval_examples: int = knob(200, low=1)       # the first this many test rows of each task
    # --- optimiser and memory (LoRA: harness/lora.py) -------------------------------------------
    ppo_mini_batch_size: int = knob(0, low=0)   # prompts per optimizer step, 0 = all of them
    ppo_epochs: int = knob(1, low=1)            # passes over the rollout batch
    balance_batch: bool = knob(True)            # order a batch by length before cutting it
    lr: float = knob(1e-5, low=0, strict=True)   # AdamW's learning rate
    warmup_steps: int = knob(10, low=0)         # rollout batch k (from 0) gets lr * k / this
    weight_decay: float = knob(0.01, low=0)
    adam_betas: tuple = (0.9, 0.999)
    grad_clip: float = knob(1.0, low=0, strict=True)   # the largest global gradient norm
    micro_batch_size: int = knob(0, low=0)      # sequences per forward/backward, 0 = a mini-batch
    gradient_checkpointing: bool = knob(False)  # recompute activations: less memory, more time
    bf16: bool = knob(True)                     # bf16 autocast on CUDA (the CPU runs fp32)
    optim_8bit: bool = knob(False)              # bitsandbytes' 8-bit AdamW (CUDA)
    lora_rank: int = knob(0, low=0)             # train adapters of this rank; 0: the weights
    lora_alpha: float = knob(16.0, low=0, strict=True)   # adapter scale: lora_alpha / lora_rank
    lora_dropout: float = knob(0.0, low=0, high=0.99)   # on an adapter's input
    lora_target_modules: str = knob("all-linear")     # or names, e.g. q_proj,k_proj,v_proj
    # --- which loss -----------------------------------------------------------------------------
    loss_mode: str = knob("sdpo", choices=("grpo", "sdpo", "sft"))   # sft: harness/sft.py
    distillation_weight: float = knob(1.0, low=0, high=1)   # w in (1 - w) GRPO + w SDPO (TRL)
    # --- GRPO -----------------------------------------------------------------------------------
    norm_adv_by_std_in_grpo: bool = knob(False)   # divide A by the group's std (the paper: no)
    clip_ratio_low: float = knob(0.2, low=0, high=1)   # the ratio is clipped to
    clip_ratio_high: float = knob(0.28, low=0)         # [1 - low, 1 + high]
    clip_ratio_c: float | None = knob(3.0, low=1, strict=True, none="no dual clip")   # A < 0
    kl_loss_coef: float = knob(0.0, low=0)      # beta of the k3 KL to the initial model
    loss_agg_mode: str = knob("micro1-token-mean", choices=LOSS_AGG_MODES)   # aggregate()
    # --- SDPO -----------------------------------------------------------------------------------
    alpha: float = knob(0.5, low=0, high=1)     # 0 KL(T||S), 1 KL(S||T), between: the JSD
    full_logit_distillation: bool = knob(True)  # False: the sampled-token estimate (alpha 1)
    distillation_topk: int | None = knob(100, low=1, none="the vocabulary")   # the student's
    distillation_add_tail: bool = knob(True)    # a bucket for the rest (False: renormalise)
    is_clip: float | None = knob(2.0, low=0, strict=True, none="no weight")   # pi/pi_old's cap
    success_reward_threshold: float = knob(0.5, low=0, high=1)   # a demonstration's reward
    max_reprompt_len: int = knob(10240, low=1)  # teacher prompts cut to this, on the right
    dont_reprompt_on_self_success: bool = knob(True)   # never show a sample its own answer
    remove_thinking_from_demonstration: bool = knob(True)
    include_environment_feedback: bool = knob(False)   # the task's feedback in the context
    environment_feedback_only_without_solution: bool = knob(True)
    reprompt_template: str = knob(REPROMPT_TEMPLATE)   # fields {prompt} {solution} {feedback}
    solution_template: str = knob(SOLUTION_TEMPLATE)   # field {successful_previous_attempt}
    feedback_template: str = knob(FEEDBACK_TEMPLATE)   # field {feedback_raw}
    teacher_regularization: str = knob("ema", choices=TEACHER_KINDS)   # see Teacher
    teacher_update_rate: float = knob(0.05, low=0, high=1)   # the EMA's tau; 0: SDPO_0
    teacher_update_every: int = knob(1, low=1)  # the EMA moves every this many batches (ours)
    teacher_path: str | None = None             # the paper's code: start the teacher here
    teacher_init_alpha: float = knob(1.0, low=0, high=1)   # teacher = a path + (1 - a) student
    reset_teacher_each_task: bool = knob(True)  # re-created at each stage, as a run per stage
    teacher_bf16: bool = knob(False)            # the teacher's weights in bf16: half the bytes
    mask_ratio: float = knob(0.0, low=0, high=1)   # the paper's code: drop this share of tokens
    misleading_share: float = knob(0.0, low=0, high=1)   # demonstrations swapped for misleading
    misleading_kind: str = knob("content", choices=("content", "format"))   # ones (ours)
    distill_scope: str = knob("all", choices=("all", "final_answer"))   # after answer_marker
    answer_marker: str = knob("#")              # where the final answer starts (ours)
    share_teacher_prefix: bool = knob(True)     # a KV cache per teacher prompt (False: as verl)
    # --- the continual sequence and its remedies (this project's) -------------------------------
    steps_per_task: int = knob(50, low=1)       # rollout batches per task
    replay_fraction: float = knob(0.0, low=0, high=0.99)   # of each batch, from earlier tasks
    multitask: bool = knob(False)               # every batch from all tasks (an upper bound)
    eval_every: int = knob(0, low=0)            # evaluate every this many batches (curves)

    def __post_init__(self):
        check_config(self)

    @property
    def sdpo_weight(self) -> float:   # w in (1 - w) GRPO + w SDPO: distillation_weight, or 0
        return self.distillation_weight if self.loss_mode == "sdpo" else 0.0


# ==== 5. Rollout: G completions per prompt, response masks, the sampling policy's log-probs ======

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


def tokenize_prompts(tokenizer, texts, device, max_length=None):
    """Prompt texts -> left-padded ids and attention mask [B, P], as generate() wants them; with
    max_length, each cut to that many tokens on the right (verl's max_reprompt_len)."""
    tokenizer.padding_side, tokenizer.truncation_side = "left", "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                    truncation=max_length is not None, max_length=max_length)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def pad_cat(rows, value, left=False):
    """The one padding helper: rows (tensors [b_i, T_i], or id lists, one row each) padded with
    `value` to the widest, left (prompts) or right (responses), concatenated: [sum b_i, max T_i]."""
    rows = [torch.as_tensor(r)[None] if not torch.is_tensor(r) or r.dim() == 1 else r for r in rows]
    width = max(r.shape[1] for r in rows)
    return torch.cat([F.pad(r, (width - r.shape[1], 0) if left else (0, width - r.shape[1]),
                            value=value) for r in rows])


def eos_ids(model, tokenizer) -> list:
    ids = model.generation_config.eos_token_id                 # an id, a list of them, or None
    return sorted((set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id})
                  - {None})


def response_mask_from_positions(response_ids, eos_token_ids):
    """[B, T] float mask: 1 on every token up to and including the first EOS, 0 after it.
    Built from positions, not from `ids != pad`, which would drop the EOS when pad == eos."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    T = response_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), T)   # no EOS -> all T valid
    return (torch.arange(T, device=response_ids.device)[None, :] <= first[:, None]).float()


class RecordSampledLogprobs:
    """A logits processor recording log pi(y_t) of each sampled token during generate(), one
    [B, V] at a time; it runs before the temperature warper, so it divides by the temperature.
    Departure: verl recomputes these with a forward pass; the same numbers, one pass fewer."""

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


def decode_completions(tokenizer, response_ids, response_mask):
    return [tokenizer.decode(ids[m > 0], skip_special_tokens=True)
            for ids, m in zip(response_ids, response_mask)]


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


@contextlib.contextmanager
def eval_mode(model):
    """No dropout for a pass without gradients; the model's own mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast_for(cfg, model):
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=cfg.bf16 and model.device.type == "cuda")


@torch.no_grad()
def generate(model, tokenizer, prompt_texts, max_new_tokens, *, sample=True, temperature=1.0,
             top_p=1.0, num_return_sequences=1) -> Rollout:
    """Batched sampling (KV cache) of `num_return_sequences` completions per prompt text."""
    ids, attn = tokenize_prompts(tokenizer, prompt_texts, model.device)
    recorder = RecordSampledLogprobs(temperature if sample else 1.0)
    eos = eos_ids(model, tokenizer)
    with eval_mode(model):
        out = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=sample,
            **(dict(temperature=temperature, top_p=top_p, top_k=0) if sample else {}),
            repetition_penalty=1.0, num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, logits_processor=[recorder])
    response_ids = out[:, ids.shape[1]:]                                   # [B, T]
    mask = response_mask_from_positions(response_ids, eos)
    old_logprobs = recorder.finish(response_ids[:, -1]) * mask
    return Rollout(ids.repeat_interleave(num_return_sequences, 0),
                   attn.repeat_interleave(num_return_sequences, 0), response_ids, mask,
                   old_logprobs, decode_completions(tokenizer, response_ids, mask))


def concat_rollouts(rollouts, pad_id) -> Rollout:
    """One Rollout from several (rollout_chunk_size): prompts left-, responses right-padded."""
    field = lambda name: [getattr(r, name) for r in rollouts]
    return Rollout(pad_cat(field("prompt_ids"), pad_id, left=True),
                   pad_cat(field("prompt_mask"), 0, left=True),
                   pad_cat(field("response_ids"), pad_id), pad_cat(field("response_mask"), 0),
                   pad_cat(field("old_logprobs"), 0), sum(field("completions"), []))


def real_token_positions(attention_mask):
    """Positions that count real tokens only, as generate() gives them with left padding."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    """Model inputs for prompt + response. Logits are kept only for the last T+1 positions:
    logits[:, :-1] is then [B, T, V] with position t predicting response_ids[:, t]. Position ids
    count real tokens only, as generate() does with left padding."""
    attn = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return dict(input_ids=torch.cat([prompt_ids, response_ids], dim=1), attention_mask=attn,
                position_ids=real_token_positions(attn), logits_to_keep=response_ids.shape[1] + 1)


def response_scores(model, prompt_ids, prompt_mask, response_ids, response_mask):
    """Logits [B, T, V] of the responses after their prompts: t predicts response_ids[:, t]."""
    return model(**sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask),
                 use_cache=False).logits[:, :-1]


# ==== 6. The teacher: its context, its weights, its scores =======================================

def strip_thinking(text: str) -> str:
    """Drop every <think>...</think> block, then everything up to a remaining unmatched </think>
    (a model whose template opens the block in the prompt), as the paper's code does."""
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


def teacher_contexts(prompts, completions, rewards, feedbacks, group_size, cfg,
                     misleading=None) -> list:
    """One teacher prompt per sample (raw user text, before the chat template), or None when there
    is neither a demonstration nor feedback: that sample's distillation mask is 0. prompts: the
    prompt of each sample (N, repeated G times); rewards: N floats; feedbacks: N strings or None;
    misleading: N demonstrations shown instead with probability cfg.misleading_share (this
    project's dose of misalignment: harness/dose.py prepares them)."""
    contexts = []
    for i in range(len(completions)):
        group = range(i - i % group_size, i - i % group_size + group_size)
        demos = [j for j in group if rewards[j] >= cfg.success_reward_threshold
                 and not (cfg.dont_reprompt_on_self_success and j == i)]
        demo = feedback = None
        if demos:   # the first success: rollouts are i.i.d., so this is a random one (official)
            demo = completions[demos[0]]
            if cfg.misleading_share and random.random() < cfg.misleading_share:
                demo = misleading[i]
            if cfg.remove_thinking_from_demonstration:
                demo = strip_thinking(demo)
        if (cfg.include_environment_feedback and feedbacks[i] and feedbacks[i].strip()
                and not (demos and cfg.environment_feedback_only_without_solution)):
            feedback = feedbacks[i]
        contexts.append(None if demo is None and feedback is None
                        else teacher_prompt(prompts[i], cfg, demo, feedback))
    return contexts


def final_answer_mask(tokenizer, response_ids, marker) -> torch.Tensor:
    """[B, T]: 1 on the tokens after the last one whose text holds `marker` (the final answer),
    0 before it, and 0 everywhere in a response without one (distill_scope='final_answer')."""
    rows = []
    for ids in response_ids.tolist():
        pieces = tokenizer.convert_ids_to_tokens(ids)
        last = max((t for t, piece in enumerate(pieces) if piece and marker in piece), default=None)
        rows.append([float(last is not None and t > last) for t in range(len(ids))])
    return torch.tensor(rows, device=response_ids.device)


def frozen_copy(model, role, bf16=False):
    """A frozen copy of the model for the teacher or the reference (`role`), in bf16 if asked;
    a LoRA policy makes its own: an adapter on its base, or the bare base (harness/lora.py)."""
    make = getattr(model, "adapter_copy", None)
    weights = make(role) if make else copy.deepcopy(model).eval().requires_grad_(False)
    return weights.to(torch.bfloat16) if bf16 else weights


@torch.no_grad()
def ema_update_(teacher, student, tau):
    """theta_T <- (1 - tau) theta_T + tau theta_S, in place, over the weights the student trains."""
    trained = [s for s in student.parameters() if s.requires_grad]
    for t, s in zip(teacher.parameters(), trained, strict=True):
        t.lerp_(s.detach().to(t.dtype), tau)


class Teacher:
    """Scores response tokens after a teacher context, without gradients. ema: its own weights,
    moved toward the student every teacher_update_every batches of a stage (tau 0: SDPO_0; k > 1:
    StableSDPO's restart-and-freeze). frozen: never moved. live: the student. trust-region: lerp."""

    def __init__(self, policy, cfg: Config):
        self.kind, self.tau, self.cfg = cfg.teacher_regularization, cfg.teacher_update_rate, cfg
        self.model = None   # its weights, which checkpoints keep (trust-region: the reference)
        self.reset(policy)

    def reset(self, policy):
        """(Re-)initialise from the policy, or from teacher_path mixed in by teacher_init_alpha."""
        if self.kind == "live":
            return
        self.model = frozen_copy(policy, "teacher", self.cfg.teacher_bf16)
        if self.cfg.teacher_path:
            from transformers import AutoModelForCausalLM
            ckpt = AutoModelForCausalLM.from_pretrained(self.cfg.teacher_path).to(policy.device)
            ema_update_(self.model, ckpt, self.cfg.teacher_init_alpha)   # alpha of the way to it

    @torch.no_grad()
    def logits(self, policy, score):
        """The teacher's logits, where score(model) runs a model on the teacher's inputs."""
        if self.kind == "live":
            return score(policy)
        if self.kind == "trust-region":   # lerp(reference, student, tau), in logit space
            return torch.lerp(score(self.model), score(policy), self.tau)
        return score(self.model)

    def after_rollout_batch(self, policy, batch):
        """The EMA moves after the stage's `batch`-th batch (1, 2, ...): each, or every k-th."""
        if self.kind == "ema" and self.tau > 0 and not batch % self.cfg.teacher_update_every:
            ema_update_(self.model, policy, self.tau)


@torch.no_grad()
def shared_prefix_logits(model, prefix_ids, prefix_mask, rows, response_ids, response_mask):
    """Logits [b, T, V] of b responses, response i after prefix rows[i] of prefix_ids [U, P].
    Departure: verl runs every (teacher prompt + response) in full. A group's failed samples all
    see the first success, so it has at most two teacher contexts: each runs once, its KV cache is
    copied to its rows, only the responses run on top; the same numbers for about U/b of the
    prefix cost. Eval mode: no dropout (and transformers < 5.24 drops a training model's cache)."""
    from transformers import DynamicCache
    with eval_mode(model):
        T, P = response_ids.shape[1], prefix_ids.shape[1]
        cache = DynamicCache(config=model.config)   # transformers 5.24 renamed past_key_values
        fwd = getattr(model, "get_base_model", lambda: model)().forward   # under a LoRA adapter too
        cache_arg = "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
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
    return torch.cat(logits, dim=1)


def teacher_scores(model, prefix_ids, prefix_mask, rows, response_ids, response_mask,
                   share_prefix=True):
    """Logits [b, T, V] of b responses, response i after teacher prompt rows[i] of the U distinct
    prompts prefix_ids [U, P]: on a shared KV cache per prompt (shared_prefix_logits), or one
    full forward per (prompt + response). Eval mode either way."""
    if share_prefix:
        return shared_prefix_logits(model, prefix_ids, prefix_mask, rows, response_ids,
                                    response_mask)
    with eval_mode(model):
        return response_scores(model, prefix_ids[rows], prefix_mask[rows], response_ids,
                               response_mask)


# ==== 7. One training step: rollout, rewards, targets, the loss, the update ======================

class Hooks:
    """What a driver plugs into continual_sequence: run_sequence.py's measures (harness/
    measures.py), log and run folder. Each does nothing here; a driver overrides what it needs.
    train_step, if set, replaces the training step below: the SFT baseline's (harness/sft.py)."""
    train_step = None   # f(policy, tokenizer, optimizer, scheduler, task, examples, cfg) -> dict
    #                     (no teacher, reference or hooks: SFT has none), for loss_mode='sft'

    def step(self, policy, teacher, task, rollout, samples, targets, cfg) -> dict:
        return {}   # more metrics of a rollout batch, measured before its update
    def log(self, metrics) -> None:
        pass        # after every rollout batch
    def curve(self, policy, base) -> dict:
        return {}   # more numbers at a mid-stage evaluation (every eval_every batches)
    def stage(self, policy, base, outputs, base_sequences, history) -> dict:
        return {}   # more numbers for a stage's record (history: its steps' metrics)
    def resume(self, policy, teacher) -> list:
        return []   # the records of the stages already finished, their weights loaded
    def resume_steps(self, state) -> int:
        return 0    # the next step of a stage stopped midway, its `state` restored in place
    def after_step(self, step, state) -> None:
        pass        # after every rollout batch: `state` is what a resume_steps needs
    def finished(self, k, record, policy, teacher) -> None:
        pass        # after stage k (a checkpoint)


def seed_everything(*keys):
    """Seed python and torch from any keys, e.g. (seed, stage): a stage's randomness depends only
    on them, so a resumed run repeats an uninterrupted one exactly (on CPU)."""
    s = int(hashlib.sha256(repr(keys).encode()).hexdigest()[:8], 16)
    random.seed(s)
    torch.manual_seed(s)
    return random.Random(s)


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


@dataclass
class Targets:
    """What the losses need besides the rollout, computed once per rollout batch."""
    rewards: torch.Tensor                   # [B]
    advantages: torch.Tensor | None         # [B]     GRPO: group-centred rewards
    distill_mask: torch.Tensor | None       # [B, T]  SDPO: response mask x has a teacher context
    teacher_ids: torch.Tensor | None        # [U, P'] the U distinct teacher prompts, left-padded
    teacher_mask: torch.Tensor | None       # [U, P']
    teacher_of: torch.Tensor | None         # [B]     row -> index into U (-1: no context)


def add_teacher_inputs(targets, rollout, samples, rewards, task, tokenizer, cfg):
    """SDPO's targets: each sample's teacher prompt (each distinct one tokenized once) and the
    distillation mask (the response tokens of samples that have a teacher context)."""
    device = rollout.response_ids.device
    feedbacks = [task.feedback(c, ex) if task.feedback and cfg.include_environment_feedback
                 else None for c, ex in zip(rollout.completions, samples)]
    misleading = [ex.get("misleading_" + cfg.misleading_kind) for ex in samples]
    if cfg.misleading_share and None in misleading:   # a row without one: say so, not "None"
        raise ValueError("Config.misleading_share > 0: prepare the tasks with harness/dose.py")
    contexts = teacher_contexts([ex["prompt"] for ex in samples], rollout.completions,
                                rewards.tolist(), feedbacks, cfg.group_size, cfg, misleading)
    texts = [None if c is None else format_prompt(tokenizer, c, ex.get("system"),
                                                  cfg.enable_thinking)
             for c, ex in zip(contexts, samples)]
    distinct = list(dict.fromkeys(t for t in texts if t is not None))
    index = {t: u for u, t in enumerate(distinct)}
    targets.teacher_of = torch.tensor([index.get(t, -1) for t in texts], device=device)
    targets.distill_mask = rollout.response_mask * (targets.teacher_of >= 0).float()[:, None]
    if cfg.distill_scope == "final_answer":   # not the chain of thought, only the answer
        targets.distill_mask = targets.distill_mask * final_answer_mask(
            tokenizer, rollout.response_ids, cfg.answer_marker)
    if cfg.mask_ratio > 0:   # the paper's code: drop a share of the distilled tokens at random
        keep = torch.rand_like(targets.distill_mask) >= cfg.mask_ratio
        targets.distill_mask = targets.distill_mask * keep
    if distinct:
        targets.teacher_ids, targets.teacher_mask = tokenize_prompts(tokenizer, distinct, device,
                                                                     cfg.max_reprompt_len)


def loss_targets(rollout, samples, rewards, task, tokenizer, cfg) -> Targets:
    """GRPO's advantages and SDPO's teacher inputs."""
    device, sdpo_weight = rollout.response_ids.device, cfg.sdpo_weight
    targets = Targets(rewards, None, None, None, None, None)
    if sdpo_weight < 1:
        targets.advantages = grpo_advantages(rewards, cfg.group_size,
                                             cfg.norm_adv_by_std_in_grpo).to(device)
    if sdpo_weight > 0:
        add_teacher_inputs(targets, rollout, samples, rewards, task, tokenizer, cfg)
    return targets


def grpo_part(logprobs, rollout, targets, rows, minibatch, cfg):
    """The GRPO loss of `rows`, scaled to their share of `minibatch`, and its metrics."""
    mask = rollout.response_mask
    loss, m = grpo_loss(logprobs, rollout.old_logprobs[rows], targets.advantages[rows],
                        mask[rows], clip_low=cfg.clip_ratio_low, clip_high=cfg.clip_ratio_high,
                        dual_clip=cfg.clip_ratio_c, agg=cfg.loss_agg_mode)
    share = aggregation_share(mask[rows], mask[minibatch], cfg.loss_agg_mode)
    tokens = aggregation_share(mask[rows], mask[minibatch], "token-mean")   # for the metrics
    return share * loss, {"loss_grpo": share * loss.item(), "clip_frac": tokens * m["clip_frac"],
                          "ratio_mean": tokens * m["ratio_mean"]}


def sdpo_part(policy, teacher, student_logits, rollout, targets, rows, minibatch, cfg):
    """The SDPO loss of the rows of `rows` that have a teacher context, scaled to their share of
    `minibatch`, and its metrics; None when none has. student_logits: [b, T, V] of all `rows`."""
    local = (targets.teacher_of[rows] >= 0).nonzero().squeeze(1)    # rows with a context
    if len(local) == 0:
        return None
    ids, mask = rollout.response_ids[rows][local], rollout.response_mask[rows][local]
    distill = targets.distill_mask[rows][local]
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
    share = aggregation_share(distill, targets.distill_mask[minibatch], cfg.loss_agg_mode)
    return share * loss, {"loss_sdpo": share * loss.item(), "divergence": share * m["divergence"],
                          "t_teacher": t_teacher}


def kl_anchor(logprobs, reference, rollout, rows, minibatch, cfg):
    """The k3 KL to the frozen initial model on `rows`, scaled to their share of `minibatch`,
    and its metric: the anchor of GRPO and SDPO (not of SFT). Departure: verl refuses it with
    SDPO."""
    mask = rollout.response_mask
    with torch.no_grad(), autocast_for(cfg, reference):
        ref_logits = response_scores(reference, rollout.prompt_ids[rows], rollout.prompt_mask[
            rows], rollout.response_ids[rows], mask[rows]).float() / cfg.temperature
    ref_logprobs = token_logprobs(ref_logits, rollout.response_ids[rows])       # [b, T]
    kl = aggregate(k3_kl(logprobs, ref_logprobs), mask[rows], cfg.loss_agg_mode)
    share = aggregation_share(mask[rows], mask[minibatch], cfg.loss_agg_mode)
    return share * kl, {"kl_ref": share * kl.item()}


def micro_batch_loss(policy, teacher, reference, rollout, targets, rows, minibatch, cfg):
    """The loss of `rows` (a micro-batch), each part scaled to its share of `minibatch` (the rows
    of one optimizer step), so that the micro-batches' losses add up to the mini-batch's loss.
    Returns (loss, its metrics weighted the same way)."""
    mask, ids = rollout.response_mask, rollout.response_ids
    with autocast_for(cfg, policy):
        logits = response_scores(policy, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                 ids[rows], mask[rows])
    logits = logits.float() / cfg.temperature                  # [b, T, V]: pi = softmax(z / temp)
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, ids[rows, :, None]).squeeze(-1)          # [b, T]
    with torch.no_grad():                                                   # a metric only
        entropy = -(logp_all.exp() * logp_all).sum(-1)                      # [b, T]
    metrics = {"entropy": aggregation_share(mask[rows], mask[minibatch], "token-mean")
               * aggregate(entropy, mask[rows]).item()}
    none = (logits.sum() * 0.0, {})   # a graph-connected zero: a step runs without any target
    w, beta = cfg.sdpo_weight, cfg.kl_loss_coef
    grpo, grpo_metrics = grpo_part(logprobs, rollout, targets, rows, minibatch, cfg) if (
        w < 1) else none
    sdpo, sdpo_metrics = (sdpo_part(policy, teacher, logits, rollout, targets, rows, minibatch,
                                    cfg) if w > 0 else None) or none   # None: no teacher context
    kl, kl_metrics = kl_anchor(logprobs, reference, rollout, rows, minibatch, cfg) if (
        beta > 0) else none

    loss = (1 - w) * grpo + w * sdpo + beta * kl

    metrics.update(grpo_metrics | sdpo_metrics | kl_metrics, loss=loss.item())
    return loss, metrics


def minibatches(cfg, lengths) -> list:
    """Row indices of each optimizer step: ppo_epochs passes over slices of ppo_mini_batch_size
    prompts' rows; with several, in verl's _balance_batch order on one device (docs/departures.md:
    by length, even ranks up, odd ones down). lengths: [B] prompt + response tokens."""
    size = (cfg.ppo_mini_batch_size or cfg.prompts_per_step) * cfg.group_size
    order = list(range(len(lengths)))
    if cfg.balance_batch and size < len(order):
        order.sort(key=lambda i: (int(lengths[i]), i))
        order = order[::2] + order[1::2][::-1]
    return [torch.tensor(order[r:r + size]) for r in range(0, len(order), size)] * cfg.ppo_epochs


def backward_finite(loss):
    """loss.backward(), refusing a non-finite loss before it reaches any gradient."""
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    loss.backward()


def clipped_optimizer_step(policy, optimizer, max_norm) -> float:
    """Clip the gradients and step; a non-finite norm never reaches the weights. The norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm).item()
    if not math.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm {grad_norm}")
    optimizer.step()
    return grad_norm


def update(policy, teacher, optimizer, scheduler, rollout, targets, cfg, reference=None) -> dict:
    """One optimizer step per mini-batch (gradients accumulated over micro-batches), then the
    lr schedule and the EMA teacher move once. Returns the loss metrics, averaged over the steps."""
    lengths = rollout.prompt_mask.sum(1) + rollout.response_mask.sum(1)     # [B]
    totals, updates = {}, minibatches(cfg, lengths.tolist())
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
        teacher.after_rollout_batch(policy, scheduler.last_epoch)   # batches done this stage
    return totals


def step_metrics(rollout, targets, totals, cfg) -> dict:
    """What one rollout batch looked like: reward, signal (groups with a success, groups whose
    rewards are all equal and so give GRPO nothing), loss parts, lengths, distilled share."""
    groups = targets.rewards.view(-1, cfg.group_size)
    metrics = {"reward": targets.rewards.mean().item(),
               "solved_groups": (groups.max(1).values >= cfg.success_reward_threshold
                                 ).float().mean().item(),
               "zero_adv_groups": (groups.std(1) == 0).float().mean().item(),
               **totals, "response_length": rollout.response_mask.sum(1).mean().item()}
    if targets.distill_mask is not None:
        mask = rollout.response_mask
        metrics["distill_frac"] = (targets.distill_mask.sum() / mask.sum().clamp(min=1)).item()
        metrics["empty_target"] = bool(targets.distill_mask.sum() == 0)
    return metrics


def train_step(policy, tokenizer, teacher, optimizer, scheduler, task, examples, cfg,
               reference=None, hooks=None) -> dict:
    """One rollout batch: sample and reward `examples`, compute each loss's targets, update the
    policy. reference: the frozen initial model, for the KL anchor only; hooks.step measures
    the batch before the update."""
    if cfg.kl_loss_coef > 0 and reference is None:
        raise ValueError("Config.kl_loss_coef > 0 needs the frozen reference model")
    if cfg.loss_mode == "sft":   # the baseline, not a method of this module
        raise ValueError("Config.loss_mode='sft' has no step in sdpo_cl.py: pass hooks="
                         "harness.sft.Hooks() (run_sequence.py does)")
    t_start = time.time()
    rollout, samples, rewards = sample_rollout(policy, tokenizer, task, examples, cfg)
    t_rollout = time.time() - t_start
    targets = loss_targets(rollout, samples, rewards, task, tokenizer, cfg)
    observed = (hooks or Hooks()).step(policy, teacher, task, rollout, samples, targets, cfg)
    totals = update(policy, teacher, optimizer, scheduler, rollout, targets, cfg, reference)
    return step_metrics(rollout, targets, totals, cfg) | observed | {
        "seconds": time.time() - t_start, "t_rollout": t_rollout}


# ==== 8. A task: steps_per_task rollout batches with a fresh optimizer ===========================

def next_batch(task, others, cfg, rng, order):
    """The prompts of one rollout batch and the task that scores them: the next of a shuffled pass
    over the training set (order: the rest of the pass); with replay_fraction, that share drawn
    from the earlier tasks `others`; with multitask, every prompt from one of `others`."""
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


def make_optimizer(policy, cfg):
    """A fresh AdamW over the weights the policy trains (a LoRA policy's adapter) with verl's
    warm-up (rollout batch s gets lr * s / warmup_steps); fused: one kernel for all parameters
    (transformers' Trainer default), several times faster on a CPU. Or bitsandbytes' AdamW8bit."""
    trained = [p for p in policy.parameters() if p.requires_grad]
    if cfg.optim_8bit:   # its two moments in 8 bits (verl: optim.optimizer=AdamW8bit)
        from bitsandbytes.optim import AdamW8bit
        optimizer = AdamW8bit(trained, cfg.lr, cfg.adam_betas, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(trained, cfg.lr, cfg.adam_betas,
                                      weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, s / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    return optimizer, scheduler


def train_task(policy, tokenizer, teacher, task, cfg, *, rng, reference=None, log=None,
               desc="train", others=(), curve=None, hooks=None) -> list:
    """`steps_per_task` rollout batches on one task with a fresh optimizer, as each of the
    paper's stages is a new verl run. others: the tasks replay or multitask draw prompts from;
    curve(step): an evaluation every eval_every batches; log(metrics) after every step;
    hooks.step measures each batch, hooks.train_step (SFT's) replaces train_step; from the
    loop's state (hooks.after_step) hooks.resume_steps goes on as if a stage had not stopped."""
    hooks = hooks or Hooks()
    policy.train()
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    optimizer, scheduler = make_optimizer(policy, cfg)
    order, history = [], []                   # the rest of the pass over the prompts; metrics
    state = dict(policy=policy, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
                 rng=rng, order=order, history=history)
    start = hooks.resume_steps(state)
    bar = tqdm(range(start, cfg.steps_per_task), desc=desc, leave=False, disable=None,
               initial=start, total=cfg.steps_per_task)
    for step in bar:
        examples, batch_task = next_batch(task, others, cfg, rng, order)
        try:
            if hooks.train_step is not None:   # the baseline's own step (harness/sft.py)
                metrics = hooks.train_step(policy, tokenizer, optimizer, scheduler, batch_task,
                                           examples, cfg)
            else:
                metrics = train_step(policy, tokenizer, teacher, optimizer, scheduler,
                                     batch_task, examples, cfg, reference, hooks)
        except FloatingPointError as e:        # where it happened, and what was last finite
            raise FloatingPointError(f"{desc}: step {step}: {e}; last finite metrics: "
                                     f"{history[-1] if history else {}}")
        metrics["step"] = step
        if curve is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            metrics["curve"] = curve(step + 1)
        history.append(metrics)
        if log is not None:
            log(metrics)
        hooks.after_step(step, state)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
    policy.eval()
    return history


# ==== 9. Evaluation: accuracy with the task's own reward =========================================

@torch.no_grad()
def task_accuracy(model, tokenizer, task, cfg, *, with_demonstration=False,
                  batch_size=100) -> dict:
    """Accuracy on the first `eval_examples` test rows as the official code evaluates: the mean
    reward of `eval_samples` samples per prompt (or greedy), with its standard error over the
    per-prompt means. with_demonstration: the gold answer in the prompt, as the teacher sees it.
    Also every answer ("completions") and its (prompt ids, response ids) ("sequences")."""
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


def curve_point(policy, tokenizer, tasks, cfg, keys) -> dict:
    """{task: accuracy} in the middle of a stage (a learning curve), seeded by `keys` without
    disturbing the training's random state: the run trains exactly as without it."""
    python_state = random.getstate()
    devices = [policy.device.index or 0] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed_everything(*keys)
        accuracy = {t.name: task_accuracy(policy, tokenizer, t, cfg)["accuracy"] for t in tasks}
    random.setstate(python_state)
    return accuracy


def accuracy_row(policy, tokenizer, tasks, cfg, lift=False):
    """Row k of the accuracy matrix (accuracy, standard error, three answers per task; with `lift`
    the teacher lift: the accuracy with a demonstration minus without), and the outputs the drift
    measures compare: every answer, and the first per prompt as token ids ("sequences")."""
    record = {"accuracy": {}, "stderr": {}, "samples": {}}
    outputs = {"completions": [], "sequences": []}
    n = cfg.eval_samples if cfg.eval_mode == "sample" else 1
    for task in tqdm(tasks, desc="evaluating", leave=False, disable=None):
        plain = task_accuracy(policy, tokenizer, task, cfg)
        record["accuracy"][task.name] = plain["accuracy"]
        record["stderr"][task.name] = plain["stderr"]
        record["samples"][task.name] = plain["completions"][:3]
        outputs["completions"] += plain["completions"]
        outputs["sequences"] += plain["sequences"][::n]
        if lift:
            demo = task_accuracy(policy, tokenizer, task, cfg, with_demonstration=True)
            record.setdefault("teacher_lift", {})[task.name] = demo["accuracy"] - plain["accuracy"]
    return record, outputs


# ==== 10. The continual sequence: train T1..TN in order, evaluate every task after every stage ====

def evaluation_tasks(sequence, probes) -> list:
    """The tasks evaluated after every stage: the sequence, then the probes not in it."""
    return list(sequence) + [p for p in probes if p.name not in {t.name for t in sequence}]


def base_row(base, tokenizer, tasks, cfg, hooks=None) -> dict:
    """Row 0: the base model on every task with its teacher lift, and its answers ("sequences")
    that response drift is measured on; seeded apart from cfg.seed, so a run computes it once."""
    t0 = time.time()
    seed_everything("base-eval")
    record, outputs = accuracy_row(base, tokenizer, tasks, cfg, lift=True)
    record.update((hooks or Hooks()).stage(base, base, outputs, outputs["sequences"], []))
    return {"record": {"stage": 0, "task": "base", **record, "seconds": time.time() - t0},
            "sequences": outputs["sequences"]}


def train_stage(k, sequence, policy, tokenizer, teacher, base, cfg, *, eval_tasks,
                base_sequences, hooks, steps=None, desc="") -> dict:
    """Stage k >= 1: train sequence[k - 1] (its teacher re-created first), then row k of R."""
    t0, task = time.time(), sequence[k - 1]
    rng = seed_everything(cfg.seed, "train", k)
    if teacher is not None and cfg.reset_teacher_each_task and k > 1:
        teacher.reset(policy)
    stage_cfg = dataclasses.replace(cfg, steps_per_task=steps[k - 1]) if steps else cfg

    def curve(step):     # a mid-stage evaluation, and what the hooks see of the weights then
        return {"accuracy": curve_point(policy, tokenizer, eval_tasks, cfg,
                                        (cfg.seed, "curve", k, step)), **hooks.curve(policy, base)}
    history = train_task(
        policy, tokenizer, teacher, task, stage_cfg, rng=rng, reference=base,
        log=lambda m: hooks.log({"stage": k, "task": task.name, **m}),
        desc=f"{desc} stage {k}/{len(sequence)} {task.name}".strip(),
        others=list(sequence) if cfg.multitask else list(sequence[:k - 1]),
        curve=curve, hooks=hooks)
    seed_everything(cfg.seed, "eval", k)
    row, outputs = accuracy_row(policy, tokenizer, eval_tasks, cfg)
    return {"stage": k, "task": task.name, **row,
            "curve": [{"step": h["step"] + 1, **h["curve"]} for h in history if "curve" in h],
            **hooks.stage(policy, base, outputs, base_sequences, history),
            "seconds": time.time() - t0}


def continual_sequence(cfg, policy, tokenizer, sequence, probes=(), *, steps=None, row0=None,
                       hooks=None, desc="") -> list:
    """Train the tasks of `sequence` in order from `policy`, evaluating sequence + probes before
    (row 0: base_row(), unless given) and after each stage; returns one record per stage,
    record["accuracy"] = row k of R. The SDPO teacher is re-created at each stage, as a verl run
    per stage does (unless reset_teacher_each_task=False). `hooks` (Hooks) measure, log, resume
    after the stages already finished, and checkpoint each stage (SFT: harness.sft.Hooks)."""
    hooks = hooks or Hooks()
    if (cfg.loss_mode == "sft") != (hooks.train_step is not None):   # before any evaluation
        raise ValueError(f"Config.loss_mode={cfg.loss_mode!r} with hooks.train_step="
                         f"{hooks.train_step!r}: 'sft' trains with harness.sft.Hooks()'s step, "
                         "'grpo' and 'sdpo' with none")
    eval_tasks = evaluation_tasks(sequence, probes)
    base = frozen_copy(policy, "base")
    teacher = Teacher(policy, cfg) if cfg.loss_mode == "sdpo" else None
    records = hooks.resume(policy, teacher)
    if row0 is None:
        row0 = base_row(base, tokenizer, eval_tasks, cfg, hooks)
    for k in range(len(records), len(sequence) + 1):
        record = dict(row0["record"]) if k == 0 else train_stage(
            k, sequence, policy, tokenizer, teacher, base, cfg, eval_tasks=eval_tasks,
            base_sequences=row0["sequences"], hooks=hooks, steps=steps, desc=desc)
        records.append(record)
        hooks.finished(k, record, policy, teacher)
    return records


if __name__ == "__main__":
    from harness.walkthrough import walkthrough
    walkthrough()
