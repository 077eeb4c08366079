"""The benchmarks run end to end on a tiny setting (they are run by hand for the figures)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO


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
