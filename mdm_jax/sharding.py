"""Device mesh (data, fsdp, tensor), logical-axis rules, and shardings for state and batch.

Parameters are annotated with logical names in `model.py`; the rules below map them to mesh
axes: FSDP shards every weight's embed dimension, tensor parallelism shards heads, MLP and vocab
(Megatron style), and the batch is split over (data, fsdp).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mdm_jax.config import MESH_AXES

BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed_vocab", None),  # vocab + 1 rows (mask token) rarely divides a mesh axis
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def make_mesh(shape: tuple[int, int, int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over the first prod(shape) devices, with Auto axis types.

    One process: `jax.make_mesh` picks a topology-aware device order. Several processes: the
    devices are laid out process-major, so the leading (batch) axes run across hosts and each
    host holds a contiguous block of the global batch (what the loader feeds it), while the
    tensor axis stays inside a host.
    """
    devices = list(devices if devices is not None else jax.devices())[: math.prod(shape)]
    types = (AxisType.Auto,) * 3
    if len({d.process_index for d in devices}) == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered).reshape(shape), MESH_AXES, axis_types=types)


def logical_to_sharding(tree, mesh: Mesh):
    """NamedShardings for a tree of logically-partitioned (boxed) abstract values."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(abstract_params, mesh: Mesh) -> None:
    """Every sharded parameter dimension must divide its mesh axes; name the parameter if not."""
    specs = nn.get_partition_spec(abstract_params)
    flat_specs = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    flat_vals = jax.tree_util.tree_leaves(nn.unbox(abstract_params))
    for (path, spec), val in zip(flat_specs, flat_vals, strict=True):
        mesh_spec = nn.logical_to_mesh_axes(spec, LOGICAL_RULES)
        for dim, axes in zip(val.shape, mesh_spec, strict=False):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ValueError(
                    f"parameter {name} has a dimension of {dim} that is split over mesh axes "
                    f"{axes} of total size {size}, which does not divide it; change "
                    f"config.mesh ({dict(mesh.shape)}) or the model size."
                )


def host_to_global(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of the global batch -> one global array sharded over the batch axes.

    Process i holds rows [i*B, (i+1)*B) (the loader's layout); `check_batch_layout` verifies
    that the mesh puts exactly those rows on this process's devices.
    """
    global_shape = (batch.shape[0] * jax.process_count(), *batch.shape[1:])
    return jax.make_array_from_process_local_data(sharding, batch, global_shape)


def check_batch_layout(sharding: NamedSharding, global_batch: int) -> None:
    """Each process's devices must need only that process's contiguous block of rows."""
    per_process = global_batch // jax.process_count()
    lo, hi = jax.process_index() * per_process, (jax.process_index() + 1) * per_process
    for device, index in sharding.addressable_devices_indices_map((global_batch,)).items():
        rows = range(global_batch)[index[0]]
        if rows and (rows.start < lo or rows.stop > hi):
            raise ValueError(
                f"the mesh places batch rows {rows.start}-{rows.stop - 1} on {device} of "
                f"process {jax.process_index()}, which loads rows {lo}-{hi - 1}; order the "
                f"mesh so the data/fsdp axes run across processes (e.g. tensor within a host)")
