"""Accelerator targets a run can be compiled for from this machine: TPU slices and GPU nodes.

A target names its chips (topology), their memory and how to get compile-only devices for them:
libtpu describes any TPU slice without one (`jax.experimental.topologies.get_topology_desc`),
and the CUDA PJRT plugin compiles for a GPU described by a GpuTargetConfigProto, written here
from the GPU's public specification. Both come with the `accelerators` extra (`bash
launch/setup.sh accelerators`, its own .venv-accelerators). What a chip is (peak FLOP/s, HBM
bytes and bandwidth) lives once, in `mdm_jax.flops.CHIPS`; a target adds how many and how they
are wired.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile

from mdm_jax import flops


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" | "cuda"
    topology: str  # libtpu's "v5p:2x2x1", or the CUDA plugin's "slices x hosts x gpus per host"
    chips: int  # devices the program runs on (TPU v4/v5p: megacore chips)
    accelerator: str  # the chip: a key of flops.CHIPS
    hosts: int = 1
    megacore: bool = False  # v4 and v5p pair their two TensorCores into one device

    @property
    def chip(self) -> flops.Chip:
        return flops.CHIPS[self.accelerator]

    @property
    def hbm_bytes(self) -> int:
        """Per device, from the chip's record."""
        return self.chip.hbm_bytes


TARGETS = {t.name: t for t in (
    Target("v4-8", "tpu", "v4:2x2x1", 4, "tpu v4", megacore=True),
    Target("v5p-8", "tpu", "v5p:2x2x1", 4, "tpu v5p", megacore=True),
    Target("v5p-64", "tpu", "v5p:2x4x4", 32, "tpu v5p", hosts=8, megacore=True),
    Target("v5p-128", "tpu", "v5p:4x4x4", 64, "tpu v5p", hosts=16, megacore=True),
    Target("v5e-16", "tpu", "v5e:4x4", 16, "tpu v5e", hosts=4),
    Target("v6e-8", "tpu", "v6e:2x4", 8, "tpu v6e", hosts=2),
    Target("h100x8", "cuda", "1x1x8", 8, "h100"),
    Target("h100x32", "cuda", "1x4x8", 32, "h100", hosts=4),
    Target("h100x64", "cuda", "1x8x8", 64, "h100", hosts=8),
    Target("h200x8", "cuda", "1x1x8", 8, "h200"),
)}

# What XLA's GPU compiler needs to know about the chip (GpuTargetConfigProto): facts from the
# public H100/H200 SXM specifications (132 SMs of compute capability 9.0, 50 MiB of L2, 228 KiB
# of shared memory per SM, 1.98 GHz boost clock), plus the cuDNN version the cuDNN attention
# kernel is compiled against. Memory size and bandwidth come from the chip's record in
# flops.CHIPS; the name is the device_kind jax reports for it.
_GPU_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}


def gpu_target_config(target: Target) -> str:
    chip = target.chip
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {chip.hbm_bytes}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{_GPU_NAMES[target.accelerator]}"
"""


def quiet_compile_only_environment() -> None:
    """Before jax starts: CPU stays the default backend (libtpu must not look for a TPU), two
    processes may load libtpu at once, and libtpu does not ask a metadata server about a VM
    it is not on. Call before importing jax."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def native_logs_captured():
    """libtpu and the CUDA plugin log from C++ straight to fd 2 while they start (missing TPU
    metadata, no CUDA driver: expected here); keep those lines out of the report, and show them
    if the block fails or with MDM_JAX_DEBUG=1."""
    from mdm_jax.errors import debug

    if debug():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class TargetUnavailable(RuntimeError):
    """The compiler for a target is not installed here."""


def compile_only_devices(target: Target) -> list:
    """The target's devices, for lowering and compiling only (no arrays live on them)."""
    import jax
    from jax.experimental import topologies

    from mdm_jax.attention_kernels import COMPILE_FOR_ENV

    os.environ[COMPILE_FOR_ENV] = target.platform  # Pallas kernels: compile, do not interpret
    try:
        with native_logs_captured():
            jax.devices()  # starts the backends (and the plugins' start-up logs) here
            if target.platform == "tpu":
                kwargs = {"chip_config_name": "megacore"} if target.megacore else {}
                topo = topologies.get_topology_desc(platform="tpu",
                                                    topology_name=target.topology, **kwargs)
            else:
                topo = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                    target_config=gpu_target_config(target))
    except (NotImplementedError, RuntimeError, ModuleNotFoundError) as e:
        what = "libtpu" if target.platform == "tpu" else "the CUDA PJRT plugin"
        raise TargetUnavailable(
            f"--target {target.name} needs {what} (the 'accelerators' extra): run `bash "
            f"launch/setup.sh accelerators`, then use .venv-accelerators/bin/python "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    devices = list(topo.devices)
    if len(devices) != target.chips:
        raise RuntimeError(f"{target.name}: topology {target.topology} gave {len(devices)} "
                           f"devices, expected {target.chips}")
    return devices
