"""MDM samplers: the reverse process, semi-autoregressive blocks, caching and guidance.

One jitted loop (`lax.fori_loop`, fixed shapes: no recompiles across steps) covers every
variant. The generation of each row is split into blocks of `block_length` tokens (one block
when 0: the whole answer at once); each block is denoised with `steps / n_blocks` steps, and no
position of a later block is revealed before the earlier block is complete (LLaDA's
semi-autoregressive sampling). Within a block, step j of n moves time from t = 1 - j/n to
s = 1 - (j+1)/n, and of the block's still-masked positions
  - "random" reveals each with probability 1 - s/t = 1/(n - j): the exact reverse process of
    the linear schedule;
  - "low_confidence" reveals the floor(#masked / (n - j)) most confident predictions (SMDM,
    LLaDA: an even share per step), the confidence being the predicted token's probability.
The last step of a block reveals what is left of it. `reveal_order="front"` is LLaDA's
schedule instead: a block of m masks reveals floor(m / n) each step plus one more on each of
the first m mod n steps (10 masks in 4 steps: 3, 3, 2, 2; ours: 2, 2, 3, 3), and with "random"
remasking it reveals that many at random (LLaDA's `generate`).

End tokens (LLaDA's options for instruct models): `forbid_ids` are never generated (their
logits are -inf: `logits_eos_inf`); a position whose prediction is one of `last_ids` gets
confidence 0, so it is revealed only when nothing more confident is left
(`confidence_eos_eot_inf`, whose other confidences are then taken over the remaining
vocabulary, as there).

Caching (RADD): our model is time-independent, so when a step revealed nothing the canvas, and
therefore the logits, are unchanged: the previous logits are reused and no network call is
made. The token choices still draw fresh noise, so the output is identical to sampling without
the cache; `nfe` counts the calls actually made.

Unsupervised classifier-free guidance (SMDM): `uncond` is the same canvas with the prompt
replaced by mask tokens, computed in the same batched call, and the logits are
`cond + w * (cond - uncond)` (= `uncond + (w + 1)(cond - uncond)`; exactly `cond` at w = 0).

Prompts may have different lengths: prompts are left-aligned, row b's prompt fills positions
[0, p_b) and its answer [p_b, p_b + gen_length); positions after that are padding the model
cannot attend to (the encoder's `lengths`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mdm_jax.errors import option
from mdm_jax.inference.tokens import NEG_INF, choose
from mdm_jax.model import Encoder, head_kernel, logits_from_hidden

REMASKING = ("low_confidence", "random")
REVEAL_ORDERS = ("even", "front")


@dataclasses.dataclass(frozen=True)
class MDMSampler:
    """Settings of one MDM sampling run (hashable: they are static under jit)."""

    steps: int = 64
    block_length: int = 0  # 0: one block (the whole answer)
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    cfg: float = 0.0  # unsupervised classifier-free guidance weight w
    cache: bool = False  # reuse the logits when a step revealed nothing (see BUILD_NOTES)
    alpha0: float | None = None  # eso: share of the answer made by diffusion (None: trained)
    reveal_order: str = "even"  # "front": LLaDA's, the extra reveals on a block's first steps
    forbid_ids: tuple[int, ...] = ()  # never generated (LLaDA: the EOS logit -inf)
    last_ids: tuple[int, ...] = ()  # revealed last (LLaDA: EOS and end-of-turn confidence 0)

    def blocks(self, gen_length: int) -> int:
        return 1 if self.block_length <= 0 else gen_length // self.block_length


def check(s: MDMSampler, gen_length: int) -> list[tuple[str, str]]:
    """Problems with these settings for `gen_length` answer tokens, as (option, message) pairs:
    the option's keyword, and a message naming it as the caller spells it (errors.option)."""
    problems = []
    if s.steps < 1:
        problems.append(("steps", f"{option('steps', s.steps)}: give 1 or more reverse steps"))
    if s.remasking not in REMASKING:
        problems.append(("remasking", f"{option('remasking', repr(s.remasking))}: choose one "
                                      f"of {', '.join(REMASKING)}"))
    if s.reveal_order not in REVEAL_ORDERS:
        problems.append(("reveal_order", f"{option('reveal_order', repr(s.reveal_order))}: "
                                         f"choose one of {', '.join(REVEAL_ORDERS)}"))
    if s.alpha0 is not None and not 0 <= s.alpha0 <= 1:
        problems.append(("alpha0", f"{option('alpha0', s.alpha0)}: give a share in [0, 1] "
                                   f"(1: all by diffusion, 0: left to right)"))
    if gen_length < 1:
        problems.append(("gen_length", f"{option('gen_length', gen_length)}: give 1 or more "
                                       f"tokens to generate"))
    if s.block_length < 0:
        problems.append(("block_length", f"{option('block_length', s.block_length)}: give 0 "
                                         f"(one block) or more"))
    elif s.block_length and gen_length % s.block_length:
        problems.append(("block_length", f"{option('block_length', s.block_length)} does not "
                                         f"divide {option('gen_length', gen_length)}; give a "
                                         f"divisor of it (or 0)"))
    elif s.steps >= 1 and s.steps % s.blocks(max(gen_length, 1)):
        problems.append(("steps", f"{option('steps', s.steps)} is not a multiple of the "
                                  f"{s.blocks(gen_length)} blocks; give a multiple so that "
                                  f"every block gets the same steps"))
    if not (s.temperature >= 0):
        problems.append(("temperature", f"{option('temperature', s.temperature)}: give 0 "
                                        f"(greedy) or more"))
    if s.top_k < 0:
        problems.append(("top_k", f"{option('top_k', s.top_k)}: give 0 (off) or more"))
    if not (0 < s.top_p <= 1):
        problems.append(("top_p", f"{option('top_p', s.top_p)}: give a number in (0, 1]"))
    if not (s.cfg >= 0):
        problems.append(("cfg", f"{option('cfg', s.cfg)}: give 0 (off) or a positive weight"))
    return problems


def guided_logits(model: Encoder, params, x, prompt_mask, lengths, cfg: float, at=None):
    """Logits [B, L, V] float32 for canvas x, guided with weight `cfg` (one network call, on
    2B rows when guided; prompt_mask [B, L] marks the prompt that `uncond` masks out). With
    `at` [B, P] (positions), the logits of those positions only [B, P, V]: the head and
    everything after it then cost P positions instead of L."""
    rows, row_lengths = x, lengths
    if cfg:
        rows = jnp.concatenate([x, jnp.where(prompt_mask, model.args.mask_id, x)])
        row_lengths = jnp.concatenate([lengths, lengths])
    if at is None:
        logits = model.apply({"params": params}, rows, row_lengths, return_logits=True)
    else:
        hidden = model.apply({"params": params}, rows, row_lengths)
        at = jnp.concatenate([at, at]) if cfg else at
        picked = jnp.take_along_axis(hidden, at[..., None], axis=1)
        logits = logits_from_hidden(picked, head_kernel(params))
    if not cfg:
        return logits
    cond, unc = jnp.split(logits, 2)
    return cond + cfg * (cond - unc)


@functools.partial(jax.jit, static_argnames=("model", "sampler", "gen_length", "trace"))
def denoise(model: Encoder, params, canvas, prompt_lens, key, *, sampler: MDMSampler,
            gen_length: int, trace: bool = False):
    """canvas [B, L] (prompt in [0, p_b), anything after it), prompt_lens [B] -> (tokens [B, L]
    with row b's answer in [p_b, p_b + gen_length), network calls made); with `trace`, also
    the canvas after every step [steps, B, L]."""
    pos = jnp.arange(canvas.shape[1])[None, :]
    start = prompt_lens[:, None]
    answer = (pos >= start) & (pos < start + gen_length)
    n_blocks = sampler.blocks(gen_length)
    block_of = jnp.where(answer, (pos - start) // (gen_length // n_blocks), -1)
    return _reverse_process(model, params, jnp.where(answer, model.args.mask_id, canvas),
                            block_of, pos < start, (prompt_lens + gen_length).astype(jnp.int32),
                            key, sampler, n_blocks, trace, answer_start=prompt_lens,
                            block_len=gen_length // n_blocks)


@functools.partial(jax.jit, static_argnames=("model", "sampler"))
def infill(model: Encoder, params, canvas, key, *, sampler: MDMSampler):
    """Fill every mask token of canvas [B, L], wherever it is (before, inside or after the
    given text), in one block: (tokens, network calls). Guidance masks the given text."""
    answer = canvas == model.args.mask_id
    lengths = jnp.full((canvas.shape[0],), canvas.shape[1], jnp.int32)
    return _reverse_process(model, params, canvas, jnp.where(answer, 0, -1), ~answer, lengths,
                            key, sampler, 1, False)


def _reverse_process(model: Encoder, params, x, block_of, prompt_mask, lengths, key,
                     s: MDMSampler, n_blocks: int, trace: bool, answer_start=None,
                     block_len: int = 0):
    """The loop shared by `denoise` and `infill`: block_of [B, L] is each masked position's
    block (-1 for given tokens), denoised in order with steps / n_blocks steps each.
    `answer_start` [B] (denoise): row b's blocks are `block_len` positions each from there."""
    mask_id = model.args.mask_id
    b, length = x.shape
    per_block = s.steps // n_blocks
    # Greedy choices draw no noise of the logits' shape, so only the current block's positions
    # get logits (the same numbers; the head, softmax and choice then cost a block, not the
    # canvas). Sampling draws its noise over the whole canvas, as it always has, and the cache
    # keeps whole-canvas logits: both take every position.
    by_block = answer_start is not None and s.temperature == 0 and not s.cache
    rows = jnp.arange(b)[:, None]

    def step(carry, i):
        x, key, cached, reuse, nfe = carry
        key, k_choose, k_coin = jax.random.split(key, 3)
        block, j = i // per_block, i % per_block
        at = None
        if by_block:
            at = answer_start[:, None] + block * block_len + jnp.arange(block_len)[None, :]
        if s.cache:
            logits = jax.lax.cond(
                reuse, lambda: cached,
                lambda: guided_logits(model, params, x, prompt_mask, lengths, s.cfg))
            nfe = nfe + jnp.where(reuse, 0, 1)
        else:
            logits = guided_logits(model, params, x, prompt_mask, lengths, s.cfg, at)
            nfe = nfe + 1
        # From t = 1 - j/n to s = t - 1/n, a masked token is revealed w.p. 1 - s/t = 1/left,
        # left = n - j steps of this block remaining (exact in integers below).
        left = per_block - j
        active = (x == mask_id) & (block_of == block)
        if s.forbid_ids:
            logits_in = logits.at[..., jnp.asarray(s.forbid_ids)].set(NEG_INF)
        else:
            logits_in = logits
        pred, conf = choose(logits_in, k_choose, s.temperature, s.top_k, s.top_p)
        if s.last_ids:  # LLaDA: their logits -inf after the choice, confidences renormalised
            ended = logits_in.astype(jnp.float32).at[..., jnp.asarray(s.last_ids)].set(NEG_INF)
            conf = jnp.take_along_axis(jax.nn.softmax(ended, axis=-1),
                                       pred[..., None], axis=-1)[..., 0]
        if by_block:  # back onto the canvas; positions outside the block are never revealed
            pred = jnp.zeros((b, length), pred.dtype).at[rows, at].set(pred)
            conf = jnp.zeros((b, length), conf.dtype).at[rows, at].set(conf)
        if s.reveal_order == "front":
            size = jnp.sum(block_of == block, axis=-1)  # the block's masks when it began
            n_reveal = size // per_block + (j < size % per_block)
            if s.remasking == "random":
                conf = jax.random.uniform(k_coin, x.shape)
            conf = jnp.where(active, conf, -jnp.inf)
            rank = jnp.argsort(jnp.argsort(-conf, axis=-1), axis=-1)
            reveal = rank < n_reveal[:, None]
        elif s.remasking == "random":
            reveal = jax.random.uniform(k_coin, x.shape) * left < 1.0
        else:
            n_reveal = jnp.sum(active, axis=-1) // left
            conf = jnp.where(active, conf, -jnp.inf)
            rank = jnp.argsort(jnp.argsort(-conf, axis=-1), axis=-1)  # 0 = most confident
            reveal = rank < n_reveal[:, None]
        reveal = active & (reveal | (j == per_block - 1))  # a block's last step ends it
        new_x = jnp.where(reveal, pred, x)
        unchanged = ~jnp.any(reveal)  # the next step may reuse these logits
        return (new_x, key, logits if s.cache else cached, unchanged, nfe), \
            (new_x if trace else None)

    # Only the cache carries logits from step to step.
    no_logits = jnp.zeros((b, length, model.args.vocab_size) if s.cache else (), jnp.float32)
    init = (x, key, no_logits, jnp.asarray(False), jnp.asarray(0, jnp.int32))
    (out, _, _, _, nfe), history = jax.lax.scan(step, init, jnp.arange(s.steps))
    return (out, nfe, history) if trace else (out, nfe)


def reveal_counts(masks: int, steps: int, reveal_order: str = "even") -> list[int]:
    """Tokens revealed at each step of a block of `masks` masks in `steps` low-confidence
    steps (the schedule `_reverse_process` follows), for tests and documentation."""
    counts, left = [], masks
    for j in range(steps):
        if reveal_order == "front":
            n = masks // steps + (j < masks % steps)
        else:
            n = left if j == steps - 1 else left // (steps - j)
        counts.append(n)
        left -= n
    return counts
