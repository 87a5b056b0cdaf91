#!/usr/bin/env bash
# benches/encrypt.sh — how fast `pgveil encrypt` and `pgveil reencrypt` migrate a table.
#
# The table (ROWS rows from generate_series, a few NULLs in every column):
#
#   migrate_customers (id int PRIMARY KEY, id_card text, phone varchar(20),
#                      balance numeric(12,2), opened date)
#
# with the policy of tests/migrate.rs: id_card deterministic, phone randomized, balance
# randomized `type: numeric`, opened deterministic `type: date` (so three columns are
# widened to text first). With SCANS containing `ctid` the same table is also measured
# without its primary key (read by ctid page ranges).
#
# For every scan × batch size, ROUNDS times: the table is created afresh (VACUUM ANALYZE
# after loading), then
#   encrypt    `pgveil encrypt --batch N`: widening, then every value encrypted
#   rerun      the same command again: every value classified and skipped
#   reencrypt  after `pgveil keys rotate`: every value moved to the new key
# The table shows medians of the rows/s each report prints (rows scanned / time spent in
# batches; the widening ALTER TABLE is timed apart and shown as `widen s`).
#
# Usage (from any directory):
#   benches/encrypt.sh
#   ROWS=1000000 BATCHES="1000 10000" ROUNDS=1 benches/encrypt.sh
#   PGVEIL=/path/to/release/pgveil benches/encrypt.sh     # skip the build
#
# Knobs (environment variables):
#   ROWS     rows in the table                                (default 100000)
#   BATCHES  space-separated --batch values                   (default "1000 5000")
#   SCANS    space-separated: pk, ctid                        (default "pk ctid")
#   ROUNDS   rounds per cell; medians are shown               (default 3)
#   PGVEIL   a pgveil binary to use instead of building one   (default: cargo build --release)
#
# Everything it started is stopped, and the temp dir removed, on exit (helpers in
# benches/lib.sh).

set -euo pipefail

ROWS=${ROWS:-100000}
BATCHES=${BATCHES:-"1000 5000"}
SCANS=${SCANS:-"pk ctid"}
ROUNDS=${ROUNDS:-3}

# shellcheck source=benches/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh" # cds to the repo root

bench_install_traps

[[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive integer (got '$ROWS')"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
for b in $BATCHES; do
    [[ $b =~ ^[1-9][0-9]*$ ]] || die "BATCHES entries must be positive integers (got '$b')"
done
for s in $SCANS; do
    [[ $s == pk || $s == ctid ]] || die "SCANS entries must be pk or ctid (got '$s')"
done

bench_setup_root
bench_find_pg_bin
if [[ -n ${PGVEIL:-} ]]; then
    [[ -x $PGVEIL ]] || die "PGVEIL=$PGVEIL is not an executable"
else
    bench_build_pgveil
fi
log "pgveil: $PGVEIL"

bench_make_tmp
read -r PG_PORT <<<"$(bench_free_ports 1)"
bench_start_cluster "$PG_PORT"

psql_run() { "$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 "$@"; }

cat >"$TMP/policy.yaml" <<'EOF'
version: 1
tables:
  public.migrate_customers:
    columns:
      id_card: { level: L3, encrypt: deterministic }
      phone:   { level: L3, encrypt: randomized }
      balance: { level: L3, encrypt: randomized, type: numeric }
      opened:  { level: L2, encrypt: deterministic, type: date }
EOF
cat >"$TMP/pgveil.yaml" <<EOF
upstream: { host: 127.0.0.1, port: $PG_PORT, sslmode: disable }
catalog: { user: postgres, database: postgres }
policy: policy.yaml
keyring: keyring.yaml
EOF

load_table() { # scan
    local key="PRIMARY KEY"
    [[ $1 == ctid ]] && key=""
    psql_run >/dev/null <<EOF
DROP TABLE IF EXISTS migrate_customers;
CREATE TABLE migrate_customers (
    id int $key, id_card text, phone varchar(20), balance numeric(12,2), opened date);
INSERT INTO migrate_customers SELECT g,
    CASE WHEN g % 1000 = 0 THEN NULL ELSE lpad((g * 7919)::text, 17, '0') || 'X' END,
    CASE WHEN g % 997 = 0 THEN NULL ELSE '138' || lpad(g::text, 8, '0') END,
    CASE WHEN g % 991 = 0 THEN NULL ELSE round(g * 1.37 - 5000, 2) END,
    CASE WHEN g % 983 = 0 THEN NULL ELSE date '1990-01-01' + g % 12000 END
  FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE migrate_customers;
EOF
}

# Runs pgveil; prints "<rows/s> <widening s or ->" from its report.
migrate() { # command batch
    local out
    if ! out=$(cd "$TMP" && "$PGVEIL" "$1" --config pgveil.yaml --table public.migrate_customers \
        --batch "$2" 2>"$TMP/migrate.err"); then
        cat "$TMP/migrate.err" >&2
        die "pgveil $1 failed"
    fi
    awk '/^rows\/s: / { r = $2 } /^widening: / { w = $2 } END { print r, (w == "" ? "-" : w) }' <<<"$out"
}

declare -A RESULT
for scan in $SCANS; do
    for batch in $BATCHES; do
        enc=() widen=() rerun=() reenc=()
        for round in $(seq 1 "$ROUNDS"); do
            log "scan $scan, batch $batch, round $round/$ROUNDS: loading $ROWS rows"
            load_table "$scan"
            rm -f "$TMP/keyring.yaml"
            "$PGVEIL" keys generate --out "$TMP/keyring.yaml" >/dev/null
            read -r r w <<<"$(migrate encrypt "$batch")"
            enc+=("$r") widen+=("$w")
            read -r r _ <<<"$(migrate encrypt "$batch")"
            rerun+=("$r")
            "$PGVEIL" keys rotate --keyring "$TMP/keyring.yaml" >/dev/null
            read -r r _ <<<"$(migrate reencrypt "$batch")"
            reenc+=("$r")
            left=$(psql_run -c "SELECT count(*) FROM migrate_customers WHERE phone NOT LIKE 'pgv1:%'")
            [[ $left == 0 ]] || die "$left plaintext phone values left after encrypt"
        done
        RESULT[$scan,$batch]="$(median "${enc[@]}") $(median "${widen[@]}") $(median "${rerun[@]}") $(median "${reenc[@]}")"
    done
done

echo
echo "pgveil encrypt / reencrypt, $ROWS rows x 4 encrypted columns, medians of $ROUNDS rounds (rows/s)"
echo
echo "| scan | batch | encrypt | widen s | rerun (all skipped) | reencrypt |"
echo "|---|---:|---:|---:|---:|---:|"
for scan in $SCANS; do
    for batch in $BATCHES; do
        read -r e w r x <<<"${RESULT[$scan,$batch]}"
        echo "| $scan | $batch | $(fmt 0 "$e") | $w | $(fmt 0 "$r") | $(fmt 0 "$x") |"
    done
done
