"""End to end on a real prepared corpus: loss falls, metrics and checkpoints are written, resume."""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest
from conftest import nano_config

from mdm_jax.train import train


def _config(tiny_data, workdir, **overrides):
    base = {"data.train_dir": tiny_data["train"], "data.eval_dir": tiny_data["validation"],
            "data.tokenizer": tiny_data["tokenizer"], "data.eval_batches": 2,
            "workdir": str(workdir)}
    return nano_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    c = _config(tiny_data, workdir, steps=60, log_every=5, eval_every=30,
                **{"samples.count": 2, "samples.steps": 8, "mesh.data": 2, "mesh.fsdp": 2})
    return c, train(c)


def test_short_run_drives_loss_down(trained):
    _, result = trained
    evals = [e["eval_loss"] for e in result.eval_history]
    assert [e["step"] for e in result.eval_history] == [0, 30, 60]
    assert evals[-1] < 0.75 * evals[0], evals  # the untrained model scores ~log(512) = 6.2
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    assert all(h["tokens_per_s"] > 0 and h["flops_per_s"] > 0 for h in result.history)


def test_metrics_checkpoint_and_samples_written(trained):
    c, result = trained
    rows = [json.loads(line) for line in open(os.path.join(c.workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 61, 5))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "mfu"} <= set(train_rows[0])
    assert any("eval_loss" in r for r in rows)
    assert glob.glob(os.path.join(c.workdir, "tensorboard", "events.out.tfevents.*"))
    assert os.path.isdir(os.path.join(c.workdir, "checkpoints", "60", "state"))
    assert len(result.samples) == 2 and all(isinstance(s, str) for s in result.samples)
    # Beside them on disk: the samples as text and the run's curves (mdm_jax.plot).
    text = open(os.path.join(c.workdir, "samples.txt")).read()
    assert text.count("--- sample ") == 2 and result.samples[1].strip() in text
    assert open(os.path.join(c.workdir, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_reads_the_run_and_draws_it_and_a_sweeps_runs(trained, tmp_path, capsys):
    import matplotlib.image

    from mdm_jax import plot
    from mdm_jax.scaling.plan import Run
    from mdm_jax.scaling.sweep import show_status
    from mdm_jax.trainer import Trainer

    c, result = trained
    curves = plot.read_run(c.workdir)
    assert [s for s, _, _ in curves.train] == [h["step"] for h in result.history]
    assert [v for _, v, _ in curves.evals] == [e["eval_loss"] for e in result.eval_history]
    assert all(se is not None and se > 0 for _, _, se in curves.evals)  # 2 draws per batch
    assert curves.flops_per_step == pytest.approx(Trainer(c).train_flops_per_step(), rel=1e-9)
    out = tmp_path / "curves.png"
    plot.cli([c.workdir, c.workdir, "--out", str(out), "--labels", "a,b"])
    height, width, _ = matplotlib.image.imread(str(out)).shape
    assert width > height > 0
    with pytest.raises(SystemExit) as bad:
        plot.cli([str(tmp_path / "none"), "--out", str(tmp_path / "x.png")])
    assert bad.value.code == 2 and "give a training run's workdir" in capsys.readouterr().err
    runs = [Run("mdm", "nano", 1, 1e12, 60, 1, 1.0, 1.0, f"mdm-nano-{i}", w)
            for i, w in enumerate((c.workdir, str(tmp_path / "not-started")))]
    show_status(runs, str(tmp_path / "sweep.png"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["mdm-nano-0", "finished"] and "new" in lines[1]
    assert "(1 runs)" in lines[-1] and (tmp_path / "sweep.png").exists()


def test_rerun_of_finished_run_resumes_and_does_nothing(trained):
    c, first = trained
    again = train(c)
    assert again.history == [] and int(again.state.step) == 60
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(again.state.params)),
                    jax.tree_util.tree_leaves(jax.device_get(first.state.params)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stop_and_resume_is_bitwise_identical(tiny_data, tmp_path):
    """10 steps + resume to 20 == 20 uninterrupted steps, data order included."""
    straight = train(_config(tiny_data, tmp_path / "a", steps=20, **{"data.eval_dir": ""}))
    interrupted = train(_config(tiny_data, tmp_path / "b", steps=20, **{"data.eval_dir": ""}),
                        stop_at=10)
    assert int(interrupted.state.step) == 10
    resumed = train(_config(tiny_data, tmp_path / "b", steps=20, **{"data.eval_dir": ""}))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[-2:]]
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(resumed.state.params)),
                    jax.tree_util.tree_leaves(jax.device_get(straight.state.params)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_data_that_does_not_match_the_model_is_rejected(tiny_data, tmp_path):
    from mdm_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"seq_len 64 but config.seq_len=32"):
        train(_config(tiny_data, tmp_path, seq_len=32))
    with pytest.raises(ConfigError, match=r"vocabulary of 512 but the model has vocab_size 256"):
        train(_config(tiny_data, tmp_path, **{"model.vocab_size": 256}))


def test_the_cross_entropy_mdm_trains_from_the_same_cli_and_reports_the_elbo(tiny_data, tmp_path):
    c = _config(tiny_data, tmp_path, steps=30, log_every=1, eval_every=30,
                **{"objective.kind": "mdm-ce", "samples.count": 1, "samples.steps": 4})
    result = train(c)
    evals = [e["eval_loss"] for e in result.eval_history]
    assert evals[-1] < evals[0] and all(np.isfinite(evals))
    # Its training loss is the mean CE over masked tokens: near ln(512) at the start, with no
    # 1/p blow-ups (the ELBO's first losses swing with small t).
    assert abs(result.history[0]["loss"] - np.log(512)) < 0.5


def test_profile_steps_write_a_trace_tensorboard_reads(tiny_data, tmp_path):
    c = _config(tiny_data, tmp_path, steps=6, log_every=3, checkpoint_every=0,
                **{"data.eval_dir": "", "profile.steps": "3,4"})
    train(c)
    traces = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1  # one window, one host
    with open(traces[0], "rb") as f:
        data = f.read()
    assert len(data) > 1000 and b"train" in data  # the steps are annotated for the plugin


@pytest.mark.parametrize("spec, match", [
    ("3", None), ("4,2", "need 1 <= FIRST <= LAST"), ("a,b", "give 'FIRST,LAST'"),
    ("50,60", "starts after the last step"),
])
def test_profile_steps_are_validated(spec, match):
    from mdm_jax.config import ConfigError, validate

    c = nano_config(**{"profile.steps": spec})
    if match is None:
        validate(c, 8)
    else:
        with pytest.raises(ConfigError, match=match):
            validate(c, 8)


def test_auto_micro_batch_and_remat_resolve_before_training_and_are_saved(tiny_data, tmp_path,
                                                                          capsys):
    """On CPU (no memory limit) auto means no accumulation and no remat; the run's saved
    config holds the resolved values, not "auto"."""
    c = _config(tiny_data, tmp_path, steps=2, checkpoint_every=2,
                **{"data.eval_dir": "", "micro_batch": "auto", "model.remat": "auto"})
    train(c)
    assert "[autofit] cpu reports no memory limit: micro_batch 16, remat none" in (
        capsys.readouterr().out)
    saved = json.loads((tmp_path / "checkpoints" / "2" / "config" / "metadata").read_text())
    assert (saved["micro_batch"], saved["model"]["remat"]) == (0, "none")
