"""Orbax checkpoints of the train state together with the data iterator, config and metadata.

A checkpoint holds four items: `state` (params, optimizer state, step, PRNG key, fault counters;
sharded arrays restored onto whatever shardings the caller asks for, so a run saved on 8 devices
resumes on 2 or 1), `data` (each process's Grain iterator state, so a resumed run reads exactly
the next batch), `config` (the resolved config) and `meta` (preset, mesh, package versions).

Orbax writes each step under a temporary name and renames it when complete, so a process killed
mid-save leaves no checkpoint that looks complete. A complete but damaged checkpoint (a truncated
or deleted file, or an array whose fingerprint changed) fails to read. Resume, inference and
export choose their step with `_first_that_reads`: past a damaged step to the previous one, with
a warning, or, for a step named explicitly, an error naming the others. `read_step` and
`StepReader` read a step's config, meta and params (or some leaves) from read-only storage.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import sys
import time
from importlib import metadata

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from mdm_jax import checksum, storage
from mdm_jax.errors import UserError, debug

log = logging.getLogger("mdm_jax")

ITEMS = ("state", "data", "config", "meta")
DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/: damaged steps moved out of the way


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that cannot be used; the message says what to do."""


def _check_writable(directory: str) -> None:
    try:
        path = storage.as_path(directory)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoints to {directory} ({e.strerror or e}); choose a writable "
            f"--config.workdir, or free space / fix permissions there") from None


def _reason(error: BaseException) -> str:
    """A short cause for a failed write: Orbax/TensorStore wrap ENOSPC in long messages."""
    text = str(error)
    if (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text
            or "os_error_code='28'" in text):
        return "no space left on device"
    return text if len(text) <= 300 else text[:300] + "..."


def _space_note(directory: str, state_bytes: int) -> str:
    """'; N MiB free there now, a checkpoint needs about M MiB' where the filesystem can say."""
    if storage.is_remote(directory):
        return ""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    return (f"; {free / 2**20:.1f} MiB free there now, a checkpoint needs about "
            f"{state_bytes / 2**20:.1f} MiB")


class _OrbaxErrorsToDebug(logging.Filter):
    """Orbax logs a failed background save from each of its threads (tracebacks included)
    before the error reaches the trainer, which then reports it once as an `error:` line; its
    error records are kept at DEBUG level unless MDM_JAX_DEBUG is set. So is its warning that
    an item has no `_CHECKPOINT_METADATA` when its layout is read: the manager writes that file
    per step, not per item, so it is said of every healthy checkpoint; and its warning that a
    damaged step's layout does not read, which our own one line reports with the step."""

    def filter(self, record: logging.LogRecord) -> bool:
        noise = (record.levelno >= logging.ERROR
                 or record.getMessage().startswith(("Metadata file does not exist",
                                                    "Failed to get item metadata")))
        if noise and f"{os.sep}orbax{os.sep}" in record.pathname and not debug():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("absl").isEnabledFor(logging.DEBUG)
        return True


class _UnretrievedTensorStoreErrorsToDebug(logging.Filter):
    """asyncio reports, whenever the garbage collector gets to them, the TensorStore futures of
    a failed call that nobody awaited once the first failure was raised ("Task exception was
    never retrieved"): the writes of a failed save (os_error_code=28), and the array reads of
    a damaged step (one undecompressable index node fails the opening of every array: dozens of
    tracebacks around the one "damaged and was skipped" line). The failure was reported once
    already; these are kept at DEBUG unless MDM_JAX_DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if debug() or "never retrieved" not in record.getMessage():
            return True
        exc = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()} {exc!r}"
        # (_wrap_awaitable: the task asyncio makes around a TensorStore future)
        return not ("_wrap_awaitable" in text or "os_error_code" in text
                    or "RESOURCE_EXHAUSTED" in text or "No space left" in text)


def _host_array_handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The items of a step whose state is host numpy arrays left alone while saved. Orbax's
    default copies every host array before writing it (in case the caller changes it) and
    compresses each with zstd, which together took 1.85x the arrays' bytes on top of them; here
    the arrays are written from where they are, uncompressed (float weights barely compress),
    for about 0.02x. The layout on disk is the trainer's (OCDBT, zarr): every reader reads it."""
    arrays = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler(
        use_compression=False, type_handler_registry=arrays))
    for item in ("config", "meta"):
        registry.add(item, ocp.args.JsonSave)
    return registry


@functools.cache
def _quiet_orbax_errors() -> None:
    logging.getLogger("absl").addFilter(_OrbaxErrorsToDebug())
    logging.getLogger("asyncio").addFilter(_UnretrievedTensorStoreErrorsToDebug())
    # After a failed save, TensorStore's pending writes complete onto Orbax's closed event loop
    # and each reports "Event loop is closed" as an unraisable error: noise, not news. Likewise
    # the other array reads of a damaged step, abandoned once the first one failed, report
    # their own failure whenever the garbage collector closes their coroutines.
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        text = f"{unraisable.exc_value!r} {unraisable.object!r}"
        closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                       and unraisable.object is None
                       and str(unraisable.exc_value) == "Event loop is closed")
        failed_write = "os_error_code" in text or "No space left" in text  # reported already
        abandoned_read = "_read_array_index_and_device_put" in repr(unraisable.object)
        if (closed_loop or failed_write or abandoned_read) and not debug():
            return
        previous(unraisable)

    sys.unraisablehook = hook


@functools.cache
def package_versions() -> dict:
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class Checkpointer:
    """Saves every `every` steps and/or every `every_minutes`; keeps the last `keep` plus every
    `keep_period`-th step permanently."""

    def __init__(self, workdir: str, every: int = 0, keep: int = 3, keep_period: int = 0,
                 every_minutes: float = 0.0, read_only: bool = False,
                 host_arrays: bool = False):
        """`host_arrays`: every state saved is a tree of numpy arrays that nothing changes until
        the save has finished (an import's weights): written as they are (see
        `_host_array_handlers`)."""
        self.directory = storage.join(workdir, "checkpoints")  # local or gs://
        if jax.process_index() == 0 and not read_only:  # inference may read a read-only copy
            with storage.waiting(self.directory, "opening the checkpoints"):
                _check_writable(self.directory)
        self.every = every
        self.every_minutes = every_minutes
        self._last_save_time = time.monotonic()
        options = ocp.CheckpointManagerOptions(
            # read_only: no directory made, nothing pruned (Orbax's own read_only option logs
            # a warning per manager)
            max_to_keep=None if read_only else (keep or None),
            keep_period=keep_period or None,
            create=not read_only,
            enable_async_checkpointing=True,
            enable_background_delete=True,  # pruning old steps must not stall the loop
        )
        self.host_arrays = host_arrays
        layout = (dict(handler_registry=_host_array_handlers()) if host_arrays
                  else dict(item_names=ITEMS))
        with storage.waiting(self.directory, "listing the checkpoints"):
            self.manager = ocp.CheckpointManager(self.directory, options=options, **layout)
        self._writing: int | None = None  # the step of the save running in the background
        self._failure_reported = False
        self._state_bytes = 0  # of the last state saved, to say how much space a save needs
        _quiet_orbax_errors()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether the step/time policy asks for a save at `step`."""
        by_step = self.every > 0 and step % self.every == 0
        by_time = (self.every_minutes > 0
                   and time.monotonic() - self._last_save_time >= 60 * self.every_minutes)
        return by_step or by_time

    def save(self, step: int, state, data_iterator, config_json: dict, meta: dict | None = None,
             force: bool = False) -> bool:
        """Start an asynchronous save if due (or forced); returns whether one was started."""
        if not (force or self.due(step)) or step in self.manager.all_steps():
            return False
        # Each array's fingerprint, checked on every restore: bytes that changed on disk
        # are caught instead of trained on (or exported).
        sums = checksum.fingerprints(state)
        self._state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
        items = dict(
            state=(ocp.args.PyTreeSave(state) if self.host_arrays
                   else ocp.args.StandardSave(state)),
            config=ocp.args.JsonSave(config_json),
            meta=ocp.args.JsonSave(dict(meta or {}, step=step, saved_at=time.time(),
                                        versions=dict(package_versions()), checksums=sums)),
        )
        if data_iterator is not None:  # None: no data position to keep (e.g. an import)
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        args = ocp.args.Composite(**items)
        self.raise_if_failed(wait=True)  # Orbax would wait for it anyway, before starting
        try:
            # The fingerprints also go into the step's own metadata (_CHECKPOINT_METADATA):
            # a step that lost its `meta` folder is still checked, never trusted blindly.
            with storage.waiting(self.directory, f"saving step {step}"):
                saved = self.manager.save(step, args=args, force=True,
                                          custom_metadata={"checksums": sums})
        except Exception as e:  # noqa: BLE001  (TensorStore raises ValueError for OS errors)
            raise self._failed(step, e) from e
        if saved:
            self._writing = step
        self._last_save_time = time.monotonic()
        return saved

    def raise_if_failed(self, wait: bool = False) -> None:
        """Raise a CheckpointError naming the step if the background save failed (waiting for
        it to finish first if `wait`); called after every train step so that a run stops at
        its first failed save rather than training on with nothing saved."""
        if self._writing is None:
            return
        step = self._writing
        try:
            if wait:
                with storage.waiting(self.directory, f"saving step {step}"):
                    self.manager.wait_until_finished()
            else:
                self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._failed(step, e) from e
        if wait:
            self._writing = None

    def _failed(self, step: int, error: BaseException) -> CheckpointError:
        """Remove the partial save of `step` and describe the failure in one line."""
        self._writing, self._failure_reported = None, True
        others = [s for s in self.all_steps() if s != step]
        if jax.process_index() == 0:
            root = storage.as_path(self.directory)
            for partial in root.glob(f"{step}.orbax-checkpoint-tmp*"):
                if partial.is_dir():
                    partial.rmtree()
                else:
                    partial.unlink()
        note = _space_note(self.directory, self._state_bytes)
        kept = (f"the partial save was removed; checkpoints {others} are intact" if others
                else "the partial save was removed; no earlier checkpoint exists")
        return CheckpointError(
            f"saving step {step} to {self.directory} failed ({_reason(error)}{note}); {kept}. "
            f"Free space or fix the directory, then rerun the same command to resume.")

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restore `state` onto the shardings in `abstract_state`; rewind `data_iterator`."""
        restore_args = {"state": ocp.args.StandardRestore(abstract_state)}
        meta = self._meta(step)
        saved_processes = meta.get("process_count", 1) if meta else jax.process_count()
        if data_iterator is not None and saved_processes != jax.process_count():
            log.warning("checkpoint %s/%d was written by a different number of processes; "
                        "the model and optimizer resume but the data order restarts",
                        self.directory, step)
            data_iterator = None
        if data_iterator is not None and not (
                storage.as_path(self.directory) / str(step) / "data").is_dir():
            log.warning("checkpoint %s/%d holds no data iterator state (an imported model); "
                        "the data order starts from the beginning", self.directory, step)
            data_iterator = None
        if data_iterator is not None:
            restore_args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        saved = self.fingerprints(step, meta)  # before reading any array
        with storage.waiting(self.directory, f"reading step {step}"):
            restored = self.manager.restore(step, args=ocp.args.Composite(**restore_args))
        check_fingerprints(self.directory, step, restored["state"], saved)
        return restored["state"]

    def _meta(self, step: int) -> dict:
        try:
            return self.read_json(step, "meta")
        except Exception:  # no readable metadata: no layout to check (the fingerprints are
            return {}      # also in the step's own metadata: `fingerprints`)

    def fingerprints(self, step: int, meta: dict | None = None) -> dict | None:
        """The fingerprints saved with `step`: from its `meta` item, else from the step's own
        metadata. None only for a step saved before mdm_jax recorded them (its meta reads and
        has none), with a loud warning; a step whose fingerprints are missing otherwise (its
        meta lost, and none in the step's metadata) is damaged: CheckpointError."""
        meta = self._meta(step) if meta is None else meta
        if meta.get("checksums"):
            return meta["checksums"]
        try:
            custom = self.manager.metadata(step).custom_metadata or {}
        except Exception:  # noqa: BLE001  (unreadable step metadata: as if it had none)
            custom = {}
        if custom.get("checksums"):
            return custom["checksums"]
        if meta and "checksums" not in meta:  # a meta item from before fingerprints
            log.warning("checkpoint %s/%d was saved before mdm_jax recorded fingerprints: its "
                        "arrays cannot be checked for corruption; saving it again (resume and "
                        "train a step, or export and import it) records them",
                        self.directory, step)
            return None
        raise CheckpointError(
            f"checkpoint {step} under {self.directory} has no fingerprints to check its arrays "
            f"against (its meta item is unreadable or missing, and its step metadata holds "
            f"none): its files are incomplete")

    def restore_latest(self, abstract_state, data_iterator=None):
        """(state, step) from the newest checkpoint that restores, or (None, None) if none.
        Damaged ones are reported and, if an older one restored, set aside."""
        found = _first_that_reads(self.directory, self.all_steps(), lambda s: self.restore(
            s, abstract_state, data_iterator))
        if found[1] is not None and (damaged := [s for s in self.all_steps() if s > found[1]]):
            self.set_aside(damaged)  # (each was warned about)
        return found

    def set_aside(self, steps: list[int]) -> None:
        """Move damaged steps out of the way (never delete them: they may still hold
        something a person wants), so that training writes those steps again."""
        aside = storage.as_path(self.directory).parent / DAMAGED_DIR
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            # Object storage has no empty folders, and a rename needs its target's folder
            # (etils): an object in it makes it exist.
            if storage.is_remote(self.directory):
                storage.write_text(aside / "README.txt",
                                   "damaged checkpoints that mdm_jax moved out of the way\n")
            for step in steps:
                target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                (storage.as_path(self.directory) / str(step)).rename(target)
                log.warning("moved damaged checkpoint %s/%d to %s", self.directory, step,
                            target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mdm_jax.checkpoint.set_aside")
        self.manager.reload()

    def read_json(self, step: int, item: str) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.JsonRestore()}))[item]

    def restore_config(self, step: int) -> dict:
        return self.read_json(step, "config")

    def wait(self) -> None:
        self.raise_if_failed(wait=True)
        if not self._failure_reported:  # Orbax would raise the reported failure again
            with storage.waiting(self.directory, "finishing the last save"):
                self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the last save and release Orbax's threads; a failure already reported
        (its step's partial save removed) is not raised a second time."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001  (the failed save it re-raises was reported)
                log.debug("orbax close after a failed save", exc_info=True)


def _damage(directory: str, step: int, error: BaseException, steps=None) -> str:
    """The one description of a damaged step: the warning before the previous step is tried
    (`steps` None), or the refusal naming the other `steps`."""
    detail = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    if steps is None:
        return (f"checkpoint {step} under {directory} is damaged and was skipped ({detail}); "
                f"trying the previous one")
    others = [s for s in steps if s != step]
    return f"checkpoint {step} under {directory} is damaged ({detail}); " + (
        f"the other checkpoints are {', '.join(map(str, others))}: pass --step {others[-1]}"
        if others else "there is no other checkpoint: restore its files or train again")


def check_fingerprints(directory: str, step: int, tree, saved: dict | None) -> None:
    """Raise if an array of `tree` (a state, or part of one with paths from the state's root)
    differs from the fingerprint `saved` with it, or has none there (None: saved before
    fingerprints were; `Checkpointer.fingerprints` tells that case from a lost record)."""
    got = checksum.fingerprints(tree) if saved is not None else {}
    bad = sorted(k for k, v in got.items() if saved.get(k, v) != v)
    if bad:
        raise CheckpointError(
            f"checkpoint {step} under {directory} holds {len(bad)} array(s) whose contents "
            f"changed since they were saved (e.g. {', '.join(bad[:3])}): the files are corrupt")


def _first_that_reads(directory: str, steps: list[int], read, step: int | None = None,
                      error=CheckpointError):
    """(read(s), s) for the named `step` (damaged: `error` naming the others), or for the newest
    of `steps` that reads, warning about each one that does not; (None, None) if none does.
    User mistakes other than a changed checkpoint pass through."""
    if step is not None and step not in steps:
        raise error(f"no checkpoint for step {step} under {directory}; available: "
                    f"{', '.join(map(str, steps))}: pass one of them as --step")
    for s in [step] if step is not None else reversed(steps):
        try:
            return read(s), s
        except Exception as e:  # noqa: BLE001  (any failure to read means the step is unusable)
            if isinstance(e, UserError) and not isinstance(e, CheckpointError):
                raise
            if step is not None:
                raise error(_damage(directory, s, e, steps)) from e
            log.warning("%s", _damage(directory, s, e))
    return None, None


class StepReader:
    """One step of a run, read without a Trainer: its `config`, `meta` and any part of its
    params, each array checked against the fingerprint saved with it."""

    def __init__(self, ckpt: Checkpointer, step: int, steps: list[int], error=CheckpointError):
        self.directory, self.step, self.steps, self.error = ckpt.directory, step, steps, error
        self.config, self.meta = ckpt.restore_config(step), ckpt._meta(step)
        self.checksums = ckpt.fingerprints(step, self.meta)
        self.state_dir = storage.join(ckpt.directory, str(step), "state")
        # The params' layout: every path refuses a step whose layout does not read.
        tree = ocp.PyTreeCheckpointer().metadata(self.state_dir).item_metadata
        if tree is None:
            raise ValueError(f"the layout of the arrays in {self.state_dir} does not read")
        self.param_meta = getattr(tree, "tree", tree)["params"]

    def params(self, abstract=None, path: tuple = ()):
        """The params (or their subtree at `path`) onto the shardings of `abstract`, or, without
        one, as host numpy arrays (Orbax's partial restore reads only those arrays)."""
        if abstract is None:
            node = self.param_meta
            for part in path:
                node = node[part]
            abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(
                tuple(m.shape), np.float32), node, is_leaf=lambda x: hasattr(x, "shape"))
        item = abstract
        for part in reversed(("params", *path)):
            item = {part: item}
        args = jax.tree_util.tree_map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray)
                                      if a.sharding is None else ocp.ArrayRestoreArgs(
            sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), item)
        out = ocp.PyTreeCheckpointer().restore(self.state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
        check_fingerprints(self.directory, self.step, out, self.checksums)
        for part in ("params", *path):
            out = out[part]
        return out

    def leaf(self, path: tuple) -> np.ndarray:
        """`params(path=path)` once this step was chosen: a failure is the refusal of the step
        naming the others (leaves read earlier came from it, so there is no falling back)."""
        try:
            return self.params(path=path)
        except Exception as e:
            raise self.error(_damage(self.directory, self.step, e, self.steps)) from e


def _saved_state_tree(directory: str, step: int) -> dict:
    """The state item's tree of array metadata at `step` (no array is read)."""
    tree = ocp.PyTreeCheckpointer().metadata(storage.join(directory, str(step), "state"))
    return getattr(tree.item_metadata, "tree", tree.item_metadata)


def saved_param_shapes(directory: str, step: int) -> dict[str, tuple]:
    """{"blocks/wq": shape, ...} of the params saved at `step`."""
    tree = _saved_state_tree(directory, step)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {checksum.path_name(path): tuple(leaf.shape) for path, leaf in flat}


def weights_only(directory: str, step: int) -> bool:
    """Whether `step` holds the weights alone (an import: no optimizer state, no counters)."""
    return "opt_state" not in _saved_state_tree(directory, step)


def read_step(workdir: str, step: int | None = None, read=None, error=CheckpointError):
    """(read(reader), reader) for the `StepReader` of the named `step`, or of the newest step
    for which `read` succeeds (None: the step's config, meta and params layout read). Opens
    the checkpoints read-only; every failure is an `error` naming the directory and the fix."""
    directory = storage.join(workdir, "checkpoints")
    # (the readers' commands name their own flag for the path: only the path is named here)
    missing = (f"no checkpoint under {directory}: {workdir} is not an mdm_jax run with a "
               f"finished checkpoint; give the workdir of a training run")
    if not storage.as_path(directory).is_dir():  # (checked first: nothing is created)
        raise error(missing)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        if not (steps := ckpt.all_steps()):
            raise error(missing)

        def attempt(s):
            reader = StepReader(ckpt, s, steps, error)
            return (read(reader) if read else None), reader

        found, _ = _first_that_reads(directory, steps, attempt, step, error)
    finally:
        ckpt.close()
    if found is None:
        raise error(f"every checkpoint under {directory} is damaged (see the warnings above); "
                    f"restore their files, or train the model again")
    return found


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a (new) mesh."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
