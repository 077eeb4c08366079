"""Every config problem is caught before compilation, with a message naming field and fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, nano_config

from mdm_jax.config import ConfigError, validate


@pytest.mark.parametrize("overrides,devices,match", [
    ({"model.preset": "171M"}, 1, r"config\.model\.preset: unknown preset '171M'.*170M"),
    ({"global_batch": 12, "mesh.data": 8}, 8, r"not divisible by the batch shards"),
    ({"global_batch": 16, "micro_batch": 6}, 1, r"config\.micro_batch=6"),
    ({"mesh.tensor": 3, "mesh.data": 1}, 8, r"4 heads, not divisible by config\.mesh\.tensor=3"),
    ({"seq_len": 4096}, 1, r"config\.seq_len=4096 .*at most 128"),
    ({"mesh.data": 4, "mesh.fsdp": 4}, 8, r"needs 16 devices but only 8"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, 8, r"only one axis may be -1"),
    ({"mesh.fsdp": 3, "mesh.data": 1, "global_batch": 12}, 3,
     r"d_model 64 is not divisible by config\.mesh\.fsdp=3"),
    ({"objective.kind": "gpt"}, 1, r"config\.objective\.kind='gpt'"),
    ({"model.remat": "some"}, 1, r"config\.model\.remat='some'"),
    ({"model.dtype": "float16"}, 1, r"config\.model\.dtype"),
    ({"objective.ce_norm": "batch"}, 1, r"config\.objective\.ce_norm='batch'; valid: masked"),
])
def test_config_errors_name_the_field(overrides, devices, match):
    with pytest.raises(ConfigError, match=match):
        validate(nano_config(**overrides), devices)


def test_valid_config_passes():
    validate(nano_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), 8)


def test_cli_reports_config_error_before_compiling(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mdm_jax.train", "--config=experiments/tiny.py",
         "--config.model.preset=bogus", f"--config.workdir={tmp_path}"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "error: config: config.model.preset: unknown preset 'bogus'" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_rejects_unknown_override():
    out = subprocess.run(
        [sys.executable, "-m", "mdm_jax.train", "--config=experiments/tiny.py",
         "--config.model.presett=170M"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "presett" in out.stderr


def test_loading_a_config_imports_no_jax():
    """config.py and every experiment config load without the jax stack (instant planning);
    tests/test_architecture.py checks the imports statically, this checks them running."""
    code = ("import sys\nsys.path.insert(0, 'experiments')\nimport mdm_jax.config, isoflop, smdm\n"
            "isoflop.get_config('micro'); smdm.get_config('170M')\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'optax', 'orbax'))\nprint(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mdm_jax.train", "--config=experiments/tiny.py",
                          "--print_config", f"--config.workdir={tmp_path / 'run'}",
                          "--config.model.vocab_size=0"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    c = json.loads(out.stdout)
    assert c["model"]["vocab_size"] == 2048  # the tiny preset's, resolved from 0
    assert not (tmp_path / "run").exists()
    bad = subprocess.run([sys.executable, "-m", "mdm_jax.train", "--config=experiments/tiny.py",
                          "--print_config", "--config.seq_len=0"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: config.seq_len=0")


def test_compile_cache_folder_follows_the_config_then_the_environment(monkeypatch, tmp_path):
    from mdm_jax import compile_cache

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compile_cache.folder("", str(tmp_path)) == f"{tmp_path}/xla_cache"
    assert compile_cache.folder("", "gs://b/run") == "gs://b/run/xla_cache"
    assert compile_cache.folder("none", str(tmp_path)) is None
    assert compile_cache.folder("gs://b/cache", str(tmp_path)) == "gs://b/cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/site/cache")
    assert compile_cache.folder("", str(tmp_path)) == "/site/cache"  # a site-wide cache wins
    assert compile_cache.folder(str(tmp_path / "mine"), "x") == str(tmp_path / "mine")


def test_train_help_lists_every_config_field_on_one_line():
    from mdm_jax.config import FIELDS

    done = subprocess.run([sys.executable, "-m", "mdm_jax.train", "--help"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})
    lines = [line.strip() for line in done.stdout.splitlines()]
    at = [next(i for i, line in enumerate(lines) if line.startswith(f"{dotted} = {default!r}: "))
          for dotted, default, _ in FIELDS]
    assert at == list(range(at[0], at[0] + len(FIELDS))), done.stdout  # none wrapped
