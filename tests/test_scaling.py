"""The IsoFLOP workflow: plan numbers, sweep skip/resume on real tiny runs, fits on
synthetic results with known exponents, launcher dry runs, and bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import write_study

from mdm_jax import flops, run_lock
from mdm_jax.plot import readable_log_ticks
from mdm_jax.presets import PRESETS, get_preset
from mdm_jax.scaling import fit, plan, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(arg="smdm", **overrides):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import isoflop
    finally:
        sys.path.pop(0)
    c = isoflop.get_config(arg)
    for key, value in overrides.items():
        c[key] = value
    return c


def _cli(module, *args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_plan_matches_the_reference():
    # Every preset's N against REFERENCE is tests/test_model.py's; the plan carries it through.
    runs = plan.expand(_study())
    assert {r.family for r in runs} == {"mdm", "mdm-ce", "uniform", "eso", "arm"}
    assert len(runs) == 5 * sum(len(g.split(":")[1].split(",")) for g in _study().grid)
    run = next(r for r in runs if (r.family, r.preset, r.budget) == ("mdm", "170M", 1e19))
    assert run.steps == 18_710 and run.tokens == 18_710 * 256 * 2048
    assert run.run_id == "mdm-170M-1e+19" and run.workdir.endswith("isoflop_smdm/mdm-170M-1e+19")
    # Every budget's bracket has sizes on both sides of a Chinchilla-style centre sqrt(C/120).
    for budget in (6e18, 1e19, 3e19, 6e19, 1e20):
        sizes = [r.non_embedding_params for r in runs if r.budget == budget]
        assert min(sizes) < (budget / 120) ** 0.5 < max(sizes)


def test_plan_cli_table_and_json():
    out = _cli("mdm_jax.scaling.plan", "--config=experiments/isoflop.py", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    row = next(r for r in rows if r["run_id"] == "arm-170M-1e+19")
    p = get_preset("170M")
    assert row["steps"] == flops.steps_for_budget(p, 1e19)
    assert row["non_embedding_params"] == 169_897_728
    per_token = flops.train_flops_per_token(p, 2048, family="arm")
    hours = per_token * row["tokens"] / (flops.peak_flops("h100") * 0.4) / 3600
    assert row["accelerator_hours"] == pytest.approx(hours)
    table = _cli("mdm_jax.scaling.plan", "--config=experiments/isoflop.py:micro",
                 "--accelerator", "tpu v5p", "--mfu", "0.5")
    assert table.returncode == 0, table.stderr
    assert "tpu v5p-hours@50%" in table.stdout and " 13K " in table.stdout


def test_duo_convention_changes_the_steps():
    six_n = {r.run_id: r.steps for r in plan.expand(_study())}
    duo = {r.run_id: r.steps for r in plan.expand(_study(convention="3fwd"))}
    assert all(duo[k] < six_n[k] for k in six_n)
    p = get_preset("170M")
    assert duo["arm-170M-1e+19"] == flops.steps_for_budget(p, 1e19, convention="3fwd",
                                                           family="arm")


def test_bad_study_input_is_named():
    with pytest.raises(plan.StudyError, match="unknown preset 'bogus'"):
        plan.expand(_study(grid=("1e19: 170M,bogus",)))
    with pytest.raises(plan.StudyError, match="less than one step of preset 1028M"):
        plan.expand(_study(grid=("1e12: 1028M",)))
    with pytest.raises(plan.StudyError, match="must read 'BUDGET: PRESET"):
        plan.expand(_study(grid=("lots: 170M",)))
    with pytest.raises(plan.StudyError, match="families has 'gpt'"):
        plan.expand(_study(families="mdm,gpt"))
    out = _cli("mdm_jax.scaling.plan", "--config=experiments/isoflop.py",
               "--config.grid=('1e19: 170M,nope',)")
    assert out.returncode != 0 and "unknown preset 'nope'" in out.stderr


def _synthetic(path, alpha, beta, multiplier, noise=1e-4, seed=0):
    """IsoFLOP curves that are exact parabolas in log N around N*(C) = b C^beta with minimum
    L*(C) = a C^-alpha (each family in `beta`: the ARM's curve shifted by multiplier[family] in
    compute; a number is the MDM's multiplier)."""
    if not isinstance(multiplier, dict):
        multiplier = {"mdm": multiplier}
    rng = np.random.default_rng(seed)
    rows = []
    for family in beta:
        shift = multiplier.get(family, 1.0)
        for budget in (6e18, 1e19, 3e19, 6e19, 1e20):
            l_opt = 40.0 * (budget / shift) ** -alpha
            n_opt = (0.02 if family == "mdm" else 0.05) * budget ** beta[family]
            for factor in np.geomspace(0.2, 5, 7):
                loss = l_opt * (1 + 0.03 * np.log10(factor) ** 2) * (1 + noise * rng.normal())
                rows.append({"family": family, "preset": f"p{factor:.2f}",
                             "non_embedding_params": int(n_opt * factor), "budget": budget,
                             "steps": 1, "tokens": 1, "loss": loss})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_fit_recovers_known_exponents(tmp_path):
    path = tmp_path / "results.csv"
    _synthetic(path, alpha=0.062, beta={"mdm": 0.63, "arm": 0.58}, multiplier=16.0)
    out = _cli("mdm_jax.scaling.fit", "--results", str(path), "--json", "--plot",
               str(tmp_path / "fig.png"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    mdm, arm = result["families"]["mdm"], result["families"]["arm"]
    assert mdm["alpha"] == pytest.approx(0.062, rel=0.02)
    assert arm["alpha"] == pytest.approx(0.062, rel=0.02)
    assert mdm["beta"] == pytest.approx(0.63, rel=0.02)
    assert arm["beta"] == pytest.approx(0.58, rel=0.02)
    assert result["compute_multiplier"]["shared_alpha"] == pytest.approx(16.0, rel=0.02)
    assert mdm["compute_multiplier"] == pytest.approx(16.0, rel=0.02)
    assert all(m["bracketed"] for m in mdm["minima"] + arm["minima"])
    assert mdm["alpha_se"] < 0.01
    with open(tmp_path / "fig.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fit_reports_every_family_against_the_arm_and_ce_against_elbo(tmp_path):
    path = tmp_path / "results.csv"
    shifts = {"mdm": 16.0, "mdm-ce": 16.0 / 1.12, "uniform": 40.0}
    _synthetic(path, alpha=0.062, beta={"mdm": 0.63, "mdm-ce": 0.6, "uniform": 0.55,
                                        "arm": 0.58}, multiplier=shifts)
    out = _cli("mdm_jax.scaling.fit", "--results", str(path), "--json", "--plot",
               str(tmp_path / "fig.png"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for family, shift in shifts.items():
        assert result["families"][family]["compute_multiplier"] == pytest.approx(shift, rel=0.02)
        assert result["multipliers"][f"{family}/arm"]["shared_alpha"] == pytest.approx(
            shift, rel=0.02)
    assert result["families"]["uniform"]["beta"] == pytest.approx(0.55, rel=0.02)
    # The CE variant's gain is its own comparison: 1.12x less compute than the ELBO-trained MDM.
    assert result["multipliers"]["mdm-ce/mdm"]["shared_alpha"] == pytest.approx(1 / 1.12,
                                                                                rel=0.02)
    text = _cli("mdm_jax.scaling.fit", "--results", str(path)).stdout
    assert re.search(r"UNIFORM compute multiplier for the ARM's loss: (39\.\d|40(\.\d)?)x", text)
    assert re.search(r"MDM-CE compute multiplier for the MDM's loss: 0\.89\dx", text)


def test_fit_flags_minima_at_the_edge_of_the_grid(tmp_path):
    rows = [{"family": "mdm", "preset": "x", "non_embedding_params": n, "budget": c,
             "steps": 1, "tokens": 1, "loss": 5.0 + 1e-7 * n / c ** 0.1}
            for c in (1e11, 3e11, 1e12) for n in (1e4, 3e4, 1e5)]
    result = fit.fit(rows)
    assert not any(m.bracketed for m in result["families"]["mdm"]["_minima"])
    assert "not bracketed" in fit.report(result)
    with pytest.raises(plan.StudyError,
                       match=r"2 budget\(s\) per family at most; the scaling fits need 3"):
        fit.fit([r for r in rows if r["budget"] < 1e12])


def test_a_family_at_two_budgets_gets_its_minima_and_multiplier_but_no_laws(tmp_path):
    """A study whose top budget trains some families only: those at 2 budgets get their minima
    and their multiplier from the fit they share with the ARM (5 minima, 3 parameters), and no
    power laws of their own; the others are fitted as usual."""
    path = tmp_path / "results.csv"
    _synthetic(path, alpha=0.062, beta={"mdm": 0.63, "uniform": 0.55, "arm": 0.58},
               multiplier={"mdm": 16.0, "uniform": 40.0})
    rows = [r for r in fit.read_results(str(path))
            if r["family"] != "uniform" or r["budget"] in (6e18, 1e19)]
    result = fit.fit(rows, bootstrap=20)
    uniform, mdm = result["families"]["uniform"], result["families"]["mdm"]
    assert uniform["alpha"] is None and uniform["beta"] is None and len(uniform["minima"]) == 2
    assert uniform["alpha_interval"] is None
    assert uniform["compute_multiplier"] == pytest.approx(40.0, rel=0.05)
    assert result["multipliers"]["uniform/arm"]["at_budget"] == {}
    assert result["multipliers"]["uniform/arm"]["bootstrap_interval"] is not None
    assert mdm["alpha"] == pytest.approx(0.062, rel=0.02)
    assert mdm["compute_multiplier"] == pytest.approx(16.0, rel=0.02)
    text = fit.report(result)
    assert "UNIFORM: minima at 2 budget(s); its own power laws need 3" in text
    assert re.search(r"UNIFORM compute multiplier for the ARM's loss: 4\d\.?\d*x", text)
    fit.plot(rows, result, str(tmp_path / "fig.png"))
    json.dumps(fit.public(result))  # the --json output


def test_a_budget_still_training_is_left_out_and_listed(tmp_path):
    """Mid-sweep: a (family, budget) with fewer than 3 sizes finished has no curve yet. The fit
    is the fit without it, says what it left out, and the CLI fits the file as it stands."""
    path = tmp_path / "results.csv"
    _synthetic(path, alpha=0.062, beta={"mdm": 0.63, "arm": 0.58}, multiplier={"mdm": 16.0})
    rows = fit.read_results(str(path))
    top = max(r["budget"] for r in rows)
    done = [r for r in rows if r["budget"] < top]
    arm_top = sorted((r for r in rows if r["budget"] == top and r["family"] == "arm"),
                     key=lambda r: r["non_embedding_params"])
    partial = done + arm_top[:2] + arm_top[:1]  # two sizes (one run twice) of the ARM at the top
    result, without = fit.fit(partial, bootstrap=20), fit.fit(done, bootstrap=20)
    assert result["left_out"] == [{"family": "arm", "budget": top, "runs": 3, "sizes": 2}]
    assert without["left_out"] == []
    assert fit.public(result) == {**fit.public(without), "left_out": result["left_out"]}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(partial[0]))
        writer.writeheader()
        writer.writerows(partial)
    done_cli = _cli("mdm_jax.scaling.fit", "--results", str(path), "--bootstrap", "0")
    assert done_cli.returncode == 0, done_cli.stderr
    assert (f"ARM at C={top:.3g}: 3 finished run(s) at 2 size(s), left out of the fits until 3 "
            f"sizes have finished") in done_cli.stdout
    with pytest.raises(plan.StudyError, match="no family has a budget with 3 or more sizes"):
        fit.fit(arm_top[:2])


def _edge_rows(edges):
    """Noise-free MDM and ARM IsoFLOP curves (alpha 0.062, the MDM 16x the ARM's compute) where
    each (family, budget) in `edges` lost its sizes up to 1.5x its optimum: its best run sits at
    the small edge of the grid, with a loss above the true minimum."""
    rows = []
    for family in ("mdm", "arm"):
        for budget in (6e18, 1e19, 3e19, 6e19, 1e20):
            l_opt = 40.0 * (budget / (16.0 if family == "mdm" else 1.0)) ** -0.062
            n_opt = 0.02 * budget ** 0.6
            for factor in np.geomspace(0.2, 5, 9):
                if (family, budget) in edges and factor <= 1.5:
                    continue
                rows.append({"family": family, "preset": f"p{factor:.2f}",
                             "non_embedding_params": n_opt * factor, "budget": budget,
                             "steps": 1, "tokens": 1,
                             "loss": l_opt + 0.05 * np.log10(factor) ** 2})
    return rows


@pytest.mark.parametrize("edges, bound, sign, label", [
    # The MDM's own minima at the edge (middle and top budgets): its true curve is lower, so it
    # needs less compute than reported: an upper bound.
    ({("mdm", 3e19), ("mdm", 1e20)}, "upper", 1, "<= "),
    # The ARM's at the small and middle budgets: a better reference there needs more MDM
    # compute to match: a lower bound.
    ({("arm", 6e18), ("arm", 3e19)}, "lower", -1, ">= "),
    # The MDM's smallest budget too: a lower loss there flattens the shared slope, which
    # raises k, so the corrections pull both ways: no bound.
    ({("mdm", 6e18), ("mdm", 1e20)}, None, 0, ""),
])
def test_a_multiplier_on_minima_that_are_not_bracketed_is_labelled_a_bound(edges, bound, sign,
                                                                            label):
    result = fit.fit(_edge_rows(edges))
    k = result["multipliers"]["mdm/arm"]
    assert k["minima_bracketed"] is False
    assert (k["bound"], k["multiplier_is_bound"]) == (bound, bound is not None)
    assert {(f, c) for f, cs in k["unbracketed"].items() for c in cs} == edges
    # The direction is right: the true multiplier (16) lies on the bound's side.
    if sign:
        assert sign * (k["shared_alpha"] - 16.0) > 0.05
    text = fit.report(result)
    value = f"{k['shared_alpha']:.3g}x"
    if bound:
        assert f"MDM compute multiplier for the ARM's loss: {label}{value} (x/" in text
        article = {"upper": "an", "lower": "a"}[bound]
        assert f"{article} {bound} bound, not a measurement: minima not bracketed" in text
        assert "(MDM at C=" in text or "(ARM at C=" in text
    else:
        assert f"for the ARM's loss: {value}? (x/" in text
        assert "neither a measurement nor a bound" in text and "MDM at C=6e+18, 1e+20" in text
    public = json.loads(json.dumps(fit.public(result)))  # what --json prints
    assert public["compute_multiplier"]["bound"] == bound
    assert public["compute_multiplier"]["label"] == fit.multiplier_label(k)
    assert public["families"]["mdm"]["compute_multiplier_bound"] == bound
    title = fit.figure(_edge_rows(edges), result).axes[2].get_title()
    assert f"MDM\u00a0{fit.multiplier_label(k, unicode=True)}".replace(" ", "\u00a0") in title
    assert "a bound; ?: no bound (minima not bracketed)" in title


def test_a_bracketed_multiplier_is_a_measurement():
    result = fit.fit(_edge_rows(set()))
    k = result["multipliers"]["mdm/arm"]
    assert (k["minima_bracketed"], k["multiplier_is_bound"], k["bound"]) == (True, False, None)
    assert k["shared_alpha"] == pytest.approx(16.0, rel=1e-3)
    assert k["label"] == f"{k['shared_alpha']:.3g}x"
    assert "bound" not in fit.report(result)


def _overlaps(fig) -> list[str]:
    """Pairs of visible tick labels on one axis whose boxes intersect, as drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        for name, labels in (("x", ax.get_xticklabels(which="both")),
                             ("y", ax.get_yticklabels(which="both"))):
            shown = [(t.get_text(), t.get_window_extent(renderer)) for t in labels
                     if t.get_visible() and t.get_text()]
            found += [f"axes {i} {name}: {a!r} / {b!r}" for j, (a, box) in enumerate(shown)
                      for b, other in shown[j + 1:] if box.overlaps(other)]
    return found


@pytest.mark.parametrize("study", ["micro", "micro_families"])
def test_plot_tick_labels_never_overprint(study):
    """The committed studies' plots: their log axes span about one decade, where matplotlib's
    own minor labels (2x10^11, 3x10^11, 4x10^11, 6x10^11) ran into each other."""
    import matplotlib.pyplot as plt

    rows = fit.read_results(os.path.join(ROOT, "experiments", "results", study, "results.csv"))
    result = fit.fit(rows)
    fig = fit.figure(rows, result)
    try:
        assert _overlaps(fig) == []
        loss_ax, n_ax = fig.axes[len(result["families"]) if len(result["families"]) > 2 else 2:][:2]
        for ax in (loss_ax, n_ax):  # still labelled: 2 or more round values per log axis
            for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                assert len([t for t in labels if t.get_text()]) >= 2
        assert [t.get_text() for t in loss_ax.get_yticklabels() if t.get_text()][:1] != [
            "$4\\times10^{0}$"]  # a loss reads as a number
    finally:
        plt.close(fig)
    # The same check catches matplotlib's default labels on such an axis.
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=fit.PLOT_DPI)
    ax.plot([1.3e11, 1.8e12], [3.2, 5.0])
    ax.set(xscale="log", yscale="log")
    try:
        assert _overlaps(fig)
        readable_log_ticks(fig)
        assert _overlaps(fig) == []
    finally:
        plt.close(fig)


def test_results_with_missing_columns_are_rejected(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("family,preset,budget,loss\nmdm,170M,1e19,3.1\n")
    out = _cli("mdm_jax.scaling.fit", "--results", str(path))
    assert out.returncode != 0
    assert "lacks column(s) non_embedding_params, steps, tokens" in out.stderr
    path.write_text(",".join(sweep.RESULT_COLUMNS) + "\nmdm,170M,x,1e19,1,1,3.0\n")
    with pytest.raises(plan.StudyError, match="line 2.*not a number"):
        fit.read_results(str(path))


def test_isoflop_minimum_counts_sizes_not_runs():
    """A bootstrap resample repeats runs: the window (the best size and two sizes each side) and
    the bracketing count distinct sizes, so a curve with every run twice has the same minimum."""
    n = np.geomspace(1e4, 1e6, 9)
    x = np.log10(n) - 4.7
    loss = 3 + 0.2 * x ** 2 + 0.08 * x ** 3  # not a parabola: the window matters
    once = fit.isoflop_minimum(n, loss, 1e12)
    twice = fit.isoflop_minimum(np.repeat(n, 2), np.repeat(loss, 2), 1e12)
    assert once.bracketed and twice.bracketed
    assert twice.fit_range == once.fit_range
    assert (twice.n_opt, twice.loss_opt) == pytest.approx((once.n_opt, once.loss_opt))
    with pytest.raises(plan.StudyError, match=r"has 4 finished run\(s\) at 2 size\(s\)"):
        fit.isoflop_minimum(np.repeat(n[:2], 2), np.repeat(loss[:2], 2), 1e12)

def _bootstrap_fit(path, replicates=200, seed=0):
    return fit.fit(fit.read_results(str(path)), bootstrap=replicates, seed=seed)


def _width(interval):
    return interval[1] - interval[0]


def test_bootstrap_intervals_cover_the_true_exponents_and_shrink_with_the_noise(tmp_path):
    widths = {}
    for noise in (3e-3, 3e-4):
        path = tmp_path / f"noise{noise}.csv"
        _synthetic(path, alpha=0.062, beta={"mdm": 0.63, "arm": 0.58}, multiplier=16.0,
                   noise=noise)
        result = _bootstrap_fit(path)
        for family, d in result["families"].items():
            lo, hi = d["alpha_interval"]
            assert lo < 0.062 < hi, (noise, family, d["alpha_interval"])
            assert d["beta_interval"][0] < d["beta"] < d["beta_interval"][1]
            widths[noise, family] = _width(d["alpha_interval"])
    for family in ("mdm", "arm"):  # 10x less noise: a much tighter interval
        assert widths[3e-4, family] < widths[3e-3, family] / 2


def test_multiplier_bootstrap_and_sensitivity_to_a_one_percent_shift(tmp_path):
    path = tmp_path / "results.csv"
    _synthetic(path, alpha=0.062, beta={"mdm": 0.63, "mdm-ce": 0.6, "arm": 0.58},
               multiplier={"mdm": 16.0, "mdm-ce": 12.0}, noise=1e-3)
    out = _cli("mdm_jax.scaling.fit", "--results", str(path), "--json", "--bootstrap", "100",
               "--seed", "3")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["bootstrap"] == {"replicates": 100, "seed": 3, "level": 0.95,
                                   "loss_se": False}
    for pair, k in result["multipliers"].items():
        lo, hi = k["bootstrap_interval"]
        assert lo < k["shared_alpha"] < hi, pair
        assert 0 <= k["bootstrap_dropped"] < 100
        # Worse losses for the family: it needs more compute to reach the reference's loss;
        # worse for the reference: less. Shifting one family's log L* by log10(1.01) moves
        # only its intercept, so log k moves by log10(1.01) / alpha.
        shift = 1.01 ** (1 / k["alpha_shared"])
        sens = k["sensitivity_1pct"]
        assert sens["family"] > k["shared_alpha"] > sens["reference"]
        assert sens["family"] == pytest.approx(k["shared_alpha"] * shift, rel=1e-6)
        assert sens["reference"] == pytest.approx(k["shared_alpha"] / shift, rel=1e-6)
    assert set(result["multipliers"]) == {"mdm/arm", "mdm-ce/arm", "mdm-ce/mdm"}
    text = _cli("mdm_jax.scaling.fit", "--results", str(path), "--bootstrap", "100", "--seed",
                "3")
    k = result["multipliers"]["mdm/arm"]
    lo, hi = k["bootstrap_interval"]
    assert (f"MDM compute multiplier for the ARM's loss: {k['shared_alpha']:.3g}x (x/ "
            in text.stdout)
    assert f"; 95% bootstrap {lo:.3g}x to {hi:.3g}x" in text.stdout
    assert (f"+1% on MDM's losses: {k['sensitivity_1pct']['family']:.3g}x, +1% on ARM's: "
            f"{k['sensitivity_1pct']['reference']:.3g}x; per budget: " in text.stdout)
    alpha = result["families"]["arm"]["alpha_interval"]
    assert f"; 95% bootstrap {alpha[0]:.4f} to {alpha[1]:.4f}" in text.stdout
    assert "95% bootstrap: 100 resamples (seed 3)" in text.stdout
    # A fixed seed gives the same numbers; another seed, other resamples.
    again = _cli("mdm_jax.scaling.fit", "--results", str(path), "--bootstrap", "100", "--seed",
                 "3")
    assert again.stdout == text.stdout
    other = _bootstrap_fit(path, replicates=100, seed=4)
    assert other["multipliers"]["mdm/arm"]["bootstrap_interval"] != k["bootstrap_interval"]
    # --bootstrap 0: no intervals, the rest unchanged.
    off = _cli("mdm_jax.scaling.fit", "--results", str(path), "--json", "--bootstrap", "0")
    plain = json.loads(off.stdout)
    assert "bootstrap" not in plain and "bootstrap" not in json.dumps(plain)
    assert "alpha_interval" not in plain["families"]["mdm"]
    assert plain["multipliers"]["mdm/arm"]["shared_alpha"] == k["shared_alpha"]
    assert plain["multipliers"]["mdm/arm"]["sensitivity_1pct"] == k["sensitivity_1pct"]
    off_text = _cli("mdm_jax.scaling.fit", "--results", str(path), "--bootstrap", "0").stdout
    assert "bootstrap" not in off_text and "+1% on MDM's losses" in off_text
    bad = _cli("mdm_jax.scaling.fit", "--results", str(path), "--bootstrap", "-1")
    assert bad.returncode == 2 and "--bootstrap -1; give 0" in bad.stderr


def test_bootstrap_drops_resamples_with_fewer_than_three_sizes_at_a_budget():
    """The MDM keeps 4 of its 9 sizes per budget: a resample draws 2 or fewer distinct sizes
    at one of its 5 budgets most of the time, which has no IsoFLOP minimum."""
    def factor(r):  # the run's size over the optimum, 0.2-5
        return r["non_embedding_params"] / (0.02 * r["budget"] ** 0.6)

    rows = [r for r in _edge_rows(set()) if r["family"] == "arm" or 0.5 < factor(r) < 2.5]
    assert len({r["non_embedding_params"] for r in rows
                if r["family"] == "mdm" and r["budget"] == 1e19}) == 4
    replicates = 200
    result = fit.fit(rows, bootstrap=replicates, seed=0)
    mdm, k = result["families"]["mdm"], result["multipliers"]["mdm/arm"]
    assert 0.5 * replicates < mdm["bootstrap_dropped"] < replicates
    assert k["bootstrap_dropped"] >= mdm["bootstrap_dropped"]  # a multiplier needs both fits
    assert mdm["alpha_interval"] is not None and k["bootstrap_interval"] is not None
    assert f"{mdm['bootstrap_dropped']} dropped" in fit.report(result)
    # Nothing left to fit: no interval, said so, and no crash.
    three = [r for r in rows if r["family"] == "arm" or factor(r) < 2]
    result = fit.fit(three, bootstrap=20, seed=0)
    assert result["families"]["mdm"]["alpha_interval"] is None
    assert result["families"]["mdm"]["bootstrap_dropped"] == 20
    assert result["multipliers"]["mdm/arm"]["bootstrap_interval"] is None
    assert "no 95% bootstrap: every resample dropped" in fit.report(result)


def _with_loss_se(src, dst, se):
    """src's results with a loss_se column: se(row) as text."""
    rows = list(csv.DictReader(open(src)))
    with open(dst, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys() - {"loss_se"}, "loss_se"])
        writer.writeheader()
        writer.writerows(r | {"loss_se": se(r)} for r in rows)


def test_loss_se_is_optional_and_widens_the_bootstrap(tmp_path):
    path = tmp_path / "results.csv"
    _synthetic(path, alpha=0.062, beta={"mdm": 0.63, "arm": 0.58}, multiplier=16.0, noise=1e-4)
    old = tmp_path / "old.csv"  # as written before the column existed
    with open(old, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c in sweep.RESULT_COLUMNS
                                               if c != "loss_se"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv.DictReader(open(path)))
    assert "loss_se" not in open(old).readline()
    zeros = tmp_path / "zeros.csv"
    _with_loss_se(path, zeros, lambda r: "0")
    noisy = tmp_path / "noisy.csv"
    _with_loss_se(path, noisy, lambda r: f"{3e-3 * float(r['loss']):.6g}")
    assert all(r["loss_se"] == 0.0 for r in fit.read_results(str(old)))
    fits = {name: _bootstrap_fit(p, replicates=100)
            for name, p in [("old", old), ("empty", path), ("zeros", zeros), ("noisy", noisy)]}
    # Absent, empty or 0: no evaluation noise, the same resamples and the same intervals.
    assert fit.public(fits["old"]) == fit.public(fits["empty"]) == fit.public(fits["zeros"])
    assert fits["noisy"]["bootstrap"]["loss_se"] and not fits["old"]["bootstrap"]["loss_se"]
    assert "Normal(loss, loss_se)" in fit.report(fits["noisy"])
    for family in ("mdm", "arm"):
        quiet, noisy_fam = fits["old"]["families"][family], fits["noisy"]["families"][family]
        assert noisy_fam["alpha"] == quiet["alpha"]  # the point fit ignores loss_se
        assert _width(noisy_fam["alpha_interval"]) > 3 * _width(quiet["alpha_interval"])
    bad = tmp_path / "bad.csv"
    _with_loss_se(path, bad, lambda r: "-0.1")
    with pytest.raises(plan.StudyError, match=r"line 2: loss_se '-0.1' is not a number >= 0"):
        fit.read_results(str(bad))


def _same(committed, ours, where="fit.json"):
    """Every value in the committed JSON is ours (ours may hold more keys)."""
    if isinstance(committed, dict):
        for key, value in committed.items():
            assert key in ours, f"{where}: {key} missing"
            _same(value, ours[key], f"{where}.{key}")
    elif isinstance(committed, list):
        assert len(committed) == len(ours), where
        for i, (a, b) in enumerate(zip(committed, ours, strict=True)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert committed == ours, where


@pytest.mark.parametrize("study", ["micro", "micro_families"])
def test_committed_results_without_loss_se_fit_as_before(study):
    """The committed results.csv files predate loss_se: same minima, laws and multipliers as
    the fit.json committed beside them."""
    folder = os.path.join(ROOT, "experiments", "results", study)
    assert "loss_se" not in open(os.path.join(folder, "results.csv")).readline()
    result = fit.fit(fit.read_results(os.path.join(folder, "results.csv")), bootstrap=20)
    ours = json.loads(json.dumps(fit.public(result)))
    _same(json.load(open(os.path.join(folder, "fit.json"))), ours)
    assert all(k["bootstrap_interval"] for k in ours["multipliers"].values())


def test_the_second_study_fits_as_committed():
    """experiments/results/micro_v2: its fit.json is the CLI's fit (1000 resamples, seed 0) of
    the results.csv beside it, intervals and 1% sensitivities included."""
    folder = os.path.join(ROOT, "experiments", "results", "micro_v2")
    rows = fit.read_results(os.path.join(folder, "results.csv"))
    assert all(r["loss_se"] > 0 for r in rows if r["family"] != "arm")
    ours = json.loads(json.dumps(fit.public(fit.fit(rows, bootstrap=1000, seed=0))))
    _same(json.load(open(os.path.join(folder, "fit.json"))), ours)


def test_collect_fills_loss_se_from_the_final_eval_row(tmp_path):
    from mdm_jax.metrics import MetricWriter

    config = write_study(tmp_path / "study.py", {"grid": ("2e11: 4K,13K,27K",),
                                                 "sweep_dir": str(tmp_path / "sweep")})
    runs = {r.preset: r for r in plan.expand(_load(config))}
    for preset, metrics in [("4K", {"loss": 5.25, "loss_se": 0.0123}), ("13K", {"loss": 5.0})]:
        run = runs[preset]
        writer = MetricWriter(run.workdir, enabled=True)
        writer.write(run.steps // 2, {"loss": 6.0, "loss_se": 0.5}, prefix="eval_")
        writer.write(run.steps, metrics, prefix="eval_")  # as the trainer logs its last eval
        writer.close()
    path = tmp_path / "results.csv"
    written, missing, _, _ = sweep.collect(list(runs.values()), str(path))
    assert (written, [r.preset for r in missing]) == (2, ["27K"])
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == list(sweep.RESULT_COLUMNS)
    # The 13K run's trainer logged no standard error: empty, so its row still collects.
    assert [(r["preset"], r["loss"], r["loss_se"]) for r in rows] == [
        ("4K", "5.250000", "0.0123"), ("13K", "5.000000", "")]
    assert [r["loss_se"] for r in fit.read_results(str(path))] == [0.0123, 0.0]


def test_collect_keeps_the_rows_no_workdir_replaces(tmp_path):
    """A results file holds what was trained, on this machine or another: collecting rewrites
    a row only where a workdir here holds that run, finished or diverged."""
    from mdm_jax.metrics import MetricWriter

    config = write_study(tmp_path / "study.py", {"grid": ("2e11: 4K,13K,27K",),
                                                 "sweep_dir": str(tmp_path / "sweep")})
    runs = {r.preset: r for r in plan.expand(_load(config))}
    for preset, loss in [("4K", 5.25), ("27K", float("nan"))]:
        writer = MetricWriter(runs[preset].workdir, enabled=True)
        writer.write(runs[preset].steps, {"loss": loss}, prefix="eval_")
        writer.close()
    path = tmp_path / "results.csv"
    header = ",".join(sweep.RESULT_COLUMNS)
    path.write_text(f"{header}\n"
                    "mdm,4K,4144,2e+11,10,100,9.000000,0.1\n"  # replaced: its workdir finished
                    "mdm,13K,13408,2e+11,10,100,4.900000,0.01\n"  # trained elsewhere: kept
                    "mdm,27K,27000,2e+11,10,100,4.800000,\n"  # its rerun diverged: dropped
                    "arm,4K,4144,8e+11,10,100,4.000000,0\n")  # another budget: kept
    out = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--collect-only",
               f"--results={path}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "wrote 3 result(s)" in out.stdout and "(2 kept from the file" in out.stdout
    rows = [(r["family"], r["preset"], r["budget"], r["loss"], r["loss_se"])
            for r in csv.DictReader(open(path))]
    assert rows == [("mdm", "4K", "2e+11", "5.250000", ""),
                    ("mdm", "13K", "2e+11", "4.900000", "0.01"),
                    ("arm", "4K", "8e+11", "4.000000", "0")]
    assert [r["budget"] for r in fit.read_results(str(path))] == [2e11, 2e11, 8e11]
    # Collecting again changes nothing; a file that is not a results file is refused.
    again = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--collect-only",
                 f"--results={path}")
    assert again.returncode == 0 and [
        (r["family"], r["preset"], r["budget"], r["loss"], r["loss_se"])
        for r in csv.DictReader(open(path))] == rows
    other = tmp_path / "notes.csv"
    other.write_text("name,value\nx,1\n")
    bad = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--collect-only",
               f"--results={other}")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") \
        and "is not a results file" in bad.stderr, bad.stderr
    assert other.read_text() == "name,value\nx,1\n"


def _sweep_study(tiny_data, tmp_path, presets="13K,27K", budget_steps=6, extra=()):
    """Real nano-sized runs (the micro family's 13K and 27K) on the test corpus; the 27K run
    trains for `budget_steps`. Without tiny_data, runs with no data (for sweeps that must not
    start a trainer, or whose trainers fail)."""
    p = get_preset("27K")
    budget = budget_steps * flops.train_flops_per_token(p, 64) * 8 * 64
    data = (f"data.train_dir={tiny_data['train']}", f"data.eval_dir={tiny_data['validation']}",
            f"data.tokenizer={tiny_data['tokenizer']}") if tiny_data else ()
    return write_study(tmp_path / "study.py", {
        "grid": (f"{budget!r}: {presets}",), "batch": 8, "seq_len": 64,
        "sweep_dir": str(tmp_path / "sweep"),
        "overrides": (*data, "data.eval_batches=2", "checkpoint_every=2", "log_every=2",
                      *extra)})


@pytest.mark.slow
def test_sweep_runs_skips_finished_and_resumes_interrupted(tiny_data, tmp_path):
    config = _sweep_study(tiny_data, tmp_path)
    runs = {r.preset: r for r in plan.expand(_load(config))}
    small, big = runs["13K"], runs["27K"]
    assert big.steps == 6 and small.steps > big.steps
    # An interrupted run: the 27K run trained for 2 of its steps and checkpointed.
    args = sweep.train_args(_load(config), big) + ["--config.steps=2"]
    first = subprocess.run([sys.executable, "-m", "mdm_jax.train", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert sweep.status(big) == "resume from step 2"

    results = tmp_path / "results.csv"
    out = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--results", str(results))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 runs, 0 finished, 2 to launch" in out.stdout
    assert re.search(r"\[1/2\] done  mdm-13K-.*; ETA \d+ min for 1 more", out.stdout), out.stdout
    assert re.search(r"\[2/2\] done  mdm-27K-[^;]*$", out.stdout, re.M), out.stdout
    with open(os.path.join(big.workdir, "train.log")) as f:
        assert f"resumed from {os.path.abspath(big.workdir)}/checkpoints/2" in f.read()
    rows = list(csv.DictReader(open(results)))
    assert [r["preset"] for r in rows] == ["13K", "27K"]
    assert [int(r["steps"]) for r in rows] == [small.steps, big.steps]
    assert all(float(r["loss"]) > 0 for r in rows)
    assert float(rows[1]["loss"]) == pytest.approx(sweep.final_loss(big), abs=1e-6)

    metrics = open(os.path.join(small.workdir, "metrics.jsonl")).read()
    again = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--results", str(results))
    assert again.returncode == 0 and "2 runs, 2 finished, 0 to launch" in again.stdout
    assert open(os.path.join(small.workdir, "metrics.jsonl")).read() == metrics  # not rerun


def test_a_local_sweep_exits_1_when_a_run_fails(tmp_path):
    # The trainer refuses its config: the run fails, and so must the sweep's exit code.
    config = _sweep_study(None, tmp_path, "27K", extra=("preemption_exit_code=300",))
    out = _cli("mdm_jax.scaling.sweep", f"--config={config}")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"\[1/1\] FAILED mdm-27K-\S+ \(exit 2\)", out.stdout), out.stdout
    assert "1 run(s) failed: mdm-27K-" in out.stdout


def _holder(*code: str) -> subprocess.Popen:
    """A real process that runs `code`, says 'held' and keeps what it took until its stdin
    closes."""
    script = "\n".join([*code, "print('held', flush=True)", "sys.stdin.read()"])
    proc = subprocess.Popen([sys.executable, "-c", "import sys\n" + script], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def _let_go(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_a_run_busy_elsewhere_is_running_not_failed_new_or_relaunched(tmp_path):
    config = _sweep_study(None, tmp_path, "27K")
    (run,) = plan.expand(_load(config))
    log = os.path.join(run.workdir, "train.log")
    # An orphan trainer (or one started by hand) holds the run's workdir lock.
    trainer = _holder("from mdm_jax.run_lock import WorkdirLock",
                      f"lock = WorkdirLock({run.workdir!r})", "lock.acquire()")
    try:
        shown = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--status")
        assert re.search(rf"^{re.escape(run.run_id)} +running \(pid {trainer.pid} on ",
                         shown.stdout, re.M), shown.stdout
        out = _cli("mdm_jax.scaling.sweep", f"--config={config}")
    finally:
        _let_go(trainer)
    assert out.returncode == sweep.EX_TEMPFAIL, out.stdout + out.stderr
    assert "1 runs, 0 finished, 1 running elsewhere, 0 to launch" in out.stdout
    assert f"1 run(s) running elsewhere, not finished yet: {run.run_id} (pid {trainer.pid} on " \
        in out.stdout
    assert "FAILED" not in out.stdout and "] start " not in out.stdout
    assert not os.path.exists(log)
    # Its lock file stays behind; only a live holder makes a run busy.
    assert os.path.exists(os.path.join(run.workdir, ".lock")) and sweep.status(run) == "new"

    # Another sweep is starting the run: it holds the run's log, its trainer has no lock yet.
    os.makedirs(run.workdir, exist_ok=True)
    other = _holder("import fcntl", f"log = open({log!r}, 'a')",
                    "fcntl.flock(log, fcntl.LOCK_EX)")
    try:
        out = _cli("mdm_jax.scaling.sweep", f"--config={config}")
    finally:
        _let_go(other)
    assert out.returncode == sweep.EX_TEMPFAIL, out.stdout + out.stderr
    assert f"[1/1] skip  {run.run_id}: running elsewhere (another sweep is starting it)" \
        in out.stdout
    assert "FAILED" not in out.stdout and os.path.getsize(log) == 0  # one writer per log


def _wait_for(condition, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)  # polling a file or a lock another process writes


@pytest.mark.slow
def test_a_killed_sweep_takes_its_trainer_down_and_a_second_sweep_leaves_it_alone(
        tiny_data, tmp_path):
    config = _sweep_study(tiny_data, tmp_path, "27K", budget_steps=100_000)
    (run,) = plan.expand(_load(config))
    first = subprocess.Popen([sys.executable, "-m", "mdm_jax.scaling.sweep",
                              f"--config={config}"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    trainer = None
    try:
        metrics = os.path.join(run.workdir, "metrics.jsonl")
        _wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0,
                  "the first sweep's trainer to log a step")
        with open(os.path.join(run.workdir, ".lock")) as f:
            trainer = json.load(f)["pid"]
        second = _cli("mdm_jax.scaling.sweep", f"--config={config}")
        assert second.returncode == sweep.EX_TEMPFAIL, second.stdout + second.stderr
        assert f"{run.run_id} is running elsewhere (pid {trainer} on " in second.stdout
        assert "FAILED" not in second.stdout
        first.kill()  # SIGKILL: the sweep cannot pass anything on
        first.wait()
        pidfd = os.pidfd_open(trainer)  # not our child: wait on its pidfd
        exited = select.select([pidfd], [], [], 300)[0]
        os.close(pidfd)
        assert exited, "the killed sweep's trainer is still training"
        trainer = None
    finally:
        if first.poll() is None:
            first.kill()
        if trainer is not None:  # an orphan: do not leave it running after the test
            os.kill(trainer, signal.SIGKILL)
    # The kernel sent it SIGTERM, as Ctrl-C would have: it saved, and a rerun resumes it.
    text = open(os.path.join(run.workdir, "train.log")).read()
    saved = re.search(r"\[mdm_jax\] preempted \(SIGTERM\): saved step (\d+) ", text)
    assert saved, text[-2000:]
    assert sweep.status(run) == f"resume from step {saved[1]}"
    assert run_lock.holder(run.workdir) is None
    assert "another trainer is using" not in text  # the second sweep wrote nothing there


def _load(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_sweep_dry_runs_render_each_backend(tiny_data, tmp_path):
    config = _sweep_study(tiny_data, tmp_path)
    local = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--dry-run")
    assert local.returncode == 0, local.stderr
    # the local backend runs trainers with the base config's absolute path (from any cwd)
    base = os.path.join(ROOT, "experiments", "micro.py")
    assert f"-m mdm_jax.train --config={base}:13K,mdm" in local.stdout
    assert "--config.steps=" in local.stdout and "--config.global_batch=8" in local.stdout
    slurm = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--backend", "slurm",
                 "--dry-run", "--config.slurm.nodes=4", "--config.slurm.partition=h100")
    assert "sbatch --job-name=mdm-mdm-27k-" in slurm.stdout
    assert "--nodes=4 --gpus-per-node=8" in slurm.stdout and "--partition=h100" in slurm.stdout
    assert "launch/slurm.sbatch --config=experiments/micro.py:27K,mdm" in slurm.stdout
    # Under the xpk backend a path inside the container dies with the pod: gs:// is required.
    local_dir = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--backend", "tpu",
                     "--dry-run", "--config.sweep_dir=runs/sweep")
    assert local_dir.returncode == 2 and local_dir.stderr.strip().startswith(
        "error: sweep_dir='runs/sweep' is a path inside each xpk container")
    # An absolute path: the mount point of an xpk storage (gs:// sweeps: tests/test_gcs.py).
    tpu = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--backend", "tpu", "--dry-run",
               "--config.sweep_dir=/mnt/ckpt/sweep", "--config.tpu.storage=ckpt")
    assert tpu.returncode == 0, tpu.stderr
    assert "bash launch/tpu.sh xpk mdm-mdm-13k-" in tpu.stdout
    assert "TPU_TYPE=v5p-64" in tpu.stdout and "TPU_STORAGE=ckpt" in tpu.stdout
    assert "--config.workdir=/mnt/ckpt/sweep/mdm-13K-" in tpu.stdout
    assert not os.path.exists(tmp_path / "sweep")  # a dry run creates nothing
    assert "13K" in PRESETS
