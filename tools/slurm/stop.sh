#!/usr/bin/env bash
# Stop the single-node SLURM cluster that tools/slurm/start.sh started: cancel the jobs still
# queued or running on it, then stop slurmd, slurmctld and munged (munged only if start.sh
# started it), each by the PID recorded in
# $CELLTYPE_BENCH_SLURM_DIR/run (default /tmp/celltype-bench-slurm/run). Nothing else is
# signalled. Removes /etc/slurm/{slurm,gres}.conf when start.sh wrote them. Logs stay in
# $CELLTYPE_BENCH_SLURM_DIR/log; `stop.sh --purge` removes the whole state directory as well.
#
# Exit status 0 when nothing of ours is left running (also when nothing was running).
set -euo pipefail

STATE_DIR="${CELLTYPE_BENCH_SLURM_DIR:-/tmp/celltype-bench-slurm}"
RUN="$STATE_DIR/run"
CONF_DIR=/etc/slurm
MARKER="# written by celltype-bench tools/slurm/start.sh"
PURGE=0
[[ ${1:-} == --purge ]] && PURGE=1

say() { echo "[slurm-local] $*"; }

# stop NAME: TERM the recorded PID if it is alive and still has that name, wait, then KILL.
stop() {
    local name=$1 pidfile="$RUN/$1.pid" pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ ! -r /proc/$pid/comm || $(</proc/"$pid"/comm) != "$name" ]]; then
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -e /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -e /proc/$pid ]]; then
        say "$name (PID $pid) did not stop after 10 s: sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
    say "$name (PID $pid) stopped"
}

# Jobs still queued or running on this cluster (e.g. after an interrupted snakemake) are
# cancelled first: their processes are children of slurmstepd, not of slurmd, and would
# outlive it. The cluster is this script's own, so every job on it is ours.
if [[ -s $RUN/slurmctld.pid ]] && command -v squeue >/dev/null 2>&1 &&
    [[ $(cat /proc/"$(<"$RUN/slurmctld.pid")"/comm 2>/dev/null) == slurmctld ]]; then
    ids=$(squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${ids// /} ]]; then
        say "cancelling jobs: $ids"
        # shellcheck disable=SC2086
        scancel $ids 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi

stop slurmd
stop slurmctld
stop munged

for f in slurm.conf gres.conf; do
    if [[ -e $CONF_DIR/$f ]] && grep -qF "$MARKER" "$CONF_DIR/$f"; then
        rm -f "$CONF_DIR/$f"
    fi
done
if ((PURGE)); then
    rm -rf "$STATE_DIR"
    say "removed $STATE_DIR"
fi
