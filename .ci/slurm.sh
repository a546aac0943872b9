#!/usr/bin/env bash
# A throw-away single-node Slurm on this machine, for the tests of `--engine slurm`.
#
#   .ci/slurm.sh install     as root: apt-get install Debian's slurm-wlm and munge (if missing)
#   .ci/slurm.sh up DIR      install if needed, then start munged, slurmctld and slurmd with all
#                            their state, logs and sockets under DIR; waits until the node is idle
#                            and prints SLURM_CONF=DIR/slurm.conf (export it for sbatch/squeue)
#   .ci/slurm.sh down DIR    stop the daemons `up DIR` started, by the pids it recorded
#
# No system configuration is touched: the munge key, slurm.conf and every state folder live in DIR,
# so a machine's own Slurm or munge (if any) is left alone. No cgroups: processes are tracked with
# proctrack/linuxproc and tasks are not bound (task/none). `up` stops what it started if any step
# fails, and exits non-zero with one line saying why.
set -euo pipefail

die() { echo "slurm.sh: $*" >&2; exit 1; }

install_packages() {
  if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
     && command -v munged >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "installing slurm-wlm and munge needs root"
  command -v apt-get >/dev/null 2>&1 || die "no apt-get to install slurm-wlm and munge"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Processes started for this cluster that are not in the pid file: job steps (slurmstepd and what
# they run), which slurmd starts detached. They all carry this cluster's SLURM_CONF, a path no other
# cluster has, in their environment.
cluster_pids() {
  local conf="SLURM_CONF=$1/slurm.conf" pid
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    case "$pid" in "$$" | "$BASHPID" | "$PPID") continue ;; esac
    if grep -qzxF "$conf" "/proc/$pid/environ" 2>/dev/null; then echo "$pid"; fi
  done
}

stop_all() {
  local dir=$1 pid
  [ -f "$dir/pids" ] || return 0
  # Cancel what is left and let the steps report back (they need munged, slurmd and slurmctld up),
  # so that no slurmstepd outlives the daemons retrying to reach them.
  if [ -f "$dir/slurm.conf" ] && kill -0 "$(sed -n 2p "$dir/pids")" 2>/dev/null; then
    local jobs
    jobs=$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %A 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$jobs" ] || SLURM_CONF="$dir/slurm.conf" scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 60); do
      [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  # Reverse start order: slurmd, slurmctld, munged. TERM first, KILL whatever is left after 10 s.
  for pid in $(tac "$dir/pids"); do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 1 100); do
    local alive=0
    for pid in $(cat "$dir/pids"); do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in $(cat "$dir/pids"); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in $(cluster_pids "$dir"); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$dir/pids"
}

up() {
  local dir
  dir=$(mkdir -p "$1" && cd "$1" && pwd)
  [ "$(id -u)" = 0 ] || die "starting slurmd needs root"
  install_packages
  [ ! -f "$dir/pids" ] || die "$dir already has running daemons (run: $0 down $dir)"
  trap 'stop_all "$dir"' ERR
  local host ctld_port slurmd_port
  host=$(hostname -s)
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
  chmod 0700 "$dir/munge"
  : >"$dir/pids"

  # munge: a fresh key and a private socket, so the machine's own munge (if any) is not involved.
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$dir/munge/munge.key"
  munged --force --foreground --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" \
    --log-file="$dir/munge/munged.log" >>"$dir/munge/munged.out" 2>&1 &
  echo $! >>"$dir/pids"
  for _ in $(seq 1 50); do [ -S "$dir/munge/munge.socket" ] && break; sleep 0.1; done
  [ -S "$dir/munge/munge.socket" ] || { stop_all "$dir"; die "munged did not start: $(tail -1 "$dir/munge/munged.log" 2>/dev/null)"; }

  cat >"$dir/slurm.conf" <<EOF
ClusterName=illusions-test
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  # SLURM_CONF goes to the daemons' environments (and so to every job step's), not this script's:
  # `down` finds stray steps by it.
  local conf="$dir/slurm.conf"
  SLURM_CONF="$conf" slurmctld -D -i -f "$conf" >>"$dir/slurmctld.out" 2>&1 &
  echo $! >>"$dir/pids"
  SLURM_CONF="$conf" slurmd -D -f "$conf" >>"$dir/slurmd.out" 2>&1 &
  echo $! >>"$dir/pids"

  # Idle within 60 s, or give up saying what the daemons logged last.
  local state=""
  for _ in $(seq 1 120); do
    state=$(SLURM_CONF="$conf" sinfo -h -N -n "$host" -o %t 2>/dev/null | head -1 || true)
    [ "$state" = idle ] && break
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    local why
    why=$(tail -1 "$dir/slurmd.log" 2>/dev/null || tail -1 "$dir/slurmctld.log" 2>/dev/null || true)
    stop_all "$dir"
    die "node $host is not idle after 60 s (state '${state:-none}'); slurmd: ${why:-no log}"
  fi
  trap - ERR
  echo "SLURM_CONF=$conf"
}

case "${1:-}" in
  install) install_packages ;;
  up) [ $# = 2 ] || die "usage: $0 up DIR"; up "$2" ;;
  down) [ $# = 2 ] || die "usage: $0 down DIR"; stop_all "$2" ;;
  *) die "usage: $0 install | up DIR | down DIR" ;;
esac
