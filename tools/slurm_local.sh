#!/usr/bin/env bash
# A throw-away Slurm cluster of N slurmd "nodes" on this machine, to rehearse cluster/submit.py,
# requeues and cluster/ray_slurm.sbatch before going to a real site (docs/cluster.md).
#
#   tools/slurm_local.sh up [NODES] [--unresolvable]   start munged, slurmctld, NODES slurmd
#   tools/slurm_local.sh down                          stop exactly what `up` started
#   tools/slurm_local.sh env                           the export line for sbatch / squeue
#
#   eval "$(tools/slurm_local.sh up 2)"    # then: sbatch, squeue, scontrol, cluster/submit.py
#   tools/slurm_local.sh down
#
# Everything lives under $SLURM_LOCAL_DIR (default /tmp/setdiv-slurm; keep it short, munge's
# socket path must stay under 108 bytes): its own munge key and socket, slurm.conf, state,
# spool, logs and pid files. No systemd, no /etc/slurm: clients find the cluster through
# SLURM_CONF (the line `up` and `env` print). Nodes are named n1..nN (prefix $SLURM_LOCAL_PREFIX)
# and made resolvable by one marked /etc/hosts line, removed by `down`. --unresolvable adds a
# partition `unresolvable` of one node whose name deliberately does not resolve, to see what a
# job does when MASTER_ADDR cannot be looked up. Debian's slurm-wlm, munge and slurm-client are
# installed with apt-get when missing (root). `up` prints only the export line on stdout;
# progress goes to stderr. Exit 4: Slurm is missing and cannot be installed here; exit 3: it
# is there but did not start (the reason printed, with the log to read).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/setdiv-slurm}
PREFIX=${SLURM_LOCAL_PREFIX:-n}
CONF=$DIR/slurm.conf
MARK="# setdiv slurm_local $DIR"

say() { echo "[slurm_local] $*" >&2; }
die() { say "$*"; exit 3; }
cannot_install() { say "$*"; exit 4; }

install_slurm() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged mungekey; do
        command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null 2>&1 \
            || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        || cannot_install "missing ${missing[*]}, and apt-get cannot install them here (needs root and apt-get)"
    say "installing slurm-wlm munge slurm-client with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurm-wlm munge slurm-client) >"${TMPDIR:-/tmp}/slurm_local_apt.log" 2>&1 \
        || cannot_install "apt-get install slurm-wlm munge slurm-client failed: $(tail -n 1 "${TMPDIR:-/tmp}/slurm_local_apt.log")"
}

free_ports() {  # N consecutive free TCP ports, the first printed
    python3 - "$1" <<'EOF'
import socket, sys
n = int(sys.argv[1])
for base in range(16817, 60000, 7):
    try:
        socks = []
        for p in range(base, base + n):
            s = socket.socket(); s.bind(("0.0.0.0", p)); socks.append(s)
    except OSError:
        continue
    finally:
        for s in socks: s.close()
    if len(socks) == n:
        print(base); break
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

nodes_idle() {
    local n
    n=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | grep -c -E ' (idle|mix|alloc)$') || true
    [ "$n" -ge "$1" ]
}

up() {
    local nodes=2 unresolvable=0
    for arg in "$@"; do
        case "$arg" in
            --unresolvable) unresolvable=1 ;;
            ''|*[!0-9]*) die "usage: $0 up [NODES] [--unresolvable]" ;;
            *) nodes=$arg ;;
        esac
    done
    [ "$nodes" -ge 1 ] || die "NODES must be >= 1"
    if pid_alive "$DIR/run/slurmctld.pid"; then
        die "a local cluster already runs in $DIR: '$0 down' first (or set SLURM_LOCAL_DIR)"
    fi
    install_slurm
    export PATH=$PATH:/usr/sbin
    rm -rf "$DIR"
    mkdir -p "$DIR"/{munge,state,spool,log,run}
    chmod 700 "$DIR/munge"

    local host cpus mem port names node i
    host=$(hostname)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / (nodes + 1) ))
    port=$(free_ports $((nodes + 2)))
    [ -n "$port" ] || die "no free ports for slurmctld and the slurmd nodes"
    names=()
    for i in $(seq 1 "$nodes"); do names+=("$PREFIX$i"); done

    say "munged (own key and socket in $DIR/munge)"
    mungekey -c -k "$DIR/munge/munge.key" >/dev/null 2>&1 \
        || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed" \
        || die "munged did not start ($DIR/log/munged.log)"

    {
        echo "ClusterName=setdivlocal"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$port"
        echo "SlurmUser=$(id -un)"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "AuthInfo=socket=$DIR/munge/munge.socket"
        echo "CredType=cred/munge"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "MpiDefault=none"
        echo "KillWait=10"
        echo "MinJobAge=600"
        echo "SchedulerParameters=sched_interval=2"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
        for i in $(seq 1 "$nodes"); do
            echo "NodeName=$PREFIX$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + i))" \
                "CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP"
        if [ "$unresolvable" = 1 ]; then
            echo "NodeName=${PREFIX}unresolvable1 NodeHostname=$host NodeAddr=127.0.0.1" \
                "Port=$((port + nodes + 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
            echo "PartitionName=unresolvable Nodes=${PREFIX}unresolvable1 MaxTime=INFINITE State=UP"
        fi
    } >"$CONF"

    if ! getent hosts "${names[@]}" >/dev/null 2>&1 \
        || [ "$(getent hosts "${names[@]}" | wc -l)" -lt "$nodes" ]; then
        [ -w /etc/hosts ] || die "node names ${names[*]} do not resolve and /etc/hosts is not writable"
        say "making ${names[*]} resolvable (/etc/hosts)"
        echo "127.0.0.1 ${names[*]} $MARK" >>/etc/hosts
    fi

    say "slurmctld on port $port, slurmd ${names[*]}"
    slurmctld -f "$CONF" || die "slurmctld did not start ($DIR/log/slurmctld.log)"
    wait_for 20 env SLURM_CONF="$CONF" scontrol ping || die "slurmctld does not answer ($DIR/log/slurmctld.log)"
    local all=("${names[@]}")
    [ "$unresolvable" = 1 ] && all+=("${PREFIX}unresolvable1")
    for node in "${all[@]}"; do
        slurmd -f "$CONF" -N "$node" || die "slurmd $node did not start ($DIR/log/slurmd-$node.log)"
    done
    wait_for 60 nodes_idle "${#all[@]}" \
        || die "nodes not idle after 60 s: $(SLURM_CONF=$CONF sinfo -N 2>&1 | tr '\n' ';')"
    say "up: ${#all[@]} node(s), $cpus CPU(s) each; $(env_line)"
    env_line
}

env_line() { echo "export SLURM_CONF=$CONF"; }

down() {
    export PATH=$PATH:/usr/sbin
    if pid_alive "$DIR/run/slurmctld.pid"; then
        # Jobs first, so that their steps (slurmstepd and everything below) end with them.
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            say "cancelling job(s) $(echo "$jobs" | tr '\n' ' ')"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            wait_for 30 bash -c "[ -z \"\$(SLURM_CONF=$CONF squeue -h -t R,CG -o %A 2>/dev/null)\" ]" || true
        fi
    fi
    local pidfile pid
    for pidfile in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait_for 15 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    if [ -w /etc/hosts ] && grep -qF "$MARK" /etc/hosts; then
        grep -vF "$MARK" /etc/hosts >"$DIR/hosts.new" && cat "$DIR/hosts.new" >/etc/hosts
    fi
    say "down ($DIR kept for its logs)"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    env) env_line ;;
    *) echo "usage: $0 up [NODES] [--unresolvable] | down | env" >&2; exit 2 ;;
esac
