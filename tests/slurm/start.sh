#!/usr/bin/env bash
# Start a real single-machine SLURM cluster (munge, MariaDB, slurmdbd, slurmctld and two slurmd
# nodes) with every file under STATE_DIR; prints `export SLURM_CONF=...` on stdout when ready.
# Usage: start.sh [STATE_DIR]   (default: a new private /tmp/pic-slurm.XXXXXX; must run as root;
# see install.sh). A cluster left running from the same STATE_DIR is stopped first.
# Private per STATE_DIR: the daemons' ports (free ones, chosen here), munged's socket, the
# database and every state, pid and log file, so that two clusters run side by side.
set -euo pipefail

STATE=${1:-$(mktemp -d /tmp/pic-slurm.XXXXXX)}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=pic
PARTITION=debug
# Node names: the short hostname and `localhost`, both on 127.0.0.1, so that the first node's
# name (MASTER_ADDR under SLURM) resolves and both slurmd fit on one machine.
NODE_A=$(hostname -s)
NODE_B=localhost

log() { echo "start.sh: $*" >&2; }

# show_log FILE: its error lines (a daemon's cause often lies far above its last lines, as in
# mariadb-install-db's log), then its tail.
show_log() {
    [[ -f $1 ]] || return 0
    if grep -q -E '\[ERROR\]|[Ee]rror' "$1"; then
        echo "----- error lines of $1 -----" >&2
        grep -E -m 20 '\[ERROR\]|[Ee]rror' "$1" >&2
    fi
    echo "----- last lines of $1 -----" >&2
    tail -n 25 "$1" >&2
}

# fail MESSAGE [LOG...]: print the message, each log (show_log), and the free disk and memory
# (a full disk or a memory limit is the usual cause of a daemon that works elsewhere); exit 1.
fail() {
    log "ERROR: $1"
    shift
    for f in "$@"; do show_log "$f"; done
    echo "----- free disk of $STATE and memory -----" >&2
    df -h "$STATE" >&2 || true
    free -m >&2 || true
    exit 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port VAR: set VAR to a port nobody listens on, below Linux's ephemeral range (32768+) so
# that no outgoing connection takes it meanwhile, and not one this script already chose.
CHOSEN=" "
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 12000))
        if [[ $CHOSEN != *" $port "* ]] && ! port_open "$port"; then
            CHOSEN+="$port "
            printf -v "$1" '%s' "$port"
            return 0
        fi
    done
    return 1
}

# wait_until SECONDS COMMAND...: poll COMMAND every 0.2 s; non-zero status on timeout.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# record NAME COMM PIDFILE: copy the daemon's pid into STATE/pids/NAME.pid as "PID COMM"; stop.sh
# checks COMM against /proc before signalling, so a recycled pid is never killed.
record() {
    local name=$1 comm=$2 pidfile=$3 pid
    wait_until 10 test -s "$pidfile" || return 1
    pid=$(tr -d '[:space:]' <"$pidfile")
    echo "$pid $comm" >"$STATE/pids/$name.pid"
}

[[ $(id -u) -eq 0 ]] || fail "must run as root (slurmd and SlurmUser=root need it)"
[[ $NODE_A != "$NODE_B" ]] || fail "hostname -s is '$NODE_B'; set a different hostname"
for bin in munged mariadbd slurmdbd slurmctld slurmd; do
    [[ -x /usr/sbin/$bin ]] || fail "/usr/sbin/$bin not found: run $HERE/install.sh first"
done

mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)  # absolute: the configs and daemons need it
# The database, spools and logs take ~40 MB: a fuller disk is named here, not left to a daemon.
FREE_MB=$(df -Pm "$STATE" | awk 'NR == 2 {print $4}')
((FREE_MB >= 100)) || fail "only $FREE_MB MB free on the filesystem of $STATE; the cluster needs \
about 100 MB"
bash "$HERE/stop.sh" "$STATE"
# A failed start leaves nothing running; its logs stay in STATE_DIR/log.
trap 'if (($? != 0)); then bash "$HERE/stop.sh" "$STATE" || true; fi' EXIT
# Only the folders this script creates are wiped, never STATE_DIR itself.
rm -rf "${STATE:?}"/{etc,log,pids,run,spool,mysql,munge,ports}
mkdir -p "$STATE"/{etc,log,pids,run,spool/ctld,munge}
# munged (user munge) must reach its socket folder, and refuses one others may write to.
chmod 755 "$STATE"
chown munge:munge "$STATE/munge"
runuser -u munge -- test -w "$STATE/munge" || fail "user munge cannot enter $STATE/munge: choose \
a STATE_DIR whose parent folders everyone may enter (e.g. one under /tmp), or give none"
LOGS=$STATE/log

for name in CTLD_PORT NODE_A_PORT NODE_B_PORT DBD_PORT DB_PORT; do
    free_port "$name" || fail "found no free port on 127.0.0.1 for $name"
done
# Between this check and the daemons' bind another program may take a port: that daemon then
# fails to start, and says so in its log.
printf 'slurmctld %s\nslurmd-%s %s\nslurmd-%s %s\nslurmdbd %s\nmariadb %s\n' "$CTLD_PORT" \
    "$NODE_A" "$NODE_A_PORT" "$NODE_B" "$NODE_B_PORT" "$DBD_PORT" "$DB_PORT" >"$STATE/ports"
MUNGE_SOCKET=$STATE/munge/munge.socket

# Each emulated node claims the whole machine; jobs must fit in one node's share. nproc
# reports OMP_NUM_THREADS instead when it is set (OMP_NUM_THREADS=1 gave 1-CPU nodes that
# refuse every 2-task job), so it is asked without it.
NODE_CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
NODE_MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
export SLURM_CONF=$STATE/etc/slurm.conf
cat >"$SLURM_CONF" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$NODE_A(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# This cluster's own munged; every daemon and client command (through SLURM_CONF) uses it.
# Shortest credential lifetime slurmctld accepts (5 s): a requeued job is held for it plus 1 s
# before it may start again (~2 min with the default). The main scheduling loop every second
# (default 60 s) starts it as soon as that hold ends.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# With slurmdbd, the munge socket for talking to it (AuthInfo's does not apply there).
AccountingStoragePass=$MUNGE_SOCKET
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Both nodes share this machine's hardware; do not let slurmd compare it with the config.
SlurmdParameters=config_overrides
NodeName=$NODE_A NodeAddr=127.0.0.1 Port=$NODE_A_PORT CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB
NodeName=$NODE_B NodeAddr=127.0.0.1 Port=$NODE_B_PORT CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB
PartitionName=$PARTITION Nodes=$NODE_A,$NODE_B Default=YES MaxTime=INFINITE State=UP
CONF

# slurmdbd finds slurmdbd.conf next to $SLURM_CONF; it must be private to SlurmUser.
DBD_CONF=$STATE/etc/slurmdbd.conf
cat >"$DBD_CONF" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$NODE_A
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
CONF
chmod 600 "$DBD_CONF"

# munged: one per cluster, on its own socket (the machine's shared key), so that stopping this
# cluster never pulls authentication from under another one or from a system munged.
runuser -u munge -- /usr/sbin/munged --force --socket="$MUNGE_SOCKET" \
    --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed" \
    --log-file="$STATE/munge/munged.log" || fail "munged did not start" "$STATE/munge/munged.log"
record munged munged "$STATE/munge/munged.pid" || fail "munged wrote no pid file" "$STATE/munge/munged.log"
wait_until 10 bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET' >/dev/null 2>&1" \
    || fail "munge -n | unmunge fails on $MUNGE_SOCKET" "$STATE/munge/munged.log"

# MariaDB for slurmdbd, data under STATE_DIR, TCP on 127.0.0.1 only. `setsid -f` detaches it
# from the caller's session so that Ctrl-C in a test run does not kill it half-way.
# InnoDB's defaults (a 96 MiB redo log, a 128 MiB buffer pool) are for a server; accounting for a
# test cluster fits in 8 and 32, which keeps the database at ~25 MB instead of ~115 MB. Bootstrap
# and server take the same sizes, so the server never resizes the log. A bootstrap that fails
# is retried once in a fresh folder (another apt or dpkg may have been touching MariaDB's
# files); its log is shown either way.
DB_OPTS=(--no-defaults --user=root --datadir="$STATE/mysql" --innodb-log-file-size=8M
    --innodb-buffer-pool-size=32M)
bootstrap_db() {
    rm -rf "${STATE:?}/mysql"
    mariadb-install-db "${DB_OPTS[@]}" --auth-root-authentication-method=normal --skip-test-db \
        >"$LOGS/mariadb-install.log" 2>&1
}
if ! bootstrap_db; then
    log "mariadb-install-db failed; retrying once in 5 s"
    show_log "$LOGS/mariadb-install.log"
    sleep 5
    bootstrap_db || fail "mariadb-install-db failed twice" "$LOGS/mariadb-install.log"
fi
setsid -f /usr/sbin/mariadbd "${DB_OPTS[@]}" \
    --socket="$STATE/run/mariadb.sock" --pid-file="$STATE/run/mariadb.pid" \
    --bind-address=127.0.0.1 --port=$DB_PORT --skip-name-resolve \
    --log-error="$LOGS/mariadb.log" </dev/null >/dev/null 2>&1
wait_until 30 port_open $DB_PORT || fail "MariaDB not listening on port $DB_PORT" "$LOGS/mariadb.log"
record mariadb mariadbd "$STATE/run/mariadb.pid" || fail "MariaDB wrote no pid file" "$LOGS/mariadb.log"

/usr/sbin/slurmdbd || fail "slurmdbd did not start" "$LOGS/slurmdbd.log"
record slurmdbd slurmdbd "$STATE/run/slurmdbd.pid" || fail "slurmdbd wrote no pid file" "$LOGS/slurmdbd.log"
wait_until 30 port_open $DBD_PORT || fail "slurmdbd not listening on port $DBD_PORT" "$LOGS/slurmdbd.log"
# The cluster must exist in accounting before slurmctld registers with slurmdbd.
wait_until 20 bash -c "sacctmgr -i add cluster $CLUSTER >'$LOGS/sacctmgr.log' 2>&1" \
    || fail "sacctmgr add cluster $CLUSTER failed" "$LOGS/sacctmgr.log" "$LOGS/slurmdbd.log"

/usr/sbin/slurmctld || fail "slurmctld did not start" "$LOGS/slurmctld.log"
record slurmctld slurmctld "$STATE/run/slurmctld.pid" \
    || fail "slurmctld wrote no pid file" "$LOGS/slurmctld.log"
wait_until 30 port_open $CTLD_PORT || fail "slurmctld not listening on port $CTLD_PORT" "$LOGS/slurmctld.log"

for node in "$NODE_A" "$NODE_B"; do
    /usr/sbin/slurmd -N "$node" || fail "slurmd -N $node did not start" "$LOGS/slurmd-$node.log"
    record "slurmd-$node" slurmd "$STATE/run/slurmd-$node.pid" \
        || fail "slurmd -N $node wrote no pid file" "$LOGS/slurmd-$node.log"
done

nodes_idle() { [[ $(sinfo -h -N -p $PARTITION -t idle -o '%N' 2>/dev/null | sort -u | wc -l) -eq 2 ]]; }
wait_until 60 nodes_idle || fail "nodes not idle after 60 s: $(sinfo -N 2>&1 | tr '\n' ';')" \
    "$LOGS/slurmctld.log" "$LOGS/slurmd-$NODE_A.log" "$LOGS/slurmd-$NODE_B.log"

log "cluster '$CLUSTER' up: partition $PARTITION, nodes $NODE_A and $NODE_B, state in $STATE"
echo "export SLURM_CONF=$SLURM_CONF"
echo "export PIC_SLURM_STATE=$STATE"
