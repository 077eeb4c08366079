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
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import ml_collections

from mdm_jax import storage
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
    path = storage.as_path(run.workdir) / "metrics.jsonl"
    if not path.exists():
        return None
    loss = None
    for line in path.read_text().splitlines():
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
    ckpt = storage.as_path(run.workdir) / "checkpoints"
    steps = [int(d.name) for d in ckpt.iterdir() if d.name.isdigit()] if ckpt.is_dir() else []
    return f"resume from step {max(steps)}" if steps else "new"


def job_name(run: Run) -> str:
    """The Slurm job / xpk workload name of a run (xpk: lower case, no '+' or '.')."""
    return "mdm-" + run.run_id.lower().replace("+", "").replace(".", "p")


def check_workdirs(study: ml_collections.ConfigDict, backend: str) -> None:
    """Runs on other machines must write where this one collects from."""
    root = str(study.sweep_dir)
    if backend == "tpu" and not (storage.is_remote(root) or os.path.isabs(root)):
        raise StudyError(
            f"sweep_dir={root!r} is a path inside each xpk container, lost with the pod; set "
            f"--config.sweep_dir=gs://BUCKET/PATH (or the mount point of a storage in "
            f"--config.tpu.storage)")


def _output(cmd: list[str], what: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True,
                              timeout=120).stdout
    except FileNotFoundError:
        raise StudyError(f"{cmd[0]} not found: run the {what} backend where {cmd[0]} works"
                         ) from None
    except subprocess.CalledProcessError as e:
        raise StudyError(f"{shlex.join(cmd)} failed (exit {e.returncode}): "
                         f"{(e.stderr or e.stdout).strip()[:300]}") from None


def slurm_jobs() -> dict[str, str]:
    """This user's queued or running Slurm jobs: name -> 'STATE (job ID)'."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    cmd = ["squeue", "-h", "-o", "%j|%i|%T"] + (["-u", user] if user else [])
    jobs = {}
    for line in _output(cmd, "slurm").splitlines():
        name, _, rest = line.strip().partition("|")
        job_id, _, state = rest.partition("|")
        if name:
            jobs[name] = f"{state} (job {job_id})"
    return jobs


def xpk_workloads(study: ml_collections.ConfigDict) -> dict[str, bool]:
    """Workloads xpk still lists: name -> finished? (xpk keeps finished JobSets for 12 h; its
    Status column is the Kueue condition, 'Finished' once the JobSet ended)."""
    out = _output(["xpk", "workload", "list", f"--cluster={study.tpu.cluster}",
                   "--filter-by-job=mdm-"], "tpu")
    workloads = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].startswith("mdm-"):
            workloads[cells[0]] = "Finished" in cells
    return workloads


def command(study: ml_collections.ConfigDict, run: Run, backend: str) -> list[str]:
    args = train_args(study, run)
    if backend == "local":
        return [sys.executable, "-m", "mdm_jax.train", *args]
    if backend == "slurm":
        s = study.slurm
        cmd = ["sbatch", f"--job-name={job_name(run)}", f"--nodes={s.nodes}",
               f"--gpus-per-node={s.gpus_per_node}", f"--time={s.time}",
               f"--output={run.workdir}/slurm-%j.out"]
        if s.partition:
            cmd.append(f"--partition={s.partition}")
        cmd += shlex.split(s.extra)
        return [*cmd, "launch/slurm.sbatch", *args]
    if backend == "tpu":
        t = study.tpu
        env = [f"TPU_CLUSTER={t.cluster}", f"TPU_TYPE={t.type}",
               f"TPU_NUM_SLICES={t.num_slices}", f"TPU_IMAGE={t.image}",
               f"TPU_MAX_RESTARTS={t.max_restarts}", f"TPU_GRACE_SECONDS={t.grace_seconds}"]
        if t.storage:
            env.append(f"TPU_STORAGE={t.storage}")
        if t.extra:
            env.append(f"XPK_EXTRA={t.extra}")
        return ["env", *env, "bash", "launch/tpu.sh", "xpk", job_name(run), "--", *args]
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
    out = storage.as_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = out.parent / (out.name + ".tmp")
    tmp.write_text(text.getvalue())
    tmp.replace(out)  # a reader never sees half a file (one object write on gs://)
    return len(rows), missing


def submit(study: ml_collections.ConfigDict, todo: list[Run], backend: str) -> int:
    """Submit each run not already queued or running; returns how many were submitted.

    Slurm: a run whose job (by name) is in squeue is left alone, so two jobs never train into
    one workdir. xpk: a workload still running is left alone; one that finished (xpk keeps it
    for 12 h) is deleted first, since xpk refuses to create a name that exists.
    """
    submitted = 0
    if backend == "slurm":
        queued = slurm_jobs()
        for run in todo:
            if job_name(run) in queued:
                print(f"[sweep] skip {run.run_id}: {job_name(run)} is {queued[job_name(run)]} "
                      f"in Slurm", flush=True)
                continue
            storage.as_path(run.workdir).mkdir(parents=True, exist_ok=True)
            print(f"[sweep] submit {run.run_id}", flush=True)
            _output(command(study, run, backend), "slurm")
            submitted += 1
    elif backend == "tpu":
        workloads = xpk_workloads(study)
        for run in todo:
            name = job_name(run)
            if name in workloads and not workloads[name]:
                print(f"[sweep] skip {run.run_id}: workload {name} is still active in xpk",
                      flush=True)
                continue
            if name in workloads:
                print(f"[sweep] {name} finished without a final loss; deleting it to resubmit",
                      flush=True)
                _output(["xpk", "workload", "delete", f"--cluster={study.tpu.cluster}",
                         f"--workload={name}"], "tpu")
            print(f"[sweep] submit {run.run_id}", flush=True)
            _output(command(study, run, backend), "tpu")
            submitted += 1
    return submitted


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
            log = open(_local_log(study, run), "a")
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
                  f"{_local_log(study, run)}; rerun the sweep to resume it", flush=True)
    return failed


def _local_log(study, run: Run) -> str:
    """train.log beside the run, or under ./sweep_logs when the workdir is object storage."""
    if storage.is_remote(run.workdir):
        path = os.path.join("sweep_logs", study.name, f"{run.run_id}.log")
    else:
        path = os.path.join(run.workdir, "train.log")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


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
    try:
        check_workdirs(study, f.backend)
        if not storage.is_remote(study.sweep_dir) and f.backend != "tpu":
            study.sweep_dir = storage.resolve(study.sweep_dir)  # the same path on every node
        results = f.results or storage.join(study.sweep_dir, "results.csv")
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
                submit(study, todo, f.backend)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
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
