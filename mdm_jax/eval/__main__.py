"""`python -m mdm_jax.eval COMMAND ...`: every evaluation from one place.

    python -m mdm_jax.eval text --workdir RUN --text FILE     # NLL, perplexity, bits per byte
    python -m mdm_jax.eval tasks --corpus DIR --out DIR       # build the bundled tasks
    python -m mdm_jax.eval harness --model mdm_jax --model_args workdir=RUN --tasks ...
"""

from __future__ import annotations

import sys

COMMANDS = {"text": "mdm_jax.eval.text:cli", "tasks": "mdm_jax.eval.tasks:cli",
            "harness": "mdm_jax.eval.harness:main"}


def cli(argv=None) -> None:
    import importlib

    from mdm_jax.errors import fail

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    if argv[0] not in COMMANDS:
        fail(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} "
             f"(python -m mdm_jax.eval --help)")
    module, function = COMMANDS[argv[0]].split(":")
    getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    cli()
