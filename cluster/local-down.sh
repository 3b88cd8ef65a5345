#!/usr/bin/env bash
# Stop what cluster/local-up.sh started (same DROPE_CLUSTER_DIR): the MLflow server and the Ray head.
#   bash cluster/local-down.sh
# Stops exactly the process groups whose ids local-up.sh recorded, never processes found by name:
# another Ray head on this box (another user's, a test's) keeps running. Runs, artifacts and the
# sqlite database stay in the state dir, so the next local-up.sh serves the same MLflow history.
#   DROPE_CLUSTER_DIR   state dir                                                  (./.drope/cluster)
#   DROPE_DOWN_GRACE    seconds a service gets after SIGTERM before SIGKILL         (40)
set -euo pipefail
state="${DROPE_CLUSTER_DIR:-$PWD/.drope/cluster}"
grace="${DROPE_DOWN_GRACE:-40}"
if [ ! -d "$state" ]; then
  echo "local-down.sh: no state dir $state; nothing to stop (set DROPE_CLUSTER_DIR?)"
  exit 0
fi

group_alive() {  # any live (not zombie) process left in process group $1
  ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

leader_alive() { ps -o stat= -p "$1" 2>/dev/null | grep -qv '^Z'; }

stop() {  # $1 service name; its pid file holds the id of its session / process group
  local name="$1" pidfile="$state/$1.pid" pgid
  [ -f "$pidfile" ] || return 0
  pgid="$(cat "$pidfile")"
  if ! group_alive "$pgid"; then
    rm -f "$pidfile"; return 0
  fi
  # Ray: only the `ray start --block` leader gets SIGTERM. It drains the node through the GCS and
  # then stops its children in order; signalling the whole group would kill the GCS first and the
  # drain would wait out its 30 s timeout. MLflow: the server stops its uvicorn worker itself.
  kill -TERM "$pgid" 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  while group_alive "$pgid" && [ "$SECONDS" -lt "$deadline" ]; do
    # a leader already gone leaves children behind: pass the signal on to the group
    leader_alive "$pgid" || kill -TERM -- "-$pgid" 2>/dev/null || true
    sleep 0.5
  done
  if group_alive "$pgid"; then
    echo "local-down.sh: $name still running after ${grace}s; sending SIGKILL to group $pgid" >&2
    kill -KILL -- "-$pgid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$pidfile"
  echo "local-down.sh: $name stopped"
}

# Both at once: each waits out its own grace period.
stop mlflow &
stop ray &
wait
# The env file says "up": remove it so nobody submits to a head that is gone.
rm -f "$state/env"
