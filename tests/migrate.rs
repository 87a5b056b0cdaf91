//! `pgveil encrypt` and `pgveil reencrypt` against a real PostgreSQL, run as a user runs
//! them: a 100,000-row table widened and encrypted in batches, killed half-way and run
//! again (nothing encrypted twice, every value decrypts to its original canonical text),
//! read back through pgveil with the policy's types, rotated and re-encrypted; a table
//! without a primary key (ctid ranges); a partitioned table with bytea; refusals
//! (plaintext left for reencrypt, tampered or malformed ciphertext, values the type
//! rejects, a missing `type:`, no privilege, a table outside the policy), all as one
//! line without values.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use pgveil::protect::envelope::{self, CipherMode, ColumnCipher, ColumnIdentity};
use pgveil::protect::keyring::Keyring;
use pgveil::protect::logical::{canonical_from_text, LogicalType};
use support::{cluster, eventually, free_port, policy_yaml, Proxy, ProxyOptions};
use tokio_postgres::types::Type;

const KEY1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

static ROLES: OnceLock<()> = OnceLock::new();

/// The logins of these tests: `migrate_catalog` owns the tables it migrates,
/// `migrate_billing` reads through pgveil, `migrate_limited` may only read.
fn roles() {
    ROLES.get_or_init(|| {
        cluster().psql_ok(
            "postgres",
            "CREATE ROLE migrate_catalog LOGIN; CREATE ROLE migrate_billing LOGIN; \
             CREATE ROLE migrate_limited LOGIN;",
        );
    });
}

/// Runs SQL as the superuser, after the roles exist.
fn sql(text: &str) -> String {
    roles();
    cluster().psql_ok("postgres", text)
}

/// A folder with a policy, a keyring and a config whose catalog login is `user`.
struct Setup {
    dir: PathBuf,
    config: PathBuf,
    policy: PathBuf,
    keyring: PathBuf,
}

impl Setup {
    fn new(policy: &str, keys: &[(&str, &str)]) -> Setup {
        Setup::with_login(policy, keys, "migrate_catalog")
    }

    fn with_login(policy: &str, keys: &[(&str, &str)], user: &str) -> Setup {
        roles();
        let dir = cluster().dir.join(format!("migrate-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("setup dir");
        let setup = Setup {
            config: dir.join("pgveil.yaml"),
            policy: dir.join("policy.yaml"),
            keyring: dir.join("keyring.yaml"),
            dir,
        };
        std::fs::write(&setup.policy, policy).expect("policy");
        setup.write_keyring(keys);
        std::fs::write(
            &setup.config,
            format!(
                "upstream:\n  host: 127.0.0.1\n  port: {}\n  sslmode: disable\n\
                 catalog:\n  user: {user}\n  database: postgres\n\
                 policy: {}\nkeyring: {}\n",
                cluster().port,
                setup.policy.display(),
                setup.keyring.display()
            ),
        )
        .expect("config");
        setup
    }

    /// Writes the keyring; the last key is active.
    fn write_keyring(&self, keys: &[(&str, &str)]) {
        std::fs::write(&self.keyring, keyring_yaml(keys)).expect("keyring");
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pgveil"));
        command
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("PGVEIL_KEYRING")
            .env("PGVEIL_LOG", "warn");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run pgveil")
    }
}

fn keyring_yaml(keys: &[(&str, &str)]) -> String {
    let mut text = format!("active: {}\nkeys:\n", keys.last().expect("a key").0);
    for (id, key) in keys {
        text.push_str(&format!("  {id}: {key}\n"));
    }
    text
}

fn keyring(keys: &[(&str, &str)]) -> Keyring {
    Keyring::parse(&keyring_yaml(keys), "test keyring").expect("keyring")
}

fn cipher(keys: &[(&str, &str)], table: &str, column: &str, mode: CipherMode) -> ColumnCipher {
    ColumnCipher::new(
        &keyring(keys),
        ColumnIdentity::new("public", table, column),
        mode,
    )
    .expect("cipher")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The run succeeded; its stdout.
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "pgveil failed: {}\n{}",
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// The run failed with exit 1 and exactly one line on stderr; that line.
fn refused(output: Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected exit 1: {}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let text = stderr(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got: {text}");
    lines[0].to_string()
}

/// The number after `label: ` in a report.
fn reported(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{label}: ")))
        .unwrap_or_else(|| panic!("no {label:?} in report:\n{report}"))
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{label:?} is not a number in report:\n{report}"))
}

/// `format_type` of every column of a table, by name.
fn column_types(table: &str) -> HashMap<String, String> {
    sql(&format!(
        "SELECT attname || '=' || format_type(atttypid, atttypmod) FROM pg_attribute \
          WHERE attrelid = 'public.{table}'::regclass AND attnum > 0 AND NOT attisdropped"
    ))
    .lines()
    .filter_map(|line| line.split_once('='))
    .map(|(name, ty)| (name.to_string(), ty.to_string()))
    .collect()
}

/// Rows of a query over a direct connection, every value as optional text.
async fn rows(client: &tokio_postgres::Client, query: &str) -> Vec<Vec<Option<String>>> {
    client
        .query(query, &[])
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .iter()
        .map(|row| (0..row.len()).map(|i| row.get(i)).collect())
        .collect()
}

/// The plaintext of a stored text-form envelope, checking the key it names.
fn open(cipher: &ColumnCipher, stored: &str, key: &str) -> String {
    assert!(stored.starts_with("pgv1:"), "stored value is no envelope");
    let bytes = envelope::from_text(stored.as_bytes()).expect("envelope text");
    assert_eq!(envelope::key_id(&bytes), Some(key), "key of the envelope");
    String::from_utf8(cipher.decrypt(&bytes).expect("decrypts")).expect("utf-8")
}

fn canonical(ty: LogicalType, text: &str) -> String {
    String::from_utf8(canonical_from_text(ty, text.as_bytes()).expect("canonical")).expect("utf-8")
}

const CUSTOMERS_POLICY: &str = "
version: 1
roles:
  billing: { members: [migrate_billing] }
tables:
  public.migrate_customers:
    columns:
      id_card: { level: L3, encrypt: deterministic, access: { billing: allow } }
      phone:   { level: L3, encrypt: randomized, access: { billing: allow } }
      balance: { level: L3, encrypt: randomized, type: numeric, access: { billing: allow } }
      opened:  { level: L2, encrypt: deterministic, type: date, access: { billing: allow } }
";

/// (column, logical type, mode) of the customers table's encrypted columns.
const CUSTOMER_COLUMNS: [(&str, LogicalType, CipherMode); 4] = [
    ("id_card", LogicalType::Text, CipherMode::Deterministic),
    ("phone", LogicalType::Text, CipherMode::Randomized),
    ("balance", LogicalType::Numeric, CipherMode::Randomized),
    ("opened", LogicalType::Date, CipherMode::Deterministic),
];

/// Every stored value of `migrate_customers` is NULL exactly where the original was, and
/// otherwise an envelope under `key` that decrypts to the original's canonical text.
async fn assert_customers_encrypted(keys: &[(&str, &str)], key: &str) {
    let direct = cluster().direct().await;
    let stored = rows(
        &direct,
        "SELECT id::text, id_card, phone, balance, opened FROM migrate_customers ORDER BY id",
    )
    .await;
    let original = rows(
        &direct,
        "SELECT id::text, id_card, phone, balance, opened FROM migrate_customers_orig ORDER BY id",
    )
    .await;
    assert_eq!(stored.len(), 100_000);
    assert_eq!(stored.len(), original.len());
    let ciphers: Vec<ColumnCipher> = CUSTOMER_COLUMNS
        .iter()
        .map(|(column, _, mode)| cipher(keys, "migrate_customers", column, *mode))
        .collect();
    for (row, before) in stored.iter().zip(&original) {
        assert_eq!(row[0], before[0], "same rows in the same order");
        for (index, (column, logical, _)) in CUSTOMER_COLUMNS.iter().enumerate() {
            match (&row[index + 1], &before[index + 1]) {
                (None, None) => {}
                (Some(value), Some(plain)) => assert_eq!(
                    open(&ciphers[index], value, key),
                    canonical(*logical, plain),
                    "{column} of row {:?}",
                    row[0]
                ),
                _ => panic!("{column} of row {:?}: NULL changed", row[0]),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_table_is_widened_encrypted_resumably_read_through_pgveil_and_reencrypted() {
    sql("
        CREATE TABLE migrate_customers (
            id int PRIMARY KEY, id_card text, phone varchar(20), balance numeric(12,2), opened date);
        INSERT INTO migrate_customers SELECT g,
            CASE WHEN g % 1000 = 0 THEN NULL ELSE lpad((g * 7919)::text, 17, '0') || 'X' END,
            CASE WHEN g % 997 = 0 THEN NULL ELSE '138' || lpad(g::text, 8, '0') END,
            CASE WHEN g % 991 = 0 THEN NULL ELSE round(g * 1.37 - 5000, 2) END,
            CASE WHEN g % 983 = 0 THEN NULL ELSE date '1990-01-01' + g % 12000 END
          FROM generate_series(1, 100000) g;
        CREATE TABLE migrate_customers_orig AS
            SELECT id, id_card, phone::text, balance::text, opened::text FROM migrate_customers;
        ALTER TABLE migrate_customers OWNER TO migrate_catalog;
        GRANT SELECT ON migrate_customers TO migrate_billing;
        -- Holds the batch after id 50000 while the test keeps advisory lock 727272.
        CREATE FUNCTION migrate_hold() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id > 50000 THEN PERFORM pg_advisory_xact_lock_shared(727272); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER migrate_hold BEFORE UPDATE ON migrate_customers
            FOR EACH ROW EXECUTE FUNCTION migrate_hold();
    ");
    let total: u64 = sql(
        "SELECT count(id_card) + count(phone) + count(balance) + count(opened) \
           FROM migrate_customers_orig",
    )
    .trim()
    .parse()
    .expect("count");
    let first_half: u64 = sql(
        "SELECT count(id_card) + count(phone) + count(balance) + count(opened) \
           FROM migrate_customers_orig WHERE id <= 50000",
    )
    .trim()
    .parse()
    .expect("count");
    let setup = Setup::new(CUSTOMERS_POLICY, &[("k1", KEY1)]);
    let table = ["--table", "public.migrate_customers"];

    // First run: held after 100 batches of 500, then killed.
    let holder = cluster().direct().await;
    holder
        .execute("SELECT pg_advisory_lock(727272)", &[])
        .await
        .expect("advisory lock");
    let mut child = setup
        .command(&["encrypt", table[0], table[1], "--batch", "500"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgveil encrypt");
    let watcher = cluster().direct().await;
    let half_done = eventually(Duration::from_secs(120), || async {
        watcher
            .query_one(
                "SELECT count(*) FROM migrate_customers WHERE phone LIKE 'pgv1:%'",
                &[],
            )
            .await
            .map(|row| row.get::<_, i64>(0) == 50_000 - 50)
            .unwrap_or(false)
    })
    .await;
    assert!(half_done, "the first run did not reach id 50000");
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    holder
        .execute("SELECT pg_advisory_unlock(727272)", &[])
        .await
        .expect("advisory unlock");
    // Waits for the killed run's backend to roll its batch back.
    sql("DROP TRIGGER migrate_hold ON migrate_customers; DROP FUNCTION migrate_hold();");
    let encrypted_after_kill = sql(
        "SELECT count(*) FILTER (WHERE phone LIKE 'pgv1:%') || ' ' || count(*) FILTER (WHERE phone NOT LIKE 'pgv1:%') \
           FROM migrate_customers",
    );
    assert_eq!(encrypted_after_kill.trim(), "49950 49950", "half encrypted");
    let types = column_types("migrate_customers");
    for column in ["id_card", "phone", "balance", "opened"] {
        assert_eq!(types[column], "text", "{column} widened");
    }
    assert_eq!(types["id"], "integer");

    // Second run: finishes, skipping what the first one committed.
    let report = ok(setup.run(&["encrypt", table[0], table[1], "--batch", "500"]));
    assert_eq!(reported(&report, "rows scanned"), 100_000, "{report}");
    assert_eq!(
        reported(&report, "values already encrypted (skipped)"),
        first_half,
        "{report}"
    );
    assert_eq!(
        reported(&report, "values encrypted"),
        total - first_half,
        "{report}"
    );
    assert_eq!(reported(&report, "NULL values"), 400_000 - total);
    // 200 full batches, then one that finds nothing after the last key.
    assert_eq!(reported(&report, "batches"), 201, "{report}");
    assert!(
        !report.contains("widened"),
        "nothing left to widen: {report}"
    );
    println!("second run (debug build):\n{report}");
    assert_customers_encrypted(&[("k1", KEY1)], "k1").await;

    // Read through pgveil: the original values, with the policy's types.
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: format!(
            "{}keyring: {}\n",
            policy_yaml("migrate_catalog", &setup.policy),
            setup.keyring.display()
        ),
        ..ProxyOptions::default()
    });
    let billing = proxy.connect("migrate_billing").await;
    let query = "SELECT id, id_card, phone, balance, opened FROM migrate_customers \
                 WHERE id IN (1, 10, 1000, 99991) ORDER BY id";
    let statement = billing
        .prepare(query)
        .await
        .expect("prepare through pgveil");
    let types: Vec<Type> = statement
        .columns()
        .iter()
        .map(|c| c.type_().clone())
        .collect();
    assert_eq!(
        types,
        [
            Type::INT4,
            Type::TEXT,
            Type::TEXT,
            Type::NUMERIC,
            Type::DATE
        ]
    );
    let through: Vec<Vec<Option<String>>> = billing
        .simple_query(query)
        .await
        .expect("read through pgveil")
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    let direct = cluster().direct().await;
    let original = rows(
        &direct,
        "SELECT id::text, id_card, phone, balance, opened FROM migrate_customers_orig \
          WHERE id IN (1, 10, 1000, 99991) ORDER BY id",
    )
    .await;
    assert_eq!(through.len(), 4);
    for (got, want) in through.iter().zip(&original) {
        assert_eq!(got[0], want[0]);
        for (index, (_, logical, _)) in CUSTOMER_COLUMNS.iter().enumerate() {
            assert_eq!(
                got[index + 1],
                want[index + 1].as_deref().map(|v| canonical(*logical, v))
            );
        }
    }
    // 1.37 * 10 - 5000 = -4986.30: numeric comes back as numeric text, without the zero.
    assert_eq!(through[1][3].as_deref(), Some("-4986.3"));
    assert_eq!(through[2][1], None, "id_card of id 1000 stays NULL");
    drop(proxy);

    // Third run: nothing left to do.
    let report = ok(setup.run(&["encrypt", table[0], table[1]]));
    assert_eq!(reported(&report, "values encrypted"), 0, "{report}");
    assert_eq!(
        reported(&report, "values already encrypted (skipped)"),
        total
    );

    // Rotation: every value moves to k2 and still decrypts to the original.
    setup.write_keyring(&[("k1", KEY1), ("k2", KEY2)]);
    let report = ok(setup.run(&["reencrypt", table[0], table[1]]));
    assert_eq!(reported(&report, "values re-encrypted"), total, "{report}");
    assert_eq!(
        reported(&report, "values already under the active key (skipped)"),
        0
    );
    assert_eq!(reported(&report, "plaintext values (not encrypted)"), 0);
    assert_customers_encrypted(&[("k1", KEY1), ("k2", KEY2)], "k2").await;
    let report = ok(setup.run(&["reencrypt", table[0], table[1]]));
    assert_eq!(reported(&report, "values re-encrypted"), 0, "{report}");
    assert_eq!(
        reported(&report, "values already under the active key (skipped)"),
        total
    );
}

#[test]
fn a_table_without_a_primary_key_is_read_by_ctid_ranges() {
    sql("
        CREATE TABLE migrate_nokey (name text, n int, at timestamptz, note text);
        INSERT INTO migrate_nokey SELECT 'name-' || g, g,
            timestamptz '2024-02-29 23:30:00+08' + g * interval '61 minutes',
            CASE WHEN g % 10 = 0 THEN NULL ELSE 'note' END
          FROM generate_series(1, 2000) g;
        ALTER TABLE migrate_nokey OWNER TO migrate_catalog;
    ");
    let original: HashMap<String, (String, String)> =
        sql("SELECT n || '|' || name || '|' || at::text FROM migrate_nokey")
            .lines()
            .map(|line| {
                let mut parts = line.splitn(3, '|');
                let n = parts.next().unwrap().to_string();
                let name = parts.next().unwrap().to_string();
                let at = parts.next().unwrap().to_string();
                (n, (name, at))
            })
            .collect();
    assert_eq!(original.len(), 2000);
    let setup = Setup::new(
        "
version: 1
tables:
  public.migrate_nokey:
    columns:
      name: { level: L3, encrypt: deterministic }
      n:    { level: L3, encrypt: randomized, type: int4 }
      at:   { level: L3, encrypt: randomized, type: timestamptz }
",
        &[("k1", KEY1)],
    );
    let table = ["--table", "public.migrate_nokey"];
    let report = ok(setup.run(&["encrypt", table[0], table[1], "--batch", "100"]));
    assert!(report.contains("ctid ranges (no primary key)"), "{report}");
    assert!(
        report.contains("column n: randomized, clients see int4; widened from integer to text"),
        "{report}"
    );
    assert!(
        report.contains("widened from timestamp with time zone to text"),
        "{report}"
    );
    assert_eq!(reported(&report, "values encrypted"), 6000, "{report}");
    assert!(reported(&report, "batches") >= 10, "{report}");
    // The updated rows' new versions land after the scan position and are read again;
    // they count apart, not as rows or as values already encrypted.
    assert_eq!(reported(&report, "rows scanned"), 2000, "{report}");
    assert_eq!(
        reported(&report, "values already encrypted (skipped)"),
        0,
        "{report}"
    );
    assert_eq!(reported(&report, "NULL values"), 0, "{report}");
    assert!(
        reported(
            &report,
            "rows this run moved ahead and read again (not counted above)"
        ) > 0,
        "{report}"
    );

    let keys = [("k1", KEY1)];
    let name = cipher(&keys, "migrate_nokey", "name", CipherMode::Deterministic);
    let n = cipher(&keys, "migrate_nokey", "n", CipherMode::Randomized);
    let at = cipher(&keys, "migrate_nokey", "at", CipherMode::Randomized);
    let stored = sql(
        "SELECT name || '|' || n || '|' || at || '|' || coalesce(note, '-') FROM migrate_nokey",
    );
    let mut seen = std::collections::HashSet::new();
    for line in stored.lines() {
        let parts: Vec<&str> = line.split('|').collect();
        let number = open(&n, parts[1], "k1");
        let (want_name, want_at) = &original[&number];
        assert_eq!(&open(&name, parts[0], "k1"), want_name);
        assert_eq!(
            open(&at, parts[2], "k1"),
            canonical(LogicalType::Timestamptz, want_at)
        );
        assert!(
            parts[3] == "note" || parts[3] == "-",
            "unprotected column untouched"
        );
        assert!(seen.insert(number), "each row once");
    }
    assert_eq!(seen.len(), 2000);
    // 2024-02-29 23:30+08 plus 61 minutes is 2024-02-29 16:31 UTC.
    assert_eq!(
        canonical(LogicalType::Timestamptz, &original["1"].1),
        "2024-02-29 16:31:00+00"
    );

    let report = ok(setup.run(&["encrypt", table[0], table[1], "--batch", "100"]));
    assert_eq!(reported(&report, "values encrypted"), 0, "{report}");
    assert_eq!(
        reported(&report, "values already encrypted (skipped)"),
        6000
    );
    assert_eq!(reported(&report, "rows scanned"), 2000, "{report}");
    assert!(!report.contains("read again"), "{report}");
}

#[test]
fn a_partitioned_table_and_a_bytea_column_are_migrated_by_primary_key() {
    sql("
        CREATE TABLE migrate_parted (id int PRIMARY KEY, blob bytea, code varchar(4))
            PARTITION BY RANGE (id);
        CREATE TABLE migrate_parted_a PARTITION OF migrate_parted FOR VALUES FROM (0) TO (150);
        CREATE TABLE migrate_parted_b PARTITION OF migrate_parted FOR VALUES FROM (150) TO (1000);
        INSERT INTO migrate_parted SELECT g, int4send(g), lpad(g::text, 4, '0')
          FROM generate_series(1, 300) g;
        ALTER TABLE migrate_parted OWNER TO migrate_catalog;
        ALTER TABLE migrate_parted_a OWNER TO migrate_catalog;
        ALTER TABLE migrate_parted_b OWNER TO migrate_catalog;
    ");
    let setup = Setup::new(
        "
version: 1
tables:
  public.migrate_parted:
    columns:
      blob: { level: L3, encrypt: randomized }
      code: { level: L3, encrypt: deterministic }
",
        &[("k1", KEY1)],
    );
    let report = ok(setup.run(&["encrypt", "--table", "migrate_parted", "--batch", "64"]));
    assert!(report.contains("primary key (id)"), "{report}");
    assert!(
        report.contains("column code: deterministic, clients see text; widened from character varying(4) to text"),
        "{report}"
    );
    assert_eq!(reported(&report, "values encrypted"), 600, "{report}");
    assert_eq!(column_types("migrate_parted_b")["code"], "text");

    let keys = [("k1", KEY1)];
    let blob = cipher(&keys, "migrate_parted", "blob", CipherMode::Randomized);
    let code = cipher(&keys, "migrate_parted", "code", CipherMode::Deterministic);
    for line in
        sql("SELECT id || '|' || encode(blob, 'hex') || '|' || code FROM migrate_parted").lines()
    {
        let parts: Vec<&str> = line.split('|').collect();
        let id: i32 = parts[0].parse().unwrap();
        let bytes: Vec<u8> = (0..parts[1].len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&parts[1][i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(envelope::key_id(&bytes), Some("k1"));
        let plain = blob.decrypt(&bytes).expect("bytea envelope decrypts");
        let want: String = id
            .to_be_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(String::from_utf8(plain).unwrap(), format!("\\x{want}"));
        assert_eq!(open(&code, parts[2], "k1"), format!("{id:04}"));
    }
}

#[test]
fn reencrypt_refuses_plaintext_and_encrypt_stops_at_ciphertext_it_cannot_read() {
    sql("
        CREATE TABLE migrate_small (id int PRIMARY KEY, secret text);
        INSERT INTO migrate_small SELECT g, 'secret-' || g FROM generate_series(1, 50) g;
        ALTER TABLE migrate_small OWNER TO migrate_catalog;
    ");
    let setup = Setup::new(
        "
version: 1
tables:
  public.migrate_small:
    columns:
      secret: { level: L3, encrypt: randomized }
",
        &[("k1", KEY1)],
    );
    let table = ["--table", "public.migrate_small"];
    ok(setup.run(&["encrypt", table[0], table[1]]));

    // A plaintext value written around pgveil: reencrypt moves the rest, then fails.
    sql("INSERT INTO migrate_small VALUES (51, 'written-around-pgveil')");
    setup.write_keyring(&[("k1", KEY1), ("k2", KEY2)]);
    let output = setup.run(&["reencrypt", table[0], table[1]]);
    assert_eq!(reported(&stdout(&output), "values re-encrypted"), 50);
    assert_eq!(
        reported(&stdout(&output), "plaintext values (not encrypted)"),
        1
    );
    let line = refused(output);
    assert!(
        line.starts_with("pgveil reencrypt: public.migrate_small: 1 plaintext values"),
        "{line}"
    );
    assert!(line.contains("pgveil encrypt"), "{line}");
    assert!(!line.contains("written-around"), "{line}");
    assert_eq!(
        sql("SELECT secret FROM migrate_small WHERE id = 51").trim(),
        "written-around-pgveil",
        "reencrypt encrypts no plaintext"
    );

    // A tampered envelope stops encrypt before the plaintext behind it, naming the row.
    let tampered = sql("SELECT secret FROM migrate_small WHERE id = 7")
        .trim()
        .to_string();
    let mut altered = tampered.clone().into_bytes();
    let last = altered.len() - 3;
    altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    sql(&format!(
        "UPDATE migrate_small SET secret = '{altered}' WHERE id = 7"
    ));
    let line = refused(setup.run(&["encrypt", table[0], table[1], "--batch", "10"]));
    assert!(
        line.starts_with("pgveil encrypt: public.migrate_small: column secret, row id=7: stored ciphertext does not decrypt"),
        "{line}"
    );
    assert!(
        !line.contains(&altered) && !line.contains("secret-7"),
        "{line}"
    );
    assert_eq!(
        sql("SELECT secret FROM migrate_small WHERE id = 51").trim(),
        "written-around-pgveil",
        "the run stopped before row 51"
    );

    // Text that starts like an envelope but is none is not taken for plaintext.
    sql(&format!(
        "UPDATE migrate_small SET secret = '{tampered}' WHERE id = 7; \
         UPDATE migrate_small SET secret = 'pgv1:not-base64!' WHERE id = 9"
    ));
    let line = refused(setup.run(&["encrypt", table[0], table[1]]));
    assert!(
        line.contains(
            "column secret, row id=9: the value starts with `pgv1:` but is not a pgveil envelope"
        ),
        "{line}"
    );
    assert!(!line.contains("not-base64"), "{line}");
}

#[test]
fn a_value_its_type_rejects_stops_the_run_without_showing_it() {
    sql("
        CREATE TABLE migrate_bad (id int PRIMARY KEY, amount text);
        INSERT INTO migrate_bad SELECT g, (g * 3)::text FROM generate_series(1, 30) g;
        UPDATE migrate_bad SET amount = 'twelve-ish' WHERE id = 23;
        ALTER TABLE migrate_bad OWNER TO migrate_catalog;
    ");
    let setup = Setup::new(
        "
version: 1
tables:
  public.migrate_bad:
    columns:
      amount: { level: L3, encrypt: deterministic, type: int4 }
",
        &[("k1", KEY1)],
    );
    let line = refused(setup.run(&["encrypt", "--table", "public.migrate_bad", "--batch", "10"]));
    assert_eq!(
        line,
        "pgveil encrypt: public.migrate_bad: column amount, row id=23: the stored plaintext is not \
         a valid int4: invalid input syntax for type integer (22P02); fix that value and run again \
         (20 values written before this stay committed; a rerun skips them)"
    );
    assert_eq!(
        sql("SELECT count(*) FROM migrate_bad WHERE amount LIKE 'pgv1:%'").trim(),
        "20"
    );
}

#[test]
fn a_column_that_needs_widening_without_a_type_is_refused_and_left_alone() {
    sql("
        CREATE TABLE migrate_untyped (id int PRIMARY KEY, amount numeric(10,2), note varchar(8));
        INSERT INTO migrate_untyped VALUES (1, 10.50, 'a'), (2, NULL, 'b');
        ALTER TABLE migrate_untyped OWNER TO migrate_catalog;
    ");
    let setup = Setup::new(
        "
version: 1
tables:
  public.migrate_untyped:
    columns:
      note:   { level: L3, encrypt: randomized }
      amount: { level: L3, encrypt: randomized }
",
        &[("k1", KEY1)],
    );
    let line = refused(setup.run(&["encrypt", "--table", "public.migrate_untyped"]));
    assert!(
        line.starts_with("pgveil encrypt: public.migrate_untyped: column amount is numeric(10,2), which must be widened to text"),
        "{line}"
    );
    assert!(line.contains("add `type: numeric`"), "{line}");
    let types = column_types("migrate_untyped");
    assert_eq!(types["amount"], "numeric(10,2)");
    assert_eq!(types["note"], "character varying(8)", "nothing was widened");
    assert_eq!(
        sql("SELECT amount || note FROM migrate_untyped WHERE id = 1").trim(),
        "10.50a"
    );
}

#[test]
fn refusals_are_one_line_saying_what_and_where() {
    sql("
        CREATE TABLE migrate_locked (id int PRIMARY KEY, secret text);
        INSERT INTO migrate_locked VALUES (1, 'one'), (2, 'two');
        GRANT SELECT ON migrate_locked TO migrate_limited;
        CREATE TABLE migrate_defaulted (id int PRIMARY KEY, score int DEFAULT 0);
        ALTER TABLE migrate_defaulted OWNER TO migrate_catalog;
    ");
    let policy = "
version: 1
tables:
  public.migrate_locked:
    columns:
      secret: { level: L3, encrypt: randomized }
  public.migrate_defaulted:
    columns:
      score: { level: L3, encrypt: randomized, type: int4 }
  public.migrate_plain:
    columns:
      secret: { level: L3, mask: full }
";
    // Only SELECT: the first batch (SELECT … FOR UPDATE) fails with the server's reason
    // and SQLSTATE.
    let limited = Setup::with_login(policy, &[("k1", KEY1)], "migrate_limited");
    let line = refused(limited.run(&["encrypt", "--table", "public.migrate_locked"]));
    assert_eq!(
        line,
        "pgveil encrypt: public.migrate_locked: reading a batch: permission denied for table migrate_locked (42501)"
    );
    assert_eq!(
        sql("SELECT secret FROM migrate_locked WHERE id = 1").trim(),
        "one"
    );

    let setup = Setup::new(policy, &[("k1", KEY1)]);
    let line = refused(setup.run(&["encrypt", "--table", "public.migrate_elsewhere"]));
    assert!(
        line.starts_with("pgveil encrypt: public.migrate_elsewhere is not a table of the policy"),
        "{line}"
    );
    let line = refused(setup.run(&["encrypt", "--table", "public.migrate_plain"]));
    assert_eq!(
        line,
        "pgveil encrypt: public.migrate_plain: the policy encrypts none of its columns (no `encrypt:`)"
    );
    let line = refused(setup.run(&["encrypt", "--table", "public.migrate_defaulted"]));
    assert!(
        line.starts_with(
            "pgveil encrypt: public.migrate_defaulted: column score (integer) has a default"
        ),
        "{line}"
    );
    assert_eq!(column_types("migrate_defaulted")["score"], "integer");

    // No keyring: neither in the config nor in PGVEIL_KEYRING.
    let config = std::fs::read_to_string(&setup.config).unwrap();
    let without = setup.dir.join("no-keyring.yaml");
    std::fs::write(
        &without,
        config
            .lines()
            .filter(|l| !l.starts_with("keyring:"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["reencrypt", "--table", "public.migrate_locked", "--config"])
        .arg(&without)
        .env_remove("PGVEIL_KEYRING")
        .output()
        .unwrap();
    assert_eq!(
        refused(output),
        "pgveil reencrypt: reencrypt needs a keyring: set `keyring` in the config, or PGVEIL_KEYRING"
    );
}

#[test]
fn both_commands_explain_themselves() {
    for command in ["encrypt", "reencrypt"] {
        let output = Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(output.status.success());
        let help = stdout(&output);
        for needle in [
            "--config <FILE>",
            "--table <SCHEMA.TABLE>",
            "--database <NAME>",
            "--batch <N>",
            "Example:",
        ] {
            assert!(
                help.contains(needle),
                "{command} --help lacks {needle}:\n{help}"
            );
        }
        assert!(
            help.contains(&format!("pgveil {command} --config")),
            "{help}"
        );
    }
    let output = Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["encrypt", "--help"])
        .output()
        .unwrap();
    assert!(stdout(&output).contains("[default: 1000]"));
    let output = Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["encrypt", "--table", "t"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "--config is required");
}

#[test]
fn composite_keys_page_by_row_comparison_and_protected_keys_are_never_named() {
    sql("
        CREATE TABLE migrate_pair (a int, b text, n text, PRIMARY KEY (a, b));
        INSERT INTO migrate_pair SELECT g / 3, 'k' || g % 3, g::text FROM generate_series(0, 59) g;
        UPDATE migrate_pair SET n = 'not a number' WHERE a = 17 AND b = 'k1';
        ALTER TABLE migrate_pair OWNER TO migrate_catalog;
        CREATE TABLE migrate_masked_key (id_card text PRIMARY KEY, n text);
        INSERT INTO migrate_masked_key VALUES ('110105199001011234', 'oops');
        ALTER TABLE migrate_masked_key OWNER TO migrate_catalog;
    ");
    let setup = Setup::new(
        "
version: 1
tables:
  public.migrate_pair:
    columns:
      n: { level: L3, encrypt: randomized, type: int4 }
  public.migrate_masked_key:
    columns:
      id_card: { level: L3, mask: cn_id_card }
      n:       { level: L3, encrypt: randomized, type: int4 }
",
        &[("k1", KEY1)],
    );
    let line = refused(setup.run(&["encrypt", "--table", "public.migrate_pair", "--batch", "7"]));
    assert!(
        line.starts_with("pgveil encrypt: public.migrate_pair: column n, row (a, b)=(17, k1): the stored plaintext is not a valid int4"),
        "{line}"
    );
    assert!(!line.contains("not a number"), "{line}");
    // Rows before (17, k1) in key order are done, in whole batches of 7: 49 of the 52.
    assert_eq!(
        sql("SELECT count(*) FROM migrate_pair WHERE n LIKE 'pgv1:%'").trim(),
        "49"
    );
    sql("UPDATE migrate_pair SET n = '52' WHERE a = 17 AND b = 'k1'");
    let report = ok(setup.run(&["encrypt", "--table", "public.migrate_pair", "--batch", "7"]));
    assert!(report.contains("primary key (a, b)"), "{report}");
    assert_eq!(reported(&report, "rows scanned"), 60, "{report}");
    assert_eq!(reported(&report, "values encrypted"), 11, "{report}");
    assert_eq!(reported(&report, "values already encrypted (skipped)"), 49);
    let n = cipher(&[("k1", KEY1)], "migrate_pair", "n", CipherMode::Randomized);
    let mut numbers: Vec<i32> = sql("SELECT n FROM migrate_pair")
        .lines()
        .map(|stored| open(&n, stored, "k1").parse().unwrap())
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (0..60).collect::<Vec<_>>());

    // The key is protected (masked): the row is named by its ctid.
    let line = refused(setup.run(&["encrypt", "--table", "public.migrate_masked_key"]));
    assert!(
        line.starts_with("pgveil encrypt: public.migrate_masked_key: column n, row at ctid (0,1): the stored plaintext is not a valid int4"),
        "{line}"
    );
    assert!(!line.contains("110105"), "{line}");
}
