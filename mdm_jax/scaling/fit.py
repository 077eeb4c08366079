"""Scaling-law fits of an IsoFLOP study's results.csv, and SMDM Figure 1-style plots.

For each family and budget, a parabola in log10 N fitted to the best run and up to two sizes on
each side gives the IsoFLOP minimum (N*, L*). Across budgets, least squares on log-log axes
gives L*(C) = a C^-alpha and N*(C) = b C^beta, with standard errors from the residuals. Each
diffusion family's compute multiplier is the factor k with L_family(k C) = L_arm(C), from a
fit that shares alpha between the two families (SMDM's "constant compute gap"), and also per
budget from the separate fits; mdm-ce is also compared with mdm (the CE variant's FLOPs gain).
Losses compare within a family: the ARM's is an exact NLL, the diffusions' are ELBOs.

    python -m mdm_jax.scaling.fit --results results.csv --plot isoflop.png [--json]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import textwrap

import numpy as np

from mdm_jax import families
from mdm_jax.errors import ArgumentParser, run_main
from mdm_jax.families import FAMILIES
from mdm_jax.scaling.plan import StudyError
from mdm_jax.scaling.sweep import RESULT_COLUMNS

NUMERIC = ("non_embedding_params", "budget", "steps", "tokens", "loss")


def read_results(path: str) -> list[dict]:
    """Rows of a results CSV with numbers parsed; bad files get errors naming the problem."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise StudyError(f"cannot read results file {path}: {e.strerror or e}") from None
    try:
        with f:
            reader = csv.DictReader(f)
            missing = [c for c in RESULT_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise StudyError(
                    f"{path} lacks column(s) {', '.join(missing)}; a results file needs "
                    f"{','.join(RESULT_COLUMNS)} (as `python -m mdm_jax.scaling.sweep` writes)")
            rows, skipped = [], 0
            for line, row in enumerate(reader, start=2):
                try:
                    parsed = {k: float(row[k]) for k in NUMERIC}
                except (TypeError, ValueError):
                    raise StudyError(f"{path} line {line}: a value in {', '.join(NUMERIC)} is not "
                                     f"a number: {row}") from None
                if row["family"] not in FAMILIES:
                    raise StudyError(f"{path} line {line}: family {row['family']!r} is not one "
                                     f"of {', '.join(FAMILIES)}")
                if not all(math.isfinite(parsed[k]) and parsed[k] > 0
                           for k in ("non_embedding_params", "budget")):
                    raise StudyError(f"{path} line {line}: non_embedding_params and budget must be "
                                     f"positive numbers")
                if not math.isfinite(parsed["loss"]):
                    skipped += 1  # a diverged run has no place on the curve; it is not an error
                    continue
                rows.append({"family": row["family"], "preset": row["preset"], **parsed})
    except (UnicodeDecodeError, csv.Error) as e:
        raise StudyError(f"{path} is not a results CSV: {e}") from None
    if not rows:
        why = (f" ({skipped} row(s) with a NaN or infinite loss: diverged runs)" if skipped
               else "")
        raise StudyError(f"{path} holds no finished runs{why}; run or collect the sweep first "
                         f"(python -m mdm_jax.scaling.sweep --config=... --collect-only)")
    return rows


@dataclasses.dataclass
class Minimum:
    budget: float
    n_opt: float
    loss_opt: float
    bracketed: bool  # False: the best run is the smallest or largest size (N* is a bound)
    coeffs: tuple  # loss = c2 x^2 + c1 x + c0 with x = log10 N
    fit_range: tuple = ()  # (min, max) of the log10 N the parabola was fitted to


def isoflop_minimum(n: np.ndarray, loss: np.ndarray, budget: float) -> Minimum:
    if len(n) < 3:
        raise StudyError(f"budget {budget:.3g} has {len(n)} finished run(s); an IsoFLOP curve "
                         f"needs 3 or more sizes")
    x = np.log10(n)
    best = int(np.argmin(loss))
    # The parabola is a local model of the minimum: fitted to the best run and up to two sizes
    # on each side. Over a grid spanning 1.5+ decades, IsoFLOP curves are not parabolas (they
    # rise steeply on the small side, slowly on the large), and a global quadratic can put its
    # vertex far from, and above, the best run.
    near = slice(max(0, best - 2), min(len(x), best + 3))
    if near.stop - near.start >= 3:
        x_fit, loss_fit = x[near], loss[near]
    else:
        x_fit, loss_fit = x, loss
    c2, c1, c0 = np.polyfit(x_fit, loss_fit, 2)
    # Bracketed: the best run has a larger and a smaller size beside it, and the parabola
    # opens upward with its vertex inside the sizes run.
    if 0 < best < len(x) - 1 and c2 > 0 and x_fit.min() <= -c1 / (2 * c2) <= x_fit.max():
        x_opt = -c1 / (2 * c2)
        return Minimum(budget, 10 ** x_opt, c0 - c1 ** 2 / (4 * c2), True, (c2, c1, c0),
                       (float(x_fit.min()), float(x_fit.max())))
    return Minimum(budget, float(n[best]), float(loss[best]), False, (c2, c1, c0),
                   (float(x_fit.min()), float(x_fit.max())))


@dataclasses.dataclass
class PowerLaw:
    """y = coef * C^exponent, fitted on log10 axes; standard errors from the residuals."""
    coef: float
    exponent: float
    exponent_se: float
    log10_coef_se: float

    def __call__(self, c):
        return self.coef * np.asarray(c, dtype=float) ** self.exponent


def _least_squares(design: np.ndarray, y: np.ndarray):
    params, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(y) - design.shape[1]
    resid = y - design @ params
    sigma2 = float(resid @ resid) / dof if dof > 0 else float("nan")
    cov = sigma2 * np.linalg.inv(design.T @ design)
    return params, cov


def power_law(c: np.ndarray, y: np.ndarray) -> PowerLaw:
    lc = np.log10(c)
    (log_coef, exponent), cov = _least_squares(np.stack([np.ones_like(lc), lc], 1),
                                               np.log10(y))
    return PowerLaw(10 ** log_coef, float(exponent), math.sqrt(cov[1, 1]),
                    math.sqrt(cov[0, 0]))


def fit(rows: list[dict]) -> dict:
    """Minima per family and budget, the two power laws per family and the compute multiplier."""
    out = {"families": {}}
    for family in FAMILIES:
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        minima = []
        for budget in sorted({r["budget"] for r in fam}):
            pts = sorted((r for r in fam if r["budget"] == budget),
                         key=lambda r: r["non_embedding_params"])
            minima.append(isoflop_minimum(np.array([r["non_embedding_params"] for r in pts]),
                                          np.array([r["loss"] for r in pts]), budget))
        if len(minima) < 3:  # two points fix a line exactly: an exponent without an error
            raise StudyError(f"{family}: {len(minima)} budget(s); the scaling fits need 3 or "
                             f"more (two points fit any power law exactly, with no error to "
                             f"report); add budgets to the grid")
        cs = np.array([m.budget for m in minima])
        loss_law = power_law(cs, np.array([m.loss_opt for m in minima]))
        n_law = power_law(cs, np.array([m.n_opt for m in minima]))
        out["families"][family] = {
            "alpha": -loss_law.exponent, "alpha_se": loss_law.exponent_se, "a": loss_law.coef,
            "beta": n_law.exponent, "beta_se": n_law.exponent_se, "b": n_law.coef,
            "minima": [dataclasses.asdict(m) | {"coeffs": list(m.coeffs)} for m in minima],
            "_laws": (loss_law, n_law), "_minima": minima,
        }
    fams = out["families"]
    out["multipliers"] = {}
    for family, reference in COMPARISONS:
        if {family, reference} <= fams.keys():
            k = _multiplier(fams[family]["_minima"], fams[reference]["_minima"],
                            fams[family]["_laws"][0], fams[reference]["_laws"][0],
                            (family, reference))
            k["label"] = multiplier_label(k)
            out["multipliers"][f"{family}/{reference}"] = k
            if reference == families.BASELINE:
                fams[family]["compute_multiplier"] = k["shared_alpha"]
                fams[family]["compute_multiplier_log10_se"] = k["shared_alpha_log10_se"]
                fams[family]["compute_multiplier_bound"] = k["bound"]
                fams[family]["compute_multiplier_label"] = k["label"]
    if families.BASELINE in fams and len(fams) > 1:
        fams[families.BASELINE]["compute_multiplier"] = 1.0
    if "mdm/arm" in out["multipliers"]:
        out["compute_multiplier"] = out["multipliers"]["mdm/arm"]  # SMDM's headline number
    return out


# (family, reference): the compute the family needs for the reference's loss, as each family's
# record lists them (every diffusion family against the ARM, mdm-ce also against the mdm).
COMPARISONS = tuple((f.name, ref) for f in families.RECORDS for ref in f.compare_with)


def _multiplier(mdm: list[Minimum], arm: list[Minimum], mdm_law: PowerLaw,
                arm_law: PowerLaw, names: tuple[str, str] = ("mdm", "arm")) -> dict:
    """k with L_mdm(k C) = L_arm(C) (mdm: the family, arm: its reference). Shared alpha:
    log L = c_family - alpha log C, so log k = (c_mdm - c_arm) / alpha, a constant; its error
    by the delta method. Where a minimum is not bracketed, k is labelled a bound (`_bound`)."""
    lc = np.log10([m.budget for m in mdm] + [m.budget for m in arm])
    is_mdm = np.array([1.0] * len(mdm) + [0.0] * len(arm))
    design = np.stack([is_mdm, 1 - is_mdm, -lc], 1)
    y = np.log10([m.loss_opt for m in mdm] + [m.loss_opt for m in arm])
    (c_m, c_a, alpha), cov = _least_squares(design, y)
    log_k = (c_m - c_a) / alpha
    grad = np.array([1 / alpha, -1 / alpha, -log_k / alpha])
    log_k_se = math.sqrt(max(float(grad @ cov @ grad), 0.0))
    # d log k / d y_i for every minimum: the parameters are linear in y.
    sensitivity = grad @ np.linalg.inv(design.T @ design) @ design.T
    at_budget = {}
    for m in arm:  # separate exponents: solve a_m (k C)^-alpha_m = a_a C^-alpha_a for k
        target = float(arm_law(m.budget))
        at_budget[f"{m.budget:.3g}"] = (target / mdm_law.coef) ** (1 / mdm_law.exponent) / m.budget
    return {"shared_alpha": 10 ** log_k, "shared_alpha_log10_se": log_k_se,
            "alpha_shared": alpha, "at_budget": at_budget,
            **_bound(mdm + arm, sensitivity, [names[0]] * len(mdm) + [names[1]] * len(arm))}


def _bound(minima: list[Minimum], sensitivity: np.ndarray, owners: list[str]) -> dict:
    """Whether a multiplier built on these minima is a measurement, a bound, or neither.

    A minimum that is not bracketed is the best run, not the optimum: the optimum at that
    budget is at least as good, so the true log L* is the reported one less some d >= 0.
    The fit is linear in the log losses, so to first order log k moves by -sum_i s_i d_i, with
    s_i = d log k / d log L*_i. If every unbracketed minimum has s_i >= 0, no correction can
    raise k: the reported k is an upper bound; if every s_i <= 0, a lower bound; mixed signs
    give no bound. The sign is not the family's alone. A lower loss moves its family's line
    down (for the family: less compute needed, k falls; for the reference: more, k rises) and
    also tilts the shared slope (a lower loss at a small budget flattens it, at a large budget
    steepens it), and log k = gap / alpha. Where the two oppose (the family's small budgets,
    the reference's large ones) the tilt can win: at SMDM's 16x on its 5 budgets, lowering the
    family's minimum at the smallest budget raises k."""
    open_ = [(m, s, who) for m, s, who in zip(minima, sensitivity, owners, strict=True)
             if not m.bracketed]
    unbracketed: dict[str, list[float]] = {}
    for m, _, who in open_:
        unbracketed.setdefault(who, []).append(m.budget)
    if not open_:
        return {"minima_bracketed": True, "multiplier_is_bound": False, "bound": None,
                "unbracketed": {}}
    tol = 1e-9 * max(float(np.abs(sensitivity).max()), 1.0)
    signs = {int(np.sign(s)) for _, s, _ in open_ if abs(s) > tol}
    bound = {frozenset({1}): "upper", frozenset({-1}): "lower"}.get(frozenset(signs))
    return {"minima_bracketed": False, "multiplier_is_bound": bound is not None,
            "bound": bound, "unbracketed": unbracketed}


def multiplier_label(k: dict, unicode: bool = False) -> str:
    """'16.2x', '<= 16.2x' (upper bound), '>= 16.2x' (lower bound) or '16.2x?' (neither)."""
    value = f"{k['shared_alpha']:.3g}x"
    if k.get("minima_bracketed", True):
        return value
    le, ge = ("\u2264", "\u2265") if unicode else ("<=", ">=")
    return {"upper": f"{le} {value}", "lower": f"{ge} {value}"}.get(k.get("bound"), value + "?")


def _where(k: dict) -> str:
    return "; ".join(f"{who.upper()} at C=" + ", ".join(f"{c:.3g}" for c in budgets)
                     for who, budgets in k["unbracketed"].items())


def public(result: dict) -> dict:
    """The JSON-ready part of fit()'s result."""
    clean = {k: v for k, v in result.items() if k != "families"}
    clean["families"] = {f: {k: v for k, v in d.items() if not k.startswith("_")}
                         for f, d in result["families"].items()}
    return clean


def report(result: dict) -> str:
    lines = []
    for family, d in result["families"].items():
        lines.append(f"{family.upper()}: L*(C) = {d['a']:.4g} * C^-{d['alpha']:.4f} "
                     f"(alpha +- {d['alpha_se']:.4f});  N*(C) = {d['b']:.4g} * C^{d['beta']:.3f} "
                     f"(beta +- {d['beta_se']:.3f})")
        for m in d["_minima"]:
            flag = "" if m.bracketed else "  (not bracketed: best run shown; widen the grid)"
            lines.append(f"  C={m.budget:.3g}: N*={m.n_opt:,.0f}  L*={m.loss_opt:.4f}{flag}")
    for pair, k in result.get("multipliers", {}).items():
        family, reference = (f.upper() for f in pair.split("/"))
        spread = 10 ** k["shared_alpha_log10_se"]
        lines.append(f"{family} compute multiplier for the {reference}'s loss: "
                     f"{multiplier_label(k)} (x/ {spread:.2f} one s.e.; shared alpha "
                     f"{k['alpha_shared']:.4f}); per budget: "
                     + ", ".join(f"{c}: {v:.3g}x" for c, v in k["at_budget"].items()))
        if k.get("minima_bracketed", True):
            continue
        if k["bound"] == "upper":
            lines.append(f"  an upper bound, not a measurement: minima not bracketed "
                         f"({_where(k)}); their true minima are lower, which can only lower "
                         f"it (to first order)")
        elif k["bound"] == "lower":
            lines.append(f"  a lower bound, not a measurement: minima not bracketed "
                         f"({_where(k)}); their true minima are lower, which can only raise "
                         f"it (to first order)")
        else:
            lines.append(f"  neither a measurement nor a bound: minima not bracketed "
                         f"({_where(k)}) would move it in opposite directions; widen the grid")
    return "\n".join(lines)


PLOT_DPI = 110


def figure(rows: list[dict], result: dict):
    """Top row: one IsoFLOP panel per family (losses compare within a family only); bottom
    row: L*(C) and N*(C) of every family. A matplotlib Figure (Agg), ticks made readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["families"])
    cols = max(len(names), 2)
    fig, grid = plt.subplots(2, cols, figsize=(4.2 * cols, 8.4), squeeze=False, dpi=PLOT_DPI)
    for ax in grid[1, 2:]:
        ax.set_visible(False)
    loss_ax, n_ax = grid[1, 0], grid[1, 1]
    budgets = sorted({r["budget"] for r in rows})
    colors = {b: plt.cm.viridis(i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}
    for ax, family in zip(grid[0], names, strict=False):
        d = result["families"][family]
        marker, line = families.get(family).plot_style
        for m in d["_minima"]:
            pts = sorted((r for r in rows if r["family"] == family and r["budget"] == m.budget),
                         key=lambda r: r["non_embedding_params"])
            n = np.array([r["non_embedding_params"] for r in pts])
            ax.plot(n, [r["loss"] for r in pts], marker, color=colors[m.budget])
            xs = np.linspace(*m.fit_range, 50)
            ax.plot(10 ** xs, np.polyval(m.coeffs, xs), linestyle=line, color=colors[m.budget],
                    label=f"C={m.budget:.2g}")
            ax.plot(m.n_opt, m.loss_opt, "*" if m.bracketed else "x", ms=14,
                    color=colors[m.budget], mec="k")
        ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss",
               title=f"{family.upper()} IsoFLOP curves")
        loss_law, n_law = d["_laws"]
        cs = np.array([m.budget for m in d["_minima"]])
        span = np.geomspace(cs.min() / 1.5, cs.max() * 1.5, 50)
        loss_ax.plot(cs, [m.loss_opt for m in d["_minima"]], marker, color="k")
        loss_ax.plot(span, loss_law(span), linestyle=line,
                     label=f"{family.upper()}: L* ~ C^-{d['alpha']:.3f}")
        n_ax.plot(cs, [m.n_opt for m in d["_minima"]], marker, color="k")
        n_ax.plot(span, n_law(span), linestyle=line,
                  label=f"{family.upper()}: N* ~ C^{d['beta']:.2f}")
    loss_ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="optimal loss L*",
                title="Optimal loss vs compute")
    n_ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="optimal N*",
             title="Optimal size vs compute")
    pairs = [(pair.split("/")[0].upper(), k) for pair, k in result.get("multipliers", {}).items()
             if pair.endswith("/arm")]
    if pairs:  # wrapped to the panel's width (about 50 characters at this size)
        needs = ", ".join(f"{name} {multiplier_label(k, unicode=True)}".replace(" ", "\u00a0")
                          for name, k in pairs)  # (no break inside one family's figure)
        lines = ["Optimal loss vs compute",
                 *textwrap.wrap(f"compute for the ARM's loss: {needs}", 50, break_on_hyphens=False)]
        if any(not k.get("minima_bracketed", True) for _, k in pairs):
            lines.append("\u2264 / \u2265: a bound; ?: no bound (minima not bracketed)")
        loss_ax.set_title("\n".join(lines), fontsize=9)
    for ax in grid.flat:
        if ax.get_visible() and ax.has_data():
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    readable_log_ticks(fig)
    return fig


def plot(rows: list[dict], result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows, result)
    try:
        fig.savefig(path, dpi=fig.dpi)
    except OSError as e:
        raise StudyError(f"cannot write --plot {path}: {e.strerror or e}") from None
    finally:
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
    parser = ArgumentParser(prog="python -m mdm_jax.scaling.fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="CSV written by mdm_jax.scaling.sweep")
    parser.add_argument("--plot", help="write the IsoFLOP and log-log fit figure to this PNG")
    parser.add_argument("--json", action="store_true", help="print the fits as JSON")
    args = parser.parse_args(argv)
    if args.plot:
        _check_plot_path(args.plot)
    rows = read_results(args.results)
    result = fit(rows)
    print(json.dumps(public(result), indent=2) if args.json else report(result))
    if args.plot:
        plot(rows, result, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")


def _check_plot_path(path: str) -> None:
    """Before fitting: a --plot that cannot be written would otherwise fail at the very end."""
    from matplotlib.backend_bases import FigureCanvasBase

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StudyError(f"--plot {path}: folder {folder} does not exist; create it or give "
                         f"another path")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise StudyError(f"--plot {path}: matplotlib writes {', '.join(sorted(formats))}, not "
                         f"{ext or 'a file without an extension'}; e.g. --plot isoflop.png")


def cli(argv=None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    cli()
