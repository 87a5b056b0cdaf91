# shellcheck shell=bash
# benches/lib.sh — helpers shared by the benchmark scripts in this folder.
# Source it (after `set -euo pipefail`), do not run it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# It provides:
#   log, die                          messages on stderr (die exits 1)
#   bench_install_traps               EXIT/INT/TERM/HUP cleanup: stops every process
#                                     registered with bench_track_pid (last first), the
#                                     cluster started by bench_start_cluster, and removes
#                                     $TMP
#   bench_track_pid PID NAME          have PID stopped on exit (SIGTERM, then SIGKILL)
#   bench_setup_root                  defines as_pg (runs a command as user postgres when
#                                     we are root, as ourselves otherwise); sets IS_ROOT
#   bench_find_pg_bin                 sets PG_BIN, INITDB, PG_CTL, PGBENCH, PSQL
#   bench_build_pgveil                cargo build --release; sets PGVEIL
#   bench_free_ports N                prints N distinct free 127.0.0.1 TCP ports
#   bench_make_tmp                    creates $TMP (readable by user postgres)
#   bench_start_cluster PORT [OPTS]   initdb + start in $TMP/data (fsync=off, trust auth,
#                                     127.0.0.1:PORT, sockets in $TMP); OPTS: more
#                                     postgres options, e.g. "-c max_connections=100"
#   wait_ready PORT PID NAME LOG [USER [DB]]
#                                     until `SELECT 1` passes through PORT (PID must live)
#   bench_start_pgveil NAME PORT LOG USER DB [RUN-ARGS...]
#                                     starts `$PGVEIL run RUN-ARGS` in the background with
#                                     its working directory in $TMP (so no config/pgveil.yaml
#                                     of the repo is picked up), PGVEIL_LOG (default warn),
#                                     --workers $PGVEIL_WORKERS when set, output to LOG; has
#                                     it stopped on exit and waits until USER can run
#                                     SELECT 1 on DB through 127.0.0.1:PORT; sets
#                                     BENCH_PGVEIL_PID
#   bench_exit_on_failures            uses FAILURES; shows the tail of $TMP/pgveil*.log
#   median, ratio, fmt                number helpers for the reports
#
# The caller's working directory is set to the repository root.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)
cd "$REPO_ROOT"

# Keep the user's libpq environment from redirecting our connections.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS PGPASSWORD PGPASSFILE

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- cleanup ---
TMP=""
PGDATA=""
PG_STARTED=0
BENCH_PIDS=()
BENCH_PID_NAMES=()

bench_track_pid() { # pid name
    BENCH_PIDS+=("$1")
    BENCH_PID_NAMES+=("$2")
}

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

bench_cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    local i
    for (( i = ${#BENCH_PIDS[@]} - 1; i >= 0; i-- )); do
        kill_and_wait "${BENCH_PIDS[$i]}" "${BENCH_PID_NAMES[$i]}"
    done
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

bench_install_traps() {
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

# ---------------------------------------------------------- root handling ---
IS_ROOT=0
# Until bench_setup_root runs (cleanup may call it early): run as ourselves.
as_pg() { "$@"; }

bench_setup_root() {
    if [[ $(id -u) == 0 ]]; then
        IS_ROOT=1
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to own the cluster"
        command -v runuser >/dev/null || die "running as root but 'runuser' is not available"
        as_pg() { runuser -u postgres -- "$@"; }
    else
        IS_ROOT=0
        as_pg() { "$@"; }
    fi
}

# ----------------------------------------------------- PostgreSQL binaries ---
bench_find_pg_bin() {
    local cand b
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
}

# ----------------------------------------------------------------- pgveil ---
bench_build_pgveil() {
    log "building pgveil (cargo build --release)"
    cargo build --release --quiet
    PGVEIL=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/pgveil
    [[ -x $PGVEIL ]] || die "$PGVEIL was not produced by the build"
}

# ------------------------------------------------------------------ ports ---
bench_free_ports() { # n -> n distinct free ports on one line
    # Bind all at once so they are distinct.
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# ---------------------------------------------------------------- cluster ---
bench_make_tmp() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/pgveil-bench.XXXXXX")
    chmod 755 "$TMP"
    if [[ $IS_ROOT == 1 ]]; then chown postgres: "$TMP"; fi
}

bench_start_cluster() { # port [extra postgres options]
    local port=$1 extra=${2:-}
    PGDATA=$TMP/data
    log "initdb in $PGDATA"
    if ! as_pg "$INITDB" -D "$PGDATA" -A trust -U postgres -E UTF8 --locale=C >"$TMP/initdb.log" 2>&1; then
        cat "$TMP/initdb.log" >&2
        die "initdb failed"
    fi

    log "starting PostgreSQL on 127.0.0.1:$port"
    PG_STARTED=1
    if ! as_pg "$PG_CTL" start -D "$PGDATA" -w -t 60 -l "$TMP/postgres.log" \
        -o "-c fsync=off -c listen_addresses=127.0.0.1 -c port=$port $extra -k $TMP" \
        >/dev/null 2>&1; then
        cat "$TMP/postgres.log" >&2 || true
        die "PostgreSQL did not start"
    fi
}

# Wait until a SELECT 1 goes through 127.0.0.1:$1 (process pid $2 must stay alive).
wait_ready() { # port pid name logfile [user [db]]
    local port=$1 pid=$2 name=$3 logfile=$4 user=${5:-postgres} db=${6:-postgres} i
    for i in $(seq 1 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$logfile" >&2 || true
            die "$name exited during startup (log above)"
        fi
        if "$PSQL" -h 127.0.0.1 -U "$user" -p "$port" -d "$db" -XAtqc 'SELECT 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    cat "$logfile" >&2 || true
    die "$name did not accept connections on port $port within 10s (log above)"
}

# ------------------------------------------------------- running pgveil ---
BENCH_PGVEIL_PID=""
bench_start_pgveil() { # name port logfile user db [pgveil run args...]
    local name=$1 port=$2 logfile=$3 user=$4 db=$5
    shift 5
    log "starting $name on 127.0.0.1:$port"
    (cd "$TMP" && PGVEIL_LOG=${PGVEIL_LOG:-warn} exec "$PGVEIL" run "$@" \
        ${PGVEIL_WORKERS:+--workers "$PGVEIL_WORKERS"}) >"$logfile" 2>&1 &
    BENCH_PGVEIL_PID=$!
    bench_track_pid "$BENCH_PGVEIL_PID" "$name"
    wait_ready "$port" "$BENCH_PGVEIL_PID" "$name" "$logfile" "$user" "$db"
}

# ---------------------------------------------------------------- numbers ---
bench_exit_on_failures() { # uses FAILURES (names of failed runs) and TMP
    if (( ${#FAILURES[@]} > 0 )); then
        log "failed runs: ${FAILURES[*]}"
        local pgveil_log
        for pgveil_log in "$TMP"/pgveil*.log; do
            [[ -s $pgveil_log ]] || continue
            log "${pgveil_log##*/} (last 40 lines):"
            tail -n 40 "$pgveil_log" >&2
        done
        exit 1
    fi
}

median() { # numbers... -> their median (FAIL when none)
    if [[ $# -eq 0 ]]; then echo FAIL; return; fi
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() { # a b -> a/b with 2 decimals, or n/a (when either is FAIL, skipped, …)
    if [[ ! $1 =~ ^[0-9] || ! $2 =~ ^[0-9] ]]; then echo n/a; return; fi
    awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f\n", a / b }'
}

fmt() { # decimals number -> fixed decimals; FAIL, skipped, … stay
    if [[ ! $2 =~ ^[0-9] ]]; then echo "$2"; else awk -v x="$2" -v d="$1" 'BEGIN { printf "%.*f\n", d, x }'; fi
}

paired_ratios() { # "a1 a2 …" "b1 b2 …" -> "b1/a1 b2/a2 …" (3 decimals); empty when the counts differ
    awk -v a="$1" -v b="$2" 'BEGIN {
        n = split(a, x, " "); m = split(b, y, " ");
        if (n != m || n == 0) exit;
        for (i = 1; i <= n; i++) printf "%s%.3f", (i > 1 ? " " : ""), y[i] / x[i];
        print "" }'
}

paired_summary() { # "r1 r2 …" -> their geometric mean and its 95% interval (Student's t on logs)
    awk -v r="$1" 'BEGIN {
        n = split(r, x, " ");
        if (n == 0) { print "n/a"; exit }
        for (i = 1; i <= n; i++) { l[i] = log(x[i]); s += l[i] }
        m = s / n;
        if (n < 2) { printf "geometric mean %.3f over 1 round (no interval)\n", exp(m); exit }
        for (i = 1; i <= n; i++) v += (l[i] - m) ^ 2;
        sd = sqrt(v / (n - 1)); df = n - 1;
        # 97.5% quantile of Student t: from the table up to 4 degrees of freedom, else
        # the Cornish-Fisher expansion around the normal 1.96 (2.547 for 2.571 at 5,
        # closer above).
        z = 1.959964;
        if (df == 1) t = 12.706; else if (df == 2) t = 4.303;
        else if (df == 3) t = 3.182; else if (df == 4) t = 2.776;
        else t = z + (z^3 + z) / (4 * df) + (5 * z^5 + 16 * z^3 + 3 * z) / (96 * df^2);
        h = t * sd / sqrt(n);
        printf "geometric mean %.3f, 95%% interval %.3f-%.3f, over %d rounds\n", exp(m), exp(m - h), exp(m + h), n }'
}
