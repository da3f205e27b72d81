"""End to end: run_sequence.py on a tiny setting (the conftest's smoke_run: math then code, probe
tool, grpo and sdpo) writes a complete run folder whose numbers agree with each other: the
accuracy matrix is the stage records', row 0 is the base model's evaluation, the log is the
stages' training, the checkpoint is the model the stage measured, and the report and the printed
summary show the matrix's metrics, computed here by hand."""
import copy
import json

import pytest
from transformers import AutoModelForCausalLM

import eval_forgetting
from harness import measures
import sdpo_cl as s
from harness import lab
from conftest import coin_reward

TASKS, SAMPLES = ["math", "code", "tool"], 10 * 4       # eval_examples x eval_samples


def test_run_folder_has_every_output(smoke_run):
    folder, _, _ = smoke_run
    for name in ("config.json", "results.json", "signal.json", "log.jsonl", "report.md",
                 "accuracy.png", "drift.png"):
        assert (folder / name).is_file(), name
    for method in ("grpo", "sdpo"):
        for k in range(3):
            assert (folder / method / "seed0" / f"stage{k}" / "policy").is_dir()
    assert (folder / "sdpo" / "seed0" / "stage2" / "teacher").is_dir()
    assert not (folder / "grpo" / "seed0" / "stage2" / "teacher").exists()


def test_the_accuracy_matrix_is_the_stage_records(smoke_run):
    folder, results, _ = smoke_run
    assert results["tasks"] == TASKS and results["trained"] == [0, 1]
    assert json.loads((folder / "results.json").read_text())["runs"] == results["runs"]
    for method in ("grpo", "sdpo"):
        run = results["runs"][method]["0"]
        assert [r["task"] for r in run["records"]] == ["base", "math", "code"]
        for k, record in enumerate(run["records"]):
            assert run["R"][k] == [record["accuracy"][t] for t in TASKS]
            assert run["SE"][k] == [record["stderr"][t] for t in TASKS]
            assert all(round(a * SAMPLES) == pytest.approx(a * SAMPLES) for a in run["R"][k])


def test_row_0_is_the_base_models_evaluation_shared_by_every_method(smoke_run, tiny_base):
    _, results, _ = smoke_run
    cfg = lab.lab_config("lab-short", prompts_per_step=4, eval_examples=10, steps_per_task=2)
    tasks = [lab.make_lab_task(name, "lab-short") for name in TASKS]
    for task in tasks:
        task.reward = coin_reward
    again = s.base_row(tiny_base[0], tiny_base[1], tasks, cfg)["record"]
    for method in ("grpo", "sdpo"):
        row0 = results["runs"][method]["0"]["records"][0]
        assert row0["accuracy"] == again["accuracy"] and row0["stderr"] == again["stderr"]
        assert row0["teacher_lift"] == pytest.approx(again["teacher_lift"])


def test_the_log_is_the_stages_training(smoke_run):
    folder, results, _ = smoke_run
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [(x["method"], x["stage"], x["step"]) for x in lines] == [
        (m, k, step) for m in ("grpo", "sdpo") for k in (1, 2) for step in (0, 1)]
    for m in ("grpo", "sdpo"):
        records = results["runs"][m]["0"]["records"]
        for k in (1, 2):
            rewards = [x["reward"] for x in lines if x["method"] == m and x["stage"] == k]
            assert records[k]["train"]["series"]["reward"] == rewards
            assert all(round(r * 32) == pytest.approx(r * 32) for r in rewards)  # 4 x 8 samples
    # scored by the coin, every step of either method has something to learn from
    assert all(x["distill_frac"] > 0 for x in lines if x["method"] == "sdpo")
    assert all(x["zero_adv_groups"] < 1 for x in lines if x["method"] == "grpo")
    assert all(x["updates"] == 4 for x in lines if x["method"] == "grpo")      # 4 mini-batches


def test_the_last_checkpoint_is_the_model_whose_drift_was_measured(smoke_run, tiny_base):
    folder, results, _ = smoke_run
    policy = AutoModelForCausalLM.from_pretrained(folder / "sdpo" / "seed0" / "stage2" / "policy")
    drift = measures.parameter_drift(policy, tiny_base[0])
    recorded = results["runs"]["sdpo"]["0"]["records"][2]["param_drift"]
    assert drift["overall"] > 0 and drift["overall"] == pytest.approx(recorded["overall"])


def cells(table, method):
    row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def by_hand(R):
    """ACC, BWT, forgetting, FWT, plasticity and OOD of a two-task run with one probe."""
    return [(R[2][0] + R[2][1]) / 2, R[2][0] - R[1][0], R[1][0] - R[2][0], R[1][1] - R[0][1],
            ((R[1][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2, R[2][2] - R[0][2]]


def test_the_report_and_the_printed_summary_show_the_matrixs_metrics(smoke_run):
    folder, results, printed = smoke_run
    report = (folder / "report.md").read_text()
    for method in ("grpo", "sdpo"):
        row = cells(report, method)
        assert row[1] == "1" and " ± " not in " ".join(row)            # one seed: no interval
        summary = cells(printed, method)               # the printed summary: ACC, forgetting,
        assert summary[:5] == row[:3] + [row[4], row[6]]   # plasticity, as the report has them
        shown = [float(cell) for cell in row[2:8]]
        expected = [100 * v for v in by_hand(results["runs"][method]["0"]["R"])]
        assert shown == pytest.approx(expected, abs=0.051)


def test_the_paired_difference_is_sdpo_minus_grpo(smoke_run):
    folder, results, printed = smoke_run
    forgetting = [by_hand(results["runs"][m]["0"]["R"])[2] for m in ("sdpo", "grpo")]
    line = next(x for x in printed.splitlines() if x.startswith("sdpo − grpo: forgetting "))
    shown = line.split("forgetting ")[1].split(",")[0]
    assert "[" not in shown and float(shown) == pytest.approx(                # one seed: no
        100 * (forgetting[0] - forgetting[1]), abs=0.051)                     # interval
    row = cells((folder / "report.md").read_text().split("Paired differences against grpo")[1],
                "sdpo")
    assert row[1] == "1" and float(row[3]) == pytest.approx(float(shown), abs=0.051)


def test_eval_forgetting_pairs_against_any_method_that_ran(smoke_run, tmp_path, capsys):
    folder, _, _ = smoke_run
    eval_forgetting.main([str(folder), "--out", str(tmp_path), "--baselines", "grpo,sdpo"])
    text = (tmp_path / "report.md").read_text()
    assert "| method − grpo |" in text and "| method − sdpo |" in text
    assert cells(text.split("| method − sdpo |")[1], "grpo")[1] == "1"
    with pytest.raises(SystemExit):
        eval_forgetting.main([str(folder), "--out", str(tmp_path), "--baselines", "ppo"])
    assert "['ppo'] did not run here" in capsys.readouterr().err


def test_a_report_names_the_runs_it_left_out_unfinished(smoke_run, tmp_path):
    _, results, _ = smoke_run
    cut = copy.deepcopy(results)
    cut["runs"]["sdpo"]["0"]["R"] = cut["runs"]["sdpo"]["0"]["R"][:-1]     # stopped a stage short
    text = eval_forgetting.write_report(cut, tmp_path)
    assert "Not finished, so left out of the comparisons: sdpo seed 0" in text
