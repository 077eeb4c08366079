"""The llada-hf export of a large vocabulary against litgpt's, side by side in one run (issue 30).

A nano model whose vocabulary is --vocab pieces (default 128,000) and a SentencePiece BPE
tokenizer of as many pieces, with the chat pieces, trained by mdm_jax's trainer on made-up words
(both made once into --workdir). `--user-defined N` makes N of the pieces user-defined ones
(`<|reserved_i|>`, appended with `mdm_jax.data.tokenizer.extend`), which transformers'
slow-to-fast conversion handles in time quadratic in N.

Every step runs in a fresh process: `python -m mdm_jax.export` to litgpt and to llada-hf,
alternately, --repeat times, and `write_tokenizer` alone (timed from its call: the imports it
makes, transformers' before, count). The same for the tree of commit --before (git archive;
default: the last with transformers' conversion; `none` skips it). Prints the median seconds
and `llada-hf / litgpt` (target <= 2).

    python benchmarks/export_tokenizer.py
    python benchmarks/export_tokenizer.py --user-defined 20000 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "fe5d7cf"

CHILD_TOKENIZER = r"""
import sys, tempfile, time
from mdm_jax.export.tokenizer_files import write_tokenizer
with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    write_tokenizer(out, sys.argv[1], int(sys.argv[2]), hf=True, model_max_length=128)
    print(time.perf_counter() - t0)
"""

CHILD_CHECKPOINT = r"""
import sys
from absl import logging; logging.set_verbosity(logging.WARNING)
from mdm_jax.checkpoint import Checkpointer
from mdm_jax.config import base_config
from mdm_jax.trainer import Trainer, resolved_config
c = base_config()
c.workdir, c.model.preset, c.model.vocab_size = sys.argv[1], "nano", int(sys.argv[2])
c.data.tokenizer, c.global_batch, c.seq_len = sys.argv[3], 1, 128
trainer = Trainer(c)
ckpt = Checkpointer(c.workdir)
ckpt.save(1, trainer.create_state(0), None, resolved_config(c, trainer), {}, force=True)
ckpt.close()
"""


def _run(args: list[str], tree: str) -> tuple[float, str]:
    """(wall seconds, stdout) of `python args` with mdm_jax from `tree` (also the working
    directory: `-c` and `-m` put it first on sys.path)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tree,
                         env={**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(args[:3])} ({tree}) failed:\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def _tokenizer(workdir: str, vocab: int, user_defined: int) -> str:
    """The benchmark's SentencePiece model (cached: train_tokenizer skips a finished one)."""
    sys.path.insert(0, REPO)
    from mdm_jax.data.tokenizer import extend
    from mdm_jax.data.train_tokenizer import train_tokenizer

    corpus = os.path.join(workdir, f"words_{vocab}.txt")
    if not os.path.isfile(corpus):  # enough distinct words for every piece to be learned
        rng = random.Random(0)
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
        words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4)))
                        for _ in range(3 * vocab)})
        with open(corpus, "w") as f:
            f.writelines(" ".join(rng.choices(words, k=12)) + ".\n" for _ in range(vocab // 2))
    path = train_tokenizer([corpus], os.path.join(workdir, f"tok_{vocab - user_defined}"),
                           vocab - user_defined, chat_tokens=True)
    if user_defined:
        out = os.path.join(workdir, f"tok_{vocab - user_defined}+{user_defined}.model")
        if not os.path.isfile(out):
            extend(path, out, [f"<|reserved_{i}|>" for i in range(user_defined)])
        path = out
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128_000)
    p.add_argument("--user-defined", type=int, default=0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--before", default=BEFORE, help="a commit, or none")
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "bench_export_tokenizer"))
    a = p.parse_args()
    a.workdir = os.path.abspath(a.workdir)
    os.makedirs(a.workdir, exist_ok=True)
    tokenizer = _tokenizer(a.workdir, a.vocab, a.user_defined)
    run = os.path.join(a.workdir, f"run_{os.path.basename(tokenizer).removesuffix('.model')}")
    if not os.path.isdir(os.path.join(run, "checkpoints", "1")):
        _run(["-c", CHILD_CHECKPOINT, run, str(a.vocab), tokenizer], REPO)

    def export(fmt: str, tree: str) -> float:
        return _run(["-m", "mdm_jax.export", "--checkpoint", run, "--format", fmt, "--out",
                     os.path.join(a.workdir, f"out_{fmt}"), "--overwrite"], tree)[0]

    def write(tree: str) -> float:
        return float(_run(["-c", CHILD_TOKENIZER, tokenizer, str(a.vocab)], tree)[1])

    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as old:
        if a.before != "none":
            archive = subprocess.run(["git", "-C", REPO, "archive", a.before, "mdm_jax"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        for _ in range(a.repeat):
            times.setdefault("litgpt", []).append(export("litgpt", REPO))
            times.setdefault("llada-hf", []).append(export("llada-hf", REPO))
            times.setdefault("tokenizer", []).append(write(REPO))
            if a.before != "none":
                times.setdefault("llada-hf before", []).append(export("llada-hf", old))
                times.setdefault("tokenizer before", []).append(write(old))
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.vocab:,} pieces ({a.user_defined:,} user-defined), nano model; median of "
          f"{a.repeat}, whole processes")
    print(f"export litgpt {t['litgpt']:.1f}s, llada-hf {t['llada-hf']:.1f}s; "
          f"ratio llada-hf / litgpt {t['llada-hf'] / t['litgpt']:.2f} (target <= 2)")
    print(f"write_tokenizer (llada-hf) {t['tokenizer']:.2f}s")
    if a.before != "none":
        print(f"before ({a.before}): export llada-hf {t['llada-hf before']:.1f}s = "
              f"{t['llada-hf before'] / t['litgpt']:.2f}x litgpt; write_tokenizer "
              f"{t['tokenizer before']:.2f}s = {t['tokenizer before'] / t['tokenizer']:.1f}x "
              f"this tree's")


if __name__ == "__main__":
    main()
