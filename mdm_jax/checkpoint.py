"""Orbax checkpoints of the train state together with the data iterator and the config.

A checkpoint holds three items: `state` (params, optimizer state, step, PRNG key; sharded arrays
restored onto whatever shardings the caller asks for), `data` (each process's Grain iterator
state, so a resumed run reads exactly the next batch) and `config` (the resolved config as JSON).
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


class Checkpointer:
    def __init__(self, workdir: str, every: int = 0, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            create=True,
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, config_json: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config_json),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restore `state` onto the shardings in `abstract_state` and rewind `data_iterator`."""
        restore_args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            restore_args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**restore_args))
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a (new) mesh."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
