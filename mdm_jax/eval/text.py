"""Negative log-likelihood per token and bits per byte of a text file, for every family.

    python -m mdm_jax.eval text --workdir runs/tiny_mdm --text data.txt [--mc-num 128] [--json]

The file is tokenized whole and cut into windows of seq_len - 1 tokens, each scored after a
BOS by the family's estimator (eval/likelihood.py): the ARM exactly, the MDMs by their ELBO
(`--estimator mc` SMDM's or `llada`), uniform-state diffusion by its NELBO; `--mc-num` draws.
Every family sees the same windows, so the figures compare: a diffusion model's is an upper
bound on its NLL. Prints tokens, windows, NLL per token (nats), perplexity, bits per byte
(total NLL / ln 2 / the file's UTF-8 bytes) and the standard error of the estimate.
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
    from absl import logging as absl_logging

    from mdm_jax import families
    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.errors import ArgumentParser
    from mdm_jax.eval.likelihood import ESTIMATORS, Estimator, EvalError, check_estimator
    from mdm_jax.inference import load

    p = ArgumentParser(prog="python -m mdm_jax.eval text", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a run's workdir or an export folder")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--estimator", choices=ESTIMATORS, default="",
                   help="default: the family's first (mc for diffusion, exact for the ARM)")
    p.add_argument("--mc-num", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="draws per network call")
    p.add_argument("--cfg", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        raw = open(a.text, "rb").read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--text {a.text}: {e}") from None
    if not text.strip():
        raise EvalError(f"--text {a.text} is empty")
    absl_logging.set_verbosity(absl_logging.WARNING)
    m = load(a.workdir, a.step)
    family = families.get(m.args.family)
    estimator = check_estimator(Estimator(kind=a.estimator, mc_num=a.mc_num,
                                          batch_size=a.batch_size, cfg=a.cfg), family)
    tok = Tokenizer.load(m.tokenizer_path)
    tokens = tok.encode(text)
    nll, var, windows = text_nll(m.model, m.params, tokens, tok.bos_id, m.config.seq_len,
                                 estimator, a.seed, progress=True)
    exact = family.exact_likelihood
    result = {"workdir": a.workdir, "step": m.step, "family": family.name,
              "tokens": len(tokens), "bytes": len(raw), "windows": windows, "nll_nats": nll,
              "nll_per_token": nll / len(tokens), "perplexity": math.exp(nll / len(tokens)),
              "bits_per_byte": nll / math.log(2) / len(raw), "bound": not exact,
              "stderr_per_token": math.sqrt(var) / len(tokens),
              "estimator": estimator.kind, "mc_num": None if exact else a.mc_num}
    if a.json:
        print(json.dumps(result))
        return
    bound = "exact" if exact else f"{family.objective} bound, {estimator.kind}, {a.mc_num} draws"
    print(f"{a.text}: {len(tokens):,} tokens in {windows} windows ({family.name}, {bound})")
    print(f"NLL per token {result['nll_per_token']:.4f} nats (+- "
          f"{result['stderr_per_token']:.4f}), perplexity {result['perplexity']:.2f}, "
          f"bits per byte {result['bits_per_byte']:.4f}")


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_main, argv)


if __name__ == "__main__":
    cli()
