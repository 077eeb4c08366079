"""A seqio Task over raw SlimPajama ``*.jsonl.zst``, for seqio/t5x pipelines (``tf`` extra).

    from mdm_jax.data import seqio_tasks
    task = seqio_tasks.register_slimpajama_task("SlimPajama", "tokenizer.model")
    ds = task.get_dataset(sequence_length=None, split="train", shuffle=False)

Each example's ``targets`` is the document's SentencePiece ids + EOS (no BOS), exactly as
``mdm_jax.data.prepare`` encodes it: documents are read, filtered and counted by the same
``prepare.iter_documents`` (so the same records are skipped), tokenized in TF by seqio's
``SentencePieceVocabulary``, and ``seqio.preprocessors.append_eos`` adds the EOS id.

PAD=0: seqio assumes id 0 is padding, but in Llama-style vocabularies 0 is ``<unk>``. This Task
never pads (examples are unpadded, variable length), and with byte fallback no text encodes to
``<unk>``; if a downstream seqio feature converter pads to a fixed length, mask the padding by
length (or by the converter's ``*_segment_ids``), not by ``id == 0``.

Nothing here is imported by ``mdm_jax`` itself: TensorFlow and seqio load only when this module
is imported, and the Task is registered only when ``register_slimpajama_task`` is called.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from pathlib import Path

from mdm_jax.data.prepare import iter_documents, list_input_files

TASK_NAME = "slimpajama_mdm"
SPLITS = ("train", "validation", "test")


def vocabulary(tokenizer_path: str | Path):
    """seqio's SentencePieceVocabulary for the model, with no extra (sentinel) ids."""
    import seqio

    return seqio.SentencePieceVocabulary(str(tokenizer_path), extra_ids=0)


def _dataset_fn(raw_dir: Path, drop_sources: tuple[str, ...]):
    import tensorflow as tf

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        files = [str(p) for p in list_input_files(raw_dir, split)]
        if shuffle_files:
            random.Random(seed).shuffle(files)

        def gen():
            for path in files:
                for text, _, reason in iter_documents(path, drop_sources):
                    if reason is None:
                        yield {"text": text}

        return tf.data.Dataset.from_generator(
            gen, output_signature={"text": tf.TensorSpec(shape=(), dtype=tf.string)})

    return dataset_fn


def register_slimpajama_task(
    raw_dir: str | Path,
    tokenizer_path: str | Path,
    name: str = TASK_NAME,
    drop_sources: Sequence[str] = ("RedPajamaGithub",),
    splits: Sequence[str] = SPLITS,
    overwrite: bool = True,
):
    """Register (or re-register) the Task ``name`` in seqio's TaskRegistry and return it."""
    import seqio
    import tensorflow as tf

    from mdm_jax.data.tokenizer import Tokenizer

    Tokenizer.load(tokenizer_path)  # the same clear errors as the native path
    vocab = vocabulary(tokenizer_path)
    if overwrite and name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            _dataset_fn(Path(raw_dir), tuple(drop_sources)), splits=list(splits)),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos,
        ],
        output_features={
            "targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)},
        metric_fns=[],
    )
