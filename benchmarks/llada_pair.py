"""One trained MDM seen two ways, for measuring mdm_jax against LLaDA's own code: as
`mdm_jax.inference.load` gives it, and as LLaDA's `generate.py` / `get_log_likelihood.py` see
it (its llada-hf export, loaded by transformers with the folder's code, float32); plus windows
of the demo's validation text as prompts, and a timer that alternates the two sides.

The model is the demo's tiny MDM (`runs/tiny_mdm`, trained like `launch/demo.sh` when missing;
`--model` takes another run). The export is made next to it (`<run>_llada_hf`) when missing.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUN = os.path.join(REPO, "runs", "tiny_mdm")


def ensure(run: str) -> str:
    """The run (trained when missing) and its float32 llada-hf export; the export's folder."""
    from sampling import ensure_data, ensure_trained

    if not os.path.isdir(os.path.join(run, "checkpoints")):
        ensure_data()
        ensure_trained("mdm", run)
    export = run.rstrip("/") + "_llada_hf"
    if not os.path.isfile(os.path.join(export, "config.json")):
        subprocess.run([sys.executable, "-m", "mdm_jax.export", "--model", run, "--format",
                        "llada-hf", "--out", export, "--dtype", "float32"], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
    return export


def load_pair(run: str, export: str, threads: int):
    """(mdm_jax's LoadedModel, the transformers model of the export)."""
    import torch
    from transformers import AutoModel

    from mdm_jax.inference import load

    torch.set_num_threads(threads or os.cpu_count() or 1)
    ours = load(run)
    theirs = AutoModel.from_pretrained(export, trust_remote_code=True,
                                       dtype=torch.float32).eval()
    return ours, theirs


def text_windows(tokenizer_path: str, folder: str, n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens, the start of each document of the SlimPajama-layout
    `folder` (*.jsonl.zst, sorted by path) long enough for one."""
    import glob

    import zstandard

    from mdm_jax.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_path)
    windows = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.jsonl.zst"), recursive=True)):
        with open(path, "rb") as f:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f)).read()
        for line in text.splitlines():
            ids = tok.encode(json.loads(line)["text"])
            if len(ids) >= length:
                windows.append(ids[:length])
            if len(windows) == n:
                return windows
    from references import UsageError

    raise UsageError(f"error: --text {folder}: fewer than {n} documents of {length} tokens; "
                     f"give a folder of *.jsonl.zst with more text, or lower the counts")


def default_text() -> str:
    from sampling import DATA

    return os.path.join(DATA, "demo_corpus", "validation")


def add_common_options(p) -> None:
    """The options both LLaDA benchmarks take (argparse parser `p`)."""
    p.add_argument("--llada", default="../references/LLaDA", help="checkout of ML-GSAI/LLaDA")
    p.add_argument("--model", default=DEFAULT_RUN, help="an MDM run (trained when missing)")
    p.add_argument("--text", default=None, help="*.jsonl.zst folder the prompts come from "
                   "(default: the demo's validation split)")
    p.add_argument("--reps", type=int, default=3, help="timed runs of each side")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: all cores)")
    p.add_argument("--force", action="store_true", help="print the ratio on a busy machine")
    p.add_argument("--json", action="store_true")


def alternate(sides: dict, reps: int) -> dict[str, list[float]]:
    """Each side's callable run `reps` times, the sides alternating (one warm-up call each,
    untimed); wall seconds per call."""
    for fn in sides.values():
        fn()
    times = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(theirs: list[float], ours: list[float]) -> tuple[float, float]:
    """(their median time / ours, median over alternate pairs of theirs / ours): > 1 means
    mdm_jax is faster."""
    return (statistics.median(theirs) / statistics.median(ours),
            statistics.median(t / o for t, o in zip(theirs, ours, strict=True)))
