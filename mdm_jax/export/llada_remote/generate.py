"""Sampling from a masked diffusion model in this folder: LLaDA's `generate` (ML-GSAI/LLaDA
generate.py) semantics, with the defaults of the run that trained the model.

    from transformers import AutoModel
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    out = model.generate(input_ids, gen_length=64, steps=64, block_length=16)  # [B, P + 64]

The answer (`gen_length` tokens after the prompt) starts fully masked and is split into blocks
of `block_length` tokens, denoised in order with `steps / blocks` steps each. Each step
predicts every masked token (the argmax at temperature 0, else Gumbel-max in float64, as LLaDA)
and reveals some of the current block's masked positions:
- remasking "low_confidence": the most probable predictions, "random": random positions;
- reveal_order "front" (LLaDA's): a block of m masks reveals m // n a step plus one more on
  each of its first m % n steps; "even" (mdm_jax's default): floor(masked / steps left) a step,
  the rest on the block's last step.
Ties in confidence go to the earlier position (as mdm_jax's sampler orders them).
cfg_scale w is unsupervised classifier-free guidance: the prompt masked out gives `uncond`,
and the logits are uncond + (w + 1)(cond - uncond). `logits_eos_inf` never generates EOS;
`confidence_eos_eot_inf` reveals EOS and end-of-turn predictions last (their probability
removed from the confidence). The mask token is never generated. A batch of prompts of
different lengths is left-padded, with `attention_mask` marking the real tokens (1).

Options left as None take this folder's generation_config.json (the trained run's own sampling
settings), so `model.generate(ids, gen_length=N)` gives the tokens of
`python -m mdm_jax.sample --model RUN --gen-length N` for prompt ids `ids` (BOS first).
"""

import torch
import torch.nn.functional as F

REMASKING = ("low_confidence", "random")
REVEAL_ORDERS = ("front", "even")


def _setting(model, name, value, default):
    if value is not None:
        return value
    config = getattr(model, "generation_config", None)
    found = getattr(config, name, None) if config is not None else None
    return default if found is None else found


def reveal_counts(masks, steps):
    """LLaDA's schedule: masks [B] -> [B, steps] tokens revealed at each step of a block."""
    counts = (masks // steps)[:, None].repeat(1, steps)
    return counts + (torch.arange(steps, device=masks.device)[None, :] < (masks % steps)[:, None])


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=None, gen_length=None, block_length=None,
             temperature=None, cfg_scale=0.0, remasking=None, mask_id=None,
             logits_eos_inf=False, confidence_eos_eot_inf=False, reveal_order=None,
             eos_token_id=None, eot_token_id=None, generator=None):
    """prompt [B, P] ids (left-padded, with `attention_mask`, when lengths differ) ->
    [B, P + gen_length]: the prompt followed by the generated answer. gen_length: default the
    rest of the trained sequence length (whole blocks); block_length 0 or None: one block."""
    config = model.config
    given_steps = steps
    block_length = int(_setting(model, "mdm_block_length", block_length, 0))
    temperature = float(_setting(model, "mdm_temperature", temperature, 0.0))
    remasking = _setting(model, "mdm_remasking", remasking, "low_confidence")
    reveal_order = _setting(model, "mdm_reveal_order", reveal_order, "front")
    mask_id = config.mask_token_id if mask_id is None else mask_id
    eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
    eot_token_id = getattr(config, "eot_token_id", None) if eot_token_id is None else \
        eot_token_id
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}: choose one of {', '.join(REMASKING)}")
    if reveal_order not in REVEAL_ORDERS:
        raise ValueError(f"reveal_order={reveal_order!r}: choose one of "
                         f"{', '.join(REVEAL_ORDERS)}")
    if gen_length is None:  # the rest of the trained length, in whole blocks
        gen_length = config.max_sequence_length - prompt.shape[1]
        if block_length and gen_length > 0:
            n = gen_length // block_length
            while n > 1 and given_steps and given_steps % n:
                n -= 1
            gen_length = n * block_length
    block_length = block_length or gen_length
    if gen_length < 1 or gen_length % block_length:
        raise ValueError(f"block_length={block_length} must divide gen_length={gen_length} "
                         f"(1 or more)")
    n_blocks = gen_length // block_length
    if steps is None:  # the run's steps, cut to a multiple of the blocks
        steps = int(_setting(model, "mdm_steps", None, 64))
        steps = max(n_blocks, steps - steps % n_blocks)
    if steps < 1 or steps % n_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the {n_blocks} blocks")
    per_block = steps // n_blocks
    if (logits_eos_inf or confidence_eos_eot_inf) and eos_token_id is None:
        raise ValueError("the end-token options need eos_token_id (none in the config)")

    device = model.device
    prompt = prompt.to(device)
    batch, p = prompt.shape
    x = torch.full((batch, p + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :p] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.to(device), torch.ones(
            (batch, gen_length), dtype=attention_mask.dtype, device=device)], dim=-1)
    prompt_index = x != mask_id
    ends = [i for i in (eos_token_id, eot_token_id) if i is not None]
    positions = torch.arange(x.shape[1], device=device)

    def logits_of(x):
        if not cfg_scale:
            return model(x, attention_mask=attention_mask).logits
        unconditional = x.clone()
        unconditional[prompt_index] = mask_id
        mask = None if attention_mask is None else torch.cat([attention_mask] * 2)
        cond, uncond = torch.chunk(model(torch.cat([x, unconditional]),
                                         attention_mask=mask).logits, 2)
        return uncond + (cfg_scale + 1) * (cond - uncond)

    for block in range(n_blocks):
        lo, hi = p + block * block_length, p + (block + 1) * block_length
        in_block = (positions >= lo) & (positions < hi)
        counts = reveal_counts((x[:, lo:hi] == mask_id).sum(-1), per_block)
        for j in range(per_block):
            active = (x == mask_id) & in_block[None, :]
            logits = logits_of(x).float()
            logits[..., mask_id] = -torch.inf  # a mask is never a prediction
            if logits_eos_inf:
                logits[..., eos_token_id] = -torch.inf
            if temperature > 0:
                noise = torch.rand(logits.shape, dtype=torch.float64, device=device,
                                   generator=generator)
                pred = torch.argmax(logits.double().exp() / (-torch.log(noise)) ** temperature,
                                    dim=-1)
            else:
                pred = torch.argmax(logits, dim=-1)
            if confidence_eos_eot_inf:
                logits[..., ends] = -torch.inf
            if remasking == "low_confidence":
                confidence = torch.gather(F.softmax(logits, dim=-1), -1, pred[..., None])[..., 0]
            else:
                confidence = torch.rand(pred.shape, device=device, generator=generator)
            left = per_block - j
            if reveal_order == "front":
                n_reveal = counts[:, j]
            elif j == per_block - 1:
                n_reveal = active.sum(-1)
            elif remasking == "random":  # each masked position w.p. 1 / left: the exact
                n_reveal = None          # reverse process of the linear schedule
            else:
                n_reveal = active.sum(-1) // left
            if n_reveal is None:
                reveal = active & (confidence * left < 1.0)
            else:
                confidence = torch.where(active, confidence, -torch.inf)
                order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
                rank = torch.empty_like(order)
                rank.scatter_(1, order, positions[None, :].expand_as(order))
                reveal = active & (rank < n_reveal[:, None])
            x = torch.where(reveal, pred, x)
    return x
