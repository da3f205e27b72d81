"""Tasks in the official SDPO data layout (train.json and test.json, JSON lines) and GSM8K in the
hub's schema, offline: rows, system and kind load; a malformed row names its file, line and
field; GSM8K gets the official math prompt and reward."""
import pytest

import run_sequence
from harness import data
from conftest import MCQ_ROWS, write_jsonl


def test_official_layout_loads_rows_system_and_kind(official_task):
    task = run_sequence.load_task(str(official_task))
    assert task.name == "letters" and len(task.train) == 4 and len(task.test) == 2
    assert task.test[0]["system"].startswith("Answer with") and task.test[0]["kind"] == "mcq"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q", "answer": "a"}\n{not json}\n', "train.json, line 2: not valid JSON"),
    ('{"prompt": "q"}\n', "train.json, line 1: field 'answer' must be a non-empty string"),
    ('{"prompt": "", "answer": "a"}\n', "line 1: field 'prompt' must be a non-empty string"),
    ('{"prompt": "q", "answer": "a", "system": 3}\n', "line 1: field 'system' must be a string"),
    ('["q", "a"]\n', "line 1: expected a JSON object"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, message):
    (tmp_path / "train.json").write_text(line)
    write_jsonl(tmp_path / "test.json", MCQ_ROWS)
    with pytest.raises(ValueError, match=message):
        data.load_official_task(tmp_path)


def test_missing_split_is_refused(tmp_path):
    write_jsonl(tmp_path / "train.json", MCQ_ROWS)
    with pytest.raises(ValueError, match="has no test.json"):
        data.load_official_task(tmp_path)


def test_gsm8k_rows_get_the_official_math_prompt_and_reward(tmp_path):
    from datasets import load_dataset
    rows = [{"question": "Tom has 3 apples and buys 4. How many? ",
             "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "A farm sells 1,200 eggs twice. How many?",
             "answer": "1,200 * 2 = 2,400\n#### 2,400"}]
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    hub = load_dataset("json", data_files={k: str(tmp_path / f"{k}.jsonl")
                                           for k in ("train", "test")})
    task = data.gsm8k_task(hub)
    ex = task.test[1]
    assert ex["prompt"] == rows[1]["question"] + data.MATH_PROMPT_SUFFIX
    assert ex["answer"] == "2400" and ex["kind"] == "math"
    assert task.reward("2 * 1200 = 2400, so \\boxed{2400}", ex) == 1.0
    assert task.reward("The answer is 2400", ex) == 0.0          # the official reward wants a box
    assert task.reward("\\boxed{2300}", ex) == 0.0
    assert "\\boxed{your_answer}" in task.feedback("It is 2300.", ex)
    assert task.feedback("\\boxed{2400}", ex) is None
