"""FLOP accounting and step planning (shared/REFERENCE.md section 3)."""

from __future__ import annotations

import json

import pytest

from mdm_jax import flops
from mdm_jax.presets import get_preset


def test_smdm_example_170m_at_1e19():
    assert flops.steps_for_budget(get_preset("170M"), 1e19) == 18_710


def test_cli_json(capsys):
    flops.cli(["--preset", "170M", "--budget", "1e19", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["non_embedding_params"] == 169_897_728
    assert out["steps"] == 18_710
    assert out["tokens"] == 18_710 * 256 * 2048
    assert out["total_params"] == 169_897_728 + 32001 * 768 + 768 * 32000


def test_detailed_count_includes_attention_and_head():
    p = get_preset("1028M")
    fwd = flops.forward_flops_per_token(p, 2048)
    dense = 2 * p.n_layer * (4 * p.d_model**2 + 3 * p.d_model * p.mlp_dim)
    attn = 4 * 2048 * p.d_model * p.n_layer
    head = 2 * p.d_model * 32000
    assert fwd == dense + attn + head
    assert flops.forward_flops_per_token(p, 2048, family="arm") == dense + attn / 2 + head
    assert flops.train_flops_per_token(p, 2048) == 3 * fwd


def test_duo_convention_is_selectable():
    p = get_preset("170M")
    six_n = flops.steps_for_budget(p, 1e19)
    duo = flops.steps_for_budget(p, 1e19, convention="3fwd")
    assert duo < six_n  # attention and head make each step costlier


def test_budget_too_small_is_an_error():
    with pytest.raises(ValueError, match="less than one step of preset 1028M"):
        flops.plan("1028M", 1e12)
    with pytest.raises(SystemExit):
        flops.cli(["--preset", "bogus", "--budget", "1e19"])


def test_mfu_uses_peak_table():
    assert flops.mfu(494.5e12, "NVIDIA H100 80GB HBM3", 1) == pytest.approx(0.5)
    assert flops.mfu(1e9, "cpu", 1) is None


def test_one_hardware_table_serves_every_target_and_plan():
    """Peak FLOP/s, HBM bytes and bandwidth live in flops.CHIPS only: the compile targets, the
    study configs' accelerators and jax's device kinds all resolve to its rows."""
    import dataclasses
    import os
    import sys

    from mdm_jax import targets

    assert not hasattr(flops, "PEAK_FLOPS") and not hasattr(flops, "HBM_BANDWIDTH")
    assert "hbm_bytes" not in {f.name for f in dataclasses.fields(targets.Target)}
    for target in targets.TARGETS.values():
        chip = flops.CHIPS[target.accelerator]
        assert target.chip is chip and target.hbm_bytes == chip.hbm_bytes
        if target.platform == "cuda":  # what the GPU compiler is told is the same row
            proto = targets.gpu_target_config(target)
            assert f"device_memory_size: {chip.hbm_bytes}\n" in proto
            assert f"memory_bandwidth: {int(chip.hbm_bandwidth)}\n" in proto
    for chip in flops.CHIPS.values():
        assert chip.peak_flops > 0 and chip.hbm_bytes > 0 and chip.hbm_bandwidth > 0
        assert flops.chip(chip.name) is chip and flops.peak_flops(chip.name) == chip.peak_flops
    # The device kinds jax reports (checked against the compile-only devices in test_aot).
    for kind, name in (("TPU v4", "tpu v4"), ("TPU v5", "tpu v5p"), ("TPU v5 lite", "tpu v5e"),
                       ("TPU v6 lite", "tpu v6e"), ("NVIDIA H100 80GB HBM3", "h100"),
                       ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100")):
        assert flops.chip(kind) is flops.CHIPS[name], kind
    assert flops.chip("NVIDIA L40S") is None and flops.chip("cpu") is None
    # Every study's plan prices on a row of the table.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
    try:
        import isoflop
    finally:
        sys.path.pop(0)
    for arg in ("smdm", "micro", "micro_families"):
        assert flops.chip(isoflop.get_config(arg).accelerator) in flops.CHIPS.values()


def test_time_conditioning_count_matches_the_model_weights():
    """flops.time_conditioning_weights is every conditioning kernel of a real time-conditioned
    encoder (noise MLP, per-block and final adaLN), which run once per sequence."""
    import jax
    import numpy as np

    from mdm_jax.model import Encoder, ModelArgs

    for name, scan in (("13K", True), ("27K", False)):
        preset = get_preset(name)
        args = ModelArgs.from_preset(preset, vocab_size=64, family="uniform",
                                     scan_layers=scan)
        shapes = jax.eval_shape(lambda args=args: Encoder(args).init(
            jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), jax.numpy.int32)))["params"]
        kernels = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
            keys = [k.key for k in path if hasattr(k, "key")]  # Partitioned boxes add .value
            is_conditioning = any(k in ("time_in", "time_out", "ada", "final_ada") for k in keys)
            if is_conditioning and keys[-1] in ("kernel", "ada", "final_ada"):
                kernels += int(np.prod(leaf.shape))
        assert kernels == flops.time_conditioning_weights(preset), name


def test_time_conditioning_is_counted_per_sequence():
    p = get_preset("13K")
    plain = flops.train_flops_per_token(p, 128)
    conditioned = flops.train_flops_per_token(p, 128, family="uniform")
    assert conditioned - plain == pytest.approx(3 * 2 * flops.time_conditioning_weights(p) / 128)
    assert flops.flops_per_token_6n(p, 128, family="uniform") - flops.flops_per_token_6n(
        p, 128) == pytest.approx(6 * flops.time_conditioning_weights(p) / 128)
    # The same budget buys a time-conditioned model fewer steps, under either convention.
    for convention in ("6n", "3fwd"):
        assert (flops.steps_for_budget(p, 1e12, 16, 128, convention, family="uniform")
                < flops.steps_for_budget(p, 1e12, 16, 128, convention))
