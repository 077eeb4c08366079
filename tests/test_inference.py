"""mdm_jax.inference: samplers (reverse process, semi-AR, caching, guidance, KV cache), token
choice, loading from checkpoints and exports, and the `python -m mdm_jax.sample` CLI."""

from __future__ import annotations

import dataclasses
import glob
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SEQ_LEN, nano_config
from flax import linen as nn

from mdm_jax.inference import MDMSampler, SamplingError, generate, load
from mdm_jax.inference.arm import sample_cached, sample_full
from mdm_jax.inference.mdm import denoise, guided_logits
from mdm_jax.inference.tokens import choose, filter_logits
from mdm_jax.model import Encoder, ModelArgs
from mdm_jax.presets import get_preset

PROMPTS = [[1, 17, 42], [1], [1, 9, 8, 7, 6, 5]]  # different lengths in one batch


@pytest.fixture(scope="module")
def mdm():
    args = ModelArgs.from_preset(get_preset("nano"))
    params = Encoder(args).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return Encoder(args), nn.unbox(params)


@pytest.fixture(scope="module")
def arm():
    args = ModelArgs.from_preset(get_preset("nano"), family="arm")
    params = Encoder(args).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    return Encoder(args), nn.unbox(params)


def _canvas(model, prompts, gen_length):
    lens = np.array([len(p) for p in prompts], np.int32)
    canvas = np.full((len(prompts), lens.max() + gen_length), model.args.mask_id, np.int32)
    for row, p in zip(canvas, prompts, strict=True):
        row[:len(p)] = p
    return jnp.asarray(canvas), jnp.asarray(lens)


# ---- MDM samplers --------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [
    MDMSampler(steps=8), MDMSampler(steps=8, remasking="random", temperature=1.0),
    MDMSampler(steps=8, block_length=4), MDMSampler(steps=8, cfg=1.5, temperature=1.0)])
def test_mdm_keeps_each_prompt_and_fills_exactly_its_answer(mdm, sampler):
    model, params = mdm
    g = generate(model, params, PROMPTS, 8, sampler, seed=3)
    mask = model.args.mask_id
    for row, p in zip(g.tokens, PROMPTS, strict=True):
        assert row[:len(p)].tolist() == p
        assert (row[len(p):len(p) + 8] < model.args.vocab_size).all()  # all revealed
        assert (row[len(p) + 8:] == mask).all()  # padding after the answer untouched
    again = generate(model, params, PROMPTS, 8, sampler, seed=3)
    np.testing.assert_array_equal(g.tokens, again.tokens)  # reproducible for a seed


def test_a_row_samples_the_same_alone_as_in_a_batch_of_other_prompt_lengths(mdm, arm):
    for model, params in (mdm, arm):
        batch = generate(model, params, PROMPTS, 8, MDMSampler(steps=8))
        for i, p in enumerate(PROMPTS):
            alone = generate(model, params, [p], 8, MDMSampler(steps=8))
            assert alone.answers()[0] == batch.answers()[i]


def test_low_confidence_reveals_the_most_confident_on_schedule(mdm):
    model, params = mdm
    canvas, lens = _canvas(model, [[1, 7, 7, 7]] * 2, 12)
    out, _, history = denoise(model, params, canvas, lens, jax.random.PRNGKey(0),
                              sampler=MDMSampler(steps=4), gen_length=12, trace=True)
    mask = model.args.mask_id
    first = np.asarray(history[0])
    assert ((first[:, 4:] != mask).sum(axis=1) == 3).all()  # floor(12 * (1 - 0.75 / 1))
    probs = jax.nn.softmax(model.apply({"params": params}, jnp.where(
        jnp.arange(16) >= 4, mask, canvas), jnp.asarray([16, 16]), return_logits=True), -1)
    conf = np.asarray(jnp.max(probs, axis=-1))[:, 4:]
    for b in range(2):
        assert set(np.flatnonzero(first[b, 4:] != mask)) == set(np.argsort(-conf[b])[:3])
    assert [int((np.asarray(h)[0, 4:] != mask).sum()) for h in history] == [3, 6, 9, 12]


def test_random_remasking_reveals_at_rate_one_minus_s_over_t(mdm):
    model, params = mdm
    canvas, lens = _canvas(model, [[1]] * 64, 32)
    _, _, history = denoise(model, params, canvas, lens, jax.random.PRNGKey(1),
                            sampler=MDMSampler(steps=4, remasking="random", temperature=1.0),
                            gen_length=32, trace=True)
    revealed = (np.asarray(history[0])[:, 1:] != model.args.mask_id).mean()
    assert abs(revealed - 0.25) < 0.03  # t = 1 -> s = 0.75


def test_semi_autoregressive_never_reveals_a_later_block_early(mdm):
    model, params = mdm
    gen, block, steps = 12, 4, 6  # 3 blocks, 2 steps each
    canvas, lens = _canvas(model, PROMPTS, gen)
    for remasking in ("low_confidence", "random"):
        _, _, history = denoise(model, params, canvas, lens, jax.random.PRNGKey(2),
                                sampler=MDMSampler(steps=steps, block_length=block,
                                                   remasking=remasking, temperature=1.0),
                                gen_length=gen, trace=True)
        history = np.asarray(history)
        for i in range(steps):
            k = i // (steps // (gen // block))  # the block being denoised at step i
            for row, p in zip(history[i], PROMPTS, strict=True):
                answer = row[len(p):len(p) + gen].reshape(-1, block)
                revealed = answer != model.args.mask_id
                assert revealed[:k].all()  # earlier blocks complete
                assert not revealed[k + 1:].any()  # later blocks untouched
                if i % (steps // (gen // block)) == steps // (gen // block) - 1:
                    assert revealed[k].all()  # a block's last step completes it


def test_caching_gives_identical_samples_with_fewer_network_calls(mdm):
    model, params = mdm
    for remasking in ("random", "low_confidence"):
        s = MDMSampler(steps=48, remasking=remasking, temperature=1.0)  # 48 steps, 8 tokens
        plain = generate(model, params, PROMPTS, 8, s, seed=5)
        cached = generate(model, params, PROMPTS, 8, dataclasses.replace(s, cache=True), seed=5)
        np.testing.assert_array_equal(cached.tokens, plain.tokens)
        assert plain.nfe == 48
        assert cached.nfe < 48


def test_guidance_weight_zero_is_plain_and_a_positive_weight_moves_away_from_uncond(mdm):
    model, params = mdm
    canvas, lens = _canvas(model, PROMPTS, 8)
    x = jnp.where(jnp.arange(canvas.shape[1])[None] >= lens[:, None] + 2, model.args.mask_id,
                  canvas)  # some answer tokens already revealed
    prompt = jnp.arange(canvas.shape[1])[None] < lens[:, None]
    lengths = lens + 8
    cond = model.apply({"params": params}, x, lengths, return_logits=True)
    uncond = model.apply({"params": params}, jnp.where(prompt, model.args.mask_id, x), lengths,
                         return_logits=True)
    np.testing.assert_array_equal(guided_logits(model, params, x, prompt, lengths, 0.0), cond)
    for w in (0.5, 2.0):
        got = guided_logits(model, params, x, prompt, lengths, w)
        np.testing.assert_allclose(got, uncond + (w + 1) * (cond - uncond), rtol=1e-4,
                                   atol=1e-4)
        assert float(jnp.sum((got - cond) * (cond - uncond))) > 0  # further from uncond
    plain = generate(model, params, PROMPTS, 8, MDMSampler(steps=8, temperature=1.0), seed=1)
    zero = generate(model, params, PROMPTS, 8, MDMSampler(steps=8, temperature=1.0, cfg=0.0),
                    seed=1)
    guided = generate(model, params, PROMPTS, 8, MDMSampler(steps=8, temperature=1.0, cfg=3.0),
                      seed=1)
    np.testing.assert_array_equal(plain.tokens, zero.tokens)
    assert (plain.tokens != guided.tokens).any()


# ---- ARM -----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0),
                                                     (0.8, 20, 1.0), (1.0, 0, 0.9)])
def test_kv_cache_gives_the_tokens_of_full_recompute(arm, temperature, top_k, top_p):
    model, params = arm
    canvas, lens = _canvas(model, PROMPTS, 10)
    canvas = jnp.where(canvas == model.args.mask_id, 0, canvas)
    kw = dict(prefill=1, temperature=temperature, top_k=top_k, top_p=top_p)
    cached, n_cached = sample_cached(model, params, canvas, lens, jax.random.PRNGKey(4), **kw)
    full, n_full = sample_full(model, params, canvas, lens, jax.random.PRNGKey(4), **kw)
    np.testing.assert_array_equal(cached, full)
    for row, p in zip(np.asarray(cached), PROMPTS, strict=True):
        assert row[:len(p)].tolist() == p
    assert int(n_cached) == int(n_full) == canvas.shape[1] - 1
    if temperature == 0:  # greedy: each token is the argmax given its prefix
        logits = model.apply({"params": params}, cached, return_logits=True)
        for row, p in zip(range(3), PROMPTS, strict=True):
            np.testing.assert_array_equal(np.argmax(np.asarray(logits[row, len(p) - 1:-1]), -1),
                                          np.asarray(cached[row, len(p):]))


# ---- token choice --------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_max_draws_from_the_softmax(temperature):
    from scipy import stats

    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 0.2])
    n = 40_000
    tokens, _ = choose(jnp.broadcast_to(logits, (n, 8)), jax.random.PRNGKey(7), temperature)
    counts = np.bincount(np.asarray(tokens), minlength=8)
    probs = np.exp(np.asarray(logits, np.float64) / temperature)
    expected = probs / probs.sum() * n
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = jnp.log(jnp.asarray([0.4, 0.3, 0.15, 0.1, 0.05]))
    keep = lambda f: np.asarray(f > -1e29)
    assert keep(filter_logits(logits, top_k=2)).tolist() == [True, True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.7)).tolist() == [True, True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.71)).tolist() == [True, True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.01)).tolist() == [True, False, False, False, False]
    tokens, _ = choose(jnp.broadcast_to(logits, (2000, 5)), jax.random.PRNGKey(0), 1.0, top_k=3)
    assert set(np.unique(np.asarray(tokens))) == {0, 1, 2}


def test_requests_that_cannot_work_name_the_option_as_the_caller_spells_it(mdm, arm):
    """One message, two spellings: the keyword from Python (and lm-eval's model_args), the
    flag inside a command line's `spelling(flags=True)`."""
    from mdm_jax.errors import spelling
    from mdm_jax.families import FamilyError

    model, params = mdm
    for sampler, gen, keyword, flag in [
            (MDMSampler(steps=0), 8, "steps=0", "--steps 0"),
            (MDMSampler(steps=8, block_length=3), 8, "block_length=3 does not divide gen_length=8",
             "--block-length 3 does not divide --gen-length 8"),
            (MDMSampler(steps=5, block_length=4), 8, "steps=5 is not a multiple",
             "--steps 5 is not a multiple"),
            (MDMSampler(steps=8), 0, "gen_length=0", "--gen-length 0")]:
        with pytest.raises(SamplingError, match=keyword):
            generate(model, params, PROMPTS, gen, sampler)
        with spelling(flags=True), pytest.raises(SamplingError, match=flag):
            generate(model, params, PROMPTS, gen, sampler)
    with pytest.raises(SamplingError, match="beyond the canvas"):
        generate(model, params, [[1] * 120], 16, MDMSampler(steps=8))
    with pytest.raises(FamilyError, match="the arm family .* 'cfg'; it has: kv_cache$"):
        generate(arm[0], arm[1], PROMPTS, 8, MDMSampler(cfg=1.0))
    with spelling(flags=True, kv_cache="--no-kv-cache"), pytest.raises(
            FamilyError, match="the arm family .* '--cfg'; it has: --no-kv-cache$"):
        generate(arm[0], arm[1], PROMPTS, 8, MDMSampler(cfg=1.0))
    # The ARM's sampler takes no steps: a number it would not use is not refused.
    assert generate(arm[0], arm[1], PROMPTS, 10, MDMSampler(steps=0)).nfe >= 1


# ---- loading and the CLI -------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    from mdm_jax.train import train

    workdir = tmp_path_factory.mktemp("inference_run")
    c = nano_config(**{"data.train_dir": tiny_data["train"], "data.eval_dir": "",
                       "data.tokenizer": tiny_data["tokenizer"], "workdir": str(workdir),
                       "steps": 4, "checkpoint_every": 2, "samples.count": 0})
    train(c)
    return str(workdir)


def test_load_reads_params_only_from_a_checkpoint_and_an_export_alike(run_dir, tmp_path):
    from mdm_jax.checkpoint import Checkpointer, abstract_with_shardings
    from mdm_jax.export.writer import export
    from mdm_jax.trainer import Trainer

    m = load(run_dir)
    assert m.step == 4 and m.source == "checkpoint" and m.config.seq_len == SEQ_LEN
    ckpt = Checkpointer(run_dir)
    trainer = Trainer(nano_config(**{"workdir": run_dir}))
    state = ckpt.restore(4, abstract_with_shardings(trainer.abstract_state,
                                                    trainer.state_sharding))
    ckpt.close()
    for a, b in zip(jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(state.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    export(run_dir, "litgpt", str(tmp_path / "lit"))
    e = load(str(tmp_path / "lit"))
    assert e.source == "litgpt" and e.step == 4 and e.config.model.preset == "nano"
    tokens = jnp.asarray([[1, 5, 9, 12]])
    np.testing.assert_allclose(e.logits(tokens), m.logits(tokens), rtol=1e-5, atol=1e-5)


def test_load_skips_a_changed_checkpoint_with_a_warning(run_dir, tmp_path, caplog):
    import shutil

    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    for path in glob.glob(f"{copy}/checkpoints/4/state/**/d/*", recursive=True):
        data = bytearray(open(path, "rb").read())
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(x ^ 0xFF for x in data[middle:middle + 4096])
        open(path, "wb").write(bytes(data))
    with caplog.at_level("WARNING", logger="mdm_jax"):
        m = load(copy)
    assert m.step == 2
    assert "checkpoint 4 under" in caplog.text and "trying the previous one" in caplog.text


def test_sample_cli_writes_jsonl_for_prompts_of_a_file(run_dir, tmp_path, capsys):
    from mdm_jax import sample

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the"}\n\n{"prompt": "a b c"}\n')
    out = tmp_path / "out.jsonl"
    sample.cli(["--model", run_dir, "--prompts", str(prompts), "--out", str(out),
                "--gen-length", "16", "--steps", "8", "--block-length", "8", "--cfg", "0.5",
                "--num", "2", "--batch-size", "3"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["the", "the", "a b c", "a b c"]
    for r in records:
        assert len(r["tokens"]) == 16 and r["nfe"] >= 1 and r["seconds"] > 0
        assert isinstance(r["completion"], str)
    assert capsys.readouterr().out.count("--- sample ") == 4


def test_notebook_api_strings_in_and_out_as_the_sample_cli_gives_them(run_dir, tmp_path):
    """load() carries the tokenizer; generate_text takes and returns strings with the CLI's
    conventions (BOS, run defaults, seeds); logits take lists, ragged ones padded."""
    from mdm_jax import sample
    from mdm_jax.inference import generate_text

    m = load(run_dir)
    assert m.tokenizer.decode(m.tokenizer.encode("the king")) == "the king"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the"}\n{"prompt": "a b c"}\n')
    out = tmp_path / "out.jsonl"
    sample.cli(["--model", run_dir, "--prompts", str(prompts), "--out", str(out),
                "--gen-length", "12", "--steps", "6", "--temperature", "1", "--seed", "3"])
    cli = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    texts = generate_text(m, ["the", "a b c"], gen_length=12, steps=6, temperature=1, seed=3)
    assert texts == cli and all(isinstance(t, str) for t in texts)
    one = generate_text(m, "the", gen_length=12, steps=6, temperature=1, seed=3)
    assert isinstance(one, str)
    ids = [[m.tokenizer.bos_id, 5, 9, 12], [m.tokenizer.bos_id, 5]]
    np.testing.assert_allclose(m.logits(ids[0]), m.logits(jnp.asarray([ids[0]])), atol=1e-6)
    ragged = m.logits(ids)
    alone = m.logits([ids[1]])
    assert ragged.shape[:2] == (2, 4)
    np.testing.assert_allclose(ragged[1, :2], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(SamplingError, match="does not fit the trained seq_len"):
        generate_text(m, "the", gen_length=10 * SEQ_LEN)


def test_sample_cli_defaults_fit_the_blocks_and_report_speed(run_dir, tmp_path, capsys):
    from mdm_jax import sample

    out = tmp_path / "out.jsonl"
    # No --gen-length: the default fills the canvas with whole blocks that --steps divides.
    sample.cli(["--model", run_dir, "--prompt", "the", "--steps", "8", "--block-length", "16",
                "--num", "2", "--temperature", "0", "--out", str(out)])
    lengths = {len(json.loads(line)["tokens"]) for line in out.read_text().splitlines()}
    assert lengths == {32}  # 3 blocks would fit, but 8 steps do not split into 3
    err = capsys.readouterr().err
    assert "note: --temperature 0 is greedy" in err
    assert re.search(r"\[sample\] batch 1: 2 x 32 tokens, \d+ network calls, .* tokens/s", err)
    # A length the blocks do not divide is refused before any model is loaded.
    with pytest.raises(SystemExit):
        sample.cli(["--model", str(tmp_path / "nowhere"), "--gen-length", "10",
                    "--block-length", "4"])
    assert "--block-length 4 does not divide --gen-length 10" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps 0: give 1 or more"),
    (["--gen-length", "10", "--block-length", "3"], "--block-length 3 does not divide"),
    (["--gen-length", str(2 * SEQ_LEN)], "beyond the trained seq_len"),
    (["--prompt", "x", "--prompts", "p.jsonl"], "give one of them"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--prompts", "/nonexistent.jsonl"], "--prompts /nonexistent.jsonl"),
])
def test_sample_cli_bad_options_are_one_line(run_dir, capsys, args, needle):
    from mdm_jax import sample

    with pytest.raises(SystemExit) as e:
        sample.cli(["--model", run_dir, *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert needle in err


def test_infill_fills_masks_anywhere_and_keeps_the_given_text(mdm):
    from mdm_jax.inference.mdm import infill

    model, params = mdm
    mask = model.args.mask_id
    canvas = np.asarray([[1, mask, mask, 30, 31, mask, 32, mask],
                         [1, 20, mask, mask, mask, 21, 22, 23]], np.int32)
    for s in (MDMSampler(steps=4), MDMSampler(steps=4, remasking="random", temperature=1.0)):
        out, nfe = infill(model, params, jnp.asarray(canvas), jax.random.PRNGKey(0), sampler=s)
        out = np.asarray(out)
        given = canvas != mask
        np.testing.assert_array_equal(out[given], canvas[given])
        assert (out[~given] < model.args.vocab_size).all() and 1 <= int(nfe) <= 4


def test_load_onto_a_mesh_shards_the_params_and_gives_the_same_logits(run_dir):
    one = load(run_dir)
    four = load(run_dir, mesh_shape=(1, 4, 1), devices=jax.devices()[:4])
    assert four.mesh.shape["fsdp"] == 4
    emb = four.params["embedding"]
    assert len(emb.sharding.device_set) == 4 and not emb.sharding.is_fully_replicated
    tokens = jnp.asarray([[1, 5, 9, 12, 40, 41, 42, 43]])
    np.testing.assert_allclose(four.logits(tokens), one.logits(tokens), rtol=1e-5, atol=1e-5)
