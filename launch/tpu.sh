#!/usr/bin/env bash
# Cloud TPU pod slices: a TPU VM slice driven with gcloud, or a GKE cluster through xpk.
#   bash launch/tpu.sh create NAME            # create the slice unless it exists
#   bash launch/tpu.sh setup NAME             # copy this checkout to every worker, install
#   bash launch/tpu.sh train NAME -- ARGS...  # the trainer on every worker, one process per host
#   bash launch/tpu.sh delete NAME
#   bash launch/tpu.sh xpk WORKLOAD -- ARGS...  # submit the trainer as an xpk workload on GKE
# Settings (environment): TPU_ZONE (us-east5-a), TPU_TYPE (v5p-64), TPU_VERSION
# (v2-alpha-tpuv5), TPU_SPOT=1 for spot capacity; for xpk: TPU_CLUSTER, TPU_NUM_SLICES (1),
# TPU_IMAGE (built from launch/Dockerfile), XPK_EXTRA. DRY_RUN=1 prints every command instead
# of executing it. jax.distributed needs no settings on TPU: each worker finds the others.
# Keep workdirs and data on gs:// or a filesystem every worker mounts.
set -euo pipefail
cd "$(dirname "$0")/.."
zone="${TPU_ZONE:-us-east5-a}" type="${TPU_TYPE:-v5p-64}" version="${TPU_VERSION:-v2-alpha-tpuv5}"
action="${1:-}" name="${2:-}"
[ -n "$action" ] && [ -n "$name" ] || { sed -n '2,14p' "$0" >&2; exit 2; }
shift 2
[ "${1:-}" = "--" ] && shift
args=("$@")
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi; }
quoted() { printf '%q ' "$@" | sed 's/ $//'; }
tpu=(gcloud compute tpus tpu-vm)
case "$action" in
  create)
    if [ "${DRY_RUN:-0}" = 1 ] || ! "${tpu[@]}" describe "$name" --zone="$zone" >/dev/null 2>&1
    then
      spot=(); [ "${TPU_SPOT:-0}" = 1 ] && spot=(--spot)
      run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$type" \
        --version="$version" "${spot[@]}"
    else
      echo "[tpu] $name exists in $zone; reusing it"
    fi ;;
  setup)
    run tar czf /tmp/mdm_jax_src.tgz --exclude=.venv --exclude=runs --exclude=data_cache \
      --exclude=.git .
    run "${tpu[@]}" scp /tmp/mdm_jax_src.tgz "$name:~/" --worker=all --zone="$zone"
    run "${tpu[@]}" ssh "$name" --worker=all --zone="$zone" --command \
      "mkdir -p ~/mdm_jax && tar xzf ~/mdm_jax_src.tgz -C ~/mdm_jax && cd ~/mdm_jax && bash launch/setup.sh tpu" ;;
  train)
    run "${tpu[@]}" ssh "$name" --worker=all --zone="$zone" --command \
      "cd ~/mdm_jax && .venv/bin/python -m mdm_jax.train $(quoted "${args[@]}")" ;;
  delete)
    run "${tpu[@]}" delete "$name" --zone="$zone" --quiet ;;
  xpk)
    extra=(); [ -n "${XPK_EXTRA:-}" ] && read -r -a extra <<< "$XPK_EXTRA"
    run xpk workload create --cluster="${TPU_CLUSTER:?set TPU_CLUSTER to the GKE cluster}" \
      --workload="$name" --tpu-type="$type" --num-slices="${TPU_NUM_SLICES:-1}" \
      --docker-image="${TPU_IMAGE:?set TPU_IMAGE (build launch/Dockerfile)}" "${extra[@]}" \
      --command="python -m mdm_jax.train $(quoted "${args[@]}")" ;;
  *) echo "unknown action '$action': create, setup, train, delete or xpk" >&2; exit 2 ;;
esac
