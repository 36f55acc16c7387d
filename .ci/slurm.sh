#!/usr/bin/env bash
# Single-node SLURM on this machine, for the runner's SLURM tests (Debian 12, run as root, idempotent).
#
# Installs slurm-wlm + munge (apt-get), writes /etc/slurm/slurm.conf for this host as the only node of
# partition "ci" (CPUs/RealMemory from `slurmd -C`; partition "ci-high" on the same node preempts it,
# PreemptMode=REQUEUE, for preemption tests), starts munged, slurmctld and slurmd, and checks that
# `sinfo` shows the node idle and that `srun hostname` and `sbatch --wait` work, as root.
# Measured on a 2-core Debian 12 VM: 22 s from nothing (19 s of apt-get), 2-11 s when installed
# (sbatch --wait alone polls for up to 10 s).
# Nothing needs cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
# JobAcctGatherType=jobacct_gather/none, AccountingStorageType=accounting_storage/none (so no sacct).
# SlurmUser=slurm (the package's user) runs slurmctld; slurmd runs as root (it must); jobs may be
# submitted by root (DisableRootJobs is NO by default; checked below).
#
# Exit 0: SLURM is up. Exit 1: it is not, and the LAST line of stdout is
#   SLURM_UNAVAILABLE: <one-line reason>
# (also written to $SLURM_STATUS_FILE when set, as is SLURM_READY on success) so that the caller can skip
# SLURM tests with it.
# Every step has a timeout; nothing waits forever.
#
# Environment: SLURM_PARTITION (default ci), SLURM_APT_TIMEOUT_S (default 600), SLURM_STATUS_FILE.
# `.ci/slurm.sh stop` stops the daemons this script started (by their pid files).
set -uo pipefail

PARTITION=${SLURM_PARTITION:-ci}
APT_TIMEOUT_S=${SLURM_APT_TIMEOUT_S:-600}
CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
START=$(date +%s)

log() { echo "slurm.sh [$(( $(date +%s) - START ))s]: $*" >&2; }

unavailable() {
    local reason="SLURM_UNAVAILABLE: $*"
    reason=${reason//$'\n'/ }
    [ -n "${SLURM_STATUS_FILE:-}" ] && echo "$reason" > "$SLURM_STATUS_FILE"
    echo "$reason"
    exit 1
}

# The last error-looking line of a daemon log, for the one-line reason.
last_error() {
    [ -f "$1" ] || { echo "no log $1"; return; }
    local line
    line=$(grep -iE 'fatal|error' "$1" | tail -n 1)
    [ -n "$line" ] || line=$(tail -n 1 "$1")
    echo "$line"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemons() {
    local f pid
    for f in "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid" /run/munge/munged.pid; do
        if pid_alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        fi
        rm -f "$f"
    done
}

if [ "${1:-}" = stop ]; then
    stop_daemons
    exit 0
fi

[ "$(id -u)" -eq 0 ] || unavailable "must run as root (uid $(id -u))"
command -v apt-get >/dev/null || unavailable "no apt-get: not a Debian system"

# --- 1. packages -------------------------------------------------------------------------------------
if ! command -v slurmd >/dev/null || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null \
        || ! command -v srun >/dev/null; then
    log "installing slurm-wlm and munge"
    # In a container without an init system the packages' postinst cannot start services: policy-rc.d
    # (101) tells invoke-rc.d not to try; we start the daemons ourselves below.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-q -q -y -o DPkg::Lock::Timeout=120 -o Dpkg::Options::=--force-confdef
              -o Dpkg::Options::=--force-confold)
    ok=1
    timeout "$APT_TIMEOUT_S" apt-get "${apt_opts[@]}" update >/tmp/slurm-apt.log 2>&1 || ok=0
    if [ $ok = 1 ]; then
        timeout "$APT_TIMEOUT_S" apt-get "${apt_opts[@]}" install --no-install-recommends \
            slurm-wlm munge >>/tmp/slurm-apt.log 2>&1 || ok=0
    fi
    [ $created_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $ok = 1 ] || unavailable "apt-get install slurm-wlm munge failed: $(tail -n 1 /tmp/slurm-apt.log)"
fi
log "$(slurmd -V)"

# --- 2. munge -------------------------------------------------------------------------------------
mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating the munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
chmod 700 /etc/munge /var/log/munge
chmod 400 /etc/munge/munge.key
chmod 755 /run/munge
if ! pid_alive /run/munge/munged.pid || ! timeout 5 munge -n </dev/null | timeout 5 unmunge >/dev/null 2>&1; then
    pid_alive /run/munge/munged.pid && kill "$(cat /run/munge/munged.pid)" && sleep 1
    log "starting munged"
    timeout 20 runuser -u munge -- /usr/sbin/munged >/tmp/munged.out 2>&1 \
        || unavailable "munged did not start: $(tail -n 1 /tmp/munged.out) $(last_error /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do
    timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && break
    sleep 0.2
done
timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 \
    || unavailable "munge credential round trip failed: $(last_error /var/log/munge/munged.log)"

# --- 3. slurm.conf -----------------------------------------------------------------------------------
HOST=$(hostname -s)
[ -n "$HOST" ] || unavailable "hostname -s is empty"
# slurmd -C prints this machine's NodeName=... CPUs=... RealMemory=... line (first line only).
node_line=$(timeout 30 slurmd -C 2>/tmp/slurmd-C.err | head -n 1)
case "$node_line" in
    NodeName=*) ;;
    *) unavailable "slurmd -C failed: $(tail -n 1 /tmp/slurmd-C.err)";;
esac
node_hw=$(echo "$node_line" | sed -E 's/^NodeName=[^ ]+ //')
mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
chown slurm:slurm "$STATE_DIR" "$LOG_DIR" "$RUN_DIR"
new_conf=$(cat <<EOF
# Written by .ci/slurm.sh: one node (this host), one partition, no cgroups, no accounting.
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only cred_expire seconds later (default 120): 10 s for quick CI requeues.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Pending jobs that became eligible (e.g. requeued ones) start within seconds, not at the next 30-60 s pass.
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Time limits: SIGTERM (after the --signal one, if any) at the limit, SIGKILL KillWait seconds later.
KillWait=30
OverTimeLimit=0
JobRequeue=1
# Finished jobs stay known to slurmctld (squeue --states=all) for an hour: there is no sacct here.
MinJobAge=3600
# Preemption for tests: a job in partition $PARTITION-high preempts (requeues) jobs of $PARTITION.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=$PARTITION-high Nodes=$HOST Default=NO MaxTime=INFINITE State=UP PriorityTier=2
EOF
)
restart=0
if [ ! -f "$CONF_DIR/slurm.conf" ] || [ "$(cat "$CONF_DIR/slurm.conf")" != "$new_conf" ]; then
    log "writing $CONF_DIR/slurm.conf"
    echo "$new_conf" > "$CONF_DIR/slurm.conf"
    restart=1
fi
# No cgroup plugin is configured, so slurmd does not need cgroup.conf; an empty one keeps older
# builds that look for it quiet.
[ -f "$CONF_DIR/cgroup.conf" ] || echo "# no cgroup plugins in use (.ci/slurm.sh)" > "$CONF_DIR/cgroup.conf"

# --- 4. daemons ------------------------------------------------------------------------------------
if [ $restart = 1 ]; then
    for f in "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid"; do
        if pid_alive "$f"; then
            kill "$(cat "$f")"; for _ in $(seq 50); do pid_alive "$f" || break; sleep 0.2; done
        fi
    done
fi
if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
    log "starting slurmctld"
    # -c: start from a clean state (no jobs left from an earlier configuration).
    timeout 30 slurmctld -c >/tmp/slurmctld.out 2>&1 \
        || unavailable "slurmctld did not start: $(tail -n 1 /tmp/slurmctld.out) $(last_error $LOG_DIR/slurmctld.log)"
fi
for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' \
    || unavailable "slurmctld not answering: $(last_error $LOG_DIR/slurmctld.log)"
if ! pid_alive "$RUN_DIR/slurmd.pid"; then
    log "starting slurmd"
    timeout 30 slurmd >/tmp/slurmd.out 2>&1 \
        || unavailable "slurmd did not start: $(tail -n 1 /tmp/slurmd.out) $(last_error $LOG_DIR/slurmd.log)"
fi

# --- 5. checks --------------------------------------------------------------------------------------
state=""
for _ in $(seq 60); do
    pid_alive "$RUN_DIR/slurmd.pid" || sleep 1
    pid_alive "$RUN_DIR/slurmd.pid" || unavailable "slurmd exited: $(last_error $LOG_DIR/slurmd.log)"
    state=$(timeout 5 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)
    [ "$state" = idle ] && break
    case "$state" in drain*|down*) timeout 5 scontrol update nodename="$HOST" state=resume 2>/dev/null;; esac
    sleep 0.5
done
[ "$state" = idle ] || unavailable "node $HOST is '${state:-absent}' in sinfo, not idle: $(timeout 5 sinfo -h -R 2>/dev/null | head -n 1) $(last_error $LOG_DIR/slurmd.log)"
log "sinfo: $(timeout 5 sinfo -h -p "$PARTITION" -o '%P %a %D %T %N %c CPUs %m MB' 2>&1)"

out=$(timeout 60 srun -p "$PARTITION" -N1 -n1 -t 1 --chdir=/tmp hostname 2>&1)
[ "$out" = "$(hostname)" ] || [ "$out" = "$HOST" ] \
    || unavailable "srun hostname as $(id -un) failed: $(echo "$out" | tail -n 1) $(last_error $LOG_DIR/slurmd.log)"
log "srun hostname: $out"

tmp=$(mktemp -d)
out=$(timeout 90 sbatch --wait -p "$PARTITION" -t 1 --chdir="$tmp" -o "$tmp/out" \
      --wrap 'echo "sbatch ok as $(id -un) in job $SLURM_JOB_ID"' 2>&1)
rc=$?
[ $rc = 0 ] && grep -q 'sbatch ok' "$tmp/out" 2>/dev/null \
    || unavailable "sbatch --wait failed (rc $rc): $(echo "$out" | tail -n 1) $(cat "$tmp/out" 2>/dev/null | tail -n 1) $(last_error $LOG_DIR/slurmd.log)"
log "sbatch --wait: $(cat "$tmp/out")"
rm -rf "$tmp"
log "SLURM is up: partition $PARTITION, node $HOST ($node_hw), in $(( $(date +%s) - START ))s"
ready="SLURM_READY: partition=$PARTITION node=$HOST"
[ -n "${SLURM_STATUS_FILE:-}" ] && echo "$ready" > "$SLURM_STATUS_FILE"
echo "$ready"
