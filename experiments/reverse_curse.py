"""The reverse curse at micro scale: does an MDM trained on "A is the R of B" answer "who is the R
of B?", where an ARM does not (SMDM section 6)?

    python experiments/reverse_curse.py --seeds 0,1,2      # data, 6 runs, evaluation, table

1. Facts: `--facts` (100) fictitious statements "<First Last> is the <relation> of <Place>." with
   invented names and places (fixed by `--data-seed`; every (relation, place) pair unique, so a
   reversed question has one answer), written in SlimPajama's layout, each fact `--repeats` (40)
   times in shuffled order; a 512-piece tokenizer trained on them; shards of 64 tokens.
2. A tiny MDM and a tiny ARM of equal size (`tiny` preset) trained on the forward statements
   only, `--steps` (2000) steps each, for every seed in `--seeds` (runs resume; finished ones
   are kept).
3. Exact match, greedy, per fact:
   - forward: "<name> is the <relation> of" -> " <place>." (both families, generation);
   - reverse, as a question: "The <relation> of <place> is" -> " <name>." (both families);
   - reverse, by infilling (MDM only): "[mask x k] is the <relation> of <place>." with the k
     tokens of the name masked, filled by the MDM's low-confidence sampler. k is given: the
     infilling query knows the name's length, the generation queries do not need to.
The table (mean and per seed) goes to `--out`/results.json and README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELATIONS = ("mother", "teacher", "mentor", "doctor", "rival", "neighbour", "partner", "keeper")
ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "t",
          "th", "v", "z")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
CODAS = ("", "l", "n", "r", "s", "th", "v", "m")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(syllables)).capitalize()


def make_facts(n: int, seed: int) -> list[dict]:
    """n facts with distinct names and distinct (relation, place) pairs."""
    rng = random.Random(seed)
    names, pairs, facts = set(), set(), []
    while len(facts) < n:
        name = f"{_word(rng, 2)} {_word(rng, 2)}"
        pair = (rng.choice(RELATIONS), _word(rng, 3))
        if name in names or pair in pairs:
            continue
        names.add(name)
        pairs.add(pair)
        facts.append({"name": name, "relation": pair[0], "place": pair[1]})
    return facts


def statement(f: dict) -> str:
    return f"{f['name']} is the {f['relation']} of {f['place']}."


def build_data(out: str, facts: list[dict], repeats: int, seed: int) -> dict:
    """raw corpus, tokenizer and prepared shards under `out` (skipped when present)."""
    import zstandard

    py = sys.executable
    paths = {"raw": f"{out}/raw", "tok": f"{out}/tokenizer.model", "train": f"{out}/prepared/train"}
    if not os.path.exists(f"{paths['train']}/manifest.json"):
        lines = [statement(f) for f in facts] * repeats
        random.Random(seed).shuffle(lines)
        for split in ("train", "validation"):
            path = f"{paths['raw']}/{split}/chunk1/facts_{split}_0.jsonl.zst"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            docs = lines if split == "train" else lines[:len(facts)]
            meta = {"redpajama_set_name": "RedPajamaBook"}
            body = "\n".join(json.dumps({"text": t, "meta": meta}) for t in docs)
            with open(path, "wb") as fh:
                fh.write(zstandard.ZstdCompressor().compress(body.encode()))
        subprocess.run([py, "-m", "mdm_jax.data.train_tokenizer", "--input",
                        f"{paths['raw']}/train", "--output", paths["tok"], "--vocab-size", "512"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        subprocess.run([py, "-m", "mdm_jax.data.prepare", "--input", paths["raw"], "--split",
                        "train", "--output", paths["train"], "--tokenizer", paths["tok"],
                        "--seq-len", "64", "--workers", "1"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
    return paths


def get_config(kind: str = "mdm"):
    """The training config of one run (data paths, workdir and seed set by `main`)."""
    from mdm_jax.config import base_config

    c = base_config()
    c.model.preset, c.model.dtype, c.model.vocab_size = "tiny", "float32", 512
    c.objective.kind = kind
    c.objective.loss_chunk = 64
    c.seq_len, c.global_batch, c.steps = 64, 32, 1000
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 2e-3, 2e-4, 50
    c.mesh.data = -1
    c.data.eval_dir = ""
    c.log_every, c.checkpoint_every, c.samples.count = 100, 1000, 0
    return c


def _answer(text: str) -> str:
    return text.strip().split(".")[0].strip()


def evaluate(workdir: str, tokenizer: str, facts: list[dict]) -> dict:
    import numpy as np

    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.inference import MDMSampler, generate, load
    from mdm_jax.inference.mdm import infill

    m = load(workdir)
    tok = Tokenizer.load(tokenizer)
    bos = tok.bos_id

    def ask(prompts: list[str], answers: list[str]) -> float:
        hits = 0
        for p, want in zip(prompts, answers, strict=True):
            n = len(tok.encode(p + " " + want + ".")) - len(tok.encode(p)) + 2
            g = generate(m.model, m.params, [[bos] + tok.encode(p)], n, MDMSampler(steps=n))
            got = _answer(tok.decode([t for t in g.answers()[0] if t < tok.vocab_size]))
            hits += got == want
        return hits / len(prompts)

    out = {
        "forward": ask([f"{f['name']} is the {f['relation']} of" for f in facts],
                       [f["place"] for f in facts]),
        "reverse_question": ask([f"The {f['relation']} of {f['place']} is" for f in facts],
                                [f["name"] for f in facts]),
    }
    if not m.args.causal:
        hits = 0
        for f in facts:
            full = tok.encode(statement(f))
            name = tok.encode(f["name"])
            k = len(name) if full[:len(name)] == name else len(name) - 1
            canvas = np.asarray([[bos] + [m.args.mask_id] * k + full[k:]], np.int32)
            filled, _ = infill(m.model, m.params, canvas, __import__("jax").random.PRNGKey(0),
                               sampler=MDMSampler(steps=k))
            hits += tok.decode([int(t) for t in np.asarray(filled)[0, 1:1 + k]]).strip() \
                == f["name"]
        out["reverse_infill"] = hits / len(facts)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--facts", type=int, default=100)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--work", default=os.path.join(REPO, "runs", "reverse_curse"))
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "reverse_curse"))
    a = p.parse_args(argv)
    from absl import logging as absl_logging

    from mdm_jax.train import train

    absl_logging.set_verbosity(absl_logging.WARNING)
    facts = make_facts(a.facts, a.data_seed)
    data = build_data(os.path.join(a.work, "data"), facts, a.repeats, a.data_seed)
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for kind in ("mdm", "arm"):
            c = get_config(kind)
            c.seed, c.steps = seed, a.steps
            c.workdir = os.path.join(a.work, f"{kind}_seed{seed}")
            c.data.train_dir, c.data.tokenizer = data["train"], data["tok"]
            train(c)  # resumes; a finished run returns at once
            rows.append({"family": kind, "seed": seed, **evaluate(c.workdir, data["tok"],
                                                                 facts)})
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(a.out, exist_ok=True)
    cmd = "python experiments/reverse_curse.py " + " ".join(argv or sys.argv[1:])
    summary = {}
    for kind in ("mdm", "arm"):
        mine = [r for r in rows if r["family"] == kind]
        summary[kind] = {k: sum(r[k] for r in mine) / len(mine) for k in mine[0]
                         if k not in ("family", "seed")}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"command": cmd.strip(), "facts": a.facts, "repeats": a.repeats,
                   "steps": a.steps, "rows": rows, "mean": summary}, f, indent=2)
    lines = ["# Reverse curse at micro scale", "", f"Command: `{cmd.strip()}`", "",
             f"{a.facts} facts x {a.repeats} repeats, tiny preset with a 512-piece vocabulary "
             f"(~1M parameters), {a.steps} steps, seq 64, batch 32; exact match, greedy.", "",
             "| family | seed | forward | reverse (question) | reverse (infill) |",
             "|---|---|---|---|---|"]
    for r in rows + [{"family": k, "seed": "mean", **v} for k, v in summary.items()]:
        lines.append(f"| {r['family'].upper()} | {r['seed']} | {r['forward']:.3f} | "
                     f"{r['reverse_question']:.3f} | "
                     f"{r.get('reverse_infill', float('nan')):.3f} |".replace("nan", "n/a"))
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
