"""Run a command as an ordinary (non-root) user, from a test suite run as root, so that the
sandbox's non-root path runs on every suite run, whichever user runs it.

    python tests/unprivileged.py UID -- COMMAND...

As root: in a mount namespace of its own, each folder above the interpreter and the project that
others may not enter (/root, for an interpreter under /root/.pyenv) is covered with an empty,
enterable tmpfs with those folders bound back inside, as a workstation user's own home would
let them be read; then every group is dropped and the uid and gid become UID, and COMMAND is
executed. UID must not be 65534, the overflow id a user namespace reports for an unmapped id:
a bug that reads the id after the unshare would go unseen with it. Nothing here changes the
host: the mounts exist only in the child's namespace.
"""
from __future__ import annotations

import ctypes
import os
import sys

NEWNS, BIND, REC, PRIVATE = 0x20000, 4096, 16384, 1 << 18
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def closed_ancestor(path: str) -> str | None:
    """The topmost folder above `path` that others may not enter, or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        folder = "/" + "/".join(parts[:i])
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def open_for_others(libc, keep) -> None:
    """Cover each closed ancestor of `keep` with an enterable tmpfs; bind `keep` back inside."""
    def ok(ret, what):
        if ret != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
    ok(libc.unshare(NEWNS), "unshare")
    ok(libc.mount(None, b"/", None, REC | PRIVATE, None), "mount private")
    covers = {}
    for path in keep:
        top = closed_ancestor(path)
        if top is not None:
            covers.setdefault(top, []).append(path)
    for top, paths in covers.items():
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths]  # before the cover
        ok(libc.mount(b"tmpfs", top.encode(), b"tmpfs", 0, b"mode=0755,size=1m"), "cover")
        for path, fd in zip(paths, fds):
            os.makedirs(path, mode=0o755, exist_ok=True)
            ok(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, BIND | REC, None),
               f"bind {path}")
            os.close(fd)


def main(argv) -> None:
    uid, command = int(argv[0]), argv[argv.index("--") + 1:]
    if uid in (0, 65534):
        raise SystemExit("UID must be an ordinary id, neither 0 nor 65534 (the overflow id)")
    if os.geteuid() != 0:
        raise SystemExit("only root can change to another user")
    libc = ctypes.CDLL(None, use_errno=True)
    real = os.path.realpath
    keep = {real(sys.base_prefix), real(sys.prefix), os.path.dirname(real(sys.executable)), ROOT}
    keep |= {real(p) for p in sys.path if p and os.path.isdir(p)}
    keep = sorted(k for k in keep if not any(k != o and k.startswith(o + "/") for o in keep))
    open_for_others(libc, keep)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    os.execvpe(command[0], command, {**os.environ, "HOME": "/nonexistent", "USER": f"u{uid}",
                                     "PYTHONDONTWRITEBYTECODE": "1"})


if __name__ == "__main__":
    main(sys.argv[1:])
