#!/usr/bin/env bash
# Stand up drope's services on this box: a Ray head and an MLflow server, both on 127.0.0.1 only.
#   bash cluster/local-up.sh
#   set -a; . .drope/cluster/env; set +a      # RAY_ADDRESS, MLFLOW_TRACKING_URI
#   drope submit SPEC.yaml --address "$RAY_ADDRESS"
#   bash cluster/local-down.sh
#
# Environment (all optional):
#   DROPE_CLUSTER_DIR        state dir: env file, pids, logs, mlflow.db, artifacts   (./.drope/cluster)
#   DROPE_BIND_HOST          address every service listens on; loopback unless you mean to
#                            expose the box (then put auth in front of MLflow)        (127.0.0.1)
#   RAY_PORT                 Ray GCS port (what `ray status --address` takes)          (6379)
#   RAY_DASHBOARD_PORT       dashboard + job submission API (RAY_ADDRESS)              (8265)
#   RAY_CLIENT_SERVER_PORT   Ray client (ray://) port                                  (10001)
#   RAY_DASHBOARD_AGENT_PORT dashboard agent HTTP port                                 (52365)
#   RAY_NUM_CPUS / RAY_NUM_GPUS  resources the head advertises                         (detected)
#   RAY_TMPDIR               Ray's temp dir; short, unix socket paths live under it  (/tmp/drope-ray-HASH)
#   DROPE_RAY_AUTH           token: Ray's token auth, clients need the token (in ~/.ray/auth_token,
#                            or RAY_AUTH_TOKEN_PATH; made here if missing); disabled  (token)
#   MLFLOW_PORT              MLflow tracking server port                               (5000)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's server-side job runner                      (false)
#   DROPE_UP_TIMEOUT         seconds to wait for both services to answer               (120)
# The binaries come from the repo's .venv when it exists, else from PATH.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
state="${DROPE_CLUSTER_DIR:-$PWD/.drope/cluster}"
mkdir -p "$state/logs" "$state/artifacts"
state="$(cd "$state" && pwd)"
host="${DROPE_BIND_HOST:-127.0.0.1}"
ray_port="${RAY_PORT:-6379}"
dash_port="${RAY_DASHBOARD_PORT:-8265}"
client_port="${RAY_CLIENT_SERVER_PORT:-10001}"
agent_port="${RAY_DASHBOARD_AGENT_PORT:-52365}"
mlflow_port="${MLFLOW_PORT:-5000}"
timeout="${DROPE_UP_TIMEOUT:-120}"
# One temp dir per state dir, kept short: Ray's unix sockets must fit in 107 characters.
ray_tmp="${RAY_TMPDIR:-/tmp/drope-ray-$(printf %s "$state" | sha256sum | cut -c1-10)}"

bin() {  # the venv's copy of a tool first: the one whose versions we pinned
  if [ -x "$here/.venv/bin/$1" ]; then echo "$here/.venv/bin/$1"
  elif command -v "$1" >/dev/null; then command -v "$1"
  else echo "local-up.sh: '$1' not found; run: bash cluster/setup-env.sh" >&2; exit 2
  fi
}
ray_bin="$(bin ray)"
mlflow_bin="$(bin mlflow)"
# Job entrypoints (`drope resume ...`) run in the head's environment: give it the venv's python
# and drope, whichever shell this was started from.
export PATH="$(dirname "$ray_bin"):$PATH"

alive() {  # a live (not zombie) process in the process group recorded for service $1
  [ -f "$state/$1.pid" ] || return 1
  ps -eo pgid=,stat= | awk -v g="$(cat "$state/$1.pid")" '$1 == g && $2 !~ /^Z/ {f = 1} END {exit !f}'
}
if alive ray || alive mlflow; then
  echo "local-up.sh: already up under $state (bash cluster/local-down.sh stops it):"
  cat "$state/env"
  exit 0
fi
port_taken() { (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null; }
for spec in "RAY_PORT=$ray_port" "RAY_DASHBOARD_PORT=$dash_port" "RAY_CLIENT_SERVER_PORT=$client_port" \
            "RAY_DASHBOARD_AGENT_PORT=$agent_port" "MLFLOW_PORT=$mlflow_port"; do
  if port_taken "${spec#*=}"; then
    echo "local-up.sh: port ${spec#*=} on $host is taken; set ${spec%%=*} to a free port" >&2
    exit 2
  fi
done
[ "$host" = "127.0.0.1" ] || echo "local-up.sh: warning: binding to $host, not loopback:" \
  "anyone who reaches it can submit jobs and read runs" >&2

# Ray 2.60 turns token auth on by itself when ~/.ray/auth_token exists (any earlier ray.init()
# writes one) and off when it does not: say which, so the head and its clients agree. The token
# stays in its file; only the mode goes into the env file.
auth="${DROPE_RAY_AUTH:-token}"
case "$auth" in
  token)
    token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
      mkdir -p "$(dirname "$token_file")"
      (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$token_file")
      echo "local-up.sh: new Ray auth token in $token_file"
    fi ;;
  disabled) ;;
  *) echo "local-up.sh: DROPE_RAY_AUTH=$auth; use token or disabled" >&2; exit 2 ;;
esac
export RAY_AUTH_MODE="$auth"

# Each service runs in its own session (setsid) so local-down.sh can stop the whole process group
# by its id, never by name: other Ray heads on this box (other users, tests) stay untouched.
# Without a job-control shell a background child is no group leader, so setsid does not fork and
# $! is the session's leader.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
ray_args=(start --head --block --node-ip-address="$host" --dashboard-host="$host"
  --port="$ray_port" --dashboard-port="$dash_port" --ray-client-server-port="$client_port"
  --dashboard-agent-listen-port="$agent_port" --temp-dir="$ray_tmp" --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && ray_args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && ray_args+=(--num-gpus="$RAY_NUM_GPUS")
setsid "$ray_bin" "${ray_args[@]}" >"$state/logs/ray.log" 2>&1 </dev/null &
echo $! >"$state/ray.pid"

# --workers 1: one uvicorn worker answers /health in ~8 s instead of ~12 s and is plenty for a team.
# MLflow 3's server also forks a job runner with seven huey consumers (GenAI judges, trace
# rollups); drope uses none of it and on a 2-core box they cost CPU at start and ~10 s at stop.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
setsid "$mlflow_bin" server --backend-store-uri "sqlite:///$state/mlflow.db" \
  --artifacts-destination "$state/artifacts" --serve-artifacts \
  --host "$host" --port "$mlflow_port" --workers 1 >"$state/logs/mlflow.log" 2>&1 </dev/null &
echo $! >"$state/mlflow.pid"

down() { DROPE_CLUSTER_DIR="$state" bash "$here/cluster/local-down.sh"; }
for svc in ray mlflow; do  # setsid() runs in the child a moment after the fork: give it that moment
  pid="$(cat "$state/$svc.pid")"
  for _ in $(seq 50); do
    [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] && break
    sleep 0.1
  done
  if [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" != "$pid" ]; then
    echo "local-up.sh: $svc (pid $pid) did not become its own process group; stopping" >&2
    down; exit 1
  fi
done

healthy() {  # $1 url, $2 text the body must contain
  curl -sf --max-time 2 "$1" 2>/dev/null | grep -q "$2"
}
listening() {  # $1 port: something accepts a TCP connection there (the Ray client server starts last)
  timeout 2 bash -c "exec 3<>/dev/tcp/$host/$1" 2>/dev/null
}
echo "local-up.sh: starting Ray head (:$dash_port) and MLflow (:$mlflow_port) on $host; logs in $state/logs"
deadline=$((SECONDS + timeout)); ray_ok=""; mlflow_ok=""
while [ -z "$ray_ok" ] || [ -z "$mlflow_ok" ]; do
  # The dashboard answers once GCS is up; the raylet must have registered for jobs to schedule;
  # ray:// clients need the client server, which Ray starts after both.
  [ -z "$ray_ok" ] && healthy "http://$host:$dash_port/api/gcs_healthz" success \
    && healthy "http://$host:$agent_port/api/local_raylet_healthz" success \
    && listening "$client_port" && ray_ok=1 && echo "local-up.sh: Ray head ready after ${SECONDS}s"
  [ -z "$mlflow_ok" ] && healthy "http://$host:$mlflow_port/health" OK \
    && mlflow_ok=1 && echo "local-up.sh: MLflow ready after ${SECONDS}s"
  for svc in ray mlflow; do
    if ! alive "$svc"; then
      echo "local-up.sh: $svc exited during start; last log lines:" >&2
      tail -n 20 "$state/logs/$svc.log" >&2
      down; exit 1
    fi
  done
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "local-up.sh: not healthy after ${timeout}s (ray=${ray_ok:-no} mlflow=${mlflow_ok:-no});" \
      "see $state/logs; raise DROPE_UP_TIMEOUT on a loaded box" >&2
    down; exit 1
  fi
  sleep 0.5
done

# Written last: its presence means both services answered. No secrets here, only addresses.
cat >"$state/env.tmp" <<EOF
RAY_ADDRESS=http://$host:$dash_port
RAY_GCS_ADDRESS=$host:$ray_port
MLFLOW_TRACKING_URI=http://$host:$mlflow_port
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=$([ "$host" = 127.0.0.1 ] && echo 0 || echo 1)
RAY_AUTH_MODE=$auth
EOF
# the token file's path (never the token) when it is not Ray's default
[ "$auth" = token ] && [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] \
  && echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH" >>"$state/env.tmp"
mv "$state/env.tmp" "$state/env"
echo "local-up.sh: up. Environment in $state/env:"
cat "$state/env"
