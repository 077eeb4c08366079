#!/usr/bin/env bash
# Train on this machine: the CPU by default, or its NVIDIA GPUs with --gpu (installs the `cuda`
# extra, jax's CUDA 13 build, and sets the XLA options that matter on GPU).
#   bash launch/local.sh [--gpu] [--dry-run] [TRAINER ARGS...]
#   bash launch/local.sh --gpu --config=experiments/smdm.py:170M --config.micro_batch=32
# --dry-run prints the commands it would execute and executes none. Without trainer arguments
# it trains experiments/tiny.py. XLA_FLAGS already set in the environment are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=0 dry=0 args=()
for a in "$@"; do
  case "$a" in --gpu) gpu=1 ;; --dry-run) dry=1 ;; *) args+=("$a") ;; esac
done
[ ${#args[@]} -gt 0 ] || args=(--config=experiments/tiny.py)
run() { if [ "$dry" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi; }
if [ "$gpu" = 1 ]; then
  run bash launch/setup.sh cuda
  # Latency-hiding scheduling overlaps FSDP all-gathers/reduce-scatters with compute; 90% of
  # GPU memory for XLA leaves room for cuDNN/cuBLAS workspaces.
  run env JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true" \
    .venv/bin/python -m mdm_jax.train "${args[@]}"
else
  run bash launch/setup.sh
  run env JAX_PLATFORMS=cpu .venv/bin/python -m mdm_jax.train "${args[@]}"
fi
