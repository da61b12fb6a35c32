#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged + slurmctld + slurmd on localhost), used by
# `.ci/run` and the `slurm` tests to run the job scripts in slurm/ against a real scheduler.
#
#   slurm/local-cluster.sh install   apt-get install SLURM (Debian's slurm-wlm: slurmctld, slurmd,
#                                    slurm-client) and munge, when missing (root, Debian/Ubuntu)
#   slurm/local-cluster.sh start     write slurm.conf for this host, start the daemons that are
#                                    not running, wait until `sinfo` shows the node usable
#   slurm/local-cluster.sh stop      stop the daemons that `start` started (by their recorded pids)
#   slurm/local-cluster.sh status    exit 0 when the scheduler answers and the node is usable
#
# Idempotent: `start` on a running cluster only checks it; `stop` leaves alone daemons it did not
# start. It never overwrites a slurm.conf it did not write. Needs root (the daemons run as root).
# Exit codes: 0 ok; 3 SLURM/munge binaries missing (callers skip); 1 anything else.
#
# Variables: SLURM_CONF (default /etc/slurm/slurm.conf), LOCAL_SLURM_STATE (default
# /run/foundation-local-slurm: pid records and the daemons' logs are in /var/log/slurm),
# LOCAL_SLURM_TIMEOUT (seconds to wait for the node, default 60), LOCAL_SLURM_REQUEUE_DELAY
# (seconds a requeued job waits before it may start again; SLURM's default is 120, ours 10).
set -euo pipefail

CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
STATE=${LOCAL_SLURM_STATE:-/run/foundation-local-slurm}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
REQUEUE_DELAY=${LOCAL_SLURM_REQUEUE_DELAY:-10}
MARKER="# written by foundation slurm/local-cluster.sh"
HOST=$(hostname -s)

log() { echo "local-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

have_binaries() {
    command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sinfo >/dev/null && command -v sbatch >/dev/null
}

# The node's state as sinfo reports it (idle, mixed, allocated, down*, ...), or nothing. (`scontrol
# ping` answers at once; sinfo retries for ~10 s when no controller runs.)
node_state() {
    [[ "$(timeout 10 scontrol ping 2>/dev/null || true)" == *" is UP"* ]] || return 0
    timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | awk 'NR == 1' || true
}

node_usable() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# pid of a running daemon from its pid file, if that process is alive and is that daemon.
running_pid() {
    local name=$1 pidfile=$2 pid
    [ -r "$pidfile" ] || return 1
    pid=$(tr -dc 0-9 <"$pidfile")
    pid_alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && echo "$pid"
}

cmd_install() {
    if have_binaries; then
        log "slurm-wlm and munge already installed ($(sinfo --version))"
        return 0
    fi
    command -v apt-get >/dev/null || { log "apt-get not found: install slurm-wlm and munge yourself"; exit 3; }
    [ "$(id -u)" = 0 ] || { log "installing needs root"; exit 3; }
    # The parts of Debian's slurm-wlm this needs (the metapackage adds many unused plugins).
    local packages=(slurmctld slurmd slurm-client munge)
    log "installing ${packages[*]} with apt-get"
    timeout 300 apt-get update -q >/dev/null || { log "apt-get update failed"; exit 3; }
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends "${packages[@]}" \
        >/dev/null || { log "apt-get install ${packages[*]} failed"; exit 3; }
    have_binaries || { log "slurm-wlm installed but its binaries are not on PATH"; exit 3; }
    log "installed $(sinfo --version)"
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it" \
            "(use SLURM_CONF=/some/other/slurm.conf, or remove it)"
    fi
    # slurmd -C prints this machine's real node line (CPUs, sockets, cores, threads, memory).
    local node
    node=$(slurmd -C | head -n1)
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this node: $node"
    mkdir -p "$(dirname "$CONF")" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    local tmp="$CONF.tmp.$$"
    cat >"$tmp" <<CONF
$MARKER for a one-node test cluster on $HOST
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s): short for tests.
AuthInfo=cred_expire=$REQUEUE_DELAY
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (defaults: 60 s, backfill 30 s), so that a requeued job
# starts as soon as it is eligible again.
SchedulerParameters=sched_interval=2,bf_interval=5
# Cores only: tracking memory without a default would give every job the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
${node} State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    mv "$tmp" "$CONF"
    CONF_CHANGED=1
    log "wrote $CONF ($node)"
}

start_munge() {
    if echo | timeout 5 munge 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -f /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey -c; else
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        fi
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 400 /etc/munge/munge.key
    # --force: munged refuses to start over a stale socket or a log it does not own otherwise.
    runuser -u munge -- /usr/sbin/munged --force 2>/dev/null || /usr/sbin/munged --force
    local pid
    pid=$(running_pid munged /run/munge/munged.pid) || die "munged did not start"
    echo "$pid" >"$STATE/munged.pid"
    log "started munged (pid $pid)"
}

start_daemon() {
    local name=$1 pidfile=$2 pid
    if pid=$(running_pid "$name" "$pidfile"); then
        return 0
    fi
    "/usr/sbin/$name"
    for _ in $(seq 50); do
        pid=$(running_pid "$name" "$pidfile") && break
        sleep 0.1
    done
    [ -n "${pid:-}" ] || die "$name did not start; see /var/log/slurm/$name.log"
    echo "$pid" >"$STATE/$name.pid"
    log "started $name (pid $pid)"
}

cmd_start() {
    have_binaries || { log "slurm-wlm/munge not installed (run: $0 install)"; exit 3; }
    [ "$(id -u)" = 0 ] || die "starting the daemons needs root"
    mkdir -p "$STATE"
    CONF_CHANGED=0
    write_conf
    start_munge
    local was_running=0
    running_pid slurmctld /run/slurmctld.pid >/dev/null && was_running=1
    start_daemon slurmctld /run/slurmctld.pid
    start_daemon slurmd /run/slurmd.pid
    if [ "$CONF_CHANGED" = 1 ] && [ "$was_running" = 1 ]; then
        scontrol reconfigure >/dev/null 2>&1 || true
    fi
    local waited=0 state
    while ! node_usable; do
        state=$(node_state)
        # A node that was down (e.g. the daemons were restarted) is put back in service.
        case "$state" in
            down* | drain* | fail*)
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                ;;
        esac
        [ "$waited" -lt "$((TIMEOUT * 2))" ] || die "node $HOST not usable after ${TIMEOUT}s (state: ${state:-none}); see /var/log/slurm/"
        sleep 0.5
        waited=$((waited + 1))
    done
    log "up: $(sinfo -h -o '%P %a %D %T %c' | awk 'NR == 1') (cpus), $(sinfo --version)"
}

stop_recorded() {
    local name=$1 record="$STATE/$1.pid" pid
    [ -f "$record" ] || return 0
    pid=$(tr -dc 0-9 <"$record")
    rm -f "$record"
    if pid_alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill -TERM "$pid"
        for _ in $(seq 100); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then kill -KILL "$pid"; fi
        log "stopped $name (pid $pid)"
    fi
}

cmd_stop() {
    stop_recorded slurmd
    stop_recorded slurmctld
    stop_recorded munged
}

cmd_status() {
    if ! have_binaries; then
        log "not installed"
        exit 3
    fi
    if node_usable; then
        echo "up: $(sinfo -h -N -n "$HOST" -o '%N %P %T cpus=%c')"
    else
        local state
        state=$(node_state)
        echo "down (${state:+node $HOST is $state}${state:-no slurmctld answers})"
        exit 1
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 install|start|stop|status" >&2
        exit 2
        ;;
esac
