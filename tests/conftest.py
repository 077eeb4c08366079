"""Test set-up: 8 simulated CPU devices (set before jax is imported) and a tiny prepared corpus."""

from __future__ import annotations

import json
import os
import random

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

# One XLA compilation cache for the session and every trainer subprocess it starts (they inherit
# the environment): each train() builds a new Trainer whose jitted step would otherwise be
# compiled again, the same nano step dozens of times.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"mdm_jax_test_xla_cache_{os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

_XLA_CACHE_IS_OURS = os.environ["JAX_COMPILATION_CACHE_DIR"].endswith(f"_{os.getpid()}")


def pytest_collection_modifyitems(config, items):
    """Tiers (pyproject.toml markers): a test that needs the prepared corpus (`tiny_data`) runs
    the real pipeline end to end, so it is `e2e` unless marked `slow`; the rest are unit tests,
    which `bash launch/test.sh --fast` runs alone."""
    import pytest

    for item in items:
        if "slow" not in item.keywords and "tiny_data" in item.fixturenames:
            item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish(session, exitstatus):
    """The session's own compilation cache goes with it (one set by the caller stays)."""
    if _XLA_CACHE_IS_OURS:
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Shard checksums verified by the tests are remembered here, not in the user's ~/.cache.
os.environ.setdefault("MDM_JAX_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"mdm_jax_test_cache_{os.getpid()}"))

import pytest  # noqa: E402
import zstandard  # noqa: E402

SEQ_LEN = 64
VOCAB = 512
_WORDS = ("the king queen lord lady said to of and my his her in is was with for that not thou "
          "thee shall will what good night day love death sword crown heaven fair sweet speak "
          "come go hath doth know see hear").split()


def _document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 10)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 10))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A SlimPajama-layout corpus prepared into train/validation shards with a 512-piece
    tokenizer: {"train": dir, "validation": dir, "tokenizer": path}."""
    from mdm_jax.data import prepare, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_corpus")
    rng = random.Random(0)
    for split, n_docs in (("train", 600), ("validation", 40)):
        path = root / "raw" / split / "chunk1" / f"example_{split}_0.jsonl.zst"
        path.parent.mkdir(parents=True)
        lines = [json.dumps({"text": _document(rng),
                             "meta": {"redpajama_set_name": "RedPajamaBook"}})
                 for _ in range(n_docs)]
        path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    tok = train_tokenizer.train_tokenizer([str(root / "raw" / "train")], str(root / "tok"),
                                          VOCAB)
    out = {"tokenizer": str(tok)}
    for split in ("train", "validation"):
        prepare.prepare(root / "raw", root / split, tok, split=split, seq_len=SEQ_LEN)
        out[split] = str(root / split)
    return out


@pytest.fixture(scope="session")
def runs(tiny_data, tmp_path_factory):
    """{"mdm": workdir, "arm": workdir}: nano runs of 30 steps on the tiny corpus, trained once
    for the evaluation and harness tests."""
    from mdm_jax.train import train

    out = {}
    for kind in ("mdm", "arm"):
        workdir = tmp_path_factory.mktemp(f"run_{kind}")
        train(nano_config(**{"data.train_dir": tiny_data["train"], "data.eval_dir": "",
                             "data.tokenizer": tiny_data["tokenizer"], "workdir": str(workdir),
                             "objective.kind": kind, "steps": 30, "checkpoint_every": 30,
                             "samples.count": 0}))
        out[kind] = str(workdir)
    return out


def nano_config(**overrides):
    """A < 1M-parameter float32 config for fast CPU tests."""
    from mdm_jax.config import base_config

    c = base_config()
    c.model.preset = "nano"
    c.model.dtype = "float32"
    c.seq_len = SEQ_LEN
    c.global_batch = 16
    c.steps = 20
    c.objective.loss_chunk = 16
    c.optim.warmup_steps = 2
    c.optim.lr = 3e-3
    c.optim.min_lr = 3e-4
    c.mesh.data = 1
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def train_on_patterns(kind: str, steps: int = 400, bos: bool = False, **overrides):
    """A nano model of family `kind` trained on 4 fixed 8-token patterns drawn with
    probabilities .4/.3/.2/.1: (trainer, state, patterns [4, 8], probabilities). bos: every
    pattern starts with token 1."""
    import numpy as np

    from mdm_jax.trainer import Trainer

    c = nano_config(**{"objective.kind": kind, "seq_len": 8, "global_batch": 64,
                       "steps": steps, "optim.lr": 3e-3, "optim.warmup_steps": 20,
                       "objective.variable_length_prob": 0.0, "objective.loss_chunk": 8,
                       **overrides})
    trainer = Trainer(c)
    rng = np.random.default_rng(0)
    patterns = rng.integers(3, 500, (4, 9)).astype(np.int32)
    if bos:
        patterns[:, 0] = 1
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    state = trainer.create_state(0)
    with trainer.context():
        for _ in range(steps):
            batch = patterns[rng.choice(4, size=64, p=probs)]
            state, _ = trainer.step(state, trainer.to_global(batch))
    return trainer, state, patterns[:, :8], probs


def assert_samples_patterns(rows, patterns, probs) -> None:
    """Over 80% of the sampled rows are one of the patterns, drawn at their probabilities
    (within 0.1)."""
    import numpy as np

    matches = [next((i for i, p in enumerate(patterns) if (row == p).all()), None)
               for row in rows]
    hit = [m for m in matches if m is not None]
    assert len(hit) / len(matches) > 0.8, len(hit)
    freq = np.bincount(hit, minlength=len(patterns)) / len(hit)
    assert np.abs(freq - probs).max() < 0.1, freq


def write_study(path, fields: dict) -> str:
    """A study config file at `path`: experiments/isoflop.py's micro study, MDM only, with the
    dotted `fields` set (e.g. {"grid": ("2e11: 13K",), "slurm.gpus_per_node": 0})."""
    experiments = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments")
    lines = [f"import sys\nsys.path.insert(0, {experiments!r})\nimport isoflop\n",
             "def get_config():", "    c = isoflop.get_config('micro')",
             "    c.families = 'mdm'"]
    lines += [f"    c.{key} = {value!r}" for key, value in fields.items()]
    path.write_text("\n".join([*lines, "    return c", ""]))
    return str(path)


def trainer_command(tiny_data, workdir, steps: int, checkpoint_every: int) -> list[str]:
    """The `python -m mdm_jax.train` command line for the nano preset on the test corpus,
    logging every step."""
    import sys

    return [sys.executable, "-m", "mdm_jax.train", "--config=experiments/tiny.py",
            f"--config.workdir={workdir}", f"--config.data.train_dir={tiny_data['train']}",
            "--config.data.eval_dir=", f"--config.data.tokenizer={tiny_data['tokenizer']}",
            "--config.model.preset=nano", "--config.seq_len=64", "--config.global_batch=8",
            f"--config.steps={steps}", "--config.log_every=1",
            f"--config.checkpoint_every={checkpoint_every}", "--config.samples.count=0",
            "--config.model.dtype=float32"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_process(tiny_data, workdir, steps: int, checkpoint_every: int):
    """`trainer_command` as a child process (stdout/stderr piped)."""
    import subprocess

    return subprocess.Popen(
        trainer_command(tiny_data, workdir, steps, checkpoint_every),
        cwd=REPO, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
