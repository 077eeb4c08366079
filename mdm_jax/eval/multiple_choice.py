"""Multiple-choice accuracy straight from the likelihood estimators (no harness), for the
bundled `demo_cloze`-style JSONL ({"context", "choices", "answer"} per line): what training
logs beside the validation ELBO when `config.data.eval_tasks` names such files."""

from __future__ import annotations

import os

import numpy as np

from mdm_jax.eval.likelihood import Estimator, EvalError, loglikelihoods
from mdm_jax.eval.tasks import read_rows


def read_questions(path: str, limit: int = 0) -> list[dict]:
    need = "a multiple-choice row needs context, choices and answer"
    rows = read_rows(path, dict.fromkeys(("context", "choices", "answer"), need))
    bad = [i for i, r in enumerate(rows, 1) if not (
        isinstance(r["context"], str) and isinstance(r["choices"], list)
        and isinstance(r["answer"], int) and 0 <= r["answer"] < len(r["choices"]))]
    if bad:
        raise EvalError(f"task file {path} row {bad[0]}: needs a \"context\" string, a "
                        f"\"choices\" list and an \"answer\" index into the choices")
    return rows[:limit] if limit else rows


def accuracy(model, params, tokenizer, questions: list[dict], estimator: Estimator,
             max_length: int, seed: int = 0, request_batch: int = 16) -> float:
    """The fraction of questions whose highest-scoring choice is the answer; each choice is
    tokenized with its context and split at the context's tokens, after a BOS, and choice k
    draws from seed + k. Every choice of every question is scored in one batched run."""
    requests, seeds = [], []
    for q in questions:
        ctx = tokenizer.encode(q["context"])
        for k, choice in enumerate(q["choices"]):
            whole = tokenizer.encode(q["context"] + choice)
            c = ctx if whole[:len(ctx)] == ctx else ctx[:-1]
            requests.append(([tokenizer.bos_id] + c, whole[len(c):]))
            seeds.append(seed + k)
    scores = iter(loglikelihoods(model, params, requests, estimator, seeds, max_length,
                                 request_batch))
    hits = 0
    for q in questions:
        logprobs = [next(scores).logprob for _ in q["choices"]]
        hits += int(np.argmax(logprobs)) == q["answer"]
    return hits / len(questions)


def task_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
