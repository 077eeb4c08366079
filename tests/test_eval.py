"""Evaluation: likelihood estimators against exact enumeration, guidance, greedy checks, the
text ELBO / bits-per-byte CLI and task accuracy during training (the lm-evaluation-harness
model: tests/test_harness.py)."""

from __future__ import annotations

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, nano_config
from flax import linen as nn
from scipy import integrate

from mdm_jax.errors import UserError
from mdm_jax.eval.likelihood import Estimator, EvalError, is_greedy, loglikelihood
from mdm_jax.inference.mdm import guided_logits
from mdm_jax.model import Encoder, ModelArgs
from mdm_jax.presets import get_preset

CONTEXT, CONTINUATION = [1, 40, 41, 42], [7, 300, 12, 99]


def exact_elbo(model: Encoder, params, context: list[int], continuation: list[int],
               eps: float = 0.0, cfg: float = 0.0) -> float:
    """The expectation of the MC estimators by enumerating every mask of the continuation
    (2^m - 1 of them: for tests on short continuations): sum_k w_k A_k, w_k =
    int_0^1 C(m,k) p^k (1-p)^(m-k) / p dt with p = (1 - eps) t + eps, divided by C(m, k)."""
    m, c = len(continuation), len(context)
    n = c + m
    tokens = np.asarray(context + continuation, np.int32)
    rows, sizes = [], []
    for k in range(1, m + 1):
        for subset in itertools.combinations(range(m), k):
            rows.append(subset)
            sizes.append(k)
    canvas = np.repeat(tokens[None], len(rows), axis=0)
    masked = np.zeros_like(canvas, bool)
    for r, subset in enumerate(rows):
        masked[r, [c + i for i in subset]] = True
    x = np.where(masked, model.args.mask_id, canvas)
    pos = np.arange(n)[None]
    logp = jax.nn.log_softmax(guided_logits(model, params, jnp.asarray(x), jnp.asarray(pos < c),
                                            jnp.full((len(rows),), n, jnp.int32), cfg), -1)
    token_logp = np.take_along_axis(np.asarray(logp), canvas[..., None], -1)[..., 0]
    summed = np.where(masked, token_logp, 0.0).sum(-1)  # per mask: sum of masked log-probs
    total = 0.0
    for k in range(1, m + 1):
        a_k = summed[np.asarray(sizes) == k].mean()

        def density(t, k=k):
            p = (1 - eps) * t + eps
            return math.comb(m, k) * p ** k * (1 - p) ** (m - k) / p

        total += integrate.quad(density, 0.0, 1.0)[0] * a_k
    return float(total)



def _model(causal: bool, seed: int):
    args = ModelArgs.from_preset(get_preset("nano"), family="arm" if causal else "mdm")
    params = Encoder(args).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    params = nn.unbox(params)
    # Larger weights than the initialisation, so that the masks matter to the estimates.
    params = jax.tree_util.tree_map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)
    return Encoder(args), params


@pytest.fixture(scope="module")
def mdm():
    return _model(False, 0)


def test_monte_carlo_estimators_agree_with_exact_enumeration(mdm):
    model, params = mdm
    for kind, eps in (("mc", 1e-3), ("llada", 0.0)):
        exact = exact_elbo(model, params, CONTEXT, CONTINUATION, eps=eps)
        s = loglikelihood(model, params, CONTEXT, CONTINUATION,
                          Estimator(kind=kind, mc_num=1024, batch_size=128, eps=eps), seed=1)
        assert abs(s.logprob - exact) < 4 * s.stderr, (kind, s.logprob, exact, s.stderr)
        assert s.stderr > 0 and len(s.draws) == 1024
        again = loglikelihood(model, params, CONTEXT, CONTINUATION,
                              Estimator(kind=kind, mc_num=1024, batch_size=128, eps=eps), seed=1)
        assert again.logprob == s.logprob  # reproducible for a seed
    # The LLaDA form has lower variance than SMDM's at the same number of draws.
    mc = loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator("mc", 1024, 128))
    llada = loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator("llada", 1024, 128))
    assert llada.stderr < mc.stderr


def test_mc_estimator_with_smdms_evaluation_floor_eps_0_estimates_its_bound(mdm):
    """Estimator(eps=0) (SMDM's evaluate_diff.py): unbiased for the eps = 0 bound, finite even
    when a draw's t is 0 (nothing masked, weight 0 instead of inf)."""
    model, params = mdm
    exact = exact_elbo(model, params, CONTEXT, CONTINUATION, eps=0.0)
    s = loglikelihood(model, params, CONTEXT, CONTINUATION,
                      Estimator(kind="mc", mc_num=1024, batch_size=128, eps=0.0), seed=2)
    assert math.isfinite(s.logprob) and abs(s.logprob - exact) < 4 * s.stderr
    with pytest.raises(EvalError, match="eps=1.0: give a mask probability floor in"):
        loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator(kind="mc", eps=1.0))


def test_chain_rule_is_the_left_to_right_product_of_the_model_conditionals(mdm):
    model, params = mdm
    chain = loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator(kind="chain",
                                                                          batch_size=3))
    mask, n = model.args.mask_id, len(CONTEXT) + len(CONTINUATION)
    direct = 0.0
    for k, token in enumerate(CONTINUATION):  # one pass per token, by hand
        x = CONTEXT + CONTINUATION[:k] + [mask] * (len(CONTINUATION) - k)
        logits = model.apply({"params": params}, jnp.asarray([x]), jnp.asarray([n]),
                             return_logits=True)
        direct += float(jax.nn.log_softmax(logits[0, len(CONTEXT) + k])[token])
    assert chain.stderr == 0 and abs(chain.logprob - direct) < 1e-4


def test_guidance_zero_is_plain_and_positive_changes_the_estimate(mdm):
    model, params = mdm
    plain = loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator("chain"))
    zero = loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator("chain", cfg=0.0))
    guided = loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator("chain", cfg=1.0))
    assert plain.logprob == zero.logprob and guided.logprob != plain.logprob
    # The guided MC estimate agrees with the guided exact value too.
    exact = exact_elbo(model, params, CONTEXT, CONTINUATION, eps=0.0, cfg=1.0)
    s = loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator("llada", 512, 128,
                                                                      cfg=1.0))
    assert abs(s.logprob - exact) < 4 * s.stderr


def test_arm_likelihood_is_exact_and_greedy_check_matches_argmax():
    model, params = _model(True, 1)
    s = loglikelihood(model, params, CONTEXT, CONTINUATION)
    logits = model.apply({"params": params}, jnp.asarray([CONTEXT + CONTINUATION]),
                         return_logits=True)[0]
    logp = jax.nn.log_softmax(logits, -1)
    want = sum(float(logp[len(CONTEXT) + k - 1, t]) for k, t in enumerate(CONTINUATION))
    assert abs(s.logprob - want) < 1e-4 and s.stderr == 0
    greedy = [int(jnp.argmax(logits[len(CONTEXT) - 1]))]
    assert is_greedy(model, params, CONTEXT, greedy)
    assert not is_greedy(model, params, CONTEXT, [(greedy[0] + 1) % 512])


def test_mdm_greedy_check_follows_the_greedy_sampler(mdm):
    from mdm_jax.inference import MDMSampler, generate

    model, params = mdm
    answer = generate(model, params, [CONTEXT], 3, MDMSampler(steps=3)).answers()[0]
    assert is_greedy(model, params, CONTEXT, answer)
    assert not is_greedy(model, params, CONTEXT, answer[:2] + [(answer[2] + 1) % 512])


def test_guided_greedy_check_follows_the_guided_sampler(mdm):
    """greedy_flags(cfg=w) checks what SMDM's harness checks: the guided greedy answer."""
    from mdm_jax.eval.likelihood import greedy_flags
    from mdm_jax.families import FamilyError
    from mdm_jax.inference import MDMSampler, generate

    model, params = mdm
    contexts = [CONTEXT, CONTEXT[:3], [7, 9, 11, 13]]
    plain = generate(model, params, contexts, 4, MDMSampler(steps=4)).answers()
    guided = generate(model, params, contexts, 4, MDMSampler(steps=4, cfg=3.0)).answers()
    assert plain != guided  # the guidance changes some answer of this model
    assert greedy_flags(model, params, list(zip(contexts, guided, strict=True)), cfg=3.0) == \
        [True] * 3
    assert greedy_flags(model, params, list(zip(contexts, guided, strict=True))) == \
        [g == p for g, p in zip(guided, plain, strict=True)]
    arm, arm_params = _model(True, 1)
    with pytest.raises(FamilyError, match="has no guidance"):
        greedy_flags(arm, arm_params, [(CONTEXT, [1])], cfg=0.5)


def test_bad_estimator_settings_name_the_fix(mdm):
    model, params = mdm
    with pytest.raises(EvalError, match="not divisible by batch_size"):
        loglikelihood(model, params, CONTEXT, CONTINUATION, Estimator("mc", 100, 32))
    with pytest.raises(EvalError, match="beyond the model's 128"):
        loglikelihood(model, params, [1] * 120, [5] * 20)
    arm, arm_params = _model(True, 1)
    from mdm_jax.eval.likelihood import check_estimator
    from mdm_jax.families import FamilyError, get

    with pytest.raises(FamilyError, match="the arm family .* has no guidance 'cfg'"):
        check_estimator(Estimator(cfg=0.5), get("arm"))
    with pytest.raises(FamilyError, match="has no likelihood estimator 'chain'; it has: mc"):
        check_estimator(Estimator("chain"), get("uniform"))
    assert check_estimator(Estimator(), get("arm")).kind == "exact"


# ---- on a trained run: the text CLI ---------------------------------------------------

# (`runs`: a trained MDM and ARM, from conftest)

def test_text_elbo_and_bits_per_byte(runs, tmp_path, capsys):
    from mdm_jax.eval import text as evaluate

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 30)
    for kind in ("mdm", "arm"):  # the ARM's exact likelihood takes no --mc-num/--batch-size
        draws = ["--mc-num", "16", "--batch-size", "16"] if kind == "mdm" else []
        evaluate.cli(["--model", runs[kind], "--text", str(text), *draws, "--json"])
        r = json.loads(capsys.readouterr().out)
        assert r["tokens"] > 64 and r["bytes"] == len(text.read_bytes())  # several windows
        assert r["nll_per_token"] > 0 and math.isfinite(r["nll_per_token"])
        assert abs(r["bits_per_byte"] - r["nll_nats"] / math.log(2) / r["bytes"]) < 1e-9
        assert r["windows"] >= 2
    with pytest.raises(SystemExit) as e:
        evaluate.cli(["--model", runs["arm"], "--text", str(text), "--cfg", "1"])
    assert e.value.code == 2 and "the arm family" in (err := capsys.readouterr().err)
    assert "has no option for its likelihood estimator (exact) '--cfg'; it has: none" in err


def _tasks(folder) -> None:
    """A multiple-choice and a generation task over local JSONL files."""
    mc = [{"context": "the cat sat on the", "choices": [" mat", " sky", " moon"], "answer": 0},
          {"context": "a b c", "choices": [" d", " zz"], "answer": 0},
          {"context": "one two", "choices": [" three", " x"], "answer": 1}]
    gen = [{"prompt": "the cat", "target": " sat"}, {"prompt": "a b", "target": " c"}]
    (folder / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in mc) + "\n")
    (folder / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen) + "\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")


def test_text_cli_shows_progress_on_a_terminal_only(runs, tmp_path):
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 30)
    cmd = [sys.executable, "-m", "mdm_jax.eval", "text", "--model", runs["arm"], "--text",
           str(text), "--json"]
    terminal, child_end = pty.openpty()
    # a terminal 80 columns wide (a bare pty has no size, and tqdm draws nothing in 0 columns)
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    on_tty = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=child_end, cwd=REPO,
                            timeout=300)
    os.close(child_end)
    shown = b""
    try:
        while chunk := os.read(terminal, 65536):
            shown += chunk
    except OSError:  # the pty reports EIO once everything written was read
        pass
    os.close(terminal)
    assert on_tty.returncode == 0 and b"windows" in shown
    in_file = subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=300)
    assert in_file.returncode == 0 and b"windows" not in in_file.stderr
    assert json.loads(in_file.stdout)["windows"] >= 2


def test_task_accuracy_is_logged_during_training(tiny_data, tmp_path):
    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.eval.multiple_choice import accuracy, read_questions
    from mdm_jax.train import train
    from mdm_jax.trainer import Trainer

    _tasks(tmp_path)
    c = nano_config(**{"data.train_dir": tiny_data["train"], "data.eval_dir": "",
                       "data.tokenizer": tiny_data["tokenizer"], "workdir": str(tmp_path / "r"),
                       "data.eval_tasks": str(tmp_path / "mc.jsonl"), "steps": 10,
                       "eval_every": 5, "samples.count": 0})
    result = train(c)
    assert [h["step"] for h in result.eval_history] == [0, 5, 10]
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    logged = [r["eval_acc_mc"] for r in rows if "eval_acc_mc" in r]
    assert len(logged) == 3 and all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in logged)
    final = accuracy(Trainer(c).model, jax.device_get(result.state.params),
                     Tokenizer.load(c.data.tokenizer), read_questions(str(tmp_path / "mc.jsonl")),
                     Estimator(kind="chain"), c.seq_len)
    assert logged[-1] == pytest.approx(final)
    c.workdir, c.data.eval_tasks = str(tmp_path / "r2"), str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="missing.jsonl not found"):
        train(c)


def test_a_task_file_row_mistake_names_its_line_and_field(tmp_path):
    from mdm_jax.eval.multiple_choice import read_questions

    good = json.dumps({"context": "a b", "choices": [" c", " d"], "answer": 0})
    path = tmp_path / "mc.jsonl"
    for rows, says in (
            ([good, "", good, '{"context": "x", "answer": 0}'],
             'mc.jsonl line 4: no "choices" field'),
            ([good, '{"context": "x" "choices": []}'], "mc.jsonl line 2: not JSON"),
            ([good, '{"context": "x", "choices": [" y"], "answer": null}'],
             'mc.jsonl line 2: no "answer" field'),
            ([good, '["x"]'], "mc.jsonl line 2: a JSON list, not an object")):
        path.write_text("\n".join(rows) + "\n")
        with pytest.raises(UserError, match=says):
            read_questions(str(path))
    path.write_text(good + "\n\n" + good + "\n")  # blank lines are no rows
    assert len(read_questions(str(path))) == 2
