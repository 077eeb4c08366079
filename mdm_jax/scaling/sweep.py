"""Run an IsoFLOP study: expand the grid, launch what is not finished, collect results.csv.

    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py:micro --backend local
    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --backend slurm --dry-run
    python -m mdm_jax.scaling.sweep --config=experiments/isoflop.py --collect-only

Every run has a stable id (`mdm-170M-1e+19`) and workdir (`sweep_dir/ID`); it is finished when
its metrics.jsonl holds the validation loss at its last step (else the trainer resumes it). A
NaN/inf final loss counts as diverged: done, kept out of results.csv, listed in diverged.csv.
A run whose workdir lock (mdm_jax.run_lock) a live process holds is running elsewhere: reported
as such, never launched a second time. Backends (`local`, `slurm`, `tpu`) and the rest: README
"Scaling studies".

The local backend's exit code says what state it left the grid in: 0 every run finished (or
diverged, listed); 1 a run it launched failed or stopped short (rerun to resume it); 75
(EX_TEMPFAIL) none failed, but runs another process is training are not finished yet (rerun
once they stop to collect them); 130 interrupted. Its trainers die with it, even by SIGKILL.
"""

from __future__ import annotations

import csv
import ctypes
import fcntl
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import ml_collections

from mdm_jax import run_lock, storage
from mdm_jax.errors import run_absl
from mdm_jax.scaling.plan import Run, StudyError, check_study, expand, fit_on_target, train_args

# loss_se: the Monte Carlo standard error of the final validation loss (eval_loss_se in
# metrics.jsonl), empty where the trainer did not log one; readers treat the column as optional.
RESULT_COLUMNS = ("family", "preset", "non_embedding_params", "budget", "steps", "tokens", "loss",
                  "loss_se")
# Runs whose final validation loss is NaN or infinite, listed beside results.csv.
DIVERGED_FILE = "diverged.csv"
DIVERGED_COLUMNS = ("run_id", "family", "preset", "non_embedding_params", "budget", "steps",
                    "tokens", "loss", "reason", "workdir")
# Exit code of a local sweep that failed no run but left runs to other processes (sysexits.h).
EX_TEMPFAIL = 75


_WARNED: set[str] = set()


def _warn(where: str, what: str) -> None:
    """One warning per file:line per process: status() and collect() read the same files."""
    if where not in _WARNED:
        _WARNED.add(where)
        print(f"[sweep] warning: {where}: {what}", file=sys.stderr, flush=True)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _malformed(row) -> str | None:
    """Why a parsed metrics.jsonl row cannot be a trainer's row, or None if it can."""
    if not isinstance(row, dict):
        kind = {type(None): "null", str: "a string", list: "a list", bool: "a boolean",
                int: "a number", float: "a number"}.get(type(row), type(row).__name__)
        return f"{kind}, not a JSON object"
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return f"its step {step!r} is not an integer"
    if "eval_loss" in row and not _is_number(row["eval_loss"]):
        return f"its eval_loss {row['eval_loss']!r} is not a number"
    return None


def _metrics_rows(run: Run) -> list[dict]:
    """The well-formed rows of the run's metrics.jsonl ([] if there is none).

    A malformed row (not a JSON object, a step that is not an integer, a non-numeric
    eval_loss) is skipped with a warning naming its file and line: data written by one crashed
    run must not stop the collection of a whole sweep. A last line that is not valid JSON was
    cut short by a kill (the trainer drops it when the run resumes) and is skipped silently.
    """
    path = storage.as_path(run.workdir) / "metrics.jsonl"
    try:
        if not path.exists():
            return []
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise StudyError(f"cannot read {path}: {e}; check the sweep_dir's permissions or "
                         f"mount") from None
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                _warn(f"{path}:{number}", f"skipped a row that is not valid JSON: "
                                          f"{line[:80]!r}")
            continue  # the last line: cut short by a kill
        problem = _malformed(row)
        if problem:
            _warn(f"{path}:{number}", f"skipped a malformed metrics row ({problem}): "
                                      f"{line[:80]!r}")
            continue
        rows.append(row)
    return rows


def _outcome(run: Run) -> tuple[float | None, str | None, float | None]:
    """(validation loss logged at the run's last step or None, why the run counts as diverged
    or None, the eval_loss_se logged beside that loss or None). Diverged: that loss is NaN or
    infinite. (A run halted by nonfinite='stop' has no final loss: it resumes like any
    unfinished run, from its last good state.)"""
    loss = se = None
    for row in _metrics_rows(run):
        if row["step"] == run.steps and "eval_loss" in row:
            loss, se = float(row["eval_loss"]), row.get("eval_loss_se")
    # An unusable standard error is left out rather than failing the run: it is optional.
    if not (_is_number(se) and math.isfinite(se) and se >= 0):
        se = None
    if loss is None or math.isfinite(loss):
        return loss, None, se
    return loss, f"final eval_loss {loss} at step {run.steps}", se


def final_loss(run: Run) -> float | None:
    """The validation loss logged at the run's last step, or None if it has not got there.
    NaN or infinite if the run diverged."""
    return _outcome(run)[0]


def status(run: Run) -> str:
    """'finished', 'diverged', 'running (pid N on HOST since T)', 'resume from step N' or
    'new'. The sweep launches only the last two: a running run belongs to the process that
    holds its workdir lock; a diverged run would diverge again (same seed, same data order), so
    it is listed in diverged.csv instead of being relaunched at every sweep; delete its workdir
    to train it afresh (e.g. after lowering optim.lr in study.overrides)."""
    loss, diverged, _ = _outcome(run)
    if diverged is not None:
        return "diverged"
    if loss is not None:
        return "finished"
    who = run_lock.holder(run.workdir)
    if who:
        return f"running ({who})"
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


def collect(runs: list[Run], path: str
            ) -> tuple[int, list[Run], list[tuple[Run, str]], list[dict]]:
    """Write results.csv for every finished run, and diverged.csv beside it for every run that
    diverged (a stale diverged.csv is removed when none did). Returns (rows written, runs
    still missing, [(diverged run, why)], rows kept from the file as it was).

    results.csv holds only finished runs with a finite loss, so every reader (scaling.fit, a
    notebook, a spreadsheet) can put each row on a curve without first filtering a status
    column; the diverged runs are a separate listing with the reason and the workdir.

    A row already in the file stays unless a workdir replaces it: a run whose workdir holds a
    finished (or diverged) run of the same family, size and budget. The rows of runs trained
    on another machine, of workdirs since deleted, or of budgets outside this grid (a study
    run budget by budget, `micro_v2,K`) are the user's results, not stale ones.
    """
    rows, missing, diverged, diverged_rows, kept = [], [], [], [], []
    out = storage.as_path(path)
    earlier = _earlier_rows(out)
    for run in runs:
        loss, why, se = _outcome(run)
        key = _row_key(run.family, run.preset, run.budget)
        row = {"family": run.family, "preset": run.preset,
               "non_embedding_params": run.non_embedding_params,
               "budget": f"{run.budget:.6g}", "steps": run.steps, "tokens": run.tokens}
        if why is not None:
            earlier.pop(key, None)
            diverged.append((run, why))
            diverged_rows.append(row | {"run_id": run.run_id, "loss": str(loss),
                                        "reason": why, "workdir": run.workdir})
        elif loss is None:
            if key in earlier:
                kept.append(earlier.pop(key))
                rows.append(kept[-1])
            else:
                missing.append(run)
        else:
            earlier.pop(key, None)
            rows.append(row | {"loss": f"{loss:.6f}",
                               "loss_se": "" if se is None else f"{se:.6g}"})
    kept += earlier.values()  # rows of budgets or sizes outside this grid
    rows += earlier.values()
    listing = storage.as_path(diverged_path(path))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(out, RESULT_COLUMNS, rows)
        if diverged_rows:
            _write_csv(listing, DIVERGED_COLUMNS, diverged_rows)
        elif listing.exists():
            listing.unlink()  # every run listed there has since been deleted or rerun
    except OSError as e:
        raise StudyError(f"cannot write the results beside {out}: {e}; give a writable "
                         f"--results path") from None
    return len(rows), missing, diverged, kept


def _row_key(family: str, preset: str, budget) -> tuple[str, str, str]:
    return family, preset, f"{float(budget):.6g}"


def _earlier_rows(out) -> dict[tuple[str, str, str], dict]:
    """The rows of an existing results file, by (family, preset, budget)."""
    try:
        text = out.read_text() if out.exists() else ""
    except OSError as e:
        raise StudyError(f"cannot read the existing results {out}: {e}; give another "
                         f"--results path") from None
    reader = csv.DictReader(io.StringIO(text))
    if text and not {"family", "preset", "budget"} <= set(reader.fieldnames or ()):
        raise StudyError(f"{out} is not a results file (its header is {reader.fieldnames}); "
                         f"move it aside or give another --results path")
    earlier = {}
    for line, row in enumerate(reader, start=2):
        try:
            key = _row_key(row["family"], row["preset"], row["budget"])
        except (TypeError, ValueError):
            raise StudyError(f"{out}:{line}: budget {row.get('budget')!r} is not a number; "
                             f"fix or delete that row") from None
        earlier[key] = {c: row.get(c) or "" for c in RESULT_COLUMNS}
    return earlier


def _write_csv(path, columns: tuple[str, ...], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text.getvalue())
    tmp.replace(path)  # a reader never sees half a file (one object write on gs://)


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


def _die_with_sweep():
    """A preexec_fn that has the kernel SIGTERM the trainer when the sweep dies, however it
    dies (SIGKILL, OOM): the trainer saves and stops, as for Ctrl-C, rather than training on
    as an orphan. Linux's prctl(PR_SET_PDEATHSIG); elsewhere a None, and a rerun finds an
    orphan by its workdir lock. Looked up before the fork: the child runs only the call."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sweep = os.getpid()

    def preexec():
        prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != sweep:  # the sweep died before the prctl
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def _claim(study, run: Run):
    """(the run's log, opened for its one writer: this sweep's trainer, None) or (None, who
    trains it elsewhere). A trainer holds the workdir lock; another sweep's trainer may not
    have taken it yet, so sweeps also lock the log, which the trainer inherits as its output
    (the kernel lets go when both have exited)."""
    who = run_lock.holder(run.workdir)
    if who:
        return None, who
    log = open(_local_log(study, run), "a")
    try:
        fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.close()
        return None, "another sweep is starting it"
    return log, None


def launch_local(study, todo: list[Run], parallel: int
                 ) -> tuple[list[Run], list[tuple[Run, str]]]:
    """Run the trainer for each run, `parallel` at a time; return (the runs that failed, the
    runs left to the other process training each [(run, who)]).

    Ctrl-C or SIGTERM (a cluster or CI stopping the sweep) is passed on to the running trainers,
    which finish their step and checkpoint; the sweep then exits and a rerun resumes them.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, _interrupt)
    preexec = _die_with_sweep()
    pending, active, failed, elsewhere = list(todo), {}, [], []
    # [k/N] on every line, and after each run an ETA from the steps done so far.
    n, started, finished, steps_done = len(todo), 0, 0, 0
    steps_total, t_start = sum(r.steps for r in todo), time.perf_counter()
    try:
        while pending or active:
            while pending and len(active) < parallel:
                run = pending.pop(0)
                log, who = _claim(study, run)
                started += 1
                if log is None:  # a skip takes its [k/N] slot and no steps
                    finished, steps_total = finished + 1, steps_total - run.steps
                    elsewhere.append((run, who))
                    print(f"[sweep] [{started}/{n}] skip  {run.run_id}: running elsewhere "
                          f"({who})", flush=True)
                    continue
                print(f"[sweep] [{started}/{n}] start {run.run_id} ({status(run)}, "
                      f"{run.steps} steps); log: {log.name}", flush=True)
                proc = subprocess.Popen(command(study, run, "local"), stdout=log,
                                        stderr=subprocess.STDOUT, preexec_fn=preexec)
                active[proc] = (run, log, time.perf_counter())
            if not active:
                break
            proc = _wait_any(active)
            run, log, t0 = active.pop(proc)
            log.close()
            loss = final_loss(run)
            finished, steps_done = finished + 1, steps_done + run.steps
            left = (time.perf_counter() - t_start) / steps_done * (steps_total - steps_done)
            eta = f"; ETA {left / 60:.0f} min for {n - finished} more" if finished < n else ""
            who = None if loss is not None else run_lock.holder(run.workdir)
            if proc.returncode == 0 and loss is not None:
                print(f"[sweep] [{finished}/{n}] done  {run.run_id}: loss {loss:.4f} in "
                      f"{time.perf_counter() - t0:.0f}s{eta}", flush=True)
            elif who:  # another process took the workdir before our trainer did
                elsewhere.append((run, who))
                print(f"[sweep] [{finished}/{n}] skip  {run.run_id}: running elsewhere "
                      f"({who}){eta}", flush=True)
            else:
                failed.append(run)
                print(f"[sweep] [{finished}/{n}] FAILED {run.run_id} (exit {proc.returncode}"
                      f"{', no final loss' if proc.returncode == 0 else ''}); see "
                      f"{_local_log(study, run)}; rerun the sweep to resume it{eta}",
                      flush=True)
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
    return failed, elsewhere


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
    flags.DEFINE_bool("status", False, "list every run's state and final loss; launch nothing")
    flags.DEFINE_string("plot", None, "with --status: draw every run's curves into this PNG "
                        "(mdm_jax.plot; coloured by family, darker for larger models)")
    flags.DEFINE_string("results", None, "results CSV (default: SWEEP_DIR/results.csv)")
    flags.DEFINE_string("target", None, "compile every run for this target first (mdm_jax.aot, "
                        "needs .venv-accelerators): refuse the sweep if any run does not fit, "
                        "else pass each run its fitted micro-batch and remat")
    flags.DEFINE_float("headroom", 0.1, "with --target: fraction of the chip's memory kept free")
    flags.mark_flags_as_required(["config"])
    return config


def _main(study) -> None:
    from absl import flags

    f = flags.FLAGS
    dry_run, collect_only = f["dry-run"].value, f["collect-only"].value
    if not collect_only and f.parallel < 1:
        raise StudyError(f"--parallel={f.parallel}; give 1 or more")
    check_study(study)
    check_workdirs(study, f.backend)
    if not storage.is_remote(study.sweep_dir) and f.backend != "tpu":
        study.sweep_dir = storage.resolve(study.sweep_dir)  # the same path on every node
    base_file = str(study.base).split(":")[0]
    if f.backend == "local" and os.path.isfile(base_file):  # trainers may run from anywhere
        study.base = os.path.abspath(base_file) + str(study.base)[len(base_file):]
    results = f.results or storage.join(study.sweep_dir, "results.csv")
    runs = expand(study)
    if f.status:
        return show_status(runs, f.plot)
    states = {run.run_id: status(run) for run in runs}
    # A diverged run is done, not resumed: it would diverge again (see `status`). A running
    # one belongs to whoever holds its workdir lock.
    elsewhere = [(run, states[run.run_id].removeprefix("running (").removesuffix(")"))
                 for run in runs if states[run.run_id].startswith("running")]
    todo = [run for run in runs if states[run.run_id] not in ("finished", "diverged")
            and not states[run.run_id].startswith("running")]
    n_diverged = sum(state == "diverged" for state in states.values())
    print(f"[sweep] {study.name}: {len(runs)} runs, "
          f"{len(runs) - len(todo) - n_diverged - len(elsewhere)} finished, "
          + (f"{n_diverged} diverged (not relaunched), " if n_diverged else "")
          + (f"{len(elsewhere)} running elsewhere, " if elsewhere else "")
          + f"{len(todo)} to {'launch' if f.backend == 'local' else 'submit'}", flush=True)
    for run, who in elsewhere:
        print(f"[sweep] {run.run_id} is running elsewhere ({who}); not launched", flush=True)
    if f.target and todo and not collect_only:
        todo = fitted(study, todo, f.target, f.headroom)
    failed = []
    if not collect_only:
        for run in todo:
            cmd = command(study, run, f.backend)
            if dry_run:
                print(f"# {run.run_id}: {states[run.run_id]}")
                print(shlex.join(cmd))
        if not dry_run and f.backend == "local":
            failed, skipped = launch_local(study, todo, f.parallel)
            elsewhere += skipped
        elif not dry_run:
            submit(study, todo, f.backend)
    if dry_run:
        return
    written, missing, diverged, kept = collect(runs, results)
    print(f"[sweep] wrote {written} result(s) to {results}"
          + (f" ({len(kept)} kept from the file: no workdir here replaces them)" if kept
             else "")
          + (f"; {len(missing)} run(s) not finished yet" if missing else ""), flush=True)
    if diverged:
        print(f"[sweep] {len(diverged)} run(s) diverged, left out of the results and not "
              f"relaunched; listed in {diverged_path(results)} (delete a run's workdir to "
              f"train it afresh):", flush=True)
        for run, why in diverged:
            print(f"[sweep]   {run.run_id}: {why}", flush=True)
    if f.backend == "local" and not collect_only:
        _exit_local(failed, elsewhere, missing)


def _exit_local(failed: list[Run], elsewhere: list[tuple[Run, str]], missing: list[Run]):
    """Exit 1 if a run this sweep launched failed, EX_TEMPFAIL if runs that other processes
    train are not finished yet (they may have finished while this sweep ran), else return."""
    unfinished = {run.run_id for run in missing}
    elsewhere = [(run, who) for run, who in elsewhere if run.run_id in unfinished]
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: "
              f"{', '.join(r.run_id for r in failed)}", flush=True)
    if elsewhere:
        print(f"[sweep] {len(elsewhere)} run(s) running elsewhere, not finished yet: "
              + ", ".join(f"{run.run_id} ({who})" for run, who in elsewhere)
              + "; rerun the sweep once they stop to collect them", flush=True)
    if failed or elsewhere:
        raise SystemExit(1 if failed else EX_TEMPFAIL)


def show_status(runs: list[Run], plot_path: str | None) -> None:
    """Each run's state and final validation loss; with plot_path, every run that has logged
    anything drawn by mdm_jax.plot."""
    for run in runs:
        loss = final_loss(run)
        print(f"{run.run_id:<28} {status(run):<22} "
              + ("" if loss is None else f"loss {loss:.4f}"), flush=True)
    if plot_path:
        from mdm_jax import plot

        drawn = [plot.read_run(r.workdir, r.run_id) for r in runs
                 if (storage.as_path(r.workdir) / "metrics.jsonl").exists()
                 and (storage.as_path(r.workdir) / "config.json").exists()]
        if not drawn:
            raise StudyError(f"--plot {plot_path}: no run of the sweep has logged anything yet")
        plot.plot_runs(drawn, plot_path, by_family=True,
                       title=f"{len(drawn)} of {len(runs)} runs")
        print(f"[sweep] wrote {plot_path} ({len(drawn)} runs)", flush=True)


def fitted(study: ml_collections.ConfigDict, todo: list[Run], target: str,
           headroom: float) -> list[Run]:
    """The runs with the micro-batch and remat that fit them on the target; a StudyError naming
    every run that does not fit, before anything is submitted."""
    import dataclasses

    reports = fit_on_target(study, todo, target, study.assumed_mfu, headroom)
    bad = [f"{r.run_id} (peak {f.peak_gib:.1f} GiB of {f.usable_gib:.1f} usable)"
           for r in todo if not (f := reports[r.run_id]).fits]
    if bad:
        raise StudyError(f"{len(bad)} run(s) do not fit on {target}, nothing submitted: "
                         f"{', '.join(bad)}; drop them from the grid, raise config.mesh.fsdp or "
                         f"pick a larger target")
    return [dataclasses.replace(r, fit_args=(
        f"--config.micro_batch={reports[r.run_id].micro_batch}",
        f"--config.model.remat={reports[r.run_id].remat}")) for r in todo]


def diverged_path(results: str) -> str:
    """Where collect() lists the diverged runs: diverged.csv beside the results file."""
    return str(storage.as_path(results).parent / DIVERGED_FILE)


def cli() -> None:
    run_absl(_flags, _main)


if __name__ == "__main__":
    cli()
