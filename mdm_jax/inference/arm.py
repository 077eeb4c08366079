"""ARM samplers: left to right with a KV cache, and the full-recompute reference.

With the cache, the prompt is prefilled in one call, then each new token is one call on a
single position that reads the fixed-size cache ([n_layer, B, L, H, D] keys and values, written
in place): L - P calls of O(L) each instead of L - P calls of O(L^2). Prompts may have
different lengths (left-aligned, row b's prompt in [0, p_b)): the prefill covers the shortest
prompt, and after that a row still inside its prompt keeps its prompt token instead of the
sampled one. Both samplers are jitted with fixed shapes and give identical tokens at
temperature 0 (tested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mdm_jax.inference.tokens import choose
from mdm_jax.model import Encoder


@functools.partial(jax.jit, static_argnames=("model", "prefill", "temperature", "top_k",
                                             "top_p"))
def sample_cached(model: Encoder, params, canvas, prompt_lens, key, *, prefill: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """canvas [B, L] with row b's prompt in [0, p_b); `prefill` = min(p_b) >= 1 (static).
    Returns (tokens [B, L], network calls made)."""
    a = model.args
    if not a.causal:
        raise ValueError("the KV-cache sampler is for causal (ARM) models")
    b, length = canvas.shape
    shape = (a.n_layer, b, length, a.n_head, a.head_dim)
    empty = (jnp.zeros(shape, a.compute_dtype), jnp.zeros(shape, a.compute_dtype))
    logits, cache = model.apply({"params": params}, canvas[:, :prefill], cache=empty, start=0)
    last = logits[:, -1]

    def body(pos, carry):
        x, cache, last, key = carry
        key, sub = jax.random.split(key)
        tok, _ = choose(last, sub, temperature, top_k, top_p)
        tok = jnp.where(pos < prompt_lens, x[:, pos], tok)
        x = x.at[:, pos].set(tok)
        logits, cache = model.apply({"params": params}, tok[:, None], cache=cache, start=pos)
        return x, cache, logits[:, 0], key

    x, _, last, key = jax.lax.fori_loop(prefill, length - 1, body, (canvas, cache, last, key))
    tok, _ = choose(last, jax.random.split(key)[1], temperature, top_k, top_p)
    x = x.at[:, length - 1].set(jnp.where(length - 1 < prompt_lens, x[:, length - 1], tok))
    return x, 1 + max(length - 1 - prefill, 0)


@functools.partial(jax.jit, static_argnames=("model", "prefill", "temperature", "top_k",
                                             "top_p"))
def sample_full(model: Encoder, params, canvas, prompt_lens, key, *, prefill: int,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """The reference: every new token recomputes the whole sequence (no cache). Same
    arguments, same random draws, same tokens as `sample_cached`."""
    length = canvas.shape[1]

    def body(pos, carry):
        x, key = carry
        logits = model.apply({"params": params}, x, return_logits=True)
        key, sub = jax.random.split(key)
        tok, _ = choose(logits[:, pos - 1], sub, temperature, top_k, top_p)
        return x.at[:, pos].set(jnp.where(pos < prompt_lens, x[:, pos], tok)), key

    x, _ = jax.lax.fori_loop(prefill, length, body, (canvas, key))
    return x, length - prefill
