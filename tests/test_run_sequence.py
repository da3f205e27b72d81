"""End to end: run_sequence.py on a tiny setting writes a complete run folder, resumes, and
refuses bad input before training."""
import json

import pytest

import run_sequence
from harness import lab

TINY = ["--tasks", "math,code", "--probes", "tool", "--steps", "2", "--lab-steps", "30",
        "--methods", "grpo,sdpo", "--set", "prompts_per_step=4", "eval_examples=10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    results = run_sequence.main(TINY + ["--out", str(out), "--name", "smoke"])
    return out / "smoke", results


def test_run_folder_has_every_output(run):
    folder, _ = run
    for name in ("config.json", "results.json", "log.jsonl", "report.md", "accuracy.png",
                 "drift.png"):
        assert (folder / name).is_file(), name
    for method in ("grpo", "sdpo"):
        for k in range(3):
            assert (folder / method / "seed0" / f"stage{k}" / "policy").is_dir()
    assert (folder / "sdpo" / "seed0" / "stage2" / "teacher").is_dir()
    assert not (folder / "grpo" / "seed0" / "stage2" / "teacher").exists()


def test_log_has_one_line_per_step(run):
    folder, _ = run
    lines = [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2                      # methods x stages x steps
    assert {(l["method"], l["stage"], l["step"]) for l in lines} == {
        (m, k, s) for m in ("grpo", "sdpo") for k in (1, 2) for s in (0, 1)}
    assert all("reward" in l and "seconds" in l for l in lines)
    assert all("distill_frac" in l for l in lines if l["method"] == "sdpo")


def test_results_hold_the_accuracy_matrix_and_measures(run):
    _, results = run
    assert results["tasks"] == ["math", "code", "tool"] and results["trained"] == [0, 1]
    r = results["runs"]["sdpo"]["0"]
    assert len(r["R"]) == 3 and all(len(row) == 3 for row in r["R"])
    last = r["records"][-1]
    for key in ("param_drift", "response_kl", "artifacts", "stderr"):
        assert key in last
    assert last["param_drift"]["overall"] > 0
    assert set(r["records"][0]["teacher_lift"]) == {"math", "code", "tool"}
    assert r["records"][0] == results["runs"]["grpo"]["0"]["records"][0]   # row 0 is shared


def test_report_compares_the_methods(run):
    folder, _ = run
    text = (folder / "report.md").read_text()
    assert "| grpo | 1 |" in text and "| sdpo | 1 |" in text and "accuracy.png" in text


def test_eval_forgetting_pairs_against_any_method_that_ran(run, tmp_path, capsys):
    import eval_forgetting
    folder, _ = run
    eval_forgetting.main([str(folder), "--out", str(tmp_path), "--baselines", "grpo,sdpo"])
    text = (tmp_path / "report.md").read_text()
    assert "| method − grpo |" in text and "| method − sdpo |" in text
    with pytest.raises(SystemExit):
        eval_forgetting.main([str(folder), "--out", str(tmp_path), "--baselines", "ppo"])
    assert "['ppo'] did not run here" in capsys.readouterr().err


def test_the_same_command_resumes_without_retraining(run, capsys):
    folder, results = run
    again = run_sequence.main(TINY + ["--out", str(folder.parent), "--name", "smoke"])
    assert "finished earlier" in capsys.readouterr().out
    assert again["runs"] == json.loads(json.dumps(results["runs"]))


def test_a_folder_with_other_settings_is_not_overwritten(run, capsys):
    folder, _ = run
    with pytest.raises(SystemExit):
        run_sequence.main(TINY[:-2] + ["eval_examples=5", "--out", str(folder.parent),
                                       "--name", "smoke"])
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "eval_examples: was 10, now 5" in err


def test_a_copied_run_folder_resumes(run, capsys, tmp_path):
    import shutil
    folder, results = run
    shutil.copytree(folder, tmp_path / "copy")
    again = run_sequence.main(TINY + ["--out", str(tmp_path), "--name", "copy"])
    assert "finished earlier" in capsys.readouterr().out
    assert again["runs"] == json.loads(json.dumps(results["runs"]))


def test_grpo_takes_four_optimizer_steps_per_batch_and_grpo_one_step_one():
    import sdpo_cl as sc
    settings = {"prompts_per_step": 32}
    four = run_sequence.method_config("grpo", settings, {}, lab.lab_config)
    one = run_sequence.method_config("grpo_one_step", settings, {}, lab.lab_config)
    assert len(sc.minibatches(four, 32 * four.group_size)) == 4
    assert len(sc.minibatches(one, 32 * one.group_size)) == 1
