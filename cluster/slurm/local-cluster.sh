#!/usr/bin/env bash
# A one-node SLURM cluster in a folder, for tests and trying the cluster route on one machine.
#
#   cluster/slurm/local-cluster.sh up DIR     start munged, slurmctld and slurmd (as root); prints the export line
#   cluster/slurm/local-cluster.sh down DIR   stop them (the folder stays; remove it yourself)
#   cluster/slurm/local-cluster.sh status DIR whether it is up
#
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge.
# Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in DIR; free TCP ports are
# picked at start, so several clusters (one per test run) can run side by side. The node has this machine's
# CPUs and memory; proctrack/linuxproc and task/none need no cgroups, so it runs in containers.
set -euo pipefail

usage() { echo "usage: $0 up|down|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf

die() { echo "error: $*" >&2; exit 1; }

free_port() {  # a TCP port nobody listens on now
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

stop_pidfile() {  # stop the daemon whose pid is in $1, wait for it to end
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

case "$cmd" in
up)
  [ "$(id -u)" = 0 ] || die "the local cluster runs its daemons as root (run as root)"
  for b in munged mungekey slurmctld slurmd sbatch; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] ||
      die "$b not found: apt-get install slurmctld slurmd slurm-client munge"
  done
  export PATH=$PATH:/usr/sbin
  if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    echo "export SLURM_CONF=$conf"; exit 0
  fi
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
  chmod 700 "$dir/munge"
  [ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null 2>&1 ||
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" \
    >>"$dir/log/munged.log" 2>&1 || die "munged did not start (see $dir/log/munged.log)"
  host=$(hostname -s)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc honours OMP_NUM_THREADS: not the node's CPUs
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
  cat >"$conf" <<CONF
# written by cluster/slurm/local-cluster.sh: a one-node cluster in $dir
ClusterName=igdlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=100000
DependencyParameters=kill_invalid_depend
ReturnToService=2
MinJobAge=3600
MaxArraySize=10001
KillWait=2
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  export SLURM_CONF=$conf
  slurmctld -f "$conf" -i || die "slurmctld did not start (see $dir/log/slurmctld.log)"
  slurmd -f "$conf" -N "$host" || die "slurmd did not start (see $dir/log/slurmd.log)"
  for _ in $(seq 150); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
    case "$state" in idle|mixed|allocated) echo "export SLURM_CONF=$conf"; exit 0 ;; esac
    sleep 0.2
  done
  die "the node did not become idle within 30 s (state '${state:-?}'; see $dir/log/slurmctld.log and slurmd.log)"
  ;;
down)
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
  ;;
status)
  [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null && echo up && exit 0
  echo down; exit 1
  ;;
*) usage ;;
esac
