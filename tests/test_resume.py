"""Resuming a run: a sequence cut after a finished stage resumes to exactly the uninterrupted
result (on one machine); the same command on a finished folder, or on a copy of it, retrains
nothing; a folder that holds other settings is refused and left as it was."""
import json
import shutil

import pytest

import run_sequence
from harness import lab
from conftest import SMOKE_ARGV, run_and_resume


def test_a_sequence_cut_after_stage_1_resumes_to_the_same_result(tiny_base, tmp_path):
    """SDPO with the EMA teacher, so that stage 2 depends on the policy and the teacher stage 1
    left; the alternating reward is asked an even number of times per evaluation and step, so it
    answers the resumed stage as it did the uninterrupted one."""
    model, tok = tiny_base
    cfg = lab.lab_config("lab-short", loss_mode="sdpo", prompts_per_step=4, steps_per_task=2,
                         eval_examples=8, warmup_steps=0)

    full, resumed = run_and_resume(cfg, model, tok, tmp_path)
    assert [r["task"] for r in full] == ["base", "math", "code"]
    assert full[1]["param_drift"]["overall"] > 0 and set(full[2]["train"]["series"]["distill_frac"]) == {1.0}
    assert resumed == full
    assert json.loads((tmp_path / "b" / "stage2" / "stage.json").read_text())["task"] == "code"


def test_the_same_command_resumes_without_retraining(smoke_run, capsys):
    folder, results, _ = smoke_run
    again = run_sequence.main(SMOKE_ARGV + ["--out", str(folder.parent), "--name", "smoke"])
    out = capsys.readouterr().out
    assert "grpo seed 0: finished earlier, kept" in out and "sdpo seed 0: finished earlier" in out
    assert again["runs"] == json.loads(json.dumps(results["runs"]))


def test_a_copied_run_folder_resumes(smoke_run, capsys, tmp_path):
    folder, results, _ = smoke_run
    shutil.copytree(folder, tmp_path / "copy")
    again = run_sequence.main(SMOKE_ARGV + ["--out", str(tmp_path), "--name", "copy"])
    assert "finished earlier" in capsys.readouterr().out
    assert again["runs"] == json.loads(json.dumps(results["runs"]))


def test_a_folder_with_other_settings_is_refused_and_left_as_it_was(smoke_run, capsys):
    folder, _, _ = smoke_run
    config = (folder / "config.json").read_text()
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(SMOKE_ARGV + ["eval_examples=5", "--out", str(folder.parent), "--name",
                                        "smoke"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "eval_examples: was 10, now 5" in err
    assert (folder / "config.json").read_text() == config and not (folder / ".lock").exists()


def test_a_resume_on_edited_task_data_is_refused(official_task, tmp_path, capsys):
    """A run records a hash of every task's rows; after the data changed, the same command is
    refused instead of mixing the two datasets in one accuracy matrix."""
    from conftest import tiny_argv, write_jsonl, MCQ_ROWS
    argv = tiny_argv(tasks=str(official_task), probes="", steps="1", methods="grpo") + [
        "--seeds", "0", "--out", str(tmp_path), "--name", "edited"]
    run_sequence.main(argv)
    write_jsonl(official_task / "train.json", MCQ_ROWS[1:] + MCQ_ROWS[:1])   # reordered rows
    with pytest.raises(SystemExit) as stop:
        run_sequence.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "data_sha256" in err
