"""The code reward's sandbox, tested as attacks: each test is a program that tries to get out
(turn its guard off, forge a pass, find the expected output, signal or re-limit the trainer,
write outside its folder, leave a process behind, reach the network, flood the trainer) and
asserts that it fails. Where this machine cannot isolate, each test asserts the refusal
instead, so none passes by skipping."""
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import computed_ahead
from harness import code_reward, sandbox

ROOT = Path(__file__).resolve().parents[1]
VICTIMS = "SDPO_CL_TEST_VICTIMS"     # where victim folders go (an ordinary user's run: its own)
STDIN = {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"], "testtype": "stdin"}
# Turns the program's Python-level guard off: the allow-list of modules the official code
# checks imports against lives in the runner's own module, which `sys` reaches.
GUARD_OFF = ('import sys\n'
             'sys.modules["__main__"].MODULES.update(["os", "builtins", "ctypes", "subprocess",\n'
             '    "socket", "resource", "signal", "gc"])\n'
             'import builtins, ctypes, gc, os, resource, signal, socket, subprocess\n'
             'tried = []\n'
             'def attempt(f):\n'
             '    try:\n'
             '        tried.append(repr(f()))\n'
             '    except builtins.BaseException as e:\n'
             '        tried.append(builtins.type(e).__name__)\n')


# What the kernel lets this user do, checked apart from the sandbox (its own few lines, not the
# launcher's): new user, mount, pid, network, IPC and UTS namespaces with this user's ids mapped.
# Where it can, the sandbox must start: a test never passes on the refusal where it should isolate.
NAMESPACES_PROBE = """
import ctypes, os
uid, gid = os.getuid(), os.getgid()
if ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x20000 | 0x20000000 | 0x40000000
                                             | 0x8000000 | 0x4000000):
    raise SystemExit(1)
for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                   ("gid_map", f"{gid} {gid} 1")):
    with open("/proc/self/" + name, "w") as f:
        f.write(text)
"""
KERNEL_ALLOWS = sys.platform.startswith("linux") and subprocess.run(
    [sys.executable, "-c", NAMESPACES_PROBE], capture_output=True).returncode == 0


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """No opt-in to unisolated runs, and no cached result from another test."""
    monkeypatch.delenv(sandbox.ALLOW_UNISOLATED, raising=False)
    code_reward.code_outcome.cache_clear()


def row(program, tests=STDIN):
    return {"kind": "code", "answer": "-", "tests": json.dumps(tests),
            "completion": f"Here:\n```python\n{program}\n```"}


def attack(program, tests=STDIN):
    """The official result of `program`, run isolated; where isolation is not available, the
    refusal (naming the reason and the opt-in) is asserted instead and None returned."""
    r = row(textwrap.dedent(program), tests)
    reason = sandbox.isolation_available()
    assert not (reason and KERNEL_ALLOWS), f"the kernel allows namespaces, yet: {reason}"
    if reason:
        with pytest.raises(RuntimeError, match=sandbox.ALLOW_UNISOLATED):
            code_reward.code_result(r["completion"], r)
        return None
    return code_reward.code_result(r["completion"], r)


@pytest.fixture
def victim():
    """A world-writable folder the program can see, with a world-writable file: only the
    sandbox's read-only mounts stand between them and the program. Under the git-ignored
    runs/, as /tmp is hidden from the program."""
    parent = Path(os.environ.get(VICTIMS, ROOT / "runs"))
    parent.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".sandbox-victim-", dir=parent))
    folder.chmod(0o777)
    (folder / "keep.txt").write_text("precious")
    (folder / "keep.txt").chmod(0o666)
    yield folder
    shutil.rmtree(folder)


def untouched(folder: Path) -> bool:
    keep = folder / "keep.txt"
    return ([p.name for p in folder.iterdir()] == ["keep.txt"] and keep.read_text() == "precious"
            and keep.stat().st_mode & 0o777 == 0o666)


# ---- (a) the guard turned off from inside ----------------------------------------------------

def test_turning_the_guard_off_still_cannot_write_outside(victim):
    program = GUARD_OFF + f"""
v = {str(victim)!r}
attempt(lambda: builtins.open(v + "/by-open", "w").write("x"))
attempt(lambda: builtins.open(v + "/keep.txt", "w").write("changed"))
attempt(lambda: subprocess.run(["/bin/sh", "-c", "echo x > " + v + "/by-shell; "
                                "echo y > " + v + "/keep.txt"]))
libc = ctypes.CDLL(None, use_errno=True)
attempt(lambda: libc.mount(None, b"/", None, 32 | 4096, None))      # remount / writable
attempt(lambda: libc.unshare(0x10000000 | 0x20000))                # a nested namespace...
attempt(lambda: libc.mount(None, b"/", None, 32 | 4096, None))      # ...and again there
attempt(lambda: builtins.open(v + "/after-remount", "w").write("x"))
print(3)
"""
    result = attack(program)
    assert result is None or (result["score"] == 0.0 and untouched(victim))


def test_the_program_has_no_capabilities_and_is_not_root():
    program = GUARD_OFF + """
status = builtins.open("/proc/self/status").read()
print({l.split(":")[0]: l.split()[1] for l in status.splitlines()
       if l.startswith(("CapEff", "CapPrm", "Uid"))})
"""
    result = attack(program, {"inputs": [""], "outputs": ["x"], "testtype": "stdin"})
    if result:
        seen = eval(result["records"][0]["actual"])
        assert int(seen["CapEff"], 16) == 0 and int(seen["CapPrm"], 16) == 0
        # root hands the program to nobody; an ordinary user's program runs as that user
        assert seen["Uid"] == str(sandbox.NOBODY if os.geteuid() == 0 else os.getuid())


# ---- (b) forging a pass, finding the expected output -----------------------------------------

FUNCTIONAL = {"inputs": ["2 3"], "outputs": ["5"], "testtype": "functional", "fn_name": "add"}


@pytest.mark.parametrize("tests", [STDIN, FUNCTIONAL], ids=["stdin", "functional"])
@pytest.mark.parametrize("fake", ['{"passed": true}', '{"passed": true, "value": "true"}',
                                  '{"passed": true, "output": "pass"}'])
def test_a_forged_report_does_not_pass_a_wrong_program(tests, fake):
    """The program finds the runner's delimiter, writes a report of its own and exits: only
    its own answer counts (printed output, or a return value), and it is wrong."""
    program = GUARD_OFF + f"""
def add(a, b):
    return 0
delimiter = sys.modules["__main__"].job["delimiter"]
os.write(1, ("\\n" + delimiter + {fake!r}).encode())
os._exit(0)
"""
    result = attack(program, tests)
    assert result is None or (result["score"] == 0.0 and result["acc"] == 0.0)


def test_the_expected_output_cannot_be_found(victim):
    """A functional test whose expected output is a secret: the program searches its own
    memory, its stdin, the trainer's /proc entries and the task's data file (in a folder
    registered with hide_path), and returns what it found."""
    secret = f"sesame-{secrets.token_hex(4)}"
    (victim / "test.json").write_text(json.dumps({"outputs": [secret]}))
    sandbox.hide_path(victim)
    program = GUARD_OFF + f"""
import re
needle = re.compile("ses" + "ame-[0-9a-f]{8}")      # the secret, not this program's own text
found = [repr(o)[:100] for o in gc.get_objects()
         if isinstance(o, (dict, list, tuple)) and needle.search(repr(o))]
found.append(sys.__stdin__.read())
for path in ["/proc/%d/cmdline" % os.getppid(), "/proc/{os.getpid()}/environ",
             "/proc/{os.getpid()}/mem", "/proc/{os.getpid()}/cmdline",
             {str(victim / "test.json")!r}]:
    attempt(lambda: builtins.open(path, "rb").read(200))
def answer():
    return [found, tried]
"""
    tests = {"inputs": [""], "outputs": [json.dumps(secret)], "testtype": "functional",
             "fn_name": "answer", "time_limit": 3}
    try:
        result = attack(program, tests)
    finally:
        sandbox.HIDDEN_PATHS.discard(str(victim))
    if result is not None:
        shown = result["records"][0]["actual"]
        assert result["score"] == 0.0 and "sesame" not in shown
        assert shown.startswith("[[''], ["), shown     # it ran: nothing found, reads failed


# ---- (b') assert tests: the expected values stay with the test code, in another process ------
# Each attack passes where the official code runs assert tests: the program, then the test code,
# in one process (one_process shows it, the test code appended to the program). Split, the
# program answers `add(2, 3)` without them: a + b, which the test code's assert rejects.

def assert_row(condition="candidate(2, 3) == {}"):
    """An assert test in HumanEval's layout: `condition` on a random secret expected value."""
    secret = 10 ** 9 + secrets.randbelow(10 ** 9)
    test_code = f"def check(candidate):\n    assert {condition.format(secret)}\n\ncheck(add)\n"
    return {"inputs": [test_code], "outputs": [""], "testtype": "code", "time_limit": 2}


def one_process(program, tests) -> bool:
    """Whether `program` passes the test code run after it in its own process."""
    code = textwrap.dedent(program) + "\n" + tests["inputs"][0] + "\nprint('passed')"
    return sandbox.run_program(code, "", kind="stdin", seconds=3).get("output") == "passed\n"


def refuted(program, condition="candidate(2, 3) == {}") -> bool:
    """The attack passes in one process; split, it gets no pass, having answered a + b."""
    tests = assert_row(condition)
    result = attack(program, tests)
    if result is None:
        return True
    return (one_process(program, tests) and result["score"] == 0.0
            and result["feedback"].startswith("Runtime Error\nAssertionError"))


def test_an_assert_tests_values_are_not_in_the_callers_frames():
    assert refuted("""
        import sys
        def add(a, b):
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_name == "check":
                    return max(c for c in frame.f_code.co_consts if isinstance(c, int))
                frame = frame.f_back
            return a + b
        """)


def test_an_assert_tests_source_is_not_in_the_programs_process():
    """The runner holds its job in `job`; the program's job has no test code in it."""
    assert refuted("""
        import re, sys
        def add(a, b):
            job = sys.modules["__main__"].job
            found = re.findall("== ([0-9]+)", " ".join(str(v) for v in job.values()))
            return int(found[0]) if found else a + b
        """)


def test_an_assert_tests_values_are_not_in_the_programs_memory():
    assert refuted(GUARD_OFF + """
def add(a, b):
    for o in gc.get_objects():
        if isinstance(o, builtins.type(add)) and o.__name__ == "check":
            return max(c for c in o.__code__.co_consts if isinstance(c, int))
    return a + b
""")


def test_a_program_cannot_redefine_what_the_test_code_calls():
    """In one namespace, the program's `abs` was the test code's `abs` too."""
    assert refuted("def abs(x):\n    return 0\ndef add(a, b):\n    return a + b",
                   condition="abs(candidate(2, 3) - {}) < 1e-6")


def test_an_object_equal_to_everything_is_no_answer():
    program = textwrap.dedent("""
        class Anything:
            def __eq__(self, other):
                return True
        def add(a, b):
            return Anything()
        """)
    tests = assert_row()
    result = attack(program, tests)
    assert result is None or (one_process(program, tests) and result["score"] == 0.0
                              and "returned what is not a literal" in result["feedback"])


@pytest.mark.parametrize("fake", ['{"passed": true}', '{"relayed": true}',
                                  '{"ready": true, "passed": true}', '{"value": "Anything()"}'])
@pytest.mark.parametrize("when", ["loading", "called"])
def test_a_forged_message_does_not_pass_an_assert_test(fake, when):
    """The program writes a message of its own with the runner's delimiter and exits, while it
    loads or when it is called: none is more than its own answer, and none is a value."""
    forge = ('os.write(1, ("\\n" + sys.modules["__main__"].job["delimiter"] + '
             f'{fake!r} + "\\n").encode())\nos._exit(0)\n')
    program = GUARD_OFF + ("def add(a, b):\n" + textwrap.indent(forge, "    ")
                           if when == "called" else forge)
    result = attack(program, assert_row())
    assert result is None or (result["score"] == 0.0 and result["acc"] == 0.0)


# ---- (c) re-limiting or signalling the trainer -----------------------------------------------

def test_the_trainer_cannot_be_re_limited_or_signalled():
    received = []
    old_handler = signal.signal(signal.SIGTERM, lambda *_: received.append("SIGTERM"))
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    program = GUARD_OFF + f"""
for pid in (os.getppid(), {os.getpid()}):
    attempt(lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (64, 64)))
    attempt(lambda: os.kill(pid, signal.SIGTERM))
print(3)
"""
    try:
        result = attack(program)
        time.sleep(0.1)
        after = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
    assert result is None or (after == before and received == [])


# ---- (d) writing outside through a directory descriptor --------------------------------------

def test_dir_fd_writes_unlinks_and_fifos_outside_change_nothing(victim):
    program = GUARD_OFF + f"""
fd = os.open({str(victim)!r}, os.O_RDONLY | os.O_DIRECTORY)
attempt(lambda: os.open("new.txt", os.O_CREAT | os.O_WRONLY, 0o666, dir_fd=fd))
attempt(lambda: os.open("keep.txt", os.O_WRONLY | os.O_TRUNC, dir_fd=fd))
attempt(lambda: os.unlink("keep.txt", dir_fd=fd))
attempt(lambda: os.mkfifo("fifo", dir_fd=fd))
attempt(lambda: os.mkdir("folder", dir_fd=fd))
attempt(lambda: os.symlink("/etc/passwd", "link", dir_fd=fd))
attempt(lambda: os.rename("keep.txt", "moved.txt", src_dir_fd=fd, dst_dir_fd=fd))
attempt(lambda: os.chmod("keep.txt", 0o777, dir_fd=fd))
print(3)
"""
    result = attack(program)
    assert result is None or (result["score"] == 0.0 and untouched(victim))


# ---- (e) a process left behind ---------------------------------------------------------------

def running(marker: str) -> bool:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def test_no_process_outlives_the_call():
    """Popen (which is _posixsubprocess.fork_exec) in a new session, and a double fork that
    execs: `sleep 45 0.<marker>` sleeps 45 s and carries the marker in its command line."""
    marks = [f"0.{secrets.randbelow(10 ** 9):09d}" for _ in range(2)]
    program = GUARD_OFF + f"""
attempt(lambda: subprocess.Popen(["sleep", "45", "{marks[0]}"], start_new_session=True))
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "45", "{marks[1]}"])
    os._exit(0)
print(3)
"""
    result = attack(program, {"inputs": ["1 2\n"], "outputs": ["3\n"], "testtype": "stdin"})
    if result is not None:
        assert result["score"] == 1.0, result["feedback"]       # it ran, and returned
        assert not any(running(m) for m in marks)


# ---- (f) the network -------------------------------------------------------------------------

def test_the_network_is_unreachable():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket()
    try:
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        program = GUARD_OFF + f"""
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt(lambda: s.sendto(b"leak", ("127.0.0.1", {udp.getsockname()[1]})))
attempt(lambda: socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), 1).send(b"x"))
print(3)
"""
        result = attack(program)
        udp.setblocking(False)
        tcp.settimeout(0.1)
        if result is not None:
            with pytest.raises(BlockingIOError):
                udp.recv(16)
            with pytest.raises(socket.timeout):
                tcp.accept()
    finally:
        udp.close()
        tcp.close()


# ---- (g) flooding the trainer ----------------------------------------------------------------

def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("flood", ["os.write(2, b'x' * 65536)", "os.write(1, b'y' * 65536)",
                                   "print('z' * 100000)"])
def test_unbounded_output_is_cut_off_without_growing_the_trainer(flood):
    Path("/proc/self/clear_refs").write_text("5")       # resets the peak RSS
    before, start = peak_rss_mb(), time.monotonic()
    result = attack(GUARD_OFF + f"while True:\n    {flood}\n",
                    {"inputs": ["1 2\n"], "outputs": ["3\n"], "testtype": "stdin",
                     "time_limit": 1})
    if result is not None:
        assert result["score"] == 0.0
        assert time.monotonic() - start < 5
        assert peak_rss_mb() - before < 100


# ---- (h) the ordinary behaviours, and the refusal --------------------------------------------

def score(program, tests=STDIN):
    """(reward, feedback) of a program, or None where isolation is refused."""
    result = attack(program, tests)
    if result is None:
        return None
    return result["score"], None if result["score"] == 1.0 else result["feedback"]


def test_a_passing_program_scores_1():
    assert score("a, b = map(int, input().split())\nprint(a + b)") in (None, (1.0, None))


def test_a_failing_program_names_the_first_failing_test():
    got = score("a, b = map(int, input().split())\nprint(a * b if a > 1 else a + b)")
    assert got is None or (got[0] == 0.0 and got[1].startswith("Test Case 2: Wrong Answer"))


def test_an_infinite_loop_is_stopped():
    got = score("while True:\n    pass", {**STDIN, "time_limit": 0.5})
    assert got is None or (got[0] == 0.0 and got[1].startswith("Time Limit Exceeded"))


def test_a_memory_bomb_fails():
    got = score("x = []\nwhile True:\n    x.append(' ' * 10**7)")
    # the 1 GB limit stops it; on a loaded machine the time limit may come first
    assert got is None or (got[0] == 0.0 and ("MemoryError" in got[1]
                                              or got[1].startswith("Time Limit Exceeded")))


def test_an_answer_without_a_code_block_is_a_format_error():
    r = row("")
    assert code_reward.code_reward("print(3)", r) == 0.0
    assert code_reward.code_feedback("print(3)", r).startswith("Incorrect Format: Put your code")


def test_without_isolation_the_reward_refuses_naming_why_and_the_opt_in(monkeypatch):
    monkeypatch.setattr(sandbox, "_isolation_reason", "user namespaces are disabled here")
    r = row("print(3)")
    with pytest.raises(RuntimeError, match="user namespaces are disabled here.*"
                                           + sandbox.ALLOW_UNISOLATED):
        code_reward.code_reward(r["completion"], r)


def test_the_opt_in_runs_unisolated_with_a_warning(monkeypatch):
    monkeypatch.setattr(sandbox, "_isolation_reason", "user namespaces are disabled here")
    monkeypatch.setattr(sandbox, "_warned", False)
    monkeypatch.setenv(sandbox.ALLOW_UNISOLATED, "1")
    r = row("a, b = map(int, input().split())\nprint(a + b)")
    with pytest.warns(RuntimeWarning, match="NOT isolated"):
        assert code_reward.code_reward(r["completion"], r) == 1.0


# ---- (i) both paths on every suite run ---------------------------------------------------------

ORDINARY_UID = 4242     # not 65534: that id would hide a map written with the overflow id


@computed_ahead("ordinary_user_run")
def rerun_as_an_ordinary_user(_folder):
    """Run as root: this file's other tests, run again in a child that has become an ordinary
    user (tests/unprivileged.py): (its exit code, the end of what it printed). Computed beside
    the tests (conftest.py). Run as an ordinary user: None."""
    if os.geteuid() != 0:
        return None
    (ROOT / "runs").mkdir(exist_ok=True)     # victims where the program sees them, not /tmp
    victims = Path(tempfile.mkdtemp(prefix=".sandbox-ordinary-", dir=ROOT / "runs"))
    victims.chmod(0o777)                    # the child's own folder to make victims in
    try:
        nested = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "unprivileged.py"), str(ORDINARY_UID), "--",
             sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
             "not ordinary_user"], cwd=ROOT, capture_output=True, text=True, timeout=600,
            env={**os.environ, VICTIMS: str(victims), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    finally:
        shutil.rmtree(victims)
    return nested.returncode, nested.stdout[-3000:] + nested.stderr[-2000:]


def test_every_attack_also_fails_for_an_ordinary_user(ordinary_user_run):
    """The launcher's non-root path (a researcher on a workstation): run as root, every test
    above passes again as an ordinary user; run as an ordinary user, the tests above already
    took that path, so this one checks that they did."""
    if ordinary_user_run is None:
        assert sandbox.isolation_available() is None or not KERNEL_ALLOWS
        return
    returncode, tail = ordinary_user_run
    assert returncode == 0, tail
    assert re.search(r"\b\d{2} passed", tail) and "skipped" not in tail, tail
