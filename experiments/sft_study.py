"""Pretrain, then fine-tune: evidence that SFT works for the MDM and the ARM (tiny preset, CPU).

    python experiments/sft_study.py                  # data, 2 pretrainings, 6 fine-tunings, tables
    python experiments/sft_study.py --data-only --out-data data_cache/sft_tasks   # the JSONL

1. Pretraining: the tiny MDM and ARM on the demo corpus (experiments/tiny.py, `--pretrain-steps`).
2. Tasks, written as SFT JSONL, prepared with the demo tokenizer extended by the chat pieces
   (the pretrained models' vocabulary grows from 2048 to 2051 when fine-tuning starts):
   - reverse (chat template): "reverse: w1 .. wk" -> "wk .. w1", k = 1..5 words, answers of
     variable length;
   - arithmetic (plain template, SMDM's GSM8K recipe): "a+b*c" with single digits, two pairs per
     item: "Question: q" -> "Answer: <<b*c=d>> <<a+d=e>>", and "Question: q Answer: ..." ->
     "#### e"; answered in two stages (the thought, then the answer);
   - facts (SMDM's reverse-curse recipe: the whole row, pre-training loss, `sft.mask_prompt=False`):
     experiments/reverse_curse.py's 100 facts "<name> is the <relation> of <place>.".
3. Fine-tuning from the pretrained weights (experiments/sft.py), `--steps` each.
4. Exact match, greedy, on the training prompts before (the pretrained weights, vocabulary
   grown) and after fine-tuning; for the reverse task also the share of answers of the right
   length and the held-out prompts. Tables to `--out`/README.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
WORDS = ("king", "lord", "love", "night", "day", "heart", "death", "life", "man", "god",
         "time", "eyes", "world", "sir", "fair", "blood", "sweet", "hand", "father", "heaven",
         "soul", "word", "honour", "queen")


def reverse_items(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        words = tuple(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
        if words in seen:
            continue
        seen.add(words)
        out.append({"prompt": "reverse: " + " ".join(words),
                    "response": " ".join(reversed(words))})
    return out


def arithmetic_items(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    triples = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
    rng.shuffle(triples)
    out = []
    for a, b, c in triples[:n]:
        d = b * c
        out.append({"question": f"{a}+{b}*{c}", "thought": f"<<{b}*{c}={d}>> <<{a}+{d}={a + d}>>",
                    "answer": str(a + d)})
    return out


def arithmetic_pairs(items: list[dict]) -> list[dict]:
    """SMDM's two examples per item: the thought, then the answer after it."""
    pairs = []
    for it in items:
        pairs.append({"prompt": f"Question: {it['question']}",
                      "response": f"Answer: {it['thought']}"})
        # The line break keeps the two pairs apart: without it both would read "Question: q
        # Answer: thought" and then teach opposite next tokens (EOS, and "####"), and a model
        # that learns the second one never ends its thought.
        pairs.append({"prompt": f"Question: {it['question']} Answer: {it['thought']}\n",
                      "response": f"#### {it['answer']}"})
    return pairs


def fact_pairs(facts: list[dict]) -> list[dict]:
    return [{"prompt": f"{f['name']} is the {f['relation']} of", "response": f"{f['place']}."}
            for f in facts]


def write_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_tasks(out: str, seed: int = 0, arithmetic: int = 100) -> dict:
    """The three tasks' JSONL (and held-out reverse prompts) under `out`."""
    import reverse_curse

    rev = reverse_items(400, seed)
    arith = arithmetic_items(arithmetic, seed)
    facts = reverse_curse.make_facts(100, seed)
    write_jsonl(f"{out}/reverse.jsonl", rev[:300])
    write_jsonl(f"{out}/reverse_heldout.jsonl", rev[300:])
    write_jsonl(f"{out}/arithmetic.jsonl", arithmetic_pairs(arith))
    write_jsonl(f"{out}/facts.jsonl", fact_pairs(facts))
    return {"reverse": rev[:300], "heldout": rev[300:], "arithmetic": arith, "facts": facts}


# -- evaluation -------------------------------------------------------------------------------
def _sampler(family: str, steps: int):
    from mdm_jax.inference import MDMSampler

    return MDMSampler(steps=steps) if family != "arm" else MDMSampler()


def answer_texts(model, params, tok, family: str, prompts: list[list[int]], gen_length: int,
                 stop_ids, seq_len: int) -> tuple[list[str], list[list[int]]]:
    """Greedy answers (cut at the stop tokens) of a batch of prompts."""
    from mdm_jax.inference import generate

    g = generate(model, params, prompts, gen_length, _sampler(family, gen_length),
                 max_length=seq_len)
    ids = g.answers(tuple(stop_ids))
    return [tok.decode(a).strip() for a in ids], ids


def eval_reverse(model, params, tok, family, items, seq_len) -> dict:
    from mdm_jax.data import templates

    prompts = [templates.turn_ids(tok, "chat", it["prompt"], first=True) for it in items]
    texts, ids = answer_texts(model, params, tok, family, prompts, 16,
                              templates.stop_ids(tok, "chat"), seq_len)
    want = [tok.encode(it["response"]) for it in items]
    n = len(items)
    return {"exact": sum(t == it["response"] for t, it in zip(texts, items, strict=True)) / n,
            "right_length": sum(len(a) == len(w) for a, w in zip(ids, want, strict=True)) / n}


def eval_arithmetic(model, params, tok, family, items, seq_len) -> dict:
    from mdm_jax.data import templates

    stop = templates.stop_ids(tok, "plain")
    first = [templates.turn_ids(tok, "plain", f"Question: {it['question']}", True)
             for it in items]
    thoughts, _ = answer_texts(model, params, tok, family, first, 32, stop, seq_len)
    second = [templates.turn_ids(tok, "plain", f"Question: {it['question']} {th}\n", True)
              for it, th in zip(items, thoughts, strict=True)]
    finals, _ = answer_texts(model, params, tok, family, second, 8, stop, seq_len)
    got = [(re.findall(r"####\s*(-?\d+)", f) or [None])[-1] for f in finals]
    return {"thought_exact": sum(th == f"Answer: {it['thought']}"
                                 for th, it in zip(thoughts, items, strict=True)) / len(items),
            "answer_accuracy": sum(g == it["answer"]
                                   for g, it in zip(got, items, strict=True)) / len(items)}


def before_params(config):
    """The weights fine-tuning starts from (pretrained, vocabulary grown)."""
    import jax

    from mdm_jax.finetune import pretrained_params
    from mdm_jax.trainer import Trainer

    trainer = Trainer(config, devices=jax.devices()[:1])
    return trainer.model, pretrained_params(trainer, config.init.source, None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=800, help="reverse task")
    p.add_argument("--lr", type=float, default=1e-3, help="reverse task")
    p.add_argument("--arithmetic-items", type=int, default=100)
    p.add_argument("--arithmetic-steps", type=int, default=2500,
                   help="memorising the reasoning of every item takes the MDM longer")
    p.add_argument("--arithmetic-lr", type=float, default=2e-3)
    p.add_argument("--facts-steps", type=int, default=2000, help="as the committed run")
    p.add_argument("--facts-lr", type=float, default=2e-3, help="as the committed run")
    p.add_argument("--families", default="mdm,arm")
    p.add_argument("--work", default=os.path.join(REPO, "runs", "sft_study"))
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "sft"))
    p.add_argument("--out-data", default=None)
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="only write the tables of these results.json files (e.g. the runs of "
                        "--families mdm and --families arm, made side by side) into --out")
    a = p.parse_args(argv)
    if a.merge:
        parts = [json.load(open(path)) for path in a.merge]
        for part in parts:  # each row keeps the steps and rate it was trained with
            for row in part["rows"]:
                row.setdefault("settings", part["settings"][row["task"]])
        merged = {**parts[0], "command": " && ".join(r["command"] for r in parts),
                  "rows": [row for r in parts for row in r["rows"]]}
        os.makedirs(a.out, exist_ok=True)
        with open(f"{a.out}/results.json", "w") as f:
            json.dump(merged, f, indent=2)
        write_tables(merged, a.out)
        return
    data_dir = a.out_data or os.path.join(a.work, "tasks")
    tasks = write_tasks(data_dir, arithmetic=a.arithmetic_items)
    if a.data_only:
        print(f"wrote {data_dir}/{{reverse,reverse_heldout,arithmetic,facts}}.jsonl")
        return
    import sft
    import tiny
    from absl import logging as absl_logging

    from mdm_jax.data.sft import prepare_sft
    from mdm_jax.data.tokenizer import Tokenizer, extend
    from mdm_jax.inference import load
    from mdm_jax.train import train

    absl_logging.set_verbosity(absl_logging.WARNING)
    os.chdir(REPO)
    chat_tok = str(extend("data_cache/demo_tokenizer.model", f"{a.work}/chat_tokenizer.model"))
    tok = Tokenizer.load(chat_tok)
    prepared = {}
    arith = f"arithmetic{a.arithmetic_items}_v2"  # v2: the pairs kept apart (see above)
    for name, template in (("reverse", "chat"), ("arithmetic", "plain"), ("facts", "plain")):
        prepared[name] = f"{a.work}/prepared/{arith if name == 'arithmetic' else name}"
        prepare_sft([f"{data_dir}/{name}.jsonl"], prepared[name], chat_tok, template, 64)

    results = {"command": "python experiments/sft_study.py " + " ".join(argv or sys.argv[1:]),
               "pretrain_steps": a.pretrain_steps, "steps": a.steps,
               "arithmetic_items": a.arithmetic_items, "arithmetic_steps": a.arithmetic_steps,
               "settings": {}, "rows": []}
    settings = {"reverse": (a.steps, a.lr), "arithmetic": (a.arithmetic_steps, a.arithmetic_lr),
                "facts": (a.facts_steps, a.facts_lr)}
    results["settings"] = {k: {"steps": v[0], "lr": v[1]} for k, v in settings.items()}
    # a run's folder names its settings where they are not the first round's (reverse: 800
    # steps at 1e-3), so changed settings train anew instead of resuming a finished run
    names = {"reverse": "reverse",
             "arithmetic": f"{arith}_{a.arithmetic_steps}s_lr{a.arithmetic_lr:g}",
             "facts": f"facts_{a.facts_steps}s_lr{a.facts_lr:g}"}
    if (a.steps, a.lr) != (800, 1e-3):
        names["reverse"] = f"reverse_{a.steps}s_lr{a.lr:g}"
    for family in a.families.split(","):
        c = tiny.get_config(family)
        c.steps, c.samples.count, c.eval_every = a.pretrain_steps, 0, 10_000
        c.workdir = f"{a.work}/pretrain_{family}"
        train(c)
        for task in ("reverse", "arithmetic", "facts"):
            c = sft.get_config(family)
            c.steps, c.optim.lr = settings[task]
            c.optim.min_lr = c.optim.lr / 10
            c.init.source = f"{a.work}/pretrain_{family}"
            c.workdir = f"{a.work}/{names[task]}_{family}"
            c.data.train_dir, c.data.tokenizer = prepared[task], chat_tok
            if task == "facts":
                c.sft.mask_prompt = False  # SMDM's reverse-curse recipe
            before_model, before = before_params(c)
            train(c)
            m = load(c.workdir)
            row = {"family": family, "task": task, "settings": results["settings"][task]}
            if task == "reverse":
                for when, (model, params) in (("before", (before_model, before)),
                                              ("after", (m.model, m.params))):
                    row[when] = eval_reverse(model, params, tok, family, tasks["reverse"], 64)
                row["heldout_after"] = eval_reverse(m.model, m.params, tok, family,
                                                    tasks["heldout"], 64)
            elif task == "arithmetic":
                sub = tasks["arithmetic"][:50]
                row["before"] = eval_arithmetic(before_model, before, tok, family, sub, 64)
                row["after"] = eval_arithmetic(m.model, m.params, tok, family, sub, 64)
            else:
                import reverse_curse

                row["after"] = reverse_curse.evaluate(c.workdir, chat_tok, tasks["facts"])
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(f"{a.out}/results.json", "w") as f:
        json.dump(results, f, indent=2)
    write_tables(results, a.out)


def _settings(row: dict) -> str:
    s = row["settings"]
    return f"{s['steps']} at {s['lr']:g}"


def write_tables(results: dict, out: str) -> None:
    rows = {(r["family"], r["task"]): r for r in results["rows"]}
    committed = {}
    path = os.path.join(REPO, "experiments", "results", "reverse_curse", "results.json")
    if os.path.exists(path):
        committed = json.load(open(path))["mean"]
    lines = ["# Supervised fine-tuning: before and after", "",
             f"Command: `{results['command'].strip()}`", "",
             f"Tiny preset (4 layers, d 128, 1.38M parameters), pretrained "
             f"{results['pretrain_steps']} steps on the demo corpus, then fine-tuned (batch 32, "
             f"canvas 64, LLaDA's per-row normalisation and constant-then-linear schedule, the "
             f"steps and peak rate of each task below); greedy, exact match on the training "
             f"prompts. Before: the pretrained weights, vocabulary grown to 2051.", "",
             "## Reverse the words (chat template, answers of 1-5 words)", "",
             "| family | steps at peak rate | exact before | exact after | right length before "
             "| right length after | exact after, 100 held-out prompts |",
             "|---|---|---|---|---|---|---|"]
    for fam in ("mdm", "arm"):
        r = rows.get((fam, "reverse"))
        if r:
            lines.append(f"| {fam.upper()} | {_settings(r)} | {r['before']['exact']:.3f} | "
                         f"{r['after']['exact']:.3f} | {r['before']['right_length']:.3f} | "
                         f"{r['after']['right_length']:.3f} | "
                         f"{r['heldout_after']['exact']:.3f} |")
    lines += ["", f"## Two-stage arithmetic (SMDM's GSM8K pipeline, plain template; "
              f"{results['arithmetic_items']} items; 50 training items asked)", "",
              "| family | steps at peak rate | thought exact before | after | answer accuracy "
              "before | after |", "|---|---|---|---|---|---|"]
    for fam in ("mdm", "arm"):
        r = rows.get((fam, "arithmetic"))
        if r:
            lines.append(f"| {fam.upper()} | {_settings(r)} | "
                         f"{r['before']['thought_exact']:.3f} | "
                         f"{r['after']['thought_exact']:.3f} | "
                         f"{r['before']['answer_accuracy']:.3f} | "
                         f"{r['after']['answer_accuracy']:.3f} |")
    lines += ["", "## Reverse curse through the fine-tuning path (SMDM's recipe: whole row, "
              "pre-training loss)", "",
              "| family | run | forward | reverse (question) | reverse (infill) |",
              "|---|---|---|---|---|"]
    for fam in ("mdm", "arm"):
        r = rows.get((fam, "facts"))
        if r:
            x = r["after"]
            lines.append(f"| {fam.upper()} | fine-tuned from the demo pretraining, "
                         f"{_settings(r)} | "
                         f"{x['forward']:.3f} | {x['reverse_question']:.3f} | "
                         f"{x.get('reverse_infill', float('nan')):.3f} |".replace("nan", "n/a"))
        if fam in committed:
            x = committed[fam]
            lines.append(f"| {fam.upper()} | committed (trained from scratch, "
                         f"experiments/results/reverse_curse, 2000 at 0.002) | "
                         f"{x['forward']:.3f} | "
                         f"{x['reverse_question']:.3f} | "
                         f"{x.get('reverse_infill', float('nan')):.3f} |".replace("nan", "n/a"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
