"""Unsupervised classifier-free guidance at micro scale: the bundled tasks' accuracy for
several guidance weights w, through the lm-evaluation-harness (SMDM section 5).

    python experiments/cfg_micro.py --model runs/tiny_mdm --arm runs/tiny_arm
    python experiments/cfg_micro.py --tasks facts --model runs/sft_study/facts_2000s_lr0.002_mdm \
        --arm runs/sft_study/facts_2000s_lr0.002_arm --out experiments/results/cfg_facts

`--tasks facts`: two multiple-choice tasks on experiments/reverse_curse.py's 100 facts (data seed
0, the facts `experiments/sft_study.py` trains on), where a model trained on them is far above
chance: facts_place ("<name> is the <relation> of" -> the place, against 3 other facts'
places) and facts_relation ("<name> is the" -> "<relation> of <place>.", against 3 other
relations). Every table cell carries lm-eval's standard error.

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
METRIC = {"demo_cloze": "acc,none", "demo_next_word": "exact_match,first_word",
          "facts_place": "acc,none", "facts_relation": "acc,none"}
FACTS_TASKS = ("facts_place", "facts_relation")


def build_facts(out: str, seed: int = 0) -> None:
    """facts_place and facts_relation (JSONL + lm-eval YAML) under `out`."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import random

    import reverse_curse

    from mdm_jax.eval.tasks import MULTIPLE_CHOICE_YAML

    facts = reverse_curse.make_facts(100, seed)
    rng = random.Random(seed + 1)
    rows = {name: [] for name in FACTS_TASKS}
    for f in facts:
        others = rng.sample([g for g in facts if g["place"] != f["place"]], 3)
        choices = [f" {f['place']}."] + [f" {g['place']}." for g in others]
        rng.shuffle(choices)
        rows["facts_place"].append({"context": f"{f['name']} is the {f['relation']} of",
                                    "choices": choices,
                                    "answer": choices.index(f" {f['place']}.")})
        relations = rng.sample([r for r in reverse_curse.RELATIONS if r != f["relation"]], 3)
        true = f" {f['relation']} of {f['place']}."
        choices = [true] + [f" {r} of {f['place']}." for r in relations]
        rng.shuffle(choices)
        rows["facts_relation"].append({"context": f"{f['name']} is the", "choices": choices,
                                       "answer": choices.index(true)})
    os.makedirs(out, exist_ok=True)
    for name, items in rows.items():
        data = os.path.abspath(os.path.join(out, f"{name}.jsonl"))
        with open(data, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in items)
        with open(os.path.join(out, f"{name}.yaml"), "w") as fh:
            fh.write(MULTIPLE_CHOICE_YAML.format(name=name, data=data))


def harness(workdir: str, extra: str, tasks_dir: str, out: str, tasks=TASKS) -> dict:
    args = f"model={workdir},greedy_check=never" + (f",{extra}" if extra else "")
    subprocess.run([sys.executable, "-m", "mdm_jax.eval.harness", "--model", "mdm_jax",
                    "--model_args", args, "--tasks", ",".join(tasks), "--include_path",
                    tasks_dir, "--output_path", out, "--log_samples"], check=True, cwd=REPO,
                   env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    path = max(glob.glob(os.path.join(out, "**", "results*.json"), recursive=True),
               key=os.path.getmtime)
    results = json.load(open(path))["results"]
    stderr = {t: results[t].get(METRIC[t].replace(",", "_stderr,", 1)) for t in tasks}
    return {**{t: results[t][METRIC[t]] for t in tasks},
            **{f"{t}_stderr": v for t, v in stderr.items() if isinstance(v, (int, float))},
            **{f"{t}_correct": _correct(os.path.dirname(path), t) for t in tasks
               if METRIC[t].startswith("acc")}}


def _correct(folder: str, task: str) -> list[float]:
    """Per question 1/0, in document order, from the newest lm-eval samples file."""
    path = max(glob.glob(os.path.join(folder, f"samples_{task}_*.jsonl")), key=os.path.getmtime)
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [float(r["acc"]) for r in sorted(rows, key=lambda r: r["doc_id"])]


def paired(base: list[float], other: list[float]) -> tuple[float, float]:
    """(mean of other - base, its standard error) over the same questions."""
    import statistics

    diff = [o - b for b, o in zip(base, other, strict=True)]
    return statistics.fmean(diff), statistics.stdev(diff) / len(diff) ** 0.5


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
    p.add_argument("--tasks", choices=("demo", "facts"), default="demo")
    a = p.parse_args(argv)
    from mdm_jax.eval.tasks import build

    if a.tasks == "facts":
        tasks_dir, tasks = os.path.join(REPO, "data_cache", "tasks_facts"), FACTS_TASKS
        build_facts(tasks_dir)
        about = ("100 questions per task on the 100 facts of experiments/reverse_curse.py "
                 "(data seed 0); chance is 0.25")
    else:
        tasks_dir, tasks = os.path.join(REPO, "data_cache", "tasks"), TASKS
        build(os.path.join(REPO, a.corpus), tasks_dir, a.num)
        about = (f"{a.num} questions per task from the demo corpus's validation split "
                 f"(`python -m mdm_jax.eval.tasks`); chance on demo_cloze is 0.25")
    work = os.path.join(REPO, "runs", "cfg_micro_harness")
    rows = []
    for w in a.weights.split(","):
        acc = harness(a.model, f"estimator=chain,cfg={w}", tasks_dir, work, tasks)
        rows.append({"model": "MDM", "cfg": float(w), **acc})
        print(json.dumps(rows[-1]), flush=True)
    if a.arm:
        rows.append({"model": "ARM", "cfg": None,
                     **harness(a.arm, "", tasks_dir, work, tasks)})
    cmd = "python experiments/cfg_micro.py " + " ".join(argv or sys.argv[1:])
    os.makedirs(a.out, exist_ok=True)
    lines = ["# Unsupervised CFG at micro scale", "", f"Command: `{cmd.strip()}`", "",
             f"{about}; chain-rule likelihoods (deterministic); +- is lm-eval's standard "
             f"error; for w > 0, [change against w = 0 on the same questions +- its paired "
             f"standard error].", "", "| model | w | " + " | ".join(tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    base = rows[0]
    for r in rows:
        w = "-" if r["cfg"] is None else f"{r['cfg']:g}"
        cells = []
        for t in tasks:
            cell = f"{r[t]:.3f}" + (f" +- {r[t + '_stderr']:.3f}" if t + "_stderr" in r else "")
            if r["model"] == "MDM" and r is not base and t + "_correct" in r:
                r[t + "_change"] = paired(base[t + "_correct"], r[t + "_correct"])
                cell += " [{:+.3f} +- {:.3f}]".format(*r[t + "_change"])
            cells.append(cell)
        lines.append(f"| {r['model']} | {w} | " + " | ".join(cells) + " |")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"command": cmd.strip(), "tasks": list(tasks), "rows": rows}, f, indent=2)
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
