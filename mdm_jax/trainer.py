"""The trainer core: train state, optimizer, and everything compiled for one config on one mesh.

One `jax.jit` step with explicit in/out shardings and donated state: the global batch is split
into micro-batches that are scanned over (gradient accumulation), each drawing its own t and mask
on device; gradients are averaged, clipped and applied with AdamW under the SMDM schedule. This
module reads no data and runs no evaluation: the loop (`mdm_jax.train`), the compile-only
checks (`aot`, `autofit`), planning and imports build on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mdm_jax import config as config_lib
from mdm_jax import families, flops, sharding
from mdm_jax.data.sft import row_width
from mdm_jax.model import Encoder, ModelArgs
from mdm_jax.objectives import OBJECTIVES, ObjectiveArgs
from mdm_jax.presets import get_preset
from mdm_jax.sft_objectives import SFT_OBJECTIVES, SFTArgs


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key: checkpoints as a plain array
    skipped: jax.Array  # steps whose loss or gradients were not finite (update skipped)
    halted: jax.Array  # set by a non-finite step under nonfinite="stop": no further updates


def warmup_steps(c: ml_collections.ConfigDict) -> int:
    """SMDM: max(100, steps / 100) unless the config names a number or a fraction of steps."""
    if c.optim.warmup_steps >= 0:
        w = c.optim.warmup_steps
    elif c.optim.get("warmup_fraction", 0.0) > 0:
        w = max(1, round(c.optim.warmup_fraction * c.steps))
    else:
        w = max(100, c.steps // 100)
    return min(w, c.steps)


def learning_rate_schedule(c: ml_collections.ConfigDict):
    warm = warmup_steps(c)
    if c.optim.get("schedule", "cosine") == "constant":
        # LLaDA's SFT: warm up, hold the peak, decay linearly to min_lr over the last share.
        decay = min(max(1, round(c.optim.decay_fraction * c.steps)), c.steps - warm) \
            if c.optim.decay_fraction > 0 else 0
        hold = max(c.steps - warm - decay, 0)
        parts = [optax.linear_schedule(0.0, c.optim.lr, max(warm, 1)),
                 optax.constant_schedule(c.optim.lr)]
        bounds = [warm]
        if decay:
            parts.append(optax.linear_schedule(c.optim.lr, c.optim.min_lr, decay))
            bounds.append(warm + hold)
        return optax.join_schedules(parts, bounds)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.optim.lr, warmup_steps=warm,
        decay_steps=max(c.steps, warm + 1), end_value=c.optim.min_lr)


def make_optimizer(c: ml_collections.ConfigDict):
    """AdamW with linear warmup then the schedule (cosine decay to min_lr, or constant and a
    final linear decay), after global-norm clipping."""
    schedule = learning_rate_schedule(c)
    tx = optax.chain(
        optax.clip_by_global_norm(c.optim.grad_clip),
        optax.adamw(schedule, b1=c.optim.b1, b2=c.optim.b2, weight_decay=c.optim.weight_decay),
    )
    return tx, schedule


class Trainer:
    """Everything compiled for one config on one mesh: init, train step and eval step."""

    def __init__(self, c: ml_collections.ConfigDict, devices=None):
        devices = list(devices if devices is not None else jax.devices())
        if config_lib.wants_fit(c):
            raise ValueError("micro_batch/model.remat 'auto' must be resolved by "
                             "mdm_jax.autofit.resolve before a Trainer is built")
        config_lib.validate(c, len(devices), jax.process_count())
        self.config = c
        self.family = families.get(c.objective.kind)
        self.args = ModelArgs.from_config(c)
        self.objective_args = ObjectiveArgs.from_config(c)
        # Fine-tuning: rows carry the prompt and pair lengths (mdm_jax.data.sft)
        self.sft = SFTArgs.from_config(c) if c.get("sft") and c.sft.enabled else None
        self.model = Encoder(self.args)
        data, fsdp, tensor = config_lib.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp,
                                                           c.mesh.tensor, len(devices))
        self.mesh = sharding.make_mesh((data, fsdp, tensor), devices)
        self.objective_args = dataclasses.replace(self.objective_args, batch_shards=data * fsdp)
        self.tx, self.schedule = make_optimizer(c)
        self.micro_batch = config_lib.micro_batch(c, data * fsdp)  # sequences per micro-step
        self.micro_steps = c.global_batch // self.micro_batch
        self.inputs_len = c.seq_len + self.family.inputs_extra
        self.row_width = row_width(c.seq_len) if self.sft else c.seq_len + 1

        boxed = jax.eval_shape(self._init_boxed, jax.ShapeDtypeStruct((2,), jnp.uint32))
        sharding.check_divisible(boxed.params, self.mesh)
        self.state_sharding = sharding.logical_to_sharding(boxed, self.mesh)
        self.abstract_state = nn.unbox(boxed)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        sharding.check_batch_layout(self.batch_sharding, c.global_batch)
        self._replicated = sharding.replicated(self.mesh)

        self.init = jax.jit(lambda key: nn.unbox(self._init_boxed(key)),
                            out_shardings=self.state_sharding)
        self.step = jax.jit(self._train_step, in_shardings=(self.state_sharding,
                                                            self.batch_sharding),
                            out_shardings=(self.state_sharding, self._replicated),
                            donate_argnums=0)
        param_sharding = self.state_sharding.params
        self.eval_step = jax.jit(self._eval_step,
                                 in_shardings=(param_sharding, self.batch_sharding, None),
                                 out_shardings=self._replicated)

    # -- pure functions traced under jit ------------------------------------------------------
    def _init_boxed(self, key) -> TrainState:
        dummy = jnp.zeros((1, self.config.seq_len), jnp.int32)
        params = self.model.init(key, dummy)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), rng=key,
                          skipped=jnp.zeros((), jnp.int32), halted=jnp.zeros((), jnp.bool_))

    def _loss(self, params, tokens, key, train: bool = True, objective_args=None):
        args = objective_args or self.objective_args
        if self.sft:
            return SFT_OBJECTIVES[self.family.name](self.model.apply, params, tokens, key, args,
                                                    self.sft, self.args.mask_id,
                                                    self.config.seq_len, train)
        fn = OBJECTIVES[self.family.name]
        return fn(self.model.apply, params, tokens, key, args, self.args.mask_id, train)

    def _rows(self, batch):
        """What the objective reads of a batch: the family's tokens (fine-tuning: the whole
        row, lengths included)."""
        return batch if self.sft else batch[:, : self.inputs_len]

    def _train_step(self, state: TrainState, batch: jax.Array):
        tokens = self._rows(batch)
        m = self.micro_steps
        step_key = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if m == 1:
            (_, metrics), grads = grad_fn(state.params, tokens, step_key)
        else:
            # Row j of every device's block goes to micro-batch j % m: no data moves.
            micro = jnp.swapaxes(tokens.reshape(-1, m, tokens.shape[1]), 0, 1)
            micro = jax.lax.with_sharding_constraint(
                micro, NamedSharding(self.mesh, PartitionSpec(None, sharding.BATCH_AXES)))
            param_sharding = self.state_sharding.params

            def accumulate(acc, xs):
                i, mb = xs
                (_, aux), g = grad_fn(state.params, mb, jax.random.fold_in(step_key, i))
                acc = jax.tree_util.tree_map(jnp.add, acc, g)
                return jax.lax.with_sharding_constraint(acc, param_sharding), aux

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            grads, aux = jax.lax.scan(accumulate, zeros, (jnp.arange(m), micro))
            grads = jax.tree_util.tree_map(lambda g: g / m, grads)
            metrics = jax.tree_util.tree_map(jnp.mean, aux)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A NaN/Inf loss or gradient never reaches the parameters: the update is dropped and
        # counted; under nonfinite="stop" the state also freezes until the host stops the run.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        apply = finite & ~state.halted
        params, opt_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(apply, new, old),
            (params, opt_state), (state.params, state.opt_state))
        halted = state.halted | (~finite if self.config.nonfinite == "stop" else False)
        # Skipped updates do not advance optax's schedule count: report the rate actually used.
        skipped = state.skipped + (~finite).astype(jnp.int32)
        metrics = dict(metrics, grad_norm=grad_norm, lr=self.schedule(state.step - state.skipped),
                       nonfinite=(~finite).astype(jnp.int32), skipped=skipped, halted=halted)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  skipped=skipped, halted=halted)
        return new_state, metrics

    def _eval_step(self, params, batch, key):
        """One draw of the true bound for every objective (1/t-weighted ELBO, full length),
        with t and masks drawn as config.data.eval_* say: (loss, metrics)."""
        d = self.config.data
        args = dataclasses.replace(self.objective_args, weighting="elbo",
                                   t_sampling=d.get("eval_t_sampling", "antithetic"),
                                   masking=d.get("eval_masking", "count"))
        return self._loss(params, self._rows(batch), key, False, args)

    # -- host-side helpers --------------------------------------------------------------------
    @contextlib.contextmanager
    def context(self):
        """Mesh + logical rules, active while jitted functions trace (activation constraints)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            yield self

    def create_state(self, seed: int) -> TrainState:
        with self.context():
            return self.init(jax.random.PRNGKey(seed))

    def abstract_step_inputs(self):
        """(state, batch) as sharded shapes: what `step.lower` needs to compile the step with
        no arrays, e.g. for another machine's devices (mdm_jax.aot)."""
        state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state, self.state_sharding)
        batch = jax.ShapeDtypeStruct((self.config.global_batch, self.row_width),
                                     jnp.int32, sharding=self.batch_sharding)
        return state, batch

    def to_global(self, host_batch: np.ndarray) -> jax.Array:
        return sharding.host_to_global(host_batch, self.batch_sharding)

    def train_flops_per_step(self) -> float:
        c = self.config
        o = self.objective_args
        per_token = flops.train_flops_per_token(
            get_preset(c.model.preset), c.seq_len, self.args.vocab_size, c.objective.kind,
            flops.sequential_share(c.objective.kind, o.alpha0, o.batch_split))  # -1 resolved there
        return per_token * c.global_batch * c.seq_len


def resolved_config(c: ml_collections.ConfigDict, trainer: Trainer | None = None) -> dict:
    """The config as saved in checkpoints, with defaults that depend on the preset resolved."""
    out = json.loads(c.to_json_best_effort())
    out["model"]["vocab_size"] = (trainer.args if trainer else ModelArgs.from_config(c)).vocab_size
    return out
