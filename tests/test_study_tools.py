"""The second micro study's tools: its lr choice (experiments/micro_v2_lr.py), its budget-by-budget
grid (experiments/isoflop.py:micro_v2,K), its run config, and the facts tasks of the guidance
table (experiments/cfg_micro.py --tasks facts)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_results(path, losses: dict) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["family", "preset", "loss"])
        w.writeheader()
        for (family, preset), loss in losses.items():
            w.writerow({"family": family, "preset": preset, "loss": loss})
    return str(path)


def test_the_lr_choice_takes_the_lowest_mean_loss_and_flags_an_edge(tmp_path):
    choose = experiment("micro_v2_lr").choose
    def curve(mdm13, mdm40, arm13, arm40):
        return {("mdm", "13K"): mdm13, ("mdm", "40K"): mdm40, ("arm", "13K"): arm13,
                ("arm", "40K"): arm40}

    curves = {  # mdm: best at 6e-3 (inside); arm: best at the largest lr (the edge)
        3e-3: curve(4.10, 4.00, 3.6, 3.5),
        6e-3: curve(4.00, 3.95, 3.5, 3.4),
        1.2e-2: curve(4.05, 3.99, 3.4, 3.3),
    }
    tables = {lr: write_results(tmp_path / f"{lr}.csv", c) for lr, c in curves.items()}
    chosen, lines = choose(tables)
    assert chosen == {"mdm": 6e-3, "arm": 1.2e-2}
    assert lines[-1] == "not bracketed: arm"
    # An lr where a size diverged (no row) cannot win, however good its other size.
    curves[6e-3] = {("mdm", "13K"): 3.0, ("arm", "13K"): 3.5, ("arm", "40K"): 3.4}
    tables[6e-3] = write_results(tmp_path / "d.csv", curves[6e-3])
    chosen, lines = choose(tables)
    assert chosen["mdm"] == 1.2e-2 and "diverged" in lines[1]


def test_the_study_runs_budget_by_budget_and_its_runs_read_the_chosen_lr(tmp_path, monkeypatch):
    from mdm_jax.scaling.plan import StudyError, expand, parse_grid

    isoflop = experiment("isoflop")
    full = isoflop.get_config("micro_v2")
    budgets = sorted({b for b, _, _ in parse_grid(full.grid)})
    assert len(budgets) >= 4 and budgets[-1] / budgets[0] >= 10 ** 1.3 and full.batch == 64
    two = isoflop.get_config("micro_v2,2")
    assert {b for b, _, _ in parse_grid(two.grid)} == set(budgets[:2])
    assert two.sweep_dir == full.sweep_dir  # one folder, budget by budget
    # Rows for some families only: each family's runs at a budget are its own row's sizes.
    runs = expand(full)
    top = {f: sorted(r.non_embedding_params for r in runs
                     if r.family == f and r.budget == budgets[-1]) for f in ("mdm", "arm")}
    assert top["arm"][0] > top["mdm"][0] and top["arm"][-1] > top["mdm"][-1]
    assert {r.family for r in runs if r.budget == budgets[-1]} == {"mdm", "arm"}
    assert {r.family for r in runs if r.budget == budgets[1]} == {
        "mdm", "mdm-ce", "uniform", "eso", "arm"}
    for bad, needle in (("1e12 [mdm: 4K", "must read"), ("1e12 [mdn]: 4K", "names 'mdn'")):
        with pytest.raises(StudyError, match=needle):
            parse_grid([bad])
    lr_study = isoflop.get_config("micro_v2_lr,0.006")
    assert "optim.lr=0.006" in lr_study.overrides and lr_study.sweep_dir.endswith("lr_0.006")
    micro_v2 = experiment("micro_v2")
    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"lr": {"mdm": 0.006, "arm": 0.024}}))
    monkeypatch.setattr(micro_v2, "CHOSEN", str(chosen))
    c = micro_v2.get_config("40K,arm")
    assert (c.optim.lr, c.optim.min_lr) == (0.024, pytest.approx(0.0024))
    assert c.objective.t_sampling == "antithetic" and c.data.eval_masking == "count"
    assert c.data.eval_draws >= 2 and not c.eval_at_start
    monkeypatch.setattr(micro_v2, "CHOSEN", str(tmp_path / "absent.json"))
    assert micro_v2.get_config("40K,mdm").optim.lr == 1e-2  # before the sweep


def test_the_facts_tasks_hold_one_true_answer_among_four_choices(tmp_path):
    cfg = experiment("cfg_micro")
    cfg.build_facts(str(tmp_path))
    for task in cfg.FACTS_TASKS:
        rows = [json.loads(line) for line in open(tmp_path / f"{task}.jsonl")]
        assert len(rows) == 100
        for r in rows:
            assert len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4
        assert f"task: {task}" in (tmp_path / f"{task}.yaml").read_text()
    facts = experiment("reverse_curse").make_facts(100, 0)
    place = [json.loads(line) for line in open(tmp_path / "facts_place.jsonl")]
    assert [r["choices"][r["answer"]] for r in place] == [f" {f['place']}." for f in facts]
    change, se = cfg.paired([1, 0, 0, 1], [1, 1, 0, 1])
    assert change == 0.25 and se == pytest.approx(0.25)
