"""Multi-host start-up: find out where this process runs, then join `jax.distributed`.

`detect()` turns the environment into a `Cluster` (which environment, how many processes, this
one's id, the coordinator, the devices this process owns). The first that applies wins:
1. `config.distributed.coordinator` / `num_processes` / `process_id` (explicit);
2. `MDM_JAX_COORDINATOR`, `MDM_JAX_NUM_PROCESSES`, `MDM_JAX_PROCESS_ID` (any launcher);
3. Slurm: inside an `srun` step (`SLURM_STEP_NODELIST`, `SLURM_PROCID`, ...);
4. GKE TPU (xpk, JobSet): `TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES`, `TPU_WORKER_ID`;
5. Cloud TPU VM: the GCE metadata server (`agent-worker-number`, `worker-network-endpoints`),
   asked only where TPU chips are present or `GCE_METADATA_IP` names a server;
   multislice adds `MEGASCALE_*` (from the environment or the metadata's `tpu-env`);
6. Open MPI (`OMPI_COMM_WORLD_SIZE`): jax's own detection;
7. otherwise one process.
`initialize()` passes what was detected to `jax.distributed.initialize` explicitly (jax's own
auto-detection would give each Slurm process one GPU, and it only recognises TPU VMs that have
chips). Where several processes are expected and joining fails, it raises: a pod job never
carries on silently as one process.

    python -m mdm_jax.distributed --check   # what was detected; joins; exits 1 on a mismatch
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

import jax

from mdm_jax.errors import UserError

TPU_COORDINATOR_PORT = 8482  # jax's port for TPU slices
PCI_VENDOR_GOOGLE = "0x1ae0"  # TPU chips on the PCI bus


class DistributedError(UserError, RuntimeError):
    """The multi-host environment is inconsistent or the processes could not join."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    environment: str  # single | config | mdm_jax | slurm | gke-tpu | gce-tpu | mpi
    num_processes: int
    process_id: int
    coordinator: str | None = None  # host:port of process 0; None: jax finds it (MPI)
    local_device_ids: tuple[int, ...] | None = None  # None: every local device
    source: str = ""  # where the values came from, for --check and error messages

    @property
    def multi(self) -> bool:
        return self.num_processes > 1


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name, "")
    if not value:
        if default is None:
            raise DistributedError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} must be an integer") \
            from None


def _local_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
    value = env.get("JAX_LOCAL_DEVICE_IDS", "")
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise DistributedError(f"JAX_LOCAL_DEVICE_IDS={value!r} must be comma-separated "
                               f"integers, e.g. 0,1,2,3") from None


def _explicit(c, env: Mapping[str, str]) -> Cluster | None:
    d = c.distributed if c is not None and "distributed" in c else None
    coordinator = (d.coordinator if d is not None else "") or env.get("MDM_JAX_COORDINATOR", "")
    if not coordinator:
        return None
    from_config = d is not None and bool(d.coordinator)
    num = (d.num_processes if d is not None and d.num_processes > 0
           else _int(env, "MDM_JAX_NUM_PROCESSES", 0))
    pid = (d.process_id if d is not None and d.process_id >= 0
           else _int(env, "MDM_JAX_PROCESS_ID", -1))
    if num < 1 or not 0 <= pid < num:
        raise DistributedError(
            f"a coordinator ({coordinator}) is set but the process count ({num}) or id ({pid}) "
            f"is not valid: set config.distributed.num_processes/process_id or "
            f"MDM_JAX_NUM_PROCESSES/MDM_JAX_PROCESS_ID (0 <= id < count)")
    name = "config" if from_config else "mdm_jax"
    return Cluster(name, num, pid, coordinator, _local_ids(env),
                   "config.distributed" if from_config else "MDM_JAX_* variables")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'a', 'a,b', 'gpu[003-009,012],cpu1' -> 'gpu003'."""
    head, bracket, rest = nodelist.partition("[")
    if "," in head or not bracket:
        return head.split(",")[0]
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return head + first


def _slurm(env: Mapping[str, str]) -> Cluster | None:
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(k in env for k in needed):
        return None  # not inside an srun step (e.g. the batch script itself)
    num = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    pid = _int(env, "SLURM_PROCID")
    port = env.get("JAX_COORDINATOR_PORT") or str(
        _int(env, "SLURM_JOB_ID") % 4096 + 61440)  # jax's rule: one port per job
    host = first_slurm_host(env["SLURM_STEP_NODELIST"])
    # One task per node owns all its accelerators (our sbatch); several tasks per node get one
    # device each, as jax does for Slurm. JAX_LOCAL_DEVICE_IDS overrides both.
    ids = _local_ids(env)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "1"))
    tasks_here = int(per_node.split("(")[0].split(",")[0] or 1)
    if ids is None and tasks_here > 1 and env.get("JAX_PLATFORMS", "") != "cpu":
        ids = (_int(env, "SLURM_LOCALID"),)
    return Cluster("slurm", num, pid, f"{host}:{port}", ids,
                   f"Slurm job {env['SLURM_JOB_ID']} step nodes {env['SLURM_STEP_NODELIST']}")


def _tpu_env_value(env: Mapping[str, str], key: str, tpu_env: str | None) -> str | None:
    """A TPU setting from the environment, else from the metadata's `tpu-env` ("KEY: 'v'")."""
    if env.get(key):
        return env[key]
    for line in (tpu_env or "").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip().strip("'\"")
    return None


def _tpu_cluster(name: str, workers: list[str], worker_id: int, env: Mapping[str, str],
                 tpu_env: str | None, source: str) -> Cluster:
    slices = int(_tpu_env_value(env, "MEGASCALE_NUM_SLICES", tpu_env) or 1)
    slice_id = int(_tpu_env_value(env, "MEGASCALE_SLICE_ID", tpu_env) or 0)
    host = (_tpu_env_value(env, "MEGASCALE_COORDINATOR_ADDRESS", tpu_env) or workers[0])
    port = env.get("JAX_COORDINATOR_PORT") or str(TPU_COORDINATOR_PORT)
    if slices > 1:
        source += f", {slices} slices (this is slice {slice_id})"
    return Cluster(name, len(workers) * slices, worker_id + slice_id * len(workers),
                   f"{host.split(':')[0]}:{port}", _local_ids(env), source)


def _gke_tpu(env: Mapping[str, str]) -> Cluster | None:
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if not hosts:
        return None
    workers = [h.strip() for h in hosts.split(",") if h.strip()]
    return _tpu_cluster("gke-tpu", workers, _int(env, "TPU_WORKER_ID", 0), env, None,
                        f"GKE TPU workers {','.join(workers)}")


def tpu_chips_present() -> bool:
    """Whether this host has TPU chips (Google's vendor id on the PCI bus, or /dev/accel*)."""
    if glob.glob("/dev/accel*"):
        return True
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == PCI_VENDOR_GOOGLE:
                    return True
        except OSError:
            continue
    return False


def gce_metadata(key: str, env: Mapping[str, str] | None = None,
                 timeout: float = 5.0) -> str | None:
    """An instance attribute from the GCE metadata server; None when it is not there."""
    env = os.environ if env is None else env
    host = env.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
        headers={"Metadata-Flavor": "Google"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None


def parse_worker_endpoints(value: str) -> list[str]:
    """`worker-network-endpoints`: host names, or old-style `name:id:ip` triples."""
    out = []
    for entry in filter(None, (e.strip() for e in value.split(","))):
        parts = entry.split(":")
        if len(parts) not in (1, 3):
            raise DistributedError(f"unexpected worker-network-endpoints entry {entry!r} from "
                                   f"the GCE metadata server")
        out.append(parts[-1])
    return out


def _gce_tpu(env: Mapping[str, str], tpu_vm: bool,
             metadata: Callable[[str], str | None]) -> Cluster | None:
    # (TPU_SKIP_MDS_QUERY is not consulted: importing jax sets it on every host without chips.)
    if not tpu_vm:
        return None
    worker = metadata("agent-worker-number")
    if worker is None:
        return None  # a GCE VM, but not a TPU VM worker
    endpoints = metadata("worker-network-endpoints")
    if not endpoints:
        raise DistributedError("the GCE metadata server gives agent-worker-number but no "
                               "worker-network-endpoints; is this a Cloud TPU VM?")
    workers = parse_worker_endpoints(endpoints)
    try:
        worker_id = int(worker)
    except ValueError:
        raise DistributedError(f"agent-worker-number {worker!r} from the GCE metadata server "
                               f"is not an integer") from None
    return _tpu_cluster("gce-tpu", workers, worker_id, env, metadata("tpu-env"),
                        f"GCE metadata ({env.get('GCE_METADATA_IP', 'metadata.google.internal')}"
                        f"): worker {worker_id} of {','.join(workers)}")


def _mpi(env: Mapping[str, str]) -> Cluster | None:
    if "OMPI_COMM_WORLD_SIZE" not in env:
        return None
    return Cluster("mpi", _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK", 0),
                   None, _local_ids(env), "Open MPI (OMPI_COMM_WORLD_*)")


def detect(c=None, env: Mapping[str, str] | None = None, tpu_vm: bool | None = None,
           metadata: Callable[[str], str | None] | None = None) -> Cluster:
    """Where this process runs. `tpu_vm` (chips present) and `metadata` are inputs so the
    decision can be tested; by default they are read from this host."""
    env = os.environ if env is None else env
    if tpu_vm is None:
        tpu_vm = "GCE_METADATA_IP" in env or tpu_chips_present()
    if metadata is None:
        def metadata(key):
            return gce_metadata(key, env)
    for found in (_explicit(c, env), _slurm(env), _gke_tpu(env),
                  _gce_tpu(env, tpu_vm, metadata), _mpi(env)):
        if found is not None:
            if not 0 <= found.process_id < found.num_processes:
                raise DistributedError(
                    f"{found.environment}: process id {found.process_id} is outside 0.."
                    f"{found.num_processes - 1} ({found.source})")
            return found
    return Cluster("single", 1, 0, source="no multi-host environment found")


def initialize(c=None, cluster: Cluster | None = None, timeout_s: int | None = None) -> Cluster:
    """Join the multi-host job if several processes are expected; a no-op for one process."""
    cluster = cluster or detect(c)
    if not cluster.multi or jax.distributed.is_initialized():
        return cluster
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout_s = timeout_s or int(os.environ.get("MDM_JAX_INIT_TIMEOUT", "300"))
    kwargs = dict(initialization_timeout=timeout_s)
    if cluster.coordinator is not None:  # everything known: jax must not second-guess it
        kwargs.update(coordinator_address=cluster.coordinator,
                      num_processes=cluster.num_processes, process_id=cluster.process_id,
                      local_device_ids=(list(cluster.local_device_ids)
                                        if cluster.local_device_ids else None),
                      cluster_detection_method="deactivate")
    try:
        if cluster.coordinator is not None and cluster.process_id != 0:
            # XLA aborts the process when the coordinator never answers; find out first.
            _wait_for_coordinator(cluster.coordinator, timeout_s)
        jax.distributed.initialize(**kwargs)
    except Exception as e:
        raise DistributedError(
            f"{cluster.environment} expects {cluster.num_processes} processes ({cluster.source}) "
            f"but process {cluster.process_id} could not join the coordinator "
            f"{cluster.coordinator or '(auto)'}: {str(e).splitlines()[0][:300] if str(e) else e}"
            f". Check that every process started and can reach the coordinator's host and "
            f"port (JAX_COORDINATOR_PORT), or set MDM_JAX_INIT_TIMEOUT for slow starts.") from e
    if jax.process_count() != cluster.num_processes:
        raise DistributedError(f"{cluster.environment} expects {cluster.num_processes} processes "
                               f"but jax.distributed reports {jax.process_count()}")
    return cluster


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"nothing answered at {address} within {timeout_s:g} s "
                                       f"({e.strerror or e})") from None
            time.sleep(0.5)  # process 0 may still be starting


def check(c=None) -> tuple[dict, list[str]]:
    """Detect, join, run one collective, and report; returns (report, problems)."""
    cluster = detect(c)
    report = {"environment": cluster.environment, "source": cluster.source,
              "expected_processes": cluster.num_processes, "coordinator": cluster.coordinator,
              "local_device_ids": cluster.local_device_ids}
    problems = []
    try:
        initialize(c, cluster)
    except DistributedError as e:
        return report, [str(e)]
    local, devices = jax.local_devices(), jax.devices()
    report.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  local_devices=len(local), global_devices=len(devices),
                  device_kind=local[0].device_kind, platform=local[0].platform)
    if jax.process_index() != cluster.process_id:
        problems.append(f"process index {jax.process_index()} != expected {cluster.process_id}")
    if len(devices) != len(local) * jax.process_count():
        problems.append(f"{len(devices)} global devices != {len(local)} local x "
                        f"{jax.process_count()} processes (hosts see different device counts)")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mdm_jax.distributed.check")  # a real collective
        report["collective"] = "ok"
    return report, problems


def _main(argv: list[str]) -> int:
    if argv[:1] != ["--check"] or len(argv) > 2 or argv[1:] not in ([], ["--json"]):
        print("usage: python -m mdm_jax.distributed --check [--json]", file=sys.stderr)
        return 2
    report_out = sys.stdout
    if "--json" in argv:
        # Native libraries (Gloo's "Rank 0 is connected ...") write to fd 1 from their own
        # threads, which would splice text into the JSON line: stdout keeps only the report,
        # everything else written to fd 1 goes to stderr.
        sys.stdout.flush()
        report_out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    try:
        report, problems = check()
    except DistributedError as e:  # an inconsistent environment: nothing to join
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "--json" in argv:
        print(json.dumps(dict(report, problems=problems)), file=report_out, flush=True)
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}", flush=True)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr, flush=True)
    return 1 if problems else 0


def cli(argv=None) -> None:
    sys.exit(_main(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    cli()
