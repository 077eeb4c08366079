"""The validation bound's estimator (mdm_jax/validation.py): on a nano MDM with 8-token rows,
whose bound can be enumerated over every mask set, the default estimator lands within two of
its standard errors of the exact value with a weight factor of 1; the error it reports matches
the spread of independent estimates; count masking at Eso-LM's floor matches Bernoulli masking."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nano_config, train_on_patterns

from mdm_jax.model import head_kernel, logits_from_hidden
from mdm_jax.objectives import count_masking
from mdm_jax.validation import validation_bound

jax.config.update("jax_default_matmul_precision", "highest")
L = 8


@pytest.fixture(scope="module")
def trained():
    """A nano MDM part-trained on 8-token patterns (its loss still depends on how much is
    masked), and 2 validation batches of 64 rows: the patterns, and rows with one token
    changed (less predictable)."""
    trainer, state, patterns, _ = train_on_patterns("mdm", steps=80)
    rng = np.random.default_rng(1)
    rows = np.tile(patterns, (32, 1))
    noisy = np.arange(len(rows)) % 2 == 1
    rows[noisy, rng.integers(0, L, noisy.sum())] = rng.integers(3, 500, noisy.sum())
    return trainer, state, rows


def with_eval(trainer, **data):
    """A Trainer like `trainer` whose validation draws follow these config.data fields (the
    eval step reads them when it is traced)."""
    from mdm_jax.trainer import Trainer

    c = trainer.config.copy_and_resolve_references()
    c.data.update(data)
    return Trainer(c)


def as_batches(trainer, rows: np.ndarray, size: int = 64) -> list:
    """Global batches of `size` rows, each with the block's extra (ARM) token."""
    rows = np.concatenate([rows, rows[:, :1]], axis=1)
    return [trainer.to_global(rows[i:i + size]) for i in range(0, len(rows), size)]


def exact_bound(trainer, params, rows: np.ndarray) -> float:
    """(1/L) sum_l (1/l) E_{|S|=l}[sum_{i in S} CE_i], every S enumerated: the MDM's
    continuous-time ELBO per token (integral of E[masked CE | t] / t over t in (0, 1))."""
    subsets = [s for size in range(1, L + 1) for s in itertools.combinations(range(L), size)]
    masks = np.zeros((len(subsets), L), bool)
    for j, s in enumerate(subsets):
        masks[j, list(s)] = True
    sizes = masks.sum(1)
    per_size = np.array([math.comb(L, int(size)) for size in sizes])
    mask_id = trainer.args.mask_id

    @jax.jit
    def row_value(row):
        inputs = jnp.where(masks, mask_id, row[None, :])
        logits = logits_from_hidden(trainer.model.apply({"params": params}, inputs),
                                    head_kernel(params))
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.broadcast_to(
            row[None, :, None], (len(masks), L, 1)), axis=-1)[..., 0]
        per_set = jnp.sum(ce * masks, axis=1)
        return jnp.sum(per_set / (sizes * per_size)) / L

    return float(np.mean([row_value(jnp.asarray(r)) for r in rows]))


def test_the_default_estimator_is_within_two_standard_errors_of_the_enumerated_bound(trained):
    trainer, state, rows = trained
    params = jax.device_get(state.params)
    exact = exact_bound(trainer, params, rows)
    batches = as_batches(trainer, rows)
    bound = validation_bound(trainer, state, batches, draws=8)  # default masking and t
    assert bound.stderr is not None and bound.stderr > 0
    assert abs(bound.loss - exact) < 2 * bound.stderr, (bound, exact)
    # Fixed-count masking: the weights sum to L in every row, so F is 1 for every draw.
    assert bound.weight_factor == pytest.approx(1.0, abs=2e-3)
    # The reported error is an honest one: SMDM's Bernoulli masking with its eps floor lands
    # farther out (F != 1 per draw) and reports a larger error on the same draws.
    bernoulli = validation_bound(with_eval(trainer, eval_masking="bernoulli"), state, batches,
                                 draws=8)
    assert bernoulli.stderr > bound.stderr
    assert bernoulli.weight_factor != pytest.approx(1.0, abs=1e-4)


def test_the_reported_error_matches_the_spread_of_independent_estimates(trained):
    trainer, state, rows = trained
    batches = as_batches(trainer, rows[:64])
    bounds = [validation_bound(trainer, state, batches, draws=4, seed=s) for s in range(24)]
    spread = np.std([b.loss for b in bounds], ddof=1)
    reported = np.sqrt(np.mean([b.stderr ** 2 for b in bounds]))
    # 24 estimates: the sample sd is within about +-30% of the truth at two sigma.
    assert 0.6 < spread / reported < 1.5, (spread, reported)
    # The same seed gives the same draws: a study's runs share them.
    again = validation_bound(trainer, state, batches, draws=4, seed=3)
    assert again.loss == bounds[3].loss


def test_count_masking_draws_l_uniformly_and_weights_each_row_to_its_length():
    key = jax.random.PRNGKey(0)
    t = (jnp.arange(800) + jax.random.uniform(key, (800,))) / 800
    valid = jnp.arange(10)[None, :] < jnp.where(jnp.arange(800) % 2 == 0, 10, 6)[:, None]
    masked, weight = count_masking(jax.random.PRNGKey(1), t, valid)
    n = valid.sum(1)
    counts = masked.sum(1)
    assert not (masked & ~valid).any()
    np.testing.assert_allclose(counts * weight, n)  # F = 1 in every row
    for length in (10, 6):  # l ~ U{1..n}: stratified t gives each count the same share
        hist = np.bincount(np.asarray(counts[n == length]), minlength=length + 1)[1:]
        assert hist.min() == hist.max() == 400 // length or np.ptp(hist) <= 1
    # Eso-LM at alpha0 = 1/2: mask rates from 1/2 to 1; c_l = P(Beta(l, n-l+1) > 1/2) / l,
    # against a direct numerical integral of Binomial(l; n, q) / q over q in (1/2, 1).
    some = np.arange(0, 800, 37)
    masked, weight = count_masking(jax.random.PRNGKey(1), t[some], valid[some], floor=0.5)
    q = np.linspace(0.5, 1, 20001)
    for size, w, length in zip(np.asarray(masked.sum(1)), np.asarray(weight), np.asarray(n[some]),
                               strict=True):
        integrand = math.comb(length, size) * q ** (size - 1) * (1 - q) ** (length - size)
        assert w / length == pytest.approx(np.trapezoid(integrand, q), rel=1e-3)


@pytest.mark.slow
def test_eso_count_masking_estimates_the_same_bound_as_bernoulli_masking():
    """alpha0 = 1/2: the diffusion term's mask rates start at 1/2 (count_masking's floor)."""
    c = nano_config(**{"objective.kind": "eso", "eso.alpha0": 0.5, "seq_len": 8,
                       "global_batch": 32, "objective.loss_chunk": 8, "objective.eps": 1e-4})
    from mdm_jax.trainer import Trainer

    trainer = Trainer(c)
    state = trainer.create_state(0)
    rows = np.random.default_rng(0).integers(3, 60, (32, 9)).astype(np.int32)
    batches = [trainer.to_global(rows)]
    count = validation_bound(trainer, state, batches, draws=64)
    bernoulli = validation_bound(with_eval(trainer, eval_masking="bernoulli"), state, batches,
                                 draws=64)
    gap = abs(count.loss - bernoulli.loss)
    assert gap < 3 * math.hypot(count.stderr, bernoulli.stderr), (count, bernoulli)
