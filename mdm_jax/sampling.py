"""Moved: sampling lives in `mdm_jax.inference` (library) and `python -m mdm_jax.sample` (CLI).

`python -m mdm_jax.sampling ...` still works: it runs `mdm_jax.sample` with the same flags
(every flag of the old command is a flag of the new one).
"""

from __future__ import annotations

from mdm_jax.sample import cli

__all__ = ["cli"]

if __name__ == "__main__":
    cli()
