"""The paper's data: the official SDPO layout (a folder with train.json and test.json), the
official rewards chosen by each row's `kind`, and GSM8K from the hub.

The official code picks a reward by each row's data source; here by its `kind` (the official
layout's field for it): mcq (SciKnowEval, GPQA), tooluse (ToolAlpaca), math (DAPO-Math,
MATH-500, GSM8K) and code. A row without a kind is scored by normalised exact match, an addition
of this project. Model-written code runs only isolated by the operating system, one test per
process (sandbox.py, docs/sandbox.md); the trainer compares the outputs.
"""
from __future__ import annotations

import ast
import builtins
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from sdpo_cl import Task
from harness.models import offline_unless_reachable
from harness import sandbox

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


# ---- The code reward: the official one (verl/utils/reward_score/feedback/code.py of
# lasgroup/SDPO, "code.py:N" below). The program runs in the sandbox (harness/sandbox.py), one
# process per test, and sees one input at a time; everything that needs an expected output
# is here, in the trainer.

INCORRECT_FORMAT, TIMEOUT, ERROR_PREFIX = "Incorrect format", "Time out", "Error: "
DEFAULT_TIME_LIMIT = 1.0        # seconds per test when a row gives none (code.py:23, 762)
TEST_TYPES = ("stdin", "functional", "code")


def code_block(text: str) -> str | None:
    """The longest fenced code block, as the official code takes it (code.py:597-601)."""
    blocks = re.findall(r"```\w*\n(.*?)```", text, flags=re.DOTALL)
    return max(blocks, key=len) if blocks else None


def code_tests(example: dict) -> dict:
    """A code row's tests, the official format: {"inputs": [...], "outputs": [...],
    "testtype": "stdin", "functional" or "code" (assert statements), "fn_name", "context"
    (code run before the program), "time_limit" (seconds per test)}, with defaults for the
    optional fields."""
    tests = example["tests"]
    tests = json.loads(tests) if isinstance(tests, str) else dict(tests)
    return {"testtype": "stdin", "fn_name": "", "context": "", **tests,
            "time_limit": float(tests.get("time_limit") or DEFAULT_TIME_LIMIT)}


def compile_problem(source: str, what: str) -> str | None:
    try:
        compile(source, what, "exec", dont_inherit=True)   # compiles only, runs nothing
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return f"{what} does not compile ({type(e).__name__}: {e})"
    return None


# ---- Assert tests (testtype "code"). The official code runs the program and then the test code
# in one namespace (code.py:491-505), where the program can read the expected values in the
# test code. Here they run apart (sandbox.run_assert_test): the program answers calls of one
# function, the test code makes them. Which function that is, is read from the test code here.

PREDEFINED = set(dir(builtins)) | set(sandbox.TYPING_NAMES) | {"__builtins__", "debug_print",
                                                               "__debug_buffer__"}
# Builtins whose calls make values that are not literals (iterators, objects, frozensets)
NOT_LITERAL_MAKERS = {"iter", "map", "filter", "zip", "reversed", "enumerate", "range",
                      "object", "frozenset", "open"}


def bound_names(tree) -> set:
    """Every name the code binds, in any scope: assignments and loop targets, definitions,
    parameters, imports, `except ... as` and match captures."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
    return names


@lru_cache(maxsize=256)
def assert_test_names(test_code: str, context: str = "") -> tuple:
    """(the function under test, the allowed modules the test code uses without importing
    them) of an assert test. The function under test is the one name the test code reads that
    neither it, the context nor the runner defines: the program must. ValueError if there is
    not exactly one, or if a call of it can never be sent to the program (see not_literal)."""
    try:
        tree = ast.parse(test_code)
        free = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                and isinstance(n.ctx, ast.Load)}
        free -= bound_names(tree) | bound_names(ast.parse(context)) | PREDEFINED
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"the test code or context does not parse ({type(e).__name__})") from None
    modules = sorted(free & set(sandbox.ALLOWED_MODULES))
    names = sorted(free - set(modules))
    if not names:
        raise ValueError("the test code calls no function of the program")
    if len(names) > 1:
        raise ValueError(f"the test code uses {len(names)} names only the program defines "
                         f"({', '.join(names)}): only one, the function under test, can be "
                         f"called from outside the program")
    problem = unsendable_call(tree, names[0])
    if problem:
        raise ValueError(problem)
    return names[0], tuple(modules)


def stand_in_names(tree, entry: str, defs: dict) -> set:
    """The names the function under test is called by: its own, and the parameter of each
    test function it is passed to (`candidate` in `def check(candidate)` ... `check(entry)`)."""
    names = {entry}
    for call in ast.walk(tree):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and isinstance(defs.get(call.func.id), ast.FunctionDef)):
            continue
        params = defs[call.func.id].args.posonlyargs + defs[call.func.id].args.args
        names |= {p.arg for p, a in zip(params, call.args)
                  if isinstance(a, ast.Name) and a.id == entry}
        names |= {k.arg for k in call.keywords
                  if isinstance(k.value, ast.Name) and k.value.id == entry}
    return names


def unsendable_call(tree, entry: str) -> str | None:
    """A call of the function under test with an argument that can never be a literal value,
    named with its line in the test code; None if there is none to see. (Arguments are values
    only when the test runs: one that is not a literal then fails the test, naming the row.)"""
    defs = {n.name: n for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    callers = stand_in_names(tree, entry, defs)
    functions = set(defs) | callers | ({n for n in dir(builtins) if callable(getattr(builtins, n))}
                                       - bound_names(tree))
    makers = {n for n, d in defs.items() if isinstance(d, ast.ClassDef)} | NOT_LITERAL_MAKERS
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) \
                and call.func.id in callers:
            for arg in call.args + [k.value for k in call.keywords]:
                what = not_literal(arg, functions, makers)
                if what:
                    return (f"the test code passes {what} to {call.func.id} (test code line "
                            f"{arg.lineno}: {ast.unparse(call)[:80]}); only literal values can "
                            f"be sent to the program")
    return None


def not_literal(node, functions: set, makers: set) -> str | None:
    """What an argument expression is, when it is surely not a literal value."""
    node = node.value if isinstance(node, ast.Starred) else node
    if isinstance(node, ast.Lambda):
        return "a lambda"
    if isinstance(node, ast.GeneratorExp):
        return "a generator"
    if isinstance(node, ast.Name) and node.id in functions:
        return f"the function or class {node.id}"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in makers:
        return f"the {node.func.id}(...) object"
    return None


def one_test_problem(kind: str, given, want, context: str = "") -> str | None:
    """Why one official test can never pass, or None."""
    if kind == "stdin" and not (isinstance(given, str) and isinstance(want, str)):
        return "a stdin test's input and output must be strings"
    if kind == "functional":
        if not isinstance(given, (str, dict)):
            return ("a functional test's input must be a string (JSON values split at "
                    "whitespace) or a dict of keyword arguments")
        try:
            json.loads(want)
        except (TypeError, json.JSONDecodeError):
            return "a functional test's output must be a string holding JSON"
    if kind == "code":
        if not isinstance(given, str):
            return "a code test's input must be a string of Python (its asserts)"
        problem = compile_problem(given, "the test code")
        if problem:
            return problem
        try:
            assert_test_names(given, context)
        except ValueError as e:
            return str(e)
    return None


def check_code_row(row: dict) -> str | None:
    """What makes a code row's tests unable to fail or unable to pass, or None. The loader
    refuses such a row (an empty test list would score every program 1)."""
    try:
        tests = row["tests"]
        tests = json.loads(tests) if isinstance(tests, str) else tests
    except (KeyError, TypeError, json.JSONDecodeError):
        return 'needs `tests`, a JSON object {"inputs": [...], "outputs": [...], ...}'
    if not isinstance(tests, dict):
        return "`tests` must be a JSON object"
    inputs, outputs, kind = tests.get("inputs"), tests.get("outputs"), tests.get("testtype",
                                                                                  "stdin")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        return "`tests.inputs` and `tests.outputs` must be lists"
    if not inputs:
        return "has no tests: every program would pass"
    if len(inputs) != len(outputs):
        return f"has {len(inputs)} inputs but {len(outputs)} outputs"
    if kind not in TEST_TYPES:
        return f"`testtype` {kind!r} is unknown; allowed: {', '.join(TEST_TYPES)}"
    for key in ("fn_name", "context"):
        if not isinstance(tests.get(key, ""), str):
            return f"`{key}` must be a string"
    limit = tests.get("time_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not limit > 0):
        return "`time_limit` must be a positive number of seconds"
    problem = compile_problem(tests.get("context", ""), "context")
    if problem:
        return problem
    for i, (given, want) in enumerate(zip(inputs, outputs), 1):
        problem = one_test_problem(kind, given, want, tests.get("context", ""))
        if problem:
            return f"test {i}: {problem}"
    return None


def stdout_words(text: str) -> str:
    """The official comparison of printed output: stripped, lines joined by spaces
    (code.py:480-481)."""
    return text.strip().replace("\n", " ").replace("\r", "")


def expected_stdout(output: str) -> str:
    """An expected output stripped, and a trailing '-' dropped with what spaces precede it, as
    the official code does (code.py:539-541)."""
    output = output.strip()
    return output[:output.rfind("-")].rstrip() if output.endswith("-") else output


def sandbox_report(code: str, tests: dict, given) -> dict:
    """The sandbox's report of the program on one test input; an assert test runs split in
    two (sandbox.run_assert_test), its function under test read from its code."""
    seconds = tests["time_limit"] + 1           # the official + 1 s (code.py:780)
    if tests["testtype"] != "code":
        return sandbox.run_program(code, given, kind=tests["testtype"], fn_name=tests["fn_name"],
                                   context=tests["context"], seconds=seconds)
    try:
        entry, imports = assert_test_names(given, tests["context"])
    except ValueError as e:     # the loader refuses such a row (check_code_row)
        raise ValueError(f"an assert test that cannot be run apart from the program: {e}") from None
    return sandbox.run_assert_test(code, given, entry=entry, imports=imports,
                                   context=tests["context"], seconds=seconds)


def run_code_test(code: str, tests: dict, index: int) -> dict:
    """One official test record (code.py:560-568): the program's output or error, and whether
    it matches the expected output (compared here, never in the program's process)."""
    kind, given, want = tests["testtype"], tests["inputs"][index], tests["outputs"][index]
    if kind == "stdin":
        want = expected_stdout(want)
    run = sandbox_report(code, tests, given)
    record = {"test_idx": index, "input": given, "expected": want, "actual": "",
              "passed": False, "debug": run.get("debug", "")}
    if run.get("timed_out"):
        record["actual"] = TIMEOUT
    elif "error" in run:
        record["actual"] = run["error"]
    elif kind == "stdin" and "output" in run:
        record["actual"] = run["output"].strip()
        record["passed"] = stdout_words(run["output"]) == stdout_words(want)
    elif kind == "functional" and "value" in run:   # JSON-like equality (code.py:448-456)
        record["actual"] = run.get("shown", "")
        record["passed"] = run["value"] == json.dumps(json.loads(want), sort_keys=True,
                                                      separators=(",", ":"))
    elif kind == "code":
        record["actual"] = "All tests pass" if run.get("passed") else "No result"
        record["passed"] = run.get("passed") is True
    return record


def clip(value, limit: int) -> str:
    value = str(value)
    return value[:limit] + "..." if len(value) > limit else value


def input_lines(title: str, given) -> list:
    if given is None:
        return [title]
    if isinstance(given, dict):
        return [title] + [f"{k} = {clip(v, 250)}" for k, v in given.items()]
    lines = str(given).splitlines()
    more = [f"... ({len(lines) - 8} more lines)"] if len(lines) > 8 else []
    return [title] + [clip(line, 250) for line in lines[:8]] + more


def debug_lines(debug: str) -> list:
    lines = (debug or "").strip()
    if not lines:
        return []
    lines = lines.split("\n")
    more = [f"... ({len(lines) - 10} more lines)"] if len(lines) > 10 else []
    return ["", "Debug Output"] + [clip(line, 300) for line in lines[:10]] + more


def render_feedback(records) -> str:
    """The official rendering (code.py:604-745): the first runtime error, else the first
    timeout, else the format error, else the two shortest wrong answers; input, output,
    expected output and the program's debug output, each cut short."""
    failing = [r for r in records if not r["passed"]]
    first = next((r for test in (lambda a: a.startswith(ERROR_PREFIX), lambda a: a == TIMEOUT,
                                 lambda a: a == INCORRECT_FORMAT)
                  for r in records if isinstance(r["actual"], str) and test(r["actual"])), None)
    shown = [first] if first else sorted(
        failing, key=lambda r: len(str(r["input"])) + len(str(r["actual"])))[:2]
    parts = []
    for r in shown:
        actual = r["actual"]
        if actual == INCORRECT_FORMAT:
            parts.append("Incorrect Format: Put your code inside a ```python ... ``` block.")
        elif actual == TIMEOUT or actual.startswith(ERROR_PREFIX):
            parts += (["Time Limit Exceeded"] if actual == TIMEOUT
                      else ["Runtime Error", actual[len(ERROR_PREFIX):]]) + [""]
            parts += input_lines("Last Executed Input", r["input"]) + debug_lines(r["debug"])
        else:
            parts += [f"Test Case {r['test_idx'] + 1}: Wrong Answer", ""]
            parts += input_lines("Input", r["input"]) + ["", "Output", clip(actual, 250)]
            if r["expected"] is not None:
                parts += ["", "Expected", clip(r["expected"], 250)]
            parts += debug_lines(r["debug"])
        parts.append("")
    return "\n".join(parts).rstrip()[:2000]


def run_code_tests(code: str, tests: dict) -> list:
    """Every test of the row, run in parallel as the official code does (code.py:767-772)."""
    n = len(tests["inputs"])
    with ThreadPoolExecutor(max_workers=max(1, min(n, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda i: run_code_test(code, tests, i), range(n)))


@lru_cache(maxsize=1024)
def code_outcome(code: str | None, tests_json: str) -> dict:
    """Score, accuracy, feedback and the records shortened, cached: a batch's rewards and then
    its feedback need the same runs, and a row's inputs can run to megabytes."""
    if code is None:
        records = [{"test_idx": 0, "input": None, "expected": None, "actual": INCORRECT_FORMAT,
                    "passed": False, "debug": ""}]
    else:
        records = run_code_tests(code, code_tests({"tests": tests_json}))
    acc = sum(r["passed"] for r in records) / len(records)
    short = tuple({**r, **{k: clip(r[k], 1000) for k in ("input", "expected", "actual", "debug")
                           if r[k] is not None}} for r in records)
    return {"score": float(acc == 1.0), "acc": acc, "feedback": render_feedback(records),
            "records": short}


def code_result(completion: str, example: dict) -> dict:
    """The official result (code.py:820-870): "score" 1.0 iff every test passes (the reward:
    SDPO calls it with sparse_rewards=True, feedback/__init__.py:15), "acc" the fraction of
    tests passed (the official accuracy), "feedback" and the per-test "records" (shortened)."""
    tests = example["tests"]
    return code_outcome(code_block(completion), tests if isinstance(tests, str)
                        else json.dumps(tests))


def code_reward(completion: str, example: dict, *, sparse: bool = True) -> float:
    """The official code reward: 1 iff every test passes; sparse=False: the fraction passed
    (the official sparse_rewards=False, code.py:849-852)."""
    result = code_result(completion, example)
    return result["score"] if sparse else result["acc"]


def code_accuracy(completion: str, example: dict) -> float:
    """The official accuracy of a code answer: the fraction of its tests passed (code.py:847)."""
    return code_result(completion, example)["acc"]


def code_feedback(completion: str, example: dict) -> str | None:
    """The official feedback (LeetCode style), None when every test passes."""
    result = code_result(completion, example)
    return None if result["score"] == 1.0 else result["feedback"]


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
