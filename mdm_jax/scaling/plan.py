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

import ml_collections

from mdm_jax import flops
from mdm_jax.errors import UserError, config_flags_parser, run_main
from mdm_jax.families import FAMILIES, is_causal, is_time_conditioned
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

    def accelerator_hours(self, accelerator: str, assumed_mfu: float) -> float | None:
        peak = flops.peak_flops(accelerator)
        return None if peak is None else self.train_flops / (peak * assumed_mfu) / 3600


def parse_grid(entries) -> list[tuple[float, list[str]]]:
    """("6e18: 48M,66M", ...) -> [(6e18, ["48M", "66M"]), ...] with each preset checked."""
    grid = []
    for entry in entries:
        budget_text, sep, presets_text = str(entry).partition(":")
        try:
            budget = float(budget_text)
        except ValueError:
            budget = float("nan")
        if not sep or not budget > 0:
            raise StudyError(f"grid entry {entry!r} must read 'BUDGET: PRESET,PRESET,...' with "
                             f"a positive budget in FLOPs, e.g. '1e19: 113M,170M,231M'")
        presets = [p.strip() for p in presets_text.split(",") if p.strip()]
        if not presets:
            raise StudyError(f"grid entry {entry!r} lists no presets")
        for name in presets:
            try:
                get_preset(name)
            except ValueError as e:
                raise StudyError(f"grid entry {entry!r}: {e}") from None
        grid.append((budget, presets))
    return grid


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
        causal, conditioned = is_causal(family), is_time_conditioned(family)
        for budget, presets in parse_grid(study.grid):
            for name in presets:
                preset = get_preset(name)
                try:
                    p = flops.plan(name, budget, study.batch, study.seq_len, study.convention,
                                   causal=causal, time_conditioned=conditioned)
                except ValueError as e:
                    raise StudyError(f"{family} {name} at budget {budget:.3g}: {e}") from None
                per_token = flops.train_flops_per_token(preset, study.seq_len, causal=causal,
                                                        time_conditioned=conditioned)
                rid = run_id(family, name, budget)
                runs.append(Run(
                    family=family, preset=name, non_embedding_params=p.non_embedding_params,
                    budget=budget, steps=p.steps, tokens=p.tokens,
                    tokens_per_param=p.tokens_per_param, train_flops=per_token * p.tokens,
                    run_id=rid, workdir=os.path.join(study.sweep_dir, rid)))
    return runs


def table(runs: list[Run], accelerator: str, assumed_mfu: float) -> str:
    head = ("family", "preset", "non_emb_params", "budget", "steps", "tokens", "tokens/param",
            f"{accelerator}-hours@{assumed_mfu:.0%}")
    rows = [head]
    for r in runs:
        hours = r.accelerator_hours(accelerator, assumed_mfu)
        rows.append((r.family, r.preset, f"{r.non_embedding_params:,}", f"{r.budget:.3g}",
                     f"{r.steps:,}", f"{r.tokens:,}", f"{r.tokens_per_param:.1f}",
                     "n/a" if hours is None else f"{hours:,.3g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    total = [r.accelerator_hours(accelerator, assumed_mfu) for r in runs]
    if runs and total[0] is not None:
        lines.append(f"{len(runs)} runs, {sum(total):,.4g} {accelerator}-hours in all at an "
                     f"assumed MFU of {assumed_mfu:.0%} (detailed FLOPs: attention and head "
                     f"included)")
    return "\n".join(lines)


def as_json(runs: list[Run], accelerator: str, assumed_mfu: float) -> str:
    rows = []
    for r in runs:
        row = dataclasses.asdict(r)
        row["accelerator"] = accelerator
        row["assumed_mfu"] = assumed_mfu
        row["accelerator_hours"] = r.accelerator_hours(accelerator, assumed_mfu)
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
    flags.DEFINE_string("accelerator", None, "price the runs on this accelerator (a key of "
                        f"mdm_jax.flops.PEAK_FLOPS: {', '.join(flops.PEAK_FLOPS)})")
    flags.DEFINE_float("mfu", None, "assumed model FLOPs utilisation, e.g. 0.4")
    flags.mark_flags_as_required(["config"])
    return config


def _main(argv) -> None:
    from absl import flags

    del argv
    study = _CONFIG.value
    check_study(study)
    accelerator = flags.FLAGS.accelerator or study.accelerator
    if flops.peak_flops(accelerator) is None:
        source = "--accelerator" if flags.FLAGS.accelerator else "study.accelerator"
        raise StudyError(f"{source}={accelerator!r} is not a known accelerator; valid: "
                         f"{', '.join(flops.PEAK_FLOPS)}")
    if flags.FLAGS.mfu is None:
        mfu = check_mfu(study.assumed_mfu, "study.assumed_mfu")
    else:
        mfu = check_mfu(flags.FLAGS.mfu, "--mfu")
    runs = expand(study)
    print(as_json(runs, accelerator, mfu) if flags.FLAGS.json else table(runs, accelerator, mfu))


_CONFIG = None  # defined by cli(): plan and sweep both own a --config flag


def cli() -> None:
    global _CONFIG
    from absl import app

    _CONFIG = _flags()
    app.run(lambda argv: run_main(_main, argv), flags_parser=config_flags_parser)


if __name__ == "__main__":
    cli()
