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


def hub_sciknoweval():
    """Rows in the hub's SciKnowEval schema: 12 that the official preparation keeps (chemistry,
    level L3, 4- or 2-choice MCQ) and 3 it drops (another domain, level, type)."""
    from datasets import Dataset
    def row(i, domain="Chemistry", level="L3", kind="mcq-4-choices"):
        return {"question": f"Which is compound {i}?", "answerKey": "B", "domain": domain,
                "type": kind, "details": {"level": level},
                "choices": {"text": ["x", f"c{i}", "y", "z"], "label": ["A", "B", "C", "D"]}}
    rows = [row(i, kind="mcq-2-choices" if i % 3 else "mcq-4-choices") for i in range(12)]
    rows += [row(90, domain="Biology"), row(91, level="L2"), row(92, kind="true_or_false")]
    return Dataset.from_list(rows)


def test_sciknoweval_is_prepared_as_the_papers_fork_does(tmp_path):
    task = data.load_official_task(data.write_sciknoweval(hub_sciknoweval(), "chemistry",
                                                          tmp_path / "chem"))
    assert (len(task.train), len(task.test)) == (10, 2)          # 10% held out, seed 42
    ex = task.test[0]
    assert ex["prompt"].endswith("\n\nA: x\nB: c" + ex["prompt"].split("compound ")[1][0]
                                 + "\nC: y\nD: z\nPlease reason step by step.")
    assert ex["system"] == data.SCIKNOWEVAL_SYSTEM and ex["kind"] == "mcq"
    assert {r["prompt"].split("?")[0] for r in task.train}.isdisjoint(
        {r["prompt"].split("?")[0] for r in task.test})
    assert task.reward("<reasoning>...</reasoning>\n<answer>\nB\n</answer>", ex) == 1.0


def test_sciknoweval_without_hub_or_cache_fails_in_seconds_saying_how(tmp_path, monkeypatch):
    import time
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # as offline_unless_reachable sets them
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.time()
    with pytest.raises(ValueError, match="neither reachable nor cached here .* or pass the "
                                         "folder datasets/sciknoweval/chemistry"):
        data.load_sciknoweval("chemistry", tmp_path / "cache")
    assert time.time() - t0 < 30
    with pytest.raises(ValueError, match="unknown SciKnowEval domain 'chem'"):
        data.load_sciknoweval("chem", tmp_path / "cache")
