"""The training loop and its CLI: data, resume, checkpoints, logging, and hooks.

    python -m mdm_jax.train --config=experiments/tiny.py --config.steps=300 \
        --config.workdir=runs/tiny

The compiled step lives in the trainer core (`mdm_jax.trainer`). Everything the loop runs on the
live state besides training (validation loss, task accuracies, end-of-run samples) is a `Hook`
registered on it; `train()` registers the ones the config asks for, and a notebook may add its
own (`train(config, hooks=(Hook(fn, every=100),))`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from mdm_jax import autofit, compile_cache, errors, flops, host_memory, storage
from mdm_jax import config as config_lib
from mdm_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_with_shardings,
    saved_param_shapes,
    weights_only,
)
from mdm_jax.presets import get_preset
from mdm_jax.profiling import StepProfiler
from mdm_jax.trainer import Trainer, TrainState, resolved_config
from mdm_jax.validation import validation_bound

log = logging.getLogger("mdm_jax")


@dataclasses.dataclass(frozen=True)
class Hook:
    """Work the loop runs on the live state: `fn(trainer, state)` returns scores (logged as
    eval_<name>), texts (a list of strings under a name: the trackers' text) or None. It runs
    every `every` steps (0: not periodically), on the state training starts from if
    `at_start` (a fresh run only: the untrained baseline), and after the last step: `at_end`
    "always" (also when the run stopped early), "complete" (only when it reached
    config.steps) or "never"."""

    fn: Callable[[Trainer, TrainState], dict | None]
    every: int = 0
    at_start: bool = False
    at_end: str = "always"

    def due(self, step: int, last: bool) -> bool:
        """At `step` of the loop (`last`: the loop ends after it)."""
        return (last and self.at_end == "always") or (self.every > 0 and step % self.every == 0)


def _check_data(c: ml_collections.ConfigDict, data_dir: str, vocab_size: int) -> None:
    """The prepared data must match the model: block length and vocabulary."""
    from mdm_jax.data import loader
    from mdm_jax.data.sft import is_sft

    m = loader.manifest(data_dir)
    if is_sft(m) != bool(c.sft.enabled):
        raise config_lib.ConfigError(
            f"{data_dir} holds prompt/response pairs (mdm_jax.data.sft): set "
            f"--config.sft.enabled=True to fine-tune on them" if is_sft(m) else
            f"config.sft.enabled=True but {data_dir} holds pre-training blocks; prepare "
            f"prompt/response pairs with `python -m mdm_jax.data.sft` (or set "
            f"--config.sft.enabled=False)")
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


# The resume policy: fields that must match to resume (they change parameter shapes or what a
# token means); the batch size, tokenizer and data are checked against the saved position.
RESUME_FIELDS = ("model.preset", "model.vocab_size", "seq_len", "objective.kind")


def check_resume(ckpt, config_json: dict) -> bool:
    """Stop before training if the newest checkpoint was made with incompatible settings.

    Returns whether the saved data position applies (False: other training data, allowed
    by data.restart_data_order, so the data order restarts)."""
    steps = ckpt.all_steps()
    if not steps:
        return True
    try:
        saved = ckpt.restore_config(steps[-1])
    except Exception:  # unreadable config: restore_latest will report the damage
        return True
    diffs = []
    for field in RESUME_FIELDS:
        a, b = lookup(saved, field), lookup(config_json, field)
        if a != b:
            diffs.append(f"{field}: checkpoint {a!r} vs config {b!r}")
    if diffs:
        raise CheckpointError(
            f"cannot resume from {ckpt.directory} (step {steps[-1]}): "
            + "; ".join(diffs)
            + ". Use the checkpoint's settings to resume, or start fresh with a new "
              "--config.workdir (or move the old checkpoints away).")
    # The data position is a count of global batches: another batch size would re-read
    # (or skip) blocks without a word.
    a, b = saved.get("global_batch"), config_json.get("global_batch")
    has_position = (storage.as_path(ckpt.directory) / str(steps[-1]) / "data").exists()
    if a is not None and a != b and has_position:  # (an import has no data position)
        raise CheckpointError(
            f"cannot resume from {ckpt.directory} (step {steps[-1]}) with "
            f"config.global_batch={b}: it was trained with global_batch={a} and its data "
            f"position counts batches of {a}; resume with --config.global_batch={a} (change "
            f"config.micro_batch to fit memory), or start a new --config.workdir")
    a = lookup(saved, "data.tokenizer_sha256")
    b = lookup(config_json, "data.tokenizer_sha256")
    if a and b and a != b:
        raise CheckpointError(
            f"cannot resume from {ckpt.directory} (step {steps[-1]}): it was trained on "
            f"data tokenized with {lookup(saved, 'data.tokenizer')} (sha256 {a[:12]}...) "
            f"but this run's data uses sha256 {b[:12]}...; resume on data prepared with "
            f"the checkpoint's tokenizer, or start a new --config.workdir")
    # The saved data position indexes the saved run's data: on other data it means nothing.
    a, b = lookup(saved, "data.train_dir"), lookup(config_json, "data.train_dir")
    if a is not None and has_position and _data_sources(a) != _data_sources(b):
        if not lookup(config_json, "data.restart_data_order"):
            raise CheckpointError(
                f"cannot resume from {ckpt.directory} (step {steps[-1]}): it was trained on "
                f"config.data.train_dir={a!r}, this run reads {b!r}, and the saved data "
                f"position belongs to the first; resume with the same data, or pass "
                f"--config.data.restart_data_order=True to continue on the new data from "
                f"its beginning")
        log.warning("checkpoint %s/%d was trained on data.train_dir=%r; continuing on %r "
                    "with the data order restarted (data.restart_data_order=True)",
                    ckpt.directory, steps[-1], a, b)
        return False
    return True



def _data_sources(spec: str) -> list[tuple[str, float]]:
    """A train_dir or mixture as (resolved path, weight) pairs, so that spelling differences
    (relative vs absolute, a trailing slash) are not taken for other data."""
    from mdm_jax.data.loader import parse_mixture

    try:
        return [(storage.resolve(str(d).rstrip("/")), w) for d, w in parse_mixture(spec)]
    except ValueError:
        return [(spec, 1.0)]


def lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_param_tree(ckpt, abstract_params, config_json: dict) -> None:
    """Stop before restoring if the newest checkpoint's parameters are laid out otherwise than
    this config's (a setting such as model.scan_layers changed): the config differs, the
    checkpoint is not damaged, and nothing should be set aside as if it were."""
    from mdm_jax.checksum import path_name

    steps = ckpt.all_steps()
    try:
        saved = saved_param_shapes(ckpt.directory, steps[-1]) if steps else None
        saved_config = ckpt.restore_config(steps[-1]) if steps else {}
    except Exception:  # noqa: BLE001  (unreadable: restore_latest reports the damage)
        return
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    ours = {path_name(path): tuple(leaf.shape) for path, leaf in flat}
    if saved is None or saved == ours:
        return
    only_saved = sorted(set(saved.items()) - set(ours.items()))
    only_ours = sorted(set(ours.items()) - set(saved.items()))

    def show(items):
        return ", ".join(f"{k} {list(v)}" for k, v in items[:2]) or "nothing else"

    model_a, model_b = saved_config.get("model", {}), config_json.get("model", {})
    differ = [f"model.{k}: checkpoint {model_a.get(k)!r} vs config {model_b.get(k)!r}"
              for k in sorted({*model_a, *model_b}) if model_a.get(k) != model_b.get(k)]
    raise CheckpointError(
        f"cannot resume from {ckpt.directory} (step {steps[-1]}): the config differs from the "
        f"checkpoint's in the layout of the parameters (the checkpoint has {show(only_saved)}; "
        f"this config has {show(only_ours)})"
        + (f"; settings that differ: {'; '.join(differ)}" if differ else "")
        + ". Resume with the checkpoint's settings, or start a new --config.workdir; the "
          "checkpoints are intact.")


def restore_weights_only(c, trainer: Trainer, ckpt, step: int) -> TrainState:
    """The train state of a step that holds the weights alone (an import): those weights on
    the mesh, a fresh optimizer state and counters, the step kept."""
    from mdm_jax.checkpoint import read_step

    target = abstract_with_shardings(trainer.abstract_state, trainer.state_sharding).params
    params, _ = read_step(c.workdir, step, lambda reader: reader.params(target),
                          error=CheckpointError)
    state = trainer.create_state(c.seed)
    with trainer.context():
        state = state.replace(params=params, step=jax.device_put(
            jnp.asarray(step, state.step.dtype), state.step.sharding))
    if jax.process_index() == 0:
        print(f"[mdm_jax] starting from the weights of {ckpt.directory}/{step} (imported: "
              f"the optimizer starts fresh)", flush=True)
    return state


def _restore_or_init(c, trainer: Trainer, ckpt, train_iter, config_json: dict) -> TrainState:
    same_data = check_resume(ckpt, config_json)
    check_param_tree(ckpt, trainer.abstract_state.params, config_json)
    steps = ckpt.all_steps()
    try:
        imported = bool(steps) and weights_only(ckpt.directory, steps[-1])
    except Exception:  # noqa: BLE001  (unreadable: restore_latest reports the damage)
        imported = False
    if imported:
        return restore_weights_only(c, trainer, ckpt, steps[-1])
    target = abstract_with_shardings(trainer.abstract_state, trainer.state_sharding)
    state, step = ckpt.restore_latest(target, train_iter if same_data else None)
    if state is None:
        if ckpt.all_steps():
            raise CheckpointError(f"every checkpoint in {ckpt.directory} is damaged (see the "
                                  f"warnings above); move it away to start fresh")
        if c.init.source:  # fine-tuning: pretrained weights, a fresh optimizer at step 0
            from mdm_jax.finetune import initial_state

            state = initial_state(trainer, c.init.source, None if c.init.step < 0
                                  else c.init.step)
            if jax.process_index() == 0:
                print(f"[mdm_jax] starting from the weights of {c.init.source}", flush=True)
            return state
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


def train(c: ml_collections.ConfigDict, stop_at: int | None = None,
          hooks: tuple[Hook, ...] = ()) -> RunResult:
    """Run (or resume) training as configured, with the config's hooks and `hooks`; returns
    the final state and the metric history.

    `stop_at` ends the run early after that step with a checkpoint, as an interruption would;
    running again with the same workdir continues to `c.steps`. SIGTERM/SIGINT do the same at
    the end of the current step.
    """
    from mdm_jax.run_lock import WorkdirLock

    config_lib.validate(c, jax.device_count(), jax.process_count())
    compile_cache.use(c.compile_cache_dir, c.workdir)  # before the first compile
    c = autofit.resolve(c, jax.devices(), Trainer)  # micro_batch / remat "auto"
    trainer = Trainer(c)
    storage.check_shared_workdir(c.workdir)
    lock = WorkdirLock(c.workdir)
    if jax.process_index() == 0:
        lock.acquire()  # released in the finally below, or by the kernel if we die
    try:
        train_iter, eval_batches = _open_data(c, trainer)
        loop = TrainLoop(trainer, train_iter)
        samples = SampleHook(c)
        for hook in (*config_hooks(c, eval_batches), *hooks):
            loop.add_hook(hook)
        if c.samples.count > 0:
            loop.add_hook(Hook(samples, at_end="complete"))
        result = loop.run(stop_at)
        result.samples = samples.texts
        if samples.texts and jax.process_index() == 0:
            write_run_pictures(c.workdir, samples.texts)
        return result
    finally:
        lock.release()


def write_run_pictures(workdir: str, texts: list[str]) -> None:
    """The end-of-run samples as WORKDIR/samples.txt and the run's curves beside them as
    WORKDIR/curves.png (mdm_jax.plot): what a run looks like without TensorBoard."""
    from mdm_jax import plot

    root = storage.as_path(workdir)
    (root / "samples.txt").write_text("".join(f"--- sample {i} ---\n{t.strip()}\n\n"
                                              for i, t in enumerate(texts)))
    plot.plot_runs([plot.read_run(workdir)], str(root / "curves.png"))
    print(f"[mdm_jax] wrote {root / 'samples.txt'} and {root / 'curves.png'}")


def config_hooks(c: ml_collections.ConfigDict, eval_batches: list) -> list[Hook]:
    """The evaluation the config asks for, every config.eval_every steps: the validation bound
    on data.eval_dir and the accuracy of each task file in data.eval_tasks."""
    hooks = []
    if eval_batches:
        hooks.append(Hook(lambda trainer, state: validation_bound(trainer, state,
                                                                  eval_batches).metrics(),
                          every=c.eval_every, at_start=c.get("eval_at_start", True)))
    tasks = _load_tasks(c)
    if tasks:
        hooks.append(Hook(lambda trainer, state: _task_accuracies(trainer, state, c, tasks),
                          every=c.eval_every, at_start=c.get("eval_at_start", True)))
    return hooks


class TrainLoop:
    """Steps a Trainer over a data iterator with checkpoints, metrics, preemption and hooks."""

    def __init__(self, trainer: Trainer, train_iter):
        self.trainer, self.train_iter = trainer, train_iter
        self.hooks: list[Hook] = []

    def add_hook(self, hook: Hook) -> None:
        self.hooks.append(hook)

    def run(self, stop_at: int | None = None) -> RunResult:
        from tqdm import tqdm

        from mdm_jax.metrics import MetricWriter, format_metrics
        from mdm_jax.preemption import PreemptionGuard

        trainer, train_iter = self.trainer, self.train_iter
        c = trainer.config
        pindex = jax.process_index()
        config_json = resolved_config(c, trainer)
        config_json["data"]["tokenizer_sha256"] = _check_tokenizers(c)
        ckpt = Checkpointer(c.workdir, every=c.checkpoint_every, keep=c.checkpoint_keep,
                            keep_period=c.checkpoint_keep_period,
                            every_minutes=c.checkpoint_minutes)
        with storage.waiting(ckpt.directory, "reading the checkpoints"):
            state = _restore_or_init(c, trainer, ckpt, train_iter, config_json)
        if pindex == 0:  # a readable copy of what the checkpoints hold
            storage.write_text(storage.join(c.workdir, "config.json"),
                               json.dumps(config_json, indent=1) + "\n")
        meta = {"preset": c.model.preset, "mesh": dict(trainer.mesh.shape),
                "process_count": jax.process_count(), "devices": trainer.mesh.size,
                "device_kind": jax.devices()[0].device_kind}

        start = int(jax.device_get(state.step))
        # A resumed run must show one finite step before it saves over anything (see below).
        unproven, skipped_at_start = start > 0, int(jax.device_get(state.skipped))
        writer = MetricWriter(c.workdir, resume_step=start,
                              trackers=tuple(str(c.get("trackers", "tensorboard")).split(",")),
                              config=config_json)
        n_dev, device_kind = trainer.mesh.size, jax.devices()[0].device_kind
        flops_per_step = trainer.train_flops_per_step()
        tokens_per_step = c.global_batch * c.seq_len
        history, eval_history, stopped = [], [], None
        if pindex == 0:
            n_params = flops.total_params(get_preset(c.model.preset), trainer.args.vocab_size,
                                          c.objective.kind)
            print(f"[mdm_jax] {c.objective.kind.upper()} preset {c.model.preset} "
                  f"({n_params:,} params) mesh {dict(trainer.mesh.shape)} on {n_dev} x "
                  f"{device_kind}; steps {start}->{c.steps}, batch {c.global_batch} x "
                  f"{c.seq_len} ({trainer.micro_steps} micro-steps)", flush=True)

        def run_hooks(step: int, due: list[Hook]) -> None:
            scores = {}
            host_memory.trim()  # evaluation's temporaries take the train step's pages, and
            for hook in due:    # give theirs back after: the heap holds the larger, not both
                scores.update(hook.fn(trainer, state) or {})
            host_memory.trim()
            for name in [k for k, v in scores.items() if isinstance(v, list)]:
                writer.text(step, name, scores.pop(name))  # texts: the end-of-run samples
            if not scores:
                return
            eval_history.append({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
            writer.write(step, scores, prefix="eval_")
            if pindex == 0:
                tqdm.write(f"step {step:>6} | " + " | ".join(f"eval_{k} {v:.4f}"
                                                            for k, v in scores.items()))

        guard = PreemptionGuard()
        profiler = StepProfiler(c.profile.steps, c.workdir)
        try:
            with trainer.context():
                t0, hits = time.perf_counter(), compile_cache.hits()
                step_fn = trainer.step.lower(state, trainer.abstract_step_inputs()[1]).compile()
                host_memory.trim()  # the compiler's freed memory, which no step reuses
                if pindex == 0 and start < c.steps:
                    cached = " (from the compile cache)" if compile_cache.hits() > hits else ""
                    print(f"[mdm_jax] train step compiled in {time.perf_counter() - t0:.1f}s"
                          f"{cached}", flush=True)
                if start == 0:  # the untrained baseline, for progress
                    run_hooks(0, [h for h in self.hooks if h.at_start])
                # A log file (sweeps, Slurm, xpk) gets the metric lines with a time, not a
                # progress bar's redraws.
                terminal = sys.stderr.isatty()
                bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="train",
                           disable=pindex != 0 or not terminal, dynamic_ncols=True)
                t_last, steps_since = time.perf_counter(), 0
                # Remote data is watched for outages; local data costs the loop nothing.
                watch_data = storage.is_remote(c.data.train_dir)
                for step in bar:
                    with profiler.step(step + 1):
                        with (storage.waiting(c.data.train_dir, "reading training data")
                              if watch_data else contextlib.nullcontext()):
                            batch = next(train_iter)
                        state, metrics = step_fn(state, trainer.to_global(batch))
                    if profiler.after(step + 1, (state, metrics)) and pindex == 0:
                        bar.write(f"[mdm_jax] profile of steps {c.profile.steps} written under "
                                  f"{c.workdir}/plugins/profile (tensorboard --logdir "
                                  f"{c.workdir})")
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
                            line = format_metrics(done, {k: metrics[k] for k in (
                                "loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s",
                                "mfu")})
                            bar.write(line if terminal else f"{line} | of {c.steps} | "
                                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
                        skipped = int(metrics["skipped"])  # fetched with the metrics: one sync
                        if skipped and pindex == 0:
                            bar.write(f"[mdm_jax] warning: {skipped} step(s) so far had a "
                                      f"non-finite loss or gradient; their updates were skipped")
                        if bool(metrics["halted"]):
                            stopped, last = "nonfinite", True
                        t_last, steps_since = time.perf_counter(), 0
                    due = [h for h in self.hooks if h.due(done, last)]
                    if due:
                        run_hooks(done, due)
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
            if sys.exc_info()[0] is not None:
                writer.close()  # else after the end-of-run hooks below, which log samples

        if stopped and pindex == 0:
            if stopped == "nonfinite":
                print(f"[mdm_jax] stopped: a non-finite loss or gradient "
                      f"(config.nonfinite='stop'); the last good state is saved at step "
                      f"{int(state.step)} in {ckpt.directory}", flush=True)
            else:
                print(f"[mdm_jax] {stopped}: saved step {int(state.step)} to {ckpt.directory}; "
                      f"rerun the same command to resume", flush=True)
        try:
            if stopped is None:  # end-of-run work (samples) after the checkpoints are safe
                run_hooks(int(state.step), [h for h in self.hooks if h.at_end == "complete"])
        finally:
            writer.close()
        return RunResult(state=state, history=history, eval_history=eval_history,
                         samples=[], stopped=stopped)


def _load_tasks(c: ml_collections.ConfigDict) -> list[tuple[str, list[dict]]]:
    """(name, questions) of every file in config.data.eval_tasks (checked before training)."""
    from mdm_jax.eval.multiple_choice import read_questions, task_name

    paths = [p.strip() for p in c.data.eval_tasks.split(",") if p.strip()]
    if paths and not c.data.tokenizer:
        raise config_lib.ConfigError("config.data.eval_tasks needs config.data.tokenizer")
    return [(task_name(p), read_questions(p, c.data.eval_tasks_limit)) for p in paths]


def _task_accuracies(trainer: Trainer, state: TrainState, c: ml_collections.ConfigDict,
                     tasks) -> dict[str, float]:
    """Multiple-choice accuracy per task, by the family's default likelihood estimator (for
    the MDMs the chain rule, which is deterministic), on unsharded parameters: meant for the
    small models of demos and micro studies."""
    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.eval.likelihood import Estimator
    from mdm_jax.eval.multiple_choice import accuracy

    with trainer.context():
        params = jax.device_get(state.params)
    tok = Tokenizer.load(c.data.tokenizer)
    kind = "chain" if "chain" in trainer.family.estimators else trainer.family.estimators[0]
    return {f"acc_{name}": accuracy(trainer.model, params, tok, questions,
                                    Estimator(kind=kind, mc_num=32), c.seq_len, c.seed)
            for name, questions in tasks}


def _check_resumed_steps(state, start: int, done: int, skipped_at_start: int, ckpt) -> None:
    """A non-finite step between a resume and its first save means the restored state is
    suspect (corrupt files that read without error: a bad optimizer state still gives a finite
    first loss, then non-finite weights): stop before a save pushes good checkpoints out."""
    skipped = int(jax.device_get(state.skipped)) - skipped_at_start
    bad_weights = _nonfinite_count(state.params)  # the last update's, not yet seen by a loss
    if bad_weights:
        raise CheckpointError(
            f"{bad_weights} weight(s) became non-finite in the {done - start} steps since "
            f"resuming from {ckpt.directory}/{start}, so nothing was saved: that checkpoint is "
            f"probably corrupt (e.g. its optimizer state). Move {ckpt.directory}/{start} aside "
            f"and rerun to resume from the one before it")
    if skipped:
        raise CheckpointError(
            f"{skipped} of the {done - start} steps since resuming from "
            f"{ckpt.directory}/{start} had a non-finite loss or gradient, so nothing was saved: "
            f"that checkpoint is probably corrupt. Move {ckpt.directory}/{start} aside and rerun "
            f"to resume from the one before it")


@jax.jit
def _nonfinite_count(tree) -> jax.Array:
    return sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree))


class SampleHook:
    """End-of-run samples from a BOS with the family's sampler: printed, kept in .texts and
    returned as {"samples": texts} (the trackers' text)."""

    def __init__(self, c: ml_collections.ConfigDict):
        self.config, self.texts = c, []

    def __call__(self, trainer: Trainer, state: TrainState) -> dict:
        from mdm_jax.data.tokenizer import Tokenizer
        from mdm_jax.inference import MDMSampler, generate

        c = self.config
        length = c.samples.length or c.seq_len
        with trainer.context():
            params = jax.device_get(state.params)  # small models only: sampling runs unsharded
        tok = Tokenizer.load(c.data.tokenizer) if c.data.tokenizer else None
        bos = tok.bos_id if tok is not None else 1
        sampler = MDMSampler(steps=c.samples.steps, temperature=c.samples.temperature,
                             remasking=c.samples.remasking
                             if "remasking" in trainer.family.sampler_options
                             else "low_confidence")
        tokens = generate(trainer.model, params, [[bos]] * c.samples.count, length - 1,
                          sampler, seed=c.seed, max_length=length).tokens
        if tok is not None:
            texts = [tok.decode([int(t) for t in row if t < tok.vocab_size]) for row in tokens]
        else:
            texts = [" ".join(map(str, row)) for row in tokens]
        if jax.process_index() == 0:
            print(f"\n[mdm_jax] {len(texts)} samples ({trainer.family.sampler}, "
                  f"{c.samples.steps} steps, temperature {c.samples.temperature}, length "
                  f"{length}):")
            for i, text in enumerate(texts):
                print(f"--- sample {i} ---\n{text.strip()}\n")
        self.texts = texts
        return {"samples": texts}


def _main(config) -> None:
    from absl import flags
    from absl import logging as absl_logging

    from mdm_jax import distributed
    from mdm_jax.errors import UserError
    from mdm_jax.storage import StorageError

    # Orbax and Grain log every file operation at INFO; keep the console for training progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    if flags.FLAGS.print_config:
        config_lib.validate(config, jax.device_count())
        print(json.dumps(resolved_config(config), indent=1))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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


def _flags():
    from absl import flags

    flags.DEFINE_bool("print_config", False, "print the resolved config as JSON and exit "
                      "(nothing is compiled, read or written)")
    return config_flags.DEFINE_config_file(
        "config", None, "experiment config (.py[:ARG]); then --config.FIELD=VALUE sets any of "
        "these fields (FIELD = default: meaning):\n" + config_lib.fields_help(), lock_config=True)


def cli() -> None:
    errors.run_absl(_flags, _main)


if __name__ == "__main__":
    cli()
