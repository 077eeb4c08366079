"""Grain loading of prepared blocks: global shuffle, this process's slice, batches, mixtures.

Pipeline (all index arithmetic, so the iterator state is one integer and resumes exactly):
``PackedBlocks -> shuffle(seed; reseeded per epoch) -> per-process batches -> repeat``. Every
process computes the same permutation; global batch k is blocks [k*G, (k+1)*G) of it (G the
global batch) and process i reads rows [i*B, (i+1)*B) of that, so the processes are disjoint and
a run sees the same global batches on any number of hosts (up to ``n % G`` blocks per epoch that
nobody sees, keeping step counts equal across hosts). Grain passes the epoch
number down through repeat/batch/slice as an index offset, so ``shuffle`` draws a new
permutation (seed + epoch) every epoch.

A data source is a directory written by ``mdm_jax.data.prepare`` or a directory of lit-gpt
``*.bin`` files (``litgpt:DIR``; see ``mdm_jax.data.litgpt``). A mixture is a list of
``(source, weight)`` pairs (``parse_mixture("dirA:0.7,dirB:0.3")``): each source is shuffled
with its own seed, sliced per process and repeated forever, and Grain's ``MapDataset.mix``
interleaves them deterministically in proportion to the weights before batching.
"""

from __future__ import annotations

import bisect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from absl import flags

from mdm_jax import storage
from mdm_jax.data import litgpt, sft
from mdm_jax.data.prepare import MANIFEST

DataSpec = str | Path | Sequence[tuple[str | Path, float]]


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"dirA:0.7,dirB:0.3"`` -> ``[("dirA", 0.7), ("dirB", 0.3)]``; ``"dir"`` -> weight 1.

    The weight is the text after the last ``:`` when it parses as a number, so paths with
    colons (``litgpt:/data/slim``) keep theirs. Weights need not sum to one.
    """
    out: list[tuple[str, float]] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        path, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"mixture {spec!r}: weight of {path!r} must be a positive number, "
                             f"got {weight}")
        out.append((path, weight))
    if not out:
        raise ValueError(f"empty data mixture {spec!r}; expected 'dir' or 'dirA:0.7,dirB:0.3'")
    return out


def _as_mixture(data: DataSpec) -> list[tuple[str | Path, float]]:
    if isinstance(data, (str, Path)):
        return [(data, 1.0)]
    mix = [(d, float(w)) for d, w in data]
    if not mix or any(not w > 0 for _, w in mix):
        raise ValueError(f"a mixture needs at least one source and positive weights: {data!r}")
    return mix


def manifest(data_dir: str | Path) -> dict:
    """The manifest written by ``prepare`` (or one describing a lit-gpt directory); a clear
    error when ``data_dir`` is neither."""
    if litgpt.is_litgpt_dir(data_dir):
        return litgpt.manifest(data_dir)
    path = storage.as_path(data_dir) / MANIFEST  # local or gs://
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
        self.data_dir = storage.as_path(data_dir)
        m = manifest(self.data_dir)
        self.seq_len = int(m["seq_len"])
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        # ArrayRecord reads gs:// itself (its own GCS client), so shards stay plain strings.
        self._files = [str(self.data_dir / s["file"]) for s in m["shards"]]
        missing = [f for f in self._files if not storage.as_path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) listed in {self.data_dir / MANIFEST} are "
                                    f"missing: {missing[:3]}; re-run mdm_jax.data.prepare")
        self._ends = np.cumsum([s["blocks"] for s in m["shards"]]).tolist()
        try:
            self._source = grain.sources.ArrayRecordDataSource(self._files) if self._files else []
        except Exception:  # name the unreadable shard: open them one by one
            for f in self._files:
                try:
                    grain.sources.ArrayRecordDataSource([f])
                except Exception as e1:
                    raise self._corrupt(f, e1) from e1
            raise
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

    def _corrupt(self, shard: str, e: BaseException) -> ValueError:
        return ValueError(f"{shard}: corrupt or truncated ArrayRecord shard ({type(e).__name__}: "
                          f"{str(e)[:200] or 'no detail'}); delete {self.data_dir} and re-run "
                          f"mdm_jax.data.prepare to rewrite it")

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            raw = self._source[index]
        except IndexError:
            raise
        except Exception as e:
            raise self._corrupt(self._files[bisect.bisect_right(self._ends, index)], e) from e
        return self._decode(index, raw)

    def __getitems__(self, indices):
        try:
            raws = self._source.__getitems__(list(indices))
        except Exception:  # find (and name) the bad record one index at a time
            return [self[i] for i in indices]
        return [self._decode(i, r) for i, r in zip(indices, raws, strict=True)]

    def __repr__(self) -> str:
        return f"PackedBlocks({str(self.data_dir)!r}, blocks={len(self)}, seq_len={self.seq_len})"


def open_source(data_dir: str | Path) -> PackedBlocks | litgpt.LitGptBlocks | sft.SFTPairs:
    """The random-access block source for a prepared, lit-gpt or fine-tuning directory."""
    if litgpt.is_litgpt_dir(data_dir):
        return litgpt.LitGptBlocks(data_dir)
    m = manifest(data_dir)
    if sft.is_sft(m):
        return sft.SFTPairs(data_dir, m)
    return PackedBlocks(data_dir)


def _dataset(data_dir, seed: int) -> grain.MapDataset:
    """The source, shuffled; for fine-tuning data, one pair of each dialogue drawn per pass
    (the draw depends on the index, which carries the epoch: another pair next time)."""
    src = open_source(data_dir)
    ds = grain.MapDataset.source(src).shuffle(seed=seed)
    if isinstance(src, sft.SFTPairs):
        ds = ds.random_map(src.pick, seed=seed)
    return ds


def _component_seed(seed: int, k: int) -> int:
    """Source k's shuffle seed; source 0 keeps ``seed`` (a single directory is unchanged)."""
    if k == 0:
        return seed
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


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


def _process_batches(
    ds: grain.MapDataset, process_index: int, process_count: int, batch_size: int
) -> grain.MapDataset:
    """This process's batches, laid out so that global batch k is the same blocks in the same
    order for any process count: rows [k*B*P + i*B, k*B*P + (i+1)*B) go to process i.
    A run therefore sees identical data on 1 host or on many (and its losses match)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    global_batch = batch_size * process_count
    if len(ds) < global_batch:
        raise ValueError(f"{len(ds)} blocks cannot fill one global batch of {global_batch} "
                         f"({process_count} process(es) x {batch_size}); prepare more data or "
                         f"use smaller batches")
    ds = ds[: len(ds) // global_batch * global_batch]
    return ds.batch(batch_size, drop_remainder=True)[process_index::process_count]


def make_train_iterator(
    data_dir: DataSpec,
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

    ``data_dir`` is one source (a prepared or lit-gpt directory) or a list of
    ``(source, weight)`` pairs (see ``parse_mixture``). ``num_epochs=None`` repeats forever;
    a mixture always repeats forever (its sources cycle at different rates). Save/restore the
    position with the iterator's ``get_state()`` / ``set_state()`` (checkpointed
    alongside the train state). ``worker_count > 0`` moves reading into
    that many Grain worker processes.
    """
    mix = _as_mixture(data_dir)
    if len(mix) == 1:
        ds = _dataset(mix[0][0], seed)
        ds = _process_batches(ds, process_index, process_count, batch_size_per_process)
        ds = ds.repeat(num_epochs)
    else:
        if num_epochs is not None:
            raise ValueError("num_epochs is only defined for a single source; a mixture "
                             "repeats forever (stop after a number of steps instead)")
        parts = []
        seq_lens, kinds = {}, set()
        for k, (d, _) in enumerate(mix):
            part = _dataset(d, _component_seed(seed, k))
            seq_lens[str(d)] = manifest(d)["seq_len"]
            kinds.add(sft.is_sft(manifest(d)))
            parts.append(_process_slice(part, process_index, process_count, 1).repeat())
        if len(set(seq_lens.values())) > 1:
            raise ValueError(f"mixture sources have different seq_len: {seq_lens}; prepare "
                             f"them with the same --seq-len")
        if len(kinds) > 1:
            raise ValueError("a mixture cannot mix fine-tuning pairs (mdm_jax.data.sft) with "
                             "pre-training blocks; give sources of one kind")
        ds = grain.MapDataset.mix(parts, weights=[w for _, w in mix])
        ds = ds.batch(batch_size_per_process, drop_remainder=True)
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
    src = open_source(data_dir)
    ds = grain.MapDataset.source(src)
    if isinstance(src, sft.SFTPairs):
        ds = ds.random_map(src.pick, seed=0)
    ds = _process_batches(ds, process_index, process_count, batch_size_per_process)
    if len(ds) < num_batches:
        warnings.warn(f"{data_dir} holds only {len(ds)} eval batches of {batch_size_per_process} "
                      f"per process; asked for {num_batches}", stacklevel=2)
    return [ds[i] for i in range(min(num_batches, len(ds)))]
