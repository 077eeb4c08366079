"""Sampling against LLaDA's own `generate()`, side by side in one run
(`python benchmarks/sampling.py --llada ../references/LLaDA [options]` runs this).

The demo's tiny MDM (`llada_pair`: trained and exported to llada-hf when missing) answers
`--prompts` prompts (BOS and a window of the validation text) both ways, alternately, `--reps`
times after a warm-up each: LLaDA's `generate(model, prompt, steps, gen_length, block_length,
temperature=0, remasking="low_confidence")` on the export (transformers, float32), and
`mdm_jax.inference.generate` on the run with the same settings (`reveal_order="front"`:
LLaDA's schedule). Both sides get the same prompt ids: one prompt per call (as LLaDA's chat
runs), and all prompts in one call (`--batch`). It prints each side's seconds per call, the
ratio (LLaDA's time / ours; > 1: mdm_jax is faster; target >= 1.2), whether every answer token
is identical (it exits 1 otherwise), and the machine's load (the ratio is withheld when other
processes were busy).
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-length", type=int, default=24, help="tokens per prompt (BOS "
                   "included)")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--block-length", type=int, default=16)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    llada = import_llada(args.llada, "generate")
    import torch

    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.inference import MDMSampler, generate

    export = ensure(args.model)
    ours, theirs = load_pair(args.model, export, args.threads)
    mask_id = ours.model.args.mask_id
    bos = Tokenizer.load(ours.tokenizer_path).bos_id
    windows = text_windows(ours.tokenizer_path, args.text or default_text(), args.prompts,
                           args.prompt_length - 1)
    prompts = [[bos] + w for w in windows]
    sampler = MDMSampler(steps=args.steps, block_length=args.block_length,
                         remasking="low_confidence", temperature=0.0, reveal_order="front")
    p, g = args.prompt_length, args.gen_length
    rows, identical = [], True
    for batch in (1, args.prompts):
        groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        answers = {}

        def run_ours(groups=groups, answers=answers):
            answers["mdm_jax"] = np.concatenate([
                generate(ours.model, ours.params, group, g, sampler).tokens[:, p:p + g]
                for group in groups])

        def run_theirs(groups=groups, answers=answers):
            answers["llada"] = np.concatenate([
                llada.generate(theirs, torch.tensor(group), steps=args.steps, gen_length=g,
                               block_length=args.block_length, temperature=0.0,
                               remasking="low_confidence", mask_id=mask_id)[:, p:].numpy()
                for group in groups])

        with Quiet() as quiet:
            times = alternate({"llada": run_theirs, "mdm_jax": run_ours}, args.reps)
        same = bool(np.array_equal(answers["llada"], answers["mdm_jax"]))
        identical &= same
        ratio, paired = paired_ratio(times["llada"], times["mdm_jax"])
        per_call = {k: statistics.median(v) / len(groups) for k, v in times.items()}
        rows.append(dict(batch=batch, calls=len(groups), llada_s=times["llada"],
                         mdm_jax_s=times["mdm_jax"], llada_s_per_call=per_call["llada"],
                         mdm_jax_s_per_call=per_call["mdm_jax"], ratio=ratio,
                         ratio_paired=paired, identical=same, busy=quiet.busy,
                         machine=quiet.line(), others_cores=quiet.others_cores,
                         load_average=quiet.load_before[0],
                         tokens_differing=int(np.sum(answers["llada"] != answers["mdm_jax"]))))
    if args.json:
        print(json.dumps(dict(settings=vars(args), rows=rows), indent=2))
    else:
        print(f"{args.prompts} prompts of {p} tokens, {g} generated in {args.steps} steps, "
              f"blocks of {args.block_length}, greedy, low-confidence remasking")
        for r in rows:
            print(f"batch {r['batch']}: LLaDA {r['llada_s_per_call']:.3f}s, mdm_jax "
                  f"{r['mdm_jax_s_per_call']:.3f}s per call; LLaDA / mdm_jax "
                  f"{ratio_text(r['ratio'], r['busy'], args.force)} (medians) "
                  f"{ratio_text(r['ratio_paired'], r['busy'], args.force)} (alternate pairs), "
                  f"target >= 1.2; tokens "
                  f"{'identical' if r['identical'] else 'DIFFER'} "
                  f"({r['tokens_differing']} differ)")
            print(f"  {r['machine']}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
