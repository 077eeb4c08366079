"""Before-you-launch table: every SMDM preset of the IsoFLOP grid (and 1028M, 2121M) compiled for
v5p-8, v5e-16 and 8 x H100 at SMDM's global batch 256 x 2048, fitted by compiling.

    bash launch/setup.sh accelerators
    .venv-accelerators/bin/python experiments/aot_table.py            # resumes; ~1 min a compile
    .venv-accelerators/bin/python experiments/aot_table.py --presets 170M --targets v5p-8

Each row: the MDM step (bf16, FSDP over all chips, the target's attention kernel: splash on TPU,
cuDNN on H100) with micro_batch=auto and model.remat=auto, i.e. the largest micro-batch and the
cheapest remat that fit within 90% of the chip's memory; its peak GiB per chip; and the roofline
step time at an assumed MFU of 40% (mdm_jax.aot). Rows are appended to
experiments/results/aot/table.jsonl as they finish (a rerun skips them) and the Markdown table
is rewritten to table.md after each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mdm_jax import targets  # noqa: E402

targets.quiet_compile_only_environment()

with targets.native_logs_captured():
    from mdm_jax import aot, autofit  # noqa: E402
    from mdm_jax.scaling.plan import parse_grid  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "experiments"))
from isoflop import SMDM_GRID  # noqa: E402

OUT = os.path.join(REPO, "experiments", "results", "aot")
TARGETS = ("v5p-8", "v5e-16", "h100x8")
KERNEL = {"tpu": "splash", "cuda": "cudnn"}


def grid_presets() -> list[str]:
    names = {p for _, presets, _ in parse_grid(SMDM_GRID) for p in presets} | {"1028M", "2121M"}
    return sorted(names, key=lambda n: float(n.rstrip("M")))


def row_for(preset: str, target_name: str) -> dict:
    target = targets.TARGETS[target_name]
    c = aot.load_run_config([
        f"--config=experiments/smdm.py:{preset}", "--config.global_batch=256",
        "--config.seq_len=2048", "--config.micro_batch=auto", "--config.model.remat=auto",
        "--config.mesh.data=1", "--config.mesh.fsdp=-1",
        f"--config.model.attention={KERNEL[target.platform]}"])
    t0 = time.perf_counter()
    r = aot.analyse(c, target, autofit.DEFAULT_HEADROOM, aot.DEFAULT_MFU,
                    log=lambda m: print(m, flush=True))
    return {"preset": preset, "target": target_name, "seconds": round(time.perf_counter() - t0),
            **dataclasses.asdict(r)}


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | target | fits | micro-batch | remat | attention | peak GiB/chip "
             "| step s (roofline, MFU 40%) | compiles |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['target']} | {'yes' if r['fits'] else 'NO'} "
                     f"| {r['micro_batch']} | {r['remat']} | {r['attention']} "
                     f"| {r['peak_gib']:.1f} of {r['usable_gib']:.1f} "
                     f"| {r['step_seconds']:.3g} ({r['bound']}) | {len(r['trials'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(grid_presets()))
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "table.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    done = {(r["preset"], r["target"]) for r in rows}
    for target in args.targets.split(","):
        for preset in args.presets.split(","):
            if (preset, target) in done:
                continue
            print(f"[table] {preset} on {target}", flush=True)
            row = row_for(preset, target)
            rows.append(row)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            order = {n: i for i, n in enumerate(grid_presets())}
            rows.sort(key=lambda r: (TARGETS.index(r["target"]) if r["target"] in TARGETS
                                     else 99, order.get(r["preset"], 99)))
            with open(os.path.join(args.out, "table.md"), "w") as f:
                f.write(markdown(rows))
            print(f"[table] {preset} on {target}: micro_batch {row['micro_batch']} remat "
                  f"{row['remat']} peak {row['peak_gib']:.1f} GiB, {row['seconds']}s", flush=True)


if __name__ == "__main__":
    main()
