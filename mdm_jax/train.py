"""Train state, the jitted mesh-sharded train step, and the training loop.

    python -m mdm_jax.train --config=experiments/tiny.py --config.steps=300 \
        --config.workdir=runs/tiny

One `jax.jit` step with explicit in/out shardings and donated state: the global batch is split
into micro-batches that are scanned over (gradient accumulation), each drawing its own t and mask
on device; gradients are averaged, clipped and applied with AdamW under the SMDM schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from mdm_jax import autofit, errors, flops, sharding, storage
from mdm_jax import config as config_lib
from mdm_jax.model import Encoder
from mdm_jax.objectives import get_objective, model_inputs_len
from mdm_jax.presets import get_preset
from mdm_jax.profiling import StepProfiler

log = logging.getLogger("mdm_jax")
_CONFIG = None  # the --config flag, defined by cli(): other CLIs import this module


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


def make_optimizer(c: ml_collections.ConfigDict):
    """AdamW with linear warmup then cosine decay to min_lr, after global-norm clipping."""
    warm = warmup_steps(c)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.optim.lr, warmup_steps=warm,
        decay_steps=max(c.steps, warm + 1), end_value=c.optim.min_lr)
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
        self.args = config_lib.model_args(c)
        self.objective_args = config_lib.objective_args(c)
        self.model = Encoder(self.args)
        self.mesh = sharding.make_mesh(
            sharding.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, len(devices)),
            devices)
        self.tx, self.schedule = make_optimizer(c)
        self.micro_steps = c.global_batch // config_lib.micro_batch(c)
        self.inputs_len = model_inputs_len(c.objective.kind, c.seq_len)

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
        fn = get_objective(self.config.objective.kind)
        return fn(self.model.apply, params, tokens, key, objective_args or self.objective_args,
                  self.args.mask_id, train)

    def _train_step(self, state: TrainState, batch: jax.Array):
        tokens = batch[:, : self.inputs_len]
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
        """The true bound for every objective: 1/t-weighted ELBO, stratified t, full length."""
        args = dataclasses.replace(self.objective_args, weighting="elbo", t_sampling="stratified")
        loss, _ = self._loss(params, batch[:, : self.inputs_len], key, False, args)
        return loss

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
        batch = jax.ShapeDtypeStruct((self.config.global_batch, self.config.seq_len + 1),
                                     jnp.int32, sharding=self.batch_sharding)
        return state, batch

    def to_global(self, host_batch: np.ndarray) -> jax.Array:
        return sharding.host_to_global(host_batch, self.batch_sharding)

    def train_flops_per_step(self) -> float:
        c = self.config
        per_token = flops.train_flops_per_token(get_preset(c.model.preset), c.seq_len,
                                                self.args.vocab_size, self.args.causal,
                                                self.args.time_conditioning)
        return per_token * c.global_batch * c.seq_len


def _check_data(c: ml_collections.ConfigDict, data_dir: str, vocab_size: int) -> None:
    """The prepared data must match the model: block length and vocabulary."""
    from mdm_jax.data import loader

    m = loader.manifest(data_dir)
    if int(m["seq_len"]) != c.seq_len:
        raise config_lib.ConfigError(
            f"{data_dir} holds blocks of seq_len {m['seq_len']} but config.seq_len="
            f"{c.seq_len}; set --config.seq_len={m['seq_len']} or prepare the data with "
            f"--seq-len {c.seq_len}.")
    if int(m["vocab_size"]) > vocab_size:
        raise config_lib.ConfigError(
            f"{data_dir} was tokenized with a vocabulary of {m['vocab_size']} but the model has "
            f"vocab_size {vocab_size}; set --config.model.vocab_size={m['vocab_size']} or use "
            f"a tokenizer with at most {vocab_size} pieces.")


def evaluate(trainer: Trainer, state: TrainState, batches: list[jax.Array], seed: int) -> float:
    """Mean validation loss over fixed (global) batches with fixed keys: comparable across
    steps and runs."""
    losses = []
    with trainer.context():
        for i, batch in enumerate(batches):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            losses.append(trainer.eval_step(state.params, batch, key))
    return float(np.mean(jax.device_get(losses)))


@dataclasses.dataclass
class RunResult:
    state: TrainState
    history: list[dict]
    eval_history: list[dict]
    samples: list[str]
    stopped: str | None = None  # why the run ended before config.steps (preempted, nonfinite)


def _check_tokenizers(c: ml_collections.ConfigDict) -> str | None:
    """The train and eval data and config.data.tokenizer must share one tokenizer (by
    sha256): another tokenizer's ids train without any error, only worse. Returns it."""
    from mdm_jax.data import loader
    from mdm_jax.data.tokenizer import file_sha256

    seen = []  # (sha256, where)
    if c.data.tokenizer:
        if not storage.as_path(c.data.tokenizer).is_file():
            raise config_lib.ConfigError(
                f"config.data.tokenizer={c.data.tokenizer} does not exist; give the "
                f"SentencePiece model the data was prepared with")
        seen.append((file_sha256(c.data.tokenizer), f"config.data.tokenizer={c.data.tokenizer}"))
    dirs = [d for d, _ in loader.parse_mixture(c.data.train_dir)]
    if c.data.eval_dir and c.data.eval_batches:
        dirs.append(c.data.eval_dir)
    for d in dirs:
        m = loader.manifest(d)
        if m.get("tokenizer_sha256"):
            seen.append((m["tokenizer_sha256"], f"{d} (prepared with {m.get('tokenizer')})"))
    for sha, where in seen[1:]:
        if sha != seen[0][0]:
            raise config_lib.ConfigError(
                f"different tokenizers: {seen[0][1]} has sha256 {seen[0][0][:12]}... but "
                f"{where} has {sha[:12]}...; prepare every directory with the same tokenizer "
                f"and point config.data.tokenizer at it")
    return seen[0][0] if seen else None


def _open_data(c: ml_collections.ConfigDict, trainer: Trainer):

    if not c.data.train_dir:
        raise config_lib.ConfigError(
            "config.data.train_dir is empty; point it at a directory written by "
            "`python -m mdm_jax.data.prepare` (see README).")
    try:
        return _open_sources(c, trainer)
    except (FileNotFoundError, ValueError) as e:  # the loader's messages name file and fix
        if isinstance(e, config_lib.ConfigError):
            raise
        which = "config.data.eval_dir" if c.data.eval_dir and c.data.eval_dir in str(e) \
            else "config.data.train_dir"
        raise config_lib.ConfigError(f"{which}: {e}") from e


def _open_sources(c: ml_collections.ConfigDict, trainer: Trainer):
    from mdm_jax.data import loader
    from mdm_jax.data.litgpt import is_litgpt_dir as litgpt_dir

    sources = loader.parse_mixture(c.data.train_dir)  # "dir" or "dirA:0.7,dirB:0.3"
    for source, _ in sources:
        _check_data(c, source, trainer.args.vocab_size)
    if c.data.verify_shards:
        from mdm_jax.data.shard_check import verify_shards

        checked = [d for d, _ in sources]
        if c.data.eval_dir and c.data.eval_batches:
            checked.append(c.data.eval_dir)
        for d in checked:
            if not litgpt_dir(d):
                verify_shards(d, loader.manifest(d))
    pcount, pindex = jax.process_count(), jax.process_index()
    per_host = c.global_batch // pcount
    train_iter = loader.make_train_iterator(
        sources if len(sources) > 1 else sources[0][0], batch_size_per_process=per_host,
        seed=c.seed, process_index=pindex, process_count=pcount,
        worker_count=c.data.worker_count)
    eval_batches = []
    if c.data.eval_dir and c.data.eval_batches:
        _check_data(c, c.data.eval_dir, trainer.args.vocab_size)
        host_batches = loader.make_eval_batches(
            c.data.eval_dir, batch_size_per_process=per_host, num_batches=c.data.eval_batches,
            process_index=pindex, process_count=pcount)
        eval_batches = [trainer.to_global(b) for b in host_batches]  # uploaded once
    return train_iter, eval_batches


def resolved_config(c: ml_collections.ConfigDict, trainer: Trainer) -> dict:
    """The config as saved in checkpoints, with defaults that depend on the preset resolved."""
    out = json.loads(c.to_json_best_effort())
    out["model"]["vocab_size"] = trainer.args.vocab_size
    return out


def _restore_or_init(c, trainer: Trainer, ckpt, train_iter, config_json: dict) -> TrainState:
    from mdm_jax.checkpoint import CheckpointError, abstract_with_shardings

    same_data = ckpt.check_compatible(config_json)
    target = abstract_with_shardings(trainer.abstract_state, trainer.state_sharding)
    state, step = ckpt.restore_latest(target, train_iter if same_data else None)
    if state is None:
        if ckpt.all_steps():
            raise CheckpointError(f"every checkpoint in {ckpt.directory} is damaged (see the "
                                  f"warnings above); move it away to start fresh")
        return trainer.create_state(c.seed)
    if jax.process_index() == 0:
        print(f"[mdm_jax] resumed from {ckpt.directory}/{step}", flush=True)
    if bool(jax.device_get(state.halted)):
        # nonfinite="stop" froze the state at its last good values; a rerun continues from
        # there (with whatever the user changed, e.g. a lower lr or nonfinite="skip").
        if jax.process_index() == 0:
            print(f"[mdm_jax] step {step} was saved halted by a non-finite loss or gradient; "
                  f"continuing from its last good state", flush=True)
        state = state.replace(halted=jax.device_put(jnp.zeros((), jnp.bool_),
                                                    state.halted.sharding))
    return state


def train(c: ml_collections.ConfigDict, stop_at: int | None = None) -> RunResult:
    """Run (or resume) training as configured; returns the final state and the metric history.

    `stop_at` ends the run early after that step with a checkpoint, as an interruption would;
    running again with the same workdir continues to `c.steps`. SIGTERM/SIGINT do the same at
    the end of the current step.
    """
    from mdm_jax.run_lock import WorkdirLock

    c = autofit.resolve(c, jax.devices(), Trainer)  # micro_batch / remat "auto"
    trainer = Trainer(c)
    pindex = jax.process_index()
    storage.check_shared_workdir(c.workdir)
    lock = WorkdirLock(c.workdir)
    if pindex == 0:
        lock.acquire()  # released in the finally below, or by the kernel if we die
    try:
        return _train_locked(c, trainer, stop_at)
    finally:
        lock.release()


def _train_locked(c: ml_collections.ConfigDict, trainer: Trainer,
                  stop_at: int | None) -> RunResult:
    from tqdm import tqdm

    from mdm_jax.checkpoint import Checkpointer
    from mdm_jax.metrics import MetricWriter, format_metrics
    from mdm_jax.preemption import PreemptionGuard

    pindex = jax.process_index()
    train_iter, eval_batches = _open_data(c, trainer)
    config_json = resolved_config(c, trainer)
    config_json["data"]["tokenizer_sha256"] = _check_tokenizers(c)
    ckpt = Checkpointer(c.workdir, every=c.checkpoint_every, keep=c.checkpoint_keep,
                        keep_period=c.checkpoint_keep_period, every_minutes=c.checkpoint_minutes)
    state = _restore_or_init(c, trainer, ckpt, train_iter, config_json)
    meta = {"preset": c.model.preset, "mesh": dict(trainer.mesh.shape),
            "process_count": jax.process_count(), "devices": trainer.mesh.size,
            "device_kind": jax.devices()[0].device_kind}

    start = int(jax.device_get(state.step))
    # A resumed run must show one finite step before it saves over anything (see below).
    unproven, skipped_at_start = start > 0, int(jax.device_get(state.skipped))
    writer = MetricWriter(c.workdir, resume_step=start)
    n_dev, device_kind = trainer.mesh.size, jax.devices()[0].device_kind
    flops_per_step = trainer.train_flops_per_step()
    tokens_per_step = c.global_batch * c.seq_len
    history, eval_history, stopped = [], [], None
    if pindex == 0:
        n_params = flops.total_params(get_preset(c.model.preset), trainer.args.vocab_size,
                                      trainer.args.causal)
        print(f"[mdm_jax] {c.objective.kind.upper()} preset {c.model.preset} "
              f"({n_params:,} params) mesh {dict(trainer.mesh.shape)} on {n_dev} x "
              f"{device_kind}; steps {start}->{c.steps}, batch {c.global_batch} x {c.seq_len} "
              f"({trainer.micro_steps} micro-steps)", flush=True)

    tasks = _load_tasks(c)

    def run_eval(step: int) -> None:
        scores = {}
        if eval_batches:
            scores["loss"] = evaluate(trainer, state, eval_batches, c.seed)
        if tasks:
            scores.update(_task_accuracies(trainer, state, c, tasks))
        eval_history.append({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
        writer.write(step, scores, prefix="eval_")
        if pindex == 0:
            tqdm.write(f"step {step:>6} | " + " | ".join(f"eval_{k} {v:.4f}"
                                                        for k, v in scores.items()))

    guard = PreemptionGuard()
    profiler = StepProfiler(c.profile.steps, c.workdir)
    try:
        with trainer.context():
            t0 = time.perf_counter()
            step_fn = trainer.step.lower(state, jax.ShapeDtypeStruct(
                (c.global_batch, c.seq_len + 1), jnp.int32, sharding=trainer.batch_sharding)
            ).compile()
            if pindex == 0 and start < c.steps:
                print(f"[mdm_jax] train step compiled in {time.perf_counter() - t0:.1f}s",
                      flush=True)
            if (eval_batches or tasks) and start == 0:  # the untrained baseline, for progress
                run_eval(0)
            bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="train",
                       disable=pindex != 0, dynamic_ncols=True)
            t_last, steps_since = time.perf_counter(), 0
            for step in bar:
                with profiler.step(step + 1):
                    state, metrics = step_fn(state, trainer.to_global(next(train_iter)))
                if profiler.after(step + 1, (state, metrics)) and pindex == 0:
                    bar.write(f"[mdm_jax] profile of steps {c.profile.steps} written under "
                              f"{c.workdir}/plugins/profile (tensorboard --logdir {c.workdir})")
                ckpt.raise_if_failed()  # stop at the first failed background save
                steps_since += 1
                done = step + 1
                if guard.should_stop(done, ckpt.manager):
                    stopped = f"preempted ({guard.signal_name})"
                elif done == stop_at:
                    stopped = "stop_at"
                last = done == c.steps or stopped is not None
                if done % c.log_every == 0 or last:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - t_last
                    achieved = flops_per_step * steps_since / elapsed
                    metrics.update(tokens_per_s=tokens_per_step * steps_since / elapsed,
                                   flops_per_s=achieved,
                                   mfu=flops.mfu(achieved, device_kind, n_dev))
                    history.append({"step": done, **metrics})
                    writer.write(done, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                    if pindex == 0:
                        bar.write(format_metrics(done, {k: metrics[k] for k in (
                            "loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "mfu")}))
                    skipped = int(metrics["skipped"])  # fetched with the metrics: one sync
                    halted = bool(metrics["halted"])
                    if skipped and pindex == 0:
                        bar.write(f"[mdm_jax] warning: {skipped} step(s) so far had a non-finite "
                                  f"loss or gradient; their updates were skipped")
                    if halted:
                        stopped = "nonfinite"
                        last = True
                    t_last, steps_since = time.perf_counter(), 0
                if (eval_batches or tasks) and (done % c.eval_every == 0 or last):
                    run_eval(done)
                    t_last = time.perf_counter()  # evaluation is not training throughput
                if unproven and (last or ckpt.due(done)):
                    _check_resumed_steps(state, start, done, skipped_at_start, ckpt)
                    unproven = False
                if ckpt.save(done, state, train_iter, config_json, meta, force=last):
                    writer.flush()  # metrics reach storage together with the checkpoint
                    t_last = time.perf_counter()
                if last:
                    break
            bar.close()
    finally:
        profiler.close()
        guard.close()
        ckpt.close()
        writer.close()

    if stopped and pindex == 0:
        if stopped == "nonfinite":
            print(f"[mdm_jax] stopped: a non-finite loss or gradient (config.nonfinite='stop'); "
                  f"the last good state is saved at step {int(state.step)} in {ckpt.directory}",
                  flush=True)
        else:
            print(f"[mdm_jax] {stopped}: saved step {int(state.step)} to {ckpt.directory}; "
                  f"rerun the same command to resume", flush=True)
    samples = []
    if c.samples.count > 0 and stopped is None:
        samples = _print_samples(trainer, state, c)
    return RunResult(state=state, history=history, eval_history=eval_history, samples=samples,
                     stopped=stopped)


def _load_tasks(c: ml_collections.ConfigDict) -> list[tuple[str, list[dict]]]:
    """(name, questions) of every file in config.data.eval_tasks (checked before training)."""
    from mdm_jax.eval.multiple_choice import read_questions, task_name

    paths = [p.strip() for p in c.data.eval_tasks.split(",") if p.strip()]
    if paths and not c.data.tokenizer:
        raise config_lib.ConfigError("config.data.eval_tasks needs config.data.tokenizer")
    return [(task_name(p), read_questions(p, c.data.eval_tasks_limit)) for p in paths]


def _task_accuracies(trainer: Trainer, state: TrainState, c: ml_collections.ConfigDict,
                     tasks) -> dict[str, float]:
    """Multiple-choice accuracy per task (chain rule for MDMs: deterministic; exact for ARMs),
    on unsharded parameters: meant for the small models of demos and micro studies."""
    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.eval.likelihood import Estimator
    from mdm_jax.eval.multiple_choice import accuracy

    with trainer.context():
        params = jax.device_get(state.params)
    tok = Tokenizer.load(c.data.tokenizer)
    return {f"acc_{name}": accuracy(trainer.model, params, tok, questions,
                                    Estimator(kind="chain"), c.seq_len, c.seed)
            for name, questions in tasks}


def _check_resumed_steps(state, start: int, done: int, skipped_at_start: int, ckpt) -> None:
    """Every step since resuming non-finite means the restored state is bad (corrupt files
    that read without error): stop before a save pushes good checkpoints out."""
    from mdm_jax.checkpoint import CheckpointError

    skipped = int(jax.device_get(state.skipped)) - skipped_at_start
    if skipped == done - start:
        raise CheckpointError(
            f"every step since resuming from {ckpt.directory}/{start} ({skipped} of them) had "
            f"a non-finite loss or gradient, so nothing was saved: that checkpoint is probably "
            f"corrupt. Move {ckpt.directory}/{start} aside and rerun to resume from the one "
            f"before it")


def _print_samples(trainer: Trainer, state: TrainState, c: ml_collections.ConfigDict):
    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.inference import MDMSampler, generate

    length = c.samples.length or c.seq_len
    with trainer.context():
        params = jax.device_get(state.params)  # small models only: sampling runs unsharded
    tok = Tokenizer.load(c.data.tokenizer) if c.data.tokenizer else None
    bos = tok.bos_id if tok is not None else 1
    sampler = MDMSampler(steps=c.samples.steps, remasking=c.samples.remasking,
                         temperature=c.samples.temperature)
    tokens = generate(trainer.model, params, [[bos]] * c.samples.count, length - 1, sampler,
                      seed=c.seed, max_length=length).tokens
    texts = []
    if tok is not None:
        texts = [tok.decode([int(t) for t in row if t < tok.vocab_size]) for row in tokens]
    else:
        texts = [" ".join(map(str, row)) for row in tokens]
    if jax.process_index() == 0:
        kind = (f"{c.samples.remasking} remasking" if not trainer.args.causal
                else "ancestral")
        print(f"\n[mdm_jax] {len(texts)} samples ({kind}, {c.samples.steps} steps, "
              f"temperature {c.samples.temperature}, length {length}):")
        for i, text in enumerate(texts):
            print(f"--- sample {i} ---\n{text.strip()}\n")
    return texts


def _main(argv) -> None:
    del argv
    from absl import logging as absl_logging

    from mdm_jax import distributed
    from mdm_jax.checkpoint import CheckpointError
    from mdm_jax.errors import UserError
    from mdm_jax.storage import StorageError

    # Orbax and Grain log every file operation at INFO; keep the console for training progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = _CONFIG.value
    try:
        distributed.initialize(config)
        result = train(config)
    except UserError as e:
        if errors.debug():
            raise
        label = {distributed.DistributedError: "multi-host start-up",
                 config_lib.ConfigError: "config", CheckpointError: "checkpoint",
                 StorageError: "storage"}.get(type(e))
        errors.fail(f"{label}: {e}" if label else str(e))
    if result.stopped == "nonfinite":
        raise SystemExit(3)
    if result.stopped and result.stopped.startswith("preempted"):
        raise SystemExit(config.preemption_exit_code)


def cli() -> None:
    global _CONFIG
    from absl import app

    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (.py)",
                                              lock_config=True)
    app.run(_main, flags_parser=errors.config_flags_parser)


if __name__ == "__main__":
    cli()
