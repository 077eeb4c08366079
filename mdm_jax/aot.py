"""Compile a run's exact train step for a TPU slice or GPU node from this CPU machine.

    bash launch/setup.sh accelerators        # libtpu + the CUDA PJRT plugin, in .venv-accelerators
    .venv-accelerators/bin/python -m mdm_jax.aot --config=experiments/smdm.py:1028M --target v5p-8
    .venv-accelerators/bin/python -m mdm_jax.aot --config=experiments/smdm.py:170M,arm \\
        --target h100x8 --config.micro_batch=auto --config.model.remat=auto --json

The step is the Trainer's own (model, objective, mesh rules, optimizer, micro-batching, remat),
lowered with abstract sharded inputs onto the target's compile-only devices and compiled by the
target's compiler. Reported per device: arguments, outputs, aliased (donated state), temporaries
and their peak against the chip's memory; compile time; the step's FLOPs from mdm_jax.flops
beside XLA's cost_analysis (which counts a while loop's body once: the scan over layers and the
micro-batch loop make it undercount); and a roofline step time. Multi-host slices compile as one
program over all their chips, as they run. `--config.micro_batch=auto` / `model.remat=auto`
search by compiling (mdm_jax/autofit.py) and print the values chosen.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from mdm_jax import targets

targets.quiet_compile_only_environment()  # before jax is imported
with targets.native_logs_captured():  # the accelerator plugins log as jax loads them
    import ml_collections

    from mdm_jax import autofit
    from mdm_jax import config as config_lib
    from mdm_jax.errors import UserError, run_absl

DEFAULT_MFU = 0.4  # see BUILD_NOTES "Before you launch": what the roofline time assumes


@dataclasses.dataclass
class Report:
    target: str
    devices: int
    hosts: int
    hbm_gib: float
    micro_batch: int
    remat: str
    attention: str
    mesh: dict
    arguments_gib: float
    outputs_gib: float
    aliased_gib: float
    temporaries_gib: float
    peak_gib: float
    usable_gib: float
    fits: bool
    compile_seconds: float
    flops_per_step: float  # flops.py: the model's matmuls, forward + backward
    cost_analysis_flops_per_step: float | None  # XLA's count over all devices
    step_seconds: float  # roofline: FLOPs at the assumed MFU, or HBM traffic if slower
    assumed_mfu: float
    bound: str  # "compute" or "memory"
    trials: list = dataclasses.field(default_factory=list)
    xla_attention: dict | None = None  # --compare-attention: the same step with attention=xla
    refused: bool = False  # the compiler refused the step (out of memory): peak is a lower bound
    kernels: list = dataclasses.field(default_factory=list)  # fused kernels in the compiled step
    micro_steps: int = 1  # forward/backward passes per optimizer step (gradient accumulation)


def _gib(n: int | float) -> float:
    return round(n / 2**30, 3)


def _cost_flops(compiled, devices: int) -> float | None:
    if compiled is None:  # the compiler refused it (out of memory)
        return None
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"]) * devices  # per-device SPMD program, times the devices


def roofline(step_flops: float, target: targets.Target, memory: autofit.Memory,
             micro_steps: int, mfu: float) -> tuple[float, str]:
    """Seconds per step: the larger of the FLOPs at `mfu` of the chips' peak and a lower
    bound on HBM traffic (the state read and written once, the parameters read once per
    micro-batch and the temporaries written and read once each) at full bandwidth."""
    compute = step_flops / (target.chips * target.chip.peak_flops * mfu)
    traffic = (memory.arguments + memory.outputs + micro_steps * memory.arguments / 3
               + 2 * memory.temporaries)
    memory_time = traffic / target.chip.hbm_bandwidth
    return (compute, "compute") if compute >= memory_time else (memory_time, "memory")


KERNEL_MARKERS = {"splash": "tpu_custom_call", "cudnn": "cudnn$fmha"}


def kernels_in(compiled) -> list[str]:
    """Which attention kernels the compiled step calls (a check that the kernel was used)."""
    text = compiled.as_text() if compiled is not None else ""
    return [name for name, marker in KERNEL_MARKERS.items() if marker in text]


def check_attention(c: ml_collections.ConfigDict, target: targets.Target) -> None:
    kernel_platform = {"splash": "tpu", "cudnn": "cuda"}.get(c.model.attention)
    if kernel_platform and kernel_platform != target.platform:
        raise UserError(f"config.model.attention={c.model.attention} is a "
                        f"{'TPU' if kernel_platform == 'tpu' else 'GPU'} kernel; --target "
                        f"{target.name} needs attention=xla or "
                        f"{'cudnn' if target.platform == 'cuda' else 'splash'}")


def analyse(c: ml_collections.ConfigDict, target: targets.Target, headroom: float,
            mfu: float, log=print, compare_attention: bool = False) -> Report:
    """Compile c (fitting auto values first) for the target and report its memory and time;
    with compare_attention, also the same step with the XLA attention."""
    from mdm_jax.trainer import Trainer

    check_attention(c, target)
    with targets.native_logs_captured():
        devices = targets.compile_only_devices(target)
    trials, chosen = [], None
    if config_lib.wants_fit(c):
        config_lib.validate(c, len(devices))
        try:
            chosen, trials = autofit.search(c, devices, target.hbm_bytes, Trainer, headroom, log)
        except autofit.FitError as e:
            log(f"[aot] {e}")
            trials = e.trials
            chosen = min(trials, key=lambda t: t.memory.peak)  # reported as not fitting
        c = autofit.with_choice(c, chosen.micro_batch, chosen.remat)
    if chosen is not None:
        compiled, memory, seconds = chosen.compiled, chosen.memory, chosen.compile_seconds
    else:
        with targets.native_logs_captured():
            compiled, memory, seconds = autofit.compile_memory(c, devices, Trainer)
    trainer = Trainer(c, devices=devices)
    usable = target.hbm_bytes * (1 - headroom)
    step_flops = trainer.train_flops_per_step()  # mdm_jax.flops, as training logs it
    step_seconds, bound = roofline(step_flops, target, memory, trainer.micro_steps, mfu)
    baseline = None
    if compare_attention and c.model.attention != "xla":
        plain = config_lib.with_fit(c, c.micro_batch, c.model.remat)
        plain.model.attention = "xla"
        with targets.native_logs_captured():
            other = autofit.compile_memory(plain, devices, Trainer)[1]
        baseline = {"temporaries_gib": _gib(other.temporaries), "peak_gib": _gib(other.peak),
                    "peak_saved_gib": _gib(other.peak - memory.peak)}
    return Report(
        target=target.name, devices=len(devices), hosts=target.hosts,
        hbm_gib=_gib(target.hbm_bytes), micro_batch=trainer.micro_batch,
        remat=c.model.remat, attention=c.model.attention, mesh=dict(trainer.mesh.shape),
        arguments_gib=_gib(memory.arguments), outputs_gib=_gib(memory.outputs),
        aliased_gib=_gib(memory.aliased), temporaries_gib=_gib(memory.temporaries),
        peak_gib=_gib(memory.peak), usable_gib=_gib(usable), fits=memory.peak <= usable,
        compile_seconds=round(seconds, 2), flops_per_step=step_flops,
        cost_analysis_flops_per_step=_cost_flops(compiled, len(devices)),
        step_seconds=step_seconds, assumed_mfu=mfu, bound=bound,
        trials=[{"micro_batch": t.micro_batch, "remat": t.remat,
                 "peak_gib": _gib(t.memory.peak), "fits": t.fits} for t in trials],
        xla_attention=baseline, refused=compiled is None, kernels=kernels_in(compiled),
        micro_steps=trainer.micro_steps)


def load_run_config(args: list[str]) -> ml_collections.ConfigDict:
    """The config a trainer would build from these arguments (`--config=FILE:ARG`,
    `--config.FIELD=VALUE`, ...), without running it."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["mdm_jax.aot", *args]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "run config", flag_values=values,
                                             lock_config=False, sys_argv=argv)
    try:
        values(argv)
        return holder.value
    except Exception as e:  # noqa: BLE001 - absl and the config file raise anything
        raise UserError(f"run arguments {' '.join(args)}: {str(e).splitlines()[0]}") from None


def format_report(r: Report) -> str:
    lines = [
        f"target {r.target}: {r.devices} devices on {r.hosts} host(s), {r.hbm_gib:g} GiB each; "
        f"mesh {r.mesh}",
        f"micro_batch {r.micro_batch} ({r.micro_batch // (r.mesh['data'] * r.mesh['fsdp'])} "
        f"per device, {r.micro_steps} accumulation step{'s' * (r.micro_steps > 1)}), "
        f"remat {r.remat}, attention {r.attention}"
        + (f" (kernel in the step: {', '.join(r.kernels)})" if r.kernels else ""),
        "per device:",
        f"  arguments    {r.arguments_gib:10.3f} GiB",
        f"  outputs      {r.outputs_gib:10.3f} GiB",
        f"  aliased      {r.aliased_gib:10.3f} GiB  (donated state: written in place)",
        f"  temporaries  {r.temporaries_gib:10.3f} GiB",
        f"  peak         {r.peak_gib:10.3f} GiB of {r.usable_gib:g} usable: "
        f"{'FITS' if r.fits else 'DOES NOT FIT'}"
        + (" (the compiler refused it: its temporaries alone exceed the chip; the peak shown "
           "is a lower bound)" if r.refused else ""),
        f"compiled in {r.compile_seconds:.1f}s",
        f"FLOPs per step: {r.flops_per_step:.4g} (mdm_jax.flops)",
    ]
    if r.cost_analysis_flops_per_step:
        ratio = r.cost_analysis_flops_per_step / r.flops_per_step
        lines.append(f"  XLA cost_analysis: {r.cost_analysis_flops_per_step:.4g} ({ratio:.3f}x): "
                     f"it counts a while loop's body once (scan over layers, micro-batch loop), "
                     f"so it is not used for planning")
    lines.append(f"roofline step time: {r.step_seconds:.4g} s ({r.bound}-bound at an assumed "
                 f"MFU of {r.assumed_mfu:.0%})")
    if r.xla_attention:
        x = r.xla_attention
        lines.append(f"attention {r.attention} vs xla: peak {r.peak_gib:.3f} vs "
                     f"{x['peak_gib']:.3f} GiB, temporaries {r.temporaries_gib:.3f} vs "
                     f"{x['temporaries_gib']:.3f} GiB ({x['peak_saved_gib']:+.3f} GiB saved)")
    return "\n".join(lines)


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "run config, e.g. "
                                             "experiments/smdm.py:170M")
    flags.DEFINE_string("target", None, f"one of {', '.join(targets.TARGETS)}")
    flags.DEFINE_bool("json", False, "print the report as JSON")
    flags.DEFINE_float("headroom", autofit.DEFAULT_HEADROOM,
                       "fraction of the chip's memory kept free")
    flags.DEFINE_float("mfu", DEFAULT_MFU, "model FLOPs utilisation the step time assumes")
    flags.DEFINE_bool("compare-attention", False, "also compile with model.attention=xla and "
                      "report the memory the kernel saves")
    flags.mark_flags_as_required(["config", "target"])
    return config


def _main(config) -> None:
    from absl import flags

    f = flags.FLAGS
    if f.target not in targets.TARGETS:
        raise UserError(f"--target {f.target!r} is not known; valid: {', '.join(targets.TARGETS)}")
    if not 0 <= f.headroom < 1:
        raise UserError(f"--headroom {f.headroom}: give a fraction in [0, 1), e.g. 0.1")
    if not 0 < f.mfu <= 1:
        raise UserError(f"--mfu {f.mfu}: give a fraction in (0, 1], e.g. 0.4")
    t0 = time.perf_counter()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if f.json else print
    try:
        report = analyse(config, targets.TARGETS[f.target], f.headroom, f.mfu, log,
                         f["compare-attention"].value)
    except targets.TargetUnavailable as e:
        raise UserError(str(e)) from None
    if f.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(format_report(report))
        print(f"({time.perf_counter() - t0:.1f}s in all)")
    if not report.fits:
        raise SystemExit(3)  # a report, not an input error: scripts can tell it apart


def cli() -> None:
    run_absl(_flags, _main)


if __name__ == "__main__":
    cli()
