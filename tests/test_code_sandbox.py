"""The code reward runs model-written code in a separate process with limits: 1 iff every test
passes, and nothing the program does reaches the training process or files outside its own
empty working directory."""
import json

import sdpo_cl as s
from harness import data

STDIN = {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"], "testtype": "stdin"}


def row(program, tests=STDIN):
    return {"kind": "code", "answer": "-", "tests": json.dumps(tests),
            "completion": f"Here:\n```python\n{program}\n```"}


def score(program, tests=STDIN):
    r = row(program, tests)
    return data.official_reward(r["completion"], r), data.official_feedback(r["completion"], r)


def test_a_passing_program_scores_1():
    assert score("a, b = map(int, input().split())\nprint(a + b)") == (1.0, None)


def test_a_functional_test_calls_the_named_function():
    tests = {"inputs": [[2, 3], [10, -1]], "outputs": [5, 9], "testtype": "functional",
             "fn_name": "add"}
    assert score("def add(a, b):\n    return a + b", tests) == (1.0, None)


def test_a_failing_program_names_the_first_failing_test():
    reward, feedback = score("a, b = map(int, input().split())\nprint(a * b if a > 1 else a + b)")
    assert reward == 0.0 and feedback.startswith("Test 2 failed") and "expected '12" in feedback


def test_an_answer_without_a_code_block_is_a_format_error():
    r = row("")
    assert data.official_reward("print(3)", r) == 0.0
    assert "```python" in data.official_feedback("print(3)", r)


def test_an_infinite_loop_is_stopped():
    reward, feedback = score("while True:\n    pass")
    assert reward == 0.0 and "time limit" in feedback.lower()


def test_unbounded_allocation_fails_without_harming_the_trainer():
    reward, feedback = score("x = []\nwhile True:\n    x.append(' ' * 10**7)")
    assert reward == 0.0 and "MemoryError" in feedback


def test_deleting_files_outside_the_working_directory_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    program = (f"import os, shutil\nos.remove({str(victim)!r})\n"
               "a, b = map(int, input().split())\nprint(a + b)")
    reward, feedback = score(program)
    assert reward == 0.0 and "PermissionError" in feedback
    assert victim.read_text() == "precious"
    reward, _ = score(f"import shutil\nshutil.rmtree({str(tmp_path)!r})")
    assert reward == 0.0 and victim.exists()


def test_starting_a_process_is_refused():
    reward, feedback = score("import subprocess\nsubprocess.run(['true'])")
    assert reward == 0.0 and "not allowed" in feedback
