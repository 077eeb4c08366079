#!/usr/bin/env bash
# One training task under launch/slurm.sbatch: runs its arguments and turns exit 42 (preempted,
# saved) into 0. srun's --kill-on-bad-exit counts any non-zero exit as a crash and kills the
# other tasks at once, 42 included; as 0 every task leaves on its own. Where the batch script
# runs (the allocation's first node, which always runs tasks too), the task also leaves a mark
# in $MDM_JAX_SLURM_MARKS, from which the script tells a preemption from a finished run.
# Slurm signals every process of a task: the no-op trap keeps this shell alive on SIGTERM and
# SIGINT (its default would kill it, a bad exit), while the trainer handles them.
trap : TERM INT
rc=0
"$@" || rc=$?
if [ "$rc" = 42 ]; then
  if [ -d "${MDM_JAX_SLURM_MARKS:-}" ]; then : > "$MDM_JAX_SLURM_MARKS/${SLURM_PROCID:-0}"; fi
  exit 0
fi
# A trainer killed by a signal exits 128+N here (srun's exit code then names the signal).
exit "$rc"
