"""Log-likelihoods of continuations given contexts, for every family (jitted, batched across
requests).

`SCORERS` and `GREEDY` are the family tables: each family's estimators and its greedy check.
MDMs (lower bounds in expectation): "mc" (SMDM: t stratified over the draws, each continuation
token masked w.p. (1 - eps) t + eps, -sum of masked CE / p; eps 0 by default, as SMDM
evaluates), "llada" (exactly l of the m
tokens masked, l uniform in 1..m, weight m / l) and "chain" (SMDM's left-to-right chain rule,
m passes); with our time-independent model both Monte Carlo forms estimate the same number,
checked against enumerating every mask in the tests. Unsupervised guidance: cond + w (cond -
uncond), uncond with the context masked, one batched call. Uniform-state diffusion: its NELBO
with the context clean (`uniform_likelihood`); interpolating diffusion likewise
(`eso_likelihood`). ARMs: exact, one causal pass. `is_greedy`:
the ARM's argmax, or the family's sampler at temperature 0, one token per step.

Batching (`loglikelihoods`, `greedy_flags`): every request of a run is scored together.
Network calls hold rows of one width (a multiple of 8 tokens) and read the head at the
continuation's positions only (a multiple of 8 of them), so a run compiles a few shapes; a
call holds request_batch x Estimator.batch_size rows (the ARM's: request_batch). The Monte
Carlo draws come in chunks of Estimator.batch_size, each a function of its request's seed, its
index and its request's own 32-token bucket (the shape its random fields are drawn in), never
of what shares its call; the MDMs score each distinct mask of a request once (a continuation
of m tokens has at most 2^m - 1, and most draws of a short one repeat). So a request scores
the same alone as in any batch (to float rounding), and the same as when requests were scored
one chunk at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax import families
from mdm_jax.errors import UserError, option
from mdm_jax.eval.eso_likelihood import eso_chunks
from mdm_jax.eval.uniform_likelihood import uniform_chunks
from mdm_jax.model import Encoder, head_kernel, logits_from_hidden

ESTIMATORS = tuple(dict.fromkeys(e for f in families.RECORDS for e in f.estimators))


class EvalError(UserError, ValueError):
    """An evaluation request that cannot work; the message names the option and the fix."""


@dataclasses.dataclass(frozen=True)
class Estimator:
    kind: str = ""  # one of the family's estimators; "" = its default (the first)
    mc_num: int = 128  # Monte Carlo draws (mc, llada)
    batch_size: int = 32  # draws per chunk (with the seed, they fix the draws); rows per call
    # are request_batch x batch_size
    cfg: float = 0.0
    # The floor on the noise level t (mask probability (1 - eps) t + eps). None: the family's
    # reference value, 0 for the masked families (SMDM's evaluate_diff.py: the bound itself;
    # a t = 0 draw masks nothing and weighs 0) and 1e-3 for uniform and eso (their references'
    # sampling_eps, which their NELBOs need: 1 - alpha_t > 0).
    eps: float | None = None


def check_estimator(e: Estimator, family: families.Family) -> Estimator:
    """The estimator with its default resolved for this family; one-line errors otherwise
    (naming each option as the caller spells it: errors.option)."""
    e = dataclasses.replace(e, kind=e.kind or family.estimators[0])
    family.check_estimator(e.kind)
    if e.eps is None:
        e = dataclasses.replace(e, eps=0.0 if "eps" in family.estimator_options else 1e-3)
    if e.cfg:
        family.check_guidance()
    if e.batch_size < 1 or e.mc_num < 1:
        raise EvalError(f"{option('mc_num', e.mc_num)}, {option('batch_size', e.batch_size)}: "
                        f"give 1 or more")
    if e.kind in ("mc", "llada") and e.mc_num % e.batch_size:
        raise EvalError(f"{option('mc_num', e.mc_num)} is not divisible by "
                        f"{option('batch_size', e.batch_size)}; give an {option('mc_num')} "
                        f"that is a multiple of {option('batch_size')} (e.g. "
                        f"{e.batch_size * max(1, e.mc_num // e.batch_size)})")
    if not (e.cfg >= 0 and math.isfinite(e.cfg)):
        raise EvalError(f"{option('cfg', e.cfg)}: give 0 (off) or a positive weight")
    if not 0 <= e.eps < 1:
        raise EvalError(f"{option('eps', e.eps)}: give a mask probability floor in [0, 1) "
                        f"(SMDM evaluates with 0, trains with 1e-3)")
    return e


def draw_width(n: int, limit: int) -> int:
    """The width a request of n tokens draws its random fields in: n rounded up to a multiple
    of 32 (at most `limit`), whatever width its network call has."""
    return min(limit, 32 * math.ceil(n / 32))


def call_width(n: int, limit: int) -> int:
    """The width of the network call that scores a request of n tokens: n rounded up to a
    multiple of 8 (at most `limit`; so never more than `draw_width`): little padding (the
    encoder's work grows with the width), few compiled shapes."""
    return min(limit, 8 * math.ceil(n / 8))


def span_width(m: int, width: int) -> int:
    """Positions a call reads the head at for continuations of up to m tokens: m rounded up
    to a multiple of 8 (at most the call's width)."""
    return min(width, 8 * math.ceil(m / 8))


def span_log_probs(model: Encoder, params, x_RxL, tokens_RxL, lengths_R, start_R, span: int,
                   context_RxL=None, cfg: float = 0.0):
    """log p(tokens_RxL) [R, span] at positions start_R + 0 .. span - 1 of canvas x_RxL (the
    rest of a row is read by the encoder, not by the head: the continuation's positions
    only; positions past the row are clipped, for the caller to ignore). Guided when cfg > 0:
    cond + cfg (cond - uncond), uncond with context_RxL masked, one batched call."""
    width = x_RxL.shape[1]
    at_RxS = jnp.minimum(start_R[:, None] + jnp.arange(span)[None, :], width - 1)
    x_in, lengths_in, at_in = x_RxL, lengths_R, at_RxS
    if cfg:
        uncond_RxL = jnp.where(context_RxL, model.args.mask_id, x_RxL)
        x_in = jnp.concatenate([x_RxL, uncond_RxL])
        lengths_in = jnp.concatenate([lengths_R, lengths_R])
        at_in = jnp.concatenate([at_RxS, at_RxS])
    hidden = model.apply({"params": params}, x_in, lengths_in)
    picked = jnp.take_along_axis(hidden, at_in[..., None], axis=1)
    logits = logits_from_hidden(picked, head_kernel(params))
    if cfg:
        cond_RxSxV, uncond_RxSxV = jnp.split(logits, 2)
        logits = cond_RxSxV + cfg * (cond_RxSxV - uncond_RxSxV)
    tokens_RxS = jnp.take_along_axis(tokens_RxL, at_RxS, axis=1)
    picked_RxS = jnp.take_along_axis(logits, tokens_RxS[..., None], axis=-1)[..., 0]
    return picked_RxS - jax.nn.logsumexp(logits, axis=-1)  # no [R, S, V] log-softmax written


@functools.partial(jax.jit, static_argnames=("kind", "eps", "draws", "total", "draw_width",
                                             "width"))
def draw_masks(context_len_N, length_N, seed_N, chunk_N, *, kind: str, eps: float, draws: int,
               total: int, draw_width: int, width: int):
    """(masks [N, draws, width] bool, weights [N, draws]) of N chunks of Monte Carlo draws:
    chunk i holds draws chunk * draws ... (chunk + 1) * draws - 1 of `total` of a request of
    context_len_N[i] context tokens and length_N[i] in all, drawn from PRNGKey(seed_N[i])
    folded with the chunk, in `draw_width` columns (of which the first `width` are kept).
    mc: t stratified over the draws, each continuation token masked w.p. p = (1 - eps) t + eps,
    weight 1 / p; llada: exactly l of the m continuation tokens, l uniform in 1..m, weight
    m / l."""
    pos_1xL = jnp.arange(width)[None, :]

    def masks(seed, chunk, context_len, length):
        k_t, k_mask = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), chunk))
        target_1xL = (pos_1xL >= context_len) & (pos_1xL < length)
        coin_BxL = jax.random.uniform(k_mask, (draws, draw_width))[:, :width]
        if kind == "mc":
            u = jax.random.uniform(k_t, ())
            t_B = jnp.mod(u + (chunk * draws + jnp.arange(draws)) / total, 1.0)
            p_B = (1.0 - eps) * t_B + eps
            # eps 0 (SMDM's evaluation): t = 0 masks nothing, and its weight must not be inf
            return (target_1xL & (coin_BxL < p_B[:, None]),
                    jnp.where(p_B > 0, 1.0 / jnp.maximum(p_B, 1e-30), 0.0))
        m = length - context_len
        n_mask_B = jax.random.randint(k_t, (draws,), 1, m + 1)
        scores_BxL = jnp.where(target_1xL, coin_BxL, 2.0)
        rank_BxL = jnp.argsort(jnp.argsort(scores_BxL, axis=-1), axis=-1)
        return target_1xL & (rank_BxL < n_mask_B[:, None]), m / n_mask_B

    return jax.vmap(masks)(seed_N, chunk_N, context_len_N, length_N)


@functools.partial(jax.jit, static_argnames=("model", "cfg", "span"))
def masked_rows(model: Encoder, params, tokens_RxL, hidden_RxL, scored_RxL, context_len_R,
                length_R, *, cfg: float, span: int):
    """Sum over the scored positions of log p(token | the row with its hidden positions
    masked) [R]: row r is a request (context_len_R[r] context tokens, length_R[r] in all,
    padding after), its scored positions in [context_len, context_len + span)."""
    width = tokens_RxL.shape[1]
    context_RxL = jnp.arange(width)[None, :] < context_len_R[:, None]
    token_logp_RxS = span_log_probs(
        model, params, jnp.where(hidden_RxL, model.args.mask_id, tokens_RxL), tokens_RxL,
        length_R, context_len_R, span, context_RxL, cfg)
    at_RxS = context_len_R[:, None] + jnp.arange(span)[None, :]
    scored_RxS = (jnp.take_along_axis(scored_RxL, jnp.minimum(at_RxS, width - 1), axis=1)
                  & (at_RxS < length_R[:, None]))
    return jnp.sum(jnp.where(scored_RxS, token_logp_RxS, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "span"))
def arm_rows(model: Encoder, params, tokens_NxL, context_len_N, length_N, *, span: int):
    """(sum of log p(continuation) [N], every continuation token the argmax [N]) from one
    causal pass over each row (at most `span` continuation tokens)."""
    width = tokens_NxL.shape[1]
    at_NxS = context_len_N[:, None] - 1 + jnp.arange(span)[None, :]  # predicting at + 1
    read_NxS = jnp.minimum(at_NxS, width - 2)
    hidden_NxLxD = model.apply({"params": params}, tokens_NxL)
    picked_NxSxD = jnp.take_along_axis(hidden_NxLxD, read_NxS[..., None], axis=1)
    logp_NxSxV = jax.nn.log_softmax(logits_from_hidden(picked_NxSxD, head_kernel(params)), -1)
    next_NxS = jnp.take_along_axis(tokens_NxL, read_NxS + 1, axis=1)
    pred_logp_NxS = jnp.take_along_axis(logp_NxSxV, next_NxS[..., None], axis=-1)[..., 0]
    target_NxS = at_NxS + 1 < length_N[:, None]
    greedy_NxS = jnp.argmax(logp_NxSxV, axis=-1) == next_NxS
    return (jnp.sum(jnp.where(target_NxS, pred_logp_NxS, 0.0), axis=-1),
            jnp.all(jnp.where(target_NxS, greedy_NxS, True), axis=-1))


@dataclasses.dataclass
class Score:
    logprob: float  # estimate of log p(continuation | context), nats
    stderr: float  # standard error of the estimate (0 for exact ones)
    draws: np.ndarray | None = None  # the Monte Carlo draws (mc, llada)


# ---- packing work into a few shapes ---------------------------------------------------------

def _call_size(items: int, size: int) -> int:
    """Items per call for `items` of one shape: `size`, or for fewer the next power of two
    (a few shapes, little padding)."""
    return min(size, 1 << (items - 1).bit_length())


def in_calls(items: list, shape: Callable, size: int, call: Callable, bar=None) -> list:
    """call(shape, items) for the items grouped by shape(item), `size` per call (padded with
    repeats of the last, whose results are dropped); one result per item, in order."""
    out = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: (shape(items[i]), i))
    for key, group in itertools.groupby(order, key=lambda i: shape(items[i])):
        group = list(group)
        for start in range(0, len(group), size):
            these = group[start:start + size]
            n = _call_size(len(these), size)  # the last call: the next power of two
            results = call(key, [items[i] for i in these + these[-1:] * (n - len(these))])
            for i, result in zip(these, list(results)[:len(these)], strict=True):
                out[i] = result
            if bar is not None:
                bar.update(len(these))
    return out


class Requests:
    """Token rows of (context, continuation) requests, for one network call at a time."""

    def __init__(self, requests, limit: int):
        for context, continuation in requests:
            n = len(context) + len(continuation)
            if n > limit:
                raise EvalError(f"context + continuation is {n} tokens, beyond the model's "
                                f"{limit}; shorten the context (or chunk the text)")
        self.requests, self.limit = requests, limit

    def draw_width(self, r: int) -> int:
        return draw_width(sum(map(len, self.requests[r])), self.limit)

    def shape(self, r: int) -> tuple[int, int]:
        """(call width, span) of request r."""
        c, x = self.requests[r]
        width = call_width(len(c) + len(x), self.limit)
        return width, span_width(len(x), width)

    def arrays(self, rs: list[int], width: int):
        """(tokens [N, width], context lengths [N], lengths [N]) of requests rs."""
        tokens_NxL = np.zeros((len(rs), width), np.int32)
        for row, r in zip(tokens_NxL, rs, strict=True):
            row[:sum(map(len, self.requests[r]))] = self.requests[r][0] + self.requests[r][1]
        return (jnp.asarray(tokens_NxL),
                jnp.asarray([len(self.requests[r][0]) for r in rs], jnp.int32),
                jnp.asarray([sum(map(len, self.requests[r])) for r in rs], jnp.int32))


def _score_rows(model, params, reqs: Requests, rows: list, cfg: float, size: int,
                bar) -> list[np.float32]:
    """masked_rows over rows (request, hidden [width] bool, scored [width] bool)."""
    def call(shape, batch):
        width, span = shape
        tokens, context_len, length = reqs.arrays([r for r, _, _ in batch], width)
        return np.asarray(masked_rows(model, params, tokens,
                                      jnp.asarray(np.stack([h for _, h, _ in batch])),
                                      jnp.asarray(np.stack([s for _, _, s in batch])),
                                      context_len, length, cfg=cfg, span=span))

    return in_calls(rows, lambda row: reqs.shape(row[0]), size, call, bar)


def _masked_scores(model, params, reqs: Requests, seeds, e: Estimator, request_batch: int,
                   bar) -> list[Score]:
    """The MDM estimators. A network row is a request with some continuation positions
    masked: mc and llada draw the masks (draw_masks) and score each distinct one once (a
    short continuation has few: 3 for two tokens), chain masks position k and after."""
    size = request_batch * e.batch_size
    todo = [r for r, (_, x) in enumerate(reqs.requests) if x]
    if e.kind == "chain":
        rows = []
        for r in todo:
            c, x = reqs.requests[r]
            pos = np.arange(reqs.shape(r)[0])
            rows += [(r, (pos >= len(c) + k) & (pos < len(c) + len(x)), pos == len(c) + k)
                     for k in range(len(x))]
        values = iter(_score_rows(model, params, reqs, rows, e.cfg, size, bar))
        return [Score(float(np.sum(np.array([next(values) for _ in x], np.float32))), 0.0)
                if x else Score(0.0, 0.0) for _, x in reqs.requests]
    b = e.batch_size
    chunks = [(r, j) for r in todo for j in range(e.mc_num // b)]

    def draw(width, batch):  # in the draw width, whatever the call width
        _, context_len, length = reqs.arrays([r for r, _ in batch], width)
        masks, weights = draw_masks(context_len, length,
                                    jnp.asarray([seeds[r] for r, _ in batch], jnp.int32),
                                    jnp.asarray([j for _, j in batch], jnp.int32),
                                    kind=e.kind, eps=e.eps, draws=b, total=e.mc_num,
                                    draw_width=width, width=width)
        return zip(np.asarray(masks), np.asarray(weights), strict=True)

    drawn = iter(in_calls(chunks, lambda chunk: reqs.draw_width(chunk[0]), size, draw))
    plans, rows = {}, []  # request -> (its distinct masks, each draw's among them, weights)
    for r in todo:
        these = [next(drawn) for _ in range(e.mc_num // b)]
        masks_r = np.concatenate([m for m, _ in these])[:, :reqs.shape(r)[0]]  # no target after
        unique, which = np.unique(masks_r, axis=0, return_inverse=True)
        plans[r] = unique, which.reshape(-1), np.concatenate([w for _, w in these])
        rows += [(r, mask, mask) for mask in unique if mask.any()]
    values = iter(_score_rows(model, params, reqs, rows, e.cfg, size, bar))
    scores = []
    for r, (_, x) in enumerate(reqs.requests):
        if not x:
            scores.append(Score(0.0, 0.0))
            continue
        unique, which, weights = plans[r]
        summed = np.array([next(values) if m.any() else 0.0 for m in unique], np.float32)
        scores.append(_mean(summed[which] * weights))  # every draw, from its mask's row
    return scores


def _mean(draws: np.ndarray) -> Score:
    """Mean and standard error of a request's Monte Carlo draws."""
    stderr = float(draws.std(ddof=1) / math.sqrt(len(draws))) if len(draws) > 1 else 0.0
    return Score(float(draws.mean()), stderr, draws)


def _drawn_scores(reqs: Requests, seeds, e: Estimator, request_batch: int, bar,
                  estimate: Callable) -> list[Score]:
    """Families whose every draw has its own noise level (no two rows alike): chunks of
    e.batch_size draws per request, estimate((width, span), tokens, context_len, length,
    seeds, chunks) -> [N, draws] per call of request_batch chunks."""
    b = e.batch_size
    chunks = [(r, j) for r, (_, x) in enumerate(reqs.requests) if x
              for j in range(e.mc_num // b)]

    def call(shape, batch):
        tokens, context_len, length = reqs.arrays([r for r, _ in batch], shape[0])
        return np.asarray(estimate(shape, tokens, context_len, length,
                                   jnp.asarray([seeds[r] for r, _ in batch], jnp.int32),
                                   jnp.asarray([j for _, j in batch], jnp.int32)))

    values = iter(in_calls(chunks, lambda chunk: reqs.shape(chunk[0]), request_batch, call, bar))
    scores = []
    for _, x in reqs.requests:
        if not x:
            scores.append(Score(0.0, 0.0))
            continue
        scores.append(_mean(np.concatenate([next(values) for _ in range(e.mc_num // b)])))
    return scores


def _uniform_scores(model, params, reqs: Requests, seeds, e: Estimator, request_batch: int,
                    bar) -> list[Score]:
    """Uniform-state diffusion: its NELBO with the context clean (uniform_chunks)."""
    def estimate(shape, *arrays):
        width, span = shape
        return uniform_chunks(model, params, *arrays, eps=e.eps, draws=e.batch_size,
                              total=e.mc_num, draw_width=draw_width(width, reqs.limit),
                              span=span)

    return _drawn_scores(reqs, seeds, e, request_batch, bar, estimate)


def _eso_scores(model, params, reqs: Requests, seeds, e: Estimator, request_batch: int,
                bar) -> list[Score]:
    """Interpolating diffusion: its NELBO with the context clean (eso_chunks)."""
    def estimate(shape, *arrays):
        return eso_chunks(model, params, *arrays, eps=e.eps, draws=e.batch_size,
                          total=e.mc_num, draw_width=draw_width(shape[0], reqs.limit))

    return _drawn_scores(reqs, seeds, e, request_batch, bar, estimate)


def _arm_passes(model, params, reqs: Requests, size: int, bar=None) -> list:
    """(log p(continuation), greedy) of every request with a continuation (None for the
    others): one causal pass each, `size` requests per call."""
    todo = [r for r, (_, x) in enumerate(reqs.requests) if x]

    def call(shape, batch):
        width, span = shape
        logprob, greedy = arm_rows(model, params, *reqs.arrays(batch, width), span=span)
        return zip(np.asarray(logprob), np.asarray(greedy), strict=True)

    values = iter(in_calls(todo, reqs.shape, size, call, bar))
    return [next(values) if x else None for _, x in reqs.requests]


def _arm_scores(model, params, reqs: Requests, seeds, e: Estimator, request_batch: int,
                bar) -> list[Score]:
    if any(x and not c for c, x in reqs.requests):
        raise EvalError("an ARM needs at least one context token (BOS) to score from")
    return [Score(float(v[0]), 0.0) if v else Score(0.0, 0.0)
            for v in _arm_passes(model, params, reqs, request_batch, bar)]


# The family table of likelihoods: (model, params, Requests, seeds, resolved Estimator,
# request_batch, progress bar) -> [Score].
SCORERS = {"mdm": _masked_scores, "mdm-ce": _masked_scores, "uniform": _uniform_scores,
           "eso": _eso_scores, "arm": _arm_scores}


def loglikelihoods(model: Encoder, params, requests: list[tuple[list[int], list[int]]],
                   estimator: Estimator = Estimator(), seeds: list[int] | None = None,
                   max_length: int | None = None, request_batch: int = 16,
                   progress: bool = False) -> list[Score]:
    """log p(continuation | context) for each (context, continuation) pair of token lists, by
    the family's estimator; request r draws from seeds[r] (default r). `request_batch`: chunks
    of estimator.batch_size rows per network call (the ARM: requests)."""
    from tqdm import tqdm

    family = families.get(model.args.family)
    e = check_estimator(estimator, family)
    if request_batch < 1:
        raise EvalError(f"{option('request_batch', request_batch)}: give 1 or more")
    reqs = Requests(requests, max_length or model.args.max_seq_len)
    seeds = list(range(len(requests))) if seeds is None else list(seeds)
    with tqdm(desc="loglikelihood", unit="row", disable=not progress) as bar:
        return SCORERS[family.name](model, params, reqs, seeds, e, request_batch, bar)


def loglikelihood(model: Encoder, params, context: list[int], continuation: list[int],
                  estimator: Estimator = Estimator(), seed: int = 0,
                  max_length: int | None = None, request_batch: int = 16) -> Score:
    """log p(continuation | context) for one pair of token lists, by the family's estimator."""
    return loglikelihoods(model, params, [(context, continuation)], estimator, [seed],
                          max_length, request_batch)[0]


# ---- greedy checks: would greedy generation from the context give the continuation? --------

def masked_answers(model: Encoder, params, prompts: list[list[int]], gen_length: int,
                   sampler, max_length: int, batch: int) -> list[list[int]]:
    """The MDM sampler's answers of `gen_length` tokens after each prompt, `batch` prompts per
    call on canvases padded to a multiple of 32 (`draw_width`: coarser than a likelihood
    call's, as a sampler run compiles slowly and computes little). Only for settings that draw
    nothing (temperature 0, low-confidence remasking): their answers do not depend on what
    shares a call."""
    from mdm_jax.inference import SAMPLERS

    assert sampler.temperature == 0 and sampler.remasking == "low_confidence", sampler

    def call(width, rows):
        canvas_NxL = np.zeros((len(rows), width), np.int32)
        for row, prompt in zip(canvas_NxL, rows, strict=True):
            row[:len(prompt)] = prompt
        out, _ = SAMPLERS[model.args.family](
            model, params, jnp.asarray(canvas_NxL),
            jnp.asarray([len(p) for p in rows], jnp.int32), jax.random.PRNGKey(0), sampler,
            gen_length, True)
        return [row[len(p):len(p) + gen_length].tolist()
                for row, p in zip(np.asarray(out), rows, strict=True)]

    return in_calls(prompts, lambda p: draw_width(len(p) + gen_length, max_length), batch, call)


def _sampler_greedy(model, params, reqs: Requests, batch: int,
                    alpha0: float | None = None, cfg: float = 0.0) -> list[bool]:
    """The family's sampler at temperature 0, one token per step, batched by continuation
    length (for eso at alpha0 = 0, its left-to-right phase alone: deterministic, where the
    diffusion phase's random order is not)."""
    from mdm_jax.inference import MDMSampler

    flags = [True] * len(reqs.requests)
    by_length = sorted((len(x), r) for r, (_, x) in enumerate(reqs.requests) if x)
    for m, group in itertools.groupby(by_length, key=lambda item: item[0]):
        rs = [r for _, r in group]
        answers = masked_answers(model, params, [reqs.requests[r][0] for r in rs], m,
                                 MDMSampler(steps=m, temperature=0.0, alpha0=alpha0, cfg=cfg),
                                 reqs.limit, batch)
        for r, answer in zip(rs, answers, strict=True):
            flags[r] = answer == list(reqs.requests[r][1])
    return flags


def _uniform_greedy(model, params, reqs: Requests, batch: int) -> list[bool]:
    """One request at a time: the ancestral sampler starts from noise drawn for its whole
    canvas, so sharing a call would change a request's draws."""
    from mdm_jax.inference import MDMSampler, generate

    return [not x or generate(model, params, [c], len(x), MDMSampler(steps=len(x)),
                              max_length=reqs.limit).answers()[0] == list(x)
            for c, x in reqs.requests]


def _arm_greedy(model, params, reqs: Requests, batch: int) -> list[bool]:
    """The argmax of the same causal pass as the likelihood, `batch` requests per call."""
    return [True if v is None else bool(v[1]) for v in _arm_passes(model, params, reqs, batch)]


# The family table of greedy checks: (model, params, Requests, requests per network call)
# -> [bool].
GREEDY = {"mdm": _sampler_greedy, "mdm-ce": _sampler_greedy, "uniform": _uniform_greedy,
          "eso": functools.partial(_sampler_greedy, alpha0=0.0), "arm": _arm_greedy}


def greedy_flags(model: Encoder, params, requests: list[tuple[list[int], list[int]]],
                 max_length: int | None = None, batch: int = 16,
                 cfg: float = 0.0) -> list[bool]:
    """Whether greedy generation from each context produces exactly its continuation; `batch`
    requests per network call (where the family's sampler allows: see GREEDY). `cfg`: the
    generation guided with that weight, as SMDM checks greediness with the guidance it scores
    with (`evaluate_diff.py`, `MDLMEvalHarness.suffix_greedy_prediction`); families without
    guidance refuse it."""
    reqs = Requests(requests, max_length or model.args.max_seq_len)
    check = GREEDY[model.args.family]
    if cfg:
        families.get(model.args.family).check_guidance()
        check = functools.partial(check, cfg=cfg)
    return check(model, params, reqs, batch)


def is_greedy(model: Encoder, params, context: list[int], continuation: list[int],
              max_length: int | None = None) -> bool:
    """Whether greedy generation from `context` produces exactly `continuation`."""
    return greedy_flags(model, params, [(context, continuation)], max_length)[0]
