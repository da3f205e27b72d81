"""`python sdpo_cl.py` walks through one rollout batch: the advantage, the per-token divergence
and the two losses it prints are those of its batch, recomputed here independently (one full
forward per sequence, the divergence and the clipped GRPO loss with its four optimizer steps
written out), and the same command prints the same trace."""
import copy

import pytest
import torch

import sdpo_cl as s
from harness import lab
from harness.walkthrough import walkthrough

PROMPTS, G = 4, 8


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    printed = []
    result = walkthrough(prompts=PROMPTS, group_size=G, out=out, echo=printed.append)
    return result, printed, out


@pytest.fixture(scope="module")
def batch(shipped_lab):
    """The walkthrough's rollout batch, drawn again from the shipped base with its seed."""
    model, tok = shipped_lab
    task = lab.make_lab_task("math")
    cfg = lab.lab_config(loss_mode="sdpo", prompts_per_step=PROMPTS, group_size=G,
                         warmup_steps=0)
    examples = [task.train[i] for i in range(PROMPTS)]
    s.seed_everything(0, "walkthrough")
    rollout, samples, rewards = s.sample_rollout(model, tok, task, examples, cfg)
    return model, tok, cfg, rollout, samples, rewards


def logits_after(model, prompt_ids, response_ids):
    """Logits [T, V] of a response after a prompt (unpadded id lists), one full forward."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[
            0, len(prompt_ids) - 1:-1]


def divergences(batch, i):
    """Per-token JSD (alpha 0.5) of answer i on the student's top-20 plus a tail bucket, between
    the student after the prompt and the teacher after the prompt with the first successful
    sibling as demonstration; None without a sibling."""
    model, tok, cfg, ro, samples, rewards = batch
    group = range(i - i % G, i - i % G + G)
    demos = [j for j in group if rewards[j] >= 0.5 and j != i]
    if not demos:
        return None
    n = int(ro.response_mask[i].sum())
    response = ro.response_ids[i, :n].tolist()
    prompt = ro.prompt_ids[i][ro.prompt_mask[i] > 0].tolist()
    teacher_text = s.format_prompt(tok, s.teacher_prompt(samples[i]["prompt"], cfg,
                                                         ro.completions[demos[0]]))
    teacher = tok(teacher_text, add_special_tokens=False).input_ids
    p_s = logits_after(model, prompt, response).softmax(-1)                 # [n, V]
    p_t = logits_after(model, teacher, response).softmax(-1)
    top = p_s.topk(20, dim=-1).indices
    p_s = torch.cat([p_s.gather(-1, top), 1 - p_s.gather(-1, top).sum(-1, keepdim=True)], -1)
    p_t = torch.cat([p_t.gather(-1, top), 1 - p_t.gather(-1, top).sum(-1, keepdim=True)], -1)
    m = (p_s + p_t) / 2
    kl = lambda p, q: (p * (p / q).log()).sum(-1)
    return 0.5 * kl(p_s, m) + 0.5 * kl(p_t, m)


def test_it_writes_the_page_and_the_figure(walk):
    _, printed, out = walk
    page = (out / "walkthrough.md").read_text()
    assert page.startswith("# Walkthrough") and "(walkthrough.png)" in page
    assert (out / "walkthrough.png").stat().st_size > 1000
    for part in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert any(line.startswith(part) for line in printed), part


def test_the_advantage_and_divergence_it_shows_are_those_of_its_answer(walk, batch):
    result, _, _ = walk
    i, rewards = result["answer"], batch[5]
    group = rewards[i - i % G:i - i % G + G]
    assert result["advantage"] == pytest.approx((rewards[i] - group.mean()).item(), abs=1e-6)
    assert result["divergence"] == pytest.approx(divergences(batch, i).tolist(), abs=2e-6)


def test_its_sdpo_loss_is_the_mean_divergence_over_every_answer(walk, batch):
    """One on-policy step (importance weight 1): the mean over the answers with a teacher of their
    mean per-token divergence, divided by all N answers (micro1-token-mean)."""
    per_answer = [divergences(batch, i) for i in range(PROMPTS * G)]
    expected = sum(d.mean().item() for d in per_answer if d is not None) / (PROMPTS * G)
    assert expected > 0
    assert walk[0]["sdpo"]["loss"] == pytest.approx(expected, abs=1e-5)


def test_its_grpo_loss_is_four_clipped_steps_one_per_length_ordered_quarter(walk, batch):
    model, tok, cfg, ro, _, rewards = batch
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    groups = rewards.view(-1, G)
    advantages = (groups - groups.mean(1, keepdim=True)).flatten()
    lengths = (ro.prompt_mask.sum(1) + ro.response_mask.sum(1)).tolist()
    ranked = sorted(range(PROMPTS * G), key=lambda r: (lengths[r], r))
    order = torch.tensor(ranked[::2] + ranked[1::2][::-1])   # verl's _balance_batch, one device
    losses = []
    for g in range(PROMPTS):                              # a quarter of the rows per mini-batch
        rows = order[g * G:(g + 1) * G]
        logits = policy(**s.sequence_inputs(ro.prompt_ids[rows], ro.prompt_mask[rows],
                                            ro.response_ids[rows], ro.response_mask[rows])
                        ).logits[:, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, ro.response_ids[rows, :, None])[..., 0]
        ratio, A, mask = (logp - ro.old_logprobs[rows]).exp(), advantages[rows, None], \
            ro.response_mask[rows]
        per_token = torch.maximum(-A * ratio, -A * ratio.clamp(1 - 0.2, 1 + 0.28))
        per_token = torch.where(A < 0, torch.minimum(per_token, -3.0 * A), per_token)
        loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(-advantages[order[:G]].mean().item(), abs=1e-5)  # ratio 1
    assert walk[0]["grpo"]["loss"] == pytest.approx(sum(losses) / PROMPTS, abs=1e-6)


def test_the_same_command_prints_the_same_trace(walk, tmp_path):
    _, printed, _ = walk
    again = []
    walkthrough(prompts=PROMPTS, group_size=G, out=tmp_path, echo=again.append)
    assert again[:-1] == printed[:-1]                 # the last line: where it wrote, which
    assert again[-1].endswith(f"{tmp_path / 'walkthrough.png'}")   # differs, and says so
