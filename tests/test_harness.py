"""The lm-evaluation-harness model and the batched scoring under it: a request scores the same
alone as in any batch (every family, every estimator), greedy checks and greedy generation
batch without changing an answer, the greedy check runs only where a metric reads it,
model_args errors name the key as typed, unknown keys are refused and lm-eval's own taken,
task-file mistakes are one line naming file, row and field, and the harness's CLI end to end."""

from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mdm_jax.eval.likelihood import (
    Estimator,
    EvalError,
    greedy_flags,
    is_greedy,
    loglikelihood,
    loglikelihoods,
)
from mdm_jax.model import Encoder, ModelArgs
from mdm_jax.presets import get_preset

# Requests of many lengths (widths 16 to 64 and spans 8 to 16 below the 128-token limit),
# one with an empty continuation.
RNG = np.random.default_rng(0)
REQUESTS = [([1] + RNG.integers(3, 500, n).tolist(), RNG.integers(3, 500, m).tolist())
            for n, m in ((2, 3), (0, 1), (9, 4), (20, 9), (30, 2), (40, 11), (5, 0), (3, 16))]
SEEDS = [7 + 3 * i for i in range(len(REQUESTS))]


def _model(family: str, seed: int = 0):
    args = ModelArgs.from_preset(get_preset("nano"), family=family)
    params = Encoder(args).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    # Larger weights than the initialisation, so that the masks matter to the estimates.
    params = jax.tree_util.tree_map(lambda p: p * 4.0 if p.ndim >= 2 else p, nn.unbox(params))
    return Encoder(args), params


@pytest.mark.parametrize("family,estimator", [
    ("mdm", Estimator("mc", 16, 8)), ("mdm", Estimator("llada", 16, 8, cfg=0.5)),
    ("mdm-ce", Estimator("chain", batch_size=3, cfg=0.5)), ("uniform", Estimator("mc", 16, 8)),
    ("arm", Estimator())])
def test_a_request_scores_the_same_alone_and_in_any_batch(family, estimator):
    model, params = _model(family)
    batched = loglikelihoods(model, params, REQUESTS, estimator, SEEDS, request_batch=16)
    alone = [loglikelihood(model, params, c, x, estimator, seed=s, request_batch=1)
             for (c, x), s in zip(REQUESTS, SEEDS, strict=True)]
    # another batch: the requests reversed, three chunks per call
    other = loglikelihoods(model, params, REQUESTS[::-1], estimator, SEEDS[::-1],
                           request_batch=3)[::-1]
    for b, a, o in zip(batched, alone, other, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4, rel=1e-5)
        assert o.logprob == pytest.approx(a.logprob, abs=1e-4, rel=1e-5)
        if a.draws is not None:  # every draw, not only the mean
            np.testing.assert_allclose(b.draws, a.draws, rtol=1e-5, atol=1e-4)
    assert batched[6].logprob == 0.0 and all(s.logprob < 0 for i, s in enumerate(batched)
                                             if i != 6)
    # the seed is the request's: another seed, another estimate (not for the exact ones)
    moved = loglikelihoods(model, params, REQUESTS, estimator, [s + 1 for s in SEEDS])
    exact = estimator.kind in ("chain", "")  # the chain rule and the ARM draw nothing
    assert (moved[3].logprob == pytest.approx(batched[3].logprob)) is exact


def test_the_head_read_at_the_continuation_only_agrees_with_the_full_logits():
    """uniform_chunks (the head at the continuation's span) against uniform_batch (the head at
    every position, as the exact-enumeration tests check it), draw for draw."""
    from mdm_jax.eval.uniform_likelihood import uniform_batch, uniform_chunks

    model, params = _model("uniform")
    context, continuation = REQUESTS[3]
    row = np.zeros((1, 32), np.int32)
    row[0, :len(context) + len(continuation)] = context + continuation
    c, n = len(context), len(context) + len(continuation)
    chunks = uniform_chunks(model, params, jnp.asarray(row), jnp.asarray([c]), jnp.asarray([n]),
                            jnp.asarray([5]), jnp.asarray([1]), eps=1e-3, draws=8, total=16,
                            draw_width=32, span=16)
    full = uniform_batch(model, params, jnp.asarray(np.repeat(row, 8, axis=0)), c, n,
                         jax.random.fold_in(jax.random.PRNGKey(5), 1), 8, 16, eps=1e-3)
    np.testing.assert_allclose(np.asarray(chunks[0]), np.asarray(full), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["mdm", "arm"])
def test_greedy_checks_batched_give_every_answer_of_the_one_at_a_time_check(family):
    from mdm_jax.inference import MDMSampler, generate

    model, params = _model(family, seed=1)
    requests = []
    for context, continuation in REQUESTS[:6]:  # each context's own greedy answer, and a miss
        m = max(1, len(continuation) // 2)
        answer = generate(model, params, [context], m, MDMSampler(steps=m)).answers()[0]
        requests += [(context, answer), (context, answer[:-1] + [(answer[-1] + 1) % 500])]
    flags = greedy_flags(model, params, requests, batch=4)
    assert flags == [True, False] * 6
    assert flags == [is_greedy(model, params, c, x) for c, x in requests]


# ---- the harness model on trained runs ------------------------------------------------------

# (`runs`: a trained MDM and ARM, shared with tests/test_eval.py, from conftest)

def _instance(context, continuation, task="t", idx=0):
    """What lm-eval passes: args, the task's name and the choice's index (multiple choice)."""
    return types.SimpleNamespace(args=(context, continuation), task_name=task, idx=idx)


def test_harness_batches_requests_without_changing_a_score(runs):
    pytest.importorskip("lm_eval", reason="the `eval` extra (bash launch/setup.sh eval)")
    from mdm_jax.eval.harness import MDMJaxLM

    requests = [_instance(c, x) for c, x in (
        ("the king said", " to the queen"), ("good night", " sweet lady"), ("", " the king"),
        ("thou shalt", " not"), ("the lord of the crown and the sword", " is fair"))]
    old = MDMJaxLM(model=runs["mdm"], mc_num=16, mc_batch_size=8, request_batch=1,
                   greedy_check="always")
    new = MDMJaxLM(model=runs["mdm"], mc_num=16, mc_batch_size=8, greedy_check="always")
    for (lp_old, g_old), (lp_new, g_new) in zip(old.loglikelihood(requests),
                                                new.loglikelihood(requests), strict=True):
        assert lp_new == pytest.approx(lp_old, abs=1e-4, rel=1e-5) and g_new == g_old
    gen = [types.SimpleNamespace(args=(c, {"until": ["\n"], "max_gen_toks": n}))
           for c, n in (("the king", 4), ("good night sweet", 4), ("a", 2), ("the", 4))]
    assert new.generate_until(gen) == old.generate_until(gen)  # batched, and one at a time
    # the ARM: exact, and its greedy flag from the same pass
    arm = MDMJaxLM(model=runs["arm"], greedy_check="always")
    arm_old = MDMJaxLM(model=runs["arm"], greedy_check="always", request_batch=1)
    for (a, ga), (b, gb) in zip(arm.loglikelihood(requests), arm_old.loglikelihood(requests),
                                strict=True):
        assert a == pytest.approx(b, abs=1e-4, rel=1e-5) and ga == gb


def test_greedy_check_runs_only_where_a_metric_reads_it(runs, monkeypatch):
    pytest.importorskip("lm_eval", reason="the `eval` extra (bash launch/setup.sh eval)")
    from mdm_jax.eval import harness

    checked = []
    real = harness.greedy_flags

    def counting(model, params, requests, max_length, batch, cfg):
        checked.extend(requests)
        return real(model, params, requests, max_length, batch, cfg)

    monkeypatch.setattr(harness, "greedy_flags", counting)
    lm = harness.MDMJaxLM(model=runs["mdm"], mc_num=8, mc_batch_size=8)
    # a multiple-choice task numbers its choices (idx 0, 1, ...); a loglikelihood task's are 0
    requests = [_instance("the king", " said", "cloze", 0),
                _instance("the king", " is", "cloze", 1),
                _instance("good night", " sweet", "lambada", 0)]
    out = lm.loglikelihood(requests)
    assert len(checked) == 1 and checked[0] == lm.pair("good night", " sweet")
    assert out[0][1] is False and out[1][1] is False  # not computed: multiple choice
    checked.clear()
    never = harness.MDMJaxLM(model=runs["mdm"], mc_num=8, mc_batch_size=8, greedy_check="never")
    assert [g for _, g in never.loglikelihood(requests)] == [False] * 3 and not checked
    always = harness.MDMJaxLM(model=runs["mdm"], mc_num=8, mc_batch_size=8, greedy_check=True)
    always.loglikelihood(requests)
    assert len(checked) == 3


def test_model_args_errors_name_the_key_as_typed(runs, capsys):
    pytest.importorskip("lm_eval", reason="the `eval` extra (bash launch/setup.sh eval)")
    from mdm_jax.eval.harness import MDMJaxLM
    from mdm_jax.families import FamilyError

    make = MDMJaxLM.create_from_arg_string
    lm = make(f"workdir={runs['mdm']},mc_num=16,mc_batch_size=8", {"batch_size": 4})
    assert lm.estimator.mc_num == 16 and lm.request_batch == 16  # lm-eval's 4 is not ours
    assert "note: model_args workdir= is now model=" in capsys.readouterr().err
    for args, message in (
            ("mc_num=abc", "model_args mc_num=abc: give a whole number"),
            ("mc_num=100,mc_batch_size=32", "mc_num=100 is not divisible by mc_batch_size=32"),
            ("mc_num=100,batch_size=32", "mc_num=100 is not divisible by batch_size=32"),
            ("mc_nun=5", r"model_args mc_nun=: no such key \(did you mean mc_num=\?\); the "
                         "keys are model, step, "),
            ("greedy_check=maybe", "greedy_check=maybe: choose auto, always or never"),
            ("request_batch=0", "request_batch=0: give 1 or more"),
            ("mc_batch_size=8,batch_size=8", "give only mc_batch_size=")):
        with pytest.raises(EvalError, match=message):
            make(f"model={runs['mdm']},{args}")
    with pytest.raises(EvalError, match="model_args needs model="):
        make("mc_num=8")
    with pytest.raises(FamilyError, match="the arm family .* no option for its likelihood "
                                          "estimator .*'mc_batch_size'"):
        make(f"model={runs['arm']},mc_batch_size=8")
    with pytest.raises(FamilyError, match="the arm family .* 'remasking'"):
        make(f"model={runs['arm']},remasking=random")
    # eps: the mc estimator's mask floor, SMDM's evaluation value 0 included
    assert make(f"model={runs['mdm']},eps=0").estimator.eps == 0.0
    with pytest.raises(EvalError, match="eps=2.0: give a mask probability floor"):
        make(f"model={runs['mdm']},eps=2")
    with pytest.raises(FamilyError, match="the arm family .* 'eps'"):
        make(f"model={runs['arm']},eps=0")


def test_model_args_refuse_every_unknown_key_and_take_only_lm_evals_own(runs):
    pytest.importorskip("lm_eval", reason="the `eval` extra (bash launch/setup.sh eval)")
    from mdm_jax.eval.harness import MDMJaxLM

    # Typos are refused by name, all of them, with the key meant, before any model loads.
    with pytest.raises(EvalError, match=r"model_args estimatr=, mc_nun=: no such keys \(did "
                                        r"you mean estimator=, mc_num=\?\); the keys are model,"):
        MDMJaxLM.create_from_arg_string("model=nowhere,estimatr=chain,mc_nun=1024")
    # What lm-eval passes itself (evaluator.simple_evaluate's settings beside model_args, the
    # trust_remote_code its --trust_remote_code adds to them) is taken and changes nothing...
    lm = MDMJaxLM.create_from_arg_obj(
        {"model": runs["mdm"], "mc_num": 16, "mc_batch_size": 8, "trust_remote_code": True},
        {"batch_size": 4, "max_batch_size": 64, "device": "cuda:0"})
    assert (lm.estimator.mc_num, lm.estimator.batch_size, lm.request_batch) == (16, 8, 16)
    # ...and anything else beside model_args is refused, not dropped.
    with pytest.raises(EvalError, match="dtype= passed beside model_args is not an lm-eval "
                                        "setting mdm_jax knows"):
        MDMJaxLM.create_from_arg_obj({"model": runs["mdm"]}, {"dtype": "bfloat16"})


def _tasks(folder) -> None:
    """A multiple-choice, a loglikelihood (acc: is-greedy) and a generation task over local
    JSONL files."""
    mc = [{"context": "the cat sat on the", "choices": [" mat", " sky", " moon"], "answer": 0},
          {"context": "a b c", "choices": [" d", " zz"], "answer": 0},
          {"context": "one two", "choices": [" three", " x"], "answer": 1}]
    gen = [{"prompt": "the cat", "target": " sat"}, {"prompt": "a b", "target": " c"}]
    (folder / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in mc) + "\n")
    (folder / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "tiny_ll.yaml").write_text(
        f"task: tiny_ll\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: loglikelihood\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: perplexity\n")
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")


# lm-eval's CLI passes its own --batch_size to the model beside model_args: `batch_size` in
# model_args (the older name of mc_batch_size) must not clash with it.
@pytest.mark.parametrize("kind,args", [("mdm", "estimator=chain,cfg=0.5,batch_size=16"),
                                       ("arm", "request_batch=4")])
def test_harness_cli_runs_the_registered_model_and_agrees_with_the_estimators(
        runs, tmp_path, kind, args, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="the `eval` extra (bash launch/setup.sh eval)")
    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.eval import harness
    from mdm_jax.inference import load

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tasks(tmp_path)
    # every setting lm-eval's CLI hands the model itself: accepted, not an unknown model_arg
    harness.main(["--model", "mdm_jax", "--model_args", f"model={runs[kind]},{args}", "--tasks",
                  "tiny_mc,tiny_ll,tiny_gen", "--include_path", str(tmp_path), "--output_path",
                  str(tmp_path / "out"), "--log_samples", "--batch_size", "4",
                  "--max_batch_size", "8", "--device", "cpu", "--trust_remote_code"])
    assert ("batch_size= is now mc_batch_size=" in capsys.readouterr().err) is (kind == "mdm")
    results = json.loads(open(next(
        os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs
        if f.startswith("results"))).read())["results"]
    # The harness's accuracy equals what the estimator gives directly for each question, and
    # the loglikelihood task's acc is the greedy check's.
    m = load(runs[kind])
    tok = Tokenizer.load(m.tokenizer_path)
    est = Estimator(kind="chain", cfg=0.5) if kind == "mdm" else Estimator()

    def pair(context, continuation):
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        ctx = ctx if whole[:len(ctx)] == ctx else ctx[:-1]
        return [tok.bos_id] + ctx, whole[len(ctx):]

    correct = 0
    for r in [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]:
        scores = [loglikelihood(m.model, m.params, *pair(r["context"], choice), est).logprob
                  for choice in r["choices"]]
        correct += int(np.argmax(scores) == r["answer"])
    assert results["tiny_mc"]["acc,none"] == pytest.approx(correct / 3)
    gen = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    greedy = [is_greedy(m.model, m.params, *pair(r["prompt"], r["target"])) for r in gen]
    assert results["tiny_ll"]["acc,none"] == pytest.approx(np.mean(greedy))
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0


def test_harness_cli_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval", reason="the `eval` extra (bash launch/setup.sh eval)")
    from mdm_jax.eval import harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for model_args, task, says in (
            (f"model={runs['mdm']}", "no_such_task_xyz", "no_such_task_xyz"),
            (f"model={runs['mdm']},mc_num=12,mc_batch_size=5", "tiny_mc",
             "mc_num=12 is not divisible by mc_batch_size=5")):
        _tasks(tmp_path)
        with pytest.raises(SystemExit) as e:
            harness.main(["--model", "mdm_jax", "--model_args", model_args, "--tasks", task,
                          "--include_path", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: ") and says in err[-1], err[-1]


def test_task_file_mistakes_are_one_line_naming_the_file_row_and_field(tmp_path, capsys,
                                                                        monkeypatch):
    """Checked before the model loads (model= names none): without the checks lm-eval fails
    on these with a traceback, says only "Tasks not found", or scores a row with no answer."""
    pytest.importorskip("lm_eval", reason="the `eval` extra (bash launch/setup.sh eval)")
    from mdm_jax.eval import harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mc, yaml = tmp_path / "mc.jsonl", tmp_path / "tiny_mc.yaml"
    row = '{"context": "a b", "choices": [" c", " d"], "answer": 0}'

    def rows(*lines):
        return lambda: mc.write_text("\n".join(lines) + "\n")

    def edit(old, new):
        return lambda: yaml.write_text(yaml.read_text().replace(old, new))

    for mistake, says in (
            (rows(row, '{"context": "x", "answer": 1}'),
             f'{mc} line 2: no "choices" field (task tiny_mc\'s doc_to_choice reads it)'),
            (rows(row, row, '{"context": "x", "choices": [" y"]}'),
             f'{mc} line 3: no "answer" field (task tiny_mc\'s doc_to_target reads it)'),
            (rows(row, '{"context": "x" "choices": [" y"], "answer": 0}'),
             f"{mc} line 2: not JSON"),
            (edit("output_type: multiple_choice", "output_type multiple_choice\n  x: ["),
             f"{yaml}: not valid YAML"),
            (edit("task: tiny_mc\n", ""), f"{yaml}: no task: key"),
            (edit("dataset_path: json\n", ""), f"{yaml} (task tiny_mc): no dataset_path: key"),
            (edit("mc.jsonl", "gone.jsonl"),
             f"{yaml} (task tiny_mc): data file {tmp_path / 'gone.jsonl'} not found")):
        _tasks(tmp_path)
        mistake()
        with pytest.raises(SystemExit) as e:
            harness.main(["--model", "mdm_jax", "--model_args", "model=unloaded", "--tasks",
                          "tiny_mc", "--include_path", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith(f"error: {says}"), (says, err[-1])
