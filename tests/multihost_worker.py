"""One process of a localhost multi-process run (started by test_multihost.py).

argv: process_id num_processes port workdir train_dir steps. Prints one JSON line with the
process index and its logged losses.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
pid, nproc, port, workdir, train_dir, steps = sys.argv[1:7]
os.environ.update(MDM_JAX_COORDINATOR=f"127.0.0.1:{port}", MDM_JAX_NUM_PROCESSES=nproc,
                  MDM_JAX_PROCESS_ID=pid)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import nano_config  # noqa: E402

from mdm_jax import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402

from mdm_jax.train import train  # noqa: E402

c = nano_config(**{"data.train_dir": train_dir, "data.eval_dir": "", "workdir": workdir,
                   "steps": int(steps), "log_every": 1, "checkpoint_every": 3,
                   "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
result = train(c)
print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                              "devices": jax.device_count(),
                              "losses": [h["loss"] for h in result.history]}), flush=True)
