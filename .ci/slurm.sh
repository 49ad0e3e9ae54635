#!/usr/bin/env bash
# A real single-host SLURM for CI and local testing: munge + slurmctld + slurmd started by hand as root
# (no systemd, no cgroups: proctrack/linuxproc, task/none), every daemon bound to 127.0.0.1.
#
#   bash .ci/slurm.sh start    install slurm-wlm + munge if missing (apt), start the daemons, wait until the
#                              node is idle, write $BASE/env and print `export SLURM_CONF=...`. Idempotent: a
#                              second start reuses the running daemons.
#   bash .ci/slurm.sh stop     stop ONLY the daemons this script started, by the PIDs it recorded.
#   bash .ci/slurm.sh status   print sinfo / squeue for this cluster.
#
# Env: VITQ_SLURM_BASE (default /tmp/vitq-slurm) holds slurm.conf, state, spool, logs and pid files.
# Tests find the cluster through $SLURM_CONF or, when unset, $VITQ_SLURM_BASE/slurm.conf (tests/test_slurm.py).
# Settings chosen for fast requeue tests: AuthInfo=cred_expire=10 (a requeued job is eligible again after
# ~11 s instead of 121 s) and SchedulerParameters=sched_interval=2. No accounting: `sacct` is unavailable,
# so submitit reports job states as UNKNOWN while results still come back.
set -euo pipefail
BASE=${VITQ_SLURM_BASE:-/tmp/vitq-slurm}
CONF=$BASE/slurm.conf

alive() {  # alive PIDFILE NAME: the recorded process exists and is the named program (guards against PID reuse)
  [ -f "$BASE/$1" ] || return 1
  local pid; pid=$(cat "$BASE/$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/comm" 2>/dev/null
}

node_idle() { SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -Eqx 'idle|mixed|allocated'; }

install() {
  if command -v slurmctld >/dev/null && [ -x /usr/sbin/munged ]; then return; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
  [ -s /etc/munge/munge.key ] || {
    /usr/sbin/mungekey --create --force
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  }
  if munge -n >/dev/null 2>&1; then return; fi   # a munged is already answering (ours or the system's)
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F >"$BASE/log/munged.out" 2>&1 &
  echo $! >"$BASE/munged.pid"
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munged did not start:" >&2; cat "$BASE/log/munged.out" >&2; exit 1
}

write_conf() {
  local nodeline; nodeline=$(slurmd -C | head -1)   # "NodeName=<host> CPUs=... RealMemory=..."
  cat >"$CONF" <<CFG
ClusterName=vitqci
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs become eligible after cred_expire+1 s (default 120)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
# bind to the hostname's address (127.0.0.1 here) instead of 0.0.0.0
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=300
KillWait=3
Waittime=0
$nodeline NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CFG
}

start() {
  mkdir -p "$BASE"/{state,spool,log}
  if alive slurmctld.runpid slurmctld && alive slurmd.runpid slurmd && node_idle; then
    echo "slurm already running (conf $CONF)" >&2
  else
    stop
    install
    start_munge
    write_conf
    slurmctld -D -c -f "$CONF" >"$BASE/log/slurmctld.out" 2>&1 &   # -c: start clean, no jobs from an earlier run
    echo $! >"$BASE/slurmctld.runpid"
    slurmd -D -f "$CONF" >"$BASE/log/slurmd.out" 2>&1 &
    echo $! >"$BASE/slurmd.runpid"
    for _ in $(seq 150); do node_idle && break; sleep 0.2; done
    node_idle || { echo "slurm node not idle:" >&2; SLURM_CONF=$CONF sinfo >&2 || true
                   tail -n 20 "$BASE"/log/*.log "$BASE"/log/*.out >&2 || true; exit 1; }
  fi
  echo "export SLURM_CONF=$CONF" >"$BASE/env"
  echo "export SLURM_CONF=$CONF"
}

stop() {  # only the daemons this script started, newest first, by recorded PID
  local entry file name pid
  for entry in slurmd.runpid:slurmd slurmctld.runpid:slurmctld munged.pid:munged; do
    file=${entry%%:*}; name=${entry##*:}
    [ -f "$BASE/$file" ] || continue
    if alive "$file" "$name"; then
      pid=$(cat "$BASE/$file")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$BASE/$file"
  done
  rm -f "$BASE/env"
}

status() { SLURM_CONF=$CONF sinfo; SLURM_CONF=$CONF squeue; }

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
