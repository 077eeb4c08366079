"""Bundled evaluation tasks, built from the demo corpus's validation split (no download).

    python -m mdm_jax.eval.tasks --corpus data_cache/demo_corpus --out data_cache/tasks

writes two lm-evaluation-harness tasks (YAML + JSONL) into --out, for `--include_path`:
  - `demo_cloze` (multiple choice): a line's first words, and four candidate next-two-word
    continuations: the line's own and three taken from other lines; metric `acc`;
  - `demo_next_word` (generation): a line's first words -> its next word (greedy, the first
    word generated, exact match).
Lines are drawn with a fixed seed from validation documents, so every model trained on the
train split sees them for the first time.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random

# A multiple-choice task over a JSONL file of {"context", "choices", "answer"} rows.
MULTIPLE_CHOICE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

NEXT_WORD_YAML = """task: demo_next_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "(\\\\S+)"
      - function: take_first
metric_list:
  - metric: exact_match
"""


def _lines(corpus: str) -> list[str]:
    import zstandard

    out = []
    for path in sorted(glob.glob(os.path.join(corpus, "validation", "**", "*.jsonl.zst"),
                                 recursive=True)):
        with open(path, "rb") as f:
            text = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
        for record in io.StringIO(text):
            if record.strip():
                out += [ln.strip() for ln in json.loads(record)["text"].splitlines()
                        if len(ln.split()) >= 7]
    return out


def build(corpus: str, out: str, n: int = 200, seed: int = 0) -> dict[str, str]:
    """Write the two tasks; returns {task: yaml path}."""
    from mdm_jax.errors import UserError

    lines = _lines(corpus)
    if len(lines) < 8:
        raise UserError(f"{corpus}/validation holds {len(lines)} usable lines (7+ words); "
                        f"point --corpus at the demo corpus (bash launch/demo.sh makes it)")
    rng = random.Random(seed)
    picked = rng.sample(lines, min(n, len(lines)))
    cloze, nxt = [], []
    for line in picked:
        words = line.split()
        cut = rng.randint(3, len(words) - 3)
        context, true = " ".join(words[:cut]), " " + " ".join(words[cut:cut + 2])
        choices = [true]
        while len(choices) < 4:
            other = rng.choice(lines).split()
            k = rng.randint(1, len(other) - 2)
            candidate = " " + " ".join(other[k:k + 2])
            if candidate not in choices:
                choices.append(candidate)
        rng.shuffle(choices)
        cloze.append({"context": context, "choices": choices, "answer": choices.index(true)})
        nxt.append({"context": context, "target": words[cut]})
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, rows, template in (("demo_cloze", cloze, MULTIPLE_CHOICE_YAML),
                                 ("demo_next_word", nxt, NEXT_WORD_YAML)):
        data = os.path.abspath(os.path.join(out, f"{name}.jsonl"))
        with open(data, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = os.path.join(out, f"{name}.yaml")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.write(template.format(name=name, data=data))
    return paths


def _main(argv=None) -> None:
    from mdm_jax.errors import ArgumentParser

    p = ArgumentParser(prog="python -m mdm_jax.eval.tasks", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="data_cache/demo_corpus")
    p.add_argument("--out", default="data_cache/tasks")
    p.add_argument("--num", type=int, default=200, help="questions per task")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name, path in build(a.corpus, a.out, a.num, a.seed).items():
        print(f"{name}: {path}")


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_main, argv)


if __name__ == "__main__":
    cli()
