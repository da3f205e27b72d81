"""The code reward runs model-written code in a separate process with limits: 1 iff every test
passes, and nothing the program does reaches the training process or files outside its own
empty working directory."""
import json
import signal

import pytest

from harness import data, sandbox

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


@pytest.mark.parametrize("mode", ["w", "a", "r+", "x"])
def test_writing_a_file_outside_the_working_directory_is_refused(tmp_path, mode):
    target = tmp_path / "kept.txt"
    if mode != "x":
        target.write_text("kept")
    reward, feedback = score(f"open({str(target)!r}, {mode!r}).write('changed')\n"
                             "a, b = map(int, input().split())\nprint(a + b)")
    assert reward == 0.0 and "PermissionError" in feedback and "outside the working" in feedback
    assert target.read_text() == "kept" if mode != "x" else not target.exists()


def test_a_sibling_folder_that_shares_the_working_directorys_name_is_outside_it():
    program = ("import os\npath = os.getcwd() + '-sibling.txt'\n"
               "try:\n    open(path, 'w').write('x')\nfinally:\n"
               "    os.path.exists(path) and os.unlink(path)\n")
    reward, feedback = score(program)
    assert reward == 0.0 and "outside the working directory" in feedback


def test_a_file_inside_the_working_directory_may_be_written_and_read():
    program = ("open('scratch.txt', 'w').write(input())\n"
               "a, b = map(int, open('scratch.txt').read().split())\nprint(a + b)")
    assert score(program) == (1.0, None)


def test_opening_a_socket_connection_is_refused():
    reward, feedback = score("import socket\nsocket.socket().bind(('127.0.0.1', 0))")
    assert reward == 0.0 and "socket.bind is not allowed" in feedback
    reward, feedback = score("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert reward == 0.0 and "socket.connect is not allowed" in feedback


def test_importing_ctypes_is_refused():
    reward, feedback = score("import ctypes\nctypes.CDLL(None).getpid()")
    assert reward == 0.0 and "import ctypes is not allowed" in feedback


def test_a_program_that_ignores_the_alarm_is_killed_by_the_cpu_limit():
    """The per-test alarm is a signal the program can ignore; the CPU-time limit (the tests'
    seconds + 2) is not: the kernel kills it (SIGXCPU, or SIGKILL at the hard limit) before the
    wall-clock kill (the tests' seconds + 5), which would say "Time limit exceeded."."""
    program = ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
               "while True:\n    pass")
    result = sandbox.run_untrusted_code(program, {"inputs": ["1\n"], "outputs": ["1\n"]},
                                        seconds_per_test=0.5)
    killed_by = {f"The program was killed (exit code -{sig}): " for sig in (signal.SIGXCPU,
                                                                          signal.SIGKILL)}
    assert not result["passed"] and result["feedback"] in killed_by
