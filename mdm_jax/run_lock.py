"""One trainer per workdir: an exclusive lock on `{workdir}/.lock`, held while the run lives.

The lock is `flock(2)` on an open file, so the kernel releases it when the holder exits in any
way (SIGKILL, a crash, a preempted VM): a lock can never go stale. The file records who holds
it, for the message a second trainer gets and for `holder`, which tells a sweep that a run is
being trained by another process. Only process 0 of a multi-host run takes it. Object storage
(gs://) has no locks: there the workdir is not locked (BUILD_NOTES).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from mdm_jax import storage
from mdm_jax.errors import UserError


class WorkdirBusy(UserError):
    """Another trainer holds this workdir."""


def _lock(f) -> None:
    """An exclusive flock without blocking, after a few quick retries: `holder` takes a shared
    lock for an instant to look, and a trainer starting in that instant must not be refused."""
    for _ in range(20):
        try:
            return fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.01)
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def holder(workdir: str) -> str | None:
    """Who trains in `workdir` ('pid 123 on HOST since TIME'), or None if no live process
    holds its lock (the file outlives its holder; the kernel's lock does not)."""
    if storage.is_remote(workdir):
        return None
    try:
        f = open(os.path.join(storage.resolve(workdir), ".lock"))
    except FileNotFoundError:
        return None
    with f:
        try:  # shared: two lookers never refuse each other
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # closing the file lets go at once
        except BlockingIOError:
            pass
        try:
            who = json.loads(f.read())
            return f"pid {who['pid']} on {who['host']} since {who['since']}"
        except (ValueError, KeyError, TypeError):  # caught between truncate and write
            return "a process that is starting"


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = None if storage.is_remote(workdir) else os.path.join(
            storage.resolve(workdir), ".lock")
        self._file = None

    def acquire(self) -> None:
        if self.path is None:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise storage.StorageError(
                f"cannot write to the workdir {os.path.dirname(self.path)} ({e.strerror or e}); "
                f"choose a writable --config.workdir") from None
        try:
            _lock(f)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise WorkdirBusy(
                f"another trainer is using {os.path.dirname(self.path)} ({holder}); wait for "
                f"it to finish or stop it, or choose another --config.workdir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
