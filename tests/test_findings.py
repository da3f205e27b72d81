"""Every finding of the paper is one command: a preset that runs the experiment it needs and
writes a report section with its figure. Tiny settings here; the README has the real runs."""
import json
import re

import pytest

import run_sequence
from conftest import computed_ahead, tiny_argv
from harness import lab_families

TINY = tiny_argv("eval_every=1", tasks=None, probes=None, methods=None, steps="2") + [
    "--seeds", "0"]

# What the paper reports for each finding, in its own words: the help must say it.
PAPER_SAYS = {"teacher-stability": "stable teachers outperform", "ood": "an inverted U",
              "continual": "SDPO accumulates forgetting", "drift": "larger parameter and response",
              "collapse": "amplified through the teacher-student loop", "cot": "chain of thought",
              "dose": "content and format errors"}


def test_help_says_what_each_finding_reports(capsys):
    with pytest.raises(SystemExit):
        run_sequence.main(["--help"])
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))   # wraps, at hyphens too
    assert set(PAPER_SAYS) == set(run_sequence.FINDINGS)
    for name, words in PAPER_SAYS.items():
        said = text.split(f"{name}: the paper: ")[1].split(". Look at")[0]
        assert words in said, name


@pytest.fixture
def planned(monkeypatch):
    """main(argv) -> the arguments it would plan the run from (nothing runs)."""
    seen = []
    monkeypatch.setattr(run_sequence, "plan_run", lambda args: seen.append(args))
    return lambda argv: (run_sequence.main(argv), seen[-1])[1]


def test_a_finding_sets_the_experiment_it_needs(planned):
    args = planned(["--finding", "ood"])
    assert (args.methods, args.tasks, args.probes, args.steps, args.seeds) == (
        "sdpo,sdpo_frozen,grpo", "math,science,tool,code", "mcq_math,math_words," + ",".join(
            lab_families.LADDER), "paper", "0,1,2")
    assert args.name == "ood"
    continual = planned(["--finding", "continual"])
    assert continual.tasks == "math,science,tool,code" and continual.steps == "paper"
    stability = planned(["--finding", "teacher-stability"])
    assert (stability.methods, stability.tasks, stability.probes, stability.steps) == (
        "grpo,sdpo_frozen,sdpo_ema01,sdpo_ema02,sdpo,stable_sdpo", "math", "math_hard", "25")
    drift = planned(["--finding", "drift"])
    assert drift.steps == "paper" and "eval_every=10" in drift.set
    assert drift.methods == "grpo,sdpo,sdpo_frozen,grpo_lr_tenth"      # the confound too
    collapse = planned(["--finding", "collapse"])
    assert (collapse.methods, collapse.tasks, collapse.steps) == ("grpo,sdpo",
                                                                   "math,science,tool,code",
                                                                   "paper")


@pytest.mark.parametrize("model, steps, expected", [
    ("lab", "paper", [25, 25, 25, 10]),                 # the paper's 50/50/50/20, times 0.5
    ("lab-short", "paper", [15, 15, 15, 6]),            # times 0.3
    ("some/hub-model", "paper", [50, 50, 50, 20]),      # a real model: the paper's own
    ("lab", None, [6, 6, 6, 3]),                        # the quick run's
    ("some/hub-model", None, [50, 50, 50, 50]),         # the official default per task
    ("lab", "7", [7, 7, 7, 7]),
    ("lab", "1,2,3,4", [1, 2, 3, 4])])
def test_the_stages_are_the_papers_scaled_on_a_lab_or_as_given(model, steps, expected):
    assert run_sequence.stage_steps(steps, model, 4) == expected


def test_only_the_quick_run_evaluates_on_fewer_prompts(planned):
    names = ["math", "science", "tool", "code"]
    quick = run_sequence.plan_configs(planned([]), names)[3]
    finding = run_sequence.plan_configs(planned(["--finding", "continual"]), names)[3]
    assert {c.eval_examples for c in quick.values()} == {50}
    assert {c.eval_examples for c in finding.values()} == {100}


def test_every_set_flag_counts(planned):
    args = planned(["--set", "alpha=1.0", "--set", "is_clip=null", "mask_ratio=0.5"])
    assert args.set == ["alpha=1.0", "is_clip=null", "mask_ratio=0.5"]


def test_flags_given_with_a_finding_win_and_sets_add_up(planned):
    args = planned(["--finding", "cot", "--methods", "sdpo", "--seeds", "7", "--set",
                    "alpha=1.0", "eval_every=5"])
    assert (args.methods, args.seeds, args.tasks) == ("sdpo", "7", "math_cot")
    assert args.set == ["eval_every=4", "alpha=1.0", "eval_every=5"]    # the last one wins


FIGURES = {"teacher-stability": ("curves.png", "stable_sdpo"),
           "collapse": ("collapse.png", "grpo,sdpo"), "drift": ("paper_drift.png", "sdpo"),
           "ood": ("ood.png", "grpo")}


@computed_ahead("finding_runs")
def run_four_findings(folder):
    """Each finding in FIGURES with one or two of its methods (its full list is checked above),
    two rollout batches of one task, on lab-short (whose families have no math_hard and no
    ladder: the probe is mcq_math here): {finding: (results, report.md, whether its figure was
    written, signal.json)}. Computed beside the tests (conftest.py)."""
    out = {}
    for finding, (figure, methods) in FIGURES.items():
        probes = ["--probes", "mcq_math"] if finding in ("teacher-stability", "ood") else []
        results = run_sequence.main(["--finding", finding, "--out", str(folder), "--methods",
                                     methods] + TINY + ["--tasks", "tool"] + probes)
        out[finding] = (results, (folder / finding / "report.md").read_text(),
                        (folder / finding / figure).is_file(),
                        json.loads((folder / finding / "signal.json").read_text()))
    return out


@pytest.mark.parametrize("finding", FIGURES)
def test_a_finding_writes_its_section_and_figure(finding_runs, finding):
    (figure, methods), (results, report, drawn, signal) = FIGURES[finding], finding_runs[finding]
    assert set(results["runs"]) == set(methods.split(","))
    assert f"## Finding: {finding}" in report and f"![{figure[:-4]}]({figure})" in report
    assert drawn
    assert set(signal) == set(results["tasks"][j] for j in results["trained"])
    departure = signal["tool"]["departure"]           # the self-teacher, on the dose's scale
    assert departure["scored"] == 0 or 0 <= departure["departure"] <= 1
    record = results["runs"][methods.split(",")[0]]["0"]["records"][1]
    if finding in ("teacher-stability", "drift"):
        assert [c["step"] for c in record["curve"]] == [1, 2]
        assert set(record["curve"][0]["paper_drift"]) == {"nss", "max_angle", "pm_overlap",
                                                          "pm_update"}
    assert len(record["train"]["series"]["reward"]) == 2
