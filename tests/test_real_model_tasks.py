"""The real-model experiment's two tasks (benchmarks/real_model.py): official rows the loader
accepts, scored by the official GPQA reward, the gold letter on the right result, and no test
question among the training ones."""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import real_model                     # noqa: E402
from harness import data              # noqa: E402


def test_each_task_loads_in_the_official_layout_with_the_gpqa_reward(tmp_path):
    for folder in real_model.write_tasks(tmp_path):
        task = data.load_official_task(folder)
        assert {row["kind"] for row in task.train} == {"gpqa"}
        assert len(task.test) == 64 and len(task.train) > 50


def test_the_gold_letter_marks_the_right_result_among_four_options():
    for name, (text, result, _) in real_model.TASKS.items():
        for row in real_model.task_rows(name)["train"][:20]:
            asked = re.match(rf"What is (\d+) {re.escape(text)} (\d+)\?", row["prompt"])
            a, b = int(asked[1]), int(asked[2])
            options = dict(re.findall(r"^([ABCD])\. (\d+)$", row["prompt"], re.M))
            assert len(options) == 4 and int(options[row["answer"]]) == result(a, b)
            assert data.gpqa_reward(f"{row['answer']}. {result(a, b)}", row) == 1.0


def test_no_test_question_is_a_training_one():
    for name in real_model.TASKS:
        rows = real_model.task_rows(name)
        assert not {r["prompt"] for r in rows["test"]} & {r["prompt"] for r in rows["train"]}
