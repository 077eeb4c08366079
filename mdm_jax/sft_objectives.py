"""Fine-tuning objectives: each family's loss restricted to the response of prompt/response rows.

A row (mdm_jax.data.sft) is seq_len + 1 tokens, the prompt then the response padded with EOS,
followed by the prompt length and the pair length. Rows are cut to the longest pair of the
micro-batch (`sft.pad="batch"`, SMDM's and LLaDA's per-batch padding: later positions are
neither attended to nor trained) or kept whole (`"canvas"`).

Masked diffusion (mdm, mdm-ce): the family's forward process on the row, with the prompt never
masked (LLaDA's SFT), so only response tokens, EOS padding included, are masked and scored; the
weight is the family's (1/p for mdm, 1 for mdm-ce). Normalisation, `sft.norm`:
  - "llada": row b's sum / A_b, A_b = L_max - prompt_b its response length, then the mean
    over rows (LLaDA's SFT loss);
  - "smdm": the micro-batch's sum / (B L_max - sum_b prompt_b) (SMDM's `finetune_mdm.py`).
`sft.prompt_drop`: with that probability a micro-batch's prompts are replaced by masks
(SMDM's `--cfg`, standard classifier-free-guidance training); they stay out of the loss.
`sft.mask_prompt=False` is SMDM's reverse-curse recipe: the family's pre-training loss on the
whole (cut) row.

ARM: next-token CE on the response's tokens up to and including its first EOS (the padding
after it excluded), normalised per row ("llada") or over the micro-batch ("smdm": SMDM's
`finetune_ar.py`, the mean over answer tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mdm_jax.data.sft import META_COLUMNS
from mdm_jax.model import head_kernel
from mdm_jax.objectives import (
    OBJECTIVES,
    ObjectiveArgs,
    chunked_cross_entropy,
    sample_t,
)

NORMS = ("llada", "smdm")
PADS = ("batch", "canvas")


@dataclasses.dataclass(frozen=True)
class SFTArgs:
    norm: str = "llada"
    prompt_drop: float = 0.0
    mask_prompt: bool = True
    pad: str = "batch"

    @classmethod
    def from_config(cls, c) -> SFTArgs:
        s = c.sft
        return cls(norm=s.norm, prompt_drop=s.prompt_drop, mask_prompt=s.mask_prompt, pad=s.pad)


def split_rows(rows):
    """[B, seq_len + 1 + 2] rows -> (tokens [B, seq_len + 1], prompt lengths [B], pair
    lengths [B])."""
    return rows[:, :-META_COLUMNS], rows[:, -2], rows[:, -1]


def _longest(pair_len, length: int, sft: SFTArgs):
    return jnp.asarray(length, jnp.int32) if sft.pad == "canvas" else jnp.max(pair_len)


def masked_response_loss(apply_fn: Callable, params, rows, key, args: ObjectiveArgs,
                         sft: SFTArgs, mask_id: int, seq_len: int, train: bool = True):
    tokens, prompt_len, pair_len = split_rows(rows)
    x0 = tokens[:, :seq_len]
    b, length = x0.shape
    longest = _longest(pair_len, length, sft)
    if not sft.mask_prompt:  # the reverse-curse recipe: pre-training loss on the whole row
        return OBJECTIVES[args.kind](apply_fn, params, x0, key, args, mask_id, train,
                                     None if sft.pad == "canvas" else longest)
    k_t, k_mask, k_drop = jax.random.split(key, 3)
    t = sample_t(k_t, b, args.t_sampling)
    p = (1.0 - args.eps) * t + args.eps
    pos = jnp.arange(length)[None, :]
    prompt = pos < prompt_len[:, None]
    response = ~prompt & (pos < longest)
    masked = (jax.random.uniform(k_mask, (b, length)) < p[:, None]) & response
    inputs = jnp.where(masked, mask_id, x0)
    if train and sft.prompt_drop > 0:
        drop = jax.random.uniform(k_drop) < sft.prompt_drop
        inputs = jnp.where(drop & prompt, mask_id, inputs)
    lengths = None if sft.pad == "canvas" else jnp.full((b,), longest, jnp.int32)
    hidden = apply_fn({"params": params}, inputs, lengths)
    unweighted = train and (args.kind == "mdm-ce" or args.weighting == "unweighted")
    weights = masked.astype(jnp.float32) / (1.0 if unweighted else p[:, None])
    answer_len = (longest - prompt_len).astype(jnp.float32)
    if sft.norm == "llada":
        weights = weights / jnp.maximum(answer_len, 1.0)[:, None]
        denom = jnp.asarray(b, jnp.float32)
    else:
        denom = jnp.maximum(jnp.sum(answer_len), 1.0)
    total = chunked_cross_entropy(hidden, head_kernel(params), x0, weights, args.loss_chunk)
    loss = total / denom
    return loss, {"loss": loss, "mask_rate": jnp.sum(masked) / jnp.maximum(jnp.sum(response), 1),
                  "length": longest}


def arm_response_loss(apply_fn: Callable, params, rows, key, args: ObjectiveArgs,
                      sft: SFTArgs, mask_id: int, seq_len: int, train: bool = True):
    tokens, prompt_len, pair_len = split_rows(rows)
    if not sft.mask_prompt:
        return OBJECTIVES["arm"](apply_fn, params, tokens, key, args, mask_id, train)
    inputs, targets = tokens[:, :seq_len], tokens[:, 1:seq_len + 1]
    target_pos = jnp.arange(1, seq_len + 1)[None, :]  # the position each target sits at
    scored = (target_pos >= prompt_len[:, None]) & (target_pos < pair_len[:, None])
    weights = scored.astype(jnp.float32)
    n = jnp.sum(weights, axis=1)
    if sft.norm == "llada":
        weights = weights / jnp.maximum(n, 1.0)[:, None]
        denom = jnp.asarray(tokens.shape[0], jnp.float32)
    else:
        denom = jnp.maximum(jnp.sum(n), 1.0)
    hidden = apply_fn({"params": params}, inputs)
    total = chunked_cross_entropy(hidden, head_kernel(params), targets, weights, args.loss_chunk)
    loss = total / denom
    return loss, {"loss": loss, "length": jnp.max(pair_len)}


# The family table of fine-tuning losses: (apply_fn, params, rows [B, seq_len + 3], key,
# objective args, SFTArgs, mask_id, seq_len, train) -> (loss, metrics).
SFT_OBJECTIVES = {"mdm": masked_response_loss, "mdm-ce": masked_response_loss,
                  "arm": arm_response_loss}
