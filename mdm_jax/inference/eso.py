"""Eso-LM sampling (s-sahoo/Eso-LMs `EsoLM.generate_samples`, variant B): a diffusion phase
over a random order, then a left-to-right phase, one token per call, with a KV cache.

1. Schedule (`reveal_schedule`, on the host, one for the batch): for t on a grid 1, ..., 1/T
   with s = t - 1/T, k ~ Binomial(still masked, (alpha_s - alpha_t) / (1 - alpha_t)) answer
   tokens are revealed; empty steps are dropped (no call). About alpha0 of the answer comes
   from diffusion; the rest is the left-to-right phase, chunks of one token.
2. Order (per row): the answer positions in random order, the part left to the sequential
   phase re-sorted left to right. Prompt tokens come before all of them (clean from the start:
   our extension; the reference samples unconditionally).
3. The canvas lives in that order (the "sorted layout"), each token at its own RoPE position,
   under causal attention: a chunk's masks see every revealed token and the masks before them
   in the chunk; revealed tokens see only revealed tokens, so their keys and values never
   change once computed. Hence the cache: call i runs only on [chunk i-1 (now clean) ;
   chunk i (masks)], a contiguous window of the sorted layout, and appends the first part's
   keys and values. The reference path (`kv_cache=False`) recomputes the whole canvas each
   call; both read the same window of logits and draw the same noise, so they give the same
   tokens (tested).

Rows with shorter prompts are left-padded in the sorted layout; no token attends to padding
(`key_start`). Shapes are fixed per (canvas, window width), so a run compiles once per width.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.inference.tokens import choose
from mdm_jax.model import Encoder, head_kernel, logits_from_hidden
from mdm_jax.objectives import eso_alpha

EPS = 1e-3  # the schedule's floor, as in training


@dataclasses.dataclass(frozen=True)
class Schedule:
    chunks: tuple[int, ...]  # answer tokens revealed per call, diffusion first
    diffusion_tokens: int  # how many of them the diffusion phase reveals

    @property
    def window(self) -> int:
        """The widest call: a chunk plus the one before it, rounded up to a power of two (a
        few compiled shapes across runs)."""
        widest = max(a + b for a, b in zip((0,) + self.chunks[:-1], self.chunks, strict=True))
        return 1 << (widest - 1).bit_length()


def reveal_schedule(gen_length: int, steps: int, alpha0: float,
                    rng: np.random.Generator) -> Schedule:
    """How many answer tokens each call reveals (see the module's docstring)."""
    remaining, chunks = gen_length, []
    dt = 1.0 / steps
    for t in np.linspace(1.0, dt, steps):
        alpha_t = float(eso_alpha(t, alpha0, EPS))
        alpha_s = float(eso_alpha(max(t - dt, 0.0), alpha0, EPS))
        k = int(rng.binomial(remaining, min(max((alpha_s - alpha_t) / (1.0 - alpha_t), 0.0), 1.0)))
        if k:
            chunks.append(k)
            remaining -= k
    if remaining and alpha0 == 1:
        chunks.append(remaining)
        remaining = 0
    diffusion = gen_length - remaining
    return Schedule(tuple(chunks) + (1,) * remaining, diffusion)


def sorted_layout(prompt_lens, gen_length: int, width: int, diffusion_tokens, key):
    """orig [B, N]: the canvas position of each slot of the sorted layout (N = P + G with P
    the widest prompt): row b's padding (its spare positions after the answer), its prompt
    left to right, then its answer in the sampling order."""
    b = prompt_lens.shape[0]
    longest = width - gen_length
    pad = longest - prompt_lens  # [B]
    u = jax.random.uniform(key, (b, gen_length))
    rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    gen_pos = jnp.arange(gen_length)[None, :]
    # diffusion tokens in random order, then the rest left to right
    answer_order = jnp.argsort(jnp.where(rank < diffusion_tokens, rank,
                                         gen_length + gen_pos), axis=-1)
    j = jnp.arange(longest)[None, :]
    head = jnp.where(j < pad[:, None], prompt_lens[:, None] + gen_length + j, j - pad[:, None])
    return jnp.concatenate([head, prompt_lens[:, None] + answer_order], axis=1), pad


@functools.partial(jax.jit, static_argnames=("model", "window", "kv_cache", "temperature",
                                             "top_k", "top_p"))
def sample(model: Encoder, params, canvas, prompt_lens, key, starts, n_chunks,
           diffusion_tokens, *, window: int, kv_cache: bool, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0):
    """canvas [B, P + G] (row b's prompt in [0, p_b), masks after); starts [G + 1]: the
    sorted-layout offsets (from P) of the chunks, n_chunks of them. Returns (tokens, calls)."""
    b, width = canvas.shape
    gen_length = starts.shape[0] - 1
    longest = width - gen_length
    k_order, k_tokens = jax.random.split(key)
    orig, pad = sorted_layout(prompt_lens, gen_length, width, diffusion_tokens, k_order)
    spare = ((0, 0), (0, window))
    x = jnp.pad(jnp.take_along_axis(canvas, orig, axis=1), spare)
    positions = jnp.pad(orig, spare)
    a = model.args
    apply = functools.partial(model.apply, {"params": params})

    if kv_cache:
        shape = (a.n_layer, b, width + window, a.n_head, a.head_dim)
        cache = (jnp.zeros(shape, a.compute_dtype), jnp.zeros(shape, a.compute_dtype))
        if longest:  # prefill: the prompts' keys and values
            _, cache = apply(x[:, :longest], cache=cache, start=0,
                             positions=positions[:, :longest], key_start=pad)
    else:
        cache = None
        slots = jnp.arange(width)
        mask = ((slots[None, :] <= slots[:, None])[None]
                & (slots[None, None, :] >= pad[:, None, None]))[:, None]

    def window_logits(x, cache, begin):
        if kv_cache:
            return apply(jax.lax.dynamic_slice_in_dim(x, begin, window, 1), cache=cache,
                         start=begin, key_start=pad,
                         positions=jax.lax.dynamic_slice_in_dim(positions, begin, window, 1))
        hidden = apply(x[:, :width], None, positions=positions[:, :width], mask=mask)
        hidden = jax.lax.dynamic_slice_in_dim(jnp.pad(hidden, spare + ((0, 0),)), begin,
                                              window, 1)
        return logits_from_hidden(hidden, head_kernel(params)), None

    def body(i, carry):
        x, cache = carry
        begin = longest + jnp.where(i > 0, starts[jnp.maximum(i - 1, 0)], 0)
        first, last = longest + starts[i], longest + starts[i + 1]
        logits, cache = window_logits(x, cache, begin)
        tokens, _ = choose(logits, jax.random.fold_in(k_tokens, i), temperature, top_k, top_p)
        slot = begin + jnp.arange(window)
        current = jax.lax.dynamic_slice_in_dim(x, begin, window, 1)
        chosen = jnp.where((slot >= first) & (slot < last), tokens, current)
        return jax.lax.dynamic_update_slice_in_dim(x, chosen, begin, 1), cache

    x, _ = jax.lax.fori_loop(0, n_chunks, body, (x, cache))
    rows = jnp.arange(b)[:, None]
    out = canvas.at[rows, orig].set(x[:, :width])
    return out, n_chunks + (1 if kv_cache and longest else 0)


def generate_eso(model: Encoder, params, canvas, prompt_lens, key, *, steps: int,
                 alpha0: float, gen_length: int, kv_cache: bool, temperature: float,
                 top_k: int, top_p: float):
    """The family's sampler (inference.SAMPLERS): the schedule drawn on the host, the orders
    and tokens on device, all from `key`. Returns (tokens [B, P + G], network calls)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    schedule = reveal_schedule(gen_length, steps, alpha0, rng)
    starts = np.zeros(gen_length + 1, np.int32)
    starts[1:len(schedule.chunks) + 1] = np.cumsum(schedule.chunks)
    return sample(model, params, canvas, prompt_lens, key, jnp.asarray(starts),
                  jnp.asarray(len(schedule.chunks), jnp.int32),
                  jnp.asarray(schedule.diffusion_tokens, jnp.int32),
                  window=schedule.window, kv_cache=kv_cache, temperature=temperature,
                  top_k=top_k, top_p=top_p)
