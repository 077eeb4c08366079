"""A real Slurm 22.05 on localhost (slurmctld + slurmd + munge from Debian's slurm-wlm) runs
launch/slurm.sbatch with 2 tasks on CPU devices: both processes join jax.distributed, train and
checkpoint; `scancel --signal=TERM` makes them save the same step and exit 42 (task 1's save
slowed down on purpose, and srun never kills a task for it); the script requeues the job, which
resumes and finishes with losses bitwise identical to an uninterrupted job. A task killed
outright fails the job with a one-line hint to resubmit. The sweep's Slurm backend leaves a run
alone while its job is still queued or running.
Skipped, with the reason, where the Slurm daemons are not installed (`.ci/run` installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
STEPS = 40

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("slurm"),  # one localhost Slurm (fixed ports) for the module
    pytest.mark.skipif(not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged")),
                       reason="Slurm is not installed here (apt-get install slurm-wlm munge)"),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a one-node cluster claiming 4 CPUs (2 jobs of 2 tasks fit side by side)."""
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_LOCAL_CPUS="4")
    started = subprocess.run(["bash", os.path.join(TESTS, "slurm_localhost.sh"), "start",
                              str(state)], capture_output=True, text=True, env=env, timeout=120)
    assert started.returncode == 0, started.stderr
    conf = started.stdout.strip().splitlines()[-1]
    yield conf
    subprocess.run(["bash", os.path.join(TESTS, "slurm_localhost.sh"), "stop", str(state)],
                   capture_output=True, timeout=120)


def _env(conf: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MDM_JAX_"))}
    env.update(SLURM_CONF=conf, MDM_JAX_PLATFORM="cpu", MDM_JAX_PYTHON=sys.executable,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return env


# Loaded by each trainer with its config: task 1 writes its data position slowly at every
# final save (the preemption's and the run's last), as a slow disk would.
SLOW_FINAL_SAVE = """
import os, time
if os.environ.get("SLURM_PROCID") == "1":
    import grain.checkpoint
    from mdm_jax.checkpoint import Checkpointer
    final, save, write = [False], Checkpointer.save, grain.checkpoint.CheckpointHandler.save

    def save_noting_final(self, *args, force=False, **kwargs):
        final[0] = force
        return save(self, *args, force=force, **kwargs)

    def slow_write(self, *args, **kwargs):
        if final[0]:
            time.sleep(5)
        write(self, *args, **kwargs)
        if final[0]:
            print("[test] task 1 wrote its slow save", flush=True)

    Checkpointer.save, grain.checkpoint.CheckpointHandler.save = save_noting_final, slow_write
"""

# Loaded by each trainer with its config: where to find task 1's trainer, to kill it.
WRITE_PID = """
import os
with open(os.path.join(WORKDIR, f"task{os.environ['SLURM_PROCID']}.pid"), "w") as f:
    f.write(str(os.getpid()))
"""


def _config(tmp_path, tiny_data, workdir, prelude: str = "") -> str:
    path = tmp_path / f"cfg_{os.path.basename(workdir)}.py"
    path.write_text(
        f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import nano_config\n"
        f"WORKDIR = {str(workdir)!r}\n{prelude}\n"
        "def get_config():\n"
        "    return nano_config(**{"
        f"'data.train_dir': {tiny_data['train']!r}, 'data.eval_dir': '', "
        f"'workdir': {str(workdir)!r}, 'steps': {STEPS}, 'log_every': 1, "
        "'checkpoint_every': 10, 'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})\n")
    return str(path)


def _sbatch(conf, config, workdir) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2",
         "--cpus-per-task=1", f"--output={workdir}/slurm-%j.out", "launch/slurm.sbatch",
         f"--config={config}"],
        cwd=ROOT, env=_env(conf), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _job(conf, job_id) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=_env(conf),
                         capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(conf, job_id, done, deadline_s=400) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        job = _job(conf, job_id)
        if done(job):
            return job
        time.sleep(0.5)  # polling Slurm's view of the job
    raise AssertionError(f"job {job_id} did not get there in {deadline_s}s: {job}")


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _log_tail(workdir, job_id) -> str:
    path = os.path.join(workdir, f"slurm-{job_id}.out")
    return open(path, errors="replace").read()[-3000:] if os.path.exists(path) else "(no log)"


def _logged_steps(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_sbatch_joins_trains_saves_on_sigterm_and_resumes_after_requeue(slurm, tiny_data,
                                                                        tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "preempted"
    for d in (ref_dir, run_dir):
        d.mkdir()
    ref = _sbatch(slurm, _config(tmp_path, tiny_data, ref_dir), ref_dir)
    job = _sbatch(slurm, _config(tmp_path, tiny_data, run_dir, SLOW_FINAL_SAVE), run_dir)
    # Preempt the job once it is training (a few steps logged), as Slurm would.
    end = time.monotonic() + 300
    while _logged_steps(run_dir) < 3:
        assert time.monotonic() < end, (_job(slurm, job), _log_tail(run_dir, job))
        assert _job(slurm, job).get("JobState") in ("PENDING", "RUNNING"), (
            _job(slurm, job), _log_tail(run_dir, job))
        time.sleep(0.2)  # polling the trainer's progress
    subprocess.run(["scancel", "--signal=TERM", job], env=_env(slurm), check=True, timeout=30)
    final = _wait(slurm, job, lambda j: j.get("JobState") in ("COMPLETED", "FAILED",
                                                                "CANCELLED", "TIMEOUT"))
    log = open(os.path.join(run_dir, f"slurm-{job}.out"), errors="replace").read()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", log[-3000:]
    ref_final = _wait(slurm, ref, lambda j: j.get("JobState") in ("COMPLETED", "FAILED"))
    assert ref_final["JobState"] == "COMPLETED"

    # Both processes joined one jax.distributed job, at each of the two starts.
    assert log.count("process_count: 2") == 4 and log.count("collective: ok") == 4
    saved = re.search(r"preempted \(SIGTERM\): saved step (\d+)", log)
    assert saved, log[-3000:]
    assert f"requeueing job {job}" in log and f"resumed from {run_dir}/checkpoints/" \
        f"{saved.group(1)}" in log
    assert 3 <= int(saved.group(1)) < STEPS
    # Task 1's slow saves finished, and no task's exit was a bad exit to srun: srun never
    # killed the tasks (it would at the first exit 42, mid-save or not).
    assert log.count("[test] task 1 wrote its slow save") == 2, log[-3000:]
    assert not re.search(r"srun: .*(Exited with exit code|Terminating StepId)", log), log[-3000:]
    # The requeued run continued exactly: every step's loss equals the uninterrupted job's.
    losses, reference = _losses(run_dir), _losses(ref_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(reference)
    assert losses == reference


def test_a_task_killed_outright_fails_the_job_with_a_hint_to_resubmit(slurm, tiny_data,
                                                                      tmp_path):
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    config = _config(tmp_path, tiny_data, run_dir, WRITE_PID)
    job = _sbatch(slurm, config, run_dir)
    end = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "10").exists():  # a finished save to resume from
        assert time.monotonic() < end, (_job(slurm, job), _log_tail(run_dir, job))
        assert _job(slurm, job).get("JobState") in ("PENDING", "RUNNING"), (
            _job(slurm, job), _log_tail(run_dir, job))
        time.sleep(0.2)  # polling the trainer's progress
    os.kill(int((run_dir / "task1.pid").read_text()), signal.SIGKILL)  # as the OOM killer would
    final = _wait(slurm, job, lambda j: j.get("JobState") in ("COMPLETED", "FAILED",
                                                                "CANCELLED", "TIMEOUT"))
    log = open(os.path.join(run_dir, f"slurm-{job}.out"), errors="replace").read()
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("FAILED", "137:0",
                                                                         "0"), log[-3000:]
    hints = [line for line in log.splitlines() if line.startswith("[slurm] a training task")]
    assert hints == [
        "[slurm] a training task was killed by SIGKILL (exit 137) and only a preemption that "
        "saved (exit 42) requeues: resubmit the job with the same options (sbatch ... "
        f"launch/slurm.sbatch --config={config}) and it resumes from its last checkpoint"], \
        log[-3000:]


def test_sweep_does_not_resubmit_a_run_whose_job_is_queued_or_running(slurm, tiny_data,
                                                                      tmp_path):
    study = write_study(tmp_path / "study.py", {
        "grid": ("2e9: 13K",), "batch": 8, "seq_len": 64, "sweep_dir": str(tmp_path / "sweep"),
        "overrides": (f"data.train_dir={tiny_data['train']}", "data.eval_dir=",
                      "model.dtype=float32"),
        "slurm.gpus_per_node": 0, "slurm.time": "10:00",
        "slurm.extra": "--ntasks-per-node=1 --cpus-per-task=1 --hold"})
    sweep = [sys.executable, "-m", "mdm_jax.scaling.sweep", f"--config={study}",
             "--backend", "slurm"]
    first = subprocess.run(sweep, cwd=ROOT, env=_env(slurm), capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    assert "[sweep] submit mdm-13K-" in first.stdout
    # The job is held (--hold): PENDING. A second sweep must leave it alone.
    second = subprocess.run(sweep, cwd=ROOT, env=_env(slurm), capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    assert re.search(r"skip mdm-13K-\S+: mdm-mdm-13k-\S+ is PENDING \(job \d+\) in Slurm",
                     second.stdout), second.stdout
    assert "[sweep] submit" not in second.stdout
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], env=_env(slurm), capture_output=True,
                            text=True, timeout=30).stdout.split()
    assert len([name for name in queued if name.startswith("mdm-mdm-13k-")]) == 1
    subprocess.run(["scancel", "--name", queued[0]], env=_env(slurm), timeout=30)
