"""User mistakes in data preparation: bad files, records without a source, nothing kept, bad
options. Library calls raise a UserError naming the input; the CLIs print one `error:` line and
exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from mdm_jax.data import prepare, tokenizer, train_tokenizer
from mdm_jax.errors import UserError

SEQ_LEN = 16
REPO = Path(__file__).resolve().parents[1]


def _record(i: int, source: str | None = "RedPajamaC4") -> dict:
    rec = {"text": f"Document {i}: the king said to the queen that night was fair. " * 3}
    if source is not None:
        rec["meta"] = {"redpajama_set_name": source}
    return rec


def _zst(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    return path


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.array_record"))}


@pytest.fixture(scope="module")
def tok(tiny_data):
    return tiny_data["tokenizer"]


# --- item 8: no silent empty runs ---------------------------------------------------------------


def test_zero_byte_zst_is_a_bad_file_like_a_truncated_one(tok, tmp_path):
    raw = tmp_path / "raw"
    _zst(raw / "train/chunk1/a.jsonl.zst", [_record(i) for i in range(5)])
    empty = raw / "train/chunk1/b.jsonl.zst"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"b\.jsonl\.zst: empty file.*--skip-bad-files") as e:
        prepare.prepare(raw, tmp_path / "o1", tok, seq_len=SEQ_LEN)
    assert isinstance(e.value, prepare.BadFileError)
    m = prepare.prepare(raw, tmp_path / "o2", tok, seq_len=SEQ_LEN, skip_bad_files=True)
    assert m["documents"] == 5
    assert [f["file"] for f in m["skipped_files"]] == ["train/chunk1/b.jsonl.zst"]
    assert "0 bytes" in m["skipped_files"][0]["reason"]
    # A valid zstd stream with no records is not a bad file, but a run of only that keeps nothing.
    _zst(tmp_path / "raw2/train/chunk1/c.jsonl.zst", [])
    with pytest.raises(prepare.PrepareError, match=r"raw2/train: kept no document.*no records"):
        prepare.prepare(tmp_path / "raw2", tmp_path / "o3", tok, seq_len=SEQ_LEN)


def test_records_without_set_name_are_the_user_source(tok, tmp_path):
    raw = tmp_path / "raw"
    records = [_record(i, None) for i in range(6)] + [_record(9, "RedPajamaBook")]
    records.append({"text": "meta without a set name", "meta": {"url": "x"}})
    _zst(raw / "train/chunk1/mine.jsonl.zst", records)
    m = prepare.prepare(raw, tmp_path / "o1", tok, seq_len=SEQ_LEN)
    assert m["documents"] == 8 and m["skipped"]["unknown_source"] == 0
    assert set(m["sources"]) == {prepare.USER_SOURCE, "RedPajamaBook"}
    assert sum(m["sources"].values()) == m["tokens"] and m["blocks"] > 0
    m = prepare.prepare(raw, tmp_path / "o2", tok, seq_len=SEQ_LEN, require_source=True)
    assert m["documents"] == 1 and m["skipped"]["missing_source"] == 7
    assert m["inputs"]["require_source"] is True
    m = prepare.prepare(raw, tmp_path / "o3", tok, seq_len=SEQ_LEN, drop_sources=["user"])
    assert m["documents"] == 1 and m["skipped"]["dropped_source"] == 7
    # Only user records and --require-source: nothing kept, which is an error naming the reason.
    _zst(tmp_path / "raw2/train/chunk1/mine.jsonl.zst", [_record(i, None) for i in range(3)])
    with pytest.raises(prepare.PrepareError,
                       match=r"raw2/train: kept no document.*missing_source=3.*--require-source"):
        prepare.prepare(tmp_path / "raw2", tmp_path / "o4", tok, seq_len=SEQ_LEN,
                        require_source=True)
    assert not (tmp_path / "o4" / prepare.MANIFEST).exists()
    # The tokenizer trainer reads the same records (user data is text to train on too).
    _, _, reason = prepare.classify_line(json.dumps(_record(1, None)).encode())
    assert reason is None


def test_unknown_sources_only_is_an_error_naming_the_reason(tok, tmp_path):
    _zst(tmp_path / "raw/train/chunk1/a.jsonl.zst", [_record(i, "Bogus") for i in range(4)])
    with pytest.raises(UserError, match=r"kept no document from 1 input file.*unknown_source=4"):
        prepare.prepare(tmp_path / "raw", tmp_path / "out", tok, seq_len=SEQ_LEN)


# --- item 9: truncated files, --skip-bad-files ---------------------------------------------------


def test_truncated_zst_stops_or_is_skipped_and_resumes_byte_identical(tok, tmp_path, monkeypatch):
    # Small batches: several of b's batches are packed (and a shard closes) before the cut is
    # found, so skipping it must roll those back.
    monkeypatch.setattr(prepare, "_BATCH_LINES", 4)
    kw = dict(seq_len=SEQ_LEN, shard_blocks=3)
    files = {"a": range(0, 10), "b": range(100, 140), "c": range(200, 210)}
    ref_raw, raw = tmp_path / "ref_raw", tmp_path / "raw"
    for name, ids in files.items():
        _zst(raw / f"train/chunk1/{name}.jsonl.zst", [_record(i) for i in ids])
        if name != "b":
            _zst(ref_raw / f"train/chunk1/{name}.jsonl.zst", [_record(i) for i in ids])
    bad = raw / "train/chunk1/b.jsonl.zst"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) - 5])  # a real valid file, cut mid-frame
    ref = prepare.prepare(ref_raw, tmp_path / "ref", tok, **kw)

    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"b\.jsonl\.zst: truncated.*re-download.*--skip-bad-files"):
        prepare.prepare(raw, out, tok, **kw)
    assert json.loads((out / prepare.PROGRESS).read_text())["counts"]["files_done"] == 1
    m = prepare.prepare(raw, out, tok, skip_bad_files=True, **kw)  # resumes at b, skips it
    assert m["skipped_files"] == [{"file": "train/chunk1/b.jsonl.zst",
                                   "reason": "truncated zstd stream (file ends mid-frame)"}]
    for key in ("documents", "tokens", "blocks", "sources", "skipped", "tail_tokens_dropped"):
        assert m[key] == ref[key], key
    assert _shards(out) == _shards(tmp_path / "ref")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*_shards(out), prepare.MANIFEST])  # no pending or progress files left
    # From scratch with workers: the same shards and manifest.
    m2 = prepare.prepare(raw, tmp_path / "w2", tok, skip_bad_files=True, workers=2, **kw)
    assert m2 == m and _shards(tmp_path / "w2") == _shards(out)
    # The finished output records the bad file: without the flag it is still an error.
    with pytest.raises(prepare.BadFileError, match=r"b\.jsonl\.zst.*--skip-bad-files"):
        prepare.prepare(raw, out, tok, **kw)


def test_library_errors_are_user_errors_and_keep_their_types(tok, tmp_path):
    with pytest.raises(UserError, match="nope.model") as e:
        tokenizer.Tokenizer.load(tmp_path / "nope.model")
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(UserError, match="empty_input") as e:
        prepare.list_input_files(tmp_path / "empty_input", "train")
    assert isinstance(e.value, FileNotFoundError)
    for kw in (dict(seq_len=0), dict(workers=0), dict(shard_blocks=-2)):
        name = next(iter(kw))
        with pytest.raises(prepare.PrepareError, match=name) as e:
            prepare.prepare(tmp_path, tmp_path / "o", tok, **kw)
        assert isinstance(e.value, ValueError)
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer.train_tokenizer(str(tmp_path), tmp_path / "t", 0)


# --- the CLIs: one line, exit code 2 -----------------------------------------------------------


def _shown(stderr: str) -> list[str]:
    """The lines a terminal shows: a progress bar cleared with '\\r' leaves nothing."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip()]


@pytest.fixture(scope="module")
def cli_inputs(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    good = _zst(d / "good/train/chunk1/a.jsonl.zst", [_record(i) for i in range(30)])
    blob = good.read_bytes()
    (d / "trunc/train/chunk1").mkdir(parents=True)
    (d / "trunc/train/chunk1/a.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    (d / "zero/train/chunk1").mkdir(parents=True)
    (d / "zero/train/chunk1/z.jsonl.zst").write_bytes(b"")
    _zst(d / "nometa/train/chunk1/a.jsonl.zst", [_record(i, None) for i in range(3)])
    (d / "empty").mkdir()
    (d / "a_file").write_text("not a directory")
    (d / "junk.model").write_bytes(b"junk")
    return d, str(tok)


PREPARE = "mdm_jax.data.prepare"
TRAIN_TOK = "mdm_jax.data.train_tokenizer"
# (module, args with {d} = the inputs' dir and {o} = an output dir of its own, what the line
# must name); prepare gets --tokenizer unless the args name it.
CASES = [
    (PREPARE, "--input {d}/zero --output {o}", "zero/train/chunk1/z.jsonl.zst"),
    (PREPARE, "--input {d}/trunc --output {o}", "trunc/train/chunk1/a.jsonl.zst"),
    (PREPARE, "--input {d}/nometa --output {o} --require-source", "nometa/train"),
    (PREPARE, "--input {d}/empty --output {o}", "empty/train"),
    (PREPARE, "--input {d}/nowhere --output {o}", "nowhere"),
    (PREPARE, "--input {d}/good --output {o} --tokenizer {d}/nope.model", "nope.model"),
    (PREPARE, "--input {d}/good --output {o} --tokenizer {d}/junk.model", "junk.model"),
    (PREPARE, "--input {d}/good --output {o} --seq-len 0", "--seq-len"),
    (PREPARE, "--input {d}/good --output {o} --workers 0", "--workers"),
    (PREPARE, "--input {d}/good --output {o} --shard-blocks -1", "--shard-blocks"),
    (PREPARE, "--input {d}/good --output {o} --seq-len x", "--seq-len"),
    (PREPARE, "--input {d}/good --output {d}/a_file", "a_file"),
    (PREPARE, "--input {d}/good --output {d}/a_file/sub", "a_file"),
    (PREPARE, "--input {d}/good --output {o} --keep-sources Bogus", "--keep-sources"),
    (PREPARE, "--input {d}/good --output {o} --drop-sources RedPajamaGitHub", "--drop-sources"),
    (PREPARE, "--input {d}/good --output {o} --tokenizer", "--tokenizer"),
    (TRAIN_TOK, "--input {d}/good --output {o}/t --vocab-size 0", "--vocab-size"),
    (TRAIN_TOK, "--input {d}/good --output {o}/t --vocab-size 100", "--vocab-size"),
    (TRAIN_TOK, "--input {d}/good --output {o}/t --vocab-size 300 --max-chars 0", "--max-chars"),
    (TRAIN_TOK, "--input {d}/trunc --output {o}/t --vocab-size 300", "a.jsonl.zst"),
    (TRAIN_TOK, "--input {d}/zero --output {o}/t --vocab-size 300", "z.jsonl.zst"),
    (TRAIN_TOK, "--input {d}/empty --output {o}/t --vocab-size 300", "empty"),
    (TRAIN_TOK, "--input {d}/good --output {d}/a_file/t --vocab-size 300", "a_file"),
]


def test_cli_user_errors_are_one_line_exit_2(cli_inputs):
    d, tok = cli_inputs
    env = {k: v for k, v in os.environ.items() if k != "MDM_JAX_DEBUG"}

    def run(i_case):
        i, (module, args, names) = i_case
        argv = args.format(d=d, o=d / f"out{i}").split()
        if module == PREPARE and "--tokenizer" not in argv:
            argv += ["--tokenizer", tok]
        # Bytes, not text=True: universal newlines would turn the bar's '\r' into lines.
        proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                              cwd=REPO, env=env, timeout=120)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, enumerate(CASES)))
    for (module, args, names), (rc, stdout, stderr) in zip(CASES, results, strict=True):
        what = f"{module} {args}: rc={rc} stderr={stderr[-600:]!r}"
        assert rc == 2, what
        assert "Traceback" not in stderr, what
        shown = _shown(stderr)
        assert len(shown) == 1 and shown[0].startswith("error: "), what
        assert names in shown[0], what
        assert stdout == "", what
