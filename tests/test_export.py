"""PyTorch export and import: parity of logits in float32, exact round trips, errors.

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
from mdm_jax.export.load import import_checkpoint  # noqa: E402
from mdm_jax.export.tensor_io import ExportError  # noqa: E402
from mdm_jax.export.torch_model import TransEncoder  # noqa: E402
from mdm_jax.export.writer import export  # noqa: E402
from mdm_jax.train import train  # noqa: E402
from mdm_jax.trainer import Trainer, resolved_config  # noqa: E402

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
    ckpt.save(step, state, None, resolved_config(c, trainer), {"preset": preset}, force=True)
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
    config = json.loads((tmp_path / "llada" / "config.json").read_text())
    assert config["mask_token_id"] == trainer.args.vocab_size
    for folder in ("lit", "llada"):
        meta = json.loads((tmp_path / folder / "mdm_jax.json").read_text())
        assert meta["preset"] == preset and meta["step"] == 7


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
    from mdm_jax.inference import MDMSampler, generate, load

    trainer, params = _random_checkpoint(tmp_path / "run", "nano", kind)
    export(str(tmp_path / "run"), fmt, str(tmp_path / "out"), max_shard_bytes=300_000)
    step = import_checkpoint(fmt, str(tmp_path / "out"), str(tmp_path / "back"))
    assert step == 7
    loaded = load(str(tmp_path / "back"))
    c = loaded.config
    assert c.model.preset == "nano" and c.objective.kind == kind
    back = jax.device_get(loaded.params)
    flat_a = jax.tree_util.tree_leaves_with_path(params)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(back))
    for path, a in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(a), err_msg=str(path))
    out = generate(loaded.model, loaded.params, [[1]], 15, MDMSampler(steps=4))
    assert out.tokens.shape == (1, 16)
    direct = load(str(tmp_path / "out"))  # the export folder itself, no import step
    assert direct.source == fmt and direct.config.objective.kind == kind
    for path, a in flat_a:
        np.testing.assert_array_equal(np.asarray(dict(jax.tree_util.tree_leaves_with_path(
            jax.device_get(direct.params)))[path]), np.asarray(a), err_msg=str(path))


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
    meta = json.loads((tmp_path / "lit" / "mdm_jax.json").read_text())
    assert len(meta["tokenizer_sha256"]) == 64 and meta["mask_token_id"] == 512
    assert meta["tokenizer"] == "tokenizer.model"  # shipped: the run's tokenizer is found
    # The imported checkpoint is a run that training continues from.
    assert import_checkpoint("litgpt", str(tmp_path / "lit"), str(tmp_path / "back")) == 10
    from mdm_jax.checkpoint import weights_only

    back = str(tmp_path / "back" / "checkpoints")
    assert weights_only(back, 10)  # the weights alone: no optimizer state to hold in memory
    again = train(config(tmp_path / "back", 13))
    assert int(again.state.step) == 13 and 10 < again.history[0]["step"] <= 13
    # It trained the imported weights: its loss is at the original run's level
    assert again.history[0]["loss"] < min(h["loss"] for h in result.history) + 0.1
    assert not weights_only(back, 13)  # training saved the whole state


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

    from mdm_jax.families import FamilyError

    _random_checkpoint(tmp_path / "arm", "nano", "arm")
    with pytest.raises(FamilyError, match="the arm family .* 'litgpt'; it has: llama-hf"):
        export(str(tmp_path / "arm"), "litgpt", str(tmp_path / "x"))
    with pytest.raises(ExportError, match="not an mdm_jax run"):
        export(str(tmp_path / "nowhere"), "litgpt", str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "nowhere")  # nothing created on the way
    with pytest.raises(ExportError, match="no checkpoint for step 3.*available: 7"):
        export(str(tmp_path / "arm"), "llama-hf", str(tmp_path / "x"), step=3)

    _random_checkpoint(tmp_path / "mdm", "nano", "mdm")
    export(str(tmp_path / "mdm"), "litgpt", str(tmp_path / "lit"))
    os.remove(tmp_path / "lit" / "mdm_jax.json")  # a foreign file: only its shapes are checked
    path = str(tmp_path / "lit" / "lit_model.safetensors")
    tensors = load_file(path)
    name = "transformer.h.1.mlp.swiglu.w3.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, path)
    with pytest.raises(ExportError, match=r"transformer\.h\.1\.mlp\.swiglu\.w3\.weight has "
                                          r"shape \(64, 191\), expected \(64, 192\)"):
        import_checkpoint("litgpt", str(tmp_path / "lit"), str(tmp_path / "back"), preset="nano")
    del tensors[name]
    save_file(tensors, path)
    with pytest.raises(ExportError, match=r"lacks 1 tensor.*transformer\.h\.1\.mlp\.swiglu\.w3"):
        import_checkpoint("litgpt", str(tmp_path / "lit"), str(tmp_path / "back"), preset="nano")

    class Payload:  # anything but tensors must never be unpickled
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"transformer.wte.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ExportError, match="not a plain state dict"):
        import_checkpoint("litgpt", str(tmp_path / "evil.pth"), str(tmp_path / "back2"),
                          preset="nano")


# SMDM's lit_gpt.config.Config dataclass (ML-GSAI/SMDM lit_gpt/config.py, 583aa47): its fields,
# and the computation-changing ones with the values of its Diff_LLaMA presets. TransEncoder
# allocates lm_head [padded_vocab_size, n_embd] and wte [padded_vocab_size + 1, n_embd].
SMDM_FIELDS = {"org", "name", "block_size", "vocab_size", "padding_multiple",
               "padded_vocab_size", "n_layer", "n_head", "n_embd", "rotary_percentage",
               "parallel_residual", "bias", "n_query_groups", "shared_attention_norm",
               "_norm_class", "norm_eps", "_mlp_class", "intermediate_size", "condense_ratio"}
SMDM_DIFF_LLAMA = {"rotary_percentage": 1.0, "parallel_residual": False, "bias": False,
                   "_mlp_class": "LLaMAMLP", "norm_eps": 1e-5, "condense_ratio": 1,
                   "shared_attention_norm": False}
# LLaDA-8B-Base's config.json keys (the GSAI-ML Hugging Face repo, transformers 4.46.3), which
# its configuration class reads; our folder writes every one (sizes changed, tokens ours).
LLADA_KEYS = {"activation_type", "alibi", "alibi_bias_max", "architectures",
              "attention_dropout", "attention_layer_norm", "attention_layer_norm_with_affine",
              "auto_map", "bias_for_layer_norm", "block_group_size", "block_type", "d_model",
              "embedding_dropout", "embedding_size", "eos_token_id", "flash_attention",
              "include_bias", "include_qkv_bias", "init_cutoff_factor", "init_device",
              "init_fn", "init_std", "input_emb_norm", "layer_norm_type",
              "layer_norm_with_affine", "mask_token_id", "max_sequence_length",
              "mlp_hidden_size", "mlp_ratio", "model_type", "multi_query_attention", "n_heads",
              "n_kv_heads", "n_layers", "pad_token_id", "precision", "residual_dropout",
              "rms_norm_eps", "rope", "rope_full_precision", "rope_theta", "scale_logits",
              "use_cache", "vocab_size", "weight_tying"}


def test_litgpt_config_is_smdm_config_and_shapes_are_what_smdm_allocates(tmp_path):
    from safetensors.numpy import load_file

    from mdm_jax.export.writer import smdm_name

    trainer, _ = _random_checkpoint(tmp_path / "run", "nano", "mdm")
    export(str(tmp_path / "run"), "litgpt", str(tmp_path / "lit"))
    config = json.loads((tmp_path / "lit" / "config.json").read_text())
    assert set(config) <= SMDM_FIELDS, set(config) - SMDM_FIELDS
    assert {k: config[k] for k in SMDM_DIFF_LLAMA} == SMDM_DIFF_LLAMA
    args = trainer.args
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_query_groups"],
            config["intermediate_size"]) == (args.n_layer, args.n_head, args.d_model,
                                             args.n_head, args.mlp_dim)
    assert config["padded_vocab_size"] == config["vocab_size"] == args.vocab_size == 512
    assert config["_norm_class"] == "RMSNorm" and config["block_size"] == 64
    tensors = load_file(str(tmp_path / "lit" / "lit_model.safetensors"))
    assert tensors["lm_head.weight"].shape == (config["padded_vocab_size"], config["n_embd"])
    assert tensors["transformer.wte.weight"].shape == (config["padded_vocab_size"] + 1,
                                                       config["n_embd"])
    # For SMDM's presets, Config.from_name(name) is the same model.
    assert smdm_name("170M") == "Diff_LLaMA_170M" and smdm_name("1.1B") == "Diff_LLaMA_1028M"
    assert config["name"] == "mdm_jax_nano"


def test_llada_folder_loads_with_automodel_and_matches_jax(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer, params = _random_checkpoint(tmp_path / "run", "nano-hd128", "mdm")
    export(str(tmp_path / "run"), "llada-hf", str(tmp_path / "llada"), max_shard_bytes=500_000)
    config = json.loads((tmp_path / "llada" / "config.json").read_text())
    assert set(config) >= LLADA_KEYS, LLADA_KEYS - set(config)
    rows, vocab = trainer.args.embedding_rows, trainer.args.vocab_size
    assert config["vocab_size"] == config["embedding_size"] == rows == vocab + 1
    assert config["mask_token_id"] == vocab and config["model_type"] == "llada"
    assert (config["activation_type"], config["block_type"], config["layer_norm_type"],
            config["rope"], config["weight_tying"]) == ("silu", "llama", "rms", True, False)
    model = transformers.AutoModel.from_pretrained(str(tmp_path / "llada"),
                                                   trust_remote_code=True,
                                                   dtype=torch.float32).eval()
    head = model.model.transformer.ff_out.weight
    assert head.shape == (rows, trainer.args.d_model) and not head[vocab:].any()
    tokens = _tokens(trainer)  # mask ids included
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens).long()).logits.numpy()
    assert logits.shape == (*tokens.shape, rows) and not logits[..., vocab:].any()
    np.testing.assert_allclose(logits[..., :vocab], _jax_logits(trainer, params, tokens),
                               atol=TOL, rtol=0)
    masked = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "llada"),
                                                               trust_remote_code=True)
    assert type(masked).__name__ == "LLaDAModelLM"


@pytest.mark.parametrize("fmt, kind", [("litgpt", "mdm"), ("llada-hf", "mdm"),
                                       ("llama-hf", "arm")])
def test_every_export_ships_a_tokenizer_that_encodes_like_mdm_jax(tiny_data, tmp_path,
                                                                  monkeypatch, fmt, kind):
    from mdm_jax.data.tokenizer import Tokenizer, file_sha256

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer, _ = _random_checkpoint(tmp_path / "run", "nano", kind)
    export(str(tmp_path / "run"), fmt, str(tmp_path / "out"), tokenizer=tiny_data["tokenizer"])
    out = tmp_path / "out"
    ours = Tokenizer.load(tiny_data["tokenizer"])
    assert file_sha256(out / "tokenizer.model") == ours.sha256
    meta = json.loads((out / "mdm_jax.json").read_text())
    assert meta["tokenizer_sha256"] == ours.sha256 and meta["tokenizer"] == "tokenizer.model"
    if fmt == "litgpt":
        return
    transformers = pytest.importorskip("transformers")
    # transformers reads the folder's config first: llada-hf's is remote code
    tok = transformers.AutoTokenizer.from_pretrained(str(out),
                                                     trust_remote_code=fmt == "llada-hf")
    texts = ["The king said to the queen.", " leading space", "  two", "tabs\tand  gaps\n\n",
             "Ünïcödé 日本語 😀", "", "end "]
    for text in texts:
        assert tok(text)["input_ids"] == ours.encode(text), text
        assert tok.decode(ours.encode(text)) == ours.decode(ours.encode(text)), text
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_token_id == ours.eos_id
    assert config["pad_token_id"] == tok.pad_token_id and config["bos_token_id"] == ours.bos_id
    if kind == "mdm":
        assert tok.mask_token_id == config["mask_token_id"] == trainer.args.mask_id


HOST_ARRAY_SAVE = """
import re, sys
import numpy as np
from mdm_jax.checkpoint import Checkpointer

def peak_rss():  # (VmHWM, unlike ru_maxrss, does not start from the parent's peak)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024

rng = np.random.default_rng(0)
weights = {f"w{i}": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(48)}
held = peak_rss()
ckpt = Checkpointer(sys.argv[1], host_arrays=sys.argv[2] == "1")
ckpt.save(3, {"params": weights}, None, {}, {}, force=True)
ckpt.close()
print((peak_rss() - held) / sum(w.nbytes for w in weights.values()))
"""


def test_an_import_saves_its_weights_without_copying_them(tmp_path):
    """An import's weights are written from where they lie: Orbax's default (a defensive copy
    of every host array, then zstd) added 1.85x the weights' bytes to the import's peak, the
    most of the 3.3x an import took. The saved step reads back exactly."""
    import subprocess
    import sys

    from conftest import REPO

    added = {}
    for host_arrays in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", HOST_ARRAY_SAVE,
                              str(tmp_path / f"run{host_arrays}"), host_arrays],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        added[host_arrays] = float(out.stdout.split()[-1])
    assert added["0"] > 1.0 and added["1"] < 0.3, added  # (x the weights' 201 MB)
    from mdm_jax.checkpoint import read_step

    saved, _ = read_step(str(tmp_path / "run1"), 3, read=lambda r: r.params())
    rng = np.random.default_rng(0)
    for i in range(48):
        np.testing.assert_array_equal(np.asarray(saved[f"w{i}"]),
                                      rng.standard_normal((1024, 1024), dtype=np.float32))
