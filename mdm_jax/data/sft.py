"""Prepare and read supervised fine-tuning (SFT) data: prompt/response pairs as ArrayRecord rows.

    python -m mdm_jax.data.sft --input chats.jsonl --output data/sft --tokenizer tok.model \\
        --template chat --seq-len 256

Input: JSONL (or .jsonl.zst), one record per line, either `{"prompt": ..., "response": ...}`
or `{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}`. A dialogue of
n exchanges gives n pairs (mdm_jax.data.templates); by default they stay together in one record
and training draws one of them each pass over the data (LLaDA's choice), with `--all-turns`
every pair is its own record.

A pair is one row of `seq_len + 1` tokens: the prompt, the response (its answer, end-of-turn
for `chat`, EOS) and EOS padding to the end (the padding belongs to the response: it is how a
masked diffusion model learns where an answer ends), then two numbers: the prompt length and
the pair's length before the padding. Rows are written as int32. Bad records are counted by
kind (`not_json`, `missing_fields`, `bad_messages`, `empty_response`, `too_long`: a pair
longer than seq_len is dropped, never truncated) and reported in the manifest; a file of
only bad records is an error. Shards carry their sha256 like pre-training data, and the
manifest is written last, so a directory with a manifest is complete. Preparing again with the
same inputs and settings does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mdm_jax.data import templates
from mdm_jax.data.prepare import MANIFEST, PrepareError, check_output_dir, iter_lines
from mdm_jax.data.tokenizer import Tokenizer, file_sha256
from mdm_jax.errors import ArgumentParser, positive_int, run_main

FORMAT = "sft"
META_COLUMNS = 2  # after the seq_len + 1 tokens: prompt length, pair length (before padding)
BAD_KINDS = ("not_json", "missing_fields", "bad_messages", "empty_response", "too_long")


def is_sft(manifest: dict) -> bool:
    return manifest.get("format") == FORMAT


def row_width(seq_len: int) -> int:
    return seq_len + 1 + META_COLUMNS


def make_row(prompt: Sequence[int], response: Sequence[int], seq_len: int,
             eos_id: int) -> np.ndarray:
    """One int32 row: prompt, response, EOS padding to seq_len + 1, prompt and pair length."""
    pair = len(prompt) + len(response)
    row = np.full(row_width(seq_len), eos_id, np.int32)
    row[:pair] = [*prompt, *response]
    row[-2:] = (len(prompt), pair)
    return row


def _lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        yield from iter_lines(path)
    else:
        with open(path, "rb") as f:
            yield from f


def read_dialogues(path: Path, bad: Counter) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(system, exchanges) of every usable record; unusable ones counted in `bad` by kind."""
    for raw in _lines(path):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            bad["not_json"] += 1
            continue
        if isinstance(record, dict) and "messages" in record:
            try:
                yield templates.split_dialogue(record["messages"])
            except templates.DialogueError as e:
                bad[e.kind] += 1
            continue
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and isinstance(record.get("response"), str)):
            bad["missing_fields"] += 1
            continue
        if not record["response"].strip():
            bad["empty_response"] += 1
            continue
        yield "", [(record["prompt"], record["response"])]


def _inputs_sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def _write_shard(path: Path, records: list[np.ndarray]) -> str:
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")  # each record readable at random
    if not writer.ok():
        raise OSError(f"cannot open an ArrayRecord writer for {tmp}")
    for rows in records:
        writer.write(rows.astype("<i4").tobytes())
    writer.close()
    sha = file_sha256(tmp)
    os.replace(tmp, path)
    return sha


def prepare_sft(inputs: Sequence[str | Path], output_dir: str | Path, tokenizer: str | Path,
                template: str = "chat", seq_len: int = 2048, all_turns: bool = False,
                shard_records: int = 8192) -> dict:
    """Write `inputs` as SFT shards under `output_dir`; returns the manifest."""
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise PrepareError(f"--input {p} does not exist; give JSONL files of "
                               f'{{"prompt", "response"}} or {{"messages"}} records')
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    tok = Tokenizer.load(tokenizer)
    try:
        templates.check_template(tok, template)
    except ValueError as e:
        raise PrepareError(f"--template: {e}") from None
    settings = {"format": FORMAT, "template": template, "seq_len": seq_len,
                "all_turns": all_turns, "tokenizer_sha256": tok.sha256,
                "inputs_sha256": _inputs_sha256(paths), "shard_records": shard_records}
    manifest_path = output_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if {k: old.get(k) for k in settings} == settings:
            return old  # done before, with the same inputs and settings
        raise PrepareError(f"--output {output_dir} already holds prepared data made from other "
                           f"inputs or settings; choose another --output (nothing was "
                           f"overwritten)")
    bad, records, n_pairs = Counter(), [], 0
    for path in paths:
        for system, exchanges in read_dialogues(path, bad):
            rows = []
            for prompt, response in templates.dialogue_pairs(tok, template, system, exchanges):
                if len(prompt) + len(response) > seq_len:
                    bad["too_long"] += 1
                    continue
                rows.append(make_row(prompt, response, seq_len, tok.eos_id))
            n_pairs += len(rows)
            records.extend([r[None] for r in rows] if all_turns else
                           [np.stack(rows)] if rows else [])
    if not records:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(bad.items())) or "no records"
        raise PrepareError(f"--input {', '.join(map(str, paths))}: no usable pair ({counts}); "
                           f"check the records' fields, or raise --seq-len if they are too long")
    output_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, len(records), shard_records)):
        name = f"sft-{k:05d}.array_record"
        chunk = records[start:start + shard_records]
        shards.append({"file": name, "blocks": len(chunk),
                       "sha256": _write_shard(output_dir / name, chunk)})
    manifest = {**settings, "seq_len": seq_len, "row_width": row_width(seq_len),
                "dtype": "int32", "blocks": len(records), "pairs": n_pairs,
                "vocab_size": tok.vocab_size, "tokenizer": str(Path(tokenizer).resolve()),
                "eos_id": tok.eos_id, "stop_ids": list(templates.stop_ids(tok, template)),
                "bad_records": {k: bad.get(k, 0) for k in BAD_KINDS},
                "inputs": [str(p.resolve()) for p in paths], "shards": shards}
    tmp = manifest_path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)  # last: a directory with a manifest is complete
    return manifest


class SFTPairs:
    """Random-access source of SFT records: item i is int32 [k, seq_len + 3], the k candidate
    pairs of dialogue i (k = 1 unless its turns were kept together); `pick` chooses one."""

    def __init__(self, data_dir: str | Path, manifest: dict):
        import grain

        from mdm_jax import storage

        self.data_dir = storage.as_path(data_dir)
        self.seq_len, self.width = int(manifest["seq_len"]), int(manifest["row_width"])
        files = [str(self.data_dir / s["file"]) for s in manifest["shards"]]
        missing = [f for f in files if not storage.as_path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) listed in {self.data_dir / MANIFEST} are "
                                    f"missing: {missing[:3]}; prepare it again with "
                                    f"mdm_jax.data.sft")
        self._source = grain.sources.ArrayRecordDataSource(files)
        if len(self._source) != manifest["blocks"]:
            raise ValueError(f"{self.data_dir}: shards hold {len(self._source)} records but the "
                             f"manifest says {manifest['blocks']}; prepare it again")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> np.ndarray:
        raw = self._source[index]
        if len(raw) % (4 * self.width):
            raise ValueError(f"{self.data_dir}: record {index} has {len(raw)} bytes, not whole "
                             f"rows of {self.width} int32; the shard does not match its "
                             f"manifest")
        return np.frombuffer(raw, "<i4").astype(np.int32).reshape(-1, self.width)

    @staticmethod
    def pick(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One of a dialogue's pairs, drawn afresh each pass (Grain's per-index rng)."""
        return rows[rng.integers(len(rows))] if len(rows) > 1 else rows[0]


def _main(argv: Sequence[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m mdm_jax.data.sft", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="JSONL or .jsonl.zst files")
    p.add_argument("--output", required=True, help="directory for the shards and manifest")
    p.add_argument("--tokenizer", required=True, help="SentencePiece model")
    p.add_argument("--template", choices=templates.TEMPLATES, default="chat")
    p.add_argument("--seq-len", type=positive_int, default=2048,
                   help="the canvas: prompt + response + EOS padding")
    p.add_argument("--all-turns", action="store_true",
                   help="every turn of a dialogue is its own pair (default: one drawn per pass)")
    p.add_argument("--shard-records", type=positive_int, default=8192)
    a = p.parse_args(argv)
    m = prepare_sft(a.input, a.output, a.tokenizer, a.template, a.seq_len, a.all_turns,
                    a.shard_records)
    bad = ", ".join(f"{k} {v}" for k, v in m["bad_records"].items() if v) or "none"
    print(f"{a.output}: {m['pairs']} pairs in {m['blocks']} records ({m['template']} template, "
          f"seq_len {m['seq_len']}); bad records: {bad}")


def cli(argv: Sequence[str] | None = None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    cli()
