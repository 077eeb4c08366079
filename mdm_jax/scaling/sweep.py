"""Run an IsoFLOP study: expand the grid, launch what is not finished, collect results.csv.

    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py:micro --backend local
    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --backend slurm --dry-run
    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --backend tpu
    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --collect-only

Every run has a stable id (`mdm-170M-1e+19`) and workdir (`sweep_dir/ID`). A run is finished
when its metrics.jsonl holds the validation loss at its last step; finished runs are skipped,
and a run with checkpoints but no final loss resumes from its latest checkpoint (the trainer
does that on its own when pointed at the same workdir). Every run evaluates the same batches
of the same validation split with the same masks, so losses compare across runs.

Backends: `local` runs `python -m mdm_jax.train` here, one after another or `--parallel N` at a
time; `slurm` submits `launch/slurm.sbatch` per run with sbatch; `tpu` submits an xpk workload
per run through `launch/tpu.sh xpk`. Dry runs print exactly the commands they would execute.
Collection reads the workdirs, so it needs them on a filesystem this machine sees.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import ml_collections

from mdm_jax.scaling.plan import Run, StudyError, expand

RESULT_COLUMNS = ("family", "preset", "non_embedding_params", "budget", "steps", "tokens", "loss")


def train_args(study: ml_collections.ConfigDict, run: Run) -> list[str]:
    """The trainer's arguments for one run: base config + this run's size, steps and workdir."""
    args = [f"--config={study.base}:{run.preset},{run.family}",
            f"--config.workdir={run.workdir}",
            f"--config.steps={run.steps}",
            f"--config.global_batch={study.batch}",
            f"--config.seq_len={study.seq_len}",
            "--config.samples.count=0"]
    for override in study.overrides:
        key, sep, value = str(override).partition("=")
        if not sep or not key.strip():
            raise StudyError(f"study.overrides entry {override!r} must read 'key=value', "
                             f"e.g. 'data.train_dir=/data/slimpajama/train'")
        args.append(f"--config.{key.strip()}={value.strip()}")
    return args


def final_loss(run: Run) -> float | None:
    """The validation loss logged at the run's last step, or None if it has not got there."""
    path = os.path.join(run.workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    loss = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: ignore it
                continue
            if record.get("step") == run.steps and "eval_loss" in record:
                loss = float(record["eval_loss"])
    return loss


def status(run: Run) -> str:
    if final_loss(run) is not None:
        return "finished"
    ckpt = os.path.join(run.workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    return f"resume from step {max(steps)}" if steps else "new"


def command(study: ml_collections.ConfigDict, run: Run, backend: str) -> list[str]:
    args = train_args(study, run)
    if backend == "local":
        return [sys.executable, "-m", "mdm_jax.train", *args]
    if backend == "slurm":
        s = study.slurm
        cmd = ["sbatch", f"--job-name=mdm-{run.run_id}", f"--nodes={s.nodes}",
               f"--gpus-per-node={s.gpus_per_node}", f"--time={s.time}",
               f"--output={run.workdir}/slurm-%j.out"]
        if s.partition:
            cmd.append(f"--partition={s.partition}")
        cmd += shlex.split(s.extra)
        return [*cmd, "launch/slurm.sbatch", *args]
    if backend == "tpu":
        t = study.tpu
        workload = "mdm-" + run.run_id.lower().replace("+", "").replace(".", "p")
        env = [f"TPU_CLUSTER={t.cluster}", f"TPU_TYPE={t.type}",
               f"TPU_NUM_SLICES={t.num_slices}", f"TPU_IMAGE={t.image}"]
        if t.extra:
            env.append(f"XPK_EXTRA={t.extra}")
        return ["env", *env, "bash", "launch/tpu.sh", "xpk", workload, "--", *args]
    raise StudyError(f"--backend {backend!r}; valid: local, slurm, tpu")


def collect(runs: list[Run], path: str) -> tuple[int, list[Run]]:
    """Write results.csv for every finished run; return (rows written, runs still missing)."""
    rows, missing = [], []
    for run in runs:
        loss = final_loss(run)
        if loss is None:
            missing.append(run)
            continue
        rows.append({"family": run.family, "preset": run.preset,
                     "non_embedding_params": run.non_embedding_params,
                     "budget": f"{run.budget:.6g}", "steps": run.steps, "tokens": run.tokens,
                     "loss": f"{loss:.6f}"})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # a reader never sees half a file
    return len(rows), missing


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def launch_local(study, todo: list[Run], parallel: int) -> list[Run]:
    """Run the trainer for each run, `parallel` at a time; return the runs that failed.

    Ctrl-C or SIGTERM (a cluster or CI stopping the sweep) is passed on to the running trainers,
    which finish their step and checkpoint; the sweep then exits and a rerun resumes them.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, _interrupt)
    pending, active, failed = list(todo), {}, []
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.pop(0)
            os.makedirs(run.workdir, exist_ok=True)
            log = open(os.path.join(run.workdir, "train.log"), "a")
            print(f"[sweep] start {run.run_id} ({status(run)}, {run.steps} steps); log: "
                  f"{log.name}", flush=True)
            proc = subprocess.Popen(command(study, run, "local"), stdout=log,
                                    stderr=subprocess.STDOUT)
            active[proc] = (run, log, time.perf_counter())
        try:
            proc = _wait_any(active)
        except KeyboardInterrupt:  # let every run finish its step and save, then stop
            for child in active:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child, (_, log, _) in active.items():
                child.wait()
                log.close()
            print(f"[sweep] interrupted; {len(active)} run(s) saved a checkpoint; rerun the "
                  f"same command to resume", flush=True)
            raise SystemExit(130) from None
        run, log, t0 = active.pop(proc)
        log.close()
        loss = final_loss(run)
        if proc.returncode == 0 and loss is not None:
            print(f"[sweep] done  {run.run_id}: loss {loss:.4f} in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        else:
            failed.append(run)
            print(f"[sweep] FAILED {run.run_id} (exit {proc.returncode}); see "
                  f"{run.workdir}/train.log; rerun the sweep to resume it", flush=True)
    return failed


def _wait_any(active: dict) -> subprocess.Popen:
    while True:
        for proc in active:
            if proc.poll() is not None:
                return proc
        try:  # block on one child rather than spin; any child's exit is picked up next pass
            next(iter(active)).wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "study config, e.g. "
                                             "experiments/isoflop.py[:micro]")
    flags.DEFINE_enum("backend", "local", ["local", "slurm", "tpu"], "where runs execute")
    flags.DEFINE_bool("dry-run", False, "print the commands; execute nothing")
    flags.DEFINE_integer("parallel", 1, "local backend: runs at a time")
    flags.DEFINE_bool("collect-only", False, "only write results.csv from the workdirs")
    flags.DEFINE_string("results", None, "results CSV (default: SWEEP_DIR/results.csv)")
    flags.mark_flags_as_required(["config"])
    return config


def _main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    dry_run, collect_only = f["dry-run"].value, f["collect-only"].value
    study = _CONFIG.value
    results = f.results or os.path.join(study.sweep_dir, "results.csv")
    try:
        runs = expand(study)
        states = {run.run_id: status(run) for run in runs}
        todo = [run for run in runs if states[run.run_id] != "finished"]
        print(f"[sweep] {study.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, "
              f"{len(todo)} to {'launch' if f.backend == 'local' else 'submit'}", flush=True)
        if not collect_only:
            if f.parallel < 1:
                raise StudyError(f"--parallel={f.parallel}; give 1 or more")
            for run in todo:
                cmd = command(study, run, f.backend)
                if dry_run:
                    print(f"# {run.run_id}: {states[run.run_id]}")
                    print(shlex.join(cmd))
            if not dry_run and f.backend == "local":
                failed = launch_local(study, todo, f.parallel)
                if failed:
                    print(f"[sweep] {len(failed)} run(s) failed: "
                          f"{', '.join(r.run_id for r in failed)}", flush=True)
            elif not dry_run:
                for run in todo:
                    os.makedirs(run.workdir, exist_ok=True)
                    print(f"[sweep] submit {run.run_id}", flush=True)
                    subprocess.run(command(study, run, f.backend), check=True)
    except StudyError as e:
        sys.exit(f"error: {e}")
    if dry_run:
        return
    written, missing = collect(runs, results)
    print(f"[sweep] wrote {written} result(s) to {results}"
          + (f"; {len(missing)} run(s) not finished yet" if missing else ""), flush=True)


_CONFIG = None  # defined by cli(): plan and sweep both own a --config flag


def cli() -> None:
    global _CONFIG
    from absl import app

    _CONFIG = _flags()
    app.run(_main)


if __name__ == "__main__":
    cli()
