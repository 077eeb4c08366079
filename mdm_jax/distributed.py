"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

Order of precedence:
1. `config.distributed.coordinator` / `num_processes` / `process_id` (explicit);
2. `MDM_JAX_COORDINATOR`, `MDM_JAX_NUM_PROCESSES`, `MDM_JAX_PROCESS_ID` (any launcher);
3. Slurm (`SLURM_JOB_ID` with more than one task) and Cloud TPU pod slices: jax detects the
   coordinator, process count and id itself;
4. otherwise a single process: nothing to do.
On CPU, collectives across processes use gloo.
"""

from __future__ import annotations

import os

import jax


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def multi_host_settings(c=None) -> dict | None:
    """kwargs for jax.distributed.initialize, {} for auto-detection, or None for one process."""
    d = c.distributed if c is not None and "distributed" in c else None
    coordinator = (d.coordinator if d is not None else "") or os.environ.get(
        "MDM_JAX_COORDINATOR", "")
    if coordinator:
        num = (d.num_processes if d is not None and d.num_processes > 0
               else _env_int("MDM_JAX_NUM_PROCESSES", 0))
        pid = (d.process_id if d is not None and d.process_id >= 0
               else _env_int("MDM_JAX_PROCESS_ID", -1))
        if num < 1 or pid < 0:
            raise ValueError(
                f"a coordinator ({coordinator}) is set but the process count ({num}) or id "
                f"({pid}) is not: set config.distributed.num_processes/process_id or "
                f"MDM_JAX_NUM_PROCESSES/MDM_JAX_PROCESS_ID")
        return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid}
    if "SLURM_JOB_ID" in os.environ and _env_int("SLURM_NTASKS", 1) > 1:
        return {}
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return {}
    return None


def initialize(c=None) -> None:
    """Join the multi-host job if one is configured; a no-op for a single process."""
    settings = multi_host_settings(c)
    if settings is None or jax.distributed.is_initialized():
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
