"""One trainer per workdir: an exclusive lock on `{workdir}/.lock`, held while the run lives.

The lock is `flock(2)` on an open file, so the kernel releases it when the holder exits in any
way (SIGKILL, a crash, a preempted VM): a lock can never go stale. The file records who holds
it, for the message a second trainer gets. Only process 0 of a multi-host run takes it. Object
storage (gs://) has no locks: there the workdir is not locked (BUILD_NOTES).
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
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
