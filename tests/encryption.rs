//! Encryption at rest against a real PostgreSQL: what INSERT and UPDATE store (read
//! around pgveil), what each role reads back through the simple and extended protocols,
//! equality lookups on deterministic columns, the refusals of what ciphertext cannot
//! answer (0A000) or would store in plaintext (42501), tampered and moved ciphertext
//! (XX001), and key rotation.

mod support;

use std::sync::OnceLock;

use futures_util::SinkExt;
use support::{cluster, policy_yaml, sqlstate, write_policy, Proxy, ProxyOptions};
use tokio_postgres::SimpleQueryMessage;

const SCHEMA: &str = "
CREATE ROLE enc_catalog LOGIN;
CREATE ROLE enc_billing LOGIN;
CREATE ROLE enc_support LOGIN;
CREATE TABLE accounts (
    id int PRIMARY KEY, name text,
    id_card text, phone text, balance text, opened text, score text, note text);
GRANT ALL ON accounts TO PUBLIC;
";

const POLICY: &str = "
version: 1
roles:
  billing: { members: [enc_billing] }
  support: { members: [enc_support] }
tables:
  public.accounts:
    columns:
      id_card: { level: L3, encrypt: deterministic, mask: cn_id_card, access: { billing: allow } }
      phone:   { level: L3, encrypt: randomized, mask: cn_mobile, access: { billing: allow } }
      balance: { level: L3, encrypt: deterministic, type: numeric, access: { billing: allow, support: redact } }
      opened:  { level: L2, encrypt: randomized, type: date, access: { billing: allow, support: allow } }
      score:   { level: L2, encrypt: randomized, type: int4, access: { billing: allow, support: allow } }
";

const KEY1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

const ID_CARD: &str = "110105199001011234";
const PHONE: &str = "13812345678";

static SCHEMA_READY: OnceLock<()> = OnceLock::new();

fn schema() {
    SCHEMA_READY.get_or_init(|| {
        cluster().psql_ok("postgres", SCHEMA);
    });
}

/// pgveil with the policy and a keyring of `keys` (id, base64), the last one active.
fn proxy(keys: &[(&str, &str)]) -> Proxy {
    proxy_with(POLICY, keys).0
}

/// pgveil with `policy_text` (its file path returned, for edits) and a keyring.
fn proxy_with(policy_text: &str, keys: &[(&str, &str)]) -> (Proxy, std::path::PathBuf) {
    schema();
    let policy = write_policy(policy_text);
    let dir = policy.parent().expect("policy folder");
    let mut keyring = format!("active: {}\nkeys:\n", keys.last().expect("a key").0);
    for (id, key) in keys {
        keyring.push_str(&format!("  {id}: {key}\n"));
    }
    let keyring_path = dir.join("keyring.yaml");
    std::fs::write(&keyring_path, keyring).expect("keyring");
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: format!(
            "{}keyring: {}\n",
            policy_yaml("enc_catalog", &policy),
            keyring_path.display()
        ),
        ..ProxyOptions::default()
    });
    (proxy, policy)
}

/// Rows of a simple query, every value as text.
async fn rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    let messages = client.simple_query(sql).await.map_err(|e| sqlstate(&e))?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// Every value of every row of `accounts`, read around pgveil.
async fn stored(ids: &str) -> String {
    let direct = cluster().direct().await;
    let rows = direct
        .simple_query(&format!(
            "SELECT row_to_json(a)::text FROM accounts a WHERE id IN ({ids})"
        ))
        .await
        .expect("direct read");
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn writes_store_ciphertext_and_each_role_reads_what_the_policy_allows() {
    let proxy = proxy(&[("k1", KEY1)]);
    let billing = proxy.connect("enc_billing").await;
    // Simple protocol: literals.
    billing
        .simple_query(&format!(
            "INSERT INTO accounts (id, name, id_card, phone, balance, opened, score) \
             VALUES (1, 'Zhang', '{ID_CARD}', '{PHONE}', 1.50, '2024-02-29', -7), \
                    (2, 'Li', '320102198805052345', NULL, '-0.25', DEFAULT, 42)"
        ))
        .await
        .expect("simple insert");
    // Extended protocol: parameters in binary (int4) and text.
    billing
        .execute(
            "INSERT INTO accounts (id, name, id_card, phone, score) VALUES ($1, $2, $3, $4, $5)",
            &[
                &3i32,
                &"Wang",
                &"440106197712123456",
                &"13900000003",
                &123i32,
            ],
        )
        .await
        .expect("extended insert");
    billing
        .execute(
            "UPDATE accounts SET phone = $1 WHERE id = $2",
            &[&"13900000004", &3i32],
        )
        .await
        .expect("extended update");

    // Around pgveil: ciphertext only.
    let raw = stored("1, 2, 3").await;
    for plaintext in [
        ID_CARD,
        PHONE,
        "1.5",
        "2024-02-29",
        "-7",
        "13900000004",
        "440106197712123456",
        "123",
    ] {
        assert!(
            !raw.contains(plaintext),
            "{plaintext} stored in plaintext: {raw}"
        );
    }
    assert!(raw.contains("\"phone\":\"pgv1:"), "{raw}");
    assert!(raw.contains("\"name\":\"Zhang\""), "{raw}");

    // Through pgveil, text format.
    let read = rows(
        &billing,
        "SELECT id_card, phone, balance, opened, score FROM accounts WHERE id = 1",
    )
    .await
    .unwrap();
    let expected: Vec<Option<String>> = [ID_CARD, PHONE, "1.5", "2024-02-29", "-7"]
        .iter()
        .map(|v| Some(v.to_string()))
        .collect();
    assert_eq!(read, vec![expected]);
    let support = proxy.connect("enc_support").await;
    let read = rows(
        &support,
        "SELECT id_card, phone, balance, score FROM accounts WHERE id = 1",
    )
    .await
    .unwrap();
    assert_eq!(
        read,
        vec![vec![
            Some("110105********1234".into()),
            Some("138****5678".into()),
            None,
            Some("-7".into())
        ]]
    );

    // Extended protocol, binary results in the logical type.
    let row = billing
        .query_one(
            "SELECT score, phone, id_card FROM accounts WHERE id = $1",
            &[&3i32],
        )
        .await
        .expect("extended read");
    assert_eq!(row.get::<_, i32>(0), 123);
    assert_eq!(row.get::<_, &str>(1), "13900000004");
    assert_eq!(row.get::<_, &str>(2), "440106197712123456");
    // The client sees the logical types in RowDescription and ParameterDescription.
    let statement = billing
        .prepare("SELECT score, opened FROM accounts WHERE id_card = $1")
        .await
        .expect("prepare");
    assert_eq!(
        statement.columns()[0].type_(),
        &tokio_postgres::types::Type::INT4
    );
    assert_eq!(
        statement.columns()[1].type_(),
        &tokio_postgres::types::Type::DATE
    );
    assert_eq!(statement.params(), &[tokio_postgres::types::Type::TEXT]);
    // A value that is not of the column's type is refused like PostgreSQL would.
    let error = billing
        .simple_query("INSERT INTO accounts (id, score) VALUES (9, 'many')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "22P02");
    let error = billing
        .simple_query("INSERT INTO accounts (id, opened) VALUES (9, 'yesterday')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "22007");
    assert!(rows(&billing, "SELECT id FROM accounts WHERE id = 9")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn deterministic_columns_answer_equality_and_the_rest_is_refused() {
    let proxy = proxy(&[("k1", KEY1)]);
    let billing = proxy.connect("enc_billing").await;
    billing
        .simple_query(
            "INSERT INTO accounts (id, id_card, phone, balance) VALUES \
             (101, 'D-1', '139-1', '10'), (102, 'D-2', '139-2', '20'), (103, 'D-1', '139-3', '10.00')",
        )
        .await
        .expect("insert");
    let ids = |rows: Vec<Vec<Option<String>>>| -> Vec<String> {
        rows.into_iter()
            .map(|r| r[0].clone().unwrap_or_default())
            .collect()
    };
    let found = rows(
        &billing,
        "SELECT id FROM accounts WHERE id_card = 'D-1' ORDER BY id",
    )
    .await
    .unwrap();
    assert_eq!(ids(found), ["101", "103"]);
    let found = rows(
        &billing,
        "SELECT id FROM accounts WHERE id_card IN ('D-2', 'nope') AND id > 100",
    )
    .await
    .unwrap();
    assert_eq!(ids(found), ["102"]);
    // Canonical values: 10 and 10.00 are one numeric value.
    let found = rows(
        &billing,
        "SELECT id FROM accounts WHERE balance = 10.0 ORDER BY id",
    )
    .await
    .unwrap();
    assert_eq!(ids(found), ["101", "103"]);
    let found = billing
        .query(
            "SELECT id FROM accounts WHERE id_card = $1 ORDER BY id",
            &[&"D-1"],
        )
        .await
        .expect("extended lookup");
    assert_eq!(
        found.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(),
        [101, 103]
    );
    let found = rows(
        &billing,
        "SELECT a.id, b.id FROM accounts a JOIN accounts b ON a.id_card = b.id_card WHERE a.id = 101 AND b.id <> a.id",
    )
    .await
    .unwrap();
    assert_eq!(ids(found), ["101"]);
    let deleted = billing
        .execute(
            "DELETE FROM accounts WHERE id_card = $1 AND id = 103",
            &[&"D-1"],
        )
        .await
        .expect("delete");
    assert_eq!(deleted, 1);

    for (sql, state) in [
        ("SELECT id FROM accounts WHERE phone = '139-1'", "0A000"),
        ("SELECT id FROM accounts ORDER BY phone", "0A000"),
        ("SELECT id FROM accounts WHERE balance > 5", "0A000"),
        ("SELECT id FROM accounts WHERE id_card LIKE 'D%'", "0A000"),
        ("SELECT upper(id_card) FROM accounts", "0A000"),
        ("SELECT sum(score::int) FROM accounts", "0A000"),
        (
            "INSERT INTO accounts (id, phone) SELECT 200, phone FROM accounts WHERE id = 101",
            "42501",
        ),
        (
            "UPDATE accounts SET phone = phone || '0' WHERE id = 101",
            "42501",
        ),
        ("SELECT FROM accounts WHERE (", "42501"),
    ] {
        let error = billing.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&error), state, "{sql}: {error}");
        let db = error.as_db_error().expect("server error");
        assert!(
            db.message().starts_with("pgveil:"),
            "{sql}: {}",
            db.message()
        );
        assert!(!db.message().contains("139-1"), "{sql}");
    }
    // Extended protocol refusals keep the session usable.
    let error = billing
        .query("SELECT id FROM accounts WHERE phone = $1", &[&"139-1"])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "0A000");
    let error = billing
        .execute(
            "INSERT INTO accounts (id, score) VALUES ($1, $2)",
            &[&300i32, &"x"],
        )
        .await
        .unwrap_err();
    assert!(
        ["22P02", "XX000"].contains(&sqlstate(&error).as_str()) || error.as_db_error().is_none()
    );
    let still = rows(&billing, "SELECT count(*) FROM accounts WHERE id = 101")
        .await
        .unwrap();
    assert_eq!(still, vec![vec![Some("1".into())]]);
    let raw = stored("101, 102").await;
    assert!(!raw.contains("139-1") && !raw.contains("D-1"), "{raw}");
}

#[tokio::test]
async fn tampered_or_moved_ciphertext_is_an_error_and_rotated_keys_still_read() {
    let old = proxy(&[("k1", KEY1)]);
    let client = old.connect("enc_billing").await;
    client
        .simple_query("INSERT INTO accounts (id, id_card, phone, score) VALUES (501, 'R-1', '137-1', '5'), (502, 'R-2', '137-2', '6')")
        .await
        .expect("insert");
    let direct = cluster().direct().await;
    // A ciphertext moved into another column does not decrypt there.
    direct
        .simple_query("UPDATE accounts SET id_card = phone WHERE id = 502")
        .await
        .expect("move");
    let error = client
        .simple_query("SELECT id_card FROM accounts WHERE id = 502")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "XX001", "{error}");
    // One altered character.
    direct
        .simple_query("UPDATE accounts SET phone = overlay(phone placing (CASE WHEN substr(phone, 20, 1) = 'A' THEN 'B' ELSE 'A' END) from 20 for 1) WHERE id = 501")
        .await
        .expect("tamper");
    let error = client
        .simple_query("SELECT phone FROM accounts WHERE id = 501")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "XX001");
    // Plaintext written around pgveil is refused, not shown.
    direct
        .simple_query("INSERT INTO accounts (id, phone) VALUES (503, 'plain')")
        .await
        .expect("plaintext");
    let error = client
        .simple_query("SELECT phone FROM accounts WHERE id = 503")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "XX001");
    assert!(!error.to_string().contains("plain'"));

    // Rotation: k2 active, k1 kept for reading.
    let rotated = proxy(&[("k1", KEY1), ("k2", KEY2)]);
    let client = rotated.connect("enc_billing").await;
    client
        .simple_query("INSERT INTO accounts (id, id_card, score) VALUES (504, 'R-1', '8')")
        .await
        .expect("insert under k2");
    let read = rows(
        &client,
        "SELECT score FROM accounts WHERE id IN (501, 504) ORDER BY id",
    )
    .await
    .unwrap();
    assert_eq!(read, vec![vec![Some("5".into())], vec![Some("8".into())]]);
    // Equality finds rows under both keys, literal and parameter alike.
    let found = rows(
        &client,
        "SELECT id FROM accounts WHERE id_card = 'R-1' ORDER BY id",
    )
    .await
    .unwrap();
    assert_eq!(
        found,
        vec![vec![Some("501".into())], vec![Some("504".into())]]
    );
    let found = client
        .query(
            "SELECT id FROM accounts WHERE id_card = $1 ORDER BY id",
            &[&"R-1"],
        )
        .await
        .expect("extended lookup across keys");
    assert_eq!(
        found.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(),
        [501, 504]
    );
    // New rows name the new key.
    let stored_id_card: String = direct
        .query_one("SELECT id_card FROM accounts WHERE id = 504", &[])
        .await
        .expect("direct")
        .get(0);
    let envelope =
        pgveil::protect::envelope::from_text(stored_id_card.as_bytes()).expect("envelope");
    assert_eq!(pgveil::protect::envelope::key_id(&envelope), Some("k2"));
    // A keyring without k1 cannot read the old rows.
    let forgetful = proxy(&[("k2", KEY2)]);
    let client = forgetful.connect("enc_billing").await;
    let error = client
        .simple_query("SELECT score FROM accounts WHERE id = 501")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "XX001");
}

#[tokio::test]
async fn a_statement_prepared_before_a_policy_encrypted_its_column_must_be_prepared_again() {
    let (proxy, policy) = proxy_with(POLICY, &[("k1", KEY1)]);
    let client = proxy.connect("enc_billing").await;
    let insert = client
        .prepare("INSERT INTO accounts (id, note) VALUES ($1, $2)")
        .await
        .expect("prepare");
    client
        .execute(&insert, &[&701i32, &"plain note"])
        .await
        .expect("note is not encrypted yet");
    // The DBA encrypts `note`.
    let encrypted = POLICY.replace(
        "      score:",
        "      note:    { level: L2, encrypt: randomized, access: { billing: allow } }\n      score:",
    );
    std::fs::write(&policy, encrypted).expect("edit policy");
    let reloaded = support::eventually(std::time::Duration::from_secs(10), || async {
        client
            .simple_query("SELECT id FROM accounts WHERE id = 0 ORDER BY note")
            .await
            .is_err_and(|e| sqlstate(&e) == "0A000")
    })
    .await;
    assert!(reloaded, "the policy was not reloaded:\n{}", proxy.log());
    // The old statement would bind the note in plaintext: refused.
    let error = client
        .execute(&insert, &[&702i32, &"secret note"])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "0A000", "{error}");
    // Prepared again, it encrypts.
    let insert = client
        .prepare("INSERT INTO accounts (id, note) VALUES ($1, $2)")
        .await
        .expect("prepare again");
    client
        .execute(&insert, &[&702i32, &"secret note"])
        .await
        .expect("encrypted insert");
    let raw = stored("702").await;
    assert!(!raw.contains("secret note"), "{raw}");
    assert!(raw.contains("\"note\":\"pgv1:"), "{raw}");
}

/// Asserts that none of `plaintexts` is stored anywhere in rows `ids`, and that every
/// encrypted column of those rows that is not NULL holds an envelope.
async fn assert_stored_encrypted(ids: &str, plaintexts: &[&str]) {
    let stored = stored(ids).await;
    assert!(!stored.is_empty(), "rows {ids} exist");
    for plaintext in plaintexts {
        assert!(
            !stored.contains(plaintext),
            "{plaintext:?} is stored in plaintext: {stored}"
        );
    }
    let direct = cluster().direct().await;
    let unencrypted: i64 = direct
        .query_one(
            &format!(
                "SELECT count(*) FROM accounts, unnest(ARRAY[id_card, phone, balance, opened, score]) v \
                 WHERE id IN ({ids}) AND v IS NOT NULL AND v NOT LIKE 'pgv1:%'"
            ),
            &[],
        )
        .await
        .expect("direct count")
        .get(0);
    assert_eq!(
        unencrypted, 0,
        "every encrypted value of rows {ids} is an envelope"
    );
}

/// psql (verbose errors) through pgveil running `\copy target FROM` a file holding
/// `data` `options`.
fn psql_copy(
    proxy: &Proxy,
    target: &str,
    options: &str,
    data: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    let file = tempfile_with(data);
    let output = proxy.psql_env(
        "enc_billing",
        [
            "-v",
            "VERBOSITY=verbose",
            "-c",
            &format!("\\copy {target} FROM '{}' {options}", file.display()),
        ],
        env,
    );
    let _ = std::fs::remove_file(file);
    output
}

fn tempfile_with(data: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "pgveil-copy-{}-{}.data",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&path, data).expect("copy data file");
    path
}

#[tokio::test]
async fn copy_from_stdin_stores_every_encrypted_field_as_ciphertext() {
    let proxy = proxy(&[("k1", KEY1)]);
    let billing = proxy.connect("enc_billing").await;
    billing
        .simple_query("DELETE FROM accounts WHERE id BETWEEN 900 AND 999")
        .await
        .expect("clean");

    // Text format through psql's \copy (simple protocol): escapes in encrypted and
    // plain fields, NULLs, a tab inside a plain field.
    let text = format!(
        "901\tZhang\\tSan\t\\x31\\x311010519900101123\\x34\t{PHONE}\t12.50\t2024-02-29\t-7\tplain note\n\
         902\tLi\t320102198805052345\t\\N\t0.10\t\\N\t42\t\\N\n"
    );
    let output = psql_copy(
        &proxy,
        "accounts (id, name, id_card, phone, balance, opened, score, note)",
        "",
        &text,
        &[],
    );
    assert!(
        output.status.success(),
        "text \\copy: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // CSV with a header, quoted fields, a line break and a delimiter inside quotes, and
    // fields in another order.
    let csv = format!(
        "score,id,phone,name,id_card,note\n\
         5,903,\"{PHONE}\",\"Wang, \"\"the elder\"\"\",440106197712123456,\"two\nlines\"\n\
         6,904,,Zhao,\"{ID_CARD}\",\n"
    );
    let output = psql_copy(
        &proxy,
        "accounts (score, id, phone, name, id_card, note)",
        "WITH (FORMAT csv, HEADER)",
        &csv,
        &[],
    );
    assert!(
        output.status.success(),
        "csv \\copy: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Extended protocol (tokio-postgres copy_in): rows split across CopyData messages
    // at every awkward place.
    let mut data = String::new();
    for id in 910..960 {
        data.push_str(&format!(
            "{id}\tBulk {id}\t1101051990010{id:05}\t139{id:08}\t{id}.25\t2023-01-{:02}\t{id}\n",
            id % 28 + 1
        ));
    }
    let sink = billing
        .copy_in("COPY accounts (id, name, id_card, phone, balance, opened, score) FROM STDIN")
        .await
        .expect("copy_in");
    futures_util::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(37) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .expect("send");
    }
    assert_eq!(sink.finish().await.expect("finish"), 50);

    // Around pgveil: ciphertext only.
    assert_stored_encrypted(
        "901, 902, 903, 904, 910, 935, 959",
        &[
            ID_CARD,
            PHONE,
            "11101051990010",
            "320102198805052345",
            "440106197712123456",
            "2024-02-29",
            "12.5",
            "13900000935",
            "1101051990010009",
        ],
    )
    .await;
    // The plain fields arrived exactly as sent.
    let direct = cluster().direct().await;
    let plain = direct
        .query(
            "SELECT id, name, note FROM accounts WHERE id IN (901, 902, 903, 904) ORDER BY id",
            &[],
        )
        .await
        .expect("plain fields");
    let plain: Vec<(i32, Option<String>, Option<String>)> = plain
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        plain,
        [
            (901, Some("Zhang\tSan".into()), Some("plain note".into())),
            (902, Some("Li".into()), None),
            (
                903,
                Some("Wang, \"the elder\"".into()),
                Some("two\nlines".into())
            ),
            (904, Some("Zhao".into()), None),
        ]
    );

    // Through pgveil: the values as loaded, and deterministic lookups find them (the
    // text-format escapes were decoded before encryption).
    assert_eq!(
        rows(
            &billing,
            "SELECT id, id_card, phone, balance, opened, score FROM accounts \
             WHERE id IN (901, 902, 903, 904) ORDER BY id"
        )
        .await
        .expect("read back"),
        [
            vec![
                Some("901".into()),
                Some("1110105199001011234".into()),
                Some(PHONE.into()),
                Some("12.5".into()),
                Some("2024-02-29".into()),
                Some("-7".into()),
            ],
            vec![
                Some("902".into()),
                Some("320102198805052345".into()),
                None,
                Some("0.1".into()),
                None,
                Some("42".into()),
            ],
            vec![
                Some("903".into()),
                Some("440106197712123456".into()),
                Some(PHONE.into()),
                None,
                None,
                Some("5".into()),
            ],
            vec![
                Some("904".into()),
                Some(ID_CARD.into()),
                None,
                None,
                None,
                Some("6".into()),
            ],
        ]
    );
    let found = rows(
        &billing,
        "SELECT id FROM accounts WHERE id_card = '1110105199001011234' OR balance = '935.250'",
    )
    .await
    .expect("lookup");
    let mut found: Vec<i64> = found
        .iter()
        .filter_map(|r| r[0].as_deref()?.parse().ok())
        .collect();
    found.sort_unstable();
    assert_eq!(found, [901, 935]);
    let bulk: Vec<tokio_postgres::Row> = billing
        .query(
            "SELECT score, opened FROM accounts WHERE id BETWEEN 910 AND 959 ORDER BY id",
            &[],
        )
        .await
        .expect("bulk read");
    assert_eq!(bulk.len(), 50);
    assert_eq!(bulk[25].get::<_, i32>(0), 935);
}

#[tokio::test]
async fn copy_from_stdin_that_pgveil_cannot_encrypt_stores_nothing() {
    let proxy = proxy(&[("k1", KEY1)]);
    let billing = proxy.connect("enc_billing").await;
    billing
        .simple_query("DELETE FROM accounts WHERE id BETWEEN 800 AND 899")
        .await
        .expect("clean");
    let columns = "accounts (id, id_card, score)";
    let failing = [
        // Not an int4 for the encrypted score: the client sees the type's error.
        ("801\t1\t12\n802\t2\tabc\n", "22P02"),
        // A field too many, and one too few.
        ("803\t1\t2\t3\n", "22P04"),
        ("804\t1\n", "22P04"),
        // A stray carriage return the server would also refuse.
        ("805\t1\r2\t3\n", "22P04"),
    ];
    for (data, expected) in failing {
        let output = psql_copy(&proxy, columns, "", data, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{data:?} was refused");
        assert!(stderr.contains("pgveil"), "{data:?}: {stderr}");
        assert!(stderr.contains(expected), "{data:?}: {stderr}");
        assert!(!stderr.contains("abc"), "the value is not echoed: {stderr}");
    }
    // Unsupported forms are refused before anything is read.
    for (options, env) in [
        ("WITH (FORMAT binary)", &[][..]),
        ("", &[("PGCLIENTENCODING", "SJIS")][..]),
    ] {
        let output = psql_copy(&proxy, columns, options, "806\t1\t2\n", env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("0A000"), "{options} {env:?}: {stderr}");
    }

    // Extended protocol: a bad value in the middle of the stream fails the COPY and
    // the session goes on.
    let sink = billing
        .copy_in("COPY accounts (id, id_card, score) FROM STDIN")
        .await
        .expect("copy_in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"810\t1\t1\n811\t2\t"))
        .await
        .expect("send");
    sink.send(bytes::Bytes::from_static(b"2.5\n812\t3\t3\n"))
        .await
        .expect("send");
    let error = sink.finish().await.expect_err("refused");
    assert_eq!(sqlstate(&error), "22P02", "{error:?}");
    let message = error.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("pgveil") && m.contains("line 2")),
        "{message:?}"
    );

    let stored: i64 = cluster()
        .direct()
        .await
        .query_one(
            "SELECT count(*) FROM accounts WHERE id BETWEEN 800 AND 899",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 0, "no refused COPY stored a row");
    assert_eq!(
        rows(&billing, "SELECT 1").await.expect("session usable"),
        [vec![Some("1".into())]]
    );
}

#[tokio::test]
async fn a_statement_prepared_before_its_table_joined_an_encrypted_one_is_prepared_again() {
    schema();
    cluster().psql_ok(
        "postgres",
        "DROP TABLE IF EXISTS enc_parts, enc_parts_new;
         CREATE TABLE enc_parts (id int, secret text) PARTITION BY RANGE (id);
         CREATE TABLE enc_parts_low PARTITION OF enc_parts FOR VALUES FROM (0) TO (100);
         CREATE TABLE enc_parts_new (id int, secret text);
         ALTER TABLE enc_parts OWNER TO enc_billing;
         ALTER TABLE enc_parts_low OWNER TO enc_billing;
         ALTER TABLE enc_parts_new OWNER TO enc_billing;",
    );
    let (proxy, _) = proxy_with(
        "
version: 1
roles:
  billing: { members: [enc_billing] }
tables:
  public.enc_parts:
    columns:
      secret: { level: L3, encrypt: randomized, access: { billing: allow } }
",
        &[("k1", KEY1)],
    );
    let billing = proxy.connect("enc_billing").await;
    let into_parent = billing
        .prepare("INSERT INTO enc_parts (id, secret) VALUES ($1, $2)")
        .await
        .expect("prepare parent insert");
    let into_new = billing
        .prepare("INSERT INTO enc_parts_new (id, secret) VALUES ($1, $2)")
        .await
        .expect("prepare insert into the plain table");

    // The plain table is attached to the encrypted one around pgveil (pgveil cannot
    // parse ATTACH PARTITION and refuses it for a table with encrypted columns); other
    // DDL through pgveil makes every session wait for a fresh catalog.
    cluster().psql_ok(
        "postgres",
        "ALTER TABLE enc_parts ATTACH PARTITION enc_parts_new FOR VALUES FROM (100) TO (200)",
    );
    let ddl = proxy.connect("enc_billing").await;
    ddl.batch_execute(
        "DROP TABLE IF EXISTS enc_parts_marker; CREATE TABLE enc_parts_marker (id int)",
    )
    .await
    .expect("DDL through pgveil");

    // Its parameter would now go into an encrypted column: refused, nothing stored.
    let error = billing
        .execute(&into_new, &[&150i32, &"after attach"])
        .await
        .expect_err("a stale plan is refused");
    assert_eq!(sqlstate(&error), "0A000", "{error:?}");
    // The statement whose analysis did not change still runs, and encrypts.
    billing
        .execute(&into_parent, &[&50i32, &"parent insert"])
        .await
        .expect("an unchanged plan survives the catalog refresh");
    // Prepared again, it encrypts.
    let again = billing
        .prepare("INSERT INTO enc_parts_new (id, secret) VALUES ($1, $2)")
        .await
        .expect("prepare again");
    billing
        .execute(&again, &[&151i32, &"prepared again"])
        .await
        .expect("insert after preparing again");

    let direct = cluster().direct().await;
    let stored: Vec<(i32, String)> = direct
        .query("SELECT id, secret FROM enc_parts ORDER BY id", &[])
        .await
        .expect("direct read")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        stored.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [50, 151]
    );
    assert!(
        stored.iter().all(|(_, secret)| secret.starts_with("pgv1:")),
        "{stored:?}"
    );
    let read: Vec<String> = billing
        .query("SELECT secret FROM enc_parts ORDER BY id", &[])
        .await
        .expect("read through pgveil")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(read, ["parent insert", "prepared again"]);
}
