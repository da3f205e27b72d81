"""bench_step.py: speed, memory and loss identity of this project's GRPO and SDPO.

    pip install trl==1.16.0                  # benchmark-only; not in requirements.txt
    python benchmarks/bench_step.py          # CPU, the lab model (the shipped lab base)
    python benchmarks/bench_step.py --model path/to/model.gguf --prompts 4 --group 4
    python benchmarks/bench_step.py --experiment   # also time `python run_sequence.py`
    python benchmarks/bench_step.py --memory-rule  # the memory rule for every option (computed)
    python benchmarks/bench_step.py --shape qwen3-0.6b --lora 32   # a step at a real size

Prints one table and exits non-zero if any loss differs from TRL's by more than 1e-5.
1. Loss identity: `sdpo_loss` vs TRL's self-distillation helpers (trl.experimental.sdpo.
   loss_utils) on the same logits; `grpo_loss` vs TRL's per-token GRPO formula.
2. Seconds per training step (median after warm-up) and its split, and TRL's GRPOTrainer and
   SDPOTrainer at matched settings; the floor (generate, one
   forward+backward+AdamW step of the policy, and for SDPO one no-grad teacher forward, at the
   same shapes); the ratio step / floor.
3. Peak memory of sdpo_loss forward+backward, top-100 vs the full vocabulary, at V = 49,152.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdpo_cl as sc  # noqa: E402
from harness import lab, lora  # noqa: E402
from harness.loading import load_policy, load_task  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")          # e.g. the GGUF loader's bar, mid-table
TOLERANCE = 1e-5


def quiet():
    """Keep library warnings and TRL's per-run log dicts out of the printed table."""
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)


# --- 1. loss identity -------------------------------------------------------------------------

def trl_sdpo(student, teacher, ids, mask, old, *, alpha, topk, add_tail, full, is_clip):
    """TRL's per-token self-distillation loss, IS clip and token-mean (as its trainer does)."""
    from trl.experimental.sdpo import loss_utils as L
    if not full:
        per_token = L.compute_sampled_token_self_distillation_loss(
            student, teacher, ids, distillation_alpha=alpha)
    elif topk is None:
        per_token = L.compute_full_logit_self_distillation_loss(student, teacher,
                                                                distillation_alpha=alpha)
    else:
        per_token = L.compute_topk_self_distillation_loss(
            student, teacher, distillation_topk=topk, distillation_alpha=alpha,
            distillation_add_tail=add_tail)
    logp = torch.log_softmax(student, -1).gather(-1, ids[..., None]).squeeze(-1)
    per_token = L.apply_importance_sampling_clipping(per_token, logp, old, is_clip)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def trl_grpo_per_token(logp, old, adv, ref, *, eps_low, eps_high, beta):
    """The per-token loss of TRL's GRPOTrainer (no dual clip in TRL), token-mean."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    return per_token


def loss_identity() -> list:
    torch.manual_seed(0)
    B, T, V = 4, 7, 300
    student, teacher = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.2).float()
    logp = torch.log_softmax(student, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T)                 # off-policy, so the IS clip matters
    rows = []
    cases = [("full", None, True, True), ("top-k + tail", 20, True, True),
             ("top-k renormalised", 20, False, True), ("sampled token", None, True, False)]
    for name, topk, tail, full in cases:
        for alpha in ((1.0,) if not full else (0.0, 0.5, 1.0)):
            ours, _ = sc.sdpo_loss(student, teacher, ids, mask, old_logprobs=old, alpha=alpha,
                                   topk=topk, add_tail=tail, full_logits=full, is_clip=2.0)
            theirs = trl_sdpo(student, teacher, ids, mask, old, alpha=alpha, topk=topk,
                              add_tail=tail, full=full, is_clip=2.0)
            rows.append((f"sdpo {name}, alpha={alpha}", abs(ours - theirs).item()))
    adv = torch.randn(B)
    ref = logp + 0.2 * torch.randn(B, T)
    for beta in (0.0, 0.04):
        ours, _ = sc.grpo_loss(logp, old, adv, mask, dual_clip=None, ref_logprobs=ref, beta=beta)
        theirs = sc.aggregate(trl_grpo_per_token(logp, old, adv, ref, eps_low=0.2,
                                                 eps_high=0.28, beta=beta), mask)
        rows.append((f"grpo, beta={beta}", abs(ours - theirs).item()))
    return rows


# --- 2. step time, its split, and the floor -----------------------------------------------------

def time_steps(model, tok, task, cfg, n_warmup=2, n=8) -> dict:
    import copy
    policy = copy.deepcopy(model)
    teacher = sc.Teacher(policy, cfg) if cfg.loss_mode == "sdpo" else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, fused=True)   # as train_task
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    policy.train()
    out = []
    for i in range(n_warmup + n):
        ex = [task.train[(i * cfg.prompts_per_step + j) % len(task.train)]
              for j in range(cfg.prompts_per_step)]
        m = sc.train_step(policy, tok, teacher, opt, sched, task, ex, cfg)
        if i >= n_warmup:
            out.append(m)
    med = lambda k: statistics.median(m[k] for m in out)
    return {"step": med("seconds"), "rollout": med("t_rollout"), "teacher": med("t_teacher"),
            "rest": med("seconds") - med("t_rollout") - med("t_teacher"),
            "distill_frac": statistics.mean(m.get("distill_frac", 0) for m in out),
            "reward": statistics.mean(m["reward"] for m in out),
            "length": statistics.mean(m["response_length"] for m in out)}


def time_floor(model, tok, task, cfg, teacher_too, n_warmup=2, n=8) -> float:
    """generate + one forward/backward/AdamW step over the same sequences (+ a no-grad forward
    of the teacher over sequences as long as the teacher contexts)."""
    import copy
    policy = copy.deepcopy(model)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, fused=True)
    times = []
    for i in range(n_warmup + n):
        ex = [task.train[(i * cfg.prompts_per_step + j) % len(task.train)]
              for j in range(cfg.prompts_per_step)]
        texts = [sc.format_prompt(tok, e["prompt"]) for e in ex]
        ids, attn = sc.tokenize_prompts(tok, texts, policy.device)
        t0 = time.time()
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                  max_new_tokens=sc.generation_budget(cfg, task), top_k=0,
                                  num_return_sequences=cfg.group_size,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        T = out.shape[1] - ids.shape[1]
        loss = policy(input_ids=out, logits_to_keep=T + 1).logits.float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if teacher_too:
            demo = [sc.format_prompt(tok, sc.teacher_prompt(e["prompt"], cfg, e["answer"]))
                    for e in ex]
            t_ids, _ = sc.tokenize_prompts(tok, demo, policy.device)
            t_ids = t_ids.repeat_interleave(cfg.group_size, 0)
            with torch.no_grad():
                policy(input_ids=torch.cat([t_ids, out[:, ids.shape[1]:]], 1),
                       logits_to_keep=T + 1)
        if i >= n_warmup:
            times.append(time.time() - t0)
    return statistics.median(times)


def time_trl(model, tok, task, mode, batch, group, budget, lr, bf16=False, n_warmup=2,
             n=8) -> dict:
    """Median seconds per step of TRL's GRPOTrainer / SDPOTrainer at the same model, batch,
    group, budget, learning rate and loss settings (token-mean, no std scaling, clip
    0.2/0.28, no KL; SDPO: top-20 with tail, alpha 0.5, IS clip 2, EMA teacher at 0.05).
    Gradient checkpointing (on by default in TRL) is turned off, as here. TRL's bf16 (also on by
    default) autocasts on the CPU too, while this project uses bf16 only on CUDA: both sides run
    fp32 unless --bf16 puts both under bf16 autocast."""
    import copy
    import tempfile

    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": e["prompt"]}],
                               "answer": e["answer"]} for e in task.train])

    def reward(completions, answer, **_):
        return [task.reward(c[0]["content"], {"answer": a}) for c, a in zip(completions, answer)]

    times, step_logs = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.time()

        def on_step_end(self, *_, **__):
            times.append(time.time() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                step_logs.append(dict(logs))

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch,
                  num_generations=group, max_completion_length=budget,
                  loss_type="dapo", scale_rewards="none",
                  epsilon=0.2, epsilon_high=0.28, beta=0.0, learning_rate=lr, use_cpu=True,
                  max_steps=n_warmup + n, save_strategy="no", logging_steps=1,
                  report_to="none", temperature=1.0, top_k=0, disable_tqdm=True,
                  gradient_checkpointing=False, bf16=bf16)
    if mode == "grpo":
        trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=reward,
                              args=GRPOConfig(**common), train_dataset=data,
                              processing_class=tok)
    else:
        args = SDPOConfig(**common, distillation_mode="topk_logits", distillation_topk=20,
                          distillation_add_tail=True, distillation_alpha=0.5,
                          distillation_is_clip=2.0, teacher_model_kind="ema",
                          teacher_update_rate=0.05)
        trainer = SDPOTrainer(model=copy.deepcopy(model), reward_funcs=reward, args=args,
                              train_dataset=data, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    # Added last, so that its on_step_end runs after TRL's own callbacks: SDPOTrainer moves its
    # EMA teacher in an on_step_end callback, which is part of the step (and of ours).
    trainer.add_callback(Timer())
    trainer.train()
    timed = step_logs[n_warmup:]
    return {"step": statistics.median(times[n_warmup:]),
            "length": statistics.mean(g["completions/mean_length"] for g in timed),
            "reward": statistics.mean(g.get("reward", g.get("self_distillation/reward_mean", 0))
                                      for g in timed),
            "distilled": statistics.mean(g.get("self_distillation/reprompt_sample_fraction", 0)
                                         for g in timed)}


# --- 3. peak memory -----------------------------------------------------------------------------

# Peak resident memory from VmHWM, which starts anew with the process's own address space
# (ru_maxrss would carry over the parent's high-water mark through fork).
MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from sdpo_cl import sdpo_loss
from harness import lab
import run_sequence
def hwm_kib():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
B, T, V = 16, 64, 49152
topk = None if {topk!r} == 'full' else int({topk!r})
torch.manual_seed(0)
s = torch.randn(B, T, V, requires_grad=True); t = torch.randn(B, T, V)
ids = torch.randint(0, V, (B, T)); mask = torch.ones(B, T)
base = hwm_kib()
loss, _ = sdpo_loss(s, t, ids, mask, topk=topk); loss.backward()
print((hwm_kib() - base) / 1024)
"""


def peak_memory_mib(topk) -> float:
    code = MEMORY_PROBE.format(root=str(Path(__file__).resolve().parents[1]), topk=str(topk))
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.strip())


def time_experiment() -> float:
    """Wall time of the quick experiment (`python run_sequence.py`) in a fresh run folder."""
    import shutil
    import tempfile
    root = Path(__file__).resolve().parents[1]
    out = tempfile.mkdtemp()
    t0 = time.time()
    subprocess.run([sys.executable, str(root / "run_sequence.py"), "--out", out], check=True,
                   capture_output=True)
    shutil.rmtree(out, ignore_errors=True)
    return time.time() - t0


def sums_task(n_train=400, n_test=40, seed=0) -> sc.Task:
    """For a real small instruct model: single-digit sums asked in words, scored by the last
    number in the answer (GSM8K's convention). SmolLM2-135M-Instruct gets about a quarter of them
    (the lab's "21+4=" none), so GRPO has a signal and SDPO has demonstrations to distil."""
    import random

    from datasets import Dataset
    rng = random.Random(seed)

    def rows(n):
        pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)]
        return Dataset.from_list([{"prompt": f"What is {a} plus {b}? Answer with a number.",
                                   "answer": str(a + b)} for a, b in pairs])
    return sc.Task("sums", rows(n_train), rows(n_test), last_number_reward)


def last_number_reward(completion, example) -> float:
    """The last number in the completion equals the answer (a sentence answer scores)."""
    found = re.findall(r"-?\d+", completion)
    return float(bool(found) and found[-1] == example["answer"])


# --- 4. real sizes: Qwen-shaped models with random weights ---------------------------------------
# Speed and memory do not depend on the weights, so a model built from a published architecture
# with random weights costs what the real one costs per step. The shapes below are the published
# configurations (layers, widths, heads, key-value heads, vocabulary; tied embeddings).

SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728,     # the paper's
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128),
}
QWEN_VOCAB = 151936


def shape_tokenizer(vocab=QWEN_VOCAB):
    """A word-level tokenizer whose every id is a word "t<id>", so random answers decode and
    re-encode to exactly the same ids (and lengths) when the teacher prompt is built from them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")      # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")


def shape_model(name, device):
    """A randomly initialised model of the named architecture, fp32, on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    spec = dict(SHAPES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=QWEN_VOCAB,
                                  tie_word_embeddings=True, max_position_embeddings=8192,
                                  rope_theta=1e6, pad_token_id=0, eos_token_id=1, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# --- 4b. the memory rule: what a training step holds before activations, for every option --------

def shape_sizes(name, lora_rank=0) -> tuple:
    """(parameters, LoRA adapter parameters at lora_rank on every linear layer but the output
    head, peft's 'all-linear'), counted on the meta device: nothing is allocated."""
    model = shape_model(name, "meta")
    linear = [m for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    return (sum(p.numel() for p in model.parameters()),
            lora_rank * sum(m.in_features + m.out_features for m in linear))


def memory_rule(n, adapter, method, *, with_lora=False, optim_8bit=False, teacher_bf16=False,
                device="cuda", sequence=False) -> float:
    """Bytes held before activations, for n model parameters and `adapter` LoRA parameters. The
    trained weights (all n, or the adapter) take 4 bytes each in fp32, their gradients 4 and
    AdamW's two moments 8 (2 with bitsandbytes' 8-bit AdamW); a LoRA policy's frozen base takes 2
    (bf16, on CUDA) or 4 (fp32, on the CPU); SDPO's teacher is a copy of the trained weights, 4 a
    weight (2 in bf16): a model, or an adapter. sequence: continual_sequence also keeps the
    frozen start for the KL anchor and the drift measures, a copy (4 bytes a weight) with full
    fine-tuning, nothing with LoRA (the bare base)."""
    trained = adapter if with_lora else n
    total = trained * (4 + 4 + (2 if optim_8bit else 8))
    if with_lora:
        total += n * (2 if device == "cuda" else 4)
    if method == "sdpo":
        total += trained * (2 if teacher_bf16 else 4)
    if sequence and not with_lora:
        total += 4 * n
    return total


MEMORY_OPTIONS = [   # (label, options) of the memory table
    ("full", {}), ("full, 8-bit AdamW", dict(optim_8bit=True)),
    ("full, bf16 teacher", dict(teacher_bf16=True)),
    ("full, 8-bit AdamW, bf16 teacher", dict(optim_8bit=True, teacher_bf16=True)),
    ("LoRA r=32", dict(with_lora=True)),
    ("LoRA r=32, 8-bit AdamW", dict(with_lora=True, optim_8bit=True)),
]


def memory_table(device="cuda", rank=32) -> str:
    """The rule for every shape, method and option (GiB, before activations; computed, not
    measured): a training step alone, and in continual_sequence (its frozen start too)."""
    lines = ["| shape | parameters | method | options | step GiB | sequence GiB |",
             "|---|---|---|---|---|---|"]
    for name in SHAPES:
        n, adapter = shape_sizes(name, rank)
        for method in ("grpo", "sdpo"):
            for label, options in MEMORY_OPTIONS:
                if method == "grpo" and "teacher" in label:
                    continue
                step, run = (memory_rule(n, adapter, method, device=device, sequence=seq,
                                         **options) / 2**30 for seq in (False, True))
                lines.append(f"| {name} | {n / 1e9:.2f}B | {method} | {label} | {step:.1f} | "
                             f"{run:.1f} |")
    return "\n".join(lines)


def forced_length_task(prompt_len, answer_len, group, success_per_group=2, n=512):
    """Random prompts of prompt_len tokens; every answer is forced to answer_len tokens (the
    model's min_new_tokens is set to it); the first success_per_group answers of every group
    are marked successful, so SDPO has demonstrations and GRPO mixed groups."""
    import random
    rng = random.Random(0)
    rows = [{"prompt": " ".join(f"t{rng.randrange(3, QWEN_VOCAB)}" for _ in range(prompt_len)),
             "answer": "-"} for _ in range(n)]
    calls = [0]

    def reward(completion, example):
        calls[0] += 1
        return float((calls[0] - 1) % group < success_per_group)
    return sc.Task("forced", rows, rows[:8], reward, max_new_tokens=answer_len)


def hwm_gib() -> float:
    """The process's peak resident memory (VmHWM), GiB."""
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def time_shape(name, mode, *, device, prompts, group, prompt_len, answer_len, micro_batch,
               checkpointing, topk, chunk, steps=1, memory=None) -> dict:
    """One warm-up step on a tiny batch, then `steps` timed steps of this project's train_step at
    the requested batch. The split is measured with the device synchronised around the teacher
    forward and the optimizer step; the student forward+backward is the rest of the update.
    memory: Config's memory options (lora_rank, optim_8bit, teacher_bf16); "rule" is what the
    memory rule gives for them (GiB, before activations)."""
    memory = memory or {}
    model = shape_model(name, device)
    n_params = sum(p.numel() for p in model.parameters())
    if memory.get("lora_rank"):
        model = lora.add_lora(model, sc.Config(**memory))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rule = memory_rule(n_params, trained, mode, with_lora=bool(memory.get("lora_rank")),
                       optim_8bit=memory.get("optim_8bit", False),
                       teacher_bf16=memory.get("teacher_bf16", False), device=device) / 2**30
    tok = shape_tokenizer()
    model.generation_config.min_new_tokens = answer_len        # every answer exactly answer_len
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    task = forced_length_task(prompt_len, answer_len, group)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    split = {"teacher": 0.0, "optimizer": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            sync()
            t0 = time.time()
            out = fn(*a, **k)
            sync()
            split[key] += time.time() - t0
            return out
        return wrapper

    scores, sample = sc.teacher_scores, sc.sample_rollout
    sc.teacher_scores = timed(scores, "teacher")

    def sample_and_measure(*a, **k):     # the peak of the rollout, then of the update apart
        out = sample(*a, **k)
        if device == "cuda":
            split["peak_rollout"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        return out
    sc.sample_rollout = sample_and_measure
    try:
        out = []
        # warm-up: the full batch with 16-token answers (kernels, allocator), then timed steps
        for i, (p, g, budget) in enumerate([(prompts, group, 16)] + [(prompts, group, answer_len)]
                                           * steps):
            cfg = sc.Config(loss_mode="sdpo" if mode == "sdpo" else "grpo",
                            prompts_per_step=p, group_size=g, max_new_tokens=budget,
                            ppo_mini_batch_size=p // 4 if mode == "grpo" and p % 4 == 0 else 0,
                            micro_batch_size=micro_batch, distillation_topk=topk,
                            rollout_chunk_size=chunk, warmup_steps=0, **memory)
            model.generation_config.min_new_tokens = budget
            teacher = sc.Teacher(model, cfg) if mode == "sdpo" else None
            opt, sched = sc.make_optimizer(model, cfg)
            opt.step = timed(opt.step, "optimizer")
            split.update(teacher=0.0, optimizer=0.0)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            metrics = sc.train_step(model, tok, teacher, opt, sched, task,
                                    [task.train[(i * p + j) % len(task.train)] for j in range(p)],
                                    cfg)
            sync()
            if i > 0:
                cuda = device == "cuda"
                out.append({**metrics, "peak_rollout": float("nan"), **split, "peak_update": (
                    torch.cuda.max_memory_allocated() / 2**30 if cuda else hwm_gib())})
            del teacher, opt
    finally:
        sc.teacher_scores, sc.sample_rollout = scores, sample
    m = {k: statistics.median(o[k] for o in out) for k in (
        "seconds", "t_rollout", "teacher", "optimizer", "peak_rollout", "peak_update")}
    rows = prompts * group
    update = m["seconds"] - m["t_rollout"]
    if out[-1]["response_length"] != answer_len:
        raise RuntimeError(f"answers were {out[-1]['response_length']} tokens, not {answer_len}")
    return {**m, "student": update - m["teacher"] - m["optimizer"],
            "gen_tok_s": rows * answer_len / m["t_rollout"],
            "train_tok_s": rows * (prompt_len + answer_len) / update,
            "distill_frac": out[-1].get("distill_frac", 0.0),
            "length": out[-1]["response_length"], "rule": rule}


SHAPE_HEAD = ("| shape | method | memory options | batch | prompt+answer | micro-batch | ckpt | "
              "top-k | rollout chunk | s/step | rollout | teacher | student fwd+bwd | optimizer | "
              "generated tok/s | trained tok/s | peak GiB rollout / update | rule GiB |\n"
              + "|---" * 18 + "|")


def memory_label(memory) -> str:
    """The memory options of a row, as --set would give them."""
    return " ".join(f"{k}={v}" for k, v in (memory or {}).items() if v) or "-"


def shape_row(name, mode, r, a) -> str:
    return (f"| {name} | {mode} | {memory_label(getattr(a, 'memory', None))} | "
            f"{a.prompts}x{a.group} | {a.prompt_len}+{a.answer_len} | "
            f"{a.micro_batch} | {'on' if a.checkpointing else 'off'} | {a.topk or 'full'} | "
            f"{a.chunk or 'all'} | {r['seconds']:.2f} | {r['t_rollout']:.2f} | {r['teacher']:.2f} "
            f"| {r['student']:.2f} | {r['optimizer']:.3f} | {r['gen_tok_s']:.0f} | "
            f"{r['train_tok_s']:.0f} | {r['peak_rollout']:.1f} / {r['peak_update']:.1f} | "
            f"{r['rule']:.1f} |")


def shapes_main(args):
    """--shape: time GRPO and/or SDPO steps of train_step on a Qwen-shaped model."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(shape_banner(device))
    if not args.no_header:
        print(SHAPE_HEAD)
    for mode in args.methods.split(","):
        r = time_shape(args.shape, mode, device=device, prompts=args.prompts, group=args.group,
                       prompt_len=args.prompt_len, answer_len=args.answer_len,
                       micro_batch=args.micro_batch, checkpointing=args.checkpointing,
                       topk=args.topk, chunk=args.chunk, steps=args.steps, memory=args.memory)
        print(shape_row(args.shape, mode, r, args), flush=True)


def shape_banner(device) -> str:
    label = (torch.cuda.get_device_name() if device == "cuda" else
             f"CPU, {torch.get_num_threads()} threads")
    return (f"# {label}, torch {torch.__version__}, bf16 autocast "
            f"{'on' if device == 'cuda' else 'off'}, {time.strftime('%Y-%m-%d')}")


# The GPU check (benchmarks/gpu_check.sh): the paper's batch (32 prompts x 8 answers), 128-token
# prompts and 512-token answers, bf16 autocast, one timed step each. First every shape with the
# options that fit an 80 GB card, then the memory options at the 0.6B shape and the settings
# that aim at a 24 GB card; configurations that would start after `budget` seconds are skipped.
GPU_MEMORY_PLAN = [   # a batch of 8 x 8: the update's peak does not depend on the batch (one
    # micro-batch at a time); the rollout's grows with the prompts per generate call
    ("qwen3-0.6b", "grpo,sdpo", dict(prompts=8, micro_batch=8, checkpointing=True, topk=100,
                                     chunk=0)),
    ("qwen3-0.6b", "sdpo", dict(prompts=8, micro_batch=8, checkpointing=True, topk=None,
                                chunk=0)),
    ("qwen3-0.6b", "sdpo", dict(prompts=8, micro_batch=8, checkpointing=False, topk=100,
                                chunk=0)),
    ("qwen3-0.6b", "grpo,sdpo", dict(prompts=8, micro_batch=2, checkpointing=True, topk=100,
                                     chunk=0)),
    ("qwen3-1.7b", "sdpo", dict(prompts=8, micro_batch=2, checkpointing=True, topk=100,
                                chunk=0)),
]
GPU_PLAN = [
    ("qwen2.5-0.5b", "grpo,sdpo", dict(micro_batch=8, checkpointing=True, topk=100, chunk=0)),
    ("qwen3-0.6b", "grpo,sdpo", dict(micro_batch=8, checkpointing=True, topk=100, chunk=0)),
    ("qwen3-1.7b", "grpo,sdpo", dict(micro_batch=8, checkpointing=True, topk=100, chunk=0)),
    ("qwen3-0.6b", "grpo", dict(micro_batch=2, checkpointing=True, topk=100, chunk=8)),
]
GPU_LORA_PLAN = [    # LoRA and the memory savers at 8 x 8, micro-batch 2, checkpointing: what a
    # 24 GB card would take, up to the paper's 4B model
    ("qwen3-1.7b", "sdpo", dict(prompts=8, micro_batch=2, checkpointing=True, topk=100, chunk=0,
                                memory=dict(optim_8bit=True, teacher_bf16=True))),
    ("qwen3-1.7b", "grpo,sdpo", dict(prompts=8, micro_batch=2, checkpointing=True, topk=100,
                                     chunk=0, memory=dict(lora_rank=32))),
    ("qwen3-4b", "grpo,sdpo", dict(prompts=8, micro_batch=2, checkpointing=True, topk=100,
                                   chunk=0, memory=dict(lora_rank=32))),
]


def gpu_plan_main(args, plan, budget=420):
    import gc
    import types
    device = args.device or "cuda"
    print(shape_banner(device))
    print(SHAPE_HEAD, flush=True)
    t_start = time.time()
    for shape, methods, options in plan:
        for mode in methods.split(","):
            if time.time() - t_start > budget:
                print(f"| {shape} | {mode} | skipped: the {budget} s budget was spent |")
                continue
            a = types.SimpleNamespace(prompts=args.prompts, group=args.group,
                                      prompt_len=args.prompt_len, answer_len=args.answer_len)
            vars(a).update(options)
            try:
                r = time_shape(shape, mode, device=device, prompts=a.prompts, group=a.group,
                               prompt_len=a.prompt_len, answer_len=a.answer_len,
                               micro_batch=a.micro_batch, checkpointing=a.checkpointing,
                               topk=a.topk, chunk=a.chunk, memory=getattr(a, "memory", None))
                print(shape_row(shape, mode, r, a), flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"| {shape} | {mode} | out of memory with {options} |", flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"# total {time.time() - t_start:.0f} s")


def build_parser():
    """The command line (a test parses every command the docs show)."""
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lab", help="'lab', 'lab-short' or a real model (hub id, "
                    "folder, .gguf)")
    ap.add_argument("--task", default=None,
                    help="a lab family or an official-layout folder (default: math for the lab, "
                         "single-digit sums in words for a real model)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (%(default)s)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (%(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation budget (default: the task's own, or 24)")
    ap.add_argument("--steps", type=int, default=16, help="timed steps after the warm-up (2 "
                    "steps; with --shape one tiny step, and 1 timed step by default)")
    ap.add_argument("--bf16", action="store_true",
                    help="run both sides under CPU bf16 autocast (TRL's default) instead of fp32")
    ap.add_argument("--experiment", action="store_true", help="also time run_sequence.py")
    ap.add_argument("--shape", choices=list(SHAPES), help="time train_step on a randomly "
                    "initialised model of this architecture instead (see SHAPES)")
    ap.add_argument("--methods", default="grpo,sdpo", help="with --shape: which steps to time")
    ap.add_argument("--prompt-len", type=int, default=128, help="with --shape: prompt tokens")
    ap.add_argument("--answer-len", type=int, default=512, help="with --shape: answer tokens")
    ap.add_argument("--micro-batch", type=int, default=8, help="with --shape: sequences per "
                    "forward/backward")
    ap.add_argument("--checkpointing", action="store_true", help="with --shape: gradient "
                    "checkpointing")
    ap.add_argument("--topk", type=int, default=100, help="with --shape: distillation top-k, "
                    "0 = the full vocabulary")
    ap.add_argument("--chunk", type=int, default=0, help="with --shape: prompts per generate "
                    "call (rollout_chunk_size), 0 = all")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="with --shape or --plan (default: cuda if available)")
    ap.add_argument("--plan", choices=("gpu", "gpu-memory", "gpu-lora"), help="run the GPU "
                    "check's list of shapes and options (benchmarks/gpu_check.sh)")
    ap.add_argument("--lora", type=int, default=0, help="with --shape: train a LoRA adapter of "
                    "this rank (lora_rank), the base frozen")
    ap.add_argument("--optim-8bit", action="store_true", help="with --shape: bitsandbytes' 8-bit "
                    "AdamW (CUDA)")
    ap.add_argument("--teacher-bf16", action="store_true", help="with --shape: the SDPO teacher "
                    "in bf16")
    ap.add_argument("--memory-rule", action="store_true", help="print the memory rule for every "
                    "shape, method and memory option (computed, nothing runs), then exit")
    ap.add_argument("--budget", type=float, default=420, help="with --plan: start no new "
                    "configuration after this many seconds")
    ap.add_argument("--no-header", action="store_true", help="with --shape: rows only")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    quiet()
    if args.memory_rule:
        print("Memory rule, GiB before activations (computed, not measured; bench_step.py "
              "memory_rule): one training step, and continual_sequence with its frozen start\n")
        return print(memory_table())
    if args.plan:
        plans = {"gpu": GPU_PLAN, "gpu-memory": GPU_MEMORY_PLAN, "gpu-lora": GPU_LORA_PLAN}
        return gpu_plan_main(args, plans[args.plan], args.budget)
    if args.shape:
        args.topk = args.topk or None
        args.memory = dict(lora_rank=args.lora, optim_8bit=args.optim_8bit,
                           teacher_bf16=args.teacher_bf16)
        args.steps = 1 if args.steps == 16 else args.steps
        return shapes_main(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    rows = loss_identity()
    print("\n| loss identity vs TRL 1.16 | max abs difference |\n|---|---|")
    for name, diff in rows:
        print(f"| {name} | {diff:.2e} |")
    worst = max(d for _, d in rows)

    model, tok = load_policy(args.model)
    is_lab = args.model in lab.LABS
    if is_lab or args.model.endswith(".gguf"):
        # TRL's SDPOTrainer reloads its teacher from the model's path, which the shipped lab
        # file and a GGUF file do not give it: both sides start from a saved folder instead
        import tempfile
        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        model, tok = load_policy(folder)
        if is_lab:      # the lab model runs eager attention (not saved in its config)
            model.set_attn_implementation("eager")
    if args.task is None:
        task = load_task("math", args.model) if is_lab else sums_task()
    else:
        task = load_task(args.task, args.model)
        if not is_lab:   # a real model answers in sentences: the last number counts
            task.reward = last_number_reward
    budget = args.max_new_tokens or task.max_new_tokens or 24
    task.max_new_tokens = budget
    print(f"\n{args.model.split('/')[-1]}, task {task.name}, {args.prompts} prompts x "
          f"{args.group} completions, <= {budget} new tokens, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, medians of {args.steps} steps after "
          "2 warm-up steps. Ours: rollout / teacher forward / the rest (student forward+backward, "
          "loss, AdamW). Floor: generate + one forward+backward+AdamW (+ one teacher forward "
          "over every full teacher sequence for SDPO). Distilled: share of response tokens "
          "(ours) or of samples (TRL) with a teacher context.\n")
    print("| method | s/step | rollout | teacher fwd | rest | floor | step/floor | tokens/answer "
          "| reward | distilled | TRL s/step | TRL tokens/answer | TRL reward | TRL distilled "
          "| ours/TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for mode in ("grpo", "sdpo"):
        # the lab's learning rate, or the official one for a real model: at 3e-4 SmolLM2 drifts
        # within the warm-up steps, and the two sides would then time different behaviour
        cfg = lab.lab_config(args.model if is_lab else "lab", loss_mode=mode,
                             prompts_per_step=args.prompts,
                             group_size=args.group, max_new_tokens=budget,
                             loss_agg_mode="token-mean", warmup_steps=0,
                             lr=lab.lab_config(args.model).lr if is_lab else sc.Config().lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            torch.manual_seed(0)
            r = time_steps(model, tok, task, cfg, n=args.steps)
            floor = time_floor(model, tok, task, cfg, teacher_too=mode == "sdpo", n=args.steps)
        trl = time_trl(model, tok, task, mode, args.prompts * args.group, args.group, budget,
                       cfg.lr, bf16=args.bf16, n=args.steps)
        results[mode] = r
        distilled = f"{100 * r['distill_frac']:.0f}%" if mode == "sdpo" else "-"
        trl_distilled = f"{100 * trl['distilled']:.0f}%" if mode == "sdpo" else "-"
        print(f"| {mode} | {r['step']:.3f} | {r['rollout']:.3f} | {r['teacher']:.3f} | "
              f"{r['rest']:.3f} | {floor:.3f} | {r['step'] / floor:.2f} | {r['length']:.1f} | "
              f"{r['reward']:.2f} | {distilled} | {trl['step']:.3f} | {trl['length']:.1f} | "
              f"{trl['reward']:.2f} | {trl_distilled} | {r['step'] / trl['step']:.2f} |",
              flush=True)
    print(f"\nSDPO step / GRPO step: ours {results['sdpo']['step'] / results['grpo']['step']:.2f}")

    top, full = peak_memory_mib(100), peak_memory_mib("full")
    print(f"\npeak memory of sdpo_loss fwd+bwd, B=16 T=64 V=49152: top-100 {top:.0f} MiB, "
          f"full vocabulary {full:.0f} MiB, ratio {top / full:.2f}")
    if args.experiment:
        print(f"\nquick experiment (python run_sequence.py, lab base cached): "
              f"{time_experiment():.0f} s wall")
    if worst > TOLERANCE:
        print(f"\nFAIL: a loss differs from TRL's by {worst:.2e} > {TOLERANCE}")
        sys.exit(1)
    print(f"\nall losses match TRL within {TOLERANCE}")


if __name__ == "__main__":
    main()
