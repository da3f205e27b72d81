"""run_sequence.py: the continual post-training experiment, methods x seeds x a task sequence.

    python run_sequence.py                                   # the quick lab experiment (CPU)
    python run_sequence.py --methods grpo,sdpo_frozen,stable_sdpo --seeds 0,1,2
    python run_sequence.py --tasks math,tool --probes code --steps 40 --set alpha=1.0

Every task (trained and held-out probes) is evaluated before training and after every stage.
The run folder runs/<name>/ holds config.json, results.json, signal.json (the signal check
before training), log.jsonl (one line per step), per-stage checkpoints of the policy and the
SDPO teacher, report.md and plots. Running the same command again resumes after the last
finished stage of every method and seed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import eval_forgetting as ef
import sdpo_cl as sc
from harness import (data, dose, files, lab, lab_families, lora, measures, models, runs, sandbox,
                     sft, tracking, verl)
from harness.lab_families import LADDER
from harness.loading import load_policy, load_task
from harness.measures import Measures


def quarter_of_the_batch(settings):
    """The GRPO baseline's mini-batch: a quarter of the rollout batch (8 of 32 prompts), so four
    optimizer steps per rollout batch."""
    prompts = settings["prompts_per_step"]
    if prompts % 4:
        raise ValueError(f"the grpo method takes four optimizer steps per rollout batch, so "
                         f"prompts_per_step={prompts} must be a multiple of 4")
    return prompts // 4


def a_tenth_of_the_rate(settings):
    """GRPO's learning rate in the drift confound: a tenth of the run's (SDPO's)."""
    return settings["lr"] / 10


def ten_times_the_rate(settings):
    """A LoRA adapter's learning rate: ten times the full model's, as verl's LoRA guide advises
    ("increase the learning rate by an order of magnitude", docs/advance/ppo_lora.rst)."""
    return 10 * settings["lr"]


class Method:
    """A method of the comparison: what it is (its --help line; the README lists the same
    names) and the Config values it fixes, each a value or a function of the run's other
    settings where the official value is relative."""

    def __init__(self, help: str, **fixed):
        self.help, self.fixed = help, fixed


# The methods of the paper, its variants, remedies and reference points: a new method is one
# entry here (and a line in the README's list).
METHODS = {
    "grpo": Method("GRPO, the paper's baseline (no std normalisation, clip 0.2/0.28, no KL, "
                   "four optimizer steps per rollout batch)",
                   loss_mode="grpo", ppo_mini_batch_size=quarter_of_the_batch),
    "grpo_one_step": Method("GRPO with one optimizer step per rollout batch, as SDPO takes (the "
                            "paper's baseline takes four)", loss_mode="grpo",
                            ppo_mini_batch_size=0),
    "sdpo": Method("SDPO with the official defaults (EMA teacher, rate 0.05: the paper's "
                   "SDPO_5%), re-created at each stage", loss_mode="sdpo"),
    "sdpo_frozen": Method("SDPO with its teacher frozen at each stage's start (the paper's "
                          "SDPO_0 as a verl run per stage with rate 0)",
                          loss_mode="sdpo", teacher_update_rate=0.0),
    "sdpo_frozen_base": Method("SDPO with its teacher frozen at the base model through every "
                               "stage (SDPO_0 read as verl's teacher_path=<base>)",
                               loss_mode="sdpo", teacher_update_rate=0.0,
                               reset_teacher_each_task=False),
    "sdpo_ema01": Method("SDPO with an EMA teacher at rate 0.01 (the paper's sweep: 0, 1, 2, 5%)",
                         loss_mode="sdpo", teacher_update_rate=0.01),
    "sdpo_ema02": Method("SDPO with an EMA teacher at rate 0.02", loss_mode="sdpo",
                         teacher_update_rate=0.02),
    "stable_sdpo": Method("the paper's StableSDPO as read here: the teacher frozen, and every 10 "
                          "batches moved 40% of the way to the student (restart-and-freeze, "
                          "gamma 40%: 1 - 0.95^10)", loss_mode="sdpo", teacher_update_rate=0.4,
                          teacher_update_every=10),
    "sdpo_live": Method("SDPO whose teacher is the current student (no_grad)", loss_mode="sdpo",
                        teacher_regularization="live"),
    "sdpo_trust_region": Method("SDPO with the trust-region teacher (logit lerp, rate 0.05)",
                                loss_mode="sdpo", teacher_regularization="trust-region"),
    "sdpo_mask50": Method("SDPO dropping 50% of distilled tokens at random (less dense "
                          "supervision)", loss_mode="sdpo", mask_ratio=0.5),
    "hybrid": Method("0.5 GRPO + 0.5 SDPO (distillation_weight=0.5)", loss_mode="sdpo",
                     distillation_weight=0.5),
    "sdpo_ema50": Method("SDPO with a fast-moving EMA teacher (rate 0.5)", loss_mode="sdpo",
                         teacher_update_rate=0.5),
    "sdpo_frozen_answer": Method("SDPO_0 distilling the final answer only, not the chain of "
                                 "thought", loss_mode="sdpo", teacher_update_rate=0.0,
                                 distill_scope="final_answer"),
    "sdpo_frozen_cot": Method("SDPO_0 whose teacher sees the demonstration's reasoning too "
                              "(the paper's SDPO_0^CoT, most likely)", loss_mode="sdpo",
                              teacher_update_rate=0.0, remove_thinking_from_demonstration=False),
    # remedies and reference points
    "replay": Method("SDPO with 25% of each batch's prompts replayed from earlier tasks",
                     loss_mode="sdpo", replay_fraction=0.25),
    "grpo_replay": Method("GRPO with 25% replay", loss_mode="grpo",
                          ppo_mini_batch_size=quarter_of_the_batch, replay_fraction=0.25),
    "sdpo_kl": Method("SDPO with a k3 KL anchor to the base model (kl_loss_coef=0.1)",
                      loss_mode="sdpo", kl_loss_coef=0.1),
    "sft": Method("supervised fine-tuning on the gold answers, the same steps and prompts (the "
                  "reference point for forgetting)", loss_mode="sft"),
    "multitask": Method("SDPO on all tasks of the sequence mixed from the start (the upper "
                        "bound)", loss_mode="sdpo", multitask=True),
    "grpo_multitask": Method("GRPO on all tasks mixed from the start", loss_mode="grpo",
                             ppo_mini_batch_size=quarter_of_the_batch, multitask=True),
    "grpo_lr_tenth": Method("GRPO at a tenth of the run's learning rate (the drift figure's "
                            "confound: the SDPO code base swept GRPO at 1e-5 and 1e-6)",
                            loss_mode="grpo", ppo_mini_batch_size=quarter_of_the_batch,
                            lr=a_tenth_of_the_rate),
    # a dose of misalignment (harness/dose.py): a share of the teacher's demonstrations swapped
    # for misleading ones, of another prompt of the task (content) or of another task (format)
    **{f"sdpo_{kind}{round(100 * share)}": Method(
        f"SDPO whose teacher sees a misleading demonstration in {round(100 * share)}% of its "
        f"contexts: " + ("the answer to another prompt of the task (the right form, the wrong "
                         "content)" if kind == "content" else "another task's answer, in its "
                         "wrapper (the paper's artifact)"),
        loss_mode="sdpo", misleading_share=share, misleading_kind=kind)
       for kind in ("content", "format") for share in (0.5, 1.0)},
    # LoRA (harness/lora.py): a rank-8 adapter on every linear layer, verl's alpha 16
    "grpo_lora": Method("GRPO training a rank-8 LoRA adapter (every linear layer, alpha 16) at "
                        "ten times the learning rate, the base frozen", loss_mode="grpo",
                        ppo_mini_batch_size=quarter_of_the_batch, lora_rank=8,
                        lr=ten_times_the_rate),
    "sdpo_lora": Method("SDPO (EMA teacher at 0.05, a second adapter) training a rank-8 LoRA "
                        "adapter at ten times the learning rate", loss_mode="sdpo", lora_rank=8,
                        lr=ten_times_the_rate),
}

# Each finding of the paper as one command: the defaults it sets, what the paper reports, and
# what to look at in the report section it writes.
FINDINGS = {
    "teacher-stability": dict(
        methods="grpo,sdpo_frozen,sdpo_ema01,sdpo_ema02,sdpo,stable_sdpo", tasks="math",
        probes="math_hard", steps="25", seeds="0,1,2", set=["eval_every=4"],   # 50 x 0.5
        paper="stable teachers outperform rapidly updated EMA teachers: on a math stage scored "
              "on held-out math (AIME), base 32.7, frozen teacher 56.4, EMA 5% 34.4, StableSDPO "
              "55.0, with an EMA sweep 0/1/2/5%",
        look="accuracy after the stage on the training distribution and on the harder held-out "
             "probe (math_hard: numbers up to 7, never pre-trained), per teacher, paired "
             "against the frozen teacher; and the curves every 4 batches",
        baselines=("grpo", "sdpo_frozen")),
    "ood": dict(
        methods="sdpo,sdpo_frozen,grpo", steps="paper", seeds="0,1,2",
        # 14 evaluation sets: 50 test prompts each, for the 30 minutes on the slow CPU
        probes=",".join(("mcq_math", "math_words") + LADDER), set=["eval_examples=50"],
        paper="SDPO improves source-like tasks but hurts partially related domains: in its "
              "forgetting_curve.jpg (SDPO_5% against SDPO_0), each (trained domain, evaluated "
              "set) pair's gain and forgetting, floored at 0, against the set's MMD (RBF kernel) "
              "from the training domain; forgetting peaks at intermediate distance (0.1-0.3), "
              "an inverted U, SDPO_5% above SDPO_0 there",
        look="ood.png (gain and forgetting of every pair against its distance, a quadratic fit "
             "with its band per method), the intermediate tercile's forgetting against the near "
             "and the far one with its interval, SDPO_5% (sdpo) against SDPO_0 (sdpo_frozen) "
             "there, GRPO as a third; and the ladder: forgetting of the sets sharing a trained "
             "family's content, its format, both or neither",
        baselines=("sdpo_frozen", "grpo")),
    "continual": dict(
        methods="grpo,sdpo,sdpo_frozen,sft", steps="paper", seeds="0,1,2",
        paper="SDPO accumulates forgetting across sequential domains; GRPO preserves more",
        look="forgetting and BWT, their paired differences, intervals and the differences the "
             "seeds could detect; forgetting at matched in-domain gain; and sequential SFT, "
             "the reference point (the lab's interference)"),
    "drift": dict(
        methods="grpo,sdpo,sdpo_frozen,grpo_lr_tenth", probes="", steps="paper", seeds="0,1,2",
        set=["eval_every=10", "eval_examples=50"],
        paper="dense supervision causes substantially larger parameter and response drift: "
              "SDPO's four parameter measures (NSS, the largest principal angle, principal-mask "
              "overlap and update, every 10 steps) rise while GRPO's stay flat, and its answers "
              "grow less like the base's (which learning rate its GRPO ran at is not stated; the "
              "SDPO code base swept GRPO at 1e-5 and 1e-6, SDPO's default is 1e-5)",
        look="the paper's four measures every 10 batches (paper_drift.png), drift at matched "
             "in-domain gain (the table), response KL and similarity at stage ends, and the "
             "confound: GRPO at a tenth of SDPO's learning rate (grpo_lr_tenth) against SDPO"),
    "collapse": dict(
        methods="grpo,sdpo", probes="", steps="paper", seeds="0,1,2",
        paper="in the tool-use stage of the sequence, SDPO at the official EMA rate 0.05 nearly "
              "collapsed: a math-format artifact (\\boxed) repeated in tool answers, amplified "
              "through the teacher-student loop",
        look="per step through the sequence: the share of answers carrying another family's "
             "wrapper (leak_<family> in log.jsonl), the share out of the task's format, whether "
             "the teacher's targets rate those samples' tokens above the student does (a "
             "positive gap feeds the artifact), the repetition and unfinished rates, and the "
             "reward"),
    "dose": dict(
        # fixed before the first run (issue 37): doses 0, 0.5, 1 of each kind, 3 seeds, GRPO
        # beside; stages 12/12/12/5 (the paper's 50/50/50/20 x 0.25: six methods x three seeds
        # at the findings' 25/25/25/10 take about 45 minutes on 2 slow cores, over the 30), 50
        # test prompts, no probes; detection: SDPO - GRPO forgetting with a 95% interval above 0
        methods="grpo,sdpo,sdpo_content50,sdpo_content100,sdpo_format50,sdpo_format100",
        steps="12,12,12,5", probes="", seeds="0,1,2", set=["eval_examples=50"],
        paper="the paper blames content and format errors in the teacher's targets (the \\boxed "
              "artifact amplified in the tool stage, noisy long reasoning) for SDPO's forgetting",
        look="dose.png and the table: SDPO minus GRPO forgetting, plasticity, ACC, response KL, "
             "the four drift measures and the wrapper leaks at each dose of misleading "
             "demonstrations (content: another prompt's answer; format: another task's, in its "
             "wrapper), each teacher's measured departure, and the smallest dose at which SDPO "
             "forgets more than GRPO beyond noise",
        baselines=("grpo", "sdpo")),
    "cot": dict(
        methods="grpo,sdpo_frozen,sdpo_frozen_cot,sdpo_frozen_answer", tasks="math_cot",
        probes="", steps="25", seeds="0,1,2", set=["eval_every=4"],
        paper="long chains of thought amplify noise: SDPO_0 whose teacher sees the "
              "demonstration's reasoning (SDPO_0^CoT) drifts most; distilling the chain of "
              "thought too is not better",
        look="accuracy during the stage and drift: the teacher with and without the "
             "demonstration's reasoning, and the whole response against the final answer only"),
}

DEFAULTS = dict(methods="grpo,sdpo", seeds="0", tasks=",".join(lab.LABS["lab"].sequence),
                probes=",".join(lab.LABS["lab"].probes), steps=None, set=[])


def method_config(method, settings, overrides, make_config):
    """The Config of `method` on top of the run's settings. A value the method fixes may not be
    overridden with another one (--set): that would silently run a different method."""
    run_cfg = make_config(**settings)
    fixed = {}
    for key, value in METHODS[method].fixed.items():
        value = value(dataclasses.asdict(run_cfg)) if callable(value) else value
        if key in overrides and overrides[key] != value:
            raise ValueError(f"--set {key}={overrides[key]!r} conflicts with the method "
                             f"{method!r}, which fixes {key}={value!r}; choose another method "
                             f"or drop the override")
        fixed[key] = value
    return dataclasses.replace(run_cfg, **fixed)


def parse_list(flag, text, kind=str, allow_empty=False) -> list:
    """A comma-separated flag value; a bad item or an empty list is one clear error."""
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        what = {int: "integers", str: "names"}[kind]
        raise ValueError(f"{flag} {text!r}: expected comma-separated {what}") from None
    if not items and not allow_empty:
        raise ValueError(f"{flag} {text!r}: give at least one")
    return items


RESERVED_SETTINGS = {"seed": "--seeds", "steps_per_task": "--steps", "model": "--model",
                     "device": "--device"}


def parse_sets(pairs):
    """--set key=value overrides of Config fields; values are read as JSON when they parse."""
    fields = {f.name for f in dataclasses.fields(sc.Config)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if key in RESERVED_SETTINGS:
            raise ValueError(f"--set {pair!r}: {key} is set with {RESERVED_SETTINGS[key]}")
        if not sep or key not in fields:
            raise ValueError(f"--set {pair!r}: expected key=value with key one of the Config "
                             f"fields ({', '.join(sorted(fields - set(RESERVED_SETTINGS)))})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split(
        "\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finding", choices=list(FINDINGS), help="run the preset that checks one "
                    "finding of the paper (methods, tasks, steps, seeds, evaluation schedule; "
                    "flags given too win) and write its report section: " + "; ".join(
                        f"{k}: the paper: {v['paper']}. Look at {v['look']}".replace("%", "%%")
                        for k, v in FINDINGS.items()))
    ap.add_argument("--methods", help="comma-separated (default grpo,sdpo), from: " + "; ".join(
        f"{k}: {v.help}" for k, v in METHODS.items()).replace("%", "%%"))
    ap.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    ap.add_argument("--tasks", help="the training sequence, in order (default "
                    f"{','.join(lab.LABS['lab'].sequence)}): lab families (on --model lab-short "
                    "or lab-trace, theirs), gsm8k, sciknoweval:<domain> (from the hub: "
                    f"{', '.join(data.SCIKNOWEVAL_DOMAINS)}), or folders in the official SDPO "
                    "layout (train.json and test.json)")
    ap.add_argument("--probes", help="held-out tasks, evaluated but never trained (default "
                    f"{','.join(lab.LABS['lab'].probes)})")
    ap.add_argument("--steps", default=None,
                    help="rollout batches per task: one number, one per task (e.g. "
                         "50,50,50,20), or 'paper': the paper's 50,50,50,20 (scaled by "
                         f"{lab.LABS['lab'].paper_scale} on the lab); default "
                         f"{','.join(map(str, lab.LABS['lab'].quick_steps))} on the lab, 50 on "
                         "a real model")
    ap.add_argument("--model", default="lab", help="'lab' (the built-in tiny model, default: "
                    "a lab that can forget), 'lab-trace' (the paper's regime without "
                    "interference), 'lab-short' (answers of 1-4 tokens), a hub id, a local "
                    "folder, or a .gguf file")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where to train: auto (default) runs the lab on the CPU, where it is "
                    "fastest, and a real model on CUDA when there is one")
    ap.add_argument("--embedding-model", default=None, metavar="MODEL", help="the model that "
                    "embeds each task set for the distances between them (the ood finding's "
                    "MMD; the paper embeds with a separate model): a hub id or a folder of any "
                    "transformers encoder (default: the run's own base model)")
    ap.add_argument("--lab-steps", type=int, default=None,
                    help="pre-training steps of the lab base model (default: the shipped "
                    "base's; fewer for a smoke run: the base is cached per recipe)")
    ap.add_argument("--name", help="run folder name under --out (default: quick, or the "
                    "finding's name)")
    ap.add_argument("--out", default="runs", help="parent folder of runs (%(default)s)")
    ap.add_argument("--set", nargs="*", action="extend", default=None, metavar="KEY=VALUE",
                    help="override a Config field, e.g. --set alpha=1.0 distillation_topk=null "
                    "(seed, steps_per_task, model and device have their own flags)")
    ap.add_argument("--print-verl", action="store_true", help="print the equivalent command "
                    "lines for the official verl implementation (one per method and stage), "
                    "then exit")
    ap.add_argument("--long-prompts", choices=("error", "drop", "truncate"), default="error",
                    help="prompts that do not fit the model's context with the generation "
                    "budget: an error before anything runs (default), dropped, or cut")
    ap.add_argument("--checkpoint-every", type=int, default=10, metavar="N", help="inside a "
                    "stage, keep what a resume needs every N rollout batches (one checkpoint at a "
                    "time, replaced; 0: only at stage ends): a run stopped midway loses at most "
                    "N batches (default %(default)s: about 10 minutes of a real model on one "
                    "GPU at a minute a batch)")
    ap.add_argument("--report-to", default=None, metavar="BACKENDS", help="stream the per-step "
                    "metrics of log.jsonl and each stage's accuracies as curves, as the run "
                    "goes: tensorboard (<run folder>/tensorboard) and/or wandb, comma-separated "
                    "(each needs its package)")
    ap.add_argument("--skip-signal-check", action="store_true", help="start training without "
                    "the signal check (one rollout batch per trained task at the training "
                    "temperature, before anything trains)")
    ap.add_argument("--allow-unisolated-code", action="store_true", help="let the code reward "
                    "run model-written code where the OS sandbox is not available (docs/"
                    "sandbox.md), in a limited process only: do this only for code you trust")
    ap.add_argument("--export-verl-data", metavar="DIR", help="write each task's train and test "
                    "split as the parquet files verl reads (DIR/<task>/{train,test}.parquet), "
                    "then exit; with --print-verl the commands point to them")
    return ap


def stage_steps(text, model, n_tasks) -> list:
    """--steps: one number, one per task, or 'paper' (the paper's 50,50,50,20, scaled on a lab);
    by default the lab's quick stages, or the official 50 per task on a real model."""
    spec = lab.LABS.get(model)
    if text == "paper":
        if n_tasks != len(lab.PAPER_STEPS):
            raise ValueError(f"--steps paper: the paper's stages are for {len(lab.PAPER_STEPS)} "
                             f"tasks (math, science, tool, code), this sequence has {n_tasks}")
        return [max(1, round(n * (spec.paper_scale if spec else 1.0))) for n in lab.PAPER_STEPS]
    if text is None:
        quick = list(spec.quick_steps) if spec else [sc.Config().steps_per_task]
        return quick if len(quick) == n_tasks else [quick[0]] * n_tasks
    steps = parse_list("--steps", text, int)
    if len(steps) not in (1, n_tasks) or min(steps) < 1:
        raise ValueError(f"--steps {text!r}: give one positive number, one per task ({n_tasks} "
                         f"tasks), or 'paper'")
    return steps * n_tasks if len(steps) == 1 else steps


@dataclass
class RunPlan:
    """Everything a run needs, checked before anything is trained or written."""
    methods: list
    seeds: list
    names: list                # the trained tasks' names, in order
    steps: list                # rollout batches per trained task
    configs: dict              # (method, seed) -> sdpo_cl.Config
    tasks: list                # the trained tasks
    probes: list               # the held-out tasks
    base: object               # the base model
    tokenizer: object
    device: str
    run_config: dict           # what config.json holds (a resume must match it)
    finding: str | None = None
    signal_check: bool = True
    checkpoint_every: int = 10         # rollout batches between mid-stage checkpoints (0: none)
    report_to: tuple = ()              # tensorboard and/or wandb (harness/tracking.py)
    now: tuple = (None, None, None)    # (method, seed, folder) being trained, for Ctrl-C


def plan_configs(args, names):
    """(methods, seeds, steps, configs) from the flags, each checked."""
    methods = parse_list("--methods", args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; allowed: "
                         f"{', '.join(METHODS)}")
    seeds = parse_list("--seeds", args.seeds, int)
    # a lab has its scaled-down settings; a real model starts from the official ones
    spec = lab.LABS.get(args.model)
    quick = spec.quick_settings if spec and not args.finding else {}   # the default run's
    make_config = functools.partial(lab.lab_config, args.model, **quick) if spec else sc.Config
    steps = stage_steps(args.steps, args.model, len(names))
    sets = parse_sets(args.set)
    configs = {(m, s): method_config(m, {**sets, "seed": s, "steps_per_task": steps[0]}, sets,
                                     make_config)
               for m in methods for s in seeds}
    return methods, seeds, steps, configs, sets


def check_paths(args, configs):
    """--lab-steps, --out and teacher_path, checked before anything is written."""
    if args.lab_steps is not None and args.lab_steps < 1:
        raise ValueError(f"--lab-steps {args.lab_steps}: give a positive number of steps")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every}: give 0 (only at stage "
                         f"ends) or a positive number of rollout batches")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is a file; give a folder for the run folders")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--out {args.out!r}: {existing} is not writable")
    for path in {c.teacher_path for c in configs.values() if c.teacher_path}:
        if not Path(path).is_dir():
            try:
                from transformers import AutoConfig
                AutoConfig.from_pretrained(path)
            except Exception as e:            # any failure: say which value and why
                raise ValueError(f"teacher_path={path!r} is neither a model folder nor a "
                                 f"loadable hub id ({type(e).__name__})") from None


def check_memory_options(configs, device, model=None):
    """What LoRA and 8-bit AdamW need, refused before anything trains: peft installed and, once
    the model is loaded (`model`), target modules it has; bitsandbytes installed, and CUDA."""
    for cfg in configs:
        if cfg.lora_rank:
            lora.require_peft()
            problem = model is not None and lora.target_problem(model, cfg)
            if problem:
                raise ValueError(problem)
        if cfg.optim_8bit and device != "cuda":
            raise ValueError(f"optim_8bit=true: bitsandbytes' 8-bit AdamW runs on CUDA; this run "
                             f"is on {device} (allowed there: optim_8bit=false)")
        if cfg.optim_8bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ImportError("optim_8bit=true needs the bitsandbytes package, which is not "
                                  "installed: pip install bitsandbytes") from None


def check_code_isolation(tasks):
    """A task whose reward runs model-written programs needs the OS sandbox: tried once, here,
    before the base evaluation, and refused with one message unless the user opted out (the
    reward would otherwise fail mid-run, at its first program)."""
    if any(data.runs_programs(t) for t in tasks) and not os.environ.get(
            sandbox.ALLOW_UNISOLATED) == "1":
        reason = sandbox.isolation_available()
        if reason:
            raise ValueError(sandbox.refusal(reason))


def plan_run(args) -> RunPlan | None:
    """Every check that can fail, before any training and any write: flags, settings, tasks,
    the model, prompt lengths. Returns what the run needs, or None after --print-verl or
    --export-verl-data (which do their work here and stop)."""
    report_to = tuple(parse_list("--report-to", args.report_to or "", allow_empty=True))
    tracking.check_backends(report_to)
    names = parse_list("--tasks", args.tasks)
    probe_names = [n for n in parse_list("--probes", args.probes, allow_empty=True)
                   if n not in names]
    methods, seeds, steps, configs, sets = plan_configs(args, names)
    check_paths(args, configs)
    tasks = [load_task(n, args.model) for n in names]
    probes = [load_task(n, args.model) for n in probe_names]
    seen = {}
    for name, task in zip(names + probe_names, tasks + probes):
        if task.name in seen:      # results are keyed by task name: one would overwrite the other
            raise ValueError(f"the tasks {seen[task.name]!r} and {name!r} are both named "
                             f"{task.name!r}; give the folders different names")
        seen[task.name] = name
    if args.export_verl_data:
        for path in verl.export_verl_data(tasks + probes, args.export_verl_data):
            print(f"wrote {path}")
    if args.print_verl:
        verl.print_verl(methods, configs, names, steps, args.model, args.export_verl_data)
    if args.print_verl or args.export_verl_data:
        return None
    check_code_isolation(tasks + probes)
    kinds = {c.misleading_kind for c in configs.values() if c.misleading_share}
    if kinds:                                    # the dose of misalignment's demonstrations
        dose.add_misleading(tasks + probes, kinds)
    device = models.resolve_device(args.device, args.model)
    check_memory_options(configs.values(), device)
    base, tokenizer = load_policy(args.model, device, args.lab_steps)
    check_memory_options(configs.values(), device, base)
    cfg = next(iter(configs.values()))
    any_sdpo = any(c.loss_mode == "sdpo" for c in configs.values())
    for i, task in enumerate(tasks + probes):
        note = models.fit_prompts(task, tokenizer, base, cfg, on_long=args.long_prompts,
                                  with_teacher=any_sdpo and i < len(tasks))
        if note:
            print(note)
    run_config = {"methods": methods, "seeds": seeds, "tasks": names,
                  "probes": [p.name for p in probes], "steps": steps, "model": args.model,
                  "device": args.device, "lab_steps": args.lab_steps, "set": sets,
                  "data_sha256": {t.name: runs.data_digest(t) for t in tasks + probes},
                  "configs": {f"{m}/seed{s}": dataclasses.asdict(c)
                              for (m, s), c in configs.items()}}
    if args.embedding_model:                   # only then: older run folders resume as they were
        run_config["embedding_model"] = args.embedding_model
        models.load_encoder(args.embedding_model)          # refused now, not after training
    return RunPlan(methods, seeds, names, steps, configs, tasks, probes, base, tokenizer, device,
                   json.loads(json.dumps(run_config)), args.finding, not args.skip_signal_check,
                   args.checkpoint_every, report_to)


def settings_difference(old, new) -> str:
    """The first few settings in which two run configs differ, for the refusal message."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "configs":
            continue
        if old.get(key) != new.get(key):
            out.append(f"{key}: was {old.get(key)!r}, now {new.get(key)!r}")
    for run in sorted(set(old.get("configs", {})) & set(new.get("configs", {}))):
        a, b = old["configs"][run], new["configs"][run]
        out += [f"{run} {k}: was {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
    return "; ".join(out[:4]) + (" ..." if len(out) > 4 else "")


def main(argv=None):
    t_start = time.time()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()              # no bars for every checkpoint save and load
    ap = build_parser()
    args = ap.parse_args(argv)
    preset, given_sets = FINDINGS.get(args.finding, {}), args.set
    for key, value in DEFAULTS.items():       # a flag given wins over the preset's value
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, value))
    if given_sets is not None:                # --set adds to the preset's (and wins)
        args.set = preset.get("set", []) + given_sets
    args.name = args.name or args.finding or "quick"
    if args.allow_unisolated_code:            # read by harness/sandbox.py
        os.environ["SDPO_CL_ALLOW_UNISOLATED_CODE"] = "1"
    try:
        plan = plan_run(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        ap.error(str(e))
    if plan is None:
        return None
    folder = Path(args.out) / args.name
    try:
        with runs.RunLock(folder):
            return run(plan, folder, t_start)
    except ValueError as e:                        # the folder is in use or holds another run
        ap.error(str(e))
    except KeyboardInterrupt:
        m, s, sub = plan.now
        done = runs.last_finished_stage(sub)
        mid = runs.midstage_step(sub, done + 1)
        kept = (f"stage {done}" if done > 0 else "no stage yet") + (
            f" and stage {done + 1} up to batch {mid + 1}" if mid >= 0 else "")
        where = ("while evaluating the base model" if m is None else
                 f"during {m} seed {s}, which has kept {kept}")
        print(f"\ninterrupted {where}; run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:
        print(f"\nstopped: {e}\nEvery finished stage is kept; change the settings (a smaller "
              f"lr, say) and start a new run, or fix the cause and resume.", file=sys.stderr)
        sys.exit(1)


def check_folder(folder, run_config):
    """A run folder may be resumed only by the same settings."""
    if not (folder / "config.json").exists():
        return
    try:
        old = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"run folder {folder} has a damaged config.json ({e}); delete the "
                         f"folder to start over, or choose another --name") from None
    if old != run_config:
        raise ValueError(f"run folder {folder} holds a run with other settings ("
                         f"{settings_difference(old, run_config)}); choose another --name "
                         f"or delete the folder to start over")


def run(plan: RunPlan, folder, t_start) -> dict:
    """The run itself: config.json, row 0 and the signal check, methods x seeds (resuming
    finished stages), the report."""
    check_folder(folder, plan.run_config)
    files.write_json(folder / "config.json", plan.run_config)
    print(f"model {plan.run_config['model']} on {plan.device}; sequence "
          f"{' -> '.join(plan.names)}; probes {', '.join(p.name for p in plan.probes) or 'none'}"
          f"; steps {plan.steps}; methods {', '.join(plan.methods)}; seeds {plan.seeds}")
    print(f"base model: {sum(p.numel() for p in plan.base.parameters()) / 1e6:.2f}M parameters "
          f"(ready in {time.time() - t_start:.0f}s)")

    def done_stages(m, s):
        return runs.last_finished_stage(folder / m / f"seed{s}", on_damage=lambda k, problem: print(
            f"{m} seed {s}: stage {k} is damaged ({problem}); it is recomputed"))

    row0 = None     # the base model, once for every method and seed
    if any(done_stages(m, s) < 0 for m in plan.methods for s in plan.seeds):
        row0 = base_row_and_signal(plan, folder)
    set_distances(plan, folder)
    plan.base.to("cpu")     # each run takes a copy to the device: no second one stays there
    log_path = folder / "log.jsonl"
    tracker = tracking.Tracker(plan.report_to, folder, plan.steps) if plan.report_to else None
    try:
        for m in plan.methods:
            for s in plan.seeds:
                plan.now = (m, s, folder / m / f"seed{s}")   # for the Ctrl-C message
                run_one(plan, folder, m, s, done_stages(m, s), row0, log_path, tracker)
    finally:    # also after a fault: results.json holds every finished stage, as strict JSON
        results = write_results(folder, plan)
        if tracker is not None:
            tracker.close()
    print_summary(results, plan, folder, t_start)
    return results


def base_row_and_signal(plan: RunPlan, folder) -> dict:
    """Row 0 (printed), then the signal check of every trained task (signal.json)."""
    t0, cfg = time.time(), next(iter(plan.configs.values()))
    print(f"evaluating the base model on {len(plan.tasks + plan.probes)} tasks, with and without "
          f"a demonstration (row 0 of every method and seed)")
    row0 = sc.base_row(plan.base, plan.tokenizer, plan.tasks + plan.probes, cfg,
                       Measures(plan.tokenizer))
    record = row0["record"]
    print(f"base model, accuracy ± standard error / teacher lift (points), "
          f"{time.time() - t0:.0f}s: " + ", ".join(
              f"{k} {100 * record['accuracy'][k]:.0f}±{100 * record['stderr'][k]:.0f}"
              f"/{100 * record['teacher_lift'][k]:+.0f}" for k in record["accuracy"]))
    signal = {}
    for task in plan.tasks if plan.signal_check else []:
        sc.seed_everything("signal", task.name)
        signal[task.name] = check = measures.signal_check(plan.base, plan.tokenizer, task, cfg,
                                                          record["teacher_lift"][task.name])
        sc.seed_everything("departure", task.name)     # the self-teacher, as the dose measures it
        check["departure"] = measures.teacher_departure(plan.base, plan.tokenizer, task, cfg)
        departed = check["departure"]["departure"]
        print(f"signal check, {task.name}: reward at temperature {cfg.temperature:g} "
              f"{check['reward']:.2f}, groups with a success {100 * check['solved_groups']:.0f}%"
              f", all alike {100 * check['zero_adv_groups']:.0f}%, teacher lift "
              f"{100 * check['teacher_lift']:+.0f} points, teacher departure "
              + ("n/a" if departed is None else f"{100 * departed:.1f}%")
              + "".join(f"\n  WARNING: {w}" for w in check["warnings"]))
    files.write_json(folder / "signal.json", signal)
    if any(c.misleading_share for c in plan.configs.values()):
        files.write_json(folder / "departure.json", teacher_departures(plan))
    return row0


def teacher_departures(plan: RunPlan) -> dict:
    """{SDPO method: {trained task: measures.teacher_departure}} on the base model, each method
    with its own dose of misleading demonstrations: the dose in a unit any model has."""
    out = {}
    for method in plan.methods:
        cfg = plan.configs[(method, plan.seeds[0])]
        if cfg.loss_mode == "sdpo":
            for task in plan.tasks:
                sc.seed_everything("departure", method, task.name)
                out.setdefault(method, {})[task.name] = measures.teacher_departure(
                    plan.base, plan.tokenizer, task, cfg)
    return out


def set_distances(plan: RunPlan, folder):
    """distances.json: {trained task: {evaluated task: MMD}} between the task sets embedded by
    --embedding-model, or by the base model itself (harness/measures.py), once per run folder:
    the out-of-domain reading places each evaluated set by its distance from each training
    set."""
    if not (folder / "distances.json").exists():
        name = plan.run_config.get("embedding_model")
        model, tokenizer = models.load_encoder(name) if name else (plan.base, plan.tokenizer)
        files.write_json(folder / "distances.json", measures.task_distances(
            model, tokenizer, plan.tasks, plan.tasks + plan.probes))


class RunHooks(Measures):
    """The hooks of one method and seed (sdpo_cl.Hooks): the measures (harness/measures.py),
    a log line per step, and the run folder: the stages already finished loaded on a resume,
    each finished stage checkpointed (stage 0 with the base's answers, for response drift), and
    inside a stage a checkpoint every `every` rollout batches, from which a stopped stage goes
    on (harness/runs.py: one at a time)."""

    def __init__(self, tokenizer, folder, done, base_sequences, log=None, every=10,
                 on_stage=None):
        super().__init__(tokenizer)
        self.folder, self.done, self.base_sequences, self.write = folder, done, base_sequences, log
        self.every, self.current = every, done + 1        # the stage being trained
        self.on_stage = on_stage                           # (k, record): the curves' accuracies

    def log(self, metrics):
        if self.write is not None:
            self.write(metrics)

    def resume(self, policy, teacher):
        return runs.resume(self.folder, self.done, policy, teacher)

    def resume_steps(self, state):
        return runs.load_midstage(self.folder, self.current, state)

    def after_step(self, step, state):
        if self.every and (step + 1) % self.every == 0:
            runs.save_midstage(self.folder, self.current, step, state)

    def finished(self, k, record, policy, teacher):
        runs.save_stage(self.folder, k, record, policy, self.tokenizer, teacher,
                        {"base_sequences.json": self.base_sequences} if k == 0 else None)
        runs.drop_midstage(self.folder)
        self.current = k + 1
        if self.on_stage is not None:
            self.on_stage(k, record)


def run_in_folder(cfg, policy, tokenizer, tasks, probes, folder, *, row0=None, steps=None,
                  log=None, desc="", checkpoint_every=10, on_stage=None) -> list:
    """sdpo_cl.continual_sequence with a run folder: every finished stage checkpointed (policy
    and teacher), and a rerun resumes after the last finished, intact stage. With lora_rank, the
    policy trains a LoRA adapter on its frozen weights (harness/lora.py)."""
    done = runs.last_finished_stage(folder)
    if done >= 0:
        row0 = runs.stored_row0(folder)
    elif row0 is None:
        row0 = sc.base_row(policy, tokenizer, sc.evaluation_tasks(tasks, probes), cfg,
                           Measures(tokenizer))
    if cfg.lora_rank:
        policy = lora.add_lora(policy, cfg)
    hooks = RunHooks(tokenizer, folder, done, row0["sequences"], log, checkpoint_every, on_stage)
    if cfg.loss_mode == "sft":   # the reference point's own step (harness/sft.py)
        hooks.train_step = sft.sft_step
    return sc.continual_sequence(cfg, policy, tokenizer, tasks, probes, steps=steps, row0=row0,
                                 hooks=hooks, desc=desc)


def run_one(plan: RunPlan, folder, m, s, done, row0, log_path, tracker=None):
    """One method and seed through the whole sequence, resuming after stage `done`."""
    if done == len(plan.tasks):
        print(f"{m} seed {s}: finished earlier, kept")
        return
    sub = folder / m / f"seed{s}"
    mid = runs.midstage_step(sub, done + 1)          # a stage stopped midway: its last step kept
    if done >= 0 or mid >= 0:
        print(f"resuming {m}/seed{s} after stage {done}"
              + (f", inside stage {done + 1} after batch {mid + 1}" if mid >= 0 else ""))
    runs.keep_log_lines(log_path, lambda r: not (r["method"] == m and r["seed"] == s and (
        r["stage"] > done + 1 or r["stage"] == done + 1 and r["step"] > mid)))
    with open(log_path, "a") as log_file:
        def log(metrics, m=m, s=s, f=log_file):
            f.write(json.dumps(files.strict_json({"method": m, "seed": s, **metrics})) + "\n")
            f.flush()
            if tracker is not None:
                tracker.step(m, s, metrics)
        t0 = time.time()
        policy = copy.deepcopy(plan.base).to(plan.device)
        records = run_in_folder(plan.configs[(m, s)], policy, plan.tokenizer,
                                plan.tasks, plan.probes, sub, row0=row0, steps=plan.steps,
                                log=log, desc=f"{m} seed {s}",
                                checkpoint_every=plan.checkpoint_every,
                                on_stage=tracker and (lambda k, record: tracker.stage(m, s, k,
                                                                                      record)))
    gains = []
    for k, t in enumerate(plan.tasks):      # a gain within its standard error is not learning
        gain = records[k + 1]["accuracy"][t.name] - records[k]["accuracy"][t.name]
        se = (records[k + 1]["stderr"][t.name] ** 2 + records[k]["stderr"][t.name] ** 2) ** 0.5
        gains.append(f"{t.name} {100 * gain:+.0f}" + (f" (within its s.e. {100 * se:.0f})"
                                                       if abs(gain) < se else ""))
    print(f"{m} seed {s}: {time.time() - t0:.0f}s; own-stage gain (points) " + ", ".join(gains)
          + "; final accuracy "
          + ", ".join(f"{k} {100 * v:.0f}" for k, v in records[-1]["accuracy"].items()))


def print_summary(results, plan: RunPlan, folder, t_start):
    """A short summary (at most 100 columns); the full tables and figures go to report.md."""
    ef.write_report(results, folder)
    baseline = ((results.get("finding") or {}).get("baselines") or ("grpo",))[0]
    print("\n" + ef.summary_table(results, baseline))
    for caution in ef.cautions(results):
        print(f"CAUTION: {caution}")
    print(f"\nwall time {time.time() - t_start:.0f}s; report (every table, the figures): "
          f"{folder / 'report.md'}; what each number means: docs/glossary.md")


def write_results(folder, plan: RunPlan) -> dict:
    """results.json from the finished stages on disk: the accuracy matrix R (and its standard
    errors SE) and the stage records of every method and seed (unfinished runs show the stages
    they have)."""
    names = [t.name for t in plan.tasks] + [p.name for p in plan.probes]
    by_method = {}
    for m in plan.methods:
        for s in plan.seeds:
            sub = folder / m / f"seed{s}"
            records = runs.stage_records(sub, runs.last_finished_stage(sub))
            by_method.setdefault(m, {})[str(s)] = {
                "R": [[r["accuracy"][n] for n in names] for r in records],
                "SE": [[r["stderr"][n] for n in names] for r in records], "records": records}
    signal, distances = folder / "signal.json", folder / "distances.json"
    departure = folder / "departure.json"
    first = {m: plan.configs[(m, plan.seeds[0])] for m in plan.methods}
    results = {"name": folder.name, "config": {
        "model": plan.run_config["model"], "lab_steps": plan.run_config["lab_steps"],
        "steps": plan.run_config["steps"],
        "eval_mode": next(iter(plan.run_config["configs"].values()))["eval_mode"]},
        "tasks": names, "trained": list(range(len(plan.tasks))), "runs": by_method,
        "signal": json.loads(signal.read_text()) if signal.exists() else {},
        "distances": json.loads(distances.read_text()) if distances.exists() else {},
        "distances_from": plan.run_config.get("embedding_model") or "the base model itself",
        "relations": {a: {b: lab_families.relation(a, b) for b in names
                          if lab_families.relation(a, b)} for a in names[:len(plan.tasks)]},
        "finding": plan.finding and {"name": plan.finding, **FINDINGS[plan.finding]},
        "doses": {m: [c.misleading_kind, c.misleading_share] for m, c in first.items()
                  if c.loss_mode == "sdpo"},
        "departure": json.loads(departure.read_text()) if departure.exists() else {}}
    files.write_json(folder / "results.json", results)
    return results


if __name__ == "__main__":
    main()
