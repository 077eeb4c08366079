"""The lm-evaluation-harness model before and after batching, side by side in one run, on the
bundled tasks (`python -m mdm_jax.eval.tasks`: demo_cloze and demo_next_word, 200 questions
each, 400 in all) with the tiny MDM.

    python benchmarks/harness.py                       # trains or reuses runs/tiny_mdm
    python benchmarks/harness.py --limit 20 --mc-num 32      # a quick look
    python benchmarks/harness.py --before current --model RUN --tasks DIR --json

It prepares what is missing the way `launch/demo.sh` does (demo corpus, tokenizer, shards, the
tiny MDM in runs/tiny_mdm; then the bundled tasks in data_cache/tasks) and runs the harness
(`lm_eval.simple_evaluate`, the tasks' own metrics) on the same questions, same seeds:
  - before: `--before REV` (default: the commit before batching) is that commit's harness,
    extracted with `git archive`: every request alone, each chunk of draws in its own network
    call, a greedy check (a sampler run) for every loglikelihood request; `--before current`
    is this tree's harness one at a time (`request_batch=1,greedy_check=always`);
  - after: this tree's harness with its defaults: all requests together, grouped by length,
    each distinct mask scored once, the greedy check only where a metric reads it.
Each evaluation runs in a fresh process (compiles included, as in a user's run), in the order
after, before, after (the load of a shared machine drifts: the two afters are averaged), and
is timed whole (from a task index and imports made beforehand) and inside the model's request
methods. It prints seconds per question, the ratio (target >= 10) and the tasks' scores, and
exits non-zero unless the scores are identical and every request's log-likelihood agrees to
float rounding (the batched draws are the old ones).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data_cache")
TASKS = ("demo_cloze", "demo_next_word")
BEFORE = "eb26ea6"  # the last commit that scored requests one at a time



def evaluate(model_args: dict, tasks: str, limit: int | None) -> dict:
    """{"seconds", "model_seconds", "scores", "logprobs"} of one harness run over the bundled
    tasks (seconds: the whole evaluation, from a task index and imports made beforehand;
    model_seconds: in the model's request methods), with the mdm_jax that Python imports (a
    child process puts an old commit's first)."""
    import logging

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import torch  # noqa: F401  (lm-eval's own imports: before the clock)
    import transformers  # noqa: F401
    from absl import logging as absl_logging
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from mdm_jax.eval.harness import MDMJaxLM

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    lm = MDMJaxLM(**model_args)
    logprobs, model_seconds = [], [0.0]

    def timed(method, record=False):
        plain = getattr(type(lm), method)

        def run(requests, disable_tqdm=False):
            t = time.perf_counter()
            out = plain(lm, requests, disable_tqdm=True)
            model_seconds[0] += time.perf_counter() - t
            if record:
                logprobs.extend(float(lp) for lp, _ in out)
            return out

        setattr(lm, method, run)  # what lm-eval calls

    timed("loglikelihood", record=True)
    timed("generate_until")
    manager = TaskManager(include_path=tasks, include_defaults=False)
    t0 = time.perf_counter()
    r = evaluator.simple_evaluate(model=lm, tasks=list(TASKS), limit=limit,
                                  task_manager=manager)
    seconds = time.perf_counter() - t0
    scores = {f"{t} {k.split(',')[0]}": float(v) for t in TASKS
              for k, v in r["results"][t].items() if k.split(",")[0] in ("acc", "exact_match")}
    return {"seconds": seconds, "model_seconds": model_seconds[0], "scores": scores,
            "logprobs": logprobs}


def ensure_model_and_tasks(model: str, tasks: str) -> None:
    """The demo's data and tiny MDM (reused when there), then the bundled tasks."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sampling import ensure_data, ensure_trained

    from mdm_jax.eval.tasks import build

    if not os.path.isdir(model):
        ensure_data()
        ensure_trained("mdm", model)
    if not all(os.path.exists(os.path.join(tasks, f"{t}.yaml")) for t in TASKS):
        ensure_data()
        build(os.path.join(DATA, "demo_corpus"), tasks)


def child(job: list, rev: str | None = None) -> dict:
    """`evaluate(*job)` in a fresh process (cold, like a user's run), with this tree's
    mdm_jax or commit `rev`'s (extracted with git archive)."""
    with tempfile.TemporaryDirectory() as tree:
        if rev:
            archive = subprocess.run(["git", "-C", REPO, "archive", rev, "mdm_jax"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--evaluate",
                              json.dumps(job)], env={**os.environ, "PYTHONPATH": tree if rev
                                                     else REPO},
                             capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the harness of {rev or 'this tree'} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(REPO, "runs", "tiny_mdm"),
                   help="a run's workdir or an export folder (trained when missing)")
    p.add_argument("--tasks", default=os.path.join(DATA, "tasks"),
                   help="folder of the bundled tasks' YAML (built when missing)")
    p.add_argument("--limit", type=int, default=None, help="questions per task (all: 200)")
    p.add_argument("--mc-num", type=int, default=128)
    p.add_argument("--mc-batch-size", type=int, default=32, help="at most --mc-num")
    p.add_argument("--before", default=BEFORE,
                   help=f"a commit whose harness is the baseline (default {BEFORE}), or "
                        f"'current': this tree's, one request at a time")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--evaluate", help=argparse.SUPPRESS)  # a child's job
    a = p.parse_args(argv)
    if a.evaluate:
        return print(json.dumps(evaluate(*json.loads(a.evaluate))))

    model, tasks = os.path.abspath(a.model), os.path.abspath(a.tasks)
    ensure_model_and_tasks(model, tasks)
    draws = {"mc_num": a.mc_num, "mc_batch_size": min(a.mc_batch_size, a.mc_num)}
    new = [{"model": model, **draws}, tasks, a.limit]
    if a.before == "current":
        old = [{**new[0], "request_batch": 1, "greedy_check": "always"}, tasks, a.limit]
    else:  # that commit's model_args: `workdir`, and the greedy check on by default
        old = [{"workdir": model, **draws}, tasks, a.limit]
    # after, before, after: the load of a shared machine drifts; the afters are averaged
    afters = [child(new)]
    before = child(old, None if a.before == "current" else a.before)
    afters.append(child(new))
    after = {k: sum(r[k] for r in afters) / 2 for k in ("seconds", "model_seconds")}

    questions = (a.limit or 200) * len(TASKS)
    worst = max(abs(x - y) for r in afters
                for x, y in zip(before["logprobs"], r["logprobs"], strict=True))
    identical = all(before["scores"] == r["scores"] for r in afters) and worst < 1e-3
    result = {"questions": questions, "mc_num": a.mc_num, "model": model,
              "before": a.before, "before_s": before["seconds"], "after_s": after["seconds"],
              "after_runs_s": [r["seconds"] for r in afters],
              "before_s_per_question": before["seconds"] / questions,
              "after_s_per_question": after["seconds"] / questions,
              "ratio": before["seconds"] / after["seconds"],
              "before_model_s": before["model_seconds"], "after_model_s": after["model_seconds"],
              "model_ratio": before["model_seconds"] / after["model_seconds"],
              "scores_before": before["scores"], "scores_after": afters[0]["scores"],
              "requests": len(before["logprobs"]), "max_logprob_diff": worst,
              "identical": identical, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{questions} questions ({', '.join(TASKS)}), {model}, mc_num {a.mc_num}")
        print(f"{'':<20}{'seconds':>9}{'s/question':>12}{'in model':>10}  scores")
        rows = [(f"before ({a.before})", before), ("after (batched)", afters[0]),
                ("after, again", afters[1])]
        for side, r in rows:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r["scores"].items())
            print(f"{side:<20}{r['seconds']:>9.1f}{r['seconds'] / questions:>12.4f}"
                  f"{r['model_seconds']:>10.1f}  {shown}")
        print(f"ratio before / mean after: {result['ratio']:.1f}x (target >= 10; in the model "
              f"{result['model_ratio']:.1f}x); scores identical: {'yes' if identical else 'NO'} "
              f"(largest log-likelihood difference {worst:.1e} over {result['requests']} "
              f"requests)")
    if not identical:
        raise SystemExit("the batched harness scored differently from the baseline")


if __name__ == "__main__":
    main()
