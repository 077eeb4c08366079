"""Attention kernels for the accelerator targets: TPU splash attention (Pallas, ships with JAX).

`model.attention=splash` runs jax's splash attention kernel: flash-style blocked attention
that never writes the [L, L] scores to HBM, bidirectional for the diffusion families and causal
for the ARM (a causal mask lets it skip the blocks above the diagonal). Variable-length batches
use segment ids: every query is in segment 0 and the padded keys in segment 1, so no query
attends to padding (what `lengths` means for the XLA attention).

The kernel is a Pallas call, which SPMD partitioning cannot split, so under a mesh it runs in
`shard_map` over the batch axes (data, fsdp) and the tensor axis (heads): attention is
independent per sequence and head, so no communication is needed. On CPU it runs in Pallas's
interpret mode (for the parity tests), except when the step is compiled for a TPU target from
this machine (MDM_JAX_COMPILE_FOR=tpu, set by mdm_jax.targets).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mdm_jax.sharding import BATCH_AXES  # heads go on "tensor"

COMPILE_FOR_ENV = "MDM_JAX_COMPILE_FOR"


def _interpret() -> bool:
    return jax.default_backend() == "cpu" and os.environ.get(COMPILE_FOR_ENV) != "tpu"


def _block(length: int) -> int:
    """The largest of 512, 256, 128 dividing the length (TPU tiles are 128 wide); the whole
    sequence when it is shorter (interpret mode, tests)."""
    for b in (512, 256, 128):
        if length % b == 0:
            return b
    return length


def _kernel(heads: int, length: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    one = masks.CausalMask((length, length)) if causal else masks.FullMask((length, length))
    b = _block(length)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                              block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                              block_kv_dq=b)
    return splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_splash(q, k, v, lengths, *, causal: bool, interpret: bool):
    """q, k, v [b, L, h, D] (one shard), lengths [b] or None -> [b, L, h, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds,
    )

    _, length, heads, head_dim = q.shape
    kernel = _kernel(heads, length, causal, interpret)
    scale = 1.0 / math.sqrt(head_dim)  # the kernel does not scale the scores itself
    qh, kh, vh = ((x.swapaxes(1, 2)) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    if lengths is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        pad = (jnp.arange(length)[None, :] >= lengths[:, None]).astype(jnp.int32)
        segments = SegmentIds(q=jnp.zeros_like(pad), kv=pad)
        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s))(qh, kh, vh, segments)
    return out.swapaxes(1, 2).astype(v.dtype)


def splash_attention(q, k, v, *, causal: bool, lengths: jax.Array | None,
                     interpret: bool | None = None):
    """Attention of q, k, v [B, L, H, D] with the splash kernel; lengths [B] masks the keys
    past each sequence's length. Under a mesh (jax.set_mesh) it runs per shard."""
    interpret = _interpret() if interpret is None else interpret
    mesh = jax.sharding.get_abstract_mesh()
    batch = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
    heads = "tensor" if not mesh.empty and "tensor" in mesh.axis_names else None
    batch_shards = math.prod(mesh.shape[a] for a in batch)
    head_shards = mesh.shape[heads] if heads else 1
    if mesh.empty or q.shape[0] % batch_shards or q.shape[2] % head_shards:
        # No mesh, or a shape the mesh cannot split (parameter init traces one sequence, and
        # its attention output is unused): the kernel sees the whole arrays.
        return _local_splash(q, k, v, lengths, causal=causal, interpret=interpret)
    spec = PartitionSpec(batch, None, heads, None)

    def local(q, k, v, lengths):
        return _local_splash(q, k, v, lengths, causal=causal, interpret=interpret)

    if lengths is None:
        return jax.shard_map(lambda q, k, v: local(q, k, v, None), in_specs=(spec,) * 3,
                             out_specs=spec, check_vma=False)(q, k, v)
    return jax.shard_map(local, in_specs=(spec,) * 3 + (PartitionSpec(batch),),
                         out_specs=spec, check_vma=False)(q, k, v, lengths)
