#!/usr/bin/env bash
# A local SLURM cluster on this machine (Debian slurm-wlm + munge), for CI and the SLURM tests.
#
#   sudo slurm/local_cluster.sh            # one node `localhost`: install if needed, configure, start; waits until idle
#   sudo slurm/local_cluster.sh --nodes 2  # two nodes n1, n2: one slurmd each (`slurmd -N n1`), all on this host
#   slurm/local_cluster.sh [--nodes N] --check   # exit 0 when the cluster answers with N ready nodes, 1 otherwise
#
# Idempotent: when slurmctld answers with at least N ready nodes it returns at once (so a two-node cluster also
# serves the one-node mode). With N >= 2 the nodes are several slurmd daemons on this host (slurm-wlm is built with
# MULTIPLE_SLURMD), each with its own port, spool, pid and log file; each node gets the machine's real CPUs and
# memory (from `slurmd -C`), so they share them; n1..nN resolve to 127.0.0.1 through /etc/hosts (MASTER_ADDR of a
# multi-node job is the first node's name). Changing the node set restarts the daemons, after waiting for the
# queue to drain. Process tracking without cgroups (proctrack/linuxproc, task/none) so it also runs inside
# containers. Exit status 3 means "cannot start here" (not root, no apt), with a reason.
set -euo pipefail

NODES=1
CHECK=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES=${2:-}; shift 2 ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    --check) CHECK=1; shift ;;
    *) echo "local SLURM cluster: unknown argument '$1'; use [--nodes N] [--check]" >&2; exit 2 ;;
  esac
done
if ! [[ "$NODES" =~ ^[1-9][0-9]?$ ]]; then
  echo "local SLURM cluster: --nodes must be a number from 1 to 99, not '$NODES'" >&2
  exit 2
fi
if [[ $NODES -eq 1 ]]; then NODE_NAMES=(localhost); else NODE_NAMES=($(seq -f "n%g" 1 "$NODES")); fi
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
# a requeued job waits `cred_expire` seconds before it may start again (SLURM's default is 120)
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-30}
# how long a change of the node set waits for running jobs to finish before it gives up
DRAIN_WAIT_S=${SLURM_LOCAL_DRAIN_WAIT_S:-1800}

ready_nodes() { sinfo -h -N -o "%N %t" 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc|comp)$/ {print $1}' | sort -u; }

cluster_ready() {
  command -v sinfo >/dev/null 2>&1 || return 1
  scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  [[ $(ready_nodes | wc -l) -ge $NODES ]]
}

describe() { sinfo -h -o '%P %D node(s) %N, %c CPUs %m MB each, %t' | head -n1; }

if [[ $CHECK -eq 1 ]]; then
  cluster_ready
  exit $?
fi

if cluster_ready; then
  echo "local SLURM cluster: already running ($(describe))"
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

# ----- node names: n1..nN resolve to this host (a multi-node job's MASTER_ADDR is its first node's name) --------
if [[ $NODES -gt 1 ]]; then
  missing=()
  for n in "${NODE_NAMES[@]}"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    cp -p /etc/hosts /etc/hosts.local-slurm.tmp
    echo "127.0.0.1 ${missing[*]}  # local SLURM nodes (slurm/local_cluster.sh)" >> /etc/hosts.local-slurm.tmp
    sync /etc/hosts.local-slurm.tmp
    mv /etc/hosts.local-slurm.tmp /etc/hosts
  fi
fi

# ----- slurm.conf: the nodes, each with the machine's real CPUs and memory -------------------------------------
hw=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+ //")
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/slurm
if [[ $NODES -eq 1 ]]; then
  title="a one-node cluster for tests"
  spool_dir=/var/spool/slurmd
  slurmd_pid=/run/slurm/slurmd.pid
  slurmd_log=$LOG_DIR/slurmd.log
  node_lines="NodeName=localhost $hw State=UNKNOWN"
else
  # several slurmd daemons on this host (`slurmd -N <name>`), each with its own port, spool, pid and log file
  title="a $NODES-node cluster for tests (one slurmd per node, all on this host)"
  spool_dir=/var/spool/slurmd/%n
  slurmd_pid=/run/slurm/slurmd-%n.pid
  slurmd_log=$LOG_DIR/slurmd-%n.log
  node_lines=""
  for i in $(seq "$NODES"); do
    mkdir -p "/var/spool/slurmd/n$i"
    node_lines+="NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((6820 + i)) $hw State=UNKNOWN"$'\n'
  done
  node_lines=${node_lines%$'\n'}
fi
node_list=$(IFS=,; echo "${NODE_NAMES[*]}")
cat > "$CONF_DIR/slurm.conf.new" <<CONF
# written by slurm/local_cluster.sh: $title
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=$spool_dir
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$slurmd_log
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
$node_lines
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
sync "$CONF_DIR/slurm.conf.new"

# ----- another node set running: stop its daemons once the queue is empty ---------------------------------------
stop_pidfile() {  # stop the daemon whose pid is in $1 and wait until it is gone
  [[ -s "$1" ]] || return 0
  local pid
  pid=$(cat "$1")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$1"
}
wanted=$(printf '%s\n' "${NODE_NAMES[@]}" | sort -u | paste -sd, -)
if scontrol ping 2>/dev/null | grep -q "is UP"; then
  running=$(sinfo -h -N -o %N 2>/dev/null | sort -u | paste -sd, -)
  if [[ -n "$running" && "$running" != "$wanted" ]]; then
    echo "local SLURM cluster: changing the nodes from $running to $wanted once the queue is empty"
    waited=0
    while [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; do
      if [[ $waited -ge $DRAIN_WAIT_S ]]; then
        echo "local SLURM cluster: jobs $(squeue -h -o %i | paste -sd, -) still queued after ${DRAIN_WAIT_S} s;" \
             "not restarting the daemons under them; rerun when squeue is empty" >&2
        rm -f "$CONF_DIR/slurm.conf.new"
        exit 1
      fi
      sleep 2
      waited=$((waited + 2))
    done
    for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmd-*.pid; do stop_pidfile "$pidfile"; done
    stop_pidfile /run/slurm/slurmctld.pid
  fi
fi
mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"

# ----- daemons ---------------------------------------------------------------------------------------------------
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
  stop_pidfile /run/slurm/slurmctld.pid
  slurmctld
fi
wanted_pidfiles=" $(for n in "${NODE_NAMES[@]}"; do printf '%s ' "${slurmd_pid//%n/$n}"; done)"
for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmd-*.pid; do  # a slurmd of another node set, left running
  if [[ -e "$pidfile" && "$wanted_pidfiles" != *" $pidfile "* ]]; then stop_pidfile "$pidfile"; fi
done
for n in "${NODE_NAMES[@]}"; do
  pidfile=${slurmd_pid//%n/$n}
  if [[ ! -s "$pidfile" ]] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    slurmd -N "$n"
  fi
done

for _ in $(seq 60); do
  if cluster_ready; then
    echo "local SLURM cluster: up ($(describe))"
    exit 0
  fi
  for n in "${NODE_NAMES[@]}"; do
    state=$(sinfo -h -n "$n" -o %t 2>/dev/null | head -n1 || true)
    if [[ "$state" =~ ^(down|drain|drng|fail) ]]; then
      scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
    fi
  done
  sleep 0.5
done
echo "local SLURM cluster: did not come up; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd*.log" >&2
tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd*.log >&2 || true
exit 1
