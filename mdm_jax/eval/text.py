"""Negative log-likelihood per token and bits per byte of a text file, for every family.

    python -m mdm_jax.eval text --model runs/tiny_mdm --text data.txt [--mc-num 128] [--json]

The file is tokenized whole and cut into windows of seq_len - 1 tokens, each scored after a
BOS by the family's estimator (eval/likelihood.py): the ARM exactly, the MDMs by their ELBO
(`--estimator mc` SMDM's or `llada`), uniform-state diffusion by its NELBO; `--mc-num` draws.
Every family sees the same windows, so the figures compare: a diffusion model's is an upper
bound on its NLL. Prints tokens, windows, NLL per token (nats), perplexity, bits per byte
(total NLL / ln 2 / the file's UTF-8 bytes) and the standard error of the estimate. An option
the family's estimator has no use for (--mc-num, --batch-size or --cfg on the ARM's exact
likelihood), if given, is refused by name. `--workdir` is the old name of `--model`.
"""

from __future__ import annotations

import argparse
import json
import math


def text_nll(model, params, tokens: list[int], bos: int, seq_len: int, estimator,
             seed: int = 0, progress: bool = False) -> tuple[float, float, int]:
    """(NLL in nats, its variance, windows) of `tokens` in windows of seq_len - 1 after BOS;
    `progress`: a bar over the windows on a terminal."""
    import sys

    from tqdm import tqdm

    from mdm_jax.eval.likelihood import loglikelihood

    nll, var, width = 0.0, 0.0, seq_len - 1
    starts = range(0, len(tokens), width)
    bar = tqdm(starts, desc="windows", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty() and len(starts) > 1))
    for k, start in enumerate(bar):
        s = loglikelihood(model, params, [bos], tokens[start:start + width], estimator,
                          seed=seed + k, max_length=seq_len)
        nll, var = nll - s.logprob, var + s.stderr ** 2
    return nll, var, len(starts)


def _main(argv=None) -> None:
    from mdm_jax.errors import ArgumentParser, positive_int, spelling
    from mdm_jax.eval.likelihood import ESTIMATORS

    p = ArgumentParser(prog="python -m mdm_jax.eval text", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_model_argument("--workdir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--estimator", choices=ESTIMATORS, default="",
                   help="default: the family's first (mc for diffusion, exact for the ARM)")
    p.add_argument("--mc-num", type=positive_int, default=None,
                   help="Monte Carlo draws (default 128)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="draws per network call (default 32)")
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default 0: off)")
    p.add_argument("--eps", type=float, default=None,
                   help="mask probability floor of the mc estimator (default 0, as SMDM "
                        "evaluates; training uses 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with spelling(flags=True):  # library errors name these flags (--mc-num, not mc_num)
        _evaluate(a)


def _evaluate(a) -> None:
    from absl import logging as absl_logging

    from mdm_jax import families
    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.eval.likelihood import Estimator, EvalError, check_estimator
    from mdm_jax.inference import load

    try:
        raw = open(a.text, "rb").read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--text {a.text}: {e}") from None
    if not text.strip():
        raise EvalError(f"--text {a.text} is empty")
    absl_logging.set_verbosity(absl_logging.WARNING)
    m = load(a.model, a.step)
    family = families.get(m.args.family)
    # Options given on this command line (defaults are not refused): each must be one the
    # family's estimators use (the ARM's exact likelihood uses none of them).
    given = {name: value for name, value in (("mc_num", a.mc_num), ("batch_size", a.batch_size),
                                             ("cfg", a.cfg), ("eps", a.eps))
             if value is not None}
    if a.estimator:
        family.check_estimator(a.estimator)
    for name in given:
        family.check_estimator_option(name)
    estimator = check_estimator(Estimator(kind=a.estimator, **given), family)
    tok = Tokenizer.load(m.tokenizer_path)
    tokens = tok.encode(text)
    nll, var, windows = text_nll(m.model, m.params, tokens, tok.bos_id, m.config.seq_len,
                                 estimator, a.seed, progress=True)
    exact = family.exact_likelihood
    result = {"model": a.model, "step": m.step, "family": family.name,
              "tokens": len(tokens), "bytes": len(raw), "windows": windows, "nll_nats": nll,
              "nll_per_token": nll / len(tokens), "perplexity": math.exp(nll / len(tokens)),
              "bits_per_byte": nll / math.log(2) / len(raw), "bound": not exact,
              "stderr_per_token": math.sqrt(var) / len(tokens),
              "estimator": estimator.kind, "mc_num": None if exact else estimator.mc_num}
    result["workdir"] = a.model  # its old name, in the JSON until the next release
    if a.json:
        print(json.dumps(result))
        return
    bound = ("exact" if exact else
             f"{family.objective} bound, {estimator.kind}, {estimator.mc_num} draws")
    print(f"{a.text}: {len(tokens):,} tokens in {windows} windows ({family.name}, {bound})")
    print(f"NLL per token {result['nll_per_token']:.4f} nats (+- "
          f"{result['stderr_per_token']:.4f}), perplexity {result['perplexity']:.2f}, "
          f"bits per byte {result['bits_per_byte']:.4f}")


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_main, argv)


if __name__ == "__main__":
    cli()
