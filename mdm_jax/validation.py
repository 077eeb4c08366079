"""The validation bound of a run: a low-variance Monte Carlo estimate, and its standard error.

A diffusion model's validation loss is a Monte Carlo estimate of its bound: t and the masks are
drawn. One draw per batch is noisy, and because every run of a study is evaluated on the same
draws, its error is shared: a set of draws whose weights sum below their expectation (the MDM's
F = sum(mask / p) / (B L) below 1) lowers every run's loss together. So, per batch:
- `data.eval_draws` independent draws;
- t stratified across the batch's rows, one draw per stratum (`data.eval_t_sampling`);
- for the masked families, a fixed count of masks, l ~ U{1..L} as LLaDA's likelihood estimator
  draws them (`data.eval_masking="count"`, `objectives.count_masking`): the weights then sum to
  exactly L in every row (F = 1), and the estimate is of the bound itself, with no eps floor;
- keys from `data.eval_seed` alone, so every run of a study sees the same draws.

The standard error counts only the draws' noise: the validation batches are fixed, not sampled.
Draws of one batch are independent and identically distributed, so a batch's mean over K draws
has variance s_b^2 / K (s_b^2: the sample variance of its draws), and the mean over n batches
sum_b s_b^2 / (K n^2). Stratification inside a draw lowers each draw's variance; the error,
measured across draws, includes that gain.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from mdm_jax import families


@dataclasses.dataclass(frozen=True)
class Bound:
    loss: float  # nats per token: the mean over batches and draws
    stderr: float | None  # its Monte Carlo standard error; None with one draw per batch
    weight_factor: float | None  # masked families: the mean F over the draws (1 expected)
    draws: int  # per batch

    def metrics(self) -> dict:
        """What the trainer logs (as eval_loss, eval_loss_se, eval_weight_factor)."""
        out = {"loss": self.loss}
        if self.stderr is not None:
            out["loss_se"] = self.stderr
        if self.weight_factor is not None:
            out["weight_factor"] = self.weight_factor
        return out


def validation_bound(trainer, state, batches: list, draws: int | None = None,
                     seed: int | None = None) -> Bound:
    """The bound on fixed (global) batches with fixed keys: comparable across steps and runs.
    draws and seed default to config.data.eval_draws and eval_seed. A family whose loss is
    exact (the ARM's log-likelihood) needs one draw and has no error."""
    d = trainer.config.data
    draws = int(draws or d.get("eval_draws", 2))
    seed = int(d.get("eval_seed", 0) if seed is None else seed)
    exact = families.get(trainer.config.objective.kind).exact_likelihood
    if exact:
        draws = 1
    losses, factors = [], []
    root = jax.random.PRNGKey(seed)
    with trainer.context():
        for i, batch in enumerate(batches):
            batch_key = jax.random.fold_in(root, i)
            for k in range(draws):
                loss, metrics = trainer.eval_step(state.params, batch,
                                                  jax.random.fold_in(batch_key, k))
                losses.append(loss)
                factors.append(metrics.get("weight_factor"))
    losses = np.asarray(jax.device_get(losses), np.float64).reshape(len(batches), draws)
    stderr = 0.0 if exact else None
    if draws > 1:
        per_batch_var = losses.var(axis=1, ddof=1) / draws
        stderr = math.sqrt(per_batch_var.sum()) / len(batches)
    factor = None
    if factors and factors[0] is not None:
        factor = float(np.mean(jax.device_get(factors)))
    return Bound(loss=float(losses.mean()), stderr=stderr, weight_factor=factor, draws=draws)
