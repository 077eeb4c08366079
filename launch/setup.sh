#!/usr/bin/env bash
# Create .venv and install mdm_jax with the extras given as arguments (e.g. `dev`).
# Idempotent: a stamp records what was installed; an unchanged setup.cfg + extras is a no-op.
# The `accelerators` extra (compile-only TPU/GPU targets for mdm_jax.aot) goes into its own
# .venv-accelerators: libtpu in .venv would make every CPU process try to start a TPU runtime.
# The `beam` and `beam-gcp` extras (mdm_jax.data.beam_prepare) go into .venv-beam: Beam 2.77
# needs protobuf < 7, and sentencepiece 0.2.3's model proto (the tokenizer's chat pieces, the
# llada-hf tokenizer export) refuses a protobuf runtime older than 7.36.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${*:-}"
py="${PYTHON:-python3}"
venv=.venv
case " $extras " in
  *" accelerators "*) venv=.venv-accelerators ;;
  *" beam "*|*" beam-gcp "*) venv=.venv-beam ;;
esac
hash="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
want="$hash extras=[${extras}]"
stamp=$venv/.mdm_jax_installed
if [ -x $venv/bin/python ] && [ -f "$stamp" ]; then
  # Done already if this setup.cfg was installed with every extra asked for now.
  have=$({ grep "^$hash " "$stamp" || true; } | sed 's/.*extras=\[\(.*\)\]/\1/' \
         | tr ' ,' '\n\n' | sort -u)
  if grep -q "^$hash " "$stamp"; then
    missing=0
    for e in $extras; do echo "$have" | grep -qx "$e" || missing=1; done
    [ "$missing" = 0 ] && exit 0
  fi
fi
[ -x $venv/bin/python ] || "$py" -m venv $venv
spec="."
[ -n "$extras" ] && spec=".[$(echo "$extras" | tr ' ' ',')]"
echo "[setup] installing mdm_jax $spec into $venv (first run takes ~1 minute)" >&2
$venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" 2>&1 \
  | grep -v "^WARNING: Location" || true
$venv/bin/python -c "import mdm_jax, jax" || { echo "[setup] install failed" >&2; exit 1; }
# Record every extra installed so far, so that `setup.sh dev` after `setup.sh` does not reinstall.
echo "$want" >> "$stamp"
