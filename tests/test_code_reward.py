"""The code reward computes what the official one computes (verl/utils/reward_score/feedback/
code.py of lasgroup/SDPO): exact stdin comparison after stripping, functional calls with the
official argument parsing, assert tests, a row's context code, the allowed imports, the row's
time limit; the reward 1 iff every test passes, the accuracy the fraction passed. Bad rows
are refused at load. Hand-made fixtures; where this machine cannot isolate, they run through
the opt-in (they are benign)."""
import json
import time

import pytest

from harness import code_reward, sandbox

ADD = "a, b = map(int, input().split())\nprint(a + b)"


@pytest.fixture(autouse=True)
def runnable(monkeypatch):
    code_reward.code_outcome.cache_clear()
    if sandbox.isolation_available():
        monkeypatch.setenv(sandbox.ALLOW_UNISOLATED, "1")


def result(program, tests):
    row = {"kind": "code", "tests": json.dumps(tests)}
    return code_reward.code_result(f"```python\n{program}\n```", row)


def stdin(inputs, outputs, **extra):
    return {"inputs": inputs, "outputs": outputs, "testtype": "stdin", **extra}


# ---- stdin tests: exact after strip, newlines as spaces -----------------------------------

def test_stdin_output_is_compared_exactly_after_stripping():
    assert result(ADD, stdin(["1 2\n"], ["  3\n\n"]))["score"] == 1.0
    assert result("print(1)\nprint(2)", stdin([""], ["1 2"]))["score"] == 1.0   # lines: spaces
    assert result("print('1  2')", stdin([""], ["1 2"]))["score"] == 0.0        # not split()
    assert result("print('03')", stdin([""], ["3"]))["score"] == 0.0


def test_a_trailing_dash_of_the_expected_output_is_dropped():
    assert result("print(3)", stdin([""], ["3\n-"]))["score"] == 1.0


def test_a_program_that_exits_fails_as_the_official_one_does():
    assert result("import sys\nprint(3)\nsys.exit(0)", stdin([""], ["3"]))["score"] == 0.0


# ---- functional tests ---------------------------------------------------------------------

def functional(inputs, outputs, fn_name="add"):
    return {"inputs": inputs, "outputs": outputs, "testtype": "functional", "fn_name": fn_name}


def test_functional_arguments_are_json_words_or_keyword_dicts():
    add = "def add(a, b):\n    return [a, b, a + b]"
    assert result(add, functional(["[1,2]\n[3]"], ["[[1,2],[3],[1,2,3]]"]))["score"] == 1.0
    assert result(add, functional([{"b": 3, "a": 2}], ["[2, 3, 5]"]))["score"] == 1.0


def test_functional_results_compare_as_json_not_as_python():
    assert result("def add(a, b):\n    return (a, b)", functional(["1 2"], ["[1, 2]"]))[
        "score"] == 1.0
    assert result("def add(a, b):\n    return True", functional(["1 2"], ["1"]))["score"] == 0.0
    r = result("def add(a, b):\n    return {a, b}", functional(["1 2"], ["[1, 2]"]))
    assert r["score"] == 0.0 and "Non-serializable result type: set" in r["feedback"]


def test_the_function_name_falls_back_to_the_first_definition():
    tests = functional(["2 3"], ["5"], fn_name="")
    assert result("def helper():\n    pass\ndef plus(a, b):\n    return a + b", tests)[
        "score"] == 0.0                                        # the first def is `helper`
    assert result("def plus(a, b):\n    return a + b", tests)["score"] == 1.0


# ---- assert tests, context, imports, time ------------------------------------------------

def test_an_assert_test_runs_the_rows_test_code():
    tests = {"inputs": ["assert add(2, 3) == 5\nassert add(0, 0) == 0"], "outputs": [""],
             "testtype": "code", "fn_name": ""}
    assert result("def add(a, b):\n    return a + b", tests)["score"] == 1.0
    r = result("def add(a, b):\n    return a * b", tests)
    assert r["score"] == 0.0 and r["feedback"].startswith("Runtime Error\nAssertionError")


def asserts(test_code, **extra):
    return {"inputs": [test_code], "outputs": [""], "testtype": "code", **extra}


def test_an_assert_test_passes_a_value_within_its_float_tolerance():
    tests = asserts("def check(candidate):\n    assert abs(candidate(1) - 0.3) < 1e-9\n"
                    "    assert math.isclose(candidate(2), 0.6)\n\ncheck(tenths)")
    program = "def tenths(n):\n    return n * 0.1 + n * 0.2"       # 0.30000000000000004
    assert result(program, tests)["score"] == 1.0


def test_an_assert_test_loops_over_its_own_tables_as_the_official_humaneval_plus_rows():
    """The evalplus layout: inputs and expected outputs in lists, a helper that compares."""
    test_code = ("def assertion(out, exp, atol):\n    assert out == exp or abs(out - exp) <= atol\n"
                 "\ndef check(candidate):\n    inputs = [[2, 3], [0, 0], [-1, 1]]\n"
                 "    results = [5, 0, 0]\n    for inp, exp in zip(inputs, results):\n"
                 "        assertion(candidate(*inp), exp, 0)\n\ncheck(add)")
    assert result("def add(a, b):\n    return a + b", asserts(test_code))["score"] == 1.0
    assert result("def add(a, b):\n    return a + b + (a < 0)", asserts(test_code))[
        "score"] == 0.0


def test_the_programs_exception_reaches_the_test_code_and_its_feedback():
    """Caught where the test expects one (the official namespace has no exception names: a bare
    except), it passes; uncaught, the feedback shows the program's own trace."""
    program = "def inverse(x):\n    return 1 / x"
    expects_one = "try:\n    inverse(0)\nexcept:\n    pass\nelse:\n    assert False\n"
    assert result(program, asserts(expects_one + "assert inverse(4) == 0.25"))["score"] == 1.0
    r = result(program, asserts(expects_one + "assert inverse(0) == 0"))
    assert r["score"] == 0.0 and r["feedback"].startswith(
        "Runtime Error\nZeroDivisionError: division by zero\nLine 2 in inverse (Solution.py)")


def test_a_non_literal_value_the_test_code_passes_fails_naming_the_row():
    r = result("def first(xs):\n    return next(xs)",
               asserts("xs = iter([1, 2])\nassert first(xs) == 1"))
    assert r["score"] == 0.0 and "the row's test code passes first a value" in r["feedback"]


def test_a_rows_context_runs_before_the_program():
    tests = stdin(["4\n"], ["8"], context="SCALE = 2\n")
    assert result("print(int(input()) * SCALE)", tests)["score"] == 1.0


def test_a_forbidden_import_fails_the_test():
    r = result("import os\n" + ADD, stdin(["1 2"], ["3"]))
    assert r["score"] == 0.0
    assert "ImportError: Import of module 'os' is not allowed" in r["feedback"]
    assert result("import math, heapq\n" + ADD, stdin(["1 2"], ["3"]))["score"] == 1.0


def test_only_the_official_builtins_exist():
    r = result("print(divmod(7, 2))", stdin([""], ["(3, 1)"]))
    assert r["score"] == 0.0 and "NameError" in r["feedback"]


def test_the_rows_time_limit_plus_a_second_stops_a_slow_program():
    start = time.monotonic()
    r = result("while True:\n    pass", stdin(["1"], ["1"], time_limit=0.2))
    assert r["score"] == 0.0 and r["feedback"].startswith("Time Limit Exceeded")
    assert time.monotonic() - start < 4


# ---- the score, the accuracy, the feedback -------------------------------------------------

def test_the_reward_is_all_or_nothing_and_the_accuracy_the_fraction_passed():
    tests = stdin(["1 2", "2 2", "5 7"], ["3", "4", "13"])
    row = {"kind": "code", "tests": json.dumps(tests)}
    completion = f"```python\n{ADD}\n```"
    assert code_reward.code_reward(completion, row) == 0.0
    assert code_reward.code_accuracy(completion, row) == pytest.approx(2 / 3)
    assert code_reward.code_reward(completion, row, sparse=False) == pytest.approx(2 / 3)


def test_the_feedback_shows_the_shortest_wrong_answers_as_the_official_one():
    r = result(ADD, stdin(["10 20", "1 2", "2 2"], ["31", "4", "5"]))
    assert r["feedback"] == ("Test Case 2: Wrong Answer\n\nInput\n1 2\n\nOutput\n3\n\n"
                             "Expected\n4\n\nTest Case 3: Wrong Answer\n\nInput\n2 2\n\n"
                             "Output\n4\n\nExpected\n5")


# ---- bad rows, refused at load -----------------------------------------------------------

@pytest.mark.parametrize("tests, problem", [
    ({"inputs": [], "outputs": []}, "has no tests"),
    ({"inputs": "ab", "outputs": "cd"}, "must be lists"),
    ({"inputs": ["1"], "outputs": []}, "1 inputs but 0 outputs"),
    (functional(["1 2"], ["3"], fn_name=7), "`fn_name` must be a string"),
    ({"inputs": ["1"], "outputs": ["1"], "testtype": "pytest"}, "`testtype` 'pytest'"),
    (functional(["1 2"], ["not json"]), "output must be a string holding JSON"),
    (functional([[1, 2]], ["3"]), "input must be a string"),
    ({"inputs": ["assert (1"], "outputs": [""], "testtype": "code"}, "does not compile"),
    (asserts("assert apply(lambda x: x + 1, 2) == 3"),
     "passes a lambda to apply (test code line 1: apply(lambda x: x + 1, 2))"),
    (asserts("def check(f):\n    assert f(x for x in 'ab') == 2\ncheck(count)"),
     "passes a generator to f (test code line 2"),
    (asserts("assert decode(encode('ab')) == 'ab'"), "2 names only the program defines"),
    (asserts("assert 1 + 1 == 2"), "calls no function of the program"),
    (stdin(["1"], ["1"], time_limit=0), "`time_limit`"),
])
def test_a_row_whose_tests_cannot_fail_or_cannot_pass_is_named(tests, problem):
    assert problem in code_reward.check_code_row({"tests": json.dumps(tests)})


def test_a_good_row_has_no_problem():
    assert code_reward.check_code_row({"tests": json.dumps(stdin(["1 2"], ["3"]))}) is None
    assert code_reward.check_code_row({"tests": functional([{"a": 1}], ["1"])}) is None
    assert code_reward.check_code_row({"tests": asserts(
        "import math\ndef check(candidate):\n    for x in [1, 2]:\n"
        "        assert math.isclose(candidate(x), x)\ncheck(f)")}) is None
