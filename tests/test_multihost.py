"""A real 2-process jax.distributed run on localhost (CPU devices, gloo collectives)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from conftest import nano_config

from mdm_jax.train import train

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
STEPS = 6


@pytest.fixture(scope="module")
def two_process_run(tiny_data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("multihost"))
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port), workdir,
                               tiny_data["train"], str(STEPS)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outputs = [p.communicate(timeout=420)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    results = [json.loads(line[len("RESULT "):]) for out in outputs
               for line in out.splitlines() if line.startswith("RESULT ")]
    return workdir, sorted(results, key=lambda r: r["process"])


def test_two_processes_match_one_process_on_the_same_mesh(two_process_run, tiny_data, tmp_path):
    _, results = two_process_run
    assert [(r["process"], r["processes"], r["devices"]) for r in results] == [(0, 2, 8),
                                                                               (1, 2, 8)]
    assert results[0]["losses"] == results[1]["losses"]  # one global computation
    single = train(nano_config(**{"data.train_dir": tiny_data["train"], "data.eval_dir": "",
                                  "workdir": str(tmp_path), "steps": STEPS, "log_every": 1,
                                  "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    np.testing.assert_allclose(results[0]["losses"], [h["loss"] for h in single.history],
                               rtol=2e-5)


def test_two_process_checkpoint_restores_in_one_process(two_process_run, tiny_data):
    workdir, _ = two_process_run
    resumed = train(nano_config(**{"data.train_dir": tiny_data["train"], "data.eval_dir": "",
                                   "workdir": workdir, "steps": STEPS + 2, "log_every": 1}))
    assert [h["step"] for h in resumed.history] == [STEPS + 1, STEPS + 2]


def test_sigterm_to_one_host_saves_the_same_step_on_every_host(tiny_data, tmp_path):
    """A preemption notice reaches one host only: JAX's sync point makes both processes stop
    after the same step, save it together and exit with config.preemption_exit_code."""
    config = tmp_path / "cfg.py"
    config.write_text(
        f"import sys\nsys.path.insert(0, {os.path.dirname(WORKER)!r})\n"
        "from conftest import nano_config\n\n"
        "def get_config():\n"
        "    return nano_config(**{"
        f"'data.train_dir': {tiny_data['train']!r}, 'data.eval_dir': '', "
        f"'workdir': {str(tmp_path / 'run')!r}, 'steps': 500, 'log_every': 1, "
        "'checkpoint_every': 1000, 'preemption_exit_code': 42, "
        "'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})\n")
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               MDM_JAX_COORDINATOR=f"127.0.0.1:{port}", MDM_JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-m", "mdm_jax.train", f"--config={config}"],
                              env=dict(env, MDM_JAX_PROCESS_ID=str(i)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    end = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs) and time.monotonic() < end
        time.sleep(0.2)  # polling the run's progress
    procs[1].send_signal(signal.SIGTERM)  # the host that is not the coordinator
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [42, 42], outs[0][-2000:] + outs[1][-2000:]
    saved = re.search(r"preempted \(SIGTERM\): saved step (\d+)", outs[0])
    assert saved, outs[0][-2000:]
    step = int(saved.group(1))
    assert 3 <= step < 500
    assert sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints")
                  if d.isdigit()) == [step]


def test_relative_workdir_with_several_processes_is_refused(tiny_data, tmp_path):
    """Each host would resolve a relative workdir on its own disk: every process stops with
    one line naming the fix before anything is written."""
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               MDM_JAX_COORDINATOR=f"127.0.0.1:{port}", MDM_JAX_NUM_PROCESSES="2")
    tiny = os.path.join(os.path.dirname(os.path.dirname(WORKER)), "experiments", "tiny.py")
    args = [sys.executable, "-m", "mdm_jax.train", f"--config={tiny}",
            "--config.workdir=runs/relative", f"--config.data.train_dir={tiny_data['train']}",
            "--config.data.eval_dir=", "--config.seq_len=64", "--config.model.preset=nano"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=dict(env, MDM_JAX_PROCESS_ID=str(i)),
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1].startswith(
            "error: storage: config.workdir='runs/relative' is relative, but this run has 2 "
            "processes"), err[-2000:]
    assert not (tmp_path / "runs").exists()
