"""Pictures of training runs: train loss, validation bound and learning rate, against steps and
against training FLOPs, for one run or many side by side (no TensorBoard needed).

    python -m mdm_jax.plot runs/tiny_mdm --out curves.png
    python -m mdm_jax.plot runs/tiny_mdm runs/tiny_arm --out curves.png --labels MDM,ARM

Everything comes from each run's `metrics.jsonl` and `config.json` (local or gs://). FLOPs are
the step count times the run's training FLOPs per step (`mdm_jax.flops`, 3 x the forward
pass, as the scaling studies count them). A run still training plots what it has logged.
`python -m mdm_jax.scaling.sweep --status --plot FILE` draws every run of a sweep this way,
coloured by family and shaded by size; a run with samples writes WORKDIR/curves.png at its end.
"""

from __future__ import annotations

import dataclasses
import json
import math

from mdm_jax import families, flops, storage
from mdm_jax.errors import ArgumentParser, UserError, run_main
from mdm_jax.presets import get_preset


class PlotError(UserError, ValueError):
    """A run folder without the files a curve needs."""


@dataclasses.dataclass
class Curves:
    label: str
    family: str
    non_embedding_params: int
    flops_per_step: float
    train: list[tuple[int, float, float]]  # (step, loss, lr)
    evals: list[tuple[int, float, float | None]]  # (step, bound, its standard error)


def flops_per_step(c: dict) -> float:
    """Training FLOPs of one optimizer step of the run whose resolved config is `c`."""
    kind = c["objective"]["kind"]
    eso = c.get("eso", {})
    share = flops.sequential_share(kind, eso.get("alpha0", 1.0), eso.get("batch_split", -1.0))
    per_token = flops.train_flops_per_token(get_preset(c["model"]["preset"]), c["seq_len"],
                                            c["model"].get("vocab_size") or None, kind, share)
    return per_token * c["global_batch"] * c["seq_len"]


def read_run(workdir: str, label: str | None = None) -> Curves:
    root = storage.as_path(workdir)
    try:
        config = json.loads((root / "config.json").read_text())
        lines = (root / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError) as e:
        raise PlotError(f"{workdir}: {e}; give a training run's workdir (it holds config.json "
                        f"and metrics.jsonl)") from None
    train, evals = [], []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a last line cut short by a kill
        step = row.get("step")
        if not isinstance(step, int):
            continue
        if _finite(row.get("loss")):
            train.append((step, row["loss"], row.get("lr", math.nan)))
        if _finite(row.get("eval_loss")):
            evals.append((step, row["eval_loss"], row.get("eval_loss_se")))
    preset = config["model"]["preset"]
    return Curves(label=label or f"{config['objective']['kind']} {preset}",
                  family=config["objective"]["kind"],
                  non_embedding_params=get_preset(preset).non_embedding_params,
                  flops_per_step=flops_per_step(config), train=train, evals=evals)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _styles(runs: list[Curves], by_family: bool) -> list[dict]:
    """One colour per run, or (by_family) one hue per family, darker for larger models."""
    import matplotlib.pyplot as plt

    if not by_family:
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        return [{"color": cycle[i % len(cycle)]} for i in range(len(runs))]
    maps = dict(zip(families.FAMILIES, ("Blues", "Purples", "Greens", "Oranges", "Reds"),
                    strict=True))
    styles = []
    for r in runs:
        sizes = sorted({o.non_embedding_params for o in runs if o.family == r.family})
        shade = 0.45 + 0.5 * (sizes.index(r.non_embedding_params) / max(len(sizes) - 1, 1))
        marker, line = families.get(r.family).plot_style
        styles.append({"color": plt.get_cmap(maps[r.family])(shade), "linestyle": line})
    return styles


def plot_runs(runs: list[Curves], out: str, by_family: bool = False, title: str = "") -> None:
    """Six panels: train loss, validation bound, learning rate; against steps (top) and
    training FLOPs (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mdm_jax.scaling.fit import readable_log_ticks

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=110)
    styles = _styles(runs, by_family)
    for r, style in zip(runs, styles, strict=True):
        for row, scale in ((0, 1.0), (1, r.flops_per_step)):
            first = 0 if row == 0 else 1  # step 0 (the untrained model) has no place on a log axis
            train = [t for t in r.train if t[0] >= first]
            evals = [e for e in r.evals if e[0] >= first]
            if train:
                x = [s * scale for s, _, _ in train]
                axes[row, 0].plot(x, [v for _, v, _ in train], lw=1, **style,
                                  label=r.label if row == 0 else None)
                axes[row, 2].plot(x, [lr for _, _, lr in train], lw=1, **style)
            if evals:
                x = [s * scale for s, _, _ in evals]
                err = [e if _finite(e) else 0.0 for _, _, e in evals]
                axes[row, 1].errorbar(x, [v for _, v, _ in evals], yerr=err, marker="o", ms=3,
                                      lw=1, capsize=2, **style)
    names = ("train loss (nats/token)", "validation bound (nats/token)", "learning rate")
    for row, xlabel in ((0, "step"), (1, "training FLOPs")):
        for col, name in enumerate(names):
            ax = axes[row, col]
            ax.set(xlabel=xlabel, ylabel=name)
            if row == 1:
                ax.set_xscale("log")
            if col < 2:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    if len(runs) <= 12:
        axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    readable_log_ticks(fig)
    with storage.as_path(out).open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _main(argv=None) -> None:
    p = ArgumentParser(prog="python -m mdm_jax.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="training runs' workdirs")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    p.add_argument("--labels", default="", help="comma-separated legend labels, one per run")
    p.add_argument("--by-family", action="store_true",
                   help="colour by family, shaded by size (as a sweep's figure)")
    a = p.parse_args(argv)
    labels = [s.strip() for s in a.labels.split(",")] if a.labels else [None] * len(a.runs)
    if len(labels) != len(a.runs):
        p.error(f"--labels gives {len(labels)} labels for {len(a.runs)} runs")
    runs = [read_run(w, label) for w, label in zip(a.runs, labels, strict=True)]
    plot_runs(runs, a.out, a.by_family)
    print(f"wrote {a.out} ({len(runs)} run(s))")


def cli(argv=None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    cli()
