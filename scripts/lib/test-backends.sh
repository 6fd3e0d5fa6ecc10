# Sourced by scripts/test and scripts/bench: installs and starts real Redis, a
# 3-node Redis Cluster, ClickHouse and tansu on test-only ports with data in a
# temp dir, exports their addresses (TEST_*), and stops exactly those
# processes again on exit, also on failure or Ctrl-C.
# Expects ROOT (the repository) to be set.

BACKEND="$ROOT/scripts/backend"

REDIS_PORT="${TM_TEST_REDIS_PORT:-16379}"
read -r -a CLUSTER_PORTS <<<"${TM_TEST_REDIS_CLUSTER_PORTS:-17001 17002 17003}"
CH_HTTP_PORT="${TM_TEST_CLICKHOUSE_HTTP_PORT:-18123}"
CH_TCP_PORT="${TM_TEST_CLICKHOUSE_TCP_PORT:-19000}"
KAFKA_PORT="${TM_TEST_KAFKA_PORT:-19092}"

section() {
    printf '\n==== %s ====\n' "$*"
}

# ---------------------------------------------------------------- cleanup

STATE=""
PIDS=()
declare -A STARTED_PIDS=()

# Stop exactly the servers this script started (by PID) and delete their
# data. Runs on every exit: success, failure, Ctrl-C, TERM.
cleanup() {
    local rc=$? pid deadline
    trap - EXIT INT TERM
    if ((${#PIDS[@]} > 0)); then
        kill -TERM "${PIDS[@]}" 2>/dev/null || true
        deadline=$((SECONDS + 20))
        for pid in "${PIDS[@]}"; do
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        done
    fi
    if [[ -n $STATE ]]; then
        rm -rf "$STATE"
    fi
    exit "$rc"
}
trap cleanup EXIT
# Turn signals into a normal exit so that the EXIT trap runs.
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- backends

port_in_use() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# start NAME ARGS...: `scripts/backend run ARGS...` in the background.
# `run` execs the server, so $! is the server's own PID.
start() {
    local name="$1"
    shift
    "$BACKEND" run "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
    PIDS+=("$!")
    STARTED_PIDS["$name"]="$!"
}

wait_for() {
    local name="$1" kind="$2" port="$3"
    if ! "$BACKEND" wait "$kind" "$port" "${STARTED_PIDS[$name]}"; then
        echo "---- last lines of $name's log:" >&2
        tail -n 20 "$STATE/logs/$name.log" >&2 || true
        exit 1
    fi
}

section "install backends"
"$BACKEND" install all

section "rust components"
# rustfmt and clippy are not part of a minimal toolchain.
if command -v rustup >/dev/null; then
    installed="$(rustup component list --installed)"
    missing=()
    grep -q '^rustfmt' <<<"$installed" || missing+=(rustfmt)
    grep -q '^clippy' <<<"$installed" || missing+=(clippy)
    if ((${#missing[@]} > 0)); then
        rustup component add "${missing[@]}"
    fi
fi
cargo --version
rustc --version

section "start backends"
# A leftover server on one of the ports would make the tests talk to it.
for port in "$REDIS_PORT" "${CLUSTER_PORTS[@]}" "$CH_HTTP_PORT" "$CH_TCP_PORT" "$KAFKA_PORT"; do
    if port_in_use "$port"; then
        echo "scripts/test: port $port is already in use; stop that process or set the TM_TEST_*_PORT variables" >&2
        exit 1
    fi
done
STATE="$(mktemp -d "${TMPDIR:-/tmp}/trackmesh-test.XXXXXX")"
mkdir -p "$STATE/logs"
start redis redis "$STATE/redis" "$REDIS_PORT"
for port in "${CLUSTER_PORTS[@]}"; do
    start "redis-cluster-$port" redis-cluster-node "$STATE/redis-cluster-$port" "$port"
done
start clickhouse clickhouse "$STATE/clickhouse" "$CH_HTTP_PORT" "$CH_TCP_PORT"
start tansu tansu "$STATE/tansu" "$KAFKA_PORT"

wait_for redis redis "$REDIS_PORT"
for port in "${CLUSTER_PORTS[@]}"; do
    wait_for "redis-cluster-$port" redis "$port"
done
wait_for clickhouse clickhouse "$CH_HTTP_PORT"
wait_for tansu tansu "$KAFKA_PORT"
"$BACKEND" cluster-create "${CLUSTER_PORTS[@]}" >"$STATE/logs/cluster-create.log" 2>&1 || {
    cat "$STATE/logs/cluster-create.log" >&2
    exit 1
}
echo "redis cluster ready on ports ${CLUSTER_PORTS[*]}"

export TEST_REDIS_ADDR="127.0.0.1:$REDIS_PORT"
TEST_REDIS_CLUSTER_NODES="$(printf '127.0.0.1:%s,' "${CLUSTER_PORTS[@]}")"
export TEST_REDIS_CLUSTER_NODES="${TEST_REDIS_CLUSTER_NODES%,}"
export TEST_CLICKHOUSE_URL="http://127.0.0.1:$CH_HTTP_PORT"
export TEST_CLICKHOUSE_TCP_PORT="$CH_TCP_PORT"
export TEST_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
# Tests that need their own server (restarts, failures) spawn this script.
export TM_BACKEND="$BACKEND"
export PATH="$ROOT/.tools/bin:$PATH"
env | grep -E '^(TEST_|TM_BACKEND=)' | sort
