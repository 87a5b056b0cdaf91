//! `pgveil encrypt` and `pgveil reencrypt`: the migration of the values already stored in
//! a protected table's encrypted columns.
//!
//! `encrypt` turns the plaintext values of a table's `encrypt:` columns into envelopes in
//! place (first widening column types that cannot hold ciphertext to `text`);
//! `reencrypt` moves envelopes under older keys to the active key. Both read the table
//! in batches, each batch its own transaction (`SELECT … FOR UPDATE`, one `UPDATE`,
//! `COMMIT`), so a run that is interrupted keeps what it committed, and both are
//! idempotent: every stored value is classified first, an envelope is never encrypted
//! again, and a rerun only skips what is done. There is no checkpoint table; a rerun
//! scans from the start.
//!
//! What this module must never do: log, print or put into an error any value, plaintext
//! or ciphertext (errors name the table, the column and the row's key, or its ctid when
//! the key is itself protected); write a value it could not classify (bytes that carry
//! an envelope header but do not authenticate, or text that starts with `pgv1:` but is
//! no envelope, stop the run); or encrypt anything but the value's canonical text.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use thiserror::Error;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, Row, Statement};
use tracing::{debug, info};
use zeroize::Zeroizing;

use crate::catalog::connect::CatalogLogin;
use crate::catalog::snapshot::logical_type_matches;
use crate::catalog::CatalogError;
use crate::config::Config;
use crate::policy::file::EncryptMode;
use crate::policy::{ColumnId, Policy, PolicyError, LOGICAL_TYPES};
use crate::protect::column_crypto::{Ciphers, ColumnCrypto};
use crate::protect::envelope::{self, DecryptError, EncryptError, TEXT_PREFIX};
use crate::protect::keyring::{Keyring, KeyringError};
use crate::protect::logical::{LogicalType, ValueError};

/// Rows per batch when `--batch` is not given.
pub const DEFAULT_BATCH: u64 = 1000;

/// Session settings of the migration's connection: `::text` of any supported type then
/// gives text the canonicaliser reads (ISO dates, timestamptz with its offset, floats
/// that round-trip), and key values round-trip through text.
const SESSION_SETTINGS: &str = "SET application_name = 'pgveil-migrate'; \
     SET DateStyle = 'ISO, MDY'; SET IntervalStyle = postgres; \
     SET extra_float_digits = 3; SET TimeZone = 'UTC'";

/// Which command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Encrypt plaintext values; envelopes under any key are left as they are.
    Encrypt,
    /// Move envelopes under older keys to the active key; plaintext is only counted.
    Reencrypt,
}

impl Mode {
    pub fn command(self) -> &'static str {
        match self {
            Mode::Encrypt => "encrypt",
            Mode::Reencrypt => "reencrypt",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// `schema.table` as the policy names it (`table` alone means `public.table`).
    pub table: String,
    /// Database to connect to; `catalog.database` of the config when `None`.
    pub database: Option<String>,
    /// Rows per batch (about that many for a table read by ctid ranges).
    pub batch: u64,
}

/// How far a run is, after each batch.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub rows: u64,
    /// Rows in the table when the run started (an estimate for large tables).
    pub estimated_rows: u64,
    pub elapsed: Duration,
}

/// One encrypted column of the migrated table.
#[derive(Debug, Clone)]
pub struct ColumnReport {
    pub name: String,
    pub encrypt: &'static str,
    /// The type clients see.
    pub logical: &'static str,
    /// The column's type before the run widened it to `text`.
    pub widened_from: Option<String>,
}

/// What a run did; printed at the end.
#[derive(Debug, Clone)]
pub struct Report {
    pub mode: Mode,
    pub table: String,
    pub database: String,
    pub active_key: String,
    /// How rows were paged: `primary key (id)` or `ctid ranges (no primary key)`.
    pub scan: String,
    pub columns: Vec<ColumnReport>,
    pub rows: u64,
    /// Values encrypted (encrypt) or moved to the active key (reencrypt).
    pub written: u64,
    /// Values left as they were: already an envelope (encrypt), or already under the
    /// active key (reencrypt).
    pub skipped: u64,
    pub nulls: u64,
    /// Plaintext values found by `reencrypt`, which it does not encrypt.
    pub plaintext: u64,
    /// Row versions this run's own updates moved further ahead in a ctid scan, read
    /// again there and found done (not counted in `rows` and the value counts).
    pub revisited: u64,
    pub batches: u64,
    /// Time spent reading and writing batches (widening not included).
    pub elapsed: Duration,
    /// Time the `ALTER TABLE` widening columns took, when it ran.
    pub widening: Option<Duration>,
}

impl Report {
    pub fn rows_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.rows as f64 / seconds
        } else {
            0.0
        }
    }

    pub fn widened(&self) -> impl Iterator<Item = &ColumnReport> {
        self.columns.iter().filter(|c| c.widened_from.is_some())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "pgveil {}: {} in database {} (active key {}, rows read by {})",
            self.mode.command(),
            self.table,
            self.database,
            self.active_key,
            self.scan
        )?;
        for column in &self.columns {
            write!(
                f,
                "  column {}: {}, clients see {}",
                column.name, column.encrypt, column.logical
            )?;
            if let Some(from) = &column.widened_from {
                write!(f, "; widened from {from} to text")?;
            }
            writeln!(f)?;
        }
        writeln!(f, "rows scanned: {}", self.rows)?;
        match self.mode {
            Mode::Encrypt => {
                writeln!(f, "values encrypted: {}", self.written)?;
                writeln!(f, "values already encrypted (skipped): {}", self.skipped)?;
            }
            Mode::Reencrypt => {
                writeln!(f, "values re-encrypted: {}", self.written)?;
                writeln!(
                    f,
                    "values already under the active key (skipped): {}",
                    self.skipped
                )?;
                writeln!(f, "plaintext values (not encrypted): {}", self.plaintext)?;
            }
        }
        writeln!(f, "NULL values: {}", self.nulls)?;
        if self.revisited > 0 {
            writeln!(
                f,
                "rows this run moved ahead and read again (not counted above): {}",
                self.revisited
            )?;
        }
        writeln!(f, "batches: {}", self.batches)?;
        if let Some(widening) = self.widening {
            writeln!(f, "widening: {:.2} s", widening.as_secs_f64())?;
        }
        writeln!(f, "elapsed: {:.2} s", self.elapsed.as_secs_f64())?;
        write!(f, "rows/s: {:.0}", self.rows_per_second())
    }
}

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("the config names no policy (`policy:`), so no column is encrypted")]
    NoPolicy,
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error("{0} needs a keyring: set `keyring` in the config, or PGVEIL_KEYRING")]
    NoKeyring(&'static str),
    #[error("{table} is not a table of the policy {policy} (its tables: {known})")]
    NotProtected {
        table: String,
        policy: String,
        known: String,
    },
    #[error("no database to connect to: give --database or set catalog.database in the config")]
    NoDatabase,
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{table}: {problem}{}", committed_note(*.written))]
    Table {
        table: String,
        problem: Problem,
        /// Values written (and committed) before the problem stopped the run.
        written: u64,
    },
}

fn committed_note(written: u64) -> String {
    if written == 0 {
        String::new()
    } else {
        format!(" ({written} values written before this stay committed; a rerun skips them)")
    }
}

/// What stops a run on one table. Never holds a value.
#[derive(Debug, Error)]
pub enum Problem {
    #[error("the policy encrypts none of its columns (no `encrypt:`)")]
    NothingEncrypted,
    #[error("no such table in database {database}")]
    NoSuchTable { database: String },
    #[error("is a {kind}, not a table")]
    NotATable { kind: &'static str },
    #[error("has inheritance children, which this command does not migrate; migrate a table without children")]
    InheritanceChildren,
    #[error("is partitioned and has no primary key; add one (tables without one are read by ctid, which partitioned tables do not have)")]
    PartitionedWithoutKey,
    #[error("column {column} does not exist")]
    MissingColumn { column: String },
    #[error("column {column} is a generated column, which cannot be encrypted")]
    Generated { column: String },
    #[error("column {column} ({stored}) has a default, which after widening to text would store plaintext; drop the default first (ALTER TABLE … ALTER COLUMN {column} DROP DEFAULT)")]
    HasDefault { column: String, stored: String },
    #[error("column {column} is {stored}, which must be widened to text to hold ciphertext: add `type: {suggestion}` to it in the policy first, so clients keep seeing {suggestion} and not text; nothing was changed")]
    TypeNeeded {
        column: String,
        stored: String,
        suggestion: &'static str,
    },
    #[error("column {column} is {stored}, which cannot hold ciphertext, and no `type:` pgveil supports ({}) describes it; change it to text yourself if clients may see text; nothing was changed", LOGICAL_TYPES.join(", "))]
    NoLogicalType { column: String, stored: String },
    #[error("column {column} is {stored} in the database but `type: {declared}` in the policy; make them agree before widening; nothing was changed")]
    TypeMismatch {
        column: String,
        stored: String,
        declared: String,
    },
    #[error("column {column} cannot be encrypted: {reason}")]
    Unusable { column: String, reason: String },
    #[error("{step}: {message}")]
    Server { step: String, message: String },
    #[error("column {column}, {row}: the stored plaintext is not a valid {logical}: {error} ({}); fix that value and run again", .error.sqlstate)]
    Value {
        column: String,
        row: String,
        logical: &'static str,
        error: ValueError,
    },
    #[error("column {column}, {row}: stored ciphertext does not decrypt ({error}); it is never encrypted again: restore the value, or set it to NULL")]
    Ciphertext {
        column: String,
        row: String,
        error: DecryptError,
    },
    #[error("column {column}, {row}: the value starts with `{TEXT_PREFIX}` but is not a pgveil envelope; pgveil cannot tell plaintext from damaged ciphertext there")]
    Malformed { column: String, row: String },
    #[error("column {column}, {row}: plaintext in a bytea column with `type: {logical}` cannot be read as a {logical}")]
    ByteaPlaintext {
        column: String,
        row: String,
        logical: &'static str,
    },
    #[error("column {column}: cannot encrypt: {error}")]
    Encrypt { column: String, error: EncryptError },
    #[error("the update of a batch changed {updated} rows instead of {expected}; nothing of that batch was written")]
    RowsMoved { expected: u64, updated: u64 },
}

/// A server error as one line without values: its message and SQLSTATE, never its
/// DETAIL (which may quote a row); data exceptions (class 22) lose their message too,
/// since PostgreSQL puts the offending value into it.
fn server_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) if db.code().code().starts_with("22") => {
            format!("the server refused a value ({})", db.code().code())
        }
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// `"name"`, doubled quotes inside.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Any column value in binary format, as the bytes the server sent: text types give
/// their text, bytea its bytes.
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Raw(raw))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A parameter sent as binary bytes read from the same column (primary key values).
#[derive(Debug, Clone)]
struct RawParam(Vec<u8>);

impl ToSql for RawParam {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    tokio_postgres::types::to_sql_checked!();
}

/// The table as the catalog describes it.
struct Relation {
    oid: u32,
    /// `ONLY "schema"."name"` for a plain table, `"schema"."name"` for a partitioned one.
    target: String,
    partitioned: bool,
    estimated_rows: u64,
}

struct Attribute {
    stored: String,
    generated: bool,
    has_default: bool,
}

/// One encrypted column being migrated.
struct Column {
    name: String,
    quoted: String,
    crypto: Arc<ColumnCrypto>,
}

/// How rows are paged.
enum Scan {
    /// By the primary key's columns (quoted), from after the last key seen.
    Key {
        columns: Vec<String>,
        /// The key may be named in errors (none of its columns is protected).
        printable: bool,
        first: Statement,
        next: Statement,
        last: Option<Vec<RawParam>>,
    },
    /// By ranges of heap pages.
    Ctid {
        next_block: u64,
        pages: u64,
        range: Statement,
        open_ended: Statement,
        /// Where this run's updates put new row versions ahead of the scan: block →
        /// bitset of line pointers. Such a version is read again; it is still
        /// classified, but counted apart when it is found done.
        moved: BTreeMap<u32, Vec<u64>>,
    },
}

/// `(block,offset)`, as `tid` prints.
fn parse_tid(text: &str) -> Option<(u32, u16)> {
    let (block, offset) = text.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    Some((block.parse().ok()?, offset.parse().ok()?))
}

fn mark_moved(moved: &mut BTreeMap<u32, Vec<u64>>, (block, offset): (u32, u16)) {
    let bits = moved.entry(block).or_default();
    let word = usize::from(offset / 64);
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    bits[word] |= 1 << (offset % 64);
}

fn was_moved(moved: &BTreeMap<u32, Vec<u64>>, (block, offset): (u32, u16)) -> bool {
    moved
        .get(&block)
        .and_then(|bits| bits.get(usize::from(offset / 64)))
        .is_some_and(|word| word & (1 << (offset % 64)) != 0)
}

/// What the run counts.
#[derive(Default)]
struct Counts {
    rows: u64,
    written: u64,
    skipped: u64,
    nulls: u64,
    plaintext: u64,
    revisited: u64,
    batches: u64,
}

/// What to do with one stored value.
enum Step {
    Null,
    Skip,
    Plaintext,
    Write(Stored),
}

/// The stored form of a new envelope.
#[derive(Clone)]
enum Stored {
    Text(String),
    Bytea(Vec<u8>),
}

/// Runs `options.mode` on one table; `on_batch` is called after every committed batch.
pub async fn run(
    config: &Config,
    options: &Options,
    on_batch: &mut dyn FnMut(Progress),
) -> Result<Report, MigrateError> {
    let policy_path = config.policy.as_deref().ok_or(MigrateError::NoPolicy)?;
    let policy = Policy::load(policy_path)?;
    let keyring = Keyring::from_env_or_file(config.keyring.as_deref())?
        .ok_or(MigrateError::NoKeyring(options.mode.command()))?;
    let table_index =
        find_table(&policy, &options.table).ok_or_else(|| MigrateError::NotProtected {
            table: options.table.clone(),
            policy: policy_path.display().to_string(),
            known: policy
                .tables
                .iter()
                .map(|t| t.qualified())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let table = &policy.tables[table_index];
    let label = table.qualified();
    let fail = |problem: Problem| MigrateError::Table {
        table: label.clone(),
        problem,
        written: 0,
    };
    let encrypted: Vec<ColumnId> = table
        .columns
        .iter()
        .copied()
        .filter(|&id| policy.columns[id].encrypt != EncryptMode::None)
        .collect();
    if encrypted.is_empty() {
        return Err(fail(Problem::NothingEncrypted));
    }
    let login = CatalogLogin::from_config(config)?;
    let database = options
        .database
        .clone()
        .or_else(|| login.database.clone())
        .ok_or(MigrateError::NoDatabase)?;
    let mut client = login.connect(&database).await?;
    let server = |step: &str| {
        let step = step.to_string();
        let label = label.clone();
        move |error: tokio_postgres::Error| MigrateError::Table {
            table: label,
            problem: Problem::Server {
                step,
                message: server_message(&error),
            },
            written: 0,
        }
    };
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(server("session settings"))?;

    let relation = lookup_relation(&client, &table.schema, &table.name, &database)
        .await
        .map_err(|e| e.on(&label))?;
    let attributes = lookup_attributes(&client, relation.oid)
        .await
        .map_err(|e| e.on(&label))?;

    // Every column is checked before anything changes.
    let mut widen: Vec<(ColumnId, String)> = Vec::new();
    let mut stored_types: HashMap<ColumnId, String> = HashMap::new();
    for &id in &encrypted {
        let column = &policy.columns[id];
        let Some(attribute) = attributes.get(&column.name) else {
            return Err(fail(Problem::MissingColumn {
                column: column.name.clone(),
            }));
        };
        if attribute.generated {
            return Err(fail(Problem::Generated {
                column: column.name.clone(),
            }));
        }
        let stored = attribute.stored.clone();
        match storage_of(&stored) {
            Storage::Holds => {
                stored_types.insert(id, stored);
                continue;
            }
            Storage::WidenText => {}
            Storage::WidenTyped => match &column.logical_type {
                None => {
                    return Err(fail(match suggested_type(&stored) {
                        Some(suggestion) => Problem::TypeNeeded {
                            column: column.name.clone(),
                            stored,
                            suggestion,
                        },
                        None => Problem::NoLogicalType {
                            column: column.name.clone(),
                            stored,
                        },
                    }))
                }
                Some(declared) if !logical_type_matches(declared, &stored) => {
                    return Err(fail(match suggested_type(&stored) {
                        Some(_) => Problem::TypeMismatch {
                            column: column.name.clone(),
                            stored,
                            declared: declared.clone(),
                        },
                        None => Problem::NoLogicalType {
                            column: column.name.clone(),
                            stored,
                        },
                    }));
                }
                Some(_) => {}
            },
        }
        if options.mode == Mode::Reencrypt {
            // A column that cannot hold ciphertext holds no envelope to move.
            return Err(fail(Problem::Unusable {
                column: column.name.clone(),
                reason: format!(
                    "it is {stored}, which cannot hold ciphertext: run `pgveil encrypt` first"
                ),
            }));
        }
        if attribute.has_default {
            return Err(fail(Problem::HasDefault {
                column: column.name.clone(),
                stored,
            }));
        }
        stored_types.insert(id, "text".to_string());
        widen.push((id, stored));
    }
    let mut widening = None;
    if !widen.is_empty() {
        let started = Instant::now();
        widen_columns(&mut client, &relation, &policy, &widen)
            .await
            .map_err(server("widening to text"))?;
        for (id, from) in &widen {
            info!(table = %label, column = %policy.columns[*id].name, %from, "widened to text");
        }
        widening = Some(started.elapsed());
    }

    let ciphers = Ciphers::build(&policy, &stored_types, Some(&keyring));
    let mut columns = Vec::with_capacity(encrypted.len());
    let mut reports = Vec::with_capacity(encrypted.len());
    for &id in &encrypted {
        let column = &policy.columns[id];
        let crypto = ciphers.get(id).cloned().ok_or_else(|| {
            fail(Problem::Unusable {
                column: column.name.clone(),
                reason: ciphers
                    .unusable
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| "unknown reason".to_string()),
            })
        })?;
        reports.push(ColumnReport {
            name: column.name.clone(),
            encrypt: crypto.cipher.mode().name(),
            logical: crypto.logical.name(),
            widened_from: widen
                .iter()
                .find(|(w, _)| *w == id)
                .map(|(_, from)| from.clone()),
        });
        columns.push(Column {
            name: column.name.clone(),
            quoted: quote_ident(&column.name),
            crypto,
        });
    }

    let protected_names: Vec<&str> = table
        .columns
        .iter()
        .map(|&id| policy.columns[id].name.as_str())
        .collect();
    let key = primary_key(&client, relation.oid)
        .await
        .map_err(|e| e.on(&label))?;
    let key_usable = !key.is_empty()
        && !key
            .iter()
            .any(|k| encrypted.iter().any(|&id| policy.columns[id].name == *k));
    if relation.partitioned && !key_usable {
        return Err(fail(Problem::PartitionedWithoutKey));
    }
    let value_list = columns
        .iter()
        .map(|c| format!("t.{}", c.quoted))
        .collect::<Vec<_>>()
        .join(", ");
    let (mut scan, scan_label) = if key_usable {
        let quoted: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
        let key_text = quoted
            .iter()
            .map(|k| format!("t.{k}::text"))
            .collect::<Vec<_>>()
            .join(", ");
        let key_raw = quoted
            .iter()
            .map(|k| format!("t.{k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let params = (1..=quoted.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let select = format!(
            "SELECT t.tableoid, t.ctid::text, {key_text}, {key_raw}, {value_list} FROM {} AS t",
            relation.target
        );
        let first = client
            .prepare(&format!(
                "{select} ORDER BY {key_raw} LIMIT $1 FOR UPDATE OF t"
            ))
            .await
            .map_err(server("preparing the scan"))?;
        let next = client
            .prepare(&format!(
                "{select} WHERE ({key_raw}) > ({params}) ORDER BY {key_raw} LIMIT ${} FOR UPDATE OF t",
                quoted.len() + 1
            ))
            .await
            .map_err(server("preparing the scan"))?;
        let printable = !key.iter().any(|k| protected_names.contains(&k.as_str()));
        (
            Scan::Key {
                columns: key.clone(),
                printable,
                first,
                next,
                last: None,
            },
            format!("primary key ({})", key.join(", ")),
        )
    } else {
        let select = format!(
            "SELECT t.tableoid, t.ctid::text, {value_list} FROM {} AS t WHERE t.ctid >= $1::text::tid",
            relation.target
        );
        let range = client
            .prepare(&format!(
                "{select} AND t.ctid < $2::text::tid FOR UPDATE OF t"
            ))
            .await
            .map_err(server("preparing the scan"))?;
        let open_ended = client
            .prepare(&format!("{select} FOR UPDATE OF t"))
            .await
            .map_err(server("preparing the scan"))?;
        let rows_per_page = (relation.estimated_rows
            / lookup_blocks(&client, relation.oid)
                .await
                .map_err(server("reading the table size"))?
                .max(1))
        .max(1);
        (
            Scan::Ctid {
                next_block: 0,
                pages: (options.batch / rows_per_page).max(1),
                range,
                open_ended,
                moved: BTreeMap::new(),
            },
            if key.is_empty() {
                "ctid ranges (no primary key)".to_string()
            } else {
                "ctid ranges (the primary key is encrypted)".to_string()
            },
        )
    };

    info!(table = %label, %database, mode = options.mode.command(), scan = %scan_label, "migration starts");
    let started = Instant::now();
    let mut counts = Counts::default();
    let mut updates: HashMap<Vec<bool>, Statement> = HashMap::new();
    let key_len = match &scan {
        Scan::Key { columns, .. } => columns.len(),
        Scan::Ctid { .. } => 0,
    };
    loop {
        let written_before = counts.written;
        let more = run_batch(
            &mut client,
            &relation,
            &mut scan,
            key_len,
            &columns,
            options,
            &mut counts,
            &mut updates,
        )
        .await
        .map_err(|problem| MigrateError::Table {
            table: label.clone(),
            problem,
            written: counts.written,
        })?;
        debug!(
            table = %label,
            batch = counts.batches,
            rows = counts.rows,
            written = counts.written - written_before,
            "batch committed"
        );
        on_batch(Progress {
            rows: counts.rows,
            estimated_rows: relation.estimated_rows,
            elapsed: started.elapsed(),
        });
        if !more {
            break;
        }
    }
    let report = Report {
        mode: options.mode,
        table: label.clone(),
        database,
        active_key: keyring.active_id().to_string(),
        scan: scan_label,
        columns: reports,
        rows: counts.rows,
        written: counts.written,
        skipped: counts.skipped,
        nulls: counts.nulls,
        plaintext: counts.plaintext,
        revisited: counts.revisited,
        batches: counts.batches,
        elapsed: started.elapsed(),
        widening,
    };
    // Debug only: the report says it all, and an info line would land on the progress line.
    debug!(
        table = %label,
        rows = report.rows,
        written = report.written,
        skipped = report.skipped,
        "migration finished"
    );
    Ok(report)
}

/// The policy table `name` designates: `schema.table` exactly as the policy writes it,
/// or a bare name in schema `public`.
fn find_table(policy: &Policy, name: &str) -> Option<usize> {
    let exact = policy.tables.iter().position(|t| t.qualified() == name);
    exact.or_else(|| {
        if name.contains('.') {
            return None;
        }
        policy
            .tables
            .iter()
            .position(|t| t.schema == "public" && t.name == name)
    })
}

enum Storage {
    /// text, unlimited varchar, bytea: holds ciphertext as it is.
    Holds,
    /// varchar(n), char(n): widened to text without a declared type.
    WidenText,
    /// Any other type: widened to text only with a matching `type:`.
    WidenTyped,
}

fn storage_of(stored: &str) -> Storage {
    match stored {
        "text" | "character varying" | "bytea" => Storage::Holds,
        s if s.starts_with("character varying(")
            || s == "character"
            || s.starts_with("character(") =>
        {
            Storage::WidenText
        }
        _ => Storage::WidenTyped,
    }
}

/// The policy `type:` that describes a stored type, if pgveil supports one.
fn suggested_type(stored: &str) -> Option<&'static str> {
    LOGICAL_TYPES
        .iter()
        .copied()
        .find(|logical| logical_type_matches(logical, stored))
}

/// A catalog read failed; `on` adds the table.
struct LookupError(Problem);

impl LookupError {
    fn on(self, table: &str) -> MigrateError {
        MigrateError::Table {
            table: table.to_string(),
            problem: self.0,
            written: 0,
        }
    }
}

fn lookup_failed(step: &str) -> impl Fn(tokio_postgres::Error) -> LookupError + '_ {
    move |error| {
        LookupError(Problem::Server {
            step: step.to_string(),
            message: server_message(&error),
        })
    }
}

async fn lookup_relation(
    client: &Client,
    schema: &str,
    name: &str,
    database: &str,
) -> Result<Relation, LookupError> {
    let failed = lookup_failed("reading the catalog");
    let row = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, c.reltuples::float8, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhparent = c.oid) \
               FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await
        .map_err(&failed)?
        .ok_or_else(|| {
            LookupError(Problem::NoSuchTable {
                database: database.to_string(),
            })
        })?;
    let oid: u32 = row.try_get(0).map_err(&failed)?;
    let kind: String = row.try_get(1).map_err(&failed)?;
    let reltuples: f64 = row.try_get(2).map_err(&failed)?;
    let has_children: bool = row.try_get(3).map_err(&failed)?;
    let partitioned = match kind.as_str() {
        "r" => false,
        "p" => true,
        other => {
            return Err(LookupError(Problem::NotATable {
                kind: match other {
                    "v" => "view",
                    "m" => "materialized view",
                    "f" => "foreign table",
                    "S" => "sequence",
                    "i" | "I" => "index",
                    _ => "relation of another kind",
                },
            }))
        }
    };
    if has_children && !partitioned {
        return Err(LookupError(Problem::InheritanceChildren));
    }
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(name));
    let estimated_rows = if reltuples > 0.0 {
        reltuples as u64
    } else {
        // Never analysed (or empty): count, for the progress display.
        let row = client
            .query_one(&format!("SELECT count(*) FROM {qualified}"), &[])
            .await
            .map_err(lookup_failed("counting rows"))?;
        let count: i64 = row.try_get(0).map_err(lookup_failed("counting rows"))?;
        u64::try_from(count).unwrap_or(0)
    };
    Ok(Relation {
        oid,
        target: if partitioned {
            qualified
        } else {
            format!("ONLY {qualified}")
        },
        partitioned,
        estimated_rows,
    })
}

async fn lookup_attributes(
    client: &Client,
    oid: u32,
) -> Result<HashMap<String, Attribute>, LookupError> {
    let failed = lookup_failed("reading the table's columns");
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    a.attgenerated <> '', a.atthasdef \
               FROM pg_catalog.pg_attribute a \
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await
        .map_err(&failed)?;
    let mut attributes = HashMap::with_capacity(rows.len());
    for row in rows {
        let generated: bool = row.try_get(2).map_err(&failed)?;
        let has_default: bool = row.try_get(3).map_err(&failed)?;
        attributes.insert(
            row.try_get::<_, String>(0).map_err(&failed)?,
            Attribute {
                stored: row.try_get(1).map_err(&failed)?,
                generated,
                // A generated column's expression is also stored as a default.
                has_default: has_default && !generated,
            },
        );
    }
    Ok(attributes)
}

/// The primary key's column names in key order; empty without one.
async fn primary_key(client: &Client, oid: u32) -> Result<Vec<String>, LookupError> {
    let failed = lookup_failed("reading the primary key");
    let rows = client
        .query(
            "SELECT a.attname::text \
               FROM pg_catalog.pg_index i \
               CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
              WHERE i.indrelid = $1 AND i.indisprimary \
              ORDER BY k.ord",
            &[&oid],
        )
        .await
        .map_err(&failed)?;
    rows.iter()
        .map(|row| row.try_get::<_, String>(0).map_err(&failed))
        .collect()
}

async fn lookup_blocks(client: &Client, oid: u32) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_relation_size($1::oid::regclass) \
                    / current_setting('block_size')::int8",
            &[&oid],
        )
        .await?;
    let blocks: i64 = row.try_get(0)?;
    Ok(u64::try_from(blocks).unwrap_or(0))
}

/// One `ALTER TABLE` for every column to widen (one table rewrite), in its own
/// transaction, under the session's settings.
async fn widen_columns(
    client: &mut Client,
    relation: &Relation,
    policy: &Policy,
    widen: &[(ColumnId, String)],
) -> Result<(), tokio_postgres::Error> {
    let clauses = widen
        .iter()
        .map(|(id, _)| {
            let quoted = quote_ident(&policy.columns[*id].name);
            format!("ALTER COLUMN {quoted} TYPE text USING {quoted}::text")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let transaction = client.transaction().await?;
    transaction
        .batch_execute(&format!("ALTER TABLE {} {clauses}", relation.target))
        .await?;
    transaction.commit().await
}

/// Reads, classifies and writes one batch in one transaction. `Ok(false)` when the
/// table has been read to its end.
#[allow(clippy::too_many_arguments)]
async fn run_batch(
    client: &mut Client,
    relation: &Relation,
    scan: &mut Scan,
    key_len: usize,
    columns: &[Column],
    options: &Options,
    counts: &mut Counts,
    updates: &mut HashMap<Vec<bool>, Statement>,
) -> Result<bool, Problem> {
    let server = |step: &'static str| {
        move |error: tokio_postgres::Error| Problem::Server {
            step: step.to_string(),
            message: server_message(&error),
        }
    };
    let limit = i64::try_from(options.batch).unwrap_or(i64::MAX);
    let blocks = match scan {
        Scan::Ctid { .. } => Some(
            lookup_blocks(client, relation.oid)
                .await
                .map_err(server("reading the table size"))?,
        ),
        Scan::Key { .. } => None,
    };
    let transaction = client
        .transaction()
        .await
        .map_err(server("starting a batch"))?;
    let rows: Vec<Row> = match scan {
        Scan::Key {
            first, next, last, ..
        } => match last {
            None => transaction.query(&*first, &[&limit]).await,
            Some(last) => {
                let mut params: Vec<&(dyn ToSql + Sync)> =
                    last.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                params.push(&limit);
                transaction.query(&*next, &params).await
            }
        }
        .map_err(server("reading a batch"))?,
        Scan::Ctid {
            next_block,
            pages,
            range,
            open_ended,
            ..
        } => {
            let blocks = blocks.unwrap_or(0);
            if *next_block >= blocks {
                transaction
                    .rollback()
                    .await
                    .map_err(server("ending the scan"))?;
                return Ok(false);
            }
            let from = format!("({next_block},0)");
            let end = next_block.saturating_add(*pages);
            if end > u64::from(u32::MAX) {
                transaction.query(&*open_ended, &[&from]).await
            } else {
                let to = format!("({end},0)");
                transaction.query(&*range, &[&from, &to]).await
            }
            .map_err(server("reading a batch"))?
        }
    };
    counts.batches += 1;

    // Offsets in each row: tableoid, ctid, key texts, key values, encrypted columns.
    let values_at = 2 + 2 * key_len;
    let mut changed = vec![false; columns.len()];
    let mut relations: Vec<u32> = Vec::new();
    let mut tids: Vec<String> = Vec::new();
    let mut new_values: Vec<Vec<Option<Stored>>> = vec![Vec::new(); columns.len()];
    for row in &rows {
        let mut steps: Vec<Step> = Vec::with_capacity(columns.len());
        for (index, column) in columns.iter().enumerate() {
            let raw: Option<Raw> = row
                .try_get(values_at + index)
                .map_err(server("reading a value"))?;
            steps.push(
                classify(column, raw.map(|r| r.0), options.mode)
                    .map_err(|fault| fault.into_problem(column, || row_label(scan, row)))?,
            );
        }
        let done = steps
            .iter()
            .all(|step| matches!(step, Step::Null | Step::Skip));
        if done && revisited(scan, row) {
            counts.revisited += 1;
            continue;
        }
        counts.rows += 1;
        let mut row_changes: Vec<Option<Stored>> = Vec::with_capacity(columns.len());
        for (index, step) in steps.into_iter().enumerate() {
            row_changes.push(match step {
                Step::Null => {
                    counts.nulls += 1;
                    None
                }
                Step::Skip => {
                    counts.skipped += 1;
                    None
                }
                Step::Plaintext => {
                    counts.plaintext += 1;
                    None
                }
                Step::Write(stored) => {
                    changed[index] = true;
                    Some(stored)
                }
            });
        }
        if row_changes.iter().any(Option::is_some) {
            relations.push(row.try_get(0).map_err(server("reading a row"))?);
            tids.push(row.try_get(1).map_err(server("reading a row"))?);
            for (index, change) in row_changes.into_iter().enumerate() {
                new_values[index].push(change);
            }
        }
    }

    let mut written = 0u64;
    if !tids.is_empty() {
        let statement = match updates.get(&changed) {
            Some(statement) => statement.clone(),
            None => {
                let sql = update_sql(relation, columns, &changed);
                let statement = transaction
                    .prepare(&sql)
                    .await
                    .map_err(server("preparing the update"))?;
                updates.insert(changed.clone(), statement.clone());
                statement
            }
        };
        let mut text_arrays: Vec<Vec<Option<String>>> = Vec::new();
        let mut bytea_arrays: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
        for (index, column) in columns.iter().enumerate() {
            if !changed[index] {
                continue;
            }
            let values = std::mem::take(&mut new_values[index]);
            written += values.iter().filter(|v| v.is_some()).count() as u64;
            if column.crypto.bytea {
                bytea_arrays.push(
                    values
                        .into_iter()
                        .map(|v| match v {
                            Some(Stored::Bytea(bytes)) => Some(bytes),
                            _ => None,
                        })
                        .collect(),
                );
            } else {
                text_arrays.push(
                    values
                        .into_iter()
                        .map(|v| match v {
                            Some(Stored::Text(text)) => Some(text),
                            _ => None,
                        })
                        .collect(),
                );
            }
        }
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&relations, &tids];
        let (mut texts, mut byteas) = (text_arrays.iter(), bytea_arrays.iter());
        for (index, column) in columns.iter().enumerate() {
            if !changed[index] {
                continue;
            }
            let param: Option<&(dyn ToSql + Sync)> = if column.crypto.bytea {
                byteas.next().map(|a| a as &(dyn ToSql + Sync))
            } else {
                texts.next().map(|a| a as &(dyn ToSql + Sync))
            };
            if let Some(param) = param {
                params.push(param);
            }
        }
        let new_rows = transaction
            .query(&statement, &params)
            .await
            .map_err(server("writing a batch"))?;
        let expected = tids.len() as u64;
        let updated = new_rows.len() as u64;
        if let Scan::Ctid {
            next_block,
            pages,
            moved,
            ..
        } = scan
        {
            // New versions at or after the end of this range will be read again.
            let end = next_block.saturating_add(*pages);
            for row in &new_rows {
                let tid: String = row.try_get(0).map_err(server("reading a row"))?;
                if let Some(tid) = parse_tid(&tid).filter(|(block, _)| u64::from(*block) >= end) {
                    mark_moved(moved, tid);
                }
            }
        }
        if updated != expected {
            transaction
                .rollback()
                .await
                .map_err(server("rolling back a batch"))?;
            return Err(Problem::RowsMoved { expected, updated });
        }
    }

    // Where the next batch starts.
    let more = match scan {
        Scan::Key { last, .. } => match rows.last() {
            Some(row) if rows.len() as u64 >= options.batch => {
                let mut key = Vec::with_capacity(key_len);
                for index in 0..key_len {
                    let raw: Raw = row
                        .try_get(2 + key_len + index)
                        .map_err(server("reading a key"))?;
                    key.push(RawParam(raw.0.to_vec()));
                }
                *last = Some(key);
                true
            }
            _ => false,
        },
        Scan::Ctid {
            next_block,
            pages,
            moved,
            ..
        } => {
            *next_block = next_block.saturating_add(*pages);
            *moved = match u32::try_from(*next_block) {
                Ok(block) => moved.split_off(&block),
                Err(_) => BTreeMap::new(),
            };
            // Aim at `batch` rows per range: fewer rows, more pages; never more than
            // four times as many pages at once.
            let found = rows.len() as u64;
            *pages = if found == 0 {
                pages.saturating_mul(2)
            } else {
                (*pages)
                    .saturating_mul(options.batch)
                    .checked_div(found)
                    .unwrap_or(1)
                    .clamp(1, pages.saturating_mul(4))
            }
            .min(1 << 20);
            true
        }
    };
    transaction
        .commit()
        .await
        .map_err(server("committing a batch"))?;
    counts.written += written;
    Ok(more)
}

/// `UPDATE … FROM unnest(…)` of the columns `changed` marks, rows found by tableoid and
/// ctid (locked by the batch's `FOR UPDATE`); a NULL in a column's array keeps its value.
/// Returns the new versions' ctids.
fn update_sql(relation: &Relation, columns: &[Column], changed: &[bool]) -> String {
    let mut sets = Vec::new();
    let mut arrays = vec!["$1::oid[]".to_string(), "$2::text[]".to_string()];
    let mut names = vec!["rel".to_string(), "tid".to_string()];
    for (index, column) in columns.iter().enumerate() {
        if !changed.get(index).copied().unwrap_or(false) {
            continue;
        }
        let name = format!("v{index}");
        let element = if column.crypto.bytea { "bytea" } else { "text" };
        arrays.push(format!("${}::{element}[]", arrays.len() + 1));
        sets.push(format!(
            "{quoted} = COALESCE(v.{name}, t.{quoted})",
            quoted = column.quoted
        ));
        names.push(name);
    }
    format!(
        "UPDATE {} AS t SET {} FROM unnest({}) AS v({}) \
          WHERE t.tableoid = v.rel AND t.ctid = v.tid::tid RETURNING t.ctid::text",
        relation.target,
        sets.join(", "),
        arrays.join(", "),
        names.join(", ")
    )
}

/// Whether `row` is a version this run's own update moved ahead of a ctid scan.
fn revisited(scan: &Scan, row: &Row) -> bool {
    match scan {
        Scan::Ctid { moved, .. } if !moved.is_empty() => row
            .try_get::<_, String>(1)
            .ok()
            .and_then(|tid| parse_tid(&tid))
            .is_some_and(|tid| was_moved(moved, tid)),
        _ => false,
    }
}

/// How errors name a row: its primary key when that is not protected, else its ctid.
fn row_label(scan: &Scan, row: &Row) -> String {
    let ctid = || {
        let tid: String = row.try_get(1).unwrap_or_else(|_| "?".to_string());
        format!("row at ctid {tid}")
    };
    match scan {
        Scan::Key {
            columns, printable, ..
        } if *printable => {
            let mut values = Vec::with_capacity(columns.len());
            for index in 0..columns.len() {
                match row.try_get::<_, Option<String>>(2 + index) {
                    Ok(Some(value)) => values.push(value),
                    _ => return ctid(),
                }
            }
            if columns.len() == 1 {
                format!("row {}={}", columns[0], values[0])
            } else {
                format!("row ({})=({})", columns.join(", "), values.join(", "))
            }
        }
        _ => ctid(),
    }
}

/// Why a value stops the run, before the row is named.
enum Fault {
    Value(ValueError),
    Ciphertext(DecryptError),
    Malformed,
    ByteaPlaintext,
    Encrypt(EncryptError),
}

impl Fault {
    fn into_problem(self, column: &Column, row: impl FnOnce() -> String) -> Problem {
        let name = column.name.clone();
        match self {
            Fault::Value(error) => Problem::Value {
                column: name,
                row: row(),
                logical: column.crypto.logical.name(),
                error,
            },
            Fault::Ciphertext(error) => Problem::Ciphertext {
                column: name,
                row: row(),
                error,
            },
            Fault::Malformed => Problem::Malformed {
                column: name,
                row: row(),
            },
            Fault::ByteaPlaintext => Problem::ByteaPlaintext {
                column: name,
                row: row(),
                logical: column.crypto.logical.name(),
            },
            Fault::Encrypt(error) => Problem::Encrypt {
                column: name,
                error,
            },
        }
    }
}

/// What `mode` does with one stored value of `column`.
fn classify(column: &Column, raw: Option<&[u8]>, mode: Mode) -> Result<Step, Fault> {
    let Some(stored) = raw else {
        return Ok(Step::Null);
    };
    let cipher = &column.crypto.cipher;
    // Bytea columns hold the envelope itself; text columns its `pgv1:` form, and text
    // with that prefix must be an authentic envelope (never taken for plaintext).
    let decoded;
    let (envelope, key) = if column.crypto.bytea {
        match cipher.classify(stored).map_err(Fault::Ciphertext)? {
            None => return plaintext(column, stored, mode),
            Some(key) => (stored, key),
        }
    } else if stored.starts_with(TEXT_PREFIX.as_bytes()) {
        decoded = envelope::from_text(stored).ok_or(Fault::Malformed)?;
        match cipher.classify(&decoded).map_err(Fault::Ciphertext)? {
            None => return Err(Fault::Malformed),
            Some(key) => (decoded.as_slice(), key),
        }
    } else {
        return plaintext(column, stored, mode);
    };
    if mode == Mode::Encrypt || key == cipher.active_key_id() {
        return Ok(Step::Skip);
    }
    let canonical = Zeroizing::new(cipher.decrypt(envelope).map_err(Fault::Ciphertext)?);
    seal(column, &canonical)
}

fn plaintext(column: &Column, stored: &[u8], mode: Mode) -> Result<Step, Fault> {
    if mode == Mode::Reencrypt {
        return Ok(Step::Plaintext);
    }
    let crypto = &column.crypto;
    let canonical = if crypto.bytea {
        if crypto.logical != LogicalType::Bytea {
            return Err(Fault::ByteaPlaintext);
        }
        crypto.canonical(1, stored)
    } else {
        crypto.canonical(0, stored)
    }
    .map_err(Fault::Value)?;
    seal(column, &Zeroizing::new(canonical))
}

fn seal(column: &Column, canonical: &[u8]) -> Result<Step, Fault> {
    let envelope = column.crypto.seal(canonical).map_err(Fault::Encrypt)?;
    Ok(Step::Write(if column.crypto.bytea {
        Stored::Bytea(envelope)
    } else {
        Stored::Text(envelope::to_text(&envelope))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_with_doubled_quotes() {
        assert_eq!(quote_ident("balance"), "\"balance\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn stored_types_are_sorted_into_what_holds_and_what_widens() {
        assert!(matches!(storage_of("text"), Storage::Holds));
        assert!(matches!(storage_of("character varying"), Storage::Holds));
        assert!(matches!(storage_of("bytea"), Storage::Holds));
        assert!(matches!(
            storage_of("character varying(20)"),
            Storage::WidenText
        ));
        assert!(matches!(storage_of("character(8)"), Storage::WidenText));
        assert!(matches!(storage_of("numeric(12,2)"), Storage::WidenTyped));
        assert!(matches!(storage_of("integer"), Storage::WidenTyped));
        assert_eq!(suggested_type("numeric(12,2)"), Some("numeric"));
        assert_eq!(suggested_type("integer"), Some("int4"));
        assert_eq!(
            suggested_type("timestamp(3) with time zone"),
            Some("timestamptz")
        );
        assert_eq!(suggested_type("uuid"), None);
    }

    #[test]
    fn moved_row_versions_are_remembered_by_block_and_line_pointer() {
        assert_eq!(parse_tid("(12,5)"), Some((12, 5)));
        assert_eq!(parse_tid("(4294967295,65535)"), Some((u32::MAX, u16::MAX)));
        assert_eq!(parse_tid("12,5"), None);
        assert_eq!(parse_tid("(x,5)"), None);
        let mut moved = BTreeMap::new();
        mark_moved(&mut moved, (7, 1));
        mark_moved(&mut moved, (7, 291));
        mark_moved(&mut moved, (9, 64));
        assert!(was_moved(&moved, (7, 1)) && was_moved(&moved, (7, 291)));
        assert!(was_moved(&moved, (9, 64)));
        assert!(!was_moved(&moved, (7, 2)) && !was_moved(&moved, (8, 1)));
        assert!(!was_moved(&moved, (9, 63)) && !was_moved(&moved, (9, 1000)));
        let ahead = moved.split_off(&8);
        assert!(!was_moved(&ahead, (7, 1)) && was_moved(&ahead, (9, 64)));
    }

    #[test]
    fn errors_after_committed_batches_say_those_stay() {
        assert_eq!(
            committed_note(3),
            " (3 values written before this stay committed; a rerun skips them)"
        );
        assert_eq!(committed_note(0), "");
    }
}
