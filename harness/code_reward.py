"""The code reward: the official one (verl/utils/reward_score/feedback/code.py of lasgroup/SDPO,
"code.py:N" below), beside the sandbox that runs the programs (harness/sandbox.py).

A program runs in the sandbox, one process per test, and sees one input at a time; everything
that needs an expected output is here, in the trainer: the checks of a code row at load (its
tests can run and can fail), the comparison of each output with the expected one, the reward
(1 iff every test passes), the official accuracy (the fraction passed) and the feedback.
"""
from __future__ import annotations

import ast
import builtins
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from harness import sandbox

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
