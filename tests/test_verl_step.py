"""One training step as the paper's verl runs compute it: each sequence aggregated on its own and
scaled by 1/N (ppo_micro_batch_size_per_gpu = 1), several optimizer steps per rollout batch for
the GRPO baseline with the PPO ratio and clip acting from the second, verl's warm-up from lr 0,
and the EMA teacher moving once per rollout batch."""
import copy

import pytest
import torch

import sdpo_cl as s
from harness import lab

LENGTHS = [6, 3, 1, 4, 2]           # a ragged batch of 5 responses
HAS_CONTEXT = [1, 0, 1, 1, 0]       # two of them without a teacher context


def ragged_batch(V=11):
    torch.manual_seed(0)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.tensor([[float(t < n) for t in range(T)] for n in LENGTHS])
    return (torch.randn(B, T, V), torch.randn(B, T, V), torch.randint(0, V, (B, T)), mask,
            mask * torch.tensor(HAS_CONTEXT, dtype=torch.float)[:, None])


def verl_loop(loss_of_one_sequence, B):
    """What verl does with micro-batches of one sequence: each loss scaled by 1/N (N = every
    sample of the mini-batch) and its gradients accumulated."""
    total = 0.0
    for i in range(B):
        loss = loss_of_one_sequence(i) / B
        loss.backward()
        total += loss.item()
    return total


def test_sdpo_micro1_token_mean_equals_verl_one_sequence_at_a_time():
    student, teacher, ids, _, distill = ragged_batch()
    ours = student.clone().requires_grad_(True)
    loss, _ = s.sdpo_loss(ours, teacher, ids, distill, agg="micro1-token-mean", topk=4)
    loss.backward()
    theirs = student.clone().requires_grad_(True)
    total = verl_loop(lambda i: s.sdpo_loss(theirs[i:i + 1], teacher[i:i + 1], ids[i:i + 1],
                                            distill[i:i + 1], agg="token-mean", topk=4)[0], 5)
    assert loss.item() == pytest.approx(total, abs=1e-6)
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)
    # the samples without a context count in N: the loss is 3/5 of the mean over the other three
    per_sample = [s.sdpo_loss(student[i:i + 1], teacher[i:i + 1], ids[i:i + 1], distill[i:i + 1],
                              topk=4)[0].item() for i in (0, 2, 3)]
    assert loss.item() == pytest.approx(sum(per_sample) / 5, abs=1e-6)


def test_grpo_micro1_token_mean_equals_verl_one_sequence_at_a_time():
    student, _, ids, mask, _ = ragged_batch()
    old = torch.log_softmax(student, -1).gather(-1, ids[..., None]).squeeze(-1) - 0.3
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5])

    def logprobs(logits):
        return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)

    ours = student.clone().requires_grad_(True)
    loss, _ = s.grpo_loss(logprobs(ours), old, advantages, mask, agg="micro1-token-mean")
    loss.backward()
    theirs = student.clone().requires_grad_(True)
    total = verl_loop(lambda i: s.grpo_loss(logprobs(theirs)[i:i + 1], old[i:i + 1],
                                            advantages[i:i + 1], mask[i:i + 1])[0], 5)
    assert loss.item() == pytest.approx(total, abs=1e-6)
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)


RECIPE = lab.LabRecipe(families=("math", "code"), steps=40)    # the tiny base test_training uses


@pytest.fixture(scope="module")
def base():
    model, tok = lab.lab_base(RECIPE, verbose=False)
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: float(len(c) <= 2)   # mixed rewards whatever the model says
    return model, tok, task


def one_step(base, cfg, optimizer="adam", lr=1e-3, teacher=None):
    model, tok, task = base
    model = copy.deepcopy(model)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    torch.manual_seed(0)
    teacher = teacher(model) if teacher else None
    metrics = s.train_step(model, tok, teacher, opt, sched, task,
                           [task.train[i] for i in range(cfg.prompts_per_step)], cfg)
    return model, metrics, teacher


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss_mode", ["grpo", "sdpo"])
def test_one_sequence_per_micro_batch_gives_the_same_update(base, loss_mode):
    """micro_batch_size=1 is literally verl's setting; the default runs the mini-batch at once."""
    cfg = lab.lab_config(loss_mode=loss_mode, prompts_per_step=4)
    teacher = (lambda m: s.Teacher(m, cfg)) if loss_mode == "sdpo" else None
    whole, m1, _ = one_step(base, cfg, "sgd", lr=1.0, teacher=teacher)
    ones, m2, _ = one_step(base, lab.lab_config(loss_mode=loss_mode, prompts_per_step=4,
                                                micro_batch_size=1), "sgd", lr=1.0, teacher=teacher)
    assert (flat(whole) - flat(base[0])).abs().max() > 1e-4
    assert torch.allclose(flat(whole), flat(ones), atol=1e-5)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)


def test_a_single_mini_batch_is_one_on_policy_update(base):
    cfg = lab.lab_config(loss_mode="grpo", prompts_per_step=8)
    default, metrics, _ = one_step(base, cfg)
    explicit, _, _ = one_step(base, lab.lab_config(loss_mode="grpo", prompts_per_step=8,
                                                   ppo_mini_batch_size=8))
    assert torch.equal(flat(default), flat(explicit))
    assert metrics["updates"] == 1 and metrics["clip_frac"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)


def test_four_mini_batches_take_four_steps_and_clip_from_the_second(base):
    cfg = lab.lab_config(loss_mode="grpo", prompts_per_step=8, ppo_mini_batch_size=2)
    _, metrics, _ = one_step(base, cfg, lr=0.05)        # large steps: the ratio leaves the clip
    assert metrics["updates"] == 4
    assert metrics["clip_frac"] > 0 and metrics["ratio_mean"] != pytest.approx(1.0, abs=1e-3)


def test_ppo_epochs_repeat_the_mini_batches(base):
    cfg = lab.lab_config(loss_mode="grpo", prompts_per_step=8, ppo_mini_batch_size=4, ppo_epochs=2)
    assert one_step(base, cfg)[1]["updates"] == 4


def test_the_ema_teacher_moves_once_after_all_updates(base):
    cfg = lab.lab_config(loss_mode="sdpo", prompts_per_step=8, ppo_mini_batch_size=2,
                         teacher_update_rate=0.25)
    before = flat(base[0])
    student, _, teacher = one_step(base, cfg, teacher=lambda m: s.Teacher(m, cfg))
    assert torch.allclose(flat(teacher.model), before + 0.25 * (flat(student) - before),
                          atol=1e-6)


def test_warm_up_starts_at_lr_zero_as_verl(base):
    model, tok, task = base
    cfg = lab.lab_config(loss_mode="grpo", prompts_per_step=4, warmup_steps=4, steps_per_task=3,
                         lr=1e-3)
    history = s.train_task(copy.deepcopy(model), tok, None, task, cfg, rng=s.seed_everything(0))
    assert [h["lr"] for h in history] == pytest.approx([0.0, 2.5e-4, 5e-4])


def test_rollouts_in_chunks_are_concatenated_with_padding():
    tok = lab.build_lab_tokenizer()
    a = s.Rollout(torch.tensor([[5, 6]]), torch.ones(1, 2), torch.tensor([[7]]), torch.ones(1, 1),
                  torch.tensor([[-0.5]]), ["x"])
    b = s.Rollout(torch.tensor([[5]]), torch.ones(1, 1), torch.tensor([[8, 9]]), torch.ones(1, 2),
                  torch.tensor([[-0.1, -0.2]]), ["yz"])
    r = s.concat_rollouts([a, b], tok.pad_token_id)
    pad = tok.pad_token_id
    assert r.prompt_ids.tolist() == [[5, 6], [pad, 5]]
    assert r.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert r.response_ids.tolist() == [[7, pad], [8, 9]]
    assert r.response_mask.tolist() == [[1, 0], [1, 1]] and r.completions == ["x", "yz"]
    assert torch.allclose(r.old_logprobs, torch.tensor([[-0.5, 0.0], [-0.1, -0.2]]))
