//! The red-team file of issue 6 (leak guards): attempts to read masked, redacted or
//! denied columns in plaintext through pgveil — computed expressions, whole rows and
//! JSON, set operations, subqueries and CTEs, cursors and prepared statements, COPY,
//! copies into other tables and server files, filters used as oracles, row limits, and
//! odd spellings of the same names. Each attempt asserts that no protected plaintext
//! reaches the client (rows, COPY data, error message, detail and hint, psql output)
//! and that the statement ends the way the contract says (SQLSTATE 42501 from pgveil,
//! or the masked or NULL value). Then positive tests show that the same constructs
//! return the right plaintext for a role allowed to see it, and that a role allowed to
//! filter on protected columns can.
//!
//! Every test function runs all its attempts and then fails once, listing every attempt
//! that did not hold, so one run shows the whole picture.

mod support;

use std::path::PathBuf;
use std::pin::pin;
use std::sync::OnceLock;

use futures_util::StreamExt;
use support::{cluster, cstr, frame, policy_yaml, write_policy, Proxy, ProxyOptions, RawClient};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, SimpleQueryMessage};

/// One customer as stored.
struct Customer {
    id: i32,
    name: &'static str,
    phone: Option<&'static str>,
    email: &'static str,
    id_card: &'static str,
    city: &'static str,
}

const CUSTOMERS: [Customer; 7] = [
    Customer {
        id: 1,
        name: "张三丰",
        phone: Some("13812345678"),
        email: "zhang.san@example.com",
        id_card: "110105199001011234",
        city: "北京",
    },
    Customer {
        id: 2,
        name: "欧阳修",
        phone: Some("13987654321"),
        email: "ouyang.xiu@example.cn",
        id_card: "320102198805052345",
        city: "上海",
    },
    Customer {
        id: 3,
        name: "李四光",
        phone: None,
        email: "li.siguang@example.com",
        id_card: "440106197712123456",
        city: "北京",
    },
    Customer {
        id: 4,
        name: "王五",
        phone: Some("13700001111"),
        email: "wang.wu@example.org",
        id_card: "510104199203037890",
        city: "成都",
    },
    Customer {
        id: 5,
        name: "赵六",
        phone: Some("15922223333"),
        email: "zhao.liu@example.net",
        id_card: "330106198511114567",
        city: "杭州",
    },
    Customer {
        id: 6,
        name: "孙七",
        phone: Some("18655556666"),
        email: "sun.qi@example.com",
        id_card: "420111199907078901",
        city: "武汉",
    },
    Customer {
        id: 7,
        name: "周八",
        phone: Some("17788889999"),
        email: "zhou.ba@example.com",
        id_card: "610113200002022345",
        city: "西安",
    },
];

const IBANS: [&str; 2] = ["CN7712345678901234", "CN5598765432109876"];
const VIP_PHONE: &str = "13566667777";

/// Customer 1's plaintext.
const PHONE: &str = "13812345678";
const EMAIL: &str = "zhang.san@example.com";
const ID_CARD: &str = "110105199001011234";

const SCHEMA: &str = "
CREATE ROLE pgveil_catalog LOGIN;
CREATE ROLE rt_full LOGIN;
CREATE ROLE rt_support LOGIN;
CREATE ROLE rt_analyst LOGIN;
CREATE ROLE rt_snoop LOGIN;
CREATE ROLE rt_exporter LOGIN;
CREATE ROLE rt_guest LOGIN;
GRANT pg_write_server_files TO rt_full, rt_support;
CREATE TABLE public.customers (
    id int PRIMARY KEY, name text, phone text, email text, id_card text, city text);
CREATE TABLE public.orders (id int PRIMARY KEY, customer_id int, amount numeric);
INSERT INTO orders VALUES (10, 1, 99.50), (11, 2, 12.00), (12, 5, 7.25);
CREATE SCHEMA crm;
CREATE TABLE crm.accounts (id int PRIMARY KEY, owner text, iban text);
INSERT INTO crm.accounts VALUES (1, 'acme', 'CN7712345678901234'), (2, 'globex', 'CN5598765432109876');
CREATE VIEW public.v_upper AS SELECT id, upper(email) AS shout FROM customers;
CREATE VIEW public.v_on_v AS SELECT shout FROM v_upper;
CREATE TABLE public.\"Vip\" (id int, \"Phone\" text);
INSERT INTO \"Vip\" VALUES (1, '13566667777');
CREATE TABLE public.clientè (id int PRIMARY KEY, phone text);
INSERT INTO clientè VALUES (1, '13912340000');
-- Plain tables that copies of protected values must not reach.
CREATE TABLE public.sink_support (x text);
INSERT INTO sink_support VALUES ('seed');
CREATE TABLE public.sink_full (x text);
INSERT INTO sink_full VALUES ('seed');
GRANT ALL ON ALL TABLES IN SCHEMA public, crm TO PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public, crm TO PUBLIC;
";

const POLICY: &str = "
version: 1
roles:
  full:     { members: [rt_full] }
  support:  { members: [rt_support], max_rows: 1000 }
  analyst:  { members: [rt_analyst], max_rows: 3, export: deny }
  snoop:    { members: [rt_snoop], filter_on_protected: allow }
  exporter: { members: [rt_exporter], export: allow }
tables:
  public.customers:
    columns:
      name:    { level: L2, mask: cn_name,    access: { full: allow } }
      phone:   { level: L3, mask: cn_mobile,  access: { full: allow } }
      email:   { level: L3, mask: email,      access: { full: allow, support: redact } }
      id_card: { level: L4, mask: cn_id_card, access: { full: allow } }
  crm.accounts:
    columns:
      iban: { level: L3, mask: \"keep(4,4)\", access: { full: allow } }
  public.Vip:
    columns:
      Phone: { level: L3, mask: cn_mobile, access: { full: allow } }
  public.clientè:
    columns:
      phone: { level: L3, mask: cn_mobile, access: { full: allow } }
";

const FULL: &str = "rt_full";
const SUPPORT: &str = "rt_support";
const ANALYST: &str = "rt_analyst";
const SNOOP: &str = "rt_snoop";
const EXPORTER: &str = "rt_exporter";
const GUEST: &str = "rt_guest";

static SCHEMA_READY: OnceLock<()> = OnceLock::new();

fn schema() {
    SCHEMA_READY.get_or_init(|| {
        let mut sql = SCHEMA.to_string();
        for c in &CUSTOMERS {
            sql.push_str(&format!(
                "INSERT INTO customers VALUES ({}, '{}', {}, '{}', '{}', '{}');\n",
                c.id,
                c.name,
                c.phone
                    .map(|p| format!("'{p}'"))
                    .unwrap_or_else(|| "NULL".into()),
                c.email,
                c.id_card,
                c.city
            ));
        }
        cluster().psql_ok("postgres", &sql);
    });
}

fn proxy() -> Proxy {
    schema();
    Proxy::start_with(ProxyOptions {
        extra_yaml: policy_yaml("pgveil_catalog", &write_policy(POLICY)),
        ..ProxyOptions::default()
    })
}

/// The tail of a string from its `skip`th character, and that tail reversed.
fn tail_and_reverse(value: &str, skip: usize) -> [String; 2] {
    let tail: String = value.chars().skip(skip).collect();
    let reversed: String = tail.chars().rev().collect();
    [tail, reversed]
}

/// A window of characters `from..to` of `value`, and that window reversed.
fn window_and_reverse(value: &str, from: usize, to: usize) -> [String; 2] {
    let window: String = value.chars().skip(from).take(to - from).collect();
    let reversed: String = window.chars().rev().collect();
    [window, reversed]
}

/// Strings that appear in no mask, no error text and no allowed output, but in every
/// plaintext (or reversed plaintext) of a protected value: compared in lower case.
fn needles() -> &'static [String] {
    static NEEDLES: OnceLock<Vec<String>> = OnceLock::new();
    NEEDLES.get_or_init(|| {
        let mut needles = Vec::new();
        for c in &CUSTOMERS {
            // cn_name keeps the surname: the rest is the secret.
            let skip = if c.name.starts_with("欧阳") { 2 } else { 1 };
            needles.extend(tail_and_reverse(c.name, skip));
            needles.push(c.name.to_string());
            if let Some(phone) = c.phone {
                // cn_mobile keeps 3 + 4 digits: 7 digits around the hidden middle.
                needles.push(phone.to_string());
                needles.extend(window_and_reverse(phone, 2, 9));
            }
            // email keeps the first character of the local part and the domain.
            let local = c.email.split('@').next().unwrap();
            needles.extend(tail_and_reverse(local, 1));
            needles.push(c.email.to_string());
            // cn_id_card keeps 6 + 4: the birth date in the middle is the secret.
            needles.push(c.id_card.to_string());
            needles.extend(window_and_reverse(c.id_card, 6, 14));
        }
        for iban in IBANS {
            needles.push(iban.to_string());
            needles.extend(window_and_reverse(iban, 4, 14));
        }
        needles.push(VIP_PHONE.to_string());
        needles.extend(window_and_reverse(VIP_PHONE, 2, 9));
        let mut needles: Vec<String> = needles.into_iter().map(|n| n.to_lowercase()).collect();
        needles.sort();
        needles.dedup();
        needles
    })
}

/// The needles found in `bytes` (ASCII case-insensitive).
fn plaintext_in(bytes: &[u8]) -> Vec<String> {
    let lower = bytes.to_ascii_lowercase();
    needles()
        .iter()
        .filter(|needle| {
            let needle = needle.as_bytes();
            lower.windows(needle.len()).any(|window| window == needle)
        })
        .cloned()
        .collect()
}

/// An error the client got.
#[derive(Debug, Clone)]
struct Failure {
    state: String,
    message: String,
}

/// Everything one attempt brought back to the client.
#[derive(Debug, Default)]
struct Outcome {
    /// `[login] SQL`, for failure messages.
    label: String,
    /// Result rows, every value as text (`None`: NULL); for psql and COPY, one row per
    /// output line.
    rows: Vec<Vec<Option<String>>>,
    error: Option<Failure>,
    /// Every byte the client saw: values, COPY data, psql output, the error's message,
    /// detail, hint and other fields.
    seen: Vec<u8>,
}

impl Outcome {
    fn new(login: &str, sql: &str) -> Outcome {
        Outcome {
            label: format!("[{login}] {sql:?}"),
            ..Outcome::default()
        }
    }

    fn push_row(&mut self, row: Vec<Option<String>>) {
        for value in row.iter().flatten() {
            self.seen.extend_from_slice(value.as_bytes());
            self.seen.push(b'\n');
        }
        self.rows.push(row);
    }

    fn push_error(&mut self, error: &tokio_postgres::Error) {
        match error.as_db_error() {
            Some(db) => {
                // The Debug form carries every field: message, detail, hint, where, …
                self.seen.extend_from_slice(format!("{db:?}").as_bytes());
                self.error = Some(Failure {
                    state: db.code().code().to_string(),
                    message: db.message().to_string(),
                });
            }
            None => {
                self.seen.extend_from_slice(format!("{error:?}").as_bytes());
                self.error = Some(Failure {
                    state: format!("no SQLSTATE: {error}"),
                    message: error.to_string(),
                });
            }
        }
    }

    fn summary(&self) -> String {
        match &self.error {
            Some(error) => format!(
                "{} row(s) {:?}, then {} {:?}",
                self.rows.len(),
                self.rows.iter().take(3).collect::<Vec<_>>(),
                error.state,
                error.message
            ),
            None => format!(
                "no error, {} row(s) {:?}",
                self.rows.len(),
                self.rows.iter().take(4).collect::<Vec<_>>()
            ),
        }
    }
}

/// Runs `sql` through the simple protocol, streaming: rows that arrive before an error
/// are kept.
async fn attempt(client: &Client, login: &str, sql: &str) -> Outcome {
    let mut outcome = Outcome::new(login, sql);
    match client.simple_query_raw(sql).await {
        Err(error) => outcome.push_error(&error),
        Ok(stream) => {
            let mut stream = pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(SimpleQueryMessage::Row(row)) => outcome.push_row(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_string))
                            .collect(),
                    ),
                    Ok(_) => {}
                    Err(error) => {
                        outcome.push_error(&error);
                        break;
                    }
                }
            }
        }
    }
    outcome
}

/// Runs `sql` through the extended protocol (binary results) with `params`.
async fn attempt_extended(
    client: &Client,
    login: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Outcome {
    let mut outcome = Outcome::new(login, &format!("{sql} (extended, {params:?})"));
    match client.query_raw(sql, params.iter().copied()).await {
        Err(error) => outcome.push_error(&error),
        Ok(stream) => {
            let mut stream = pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(row) => {
                        let values = (0..row.len())
                            .map(|i| match row.try_get::<_, Option<String>>(i) {
                                Ok(value) => value,
                                Err(_) => Some(format!("<{}>", row.columns()[i].type_())),
                            })
                            .collect();
                        outcome.push_row(values);
                    }
                    Err(error) => {
                        outcome.push_error(&error);
                        break;
                    }
                }
            }
        }
    }
    outcome
}

/// Runs a COPY … TO STDOUT through tokio-postgres; the data goes to `seen` and, split
/// into lines, to `rows`.
async fn attempt_copy(client: &Client, login: &str, sql: &str) -> Outcome {
    let mut outcome = Outcome::new(login, sql);
    let mut data = Vec::new();
    match client.copy_out(sql).await {
        Err(error) => outcome.push_error(&error),
        Ok(stream) => {
            let mut stream = pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(error) => {
                        outcome.push_error(&error);
                        break;
                    }
                }
            }
        }
    }
    outcome.seen.extend_from_slice(&data);
    outcome.rows = String::from_utf8_lossy(&data)
        .lines()
        .map(|line| vec![Some(line.to_string())])
        .collect();
    outcome
}

/// Runs psql through pgveil with `-c sql` (verbose errors, so the SQLSTATE shows).
fn attempt_psql(proxy: &Proxy, login: &str, sql: &str) -> Outcome {
    let mut outcome = Outcome::new(login, &format!("psql -c {sql}"));
    let output = proxy.psql(login, ["-v", "VERBOSITY=verbose", "-c", sql]);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    outcome.seen.extend_from_slice(&output.stdout);
    outcome.seen.extend_from_slice(&output.stderr);
    outcome.rows = stdout
        .lines()
        .map(|line| vec![Some(line.to_string())])
        .collect();
    // "ERROR:  42501: pgveil: …"
    if let Some(line) = stderr.lines().find(|line| line.starts_with("ERROR:")) {
        let rest = line.trim_start_matches("ERROR:").trim_start();
        let (state, message) = rest.split_once(": ").unwrap_or(("?????", rest));
        outcome.error = Some(Failure {
            state: state.to_string(),
            message: message.to_string(),
        });
    } else if !output.status.success() {
        outcome.error = Some(Failure {
            state: "psql failed without ERROR".into(),
            message: stderr,
        });
    }
    outcome
}

/// The checks of one test function: every attempt is checked, failures are collected
/// and reported together at the end.
#[derive(Default)]
struct Checks {
    /// Checks made (an attempt whose aftermath is also checked counts twice).
    attempts: usize,
    failures: Vec<String>,
}

impl Checks {
    fn fail(&mut self, label: &str, what: String) {
        self.failures.push(format!("{label}: {what}"));
    }

    /// No protected plaintext anywhere in what the client saw.
    fn no_plaintext(&mut self, outcome: &Outcome) -> bool {
        let found = plaintext_in(&outcome.seen);
        if !found.is_empty() {
            self.fail(
                &outcome.label,
                format!(
                    "PLAINTEXT LEAKED {found:?} in {:?} ({})",
                    String::from_utf8_lossy(&outcome.seen),
                    match &outcome.error {
                        Some(error) => format!("then {}", error.state),
                        None => "no error".to_string(),
                    }
                ),
            );
            return false;
        }
        true
    }

    /// Refused by pgveil with 42501, no rows, no plaintext.
    fn denied(&mut self, outcome: &Outcome) {
        self.attempts += 1;
        let clean = self.no_plaintext(outcome);
        let state = outcome.error.as_ref().map(|e| e.state.as_str());
        let from_pgveil = outcome
            .error
            .as_ref()
            .is_some_and(|e| e.message.starts_with("pgveil:"));
        if state == Some("42501") && from_pgveil {
            if !outcome.rows.is_empty() {
                self.fail(
                    &outcome.label,
                    format!(
                        "42501 but rows reached the client first: {}",
                        outcome.summary()
                    ),
                );
            }
        } else if state == Some("42501") {
            self.fail(
                &outcome.label,
                format!(
                    "42501 from PostgreSQL, not from pgveil: {}",
                    outcome.summary()
                ),
            );
        } else if clean {
            // (A leak is reported already.)
            self.fail(
                &outcome.label,
                format!("expected 42501 from pgveil, got {}", outcome.summary()),
            );
        }
    }

    /// Succeeded with exactly these rows.
    fn rows(&mut self, outcome: &Outcome, expected: &[&[Option<&str>]]) {
        self.attempts += 1;
        let expected: Vec<Vec<Option<String>>> = expected
            .iter()
            .map(|row| row.iter().map(|v| v.map(str::to_string)).collect())
            .collect();
        if outcome.error.is_some() || outcome.rows != expected {
            self.fail(
                &outcome.label,
                format!("expected rows {expected:?}, got {}", outcome.summary()),
            );
        }
    }

    /// Succeeded with exactly these rows, and nothing protected in plaintext.
    fn masked(&mut self, outcome: &Outcome, expected: &[&[Option<&str>]]) {
        if self.no_plaintext(outcome) {
            self.rows(outcome, expected);
        } else {
            self.attempts += 1;
        }
    }

    /// A sequence (DECLARE then FETCH, PREPARE then EXECUTE): pgveil refused with 42501
    /// at some step, no step returned rows, no plaintext anywhere.
    fn denied_somewhere(&mut self, outcomes: &[Outcome]) {
        self.attempts += 1;
        let label = outcomes
            .iter()
            .map(|o| o.label.as_str())
            .collect::<Vec<_>>()
            .join(" ; ");
        let mut clean = true;
        for outcome in outcomes {
            clean &= self.no_plaintext(outcome);
        }
        let refused = outcomes.iter().any(|o| {
            o.error
                .as_ref()
                .is_some_and(|e| e.state == "42501" && e.message.starts_with("pgveil:"))
        });
        let with_rows: Vec<String> = outcomes
            .iter()
            .filter(|o| !o.rows.is_empty())
            .map(|o| format!("{} -> {}", o.label, o.summary()))
            .collect();
        if clean && !refused {
            let all: Vec<String> = outcomes
                .iter()
                .map(|o| format!("{} -> {}", o.label, o.summary()))
                .collect();
            self.fail(&label, format!("no 42501 from pgveil: {all:?}"));
        } else if clean && !with_rows.is_empty() {
            self.fail(&label, format!("rows reached the client: {with_rows:?}"));
        }
    }

    /// A plain condition the caller checked.
    fn that(&mut self, label: &str, holds: bool, what: String) {
        self.attempts += 1;
        if !holds {
            self.fail(label, what);
        }
    }

    fn finish(self, name: &str) {
        assert!(
            self.failures.is_empty(),
            "{name}: {} of {} checks did not hold:\n  - {}",
            self.failures.len(),
            self.attempts,
            self.failures.join("\n  - ")
        );
        eprintln!("{name}: all {} checks held", self.attempts);
    }
}

/// `Some(value)` rows of one column.
fn column(values: &[&'static str]) -> Vec<Vec<Option<&'static str>>> {
    values.iter().map(|v| vec![Some(*v)]).collect()
}

fn as_slices<'a>(rows: &'a [Vec<Option<&'a str>>]) -> Vec<&'a [Option<&'a str>]> {
    rows.iter().map(Vec::as_slice).collect()
}

/// The session still answers after the attempts.
async fn still_usable(checks: &mut Checks, client: &Client, login: &str) {
    let outcome = attempt(client, login, "SELECT 'still here'").await;
    checks.rows(&outcome, &[&[Some("still here")]]);
}

// ---------------------------------------------------------------------------------
// Restricted roles
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn computed_columns_over_masked_or_denied_columns_are_refused() {
    let proxy = proxy();
    let guest = proxy.connect(GUEST).await;
    let support = proxy.connect(SUPPORT).await;
    let mut checks = Checks::default();

    // The plain columns are masked, as a baseline (the harness and policy work).
    checks.masked(
        &attempt(
            &guest,
            GUEST,
            "SELECT name, phone, email FROM customers WHERE id = 1",
        )
        .await,
        &[&[Some("张**"), Some("138****5678"), Some("z***@example.com")]],
    );

    let refused: &[(&str, &Client, &str)] = &[
        (GUEST, &guest, "SELECT substr(phone, 4, 4) FROM customers"),
        (GUEST, &guest, "SELECT upper(phone) FROM customers"),
        (SUPPORT, &support, "SELECT lower(name) FROM customers"),
        (GUEST, &guest, "SELECT upper(name) FROM customers"),
        (GUEST, &guest, "SELECT reverse(phone) FROM customers"),
        (SUPPORT, &support, "SELECT md5(phone) FROM customers"),
        (GUEST, &guest, "SELECT length(phone) FROM customers"),
        (GUEST, &guest, "SELECT phone::bigint FROM customers"),
        (SUPPORT, &support, "SELECT phone::varchar(5) FROM customers"),
        (GUEST, &guest, "SELECT CAST(phone AS bytea) FROM customers"),
        (GUEST, &guest, "SELECT phone || '' FROM customers"),
        (SUPPORT, &support, "SELECT concat(phone) FROM customers"),
        (GUEST, &guest, "SELECT format('%s', phone) FROM customers"),
        (
            GUEST,
            &guest,
            "SELECT string_agg(phone, ',') FROM customers",
        ),
        (SUPPORT, &support, "SELECT array_agg(phone) FROM customers"),
        (GUEST, &guest, "SELECT json_agg(phone) FROM customers"),
        (GUEST, &guest, "SELECT COALESCE(phone, '') FROM customers"),
        (
            SUPPORT,
            &support,
            "SELECT CASE WHEN phone LIKE '138%' THEN 'y' END FROM customers",
        ),
        (GUEST, &guest, "SELECT GREATEST(phone, '') FROM customers"),
        (
            GUEST,
            &guest,
            "SELECT first_value(phone) OVER () FROM customers",
        ),
        (
            SUPPORT,
            &support,
            "SELECT lag(phone) OVER (ORDER BY id) FROM customers",
        ),
        (GUEST, &guest, "SELECT min(phone) FROM customers"),
        // id_card is denied (L4) for both: computed from it is refused too.
        (GUEST, &guest, "SELECT upper(id_card) FROM customers"),
        (
            SUPPORT,
            &support,
            "SELECT substr(id_card, 7, 8) FROM customers",
        ),
        // Mixed sources: one redacted, one masked.
        (SUPPORT, &support, "SELECT email || phone FROM customers"),
        // Masked email for the guest (support has it redacted).
        (
            GUEST,
            &guest,
            "SELECT split_part(email, '@', 1) FROM customers",
        ),
    ];
    for (login, client, sql) in refused {
        checks.denied(&attempt(client, login, sql).await);
    }

    // Computed only from a column the role sees redacted: NULL, no error.
    checks.masked(
        &attempt(
            &support,
            SUPPORT,
            "SELECT upper(email) FROM customers WHERE id = 1",
        )
        .await,
        &[&[None]],
    );
    checks.masked(
        &attempt(
            &support,
            SUPPORT,
            "SELECT email || '!' FROM customers WHERE id = 2",
        )
        .await,
        &[&[None]],
    );

    // Counts and null tests reveal nothing protected: allowed, with the real values.
    checks.masked(
        &attempt(
            &guest,
            GUEST,
            "SELECT count(*), count(phone) FROM customers",
        )
        .await,
        &[&[Some("7"), Some("6")]],
    );
    checks.masked(
        &attempt(
            &support,
            SUPPORT,
            "SELECT id, phone IS NULL FROM customers WHERE id IN (2, 3) ORDER BY id",
        )
        .await,
        &[&[Some("2"), Some("f")], &[Some("3"), Some("t")]],
    );

    still_usable(&mut checks, &guest, GUEST).await;
    checks.finish("computed");
}

#[tokio::test]
async fn whole_rows_json_and_arrays_are_refused() {
    let proxy = proxy();
    let guest = proxy.connect(GUEST).await;
    let support = proxy.connect(SUPPORT).await;
    let mut checks = Checks::default();
    let refused: &[(&str, &Client, &str)] = &[
        (GUEST, &guest, "SELECT jsonb_agg(c) FROM customers c"),
        (GUEST, &guest, "SELECT row_to_json(c) FROM customers c"),
        (SUPPORT, &support, "SELECT to_jsonb(c.*) FROM customers c"),
        (GUEST, &guest, "SELECT c::text FROM customers c"),
        (SUPPORT, &support, "SELECT c FROM customers c"),
        (
            GUEST,
            &guest,
            "SELECT json_build_object('p', phone) FROM customers",
        ),
        (SUPPORT, &support, "SELECT ROW(phone)::text FROM customers"),
        (GUEST, &guest, "SELECT ARRAY[phone] FROM customers"),
        (
            GUEST,
            &guest,
            "SELECT x.key, x.value FROM customers c, jsonb_each_text(to_jsonb(c)) x",
        ),
        (
            SUPPORT,
            &support,
            "SELECT t.* FROM customers c, LATERAL unnest(ARRAY[c.name, c.phone]) t",
        ),
        (
            GUEST,
            &guest,
            "SELECT r FROM (SELECT row(c.*) AS r FROM customers c) s",
        ),
    ];
    for (login, client, sql) in refused {
        checks.denied(&attempt(client, login, sql).await);
    }
    still_usable(&mut checks, &support, SUPPORT).await;
    checks.finish("whole rows and JSON");
}

#[tokio::test]
async fn set_operations_subqueries_ctes_and_views_are_refused() {
    let proxy = proxy();
    let guest = proxy.connect(GUEST).await;
    let support = proxy.connect(SUPPORT).await;
    let analyst = proxy.connect(ANALYST).await;
    let mut checks = Checks::default();
    let refused: &[(&str, &Client, &str)] = &[
        (
            GUEST,
            &guest,
            "SELECT phone FROM customers UNION SELECT 'x'",
        ),
        (
            SUPPORT,
            &support,
            "SELECT phone FROM customers INTERSECT SELECT phone FROM customers",
        ),
        (
            GUEST,
            &guest,
            "SELECT phone FROM customers EXCEPT SELECT 'x'",
        ),
        (
            GUEST,
            &guest,
            "SELECT p FROM (SELECT phone AS p FROM customers UNION ALL SELECT '1') s",
        ),
        (
            GUEST,
            &guest,
            "SELECT (SELECT phone FROM customers LIMIT 1)",
        ),
        (
            SUPPORT,
            &support,
            "SELECT id, (SELECT c2.phone FROM customers c2 WHERE c2.id = c.id) FROM customers c",
        ),
        (
            SUPPORT,
            &support,
            "SELECT x.p FROM customers c, LATERAL (SELECT upper(c.phone) p) x",
        ),
        (
            GUEST,
            &guest,
            "WITH t AS (SELECT upper(phone) p FROM customers) SELECT p FROM t",
        ),
        (
            GUEST,
            &guest,
            "WITH RECURSIVE r(n, p) AS (SELECT 1, phone FROM customers WHERE id = 1 \
             UNION ALL SELECT n + 1, p FROM r WHERE n < 2) SELECT p FROM r",
        ),
        (
            GUEST,
            &guest,
            "SELECT v.p FROM (VALUES ((SELECT phone FROM customers WHERE id = 1))) v(p)",
        ),
        // A view column computed from email: masked for these two.
        (GUEST, &guest, "SELECT shout FROM v_on_v"),
        (ANALYST, &analyst, "SELECT shout FROM v_on_v LIMIT 1"),
        (GUEST, &guest, "SELECT shout FROM v_upper WHERE id = 1"),
        // Multi-statement simple query: the second statement leaks.
        (
            GUEST,
            &guest,
            "SELECT 1 AS one; SELECT upper(phone) FROM customers",
        ),
    ];
    for (login, client, sql) in refused {
        let outcome = attempt(client, login, sql).await;
        if sql.starts_with("SELECT 1 AS one;") {
            // The first statement's row may come through; nothing else.
            checks.no_plaintext(&outcome);
            checks.that(
                &outcome.label,
                outcome
                    .error
                    .as_ref()
                    .is_some_and(|e| e.state == "42501" && e.message.starts_with("pgveil:"))
                    && outcome
                        .rows
                        .iter()
                        .all(|r| r == &vec![Some("1".to_string())]),
                format!(
                    "expected at most the row of SELECT 1, then 42501 from pgveil; got {}",
                    outcome.summary()
                ),
            );
        } else {
            checks.denied(&outcome);
        }
    }
    // Email is redacted for support: the view column computed from it is NULL.
    checks.masked(
        &attempt(&support, SUPPORT, "SELECT shout FROM v_on_v LIMIT 2").await,
        &[&[None], &[None]],
    );
    still_usable(&mut checks, &guest, GUEST).await;
    checks.finish("set operations, subqueries, CTEs, views");
}

#[tokio::test]
async fn cursors_and_prepared_statements_are_refused() {
    let proxy = proxy();
    let guest = proxy.connect(GUEST).await;
    let support = proxy.connect(SUPPORT).await;
    let mut checks = Checks::default();

    // DECLARE … FETCH.
    let mut steps = Vec::new();
    for sql in [
        "BEGIN",
        "DECLARE c CURSOR FOR SELECT upper(phone) FROM customers",
        "FETCH ALL FROM c",
    ] {
        steps.push(attempt(&guest, GUEST, sql).await);
    }
    checks.denied_somewhere(&steps[1..]);
    attempt(&guest, GUEST, "ROLLBACK").await;

    let mut steps = Vec::new();
    for sql in [
        "BEGIN",
        "DECLARE h CURSOR FOR SELECT id, substr(id_card, 7, 8) FROM customers",
        "FETCH 2 FROM h",
        "FETCH 2 FROM h",
    ] {
        steps.push(attempt(&support, SUPPORT, sql).await);
    }
    checks.denied_somewhere(&steps[1..]);
    attempt(&support, SUPPORT, "ROLLBACK").await;

    // SQL PREPARE … EXECUTE.
    let mut steps = Vec::new();
    for sql in [
        "PREPARE p AS SELECT substr(phone, 4, 4) FROM customers",
        "EXECUTE p",
    ] {
        steps.push(attempt(&support, SUPPORT, sql).await);
    }
    checks.denied_somewhere(&steps);
    attempt(&support, SUPPORT, "DEALLOCATE ALL").await;

    let mut steps = Vec::new();
    for sql in [
        "PREPARE q(int) AS SELECT row_to_json(c) FROM customers c WHERE id = $1",
        "EXECUTE q(1)",
    ] {
        steps.push(attempt(&guest, GUEST, sql).await);
    }
    checks.denied_somewhere(&steps);
    attempt(&guest, GUEST, "DEALLOCATE ALL").await;

    // Extended protocol, with parameters.
    checks.denied(
        &attempt_extended(
            &guest,
            GUEST,
            "SELECT substr(phone, $1, $2) FROM customers",
            &[&4i32, &4i32],
        )
        .await,
    );
    checks.denied(
        &attempt_extended(
            &support,
            SUPPORT,
            "SELECT upper(phone) FROM customers WHERE id = $1",
            &[&1i32],
        )
        .await,
    );
    checks.denied(
        &attempt_extended(
            &guest,
            GUEST,
            "SELECT id FROM customers WHERE phone = $1",
            &[&PHONE],
        )
        .await,
    );
    // The plain masked column through the same path is fine.
    checks.masked(
        &attempt_extended(
            &guest,
            GUEST,
            "SELECT phone FROM customers WHERE id = $1",
            &[&1i32],
        )
        .await,
        &[&[Some("138****5678")]],
    );
    still_usable(&mut checks, &guest, GUEST).await;
    still_usable(&mut checks, &support, SUPPORT).await;
    checks.finish("cursors and prepared statements");
}

/// The masked rows of `SELECT id, name, phone, email FROM customers` as `login` sees
/// them through pgveil, sorted by id.
async fn masked_select(client: &Client, login: &str) -> Vec<[Option<String>; 4]> {
    let outcome = attempt(
        client,
        login,
        "SELECT id, name, phone, email FROM customers ORDER BY id",
    )
    .await;
    assert!(
        outcome.error.is_none() && outcome.rows.len() == CUSTOMERS.len(),
        "masked SELECT: {}",
        outcome.summary()
    );
    outcome
        .rows
        .into_iter()
        .map(|row| {
            [
                row[0].clone(),
                row[1].clone(),
                row[2].clone(),
                row[3].clone(),
            ]
        })
        .collect()
}

fn sorted_lines(outcome: &Outcome) -> Vec<String> {
    let mut lines: Vec<String> = outcome.rows.iter().flatten().flatten().cloned().collect();
    lines.sort_by_key(|line| {
        line.split(['\t', ','])
            .next()
            .and_then(|id| id.parse::<i32>().ok())
            .unwrap_or(-1)
    });
    lines
}

#[tokio::test]
async fn copy_to_stdout_follows_export_and_masks() {
    let proxy = proxy();
    let analyst = proxy.connect(ANALYST).await;
    let exporter = proxy.connect(EXPORTER).await;
    let mut checks = Checks::default();

    // export: deny.
    checks.denied(&attempt_psql(&proxy, ANALYST, "\\copy customers TO STDOUT"));
    checks.denied(&attempt_psql(
        &proxy,
        ANALYST,
        "COPY (SELECT name FROM customers) TO STDOUT",
    ));
    checks.denied(&attempt_copy(&analyst, ANALYST, "COPY customers (phone) TO STDOUT").await);
    let ids = attempt_psql(&proxy, ANALYST, "COPY (SELECT id FROM customers) TO STDOUT");
    checks.rows(
        &ids,
        &as_slices(&column(&["1", "2", "3", "4", "5", "6", "7"])),
    );

    // export: allow, levels default: masked exactly like SELECT.
    let masked = masked_select(&exporter, EXPORTER).await;
    checks.that(
        "[rt_exporter] masked SELECT of customer 1",
        masked[0]
            == [
                Some("1".to_string()),
                Some("张**".to_string()),
                Some("138****5678".to_string()),
                Some("z***@example.com".to_string()),
            ],
        format!("{:?}", masked[0]),
    );
    let text: Vec<String> = masked
        .iter()
        .map(|row| {
            row.iter()
                .map(|v| v.clone().unwrap_or_else(|| "\\N".into()))
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect();
    let outcome = attempt_copy(
        &exporter,
        EXPORTER,
        "COPY customers (id, name, phone, email) TO STDOUT",
    )
    .await;
    checks.no_plaintext(&outcome);
    checks.that(
        &outcome.label,
        outcome.error.is_none() && sorted_lines(&outcome) == text,
        format!("expected {text:?}, got {}", outcome.summary()),
    );

    // A query that selects the columns themselves is masked the same way.
    let outcome = attempt_copy(
        &exporter,
        EXPORTER,
        "COPY (SELECT c.id, c.name, phone, email FROM customers c WHERE c.id > 0) TO STDOUT",
    )
    .await;
    checks.no_plaintext(&outcome);
    checks.that(
        &outcome.label,
        outcome.error.is_none() && sorted_lines(&outcome) == text,
        format!("expected {text:?}, got {}", outcome.summary()),
    );

    let mut csv = vec!["id,name,phone,email".to_string()];
    csv.extend(masked.iter().map(|row| {
        row.iter()
            .map(|v| v.clone().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(",")
    }));
    let outcome = attempt_copy(
        &exporter,
        EXPORTER,
        "COPY customers (id, name, phone, email) TO STDOUT WITH (FORMAT csv, HEADER)",
    )
    .await;
    checks.no_plaintext(&outcome);
    checks.that(
        &outcome.label,
        outcome.error.is_none() && sorted_lines(&outcome) == csv,
        format!("expected {csv:?}, got {}", outcome.summary()),
    );

    let outcome = attempt_copy(
        &exporter,
        EXPORTER,
        "COPY customers (id, name, phone, email) TO STDOUT (FORMAT binary)",
    )
    .await;
    checks.no_plaintext(&outcome);
    let has = |needle: &str| {
        outcome
            .seen
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    };
    checks.that(
        &outcome.label,
        outcome.error.is_none()
            && outcome.seen.starts_with(b"PGCOPY\n\xff\r\n\0")
            && has("138****5678")
            && has("z***@example.com")
            && has("张**"),
        format!(
            "expected binary COPY data with the masks, got {} ({} bytes)",
            outcome.summary(),
            outcome.seen.len()
        ),
    );

    // id_card is denied for the exporter; computed columns are refused.
    checks.denied(&attempt_copy(&exporter, EXPORTER, "COPY customers TO STDOUT").await);
    checks.denied(&attempt_psql(
        &proxy,
        EXPORTER,
        "\\copy customers TO STDOUT",
    ));
    checks.denied(
        &attempt_copy(
            &exporter,
            EXPORTER,
            "COPY (SELECT upper(phone) FROM customers) TO STDOUT",
        )
        .await,
    );
    checks.denied(
        &attempt_copy(
            &exporter,
            EXPORTER,
            "COPY (SELECT row_to_json(c) FROM customers c) TO STDOUT",
        )
        .await,
    );
    checks.denied(
        &attempt_copy(
            &exporter,
            EXPORTER,
            "COPY (SELECT id FROM customers WHERE phone LIKE '138%') TO STDOUT",
        )
        .await,
    );
    still_usable(&mut checks, &exporter, EXPORTER).await;
    still_usable(&mut checks, &analyst, ANALYST).await;
    checks.finish("COPY TO STDOUT");
}

/// A server file path that does not exist yet, in the cluster's folder.
fn server_file(name: &str) -> PathBuf {
    let path = cluster()
        .dir
        .join(format!("leak-{name}-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn relation_exists(name: &str) -> bool {
    cluster()
        .psql_ok(
            "postgres",
            &format!("SELECT to_regclass('{name}') IS NOT NULL"),
        )
        .trim()
        == "t"
}

#[tokio::test]
async fn copies_into_tables_and_server_files_are_refused() {
    let proxy = proxy();
    let support = proxy.connect(SUPPORT).await;
    let guest = proxy.connect(GUEST).await;
    let mut checks = Checks::default();

    for (sql, relation) in [
        (
            "CREATE TABLE rt_leak1 AS SELECT phone FROM customers",
            "rt_leak1",
        ),
        ("SELECT phone INTO rt_leak2 FROM customers", "rt_leak2"),
        (
            "CREATE TABLE rt_leak3 AS SELECT id, upper(phone) AS p FROM customers",
            "rt_leak3",
        ),
        (
            "CREATE MATERIALIZED VIEW rt_leak4 AS SELECT phone FROM customers",
            "rt_leak4",
        ),
        (
            "CREATE TABLE rt_leak5 AS SELECT email FROM customers",
            "rt_leak5",
        ),
    ] {
        let outcome = attempt(&support, SUPPORT, sql).await;
        checks.denied(&outcome);
        let exists = relation_exists(relation);
        let holding = if exists {
            let dump = cluster().psql_ok("postgres", &format!("SELECT * FROM {relation}"));
            plaintext_in(dump.as_bytes())
        } else {
            Vec::new()
        };
        checks.that(
            &outcome.label,
            !exists,
            format!("{relation} was created, holding plaintext {holding:?}"),
        );
        let kind = if sql.contains("MATERIALIZED") {
            "MATERIALIZED VIEW"
        } else {
            "TABLE"
        };
        cluster().psql_ok("postgres", &format!("DROP {kind} IF EXISTS {relation}"));
    }

    for sql in [
        "INSERT INTO sink_support (x) SELECT phone FROM customers",
        "INSERT INTO sink_support (x) SELECT substr(id_card, 7, 8) FROM customers",
        "INSERT INTO sink_support (x) SELECT email FROM customers",
        "UPDATE sink_support SET x = (SELECT phone FROM customers LIMIT 1)",
        "WITH s AS (SELECT phone FROM customers) INSERT INTO sink_support SELECT * FROM s",
    ] {
        let outcome = attempt(&support, SUPPORT, sql).await;
        checks.denied(&outcome);
        let contents = cluster().psql_ok("postgres", "SELECT x FROM sink_support");
        checks.that(
            &outcome.label,
            contents.trim() == "seed",
            format!(
                "sink_support now holds {:?} (plaintext {:?})",
                contents.lines().take(4).collect::<Vec<_>>(),
                plaintext_in(contents.as_bytes())
            ),
        );
        cluster().psql_ok(
            "postgres",
            "DELETE FROM sink_support; INSERT INTO sink_support VALUES ('seed')",
        );
    }

    for (name, query) in [
        ("query", "(SELECT phone FROM customers)"),
        ("columns", "customers (id, phone)"),
        ("computed", "(SELECT upper(phone) FROM customers)"),
    ] {
        let path = server_file(name);
        let sql = format!("COPY {query} TO '{}'", path.display());
        let outcome = attempt(&support, SUPPORT, &sql).await;
        checks.denied(&outcome);
        let written = std::fs::read(&path).ok();
        checks.that(
            &outcome.label,
            written.is_none(),
            format!(
                "{} was written (plaintext {:?})",
                path.display(),
                written.as_deref().map(plaintext_in)
            ),
        );
        let _ = std::fs::remove_file(&path);
    }

    // The whole row, with a denied column, for the default role.
    let outcome = attempt(
        &guest,
        GUEST,
        "CREATE TABLE rt_leak6 AS SELECT c.* FROM customers c",
    )
    .await;
    checks.denied(&outcome);
    checks.that(
        &outcome.label,
        !relation_exists("rt_leak6"),
        "rt_leak6 was created".into(),
    );
    cluster().psql_ok("postgres", "DROP TABLE IF EXISTS rt_leak6");

    still_usable(&mut checks, &support, SUPPORT).await;
    checks.finish("copies into tables and files");
}

#[tokio::test]
async fn filters_on_protected_columns_are_refused() {
    let proxy = proxy();
    let guest = proxy.connect(GUEST).await;
    let support = proxy.connect(SUPPORT).await;
    let analyst = proxy.connect(ANALYST).await;
    let mut checks = Checks::default();
    let refused: &[(&str, &Client, &str)] = &[
        (
            GUEST,
            &guest,
            "SELECT id FROM customers WHERE phone = '13812345678'",
        ),
        (SUPPORT, &support, "SELECT id FROM customers WHERE phone LIKE '138%'"),
        (GUEST, &guest, "SELECT id FROM customers ORDER BY phone"),
        (GUEST, &guest, "SELECT count(*) FROM customers GROUP BY phone"),
        (
            SUPPORT,
            &support,
            "SELECT count(*) FROM customers HAVING max(phone) > '1'",
        ),
        (
            GUEST,
            &guest,
            "SELECT o.id FROM orders o JOIN customers c ON c.phone = o.amount::text",
        ),
        (
            GUEST,
            &guest,
            "SELECT 1 WHERE EXISTS (SELECT 1 FROM customers WHERE phone LIKE '1%')",
        ),
        (SUPPORT, &support, "SELECT DISTINCT ON (phone) id FROM customers"),
        (
            GUEST,
            &guest,
            "SELECT id, rank() OVER (PARTITION BY phone) FROM customers",
        ),
        (
            GUEST,
            &guest,
            "SELECT id, row_number() OVER (ORDER BY phone) FROM customers",
        ),
        (
            GUEST,
            &guest,
            "SELECT id FROM customers WHERE id_card LIKE '1101%'",
        ),
        // Redacted for support, but L3: no conditions on it either.
        (
            SUPPORT,
            &support,
            "SELECT id FROM customers WHERE email = 'zhang.san@example.com'",
        ),
        (
            ANALYST,
            &analyst,
            "SELECT id FROM customers WHERE id IN (SELECT id FROM customers WHERE phone > '139')",
        ),
        (
            GUEST,
            &guest,
            "SELECT count(*) FILTER (WHERE phone LIKE '138%') FROM customers",
        ),
        (
            GUEST,
            &guest,
            "SELECT id FROM crm.accounts WHERE iban LIKE 'CN77%'",
        ),
        (
            SUPPORT,
            &support,
            "SELECT o.id FROM orders o WHERE o.customer_id = (SELECT id FROM customers WHERE phone = '13812345678')",
        ),
    ];
    for (login, client, sql) in refused {
        checks.denied(&attempt(client, login, sql).await);
    }

    // UPDATE and DELETE with a condition on phone are filters too (rolled back in case
    // they run).
    for (login, client, sql) in [
        (
            GUEST,
            &guest,
            "DELETE FROM customers WHERE phone = '13812345678'",
        ),
        (
            SUPPORT,
            &support,
            "UPDATE customers SET city = city WHERE phone LIKE '139%'",
        ),
    ] {
        attempt(client, login, "BEGIN").await;
        checks.denied(&attempt(client, login, sql).await);
        attempt(client, login, "ROLLBACK").await;
    }

    // Allowed: a condition on name (L2), null tests.
    checks.masked(
        &attempt(
            &guest,
            GUEST,
            "SELECT phone FROM customers WHERE name = '张三丰'",
        )
        .await,
        &[&[Some("138****5678")]],
    );
    checks.masked(
        &attempt(
            &guest,
            GUEST,
            "SELECT id FROM customers WHERE phone IS NULL",
        )
        .await,
        &[&[Some("3")]],
    );
    checks.masked(
        &attempt(
            &support,
            SUPPORT,
            "SELECT count(*) FROM customers WHERE phone IS NOT NULL",
        )
        .await,
        &[&[Some("6")]],
    );
    still_usable(&mut checks, &guest, GUEST).await;
    still_usable(&mut checks, &support, SUPPORT).await;
    checks.finish("filters");
}

#[tokio::test]
async fn unparseable_statements_naming_a_protected_table_are_refused() {
    let proxy = proxy();
    let guest = proxy.connect(GUEST).await;
    let support = proxy.connect(SUPPORT).await;
    let mut checks = Checks::default();
    for (login, client, sql) in [
        (
            GUEST,
            &guest,
            "SELECT phone FROM customers FOR NO KEY UPDATE",
        ),
        (
            SUPPORT,
            &support,
            "SELECT upper(phone) FROM customers FOR NO KEY UPDATE",
        ),
        (
            GUEST,
            &guest,
            "SELECT substr(phone, 4, 4) FROM customers FOR KEY SHARE",
        ),
        (SUPPORT, &support, "CLUSTER customers"),
    ] {
        checks.denied(&attempt(client, login, sql).await);
    }
    // Nested as deep as the parser goes, and deeper: analysed or refused, and the
    // process (every other session) survives it.
    for depth in [40, 200] {
        let sql = format!(
            "SELECT {}upper(phone){} FROM customers",
            "lower(".repeat(depth),
            ")".repeat(depth)
        );
        checks.denied(&attempt(&guest, GUEST, &sql).await);
        let sql = format!(
            "SELECT {}phone FROM customers LIMIT 1{}",
            "(SELECT ".repeat(depth),
            ")".repeat(depth)
        );
        checks.denied(&attempt(&guest, GUEST, &sql).await);
    }
    // An unparseable statement that names no protected table is not pgveil's business.
    let outcome = attempt(&guest, GUEST, "SELECT id FROM orders FOR NO KEY UPDATE").await;
    checks.rows(&outcome, &as_slices(&column(&["10", "11", "12"])));
    still_usable(&mut checks, &guest, GUEST).await;
    checks.finish("unparseable");
}

#[tokio::test]
async fn names_comments_whitespace_and_search_path_do_not_hide_a_column() {
    let proxy = proxy();
    let guest = proxy.connect(GUEST).await;
    let support = proxy.connect(SUPPORT).await;
    let mut checks = Checks::default();

    // The mixed-case table is protected under its catalog spelling.
    checks.masked(
        &attempt(&guest, GUEST, "SELECT \"Phone\" FROM \"Vip\"").await,
        &[&[Some("135****7777")]],
    );

    let refused: &[(&str, &Client, &str)] = &[
        (GUEST, &guest, "SELECT upper(\"phone\") FROM \"customers\""),
        (SUPPORT, &support, "SeLeCt UPPER(PHONE) from CUSTOMERS"),
        (GUEST, &guest, "SELECT upper(phone) FROM public.customers"),
        (
            GUEST,
            &guest,
            "SELECT upper(c.phone) FROM \"public\".\"customers\" AS c",
        ),
        (
            SUPPORT,
            &support,
            "SELECT/**/upper(phone)--c\n FROM\tcustomers",
        ),
        (GUEST, &guest, "SELECT upper(/* x */phone) FROM customers"),
        (
            GUEST,
            &guest,
            "SELECT\n\tupper (\n phone\n)\nFROM\n customers ;",
        ),
        (
            GUEST,
            &guest,
            "SELECT upper(U&\"p\\0068one\") FROM customers",
        ),
        (GUEST, &guest, "SELECT upper(iban) FROM crm.accounts"),
        (GUEST, &guest, "SELECT upper(\"Phone\") FROM \"Vip\""),
        (
            SUPPORT,
            &support,
            "SELECT upper(v.\"Phone\") FROM public.\"Vip\" v",
        ),
    ];
    for (login, client, sql) in refused {
        checks.denied(&attempt(client, login, sql).await);
    }

    // search_path: the unqualified name is crm.accounts.
    let path = proxy.connect(GUEST).await;
    let set = attempt(&path, GUEST, "SET search_path = crm, public").await;
    checks.rows(&set, &[]);
    checks.masked(
        &attempt(&path, GUEST, "SELECT iban FROM accounts WHERE id = 1").await,
        &[&[Some("CN77**********1234")]],
    );
    checks.denied(&attempt(&path, GUEST, "SELECT upper(iban) FROM accounts").await);
    checks.denied(
        &attempt(
            &path,
            GUEST,
            "SELECT owner FROM accounts WHERE iban = 'CN7712345678901234'",
        )
        .await,
    );
    // The same text in one simple query.
    let fresh = proxy.connect(GUEST).await;
    let outcome = attempt(
        &fresh,
        GUEST,
        "SET search_path = crm, public; SELECT upper(iban) FROM accounts",
    )
    .await;
    checks.denied(&outcome);
    still_usable(&mut checks, &guest, GUEST).await;
    checks.finish("names and search_path");
}

#[tokio::test]
async fn max_rows_stops_the_stream_after_the_limit() {
    let proxy = proxy();
    let analyst = proxy.connect(ANALYST).await;
    let mut checks = Checks::default();

    let outcome = attempt(&analyst, ANALYST, "SELECT name FROM customers").await;
    checks.no_plaintext(&outcome);
    checks.that(
        &outcome.label,
        outcome.rows.len() <= 3
            && outcome
                .error
                .as_ref()
                .is_some_and(|e| e.state == "42501" && e.message.starts_with("pgveil:")),
        format!(
            "expected at most 3 rows then 42501 from pgveil, got {}",
            outcome.summary()
        ),
    );
    let outcome =
        attempt_extended(&analyst, ANALYST, "SELECT name, phone FROM customers", &[]).await;
    checks.no_plaintext(&outcome);
    checks.that(
        &outcome.label,
        outcome.rows.len() <= 3
            && outcome
                .error
                .as_ref()
                .is_some_and(|e| e.state == "42501" && e.message.starts_with("pgveil:")),
        format!(
            "expected at most 3 rows then 42501 from pgveil, got {}",
            outcome.summary()
        ),
    );
    still_usable(&mut checks, &analyst, ANALYST).await;

    // Within the limit, and without protected columns: fine.
    checks.masked(
        &attempt(
            &analyst,
            ANALYST,
            "SELECT name FROM customers WHERE id <= 3 ORDER BY id",
        )
        .await,
        &[&[Some("张**")], &[Some("欧阳*")], &[Some("李**")]],
    );
    checks.rows(
        &attempt(&analyst, ANALYST, "SELECT id FROM customers ORDER BY id").await,
        &as_slices(&column(&["1", "2", "3", "4", "5", "6", "7"])),
    );

    // A cursor counts across FETCHes.
    attempt(&analyst, ANALYST, "BEGIN").await;
    attempt(
        &analyst,
        ANALYST,
        "DECLARE c CURSOR FOR SELECT name FROM customers ORDER BY id",
    )
    .await;
    let first = attempt(&analyst, ANALYST, "FETCH 2 FROM c").await;
    checks.masked(&first, &[&[Some("张**")], &[Some("欧阳*")]]);
    let second = attempt(&analyst, ANALYST, "FETCH 2 FROM c").await;
    checks.no_plaintext(&second);
    checks.that(
        &second.label,
        second.rows.len() <= 1
            && second
                .error
                .as_ref()
                .is_some_and(|e| e.state == "42501" && e.message.starts_with("pgveil:")),
        format!(
            "expected at most 1 more row then 42501 from pgveil, got {}",
            second.summary()
        ),
    );
    attempt(&analyst, ANALYST, "ROLLBACK").await;
    still_usable(&mut checks, &analyst, ANALYST).await;

    // A protocol portal counts across Executes that stop at a row count.
    let mut portal_client = proxy.connect(ANALYST).await;
    let transaction = portal_client.transaction().await.unwrap();
    let statement = transaction
        .prepare("SELECT name FROM customers ORDER BY id")
        .await
        .unwrap();
    let portal = transaction.bind(&statement, &[]).await.unwrap();
    let first = transaction.query_portal(&portal, 2).await;
    checks.that(
        "[rt_analyst] portal: the first 2 rows",
        first.as_ref().is_ok_and(|rows| rows.len() == 2),
        format!("{first:?}"),
    );
    let second = transaction.query_portal(&portal, 2).await;
    checks.that(
        "[rt_analyst] portal: past the limit across Executes",
        second
            .as_ref()
            .err()
            .and_then(|e| e.as_db_error())
            .is_some_and(|e| e.code().code() == "42501" && e.message().starts_with("pgveil:")),
        format!("{second:?}"),
    );
    drop(transaction);
    let alive = portal_client.simple_query("SELECT 1").await;
    checks.that(
        "[rt_analyst] the session goes on after the portal's refusal",
        alive.is_ok(),
        format!("{alive:?}"),
    );
    checks.finish("max_rows");
}

// ---------------------------------------------------------------------------------
// Roles allowed to see or to filter
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn the_full_role_gets_the_plaintext_computations() {
    let proxy = proxy();
    let full = proxy.connect(FULL).await;
    let mut checks = Checks::default();
    let expected: &[(&str, &[&[Option<&str>]])] = &[
        (
            "SELECT upper(email) FROM customers WHERE id = 1",
            &[&[Some("ZHANG.SAN@EXAMPLE.COM")]],
        ),
        (
            "SELECT substr(phone, 4, 4) FROM customers WHERE id = 1",
            &[&[Some("1234")]],
        ),
        (
            "SELECT reverse(phone), length(phone) FROM customers WHERE id = 1",
            &[&[Some("87654321831"), Some("11")]],
        ),
        (
            "SELECT phone::bigint, phone::varchar(5), phone || '' FROM customers WHERE id = 1",
            &[&[Some(PHONE), Some("13812"), Some(PHONE)]],
        ),
        (
            "SELECT upper(name), md5(phone) = md5('13812345678') FROM customers WHERE id = 1",
            &[&[Some("张三丰"), Some("t")]],
        ),
        (
            "SELECT string_agg(phone, ',' ORDER BY id) FROM customers WHERE id <= 2",
            &[&[Some("13812345678,13987654321")]],
        ),
        (
            "SELECT row_to_json(c) FROM customers c WHERE id = 1",
            &[&[Some(
                "{\"id\":1,\"name\":\"张三丰\",\"phone\":\"13812345678\",\"email\":\"zhang.san@example.com\",\"id_card\":\"110105199001011234\",\"city\":\"北京\"}",
            )]],
        ),
        (
            "SELECT c::text FROM customers c WHERE id = 1",
            &[&[Some(
                "(1,张三丰,13812345678,zhang.san@example.com,110105199001011234,北京)",
            )]],
        ),
        (
            "SELECT json_build_object('p', phone)::text FROM customers WHERE id = 1",
            &[&[Some("{\"p\" : \"13812345678\"}")]],
        ),
        (
            "SELECT phone FROM customers WHERE id = 1 UNION SELECT 'x' ORDER BY 1",
            &[&[Some(PHONE)], &[Some("x")]],
        ),
        (
            "SELECT x.p FROM customers c, LATERAL (SELECT upper(c.email) p) x WHERE c.id = 1",
            &[&[Some("ZHANG.SAN@EXAMPLE.COM")]],
        ),
        (
            "WITH t AS (SELECT id, substr(id_card, 7, 8) AS born FROM customers) SELECT born FROM t WHERE id = 1",
            &[&[Some("19900101")]],
        ),
        (
            "SELECT lag(phone) OVER (ORDER BY id) FROM customers WHERE id IN (1, 2) ORDER BY id",
            &[&[None], &[Some(PHONE)]],
        ),
        (
            "SELECT first_value(phone) OVER (ORDER BY id) FROM customers WHERE id = 1",
            &[&[Some(PHONE)]],
        ),
        (
            "SELECT COALESCE(phone, '-') FROM customers WHERE id = 3",
            &[&[Some("-")]],
        ),
        (
            "SELECT shout FROM v_on_v ORDER BY 1 LIMIT 1",
            &[&[Some("LI.SIGUANG@EXAMPLE.COM")]],
        ),
        (
            "SELECT id FROM customers WHERE phone = '13812345678'",
            &[&[Some("1")]],
        ),
        (
            "SELECT phone FROM customers WHERE phone IS NOT NULL ORDER BY phone LIMIT 1",
            &[&[Some("13700001111")]],
        ),
        (
            "SELECT upper(iban) FROM crm.accounts WHERE id = 1",
            &[&[Some("CN7712345678901234")]],
        ),
        (
            "SELECT upper(\"Phone\") FROM \"Vip\"",
            &[&[Some(VIP_PHONE)]],
        ),
        (
            "SELECT phone FROM customers WHERE id = 1 FOR NO KEY UPDATE",
            &[&[Some(PHONE)]],
        ),
    ];
    for (sql, rows) in expected {
        checks.rows(&attempt(&full, FULL, sql).await, rows);
    }
    checks.rows(
        &attempt_extended(
            &full,
            FULL,
            "SELECT substr(phone, $1, $2) FROM customers WHERE id = 1",
            &[&4i32, &4i32],
        )
        .await,
        &[&[Some("1234")]],
    );
    attempt(
        &full,
        FULL,
        "PREPARE fp AS SELECT substr(phone, 4, 4) FROM customers WHERE id = 1",
    )
    .await;
    checks.rows(
        &attempt(&full, FULL, "EXECUTE fp").await,
        &[&[Some("1234")]],
    );
    attempt(&full, FULL, "BEGIN").await;
    attempt(
        &full,
        FULL,
        "DECLARE fc CURSOR FOR SELECT upper(email) FROM customers WHERE id = 1",
    )
    .await;
    checks.rows(
        &attempt(&full, FULL, "FETCH ALL FROM fc").await,
        &[&[Some("ZHANG.SAN@EXAMPLE.COM")]],
    );
    attempt(&full, FULL, "ROLLBACK").await;

    // COPY in plaintext.
    let outcome = attempt_copy(&full, FULL, "COPY customers TO STDOUT").await;
    checks.that(
        &outcome.label,
        outcome.error.is_none()
            && outcome.rows.len() == CUSTOMERS.len()
            && sorted_lines(&outcome)[0] == format!("1\t张三丰\t{PHONE}\t{EMAIL}\t{ID_CARD}\t北京"),
        format!("expected the plaintext table, got {}", outcome.summary()),
    );
    let outcome = attempt_psql(
        &proxy,
        FULL,
        "COPY (SELECT upper(phone) FROM customers WHERE id = 1) TO STDOUT",
    );
    checks.rows(&outcome, &[&[Some(PHONE)]]);

    // Copies into tables and files hold the plaintext.
    let outcome = attempt(
        &full,
        FULL,
        "CREATE TABLE rt_full_copy1 AS SELECT id, phone FROM customers",
    )
    .await;
    checks.that(
        &outcome.label,
        outcome.error.is_none()
            && cluster()
                .psql_ok("postgres", "SELECT phone FROM rt_full_copy1 WHERE id = 1")
                .trim()
                == PHONE,
        format!("CTAS: {}", outcome.summary()),
    );
    let outcome = attempt(
        &full,
        FULL,
        "SELECT id, upper(email) AS e INTO rt_full_copy2 FROM customers",
    )
    .await;
    checks.that(
        &outcome.label,
        outcome.error.is_none()
            && cluster()
                .psql_ok("postgres", "SELECT e FROM rt_full_copy2 WHERE id = 1")
                .trim()
                == "ZHANG.SAN@EXAMPLE.COM",
        format!("SELECT INTO: {}", outcome.summary()),
    );
    for sql in [
        "INSERT INTO sink_full (x) SELECT phone FROM customers WHERE id = 1",
        "UPDATE sink_full SET x = (SELECT id_card FROM customers WHERE id = 1) WHERE x = 'seed'",
    ] {
        let outcome = attempt(&full, FULL, sql).await;
        checks.that(&outcome.label, outcome.error.is_none(), outcome.summary());
    }
    let sink = cluster().psql_ok("postgres", "SELECT x FROM sink_full ORDER BY x");
    checks.that(
        "[rt_full] sink_full",
        sink.lines().collect::<Vec<_>>() == [ID_CARD, PHONE],
        format!("sink_full holds {sink:?}"),
    );
    let path = server_file("full");
    let outcome = attempt(
        &full,
        FULL,
        &format!(
            "COPY (SELECT phone FROM customers WHERE id = 1) TO '{}'",
            path.display()
        ),
    )
    .await;
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    checks.that(
        &outcome.label,
        outcome.error.is_none() && written == format!("{PHONE}\n"),
        format!("{}; file holds {written:?}", outcome.summary()),
    );
    let _ = std::fs::remove_file(&path);
    cluster().psql_ok(
        "postgres",
        "DROP TABLE IF EXISTS rt_full_copy1, rt_full_copy2; \
         DELETE FROM sink_full; INSERT INTO sink_full VALUES ('seed')",
    );
    checks.finish("full role");
}

#[tokio::test]
async fn a_role_allowed_to_filter_runs_its_conditions_and_sees_masks() {
    let proxy = proxy();
    let snoop = proxy.connect(SNOOP).await;
    let mut checks = Checks::default();
    let allowed: &[(&str, &[&[Option<&str>]])] = &[
        (
            "SELECT id, phone FROM customers WHERE phone = '13812345678'",
            &[&[Some("1"), Some("138****5678")]],
        ),
        (
            "SELECT id FROM customers WHERE phone LIKE '159%'",
            &[&[Some("5")]],
        ),
        (
            "SELECT phone FROM customers WHERE phone IS NOT NULL ORDER BY phone LIMIT 2",
            &[&[Some("137****1111")], &[Some("138****5678")]],
        ),
        (
            "SELECT id FROM customers WHERE email LIKE 'zhao%'",
            &[&[Some("5")]],
        ),
        (
            "SELECT count(*) FROM customers GROUP BY phone IS NULL ORDER BY 1",
            &[&[Some("1")], &[Some("6")]],
        ),
        (
            "SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.phone LIKE '139%'",
            &[&[Some("11")]],
        ),
        (
            "SELECT id, name FROM customers WHERE EXISTS (SELECT 1 FROM customers c2 WHERE c2.phone = '18655556666' AND c2.id = customers.id)",
            &[&[Some("6"), Some("孙*")]],
        ),
    ];
    for (sql, rows) in allowed {
        checks.masked(&attempt(&snoop, SNOOP, sql).await, rows);
    }
    // Filtering is allowed; computing from the column is still not, and id_card stays
    // denied.
    checks.denied(&attempt(&snoop, SNOOP, "SELECT upper(phone) FROM customers").await);
    checks.denied(
        &attempt(
            &snoop,
            SNOOP,
            "SELECT id_card FROM customers WHERE phone = '13812345678'",
        )
        .await,
    );
    checks.finish("filter_on_protected: allow");
}

/// libpq sends Bind, Describe (portal), Execute, Sync: pgveil plans the rows from that
/// description instead of asking again, and still masks or refuses them.
#[tokio::test]
async fn a_portal_described_by_the_client_right_before_execute_is_still_checked() {
    let proxy = proxy();
    let mut raw = RawClient::login(proxy.port, GUEST, "libpq-style");
    let run = |raw: &mut RawClient, sql: &str| {
        let mut parse = cstr("");
        parse.extend(cstr(sql));
        parse.extend([0, 0]);
        let mut bytes = frame(b'P', &parse);
        bytes.extend(frame(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
        bytes.extend(frame(b'D', b"P\0"));
        bytes.extend(frame(b'E', &[0, 0, 0, 0, 0]));
        bytes.extend(frame(b'S', &[]));
        raw.send(&bytes);
        raw.read_until(b'Z')
    };
    let masked = run(&mut raw, "SELECT phone FROM customers WHERE id = 1");
    let text = format!("{masked:?}");
    let row = masked.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(row.body.windows(11).any(|w| w == b"138****5678"), "{text}");
    assert!(!row.body.windows(8).any(|w| w == b"12345678"), "{text}");
    let refused = run(
        &mut raw,
        "SELECT substr(phone, 4, 4) FROM customers WHERE id = 1",
    );
    assert!(!refused.iter().any(|m| m.tag == b'D'), "{refused:?}");
    let error = refused.iter().find(|m| m.tag == b'E').expect("a refusal");
    assert_eq!(error.field(b'C').as_deref(), Some("42501"), "{refused:?}");
    // The session goes on.
    let again = run(&mut raw, "SELECT id FROM customers WHERE id = 1");
    assert!(again.iter().any(|m| m.tag == b'D'), "{again:?}");
}

/// A client whose `client_encoding` is not UTF-8 writes a non-ASCII table name in other
/// bytes than the catalog's UTF-8: pgveil cannot see that name, so for such a session it
/// analyses every statement and refuses the ones it cannot read.
#[tokio::test]
async fn a_non_ascii_table_name_sent_in_another_client_encoding_is_not_missed() {
    const HIDDEN_PHONE: &str = "13912340000";
    let proxy = proxy();
    let mut raw = RawClient::login(proxy.port, GUEST, "latin1 client");
    let query = |raw: &mut RawClient, sql: &[u8]| {
        let mut body = sql.to_vec();
        body.push(0);
        raw.send(&frame(b'Q', &body));
        raw.read_until(b'Z')
    };
    let set = query(&mut raw, b"SET client_encoding = 'LATIN1'");
    assert!(!set.iter().any(|m| m.tag == b'E'), "{set:?}");
    // "clientè" in LATIN1: è is the one byte 0xE8 (0xC3 0xA8 in UTF-8).
    for sql in [
        &b"SELECT phone || '' FROM client\xe8 WHERE id = 1"[..],
        b"SELECT upper(phone), substr(phone, 4) FROM public.client\xe8",
        b"SELECT phone FROM client\xe8 WHERE id = 1",
    ] {
        let messages = query(&mut raw, sql);
        let shown = String::from_utf8_lossy(sql).into_owned();
        assert!(
            !messages.iter().any(|m| m.tag == b'D'),
            "{shown}: {messages:?}"
        );
        for message in &messages {
            let body = String::from_utf8_lossy(&message.body);
            assert!(
                !body.contains(HIDDEN_PHONE) && !body.contains("12340000"),
                "{shown}: plaintext in {message:?}"
            );
        }
        let error = messages.iter().find(|m| m.tag == b'E').expect("a refusal");
        assert_eq!(
            error.field(b'C').as_deref(),
            Some("42501"),
            "{shown}: {messages:?}"
        );
        assert!(
            error.field(b'M').is_some_and(|m| m.starts_with("pgveil:")),
            "{shown}: {messages:?}"
        );
    }
    // The session goes on: ASCII statements are analysed and masked as ever.
    let masked = query(&mut raw, b"SELECT phone FROM customers WHERE id = 1");
    let row = masked.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(
        row.body.windows(11).any(|w| w == b"138****5678"),
        "{masked:?}"
    );
    let computed = query(&mut raw, b"SELECT phone || '' FROM customers WHERE id = 1");
    assert!(!computed.iter().any(|m| m.tag == b'D'), "{computed:?}");
}
