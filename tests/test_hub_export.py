"""Hub-ready export folders: the model card, generation settings, the llada-hf folder's own
`generate` (the tokens of `python -m mdm_jax.sample`, and of LLaDA's generate.py where a
checkout is here), `--push-to-hub` without a reachable Hub, and `load` by Hub id."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO, nano_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.xdist_group("hub_export")
REFERENCES = os.environ.get("MDM_JAX_REFERENCES", os.path.join(REPO, "..", "references"))
HUB_ID = "my-org/tiny-mdm"
STEPS = 10


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A nano MDM trained 10 steps with a validation bound, and its llada-hf export bound
    for HUB_ID: {"run", "folder", "tokenizer"}."""
    from mdm_jax.export.writer import export
    from mdm_jax.train import train

    root = tmp_path_factory.mktemp("hub_export")
    run = str(root / "run")
    train(nano_config(**{"data.train_dir": tiny_data["train"],
                         "data.eval_dir": tiny_data["validation"],
                         "data.tokenizer": tiny_data["tokenizer"], "workdir": run,
                         "steps": STEPS, "eval_every": STEPS, "checkpoint_every": STEPS,
                         "data.eval_batches": 1, "samples.count": 0}))
    folder = str(root / "llada")
    export(run, "llada-hf", folder, hub_id=HUB_ID)
    return {"run": run, "folder": folder, "tokenizer": tiny_data["tokenizer"]}


@pytest.fixture(scope="module")
def peaked(tiny_data, tmp_path_factory):
    """A nano MDM with random weights whose head is scaled up (confident, varied predictions:
    a sampler's choices are then far from ties), saved as a run with the tiny tokenizer, and
    its llada-hf export: {"run", "folder"}."""
    import jax

    from mdm_jax.checkpoint import Checkpointer
    from mdm_jax.export.writer import export
    from mdm_jax.trainer import Trainer, resolved_config

    root = tmp_path_factory.mktemp("peaked")
    c = nano_config(**{"data.tokenizer": tiny_data["tokenizer"], "workdir": str(root / "run")})
    trainer = Trainer(c, devices=jax.devices()[:1])
    state = trainer.create_state(seed=3)
    with trainer.context():
        params = dict(state.params)
        params["head"] = params["head"] * 40.0
        state = state.replace(params=params)
    ckpt = Checkpointer(c.workdir)
    ckpt.save(1, state, None, resolved_config(c, trainer), {"preset": "nano"}, force=True)
    ckpt.close()
    export(c.workdir, "llada-hf", str(root / "llada"))
    return {"run": c.workdir, "folder": str(root / "llada")}


def _python(args, env=None, **kwargs):
    full = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full, capture_output=True,
                          text=True, **kwargs)


def _card(folder: str) -> tuple[dict, str]:
    text = open(os.path.join(folder, "README.md")).read()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_the_model_card_states_what_the_model_is(trained):
    from mdm_jax import flops
    from mdm_jax.presets import get_preset

    header, body = _card(trained["folder"])
    assert header["library_name"] == "transformers" and "license" not in header
    assert {"mdm_jax", "diffusion"} <= set(header["tags"])
    rows = dict(re.findall(r"^\| (\w[\w ]*) \| (.*) \|$", body, re.M))
    assert rows["Family"].startswith("mdm:") and rows["Preset"].startswith("nano (")
    params = flops.total_params(get_preset("nano"), 512, "mdm")
    assert rows["Parameters"].startswith(f"{params:,} ")
    assert rows["Training"].startswith(f"step {STEPS}, {STEPS * 16 * 64:,} tokens seen")
    evals = [json.loads(line) for line in open(os.path.join(trained["run"], "metrics.jsonl"))]
    last = [r for r in evals if "eval_loss" in r][-1]
    assert rows["Validation"].startswith(f"{last['eval_loss']:.4f} ± "
                                         f"{last['eval_loss_se']:.4f} nats per token")
    assert f"at step {last['step']}" in rows["Validation"]
    assert "mask token id 512" in rows["Vocabulary"]
    assert "license:" in body  # the owner is told where to set it


def test_the_folder_carries_its_trained_length_and_sampling_settings(trained):
    folder = trained["folder"]
    tok_config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    assert tok_config["model_max_length"] == 64
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert gen.max_length == 64 and gen.eos_token_id == 2 and gen.bos_token_id == 1
    assert (gen.mdm_steps, gen.mdm_remasking, gen.mdm_temperature) == (64, "low_confidence", 0)
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert tok.model_max_length == 64
    # The card is not fingerprinted: its owner edits it (the license) and the folder still loads
    from mdm_jax.inference import load

    with open(os.path.join(folder, "README.md"), "a") as f:
        f.write("\nlicense edited by its owner\n")
    assert load(folder).step == STEPS


def test_the_model_cards_three_lines_run(trained):
    _, body = _card(trained["folder"])
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert len(code.strip().splitlines()) == 3 and json.dumps(HUB_ID) in code
    local = code.replace(json.dumps(HUB_ID), json.dumps(trained["folder"]))
    out = _python(["-c", local], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()  # the prompt and its completion, decoded


def _folder_generate(folder, prompts, **options):
    """Answers of the folder's own `generate`, prompts left-padded (LLaDA's convention)."""
    model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, **options)
    return out[:, width:].tolist(), model, ids, mask


@pytest.mark.parametrize("cli, options", [
    ([], {}),  # every setting from generation_config.json: mdm_jax.sample's defaults
    (["--steps", "8", "--block-length", "8", "--reveal-order", "front", "--cfg", "1.5",
      "--end-last"],
     dict(steps=8, block_length=8, reveal_order="front", cfg_scale=1.5,
          confidence_eos_eot_inf=True)),
    (["--steps", "16", "--block-length", "4", "--no-eos"],
     dict(steps=16, block_length=4, logits_eos_inf=True))])
def test_the_llada_folders_generate_gives_the_tokens_of_mdm_jax_sample(peaked, tiny_data,
                                                                       tmp_path, cli, options):
    from mdm_jax.data.tokenizer import Tokenizer

    texts = ["The king", "Once upon a time, in a land far away"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n"
                                                    for t in texts))
    out = _python(["-m", "mdm_jax.sample", "--model", peaked["run"], "--prompts",
                   str(tmp_path / "prompts.jsonl"), "--gen-length", "16", "--temperature", "0",
                   "--out", str(tmp_path / "answers.jsonl"), *cli], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = [json.loads(line)["tokens"] for line in open(tmp_path / "answers.jsonl")]
    tok = Tokenizer.load(tiny_data["tokenizer"])
    prompts = [[tok.bos_id] + tok.encode(t) for t in texts]
    answers, model, ids, mask = _folder_generate(peaked["folder"], prompts, gen_length=16,
                                                 **options)
    assert answers == ours
    assert len({tuple(a) for a in answers}) == 2 and max(len(set(a)) for a in answers) > 3
    llada = os.path.join(REFERENCES, "LLaDA", "generate.py")
    if options.get("reveal_order") == "front" and os.path.isfile(llada):
        # LLaDA's own sampler on the same folder (its cfg needs no mask; ours pads)
        sys.path.insert(0, os.path.dirname(llada))
        try:
            from generate import generate as llada_generate
        finally:
            sys.path.pop(0)
        ref = llada_generate(model, ids[:1, -len(prompts[0]):], steps=8, gen_length=16,
                             block_length=8, temperature=0.0, remasking="low_confidence",
                             mask_id=model.config.mask_token_id)
        plain, *_ = _folder_generate(peaked["folder"], prompts[:1], gen_length=16, steps=8,
                                     block_length=8, reveal_order="front")
        assert ref[0, len(prompts[0]):].tolist() == plain[0]


def test_push_to_hub_without_a_hub_keeps_the_export_and_says_how_to_upload(trained,
                                                                            tmp_path):
    out = str(tmp_path / "push")
    r = _python(["-m", "mdm_jax.export", "--model", trained["run"], "--format", "llada-hf",
                 "--out", out, "--push-to-hub", "my-org/pushed"], timeout=300)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --push-to-hub my-org/pushed: HF_HUB_OFFLINE is set")
    assert f"the export is complete at {out}" in line and "hf upload my-org/pushed" in line
    assert json.dumps("my-org/pushed") in open(os.path.join(out, "README.md")).read()
    # A Hub that refuses connections: the same, naming the endpoint
    r = _python(["-m", "mdm_jax.export", "--model", trained["run"], "--format", "llada-hf",
                 "--out", out, "--overwrite", "--push-to-hub", "my-org/pushed"],
                env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "could not reach the Hugging Face Hub at http://127.0.0.1:9" in r.stderr
    r = _python(["-m", "mdm_jax.export", "--model", trained["run"], "--format", "llada-hf",
                 "--out", str(tmp_path / "bad"), "--push-to-hub", "not an id"], timeout=300)
    assert r.returncode == 2 and "give a Hub repository id, ORG/NAME" in r.stderr
    assert not os.path.exists(tmp_path / "bad")


def test_load_takes_a_hub_id_from_the_hubs_cache(trained, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from mdm_jax.hub import HubError
    from mdm_jax.inference import load

    # The Hub's documented cache layout: models--ORG--NAME/{refs/main, snapshots/REVISION}
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--my-org--tiny-mdm"
    shutil.copytree(trained["folder"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tokens = [[1, 40, 41, 512, 512, 7]]
    expected = np.asarray(load(trained["folder"]).logits(tokens))
    for name in (HUB_ID, f"hf://{HUB_ID}"):
        m = load(name)
        assert m.source == "llada-hf" and m.step == STEPS
        np.testing.assert_array_equal(np.asarray(m.logits(tokens)), expected)
    with pytest.raises(HubError, match="my-org/other: HF_HUB_OFFLINE is set"):
        load("my-org/other")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(Exception, match="runs/missing") as e:  # a local path stays local
        load("runs/missing")
    assert not isinstance(e.value, HubError)


def test_a_hub_that_never_answers_is_an_error_not_a_hang(monkeypatch):
    import socket

    from huggingface_hub import constants

    from mdm_jax import hub

    with socket.socket() as server:  # listens (the kernel completes connections), never reads
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "TIMEOUT_S", 0.5)
        with pytest.raises(hub.HubError, match=f"my-org/silent: could not reach the Hugging "
                                               f"Face Hub at {endpoint}"):
            hub.fetch("my-org/silent")
