"""Scaling-law fits of an IsoFLOP study's results.csv, and SMDM Figure 1-style plots.

For each family and budget, a parabola in log10 N fitted to the best run and up to two sizes on
each side gives the IsoFLOP minimum (N*, L*). Across budgets, least squares on log-log axes
gives L*(C) = a C^-alpha and N*(C) = b C^beta, with standard errors from the residuals. Each
diffusion family's compute multiplier is the factor k with L_family(k C) = L_arm(C), from a
fit that shares alpha between the two families (SMDM's "constant compute gap"), and also per
budget from the separate fits; mdm-ce is also compared with mdm (the CE variant's FLOPs gain).
Losses compare within a family: the ARM's is an exact NLL, the diffusions' are ELBOs.

Uncertainty, besides the standard errors from the residuals: a bootstrap over runs (--bootstrap
N resamples, 0: none; a fixed --seed, so the output is reproducible) redraws each (family,
budget)'s runs with replacement and refits everything, giving percentile intervals (95%) for
each family's alpha and beta and for every multiplier. Where results.csv has a loss_se (the
run's validation-loss Monte Carlo standard error), each resampled run's loss is also drawn
from Normal(loss, loss_se): a nonparametric bootstrap of the runs plus a parametric one of
their evaluation noise. A resample that leaves a budget with fewer than 3 distinct sizes has no
IsoFLOP minimum there: it is dropped from that family's intervals and from its multipliers',
and the number dropped is reported (the intervals are thus conditional on every budget keeping
3 sizes, as the data did; with 5-7 sizes per budget, a few to tens of percent are dropped).
Beside each multiplier is its sensitivity to a 1% shift: the multiplier refitted with every
loss of the family (then of the reference) times 1.01.

A (family, budget) with fewer than 3 distinct sizes finished (a sweep still running, a budget
not yet started) has no IsoFLOP curve yet: it is left out of every fit and listed as such, so
a study can be fitted, and its results committed, while its sweep goes on.

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
# loss_se is optional: results files written before the trainer logged it have no such column.
REQUIRED = tuple(c for c in RESULT_COLUMNS if c != "loss_se")


def _loss_se(text: str | None, where: str) -> float:
    """A run's loss_se: 0 where the column is absent or empty (no evaluation noise known)."""
    if text is None or not text.strip():
        return 0.0
    try:
        se = float(text)
    except ValueError:
        se = float("nan")
    if not (math.isfinite(se) and se >= 0):
        raise StudyError(f"{where}: loss_se {text!r} is not a number >= 0 (leave it empty where "
                         f"the run has no standard error)")
    return se


def read_results(path: str) -> list[dict]:
    """Rows of a results CSV with numbers parsed; bad files get errors naming the problem."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise StudyError(f"cannot read results file {path}: {e.strerror or e}") from None
    try:
        with f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
            if missing:
                raise StudyError(
                    f"{path} lacks column(s) {', '.join(missing)}; a results file needs "
                    f"{','.join(REQUIRED)} (as `python -m mdm_jax.scaling.sweep` writes)")
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
                parsed["loss_se"] = _loss_se(row.get("loss_se"), f"{path} line {line}")
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
    """The minimum of one IsoFLOP curve. Runs may share a size (a bootstrap resample repeats
    runs): the window and the bracketing count distinct sizes."""
    x = np.log10(n)
    sizes = np.unique(x)
    if len(sizes) < 3:
        raise StudyError(f"budget {budget:.3g} has {len(n)} finished run(s) at {len(sizes)} "
                         f"size(s); an IsoFLOP curve needs 3 or more sizes")
    best = int(np.argmin(loss))
    at = int(np.searchsorted(sizes, x[best]))
    # The parabola is a local model of the minimum: fitted to the best run and up to two sizes
    # on each side. Over a grid spanning 1.5+ decades, IsoFLOP curves are not parabolas (they
    # rise steeply on the small side, slowly on the large), and a global quadratic can put its
    # vertex far from, and above, the best run.
    near = (x >= sizes[max(0, at - 2)]) & (x <= sizes[min(len(sizes) - 1, at + 2)])
    x_fit, loss_fit = x[near], loss[near]
    c2, c1, c0 = np.polyfit(x_fit, loss_fit, 2)
    # Bracketed: the best run has a larger and a smaller size beside it, and the parabola
    # opens upward with its vertex inside the sizes run.
    if 0 < at < len(sizes) - 1 and c2 > 0 and x_fit.min() <= -c1 / (2 * c2) <= x_fit.max():
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


def _groups(rows: list[dict]) -> dict[str, list[tuple]]:
    """family -> [(budget, sizes, losses, loss_se)], budgets ascending, each one's runs by size."""
    out = {}
    for family in FAMILIES:
        fam = [r for r in rows if r["family"] == family]
        for budget in sorted({r["budget"] for r in fam}):
            pts = sorted((r for r in fam if r["budget"] == budget),
                         key=lambda r: r["non_embedding_params"])
            out.setdefault(family, []).append((budget, *(
                np.array([r.get(k, 0.0) for r in pts], dtype=float)
                for k in ("non_embedding_params", "loss", "loss_se"))))
    return out


def _split_incomplete(groups: dict[str, list[tuple]]) -> tuple[dict, list[dict]]:
    """(the curves with 3 or more distinct sizes, [what was left out: family, budget, runs,
    sizes]); a family with no such curve is dropped from the first."""
    kept, left_out = {}, []
    for family, curves in groups.items():
        for curve in curves:
            budget, n = curve[0], curve[1]
            if len(np.unique(n)) >= 3:
                kept.setdefault(family, []).append(curve)
            else:
                left_out.append({"family": family, "budget": float(budget), "runs": len(n),
                                 "sizes": int(len(np.unique(n)))})
    return kept, left_out


def _family_fit(family: str, curves: list[tuple]) -> tuple[list[Minimum], PowerLaw | None,
                                                           PowerLaw | None]:
    """The IsoFLOP minima of (budget, sizes, losses, ...) curves, and L*(C) and N*(C); the laws
    are None below 3 budgets (two points fit any power law exactly, with no error to report)."""
    minima = [isoflop_minimum(n, loss, budget) for budget, n, loss, *_ in curves]
    if len(minima) < MIN_BUDGETS:
        return minima, None, None
    cs = np.array([m.budget for m in minima])
    return (minima, power_law(cs, np.array([m.loss_opt for m in minima])),
            power_law(cs, np.array([m.n_opt for m in minima])))


MIN_BUDGETS = 3  # for a family's own power laws; its multiplier needs 2 (the fit is shared)


def fit(rows: list[dict], bootstrap: int = 0, seed: int = 0, level: float = 0.95) -> dict:
    """Minima per family and budget, the two power laws per family and the compute multipliers,
    each multiplier's sensitivity to +1% on one family's losses and, with `bootstrap`
    resamples (the CLI's default 1000), percentile intervals at `level` (module docstring)."""
    groups, left_out = _split_incomplete(_groups(rows))
    out = {"families": {}, "left_out": left_out}
    if not groups:
        raise StudyError("no family has a budget with 3 or more sizes finished; an IsoFLOP "
                         "curve needs 3 (let the sweep finish, then collect it again)")
    fits = {family: _family_fit(family, curves) for family, curves in groups.items()}
    if not any(law is not None for _, law, _ in fits.values()):
        most = max(len(minima) for minima, _, _ in fits.values())
        raise StudyError(f"{most} budget(s) per family at most; the scaling fits need "
                         f"{MIN_BUDGETS} or more (two points fit any power law exactly, with "
                         f"no error to report); add budgets to the grid")
    for family, (minima, loss_law, n_law) in fits.items():
        laws = {} if loss_law is None else {
            "alpha": -loss_law.exponent, "alpha_se": loss_law.exponent_se, "a": loss_law.coef,
            "beta": n_law.exponent, "beta_se": n_law.exponent_se, "b": n_law.coef}
        out["families"][family] = {
            **{k: None for k in ("alpha", "alpha_se", "a", "beta", "beta_se", "b")}, **laws,
            "minima": [dataclasses.asdict(m) | {"coeffs": list(m.coeffs)} for m in minima],
            "_laws": (loss_law, n_law), "_minima": minima,
        }
    # Every loss of one family times 1.01: a systematic shift (an evaluation's bias, a
    # tokenisation detail) that the runs' scatter, and so the bootstrap, cannot see.
    shifted = {family: _family_fit(family, [(b, n, 1.01 * loss) for b, n, loss, _ in curves])[0]
               for family, curves in groups.items()}
    fams = out["families"]
    out["multipliers"] = {}
    for family, reference in COMPARISONS:
        if {family, reference} <= fams.keys() and min(
                len(fams[f]["_minima"]) for f in (family, reference)) >= 2:
            k = _multiplier(fams[family]["_minima"], fams[reference]["_minima"],
                            fams[family]["_laws"][0], fams[reference]["_laws"][0],
                            (family, reference))
            k["label"] = multiplier_label(k)
            k["sensitivity_1pct"] = {
                "family": 10 ** _log_multiplier(shifted[family], fams[reference]["_minima"]),
                "reference": 10 ** _log_multiplier(fams[family]["_minima"], shifted[reference])}
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
    if bootstrap > 0:
        _add_intervals(out, resample_fits(groups, bootstrap, seed), level)
        out["bootstrap"] = {"replicates": bootstrap, "seed": seed, "level": level,
                            "loss_se": any(bool(se.any()) for curves in groups.values()
                                           for *_, se in curves)}
    return out


def resample_fits(groups: dict[str, list[tuple]], replicates: int, seed: int) -> list[dict]:
    """Per bootstrap replicate, family -> (alpha, beta, minima), or None where its fit failed.

    Each (family, budget)'s runs are drawn with replacement (as many as it has), each drawn
    run's loss plus Normal(0, its loss_se). The random stream does not depend on which fits
    fail, nor on whether loss_se is given (0 adds nothing), so a seed gives one answer."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(replicates):
        rep = {}
        for family, curves in groups.items():
            resampled = []
            for budget, n, loss, se in curves:
                i = rng.integers(len(n), size=len(n))
                resampled.append((budget, n[i], loss[i] + se[i] * rng.standard_normal(len(n))))
            try:
                with np.errstate(all="ignore"):  # a nonfinite fit is dropped just below
                    minima, loss_law, n_law = _family_fit(family, resampled)
            except (StudyError, np.linalg.LinAlgError):  # < 3 distinct sizes at a budget
                rep[family] = None
                continue
            if loss_law is None:  # too few budgets for its own laws: its minima still count
                rep[family] = (math.nan, math.nan, minima)
                continue
            ok = math.isfinite(loss_law.exponent) and math.isfinite(n_law.exponent)
            rep[family] = (-loss_law.exponent, n_law.exponent, minima) if ok else None
        draws.append(rep)
    return draws


def _interval(values: list, level: float) -> tuple[list[float] | None, int]:
    """([lo, hi] percentile interval of the finite values or None, how many were dropped: None
    (a failed fit) or not finite)."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    tail = 50 * (1 - level)
    interval = [float(v) for v in np.percentile(kept, [tail, 100 - tail])] if kept else None
    return interval, len(values) - len(kept)


def _add_intervals(out: dict, draws: list[dict], level: float) -> None:
    for family, d in out["families"].items():
        got = [rep[family] for rep in draws]
        if d["alpha"] is None:  # no laws of its own to give intervals for
            d["alpha_interval"] = d["beta_interval"] = d["bootstrap_dropped"] = None
            continue
        d["alpha_interval"], d["bootstrap_dropped"] = _interval(
            [None if g is None else g[0] for g in got], level)
        d["beta_interval"], _ = _interval([None if g is None else g[1] for g in got], level)
    for pair, k in out["multipliers"].items():
        family, reference = pair.split("/")
        values = []
        for rep in draws:
            if rep[family] is None or rep[reference] is None:
                values.append(None)
                continue
            with np.errstate(all="ignore"):
                values.append(10 ** _log_multiplier(rep[family][2], rep[reference][2]))
        k["bootstrap_interval"], k["bootstrap_dropped"] = _interval(values, level)


# (family, reference): the compute the family needs for the reference's loss, as each family's
# record lists them (every diffusion family against the ARM, mdm-ce also against the mdm).
COMPARISONS = tuple((f.name, ref) for f in families.RECORDS for ref in f.compare_with)


def _multiplier(mdm: list[Minimum], arm: list[Minimum], mdm_law: PowerLaw,
                arm_law: PowerLaw, names: tuple[str, str] = ("mdm", "arm")) -> dict:
    """k with L_mdm(k C) = L_arm(C) (mdm: the family, arm: its reference). Shared alpha:
    log L = c_family - alpha log C, so log k = (c_mdm - c_arm) / alpha, a constant; its error
    by the delta method. Where a minimum is not bracketed, k is labelled a bound (`_bound`)."""
    design, (c_m, c_a, alpha), cov = _shared_fit(mdm, arm)
    log_k = (c_m - c_a) / alpha
    grad = np.array([1 / alpha, -1 / alpha, -log_k / alpha])
    log_k_se = math.sqrt(max(float(grad @ cov @ grad), 0.0))
    # d log k / d y_i for every minimum: the parameters are linear in y.
    sensitivity = grad @ np.linalg.inv(design.T @ design) @ design.T
    at_budget = {}
    for m in arm if mdm_law is not None and arm_law is not None else ():
        # separate exponents: solve a_m (k C)^-alpha_m = a_a C^-alpha_a for k
        target = float(arm_law(m.budget))
        at_budget[f"{m.budget:.3g}"] = (target / mdm_law.coef) ** (1 / mdm_law.exponent) / m.budget
    return {"shared_alpha": 10 ** log_k, "shared_alpha_log10_se": log_k_se,
            "alpha_shared": alpha, "at_budget": at_budget,
            **_bound(mdm + arm, sensitivity, [names[0]] * len(mdm) + [names[1]] * len(arm))}


def _shared_fit(mdm: list[Minimum], arm: list[Minimum]):
    """log10 L* = c_family - alpha log10 C on both families' minima: (design, params, cov)."""
    lc = np.log10([m.budget for m in mdm] + [m.budget for m in arm])
    is_mdm = np.array([1.0] * len(mdm) + [0.0] * len(arm))
    design = np.stack([is_mdm, 1 - is_mdm, -lc], 1)
    y = np.log10([m.loss_opt for m in mdm] + [m.loss_opt for m in arm])
    return design, *_least_squares(design, y)


def _log_multiplier(mdm: list[Minimum], arm: list[Minimum]) -> float:
    """log10 of the shared-alpha multiplier alone (what the bootstrap and 1% shifts refit)."""
    _, (c_m, c_a, alpha), _ = _shared_fit(mdm, arm)
    return float((c_m - c_a) / alpha)


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
    boot = result.get("bootstrap")
    level = f"{100 * boot['level']:g}% bootstrap" if boot else ""

    def span(d: dict, key: str, fmt: str, unit: str = "", dropped: bool = True) -> str:
        """'; 95% bootstrap 1.2x to 3.4x, 5 dropped' from d[key] (nothing without a bootstrap;
        ' to ', as a bound may be negative)."""
        if not boot:
            return ""
        if d[key] is None:
            return f"; no {level}: every resample dropped"
        lo, hi = (format(v, fmt) + unit for v in d[key])
        n = d["bootstrap_dropped"] if dropped else 0
        return f"; {level} {lo} to {hi}" + (f", {n} dropped" if n else "")

    for family, d in result["families"].items():
        if d["alpha"] is None:
            lines.append(f"{family.upper()}: minima at {len(d['_minima'])} budget(s); its own "
                         f"power laws need {MIN_BUDGETS}")
        else:
            lines.append(f"{family.upper()}: L*(C) = {d['a']:.4g} * C^-{d['alpha']:.4f} "
                         f"(alpha +- {d['alpha_se']:.4f}{span(d, 'alpha_interval', '.4f')});  "
                         f"N*(C) = {d['b']:.4g} * C^{d['beta']:.3f} (beta +- {d['beta_se']:.3f}"
                         f"{span(d, 'beta_interval', '.3f', dropped=False)})")
        for m in d["_minima"]:
            flag = "" if m.bracketed else "  (not bracketed: best run shown; widen the grid)"
            lines.append(f"  C={m.budget:.3g}: N*={m.n_opt:,.0f}  L*={m.loss_opt:.4f}{flag}")
    for gap in result.get("left_out", []):
        lines.append(f"{gap['family'].upper()} at C={gap['budget']:.3g}: {gap['runs']} finished "
                     f"run(s) at {gap['sizes']} size(s), left out of the fits until 3 sizes "
                     f"have finished")
    for pair, k in result.get("multipliers", {}).items():
        family, reference = (f.upper() for f in pair.split("/"))
        spread = 10 ** k["shared_alpha_log10_se"]
        shift = k["sensitivity_1pct"]
        lines.append(f"{family} compute multiplier for the {reference}'s loss: "
                     f"{multiplier_label(k)} (x/ {spread:.2f} one s.e."
                     f"{span(k, 'bootstrap_interval', '.3g', 'x')}; shared alpha "
                     f"{k['alpha_shared']:.4f}); +1% on {family}'s losses: "
                     f"{shift['family']:.3g}x, +1% on {reference}'s: {shift['reference']:.3g}x"
                     + ("; per budget: " + ", ".join(f"{c}: {v:.3g}x"
                                                     for c, v in k["at_budget"].items())
                        if k["at_budget"] else ""))
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
    if boot:
        lines.append(f"{level}: {boot['replicates']} resamples (seed {boot['seed']}) of the runs "
                     f"within each family and budget"
                     + (", each loss also drawn from Normal(loss, loss_se)" if boot["loss_se"]
                        else "")
                     + "; dropped: resamples with fewer than 3 distinct sizes at a budget")
    return "\n".join(lines)


PLOT_DPI = 110


def figure(rows: list[dict], result: dict):
    """Top row: one IsoFLOP panel per family (losses compare within a family only); bottom
    row: L*(C) and N*(C) of every family. A matplotlib Figure (Agg), ticks made readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mdm_jax.plot import readable_log_ticks

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
        if loss_law is None:  # its minima alone, joined
            loss_ax.plot(cs, [m.loss_opt for m in d["_minima"]], marker, linestyle=line,
                         label=f"{family.upper()}: minima")
            n_ax.plot(cs, [m.n_opt for m in d["_minima"]], marker, linestyle=line,
                      label=f"{family.upper()}: minima")
            continue
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


def _main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m mdm_jax.scaling.fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="CSV written by mdm_jax.scaling.sweep")
    parser.add_argument("--plot", help="write the IsoFLOP and log-log fit figure to this PNG")
    parser.add_argument("--json", action="store_true", help="print the fits as JSON")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the runs for the 95%% intervals (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        raise StudyError(f"--bootstrap {args.bootstrap}; give 0 (no intervals) or more")
    if args.plot:
        _check_plot_path(args.plot)
    rows = read_results(args.results)
    result = fit(rows, bootstrap=args.bootstrap, seed=args.seed)
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
