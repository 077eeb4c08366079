"""`python -m mdm_jax.eval COMMAND ...`: every evaluation from one place.

    python -m mdm_jax.eval text --model RUN --text FILE       # NLL, perplexity, bits per byte
    python -m mdm_jax.eval tasks --corpus DIR --out DIR       # build the bundled tasks
    python -m mdm_jax.eval harness --model mdm_jax --model_args model=RUN --tasks ...

RUN is a run's workdir or an export folder (`--workdir`, `workdir=`: the old names).
"""

import importlib
import sys

COMMANDS = {"text": "text:cli", "tasks": "tasks:cli", "harness": "harness:main"}


def _dispatch(argv: list[str]) -> None:
    from mdm_jax.errors import UserError

    if not argv or argv[0] in ("-h", "--help"):
        return print(__doc__.strip())
    if argv[0] not in COMMANDS:
        raise UserError(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
    module, function = COMMANDS[argv[0]].split(":")
    getattr(importlib.import_module(f"mdm_jax.eval.{module}"), function)(argv[1:])


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    cli()
