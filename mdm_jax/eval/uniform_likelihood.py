"""log p(continuation | context) for uniform-state diffusion (objective.kind = "uniform"): minus
the family's own continuous-time NELBO of the continuation, with the context held clean.

The estimator is the training loss (objectives.uniform_loss, weighting "elbo") restricted to the
continuation: u uniform (stratified over all draws), t = (1 - eps) u + eps, alpha_t =
1 - (1 - eps) t; each continuation token is replaced by a uniformly drawn one w.p. 1 - alpha_t,
the context never is; the model, told sigma = -log alpha_t, scores the noisy sequence and
objectives.uniform_nelbo is summed over the continuation positions only.

No reconstruction or prior term is added, as in the reference (s-sahoo/duo: `Diffusion.nll`
with `DUO_BASE.nll_per_token`, reported with `prior_loss=0.0` by `TrainerBase._loss`; only
the discrete-time `D3PMAbsorb` adds `_reconstruction_loss`) and as in our training loss, so
the numbers are the eval loss's, per sequence. alpha_0 = 1, so a reconstruction term would be
0; what the floor at eps drops is the integrand on [0, eps) (it grows like log 1/t there) and
the prior KL(q_1 || uniform) at alpha_1 = eps: the estimate is therefore not strictly a lower
bound. For the exact denoiser of uniform i.i.d. tokens it exceeds log p by 0.0067 nats per
token at K = 8, 0.011 at K = 50257 (the full-range integral plus the prior KL is exactly
log K); more for a model sure that a clean token is wrong (its integrand grows like 1/t).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mdm_jax.model import Encoder, head_kernel, logits_from_hidden
from mdm_jax.objectives import uniform_alpha, uniform_nelbo


def continuation_nelbo(model, params, x_BxL, z_BxL, context_len, length, alpha_B, eps,
                       span: int | None = None):
    """[B] NELBO integrand at (alpha, z) summed over the continuation [context_len, length)
    (context_len and length: scalars, or [B] for rows of different requests). `span`: read
    the head at the continuation's first `span` positions only (it has at most span tokens);
    None: at every position."""
    b, width = z_BxL.shape
    context_Bx1 = jnp.reshape(context_len, (-1, 1))
    length_Bx1 = jnp.reshape(length, (-1, 1))
    lengths_B = jnp.broadcast_to(length_Bx1[:, 0], (b,)).astype(jnp.int32)  # padding unread
    sigma_B = -jnp.log(alpha_B)
    if span is None:
        pos_BxS = jnp.broadcast_to(jnp.arange(width)[None, :], (b, width))
        at_BxS = pos_BxS
        logits_BxSxK = model.apply({"params": params}, z_BxL, lengths_B, return_logits=True,
                                   sigma=sigma_B)
    else:
        pos_BxS = jnp.broadcast_to(context_Bx1 + jnp.arange(span)[None, :], (b, span))
        at_BxS = jnp.minimum(pos_BxS, width - 1)  # past the row: clipped, not scored
        hidden_BxLxD = model.apply({"params": params}, z_BxL, lengths_B, sigma=sigma_B)
        picked_BxSxD = jnp.take_along_axis(hidden_BxLxD, at_BxS[..., None], axis=1)
        logits_BxSxK = logits_from_hidden(picked_BxSxD, head_kernel(params))
    target_BxS = (pos_BxS >= context_Bx1) & (pos_BxS < length_Bx1)
    alpha_BxS = jnp.broadcast_to(alpha_B[:, None], at_BxS.shape)
    nelbo_BxS = uniform_nelbo(logits_BxSxK.astype(jnp.float32),
                              jnp.take_along_axis(x_BxL, at_BxS, axis=1),
                              jnp.take_along_axis(z_BxL, at_BxS, axis=1), alpha_BxS,
                              dalpha=-(1.0 - eps))
    return jnp.sum(jnp.where(target_BxS, nelbo_BxS, 0.0), axis=-1)


def _estimates(model, params, tokens_NxL, context_len_N, length_N, key_N, offset_N, total,
               eps: float, draws: int, draw_width: int, span: int | None):
    """[N, draws] estimates: row i of tokens_NxL is a request, its draws offset_N[i] + 0 ...
    draws - 1 of `total` stratified ones, drawn from key_N[i] in `draw_width` columns (the
    head read at `span` positions: continuation_nelbo)."""
    n, width = tokens_NxL.shape
    pos_1xL = jnp.arange(width)[None, :]

    def noise(tokens_L, context_len, length, key, offset):  # one chunk: z [draws, L], alpha
        k_t, k_move, k_tok = jax.random.split(key, 3)
        u = jax.random.uniform(k_t, ())
        t_B = jnp.mod(u + (offset + jnp.arange(draws)) / total, 1.0)
        t_B = (1.0 - eps) * t_B + eps  # floored like training, so that 1 - alpha_t > 0
        alpha_B = uniform_alpha(t_B, eps)
        target_1xL = (pos_1xL >= context_len) & (pos_1xL < length)  # the context stays clean
        coin_BxL = jax.random.uniform(k_move, (draws, draw_width))[:, :width]
        move_BxL = target_1xL & (coin_BxL < (1.0 - alpha_B)[:, None])
        noise_BxL = jax.random.randint(k_tok, (draws, draw_width), 0,
                                       model.args.vocab_size)[:, :width]
        return jnp.where(move_BxL, noise_BxL, tokens_L[None, :]), alpha_B

    z_NxBxL, alpha_NxB = jax.vmap(noise)(tokens_NxL, context_len_N, length_N, key_N, offset_N)
    nelbo_R = continuation_nelbo(
        model, params, jnp.repeat(tokens_NxL, draws, axis=0), z_NxBxL.reshape(n * draws, width),
        jnp.repeat(context_len_N, draws), jnp.repeat(length_N, draws), alpha_NxB.reshape(-1),
        eps, span)
    return -nelbo_R.reshape(n, draws)


@functools.partial(jax.jit, static_argnames=("model", "eps", "draws", "total", "draw_width",
                                             "span"))
def uniform_chunks(model: Encoder, params, tokens_NxL, context_len_N, length_N, seed_N,
                   chunk_N, *, eps: float, draws: int, total: int, draw_width: int, span: int):
    """Monte Carlo estimates [N, draws] float32 of log p(continuation | context) of N chunks
    of requests (likelihood.Chunks): row i is a request (positions >= length_N[i] are
    padding; at most `span` continuation tokens), its chunk chunk_N[i] holds its draws
    chunk * draws ... of `total`, from PRNGKey(seed_N[i]) folded with the chunk."""
    key_N = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seed_N, chunk_N)
    return _estimates(model, params, tokens_NxL, context_len_N, length_N, key_N,
                      chunk_N * draws, total, eps, draws, draw_width, span)


@functools.partial(jax.jit, static_argnames=("model", "eps"))
def uniform_batch(model: Encoder, params, tokens, context_len, length, key, offset, total, *,
                  eps: float):
    """Monte Carlo estimates [batch] float32 of log p(continuation | context), one per row of
    tokens [batch, width] (identical rows of context + continuation; positions >= length are
    padding); row i is draw offset + i of `total` stratified draws."""
    b, width = tokens.shape
    one = lambda v: jnp.reshape(jnp.asarray(v), (1,))
    return _estimates(model, params, tokens[:1], one(context_len), one(length), key[None],
                      one(offset), total, eps, b, width, None)[0]
