"""`python sdpo_cl.py`: one rollout batch of the lab's base model, narrated, GRPO's and SDPO's
signals side by side. Every number comes from sdpo_cl's own functions; the page goes to
docs/walkthrough.md with its figure."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch

from sdpo_cl import (Teacher, generalized_jsd, grpo_advantages, loss_targets, response_scores,
                     sample_rollout, seed_everything, teacher_scores, token_logprobs,
                     topk_support, update)
from harness.lab import lab_base, lab_config, make_lab_task
from harness.files import atomic_write


def narrate_group(b, say):
    """Section 1-2: one group's answers, rewards and advantages; the teacher prompt of one of its
    failed answers. Returns (the group, the failed answer's row)."""
    G = b.cfg.group_size
    alike = (b.rewards.view(-1, G).std(1) == 0).tolist()
    g = next(g for g, flat in enumerate(alike) if not flat)
    rows = range(g * G, (g + 1) * G)
    say()
    say("## 1. One prompt's group (`sample_rollout`, `grpo_advantages`)")
    say()
    say(f"Prompt: `{b.samples[g * G]['prompt']}` (gold answer `{b.samples[g * G]['answer']}`)")
    say()
    say("| answer | reward | advantage A_i = r_i - mean(r) |\n|---|---|---|")
    for i in rows:
        say(f"| `{b.rollout.completions[i]}` | {b.rewards[i]:.0f} | {b.advantages[i]:+.3f} |")
    say()
    say(f"Groups of this batch whose answers all scored the same: {sum(alike)} of {len(alike)}. "
        "In such a group every advantage is 0, so GRPO takes no gradient from it (its "
        "\"selective update\"), and a group without a success gives SDPO no demonstration "
        "either.")
    i = next(r for r in rows if b.rewards[r] < b.cfg.success_reward_threshold
             and b.targets.teacher_of[r] >= 0)
    u = b.targets.teacher_of[i].item()
    teacher_text = b.tokenizer.decode(b.targets.teacher_ids[u][b.targets.teacher_mask[u] > 0])
    say()
    say(f"## 2. The teacher's view of the failed answer `{b.rollout.completions[i]}` "
        f"(`teacher_contexts`, `teacher_prompt`, `format_prompt`)")
    say()
    say("The first successful sibling is the demonstration; the teacher sees this prompt, exactly "
        "as tokenized, and then scores the student's own answer tokens:")
    say()
    say("```\n" + teacher_text + "\n```")
    return g, i


def answer_logits(model, b, i):
    """The student's and the teacher's logits [1, T, V] over answer i (the teacher shown its
    context), at the training temperature."""
    ro, cfg, u = b.rollout, b.cfg, b.targets.teacher_of[i].item()
    ids, mask = ro.response_ids[i:i + 1], ro.response_mask[i:i + 1]
    with torch.no_grad():
        student = response_scores(model, ro.prompt_ids[i:i + 1], ro.prompt_mask[i:i + 1], ids,
                                  mask) / cfg.temperature
        teacher = Teacher(model, cfg).logits(model, lambda m: teacher_scores(
            m, b.targets.teacher_ids[[u]], b.targets.teacher_mask[[u]], torch.tensor([0]), ids,
            mask)) / cfg.temperature
    return student, teacher


def narrate_tokens(b, i, say):
    """Sections 3-4: along answer i, GRPO's weight next to SDPO's divergence, and the two
    distributions where they differ most. Returns the per-token numbers."""
    cfg, tokenizer = b.cfg, b.tokenizer
    n, ids = int(b.rollout.response_mask[i].sum()), b.rollout.response_ids[i:i + 1]   # [1, T]
    student_logits, teacher_logits = answer_logits(b.model, b, i)
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
        say(f"| {t} | `{tokens[t]!r}` | {b.advantages[i]:+.3f} | {divergence[t]:.4f} | "
            f"{p_student[t]:.3f} | {p_teacher[t]:.3f} |")
    t_max = int(divergence.argmax())
    top_s, top_t = student_logp[0, t_max].exp().topk(5), teacher_logp[0, t_max].exp().topk(5)
    say()
    say(f"## 4. Where they differ most: token {t_max} (`{tokens[t_max]!r}`)")
    say()
    say("| rank | student's top-5 | p | teacher's top-5 | p |\n|---|---|---|---|---|")
    name = tokenizer.convert_ids_to_tokens
    for r in range(5):
        say(f"| {r + 1} | `{name(int(top_s.indices[r]))}` | {top_s.values[r]:.3f} | "
            f"`{name(int(top_t.indices[r]))}` | {top_t.values[r]:.3f} |")
    say(f"| tail | (the rest) | {1 - top_s.values.sum():.3f} | (the rest) | "
        f"{1 - top_t.values.sum():.3f} |")
    before = float((student_logp.gather(-1, ids[..., None])[0, :n, 0]).sum())
    return SimpleNamespace(n=n, tokens=tokens, divergence=divergence, before=before,
                           lift=p_teacher - p_student)


def narrate_updates(b, i, signals, say) -> dict:
    """Section 5: the two losses on this batch, and how far one update of each method (the
    training step's own `update`) moves answer i's log-probability."""
    cfg, ro, n = b.cfg, b.rollout, signals.n
    ids, result = ro.response_ids[i:i + 1], {}
    say()
    say("## 5. The two losses on this batch, and one update of each (`update`, the training "
        "step's own: GRPO takes the paper's four optimizer steps, one per quarter of the batch in "
        "verl's length-balanced order; SDPO one step on the whole batch)")
    say()
    say("| method | loss | log p(answer) before | after the update | change |\n"
        "|---|---|---|---|---|")
    for mode in ("grpo", "sdpo"):
        mode_cfg = dataclasses.replace(cfg, loss_mode=mode, ppo_mini_batch_size=max(
            1, cfg.prompts_per_step // 4) if mode == "grpo" else 0)
        policy = copy.deepcopy(b.model).train()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        mode_targets = loss_targets(ro, b.samples, b.rewards, b.task, b.tokenizer, mode_cfg)
        totals = update(policy, Teacher(policy, mode_cfg) if mode == "sdpo" else None, optimizer,
                        scheduler, ro, mode_targets, mode_cfg)
        with torch.no_grad():
            logits = response_scores(policy.eval(), ro.prompt_ids[i:i + 1],
                                     ro.prompt_mask[i:i + 1], ids, ro.response_mask[i:i + 1])
        after = float(token_logprobs(logits / cfg.temperature, ids)[0, :n].sum())
        result[mode] = {"loss": totals["loss"], "log_p_before": signals.before,
                        "log_p_after": after}
        say(f"| {mode} | {totals['loss']:.4f} | {signals.before:.3f} | {after:.3f} | "
            f"{after - signals.before:+.3f} |")
    say()
    say("GRPO pushes the failed answer down as a whole, by its one advantage; SDPO moves each "
        "token toward what the teacher, shown the demonstration, would have said.")
    return result


DOCS = Path(__file__).resolve().parents[1] / "docs"       # the project's docs/, from any folder


def walkthrough(prompts=4, group_size=8, family="math", seed=0, out=DOCS, echo=print) -> dict:
    """One rollout batch of the lab's base model, narrated: a group's answers, rewards and GRPO
    advantages; the teacher prompt of one failed answer; along that answer, token by token,
    GRPO's weight next to SDPO's divergence; the two distributions where they differ most; the
    two losses, and how far each method's update on this batch (GRPO: the paper's four optimizer
    steps on quarters of it; SDPO: one) moves the answer's log-probability. Writes
    out/walkthrough.md and out/walkthrough.png; returns the numbers."""
    model, tokenizer = lab_base()
    task = make_lab_task(family)
    cfg = lab_config(loss_mode="sdpo", prompts_per_step=prompts, group_size=group_size,
                     seed=seed, warmup_steps=0)
    seed_everything(seed, "walkthrough")
    examples = [task.train[i] for i in range(prompts)]
    rollout, samples, rewards = sample_rollout(model, tokenizer, task, examples, cfg)
    b = SimpleNamespace(model=model, tokenizer=tokenizer, task=task, cfg=cfg, rollout=rollout,
                        samples=samples, rewards=rewards, advantages=grpo_advantages(
                            rewards, group_size),
                        targets=loss_targets(rollout, samples, rewards, task, tokenizer, cfg))
    lines = []

    def say(text=""):
        lines.append(text)
        echo(text)

    say(f"# Walkthrough: one rollout batch of GRPO and SDPO on the lab's {family} family")
    say()
    say(f"{prompts} prompts x {group_size} answers sampled at temperature {cfg.temperature:g} "
        f"from the lab's base model (`sample_rollout`), rewarded by the task's verifier.")
    if (rewards.view(-1, group_size).std(1) == 0).all():
        say("Every group scored all alike: no GRPO advantage and no SDPO demonstration here.")
        return {}
    g, i = narrate_group(b, say)
    signals = narrate_tokens(b, i, say)
    result = {"group": g, "answer": i, "divergence": signals.divergence.tolist(),
              "advantage": b.advantages[i].item(), **narrate_updates(b, i, signals, say)}
    write_walkthrough(Path(out), lines, signals.tokens, b.advantages[i].item(),
                      signals.divergence, signals.lift)
    echo(f"\nwrote {Path(out) / 'walkthrough.md'} and {Path(out) / 'walkthrough.png'}")
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

