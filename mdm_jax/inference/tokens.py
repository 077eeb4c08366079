"""Choosing tokens from logits: greedy, temperature (Gumbel-max), top-k and top-p.

Temperature sampling adds Gumbel noise to logits / temperature and takes the argmax, which
draws exactly from softmax(logits / temperature). The noise is float32, computed from float32
uniforms as -log(-log(u)): the largest value it can take is about 16.6 (u = 1 - 2**-24), which
truncates the Gumbel tail at probability ~6e-8 per draw; LLaDA found that *low-precision* noise
(bfloat16/float16, whose u has only 8-11 bits) visibly hurts quality because it flattens the
tail. float32 passes a chi-square test of the drawn frequencies against softmax probabilities
(tests/test_inference.py); float64 would need jax_enable_x64 process-wide for no measurable gain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite "minus infinity": keeps argmax and softmax NaN-free


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits with everything outside the top-k and the top-p nucleus set to NEG_INF (the most
    probable token always stays)."""
    logits = logits.astype(jnp.float32)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more probable tokens
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


def choose(logits: jax.Array, key, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(tokens, confidence): the chosen token of each row of logits [..., V] and its
    probability under softmax(logits) (the unfiltered, temperature-free distribution, which
    low-confidence remasking ranks by)."""
    logits = logits.astype(jnp.float32)
    filtered = filter_logits(logits, top_k, top_p)
    if temperature > 0:
        gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
        tokens = jnp.argmax(filtered / temperature + gumbel, axis=-1)
    else:
        tokens = jnp.argmax(filtered, axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    confidence = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
    return tokens.astype(jnp.int32), confidence
