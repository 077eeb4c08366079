"""Launcher dry runs: the exact commands, checked against the flags of the tools' releases.

Facts relied on (read from the tools' own source / reference, 2026-11):
- xpk 1.16.0 (PyPI `xpk`, xpk/parser/workload.py, xpk/commands/workload.py): `workload create`
  takes --cluster --workload --tpu-type --num-slices --docker-image --command, --storage NAME
  (repeatable; a storage made by `xpk storage attach`), --max-restarts (default 0) and
  --termination-grace-period-seconds (default 30); JobSets restart on exit codes 42 and 127-255
  only; `workload list --cluster C --filter-by-job S` and `workload delete --cluster C
  --workload W`; a finished workload is kept 12 h (--ttl-seconds-after-finished 43200) and
  `create` refuses a name that exists.
- gcloud compute tpus tpu-vm: create NAME --zone --accelerator-type --version [--spot];
  describe NAME --zone --format='value(state)' gives READY, PREEMPTED, TERMINATED, ...;
  ssh/scp take --worker=all (the default is worker 0 alone).
- Slurm 22.05: srun no longer inherits --cpus-per-task from sbatch (pass it to srun);
  `srun --kill-on-bad-exit=1` kills the whole step at the first task that exits non-zero (any
  code) or by a signal; a step's signals (scancel, --signal) reach every process of a task.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

from conftest import write_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XPK_CREATE_FLAGS = {"--cluster", "--workload", "--tpu-type", "--num-slices", "--docker-image",
                    "--command", "--storage", "--max-restarts",
                    "--termination-grace-period-seconds"}
XPK_RESTART_CODES = {42, *range(127, 256)}


def _env(**extra):
    """The environment without the test suite's XLA_FLAGS (launchers keep a caller's flags)."""
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **extra}


def _dry(script, *args, **env):
    return subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True,
                          env=_env(DRY_RUN="1", **env), timeout=60)


def _flags(words):
    return {w.split("=")[0] for w in words if w.startswith("--")}


def test_local_launcher():
    gpu = subprocess.run(["bash", "launch/local.sh", "--dry-run", "--gpu",
                          "--config=experiments/smdm.py:170M"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=_env())
    assert gpu.returncode == 0, gpu.stderr
    assert gpu.stdout.splitlines() == [
        "bash launch/setup.sh cuda",
        "env JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "
        "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true .venv/bin/python -m "
        "mdm_jax.train --config=experiments/smdm.py:170M"]
    kept = subprocess.run(["bash", "launch/local.sh", "--dry-run", "--gpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d"))
    assert ("XLA_FLAGS=--xla_dump_to=/tmp/d\\ --xla_gpu_enable_latency_hiding_scheduler=true"
            in kept.stdout)
    cpu = subprocess.run(["bash", "launch/local.sh", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=_env())
    assert cpu.stdout.splitlines()[-1] == ("env JAX_PLATFORMS=cpu .venv/bin/python -m "
                                           "mdm_jax.train --config=experiments/tiny.py")


def test_slurm_launcher_checks_then_trains_and_requeues_on_preemption():
    out = _dry("launch/slurm.sbatch", "--config=experiments/smdm.py:1028M",
               SLURM_CPUS_PER_TASK="32")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == ("srun --kill-on-bad-exit=1 --cpus-per-task=32 .venv/bin/python -m "
                        "mdm_jax.distributed --check")
    assert lines[2] == ("srun --kill-on-bad-exit=1 --cpus-per-task=32 bash launch/slurm_task.sh "
                        ".venv/bin/python -m mdm_jax.train --config=experiments/smdm.py:1028M "
                        "--config.preemption_exit_code=42")
    header = [line for line in open(os.path.join(ROOT, "launch/slurm.sbatch"))
              if line.startswith("#SBATCH")]
    for option in ("--requeue", "--ntasks-per-node=1", "--cpus-per-task=16",
                   "--signal=TERM@300", "--open-mode=append"):
        assert any(option in line for line in header), option
    script = open(os.path.join(ROOT, "launch/slurm.sbatch")).read()
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_slurm_task_turns_a_saved_preemption_into_a_good_exit(tmp_path):
    """srun would kill every task at the first exit 42: the wrapper makes it 0 and leaves the
    batch script a mark, passes any other code on (a kill as 128+N), and outlives the SIGTERM
    that Slurm sends to every process of the task while the trainer saves."""
    marks = tmp_path / "marks"
    marks.mkdir()
    env = _env(MDM_JAX_SLURM_MARKS=str(marks))

    def task(code, procid):
        return subprocess.Popen(["bash", "launch/slurm_task.sh", sys.executable, "-c", code],
                                cwd=ROOT, env=dict(env, SLURM_PROCID=procid),
                                start_new_session=True)

    assert task("raise SystemExit(42)", "3").wait(timeout=60) == 0
    assert os.listdir(marks) == ["3"]
    assert task("raise SystemExit(3)", "4").wait(timeout=60) == 3
    assert task("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "4").wait(
        timeout=60) == 128 + signal.SIGKILL
    assert os.listdir(marks) == ["3"]
    ready = tmp_path / "ready"
    trainer = task("import pathlib, signal, sys, time\n"
                   "signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))  # saves, exits 42\n"
                   f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(120)", "5")
    end = time.monotonic() + 60
    while not ready.exists():
        assert trainer.poll() is None and time.monotonic() < end
        time.sleep(0.05)  # polling for the handler to be in place
    os.killpg(trainer.pid, signal.SIGTERM)  # the shell and the trainer, as slurmstepd does
    assert trainer.wait(timeout=60) == 0
    assert sorted(os.listdir(marks)) == ["3", "5"]


def test_tpu_vm_launcher(tmp_path):
    create = _dry("launch/tpu.sh", "create", "slice1", TPU_TYPE="v5p-128", TPU_SPOT="1")
    assert create.stdout.strip() == (
        "gcloud compute tpus tpu-vm create slice1 --zone=us-east5-a "
        "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5 --spot")
    setup = _dry("launch/tpu.sh", "setup", "slice1").stdout.splitlines()
    assert setup[1].startswith("gcloud compute tpus tpu-vm scp /tmp/mdm_jax_src.tgz slice1:")
    remote = shlex.split(setup[2])
    assert remote[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "slice1", "--worker=all"]
    assert "uv python install 3.11" in remote[-1]
    assert "PYTHON=$(~/.local/bin/uv python find 3.11) bash launch/setup.sh tpu" in remote[-1]
    train = shlex.split(_dry("launch/tpu.sh", "train", "slice1", "--",
                             "--config=experiments/smdm.py:170M",
                             "--config.workdir=gs://b/run 1").stdout)
    assert train[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "slice1", "--worker=all"]
    on_worker = shlex.split(train[-1])  # what the worker's shell runs
    at = on_worker.index("nohup")  # the trainers outlive the SSH session
    assert on_worker[at + 1:at + 3] == ["bash", "-c"]
    job = on_worker[at + 3]
    assert shlex.split(job) == [
        "python", "-m", "mdm_jax.distributed", "--check", "&&", "python", "-m", "mdm_jax.train",
        "--config=experiments/smdm.py:170M", "--config.workdir=gs://b/run 1",
        "--config.preemption_exit_code=42"]
    assert on_worker[at + 4:at + 10] == [">>", "train.log", "2>&1", "<", "/dev/null", "&"]


def test_tpu_create_recreates_a_preempted_slice(tmp_path):
    """A stand-in gcloud on PATH (no Google Cloud here) that reports the slice's state and
    records what it is asked to do."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >> {calls}
        [[ "$*" == *describe* ]] && echo "$FAKE_STATE"
        exit 0
        """))
    fake.chmod(0o755)
    path = f"{fake.parent}:{os.environ['PATH']}"
    for state, expect in (("PREEMPTED", ["describe", "delete", "create"]),
                          ("READY", ["describe"]), ("", ["describe", "create"])):
        calls.write_text("")
        out = subprocess.run(["bash", "launch/tpu.sh", "create", "s1"], cwd=ROOT, text=True,
                             capture_output=True, env=_env(PATH=path, FAKE_STATE=state),
                             timeout=60)
        assert out.returncode == 0, out.stderr
        verbs = [line.split()[3] for line in calls.read_text().splitlines()]
        assert verbs == expect, (state, verbs)
    calls.write_text("")
    creating = subprocess.run(["bash", "launch/tpu.sh", "create", "s1"], cwd=ROOT, text=True,
                              capture_output=True, env=_env(PATH=path, FAKE_STATE="CREATING"),
                              timeout=60)
    assert creating.returncode == 2 and "wait until it is READY" in creating.stderr


def test_xpk_launcher_flags_exist_and_preemption_restarts():
    out = _dry("launch/tpu.sh", "xpk", "w1", "--", "--config=experiments/smdm.py:170M",
               TPU_CLUSTER="c1", TPU_IMAGE="img:1", TPU_STORAGE="ckpt,data")
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[:3] == ["xpk", "workload", "create"]
    assert _flags(words) <= XPK_CREATE_FLAGS
    assert {"--max-restarts=10", "--termination-grace-period-seconds=300", "--storage=ckpt",
            "--storage=data", "--cluster=c1", "--workload=w1", "--tpu-type=v5p-64",
            "--num-slices=1", "--docker-image=img:1"} <= set(words)
    command = next(w for w in words if w.startswith("--command="))[len("--command="):]
    assert "--config.preemption_exit_code=42" in command
    assert command.startswith("python -m mdm_jax.distributed --check && ")
    from mdm_jax.config import base_config

    assert 42 in XPK_RESTART_CODES and base_config().preemption_exit_code == 0
    bad = _dry("launch/tpu.sh", "xpk", "w1", "--", "x", TPU_IMAGE="i")
    assert bad.returncode != 0 and "set TPU_CLUSTER" in bad.stderr


def test_xpk_sweep_skips_active_workloads_and_replaces_finished_ones(tmp_path):
    """A stand-in `xpk` on PATH (no GKE here) prints xpk 1.16's workload table and records
    calls: a run whose workload is still admitted is left alone, one whose workload finished
    without a final loss is deleted and created again (xpk refuses an existing name), and a run
    with no workload is created."""
    import sys

    from mdm_jax.scaling.plan import expand
    from mdm_jax.scaling.sweep import job_name

    study = write_study(tmp_path / "study.py", {
        "grid": ("2e11: 13K,27K,56K",), "sweep_dir": str(tmp_path / "mounted" / "sweep"),
        "tpu.cluster": "gke1"})
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", study)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = [job_name(r) for r in expand(module.get_config())]
    calls = tmp_path / "calls"
    table = ("Workload List Output:\n"
             "Jobset Name   Created Time   Priority   TPU/GPU VMs Needed   TPU/GPU VMs "
             "Running/Ran   TPU/GPU VMs Done   Status   Status Message   Status Time\n"
             f"{names[0]}   2026-11-23T10:00:00Z   medium   16   16   <none>   Admitted   "
             "Admitted by ClusterQueue   2026-11-23T10:01:00Z\n"
             f"{names[1]}   2026-11-23T09:00:00Z   medium   16   16   16   Finished   "
             "Job failed   2026-11-23T09:30:00Z\n")
    fake = tmp_path / "bin" / "xpk"
    fake.parent.mkdir()
    fake.write_text("#!/usr/bin/env bash\n"
                    f"echo \"$*\" >> {calls}\n"
                    f"[ \"$2\" = list ] && cat {tmp_path / 'table'}\n"
                    "exit 0\n")
    fake.chmod(0o755)
    (tmp_path / "table").write_text(table)
    out = subprocess.run([sys.executable, "-m", "mdm_jax.scaling.sweep", f"--config={study}",
                          "--backend", "tpu"], cwd=ROOT, capture_output=True, text=True,
                         env=_env(PATH=f"{fake.parent}:{os.environ['PATH']}"), timeout=120)
    assert out.returncode == 0, out.stderr
    recorded = calls.read_text().splitlines()
    assert recorded[0] == "workload list --cluster=gke1 --filter-by-job=mdm-"
    assert f"skip mdm-13K-2e+11: workload {names[0]} is still active in xpk" in out.stdout
    assert recorded[1] == f"workload delete --cluster=gke1 --workload={names[1]}"
    created = [line.split("--workload=")[1].split()[0] for line in recorded
               if line.startswith("workload create")]
    assert created == names[1:]
    assert all("--config.workdir=" + str(tmp_path / "mounted" / "sweep") in line
               for line in recorded if line.startswith("workload create"))


def test_cuda12_extra_is_offered_beside_cuda13():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    extras = cfg["options.extras_require"]
    assert "jax[cuda13]==0.10.2" in extras["cuda"].split()
    assert "jax[cuda12]==0.10.2" in extras["cuda12"].split()
    for name in ("cuda", "cuda12", "tpu"):  # pods keep workdirs on gs://
        assert any(line.startswith("gcsfs==") for line in extras[name].split())


def test_the_test_runner_keeps_an_xdist_group_on_one_worker(tmp_path):
    """launch/test.sh runs `--dist loadgroup` so that tests sharing one machine-wide resource
    (one localhost Slurm on fixed ports, libtpu's lock file) never run side by side. pytest 9
    with pytest-xdist 3.8 dropped the groups without a word: the two Slurm tests started two
    clusters on the same ports and one job failed at random."""
    (tmp_path / "test_grouped.py").write_text(textwrap.dedent("""
        import os
        import pytest

        pytestmark = pytest.mark.xdist_group("one_resource")

        @pytest.mark.parametrize("i", range(4))
        def test_note_worker(i, tmp_path_factory):
            out = tmp_path_factory.getbasetemp().parent.parent / "workers"
            with open(out, "a") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    """))
    (tmp_path / "base").mkdir()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                          "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "base" / "t"),
                          str(tmp_path / "test_grouped.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    workers = (tmp_path / "base" / "workers").read_text().split()
    assert len(workers) == 4 and len(set(workers)) == 1, workers
