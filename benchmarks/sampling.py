"""Speed and quality of sampling for every family, side by side in one run (SMDM's trade-off,
and the uniform-state study's speed-quality frontier).

    python benchmarks/sampling.py                    # trains what is missing, then measures
    python benchmarks/sampling.py --num 64 --steps 8,16,32,64,128 --json
    python benchmarks/sampling.py --families mdm     # SMDM's comparison only
    python benchmarks/sampling.py --llada ../references/LLaDA   # against LLaDA's generate()
                                                     # (benchmarks/llada_sampling.py)

On the demo corpus (prepared by `bash launch/demo.sh`; this script runs the same data steps if
they are missing) it trains, or reuses when already trained:
  - the `tiny` ARM and a `tiny` model of each diffusion family in `--families` (mdm, mdm-ce,
    uniform, eso) from `experiments/tiny.py` (same data, steps, tokenizer),
  - a larger ARM scorer (`small` preset, `--scorer-steps`) on the same corpus and tokenizer.
Then it generates `--num` unconditional samples of `seq_len - 1` tokens after BOS with the ARM
(KV cache; also full recompute) and with each diffusion model at each of `--steps` (MDMs:
random remasking, the exact reverse process; uniform: ancestral; eso: its diffusion phase at
alpha0 = 1 with the KV cache, and once recomputing at the largest step count; temperature 1),
each after one untimed warm-up call of the same shape, and reports for each: seconds, tokens/s,
network calls (NFE), the generative perplexity of the samples under the scorer (exp of the mean
NLL of the generated tokens), and the mean per-sample unigram entropy in bits (degenerate
repetition shows as a low entropy). The validation data's own perplexity under the scorer is
printed for reference. It prints the table, marks the Pareto front (faster and better than
nothing else), and writes `results.json`, `pareto.png` (generative perplexity vs tokens/s) and
`frontier.png` (generative perplexity vs sampling steps, one line per family, the ARM at its
one step per token) into `--out`. Generative perplexity compares across families (one scorer
judges every sample), unlike the families' validation bounds. Caching is compared separately on
one sample at `--cache-steps` (steps >= tokens, as RADD measures it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSION = ("mdm", "mdm-ce", "uniform", "eso")
DATA = os.path.join(REPO, "data_cache")


def ensure_data() -> None:
    """The demo's corpus, tokenizer and prepared shards (the commands of launch/demo.sh)."""
    py = sys.executable
    steps = [
        [py, "-m", "mdm_jax.data.corpus", "--dest", f"{DATA}/demo_corpus"],
        [py, "-m", "mdm_jax.data.train_tokenizer", "--input", f"{DATA}/demo_corpus/train",
         "--output", f"{DATA}/demo_tokenizer.model", "--vocab-size", "2048"],
    ] + [[py, "-m", "mdm_jax.data.prepare", "--input", f"{DATA}/demo_corpus", "--split", split,
          "--output", f"{DATA}/demo_prepared_128/{split}", "--tokenizer",
          f"{DATA}/demo_tokenizer.model", "--seq-len", "128", "--workers", "2"]
         for split in ("train", "validation")]
    for cmd in steps:  # each is idempotent: a finished step returns at once
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def ensure_trained(kind: str, workdir: str, preset: str = "tiny", steps: int = 900) -> None:
    from mdm_jax.train import train

    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from tiny import get_config

    c = get_config(kind)
    c.workdir, c.model.preset, c.steps = workdir, preset, steps
    c.samples.count = 0
    c.data.train_dir = f"{DATA}/demo_prepared_128/train"
    c.data.eval_dir = f"{DATA}/demo_prepared_128/validation"
    c.data.tokenizer = f"{DATA}/demo_tokenizer.model"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        train(c)  # resumes, or does nothing when already finished
    finally:
        os.chdir(cwd)


def scorer_nll(scorer, tokens, prompt_len: int):
    """Per-sample mean NLL (nats) of tokens[:, prompt_len:] under the ARM scorer."""
    import jax
    import jax.numpy as jnp

    logits = scorer.logits(jnp.asarray(tokens))
    logp = jax.nn.log_softmax(logits[:, prompt_len - 1:-1], axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(tokens)[:, prompt_len:, None], axis=-1)[..., 0]
    return jax.device_get(jnp.mean(nll, axis=-1))


def unigram_entropy_bits(row) -> float:
    import numpy as np

    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def measure(name, fn, scorer, prompt_len, vocab):
    import numpy as np

    fn()  # compile and warm up at this shape
    g = fn()
    rows = np.asarray(g.tokens)
    gen = rows[:, prompt_len:]
    bad = int((gen >= vocab).sum())  # a mask token left would be a sampler bug
    nll = scorer_nll(scorer, np.minimum(rows, vocab - 1), prompt_len)
    return {"sampler": name, "seconds": g.seconds, "tokens_per_s": gen.size / g.seconds,
            "nfe": g.nfe, "gen_ppl": float(math.exp(float(np.mean(nll)))),
            "entropy_bits": float(np.mean([unigram_entropy_bits(r) for r in gen])),
            "invalid_tokens": bad}


def pareto(rows):
    """Rows on the front of (seconds, gen_ppl): no other row is both faster and better."""
    return [r for r in rows if not any(
        o["seconds"] <= r["seconds"] and o["gen_ppl"] <= r["gen_ppl"]
        and (o["seconds"], o["gen_ppl"]) != (r["seconds"], r["gen_ppl"]) for o in rows)]


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mdm_jax.plot import readable_log_ticks

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for family, marker in FAMILY_MARKERS.items():
        pts = [r for r in rows if r["sampler"].split(" ", 1)[0] == family]
        ax.scatter([r["tokens_per_s"] for r in pts], [r["gen_ppl"] for r in pts],
                   marker=marker, label=family)
        for r in pts:  # the step count (or the ARM's path), small: points crowd
            label = r["sampler"].split(" ", 1)[-1].replace(" steps", "")
            ax.annotate(label, (r["tokens_per_s"], r["gen_ppl"]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("generated tokens per second (log; faster to the right)")
    ax.set_ylabel("generative perplexity (scorer ARM, log)")
    ax.set_title("Sampling speed vs quality, tiny models on the demo corpus")
    ax.legend()
    fig.tight_layout()
    readable_log_ticks(fig)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)


FAMILY_MARKERS = {"ARM": "s", "MDM": "o", "MDM-CE": "^", "UNIFORM": "D", "ESO": "v"}


def plot_frontier(rows, path: str) -> None:
    """Generative perplexity against network calls (sampling steps; the ARM: one per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mdm_jax.plot import readable_log_ticks

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for family, marker in FAMILY_MARKERS.items():
        pts = sorted((r for r in rows if r["sampler"].split(" ", 1)[0] == family
                      and "recompute" not in r["sampler"]), key=lambda r: r["nfe"])
        if pts:
            ax.plot([r["nfe"] for r in pts], [r["gen_ppl"] for r in pts], marker=marker,
                    linestyle="none" if family == "ARM" else "-", ms=8 if family == "ARM" else 6,
                    label=family + (" (KV cache, 1 call per token)" if family == "ARM" else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps (network calls per sample)")
    ax.set_ylabel("generative perplexity (scorer ARM, log)")
    ax.set_title("Speed-quality frontier per family, tiny models on the demo corpus")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    readable_log_ticks(fig)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--llada" or a.startswith("--llada=") for a in argv):
        from llada_sampling import main as against_llada  # LLaDA's generate(), side by side

        return against_llada(argv)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=32, help="samples per sampler (one batch)")
    p.add_argument("--steps", default="8,16,32,64,128", help="diffusion step counts")
    p.add_argument("--families", default="mdm,mdm-ce,uniform,eso",
                   help="diffusion families to compare with the ARM")
    p.add_argument("--cache-steps", default="128,512",
                   help="step counts of the caching comparison (one sample, as RADD's)")
    p.add_argument("--runs", default=os.path.join(REPO, "runs", "bench_sampling"))
    p.add_argument("--scorer-steps", type=int, default=1500)
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "sampling"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    import numpy as np

    from mdm_jax import families as fams
    from mdm_jax.data import loader
    from mdm_jax.inference import MDMSampler, generate, load

    ensure_data()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in DIFFUSION]
    if bad or not families:
        p.error(f"--families {args.families!r}: give diffusion families among "
                f"{', '.join(DIFFUSION)}")
    runs = {f: os.path.join(args.runs, f"tiny_{f}") for f in [*families, "arm"]}
    runs["scorer"] = os.path.join(args.runs, "scorer_arm_small")
    for family in [*families, "arm"]:
        ensure_trained(family, runs[family])
    ensure_trained("arm", runs["scorer"], preset="small", steps=args.scorer_steps)
    models = {f: load(runs[f]) for f in [*families, "arm"]}
    arm, scorer = models["arm"], load(runs["scorer"])
    mdm = models.get("mdm", models[families[0]])
    seq_len = mdm.config.seq_len
    gen_length, prompts = seq_len - 1, [[1]] * args.num  # BOS, then seq_len - 1 tokens
    vocab = mdm.args.vocab_size

    val = loader.make_eval_batches(f"{DATA}/demo_prepared_128/validation",
                                   batch_size_per_process=args.num, num_batches=1)[0]
    val_ppl = float(math.exp(float(np.mean(scorer_nll(scorer, val[:, :seq_len], 1)))))

    rows = [
        measure("ARM kv-cache", lambda: generate(arm.model, arm.params, prompts, gen_length,
                                                 MDMSampler(temperature=1.0), seed=args.seed),
                scorer, 1, vocab),
        measure("ARM recompute", lambda: generate(arm.model, arm.params, prompts, gen_length,
                                                  MDMSampler(temperature=1.0), seed=args.seed,
                                                  kv_cache=False), scorer, 1, vocab),
    ]
    step_counts = [int(s) for s in args.steps.split(",")]
    for family in families:
        m = models[family]
        takes_remasking = "remasking" in fams.get(family).sampler_options
        for steps in step_counts:
            s = MDMSampler(steps=steps, temperature=1.0,
                           **({"remasking": "random"} if takes_remasking else {}))
            rows.append(measure(f"{family.upper()} {steps} steps", lambda s=s, m=m: generate(
                m.model, m.params, prompts, gen_length, s, seed=args.seed), scorer, 1, vocab))
        if family == "eso":  # the same samples without the KV cache: what the cache buys
            s = MDMSampler(steps=max(step_counts), temperature=1.0)
            rows.append(measure(f"ESO {s.steps} steps recompute", lambda s=s, m=m: generate(
                m.model, m.params, prompts, gen_length, s, seed=args.seed, kv_cache=False),
                scorer, 1, vocab))
    # Caching: one sample, steps >= its tokens (RADD's setting): steps that reveal nothing are
    # common there, and each one skipped is a network call saved.
    caching = []
    for steps in (int(s) for s in args.cache_steps.split(",") if "mdm" in models):
        for cache in (False, True):
            s = MDMSampler(steps=steps, remasking="random", temperature=1.0, cache=cache)
            caching.append(measure(f"MDM {steps} steps{' cached' if cache else ''}, 1 sample",
                                   lambda s=s: generate(mdm.model, mdm.params, [[1]], gen_length,
                                                        s, seed=args.seed), scorer, 1, vocab))
    front = {r["sampler"] for r in pareto(rows)}
    os.makedirs(args.out, exist_ok=True)
    result = {"num": args.num, "gen_length": gen_length, "validation_ppl": val_ppl,
              "trained_steps": {f: m.step for f, m in models.items()}, "scorer_step": scorer.step,
              "scorer_preset": scorer.config.model.preset, "rows": rows,
              "pareto": sorted(front), "caching": caching,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.join(args.out, "pareto.png"))
    plot_frontier(rows, os.path.join(args.out, "frontier.png"))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.num} samples x {gen_length} tokens; scorer: {scorer.config.model.preset} ARM "
          f"(step {scorer.step}); validation data under the scorer: ppl {val_ppl:.1f}")
    head = f"{'sampler':<24}{'seconds':>9}{'tokens/s':>10}{'NFE':>6}{'gen ppl':>9}{'entropy':>9}"
    print(head + "  pareto")
    print("-" * (len(head) + 8))
    for r in rows:
        print(f"{r['sampler']:<24}{r['seconds']:>9.3f}{r['tokens_per_s']:>10,.0f}{r['nfe']:>6}"
              f"{r['gen_ppl']:>9.1f}{r['entropy_bits']:>9.2f}  "
              f"{'*' if r['sampler'] in front else ''}")
    print("caching (one sample):")
    for r in caching:
        print(f"  {r['sampler']:<30}{r['seconds']:>9.3f} s{r['nfe']:>6} NFE  gen ppl "
              f"{r['gen_ppl']:.1f}")
    arm_s = rows[0]["seconds"]
    for family in families:
        tag = family.upper() + " "
        good = [r for r in rows[2:] if r["sampler"].startswith(tag)
                and r["gen_ppl"] <= rows[0]["gen_ppl"]]
        if good:
            r = min(good, key=lambda r: r["seconds"])
            print(f"fastest {family} setting at least as good as the ARM: {r['sampler']}, "
                  f"{arm_s / r['seconds']:.2f}x the ARM's speed (SMDM reports 1.4x for the MDM)")
        else:
            print(f"no {family} setting here reaches the ARM's generative perplexity")
    print(f"wrote {args.out}/results.json, pareto.png and frontier.png")


if __name__ == "__main__":
    main()
