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
import json
import os
import sys
import time
from pathlib import Path

import eval_forgetting as ef
import sdpo_cl as sc

def quarter_of_the_batch(settings):
    """The GRPO baseline's mini-batch: a quarter of the rollout batch (8 of 32 prompts), so four
    optimizer steps per rollout batch."""
    prompts = settings["prompts_per_step"]
    if prompts % 4:
        raise ValueError(f"the grpo method takes four optimizer steps per rollout batch, so "
                         f"prompts_per_step={prompts} must be a multiple of 4")
    return prompts // 4


# The methods of the paper and its variants: the Config values each one fixes (a function of the
# other settings where the official value is relative).
METHODS = {
    "grpo": dict(loss_mode="grpo", ppo_mini_batch_size=quarter_of_the_batch),
    "grpo_one_step": dict(loss_mode="grpo", ppo_mini_batch_size=0),   # SDPO's number of steps
    "sdpo": dict(loss_mode="sdpo"),                                    # official: EMA at 5%
    "sdpo_frozen": dict(loss_mode="sdpo", teacher_update_rate=0.0),    # the paper's SDPO_0
    "stable_sdpo": dict(loss_mode="sdpo", teacher_update_rate=0.0,     # restarted, then frozen
                        reset_teacher_each_task=True),
    "sdpo_live": dict(loss_mode="sdpo", teacher_regularization="live"),
    "sdpo_trust_region": dict(loss_mode="sdpo", teacher_regularization="trust-region"),
    "sdpo_mask50": dict(loss_mode="sdpo", mask_ratio=0.5),             # less dense supervision
    "hybrid": dict(loss_mode="sdpo", distillation_weight=0.5),         # (GRPO + SDPO) / 2
    "sdpo_ema50": dict(loss_mode="sdpo", teacher_update_rate=0.5),     # a fast-moving teacher
    "sdpo_frozen_answer": dict(loss_mode="sdpo", teacher_update_rate=0.0,
                               distill_scope="final_answer"),          # no chain of thought
    # remedies and reference points
    "replay": dict(loss_mode="sdpo", replay_fraction=0.25),
    "grpo_replay": dict(loss_mode="grpo", ppo_mini_batch_size=quarter_of_the_batch,
                        replay_fraction=0.25),
    "sdpo_kl": dict(loss_mode="sdpo", kl_loss_coef=0.1),
    "sft": dict(loss_mode="sft"),
    "multitask": dict(loss_mode="sdpo", multitask=True),
    "grpo_multitask": dict(loss_mode="grpo", ppo_mini_batch_size=quarter_of_the_batch,
                           multitask=True),
}
METHOD_HELP = {
    "grpo": "GRPO, the paper's baseline (no std normalisation, clip 0.2/0.28, no KL, four "
            "optimizer steps per rollout batch)",
    "grpo_one_step": "GRPO with one optimizer step per rollout batch, as SDPO takes (the paper's "
                     "baseline takes four)",
    "sdpo": "SDPO with the official defaults (EMA teacher, rate 0.05: the paper's SDPO_5%%)",
    "sdpo_frozen": "SDPO with a frozen teacher, the base model (the paper's SDPO_0)",
    "stable_sdpo": "SDPO whose teacher restarts from the policy at each task, then stays frozen",
    "sdpo_live": "SDPO whose teacher is the current student (no_grad)",
    "sdpo_trust_region": "SDPO with the trust-region teacher (logit lerp, rate 0.05)",
    "sdpo_mask50": "SDPO dropping 50%% of distilled tokens at random (mask_ratio=0.5)",
    "hybrid": "0.5 GRPO + 0.5 SDPO (distillation_weight=0.5)",
    "sdpo_ema50": "SDPO with a fast-moving EMA teacher (rate 0.5)",
    "sdpo_frozen_answer": "SDPO_0 distilling the final answer only, not the chain of thought",
    "replay": "SDPO with 25%% of each batch's prompts replayed from earlier tasks",
    "grpo_replay": "GRPO with 25%% replay",
    "sdpo_kl": "SDPO with a k3 KL anchor to the base model (kl_loss_coef=0.1)",
    "sft": "supervised fine-tuning on the gold answers, the same steps and prompts",
    "multitask": "SDPO on all tasks of the sequence mixed from the start (the upper bound)",
    "grpo_multitask": "GRPO on all tasks mixed from the start",
}

DEFAULTS = dict(methods="grpo,sdpo", seeds="0", tasks=",".join(sc.LAB_SEQUENCE),
                probes=",".join(sc.LAB_PROBES), steps=None, set=[])


def method_config(method, settings, overrides, make_config):
    """The Config of `method` on top of the run's settings. A value the method fixes may not be
    overridden with another one (--set): that would silently run a different method."""
    run_cfg = make_config(**settings)
    fixed = {}
    for key, value in METHODS[method].items():
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


RESERVED_SETTINGS = {"seed": "--seeds", "steps_per_task": "--steps", "model": "--model"}


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
    ap.add_argument("--finding", choices=list(ef.FINDINGS), help="run the preset that checks one "
                    "finding of the paper (methods, tasks, steps, seeds, evaluation schedule; "
                    "flags given too win) and write its report section: " + "; ".join(
                        f"{k}: the paper: {v['paper']}. Look at {v['look']}"
                        for k, v in ef.FINDINGS.items()))
    ap.add_argument("--methods", help="comma-separated (default grpo,sdpo), from: " + "; ".join(
        f"{k}: {v}" for k, v in METHOD_HELP.items()))
    ap.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    ap.add_argument("--tasks", help="the training sequence, in order (default "
                    f"{','.join(sc.LAB_SEQUENCE)})")
    ap.add_argument("--probes", help="held-out tasks, evaluated but never trained (default "
                    f"{','.join(sc.LAB_PROBES)})")
    ap.add_argument("--steps", default=None,
                    help="rollout batches per task: one number, or one per task (e.g. "
                         "50,50,50,20); default 15 on the lab, 50 on a real model")
    ap.add_argument("--model", default="lab", help="'lab' (the built-in tiny model, default), a "
                    "hub id, a local folder, or a .gguf file")
    ap.add_argument("--lab-steps", type=int, default=sc.LabRecipe.steps,
                    help="pre-training steps of the lab base model (%(default)s; fewer for a "
                    "smoke run: the base is cached per recipe)")
    ap.add_argument("--name", help="run folder name under --out (default: quick, or the "
                    "finding's name)")
    ap.add_argument("--out", default="runs", help="parent folder of runs (%(default)s)")
    ap.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                    help="override a Config field, e.g. --set alpha=1.0 distillation_topk=null "
                    "(seed, steps_per_task and model have their own flags)")
    ap.add_argument("--print-verl", action="store_true", help="print the equivalent command "
                    "lines for the official verl implementation (one per method and stage), "
                    "then exit")
    ap.add_argument("--long-prompts", choices=("error", "drop", "truncate"), default="error",
                    help="prompts that do not fit the model's context with the generation "
                    "budget: an error before anything runs (default), dropped, or cut")
    ap.add_argument("--export-verl-data", metavar="DIR", help="write each task's train and test "
                    "split as the parquet files verl reads (DIR/<task>/{train,test}.parquet), "
                    "then exit; with --print-verl the commands point to them")
    return ap


# --- the verl bridge: the same settings as command lines for the official implementation -------

VERL_KEYS = {   # this project's Config fields -> the official verl override keys
    "prompts_per_step": "data.train_batch_size",
    "group_size": "actor_rollout_ref.rollout.n",
    "ppo_epochs": "actor_rollout_ref.actor.ppo_epochs",
    "max_new_tokens": "data.max_response_length",
    "temperature": "actor_rollout_ref.rollout.temperature",
    "lr": "actor_rollout_ref.actor.optim.lr",
    "warmup_steps": "actor_rollout_ref.actor.optim.lr_warmup_steps",
    "weight_decay": "actor_rollout_ref.actor.optim.weight_decay",
    "grad_clip": "actor_rollout_ref.actor.grad_clip",
    "norm_adv_by_std_in_grpo": "algorithm.norm_adv_by_std_in_grpo",
    "clip_ratio_low": "actor_rollout_ref.actor.clip_ratio_low",
    "clip_ratio_high": "actor_rollout_ref.actor.clip_ratio_high",
    "clip_ratio_c": "actor_rollout_ref.actor.clip_ratio_c",
    "enable_thinking": "data.apply_chat_template_kwargs.enable_thinking",
    "eval_temperature": "actor_rollout_ref.rollout.val_kwargs.temperature",
    "eval_top_p": "actor_rollout_ref.rollout.val_kwargs.top_p",
}
SELF_DISTILLATION_KEYS = (   # declared in the official actor config (SDPO's verl, actor.yaml)
    "alpha", "full_logit_distillation", "distillation_topk", "distillation_add_tail", "is_clip",
    "success_reward_threshold", "teacher_regularization", "teacher_update_rate",
    "dont_reprompt_on_self_success", "remove_thinking_from_demonstration",
    "include_environment_feedback", "environment_feedback_only_without_solution")
SDPO_CL_KEYS = ("mask_ratio", "teacher_path", "teacher_init_alpha")   # SDPO-CL's, undeclared: +key


def verl_value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def verl_overrides(cfg: sc.Config, model_path: str, steps: int, stage: int, base_model: str,
                   data=None) -> list:
    """key=value overrides for `python -m verl.trainer.main_ppo` equivalent to `cfg` at stage
    `stage` (1-based) of a sequence that starts from `base_model`."""
    sd = "actor_rollout_ref.actor.self_distillation."
    out = [f"actor_rollout_ref.model.path={model_path}", "algorithm.adv_estimator=grpo",
           "actor_rollout_ref.actor.ppo_mini_batch_size="
           f"{cfg.ppo_mini_batch_size or cfg.prompts_per_step}",
           "actor_rollout_ref.actor.policy_loss.loss_mode="
           + ("sdpo" if cfg.loss_mode == "sdpo" else "vanilla"),
           f"trainer.total_training_steps={steps}"]
    out += [f"{key}={verl_value(getattr(cfg, name))}" for name, key in VERL_KEYS.items()]
    if cfg.loss_agg_mode == "micro1-token-mean":   # verl's token-mean, one sequence at a time
        out += ["actor_rollout_ref.actor.loss_agg_mode=token-mean",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                "actor_rollout_ref.actor.use_dynamic_bsz=false"]
    else:
        out.append(f"actor_rollout_ref.actor.loss_agg_mode={cfg.loss_agg_mode}")
    sample = cfg.eval_mode == "sample"
    out += [f"actor_rollout_ref.rollout.val_kwargs.do_sample={verl_value(sample)}",
            f"actor_rollout_ref.rollout.val_kwargs.n={cfg.eval_samples if sample else 1}"]
    if cfg.kl_loss_coef > 0:
        out += ["actor_rollout_ref.actor.use_kl_loss=true",
                "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
                f"actor_rollout_ref.actor.kl_loss_coef={cfg.kl_loss_coef}"]
    else:
        out.append("actor_rollout_ref.actor.use_kl_loss=false")
    if cfg.loss_mode == "sdpo":
        kind = cfg.teacher_regularization
        # frozen = ema at rate 0 in verl; live has no verl key (ema at rate 1 comes closest)
        values = {"teacher_regularization": "ema" if kind in ("frozen", "live") else kind,
                  "teacher_update_rate": {"frozen": 0.0, "live": 1.0}.get(
                      kind, cfg.teacher_update_rate)}
        out += [f"{sd}{name}={verl_value(values.get(name, getattr(cfg, name)))}"
                for name in SELF_DISTILLATION_KEYS]
        teacher_path = cfg.teacher_path
        frozen = values["teacher_update_rate"] == 0 and not cfg.reset_teacher_each_task
        if frozen and stage > 1 and teacher_path is None:
            teacher_path = base_model   # each verl run re-creates its teacher from model.path
        for name in SDPO_CL_KEYS:
            value = teacher_path if name == "teacher_path" else getattr(cfg, name)
            if value != dataclasses.asdict(sc.Config())[name]:
                out.append(f"+{sd}{name}={verl_value(value)}")
    if data is not None:
        out += [f"data.train_files={data / 'train.parquet'}",
                f"data.val_files={data / 'test.parquet'}"]
    return out


def print_verl(methods, configs, names, steps, model, data_dir=None):
    """One command per method and stage; a stage starts from the previous stage's checkpoint."""
    for m in methods:
        cfg = next(c for (mm, _), c in configs.items() if mm == m)
        notes = []
        if cfg.loss_mode == "sdpo" and cfg.distillation_weight < 1:
            notes.append(f"distillation_weight={cfg.distillation_weight} (the GRPO+SDPO hybrid) "
                         "has no verl key; verl runs pure SDPO")
        if cfg.teacher_regularization == "live":
            notes.append("the live teacher has no verl key; shown as ema at rate 1.0")
        if cfg.loss_mode == "sdpo" and cfg.teacher_update_rate > 0 and len(names) > 1:
            notes.append("verl re-creates the EMA teacher from each stage's starting checkpoint; "
                         "this project carries it over (set reset_teacher_each_task for verl's)")
        print(f"# {m}" + "".join(f"\n# note: {n}" for n in notes))
        for k, (name, n_steps) in enumerate(zip(names, steps), 1):
            path = model if k == 1 else f"<checkpoint of stage {k - 1}>"
            data = Path(data_dir) / Path(name).name if data_dir else None
            config_name = "sdpo" if cfg.loss_mode == "sdpo" else "baseline_grpo"
            print(f"# stage {k}: {name}" + ("" if data else " (data: add --export-verl-data DIR)"))
            print(f"python -m verl.trainer.main_ppo --config-name {config_name} \\\n    "
                  + " \\\n    ".join(verl_overrides(cfg, path, n_steps, k, model, data)))
        print()


def export_verl_data(tasks, out_dir) -> list:
    """Each task's train and test split as the parquet rows verl's RL dataset reads: the prompt
    as a chat message list, data_source, ability, reward_model {style, ground_truth} and
    extra_info. Returns the files written."""
    from datasets import Dataset
    written = []
    for task in tasks:
        folder = Path(out_dir) / task.name
        folder.mkdir(parents=True, exist_ok=True)
        for split, data in (("train", task.train), ("test", task.test)):
            rows = []
            for i, ex in enumerate(data):
                kind = ex.get("kind") or ("lab" if task.name in sc.LAB_FAMILIES else "")
                messages = ([{"role": "system", "content": ex["system"]}]
                            if ex.get("system") else []) + [{"role": "user",
                                                             "content": ex["prompt"]}]
                truth = ex["tests"] if kind == "code" else ex["answer"]
                rows.append({"data_source": ex.get("dataset") or kind or task.name,
                             "prompt": messages, "ability": kind,
                             "reward_model": {"style": kind, "ground_truth": truth},
                             "extra_info": {"split": split, "index": str(i),
                                            "problem": ex["prompt"]}})
            path = folder / f"{split}.parquet"
            Dataset.from_list(rows).to_parquet(str(path))
            written.append(path)
    return written


def plan_run(args) -> dict | None:
    """Every check that can fail, before any training and any write: flags, settings, tasks,
    the model, prompt lengths. Returns what the run needs, or None after --print-verl or
    --export-verl-data (which do their work here and stop)."""
    methods = parse_list("--methods", args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; allowed: "
                         f"{', '.join(METHODS)}")
    seeds = parse_list("--seeds", args.seeds, int)
    names = parse_list("--tasks", args.tasks)
    probe_names = parse_list("--probes", args.probes, allow_empty=True)
    # the lab has its scaled-down settings; a real model starts from the official ones
    make_config = sc.lab_config if args.model == "lab" else sc.Config
    steps = parse_list("--steps", args.steps or str(make_config().steps_per_task), int)
    if len(steps) not in (1, len(names)) or min(steps) < 1:
        raise ValueError(f"--steps {args.steps!r}: give one positive number or one per task "
                         f"({len(names)} tasks)")
    steps = steps * len(names) if len(steps) == 1 else steps
    sets = parse_sets(args.set)
    configs = {(m, s): method_config(m, {"model": args.model, **sets, "seed": s,
                                         "steps_per_task": steps[0]}, sets, make_config)
               for m in methods for s in seeds}
    tasks = [sc.load_task(n) for n in names]
    probes = [sc.load_task(n) for n in probe_names if n not in names]
    if args.export_verl_data:
        for path in export_verl_data(tasks + probes, args.export_verl_data):
            print(f"wrote {path}")
    if args.print_verl:
        print_verl(methods, configs, names, steps, args.model, args.export_verl_data)
    if args.print_verl or args.export_verl_data:
        return None
    device = sc.device_of(next(iter(configs.values())))
    base, tokenizer = sc.load_policy(args.model, device, sc.LabRecipe(steps=args.lab_steps))
    any_sdpo = any(c.loss_mode == "sdpo" for c in configs.values())
    for i, task in enumerate(tasks + probes):
        note = sc.fit_prompts(task, tokenizer, base, next(iter(configs.values())),
                              with_teacher=any_sdpo and i < len(tasks), policy=args.long_prompts)
        if note:
            print(note)
    run_config = {"methods": methods, "seeds": seeds, "tasks": names,
                  "probes": [p.name for p in probes], "steps": steps, "model": args.model,
                  "lab_steps": args.lab_steps, "set": sets,
                  "configs": {f"{m}/seed{s}": dataclasses.asdict(c)
                              for (m, s), c in configs.items()}}
    return dict(methods=methods, seeds=seeds, names=names, steps=steps, configs=configs,
                finding=args.finding,
                tasks=tasks, probes=probes, base=base, tokenizer=tokenizer, device=device,
                run_config=json.loads(json.dumps(run_config)))


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


class RunLock:
    """One writer per run folder: a lock file holding the owner's pid. A second process is
    refused; a lock left by a process that no longer runs is taken over, with a note."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    owner = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and process_alive(owner):
                    raise ValueError(f"run folder {self.path.parent} is in use by process "
                                     f"{owner}; wait for it to finish or stop it (a second "
                                     f"writer would corrupt the run)") from None
                print(f"note: taking over the lock of process {owner or '?'}, which no longer "
                      f"runs")
                self.path.unlink(missing_ok=True)
        raise ValueError(f"could not lock run folder {self.path.parent}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv=None):
    t_start = time.time()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()              # no bars for every checkpoint save and load
    ap = build_parser()
    args = ap.parse_args(argv)
    preset, given_sets = ef.FINDINGS.get(args.finding, {}), args.set
    for key, value in DEFAULTS.items():       # a flag given wins over the preset's value
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, value))
    if given_sets is not None:                # --set adds to the preset's (and wins)
        args.set = preset.get("set", []) + given_sets
    args.name = args.name or args.finding or "quick"
    try:
        plan = plan_run(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        ap.error(str(e))
    if plan is None:
        return None
    folder = Path(args.out) / args.name
    try:
        with RunLock(folder):
            return run(plan, folder, t_start)
    except ValueError as e:                        # the folder is in use or holds another run
        ap.error(str(e))
    except KeyboardInterrupt:
        m, s, sub = plan.get("now", (None, None, None))
        done = sc.last_finished_stage(sub)
        where = ("while evaluating the base model" if m is None else
                 f"during {m} seed {s} " + (f"after stage {done}" if done >= 0 else
                                            "before its first stage"))
        print(f"\ninterrupted {where}; run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:
        print(f"\nstopped: {e}\nEvery finished stage is kept; change the settings (a smaller "
              f"lr, say) and start a new run, or fix the cause and resume.", file=sys.stderr)
        sys.exit(1)


def run(plan, folder, t_start) -> dict:
    """The run itself: config.json, row 0, methods x seeds (resuming finished stages), the
    report."""
    methods, seeds, tasks, probes = plan["methods"], plan["seeds"], plan["tasks"], plan["probes"]
    base, tokenizer, configs, run_config = (plan["base"], plan["tokenizer"], plan["configs"],
                                            plan["run_config"])
    if (folder / "config.json").exists():
        try:
            old = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"run folder {folder} has a damaged config.json ({e}); delete the "
                             f"folder to start over, or choose another --name") from None
        if old != run_config:
            raise ValueError(f"run folder {folder} holds a run with other settings ("
                             f"{settings_difference(old, run_config)}); choose another --name "
                             f"or delete the folder to start over")
    write_json(folder / "config.json", run_config)
    print(f"model {run_config['model']} on {plan['device']}; sequence "
          f"{' -> '.join(plan['names'])}; probes {', '.join(p.name for p in probes) or 'none'}; "
          f"steps {plan['steps']}; methods {', '.join(methods)}; seeds {seeds}")
    print(f"base model: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters "
          f"(ready in {time.time() - t_start:.0f}s)")

    def done_stages(m, s):
        return sc.last_finished_stage(folder / m / f"seed{s}", on_damage=lambda k, problem: print(
            f"{m} seed {s}: stage {k} is damaged ({problem}); it is recomputed"))

    # --- row 0: the base model, once for every method and seed ------------------------------------
    base_eval = None
    if any(done_stages(m, s) < 0 for m in methods for s in seeds):
        t0 = time.time()
        base_eval = sc.base_evaluation(base, tokenizer, tasks + probes,
                                       next(iter(configs.values())))
        record = base_eval["record"]
        print(f"base model, accuracy ± standard error / teacher lift (points), "
              f"{time.time() - t0:.0f}s: " + ", ".join(
                  f"{k} {100 * record['accuracy'][k]:.0f}±{100 * record['stderr'][k]:.0f}"
                  f"/{100 * record['teacher_lift'][k]:+.0f}" for k in record["accuracy"]))
        write_json(folder / "signal.json", signal_check(base, tokenizer, tasks, record,
                                                        next(iter(configs.values()))))

    # --- methods x seeds --------------------------------------------------------------------------
    log_path = folder / "log.jsonl"
    try:
        for m in methods:
            for s in seeds:
                plan["now"] = (m, s, folder / m / f"seed{s}")   # for the Ctrl-C message
                run_one(plan, folder, m, s, done_stages(m, s), base_eval, log_path)
    finally:    # also after a fault: results.json holds every finished stage, as strict JSON
        results = write_results(folder, folder.name, run_config, methods, seeds, tasks, probes)

    # --- summary ----------------------------------------------------------------------------------
    finding = plan["finding"] and {"name": plan["finding"], **ef.FINDINGS[plan["finding"]]}
    ef.write_report(results, folder, finding=finding)
    print("\n" + ef.comparison_table(results))
    paired = ef.paired_table(results)
    if paired:
        print("\npaired differences against grpo (points, 95% interval):\n" + paired)
    for m in methods:
        print(f"\n{m}:\n" + ef.accuracy_table(results, m))
    print(f"\nwall time {time.time() - t_start:.0f}s; report: {folder / 'report.md'}")
    return results


def signal_check(base, tokenizer, tasks, base_record, cfg) -> dict:
    """Before any training: per trained task, the base model's reward at the training
    temperature, the share of groups with a success (SDPO's demonstrations) and of groups
    whose rewards are all equal (no GRPO advantage), and the teacher lift (already measured
    with the base row); a warning where a method will have almost no signal."""
    out = {}
    for task in tasks:
        sc.seed_everything("signal", task.name)
        signal = sc.rollout_signal(base, tokenizer, task, cfg)
        signal["teacher_lift"] = base_record["teacher_lift"][task.name]
        warnings = sc.signal_warnings(signal)
        out[task.name] = {**signal, "warnings": warnings}
        print(f"signal check, {task.name}: reward at temperature {cfg.temperature:g} "
              f"{signal['reward']:.2f}, groups with a success {100 * signal['solved_groups']:.0f}%"
              f", all alike {100 * signal['zero_adv_groups']:.0f}%, teacher lift "
              f"{100 * signal['teacher_lift']:+.0f} points"
              + "".join(f"\n  WARNING: {w}" for w in warnings))
    return out


def run_one(plan, folder, m, s, done, base_eval, log_path):
    """One method and seed through the whole sequence, resuming after stage `done`."""
    tasks, probes, cfg = plan["tasks"], plan["probes"], plan["configs"][(m, s)]
    if done == len(tasks):
        print(f"{m} seed {s}: finished earlier, kept")
        return
    if done >= 0:
        print(f"resuming {m}/seed{s} after stage {done}")
    keep_log_lines(log_path, lambda r: not (r["method"] == m and r["seed"] == s
                                            and r["stage"] > done))
    with open(log_path, "a") as log_file:
        def log(metrics, m=m, s=s, f=log_file):
            f.write(json.dumps(sc.strict_json({"method": m, "seed": s, **metrics})) + "\n")
            f.flush()
        policy = copy.deepcopy(plan["base"])
        t0 = time.time()
        records = sc.continual_sequence(cfg, policy, plan["tokenizer"], tasks, probes,
                                        steps=plan["steps"], folder=folder / m / f"seed{s}",
                                        log=log, desc=f"{m} seed {s}", base_eval=base_eval)
    gains = [records[k + 1]["accuracy"][t.name] - records[k]["accuracy"][t.name]
             for k, t in enumerate(tasks)]
    print(f"{m} seed {s}: {time.time() - t0:.0f}s; own-stage gain (points) " + ", ".join(
        f"{t.name} {100 * g:+.0f}" for t, g in zip(tasks, gains)) + "; final accuracy "
        + ", ".join(f"{k} {100 * v:.0f}" for k, v in records[-1]["accuracy"].items()))


def write_json(path: Path, obj):
    """Strict JSON (no bare NaN), written atomically."""
    sc.atomic_write(path, json.dumps(sc.strict_json(obj), indent=1, allow_nan=False))


def keep_log_lines(path: Path, keep):
    """Drop the log lines of stages that will be run again (an interrupted stage)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if keep(json.loads(line))]
    if len(kept) != len(lines):
        sc.atomic_write(path, "".join(line + "\n" for line in kept))


def write_results(folder, name, run_config, methods, seeds, tasks, probes) -> dict:
    """results.json from the finished stages on disk: the accuracy matrix R (and its standard
    errors SE) and the stage records of every method and seed (unfinished runs show the stages
    they have)."""
    names = [t.name for t in tasks] + [p.name for p in probes]
    runs = {}
    for m in methods:
        for s in seeds:
            sub = folder / m / f"seed{s}"
            records = [json.loads((sub / f"stage{k}" / "stage.json").read_text())
                       for k in range(sc.last_finished_stage(sub) + 1)]
            runs.setdefault(m, {})[str(s)] = {
                "R": [[r["accuracy"][n] for n in names] for r in records],
                "SE": [[r["stderr"][n] for n in names] for r in records], "records": records}
    signal = folder / "signal.json"
    results = {"name": name, "config": {"model": run_config["model"],
               "steps": run_config["steps"], "eval_mode": next(iter(
                   run_config["configs"].values()))["eval_mode"]}, "tasks": names,
               "trained": list(range(len(tasks))), "runs": runs,
               "signal": json.loads(signal.read_text()) if signal.exists() else {}}
    write_json(folder / "results.json", results)
    return results


if __name__ == "__main__":
    main()
