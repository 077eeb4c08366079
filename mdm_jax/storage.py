"""Where run files live: local paths or object storage (`gs://`), and the multi-host check that
every host sees the same workdir.

Checkpoints go through Orbax and TensorStore, which write GCS natively; everything else (metrics,
manifests, sweep collection) goes through `etils.epath`, whose paths work the same for local
files and `gs://` objects. Local paths are made absolute once, so a process that changes its
directory still writes to the same place.
"""

from __future__ import annotations

import functools
import os
import secrets

from etils import epath

from mdm_jax.errors import UserError


class StorageError(UserError, ValueError):
    """A workdir that cannot work for this run; the message names the fix."""


def is_remote(path: str | os.PathLike) -> bool:
    """Object storage (gs://, s3://, ...) rather than a path on this host."""
    return "://" in str(path)


def resolve(path: str | os.PathLike) -> str:
    """A remote URI as given; a local path made absolute."""
    return str(path) if is_remote(path) else os.path.abspath(os.fspath(path))


def as_path(path: str | os.PathLike) -> epath.Path:
    if is_remote(path):
        _configure_object_storage()
    return epath.Path(resolve(path))


@functools.cache
def _configure_object_storage() -> None:
    try:
        import fsspec
    except ImportError:
        raise StorageError("gs:// paths need the gcs extra: pip install -e '.[gcs]'") from None
    # gcsfs caches directory listings; checkpoints are written by TensorStore behind its back,
    # so a cached listing would hide new steps.
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def join(base: str | os.PathLike, *parts: str) -> str:
    return str(as_path(base).joinpath(*parts))


def check_shared_workdir(workdir: str) -> None:
    """With several processes, every one must see the same workdir: a relative path or a disk
    local to each host would split checkpoints and metrics across hosts.

    Process 0 writes a random token into the workdir; after a barrier every process reads it
    back, and all of them fail together if any could not.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    if not is_remote(workdir) and not os.path.isabs(workdir):
        raise StorageError(
            f"config.workdir={workdir!r} is relative, but this run has {jax.process_count()} "
            f"processes that may run on different hosts; use gs://BUCKET/PATH or an absolute "
            f"path on a filesystem every host mounts")
    probe = as_path(workdir) / ".mdm_jax_shared_check"
    token = int(multihost_utils.broadcast_one_to_all(
        np.int64(secrets.randbits(62) if jax.process_index() == 0 else 0)))
    if jax.process_index() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token))
    multihost_utils.sync_global_devices("mdm_jax.storage.write_probe")
    try:
        seen = probe.read_text().strip() == str(token)
    except OSError:
        seen = False
    everyone = multihost_utils.process_allgather(np.int32(seen))
    if not np.all(everyone):
        blind = [i for i, ok in enumerate(np.asarray(everyone).ravel()) if not ok]
        raise StorageError(
            f"config.workdir={workdir!r} is not shared: process(es) {blind} do not see what "
            f"process 0 wrote there (a disk local to each host?); use gs://BUCKET/PATH or a "
            f"filesystem every host mounts")
