"""Read a trained model's parameters out of an mdm_jax Orbax checkpoint, one leaf at a time.

Only `state.params` is read (never the optimizer state, which is twice as large), and only the
leaves the current output tensor needs: Orbax's partial restore loads just those arrays, from
however many shards the training mesh wrote, as host numpy arrays. Peak memory during an export
is therefore a few leaves, not a copy of the model.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mdm_jax import checksum, storage
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
    def __init__(self, path: str, step: int | None = None):
        import orbax.checkpoint as ocp

        from mdm_jax.checkpoint import Checkpointer

        workdir, step = resolve(path, step)
        if not (storage.as_path(workdir) / "checkpoints").is_dir():
            raise ExportError(f"{path} is not an mdm_jax run: no checkpoints/ folder in "
                              f"{workdir}; pass the --config.workdir of a training run")
        ckpt = Checkpointer(workdir)
        steps = ckpt.all_steps()
        if not steps:
            raise ExportError(f"{workdir}/checkpoints holds no finished checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ExportError(f"no checkpoint for step {step} in {workdir}/checkpoints; "
                              f"available: {', '.join(map(str, steps))}")
        self.step, self.steps = step, steps
        self.config = ml_collections.ConfigDict(ckpt.restore_config(step))
        try:
            self.meta = ckpt.read_json(step, "meta")
        except Exception:  # older checkpoints may lack it; nothing below depends on it
            self.meta = {}
        self.state_dir = storage.join(ckpt.directory, str(step), "state")
        ckpt.close()
        self._ckptr = ocp.PyTreeCheckpointer()
        try:
            tree = self._ckptr.metadata(self.state_dir).item_metadata
            tree = getattr(tree, "tree", tree)
            self.param_meta = tree["params"]
        except Exception as e:
            raise self._damaged("its metadata", e) from e
        self.scanned = "blocks" in self.param_meta
        self._cache: dict[tuple, np.ndarray] = {}
        self.param_bytes = sum(int(np.prod(m.shape)) * 4 for m in _leaves(self.param_meta))

    def _restore(self, path: tuple) -> np.ndarray:
        import jax
        import orbax.checkpoint as ocp

        node = self.param_meta
        for part in path:
            node = node[part]
        item = abstract = jax.ShapeDtypeStruct(tuple(node.shape), np.float32)
        for part in reversed(("params", *path)):
            item = {part: item}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                              item)
        try:
            out = self._ckptr.restore(self.state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # a file of this step cannot be read: say which, and the rest
            raise self._damaged(f"params/{'/'.join(path)}", e) from e
        for part in ("params", *path):
            out = out[part]
        assert out.shape == abstract.shape
        saved = self.meta.get("checksums", {}).get("/".join(("params", *path)))
        if saved is not None and checksum.fingerprint_numpy(out) != saved:
            raise self._damaged(f"params/{'/'.join(path)}", ValueError(
                "its contents differ from the fingerprint saved with it"))
        return out

    def _damaged(self, what: str, e: BaseException) -> ExportError:
        others = [s for s in self.steps if s != self.step]
        detail = str(e).splitlines()[0][:200] if str(e) else "no detail"
        return ExportError(
            f"checkpoint {self.step} in {self.state_dir} is damaged: reading {what} failed "
            f"({type(e).__name__}: {detail}); "
            + (f"the other checkpoints are {', '.join(map(str, others))}: pass --step "
               f"{others[-1]}" if others else "there is no other checkpoint"))

    def leaf(self, leaf: str, layer: int | None) -> np.ndarray:
        """An mdm_jax leaf ("wq", "attn_norm/scale", "embedding") for one layer (or global)."""
        parts = tuple(leaf.split("/"))
        if layer is not None:
            parts = ("blocks", *parts) if self.scanned else (f"block_{layer}", *parts)
        if parts not in self._cache:
            self._cache[parts] = self._restore(parts)
        array = self._cache[parts]
        return array[layer] if layer is not None and self.scanned else array

    def keep_only(self, leaves: tuple[str, ...]) -> None:
        """Drop cached leaves the next tensors do not need (bounds memory to one entry)."""
        wanted = {tuple(x.split("/")) for x in leaves}
        for key in list(self._cache):
            if tuple(p for p in key if p != "blocks" and not p.startswith("block_")) not in \
                    wanted:
                del self._cache[key]

def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree
