"""Grain loading of prepared blocks: global shuffle, this process's slice, batches.

Pipeline (all index arithmetic, so the iterator state is one integer and resumes exactly):
``PackedBlocks -> shuffle(seed; reseeded per epoch) -> equal per-process slice -> batch ->
repeat``. Every process computes the same permutation and takes a disjoint strided slice, so
within an epoch the processes together see each block once (up to ``n % process_count`` blocks
per epoch that no process sees, keeping step counts equal across hosts).
"""

from __future__ import annotations

import bisect
import json
import warnings
from pathlib import Path

import grain
import numpy as np
from absl import flags

from mdm_jax.data.prepare import MANIFEST


def manifest(data_dir: str | Path) -> dict:
    """The manifest written by ``prepare``; a clear error when ``data_dir`` is not prepared."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{data_dir} is not a prepared data directory (no {MANIFEST}); create it with "
            f"`python -m mdm_jax.data.prepare --input RAW --output {data_dir} --tokenizer "
            f"TOKENIZER.model`"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run mdm_jax.data.prepare") from e


class PackedBlocks:
    """Random-access source of token blocks: item i is np.int32 of shape [seq_len + 1]."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        m = manifest(self.data_dir)
        self.seq_len = int(m["seq_len"])
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self._files = [str(self.data_dir / s["file"]) for s in m["shards"]]
        missing = [f for f in self._files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) listed in {self.data_dir / MANIFEST} are "
                                    f"missing: {missing[:3]}; re-run mdm_jax.data.prepare")
        self._ends = np.cumsum([s["blocks"] for s in m["shards"]]).tolist()
        self._source = grain.sources.ArrayRecordDataSource(self._files) if self._files else []
        if len(self._source) != m["blocks"]:
            raise ValueError(f"{self.data_dir}: shards hold {len(self._source)} blocks but the "
                             f"manifest says {m['blocks']}; re-run mdm_jax.data.prepare")
        self._nbytes = (self.seq_len + 1) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self._source)

    def _decode(self, index: int, raw: bytes) -> np.ndarray:
        if len(raw) != self._nbytes:
            shard = self._files[bisect.bisect_right(self._ends, index)]
            raise ValueError(f"{shard}: block {index} has {len(raw)} bytes, expected "
                             f"{self._nbytes} (seq_len {self.seq_len} + 1 of {self.dtype}); "
                             f"the shard does not match its manifest")
        return np.frombuffer(raw, dtype=self.dtype).astype(np.int32)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._decode(index, self._source[index])

    def __getitems__(self, indices):
        raws = self._source.__getitems__(list(indices))
        return [self._decode(i, r) for i, r in zip(indices, raws, strict=True)]

    def __repr__(self) -> str:
        return f"PackedBlocks({str(self.data_dir)!r}, blocks={len(self)}, seq_len={self.seq_len})"


def _process_slice(
    ds: grain.MapDataset, process_index: int, process_count: int, batch_size: int
) -> grain.MapDataset:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per_process = len(ds) // process_count
    if per_process < batch_size:
        raise ValueError(f"{len(ds)} blocks cannot fill one batch of {batch_size} on each of "
                         f"{process_count} process(es); prepare more data or use smaller batches")
    return ds[: per_process * process_count][process_index::process_count]


def make_train_iterator(
    data_dir: str | Path,
    *,
    batch_size_per_process: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
    prefetch: int = 16,
    read_threads: int = 4,
) -> grain.DatasetIterator:
    """Iterator of np.int32 [batch_size_per_process, seq_len + 1] training batches.

    ``num_epochs=None`` repeats forever. Save/restore the position with the iterator's
    ``get_state()`` / ``set_state()`` (checkpointed alongside the train state).
    ``worker_count > 0`` moves reading into that many Grain worker processes.
    """
    ds = grain.MapDataset.source(PackedBlocks(data_dir)).shuffle(seed=seed)
    ds = _process_slice(ds, process_index, process_count, batch_size_per_process)
    ds = ds.batch(batch_size_per_process, drop_remainder=True).repeat(num_epochs)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    )
    if worker_count > 0:
        # Grain's multiprocessing reads absl flags; callers outside an absl app never parse them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def make_eval_batches(
    data_dir: str | Path,
    *,
    batch_size_per_process: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[np.ndarray]:
    """The first ``num_batches`` unshuffled batches of this process's slice (fewer, with a
    warning, when the data is smaller): the same evaluation set every time."""
    ds = grain.MapDataset.source(PackedBlocks(data_dir))
    ds = _process_slice(ds, process_index, process_count, batch_size_per_process)
    ds = ds.batch(batch_size_per_process, drop_remainder=True)
    if len(ds) < num_batches:
        warnings.warn(f"{data_dir} holds only {len(ds)} eval batches of {batch_size_per_process} "
                      f"per process; asked for {num_batches}", stacklevel=2)
    return [ds[i] for i in range(min(num_batches, len(ds)))]
