#!/usr/bin/env bash
# benches/pgbench.sh — compare pgbench read-only throughput and latency of
# direct PostgreSQL, PgBouncer (session pooling) and pgveil.
#
# Usage (from any directory):
#   benches/pgbench.sh
#   DURATION=30 CLIENTS="1 8 32" MODES="simple extended prepared" benches/pgbench.sh
#
# Knobs (environment variables):
#   DURATION  seconds per pgbench run                     (default 15)
#   SCALE     pgbench -i scale factor                     (default 10)
#   CLIENTS   space-separated client counts               (default "1 8")
#   MODES     space-separated pgbench -M protocol modes   (default "simple prepared")
#   ROUNDS    interleaved rounds per row; medians are shown (default 3)
#   PGVEIL_WORKERS  pgveil --workers (default: pgveil's own default)
#
# What it does, in one go:
#   * locates the PostgreSQL binaries (pg_config --bindir, else the highest
#     /usr/lib/postgresql/*/bin), installs pgbouncer with apt-get if missing,
#     builds pgveil (cargo build --release);
#   * creates a throwaway cluster in a temp dir (fsync=off, trust auth, owned
#     by user postgres when run as root), loads it with pgbench -i -s $SCALE;
#   * starts a private PgBouncer (pool_mode = session) and pgveil in front of
#     it, each on a free 127.0.0.1 port;
#   * for every mode x clients runs `pgbench -S -n` against direct, pgbouncer,
#     pgveil (in that order) and prints a markdown table of TPS, average
#     latency and pgveil's ratios.
# Everything it started is stopped, and the temp dir removed, on exit —
# including errors and Ctrl-C. A failed run is reported on stderr and shown
# as FAIL in the table; the other runs continue.
#
# Note: pgveil is started with its working directory set to the temp dir, so
# a config/pgveil.yaml in the repo is NOT picked up; only the flags apply.

set -euo pipefail

DURATION=${DURATION:-15}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-"1 8"}
MODES=${MODES:-"simple prepared"}
ROUNDS=${ROUNDS:-3}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"

# Keep the user's libpq environment from redirecting our connections.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS PGPASSWORD PGPASSFILE

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- cleanup ---
TMP=""
PGDATA=""
PGVEIL_PID=""
PGBOUNCER_PID=""
PG_STARTED=0

kill_and_wait() { # pid name
    local pid=$1 name=$2 i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name (pid $pid) did not stop on SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    kill_and_wait "$PGVEIL_PID" pgveil
    kill_and_wait "$PGBOUNCER_PID" pgbouncer
    if [[ $PG_STARTED == 1 && -n $PGDATA && -f $PGDATA/postmaster.pid ]]; then
        local pm_pid
        pm_pid=$(head -n1 "$PGDATA/postmaster.pid" 2>/dev/null)
        as_pg "$PG_CTL" stop -D "$PGDATA" -m fast -w -t 30 >/dev/null 2>&1
        # Fallback if pg_ctl could not stop it.
        if [[ -n $pm_pid ]] && kill -0 "$pm_pid" 2>/dev/null; then
            kill_and_wait "$pm_pid" postgres
        fi
    fi
    [[ -n $TMP && -d $TMP ]] && rm -rf -- "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ------------------------------------------------------------- validation ---
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (got '$DURATION')"
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || die "SCALE must be a positive integer (got '$SCALE')"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
for c in $CLIENTS; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || die "CLIENTS entries must be positive integers (got '$c')"
done
for m in $MODES; do
    [[ $m == simple || $m == extended || $m == prepared ]] \
        || die "MODES entries must be simple, extended or prepared (got '$m')"
done
[[ -n ${CLIENTS// /} ]] || die "CLIENTS is empty"
[[ -n ${MODES// /} ]] || die "MODES is empty"

# ---------------------------------------------------------- root handling ---
if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to own the cluster"
    command -v runuser >/dev/null || die "running as root but 'runuser' is not available"
    as_pg() { runuser -u postgres -- "$@"; }
    PGBOUNCER_USER_OPT=(-u postgres) # pgbouncer refuses to run as root without -u
else
    as_pg() { "$@"; }
    PGBOUNCER_USER_OPT=()
fi

# ----------------------------------------------------- PostgreSQL binaries ---
PG_BIN=""
if command -v pg_config >/dev/null 2>&1; then
    cand=$(pg_config --bindir 2>/dev/null || true)
    [[ -n $cand && -x $cand/initdb ]] && PG_BIN=$cand
fi
if [[ -z $PG_BIN ]]; then
    cand=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $cand ]] && PG_BIN=$cand
fi
[[ -n $PG_BIN ]] || die "no PostgreSQL binaries found (tried pg_config --bindir and /usr/lib/postgresql/*/bin)"
for b in initdb pg_ctl postgres pgbench psql; do
    [[ -x $PG_BIN/$b ]] || die "$PG_BIN/$b not found or not executable"
done
INITDB=$PG_BIN/initdb
PG_CTL=$PG_BIN/pg_ctl
PGBENCH=$PG_BIN/pgbench
PSQL=$PG_BIN/psql
log "PostgreSQL binaries: $PG_BIN"

# -------------------------------------------------------------- pgbouncer ---
find_pgbouncer() {
    command -v pgbouncer 2>/dev/null || { [[ -x /usr/sbin/pgbouncer ]] && echo /usr/sbin/pgbouncer; } || true
}
PGBOUNCER=$(find_pgbouncer)
if [[ -z $PGBOUNCER ]]; then
    log "pgbouncer not found; installing it with apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer; } >&2; then
        die "could not install pgbouncer with apt-get (need root and network); install it manually and re-run"
    fi
    PGBOUNCER=$(find_pgbouncer)
    [[ -n $PGBOUNCER ]] || die "pgbouncer was installed but the binary cannot be found"
fi
log "pgbouncer: $PGBOUNCER"

command -v python3 >/dev/null || die "python3 is needed to pick free ports"
command -v cargo >/dev/null || die "cargo not found"

# ------------------------------------------------------------ build pgveil ---
log "building pgveil (cargo build --release)"
cargo build --release --quiet
PGVEIL=$REPO_ROOT/target/release/pgveil
[[ -x $PGVEIL ]] || die "$PGVEIL was not produced by the build"

# ------------------------------------------------------------------ ports ---
# Bind all three at once so they are distinct.
read -r PG_PORT BOUNCER_PORT VEIL_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(3):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
[[ -n ${VEIL_PORT:-} ]] || die "could not pick free ports"

# ---------------------------------------------------------------- cluster ---
TMP=$(mktemp -d "${TMPDIR:-/tmp}/pgveil-bench.XXXXXX")
chmod 755 "$TMP"
[[ $(id -u) == 0 ]] && chown postgres: "$TMP"
PGDATA=$TMP/data

log "initdb in $PGDATA"
if ! as_pg "$INITDB" -D "$PGDATA" -A trust -U postgres -E UTF8 --locale=C >"$TMP/initdb.log" 2>&1; then
    cat "$TMP/initdb.log" >&2
    die "initdb failed"
fi

log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
PG_STARTED=1
if ! as_pg "$PG_CTL" start -D "$PGDATA" -w -t 60 -l "$TMP/postgres.log" \
    -o "-c fsync=off -c listen_addresses=127.0.0.1 -c port=$PG_PORT -c max_connections=100 -k $TMP" \
    >/dev/null 2>&1; then
    cat "$TMP/postgres.log" >&2 || true
    die "PostgreSQL did not start"
fi

CONN=(-h 127.0.0.1 -U postgres)
PG_VERSION=$("$PSQL" "${CONN[@]}" -p "$PG_PORT" -d postgres -XAtc 'SHOW server_version')

log "pgbench -i -s $SCALE"
if ! "$PGBENCH" "${CONN[@]}" -p "$PG_PORT" -i -s "$SCALE" -q postgres >"$TMP/pgbench-init.log" 2>&1; then
    cat "$TMP/pgbench-init.log" >&2
    die "pgbench -i failed"
fi

# Wait until a SELECT 1 goes through 127.0.0.1:$1 (process pid $2 must stay alive).
wait_ready() { # port pid name logfile
    local port=$1 pid=$2 name=$3 logfile=$4 i
    for i in $(seq 1 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$logfile" >&2 || true
            die "$name exited during startup (log above)"
        fi
        if "$PSQL" "${CONN[@]}" -p "$port" -d postgres -XAtqc 'SELECT 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    cat "$logfile" >&2 || true
    die "$name did not accept connections on port $port within 10s (log above)"
}

# -------------------------------------------------------------- pgbouncer ---
max_clients=0
for c in $CLIENTS; do (( c > max_clients )) && max_clients=$c; done
pool_size=$(( max_clients + 5 ))
max_client_conn=$(( max_clients + 10 > 100 ? max_clients + 10 : 100 ))

cat >"$TMP/userlist.txt" <<EOF
"postgres" ""
EOF
cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $TMP/userlist.txt
pool_mode = session
default_pool_size = $pool_size
max_client_conn = $max_client_conn
max_db_connections = 0
ignore_startup_parameters = extra_float_digits
server_reset_query = DISCARD ALL
logfile = $TMP/pgbouncer.log
pidfile = $TMP/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
[[ $(id -u) == 0 ]] && chown postgres: "$TMP/pgbouncer.ini" "$TMP/userlist.txt"

log "starting pgbouncer (session pooling) on 127.0.0.1:$BOUNCER_PORT"
"$PGBOUNCER" "${PGBOUNCER_USER_OPT[@]}" "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.stderr" 2>&1 &
PGBOUNCER_PID=$!
wait_ready "$BOUNCER_PORT" "$PGBOUNCER_PID" pgbouncer "$TMP/pgbouncer.stderr"
PGBOUNCER_VERSION=$("$PGBOUNCER" --version 2>/dev/null | head -n1)

# ----------------------------------------------------------------- pgveil ---
log "starting pgveil on 127.0.0.1:$VEIL_PORT"
(cd "$TMP" && PGVEIL_LOG=${PGVEIL_LOG:-warn} exec "$PGVEIL" run \
    --listen "127.0.0.1:$VEIL_PORT" --upstream "127.0.0.1:$PG_PORT" \
    ${PGVEIL_WORKERS:+--workers "$PGVEIL_WORKERS"}) >"$TMP/pgveil.log" 2>&1 &
PGVEIL_PID=$!
wait_ready "$VEIL_PORT" "$PGVEIL_PID" pgveil "$TMP/pgveil.log"

# ------------------------------------------------------------- benchmarks ---
declare -A TPS LAT
TARGETS=(direct pgbouncer pgveil)
declare -A PORT_OF=([direct]=$PG_PORT [pgbouncer]=$BOUNCER_PORT [pgveil]=$VEIL_PORT)
FAILURES=()

run_one() { # target mode clients
    local target=$1 mode=$2 c=$3 out tps lat
    local j=$(( c < 2 ? c : 2 ))
    local key="$mode/$c/$target"
    log "pgbench -S -M $mode -c $c -j $j -T $DURATION -> $target"
    if out=$("$PGBENCH" "${CONN[@]}" -p "${PORT_OF[$target]}" -S -n -M "$mode" \
        -c "$c" -j "$j" -T "$DURATION" postgres 2>&1); then
        tps=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$out" | head -n1)
        lat=$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' <<<"$out" | head -n1)
    else
        tps="" lat=""
    fi
    if [[ -z $tps || -z $lat ]]; then
        printf -- '---- pgbench against %s failed (mode %s, %s clients); output:\n%s\n----\n' \
            "$target" "$mode" "$c" "$out" >&2
        local pid=""
        [[ $target == pgveil ]] && pid=$PGVEIL_PID
        [[ $target == pgbouncer ]] && pid=$PGBOUNCER_PID
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "$target (pid $pid) is no longer running"
        fi
        FAILURES+=("$key")
    else
        TPS_RUNS[$key]+="$(printf "%.0f" "$tps") "
        LAT_RUNS[$key]+="$lat "
    fi
}

median() { # numbers... -> their median (FAIL when none)
    if [[ $# -eq 0 ]]; then echo FAIL; return; fi
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Rounds interleave the targets, rotating which goes first, so drift in the machine's
# load (other tenants, thermal) hits all three alike; the table shows medians.
declare -A TPS_RUNS LAT_RUNS
for round in $(seq 1 "$ROUNDS"); do
    for mode in $MODES; do
        for c in $CLIENTS; do
            for i in 0 1 2; do
                run_one "${TARGETS[$(( (i + round - 1) % 3 ))]}" "$mode" "$c"
            done
        done
    done
done
for key in "${!TPS_RUNS[@]}"; do
    # shellcheck disable=SC2086
    TPS[$key]=$(median ${TPS_RUNS[$key]})
    # shellcheck disable=SC2086
    LAT[$key]=$(median ${LAT_RUNS[$key]})
done
for mode in $MODES; do
    for c in $CLIENTS; do
        for target in "${TARGETS[@]}"; do
            [[ -n ${TPS[$mode/$c/$target]:-} ]] || { TPS[$mode/$c/$target]=FAIL; LAT[$mode/$c/$target]=FAIL; }
        done
    done
done

# ------------------------------------------------------------------ report ---
ratio() { # a b -> a/b with 2 decimals, or n/a
    if [[ $1 == FAIL || $2 == FAIL ]]; then echo n/a; return; fi
    awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f\n", a / b }'
}
fmt() { # number -> fixed decimals, FAIL stays
    if [[ $2 == FAIL ]]; then echo FAIL; else awk -v x="$2" -v d="$1" 'BEGIN { printf "%.*f\n", d, x }'; fi
}

{
    echo
    echo "## pgbench -S (select-only): direct vs PgBouncer vs pgveil"
    echo
    echo "- machine: $(nproc) CPUs ($(uname -srm))"
    echo "- PostgreSQL: $PG_VERSION ($PG_BIN)"
    echo "- PgBouncer: $PGBOUNCER_VERSION (pool_mode = session)"
    echo "- pgveil: $("$PGVEIL" --version 2>/dev/null || echo unknown) (workers: ${PGVEIL_WORKERS:-default, one per core})"
    echo "- scale $SCALE, ${DURATION}s per run, $ROUNDS interleaved rounds (medians shown), -j = min(clients, 2), fsync=off, TCP on 127.0.0.1"
    echo
    echo "| mode | clients | direct TPS | pgbouncer TPS | pgveil TPS | direct lat ms | pgbouncer lat ms | pgveil lat ms | pgveil/direct | pgveil/pgbouncer |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for mode in $MODES; do
        for c in $CLIENTS; do
            d=$mode/$c/direct b=$mode/$c/pgbouncer v=$mode/$c/pgveil
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$mode" "$c" \
                "$(fmt 0 "${TPS[$d]}")" "$(fmt 0 "${TPS[$b]}")" "$(fmt 0 "${TPS[$v]}")" \
                "$(fmt 3 "${LAT[$d]}")" "$(fmt 3 "${LAT[$b]}")" "$(fmt 3 "${LAT[$v]}")" \
                "$(ratio "${TPS[$v]}" "${TPS[$d]}")" "$(ratio "${TPS[$v]}" "${TPS[$b]}")"
        done
    done
    echo
    echo "Ratios are TPS ratios of the medians (higher is better for pgveil). Every run, TPS:"
    echo
    for mode in $MODES; do
        for c in $CLIENTS; do
            printf -- '- %s/%s: direct %s| pgbouncer %s| pgveil %s\n' "$mode" "$c" \
                "${TPS_RUNS[$mode/$c/direct]:-}" "${TPS_RUNS[$mode/$c/pgbouncer]:-}" "${TPS_RUNS[$mode/$c/pgveil]:-}"
        done
    done
}

if (( ${#FAILURES[@]} > 0 )); then
    log "failed runs: ${FAILURES[*]}"
    if [[ -s $TMP/pgveil.log ]]; then
        log "pgveil log (last 40 lines):"
        tail -n 40 "$TMP/pgveil.log" >&2
    fi
    exit 1
fi
