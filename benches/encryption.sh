#!/usr/bin/env bash
# benches/encryption.sh — what encryption at rest costs, all through one pgveil:
#
#   writes: prepared INSERTs of three values (name, phone, id_card) into a table whose
#           three columns are encrypted (name and phone randomized, id_card
#           deterministic) against the same INSERTs into a plaintext table;
#   reads:  the protected point read `SELECT name, phone, id_card FROM … WHERE id = $1`
#           on a table with the three columns encrypted against the same read on the
#           plaintext `customers` table, for a role that may see everything (decrypt
#           only) and for a role that gets the SPEC masks (decrypt, then mask).
#
# Targets (pgbench custom scripts), interleaved in ROUNDS rounds whose order rotates; the
# table shows medians:
#   direct          PostgreSQL itself: the read on plaintext `customers` (baseline)
#   read-plain      pgveil, bench_plain,  plaintext customers      (allow)
#   read-enc        pgveil, bench_plain,  encrypted enc_customers  (decrypt)
#   read-masked     pgveil, bench_masked, plaintext customers      (mask)
#   read-enc-masked pgveil, bench_masked, encrypted enc_customers  (decrypt + mask)
#   insert-plain    pgveil, bench_plain,  INSERT into plain_writes
#   insert-enc      pgveil, bench_plain,  INSERT into enc_writes   (3 values encrypted)
# Target from the issue: every encrypted/plaintext ratio >= 0.85 (TARGET).
#
# Usage (from any directory):
#   benches/encryption.sh
#   DURATION=30 ROUNDS=5 benches/encryption.sh
#
# Knobs (environment variables):
#   DURATION  seconds per pgbench run                          (default 15)
#   ROUNDS    interleaved rounds; medians are shown            (default 3)
#   CLIENTS   pgbench -c                                       (default 8)
#   JOBS      pgbench -j (capped at CLIENTS)                   (default 2)
#   ROWS      rows in customers and enc_customers              (default 100000)
#   WARMUP    seconds of discarded warm-up per target, 0 = none (default 3)
#   TARGET    the encrypted/plaintext ratio to meet            (default 0.85)
#   PGVEIL_WORKERS  pgveil --workers (default: pgveil's own default)
#
# What it does: builds pgveil (release), starts a throwaway cluster (benches/lib.sh),
# loads `customers` (benches/customers.sql), makes a keyring with `pgveil keys generate`,
# starts pgveil with a policy that masks `customers` and encrypts `enc_customers` and
# `enc_writes`, and fills `enc_customers` with the rows of `customers` by psql's `\copy`
# THROUGH pgveil (so COPY … FROM STDIN encrypts them). Before measuring it checks that
# enc_customers holds only ciphertext when read directly and that both roles read the
# right plaintext or masks through pgveil; afterwards it checks that every row the
# insert benchmark wrote into enc_writes is ciphertext. Everything it started is stopped
# on exit. A failed run shows as FAIL and makes the exit status 1.

set -euo pipefail

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
ROWS=${ROWS:-100000}
WARMUP=${WARMUP:-3}
TARGET=${TARGET:-0.85}

# shellcheck source=benches/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh" # cds to the repo root
bench_install_traps
export PGCLIENTENCODING=UTF8

[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (got '$DURATION')"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
[[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be a positive integer (got '$CLIENTS')"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer (got '$JOBS')"
[[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive integer (got '$ROWS')"
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be a non-negative integer (got '$WARMUP')"
[[ $TARGET =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "TARGET must be a number such as 0.85 (got '$TARGET')"
(( CLIENTS <= 90 )) || die "CLIENTS must be at most 90 (the cluster has max_connections=100)"
JOBS=$(( JOBS < CLIENTS ? JOBS : CLIENTS ))

bench_setup_root
bench_find_pg_bin
command -v python3 >/dev/null || die "python3 is needed to pick free ports"
command -v cargo >/dev/null || die "cargo not found"
bench_build_pgveil

read -r PG_PORT VEIL_PORT < <(bench_free_ports 2)
[[ -n ${VEIL_PORT:-} ]] || die "could not pick free ports"

bench_make_tmp
bench_start_cluster "$PG_PORT" "-c max_connections=100"
DB=bench

sql() { # port user psql-args...
    local port=$1 user=$2
    shift 2
    "$PSQL" -h 127.0.0.1 -p "$port" -U "$user" -d "$DB" -X -v ON_ERROR_STOP=1 -q "$@"
}

PG_VERSION=$("$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -XAtc 'SHOW server_version')
"$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Xq -v ON_ERROR_STOP=1 \
    -c "CREATE DATABASE $DB" >/dev/null

log "loading customers ($ROWS rows)"
{
    sql "$PG_PORT" postgres <<'EOF' &&
CREATE ROLE bench_plain LOGIN;
CREATE ROLE bench_masked LOGIN;
CREATE ROLE pgveil_catalog LOGIN;
CREATE TABLE enc_customers (id int PRIMARY KEY, name text NOT NULL, phone text NOT NULL, id_card text NOT NULL);
CREATE TABLE plain_writes (id bigserial PRIMARY KEY, name text, phone text, id_card text);
CREATE TABLE enc_writes (id bigserial PRIMARY KEY, name text, phone text, id_card text);
GRANT SELECT, INSERT ON enc_customers, plain_writes, enc_writes TO bench_plain;
GRANT SELECT ON enc_customers TO bench_masked;
GRANT USAGE ON SEQUENCE plain_writes_id_seq, enc_writes_id_seq TO bench_plain;
EOF
    sql "$PG_PORT" postgres -v rows="$ROWS" -f benches/customers.sql &&
    sql "$PG_PORT" postgres -c "GRANT SELECT ON customers TO bench_plain, bench_masked"
} >"$TMP/load.log" 2>&1 || { cat "$TMP/load.log" >&2; die "loading the tables failed"; }

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
  public.enc_customers:
    columns:
      name:    { level: L2, mask: cn_name,    encrypt: randomized,    access: { plain: allow } }
      phone:   { level: L3, mask: cn_mobile,  encrypt: randomized,    access: { plain: allow } }
      id_card: { level: L3, mask: cn_id_card, encrypt: deterministic, access: { plain: allow } }
  public.enc_writes:
    columns:
      name:    { level: L2, mask: cn_name,    encrypt: randomized,    access: { plain: allow } }
      phone:   { level: L3, mask: cn_mobile,  encrypt: randomized,    access: { plain: allow } }
      id_card: { level: L3, mask: cn_id_card, encrypt: deterministic, access: { plain: allow } }
EOF
"$PGVEIL" keys generate --out "$TMP/keyring.yaml" >/dev/null
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
keyring: keyring.yaml
limits:
  shutdown_grace_seconds: 2
EOF

log "starting pgveil on 127.0.0.1:$VEIL_PORT"
(cd "$TMP" && PGVEIL_LOG=${PGVEIL_LOG:-warn} exec "$PGVEIL" run --config "$TMP/pgveil.yaml" \
    ${PGVEIL_WORKERS:+--workers "$PGVEIL_WORKERS"}) >"$TMP/pgveil.log" 2>&1 &
PGVEIL_PID=$!
bench_track_pid "$PGVEIL_PID" pgveil
wait_ready "$VEIL_PORT" "$PGVEIL_PID" pgveil "$TMP/pgveil.log" bench_plain "$DB"

# ------------------------------------------- enc_customers, through pgveil ---
log "copying customers into enc_customers through pgveil (COPY … FROM STDIN encrypts)"
sql "$PG_PORT" postgres -c "\\copy customers TO '$TMP/customers.tsv'"
COPY_START=$(date +%s.%N)
sql "$VEIL_PORT" bench_plain -c "\\copy enc_customers FROM '$TMP/customers.tsv'" \
    || die "COPY into enc_customers through pgveil failed"
COPY_SECONDS=$(awk -v s="$COPY_START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
sql "$PG_PORT" postgres -c "VACUUM ANALYZE enc_customers"

CHECK="SELECT id, name, phone, id_card FROM %s WHERE id IN (1, 2, $(( ROWS / 2 )), $ROWS) ORDER BY id"
# shellcheck disable=SC2059
check_reads() {
    local plaintext masked stored
    plaintext=$(sql "$PG_PORT" postgres -AtF $'\t' -c "$(printf "$CHECK" customers)")
    masked=$(sql "$VEIL_PORT" bench_masked -AtF $'\t' -c "$(printf "$CHECK" customers)")
    [[ $(sql "$VEIL_PORT" bench_plain -AtF $'\t' -c "$(printf "$CHECK" enc_customers)") == "$plaintext" ]] \
        || die "bench_plain does not read the plaintext of enc_customers through pgveil"
    [[ $(sql "$VEIL_PORT" bench_masked -AtF $'\t' -c "$(printf "$CHECK" enc_customers)") == "$masked" ]] \
        || die "bench_masked does not read the same masks from enc_customers as from customers"
    [[ $masked != "$plaintext" ]] || die "bench_masked reads plaintext: the policy is not applied"
    stored=$(sql "$PG_PORT" postgres -At -c "SELECT count(*) FROM enc_customers
        WHERE name NOT LIKE 'pgv1:%' OR phone NOT LIKE 'pgv1:%' OR id_card NOT LIKE 'pgv1:%'")
    [[ $stored == 0 ]] || die "$stored rows of enc_customers hold plaintext when read directly"
    [[ $(sql "$PG_PORT" postgres -At -c "SELECT count(*) FROM enc_customers") == "$ROWS" ]] \
        || die "enc_customers does not hold $ROWS rows"
}
log "checking reads through pgveil and ciphertext around it"
check_reads

# ------------------------------------------------------------- benchmarks ---
read_script() { # table
    printf '\\set id random(1, %s)\nSELECT name, phone, id_card FROM %s WHERE id = :id;\n' "$ROWS" "$1"
}
read_script customers >"$TMP/read-plain.sql"
read_script enc_customers >"$TMP/read-enc.sql"
insert_script() { # table
    cat <<EOF
\\set name random(1000000, 9999999)
\\set phone random(13000000000, 18999999999)
\\set id_card random(110101195001010000, 650106200512319999)
INSERT INTO $1 (name, phone, id_card) VALUES (:name, :phone, :id_card);
EOF
}
insert_script plain_writes >"$TMP/insert-plain.sql"
insert_script enc_writes >"$TMP/insert-enc.sql"

TARGETS=(direct read-plain read-enc read-masked read-enc-masked insert-plain insert-enc)
declare -A PORT_OF=([direct]=$PG_PORT) USER_OF=([direct]=bench_plain) SCRIPT_OF=([direct]=read-plain)
for target in read-plain read-enc insert-plain insert-enc; do
    PORT_OF[$target]=$VEIL_PORT USER_OF[$target]=bench_plain SCRIPT_OF[$target]=$target
done
PORT_OF[read-masked]=$VEIL_PORT USER_OF[read-masked]=bench_masked SCRIPT_OF[read-masked]=read-plain
PORT_OF[read-enc-masked]=$VEIL_PORT USER_OF[read-enc-masked]=bench_masked SCRIPT_OF[read-enc-masked]=read-enc
declare -A TPS_RUNS=() LAT_RUNS=() TPS=() LAT=()
FAILURES=()

pgbench_run() { # target seconds
    "$PGBENCH" -h 127.0.0.1 -p "${PORT_OF[$1]}" -U "${USER_OF[$1]}" -n -M prepared \
        -c "$CLIENTS" -j "$JOBS" -T "$2" -f "$TMP/${SCRIPT_OF[$1]}.sql" "$DB" 2>&1
}

run_one() { # target round
    local target=$1 round=$2 out tps lat
    log "round $round/$ROUNDS: pgbench -M prepared -c $CLIENTS -j $JOBS -T $DURATION -> $target"
    if out=$(pgbench_run "$target" "$DURATION"); then
        tps=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$out" | head -n1)
        lat=$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' <<<"$out" | head -n1)
    else
        tps="" lat=""
    fi
    if [[ -z $tps || -z $lat ]]; then
        printf -- '---- pgbench against %s failed (round %s); output:\n%s\n----\n' "$target" "$round" "$out" >&2
        FAILURES+=("$target/round$round")
    else
        TPS_RUNS[$target]+="$(printf "%.0f" "$tps") "
        LAT_RUNS[$target]+="$lat "
    fi
}

if (( WARMUP > 0 )); then
    for target in "${TARGETS[@]}"; do
        log "warm-up: ${WARMUP}s -> $target"
        pgbench_run "$target" "$WARMUP" >/dev/null || log "warm-up against $target failed (ignored)"
    done
fi
count=${#TARGETS[@]}
for round in $(seq 1 "$ROUNDS"); do
    for i in $(seq 0 $(( count - 1 ))); do
        run_one "${TARGETS[$(( (i + round - 1) % count ))]}" "$round"
    done
done

log "checking again after measuring"
check_reads
WRITTEN=$(sql "$PG_PORT" postgres -At -c "SELECT count(*) FROM enc_writes")
PLAIN_LEFT=$(sql "$PG_PORT" postgres -At -c "SELECT count(*) FROM enc_writes
    WHERE name NOT LIKE 'pgv1:%' OR phone NOT LIKE 'pgv1:%' OR id_card NOT LIKE 'pgv1:%'")
[[ $PLAIN_LEFT == 0 ]] || die "$PLAIN_LEFT rows of enc_writes hold plaintext when read directly"
(( WRITTEN > 0 )) || die "the insert benchmark wrote nothing into enc_writes"

for target in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    TPS[$target]=$(median ${TPS_RUNS[$target]:-})
    # shellcheck disable=SC2086
    LAT[$target]=$(median ${LAT_RUNS[$target]:-})
done

verdict() { # ratio
    if [[ $1 == n/a ]]; then
        echo "not measured"
    elif awk -v r="$1" -v t="$TARGET" 'BEGIN { exit !(r + 0 >= t + 0) }'; then
        echo "met"
    else
        echo "MISSED"
    fi
}
row() { # target description
    printf '| %s | %s | %s | %s | %s |\n' "$1" "$2" "$(fmt 0 "${TPS[$1]}")" "$(fmt 3 "${LAT[$1]}")" \
        "$(ratio "${TPS[$1]}" "${TPS[direct]}")"
}
R_READ=$(ratio "${TPS[read-enc]}" "${TPS[read-plain]}")
R_MASKED=$(ratio "${TPS[read-enc-masked]}" "${TPS[read-masked]}")
R_INSERT=$(ratio "${TPS[insert-enc]}" "${TPS[insert-plain]}")

{
    echo
    echo "## Encryption at rest: encrypted vs plaintext tables through pgveil"
    echo
    echo "- pgbench -M prepared -c $CLIENTS -j $JOBS -T $DURATION -n; ${WARMUP}s warm-up per target; $ROUNDS interleaved rounds, medians shown"
    echo "- reads: \`SELECT name, phone, id_card FROM <table> WHERE id = \$1\`, id uniformly random in 1..$ROWS"
    echo "- inserts: \`INSERT INTO <table> (name, phone, id_card) VALUES (\$1, \$2, \$3)\`; in enc_writes name and phone are randomized (AES-256-GCM), id_card deterministic (AES-256-SIV); $WRITTEN rows written there, all ciphertext when read directly"
    echo "- enc_customers filled by \`\\copy\` through pgveil: $ROWS rows in ${COPY_SECONDS}s"
    echo "- machine: $(nproc) CPUs ($(uname -srm)); fsync=off, TCP on 127.0.0.1; PostgreSQL $PG_VERSION"
    echo "- pgveil: $("$PGVEIL" --version 2>/dev/null || echo unknown) (workers: ${PGVEIL_WORKERS:-default, one per core})"
    echo
    echo "| target | what | TPS | avg lat ms | vs direct |"
    echo "|---|---|---:|---:|---:|"
    row direct "read, plaintext table, PostgreSQL itself"
    row read-plain "read, plaintext table, allow"
    row read-enc "read, encrypted table, allow (decrypt)"
    row read-masked "read, plaintext table, masks"
    row read-enc-masked "read, encrypted table, decrypt + masks"
    row insert-plain "insert into plaintext table"
    row insert-enc "insert into encrypted table (3 values encrypted)"
    echo
    echo "**encrypted / plaintext (target >= $TARGET):** read $R_READ ($(verdict "$R_READ")), masked read $R_MASKED ($(verdict "$R_MASKED")), insert $R_INSERT ($(verdict "$R_INSERT"))."
    echo
    echo "Every run's TPS, round by round:"
    echo
    for target in "${TARGETS[@]}"; do
        printf -- '- %s: %s\n' "$target" "${TPS_RUNS[$target]:-}"
    done
}

bench_exit_on_failures
