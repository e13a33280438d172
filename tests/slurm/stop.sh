#!/usr/bin/env bash
# Stop the daemons that start.sh recorded in STATE_DIR/pids/ (and only those), newest first.
# Usage: stop.sh STATE_DIR. Bounded: gives up after ~1 min.
set -euo pipefail

STATE=${1:?usage: stop.sh STATE_DIR (the folder given to or printed by start.sh)}
PIDS=$STATE/pids
[[ -d $PIDS ]] || exit 0

log() { echo "stop.sh: $*" >&2; }

# alive PID COMM: the process exists, is not a zombie, and is still the daemon we started.
# (PID 1 here reaps late, so a dead daemon can linger as a zombie and `kill -0` would succeed.)
alive() {
    local stat state
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [[ $state != Z && $state != X ]] && [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]
}

# stop NAME: SIGTERM, wait up to 20 s, then SIGKILL and wait up to 5 s more.
stop() {
    local file=$PIDS/$1.pid pid comm
    [[ -f $file ]] || return 0
    read -r pid comm <"$file"
    if alive "$pid" "$comm"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while alive "$pid" "$comm" && ((SECONDS < deadline)); do sleep 0.2; done
        if alive "$pid" "$comm"; then
            log "$1 (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 5))
            while alive "$pid" "$comm" && ((SECONDS < deadline)); do sleep 0.2; done
            if alive "$pid" "$comm"; then
                log "ERROR: $1 (pid $pid) still running"
                return 1
            fi
        fi
    fi
    rm -f "$file"
}

# Cancel the cluster's jobs first so that no job step outlives its slurmd.
if [[ -f $PIDS/slurmctld.pid ]] && alive $(cat "$PIDS/slurmctld.pid"); then
    export SLURM_CONF=$STATE/etc/slurm.conf
    if [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]]; then
        timeout 10 scancel --user="$(id -un)" || true
        deadline=$((SECONDS + 15))
        while [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do
            sleep 0.5
        done
    fi
fi

status=0
for file in "$PIDS"/slurmd-*.pid; do
    [[ -e $file ]] || continue
    name=${file##*/}
    stop "${name%.pid}" || status=1
done
for name in slurmctld slurmdbd mariadb munged; do
    stop "$name" || status=1
done
exit $status
