"""Reverse-process samplers: SMDM low-confidence remasking for MDMs, ancestral sampling for ARMs.

Low-confidence remasking (shared/REFERENCE.md section 5): start from an all-mask canvas (prompt
positions kept), walk t over linspace(1, 1e-5, steps + 1); at each step predict every masked
token and reveal the int(#masked * (1 - s/t)) most confident predictions. Gumbel-max noise gives
temperature sampling (temperature 0 is greedy).

    python -m mdm_jax.sampling --workdir runs/tiny --num 4 --steps 64

--length defaults to the run's trained seq_len; a longer one is refused unless --allow-longer
is given, since RoPE positions beyond the trained length were never seen and the samples
degrade silently. Every number is checked before anything is generated; a bad one is one
`error:` line and exit code 2.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp

from mdm_jax.errors import UserError
from mdm_jax.model import Encoder


class SamplingError(UserError, ValueError):
    """A sampling request that cannot work; the message names the option and the fix."""


class NoCheckpointError(SamplingError, FileNotFoundError):
    """The workdir holds no checkpoint (or not the step asked for)."""


def _choose(logits, key, temperature: float):
    """Token choice and its probability, with Gumbel-max noise for temperature > 0."""
    logits = logits.astype(jnp.float32)
    if temperature > 0:
        gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
        tokens = jnp.argmax(logits / temperature + gumbel, axis=-1)
    else:
        tokens = jnp.argmax(logits, axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    conf = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
    return tokens, conf


REMASKING = ("low_confidence", "random")


def reveal_step(model: Encoder, params, x, key, t, s, *, temperature: float, remasking: str,
                last=False):
    """One reverse step from time t to s < t: predict the masked tokens, reveal some of them."""
    k_pred, k_coin = jax.random.split(key)
    is_mask = x == model.args.mask_id
    logits = model.apply({"params": params}, x, return_logits=True)
    pred, conf = _choose(logits, k_pred, temperature)
    if remasking == "random":
        reveal = jax.random.uniform(k_coin, x.shape) < 1.0 - s / t
    else:
        n_reveal = jnp.floor(jnp.sum(is_mask, axis=-1) * (1.0 - s / t)).astype(jnp.int32)
        conf = jnp.where(is_mask, conf, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-conf, axis=-1), axis=-1)  # 0 = most confident
        reveal = rank < n_reveal[:, None]
    reveal = is_mask & (reveal | last)  # the last step reveals everything
    return jnp.where(reveal, pred, x)


@functools.partial(jax.jit, static_argnames=("model", "steps", "temperature", "remasking"))
def sample_mdm(model: Encoder, params, canvas, key, *, steps: int, temperature: float = 0.0,
               remasking: str = "low_confidence"):
    """canvas: [B, L] int32 with the mask id wherever a token is to be generated.

    remasking="low_confidence" reveals the most confident predictions first; "random" reveals
    each masked position with probability 1 - s/t (the exact reverse process of the schedule).
    """
    times = jnp.linspace(1.0, 1e-5, steps + 1)

    def body(i, state):
        x, key = state
        key, sub = jax.random.split(key)
        x = reveal_step(model, params, x, sub, times[i], times[i + 1], temperature=temperature,
                        remasking=remasking, last=i == steps - 1)
        return x, key

    out, _ = jax.lax.fori_loop(0, steps, body, (canvas, key))
    return out


@functools.partial(jax.jit, static_argnames=("model", "start", "temperature"))
def sample_arm(model: Encoder, params, canvas, key, *, start: int, temperature: float = 0.0):
    """Left-to-right sampling of positions start..L-1 (full recompute; no KV cache here)."""
    length = canvas.shape[1]

    def body(pos, state):
        x, key = state
        key, sub = jax.random.split(key)
        logits = model.apply({"params": params}, x, return_logits=True)
        tok, _ = _choose(logits[:, pos - 1], sub, temperature)
        return x.at[:, pos].set(tok.astype(x.dtype)), key

    out, _ = jax.lax.fori_loop(max(start, 1), length, body, (canvas, key))
    return out


def generate(model: Encoder, params, *, num: int, length: int, steps: int, seed: int = 0,
             temperature: float = 0.0, prompt: list[int] | None = None, bos_id: int | None = 1,
             remasking: str = "low_confidence"):
    """num sequences of `length` tokens (prompt included) as a [num, length] int array."""
    prompt = list(prompt or ([] if bos_id is None else [bos_id]))
    if num < 1:
        raise SamplingError(f"num={num}: ask for 1 or more samples")
    if not model.args.causal and steps < 1:  # 0 steps would return the all-mask canvas
        raise SamplingError(f"steps={steps}: the MDM sampler needs 1 or more reverse steps")
    if len(prompt) >= length:
        raise SamplingError(f"the prompt has {len(prompt)} tokens; length {length} leaves no "
                            f"room to generate")
    key = jax.random.PRNGKey(seed)
    if model.args.causal:
        canvas = jnp.zeros((num, length), jnp.int32).at[:, : len(prompt)].set(
            jnp.asarray(prompt, jnp.int32))
        return sample_arm(model, params, canvas, key, start=len(prompt), temperature=temperature)
    canvas = jnp.full((num, length), model.args.mask_id, jnp.int32)
    if prompt:
        canvas = canvas.at[:, : len(prompt)].set(jnp.asarray(prompt, jnp.int32))
    return sample_mdm(model, params, canvas, key, steps=steps, temperature=temperature,
                      remasking=remasking)


def load_for_sampling(workdir: str, step: int | None = None):
    """(trainer, state, config) restored from a run's checkpoint onto one device."""
    import ml_collections

    from mdm_jax import storage
    from mdm_jax.checkpoint import Checkpointer, abstract_with_shardings
    from mdm_jax.train import Trainer

    train_hint = (f"train first (python -m mdm_jax.train --config=... --config.workdir="
                  f"{workdir})")
    if not (storage.as_path(workdir) / "checkpoints").is_dir():  # opening one would create it
        raise NoCheckpointError(f"no checkpoint under {workdir}: not a training run's workdir; "
                                f"{train_hint}")
    ckpt = Checkpointer(workdir)
    steps = ckpt.all_steps()
    if not steps:
        ckpt.close()
        raise NoCheckpointError(f"no checkpoint under {ckpt.directory}; {train_hint}")
    if step is not None and step not in steps:
        ckpt.close()
        raise NoCheckpointError(f"--step {step}: no checkpoint for that step under "
                                f"{ckpt.directory}; available: {', '.join(map(str, steps))}")
    # The newest checkpoint that reads (as training resumes); a named --step must read.
    candidates = [step] if step is not None else list(reversed(steps))
    try:
        for s in candidates:
            try:
                c = ml_collections.ConfigDict(ckpt.restore_config(s))
                c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
                c.micro_batch = 0
                trainer = Trainer(c, devices=jax.devices()[:1])
                target = abstract_with_shardings(trainer.abstract_state, trainer.state_sharding)
                return trainer, ckpt.restore(s, target, None), c
            except Exception as e:  # a file of this step cannot be read
                detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                others = [x for x in steps if x != s]
                if s == candidates[-1]:
                    raise SamplingError(
                        f"checkpoint {s} under {ckpt.directory} is damaged ({detail}); "
                        + (f"other checkpoints: {', '.join(map(str, others))} (--step)"
                           if others and step is not None else "no other checkpoint reads")
                    ) from e
                print(f"warning: checkpoint {s} under {ckpt.directory} is damaged ({detail}); "
                      f"sampling from the previous one", file=sys.stderr, flush=True)
    finally:
        ckpt.close()


def _check_options(args) -> None:
    """Every number the sampler is given, before a checkpoint is loaded."""
    for flag, value, low in (("--num", args.num, 1), ("--steps", args.steps, 1),
                             ("--length", args.length, 0), ("--step", args.step, 0)):
        if value is not None and value < low:
            what = ("0 (the trained seq_len) or more" if flag == "--length"
                    else f"{low} or more")
            raise SamplingError(f"{flag} {value}: give {what}")
    if not 0 <= args.seed < 2 ** 32:
        raise SamplingError(f"--seed {args.seed}: give an integer in [0, 2**32)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise SamplingError(f"--temperature {args.temperature}: give 0 (greedy) or a positive "
                            f"number")


def _main(argv=None) -> None:
    import argparse

    import numpy as np

    from mdm_jax.data.tokenizer import Tokenizer
    from mdm_jax.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m mdm_jax.sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--num", type=int, default=4, help="samples to draw")
    parser.add_argument("--steps", type=int, default=64, help="reverse-process steps (MDM)")
    parser.add_argument("--length", type=int, default=0,
                        help="tokens per sample, prompt included (default: the trained seq_len)")
    parser.add_argument("--allow-longer", action="store_true",
                        help="allow --length beyond the trained seq_len (RoPE positions the "
                             "model never saw: expect degraded samples)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--remasking", choices=REMASKING, default="low_confidence")
    parser.add_argument("--prompt", default="", help="text the samples start with")
    parser.add_argument("--tokenizer", default="", help="SentencePiece model (the run's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _check_options(args)
    trainer, state, c = load_for_sampling(args.workdir, args.step)
    length = args.length or c.seq_len
    if length > c.seq_len and not args.allow_longer:
        raise SamplingError(f"--length {length} is beyond the trained seq_len {c.seq_len} of "
                            f"{args.workdir} (positions the model never saw); give --length "
                            f"{c.seq_len} or less, or add --allow-longer to sample anyway")
    try:
        tok = Tokenizer.load(args.tokenizer or c.data.tokenizer)
    except (UserError, FileNotFoundError, ValueError) as e:
        if args.tokenizer:
            raise SamplingError(f"--tokenizer: {e}") from None
        raise SamplingError(f"the run's data.tokenizer {c.data.tokenizer!r}: {e}; pass "
                            f"--tokenizer PATH (the run's tokenizer.model)") from None
    prompt = [tok.bos_id] + (tok.encode(args.prompt) if args.prompt else [])
    if len(prompt) >= length:
        raise SamplingError(f"the prompt has {len(prompt)} tokens; --length {length} leaves no "
                            f"room to generate")
    out = generate(trainer.model, jax.device_get(state.params), num=args.num, length=length,
                   steps=args.steps, seed=args.seed, temperature=args.temperature,
                   prompt=prompt, remasking=args.remasking)
    for i, row in enumerate(np.asarray(out)):
        text = tok.decode([int(t) for t in row if t < tok.vocab_size])
        print(f"--- sample {i} ---\n{text.strip()}\n")


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_main, argv)


if __name__ == "__main__":
    cli()
