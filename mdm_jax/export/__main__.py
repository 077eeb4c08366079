"""`python -m mdm_jax.export`: the command line of `mdm_jax.export.writer.export`.

`--model` names the run to export (`--checkpoint` is its old name, until the next release)."""

from __future__ import annotations

import argparse
import os

from mdm_jax.export.layouts import FORMATS
from mdm_jax.export.tensor_io import DTYPES
from mdm_jax.export.writer import __doc__ as WRITER_DOC
from mdm_jax.export.writer import export


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    try:
        for unit, factor in units.items():
            if t.endswith(unit):
                size = int(float(t[: -len(unit)]) * factor)
                break
        else:
            size = int(t)
    except ValueError:
        size = 0
    if size <= 0:
        from mdm_jax.errors import fail

        fail(f"--max-shard-size {text!r}: give a positive size such as 5GB or 500MB")
    return size


def cli(argv=None) -> None:
    from mdm_jax.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m mdm_jax.export", description=WRITER_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_model_argument("--checkpoint", help="a training run's workdir (or its "
                              "checkpoints/STEP folder, or a gs:// workdir)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out folder that already holds files")
    parser.add_argument("--tokenizer", help="SentencePiece model to ship (default: the one "
                        "the run trained with, config.data.tokenizer)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="write weights that are NaN or infinite (refused by default)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME",
                        help="then upload the folder to this Hugging Face Hub model repository "
                             "(created if new; needs the hub extra and a token: hf auth login)")
    parser.add_argument("--private", action="store_true",
                        help="--push-to-hub: create the repository private")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="Hugging Face formats: shard above this size (e.g. 5GB, 500MB)")
    a = parser.parse_args(argv)
    from absl import logging as absl_logging

    from mdm_jax.errors import run_main, spelling

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file at INFO
    with spelling(flags=True, checkpoint=parser.typed("model")):
        files = run_main(_export, a, parse_size(a.max_shard_size))
        print(f"wrote {a.format} export to {a.out}: {', '.join(files)}", flush=True)
        if a.push_to_hub:
            from mdm_jax.hub import push

            url = run_main(push, a.out, a.push_to_hub, a.private,
                           f"mdm_jax export of {os.path.basename(os.path.abspath(a.model))}")
            print(f"uploaded {a.out} to {url}")


def _export(a, max_shard_bytes: int) -> list[str]:
    from mdm_jax.errors import option
    from mdm_jax.export.reader import detect_format
    from mdm_jax.export.tensor_io import ExportError

    if os.path.isdir(a.model) and detect_format(a.model):
        raise ExportError(f"{a.model} is a {detect_format(a.model)} export folder; export reads "
                          f"a training run: give {option('checkpoint')} RUN_WORKDIR (import "
                          f"the folder first with `python -m mdm_jax.export.load` to make one)")
    if a.push_to_hub:
        from mdm_jax.hub import repo_id

        if repo_id(a.push_to_hub) is None:
            raise ExportError(f"--push-to-hub {a.push_to_hub!r}: give a Hub repository id, "
                              f"ORG/NAME")
    return export(a.model, a.format, a.out, a.step, a.dtype, max_shard_bytes, a.tokenizer,
                  a.overwrite, hub_id=a.push_to_hub and repo_id(a.push_to_hub),
                  allow_nonfinite=a.allow_nonfinite)


if __name__ == "__main__":
    cli()
