"""The SMDM encoder in Flax linen: Llama-style pre-norm blocks, bidirectional (MDM) or causal (ARM).

Architecture facts (shared/REFERENCE.md section 1): RMSNorm eps 1e-5, rotate-half RoPE over the
full head dim with base 10000, multi-head attention, SwiGLU `w3(silu(w1 x) * w2 x)`, no biases,
final norm, untied head. The MDM embedding has one extra row for the mask token; the head never
predicts it. Parameters carry logical axis names; `sharding.py` maps them onto the mesh.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mdm_jax import families
from mdm_jax.attention_kernels import splash_attention
from mdm_jax.presets import Preset, get_preset

REMAT = {  # the jax policy of each name in config.REMAT_POLICIES
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Everything the encoder needs: a preset's shape plus run-time options."""

    n_layer: int
    n_head: int
    d_model: int
    head_dim: int
    mlp_dim: int
    vocab_size: int  # logits the head produces
    family: str = "mdm"  # a name in mdm_jax.families: attention, mask row, conditioning
    max_seq_len: int = 2048
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "xla"
    cond_dim: int = 128  # width of the noise-level embedding when time-conditioned
    alpha0: float = 1.0  # interpolating family: share of tokens made by diffusion (its default
    # for sampling and likelihoods; the other families ignore it)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @classmethod
    def from_preset(cls, preset: Preset, **overrides) -> ModelArgs:
        fields = dict(
            n_layer=preset.n_layer,
            n_head=preset.n_head,
            d_model=preset.d_model,
            head_dim=preset.head_dim,
            mlp_dim=preset.mlp_dim,
            vocab_size=preset.vocab_size,
            max_seq_len=preset.max_seq_len,
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    @classmethod
    def from_config(cls, c) -> ModelArgs:
        """The encoder a run config (mdm_jax.config) describes."""
        return cls.from_preset(
            get_preset(c.model.preset), vocab_size=c.model.vocab_size or None,
            family=c.objective.kind, dtype=c.model.dtype, remat=c.model.remat,
            scan_layers=c.model.scan_layers, attention=c.model.attention,
            alpha0=c.eso.alpha0 if "eso" in c else 1.0)

    @property
    def causal(self) -> bool:
        """Next-token prediction (the ARM): inputs shifted against targets."""
        return families.get(self.family).causal

    @property
    def causal_attention(self) -> bool:
        """Each token attends to itself and the tokens before it: in sequence order (the ARM)
        or in a per-token order the caller lays the tokens out in (the interpolating family:
        mdm_jax/orders.py)."""
        return families.get(self.family).attention in ("causal", "order")

    @property
    def time_conditioning(self) -> bool:
        """adaLN on the noise level (a family whose noisy tokens do not say they are noise)."""
        return families.get(self.family).time_conditioned

    @property
    def mask_id(self) -> int:
        """The MDM mask token: one past the last vocabulary entry (32000 for Llama-2's)."""
        return self.vocab_size

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + 1 if families.get(self.family).mask_token else self.vocab_size

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _param(module: nn.Module, name: str, shape, std: float, axes: tuple[str, ...]):
    init = nn.with_logical_partitioning(_normal(std), axes)
    return module.param(name, init, shape, jnp.float32)


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [seq_len, head_dim] for the rotate-half (non-interleaved) layout."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rope_at(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, head_dim] for explicit per-token positions [B, L] (a token keeps its
    own position wherever the caller lays it out)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate [B, L, H, D] by position: x*cos + rotate_half(x)*sin, in float32. cos/sin are
    [L, D] (shared by the batch) or [B, L, D] (per-token positions)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],), jnp.float32,
        )
        xf = x.astype(jnp.float32)  # statistics in float32 even under bf16 compute
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * scale).astype(self.dtype)


def _key_mask(seq_len: int, causal: bool, lengths: jax.Array | None) -> jax.Array | None:
    """Boolean [B or 1, 1, Lq, Lk] of allowed attention, or None when everything is allowed."""
    mask = None
    if causal:
        pos = jnp.arange(seq_len)
        mask = (pos[:, None] >= pos[None, :])[None, None]
    if lengths is not None:
        keep = (jnp.arange(seq_len)[None, :] < lengths[:, None])[:, None, None, :]
        mask = keep if mask is None else mask & keep
    return mask


def xla_attention(q, k, v, *, causal: bool, lengths: jax.Array | None, mask=None):
    """Reference attention: fp32 scores and softmax, matmuls in the compute dtype. `mask`
    (bool [B, 1, Lq, Lk], True = may attend) replaces `causal` and `lengths` when given."""
    if mask is None:
        mask = _key_mask(q.shape[1], causal, lengths)
    # The recomputing backward is a CPU win (no [B, H, L, L] residuals to write and read); XLA's
    # GPU compiler keeps more score-sized buffers alive in it (170M on 8 x H100: 60 GiB peak
    # against 38), so other platforms differentiate the plain softmax. Chosen per platform at
    # lowering, so an AOT compile for a TPU or GPU gets what that chip runs.
    return jax.lax.platform_dependent(
        q, k, v, mask, cpu=_softmax_attention,
        default=lambda q, k, v, mask: _attend(jax.nn.softmax(_scores(q, k, mask), axis=-1), v))


def _scores(q, k, mask):
    """Scaled fp32 scores [B, H, Lq, Lk], the disallowed ones at float32's minimum."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    return scores if mask is None else jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


def _attend(probs, v):
    """probs [B, H, Lq, Lk] @ v [B, Lk, H, D] -> [B, Lq, H, D], as a plain batched matmul in
    [B, H, ., .]: contracting v in its own layout makes XLA's CPU backend run a strided batched
    dot, 3x slower at inference shapes (BUILD_NOTES "Speed")."""
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), jnp.swapaxes(v, 1, 2))
    return jnp.swapaxes(out, 1, 2)


def _softmax_forward(q, k, v, mask):
    scores = _scores(q, k, mask)
    top = jnp.max(scores, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scores - top)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = _attend(unnormalised / total, v)
    return out, (q, k, v, mask, out, top + jnp.log(total))


@jax.custom_vjp
def _softmax_attention(q, k, v, mask):
    return _softmax_forward(q, k, v, mask)[0]


def _softmax_backward(residuals, d_out):
    """FlashAttention's backward: the probabilities are recomputed from the scores and their
    log-sum-exp instead of being kept, and softmax's row sums come from d_out * out
    ([B, L, H] instead of a pass over [B, H, L, L]). Under `lax.scan` this saves stacking every
    layer's probabilities: 30% of the attention's time in the 19M train step on CPU."""
    q, k, v, mask, out, lse = residuals
    probs = jnp.exp(_scores(q, k, mask) - lse)
    d_out_h = jnp.swapaxes(d_out, 1, 2)  # [B, H, Lq, D]
    d_v = jnp.einsum("bhqk,bhqd->bkhd", probs.astype(v.dtype), d_out_h)
    d_probs = jnp.einsum("bhqd,bkhd->bhqk", d_out_h, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Lq, H]
    d_scores = probs * (d_probs - jnp.swapaxes(row, 1, 2)[..., None])
    d_scores = (d_scores * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bkhd->bqhd", d_scores, k)
    d_k = jnp.einsum("bhqk,bqhd->bkhd", d_scores, q)
    return d_q, d_k, d_v.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_forward, _softmax_backward)


def attention(q, k, v, *, impl: str, causal: bool, lengths: jax.Array | None, mask=None):
    if impl == "xla" or mask is not None:  # the fused kernels take no explicit mask: the same
        # function in XLA (eso's 2L pass and recomputing sampler); training with such a mask on
        # a kernel is refused by config.validate, as it would cost the kernel's memory savings
        return xla_attention(q, k, v, causal=causal, lengths=lengths, mask=mask)
    if impl == "splash":  # TPU Pallas kernel (mdm_jax/attention_kernels.py)
        return splash_attention(q, k, v, causal=causal, lengths=lengths)
    # jax.nn.dot_product_attention: "jax" lets XLA choose, "cudnn" demands the fused GPU kernel.
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
        implementation=None if impl == "jax" else "cudnn",
    )


def dense(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """x [..., d_in] @ w [d_in, *out] -> [..., *out] as one 2-D matmul.

    Autodiff of a matmul with several leading (batch, length) dimensions contracts over both
    for the weight gradient, and XLA's CPU backend then writes the large activation gradient
    transposed in an elementwise fusion: 2x slower for the 19M preset's MLP than the same
    matmul on [B * L, d_in] (BUILD_NOTES "Speed"). The reshapes are free (row-major views).
    """
    lead, out = x.shape[:-1], w.shape[1:]
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), w.reshape(w.shape[0], -1),
                   preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out)


def noise_embedding(sigma: jax.Array, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features [B, dim] of the noise level sigma [B] (cos half, then sin half)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = sigma.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _modulation(module: nn.Module, cond, n: int, d: int, name: str):
    """n [B, 1, d] tensors (shift / scale / gate ...) from the condition, zero-initialised so a
    time-conditioned model starts as the unconditioned one."""
    w = module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, (None, None)),
                     (cond.shape[-1], n * d), jnp.float32)
    b = module.param(name + "_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  (None,)), (n * d,),
                     jnp.float32)
    out = (cond.astype(jnp.float32) @ w + b)[:, None, :]
    return jnp.split(out, n, axis=-1)


def cached_attention(q, k, v, cache, start, key_start=None):
    """Causal attention of T new positions [start, start + T) over a fixed-size KV cache.

    cache = (keys, values), each [B, C, H, D]: the new k, v are written at `start` and every
    query attends to the cached keys at or before its own position (and, with `key_start`
    [B], not before key_start[b]: row b's padding). Returns (out, cache)."""
    keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, 1)
    values = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, 1)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    query_pos = start + jnp.arange(q.shape[1])
    key_pos = jnp.arange(keys.shape[1])
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]
    if key_start is not None:
        allowed = allowed & (key_pos >= key_start[:, None])[:, None, None, :]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, values.astype(v.dtype)), (keys, values)


class Block(nn.Module):
    """Pre-norm transformer block; signature (carry, broadcast..., per-layer) -> (carry, out)
    for nn.scan. `cache` (decoding only): this layer's (keys, values) [B, C, H, D] and the
    position of x's first token; the block then returns the updated cache as its output.
    `mask`: an explicit attention mask (Encoder's); `key_start`: the cached keys' padding."""

    args: ModelArgs

    @nn.compact
    def __call__(self, x, cos, sin, lengths, cache=None, start=None, cond=None, mask=None,
                 key_start=None):
        a = self.args
        dt = a.compute_dtype
        std = math.sqrt(2.0 / (5.0 * a.d_model))
        out_std = (1.0 / math.sqrt(a.d_model)) / a.n_layer
        act = lambda y, axes: nn.with_logical_constraint(y, axes)
        if cond is not None:  # adaLN: shift, scale and gate of both sub-blocks
            shift1, scale1, gate1, shift2, scale2, gate2 = _modulation(self, cond, 6, a.d_model,
                                                                       "ada")
            mod = lambda h, shift, scale: (h * (1 + scale) + shift).astype(dt)
        else:
            mod = lambda h, shift, scale: h
            shift1 = scale1 = shift2 = scale2 = None
            gate1 = gate2 = 1.0

        h = mod(RMSNorm(a.norm_eps, dt, name="attn_norm")(x), shift1, scale1)
        qkv_shape = (a.d_model, a.n_head, a.head_dim)
        qkv_axes = ("embed", "heads", "head_dim")
        q, k, v = (
            dense(h, _param(self, n, qkv_shape, std, qkv_axes).astype(dt))
            for n in ("wq", "wk", "wv")
        )
        head_axes = ("act_batch", "act_length", "act_heads", None)
        q, k, v = (act(t, head_axes) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            o = attention(q, k, v, impl=a.attention, causal=a.causal_attention,
                          lengths=lengths, mask=mask)
        else:
            o, cache = cached_attention(q, k, v, cache, start, key_start)
        wo = _param(self, "wo", (a.n_head, a.head_dim, a.d_model), out_std,
                    ("heads", "head_dim", "embed"))
        o = o.reshape(*o.shape[:2], -1)  # [B, L, H * K]
        x = x + act(gate1 * dense(o, wo.reshape(-1, a.d_model).astype(dt)),
                    ("act_batch", "act_length", "act_embed"))

        h = mod(RMSNorm(a.norm_eps, dt, name="mlp_norm")(x), shift2, scale2)
        w1 = _param(self, "w1", (a.d_model, a.mlp_dim), std, ("embed", "mlp")).astype(dt)
        w2 = _param(self, "w2", (a.d_model, a.mlp_dim), std, ("embed", "mlp")).astype(dt)
        w3 = _param(self, "w3", (a.mlp_dim, a.d_model), out_std, ("mlp", "embed")).astype(dt)
        gate = act(jax.nn.silu(dense(h, w1)) * dense(h, w2), ("act_batch", "act_length", "act_mlp"))
        x = x + act(gate2 * dense(gate, w3), ("act_batch", "act_length", "act_embed"))
        return x, cache


class Encoder(nn.Module):
    """tokens [B, L] -> final hidden states [B, L, d] (or logits [B, L, V] with return_logits).

    `lengths` [B] (optional) restricts attention to the first lengths[b] keys: this is how a
    batch truncated to a shorter length (SMDM's variable-length training) runs under jit without
    recompiling.
    """

    args: ModelArgs

    @nn.compact
    def __call__(self, tokens, lengths=None, return_logits: bool = False, cache=None,
                 start=None, sigma=None, positions=None, mask=None, key_start=None):
        """With `cache` (keys, values) [n_layer, B, C, H, D] and `start`, tokens are the
        positions [start, start + T) of a causal decode: returns (logits, updated cache).
        `sigma` [B]: the noise level of a time-conditioned model (only used by one with
        args.time_conditioning; None there means sigma = 0, e.g. for init).
        `positions` [B, T]: each token's RoPE position (default: its index, or start + index
        when decoding); `mask` [B, 1, T, T] bool: who may attend to whom, replacing the
        family's causal/bidirectional rule and `lengths` (XLA attention only); `key_start`
        [B] (decoding): cached keys before it are row b's padding. The interpolating family
        lays tokens out in its order with these (mdm_jax/orders.py)."""
        a = self.args
        cond = None
        if a.time_conditioning:
            if sigma is None:
                sigma = jnp.zeros((tokens.shape[0],), jnp.float32)
            h = noise_embedding(sigma)
            h = nn.Dense(a.cond_dim, name="time_in", dtype=jnp.float32)(h)
            cond = nn.silu(nn.Dense(a.cond_dim, name="time_out", dtype=jnp.float32)(
                nn.silu(h)))
        dt = a.compute_dtype
        std = math.sqrt(2.0 / (5.0 * a.d_model))
        table = _param(self, "embedding", (a.embedding_rows, a.d_model), std,
                       ("embed_vocab", "embed"))
        # Gather the FSDP-sharded table before the lookup (as for every other weight), so the
        # result is sharded like the batch instead of like the table.
        table = nn.with_logical_constraint(table.astype(dt), ("embed_vocab", "act_embed"))
        x = jnp.take(table, tokens, axis=0)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        if positions is not None:
            cos, sin = rope_at(positions, a.head_dim, a.rope_base)
        elif cache is None:
            cos, sin = rope_tables(tokens.shape[1], a.head_dim, a.rope_base)
        else:
            cos, sin = (jax.lax.dynamic_slice_in_dim(t, start, tokens.shape[1]) for t in
                        rope_tables(cache[0].shape[2], a.head_dim, a.rope_base))

        block = Block
        if a.remat != "none":
            block = nn.remat(Block, policy=REMAT[a.remat], prevent_cse=not a.scan_layers)
        if a.scan_layers:
            stack = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast,
                         nn.broadcast, nn.broadcast, nn.broadcast),
                length=a.n_layer, metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, cache = stack(a, name="blocks")(x, cos, sin, lengths, cache, start, cond, mask,
                                               key_start)
        else:
            layers = []
            for i in range(a.n_layer):
                mine = None if cache is None else (cache[0][i], cache[1][i])
                x, mine = block(a, name=f"block_{i}")(x, cos, sin, lengths, mine, start, cond,
                                                      mask, key_start)
                layers.append(mine)
            if cache is not None:
                cache = tuple(jnp.stack([layer[j] for layer in layers]) for j in range(2))

        x = RMSNorm(a.norm_eps, dt, name="final_norm")(x)
        if cond is not None:
            shift, scale = _modulation(self, cond, 2, a.d_model, "final_ada")
            x = (x * (1 + scale) + shift).astype(dt)
        head = _param(self, "head", (a.d_model, a.vocab_size), std, ("embed", "vocab"))
        if cache is not None:
            return logits_from_hidden(x, head), cache
        if return_logits:
            return logits_from_hidden(x, head)
        return x


def logits_from_hidden(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """Head projection with float32 accumulation (inputs stay in the compute dtype)."""
    return dense(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def head_kernel(params) -> jax.Array:
    """The untied output head [d, vocab] from an (unboxed) parameter tree."""
    return params["head"]
