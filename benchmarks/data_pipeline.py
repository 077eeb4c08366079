"""Data pipeline throughput: preparation against raw SentencePiece, loader against the trainer.

    python benchmarks/data_pipeline.py                    # demo corpus if built, else synthetic
    python benchmarks/data_pipeline.py --input data_cache/demo_corpus \
        --tokenizer data_cache/demo_tokenizer.model --workers 2 --seq-len 2048
    python benchmarks/data_pipeline.py --trainer-tokens-per-s 5500 --json
    .venv-beam/bin/python benchmarks/data_pipeline.py --beam   # + prepare on Beam's DirectRunner

Two ratios, each measured side by side in one run (repeats alternate baseline and subject and
the medians are compared, so a shared machine's drift cancels out):

1. prepare: ``mdm_jax.data.prepare.prepare`` end to end (zstd streaming, JSON, filtering,
   SentencePiece, EOS, packing, ArrayRecord writing, progress file per input file) against raw
   SentencePiece ``encode_batch`` of the very same document texts, already in memory, in
   256-document chunks on the same number of worker processes. ``ratio = pipeline tokens/s /
   raw encode tokens/s``; the target is >= 0.8 (pipeline overhead <= 20%). With --workers > 1
   both sides time their own process pool's start-up (spawn, imports, tokenizer load) and
   shut-down, as a real run pays them; the start-up alone is measured and printed separately.
   With --beam, a third table: at 1 and 2 workers, raw SentencePiece, `prepare` (--workers W)
   and `mdm_jax.data.beam_prepare` on the DirectRunner (direct_num_workers=W, multi_processing:
   each worker a separate process, as on a cluster), each timed end to end in the same round,
   rounds repeated and medians compared; ratios against raw SentencePiece at the same W. Beam's
   fixed cost (start-up of two pipelines and their workers) is timed on a one-document corpus
   in the same round, and the rate after it reported too: that is what a long run sees.
2. loader: ``mdm_jax.data.loader.make_train_iterator`` (shuffled ArrayRecord reads, batching)
   in tokens/s per host, against the rate the trainer consumes tokens: ``--trainer-tokens-per-s``
   (default 5,500: the tiny preset on this CPU, ``benchmarks/train_step.py --preset tiny
   --seq-len 128 --batch 32``) and, for reference, ``--h100-tokens-per-s`` (default 70,000:
   the 1028M preset on one H100). Target: >= 20x, the loader is never the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zstandard  # noqa: E402

# Not the loader (Grain, ~1.4 s to import) here: every spawned worker of both pools
# imports this script, so its imports are start-up that both sides would pay.
from mdm_jax.data import prepare, train_tokenizer  # noqa: E402
from mdm_jax.data.tokenizer import Tokenizer  # noqa: E402

_TOK: Tokenizer | None = None


def _init(path: str) -> None:
    global _TOK
    _TOK = Tokenizer.load(path)


def _encode(texts: list[str]) -> int:
    assert _TOK is not None
    return sum(len(ids) + 1 for ids in _TOK.encode_batch(texts))  # +1: the EOS


def _synthetic_corpus(root: Path, files: int, docs: int) -> Path:
    rng = random.Random(0)
    words = ("the of and to in is was he for it with as his on be at by had not are but from "
             "or have an they which one you were her all she there would their we him been has "
             "when who will more no if out so said what up its about into than them can only "
             "other new some could time these two may then do first any my now such like our "
             "over man me even most made after also did many before must through").split()
    for f in range(files):
        lines = []
        for _ in range(docs):
            n = rng.randint(200, 1500)
            text = " ".join(rng.choice(words) for _ in range(n))
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": "RedPajamaC4"}}))
        path = root / "train" / "chunk1" / f"part_{f}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    return root


def _texts(input_dir: Path, split: str) -> list[list[str]]:
    return [[t for t, _, r in prepare.iter_documents(p, ("RedPajamaGithub",)) if r is None]
            for p in prepare.list_input_files(input_dir, split)]


def _raw_encode(chunks: list[list[str]], tok: Path, workers: int) -> int:
    """Tokens (+EOS) of ``chunks`` by raw SentencePiece; a pool's start-up counts, as in prepare."""
    if workers == 1:
        _init(str(tok))
        return sum(map(_encode, chunks))
    pool = multiprocessing.get_context("spawn").Pool(workers, _init, (str(tok),))
    try:
        return sum(pool.map(_encode, chunks, chunksize=1))
    finally:
        pool.terminate()


def _pool_startup_s(tok: Path, workers: int) -> float:
    """Seconds from creating a spawn pool to every worker having loaded the tokenizer."""
    if workers == 1:
        return 0.0
    t0 = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(workers, _init, (str(tok),))
    try:
        pool.map(_encode, [["warm up"]] * workers, chunksize=1)
        return time.perf_counter() - t0
    finally:
        pool.terminate()


def bench_prepare(input_dir: Path, tok: Path, split: str, seq_len: int, workers: int,
                  repeats: int, scratch: Path) -> dict:
    per_file = _texts(input_dir, split)
    chunks = [f[i : i + 256] for f in per_file for i in range(0, len(f), 256)]
    raw_s, pipe_s, startup_s = [], [], []
    tokens = 0
    for r in range(repeats):
        startup_s.append(_pool_startup_s(tok, workers))
        t0 = time.perf_counter()
        tokens = _raw_encode(chunks, tok, workers)
        raw_s.append(time.perf_counter() - t0)
        out = scratch / f"prepared_{r}"
        t0 = time.perf_counter()
        m = prepare.prepare(input_dir, out, tok, split=split, seq_len=seq_len, workers=workers)
        pipe_s.append(time.perf_counter() - t0)
        assert m["tokens"] == tokens, (m["tokens"], tokens)
        if r < repeats - 1:
            shutil.rmtree(out)
    raw, pipe = statistics.median(raw_s), statistics.median(pipe_s)
    return {"documents": m["documents"], "tokens": tokens, "workers": workers,
            "raw_encode_tok_s": tokens / raw, "prepare_tok_s": tokens / pipe,
            "prepare_docs_s": m["documents"] / pipe, "raw_s": raw_s, "prepare_s": pipe_s,
            "pool_startup_s": startup_s, "both_include_pool_startup": workers > 1,
            "ratio": raw / pipe, "target": ">= 0.8", "prepared": str(out)}


def bench_beam(input_dir: Path, tok: Path, split: str, seq_len: int, repeats: int,
               scratch: Path, workers: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Raw SentencePiece, `prepare` and Beam's DirectRunner side by side at each worker count."""
    from mdm_jax.data import beam_prepare

    per_file = _texts(input_dir, split)
    chunks = [f[i : i + 256] for f in per_file for i in range(0, len(f), 256)]
    # Beam's fixed cost (two pipelines, their workers' start-up) on one short document: the
    # per-token rate after it is what a long run on a cluster sees.
    tiny = scratch / "beam_tiny_corpus"
    (tiny / split / "chunk1").mkdir(parents=True, exist_ok=True)
    (tiny / split / "chunk1" / "one.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        json.dumps({"text": per_file[0][0]}).encode()))
    rows = []
    for w in workers:
        beam_args = [f"--direct_num_workers={w}", "--direct_running_mode=multi_processing"]
        times: dict[str, list[float]] = {"raw": [], "prepare": [], "beam": [], "beam_fixed": []}
        tokens = 0
        for r in range(repeats):
            t0 = time.perf_counter()
            tokens = _raw_encode(chunks, tok, w)
            times["raw"].append(time.perf_counter() - t0)
            out = scratch / f"scaling_prepare_{w}_{r}"
            t0 = time.perf_counter()
            m = prepare.prepare(input_dir, out, tok, split=split, seq_len=seq_len, workers=w)
            times["prepare"].append(time.perf_counter() - t0)
            assert m["tokens"] == tokens
            shutil.rmtree(out)
            out = scratch / f"scaling_beam_{w}_{r}"
            t0 = time.perf_counter()
            m = beam_prepare.prepare_beam(input_dir, out, tok, split=split, seq_len=seq_len,
                                          log=lambda *a, **k: None, beam_args=beam_args)
            times["beam"].append(time.perf_counter() - t0)
            assert m["tokens"] == tokens
            shutil.rmtree(out)
            t0 = time.perf_counter()
            beam_prepare.prepare_beam(tiny, out, tok, split=split, seq_len=seq_len,
                                      log=lambda *a, **k: None, beam_args=beam_args)
            times["beam_fixed"].append(time.perf_counter() - t0)
            shutil.rmtree(out)
        med = {k: statistics.median(v) for k, v in times.items()}
        beam_marginal = tokens / max(med["beam"] - med["beam_fixed"], 1e-9)
        rows.append({"workers": w, "tokens": tokens, "runs_s": times,
                     **{f"{k}_tok_s": tokens / med[k] for k in ("raw", "prepare", "beam")},
                     "beam_fixed_s": med["beam_fixed"], "beam_after_fixed_tok_s": beam_marginal,
                     "beam_after_fixed_vs_raw": beam_marginal * med["raw"] / tokens,
                     "prepare_vs_raw": med["raw"] / med["prepare"],
                     "beam_vs_raw": med["raw"] / med["beam"],
                     "beam_vs_prepare": med["prepare"] / med["beam"]})
    return rows


def bench_loader(data_dir: str, batch: int, batches: int, worker_count: int, repeats: int,
                 trainer_tok_s: float, h100_tok_s: float) -> dict:
    from mdm_jax.data import loader

    rates = []
    shape = None
    for r in range(repeats):
        it = loader.make_train_iterator(data_dir, batch_size_per_process=batch, seed=r,
                                        worker_count=worker_count)
        shape = next(it).shape  # pipeline start-up is not steady-state throughput
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * shape[0] * shape[1] / (time.perf_counter() - t0))
    rate = statistics.median(rates)
    return {"batch_shape": list(shape), "worker_count": worker_count,
            "loader_tok_s": rate, "loader_tok_s_runs": rates,
            "trainer_tok_s": trainer_tok_s, "ratio_vs_trainer": rate / trainer_tok_s,
            "h100_1028M_tok_s": h100_tok_s, "ratio_vs_h100_1028M": rate / h100_tok_s,
            "target": ">= 20"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", help="SlimPajama-style root (default: data_cache/demo_corpus if "
                                    "built, else a synthetic corpus)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: demo or freshly trained)")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--loader-workers", type=int, default=0, help="Grain worker processes")
    p.add_argument("--trainer-tokens-per-s", type=float, default=5500.0)
    p.add_argument("--h100-tokens-per-s", type=float, default=70000.0)
    p.add_argument("--beam", action="store_true",
                   help="also time prepare on Beam's DirectRunner against prepare and raw "
                        "SentencePiece at 1 and 2 workers (run it with .venv-beam/bin/python: "
                        "bash launch/setup.sh beam)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mdm_data_bench_") as tmp:
        scratch = Path(tmp)
        demo = Path("data_cache/demo_corpus")
        if a.input:
            input_dir = Path(a.input)
        elif (demo / "DONE").is_file():
            input_dir = demo
        else:
            input_dir = _synthetic_corpus(scratch / "raw", files=4, docs=300)
        if a.tokenizer:
            tok = Path(a.tokenizer)
        elif Path("data_cache/demo_tokenizer.model").is_file() and input_dir == demo:
            tok = Path("data_cache/demo_tokenizer.model")
        else:
            tok = train_tokenizer.train_tokenizer(str(input_dir / a.split), scratch / "tok", 2048)
        prep = bench_prepare(input_dir, tok, a.split, a.seq_len, a.workers, a.repeats, scratch)
        load = bench_loader(prep["prepared"], a.batch, a.batches, a.loader_workers, a.repeats,
                            a.trainer_tokens_per_s, a.h100_tokens_per_s)
        result = {"input": str(input_dir), "tokenizer": str(tok), "seq_len": a.seq_len,
                  "prepare": prep, "loader": load}
        if a.beam:
            result["beam"] = bench_beam(input_dir, tok, a.split, a.seq_len, a.repeats, scratch)
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"input {input_dir} ({prep['documents']} docs, {prep['tokens']} tokens), "
              f"tokenizer {tok}, seq_len {a.seq_len}")
        print(f"prepare  workers={a.workers}: {prep['prepare_tok_s']:,.0f} tok/s "
              f"({prep['prepare_docs_s']:,.0f} docs/s) vs raw SentencePiece "
              f"{prep['raw_encode_tok_s']:,.0f} tok/s  ratio {prep['ratio']:.3f} (target >= 0.8)")
        if a.workers > 1:
            print(f"         both sides include their pool's start-up "
                  f"(~{statistics.median(prep['pool_startup_s']):.2f}s) and shut-down; "
                  f"runs: raw {', '.join(f'{x:.2f}' for x in prep['raw_s'])}s, "
                  f"prepare {', '.join(f'{x:.2f}' for x in prep['prepare_s'])}s")
        print(f"loader   batch {load['batch_shape']} workers={a.loader_workers}: "
              f"{load['loader_tok_s']:,.0f} tok/s per host; "
              f"x{load['ratio_vs_trainer']:,.1f} the trainer's {a.trainer_tokens_per_s:,.0f} "
              f"tok/s (target >= 20), x{load['ratio_vs_h100_1028M']:,.1f} an H100's "
              f"{a.h100_tokens_per_s:,.0f} tok/s at 1028M")
        for row in result.get("beam", []):
            print(f"scaling  workers={row['workers']}: raw SentencePiece "
                  f"{row['raw_tok_s']:,.0f} tok/s | prepare {row['prepare_tok_s']:,.0f} tok/s "
                  f"(x{row['prepare_vs_raw']:.2f} raw) | Beam DirectRunner "
                  f"{row['beam_tok_s']:,.0f} tok/s (x{row['beam_vs_raw']:.2f} raw, "
                  f"x{row['beam_vs_prepare']:.2f} prepare); Beam after its fixed "
                  f"{row['beam_fixed_s']:.1f}s: {row['beam_after_fixed_tok_s']:,.0f} tok/s "
                  f"(x{row['beam_after_fixed_vs_raw']:.2f} raw)")
    return result


if __name__ == "__main__":
    main()
