"""The run directory: where it may be, and one process at a time in it.

``out_problem(value)`` says why a ``--out`` value is refused (an empty or blank path would write into the
current directory). :class:`RunLock` takes an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` for the life of
a run. The lock file holds the holder's pid, host, start time and command line (JSON). The kernel drops a
flock when its holder dies (also on kill -9), so a lock file that still names a holder when the lock is
free was left by a dead process: it is taken over with a note. The file is never deleted (deleting it would
let two processes lock two different files); a clean exit empties it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def out_problem(value: str | None) -> str | None:
    """Why ``--out value`` is refused, or None (None: not given)."""
    if value is not None and not value.strip():
        return "--out: empty path (it would write into the current directory); name the run directory"
    return None


def _describe(raw: str) -> str:
    try:
        h = json.loads(raw)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["started"])))
        return f"pid {int(h['pid'])} on {h['host']} (since {when}: {h.get('command', '?')})"
    except (ValueError, KeyError, TypeError, OverflowError):
        return f"an unknown process (lock file says {raw.strip()[:80]!r})" if raw.strip() else "another process"


class RunLock:
    """Exclusive lock on a run directory; ``acquire()`` creates the directory. Use as a context manager or
    call ``release()``; it is released by the kernel when the process ends in any way."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.fd = Path(run_dir), Path(run_dir) / LOCK_NAME, None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead process's lock was taken over. Raises
        :class:`RunDirInUse` when a live process holds it, OSError when the directory cannot be used."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirInUse(f"{self.run_dir} is in use by {_describe(raw)}; wait for it to finish or pass "
                                  f"another --out") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                sys.stderr.write(f"warning: {self.run_dir}: this file system has no locks; nothing stops a second "
                                 f"run in this directory\n")
                return None
            raise
        old = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "command": " ".join(sys.argv)[:300]})
        os.ftruncate(fd, 0)
        os.pwrite(fd, mine.encode() + b"\n", 0)
        os.fsync(fd)
        self.fd = fd
        if old.strip():
            return f"{self.run_dir}: took over the lock of {_describe(old)}, which ended without releasing it"
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
