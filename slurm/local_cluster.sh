#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's slurm-wlm and munge packages, to try sweeps
# (and run the SLURM tests) before submitting to a real cluster.
#
#   sudo slurm/local_cluster.sh start     # idempotent: starts munged, slurmctld, slurmd; waits until the node is idle
#   sudo slurm/local_cluster.sh status    # daemons, node state, the config in use
#   sudo slurm/local_cluster.sh stop      # stops the daemons (the state folder is kept; `stop --purge` removes it)
#
# One partition `cpu` (the default) with this machine's cores and 80% of its memory; no GPUs, no accounting
# database (sacct does not work: submitit then follows jobs by their result files). The config, state, spool
# and logs live in $NEUROGUIDE_SLURM_DIR (default /tmp/neuroguide-slurm). SLURM commands find the config through
# /etc/slurm/slurm.conf, linked to ours when that file does not exist; otherwise `export SLURM_CONF=...` as printed.
set -euo pipefail

DIR="${NEUROGUIDE_SLURM_DIR:-/tmp/neuroguide-slurm}"
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
HOST="$(hostname -s)"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (the daemons run as root and munged needs its key in /etc/munge); try: sudo $0 $*"
}

need_packages() {
  local missing=()
  for b in slurmctld slurmd munged sbatch scontrol; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}: install Debian's packages first: apt-get install -y slurm-wlm munge"
}

write_conf() {
  local cpus mem
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat > "$CONF.tmp" <<EOF
# written by slurm/local_cluster.sh: a one-node cluster for trying sweeps
ClusterName=neuroguide-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# time limits are checked every 30 s; a job's signal (--signal) comes at most this late
InactiveLimit=0
KillWait=10
MinJobAge=60
OverTimeLimit=0
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.tmp" "$CONF"
  if [ ! -e "$ETC_CONF" ] || [ "$(readlink "$ETC_CONF" || true)" = "$CONF" ]; then
    mkdir -p /etc/slurm
    ln -sfn "$CONF" "$ETC_CONF"
  fi
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged --force
}

conf_hint() {
  if [ "$(readlink "$ETC_CONF" 2>/dev/null || true)" != "$CONF" ]; then
    echo "note: $ETC_CONF belongs to another setup; use this cluster with: export SLURM_CONF=$CONF"
  fi
}

cmd_start() {
  need_root start; need_packages
  start_munge
  write_conf
  export SLURM_CONF="$CONF"
  running "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  running "$DIR/slurmd.pid" || slurmd -f "$CONF"
  for _ in $(seq 1 60); do
    if scontrol show node "$HOST" 2>/dev/null | grep -qE "State=(IDLE|MIXED|ALLOCATED)"; then
      echo "local SLURM cluster up: node $HOST, partition cpu ($(nproc) CPUs); config $CONF"
      conf_hint
      return 0
    fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  die "the node did not become idle in 30 s; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

cmd_stop() {
  need_root stop
  for p in slurmd slurmctld; do
    if running "$DIR/$p.pid"; then kill "$(cat "$DIR/$p.pid")"; fi
  done
  for _ in $(seq 1 20); do
    running "$DIR/slurmd.pid" || running "$DIR/slurmctld.pid" || break
    sleep 0.25
  done
  if [ "${1:-}" = "--purge" ]; then
    [ "$(readlink "$ETC_CONF" 2>/dev/null || true)" = "$CONF" ] && rm -f "$ETC_CONF"
    rm -rf "$DIR"
  fi
  echo "local SLURM cluster stopped"
}

cmd_status() {
  need_packages
  for p in slurmctld slurmd; do
    if running "$DIR/$p.pid"; then echo "$p: running (pid $(cat "$DIR/$p.pid"))"; else echo "$p: stopped"; fi
  done
  if pgrep -x munged >/dev/null; then echo "munged: running"; else echo "munged: stopped"; fi
  if running "$DIR/slurmctld.pid"; then SLURM_CONF="$CONF" sinfo; fi
  echo "config: $CONF"
  conf_hint
}

case "${1:-}" in
  start) cmd_start ;;
  stop) shift; cmd_stop "${1:-}" ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop [--purge]|status" >&2; exit 2 ;;
esac
