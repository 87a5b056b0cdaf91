//! One session's side of the audit log: turns each statement that ended (or was
//! refused) into an audit record, with who ran it, from where, what it touched and how
//! it ended, and hands it to the log's queue.
//!
//! A statement is recorded when its result carried protected columns, when pgveil
//! refused it, when its text names a relation with protected columns (writes, filters,
//! counts), or always with `all_statements`. Records carry the statement's fingerprint,
//! never its text: no value reaches the log. Nothing here waits or does I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use super::guard::{statement_ended, Finished, Outcome, ReadGuard};
use super::state::{Expected, SessionState};
use crate::observe::audit::{rfc3339_millis, AuditRecord};
use crate::observe::audit_log::AuditLog;
use crate::observe::fingerprint::fingerprint;
use crate::observe::metrics::{query_kind, QUERY_KINDS};
use crate::sqltext::{leading_keyword, split_statements};
use crate::wire::messages::command_tag;

/// Sessions opened by this process so far.
static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// This process's start, in hex seconds: session ids stay unique across restarts.
static PROCESS_STAMP: LazyLock<String> = LazyLock::new(|| {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}", started.as_secs())
});

/// A new session id: the process's start and the session's number in it.
pub fn new_session_id() -> String {
    let number = SESSIONS.fetch_add(1, Ordering::Relaxed) + 1;
    format!("{}-{number}", *PROCESS_STAMP)
}

/// The audit bookkeeping of one session.
pub struct SessionAudit {
    log: Arc<AuditLog>,
    session: String,
    client: String,
    user: String,
    database: String,
    application_name: String,
    /// Statements of the current simple Query that have ended: the next one's index.
    statement_index: usize,
    /// Fingerprints of statements recorded lately: prepared statements run again and
    /// again.
    fingerprints: HashMap<Vec<u8>, String>,
}

/// Most fingerprints a session keeps; past that it starts afresh.
const MAX_FINGERPRINTS: usize = 256;

impl SessionAudit {
    pub fn new(
        log: Arc<AuditLog>,
        session: String,
        peer: SocketAddr,
        user: String,
        database: String,
        application_name: String,
    ) -> SessionAudit {
        SessionAudit {
            log,
            session,
            client: peer.to_string(),
            user,
            database,
            application_name,
            statement_index: 0,
            fingerprints: HashMap::new(),
        }
    }

    /// Sees a server message after the read guard decided on it and before the session
    /// state records it (so the request it answers is still at the front).
    pub fn on_server_message(
        &mut self,
        state: &SessionState,
        guard: Option<&mut ReadGuard>,
        tag: u8,
        body: &[u8],
    ) {
        if tag == b'S' {
            self.parameter_status(body);
            return;
        }
        let answers_query = matches!(state.next_expected(), Some(Expected::SimpleQuery { .. }));
        let finished = match guard {
            Some(guard) => {
                let finished = guard.take_finished();
                finished.map(|finished| (finished, Some(&*guard)))
            }
            None => ended_without_guard(state, tag, body).map(|finished| (finished, None)),
        };
        if tag == b'Z' {
            self.statement_index = 0;
        }
        let Some((finished, guard)) = finished else {
            return;
        };
        let text = state.current_statement_text().unwrap_or_default();
        let statement = if let Some(sent) = &finished.statement {
            // The client's statement, which the server never saw.
            sent.as_slice()
        } else if answers_query {
            let index = self.statement_index;
            self.statement_index += 1;
            // A Query whose statements cannot be told apart is recorded whole.
            let statements = split_statements(text);
            statements.get(index).copied().unwrap_or(text)
        } else {
            text
        };
        let denied = matches!(finished.outcome, Outcome::Denied(_));
        let record = self.log.all_statements()
            || denied
            || !finished.columns.is_empty()
            || guard.is_some_and(|guard| guard.names_protected_relation(statement));
        if !record {
            return;
        }
        let kind = if tag == b'C' {
            QUERY_KINDS[query_kind(command_tag(body))]
        } else {
            statement_kind(statement)
        };
        let (outcome, reason) = match finished.outcome {
            Outcome::Ok => ("ok", None),
            Outcome::Error => ("error", None),
            Outcome::Denied(reason) => ("denied", Some(reason.label().to_string())),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let print = self.fingerprint(statement);
        self.log.record(AuditRecord {
            ts: rfc3339_millis(now),
            session: self.session.clone(),
            client: self.client.clone(),
            user: self.user.clone(),
            role: guard
                .map_or(super::pump::NO_POLICY_ROLE, ReadGuard::role_name)
                .to_string(),
            database: self.database.clone(),
            application_name: self.application_name.clone(),
            kind: kind.to_string(),
            statement: print,
            columns: finished.columns,
            rows: finished.rows,
            outcome: outcome.to_string(),
            reason,
        });
    }

    fn fingerprint(&mut self, statement: &[u8]) -> String {
        if let Some(known) = self.fingerprints.get(statement) {
            return known.clone();
        }
        let print = fingerprint(statement);
        if self.fingerprints.len() >= MAX_FINGERPRINTS {
            self.fingerprints.clear();
        }
        self.fingerprints.insert(statement.to_vec(), print.clone());
        print
    }

    /// `SET application_name` shows up as a ParameterStatus.
    fn parameter_status(&mut self, body: &[u8]) {
        if let Some(value) = crate::wire::messages::parameter_status(body, b"application_name") {
            self.application_name = String::from_utf8_lossy(value).into_owned();
        }
    }
}

/// How a statement ended, in a session without a policy (which has no read guard to
/// say so).
fn ended_without_guard(state: &SessionState, tag: u8, body: &[u8]) -> Option<Finished> {
    if !matches!(
        state.next_expected(),
        Some(Expected::SimpleQuery { .. } | Expected::ExecuteResult { .. })
    ) {
        return None;
    }
    let (outcome, rows) = statement_ended(tag, body, 0)?;
    Some(Finished {
        outcome,
        columns: Vec::new(),
        rows,
        statement: None,
    })
}

/// The `kind` of a statement that did not complete, from its first keyword.
fn statement_kind(sql: &[u8]) -> &'static str {
    match leading_keyword(sql).as_deref() {
        Some("select" | "table" | "values" | "fetch") => "select",
        Some("insert") => "insert",
        Some("update") => "update",
        Some("delete") => "delete",
        Some("copy") => "copy",
        _ => "other",
    }
}
