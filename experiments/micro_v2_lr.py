"""The learning-rate sweep of the second micro study: every family at every lr of
experiments/isoflop.py's MICRO_V2_LRS, at the smallest budget, on the sizes of MICRO_V2_LR_GRID;
then each family's lr, written to OUT/chosen.json, which experiments/micro_v2.py reads.

    python experiments/micro_v2_lr.py [--out experiments/results/micro_v2/lr] [sweep options]

Extra options go to every `mdm_jax.scaling.sweep` call (e.g. --parallel 2); finished runs are
skipped, so a rerun only trains what is missing. The choice: the lr with the lowest mean
validation loss over the sizes. An lr at the end of the range is flagged in lr.txt (the best
may lie beyond it), and the study stops there rather than train on a guess.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import isoflop  # noqa: E402


def sweep(lr: float, out: str, extra: list[str]) -> str:
    results = os.path.join(out, f"lr_{lr:g}.csv")
    subprocess.run([sys.executable, "-m", "mdm_jax.scaling.sweep",
                    f"--config={os.path.join(HERE, 'isoflop.py')}:micro_v2_lr,{lr:g}",
                    "--backend", "local", "--results", results, *extra], check=True)
    return results


def choose(tables: dict[float, str]) -> tuple[dict, list[str]]:
    """({family: lr}, report lines) from each lr's results.csv."""
    losses: dict[str, dict[float, list[float]]] = {}
    for lr, path in tables.items():
        with open(path) as f:
            for row in csv.DictReader(f):
                losses.setdefault(row["family"], {}).setdefault(lr, []).append(float(row["loss"]))
    lrs = sorted(tables)
    chosen, lines, edge = {}, [], []
    lines.append("family   " + "  ".join(f"{lr:>8g}" for lr in lrs) + "   chosen")
    for family, by_lr in losses.items():
        sizes = max(len(v) for v in by_lr.values())
        # An lr with a diverged (missing) run is out: it did not train every size.
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items() if len(v) == sizes}
        best = min(means, key=means.get)
        chosen[family] = best
        cells = "  ".join(f"{means[lr]:>8.4f}" if lr in means else f"{'diverged':>8}"
                          for lr in lrs)
        flag = "" if lrs[0] < best < lrs[-1] else "  (at the edge of the range)"
        if flag:
            edge.append(family)
        lines.append(f"{family:<8} {cells}   {best:g}{flag}")
    return chosen, lines + ([f"not bracketed: {', '.join(edge)}"] if edge else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "micro_v2", "lr"))
    a, extra = ap.parse_known_args()
    os.makedirs(a.out, exist_ok=True)
    tables = {lr: sweep(lr, a.out, extra) for lr in isoflop.MICRO_V2_LRS}
    chosen, lines = choose(tables)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "lr.txt"), "w") as f:
        f.write(f"mean validation loss over {isoflop.MICRO_V2_LR_GRID[0]} (64 x 128 a step)\n")
        f.write(text + "\n")
    if "not bracketed" in text:
        sys.exit(f"error: an lr at the edge of {isoflop.MICRO_V2_LRS} is best for some family; "
                 f"widen MICRO_V2_LRS in experiments/isoflop.py and rerun")
    with open(os.path.join(a.out, "chosen.json"), "w") as f:
        json.dump({"lr": chosen, "budget_sizes": isoflop.MICRO_V2_LR_GRID[0]}, f, indent=1)


if __name__ == "__main__":
    main()
