"""The built-in labs: a tiny Llama with a character tokenizer that is a real transformers tokenizer,
synthetic task families (harness/lab_families.py) and a base model pre-trained on them and shipped
as a file, so that the experiment runs offline on a CPU in minutes and measures forgetting.

Three labs, each with its own families, settings and shipped base (docs/lab.md has all three):

    lab        the default, a lab that can forget: four families share one skill (adding, in a
               trace of steps) under four conventions, each family's habit the convention of the
               family before it, so a later stage bends the skill an earlier one needs
               (sequential SFT forgets 16 points); answers of about 23 tokens in the family's
               wrapper, several valid traces, a teacher that follows a demonstration only part
               of the time; stages in the paper's proportions (25/25/25/10)
    lab-trace  the paper's regime without interference (the default before): four different
               skills in four wrappers, which nothing forgets (sequential SFT: 0.4 points)
    lab-short  the regime where SDPO's targets are reliable: answers of 1-4 tokens, a teacher
               right every time with a demonstration, 15-batch stages (the first instrument)
"""
from __future__ import annotations

import dataclasses
import functools
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
from harness import lab_families
from harness.models import cache_dir
from harness.files import atomic_write

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
PAPER_STEPS = (50, 50, 50, 20)      # the paper's stages: math, science, tool use, code


@dataclass(frozen=True)
class LabRecipe:
    """How a lab's base model is made: supervised pre-training on a mixture of its families. A
    plain example's target is the family's habit with probability `habit_fraction`, else a right
    solution; `reprompt_fraction` of the batches are in the SDPO teacher's format (a right
    solution as the demonstration in context), where the target is the demonstration with
    probability `copy_fraction` and the model's own behaviour otherwise (right, by another path,
    or the habit): the self-teacher then uses a demonstration as an instruction-tuned LLM does,
    often but not always. `ladder_fraction` of the rows come from the lab's ladder probes (the
    crosses of one family's content with another's wrapper, all of them together), the rest from
    its other families, each family of a part equally likely. The defaults are no lab's own
    recipe: start from LABS[lab].recipe (dataclasses.replace) to vary one."""
    lab: str = "lab"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    reprompt_fraction: float = 0.3
    habit_fraction: float = 0.5
    copy_fraction: float = 0.55
    ladder_fraction: float = 0.0
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + LABS[self.lab].version
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Lab:
    """One lab: its families, the order they are trained in, the default probes (evaluated, never
    trained in a run; the ladder's are the ood finding's), the words its tokenizer keeps whole,
    its base's recipe and shipped file (with what was recorded when the file was written), its
    settings (lab_config) and its stage lengths."""
    families: dict
    sequence: tuple
    probes: tuple
    word_tokens: tuple
    recipe: LabRecipe
    base_file: Path
    base_sha256: str
    base_accuracy: dict
    settings: dict
    quick_steps: tuple            # the default run's stages
    quick_settings: dict          # and its settings, on top of `settings`
    paper_scale: float            # --steps paper: PAPER_STEPS times this
    version: str                  # bump when the tokenizer, model or families change
    held_out: tuple = ()          # families left out of pre-training (harder probes)
    ladder: tuple = ()            # content x format probes (lab_families.LADDER)
    shipped: bool = True          # base_file is in the repository (else rebuilt into the cache)


# The settings of the two labs with traces (lab and lab-trace): the official ones scaled down
TRACE_SETTINGS = dict(prompts_per_step=32, group_size=8, max_new_tokens=48, lr=1e-4,
                      warmup_steps=2, distillation_topk=20, steps_per_task=10, eval_examples=100,
                      eval_samples=4, answer_marker="</think>")

LABS = {
    "lab": Lab(
        lab_families.SHARED, ("math", "science", "tool", "code"), ("mcq_math", "math_words"),
        ("<answer>", "</answer>", "\\boxed{", "```", "<think>", "</think>"),
        # as lab-trace's: 3000 steps, a third of the rows from the ladder
        LabRecipe(steps=3000, ladder_fraction=1 / 3),
        HERE / "lab_base.safetensors",
        # written by write_lab_base("lab") (1,060 s on 2 cores of an Intel Xeon, Ice Lake, no
        # AMX); the accuracies as base_row() measures them (100 test prompts x 4 samples at T 0.6)
        "7c294ab421223194fb6fffd83dedc169dd6708bc963781079d25b6559461b1a9",
        {"math": 0.6325, "science": 0.5475, "tool": 0.645, "code": 0.46, "mcq_math": 0.6,
         "math_words": 0.61, "math_tagged": 0.62, "science_boxed": 0.5675, "science_called": 0.59,
         "tool_tagged": 0.5975, "tool_fenced": 0.6225, "code_called": 0.54, "code_boxed": 0.4775,
         "math_fenced": 0.63},
        TRACE_SETTINGS,
        (6, 6, 6, 3), dict(eval_examples=50), 0.5, "shared-1", held_out=("math_hard",),
        ladder=lab_families.LADDER),
    "lab-trace": Lab(
        lab_families.TRACES, ("math", "science", "tool", "code"), ("mcq_math", "math_words"),
        ("<answer>", "</answer>", "\\boxed{", "```", "<think>", "</think>"),
        # 3000 steps, a third of the rows from the ladder: the other families get the 2000
        # steps' worth of rows they had before the ladder was added
        LabRecipe(lab="lab-trace", steps=3000, ladder_fraction=1 / 3),
        HERE / "lab_trace_base.safetensors",
        # written by write_lab_base (681 s on 2 cores of an Intel Xeon with AMX) when this was
        # the default "lab"; the accuracies as base_row() measures them (100 test prompts x 4
        # samples at T 0.6, seeded). No longer shipped (the repository keeps two bases):
        # `git checkout 0d1261b -- harness/lab_trace_base.safetensors` restores this file, the
        # one lab-trace's results ran on; without it lab_base() rebuilds one from the recipe
        "4506812b7018361b78375893992c558db7f66ccfcaec94ef7e80b48b99421fe1",
        {"math": 0.48, "science": 0.6325, "tool": 0.2725, "code": 0.4125, "mcq_math": 0.45,
         "math_words": 0.42, "math_tagged": 0.5, "science_boxed": 0.5925,
         "science_called": 0.4825, "tool_tagged": 0.3425, "tool_fenced": 0.3725,
         "code_called": 0.2775, "code_boxed": 0.3875, "math_fenced": 0.4275},
        TRACE_SETTINGS,
        # --steps paper at 0.5 (25/25/25/10): at 0.4 the 8-batch code stage was not learnable by
        # SDPO (17.7 points over 3 seeds, the property asks 20); 0.5 was the design's own scale
        (6, 6, 6, 3), dict(eval_examples=50), 0.5, "trace-2", held_out=("math_hard",),
        ladder=lab_families.LADDER, shipped=False),
    "lab-short": Lab(
        lab_families.SHORT, ("math", "science", "tool", "code"), ("mcq_math", "math_words"),
        ("<answer>", "</answer>"),
        LabRecipe(lab="lab-short", steps=1500, copy_fraction=1.0),
        HERE / "lab_short_base.safetensors",
        # written by write_lab_base("lab-short") (454 s on 2 cores of an AMD EPYC, AVX2 only)
        "502496388d0c8fc76dec7f687cc0a593e81c07fe45748aa325591f2e8d269033",
        {"math": 0.4575, "science": 0.395, "tool": 0.45, "code": 0.4375, "mcq_math": 0.23,
         "math_words": 0.5475},
        dict(prompts_per_step=32, group_size=8, max_new_tokens=24, lr=3e-4, warmup_steps=2,
             distillation_topk=20, steps_per_task=15, eval_examples=100, eval_samples=4),
        (15, 15, 15, 15), {}, 0.3, "4"),
}


def build_lab_tokenizer(lab: str = "lab"):
    """A character-level tokenizer that is a real transformers tokenizer (chat template, pad and
    eos tokens, save_pretrained), so the lab runs through exactly the code path of a hub model.
    The lab's word tokens (<answer>, \\boxed{, ```) are one token each, as in most LLMs."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = LABS[lab].word_tokens
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]   # 95 printable + "\n"
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words + tuple(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens([AddedToken(w, normalized=False) for w in words])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|end|>", chat_template=CHAT_TEMPLATE)


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


@functools.lru_cache(maxsize=64)
def lab_rows(name: str, lab: str, n_train: int, n_test: int, seed: int) -> tuple:
    """(train, test) datasets of a family: a pure function of its arguments, so drawn once per
    process (a run loads each task once; the tests and benchmarks load the same ones many
    times). A dataset is read-only: select and map return new ones."""
    family = LABS[lab].families[name]
    rng = random.Random(f"{name}-{seed}")
    test = {}
    for _ in range(100 * n_test):
        if len(test) == n_test:
            break
        ex = family.make(rng)
        test.setdefault(ex["prompt"], ex)
    train = [family.make(rng) for _ in range(n_train)]
    from datasets import Dataset
    return Dataset.from_list(train), Dataset.from_list(list(test.values()))


def make_lab_task(name: str, lab: str = "lab", n_train: int = 2000, n_test: int = 100,
                  seed: int = 0) -> Task:
    """Draw a family's train and test sets independently from its generator (test prompts are
    unique). A family is a skill drill: the small ones repeat their test prompts in training,
    the large ones mostly do not."""
    if name not in LABS[lab].families:
        raise ValueError(f"unknown {lab} family {name!r}: allowed are "
                         f"{', '.join(LABS[lab].families)}")
    family = LABS[lab].families[name]
    form = re.compile(family.form)
    return Task(name, *lab_rows(name, lab, n_train, n_test, seed), family.reward,
                family.feedback, family.max_new_tokens,
                well_formed=lambda completion, _: form.fullmatch(completion.strip()) is not None)


def pretraining_batch(tokenizer, mixture, ladder, rng, recipe):
    """A right-padded batch of (chat prompt, target + EOS); loss only on the target tokens.
    mixture: (families, their tasks) of the lab's families but the held-out ones and the
    ladder; ladder: the same for the ladder's probes (two empty lists without one), from which
    `recipe.ladder_fraction` of the rows come. A batch is either all plain or all re-prompt
    format: mixing them would pad every short row to the long re-prompt length and double the
    cost of a step."""
    rows = []
    reprompt = rng.random() < recipe.reprompt_fraction
    cfg = Config()                                     # the official teacher templates
    for _ in range(recipe.batch_size):
        # no draw without a ladder: the shipped lab-short base (and trace-1, the lab's base
        # before the ladder) was made from this random stream
        use_ladder = recipe.ladder_fraction > 0 and ladder[0] and (
            rng.random() < recipe.ladder_fraction)
        families, tasks = ladder if use_ladder else mixture
        k = rng.randrange(len(tasks))
        family, ex = families[k], tasks[k].train[rng.randrange(len(tasks[k].train))]
        prompt = ex["prompt"]
        if reprompt:                                   # the teacher's view: a demo in context
            demo = family.solve(ex, rng, False)
            prompt = teacher_prompt(prompt, cfg, demonstration=demo)
        # no draw at copy_fraction 1: lab-short's shipped base was made from this random stream
        if reprompt and (recipe.copy_fraction >= 1 or rng.random() < recipe.copy_fraction):
            target = demo
        else:                                          # its own: right, or the habit
            target = family.solve(ex, rng, rng.random() < recipe.habit_fraction)
        p = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        a = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((p, a))
    ids = pad_cat([p + a for p, a in rows], tokenizer.pad_token_id)
    labels = pad_cat([[-100] * len(p) + a for p, a in rows], -100)
    return ids, labels, (ids != tokenizer.pad_token_id).long()


def pretrain_lab_base(recipe: LabRecipe, verbose: bool = True):
    """Run the recipe: a fresh lab model pre-trained on its lab's family mixture (every family,
    probes included, but the held-out ones). Deterministic for a given machine; another CPU
    rounds differently and gets a slightly different model, which is why the default bases are
    shipped as files."""
    spec = LABS[recipe.lab]

    def part(names):                                   # (families, their tasks)
        return [spec.families[n] for n in names], [make_lab_task(n, recipe.lab) for n in names]

    mixture = part([n for n in spec.families if n not in spec.held_out + spec.ladder])
    ladder = part(spec.ladder)
    tokenizer = build_lab_tokenizer(recipe.lab)
    model = build_lab_model(tokenizer, recipe.seed)
    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(   # 5% warm-up, then cosine to 10%
        opt, lambda s: min(1.0, (s + 1) / (0.05 * recipe.steps))
        * (0.55 + 0.45 * math.cos(math.pi * s / recipe.steps)))
    model.train()
    bar = tqdm(range(recipe.steps), desc=f"pre-training a {recipe.lab} base model",
               disable=None if verbose else True)
    for _ in bar:
        ids, labels, attn = pretraining_batch(tokenizer, mixture, ladder, rng, recipe)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), tokenizer


def save_lab_weights(model, path: Path, recipe: LabRecipe):
    """The weights (the tied output matrix once) and the recipe, in one safetensors file."""
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={
        "recipe": json.dumps(dataclasses.asdict(recipe)),
        "lab_version": LABS[recipe.lab].version}))


def load_lab_weights(path: Path, lab: str):
    """(model, tokenizer) from a file written by save_lab_weights for `lab`."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        version = f.metadata().get("lab_version")
    if version != LABS[lab].version:
        raise ValueError(f"{path} holds a lab base of version {version!r}; this code's {lab} "
                         f"is version {LABS[lab].version!r}")
    tokenizer = build_lab_tokenizer(lab)
    model = build_lab_model(tokenizer)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{path} does not hold {lab} weights (missing {missing}, unexpected "
                         f"{unexpected})")
    model.tie_weights()
    return model.eval(), tokenizer


def lab_config(lab: str = "lab", **overrides) -> Config:
    """The official settings scaled down to a lab (Lab.settings): the paper's 32 prompts x 8
    rollouts, a learning rate for a 0.45M-parameter model, a short warm-up, a generation budget
    for the lab's answers, top-20 distillation (the vocabulary has about 110 tokens, so top-100
    would be all of it), and 100 test prompts x 4 samples per evaluation. Everything else
    stays official."""
    return Config(**{**LABS[lab].settings, **overrides})


def write_lab_base(lab: str = "lab") -> dict:
    """Rebuild a lab's shipped base from its recipe; returns what to record in LABS. Run it only
    when the lab itself changes (then bump its version): another machine rounds differently, so
    its file, hash and accuracies will differ a little from the shipped ones."""
    spec = LABS[lab]
    model, _ = pretrain_lab_base(spec.recipe)
    save_lab_weights(model, spec.base_file, spec.recipe)
    model, tokenizer = load_lab_weights(spec.base_file, lab)          # as runs will see it
    tasks = [make_lab_task(name, lab)
             for name in spec.sequence + spec.probes + spec.ladder]
    record = base_row(model, tokenizer, tasks, lab_config(lab))["record"]
    return {"sha256": hashlib.sha256(spec.base_file.read_bytes()).hexdigest(),
            "accuracy": {k: round(v, 4) for k, v in record["accuracy"].items()}}


def lab_base(recipe: LabRecipe | str = "lab", verbose: bool = True):
    """A lab's base model: its default recipe loads the file shipped with the code, so every
    machine starts from the same weights (a rebuild on another CPU, other float rounding, would
    move the lab's close choices between a right answer and a habit). Any other recipe is
    pre-trained once and cached on disk, keyed by the recipe."""
    recipe = LABS[recipe].recipe if isinstance(recipe, str) else recipe
    spec = LABS[recipe.lab]
    if recipe == spec.recipe and spec.base_file.exists():
        return load_lab_weights(spec.base_file, recipe.lab)
    path = cache_dir() / f"{recipe.lab}-{recipe.key()}.safetensors"
    if not path.exists():
        model, _ = pretrain_lab_base(recipe, verbose)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_lab_weights(model, path, recipe)
    return load_lab_weights(path, recipe.lab)
