#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian slurm-wlm + munge), for CI and the SLURM tests.
#
#   sudo slurm/local_cluster.sh          # install if needed, configure, start; waits until the node is idle
#   slurm/local_cluster.sh --check       # exit 0 when the cluster answers, 1 otherwise (no changes)
#
# Idempotent: when slurmctld answers and the node is up it returns at once. The node gets the machine's real
# CPU count and memory (from `slurmd -C`); process tracking without cgroups (proctrack/linuxproc, task/none)
# so it also runs inside containers. Exit status 3 means "cannot start here" (not root, no apt), with a reason.
set -euo pipefail

NODE=localhost
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
# a requeued job waits `cred_expire` seconds before it may start again (SLURM's default is 120)
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-30}

node_ready() {
  command -v sinfo >/dev/null 2>&1 || return 1
  scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  local state
  state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1)
  [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]]
}

if [[ "${1:-}" == "--check" ]]; then
  node_ready
  exit $?
fi

if node_ready; then
  echo "local SLURM cluster: already running ($(sinfo -h -o '%P %D node(s) %c CPUs %m MB %t' | head -n1))"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "local SLURM cluster: cannot start: installing and starting slurmctld/slurmd/munged needs root" >&2
  exit 3
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "local SLURM cluster: cannot start: slurm-wlm is not installed and there is no apt-get" >&2
    exit 3
  fi
  echo "local SLURM cluster: installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# ----- munge: authentication between the SLURM daemons and clients ---------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# ----- slurm.conf: one node with the machine's real CPUs and memory --------------------------------------------
hw=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+ //")
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/slurm
cat > "$CONF_DIR/slurm.conf.new" <<EOF
# written by slurm/local_cluster.sh: a one-node cluster for tests
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
SlurmdTimeout=300
KillWait=30
NodeName=$NODE $hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"

# ----- daemons ---------------------------------------------------------------------------------------------------
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
  stop_pidfile() { [[ -s "$1" ]] && kill "$(cat "$1")" 2>/dev/null || true; }
  stop_pidfile /run/slurm/slurmctld.pid
  slurmctld
fi
if [[ ! -s /run/slurm/slurmd.pid ]] || ! kill -0 "$(cat /run/slurm/slurmd.pid)" 2>/dev/null; then
  slurmd -N "$NODE"
fi

for i in $(seq 60); do
  if node_ready; then
    echo "local SLURM cluster: up ($(sinfo -h -o '%P %D node(s) %c CPUs %m MB %t' | head -n1))"
    exit 0
  fi
  state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 || true)
  if [[ "$state" =~ ^(down|drain|drng|fail) ]]; then
    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
  fi
  sleep 0.5
done
echo "local SLURM cluster: did not come up; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" >&2
tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
exit 1
