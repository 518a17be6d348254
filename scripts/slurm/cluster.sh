#!/usr/bin/env bash
# A real one-node Slurm cluster for the Slurm executor's tests: munged, slurmctld and slurmd from Debian's
# packages, run as root without systemd, everything (config, state, logs, sockets) in one folder.
#
#   scripts/slurm/cluster.sh start [DIR]   start it (idempotent); prints `export SLURM_CONF=...`
#   scripts/slurm/cluster.sh stop  [DIR]   stop every daemon it started and remove DIR
#   scripts/slurm/cluster.sh status [DIR]  exit 0 when the node is idle and accepts jobs
#
# DIR defaults to $MPCS_SLURM_DIR or /tmp/mpcs-slurm. The node claims 16 CPUs (whatever the machine has: tests run
# many small jobs at once) and eight fake GPUs (character devices, as gres.conf requires), so jobs asking for
# GPUs get CUDA_VISIBLE_DEVICES. No accounting by default (no slurmdbd): the executor must work with squeue alone.
# With MPCS_SLURM_ACCOUNTING=1, a MariaDB server and slurmdbd run too (in DIR), so `sacct` answers, and
# finished jobs leave squeue after MinJobAge = MPCS_SLURM_MIN_JOB_AGE seconds (default 300).
# Install first: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge
#   (and for accounting: slurmdbd mariadb-server)
set -euo pipefail

cmd=${1:-}
dir=${2:-${MPCS_SLURM_DIR:-/tmp/mpcs-slurm}}
host=$(hostname -s)
# Ports of our own, so a real Slurm on the machine (default 6817/6818) is not disturbed.
ctld_port=${MPCS_SLURM_CTLD_PORT:-16817}
slurmd_port=${MPCS_SLURM_D_PORT:-16818}
dbd_port=${MPCS_SLURM_DBD_PORT:-16819}
db_port=${MPCS_SLURM_DB_PORT:-16820}
accounting=${MPCS_SLURM_ACCOUNTING:-0}
min_job_age=${MPCS_SLURM_MIN_JOB_AGE:-300}

need() {
  for tool in munged slurmctld slurmd sbatch squeue scancel sinfo; do
    command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 2; }
  done
  if [ "$accounting" = 1 ]; then
    for tool in slurmdbd mariadbd mariadb-install-db sacct sacctmgr; do
      command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is not installed (apt-get install slurmdbd mariadb-server)" >&2; exit 2; }
    done
  fi
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: the daemons must be started as root" >&2; exit 2; }
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  # The package makes a key on install; a machine that lost it gets a fresh one (one node: any key will do).
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p "$dir"/{state,spool,log,munge,gpu}
  chown slurm:slurm "$dir/state" "$dir/log"
  chown munge:munge "$dir/munge"
  chmod 755 "$dir/munge"
  for i in 0 1 2 3 4 5 6 7; do [ -e "$dir/gpu/fakegpu$i" ] || mknod "$dir/gpu/fakegpu$i" c 1 3; done
  cat > "$dir/slurm.conf" <<EOF
ClusterName=mpcs-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (default 120 s); tests requeue jobs.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
# Memory limits enforced without cgroups: slurmstepd samples each step's memory every second and kills a
# step over its --mem (the job ends FAILED, its output saying so), as on clusters without cgroup enforcement.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
$(if [ "$accounting" = 1 ]; then
    # With munge, the "password" is the munge socket (for slurmctld and the clients, sacct included).
    printf 'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\nAccountingStoragePort=%s\nAccountingStoragePass=%s\n' "$dbd_port" "$dir/munge/munge.socket"
  else
    echo AccountingStorageType=accounting_storage/none
  fi)
MinJobAge=$min_job_age
KillWait=2
SchedulerParameters=sched_interval=1
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=16 RealMemory=32000 Gres=gpu:fake:8 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$dir/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu Type=fake File=$dir/gpu/fakegpu[0-7]
EOF
}

# MariaDB (its own data folder, TCP on 127.0.0.1 only) and slurmdbd, for `sacct`.
start_accounting() {
  mkdir -p "$dir/db"
  if [ ! -d "$dir/db/data/mysql" ]; then
    mariadb-install-db --user=root --datadir="$dir/db/data" --skip-test-db >"$dir/log/mariadb-install.log" 2>&1
  fi
  if ! pid_alive "$dir/db/mariadb.pid"; then
    mariadbd --user=root --datadir="$dir/db/data" --socket="$dir/db/mysql.sock" --port="$db_port" \
      --bind-address=127.0.0.1 --pid-file="$dir/db/mariadb.pid" --log-error="$dir/log/mariadb.log" \
      --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  fi
  for _ in $(seq 1 60); do
    mariadb --socket="$dir/db/mysql.sock" -e 'select 1' >/dev/null 2>&1 && break
    sleep 0.25
  done
  mariadb --socket="$dir/db/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'mpcs-test';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || { echo "cluster.sh: MariaDB did not start; see $dir/log/mariadb.log" >&2; return 1; }
  cat > "$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=mpcs-test
StorageLoc=slurm_acct_db
PidFile=$dir/state/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
CONF
  # slurmdbd runs as the SlurmUser of slurmctld (it accepts job records from that user only), reads its
  # configuration beside $SLURM_CONF, and wants it private.
  chown slurm:slurm "$dir/slurmdbd.conf"
  chmod 600 "$dir/slurmdbd.conf"
  pid_alive "$dir/state/slurmdbd.pid" || slurmdbd
  for _ in $(seq 1 40); do
    timeout 5 sacctmgr -n list cluster format=cluster 2>/dev/null | grep -q mpcs-test && return 0
    timeout 5 sacctmgr -i add cluster mpcs-test >/dev/null 2>&1 || true
    sleep 0.25
  done
  echo "cluster.sh: slurmdbd did not answer; see $dir/log/slurmdbd.log" >&2
  return 1
}

start() {
  need
  write_config
  export SLURM_CONF=$dir/slurm.conf
  if ! pid_alive "$dir/munge/munged.pid"; then
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
      --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed" --force
  fi
  if [ "$accounting" = 1 ]; then start_accounting; fi
  pid_alive "$dir/slurmctld.pid" || slurmctld -f "$dir/slurm.conf"
  pid_alive "$dir/slurmd.pid" || slurmd -f "$dir/slurm.conf"
  # Bounded wait for the node to accept jobs.
  for _ in $(seq 1 60); do
    if status >/dev/null 2>&1; then
      echo "export SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.5
  done
  echo "cluster.sh: the node did not become idle in 30 s; logs in $dir/log" >&2
  sinfo -N >&2 || true
  return 1
}

status() {
  export SLURM_CONF=$dir/slurm.conf
  [ -f "$SLURM_CONF" ] || return 1
  local state
  state=$(timeout 5 sinfo -h -N -o "%T" 2>/dev/null | head -1)
  case "$state" in idle|mixed|allocated) return 0 ;; *) return 1 ;; esac
}

stop() {
  [ -d "$dir" ] || return 0
  export SLURM_CONF=$dir/slurm.conf
  scancel --quiet --full -u root 2>/dev/null || true
  # Bounded wait for the cancelled jobs to end, so their slurmstepd processes exit with them.
  for _ in $(seq 1 20); do
    [ -z "$(timeout 5 squeue -h -t pending,running,completing -o %i 2>/dev/null)" ] && break
    sleep 0.25
  done
  # munged writes its pid file in its own folder (it runs as the munge user).
  pids=("$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/state/slurmdbd.pid" "$dir/db/mariadb.pid" "$dir/munge/munged.pid")
  for f in "${pids[@]}"; do
    if pid_alive "$f"; then
      kill "$(cat "$f")" 2>/dev/null || true
    fi
  done
  # Bounded wait for them to go, then force.
  for _ in $(seq 1 40); do
    alive=0
    for f in "${pids[@]}"; do pid_alive "$f" && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.25
  done
  for f in "${pids[@]}"; do
    pid_alive "$f" && kill -9 "$(cat "$f")" 2>/dev/null || true
  done
  # A job step still ending when its slurmd went keeps a slurmstepd alive: find those of this cluster by the
  # files they hold open in DIR (its slurmd log) and end them.
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    if ls -l "$p/fd" 2>/dev/null | grep -q -- "$dir/"; then kill -9 "${p#/proc/}" 2>/dev/null || true; fi
  done
  rm -rf "$dir"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
