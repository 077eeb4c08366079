"""User mistakes at the command line: one `error:` line and exit code 2; one `--model` flag
with its old names; diverged or malformed sweep results, legacy imports, sampling limits.

One tiny checkpoint serves the whole module (random weights saved by the trainer's own
Checkpointer with the run's config and tokenizer: the CLIs read it exactly as a trained run's).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import SEQ_LEN, nano_config, write_study

from mdm_jax.scaling import plan, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 5  # the step the module's checkpoint is saved at


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "MDM_JAX_DEBUG": ""})


def _load_study(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    """A nano MDM run workdir with one checkpoint (step 5), trained on seq_len 64."""
    from mdm_jax.checkpoint import Checkpointer
    from mdm_jax.trainer import Trainer, resolved_config

    workdir = tmp_path_factory.mktemp("cli_run")
    c = nano_config(**{"mesh.data": 1, "workdir": str(workdir),
                       "data.tokenizer": tiny_data["tokenizer"]})
    trainer = Trainer(c, devices=jax.devices()[:1])
    state = trainer.create_state(seed=0)
    ckpt = Checkpointer(c.workdir)
    ckpt.save(STEP, state, None, resolved_config(c, trainer), {"preset": "nano"}, force=True)
    ckpt.close()
    return str(workdir)


# ---- item 6: sweep collection of diverged runs and malformed metrics rows ------------------

def _study(tmp_path, presets: str):
    config = write_study(tmp_path / "study.py", {"grid": (f"2e11: {presets}",),
                                                 "sweep_dir": str(tmp_path / "sweep")})
    runs = {r.preset: r for r in plan.expand(_load_study(config))}
    return config, runs


def _metrics(run, rows: list[tuple[int, dict]]):
    """A metrics.jsonl written by the trainer's MetricWriter: (step, metrics) rows, eval rows
    given as {"eval_loss": x}."""
    from mdm_jax.metrics import MetricWriter

    writer = MetricWriter(run.workdir, enabled=True)
    for step, values in rows:
        if "eval_loss" in values:
            writer.write(step, {"loss": values["eval_loss"]}, prefix="eval_")
        else:
            writer.write(step, values)
    writer.close()


def test_sweep_reports_diverged_runs_apart_and_does_not_relaunch_them(tmp_path):
    config, runs = _study(tmp_path, "4K,13K,27K")
    ok, nan_run, inf_run = runs["4K"], runs["13K"], runs["27K"]
    _metrics(ok, [(ok.steps, {"loss": 5.0}), (ok.steps, {"eval_loss": 5.25})])
    _metrics(nan_run, [(nan_run.steps, {"loss": float("nan")}),
                       (nan_run.steps, {"eval_loss": float("nan")})])
    _metrics(inf_run, [(inf_run.steps, {"eval_loss": float("inf")})])
    assert "NaN" in open(os.path.join(nan_run.workdir, "metrics.jsonl")).read()

    assert [sweep.status(r) for r in (ok, nan_run, inf_run)] == [
        "finished", "diverged", "diverged"]
    assert math.isnan(sweep.final_loss(nan_run))
    results = tmp_path / "out" / "results.csv"
    out = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--collect-only",
               f"--results={results}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 runs, 1 finished, 2 diverged (not relaunched), 0 to launch" in out.stdout
    assert "wrote 1 result(s)" in out.stdout
    rows = list(csv.DictReader(open(results)))
    assert [(r["preset"], r["loss"]) for r in rows] == [("4K", "5.250000")]
    listed = list(csv.DictReader(open(tmp_path / "out" / "diverged.csv")))
    assert [(r["run_id"], r["loss"]) for r in listed] == [
        (nan_run.run_id, "nan"), (inf_run.run_id, "inf")]
    assert listed[0]["reason"] == f"final eval_loss nan at step {nan_run.steps}"
    assert listed[0]["workdir"] == nan_run.workdir
    for run in (nan_run, inf_run):
        assert f"[sweep]   {run.run_id}: final eval_loss " in out.stdout
    # Done, not resumed: a dry run has nothing to launch.
    dry = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--dry-run")
    assert dry.returncode == 0 and "mdm_jax.train" not in dry.stdout
    # Deleting a diverged run's workdir makes it new again; with none left the listing goes.
    for run in (nan_run, inf_run):
        shutil.rmtree(run.workdir)
    assert sweep.status(nan_run) == "new"
    written, missing, diverged, kept = sweep.collect(list(runs.values()), str(results))
    assert (written, len(missing), diverged, kept) == (1, 2, [], [])
    assert not (tmp_path / "out" / "diverged.csv").exists()


def test_sweep_skips_malformed_metrics_rows_with_a_warning_naming_file_and_line(tmp_path):
    config, runs = _study(tmp_path, "4K")
    run = runs["4K"]
    os.makedirs(run.workdir)
    path = os.path.join(run.workdir, "metrics.jsonl")
    good = [json.dumps({"step": 1, "loss": 6.0}),
            json.dumps({"step": run.steps, "eval_loss": 4.5})]
    bad = ["null", '"a string"', "[1, 2]", json.dumps({"step": "6", "eval_loss": 1.0}),
           json.dumps({"step": run.steps, "eval_loss": "low"}), '{"step": 3, "lo']
    # lines 1-8, then a last row cut short by a kill (no newline): tolerated silently
    lines = [good[0], *bad, good[1]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + '{"step": 9, "loss"')
    out = _cli("mdm_jax.scaling.sweep", f"--config={config}", "--collect-only")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [r["loss"] for r in rows] == ["4.500000"]  # the malformed eval_loss row is skipped
    warnings = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(warnings) == len(bad), out.stderr  # once each, though read twice
    for number in range(2, 2 + len(bad)):
        assert any(f"{path}:{number}: skipped" in w for w in warnings), (number, out.stderr)
    assert not any(f"{path}:{len(lines) + 1}" in w for w in warnings)


# ---- item 11: a legacy (non-zip) .pth imports; pickles are still refused ------------------

def test_legacy_pth_imports_through_export_load(run_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from mdm_jax.export import load
    from mdm_jax.export.writer import export
    from mdm_jax.inference import load as load_model

    export(run_dir, "litgpt", str(tmp_path / "lit"))
    state_dict = load_file(str(tmp_path / "lit" / "lit_model.safetensors"))
    (tmp_path / "legacy").mkdir()
    pth = tmp_path / "legacy" / "lit_model.pth"
    torch.save(state_dict, pth, _use_new_zipfile_serialization=False)
    with open(pth, "rb") as f:
        assert f.read(2) != b"PK"  # not a zip: the format mmap cannot read
    load.cli(["--format", "litgpt", "--model", str(pth), "--preset", "nano",
              "--out", str(tmp_path / "back")])
    assert "wrote an mdm_jax checkpoint" in capsys.readouterr().out
    original, back = load_model(run_dir), load_model(str(tmp_path / "back"))
    assert back.config.model.preset == "nano"
    a = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(original.params)))
    b = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(back.params)))
    assert a.keys() == b.keys()
    for key, value in a.items():
        np.testing.assert_array_equal(np.asarray(b[key]), np.asarray(value), err_msg=str(key))

    class Payload:  # the legacy format goes through the weights-only unpickler too
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"transformer.wte.weight": Payload()}, evil,
               _use_new_zipfile_serialization=False)
    with pytest.raises(SystemExit) as e:
        load.cli(["--format", "litgpt", "--model", str(evil), "--preset", "nano",
                  "--out", str(tmp_path / "evil_back")])
    assert e.value.code == 2
    assert "not a plain state dict" in capsys.readouterr().err


# ---- item 12: sampling options --------------------------------------------------------------

def test_sampling_validates_its_numbers_and_refuses_untrained_lengths(run_dir, tmp_path,
                                                                      capsys):
    from mdm_jax import sample as sampling

    def error(*args):
        with pytest.raises(SystemExit) as e:
            sampling.cli(["--model", run_dir, *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
        return err

    assert "--steps 0" in error("--steps", "0")
    assert error("--cfg", "-2").endswith("--cfg -2.0: give 0 (off) or a positive number")
    assert "(greedy)" in error("--temperature", "-1")
    assert "--num -2" in error("--num", "-2")
    assert "--length -1" in error("--length", "-1")
    longer = error("--length", str(2 * SEQ_LEN), "--num", "1", "--steps", "2")
    assert f"trained seq_len {SEQ_LEN}" in longer and "--allow-longer" in longer
    assert "available: 5" in error("--step", "3")
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit):
        sampling.cli(["--model", nowhere])
    assert "no checkpoint under" in capsys.readouterr().err
    assert not os.path.exists(nowhere)  # looking for a checkpoint creates nothing

    sampling.cli(["--model", run_dir, "--length", str(2 * SEQ_LEN), "--allow-longer",
                  "--num", "1", "--steps", "2"])
    assert capsys.readouterr().out.count("--- sample ") == 1


def test_a_model_without_a_tokenizer_is_named_as_such(tmp_path, capsys):
    from mdm_jax import sample as sampling
    from mdm_jax.checkpoint import Checkpointer
    from mdm_jax.data.tokenizer import Tokenizer, TokenizerNotFoundError
    from mdm_jax.export.writer import export
    from mdm_jax.trainer import Trainer, resolved_config

    with pytest.raises(TokenizerNotFoundError, match="no tokenizer given"):
        Tokenizer.load("")
    c = nano_config(**{"mesh.data": 1, "workdir": str(tmp_path / "run"), "data.tokenizer": ""})
    trainer = Trainer(c, devices=jax.devices()[:1])
    ckpt = Checkpointer(c.workdir)
    ckpt.save(STEP, trainer.create_state(seed=0), None, resolved_config(c, trainer),
              {"preset": "nano"}, force=True)
    ckpt.close()
    export(c.workdir, "litgpt", str(tmp_path / "lit"))  # (warns: it ships no tokenizer)
    assert not (tmp_path / "lit" / "tokenizer.model").exists()
    with pytest.raises(SystemExit):
        sampling.cli(["--model", str(tmp_path / "lit"), "--num", "1", "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "names no tokenizer" in err and "--tokenizer" in err


# ---- one name for the model: --model on every command, the old names for one release ------

MODEL_COMMANDS = [  # (module, arguments it requires besides the model, the model's old flag)
    ("mdm_jax.sample", [], "--workdir"),
    ("mdm_jax.eval.text", ["--text", "t.txt"], "--workdir"),
    ("mdm_jax.export.__main__", ["--format", "litgpt", "--out", "o"], "--checkpoint"),
    ("mdm_jax.export.load", ["--format", "litgpt", "--out", "o"], "--src"),
]


@pytest.mark.parametrize(("module", "required", "old"), MODEL_COMMANDS,
                         ids=[m for m, _, _ in MODEL_COMMANDS])
def test_every_command_takes_model_and_refuses_two_names(module, required, old, capsys):
    import importlib

    cli = importlib.import_module(module).cli

    def error(*args):
        with pytest.raises(SystemExit) as e:
            cli([*args, *required])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
        return err

    assert error("--model", "a", old, "b") == (
        f"error: --model and {old} name the same option ({old}: the old name of --model); give "
        f"only --model (see --help)")
    assert "the following arguments are required: --model" in error()
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert e.value.code == 0 and "--model PATH" in usage and old not in usage, usage


def test_old_model_flags_still_work_with_a_one_line_note(run_dir, tmp_path, capsys):
    """export --checkpoint, import --src, sample and eval text --workdir: each works as
    --model does, with one note naming the new flag."""
    from mdm_jax import sample
    from mdm_jax.eval import text
    from mdm_jax.export import __main__ as export_cli
    from mdm_jax.export import load

    def note(old):
        out, err = capsys.readouterr()
        assert err.count(f"note: {old} is now --model; the old name works until the next "
                         f"release\n") == 1, err
        return out

    lit, back = str(tmp_path / "lit"), str(tmp_path / "back")
    export_cli.cli(["--checkpoint", run_dir, "--format", "litgpt", "--out", lit])
    assert f"wrote litgpt export to {lit}" in note("--checkpoint")
    load.cli(["--format", "litgpt", "--src", lit, "--out", back])
    assert f"sample with `python -m mdm_jax.sample --model {back}`" in note("--src")
    sample.cli(["--workdir", back, "--prompt", "the", "--gen-length", "4", "--steps", "2",
                "--num", "1"])
    assert "--- sample 0 ---" in note("--workdir")
    (tmp_path / "t.txt").write_text("the king said to the queen")
    text.cli(["--workdir", run_dir, "--text", str(tmp_path / "t.txt"), "--mc-num", "2",
              "--batch-size", "2", "--json"])
    assert json.loads(note("--workdir"))["model"] == run_dir

    # Errors name the flag as typed: the old one while it lasts.
    for flag in ("--checkpoint", "--model"):
        with pytest.raises(SystemExit):
            export_cli.cli([flag, lit, "--format", "litgpt", "--out", str(tmp_path / "again")])
        assert f"is a litgpt export folder; export reads a training run: give {flag} " in (
            capsys.readouterr().err)
    for flag in ("--src", "--model"):
        with pytest.raises(SystemExit):
            load.cli(["--format", "litgpt", flag, str(tmp_path / "nope"), "--out", back])
        assert f"error: {flag} {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_eval_text_errors_name_the_flags_typed(run_dir, tmp_path, capsys):
    from mdm_jax.eval import text

    (tmp_path / "t.txt").write_text("the king")
    for args, needle in ((["--mc-num", "0"], "argument --mc-num: must be a positive integer"),
                         (["--batch-size", "x"], "argument --batch-size: expected a positive "
                                                 "integer, got 'x'"),
                         (["--mc-num", "6", "--batch-size", "4"],
                          "--mc-num 6 is not divisible by --batch-size 4"),
                         (["--step", "9"], "available: 5")):
        with pytest.raises(SystemExit) as e:
            text.cli(["--model", run_dir, "--text", str(tmp_path / "t.txt"), *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and needle in err, err


# ---- every CLI: one `error:` line, exit code 2 ---------------------------------------------

ISO = "--config=experiments/isoflop.py"
MICRO = "--config=experiments/isoflop.py:micro"
CASES = [
    # plan
    (["mdm_jax.scaling.plan", "--config=nope.py"], "no such file 'nope.py'"),
    (["mdm_jax.scaling.plan", ISO, "--config.gridd=x"], 'Did you mean "grid" instead of "gridd"'),
    (["mdm_jax.scaling.plan", "--config=experiments/isoflop.py:bogus"], "not 'bogus'"),
    (["mdm_jax.scaling.plan", ISO, "--accelerator=tpu9"], "'tpu9' is not a known accelerator"),
    (["mdm_jax.scaling.plan", ISO, "--mfu=0"], "--mfu=0.0"),
    (["mdm_jax.scaling.plan", ISO, "--config.batch=0"], "study.batch=0"),
    (["mdm_jax.scaling.plan", ISO, "--config.grid=('1e19: 170M,nope',)"], "unknown preset 'nope'"),
    (["mdm_jax.scaling.plan"], "--config must have a value"),
    # sweep (sweep_dir in the test's folder: nothing lands in the repository)
    (["mdm_jax.scaling.sweep", MICRO, "--collect-only", "--config.batch=0",
      "--config.sweep_dir={tmp}/sweep"], "study.batch=0"),
    (["mdm_jax.scaling.sweep", "--config=nope.py", "--collect-only"], "no such file 'nope.py'"),
    (["mdm_jax.scaling.sweep", "--config=nope.py", "--config.batch=3"], "no such file 'nope.py'"),
    (["mdm_jax.scaling.sweep", MICRO, "--config.gridd=x", "--collect-only"],
     'Did you mean "grid" instead of "gridd"'),
    (["mdm_jax.scaling.sweep", MICRO, "--config.slurm.nodez=2", "--dry-run"],
     'Did you mean "nodes"'),
    (["mdm_jax.scaling.sweep", MICRO, "--parallel=0", "--config.sweep_dir={tmp}/sweep"],
     "--parallel=0"),
    (["mdm_jax.scaling.sweep", MICRO, "--backend=foo"], "--backend=foo"),
    (["mdm_jax.scaling.sweep", MICRO, "--config.batch=abc"], "--config.batch=abc"),
    (["mdm_jax.scaling.sweep", MICRO, "--bogus"], "bogus"),
    # fit
    (["mdm_jax.scaling.fit", "--results", "{tmp}/nope.csv"], "nope.csv"),
    (["mdm_jax.scaling.fit"], "--results"),
    (["mdm_jax.scaling.fit", "--results", "{tmp}/diverged_only.csv"], "no finished runs"),
    (["mdm_jax.scaling.fit", "--results", "{tmp}/diverged_only.csv", "--plot",
      "{tmp}/no/such/fig.png"], "does not exist"),
    # flops
    (["mdm_jax.flops", "--preset", "170M", "--budget", "1e19", "--batch", "0"], "--batch 0"),
    (["mdm_jax.flops", "--preset", "170M", "--budget", "nan"], "--budget nan"),
    (["mdm_jax.flops", "--preset", "bogus", "--budget", "1e19"], "unknown preset 'bogus'"),
    (["mdm_jax.flops", "--preset", "170M", "--budget", "lots"], "invalid float value: 'lots'"),
    (["mdm_jax.flops", "--preset", "170M", "--budget", "1e10"], "less than one step"),
    # sampling
    (["mdm_jax.sample", "--model", "{run}", "--steps", "0"], "--steps 0"),
    (["mdm_jax.sample", "--model", "{run}", "--num", "-2"], "--num -2"),
    (["mdm_jax.sample", "--model", "{run}", "--length", "999"], "trained seq_len 64"),
    (["mdm_jax.sample", "--model", "{run}", "--step", "3"], "available: 5"),
    (["mdm_jax.sample", "--model", "{run}", "--seed", "-1"], "--seed -1"),
    (["mdm_jax.sample", "--model", "{run}", "--temperature", "-1"], "--temperature -1"),
    (["mdm_jax.sample", "--model", "{run}", "--num", "x"], "invalid int value: 'x'"),
    (["mdm_jax.sample", "--model", "{run}", "--tokenizer", "{tmp}/none.model"], "none.model"),
    (["mdm_jax.sample", "--model", "{tmp}/nowhere"], "no checkpoint under"),
    # export.load
    (["mdm_jax.export.load", "--format", "litgpt", "--model", "{tmp}/nope.pth", "--out",
      "{tmp}/o"], "nope.pth does not exist"),
    (["mdm_jax.export.load", "--format", "gpt2", "--model", "x", "--out", "y"],
     "invalid choice: 'gpt2'"),
    (["mdm_jax.export.load", "--format", "litgpt", "--model", "{run}", "--out", "{tmp}/o",
      "--step", "-1"], "--step -1"),
    (["mdm_jax.export.load", "--format", "litgpt", "--model", "{tmp}", "--out", "{tmp}/o"],
     "holds neither lit_model"),
    (["mdm_jax.export.load", "--format", "litgpt", "--model", "{tmp}/garbage.safetensors",
      "--out", "{tmp}/o"], "not a readable safetensors file"),
]


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_table")
    (tmp / "diverged_only.csv").write_text(
        ",".join(sweep.RESULT_COLUMNS) + "\nmdm,13K,13000,2e11,6,6144,nan\n")
    (tmp / "garbage.safetensors").write_bytes(b"\x00" * 32)
    return str(tmp)


@pytest.mark.parametrize(("argv", "expected"), CASES,
                         ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_cli_mistakes_are_one_error_line_and_exit_2(argv, expected, run_dir, table_dir):
    args = [a.format(run=run_dir, tmp=table_dir) for a in argv]
    out = _cli(*args)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert expected.format(run=run_dir, tmp=table_dir) in lines[0], lines[0]


def test_a_reader_that_stops_early_ends_the_output_quietly():
    """`python -m mdm_jax.scaling.plan ... | head`: no BrokenPipeError traceback."""
    code = ("import sys\nfrom mdm_jax.errors import run_main\n"
            "def main():\n    for i in range(10**6):\n        print('row', i)\n"
            "run_main(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"row 0\n"
    proc.stdout.close()  # the reader goes away, as `head` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err and b"Exception" not in err, err
