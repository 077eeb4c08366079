"""Training objectives: the SMDM masked-diffusion ELBO and the ARM next-token loss.

Both run entirely on device inside the jitted step: t, the mask and the variable-length draw come
from the step's PRNG key. The cross-entropy is computed over sequence chunks under `lax.map` with
each chunk rematerialised, so the [B, L, V] float32 logits never exist at once (neither in the
forward nor as saved residuals for the backward). Facts: shared/REFERENCE.md section 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mdm_jax.model import head_kernel, logits_from_hidden

OBJECTIVES = ("mdm", "arm")


@dataclasses.dataclass(frozen=True)
class ObjectiveArgs:
    kind: str = "mdm"  # "mdm" | "arm"
    eps: float = 1e-3  # mask probability p = (1 - eps) * t + eps
    variable_length_prob: float = 0.01  # chance that a batch is truncated to U{1..L}
    weighting: str = "elbo"  # "elbo": CE / p summed over masked, / (B*L); "unweighted": mean CE
    t_sampling: str = "uniform"  # "uniform" | "stratified" (t_i = (u + i/B) mod 1)
    loss_chunk: int = 256  # sequence positions per cross-entropy chunk


def chunked_cross_entropy(hidden, head, targets, weights, chunk: int) -> jax.Array:
    """sum_{b,l} weights[b,l] * CE(hidden[b,l] @ head, targets[b,l]) without full logits.

    The sequence axis is tiled into chunks (the batch axis keeps its sharding); each chunk's
    logits are recomputed in the backward pass instead of being stored.
    """
    b, length, d = hidden.shape
    pad = (-length) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (length + pad) // chunk

    def tiles(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_loss(h, t, w):
        logits = logits_from_hidden(h, head)  # [B, c, V] float32, one chunk only
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum(w * (lse - target_logit))

    per_chunk = jax.lax.map(lambda xs: chunk_loss(*xs), (tiles(hidden), tiles(targets),
                                                         tiles(weights.astype(jnp.float32))))
    return jnp.sum(per_chunk)


def naive_cross_entropy(logits, targets, weights) -> jax.Array:
    """Reference: the same weighted sum from materialised logits (tests and benchmarks only)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(weights * nll)


def sample_t(key, batch: int, how: str) -> jax.Array:
    if how == "stratified":
        u = jax.random.uniform(key, ())
        return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    return jax.random.uniform(key, (batch,))


def sample_length(key, seq_len: int, prob: float) -> jax.Array:
    """SMDM's variable-length trick: with probability `prob` the batch is cut to U{1..L}."""
    k_coin, k_len = jax.random.split(key)
    short = jax.random.uniform(k_coin) < prob
    return jnp.where(short, jax.random.randint(k_len, (), 1, seq_len + 1), seq_len)


def mdm_loss(apply_fn: Callable, params, tokens, key, args: ObjectiveArgs, mask_id: int,
             train: bool = True):
    """SMDM ELBO: mask each token w.p. p(t), CE on masked positions weighted by 1/p, / (B*L).

    tokens: [B, >=L] int32 where L is the model's sequence length (blocks carry one extra token
    for the ARM shift; the MDM uses the first L). Returns (loss, metrics).
    """
    x0 = tokens
    b, length = x0.shape
    k_t, k_mask, k_len = jax.random.split(key, 3)
    t = sample_t(k_t, b, args.t_sampling)
    p = (1.0 - args.eps) * t + args.eps
    masked = jax.random.uniform(k_mask, (b, length)) < p[:, None]

    lengths = None
    valid_len = jnp.asarray(length)
    if train and args.variable_length_prob > 0:
        valid_len = sample_length(k_len, length, args.variable_length_prob)
        lengths = jnp.full((b,), valid_len, jnp.int32)
        masked = masked & (jnp.arange(length)[None, :] < valid_len)

    inputs = jnp.where(masked, mask_id, x0)
    hidden = apply_fn({"params": params}, inputs, lengths)
    if args.weighting == "unweighted" and train:
        weights = masked.astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(weights), 1.0)
    else:
        weights = masked.astype(jnp.float32) / p[:, None]
        denom = b * valid_len.astype(jnp.float32)
    total = chunked_cross_entropy(hidden, head_kernel(params), x0, weights, args.loss_chunk)
    loss = total / denom
    return loss, {"loss": loss, "mask_rate": jnp.mean(masked), "length": valid_len}


def arm_loss(apply_fn: Callable, params, tokens, key, args: ObjectiveArgs, mask_id: int,
             train: bool = True):
    """Next-token CE averaged over tokens: inputs x[:, :L], targets x[:, 1:L+1]."""
    del key, mask_id, train
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = apply_fn({"params": params}, inputs)
    weights = jnp.ones(targets.shape, jnp.float32)
    total = chunked_cross_entropy(hidden, head_kernel(params), targets, weights, args.loss_chunk)
    loss = total / targets.size
    return loss, {"loss": loss}


def model_inputs_len(kind: str, seq_len: int) -> int:
    """Tokens per example the objective reads: L for the MDM, L + 1 for the ARM's shift."""
    return seq_len + 1 if kind == "arm" else seq_len


def get_objective(kind: str) -> Callable:
    if kind == "mdm":
        return mdm_loss
    if kind == "arm":
        return arm_loss
    raise ValueError(f"config.objective.kind={kind!r}; valid: {', '.join(OBJECTIVES)}")
