"""seqio Task and TFDS builder give the native pipeline's token stream (needs the tf extra)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

pytest.importorskip("tensorflow")
pytest.importorskip("seqio")
pytest.importorskip("tensorflow_datasets")

from mdm_jax.data import loader, prepare, train_tokenizer  # noqa: E402

SEQ_LEN = 32
WORDS = "alpha beta gamma delta é ü 12 34 the and of thou shalt not".split()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf_raw")
    rng = random.Random(1)
    for f in range(2):
        lines = []
        for i in range(30):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            src = "RedPajamaGithub" if i % 7 == 3 else "RedPajamaC4"
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": src}}))
        lines.append('{"broken json')
        path = root / "train" / "chunk1" / f"part{f}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    tok = train_tokenizer.train_tokenizer(str(root / "train"), root / "tok", 300)
    out = root / "prepared"
    m = prepare.prepare(root, out, tok, seq_len=SEQ_LEN)
    native = np.stack([b for b in loader.PackedBlocks(out)]).ravel()
    return root, tok, m, native


def test_seqio_task_matches_native_stream(raw):
    from mdm_jax.data import seqio_tasks

    root, tok, m, native = raw
    task = seqio_tasks.register_slimpajama_task(root, tok, splits=["train"])
    ds = task.get_dataset(sequence_length=None, split="train", shuffle=False)
    examples = [ex["targets"] for ex in ds.as_numpy_iterator()]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert len(examples) == m["documents"]
    assert all(int(e[-1]) == sp.eos_id() and sp.bos_id() not in e for e in examples)
    stream = np.concatenate(examples)
    assert len(stream) == m["tokens"]
    np.testing.assert_array_equal(stream[: len(native)], native)
    assert seqio_tasks.vocabulary(tok).vocab_size == m["vocab_size"]


def test_tfds_builder_array_record_matches_native_blocks(raw, tmp_path):
    import grain

    from mdm_jax.data import tfds_builder

    root, tok, m, native = raw
    builder = tfds_builder.make_builder(root, tok, seq_len=SEQ_LEN, data_dir=tmp_path)
    builder.download_and_prepare()
    assert list(tmp_path.rglob("*.array_record*"))
    source = builder.as_data_source(split="train")
    assert len(source) == m["blocks"]
    ds = grain.MapDataset.source(source).map(lambda ex: ex["tokens"])
    got = np.stack([ds[i] for i in range(len(ds))])
    assert got.shape == (m["blocks"], SEQ_LEN + 1)
    np.testing.assert_array_equal(got.ravel(), native)


def test_tf_paths_reject_bad_tokenizer(raw, tmp_path):
    from mdm_jax.data import seqio_tasks, tfds_builder

    root = raw[0]
    with pytest.raises(FileNotFoundError, match="missing.model"):
        seqio_tasks.register_slimpajama_task(root, tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tfds_builder.make_builder(root, tmp_path / "missing.model")
