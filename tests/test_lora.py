"""LoRA (harness/lora.py): the policy trains an adapter on frozen weights; SDPO's teacher is a
second adapter on the same base, moved by the EMA; the reference is the bare base; checkpoints
keep the adapters, and a run resumes from them to the same result."""
import copy
import math
import sys

import pytest
import torch

import run_sequence
import sdpo_cl as s
from harness import lab, lora
from conftest import alternating_reward, computed_ahead, run_and_resume


def lora_config(**overrides):
    """lab-short's settings at a size for a test, with a rank-4 adapter."""
    settings = dict(lora_rank=4, prompts_per_step=2, group_size=4, max_new_tokens=4,
                    warmup_steps=0, lr=1e-2, eval_examples=4, eval_samples=1)
    return lab.lab_config("lab-short", **{**settings, **overrides})


def with_lora(model, cfg):
    return lora.add_lora(copy.deepcopy(model), cfg)


def student_adapter(policy):
    return [p for p in policy.parameters() if p.requires_grad]


def some_ids(tok):
    return torch.tensor([tok("User: 2+3\nAssistant: 5", add_special_tokens=False).input_ids])


def test_a_training_step_changes_the_student_adapter_and_nothing_else(random_lab):
    """SDPO with a frozen teacher: the teacher scores through its own adapter every step, and
    neither it nor the base weights move; the student's adapter does."""
    model, tok = random_lab
    cfg = lora_config(loss_mode="sdpo", teacher_update_rate=0.0)
    policy = with_lora(model, cfg)
    teacher = s.Teacher(policy, cfg)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    task = lab.make_lab_task("math", "lab-short", n_train=2, n_test=1)
    task.reward = alternating_reward()
    optimizer, scheduler = s.make_optimizer(policy, cfg)
    s.train_step(policy, tok, teacher, optimizer, scheduler, task, list(task.train), cfg)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B.default." in n for n in changed)
    assert all("lora_" in n and ".default." in n for n in changed), sorted(changed)[:3]


def test_the_teacher_adapter_moves_by_the_ema_formula(random_lab):
    """After k updates toward a fixed student s: t_k = s + (1 - tau)^k (t_0 - s)."""
    model, _ = random_lab
    cfg = lora_config(loss_mode="sdpo", teacher_update_rate=0.25)
    policy = with_lora(model, cfg)
    teacher = s.Teacher(policy, cfg)
    t0 = [t.detach().clone() for t in teacher.model.parameters()]
    with torch.no_grad():                               # the student moves away, then holds
        for p in student_adapter(policy):
            p.add_(torch.randn_like(p))
    target = [p.detach().clone() for p in student_adapter(policy)]
    for batch in (1, 2, 3):
        teacher.after_rollout_batch(policy, batch)
    for t, a, b in zip(teacher.model.parameters(), t0, target, strict=True):
        assert torch.allclose(t, b + 0.75 ** 3 * (a - b), atol=1e-6)


def test_a_disabled_adapter_gives_the_base_models_logits(random_lab):
    model, tok = random_lab
    policy = with_lora(model, lora_config())
    base = s.frozen_copy(policy, "base")            # the reference: the adapters off
    with torch.no_grad():
        for p in student_adapter(policy):
            p.add_(torch.randn_like(p))              # an adapter that changes every layer
        ids = some_ids(tok)
        assert torch.equal(base(input_ids=ids).logits, model(input_ids=ids).logits)
        assert not torch.allclose(policy(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_first_stages_frozen_teacher_scores_as_the_base(random_lab):
    """A copy of a fresh adapter, whose B is zero: the bare base's scores, to the bit."""
    model, tok = random_lab
    cfg = lora_config(loss_mode="sdpo", teacher_update_rate=0.0)
    policy = with_lora(model, cfg)
    teacher = s.Teacher(policy, cfg)
    ids = some_ids(tok)
    with torch.no_grad():
        scored = teacher.logits(policy, lambda m: m(input_ids=ids).logits)
        assert torch.equal(scored, model(input_ids=ids).logits)


def test_the_teacher_and_the_reference_cost_no_copy_of_the_base(random_lab):
    model, _ = random_lab
    cfg = lora_config(loss_mode="sdpo")
    policy = with_lora(model, cfg)
    teacher = s.Teacher(policy, cfg)
    n_adapter = sum(p.numel() for p in student_adapter(policy))
    assert sum(p.numel() for p in teacher.model.parameters()) == n_adapter
    assert list(s.frozen_copy(policy, "base").parameters()) == []
    assert n_adapter < sum(p.numel() for p in model.parameters()) / 5


def test_a_lora_run_resumes_to_the_same_result(tiny_base, tmp_path):
    """SDPO with the EMA teacher over two stages, cut after stage 1 and resumed: the adapters of
    the policy and of the teacher come back from the checkpoint, and stage 2 repeats exactly."""
    model, tok = tiny_base
    cfg = lora_config(loss_mode="sdpo", prompts_per_step=4, group_size=8, max_new_tokens=24,
                      steps_per_task=2, eval_examples=8, eval_samples=4, lr=3e-3)

    full, resumed = run_and_resume(cfg, model, tok, tmp_path)
    for sub in ("policy", "teacher"):
        assert (tmp_path / "a" / "stage1" / sub / lora.ADAPTER_FILE).exists()
    assert full[2]["param_drift"]["overall"] > 0
    assert resumed == full


@computed_ahead("lora_learning_records")
def eight_steps_of_grpo_with_lora(_folder):
    """The records of eight steps of grpo_lora on lab-short's math. Computed beside the tests
    (conftest.py)."""
    model, tok = run_sequence.load_policy("lab-short")
    cfg = run_sequence.method_config("grpo_lora", {"steps_per_task": 8, "seed": 0}, {},
                                     lambda **k: lab.lab_config("lab-short", **k))
    policy = lora.add_lora(copy.deepcopy(model), cfg)
    return s.continual_sequence(cfg, policy, tok, [lab.make_lab_task("math", "lab-short")])


def test_the_lab_learns_with_lora(lora_learning_records):
    """Eight steps of GRPO with a rank-8 adapter at ten times the full learning rate (verl's
    advice for LoRA) raise math accuracy beyond noise, as full fine-tuning does
    (test_learning.py)."""
    (before, after), (se_before, se_after) = (
        [r[key]["math"] for r in lora_learning_records] for key in ("accuracy", "stderr"))
    noise = 3 * math.sqrt(se_before ** 2 + se_after ** 2)
    assert after - before > noise, f"{before:.2f} -> {after:.2f} (3 s.e. {noise:.2f})"


def test_lora_without_peft_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from conftest import tiny_argv
    monkeypatch.setitem(sys.modules, "peft", None)        # as if it were not installed
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(tiny_argv("lora_rank=4") + ["--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "needs the peft package, which is not installed: pip install peft" in (
        capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_print_verl_gives_verls_lora_keys():
    from harness import verl
    cfg = lora_config(lora_rank=8, lora_target_modules="q_proj,v_proj", loss_mode="sdpo",
                      teacher_bf16=True)
    out = verl.verl_overrides(cfg, "base", 1, 1, "base")
    assert {"actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16.0",
            "actor_rollout_ref.model.target_modules=[q_proj,v_proj]",
            "actor_rollout_ref.ref.fsdp_config.model_dtype=bf16"} <= set(out)


@pytest.mark.parametrize("method", ["sdpo_live", "sdpo_trust_region", "stable_sdpo", "sdpo_kl",
                                    "replay", "hybrid"])
def test_every_teacher_kind_replay_and_the_kl_anchor_train_with_lora(random_lab, method):
    """Two stages of one rollout batch each (replay draws from the first): the run finishes and
    the student's adapter has moved off its zero B."""
    model, tok = random_lab
    settings = dict(lora_rank=4, prompts_per_step=4, group_size=2, max_new_tokens=4,
                    steps_per_task=1, warmup_steps=0, lr=1e-2, eval_examples=2, eval_samples=1)
    cfg = run_sequence.method_config(method, settings, {},
                                     lambda **k: lab.lab_config("lab-short", **k))
    policy = with_lora(model, cfg)
    tasks = [lab.make_lab_task(name, "lab-short", n_train=4, n_test=2) for name in ("math", "code")]
    for task in tasks:
        task.reward = alternating_reward()
    records = s.continual_sequence(cfg, policy, tok, tasks)
    assert len(records) == 3
    assert any(p.any() for n, p in policy.named_parameters() if "lora_B.default." in n)
