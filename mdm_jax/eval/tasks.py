"""Bundled evaluation tasks, built from the demo corpus's validation split (no download).

    python -m mdm_jax.eval.tasks --corpus data_cache/demo_corpus --out data_cache/tasks

writes two lm-evaluation-harness tasks (YAML + JSONL) into --out, for `--include_path`:
  - `demo_cloze` (multiple choice): a line's first words, and four candidate next-two-word
    continuations: the line's own and three taken from other lines; metric `acc`;
  - `demo_next_word` (generation): a line's first words -> its next word (greedy, the first
    word generated, exact match).
Lines are drawn with a fixed seed from validation documents, so every model trained on the
train split sees them for the first time.

Task files of one's own are checked before lm-eval reads them (`check_task_files`, which the
harness CLI runs): lm-eval skips a YAML it cannot read and then says only "Tasks not found",
fails on a bad JSONL row with a traceback, and scores a row without its answer as wrong.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
from pathlib import Path

from mdm_jax.errors import UserError

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


class TaskFileError(UserError):
    """A task YAML or JSONL file that lm-eval would skip or fail on; the message names the file
    (and line and field)."""


OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # lm-eval's index skips them too


def read_rows(path: str, fields: dict[str, str] | None = None) -> list[dict]:
    """The rows of a JSONL file: a line that is not a JSON object, or a row without (or with
    a null) field of `fields` ({field: why it is needed}), is an error naming line and field."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise TaskFileError(f"task file {path} not found (python -m mdm_jax.eval.tasks builds "
                            f"the bundled ones)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"task file {path}: {e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path} line {n}: not JSON ({e.msg} at column {e.colno}); "
                                f"each line holds one JSON object") from None
        if not isinstance(row, dict):
            raise TaskFileError(f"{path} line {n}: a JSON {type(row).__name__}, not an object "
                                f"of fields")
        for field, why in (fields or {}).items():
            if row.get(field) is None:
                raise TaskFileError(f'{path} line {n}: no "{field}" field ({why})')
        rows.append(row)
    return rows


def _load_yaml(path, **kwargs) -> dict:
    # lm-eval's own reader (its `!function` tags, `include:` merged): what it reads, we check
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False, **kwargs)


def _yaml_problem(path, e: Exception) -> str:
    import yaml

    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return (f"{path}: not valid YAML ({e.problem} at line {mark.line + 1}, column "
                f"{mark.column + 1})")
    return f"{path}: {' '.join(str(e).split())}"


def _yamls(include: str) -> list[Path]:
    return sorted((p for p in Path(include).glob("**/*.yaml")
                   if not IGNORED_DIRS.intersection(p.parts)), key=Path.as_posix)


def skipped_yamls(include: str) -> list[str]:
    """The YAMLs under `include` that lm-eval's task index drops without a word, one line
    each: one that does not load, and one with no `task:` (or `group:`) that no other file
    includes (an included file is a template, not a task)."""
    problems, kindless, included = [], [], set()
    for path in _yamls(include):
        try:
            own, cfg = _load_yaml(path, recursive=False), _load_yaml(path)
        except Exception as e:  # whatever lm-eval's index would skip the file for
            problems.append(_yaml_problem(path, e))
            continue
        names = own.get("include") or []
        included.update((path.parent / n).resolve()
                        for n in (names if isinstance(names, list) else [names]))
        if not {"task", "group", "class"} & cfg.keys():
            kindless.append(path)
    return problems + [f"{p}: no task: key (a task YAML names its task, e.g. task: {p.stem})"
                       for p in kindless if p.resolve() not in included]


def check_task_files(include: str | None, tasks: list[str]) -> None:
    """Before lm-eval runs: each requested task that a YAML under `include` (or a .yaml path
    in `tasks`) defines has what lm-eval needs, its local data files exist, and each JSONL
    row holds every field its templates read. Tasks are requested by name, tag or group."""
    found = []  # (path, config)
    for task in (t for t in tasks if t.endswith(".yaml")):
        for path in sorted(glob.glob(task)):
            try:
                found.append((path, _load_yaml(path)))
            except Exception as e:
                raise TaskFileError(_yaml_problem(path, e)) from None
    wanted = set(tasks)
    if include:
        loaded = []
        for path in _yamls(include):
            try:
                loaded.append((path, _load_yaml(path)))
            except Exception:  # skipped by lm-eval too; named if a task is then not found
                continue
        for _, cfg in loaded:  # a requested group requests its tasks
            if cfg.get("group") in wanted and isinstance(cfg.get("task"), list):
                wanted.update(t for t in cfg["task"] if isinstance(t, str))
        for path, cfg in loaded:
            tags = cfg.get("tag") or []
            if cfg.get("task") in wanted or wanted.intersection(
                    [tags] if isinstance(tags, str) else tags):
                found.append((path, cfg))
    for path, cfg in found:
        if isinstance(cfg.get("task"), str) and "class" not in cfg:
            _check_task(str(path), cfg)


def _check_task(path: str, cfg: dict) -> None:
    where = f"{path} (task {cfg['task']})"
    kind = cfg.get("output_type", "generate_until")
    if kind not in OUTPUT_TYPES:
        raise TaskFileError(f"{where}: output_type {kind!r}; choose one of "
                            f"{', '.join(OUTPUT_TYPES)}")
    for key in ("doc_to_text", "doc_to_target") + (
            ("doc_to_choice",) if kind == "multiple_choice" else ()):
        if cfg.get(key) is None:
            raise TaskFileError(f"{where}: no {key}: key (e.g. {key}: \"{{{{field}}}}\", a "
                                f"field of its rows)")
    if not (cfg.get("test_split") or cfg.get("validation_split")):
        raise TaskFileError(f"{where}: no test_split: or validation_split: key (the split "
                            f"lm-eval scores, e.g. test_split: test)")
    if not (cfg.get("dataset_path") or cfg.get("custom_dataset")):
        raise TaskFileError(f"{where}: no dataset_path: key (for a JSONL file: dataset_path: "
                            f"json and dataset_kwargs: {{data_files: {{test: FILE.jsonl}}}})")
    if cfg.get("dataset_path") != "json":
        return
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    for file in _flat(files.values() if isinstance(files, dict) else files):
        if "://" in file or glob.has_magic(file):
            continue
        if not os.path.isfile(file):
            raise TaskFileError(f"{where}: data file {file} not found (a relative path is "
                                f"read from the current directory)")
        if file.endswith(".jsonl") and not cfg.get("process_docs"):
            _check_rows(file, cfg, where)


def _flat(files) -> list[str]:
    out = []
    for f in [files] if isinstance(files, str) else files:
        out += [f] if isinstance(f, str) else _flat(f)
    return out


def _check_rows(file: str, cfg: dict, where: str) -> None:
    """Every row holds the fields the task's templates read: lm-eval reads a template that
    names a column as that column, and renders any other as Jinja over the row's fields."""
    import jinja2
    from jinja2 import meta

    rows = read_rows(file)
    columns = set().union(*(r.keys() for r in rows))
    fields = {}
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        template = cfg.get(key)
        if not isinstance(template, str):
            continue
        try:
            names = {template} if template in columns else meta.find_undeclared_variables(
                jinja2.Environment().parse(template))
        except jinja2.TemplateSyntaxError as e:
            raise TaskFileError(f"{where}: {key} is not a Jinja template ({e.message})"
                                ) from None
        fields.update((n, f"task {cfg['task']}'s {key} reads it") for n in sorted(names)
                      if n not in fields)
    read_rows(file, fields)


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
