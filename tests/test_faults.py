"""Faults during a run: a non-finite gradient never reaches the weights or a checkpoint, a
damaged finished stage is recomputed rather than trusted, one writer per run folder, and
Ctrl-C says how to resume. Every finished stage is kept."""
import json
import subprocess
import sys

import pytest
import torch

import run_sequence
import sdpo_cl as s
from harness import lab
from harness import runs

TINY = ["--tasks", "math,code", "--probes", "", "--steps", "1", "--lab-steps", "30",
        "--methods", "grpo", "--set", "prompts_per_step=4", "eval_examples=4"]


def test_a_non_finite_gradient_stops_before_the_optimizer_step():
    tok = lab.build_lab_tokenizer()
    model = lab.build_lab_model(tok)
    task = lab.make_lab_task("math")
    task.reward = lambda c, ex: float(len(c) % 2)
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).register_hook(lambda g: g * float("nan"))   # finite loss, NaN grad
    cfg = lab.lab_config(loss_mode="grpo", prompts_per_step=4, warmup_steps=0, steps_per_task=2)
    with pytest.raises(FloatingPointError, match="stage x: step 0: non-finite gradient norm"):
        s.train_task(model, tok, None, task, cfg, rng=s.seed_everything(0), desc="stage x")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_diverging_run_stops_with_the_stage_and_keeps_what_is_finished(tmp_path, capsys):
    """The case from the bug report: lr 1 with a huge weight decay."""
    argv = TINY + ["lr=1.0", "weight_decay=1e6", "warmup_steps=0", "--steps", "2,2",
                   "--out", str(tmp_path), "--name", "nan"]
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "grpo seed 0 stage 1/2 math: step 0: non-finite" in err
    assert "Every finished stage is kept" in err
    folder = tmp_path / "nan" / "grpo" / "seed0"
    assert runs.last_finished_stage(folder) == 0 and not (folder / "stage1").exists()
    json.loads((tmp_path / "nan" / "results.json").read_text())   # strict JSON
    for p in (folder / "stage0" / "policy").glob("*.safetensors"):
        from safetensors.torch import load_file
        assert all(torch.isfinite(t).all() for t in load_file(str(p)).values())


def test_a_damaged_finished_stage_is_recomputed_not_trusted(tmp_path, capsys):
    argv = TINY + ["--out", str(tmp_path), "--name", "r"]
    first = run_sequence.main(argv)
    weights = next((tmp_path / "r" / "grpo" / "seed0" / "stage1" / "policy").glob(
        "*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])                  # a damaged file
    capsys.readouterr()
    again = run_sequence.main(argv)
    out = capsys.readouterr().out
    assert "stage 1 is damaged" in out and "recomputed" in out and "resuming grpo/seed0" in out
    assert again["runs"]["grpo"]["0"]["R"] == first["runs"]["grpo"]["0"]["R"]


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(SystemExit) as stop:
            run_sequence.main(TINY + ["--out", str(tmp_path), "--name", "r"])
        assert stop.value.code == 2
        assert f"is in use by process {sleeper.pid}" in capsys.readouterr().err
        assert not (folder / "config.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    run_sequence.main(TINY + ["--out", str(tmp_path), "--name", "r"])   # the owner is gone
    assert "taking over the lock" in capsys.readouterr().out
    assert not (folder / ".lock").exists()                              # released at the end


def test_ctrl_c_says_how_to_resume_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    argv = TINY + ["--out", str(tmp_path), "--name", "r"]
    train_task = s.train_task

    def interrupted_in_stage_2(*args, **kwargs):
        if "stage 2" in kwargs["desc"]:
            raise KeyboardInterrupt
        return train_task(*args, **kwargs)

    monkeypatch.setattr(s, "train_task", interrupted_in_stage_2)
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 130
    assert "interrupted during grpo seed 0 after stage 1; run the same command to resume" in err
    assert len(err.strip().splitlines()) == 1                        # no traceback
    monkeypatch.setattr(s, "train_task", train_task)
    run_sequence.main(argv)
    assert "resuming grpo/seed0 after stage 1" in capsys.readouterr().out
