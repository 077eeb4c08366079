"""The IsoFLOP workflow: plan numbers, sweep skip/resume on real tiny runs, fits on
synthetic results with known exponents, launcher dry runs, and bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_study

from mdm_jax import flops
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
    with pytest.raises(plan.StudyError, match=r"mdm: 2 budget\(s\); the scaling fits need 3"):
        fit.fit([r for r in rows if r["budget"] < 1e12])


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
        fit.readable_log_ticks(fig)
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


def _sweep_study(tiny_data, tmp_path):
    """Two real nano-sized runs (the micro family's 13K and 27K) on the test corpus."""
    budget_steps = 6
    p = get_preset("27K")
    budget = budget_steps * flops.train_flops_per_token(p, 64) * 8 * 64
    return write_study(tmp_path / "study.py", {
        "grid": (f"{budget!r}: 13K,27K",), "batch": 8, "seq_len": 64,
        "sweep_dir": str(tmp_path / "sweep"),
        "overrides": (f"data.train_dir={tiny_data['train']}",
                      f"data.eval_dir={tiny_data['validation']}",
                      f"data.tokenizer={tiny_data['tokenizer']}",
                      "data.eval_batches=2", "checkpoint_every=2", "log_every=2")})


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
