"""A trained model, ready for inference: from a run's checkpoint or from an exported folder.

    from mdm_jax.inference import load
    m = load("runs/tiny_mdm")                  # newest checkpoint that reads
    m = load("exports/tiny_lit")               # litgpt / llada-hf / llama-hf export folder
    m = load("my-org/tiny-mdm")                # an export folder on the Hugging Face Hub
    logits = m.logits([[1, 450, 29871]])       # [B, L, V] float32 (lists or arrays)
    m.tokenizer.encode("text")                 # the model's SentencePiece tokenizer

Only the parameters are read (a partial Orbax restore: no optimizer state, no Trainer). Each
array is checked against the fingerprint saved with the checkpoint; a checkpoint that fails to
read or verify is reported and, unless a step was named, the previous one is used. Parameters
are placed on a (data, fsdp, tensor) mesh, one device by default.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mdm_jax import sharding, storage
from mdm_jax.config import resolve_mesh_shape
from mdm_jax.errors import UserError, option
from mdm_jax.model import Encoder, ModelArgs


class LoadError(UserError, ValueError):
    """A path that does not hold a usable model; the message says what to pass instead."""


@dataclasses.dataclass
class LoadedModel:
    model: Encoder
    params: dict  # jax arrays on `mesh`
    config: ml_collections.ConfigDict  # the run's resolved config (or the export's)
    step: int
    source: str  # "checkpoint", "litgpt", "llada-hf" or "llama-hf"
    path: str
    mesh: jax.sharding.Mesh

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def tokenizer_path(self) -> str:
        return self.config.data.tokenizer

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer (`mdm_jax.data.tokenizer.Tokenizer`): the run's
        data.tokenizer, or the one an export folder ships."""
        from mdm_jax.data.tokenizer import Tokenizer

        if not self.tokenizer_path:
            raise LoadError(f"{self.path} names no tokenizer (its config.data.tokenizer is "
                            f"empty); load one with mdm_jax.data.tokenizer.Tokenizer.load(PATH)")
        return Tokenizer.load(self.tokenizer_path)

    def logits(self, tokens, lengths=None) -> jax.Array:
        """Token ids -> [B, L, V] float32 logits (one jitted call per shape). `tokens`: a
        [B, L] array, one list of ids, or a list of lists; lists of different lengths are
        padded at the end, and their logits past each row's length are not meaningful."""
        if isinstance(tokens, (list, tuple)):
            rows = [list(tokens)] if not tokens or not isinstance(tokens[0], (list, tuple)) \
                else [list(r) for r in tokens]
            width = max(len(r) for r in rows)
            if lengths is None and any(len(r) != width for r in rows):
                lengths = np.array([len(r) for r in rows], np.int32)
            tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
        return forward(self.model, self.params, jnp.asarray(tokens, jnp.int32),
                       None if lengths is None else jnp.asarray(lengths, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def forward(model: Encoder, params, tokens, lengths=None) -> jax.Array:
    """Logits [B, L, V] float32 of `model` (a hashable Flax module: one compile per shape)."""
    return model.apply({"params": params}, tokens, lengths, return_logits=True)


def _placement(args: ModelArgs, seq_len: int, mesh_shape, devices):
    """(mesh, abstract params with their shardings) for a model on a mesh."""
    devices = list(devices if devices is not None else jax.devices()[:1])
    mesh = sharding.make_mesh(resolve_mesh_shape(*mesh_shape, len(devices)), devices)
    model = Encoder(args)
    boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, seq_len), jnp.int32))["params"],
                           jax.random.PRNGKey(0))
    sharding.check_divisible(boxed, mesh)
    shardings = sharding.logical_to_sharding(boxed, mesh)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
        shardings)
    return mesh, model, abstract


def _for_inference(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(c.to_dict())
    c.model.remat = "none"  # no backward pass here
    return c


def load_checkpoint(workdir: str, step: int | None = None, mesh_shape=(1, 1, 1),
                    devices=None) -> LoadedModel:
    from mdm_jax.checkpoint import read_step

    def build(reader) -> LoadedModel:
        c = _for_inference(ml_collections.ConfigDict(reader.config))
        mesh, model, abstract = _placement(ModelArgs.from_config(c), c.seq_len, mesh_shape,
                                           devices)
        return LoadedModel(model=model, params=reader.params(abstract), config=c,
                           step=reader.step, source="checkpoint", path=workdir, mesh=mesh)

    return read_step(workdir, step, build, error=LoadError)[0]


def load_export(folder: str, mesh_shape=(1, 1, 1), devices=None,
                fmt: str | None = None) -> LoadedModel:
    from mdm_jax.export.reader import read_export

    contents = read_export(folder, fmt)
    c = _for_inference(contents.config)
    args = ModelArgs.from_config(c)
    mesh, model, abstract = _placement(args, c.seq_len, mesh_shape, devices)
    if jax.tree_util.tree_structure(contents.params) != jax.tree_util.tree_structure(abstract):
        raise LoadError(f"{folder}: the parameter tree does not match preset "
                        f"{c.model.preset}")
    params = jax.tree_util.tree_map(
        lambda x, a: jax.device_put(np.asarray(x, np.float32), a.sharding), contents.params,
        abstract)
    return LoadedModel(model=model, params=params, config=c, step=contents.step,
                       source=contents.format, path=folder, mesh=mesh)


def load(path: str, step: int | None = None, mesh_shape=(1, 1, 1), devices=None) -> LoadedModel:
    """A run's workdir (or gs:// workdir), an export folder, or an export folder on the
    Hugging Face Hub (ORG/NAME when no folder ORG is here, or hf://ORG/NAME; fetched into the
    Hub's cache, used from there offline), onto `devices` (default: the first one) as a
    (data, fsdp, tensor) mesh."""
    from mdm_jax.export.reader import detect_format
    from mdm_jax.hub import local_or_hub

    path = local_or_hub(path)

    if not storage.is_remote(path) and os.path.isdir(path) and detect_format(path):
        if step is not None:
            raise LoadError(f"{option('step', step)}: {path} is an export folder (one "
                            f"step); drop {option('step')}")
        return load_export(path, mesh_shape, devices)
    return load_checkpoint(path, step, mesh_shape, devices)
