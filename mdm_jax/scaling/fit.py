"""Scaling-law fits of an IsoFLOP study's results.csv, and SMDM Figure 1-style plots.

For each family and budget, a parabola in log10 N fitted to the final losses gives the IsoFLOP
minimum (N*, L*). Across budgets, least squares on log-log axes gives L*(C) = a C^-alpha and
N*(C) = b C^beta, with standard errors from the residuals. The MDM's compute multiplier is the
factor k with L_mdm(k C) = L_arm(C), from a fit that shares alpha between the families (SMDM's
"constant compute gap"), and also per budget from the separate fits.

    python -m mdm_jax.scaling.fit --results results.csv --plot isoflop.png [--json]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os

import numpy as np

from mdm_jax.errors import ArgumentParser, run_main
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
                if row["family"] not in ("mdm", "arm"):
                    raise StudyError(f"{path} line {line}: family {row['family']!r} is not mdm "
                                     f"or arm")
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


def isoflop_minimum(n: np.ndarray, loss: np.ndarray, budget: float) -> Minimum:
    if len(n) < 3:
        raise StudyError(f"budget {budget:.3g} has {len(n)} finished run(s); an IsoFLOP curve "
                         f"needs 3 or more sizes")
    x = np.log10(n)
    c2, c1, c0 = np.polyfit(x, loss, 2)
    best = int(np.argmin(loss))
    # Bracketed: the best run has a larger and a smaller size beside it, and the parabola
    # opens upward with its vertex inside the sizes run.
    if 0 < best < len(x) - 1 and c2 > 0 and x.min() <= -c1 / (2 * c2) <= x.max():
        x_opt = -c1 / (2 * c2)
        return Minimum(budget, 10 ** x_opt, c0 - c1 ** 2 / (4 * c2), True, (c2, c1, c0))
    return Minimum(budget, float(n[best]), float(loss[best]), False, (c2, c1, c0))


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
    for family in ("mdm", "arm"):
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        minima = []
        for budget in sorted({r["budget"] for r in fam}):
            pts = sorted((r for r in fam if r["budget"] == budget),
                         key=lambda r: r["non_embedding_params"])
            minima.append(isoflop_minimum(np.array([r["non_embedding_params"] for r in pts]),
                                          np.array([r["loss"] for r in pts]), budget))
        if len(minima) < 2:
            raise StudyError(f"{family}: {len(minima)} budget(s); the scaling fits need 2 or "
                             f"more (3+ for uncertainties)")
        cs = np.array([m.budget for m in minima])
        loss_law = power_law(cs, np.array([m.loss_opt for m in minima]))
        n_law = power_law(cs, np.array([m.n_opt for m in minima]))
        out["families"][family] = {
            "alpha": -loss_law.exponent, "alpha_se": loss_law.exponent_se, "a": loss_law.coef,
            "beta": n_law.exponent, "beta_se": n_law.exponent_se, "b": n_law.coef,
            "minima": [dataclasses.asdict(m) | {"coeffs": list(m.coeffs)} for m in minima],
            "_laws": (loss_law, n_law), "_minima": minima,
        }
    if {"mdm", "arm"} <= out["families"].keys():
        out["compute_multiplier"] = _multiplier(out["families"]["mdm"]["_minima"],
                                                out["families"]["arm"]["_minima"],
                                                out["families"]["mdm"]["_laws"][0],
                                                out["families"]["arm"]["_laws"][0])
        out["families"]["mdm"]["compute_multiplier"] = out["compute_multiplier"]["shared_alpha"]
        out["families"]["arm"]["compute_multiplier"] = 1.0
    return out


def _multiplier(mdm: list[Minimum], arm: list[Minimum], mdm_law: PowerLaw,
                arm_law: PowerLaw) -> dict:
    """k with L_mdm(k C) = L_arm(C). Shared alpha: log L = c_family - alpha log C, so
    log k = (c_mdm - c_arm) / alpha, a constant; its error by the delta method."""
    lc = np.log10([m.budget for m in mdm] + [m.budget for m in arm])
    is_mdm = np.array([1.0] * len(mdm) + [0.0] * len(arm))
    design = np.stack([is_mdm, 1 - is_mdm, -lc], 1)
    y = np.log10([m.loss_opt for m in mdm] + [m.loss_opt for m in arm])
    (c_m, c_a, alpha), cov = _least_squares(design, y)
    log_k = (c_m - c_a) / alpha
    grad = np.array([1 / alpha, -1 / alpha, -log_k / alpha])
    log_k_se = math.sqrt(max(float(grad @ cov @ grad), 0.0))
    at_budget = {}
    for m in arm:  # separate exponents: solve a_m (k C)^-alpha_m = a_a C^-alpha_a for k
        target = float(arm_law(m.budget))
        at_budget[f"{m.budget:.3g}"] = (target / mdm_law.coef) ** (1 / mdm_law.exponent) / m.budget
    return {"shared_alpha": 10 ** log_k, "shared_alpha_log10_se": log_k_se,
            "alpha_shared": alpha, "at_budget": at_budget}


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
    if "compute_multiplier" in result:
        k = result["compute_multiplier"]
        spread = 10 ** k["shared_alpha_log10_se"]
        lines.append(f"MDM compute multiplier for the ARM's loss: {k['shared_alpha']:.3g}x "
                     f"(x/ {spread:.2f} one s.e.; shared alpha {k['alpha_shared']:.4f}); per "
                     f"budget: " + ", ".join(f"{c}: {v:.3g}x" for c, v in k["at_budget"].items()))
    return "\n".join(lines)


def plot(rows: list[dict], result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    budgets = sorted({r["budget"] for r in rows})
    colors = {b: plt.cm.viridis(i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}
    styles = {"mdm": ("o", "-"), "arm": ("s", "--")}
    for family, d in result["families"].items():
        marker, line = styles[family]
        for m in d["_minima"]:
            pts = sorted((r for r in rows if r["family"] == family and r["budget"] == m.budget),
                         key=lambda r: r["non_embedding_params"])
            n = np.array([r["non_embedding_params"] for r in pts])
            axes[0].plot(n, [r["loss"] for r in pts], marker, color=colors[m.budget])
            xs = np.linspace(np.log10(n.min()), np.log10(n.max()), 50)
            axes[0].plot(10 ** xs, np.polyval(m.coeffs, xs), line, color=colors[m.budget],
                         label=f"{family.upper()} C={m.budget:.2g}")
            axes[0].plot(m.n_opt, m.loss_opt, "*", ms=14, color=colors[m.budget], mec="k")
        loss_law, n_law = d["_laws"]
        cs = np.array([m.budget for m in d["_minima"]])
        grid = np.geomspace(cs.min() / 1.5, cs.max() * 1.5, 50)
        axes[1].plot(cs, [m.loss_opt for m in d["_minima"]], marker, color="k")
        axes[1].plot(grid, loss_law(grid), line,
                     label=f"{family.upper()}: L* ~ C^-{d['alpha']:.3f}")
        axes[2].plot(cs, [m.n_opt for m in d["_minima"]], marker, color="k")
        axes[2].plot(grid, n_law(grid), line, label=f"{family.upper()}: N* ~ C^{d['beta']:.2f}")
    axes[0].set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss",
                title="IsoFLOP curves")
    axes[1].set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="optimal loss L*",
                title="Optimal loss vs compute")
    axes[2].set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="optimal N*",
                title="Optimal size vs compute")
    if "compute_multiplier" in result:
        axes[1].set_title(f"Optimal loss vs compute (MDM needs "
                          f"{result['compute_multiplier']['shared_alpha']:.3g}x)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise StudyError(f"cannot write --plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


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
