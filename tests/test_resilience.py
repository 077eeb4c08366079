"""Checkpoints: retention, resharding restores, preemption, crash safety, faults, resume errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nano_config

from mdm_jax.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings
from mdm_jax.errors import UserError
from mdm_jax.train import check_resume, train
from mdm_jax.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tiny_data, workdir, **overrides):
    base = {"data.train_dir": tiny_data["train"], "data.eval_dir": "",
            "data.tokenizer": tiny_data["tokenizer"], "workdir": str(workdir)}
    return nano_config(**{**base, **overrides})


def _leaves(tree):
    return jax.tree_util.tree_leaves(jax.device_get(tree))


def test_retention_keeps_last_k_and_every_mth(tiny_data, tmp_path):
    c = _config(tiny_data, tmp_path, steps=12, checkpoint_every=2, checkpoint_keep=2,
                checkpoint_keep_period=4, log_every=4)
    train(c)
    assert Checkpointer(str(tmp_path)).all_steps() == [4, 8, 10, 12]
    meta = Checkpointer(str(tmp_path)).read_json(12, "meta")
    assert meta["preset"] == "nano" and meta["versions"]["jax"] == jax.__version__


@pytest.mark.parametrize("mesh", [(2, 1, 1), (1, 1, 1)])
def test_restore_onto_a_smaller_mesh(tmp_path_factory, mesh):
    """Saved sharded over 8 devices (2, 2, 2); restored on 2 devices and on 1."""
    workdir = tmp_path_factory.mktemp("reshard")
    big = Trainer(nano_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    state = big.create_state(7)
    ckpt = Checkpointer(str(workdir))
    it = iter(grain.MapDataset.range(4).to_iter_dataset())  # any Grain iterator will do
    ckpt.save(1, state, it, {"model": {}}, force=True)
    ckpt.close()

    n = int(np.prod(mesh))
    small = Trainer(nano_config(**{"mesh.data": mesh[0], "mesh.fsdp": mesh[1],
                                   "mesh.tensor": mesh[2]}), devices=jax.devices()[:n])
    target = abstract_with_shardings(small.abstract_state, small.state_sharding)
    restored = Checkpointer(str(workdir)).restore(1, target)
    assert restored.params["blocks"]["w1"].sharding.mesh.size == n
    for a, b in zip(_leaves(restored), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def _write_config_file(path, overrides: dict) -> str:
    lines = ["import sys", f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})",
             "from conftest import nano_config", "def get_config():",
             f"    return nano_config(**{overrides!r})"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _launch(config_file, *extra, env=None):
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mdm_jax.train", f"--config={config_file}",
                             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_metrics(workdir, proc, rows: int, timeout: float = 240.0) -> None:
    """Block until the run has logged `rows` training steps (a real event, not a guess)."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for line in f if '"loss"' in line) >= rows:
                    return
        time.sleep(0.2)
    raise AssertionError("training did not log in time")


def _overrides(tiny_data, workdir, **extra):
    base = {"data.train_dir": tiny_data["train"], "data.eval_dir": "",
            "data.tokenizer": tiny_data["tokenizer"], "workdir": str(workdir), "log_every": 1,
            "steps": 100000, "checkpoint_every": 1000}
    return {**base, **extra}


def test_sigterm_finishes_the_step_saves_and_exits_zero(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    config_file = _write_config_file(tmp_path / "cfg.py", _overrides(tiny_data, workdir))
    proc = _launch(config_file)
    _wait_for_metrics(workdir, proc, rows=3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted (SIGTERM)" in out
    steps = Checkpointer(str(workdir)).all_steps()
    logged = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == [logged[-1]] and steps[0] >= 3  # the step in flight was finished and saved
    resumed = train(_config(tiny_data, workdir, steps=steps[0] + 2, log_every=1))
    assert [h["step"] for h in resumed.history] == [steps[0] + 1, steps[0] + 2]


def test_a_restart_loads_its_compiled_step_from_the_workdir_cache(tiny_data, tmp_path):
    """config.compile_cache_dir "" (the default) keeps XLA's cache in WORKDIR/xla_cache, so
    a run restarted after a preemption loads the step it compiled the first time."""
    workdir = tmp_path / "run"
    # (empty, not unset: the config file imports conftest, which would set the test session's)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="")
    config_file = _write_config_file(tmp_path / "cfg.py", _overrides(tiny_data, workdir))
    compiled = []
    for _ in range(2):  # start, preempted after the compile; restart, preempted again
        proc = _launch(config_file, env=env)
        lines = iter(proc.stdout.readline, "")
        compiled.append(next(x for x in lines if "train step compiled in" in x).strip())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    assert "(from the compile cache)" not in compiled[0], compiled
    assert "(from the compile cache)" in compiled[1], compiled
    assert any((workdir / "xla_cache").iterdir())
    print("first start / restart:", compiled)


def test_sigkill_during_async_saves_resumes_from_a_complete_checkpoint(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    config_file = _write_config_file(tmp_path / "cfg.py",
                                     _overrides(tiny_data, workdir, checkpoint_every=1,
                                                checkpoint_keep=50))
    proc = _launch(config_file)
    _wait_for_metrics(workdir, proc, rows=6)
    proc.kill()  # SIGKILL: no handler runs; a save may be half written
    proc.communicate(timeout=60)
    complete = Checkpointer(str(workdir)).all_steps()
    assert complete, "at least one checkpoint should have completed"
    resumed = train(_config(tiny_data, workdir, steps=complete[-1] + 1, log_every=1))
    assert resumed.history[0]["step"] == complete[-1] + 1
    assert not [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d and
                d.split(".")[0] == str(complete[-1] + 1)]


@pytest.fixture()
def two_checkpoints(tiny_data, tmp_path):
    c = _config(tiny_data, tmp_path, steps=25, checkpoint_every=10, log_every=5)
    first = train(c, stop_at=10)
    train(c, stop_at=20)
    return c, first


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_is_reported_and_skipped(two_checkpoints, damage, caplog):
    c, first = two_checkpoints
    state_dir = os.path.join(c.workdir, "checkpoints", "20", "state")
    victims = [os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files
               if os.path.getsize(os.path.join(root, f)) > 0]
    for path in victims:
        if damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        else:
            os.remove(path)
    with caplog.at_level("WARNING", logger="mdm_jax"):
        resumed = train(c)
    assert f"checkpoint 20 under {c.workdir}/checkpoints is damaged" in caplog.text
    assert resumed.history[0]["step"] == 15  # continued from step 10
    straight = train(_config({"train": c.data.train_dir, "tokenizer": c.data.tokenizer},
                             c.workdir + "_straight", steps=25, log_every=5))
    for a, b in zip(_leaves(resumed.state.params), _leaves(straight.state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unwritable_workdir_is_a_clear_error(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot write to the workdir .*a_file"):
        train(_config(tiny_data, blocker / "run"))


def test_incompatible_resume_names_the_fields(tiny_data, tmp_path):
    train(_config(tiny_data, tmp_path, steps=2, log_every=1))
    with pytest.raises(CheckpointError, match=r"seq_len: checkpoint 64 vs config 32.*workdir"):
        # a 32-token run would also need 32-token data; the checkpoint check comes first
        check_resume(Checkpointer(str(tmp_path)), {
            "model": {"preset": "nano", "vocab_size": 512}, "seq_len": 32,
            "objective": {"kind": "mdm"}})
    with pytest.raises(CheckpointError, match=r"model\.preset: checkpoint 'nano' vs config"):
        train(_config(tiny_data, tmp_path, steps=4, **{"model.preset": "tiny",
                                                      "model.vocab_size": 512}))


def _poisoned(trainer, seed=0):
    """A state whose embedding row 5 is NaN: any batch containing token 5 gives a NaN loss."""
    state = trainer.create_state(seed)
    emb = state.params["embedding"]
    params = dict(state.params, embedding=jax.device_put(emb.at[5].set(jnp.nan), emb.sharding))
    return state.replace(params=params)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_steps_never_reach_the_parameters(policy):
    trainer = Trainer(nano_config(nonfinite=policy, **{"mesh.data": 2,
                                                       "optim.warmup_steps": 0}))
    state = _poisoned(trainer)
    rng = np.random.default_rng(0)
    clean = rng.integers(6, 512, (16, 65)).astype(np.int32)
    poison = clean.copy()
    poison[0, 3] = 5
    before = _leaves(state.params)
    with trainer.context():
        state, m = trainer.step(state, trainer.to_global(poison))
        assert int(m["nonfinite"]) == 1 and int(state.skipped) == 1
        for a, b in zip(_leaves(state.params), before, strict=True):
            np.testing.assert_array_equal(a, b)
        state, m = trainer.step(state, trainer.to_global(clean))
    assert int(m["nonfinite"]) == 0 and int(state.skipped) == 1 and int(state.step) == 2
    changed = any(not np.array_equal(a, b, equal_nan=True)
                  for a, b in zip(_leaves(state.params), before, strict=True))
    assert changed == (policy == "skip")  # "stop" freezes the state until the host stops
    assert bool(state.halted) == (policy == "stop")


def test_nonfinite_stop_policy_ends_the_run_with_the_good_state_saved(tiny_data, tmp_path):
    # An absurd learning rate makes step 2's loss non-finite after a finite step 1.
    c = _config(tiny_data, tmp_path, steps=50, log_every=1, nonfinite="stop",
                **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.grad_clip": 1e30})
    result = train(c)
    assert result.stopped == "nonfinite"
    saved = Checkpointer(str(tmp_path)).all_steps()
    assert saved == [int(result.state.step)] and saved[0] < 50
    assert all(np.isfinite(x).all() for x in _leaves(result.state.params))
