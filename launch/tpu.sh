#!/usr/bin/env bash
# Cloud TPU pod slices: a TPU VM slice driven with gcloud, or a GKE cluster through xpk.
#   bash launch/tpu.sh create NAME            # create the slice; recreate it if PREEMPTED
#   bash launch/tpu.sh setup NAME             # copy this checkout to every worker, install
#                                             # Python 3.11 (uv) and the tpu extra
#   bash launch/tpu.sh train NAME -- ARGS...  # start the trainer on every worker (nohup)
#   bash launch/tpu.sh logs NAME              # follow worker 0's log
#   bash launch/tpu.sh delete NAME
#   bash launch/tpu.sh xpk WORKLOAD -- ARGS...  # submit the trainer as an xpk workload on GKE
# Settings (environment): TPU_ZONE (us-east5-a), TPU_TYPE (v5p-64), TPU_VERSION
# (v2-alpha-tpuv5), TPU_SPOT=1 for spot capacity; for xpk: TPU_CLUSTER, TPU_NUM_SLICES (1),
# TPU_IMAGE (built from launch/Dockerfile), TPU_STORAGE (xpk storage names to mount, comma-
# separated), TPU_MAX_RESTARTS (10), TPU_GRACE_SECONDS (300), XPK_EXTRA. DRY_RUN=1 prints every
# command instead of executing it.
# Every worker first runs `python -m mdm_jax.distributed --check` (all hosts must join), then
# the trainer with --config.preemption_exit_code=42: after a preemption save it exits 42, which
# xpk restarts (up to TPU_MAX_RESTARTS); a preempted TPU VM slice is recreated by `create`, and
# `setup` + `train` resume it. Workdirs must be on gs:// (or a filesystem every worker mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
zone="${TPU_ZONE:-us-east5-a}" type="${TPU_TYPE:-v5p-64}" version="${TPU_VERSION:-v2-alpha-tpuv5}"
action="${1:-}" name="${2:-}"
[ -n "$action" ] && [ -n "$name" ] || { sed -n '2,21p' "$0" >&2; exit 2; }
shift 2
[ "${1:-}" = "--" ] && shift
args=("$@")
dry="${DRY_RUN:-0}"
run() { if [ "$dry" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi; }
quoted() { printf '%q ' "$@" | sed 's/ $//'; }
tpu=(gcloud compute tpus tpu-vm)
# What every worker (or xpk container) runs: join check, then the trainer.
job="python -m mdm_jax.distributed --check && python -m mdm_jax.train\
${args[*]:+ $(quoted "${args[@]}")} --config.preemption_exit_code=42"
case "$action" in
  create)
    state=""
    if [ "$dry" != 1 ]; then
      state=$("${tpu[@]}" describe "$name" --zone="$zone" --format='value(state)' 2>/dev/null \
              || true)
    fi
    case "$state" in
      READY) echo "[tpu] $name is READY in $zone; reusing it" ;;
      PREEMPTED|TERMINATED|STOPPED)
        echo "[tpu] $name is $state; deleting and creating it again"
        run "${tpu[@]}" delete "$name" --zone="$zone" --quiet
        state="" ;;
      "") ;;
      *) echo "error: $name is $state in $zone; wait until it is READY (or delete it)" >&2
         exit 2 ;;
    esac
    if [ -z "$state" ]; then
      spot=(); [ "${TPU_SPOT:-0}" = 1 ] && spot=(--spot)
      run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$type" \
        --version="$version" "${spot[@]}"
    fi ;;
  setup)
    run tar czf /tmp/mdm_jax_src.tgz --exclude=.venv --exclude=runs --exclude=data_cache \
      --exclude=.git .
    run "${tpu[@]}" scp /tmp/mdm_jax_src.tgz "$name:~/" --worker=all --zone="$zone"
    # TPU VM images ship Python 3.10; jax 0.10 needs 3.11: uv installs a standalone 3.11.
    run "${tpu[@]}" ssh "$name" --worker=all --zone="$zone" --command \
      "mkdir -p ~/mdm_jax && tar xzf ~/mdm_jax_src.tgz -C ~/mdm_jax && cd ~/mdm_jax \
&& python3 -m pip install --user -q uv && ~/.local/bin/uv python install 3.11 \
&& PYTHON=\$(~/.local/bin/uv python find 3.11) bash launch/setup.sh tpu" ;;
  train)
    # nohup: the trainers outlive this SSH session; each worker logs to ~/mdm_jax/train.log.
    run "${tpu[@]}" ssh "$name" --worker=all --zone="$zone" --command \
      "cd ~/mdm_jax && PATH=\$PWD/.venv/bin:\$PATH nohup bash -c $(quoted "$job") \
>> train.log 2>&1 < /dev/null & echo started on \$(hostname)" ;;
  logs)
    run "${tpu[@]}" ssh "$name" --worker=0 --zone="$zone" --command "tail -F ~/mdm_jax/train.log" ;;
  delete)
    run "${tpu[@]}" delete "$name" --zone="$zone" --quiet ;;
  xpk)
    extra=(); [ -n "${XPK_EXTRA:-}" ] && read -r -a extra <<< "$XPK_EXTRA"
    storage=()
    IFS=',' read -r -a names <<< "${TPU_STORAGE:-}"
    for s in "${names[@]}"; do [ -n "$s" ] && storage+=(--storage="$s"); done
    run xpk workload create --cluster="${TPU_CLUSTER:?set TPU_CLUSTER to the GKE cluster}" \
      --workload="$name" --tpu-type="$type" --num-slices="${TPU_NUM_SLICES:-1}" \
      --docker-image="${TPU_IMAGE:?set TPU_IMAGE (build launch/Dockerfile)}" \
      --max-restarts="${TPU_MAX_RESTARTS:-10}" \
      --termination-grace-period-seconds="${TPU_GRACE_SECONDS:-300}" \
      "${storage[@]}" "${extra[@]}" --command="$job" ;;
  *) echo "error: unknown action '$action': create, setup, train, logs, delete or xpk" >&2
     exit 2 ;;
esac
