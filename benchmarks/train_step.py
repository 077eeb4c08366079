"""Train-step throughput, with this machine's XLA matmul FLOP/s measured side by side.

    python benchmarks/train_step.py                          # 19M preset, batch 8 x 512, fp32
    python benchmarks/train_step.py --preset 19M --dtype bfloat16 --remat dots --json
    python benchmarks/train_step.py --devices 4 --mesh 1,4,1 # simulated 4-device CPU mesh (FSDP)
    python benchmarks/train_step.py --sweep                  # a few settings, one table

It builds `mdm_jax.trainer.Trainer` from `base_config()`, compiles the sharded train step ahead of
time, and times whole steps (state donated, `block_until_ready`) on random token batches. Between
timed steps it times plain jitted matmuls of the model's shapes in the same dtype (the best shape
is the machine's "achievable" matmul rate), so the printed ratio

    ratio = step FLOP/s (detailed model count) / best matmul FLOP/s

is robust to a machine whose speed drifts while the benchmark runs (other jobs, thermal limits).
The detailed count is `flops.train_flops_per_token` (dense weights + attention + head, x3); the
6N column is SMDM's convention (no attention, no head) and is always lower.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from references import Quiet, ratio_text

# Sweep variants: name -> overrides of the command-line settings.
SWEEP = {
    "baseline": {},
    "remat=dots": {"remat": "dots"},
    "remat=full": {"remat": "full"},
    "remat=dots_no_batch": {"remat": "dots_no_batch"},
    "dots+chunk128": {"remat": "dots", "loss_chunk": 128},
    "attention=jax": {"attention": "jax"},
    "loss_chunk=128": {"loss_chunk": 128},
    "loss_chunk=512": {"loss_chunk": 512},
    "no_scan": {"scan_layers": False},
    "bfloat16": {"dtype": "bfloat16"},
    "batch=16": {"batch": 16},
    "micro=4": {"micro_batch": 4},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="19M")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--micro-batch", type=int, default=0, help="0 = no gradient accumulation")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
    p.add_argument("--devices", type=int, default=0,
                   help="simulate N CPU devices (sets XLA_FLAGS before jax is imported)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="none")
    p.add_argument("--attention", default="xla")
    p.add_argument("--objective", default="mdm", choices=("mdm", "arm"))
    p.add_argument("--loss-chunk", type=int, default=0, help="0 = the config default")
    p.add_argument("--no-scan", action="store_true", help="unrolled layers (scan_layers=False)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", nargs="?", const=",".join(SWEEP), default=None,
                   help=f"comma list of variants to run in one process (default all): "
                        f"{', '.join(SWEEP)}")
    p.add_argument("--smdm", default="../references/SMDM",
                   help="checkout of ML-GSAI/SMDM whose train step runs alternately with ours "
                        "(bash benchmarks/fetch_references.sh fetches it)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip SMDM's step (only the matmul baseline)")
    p.add_argument("--smdm-malloc", default="tuned,system",
                   help="SMDM's process allocator settings to time, comma separated: tuned "
                        "(mdm_jax's glibc settings, as its own process has them: the like-for-"
                        "like comparison), system (glibc's defaults, as SMDM runs)")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch threads for SMDM's step (0: all cores, as XLA uses)")
    p.add_argument("--force", action="store_true",
                   help="print the ratio even when other processes were busy")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p.parse_args(argv)


def _setup_devices(n: int) -> None:
    if n <= 0:
        return
    if "jax" in sys.modules:
        raise SystemExit("--devices must be applied before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def _settings(args: argparse.Namespace) -> dict:
    return dict(preset=args.preset, seq_len=args.seq_len, batch=args.batch,
                micro_batch=args.micro_batch, mesh=args.mesh, dtype=args.dtype,
                remat=args.remat, attention=args.attention, objective=args.objective,
                loss_chunk=args.loss_chunk, scan_layers=not args.no_scan,
                smdm=None if args.no_reference else args.smdm, threads=args.threads,
                smdm_malloc=[m for m in args.smdm_malloc.split(",") if m])


def make_config(s: dict):
    from mdm_jax.config import base_config

    c = base_config()
    c.model.preset = s["preset"]
    c.model.vocab_size = 0  # the preset's: 32000 for the SMDM presets
    c.model.dtype = s["dtype"]
    c.model.remat = s["remat"]
    c.model.attention = s["attention"]
    c.model.scan_layers = s["scan_layers"]
    c.objective.kind = s["objective"]
    if s["loss_chunk"]:
        c.objective.loss_chunk = s["loss_chunk"]
    c.seq_len = s["seq_len"]
    c.global_batch = s["batch"]
    c.micro_batch = s["micro_batch"]
    c.steps = 10_000  # only shapes the LR schedule
    data, fsdp, tensor = (int(x) for x in s["mesh"].split(","))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    return c


class MatmulBaseline:
    """Jitted a @ b for a few shapes; `run_once` times each shape once and keeps every sample."""

    def __init__(self, shapes, dtype):
        import jax
        import jax.numpy as jnp

        self.shapes = shapes
        self.fn = jax.jit(lambda a, b: a @ b)
        keys = jax.random.split(jax.random.PRNGKey(1), 2 * len(shapes))
        self.operands = []
        for i, (m, k, n) in enumerate(shapes):
            a = jax.random.normal(keys[2 * i], (m, k), jnp.float32).astype(dtype)
            b = jax.random.normal(keys[2 * i + 1], (k, n), jnp.float32).astype(dtype)
            self.operands.append((a, b))
            self.fn(a, b).block_until_ready()  # compile + warm
        self.samples = {shape: [] for shape in shapes}
        self.cpu_samples = {shape: [] for shape in shapes}

    def run_once(self) -> None:
        for shape, (a, b) in zip(self.shapes, self.operands, strict=True):
            c0, t0 = time.process_time(), time.perf_counter()
            self.fn(a, b).block_until_ready()
            self.samples[shape].append(time.perf_counter() - t0)
            self.cpu_samples[shape].append(time.process_time() - c0)

    def rates(self) -> dict:
        """FLOP/s per shape from the median sample."""
        return {shape: 2.0 * shape[0] * shape[1] * shape[2] / statistics.median(ts)
                for shape, ts in self.samples.items() if ts}

    def best(self) -> tuple[tuple[int, int, int], float]:
        rates = self.rates()
        shape = max(rates, key=rates.get)
        return shape, rates[shape]


def matmul_shapes(preset, tokens: int, loss_chunk_tokens: int) -> list[tuple[int, int, int]]:
    d, f, v = preset.d_model, preset.mlp_dim, preset.vocab_size
    return [
        (tokens, d, f),  # w1 / w2
        (tokens, f, d),  # w3
        (tokens, d, d),  # q, k, v, o
        (loss_chunk_tokens, d, v),  # one loss chunk's head projection
        (2048, 2048, 2048),  # large square
    ]


def bench_one(s: dict, steps: int, warmup: int, seed: int, log) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mdm_jax import flops
    from mdm_jax.presets import get_preset
    from mdm_jax.trainer import Trainer

    c = make_config(s)
    preset = get_preset(c.model.preset)
    trainer = Trainer(c)
    state = trainer.create_state(seed)
    n_dev = trainer.mesh.size
    device_kind = jax.devices()[0].device_kind
    batch_shape = (c.global_batch, c.seq_len + 1)
    vocab = trainer.args.vocab_size

    with trainer.context():
        t0 = time.perf_counter()
        lowered = trainer.step.lower(state, jax.ShapeDtypeStruct(
            batch_shape, jnp.int32, sharding=trainer.batch_sharding))
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_bytes = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        xla_flops = float(cost.get("flops", 0.0)) if cost else None
    except Exception:  # cost analysis is best-effort on some backends
        xla_flops = None

    micro = c.micro_batch or c.global_batch
    batch_shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    tokens_per_dev = micro * c.seq_len // batch_shards
    chunk_tokens = (micro // batch_shards) * min(c.objective.loss_chunk, c.seq_len)
    baseline = MatmulBaseline(matmul_shapes(preset, tokens_per_dev, chunk_tokens),
                              trainer.args.compute_dtype)

    rng = np.random.default_rng(seed)
    host_batches = [rng.integers(0, vocab, size=batch_shape, dtype=np.int32) for _ in range(2)]
    references = {}  # SMDM's step under each allocator setting, each in its own process
    if s.get("smdm") and s["dtype"] == "float32" and s["objective"] == "mdm":
        from smdm_step import SMDMProcess

        for malloc in s["smdm_malloc"]:
            references[malloc] = SMDMProcess(
                s["smdm"], trainer.args, c.seq_len, malloc=malloc, lr=c.optim.lr,
                betas=(c.optim.b1, c.optim.b2), weight_decay=c.optim.weight_decay,
                grad_clip=c.optim.grad_clip, eps=c.objective.eps, seed=seed,
                threads=s.get("threads", 0))
            for i in range(warmup):
                references[malloc].step(host_batches[i % 2])
    smdm_times, smdm_loss = {m: [] for m in references}, {}
    step_times, step_cpu, step_sys, step_faults = [], [], [], []
    metrics = None
    helpers = [r.process.pid for r in references.values()]
    with trainer.context(), Quiet(helpers) as quiet:
        for i in range(warmup + steps):
            batch = trainer.to_global(host_batches[i % 2])
            jax.block_until_ready(batch)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            c0, t0 = time.process_time(), time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            if i >= warmup:
                step_times.append(dt)
                step_cpu.append(cpu)
                step_sys.append(r1.ru_stime - r0.ru_stime)
                step_faults.append(r1.ru_minflt - r0.ru_minflt)
                baseline.run_once()  # interleaved: same machine state as the step just timed
                for malloc, ref in references.items():  # alternately, same batches
                    seconds, smdm_loss[malloc] = ref.step(host_batches[i % 2])
                    smdm_times[malloc].append(seconds)
            log(f"  step {i + 1}/{warmup + steps}: {dt:.3f}s wall, {cpu:.2f}s cpu "
                f"({r1.ru_stime - r0.ru_stime:.2f}s sys, {r1.ru_minflt - r0.ru_minflt:,} "
                f"page faults)" + (" (warmup)" if i < warmup else ""))
    loss = float(jax.device_get(metrics["loss"]))
    for ref in references.values():
        ref.close()

    step_s = statistics.median(step_times)
    tokens_per_step = c.global_batch * c.seq_len
    flops_step = trainer.train_flops_per_step()
    flops_6n = flops.flops_per_token_6n(preset) * tokens_per_step
    achieved = flops_step / step_s
    mm_shape, mm_rate = baseline.best()
    mm_flops = 2.0 * mm_shape[0] * mm_shape[1] * mm_shape[2]
    # Each timed step against the matmul timed right after it, then the median of those ratios.
    pair = [(flops_step / st) / (mm_flops / mt)
            for st, mt in zip(step_times, baseline.samples[mm_shape], strict=True)]
    # The same with process CPU seconds (all threads): insensitive to cores lost to other jobs.
    pair_cpu = [(flops_step / sc) / (mm_flops / mc)
                for sc, mc in zip(step_cpu, baseline.cpu_samples[mm_shape], strict=True)]
    mfu = flops.mfu(achieved, device_kind, n_dev)
    return dict(
        settings=s, device_kind=device_kind, num_devices=n_dev, mesh=dict(trainer.mesh.shape),
        micro_steps=trainer.micro_steps, loss_chunk=c.objective.loss_chunk,
        compile_s=compile_s, temp_bytes=temp_bytes, xla_flops_per_step=xla_flops,
        step_times_s=step_times, step_s_median=step_s, step_s_min=min(step_times),
        tokens_per_step=tokens_per_step, tokens_per_s=tokens_per_step / step_s,
        flops_per_step=flops_step, flops_per_s=achieved,
        flops_per_step_6n=flops_6n, flops_per_s_6n=flops_6n / step_s,
        mfu=mfu, peak_flops=flops.peak_flops(device_kind),
        matmul_flops_per_s={"x".join(map(str, k)): v for k, v in baseline.rates().items()},
        matmul_best_shape="x".join(map(str, mm_shape)), matmul_best_flops_per_s=mm_rate,
        ratio=achieved / mm_rate, ratio_6n=(flops_6n / step_s) / mm_rate,
        ratio_min=(flops_step / min(step_times)) / mm_rate,
        ratio_paired=statistics.median(pair), ratio_cpu=statistics.median(pair_cpu),
        step_cpu_s=step_cpu, step_sys_s=step_sys, step_page_faults=step_faults,
        final_loss=loss, machine=quiet.line(), busy=quiet.busy,
        others_cores=quiet.others_cores, load_average=quiet.load_before[0],
        smdm={malloc: dict(
            step_times_s=times, final_loss=smdm_loss[malloc],
            tokens_per_s=tokens_per_step / statistics.median(times),
            ours_over_smdm=statistics.median(times) / step_s,
            # each JAX step against the SMDM step timed right after it
            ours_over_smdm_paired=statistics.median(
                tt / st for st, tt in zip(step_times, times, strict=True)))
            for malloc, times in smdm_times.items()},
    )


MALLOC_NAMES = {"tuned": "mdm_jax's malloc settings", "system": "glibc's defaults"}


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def report(r: dict, force: bool = False) -> None:
    s = r["settings"]
    print(f"preset {s['preset']} {s['objective']} | batch {s['batch']} x {s['seq_len']} "
          f"(micro {s['micro_batch'] or s['batch']}, {r['micro_steps']} micro-steps) | "
          f"{s['dtype']} remat={s['remat']} attention={s['attention']} "
          f"loss_chunk={r['loss_chunk']} scan={s['scan_layers']}")
    print(f"mesh {r['mesh']} on {r['num_devices']} x {r['device_kind']}; "
          f"compile {r['compile_s']:.1f}s; temp memory {_fmt_bytes(r['temp_bytes'])}")
    times = ", ".join(f"{t:.3f}" for t in r["step_times_s"])
    print(f"step time median {r['step_s_median']:.3f}s min {r['step_s_min']:.3f}s  [{times}]")
    print(f"step CPU time median {statistics.median(r['step_cpu_s']):.2f}s "
          f"(sys {statistics.median(r['step_sys_s']):.2f}s, "
          f"{statistics.median(r['step_page_faults']):,.0f} page faults per step)")
    print(f"tokens/s            {r['tokens_per_s']:,.0f}")
    print(f"FLOP/s (detailed)   {r['flops_per_s'] / 1e9:,.2f} G   "
          f"({r['flops_per_step'] / 1e9:,.1f} GFLOP/step)")
    print(f"FLOP/s (6N)         {r['flops_per_s_6n'] / 1e9:,.2f} G   "
          f"({r['flops_per_step_6n'] / 1e9:,.1f} GFLOP/step)")
    if r["xla_flops_per_step"]:
        print(f"XLA cost_analysis   {r['xla_flops_per_step'] / 1e9:,.1f} GFLOP/step "
              f"({r['xla_flops_per_step'] / r['flops_per_step']:.2f} x detailed count; XLA counts "
              f"scan/map bodies once)")
    print("MFU                 " + ("n/a (no peak known for this device)" if r["mfu"] is None
                                    else f"{100 * r['mfu']:.1f}%"))
    for shape, rate in r["matmul_flops_per_s"].items():
        print(f"matmul {shape:>20}  {rate / 1e9:,.2f} GFLOP/s")
    print(f"matmul baseline     {r['matmul_best_shape']} "
          f"{r['matmul_best_flops_per_s'] / 1e9:,.2f} GFLOP/s (best shape, median)")
    print(f"ratio step/matmul   {r['ratio']:.3f} (detailed count, medians)")
    print(f"                    {r['ratio_paired']:.3f} (median of step/next-matmul pairs)   "
          f"{r['ratio_cpu']:.3f} (pairs, CPU seconds)")
    print(f"                    {r['ratio_min']:.3f} (fastest step)   "
          f"{r['ratio_6n']:.3f} (6N count)")
    print("                    target >= 0.65 for 19M @ 512 on CPU")
    for malloc, m in r["smdm"].items():
        times = ", ".join(f"{t:.3f}" for t in m["step_times_s"])
        print(f"SMDM's step, {MALLOC_NAMES[malloc]}: median "
              f"{statistics.median(m['step_times_s']):.3f}s [{times}], "
              f"{m['tokens_per_s']:,.0f} tokens/s, loss {m['final_loss']:.3f} "
              f"(mdm_jax {r['final_loss']:.3f})")
        print(f"  mdm_jax / SMDM    "
              f"{ratio_text(m['ours_over_smdm'], r['busy'], force)} tokens/s (medians)   "
              f"{ratio_text(m['ours_over_smdm_paired'], r['busy'], force)} (median of "
              f"alternate pairs)   target >= 1.2")
    print(r["machine"])


def report_table(rows: list[dict], args_force: bool = False) -> None:
    head = (f"{'variant':<16}{'/SMDM':>7}{'step s':>8}{'cpu s':>7}{'tok/s':>7}"
            f"{'GFLOP/s':>9}{'mm GF/s':>9}"
            f"{'ratio':>7}{'paired':>7}{'cpu':>7}{'ratio6N':>8}{'temp MiB':>10}{'sys s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<16}  error: {r['error']}")
            continue
        temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:,.0f}"
        first = next(iter(r["smdm"].values()), None)
        vs_torch = ("n/a" if first is None else
                    ratio_text(first["ours_over_smdm"], r["busy"], args_force)[:6])
        print(f"{r['variant']:<16}{vs_torch:>7}{r['step_s_median']:>8.2f}"
              f"{statistics.median(r['step_cpu_s']):>7.1f}{r['tokens_per_s']:>7,.0f}"
              f"{r['flops_per_s'] / 1e9:>9.1f}{r['matmul_best_flops_per_s'] / 1e9:>9.1f}"
              f"{r['ratio']:>7.3f}{r['ratio_paired']:>7.3f}{r['ratio_cpu']:>7.3f}"
              f"{r['ratio_6n']:>8.3f}{temp:>10}{statistics.median(r['step_sys_s']):>7.1f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    _setup_devices(args.devices)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else \
        (lambda msg: print(msg, flush=True))

    from mdm_jax.config import ConfigError

    if not args.no_reference:
        from references import smdm_checkout

        smdm_checkout(args.smdm)  # fail before compiling; SMDM itself runs in its own processes
    base = _settings(args)
    if args.sweep is None:
        try:
            result = bench_one(base, args.steps, args.warmup, args.seed, log)
        except ConfigError as e:
            raise SystemExit(f"config error: {e}") from None
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            report(result, args.force)
        return

    names = [n.strip() for n in args.sweep.split(",") if n.strip()]
    unknown = [n for n in names if n not in SWEEP]
    if unknown:
        raise SystemExit(f"unknown sweep variants {unknown}; valid: {', '.join(SWEEP)}")
    rows = []
    for name in names:
        s = dict(base, **SWEEP[name])
        log(f"[{name}]")
        try:
            r = bench_one(s, args.steps, args.warmup, args.seed, log)
        except Exception as e:  # one failing variant should not lose the table
            r = {"settings": s, "error": f"{type(e).__name__}: {e}"}
        rows.append(dict(r, variant=name))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        report_table(rows, args.force)


if __name__ == "__main__":
    main()
