#!/usr/bin/env bash
# benches/protected_read.sh — what masking costs: throughput of a protected point read
# through pgveil for a role that gets all three columns masked, against the same read for
# a role that may see everything, against direct PostgreSQL.
#
# The query (pgbench custom script, id uniformly random over the table):
#
#   SELECT name, phone, id_card FROM customers WHERE id = $1
#
# Three targets, interleaved in ROUNDS rounds (the one going first rotates, so drift in
# the machine's load hits all alike); the table shows medians:
#   direct  PostgreSQL itself, login bench_masked (nothing can mask there: the baseline)
#   plain   pgveil, login bench_plain  (policy: allow on all three columns)
#   masked  pgveil, login bench_masked (policy: cn_name, cn_mobile, cn_id_card masks)
# Target from the issue: masked/plain >= 0.90 (TARGET).
#
# Usage (from any directory):
#   benches/protected_read.sh
#   DURATION=30 ROUNDS=5 CLIENTS=16 benches/protected_read.sh
#
# Knobs (environment variables):
#   DURATION  seconds per pgbench run                                  (default 15)
#   ROUNDS    interleaved rounds; medians are shown                    (default 3)
#   CLIENTS   pgbench -c                                               (default 8)
#   JOBS      pgbench -j (capped at CLIENTS)                           (default 2)
#   MODE      pgbench -M: simple, extended or prepared                 (default prepared)
#   ROWS      rows in customers                                        (default 100000)
#   WARMUP    seconds of discarded warm-up per target before round 1, 0 = none (default 3)
#   TARGET    the masked/plain ratio to meet                           (default 0.90)
#   STRICT    1: exit 3 when masked/plain is below TARGET              (default 0)
#   PGVEIL_WORKERS  pgveil --workers (default: pgveil's own default)
#   AUDIT     1: pgveil keeps an audit log (audit.jsonl in the temp dir; every protected
#             read is one record), to measure what auditing costs   (default 0)
#
# What it does, in one go:
#   * builds pgveil (cargo build --release) and creates a throwaway PostgreSQL cluster in a
#     temp dir (fsync=off, trust auth on 127.0.0.1, owned by user postgres when run as
#     root; helpers shared with pgbench.sh in benches/lib.sh);
#   * creates database `bench`, logins bench_plain, bench_masked and pgveil_catalog
#     (pgveil's catalog login), and loads `customers` (id int primary key, name, phone,
#     id_card text) with ROWS rows of fake Chinese-style data from generate_series:
#     names like 张三丰, 11-digit mobiles (13x/15x/18x…), 18-character resident ID
#     numbers with a real region code, birth date and GB 11643 check digit;
#   * writes a policy (SPEC format) and a config, starts pgveil on a free port;
#   * checks that masking really happens before measuring (and again after): through
#     pgveil, bench_masked must see exactly the SPEC masks (张**, 138****5678,
#     110105********1234) and bench_plain the plaintext, both with psql (simple protocol)
#     and with pgbench in MODE running the benchmark statement itself; otherwise it stops
#     with an error naming what came back;
#   * runs the rounds and prints a markdown table: median TPS and latency per target,
#     masked/plain against TARGET, and each target against direct.
# Everything it started is stopped, and the temp dir removed, on exit — including errors
# and Ctrl-C. A failed pgbench run shows as FAIL and makes the exit status 1.
#
# Note: pgveil runs with its working directory in the temp dir and an explicit --config,
# so a config/pgveil.yaml in the repo is not picked up.

set -euo pipefail

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
MODE=${MODE:-prepared}
ROWS=${ROWS:-100000}
WARMUP=${WARMUP:-3}
TARGET=${TARGET:-0.90}
STRICT=${STRICT:-0}

# shellcheck source=benches/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh" # cds to the repo root
bench_install_traps
export PGCLIENTENCODING=UTF8

# ------------------------------------------------------------- validation ---
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (got '$DURATION')"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
[[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be a positive integer (got '$CLIENTS')"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer (got '$JOBS')"
[[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive integer (got '$ROWS')"
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be a non-negative integer (got '$WARMUP')"
[[ $TARGET =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "TARGET must be a number such as 0.90 (got '$TARGET')"
[[ $STRICT == 0 || $STRICT == 1 ]] || die "STRICT must be 0 or 1 (got '$STRICT')"
[[ $MODE == simple || $MODE == extended || $MODE == prepared ]] \
    || die "MODE must be simple, extended or prepared (got '$MODE')"
(( ROWS >= 4 )) || die "ROWS must be at least 4 (the masking check reads ids 1, 2, ROWS/2 and ROWS)"
(( CLIENTS <= 90 )) || die "CLIENTS must be at most 90 (the cluster has max_connections=100)"
JOBS=$(( JOBS < CLIENTS ? JOBS : CLIENTS ))

bench_setup_root
bench_find_pg_bin
command -v python3 >/dev/null || die "python3 is needed to pick free ports"
command -v cargo >/dev/null || die "cargo not found"
bench_build_pgveil

read -r PG_PORT VEIL_PORT < <(bench_free_ports 2)
[[ -n ${VEIL_PORT:-} ]] || die "could not pick free ports"

# ---------------------------------------------------------------- cluster ---
bench_make_tmp
bench_start_cluster "$PG_PORT" "-c max_connections=100"
DB=bench

# psql against PORT as USER on $DB; SQL on stdin or with -c.
sql() { # port user psql-args...
    local port=$1 user=$2
    shift 2
    "$PSQL" -h 127.0.0.1 -p "$port" -U "$user" -d "$DB" -X -v ON_ERROR_STOP=1 -q "$@"
}

PG_VERSION=$("$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -XAtc 'SHOW server_version')
"$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Xq -v ON_ERROR_STOP=1 \
    -c "CREATE DATABASE $DB" >/dev/null

log "loading customers ($ROWS rows)"
if ! sql "$PG_PORT" postgres -v rows="$ROWS" >"$TMP/load.log" 2>&1 <<'EOF'; then
CREATE ROLE bench_plain LOGIN;
CREATE ROLE bench_masked LOGIN;
CREATE ROLE pgveil_catalog LOGIN;
EOF
    cat "$TMP/load.log" >&2
    die "creating the logins failed"
fi
if ! sql "$PG_PORT" postgres -v rows="$ROWS" -f benches/customers.sql >"$TMP/load.log" 2>&1 \
    || ! sql "$PG_PORT" postgres -c "GRANT SELECT ON customers TO bench_plain, bench_masked" \
        >>"$TMP/load.log" 2>&1; then
    cat "$TMP/load.log" >&2
    die "loading the customers table failed"
fi

# ------------------------------------------------------------ pgveil setup ---
cat >"$TMP/policy.yaml" <<'EOF'
version: 1
roles:
  plain: { members: [bench_plain] }
  masked: { members: [bench_masked] }
tables:
  public.customers:
    columns:
      name:    { level: L2, mask: cn_name,    access: { plain: allow } }
      phone:   { level: L3, mask: cn_mobile,  access: { plain: allow } }
      id_card: { level: L3, mask: cn_id_card, access: { plain: allow } }
EOF
cat >"$TMP/pgveil.yaml" <<EOF
listen: 127.0.0.1:$VEIL_PORT
upstream:
  host: 127.0.0.1
  port: $PG_PORT
  sslmode: disable
catalog:
  user: pgveil_catalog
  database: $DB
policy: policy.yaml
limits:
  shutdown_grace_seconds: 2
EOF
if [ "${AUDIT:-0}" = 1 ]; then
    printf 'audit:\n  path: audit.jsonl\n' >>"$TMP/pgveil.yaml"
fi

if ! "$PGVEIL" policy check "$TMP/policy.yaml" >"$TMP/policy-check.log" 2>&1; then
    cat "$TMP/policy-check.log" >&2
    die "pgveil rejects the benchmark policy (above)"
fi

log "starting pgveil on 127.0.0.1:$VEIL_PORT (policy: name, phone, id_card masked for bench_masked)"
(cd "$TMP" && PGVEIL_LOG=${PGVEIL_LOG:-warn} exec "$PGVEIL" run --config "$TMP/pgveil.yaml" \
    ${PGVEIL_WORKERS:+--workers "$PGVEIL_WORKERS"}) >"$TMP/pgveil.log" 2>&1 &
PGVEIL_PID=$!
bench_track_pid "$PGVEIL_PID" pgveil
wait_ready "$VEIL_PORT" "$PGVEIL_PID" pgveil "$TMP/pgveil.log" bench_plain "$DB"

# ----------------------------------------------------------- masking check ---
CHECK_IDS="1, 2, $(( ROWS / 2 )), $ROWS"
SELECT_CHECK="SELECT id, name, phone, id_card FROM customers WHERE id IN ($CHECK_IDS) ORDER BY id"

# The SPEC masks, computed by PostgreSQL from the plaintext: cn_name keeps the surname
# (first character), cn_mobile the first 3 and last 4 digits, cn_id_card the first 6 and
# last 4 characters; every other character becomes one '*'.
EXPECTED_PLAIN=$(sql "$PG_PORT" postgres -AtF $'\t' -c "$SELECT_CHECK")
EXPECTED_MASKED=$(sql "$PG_PORT" postgres -AtF $'\t' -c "
    SELECT id,
        left(name, 1) || repeat('*', char_length(name) - 1),
        left(phone, 3) || repeat('*', char_length(phone) - 7) || right(phone, 4),
        left(id_card, 6) || repeat('*', char_length(id_card) - 10) || right(id_card, 4)
    FROM customers WHERE id IN ($CHECK_IDS) ORDER BY id")

# pgbench in $MODE runs the benchmark statement for id 1 and \gsets the row; the second
# statement fails (division by zero) unless all three values are what $2..$4 say.
pgbench_check() { # user name phone id_card
    local user=$1 out
    cat >"$TMP/check-$user.sql" <<EOF
\\set id 1
SELECT name, phone, id_card FROM customers WHERE id = :id \\gset
SELECT 1 / (:name::text = '$2' AND :phone::text = '$3' AND :id_card::text = '$4')::int;
EOF
    if ! out=$("$PGBENCH" -h 127.0.0.1 -p "$VEIL_PORT" -U "$user" -n -M "$MODE" -c 1 -t 1 \
        -f "$TMP/check-$user.sql" "$DB" 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
    fi
}

check_masking() { # when (before/after)
    local when=$1 got_plain got_masked
    log "checking masking through pgveil ($when measuring)"
    got_plain=$(sql "$VEIL_PORT" bench_plain -AtF $'\t' -c "$SELECT_CHECK" 2>&1) || true
    got_masked=$(sql "$VEIL_PORT" bench_masked -AtF $'\t' -c "$SELECT_CHECK" 2>&1) || true
    if [[ $got_plain != "$EXPECTED_PLAIN" ]]; then
        printf -- '---- bench_plain through pgveil, expected (plaintext):\n%s\n---- got:\n%s\n----\n' \
            "$EXPECTED_PLAIN" "$got_plain" >&2
        die "masking check failed ($when measuring): bench_plain does not see the plaintext through pgveil"
    fi
    if [[ $got_masked != "$EXPECTED_MASKED" ]]; then
        printf -- '---- bench_masked through pgveil, expected (SPEC masks):\n%s\n---- got:\n%s\n----\n' \
            "$EXPECTED_MASKED" "$got_masked" >&2
        if [[ $got_masked == "$EXPECTED_PLAIN" ]]; then
            die "masking check failed ($when measuring): bench_masked sees PLAINTEXT through pgveil — the policy is not applied, so the benchmark would measure nothing"
        fi
        die "masking check failed ($when measuring): bench_masked does not get the masked values through pgveil"
    fi
    local plain1 masked1
    plain1=$(head -n1 <<<"$EXPECTED_PLAIN")
    masked1=$(head -n1 <<<"$EXPECTED_MASKED")
    IFS=$'\t' read -r _ p_name p_phone p_id <<<"$plain1"
    IFS=$'\t' read -r _ m_name m_phone m_id <<<"$masked1"
    pgbench_check bench_plain "$p_name" "$p_phone" "$p_id" \
        || die "masking check failed ($when measuring): pgbench -M $MODE as bench_plain did not get the plaintext of id 1 through pgveil"
    pgbench_check bench_masked "$m_name" "$m_phone" "$m_id" \
        || die "masking check failed ($when measuring): pgbench -M $MODE as bench_masked did not get $m_name | $m_phone | $m_id for id 1 through pgveil"
    SAMPLE_PLAIN="$p_name | $p_phone | $p_id"
    SAMPLE_MASKED="$m_name | $m_phone | $m_id"
}
check_masking before

# ------------------------------------------------------------- benchmarks ---
cat >"$TMP/protected_read.sql" <<EOF
\\set id random(1, $ROWS)
SELECT name, phone, id_card FROM customers WHERE id = :id;
EOF

TARGETS=(direct plain masked)
declare -A PORT_OF=([direct]=$PG_PORT [plain]=$VEIL_PORT [masked]=$VEIL_PORT)
declare -A USER_OF=([direct]=bench_masked [plain]=bench_plain [masked]=bench_masked)
declare -A TPS_RUNS=() LAT_RUNS=() TPS_OF_ROUND=() TPS=() LAT=()
FAILURES=()

pgbench_run() { # target seconds -> pgbench output; status of pgbench
    "$PGBENCH" -h 127.0.0.1 -p "${PORT_OF[$1]}" -U "${USER_OF[$1]}" -n -M "$MODE" \
        -c "$CLIENTS" -j "$JOBS" -T "$2" -f "$TMP/protected_read.sql" "$DB" 2>&1
}

run_one() { # target round
    local target=$1 round=$2 out tps lat
    log "round $round/$ROUNDS: pgbench -M $MODE -c $CLIENTS -j $JOBS -T $DURATION -> $target (${USER_OF[$target]})"
    if out=$(pgbench_run "$target" "$DURATION"); then
        tps=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$out" | head -n1)
        lat=$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' <<<"$out" | head -n1)
    else
        tps="" lat=""
    fi
    if [[ -z $tps || -z $lat ]]; then
        printf -- '---- pgbench against %s failed (round %s); output:\n%s\n----\n' "$target" "$round" "$out" >&2
        if [[ $target != direct ]] && ! kill -0 "$PGVEIL_PID" 2>/dev/null; then
            log "pgveil (pid $PGVEIL_PID) is no longer running"
        fi
        FAILURES+=("$target/round$round")
    else
        TPS_RUNS[$target]+="$(printf "%.0f" "$tps") "
        TPS_OF_ROUND[$target/$round]=$tps
        LAT_RUNS[$target]+="$lat "
    fi
}

if (( WARMUP > 0 )); then
    for target in "${TARGETS[@]}"; do
        log "warm-up: ${WARMUP}s -> $target"
        pgbench_run "$target" "$WARMUP" >/dev/null || log "warm-up against $target failed (ignored; the measured runs will tell)"
    done
fi

for round in $(seq 1 "$ROUNDS"); do
    for i in 0 1 2; do
        run_one "${TARGETS[$(( (i + round - 1) % 3 ))]}" "$round"
    done
done

check_masking after

for target in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    TPS[$target]=$(median ${TPS_RUNS[$target]:-})
    # shellcheck disable=SC2086
    LAT[$target]=$(median ${LAT_RUNS[$target]:-})
done

# ------------------------------------------------------------------ report ---
MASKED_VS_PLAIN=$(ratio "${TPS[masked]}" "${TPS[plain]}")
if [[ $MASKED_VS_PLAIN == n/a ]]; then
    VERDICT="not measured"
elif awk -v r="$MASKED_VS_PLAIN" -v t="$TARGET" 'BEGIN { exit !(r + 0 >= t + 0) }'; then
    VERDICT="met"
else
    VERDICT="MISSED"
fi
# The same ratio within each round (its three runs ran back to back, so they shared the
# machine's load of the moment), and the median of those.
ROUND_RATIOS=""
for round in $(seq 1 "$ROUNDS"); do
    if [[ -n ${TPS_OF_ROUND[masked/$round]:-} && -n ${TPS_OF_ROUND[plain/$round]:-} ]]; then
        ROUND_RATIOS+="$(ratio "${TPS_OF_ROUND[masked/$round]}" "${TPS_OF_ROUND[plain/$round]}") "
    fi
done
# shellcheck disable=SC2086
ROUND_RATIO_MEDIAN=$(median $ROUND_RATIOS)
[[ $ROUND_RATIO_MEDIAN == FAIL ]] || ROUND_RATIO_MEDIAN=$(fmt 2 "$ROUND_RATIO_MEDIAN")

if [[ ${LAT[masked]} != FAIL && ${LAT[plain]} != FAIL ]]; then
    MASK_COST=$(awk -v m="${LAT[masked]}" -v p="${LAT[plain]}" 'BEGIN { printf "%+.1f", (m - p) * 1000 }')
else
    MASK_COST=n/a
fi

{
    echo
    echo "## Protected read: pgveil masking role vs plaintext role vs direct PostgreSQL"
    echo
    echo "- query: \`SELECT name, phone, id_card FROM customers WHERE id = \$1\`, id uniformly random in 1..$ROWS ($ROWS rows)"
    echo "- pgbench -M $MODE -c $CLIENTS -j $JOBS -T $DURATION -n; ${WARMUP}s warm-up per target; $ROUNDS interleaved rounds, medians shown"
    echo "- machine: $(nproc) CPUs ($(uname -srm)); fsync=off, TCP on 127.0.0.1"
    echo "- PostgreSQL: $PG_VERSION ($PG_BIN)"
    echo "- pgveil: $("$PGVEIL" --version 2>/dev/null || echo unknown) (workers: ${PGVEIL_WORKERS:-default, one per core})"
    if [ "${AUDIT:-0}" = 1 ]; then
        echo "- audit log: on, $(wc -l <"$TMP/audit.jsonl" 2>/dev/null || echo 0) records written (one per protected read)"
    else
        echo "- audit log: off"
    fi
    echo "- checked before and after measuring (psql and pgbench -M $MODE), id 1: bench_plain sees \`$SAMPLE_PLAIN\`, bench_masked sees \`$SAMPLE_MASKED\`"
    echo
    echo "| target | login | columns | TPS | avg lat ms | vs direct |"
    echo "|---|---|---|---:|---:|---:|"
    printf '| direct PostgreSQL | bench_masked | plaintext (no proxy) | %s | %s | %s |\n' \
        "$(fmt 0 "${TPS[direct]}")" "$(fmt 3 "${LAT[direct]}")" "$(ratio "${TPS[direct]}" "${TPS[direct]}")"
    printf '| pgveil | bench_plain | plaintext (allow) | %s | %s | %s |\n' \
        "$(fmt 0 "${TPS[plain]}")" "$(fmt 3 "${LAT[plain]}")" "$(ratio "${TPS[plain]}" "${TPS[direct]}")"
    printf '| pgveil | bench_masked | masked: cn_name, cn_mobile, cn_id_card | %s | %s | %s |\n' \
        "$(fmt 0 "${TPS[masked]}")" "$(fmt 3 "${LAT[masked]}")" "$(ratio "${TPS[masked]}" "${TPS[direct]}")"
    echo
    echo "**masked / plain through pgveil: $MASKED_VS_PLAIN (target >= $TARGET: $VERDICT)**; masking adds $MASK_COST µs to the average latency."
    echo
    echo "masked / plain within each round: ${ROUND_RATIOS:-none}(median $ROUND_RATIO_MEDIAN)."
    echo
    echo "Ratios are TPS ratios of the medians unless said otherwise. Every run's TPS, round by round:"
    echo
    for target in "${TARGETS[@]}"; do
        printf -- '- %s: %s\n' "$target" "${TPS_RUNS[$target]:-}"
    done
}

bench_exit_on_failures
if [[ $STRICT == 1 && $VERDICT != met ]]; then
    log "masked/plain = $MASKED_VS_PLAIN is below TARGET = $TARGET"
    exit 3
fi
