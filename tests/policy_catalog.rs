//! What the catalog snapshot must cover beyond plain tables and views, against a real
//! PostgreSQL through pgveil: partitions, sub-partitions and inheritance children of
//! protected tables (columns matched by name, not attribute number), views over them,
//! a view whose stored definition cannot be analysed, sequences, and rules whose actions
//! return protected values.

mod support;

use std::sync::OnceLock;

use pgveil::catalog::snapshot::CatalogSnapshot;
use pgveil::policy::Policy;
use support::{cluster, policy_yaml, sqlstate, write_policy, Proxy, ProxyOptions};
use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

const PHONE: &str = "13812345678";
const ID_CARD: &str = "110105199001011234";
const MASKED_PHONE: &str = "138****5678";
const MASKED_ID_CARD: &str = "110105********1234";

/// Children are created with their columns in another order than their parent's, and
/// with a dropped column, so that their attribute numbers differ from the parent's.
const SCHEMA: &str = "
CREATE ROLE pgveil_catalog LOGIN;
CREATE ROLE pc_clerk LOGIN;
CREATE ROLE pc_auditor LOGIN;

CREATE TABLE pc_customers (id int, region text, phone text, id_card text)
    PARTITION BY LIST (region);
CREATE TABLE pc_customers_north (note text, id_card text, phone text, region text, id int);
ALTER TABLE pc_customers_north DROP COLUMN note;
ALTER TABLE pc_customers ATTACH PARTITION pc_customers_north FOR VALUES IN ('north');
CREATE TABLE pc_customers_south PARTITION OF pc_customers FOR VALUES IN ('south')
    PARTITION BY RANGE (id);
CREATE TABLE pc_customers_south_low (dropped int, id_card text, id int, region text, phone text);
ALTER TABLE pc_customers_south_low DROP COLUMN dropped;
ALTER TABLE pc_customers_south ATTACH PARTITION pc_customers_south_low FOR VALUES FROM (0) TO (1000);
CREATE TABLE pc_customers_vip PARTITION OF pc_customers FOR VALUES IN ('vip');
INSERT INTO pc_customers VALUES
    (1, 'north', '13812345678', '110105199001011234'),
    (2, 'south', '13812345678', '110105199001011234'),
    (3, 'vip', '13812345678', '110105199001011234');

CREATE TABLE pc_people (id int, phone text, id_card text);
CREATE TABLE pc_staff (badge text, id_card text, phone text, id int);
ALTER TABLE pc_staff INHERIT pc_people;
CREATE TABLE pc_staff_temp (until date) INHERITS (pc_staff);
INSERT INTO pc_staff VALUES ('b1', '110105199001011234', '13812345678', 1);
INSERT INTO pc_staff_temp VALUES ('b2', '110105199001011234', '13812345678', 2, '2030-01-01');

CREATE VIEW pc_north_contacts AS SELECT id, phone, id_card FROM pc_customers_north;
CREATE VIEW pc_staff_rows AS SELECT s AS whole FROM pc_staff s;

CREATE SEQUENCE pc_seq;
CREATE TABLE pc_rule_target (id int);

GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO PUBLIC;
";

/// pc_clerk has the default role: phone masked, id_card denied, except on the `vip`
/// partition, whose own entry masks id_card.
const POLICY: &str = "
version: 1
roles:
  auditor: { members: [pc_auditor] }
tables:
  public.pc_customers:
    columns:
      phone:   { level: L3, mask: cn_mobile, access: { auditor: allow } }
      id_card: { level: L4, mask: cn_id_card, access: { auditor: allow } }
  public.pc_people:
    columns:
      phone:   { level: L3, mask: cn_mobile, access: { auditor: allow } }
      id_card: { level: L4, mask: cn_id_card, access: { auditor: allow } }
  public.pc_customers_vip:
    columns:
      id_card: { level: L3, mask: cn_id_card, access: { auditor: allow } }
";

static SCHEMA_READY: OnceLock<()> = OnceLock::new();

fn schema() {
    SCHEMA_READY.get_or_init(|| {
        cluster().psql_ok("postgres", SCHEMA);
    });
}

fn proxy() -> Proxy {
    schema();
    Proxy::start_with(ProxyOptions {
        extra_yaml: policy_yaml("pgveil_catalog", &write_policy(POLICY)),
        ..ProxyOptions::default()
    })
}

/// The single value of a one-row, one-column result through the simple protocol, or
/// the SQLSTATE of the error.
async fn simple(client: &tokio_postgres::Client, sql: &str) -> Result<Option<String>, String> {
    let messages = client.simple_query(sql).await.map_err(|e| sqlstate(&e))?;
    let rows: Vec<Option<String>> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 1, "{sql}: expected one row, got {rows:?}");
    Ok(rows.into_iter().next().flatten())
}

/// The same through the extended protocol (Parse/Describe/Bind/Execute, text format).
async fn extended(client: &tokio_postgres::Client, sql: &str) -> Result<Option<String>, String> {
    let rows = client.query(sql, &[]).await.map_err(|e| sqlstate(&e))?;
    assert_eq!(rows.len(), 1, "{sql}: expected one row");
    let row = &rows[0];
    Ok(match *row.columns()[0].type_() {
        Type::INT4 => row.get::<_, Option<i32>>(0).map(|n| n.to_string()),
        Type::INT8 => row.get::<_, Option<i64>>(0).map(|n| n.to_string()),
        _ => row.get::<_, Option<String>>(0),
    })
}

/// `sql` gives `expected` (a value, or `Err(SQLSTATE)`) through both protocols.
async fn both(
    client: &tokio_postgres::Client,
    sql: &str,
    expected: Result<&str, &str>,
    proxy: &Proxy,
) {
    let expected = expected
        .map(|value| Some(value.to_string()))
        .map_err(str::to_string);
    assert_eq!(
        simple(client, sql).await,
        expected,
        "simple: {sql}\n{}",
        proxy.log()
    );
    assert_eq!(
        extended(client, sql).await,
        expected,
        "extended: {sql}\n{}",
        proxy.log()
    );
}

/// Phone masked and ID card refused for pc_clerk, plaintext for pc_auditor, when read
/// from `relation` where `id = id`.
async fn protected_like_the_parent(proxy: &Proxy, relation: &str, id: i32) {
    let clerk = proxy.connect("pc_clerk").await;
    let auditor = proxy.connect("pc_auditor").await;
    let phone = format!("SELECT phone FROM {relation} WHERE id = {id}");
    let id_card = format!("SELECT id_card FROM {relation} WHERE id = {id}");
    let other = format!("SELECT id FROM {relation} WHERE id = {id}");
    both(&clerk, &phone, Ok(MASKED_PHONE), proxy).await;
    both(&clerk, &id_card, Err("42501"), proxy).await;
    both(&clerk, &other, Ok(&id.to_string()), proxy).await;
    both(&auditor, &phone, Ok(PHONE), proxy).await;
    both(&auditor, &id_card, Ok(ID_CARD), proxy).await;
}

#[tokio::test]
async fn a_partition_is_protected_like_its_parent() {
    let proxy = proxy();
    protected_like_the_parent(&proxy, "pc_customers_north", 1).await;
    // The parent itself keeps its protection, for rows of every partition.
    protected_like_the_parent(&proxy, "pc_customers", 1).await;
    protected_like_the_parent(&proxy, "pc_customers", 2).await;
}

#[tokio::test]
async fn a_sub_partition_is_protected_like_its_root() {
    let proxy = proxy();
    protected_like_the_parent(&proxy, "pc_customers_south", 2).await;
    protected_like_the_parent(&proxy, "pc_customers_south_low", 2).await;
}

#[tokio::test]
async fn an_inheritance_child_is_protected_like_its_parent() {
    let proxy = proxy();
    protected_like_the_parent(&proxy, "pc_staff", 1).await;
    protected_like_the_parent(&proxy, "pc_staff_temp", 2).await;
    protected_like_the_parent(&proxy, "pc_people", 2).await;
    protected_like_the_parent(&proxy, "ONLY pc_staff", 1).await;
}

#[tokio::test]
async fn a_partition_listed_in_the_policy_follows_its_own_entry() {
    let proxy = proxy();
    let clerk = proxy.connect("pc_clerk").await;
    both(
        &clerk,
        "SELECT id_card FROM pc_customers_vip",
        Ok(MASKED_ID_CARD),
        &proxy,
    )
    .await;
    // Columns its entry does not list keep the parent's rule.
    both(
        &clerk,
        "SELECT phone FROM pc_customers_vip",
        Ok(MASKED_PHONE),
        &proxy,
    )
    .await;
    // Read through the parent, the parent's rule applies.
    both(
        &clerk,
        "SELECT id_card FROM pc_customers WHERE id = 3",
        Err("42501"),
        &proxy,
    )
    .await;
}

#[tokio::test]
async fn views_over_partitions_and_children_are_protected() {
    let proxy = proxy();
    protected_like_the_parent(&proxy, "pc_north_contacts", 1).await;
    // A whole row of an inheritance child carries its ID card.
    let clerk = proxy.connect("pc_clerk").await;
    both(
        &clerk,
        "SELECT whole FROM pc_staff_rows LIMIT 1",
        Err("42501"),
        &proxy,
    )
    .await;
}

#[tokio::test]
async fn a_restricted_role_reads_a_sequence() {
    let proxy = proxy();
    let clerk = proxy.connect("pc_clerk").await;
    // The schema-change listener counts one change when it connects; let the catalog
    // read that follows it happen first.
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            proxy.log().contains("pgveil_ddl_notify")
        })
        .await,
        "{}",
        proxy.log()
    );
    clerk.simple_query("SELECT 1").await.unwrap();
    let loads_before = proxy.log().matches("catalog loaded").count();
    both(&clerk, "SELECT last_value FROM pc_seq", Ok("1"), &proxy).await;
    let rows = clerk
        .simple_query("SELECT * FROM pc_seq")
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", proxy.log()));
    assert!(rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))));
    // A sequence is a known relation: reading it needs no catalog refresh.
    assert_eq!(
        proxy.log().matches("catalog loaded").count(),
        loads_before,
        "{}",
        proxy.log()
    );
}

/// A view whose stored query tree nests deeper than pgveil analyses (600 nested
/// function calls around the ID card) and a view over it.
fn create_poison_views() {
    let mut expression = String::from("id_card");
    for _ in 0..600 {
        expression = format!("upper({expression})");
    }
    cluster().psql_ok(
        "postgres",
        &format!(
            "CREATE OR REPLACE VIEW pc_poison AS \
                 SELECT id, {expression} AS shout, region FROM pc_customers;
             CREATE OR REPLACE VIEW pc_on_poison AS SELECT id, shout FROM pc_poison;
             GRANT SELECT ON pc_poison, pc_on_poison TO PUBLIC;"
        ),
    );
    let length = cluster().psql_ok(
        "postgres",
        "SELECT length(ev_action::text) FROM pg_rewrite \
          WHERE ev_class = 'pc_poison'::regclass AND rulename = '_RETURN'",
    );
    assert!(
        length.trim().parse::<usize>().is_ok_and(|n| n > 60_000),
        "{length}"
    );
}

#[tokio::test]
async fn a_view_that_cannot_be_analysed_is_refused_but_does_not_stop_pgveil() {
    schema();
    create_poison_views();
    let proxy = proxy();
    let oid = cluster().psql_ok("postgres", "SELECT 'pc_poison'::regclass::oid");
    let log = proxy.log();
    assert!(
        log.lines()
            .any(|line| line.contains("WARN") && line.contains(&format!("view={}", oid.trim()))),
        "{log}"
    );
    let clerk = proxy.connect("pc_clerk").await;
    // Every column of the view, even `id`, may carry what the view computed.
    for sql in [
        "SELECT shout FROM pc_poison WHERE id = 1",
        "SELECT id FROM pc_poison WHERE id = 1",
        "SELECT region FROM pc_poison WHERE id = 1",
        "SELECT shout FROM pc_on_poison WHERE id = 1",
    ] {
        both(&clerk, sql, Err("42501"), &proxy).await;
    }
    // The rest of the database keeps working.
    protected_like_the_parent(&proxy, "pc_customers", 1).await;

    let auditor = proxy.connect("pc_auditor").await;
    both(
        &auditor,
        "SELECT shout FROM pc_poison WHERE id = 1",
        Ok(ID_CARD),
        &proxy,
    )
    .await;
    both(
        &auditor,
        "SELECT shout FROM pc_on_poison WHERE id = 1",
        Ok(ID_CARD),
        &proxy,
    )
    .await;
}

#[tokio::test]
async fn rules_that_return_rows_name_the_protected_columns_they_read() {
    schema();
    let policy = Policy::parse(POLICY, "policy.yaml").expect("policy");
    let column = |table: &str, name: &str| {
        policy
            .columns
            .iter()
            .position(|c| c.name == name && policy.tables[c.table].name == table)
            .expect("policy column")
    };
    let customers_id_card = column("pc_customers", "id_card");
    let people_phone = column("pc_people", "phone");
    let client = cluster().direct().await;
    let load = || CatalogSnapshot::load(&client, "postgres", &policy);

    let before = load().await.expect("snapshot");
    assert!(
        before.reading_rule_sources().is_empty(),
        "{:?}",
        before.reading_rule_sources()
    );

    // Through a partition; and a rule that returns nothing does not count.
    client
        .batch_execute(
            "CREATE TABLE pc_rule_audit (x text);
             CREATE RULE pc_reads AS ON INSERT TO pc_rule_target
                 DO INSTEAD SELECT id_card FROM pc_customers_north;
             CREATE RULE pc_copies AS ON UPDATE TO pc_rule_target
                 DO ALSO INSERT INTO pc_rule_audit SELECT phone FROM pc_people;",
        )
        .await
        .expect("create rules");
    let with_rule = load().await.expect("snapshot");
    let sources = with_rule.reading_rule_sources();
    assert!(sources.contains(&customers_id_card), "{sources:?}");
    assert!(!sources.contains(&people_phone), "{sources:?}");
    assert!(sources.windows(2).all(|w| w[0] < w[1]), "{sources:?}");

    // Through a view on an inheritance child.
    client
        .batch_execute(
            "CREATE VIEW pc_staff_phones AS SELECT phone FROM pc_staff;
             CREATE RULE pc_reads_view AS ON DELETE TO pc_rule_target
                 DO INSTEAD SELECT phone FROM pc_staff_phones;",
        )
        .await
        .expect("create rule on view");
    let with_view = load().await.expect("snapshot");
    assert!(
        with_view.reading_rule_sources().contains(&people_phone),
        "{:?}",
        with_view.reading_rule_sources()
    );

    client
        .batch_execute(
            "DROP RULE pc_reads ON pc_rule_target;
             DROP RULE pc_copies ON pc_rule_target;
             DROP RULE pc_reads_view ON pc_rule_target;
             DROP VIEW pc_staff_phones; DROP TABLE pc_rule_audit;",
        )
        .await
        .expect("drop rules");
}
