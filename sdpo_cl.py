"""sdpo_cl.py: GRPO vs SDPO in continual post-training, in one readable file.

GRPO (DeepSeekMath, arXiv 2402.03300). Sample G answers to a prompt, score each with a verifier,
and raise the log-probability of the answers that beat their group's mean reward, with a PPO-style
clipped ratio. Every token of an answer gets that answer's one scalar advantage; a group whose
answers all score the same produces no gradient at all.

SDPO (Hübotter et al., arXiv 2601.20802). Uses the same rollouts but gives a dense signal. The model
itself acts as a teacher: it sees a successful sibling answer (or textual feedback) in its prompt
and scores every token of the student's answer. The student is pulled toward the teacher's
next-token distribution by a per-token divergence (forward KL, generalised Jensen-Shannon, or
reverse KL). SDPO replaces the GRPO loss; rewards only pick the demonstrations.

The experiment (Wang et al., "Denser != Better", arXiv 2607.01763) trains tasks T1..TN one after
another and evaluates every task after every stage, to see which method forgets more.

Reading order: Config -> tasks and rewards -> models (and the built-in tiny lab) -> rollout ->
GRPO -> SDPO (teacher contexts, divergences, loss) -> teachers -> training -> evaluation -> the
continual sequence -> drift measures. Sections marked ALGORITHM hold the methods; the rest is
plumbing that is safe to change. Option names follow the official verl configuration.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

# ================================================================================================
# Config
# ================================================================================================

LOSS_MODES = ("grpo", "sdpo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
TEACHER_KINDS = ("ema", "trust-region", "frozen", "live")
EVAL_MODES = ("greedy", "sample")

REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
FEEDBACK_TEMPLATE = (
    "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"
)


@dataclass
class Config:
    """Every knob of one training run. Defaults are the official ones (ALGORITHMS.md) unless a
    comment says otherwise; `lab_config()` scales them down for the tiny lab."""

    # --- model and run --------------------------------------------------------------------------
    model: str = "lab"
    """'lab' (the built-in tiny model), a hub id, a local folder, or a .gguf file"""
    seed: int = 0
    """seeds python, torch and the rollout sampling"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'"""

    # --- rollout (ALGORITHMS.md §1) ------------------------------------------------------------
    prompts_per_step: int = 32
    """prompts per rollout batch (data.train_batch_size)"""
    group_size: int = 8
    """G: completions sampled per prompt (actor_rollout_ref.rollout.n)"""
    max_new_tokens: int = 1024
    """generation budget per completion; a task may ask for less"""
    temperature: float = 1.0
    """sampling temperature for training rollouts"""

    # --- evaluation -----------------------------------------------------------------------------
    eval_mode: str = "greedy"
    """'greedy', or 'sample' (eval_temperature, eval_top_p, eval_samples; mean accuracy)"""
    eval_temperature: float = 0.6
    """temperature when eval_mode='sample'"""
    eval_top_p: float = 0.95
    """nucleus mass when eval_mode='sample'"""
    eval_samples: int = 1
    """samples per test prompt when eval_mode='sample'"""
    eval_examples: int = 200
    """at most this many test examples per task (the first ones, so every stage sees the same)"""

    # --- optimiser (one optimizer step per rollout batch, as in the paper) ----------------------
    lr: float = 1e-5
    """AdamW learning rate (actor_rollout_ref.actor.optim.lr)"""
    warmup_steps: int = 10
    """linear warm-up steps, restarted at every task like a fresh verl run"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    adam_betas: tuple = (0.9, 0.999)
    """AdamW betas"""
    grad_clip: float = 1.0
    """max global gradient norm"""
    micro_batch_size: int = 0
    """sequences per forward/backward (gradient accumulation); 0 = the whole batch at once"""
    gradient_checkpointing: bool = False
    """trade compute for activation memory (real models on small GPUs)"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU, where everything runs in fp32)"""

    # --- which loss -----------------------------------------------------------------------------
    loss_mode: str = "sdpo"
    """'grpo' or 'sdpo' (actor_rollout_ref.actor.policy_loss.loss_mode vanilla / sdpo)"""
    distillation_weight: float = 1.0
    """w in (1-w)*GRPO + w*SDPO when loss_mode='sdpo'; 1.0 = pure SDPO (official; TRL's knob)"""

    # --- GRPO (ALGORITHMS.md §3) ----------------------------------------------------------------
    norm_adv_by_std_in_grpo: bool = False
    """divide group-centred rewards by their std (the paper's baseline: off)"""
    clip_ratio_low: float = 0.2
    """epsilon_low of the PPO clip"""
    clip_ratio_high: float = 0.28
    """epsilon_high of the PPO clip"""
    clip_ratio_c: float = 3.0
    """dual-clip bound c for negative advantages (must be > 1)"""
    kl_loss_coef: float = 0.0
    """beta of the k3 KL to the frozen initial model (the paper: 0, no reference model kept)"""
    loss_agg_mode: str = "token-mean"
    """'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum-norm'"""

    # --- SDPO (ALGORITHMS.md §4) ----------------------------------------------------------------
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
    success_reward_threshold: float = 1.0
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

    # --- continual sequence ---------------------------------------------------------------------
    steps_per_task: int = 50
    """optimizer steps (= rollout batches) per task"""

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"Config.{name}={getattr(self, name)!r} is invalid: allowed {allowed}")

        def choice(name, options):
            if getattr(self, name) not in options:
                bad(name, "one of " + ", ".join(repr(o) for o in options))

        def in_range(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v > hi or v < lo or (lo_open and v == lo):
                bad(name, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")

        choice("loss_mode", LOSS_MODES)
        choice("loss_agg_mode", LOSS_AGG_MODES)
        choice("teacher_regularization", TEACHER_KINDS)
        choice("eval_mode", EVAL_MODES)
        choice("device", ("auto", "cpu", "cuda"))
        for name in ("prompts_per_step", "max_new_tokens", "eval_samples", "eval_examples",
                     "steps_per_task"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            bad("group_size", "an integer >= 2 (a group of one has no baseline and no sibling)")
        for name in ("warmup_steps", "micro_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        in_range("alpha", 0.0, 1.0)
        in_range("distillation_weight", 0.0, 1.0)
        in_range("teacher_update_rate", 0.0, 1.0)
        in_range("teacher_init_alpha", 0.0, 1.0)
        in_range("mask_ratio", 0.0, 1.0)
        in_range("success_reward_threshold", 0.0, 1.0)
        in_range("lr", 0.0, 1.0, lo_open=True)
        in_range("temperature", 0.0, 100.0, lo_open=True)
        in_range("eval_temperature", 0.0, 100.0, lo_open=True)
        in_range("eval_top_p", 0.0, 1.0, lo_open=True)
        in_range("clip_ratio_low", 0.0, 1.0)
        in_range("clip_ratio_high", 0.0, 100.0)
        in_range("kl_loss_coef", 0.0, 1e6)
        in_range("weight_decay", 0.0, 1e6)
        in_range("grad_clip", 0.0, 1e9, lo_open=True)
        if self.clip_ratio_c is not None and not (isinstance(self.clip_ratio_c, (int, float))
                                                  and self.clip_ratio_c > 1.0):
            bad("clip_ratio_c", "a number > 1, or None to disable the dual clip")
        if self.distillation_topk is not None and (not isinstance(self.distillation_topk, int)
                                                   or self.distillation_topk <= 0):
            bad("distillation_topk", "an integer >= 1, or None for the full vocabulary")
        if self.is_clip is not None and not (isinstance(self.is_clip, (int, float))
                                             and self.is_clip > 0):
            bad("is_clip", "a number > 0, or None for no importance weight")
        if self.teacher_path and self.teacher_regularization == "live":
            bad("teacher_path", "None with teacher_regularization='live' (the live teacher is "
                                "the student itself and has no weights of its own)")
        if not self.full_logit_distillation and self.alpha != 1.0:
            bad("alpha", "1.0 when full_logit_distillation=False (the sampled-token estimate "
                         "exists only for the reverse KL)")
        for name, fields in (("reprompt_template", ("{prompt}", "{solution}", "{feedback}")),
                             ("solution_template", ("{successful_previous_attempt}",)),
                             ("feedback_template", ("{feedback_raw}",))):
            if not all(f in getattr(self, name) for f in fields):
                bad(name, "a string containing " + " ".join(fields))
        self.adam_betas = tuple(self.adam_betas)


def lab_config(**overrides) -> Config:
    """The official settings scaled down to the tiny lab: the paper's 32 prompts x 8 rollouts, a
    larger learning rate for a 1M-parameter model (3e-4; at 6e-4 both methods collapse in a few
    dozen steps), 25 steps per task, short answers, top-20 distillation (the vocabulary has ~100
    tokens, so top-100 would be all of it). Everything else stays official."""
    settings = dict(model="lab", prompts_per_step=32, group_size=8, max_new_tokens=24, lr=3e-4,
                    warmup_steps=5, distillation_topk=20, steps_per_task=25, eval_examples=100,
                    device="cpu")
    settings.update(overrides)
    return Config(**settings)


# ================================================================================================
# Tasks: examples + a verifiable reward in [0, 1] + optional rich feedback
# ================================================================================================

@dataclass
class Task:
    """A task = train/test examples (columns `prompt`, `answer`, optional `system`) and a
    verifier. `reward(completion, example)` returns a float in [0, 1]; `feedback(completion,
    example)` returns a short text saying what was wrong (without the answer), or None."""
    name: str
    train: Dataset
    test: Dataset
    reward: Callable[[str, dict], float]
    feedback: Callable[[str, dict], str | None] | None = None
    max_new_tokens: int | None = None
    """a task's own generation budget (the lab's are short); None = Config.max_new_tokens"""


def generation_budget(cfg, task) -> int:
    return min(cfg.max_new_tokens, task.max_new_tokens or cfg.max_new_tokens)


def first_number(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def last_answer_letter(text: str) -> str | None:
    """The letter after the last <answer> tag (the official multiple-choice reward)."""
    found = re.findall(r"<answer>\s*([A-Z])", text)
    return found[-1] if found else None


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
    return float(last_answer_letter(completion) == last_answer_letter(example["answer"]))


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


# --- The lab's synthetic task families ----------------------------------------------------------
# Four trained domains mirror the paper's Math -> Science -> ToolUse -> Code sequence; two held-out
# probes are partially related to them (the out-of-distribution columns). Each family is a
# generator `make(rng) -> {"prompt", "answer", "distractor"}` with a reward and, where natural,
# rich feedback. The distractor is a plausible wrong habit (an off-by-one sum, the smallest option
# instead of the largest, arguments in prompt order, the string left unreversed). The base model
# sees it as the target of half of its plain examples, so that, like a real base model, it holds
# a right and a wrong behaviour side by side: RL and self-distillation then have something to
# select, which a 1M-parameter model's missing skills would not give them in a few dozen steps.

NAMES = ("ann", "bob", "cai", "dan", "eve", "fay")
WORDS = ("hi", "ok", "yo", "bye")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def make_math(rng):                       # Math: two-number addition
    a, b = rng.randrange(30), rng.randrange(10)
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "distractor": str(a + b + 1)}


def _mcq(question, options, gold, wrong):
    letters = "ABCD"
    shown = " ".join(f"{letters[i]}){o}" for i, o in enumerate(options))
    return {"prompt": f"{question} {shown}", "answer": f"<answer>{letters[gold]}</answer>",
            "distractor": f"<answer>{letters[wrong]}</answer>"}


def make_science(rng):                    # Science: multiple choice with an <answer> tag
    options = rng.sample(range(10), 4)
    return _mcq("largest?", options, options.index(max(options)), options.index(min(options)))


def make_tool(rng):                       # ToolUse: arguments in any order -> a canonical call
    to, at, msg, on = rng.choice(NAMES), rng.randrange(1, 13), rng.choice(WORDS), rng.choice(DAYS)
    parts = [f"to {to}", f"at {at}", f"say {msg}", f"on {on}"]
    rng.shuffle(parts)
    in_prompt_order = ",".join(p.split(" ")[1] for p in parts)
    return {"prompt": "send " + " ".join(parts), "answer": f"send({to},{at},{msg},{on})",
            "distractor": f"send({in_prompt_order})"}


def make_code(rng):                       # Code: a string program, checked by its output
    s = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(4, 8)))
    return {"prompt": f"rev({s})", "answer": s[::-1], "distractor": s}


def make_mcq_math(rng):                   # probe: Science's format with Math's content
    a, b = rng.randrange(10), rng.randrange(10)
    wrong = rng.sample([v for v in range(19) if v != a + b], 3)
    options = wrong + [a + b]
    rng.shuffle(options)
    return _mcq(f"{a}+{b}?", options, options.index(a + b), options.index(max(options)))


def make_math_words(rng):                 # probe: Math's content in words
    a, b = rng.randrange(30), rng.randrange(10)
    return {"prompt": f"add {a} and {b}", "answer": str(a + b), "distractor": str(a + b + 1)}


LAB_FAMILIES = {
    # name: (generator, reward, feedback, max_new_tokens)
    "math": (make_math, number_reward, number_feedback, 6),
    "science": (make_science, mcq_reward, None, 20),
    "tool": (make_tool, exact_reward, tool_feedback, 24),
    "code": (make_code, exact_reward, string_feedback, 10),
    "mcq_math": (make_mcq_math, mcq_reward, None, 20),
    "math_words": (make_math_words, number_reward, number_feedback, 6),
}
LAB_SEQUENCE = ("math", "science", "tool", "code")
LAB_PROBES = ("mcq_math", "math_words")


def make_lab_task(name: str, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> Task:
    """Draw a family's train and test sets independently from its generator (test prompts are
    unique). A family is a skill drill: in small families (math has 300 distinct prompts) test
    prompts also occur in training, in large ones (tool, code) they mostly do not. A 1M-parameter
    model cannot learn arithmetic on unseen facts from a few RL steps; it can sharpen a skill."""
    make, reward, feedback, max_new = LAB_FAMILIES[name]
    rng = random.Random(f"{name}-{seed}")
    test = {}
    while len(test) < n_test:
        ex = make(rng)
        test.setdefault(ex["prompt"], ex)
    train = [make(rng) for _ in range(n_train)]
    return Task(name, Dataset.from_list(train), Dataset.from_list(list(test.values())),
                reward, feedback, max_new)



# --- Real data: the official SDPO layout and GSM8K ----------------------------------------------

def read_official_rows(path: Path) -> list:
    """JSON lines with `prompt` and `answer` (strings), optional `system` and `kind`. A
    malformed row raises one error naming the file, the line and the field."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {n}: expected a JSON object with prompt and answer")
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}, line {n}: field {key!r} must be a non-empty string")
        for key in ("system", "kind"):
            if key in row and row[key] is not None and not isinstance(row[key], str):
                raise ValueError(f"{path}, line {n}: field {key!r} must be a string")
        rows.append({"prompt": row["prompt"], "answer": row["answer"],
                     "system": row.get("system") or None, "kind": row.get("kind") or ""})
    return rows


def official_reward(completion: str, example: dict) -> float:
    """kind 'mcq': the letter after the last <answer> tag equals the gold letter (the gold may
    be written `B` or `<answer>B</answer>`); otherwise exact match after normalisation, of the
    text inside the last <answer> tag when there is one."""
    if example["kind"] == "mcq":
        gold = last_answer_letter(example["answer"]) or example["answer"].strip()[:1].upper()
        return float(last_answer_letter(completion) == gold)
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
    return float(normalize(tagged[-1] if tagged else completion) == normalize(example["answer"]))


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
    return Task(folder.name, Dataset.from_list(rows["train"]), Dataset.from_list(rows["test"]),
                official_reward)


def last_number(text: str) -> float | None:
    found = re.findall(r"-?\d[\d,]*\.?\d*", text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def gsm8k_example(row: dict) -> dict:
    """A GSM8K row (`question`, `answer` = worked solution ending in '#### 42') -> our schema."""
    return {"prompt": row["question"].strip(), "answer": row["answer"].split("####")[-1].strip(),
            "system": None, "kind": "gsm8k"}


def gsm8k_reward(completion: str, example: dict) -> float:
    """The last number in the completion equals the answer (GSM8K's own convention)."""
    guess = last_number(completion)
    return float(guess is not None and abs(guess - last_number(example["answer"])) < 1e-6)


def gsm8k_feedback(completion: str, example: dict) -> str | None:
    """Says whether a final number was found and that it is wrong, never the right number."""
    guess = last_number(completion)
    if guess is None:
        return "Your answer does not end with a final number."
    if gsm8k_reward(completion, example):
        return None
    return f"Your final answer {guess:g} is wrong. Check each step of the calculation."


def gsm8k_task(dataset_dict, name="gsm8k") -> Task:
    """GSM8K from a datasets.DatasetDict with train and test splits in the hub schema."""
    return Task(name, dataset_dict["train"].map(gsm8k_example, remove_columns=["question"]),
                dataset_dict["test"].map(gsm8k_example, remove_columns=["question"]),
                gsm8k_reward, gsm8k_feedback)


def load_task(name: str) -> Task:
    """A task by name: a lab family (LAB_FAMILIES), `gsm8k` (from the hub), or a folder in the
    official SDPO layout (train.json and test.json)."""
    if name in LAB_FAMILIES:
        return make_lab_task(name)
    if name == "gsm8k":
        from datasets import load_dataset
        return gsm8k_task(load_dataset("openai/gsm8k", "main"))
    if Path(name).is_dir():
        return load_official_task(name)
    raise ValueError(f"unknown task {name!r}: allowed are the lab families "
                     f"{', '.join(LAB_FAMILIES)}, 'gsm8k', or a folder with train.json and "
                     f"test.json")

# ================================================================================================
# Models: any causal LM that transformers loads, and the built-in tiny lab model
# ================================================================================================

LAB_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LAB_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")


def build_lab_tokenizer():
    """A character-level tokenizer that is a real transformers tokenizer (chat template, pad and
    eos tokens, save_pretrained), so the lab runs through exactly the code path of a hub model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]   # 95 printable + "\n"
    vocab = {tok: i for i, tok in enumerate(LAB_SPECIAL_TOKENS + tuple(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(LAB_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|end|>", chat_template=LAB_CHAT_TEMPLATE)


def build_lab_model(tokenizer, seed: int = 0):
    """A ~0.9M-parameter Llama: 4 layers of width 128, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg)


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The text the model sees before its answer: the tokenizer's chat template when it has one;
    otherwise a plain fallback "{system}\\n\\nUser: {prompt}\\nAssistant:" (base models)."""
    if tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + f"User: {prompt}\nAssistant:"


def cache_dir() -> Path:
    return Path(os.environ.get("SDPO_CL_CACHE", Path.home() / ".cache" / "sdpo_cl"))


@dataclass
class LabRecipe:
    """How the lab's base model is made: short supervised pre-training on a mixture of every lab
    family, partly in the SDPO re-prompt format (a correct demonstration in context), so the
    self-teacher can use a demonstration the way an instruction-tuned LLM does."""
    families: tuple = tuple(LAB_FAMILIES)
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    reprompt_fraction: float = 0.5
    distractor_fraction: float = 0.5
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + LAB_VERSION
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


LAB_VERSION = "3"   # bump when the lab's tokenizer, model or families change


def lab_pretraining_batch(tokenizer, tasks, rng, recipe, reprompt_template=REPROMPT_TEMPLATE,
                          solution_template=SOLUTION_TEMPLATE):
    """A right-padded batch of (chat prompt, answer + EOS); loss only on the answer tokens.
    A batch is either all plain or all re-prompt format: mixing them would pad every short row
    to the long re-prompt length and double the cost of a step."""
    rows = []
    reprompt = rng.random() < recipe.reprompt_fraction
    for _ in range(recipe.batch_size):
        task = tasks[rng.randrange(len(tasks))]
        ex = task.train[rng.randrange(len(task.train))]
        prompt, target = ex["prompt"], ex["answer"]
        if reprompt:                                   # the teacher's view: a demo in context
            prompt = reprompt_template.format(
                prompt=prompt, feedback="",
                solution=solution_template.format(successful_previous_attempt=ex["answer"]))
        elif ex.get("distractor") and rng.random() < recipe.distractor_fraction:
            target = ex["distractor"]                  # the wrong habit the base also learns
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


def build_lab_base(recipe: LabRecipe = LabRecipe(), verbose: bool = True):
    """Pre-train the lab's base model once and cache it on disk, keyed by the recipe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / f"lab-{recipe.key()}"
    if (folder / "done").exists():
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    t0 = time.time()
    tokenizer = build_lab_tokenizer()
    model = build_lab_model(tokenizer, recipe.seed)
    tasks = [make_lab_task(name) for name in recipe.families]
    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(   # 5% warm-up, then cosine to 10%
        opt, lambda s: min(1.0, (s + 1) / (0.05 * recipe.steps))
        * (0.55 + 0.45 * math.cos(math.pi * s / recipe.steps)))
    model.train()
    bar = tqdm(range(recipe.steps), desc="building the lab base model",
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
    model.eval()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1))
    (tmp / "build_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    (tmp / "done").touch()
    if folder.exists():            # another process finished first; keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)    # atomic: a crash never leaves a half-written cache entry
    return model, tokenizer


def load_policy(name: str, device: str = "cpu", recipe: LabRecipe | None = None):
    """(model, tokenizer) for 'lab', a hub id, a local folder, or a .gguf file."""
    if name == "lab":
        model, tokenizer = build_lab_base(recipe or LabRecipe())
        return model.to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    path = Path(name)
    if path.suffix == ".gguf":       # transformers de-quantises GGUF weights (needs `gguf`)
        if not path.is_file():
            raise FileNotFoundError(f"model {name!r}: no such GGUF file")
        name, kwargs = str(path.parent), {"gguf_file": path.name}
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


# ================================================================================================
# Rollout: G completions per prompt, response masks, and the sampling policy's log-probs
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


def eos_ids(model, tokenizer) -> list:
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted(set(ids) | {tokenizer.eos_token_id} - {None})


def response_mask_from_positions(response_ids, eos_token_ids):
    """[B, T] float mask: 1 on every token up to and including the first EOS, 0 after it.
    Built from positions, not from `ids != pad`, which would drop the EOS when pad == eos."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    T = response_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), T)   # no EOS -> all T valid
    return (torch.arange(T, device=response_ids.device)[None, :] <= first[:, None]).float()


def tokenize_prompts(tokenizer, texts, device):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def decode_completions(tokenizer, response_ids, response_mask):
    return [tokenizer.decode(ids[m > 0], skip_special_tokens=True)
            for ids, m in zip(response_ids, response_mask)]


@torch.no_grad()
def generate(model, tokenizer, prompt_texts, max_new_tokens, *, sample=True, temperature=1.0,
             top_p=1.0, num_return_sequences=1) -> Rollout:
    """Batched sampling (KV cache) of `num_return_sequences` completions per prompt text."""
    ids, attn = tokenize_prompts(tokenizer, prompt_texts, model.device)
    recorder = _RecordSampledLogprobs(temperature if sample else 1.0)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=sample,
        **(dict(temperature=temperature, top_p=top_p, top_k=0) if sample else {}),
        repetition_penalty=1.0, num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids(model, tokenizer),
        logits_processor=[recorder])
    model.train(was_training)
    P = ids.shape[1]
    response_ids = out[:, P:]                                              # [B, T]
    mask = response_mask_from_positions(response_ids, eos_ids(model, tokenizer))
    old_logprobs = recorder.finish(response_ids[:, -1]) * mask
    return Rollout(ids.repeat_interleave(num_return_sequences, 0),
                   attn.repeat_interleave(num_return_sequences, 0), response_ids, mask,
                   old_logprobs, decode_completions(tokenizer, response_ids, mask))


# ================================================================================================
# ALGORITHM: GRPO (ALGORITHMS.md §3)
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
    token-mean: every valid token of the batch weighs the same (no length bias).
    seq-mean-token-mean: mean per sequence, then over sequences (original GRPO; favours short
    answers). seq-mean-token-sum-norm: per-sequence sum over a constant T (Dr. GRPO), here T is
    the padded length of the batch, mask.shape[1]. Sequences without a valid token are left out.
    An all-zero mask gives a zero that is still connected to the graph."""
    masked = per_token * mask
    if agg == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    has_tokens = (mask.sum(1) > 0).float()                    # [B]
    if agg == "seq-mean-token-mean":
        per_seq = masked.sum(1) / mask.sum(1).clamp(min=1)
    elif agg == "seq-mean-token-sum-norm":
        per_seq = masked.sum(1) / mask.shape[1]
    else:
        raise ValueError(f"loss_agg_mode={agg!r} is invalid: allowed {', '.join(LOSS_AGG_MODES)}")
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def aggregation_share(mask_part, mask_all, agg="token-mean"):
    """The weight of a micro-batch's aggregated loss, so that summing micro-batches gives the loss
    of the whole batch: its share of the valid tokens (token-mean) or of valid sequences."""
    if agg == "token-mean":
        return mask_part.sum() / mask_all.sum().clamp(min=1)
    return (mask_part.sum(1) > 0).sum() / (mask_all.sum(1) > 0).sum().clamp(min=1)


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
        d = ref_logprobs - logprobs
        k3 = torch.exp(d) - d - 1.0                           # >= 0, unbiased for KL(pi||ref)
        per_token = per_token + beta * k3
        metrics["kl_ref"] = aggregate(k3.detach(), mask).item()
    return aggregate(per_token, mask, agg), metrics


# ================================================================================================
# ALGORITHM: SDPO (ALGORITHMS.md §4)
# ================================================================================================

# --- 1-3. The teacher context: the prompt plus a successful sibling and/or feedback ------------

def strip_thinking(text: str) -> str:
    return re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)


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
        solution = feedback = ""
        if demos:   # the first success: rollouts are i.i.d., so this is a random one (official)
            demo = completions[demos[0]]
            if cfg.remove_thinking_from_demonstration:
                demo = strip_thinking(demo)
            solution = cfg.solution_template.format(successful_previous_attempt=demo)
        if (cfg.include_environment_feedback and feedbacks[i]
                and not (demos and cfg.environment_feedback_only_without_solution)):
            feedback = cfg.feedback_template.format(feedback_raw=feedbacks[i])
        contexts.append(cfg.reprompt_template.format(prompt=prompts[i], solution=solution,
                                                     feedback=feedback)
                        if solution or feedback else None)
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


# --- 4-7. The loss ------------------------------------------------------------------------------

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
# ALGORITHM: teachers (ALGORITHMS.md §4, teacher_regularization)
# ================================================================================================

@torch.no_grad()
def ema_update_(teacher, student, tau):
    """theta_T <- (1 - tau) theta_T + tau theta_S, in place."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach().to(t.dtype), tau)


def trust_region_logits(ref_logits, student_logits, tau):
    """The trust-region teacher: lerp(ref, student, tau) in logit space."""
    return torch.lerp(ref_logits, student_logits, tau)


def real_token_positions(attention_mask):
    """Positions that count real tokens only, as generate() gives them with left padding."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def _cache_argument(model) -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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


class Teacher:
    """Scores response tokens after a teacher context, without gradients.
    ema: its own weights, moved toward the student after every optimizer step (tau=0: frozen).
    frozen: its own weights, never updated. live: the current student itself.
    trust-region: lerp(frozen initial model, current student, tau) in logit space."""

    def __init__(self, policy, cfg: Config):
        self.kind, self.tau, self.cfg = cfg.teacher_regularization, cfg.teacher_update_rate, cfg
        self.model = None
        if self.kind != "live":          # ema, frozen: the teacher; trust-region: the reference
            self.reset(policy)

    def reset(self, policy):
        """(Re-)initialise from the policy, or from teacher_path mixed in by teacher_init_alpha."""
        if self.kind == "live":
            return
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        if self.cfg.teacher_path:
            from transformers import AutoModelForCausalLM
            ckpt = AutoModelForCausalLM.from_pretrained(self.cfg.teacher_path)
            for t, c in zip(self.model.parameters(), ckpt.parameters()):
                t.lerp_(c.to(t.device, t.dtype), self.cfg.teacher_init_alpha)

    @torch.no_grad()
    def logits(self, policy, score):
        """The teacher's logits, where score(model) runs a model on the teacher's inputs."""
        if self.kind == "live":
            return score(policy)
        if self.kind == "trust-region":
            return trust_region_logits(score(self.model), score(policy), self.tau)
        return score(self.model)

    def after_optimizer_step(self, policy):
        if self.kind == "ema" and self.tau > 0:
            ema_update_(self.model, policy, self.tau)


# ================================================================================================
# Training: one step (rollout -> reward -> loss -> optimizer), then a whole task
# ================================================================================================

def sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    """Model inputs for prompt + response. Logits are kept only for the last T+1 positions:
    logits[:, :-1] is then [B, T, V] with position t predicting response_ids[:, t]. Position ids
    count real tokens only, as generate() does with left padding."""
    attn = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return dict(input_ids=torch.cat([prompt_ids, response_ids], dim=1), attention_mask=attn,
                position_ids=real_token_positions(attn),
                logits_to_keep=response_ids.shape[1] + 1)


def device_of(cfg: Config) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def train_step(policy, tokenizer, teacher, optimizer, scheduler, task, examples, cfg,
               reference=None) -> dict:
    """One rollout batch and one optimizer step. examples: `prompts_per_step` task rows.
    reference: the frozen initial model, needed only for the GRPO part's k3 KL
    (kl_loss_coef > 0)."""
    if cfg.kl_loss_coef > 0 and reference is None:
        raise ValueError("Config.kl_loss_coef > 0 needs the frozen reference model")
    t_start = time.time()
    G, device = cfg.group_size, policy.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=cfg.bf16 and device.type == "cuda")
    # --- rollout and reward ---------------------------------------------------------------------
    prompt_texts = [format_prompt(tokenizer, ex["prompt"], ex.get("system")) for ex in examples]
    with autocast:
        ro = generate(policy, tokenizer, prompt_texts, generation_budget(cfg, task),
                      sample=True, temperature=cfg.temperature, num_return_sequences=G)
    samples = [examples[i // G] for i in range(len(ro.completions))]
    rewards = torch.tensor([task.reward(c, ex) for c, ex in zip(ro.completions, samples)])
    mask = ro.response_mask                                                  # [B, T]
    B = mask.shape[0]
    t_rollout = time.time() - t_start

    # --- what each loss needs -------------------------------------------------------------------
    w = cfg.distillation_weight if cfg.loss_mode == "sdpo" else 0.0         # weight of SDPO
    if w < 1:
        advantages = grpo_advantages(rewards, G, cfg.norm_adv_by_std_in_grpo).to(device)
    if w > 0:
        feedbacks = [task.feedback(c, ex) if task.feedback and cfg.include_environment_feedback
                     else None for c, ex in zip(ro.completions, samples)]
        contexts = teacher_contexts([ex["prompt"] for ex in samples], ro.completions,
                                    rewards.tolist(), feedbacks, G, cfg)
        has_context = torch.tensor([c is not None for c in contexts], device=device)
        distill_mask = mask * has_context[:, None]
        if cfg.mask_ratio > 0:
            distill_mask = distill_mask * (torch.rand_like(distill_mask) >= cfg.mask_ratio)
        context_rows = has_context.nonzero().squeeze(1)                      # teacher rows
        if len(context_rows):   # each distinct teacher prompt is tokenized (and run) once
            texts = [format_prompt(tokenizer, contexts[i], samples[i].get("system"))
                     for i in context_rows.tolist()]
            distinct = {t: k for k, t in enumerate(dict.fromkeys(texts))}   # text -> index
            prefix_of = torch.tensor([distinct[t] for t in texts], device=device)
            teacher_ids, teacher_mask = tokenize_prompts(tokenizer, list(distinct), device)

    # --- forward / backward in micro-batches (gradient accumulation) -----------------------------
    optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "entropy": 0.0}
    t_teacher = 0.0
    mb = cfg.micro_batch_size or B
    for r0 in range(0, B, mb):
        rows = slice(r0, r0 + mb)
        with autocast:
            logits = policy(**sequence_inputs(ro.prompt_ids[rows], ro.prompt_mask[rows],
                                              ro.response_ids[rows], mask[rows]),
                            use_cache=False).logits[:, :-1]
        logits = logits.float() / cfg.temperature            # [b, T, V]: pi is softmax(z / temp)
        logp_all = torch.log_softmax(logits, dim=-1)
        logprobs = logp_all.gather(-1, ro.response_ids[rows, :, None]).squeeze(-1)    # [b, T]
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
        totals["entropy"] += (aggregate(entropy, mask[rows]) * aggregation_share(mask[rows], mask)
                              ).item()
        loss = logits.sum() * 0.0   # graph-connected zero: the step runs even with no target
        if w < 1:
            ref_logprobs = None
            if cfg.kl_loss_coef > 0:
                with torch.no_grad(), autocast:
                    ref_logits = reference(**sequence_inputs(
                        ro.prompt_ids[rows], ro.prompt_mask[rows], ro.response_ids[rows],
                        mask[rows])).logits[:, :-1]
                ref_logprobs = torch.log_softmax(ref_logits.float() / cfg.temperature, -1
                                                 ).gather(-1, ro.response_ids[rows, :, None]
                                                          ).squeeze(-1)
            loss_g, m = grpo_loss(logprobs, ro.old_logprobs[rows], advantages[rows], mask[rows],
                                  clip_low=cfg.clip_ratio_low, clip_high=cfg.clip_ratio_high,
                                  dual_clip=cfg.clip_ratio_c, agg=cfg.loss_agg_mode,
                                  ref_logprobs=ref_logprobs, beta=cfg.kl_loss_coef)
            share = aggregation_share(mask[rows], mask, cfg.loss_agg_mode)
            loss = loss + (1 - w) * share * loss_g
            totals["loss_grpo"] = totals.get("loss_grpo", 0.0) + (share * loss_g).item()
            for key in ("clip_frac", "kl_ref"):
                if key in m:
                    totals[key] = totals.get(key, 0.0) + share.item() * m[key]
        if w > 0:
            local = has_context[rows].nonzero().squeeze(1)   # context rows in this micro-batch
            if len(local):
                t0 = time.time()
                at = torch.searchsorted(context_rows, local + r0)
                used, row_prefix = prefix_of[at].unique(return_inverse=True)
                with autocast:
                    teacher_logits = teacher.logits(policy, lambda model: response_logits(
                        model, teacher_ids[used], teacher_mask[used], row_prefix,
                        ro.response_ids[rows][local], mask[rows][local]))      # [l, T, V]
                t_teacher += time.time() - t0
                loss_s, m = sdpo_loss(
                    logits[local], teacher_logits.float() / cfg.temperature,
                    ro.response_ids[rows][local], distill_mask[rows][local],
                    old_logprobs=ro.old_logprobs[rows][local], alpha=cfg.alpha,
                    topk=cfg.distillation_topk, add_tail=cfg.distillation_add_tail,
                    full_logits=cfg.full_logit_distillation, is_clip=cfg.is_clip,
                    agg=cfg.loss_agg_mode)
                share = aggregation_share(distill_mask[rows], distill_mask, cfg.loss_agg_mode)
                loss = loss + w * share * loss_s
                totals["loss_sdpo"] = totals.get("loss_sdpo", 0.0) + (share * loss_s).item()
                totals["divergence"] = (totals.get("divergence", 0.0)
                                        + share.item() * m["divergence"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} (micro-batch at row {r0})")
        loss.backward()
        totals["loss"] += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    if teacher is not None:
        teacher.after_optimizer_step(policy)

    groups = rewards.view(-1, G)
    metrics = {"reward": rewards.mean().item(),
               "solved_groups": (groups.max(1).values >= cfg.success_reward_threshold
                                 ).float().mean().item(),
               "zero_adv_groups": (groups.std(1) == 0).float().mean().item(),
               **totals, "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0],
               "response_length": mask.sum(1).mean().item()}
    if w > 0:
        metrics["distill_frac"] = (distill_mask.sum() / mask.sum().clamp(min=1)).item()
        metrics["empty_target"] = bool(distill_mask.sum() == 0)
    metrics.update(seconds=time.time() - t_start, t_rollout=t_rollout, t_teacher=t_teacher)
    return metrics


def seed_everything(*keys):
    """Seed python and torch from any keys, e.g. (seed, stage): a stage's randomness depends only
    on them, so a resumed run repeats an uninterrupted one exactly (on CPU)."""
    s = int(hashlib.sha256(repr(keys).encode()).hexdigest()[:8], 16)
    random.seed(s)
    torch.manual_seed(s)
    return random.Random(s)


def train_task(policy, tokenizer, teacher, task, cfg, *, rng, reference=None, log=None,
               desc="train") -> list:
    """`steps_per_task` optimizer steps on one task. A fresh AdamW with linear warm-up per task,
    as each stage of the paper is a new verl run started from the previous checkpoint."""
    policy.train()
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    # fused=True: one kernel for all parameters (transformers' Trainer default), several times
    # faster than the per-tensor loop on a 100M-parameter model
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    order, history = [], []
    bar = tqdm(range(cfg.steps_per_task), desc=desc, leave=False, disable=None)
    for step in bar:
        if len(order) < cfg.prompts_per_step:      # a new shuffled pass over the train set
            order = rng.sample(range(len(task.train)), len(task.train))
        picked, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
        try:
            m = train_step(policy, tokenizer, teacher, optimizer, scheduler, task,
                           [task.train[i] for i in picked], cfg, reference)
        except FloatingPointError as e:
            last = history[-1] if history else {}
            raise FloatingPointError(f"{desc}: step {step}: {e}; last finite metrics: {last}")
        m["step"] = step
        history.append(m)
        if log is not None:
            log(m)
        bar.set_postfix(reward=f"{m['reward']:.2f}", loss=f"{m['loss']:.3f}")
    policy.eval()
    return history


# ================================================================================================
# Evaluation: accuracy with the task's own reward, and the teacher lift
# ================================================================================================

def demonstration_prompt(example, cfg: Config) -> str:
    """The prompt as the SDPO teacher sees it when the demonstration is the gold answer."""
    return cfg.reprompt_template.format(
        prompt=example["prompt"], feedback="",
        solution=cfg.solution_template.format(successful_previous_attempt=example["answer"]))


@torch.no_grad()
def evaluate(model, tokenizer, task, cfg, *, with_demonstration=False, batch_size=100) -> dict:
    """Accuracy on the first `eval_examples` test rows: greedy, or the mean over `eval_samples`
    samples at eval_temperature / eval_top_p. Returns accuracy, completions and their token ids."""
    examples = task.test.select(range(min(cfg.eval_examples, len(task.test))))
    sample = cfg.eval_mode == "sample"
    n = cfg.eval_samples if sample else 1
    scores, completions, sequences = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        texts = [format_prompt(tokenizer, demonstration_prompt(ex, cfg) if with_demonstration
                               else ex["prompt"], ex.get("system")) for ex in chunk]
        ro = generate(model, tokenizer, texts, generation_budget(cfg, task),
                      sample=sample, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                      num_return_sequences=n)
        scores += [task.reward(c, chunk[i // n]) for i, c in enumerate(ro.completions)]
        completions += ro.completions
        sequences += [(p[pm > 0].tolist(), r[m > 0].tolist()) for p, pm, r, m in zip(
            ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)]
    return {"accuracy": sum(scores) / len(scores), "completions": completions,
            "sequences": sequences}


# ================================================================================================
# Drift and artifact measures (ALGORITHMS.md §5)
# ================================================================================================

def layer_type(name: str) -> str:
    for key, kind in (("embed", "embedding"), ("lm_head", "embedding"), ("attn", "attention"),
                      ("mlp", "mlp"), ("norm", "norm")):
        if key in name:
            return kind
    return "other"


@torch.no_grad()
def parameter_drift(model, base) -> dict:
    """||theta - theta_0|| / ||theta_0||, overall and per layer type (attention, mlp, ...)."""
    diff, ref = {}, {}
    for (name, p), p0 in zip(model.named_parameters(), base.parameters()):
        kind = layer_type(name)
        diff[kind] = diff.get(kind, 0.0) + (p.float() - p0.float()).pow(2).sum().item()
        ref[kind] = ref.get(kind, 0.0) + p0.float().pow(2).sum().item()
    out = {"overall": math.sqrt(sum(diff.values()) / sum(ref.values()))}
    out.update({k: math.sqrt(diff[k] / ref[k]) for k in sorted(diff)})
    return out


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
        P, T = max(len(p) for p, _ in chunk), max(len(r) for _, r in chunk)
        prompt_ids = torch.zeros(len(chunk), P, dtype=torch.long, device=device)
        prompt_mask, response_ids = torch.zeros_like(prompt_ids), torch.zeros(
            len(chunk), T, dtype=torch.long, device=device)
        response_mask = torch.zeros(len(chunk), T, device=device)
        for i, (p, r) in enumerate(chunk):       # left-pad prompts, right-pad responses
            prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), 1
            response_ids[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), 1
        inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        logp = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
        logp0 = torch.log_softmax(base(**inputs).logits[:, :-1].float(), -1)
        total += (kl_divergence(logp0, logp) * response_mask).sum().item()
        count += response_mask.sum().item()
    return total / max(count, 1)


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
# The continual sequence: train T1..TN in order, evaluate every task after every stage
# ================================================================================================

def evaluate_stage(policy, tokenizer, tasks, cfg, base, base_sequences) -> dict:
    """Row k of the accuracy matrix plus the drift, artifact and teacher-lift measures.
    teacher lift = the model's accuracy with a correct demonstration in its prompt (the SDPO
    teacher's view) minus its plain accuracy: what a self-teacher can add."""
    record = {"accuracy": {}, "teacher_lift": {}, "samples": {}}
    completions = []
    for task in tasks:
        plain = evaluate(policy, tokenizer, task, cfg)
        demo = evaluate(policy, tokenizer, task, cfg, with_demonstration=True)
        record["accuracy"][task.name] = plain["accuracy"]
        record["teacher_lift"][task.name] = demo["accuracy"] - plain["accuracy"]
        record["samples"][task.name] = plain["completions"][:3]
        completions += plain["completions"]
    record["artifacts"] = format_artifacts(completions)
    record["param_drift"] = parameter_drift(policy, base)
    record["response_kl"] = response_kl(policy, base, base_sequences)
    return record


def finished_stages(folder) -> int:
    """Index of the last stage whose checkpoint is complete, or -1."""
    k = -1
    while folder is not None and (Path(folder) / f"stage{k + 1}" / "stage.json").exists():
        k += 1
    return k


def save_stage(folder, k, record, policy, tokenizer, teacher):
    """Write stage k atomically: a temporary folder renamed into place, so a crash leaves either
    the whole stage or nothing. The teacher is saved with the policy: resuming needs it."""
    final, tmp = Path(folder) / f"stage{k}", Path(folder) / f"stage{k}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    if teacher is not None and teacher.model is not None:
        teacher.model.save_pretrained(tmp / "teacher")
    (tmp / "stage.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_stage_weights(folder, k, policy, teacher):
    from transformers import AutoModelForCausalLM

    stage = Path(folder) / f"stage{k}"
    with torch.no_grad():
        for target, sub in ((policy, "policy"), (teacher and teacher.model, "teacher")):
            if target is not None:
                saved = AutoModelForCausalLM.from_pretrained(stage / sub)
                target.load_state_dict(saved.state_dict())


def continual_sequence(cfg, policy, tokenizer, sequence, probes=(), *, steps=None, folder=None,
                       log=None, desc="") -> list:
    """Train the tasks of `sequence` one after another, starting from `policy`; evaluate every
    task of sequence + probes before the first stage (row 0, the base model) and after each.
    Returns one record per stage; record["accuracy"] is row k of the accuracy matrix R.
    With a folder, each finished stage is checkpointed (policy and teacher) and a rerun resumes
    after the last finished stage. The SDPO teacher is carried over from stage to stage unless
    reset_teacher_each_task (then it restarts from the policy at each new task). `steps` may
    give each task its own number of steps (default: cfg.steps_per_task for every task)."""
    eval_tasks = list(sequence) + [p for p in probes if p.name not in {t.name for t in sequence}]
    base = copy.deepcopy(policy).eval().requires_grad_(False)
    teacher = Teacher(policy, cfg) if cfg.loss_mode == "sdpo" else None
    done = finished_stages(folder)
    records = [json.loads((Path(folder) / f"stage{k}" / "stage.json").read_text())
               for k in range(done + 1)]
    if done > 0:
        load_stage_weights(folder, done, policy, teacher)
    seed_everything(cfg.seed, "base-eval")
    base_sequences = [s for task in eval_tasks
                      for s in evaluate(base, tokenizer, task, cfg)["sequences"]]
    for k in range(done + 1, len(sequence) + 1):
        t0 = time.time()
        record = {"stage": k, "task": "base" if k == 0 else sequence[k - 1].name}
        if k > 0:
            task = sequence[k - 1]
            rng = seed_everything(cfg.seed, "train", k)
            if teacher is not None and cfg.reset_teacher_each_task and k > 1:
                teacher.reset(policy)
            stage_cfg = dataclasses.replace(cfg, steps_per_task=steps[k - 1]) if steps else cfg
            history = train_task(
                policy, tokenizer, teacher, task, stage_cfg, rng=rng, reference=base,
                log=(lambda m: log({"stage": k, "task": task.name, **m})) if log else None,
                desc=f"{desc} stage {k}/{len(sequence)} {task.name}".strip())
            record["train"] = {
                "reward_first5": sum(h["reward"] for h in history[:5]) / len(history[:5]),
                "reward_last5": sum(h["reward"] for h in history[-5:]) / len(history[-5:]),
                "seconds_per_step": sum(h["seconds"] for h in history) / len(history)}
            if teacher is not None:
                record["train"]["distill_frac"] = sum(h["distill_frac"] for h in history) / len(
                    history)
        seed_everything(cfg.seed, "eval", k)
        record.update(evaluate_stage(policy, tokenizer, eval_tasks, cfg, base, base_sequences))
        record["seconds"] = time.time() - t0
        records.append(record)
        if folder is not None:
            save_stage(folder, k, record, policy, tokenizer, teacher)
    return records
