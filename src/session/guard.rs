//! The read path of the policy: for every result the server sends, what the client may
//! see of each protected column (plaintext, mask, NULL, or nothing because the statement
//! fails with 42501).
//!
//! It is consulted for each inspected server message *before* the session state records
//! it, so it knows which request the message answers. It decides per message: forward,
//! replace (a shaped DataRow, or pgveil's error instead of a statement's result), drop
//! (the rest of a denied statement, up to ReadyForQuery), or wait for a fresher catalog.
//! It never forwards a value of a protected column it could not classify: an unknown
//! relation, an undescribed portal or a malformed row is refused, not passed.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rustc_hash::FxHashMap;
use thiserror::Error;
use tracing::{debug, info};

use super::crypt::{ClientAction, SessionCrypto, WriteRefusal};
use super::lineage::{Computed, SessionLineage, StatementRef};
use super::state::{Expected, SessionState};
use crate::catalog::snapshot::{ColumnSource, Lookup};
use crate::engine::{Engine, Protection, ProtectionHandle, MEMBERSHIP_TTL};
use crate::observe::audit::AuditColumn;
use crate::observe::audit_log::AuditLog;
use crate::observe::{metrics, DenyReason};
use crate::policy::file::EncryptMode;
use crate::policy::{Action, ColumnId, Policy, RoleId};
use crate::protect::column_crypto::ColumnCrypto;
use crate::protect::mask::{HashKey, Mask};
use crate::protect::pgtypes::is_text_like;
use crate::sql::lineage::{
    field_sources, FieldSources, OutputColumn, Sources, StatementKind, StatementLineage,
};
use crate::sqltext::{may_modify_data, runs_another_statement, Lexeme};
use crate::wire::bind::{encode_bind, encode_parse};
use crate::wire::copy_out::{CopyOutError, CopyOutFormat, CopyOutRewriter, FieldChange};
use crate::wire::frame::encode_frame;
use crate::wire::messages::{
    command_tag, error_is_fatal, execute_portal, parameter_status, scrub_report, BindNames,
    ErrorReport, MalformedMessage, Parse, Severity, Target, TargetName, TransactionStatus,
};
use crate::wire::rows::{
    decode_data_row, decode_row_description, encode_data_row, encode_row_description,
    row_description_sources_are, FieldDescription, BINARY_FORMAT,
};

#[derive(Debug, Error)]
pub enum GuardError {
    #[error(transparent)]
    Malformed(#[from] MalformedMessage),
    #[error("{0}")]
    Unexpected(String),
    /// The session cannot go on without passing what the policy forbids; this report
    /// ends it.
    #[error("{}", .0.message)]
    Refused(Box<ErrorReport>),
}

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Replace(Vec<u8>),
    Drop,
    /// Wait for a fresher catalog, then show the same message again.
    AwaitCatalog(Refresh),
    /// Client Execute only: send a Describe of this portal first, so the rows are
    /// planned from the portal as it is when it runs.
    DescribeFirst(Vec<u8>),
    /// Read the login's role memberships again, then show the same message again.
    AwaitMemberships,
    /// Client Query or Execute only: send this frame instead, a request the server
    /// answers with an error, which pgveil then replaces with its refusal. The server
    /// fails the request as it would a real error (the transaction is aborted, an
    /// extended-protocol batch is skipped up to Sync), so both sides stay in step.
    Substitute(Vec<u8>),
}

/// How a statement ended, for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
    Denied(DenyReason),
}

/// What a statement that just ended (or was refused) leaves for the audit log.
#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    /// The protected columns of its result with what the role got of each, and the
    /// column a refusal was about.
    pub columns: Vec<AuditColumn>,
    /// Rows sent to the client.
    pub rows: u64,
    /// The statement as the client sent it, when the server saw something else (a
    /// substituted request).
    pub statement: Option<Vec<u8>>,
}

/// A catalog refresh a message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refresh {
    /// The catalog generation the decision was made with; the refresh must be newer.
    pub newer_than: u64,
    /// The relation the catalog did not know, if that is why.
    pub unknown_relation: Option<u32>,
    /// The schema changes the catalog must have been read after.
    pub changes_needed: u64,
}

/// How one protected result column is transformed.
#[derive(Debug)]
enum Treatment {
    Mask(Mask),
    Redact,
}

/// The transformation of a result's rows.
#[derive(Debug)]
struct Shaping {
    /// The rows hold protected columns (counted against `max_rows`).
    protected: bool,
    /// Number of columns every row must have.
    width: usize,
    /// Encrypted columns, decrypted before any treatment: index, cipher, the format
    /// the server sends and the client gets the value in.
    decrypt: Vec<(usize, Arc<ColumnCrypto>, i16)>,
    columns: Vec<(usize, Treatment)>,
    hash_key: Option<Arc<HashKey>>,
}

/// Where the result currently being sent stands.
#[derive(Debug)]
enum ResultState {
    /// Between results; the first message answering an Execute decides.
    Idle,
    /// The portal whose description just arrived is executed next, and its columns are
    /// the ones remembered as unprotected: its rows may stream without being seen,
    /// unless the protection or the role changes before they come (then the first
    /// message of its result plans it again, see `begin_execute_result`).
    Described,
    /// Rows pass untouched.
    Pass,
    Shape(Arc<Shaping>),
    /// Rows of a portal pgveil never saw described: refused if any arrives.
    Undescribed {
        portal: String,
    },
    /// The portal was described as returning no rows: refused if any arrives.
    NoRows {
        portal: String,
    },
    /// The statement is refused: drop its messages, then send this error in place of
    /// its completion.
    Denied(Box<Refusal>),
    /// The data of a COPY … TO STDOUT with protected columns, rewritten row by row.
    CopyOut(Box<CopyOutPlan>),
}

/// How the data of one COPY … TO STDOUT is rewritten.
struct CopyOutPlan {
    rewriter: CopyOutRewriter,
    shaping: Arc<Shaping>,
    /// The format code of every field (1: binary).
    format: i16,
    /// The first protected column: its field marks each row, for `max_rows`.
    first_protected: usize,
}

impl std::fmt::Debug for CopyOutPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOutPlan")
            .field("shaping", &self.shaping)
            .finish()
    }
}

/// Why a COPY … TO row is not sent.
enum CopyFieldFailure {
    /// The value of this column does not decrypt.
    Decrypt(usize),
    RowLimit,
}

/// The outcome of checking a row description against the policy.
enum Plan {
    /// Rows pass untouched; `protected`: they hold protected columns (counted against
    /// `max_rows`).
    Pass {
        protected: bool,
    },
    Shape(Shaping),
    Deny(Box<Refusal>),
    /// A column comes from a relation the catalog does not know: refresh first.
    Unknown(u32),
}

pub struct ReadGuard {
    engine: Arc<Engine>,
    database: String,
    /// Where newer policies and catalogs of the session's database appear.
    published: ProtectionHandle,
    user: String,
    memberships: Arc<HashSet<String>>,
    protection: Arc<Protection>,
    role: RoleId,
    result: ResultState,
    /// pgveil's error replaced a result: drop everything up to ReadyForQuery, as the
    /// server would have skipped it after a real error.
    draining: bool,
    /// Relations still unknown after a catalog refresh in this transaction.
    refreshed_for: HashSet<u32>,
    /// DDL passed through in the current transaction: when it commits, every session
    /// of the database reads the catalog again before its next statement.
    ddl_seen: bool,
    /// Something that may have redefined a view ran in the current transaction
    /// (DDL, or a DO block or procedure that may hold some). The catalog cannot see
    /// uncommitted changes, so view columns are refused until the transaction ends.
    views_in_doubt: bool,
    /// A rule was created in the current transaction: a table may have become a view.
    relations_in_doubt: bool,
    /// The last catalog read after a schema change failed: restricted roles get no
    /// rows from relations until one succeeds.
    catalog_out_of_date: bool,
    /// The schema-change count the current request waited for a catalog to include:
    /// still missing after the wait means the refresh failed.
    awaited_changes: Option<u64>,
    /// When the login's role memberships are to be read again, and the engine's
    /// membership epoch they were read at (GRANT/REVOKE through pgveil bumps it).
    memberships_due: MembershipDeadline,
    memberships_epoch: u64,
    /// The last attempt to read them failed: the role cannot be trusted, so the
    /// session is treated as restricted and refused results from relations.
    memberships_unknown: bool,
    /// [`Self::compute_unrestricted`] for the current role, memberships and policy,
    /// kept in step by [`Self::role_settled`]: asked several times per message, it
    /// must not walk the policy each time.
    unrestricted: bool,
    /// What the client has sent, as far as deciding whether a portal may be described.
    sent: SentRequests,
    /// `pgveil_protected_values_total` counters of the protected columns in the result
    /// being sent (one per column and action), and the rows sent so far.
    served: Vec<IntCounter>,
    served_rows: u64,
    /// Those counters by (column, action), for the role and policy they were made for.
    served_cache: HashMap<(ColumnId, u8), IntCounter>,
    served_cache_for: Option<(RoleId, usize)>,
    /// The audit log, when one is kept.
    audit: Option<Arc<AuditLog>>,
    /// The protected columns of the result being sent and the action of each, for the
    /// audit log (kept only when there is one).
    audited_columns: Vec<(ColumnId, &'static str)>,
    /// The policy those column ids belong to: a reload may publish another before the
    /// result ends.
    audited_policy: Option<Arc<Policy>>,
    /// The statement that just ended, until the audit log takes it.
    finished: Option<Finished>,
    /// Requests replaced by [`Verdict::Substitute`]: the executing requests sent before
    /// each, the refusal to show in place of the server's error, and the statement the
    /// client sent (for the audit log).
    substituted: VecDeque<(u64, Box<Refusal>, Vec<u8>)>,
    /// The write path of encryption: statement rewrites and Bind encryption.
    crypto: SessionCrypto,
    /// Parse and Bind requests replaced by ones that fail (a statement text or a
    /// statement name starting with [`REFUSED_MARKER`]), by that marker: the refusal
    /// to show in place of the server's error, and the client's statement.
    refused_requests: HashMap<Vec<u8>, (Box<Refusal>, Vec<u8>)>,
    next_marker: u64,
    /// The lineage of the statements sent, cursors and SQL prepared statements.
    lineage: SessionLineage,
    /// `max_rows` of the result being sent, when it has protected columns.
    row_limit: Option<RowLimit>,
    /// Rows with protected columns each cursor and portal has returned so far.
    rows_returned: HashMap<RowKey, u64>,
    /// The columns of the last result found to hold nothing protected.
    unprotected: Option<UnprotectedColumns>,
}

/// The columns of a result that was planned and holds nothing protected, each named by
/// its relation and attribute (neither 0). Such a plan depends on nothing but these
/// pairs, the catalog and policy (the protection's generation) and the role: the same
/// columns again, as when a statement runs again, pass without being planned again.
/// What else a plan checks is checked at each use (see `ReadGuard::known_unprotected`).
#[derive(Debug)]
struct UnprotectedColumns {
    generation: u64,
    role: RoleId,
    columns: Vec<(u32, i16)>,
}

/// The row limit of one result.
#[derive(Debug)]
struct RowLimit {
    max: u64,
    /// Rows counted, earlier FETCHes or Executes of the same cursor or portal included.
    counted: u64,
    key: Option<RowKey>,
}

/// What rows are counted together against `max_rows`: a SQL cursor's across FETCHes,
/// or a portal's across Executes (named by its Bind, counted by executions before it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RowKey {
    Cursor(String),
    Portal(Vec<u8>, u64),
}

/// Most cursors and portals whose returned rows are remembered.
const MAX_COUNTED: usize = 4096;

/// Parse texts and statement names pgveil sends in place of refused ones start with it:
/// byte 1 makes the text unparseable and the name one no client uses.
const REFUSED_MARKER: &[u8] = b"\x01pgveil refused request ";

/// Most portals [`SentRequests`] remembers; past that it starts afresh (a forgotten
/// portal is not described, so its rows are refused rather than risked).
const MAX_REMEMBERED_PORTALS: usize = 4096;

/// The client's statements and portals as it sent them (pipelined ones included, before
/// the server confirms them), to tell whether pgveil may describe a portal before its
/// Execute.
///
/// PostgreSQL 15 answers a Describe of a portal running SQL `FETCH` by looking up the
/// cursor, and crashes the backend (signal 11, taking every session of the cluster with
/// it) when that cursor has been closed since the Bind. So a FETCH or EXECUTE portal
/// (or one bound from a statement pgveil has not seen) is described only when nothing
/// ran since its Bind; otherwise it is not described and its rows are refused, which
/// `begin_execute_result` does anyway for such a portal.
///
/// Both maps are keyed by names the client chooses, with Fx hashing: every Bind looks
/// its statement up, and SipHash cost more than the rest of the Bind's bookkeeping.
/// Fx is not keyed, so a client could choose names that collide; each map is capped
/// at [`MAX_REMEMBERED_PORTALS`] entries, which bounds what that costs its own session.
#[derive(Default)]
struct SentRequests {
    /// Statement name → what is known of its text.
    statements: FxHashMap<Vec<u8>, SentStatement>,
    /// Portal name → what is known of its statement, and the executing requests the
    /// client had sent at its Bind.
    portals: SentPortals,
    /// Portals were forgotten to bound memory: an unknown portal may be one of them.
    forgot_portals: bool,
    /// The portal the client's last message described (libpq sends Bind, Describe,
    /// Execute): its description is as fresh as one pgveil would take.
    described_last: Option<Vec<u8>>,
}

/// Portals by name, with the unnamed portal (which most drivers bind for every
/// statement) kept apart: binding it hashes and copies no name.
#[derive(Default)]
struct SentPortals {
    unnamed: Option<(SentStatement, u64)>,
    named: FxHashMap<Vec<u8>, (SentStatement, u64)>,
}

impl SentPortals {
    fn get(&self, name: &[u8]) -> Option<&(SentStatement, u64)> {
        match name {
            [] => self.unnamed.as_ref(),
            _ => self.named.get(name),
        }
    }

    fn get_mut(&mut self, name: &[u8]) -> Option<&mut (SentStatement, u64)> {
        match name {
            [] => self.unnamed.as_mut(),
            _ => self.named.get_mut(name),
        }
    }

    fn insert(&mut self, name: &[u8], portal: (SentStatement, u64)) {
        match name {
            [] => self.unnamed = Some(portal),
            _ => {
                self.named.insert(name.to_vec(), portal);
            }
        }
    }

    fn len(&self) -> usize {
        self.named.len() + usize::from(self.unnamed.is_some())
    }

    fn clear(&mut self) {
        self.unnamed = None;
        self.named.clear();
    }
}

/// What pgveil knows of a statement the client sent.
#[derive(Debug, Clone)]
struct SentStatement {
    /// Its lineage, for the computed columns of its results.
    lineage: SentLineage,
    /// It runs another statement (`FETCH`, `EXECUTE`).
    runs_another: bool,
    /// Its text, kept only when an audit log is kept: whether it may run while the log
    /// cannot be written is worked out from it then (see [`runs_unaudited`]), and the
    /// record of its refusal names it.
    text: Option<Arc<[u8]>>,
}

/// The lineage of a statement the client prepared.
#[derive(Debug, Clone)]
enum SentLineage {
    /// Its text names no relation with protected columns (or the role had nothing to
    /// check when it was sent).
    NotAnalysed,
    Analysed(StatementRef),
    /// pgveil did not see it prepared (or forgot it).
    Unseen,
}

/// A statement pgveil never saw parsed: assume the worst.
const UNKNOWN_STATEMENT: SentStatement = SentStatement {
    lineage: SentLineage::Unseen,
    runs_another: true,
    text: None,
};

impl SentRequests {
    /// Records a client message; for an Execute, whether its portal may be described.
    /// `executions`: the executing requests sent before this message; `auditing`: keep
    /// the text of statements.
    fn record(
        &mut self,
        tag: u8,
        body: &[u8],
        executions: u64,
        auditing: bool,
    ) -> Result<bool, GuardError> {
        let described_last = self.described_last.take();
        match tag {
            b'D' => {
                let target = TargetName::decode("Describe", body)?;
                if target.target == Target::Portal {
                    self.described_last = Some(target.name.to_vec());
                }
            }
            b'P' => {
                let parse = Parse::decode(body)?;
                if self.statements.len() >= MAX_REMEMBERED_PORTALS {
                    self.statements.clear();
                }
                self.statements.insert(
                    parse.statement.to_vec(),
                    SentStatement {
                        lineage: SentLineage::NotAnalysed,
                        runs_another: runs_another_statement(parse.query),
                        text: auditing.then(|| Arc::from(parse.query)),
                    },
                );
            }
            b'B' => {
                let names = BindNames::decode(body)?;
                let statement = self
                    .statements
                    .get(names.statement)
                    .cloned()
                    .unwrap_or(UNKNOWN_STATEMENT);
                if self.portals.len() >= MAX_REMEMBERED_PORTALS {
                    self.portals.clear();
                    self.forgot_portals = true;
                }
                self.portals.insert(names.portal, (statement, executions));
            }
            b'E' => {
                let portal = execute_portal(body)?;
                if described_last.as_deref() == Some(portal) {
                    // Described by the client right before: no second Describe.
                    return Ok(false);
                }
                let describable = match self.portals.get(portal) {
                    Some((statement, bound_at)) => {
                        !statement.runs_another || *bound_at == executions
                    }
                    // A cursor made by SQL DECLARE: its columns are fixed.
                    None => !self.forgot_portals,
                };
                return Ok(describable);
            }
            _ => {}
        }
        Ok(false)
    }

    /// The statement a portal runs, as the client sent it (unknown: `None`).
    fn portal_statement(&self, portal: &[u8]) -> Option<&SentStatement> {
        self.portals.get(portal).map(|(statement, _)| statement)
    }
}

/// When a session's role memberships are to be read again. The clock is read once
/// per batch of client bytes: the requests that arrived together (a Bind, Describe,
/// Execute and Sync) arrived at the same moment, and need no second look.
#[derive(Debug)]
struct MembershipDeadline {
    due: Instant,
    /// The clock was read in this batch and `due` had not passed.
    checked_in_batch: bool,
}

impl MembershipDeadline {
    fn new(due: Instant) -> Self {
        MembershipDeadline {
            due,
            checked_in_batch: false,
        }
    }

    fn set(&mut self, due: Instant) {
        self.due = due;
        self.checked_in_batch = false;
    }

    fn new_batch(&mut self) {
        self.checked_in_batch = false;
    }

    /// Whether the deadline has passed; `now` is called at most once per batch while
    /// it has not.
    fn passed(&mut self, now: impl FnOnce() -> Instant) -> bool {
        if self.checked_in_batch {
            return false;
        }
        if now() >= self.due {
            return true;
        }
        self.checked_in_batch = true;
        false
    }
}

/// How soon a failed read of a login's role memberships is tried again.
const MEMBERSHIP_RETRY: Duration = Duration::from_secs(2);

/// The `table` label of refusals that concern no one policy table.
const UNKNOWN_TABLE: &str = "unknown";

/// A refusal: the error the client gets, and how it is counted and audited.
#[derive(Debug)]
struct Refusal {
    report: ErrorReport,
    reason: DenyReason,
    table: String,
    /// The protected column it is about, when it is about one, named with the policy
    /// that refused it.
    column: Option<AuditColumn>,
}

impl Refusal {
    fn about(mut self: Box<Self>, policy: &Policy, column: ColumnId) -> Box<Self> {
        self.column = Some(audit_column(policy, column, "deny"));
        self
    }
}

/// A protected column as the audit log names it, with the action the role got.
fn audit_column(policy: &Policy, column: ColumnId, action: &str) -> AuditColumn {
    AuditColumn {
        table: policy.table_label(column),
        column: policy.columns[column].name.clone(),
        action: action.to_string(),
    }
}

fn denied(
    reason: DenyReason,
    table: String,
    sqlstate: &'static str,
    message: String,
    hint: &str,
) -> Box<Refusal> {
    Box::new(Refusal {
        report: ErrorReport::new(Severity::Error, sqlstate, message).with_hint(hint),
        reason,
        table,
        column: None,
    })
}

impl ReadGuard {
    pub fn new(
        engine: Arc<Engine>,
        database: String,
        user: String,
        memberships: Arc<HashSet<String>>,
        protection: Arc<Protection>,
        audit: Option<Arc<AuditLog>>,
    ) -> ReadGuard {
        let role = protection.policy.role_for(&user, &memberships);
        info!(%user, %database, role = protection.policy.role_name(role), "policy role resolved");
        let memberships_epoch = engine.membership_epoch();
        let mut guard = ReadGuard {
            published: engine.handle(&database),
            engine,
            database,
            user,
            memberships,
            protection,
            role,
            result: ResultState::Idle,
            draining: false,
            refreshed_for: HashSet::new(),
            ddl_seen: false,
            views_in_doubt: false,
            relations_in_doubt: false,
            catalog_out_of_date: false,
            awaited_changes: None,
            memberships_due: MembershipDeadline::new(Instant::now() + MEMBERSHIP_TTL),
            memberships_epoch,
            memberships_unknown: false,
            unrestricted: false,
            sent: SentRequests::default(),
            served: Vec::new(),
            served_rows: 0,
            served_cache: HashMap::new(),
            served_cache_for: None,
            audit,
            audited_columns: Vec::new(),
            audited_policy: None,
            finished: None,
            substituted: VecDeque::new(),
            crypto: SessionCrypto::default(),
            refused_requests: HashMap::new(),
            next_marker: 0,
            lineage: SessionLineage::default(),
            row_limit: None,
            rows_returned: HashMap::new(),
            unprotected: None,
        };
        guard.role_settled();
        guard
    }

    /// The statement that just ended or was refused, for the audit log.
    pub fn take_finished(&mut self) -> Option<Finished> {
        self.finished.take()
    }

    /// Whether `sql` may name a relation with protected columns (in the session's
    /// `client_encoding`).
    pub fn names_protected_relation(&self, sql: &[u8]) -> bool {
        self.protection
            .catalog
            .names_protected_relation(sql, self.crypto.client_encoding())
    }

    /// Statements touching protected columns must be refused: the audit log cannot be
    /// written and `audit.on_failure` is `refuse`.
    fn audit_blocked(&self) -> bool {
        self.audit
            .as_ref()
            .is_some_and(|audit| audit.refuses_when_unwritable() && !audit.writable())
    }

    fn audit_refusal(&self, table: String) -> Box<Refusal> {
        let problem = self
            .audit
            .as_ref()
            .and_then(|audit| audit.problem())
            .unwrap_or_default();
        denied(
            DenyReason::AuditUnavailable,
            table,
            "58030",
            format!(
                "pgveil: statements touching protected columns are refused while the audit log cannot be written ({problem}; role {})",
                self.role_name()
            ),
            "statements that touch no protected column still run; the audit log recovers by itself once it can be written (see pgveil's log and /readyz)",
        )
    }

    /// Records how the current result ended, for the audit log.
    fn finish(&mut self, outcome: Outcome, rows: u64, refused_column: Option<AuditColumn>) {
        if self.audit.is_none() {
            return;
        }
        let mut columns: Vec<AuditColumn> = Vec::with_capacity(self.audited_columns.len());
        match (outcome, &self.audited_policy) {
            (Outcome::Denied(_), _) => columns.extend(refused_column),
            (_, Some(policy)) => {
                for &(column, action) in &self.audited_columns {
                    let entry = audit_column(policy, column, action);
                    if !columns.contains(&entry) {
                        columns.push(entry);
                    }
                }
            }
            (_, None) => {}
        }
        self.audited_columns.clear();
        self.finished = Some(Finished {
            outcome,
            columns,
            rows,
            statement: None,
        });
    }

    pub fn role_name(&self) -> &str {
        self.protection.policy.role_name(self.role)
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Picks up a newer policy or catalog, at a statement boundary.
    #[inline]
    fn sync_protection(&mut self) {
        // The published generation is an atomic: no lock in the common case, and no
        // call (this runs for every request and result).
        if self.policy_changed() {
            self.take_published_protection();
        }
    }

    /// [`Self::sync_protection`] once something newer was published.
    #[cold]
    fn take_published_protection(&mut self) {
        if let Some(current) = self.published.current() {
            if current.generation != self.protection.generation {
                if !Arc::ptr_eq(&current.policy, &self.protection.policy) {
                    self.role = current.policy.role_for(&self.user, &self.memberships);
                    debug!(role = current.policy.role_name(self.role), "policy changed");
                }
                self.protection = current;
                self.role_settled();
            }
        }
    }

    /// A newer policy or catalog was published since this session last synced.
    fn policy_changed(&self) -> bool {
        self.published.generation() != self.protection.generation
    }

    /// The role may see every column in plaintext and nothing needs decrypting, so
    /// results pass without inspection.
    #[inline]
    fn unrestricted(&self) -> bool {
        debug_assert_eq!(
            self.unrestricted,
            self.compute_unrestricted(),
            "the cached unrestricted flag missed a change of role, memberships or policy"
        );
        self.unrestricted
    }

    fn compute_unrestricted(&self) -> bool {
        !self.memberships_unknown
            && self.protection.policy.is_unrestricted(self.role)
            && !self.protection.policy.encrypts()
    }

    /// Must follow every change of `role`, `memberships_unknown` or `protection`.
    fn role_settled(&mut self) {
        self.unrestricted = self.compute_unrestricted();
    }

    /// The login's role memberships were read again (or could not be).
    pub fn memberships_refreshed(&mut self, memberships: Option<Arc<HashSet<String>>>) {
        self.memberships_epoch = self.engine.membership_epoch();
        match memberships {
            Some(memberships) => {
                self.memberships_due.set(Instant::now() + MEMBERSHIP_TTL);
                self.memberships_unknown = false;
                if memberships != self.memberships {
                    self.memberships = memberships;
                    self.role = self
                        .protection
                        .policy
                        .role_for(&self.user, &self.memberships);
                    info!(user = %self.user, role = self.role_name(), "role memberships changed");
                }
            }
            None => {
                self.memberships_due.set(Instant::now() + MEMBERSHIP_RETRY);
                self.memberships_unknown = true;
            }
        }
        self.role_settled();
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether a server message must be seen whole (`Some(true)`), may stream
    /// (`Some(false)`), or whether the session state decides (`None`).
    pub fn must_inspect_server(&self, tag: u8) -> Option<bool> {
        if self.draining || matches!(self.result, ResultState::Denied(_)) {
            return Some(true);
        }
        if matches!(self.result, ResultState::CopyOut(_)) && matches!(tag, b'd' | b'c') {
            return Some(true);
        }
        match tag {
            // The first row of a result is seen: the policy in force may have changed
            // since the last statement, and only `begin_execute_result` looks. Except
            // right after the portal's own description showed nothing protected, while
            // that still holds.
            b'D' => Some(match self.result {
                ResultState::Pass => self.row_limit.is_some(),
                ResultState::Described => !self.described_still_unprotected(),
                ResultState::Idle => {
                    !self.unrestricted() || self.policy_changed() || self.audit_blocked()
                }
                _ => true,
            }),
            // Notices can quote values too (see `scrub_report`).
            b'N' => Some(!self.unrestricted() || self.policy_changed()),
            _ => None,
        }
    }

    /// The client's next bytes arrived: the next request reads the clock again.
    pub fn client_bytes_arrived(&mut self) {
        self.memberships_due.new_batch();
    }

    /// A catalog refresh finished (or failed) for the message that asked for it.
    pub fn catalog_refreshed(&mut self, refresh: Refresh) {
        if let Some(oid) = refresh.unknown_relation {
            self.refreshed_for.insert(oid);
        }
        self.sync_protection();
    }

    /// Checks a client message before it is forwarded: after a schema change, a
    /// restricted role's next request waits for a catalog that includes it; for a
    /// restricted role, every Execute is preceded by pgveil's own Describe of its
    /// portal.
    /// Called before `state` records the message.
    pub fn on_client_message(
        &mut self,
        state: &SessionState,
        tag: u8,
        body: &[u8],
    ) -> Result<Verdict, GuardError> {
        if matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'D' | b'F') {
            if self.memberships_epoch != self.engine.membership_epoch()
                || self.memberships_due.passed(Instant::now)
            {
                return Ok(Verdict::AwaitMemberships);
            }
            self.sync_protection();
            self.catalog_out_of_date = false;
            let awaited = self.awaited_changes.take();
            if !self.unrestricted() {
                // Every schema change committed before this request must be in the
                // catalog that checks it; later ones are the next request's business.
                let needed = awaited.unwrap_or_else(|| self.published.changes());
                if self.protection.changes_seen < needed {
                    if awaited.is_none() {
                        self.awaited_changes = Some(needed);
                        return Ok(Verdict::AwaitCatalog(Refresh {
                            newer_than: self.protection.generation,
                            unknown_relation: None,
                            changes_needed: needed,
                        }));
                    }
                    // The refresh this request waited for failed.
                    self.catalog_out_of_date = true;
                }
            }
        }
        let describable =
            self.sent
                .record(tag, body, state.executions_sent(), self.audit.is_some())?;
        if matches!(tag, b'Q' | b'E' | b'F') && self.audit_blocked() {
            let catalog = &self.protection.catalog;
            let encoding = self.crypto.client_encoding();
            let query = body.strip_suffix(b"\0").unwrap_or(body);
            let (allowed, statement) = match tag {
                b'Q' => (runs_unaudited(catalog, query, encoding), query.to_vec()),
                b'E' => match self
                    .sent
                    .portal_statement(execute_portal(body)?)
                    .and_then(|sent| sent.text.as_deref())
                {
                    Some(text) => (runs_unaudited(catalog, text, encoding), text.to_vec()),
                    None => (false, Vec::new()),
                },
                // A function call may do anything.
                _ => (false, b"<function call>".to_vec()),
            };
            if !allowed {
                // Reads of protected columns are refused at their result too, but
                // writes, filters and server-side code must be stopped before the
                // server runs them.
                let refusal = self.audit_refusal(UNKNOWN_TABLE.to_string());
                self.substituted
                    .push_back((state.executions_sent(), refusal, statement));
                return Ok(Verdict::Substitute(failing_request(tag)));
            }
        }
        if !self.unrestricted() {
            if let Some(verdict) = self.check_lineage(state, tag, body)? {
                return Ok(verdict);
            }
        } else if tag == b'P' {
            // Not analysed: should the role become restricted (a policy reload), its
            // computed columns are refused rather than passed.
            let parse = Parse::decode(body)?;
            if let Some(sent) = self.sent.statements.get_mut(parse.statement) {
                sent.lineage = SentLineage::Unseen;
            }
        }
        if self.protection.policy.encrypts() {
            if let Some(verdict) = self.encrypt_client_message(state, tag, body)? {
                return Ok(verdict);
            }
        }
        if tag == b'E' && !self.unrestricted() {
            // A statement's description, or a portal's from before other statements
            // ran, may not match the rows: search_path, views and cursors can change in
            // between. The portal's own description, taken right before it runs, is
            // what its rows follow.
            if describable {
                return Ok(Verdict::DescribeFirst(execute_portal(body)?.to_vec()));
            }
            // Not described: its rows are refused (see `begin_execute_result`).
        }
        Ok(Verdict::Forward)
    }

    /// The write path: rewrites, refusals and COPY data of encrypted columns. `None`:
    /// go on as without encryption.
    fn encrypt_client_message(
        &mut self,
        state: &SessionState,
        tag: u8,
        body: &[u8],
    ) -> Result<Option<Verdict>, GuardError> {
        let action = self
            .crypto
            .on_client_message(&self.protection, state, tag, body)?;
        Ok(match action {
            ClientAction::Forward => None,
            ClientAction::Replace(frame) => Some(Verdict::Replace(frame)),
            ClientAction::Drop => Some(Verdict::Drop),
            ClientAction::FailCopy {
                frame,
                refusal,
                request,
                statement,
            } => {
                let refusal = self.refusal_of(&refusal);
                // The server answers the CopyFail with an error for the COPY's request.
                self.substituted.push_back((request, refusal, statement));
                Some(Verdict::Replace(frame))
            }
            ClientAction::Refuse(refused) => {
                let refusal = self.refusal_of(&refused);
                Some(self.refuse_request(state, tag, body, refusal)?)
            }
        })
    }

    /// Replaces a Query, Parse, Bind or Execute pgveil refuses by a request the server
    /// fails; the server's error is then swapped for `refusal`.
    fn refuse_request(
        &mut self,
        state: &SessionState,
        tag: u8,
        body: &[u8],
        refusal: Box<Refusal>,
    ) -> Result<Verdict, GuardError> {
        Ok(match tag {
            b'Q' | b'E' => {
                let statement = if tag == b'Q' {
                    body.strip_suffix(b"\0").unwrap_or(body).to_vec()
                } else {
                    self.sent
                        .portal_statement(execute_portal(body)?)
                        .and_then(|sent| sent.text.as_deref())
                        .map_or_else(|| b"<execute>".to_vec(), <[u8]>::to_vec)
                };
                self.substituted
                    .push_back((state.executions_sent(), refusal, statement));
                Verdict::Substitute(failing_request(tag))
            }
            _ => {
                let mut marker = REFUSED_MARKER.to_vec();
                marker.extend_from_slice(self.next_marker.to_string().as_bytes());
                self.next_marker += 1;
                let (statement, failing) = if tag == b'P' {
                    let parse = Parse::decode(body)?;
                    let failing = encode_parse(parse.statement, &marker, &[]);
                    (parse.query.to_vec(), failing)
                } else {
                    let bind = BindNames::decode(body)?;
                    let failing = encode_bind(bind.portal, &marker, &[], &[]);
                    // The audit log shows the statement the Bind would have run.
                    let statement = state
                        .statement(bind.statement)
                        .map_or_else(|| b"<bind>".to_vec(), |s| s.query.to_vec());
                    (statement, failing)
                };
                self.refused_requests.insert(marker, (refusal, statement));
                Verdict::Substitute(failing)
            }
        })
    }

    /// The read policy of a statement before it runs: a Query or Parse whose text names
    /// a relation with protected columns (or makes or runs cursors and prepared
    /// statements) is analysed; conditions on columns the role may not filter on,
    /// copies of protected values into other tables or server files, exports the role
    /// may not make and statements that cannot be analysed are refused. The lineage is
    /// kept for the statement's results.
    fn check_lineage(
        &mut self,
        state: &SessionState,
        tag: u8,
        body: &[u8],
    ) -> Result<Option<Verdict>, GuardError> {
        let (text, statement) = match tag {
            b'Q' => (body.strip_suffix(b"\0").unwrap_or(body), None),
            b'P' => {
                let parse = Parse::decode(body)?;
                (parse.query, Some(parse.statement))
            }
            b'B' => {
                // A statement made by SQL PREPARE can be bound like a protocol one
                // (most sessions make none: nothing to look up).
                if !self.lineage.has_sql_prepared() {
                    return Ok(None);
                }
                let names = BindNames::decode(body)?;
                if let Some(prepared) = self.lineage.sql_prepared(names.statement) {
                    if let Some((sent, _)) = self.sent.portals.get_mut(names.portal) {
                        if matches!(sent.lineage, SentLineage::Unseen) {
                            sent.lineage = SentLineage::Analysed(prepared);
                        }
                    }
                }
                return Ok(None);
            }
            b'E' => {
                let portal = execute_portal(body)?;
                if let Some((sent, _)) = self.sent.portals.get(portal) {
                    if let SentLineage::Analysed(statement) = &sent.lineage {
                        let statement = statement.clone();
                        self.lineage.statement_runs(&statement);
                        self.forget_rows_of(&statement);
                    }
                }
                return Ok(None);
            }
            _ => return Ok(None),
        };
        // The hot path: one lexical pass; statements naming no protected relation and
        // no cursor or prepared statement are not parsed.
        let (names_protected, names_cursor) = self
            .protection
            .catalog
            .names_protected_relation_or_cursor_word(text, self.crypto.client_encoding());
        if !names_protected && !names_cursor {
            return Ok(None);
        }
        let text: Arc<[u8]> = Arc::from(text);
        let analysis = self.protection.lineage(&text);
        let generation = self.protection.generation;
        let refusal = match analysis.as_ref() {
            Err(reason) if names_protected => {
                debug!(reason = %reason.0, "a statement naming a protected relation does not parse");
                Some(denied(
                    DenyReason::Unparseable,
                    UNKNOWN_TABLE.to_string(),
                    "42501",
                    format!(
                        "pgveil: cannot analyse a statement that names a relation with protected columns (role {})",
                        self.role_name()
                    ),
                    "pgveil must understand every statement that reads protected columns for this role; simplify or split the statement",
                ))
            }
            Err(_) => None,
            Ok(statements) => statements
                .iter()
                .find_map(|statement| self.statement_refusal(statement)),
        };
        if let Some(refusal) = refusal {
            return self.refuse_request(state, tag, body, refusal).map(Some);
        }
        match statement {
            None => {
                if let Ok(statements) = analysis.as_ref() {
                    for index in 0..statements.len() {
                        let statement =
                            StatementRef::new(text.clone(), &analysis, index, generation);
                        self.forget_rows_of(&statement);
                    }
                }
                self.lineage
                    .query_sent(state.executions_sent(), text, analysis, generation);
            }
            Some(name) => {
                if let Some(sent) = self.sent.statements.get_mut(name) {
                    sent.lineage =
                        SentLineage::Analysed(StatementRef::new(text, &analysis, 0, generation));
                }
            }
        }
        Ok(None)
    }

    /// A DECLARE starts its cursor's count of rows afresh.
    fn forget_rows_of(&mut self, statement: &StatementRef) {
        if let Some(cursor) = statement.declared_cursor() {
            self.rows_returned
                .remove(&RowKey::Cursor(cursor.to_string()));
        }
    }

    /// Why the policy refuses one statement before it runs, if it does.
    fn statement_refusal(&self, statement: &StatementLineage) -> Option<Box<Refusal>> {
        let policy = &self.protection.policy;
        let role = self.role_name();
        match &statement.kind {
            StatementKind::Unsupported { relation } => {
                return Some(denied(
                    DenyReason::Unparseable,
                    relation.clone(),
                    "42501",
                    format!(
                        "pgveil: this kind of statement on {relation} is not supported for role {role}, which may not see every protected column in plaintext"
                    ),
                    "use SELECT, INSERT, UPDATE, DELETE or COPY through pgveil, or run it with a login whose role may see every column",
                ));
            }
            StatementKind::Prepare { statement, .. } => {
                if let Some(refusal) = self.statement_refusal(statement) {
                    return Some(refusal);
                }
            }
            _ => {}
        }
        if let Some(&column) = statement
            .filters
            .iter()
            .find(|&&column| policy.filter_refused(self.role, column))
        {
            return Some(
                denied(
                    DenyReason::FilterOnProtected,
                    policy.table_label(column),
                    "42501",
                    format!(
                        "pgveil: a condition on column {} is refused for role {role}, which may not see it in plaintext: conditions reveal values one guess at a time",
                        policy.column_label(column)
                    ),
                    "filter on columns the role may see, or ask a DBA to set filter_on_protected: allow for the role in the pgveil policy",
                )
                .about(policy, column),
            );
        }
        if let Some(&column) = statement
            .stored
            .iter()
            .find(|&&column| !matches!(policy.action(self.role, column), Action::Allow))
        {
            return Some(
                denied(
                    DenyReason::ExportDenied,
                    policy.table_label(column),
                    "42501",
                    format!(
                        "pgveil: the statement would copy values of column {} where the policy does not protect them (a table or a server file), and role {role} may not see it in plaintext",
                        policy.column_label(column)
                    ),
                    "copy protected columns with a login whose role may see them in plaintext",
                )
                .about(policy, column),
            );
        }
        if let Some(copy) = &statement.copy_out {
            if let Some(&column) = copy.sources().iter().next() {
                if !policy.may_export(self.role) {
                    return Some(self.export_refusal(column));
                }
                if let Err(reason) = &copy.format {
                    return Some(denied(
                        DenyReason::ExportDenied,
                        policy.table_label(column),
                        "42501",
                        format!(
                            "pgveil: COPY … TO with {reason} cannot be checked against the policy for role {role}"
                        ),
                        "use COPY … TO STDOUT in text, CSV or binary format without that option",
                    ));
                }
            }
        }
        None
    }

    /// The refusal of a COPY … TO STDOUT of `column` for a role with `export: deny`.
    fn export_refusal(&self, column: ColumnId) -> Box<Refusal> {
        let policy = &self.protection.policy;
        denied(
            DenyReason::ExportDenied,
            policy.table_label(column),
            "42501",
            format!(
                "pgveil: COPY … TO of protected column {} is refused for role {} (export: deny)",
                policy.column_label(column),
                self.role_name()
            ),
            "leave protected columns out of the COPY, or ask a DBA to allow exports for the role in the pgveil policy",
        )
        .about(policy, column)
    }

    /// The refusal shown for a request the write path refused.
    fn refusal_of(&self, refused: &WriteRefusal) -> Box<Refusal> {
        let mut refusal = denied(
            refused.reason,
            refused.column.map_or_else(
                || UNKNOWN_TABLE.to_string(),
                |c| self.protection.policy.table_label(c),
            ),
            refused.sqlstate,
            refused.message.clone(),
            &refused.hint,
        );
        if let Some(column) = refused.column {
            refusal = refusal.about(&self.protection.policy, column);
        }
        refusal
    }

    /// Whether it matters if a simple Query may modify data: only when a rule returns
    /// protected rows (see `plan`) to a role whose results are inspected. When it does
    /// not, the session state need not read each Query for it.
    pub fn tracks_modifications(&self) -> bool {
        !self.unrestricted() && !self.protection.catalog.reading_rule_sources().is_empty()
    }

    /// Whether client CopyData must be inspected (a COPY into encrypted columns).
    pub fn rewrites_copy_data(&self) -> bool {
        self.crypto.rewrites_copy_data()
    }

    /// The session's `client_encoding` as the server reported it at startup.
    pub fn client_encoding_reported(&mut self, encoding: Option<&str>) {
        if let Some(encoding) = encoding {
            self.crypto.client_encoding_reported(encoding);
        }
    }

    /// The refusal of a Parse or Bind pgveil replaced, when the server's error answers
    /// one.
    fn refused_request_answered(
        &mut self,
        state: &SessionState,
    ) -> Option<(Box<Refusal>, Vec<u8>)> {
        if self.refused_requests.is_empty() {
            return None;
        }
        let marker: &[u8] = match state.next_expected() {
            Some(Expected::ParseComplete(statement)) => &statement.query,
            Some(Expected::BindComplete { statement, .. }) => statement,
            _ => return None,
        };
        if !marker.starts_with(REFUSED_MARKER) {
            return None;
        }
        self.refused_requests.remove(marker)
    }

    /// Decides what happens to a server message. Called before `state` records it.
    pub fn on_server_message(
        &mut self,
        state: &SessionState,
        tag: u8,
        body: &[u8],
    ) -> Result<Verdict, GuardError> {
        if tag == b'S' {
            if let Some(encoding) = parameter_status(body, b"client_encoding") {
                self.crypto
                    .client_encoding_reported(&String::from_utf8_lossy(encoding));
            }
        }
        // Only a completion can end one (the queue is not walked for other messages).
        let ends_query_statement = match tag {
            b'C' | b'I' => match state.next_expected() {
                Some(Expected::SimpleQuery { sent_after, .. }) => Some(*sent_after),
                _ => None,
            },
            _ => None,
        };
        let verdict = self.decide(state, tag, body)?;
        if let Some(sent_after) = ends_query_statement {
            self.lineage.query_statement_ended(sent_after);
        }
        if verdict == Verdict::Forward && matches!(tag, b'E' | b'N') && !self.unrestricted() {
            // "Key (id_card)=(…) already exists", "invalid input syntax for type
            // integer: "…"": errors quote the values they tripped on.
            if let Some(scrubbed) = scrub_report(body)? {
                let mut frame = Vec::with_capacity(scrubbed.len() + 5);
                encode_frame(&mut frame, tag, &scrubbed);
                return Ok(Verdict::Replace(frame));
            }
        }
        Ok(verdict)
    }

    fn decide(
        &mut self,
        state: &SessionState,
        tag: u8,
        body: &[u8],
    ) -> Result<Verdict, GuardError> {
        if tag == b'W' && !self.unrestricted() {
            // Replication and COPY BOTH streams carry row data pgveil cannot take apart.
            metrics().denied(self.role_name(), DenyReason::ExportDenied, UNKNOWN_TABLE);
            self.finish(Outcome::Denied(DenyReason::ExportDenied), 0, None);
            return Err(GuardError::Refused(Box::new(
                ErrorReport::new(
                    Severity::Fatal,
                    "42501",
                    format!(
                        "pgveil: replication and COPY BOTH streams are refused for role {}, whose reads pgveil must mask",
                        self.role_name()
                    ),
                )
                .with_hint("replicate with a login whose policy role may see every column in plaintext"),
            )));
        }
        if self.draining {
            if matches!(
                state.next_expected(),
                Some(Expected::SimpleQuery { .. } | Expected::ExecuteResult { .. })
            ) {
                if let Some((outcome, rows)) = statement_ended(tag, body, 0) {
                    // A statement the server ran after the refused one (in the same
                    // Query or pipeline): its result is dropped, but what it did is
                    // recorded.
                    self.audited_columns.clear();
                    self.finish(outcome, rows, None);
                }
            }
            return Ok(match tag {
                // A COPY FROM STDIN after the refused statement of the same Query: the
                // server now waits for the client's data, so the client must hear of
                // it, or both wait for ever.
                b'G' => {
                    self.draining = false;
                    self.result = ResultState::Idle;
                    Verdict::Forward
                }
                b'Z' => {
                    self.draining = false;
                    self.result = ResultState::Idle;
                    self.on_ready_for_query(body);
                    Verdict::Forward
                }
                b'S' | b'A' => Verdict::Forward,
                b'E' if error_is_fatal(body) => Verdict::Forward,
                _ => Verdict::Drop,
            });
        }
        if tag == b't' {
            if let Some(Expected::StatementDescription { statement }) = state.next_expected() {
                if let Some(frame) =
                    self.crypto
                        .parameter_description(&self.protection, statement, body)?
                {
                    return Ok(Verdict::Replace(frame));
                }
            }
            return Ok(Verdict::Forward);
        }
        match tag {
            b'T' => self.on_row_description(state, body),
            // pgveil's own Describe: the client did not ask for it.
            b'n' if answers_internal_describe(state) => Ok(Verdict::Drop),
            b'D' => {
                self.begin_execute_result(state)?;
                self.on_data_row(body)
            }
            b'H' | b'G' | b'W' => {
                self.begin_execute_result(state)?;
                if tag == b'H' && !self.unrestricted() {
                    self.sync_protection();
                    self.result = self.plan_copy_out(state, body)?;
                } else if tag == b'H'
                    && self.audit_blocked()
                    && state
                        .current_statement_text()
                        .is_none_or(|sql| self.names_protected_relation(sql))
                {
                    self.result =
                        ResultState::Denied(self.audit_refusal(UNKNOWN_TABLE.to_string()));
                }
                Ok(self.during_result())
            }
            b'd' | b'c' if matches!(self.result, ResultState::CopyOut(_)) => {
                self.copy_out_data(tag, body)
            }
            b'd' | b'c' | b'N' => Ok(self.during_result()),
            b'C' | b'I' | b's' | b'E' => {
                if tag == b'E' && matches!(self.result, ResultState::Described) {
                    // The Execute failed (or was one pgveil substituted): no rows.
                    self.result = ResultState::Idle;
                }
                let fatal = tag == b'E' && error_is_fatal(body);
                if tag == b'E' && !fatal {
                    if let Some((refusal, statement)) = self
                        .refused_request_answered(state)
                        .or_else(|| self.substitution_answered(state))
                    {
                        self.finish(Outcome::Denied(refusal.reason), 0, refusal.column.clone());
                        if let Some(finished) = self.finished.as_mut() {
                            finished.statement = Some(statement);
                        }
                        return Ok(Verdict::Replace(self.refuse(&refusal)));
                    }
                }
                if tag != b'E' {
                    self.begin_execute_result(state)?;
                }
                let rows_sent = self.served_rows;
                self.count_served();
                if tag == b'C' {
                    self.note_command(command_tag(body));
                }
                self.row_limit = None;
                match std::mem::replace(&mut self.result, ResultState::Idle) {
                    ResultState::Denied(report) if !fatal => {
                        // What the client sees instead of the statement's completion; the
                        // rest up to ReadyForQuery is skipped like after a real error.
                        // The rows sent before the refusal (up to `max_rows`, or before a
                        // value that does not decrypt) are recorded.
                        self.draining = true;
                        self.finish(
                            Outcome::Denied(report.reason),
                            rows_sent,
                            report.column.clone(),
                        );
                        Ok(Verdict::Replace(self.refuse(&report)))
                    }
                    _ => {
                        // Reading the command tag is for the audit log only.
                        if self.audit.is_some() {
                            match statement_ended(tag, body, rows_sent) {
                                Some((outcome, rows)) => self.finish(outcome, rows, None),
                                None => self.audited_columns.clear(),
                            }
                        }
                        Ok(Verdict::Forward)
                    }
                }
            }
            b'Z' => {
                self.count_served();
                self.row_limit = None;
                self.result = ResultState::Idle;
                self.on_ready_for_query(body);
                Ok(Verdict::Forward)
            }
            _ => Ok(Verdict::Forward),
        }
    }

    /// The refusal standing for the request the server's error answers, when that
    /// request was one pgveil substituted.
    fn substitution_answered(&mut self, state: &SessionState) -> Option<(Box<Refusal>, Vec<u8>)> {
        if self.substituted.is_empty() {
            return None;
        }
        let answering = match state.next_expected() {
            Some(
                Expected::SimpleQuery { sent_after, .. }
                | Expected::ExecuteResult { sent_after, .. }
                | Expected::FunctionCallResult { sent_after },
            ) => *sent_after,
            _ => return None,
        };
        // Substituted requests the server skipped (after an earlier error) got no answer.
        while self
            .substituted
            .front()
            .is_some_and(|(sent_after, _, _)| *sent_after < answering)
        {
            self.substituted.pop_front();
        }
        match self.substituted.front() {
            Some((sent_after, _, _)) if *sent_after == answering => self
                .substituted
                .pop_front()
                .map(|(_, refusal, statement)| (refusal, statement)),
            _ => None,
        }
    }

    /// A DataRow went to the client without being inspected.
    pub fn row_streamed(&mut self) {
        self.served_rows += 1;
    }

    /// Adds the rows sent of the result that just ended to its protected columns'
    /// counters.
    fn count_served(&mut self) {
        if self.served_rows > 0 {
            for counter in &self.served {
                counter.inc_by(self.served_rows);
            }
        }
        self.served.clear();
        self.served_rows = 0;
    }

    /// The `pgveil_protected_values_total` counters for the protected columns of a
    /// result about to be sent, with the action each gets.
    fn served_counters(&mut self, columns: &[FieldDescription]) -> Vec<IntCounter> {
        let policy = self.protection.policy.clone();
        let policy_id = Arc::as_ptr(&policy) as usize;
        if self.served_cache_for != Some((self.role, policy_id)) {
            self.served_cache.clear();
            self.served_cache_for = Some((self.role, policy_id));
        }
        // Reuses the last result's vector: this runs for every result.
        let mut counters = std::mem::take(&mut self.served);
        counters.clear();
        let auditing = self.audit.is_some();
        self.audited_columns.clear();
        if auditing {
            self.audited_policy = Some(policy.clone());
        }
        for field in columns {
            let sources: &[ColumnId] = match self
                .protection
                .catalog
                .lookup(field.table_oid, field.attnum)
            {
                Lookup::Protected(ColumnSource::Protected(column)) => std::slice::from_ref(column),
                Lookup::Protected(ColumnSource::Derived(columns)) => columns,
                _ => continue,
            };
            for &column in sources {
                let (action, label) = match policy.action(self.role, column) {
                    Action::Allow => (0, "allow"),
                    Action::Mask(_) => (1, "mask"),
                    Action::Redact => (2, "redact"),
                    Action::Deny => continue,
                };
                if auditing {
                    self.audited_columns.push((column, label));
                }
                let role = policy.role_name(self.role);
                let counter = self
                    .served_cache
                    .entry((column, action))
                    .or_insert_with(|| {
                        metrics().protected_values_total.with_label_values(&[
                            role,
                            &policy.table_label(column),
                            &policy.columns[column].name,
                            label,
                        ])
                    })
                    .clone();
                counters.push(counter);
            }
        }
        counters
    }

    fn during_result(&self) -> Verdict {
        match self.result {
            ResultState::Denied(_) => Verdict::Drop,
            _ => Verdict::Forward,
        }
    }

    fn on_ready_for_query(&mut self, body: &[u8]) {
        let idle = TransactionStatus::decode_ready_for_query(body)
            .is_ok_and(|status| status == TransactionStatus::Idle);
        if idle {
            // Relations created in the transaction are committed now (or gone).
            self.refreshed_for.clear();
            self.views_in_doubt = false;
            self.relations_in_doubt = false;
            if self.ddl_seen {
                self.ddl_seen = false;
                self.published.schema_changed();
            }
        }
    }

    fn note_command(&mut self, tag: &[u8]) {
        let ddl = [
            &b"CREATE"[..],
            b"ALTER",
            b"DROP",
            b"COMMENT",
            b"SECURITY LABEL",
        ];
        if ddl.iter().any(|prefix| tag.starts_with(prefix)) {
            self.ddl_seen = true;
            self.views_in_doubt = true;
            self.relations_in_doubt |= tag.starts_with(b"CREATE RULE");
        }
        if tag == b"DO" {
            // A DO block may run any DDL; it is rare enough in application traffic to
            // re-read the catalog after each.
            self.ddl_seen = true;
            self.views_in_doubt = true;
            self.relations_in_doubt = true;
        }
        if tag == b"CALL" {
            // So may a procedure, but applications call them all the time: doubt only
            // for the rest of the transaction (DDL committed inside one is seen by the
            // periodic catalog refresh).
            self.views_in_doubt = true;
        }
        if tag.starts_with(b"GRANT")
            || tag.starts_with(b"REVOKE")
            || tag.ends_with(b"ROLE")
            || tag.ends_with(b"USER")
        {
            self.engine.forget_memberships();
        }
    }

    /// The first message answering an Execute decides how its rows are treated.
    fn begin_execute_result(&mut self, state: &SessionState) -> Result<(), GuardError> {
        match self.result {
            ResultState::Idle => {}
            ResultState::Described => {
                if self.described_still_unprotected() {
                    self.result = ResultState::Pass;
                    return Ok(());
                }
                self.result = ResultState::Idle;
            }
            _ => return Ok(()),
        }
        let Some(Expected::ExecuteResult {
            portal, sent_after, ..
        }) = state.next_expected()
        else {
            return Ok(());
        };
        self.sync_protection();
        if self.unrestricted() {
            self.result = ResultState::Pass;
            // Only for counting: the statement's description will do when the portal's
            // was not asked for.
            if let Some(found) = state.portal(portal) {
                let columns = match &found.described {
                    Some(described) => described.as_ref(),
                    None => found
                        .statement
                        .as_ref()
                        .and_then(|statement| statement.columns.get())
                        .and_then(Option::as_ref),
                };
                if let Some(columns) = columns {
                    self.served = self.served_counters(columns);
                    if !self.served.is_empty() && self.audit_blocked() {
                        self.result =
                            ResultState::Denied(self.audit_refusal(UNKNOWN_TABLE.to_string()));
                    }
                    return Ok(());
                }
            }
            if self.audit_blocked() {
                // What the rows hold is not known: they may be protected.
                self.result = ResultState::Denied(self.audit_refusal(UNKNOWN_TABLE.to_string()));
            }
            return Ok(());
        }
        let name = || String::from_utf8_lossy(portal).into_owned();
        let Some(found) = state.portal(portal) else {
            self.result = ResultState::Undescribed { portal: name() };
            return Ok(());
        };
        // A bound portal whose statement pgveil does not know (made by SQL PREPARE, or
        // forgotten after one) is treated as if it might run another. Its text is
        // scanned only when something ran between Bind and this Execute.
        let runs_another = || match &found.statement {
            Some(statement) => runs_another_statement(&statement.query),
            None => found.from_bind,
        };
        if !found.executed && *sent_after != found.bound_after && runs_another() {
            // SQL FETCH and EXECUTE find their cursor or statement only when they run;
            // whatever ran since Bind may have replaced it, so the description taken
            // at Bind says nothing about the rows.
            self.result = ResultState::Denied(denied(
                DenyReason::Unparseable,
                UNKNOWN_TABLE.to_string(),
                "42501",
                format!(
                    "pgveil: portal \"{}\" runs a FETCH or EXECUTE whose cursor or prepared statement may have changed since its Bind (role {})",
                    name(),
                    self.role_name()
                ),
                "send Bind and Execute of a FETCH or EXECUTE statement with no other statement in between",
            ));
            return Ok(());
        }
        if let (Some(Some(columns)), Some(unprotected)) =
            (&found.described, self.known_unprotected())
        {
            let same = columns.len() == unprotected.columns.len()
                && columns
                    .iter()
                    .zip(&unprotected.columns)
                    .all(|(field, &known)| (field.table_oid, field.attnum) == known);
            if same {
                self.pass_unprotected(state);
                return Ok(());
            }
        }
        // Only read when a rule returns protected rows (see `plan`).
        let modifies = !self.protection.catalog.reading_rule_sources().is_empty()
            && found
                .statement
                .as_ref()
                .is_none_or(|statement| may_modify_data(&statement.query));
        let (computed, row_key) = self.computed_now(state);
        // Only a description of the portal itself is trusted: the statement's was taken
        // when it was prepared, and what it reads may have changed since.
        self.result = match &found.described {
            None => ResultState::Undescribed { portal: name() },
            Some(None) => ResultState::NoRows { portal: name() },
            Some(Some(columns)) => match self.plan(columns, modifies, &computed) {
                Plan::Pass { protected } => {
                    if !protected {
                        self.remember_unprotected(columns);
                    }
                    self.served = self.served_counters(columns);
                    self.start_row_limit(protected, row_key);
                    ResultState::Pass
                }
                Plan::Shape(shaping) => {
                    self.served = self.served_counters(columns);
                    self.start_row_limit(shaping.protected, row_key);
                    ResultState::Shape(Arc::new(shaping))
                }
                Plan::Deny(report) => ResultState::Denied(report),
                // Described earlier, so its relations were checked then; a relation
                // unknown now was dropped since: nothing can be read from it.
                Plan::Unknown(oid) => ResultState::Denied(self.unknown_relation(oid)),
            },
        };
        Ok(())
    }

    fn on_row_description(
        &mut self,
        state: &SessionState,
        body: &[u8],
    ) -> Result<Verdict, GuardError> {
        self.sync_protection();
        // Whether a simple query may modify data, and so fire a rule that returns rows
        // (see `CatalogSnapshot::reading_rule_sources`).
        let mut modifies = false;
        let answers_describe = match state.next_expected() {
            Some(Expected::PortalDescription { internal: true, .. }) => {
                return self.on_internal_description(state, body);
            }
            Some(Expected::StatementDescription { .. } | Expected::PortalDescription { .. }) => {
                true
            }
            Some(Expected::SimpleQuery {
                modifies: may_modify,
                ..
            }) => {
                modifies = *may_modify;
                false
            }
            // The session state reports the desync.
            _ => return Ok(Verdict::Forward),
        };
        if !self.unrestricted() {
            if let Some(unprotected) = self.known_unprotected() {
                if row_description_sources_are(body, &unprotected.columns) {
                    if answers_describe {
                        self.describe_next_execute_unprotected(state);
                    } else {
                        self.pass_unprotected(state);
                    }
                    return Ok(Verdict::Forward);
                }
            }
        } else {
            if !answers_describe {
                self.result = ResultState::Pass;
                let columns = decode_row_description(body)?;
                self.served = self.served_counters(&columns);
                if !self.served.is_empty() && self.audit_blocked() {
                    self.result =
                        ResultState::Denied(self.audit_refusal(UNKNOWN_TABLE.to_string()));
                    return Ok(Verdict::Drop);
                }
            }
            return Ok(Verdict::Forward);
        }
        let columns = decode_row_description(body)?;
        let (computed, row_key) = self.computed_now(state);
        // A Describe is answered before anything runs; the rows are checked again
        // when they come, with what the statement may fire.
        let plan = self.plan(&columns, modifies, &computed);
        self.remember_if_unprotected(&plan, &columns);
        if let Plan::Unknown(oid) = plan {
            return Ok(Verdict::AwaitCatalog(Refresh {
                newer_than: self.protection.generation,
                unknown_relation: Some(oid),
                changes_needed: 0,
            }));
        }
        let logical = self.logical_description(&columns);
        let forward = || match &logical {
            Some(frame) => Verdict::Replace(frame.clone()),
            None => Verdict::Forward,
        };
        if answers_describe {
            // Rows come later, with an Execute; only a refusal acts now.
            return Ok(match plan {
                Plan::Deny(report) => {
                    self.draining = true;
                    self.finish(Outcome::Denied(report.reason), 0, report.column.clone());
                    Verdict::Replace(self.refuse(&report))
                }
                _ => forward(),
            });
        }
        if matches!(plan, Plan::Pass { .. } | Plan::Shape(_)) {
            self.served = self.served_counters(&columns);
        }
        let (result, verdict) = match plan {
            Plan::Pass { protected } => {
                self.start_row_limit(protected, row_key);
                (ResultState::Pass, forward())
            }
            Plan::Shape(shaping) => {
                self.start_row_limit(shaping.protected, row_key);
                (ResultState::Shape(Arc::new(shaping)), forward())
            }
            Plan::Deny(report) => (ResultState::Denied(report), Verdict::Drop),
            Plan::Unknown(_) => (ResultState::Idle, Verdict::Forward),
        };
        self.result = result;
        Ok(verdict)
    }

    /// The answer to pgveil's own Describe before an Execute: never shown to the client.
    /// Rows are planned when they come; a relation the catalog does not know yet is
    /// looked up now, while nothing waits on it.
    fn on_internal_description(
        &mut self,
        state: &SessionState,
        body: &[u8],
    ) -> Result<Verdict, GuardError> {
        if self.unrestricted() {
            return Ok(Verdict::Drop);
        }
        if let Some(unprotected) = self.known_unprotected() {
            if row_description_sources_are(body, &unprotected.columns) {
                self.describe_next_execute_unprotected(state);
                return Ok(Verdict::Drop);
            }
        }
        let columns = decode_row_description(body)?;
        let plan = self.plan(&columns, false, &Computed::Nothing);
        self.remember_if_unprotected(&plan, &columns);
        Ok(match plan {
            Plan::Unknown(oid) => Verdict::AwaitCatalog(Refresh {
                newer_than: self.protection.generation,
                unknown_relation: Some(oid),
                changes_needed: 0,
            }),
            _ => Verdict::Drop,
        })
    }

    fn on_data_row(&mut self, body: &[u8]) -> Result<Verdict, GuardError> {
        if matches!(self.result, ResultState::Pass | ResultState::Shape(_)) {
            if let Some(refusal) = self.count_row() {
                self.result = ResultState::Denied(refusal);
                return Ok(Verdict::Drop);
            }
        }
        match &self.result {
            ResultState::Pass => {
                self.served_rows += 1;
                Ok(Verdict::Forward)
            }
            ResultState::Denied(_) => Ok(Verdict::Drop),
            ResultState::Shape(shaping) => {
                let shaping = shaping.clone();
                match shape_row(&shaping, body)? {
                    Ok(shaped) => {
                        self.served_rows += 1;
                        Ok(Verdict::Replace(shaped))
                    }
                    Err(index) => {
                        self.result = ResultState::Denied(self.decrypt_failure(&shaping, index));
                        Ok(Verdict::Drop)
                    }
                }
            }
            ResultState::Undescribed { portal } => {
                let report = denied(
                    DenyReason::Unparseable,
                    UNKNOWN_TABLE.to_string(),
                    "42501",
                    format!(
                        "pgveil: rows arrived for portal \"{portal}\", whose columns pgveil never saw described (role {})",
                        self.role_name()
                    ),
                    "send Describe for the statement or portal before Execute, as most drivers do",
                );
                self.result = ResultState::Denied(report);
                Ok(Verdict::Drop)
            }
            ResultState::NoRows { portal } => {
                let report = denied(
                    DenyReason::Unparseable,
                    UNKNOWN_TABLE.to_string(),
                    "42501",
                    format!(
                        "pgveil: rows arrived for portal \"{portal}\", which was described as returning none (role {})",
                        self.role_name()
                    ),
                    "a cursor or prepared statement the portal runs was replaced; run the statement again",
                );
                self.result = ResultState::Denied(report);
                Ok(Verdict::Drop)
            }
            ResultState::Idle | ResultState::Described => {
                Err(GuardError::Unexpected("DataRow outside of a result".into()))
            }
            ResultState::CopyOut(_) => {
                Err(GuardError::Unexpected("DataRow inside COPY data".into()))
            }
        }
    }

    /// Where the columns of the result the server answers with now come from, and
    /// the cursor or portal its rows are counted with.
    fn computed_now(&mut self, state: &SessionState) -> (Computed, Option<RowKey>) {
        let (statement, key) = match state.next_expected() {
            Some(Expected::SimpleQuery { sent_after, .. }) => {
                match self.lineage.answering_query(*sent_after) {
                    Some(statement) => (statement, None),
                    None => return (Computed::Nothing, None),
                }
            }
            Some(
                Expected::ExecuteResult { portal, .. } | Expected::PortalDescription { portal, .. },
            ) => {
                let bound_after = state.portal(portal).map_or(0, |p| p.bound_after);
                let key = RowKey::Portal(portal.to_vec(), bound_after);
                match self.sent.portals.get(portal).map(|(sent, _)| &sent.lineage) {
                    Some(SentLineage::Analysed(statement)) => (statement.clone(), Some(key)),
                    Some(SentLineage::NotAnalysed) => return (Computed::Nothing, Some(key)),
                    Some(SentLineage::Unseen) => {
                        return (
                            Computed::Unknown("a statement pgveil did not see prepared".into()),
                            Some(key),
                        )
                    }
                    // A cursor made by SQL DECLARE, executed as a portal.
                    None => {
                        let name = String::from_utf8_lossy(portal).into_owned();
                        let computed = self.lineage.cursor(&name, &self.protection);
                        return (computed, Some(RowKey::Cursor(name)));
                    }
                }
            }
            Some(Expected::StatementDescription { statement }) => {
                match self
                    .sent
                    .statements
                    .get(&statement[..])
                    .map(|sent| &sent.lineage)
                {
                    Some(SentLineage::Analysed(statement)) => (statement.clone(), None),
                    Some(SentLineage::NotAnalysed) => return (Computed::Nothing, None),
                    _ => {
                        return (
                            Computed::Unknown("a statement pgveil did not see prepared".into()),
                            None,
                        )
                    }
                }
            }
            _ => return (Computed::Nothing, None),
        };
        let key = match SessionLineage::fetched_cursor(&statement) {
            Some(cursor) => Some(RowKey::Cursor(cursor.to_string())),
            None => key,
        };
        (self.lineage.computed(&statement, &self.protection), key)
    }

    /// The columns remembered as unprotected, while that still holds: the same
    /// protection and role, and none of the doubts under which `plan` refuses every
    /// column of a relation (see `in_doubt`).
    fn known_unprotected(&self) -> Option<&UnprotectedColumns> {
        let known = self.unprotected.as_ref()?;
        let in_doubt = self.memberships_unknown
            || self.catalog_out_of_date
            || self.relations_in_doubt
            || self.views_in_doubt;
        (known.generation == self.protection.generation && known.role == self.role && !in_doubt)
            .then_some(known)
    }

    /// Remembers the columns of a result planned to hold nothing protected, when each
    /// names its relation and attribute (a computed or whole-row column's plan depends
    /// on the statement's lineage, so such results are not remembered).
    fn remember_if_unprotected(&mut self, plan: &Plan, columns: &[FieldDescription]) {
        if matches!(plan, Plan::Pass { protected: false }) {
            self.remember_unprotected(columns);
        }
    }

    /// [`Self::remember_if_unprotected`] of a result already planned as unprotected.
    fn remember_unprotected(&mut self, columns: &[FieldDescription]) {
        let named = columns
            .iter()
            .all(|field| field.table_oid != 0 && field.attnum != 0);
        if named {
            self.unprotected = Some(UnprotectedColumns {
                generation: self.protection.generation,
                role: self.role,
                columns: columns
                    .iter()
                    .map(|field| (field.table_oid, field.attnum))
                    .collect(),
            });
        }
    }

    /// What the plan of a result with the remembered unprotected columns gives: its rows
    /// pass, none counts against `max_rows` or as a protected value served.
    fn pass_unprotected(&mut self, state: &SessionState) {
        if let Some(Expected::SimpleQuery { sent_after, .. }) = state.next_expected() {
            // As `computed_now` would: the lineages of the Queries answered before
            // this one are dropped.
            self.lineage.answering_query(*sent_after);
        }
        self.forget_result_accounting();
        self.result = ResultState::Pass;
    }

    /// What a result planned as unprotected does not keep: no protected values to count
    /// or audit, no rows counted against `max_rows`.
    fn forget_result_accounting(&mut self) {
        self.served.clear();
        self.audited_columns.clear();
        self.row_limit = None;
    }

    /// Called when the description of a portal (asked for by the client or by pgveil)
    /// showed only the columns remembered as unprotected. When the server answers an
    /// Execute of that same portal next, the result is planned now, as
    /// `begin_execute_result` would plan it, so that its rows can stream; it is planned
    /// again when its first message comes if the protection or role changed meanwhile.
    fn describe_next_execute_unprotected(&mut self, state: &SessionState) {
        if !matches!(self.result, ResultState::Idle) {
            return;
        }
        let pending = state.pending();
        let (
            Some(Expected::PortalDescription {
                portal: described, ..
            }),
            Some(Expected::ExecuteResult {
                portal, sent_after, ..
            }),
        ) = (pending.front(), pending.get(1))
        else {
            return;
        };
        if described != portal {
            return;
        }
        // Bound with nothing executed in between: had a FETCH or EXECUTE run after
        // something else, its cursor or statement could have changed since it was
        // described (`begin_execute_result` decides such portals from their rows). The
        // client's record of the Bind is used, rather than the session state's, because
        // it finds the unnamed portal without hashing.
        let bound_just_before = self
            .sent
            .portals
            .get(portal)
            .is_some_and(|(_, bound_at)| bound_at == sent_after);
        if bound_just_before {
            self.forget_result_accounting();
            self.result = ResultState::Described;
        }
    }

    /// A result planned from its portal's description (`ResultState::Described`) may
    /// still pass: the same protection and role, and nothing in doubt since.
    fn described_still_unprotected(&self) -> bool {
        !self.policy_changed() && self.known_unprotected().is_some()
    }

    /// Starts counting the rows of a result against the role's `max_rows`, when it
    /// has protected columns.
    fn start_row_limit(&mut self, protected: bool, key: Option<RowKey>) {
        self.row_limit = match self.protection.policy.max_rows(self.role) {
            Some(max) if protected => {
                let counted = key
                    .as_ref()
                    .and_then(|key| self.rows_returned.get(key))
                    .copied()
                    .unwrap_or(0);
                Some(RowLimit { max, counted, key })
            }
            _ => None,
        };
    }

    /// Counts one row of the result being sent; the refusal when it is one more than
    /// the role may have.
    fn count_row(&mut self) -> Option<Box<Refusal>> {
        let limit = self.row_limit.as_mut()?;
        limit.counted += 1;
        let mut over = limit.counted > limit.max;
        if let Some(key) = &limit.key {
            if !self.rows_returned.contains_key(key) && self.rows_returned.len() >= MAX_COUNTED {
                // Portals end with their transaction; cursor counts must not be
                // forgotten, or a cursor could return more than the limit.
                self.rows_returned
                    .retain(|key, _| matches!(key, RowKey::Cursor(_)));
                over |= self.rows_returned.len() >= MAX_COUNTED;
            }
            self.rows_returned.insert(key.clone(), limit.counted);
        }
        over.then(|| self.row_limit_refusal())
    }

    fn row_limit_refusal(&self) -> Box<Refusal> {
        let max = self.protection.policy.max_rows(self.role).unwrap_or(0);
        denied(
            DenyReason::RowLimit,
            UNKNOWN_TABLE.to_string(),
            "42501",
            format!(
                "pgveil: the statement returns more than {max} rows with protected columns, the most role {} may read at once (max_rows)",
                self.role_name()
            ),
            "add a narrower WHERE or a LIMIT, fetch fewer rows from the cursor, or ask a DBA to raise max_rows for the role",
        )
    }

    /// How the data of a COPY … TO STDOUT is treated, from the statement's lineage
    /// (the server describes no columns for COPY).
    fn plan_copy_out(
        &mut self,
        state: &SessionState,
        body: &[u8],
    ) -> Result<ResultState, GuardError> {
        let role = self.role_name().to_string();
        let cannot_tell = |what: &str| {
            ResultState::Denied(denied(
                DenyReason::ExportDenied,
                UNKNOWN_TABLE.to_string(),
                "42501",
                format!("pgveil: cannot tell which columns this COPY … TO sends: {what} (role {role})"),
                "COPY a table or a query through pgveil in text, CSV or binary format, in a statement of its own",
            ))
        };
        let lineage = match self.computed_now(state).0 {
            Computed::Nothing => return Ok(ResultState::Pass),
            Computed::Unknown(what) => return Ok(cannot_tell(&what)),
            Computed::Known(lineage) => lineage,
        };
        let Some(copy) = &lineage.copy_out else {
            return Ok(cannot_tell("it is not a COPY pgveil analysed"));
        };
        let Some(formats) = copy_out_formats(body) else {
            return Err(GuardError::Unexpected("malformed CopyOutResponse".into()));
        };
        let format = match &copy.format {
            Ok(format) => format.clone(),
            Err(reason) => return Ok(cannot_tell(reason)),
        };
        let any_many = copy
            .columns
            .iter()
            .any(|column| matches!(column, OutputColumn::Many(_)));
        let Some(&first_source) = copy.sources().iter().next() else {
            return Ok(ResultState::Pass);
        };
        let policy = self.protection.policy.clone();
        if !policy.may_export(self.role) {
            // Checked when the COPY was sent too; the policy may have changed since.
            return Ok(ResultState::Denied(self.export_refusal(first_source)));
        }
        if any_many || copy.columns.len() != formats.len() {
            return Ok(cannot_tell("its columns do not match the query's"));
        }
        let binary = matches!(format, CopyOutFormat::Binary);
        if formats.iter().any(|&f| (f == BINARY_FORMAT) != binary) {
            return Ok(cannot_tell("the server's format is not the statement's"));
        }
        if self.audit_blocked() {
            return Ok(ResultState::Denied(
                self.audit_refusal(policy.table_label(first_source)),
            ));
        }
        let format_code = if binary { BINARY_FORMAT } else { 0 };
        let mut treatments = Vec::new();
        let mut decrypt = Vec::new();
        let mut positions = Vec::new();
        for (index, column) in copy.columns.iter().enumerate() {
            let OutputColumn::One(sources) = column else {
                continue;
            };
            if sources.is_empty() {
                continue;
            }
            positions.push(index);
            let source = match copy.copies.get(index).copied().flatten() {
                Some(id) => ColumnSource::Protected(id),
                None => ColumnSource::Derived(sources.iter().copied().collect()),
            };
            let name = format!("{}", index + 1);
            match self.plan_column(index, &name, &source, format_code, None) {
                Err(refusal) => return Ok(ResultState::Denied(refusal)),
                Ok((treatment, decryption)) => {
                    treatments.extend(treatment.map(|treatment| (index, treatment)));
                    decrypt.extend(decryption);
                }
            }
        }
        self.start_row_limit(true, None);
        let Some(&first_protected) = positions.first() else {
            return Ok(ResultState::Pass);
        };
        Ok(ResultState::CopyOut(Box::new(CopyOutPlan {
            rewriter: CopyOutRewriter::new(format, formats.len(), positions),
            shaping: Arc::new(Shaping {
                protected: true,
                width: formats.len(),
                decrypt,
                columns: treatments,
                hash_key: self.protection.hash_key.clone(),
            }),
            format: format_code,
            first_protected,
        })))
    }

    /// A CopyData or CopyDone of a COPY … TO STDOUT whose data is rewritten.
    fn copy_out_data(&mut self, tag: u8, body: &[u8]) -> Result<Verdict, GuardError> {
        let ResultState::CopyOut(mut plan) = std::mem::replace(&mut self.result, ResultState::Idle)
        else {
            return Ok(self.during_result());
        };
        if tag == b'c' {
            return Ok(match plan.rewriter.finish() {
                Ok(()) => Verdict::Forward,
                Err(error) => {
                    debug!(%error, "COPY data ended in the middle of a row");
                    self.result = ResultState::Denied(self.unreadable_copy());
                    Verdict::Drop
                }
            });
        }
        let (mut counted, max) = match &self.row_limit {
            Some(limit) => (limit.counted, Some(limit.max)),
            None => (0, None),
        };
        let shaping = plan.shaping.clone();
        let (format, first) = (plan.format, plan.first_protected);
        let mut field = |index: usize, value: Option<&[u8]>| {
            if index == first {
                counted += 1;
                if max.is_some_and(|max| counted > max) {
                    return Err(CopyFieldFailure::RowLimit);
                }
            }
            transform_field(&shaping, index, value, format).map_err(CopyFieldFailure::Decrypt)
        };
        let rewritten = plan.rewriter.push(body, &mut field);
        if let Some(limit) = self.row_limit.as_mut() {
            limit.counted = counted;
        }
        match rewritten {
            Ok(data) => {
                self.served_rows = counted;
                self.result = ResultState::CopyOut(plan);
                if data.is_empty() {
                    return Ok(Verdict::Drop);
                }
                let mut frame = Vec::with_capacity(data.len() + 5);
                encode_frame(&mut frame, b'd', &data);
                Ok(Verdict::Replace(frame))
            }
            Err(CopyOutError::Field {
                error: CopyFieldFailure::RowLimit,
                ..
            }) => {
                self.result = ResultState::Denied(self.row_limit_refusal());
                Ok(Verdict::Drop)
            }
            Err(CopyOutError::Field {
                error: CopyFieldFailure::Decrypt(index),
                ..
            }) => {
                self.result = ResultState::Denied(self.decrypt_failure(&shaping, index));
                Ok(Verdict::Drop)
            }
            Err(CopyOutError::Malformed { row, problem }) => {
                debug!(row, problem, "COPY data pgveil cannot read");
                self.result = ResultState::Denied(self.unreadable_copy());
                Ok(Verdict::Drop)
            }
        }
    }

    fn unreadable_copy(&self) -> Box<Refusal> {
        denied(
            DenyReason::ExportDenied,
            UNKNOWN_TABLE.to_string(),
            "42501",
            format!(
                "pgveil: the data of this COPY … TO cannot be read field by field, so its protected columns cannot be checked (role {})",
                self.role_name()
            ),
            "use SELECT, whose results pgveil checks per the policy",
        )
    }

    /// The refusal of a result whose column `index` holds a value that does not
    /// decrypt (tampered, from another column, under an unknown key, or plaintext).
    fn decrypt_failure(&self, shaping: &Shaping, index: usize) -> Box<Refusal> {
        let identity = shaping
            .decrypt
            .iter()
            .find(|(i, _, _)| *i == index)
            .map(|(_, crypto, _)| crypto.cipher.identity().clone());
        let (table, column) = identity
            .map(|id| (format!("{}.{}", id.schema, id.table), id.column))
            .unwrap_or_else(|| (UNKNOWN_TABLE.to_string(), UNKNOWN_TABLE.to_string()));
        metrics()
            .decrypt_failures_total
            .with_label_values(&[table.as_str(), column.as_str()])
            .inc();
        Box::new(Refusal {
            report: ErrorReport::new(
                Severity::Error,
                "XX001",
                format!("pgveil: a value of encrypted column {table}.{column} does not decrypt: it was altered, copied from another column, is under a key not in the keyring, or was stored in plaintext"),
            )
            .with_hint("restore the value, add the missing key to the keyring, or run `pgveil encrypt` on the table"),
            reason: DenyReason::UnsupportedOnEncrypted,
            table,
            column: None,
        })
    }

    /// A RowDescription with the logical types of encrypted columns, when it has any.
    fn logical_description(&self, columns: &[FieldDescription]) -> Option<Vec<u8>> {
        if !self.protection.policy.encrypts() {
            return None;
        }
        let mut changed = false;
        let mut fields = columns.to_vec();
        for field in &mut fields {
            if let Lookup::Protected(ColumnSource::Protected(column)) = self
                .protection
                .catalog
                .lookup(field.table_oid, field.attnum)
            {
                if let Some(crypto) = self.protection.ciphers.get(*column) {
                    field.type_oid = crypto.logical.oid();
                    field.type_len = crypto.logical.type_len();
                    field.type_modifier = -1;
                    changed = true;
                }
            }
        }
        changed.then(|| encode_row_description(&fields))
    }

    /// Counts a refusal and encodes the error the client gets for it.
    fn refuse(&self, refusal: &Refusal) -> Vec<u8> {
        metrics().denied(self.role_name(), refusal.reason, &refusal.table);
        refusal.report.encode()
    }

    /// A refusal when what the catalog says about the column's relation may be out of
    /// date: after a failed re-read, or after DDL in the open transaction.
    fn in_doubt(&self, field: &FieldDescription) -> Option<Box<Refusal>> {
        let column = String::from_utf8_lossy(&field.name);
        if self.memberships_unknown {
            return Some(denied(
                DenyReason::Unparseable,
                UNKNOWN_TABLE.to_string(),
                "42501",
                format!(
                    "pgveil: the role memberships of login {} could not be read again, so column \"{column}\" cannot be checked",
                    self.user
                ),
                "try again in a moment; if it persists, check pgveil's log and its catalog login",
            ));
        }
        if self.catalog_out_of_date {
            return Some(denied(
                DenyReason::Unparseable,
                UNKNOWN_TABLE.to_string(),
                "42501",
                format!(
                    "pgveil: the catalog could not be read again after a schema change, so column \"{column}\" (relation OID {}) cannot be checked (role {})",
                    field.table_oid,
                    self.role_name()
                ),
                "try again in a moment; if it persists, check pgveil's log and its catalog login",
            ));
        }
        let view = self.protection.catalog.is_view(field.table_oid);
        if self.relations_in_doubt || (self.views_in_doubt && view) {
            return Some(denied(
                DenyReason::Unparseable,
                UNKNOWN_TABLE.to_string(),
                "42501",
                format!(
                    "pgveil: column \"{column}\" comes from relation OID {}, which a schema change earlier in this transaction may have redefined (role {})",
                    field.table_oid,
                    self.role_name()
                ),
                "commit the schema change, then run the query in a new transaction",
            ));
        }
        None
    }

    fn unknown_relation(&self, oid: u32) -> Box<Refusal> {
        denied(
            DenyReason::Unparseable,
            UNKNOWN_TABLE.to_string(),
            "42501",
            format!(
                "pgveil: a result column comes from relation OID {oid}, which pgveil's catalog does not know (role {})",
                self.role_name()
            ),
            "pgveil cannot see relations created in a transaction that is still open; commit it, then run the query again",
        )
    }

    /// Checks every column of a result against the policy. `may_fire_rules`: the
    /// statement may modify data, so a column without a relation may carry what a rule
    /// returned; `computed`: what the statement's computed columns come from.
    fn plan(
        &self,
        columns: &[FieldDescription],
        may_fire_rules: bool,
        computed: &Computed,
    ) -> Plan {
        let policy = &self.protection.policy;
        let rule_sources = self.protection.catalog.reading_rule_sources();
        let computed_sources = match computed {
            Computed::Known(lineage) => Some(field_sources(&lineage.outputs, columns.len())),
            _ => None,
        };
        let mut treatments = Vec::new();
        let mut decrypt = Vec::new();
        // The table of the first protected column of the result, for a refusal while
        // the audit log cannot be written.
        let mut first_protected: Option<String> = None;
        for (index, field) in columns.iter().enumerate() {
            if field.table_oid != 0 {
                if let Some(report) = self.in_doubt(field) {
                    return Plan::Deny(report);
                }
            }
            let column_name = String::from_utf8_lossy(&field.name);
            let computed_source;
            let source = match self
                .protection
                .catalog
                .lookup(field.table_oid, field.attnum)
            {
                // A computed column (functions, casts, set operations, subqueries; table
                // OID 0), a whole-row reference (`SELECT c FROM customers c`: the
                // relation's OID with attribute number 0), or rows a rule returned: what
                // the statement's lineage says it is computed from.
                Lookup::Unprotected if field.table_oid == 0 || field.attnum == 0 => {
                    if let Computed::Unknown(what) = computed {
                        return Plan::Deny(denied(
                            DenyReason::DerivedExpression,
                            UNKNOWN_TABLE.to_string(),
                            "42501",
                            format!(
                                "pgveil: cannot tell what column \"{column_name}\" is computed from: it comes from {what} (role {})",
                                self.role_name()
                            ),
                            "declare the cursor or prepare the statement through pgveil in this session, or select the protected columns themselves",
                        ));
                    }
                    let mut sources: Sources = match &computed_sources {
                        Some(FieldSources::Exact(list)) => {
                            list.get(index).cloned().unwrap_or_default()
                        }
                        Some(FieldSources::Any(all)) => all.clone(),
                        None => Sources::new(),
                    };
                    if may_fire_rules {
                        sources.extend(rule_sources.iter().copied());
                    }
                    if sources.is_empty() {
                        continue;
                    }
                    computed_source = ColumnSource::Derived(sources.into_iter().collect());
                    &computed_source
                }
                Lookup::Unprotected => continue,
                Lookup::UnknownRelation => {
                    if self.refreshed_for.contains(&field.table_oid) {
                        return Plan::Deny(self.unknown_relation(field.table_oid));
                    }
                    return Plan::Unknown(field.table_oid);
                }
                Lookup::Protected(source) => source,
            };
            first_protected.get_or_insert_with(|| source_table(policy, source));
            match self.plan_column(
                index,
                &column_name,
                source,
                field.format,
                Some(field.type_oid),
            ) {
                Err(refusal) => return Plan::Deny(refusal),
                Ok((treatment, decryption)) => {
                    treatments.extend(treatment.map(|treatment| (index, treatment)));
                    decrypt.extend(decryption);
                }
            }
        }
        let protected = first_protected.is_some();
        if let Some(table) = first_protected {
            if self.audit_blocked() {
                return Plan::Deny(self.audit_refusal(table));
            }
        }
        if treatments.is_empty() && decrypt.is_empty() {
            return Plan::Pass { protected };
        }
        Plan::Shape(Shaping {
            protected,
            width: columns.len(),
            decrypt,
            columns: treatments,
            hash_key: self.protection.hash_key.clone(),
        })
    }

    /// What one protected result column at `index` gets: its treatment, and its
    /// decryption when it is encrypted; or the refusal of the statement. `type_oid`:
    /// the column's type as the server reports it (`None`: not reported, as in COPY).
    fn plan_column(
        &self,
        index: usize,
        column_name: &str,
        source: &ColumnSource,
        format: i16,
        type_oid: Option<u32>,
    ) -> Result<ColumnPlan, Box<Refusal>> {
        let policy = &self.protection.policy;
        let mut decrypt = None;
        // Ciphertext is decrypted for every role that may see more than NULL; a
        // value computed from ciphertext means nothing and is refused.
        let mut logical_oid = type_oid.unwrap_or(0);
        match source {
            ColumnSource::Protected(column)
                if policy.columns[*column].encrypt != EncryptMode::None =>
            {
                match self.protection.ciphers.get(*column) {
                    Some(crypto) => {
                        logical_oid = crypto.logical.oid();
                        if !matches!(
                            policy.action(self.role, *column),
                            Action::Redact | Action::Deny
                        ) {
                            decrypt = Some((index, crypto.clone(), format));
                        }
                    }
                    None => {
                        return Err(denied(
                            DenyReason::UnsupportedOnEncrypted,
                            policy.table_label(*column),
                            "XX001",
                            format!(
                                "pgveil: cannot decrypt column {}: {}",
                                policy.column_label(*column),
                                self.protection
                                    .ciphers
                                    .unusable
                                    .get(column)
                                    .map_or("it has no cipher", String::as_str)
                            ),
                            "fix the column's type or the keyring",
                        )
                        .about(policy, *column))
                    }
                }
            }
            ColumnSource::Derived(sources) => {
                if let Some(&id) = sources
                    .iter()
                    .find(|&&id| policy.columns[id].encrypt != EncryptMode::None)
                {
                    return Err(denied(
                        DenyReason::UnsupportedOnEncrypted,
                        policy.table_label(id),
                        "0A000",
                        format!(
                            "pgveil: column \"{column_name}\" is computed from the ciphertext of encrypted column {}, which cannot give a correct value",
                            policy.column_label(id)
                        ),
                        "select the encrypted column itself, which pgveil decrypts, and compute in the application",
                    ).about(policy, id));
                }
            }
            ColumnSource::Protected(_) => {}
        }
        let action = match source {
            ColumnSource::Protected(column) => match policy.action(self.role, *column) {
                Action::Deny => {
                    return Err(denied(
                        DenyReason::ColumnDenied,
                        policy.table_label(*column),
                        "42501",
                        format!(
                            "pgveil: permission denied for column {} (role {})",
                            policy.column_label(*column),
                            self.role_name()
                        ),
                        "leave the column out of the query, or ask a DBA to change its access in the pgveil policy",
                    ).about(policy, *column))
                }
                other => other.clone(),
            },
            ColumnSource::Derived(sources) => {
                // A computed value cannot be masked safely (a mask of a substring or a
                // concatenation could reveal what the column's own mask hides), so a
                // masked source refuses it like a denied one, before a redacted one
                // could make it NULL.
                let strictest = sources
                    .iter()
                    .map(|&id| (id, policy.action(self.role, id)))
                    .max_by_key(|(_, action)| match action {
                        Action::Mask(_) => Action::Deny.strictness(),
                        other => other.strictness(),
                    });
                match strictest {
                    None | Some((_, Action::Allow)) => Action::Allow,
                    Some((_, Action::Redact)) => Action::Redact,
                    Some((id, Action::Deny)) => {
                        return Err(denied(
                            DenyReason::DerivedExpression,
                            policy.table_label(id),
                            "42501",
                            format!(
                                "pgveil: permission denied for column \"{column_name}\", computed from {} (role {})",
                                policy.column_label(id),
                                self.role_name()
                            ),
                            "leave the column out of the query, or ask a DBA to change its access in the pgveil policy",
                        ).about(policy, id))
                    }
                    Some((id, Action::Mask(_))) => {
                        // No mask is defined for a computed value: a mask of a
                        // substring or a concatenation could reveal what the column's
                        // own mask hides.
                        return Err(denied(
                            DenyReason::DerivedExpression,
                            policy.table_label(id),
                            "42501",
                            format!(
                                "pgveil: column \"{column_name}\" is computed from {}, which role {} may only see masked",
                                policy.column_label(id),
                                self.role_name()
                            ),
                            "select the protected column itself, so its mask applies",
                        ).about(policy, id));
                    }
                }
            }
        };
        match action {
            Action::Allow => {}
            Action::Redact => return Ok((Some(Treatment::Redact), decrypt)),
            Action::Mask(mask) => {
                if format == BINARY_FORMAT && !self.text_like(source, type_oid, logical_oid) {
                    return Err(denied(
                        DenyReason::UnsupportedOnEncrypted,
                        source_table(policy, source),
                        "0A000",
                        format!(
                            "pgveil: cannot mask column \"{column_name}\" in binary format (type OID {}, role {})",
                            logical_oid,
                            self.role_name()
                        ),
                        "request this column in text format",
                    ));
                }
                return Ok((Some(Treatment::Mask(mask)), decrypt));
            }
            Action::Deny => {}
        }
        Ok((None, decrypt))
    }

    /// Whether a column's values in binary format are its text (so a mask can work on
    /// them): from the reported type, else (COPY) from the catalog's type of the
    /// protected column.
    fn text_like(&self, source: &ColumnSource, type_oid: Option<u32>, logical_oid: u32) -> bool {
        if type_oid.is_some() || logical_oid != 0 {
            return is_text_like(logical_oid);
        }
        match source {
            ColumnSource::Protected(column) => self
                .protection
                .catalog
                .column_types
                .get(column)
                .is_some_and(|name| {
                    name == "text"
                        || name.starts_with("character")
                        || name == "name"
                        || name == "citext"
                }),
            ColumnSource::Derived(_) => false,
        }
    }
}

/// What one protected column of a result gets: its treatment, and (encrypted) its
/// decryption: index, cipher, format.
type ColumnPlan = (Option<Treatment>, Option<(usize, Arc<ColumnCrypto>, i16)>);

/// The `table` label for a refusal about a column with this source.
fn source_table(policy: &crate::policy::Policy, source: &ColumnSource) -> String {
    match source {
        ColumnSource::Protected(column) => policy.table_label(*column),
        ColumnSource::Derived(columns) => columns
            .first()
            .map_or_else(|| UNKNOWN_TABLE.to_string(), |&id| policy.table_label(id)),
    }
}

/// Whether a statement may run while the audit log cannot be written: every statement
/// in its text reads or controls the session (SELECT, SHOW, SET, transaction control,
/// cursor moves…; nothing that writes, copies or runs code), it names no relation with
/// protected columns, and pgveil can read it to its end without doubt (no backslash, no
/// `U&"…"` name). A lexical test that errs towards no. What such a statement reads of
/// protected columns through a view or a cursor is refused at its result.
fn runs_unaudited(
    catalog: &crate::catalog::snapshot::CatalogSnapshot,
    sql: &[u8],
    client_encoding: &str,
) -> bool {
    if sql.contains(&b'\\')
        || catalog.names_protected_relation(sql, client_encoding)
        || crate::sqltext::lexemes(sql).any(|(lexeme, _)| lexeme == Lexeme::Unreadable)
    {
        return false;
    }
    crate::sqltext::split_statements(sql)
        .iter()
        .all(|statement| {
            matches!(
                crate::sqltext::leading_keyword(statement).as_deref(),
                Some(
                    "select"
                        | "values"
                        | "table"
                        | "show"
                        | "set"
                        | "reset"
                        | "begin"
                        | "start"
                        | "commit"
                        | "end"
                        | "rollback"
                        | "abort"
                        | "savepoint"
                        | "release"
                        | "fetch"
                        | "move"
                        | "close"
                        | "discard"
                        | "deallocate"
                        | "listen"
                        | "unlisten"
                )
            )
        })
}

/// How a statement ended, from the message that ends it (CommandComplete,
/// PortalSuspended or ErrorResponse), and the rows it counts: those the command tag
/// reports, else `rows_sent`. `None` for any other message.
pub(crate) fn statement_ended(tag: u8, body: &[u8], rows_sent: u64) -> Option<(Outcome, u64)> {
    match tag {
        b'C' => Some((
            Outcome::Ok,
            command_rows(command_tag(body)).unwrap_or(rows_sent),
        )),
        b's' => Some((Outcome::Ok, rows_sent)),
        b'E' => Some((Outcome::Error, rows_sent)),
        _ => None,
    }
}

/// The rows a command tag reports (`INSERT 0 5`, `SELECT 3`, `UPDATE 2`, `COPY 7`…).
fn command_rows(tag: &[u8]) -> Option<u64> {
    let word = tag.split(|&b| b == b' ').next()?;
    if !matches!(
        word,
        b"SELECT" | b"INSERT" | b"UPDATE" | b"DELETE" | b"MERGE" | b"COPY" | b"FETCH" | b"MOVE"
    ) {
        return None;
    }
    // The last word, in ASCII digits (this runs at the end of every statement).
    let count = tag.rsplit(|&b| b == b' ').next()?;
    if count.is_empty() {
        return None;
    }
    count.iter().try_fold(0u64, |rows, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        rows.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// A request the server is sure to answer with an error, in place of a refused one:
/// a Query that does not parse, an Execute of a portal no client names (a name starting
/// with byte 1), or a FunctionCall of OID 0.
fn failing_request(tag: u8) -> Vec<u8> {
    let mut frame = Vec::new();
    match tag {
        b'Q' => encode_frame(&mut frame, b'Q', b"pgveil refused this statement\0"),
        // A FunctionCall of OID 0: "function with OID 0 does not exist".
        b'F' => encode_frame(&mut frame, b'F', &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        _ => encode_frame(
            &mut frame,
            b'E',
            b"\x01pgveil refused this portal\0\0\0\0\0",
        ),
    }
    frame
}

/// Whether the next answer is to a Describe pgveil sent on its own.
fn answers_internal_describe(state: &SessionState) -> bool {
    matches!(
        state.next_expected(),
        Some(Expected::PortalDescription { internal: true, .. })
    )
}

/// One DataRow with its protected fields transformed; other fields are copied as they
/// are.
fn shape_row(shaping: &Shaping, body: &[u8]) -> Result<Result<Vec<u8>, usize>, GuardError> {
    let ranges = decode_data_row(body)?;
    if ranges.len() != shaping.width {
        return Err(GuardError::Unexpected(format!(
            "DataRow has {} columns, its RowDescription {}",
            ranges.len(),
            shaping.width
        )));
    }
    let mut values: Vec<Option<Cow<[u8]>>> = ranges
        .into_iter()
        .map(|range| range.map(|range| Cow::Borrowed(&body[range])))
        .collect();
    for (index, crypto, format) in &shaping.decrypt {
        let Some(slot) = values.get_mut(*index) else {
            continue;
        };
        if let Some(stored) = slot.as_deref() {
            let value = crypto
                .open(stored, *format)
                .ok()
                .and_then(|canonical| crypto.present(canonical, *format).ok());
            match value {
                Some(value) => *slot = Some(Cow::Owned(value)),
                None => return Ok(Err(*index)),
            }
        }
    }
    for (index, treatment) in &shaping.columns {
        let Some(slot) = values.get_mut(*index) else {
            continue;
        };
        match treatment {
            Treatment::Redact => *slot = None,
            Treatment::Mask(mask) => {
                if let Some(value) = slot.as_deref() {
                    let masked = mask.apply_bytes(value, shaping.hash_key.as_deref());
                    *slot = Some(Cow::Owned(masked));
                }
            }
        }
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    encode_data_row(&mut out, values.iter().map(|value| value.as_deref()));
    Ok(Ok(out))
}

/// The format code of each column of a CopyOutResponse (overall format, column count,
/// per-column codes); `None` when the message is malformed.
fn copy_out_formats(body: &[u8]) -> Option<Vec<i16>> {
    let count = usize::try_from(i16::from_be_bytes(body.get(1..3)?.try_into().ok()?)).ok()?;
    let codes = body.get(3..)?;
    if codes.len() != count * 2 {
        return None;
    }
    Some(
        codes
            .chunks_exact(2)
            .map(|pair| i16::from_be_bytes([pair[0], pair[1]]))
            .collect(),
    )
}

/// One field of a row as the role may see it: decrypted, then masked or redacted.
/// `Err(index)`: the value does not decrypt.
fn transform_field(
    shaping: &Shaping,
    index: usize,
    value: Option<&[u8]>,
    format: i16,
) -> Result<FieldChange, usize> {
    let mut current: Option<Cow<[u8]>> = value.map(Cow::Borrowed);
    let mut changed = false;
    if let Some((_, crypto, _)) = shaping.decrypt.iter().find(|(i, _, _)| *i == index) {
        if let Some(stored) = current.as_deref() {
            let plain = crypto
                .open(stored, format)
                .ok()
                .and_then(|canonical| crypto.present(canonical, format).ok())
                .ok_or(index)?;
            current = Some(Cow::Owned(plain));
            changed = true;
        }
    }
    if let Some((_, treatment)) = shaping.columns.iter().find(|(i, _)| *i == index) {
        match treatment {
            Treatment::Redact => current = None,
            Treatment::Mask(mask) => {
                current = current
                    .as_deref()
                    .map(|value| Cow::Owned(mask.apply_bytes(value, shaping.hash_key.as_deref())));
            }
        }
        changed = true;
    }
    Ok(if changed {
        FieldChange::Replace(current.map(Cow::into_owned))
    } else {
        FieldChange::Keep
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_membership_deadline_reads_the_clock_once_per_batch_until_it_passes() {
        let start = Instant::now();
        let mut deadline = MembershipDeadline::new(start + Duration::from_secs(60));
        let reads = std::cell::Cell::new(0);
        let clock = |at: Instant| {
            reads.set(reads.get() + 1);
            at
        };
        // Not yet due: the first request of a batch reads the clock, the rest do not.
        assert!(!deadline.passed(|| clock(start)));
        assert!(!deadline.passed(|| clock(start + Duration::from_secs(3600))));
        assert!(!deadline.passed(|| clock(start + Duration::from_secs(3600))));
        assert_eq!(reads.get(), 1);
        // The next batch reads it again, and sees the deadline pass.
        deadline.new_batch();
        assert!(deadline.passed(|| clock(start + Duration::from_secs(60))));
        // Passed stays passed, at every request, until the memberships are read again.
        assert!(deadline.passed(|| clock(start + Duration::from_secs(61))));
        assert_eq!(reads.get(), 3);
        // A new deadline is checked at once, even within the batch.
        deadline.set(start + Duration::from_secs(120));
        assert!(!deadline.passed(|| clock(start + Duration::from_secs(61))));
        assert_eq!(reads.get(), 4);
        deadline.set(start);
        assert!(deadline.passed(|| clock(start)));
    }

    #[test]
    fn command_rows_reads_the_count_of_row_commands_only() {
        assert_eq!(command_rows(b"SELECT 3"), Some(3));
        assert_eq!(command_rows(b"INSERT 0 5"), Some(5));
        assert_eq!(command_rows(b"COPY 18446744073709551615"), Some(u64::MAX));
        assert_eq!(command_rows(b"FETCH 0"), Some(0));
        // Not a count, or too large for one.
        assert_eq!(command_rows(b"COPY 18446744073709551616"), None);
        assert_eq!(command_rows(b"SELECT 3x"), None);
        assert_eq!(command_rows(b"SELECT -3"), None);
        assert_eq!(command_rows(b"SELECT "), None);
        assert_eq!(command_rows(b"SELECT"), None);
        // Commands that count nothing.
        assert_eq!(command_rows(b"CREATE TABLE"), None);
        assert_eq!(command_rows(b"BEGIN"), None);
    }

    #[test]
    fn a_statement_without_a_count_in_its_tag_counts_the_rows_sent() {
        assert_eq!(statement_ended(b'C', b"SET\0", 7), Some((Outcome::Ok, 7)));
        assert_eq!(
            statement_ended(b'C', b"UPDATE 2\0", 7),
            Some((Outcome::Ok, 2))
        );
        assert_eq!(statement_ended(b's', b"", 4), Some((Outcome::Ok, 4)));
        assert_eq!(statement_ended(b'E', b"", 1), Some((Outcome::Error, 1)));
        assert_eq!(statement_ended(b'D', b"", 1), None);
    }
}
