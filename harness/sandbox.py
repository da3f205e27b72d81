"""Running model-written code for the code reward, isolated by the operating system.

One test of one program runs in one fresh process tree that the kernel walls off from the
trainer (Linux namespaces, see docs/sandbox.md):

  trainer ── python -I -B -c LAUNCHER (own session) ── pid 1 of a new pid namespace: RUNNER
                                                       └── anything the program starts

- The program receives its code and ONE test input, never an expected output: the trainer
  compares what it reads back (at most OUTPUT_CAP bytes) with the expected output itself
  (harness/data.py), so a program can neither learn the answer nor report a pass.
- An assert test (whose expected values are inside its test code) is split in two runners:
  the program answers calls of the function under test, the test code makes them and checks
  the answers; only literal values, parsed by the trainer, pass between them (run_assert_test).
- It runs as an unprivileged user with no capabilities (`no_new_privs`), in its own user, mount,
  pid, network, IPC and UTS namespaces: every mount read-only except a fresh, size-limited
  /tmp (its working folder), the host's /tmp, /run, /var/tmp, /dev/shm and the trainer's data
  caches hidden, a fresh /proc that shows only its own processes, no network but a loopback
  that is down. When pid 1 ends, the kernel kills every process of its namespace.
- Why namespaces: nothing to install (bwrap and nsjail are not pip-installable), they hold
  against code that turns off any Python-level guard (the guard is the kernel, not the
  interpreter), and they work for a trainer run as root or as a normal user.

Where the kernel refuses (macOS, Windows, containers that disable user namespaces), the code
reward refuses to run, naming why, unless SDPO_CL_ALLOW_UNISOLATED_CODE=1: then each test runs
in a plain subprocess with resource limits only, and a warning says so.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import warnings

ALLOW_UNISOLATED = "SDPO_CL_ALLOW_UNISOLATED_CODE"
MEMORY_BYTES = 2 ** 30          # the official 1 GB address-space limit (feedback/code.py:22)
OUTPUT_CAP = 8 * 2 ** 20        # bytes of stdout the trainer reads from one test, then kills
STDERR_CAP = 64 * 2 ** 10       # the program's stderr is captured inside; this is stray writes
WORK_SIZE = "64m"               # the program's writable /tmp
NOBODY = 65534                  # the user a trainer run as root hands the program to
VALUE_CAP = 2 ** 20             # characters of one return value of an assert test's call
HIDDEN_PATHS: set[str] = set()  # folders the program must not see; see hide_path
# The modules a program may import (code.py:83-152) and the typing names predefined for it
# (code.py:198-232); the runner receives both with its job.
ALLOWED_MODULES = ("math cmath itertools functools operator statistics random collections "
                   "heapq bisect array string re typing json io fractions decimal dataclasses "
                   "datetime time sys sortedcontainers numpy").split()
TYPING_NAMES = ("Any Optional Union List Dict Set Tuple Callable Iterable Iterator Sequence "
                "Mapping MutableMapping MutableSequence MutableSet DefaultDict Deque FrozenSet "
                "Type TypeVar Generic Literal TypedDict NoReturn overload").split()


def hide_path(path) -> None:
    """Hide a folder (a task's data folder, a run folder) from every later program: it will
    see an empty, read-only folder there. The loader of a task calls this with its folder."""
    HIDDEN_PATHS.add(os.path.realpath(path))


# ---- The launcher: trusted code that builds the walls, then hands over to the runner ----------
# It runs before any model-written code, in a fresh interpreter (no state of the trainer). Its
# steps, in order: (1) new namespaces (as root: first a mount namespace only, then drop to
# nobody), (2) the filesystem view, (3) fork pid 1, (4) in pid 1: die with the launcher, a fresh
# /proc, no new privileges, no inherited files, exec the runner. The exec of a non-root user
# clears every capability, so the program cannot undo a mount.

LAUNCHER = r'''
import ctypes, errno, json, os, re, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = (0x20000, 0x4000000, 0x8000000, 0x10000000,
                                                 0x20000000, 0x40000000)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
LOCKABLE = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC}
PDEATHSIG, DUMPABLE, NO_NEW_PRIVS = 1, 4, 38


def ok(ret, what):
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    ok(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def new_namespaces():
    """Unshare every namespace, then map this process's own (non-root) ids in the new user
    namespace: files of other users stay foreign to it, and its capabilities end at exec. The
    ids are read BEFORE the unshare: after it, getuid() answers the overflow id (65534) until a
    map is written, and the kernel refuses to map an id the writer does not own."""
    uid, gid = os.getuid(), os.getgid()
    ok(libc.unshare(NEWUSER | NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS), "unshare")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"{uid} {uid} 1")
    write("/proc/self/gid_map", f"{gid} {gid} 1")


def mounts():
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        yield point, set(fields[5].split(","))


def inside(path, folder):
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def cover(path, options, keep):
    """An empty tmpfs over `path`; the interpreter's folders under it are bound back."""
    under = [k for k in keep if inside(k, path) and k != path]
    if any(inside(path, k) for k in keep):
        return                          # hiding it would hide the interpreter itself
    try:                                # opened before the cover hides them
        fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in under]
        mount("tmpfs", path, "tmpfs", NOSUID | NODEV, options)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR):
            return                      # not there, or not reachable by this user either
        raise
    for k, fd in zip(under, fds):
        os.makedirs(k, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", k, None, BIND | REC)
        os.close(fd)


def read_only_everywhere(work):
    """Remount every mount read-only but the work folder. A remount must keep the flags a
    less privileged namespace may not clear (nosuid, nodev, noexec; atime is kept by leaving
    it out). /proc is left: pid 1 mounts a fresh one over it, and uid_map is written there."""
    for point, opts in list(mounts()):
        if point == work or inside(point, "/proc"):
            continue
        locked = sum(flag for name, flag in LOCKABLE.items() if name in opts)
        try:
            mount(None, point, None, REMOUNT | BIND | RDONLY | locked)
        except OSError as e:
            # Skipped only where it cannot become a way to write: a mount already read-only,
            # or one whose path this user cannot reach (nor can the program: same ids, and
            # no capabilities over other users' files).
            if "ro" in opts or e.errno in (errno.EACCES, errno.ENOENT):
                continue
            raise


def build_view(work_owner):
    mount(None, "/", None, REC | PRIVATE)   # nothing done here reaches the host's mounts
    keep = cfg["keep"]
    work_opts = f"mode=0700,size={cfg['work_size']},nr_inodes=4096" + (
        f",uid={work_owner},gid={work_owner}" if work_owner is not None else "")
    cover("/tmp", work_opts, keep)
    for path in cfg["hide"]:
        cover(path, "mode=0755,size=1m,nr_inodes=1024", keep)
    read_only_everywhere("/tmp")


os.umask(0o022)
if os.geteuid() == 0:
    # Root: build the view with real root in a mount namespace of its own, then become nobody,
    # so the program owns no file of the host and cannot open root-only devices. The folders
    # root alone may enter (/root) are covered, with the interpreter bound back inside.
    ok(libc.unshare(NEWNS), "unshare")
    build_view(cfg["nobody"])
    os.setgroups([])
    os.setresgid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
    os.setresuid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
    ok(libc.prctl(DUMPABLE, 1, 0, 0, 0), "prctl")   # so /proc/self/uid_map is ours to write
    new_namespaces()
else:
    new_namespaces()
    build_view(None)
os.chdir("/tmp")

child = os.fork()                   # pid 1 of the new pid namespace
if child:
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)

ok(libc.prctl(PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")   # the launcher killed: pid 1 too
try:                                # a /proc of this namespace only: the trainer is not in it
    mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC | RDONLY)
except OSError:                     # refused (e.g. a container's masked /proc): hide it all
    mount("tmpfs", "/proc", "tmpfs", NOSUID | NODEV | NOEXEC | RDONLY, "size=4k")
ok(libc.prctl(NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
os.closerange(3, 1 << 16)
os.execv(sys.executable, [sys.executable, "-I", "-B", "-c", cfg["runner"]])
'''


# ---- Literal values: what passes between the two halves of an assert test ---------------------
# Defined here, where they can be tested, and shipped into the runner as source text.

def encode_literal(value, depth: int = 0) -> str:
    """Python source for a value made only of None, bools, numbers, strings, bytes, lists,
    tuples, dicts and sets (a numpy scalar as its Python value), exact types only, which
    parse_literal reads back; TypeError for anything else."""
    import math
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        value = value.item()
    kind = type(value)
    if value is None or kind in (bool, int, float, str, bytes):
        return repr(value)              # a float may read inf, -inf or nan: see parse_literal
    if kind is complex and math.isfinite(value.real) and math.isfinite(value.imag):
        return repr(value)
    if kind not in (list, tuple, dict, set):
        raise TypeError(f"a {kind.__name__} is not a literal value")
    if depth > 100:
        raise TypeError("a value nested more than 100 levels deep")
    if kind is dict:
        return "{" + ", ".join(f"{encode_literal(k, depth + 1)}: {encode_literal(v, depth + 1)}"
                               for k, v in value.items()) + "}"
    items = [encode_literal(v, depth + 1) for v in value]
    if kind is set:
        return "{" + ", ".join(items) + "}" if items else "set()"
    if kind is tuple:
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    return "[" + ", ".join(items) + "]"


def parse_literal(text: str):
    """The value of a literal as encode_literal writes it: ast.literal_eval, with the names
    inf and nan read as those floats. Raises (ValueError, SyntaxError, RecursionError, ...)
    for any other text: nothing in it is ever called."""
    import ast

    class Floats(ast.NodeTransformer):
        def visit_Name(self, node):
            if node.id in ("inf", "nan"):
                return ast.copy_location(ast.Constant(float(node.id)), node)
            return node
    tree = ast.parse(text.strip(), mode="eval")
    if "inf" in text or "nan" in text:
        tree = Floats().visit(tree)
    return ast.literal_eval(tree)


# ---- The runner: executes the program on one test, the official way ---------------------------
# Child-side half of the official code reward (verl/utils/reward_score/feedback/code.py in
# lasgroup/SDPO; line numbers below). It reports what the program did after a delimiter on
# stdout; the trainer decides pass or fail. The program runs in this process and can forge
# that report, so the report holds only the program's own answer, nothing to forge a pass with.
# An assert test runs in two runners (run_assert_test): one serves the program's function
# ("serve"), the other runs the test code ("asserts"), each call relayed through the trainer.

RUNNER = inspect.getsource(encode_literal) + inspect.getsource(parse_literal) + r'''
import __future__, ast, io, json, resource, sys
requests = sys.stdin.buffer     # the job's line; then, in an assert test, one line per message
job = json.loads(requests.readline())
real_stdout = sys.stdout
for kind, value in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_CPU, job["cpu"]),
                    (resource.RLIMIT_FSIZE, 2 ** 24), (resource.RLIMIT_NOFILE, 64),
                    (resource.RLIMIT_NPROC, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(kind, (value, value))

import builtins
# The allowed builtins and modules (code.py:83-152); open is None, __import__ checks the list
# (code.py:154-167); common typing names are predefined (code.py:198-232).
SAFE = ("abs all any bool bytes callable chr dict enumerate filter float format frozenset hash "
        "hex int isinstance issubclass iter len list map max min next object ord pow print "
        "range repr reversed round set slice sorted str sum tuple zip input").split()
MODULES, TYPING = set(job["modules"]), job["typing"]


def allowed_import(name, globals=None, locals=None, fromlist=(), level=0):
    if name.split(".")[0] not in MODULES:
        raise ImportError(f"Import of module '{name}' is not allowed")
    return builtins.__import__(name, globals, locals, fromlist, level)


debug = io.StringIO()       # the program's stderr and debug_print (code.py:172-196)


def debug_print(*args, sep=" ", end="\n", **_):
    debug.write(sep.join(str(a) for a in args) + end)


def namespace():
    names = {n: getattr(builtins, n) for n in SAFE}
    names.update(open=None, __import__=allowed_import, __build_class__=builtins.__build_class__)
    import typing
    ns = {"__builtins__": names, "debug_print": debug_print, "__debug_buffer__": debug}
    ns.update({n: getattr(typing, n) for n in TYPING if hasattr(typing, n)})
    ns["__name__"] = "__not_main__"
    return ns


def short_trace(e):
    """The error and the program's last three frames (code.py:381-401)."""
    import traceback
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "Solution.py"]
    lines = [f"{type(e).__name__}: {e}"]
    for f in frames[-3:]:
        if f.line:
            lines.append(f"  {f.line}")
        lines.append(f"Line {f.lineno} in {f.name} (Solution.py)")
    return "\n".join(lines)


def function_name(code, ns, fn_name):
    """The official inference (code.py:416-435): the given name if the program defines it,
    else the first top-level def, else the word before the first parenthesis."""
    if fn_name != "" and fn_name in ns and callable(ns[fn_name]):
        return fn_name
    name = None
    try:
        defs = [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)]
        name = fn_name if fn_name in defs else (defs[0] if defs else None)
    except Exception:
        pass
    if name not in ns or not callable(ns.get(name)):
        name = code.split("(")[0].split()[-1]
    return name


def jsonable(value):
    """Only JSON's own types, so an object cannot fake equality (code.py:270-283)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    raise TypeError(f"Non-serializable result type: {type(value).__name__}")


def say(message):
    """One message to the trainer: a line after the delimiter. (The program may write such
    lines too: the trainer takes none as more than the program's own answer.)"""
    real_stdout.write("\n" + job["delimiter"] + json.dumps(message) + "\n")
    real_stdout.flush()


# An assert test (code.py:491-505 runs the program, then the test code, in one namespace)
# runs here in two runners that never share a process: the program's ("serve") and the test
# code's ("asserts"); the trainer relays each call between them.

def load_program(code, ns):
    """The program's half: the program loaded as the official one loads it; then serve."""
    ns["__name__"] = "__main__"
    sys.stdin, sys.stdout = io.StringIO(), io.StringIO()
    exec(compile(code, "Solution.py", "exec"), ns)
    return {"ready": True}


def answer(request, ns):
    """One call of the function under test on literal arguments: the value as a literal, or
    the exception (its type, message and the official short trace)."""
    try:
        args, kwargs = (parse_literal(text) for text in request["call"])
        if job["fn_name"] not in ns:
            raise NameError(f"name {job['fn_name']!r} is not defined")
        result = ns[job["fn_name"]](*args, **kwargs)
    except BaseException as e:
        return {"error": f"Error: {short_trace(e)}", "type": type(e).__name__,
                "message": str(e)[:1000]}
    try:
        return {"value": encode_literal(result)}
    except Exception as e:
        return {"unsendable": str(e)}


def serve(ns):
    """Answer each call the trainer relays until it closes stdin; each answer carries the
    debug output written since the one before."""
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(), io.StringIO(), debug
    shown = len(debug.getvalue())
    for line in iter(requests.readline, b""):
        reply = answer(json.loads(line), ns)
        reply["debug"], shown = debug.getvalue()[shown:][-4000:], len(debug.getvalue())
        say(reply)


def relayed(reply):
    """The program's exception, raised again in the test code: the builtin class of its name
    (else Exception), marked as the program's."""
    kind = getattr(builtins, reply.get("raise", ""), None)
    if not (isinstance(kind, type) and issubclass(kind, BaseException)):
        kind = Exception
    try:
        error = kind(reply.get("message", ""))
    except Exception:
        error = Exception(reply.get("message", ""))
    error.relayed = True
    return error


def stand_in(name):
    """What the test code calls instead of the program's function: each call goes to the
    trainer as literals; the answer comes back as a literal value, or as an exception."""
    def call(*args, **kwargs):
        try:
            say({"call": [encode_literal(list(args)), encode_literal(kwargs)]})
        except Exception as e:          # the row's fault: the trainer ends the test
            say({"unsendable": str(e)})
            requests.readline()
            raise SystemExit(1)
        reply = json.loads(requests.readline())
        if "value" in reply:
            return parse_literal(reply["value"])
        raise relayed(reply)
    call.__name__ = call.__qualname__ = name
    return call


def run_asserts(code, imports, ns):
    """The test code's half, in the official order (the context, then the test code), with a
    stand-in for the function under test and the allowed modules it uses without importing."""
    for module in imports:
        ns[module] = allowed_import(module)
    ns[job["fn_name"]] = stand_in(job["fn_name"])
    ns["__name__"] = "__main__"
    sys.stdin, sys.stdout = io.StringIO(), io.StringIO()
    try:
        exec(compile(code, "Tests.py", "exec"), ns)
    except BaseException as e:
        if getattr(e, "relayed", False):
            return {"relayed": True}        # the trainer reports the program's own trace
        raise
    return {"passed": True}


def run(code, given, kind, fn_name, ns):
    if kind == "stdin":     # code.py:470-488: stdin and stdout are strings, __name__ is main
        out = io.StringIO()
        sys.stdin, sys.stdout = io.StringIO(given), out
        exec(compile('__name__ = "__main__"\n' + code, "Solution.py", "exec"), ns)
        return {"output": out.getvalue()}
    if kind == "serve":     # an assert test's program
        return load_program(code, ns)
    if kind == "asserts":   # an assert test's test code; `given`: the modules to import
        return run_asserts(code, given, ns)
    # functional, code.py:404-467: postponed annotations; a dict is keyword arguments, a
    # string is one JSON value per whitespace-separated word
    exec(compile(code, "Solution.py", "exec", flags=__future__.annotations.compiler_flag,
                 dont_inherit=True), ns)
    name = function_name(code, ns, fn_name)
    sys.stdout = io.StringIO()
    if isinstance(given, dict):
        result = ns[name](**given)
    else:
        result = ns[name](*[json.loads(x) for x in given.split()])
    try:
        value = json.dumps(jsonable(result), sort_keys=True, separators=(",", ":"))
    except Exception as e:
        return {"error": f"Error: {e}"}
    return {"value": value, "shown": str(result)[:1000]}


import traceback     # now: after a MemoryError there may be no room to import it
report, ns = {}, namespace()
try:
    if job["context"].strip():          # the row's context code, first (code.py:514-518)
        exec(compile(job["context"], "Context.py", "exec"), ns)
    sys.stderr = debug
    report = run(job["code"], job["input"], job["kind"], job["fn_name"], ns)
except BaseException as e:
    report = {"error": f"Error: {short_trace(e)}"}
finally:
    sys.stdout, sys.stderr = real_stdout, sys.__stderr__
report["debug"] = debug.getvalue()[-4000:]
say(report)
if report.get("ready") is True:
    serve(ns)
'''


# ---- The trainer's side: what to show and hide, start, feed, read with a cap, kill -----

def _closed_ancestors(paths) -> set:
    """For a trainer run as root: the topmost folder above each path that others may not
    enter (/root for an interpreter under /root/.pyenv). Covered, with the path bound back."""
    closed = set()
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            folder = "/" + "/".join(parts[:i])
            if not os.stat(folder).st_mode & 0o001:
                closed.add(folder)
                break
    return closed


def _launcher_config() -> dict:
    """What the launcher needs: the interpreter's folders to keep visible and the folders to
    hide (the host's scratch space and the data caches the trainer reads from)."""
    real = os.path.realpath
    keep = {real(sys.base_prefix), real(sys.prefix), os.path.dirname(real(sys.executable))}
    keep = sorted(k for k in keep if not any(k != o and k.startswith(o + "/") for o in keep))
    caches = [os.environ.get(v) for v in ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE",
                                          "TRANSFORMERS_CACHE")]
    caches += [os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                            "huggingface")]
    hide = {real(p) for p in ["/var/tmp", "/dev/shm", "/run", *caches, *HIDDEN_PATHS] if p}
    if os.geteuid() == 0:
        hide |= _closed_ancestors(keep)
    return {"keep": keep, "hide": sorted(hide - {"/tmp"}, key=lambda p: p.count("/")),
            "nobody": NOBODY, "work_size": WORK_SIZE, "runner": RUNNER}


def _exchange(argv, env, cwd, payload: bytes, seconds: float) -> dict:
    """Run argv in its own session; write payload to its stdin; read stdout and stderr until
    both close, at most `seconds` and OUTPUT_CAP / STDERR_CAP bytes; then kill its group."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
    caps = {proc.stdout: OUTPUT_CAP, proc.stderr: STDERR_CAP}
    got = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    for pipe in got:
        sel.register(pipe, selectors.EVENT_READ)
    for key in sel.get_map().values():
        os.set_blocking(key.fd, False)
    pending, stop, end = memoryview(payload), None, time.monotonic() + seconds
    while sel.get_map() and stop is None:
        left = end - time.monotonic()
        if left <= 0:     # an exited process whose pipes a leftover holds (unisolated) is done
            stop = None if proc.poll() is not None else "timeout"
            break
        for key, _ in sel.select(left):
            pipe = key.fileobj
            if pipe is proc.stdin:
                try:
                    pending = pending[os.write(key.fd, pending[:65536]):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:         # it stopped reading: the rest is not needed
                    pending = pending[:0]
                if not pending:
                    sel.unregister(pipe)
                    pipe.close()
                continue
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(pipe)
            got[pipe] += data
            if len(got[pipe]) > caps[pipe]:
                stop = "too much output"
                break
    sel.close()
    try:                    # before wait(): the group id cannot have been reused yet
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()
    return {"stop": stop, "returncode": proc.wait(), "stdout": bytes(got[proc.stdout]),
            "stderr": bytes(got[proc.stderr])}


def _child_env(home: str) -> dict:
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _read_report(done: dict, delimiter: str) -> dict:
    """The runner's report, checked field by field (the program may have written it)."""
    if done["stop"] == "timeout":
        return {"timed_out": True}
    detail = done["stderr"].decode("utf-8", "replace").strip()[-500:]
    if done["stop"]:
        return {"error": "Error: the program wrote more output than the limit", "detail": detail}
    text = done["stdout"].decode("utf-8", "replace")
    _, found, tail = text.rpartition(delimiter)
    try:
        report = json.loads(tail) if found else None
    except json.JSONDecodeError:
        report = None
    types = {"output": str, "value": str, "shown": str, "error": str, "debug": str}
    if not isinstance(report, dict) or not all(
            k in types and isinstance(v, types[k]) for k, v in report.items()):
        code = done["returncode"]
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            return {"timed_out": True}
        return {"error": f"Error: the program was killed ({how})", "detail": detail}
    return report


def _full_job(job: dict, seconds: float) -> dict:
    """A job with the limits, the allowed modules and typing names, and a fresh delimiter."""
    return {**job, "memory": MEMORY_BYTES, "cpu": math.ceil(seconds) + 1,
            "modules": ALLOWED_MODULES, "typing": TYPING_NAMES,
            "delimiter": f"@@sdpo-cl-report-{os.urandom(8).hex()}@@"}


def _runner_argv(isolated: bool) -> list:
    if isolated:
        return [sys.executable, "-I", "-B", "-c", LAUNCHER, json.dumps(_launcher_config())]
    return [sys.executable, "-I", "-B", "-c", RUNNER]


def _run_job(job: dict, *, seconds: float, isolated: bool) -> dict:
    job = _full_job(job, seconds)
    payload = json.dumps(job).encode()
    if isolated:
        done = _exchange(_runner_argv(True), _child_env("/tmp"), None, payload, seconds)
    else:
        with tempfile.TemporaryDirectory(prefix="sdpo-cl-code-") as work:
            done = _exchange(_runner_argv(False), _child_env(work), work, payload, seconds)
    return _read_report(done, job["delimiter"])


# ---- Assert tests: two runners, the trainer between them --------------------------------------

class _Child:
    """A runner spoken to in messages, one JSON object a line after its delimiter, both ways:
    its stdout read with the byte cap, everything by a shared deadline; close() kills its
    process group."""

    def __init__(self, job: dict, deadline: float, isolated: bool):
        job = _full_job(job, deadline - time.monotonic())
        self.delimiter, self.deadline, self.stop = job["delimiter"].encode(), deadline, None
        self.work = None if isolated else tempfile.TemporaryDirectory(prefix="sdpo-cl-code-")
        home = self.work.name if self.work else "/tmp"
        self.proc = subprocess.Popen(_runner_argv(isolated), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=_child_env(home), cwd=home if self.work else None,
                                     start_new_session=True)
        self.out, self.err, self.pending = bytearray(), bytearray(), bytearray()
        self.selector = selectors.DefaultSelector()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            os.set_blocking(pipe.fileno(), False)
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.selector.register(self.proc.stderr, selectors.EVENT_READ)
        self.send(job)

    def send(self, message: dict) -> None:
        if not self.pending and not self.proc.stdin.closed:
            self.selector.register(self.proc.stdin, selectors.EVENT_WRITE)
        self.pending += json.dumps(message).encode() + b"\n"

    def receive(self) -> dict | None:
        """Its next message ({} if it is not a JSON object); None once it has ended, run past
        the deadline or written more than OUTPUT_CAP without a message (`stop` says which)."""
        while True:
            start = self.out.find(self.delimiter)
            end = self.out.find(b"\n", start) if start >= 0 else -1
            if end >= 0:
                text = bytes(self.out[start + len(self.delimiter):end])
                del self.out[:end + 1]
                try:
                    message = json.loads(text)
                except (ValueError, RecursionError):
                    message = {}
                return message if isinstance(message, dict) else {}
            if self.stop:
                return None
            self._pump()

    def _pump(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.stop = "timeout"
            return
        for key, _ in self.selector.select(left):
            if key.fileobj is self.proc.stdin:
                self._write()
                continue
            data = os.read(key.fd, 65536)
            if key.fileobj is self.proc.stderr:
                self.err = (self.err + data)[-STDERR_CAP:]
                if not data:
                    self.selector.unregister(key.fileobj)
                continue
            self.out += data
            if not data:
                self.stop = "ended"
            elif len(self.out) > OUTPUT_CAP:
                self.stop = "too much output"

    def _write(self) -> None:
        try:
            del self.pending[:os.write(self.proc.stdin.fileno(), self.pending[:65536])]
        except BlockingIOError:
            return
        except BrokenPipeError:             # it stopped reading: it has ended, or will
            self.pending.clear()
        if not self.pending:
            self.selector.unregister(self.proc.stdin)

    def failure(self) -> dict:
        """Why it gave no message, as a report: the deadline, the cap, or how it exited."""
        for _ in range(100 if self.stop == "ended" else 0):   # its exit status, not reaped
            if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                break
            time.sleep(0.01)
        self.close()
        done = {"stop": None if self.stop == "ended" else self.stop, "stdout": b"",
                "returncode": self.proc.returncode, "stderr": bytes(self.err)}
        return _read_report(done, self.delimiter.decode())

    def close(self) -> None:
        if self.proc.returncode is None:
            try:                            # before wait(): the group id cannot be reused yet
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        self.selector.close()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()
        if self.work:
            self.work.cleanup()


class _Decided(Exception):
    """An assert test decided: `report` says how."""

    def __init__(self, report: dict):
        super().__init__(report)
        self.report = report


class _AssertRun:
    """One assert test between its two runners. Each call the test code makes goes to the
    program; the answer goes back only as a value this trainer has parsed as a literal, or as
    the program's exception. The program never holds the test code or its expected values."""

    def __init__(self, program: _Child, tests: _Child, entry: str):
        self.program, self.tests, self.entry = program, tests, entry
        self.debug, self.raised = "", "Error: "

    def result(self) -> dict:
        """The report, as run_program's, with the program's "debug"."""
        try:
            self._start()
            while True:
                message = self.tests.receive()
                if not (isinstance(message, dict) and "call" in message):
                    raise _Decided(self._verdict(message))
                self.tests.send(self._call(message["call"]))
        except _Decided as decided:
            return {**decided.report, "debug": self.debug}

    def _from_program(self, message: dict | None) -> dict:
        if message is None:                 # it ended, ran out of time or flooded
            raise _Decided(self.program.failure())
        self.debug = (self.debug + str(message.get("debug", "")))[-4000:]
        return message

    def _start(self) -> None:
        ready = self._from_program(self.program.receive())
        if ready.get("ready") is not True:  # the program (or the context) failed to load
            raise _Decided({"error": str(ready.get("error", "Error: the program did not load"))})

    def _call(self, call) -> dict:
        """The program's answer to one call, for the test code."""
        self.program.send({"call": call})
        reply = self._from_program(self.program.receive())
        if isinstance(reply.get("error"), str):
            self.raised = reply["error"]
            return {"raise": str(reply.get("type")), "message": str(reply.get("message"))}
        value = reply.get("value")
        try:        # an object with its own __eq__ never gets here: only literal text does
            if not isinstance(value, str):
                raise ValueError(str(reply.get("unsendable", "no value")))
            if len(value) > VALUE_CAP:
                raise ValueError(f"over {VALUE_CAP} characters")
            parse_literal(value)
        except Exception as e:
            raise _Decided({"error": f"Error: {self.entry} returned what is not a literal value "
                                     f"({str(e)[:200]}); only literal values are compared"})
        return {"value": value}

    def _verdict(self, message: dict | None) -> dict:
        """The test code's report, or why it gave none."""
        if message is None:
            return self.tests.failure()
        if message.get("passed") is True:
            return {"passed": True}
        if message.get("relayed") is True:  # the program's exception, uncaught by the tests
            return {"error": self.raised}
        if "unsendable" in message:
            return {"error": f"Error: the row's test code passes {self.entry} a value that is "
                             f"not a literal ({message['unsendable']}); it cannot be checked"}
        return {"error": str(message.get("error", "Error: the test code did not report"))}


# ---- Availability: tried once, then refused or opted out of -------------------------------

_UNKNOWN = object()
_isolation_reason = _UNKNOWN
_warned = False


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"user namespaces are a Linux feature; this is {sys.platform}"
    result = _run_job({"code": "print('isolated')", "input": "", "kind": "stdin",
                       "fn_name": "", "context": ""}, seconds=20, isolated=True)
    if result.get("output") == "isolated\n":
        return None
    return "the namespace sandbox did not start: " + (result.get("detail") or "no output")[-300:]


def isolation_available() -> str | None:
    """None when programs can run isolated here; else why not (tried once, then cached)."""
    global _isolation_reason
    if _isolation_reason is _UNKNOWN:
        _isolation_reason = _probe()
    return _isolation_reason


def _setting(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def how_to_isolate() -> str:
    """What the user can change so that the sandbox starts here, read from the kernel's own
    settings (docs/sandbox.md has each common setup)."""
    if not sys.platform.startswith("linux"):
        return ("User namespaces exist on Linux only: run the trainer in a Linux virtual "
                "machine, or in a Linux container that may create namespaces (as root).")
    for path, value, change in (
            ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
             "Ubuntu (23.10 and later) lets AppArmor refuse user namespaces to ordinary "
             "users: allow them with `sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns"
             "=0` (a file in /etc/sysctl.d keeps it), or run the trainer as root"),
            ("/proc/sys/kernel/unprivileged_userns_clone", "0",
             "this kernel refuses user namespaces to ordinary users: `sudo sysctl -w "
             "kernel.unprivileged_userns_clone=1`, or run the trainer as root"),
            ("/proc/sys/user/max_user_namespaces", "0",
             "user namespaces are switched off: `sudo sysctl -w user.max_user_namespaces=15000`")):
        if _setting(path) == value:
            return change[0].upper() + change[1:] + "."
    return ("The kernel allows user namespaces, so a container's filter is the likely cause: "
            "Docker's default seccomp profile refuses the unshare call (`docker run --security-"
            "opt seccomp=unconfined` lifts it); run where the trainer may create namespaces.")


def refusal(reason: str) -> str:
    """The one message of a refused code reward: what failed, what to change, the opt-out."""
    return (f"The code reward runs model-written programs only isolated by the operating "
            f"system, and here it cannot: {reason}. {how_to_isolate()} Or, for code you trust "
            f"only, pass --allow-unisolated-code ({ALLOW_UNISOLATED}=1): each program then runs "
            f"in a plain subprocess with resource limits only, and can read and write whatever "
            f"this user can (docs/sandbox.md).")


def _isolated() -> bool:
    """True to isolate, False to run unisolated (opted in); raises when refused (a run refuses
    before any work: run_sequence.py asks isolation_available first)."""
    global _warned
    reason = isolation_available()
    if reason is None:
        return True
    if os.environ.get(ALLOW_UNISOLATED) != "1":
        raise RuntimeError(refusal(reason))
    if not _warned:
        warnings.warn(f"{ALLOW_UNISOLATED}=1: model-written code runs NOT isolated ({reason}); "
                      f"it can read and write what the trainer can.", RuntimeWarning)
        _warned = True
    return False


def run_program(code: str, test_input, *, kind: str = "stdin", fn_name: str = "",
                context: str = "", seconds: float = 2.0) -> dict:
    """Run `code` on one test input; the runner's report: {"output": stdout} (stdin tests),
    {"value": the return value's JSON, "shown": its str} (functional) or {"error": "Error:
    ..."}, each with "debug" (stderr); or {"timed_out": True}. Assert tests: run_assert_test.
    Isolated, or refused (see the module docstring)."""
    job = {"code": code, "input": test_input, "kind": kind, "fn_name": fn_name,
           "context": context}
    return _run_job(job, seconds=seconds, isolated=_isolated())


def run_assert_test(code: str, test_code: str, *, entry: str, imports=(), context: str = "",
                    seconds: float = 2.0) -> dict:
    """An assert test (testtype "code") split in two runners: the program answers the calls of
    its function `entry`; the test code, with a stand-in for `entry` (and the allowed modules
    `imports` bound), makes them and checks the answers. Both run the row's context first.
    The report as run_program's. Isolated, or refused (see the module docstring)."""
    isolated, deadline = _isolated(), time.monotonic() + seconds
    jobs = [{"code": code, "kind": "serve", "input": ""},
            {"code": test_code, "kind": "asserts", "input": list(imports)}]
    children = []
    try:
        for job in jobs:
            children.append(_Child({**job, "fn_name": entry, "context": context}, deadline,
                                   isolated))
        return _AssertRun(*children, entry).result()
    finally:
        for child in children:
            child.close()
