"""Import a PyTorch checkpoint (litgpt, llada-hf or llama-hf) as an mdm_jax run workdir.

    python -m mdm_jax.export.load --format litgpt --model exports/tiny_lit --out runs/imported
    python -m mdm_jax.export.load --format litgpt --model smdm/mdm-170M.pth --preset 170M \\
        --out runs/smdm_170M
    python -m mdm_jax.export.load --format llama-hf --model exports/arm --out runs/arm_back

`--src` is the old name of `--model` (until the next release). The result is an ordinary run
workdir: `python -m mdm_jax.sample --model runs/imported` samples from it, and training with
`--config.workdir=runs/imported` (same preset, family, vocabulary and sequence length)
continues from it. PyTorch layouts carry no optimizer state: the checkpoint holds the weights
alone, and the first training run makes a fresh optimizer state for them.
Reading the files is `export/reader.py`'s; this module writes the workdir through the trainer
core.
"""

from __future__ import annotations

import argparse
import os

from mdm_jax.errors import option
from mdm_jax.export.layouts import FORMATS
from mdm_jax.export.reader import read_export
from mdm_jax.export.tensor_io import ExportError


def import_checkpoint(fmt: str, src: str, out: str, preset: str | None = None,
                      step: int | None = None, seq_len: int | None = None) -> int:
    """Write `src` (in layout `fmt`) as an mdm_jax checkpoint under `out`; returns its step."""
    import jax
    import numpy as np

    from mdm_jax.checkpoint import Checkpointer
    from mdm_jax.trainer import Trainer, resolved_config

    if fmt not in FORMATS:
        raise ExportError(f"{option('fmt', repr(fmt))}; valid: {', '.join(FORMATS)}")
    if not os.path.exists(src):
        raise ExportError(f"{option('src', src)} does not exist; give an export folder, a "
                          f".safetensors file or a .pth state dict")
    contents = read_export(src, fmt, preset, step, seq_len)
    c, params, step = contents.config, contents.params, contents.step
    c.workdir = out
    trainer = Trainer(c, devices=jax.devices()[:1])  # (abstract shapes only: no arrays)
    expected = trainer.abstract_state.params
    shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(expected) or \
            jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), params) != shapes:
        raise ExportError(f"{src}: the parameter tree does not match preset "
                          f"{c.model.preset}")
    ckpt = Checkpointer(out, host_arrays=True)
    if step in ckpt.all_steps():
        raise ExportError(f"{out} already has a checkpoint at step {step}; choose another "
                          f"--out (nothing was overwritten)")
    # The weights alone, as the host arrays they were read into and written from where they
    # are: no optimizer state, no copy on a device or in Orbax (a whole train state was 5.8x
    # the parameter bytes). The first training run on this workdir makes the optimizer state
    # (train.restore_weights_only).
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    ckpt.save(step, {"params": params}, None, resolved_config(c, trainer),
              {"preset": c.model.preset, "imported_from": os.path.abspath(contents.src),
               "format": fmt, "source_meta": contents.meta, "weights_only": True},
              force=True)
    ckpt.close()
    return step


def _main(argv=None) -> None:
    from mdm_jax.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m mdm_jax.export.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_model_argument("--src", help="the PyTorch checkpoint: an export folder, a "
                              ".safetensors file or a .pth state dict")
    parser.add_argument("--out", required=True, help="workdir for the mdm_jax checkpoint")
    parser.add_argument("--preset", help="preset name when the files do not record one")
    parser.add_argument("--step", type=int, help="step to record (default: the export's)")
    parser.add_argument("--seq-len", type=int, help="sequence length to record")
    a = parser.parse_args(argv)
    if a.step is not None and a.step < 0:
        raise ExportError(f"--step {a.step}: give 0 or more")
    if a.seq_len is not None and a.seq_len < 1:
        raise ExportError(f"--seq-len {a.seq_len}: give a positive number of tokens")
    from absl import logging as absl_logging

    from mdm_jax.errors import spelling

    absl_logging.set_verbosity(absl_logging.WARNING)
    with spelling(flags=True, fmt="--format", src=parser.typed("model")):
        step = import_checkpoint(a.format, a.model, a.out, a.preset, a.step, a.seq_len)
    print(f"wrote an mdm_jax checkpoint (step {step}) to {a.out}/checkpoints; sample with "
          f"`python -m mdm_jax.sample --model {a.out}`")


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_main, argv)


if __name__ == "__main__":
    cli()
