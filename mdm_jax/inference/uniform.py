"""Ancestral sampling for uniform-state diffusion (few steps work: every step may change any
answer token, not only reveal masked ones).

The answer starts as uniformly drawn tokens; each step from t to s < t (a linear grid from 1
to 1e-5) asks the time-conditioned model for x_theta = softmax(logits) at noise level
sigma_t = -log alpha_t and draws every answer token from the exact posterior of the forward
process with x_theta in place of the clean token (linear in x, so the mixture is exact):

    q(z_s = j | z_t, x_theta) ∝ alpha_t K x_j [j = z_t] + (alpha_t/alpha_s - alpha_t)[j = z_t]
                                + (alpha_s - alpha_t) x_j + (1 - alpha_t/alpha_s)(1 - alpha_s)/K

At s = 1e-5 the posterior is, to within 1e-5, x_theta weighted towards z_t: the last step
denoises. Temperature, top-k and top-p apply to log q (Gumbel-max, as for the other samplers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mdm_jax.inference.tokens import choose
from mdm_jax.model import Encoder
from mdm_jax.objectives import uniform_alpha


def posterior(x_theta, z, alpha_t, alpha_s):
    """q(z_s | z_t, x_theta) [..., K] for x_theta [..., K] and z_t [...] (alphas scalar)."""
    k = x_theta.shape[-1]
    onehot = jax.nn.one_hot(z, k, dtype=x_theta.dtype)
    ratio = alpha_t / alpha_s
    num = (alpha_t * k * x_theta * onehot + (ratio - alpha_t) * onehot
           + (alpha_s - alpha_t) * x_theta + (1.0 - ratio) * (1.0 - alpha_s) / k)
    x_z = jnp.take_along_axis(x_theta, z[..., None], axis=-1)
    return num / (alpha_t * k * x_z + 1.0 - alpha_t)


@functools.partial(jax.jit, static_argnames=("model", "steps", "gen_length", "temperature",
                                             "top_k", "top_p", "eps"))
def ancestral(model: Encoder, params, canvas, prompt_lens, key, *, steps: int,
              gen_length: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              eps: float = 1e-3):
    """canvas [B, L] with row b's prompt in [0, p_b) -> (tokens, network calls)."""
    b, length = canvas.shape
    vocab = model.args.vocab_size
    pos = jnp.arange(length)[None, :]
    start = prompt_lens[:, None]
    answer = (pos >= start) & (pos < start + gen_length)
    lengths = (prompt_lens + gen_length).astype(jnp.int32)
    key, k0 = jax.random.split(key)
    z = jnp.where(answer, jax.random.randint(k0, (b, length), 0, vocab), canvas)
    times = jnp.linspace(1.0, 1e-5, steps + 1)

    def step(carry, i):
        z, key = carry
        key, sub = jax.random.split(key)
        a_t, a_s = uniform_alpha(times[i], eps), uniform_alpha(times[i + 1], eps)
        logits = model.apply({"params": params}, z, lengths, return_logits=True,
                             sigma=jnp.full((b,), -jnp.log(a_t)))
        q = posterior(jax.nn.softmax(logits, axis=-1), z, a_t, a_s)
        new, _ = choose(jnp.log(jnp.maximum(q, 1e-30)), sub, temperature, top_k, top_p)
        return (jnp.where(answer, new, z), key), None

    (z, _), _ = jax.lax.scan(step, (z, key), jnp.arange(steps))
    return z, steps
