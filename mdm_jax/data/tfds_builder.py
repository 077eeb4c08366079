"""A TFDS builder writing packed SlimPajama blocks as ArrayRecord, read by Grain (``tf`` extra).

    from mdm_jax.data import tfds_builder
    builder = tfds_builder.make_builder("SlimPajama", "tokenizer.model", seq_len=2048,
                                        data_dir="tfds_data")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split="train")     # random access, no TF graph
    ds = grain.MapDataset.source(source).map(lambda ex: ex["tokens"])

Each example is ``{"tokens": int32[seq_len + 1]}``: the blocks ``mdm_jax.data.prepare`` would
write, in the same order (the builder sets ``disable_shuffling`` so TFDS keeps the stream order).
Read them with ``as_data_source()``: TFDS's ``as_dataset()`` does not read ArrayRecord.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mdm_jax.data.prepare import iter_documents, list_input_files
from mdm_jax.data.tokenizer import Tokenizer


def iter_blocks(raw_dir: str | Path, tokenizer_path: str | Path, split: str, seq_len: int,
                drop_sources: Sequence[str] = ("RedPajamaGithub",)) -> Iterator[np.ndarray]:
    """Packed [seq_len + 1] blocks of one split: tokens + EOS per document, concatenated."""
    tok = Tokenizer.load(tokenizer_path)
    block = seq_len + 1
    carry: list[int] = []
    for path in list_input_files(raw_dir, split):
        for text, _, reason in iter_documents(path, tuple(drop_sources)):
            if reason is not None:
                continue
            carry += tok.encode(text) + [tok.eos_id]
            while len(carry) >= block:
                yield np.asarray(carry[:block], np.int32)
                del carry[:block]


@dataclasses.dataclass
class SlimPajamaConfig(tfds.core.BuilderConfig):
    raw_dir: str = ""
    tokenizer: str = ""
    seq_len: int = 2048
    drop_sources: tuple[str, ...] = ("RedPajamaGithub",)
    splits: tuple[str, ...] = ("train",)


class SlimPajamaMdm(tfds.core.GeneratorBasedBuilder):
    """SlimPajama documents tokenized with SentencePiece (+EOS) and packed into blocks."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [SlimPajamaConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"tokens": tfds.features.Tensor(shape=(c.seq_len + 1,), dtype=np.int32)}),
            disable_shuffling=True,
            description=f"packed blocks of {c.seq_len} + 1 tokens from {c.raw_dir}",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split: str):
        c = self.builder_config
        for i, block in enumerate(iter_blocks(c.raw_dir, c.tokenizer, split, c.seq_len,
                                              c.drop_sources)):
            yield i, {"tokens": block}


def make_builder(raw_dir: str | Path, tokenizer_path: str | Path, seq_len: int = 2048,
                 data_dir: str | Path | None = None, splits: Sequence[str] = ("train",),
                 drop_sources: Sequence[str] = ("RedPajamaGithub",)) -> SlimPajamaMdm:
    """The builder for one corpus/tokenizer/seq_len (fails early on a bad tokenizer)."""
    Tokenizer.load(tokenizer_path)
    config = SlimPajamaConfig(
        name=f"seq{seq_len}", raw_dir=str(Path(raw_dir).resolve()),
        tokenizer=str(Path(tokenizer_path).resolve()), seq_len=seq_len,
        drop_sources=tuple(drop_sources), splits=tuple(splits))
    return SlimPajamaMdm(config=config, data_dir=None if data_dir is None else str(data_dir),
                         file_format="array_record")
