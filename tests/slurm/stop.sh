#!/usr/bin/env bash
# Stop the test cluster that tests/slurm/start.sh started: cancel its jobs, then end
# slurmd, slurmctld and munged by the PIDs start.sh recorded (TERM, then KILL), and remove
# the /etc/slurm/slurm.conf link. Logs stay in $STATE/log for post-mortems. Safe to run
# when nothing is running.
#
# With AIHPC_SLURM_USER set (a test session's PID, as given to start.sh) it only drops that
# registration, and stops the cluster only when no other live session, nor a manual
# start, still uses it. Without it, it stops the cluster whoever uses it.
set -euo pipefail

STATE=${AIHPC_SLURM_STATE:-/tmp/aihpc-slurm}
CONF=$STATE/etc/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf

say() { echo "slurm/stop.sh: $*"; }

[ -d "$STATE" ] || {
	say "nothing to stop ($STATE does not exist)"
	exit 0
}
exec 9>"$STATE.lock"
if ! flock -w 300 9; then
	echo "slurm/stop.sh: error: another start.sh/stop.sh holds $STATE.lock" >&2
	exit 1
fi

pid_of() { # pid_of NAME: the recorded PID, if it still runs that daemon (not a reused PID)
	local pid
	pid=$(cat "$STATE/pids/$1" 2>/dev/null) || return 1
	[ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}

if [ -n "${AIHPC_SLURM_USER:-}" ]; then
	rm -f "$STATE/users/$AIHPC_SLURM_USER"
	for user in "$STATE"/users/*; do
		[ -e "$user" ] || continue
		name=$(basename "$user")
		if [ "$name" = manual ]; then
			say "started by hand (start.sh without AIHPC_SLURM_USER); leaving it running"
			exit 0
		elif [ -d "/proc/$name" ]; then
			say "still used by process $name; leaving it running"
			exit 0
		fi
		rm -f "$user" # a session that ended without stop.sh
	done
fi

# Jobs first: their slurmstepd processes are detached from slurmd and would outlive it.
if pid_of slurmctld >/dev/null && [ -f "$CONF" ]; then
	export SLURM_CONF=$CONF
	jobs=$(squeue -h -o %i --states=PENDING,RUNNING,SUSPENDED,COMPLETING,REQUEUED 2>/dev/null || true)
	if [ -n "$jobs" ]; then
		say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
		# shellcheck disable=SC2086 # one job ID per word
		scancel $jobs || true
		for _ in $(seq 40); do
			[ -z "$(squeue -h -o %i --states=RUNNING,COMPLETING 2>/dev/null || true)" ] && break
			sleep 0.5
		done
	fi
fi

running() { # running PID: alive and not a zombie waiting for a parent that never reaps
	local state
	state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) && [ "$state" != Z ]
}

stop() { # stop NAME: TERM, wait up to 10 s, then KILL
	local pid
	pid=$(pid_of "$1") || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 20); do
		running "$pid" || break
		sleep 0.5
	done
	if running "$pid"; then
		# slurmd ignores SIGTERM while it cannot register with slurmctld.
		say "$1 ($pid) ignored SIGTERM; sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	say "stopped $1 ($pid)"
}

stop slurmd
stop slurmctld
stop munged
rm -f "$STATE"/pids/*

if [ "$(readlink "$ETC_CONF" 2>/dev/null)" = "$CONF" ]; then
	rm -f "$ETC_CONF"
fi
