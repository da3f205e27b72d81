"""Running model-written code for the code reward: a separate, limited process."""
from __future__ import annotations

import json
import os
import sys

# The program runs in a fresh `python -I -B` process (no user site, no environment variables
# read, no bytecode written) in an empty temporary directory, with a minimal environment, limits
# on memory, CPU time, file size and open files, a per-test alarm and a wall-clock kill. An audit
# hook installed before the program runs refuses what a test never needs: writing, deleting or
# renaming outside the working directory, starting processes, sockets, ctypes, raising limits.
# A guard against accidents of model-written code, not a security boundary against an attacker.


SANDBOX_RUNNER = r'''
import io, json, os, resource, signal, sys
job = json.loads(sys.stdin.read())
mem = job["memory_mb"] * 2 ** 20
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (job["cpu_seconds"], job["cpu_seconds"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 24, 2 ** 24))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
root = os.path.realpath(os.getcwd())
out = os.fdopen(os.dup(1), "w")

def inside(path):
    if isinstance(path, int):
        return True
    return os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)

WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.truncate", "os.chmod",
               "os.chown", "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.move"}
FORBIDDEN = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
             "subprocess.Popen", "os.kill", "os.killpg", "socket.connect", "socket.bind",
             "ctypes.dlopen", "resource.setrlimit", "os.setuid", "os.chroot", "pty.spawn"}

def guard(event, args):
    if event == "open" and args[0] is not None and (args[2] or 0) & WRITES and not inside(args[0]):
        raise PermissionError(f"sandbox: writing {args[0]} outside the working directory")
    if event in PATH_EVENTS and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
        raise PermissionError(f"sandbox: {event} outside the working directory")
    if event in FORBIDDEN:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in ("ctypes", "_ctypes", "multiprocessing"):
        raise PermissionError(f"sandbox: import {args[0]} is not allowed")

def alarm(signum, frame):
    raise TimeoutError("time limit exceeded")

signal.signal(signal.SIGALRM, alarm)
sys.addaudithook(guard)
tests, results = job["tests"], []
for given, expected in zip(tests["inputs"], tests["outputs"]):
    stdout = io.StringIO()
    text = given if isinstance(given, str) else json.dumps(given)
    sys.stdin, sys.stdout = io.StringIO(text), stdout
    signal.setitimer(signal.ITIMER_REAL, job["seconds_per_test"])
    try:
        scope = {"__name__": "__main__"}
        exec(compile(job["code"], "<model code>", "exec"), scope)
        if tests.get("testtype", "stdin") == "functional":
            args = (given if isinstance(given, list)
                    else [json.loads(a) for a in given.split("\n") if a.strip()])
            got = scope[tests["fn_name"]](*args)
            want = json.loads(expected) if isinstance(expected, str) else expected
            ok = json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
        else:
            got = stdout.getvalue()
            ok = got.split() == str(expected).split()
        results.append({"ok": ok, "got": repr(got)[:200]})
    except BaseException as e:
        results.append({"ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout = sys.__stdout__
    if not results[-1]["ok"]:
        break
out.write(job["marker"] + json.dumps(results) + "\n")
out.flush()
'''


def run_untrusted_code(code: str, tests: dict, *, seconds_per_test: float = 2.0,
                       memory_mb: int = 512) -> dict:
    """Run `code` on each (input, expected output) of `tests` in a limited subprocess, stopping at
    the first failure. Returns {"passed": bool, "feedback": the first failure, shortened}."""
    import subprocess
    import tempfile
    n = len(tests["inputs"])
    marker = f"@@results-{os.urandom(8).hex()}@@"
    job = {"code": code, "tests": tests, "seconds_per_test": seconds_per_test,
           "memory_mb": memory_mb, "cpu_seconds": int(seconds_per_test * n) + 2, "marker": marker}
    with tempfile.TemporaryDirectory(prefix="sdpo-cl-code-") as work:
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        try:
            done = subprocess.run([sys.executable, "-I", "-B", "-c", SANDBOX_RUNNER],
                                  input=json.dumps(job), capture_output=True, text=True, cwd=work,
                                  env=env, timeout=seconds_per_test * n + 5,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            return {"passed": False, "feedback": "Time limit exceeded."}
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        return {"passed": False, "feedback": f"The program was killed (exit code "
                                             f"{done.returncode}): {done.stderr.strip()[-200:]}"}
    results = json.loads(lines[-1][len(marker):])
    for i, (r, given, want) in enumerate(zip(results, tests["inputs"], tests["outputs"])):
        if not r["ok"]:
            what = r.get("error") or f"output {r['got']}, expected {str(want)[:100]!r}"
            return {"passed": False,
                    "feedback": f"Test {i + 1} failed on input {str(given)[:100]!r}: {what}"}
    return {"passed": len(results) == n, "feedback": None}
