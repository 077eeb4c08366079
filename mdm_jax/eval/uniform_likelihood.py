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

from mdm_jax.model import Encoder
from mdm_jax.objectives import uniform_alpha, uniform_nelbo


def continuation_nelbo(model, params, x_BxL, z_BxL, context_len, length, alpha_B, eps):
    """[B] NELBO integrand at (alpha, z) summed over the continuation [context_len, length)."""
    b, width = z_BxL.shape
    pos_1xL = jnp.arange(width)[None, :]
    target_1xL = (pos_1xL >= context_len) & (pos_1xL < length)
    lengths_B = jnp.full((b,), length, jnp.int32)  # padding is never attended to
    logits_BxLxK = model.apply({"params": params}, z_BxL, lengths_B, return_logits=True,
                               sigma=-jnp.log(alpha_B))
    alpha_BxL = jnp.broadcast_to(alpha_B[:, None], (b, width))
    nelbo_BxL = uniform_nelbo(logits_BxLxK.astype(jnp.float32), x_BxL, z_BxL, alpha_BxL,
                              dalpha=-(1.0 - eps))
    return jnp.sum(jnp.where(target_1xL, nelbo_BxL, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "eps"))
def uniform_batch(model: Encoder, params, tokens, context_len, length, key, offset, total, *,
                  eps: float):
    """Monte Carlo estimates [batch] float32 of log p(continuation | context), one per row of
    tokens [batch, width] (identical rows of context + continuation; positions >= length are
    padding); row i is draw offset + i of `total` stratified draws."""
    tokens_BxL = tokens
    b, width = tokens_BxL.shape
    k_t, k_move, k_tok = jax.random.split(key, 3)
    u = jax.random.uniform(k_t, ())
    t_B = jnp.mod(u + (offset + jnp.arange(b)) / total, 1.0)
    t_B = (1.0 - eps) * t_B + eps  # floored like training, so that 1 - alpha_t > 0
    alpha_B = uniform_alpha(t_B, eps)
    pos_1xL = jnp.arange(width)[None, :]
    target_1xL = (pos_1xL >= context_len) & (pos_1xL < length)  # the context stays clean
    move_BxL = target_1xL & (jax.random.uniform(k_move, (b, width)) < (1.0 - alpha_B)[:, None])
    noise_BxL = jax.random.randint(k_tok, (b, width), 0, model.args.vocab_size)
    z_BxL = jnp.where(move_BxL, noise_BxL, tokens_BxL)
    return -continuation_nelbo(model, params, tokens_BxL, z_BxL, context_len, length, alpha_B,
                                eps)
