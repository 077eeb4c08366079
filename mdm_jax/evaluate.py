"""Negative log-likelihood per token and bits per byte of a text file, for MDMs and ARMs.

    python -m mdm_jax.evaluate --workdir runs/tiny_mdm --text data.txt [--mc-num 128] [--json]

The file is tokenized whole and cut into windows of seq_len - 1 tokens, each scored after a
BOS: the ARM exactly (sum of log p(token | BOS and the window's earlier tokens)), the MDM by
its ELBO (`--estimator mc` SMDM's or `llada`, `--mc-num` draws, `--cfg` guidance has nothing to
guide here and is refused for ARMs). Both families see the same windows, so the figures
compare: the MDM's is an upper bound on its NLL. Prints tokens, windows, NLL per token (nats),
perplexity, bits per byte (total NLL / ln 2 / the file's UTF-8 bytes) and the standard error
of the MDM's estimate.
"""

from __future__ import annotations

import argparse
import json
import math


def _main(argv=None) -> None:
    from absl import logging as absl_logging

    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.errors import ArgumentParser
    from mdm_jax.eval.likelihood import (
        ESTIMATORS,
        Estimator,
        EvalError,
        check_estimator,
        loglikelihood,
    )
    from mdm_jax.inference import load

    p = ArgumentParser(prog="python -m mdm_jax.evaluate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a run's workdir or an export folder")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--estimator", choices=[e for e in ESTIMATORS if e != "chain"], default="mc")
    p.add_argument("--mc-num", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="draws per network call")
    p.add_argument("--cfg", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    estimator = Estimator(kind=a.estimator, mc_num=a.mc_num, batch_size=a.batch_size, cfg=a.cfg)
    try:
        raw = open(a.text, "rb").read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--text {a.text}: {e}") from None
    if not text.strip():
        raise EvalError(f"--text {a.text} is empty")
    absl_logging.set_verbosity(absl_logging.WARNING)
    m = load(a.workdir, a.step)
    check_estimator(estimator, m.args.causal)
    tok = Tokenizer.load(m.tokenizer_path)
    tokens = tok.encode(text)
    width = m.config.seq_len - 1
    nll, var, windows = 0.0, 0.0, 0
    for k, start in enumerate(range(0, len(tokens), width)):
        s = loglikelihood(m.model, m.params, [tok.bos_id], tokens[start:start + width],
                          estimator, seed=a.seed + k, max_length=m.config.seq_len)
        nll -= s.logprob
        var += s.stderr ** 2
        windows += 1
    result = {"workdir": a.workdir, "step": m.step, "family": "arm" if m.args.causal else "mdm",
              "tokens": len(tokens), "bytes": len(raw), "windows": windows, "nll_nats": nll,
              "nll_per_token": nll / len(tokens), "perplexity": math.exp(nll / len(tokens)),
              "bits_per_byte": nll / math.log(2) / len(raw),
              "stderr_per_token": math.sqrt(var) / len(tokens),
              "estimator": None if m.args.causal else a.estimator,
              "mc_num": None if m.args.causal else a.mc_num}
    if a.json:
        print(json.dumps(result))
        return
    bound = "exact" if m.args.causal else f"ELBO bound, {a.estimator}, {a.mc_num} draws"
    print(f"{a.text}: {len(tokens):,} tokens in {windows} windows ({bound})")
    print(f"NLL per token {result['nll_per_token']:.4f} nats (+- "
          f"{result['stderr_per_token']:.4f}), perplexity {result['perplexity']:.2f}, "
          f"bits per byte {result['bits_per_byte']:.4f}")


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_main, argv)


if __name__ == "__main__":
    cli()
