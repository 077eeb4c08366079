"""Unsupervised classifier-free guidance at micro scale: the bundled tasks' accuracy for
several guidance weights w, through the lm-evaluation-harness (SMDM section 5).

    python experiments/cfg_micro.py --model runs/tiny_mdm --arm runs/tiny_arm

Builds the bundled tasks from the demo corpus (`python -m mdm_jax.eval.tasks`), then runs
`python -m mdm_jax.eval.harness` once per w in `--weights` with the chain-rule estimator
(deterministic: differences between weights are not Monte Carlo noise) and once for the ARM
(no guidance), and writes the table to `--out`/README.md and results.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("demo_cloze", "demo_next_word")
METRIC = {"demo_cloze": "acc,none", "demo_next_word": "exact_match,first_word"}


def harness(workdir: str, extra: str, tasks_dir: str, out: str) -> dict:
    args = f"model={workdir},greedy_check=never" + (f",{extra}" if extra else "")
    subprocess.run([sys.executable, "-m", "mdm_jax.eval.harness", "--model", "mdm_jax",
                    "--model_args", args, "--tasks", ",".join(TASKS), "--include_path",
                    tasks_dir, "--output_path", out], check=True, cwd=REPO,
                   env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    path = max(glob.glob(os.path.join(out, "**", "results*.json"), recursive=True),
               key=os.path.getmtime)
    results = json.load(open(path))["results"]
    return {t: results[t][METRIC[t]] for t in TASKS}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--workdir", default="runs/tiny_mdm",
                   help="the MDM run (or export); --workdir is its old name")
    p.add_argument("--arm", default="", help="an ARM run of the same size, for reference")
    p.add_argument("--weights", default="0,0.5,1,2")
    p.add_argument("--corpus", default="data_cache/demo_corpus")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "cfg_micro"))
    a = p.parse_args(argv)
    from mdm_jax.eval.tasks import build

    tasks_dir = os.path.join(REPO, "data_cache", "tasks")
    build(os.path.join(REPO, a.corpus), tasks_dir, a.num)
    work = os.path.join(REPO, "runs", "cfg_micro_harness")
    rows = []
    for w in a.weights.split(","):
        acc = harness(a.model, f"estimator=chain,cfg={w}", tasks_dir, work)
        rows.append({"model": "MDM", "cfg": float(w), **acc})
        print(json.dumps(rows[-1]), flush=True)
    if a.arm:
        rows.append({"model": "ARM", "cfg": None, **harness(a.arm, "", tasks_dir, work)})
    cmd = "python experiments/cfg_micro.py " + " ".join(argv or sys.argv[1:])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"command": cmd.strip(), "questions": a.num, "rows": rows}, f, indent=2)
    lines = ["# Unsupervised CFG at micro scale", "", f"Command: `{cmd.strip()}`", "",
             f"{a.num} questions per task from the demo corpus's validation split "
             f"(`python -m mdm_jax.eval.tasks`); chain-rule likelihoods; chance on demo_cloze "
             f"is 0.25.", "", "| model | w | demo_cloze acc | demo_next_word exact match |",
             "|---|---|---|---|"]
    for r in rows:
        w = "-" if r["cfg"] is None else f"{r['cfg']:g}"
        lines.append(f"| {r['model']} | {w} | {r['demo_cloze']:.3f} | "
                     f"{r['demo_next_word']:.3f} |")
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
