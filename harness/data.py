"""The paper's data: the official SDPO layout (a folder with train.json and test.json), the
official rewards chosen by each row's `kind`, and GSM8K from the hub.

The official code picks a reward by each row's data source; here by its `kind` (the official
layout's field for it): mcq (SciKnowEval, GPQA), tooluse (ToolAlpaca), math (DAPO-Math,
MATH-500, GSM8K) and code. A row without a kind is scored by normalised exact match, an addition
of this project. Model-written code runs only isolated by the operating system, one test per
process (sandbox.py, docs/sandbox.md); code_reward.py compares the outputs.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from sdpo_cl import Task
from harness import sandbox
from harness.code_reward import check_code_row, code_block, code_feedback, code_reward
from harness.models import offline_unless_reachable

OFFICIAL_KINDS = ("mcq", "gpqa", "tooluse", "math", "code", "")
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


def gpqa_choice(text: str) -> str:
    """The official GPQA extraction (feedback/gpqa.py of SDPO-CL): the last standalone A-D of the
    upper-cased text, else the whole text stripped of a final '.'; then a trailing '.' or '/'
    dropped."""
    letters = re.findall(r"\b(A|B|C|D)\b", text.upper())
    return (letters[-1] if letters else text.strip().strip(".")).rstrip(".").rstrip("/")


def gpqa_reward(completion: str, example: dict) -> float:
    """1 iff the extracted letter equals the gold one (the official `gpqa` data source)."""
    return float(gpqa_choice(completion) == example["answer"])


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



OFFICIAL_REWARDS = {"mcq": (mcq_reward, None), "gpqa": (gpqa_reward, None),
                    "tooluse": (tooluse_reward, tooluse_feedback),
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
    if kind == "gpqa":                 # the official incorrect_format: not one of A-D
        return gpqa_choice(completion) in ("A", "B", "C", "D")
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
        except RecursionError:
            raise ValueError(f"{where}: JSON nested too deeply to read") from None
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
    if kind == "gpqa" and row["answer"] not in ("A", "B", "C", "D"):
        raise ValueError(f"{where}: a gpqa answer must be one of A, B, C, D, got "
                         f"{row['answer']!r}")
    if kind == "tooluse":
        try:
            names, _ = gold_tool_calls(row["answer"])
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
            raise ValueError(f"{where}: a tooluse answer must be a JSON list of "
                             f'{{"Action": ..., "Action_Input": ...}}, got {row["answer"][:80]!r}'
                             ) from None
        if not names:       # no gold call: any answer without an Action line would score 1
            raise ValueError(f"{where}: a tooluse answer needs at least one call, got "
                             f"{row['answer'][:80]!r}")
    if kind == "code":
        problem = check_code_row(row)
        if problem:
            raise ValueError(f"{where}: a code row {problem}")


def runs_programs(task) -> bool:
    """Whether the task's reward runs model-written programs: rows of kind code."""
    return any("kind" in rows[0] and "code" in [row["kind"] for row in rows]
               for rows in (task.train, task.test) if len(rows))


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
    sandbox.hide_path(folder)       # model-written code must not read the expected outputs
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


# --- SciKnowEval, as the paper's fork prepares it (data/format/sciknoweval.py, data/README.md,
# data/split_tasks.py of Moenupa/SDPO-CL): the test split of hicai-zju/SciKnowEval, one domain,
# level L3, the 4- and 2-choice multiple-choice questions, the official system prompt, then 10%
# held out for test with datasets' train_test_split at seed 42 -----------------------------------

SCIKNOWEVAL_DOMAINS = {"biology": "Biology", "chemistry": "Chemistry", "material": "Material",
                       "physics": "Physics"}
SCIKNOWEVAL_SYSTEM = (
    "\nGiven a question and four options, please select the right answer. Respond in the "
    "following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\nFor the "
    "answer, only output the letter corresponding to the correct option (A, B, C, or D), and "
    "nothing else. Do not restate the answer text. For example, if the answer is \"A\", just "
    "output:\n<answer>\nA\n</answer>\n")


def sciknoweval_row(row: dict) -> dict:
    """A hub row (question, choices {text, label}, answerKey) in the official layout."""
    choices = "\n".join(f"{label}: {text}" for label, text in zip(row["choices"]["label"],
                                                                  row["choices"]["text"]))
    return {"prompt": row["question"] + "\n\n" + choices + "\nPlease reason step by step.",
            "answer": row["answerKey"], "system": SCIKNOWEVAL_SYSTEM, "kind": "mcq",
            "dataset": "sciknoweval"}


def write_sciknoweval(hub_test, domain: str, folder: Path) -> Path:
    """The official preparation of one domain from the hub's test split, written as train.json
    and test.json (JSON lines) in `folder`."""
    rows = hub_test.filter(lambda x: x["domain"] == SCIKNOWEVAL_DOMAINS[domain]
                           and x["details"]["level"] == "L3"
                           and x["type"] in ("mcq-4-choices", "mcq-2-choices"))
    rows = rows.map(sciknoweval_row, remove_columns=rows.column_names)
    split = rows.train_test_split(test_size=0.1, seed=42)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        text = "".join(json.dumps(r) + "\n" for r in split[name])
        (folder / f"{name}.json").write_text(text, encoding="utf-8")
    return folder


def load_sciknoweval(domain: str, cache: Path) -> Task:
    """`sciknoweval:<domain>`: prepared once from the hub and kept in `cache`; without the hub
    and without the cache, one error in seconds that says how to get it."""
    if domain not in SCIKNOWEVAL_DOMAINS:
        raise ValueError(f"unknown SciKnowEval domain {domain!r}: allowed are "
                         f"{', '.join(SCIKNOWEVAL_DOMAINS)}")
    folder = cache / f"sciknoweval-{domain}"
    if not (folder / "test.json").exists():
        from datasets import load_dataset
        offline_unless_reachable("the SciKnowEval data set")
        try:
            hub = load_dataset("hicai-zju/SciKnowEval", split="test")
        except Exception as e:          # offline and not cached, or the hub refused
            raise ValueError(
                f"task 'sciknoweval:{domain}' is built from the hub data set "
                f"hicai-zju/SciKnowEval, which is neither reachable nor cached here "
                f"({type(e).__name__}); run once with a network, or pass the folder "
                f"datasets/sciknoweval/{domain} of github.com/Moenupa/SDPO-CL instead") from None
        write_sciknoweval(hub, domain, folder)
    return load_official_task(folder)
