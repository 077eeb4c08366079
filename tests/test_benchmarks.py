"""The benchmarks run end to end on a tiny setting (they are run by hand for the figures)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_train_step_benchmark_times_jax_and_the_torch_reference_alternately():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--preset", "nano", "--seq-len", "64",
         "--batch", "4", "--steps", "2", "--warmup", "1", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert len(r["step_times_s"]) == len(r["torch_step_times_s"]) == 2
    assert r["jax_over_torch"] > 0 and r["jax_over_torch_paired"] > 0
    for loss in (r["final_loss"], r["torch_final_loss"]):  # both trained, neither diverged
        assert math.isfinite(loss) and loss > 0


def test_harness_benchmark_scores_the_same_one_at_a_time_and_batched(tiny_data, tmp_path):
    from conftest import nano_config

    from mdm_jax.eval.tasks import build
    from mdm_jax.train import train

    build(os.path.join(os.path.dirname(tiny_data["train"]), "raw"), str(tmp_path / "tasks"),
          n=4)
    train(nano_config(**{"data.train_dir": tiny_data["train"], "data.eval_dir": "",
                         "data.tokenizer": tiny_data["tokenizer"],
                         "workdir": str(tmp_path / "run"), "steps": 2, "checkpoint_every": 2,
                         "samples.count": 0}))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "benchmarks/harness.py", "--before", "current", "--model",
         str(tmp_path / "run"), "--tasks", str(tmp_path / "tasks"), "--limit", "3",
         "--mc-num", "8", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["identical"] and r["questions"] == 6 and r["requests"] == 12  # 3 x 4 choices
    assert r["before_s"] > 0 and r["after_s"] > 0 and r["ratio"] > 0
    assert set(r["scores_after"]) == {"demo_cloze acc", "demo_next_word exact_match"}
