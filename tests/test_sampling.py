"""Samplers: prompts are kept, every mask is resolved, the reveal schedule is followed."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mdm_jax.model import Encoder, ModelArgs
from mdm_jax.presets import get_preset
from mdm_jax.sampling import generate, reveal_step


@pytest.fixture(scope="module")
def nano():
    args = ModelArgs.from_preset(get_preset("nano"))
    params = Encoder(args).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return Encoder(args), nn.unbox(params)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_mdm_sampler_keeps_prompt_and_resolves_every_mask(nano, remasking):
    model, params = nano
    prompt = [1, 17, 42]
    out = np.asarray(generate(model, params, num=3, length=24, steps=6, prompt=prompt,
                              temperature=1.0, remasking=remasking))
    assert out.shape == (3, 24)
    assert (out[:, :3] == prompt).all()
    assert (out < model.args.vocab_size).all()  # no mask token left, none predicted
    again = np.asarray(generate(model, params, num=3, length=24, steps=6, prompt=prompt,
                                temperature=1.0, remasking=remasking))
    np.testing.assert_array_equal(out, again)  # same seed, same samples


@pytest.mark.parametrize("t,s", [(1.0, 0.75), (0.5, 0.1)])
def test_low_confidence_step_reveals_the_most_confident_on_schedule(nano, t, s):
    model, params = nano
    mask = model.args.mask_id
    x = jnp.full((2, 16), mask, jnp.int32).at[:, :4].set(7)  # 12 masked positions
    out = np.asarray(reveal_step(model, params, x, jax.random.PRNGKey(0), t, s,
                                 temperature=0.0, remasking="low_confidence"))
    n = int(np.floor(12 * (1 - s / t)))
    assert ((out[:, 4:] != mask).sum(axis=1) == n).all()
    assert (out[:, :4] == 7).all()
    probs = jax.nn.softmax(model.apply({"params": params}, x, return_logits=True), axis=-1)
    conf = np.asarray(jnp.max(probs, axis=-1))[:, 4:]
    for b in range(2):
        revealed = np.flatnonzero(out[b, 4:] != mask)
        assert set(revealed) == set(np.argsort(-conf[b])[:n])


def test_random_step_reveals_at_rate_one_minus_s_over_t(nano):
    model, params = nano
    x = jnp.full((64, 32), model.args.mask_id, jnp.int32)
    out = np.asarray(reveal_step(model, params, x, jax.random.PRNGKey(1), 1.0, 0.6,
                                 temperature=1.0, remasking="random"))
    assert abs((out != model.args.mask_id).mean() - 0.4) < 0.03


def test_arm_sampler_extends_the_prompt(nano):
    model, params = nano
    args = dataclasses.replace(model.args, causal=True)
    arm = Encoder(args)
    arm_params = dict(params, embedding=params["embedding"][:512])
    out = np.asarray(generate(arm, arm_params, num=2, length=12, steps=0, prompt=[1, 9]))
    assert (out[:, :2] == [1, 9]).all() and (out < 512).all()
    # Greedy: token at position p is the argmax given the prefix.
    logits = arm.apply({"params": arm_params}, jnp.asarray(out), return_logits=True)
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[:, 1:-1]), -1), out[:, 2:])
