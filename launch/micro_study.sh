#!/usr/bin/env bash
# The micro IsoFLOP study, end to end on a CPU: set up .venv, fetch the bundled corpus, train a
# 512-piece tokenizer, prepare 128-token shards, run the MDM + ARM sweep (experiments/isoflop.py
# :micro), collect results.csv, fit and plot. Idempotent: finished runs are skipped, interrupted
# ones resume from their checkpoints. Extra arguments go to the sweep, e.g. `--parallel 2`.
# MICRO_STUDY=micro_families runs the five-family study (experiments/isoflop.py:micro_families);
# MICRO_STUDY=micro_v2 the second one (its lr sweep, experiments/micro_v2_lr.py, first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
py=.venv/bin/python
data=data_cache
study="${MICRO_STUDY:-micro}"
out="${MICRO_STUDY_OUT:-experiments/results/$study}"
$py -m mdm_jax.data.corpus --dest "$data/demo_corpus"
$py -m mdm_jax.data.train_tokenizer --input "$data/demo_corpus/train" \
  --output "$data/micro_tokenizer.model" --vocab-size 512
for split in train validation; do
  $py -m mdm_jax.data.prepare --input "$data/demo_corpus" --split "$split" \
    --output "$data/micro_prepared_128/$split" --tokenizer "$data/micro_tokenizer.model" \
    --seq-len 128 --workers 2
done
mkdir -p "$out"
if [ "$study" = micro_v2 ]; then  # its learning rates first: a short sweep per family
  $py experiments/micro_v2_lr.py --out "$out/lr" "$@"
fi
$py -m mdm_jax.scaling.plan --config=experiments/isoflop.py:$study | tee "$out/plan.txt"
$py -m mdm_jax.scaling.sweep --config=experiments/isoflop.py:$study --backend local \
  --results "$out/results.csv" "$@"
$py -m mdm_jax.scaling.fit --results "$out/results.csv" --plot "$out/isoflop.png" \
  | tee "$out/fit.txt"
