"""One entry point for generation with any model: prompts in, answers, NFE and seconds out."""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax.errors import UserError
from mdm_jax.inference import arm, mdm, uniform
from mdm_jax.model import Encoder


class SamplingError(UserError, ValueError):
    """A sampling request that cannot work; the message names the option and the fix."""


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, L]: row b's prompt in [0, p_b), its answer after it
    prompt_lens: np.ndarray  # [B]
    gen_length: int
    nfe: int  # network calls made for the whole batch
    seconds: float

    def answers(self) -> list[list[int]]:
        return [row[p:p + self.gen_length].tolist()
                for row, p in zip(self.tokens, self.prompt_lens, strict=True)]


def check_request(model: Encoder, prompts: list[list[int]], gen_length: int,
                  sampler: mdm.MDMSampler, max_length: int | None = None) -> None:
    """Raise SamplingError (naming the flag and the fix) for a request that cannot work."""
    if not prompts:
        raise SamplingError("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
    problems = [(f, m) for f, m in mdm.check(sampler, gen_length)
                if not model.args.causal or f in ("--gen-length", "--temperature", "--top-k",
                                                  "--top-p")]
    if model.args.time_conditioning and (sampler.cfg or sampler.block_length or sampler.cache):
        problems.append(("--cfg/--block-length/--cache", "apply to the masked-diffusion "
                         "sampler; uniform-state diffusion samples ancestrally: drop them"))
    if model.args.causal and sampler.cfg:
        problems.append(("--cfg", f"{sampler.cfg}: classifier-free guidance is for MDMs (it "
                         f"masks the prompt); this model is an ARM: drop --cfg"))
    if problems:
        flag, message = problems[0]
        raise SamplingError(f"{flag} {message}")
    if model.args.causal and min(len(p) for p in prompts) < 1:
        raise SamplingError("an ARM needs at least one prompt token (e.g. BOS) per prompt")
    longest = max(len(p) for p in prompts)
    limit = max_length or model.args.max_seq_len
    if longest + gen_length > limit:
        raise SamplingError(
            f"a prompt of {longest} tokens plus --gen-length {gen_length} is "
            f"{longest + gen_length} tokens, beyond the canvas of {limit} (the trained "
            f"seq_len); shorten the prompt or lower --gen-length")


def generate(model: Encoder, params, prompts: list[list[int]], gen_length: int,
             sampler: mdm.MDMSampler | None = None, seed: int = 0,
             max_length: int | None = None, kv_cache: bool = True) -> Generation:
    """Answers of `gen_length` tokens after each prompt (token lists of any lengths), with
    the MDM sampler `sampler` (its temperature/top-k/top-p also drive the ARM)."""
    sampler = sampler or mdm.MDMSampler()
    check_request(model, prompts, gen_length, sampler, max_length)
    lens = np.array([len(p) for p in prompts], np.int32)
    length = int(lens.max()) + gen_length
    fill = 0 if model.args.causal else model.args.mask_id
    canvas = np.full((len(prompts), length), fill, np.int32)
    for row, p in zip(canvas, prompts, strict=True):
        row[:len(p)] = p
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    if model.args.causal:
        fn = arm.sample_cached if kv_cache else arm.sample_full
        out, nfe = fn(model, params, jnp.asarray(canvas), jnp.asarray(lens), key,
                      prefill=int(lens.min()), temperature=sampler.temperature,
                      top_k=sampler.top_k, top_p=sampler.top_p)
    elif model.args.time_conditioning:  # uniform-state diffusion
        out, nfe = uniform.ancestral(model, params, jnp.asarray(canvas), jnp.asarray(lens), key,
                                     steps=sampler.steps, gen_length=gen_length,
                                     temperature=sampler.temperature, top_k=sampler.top_k,
                                     top_p=sampler.top_p)
    else:
        out, nfe = mdm.denoise(model, params, jnp.asarray(canvas), jnp.asarray(lens), key,
                               sampler=sampler, gen_length=gen_length)
    out = np.asarray(jax.device_get(out))
    seconds = time.perf_counter() - t0
    return Generation(tokens=out, prompt_lens=lens, gen_length=gen_length,
                      nfe=int(jax.device_get(nfe)), seconds=seconds)


def batches(items: list, size: int):
    """Consecutive slices of at most `size` (the last one shorter)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


def n_batches(n: int, size: int) -> int:
    return math.ceil(n / size)
