#!/usr/bin/env bash
# Stop the daemons tests/cluster/start-slurm.sh started (slurmd, slurmctld, munged).
# Keeps config, munge key and state, so start-slurm.sh brings the same cluster back.
set -euo pipefail

log() { echo "[stop-slurm] $*"; }

# Live (non-zombie) pids of a daemon: exited daemons may linger as zombies where pid 1 does not reap.
live_pids() { ps -C "$1" -o pid=,stat= | awk '$2 !~ /^Z/ {print $1}' || true; }

stop_daemon() {
    local name=$1 pids
    pids=$(live_pids "$name")
    if [[ -z "$pids" ]]; then
        log "$name not running"
        return 0
    fi
    log "stopping $name ($pids)"
    # shellcheck disable=SC2086  # one word per pid
    kill $pids
    for _ in $(seq 100); do [[ -z "$(live_pids "$name")" ]] && return 0; sleep 0.1; done
    log "WARNING: $name ($pids) still running after 10 s"
}

stop_daemon slurmd
stop_daemon slurmctld
stop_daemon munged
