"""Import a PyTorch checkpoint (litgpt, llada-hf or llama-hf) as an mdm_jax run workdir.

    python -m mdm_jax.export.load --format litgpt --model exports/tiny_lit --out runs/imported
    python -m mdm_jax.export.load --format litgpt --model smdm/mdm-170M.pth --preset 170M \\
        --out runs/smdm_170M
    python -m mdm_jax.export.load --format llama-hf --model exports/arm --out runs/arm_back

`--src` is the old name of `--model` (until the next release). The result is an ordinary run
workdir: `python -m mdm_jax.sample --model runs/imported` samples from it, and training with
`--config.workdir=runs/imported` (same preset, family, vocabulary and sequence length)
continues from it. PyTorch layouts carry no optimizer state, so the optimizer starts fresh.
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
    trainer = Trainer(c, devices=jax.devices()[:1])
    state = trainer.create_state(c.seed)
    with trainer.context():
        expected = jax.tree_util.tree_structure(state.params)
        if jax.tree_util.tree_structure(params) != expected:
            raise ExportError(f"{src}: the parameter tree does not match preset "
                              f"{c.model.preset}")
        params = jax.tree_util.tree_map(
            lambda new, old: jax.device_put(np.asarray(new, np.float32), old.sharding),
            params, state.params)
        state = state.replace(params=params, step=jax.numpy.asarray(step, state.step.dtype))
    ckpt = Checkpointer(out)
    if step in ckpt.all_steps():
        raise ExportError(f"{out} already has a checkpoint at step {step}; choose another "
                          f"--out (nothing was overwritten)")
    ckpt.save(step, state, None, resolved_config(c, trainer),
              {"preset": c.model.preset, "imported_from": os.path.abspath(contents.src),
               "format": fmt, "source_meta": contents.meta}, force=True)
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
