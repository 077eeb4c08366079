"""Read a trained model's parameters out of an mdm_jax Orbax checkpoint, one leaf at a time.

Only `state.params` is read (never the optimizer state, which is twice as large), and only the
leaves the current output tensor needs: Orbax's partial restore loads just those arrays, from
however many shards the training mesh wrote, as host numpy arrays. Peak memory during an export
is therefore a few leaves, not a copy of the model.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mdm_jax import storage
from mdm_jax.export.tensor_io import ExportError


def resolve(path: str, step: int | None) -> tuple[str, int | None]:
    """Accept a run's workdir, its checkpoints/ folder or one step's folder (local or gs://)."""
    p = storage.as_path(path)
    if p.name.isdigit() and p.parent.name == "checkpoints":
        return str(p.parent.parent), int(p.name)
    if p.name == "checkpoints":
        return str(p.parent), step
    return str(p), step


class CheckpointParams:
    """The params of one step (the named one, or the newest that reads; chosen once) as host
    numpy arrays, a leaf at a time, each checked against its saved fingerprint."""

    def __init__(self, path: str, step: int | None = None):
        from mdm_jax.checkpoint import read_step

        self.workdir, step = resolve(path, step)
        self.reader = read_step(self.workdir, step, error=ExportError)[1]
        self.step, self.state_dir = self.reader.step, self.reader.state_dir
        self.config = ml_collections.ConfigDict(self.reader.config)
        self.scanned = "blocks" in self.reader.param_meta
        self._cache: dict[tuple, np.ndarray] = {}

    def leaf(self, leaf: str, layer: int | None) -> np.ndarray:
        """An mdm_jax leaf ("wq", "attn_norm/scale", "embedding") for one layer (or global)."""
        parts = tuple(leaf.split("/"))
        if layer is not None:
            parts = ("blocks", *parts) if self.scanned else (f"block_{layer}", *parts)
        if parts not in self._cache:
            self._cache[parts] = self.reader.leaf(parts)
        array = self._cache[parts]
        return array[layer] if layer is not None and self.scanned else array

    def keep_only(self, leaves: tuple[str, ...]) -> None:
        """Drop cached leaves the next tensors do not need (bounds memory to one entry)."""
        wanted = {tuple(x.split("/")) for x in leaves}
        for key in list(self._cache):
            if tuple(p for p in key if p != "blocks" and not p.startswith("block_")) not in \
                    wanted:
                del self._cache[key]
