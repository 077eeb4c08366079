"""Log-likelihoods of a continuation given a context, for every family (jitted, batched).

`SCORERS` and `GREEDY` are the family tables: each family's estimators and its greedy check.
MDMs (lower bounds in expectation): "mc" (SMDM: t stratified over the draws, each continuation
token masked w.p. (1 - eps) t + eps, -sum of masked CE / p), "llada" (exactly l of the m
tokens masked, l uniform in 1..m, weight m / l) and "chain" (SMDM's left-to-right chain rule,
m passes); with our time-independent model both Monte Carlo forms estimate the same number,
checked against enumerating every mask in the tests. Unsupervised guidance: cond + w (cond -
uncond), uncond with the context masked, one batched call. Uniform-state diffusion: its NELBO
with the context clean (`uniform_likelihood`). ARMs: exact, one causal pass. `is_greedy`:
the ARM's argmax, or the family's sampler at temperature 0, one token per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax import families
from mdm_jax.errors import UserError
from mdm_jax.eval.uniform_likelihood import uniform_batch
from mdm_jax.inference.mdm import guided_logits
from mdm_jax.model import Encoder

ESTIMATORS = tuple(dict.fromkeys(e for f in families.RECORDS for e in f.estimators))


class EvalError(UserError, ValueError):
    """An evaluation request that cannot work; the message names the option and the fix."""


@dataclasses.dataclass(frozen=True)
class Estimator:
    kind: str = ""  # one of the family's estimators; "" = its default (the first)
    mc_num: int = 128  # Monte Carlo draws (mc, llada)
    batch_size: int = 32  # draws (or chain passes) per network call
    cfg: float = 0.0
    eps: float = 1e-3  # SMDM's mask probability floor (mc only)


def check_estimator(e: Estimator, family: families.Family) -> Estimator:
    """The estimator with its default resolved for this family; one-line errors otherwise."""
    e = dataclasses.replace(e, kind=e.kind or family.estimators[0])
    family.check_estimator(e.kind)
    if e.cfg:
        family.check_guidance()
    if e.batch_size < 1 or e.mc_num < 1:
        raise EvalError(f"mc_num={e.mc_num}, batch_size={e.batch_size}: give 1 or more")
    if e.kind in ("mc", "llada") and e.mc_num % e.batch_size:
        raise EvalError(f"mc_num={e.mc_num} is not divisible by batch_size={e.batch_size}; "
                        f"give an mc_num that is a multiple of batch_size (e.g. "
                        f"{e.batch_size * max(1, e.mc_num // e.batch_size)})")
    if not (e.cfg >= 0 and math.isfinite(e.cfg)):
        raise EvalError(f"cfg={e.cfg}: give 0 (off) or a positive weight")
    return e


def _bucket(n: int, limit: int) -> int:
    """Pad lengths to multiples of 32 (at most `limit`): few shapes, few compiles."""
    return min(limit, 32 * math.ceil(n / 32))


def _guided_log_probs(model: Encoder, params, x, lengths, context_mask, cfg: float):
    """Log-probabilities from the samplers' guided logits (one batched call when guided)."""
    return jax.nn.log_softmax(guided_logits(model, params, x, context_mask, lengths, cfg), -1)


@functools.partial(jax.jit, static_argnames=("model", "kind", "cfg", "eps"))
def _mc_batch(model: Encoder, params, tokens, context_len, length, key, offset, total, *,
              kind: str, cfg: float, eps: float):
    """Log-likelihood estimates [batch] from one batch of draws of one (context, continuation)
    tokens [batch, L] (identical rows; positions >= length are padding)."""
    b, width = tokens.shape
    pos = jnp.arange(width)[None, :]
    target = (pos >= context_len) & (pos < length)
    m = length - context_len
    k_t, k_mask = jax.random.split(key)
    if kind == "mc":
        u = jax.random.uniform(k_t, ())
        t = jnp.mod(u + (offset + jnp.arange(b)) / total, 1.0)  # stratified over all draws
        p = (1.0 - eps) * t + eps
        masked = target & (jax.random.uniform(k_mask, (b, width)) < p[:, None])
        weight = 1.0 / p
    else:  # llada: exactly l of the m targets, l uniform in 1..m
        n_mask = jax.random.randint(k_t, (b,), 1, m + 1)
        scores = jnp.where(target, jax.random.uniform(k_mask, (b, width)), 2.0)
        rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
        masked = target & (rank < n_mask[:, None])
        weight = m / n_mask
    x = jnp.where(masked, model.args.mask_id, tokens)
    lengths = jnp.full((b,), length, jnp.int32)
    logp = _guided_log_probs(model, params, x, lengths, pos < context_len, cfg)
    token_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(masked, token_logp, 0.0), axis=-1) * weight


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _chain_batch(model: Encoder, params, tokens, context_len, length, ks, *, cfg: float):
    """log p(token context_len + k | context, tokens before it; the rest masked) for each k."""
    width = tokens.shape[1]
    pos = jnp.arange(width)[None, :]
    target_pos = context_len + ks  # [batch]
    masked = (pos >= target_pos[:, None]) & (pos < length)
    x = jnp.where(masked, model.args.mask_id, tokens)
    lengths = jnp.full((ks.shape[0],), length, jnp.int32)
    logp = _guided_log_probs(model, params, x, lengths, pos < context_len, cfg)
    at = jnp.take_along_axis(logp, target_pos[:, None, None], axis=1)[:, 0]  # [batch, V]
    token = jnp.take_along_axis(tokens, target_pos[:, None], axis=1)[:, 0]
    valid = ks < length - context_len
    return jnp.where(valid, jnp.take_along_axis(at, token[:, None], axis=-1)[:, 0], 0.0)


@functools.partial(jax.jit, static_argnames=("model",))
def _arm_scores(model: Encoder, params, tokens, context_len, length):
    """(sum of log p(continuation), every continuation token the argmax) from one pass."""
    logp = jax.nn.log_softmax(model.apply({"params": params}, tokens, return_logits=True), -1)
    pred_logp = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    pos = jnp.arange(1, tokens.shape[1])[None, :]
    target = (pos >= context_len) & (pos < length)
    greedy = jnp.argmax(logp[:, :-1], axis=-1) == tokens[:, 1:]
    return (jnp.sum(jnp.where(target, pred_logp, 0.0), axis=-1),
            jnp.all(jnp.where(target, greedy, True), axis=-1))


@dataclasses.dataclass
class Score:
    logprob: float  # estimate of log p(continuation | context), nats
    stderr: float  # standard error of the estimate (0 for exact ones)
    draws: np.ndarray | None = None  # the Monte Carlo draws (mc, llada)


def _draws(batch_fn, row, e: Estimator, seed: int) -> Score:
    """Mean and standard error of e.mc_num Monte Carlo draws, e.batch_size per call."""
    key = jax.random.PRNGKey(seed)
    batch = jnp.asarray(np.repeat(row, e.batch_size, axis=0))
    draws = np.concatenate([np.asarray(batch_fn(batch, jax.random.fold_in(key, i),
                                                i * e.batch_size))
                            for i in range(e.mc_num // e.batch_size)])
    stderr = float(draws.std(ddof=1) / math.sqrt(len(draws))) if len(draws) > 1 else 0.0
    return Score(float(draws.mean()), stderr, draws)


def _masked_score(model, params, row, c, length, e: Estimator, seed: int) -> Score:
    if e.kind == "chain":
        m = int(length) - int(c)
        batch = jnp.asarray(np.repeat(row, e.batch_size, axis=0))
        terms = [np.asarray(_chain_batch(model, params, batch, c, length,
                                         jnp.arange(k, k + e.batch_size, dtype=jnp.int32),
                                         cfg=e.cfg)) for k in range(0, m, e.batch_size)]
        return Score(float(np.sum(np.concatenate(terms)[:m])), 0.0)
    return _draws(lambda batch, key, offset: _mc_batch(
        model, params, batch, c, length, key, offset, e.mc_num, kind=e.kind, cfg=e.cfg,
        eps=e.eps), row, e, seed)


def _uniform_score(model, params, row, c, length, e: Estimator, seed: int) -> Score:
    return _draws(lambda batch, key, offset: uniform_batch(
        model, params, batch, c, length, key, offset, e.mc_num, eps=e.eps), row, e, seed)


def _arm_score(model, params, row, c, length, e: Estimator, seed: int) -> Score:
    if int(c) < 1:
        raise EvalError("an ARM needs at least one context token (BOS) to score from")
    return Score(float(_arm_scores(model, params, jnp.asarray(row), c, length)[0][0]), 0.0)


# The family table of likelihoods: (model, params, row [1, width] of context + continuation,
# context length, total length, resolved Estimator, seed) -> Score.
SCORERS = {"mdm": _masked_score, "mdm-ce": _masked_score, "uniform": _uniform_score,
           "arm": _arm_score}


def _row(context: list[int], continuation: list[int], limit: int) -> np.ndarray:
    n = len(context) + len(continuation)
    if n > limit:
        raise EvalError(f"context + continuation is {n} tokens, beyond the model's {limit}; "
                        f"shorten the context (or chunk the text)")
    row = np.zeros((1, _bucket(n, limit)), np.int32)
    row[0, :n] = context + continuation
    return row


def loglikelihood(model: Encoder, params, context: list[int], continuation: list[int],
                  estimator: Estimator = Estimator(), seed: int = 0,
                  max_length: int | None = None) -> Score:
    """log p(continuation | context) for one pair of token lists, by the family's estimator."""
    family = families.get(model.args.family)
    e = check_estimator(estimator, family)
    if not continuation:
        return Score(0.0, 0.0)
    row = _row(context, continuation, max_length or model.args.max_seq_len)
    return SCORERS[family.name](model, params, row, jnp.int32(len(context)),
                                jnp.int32(len(context) + len(continuation)), e, seed)


def _sampler_greedy(model, params, context, continuation, max_length) -> bool:
    from mdm_jax.inference import MDMSampler, generate

    m = len(continuation)
    g = generate(model, params, [context], m, MDMSampler(steps=m, temperature=0.0),
                 max_length=max_length)
    return g.answers()[0] == list(continuation)


def _arm_greedy(model, params, context, continuation, max_length) -> bool:
    row = _row(context, continuation, max_length or model.args.max_seq_len)
    n = len(context) + len(continuation)
    return bool(_arm_scores(model, params, jnp.asarray(row), jnp.int32(len(context)),
                            jnp.int32(n))[1][0])


# The family table of greedy checks: (model, params, context, continuation, max_length) -> bool.
GREEDY = {"mdm": _sampler_greedy, "mdm-ce": _sampler_greedy, "uniform": _sampler_greedy,
          "arm": _arm_greedy}


def is_greedy(model: Encoder, params, context: list[int], continuation: list[int],
              max_length: int | None = None) -> bool:
    """Whether greedy generation from `context` produces exactly `continuation`."""
    if not continuation:
        return True
    return GREEDY[model.args.family](model, params, context, continuation, max_length)
