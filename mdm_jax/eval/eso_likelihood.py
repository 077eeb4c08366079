"""log p(continuation | context) for interpolating diffusion (objective.kind = "eso"): minus the
family's NELBO of the continuation, with the context held clean (a lower bound in expectation,
like the MDMs' "mc").

Each draw is the evaluation loss (objectives.eso_loss, train=False) restricted to the
continuation, at the model's trained alpha0:
- diffusion term: u stratified over all draws, t = (1 - eps) u + eps, alpha_t = alpha0 (1 -
  (1 - eps) t); each continuation token is masked w.p. 1 - alpha_t (the context never is);
  clean tokens (context included) first in random order, masks after in random order;
  -sum over the masked of log p, weighted by alpha0 (1 - eps) / (1 - alpha_t);
- left-to-right term (alpha0 < 1): each continuation token masked w.p. 1 - alpha0, the 2L
  sequential pass, -sum over the masked of log p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mdm_jax import orders
from mdm_jax.model import Encoder, head_kernel
from mdm_jax.objectives import chunked_cross_entropy, eso_alpha


@functools.partial(jax.jit, static_argnames=("model", "eps", "draws", "total", "draw_width"))
def eso_chunks(model: Encoder, params, tokens_NxL, context_len_N, length_N, seed_N, chunk_N, *,
               eps: float, draws: int, total: int, draw_width: int):
    """Monte Carlo estimates [N, draws] float32 of log p(continuation | context) of N chunks
    of requests (as uniform_likelihood.uniform_chunks): row i is a request (positions >=
    length_N[i] are padding), its chunk chunk_N[i] holds its draws chunk * draws ... of
    `total`, from PRNGKey(seed_N[i]) folded with the chunk, drawn in `draw_width` columns."""
    n, width = tokens_NxL.shape
    alpha0 = model.args.alpha0
    pos_1xL = jnp.arange(width)[None, :]
    head = head_kernel(params)
    mask_id = model.args.mask_id

    def fields(key, offset, context_len, length):
        k_t, k_mask, k_order, k_seq, k_seq_order = jax.random.split(key, 5)
        u = jax.random.uniform(k_t, ())
        t_B = (1.0 - eps) * jnp.mod(u + (offset + jnp.arange(draws)) / total, 1.0) + eps
        alpha_B = eso_alpha(t_B, alpha0, eps)
        target_1xL = (pos_1xL >= context_len) & (pos_1xL < length)
        valid_BxL = jnp.broadcast_to(pos_1xL < length, (draws, width))
        coin = lambda k: jax.random.uniform(k, (draws, draw_width))[:, :width]
        masked_BxL = target_1xL & (coin(k_mask) < (1.0 - alpha_B)[:, None])
        order_BxL = orders.order_of(orders.sort_keys(masked_BxL, valid_BxL, coin(k_order)))
        seq_BxL = target_1xL & (coin(k_seq) < 1.0 - alpha0)
        seq_order_BxL = orders.order_of(orders.sort_keys(
            seq_BxL, valid_BxL, coin(k_seq_order), masks_left_to_right=True))
        weight_B = alpha0 * (1.0 - eps) / (1.0 - alpha_B)
        return masked_BxL, order_BxL, weight_B, seq_BxL, seq_order_BxL

    key_N = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seed_N, chunk_N)
    masked, order, weight, seq, seq_order = jax.vmap(fields)(
        key_N, chunk_N * draws, context_len_N, length_N)
    rows = lambda x: x.reshape(n * draws, *x.shape[2:])
    x_RxL = jnp.repeat(tokens_NxL, draws, axis=0)
    masked, order, weight, seq, seq_order = map(rows, (masked, order, weight, seq, seq_order))

    def per_row(hidden_RxLxD, targets_RxL, weights_RxL):  # -sum of weighted CE, per row
        return -jax.vmap(lambda h, x, w: chunked_cross_entropy(
            h[None], head, x[None], w[None], 256))(hidden_RxLxD, targets_RxL, weights_RxL)

    logp_R = jnp.zeros((n * draws,), jnp.float32)
    if alpha0 > 0:
        hidden = orders.diffusion_hidden(model.apply, params,
                                         jnp.where(masked, mask_id, x_RxL), order)
        logp_R += per_row(hidden, orders.in_order(x_RxL, order),
                          orders.in_order(masked, order) * weight[:, None])
    if alpha0 < 1:
        hidden = orders.sequential_hidden(model.apply, params, jnp.where(seq, mask_id, x_RxL),
                                          x_RxL, seq_order)
        logp_R += per_row(hidden, orders.in_order(x_RxL, seq_order),
                          orders.in_order(seq, seq_order).astype(jnp.float32))
    return logp_R.reshape(n, draws)

