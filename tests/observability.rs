//! The admin endpoint of a real `pgveil run`: `/healthz`, `/readyz` (ready, and not ready
//! when the upstream server is gone), `/metrics` with the counters of SPEC.md moving
//! as denials, connections, reloads and upstream failures happen.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use support::{
    cluster, eventually, free_port, fresh_target_dir, policy_yaml, sqlstate, write_policy, Proxy,
    ProxyOptions,
};

const PHONE: &str = "13812345678";

const SCHEMA: &str = "
CREATE ROLE pgveil_catalog LOGIN;
CREATE ROLE clerk LOGIN;
CREATE ROLE auditor LOGIN;
CREATE TABLE customers (id int PRIMARY KEY, phone text, id_card text);
INSERT INTO customers VALUES (1, '13812345678', '110105199001011234');
CREATE VIEW customer_digits AS SELECT id, phone || '' AS phone_text FROM customers;
GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;
";

const POLICY: &str = "
version: 1
roles:
  auditor: { members: [auditor] }
tables:
  public.customers:
    columns:
      phone:   { level: L3, mask: cn_mobile, access: { auditor: allow } }
      id_card: { level: L4, mask: cn_id_card, access: { auditor: allow } }
";

static SCHEMA_READY: OnceLock<()> = OnceLock::new();

/// pgveil with the policy and an admin endpoint; the proxy, its admin port and the
/// policy file.
fn proxy_with_admin(options: ProxyOptions, policy: bool) -> (Proxy, u16, PathBuf) {
    SCHEMA_READY.get_or_init(|| {
        cluster().psql_ok("postgres", SCHEMA);
    });
    let path = write_policy(POLICY);
    let admin = free_port();
    let mut extra_yaml = format!("admin: 127.0.0.1:{admin}\n");
    if policy {
        extra_yaml.push_str(&policy_yaml("pgveil_catalog", &path));
    }
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml,
        ..options
    });
    (proxy, admin, path)
}

/// One raw HTTP exchange: the status code and the body.
fn http(port: u16, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect admin");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(port: u16, path: &str) -> (u16, String) {
    http(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: pgveil\r\n\r\n"),
    )
}

/// The value of the sample `series` (name and labels exactly as exposed), or 0.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn health_and_readiness_answer_and_bad_requests_get_clear_statuses() {
    let (_proxy, admin, _) = proxy_with_admin(ProxyOptions::default(), true);
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz"), (200, "ready\n".into()));
    assert_eq!(get(admin, "/nothing").0, 404);
    assert_eq!(
        http(admin, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0,
        405
    );
    assert_eq!(http(admin, "\u{1}\u{2} nonsense\r\n\r\n").0, 400);
    // A client that sends half a request and goes away harms nothing.
    drop(TcpStream::connect(("127.0.0.1", admin)).map(|mut s| s.write_all(b"GET /met")));
    assert_eq!(get(admin, "/healthz").0, 200);
}

#[tokio::test]
async fn readiness_fails_with_a_reason_when_the_upstream_server_is_unreachable() {
    let (proxy, admin, _) = proxy_with_admin(
        ProxyOptions {
            upstream_port: Some(free_port()),
            ..ProxyOptions::default()
        },
        false,
    );
    let (status, body) = get(admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(get(admin, "/healthz").0, 200);

    // A client that cannot be served counts as an upstream error.
    let failed = proxy.try_connect("clerk", None).await;
    assert!(failed.is_err());
    let metrics = get(admin, "/metrics").1;
    assert_eq!(
        sample(&metrics, "pgveil_upstream_errors_total"),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn denials_are_counted_by_role_reason_and_table() {
    let (proxy, admin, _) = proxy_with_admin(ProxyOptions::default(), true);
    let clerk = proxy.connect("clerk").await;
    // L4 defaults to deny: column_denied.
    for _ in 0..2 {
        let error = clerk
            .simple_query("SELECT id_card FROM customers")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&error), "42501");
    }
    // A view column computed from a masked column: derived_expression.
    let error = clerk
        .query("SELECT phone_text FROM customer_digits", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
    // A copy into a server file: export_denied.
    let error = clerk
        .simple_query("COPY (SELECT phone FROM customers) TO '/tmp/pgveil-never-written'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
    // A condition on a masked L3 column: filter_on_protected.
    let error = clerk
        .simple_query("SELECT id FROM customers WHERE phone LIKE '138%'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
    // A masked read is no denial.
    let rows = clerk
        .query_one("SELECT phone FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, String>(0), "138****5678");

    let (status, metrics) = get(admin, "/metrics");
    assert_eq!(status, 200);
    let denied = |reason: &str, table: &str| {
        sample(
            &metrics,
            &format!(
                "pgveil_denied_queries_total{{reason=\"{reason}\",role=\"default\",table=\"{table}\"}}"
            ),
        )
    };
    assert_eq!(
        denied("column_denied", "public.customers"),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        denied("derived_expression", "public.customers"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        denied("export_denied", "public.customers"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        denied("filter_on_protected", "public.customers"),
        1.0,
        "{metrics}"
    );
    assert!(!metrics.contains(PHONE) && !metrics.contains("110105"));
    // CI lints this exposition with `promtool check metrics` (see .ci/run).
    let exposition = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pgveil-metrics.prom");
    std::fs::write(&exposition, &metrics).expect("write the exposition for promtool");
}

#[tokio::test]
async fn connections_queries_and_policy_reloads_are_counted() {
    let (proxy, admin, path) = proxy_with_admin(ProxyOptions::default(), true);
    let first = proxy.connect("clerk").await;
    let second = proxy.connect("clerk").await;
    first.simple_query("SELECT 1").await.unwrap();
    second.simple_query("SELECT 1").await.unwrap();
    first
        .execute("UPDATE customers SET id = id WHERE id = 0", &[])
        .await
        .unwrap();
    let metrics = get(admin, "/metrics").1;
    assert_eq!(
        sample(&metrics, "pgveil_client_connections"),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "pgveil_connections_total"),
        2.0,
        "{metrics}"
    );
    let queries = |kind: &str| {
        sample(
            &metrics,
            &format!("pgveil_queries_total{{kind=\"{kind}\",role=\"default\"}}"),
        )
    };
    assert_eq!(queries("select"), 2.0, "{metrics}");
    assert_eq!(queries("update"), 1.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "pgveil_query_duration_seconds_count{kind=\"select\"}"
        ),
        2.0,
        "{metrics}"
    );
    drop(first);
    drop(second);
    assert!(
        eventually(Duration::from_secs(10), || async {
            sample(&get(admin, "/metrics").1, "pgveil_client_connections") == 0.0
        })
        .await
    );

    std::fs::write(&path, POLICY.replace("cn_mobile", "cn_mobil")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            sample(
                &get(admin, "/metrics").1,
                "pgveil_policy_reloads_total{result=\"error\"}",
            ) == 1.0
        })
        .await,
        "{}",
        proxy.log()
    );
    std::fs::write(&path, POLICY.replace("L3", "L2")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            sample(
                &get(admin, "/metrics").1,
                "pgveil_policy_reloads_total{result=\"ok\"}",
            ) == 1.0
        })
        .await,
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn protected_values_served_are_counted_by_role_table_column_and_action() {
    let (proxy, admin, _) = proxy_with_admin(ProxyOptions::default(), true);
    let auditor = proxy.connect("auditor").await;
    auditor
        .simple_query("SELECT phone, id_card FROM customers")
        .await
        .unwrap();
    let row = auditor
        .query_one("SELECT phone FROM customers WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), PHONE);
    let clerk = proxy.connect("clerk").await;
    for _ in 0..3 {
        let row = clerk
            .query_one("SELECT phone, id FROM customers WHERE id = 1", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "138****5678");
    }
    // No protected column: nothing counted.
    clerk
        .simple_query("SELECT id FROM customers")
        .await
        .unwrap();

    let metrics = get(admin, "/metrics").1;
    let served = |role: &str, column: &str, action: &str| {
        sample(
            &metrics,
            &format!(
                "pgveil_protected_values_total{{action=\"{action}\",column=\"{column}\",role=\"{role}\",table=\"public.customers\"}}"
            ),
        )
    };
    assert_eq!(served("auditor", "phone", "allow"), 2.0, "{metrics}");
    assert_eq!(served("auditor", "id_card", "allow"), 1.0, "{metrics}");
    assert_eq!(served("default", "phone", "mask"), 3.0, "{metrics}");
    assert_eq!(served("default", "id_card", "mask"), 0.0, "{metrics}");
}

#[test]
fn audit_verify_counts_an_intact_chain_and_names_the_first_broken_record() {
    use pgveil::observe::audit::{encode, AuditColumn, AuditRecord, GENESIS_HASH};
    let dir = fresh_target_dir("audit");
    let mut prev = GENESIS_HASH.to_string();
    let mut lines = Vec::new();
    for seq in 1..=3u64 {
        let record = AuditRecord {
            ts: "2026-11-22T10:00:00.000Z".into(),
            session: format!("s{seq}"),
            client: "127.0.0.1:50000".into(),
            user: "alice".into(),
            role: "support".into(),
            database: "crm".into(),
            application_name: "psql".into(),
            kind: "select".into(),
            statement: "SELECT phone FROM customers WHERE id = ?".into(),
            columns: vec![AuditColumn {
                table: "public.customers".into(),
                column: "phone".into(),
                action: "mask".into(),
            }],
            rows: 1,
            outcome: "ok".into(),
            reason: None,
        };
        let (line, hash) = encode(seq, &record, &prev).unwrap();
        prev = hash;
        lines.push(line);
    }
    let verify = |lines: &[String]| {
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .args(["audit", "verify"])
            .arg(&path)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = verify(&lines);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("3 records, hash chain intact"), "{stdout}");

    let mut edited = lines.clone();
    edited[1] = edited[1].replace("\"rows\":1", "\"rows\":2");
    let (code, _, stderr) = verify(&edited);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("line 2") && stderr.contains("edited"),
        "{stderr}"
    );

    let mut removed = lines.clone();
    removed.remove(0);
    let (code, _, stderr) = verify(&removed);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("line 1"), "{stderr}");

    let mut swapped = lines;
    swapped.swap(1, 2);
    let (code, _, stderr) = verify(&swapped);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("line 2"), "{stderr}");
}
