#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for trying `snakemake --profile slurm`
# without a real cluster (and for tests/test_slurm.py). Stop it with tools/slurm/stop.sh.
#
#   sudo tools/slurm/start.sh        # as root, on Debian/Ubuntu (installs packages with apt)
#
# What it does:
#   - installs slurmctld, slurmd, slurm-client and munge with apt-get when missing;
#   - writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf (SLURM's job steps read the
#     configuration from there; an existing slurm.conf not written by this script is left
#     alone and the script stops);
#   - one node "localhost" (127.0.0.1) with all CPUs, $MEM_MB of memory and one GPU declared
#     on /dev/null (jobs asking for --gpus=1 get scheduled; there is no real GPU, and
#     CUDA_VISIBLE_DEVICES=0 is set anyway: code must ask torch.cuda.is_available());
#   - two partitions on that node: $PARTITION, Default=YES (slurm/config.yaml names no
#     partition: jobs go to the default one), and $GPU_PARTITION, for trying a per-method
#     partition (`methods.<name>.resources.slurm_partition: gpu` in the workflow config);
#   - no accounting database: `sacct` does not work (the profile uses squeue for job status);
#     finished jobs are recorded one line each in $STATE_DIR/log/jobcomp.log;
#   - state, spool, logs and PID files in $STATE_DIR; munged, slurmctld and slurmd run as
#     daemons, their PIDs are in $STATE_DIR/run/*.pid (stop.sh stops exactly those);
#   - waits until the node is idle (or prints the logs and fails).
#
# Settings (environment variables):
#   CELLTYPE_BENCH_SLURM_DIR        state directory        (default /tmp/celltype-bench-slurm)
#   CELLTYPE_BENCH_SLURM_PARTITION  default partition      (default local)
#   CELLTYPE_BENCH_SLURM_GPU_PARTITION  second partition   (default gpu)
#   CELLTYPE_BENCH_SLURM_CPUS       CPUs of the node       (default: nproc)
#   CELLTYPE_BENCH_SLURM_MEM_MB     memory of the node, MB (default: 90% of RAM; at most the
#                                   machine's, or slurmd drains the node)
#   CELLTYPE_BENCH_SLURM_GPUS       GPUs declared          (default 1)
#   CELLTYPE_BENCH_SLURM_TIMEOUT    seconds to wait for the node to become idle (default 60)
#
# Exit status: 0 when the node is idle (also when this cluster was already running),
# 2 when the machine cannot run it (not root, no apt-get), 1 on any other failure.
set -euo pipefail

STATE_DIR="${CELLTYPE_BENCH_SLURM_DIR:-/tmp/celltype-bench-slurm}"
PARTITION="${CELLTYPE_BENCH_SLURM_PARTITION:-local}"
GPU_PARTITION="${CELLTYPE_BENCH_SLURM_GPU_PARTITION:-gpu}"
CPUS="${CELLTYPE_BENCH_SLURM_CPUS:-$(nproc)}"
GPUS="${CELLTYPE_BENCH_SLURM_GPUS:-1}"
TIMEOUT="${CELLTYPE_BENCH_SLURM_TIMEOUT:-60}"
RAM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
MEM_MB="${CELLTYPE_BENCH_SLURM_MEM_MB:-$((RAM_MB * 9 / 10))}"
CONF_DIR=/etc/slurm
MARKER="# written by celltype-bench tools/slurm/start.sh"
RUN="$STATE_DIR/run"
LOG="$STATE_DIR/log"

say() { echo "[slurm-local] $*"; }
die() {
    echo "[slurm-local] error: $*" >&2
    exit "${2:-1}"
}

# A PID file of ours whose process is alive and has the expected name.
alive() { # alive NAME
    local pidfile="$RUN/$1.pid" pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$1" ]]
}

[[ $(id -u) -eq 0 ]] || die "must run as root (SLURM's daemons and apt-get need it)" 2

# ---- packages --------------------------------------------------------------------------------
missing=()
for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them" 2
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    # keep the packages' init scripts from starting daemons during the install
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
        trap 'rm -f "$policy"' EXIT # also when apt-get is interrupted
    fi
    apt_log=/tmp/celltype-bench-slurm-apt.log
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            slurmctld slurmd slurm-client munge
    }
    # a fresh machine (CI) may have no package lists yet: update once and retry
    status=0
    apt_install >"$apt_log" 2>&1 ||
        { apt-get update -q >>"$apt_log" 2>&1 && apt_install >>"$apt_log" 2>&1; } ||
        status=$?
    if ((own_policy)); then
        rm -f "$policy"
        trap - EXIT
    fi
    if ((status)); then
        tail -20 "$apt_log" >&2
        die "apt-get install failed (log: $apt_log)"
    fi
fi

# ---- already running? ------------------------------------------------------------------------
if alive slurmctld && alive slurmd; then
    for part in "$PARTITION" "$GPU_PARTITION"; do
        if [[ -z $(sinfo -h -p "$part" -o %P 2>/dev/null) ]]; then
            die "a cluster started earlier is running without partition $part: run tools/slurm/stop.sh, then this script again"
        fi
    done
    say "already running (state in $STATE_DIR)"
    exit 0
fi
for name in slurmctld slurmd; do
    if alive "$name"; then
        die "$name from an earlier start is still running: run tools/slurm/stop.sh first"
    fi
    if pgrep -x "$name" >/dev/null; then
        die "a $name not started by this script is running (PID $(pgrep -x "$name" | tr '\n' ' ')); stop it first"
    fi
done

# ---- configuration ---------------------------------------------------------------------------
if [[ -e $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
    die "$CONF_DIR/slurm.conf exists and was not written by this script: not overwriting it"
fi
mkdir -p "$STATE_DIR"/{state,spool} "$RUN" "$LOG" "$CONF_DIR"
chmod 755 "$STATE_DIR"
rm -f "$RUN"/slurmctld.pid "$RUN"/slurmd.pid

cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER
# A single-node cluster on 127.0.0.1; state in $STATE_DIR. Stop: tools/slurm/stop.sh
ClusterName=celltypebench
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
GresTypes=gpu
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=$GPU_PARTITION Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF

{
    echo "$MARKER"
    echo "AutoDetect=off"
    # a GPU declared by count only is dropped and the node drains: give each one a File
    for ((i = 0; i < GPUS; i++)); do
        echo "NodeName=localhost Name=gpu File=/dev/null"
    done
} >"$CONF_DIR/gres.conf"

# ---- munge -----------------------------------------------------------------------------------
if alive munged; then
    say "munged from an earlier start still running (PID $(<"$RUN/munged.pid")): using it"
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f "$RUN/munged.pid"
    say "munged already running: using it (stop.sh leaves it alone)"
else
    rm -f "$RUN/munged.pid"
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start (exit status $?)"
    for _ in $(seq 50); do
        [[ -s /run/munge/munged.pid ]] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    [[ -s /run/munge/munged.pid ]] || die "munged did not start (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$RUN/munged.pid"
    say "munged started (PID $(<"$RUN/munged.pid"))"
fi

# ---- slurmctld, slurmd -----------------------------------------------------------------------
fail() {
    echo "---- $LOG/slurmctld.log" >&2
    tail -30 "$LOG/slurmctld.log" >&2 2>/dev/null || true
    echo "---- $LOG/slurmd.log" >&2
    tail -30 "$LOG/slurmd.log" >&2 2>/dev/null || true
    die "$1 (stop what started with tools/slurm/stop.sh)"
}

slurmctld -i || fail "slurmctld failed to start (exit status $?)"
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
done
alive slurmctld || fail "slurmctld did not start"
say "slurmctld started (PID $(<"$RUN/slurmctld.pid"))"

slurmd -N localhost || fail "slurmd failed to start (exit status $?)"
for _ in $(seq 50); do
    alive slurmd && break
    sleep 0.2
done
alive slurmd || fail "slurmd did not start"
say "slurmd started (PID $(<"$RUN/slurmd.pid"))"

deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -1)
    [[ $state == idle ]] && break
    if [[ $state == drain* || $state == down* ]] && ((!resumed)); then
        scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
        resumed=1
    fi
    ((SECONDS < deadline)) || fail "node not idle after ${TIMEOUT}s (state: ${state:-unknown})"
    sleep 0.5
done
say "node localhost idle: partitions $PARTITION (default) and $GPU_PARTITION, $CPUS CPUs, $MEM_MB MB, gpu:$GPUS (File=/dev/null)"
say "state and logs in $STATE_DIR; stop with tools/slurm/stop.sh"
