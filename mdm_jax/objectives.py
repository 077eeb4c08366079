"""Training objectives: the SMDM masked-diffusion ELBO and the ARM next-token loss.

Both run entirely on device inside the jitted step: t, the mask and the variable-length draw come
from the step's PRNG key. The cross-entropy is computed over sequence chunks under `lax.map` with
each chunk rematerialised, so the [B, L, V] float32 logits never exist at once (neither in the
forward nor as saved residuals for the backward). Facts: shared/REFERENCE.md section 2.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mdm_jax import families, orders
from mdm_jax.model import head_kernel, logits_from_hidden


@dataclasses.dataclass(frozen=True)
class ObjectiveArgs:
    kind: str = "mdm"  # a name in mdm_jax.families.FAMILIES
    eps: float = 1e-3  # mask probability p = (1 - eps) * t + eps
    variable_length_prob: float = 0.01  # chance that a batch is truncated to U{1..L}
    weighting: str = "elbo"  # "elbo": CE / p summed over masked, / (B*L); "unweighted": mean CE
    ce_norm: str = "masked"  # unweighted: / masked tokens (mean CE) or / all B*L ("tokens")
    t_sampling: str = "uniform"  # a name in config.T_SAMPLING
    loss_chunk: int = 256  # sequence positions per cross-entropy chunk
    alpha0: float = 1.0  # eso: share of tokens made by diffusion
    batch_split: float = -1.0  # eso: share of rows on the diffusion term (-1: by alpha0)
    shuffle: bool = True  # eso: random order within the clean and the masked tokens
    batch_shards: int = 1  # devices the batch is split over (sparse_cross_entropy's groups)
    masking: str = "bernoulli"  # "bernoulli": each token w.p. p(t); "count": count_masking

    @classmethod
    def from_config(cls, c) -> ObjectiveArgs:
        o = c.objective
        eso = {}
        if "eso" in c:
            eso = dict(alpha0=c.eso.alpha0, shuffle=c.eso.shuffle, batch_split=c.eso.batch_split)
        return cls(kind=o.kind, eps=o.eps, variable_length_prob=o.variable_length_prob,
                   weighting=o.weighting, ce_norm=o.get("ce_norm", "masked"),
                   t_sampling=o.t_sampling, loss_chunk=o.loss_chunk,
                   **eso)


def chunked_token_loss(hidden, head, token_loss: Callable, per_token: tuple, weights,
                       chunk: int) -> jax.Array:
    """sum_{b,l} weights[b,l] * token_loss(logits[b,l], *per_token[b,l]) without full logits.

    The sequence axis is tiled into chunks (the batch axis keeps its sharding); each chunk's
    logits [B, c, V] are made, reduced over the vocabulary by `token_loss` (which sees whole
    positions, so any per-position reduction over V is exact), and recomputed in the backward
    pass instead of being stored.
    """
    b, length, d = hidden.shape
    pad = (-length) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        # edge values, not zeros: a zero weight does not cancel a NaN (uniform's alpha = 0)
        per_token = tuple(jnp.pad(x, ((0, 0), (0, pad)), mode="edge") for x in per_token)
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (length + pad) // chunk

    def tiles(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_loss(h, w, *xs):
        logits = logits_from_hidden(h, head)  # [B, c, V] float32, one chunk only
        return jnp.sum(w * token_loss(logits, *xs))

    per_chunk = jax.lax.map(lambda xs: chunk_loss(*xs), (
        tiles(hidden), tiles(weights.astype(jnp.float32)), *(tiles(x) for x in per_token)))
    return jnp.sum(per_chunk)


def cross_entropy(logits, targets):
    """Per-position CE [...] of float32 logits [..., V]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def chunked_cross_entropy(hidden, head, targets, weights, chunk: int) -> jax.Array:
    """sum_{b,l} weights[b,l] * CE(hidden[b,l] @ head, targets[b,l]) without full logits."""
    return chunked_token_loss(hidden, head, cross_entropy, (targets,), weights, chunk)


def sparse_cross_entropy(hidden, head, targets, weights, chunk: int, groups: int = 1):
    """chunked_cross_entropy for weights that are mostly zero (an MDM scores only its masked
    positions, about half of them): the head runs on the scored positions only.

    The rows are split into `groups` (the batch shards, so that nothing moves between
    devices); each group's positions are flattened and stably sorted scored-first, cut into
    chunks of `chunk` positions, and a chunk with no scored position is skipped (`lax.cond`:
    neither its logits nor their backward are computed). The sum is the same as
    chunked_cross_entropy's up to the order of float additions.
    """
    b, length, d = hidden.shape
    groups = groups if groups > 0 and b % groups == 0 else 1
    n_tok = (b // groups) * length
    w = weights.astype(jnp.float32).reshape(groups, n_tok)
    order = jnp.argsort(w == 0, axis=1, stable=True)  # scored positions first
    w = jnp.take_along_axis(w, order, axis=1)
    t = jnp.take_along_axis(targets.reshape(groups, n_tok), order, axis=1)
    h = jnp.take_along_axis(hidden.reshape(groups, n_tok, d), order[..., None], axis=1)
    pad = (-n_tok) % chunk
    if pad:  # zero weights: these chunks hold no scored position, or share one that does
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        t, w = jnp.pad(t, ((0, 0), (0, pad))), jnp.pad(w, ((0, 0), (0, pad)))
    n = (n_tok + pad) // chunk

    def tiles(x):  # [G, n*c, ...] -> [n, G, c, ...]
        return jnp.swapaxes(x.reshape(groups, n, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_loss(h, w, t):
        def scored():
            return jnp.sum(w * cross_entropy(logits_from_hidden(h, head), t))

        return jax.lax.cond(jnp.any(w != 0), scored, lambda: jnp.zeros((), jnp.float32))

    return jnp.sum(jax.lax.map(lambda xs: chunk_loss(*xs), (tiles(h), tiles(w), tiles(t))))


def naive_cross_entropy(logits, targets, weights) -> jax.Array:
    """Reference: the same weighted sum from materialised logits (tests and benchmarks only)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(weights * nll)


def sample_t(key, batch: int, how: str) -> jax.Array:
    """t [batch] in [0, 1): i.i.d. ("uniform"), one shared offset ("stratified":
    t_i = (u + i/B) mod 1) or one draw per stratum ("antithetic", MDLM/Eso-LM's
    `_sample_t`: t_i = (u_i + i)/B)."""
    strata = jnp.arange(batch, dtype=jnp.float32)
    if how == "stratified":
        u = jax.random.uniform(key, ())
        return jnp.mod(u + strata / batch, 1.0)
    if how == "antithetic":
        return (jax.random.uniform(key, (batch,)) + strata) / batch
    return jax.random.uniform(key, (batch,))


def count_masking(key, t: jax.Array, valid: jax.Array, floor: float = 0.0):
    """LLaDA's fixed-count masking (`forward_process` in get_log_likelihood.py), for the bound's
    estimator: row i masks exactly l_i = 1 + floor(t_i n_i) of its n_i valid positions, chosen
    uniformly, so t ~ U[0, 1) gives l ~ U{1..n}. Returns (masked [B, L], weight [B]): the
    weight each masked token's CE gets so that sum(weight * CE) / n_i is an unbiased estimate
    of the row's continuous-time bound per token, integral over q from `floor` to 1 of
    E[sum of masked CE | mask rate q] / q, with no eps cut-off. For a mask rate q the count is
    Binomial(n, q); integrated against 1/q that leaves c_l = (1 - I_floor(l, n - l + 1)) / l
    per l (I the regularised incomplete beta; c_l = 1/l at floor 0, where the weight is n/l
    and sum(mask * weight) = n exactly: the weight factor F is 1 in every row, not only on
    average). floor = 1 - alpha0 for Eso-LM's diffusion term."""
    n = jnp.sum(valid, axis=-1).astype(jnp.int32)
    count = jnp.clip(jnp.floor(t * n).astype(jnp.int32) + 1, 1, jnp.maximum(n, 1))
    noise = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)  # invalid: ranked last
    rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
    masked = (rank < count[:, None]) & valid
    counts = count.astype(jnp.float32)
    per_count = 1.0 / counts
    if floor > 0:
        per_count = per_count * (1.0 - jax.scipy.special.betainc(counts, n - counts + 1.0,
                                                                 floor))
    return masked, n.astype(jnp.float32) * per_count


def sample_length(key, seq_len: int, prob: float) -> jax.Array:
    """SMDM's variable-length trick: with probability `prob` the batch is cut to U{1..L}."""
    k_coin, k_len = jax.random.split(key)
    short = jax.random.uniform(k_coin) < prob
    return jnp.where(short, jax.random.randint(k_len, (), 1, seq_len + 1), seq_len)


def mdm_loss(apply_fn: Callable, params, tokens, key, args: ObjectiveArgs, mask_id: int,
             train: bool = True, valid_len=None):
    """SMDM ELBO: mask each token w.p. p(t), CE on masked positions weighted by 1/p, / (B*L).

    tokens: [B, >=L] int32 where L is the model's sequence length (blocks carry one extra token
    for the ARM shift; the MDM uses the first L). `valid_len` (a traced scalar) cuts every row
    to that length instead of the variable-length draw (fine-tuning rows padded to their
    micro-batch's longest pair). Returns (loss, metrics).
    """
    x0 = tokens
    b, length = x0.shape
    k_t, k_mask, k_len = jax.random.split(key, 3)
    t = sample_t(k_t, b, args.t_sampling)

    lengths = None
    if valid_len is None:
        valid_len = jnp.asarray(length)
        if train and args.variable_length_prob > 0:
            valid_len = sample_length(k_len, length, args.variable_length_prob)
            lengths = jnp.full((b,), valid_len, jnp.int32)
    else:
        lengths = jnp.full((b,), valid_len, jnp.int32)
    valid = jnp.broadcast_to(jnp.arange(length)[None, :] < valid_len, (b, length))
    if args.masking == "count":
        masked, row_weight = count_masking(k_mask, t, valid)
    else:
        p = (1.0 - args.eps) * t + args.eps
        masked = (jax.random.uniform(k_mask, (b, length)) < p[:, None]) & valid
        row_weight = 1.0 / p

    inputs = jnp.where(masked, mask_id, x0)
    hidden = apply_fn({"params": params}, inputs, lengths)
    if args.weighting == "unweighted" and train:
        weights = masked.astype(jnp.float32)
        # "tokens": scaling-dllms' low_var loss (TrainerBase._loss): the masked tokens' CE
        # summed over all B*L positions; under Adam it differs from the mean by a per-batch
        # factor, the masked share.
        denom = (b * valid_len.astype(jnp.float32) if args.ce_norm == "tokens"
                 else jnp.maximum(jnp.sum(weights), 1.0))
    else:
        weights = masked.astype(jnp.float32) * row_weight[:, None]
        denom = b * valid_len.astype(jnp.float32)
    total = sparse_cross_entropy(hidden, head_kernel(params), x0, weights, args.loss_chunk,
                                 args.batch_shards)
    loss = total / denom
    # F = sum(weights) / (B L): 1 in expectation for the ELBO's weights, exactly 1 under count
    # masking; a fixed set of eval draws with F != 1 biases every run evaluated on them.
    metrics = {"loss": loss, "mask_rate": jnp.mean(masked), "length": valid_len}
    if not train:
        metrics["weight_factor"] = jnp.sum(masked * row_weight[:, None]) / denom
    return loss, metrics


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


def mdm_ce_loss(apply_fn: Callable, params, tokens, key, args: ObjectiveArgs, mask_id: int,
                train: bool = True, valid_len=None):
    """The cross-entropy MDM ("mdm-ce"): the same masking, trained on the plain mean CE over
    the masked tokens (no 1/p weight), which the uniform-vs-masked scaling study found ~12%
    more FLOPs-efficient; evaluation (train=False) still reports the 1/t-weighted ELBO, so the
    bound compares with the SMDM MDM's."""
    if train:
        args = dataclasses.replace(args, weighting="unweighted")
    return mdm_loss(apply_fn, params, tokens, key, args, mask_id, train, valid_len)


def uniform_alpha(t: jax.Array, eps: float) -> jax.Array:
    """The log-linear schedule of uniform-state diffusion: alpha_t = 1 - (1 - eps) t (the
    probability that a token is still clean at time t); d alpha / dt = -(1 - eps)."""
    return 1.0 - (1.0 - eps) * t


def uniform_nelbo(logits, x, z, alpha, dalpha: float):
    """Per-position continuous-time NELBO (nats) of uniform-state diffusion [...], from the
    model's float32 logits [..., K] at noisy token z, clean token x and alpha [...].

    With p = softmax(logits), X_j = K alpha p_j + 1 - alpha (the model's marginal at t, up to
    1/K) and xbar the true one (K alpha onehot(x) + 1 - alpha), the integrand is
    alpha'/(K alpha) [K/xbar_z - K/X_z - sum_j (xbar_j / xbar_z) (log X_z - log X_j + log xbar_j
    - log xbar_z)]; the sum over j is written with the only vocabulary-wide reduction it needs,
    S = sum_j log X_j, since xbar takes two values. Zero when p = onehot(x); never negative.
    """
    k = logits.shape[-1]
    p = jax.nn.softmax(logits, axis=-1)
    a = alpha[..., None]
    log_big_x = jnp.log(k * a * p + (1.0 - a))
    s = jnp.sum(log_big_x, axis=-1)
    log_xz = jnp.take_along_axis(log_big_x, z[..., None], axis=-1)[..., 0]
    log_xx = jnp.take_along_axis(log_big_x, x[..., None], axis=-1)[..., 0]
    a = alpha
    xbar_z = (1.0 - a) + k * a * (x == z)
    entropy = (k - 1) * (1.0 - a) * jnp.log(1.0 - a) + (1.0 - a + k * a) * jnp.log(1.0 - a + k * a)
    term1 = k / xbar_z - k * jnp.exp(-log_xz)
    term2 = (k * log_xz - ((1.0 - a) * s + k * a * log_xx) + entropy - k * jnp.log(xbar_z)) / xbar_z
    return dalpha / (k * a) * (term1 - term2)


def uniform_loss(apply_fn: Callable, params, tokens, key, args: ObjectiveArgs, mask_id: int,
                 train: bool = True):
    """Uniform-state diffusion: each token is replaced by a uniformly drawn one w.p. 1 - alpha_t
    (t floored at eps, as the reference code does, so that 1 - alpha_t > 0); the model, told
    the noise level sigma = -log alpha_t, predicts the clean tokens. Loss: the NELBO summed
    over positions / (B * L), nats per token like the MDM's ELBO; with
    weighting="unweighted" (training only) the low-variance variant, the plain CE of every
    position's clean token. Evaluation always reports the NELBO."""
    del mask_id
    x0 = tokens
    b, length = x0.shape
    k_t, k_move, k_tok, k_len = jax.random.split(key, 4)
    t = (1.0 - args.eps) * sample_t(k_t, b, args.t_sampling) + args.eps
    alpha = uniform_alpha(t, args.eps)
    vocab = head_kernel(params).shape[-1]
    move = jax.random.uniform(k_move, (b, length)) < (1.0 - alpha)[:, None]
    z = jnp.where(move, jax.random.randint(k_tok, (b, length), 0, vocab), x0)
    lengths, valid_len = None, jnp.asarray(length)
    valid = jnp.ones((b, length), jnp.float32)
    if train and args.variable_length_prob > 0:
        valid_len = sample_length(k_len, length, args.variable_length_prob)
        lengths = jnp.full((b,), valid_len, jnp.int32)
        valid = (jnp.arange(length)[None, :] < valid_len).astype(jnp.float32) * valid
    hidden = apply_fn({"params": params}, z, lengths, sigma=-jnp.log(alpha))
    head = head_kernel(params)
    if args.weighting == "unweighted" and train:
        total = chunked_cross_entropy(hidden, head, x0, valid, args.loss_chunk)
    else:
        per_alpha = jnp.broadcast_to(alpha[:, None], (b, length))
        total = chunked_token_loss(
            hidden, head, functools.partial(uniform_nelbo, dalpha=-(1.0 - args.eps)),
            (x0, z, per_alpha), valid, args.loss_chunk)
    loss = total / (b * valid_len.astype(jnp.float32))
    return loss, {"loss": loss, "noise_rate": jnp.mean(z != x0), "length": valid_len}


def eso_alpha(t: jax.Array, alpha0: float, eps: float) -> jax.Array:
    """Eso-LM's log-linear schedule: alpha_t = alpha0 (1 - (1 - eps) t), the probability that
    a token is still clean at time t; at t = 0 a share 1 - alpha0 is masked (left for the
    left-to-right phase). d alpha / dt = -alpha0 (1 - eps)."""
    return alpha0 * (1.0 - (1.0 - eps) * t)


def eso_diffusion_term(apply_fn, params, x0, valid, key, args: ObjectiveArgs, mask_id: int,
                       weighted: bool):
    """Sum over the masked tokens of w(t) CE (weighted) or CE (the low-variance form) under
    the order-aware causal attention: t drawn per row as args.t_sampling says and floored at
    eps, each token masked w.p. 1 - alpha_t, w(t) = -alpha'_t / (1 - alpha_t) (1/t at
    alpha0 = 1); under args.masking="count" a fixed count of masks instead (count_masking,
    mask rates from 1 - alpha0 to 1). Returns (sum, mask rate)."""
    b, _ = x0.shape
    k_t, k_mask, k_order = jax.random.split(key, 3)
    if args.masking == "count":  # the bound itself (no eps): see count_masking
        masked, weight = count_masking(k_mask, sample_t(k_t, b, args.t_sampling), valid,
                                       floor=1.0 - args.alpha0)
    else:
        t = (1.0 - args.eps) * sample_t(k_t, b, args.t_sampling) + args.eps
        alpha = eso_alpha(t, args.alpha0, args.eps)
        masked = (jax.random.uniform(k_mask, x0.shape) < (1.0 - alpha)[:, None]) & valid
        weight = args.alpha0 * (1.0 - args.eps) / (1.0 - alpha)
    if not weighted:
        weight = jnp.ones((b,), jnp.float32)
    shuffle = jax.random.uniform(k_order, x0.shape) if args.shuffle else None
    order = orders.order_of(orders.sort_keys(masked, valid, shuffle))
    hidden = orders.diffusion_hidden(apply_fn, params, jnp.where(masked, mask_id, x0), order)
    weights = orders.in_order(masked, order) * weight[:, None]
    total = chunked_cross_entropy(hidden, head_kernel(params), orders.in_order(x0, order),
                                  weights, args.loss_chunk)
    return total, jnp.mean(masked)


def eso_sequential_term(apply_fn, params, x0, valid, key, args: ObjectiveArgs, mask_id: int):
    """Sum over the tokens still masked at t = 0 (each w.p. 1 - alpha0) of CE from the 2L
    sequential pass: clean tokens in random order, then the masked ones left to right."""
    k_mask, k_order = jax.random.split(key)
    masked = (jax.random.uniform(k_mask, x0.shape) < 1.0 - args.alpha0) & valid
    shuffle = jax.random.uniform(k_order, x0.shape) if args.shuffle else None
    keys = orders.sort_keys(masked, valid, shuffle, masks_left_to_right=True)
    order = orders.order_of(keys)
    hidden = orders.sequential_hidden(apply_fn, params, jnp.where(masked, mask_id, x0), x0,
                                      order)
    return chunked_cross_entropy(hidden, head_kernel(params), orders.in_order(x0, order),
                                 orders.in_order(masked, order).astype(jnp.float32),
                                 args.loss_chunk)


def eso_loss(apply_fn: Callable, params, tokens, key, args: ObjectiveArgs, mask_id: int,
             train: bool = True):
    """Eso-LM's NELBO in nats per token: the masked-diffusion term (order-aware attention,
    weight -alpha'_t / (1 - alpha_t)) on the first batch_split share of the rows, plus the
    left-to-right term on the rest; each term's sum is divided by its own rows' valid tokens
    (s-sahoo/Eso-LMs `EsoLM._loss`). alpha0 = 1 trains only the first, alpha0 = 0 only the
    second. weighting="unweighted" (training only): the low-variance form, plain CE on the
    masked tokens, still / valid tokens. Evaluation (train=False): the weighted NELBO with
    both terms on every row (same expectation, less variance)."""
    x0 = tokens
    b, length = x0.shape
    k_diff, k_seq, k_len = jax.random.split(key, 3)
    valid_len = jnp.asarray(length)
    if train and args.variable_length_prob > 0:
        valid_len = sample_length(k_len, length, args.variable_length_prob)
    valid = jnp.broadcast_to(jnp.arange(length)[None, :] < valid_len, (b, length))
    split = int(families.eso_batch_split(args.alpha0, args.batch_split) * b) if train else b
    diff_rows = slice(0, split if args.alpha0 > 0 else 0)
    seq_rows = slice(split if train else 0, b if args.alpha0 < 1 else 0)
    per_row = valid_len.astype(jnp.float32)
    diffusion = sequential = mask_rate = jnp.zeros((), jnp.float32)
    if args.alpha0 > 0:
        weighted = not (train and args.weighting == "unweighted")
        total, mask_rate = eso_diffusion_term(apply_fn, params, x0[diff_rows], valid[diff_rows],
                                              k_diff, args, mask_id, weighted)
        diffusion = total / (per_row * (diff_rows.stop - diff_rows.start))
    if args.alpha0 < 1:
        total = eso_sequential_term(apply_fn, params, x0[seq_rows], valid[seq_rows], k_seq,
                                    args, mask_id)
        sequential = total / (per_row * (seq_rows.stop - seq_rows.start))
    loss = diffusion + sequential
    return loss, {"loss": loss, "diffusion_term": diffusion, "sequential_term": sequential,
                  "mask_rate": mask_rate, "length": valid_len}


# The family table of losses: (apply_fn, params, tokens [B, L + family.inputs_extra], key,
# args, mask_id, train) -> (loss, metrics).
OBJECTIVES = {"mdm": mdm_loss, "mdm-ce": mdm_ce_loss, "uniform": uniform_loss, "eso": eso_loss,
              "arm": arm_loss}
