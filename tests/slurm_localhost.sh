#!/usr/bin/env bash
# Start / stop a throw-away single-node Slurm (22.05) cluster on localhost, for
# tests/test_slurm.py (Debian's slurm-wlm + munge; `.ci/run` installs them). What a container
# needs, and why, is in BUILD_NOTES.md ("A real Slurm on localhost").
#
#   slurm_localhost.sh start [DIR]   -> prints the SLURM_CONF path on stdout (only that line)
#   slurm_localhost.sh stop  [DIR]   -> stops slurmd, slurmctld, munged started from DIR
#   slurm_localhost.sh status [DIR]
#
# DIR: argument, else $SLURM_LOCAL_DIR, else (start only) a fresh mktemp -d.
# Everything (munge key/socket, slurm.conf, state, spool, logs, pid files) lives in DIR.
# Tunables (env): SLURM_LOCAL_CPUS (default: nproc; may exceed real cores),
#   SLURM_LOCAL_NODENAME (default localhost), SLURM_LOCAL_CRED_EXPIRE (default 5 s;
#   this is also the delay before a requeued job may start again), SLURM_LOCAL_KILLWAIT
#   (default 5 s between SIGTERM and SIGKILL), SLURM_LOCAL_TIMEOUT (start-up wait, 60 s).
# Run as root for a normal cluster (slurmd setuid()s to the job owner). As a non-root user the
# daemons run as that user and only that user's jobs can run.
set -euo pipefail

cmd=${1:-}
DIR=${2:-${SLURM_LOCAL_DIR:-}}

log() { echo "slurm_local: $*" >&2; }
STARTING=0
die() { log "ERROR: $*"; if [ "$STARTING" = 1 ]; then do_stop || true; fi; exit 1; }

free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

# alive = exists and is not a zombie (PID 1 in this container reaps orphans lazily, so a
# daemon that already exited can linger as <defunct> for a second or two and kill -0 succeeds)
pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo Z)
    [ "$st" != Z ] && [ "$st" != X ]
}

read_pid() { [ -s "$1" ] && cat "$1" || true; }

wait_gone() {  # pid timeout_s
    local pid=$1 t=$(( $2 * 10 ))
    while pid_alive "$pid" && [ $t -gt 0 ]; do sleep 0.1; t=$((t - 1)); done
    ! pid_alive "$pid"
}

stop_pidfile() {  # name pidfile
    local pid; pid=$(read_pid "$2")
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" 15; then
            log "$1 ($pid) did not exit on SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid" 5 || log "$1 ($pid) still alive"
        fi
    fi
    rm -f "$2"
}

do_stop() {
    [ -n "$DIR" ] || die "stop: give DIR (argument or SLURM_LOCAL_DIR)"
    [ -d "$DIR" ] || { log "no such dir $DIR"; return 0; }
    DIR=$(cd "$DIR" && pwd)
    # Cancel anything still running so slurmd does not leave orphaned step daemons.
    if [ -f "$DIR/etc/slurm.conf" ] && pid_alive "$(read_pid "$DIR/run/slurmctld.pid")" \
            && pid_alive "$(read_pid "$DIR/run/slurmd.pid")"; then
        local jobs
        jobs=$(SLURM_CONF="$DIR/etc/slurm.conf" timeout 10 squeue -h -o %i 2>/dev/null || true)
        # shellcheck disable=SC2086
        [ -z "$jobs" ] || SLURM_CONF="$DIR/etc/slurm.conf" timeout 10 scancel $jobs 2>/dev/null || true
        # give slurmd a moment to tear down steps
        local n=50
        while [ $n -gt 0 ] && [ -n "$(SLURM_CONF="$DIR/etc/slurm.conf" timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ]; do
            sleep 0.2; n=$((n - 1)); done
    fi
    stop_pidfile slurmd    "$DIR/run/slurmd.pid"
    stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
    # Fallback (normally a no-op): if slurmd died/was KILLed, slurmstepd and job tasks can be
    # orphaned. Kill processes that carry our SLURM_CONF and are slurmstepd or job processes
    # (have SLURM_JOB_ID), never ourselves or our ancestors.
    local conf="$DIR/etc/slurm.conf" anc=" " a=$$ e p env comm
    while [ -n "$a" ] && [ "$a" != 0 ] && [ "$a" != 1 ]; do
        anc="$anc$a "; a=$(awk '{print $4}' "/proc/$a/stat" 2>/dev/null || true); done
    for e in /proc/[0-9]*/environ; do
        p=${e#/proc/}; p=${p%/environ}
        case "$anc" in *" $p "*) continue ;; esac
        env=$( { tr '\0' '\n' < "$e"; } 2>/dev/null) || continue
        grep -qxF "SLURM_CONF=$conf" <<<"$env" || continue
        comm=$(cat "/proc/$p/comm" 2>/dev/null || true)
        if [ "$comm" = slurmstepd ] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then
            log "killing leftover $comm ($p)"; kill -KILL "$p" 2>/dev/null || true
        fi
    done
    stop_pidfile munged "$DIR/munge/munged.pid"
    log "stopped ($DIR)"
}

do_start() {
    if [ -z "$DIR" ]; then DIR=$(mktemp -d /tmp/slurm_local.XXXXXX); fi
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    local user; user=$(id -un)
    [ "$(id -u)" = 0 ] || log "not root: daemons run as $user and can only run jobs of $user"
    for b in munged mungekey slurmctld slurmd sinfo; do command -v "$b" >/dev/null || die "$b not found"; done
    STARTING=1

    local cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
    local node=${SLURM_LOCAL_NODENAME:-localhost}
    local cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-5}
    local killwait=${SLURM_LOCAL_KILLWAIT:-5}
    if [ "$cred_expire" -lt 5 ]; then  # slurm rejects <5 and silently falls back to 120
        log "cred_expire=$cred_expire < 5 is invalid in Slurm, using 5"; cred_expire=5; fi
    local timeout_s=${SLURM_LOCAL_TIMEOUT:-60}

    # munged is paranoid about permissions: dirs must not be group/world writable.
    mkdir -p "$DIR/munge" "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    # 0755 (not 0700): clients of any uid must reach the socket; the key itself is 0400.
    chmod 0755 "$DIR" "$DIR/munge" "$DIR/etc" "$DIR/log" "$DIR/run"

    # ---- munge -----------------------------------------------------------
    local mkey="$DIR/munge/munge.key" msock="$DIR/munge/munge.socket"
    [ -s "$mkey" ] || mungekey --create --keyfile="$mkey" 2>/dev/null \
        || { dd if=/dev/urandom of="$mkey" bs=1 count=1024 status=none; }
    chmod 0400 "$mkey"
    if ! pid_alive "$(read_pid "$DIR/munge/munged.pid")"; then
        rm -f "$msock" "$msock.lock"
        # --force: running as root / relaxed checks are only warnings then.
        munged --force --key-file="$mkey" --socket="$msock" \
            --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed" --num-threads=2 \
            || die "munged failed, see $DIR/log/munged.log"
    fi

    # ---- slurm.conf -------------------------------------------------------
    local conf="$DIR/etc/slurm.conf"
    if [ ! -f "$conf" ]; then
        local cport dport
        cport=$(free_port); dport=$(free_port)
        while [ "$dport" = "$cport" ]; do dport=$(free_port); done
        cat > "$conf" <<EOF
# generated by slurm_localhost.sh
ClusterName=local
SlurmctldHost=${node}(127.0.0.1)
SlurmctldPort=${cport}
SlurmdPort=${dport}
SlurmUser=${user}
SlurmdUser=${user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${msock},cred_expire=${cred_expire}
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=${DIR}/etc/plugstack.conf
MailProg=/bin/true
# containers: no cgroup/systemd -> avoid every cgroup plugin
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=${killwait}
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=300
MessageTimeout=10
# default sched_interval=60/bf_interval=30: a requeued job (or any job whose BeginTime
# passes) would otherwise wait up to 30-60 s after becoming eligible.
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=${node} NodeAddr=127.0.0.1 NodeHostname=${node} CPUs=${cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
        : > "$DIR/etc/plugstack.conf"
    fi
    export SLURM_CONF="$conf"

    # ---- daemons ----------------------------------------------------------
    if ! pid_alive "$(read_pid "$DIR/run/slurmctld.pid")"; then
        # -i: ignore (possibly stale) state; daemonises, writes SlurmctldPidFile
        slurmctld -i || die "slurmctld failed, see $DIR/log/slurmctld.log"
    fi
    if ! pid_alive "$(read_pid "$DIR/run/slurmd.pid")"; then
        slurmd -N "$node" || die "slurmd failed, see $DIR/log/slurmd.log"
    fi

    # ---- wait until the node is schedulable --------------------------------
    local t=$(( timeout_s * 5 )) st=""
    while [ $t -gt 0 ]; do
        st=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
        case "$st" in idle|mixed|allocated|completing) break ;;
            inval|drained|drained\*|inval\*) break ;;  # e.g. CPUs > hw without config_overrides
        esac
        sleep 0.2; t=$((t - 1))
    done
    case "$st" in idle|mixed|allocated|completing) ;;
        *) log "node state '$st' (not usable; waited up to ${timeout_s}s); logs in $DIR/log; stopping"
           do_stop; exit 1 ;;
    esac
    log "up: node ${node} ${st}, SLURM_CONF=$conf"
    echo "$conf"
}

do_status() {
    [ -n "$DIR" ] || die "status: give DIR"
    DIR=$(cd "$DIR" && pwd)
    local n
    for n in munge/munged run/slurmctld run/slurmd; do
        local pid; pid=$(read_pid "$DIR/$n.pid")
        if pid_alive "$pid"; then echo "${n##*/}: running ($pid)"; else echo "${n##*/}: stopped"; fi
    done
    SLURM_CONF="$DIR/etc/slurm.conf" sinfo 2>&1 || true
}

case "$cmd" in
    start)  do_start ;;
    stop)   do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
