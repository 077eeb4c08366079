"""PyTorch export and import (issue 6): parity of logits in float32, exact round trips, errors.

MDMs go through the plain-PyTorch reference encoder (litgpt export and LLaDA-style folder);
ARMs through transformers' stock LlamaForCausalLM. Needs the `torch` extra.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
from conftest import nano_config  # noqa: E402

from mdm_jax.checkpoint import Checkpointer  # noqa: E402
from mdm_jax.export.cli import export  # noqa: E402
from mdm_jax.export.load import import_checkpoint  # noqa: E402
from mdm_jax.export.tensor_io import ExportError  # noqa: E402
from mdm_jax.export.torch_model import TransEncoder  # noqa: E402
from mdm_jax.train import Trainer, _resolved_config, train  # noqa: E402

PRESETS = ("nano", "nano-hd128")
TOL = 1e-4


def _random_checkpoint(workdir, preset: str, kind: str, step: int = 7):
    """Random weights saved from an 8-device (data 2 x fsdp 4) mesh: a sharded checkpoint."""
    c = nano_config(**{"model.preset": preset, "objective.kind": kind, "mesh.data": 2,
                       "mesh.fsdp": 4, "global_batch": 8})
    c.workdir = str(workdir)
    trainer = Trainer(c)
    state = trainer.create_state(seed=hash((preset, kind)) % 1000)
    ckpt = Checkpointer(c.workdir)
    ckpt.save(step, state, None, _resolved_config(c, trainer), {"preset": preset}, force=True)
    ckpt.close()
    with trainer.context():
        params = jax.device_get(state.params)
    return trainer, params


def _jax_logits(trainer, params, tokens):
    return np.asarray(trainer.model.apply({"params": params}, tokens, return_logits=True))


def _tokens(trainer, seed=0, length=48):
    rng = np.random.default_rng(seed)
    high = trainer.args.embedding_rows  # the MDM's mask id included
    return rng.integers(0, high, size=(2, length)).astype(np.int32)


@pytest.mark.parametrize("preset", PRESETS)
def test_mdm_exports_match_jax_logits(tmp_path, preset):
    trainer, params = _random_checkpoint(tmp_path / "run", preset, "mdm")
    tokens = _tokens(trainer)
    ref = _jax_logits(trainer, params, tokens)
    export(str(tmp_path / "run"), "litgpt", str(tmp_path / "lit"))
    export(str(tmp_path / "run"), "llada-hf", str(tmp_path / "llada"), max_shard_bytes=200_000)
    assert os.path.exists(tmp_path / "llada" / "model.safetensors.index.json")  # sharded
    for folder in ("lit", "llada"):
        model = TransEncoder.from_export(str(tmp_path / folder))
        with torch.no_grad():
            got = model(torch.from_numpy(tokens).long()).numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0, err_msg=folder)
    # The .pth state dict holds the same tensors (SMDM's scripts torch.load it).
    from safetensors.torch import load_file

    pth = torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True)
    st = load_file(tmp_path / "lit" / "lit_model.safetensors")
    assert pth.keys() == st.keys() and all(torch.equal(pth[k], st[k]) for k in st)
    rows = trainer.args.embedding_rows
    assert st["transformer.wte.weight"].shape[0] == rows == trainer.args.vocab_size + 1
    assert st["lm_head.weight"].shape[0] == trainer.args.vocab_size
    meta = json.loads((tmp_path / "llada" / "config.json").read_text())
    assert meta["mask_token_id"] == trainer.args.vocab_size
    assert meta["mdm_jax"]["preset"] == preset and meta["mdm_jax"]["step"] == 7


@pytest.mark.parametrize("preset", PRESETS)
def test_arm_llama_export_runs_in_transformers(tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    trainer, params = _random_checkpoint(tmp_path / "run", preset, "arm")
    tokens = _tokens(trainer)
    ref = _jax_logits(trainer, params, tokens)
    export(str(tmp_path / "run"), "llama-hf", str(tmp_path / "hf"))
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(("fmt", "kind"), [("litgpt", "mdm"), ("llada-hf", "mdm"),
                                           ("llama-hf", "arm")])
def test_export_then_import_is_exact(tmp_path, fmt, kind):
    from mdm_jax.sampling import generate, load_for_sampling

    trainer, params = _random_checkpoint(tmp_path / "run", "nano", kind)
    export(str(tmp_path / "run"), fmt, str(tmp_path / "out"), max_shard_bytes=300_000)
    step = import_checkpoint(fmt, str(tmp_path / "out"), str(tmp_path / "back"))
    assert step == 7
    back_trainer, state, c = load_for_sampling(str(tmp_path / "back"))
    assert c.model.preset == "nano" and c.objective.kind == kind
    back = jax.device_get(state.params)
    flat_a = jax.tree_util.tree_leaves_with_path(params)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(back))
    for path, a in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(a), err_msg=str(path))
    out = generate(back_trainer.model, back, num=1, length=16, steps=4, seed=0)
    assert np.asarray(out).shape == (1, 16)


def test_trained_checkpoint_exports_and_trains_again(tiny_data, tmp_path):
    def config(workdir, steps):
        return nano_config(**{"workdir": str(workdir), "steps": steps, "mesh.data": -1,
                              "data.train_dir": tiny_data["train"], "data.eval_dir": "",
                              "data.tokenizer": tiny_data["tokenizer"]})

    result = train(config(tmp_path / "run", 10))
    trainer = Trainer(config(tmp_path / "run", 10))
    params = jax.device_get(result.state.params)
    tokens = _tokens(trainer, seed=1, length=64)
    ref = _jax_logits(trainer, params, tokens)
    export(str(tmp_path / "run"), "litgpt", str(tmp_path / "lit"))
    model = TransEncoder.from_export(str(tmp_path / "lit"))
    with torch.no_grad():
        got = model(torch.from_numpy(tokens).long()).numpy()
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    meta = json.loads((tmp_path / "lit" / "config.json").read_text())["mdm_jax"]
    assert len(meta["tokenizer_sha256"]) == 64 and meta["mask_token_id"] == 512
    # The imported checkpoint is a run that training continues from.
    assert import_checkpoint("litgpt", str(tmp_path / "lit"), str(tmp_path / "back")) == 10
    again = train(config(tmp_path / "back", 13))
    assert int(again.state.step) == 13


def test_bfloat16_export_rounds_each_weight(tmp_path):
    from safetensors import safe_open

    _, params = _random_checkpoint(tmp_path / "run", "nano", "mdm")
    export(str(tmp_path / "run"), "litgpt", str(tmp_path / "bf16"), dtype="bfloat16")
    with safe_open(str(tmp_path / "bf16" / "lit_model.safetensors"), framework="pt") as f:
        wte = f.get_tensor("transformer.wte.weight")
    assert wte.dtype == torch.bfloat16
    expected = torch.from_numpy(np.asarray(params["embedding"])).to(torch.bfloat16)
    assert torch.equal(wte, expected)


def test_bad_inputs_get_clear_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    _random_checkpoint(tmp_path / "arm", "nano", "arm")
    with pytest.raises(ExportError, match="is an ARM.*Use --format llama-hf"):
        export(str(tmp_path / "arm"), "litgpt", str(tmp_path / "x"))
    with pytest.raises(ExportError, match="not an mdm_jax run"):
        export(str(tmp_path / "nowhere"), "litgpt", str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "nowhere")  # nothing created on the way
    with pytest.raises(ExportError, match="no checkpoint for step 3.*available: 7"):
        export(str(tmp_path / "arm"), "llama-hf", str(tmp_path / "x"), step=3)

    _random_checkpoint(tmp_path / "mdm", "nano", "mdm")
    export(str(tmp_path / "mdm"), "litgpt", str(tmp_path / "lit"))
    path = str(tmp_path / "lit" / "lit_model.safetensors")
    tensors = load_file(path)
    name = "transformer.h.1.mlp.swiglu.w3.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, path)
    with pytest.raises(ExportError, match=r"transformer\.h\.1\.mlp\.swiglu\.w3\.weight has "
                                          r"shape \(64, 191\), expected \(64, 192\)"):
        import_checkpoint("litgpt", str(tmp_path / "lit"), str(tmp_path / "back"))
    del tensors[name]
    save_file(tensors, path)
    with pytest.raises(ExportError, match=r"lacks 1 tensor.*transformer\.h\.1\.mlp\.swiglu\.w3"):
        import_checkpoint("litgpt", str(tmp_path / "lit"), str(tmp_path / "back"))

    class Payload:  # anything but tensors must never be unpickled
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"transformer.wte.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ExportError, match="not a plain state dict"):
        import_checkpoint("litgpt", str(tmp_path / "evil.pth"), str(tmp_path / "back2"),
                          preset="nano")
