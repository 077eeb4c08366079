"""Compiling for other machines: the memory fit by compiling (on this CPU's devices),
and the AOT tool on TPU and H100 compile-only devices (in .venv-accelerators, which
`bash launch/setup.sh accelerators` makes; those tests skip, saying so, where it is absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import nano_config

from mdm_jax import autofit, families
from mdm_jax.config import ConfigError, micro_batch, validate
from mdm_jax.presets import SMDM_PRESETS
from mdm_jax.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATORS_PY = os.path.join(REPO, ".venv-accelerators", "bin", "python")
_skip_without_accelerators = pytest.mark.skipif(
    not os.path.exists(ACCELERATORS_PY),
    reason="no .venv-accelerators (bash launch/setup.sh accelerators installs libtpu and the "
           "CUDA PJRT plugin)")


def needs_accelerators(test):
    """Compiles in .venv-accelerators: slow, and on one pytest worker (libtpu takes a
    machine-wide lock file, so two at once would fail)."""
    return _skip_without_accelerators(pytest.mark.slow(pytest.mark.xdist_group("libtpu")(test)))


def _peak(c, devices):
    compiled, _, _ = autofit.compile_step(c, devices, Trainer)
    return autofit.Memory.of(compiled)


def test_a_smaller_micro_batch_needs_fewer_temporaries():
    devices = jax.devices()[:2]
    whole = _peak(nano_config(**{"mesh.data": 2}), devices)
    quarter = _peak(nano_config(**{"mesh.data": 2, "micro_batch": 4}), devices)
    assert quarter.temporaries < whole.temporaries
    assert quarter.arguments == whole.arguments  # the state does not depend on it
    assert 0 < whole.aliased < whole.arguments  # the donated state is; the batch is not


def test_search_picks_the_largest_micro_batch_under_the_budget_and_the_cheapest_remat():
    devices = jax.devices()[:2]
    base = nano_config(**{"mesh.data": 2})
    peaks = {mb: _peak(autofit.with_choice(base, mb, "none"), devices).peak for mb in (8, 4)}
    budget = (peaks[8] + peaks[4]) / 2  # 8 sequences do not fit, 4 do
    c = autofit.with_choice(base, "auto", "auto")
    logged = []
    best, trials = autofit.search(c, devices, int(budget), Trainer, headroom=0.0,
                                  log=logged.append)
    assert (best.micro_batch, best.remat) == (4, "none") and best.fits
    assert {t.micro_batch for t in trials} <= {16, 8, 4, 2}
    assert any("too big" in line for line in logged)
    with pytest.raises(autofit.FitError, match=r"does not fit: the smallest peak found is .* GiB"):
        autofit.search(c, devices, 1000, Trainer, headroom=0.0, log=logged.append)


def test_resolve_caches_its_answer_in_the_workdir(tmp_path):
    """A restart with the same config and devices does not search again."""

    class Device:  # a real CPU device that reports an accelerator-like memory limit
        def __init__(self, d, limit):
            self._d, self._limit = d, limit

        def __getattr__(self, name):
            return getattr(self._d, name)

        def memory_stats(self):
            return {"bytes_limit": self._limit}

    built = []

    def counting_trainer(c, devices):
        built.append(c.micro_batch)
        return Trainer(c, devices=[getattr(d, "_d", d) for d in devices])

    base = nano_config(**{"mesh.data": 2, "workdir": str(tmp_path)})
    peak4 = _peak(autofit.with_choice(base, 4, "none"), jax.devices()[:2]).peak
    devices = [Device(d, int(peak4 / 0.9) + 1) for d in jax.devices()[:2]]
    auto = autofit.with_choice(base, "auto", "none")
    first = autofit.resolve(auto, devices, counting_trainer, log=lambda m: None)
    assert first.micro_batch in (4, 8) and built
    cache = json.loads((tmp_path / "autofit.json").read_text())
    assert [v["micro_batch"] for v in cache.values()] == [first.micro_batch]
    built.clear()
    again = autofit.resolve(auto, devices, counting_trainer, log=lambda m: None)
    assert again.micro_batch == first.micro_batch and not built  # no compile on restart
    # On CPU (no memory limit) auto means no accumulation and no remat, with no search.
    plain = autofit.resolve(autofit.with_choice(base, "auto", "auto"), jax.devices()[:2],
                            counting_trainer, log=lambda m: None)
    assert (plain.micro_batch, plain.model.remat, built) == (0, "none", [])


def test_auto_is_validated_like_its_first_candidate():
    validate(nano_config(micro_batch="auto", **{"model.remat": "auto"}), 8)
    with pytest.raises(ConfigError, match=r"micro_batch='big' must be a number .* or auto"):
        validate(nano_config(micro_batch="big"), 8)
    with pytest.raises(ValueError, match="must be resolved"):
        Trainer(nano_config(micro_batch="auto"))


def _smdm_config(arg):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    try:
        import smdm
    finally:
        sys.path.pop(0)
    return smdm.get_config(arg)


def _smdm_micro_batch(model: int, causal: bool) -> int:
    """SMDM's rule as its launchers write it (github.com/ML-GSAI/SMDM pretrain/train_mdm.py and
    pretrain/train_ar.py: `micro_batch_size` by `--model`, the size in millions)."""
    if model <= 20:
        return 32
    if model <= 50:
        return 16
    if causal:
        return 8 if model <= 1028 else 4 if model <= 2000 else 2
    return 8 if model <= 1000 else 4


def test_smdm_configs_take_smdms_micro_batch_per_device():
    for preset in SMDM_PRESETS:
        for kind in families.FAMILIES:
            c = _smdm_config(f"{preset},{kind}")
            expected = _smdm_micro_batch(int(preset.rstrip("M")), families.get(kind).causal)
            assert (c.micro_batch, c.micro_batch_per_device) == (0, expected), (preset, kind)
            assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)  # SMDM's FSDP
    # The README's pod commands: 1028M MDM at 4 per device on v5p-8 with fsdp=4 (16 sequences,
    # 16 accumulation steps), on 8 GPUs (32) and on 4 nodes of 8 (128: 2 steps); 64 chips at 4
    # per device hold the whole global batch of 256.
    c = _smdm_config("1028M")
    assert [micro_batch(c, shards) for shards in (4, 8, 32, 64)] == [16, 32, 128, 256]
    assert micro_batch(_smdm_config("1028M,arm"), 8) == 64
    assert micro_batch(_smdm_config("2121M,arm"), 8) == 16
    # A set micro_batch wins; shards that leave no whole share fall back to the global batch,
    # which validation then refuses with the divisibility it needs.
    c.micro_batch = 32
    assert micro_batch(c, 4) == 32
    c.micro_batch = 0
    assert micro_batch(c, 6) == 256
    with pytest.raises(ConfigError, match=r"micro_batch=256 .* not divisible by the batch shards"):
        validate(c, 6)


def test_micro_batch_per_device_sets_the_accumulation_steps():
    devices = jax.devices()[:2]
    c = nano_config(**{"mesh.data": 2, "micro_batch_per_device": 2})
    trainer = Trainer(c, devices=devices)
    assert (trainer.micro_batch, trainer.micro_steps) == (4, 4)  # 2 devices x 2, of 16
    c.micro_batch_per_device = 16  # more than a device's share: no accumulation
    assert Trainer(c, devices=devices).micro_steps == 1
    c.micro_batch_per_device, c.micro_batch = 2, 8  # an explicit micro_batch wins
    assert Trainer(c, devices=devices).micro_steps == 2
    with pytest.raises(ConfigError, match=r"micro_batch_per_device=-1 must be a number"):
        validate(nano_config(micro_batch_per_device=-1), 8)


def test_the_roofline_reads_the_chip_table():
    from mdm_jax import aot, flops, targets

    memory = autofit.Memory(arguments=2**30, outputs=2**30, aliased=2**30, temporaries=2**30,
                            code=0)
    for target in targets.TARGETS.values():
        chip = flops.CHIPS[target.accelerator]
        seconds, bound = aot.roofline(1e18, target, memory, micro_steps=1, mfu=0.4)
        assert (seconds, bound) == (1e18 / (target.chips * chip.peak_flops * 0.4), "compute")
        seconds, bound = aot.roofline(1.0, target, memory, micro_steps=3, mfu=0.4)
        assert bound == "memory"
        assert seconds == pytest.approx((2 + 3 / 3 + 2) * 2**30 / chip.hbm_bandwidth)


@needs_accelerators
def test_every_target_compiles_for_the_chip_its_table_row_names():
    """jax's device_kind of each target's compile-only devices is its chip's, so MFU at train
    time (flops.peak_flops(device_kind)) and the target's plan read the same row."""
    code = ("import json\n"
            "from mdm_jax import targets\n"
            "targets.quiet_compile_only_environment()\n"
            "print(json.dumps({n: [d.device_kind for d in targets.compile_only_devices(t)]\n"
            "                  for n, t in targets.TARGETS.items()}))\n")
    out = subprocess.run([ACCELERATORS_PY, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env={k: v for k, v in os.environ.items()
                                           if k != "XLA_FLAGS"})
    assert out.returncode == 0, out.stderr[-3000:]
    from mdm_jax import flops, targets

    kinds = json.loads(out.stdout.strip().splitlines()[-1])
    for name, target in targets.TARGETS.items():
        assert len(kinds[name]) == target.chips
        assert {flops.chip(kind) for kind in kinds[name]} == {target.chip}, (name, kinds[name])


def _aot(*args, timeout=900):
    return subprocess.run(
        [ACCELERATORS_PY, "-m", "mdm_jax.aot", "--config=experiments/tiny.py",
         "--config.model.preset=nano", "--config.seq_len=64", "--config.global_batch=16",
         "--config.model.dtype=bfloat16", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})


@needs_accelerators
def test_aot_compiles_the_train_step_for_a_v5p_slice_and_for_h100s():
    tpu = _aot("--target", "v5p-8", "--json")
    assert tpu.returncode == 0, tpu.stderr[-3000:]
    report = json.loads(tpu.stdout)
    assert report["devices"] == 4 and report["fits"] and report["hbm_gib"] == 95
    assert report["kernels"] == []  # attention=xla: no fused attention kernel
    assert report["mesh"]["data"] == 4
    # XLA's own count sees the scanned layer body once: below the real FLOPs.
    assert report["cost_analysis_flops_per_step"] < report["flops_per_step"]
    assert 0 < report["temporaries_gib"] < report["peak_gib"] < report["usable_gib"]
    gpu = _aot("--target", "h100x8")
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    assert "target h100x8: 8 devices" in gpu.stdout and "FITS" in gpu.stdout
    assert "roofline step time" in gpu.stdout
    assert "cudart" not in gpu.stdout + gpu.stderr  # the plugins' start-up logs are kept out


@needs_accelerators
def test_aot_reports_a_run_that_does_not_fit_with_its_peak_and_exit_3():
    out = _aot("--target", "v5p-8", "--headroom", "0.9999999")
    assert out.returncode == 3, out.stderr[-3000:]
    assert "DOES NOT FIT" in out.stdout and "peak" in out.stdout
    bad = _aot("--target", "v9-1")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: --target 'v9-1' is not known; valid: v4-8, v5p-8")


def _study_file(tmp_path):
    path = tmp_path / "study.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'experiments')!r})\n"
        "from isoflop import get_config as study\n"
        "def get_config():\n"
        "    c = study('micro')\n"
        "    c.grid = ('2e11: 13K,27K', '5e11: 13K')\n"
        "    c.families = 'mdm,arm'\n"
        f"    c.sweep_dir = {str(tmp_path / 'sweep')!r}\n"
        "    return c\n")
    return str(path)


@needs_accelerators
def test_plan_and_sweep_fit_every_run_on_a_target(tmp_path):
    study = _study_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    plan = subprocess.run([ACCELERATORS_PY, "-m", "mdm_jax.scaling.plan", f"--config={study}",
                           "--target", "v5e-16", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=env)
    assert plan.returncode == 0, plan.stderr[-3000:]
    rows = {r["run_id"]: r for r in json.loads(plan.stdout)}
    assert len(rows) == 6 and all(r["fits"] and r["target"] == "v5e-16" for r in rows.values())
    assert all(r["micro_batch"] == 16 and r["peak_gib"] > 0 for r in rows.values())
    # Budgets share a compile; the roofline hours scale with the steps.
    a, b = rows["mdm-13K-2e+11"], rows["mdm-13K-5e+11"]
    assert a["step_seconds"] == b["step_seconds"]
    assert b["target_chip_hours"] / a["target_chip_hours"] == pytest.approx(b["steps"] / a["steps"])
    assert plan.stderr.count("[plan] compiling") == 4
    # A sweep whose runs do not fit submits nothing and names them.
    sweep = subprocess.run([ACCELERATORS_PY, "-m", "mdm_jax.scaling.sweep", f"--config={study}",
                            "--backend", "slurm", "--dry-run", "--target", "v5e-16",
                            "--headroom", "0.9999999"], cwd=REPO, capture_output=True,
                           text=True, timeout=900, env=env)
    assert sweep.returncode == 2, sweep.stderr[-3000:]
    last = sweep.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 6 run(s) do not fit on v5e-16, nothing submitted: mdm-13K-2e+11")
    assert "sbatch" not in sweep.stdout
    fitted = subprocess.run([ACCELERATORS_PY, "-m", "mdm_jax.scaling.sweep", f"--config={study}",
                             "--backend", "slurm", "--dry-run", "--target", "v5e-16"],
                            cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert fitted.stdout.count("--config.micro_batch=16 --config.model.remat=none") == 6


@needs_accelerators
@pytest.mark.parametrize("target, impl", [("v5p-8", "splash"), ("h100x8", "cudnn")])
def test_attention_kernels_compile_into_the_step_for_their_targets(target, impl):
    report = _aot("--target", target, "--config.seq_len=128", f"--config.model.attention={impl}",
                  "--compare-attention", "--json")
    assert report.returncode == 0, report.stderr[-3000:]
    r = json.loads(report.stdout)
    assert r["kernels"] == [impl]  # the kernel is in the compiled step, the other is not
    assert r["attention"] == impl and set(r["xla_attention"]) == {
        "temporaries_gib", "peak_gib", "peak_saved_gib"}
    wrong = _aot("--target", "h100x8" if impl == "splash" else "v5p-8", "--config.seq_len=128",
                 f"--config.model.attention={impl}")
    assert wrong.returncode == 2 and "kernel; --target" in wrong.stderr


def test_a_step_the_compiler_refuses_for_memory_counts_as_not_fitting():
    error = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (104.47G) exceeds available HBM (95.74G).")
    memory = autofit.refused_memory(error)
    assert memory.peak == memory.temporaries == int(104.47 * 2**30)
    with pytest.raises(jax.errors.JaxRuntimeError):  # anything else is a bug, not a fit answer
        autofit.refused_memory(jax.errors.JaxRuntimeError("INTERNAL: something else"))
