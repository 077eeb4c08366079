"""Supervised fine-tuning: the response-only losses against direct computations, the data
builder and templates, the loader's per-pass turn draw, LLaDA's sampler options, a nano model
that learns to stop, and fine-tuning from a pretrained run with exact resume."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nano_config

from mdm_jax import objectives
from mdm_jax.config import ConfigError, validate
from mdm_jax.data import sft, templates
from mdm_jax.data.tokenizer import CHAT_PIECES, Tokenizer, extend
from mdm_jax.sft_objectives import SFTArgs, arm_response_loss, masked_response_loss
from mdm_jax.trainer import Trainer

EOS, BOS = 2, 1


def _rows(seq_len=16):
    """Two hand-built rows: prompts of 3 and 6 tokens, pairs of 9 and 12 (EOS padded)."""
    rng = np.random.default_rng(0)
    a = sft.make_row([BOS, *rng.integers(10, 500, 2)], [*rng.integers(10, 500, 5), EOS],
                     seq_len, EOS)
    b = sft.make_row([BOS, *rng.integers(10, 500, 5)], [*rng.integers(10, 500, 5), EOS],
                     seq_len, EOS)
    return np.stack([a, b])


def _model(kind="mdm"):
    c = nano_config(**{"objective.kind": kind, "seq_len": 16, "global_batch": 2,
                       "objective.loss_chunk": 8, "sft.enabled": True})
    trainer = Trainer(c, devices=jax.devices()[:1])
    return trainer, trainer.create_state(0).params


def _ce(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -np.asarray(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])


def test_make_row_pads_with_eos_and_records_lengths():
    row = sft.make_row([1, 7, 8], [9, 10, EOS], 10, EOS)
    assert row.tolist() == [1, 7, 8, 9, 10, 2, 2, 2, 2, 2, 2, 3, 6]


@pytest.mark.parametrize("norm", ["llada", "smdm"])
def test_masked_response_loss_equals_a_direct_computation(norm):
    trainer, params = _model()
    rows = jnp.asarray(_rows())
    seen = []

    def spy(variables, inputs, lengths=None):
        seen.append((np.asarray(inputs), np.asarray(lengths)))
        return trainer.model.apply(variables, inputs, lengths)

    args, key = trainer.objective_args, jax.random.PRNGKey(3)
    loss, _ = masked_response_loss(spy, params, rows, key, args, SFTArgs(norm=norm),
                                   trainer.args.mask_id, 16)
    inputs, lengths = seen[0]
    x0 = np.asarray(rows[:, :16])
    prompt, longest = np.array([3, 6]), 12
    assert lengths.tolist() == [longest, longest]  # cut to the batch's longest pair
    masked = inputs == trainer.args.mask_id
    pos = np.arange(16)[None]
    assert not masked[pos < prompt[:, None]].any()  # the prompt is never masked
    assert not masked[:, longest:].any()
    # the draws the loss made, reproduced: t per row, p = (1 - eps) t + eps
    k_t, _, _ = jax.random.split(key, 3)
    p = np.asarray((1 - args.eps) * objectives.sample_t(k_t, 2, args.t_sampling) + args.eps)
    logits = trainer.model.apply({"params": params}, jnp.asarray(inputs), jnp.asarray(lengths),
                                 return_logits=True)
    ce = _ce(logits, jnp.asarray(x0)) * masked / p[:, None]
    answer = longest - prompt  # 9 and 6, EOS padding included
    want = (np.mean(ce.sum(1) / answer) if norm == "llada"
            else ce.sum() / (2 * longest - prompt.sum()))
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)


def test_prompts_are_never_masked_over_many_draws_and_prompt_drop_masks_them():
    trainer, params = _model()
    rows = jnp.asarray(_rows())
    prompt = np.arange(16)[None] < np.array([[3], [6]])
    seen = []

    def spy(variables, inputs, lengths=None):
        seen.append(np.asarray(inputs))
        return trainer.model.apply(variables, inputs, lengths)

    for i in range(20):
        masked_response_loss(spy, params, rows, jax.random.PRNGKey(i), trainer.objective_args,
                             SFTArgs(), trainer.args.mask_id, 16)
    masked = np.stack(seen) == trainer.args.mask_id
    response = ~prompt & (np.arange(16)[None] < 12)
    assert not masked[:, prompt].any() and masked[:, response].any()
    seen.clear()
    masked_response_loss(spy, params, rows, jax.random.PRNGKey(0), trainer.objective_args,
                         SFTArgs(prompt_drop=1.0), trainer.args.mask_id, 16)
    assert (seen[0][prompt] == trainer.args.mask_id).all()  # standard CFG training


def test_whole_row_recipe_is_the_pretraining_loss_bitwise():
    trainer, params = _model()
    rows = jnp.asarray(_rows())
    args = trainer.objective_args
    for i in range(3):
        key = jax.random.PRNGKey(i)
        ours, _ = masked_response_loss(trainer.model.apply, params, rows, key, args,
                                       SFTArgs(mask_prompt=False, pad="canvas"),
                                       trainer.args.mask_id, 16)
        ref, _ = objectives.mdm_loss(trainer.model.apply, params, rows[:, :16], key,
                                     dataclasses_replace(args, variable_length_prob=0.0),
                                     trainer.args.mask_id)
        assert float(ours) == float(ref)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.parametrize("norm", ["llada", "smdm"])
def test_arm_response_loss_scores_the_response_and_its_eos_only(norm):
    trainer, params = _model("arm")
    rows = jnp.asarray(_rows())
    loss, _ = arm_response_loss(trainer.model.apply, params, rows, jax.random.PRNGKey(0),
                                trainer.objective_args, SFTArgs(norm=norm), 0, 16)
    tokens = np.asarray(rows[:, :17])
    logits = trainer.model.apply({"params": params}, jnp.asarray(tokens[:, :16]),
                                 return_logits=True)
    ce = _ce(logits, jnp.asarray(tokens[:, 1:]))
    per_row = [ce[0, 2:8], ce[1, 5:11]]  # targets at positions 3..8 and 6..11: answer + EOS
    want = (np.mean([r.mean() for r in per_row]) if norm == "llada"
            else np.concatenate(per_row).mean())
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)


def test_config_refuses_families_and_options_without_fine_tuning():
    for overrides, words in (({"objective.kind": "uniform"}, "no fine-tuning objective"),
                             ({"objective.kind": "arm", "sft.prompt_drop": 0.1}, "mask token"),
                             ({"sft.norm": "mean"}, "config.sft.norm")):
        c = nano_config(**{"sft.enabled": True, **overrides})
        with pytest.raises(ConfigError, match=words):
            validate(c, 1)


def test_constant_schedule_warms_up_holds_and_decays_linearly():
    from mdm_jax.trainer import learning_rate_schedule

    c = nano_config(**{"steps": 100, "optim.schedule": "constant", "optim.lr": 1e-3,
                       "optim.min_lr": 1e-4, "optim.warmup_steps": 10,
                       "optim.decay_fraction": 0.2})
    lr = learning_rate_schedule(c)
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == float(lr(79)) == pytest.approx(1e-3)
    assert float(lr(90)) == pytest.approx(5.5e-4)
    assert float(lr(100)) == pytest.approx(1e-4)


# -- tokenizer, templates, data -------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_tok(tiny_data, tmp_path_factory):
    return str(extend(tiny_data["tokenizer"], tmp_path_factory.mktemp("tok") / "chat.model"))


def test_extending_a_tokenizer_moves_no_id(tiny_data, chat_tok):
    old, new = Tokenizer.load(tiny_data["tokenizer"]), Tokenizer.load(chat_tok)
    assert new.vocab_size == old.vocab_size + 3
    assert [new.piece_id(p) for p in CHAT_PIECES] == [old.vocab_size + i for i in range(3)]
    text = "The king said to the queen, 12 times."
    assert new.encode(text) == old.encode(text)
    assert old.piece_id(CHAT_PIECES[0]) is None and not old.has_chat_pieces


def test_dialogue_becomes_one_pair_per_turn_with_the_history_in_the_prompt(chat_tok):
    tok = Tokenizer.load(chat_tok)
    start, end, eot = (tok.piece_id(p) for p in CHAT_PIECES)
    system, exchanges = templates.split_dialogue([
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}])
    pairs = templates.dialogue_pairs(tok, "chat", system, exchanges)
    assert len(pairs) == 3

    def turn(text, first):  # the template, rendered by hand
        head = tok.encode(f"{CHAT_PIECES[0]}user{CHAT_PIECES[1]}\n\n{text}{CHAT_PIECES[2]}"
                          f"{CHAT_PIECES[0]}assistant{CHAT_PIECES[1]}\n\n")
        return [BOS] * first + head

    assert pairs[0][0] == turn("a", True)
    assert pairs[0][0].count(start) == 2 and pairs[0][0].count(eot) == 1
    answer = [tok.encode(x) + [eot, tok.eos_id] for x in "bdf"]
    assert [r for _, r in pairs] == answer
    assert pairs[1][0] == turn("a", True) + answer[0][:-1] + turn("c", False)
    assert pairs[2][0] == pairs[1][0] + answer[1][:-1] + turn("e", False)


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def test_prepare_counts_bad_records_by_kind_and_never_truncates(chat_tok, tmp_path):
    dialogue = {"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"},
                             {"role": "assistant", "content": "d"}]}
    src = _write(tmp_path / "in.jsonl", [
        {"prompt": "Hi", "response": "Hello there"}, dialogue, "not json", {"prompt": "x"},
        {"prompt": "x", "response": "  "}, {"messages": [{"role": "assistant", "content": "x"}]},
        {"prompt": "word " * 80, "response": "y"}])
    m = sft.prepare_sft([src], tmp_path / "out", chat_tok, "chat", 48)
    assert m["bad_records"] == {"not_json": 1, "missing_fields": 1, "bad_messages": 1,
                                "empty_response": 1, "too_long": 1}
    assert (m["blocks"], m["pairs"]) == (2, 3)
    source = sft.SFTPairs(tmp_path / "out", m)
    rows = np.concatenate([source[i] for i in range(len(source))])
    tok = Tokenizer.load(chat_tok)
    for row in rows:
        prompt, pair = row[-2:]
        assert (row[pair:49] == tok.eos_id).all()  # EOS padding to the canvas
        assert row[pair - 1] == tok.eos_id and row[pair - 2] == tok.eot_id
    # the same inputs again: nothing to do; other inputs into the same folder: refused
    assert sft.prepare_sft([src], tmp_path / "out", chat_tok, "chat", 48) == m
    with pytest.raises(sft.PrepareError, match="already holds"):
        sft.prepare_sft([src], tmp_path / "out", chat_tok, "chat", 64)


def test_loader_draws_another_turn_each_pass_and_resumes(chat_tok, tmp_path):
    from mdm_jax.data import loader

    turns = [{"role": r, "content": c} for r, c in
             (("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"),
              ("user", "e"), ("assistant", "f"))]
    src = _write(tmp_path / "in.jsonl", [{"messages": turns}] * 2)
    sft.prepare_sft([src], tmp_path / "out", chat_tok, "chat", 96)
    it = loader.make_train_iterator(tmp_path / "out", batch_size_per_process=2, seed=0)
    drawn = {tuple(next(it)[:, -2]) for _ in range(12)}  # prompt lengths of 12 passes
    assert len({p for pair in drawn for p in pair}) == 3  # every turn gets drawn
    state = it.get_state()
    ahead = [next(it) for _ in range(3)]
    it2 = loader.make_train_iterator(tmp_path / "out", batch_size_per_process=2, seed=0)
    it2.set_state(state)
    assert all((next(it2) == a).all() for a in ahead)


# -- sampling ---------------------------------------------------------------------------------
def test_llada_reveal_counts():
    from mdm_jax.inference.mdm import reveal_counts

    assert reveal_counts(10, 4, "front") == [3, 3, 2, 2]
    assert reveal_counts(10, 4, "even") == [2, 2, 3, 3]


@pytest.fixture(scope="module")
def reverse_model():
    """A nano MDM fine-tuned from scratch on "rev: x y z =" -> "z y x" (1-5 letters), with
    EOS padding: (trainer, params, items)."""
    rng = np.random.default_rng(0)
    items = []
    while len(items) < 200:
        letters = [int(x) for x in rng.integers(10, 36, rng.integers(1, 6))]
        items.append(([BOS, 5, *letters, 6], [*letters[::-1], EOS]))
    rows = np.stack([sft.make_row(p, r, 16, EOS) for p, r in items])
    c = nano_config(**{"seq_len": 16, "global_batch": 64, "steps": 500, "optim.lr": 3e-3,
                       "optim.warmup_steps": 20, "objective.loss_chunk": 16,
                       "objective.variable_length_prob": 0.0, "sft.enabled": True})
    trainer = Trainer(c, devices=jax.devices()[:1])
    state = trainer.create_state(0)
    with trainer.context():
        for _ in range(c.steps):
            state, _ = trainer.step(state, trainer.to_global(rows[rng.choice(200, 64)]))
    return trainer, jax.device_get(state.params), items


def test_fine_tuned_nano_model_answers_at_the_right_length(reverse_model):
    from mdm_jax.inference import MDMSampler, generate

    trainer, params, items = reverse_model
    g = generate(trainer.model, params, [p for p, _ in items], 8, MDMSampler(steps=8),
                 max_length=16)
    answers = g.answers(stop_ids=(EOS,))
    exact = np.mean([a == r[:-1] for a, (_, r) in zip(answers, items, strict=True)])
    length = np.mean([len(a) == len(r) - 1 for a, (_, r) in zip(answers, items, strict=True)])
    assert exact >= 0.9 and length >= 0.95, (exact, length)
    assert any(EOS in row for row in g.answers())  # it does generate EOS padding...
    no_eos = generate(trainer.model, params, [p for p, _ in items], 8,
                      MDMSampler(steps=8, forbid_ids=(EOS,)), max_length=16)
    assert not any(EOS in row for row in no_eos.answers())  # ...unless forbidden


def test_front_reveal_order_and_end_tokens_last(reverse_model):
    from mdm_jax.inference.mdm import MDMSampler, denoise

    trainer, params, items = reverse_model
    mask = trainer.args.mask_id
    prompts = [p for p, _ in items[:8]]
    canvas = np.full((8, 14), mask, np.int32)
    for row, p in zip(canvas, prompts, strict=True):
        row[:len(p)] = p
    lens = jnp.asarray([len(p) for p in prompts])

    def revealed(sampler):
        _, _, trace = denoise(trainer.model, params, jnp.asarray(canvas), lens,
                              jax.random.PRNGKey(0), sampler=sampler, gen_length=6,
                              trace=True)
        return np.asarray(trace)

    trace = revealed(MDMSampler(steps=4, reveal_order="front"))
    left = np.concatenate([[(canvas == mask).sum(-1)], (trace == mask).sum(-1)])
    assert (np.diff(left, axis=0) == -np.array([[2], [2], [1], [1]])).all()  # 6 in 4 steps

    def first_step_eos(sampler):  # EOS tokens revealed by the first step
        trace = revealed(sampler)
        return int((trace[0][(trace[0] != mask) & (canvas == mask)] == EOS).sum())

    assert first_step_eos(MDMSampler(steps=6)) > 0  # the padding is the surest prediction...
    assert first_step_eos(MDMSampler(steps=6, last_ids=(EOS,))) == 0  # ...but revealed last


# -- from a pretrained run, through the trainer loop --------------------------------------------
def _sft_config(tiny_data, chat_tok, data, workdir, source, steps):
    return nano_config(**{
        "seq_len": 128, "global_batch": 4, "steps": steps, "objective.loss_chunk": 64,
        "model.vocab_size": 515, "sft.enabled": True, "init.source": str(source),
        "optim.schedule": "constant", "optim.warmup_steps": 2, "workdir": str(workdir),
        "data.train_dir": str(data), "data.eval_dir": "", "data.tokenizer": chat_tok,
        "checkpoint_every": 3, "log_every": 1})


@pytest.fixture(scope="module")
def finetuned(tiny_data, chat_tok, tmp_path_factory):
    """A nano MDM pretrained 3 steps (vocabulary 512), fine-tuned 6 steps on chat pairs with
    the vocabulary grown to 515, and the same fine-tuning stopped at step 3 and resumed."""
    from mdm_jax.train import train

    root = tmp_path_factory.mktemp("finetune")
    pre = nano_config(**{"seq_len": 64, "global_batch": 4, "steps": 3,
                         "objective.loss_chunk": 32, "workdir": str(root / "pre"),
                         "data.train_dir": tiny_data["train"], "data.eval_dir": "",
                         "data.tokenizer": tiny_data["tokenizer"]})
    train(pre)
    records = [{"prompt": f"reverse: {w}", "response": " ".join(reversed(w.split()))}
               for w in ("king lord", "night day love", "sword", "a b c d")] * 3
    src = _write(root / "pairs.jsonl", records)
    data = root / "pairs"
    sft.prepare_sft([src], data, chat_tok, "chat", 128)
    whole = train(_sft_config(tiny_data, chat_tok, data, root / "whole", root / "pre", 6))
    c = _sft_config(tiny_data, chat_tok, data, root / "split", root / "pre", 6)
    assert train(c, stop_at=3).stopped == "stop_at"
    resumed = train(c)
    return {"root": root, "whole": whole, "resumed": resumed}


def test_fine_tuning_starts_from_the_pretrained_weights_with_the_vocabulary_grown(
        finetuned, tiny_data, chat_tok):
    from mdm_jax.finetune import pretrained_params
    from mdm_jax.inference import load

    root = finetuned["root"]
    pre = load(str(root / "pre"))
    c = _sft_config(tiny_data, chat_tok, root / "pairs", root / "x", str(root / "pre"), 6)
    grown = pretrained_params(Trainer(c, devices=jax.devices()[:1]), str(root / "pre"), None)
    old = jax.device_get(pre.params)
    assert grown["embedding"].shape == (516, old["embedding"].shape[1])
    np.testing.assert_array_equal(grown["embedding"][:512], old["embedding"][:512])
    np.testing.assert_array_equal(grown["embedding"][515], old["embedding"][512])  # mask row
    np.testing.assert_array_equal(grown["head"][:, :512], old["head"])
    np.testing.assert_allclose(grown["head"][:, 512], old["head"].mean(1), rtol=1e-6)


def test_resume_in_the_middle_of_fine_tuning_is_bitwise(finetuned):
    a, b = finetuned["whole"], finetuned["resumed"]
    assert int(a.state.step) == int(b.state.step) == 6
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a.state.params)),
                    jax.tree_util.tree_leaves(jax.device_get(b.state.params)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_sft_data_needs_sft_enabled(finetuned, tiny_data, chat_tok):
    from mdm_jax.train import train

    root = finetuned["root"]
    c = _sft_config(tiny_data, chat_tok, root / "pairs", root / "off", "", 2)
    c.sft.enabled = False
    with pytest.raises(ConfigError, match="sft.enabled=True"):
        train(c)


def test_sample_chat_session_carries_the_history(finetuned, tiny_data):
    root = finetuned["root"]
    run = subprocess.run([sys.executable, "-m", "mdm_jax.sample", "--model",
                          str(root / "whole"), "--chat", "--gen-length", "8", "--steps", "8",
                          "--end-last", "--reveal-order", "front"],
                         input="reverse: king lord\nreverse: sword\n", capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sum(line.startswith(">>> ") for line in run.stdout.splitlines()) == 2
    # a tokenizer without the chat pieces: one line, exit 2
    run = subprocess.run([sys.executable, "-m", "mdm_jax.sample", "--model", str(root / "pre"),
                          "--chat", "--prompt", "hi"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stderr.strip().startswith("error: --chat:")
    assert len(run.stderr.strip().splitlines()) == 1


def test_chat_session_prompt_is_the_history_then_the_new_turn(finetuned, chat_tok):
    from mdm_jax.inference import MDMSampler, load
    from mdm_jax.inference.chat import ChatSession

    m = load(str(finetuned["root"] / "whole"))
    chat = ChatSession(m, gen_length=8, sampler=MDMSampler(steps=8))
    first = chat.prompt_ids("reverse: king lord")
    chat.reply("reverse: king lord")
    tok = Tokenizer.load(chat_tok)
    assert chat.history[:len(first)] == first and chat.history[-1] == tok.eot_id
    assert tok.eos_id not in chat.history[len(first):]
    second = chat.prompt_ids("reverse: sword")
    assert second[:len(chat.history)] == chat.history
    assert second[len(chat.history):] == templates.turn_ids(tok, "chat", "reverse: sword",
                                                            first=False)


def test_fine_tuning_starts_from_an_export_as_from_its_run(finetuned, tiny_data, chat_tok):
    pytest.importorskip("torch")
    from mdm_jax.export.writer import export
    from mdm_jax.finetune import pretrained_params

    root = finetuned["root"]
    export(str(root / "pre"), "litgpt", str(root / "pre_lit"))
    c = _sft_config(tiny_data, chat_tok, root / "pairs", root / "y", str(root / "pre"), 6)
    trainer = Trainer(c, devices=jax.devices()[:1])
    from_run = pretrained_params(trainer, str(root / "pre"), None)
    from_export = pretrained_params(trainer, str(root / "pre_lit"), None)
    for x, y in zip(jax.tree_util.tree_leaves(from_run), jax.tree_util.tree_leaves(from_export),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_init_source_errors_name_the_field(finetuned, tiny_data, chat_tok):
    from mdm_jax.train import train

    root = finetuned["root"]
    for source, kind, words in ((root / "missing", "mdm", "config.init.source=.*no checkpoint"),
                                (root / "pre", "arm", "is a mdm model of preset nano")):
        c = _sft_config(tiny_data, chat_tok, root / "pairs", root / f"bad_{kind}", source, 2)
        c.objective.kind = kind
        with pytest.raises(ConfigError, match=words):
            train(c)


@pytest.mark.parametrize("kind", ["mdm", "arm"])
def test_a_sharded_micro_batched_fine_tuning_step_equals_the_single_device_step(kind):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        p, r = int(rng.integers(2, 20)), int(rng.integers(2, 30))
        rows.append(sft.make_row([BOS, *rng.integers(10, 500, p - 1)],
                                 [*rng.integers(10, 500, r - 1), EOS], 64, EOS))
    results = []
    for mesh in ((1, 1, 1), (2, 2, 2)):
        c = nano_config(**{"objective.kind": kind, "sft.enabled": True, "micro_batch": 8,
                           "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
        trainer = Trainer(c, devices=jax.devices()[:int(np.prod(mesh))])
        state = trainer.create_state(0)
        with trainer.context():
            _, metrics = trainer.step(state, trainer.to_global(np.stack(rows)))
        results.append(jax.device_get(metrics))
    for key in ("loss", "grad_norm"):
        assert float(results[1][key]) == pytest.approx(float(results[0][key]), rel=2e-5), key


def _llada_reference(logits_of, prompt, gen_length, steps, block_length, mask_id,
                     eos_logit_inf=(), end_confidence_inf=()):
    """LLaDA's `generate` (ML-GSAI/LLaDA generate.py) at temperature 0, low confidence, for
    one prompt, written out in numpy from its description: per block, floor(m / n) reveals a
    step plus one on each of the first m mod n steps; the listed ids' logits -inf before the
    argmax (logits_eos_inf), or after it (confidence_eos_eot_inf: confidence 0, the others
    renormalised); positions past the block never revealed."""
    x = np.array(list(prompt) + [mask_id] * gen_length)
    p = len(prompt)
    per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        m = int((x[lo:hi] == mask_id).sum())
        counts = [m // per_block + (i < m % per_block) for i in range(per_block)]
        for k in counts:
            logits = np.array(logits_of(x), np.float64)
            logits[:, list(eos_logit_inf)] = -np.inf
            pred = logits.argmax(-1)
            logits[:, list(end_confidence_inf)] = -np.inf
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            conf = (probs / probs.sum(-1, keepdims=True))[np.arange(len(x)), pred]
            conf[hi:] = -np.inf
            conf = np.where(x == mask_id, conf, -np.inf)
            for i in np.argsort(-conf, kind="stable")[:k]:
                x[i] = pred[i]
    return x[p:]


@pytest.mark.parametrize("steps,block,forbid,last", [
    (4, 6, (), ()), (6, 6, (EOS,), ()), (6, 6, (), (EOS,)), (4, 3, (EOS,), (EOS,))])
def test_llada_options_give_llada_generate_tokens(reverse_model, steps, block, forbid, last):
    from mdm_jax.inference import MDMSampler, generate

    trainer, params, items = reverse_model
    ours = generate(trainer.model, params, [p for p, _ in items[:6]], 6, MDMSampler(
        steps=steps, block_length=block, reveal_order="front", forbid_ids=forbid,
        last_ids=last), max_length=16)
    for (prompt, _), answer in zip(items[:6], ours.answers(), strict=True):
        def logits_of(x):
            return trainer.model.apply({"params": params}, jnp.asarray(x)[None],
                                       return_logits=True)[0]

        ref = _llada_reference(logits_of, prompt, 6, steps, block, trainer.args.mask_id,
                               forbid, last)
        assert answer == ref.tolist()
