"""A real 2-process jax.distributed run on localhost (CPU devices, gloo collectives)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest
from conftest import nano_config

from mdm_jax.train import train

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
