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


# Log-axis tick labels, most wanted first: decades, then 5s, 2s, 3s, the other digits, halves.
_MANTISSA_LEVELS = ((1,), (5,), (2,), (3,), (4, 6, 7, 8, 9), (1.5, 2.5, 3.5, 4.5))


def tick_text(value: float, scientific: bool | None = None) -> str:
    """A short tick label: 4, 3.5, 0.25 as numbers; 2x10^11 and 10^12 in mathtext (also
    5x10^3 where `scientific`, so that one axis keeps one style)."""
    if scientific is None:
        scientific = not 1e-2 <= abs(value) < 1e4
    if not scientific:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)) + 1e-9)
    mantissa = f"{value / 10 ** exponent:.3g}"
    return (f"$10^{{{exponent}}}$" if mantissa == "1"
            else f"${mantissa}\\times10^{{{exponent}}}$")


def _log_candidates(lo: float, hi: float, base: float = 10) -> list[tuple[int, float]]:
    """(level, value) of every labelled-tick candidate inside [lo, hi]: on a base-10 axis by
    `_MANTISSA_LEVELS`, on another base its powers."""
    if base != 10:
        powers = range(math.floor(math.log(lo, base)) - 1, math.ceil(math.log(hi, base)) + 2)
        return [(0, float(f"{base ** k:.6g}")) for k in powers if lo <= base ** k <= hi]
    out = []
    for exponent in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for level, mantissas in enumerate(_MANTISSA_LEVELS):
            for m in mantissas:
                v = float(f"{m * 10.0 ** exponent:.6g}")
                if lo <= v <= hi:
                    out.append((level, v))
    return sorted(out)


def _kept_labels(axis, values: list[tuple[int, float]], renderer, pad: float) -> set:
    """Values whose labels do not overlap a label kept before them (in level order)."""
    extents = {}
    for tick, loc in zip(axis.get_major_ticks(), axis.get_majorticklocs(), strict=False):
        label = tick.label1
        if label.get_visible() and label.get_text():
            extents[float(f"{loc:.6g}")] = label.get_window_extent(renderer).padded(pad)
    kept, boxes = set(), []
    for _, v in values:  # sorted by level, then value
        box = extents.get(v)
        if box is not None and not any(box.overlaps(b) for b in boxes):
            kept.add(v)
            boxes.append(box)
    return kept


def readable_log_ticks(fig, pad: float = 2.0) -> None:
    """Label each log axis of fig with round values whose labels never overprint.

    Matplotlib labels minor ticks on a log axis spanning less than about a decade, and
    those labels (2x10^11, 3x10^11, 4x10^11 ...) run into each other. Here the candidates are
    decades, then 5s, 2s, 3s, the other digits and halves (on a base-2 axis, its powers of 2;
    on an axis too short for any of these, round linear values), added level by level until an
    axis has 2 labels (3 on an axis spanning under 1.5 decades); each label is kept only if its
    box (padded by `pad` pixels) meets no label kept before it, measured on fig's own renderer
    after layout. Unlabelled minor ticks stay for the grid. Call after tight_layout; save at
    fig.dpi."""
    from matplotlib import ticker

    axes = [axis for ax in fig.axes if ax.get_visible() for axis in (ax.xaxis, ax.yaxis)
            if axis.get_scale() == "log"]
    candidates, level, want, scientific = [], [0] * len(axes), [], []
    for axis in axes:
        lo, hi = sorted(axis.get_view_interval())
        base = getattr(axis.get_transform(), "base", 10)
        found = _log_candidates(lo, hi, base) or [
            (0, float(f"{v:.6g}")) for v in ticker.MaxNLocator(nbins=3).tick_values(lo, hi)
            if lo <= v <= hi]
        candidates.append(found)
        want.append(2 if math.log10(hi / lo) >= 1.5 else 3)
        scientific.append(not 1e-2 <= lo <= hi < 1e4)
        if base == 10:
            axis.set_minor_locator(ticker.LogLocator(subs=tuple(range(2, 10)), numticks=100))
        axis.set_minor_formatter(ticker.NullFormatter())

    def show(i: int, values: list, labelled: set) -> None:
        axes[i].set_major_locator(ticker.FixedLocator([v for _, v in values]))
        axes[i].set_major_formatter(ticker.FuncFormatter(
            lambda v, _pos: (tick_text(v, scientific[i]) if float(f"{v:.6g}") in labelled
                             else "")))

    def upto(i: int) -> list:
        return [c for c in candidates[i] if c[0] <= level[i]]

    pending = [i for i in range(len(axes)) if candidates[i]]
    for i in pending:
        show(i, upto(i), {v for _, v in upto(i)})
    while pending:  # add a level where an axis has too few labels; at most one draw per level
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        still = []
        for i in pending:
            kept = _kept_labels(axes[i], upto(i), renderer, pad)
            if len(kept) >= want[i] or level[i] >= max(lv for lv, _ in candidates[i]):
                show(i, [c for c in upto(i) if c[1] in kept], kept)
            else:
                level[i] += 1
                show(i, upto(i), {v for _, v in upto(i)})
                still.append(i)
        pending = still
    # Fewer labels may let the layout grow the axes; check once more on the final layout.
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for i, axis in enumerate(axes):
        shown = {float(f"{v:.6g}") for v in axis.get_majorticklocs()}
        values = [c for c in candidates[i] if c[1] in shown]
        kept = _kept_labels(axis, values, renderer, pad)
        show(i, [c for c in values if c[1] in kept], kept)


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
