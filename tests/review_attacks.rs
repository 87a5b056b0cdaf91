//! Attacks from a review of the read path, kept as regression tests: each showed a way a
//! restricted role got protected plaintext through pgveil, or disturbed other sessions
//! (one crashed PostgreSQL), against the code it was written for. Each now asserts that
//! the attack fails; its comment says what it showed.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use support::{
    cluster, cstr, frame, policy_yaml, sqlstate, write_policy, Message, Proxy, ProxyOptions,
    RawClient,
};

const ID_CARD: &str = "110105199001011234";
const PHONE: &str = "13812345678";

const SCHEMA: &str = "
CREATE ROLE pgveil_catalog LOGIN;
CREATE ROLE clerk LOGIN;
CREATE ROLE auditor LOGIN;
CREATE TABLE customers (id int PRIMARY KEY, phone text, id_card text UNIQUE);
INSERT INTO customers VALUES (1, '13812345678', '110105199001011234');
CREATE TABLE orders (id int PRIMARY KEY, note text);
INSERT INTO orders VALUES (1, 'an order');
GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO PUBLIC;
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

fn proxy() -> Proxy {
    proxy_with("")
}

fn proxy_with(extra_yaml: &str) -> Proxy {
    SCHEMA_READY.get_or_init(|| {
        cluster().psql_ok("postgres", SCHEMA);
    });
    Proxy::start_with(ProxyOptions {
        extra_yaml: policy_yaml("pgveil_catalog", &write_policy(POLICY)) + extra_yaml,
        ..ProxyOptions::default()
    })
}

/// Messages whose body carries either protected plaintext.
fn plaintext_in(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|message| {
            let text = String::from_utf8_lossy(&message.body);
            (text.contains(ID_CARD) || text.contains(PHONE))
                .then(|| format!("{:?}: {text:?}", char::from(message.tag)))
        })
        .collect()
}

fn assert_no_plaintext(messages: &[Message]) {
    let leaks = plaintext_in(messages);
    assert!(
        leaks.is_empty(),
        "protected plaintext reached the restricted client: {leaks:?}\nall: {}",
        support::tags(messages)
    );
}

fn parse_bind(statement: &str, portal: &str, sql: &str) -> Vec<u8> {
    let mut bytes = frame(b'P', &[cstr(statement), cstr(sql), vec![0, 0]].concat());
    bytes.extend(frame(
        b'B',
        &[cstr(portal), cstr(statement), vec![0, 0, 0, 0, 0, 0]].concat(),
    ));
    bytes
}

fn execute(portal: &str) -> Vec<u8> {
    frame(b'E', &[cstr(portal), vec![0, 0, 0, 0]].concat())
}

/// SHOWED: ReadGuard::simple_queries gets out of step with the server. A Query sent after
/// an extended-protocol error and before its Sync is ignored by the server (and not
/// queued by SessionState), but the guard still pushes its "may modify data" flag; that
/// stale `false` is then used for the *next* Query, an INSERT answered by a rule that
/// returns protected phones in a column without a relation, which passes unchecked.
#[test]
fn a_query_ignored_after_an_error_shifts_the_rule_check_onto_the_wrong_statement() {
    let _serial = SERIAL.blocking_lock();
    SCHEMA_READY.get_or_init(|| {
        cluster().psql_ok("postgres", SCHEMA);
    });
    cluster().psql_ok(
        "postgres",
        "CREATE TABLE rule_target (id int);
         GRANT ALL ON rule_target TO PUBLIC;
         CREATE RULE rule_target_leak AS ON INSERT TO rule_target
             DO INSTEAD SELECT phone FROM public.customers WHERE id = 1",
    );
    let proxy = proxy();
    let mut raw = RawClient::login(proxy.port, "clerk", "rule-shift");
    // Baseline: the INSERT alone is refused.
    raw.send(&frame(b'Q', &cstr("INSERT INTO rule_target VALUES (1)")));
    let baseline = raw.read_until(b'Z');
    assert_no_plaintext(&baseline);
    let refusal = baseline.iter().find(|m| m.tag == b'E').expect("refused");
    assert_eq!(
        refusal.field(b'C').as_deref(),
        Some("42501"),
        "{baseline:?}"
    );
    // A failing Parse, a Query the server skips, Sync, then the INSERT.
    let mut pipeline = frame(b'P', &[cstr(""), cstr("selec"), vec![0, 0]].concat());
    pipeline.extend(frame(b'Q', &cstr("SELECT 1")));
    pipeline.extend(frame(b'S', &[]));
    pipeline.extend(frame(b'Q', &cstr("INSERT INTO rule_target VALUES (1)")));
    raw.send(&pipeline);
    let mut messages = raw.read_until(b'Z');
    messages.extend(raw.read_until(b'Z'));
    cluster().psql_ok("postgres", "DROP TABLE rule_target");
    assert_no_plaintext(&messages);
}

/// SHOWED: error scrubbing replaces the message only for SQLSTATE class 22, but a failed
/// cast to a reg* type quotes the value in the *message* with a class 42/3F SQLSTATE
/// (`relation "13812345678" does not exist`, 42P01). The README promises that errors
/// quoting values ("a failed cast that quotes the value") are scrubbed for restricted
/// roles.
#[tokio::test]
async fn a_failed_regclass_cast_quotes_the_protected_value_in_the_error_message() {
    let _serial = serial().await;
    let proxy = proxy();
    let clerk = proxy.connect("clerk").await;
    let error = clerk
        .simple_query("SELECT id FROM customers WHERE phone::regclass IS NULL")
        .await
        .unwrap_err();
    let db = error.as_db_error().expect("server error");
    let text = format!("{} {:?} {:?}", db.message(), db.detail(), db.hint());
    assert!(
        !text.contains(PHONE),
        "SQLSTATE {} message: {text}",
        sqlstate(&error)
    );
}

/// SHOWED: the Describe pgveil injects before every Execute of a restricted role is sent
/// even when the client's Execute could only fail. For a FETCH portal whose cursor was
/// closed after Bind, PostgreSQL's Describe of the portal looks the cursor up again
/// (FetchStatementTargetList) without checking that it still exists. Without pgveil the
/// Execute just fails ("cursor does not exist"); through pgveil the injected Describe
/// reaches that code.
#[tokio::test]
async fn the_injected_describe_of_a_fetch_portal_whose_cursor_is_gone() {
    let _serial = serial().await;
    let proxy = proxy();
    // Control: the same client traffic straight to PostgreSQL only fails the Execute.
    let direct = closed_cursor_fetch(cluster().port);
    assert_eq!(support::tags(&direct), "EZ", "{direct:?}");
    assert_eq!(
        direct[0].field(b'C').as_deref(),
        Some("34000"),
        "{direct:?}"
    );

    // A bystander: a direct session, not through pgveil, open before the attack.
    let bystander = cluster().direct().await;
    bystander.simple_query("SELECT 1").await.unwrap();
    let messages = closed_cursor_fetch(proxy.port);
    let errors: Vec<_> = messages
        .iter()
        .filter(|m| m.tag == b'E')
        .map(|m| (m.field(b'C'), m.field(b'M')))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bystander_after = bystander.simple_query("SELECT 1").await.map(|_| ());
    let server_log =
        std::fs::read_to_string(cluster().dir.join("postgres.log")).unwrap_or_default();
    let crash: Vec<&str> = server_log
        .lines()
        .filter(|line| {
            line.contains("terminated by signal") || line.contains("terminating any other")
        })
        .collect();
    // Let the cluster finish its crash recovery before other tests go on.
    support::eventually(Duration::from_secs(30), || async {
        tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                cluster().port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .is_ok()
    })
    .await;
    assert!(
        crash.is_empty() && bystander_after.is_ok() && messages.iter().any(|m| m.tag == b'Z'),
        "client saw {} {errors:?}; bystander: {bystander_after:?}; server log: {crash:#?}",
        support::tags(&messages)
    );
}

/// As clerk on `port`: a FETCH portal bound in a transaction, its cursor closed, then
/// Execute and Sync of the portal (no Describe). What answers the Execute.
fn closed_cursor_fetch(port: u16) -> Vec<Message> {
    let mut raw = RawClient::login(port, "clerk", "fetch-closed-cursor");
    raw.send(&frame(
        b'Q',
        &cstr("BEGIN; DECLARE c CURSOR FOR SELECT note FROM orders"),
    ));
    raw.read_until(b'Z');
    let mut pipeline = parse_bind("fetchc", "f", "FETCH ALL FROM c");
    pipeline.extend(frame(b'S', &[]));
    raw.send(&pipeline);
    raw.read_until(b'Z');
    raw.send(&frame(b'Q', &cstr("CLOSE c")));
    raw.read_until(b'Z');
    let mut pipeline = execute("f");
    pipeline.extend(frame(b'S', &[]));
    raw.send(&pipeline);
    read_until_z_or_close(&mut raw)
}

/// Tests of this file run one at a time: one of them crashes the shared cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Messages up to ReadyForQuery, or up to the end of the stream.
fn read_until_z_or_close(raw: &mut RawClient) -> Vec<Message> {
    let mut messages = Vec::new();
    while let Some(message) = raw.read_message() {
        let done = message.tag == b'Z';
        messages.push(message);
        if done {
            break;
        }
    }
    messages
}

/// SHOWED: any login (no privilege needed: NOTIFY is open to every role) can make pgveil
/// refuse every result from every relation to every restricted session of the
/// database. Each notification on `pgveil_ddl` counts as a schema change, so a stream
/// of them keeps every catalog read stale; after three refreshes the statement goes on
/// with `catalog_out_of_date` and restricted roles are refused even unprotected tables
/// (here `orders.note`). The listener does not check who notified or coalesce bursts.
#[tokio::test]
async fn notifications_on_pgveil_ddl_from_anyone_deny_restricted_reads_of_any_table() {
    let _serial = serial().await;
    let proxy = proxy();
    let clerk = proxy.connect("clerk").await;
    let read = "SELECT note FROM orders WHERE id = 1";
    assert_eq!(
        clerk
            .query_one(read, &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "an order"
    );
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            proxy.log().contains("pgveil_ddl_notify event trigger")
        })
        .await,
        "listener never started:\n{}",
        proxy.log()
    );
    // The spammer connects straight to PostgreSQL, not even through pgveil.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut spammers = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        let (spammer, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=clerk dbname=postgres",
                cluster().port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        spammers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = spammer.batch_execute("NOTIFY pgveil_ddl").await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = Vec::new();
    for _ in 0..20 {
        match clerk.query_one(read, &[]).await {
            Ok(row) => assert_eq!(row.get::<_, String>(0), "an order"),
            Err(error) => refused.push(format!(
                "{}: {}",
                sqlstate(&error),
                error
                    .as_db_error()
                    .map(|e| e.message().to_string())
                    .unwrap_or_default()
            )),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for spammer in spammers {
        let _ = spammer.await;
    }
    assert!(
        refused.is_empty(),
        "{} of 20 reads of an unprotected table refused, e.g. {:?}",
        refused.len(),
        refused.first()
    );
}
