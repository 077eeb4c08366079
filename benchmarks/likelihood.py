"""Likelihoods against LLaDA's own `get_log_likelihood`, side by side in one run.

    bash benchmarks/fetch_references.sh ../references          # once
    python benchmarks/likelihood.py                            # --llada ../references/LLaDA
    python benchmarks/likelihood.py --pairs 12 --context 25 --continuation 10 --mc-num 128

The demo's tiny MDM (`llada_pair`: trained and exported to llada-hf when missing) scores
`--pairs` (context, continuation) windows of the validation text both ways, alternately,
`--reps` times after a warm-up each: LLaDA's `get_log_likelihood(model, prompt, answer,
mc_num, batch_size)` on the export (transformers, float32, one pair at a time, as its code
takes them), and `mdm_jax.eval.likelihood.loglikelihoods` with the same estimator (`llada`:
exactly l of the m continuation tokens masked, l in 1..m, weight m / l) and draws on the run,
all pairs in one call. It prints each side's seconds, the ratio (LLaDA's time / ours; > 1:
mdm_jax is faster; target >= 1.5), the machine's load and whether other processes were busy
(the ratio is withheld then), and checks that the two estimates of every pair agree within
their Monte Carlo errors (|difference| < 4 x the difference's standard error, ours measured from
its draws; LLaDA's estimator has no larger variance).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import numpy as np
from llada_pair import (
    add_common_options,
    alternate,
    default_text,
    ensure,
    load_pair,
    paired_ratio,
    text_windows,
)
from references import Quiet, import_llada, ratio_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(p)
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--context", type=int, default=25, help="context tokens per pair")
    p.add_argument("--continuation", type=int, default=10, help="continuation tokens per pair")
    p.add_argument("--mc-num", type=int, default=128, help="Monte Carlo draws per pair")
    p.add_argument("--batch-size", type=int, default=16,
                   help="LLaDA's rows per network call (its default)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    llada = import_llada(args.llada, "get_log_likelihood")
    import torch

    from mdm_jax.eval.likelihood import Estimator, loglikelihoods

    export = ensure(args.model)
    ours, theirs = load_pair(args.model, export, args.threads)
    mask_id = ours.model.args.mask_id
    windows = text_windows(ours.tokenizer_path, args.text or default_text(), args.pairs,
                           args.context + args.continuation)
    requests = [(w[:args.context], w[args.context:]) for w in windows]
    estimator = Estimator(kind="llada", mc_num=args.mc_num)
    results = {}

    def run_ours():
        results["ours"] = loglikelihoods(ours.model, ours.params, requests, estimator)

    def run_theirs():
        torch.manual_seed(0)
        results["theirs"] = [
            llada.get_log_likelihood(theirs, torch.tensor(c), torch.tensor(x),
                                     mc_num=args.mc_num, batch_size=args.batch_size,
                                     mask_id=mask_id) for c, x in requests]

    with Quiet() as quiet:
        times = alternate({"llada": run_theirs, "mdm_jax": run_ours}, args.reps)
    ratio, paired = paired_ratio(times["llada"], times["mdm_jax"])
    z = [(t - o.logprob) / (math.sqrt(2) * o.stderr)
         for t, o in zip(results["theirs"], results["ours"], strict=True)]
    r = dict(pairs=args.pairs, context=args.context, continuation=args.continuation,
             mc_num=args.mc_num, llada_s=times["llada"], mdm_jax_s=times["mdm_jax"],
             ratio=ratio, ratio_paired=paired, busy=quiet.busy, machine=quiet.line(),
             others_cores=quiet.others_cores, load_average=quiet.load_before[0],
             llada_estimates=results["theirs"],
             mdm_jax_estimates=[o.logprob for o in results["ours"]],
             mdm_jax_stderr=[o.stderr for o in results["ours"]], z=z,
             agree=bool(max(abs(v) for v in z) < 4))
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{args.pairs} pairs of {args.context} + {args.continuation} tokens, estimator "
              f"llada, {args.mc_num} draws each")
        for name in ("llada", "mdm_jax"):
            print(f"{name:8s} {statistics.median(times[name]):.3f}s per run  "
                  f"[{', '.join(f'{t:.3f}' for t in times[name])}]")
        print(f"LLaDA / mdm_jax  {ratio_text(ratio, quiet.busy, args.force)} (medians)   "
              f"{ratio_text(paired, quiet.busy, args.force)} (alternate pairs)   "
              f"target >= 1.5")
        print(f"estimates: mean {np.mean(results['theirs']):.3f} (LLaDA) vs "
              f"{np.mean(r['mdm_jax_estimates']):.3f} (mdm_jax); max |z| "
              f"{max(abs(v) for v in z):.2f} -> {'agree' if r['agree'] else 'DISAGREE'}")
        print(quiet.line())
    if not r["agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
