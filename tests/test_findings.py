"""Every finding of the paper is one command: a preset that runs the experiment it needs and
writes a report section with its figure. Tiny settings here; the README has the real runs."""
import json

import pytest

import eval_forgetting
import run_sequence

TINY = ["--seeds", "0", "--steps", "2", "--lab-steps", "30", "--set", "prompts_per_step=4",
        "eval_examples=4", "eval_every=1"]


def test_help_says_what_each_finding_reports_and_what_to_look_at(capsys):
    with pytest.raises(SystemExit):
        run_sequence.main(["--help"])
    text = "".join(capsys.readouterr().out.split())     # help wraps lines, also at hyphens
    for name, finding in eval_forgetting.FINDINGS.items():
        assert name in text and "".join(finding["paper"].split()) in text


@pytest.mark.parametrize("finding, figure", [("teacher-stability", "curves.png"),
                                             ("collapse", "collapse.png")])
def test_a_finding_writes_its_section_and_figure(tmp_path, finding, figure):
    results = run_sequence.main(["--finding", finding, "--out", str(tmp_path)] + TINY)
    folder = tmp_path / finding
    assert set(results["runs"]) == set(eval_forgetting.FINDINGS[finding]["methods"].split(","))
    report = (folder / "report.md").read_text()
    assert f"## Finding: {finding}" in report and f"![{figure[:-4]}]({figure})" in report
    assert (folder / figure).is_file()
    signal = json.loads((folder / "signal.json").read_text())
    assert set(signal) == set(results["tasks"][j] for j in results["trained"])
    record = results["runs"]["grpo"]["0"]["records"][1]
    if finding == "teacher-stability":
        assert [c["step"] for c in record["curve"]] == [1, 2]
    assert len(record["train"]["series"]["reward"]) == 2
