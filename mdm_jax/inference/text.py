"""Strings in, strings out: generation for notebooks and scripts, with the conventions of
`python -m mdm_jax.sample` (each prompt after the tokenizer's BOS, or wrapped in the chat
template; unset sampler options follow the run's own end-of-run samples).

    from mdm_jax.inference import generate_text, load
    m = load("runs/tiny_mdm")
    generate_text(m, "KING.", gen_length=32, temperature=0)       # -> str
    generate_text(m, ["KING.", "QUEEN."], steps=64, block_length=16)  # -> list[str]
"""

from __future__ import annotations

from mdm_jax import families
from mdm_jax.data.tokenizer import Tokenizer
from mdm_jax.inference.chat import end_token_options
from mdm_jax.inference.generate import SamplingError, check_request, generate
from mdm_jax.inference.mdm import MDMSampler


def prompt_ids(tok: Tokenizer, texts: list[str], chat: bool = False,
               system: str = "") -> tuple[list[list[int]], tuple[int, ...]]:
    """(token ids of each prompt, the ids an answer stops at). Plain: BOS + the text (nothing
    stops an answer); chat: the first user turn of the chat template, answers cut at its end
    of turn."""
    if chat:
        from mdm_jax.data import templates

        try:
            templates.check_template(tok, "chat")
        except ValueError as e:
            raise SamplingError(f"--chat: {e}") from None
        return ([templates.turn_ids(tok, "chat", t, first=True, system=system) for t in texts],
                templates.stop_ids(tok, "chat"))
    return [[tok.bos_id] + (tok.encode(t) if t else []) for t in texts], ()


def default_gen_length(total: int, longest: int, block_length: int, steps: int | None) -> int:
    """The rest of `total` tokens (the trained length, or sample's --length) after the longest
    prompt, cut to whole blocks (as many as `steps` divides into) when the answer is generated
    in blocks."""
    gen_length = total - longest
    if block_length and gen_length > 0:
        n = gen_length // block_length
        while n > 1 and steps and steps % n:
            n -= 1
        gen_length = n * block_length
    return gen_length


def run_sampler(loaded, gen_length: int, *, steps: int | None = None, block_length: int = 0,
                remasking: str | None = None, temperature: float | None = None,
                **options) -> MDMSampler:
    """The sampler with unset options as the run's end-of-run samples had them
    (`config.samples`): steps (whole blocks), remasking (where the family's sampler takes
    it) and temperature; `options` are MDMSampler's other fields."""
    family = families.get(loaded.args.family)
    run = loaded.config.samples
    blocks = gen_length // block_length if block_length and gen_length > 0 else 1
    steps = steps or max(blocks, run.steps - run.steps % blocks)
    if remasking is None:
        remasking = run.remasking if "remasking" in family.sampler_options else "low_confidence"
    return MDMSampler(steps=steps, block_length=block_length, remasking=remasking,
                      temperature=run.temperature if temperature is None else temperature,
                      **options)


def generate_text(loaded, prompts: str | list[str], gen_length: int | None = None, *,
                  steps: int | None = None, block_length: int = 0, remasking: str | None = None,
                  temperature: float | None = None, top_k: int = 0, top_p: float = 1.0,
                  cfg: float = 0.0, chat: bool = False, system: str = "",
                  stop_at_eos: bool = False, no_eos: bool = False, end_last: bool = False,
                  seed: int = 0, tokenizer: Tokenizer | None = None) -> str | list[str]:
    """Completions of `prompts` (a string or a list of them) by a loaded model
    (`mdm_jax.inference.load`), decoded to strings: one call of the family's sampler, with
    the options of `python -m mdm_jax.sample` (README "Sampling"). gen_length: default the rest
    of the trained sequence length after the longest prompt; chat=True wraps each prompt in
    the chat template (an instruct model) and cuts each answer at its end of turn;
    stop_at_eos cuts a plain answer at its first EOS."""
    tok = tokenizer or loaded.tokenizer
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        return []
    ids, stop_ids = prompt_ids(tok, texts, chat, system)
    if stop_at_eos and not chat:
        stop_ids = (tok.eos_id,)
    longest = max(len(p) for p in ids)
    seq_len = loaded.config.seq_len
    gen_length = gen_length or default_gen_length(seq_len, longest, block_length, steps)
    if gen_length < 1 or longest + gen_length > seq_len:
        raise SamplingError(f"a prompt of {longest} tokens plus {gen_length} generated does not "
                            f"fit the trained seq_len {seq_len}; shorten the prompt or lower "
                            f"gen_length")
    sampler = run_sampler(loaded, gen_length, steps=steps, block_length=block_length,
                          remasking=remasking, temperature=temperature, top_k=top_k,
                          top_p=top_p, cfg=cfg)
    sampler = end_token_options(sampler, tok, no_eos, end_last)
    check_request(loaded.model, ids, gen_length, sampler, seq_len)
    g = generate(loaded.model, loaded.params, ids, gen_length, sampler, seed=seed,
                 max_length=seq_len)
    out = [tok.decode([t for t in answer if t < tok.vocab_size])
           for answer in g.answers(stop_ids)]
    return out[0] if isinstance(prompts, str) else out
