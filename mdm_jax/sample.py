"""Generate text from a trained model (a run's workdir or an export folder).

    python -m mdm_jax.sample --model runs/tiny_mdm --num 4                        # unconditional
    python -m mdm_jax.sample --model runs/tiny_mdm --prompt "KING." --steps 64 \\
        --block-length 32 --remasking low_confidence --temperature 0
    python -m mdm_jax.sample --model exports/tiny_lit --prompts prompts.jsonl \\
        --out answers.jsonl --gen-length 64 --cfg 0.5 --batch-size 16
    python -m mdm_jax.sample --model runs/sft_mdm --chat --prompt "reverse: king lord" \\
        --gen-length 16 --end-last --reveal-order front       # an instruct model
    python -m mdm_jax.sample --model runs/sft_mdm --chat --gen-length 16   # a session: one
                                                       # user turn per line of stdin

Each prompt starts with the tokenizer's BOS; the family's sampler runs with the options its
record takes (README "Sampling"): an option its sampler has no use for (--remasking, --cache,
--block-length, --steps or --cfg on an ARM), if given, is refused by name. Every option is
checked before the model is loaded where it can be; a bad one is one `error:` line and exit
code 2. `--workdir` is the old name of `--model` (until the next release).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from mdm_jax import families
from mdm_jax.inference.generate import SamplingError
from mdm_jax.inference.mdm import REMASKING, REVEAL_ORDERS


def _parser():
    from mdm_jax.errors import ArgumentParser

    p = ArgumentParser(prog="python -m mdm_jax.sample", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_model_argument("--workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--prompt", default=None, help="one prompt (text)")
    p.add_argument("--prompts", default=None, help='JSONL file, one {"prompt": ...} per line')
    p.add_argument("--out", default=None, help="write one JSON record per sample here")
    p.add_argument("--num", type=int, default=None,
                   help="samples per prompt (default 1; 4 without any prompt)")
    p.add_argument("--gen-length", type=int, default=0,
                   help="tokens to generate after each prompt (default: fill the trained "
                        "seq_len after the longest prompt)")
    p.add_argument("--length", type=int, default=0,
                   help="total tokens per sample, prompt included (the older way to say it)")
    p.add_argument("--allow-longer", action="store_true",
                   help="allow samples beyond the trained seq_len (RoPE positions the model "
                        "never saw: expect degraded samples)")
    p.add_argument("--steps", type=int, default=None,
                   help="reverse steps of the diffusion samplers (default: the run's "
                        "samples.steps, a multiple of the blocks)")
    p.add_argument("--block-length", type=int, default=None,
                   help="MDM semi-autoregressive block length (default 0: one block)")
    p.add_argument("--remasking", choices=REMASKING, default=None,
                   help="MDM (default: the run's samples.remasking)")
    p.add_argument("--cfg", type=float, default=None,
                   help="MDM guidance weight w (default 0: off)")
    p.add_argument("--cache", action="store_true",
                   help="MDM: skip the network call when the previous step revealed nothing "
                        "(pays when --steps is large for the length and the batch small)")
    p.add_argument("--alpha0", type=float, default=None,
                   help="eso: share of the answer made by diffusion, the rest left to right "
                        "(default: the trained eso.alpha0)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="ARM, eso: recompute the whole sequence every call (the reference)")
    p.add_argument("--chat", action="store_true",
                   help="instruct models: wrap each prompt in the chat template and cut the "
                        "answer at its EOS or end-of-turn; with no --prompt/--prompts, a "
                        "multi-turn session reading one user turn per line of stdin")
    p.add_argument("--system", default="", help="--chat: a system message first")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="cut each answer at its first EOS (fine-tuned models, plain template)")
    p.add_argument("--no-eos", action="store_true",
                   help="MDM: never generate EOS (LLaDA's logits_eos_inf)")
    p.add_argument("--end-last", action="store_true",
                   help="MDM: reveal EOS and end-of-turn predictions last (LLaDA's "
                        "confidence_eos_eot_inf)")
    p.add_argument("--reveal-order", choices=REVEAL_ORDERS, default=None,
                   help="MDM: even (default: a block's extra reveals on its last steps) or "
                        "front (LLaDA's: on its first steps)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the run's samples.temperature)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="SentencePiece model (default: the run's)")
    return p


def _check_numbers(a) -> None:
    for flag, value, low in (("--num", a.num, 1), ("--steps", a.steps, 1),
                             ("--gen-length", a.gen_length, 0), ("--length", a.length, 0),
                             ("--step", a.step, 0), ("--batch-size", a.batch_size, 1),
                             ("--block-length", a.block_length, 0), ("--top-k", a.top_k, 0)):
        if value is not None and value < low:
            raise SamplingError(f"{flag} {value}: give {low} or more")
    if not 0 <= a.seed < 2 ** 32:
        raise SamplingError(f"--seed {a.seed}: give an integer in [0, 2**32)")
    for flag, value, zero in (("--temperature", a.temperature, "greedy"), ("--cfg", a.cfg, "off")):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SamplingError(f"{flag} {value}: give 0 ({zero}) or a positive number")
    if not 0 < a.top_p <= 1:
        raise SamplingError(f"--top-p {a.top_p}: give a number in (0, 1]")
    if a.prompt is not None and a.prompts:
        raise SamplingError("--prompt and --prompts: give one of them")
    if a.gen_length and a.length:
        raise SamplingError("--gen-length and --length: give one of them")
    if a.block_length and a.gen_length % a.block_length:
        raise SamplingError(f"--block-length {a.block_length} does not divide --gen-length "
                            f"{a.gen_length}; give a divisor of it (or 0)")


def read_prompts(path: str) -> list[str]:
    """The "prompt" of every line of a JSONL file (blank lines skipped)."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SamplingError(f"--prompts {path}: {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise SamplingError(f"--prompts {path} line {n}: not JSON ({e}); write one "
                                f'{{"prompt": "..."}} per line') from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise SamplingError(f"--prompts {path} line {n}: no string \"prompt\" field; write "
                                f'one {{"prompt": "..."}} per line')
        prompts.append(record["prompt"])
    if not prompts:
        raise SamplingError(f"--prompts {path} holds no prompt")
    return prompts


def given_options(a) -> list[str]:
    """The sampler options (keywords) set on this command line; defaults are not refused."""
    return [name for name, value in (("steps", a.steps), ("remasking", a.remasking),
                                     ("block_length", a.block_length), ("cfg", a.cfg),
                                     ("alpha0", a.alpha0), ("reveal_order", a.reveal_order))
            if value is not None] + ["cache"] * a.cache + ["kv_cache"] * a.no_kv_cache + \
        ["forbid_ids"] * a.no_eos + ["last_ids"] * a.end_last


def _main(argv=None) -> None:
    from mdm_jax.errors import spelling

    a = _parser().parse_args(argv)
    with spelling(flags=True, kv_cache="--no-kv-cache", forbid_ids="--no-eos",
                  last_ids="--end-last"):  # library errors name these flags
        _sample(a)


def _sample(a) -> None:
    from absl import logging as absl_logging
    from tqdm import tqdm

    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.errors import UserError
    from mdm_jax.inference import generate, load
    from mdm_jax.inference.chat import end_token_options
    from mdm_jax.inference.generate import batches, check_options, check_request, n_batches
    from mdm_jax.inference.text import default_gen_length, prompt_ids, run_sampler

    _check_numbers(a)
    texts = read_prompts(a.prompts) if a.prompts else [a.prompt or ""]
    num = a.num or (1 if (a.prompts or a.prompt) else 4)
    absl_logging.set_verbosity(absl_logging.WARNING)
    m = load(a.model, a.step)
    family = families.get(m.args.family)
    given = given_options(a)
    check_options(family, given)  # an option its sampler has no use for, before anything else
    seq_len = m.config.seq_len
    block_length, cfg = a.block_length or 0, a.cfg or 0.0
    if not (a.tokenizer or m.tokenizer_path):
        raise SamplingError(f"{a.model} names no tokenizer (exported without one): pass "
                            f"--tokenizer PATH, the SentencePiece .model it was trained with")
    try:
        tok = Tokenizer.load(a.tokenizer or m.tokenizer_path)
    except (UserError, FileNotFoundError, ValueError) as e:
        if a.tokenizer:
            raise SamplingError(f"--tokenizer: {e}") from None
        raise SamplingError(f"the model's tokenizer {m.tokenizer_path!r}: {e}; pass "
                            f"--tokenizer PATH") from None
    prompts, stop_ids = prompt_ids(tok, texts, a.chat, a.system)
    if a.stop_at_eos and not a.chat:
        stop_ids = (tok.eos_id,)
    longest = max(len(p) for p in prompts)
    gen_length = a.gen_length or default_gen_length(a.length or seq_len, longest, block_length,
                                                    a.steps)
    if a.length and gen_length < 1:
        raise SamplingError(f"the prompt has {longest} tokens; --length {a.length} leaves no "
                            f"room to generate")
    if longest + gen_length > seq_len and not a.allow_longer:
        raise SamplingError(
            f"a prompt of {longest} tokens plus {gen_length} generated is {longest + gen_length} "
            f"tokens, beyond the trained seq_len {seq_len} of {a.model} (positions the model "
            f"never saw); shorten the prompt, lower --gen-length/--length, or add "
            f"--allow-longer")
    limit = longest + gen_length if a.allow_longer else seq_len
    # Unset options follow the run's own end-of-run samples (what its training printed).
    sampler = run_sampler(m, gen_length, steps=a.steps, block_length=block_length,
                          remasking=a.remasking, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, cfg=cfg, cache=a.cache, alpha0=a.alpha0,
                          reveal_order=a.reveal_order or "even")
    temperature = sampler.temperature
    sampler = end_token_options(sampler, tok, a.no_eos, a.end_last)
    check_request(m.model, prompts, gen_length, sampler, limit, kv_cache=not a.no_kv_cache,
                  given=given)
    session = a.chat and a.prompt is None and not a.prompts
    if num > 1 and temperature == 0 and not session:
        print(f"note: --temperature 0 is greedy, so the {num} samples of a prompt may be "
              f"identical; give --temperature > 0 for varied ones", file=sys.stderr)

    if session:
        _session(m, tok, sampler, gen_length, a)
        return
    jobs = [(text, p) for text, p in zip(texts, prompts, strict=True) for _ in range(num)]
    out = open(a.out, "w", encoding="utf-8") if a.out else None
    try:
        bar = tqdm(list(batches(jobs, a.batch_size)), desc="sample", file=sys.stderr,
                   disable=n_batches(len(jobs), a.batch_size) < 2)
        i = 0
        for k, batch in enumerate(bar):
            g = generate(m.model, m.params, [p for _, p in batch], gen_length, sampler,
                         seed=a.seed + k, max_length=limit, kv_cache=not a.no_kv_cache)
            tqdm.write(f"[sample] batch {k + 1}: {len(batch)} x {gen_length} tokens, {g.nfe} "
                       f"network calls, {g.seconds:.2f} s, "
                       f"{len(batch) * gen_length / max(g.seconds, 1e-9):,.0f} tokens/s",
                       file=sys.stderr)
            for (text, _), answer in zip(batch, g.answers(stop_ids), strict=True):
                completion = tok.decode([t for t in answer if t < tok.vocab_size])
                shown = f"{text}\n>>> {completion.strip()}" if a.chat else text + completion
                tqdm.write(f"--- sample {i} ---\n{shown.strip()}\n", file=sys.stdout)
                if out:
                    out.write(json.dumps({"prompt": text, "completion": completion,
                                          "tokens": answer, "nfe": g.nfe,
                                          "seconds": round(g.seconds, 4)}) + "\n")
                i += 1
    finally:
        if out:
            out.close()


def _session(m, tok, sampler, gen_length: int, a) -> None:
    """A multi-turn chat: one user turn per line of stdin, each answer printed."""
    from mdm_jax.inference.chat import ChatSession

    if not a.gen_length:  # leave room for the turns to come
        gen_length = min(gen_length, max(m.config.seq_len // 4, 1))
    chat = ChatSession(m, tok, "chat", gen_length, sampler, a.system, a.seed)
    if sys.stdin.isatty():
        print("(one message per line; end with Ctrl-D)", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            print(f">>> {chat.reply(line.rstrip(chr(10)))}", flush=True)


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_main, argv)


if __name__ == "__main__":
    cli()
