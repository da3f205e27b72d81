"""One training step as the paper's verl runs compute it: each sequence aggregated on its own and
scaled by 1/N (ppo_micro_batch_size_per_gpu = 1), several optimizer steps per rollout batch for
the GRPO baseline with the PPO ratio and clip acting from the second, verl's warm-up from lr 0,
and the EMA teacher moving once per rollout batch. The step itself runs on the tiny lab base."""
import copy

import pytest
import torch

import sdpo_cl as s
from harness import lab
from conftest import alternating_reward, flat_grad, flat_params

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


def one_step(base, cfg, optimizer="adam", lr=1e-3, teacher=None):
    """train_step from a copy of the tiny lab base on cfg.prompts_per_step math prompts with the
    alternating reward: (the stepped model, its metrics, its teacher)."""
    model, tok = base
    model = copy.deepcopy(model)
    task = lab.make_lab_task("math", "lab-short", n_train=cfg.prompts_per_step, n_test=1)
    task.reward = alternating_reward()
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    torch.manual_seed(0)
    teacher = teacher(model) if teacher else None
    metrics = s.train_step(model, tok, teacher, opt, sched, task,
                           [task.train[i] for i in range(cfg.prompts_per_step)], cfg)
    return model, metrics, teacher


@pytest.mark.parametrize("loss_mode", ["grpo", "sdpo"])
def test_one_sequence_per_micro_batch_gives_the_same_update(tiny_base, loss_mode):
    """micro_batch_size=1 is literally verl's setting; the default runs the mini-batch at once."""
    cfg = lab.lab_config("lab-short", loss_mode=loss_mode, prompts_per_step=4)
    teacher = (lambda m: s.Teacher(m, cfg)) if loss_mode == "sdpo" else None
    whole, m1, _ = one_step(tiny_base, cfg, "sgd", lr=1.0, teacher=teacher)
    ones, m2, _ = one_step(tiny_base, lab.lab_config("lab-short", loss_mode=loss_mode, prompts_per_step=4,
                                                     micro_batch_size=1), "sgd", lr=1.0,
                           teacher=teacher)
    assert (flat_params(whole) - flat_params(tiny_base[0])).abs().max() > 1e-4
    assert torch.allclose(flat_params(whole), flat_params(ones), atol=1e-5)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)


def test_one_mini_batch_is_the_on_policy_policy_gradient(tiny_base):
    """The whole rollout batch in one optimizer step: the ratio is 1 and nothing is clipped, so
    the SGD update is -lr times the gradient of -(1/N) sum_i A_i mean_t log pi(y_i,t), written out
    here on the same rollout, drawn again."""
    model, tok = tiny_base
    cfg = lab.lab_config("lab-short", loss_mode="grpo", prompts_per_step=4, grad_clip=1e6)
    stepped, metrics, _ = one_step(tiny_base, cfg, "sgd", lr=1.0)
    assert metrics["updates"] == 1 and metrics["clip_frac"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    policy = copy.deepcopy(model)
    task = lab.make_lab_task("math", "lab-short", n_train=4, n_test=1)
    task.reward = alternating_reward()
    torch.manual_seed(0)
    ro, _, rewards = s.sample_rollout(policy, tok, task, [task.train[i] for i in range(4)], cfg)
    groups = rewards.view(-1, cfg.group_size)
    advantages = (groups - groups.mean(1, keepdim=True)).flatten()            # +-0.5
    logits = policy(**s.sequence_inputs(ro.prompt_ids, ro.prompt_mask, ro.response_ids,
                                        ro.response_mask)).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ro.response_ids[..., None]).squeeze(-1)
    mask = ro.response_mask
    objective = -(advantages * (logp * mask).sum(1) / mask.sum(1)).mean()
    objective.backward()
    expected = flat_params(model) - 1.0 * flat_grad(policy)
    assert (expected - flat_params(model)).abs().max() > 1e-4
    assert torch.allclose(flat_params(stepped), expected, atol=1e-6)


def test_four_mini_batches_take_four_steps_and_clip_from_the_second(tiny_base):
    cfg = lab.lab_config("lab-short", loss_mode="grpo", prompts_per_step=8, ppo_mini_batch_size=2)
    _, metrics, _ = one_step(tiny_base, cfg, lr=0.05)   # large steps: the ratio leaves the clip
    assert metrics["updates"] == 4
    assert metrics["clip_frac"] > 0 and metrics["ratio_mean"] != pytest.approx(1.0, abs=1e-3)


def test_mini_batches_are_consecutive_groups_of_prompts_repeated_each_epoch():
    cfg = lab.lab_config("lab-short", prompts_per_step=4, group_size=2, ppo_mini_batch_size=2, ppo_epochs=2,
                         balance_batch=False)
    steps = [rows.tolist() for rows in s.minibatches(cfg, [5, 3, 8, 1, 9, 2, 7, 4])]
    assert steps == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    whole = lab.lab_config("lab-short", prompts_per_step=4, group_size=2)               # 0: all prompts
    assert [rows.tolist() for rows in s.minibatches(whole, [5, 3, 8, 1, 9, 2, 7, 4])] == [list(range(8))]


def test_mini_batches_follow_verls_length_balanced_order_on_one_device():
    # by length: rows 3 5 1 7 0 6 2 4 (1, 2, 3, 4, 5, 7, 8, 9 tokens); the even ranks ascending
    # (3 1 0 2), then the odd ranks descending (4 6 7 5); cut into two steps of two prompts' rows
    cfg = lab.lab_config("lab-short", prompts_per_step=4, group_size=2, ppo_mini_batch_size=2)
    steps = [rows.tolist() for rows in s.minibatches(cfg, [5, 3, 8, 1, 9, 2, 7, 4])]
    assert steps == [[3, 1, 0, 2], [4, 6, 7, 5]]


def test_equal_lengths_keep_their_order_within_each_half():
    cfg = lab.lab_config("lab-short", prompts_per_step=4, group_size=2, ppo_mini_batch_size=2)
    assert [rows.tolist() for rows in s.minibatches(cfg, [6] * 8)] == [[0, 2, 4, 6], [7, 5, 3, 1]]


def test_the_ema_teacher_moves_once_after_all_updates(tiny_base):
    cfg = lab.lab_config("lab-short", loss_mode="sdpo", prompts_per_step=8, ppo_mini_batch_size=2,
                         teacher_update_rate=0.25)
    before = flat_params(tiny_base[0])
    student, metrics, teacher = one_step(tiny_base, cfg, teacher=lambda m: s.Teacher(m, cfg))
    assert metrics["updates"] == 4
    assert torch.allclose(flat_params(teacher.model), before + 0.25 * (flat_params(student)
                                                                      - before), atol=1e-6)


def test_warm_up_starts_at_lr_zero_as_verl(tiny_base):
    model, tok = tiny_base
    task = lab.make_lab_task("math", "lab-short", n_train=8, n_test=1)
    cfg = lab.lab_config("lab-short", loss_mode="grpo", prompts_per_step=2, group_size=2, warmup_steps=4,
                         steps_per_task=3, lr=1e-3)
    history = s.train_task(copy.deepcopy(model), tok, None, task, cfg, rng=s.seed_everything(0))
    assert [h["lr"] for h in history] == pytest.approx([0.0, 2.5e-4, 5e-4])
