"""The verl bridge: the same settings as command lines for the official implementation
(`python -m verl.trainer.main_ppo`, one per method and stage), and the tasks as the parquet rows
verl reads. Option names as in ../shared ALGORITHMS.md §7 and the official actor.yaml."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import sdpo_cl as sc
from harness import lora
from harness.lab import LABS

LAB_NAMES = {name for spec in LABS.values() for name in spec.families}

VERL_KEYS = {   # this project's Config fields -> the official verl override keys
    "prompts_per_step": "data.train_batch_size",
    "group_size": "actor_rollout_ref.rollout.n",
    "ppo_epochs": "actor_rollout_ref.actor.ppo_epochs",
    "balance_batch": "trainer.balance_batch",
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
    "include_environment_feedback", "environment_feedback_only_without_solution",
    "max_reprompt_len")
SDPO_CL_KEYS = ("mask_ratio", "teacher_path", "teacher_init_alpha")   # the fork's, undeclared: +key
# The other fields the commands carry (verl_overrides, memory_overrides), and the run's seed.
MAPPED = set(VERL_KEYS) | set(SELF_DISTILLATION_KEYS) | set(SDPO_CL_KEYS) | {
    "loss_mode", "ppo_mini_batch_size", "steps_per_task", "loss_agg_mode", "eval_mode",
    "eval_samples", "kl_loss_coef", "lora_rank", "lora_alpha", "lora_target_modules",
    "optim_8bit", "teacher_bf16", "adam_betas", "gradient_checkpointing", "eval_every", "seed"}
# What verl cannot run as this project does: a command printed for it would be another method.
CANNOT = {
    "replay_fraction": "replay of earlier tasks' prompts: verl trains on one file per stage, "
                       "so that file would have to hold the earlier tasks' rows too (mix the "
                       "files --export-verl-data writes yourself)",
    "multitask": "every task mixed from the start: verl trains on one file; concatenate the "
                 "tasks' files instead",
    "distill_scope": "distilling only what follows the final-answer marker has no verl key",
    "distillation_weight": "the GRPO + SDPO hybrid: verl's loss is one or the other",
    "misleading_share": "the dose of misleading demonstrations (harness/dose.py) has no verl key",
}
# What verl runs otherwise, or does not need: printed as a note above the command.
NOTES = {
    "teacher_update_every": "StableSDPO's restart-and-freeze: verl moves the EMA every step",
    "teacher_regularization": "the live teacher is shown as an EMA at rate 1.0 (after each step "
                              "the teacher is the student: the same weights at scoring time)",
    "reset_teacher_each_task": "verl re-creates the EMA teacher from each stage's checkpoint; "
                               "carrying it over is not possible there",
    "lora_dropout": "verl's LoraConfig takes none (peft's default 0)",
    "eval_examples": "verl evaluates every row of data.val_files: export fewer test rows",
    "rollout_chunk_size": "memory only (the same numbers); verl's rollout engine batches itself",
    "micro_batch_size": "memory only (the same numbers); verl's micro-batch is set by the loss "
                        "averaging (ppo_micro_batch_size_per_gpu)",
    "share_teacher_prefix": "verl scores every teacher prompt in full, as share_teacher_prefix="
                            "False does: the same numbers",
    "bf16": "verl runs its actor in bf16 on the GPU",
    "answer_marker": "used only with distill_scope, which verl has no key for",
    "misleading_kind": "used only with misleading_share, which verl has no key for",
}


def verl_value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def memory_overrides(cfg: sc.Config) -> list:
    """LoRA and the memory savers as verl's keys: model.lora_rank, lora_alpha and target_modules
    (hf_model.yaml; verl builds peft's LoraConfig from them with bias 'none'); 8-bit AdamW as
    optim.optimizer from optim.optimizer_impl (optim/fsdp.yaml); the teacher in bf16 as the
    dtype of the reference model verl builds it as (ref.fsdp_config.model_dtype, fp32 by
    default). lora_dropout has no verl key (print_verl says so)."""
    out = []
    if cfg.lora_rank:
        targets = lora.target_modules(cfg)
        out += [f"actor_rollout_ref.model.lora_rank={cfg.lora_rank}",
                f"actor_rollout_ref.model.lora_alpha={verl_value(cfg.lora_alpha)}",
                "actor_rollout_ref.model.target_modules="
                + (targets if isinstance(targets, str) else f"[{','.join(targets)}]")]
    if cfg.optim_8bit:
        out += ["actor_rollout_ref.actor.optim.optimizer=AdamW8bit",
                "actor_rollout_ref.actor.optim.optimizer_impl=bitsandbytes.optim"]
    if cfg.teacher_bf16 and cfg.loss_mode == "sdpo":
        out.append("actor_rollout_ref.ref.fsdp_config.model_dtype=bf16")
    return out


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
    out += [f"actor_rollout_ref.actor.optim.betas=[{','.join(map(str, cfg.adam_betas))}]",
            "actor_rollout_ref.model.enable_gradient_checkpointing="
            f"{verl_value(cfg.gradient_checkpointing)}"]
    if cfg.eval_every:
        out.append(f"trainer.test_freq={cfg.eval_every}")
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
    out += memory_overrides(cfg)
    if data is not None:
        out += [f"data.train_files={data / 'train.parquet'}",
                f"data.val_files={data / 'test.parquet'}"]
    return out


def gaps(cfg: sc.Config) -> tuple:
    """(refusals, notes): every setting of cfg, other than its default, that no verl key carries:
    a refusal where verl would run another method (CANNOT, supervised fine-tuning, the KL
    anchor with SDPO), a note otherwise (NOTES, or that it is not passed on)."""
    default, refusals, notes = sc.Config(), [], []
    special = {"loss_mode", "kl_loss_coef", "teacher_regularization"}   # mapped, but not always
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if (value == getattr(default, f.name) or f.name in MAPPED - special
                or f.name == "teacher_regularization" and value != "live"
                or f.name == "reset_teacher_each_task" and cfg.teacher_update_rate == 0):
            continue        # a frozen teacher kept from the base is verl's teacher_path
        what = f"{f.name}={value!r}"
        if f.name in CANNOT:
            refusals.append(f"{what}: {CANNOT[f.name]}")
        elif f.name == "loss_mode" and value == "sft":
            refusals.append(f"{what}: verl's PPO trainer has no supervised loss (its SFT trainer "
                            "is another program, with its own settings)")
        elif f.name == "kl_loss_coef" and cfg.loss_mode == "sdpo":
            refusals.append(f"{what} with SDPO: verl refuses the KL loss beside the SDPO loss")
        elif f.name not in ("loss_mode", "kl_loss_coef"):
            notes.append(f"{what} has no verl key: {NOTES.get(f.name, 'not passed to verl')}")
    if cfg.lora_rank and cfg.loss_mode == "sdpo":
        notes.append("with LoRA, verl's teacher is a whole second model that carries an adapter "
                     "of its own; here it is a second adapter on the policy's base")
    return refusals, notes


def check_model(model: str):
    """A model verl can load: a hub id this machine resolves, or a folder with a config.json;
    not a lab (built by this code) nor a GGUF file. One error naming it, before any output."""
    from harness.models import offline_unless_reachable
    if model in LABS:
        raise ValueError(f"--print-verl --model {model}: verl cannot load a lab (this code builds "
                         f"it); give a hub id or a folder saved with save_pretrained")
    if model.endswith(".gguf"):
        raise ValueError(f"--print-verl --model {model!r}: verl loads a hub id or a folder, not "
                         f"a GGUF file; save the model with save_pretrained first")
    if Path(model).exists():
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"--print-verl --model {model!r}: no config.json in that folder")
        return
    offline_unless_reachable(f"the model {model!r}")
    try:
        from transformers import AutoConfig
        AutoConfig.from_pretrained(model)
    except Exception as e:
        raise ValueError(f"--print-verl --model {model!r}: no such model on the hub or in the "
                         f"local cache ({type(e).__name__}); give a hub id this machine can "
                         f"resolve, or a folder") from None


def print_verl(methods, configs, names, steps, model, data_dir=None):
    """One command per method and stage (a stage starts from the previous stage's checkpoint),
    each with a note for every setting verl runs otherwise; refused, before anything is printed,
    for a model verl cannot load or a method it cannot run (gaps)."""
    check_model(model)
    first = {m: next(c for (mm, _), c in configs.items() if mm == m) for m in methods}
    refused = [f"{m}: {'; '.join(gaps(cfg)[0] + gaps(cfg)[1])}" for m, cfg in first.items()
               if gaps(cfg)[0]]
    if refused:
        raise ValueError("--print-verl: verl cannot run these methods as this code does, and a "
                         "command for them would run another method: " + " | ".join(refused))
    for m, cfg in first.items():
        notes = gaps(cfg)[1]
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
                kind = ex.get("kind") or ("lab" if task.name in LAB_NAMES else "")
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
