"""Uniform-state diffusion: the chunked NELBO against a direct implementation of the same
formula, its basic properties, time conditioning, and training + sampling on synthetic data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_samples_patterns, train_on_patterns

from mdm_jax.objectives import chunked_token_loss, uniform_alpha, uniform_nelbo

jax.config.update("jax_default_matmul_precision", "highest")


def _direct(logits, x, z, alpha, dalpha):
    """The integrand summed over the whole vocabulary, term by term ([..., K] tensors)."""
    k = logits.shape[-1]
    p = jax.nn.softmax(logits, axis=-1)
    a = alpha[..., None]
    big_x = k * a * p + (1 - a)
    xbar = k * a * jax.nn.one_hot(x, k) + (1 - a)
    pick = lambda v: jnp.take_along_axis(v, z[..., None], axis=-1)  # [..., 1]
    xbar_z, big_x_z = pick(xbar), pick(big_x)
    term2 = jnp.sum(xbar / xbar_z * (jnp.log(big_x_z) - jnp.log(big_x) + jnp.log(xbar)
                                     - jnp.log(xbar_z)), axis=-1)
    return dalpha / (k * alpha) * (k / xbar_z[..., 0] - k / big_x_z[..., 0] - term2)


def test_nelbo_matches_the_direct_formula_and_is_zero_for_a_perfect_model():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    logits = jax.random.normal(k1, (3, 10, 7)) * 2.0
    x = jax.random.randint(k2, (3, 10), 0, 7)
    z = jnp.where(jax.random.uniform(k3, (3, 10)) < 0.5, x, jax.random.randint(k4, (3, 10), 0, 7))
    alpha = uniform_alpha(jnp.linspace(0.05, 0.95, 3), 1e-3)[:, None] * jnp.ones((3, 10))
    got = uniform_nelbo(logits, x, z, alpha, -(1 - 1e-3))
    np.testing.assert_allclose(got, _direct(logits, x, z, alpha, -(1 - 1e-3)), rtol=1e-4,
                               atol=1e-5)
    assert (got >= -1e-5).all()  # a KL-type integrand
    perfect = jax.nn.one_hot(x, 7) * 60.0  # p = onehot(x) to float32 precision
    np.testing.assert_allclose(uniform_nelbo(perfect, x, z, alpha, -(1 - 1e-3)), 0.0, atol=1e-4)


def test_chunked_nelbo_equals_unchunked_with_gradients():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
    hidden = jax.random.normal(k1, (2, 24, 16))
    head = jax.random.normal(k2, (16, 11)) * 0.5
    x = jax.random.randint(k3, (2, 24), 0, 11)
    z = jax.random.randint(k4, (2, 24), 0, 11)
    alpha = jnp.full((2, 24), 0.4)
    w = jnp.ones((2, 24))
    fn = lambda lg, xx, zz, aa: uniform_nelbo(lg, xx, zz, aa, -0.999)
    naive = lambda h, hd: jnp.sum(_direct(h @ hd, x, z, alpha, -0.999))
    for chunk in (8, 7):  # 7: the last chunk is padded (its padding must not make a NaN)
        fused = lambda h, hd, c=chunk: chunked_token_loss(h, hd, fn, (x, z, alpha), w, c)
        (lf, gf), (ln, gn) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, head)
                              for f in (fused, naive))
        assert float(lf) == pytest.approx(float(ln), rel=1e-4)
        for a, b in zip(gf, gn, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.e2e
def test_uniform_diffusion_learns_and_samples_the_data_distribution():
    from mdm_jax.inference import MDMSampler, generate

    trainer, state, patterns, probs = train_on_patterns("uniform")
    assert trainer.args.time_conditioning and "time_in" in state.params
    g = generate(trainer.model, jax.device_get(state.params), [[]] * 400, 8,
                 MDMSampler(steps=16, temperature=1.0), seed=1)
    assert_samples_patterns(g.tokens, patterns, probs)
    # The validation bound of the trained model: nats per token, below the untrained log K.
    loss, _ = trainer.eval_step(state.params, trainer.to_global(np.concatenate(
        [patterns, patterns[:, :1]], axis=1)[np.arange(64) % 4]), jax.random.PRNGKey(0))
    assert 0 < float(loss) < np.log(512)
