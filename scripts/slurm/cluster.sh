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
# GPUs get CUDA_VISIBLE_DEVICES. No accounting (no slurmdbd): the executor must work with squeue alone.
# Install first: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge
set -euo pipefail

cmd=${1:-}
dir=${2:-${MPCS_SLURM_DIR:-/tmp/mpcs-slurm}}
host=$(hostname -s)
# Ports of our own, so a real Slurm on the machine (default 6817/6818) is not disturbed.
ctld_port=${MPCS_SLURM_CTLD_PORT:-16817}
slurmd_port=${MPCS_SLURM_D_PORT:-16818}

need() {
  for tool in munged slurmctld slurmd sbatch squeue scancel sinfo; do
    command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 2; }
  done
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
AuthInfo=socket=$dir/munge/munge.socket
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
DefMemPerCPU=200
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=300
KillWait=2
SchedulerParameters=sched_interval=1
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 Gres=gpu:fake:8 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$dir/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu Type=fake File=$dir/gpu/fakegpu[0-7]
EOF
}

start() {
  need
  write_config
  export SLURM_CONF=$dir/slurm.conf
  if ! pid_alive "$dir/munge/munged.pid"; then
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
      --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed" --force
  fi
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
  # munged writes its pid file in its own folder (it runs as the munge user).
  pids=("$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid")
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
  rm -rf "$dir"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
