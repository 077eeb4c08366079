"""One entry point for generation with any model: prompts in, answers, NFE and seconds out."""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from mdm_jax import families
from mdm_jax.errors import UserError, option
from mdm_jax.inference.arm import sample_cached, sample_full
from mdm_jax.inference.eso import generate_eso
from mdm_jax.inference.mdm import MDMSampler, denoise
from mdm_jax.inference.mdm import check as check_settings
from mdm_jax.inference.uniform import ancestral
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

    def answers(self, stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
        """Each row's answer; with `stop_ids`, cut before the first of them (an instruct
        model's EOS or end-of-turn: what follows is padding)."""
        return [cut_at(row[p:p + self.gen_length].tolist(), stop_ids)
                for row, p in zip(self.tokens, self.prompt_lens, strict=True)]


def cut_at(tokens: list[int], stop_ids) -> list[int]:
    """`tokens` up to (not including) the first of `stop_ids`."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


# Options every family's sampler takes; the others are each family's own (its sampler_options).
COMMON_OPTIONS = ("gen_length", "temperature", "top_k", "top_p")


def chosen_options(sampler: MDMSampler, kv_cache: bool = True) -> list[str]:
    """The family-specific options whose settings differ from the defaults (what a caller who
    cannot say which options were set explicitly is taken to have chosen)."""
    default = MDMSampler()
    chosen = [name for name in ("remasking", "block_length", "cfg", "cache", "alpha0",
                                "reveal_order", "forbid_ids", "last_ids")
              if getattr(sampler, name) != getattr(default, name)]
    return chosen + ([] if kv_cache else ["kv_cache"])


def check_options(family: families.Family, given: list[str]) -> None:
    """The family's refusal (FamilyError, by name) of the first option in `given` (keywords)
    that its sampler does not take."""
    for name in given:
        if name not in COMMON_OPTIONS:
            family.check_sampler_option(name)


def check_request(model: Encoder, prompts: list[list[int]], gen_length: int,
                  sampler: MDMSampler, max_length: int | None = None,
                  kv_cache: bool = True, given: list[str] | None = None) -> None:
    """Raise SamplingError (naming the option and the fix, as the caller spells it:
    errors.option) for a request that cannot work, and the family's FamilyError for an option
    its sampler does not take. `given`: the options the caller set (a command line's explicit
    flags, as keywords); None: those whose settings differ from the defaults."""
    if not prompts:
        raise SamplingError("no prompts: give at least one (a prompt may be just BOS)")
    family = families.get(model.args.family)
    check_options(family, chosen_options(sampler, kv_cache) if given is None else given)
    problems = [m for name, m in check_settings(sampler, gen_length)
                if name in COMMON_OPTIONS or name in family.sampler_options]
    if problems:
        raise SamplingError(problems[0])
    longest = max(len(p) for p in prompts)
    limit = max_length or model.args.max_seq_len
    if longest + gen_length > limit:
        raise SamplingError(
            f"a prompt of {longest} tokens plus {option('gen_length', gen_length)} is "
            f"{longest + gen_length} tokens, beyond the canvas of {limit} (the trained "
            f"seq_len); shorten the prompt or lower {option('gen_length')}")


def _masked(model, params, canvas, lens, key, sampler, gen_length, kv_cache):
    return denoise(model, params, canvas, lens, key, sampler=sampler, gen_length=gen_length)


def _uniform(model, params, canvas, lens, key, sampler, gen_length, kv_cache):
    return ancestral(model, params, canvas, lens, key, steps=sampler.steps,
                             gen_length=gen_length, temperature=sampler.temperature,
                             top_k=sampler.top_k, top_p=sampler.top_p)


def _interpolating(model, params, canvas, lens, key, sampler, gen_length, kv_cache):
    alpha0 = model.args.alpha0 if sampler.alpha0 is None else sampler.alpha0
    return generate_eso(model, params, canvas, lens, key, steps=sampler.steps, alpha0=alpha0,
                        gen_length=gen_length, kv_cache=kv_cache,
                        temperature=sampler.temperature, top_k=sampler.top_k,
                        top_p=sampler.top_p)


def _autoregressive(model, params, canvas, lens, key, sampler, gen_length, kv_cache):
    if int(lens.min()) < 1:
        raise SamplingError("an ARM needs at least one prompt token (e.g. BOS) per prompt")
    fn = sample_cached if kv_cache else sample_full
    return fn(model, params, canvas, lens, key, prefill=int(lens.min()),
              temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p)


# The family table of samplers: (model, params, canvas [B, L] (prompts in, the rest filled),
# prompt lengths [B], key, MDMSampler settings, gen_length, kv_cache) -> (tokens, NFE).
SAMPLERS = {"mdm": _masked, "mdm-ce": _masked, "uniform": _uniform, "eso": _interpolating,
            "arm": _autoregressive}


def generate(model: Encoder, params, prompts: list[list[int]], gen_length: int,
             sampler: MDMSampler | None = None, seed: int = 0,
             max_length: int | None = None, kv_cache: bool = True) -> Generation:
    """Answers of `gen_length` tokens after each prompt (token lists of any lengths), with the
    family's sampler under the settings `sampler` (temperature/top-k/top-p drive them all)."""
    sampler = sampler or MDMSampler()
    check_request(model, prompts, gen_length, sampler, max_length, kv_cache)
    family = families.get(model.args.family)
    lens = np.array([len(p) for p in prompts], np.int32)
    canvas = np.full((len(prompts), int(lens.max()) + gen_length),
                     model.args.mask_id if family.mask_token else 0, np.int32)
    for row, p in zip(canvas, prompts, strict=True):
        row[:len(p)] = p
    t0 = time.perf_counter()
    out, nfe = SAMPLERS[family.name](model, params, jnp.asarray(canvas), jnp.asarray(lens),
                                     jax.random.PRNGKey(seed), sampler, gen_length, kv_cache)
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
