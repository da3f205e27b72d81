"""The built-in lab: a tiny model, synthetic task families and a shipped base model, so that the
default experiment runs offline on a CPU in minutes and measures forgetting.

Four trained families mirror the paper's Math -> Science -> ToolUse -> Code sequence; two held-out
probes share a format or a content with them (the out-of-distribution columns), and one family
with a short worked solution serves the chain-of-thought finding. docs/lab.md reports the lab's
measured properties.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdpo_cl import Config, Task, base_row, format_prompt, pad_cat, teacher_prompt
from harness.data import mcq_reward, normalize
from harness.models import cache_dir
from harness.runs import atomic_write


# --- Families and their rewards ----------------------------------------------------------------


def first_number(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def number_reward(completion: str, example: dict) -> float:
    return float(first_number(completion) == int(example["answer"]))


def number_feedback(completion: str, example: dict) -> str | None:
    guess, gold = first_number(completion), int(example["answer"])
    if guess is None:
        return "Your answer contains no number."
    if guess == gold:
        return None
    return f"Your answer {guess} is too {'small' if guess < gold else 'large'}."


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
    ids = pad_cat([p + a for p, a in rows], tokenizer.pad_token_id)
    labels = pad_cat([[-100] * len(p) + a for p, a in rows], -100)
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
# sdpo_cl.base_row() measures it (100 test prompts x 4 samples at temperature 0.6, seeded).
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
    record = base_row(model, tokenizer, tasks, lab_config())["record"]
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
    and 100 test prompts x 4 samples per evaluation. Everything else stays official."""
    settings = dict(prompts_per_step=32, group_size=8, max_new_tokens=24, lr=3e-4,
                    warmup_steps=2, distillation_topk=20, steps_per_task=15, eval_examples=100,
                    eval_samples=4)
    settings.update(overrides)
    return Config(**settings)
