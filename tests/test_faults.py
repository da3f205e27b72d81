"""Faults during a run: a non-finite gradient never reaches the weights or a checkpoint, a
non-finite metric is written as null (results.json and log.jsonl are strict JSON), a damaged
finished stage is recomputed rather than trusted, one writer per run folder, and Ctrl-C says how
to resume. Every finished stage is kept."""
import itertools
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import run_sequence
import sdpo_cl as s
from harness import lab
from harness import runs
from conftest import alternating_reward, tiny_argv

TINY = tiny_argv()


def strict_json(text):
    """json.loads refusing the bare NaN and Infinity that Python's json module writes and reads
    by default, and other readers refuse."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def weights(stage_folder):
    return load_file(str(next((stage_folder / "policy").glob("*.safetensors"))))


def test_a_non_finite_gradient_stops_before_the_optimizer_step():
    tok = lab.build_lab_tokenizer()
    model = lab.build_lab_model(tok)
    task = lab.make_lab_task("math", "lab-short")
    task.reward = alternating_reward()
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).register_hook(lambda g: g * float("nan"))   # finite loss, NaN grad
    cfg = lab.lab_config("lab-short", loss_mode="grpo", prompts_per_step=4, warmup_steps=0, steps_per_task=2)
    with pytest.raises(FloatingPointError, match="stage x: step 0: non-finite gradient norm"):
        s.train_task(model, tok, None, task, cfg, rng=s.seed_everything(0), desc="stage x")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_diverging_run_stops_with_the_stage_and_keeps_what_is_finished(tmp_path, capsys):
    """The case from the bug report: lr 1 with a huge weight decay."""
    argv = tiny_argv("lr=1.0", "weight_decay=1e6", "warmup_steps=0", steps="2") + [
        "--out", str(tmp_path), "--name", "nan"]
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "grpo seed 0 stage 1/1 math: step 0: non-finite" in err
    assert "Every finished stage is kept" in err
    folder = tmp_path / "nan" / "grpo" / "seed0"
    assert runs.last_finished_stage(folder) == 0 and not (folder / "stage1").exists()
    results = strict_json((tmp_path / "nan" / "results.json").read_text())
    row0 = strict_json((folder / "stage0" / "stage.json").read_text())["accuracy"]
    assert results["runs"]["grpo"]["0"]["R"] == [[row0["math"]]]


def test_a_fault_in_stage_2_keeps_stage_1_trained_finite_and_in_strict_json(tmp_path, capsys,
                                                                           monkeypatch):
    """SDPO on training prompts whose failures score NaN (the reward metrics are NaN, the loss is
    not: rewards only pick demonstrations), then a NaN gradient at stage 2's first step."""
    load_task, train_task = run_sequence.load_task, s.train_task

    def nan_failures_in_training(name, model):
        task = load_task(name, model)
        task.train = task.train.map(lambda ex: {"split": "train"})
        flips = itertools.cycle([1.0, float("nan")])
        task.reward = lambda c, ex: next(flips) if ex.get("split") == "train" else 0.0
        return task

    def nan_gradient_in_stage_2(policy, *args, **kwargs):
        if "stage 2" in kwargs["desc"]:
            next(policy.parameters()).register_hook(lambda g: g * float("nan"))
        return train_task(policy, *args, **kwargs)

    monkeypatch.setattr(run_sequence, "load_task", nan_failures_in_training)
    monkeypatch.setattr(s, "train_task", nan_gradient_in_stage_2)
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(tiny_argv("warmup_steps=0", tasks="math,code", methods="sdpo")
                          + ["--out", str(tmp_path), "--name", "r"])
    assert stop.value.code == 1
    assert "stage 2/2 code: step 0: non-finite gradient norm" in capsys.readouterr().err
    run, folder = tmp_path / "r", tmp_path / "r" / "sdpo" / "seed0"
    assert runs.last_finished_stage(folder) == 1 and not (folder / "stage2").exists()
    strict_json((folder / "stage1" / "stage.json").read_text())
    results = strict_json((run / "results.json").read_text())
    assert len(results["runs"]["sdpo"]["0"]["R"]) == 2
    assert results["runs"]["sdpo"]["0"]["records"][1]["train"]["series"]["reward"][0] is None  # NaN
    log = [strict_json(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in log] == [1] and log[0]["reward"] is None
    trained, base = weights(folder / "stage1"), weights(folder / "stage0")
    assert all(torch.isfinite(w).all() for w in trained.values())
    assert any(not torch.equal(trained[k], base[k]) for k in base)      # stage 1 trained


def test_a_damaged_finished_stage_is_recomputed_not_trusted(tmp_path, capsys):
    argv = TINY + ["--out", str(tmp_path), "--name", "r"]
    first = run_sequence.main(argv)
    damaged = next((tmp_path / "r" / "grpo" / "seed0" / "stage1" / "policy").glob(
        "*.safetensors"))
    damaged.write_bytes(damaged.read_bytes()[:1000])
    capsys.readouterr()
    again = run_sequence.main(argv)
    out = capsys.readouterr().out
    assert "grpo seed 0: stage 1 is damaged" in out and "it is recomputed" in out
    assert "resuming grpo/seed0 after stage 0" in out
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
    argv = tiny_argv(tasks="math,code") + ["--out", str(tmp_path), "--name", "r"]
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
    assert ("interrupted during grpo seed 0, which has kept stage 1; run the same command to "
            "resume") in err
    assert len(err.strip().splitlines()) == 1                        # no traceback
    monkeypatch.setattr(s, "train_task", train_task)
    run_sequence.main(argv)
    assert "resuming grpo/seed0 after stage 1" in capsys.readouterr().out
