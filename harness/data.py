"""The paper's data: the official SDPO layout (a folder with train.json and test.json), the
official rewards chosen by each row's `kind`, and GSM8K from the hub.

The official code picks a reward by each row's data source; here by its `kind` (the official
layout's field for it): mcq (SciKnowEval, GPQA), tooluse (ToolAlpaca), math (DAPO-Math,
MATH-500, GSM8K) and code. A row without a kind is scored by normalised exact match, an addition
of this project. Model-written code runs only in a separate, limited process (sandbox.py).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from sdpo_cl import Task
from harness.models import offline_unless_reachable
from harness.sandbox import run_untrusted_code

OFFICIAL_KINDS = ("mcq", "tooluse", "math", "code", "")
MATH_PROMPT_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def mcq_choice(text: str) -> str:
    """The official multiple-choice extraction: the text after the last <answer> up to the next
    </answer>, stripped; without any tag, the whole text (cut at a stray </answer>)."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def mcq_reward(completion: str, example: dict) -> float:
    """1 iff the chosen text equals the gold letter, exactly (case-sensitive), as the official
    `mcq` reward. The gold may be written `B` or `<answer>B</answer>`."""
    return float(mcq_choice(completion) == mcq_choice(example["answer"]))


def tool_calls(text: str):
    """The official tool-use parse: every name after `Action:` (a multiset), and the JSON objects
    after `Action Input:` merged into one dict (later keys win; unparsable ones are skipped).
    The object match stops at the first `}`, so nested objects do not parse, as officially."""
    names = re.findall(r"Action:\s*(\w+)", text)
    merged = {}
    for block in re.findall(r"Action Input:\s*({.*?})", text, flags=re.DOTALL):
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            merged.update(value)
    return names, merged


def gold_tool_calls(answer: str):
    """The gold calls of a tooluse row: a JSON list of {"Action", "Action_Input"}, where the
    input is a JSON object or a string holding one."""
    names, merged = [], {}
    for call in json.loads(answer):
        names.append(call["Action"])
        value = call.get("Action_Input", {})
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = {}
        merged.update(value if isinstance(value, dict) else {})
    return names, merged


def tooluse_reward(completion: str, example: dict) -> float:
    """1 iff the called names equal the gold ones as a multiset and the merged inputs equal the
    merged gold inputs exactly (types and empty fields included)."""
    names, inputs = tool_calls(completion)
    gold_names, gold_inputs = gold_tool_calls(example["answer"])
    return float(Counter(names) == Counter(gold_names) and inputs == gold_inputs)


def tooluse_feedback(completion: str, example: dict) -> str | None:
    """What did not match. Like the official feedback, it shows the expected calls: it reaches
    the teacher only with include_environment_feedback (off in the paper's runs)."""
    names, inputs = tool_calls(completion)
    gold_names, gold_inputs = gold_tool_calls(example["answer"])
    parts = []
    if Counter(names) != Counter(gold_names):
        parts.append(f"Actions mismatch: predicted {names}, expected {gold_names}")
    if inputs != gold_inputs:
        parts.append(f"Action inputs mismatch: predicted {inputs}, expected {gold_inputs}")
    return "; ".join(parts) or None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in the last 100 characters (the official window), or
    None without one; '' when its braces do not close."""
    tail = text[-100:]
    start = tail.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(tail)):
        depth += {"{": 1, "}": -1}.get(tail[j], 0)
        if depth == 0:
            return tail[i:j]
    return ""


def math_reward(completion: str, example: dict) -> float:
    """The last boxed answer equals the gold as a string, or math-verify finds them equal
    (parse both, verify, 5 s timeouts), as the official math reward."""
    answer = last_boxed(completion)
    if not answer:
        return 0.0
    if answer == example["answer"]:
        return 1.0
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("the math reward needs the math-verify package: "
                          "pip install math-verify") from None
    try:
        return float(verify(parse(example["answer"]), parse(answer)))
    except Exception:                      # a parse the verifier cannot handle scores 0
        return 0.0


def math_feedback(completion: str, example: dict) -> str | None:
    """Only the format, never the answer (the official default)."""
    if last_boxed(completion):
        return None
    return ("Your answer had the wrong format. The solution must be given in the format: "
            "\\boxed{your_answer}.")


def code_block(text: str) -> str | None:
    """The longest fenced code block (```python ... ```), as the official code reward takes it."""
    blocks = re.findall(r"```[\w+-]*\n(.*?)```", text, flags=re.DOTALL)
    return max(blocks, key=len) if blocks else None


def code_tests(example: dict) -> dict:
    """A code row's tests, the official format: {"inputs": [...], "outputs": [...],
    "testtype": "stdin" or "functional", "fn_name": name for functional tests}."""
    tests = example["tests"]
    return json.loads(tests) if isinstance(tests, str) else tests


def code_result(completion: str, example: dict) -> dict:
    """Run the completion's code on the row's tests in a sandbox (see run_untrusted_code)."""
    code = code_block(completion)
    if code is None:
        return {"passed": False, "feedback": "Incorrect format: put your code inside a "
                                             "```python ... ``` block."}
    tests = code_tests(example)
    return run_untrusted_code(code, tests)


def code_reward(completion: str, example: dict) -> float:
    """1 iff every test passes."""
    return float(code_result(completion, example)["passed"])


def code_feedback(completion: str, example: dict) -> str | None:
    """The first failing test or error, shortened."""
    result = code_result(completion, example)
    return None if result["passed"] else result["feedback"]


OFFICIAL_REWARDS = {"mcq": (mcq_reward, None), "tooluse": (tooluse_reward, tooluse_feedback),
                    "math": (math_reward, math_feedback), "code": (code_reward, code_feedback)}


def official_reward(completion: str, example: dict) -> float:
    """The official reward of the row's kind; a row without a kind: normalised exact match of
    the text inside the last <answer> tag, or of the whole completion without one."""
    if example["kind"] in OFFICIAL_REWARDS:
        return OFFICIAL_REWARDS[example["kind"]][0](completion, example)
    return float(normalize(mcq_choice(completion)) == normalize(example["answer"]))


def official_well_formed(completion: str, example: dict) -> bool:
    """Whether a completion has the form its reward parses, right or wrong (the format-artifact
    measure): mcq one capital letter (inside the last <answer> tag, or the whole completion);
    tooluse an `Action:` line; math a \\boxed{} in the last 100 characters; code a fenced block.
    Rows without a kind are not judged."""
    kind = example["kind"]
    if kind == "mcq":
        return re.fullmatch(r"[A-Z]", mcq_choice(completion).strip()) is not None
    if kind == "tooluse":
        return re.search(r"Action:\s*\w+", completion) is not None
    if kind == "math":
        return bool(last_boxed(completion))
    if kind == "code":
        return code_block(completion) is not None
    return True


def official_feedback(completion: str, example: dict) -> str | None:
    reward_and_feedback = OFFICIAL_REWARDS.get(example["kind"])
    if reward_and_feedback is None or reward_and_feedback[1] is None:
        return None
    return reward_and_feedback[1](completion, example)


def read_official_rows(path: Path) -> list:
    """JSON lines with `prompt` and `answer` (strings), optional `system`, `kind` (one of
    OFFICIAL_KINDS) and, for code rows, `tests`. A malformed row raises one error naming the
    file, the line and the field."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt and answer")
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{where}: field {key!r} must be a non-empty string")
        for key in ("system", "kind", "dataset"):
            if key in row and row[key] is not None and not isinstance(row[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string")
        kind = row.get("kind") or ""
        if kind not in OFFICIAL_KINDS:
            raise ValueError(f"{where}: kind {kind!r} is unknown; allowed: "
                             f"{', '.join(repr(k) for k in OFFICIAL_KINDS)}")
        check_official_answer(where, kind, row)
        rows.append({"prompt": row["prompt"], "answer": row["answer"],
                     "system": row.get("system") or None, "kind": kind,
                     "dataset": row.get("dataset") or "",
                     "tests": json.dumps(row["tests"]) if kind == "code" else ""})
    return rows


def check_official_answer(where, kind, row):
    """A row whose gold answer its reward can never match is refused at load time."""
    if kind == "mcq" and not re.fullmatch(r"[A-Z]", mcq_choice(row["answer"])):
        raise ValueError(f"{where}: a mcq answer must be one capital letter (A, B, ...), "
                         f"got {row['answer']!r}")
    if kind == "tooluse":
        try:
            gold_tool_calls(row["answer"])
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
            raise ValueError(f"{where}: a tooluse answer must be a JSON list of "
                             f'{{"Action": ..., "Action_Input": ...}}, got {row["answer"][:80]!r}'
                             ) from None
    if kind == "code":
        tests = row.get("tests")
        try:
            tests = json.loads(tests) if isinstance(tests, str) else tests
            ok = (isinstance(tests, dict) and len(tests["inputs"]) == len(tests["outputs"])
                  and tests.get("testtype", "stdin") in ("stdin", "functional")
                  and (tests.get("testtype", "stdin") == "stdin" or tests.get("fn_name")))
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{where}: a code row needs `tests`: {{\"inputs\": [...], "
                             f"\"outputs\": [...], \"testtype\": \"stdin\" or \"functional\" "
                             f"(with \"fn_name\")}}")


def load_official_task(folder) -> Task:
    """A task in the official SDPO data layout: a folder with train.json and test.json."""
    folder = Path(folder)
    rows = {}
    for split in ("train", "test"):
        path = folder / f"{split}.json"
        if not path.is_file():
            raise ValueError(f"task folder {str(folder)!r} has no {split}.json (the official "
                             f"layout: train.json and test.json, JSON lines)")
        rows[split] = read_official_rows(path)
        if not rows[split]:
            raise ValueError(f"{path}: no examples")
    from datasets import Dataset
    return Task(folder.name, Dataset.from_list(rows["train"]), Dataset.from_list(rows["test"]),
                official_reward, official_feedback, well_formed=official_well_formed)


def gsm8k_example(row: dict) -> dict:
    """A GSM8K row (`question`, `answer` = worked solution ending in '#### 42') -> our schema,
    with the official math prompt (reason step by step, the answer in \\boxed{})."""
    return {"prompt": row["question"].strip() + MATH_PROMPT_SUFFIX,
            "answer": row["answer"].split("####")[-1].strip().replace(",", ""),
            "system": None, "kind": "math", "dataset": "gsm8k", "tests": ""}


def gsm8k_task(dataset_dict, name="gsm8k") -> Task:
    """GSM8K from a datasets.DatasetDict with train and test splits in the hub schema, scored
    by the official math reward."""
    return Task(name, dataset_dict["train"].map(gsm8k_example, remove_columns=["question"]),
                dataset_dict["test"].map(gsm8k_example, remove_columns=["question"]),
                official_reward, official_feedback, well_formed=official_well_formed)


def load_gsm8k() -> Task:
    """GSM8K from the hub (openai/gsm8k, main) or the local cache; one clear error without
    either."""
    from datasets import load_dataset
    offline_unless_reachable("the gsm8k data set")
    try:
        return gsm8k_task(load_dataset("openai/gsm8k", "main"))
    except (OSError, ConnectionError, ValueError) as e:
        raise ValueError(f"task 'gsm8k' could not be loaded from the hub or the local cache "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
