//! The audit log of a real `pgveil run`: a role matrix leaves exactly the expected
//! records, none with a value in it, and a chain `pgveil audit verify` accepts; an
//! unwritable log refuses protected statements and lets plain ones run; `continue`
//! serves and counts; SIGHUP reopens the file and the chain goes on in the new one.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use support::{
    cluster, eventually, free_port, fresh_target_dir, policy_yaml, sqlstate, write_policy, Proxy,
    ProxyOptions,
};

const PHONE: &str = "13812345678";
const ID_CARD: &str = "110105199001011234";
const NAME: &str = "Zhang Wei";

const SCHEMA: &str = "
CREATE ROLE audit_catalog LOGIN;
CREATE ROLE audit_auditor LOGIN;
CREATE ROLE audit_support LOGIN;
CREATE ROLE audit_clerk LOGIN;
CREATE TABLE audit_customers (id int PRIMARY KEY, name text, phone text, id_card text);
INSERT INTO audit_customers VALUES (1, 'Zhang Wei', '13812345678', '110105199001011234'),
                                   (2, 'Li Na', '13998765432', '310101198502023456');
CREATE TABLE audit_notes (id int, body text);
INSERT INTO audit_notes VALUES (1, 'plain');
GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;
";

const POLICY: &str = "
version: 1
roles:
  auditor: { members: [audit_auditor] }
  support: { members: [audit_support] }
tables:
  public.audit_customers:
    columns:
      phone:   { level: L3, mask: cn_mobile, access: { auditor: allow } }
      id_card: { level: L4, mask: cn_id_card, access: { auditor: allow, support: mask } }
";

static SCHEMA_READY: OnceLock<()> = OnceLock::new();

/// pgveil with the policy, an admin endpoint and `audit` settings; the proxy and its
/// admin port.
fn audited_proxy(audit_yaml: &str, policy: bool) -> (Proxy, u16) {
    SCHEMA_READY.get_or_init(|| {
        cluster().psql_ok("postgres", SCHEMA);
    });
    let admin = free_port();
    let mut extra_yaml = format!("admin: 127.0.0.1:{admin}\n{audit_yaml}");
    if policy {
        extra_yaml.push_str(&policy_yaml("audit_catalog", &write_policy(POLICY)));
    }
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml,
        ..ProxyOptions::default()
    });
    (proxy, admin)
}

fn audit_yaml(path: &Path, extra: &str) -> String {
    format!("audit:\n  path: {}\n{extra}", path.display())
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .collect()
}

/// Waits until the file holds `count` records, then returns them.
async fn wait_for_records(path: &Path, count: usize) -> Vec<Value> {
    eventually(Duration::from_secs(10), || async {
        records(path).len() >= count
    })
    .await;
    records(path)
}

fn verify(args: &[&Path], partial: bool) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgveil"));
    command.args(["audit", "verify"]);
    if partial {
        command.arg("--partial");
    }
    let output = command
        .args(args)
        .output()
        .expect("run pgveil audit verify");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn metrics(admin: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin)).expect("admin");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: pgveil\r\n\r\n")
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

fn readyz(admin: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin)).expect("admin");
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: pgveil\r\n\r\n")
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

fn audit_dir() -> PathBuf {
    fresh_target_dir("audit-log")
}

fn columns(record: &Value) -> Vec<(String, String, String)> {
    record["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| {
            (
                c["table"].as_str().unwrap_or_default().to_string(),
                c["column"].as_str().unwrap_or_default().to_string(),
                c["action"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn column(name: &str, action: &str) -> (String, String, String) {
    (
        "public.audit_customers".to_string(),
        name.to_string(),
        action.to_string(),
    )
}

#[tokio::test]
async fn a_role_matrix_leaves_exactly_the_expected_records_and_no_value() {
    let dir = audit_dir();
    let path = dir.join("audit.jsonl");
    let (proxy, _admin) = audited_proxy(&audit_yaml(&path, ""), true);

    for login in ["audit_auditor", "audit_support", "audit_clerk"] {
        let client = proxy.connect(login).await;
        // Simple protocol, a literal in the filter.
        client
            .simple_query("SELECT id, phone FROM audit_customers WHERE id = 1")
            .await
            .expect("phone");
        // Extended protocol, a parameter.
        let id_card = client
            .query(
                "SELECT id_card FROM audit_customers WHERE id = $1",
                &[&1i32],
            )
            .await;
        assert_eq!(
            id_card.is_ok(),
            login != "audit_clerk",
            "{login}: {id_card:?}"
        );
        // Touches nothing protected: no record.
        client
            .simple_query("SELECT body FROM audit_notes")
            .await
            .expect("plain");
        // Writes a protected table: recorded, though no protected column comes back.
        client
            .simple_query("UPDATE audit_customers SET name = 'Zhang Wei' WHERE id = 1")
            .await
            .expect("update");
    }

    let found = wait_for_records(&path, 9).await;
    assert_eq!(found.len(), 9, "{found:#?}");
    let by = |user: &str, kind: &str, statement_start: &str| -> &Value {
        found
            .iter()
            .find(|r| {
                r["user"] == user
                    && r["kind"] == kind
                    && r["statement"]
                        .as_str()
                        .unwrap_or_default()
                        .starts_with(statement_start)
            })
            .unwrap_or_else(|| panic!("no {kind} record of {user}: {found:#?}"))
    };
    for (user, role, phone_action, id_card) in [
        ("audit_auditor", "auditor", "allow", Some("allow")),
        ("audit_support", "support", "mask", Some("mask")),
        ("audit_clerk", "default", "mask", None),
    ] {
        let phone = by(user, "select", "SELECT id, phone");
        assert_eq!(phone["role"], role);
        assert_eq!(
            phone["statement"],
            "SELECT id, phone FROM audit_customers WHERE id = ?"
        );
        assert_eq!(columns(phone), [column("phone", phone_action)]);
        assert_eq!(phone["rows"], 1);
        assert_eq!(phone["outcome"], "ok");
        assert!(phone.get("reason").is_none());
        assert_eq!(phone["database"], "postgres");
        assert_eq!(phone["application_name"], "pgveil-tests");
        assert!(phone["client"].as_str().unwrap().starts_with("127.0.0.1:"));

        let card = by(user, "select", "SELECT id_card");
        assert_eq!(
            card["statement"],
            "SELECT id_card FROM audit_customers WHERE id = $1"
        );
        match id_card {
            Some(action) => {
                assert_eq!(columns(card), [column("id_card", action)]);
                assert_eq!(card["outcome"], "ok");
                assert_eq!(card["rows"], 1);
            }
            None => {
                assert_eq!(columns(card), [column("id_card", "deny")]);
                assert_eq!(card["outcome"], "denied");
                assert_eq!(card["reason"], "column_denied");
                assert_eq!(card["rows"], 0);
            }
        }
        assert_eq!(phone["session"], card["session"]);

        let update = by(user, "update", "UPDATE");
        assert_eq!(
            update["statement"],
            "UPDATE audit_customers SET name = ? WHERE id = ?"
        );
        assert_eq!(update["rows"], 1);
        assert_eq!(columns(update), []);
    }
    assert!(
        !found.iter().any(|r| r["statement"]
            .as_str()
            .unwrap_or_default()
            .contains("audit_notes")),
        "a plain statement was recorded"
    );
    let sessions: std::collections::HashSet<&str> = found
        .iter()
        .map(|r| r["session"].as_str().unwrap())
        .collect();
    assert_eq!(sessions.len(), 3);

    let text = std::fs::read_to_string(&path).unwrap();
    for value in [PHONE, ID_CARD, NAME, "138****5678"] {
        assert!(!text.contains(value), "{value} in the audit log:\n{text}");
    }
    // Four-digit pieces of the values turn up by chance in a hash, a time stamp or a
    // client port (1 run in 60 or so): those fields, which never hold values, are left
    // out of this search.
    let lines: Vec<&str> = text.lines().filter(|line| !line.is_empty()).collect();
    assert_eq!(lines.len(), found.len(), "{text}");
    for line in lines {
        let mut record: Value = serde_json::from_str(line).unwrap();
        let fields = record.as_object_mut().unwrap();
        for random in ["hash", "prev_hash", "ts", "client", "session"] {
            assert!(fields.remove(random).is_some(), "no {random} in {line}");
        }
        let rest = record.to_string();
        for piece in ["5678", "1234"] {
            assert!(!rest.contains(piece), "{piece} in an audit record: {line}");
        }
    }
    assert!(!proxy.log().contains(PHONE) && !proxy.log().contains(ID_CARD));

    let (code, output) = verify(&[&path], false);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("9 records, hash chain intact"), "{output}");

    // Tampering with the real log is found.
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let tampered = dir.join("tampered.jsonl");
    let mut edited = lines.clone();
    edited[3] = edited[3].replace("\"outcome\":\"denied\"", "\"outcome\":\"ok\"");
    edited[3] = edited[3].replace("\"action\":\"mask\"", "\"action\":\"allow\"");
    assert_ne!(edited[3], lines[3]);
    std::fs::write(&tampered, edited.join("\n") + "\n").unwrap();
    let (code, output) = verify(&[&tampered], false);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("line 4"), "{output}");
    let mut removed = lines.clone();
    removed.remove(5);
    std::fs::write(&tampered, removed.join("\n") + "\n").unwrap();
    let (code, output) = verify(&[&tampered], false);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("line 6"), "{output}");
}

#[tokio::test]
async fn statements_of_a_query_are_recorded_one_by_one_and_all_statements_records_plain_ones() {
    let dir = audit_dir();
    let path = dir.join("audit.jsonl");
    let (proxy, _admin) = audited_proxy(&audit_yaml(&path, "  all_statements: true\n"), true);
    let client = proxy.connect("audit_support").await;
    client
        .batch_execute("SET application_name = 'billing-batch'")
        .await
        .unwrap();
    client
        .simple_query(
            "SELECT body FROM audit_notes WHERE body <> 'x'; SELECT phone FROM audit_customers ORDER BY id; SELECT 42",
        )
        .await
        .unwrap();
    let found = wait_for_records(&path, 4).await;
    assert_eq!(found.len(), 4, "{found:#?}");
    assert_eq!(found[0]["kind"], "other");
    assert_eq!(found[0]["statement"], "SET application_name = ?");
    let statements: Vec<&str> = found[1..]
        .iter()
        .map(|r| r["statement"].as_str().unwrap())
        .collect();
    assert_eq!(
        statements,
        [
            "SELECT body FROM audit_notes WHERE body <> ?",
            "SELECT phone FROM audit_customers ORDER BY id",
            "SELECT ?"
        ]
    );
    assert_eq!(columns(&found[1]), []);
    assert_eq!(columns(&found[2]), [column("phone", "mask")]);
    assert_eq!(found[2]["rows"], 2);
    assert_eq!(found[3]["application_name"], "billing-batch");
    let (code, output) = verify(&[&path], false);
    assert_eq!(code, Some(0), "{output}");
}

#[tokio::test]
async fn without_a_policy_all_statements_are_recorded_with_role_none() {
    let dir = audit_dir();
    let path = dir.join("audit.jsonl");
    let (proxy, _admin) = audited_proxy(&audit_yaml(&path, "  all_statements: true\n"), false);
    let client = proxy.connect("audit_clerk").await;
    client
        .query("SELECT body FROM audit_notes WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    let error = client
        .simple_query("SELECT 1 / 0")
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&error), "22012");
    let found = wait_for_records(&path, 2).await;
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[0]["role"], "none");
    assert_eq!(found[0]["rows"], 1);
    assert_eq!(found[0]["outcome"], "ok");
    assert_eq!(found[1]["outcome"], "error");
    assert_eq!(found[1]["statement"], "SELECT ? / ?");
}

#[tokio::test]
async fn an_unwritable_audit_log_refuses_protected_statements_and_lets_plain_ones_run() {
    let dir = audit_dir();
    let missing = dir.join("not-created-yet");
    let path = missing.join("audit.jsonl");
    let (proxy, admin) = audited_proxy(&audit_yaml(&path, ""), true);
    let ready = readyz(admin);
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("audit log"), "{ready}");

    for login in ["audit_auditor", "audit_clerk"] {
        let client = proxy.connect(login).await;
        // Reads of protected columns, in both protocols.
        let error = client
            .simple_query("SELECT phone FROM audit_customers")
            .await
            .expect_err("refused");
        assert_eq!(sqlstate(&error), "58030", "{login}: {error:?}");
        let error = client
            .query(
                "SELECT id, phone FROM audit_customers WHERE id = $1",
                &[&1i32],
            )
            .await
            .expect_err("refused");
        assert_eq!(sqlstate(&error), "58030", "{login}: {error:?}");
        assert!(
            error.to_string().contains("audit log") || format!("{error:?}").contains("audit log"),
            "{error:?}"
        );
        // Writes to a protected table: refused before the server runs them.
        let error = client
            .simple_query("UPDATE audit_customers SET name = 'Changed' WHERE id = 2")
            .await
            .expect_err("refused");
        assert_eq!(sqlstate(&error), "58030", "{login}: {error:?}");
        let error = client
            .execute(
                "UPDATE audit_customers SET name = $1 WHERE id = 2",
                &[&"Changed"],
            )
            .await
            .expect_err("refused");
        assert_eq!(sqlstate(&error), "58030", "{login}: {error:?}");
        // Inside a transaction the refusal aborts it, as an error would.
        client.batch_execute("BEGIN").await.unwrap();
        assert!(client
            .simple_query("DELETE FROM audit_customers WHERE id = 2")
            .await
            .is_err());
        let error = client.simple_query("SELECT 1").await.expect_err("aborted");
        assert_eq!(sqlstate(&error), "25P02");
        client.batch_execute("ROLLBACK").await.unwrap();
        // Ways around a check by table name: refused all the same.
        for sneaky in [
            "DO $$BEGIN UPDATE audit_customers SET name = 'Changed' WHERE id = 2; END$$",
            "UPDATE U&\"audit\\005fcustomers\" SET name = 'Changed' WHERE id = 2",
            "SELECT 1; COPY audit_notes FROM STDIN",
            "PREPARE sneaky AS SELECT 1",
        ] {
            let error = client.simple_query(sneaky).await.expect_err(sneaky);
            assert_eq!(sqlstate(&error), "58030", "{login}: {sneaky}: {error:?}");
        }
        // Even reading an unprotected column of a protected table: its record could not
        // be written either.
        let error = client
            .query_one("SELECT id FROM audit_customers WHERE id = 1", &[])
            .await
            .expect_err("names a protected table");
        assert_eq!(sqlstate(&error), "58030", "{login}: {error:?}");
        // Plain statements run, and the session goes on.
        let rows = client
            .query("SELECT body FROM audit_notes WHERE id = $1", &[&1i32])
            .await
            .expect("plain statement");
        assert_eq!(rows[0].get::<_, String>(0), "plain");
        client
            .batch_execute("BEGIN; SET LOCAL work_mem = '8MB'; COMMIT")
            .await
            .expect("session control");
    }
    let direct = cluster().direct().await;
    let name: String = direct
        .query_one("SELECT name FROM audit_customers WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "Li Na", "a refused write reached the database");
    let text = metrics(admin);
    assert!(
        text.contains("reason=\"audit_unavailable\",role=\"auditor\""),
        "{text}"
    );
    assert!(
        !text.contains("pgveil_audit_write_errors_total 0\n"),
        "{text}"
    );

    // Once the directory exists the log recovers: protected statements run again and
    // the records of the refusals were kept.
    std::fs::create_dir_all(&missing).unwrap();
    let client = proxy.connect("audit_auditor").await;
    let recovered = eventually(Duration::from_secs(10), || async {
        client
            .simple_query("SELECT phone FROM audit_customers WHERE id = 1")
            .await
            .is_ok()
    })
    .await;
    assert!(recovered, "{}", proxy.log());
    assert!(readyz(admin).starts_with("HTTP/1.1 200"));
    eventually(Duration::from_secs(10), || async {
        records(&path).last().is_some_and(|r| r["outcome"] == "ok")
    })
    .await;
    let found = records(&path);
    // Each login: every refusal above, none of the plain statements.
    let clerk: Vec<(&str, &str)> = found
        .iter()
        .filter(|r| r["user"] == "audit_clerk")
        .map(|r| {
            (
                r["statement"].as_str().unwrap(),
                r["reason"]
                    .as_str()
                    .unwrap_or(r["outcome"].as_str().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        clerk,
        [
            ("SELECT phone FROM audit_customers", "audit_unavailable"),
            (
                "SELECT id, phone FROM audit_customers WHERE id = $1",
                "audit_unavailable"
            ),
            (
                "UPDATE audit_customers SET name = ? WHERE id = ?",
                "audit_unavailable"
            ),
            (
                "UPDATE audit_customers SET name = $1 WHERE id = ?",
                "audit_unavailable"
            ),
            (
                "DELETE FROM audit_customers WHERE id = ?",
                "audit_unavailable"
            ),
            ("DO ?", "audit_unavailable"),
            // A backslash: cut off from the first quote on.
            (
                "UPDATE U&\"audit\\005fcustomers\" SET name = ?",
                "audit_unavailable"
            ),
            ("SELECT ?; COPY audit_notes FROM STDIN", "audit_unavailable"),
            ("PREPARE sneaky AS SELECT ?", "audit_unavailable"),
            (
                "SELECT id FROM audit_customers WHERE id = ?",
                "audit_unavailable"
            ),
        ]
    );
    assert_eq!(found.last().unwrap()["outcome"], "ok", "{found:#?}");
    let (code, output) = verify(&[&path], false);
    assert_eq!(code, Some(0), "{output}");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_full_disk_refuses_protected_reads_and_continue_serves_them_with_a_counter() {
    let (proxy, admin) = audited_proxy(&audit_yaml(Path::new("/dev/full"), ""), true);
    let client = proxy.connect("audit_support").await;
    // The first record fails to write; from then on protected reads are refused.
    let refused = eventually(Duration::from_secs(10), || async {
        match client
            .simple_query("SELECT phone FROM audit_customers")
            .await
        {
            Err(error) => sqlstate(&error) == "58030",
            Ok(_) => false,
        }
    })
    .await;
    assert!(refused, "{}", proxy.log());
    assert!(client
        .simple_query("SELECT body FROM audit_notes")
        .await
        .is_ok());
    drop(proxy);

    let (proxy, admin_continue) = audited_proxy(
        &audit_yaml(Path::new("/dev/full"), "  on_failure: continue\n"),
        true,
    );
    let client = proxy.connect("audit_support").await;
    for _ in 0..3 {
        let rows = client
            .query("SELECT phone FROM audit_customers WHERE id = $1", &[&1i32])
            .await
            .expect("served despite the audit log");
        assert_eq!(rows[0].get::<_, String>(0), "138****5678");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = metrics(admin_continue);
    let errors = text
        .lines()
        .find_map(|line| line.strip_prefix("pgveil_audit_write_errors_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "{text}");
    assert!(readyz(admin_continue).starts_with("HTTP/1.1 503"));
    let _ = admin;
}

#[tokio::test]
async fn sighup_reopens_the_log_and_the_chain_continues_in_the_new_file() {
    let dir = audit_dir();
    let path = dir.join("audit.jsonl");
    let rotated = dir.join("audit.jsonl.1");
    let (proxy, _admin) = audited_proxy(&audit_yaml(&path, ""), true);
    let client = proxy.connect("audit_auditor").await;
    for _ in 0..2 {
        client
            .simple_query("SELECT phone FROM audit_customers WHERE id = 1")
            .await
            .unwrap();
    }
    assert_eq!(wait_for_records(&path, 2).await.len(), 2);
    std::fs::rename(&path, &rotated).unwrap();
    proxy.signal(libc::SIGHUP);
    let reopened = eventually(Duration::from_secs(10), || async {
        proxy.log().contains("reopening the audit log")
    })
    .await;
    assert!(reopened, "{}", proxy.log());
    client
        .simple_query("SELECT id_card FROM audit_customers WHERE id = 1")
        .await
        .unwrap();
    let new = wait_for_records(&path, 1).await;
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["seq"], 3);
    assert_eq!(records(&rotated).len(), 2);

    let (code, output) = verify(&[&rotated, &path], false);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("3 records"), "{output}");
    let (code, output) = verify(&[&path], false);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("--partial"), "{output}");
    let (code, output) = verify(&[&path], true);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("starts at seq 3"), "{output}");

    // A restart continues the chain from the file's last record.
    drop(client);
    drop(proxy);
    let (proxy, _admin) = audited_proxy(&audit_yaml(&path, ""), true);
    let client = proxy.connect("audit_auditor").await;
    client
        .simple_query("SELECT phone FROM audit_customers WHERE id = 2")
        .await
        .unwrap();
    let after = wait_for_records(&path, 2).await;
    assert_eq!(after[1]["seq"], 4);
    let (code, output) = verify(&[&rotated, &path], false);
    assert_eq!(code, Some(0), "{output}");
}
