#!/usr/bin/env bash
# Development stack on this machine, everything bound to 127.0.0.1:
#
#   Ray head      `ray start --head` with token authentication, dashboard/job API on loopback
#   S3            moto server (in memory) with one bucket
#   MLflow        `mlflow server`, sqlite backend, artifacts proxied to s3://<bucket>/mlflow
#
# Usage: infra/local/stack.sh [--state-dir DIR] {start|stop|status|env}
#
#   start    start the three services on free ports; state goes to the state dir
#   stop     stop exactly the processes `start` recorded (never `ray stop`)
#   status   print what runs where; exit 0 when every service is up, 1 otherwise
#   env      print the exports that point a shell at the stack:  eval "$(infra/local/stack.sh env)"
#
# Environment (all optional):
#   REACTDIFF_STACK_DIR        state dir (default: <repo>/.reactdiff/stack)
#   REACTDIFF_STACK_BUCKET     bucket to create (default: reactdiff-dev)
#   REACTDIFF_STACK_CPUS       logical CPUs of the Ray head (default: 4, see DESIGN.md §4)
#   REACTDIFF_STACK_OBJECT_STORE_BYTES   Ray object store size (default: 1 GB)
#   REACTDIFF_VENV             virtualenv whose ray/mlflow/python to use (default: <repo>/.venv)
#
# The stack is ephemeral: moto keeps S3 in memory, so `stop` discards the bucket and `start`
# recreates the MLflow database. Logs stay in <state dir>/logs.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${REACTDIFF_STACK_DIR:-$REPO_ROOT/.reactdiff/stack}"
VENV="${REACTDIFF_VENV:-$REPO_ROOT/.venv}"
BUCKET="${REACTDIFF_STACK_BUCKET:-reactdiff-dev}"
RAY_CPUS="${REACTDIFF_STACK_CPUS:-4}"
OBJECT_STORE_BYTES="${REACTDIFF_STACK_OBJECT_STORE_BYTES:-1000000000}"

die() { echo "stack.sh: $*" >&2; exit 1; }
log() { echo "stack.sh: $*" >&2; }

usage() {
    sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

COMMAND=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --state-dir) [[ $# -ge 2 ]] || die "--state-dir needs a value"; STATE_DIR="$2"; shift 2 ;;
        --state-dir=*) STATE_DIR="${1#*=}"; shift ;;
        -h|--help|help) usage; exit 0 ;;
        start|stop|status|env)
            [[ -z "$COMMAND" ]] || die "one command at a time (got $COMMAND and $1)"
            COMMAND="$1"; shift ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ -n "$COMMAND" ]] || { usage >&2; exit 2; }

mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
STATE_FILE="$STATE_DIR/stack.env"
TOKEN_FILE="$STATE_DIR/auth_token"
LOG_DIR="$STATE_DIR/logs"

PY="$VENV/bin/python"
RAY="$VENV/bin/ray"
MLFLOW="$VENV/bin/mlflow"

# Loopback only and no telemetry through Ray's/MLflow's own settings (DESIGN.md §3); with usage
# stats off Ray makes no cloud-metadata probes. Applied to the processes this script starts,
# not to the caller's shell. No proxy is set or removed: jobs on this head may read real S3.
# Loopback is added to NO_PROXY so that a proxy of the user's never sees the stack's traffic.
_no_proxy="${NO_PROXY:-${no_proxy:-}}"
_no_proxy="${_no_proxy:+$_no_proxy,}127.0.0.1,localhost"
LOOPBACK_ENV=(
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    RAY_USAGE_STATS_ENABLED=0
    MLFLOW_DISABLE_TELEMETRY=true
    NO_PROXY="$_no_proxy" no_proxy="$_no_proxy"
)
# Dummy credentials, only ever valid for the moto server of this stack.
MOTO_CREDS=(
    AWS_ACCESS_KEY_ID=testing
    AWS_SECRET_ACCESS_KEY=testing
    AWS_DEFAULT_REGION=us-east-1
    AWS_REGION=us-east-1
)

# --------------------------------------------------------------------------------------------
# process bookkeeping: every service runs in its own session (setsid), so its whole process
# tree is "the processes whose session id is the recorded PID".

session_pids() {  # session_pids SID -> PIDs of that session, one per line
    local sid="$1"
    [[ "$sid" =~ ^[0-9]+$ ]] || return 0
    ps -eo pid=,sid= | awk -v s="$sid" '$2 == s { print $1 }'
}

is_alive() {  # is_alive PID [MARKER]: running, and (if given) MARKER occurs in its command line
    local pid="$1" marker="${2:-}"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ -z "$marker" ]] && return 0
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker"
}

stop_session() {  # stop_session NAME SID MARKER GRACE_SECONDS: TERM the session, then KILL the rest
    local name="$1" sid="$2" marker="$3" grace="$4" pids
    pids="$(session_pids "$sid")"
    [[ -z "$pids" ]] && return 0
    # A live leader must still be the process we started (its command line names MARKER); a
    # session whose leader is gone keeps its id, and the kernel does not reuse a PID that is
    # still a session id, so its remaining members are ours.
    if kill -0 "$sid" 2>/dev/null && ! is_alive "$sid" "$marker"; then
        log "$name: PID $sid is no longer the process this stack started; leaving it alone"
        return 0
    fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    wait_session_gone "$sid" "$grace" && return 0
    pids="$(session_pids "$sid")"
    if [[ -n "$pids" ]]; then
        log "$name: still running after ${grace}s, sending SIGKILL to $(echo $pids)"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    wait_session_gone "$sid" 10 || die "$name: could not stop session $sid"
}

wait_session_gone() {  # wait_session_gone SID SECONDS
    local sid="$1" deadline=$((SECONDS + $2))
    while [[ -n "$(session_pids "$sid")" ]]; do
        (( SECONDS >= deadline )) && return 1
        sleep 0.5
    done
}

launch() {  # launch LOGFILE CMD... -> echoes the PID, which is also the session id
    local logfile="$1"; shift
    setsid "$@" >"$logfile" 2>&1 < /dev/null &
    local pid=$!
    # Without job control a background job is no process-group leader, so setsid does not
    # fork and $! is the new session's leader. Check rather than assume.
    sleep 0.2
    if kill -0 "$pid" 2>/dev/null; then
        local sid
        sid="$(ps -o sid= -p "$pid" | tr -d ' ')"
        [[ "$sid" == "$pid" ]] || { kill -TERM "$pid" 2>/dev/null || true; die "could not start $1 in its own session"; }
    fi
    echo "$pid"
}

free_ports() {  # free_ports N -> N distinct free TCP ports on 127.0.0.1
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

wait_http() {  # wait_http NAME URL SECONDS PID: until URL answers (any HTTP status < 500)
    local name="$1" url="$2" deadline=$((SECONDS + $3)) pid="$4"
    while (( SECONDS < deadline )); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        if env "${LOOPBACK_ENV[@]}" "$PY" - "$url" <<'EOF' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code < 500 else 1)
except Exception:
    sys.exit(1)
EOF
        then
            return 0
        fi
        sleep 1
    done
    log "$name did not answer at $url within $3 s"
    return 1
}

load_state() {
    [[ -f "$STATE_FILE" ]] || return 1
    # shellcheck disable=SC1090
    source "$STATE_FILE"
}

# --------------------------------------------------------------------------------------------

cmd_start() {
    [[ -x "$PY" && -x "$RAY" && -x "$MLFLOW" ]] || die "no python/ray/mlflow in $VENV/bin (run 'make venv' or set REACTDIFF_VENV)"
    if load_state; then
        if any_running; then
            die "a stack is already running from $STATE_DIR (stop it first: $0 --state-dir $STATE_DIR stop)"
        fi
        cmd_stop 2>/dev/null || true   # leftovers of a stack that died: its temp dir, state
    fi
    mkdir -p "$LOG_DIR"
    chmod 700 "$STATE_DIR"

    local ports
    read -r -a ports <<< "$(free_ports 13)"
    local MOTO_PORT=${ports[0]} MLFLOW_PORT=${ports[1]} GCS_PORT=${ports[2]} DASH_PORT=${ports[3]}
    local CLIENT_PORT=${ports[4]} AGENT_HTTP_PORT=${ports[5]} AGENT_GRPC_PORT=${ports[6]}
    local RTENV_PORT=${ports[7]} METRICS_PORT=${ports[8]} NM_PORT=${ports[9]} OM_PORT=${ports[10]}
    local AUTOSCALER_METRICS_PORT=${ports[11]} DASHBOARD_METRICS_PORT=${ports[12]}
    local S3_ENDPOINT="http://127.0.0.1:$MOTO_PORT"
    local MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"

    # Ray keeps unix sockets under its temp dir; their paths must stay short (< 108 bytes),
    # so it lives in /tmp rather than in the state dir. A private temp dir also keeps
    # `ray.init()` elsewhere on this machine from auto-attaching to this head.
    local RAY_TMP
    RAY_TMP="$(mktemp -d /tmp/rdstack.XXXXXX)"

    # The token: 256 random bits, readable by this user only. Not ~/.ray/auth_token, so no
    # other Ray cluster of this user is affected.
    ( umask 077; "$PY" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' > "$TOKEN_FILE" )

    write_state() {
        local tmp="$STATE_FILE.tmp"
        cat > "$tmp" <<EOF
# written by infra/local/stack.sh start; read by stop/status/env
STACK_STARTED_AT='$(date -u +%Y-%m-%dT%H:%M:%SZ)'
STACK_VENV='$VENV'
STACK_BUCKET='$BUCKET'
STACK_TOKEN_FILE='$TOKEN_FILE'
STACK_RAY_TMP='$RAY_TMP'
STACK_MOTO_PORT=$MOTO_PORT
STACK_MLFLOW_PORT=$MLFLOW_PORT
STACK_RAY_GCS_PORT=$GCS_PORT
STACK_RAY_DASHBOARD_PORT=$DASH_PORT
STACK_MOTO_PID=${MOTO_PID:-}
STACK_MLFLOW_PID=${MLFLOW_PID:-}
STACK_RAY_PID=${RAY_PID:-}
EOF
        mv "$tmp" "$STATE_FILE"
    }
    # From here on a failure stops whatever was started already.
    trap 'log "start failed, stopping what was started (logs: $LOG_DIR)"; write_state; cmd_stop >&2 || true; exit 1' ERR

    # 1. S3: moto server ------------------------------------------------------------------
    MOTO_PID="$(launch "$LOG_DIR/moto.log" env "${LOOPBACK_ENV[@]}" "$PY" -m moto.server -H 127.0.0.1 -p "$MOTO_PORT")"
    write_state
    wait_http moto "$S3_ENDPOINT/moto-api/" 60 "$MOTO_PID" || false
    env "${LOOPBACK_ENV[@]}" "${MOTO_CREDS[@]}" "$PY" - "$S3_ENDPOINT" "$BUCKET" <<'EOF'
import sys, boto3
endpoint, bucket = sys.argv[1:]
boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
EOF
    log "S3 (moto)     $S3_ENDPOINT  bucket s3://$BUCKET"

    # 2. MLflow tracking server (started, awaited after the Ray head) ---------------------
    rm -f "$STATE_DIR/mlflow.db"
    MLFLOW_PID="$(launch "$LOG_DIR/mlflow.log" env "${LOOPBACK_ENV[@]}" "${MOTO_CREDS[@]}" \
        AWS_ENDPOINT_URL="$S3_ENDPOINT" MLFLOW_S3_ENDPOINT_URL="$S3_ENDPOINT" \
        "$MLFLOW" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
        --artifacts-destination "s3://$BUCKET/mlflow")"
    write_state
    # (MLflow creates its schema while the Ray head starts; both are awaited below.)

    # 3. Ray head -------------------------------------------------------------------------
    # `--block` keeps `ray start` in the foreground as the session leader, so the whole head
    # (GCS, raylet, dashboard, agents, workers) is this session. Jobs inherit this env (the
    # venv first on PATH, S3 and MLflow endpoints, token auth) and its working directory, the
    # repository root, so `--config jobs/configs/<job>.yaml` resolves without --working-dir.
    RAY_PID="$(cd "$REPO_ROOT" && launch "$LOG_DIR/ray-head.log" env "${LOOPBACK_ENV[@]}" "${MOTO_CREDS[@]}" \
        PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" \
        RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
        AWS_ENDPOINT_URL="$S3_ENDPOINT" MLFLOW_TRACKING_URI="$MLFLOW_URI" \
        REACTDIFF_STACK_BUCKET="$BUCKET" \
        AUTOSCALER_METRIC_PORT="$AUTOSCALER_METRICS_PORT" DASHBOARD_METRIC_PORT="$DASHBOARD_METRICS_PORT" \
        "$RAY" start --head --block \
            --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
            --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
            --ray-client-server-port="$CLIENT_PORT" \
            --dashboard-agent-listen-port="$AGENT_HTTP_PORT" \
            --dashboard-agent-grpc-port="$AGENT_GRPC_PORT" \
            --runtime-env-agent-port="$RTENV_PORT" \
            --metrics-export-port="$METRICS_PORT" \
            --node-manager-port="$NM_PORT" --object-manager-port="$OM_PORT" \
            --temp-dir="$RAY_TMP" \
            --num-cpus="$RAY_CPUS" --num-gpus=0 \
            --object-store-memory="$OBJECT_STORE_BYTES" \
            --disable-usage-stats)"
    write_state
    wait_http mlflow "$MLFLOW_URI/health" 240 "$MLFLOW_PID" || false
    log "MLflow        $MLFLOW_URI  (artifacts: s3://$BUCKET/mlflow)"
    wait_http ray "http://127.0.0.1:$DASH_PORT/api/version" 240 "$RAY_PID" || false
    wait_ray_ready "$DASH_PORT" 120 "$RAY_PID" || false
    log "Ray head      http://127.0.0.1:$DASH_PORT  (token: $TOKEN_FILE)"

    trap - ERR
    write_state
    log "state in $STATE_DIR; point a shell at it with:  eval \"\$($0 --state-dir $STATE_DIR env)\""
}

wait_ray_ready() {  # the job API answers with the token: the head accepts submissions
    local port="$1" deadline=$((SECONDS + $2)) pid="$3"
    while (( SECONDS < deadline )); do
        kill -0 "$pid" 2>/dev/null || return 1
        if env "${LOOPBACK_ENV[@]}" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
            "$RAY" job list --address "http://127.0.0.1:$port" >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    log "the Ray job API did not accept the token within $2 s (see $LOG_DIR/ray-head.log)"
    return 1
}

any_running() {
    local pid
    for pid in "${STACK_RAY_PID:-}" "${STACK_MLFLOW_PID:-}" "${STACK_MOTO_PID:-}"; do
        [[ -n "$(session_pids "$pid")" ]] && return 0
    done
    return 1
}

cmd_stop() {
    if ! load_state; then
        log "nothing recorded in $STATE_DIR (not started, or already stopped)"
        return 0
    fi
    # Ray first (its jobs may still talk to MLflow and S3). SIGTERM to the `ray start --block`
    # leader lets Ray shut its own processes down; whatever is left of the session after the
    # grace period is killed. Only this session: never `ray stop`, which would stop every Ray
    # of this user on the machine.
    # MLflow and moto get their SIGTERM at the same time and finish shutting down meanwhile.
    if [[ -n "${STACK_RAY_PID:-}" ]] && is_alive "$STACK_RAY_PID" "$STACK_RAY_TMP"; then
        kill -TERM "$STACK_RAY_PID" 2>/dev/null || true
    fi
    if [[ -n "${STACK_MLFLOW_PID:-}" ]] && is_alive "$STACK_MLFLOW_PID" "$STATE_DIR/mlflow.db"; then
        kill -TERM -- "-$STACK_MLFLOW_PID" 2>/dev/null || true
    fi
    if [[ -n "${STACK_MOTO_PID:-}" ]] && is_alive "$STACK_MOTO_PID" "moto.server"; then
        kill -TERM -- "-$STACK_MOTO_PID" 2>/dev/null || true
    fi
    if [[ -n "${STACK_RAY_PID:-}" ]]; then
        local deadline=$((SECONDS + 45))
        while is_alive "$STACK_RAY_PID" && (( SECONDS < deadline )); do sleep 0.5; done
        stop_session "ray head" "$STACK_RAY_PID" "$STACK_RAY_TMP" 10
        log "stopped Ray head (session $STACK_RAY_PID)"
    fi
    if [[ -n "${STACK_MLFLOW_PID:-}" ]]; then
        stop_session mlflow "$STACK_MLFLOW_PID" "$STATE_DIR/mlflow.db" 15
        log "stopped MLflow (session $STACK_MLFLOW_PID)"
    fi
    if [[ -n "${STACK_MOTO_PID:-}" ]]; then
        stop_session moto "$STACK_MOTO_PID" "moto.server" 10
        log "stopped moto (session $STACK_MOTO_PID)"
    fi
    if [[ -n "${STACK_RAY_TMP:-}" && "$STACK_RAY_TMP" == /tmp/rdstack.* && -d "$STACK_RAY_TMP" ]]; then
        # keep the Ray logs next to the others, then drop the temp dir
        if [[ -d "$STACK_RAY_TMP/session_latest/logs" ]]; then
            rm -rf "$LOG_DIR/ray-session"
            cp -rL "$STACK_RAY_TMP/session_latest/logs" "$LOG_DIR/ray-session" 2>/dev/null || true
        fi
        rm -rf "$STACK_RAY_TMP"
    fi
    rm -f "$STATE_FILE" "$TOKEN_FILE"
}

cmd_status() {
    if ! load_state; then
        echo "stack: not running (no state in $STATE_DIR)"
        return 1
    fi
    local ok=0 name pid url
    for name in ray mlflow moto; do
        case "$name" in
            ray)    pid="${STACK_RAY_PID:-}";    url="http://127.0.0.1:$STACK_RAY_DASHBOARD_PORT" ;;
            mlflow) pid="${STACK_MLFLOW_PID:-}"; url="http://127.0.0.1:$STACK_MLFLOW_PORT" ;;
            moto)   pid="${STACK_MOTO_PID:-}";   url="http://127.0.0.1:$STACK_MOTO_PORT (bucket s3://$STACK_BUCKET)" ;;
        esac
        if [[ -n "$pid" ]] && is_alive "$pid"; then
            printf '%-7s up    pid %-7s %s\n' "$name" "$pid" "$url"
        else
            printf '%-7s DOWN  pid %-7s %s\n' "$name" "${pid:--}" "$url"
            ok=1
        fi
    done
    echo "token:  $STACK_TOKEN_FILE"
    echo "state:  $STATE_FILE   logs: $LOG_DIR"
    return $ok
}

cmd_env() {
    load_state || die "no stack recorded in $STATE_DIR (run: $0 start)"
    cat <<EOF
# reactdiff local stack ($STATE_DIR), started $STACK_STARTED_AT
# RAY_ADDRESS / RAY_API_SERVER_ADDRESS: the job API, for 'ray job submit|status|logs|list'.
# Run pipeline code as a job (inside a job Ray sets RAY_ADDRESS to the cluster itself). To run
# a driver directly in this shell instead, use the GCS address:
#   RAY_ADDRESS=127.0.0.1:$STACK_RAY_GCS_PORT reactdiff <command> ...
export RAY_ADDRESS=http://127.0.0.1:$STACK_RAY_DASHBOARD_PORT
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$STACK_RAY_DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STACK_TOKEN_FILE
export MLFLOW_TRACKING_URI=http://127.0.0.1:$STACK_MLFLOW_PORT
export AWS_ENDPOINT_URL=http://127.0.0.1:$STACK_MOTO_PORT
# dummy credentials: valid for this moto server only
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_REGION=us-east-1
export REACTDIFF_STACK_BUCKET=$STACK_BUCKET
# loopback only, no telemetry (DESIGN.md §3)
export RAY_USAGE_STATS_ENABLED=0
export MLFLOW_DISABLE_TELEMETRY=true
export NO_PROXY=127.0.0.1,localhost
export no_proxy=127.0.0.1,localhost
EOF
}

case "$COMMAND" in
    start)  cmd_start ;;
    stop)   cmd_stop ;;
    status) cmd_status ;;
    env)    cmd_env ;;
esac
