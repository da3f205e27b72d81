"""Where the SDPO teacher's weights come from: EMA (every batch, or every k-th: StableSDPO),
frozen, live, trust-region, a reset (at each task with reset_teacher_each_task), and SDPO-CL's
teacher_path mixed in by teacher_init_alpha."""
import copy

import pytest
import torch

import run_sequence
import sdpo_cl as s
from harness import lab
from sdpo_cl import Config, Teacher, ema_update_
from conftest import alternating_reward, flat_params


def tiny_linear(value):
    layer = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(layer.weight, value)
    return layer


def test_the_ema_update_moves_the_teacher_tau_of_the_way_to_the_student():
    teacher, student = tiny_linear(0.0), tiny_linear(1.0)
    ema_update_(teacher, student, 0.05)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.05))
    ema_update_(teacher, student, 0.05)               # 0.05 + 0.05 * (1 - 0.05)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.0975))


def test_ema_teacher_follows_the_student_and_frozen_stays_fixed():
    student = tiny_linear(0.0)
    ema = Teacher(student, Config(teacher_regularization="ema", teacher_update_rate=0.5))
    frozen = Teacher(student, Config(teacher_regularization="frozen"))
    ema_zero = Teacher(student, Config(teacher_regularization="ema", teacher_update_rate=0.0))
    with torch.no_grad():
        student.weight.fill_(2.0)                      # an optimizer step
    for t in (ema, frozen, ema_zero):
        t.after_rollout_batch(student, 1)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 1.0))
    assert torch.all(frozen.model.weight == 0) and torch.all(ema_zero.model.weight == 0)


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.02, 0.05])
def test_the_ema_sweeps_teacher_after_k_batches_is_the_formula(rate):
    """Student fixed at 1 from a teacher at 0: after k batches the teacher is 1 - (1 - rate)^k."""
    student = tiny_linear(1.0)
    teacher = Teacher(tiny_linear(0.0), Config(teacher_update_rate=rate))
    for batch in range(1, 8):
        teacher.after_rollout_batch(student, batch)
    assert torch.allclose(teacher.model.weight, torch.full((1, 2), 1 - (1 - rate) ** 7))


def test_stable_sdpo_moves_its_teacher_only_every_k_batches():
    """teacher_update_every=10, rate 0.4: frozen for 9 batches, 40% of the way at the 10th, then
    frozen again; 1 - 0.95^10 = 0.40, the official EMA's move over the same 10 batches."""
    student = tiny_linear(1.0)
    teacher = Teacher(tiny_linear(0.0), Config(teacher_update_rate=0.4, teacher_update_every=10))
    seen = []
    for batch in range(1, 22):
        teacher.after_rollout_batch(student, batch)
        seen.append(teacher.model.weight[0, 0].item())
    assert seen[:9] == [0.0] * 9 and seen[9] == pytest.approx(0.4)
    assert seen[10:19] == [pytest.approx(0.4)] * 9 and seen[19] == pytest.approx(0.64)
    assert 1 - 0.95 ** 10 == pytest.approx(0.4, abs=0.002)


def test_trust_region_lerps_logits_of_reference_and_student(random_lab):
    """The reference (its weights) scores 0, the student 10: the teacher's logits are 0.5."""
    model, _ = random_lab
    teacher = Teacher(model, Config(teacher_regularization="trust-region"))
    score = lambda m: torch.zeros(3) if m is teacher.model else torch.full((3,), 10.0)  # noqa
    assert torch.allclose(teacher.logits(model, score), torch.full((3,), 0.5))


class Scale(torch.nn.Module):
    """A stand-in 'model' whose logits are its weight times the input."""
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w)))

    def forward(self, x):
        return type("Out", (), {"logits": self.w * x})()


def test_teacher_kinds_produce_the_promised_logits():
    policy, x = Scale(1.0), torch.ones(2)
    trust = Teacher(policy, Config(teacher_regularization="trust-region", teacher_update_rate=0.25))
    live = Teacher(policy, Config(teacher_regularization="live"))
    with torch.no_grad():
        policy.w.fill_(5.0)                            # the student moves; the reference does not
    def score(model):
        return model(x).logits
    assert torch.allclose(live.logits(policy, score), torch.full((2,), 5.0))
    assert torch.allclose(trust.logits(policy, score), torch.full((2,), 1.0 + 0.25 * 4.0))
    assert not live.logits(policy, score).requires_grad


def test_reset_reinitialises_the_teacher_from_the_policy():
    policy = Scale(1.0)
    teacher = Teacher(policy, Config(teacher_regularization="frozen"))
    with torch.no_grad():
        policy.w.fill_(3.0)
    teacher.reset(policy)
    assert teacher.model.w.item() == pytest.approx(3.0)


def test_teacher_path_mixes_a_checkpoint_into_the_teacher(tmp_path):
    tok = lab.build_lab_tokenizer()
    student, ckpt = lab.build_lab_model(tok, seed=0), lab.build_lab_model(tok, seed=1)
    ckpt.save_pretrained(tmp_path)
    teacher = Teacher(student, Config(teacher_path=str(tmp_path), teacher_init_alpha=0.25))
    for t, st, c in zip(teacher.model.parameters(), student.parameters(), ckpt.parameters()):
        assert torch.allclose(t, 0.25 * c + 0.75 * st, atol=1e-6)


@pytest.mark.parametrize("method, restarted", [("sdpo_frozen", True), ("sdpo_frozen_base", False)])
def test_the_teacher_restarts_from_the_policy_at_each_task_as_a_verl_run_does(random_lab, method,
                                                                              restarted):
    """Over two tasks: the teacher of stage 1 is the base; by default (reset_teacher_each_task,
    a verl run per stage) stage 2's is the policy as stage 1 left it; sdpo_frozen_base keeps the
    base."""
    model, tok = random_lab
    settings = dict(prompts_per_step=2, group_size=2, steps_per_task=1, max_new_tokens=3,
                    eval_examples=2, eval_samples=1, warmup_steps=0, lr=1e-2)
    cfg = run_sequence.method_config(method, settings, {}, lab.lab_config)
    tasks = [lab.make_lab_task(name, "lab-short", n_train=4, n_test=2) for name in ("math", "code")]
    for task in tasks:
        task.reward = alternating_reward()
    after = {}

    class Weights(s.Hooks):
        def finished(self, k, record, policy, teacher):
            after[k] = (flat_params(policy), flat_params(teacher.model))
    s.continual_sequence(cfg, copy.deepcopy(model), tok, tasks, hooks=Weights())
    base, (policy_1, teacher_1), (_, teacher_2) = flat_params(model), after[1], after[2]
    assert not torch.equal(policy_1, base)                      # stage 1 trained the policy
    assert torch.equal(teacher_1, base)
    assert torch.equal(teacher_2, policy_1 if restarted else base)


def test_a_bf16_teacher_keeps_its_weights_in_half_the_bytes_and_moves_by_the_ema(random_lab):
    """teacher_bf16: 2 bytes a weight; the EMA moves it in bf16, toward the fp32 student."""
    model, _ = random_lab
    student = copy.deepcopy(model)
    teacher = Teacher(student, Config(teacher_update_rate=0.5, teacher_bf16=True))
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = flat_params(teacher.model).float()
    teacher.after_rollout_batch(student, 1)
    assert torch.allclose(flat_params(teacher.model).float(), before + 0.5, atol=0.05)
