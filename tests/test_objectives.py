"""Losses: chunked == naive (values and gradients), masking rate, 1/t weighting, variable length."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mdm_jax.model import Encoder, ModelArgs, logits_from_hidden
from mdm_jax.objectives import (
    ObjectiveArgs,
    arm_loss,
    chunked_cross_entropy,
    mdm_loss,
    naive_cross_entropy,
)
from mdm_jax.presets import get_preset

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("length,chunk", [(64, 16), (50, 16), (64, 64)])
def test_chunked_cross_entropy_equals_naive_with_gradients(length, chunk):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(k1, (3, length, 32))
    head = jax.random.normal(k2, (32, 300)) * 0.3
    targets = jax.random.randint(k3, (3, length), 0, 300)
    weights = jax.random.uniform(k4, (3, length)) * (jax.random.uniform(k4, (3, length)) < 0.5)

    fused = lambda h, w: chunked_cross_entropy(h, w, targets, weights, chunk)
    naive = lambda h, w: naive_cross_entropy(logits_from_hidden(h, w), targets, weights)
    (lf, gf), (ln, gn) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, head)
                          for f in (fused, naive))
    assert float(lf) == pytest.approx(float(ln), rel=1e-5)
    for a, b in zip(gf, gn, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def nano():
    args = ModelArgs.from_preset(get_preset("nano"))
    params = Encoder(args).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return args, nn.unbox(params)


def _naive_mdm(args, params, x0, key, obj):
    """The SMDM loss written out plainly from full logits, with the same random draws."""
    b, length = x0.shape
    k_t, k_mask, _ = jax.random.split(key, 3)
    p = (1 - obj.eps) * jax.random.uniform(k_t, (b,)) + obj.eps
    masked = jax.random.uniform(k_mask, (b, length)) < p[:, None]
    logits = Encoder(args).apply({"params": params}, jnp.where(masked, args.mask_id, x0),
                                 return_logits=True)
    return naive_cross_entropy(logits, x0, masked / p[:, None]) / (b * length)


def test_mdm_loss_and_grads_equal_naive(nano):
    args, params = nano
    obj = ObjectiveArgs(variable_length_prob=0.0, loss_chunk=16)
    x0 = jax.random.randint(jax.random.PRNGKey(1), (4, 40), 0, 256)
    key = jax.random.PRNGKey(2)
    apply = Encoder(args).apply
    fused = lambda p: mdm_loss(apply, p, x0, key, obj, args.mask_id)[0]
    naive = lambda p: _naive_mdm(args, p, x0, key, obj)
    (lf, gf), (ln, gn) = jax.value_and_grad(fused)(params), jax.value_and_grad(naive)(params)
    assert float(lf) == pytest.approx(float(ln), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gn), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_arm_loss_and_grads_equal_naive(nano):
    args, params = nano
    args = dataclasses.replace(args, family="arm")
    params = dict(params, embedding=params["embedding"][:512])
    tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 41), 0, 256)
    apply = Encoder(args).apply
    obj = ObjectiveArgs(kind="arm", loss_chunk=16)
    fused = lambda p: arm_loss(apply, p, tokens, None, obj, args.mask_id)[0]

    def naive(p):
        logits = Encoder(args).apply({"params": p}, tokens[:, :-1], return_logits=True)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    (lf, gf), (ln, gn) = jax.value_and_grad(fused)(params), jax.value_and_grad(naive)(params)
    assert float(lf) == pytest.approx(float(ln), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gn), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _Probe:
    """Stands in for the network: records its input and returns zero hidden states, so every
    position's CE is exactly log(V) and the loss exposes the mask and its weights."""

    def __init__(self, d=8):
        self.d, self.inputs, self.lengths = d, None, None

    def __call__(self, variables, inputs, lengths=None):
        self.inputs, self.lengths = inputs, lengths
        return jnp.zeros(inputs.shape + (self.d,))


def _probe_loss(obj, b=512, length=256, vocab=100, seed=0):
    probe = _Probe()
    params = {"head": jnp.zeros((probe.d, vocab))}
    x0 = jnp.zeros((b, length), jnp.int32)
    key = jax.random.PRNGKey(seed)
    loss, metrics = mdm_loss(probe, params, x0, key, obj, vocab)
    masked = np.asarray(probe.inputs == vocab)
    t = np.asarray(jax.random.uniform(jax.random.split(key, 3)[0], (b,)))
    return float(loss), metrics, masked, t, probe


def test_mask_rate_follows_linear_schedule():
    obj = ObjectiveArgs(variable_length_prob=0.0)
    _, _, masked, t, _ = _probe_loss(obj)
    p = (1 - obj.eps) * t + obj.eps
    rate = masked.mean(axis=1)
    # Per sequence: binomial(256, p) / 256 around p.
    assert np.abs(rate - p).max() < 5 * math.sqrt(0.25 / 256)
    assert np.corrcoef(rate, p)[0, 1] > 0.99
    assert abs(rate.mean() - 0.5) < 0.03  # E[p] = 0.5 for t ~ U(0, 1)


def test_elbo_weighting_is_one_over_p_divided_by_all_positions():
    obj = ObjectiveArgs(variable_length_prob=0.0)
    loss, _, masked, t, _ = _probe_loss(obj, vocab=100)
    p = (1 - obj.eps) * t + obj.eps
    expected = math.log(100) * (masked / p[:, None]).sum() / masked.size
    assert loss == pytest.approx(expected, rel=1e-5)
    assert loss == pytest.approx(math.log(100), rel=0.05)  # the 1/p weighting is unbiased


def test_unweighted_variant_is_mean_masked_ce():
    loss, *_ = _probe_loss(ObjectiveArgs(variable_length_prob=0.0, weighting="unweighted"))
    assert loss == pytest.approx(math.log(100), rel=1e-5)


def test_unweighted_loss_over_all_tokens_is_the_masked_sum_over_b_times_l():
    """objective.ce_norm=tokens: scaling-dllms' low_var normalisation (sum / (B * L))."""
    loss, _, masked, _, _ = _probe_loss(ObjectiveArgs(
        variable_length_prob=0.0, weighting="unweighted", ce_norm="tokens"))
    assert loss == pytest.approx(math.log(100) * masked.sum() / masked.size, rel=1e-5)
    assert loss < 0.6 * math.log(100)  # about half the positions are masked


def test_stratified_t_covers_every_stratum():
    _, _, masked, _, _ = _probe_loss(ObjectiveArgs(variable_length_prob=0.0,
                                                   t_sampling="stratified"), b=64)
    rates = np.sort(masked.mean(axis=1))
    # One t per stratum [i/64, (i+1)/64): sorted rates rise evenly from ~0 to ~1.
    assert np.abs(rates - (np.arange(64) + 0.5) / 64).max() < 0.12


def test_variable_length_truncates_and_renormalises():
    obj = ObjectiveArgs(variable_length_prob=1.0)  # always truncate
    loss, metrics, masked, t, probe = _probe_loss(obj, b=64, length=128, seed=3)
    valid = int(metrics["length"])
    assert 1 <= valid <= 128 and valid < 128
    np.testing.assert_array_equal(np.asarray(probe.lengths), valid)
    assert not masked[:, valid:].any()
    p = (1 - obj.eps) * t + obj.eps
    expected = math.log(100) * (masked / p[:, None]).sum() / (64 * valid)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_variable_length_rate():
    obj = ObjectiveArgs(variable_length_prob=0.01)
    from mdm_jax.objectives import sample_length
    draws = jax.vmap(lambda k: sample_length(k, 2048, obj.variable_length_prob))(
        jax.random.split(jax.random.PRNGKey(0), 20000))
    frac = float(jnp.mean(draws < 2048))
    assert 0.006 < frac < 0.014


def test_mdm_ce_trains_on_mean_masked_ce_and_evaluates_the_elbo(nano):
    from mdm_jax.objectives import OBJECTIVES

    args, params = nano
    x0 = jax.random.randint(jax.random.PRNGKey(1), (4, 40), 0, 256)
    key, apply = jax.random.PRNGKey(2), Encoder(args).apply
    obj = ObjectiveArgs(kind="mdm-ce", variable_length_prob=0.0, loss_chunk=16)
    ce = OBJECTIVES["mdm-ce"]
    # Training: the masked tokens' mean CE, computed directly from the same mask.
    k_t, k_mask, _ = jax.random.split(key, 3)
    p = (1 - obj.eps) * jax.random.uniform(k_t, (4,)) + obj.eps
    masked = jax.random.uniform(k_mask, (4, 40)) < p[:, None]
    logits = apply({"params": params}, jnp.where(masked, args.mask_id, x0), return_logits=True)
    want = naive_cross_entropy(logits, x0, masked.astype(jnp.float32)) / jnp.sum(masked)
    assert float(ce(apply, params, x0, key, obj, args.mask_id)[0]) == pytest.approx(
        float(want), rel=1e-5)
    # Evaluation: the 1/p-weighted ELBO, the same number the SMDM MDM reports.
    elbo = dataclasses.replace(obj, weighting="elbo")
    assert float(ce(apply, params, x0, key, elbo, args.mask_id, train=False)[0]) == float(
        mdm_loss(apply, params, x0, key, elbo, args.mask_id, train=False)[0])
