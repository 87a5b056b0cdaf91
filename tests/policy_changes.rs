//! The read path when what a statement reads changes under it: prepared statements
//! re-planned after a search_path change or a view swap, cursors and prepared
//! statements replaced between Bind and Execute, and server errors whose details carry
//! values. Every case runs against a real PostgreSQL through pgveil.

mod support;

use std::path::PathBuf;
use std::sync::OnceLock;

use std::time::Duration;

use support::{
    cluster, cstr, eventually, frame, policy_yaml, sqlstate, write_policy, Message, Proxy,
    ProxyOptions, RawClient,
};

const ID_CARD: &str = "110105199001011234";
const PHONE: &str = "13812345678";

const SCHEMA: &str = "
CREATE ROLE pgveil_catalog LOGIN;
CREATE ROLE pgveil_catalog_flaky LOGIN;
CREATE ROLE clerk LOGIN;
CREATE ROLE auditor LOGIN;
CREATE ROLE view_owners;
CREATE ROLE repl_clerk LOGIN REPLICATION;
CREATE TABLE copy_target (id int);
GRANT view_owners TO clerk, auditor;
CREATE TABLE customers (id int PRIMARY KEY, phone text, id_card text UNIQUE);
INSERT INTO customers VALUES (1, '13812345678', '110105199001011234');
CREATE SCHEMA decoy;
CREATE TABLE decoy.customers (id int PRIMARY KEY, phone text, id_card text);
INSERT INTO decoy.customers VALUES (1, 'harmless', 'harmless');
CREATE TABLE orders (id int PRIMARY KEY, note text);
INSERT INTO orders VALUES (1, 'an order');
GRANT ALL ON ALL TABLES IN SCHEMA public, decoy TO PUBLIC;
CREATE FUNCTION wait_for_test_lock() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    -- A notice makes the server send what it holds (the portal's description) first.
    RAISE NOTICE 'waiting for the test';
    PERFORM pg_advisory_lock_shared(4242);
    PERFORM pg_advisory_unlock_shared(4242);
    RETURN true;
END $$;
GRANT USAGE, CREATE ON SCHEMA public, decoy TO PUBLIC;
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
    proxy_with_policy_file("").0
}

/// pgveil with [`POLICY`] in a fresh file and `extra_yaml` in its config, and the
/// policy file.
fn proxy_with_policy_file(extra_yaml: &str) -> (Proxy, PathBuf) {
    proxy_as("pgveil_catalog", extra_yaml)
}

fn proxy_as(catalog_user: &str, extra_yaml: &str) -> (Proxy, PathBuf) {
    SCHEMA_READY.get_or_init(|| {
        cluster().psql_ok("postgres", SCHEMA);
    });
    let path = write_policy(POLICY);
    let proxy = Proxy::start_with(ProxyOptions {
        extra_yaml: policy_yaml(catalog_user, &path) + extra_yaml,
        ..ProxyOptions::default()
    });
    (proxy, path)
}

/// No message carries either protected plaintext.
fn assert_no_plaintext(messages: &[Message]) {
    for message in messages {
        let text = String::from_utf8_lossy(&message.body);
        assert!(
            !text.contains(ID_CARD) && !text.contains(PHONE),
            "plaintext in {:?}: {text}",
            char::from(message.tag)
        );
    }
}

#[tokio::test]
async fn a_statement_replanned_after_search_path_changes_is_checked_again() {
    let proxy = proxy();
    let clerk = proxy.connect("clerk").await;
    clerk
        .batch_execute("SET search_path = decoy")
        .await
        .unwrap();
    let statement = clerk
        .prepare("SELECT id_card FROM customers WHERE id = 1")
        .await
        .unwrap();
    let rows = clerk.query(&statement, &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "harmless");

    // The same prepared statement now reads public.customers: the server re-plans it,
    // and its rows must be treated as public.customers rows.
    clerk
        .batch_execute("SET search_path = public")
        .await
        .unwrap();
    let error = clerk.query(&statement, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&error), "42501", "{error:?}");

    let phone = clerk
        .prepare("SELECT phone FROM customers WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        clerk
            .query_one(&phone, &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "138****5678"
    );
    clerk
        .batch_execute("SET search_path = decoy")
        .await
        .unwrap();
    assert_eq!(
        clerk
            .query_one(&phone, &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "harmless"
    );
}

#[tokio::test]
async fn a_view_swapped_under_a_prepared_statement_is_checked_again() {
    let proxy = proxy();
    let clerk = proxy.connect("clerk").await;
    clerk
        .batch_execute("CREATE VIEW swap_contacts AS SELECT id, phone FROM decoy.customers")
        .await
        .unwrap();
    let statement = clerk
        .prepare("SELECT phone FROM swap_contacts WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        clerk
            .query_one(&statement, &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "harmless"
    );
    clerk
        .batch_execute(
            "ALTER VIEW swap_contacts RENAME TO swap_old;
             CREATE VIEW swap_contacts AS SELECT id, phone FROM public.customers",
        )
        .await
        .unwrap();
    let row = clerk.query_one(&statement, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "138****5678");
    clerk
        .batch_execute("DROP VIEW swap_contacts; DROP VIEW swap_old")
        .await
        .unwrap();
}

/// Parse and Bind of `sql` into portal `portal` (text results), unnamed statement.
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

#[tokio::test]
async fn a_cursor_replaced_between_bind_and_execute_of_its_fetch_is_refused() {
    let proxy = proxy();
    let mut raw = RawClient::login(proxy.port, "clerk", "fetch-swap");
    raw.send(&frame(
        b'Q',
        &cstr("BEGIN; DECLARE c CURSOR FOR SELECT note FROM orders"),
    ));
    raw.read_until(b'Z');

    // The FETCH portal is bound (and described) while c reads one column of orders; c
    // is replaced by a cursor over the ID cards before the FETCH runs. The server's
    // description of the FETCH portal still has one column (orders.note): the ID card
    // would be a column pgveil was never told about.
    let mut pipeline = parse_bind("fetch", "f", "FETCH ALL FROM c");
    pipeline.extend(frame(b'D', &[vec![b'P'], cstr("f")].concat()));
    pipeline.extend(parse_bind("", "", "CLOSE c"));
    pipeline.extend(execute(""));
    pipeline.extend(parse_bind(
        "",
        "",
        "DECLARE c CURSOR FOR SELECT o.note, c.id_card FROM orders o, customers c",
    ));
    pipeline.extend(execute(""));
    pipeline.extend(execute("f"));
    pipeline.extend(frame(b'S', &[]));
    raw.send(&pipeline);
    let messages = raw.read_until(b'Z');
    assert_no_plaintext(&messages);
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no error: {messages:?}"));
    assert_eq!(error.field(b'C').as_deref(), Some("42501"));
    assert!(
        error.field(b'M').unwrap_or_default().contains("FETCH"),
        "{} {:?}",
        support::tags(&messages),
        error.field(b'M')
    );

    // Bound and run back to back, the same FETCH is planned from the new cursor: masked.
    raw.send(&frame(
        b'Q',
        &cstr("CLOSE c; DECLARE c CURSOR FOR SELECT phone FROM customers"),
    ));
    raw.read_until(b'Z');
    let mut pipeline = parse_bind("", "g", "FETCH ALL FROM c");
    pipeline.extend(execute("g"));
    pipeline.extend(frame(b'S', &[]));
    raw.send(&pipeline);
    let messages = raw.read_until(b'Z');
    assert_no_plaintext(&messages);
    assert_eq!(support::tags(&messages), "12DCZ", "{messages:?}");
    let row = &messages[2].body;
    assert!(
        String::from_utf8_lossy(row).contains("138****5678"),
        "{row:?}"
    );
}

#[tokio::test]
async fn a_sql_prepared_statement_replaced_before_its_execute_runs_is_refused() {
    let proxy = proxy();
    let mut raw = RawClient::login(proxy.port, "clerk", "execute-swap");
    raw.send(&frame(b'Q', &cstr("PREPARE q AS SELECT note FROM orders")));
    raw.read_until(b'Z');
    let mut pipeline = parse_bind("", "x", "EXECUTE q");
    pipeline.extend(frame(b'D', &[vec![b'P'], cstr("x")].concat()));
    pipeline.extend(parse_bind("", "", "DEALLOCATE q"));
    pipeline.extend(execute(""));
    pipeline.extend(parse_bind(
        "",
        "",
        "PREPARE q AS SELECT o.note, c.id_card FROM orders o, customers c",
    ));
    pipeline.extend(execute(""));
    pipeline.extend(execute("x"));
    pipeline.extend(frame(b'S', &[]));
    raw.send(&pipeline);
    let messages = raw.read_until(b'Z');
    assert_no_plaintext(&messages);
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no error: {messages:?}"));
    assert_eq!(error.field(b'C').as_deref(), Some("42501"));

    // The auditor may see everything: the same pipeline is not refused.
    let mut raw = RawClient::login(proxy.port, "auditor", "execute-swap");
    raw.send(&frame(b'Q', &cstr("PREPARE q AS SELECT note FROM orders")));
    raw.read_until(b'Z');
    raw.send(&pipeline);
    let messages = raw.read_until(b'Z');
    assert_eq!(support::tags(&messages), "12T12C12CDCZ", "{messages:?}");
}

#[tokio::test]
async fn the_first_execute_after_a_policy_reload_follows_the_new_policy() {
    let (proxy, path) = proxy_with_policy_file("");
    let auditor = proxy.connect("auditor").await;
    let statement = auditor
        .prepare("SELECT phone FROM customers WHERE id = 1")
        .await
        .unwrap();
    let row = auditor.query_one(&statement, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), PHONE);

    // The auditor loses its plaintext access. Another session shows when the new
    // policy is in force; the auditor's session has sent nothing since.
    std::fs::write(
        &path,
        POLICY.replace(
            "auditor: { members: [auditor] }",
            "auditor: { members: [nobody] }",
        ),
    )
    .unwrap();
    let watcher = proxy.connect("auditor").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            watcher
                .query_one("SELECT phone FROM customers WHERE id = 1", &[])
                .await
                .is_ok_and(|row| row.get::<_, String>(0) == "138****5678")
        })
        .await,
        "{}",
        proxy.log()
    );
    let row = auditor.query_one(&statement, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "138****5678");
}

#[tokio::test]
async fn a_result_that_held_nothing_protected_is_checked_again_after_a_policy_reload() {
    // pgveil remembers the columns of the last result of a session that held nothing
    // protected, and passes the same columns again without planning them: that must
    // end when the policy protects one of them.
    let (proxy, path) = proxy_with_policy_file("");
    let clerk = proxy.connect("clerk").await;
    let read = "SELECT id, note FROM orders WHERE id = 1";
    let statement = clerk.prepare(read).await.unwrap();
    for _ in 0..3 {
        let row = clerk.query_one(&statement, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(1), "an order");
        let messages = clerk.simple_query(read).await.unwrap();
        let note = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(1).map(str::to_string),
            _ => None,
        });
        assert_eq!(note.as_deref(), Some("an order"));
    }

    protect_orders_note(&proxy, &path).await;
    let error = clerk.query_one(&statement, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&error), "42501", "{error:?}");
    let error = clerk.simple_query(read).await.unwrap_err();
    assert_eq!(sqlstate(&error), "42501", "{error:?}");
    assert!(!format!("{error:?}").contains("an order"));
}

#[tokio::test]
async fn a_policy_reload_between_a_portals_description_and_its_rows_applies_to_the_rows() {
    // The rows of a portal whose description shows only columns pgveil remembers as
    // unprotected stream unseen; if the policy changes after the description came but
    // before the rows do, the rows must be planned again.
    let (proxy, path) = proxy_with_policy_file("");
    let mut clerk = RawClient::login(proxy.port, "clerk", "reload-in-between");
    let read = "SELECT id, note FROM orders WHERE id = 1 AND wait_for_test_lock()";
    let mut pipeline = parse_bind("", "p", read);
    pipeline.extend(frame(b'D', &[vec![b'P'], cstr("p")].concat()));
    pipeline.extend(execute("p"));
    pipeline.extend(frame(b'S', &[]));

    // Once with nothing in the way: orders.note is not protected yet, and is remembered so.
    clerk.send(&pipeline);
    let messages = clerk.read_until(b'Z');
    assert_eq!(support::tags(&messages), "12TNDCZ", "{messages:?}");
    assert!(String::from_utf8_lossy(&messages[4].body).contains("an order"));

    // Again, with the statement held after its description was sent.
    let holder = cluster().direct().await;
    holder
        .execute("SELECT pg_advisory_lock(4242)", &[])
        .await
        .unwrap();
    clerk.send(&pipeline);
    let described = clerk.read_until(b'N');
    assert_eq!(support::tags(&described), "12TN", "{described:?}");

    protect_orders_note(&proxy, &path).await;
    holder
        .execute("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap();
    let messages = clerk.read_until(b'Z');
    assert!(
        messages
            .iter()
            .all(|m| !String::from_utf8_lossy(&m.body).contains("an order")),
        "{messages:?}"
    );
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no error: {messages:?}"));
    assert_eq!(error.field(b'C').as_deref(), Some("42501"), "{messages:?}");
}

#[tokio::test]
async fn server_errors_and_notices_do_not_quote_values_to_restricted_roles() {
    let proxy = proxy();
    let duplicate = format!("INSERT INTO customers VALUES (2, NULL, '{ID_CARD}')");
    let clerk = proxy.connect("clerk").await;
    let error = clerk.simple_query(&duplicate).await.unwrap_err();
    let report = error.as_db_error().expect("a server error");
    assert_eq!(report.code().code(), "23505");
    assert!(report.message().contains("duplicate key"), "{report:?}");
    assert_eq!(report.detail(), None, "{report:?}");

    // A cast that fails quotes the value in the message itself.
    let error = clerk
        .simple_query("SELECT id_card::int FROM customers")
        .await
        .unwrap_err();
    let report = error.as_db_error().expect("a server error");
    // 22003: value "110105199001011234" is out of range for type integer, unless pgveil
    // refuses the computed column first (42501), which it does since the leak guards.
    assert!(
        report.code().code().starts_with("22") || report.code().code() == "42501",
        "{report:?}"
    );
    assert!(!format!("{report:?}").contains("110105"), "{report:?}");

    // A DO block that names a protected table is refused to a restricted role…
    let mut raw = RawClient::login(proxy.port, "clerk", "notices");
    raw.send(&frame(
        b'Q',
        &cstr(
            "DO $$ BEGIN RAISE NOTICE 'looked' USING DETAIL = \
             (SELECT id_card FROM customers WHERE id = 1); END $$",
        ),
    ));
    let messages = raw.read_until(b'Z');
    let refusal = messages.iter().find(|m| m.tag == b'E').expect("a refusal");
    assert_eq!(
        refusal.field(b'C').as_deref(),
        Some("42501"),
        "{messages:?}"
    );
    assert_no_plaintext(&messages);
    // …but one that builds the name at run time still runs: its notices are scrubbed
    // the same way, and the session goes on.
    raw.send(&frame(
        b'Q',
        &cstr(
            "DO $$ DECLARE v text; BEGIN \
             EXECUTE 'SELECT id_card FROM cust' || 'omers WHERE id = 1' INTO v; \
             RAISE NOTICE 'looked' USING DETAIL = v; END $$",
        ),
    ));
    let messages = raw.read_until(b'Z');
    assert!(messages.iter().any(|m| m.tag == b'N'), "{messages:?}");
    assert_no_plaintext(&messages);

    // The auditor may see every value: the server's report is passed whole.
    let auditor = proxy.connect("auditor").await;
    let error = auditor.simple_query(&duplicate).await.unwrap_err();
    let report = error.as_db_error().expect("a server error");
    assert!(
        report
            .detail()
            .is_some_and(|detail| detail.contains(ID_CARD)),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_row_too_large_to_inspect_ends_only_its_session() {
    let (proxy, _) = proxy_with_policy_file("limits:\n  max_inspected_message_bytes: 1048576\n");
    let big_row = "SELECT phone, repeat('x', 2000000) FROM customers WHERE id = 1";
    let clerk = proxy.connect("clerk").await;
    let error = clerk.simple_query(big_row).await.unwrap_err();
    let report = error.as_db_error().expect("pgveil's error");
    assert_eq!(report.code().code(), "54000", "{report:?}");
    assert!(
        report.message().contains("max_inspected_message_bytes"),
        "{report:?}"
    );
    assert!(clerk.is_closed() || clerk.simple_query("SELECT 1").await.is_err());

    // Rows that pass unchanged are never held whole, and other sessions go on.
    let auditor = proxy.connect("auditor").await;
    let rows = auditor.simple_query(big_row).await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some(PHONE))
    );
    let clerk = proxy.connect("clerk").await;
    let rows = clerk
        .simple_query("SELECT phone FROM customers WHERE id = 1")
        .await
        .unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("138****5678"))
    );
}

/// Rewrites the policy file so that it also protects `orders.note` (L4, which the clerk
/// may not read), and waits until a new clerk session is refused it.
async fn protect_orders_note(proxy: &Proxy, path: &std::path::Path) {
    std::fs::write(
        path,
        format!("{POLICY}\n  public.orders:\n    columns:\n      note: {{ level: L4 }}\n"),
    )
    .unwrap();
    let watcher = proxy.connect("clerk").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            value(&watcher, "SELECT note FROM orders WHERE id = 1").await == Err("42501".into())
        })
        .await,
        "{}",
        proxy.log()
    );
}

/// The one value of a one-row simple query, or the SQLSTATE of its error.
async fn value(client: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    let messages = client.simple_query(sql).await.map_err(|e| sqlstate(&e))?;
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .ok_or_else(|| format!("no row from {sql}"))
}

#[tokio::test]
async fn a_view_redefined_in_the_open_transaction_is_refused_until_commit() {
    let proxy = proxy();
    let clerk = proxy.connect("clerk").await;
    clerk
        .batch_execute("CREATE VIEW tx_view AS SELECT id, phone FROM decoy.customers")
        .await
        .unwrap();
    let read = "SELECT phone FROM tx_view WHERE id = 1";
    assert_eq!(value(&clerk, read).await, Ok("harmless".into()));

    clerk.batch_execute("BEGIN").await.unwrap();
    clerk
        .batch_execute("CREATE OR REPLACE VIEW tx_view AS SELECT id, phone FROM public.customers")
        .await
        .unwrap();
    assert_eq!(value(&clerk, read).await, Err("42501".into()));
    clerk.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&clerk, read).await, Ok("138****5678".into()));

    // The same within one multi-statement query.
    let swap_back =
        format!("CREATE OR REPLACE VIEW tx_view AS SELECT id, phone FROM decoy.customers; {read}");
    assert_eq!(value(&clerk, &swap_back).await, Err("42501".into()));
    assert_eq!(value(&clerk, read).await, Ok("harmless".into()));
    clerk.batch_execute("DROP VIEW tx_view").await.unwrap();
}

#[tokio::test]
async fn ddl_committed_by_another_session_or_a_do_block_is_seen_at_the_next_statement() {
    let proxy = proxy();
    let clerk = proxy.connect("clerk").await;
    let auditor = proxy.connect("auditor").await;
    auditor
        .batch_execute(
            "CREATE VIEW shared_view AS SELECT id, phone FROM decoy.customers;
             ALTER VIEW shared_view OWNER TO view_owners",
        )
        .await
        .unwrap();
    let read = "SELECT phone FROM shared_view WHERE id = 1";
    assert_eq!(value(&clerk, read).await, Ok("harmless".into()));

    // Another session through pgveil swaps the view's definition (same OID).
    auditor
        .batch_execute(
            "CREATE OR REPLACE VIEW shared_view AS SELECT id, phone FROM public.customers",
        )
        .await
        .unwrap();
    assert_eq!(value(&clerk, read).await, Ok("138****5678".into()));

    // DDL inside a DO block has no DDL command tag.
    auditor
        .batch_execute(
            "CREATE OR REPLACE VIEW shared_view AS SELECT id, phone FROM decoy.customers",
        )
        .await
        .unwrap();
    assert_eq!(value(&clerk, read).await, Ok("harmless".into()));
    clerk
        .batch_execute(
            // The view's text is put together at run time: a DO block whose text
            // names a protected table is refused to a restricted role.
            "DO $$ BEGIN EXECUTE 'CREATE OR REPLACE VIEW shared_view AS \
             SELECT id, phone FROM public.' || 'cust' || 'omers'; END $$",
        )
        .await
        .unwrap();
    assert_eq!(value(&clerk, read).await, Ok("138****5678".into()));
    auditor
        .batch_execute("DROP VIEW shared_view")
        .await
        .unwrap();
}

#[tokio::test]
async fn restricted_roles_are_refused_while_the_catalog_cannot_be_read_again() {
    let (proxy, _) = proxy_as("pgveil_catalog_flaky", "");
    let clerk = proxy.connect("clerk").await;
    let auditor = proxy.connect("auditor").await;
    let read = "SELECT phone FROM orders, customers WHERE customers.id = 1";
    assert_eq!(value(&clerk, read).await, Ok("138****5678".into()));

    // The catalog login stops working, then the schema changes.
    cluster().psql_ok("postgres", "ALTER ROLE pgveil_catalog_flaky NOLOGIN");
    auditor
        .batch_execute("CREATE TABLE flaky_marker (id int); DROP TABLE flaky_marker")
        .await
        .unwrap();
    let refused = value(&clerk, read).await;
    let orders_only = value(&clerk, "SELECT note FROM orders").await;
    let unrestricted = value(&auditor, read).await;
    let constant = value(&clerk, "SELECT 'constant'").await;
    cluster().psql_ok("postgres", "ALTER ROLE pgveil_catalog_flaky LOGIN");
    assert_eq!(refused, Err("42501".into()));
    assert_eq!(orders_only, Err("42501".into()));
    assert_eq!(unrestricted, Ok(PHONE.into()));
    assert_eq!(constant, Ok("constant".into()));

    // Once the catalog can be read, so can the rows.
    assert!(
        eventually(Duration::from_secs(10), || async {
            value(&clerk, read).await == Ok("138****5678".into())
        })
        .await,
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn ddl_made_around_pgveil_is_seen_once_the_event_trigger_notifies() {
    let trigger_sql = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/pgveil-ddl-notify.sql"),
    )
    .expect("sql/pgveil-ddl-notify.sql");
    cluster().psql_ok("postgres", &trigger_sql);
    let proxy = proxy();
    cluster().psql_ok(
        "postgres",
        "CREATE VIEW around_view AS SELECT id, phone FROM decoy.customers;
         GRANT SELECT ON around_view TO PUBLIC",
    );
    let clerk = proxy.connect("clerk").await;
    let read = "SELECT phone FROM around_view WHERE id = 1";
    assert_eq!(value(&clerk, read).await, Ok("harmless".into()));
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy
                .log()
                .contains("listening for schema changes from the pgveil_ddl_notify event trigger")
        })
        .await,
        "{}",
        proxy.log()
    );
    let notified_before = proxy.log().matches("schema change notified").count();

    // A direct connection, not through pgveil, swaps the view's definition.
    cluster().psql_ok(
        "postgres",
        "CREATE OR REPLACE VIEW around_view AS SELECT id, phone FROM public.customers",
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.log().matches("schema change notified").count() > notified_before
        })
        .await,
        "{}",
        proxy.log()
    );
    assert_eq!(value(&clerk, read).await, Ok("138****5678".into()));
    cluster().psql_ok("postgres", "DROP VIEW around_view");
}

#[tokio::test]
async fn a_copy_from_stdin_after_a_refused_statement_in_the_same_query_still_runs() {
    let proxy = proxy();
    let mut raw = RawClient::login(proxy.port, "clerk", "copy-after-denial");
    raw.send(&frame(
        b'Q',
        &cstr("SELECT id_card FROM customers WHERE id = 1; COPY copy_target FROM STDIN"),
    ));
    let first = raw.read_until(b'G');
    assert_no_plaintext(&first);
    let error = first.iter().find(|m| m.tag == b'E').expect("the refusal");
    assert_eq!(error.field(b'C').as_deref(), Some("42501"));
    let mut data = frame(b'd', b"41\n");
    data.extend(frame(b'c', &[]));
    raw.send(&data);
    let rest = raw.read_until(b'Z');
    assert_eq!(support::tags(&rest), "CZ", "{rest:?}");
    let direct = cluster().direct().await;
    let row = direct
        .query_one("SELECT count(*) FROM copy_target WHERE id = 41", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
}

#[tokio::test]
async fn replication_streams_are_refused_to_restricted_roles() {
    let proxy = proxy();
    let mut raw = RawClient::open(proxy.port);
    raw.send(&support::startup_packet(&[
        ("user", "repl_clerk"),
        ("database", "postgres"),
        ("replication", "database"),
    ]));
    raw.read_until(b'Z');
    raw.send(&frame(b'Q', &cstr("IDENTIFY_SYSTEM")));
    let identify = raw.read_until(b'Z');
    let row = identify
        .iter()
        .find(|m| m.tag == b'D')
        .expect("IDENTIFY_SYSTEM row");
    // Columns: systemid, timeline, xlogpos, dbname; xlogpos is the third.
    let mut fields = Vec::new();
    let mut at = 2;
    for _ in 0..3 {
        let len = i32::from_be_bytes(row.body[at..at + 4].try_into().unwrap()) as usize;
        fields.push(String::from_utf8(row.body[at + 4..at + 4 + len].to_vec()).unwrap());
        at += 4 + len;
    }
    raw.send(&frame(
        b'Q',
        &cstr(&format!("START_REPLICATION PHYSICAL {}", fields[2])),
    ));
    let messages = raw.read_to_end();
    assert!(!messages.iter().any(|m| m.tag == b'W'), "{messages:?}");
    let error = messages.iter().find(|m| m.tag == b'E').expect("a refusal");
    assert_eq!(error.field(b'C').as_deref(), Some("42501"), "{error:?}");
    assert_eq!(error.field(b'S').as_deref(), Some("FATAL"));
}

#[tokio::test]
async fn rows_returned_by_a_rule_are_checked_against_what_the_rule_reads() {
    let proxy = proxy();
    let clerk = proxy.connect("clerk").await;
    clerk
        .batch_execute(
            "CREATE TABLE rule_target (id int);
             GRANT ALL ON rule_target TO PUBLIC;",
        )
        .await
        .unwrap();
    // pgveil cannot analyse CREATE RULE, so a restricted role may not name a protected
    // table in one…
    let create_rule = "CREATE RULE rule_target_leak AS ON INSERT TO rule_target \
                       DO INSTEAD SELECT phone FROM public.customers WHERE id = 1";
    assert_eq!(value(&clerk, create_rule).await, Err("42501".into()));
    // …but server-side code can still make one, and its rows are checked.
    clerk
        .batch_execute(
            "DO $$ BEGIN EXECUTE 'CREATE RULE rule_target_leak AS ON INSERT TO rule_target \
             DO INSTEAD SELECT phone FROM public.' || 'cust' || 'omers WHERE id = 1'; END $$",
        )
        .await
        .unwrap();
    let insert = "INSERT INTO rule_target VALUES (1)";
    assert_eq!(value(&clerk, insert).await, Err("42501".into()));
    // Through the extended protocol the portal is described as returning no rows, and
    // the server sends none.
    let rows = clerk.query(insert, &[]).await.unwrap();
    assert!(rows.is_empty());
    // Statements that modify nothing are not affected.
    assert_eq!(
        value(&clerk, "SELECT 'constant'").await,
        Ok("constant".into())
    );

    let auditor = proxy.connect("auditor").await;
    assert_eq!(value(&auditor, insert).await, Ok(PHONE.into()));
    clerk.batch_execute("DROP TABLE rule_target").await.unwrap();
}

#[tokio::test]
async fn a_revoked_membership_applies_to_open_sessions_at_their_next_statement() {
    let proxy = proxy();
    cluster().psql_ok(
        "postgres",
        "CREATE ROLE late_auditor LOGIN; GRANT auditor TO late_auditor",
    );
    let late = proxy.connect("late_auditor").await;
    let read = "SELECT phone FROM customers WHERE id = 1";
    assert_eq!(value(&late, read).await, Ok(PHONE.into()));

    let admin = proxy.connect("postgres").await;
    admin
        .batch_execute("REVOKE auditor FROM late_auditor")
        .await
        .unwrap();
    assert_eq!(value(&late, read).await, Ok("138****5678".into()));
    let statement = late
        .prepare("SELECT phone FROM customers WHERE id = 1")
        .await
        .unwrap();
    let row = late.query_one(&statement, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "138****5678");
    assert!(
        proxy.log().contains("role memberships changed"),
        "{}",
        proxy.log()
    );
}
