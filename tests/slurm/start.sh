#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for the tests in tests/slurm/: Debian's
# Slurm 22.05 as root, without systemd or cgroups, listening on loopback only, with four
# fake GPUs. Stop it with tests/slurm/stop.sh (the daemons' PIDs are recorded in $STATE/pids).
#
# Installs munge, slurmctld, slurmd and slurm-client with apt-get when they are missing.
# Exits 0 with "already running" when a cluster started by this script answers; exits
# non-zero with the reason (and the daemon logs) when the cluster cannot start.
#
# Environment: AIHPC_SLURM_STATE  state, spool, logs, PIDs (default /tmp/aihpc-slurm)
#              AIHPC_SLURM_CPUS   CPUs the node advertises (default 8, more than the machine
#                                 has, so that several 2-CPU test jobs run at once)
#              AIHPC_SLURM_USER   PID of the process using the cluster (the pytest session):
#                                 registered in $STATE/users, so that stop.sh of one test
#                                 session leaves the cluster to another one still running.
#                                 Unset: "manual", which only a plain stop.sh ends.
set -euo pipefail

STATE=${AIHPC_SLURM_STATE:-/tmp/aihpc-slurm}
CPUS=${AIHPC_SLURM_CPUS:-8}
GPUS=4
GPU_TYPE=fakegpu
PARTITION=aihpc
# Not the default ports 6817/6818: never answer clients of a real cluster by mistake.
CTLD_PORT=26817
SLURMD_PORT=26818
# The jobstep plugin strips every SLURM_* variable (SLURM_CONF too) before its inner srun,
# so clients inside jobs only find the configuration at the compiled-in default path.
ETC_CONF=/etc/slurm/slurm.conf
CONF=$STATE/etc/slurm.conf
# This script's own client commands (scontrol, sinfo) ask this cluster.
export SLURM_CONF=$CONF

say() { echo "slurm/start.sh: $*"; }
die() {
	echo "slurm/start.sh: error: $*" >&2
	exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as any user only as root)"
mkdir -p "$(dirname "$STATE")"
# One start/stop at a time: two test sessions on one machine share the cluster.
exec 9>"$STATE.lock"
flock -w 300 9 || die "another start.sh/stop.sh holds $STATE.lock"

alive() { # alive NAME: the recorded PID of daemon NAME is running that daemon
	local pid
	pid=$(cat "$STATE/pids/$1" 2>/dev/null) || return 1
	[ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

register() { touch "$STATE/users/${AIHPC_SLURM_USER:-manual}"; }

if alive slurmctld && alive slurmd && alive munged && scontrol ping >/dev/null 2>&1; then
	register
	say "already running (state in $STATE)"
	exit 0
fi
for daemon in slurmd slurmctld munged; do
	if alive "$daemon"; then
		die "$daemon from an earlier start is still running; run tests/slurm/stop.sh first"
	fi
done

# From here on, a failure leaves nothing behind: no daemon (the caller only runs stop.sh
# after a successful start), no configuration link, no temporary policy-rc.d.
started=0
policy_rc=
on_exit() {
	[ -z "$policy_rc" ] || rm -f "$policy_rc"
	[ "$started" = 0 ] || return 0
	for daemon in slurmd slurmctld munged; do
		if alive "$daemon"; then kill -KILL "$(cat "$STATE/pids/$daemon")"; fi
	done
	if [ "$(readlink "$ETC_CONF" 2>/dev/null)" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
}
trap on_exit EXIT

# --- packages -------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
	! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
	command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is not available"
	say "installing munge slurmctld slurmd slurm-client (Debian packages)"
	export DEBIAN_FRONTEND=noninteractive
	# The packages' postinst scripts would start the daemons with the (missing) system
	# configuration; a policy-rc.d that denies every start prevents that.
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		policy_rc=/usr/sbin/policy-rc.d
		printf '#!/bin/sh\nexit 101\n' >"$policy_rc"
		chmod +x "$policy_rc"
	fi
	packages=(munge slurmctld slurmd slurm-client)
	apt-get install -y -q --no-install-recommends "${packages[@]}" ||
		{ apt-get update -q && apt-get install -y -q --no-install-recommends "${packages[@]}"; } ||
		die "apt-get could not install ${packages[*]}"
fi

# --- host -----------------------------------------------------------------------------------
HOST=$(hostname -s)
ADDR=$(getent ahostsv4 "$HOST" | awk 'NR == 1 { print $1 }')
# The daemons bind to the hostname's address (NoInAddrAny below): it must be loopback.
case "$ADDR" in
127.*) ;;
*) die "hostname '$HOST' resolves to '${ADDR:-nothing}', not a loopback address; the test cluster listens on loopback only" ;;
esac
if [ -e "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" != "$CONF" ]; then
	die "$ETC_CONF exists and is not this test cluster's; not touching a real Slurm configuration"
fi
# Memory is bookkeeping only here (no cgroups enforce it): enough for two 8 GB training
# jobs of profiles/slurm next to small jobs, whatever the machine has (config_overrides).
REAL_MEMORY=32768

# --- fresh state ----------------------------------------------------------------------------
rm -rf "$STATE/etc" "$STATE/state" "$STATE/spool" "$STATE/munge" "$STATE/dev" "$STATE/pids" \
	"$STATE/log" "$STATE/users"
mkdir -p "$STATE"/{etc,state,spool,munge,dev,pids,log,users}
# Key readable by root only; the socket reachable by all (munged insists).
chmod 711 "$STATE/munge"

# Fake GPUs: gres/gpu only needs character devices to list (it never opens them with
# task/none); CUDA_VISIBLE_DEVICES is set from their indices. Symlinks to /dev/null where
# mknod is not allowed.
for i in $(seq 0 $((GPUS - 1))); do
	mknod "$STATE/dev/nvidia$i" c 195 "$i" 2>/dev/null || ln -s /dev/null "$STATE/dev/nvidia$i"
done

cat >"$STATE/etc/gres.conf" <<EOF
AutoDetect=off
Name=gpu Type=$GPU_TYPE File=$STATE/dev/nvidia[0-$((GPUS - 1))]
EOF

cat >"$CONF" <<EOF
# One-node test cluster written by tests/slurm/start.sh; not for production use.
ClusterName=aihpc-test
SlurmctldHost=$HOST($ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# Loopback only: bind to the hostname's address, never to all interfaces.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
# A private munged (its own key and socket) so that a system munged is never involved.
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job restarts after this many seconds (default 120).
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=30
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No systemd, no cgroups: track job processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct does not work, so the Snakemake profile polls with squeue, which only
# sees jobs for MinJobAge seconds after they end.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=300
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SchedulerType=sched/builtin
GresTypes=gpu
# Let the node advertise more CPUs than the machine has.
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued.
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=60
JobRequeue=1
NodeName=$HOST NodeAddr=$ADDR CPUs=$CPUS RealMemory=$REAL_MEMORY Gres=gpu:$GPU_TYPE:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

mkdir -p /etc/slurm
ln -sfn "$CONF" "$ETC_CONF"

# --- daemons --------------------------------------------------------------------------------
# In the foreground (-D/-F) but in the background of this script: $! is the daemon's PID.
# Their output goes to files, never to this script's stdout (a caller capturing it would
# otherwise wait for the daemons to exit), and they must not inherit the lock (fd 9).
start() { # start NAME COMMAND...
	local name=$1
	shift
	"$@" </dev/null >>"$STATE/log/$name.out" 2>&1 9>&- &
	echo $! >"$STATE/pids/$name"
	disown $! # no "Killed" job report from this shell when on_exit ends it
}

logs() {
	sinfo -N -l >&2 || true
	for f in "$STATE"/log/*; do
		echo "--- $f" >&2
		tail -n 20 "$f" >&2
	done
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= deadline)); then
			logs
			die "timed out waiting for $what"
		fi
		sleep 0.5
	done
}

dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge/munge.key"
start munged munged --foreground --force \
	--key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket.2" \
	--pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed" \
	--log-file="$STATE/log/munged.log"
wait_for 10 "munged" munge --socket="$STATE/munge/munge.socket.2" --no-input

start slurmctld slurmctld -D -f "$CONF"
wait_for 30 "slurmctld" scontrol ping
start slurmd slurmd -D -f "$CONF" -N "$HOST"

node_idle() { [ "$(sinfo -h -n "$HOST" -o %T)" = idle ]; }
wait_for 60 "node $HOST to become idle" node_idle

started=1
register
say "running: partition $PARTITION, node $HOST ($CPUS CPUs, ${REAL_MEMORY} MB," \
	"gpu:$GPU_TYPE:$GPUS), state in $STATE"
