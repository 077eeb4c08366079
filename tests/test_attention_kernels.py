"""Attention kernels for the targets: splash attention (TPU Pallas) against the XLA
attention in Pallas's interpret mode on this CPU, alone and inside a sharded train step; both
kernels compiled for their real targets in tests/test_aot.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nano_config

from mdm_jax.attention_kernels import splash_attention
from mdm_jax.model import xla_attention
from mdm_jax.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_splash_matches_xla_attention_values_and_gradients(causal, with_lengths):
    q, k, v = (jax.random.normal(key, (2, 128, 2, 16), jnp.float32)
               for key in jax.random.split(jax.random.PRNGKey(0), 3))
    lengths = jnp.array([128, 77]) if with_lengths else None

    def loss(fn, q, k, v):
        out = fn(q, k, v, causal=causal, lengths=lengths)
        return jnp.sum(out * jnp.cos(out)), out

    (_, a), ga = jax.value_and_grad(lambda *x: loss(splash_attention, *x), argnums=(0, 1, 2),
                                    has_aux=True)(q, k, v)
    (_, b), gb = jax.value_and_grad(lambda *x: loss(xla_attention, *x), argnums=(0, 1, 2),
                                    has_aux=True)(q, k, v)
    np.testing.assert_allclose(a, b, atol=2e-6)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_allclose(x, y, atol=2e-5)
    if with_lengths:  # padded keys are ignored: changing them changes nothing
        k2 = k.at[1, 77:].set(100.0)
        np.testing.assert_allclose(splash_attention(q, k2, v, causal=causal, lengths=lengths),
                                   a, atol=2e-6)


@pytest.mark.parametrize("kind", ["mdm", "arm", "eso"])  # eso: causal along its order
def test_a_sharded_step_with_splash_equals_the_xla_step(kind):
    """Inside the trainer's (data, fsdp, tensor) mesh the kernel runs per shard (shard_map
    over batch and heads); the training loss and gradient norm match the XLA attention's."""
    results = []
    for impl in ("xla", "splash"):
        c = nano_config(**{"model.attention": impl, "mesh.data": 2, "mesh.tensor": 2,
                           "objective.kind": kind, "seq_len": 128})
        trainer = Trainer(c, devices=jax.devices()[:4])
        state = trainer.create_state(0)
        batch = np.random.default_rng(0).integers(0, 200, (16, 129)).astype(np.int32)
        with trainer.context():
            _, metrics = trainer.step(state, trainer.to_global(batch))
        results.append({k: float(metrics[k]) for k in ("loss", "grad_norm")})
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
    assert results[1]["grad_norm"] == pytest.approx(results[0]["grad_norm"], rel=1e-4)


def test_splash_needs_a_sequence_in_blocks_of_128():
    from mdm_jax.config import ConfigError, validate

    with pytest.raises(ConfigError, match="seq_len=64 is not a multiple of 128"):
        validate(nano_config(**{"model.attention": "splash", "seq_len": 64}), 8)
