"""Start a run from a pretrained model: `config.init.source` names a run's workdir or an export.

The weights come in, the optimizer starts fresh at step 0 with the run's own schedule; once the
run has saved a checkpoint of its own, resuming reads that instead (exact resume, as ever). The
source must be the same architecture (preset and family, or a family with the same parameters:
mdm and mdm-ce). A larger vocabulary (a tokenizer extended with the chat pieces, which adds ids
after the old ones) grows the embedding and the head: old rows keep their values, new token
rows start at the mean of the old ones, and an MDM's mask row moves to the new mask id.
"""

from __future__ import annotations

import jax
import numpy as np

from mdm_jax import families
from mdm_jax.config import ConfigError


def _same_parameters(a: str, b: str) -> bool:
    fa, fb = families.get(a), families.get(b)
    return (fa.mask_token, fa.time_conditioned) == (fb.mask_token, fb.time_conditioned) and \
        (fa.attention == "causal") == (fb.attention == "causal")


def _grow_vocab(name: str, value: np.ndarray, want: tuple, old_vocab: int, new_vocab: int,
                mask_row: bool) -> np.ndarray:
    """The embedding [rows, d] or head [d, vocab] of `old_vocab` tokens at `new_vocab`."""
    if name == "head":
        extra = np.repeat(value.mean(axis=1, keepdims=True), new_vocab - old_vocab, axis=1)
        return np.concatenate([value, extra], axis=1)
    tokens = value[:old_vocab]
    extra = np.repeat(tokens.mean(axis=0, keepdims=True), new_vocab - old_vocab, axis=0)
    parts = [tokens, extra] + ([value[old_vocab:]] if mask_row else [])
    out = np.concatenate(parts, axis=0)
    assert out.shape == want, (out.shape, want)
    return out


def pretrained_params(trainer, source: str, step: int | None) -> dict:
    """The params of `source` as host arrays shaped like `trainer`'s (vocabulary grown where
    the run's is larger); a ConfigError naming config.init.source when they cannot be."""
    from mdm_jax.inference.loading import LoadError, load

    c = trainer.config
    try:
        m = load(source, step)
    except LoadError as e:
        raise ConfigError(f"config.init.source={source}: {e}") from None
    kind, theirs = c.objective.kind, m.config.objective.kind
    if m.config.model.preset != c.model.preset or not _same_parameters(kind, theirs):
        raise ConfigError(
            f"config.init.source={source} is a {theirs} model of preset "
            f"{m.config.model.preset}; this run trains {kind} at preset {c.model.preset}: start "
            f"from a model of the same preset and family (or set config.model.preset and "
            f"config.objective.kind to its)")
    old_vocab, new_vocab = m.args.vocab_size, trainer.args.vocab_size
    if new_vocab < old_vocab:
        raise ConfigError(
            f"config.init.source={source} has a vocabulary of {old_vocab}, more than this "
            f"run's {new_vocab}; set config.model.vocab_size={old_vocab} or more")
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(m.params))
    want = trainer.abstract_state.params
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    out = []
    for path, spec in jax.tree_util.tree_leaves_with_path(want):
        key = jax.tree_util.keystr(path)
        value = flat.get(key)
        if value is None:
            raise ConfigError(f"config.init.source={source} has no parameter {key}: it is not "
                              f"a {kind} model of preset {c.model.preset}")
        if value.shape != spec.shape:
            name = key.split("'")[-2]
            if name not in ("embedding", "head") or new_vocab == old_vocab:
                raise ConfigError(f"config.init.source={source}: parameter {key} has shape "
                                  f"{value.shape}, this run's is {spec.shape}")
            value = _grow_vocab(name, value, spec.shape, old_vocab, new_vocab,
                                trainer.family.mask_token)
        out.append(value.astype(np.float32))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(want), out)


def initial_state(trainer, source: str, step: int | None):
    """A fresh train state (optimizer, step 0) holding the pretrained params on the mesh."""
    params = pretrained_params(trainer, source, step)
    state = trainer.create_state(trainer.config.seed)
    with trainer.context():
        params = jax.tree_util.tree_map(lambda new, old: jax.device_put(new, old.sharding),
                                        params, state.params)
        return state.replace(params=params)
