#!/usr/bin/env bash
# benches/pgbench.sh — compare pgbench read-only throughput and latency of
# direct PostgreSQL, PgBouncer (session pooling), pgveil without a policy and pgveil
# with a policy loaded, for which the pgbench login is a restricted role.
# Target from the issue: pgveil+policy / pgveil >= 0.97 (POLICY_TARGET).
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
#   ROUNDS    interleaved rounds per row; medians are shown (default 4; even
#             numbers balance the order of pgveil and pgveil+policy)
#   POLICY_TARGET  the policy/no-policy TPS ratio to meet    (default 0.97)
#   TARGETS   space-separated targets to run, of direct, pgbouncer, pgveil and
#             pgveil+policy (default all four; "pgveil pgveil+policy" gives the
#             policy ratio twice the rounds in the same time)
#   PGVEIL_WORKERS  pgveil --workers, both pgveils (default: pgveil's own default)
#   PGVEIL_LOG      pgveil's log filter, both pgveils          (default warn)
#
# What it does, in one go:
#   * locates the PostgreSQL binaries (pg_config --bindir, else the highest
#     /usr/lib/postgresql/*/bin), installs pgbouncer with apt-get if missing,
#     builds pgveil (cargo build --release);
#   * creates a throwaway cluster in a temp dir (fsync=off, trust auth, owned
#     by user postgres when run as root), loads it with pgbench -i -s $SCALE;
#   * creates, next to pgbench's tables in database postgres, a small CRM table
#     `customers` (id, name, phone, id_card, email; 3 rows) and pgveil's catalog
#     login pgveil_catalog;
#   * starts a private PgBouncer (pool_mode = session) and two pgveils, each on a
#     free 127.0.0.1 port, all three in front of PostgreSQL directly:
#       pgveil         flags only, no config and no policy: nothing to check;
#       pgveil+policy  a config (catalog login pgveil_catalog, sslmode disable) and
#                      a policy protecting customers.name (L2), phone and email
#                      (L3) and id_card (L4), with no role of its own: postgres,
#                      the login pgbench uses, gets role `default`: L2/L3 masked,
#                      L4 denied. For such a restricted role pgveil does its full
#                      per-statement work although pgbench never touches customers:
#                      the protected-name prefilter on every Query and Parse, its
#                      own Describe before every Execute (extended and prepared
#                      modes), each result's RowDescription checked;
#     before and after measuring it checks through pgveil+policy that postgres
#     gets customers masked (张**, 138****5678, z***@example.com) and id_card
#     refused, and through pgveil the plaintext; otherwise it stops with an error;
#   * for every mode x clients runs `pgbench -S -n` against direct, pgbouncer,
#     pgveil, pgveil+policy in ROUNDS rounds (the one going first rotates) and
#     prints a markdown table of median TPS, average latency and pgveil's ratios,
#     policy/no-policy among them;
#   * reads each pgveil's CPU time (/proc/PID/stat) around its runs and prints its
#     median CPU per transaction, with and without the policy, and what the
#     difference would cost a CPU-bound machine. Single runs of it vary too (it
#     rises when the machine is slow), and the estimate counts CPU only: cache and
#     scheduling effects are not in it, so it is no substitute for the TPS ratio.
# Everything it started is stopped, and the temp dir removed, on exit —
# including errors and Ctrl-C. A failed run is reported on stderr and shown
# as FAIL in the table; the other runs continue.
#
# The cluster, port, build, pgveil start and cleanup helpers live in benches/lib.sh
# (shared with benches/protected_read.sh and benches/encryption.sh).
#
# Note: both pgveils are started with their working directory set to the temp
# dir, so a config/pgveil.yaml in the repo is NOT picked up: pgveil gets only its
# flags, pgveil+policy its own --config in the temp dir.

set -euo pipefail

DURATION=${DURATION:-15}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-"1 8"}
MODES=${MODES:-"simple prepared"}
ROUNDS=${ROUNDS:-4}
POLICY_TARGET=${POLICY_TARGET:-0.97}
TARGET_NAMES=${TARGETS:-"direct pgbouncer pgveil pgveil+policy"}

# shellcheck source=benches/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh" # cds to the repo root

PGBOUNCER_PID=""
bench_install_traps
export PGCLIENTENCODING=UTF8

# ------------------------------------------------------------- validation ---
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (got '$DURATION')"
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || die "SCALE must be a positive integer (got '$SCALE')"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
[[ $POLICY_TARGET =~ ^[0-9]+(\.[0-9]+)?$ ]] \
    || die "POLICY_TARGET must be a number such as 0.97 (got '$POLICY_TARGET')"
for c in $CLIENTS; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || die "CLIENTS entries must be positive integers (got '$c')"
done
for m in $MODES; do
    [[ $m == simple || $m == extended || $m == prepared ]] \
        || die "MODES entries must be simple, extended or prepared (got '$m')"
done
for t in $TARGET_NAMES; do
    [[ $t == direct || $t == pgbouncer || $t == pgveil || $t == pgveil+policy ]] \
        || die "TARGETS entries must be direct, pgbouncer, pgveil or pgveil+policy (got '$t')"
done
[[ -n ${TARGET_NAMES// /} ]] || die "TARGETS is empty"
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
read -r PG_PORT BOUNCER_PORT VEIL_PORT POLICY_PORT < <(bench_free_ports 4)
[[ -n ${POLICY_PORT:-} ]] || die "could not pick free ports"

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

# A CRM table for the policy to protect (pgbench never reads it), and pgveil's catalog
# login (it reads only pg_catalog, which every login may).
log "creating customers and the login pgveil_catalog"
if ! "$PSQL" "${CONN[@]}" -p "$PG_PORT" -d postgres -Xq -v ON_ERROR_STOP=1 \
    >"$TMP/customers.log" 2>&1 <<'EOF'; then
CREATE ROLE pgveil_catalog LOGIN;
CREATE TABLE customers (id int PRIMARY KEY, name text, phone text, id_card text, email text);
INSERT INTO customers VALUES
    (1, '张三丰', '13812345678', '110105199001011234', 'zhang.sanfeng@example.com'),
    (2, '欧阳锋', '13900002002', '310104197003150238', 'ouyang.feng@example.cn'),
    (3, '黄蓉',   '15100004004', '330106199008080481', 'huang.rong@example.org');
ANALYZE customers;
EOF
    cat "$TMP/customers.log" >&2
    die "creating customers failed"
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

# ---------------------------------------------------------------- pgveils ---
bench_start_pgveil pgveil "$VEIL_PORT" "$TMP/pgveil.log" postgres postgres \
    --listen "127.0.0.1:$VEIL_PORT" --upstream "127.0.0.1:$PG_PORT"
PGVEIL_PID=$BENCH_PGVEIL_PID

# postgres must get role `default`, which follows the level defaults (L2 and L3 masked,
# L4 denied), so it is restricted. The policy declares no other role: postgres is a
# superuser, and pgveil resolves memberships with pg_has_role(), which is true for a
# superuser and ANY role, so a role listing any existing PostgreSQL role would match
# postgres first. pgbench's tables are not protected.
cat >"$TMP/policy.yaml" <<'EOF'
version: 1
tables:
  public.customers:
    columns:
      name:    { level: L2, mask: cn_name }
      phone:   { level: L3, mask: cn_mobile }
      email:   { level: L3, mask: email }
      id_card: { level: L4, mask: cn_id_card }
EOF
cat >"$TMP/pgveil-policy.yaml" <<EOF
listen: 127.0.0.1:$POLICY_PORT
upstream:
  host: 127.0.0.1
  port: $PG_PORT
  sslmode: disable
catalog:
  user: pgveil_catalog
  database: postgres
policy: policy.yaml
limits:
  shutdown_grace_seconds: 2
EOF
if ! "$PGVEIL" policy check "$TMP/policy.yaml" >"$TMP/policy-check.log" 2>&1; then
    cat "$TMP/policy-check.log" >&2
    die "pgveil rejects the benchmark policy (above)"
fi
bench_start_pgveil pgveil+policy "$POLICY_PORT" "$TMP/pgveil-policy.log" postgres postgres \
    --config "$TMP/pgveil-policy.yaml"
POLICY_PID=$BENCH_PGVEIL_PID

# The policy must be in force for postgres, or pgveil+policy would measure nothing.
CHECK_SQL="SELECT name, phone, email FROM customers WHERE id = 1"
PLAIN_ROW="张三丰|13812345678|zhang.sanfeng@example.com"
MASKED_ROW="张**|138****5678|z***@example.com"
check_policy() { # when
    local when=$1 got
    log "checking the policy through pgveil+policy ($when measuring)"
    got=$("$PSQL" "${CONN[@]}" -p "$POLICY_PORT" -d postgres -XAtc "$CHECK_SQL" 2>&1) || true
    if [[ $got != "$MASKED_ROW" ]]; then
        [[ $got == "$PLAIN_ROW" ]] \
            && die "policy check failed ($when measuring): postgres reads PLAINTEXT through pgveil+policy — the policy is not applied, so pgveil+policy would measure nothing"
        die "policy check failed ($when measuring): through pgveil+policy postgres got '$got', expected '$MASKED_ROW'"
    fi
    if got=$("$PSQL" "${CONN[@]}" -p "$POLICY_PORT" -d postgres -XAtc \
        "SELECT id_card FROM customers WHERE id = 1" 2>&1); then
        die "policy check failed ($when measuring): postgres read id_card (L4, denied) through pgveil+policy: '$got'"
    fi
    got=$("$PSQL" "${CONN[@]}" -p "$VEIL_PORT" -d postgres -XAtc "$CHECK_SQL" 2>&1) || true
    [[ $got == "$PLAIN_ROW" ]] \
        || die "policy check failed ($when measuring): through pgveil (no policy) postgres got '$got', expected '$PLAIN_ROW'"
}
check_policy before

# ------------------------------------------------------------- benchmarks ---
declare -A TPS LAT
read -ra TARGETS <<<"$TARGET_NAMES"
declare -A PORT_OF=([direct]=$PG_PORT [pgbouncer]=$BOUNCER_PORT [pgveil]=$VEIL_PORT [pgveil+policy]=$POLICY_PORT)
declare -A PID_OF=([pgbouncer]=$PGBOUNCER_PID [pgveil]=$PGVEIL_PID [pgveil+policy]=$POLICY_PID)
FAILURES=()

# CPU time (user + system, all threads) a process has used, in clock ticks; empty
# where /proc cannot tell. Fields after "pid (comm) ": utime is the 12th, stime the 13th.
CLOCK_TICKS=$(getconf CLK_TCK 2>/dev/null || echo 100)
cpu_ticks() { # pid
    [[ -r /proc/$1/stat ]] || return 0
    sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

run_one() { # target mode clients
    local target=$1 mode=$2 c=$3 out tps lat txs cpu_before cpu_after
    local j=$(( c < 2 ? c : 2 ))
    local key="$mode/$c/$target"
    local pid=${PID_OF[$target]:-}
    log "pgbench -S -M $mode -c $c -j $j -T $DURATION -> $target"
    cpu_before="" cpu_after=""
    [[ $target != pgveil* ]] || cpu_before=$(cpu_ticks "$pid")
    if out=$("$PGBENCH" "${CONN[@]}" -p "${PORT_OF[$target]}" -S -n -M "$mode" \
        -c "$c" -j "$j" -T "$DURATION" postgres 2>&1); then
        tps=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$out" | head -n1)
        lat=$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' <<<"$out" | head -n1)
        txs=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' <<<"$out" | head -n1)
    else
        tps="" lat="" txs=""
    fi
    [[ -z $cpu_before ]] || cpu_after=$(cpu_ticks "$pid")
    if [[ -n $cpu_before && -n $cpu_after && -n $txs && $txs != 0 ]]; then
        # pgveil's own CPU per transaction, in microseconds: what a policy adds to it is
        # the part of its cost that CPU time shows.
        CPU_RUNS[$key]+="$(awk -v a="$cpu_before" -v b="$cpu_after" -v hz="$CLOCK_TICKS" -v n="$txs" \
            'BEGIN { printf "%.2f", (b - a) / hz * 1e6 / n }') "
    fi
    if [[ -z $tps || -z $lat ]]; then
        printf -- '---- pgbench against %s failed (mode %s, %s clients); output:\n%s\n----\n' \
            "$target" "$mode" "$c" "$out" >&2
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "$target (pid $pid) is no longer running"
        fi
        FAILURES+=("$key")
    else
        TPS_RUNS[$key]+="$(printf "%.0f" "$tps") "
        LAT_RUNS[$key]+="$lat "
    fi
}

# Rounds interleave the targets, rotating which goes first every two rounds, so drift
# in the machine's load (other tenants, thermal) hits all four alike; the table shows
# medians. The second round of each two swaps pgveil and pgveil+policy, whose ratio is
# the target: over each pair of rounds neither follows the other more often.
declare -A TPS_RUNS LAT_RUNS CPU_RUNS
count=${#TARGETS[@]}
for round in $(seq 1 "$ROUNDS"); do
    order=()
    for i in $(seq 0 $(( count - 1 ))); do
        target=${TARGETS[$(( (i + (round - 1) / 2) % count ))]}
        if (( round % 2 == 0 )); then
            case $target in
                pgveil) target=pgveil+policy ;;
                pgveil+policy) target=pgveil ;;
            esac
        fi
        order+=("$target")
    done
    for mode in $MODES; do
        for c in $CLIENTS; do
            for target in "${order[@]}"; do
                run_one "$target" "$mode" "$c"
            done
        done
    done
done
check_policy after
for key in "${!TPS_RUNS[@]}"; do
    # shellcheck disable=SC2086
    TPS[$key]=$(median ${TPS_RUNS[$key]})
    # shellcheck disable=SC2086
    LAT[$key]=$(median ${LAT_RUNS[$key]})
done
for mode in $MODES; do
    for c in $CLIENTS; do
        for target in direct pgbouncer pgveil pgveil+policy; do
            if [[ " ${TARGETS[*]} " != *" $target "* ]]; then
                TPS[$mode/$c/$target]=skipped LAT[$mode/$c/$target]=skipped
            fi
            [[ -n ${TPS[$mode/$c/$target]:-} ]] || { TPS[$mode/$c/$target]=FAIL; LAT[$mode/$c/$target]=FAIL; }
        done
    done
done

# Each round's policy/no-policy ratio, per mode and client count (empty when a run failed).
declare -A PAIRED
for mode in $MODES; do
    for c in $CLIENTS; do
        PAIRED[$mode/$c]=$(paired_ratios "${TPS_RUNS[$mode/$c/pgveil]:-}" "${TPS_RUNS[$mode/$c/pgveil+policy]:-}")
    done
done

# ------------------------------------------------------------------ report ---
{
    echo
    echo "## pgbench -S (select-only): direct vs PgBouncer vs pgveil (without and with a policy)"
    echo
    echo "- machine: $(nproc) CPUs ($(uname -srm))"
    echo "- PostgreSQL: $PG_VERSION ($PG_BIN)"
    echo "- PgBouncer: $PGBOUNCER_VERSION (pool_mode = session)"
    echo "- pgveil: $("$PGVEIL" --version 2>/dev/null || echo unknown) (workers: ${PGVEIL_WORKERS:-default, one per core}; log: ${PGVEIL_LOG:-warn})"
    echo "- pgveil+policy: the same binary with a policy protecting public.customers (name L2, phone and email L3, id_card L4); postgres matches no policy role, so it gets role \`default\` (L2/L3 masked, L4 denied): a restricted role, checked before and after measuring. pgbench's tables are not protected"
    echo "- scale $SCALE, ${DURATION}s per run, $ROUNDS interleaved rounds (medians shown), -j = min(clients, 2), fsync=off, TCP on 127.0.0.1"
    echo
    echo "| mode | clients | direct TPS | pgbouncer TPS | pgveil TPS | pgveil+policy TPS | direct lat ms | pgbouncer lat ms | pgveil lat ms | pgveil+policy lat ms | pgveil/direct | pgveil/pgbouncer | policy/no-policy | policy/no-policy, paired |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for mode in $MODES; do
        for c in $CLIENTS; do
            d=$mode/$c/direct b=$mode/$c/pgbouncer v=$mode/$c/pgveil p=$mode/$c/pgveil+policy
            paired=${PAIRED[$mode/$c]}
            # shellcheck disable=SC2086
            paired_median=$([[ -n $paired ]] && fmt 2 "$(median $paired)" || echo n/a)
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$mode" "$c" \
                "$(fmt 0 "${TPS[$d]}")" "$(fmt 0 "${TPS[$b]}")" "$(fmt 0 "${TPS[$v]}")" "$(fmt 0 "${TPS[$p]}")" \
                "$(fmt 3 "${LAT[$d]}")" "$(fmt 3 "${LAT[$b]}")" "$(fmt 3 "${LAT[$v]}")" "$(fmt 3 "${LAT[$p]}")" \
                "$(ratio "${TPS[$v]}" "${TPS[$d]}")" "$(ratio "${TPS[$v]}" "${TPS[$b]}")" \
                "$(ratio "${TPS[$p]}" "${TPS[$v]}")" "$paired_median"
        done
    done
    echo
    echo "pgveil's own CPU time per transaction (user + system, all threads, from /proc; medians):"
    echo
    echo "| mode | clients | pgveil µs/tx | pgveil+policy µs/tx | added by the policy µs/tx | CPU-bound estimate of policy/no-policy |"
    echo "|---|---:|---:|---:|---:|---:|"
    for mode in $MODES; do
        for c in $CLIENTS; do
            v=$mode/$c/pgveil p=$mode/$c/pgveil+policy
            # shellcheck disable=SC2086
            cpu_plain=$(median ${CPU_RUNS[$v]:-}) cpu_policy=$(median ${CPU_RUNS[$p]:-})
            if [[ $cpu_plain == FAIL || $cpu_policy == FAIL || ! ${TPS[$v]} =~ ^[0-9] ]]; then
                printf '| %s | %s | n/a | n/a | n/a | n/a |\n' "$mode" "$c"
                continue
            fi
            printf '| %s | %s | %s | %s | %s | %s |\n' "$mode" "$c" "$(fmt 2 "$cpu_plain")" "$(fmt 2 "$cpu_policy")" \
                "$(awk -v a="$cpu_plain" -v b="$cpu_policy" 'BEGIN { printf "%+.2f", b - a }')" \
                "$(awk -v a="$cpu_plain" -v b="$cpu_policy" -v tps="${TPS[$v]}" -v cores="$(nproc)" \
                    'BEGIN { printf "%.3f", 1 / (1 + (b - a) / 1e6 * tps / cores) }')"
        done
    done
    echo
    echo "The estimate is what the added CPU costs when the machine's $(nproc) CPUs are the bottleneck"
    echo "(TPS = CPUs / CPU time per transaction of everything: pgbench, pgveil, PostgreSQL):"
    echo "1 / (1 + added × pgveil TPS / CPUs). It counts CPU time only (not cache or scheduling"
    echo "effects), so the TPS ratio below remains the measure of the target."
    echo
    echo "Ratios are TPS ratios of the medians (higher is better for pgveil); policy/no-policy is"
    echo "pgveil+policy TPS / pgveil TPS, target >= $POLICY_TARGET. The paired column is the"
    echo "median of that ratio taken in each round, where the two ran one after the other:"
    echo "it is steadier than the ratio of medians when the machine's speed drifts between"
    echo "rounds. Over all rounds, the geometric mean of the paired ratios and its 95% interval"
    echo "(Student's t on the logarithms; one 15-second run of a target spreads by several per"
    echo "cent on a shared machine, so a difference of 3% takes tens of rounds to resolve):"
    echo
    for mode in $MODES; do
        for c in $CLIENTS; do
            printf -- '- %s/%s: %s\n' "$mode" "$c" \
                "$(paired_summary "${PAIRED[$mode/$c]}")"
        done
    done
    echo
    echo "Every run, TPS, and the paired ratios:"
    echo
    for mode in $MODES; do
        for c in $CLIENTS; do
            printf -- '- %s/%s: direct %s| pgbouncer %s| pgveil %s| pgveil+policy %s| paired %s| pgveil µs/tx %s| pgveil+policy µs/tx %s\n' "$mode" "$c" \
                "${TPS_RUNS[$mode/$c/direct]:-}" "${TPS_RUNS[$mode/$c/pgbouncer]:-}" \
                "${TPS_RUNS[$mode/$c/pgveil]:-}" "${TPS_RUNS[$mode/$c/pgveil+policy]:-}" \
                "${PAIRED[$mode/$c]} " \
                "${CPU_RUNS[$mode/$c/pgveil]:-}" "${CPU_RUNS[$mode/$c/pgveil+policy]:-}"
        done
    done
}

bench_exit_on_failures
