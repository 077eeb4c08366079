#!/usr/bin/env bash
# Set up .venv with the dev and torch extras (idempotent) and run the test suite on CPU.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k sharding`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh dev torch eval
exec .venv/bin/python -m pytest -q "$@"
