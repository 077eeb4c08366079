"""Multi-host start-up: what each cluster environment is detected as, a real 2-worker "TPU VM
slice" that joins through a local GCE metadata server, and failures that must not fall back to
one process.

Facts pinned here come from jax 0.10.2's own cluster detection (jax/_src/clusters): Slurm's
coordinator port is SLURM_JOB_ID % 4096 + 61440 on the step's first node; TPU slices use port
8482 on the first worker (or MEGASCALE_COORDINATOR_ADDRESS); the TPU VM metadata attributes are
agent-worker-number, worker-network-endpoints ("unknown:unknown:IP" triples or host names) and
tpu-env ("KEY: 'value'" lines); multislice ids are worker + slice * workers_per_slice.
TPU chips themselves cannot be detected here (no PCI vendor 0x1ae0 on this machine): the
decision takes `tpu_vm` as an input, and the subprocess tests name a metadata server through
GCE_METADATA_IP, which is how detection is switched on without chips.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import portpicker
import pytest

from mdm_jax.distributed import DistributedError, detect, first_slurm_host

SLURM_STEP = {"SLURM_JOB_ID": "12345", "SLURM_STEP_NODELIST": "gpu[003-006]",
              "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
              "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}


def test_slurm_one_task_per_node_owns_every_gpu_of_its_node():
    # jax's own auto-detection would give this process local_device_ids=[0]: 1 GPU of 8.
    cluster = detect(env=SLURM_STEP, tpu_vm=False)
    assert (cluster.environment, cluster.num_processes, cluster.process_id) == ("slurm", 4, 2)
    assert cluster.coordinator == f"gpu003:{12345 % 4096 + 61440}"
    assert cluster.local_device_ids is None


def test_slurm_several_tasks_per_node_get_one_device_each_and_env_overrides():
    env = dict(SLURM_STEP, SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_LOCALID="5",
               SLURM_STEP_NUM_TASKS="16")
    assert detect(env=env, tpu_vm=False).local_device_ids == (5,)
    env["JAX_LOCAL_DEVICE_IDS"] = "4,5"
    env["JAX_COORDINATOR_PORT"] = "7000"
    cluster = detect(env=env, tpu_vm=False)
    assert cluster.local_device_ids == (4, 5) and cluster.coordinator == "gpu003:7000"


def test_slurm_batch_script_outside_srun_is_one_process():
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert detect(env=env, tpu_vm=False).environment == "single"


@pytest.mark.parametrize("nodelist, first", [("node001", "node001"), ("a,b", "a"),
                                             ("gpu[003-009,012],cpu1", "gpu003"),
                                             ("n[7,9]", "n7")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_gke_tpu_and_multislice():
    env = {"TPU_WORKER_HOSTNAMES": "w-0.svc,w-1.svc,w-2.svc,w-3.svc", "TPU_WORKER_ID": "1"}
    c = detect(env=env, tpu_vm=False)
    assert (c.environment, c.num_processes, c.process_id, c.coordinator) == (
        "gke-tpu", 4, 1, "w-0.svc:8482")
    env.update(MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="1",
               MEGASCALE_COORDINATOR_ADDRESS="slice0-w0:8080")
    c = detect(env=env, tpu_vm=False)
    assert (c.num_processes, c.process_id, c.coordinator) == (8, 5, "slice0-w0:8482")
    # TPU_PROCESS_ADDRESSES wins over TPU_WORKER_HOSTNAMES, as in jax.
    c = detect(env=dict(env, TPU_PROCESS_ADDRESSES="p0:8471,p1:8471"), tpu_vm=False)
    assert c.num_processes == 4 and c.coordinator == "slice0-w0:8482"


def _metadata(worker: int, endpoints: str, tpu_env: str = "ACCELERATOR_TYPE: 'v5p-16'"):
    table = {"agent-worker-number": str(worker), "worker-network-endpoints": endpoints,
             "tpu-env": tpu_env}
    return table.get


def test_gce_tpu_vm_from_metadata():
    endpoints = "unknown:unknown:10.0.0.2,unknown:unknown:10.0.0.3"
    c = detect(env={}, tpu_vm=True, metadata=_metadata(1, endpoints))
    assert (c.environment, c.num_processes, c.process_id, c.coordinator) == (
        "gce-tpu", 2, 1, "10.0.0.2:8482")
    # Multislice settings from the metadata's tpu-env (queued resources).
    tpu_env = "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\nWORKER_ID: '1'"
    c = detect(env={}, tpu_vm=True, metadata=_metadata(1, "h0,h1", tpu_env))
    assert (c.num_processes, c.process_id, c.coordinator) == (4, 3, "h0:8482")
    # Not a TPU VM: the metadata server is never asked.
    asked = []
    assert detect(env={}, tpu_vm=False, metadata=asked.append).environment == "single"
    assert asked == []
    # A GCE VM that is not a TPU worker has no agent-worker-number.
    assert detect(env={}, tpu_vm=True, metadata=lambda key: None).environment == "single"


def test_explicit_settings_win_and_are_checked():
    env = dict(SLURM_STEP, MDM_JAX_COORDINATOR="h:1234", MDM_JAX_NUM_PROCESSES="3",
               MDM_JAX_PROCESS_ID="1")
    c = detect(env=env, tpu_vm=False)
    assert (c.environment, c.num_processes, c.process_id, c.coordinator) == (
        "mdm_jax", 3, 1, "h:1234")
    with pytest.raises(DistributedError, match="MDM_JAX_NUM_PROCESSES"):
        detect(env={"MDM_JAX_COORDINATOR": "h:1", "MDM_JAX_NUM_PROCESSES": "2",
                    "MDM_JAX_PROCESS_ID": "2"}, tpu_vm=False)
    with pytest.raises(DistributedError, match="TPU_WORKER_ID"):
        detect(env={"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "x"}, tpu_vm=False)


def _clean_env(**extra) -> dict:
    """This process's environment without anything that looks like a cluster."""
    prefixes = ("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "MDM_JAX_", "JAX_", "GCE_", "XLA_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    attributes: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        prefix = "/computeMetadata/v1/instance/attributes/"
        key = self.path[len(prefix):] if self.path.startswith(prefix) else None
        ok = self.headers.get("Metadata-Flavor") == "Google" and key in self.attributes
        body = self.attributes[key].encode() if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _metadata_server(worker: int, workers: int) -> http.server.HTTPServer:
    handler = type("Handler", (_MetadataHandler,), {"attributes": {
        "agent-worker-number": str(worker),
        "worker-network-endpoints": ",".join(["unknown:unknown:127.0.0.1"] * workers),
        "tpu-env": f"ACCELERATOR_TYPE: 'v5p-{8 * workers}'\nWORKER_ID: '{worker}'"}})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_check_joins_a_two_worker_tpu_vm_slice_through_the_metadata_server():
    """Two processes, each answered by its own worker's metadata server, find each other,
    join jax.distributed and run a collective; `--check` reports the slice."""
    servers = [_metadata_server(i, 2) for i in range(2)]
    port = portpicker.pick_unused_port()
    try:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "mdm_jax.distributed", "--check", "--json"],
            env=_clean_env(GCE_METADATA_IP=f"127.0.0.1:{s.server_port}",
                           JAX_COORDINATOR_PORT=str(port),
                           XLA_FLAGS="--xla_force_host_platform_device_count=2"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in servers]
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for s in servers:
            s.shutdown()
    reports = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        reports.append(json.loads(out))  # stdout holds the report only (Gloo -> stderr)
    for i, r in enumerate(reports):
        assert r["environment"] == "gce-tpu" and r["problems"] == []
        assert (r["process_index"], r["process_count"]) == (i, 2)
        assert (r["local_devices"], r["global_devices"]) == (2, 4)
        assert r["coordinator"] == f"127.0.0.1:{port}" and r["collective"] == "ok"


def test_failed_join_is_an_error_not_a_single_process_run(tmp_path):
    """Worker 1 of a 2-host GKE slice whose coordinator never answers: the trainer stops with
    one line instead of training alone."""
    port = portpicker.pick_unused_port()
    out = subprocess.run(
        [sys.executable, "-m", "mdm_jax.train", "--config=experiments/tiny.py",
         f"--config.workdir={tmp_path}/run"],
        env=_clean_env(TPU_WORKER_HOSTNAMES="127.0.0.1,127.0.0.1", TPU_WORKER_ID="1",
                       JAX_COORDINATOR_PORT=str(port), MDM_JAX_INIT_TIMEOUT="3"),
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: multi-host start-up: gke-tpu expects 2 processes"), last
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_check_single_process_and_bad_environment():
    out = subprocess.run([sys.executable, "-m", "mdm_jax.distributed", "--check", "--json"],
                         env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["environment"], report["process_count"]) == ("single", 1)
    bad = subprocess.run([sys.executable, "-m", "mdm_jax.distributed", "--check"],
                         env=_clean_env(MDM_JAX_COORDINATOR="h:1", MDM_JAX_NUM_PROCESSES="two"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: environment variable MDM_JAX_NUM_PROCESSES='two' "
                                  "must be an integer")
