"""The jitted step on different meshes: same numbers, parameters really sharded as declared."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import nano_config
from jax.sharding import PartitionSpec as P

from mdm_jax.trainer import Trainer

MESHES = {"single": (1, 1, 1), "data8": (8, 1, 1), "fsdp4_tensor2": (1, 4, 2), "2x2x2": (2, 2, 2)}


def _run_one_step(mesh, kind="mdm", micro_batch=8, devices=None):
    c = nano_config(**{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
                       "objective.kind": kind, "micro_batch": micro_batch})
    trainer = Trainer(c, devices=devices)
    state = trainer.create_state(0)
    batch = np.random.default_rng(0).integers(0, 256, (16, 65)).astype(np.int32)
    with trainer.context():
        new_state, metrics = trainer.step(state, trainer.to_global(batch))
    return trainer, new_state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def results():
    return {name: _run_one_step(mesh) for name, mesh in MESHES.items()}


@pytest.mark.parametrize("name", [n for n in MESHES if n != "single"])
def test_same_step_on_every_mesh(results, name):
    _, ref_state, ref = results["single"]
    trainer, state, metrics = results[name]
    assert trainer.mesh.size == np.prod(MESHES[name])
    for key in ("loss", "grad_norm", "mask_rate"):
        assert float(metrics[key]) == pytest.approx(float(ref[key]), rel=2e-5), key
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                    jax.tree_util.tree_leaves(jax.device_get(ref_state.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_parameters_and_optimizer_state_are_sharded(results):
    trainer, state, _ = results["2x2x2"]
    w1 = state.params["blocks"]["w1"]  # [layers, embed, mlp]
    assert w1.sharding.spec == P(None, "fsdp", "tensor")
    assert w1.addressable_shards[0].data.shape == (2, 64 // 2, 192 // 2)
    head = state.params["head"]  # [embed, vocab]
    assert head.sharding.spec == P("fsdp", "tensor")
    assert head.addressable_shards[0].data.shape == (32, 256)
    wq = state.params["blocks"]["wq"]  # [layers, embed, heads, head_dim]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    adam_mu = state.opt_state[1][0].mu["blocks"]["w1"]
    assert adam_mu.sharding.spec == w1.sharding.spec
    assert len({s.device for s in w1.addressable_shards}) == 8


def test_gradient_accumulation_matches_one_big_batch():
    """ARM (no random masking): 2 micro-batches of 8 == one batch of 16."""
    _, s_acc, m_acc = _run_one_step((2, 2, 2), kind="arm", micro_batch=8)
    _, s_one, m_one = _run_one_step((2, 2, 2), kind="arm", micro_batch=16)
    assert float(m_acc["loss"]) == pytest.approx(float(m_one["loss"]), rel=1e-5)
    assert float(m_acc["grad_norm"]) == pytest.approx(float(m_one["grad_norm"]), rel=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(s_acc.params)),
                    jax.tree_util.tree_leaves(jax.device_get(s_one.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
