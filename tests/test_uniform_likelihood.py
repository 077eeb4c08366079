"""Uniform-state diffusion likelihood: the Monte Carlo estimator against exact enumeration and
against the training loss, context clamping, padding, and the bound, on tiny models (K = 8)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mdm_jax.eval.uniform_likelihood import continuation_nelbo, uniform_batch
from mdm_jax.model import Encoder, ModelArgs
from mdm_jax.objectives import ObjectiveArgs, uniform_alpha, uniform_loss

jax.config.update("jax_default_matmul_precision", "highest")

K, EPS, WIDTH = 8, 1e-3, 8
# The Monte Carlo comparisons use a larger floor: at eps = 1e-3 a draw at t ~ eps that moves a
# token scores ~ log(1/t) / t (thousands), a rare event that skews the mean of ~1e4 draws and
# makes its standard error unreliable; the code path is the same for any eps.
MC_EPS = 0.05
CONTEXT, CONTINUATION = [1, 5, 2], [3, 6]
ARGS = ModelArgs(n_layer=1, n_head=2, d_model=32, head_dim=16, mlp_dim=64, vocab_size=K,
                 max_seq_len=32, family="uniform", cond_dim=16, scan_layers=False)


_enumerated_nelbo = jax.jit(continuation_nelbo, static_argnames=("model", "eps"))


def exact_uniform_bound(model: Encoder, params, context: list[int], continuation: list[int],
                        eps: float = 1e-3, nodes: int = 32) -> float:
    """The expectation of `uniform_batch` without Monte Carlo (for tests on tiny models):
    E_u = (1 / (1 - eps)) * integral over t in [eps, 1], by Gauss-Legendre in log t (a model
    sure that a clean token is wrong makes the integrand ~ 1/t near eps, flat in log t) and,
    at each node, every noisy continuation z in K^m weighted by its probability
    q_t(z | x) = prod_l (alpha [z_l = x_l] + (1 - alpha) / K)."""
    k, c, m = model.args.vocab_size, len(context), len(continuation)
    n = c + m
    width = 8 * math.ceil(n / 8)  # a few shapes, a few compiles
    s_N, w_N = np.polynomial.legendre.leggauss(nodes)
    lo = math.log(eps)  # s = log t in [log eps, 0]; dt = t ds
    t_N = np.exp(lo / 2.0 * (1.0 - s_N))
    w_N = w_N * (-lo / 2.0) * t_N / (1.0 - eps)
    alpha_N = np.asarray(uniform_alpha(t_N, eps), np.float64)
    z_ZxM = np.array(list(itertools.product(range(k), repeat=m)), np.int32).reshape(-1, m)
    same_ZxM = z_ZxM == np.asarray(continuation, np.int32)[None, :]
    a_Nx1x1 = alpha_N[:, None, None]
    q_NxZ = np.prod(np.where(same_ZxM[None], a_Nx1x1 + (1 - a_Nx1x1) / k, (1 - a_Nx1x1) / k),
                    axis=-1)
    row_L = np.zeros(width, np.int32)
    row_L[:n] = context + continuation
    z_ZxL = np.repeat(row_L[None], len(z_ZxM), axis=0)
    z_ZxL[:, c:n] = z_ZxM
    z_RxL = np.tile(z_ZxL, (nodes, 1))  # row r: node r // K^m, noisy continuation r % K^m
    alpha_R = np.repeat(alpha_N, len(z_ZxM)).astype(np.float32)
    x_RxL = np.broadcast_to(row_L, z_RxL.shape)
    nelbo_R = _enumerated_nelbo(model, params, jnp.asarray(x_RxL), jnp.asarray(z_RxL), c, n,
                                jnp.asarray(alpha_R), eps)
    nelbo_NxZ = np.asarray(nelbo_R, np.float64).reshape(nodes, -1)
    return -float(np.sum(w_N[:, None] * q_NxZ * nelbo_NxZ))



@pytest.fixture(scope="module")
def tiny():
    """A random time-conditioned Encoder; the noise on every weight makes the zero-initialised
    adaLN modulation non-zero, so that sigma matters to the logits."""
    model = Encoder(ARGS)

    @jax.jit  # one compile instead of many eager ops
    def init(k_init, k_noise):
        params = nn.unbox(model.init(k_init, jnp.zeros((1, WIDTH), jnp.int32))["params"])
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(k_noise, len(leaves))
        return jax.tree_util.tree_unflatten(tree, [
            p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])

    return model, init(jax.random.PRNGKey(0), jax.random.PRNGKey(1))


@dataclasses.dataclass(frozen=True)
class FixedLogits:
    """A stand-in model (hashable, for jit) whose logits at position l are logits[l]."""

    args: ModelArgs
    logits: tuple

    def apply(self, variables, tokens, lengths=None, return_logits=False, sigma=None):
        table = jnp.asarray(self.logits, jnp.float32)[None, :tokens.shape[1]]
        return jnp.broadcast_to(table, (*tokens.shape, K))


@dataclasses.dataclass(frozen=True)
class CopyModel:
    """A hand-made denoiser that leans hard on other positions and on the noise level, so that
    noising the context or a wrong sigma shows: position l copies the noisy token at l - shift
    (logit 4) and keeps its own with logit 4 alpha = 4 exp(-sigma). Returns logits either way
    (with params {"head": I} the training loss's head projection keeps them)."""

    args: ModelArgs
    shift: int

    def apply(self, variables, tokens, lengths=None, return_logits=False, sigma=None):
        src_L = jnp.clip(jnp.arange(tokens.shape[1]) - self.shift, 0, None)
        own_BxLxK = jax.nn.one_hot(tokens, K)
        return (4.0 * jax.nn.one_hot(tokens[:, src_L], K)
                + 4.0 * jnp.exp(-sigma)[:, None, None] * own_BxLxK)


COPY_PARAMS = {"head": jnp.eye(K)}


def _row(context, continuation, pad=0):
    row = np.full(WIDTH, pad, np.int32)
    row[:len(context) + len(continuation)] = context + continuation
    return row


def _draws(model, params, context, continuation, repeats, batch, eps):
    """Mean and standard error over `repeats` independent stratified sets of `batch` draws
    (independent sets, so that their spread is an honest error under stratification)."""
    tokens = jnp.asarray(np.repeat(_row(context, continuation)[None], batch, axis=0))
    c, n = len(context), len(context) + len(continuation)
    means = [float(np.mean(uniform_batch(model, params, tokens, c, n, jax.random.PRNGKey(r), 0,
                                         batch, eps=eps))) for r in range(repeats)]
    return np.mean(means), np.std(means, ddof=1) / np.sqrt(repeats)


def test_monte_carlo_mean_agrees_with_exact_enumeration(tiny):
    """On the Encoder (the real network path) and on the copy model, where the errors this
    guards against are large: noising the context moves the mean by ~1.6 nats, sigma = alpha
    for -log alpha by 0.35, a moved token that never stays itself by 0.14 (s.e. ~0.015)."""
    copy = CopyModel(ARGS, shift=len(CONTEXT))
    for (model, params), cont, repeats, batch, max_se in (
            (tiny, CONTINUATION, 32, 512, 0.08),
            ((copy, None), CONTEXT[:2], 64, 2048, 0.02)):  # the continuation the copy predicts
        exact = exact_uniform_bound(model, params, CONTEXT, cont, eps=MC_EPS)
        assert exact == pytest.approx(exact_uniform_bound(model, params, CONTEXT, cont,
                                                          eps=MC_EPS, nodes=64), abs=0.01)
        mean, se = _draws(model, params, CONTEXT, cont, repeats, batch, MC_EPS)
        print(f"{type(model).__name__}: exact {exact:.4f}  mc {mean:.4f} +- {se:.4f}")
        assert se < max_se and abs(mean - exact) < 4 * se, (exact, mean, se)


def test_exact_bound_is_the_expected_training_loss_without_context(tiny):
    """With no context the estimate is minus the eval loss (x L) of objectives.uniform_loss."""
    args = ObjectiveArgs(kind="uniform", eps=MC_EPS, variable_length_prob=0.0,
                         t_sampling="stratified", loss_chunk=3)
    for (model, params), x, batch in ((tiny, [3, 6, 1], 1024),
                                      ((CopyModel(ARGS, shift=1), COPY_PARAMS), [3, 3, 3], 16384)):
        loss = jax.jit(lambda k, model=model, params=params, x=x, batch=batch: uniform_loss(
            model.apply, params, jnp.asarray([x] * batch), k, args, 0, train=False)[0])
        draws = np.array([-float(loss(jax.random.PRNGKey(i))) * len(x) for i in range(32)])
        exact = exact_uniform_bound(model, params, [], x, eps=MC_EPS)
        se = draws.std(ddof=1) / np.sqrt(len(draws))
        print(f"{type(model).__name__}: exact {exact:.4f}  training loss {draws.mean():.4f} "
              f"+- {se:.4f}")
        assert se < 0.05 and abs(draws.mean() - exact) < 4 * se, (exact, draws.mean(), se)


def test_context_is_clamped_and_padding_is_ignored(tiny):
    model, params = tiny
    key = jax.random.PRNGKey(3)
    run = lambda row: np.asarray(uniform_batch(model, params, jnp.asarray(
        np.repeat(row[None], 64, axis=0)), 3, 5, key, 0, 64, eps=EPS))
    base = run(_row(CONTEXT, CONTINUATION))
    np.testing.assert_allclose(run(_row(CONTEXT, CONTINUATION, pad=7)), base, rtol=1e-5,
                               atol=1e-5)
    assert np.abs(run(_row([1, 4, 2], CONTINUATION)) - base).mean() > 0.1
    other = exact_uniform_bound(model, params, [1, 4, 2], CONTINUATION, eps=EPS)
    assert abs(other - exact_uniform_bound(model, params, CONTEXT, CONTINUATION, eps=EPS)) > 0.1


def test_a_model_that_knows_the_continuation_has_nelbo_zero():
    """p = onehot(x) on the continuation; confidently wrong on the context and the padding,
    which therefore must not be scored."""
    row = _row(CONTEXT, CONTINUATION)
    wrong = (row + 1) % K
    wrong[3:5] = row[3:5]
    oracle = FixedLogits(ARGS, tuple(map(tuple, 60.0 * np.eye(K)[wrong])))
    for eps in (EPS, MC_EPS):
        draws = uniform_batch(oracle, None, jnp.asarray(np.repeat(row[None], 64, axis=0)), 3, 5,
                              jax.random.PRNGKey(0), 0, 64, eps=eps)
        assert np.abs(np.asarray(draws)).max() < 1e-4
        assert abs(exact_uniform_bound(oracle, None, CONTEXT, CONTINUATION, eps=eps)) < 1e-4


def _total_probability(model, params, context):
    return sum(np.exp(exact_uniform_bound(model, params, context, list(x), eps=EPS))
               for x in itertools.product(range(K), repeat=len(CONTINUATION)))


def test_exp_of_the_bound_sums_to_at_most_one_over_all_continuations(tiny):
    """The strongest evidence of a bound. The tolerance is the floor at eps (module docstring):
    for the exact denoiser of i.i.d. uniform tokens (logits 0) the estimate is -m log K plus
    0.0067 nats per token, so its sum is exp(2 * 0.0067) ~ 1.013, not 1."""
    model, params = tiny
    for context in ([], [1], CONTEXT):
        total = _total_probability(model, params, context)
        print(f"context {len(context)}: sum exp(bound) = {total:.4f}")
        assert 0 < total <= 1.02
    denoiser = FixedLogits(ARGS, tuple(map(tuple, np.zeros((WIDTH, K)))))
    total = _total_probability(denoiser, None, CONTEXT)
    print(f"exact denoiser: sum exp(bound) = {total:.4f}")
    assert 1.0 < total <= 1.02
