"""Interpolating diffusion (Eso-LM): the order-aware attention, the loss at its two ends
(alpha0 = 1: the MDM's 1/t ELBO; alpha0 = 0: left-to-right CE), the 2L sequential mask as a
normalised any-order factorisation, the KV-cached sampler against the recomputing one, the
likelihood against the evaluation loss, the FLOPs, and training + sampling on patterns."""

from __future__ import annotations

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_samples_patterns, nano_config, train_on_patterns

from mdm_jax import config as config_lib
from mdm_jax import flops, orders
from mdm_jax.model import Encoder, ModelArgs, head_kernel
from mdm_jax.objectives import ObjectiveArgs, eso_alpha, eso_loss, sample_t
from mdm_jax.presets import get_preset

jax.config.update("jax_default_matmul_precision", "highest")


def _model(alpha0: float = 1.0, vocab: int | None = None, seed: int = 0):
    args = ModelArgs.from_preset(get_preset("nano"), family="eso", alpha0=alpha0,
                                 vocab_size=vocab)
    model = Encoder(args)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


def _logits(model, params, tokens, **kw):
    return model.apply({"params": params}, tokens, None, return_logits=True, **kw)


def test_gather_causal_scatter_equals_the_order_key_mask():
    model, params = _model()
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.randint(k1, (3, 20), 0, 512)
    masked = jax.random.uniform(k2, (3, 20)) < 0.5
    valid = jnp.arange(20)[None, :] < jnp.array([[20], [20], [13]])  # row 2: padding
    keys = orders.sort_keys(masked, valid, jax.random.uniform(k3, (3, 20)))
    order = orders.order_of(keys)
    sorted_keys = orders.in_order(keys, order)
    assert (jnp.diff(sorted_keys, axis=1) > 0).all()
    # clean tokens first, then masks, then padding
    group = orders.in_order(jnp.where(valid, masked.astype(int), 2), order)
    assert (jnp.diff(group, axis=1) >= 0).all()
    inputs = jnp.where(masked, model.args.mask_id, x)
    hidden = orders.diffusion_hidden(model.apply, params, inputs, order)
    scattered = jnp.take_along_axis(hidden, jnp.argsort(order, axis=1)[..., None], axis=1)
    direct = model.apply({"params": params}, inputs, None, mask=orders.key_mask(keys))
    np.testing.assert_allclose(scattered, direct, atol=1e-5)
    # the order matters: plain causal attention in sequence order gives other numbers
    assert not np.allclose(direct, model.apply({"params": params}, inputs), atol=1e-3)


def _objective(alpha0: float, **kw) -> ObjectiveArgs:
    return ObjectiveArgs(kind="eso", alpha0=alpha0, variable_length_prob=0.0, **kw)


def test_alpha0_one_is_the_mdm_elbo_under_the_order_mask():
    """The loss at alpha0 = 1 equals, on the same draws, sum over masked of CE / t / (B L)
    with logits from the unpermuted key-mask form."""
    model, params = _model()
    x = jax.random.randint(jax.random.PRNGKey(2), (4, 16), 0, 512)
    key = jax.random.PRNGKey(3)
    for weighting, t_sampling in (("elbo", "uniform"), ("elbo", "antithetic"),
                                  ("unweighted", "stratified")):
        args = _objective(1.0, weighting=weighting, t_sampling=t_sampling)
        loss, metrics = eso_loss(model.apply, params, x, key, args, model.args.mask_id)
        # the same draws, by the loss's own key derivation
        k_diff, _, _ = jax.random.split(key, 3)
        k_t, k_mask, k_order = jax.random.split(k_diff, 3)
        t = (1 - args.eps) * sample_t(k_t, 4, t_sampling) + args.eps
        masked = jax.random.uniform(k_mask, x.shape) < (1 - eso_alpha(t, 1.0, args.eps))[:, None]
        keys = orders.sort_keys(masked, jnp.ones_like(masked), jax.random.uniform(k_order, x.shape))
        logits = _logits(model, params, jnp.where(masked, model.args.mask_id, x),
                         mask=orders.key_mask(keys))
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), x[..., None], -1)[..., 0]
        weight = 1.0 / t if weighting == "elbo" else jnp.ones(4)
        expected = jnp.sum(jnp.where(masked, ce, 0.0) * weight[:, None]) / x.size
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert float(metrics["sequential_term"]) == 0.0


def test_alpha0_zero_is_left_to_right_cross_entropy():
    """At alpha0 = 0 every token is masked and read left to right: the loss is the mean over
    positions l of CE of a mask at position l that attends to x_<l (a causal pass over
    x_0 ... x_{l-1}, MASK)."""
    model, params = _model(alpha0=0.0)
    x = jax.random.randint(jax.random.PRNGKey(4), (2, 10), 0, 512)
    loss, _ = eso_loss(model.apply, params, x, jax.random.PRNGKey(5), _objective(0.0),
                       model.args.mask_id)
    total = 0.0
    for pos in range(10):
        prefix = x[:, :pos + 1].at[:, pos].set(model.args.mask_id)
        logits = _logits(model, params, prefix)[:, pos]  # causal: the family's attention
        total += jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, pos:pos + 1],
                                              -1))
    assert float(loss) == pytest.approx(float(total) / x.size, rel=1e-5)


def test_sequential_pass_is_a_normalised_any_order_factorisation():
    """Vocabulary 3, length 3: for a fixed order, summing p(x | order) over all 27 sequences
    gives 1 (no position sees its own token or a later one)."""
    model, params = _model(vocab=3, seed=7)
    seqs = jnp.array(list(itertools.product(range(3), repeat=3)), jnp.int32)
    for order in ((2, 0, 1), (1, 2, 0)):
        order_NxL = jnp.broadcast_to(jnp.array(order), seqs.shape)
        z = jnp.full_like(seqs, model.args.mask_id)
        hidden = orders.sequential_hidden(model.apply, params, z, seqs, order_NxL)
        logp = jax.nn.log_softmax(hidden @ head_kernel(params))
        per_seq = jnp.sum(jnp.take_along_axis(logp, orders.in_order(seqs, order_NxL)[..., None],
                                              -1), axis=(1, 2))
        assert float(jnp.sum(jnp.exp(per_seq))) == pytest.approx(1.0, abs=1e-5)


def test_sequential_mask_blocks():
    m = np.asarray(orders.sequential_mask(3))[0, 0]
    z_rows = [[1, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    x_rows = [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    np.testing.assert_array_equal(m, np.array(z_rows + x_rows, bool))


@pytest.mark.parametrize("alpha0", [1.0, 0.5, 0.0])
def test_cached_and_recomputing_samplers_give_the_same_tokens(alpha0):
    from mdm_jax.inference.eso import generate_eso, reveal_schedule

    model, params = _model()
    gen = 20
    lens = np.array([3, 5, 1], np.int32)  # prompts of different lengths (left padding)
    canvas = np.full((3, 5 + gen), model.args.mask_id, np.int32)
    for row, p in zip(canvas, lens, strict=True):
        row[:p] = np.arange(1, p + 1)
    key = jax.random.PRNGKey(6)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    chunks = reveal_schedule(gen, 4, alpha0, rng).chunks
    for temperature in (0.0, 1.0):
        (cached, nfe_cached), (full, nfe_full) = (
            generate_eso(model, params, jnp.asarray(canvas), jnp.asarray(lens), key, steps=4,
                         alpha0=alpha0, gen_length=gen, kv_cache=kv, temperature=temperature,
                         top_k=0, top_p=1.0) for kv in (True, False))
        np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))
        assert int(nfe_full) == len(chunks) and int(nfe_cached) == len(chunks) + 1  # prefill
        out = np.asarray(cached)
        for row, p in zip(out, lens, strict=True):
            np.testing.assert_array_equal(row[:p], np.arange(1, p + 1))  # prompts kept
            assert (row[p:p + gen] != model.args.mask_id).all()
    if alpha0 == 1:
        assert len(chunks) <= 4
    if alpha0 == 0:
        assert chunks == (1,) * gen


def test_reveal_schedule_makes_alpha0_of_the_answer_by_diffusion():
    from mdm_jax.inference.eso import reveal_schedule

    rng = np.random.default_rng(0)
    for alpha0 in (0.25, 0.5, 0.75):
        made = [reveal_schedule(64, 8, alpha0, rng).diffusion_tokens for _ in range(300)]
        assert np.mean(made) / 64 == pytest.approx(alpha0, abs=0.03)
    s = reveal_schedule(64, 8, 1.0, rng)
    assert sum(s.chunks) == 64 and s.diffusion_tokens == 64 and len(s.chunks) <= 8


def test_likelihood_is_minus_the_evaluation_loss_in_expectation():
    """The harness estimator, with no context, estimates minus the eval loss x length."""
    from mdm_jax.eval.likelihood import Estimator, loglikelihoods

    for alpha0 in (1.0, 0.5):
        model, params = _model(alpha0=alpha0)
        x = [int(v) for v in jax.random.randint(jax.random.PRNGKey(8), (12,), 3, 512)]
        score = loglikelihoods(model, params, [([], x)], Estimator(mc_num=256, batch_size=64))[0]
        args = dataclasses.replace(_objective(alpha0), batch_split=0.5, t_sampling="stratified")
        losses = [float(eso_loss(model.apply, params, jnp.asarray([x] * 64),
                                 jax.random.PRNGKey(k), args, model.args.mask_id,
                                 train=False)[0]) for k in range(4)]
        expected = -np.mean(losses) * len(x)
        assert score.logprob == pytest.approx(expected, abs=4 * score.stderr + 0.05 * abs(expected))


def test_a_sharded_step_with_both_terms_equals_the_single_device_step():
    from mdm_jax.trainer import Trainer

    results = []
    for mesh in ((1, 1, 1), (2, 2, 2)):
        c = nano_config(**{"objective.kind": "eso", "eso.alpha0": 0.5, "mesh.data": mesh[0],
                           "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
        trainer = Trainer(c)
        state = trainer.create_state(0)
        batch = np.random.default_rng(0).integers(0, 256, (16, 65)).astype(np.int32)
        with trainer.context():
            _, metrics = trainer.step(state, trainer.to_global(batch))
        results.append(jax.device_get(metrics))
    for key in ("loss", "diffusion_term", "sequential_term", "grad_norm"):
        assert float(results[1][key]) == pytest.approx(float(results[0][key]), rel=2e-5), key
    assert float(results[0]["sequential_term"]) > 0 and float(results[0]["diffusion_term"]) > 0


def test_config_refuses_what_cannot_train():
    def check(**overrides):
        c = nano_config(**{"objective.kind": "eso", **overrides})
        config_lib.validate(c, 1)

    check()  # alpha0 = 1: any attention kernel (the diffusion term is plain causal)
    check(**{"eso.alpha0": 0.5})
    for overrides, words in (
            ({"eso.alpha0": 1.5}, "config.eso.alpha0=1.5 must be in [0, 1]"),
            ({"eso.alpha0": 0.5, "eso.batch_split": 1.0}, "to the left-to-right term"),
            ({"eso.alpha0": 0.5, "eso.batch_split": 0.01}, "to the diffusion term"),
            ({"eso.alpha0": 0.5, "model.attention": "cudnn"}, "only the xla attention")):
        with pytest.raises(config_lib.ConfigError, match=words.replace("[", r"\[")
                           .replace("]", r"\]").replace(".", r"\.")):
            check(**overrides)


def test_flops_match_the_mdm_at_alpha0_one_and_count_the_2l_rows_below():
    p = get_preset("170M")
    mdm = flops.train_flops_per_token(p, 2048, family="mdm")
    assert flops.train_flops_per_token(p, 2048, family="eso") == mdm
    assert flops.sequential_share("eso", 1.0) == 0.0
    share = flops.sequential_share("eso", 0.5)  # batch_split 1/2 by default
    assert share == 0.5 and flops.sequential_share("mdm", 0.5) == 0.0
    half = flops.train_flops_per_token(p, 2048, family="eso", sequential=share)
    dense = 3 * 2.0 * (p.non_embedding_params - p.n_layer * 2 * p.d_model - p.d_model)
    attn = 3 * 2.0 * 2.0 * 2048 * p.n_head * p.head_dim * p.n_layer
    assert half - mdm == pytest.approx(0.5 * dense + 1.5 * attn)
    # the scaling study's count: the same without attention scores (matmul-only)
    matmul = flops.per_token_flops(p, 2048, "3fwd-matmul", family="eso")
    assert mdm - matmul == pytest.approx(attn)
    assert flops.flops_per_token_6n(p, family="eso", sequential=share) == pytest.approx(
        1.5 * flops.flops_per_token_6n(p))


@pytest.mark.e2e
@pytest.mark.parametrize("alpha0", [1.0, 0.5])
def test_learns_and_samples_the_patterns_at_their_frequencies(alpha0):
    """Patterns that start with BOS, sampled after the prompt BOS. (Without a clean token to
    attend to, the first mask revealed sees only itself and, with RoPE alone, cannot know its
    position: the reference has the same property; real text starts with BOS.)"""
    from mdm_jax.inference import MDMSampler, generate

    # lr 1e-3 (3e-3 elsewhere): at alpha0 = 0.5 the larger step learns the patterns but not
    # their frequencies within 0.1 in this many steps
    trainer, state, patterns, probs = train_on_patterns(
        "eso", steps=800, bos=True, **{"eso.alpha0": alpha0, "optim.lr": 1e-3,
                                       "optim.min_lr": 1e-4})
    params = jax.device_get(state.params)
    g = generate(trainer.model, params, [[1]] * 400, 7, MDMSampler(steps=16, temperature=1.0),
                 seed=1)
    assert_samples_patterns(g.tokens, patterns, probs)
    # at most one call per step with something to reveal, plus the prompt's prefill
    few = generate(trainer.model, params, [[1]] * 8, 7, MDMSampler(steps=4), seed=2)
    assert few.nfe <= 4 + 1 if alpha0 == 1 else few.nfe <= 7 + 1


def test_flops_cli_plans_eso_under_the_studys_convention(capsys):
    import json

    flops.cli(["--preset", "170M", "--budget", "1e19", "--family", "eso", "--alpha0", "0.5",
               "--convention", "3fwd-matmul", "--json"])
    plan = json.loads(capsys.readouterr().out)
    p = get_preset("170M")
    assert plan["steps"] == flops.steps_for_budget(p, 1e19, convention="3fwd-matmul",
                                                   family="eso", sequential=0.5)
    assert plan["steps"] < flops.steps_for_budget(p, 1e19, convention="3fwd-matmul",
                                                  family="eso")  # the 2L rows cost more


def test_sampling_alpha0_is_checked_and_refused_by_other_families():
    from mdm_jax.families import FamilyError
    from mdm_jax.inference import MDMSampler, SamplingError, generate

    model, params = _model()
    with pytest.raises(SamplingError, match=r"alpha0=1\.5: give a share in \[0, 1\]"):
        generate(model, params, [[1]], 4, MDMSampler(alpha0=1.5))
    mdm = Encoder(dataclasses.replace(model.args, family="mdm"))
    with pytest.raises(FamilyError, match="the mdm family .* has no option for its sampler "
                                          r".* 'alpha0'; it has: steps, "):
        generate(mdm, params, [[1]], 4, MDMSampler(alpha0=0.5))


def test_an_explicit_mask_runs_in_xla_whatever_the_configured_kernel():
    """A model configured with a fused kernel (here `jax`, which runs on CPU) still runs the 2L
    pass and the recomputing sampler: explicit masks go to the XLA attention."""
    model, params = _model()
    fused = Encoder(dataclasses.replace(model.args, attention="jax"))
    x = jax.random.randint(jax.random.PRNGKey(9), (2, 12), 0, 512)
    order = jnp.broadcast_to(jnp.arange(12)[::-1], (2, 12))
    z = jnp.where(jnp.arange(12) % 2 == 0, model.args.mask_id, x)
    want = orders.sequential_hidden(model.apply, params, z, x, order)
    np.testing.assert_allclose(orders.sequential_hidden(fused.apply, params, z, x, order), want,
                               atol=1e-5)
    # and the diffusion pass (causal along the order) goes to the kernel, with the same result
    np.testing.assert_allclose(orders.diffusion_hidden(fused.apply, params, z, order),
                               orders.diffusion_hidden(model.apply, params, z, order), atol=1e-5)
