"""Every family through the whole product: train (with validation, task accuracy and samples as
hooks), sample from the CLI, evaluate text, score a harness request, export and import back (or
the family's named refusal). A family that is only half wired fails here."""

from __future__ import annotations

import json
import math
import os
import types

import jax
import numpy as np
import pytest
from conftest import nano_config

from mdm_jax import families
from mdm_jax.families import FAMILIES, FamilyError


def test_every_consumer_table_has_every_family():
    from mdm_jax.eval.likelihood import GREEDY, SCORERS
    from mdm_jax.export.layouts import FORMATS
    from mdm_jax.inference import SAMPLERS
    from mdm_jax.objectives import OBJECTIVES

    for table in (OBJECTIVES, SAMPLERS, SCORERS, GREEDY):
        assert tuple(table) == FAMILIES
    from mdm_jax.sft_objectives import SFT_OBJECTIVES

    for f in families.RECORDS:
        assert set(f.export_formats) <= set(FORMATS) and f.estimators
        assert (f.name in SFT_OBJECTIVES) == f.finetuning
        assert set(f.compare_with) <= set(FAMILIES) and f.name not in f.compare_with
    with pytest.raises(FamilyError, match="unknown family 'esolm'; the families are: mdm, "):
        families.get("esolm")


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tiny_data, tmp_path_factory):
    from mdm_jax.train import Hook, train

    family = families.get(request.param)
    root = tmp_path_factory.mktemp(f"family_{family.name}")
    task = root / "cloze.jsonl"
    task.write_text("\n".join(json.dumps(q) for q in (
        {"context": "the king said", "choices": [" to the queen", " xq zz"], "answer": 0},
        {"context": "good night", "choices": [" qz", " and good day"], "answer": 1})) + "\n")
    c = nano_config(**{
        "objective.kind": family.name, "data.train_dir": tiny_data["train"],
        "data.eval_dir": tiny_data["validation"], "data.tokenizer": tiny_data["tokenizer"],
        "data.eval_batches": 1, "data.eval_tasks": str(task), "workdir": str(root / "run"),
        "steps": 2, "eval_every": 2, "checkpoint_every": 2, "samples.count": 1,
        "samples.steps": 4, "samples.length": 12})
    steps_seen = Hook(lambda trainer, state: {"probe": float(state.step)}, every=1)
    return family, str(root / "run"), train(c, hooks=(steps_seen,))


def test_trains_with_hooks_for_validation_task_accuracy_and_samples(run):
    family, _, result = run
    last = result.eval_history[-1]
    assert result.stopped is None and [e["step"] for e in result.eval_history] == [0, 1, 2]
    assert math.isfinite(last["eval_loss"]) and 0.0 <= last["eval_acc_cloze"] <= 1.0
    # a hook of the caller's runs every step on the live state (not at step 0: no at_start)
    assert [e.get("eval_probe") for e in result.eval_history] == [None, 1.0, 2.0]
    assert len(result.samples) == 1 and isinstance(result.samples[0], str)
    # a readable copy of the resolved config the checkpoints hold, at the workdir's root
    saved = json.loads(open(os.path.join(run[1], "config.json")).read())
    assert saved["objective"]["kind"] == family.name and saved["model"]["vocab_size"] == 512


# Sampler flags beyond the common ones, each with the value its default has: a flag given on
# the command line is refused by name when the family's sampler has no use for it, even at
# its default value (only flags left out are never refused).
SAMPLER_FLAGS = {"steps": ["--steps", "8"], "remasking": ["--remasking", "low_confidence"],
                 "block_length": ["--block-length", "0"], "cfg": ["--cfg", "0"],
                 "cache": ["--cache"], "kv_cache": ["--no-kv-cache"], "alpha0": ["--alpha0", "1"],
                 "reveal_order": ["--reveal-order", "front"], "forbid_ids": ["--no-eos"],
                 "last_ids": ["--end-last"]}
ESTIMATOR_FLAGS = {"mc_num": ["--mc-num", "8"], "batch_size": ["--batch-size", "8"],
                   "cfg": ["--cfg", "0"], "eps": ["--eps", "0.001"]}


def test_every_flag_is_an_option_of_some_family():
    for table, field in ((SAMPLER_FLAGS, "sampler_options"),
                         (ESTIMATOR_FLAGS, "estimator_options")):
        offered = {o for f in families.RECORDS for o in getattr(f, field)}
        assert offered == set(table), field


def test_samples_from_the_cli_and_refuses_what_its_sampler_lacks(run, capsys):
    from mdm_jax import sample

    family, workdir, _ = run
    takes = [a for name, a in SAMPLER_FLAGS.items()
             if name in family.sampler_options and name != "cache"]
    sample.cli(["--model", workdir, "--prompt", "the king", "--gen-length", "8", "--num", "1",
                *[arg for a in takes for arg in a]])
    assert "--- sample 0 ---" in capsys.readouterr().out
    lacking = [name for name in SAMPLER_FLAGS if name not in family.sampler_options]
    assert lacking  # every family lacks some (the ARM the diffusion ones, and vice versa)
    for name in lacking:
        flag = SAMPLER_FLAGS[name]
        with pytest.raises(SystemExit) as e:
            sample.cli(["--model", workdir, "--gen-length", "8", *flag])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: the {family.name} family ("), err
        assert f"has no option for its sampler ({family.sampler}) {flag[0]!r}; it has: " in err
        assert "\n" not in err and "_" not in err.split("it has: ")[1], err  # flags, not keywords
    if family.name == "arm":
        assert "it has: --no-kv-cache" in err


def test_text_evaluation_reports_the_familys_own_bound(run, tmp_path, capsys):
    from mdm_jax.eval.__main__ import cli  # python -m mdm_jax.eval

    family, workdir, _ = run
    path = tmp_path / "t.txt"
    path.write_text("The king said to the queen. Good night, sweet lady. " * 4)
    uses = [arg for name, a in ESTIMATOR_FLAGS.items() if name in family.estimator_options
            for arg in a]
    cli(["text", "--model", workdir, "--text", str(path), *uses, "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["family"] == family.name and r["estimator"] == family.estimators[0]
    assert r["bound"] is not family.exact_likelihood and r["model"] == workdir
    assert r["nll_per_token"] > 0 and math.isfinite(r["nll_per_token"])
    for name in (n for n in ESTIMATOR_FLAGS if n not in family.estimator_options):
        flag = ESTIMATOR_FLAGS[name]
        with pytest.raises(SystemExit) as e:
            cli(["text", "--model", workdir, "--text", str(path), *flag])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: the {family.name} family ("), err
        assert "has no option for its likelihood estimator" in err and repr(flag[0]) in err
    if family.name == "arm":  # --mc-num, --batch-size and --cfg: the exact likelihood has none
        assert err.endswith("it has: none")
        with pytest.raises(SystemExit):
            cli(["text", "--model", workdir, "--text", str(path), "--estimator", "mc"])
        assert "has no likelihood estimator 'mc'; it has: exact" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["texts"])
    assert e.value.code == 2 and "choose one of text, tasks, harness" in capsys.readouterr().err


def test_harness_request_scores_with_the_familys_estimator(run):
    pytest.importorskip("lm_eval", reason="the `eval` extra (bash launch/setup.sh eval)")
    from mdm_jax.eval.harness import MDMJaxLM
    from mdm_jax.eval.likelihood import Estimator, loglikelihood

    family, workdir, _ = run
    # the draws as model_args, where the family's estimator uses them (the ARM's has none)
    draws = {k: 8 for k in ("mc_num", "batch_size") if k in family.estimator_options}
    lm = MDMJaxLM(model=workdir, greedy_check="never",
                  **{"mc_batch_size" if k == "batch_size" else k: v for k, v in draws.items()})
    [(logprob, greedy)] = lm.loglikelihood([types.SimpleNamespace(args=("the king", " said"))])
    direct = loglikelihood(lm.m.model, lm.m.params, *lm.pair("the king", " said"),
                           Estimator(kind=family.estimators[0], **draws))
    assert logprob == pytest.approx(direct.logprob, rel=1e-5) and logprob < 0
    assert greedy is False  # greedy_check=never skips the sampler run


def test_exports_and_imports_back_or_refuses_by_name(run, tmp_path):
    from mdm_jax.export.layouts import FORMATS
    from mdm_jax.export.load import import_checkpoint
    from mdm_jax.export.writer import export
    from mdm_jax.inference import load

    family, workdir, _ = run
    for fmt in FORMATS:
        if fmt in family.export_formats:
            continue
        with pytest.raises(FamilyError, match=f"the {family.name} family .* no export format "
                                              f"'{fmt}'; it has: "):
            export(workdir, fmt, str(tmp_path / fmt))
        assert not (tmp_path / fmt).exists()
    if not family.export_formats:
        return
    fmt = family.export_formats[0]
    export(workdir, fmt, str(tmp_path / "out"))
    # A folder like any other (not mkdtemp's 0700), holding no path of this machine.
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask
    record = json.loads((tmp_path / "out" / "mdm_jax.json").read_text())
    assert not [v for v in record.values() if isinstance(v, str) and os.path.isabs(v)], record
    import_checkpoint(fmt, str(tmp_path / "out"), str(tmp_path / "back"))
    original, back = load(workdir), load(str(tmp_path / "back"))
    assert back.args.family == family.name  # the export records its family
    for a, b in zip(jax.tree_util.tree_leaves(original.params),
                    jax.tree_util.tree_leaves(back.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
