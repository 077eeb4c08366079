"""XLA's persistent compilation cache for a run, so that a restarted run (preemption, requeue,
resume) loads its compiled step instead of compiling it again.

`config.compile_cache_dir` picks the folder: "" means `WORKDIR/xla_cache` (on gs:// as well,
through etils.epath), unless `JAX_COMPILATION_CACHE_DIR` is set, which then wins so that a site
can share one cache between runs; "none" turns the cache off. The cache is trusted code: keep it
somewhere only you can write.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from mdm_jax import storage

OFF = "none"
SUBDIR = "xla_cache"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = 0


def _count(event: str, **_) -> None:
    global _hits
    if event == _HIT_EVENT:
        _hits += 1


jax.monitoring.register_event_listener(_count)


def folder(compile_cache_dir: str, workdir: str) -> str | None:
    """The cache folder a run with these settings uses (None: no cache)."""
    if compile_cache_dir == OFF:
        return None
    if compile_cache_dir:
        return storage.resolve(compile_cache_dir)
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or f"{storage.resolve(workdir)}/{SUBDIR}"


def use(compile_cache_dir: str, workdir: str) -> str | None:
    """Point JAX's persistent cache at the run's folder before its first compile; returns it.

    Compiles of a second or more seconds are cached (JAX's default threshold): the train and
    eval steps of any real model, not the small helpers."""
    path = folder(compile_cache_dir, workdir)
    current = jax.config.jax_compilation_cache_dir
    if path == current:
        return path
    if path is not None and storage.is_remote(path):
        storage.as_path(path)  # object-storage settings (credentials, emulator) for epath
    # The cache object is built once per process, at the first compile: a new folder (a
    # second run in one process, a notebook) needs it rebuilt.
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def hits() -> int:
    """Executables loaded from the cache so far in this process."""
    return _hits
