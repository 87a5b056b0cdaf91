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
# The cluster, port, build and cleanup helpers live in benches/lib.sh (shared with
# benches/protected_read.sh).
#
# Note: pgveil is started with its working directory set to the temp dir, so
# a config/pgveil.yaml in the repo is NOT picked up; only the flags apply.

set -euo pipefail

DURATION=${DURATION:-15}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-"1 8"}
MODES=${MODES:-"simple prepared"}
ROUNDS=${ROUNDS:-3}

# shellcheck source=benches/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh" # cds to the repo root

PGVEIL_PID=""
PGBOUNCER_PID=""
bench_install_traps

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
bench_setup_root
if [[ $IS_ROOT == 1 ]]; then
    PGBOUNCER_USER_OPT=(-u postgres) # pgbouncer refuses to run as root without -u
else
    PGBOUNCER_USER_OPT=()
fi

# ----------------------------------------------------- PostgreSQL binaries ---
bench_find_pg_bin

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
bench_build_pgveil

# ------------------------------------------------------------------ ports ---
read -r PG_PORT BOUNCER_PORT VEIL_PORT < <(bench_free_ports 3)
[[ -n ${VEIL_PORT:-} ]] || die "could not pick free ports"

# ---------------------------------------------------------------- cluster ---
bench_make_tmp
bench_start_cluster "$PG_PORT" "-c max_connections=100"

CONN=(-h 127.0.0.1 -U postgres)
PG_VERSION=$("$PSQL" "${CONN[@]}" -p "$PG_PORT" -d postgres -XAtc 'SHOW server_version')

log "pgbench -i -s $SCALE"
if ! "$PGBENCH" "${CONN[@]}" -p "$PG_PORT" -i -s "$SCALE" -q postgres >"$TMP/pgbench-init.log" 2>&1; then
    cat "$TMP/pgbench-init.log" >&2
    die "pgbench -i failed"
fi

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
if [[ $IS_ROOT == 1 ]]; then chown postgres: "$TMP/pgbouncer.ini" "$TMP/userlist.txt"; fi

log "starting pgbouncer (session pooling) on 127.0.0.1:$BOUNCER_PORT"
"$PGBOUNCER" "${PGBOUNCER_USER_OPT[@]}" "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.stderr" 2>&1 &
PGBOUNCER_PID=$!
bench_track_pid "$PGBOUNCER_PID" pgbouncer
wait_ready "$BOUNCER_PORT" "$PGBOUNCER_PID" pgbouncer "$TMP/pgbouncer.stderr"
PGBOUNCER_VERSION=$("$PGBOUNCER" --version 2>/dev/null | head -n1)

# ----------------------------------------------------------------- pgveil ---
log "starting pgveil on 127.0.0.1:$VEIL_PORT"
(cd "$TMP" && PGVEIL_LOG=${PGVEIL_LOG:-warn} exec "$PGVEIL" run \
    --listen "127.0.0.1:$VEIL_PORT" --upstream "127.0.0.1:$PG_PORT" \
    ${PGVEIL_WORKERS:+--workers "$PGVEIL_WORKERS"}) >"$TMP/pgveil.log" 2>&1 &
PGVEIL_PID=$!
bench_track_pid "$PGVEIL_PID" pgveil
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

bench_exit_on_failures
