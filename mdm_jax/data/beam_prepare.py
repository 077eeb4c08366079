"""`prepare` on Apache Beam: the same shards and manifest, spread over machines.

    python -m mdm_jax.data.beam_prepare --input gs://B/SlimPajama-627B --split train \\
        --output gs://B/slimpajama_2048/train --tokenizer gs://B/llama2/tokenizer.model \\
        --runner dataflow --project P --region R --temp_location gs://B/tmp

Takes `python -m mdm_jax.data.prepare`'s options (not --workers or --staging: the runner
decides where the work runs) and --runner direct|dataflow|flink|spark; every other option is
the runner's own (a Beam pipeline option) and is passed to it. Needs the `beam` extra.

The output is byte for byte what `prepare` writes on one machine (the same blocks, in the same
shards, and the same manifest). Packing is sequential (a block may span two documents of two
files), so the work is split where it is parallel, with a small sequential step between:

1. tokenize, one element per input file: read it (local or gs://), classify each record,
   encode + EOS with `prepare`'s own functions; write its tokens to OUTPUT/beam-work/N.tokens
   and then its counts to N.json (written last: a rerun reuses a file whose record is there
   and was made with the same tokenizer, sources and file size). Bad records are counted by
   kind through Beam metrics (namespace ``mdm_jax.prepare``).
2. here: a bad file stops the run (or, with --skip-bad-files, is left out whole); each file's
   offset in the token stream is the sum of the token counts of the files before it, in
   `prepare`'s order (files sorted by path, lines in order).
3. pack, one element per shard: shard k holds blocks [k * S, (k + 1) * S) of the stream, so
   it reads its tokens from the files it spans, wherever they were tokenized; each shard is
   written under a temporary name and renamed.
4. here: the manifest, written last (a temporary name, then renamed), so a reader that finds it
   finds every shard; then the work folder is deleted. A finished output is returned as is.
"""

from __future__ import annotations

import argparse
import bisect
import difflib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from mdm_jax import storage
from mdm_jax.data import prepare as prep
from mdm_jax.data.tokenizer import Tokenizer, TokenizerNotFoundError
from mdm_jax.errors import ArgumentParser, run_main


class _NoApitoolsNotice(logging.Filter):
    """Beam says at import that its BigQuery client is missing whenever google-cloud-* is
    installed without apitools (the gcs and dev extras): nothing here uses BigQuery."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


logging.getLogger().addFilter(_NoApitoolsNotice())
try:
    import apache_beam as beam
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.metrics import Metrics
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners import create_runner
except ImportError:  # the entry point says how to install it
    beam = None

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner",
           "spark": "SparkRunner"}
METRICS_NAMESPACE = "mdm_jax.prepare"
WORK = "beam-work"
# Bad records by kind (prepare.SKIP_REASONS), and what the tokenize step did.
COUNTERS = (*prep.SKIP_REASONS, "documents", "tokens", "bad_files", "files_reused")
RAW = CompressionTypes.UNCOMPRESSED if beam else None  # .zst is decoded by prepare's reader


class Interrupted(RuntimeError):
    """Raised by ``prepare_beam(stop_after=STAGE)``: simulates a crash after that stage."""


def _join(root: str, *parts: str) -> str:
    return FileSystems.join(root, *parts) if storage.is_remote(root) else os.path.join(root,
                                                                                        *parts)


def write_atomic(path: str, data: bytes) -> None:
    """Write under a unique temporary name, then rename: readers see the whole file or none,
    and two attempts at the same element never write into one file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with FileSystems.create(tmp, compression_type=RAW) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def read_json(path: str) -> dict | None:
    try:
        with FileSystems.open(path, compression_type=RAW) as f:
            return json.loads(f.read())
    except (OSError, ValueError):  # BeamIOError is an OSError
        return None


def list_files(input_dir: str, split: str) -> list[tuple[str, str, int]]:
    """(path, path under input_dir, bytes) of each input file, in `prepare`'s order."""
    if not storage.is_remote(input_dir):
        return [(str(p), str(p.relative_to(input_dir)), p.stat().st_size)
                for p in prep.list_input_files(input_dir, split)]
    pattern = _join(input_dir, split, "chunk*", "*.jsonl.zst")
    found = FileSystems.match([pattern])[0].metadata_list
    if not found:
        raise prep.InputNotFoundError(
            f"no input files: {pattern} matched nothing (SlimPajama's layout is "
            f"{{train,validation,test}}/chunkK/*.jsonl.zst); check --input and --split")
    root = input_dir.rstrip("/") + "/"
    files = [(m.path, m.path[len(root):], m.size_in_bytes) for m in found]
    # `prepare` sorts Paths, which compare part by part: the same order here.
    return sorted(files, key=lambda f: PurePosixPath(f[1]).parts)


def load_tokenizer(path: str) -> tuple[Tokenizer, bytes]:
    """The tokenizer and its file's bytes (shipped to the workers, which may not see ``path``)."""
    if not storage.is_remote(path):
        tok = Tokenizer.load(path)
        return tok, Path(tok.path).read_bytes()
    try:
        with FileSystems.open(path, compression_type=RAW) as f:
            model = f.read()
    except OSError as e:
        raise TokenizerNotFoundError(f"tokenizer model not found: {path} ({e})") from e
    local = Path(tempfile.mkdtemp(prefix="mdm_jax_tokenizer_")) / PurePosixPath(path).name
    local.write_bytes(model)
    tok = Tokenizer.load(local)
    tok.path = path  # what the manifest records
    return tok, model


class TokenizeFile(beam.DoFn if beam else object):
    """(index, (path, name, bytes)) -> that file's record: counts, and its tokens on disk."""

    def __init__(self, model: bytes, model_sha256: str, drop: Sequence[str],
                 require_source: bool, dtype: str, work: str):
        self.model, self.model_sha256 = model, model_sha256
        self.drop, self.require_source = frozenset(drop), require_source
        self.dtype, self.work = dtype, work

    def setup(self):
        folder = tempfile.mkdtemp(prefix="mdm_jax_tokenizer_")
        path = os.path.join(folder, "tokenizer.model")
        with open(path, "wb") as f:
            f.write(self.model)
        self.tok = Tokenizer.load(path)
        assert self.tok.sha256 == self.model_sha256
        self.counters = {name: Metrics.counter(METRICS_NAMESPACE, name) for name in COUNTERS}

    def key(self, name: str, size: int) -> str:
        """What a file's tokens depend on: a record with another key is redone."""
        what = [self.model_sha256, sorted(self.drop), self.require_source, self.dtype, name,
                size]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    def process(self, element):
        index, (path, name, size) = element
        key = self.key(name, size)
        record = read_json(_join(self.work, f"{index:06d}.json"))
        if record is not None and record.get("key") == key:
            self.counters["files_reused"].inc()
        else:
            record = self.tokenize(index, path, name, key)
        for reason, n in record["skipped"].items():
            self.counters[reason].inc(n)
        self.counters["documents"].inc(record["documents"])
        self.counters["tokens"].inc(record["tokens"])
        self.counters["bad_files"].inc(int(record["bad"] is not None))
        yield record

    def tokenize(self, index: int, path: str, name: str, key: str) -> dict:
        chunks: list[np.ndarray] = []
        documents = 0
        sources: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        bad = None
        try:
            try:
                f = FileSystems.open(path, compression_type=RAW)
            except OSError as e:
                raise prep.BadFileError(path, f"cannot open it ({e})") from e
            with f:
                for lines in prep.line_batches(prep.read_lines(f, path)):
                    res = prep.encode_lines(lines, self.tok, self.drop, self.require_source,
                                            self.dtype)
                    chunks.append(res["tokens"])
                    documents += res["documents"]
                    sources.update(res["sources"])
                    skipped.update(res["skipped"])
        except prep.BadFileError as e:
            # As `prepare` does, none of a bad file's records count.
            chunks, documents, sources, skipped, bad = [], 0, Counter(), Counter(), e.reason
        dtype = np.dtype(self.dtype).newbyteorder("<")
        tokens = np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
        write_atomic(_join(self.work, f"{index:06d}.tokens"), tokens.tobytes())
        record = {"key": key, "index": index, "file": name, "bad": bad, "tokens": len(tokens),
                  "documents": documents, "sources": dict(sources), "skipped": dict(skipped)}
        write_atomic(_join(self.work, f"{index:06d}.json"), json.dumps(record).encode())
        return record


class WriteShard(beam.DoFn if beam else object):
    """k -> shard k of the packed stream, read from the token files it spans."""

    def __init__(self, work: str, output: str, split: str, block_len: int, shard_blocks: int,
                 total_blocks: int, spans: list[tuple[int, int, int]], dtype: str):
        self.work, self.output, self.split = work, output, split
        self.block_len, self.shard_blocks, self.total_blocks = block_len, shard_blocks, total_blocks
        self.spans = spans  # (file index, first token in the stream, tokens), in stream order
        self.dtype = np.dtype(dtype).newbyteorder("<")

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the stream."""
        starts = [start for _, start, _ in self.spans]
        pieces = []
        for index, start, n in self.spans[max(bisect.bisect_right(starts, a) - 1, 0):]:
            if start >= b:
                break
            lo, hi = max(a, start) - start, min(b, start + n) - start
            if hi <= lo:
                continue
            with FileSystems.open(_join(self.work, f"{index:06d}.tokens"),
                                  compression_type=RAW) as f:
                f.seek(lo * self.dtype.itemsize)
                pieces.append(np.frombuffer(f.read((hi - lo) * self.dtype.itemsize),
                                            self.dtype))
        tokens = np.concatenate(pieces)
        assert len(tokens) == b - a, (len(tokens), a, b)
        return tokens

    def process(self, k: int):
        first = k * self.shard_blocks
        n = min(self.shard_blocks, self.total_blocks - first)
        blocks = self.read(first * self.block_len,
                           (first + n) * self.block_len).reshape(n, self.block_len)
        name = prep.shard_name(self.split, k)
        if storage.is_remote(self.output):
            # ArrayRecord writes a local file; an object appears whole when its upload ends.
            with tempfile.TemporaryDirectory(prefix="mdm_jax_shard_") as tmp:
                local = os.path.join(tmp, name)
                sha256 = prep.write_array_record(local, blocks)
                with open(local, "rb") as src, FileSystems.create(
                        _join(self.output, name), compression_type=RAW) as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
        else:
            tmp = os.path.join(self.output, f"{name}.tmp-{uuid.uuid4().hex[:12]}")
            sha256 = prep.write_array_record(tmp, blocks)
            os.replace(tmp, os.path.join(self.output, name))
        yield {"k": k, "file": name, "blocks": n, "sha256": sha256}


def _write_list(path: str):
    """The last step of a pipeline: its records, in one file the driver reads."""
    return beam.Map(lambda records: write_atomic(path, json.dumps(records).encode()))


def _run(pipeline: beam.Pipeline) -> dict[str, int]:
    """Run to the end; the ``mdm_jax.prepare`` counters (committed where the runner has them)."""
    result = pipeline.run()
    result.wait_until_finish()
    counters: Counter[str] = Counter({name: 0 for name in COUNTERS})  # a zero is not reported
    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    for c in query["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        counters[c.key.metric.name] += value or 0
    return dict(counters)


def pipeline_options(runner: str, beam_args: Sequence[str]) -> PipelineOptions:
    """Beam's options for ``runner`` and the runner's own flags; an unknown flag is an error
    (Beam would only log it, and a mistyped --temp_location would be silently ignored)."""
    parsers = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)  # every option
    _, unknown = parsers[0].parse_known_args(list(beam_args))
    if unknown:
        name = unknown[0].split("=", 1)[0]
        known = [s for a in parsers[0]._actions for s in a.option_strings]
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise prep.PrepareError(f"{name} is neither an option of mdm_jax.data.beam_prepare nor "
                                f"a Beam pipeline option{hint} (see --help)")
    name = RUNNERS.get(runner.lower(), runner)
    try:
        create_runner(name)
    except (ValueError, ImportError) as e:
        raise prep.PrepareError(f"--runner {runner}: {' '.join(str(e).split())}; use one of "
                                f"{', '.join(RUNNERS)} or a Beam runner's name") from e
    if name == "DataflowRunner":
        try:  # imported only when the job is submitted: say it now, not after the work
            import apache_beam.runners.dataflow.internal.apiclient  # noqa: F401
        except ImportError as e:
            raise prep.PrepareError(f"--runner {runner} needs Beam's Google Cloud clients "
                                    f"({e}); install the beam-gcp extra: bash launch/setup.sh "
                                    f"beam-gcp") from e
    return PipelineOptions([*beam_args, f"--runner={name}"])


def prepare_beam(
    input_dir: str | Path,
    output_dir: str | Path,
    tokenizer_path: str | Path,
    split: str = "train",
    seq_len: int = 2048,
    drop_sources: Sequence[str] = ("RedPajamaGithub",),
    shard_blocks: int = 8192,
    keep_sources: Sequence[str] | None = None,
    require_source: bool = False,
    skip_bad_files: bool = False,
    runner: str = "direct",
    beam_args: Sequence[str] = (),
    stop_after: str | None = None,
    log=print,
) -> dict:
    """`prepare.prepare` as Beam pipelines on ``runner`` (``beam_args``: its own options).

    Returns the manifest (also written to ``output_dir/manifest.json``), the same as
    `prepare` would write, plus ``beam_metrics``: the pipeline's counters (bad records by kind,
    documents, tokens, bad files, files reused from an earlier attempt). ``stop_after``
    ("tokenize" or "pack") raises ``Interrupted`` after that stage, as a crash would.
    """
    if beam is None:
        raise prep.PrepareError("apache-beam is not installed; install the beam extra: "
                                "pip install -e '.[beam]' (or bash launch/setup.sh beam)")
    prep.check_positive(seq_len=seq_len, shard_blocks=shard_blocks)
    drop = prep.resolve_drop(drop_sources, keep_sources)
    options = pipeline_options(runner, beam_args)
    input_dir, output_dir = str(input_dir), str(output_dir)
    remote_out = storage.is_remote(output_dir)
    if remote_out:
        output_dir = output_dir.rstrip("/")
    else:
        prep.check_output_dir(output_dir)
        output_dir = os.path.abspath(output_dir)
    tok, model = load_tokenizer(str(tokenizer_path))
    files = list_files(input_dir, split)
    dtype = prep.token_dtype(tok.vocab_size)
    source = (input_dir.rstrip("/") if storage.is_remote(input_dir)
              else str(Path(input_dir).resolve()))
    inputs = prep.input_record(source, [name for _, name, _ in files],
                               [size for _, _, size in files], split, seq_len, tok.sha256, drop,
                               shard_blocks, require_source)
    manifest_path = _join(output_dir, prep.MANIFEST)
    old = prep.reusable_manifest(read_json(manifest_path), inputs, manifest_path, input_dir,
                                 lambda name: FileSystems.exists(_join(output_dir, name)),
                                 skip_bad_files)
    if old is not None:
        log(f"{manifest_path} was made from these inputs: nothing to do")
        return old
    if not remote_out:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise prep.PrepareError(f"--output {output_dir}: cannot create the directory "
                                    f"({e.strerror or e}); pass a writable directory path") from e
    # A crash below must not leave a manifest that describes shards about to be replaced.
    if FileSystems.exists(manifest_path):
        FileSystems.delete([manifest_path])
    work = _join(output_dir, WORK)
    index_path, shards_path = _join(work, "files.json"), _join(work, "shards.json")
    for stale in (index_path, shards_path):
        if FileSystems.exists(stale):
            FileSystems.delete([stale])

    start = time.perf_counter()
    p = beam.Pipeline(options=options)
    (p
     | "files" >> beam.Create(list(enumerate(files)))
     | "spread files" >> beam.Reshuffle()
     | "tokenize" >> beam.ParDo(TokenizeFile(model, tok.sha256, sorted(drop), require_source,
                                             dtype, work))
     | "collect" >> beam.combiners.ToList()
     | "write index" >> _write_list(index_path))
    metrics = _run(p)
    records = sorted(read_json(index_path) or [], key=lambda r: r["index"])
    assert [r["index"] for r in records] == list(range(len(files))), "a file has no record"
    log(f"tokenized {len(files)} file(s) in {time.perf_counter() - start:.1f}s "
        f"({metrics.get('files_reused', 0)} reused from an earlier attempt)")
    if stop_after == "tokenize":
        raise Interrupted("stopped after tokenizing, as asked")

    bad_files = [{"file": r["file"], "reason": r["bad"]} for r in records if r["bad"]]
    if bad_files and not skip_bad_files:
        raise prep.BadFileError(_join(input_dir, bad_files[0]["file"]), bad_files[0]["reason"],
                                prep.SKIP_BAD_FILES_HINT)
    for bad in bad_files:
        log(f"warning: skipping bad file {_join(input_dir, bad['file'])}: {bad['reason']}",
            file=sys.stderr)
    sources: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for r in records:
        sources.update(r["sources"])
        skipped.update(r["skipped"])
    documents = sum(r["documents"] for r in records)
    if documents == 0:
        raise prep.PrepareError(prep.no_document_message(
            _join(input_dir, split), len(files), {k: skipped.get(k, 0) for k in prep.SKIP_REASONS},
            bad_files, drop))
    # Each file's place in the token stream: `prepare` packs the files in this order.
    spans, tokens = [], 0
    for r in records:
        if r["tokens"]:
            spans.append((r["index"], tokens, r["tokens"]))
            tokens += r["tokens"]
    block_len = seq_len + 1
    total_blocks = tokens // block_len
    n_shards = -(-total_blocks // shard_blocks)

    start = time.perf_counter()
    p = beam.Pipeline(options=options)
    (p
     | "shards" >> beam.Create(list(range(n_shards)))
     | "spread shards" >> beam.Reshuffle()
     | "pack" >> beam.ParDo(WriteShard(work, output_dir, split, block_len, shard_blocks,
                                       total_blocks, spans, dtype))
     | "collect" >> beam.combiners.ToList()
     | "write shard list" >> _write_list(shards_path))
    _run(p)
    shards = [{k: v for k, v in s.items() if k != "k"}
              for s in sorted(read_json(shards_path) or [], key=lambda s: s["k"])]
    assert len(shards) == n_shards, "a shard has no record"
    log(f"packed {n_shards} shard(s) in {time.perf_counter() - start:.1f}s")
    if stop_after == "pack":
        raise Interrupted("stopped after packing, as asked")

    # Shards of an earlier run with other settings, and a local run's leftovers, are not ours.
    keep = {s["file"] for s in shards}
    stale = [m.path for pattern in (f"{split}-*.array_record*", "pending-*", prep.PROGRESS)
             for m in FileSystems.match([_join(output_dir, pattern)])[0].metadata_list
             if PurePosixPath(m.path).name not in keep]
    if stale:
        FileSystems.delete(stale)
    manifest = prep.make_manifest(documents, tokens, tokens % block_len, sources, skipped,
                                  bad_files, tok, shards, inputs)
    write_atomic(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    if remote_out:
        FileSystems.delete([work + "/"])
    else:
        shutil.rmtree(work, ignore_errors=True)
    return {**manifest, "beam_metrics": metrics}


def cli(argv: Sequence[str] | None = None) -> None:
    run_main(_main, argv)


def _main(argv: Sequence[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True,
                   help="SlimPajama-style root holding {split}/chunk*/ (local or gs://)")
    p.add_argument("--output", required=True,
                   help="directory for shards and manifest.json (local, or gs:// for a cluster)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file (local or gs://)")
    prep.add_corpus_arguments(p)
    p.add_argument("--runner", default="direct",
                   help=f"{'|'.join(RUNNERS)} (or a Beam runner class name); every option this "
                        f"command does not know is passed to it")
    a, beam_args = p.parse_known_args(argv)
    names = prep.source_names
    start = time.perf_counter()

    def log(*args, **kwargs):
        print(*args, **{"file": sys.stderr, **kwargs})

    m = prepare_beam(a.input, a.output, a.tokenizer, split=a.split, seq_len=a.seq_len,
                     shard_blocks=a.shard_blocks, drop_sources=names(a.drop_sources) or (),
                     keep_sources=names(a.keep_sources), require_source=a.require_source,
                     skip_bad_files=a.skip_bad_files, runner=a.runner, beam_args=beam_args,
                     log=log)
    summary = {k: m.get(k) for k in ("documents", "tokens", "blocks", "tail_tokens_dropped",
                                     "skipped", "skipped_files", "sources", "dtype",
                                     "beam_metrics")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {len(m['shards'])} shard(s) and {prep.MANIFEST} to {a.output} "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    cli()
