#!/usr/bin/env bash
# Set up .venv with the dev, torch and eval extras (idempotent) and run the test suite on CPU,
# one pytest worker per core (pytest-xdist). `--fast` runs the unit tier alone (tests marked
# neither e2e nor slow; pyproject.toml). Other arguments go to pytest, e.g.
# `bash launch/test.sh -k sharding` or `bash launch/test.sh -n 0` (one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh dev torch eval
args=()
for a in "$@"; do
  if [ "$a" = "--fast" ]; then args+=(-m "not e2e and not slow"); else args+=("$a"); fi
done
# Tests that share a machine-wide resource (libtpu's lock file, one localhost Slurm) carry
# the same xdist_group and run on one worker.
exec .venv/bin/python -m pytest -q -n auto --dist loadgroup "${args[@]}"
