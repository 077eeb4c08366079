"""Safeguards of the trainer and export: damaged checkpoints set aside, folders never
overwritten by surprise, mismatched resumes refused, one trainer per workdir, non-finite steps
kept out of the saved state, and command-line mistakes as one line naming the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import nano_config, trainer_process

from mdm_jax.checkpoint import Checkpointer, CheckpointError
from mdm_jax.config import ConfigError, validate
from mdm_jax.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tiny_data, workdir, **overrides):
    base = {"data.train_dir": tiny_data["train"], "data.eval_dir": "",
            "data.tokenizer": tiny_data["tokenizer"], "workdir": str(workdir)}
    return nano_config(**{**base, **overrides})


def _truncate_data_files(state_dir: str) -> None:
    """Cut every OCDBT data file in half (params and optimizer state both lose arrays; which
    arrays land in which file varies from save to save)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f) + os.sep or r.endswith(os.sep + "d")]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def test_damaged_newest_checkpoint_is_set_aside_and_written_again(tiny_data, tmp_path):
    from mdm_jax.export.tensor_io import ExportError
    from mdm_jax.export.writer import export

    c = _config(tiny_data, tmp_path / "run", steps=8, checkpoint_every=2, log_every=2)
    train(c)
    _truncate_data_files(str(tmp_path / "run" / "checkpoints" / "8" / "state"))
    # Export names the damaged step and the good ones (and leaves no half-written folder).
    with pytest.raises(ExportError, match=r"checkpoint 8 .* is damaged.*pass --step 6"):
        export(str(tmp_path / "run"), "litgpt", str(tmp_path / "exp"), step=8)
    assert not os.path.exists(tmp_path / "exp")
    from mdm_jax.inference import load

    assert load(str(tmp_path / "run")).step == 6  # sampling falls back, with a warning
    resumed = train(c)  # skips 8, resumes at 6, trains 7..8 and must save 8 again
    assert [h["step"] for h in resumed.history] == [8]
    aside = os.listdir(tmp_path / "run" / "checkpoints_damaged")
    assert len(aside) == 1 and aside[0].startswith("8-")  # kept, not deleted
    export(str(tmp_path / "run"), "litgpt", str(tmp_path / "exp"))  # step 8 reads again
    assert json.loads((tmp_path / "exp" / "mdm_jax.json").read_text())["step"] == 8


def test_reexport_refuses_a_full_folder_and_overwrite_leaves_no_stale_shards(tiny_data,
                                                                           tmp_path):
    from mdm_jax.export.load import import_checkpoint
    from mdm_jax.export.tensor_io import ExportError
    from mdm_jax.export.writer import export

    c = _config(tiny_data, tmp_path / "run", steps=4, checkpoint_every=2, checkpoint_keep=5)
    train(c)
    out = tmp_path / "llada"
    export(str(tmp_path / "run"), "llada-hf", str(out), step=2, max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    with pytest.raises(ExportError, match="already holds files.*--overwrite"):
        export(str(tmp_path / "run"), "llada-hf", str(out), step=4)
    export(str(tmp_path / "run"), "llada-hf", str(out), step=4, overwrite=True)
    assert not (out / "model.safetensors.index.json").exists()  # step 2's shards are gone
    assert [p.name for p in out.glob("model*.safetensors")] == ["model.safetensors"]
    assert import_checkpoint("llada-hf", str(out), str(tmp_path / "back")) == 4
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def other_tokenizer_data(tiny_data, tmp_path_factory):
    """The same raw corpus prepared with a second (384-piece) tokenizer."""
    from pathlib import Path

    from mdm_jax.data import prepare, train_tokenizer

    root = tmp_path_factory.mktemp("other_tok")
    raw = Path(tiny_data["train"]).parent / "raw"
    tok = train_tokenizer.train_tokenizer([str(raw / "train")], str(root / "tok"), 384)
    out = {"tokenizer": str(tok)}
    for split in ("train", "validation"):
        prepare.prepare(raw, root / split, tok, split=split, seq_len=64)
        out[split] = str(root / split)
    return out


def test_a_tokenizer_mismatch_is_an_error_naming_both(tiny_data, other_tokenizer_data, tmp_path):
    with pytest.raises(ConfigError, match=r"different tokenizers: config\.data\.tokenizer=.*"
                                          r"other_tok.*prepared with"):
        train(_config(tiny_data, tmp_path / "a", steps=2,
                      **{"data.tokenizer": other_tokenizer_data["tokenizer"]}))
    with pytest.raises(ConfigError, match="different tokenizers"):
        train(_config(tiny_data, tmp_path / "b", steps=2, eval_every=1,
                      **{"data.eval_dir": other_tokenizer_data["validation"]}))
    # Resuming a checkpoint on data tokenized otherwise.
    train(_config(tiny_data, tmp_path / "c", steps=2))
    with pytest.raises(CheckpointError, match=r"trained on data tokenized with .*tok\.model"):
        train(_config(other_tokenizer_data, tmp_path / "c", steps=4))


def test_resuming_with_another_global_batch_is_refused(tiny_data, tmp_path):
    train(_config(tiny_data, tmp_path, steps=2))
    with pytest.raises(CheckpointError, match=r"global_batch=8: it was trained with "
                                              r"global_batch=16.*--config\.global_batch=16"):
        train(_config(tiny_data, tmp_path, steps=4, global_batch=8))


def test_a_halted_run_continues_from_its_last_good_state(tiny_data, tmp_path):
    """A checkpoint saved halted (nonfinite="stop" froze it after a non-finite step) resumes
    from its good parameters instead of stopping again. The halted save is made directly: a
    real divergence (an absurd lr) also ruins the last finite parameters, and such a resume is
    rightly refused (next test)."""
    import jax
    import jax.numpy as jnp

    from mdm_jax.checkpoint import abstract_with_shardings
    from mdm_jax.trainer import Trainer, resolved_config

    c = _config(tiny_data, tmp_path, steps=2, log_every=1, nonfinite="stop")
    first = train(c)
    trainer = Trainer(c)
    ckpt = Checkpointer(str(tmp_path))
    target = abstract_with_shardings(trainer.abstract_state, trainer.state_sharding)
    state = ckpt.restore(2, target)
    halted = state.replace(halted=jax.device_put(jnp.ones((), jnp.bool_), state.halted.sharding),
                           step=state.step + 1)
    ckpt.save(3, halted, None, resolved_config(c, trainer), {"preset": "nano"}, force=True)
    ckpt.close()
    resumed = train(_config(tiny_data, tmp_path, steps=6, log_every=1, nonfinite="skip"))
    assert resumed.stopped is None and int(resumed.state.step) == 6
    assert not bool(resumed.state.halted) and int(resumed.state.skipped) == 0
    assert all(np.isfinite(h["loss"]) for h in resumed.history) and first.history


def test_a_resumed_run_whose_steps_are_all_nonfinite_saves_nothing(tiny_data, tmp_path):
    """Garbage-but-finite parameters (here: after an absurd learning rate) make every resumed
    step non-finite: the run stops before its first save, so earlier checkpoints survive."""
    bad = {"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.grad_clip": 1e30}
    halted = train(_config(tiny_data, tmp_path, steps=30, log_every=1, nonfinite="stop", **bad))
    stop = int(halted.state.step)
    before = Checkpointer(str(tmp_path)).all_steps()
    with pytest.raises(CheckpointError, match=rf"\d+ of the \d+ steps since resuming from "
                                              rf".*/{stop} had a non-finite"):
        train(_config(tiny_data, tmp_path, steps=stop + 4, log_every=1, checkpoint_every=2))
    assert Checkpointer(str(tmp_path)).all_steps() == before


def test_a_second_trainer_on_a_workdir_is_refused_and_a_killed_one_leaves_no_lock(tiny_data,
                                                                                tmp_path):
    first = trainer_process(tiny_data, tmp_path, 2000, 5)
    metrics = tmp_path / "metrics.jsonl"
    end = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 7):
        assert first.poll() is None and time.monotonic() < end
        time.sleep(0.2)  # polling the first trainer's progress
    second = trainer_process(tiny_data, tmp_path, 2000, 5)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(
        f"error: another trainer is using {tmp_path} ({{\"pid\": {first.pid}")
    first.send_signal(signal.SIGKILL)  # no clean-up at all: the kernel drops the lock
    first.communicate()
    saved = max(Checkpointer(str(tmp_path)).all_steps())
    third = trainer_process(tiny_data, tmp_path, saved + 2, 5)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-2000:]
    # Rows the killed run logged after its last checkpoint were dropped: one row per step.
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, saved + 3))


@pytest.mark.parametrize("field, value", [("log_every", 0), ("eval_every", 0),
                                          ("checkpoint_every", -1), ("samples.steps", 0),
                                          ("data.eval_batches", -1), ("optim.b2", 1.5)])
def test_numeric_fields_are_checked_before_compiling(field, value):
    with pytest.raises(ConfigError, match=rf"config\.{field}={value} must be a number in"):
        validate(nano_config(**{field: value}), 8)


@pytest.mark.parametrize("args, needle", [
    (["--config=nope.py"], "--config=nope.py: no such file 'nope.py'"),
    (["--config=experiments/tiny.py", "--config.optim.lrr=1"], 'Did you mean "lr"'),
    (["--config=experiments/tiny.py:bogus"],
     "config.objective.kind='bogus'; valid: mdm, mdm-ce, uniform, eso, arm"),
    (["--config=experiments/tiny.py", "--config.log_every=0"], "config.log_every=0 must be"),
    (["--config=experiments/tiny.py", "--config.data.train_dir=/nonexistent"],
     "config.data.train_dir: /nonexistent is not a prepared data directory"),
    (["--config=experiments/tiny.py", "--config.data.train_dir=a:0,b:1"],
     "weight of 'a' must be a positive number"),
])
def test_train_cli_errors_are_one_line(args, needle, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mdm_jax.train", *args,
                          f"--config.workdir={tmp_path}/w"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


def test_export_cli_errors_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for args, needle in (
            (["--model", str(tmp_path / "none"), "--format", "litgpt", "--out",
              str(tmp_path / "o")], "is not an mdm_jax run"),
            (["--model", str(tmp_path), "--format", "litgpt", "--out", str(tmp_path / "o"),
              "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
            (["--model", str(tmp_path), "--format", "litgpt", "--out",
              str(tmp_path / "a_file")], "is a file; give a folder"),
            (["--model", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "o")],
             "--format")):
        out = subprocess.run([sys.executable, "-m", "mdm_jax.export", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
        assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
