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


# The reference projects' checkouts (benchmarks/fetch_references.sh): the benchmarks against
# their own code run where they are, and are skipped where they are not.
REFERENCES = os.environ.get("MDM_JAX_REFERENCES", os.path.join(REPO, "..", "references"))
needs_smdm = pytest.mark.skipif(
    not os.path.isfile(os.path.join(REFERENCES, "SMDM", "lit_gpt", "diffmodel.py")),
    reason="no SMDM checkout: bash benchmarks/fetch_references.sh ../references")
needs_llada = pytest.mark.skipif(
    not os.path.isfile(os.path.join(REFERENCES, "LLaDA", "generate.py")),
    reason="no LLaDA checkout: bash benchmarks/fetch_references.sh ../references")


def _bench(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, check=check)


@needs_smdm
def test_train_step_benchmark_times_ours_and_smdms_own_step_alternately():
    r = json.loads(_bench(
        ["benchmarks/train_step.py", "--preset", "nano", "--seq-len", "64", "--batch", "4",
         "--steps", "2", "--warmup", "1", "--smdm", os.path.join(REFERENCES, "SMDM"),
         "--json"]).stdout)
    assert set(r["smdm"]) == {"tuned", "system"}  # SMDM under both allocator settings
    for m in r["smdm"].values():
        assert len(r["step_times_s"]) == len(m["step_times_s"]) == 2
        assert m["ours_over_smdm"] > 0 and m["ours_over_smdm_paired"] > 0
        for loss in (r["final_loss"], m["final_loss"]):  # both trained, neither diverged
            assert math.isfinite(loss) and loss > 0
    assert "load average" in r["machine"] and r["others_cores"] >= 0


def test_reference_benchmarks_refuse_a_missing_checkout_in_one_line(tmp_path):
    for args in (["benchmarks/train_step.py", "--smdm", str(tmp_path)],
                 ["benchmarks/likelihood.py", "--llada", str(tmp_path)],
                 ["benchmarks/sampling.py", "--llada", str(tmp_path)]):
        out = _bench(args, check=False)
        assert out.returncode == 2, out.stderr
        line, = out.stderr.strip().splitlines()
        assert line.startswith("error: --") and "fetch_references.sh" in line


def test_quiet_check_sees_other_processes_and_withholds_the_ratio():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from references import Quiet, ratio_text

    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    with Quiet() as quiet:  # another process burns one core while this one waits
        subprocess.run([sys.executable, "-c", spin], check=True)
    assert quiet.others_cores > 0.6 and quiet.busy
    assert "BUSY" in quiet.line()
    assert ratio_text(1.5, True, False).startswith("withheld")
    assert "BUSY" in ratio_text(1.5, True, True) and ratio_text(1.5, False, False) == "1.500"


@pytest.fixture(scope="module")
def nano_mdm(tiny_data, tmp_path_factory):
    from conftest import nano_config

    from mdm_jax.train import train

    run = tmp_path_factory.mktemp("bench") / "nano_mdm"
    train(nano_config(**{"data.train_dir": tiny_data["train"], "data.eval_dir": "",
                         "data.tokenizer": tiny_data["tokenizer"], "workdir": str(run),
                         "steps": 2, "checkpoint_every": 2, "samples.count": 0}))
    return str(run), os.path.join(os.path.dirname(tiny_data["train"]), "raw", "validation")


@needs_llada
def test_likelihood_benchmark_agrees_with_lladas_own_estimator(nano_mdm):
    run, text = nano_mdm
    r = json.loads(_bench(
        ["benchmarks/likelihood.py", "--llada", os.path.join(REFERENCES, "LLaDA"), "--model",
         run, "--text", text, "--pairs", "2", "--context", "6", "--continuation", "4",
         "--mc-num", "32", "--reps", "1", "--json"]).stdout)
    assert r["agree"] and len(r["llada_estimates"]) == len(r["mdm_jax_estimates"]) == 2
    assert all(e < 0 for e in r["llada_estimates"] + r["mdm_jax_estimates"])
    assert r["ratio"] > 0 and os.path.isfile(run + "_llada_hf/config.json")


@needs_llada
def test_sampling_benchmark_gives_lladas_tokens(nano_mdm):
    run, text = nano_mdm
    r = json.loads(_bench(
        ["benchmarks/sampling.py", "--llada", os.path.join(REFERENCES, "LLaDA"), "--model",
         run, "--text", text, "--prompts", "2", "--prompt-length", "6", "--gen-length", "8",
         "--steps", "8", "--block-length", "4", "--reps", "1", "--json"]).stdout)
    assert [row["batch"] for row in r["rows"]] == [1, 2]
    assert all(row["identical"] and row["tokens_differing"] == 0 for row in r["rows"])


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
