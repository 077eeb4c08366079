"""Fused (sequence-chunked, rematerialised) cross-entropy vs the naive full-logits loss.

    python benchmarks/fused_loss.py                       # batch 4 x seq 2048, d 768, vocab 32000
    python benchmarks/fused_loss.py --chunk 128 --json
    python benchmarks/fused_loss.py --reps 0              # memory and agreement only, no timing

Both sides compute value_and_grad, w.r.t. the hidden states and the head kernel, of the MDM
loss sum_{b,l} w[b,l] * CE(hidden[b,l] @ head, x0[b,l]) / (B*L) with w = mask / p (random t and
mask per row, as in `objectives.mdm_loss`):

    naive: naive_cross_entropy(logits_from_hidden(hidden, head), targets, weights)
    fused: chunked_cross_entropy(hidden, head, targets, weights, chunk)

It prints the XLA temp memory of each compiled function (`memory_analysis().temp_size_in_bytes`)
and the fused/naive ratio (target <= 0.25), the largest differences in loss and gradients, and
the two run times measured alternately in the same process (fused/naive time ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=768, help="768 = the 170M preset's")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=0, help="0 = base_config()'s loss_chunk")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the hidden states (the head kernel is float32)")
    p.add_argument("--reps", type=int, default=2, help="timed calls of each (0: no timing)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mdm_jax.config import base_config
    from mdm_jax.model import logits_from_hidden
    from mdm_jax.objectives import chunked_cross_entropy, naive_cross_entropy

    chunk = args.chunk or base_config().objective.loss_chunk
    b, length, d, v = args.batch, args.seq_len, args.d_model, args.vocab
    dtype = jnp.dtype(args.dtype)
    k_h, k_w, k_x, k_t, k_m = jax.random.split(jax.random.PRNGKey(args.seed), 5)
    hidden = jax.random.normal(k_h, (b, length, d), jnp.float32).astype(dtype)
    head = jax.random.normal(k_w, (d, v), jnp.float32) * (2.0 / (5.0 * d)) ** 0.5
    targets = jax.random.randint(k_x, (b, length), 0, v, jnp.int32)
    p = (1.0 - 1e-3) * jax.random.uniform(k_t, (b,)) + 1e-3
    masked = jax.random.uniform(k_m, (b, length)) < p[:, None]
    weights = masked.astype(jnp.float32) / p[:, None]
    denom = float(b * length)

    def naive(h, w):
        return naive_cross_entropy(logits_from_hidden(h, w), targets, weights) / denom

    def fused(h, w):
        return chunked_cross_entropy(h, w, targets, weights, chunk) / denom

    log = (lambda msg: None) if args.json else (lambda msg: print(msg, flush=True))
    fns, temp, compile_s = {}, {}, {}
    for name, f in (("naive", naive), ("fused", fused)):
        t0 = time.perf_counter()
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(hidden, head).compile()
        compile_s[name] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        temp[name] = int(mem.temp_size_in_bytes)
        fns[name] = compiled
        log(f"compiled {name} in {compile_s[name]:.1f}s: temp {temp[name] / 2**20:,.1f} MiB")

    out = {name: jax.block_until_ready(fn(hidden, head)) for name, fn in fns.items()}
    (ln, (ghn, gwn)), (lf, (ghf, gwf)) = out["naive"], out["fused"]

    def maxdiff(a, b_):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b_.astype(jnp.float32))))

    def maxabs(a):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32))))

    agree = dict(
        loss_naive=float(ln), loss_fused=float(lf), loss_abs_diff=abs(float(ln) - float(lf)),
        grad_hidden_max_abs_diff=maxdiff(ghn, ghf), grad_hidden_max_abs=maxabs(ghn),
        grad_head_max_abs_diff=maxdiff(gwn, gwf), grad_head_max_abs=maxabs(gwn),
    )
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    agree["allclose"] = bool(
        np.isclose(float(ln), float(lf), rtol=tol)
        and agree["grad_hidden_max_abs_diff"] <= tol * max(agree["grad_hidden_max_abs"], 1e-30)
        and agree["grad_head_max_abs_diff"] <= tol * max(agree["grad_head_max_abs"], 1e-30))
    del out, ghn, gwn, ghf, gwf

    times = {"naive": [], "fused": []}
    for i in range(args.warmup + args.reps if args.reps > 0 else 0):
        for name in ("naive", "fused"):  # alternate, so both see the same machine state
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](hidden, head))
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
            log(f"  {name} call {i + 1}: {dt:.3f}s" + (" (warmup)" if i < args.warmup else ""))

    logits_bytes = b * length * v * 4
    result = dict(
        batch=b, seq_len=length, tokens=b * length, d_model=d, vocab=v, chunk=chunk,
        dtype=args.dtype, device_kind=jax.devices()[0].device_kind,
        full_logits_bytes=logits_bytes,
        temp_bytes_naive=temp["naive"], temp_bytes_fused=temp["fused"],
        temp_ratio=temp["fused"] / temp["naive"], compile_s=compile_s, **agree,
    )
    if args.reps > 0:
        pairs = [f / n for n, f in zip(times["naive"], times["fused"], strict=True)]
        result.update(times_s=times, time_naive_s=statistics.median(times["naive"]),
                      time_fused_s=statistics.median(times["fused"]),
                      time_ratio=statistics.median(pairs))

    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\nvalue_and_grad wrt (hidden, head): batch {b} x seq {length} = {b * length} tokens, "
          f"d {d}, vocab {v}, chunk {chunk}, hidden {args.dtype}, on {result['device_kind']}")
    print(f"one full float32 logits tensor: {logits_bytes / 2**20:,.1f} MiB")
    print(f"temp memory  naive {temp['naive'] / 2**20:,.1f} MiB   fused "
          f"{temp['fused'] / 2**20:,.1f} MiB   fused/naive {result['temp_ratio']:.3f} "
          f"(target <= 0.25: {'PASS' if result['temp_ratio'] <= 0.25 else 'FAIL'})")
    print(f"loss         naive {agree['loss_naive']:.6f}   fused {agree['loss_fused']:.6f}   "
          f"|diff| {agree['loss_abs_diff']:.3g}")
    print(f"grad hidden  max|diff| {agree['grad_hidden_max_abs_diff']:.3g} "
          f"(max|grad| {agree['grad_hidden_max_abs']:.3g})")
    print(f"grad head    max|diff| {agree['grad_head_max_abs_diff']:.3g} "
          f"(max|grad| {agree['grad_head_max_abs']:.3g})")
    print(f"agreement    {'OK' if agree['allclose'] else 'MISMATCH'} (relative tol {tol:g})")
    if args.reps > 0:
        print(f"time         naive {result['time_naive_s']:.3f}s   fused "
              f"{result['time_fused_s']:.3f}s   fused/naive {result['time_ratio']:.3f} "
              f"(median of {args.reps} alternating pairs; the fused loss recomputes each "
              f"chunk's logits in the backward, so ~4/3 of the naive matmul FLOPs)")


if __name__ == "__main__":
    main()
