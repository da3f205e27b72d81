"""One training step and the continual sequence on a tiny lab base (built in seconds)."""
import copy
import json

import pytest
import torch

import run_sequence
import sdpo_cl as s
from harness import lab

RECIPE = lab.LabRecipe(families=("math", "code"), steps=40)


@pytest.fixture(scope="module")
def base():
    return lab.lab_base(RECIPE, verbose=False)


def one_step(model, tok, cfg, task, seed=0):
    teacher = s.Teacher(model, cfg) if cfg.loss_mode == "sdpo" else None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    torch.manual_seed(seed)
    return s.train_step(model, tok, teacher, opt, sched, task,
                        [task.train[i] for i in range(cfg.prompts_per_step)], cfg)


@pytest.mark.parametrize("kw", [dict(loss_mode="grpo"), dict(loss_mode="sdpo"),
                                dict(loss_mode="sdpo", distillation_weight=0.5),
                                dict(loss_mode="sdpo", loss_agg_mode="seq-mean-token-mean")])
def test_micro_batches_give_the_same_update_as_the_whole_batch(base, kw):
    model, tok = base
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: float(len(c) <= 2)   # mixed rewards whatever the model says
    params = []
    for mb in (0, 16):
        m = copy.deepcopy(model)
        metrics = one_step(m, tok, lab.lab_config(micro_batch_size=mb, lr=1.0, **kw), task)
        params.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    moved = (params[0] - torch.cat([p.flatten() for p in model.parameters()])).abs().max()
    assert moved > 1e-4                                # the step did something
    assert torch.allclose(params[0], params[1], atol=1e-5)
    assert metrics["reward"] >= 0 and metrics["seconds"] > 0


def test_sdpo_step_reports_distillation_metrics(base):
    model, tok = copy.deepcopy(base[0]), base[1]
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: float(len(c) <= 2)
    m = one_step(model, tok, lab.lab_config(loss_mode="sdpo"), task)
    assert 0 < m["distill_frac"] <= 1 and not m["empty_target"]
    for key in ("loss_sdpo", "divergence", "entropy", "response_length", "t_rollout",
                "t_teacher"):
        assert key in m


def test_every_teacher_kind_is_the_policy_itself_at_the_first_step(base):
    """ema, frozen, trust-region and live teachers all start as the policy, so the first step's
    distillation loss is the same whichever runs it (live scores with the training policy)."""
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: float(len(c) <= 2)
    losses = []
    for kind in s.TEACHER_KINDS:
        model = copy.deepcopy(base[0])
        model.gradient_checkpointing_enable()
        m = one_step(model, base[1], lab.lab_config(loss_mode="sdpo", teacher_regularization=kind),
                     task)
        losses.append(m["loss_sdpo"])
    assert losses[0] > 0
    assert losses == pytest.approx([losses[0]] * len(losses), abs=1e-6)


def test_a_step_without_any_demonstration_is_an_empty_target_step(base):
    model, tok = copy.deepcopy(base[0]), base[1]
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: 0.0
    m = one_step(model, tok, lab.lab_config(loss_mode="sdpo"), task)
    assert m["empty_target"] and m["distill_frac"] == 0 and m["loss"] == 0


def test_non_finite_loss_stops_with_the_step_and_last_metrics(base):
    model, tok = copy.deepcopy(base[0]), base[1]
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: float("nan")
    cfg = lab.lab_config(loss_mode="grpo", steps_per_task=2)
    with pytest.raises(FloatingPointError, match="step 0"):
        s.train_task(model, tok, None, task, cfg, rng=s.seed_everything(0))


def test_continual_sequence_resumes_to_the_same_result(base, tmp_path):
    model, tok = base
    seq = [lab.make_lab_task("math", n_test=20), lab.make_lab_task("code", n_test=20)]
    cfg = lab.lab_config(loss_mode="sdpo", steps_per_task=3, eval_examples=20)
    full = run_sequence.run_in_folder(cfg, copy.deepcopy(model), tok, seq, [], tmp_path / "a")
    assert [r["task"] for r in full] == ["base", "math", "code"]
    assert set(full[2]["accuracy"]) == {"math", "code"}
    assert (tmp_path / "a" / "stage2" / "teacher").is_dir()
    # a crash during stage 2: its checkpoint never appeared (writes are atomic)
    import shutil
    part = tmp_path / "b"
    shutil.copytree(tmp_path / "a", part)
    shutil.rmtree(part / "stage2")
    resumed = run_sequence.run_in_folder(cfg, copy.deepcopy(model), tok, seq, [], part)
    def strip(record):                                 # everything but wall-clock times
        out = {k: v for k, v in record.items() if k != "seconds"}
        out["train"] = {k: v for k, v in record.get("train", {}).items() if k != "seconds_per_step"}
        return out

    assert [strip(r) for r in resumed] == [strip(r) for r in full]
    assert json.loads((part / "stage2" / "stage.json").read_text())["task"] == "code"


def test_gradient_checkpointing_leaves_the_update_unchanged(base):
    model, tok = base
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: float(len(c) <= 2)
    params = []
    for ckpt in (False, True):
        m = copy.deepcopy(model)
        cfg = lab.lab_config(loss_mode="sdpo", steps_per_task=1, gradient_checkpointing=ckpt)
        s.train_task(m, tok, s.Teacher(m, cfg), task, cfg, rng=s.seed_everything(0, "ckpt"))
        assert m.is_gradient_checkpointing == ckpt
        params.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_kl_to_the_frozen_reference_is_used_when_its_coefficient_is_positive(base):
    model, tok = base
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: float(len(c) <= 2)
    cfg = lab.lab_config(loss_mode="grpo", kl_loss_coef=0.1, steps_per_task=3)
    m = copy.deepcopy(model)
    history = s.train_task(m, tok, None, task, cfg, rng=s.seed_everything(0, "kl"),
                           reference=copy.deepcopy(model).requires_grad_(False))
    assert history[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)   # policy == reference at first
    assert history[-1]["kl_ref"] > 0                                  # then it moves away
    with pytest.raises(ValueError, match="kl_loss_coef > 0 needs the frozen reference"):
        s.train_task(m, tok, None, task, cfg, rng=s.seed_everything(0))
