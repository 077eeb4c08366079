"""An IsoFLOP study as a list of runs, and the planning table that prices it.

A study config (experiments/isoflop.py) names the families, the budgets with the presets that
bracket each budget's optimum, the batch and the FLOP convention. Every number here comes from
`mdm_jax.flops`; this module only expands the grid and formats it.

    python -m mdm_jax.scaling.plan --config=experiments/isoflop.py            # SMDM's grid
    python -m mdm_jax.scaling.plan --config=experiments/isoflop.py:micro --json
    python -m mdm_jax.scaling.plan --config=experiments/isoflop.py --accelerator "tpu v5p" --mfu 0.5
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import ml_collections

from mdm_jax import flops
from mdm_jax.errors import UserError, run_absl
from mdm_jax.families import FAMILIES
from mdm_jax.presets import get_preset


class StudyError(UserError, ValueError):
    """A study config or results file that cannot work; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class Run:
    family: str
    preset: str
    non_embedding_params: int
    budget: float
    steps: int
    tokens: int
    tokens_per_param: float
    train_flops: float  # what the hardware does: detailed count (attention and head included)
    run_id: str
    workdir: str
    fit_args: tuple = ()  # trainer arguments chosen by fitting the run on a target (--target)

    def accelerator_hours(self, accelerator: str, assumed_mfu: float) -> float | None:
        peak = flops.peak_flops(accelerator)
        return None if peak is None else self.train_flops / (peak * assumed_mfu) / 3600


def parse_grid(entries) -> list[tuple[float, list[str], tuple[str, ...]]]:
    """("6e18: 48M,66M", "1e19 [arm]: 231M,336M", ...) -> [(6e18, ["48M", "66M"], ()),
    (1e19, ["231M", "336M"], ("arm",)), ...] with each preset checked. A bracketed list of
    families after the budget restricts the entry to them (sizes near each family's minimum);
    an entry without one is every family's."""
    grid = []
    for entry in entries:
        head, sep, presets_text = str(entry).partition(":")
        budget_text, _, only = head.partition("[")
        only_families = tuple(f.strip() for f in only.rstrip().rstrip("]").split(",")
                              if f.strip())
        try:
            budget = float(budget_text)
        except ValueError:
            budget = float("nan")
        if not sep or not budget > 0 or (only and not head.rstrip().endswith("]")):
            raise StudyError(f"grid entry {entry!r} must read 'BUDGET: PRESET,PRESET,...' "
                             f"(or 'BUDGET [FAMILY,...]: ...' for some families only) with a "
                             f"positive budget in FLOPs, e.g. '1e19: 113M,170M,231M'")
        unknown = [f for f in only_families if f not in FAMILIES]
        if unknown:
            raise StudyError(f"grid entry {entry!r} names {', '.join(map(repr, unknown))}; "
                             f"families: {', '.join(FAMILIES)}")
        presets = [p.strip() for p in presets_text.split(",") if p.strip()]
        if not presets:
            raise StudyError(f"grid entry {entry!r} lists no presets")
        for name in presets:
            try:
                get_preset(name)
            except ValueError as e:
                raise StudyError(f"grid entry {entry!r}: {e}") from None
        grid.append((budget, presets, only_families))
    return grid


def train_args(study: ml_collections.ConfigDict, run: Run) -> list[str]:
    """The trainer's arguments for one run: base config + this run's size, steps and workdir."""
    args = [f"--config={study.base}:{run.preset},{run.family}",
            f"--config.workdir={run.workdir}",
            f"--config.steps={run.steps}",
            f"--config.global_batch={study.batch}",
            f"--config.seq_len={study.seq_len}",
            "--config.samples.count=0"]
    for override in study.overrides:
        key, sep, value = str(override).partition("=")
        if not sep or not key.strip():
            raise StudyError(f"study.overrides entry {override!r} must read 'key=value', "
                             f"e.g. 'data.train_dir=/data/slimpajama/train'")
        args.append(f"--config.{key.strip()}={value.strip()}")
    return args + list(run.fit_args)


def fit_on_target(study: ml_collections.ConfigDict, runs: list[Run], target_name: str,
                  mfu: float, headroom: float, log=print) -> dict:
    """run_id -> mdm_jax.aot.Report: each run's step compiled for the target (compile-only
    devices), micro_batch fitted by compiling unless the run sets one. Runs that differ only
    in budget share one compile."""
    from mdm_jax import aot  # sets up the compile-only environment before jax loads
    from mdm_jax import config as config_lib
    from mdm_jax.targets import TARGETS, TargetUnavailable

    if target_name not in TARGETS:
        raise StudyError(f"--target {target_name!r} is not known; valid: {', '.join(TARGETS)}")
    reports, by_shape = {}, {}
    for run in runs:
        key = (run.family, run.preset)
        if key not in by_shape:
            c = aot.load_run_config(train_args(study, run))
            if not c.micro_batch:
                c = config_lib.with_fit(c, config_lib.AUTO, c.model.remat)
            log(f"[plan] compiling {run.family} {run.preset} for {target_name}")
            try:
                by_shape[key] = aot.analyse(c, TARGETS[target_name], headroom, mfu, log)
            except TargetUnavailable as e:
                raise StudyError(str(e)) from None
        reports[run.run_id] = by_shape[key]
    return reports


def run_id(family: str, preset: str, budget: float) -> str:
    """Stable across invocations and config edits elsewhere: e.g. 'mdm-170M-1e+19'."""
    return f"{family}-{preset}-{budget:.3g}"


def expand(study: ml_collections.ConfigDict) -> list[Run]:
    """Every (family, budget, preset) run of the study, with its step count from flops.py."""
    families = [f.strip() for f in str(study.families).split(",") if f.strip()]
    for family in families:
        if family not in FAMILIES:
            raise StudyError(f"study.families has {family!r}; valid: {', '.join(FAMILIES)}")
    runs = []
    for family in families:
        for budget, presets, only in parse_grid(study.grid):
            if only and family not in only:
                continue
            for name in presets:
                preset = get_preset(name)
                try:
                    p = flops.plan(name, budget, study.batch, study.seq_len, study.convention,
                                   family=family)
                except ValueError as e:
                    raise StudyError(f"{family} {name} at budget {budget:.3g}: {e}") from None
                per_token = flops.train_flops_per_token(preset, study.seq_len, family=family)
                rid = run_id(family, name, budget)
                runs.append(Run(
                    family=family, preset=name, non_embedding_params=p.non_embedding_params,
                    budget=budget, steps=p.steps, tokens=p.tokens,
                    tokens_per_param=p.tokens_per_param, train_flops=per_token * p.tokens,
                    run_id=rid, workdir=os.path.join(study.sweep_dir, rid)))
    return runs


def target_hours(run: Run, report) -> float:
    """Chip-hours of a run on the target: its steps at the roofline step time."""
    return run.steps * report.step_seconds * report.devices / 3600


def table(runs: list[Run], accelerator: str, assumed_mfu: float, fits: dict | None = None,
          target: str = "") -> str:
    head = ("family", "preset", "non_emb_params", "budget", "steps", "tokens", "tokens/param",
            f"{accelerator}-hours@{assumed_mfu:.0%}")
    if fits:
        head = head[:-1] + ("fits", "peak_GiB", "micro_batch", "remat", "step_s",
                            f"{target}-chip-hours@{assumed_mfu:.0%}")
    rows = [head]
    for r in runs:
        hours = r.accelerator_hours(accelerator, assumed_mfu)
        row = (r.family, r.preset, f"{r.non_embedding_params:,}", f"{r.budget:.3g}",
               f"{r.steps:,}", f"{r.tokens:,}", f"{r.tokens_per_param:.1f}",
               "n/a" if hours is None else f"{hours:,.3g}")
        if fits:
            f = fits[r.run_id]
            row = row[:-1] + ("yes" if f.fits else "NO", f"{f.peak_gib:.2f}", str(f.micro_batch),
                              f.remat, f"{f.step_seconds:.3g}", f"{target_hours(r, f):,.3g}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    total = [r.accelerator_hours(accelerator, assumed_mfu) for r in runs]
    if fits:
        bad = [r.run_id for r in runs if not fits[r.run_id].fits]
        lines.append(f"{len(runs)} runs, {sum(target_hours(r, fits[r.run_id]) for r in runs):,.4g}"
                     f" {target} chip-hours in all (roofline at an assumed MFU of "
                     f"{assumed_mfu:.0%}); " + (f"{len(bad)} do not fit: {', '.join(bad)}" if bad
                                                else "every run fits"))
    elif runs and total[0] is not None:
        lines.append(f"{len(runs)} runs, {sum(total):,.4g} {accelerator}-hours in all at an "
                     f"assumed MFU of {assumed_mfu:.0%} (detailed FLOPs: attention and head "
                     f"included)")
    return "\n".join(lines)


def as_json(runs: list[Run], accelerator: str, assumed_mfu: float,
            fits: dict | None = None, target: str = "") -> str:
    rows = []
    for r in runs:
        row = dataclasses.asdict(r)
        row["accelerator"] = accelerator
        row["assumed_mfu"] = assumed_mfu
        row["accelerator_hours"] = r.accelerator_hours(accelerator, assumed_mfu)
        if fits:
            f = fits[r.run_id]
            row.update(target=target, fits=f.fits, peak_gib=f.peak_gib,
                       micro_batch=f.micro_batch, remat=f.remat, step_seconds=f.step_seconds,
                       target_chip_hours=target_hours(r, f))
        rows.append(row)
    return json.dumps(rows, indent=2)


def check_study(study: ml_collections.ConfigDict) -> None:
    """The study's numbers a CLI divides by, checked before `expand` prices the grid."""
    for name in ("batch", "seq_len"):
        value = study.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StudyError(f"study.{name}={value!r}: give a positive number of "
                             f"{'sequences per step' if name == 'batch' else 'tokens'}, e.g. "
                             f"--config.{name}={256 if name == 'batch' else 2048}")


def check_mfu(mfu, source: str) -> float:
    """The assumed MFU the plan prices hours with, from --mfu or study.assumed_mfu."""
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise StudyError(f"{source}={mfu!r}: the assumed model FLOPs utilisation is a fraction "
                         f"in (0, 1], e.g. 0.4")
    return float(mfu)


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "study config, e.g. "
                                             "experiments/isoflop.py[:micro]")
    flags.DEFINE_bool("json", False, "print JSON instead of a table")
    flags.DEFINE_string("accelerator", None, "price the runs on this accelerator (a chip of "
                        f"mdm_jax.flops.CHIPS: {', '.join(flops.CHIPS)})")
    flags.DEFINE_float("mfu", None, "assumed model FLOPs utilisation, e.g. 0.4")
    flags.DEFINE_string("target", None, "also compile every run for this target (mdm_jax.aot; "
                        "needs .venv-accelerators): fits, peak, micro-batch, roofline hours")
    flags.DEFINE_float("headroom", 0.1, "with --target: fraction of the chip's memory kept free")
    flags.mark_flags_as_required(["config"])
    return config


def _main(study) -> None:
    from absl import flags

    check_study(study)
    accelerator = flags.FLAGS.accelerator or study.accelerator
    if flops.chip(accelerator) is None:
        source = "--accelerator" if flags.FLAGS.accelerator else "study.accelerator"
        raise StudyError(f"{source}={accelerator!r} is not a known accelerator; valid: "
                         f"{', '.join(flops.CHIPS)}")
    if flags.FLAGS.mfu is None:
        mfu = check_mfu(study.assumed_mfu, "study.assumed_mfu")
    else:
        mfu = check_mfu(flags.FLAGS.mfu, "--mfu")
    runs = expand(study)
    target = flags.FLAGS.target
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if flags.FLAGS.json else print
    fits = fit_on_target(study, runs, target, mfu, flags.FLAGS.headroom, log) if target else None
    print(as_json(runs, accelerator, mfu, fits, target or "") if flags.FLAGS.json
          else table(runs, accelerator, mfu, fits, target or ""))


def cli() -> None:
    run_absl(_flags, _main)


if __name__ == "__main__":
    cli()
