"""`prepare` on Apache Beam (mdm_jax.data.beam_prepare) against `prepare` on one machine: the
same blocks in the same shards, the same bad-record counts (through Beam's metrics), reruns that
finish what an interrupted run left, and one error line for a mistake. Beam runs in its own
environment, .venv-beam (`bash launch/setup.sh beam`: Beam needs protobuf < 7, which
sentencepiece's model proto refuses), so each pipeline runs there, in a subprocess, and `prepare`
here: the two environments must write the same bytes."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard
from conftest import REPO

BEAM_PYTHON = Path(REPO) / ".venv-beam" / "bin" / "python"
if not BEAM_PYTHON.exists():
    pytest.skip("no .venv-beam: bash launch/setup.sh beam", allow_module_level=True)

from mdm_jax.data import beam_prepare, loader, prepare, train_tokenizer  # noqa: E402

# Runs prepare_beam(**JSON) in .venv-beam and prints its manifest, or what stopped it.
DRIVER = """
import json, sys
from mdm_jax.data import beam_prepare, prepare
try:
    m = beam_prepare.prepare_beam(**json.loads(sys.argv[1]), log=lambda *a, **k: None)
except beam_prepare.Interrupted:
    m = {"interrupted": True}
except prepare.PrepareError as e:
    m = {"error": type(e).__name__, "message": str(e)}
print(json.dumps(m))
"""


def _in_beam_env(**kw) -> dict:
    kw = {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}
    done = subprocess.run([str(BEAM_PYTHON), "-c", DRIVER, json.dumps(kw)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

SEQ_LEN = 16
MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
WORDS = "the king queen lord said to of and my his her in is was with for that not".split()
BAD = [  # a record of every kind `prepare` skips, with its reason
    (b'{"text": "unterminated\n', "bad_json"),
    (b"[1, 2, 3]\n", "bad_json"),
    (b'{"meta": {"redpajama_set_name": "RedPajamaC4"}}\n', "missing_text"),
    (b'{"text": "  ", "meta": {"redpajama_set_name": "RedPajamaC4"}}\n', "empty_text"),
    (b'{"text": "def f(): pass", "meta": {"redpajama_set_name": "RedPajamaGithub"}}\n',
     "dropped_source"),
    (b'{"text": "who knows", "meta": {"redpajama_set_name": "SomethingElse"}}\n',
     "unknown_source"),
    (b'{"text": "bad \xff\xfe bytes", "meta": {"redpajama_set_name": "RedPajamaC4"}}\n',
     "bad_utf8"),
]


def _line(rng: random.Random, source: str | None) -> bytes:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))).capitalize() + "."
    rec = {"text": text} if source is None else {"text": text,
                                                 "meta": {"redpajama_set_name": source}}
    return (json.dumps(rec) + "\n").encode()


def _write_corpus(root: Path, n_files: int = 5, docs: int = 30) -> dict[str, int]:
    """Files in two chunk folders (chunk10 sorts before chunk2: `prepare`'s order is by path),
    with every kind of bad record; returns the expected skip counts."""
    rng = random.Random(1)
    skipped = {r: 0 for r in prepare.SKIP_REASONS}
    bad = list(BAD)
    for f in range(n_files):
        lines = []
        for i in range(docs):
            lines.append(_line(rng, (None, "RedPajamaC4", "RedPajamaBook")[i % 3]))
            if i % 7 == 3 and bad:
                raw, reason = bad.pop()
                lines.append(raw)
                skipped[reason] += 1
        path = root / "train" / ("chunk2", "chunk10")[f % 2] / f"part_{f}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines)))
    assert not bad
    return skipped


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(raw root, tokenizer, expected skip counts, local `prepare` output dir)."""
    root = tmp_path_factory.mktemp("beam_corpus")
    skipped = _write_corpus(root / "raw")
    tok = train_tokenizer.train_tokenizer(str(root / "raw" / "train"), root / "tok", 300)
    prepare.prepare(root / "raw", root / "local", tok, seq_len=SEQ_LEN, shard_blocks=7)
    return root / "raw", tok, skipped, root / "local"


def _dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _beam(corpus, out, **kw):
    raw, tok, _, _ = corpus
    return _in_beam_env(input_dir=raw, output_dir=out, tokenizer_path=tok, seq_len=SEQ_LEN,
                        **{"shard_blocks": 7, **kw})


@pytest.mark.e2e
def test_multiprocess_direct_runner_writes_what_prepare_writes(corpus, tmp_path):
    raw, tok, skipped, local = corpus
    out = tmp_path / "beam"
    m = _beam(corpus, out, beam_args=MULTI)
    # The same shards and manifest, byte for byte, and nothing else (the work folder is gone).
    assert _dir_bytes(out) == _dir_bytes(local)
    assert len(m["shards"]) >= 3
    # Bad records by kind: Beam's metrics, the manifest and the corpus agree.
    assert m["skipped"] == skipped and sum(skipped.values()) == len(BAD)
    assert {r: m["beam_metrics"][r] for r in prepare.SKIP_REASONS} == skipped
    assert m["beam_metrics"]["documents"] == m["documents"] == 150
    assert m["beam_metrics"]["tokens"] == m["tokens"]
    # The project's loader reads the token stream of the documents in path order, + EOS.
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    stream = []
    for path in prepare.list_input_files(raw, "train"):
        for text, _, reason in prepare.iter_documents(path, ["RedPajamaGithub"]):
            if reason is None:
                stream += sp.encode(text) + [sp.eos_id()]
    assert str(prepare.list_input_files(raw, "train")[0]).endswith("chunk10/part_1.jsonl.zst")
    src = loader.PackedBlocks(out)
    got = np.concatenate([src[i] for i in range(len(src))])
    np.testing.assert_array_equal(got, stream[: len(got)])
    assert len(stream) - len(got) == m["tail_tokens_dropped"] < SEQ_LEN + 1


@pytest.mark.e2e
def test_other_shard_sizes_give_the_same_block_stream(corpus, tmp_path):
    m = _beam(corpus, tmp_path / "beam", shard_blocks=5)
    a, b = loader.PackedBlocks(tmp_path / "beam"), loader.PackedBlocks(corpus[3])
    assert [s["blocks"] for s in m["shards"]][:-1] == [5] * (len(m["shards"]) - 1)
    np.testing.assert_array_equal(np.stack([a[i] for i in range(len(a))]),
                                  np.stack([b[i] for i in range(len(b))]))


@pytest.mark.e2e
def test_rerun_after_interruption_finishes_with_the_same_bytes(corpus, tmp_path):
    raw, _, _, local = corpus
    out = tmp_path / "beam"
    # A finished output made with other settings: its manifest goes before any work starts.
    _beam(corpus, out, shard_blocks=4)
    assert _beam(corpus, out, stop_after="tokenize") == {"interrupted": True}
    assert not (out / prepare.MANIFEST).exists()
    work = out / beam_prepare.WORK
    records = sorted(work.glob("*.json"))
    assert len(records) == 5 + 1  # one per input file, and the index
    # A crash while file 2 was written: its record is missing, its tokens half-written, and a
    # temporary file of another attempt lies about.
    (work / "000002.json").unlink()
    tokens = work / "000002.tokens"
    tokens.write_bytes(tokens.read_bytes()[:10])
    (work / "000003.tokens.tmp-0123456789ab").write_bytes(b"junk")
    assert _beam(corpus, out, stop_after="pack", beam_args=MULTI) == {"interrupted": True}
    assert not (out / prepare.MANIFEST).exists()
    m = _beam(corpus, out)
    assert m["beam_metrics"]["files_reused"] == 5  # all of the second attempt's work is kept
    assert _dir_bytes(out) == _dir_bytes(local)
    stamp = (out / prepare.MANIFEST).stat().st_mtime_ns
    again = _beam(corpus, out)  # finished: nothing to do, nothing written
    assert "beam_metrics" not in again and (out / prepare.MANIFEST).stat().st_mtime_ns == stamp
    # `prepare` on one machine recognises the output as its own.
    assert prepare.prepare(raw, out, corpus[1], seq_len=SEQ_LEN, shard_blocks=7) == again


@pytest.mark.e2e
def test_bad_file_stops_or_is_skipped_as_prepare_does(corpus, tmp_path):
    raw, tok, _, _ = corpus
    import shutil

    shutil.copytree(raw, tmp_path / "raw")
    bad = prepare.list_input_files(tmp_path / "raw", "train")[2]
    bad.write_bytes(bad.read_bytes()[:-30])  # truncated mid-frame
    kw = dict(input_dir=tmp_path / "raw", output_dir=tmp_path / "beam", tokenizer_path=tok,
              seq_len=SEQ_LEN, shard_blocks=7)
    stopped = _in_beam_env(**kw)
    assert stopped["error"] == "BadFileError", stopped
    assert re.search(f"{bad.name}.*--skip-bad-files", stopped["message"]), stopped
    assert not (tmp_path / "beam" / prepare.MANIFEST).exists()
    m = _in_beam_env(skip_bad_files=True, **kw)
    want = prepare.prepare(tmp_path / "raw", tmp_path / "local", tok, seq_len=SEQ_LEN,
                           shard_blocks=7, skip_bad_files=True)
    assert m["skipped_files"] == want["skipped_files"] == [
        {"file": str(bad.relative_to(tmp_path / "raw")), "reason": want["skipped_files"][0][
            "reason"]}]
    assert m["beam_metrics"]["bad_files"] == 1
    assert _dir_bytes(tmp_path / "beam") == _dir_bytes(tmp_path / "local")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BEAM_PYTHON), "-m", "mdm_jax.data.beam_prepare", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_cli_runs_and_mistakes_are_one_line(corpus, tmp_path):
    raw, tok, _, local = corpus
    base = ["--input", str(raw), "--tokenizer", str(tok), "--seq-len", str(SEQ_LEN),
            "--shard-blocks", "7"]
    done = _cli(*base, "--output", str(tmp_path / "out"), "--runner", "direct",
                "--direct_num_workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout[: done.stdout.rindex("}") + 1])["skipped"] == corpus[2]
    assert _dir_bytes(tmp_path / "out") == _dir_bytes(local)
    mistakes = {
        "did you mean --direct_num_workers": ["--direct_num_workrs", "2"],
        "--runner nosuch": ["--runner", "nosuch"],
        "--seq-len": ["--seq-len", "0"],
        "no input files": ["--input", str(tmp_path / "nowhere")],
        "--drop-sources": ["--drop-sources", "Bogus"],
    }
    for expected, change in mistakes.items():
        args = [*base, "--output", str(tmp_path / "o2"), *change]
        done = _cli(*args, cwd=tmp_path)
        assert done.returncode == 2, (change, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (
            change, done.stderr)
        assert not (tmp_path / "o2" / prepare.MANIFEST).exists()


def test_dataflow_workers_get_the_extras_beam():
    pins = [line.strip() for line in (Path(REPO) / "setup.cfg").read_text().splitlines()
            if line.strip().startswith("apache-beam")]
    reqs = [line.strip() for line in
            (Path(REPO) / "launch" / "beam_requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert reqs == ["apache-beam[gcp]==2.77.0"] and reqs[0] in pins
    assert {p.split("==")[1] for p in pins} == {"2.77.0"}
