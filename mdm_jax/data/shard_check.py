"""Shards are what `prepare` wrote: each file's sha256 against the manifest's, before training.

A shard copied over another with the same block count (or a validation shard dropped into the
training directory) reads without any error and silently trains on the wrong data; the
checksums `prepare` records catch it. Hashing reads every byte once, so a verified shard is
remembered by (path, size, mtime) in `~/.cache/mdm_jax/verified_shards.json`
(`MDM_JAX_CACHE_DIR` moves it): a restart does not read the corpus again. Object storage is not
hashed (that would download the corpus on every host); `data.verify_shards=False` skips the
check for very large local corpora.
"""

from __future__ import annotations

import json
import os

from mdm_jax import storage
from mdm_jax.data.tokenizer import file_sha256
from mdm_jax.errors import UserError


class ShardMismatch(UserError):
    """A shard differs from the one its manifest describes."""


def cache_path() -> str:
    root = os.environ.get("MDM_JAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mdm_jax")
    return os.path.join(root, "verified_shards.json")


def verify_shards(data_dir: str, manifest: dict) -> int:
    """Check every shard listed with a sha256; returns how many were hashed (not cached)."""
    if storage.is_remote(data_dir):
        return 0
    path = cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    hashed = 0
    for shard in manifest.get("shards", []):
        if "sha256" not in shard:
            continue  # prepared before checksums were recorded
        file = os.path.abspath(os.path.join(data_dir, shard["file"]))
        st = os.stat(file)
        key = [st.st_size, st.st_mtime_ns, shard["sha256"]]
        if cache.get(file) == key:
            continue
        hashed += 1
        if file_sha256(file) != shard["sha256"]:
            raise ShardMismatch(
                f"{file} is not the shard its manifest describes (sha256 differs): it was "
                f"replaced or damaged since `prepare` wrote it; re-run mdm_jax.data.prepare "
                f"for {data_dir} (or set --config.data.verify_shards=False to train anyway)")
        cache[file] = key
    if hashed:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, path)
        except OSError:
            pass  # no cache: the next start hashes again
    return hashed
