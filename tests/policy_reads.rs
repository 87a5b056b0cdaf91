//! The read path of the policy against a real PostgreSQL: for each role and protected
//! column, what comes back through the simple and extended protocols, in text and
//! binary formats; views, cursors, RETURNING, SQL PREPARE/EXECUTE, pipelines, policy
//! reloads and catalog refreshes.

mod support;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use support::{
    cluster, cstr, eventually, frame, free_port, policy_yaml, sqlstate, write_policy, Message,
    Proxy, ProxyOptions, RawClient,
};
use tokio_postgres::SimpleQueryMessage;

/// The first customer's plaintext, as stored.
const NAME: &str = "张三丰";
const PHONE: &str = "13812345678";
const ID_CARD: &str = "110105199001011234";
const EMAIL: &str = "zhang.san@example.com";

const SCHEMA: &str = "
CREATE ROLE pgveil_catalog LOGIN;
CREATE ROLE billing_svc LOGIN;
CREATE ROLE crm_support;
CREATE ROLE alice LOGIN IN ROLE crm_support;
CREATE ROLE bi_reader LOGIN;
CREATE ROLE guest LOGIN;
CREATE TABLE customers (
    id int PRIMARY KEY, name text, phone text, id_card text, email text,
    birthday date, city text);
INSERT INTO customers VALUES
    (1, '张三丰', '13812345678', '110105199001011234', 'zhang.san@example.com', '1990-01-01', '北京'),
    (2, '欧阳修', '13987654321', '320102198805052345', 'ouyang@example.cn', '1988-05-05', '上海'),
    (3, '李四', NULL, '440106197712123456', 'li.si@example.com', NULL, '北京');
CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, amount numeric(12,2));
INSERT INTO orders VALUES (10, 1, 99.50), (11, 2, 12.00);
CREATE VIEW customer_contacts AS SELECT id, name AS full_name, phone, email, city FROM customers;
CREATE VIEW beijing_contacts AS SELECT full_name, phone FROM customer_contacts WHERE city = '北京';
CREATE VIEW customer_labels AS SELECT id, name || '/' || city AS label, upper(email) AS shout FROM customers;
GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;
GRANT CREATE ON SCHEMA public TO PUBLIC;
";

const POLICY: &str = "
version: 1
roles:
  billing: { members: [billing_svc] }
  support: { members: [crm_support] }
  analyst: { members: [bi_reader] }
tables:
  public.customers:
    columns:
      name:     { level: L2, mask: cn_name, access: { billing: allow } }
      phone:    { level: L3, mask: cn_mobile, access: { billing: allow } }
      id_card:  { level: L4, mask: cn_id_card, access: { billing: allow, support: mask } }
      email:    { level: L3, mask: email, access: { billing: allow, analyst: redact } }
      birthday: { level: L3, mask: year, access: { billing: allow } }
";

/// What a role should get for one value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Value(&'static str),
    Null,
    Denied,
}

/// The policy above, spelled out for customer 1: (login, column, expected).
fn matrix() -> Vec<(&'static str, &'static str, Seen)> {
    use Seen::*;
    vec![
        ("billing_svc", "name", Value(NAME)),
        ("billing_svc", "phone", Value(PHONE)),
        ("billing_svc", "id_card", Value(ID_CARD)),
        ("billing_svc", "email", Value(EMAIL)),
        ("alice", "name", Value("张**")),
        ("alice", "phone", Value("138****5678")),
        ("alice", "id_card", Value("110105********1234")),
        ("alice", "email", Value("z***@example.com")),
        ("bi_reader", "name", Value("张**")),
        ("bi_reader", "phone", Value("138****5678")),
        ("bi_reader", "id_card", Denied),
        ("bi_reader", "email", Null),
        ("guest", "name", Value("张**")),
        ("guest", "phone", Value("138****5678")),
        ("guest", "id_card", Denied),
        ("guest", "email", Value("z***@example.com")),
    ]
}

static SCHEMA_READY: OnceLock<()> = OnceLock::new();

fn schema() {
    SCHEMA_READY.get_or_init(|| {
        cluster().psql_ok("postgres", SCHEMA);
    });
}

/// pgveil with `policy` (written to a fresh file) and the catalog login.
fn proxy_with(policy: &str) -> (Proxy, PathBuf) {
    schema();
    let path = write_policy(policy);
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: policy_yaml("pgveil_catalog", &path),
        ..ProxyOptions::default()
    });
    (proxy, path)
}

fn proxy() -> Proxy {
    proxy_with(POLICY).0
}

/// The one value of a one-row, one-column simple query result, or the SQLSTATE.
async fn simple_value(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Option<String>, String> {
    let messages = client.simple_query(sql).await.map_err(|e| sqlstate(&e))?;
    let rows: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 1, "{sql}: expected one row, got {rows:?}");
    Ok(rows.into_iter().next().flatten())
}

/// The server's (or pgveil's) message of a tokio-postgres error.
fn message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| error.to_string())
}

fn check(seen: Result<Option<String>, String>, expected: &Seen, what: &str) {
    match (expected, seen) {
        (Seen::Value(value), Ok(Some(got))) => assert_eq!(got, *value, "{what}"),
        (Seen::Null, Ok(None)) => {}
        (Seen::Denied, Err(state)) => assert_eq!(state, "42501", "{what}"),
        (expected, got) => panic!("{what}: expected {expected:?}, got {got:?}"),
    }
}

#[tokio::test]
async fn role_matrix_through_the_simple_protocol() {
    let proxy = proxy();
    for (login, column, expected) in matrix() {
        let client = proxy.connect(login).await;
        let sql = format!("SELECT {column} FROM customers WHERE id = 1");
        check(
            simple_value(&client, &sql).await,
            &expected,
            &format!("{login} {column} simple"),
        );
        // The session stays usable after a denial.
        assert_eq!(
            simple_value(&client, "SELECT 'still here'").await,
            Ok(Some("still here".into()))
        );
    }
}

#[tokio::test]
async fn role_matrix_through_the_extended_protocol_in_binary() {
    let proxy = proxy();
    for (login, column, expected) in matrix() {
        let client = proxy.connect(login).await;
        let sql = format!("SELECT {column} FROM customers WHERE id = $1");
        let seen = match client.query_one(sql.as_str(), &[&1i32]).await {
            Ok(row) => Ok(row.get::<_, Option<String>>(0)),
            Err(error) => Err(sqlstate(&error)),
        };
        check(
            seen,
            &expected,
            &format!("{login} {column} extended binary"),
        );
        let row = client
            .query_one("SELECT $1::int + 1", &[&1i32])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 2);
    }
}

/// Parse/Bind (text results)/Describe/Execute/Sync by hand.
fn extended_text_query(raw: &mut RawClient, sql: &str) -> Vec<Message> {
    let mut batch = frame(b'P', &[cstr(""), cstr(sql), vec![0, 0]].concat());
    batch.extend(frame(
        b'B',
        &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 1, 0, 0]].concat(),
    ));
    batch.extend(frame(b'D', &[vec![b'P'], cstr("")].concat()));
    batch.extend(frame(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()));
    batch.extend(frame(b'S', &[]));
    raw.send(&batch);
    raw.read_until(b'Z')
}

fn first_value(messages: &[Message]) -> Result<Option<String>, String> {
    if let Some(error) = messages.iter().find(|m| m.tag == b'E') {
        return Err(error.field(b'C').unwrap_or_default());
    }
    let row = messages.iter().find(|m| m.tag == b'D').expect("a DataRow");
    let len = i32::from_be_bytes([row.body[2], row.body[3], row.body[4], row.body[5]]);
    if len < 0 {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8(row.body[6..6 + len as usize].to_vec()).unwrap(),
    ))
}

#[tokio::test]
async fn role_matrix_through_the_extended_protocol_in_text() {
    let proxy = proxy();
    for (login, column, expected) in matrix() {
        let mut raw = RawClient::login(proxy.port, login, "matrix-text");
        let messages = extended_text_query(
            &mut raw,
            &format!("SELECT {column} FROM customers WHERE id = 1"),
        );
        check(
            first_value(&messages),
            &expected,
            &format!("{login} {column} extended text"),
        );
        if expected == Seen::Denied {
            // An error, then ReadyForQuery: no rows and nothing else of the statement.
            assert_eq!(support::tags(&messages), "12EZ", "{messages:?}");
            let error = messages.iter().find(|m| m.tag == b'E').unwrap();
            let text = error.field(b'M').unwrap();
            assert!(
                text.contains("public.customers.id_card") && text.contains("analyst")
                    || text.contains("default"),
                "{text}"
            );
            assert!(!text.contains(ID_CARD));
        }
        let again = extended_text_query(&mut raw, "SELECT 'ok'");
        assert_eq!(first_value(&again), Ok(Some("ok".into())));
    }
}

#[tokio::test]
async fn psql_sees_masks_and_clear_denials() {
    let proxy = proxy();
    let output = proxy.psql(
        "alice",
        [
            "-At",
            "-c",
            "SELECT name, phone, id_card, email FROM customers ORDER BY id",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "张**|138****5678|110105********1234|z***@example.com",
            "欧阳*|139****4321|320102********2345|o***@example.cn",
            "李*||440106********3456|l***@example.com",
        ]
    );
    let output = proxy.psql("guest", ["-At", "-c", "SELECT id, id_card FROM customers"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("permission denied for column public.customers.id_card (role default)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(ID_CARD) && !String::from_utf8_lossy(&output.stdout).contains(ID_CARD)
    );
}

#[tokio::test]
async fn aliases_joins_ctes_and_subqueries_keep_the_mask() {
    let proxy = proxy();
    let client = proxy.connect("alice").await;
    for sql in [
        "SELECT c.phone AS p FROM customers c WHERE c.id = 1",
        "SELECT c.phone FROM customers c JOIN orders o ON o.customer_id = c.id WHERE o.id = 10",
        "WITH x AS (SELECT id, phone FROM customers) SELECT phone FROM x WHERE id = 1",
        "SELECT p FROM (SELECT id, phone AS p FROM customers) s WHERE id = 1",
        "SELECT phone::text FROM customers WHERE id = 1",
    ] {
        assert_eq!(
            simple_value(&client, sql).await,
            Ok(Some("138****5678".into())),
            "{sql}"
        );
        let row = client.query_one(sql, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "138****5678", "{sql}");
    }
    let guest = proxy.connect("guest").await;
    let error = guest
        .query(
            "SELECT o.id, c.id_card FROM orders o JOIN customers c ON c.id = o.customer_id",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
}

#[tokio::test]
async fn views_and_views_on_views_are_protected_like_their_tables() {
    let proxy = proxy();
    let alice = proxy.connect("alice").await;
    let rows = alice
        .query(
            "SELECT full_name, phone, email FROM customer_contacts WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "张**");
    assert_eq!(rows[0].get::<_, String>(1), "138****5678");
    assert_eq!(rows[0].get::<_, String>(2), "z***@example.com");
    let all = alice
        .simple_query("SELECT * FROM beijing_contacts ORDER BY full_name")
        .await
        .unwrap();
    let values: Vec<(String, Option<String>)> = all
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some((
                row.get(0).unwrap().to_string(),
                row.get(1).map(str::to_string),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        values,
        [
            ("张**".to_string(), Some("138****5678".to_string())),
            ("李*".to_string(), None)
        ]
    );
    // A view column computed from a masked column has no mask that is safe: refused.
    let error = alice
        .query("SELECT label FROM customer_labels", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
    assert!(
        message(&error).contains("computed from public.customers.name"),
        "{error:?}"
    );
    // Computed from a redacted column: NULL.
    let analyst = proxy.connect("bi_reader").await;
    assert_eq!(
        simple_value(&analyst, "SELECT shout FROM customer_labels WHERE id = 1").await,
        Ok(None)
    );
    // Billing may see every source in plaintext, so the computed value too.
    let billing = proxy.connect("billing_svc").await;
    assert_eq!(
        simple_value(&billing, "SELECT label FROM customer_labels WHERE id = 1").await,
        Ok(Some("张三丰/北京".into()))
    );
}

#[tokio::test]
async fn cursors_and_sql_prepare_execute_are_shaped() {
    let proxy = proxy();
    let alice = proxy.connect("alice").await;
    alice
        .batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT phone FROM customers ORDER BY id")
        .await
        .unwrap();
    let first = alice.simple_query("FETCH 1 FROM c").await.unwrap();
    assert!(matches!(&first[1], SimpleQueryMessage::Row(row) if row.get(0) == Some("138****5678")));
    let next = alice.query("FETCH 1 FROM c", &[]).await.unwrap();
    assert_eq!(next[0].get::<_, String>(0), "139****4321");
    alice.batch_execute("COMMIT").await.unwrap();

    alice
        .batch_execute("PREPARE by_id(int) AS SELECT id_card FROM customers WHERE id = $1")
        .await
        .unwrap();
    assert_eq!(
        simple_value(&alice, "EXECUTE by_id(1)").await,
        Ok(Some("110105********1234".into()))
    );
    let rows = alice.query("EXECUTE by_id(2)", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "320102********2345");

    let guest = proxy.connect("guest").await;
    guest
        .batch_execute("PREPARE g AS SELECT id_card FROM customers WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(simple_value(&guest, "EXECUTE g").await, Err("42501".into()));
    guest
        .batch_execute("BEGIN; DECLARE d CURSOR FOR SELECT id, id_card FROM customers")
        .await
        .unwrap();
    assert_eq!(
        guest
            .simple_query("FETCH ALL FROM d")
            .await
            .map_err(|e| sqlstate(&e))
            .err(),
        Some("42501".into())
    );
    guest.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn returning_is_shaped_and_denials_say_the_write_happened() {
    let proxy = proxy();
    let alice = proxy.connect("alice").await;
    let row = alice
        .query_one(
            "INSERT INTO customers (id, name, phone) VALUES (100, '王五', '13700001111') RETURNING phone",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "137****1111");
    assert_eq!(
        simple_value(
            &alice,
            "UPDATE customers SET phone = '13700002222' WHERE id = 100 RETURNING phone"
        )
        .await,
        Ok(Some("137****2222".into()))
    );
    let guest = proxy.connect("guest").await;
    let error = guest
        .simple_query("UPDATE customers SET city = city WHERE id = 100 RETURNING id_card")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
    alice
        .batch_execute("DELETE FROM customers WHERE id = 100")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_denied_statement_in_a_pipeline_does_not_stop_the_next_batch() {
    let proxy = proxy();
    let mut raw = RawClient::login(proxy.port, "guest", "pipeline");
    let statement = |sql: &str| {
        let mut batch = frame(b'P', &[cstr(""), cstr(sql), vec![0, 0]].concat());
        batch.extend(frame(
            b'B',
            &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat(),
        ));
        batch.extend(frame(b'D', &[vec![b'P'], cstr("")].concat()));
        batch.extend(frame(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()));
        batch
    };
    let mut bytes = statement("SELECT id_card FROM customers WHERE id = 1");
    bytes.extend(frame(b'S', &[]));
    bytes.extend(statement("SELECT phone FROM customers WHERE id = 1"));
    bytes.extend(frame(b'S', &[]));
    // One Sync for two statements: after the denial the second is skipped, as after
    // any error.
    bytes.extend(statement("SELECT id_card FROM customers WHERE id = 2"));
    bytes.extend(statement("SELECT phone FROM customers WHERE id = 2"));
    bytes.extend(frame(b'S', &[]));
    bytes.extend(statement("SELECT phone FROM customers WHERE id = 2"));
    bytes.extend(frame(b'S', &[]));
    raw.send(&bytes);
    let first = raw.read_until(b'Z');
    assert_eq!(support::tags(&first), "12EZ");
    let second = raw.read_until(b'Z');
    assert_eq!(first_value(&second), Ok(Some("138****5678".into())));
    let third = raw.read_until(b'Z');
    assert_eq!(support::tags(&third), "12EZ");
    let fourth = raw.read_until(b'Z');
    assert_eq!(first_value(&fourth), Ok(Some("139****4321".into())));
    for messages in [first, second, third, fourth] {
        for message in messages {
            let text = String::from_utf8_lossy(&message.body);
            assert!(
                !text.contains("110105") && !text.contains("320102"),
                "{text}"
            );
        }
    }
}

#[tokio::test]
async fn binary_results_of_non_text_columns_cannot_be_masked() {
    let proxy = proxy();
    let alice = proxy.connect("alice").await;
    assert_eq!(
        simple_value(&alice, "SELECT birthday FROM customers WHERE id = 1").await,
        Ok(Some("1990".into()))
    );
    let error = alice
        .query_one("SELECT birthday FROM customers WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "0A000");
    let billing = proxy.connect("billing_svc").await;
    let row = billing
        .query_one("SELECT birthday::text FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "1990-01-01");
}

#[tokio::test]
async fn copy_to_follows_the_read_rules_of_the_role() {
    let proxy = proxy();
    // support may export: the COPY data is masked like a SELECT.
    let output = proxy.psql("alice", ["-c", "COPY customers (id, phone) TO STDOUT"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("1\t138****5678"), "{stdout}");
    assert!(!stdout.contains(PHONE));
    // A column computed from a masked one is refused, as in a SELECT.
    let output = proxy.psql(
        "alice",
        ["-c", "COPY (SELECT upper(phone) FROM customers) TO STDOUT"],
    );
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("42501")
            || String::from_utf8_lossy(&output.stderr).contains("pgveil:"),
        "{output:?}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains(PHONE));
    let output = proxy.psql("billing_svc", ["-c", "COPY customers (phone) TO STDOUT"]);
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains(PHONE));
    // The session goes on after the refusal.
    let output = proxy.psql(
        "alice",
        [
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            "COPY (SELECT upper(phone) FROM customers) TO STDOUT",
            "-c",
            "SELECT 7",
        ],
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains('7'),
        "{output:?}"
    );
}

#[tokio::test]
async fn ddl_through_pgveil_and_around_it_is_seen_before_the_next_read() {
    let proxy = proxy();
    let alice = proxy.connect("alice").await;
    alice
        .batch_execute("CREATE VIEW alice_phones AS SELECT id, phone FROM customers")
        .await
        .unwrap();
    assert_eq!(
        simple_value(&alice, "SELECT phone FROM alice_phones WHERE id = 1").await,
        Ok(Some("138****5678".into()))
    );
    // Created around pgveil: unknown to its catalog until the read forces a refresh.
    cluster().psql_ok("postgres", "CREATE VIEW direct_phones AS SELECT id, phone AS p FROM customers; GRANT SELECT ON direct_phones TO PUBLIC;");
    assert_eq!(
        simple_value(&alice, "SELECT p FROM direct_phones WHERE id = 1").await,
        Ok(Some("138****5678".into()))
    );
    // A relation created in a transaction that is still open cannot be classified.
    alice
        .batch_execute("BEGIN; CREATE TEMP VIEW tmp_phones AS SELECT phone FROM customers")
        .await
        .unwrap();
    let error = alice
        .query("SELECT * FROM tmp_phones", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
    alice.batch_execute("ROLLBACK").await.unwrap();
    // A role that may see everything is not held up by it.
    let billing = proxy.connect("billing_svc").await;
    billing
        .batch_execute("BEGIN; CREATE TEMP TABLE scratch AS SELECT 1 AS x")
        .await
        .unwrap();
    assert_eq!(
        simple_value(&billing, "SELECT x FROM scratch").await,
        Ok(Some("1".into()))
    );
    billing.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn a_policy_edit_applies_from_the_next_statement_and_a_broken_one_is_ignored() {
    let (proxy, path) = proxy_with(POLICY);
    let alice = proxy.connect("alice").await;
    let phone = "SELECT phone FROM customers WHERE id = 1";
    assert_eq!(
        simple_value(&alice, phone).await,
        Ok(Some("138****5678".into()))
    );

    // A broken edit: the running policy stays, and the log says why.
    std::fs::write(&path, POLICY.replace("mask: cn_mobile", "mask: cn_mobil")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.log().contains("policy reload failed")
        })
        .await,
        "{}",
        proxy.log()
    );
    assert!(proxy.log().contains("unknown mask `cn_mobil`"));
    assert_eq!(
        simple_value(&alice, phone).await,
        Ok(Some("138****5678".into()))
    );

    // A good edit: the same session sees the new rule at its next statement.
    std::fs::write(
        &path,
        POLICY.replace(
            "access: { billing: allow } }\n      id_card",
            "access: { billing: allow, support: allow } }\n      id_card",
        ),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            simple_value(&alice, phone).await == Ok(Some(PHONE.into()))
        })
        .await,
        "{}",
        proxy.log()
    );

    // SIGHUP reloads as well.
    std::fs::write(&path, POLICY).unwrap();
    proxy.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || async {
            simple_value(&alice, phone).await == Ok(Some("138****5678".into()))
        })
        .await
    );
}

#[tokio::test]
async fn start_up_fails_when_the_policy_names_a_missing_table() {
    schema();
    let path = write_policy(&format!(
        "{POLICY}  public.no_such_table:\n    columns:\n      x: {{ level: L3 }}\n"
    ));
    let config = path.with_file_name("pgveil.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{}\nupstream: {{ host: 127.0.0.1, port: {} }}\ncatalog: {{ user: pgveil_catalog, database: postgres }}\npolicy: {}\n",
            free_port(),
            cluster().port,
            path.display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("table public.no_such_table does not exist"),
        "{stderr}"
    );

    // `policy check --config` says the same, with the line and column of the table.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["policy", "check"])
        .arg(&path)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:15:3: table public.no_such_table does not exist",
            path.display()
        )),
        "{stderr}"
    );

    std::fs::write(&path, POLICY).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(["policy", "check"])
        .arg(&path)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test]
async fn sessions_are_refused_when_the_catalog_cannot_be_read() {
    schema();
    let path = write_policy(POLICY);
    // No fixed database: catalogs load per client database, at the first session.
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: format!(
            "catalog:\n  user: no_such_login\npolicy: {}\n",
            path.display()
        ),
        ..ProxyOptions::default()
    });
    // The refusal comes right after authentication, before or after the first
    // ReadyForQuery; either way it is the last thing the client hears.
    let mut raw = RawClient::open(proxy.port);
    raw.send(&support::startup_packet(&[
        ("user", "alice"),
        ("database", "postgres"),
    ]));
    let messages = raw.read_to_end();
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .and_then(|m| m.field(b'C'))
        .unwrap_or_default();
    assert_eq!(error, "08006", "{}", proxy.log());
}
