"""Fingerprints of arrays, so a checkpoint whose bytes changed on disk is caught on restore.

Each array's fingerprint is `sum_i bits(x_i) * (2 i + 1) mod 2**32` over its flat elements,
`bits` the raw bit pattern as an unsigned integer: any change to any element (a flipped bit, a
zeroed block, two swapped values) changes it with near certainty, and modular addition is
exact in any order, so a sharded array gives the same number on any mesh. The jax version runs
on device inside one jit (one pass over the state); the numpy version reads exported leaves.
Paths are "params/blocks/wq"-style names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: (jnp.uint8, np.uint8), 2: (jnp.uint16, np.uint16), 4: (jnp.uint32, np.uint32)}


def path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _fingerprint(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize][0]).astype(jnp.uint32)
    flat = bits.reshape(-1)
    weights = jnp.arange(flat.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(flat * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
    return jax.tree_util.tree_map(_fingerprint, tree)


def fingerprints(tree) -> dict[str, int]:
    """{path: fingerprint} of every array in a pytree of jax arrays (one device round trip)."""
    values = jax.device_get(_fingerprints(tree))
    return {path_name(path): int(v)
            for path, v in jax.tree_util.tree_flatten_with_path(values)[0]}


def fingerprint_numpy(x: np.ndarray) -> int:
    """The same number as the jax version, for an array on the host."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    bits = x.view(_UNSIGNED[x.dtype.itemsize][1]).astype(np.uint32).reshape(-1)
    weights = np.arange(bits.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return int((bits * weights).sum(dtype=np.uint32))
