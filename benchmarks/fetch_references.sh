#!/usr/bin/env bash
# The reference projects the speed benchmarks measure against, outside this repository:
#   bash benchmarks/fetch_references.sh [DIR]     (default ../references)
# DIR/SMDM   ML-GSAI/SMDM at the commit below (its model and training loss)
# DIR/LLaDA  ML-GSAI/LLaDA at the commit below: generate.py, get_log_likelihood.py only
# DIR/smdm-deps  the pure-Python packages SMDM's lit_gpt imports (lightning, einops), installed with
#            --no-deps beside the checkouts, so this project's environment is not touched.
# Idempotent: an existing checkout at the right commit is kept. SMDM_GIT / LLADA_GIT override the
# clone URLs (a mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-../references}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$dir"
checkout() {  # url commit folder [paths...]: the whole tree, or only the paths given
  local url=$1 commit=$2 folder=$3
  shift 3
  if [ "$(git -C "$folder" rev-parse HEAD 2>/dev/null)" != "$commit" ]; then
    rm -rf "$folder.partial"
    git clone -q --no-checkout "$url" "$folder.partial"
    if [ $# -gt 0 ]; then
      git -C "$folder.partial" checkout -q "$commit" -- "$@"
      git -C "$folder.partial" update-ref --no-deref HEAD "$commit"
    else
      git -C "$folder.partial" checkout -q "$commit"
    fi
    rm -rf "$folder" && mv "$folder.partial" "$folder"
  fi
  echo "$folder at $commit"
}
checkout "${SMDM_GIT:-https://github.com/ML-GSAI/SMDM}" \
  583aa4716d17728dbb825aec6c24a121164d616a "$dir/SMDM"
checkout "${LLADA_GIT:-https://github.com/ML-GSAI/LLaDA}" \
  b7e6c3565f194352da44b38dd12b6970597309f3 "$dir/LLaDA" \
  generate.py get_log_likelihood.py README.md
if ! PYTHONPATH="$dir/smdm-deps" "$py" -c "import lightning.fabric.loggers, einops" 2>/dev/null; then
  "$py" -m pip install -q --no-deps --target "$dir/smdm-deps" \
    lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0 einops==0.8.2
fi
echo "$dir/smdm-deps: lightning 2.6.6, lightning-utilities 0.15.3, torchmetrics 1.9.0, einops 0.8.2"
