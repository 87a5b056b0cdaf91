//! Per-session protocol bookkeeping, driven by the frames that pass in each direction.
//!
//! It knows the prepared statements and portals that exist on the upstream backend, the
//! queue of responses the backend still owes the client (in the order the client asked
//! for them, pipelining included), whether the backend is skipping messages after an
//! error, and the transaction status. Later stages (policy, encryption) find here which
//! statement a response belongs to. This module does no I/O and must never decide to
//! forward or drop bytes: it only observes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use thiserror::Error;

use crate::sqltext::may_modify_data;
use crate::wire::messages::{
    command_tag, execute_portal, BindNames, MalformedMessage, Parse, Target, TargetName,
    TransactionStatus,
};
use crate::wire::rows::{bind_result_formats, decode_row_description, FieldDescription};

/// The result columns of a statement or portal: `None` when it returns no rows.
pub type ResultColumns = Option<Arc<[FieldDescription]>>;

/// A statement prepared through the extended protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedStatement {
    pub name: Bytes,
    /// The SQL text, byte for byte as the client sent it.
    pub query: Bytes,
    /// Parameter type OIDs the client specified (0 = let the server infer).
    pub parameter_types: Vec<u32>,
    /// The result columns, once the server answered a Describe of the statement. Its
    /// formats are all text: the real ones come with each Bind.
    pub columns: OnceLock<ResultColumns>,
}

/// A portal created by Bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    pub name: Bytes,
    /// The statement the portal was bound from; `None` when the name is not one pgveil
    /// saw prepared (for instance a statement made with SQL `PREPARE`).
    pub statement: Option<Arc<PreparedStatement>>,
    /// Result format codes of the Bind (empty: all text; one: for every column).
    pub result_formats: Vec<i16>,
    /// The result columns with their real formats, once the server answered a Describe
    /// of the portal.
    pub described: Option<ResultColumns>,
    /// How many executing requests (Query, Execute, FunctionCall) the client had sent
    /// before this portal's Bind.
    pub bound_after: u64,
    /// An Execute of the portal has completed (or suspended) at least once.
    pub executed: bool,
    /// Made by a protocol Bind (rather than by SQL `DECLARE`).
    pub from_bind: bool,
}

impl Portal {
    /// The result columns with the formats the rows will come in, or `None` when the
    /// server never described the portal or its statement to pgveil.
    pub fn result_columns(&self) -> Option<ResultColumns> {
        if let Some(described) = &self.described {
            return Some(described.clone());
        }
        let columns = self.statement.as_ref()?.columns.get()?.as_ref();
        Some(columns.map(|columns| {
            columns
                .iter()
                .enumerate()
                .map(|(index, field)| FieldDescription {
                    format: crate::wire::rows::format_of(&self.result_formats, index),
                    ..field.clone()
                })
                .collect()
        }))
    }
}

/// A simple Query's text, kept for the audit log. Its `Debug` shows only the length:
/// session errors print the queue, and the text may hold values.
#[derive(Clone, PartialEq, Eq)]
pub struct QueryText(pub Bytes);

impl std::fmt::Debug for QueryText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QueryText({} bytes)", self.0.len())
    }
}

/// One response (or group of responses) the backend still owes, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Parse → ParseComplete.
    ParseComplete(Arc<PreparedStatement>),
    /// Bind → BindComplete. The statement is resolved when BindComplete arrives, since
    /// in a pipeline its Parse may not be confirmed yet when Bind is sent.
    BindComplete {
        portal: Bytes,
        statement: Bytes,
        result_formats: Vec<i16>,
        bound_after: u64,
    },
    /// Describe of a statement → ParameterDescription, then RowDescription or NoData.
    StatementDescription { statement: Bytes },
    /// Describe of a portal → RowDescription or NoData. `internal` when pgveil sent it
    /// itself, ahead of an Execute: its answer is for pgveil, not the client.
    PortalDescription { portal: Bytes, internal: bool },
    /// Execute → rows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    /// `sent_after` counts the executing requests the client sent before this one.
    ExecuteResult {
        portal: Bytes,
        sent_after: u64,
        sent_at: Instant,
    },
    /// Close → CloseComplete.
    CloseComplete { target: Target, name: Bytes },
    /// Sync → ReadyForQuery.
    SyncReady,
    /// Query → any number of results, then ReadyForQuery. `modifies`: its text may run
    /// a data-modifying command (see `sqltext::may_modify_data`); `true` when that was
    /// not worked out (see [`SessionState::track_modifications`]). `sent_after` counts
    /// the executing requests sent before it; `text` is the query, kept only when the
    /// session is audited.
    SimpleQuery {
        modifies: bool,
        sent_after: u64,
        sent_at: Instant,
        text: Option<QueryText>,
    },
    /// FunctionCall → FunctionCallResponse, then ReadyForQuery.
    FunctionCallResult { sent_after: u64 },
    /// Not a response: the client sent CopyDone or CopyFail here, before the server
    /// announced the COPY. Dropped when it reaches the front of the queue.
    CopyInEnded,
}

/// Direction of a COPY in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    In,
    Out,
    Both,
}

/// How the pump treats a message type before its whole body has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Buffer the whole frame and show it to the session state.
    Inspect,
    /// Forward the bytes as they arrive; the body is never looked at.
    Stream,
}

/// A message stream pgveil cannot account for.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error(transparent)]
    Malformed(#[from] MalformedMessage),
    /// The client broke the protocol in a way the server would silently absorb,
    /// which would leave pgveil's view and the server's apart.
    #[error("{0}")]
    ClientViolation(String),
    /// A response matches no request pgveil saw. Everything later stages decide rests
    /// on this bookkeeping, so the session cannot go on.
    #[error("response {response:?} matches no pending request (expected {expected})")]
    Desync { response: char, expected: String },
}

/// Everything pgveil knows about one client session's protocol state.
#[derive(Debug, Default)]
pub struct SessionState {
    statements: HashMap<Bytes, Arc<PreparedStatement>>,
    portals: HashMap<Bytes, Portal>,
    pending: VecDeque<Expected>,
    /// After an error in the extended protocol the backend ignores messages up to the
    /// next Sync; set when that Sync has not been sent yet.
    discarding_until_sync: bool,
    transaction: TransactionStatus,
    copy: Option<CopyDirection>,
    /// The server is in COPY FROM STDIN and the client has not ended it yet. Meanwhile
    /// the server ignores Sync and Flush and takes anything but copy data as an error.
    copy_in_open: bool,
    /// Executing requests (Query, Execute, FunctionCall) the client has sent.
    executions_sent: u64,
    /// Work out for each simple Query whether it may modify data; when off, every
    /// Query may.
    track_modifications: bool,
    /// Keep each simple Query's text until it is answered (for the audit log).
    keep_query_text: bool,
}

impl SessionState {
    pub fn new() -> Self {
        SessionState::default()
    }

    /// A session state that notes, for each simple Query, whether it may modify data
    /// (the read guard needs it for rows returned by rules).
    pub fn tracking_modifications() -> Self {
        SessionState {
            track_modifications: true,
            ..SessionState::default()
        }
    }

    /// Whether the next simple Queries are read for data-modifying commands. Off when
    /// nothing depends on it (no rule returns protected rows): they are then all
    /// taken to modify data, which is what a reader of `modifies` must assume when
    /// it does not know.
    pub fn track_modifications(&mut self, on: bool) {
        self.track_modifications = on;
    }

    /// Keeps each simple Query's text in its [`Expected::SimpleQuery`] until answered.
    pub fn keeping_query_text(mut self) -> Self {
        self.keep_query_text = true;
        self
    }

    /// Executing requests (Query, Execute, FunctionCall) the client has sent so far.
    pub fn executions_sent(&self) -> u64 {
        self.executions_sent
    }

    /// Whether a Query, Execute or FunctionCall sent earlier is still unanswered.
    pub fn executions_pending(&self) -> bool {
        self.pending.iter().any(|expected| {
            matches!(
                expected,
                Expected::SimpleQuery { .. }
                    | Expected::ExecuteResult { .. }
                    | Expected::FunctionCallResult { .. }
            )
        })
    }

    pub fn transaction_status(&self) -> TransactionStatus {
        self.transaction
    }

    pub fn statement(&self, name: &[u8]) -> Option<&Arc<PreparedStatement>> {
        self.statements.get(name)
    }

    pub fn portal(&self, name: &[u8]) -> Option<&Portal> {
        self.portals.get(name)
    }

    /// The SQL text of the request the next response answers, when pgveil has it: a
    /// simple Query's (whole, all its statements; kept only when audited), an
    /// Execute's statement, or a described statement's.
    pub fn current_statement_text(&self) -> Option<&[u8]> {
        let portal_query = |name: &[u8]| {
            self.portals
                .get(name)
                .and_then(|portal| portal.statement.as_ref())
                .map(|statement| &statement.query[..])
        };
        match self.next_expected()? {
            Expected::SimpleQuery { text, .. } => text.as_ref().map(|text| &text.0[..]),
            Expected::ExecuteResult { portal, .. } => portal_query(portal),
            Expected::PortalDescription { portal, .. } => portal_query(portal),
            Expected::StatementDescription { statement } => self
                .statements
                .get(statement)
                .map(|statement| &statement.query[..]),
            Expected::ParseComplete(statement) => Some(&statement.query[..]),
            _ => None,
        }
    }

    pub fn pending(&self) -> &VecDeque<Expected> {
        &self.pending
    }

    /// The request the next response answers, skipping markers no response answers.
    pub fn next_expected(&self) -> Option<&Expected> {
        self.pending
            .iter()
            .find(|expected| !matches!(expected, Expected::CopyInEnded))
    }

    pub fn copy_in_progress(&self) -> Option<CopyDirection> {
        self.copy
    }

    /// Which client message types must be seen whole. CopyData streams; CopyDone and
    /// CopyFail are tiny and mark where a COPY ends.
    pub fn client_disposition(&self, tag: u8) -> Disposition {
        match tag {
            b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' | b'F' | b'X' | b'c' | b'f' => {
                Disposition::Inspect
            }
            _ => Disposition::Stream,
        }
    }

    /// Which server message types must be seen whole. DataRow, CopyData, notices and
    /// everything unknown stream through.
    pub fn server_disposition(&self, tag: u8) -> Disposition {
        match tag {
            b'Z' | b'1' | b'2' | b'3' | b'C' | b'E' | b'n' | b's' | b'I' | b'G' | b'H' | b'W'
            | b'T' | b't' => Disposition::Inspect,
            _ => Disposition::Stream,
        }
    }

    fn push_expected(&mut self, expected: Expected) {
        if self.discarding_until_sync {
            if expected == Expected::SyncReady {
                self.discarding_until_sync = false;
            } else {
                // The backend will skip this message without answering.
                return;
            }
        }
        self.pending.push_back(expected);
    }

    /// Records a message the client is about to send upstream. Must be called before
    /// the message is written, so the expectation is queued before any answer arrives.
    pub fn on_client_message(&mut self, tag: u8, body: &[u8]) -> Result<(), StateError> {
        if self.copy_in_open {
            return match tag {
                // Sync and Flush are ignored by the server during COPY IN.
                b'd' | b'S' | b'H' | b'X' => Ok(()),
                b'c' | b'f' => {
                    self.copy_in_open = false;
                    Ok(())
                }
                other => Err(StateError::ClientViolation(format!(
                    "message type {:?} sent during COPY FROM STDIN",
                    char::from(other)
                ))),
            };
        }
        match tag {
            b'Q' => {
                let sent_after = self.executions_sent;
                self.executions_sent += 1;
                let modifies = !self.track_modifications || may_modify_data(body);
                let text = self.keep_query_text.then(|| {
                    let query = body.strip_suffix(b"\0").unwrap_or(body);
                    QueryText(Bytes::copy_from_slice(query))
                });
                self.push_expected(Expected::SimpleQuery {
                    modifies,
                    sent_after,
                    sent_at: Instant::now(),
                    text,
                });
            }
            b'P' => {
                let parse = Parse::decode(body)?;
                self.push_expected(Expected::ParseComplete(Arc::new(PreparedStatement {
                    name: Bytes::copy_from_slice(parse.statement),
                    query: Bytes::copy_from_slice(parse.query),
                    parameter_types: parse.parameter_types,
                    columns: OnceLock::new(),
                })));
            }
            b'B' => {
                let names = BindNames::decode(body)?;
                let result_formats = bind_result_formats(body)?;
                self.push_expected(Expected::BindComplete {
                    portal: Bytes::copy_from_slice(names.portal),
                    statement: Bytes::copy_from_slice(names.statement),
                    result_formats,
                    bound_after: self.executions_sent,
                });
            }
            b'D' => {
                let target = TargetName::decode("Describe", body)?;
                let name = Bytes::copy_from_slice(target.name);
                self.push_expected(match target.target {
                    Target::Statement => Expected::StatementDescription { statement: name },
                    Target::Portal => Expected::PortalDescription {
                        portal: name,
                        internal: false,
                    },
                });
            }
            b'E' => {
                let portal = Bytes::copy_from_slice(execute_portal(body)?);
                let sent_after = self.executions_sent;
                self.executions_sent += 1;
                self.push_expected(Expected::ExecuteResult {
                    portal,
                    sent_after,
                    sent_at: Instant::now(),
                });
            }
            b'C' => {
                let target = TargetName::decode("Close", body)?;
                self.push_expected(Expected::CloseComplete {
                    target: target.target,
                    name: Bytes::copy_from_slice(target.name),
                });
            }
            b'S' => self.push_expected(Expected::SyncReady),
            b'F' => {
                self.executions_sent += 1;
                self.push_expected(Expected::FunctionCallResult {
                    sent_after: self.executions_sent - 1,
                });
            }
            // Sent before the server announced the COPY (or after it failed): remember
            // where the copy data ends, so Syncs before it can be told from those after.
            b'c' | b'f' => self.push_expected(Expected::CopyInEnded),
            _ => {}
        }
        Ok(())
    }

    /// Records a Describe of `portal` that pgveil sends on its own, just before the
    /// client's next message. Its answer is recorded like any portal description.
    pub fn on_internal_portal_describe(&mut self, portal: &[u8]) {
        self.push_expected(Expected::PortalDescription {
            portal: Bytes::copy_from_slice(portal),
            internal: true,
        });
    }

    /// The front of the queue, without markers that no response answers.
    fn front(&mut self) -> Option<&Expected> {
        while self.pending.front() == Some(&Expected::CopyInEnded) {
            self.pending.pop_front();
        }
        self.pending.front()
    }

    fn desync(&mut self, response: u8) -> StateError {
        StateError::Desync {
            response: char::from(response),
            expected: format!("{:?}", self.front()),
        }
    }

    /// Pops the front entry when `matches` accepts it; a desync otherwise.
    fn pop_matching(
        &mut self,
        response: u8,
        matches: impl Fn(&Expected) -> bool,
    ) -> Result<Expected, StateError> {
        if self.front().is_some_and(&matches) {
            if let Some(expected) = self.pending.pop_front() {
                return Ok(expected);
            }
        }
        Err(self.desync(response))
    }

    /// Records a message the backend sent, before it is forwarded to the client.
    pub fn on_server_message(&mut self, tag: u8, body: &[u8]) -> Result<(), StateError> {
        match tag {
            b'1' => {
                if let Expected::ParseComplete(statement) =
                    self.pop_matching(tag, |e| matches!(e, Expected::ParseComplete(_)))?
                {
                    self.statements.insert(statement.name.clone(), statement);
                }
            }
            b'2' => {
                if let Expected::BindComplete {
                    portal,
                    statement,
                    result_formats,
                    bound_after,
                } = self.pop_matching(tag, |e| matches!(e, Expected::BindComplete { .. }))?
                {
                    let statement = self.statements.get(&statement).cloned();
                    self.portals.insert(
                        portal.clone(),
                        Portal {
                            name: portal,
                            statement,
                            result_formats,
                            described: None,
                            bound_after,
                            executed: false,
                            from_bind: true,
                        },
                    );
                }
            }
            b'3' => {
                if let Expected::CloseComplete { target, name } =
                    self.pop_matching(tag, |e| matches!(e, Expected::CloseComplete { .. }))?
                {
                    match target {
                        Target::Statement => {
                            self.statements.remove(&name);
                        }
                        Target::Portal => {
                            self.portals.remove(&name);
                        }
                    }
                }
            }
            // ParameterDescription comes first in the answer to Describe of a statement.
            b't' if matches!(self.front(), Some(Expected::StatementDescription { .. })) => {}
            b't' => return Err(self.desync(tag)),
            b'T' => match self.front() {
                // Answers a Describe.
                Some(
                    Expected::StatementDescription { .. } | Expected::PortalDescription { .. },
                ) => {
                    if let Some(answered) = self.pending.pop_front() {
                        let columns: Arc<[FieldDescription]> = decode_row_description(body)?.into();
                        self.record_description(answered, Some(columns));
                    }
                }
                // Starts a result set of a simple query.
                Some(Expected::SimpleQuery { .. }) => {}
                _ => return Err(self.desync(tag)),
            },
            b'n' => {
                let answered = self.pop_matching(tag, |e| {
                    matches!(
                        e,
                        Expected::StatementDescription { .. } | Expected::PortalDescription { .. }
                    )
                })?;
                self.record_description(answered, None);
            }
            b'C' | b'I' | b's' => {
                self.copy = None;
                self.copy_in_open = false;
                if tag == b'C' {
                    self.forget_names_changed_by_sql(command_tag(body));
                }
                match self.front() {
                    Some(Expected::ExecuteResult { .. }) => {
                        if let Some(Expected::ExecuteResult { portal, .. }) =
                            self.pending.pop_front()
                        {
                            if let Some(portal) = self.portals.get_mut(&portal) {
                                portal.executed = true;
                            }
                        }
                    }
                    Some(Expected::SimpleQuery { .. }) => {}
                    _ => return Err(self.desync(tag)),
                }
            }
            b'G' => {
                self.copy = Some(CopyDirection::In);
                self.begin_copy_in()?;
            }
            b'H' => self.copy = Some(CopyDirection::Out),
            b'W' => self.copy = Some(CopyDirection::Both),
            b'E' => {
                self.copy = None;
                self.copy_in_open = false;
                match self.front() {
                    // A simple query or function call still ends with ReadyForQuery; an
                    // error with nothing pending is asynchronous (e.g. FATAL shutdown).
                    None
                    | Some(Expected::SimpleQuery { .. } | Expected::FunctionCallResult { .. }) => {}
                    Some(_) => {
                        // Extended protocol: the backend skips everything up to Sync.
                        while let Some(front) = self.pending.front() {
                            if *front == Expected::SyncReady {
                                break;
                            }
                            self.pending.pop_front();
                        }
                        if self.pending.is_empty() {
                            self.discarding_until_sync = true;
                        }
                    }
                }
            }
            b'Z' => {
                self.transaction = TransactionStatus::decode_ready_for_query(body)?;
                self.copy = None;
                self.copy_in_open = false;
                let answered = self.pop_matching(tag, |e| {
                    matches!(
                        e,
                        Expected::SyncReady
                            | Expected::SimpleQuery { .. }
                            | Expected::FunctionCallResult { .. }
                    )
                })?;
                if matches!(answered, Expected::SimpleQuery { .. }) {
                    // A simple Query destroys the unnamed statement and portal.
                    self.statements.remove(&b""[..]);
                    self.portals.remove(&b""[..]);
                }
                if self.transaction == TransactionStatus::Idle {
                    // Portals do not outlive their transaction.
                    self.portals.clear();
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Remembers what a Describe answered, for the statement or portal it named.
    fn record_description(&mut self, answered: Expected, columns: ResultColumns) {
        match answered {
            Expected::StatementDescription { statement } => {
                if let Some(prepared) = self.statements.get(&statement) {
                    // A statement's columns never change once described.
                    let _ = prepared.columns.set(columns);
                }
            }
            Expected::PortalDescription { portal, .. } => {
                let bound_after = self.executions_sent;
                self.portals
                    .entry(portal.clone())
                    .or_insert_with(|| Portal {
                        name: portal,
                        statement: None,
                        result_formats: Vec::new(),
                        described: None,
                        bound_after,
                        executed: false,
                        from_bind: false,
                    })
                    .described = Some(columns);
            }
            _ => {}
        }
    }

    /// CopyInResponse: the front entry is the Query or Execute that started the COPY.
    /// The server ignores Syncs sent after it until the copy ends, so they get no
    /// answer; any other message in between would be swallowed as an error.
    fn begin_copy_in(&mut self) -> Result<(), StateError> {
        if !matches!(
            self.front(),
            Some(Expected::SimpleQuery { .. } | Expected::ExecuteResult { .. })
        ) {
            return Err(self.desync(b'G'));
        }
        while let Some(entry) = self.pending.get(1) {
            match entry {
                Expected::SyncReady => {
                    self.pending.remove(1);
                }
                Expected::CopyInEnded => {
                    // The client already ended the copy; what follows is answered.
                    self.pending.remove(1);
                    return Ok(());
                }
                other => {
                    return Err(StateError::ClientViolation(format!(
                        "request sent between a COPY FROM STDIN and its data: {other:?}"
                    )))
                }
            }
        }
        self.copy_in_open = true;
        Ok(())
    }

    /// SQL `PREPARE`/`DEALLOCATE` share the names of protocol statements. pgveil does
    /// not parse which name they touched, so it forgets them all: an unknown name is
    /// safer than a wrong one. Portals are kept across SQL `DECLARE`/`CLOSE`: what a
    /// portal returns is only ever taken from a Describe of it sent right before it
    /// runs, and what pgveil keeps (the statement it was bound from) is needed to check
    /// a FETCH whose cursor was replaced.
    fn forget_names_changed_by_sql(&mut self, tag: &[u8]) {
        match tag {
            b"PREPARE" | b"DEALLOCATE" | b"DEALLOCATE ALL" => self.statements.clear(),
            b"DISCARD ALL" => {
                self.statements.clear();
                self.portals.clear();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(b"\0\0\0");
        body
    }

    fn named(name: &str) -> Vec<u8> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        body
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        let mut body = named(portal);
        body.extend_from_slice(&named(statement));
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body
    }

    fn target(kind: u8, name: &str) -> Vec<u8> {
        let mut body = vec![kind];
        body.extend_from_slice(&named(name));
        body
    }

    fn execute(portal: &str) -> Vec<u8> {
        let mut body = named(portal);
        body.extend_from_slice(&[0, 0, 0, 0]);
        body
    }

    #[test]
    fn pipeline_creates_statement_and_portal_then_drops_portal_at_idle() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("s1", "select 1"))
            .unwrap();
        state.on_client_message(b'B', &bind("p1", "s1")).unwrap();
        state.on_client_message(b'D', &target(b'P', "p1")).unwrap();
        state.on_client_message(b'E', &execute("p1")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        assert_eq!(state.pending().len(), 5);

        state.on_server_message(b'1', b"").unwrap();
        assert_eq!(state.statement(b"s1").unwrap().query.as_ref(), b"select 1");
        // Bind went out before ParseComplete came back; the portal still finds it.
        state.on_server_message(b'2', b"").unwrap();
        let portal = state.portal(b"p1").unwrap();
        assert_eq!(portal.statement.as_ref().unwrap().name.as_ref(), b"s1");
        state.on_server_message(b'T', b"\0\0").unwrap();
        state.on_server_message(b'D', b"").unwrap();
        state.on_server_message(b'C', b"SELECT 1\0").unwrap();
        assert_eq!(state.pending().front(), Some(&Expected::SyncReady));
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());
        assert!(state.portal(b"p1").is_none());
        assert!(state.statement(b"s1").is_some());
    }

    #[test]
    fn error_mid_pipeline_skips_to_sync_and_the_next_batch_works() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("bad", "selec"))
            .unwrap();
        state.on_client_message(b'B', &bind("", "bad")).unwrap();
        state.on_client_message(b'E', &execute("")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state
            .on_client_message(b'P', &parse("good", "select 1"))
            .unwrap();
        state.on_client_message(b'S', b"").unwrap();

        state.on_server_message(b'E', b"SERROR\0\0").unwrap();
        assert_eq!(state.pending().front(), Some(&Expected::SyncReady));
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.statement(b"bad").is_none());
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.statement(b"good").is_some());
        assert!(state.pending().is_empty());
    }

    #[test]
    fn messages_sent_after_an_error_and_before_sync_are_not_expected() {
        let mut state = SessionState::new();
        state.on_client_message(b'P', &parse("", "selec")).unwrap();
        state.on_client_message(b'H', b"").unwrap();
        state.on_server_message(b'E', b"SERROR\0\0").unwrap();
        assert!(state.pending().is_empty());
        // The client keeps going without knowing about the error yet.
        state.on_client_message(b'B', &bind("", "")).unwrap();
        state.on_client_message(b'E', &execute("")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        assert_eq!(
            state.pending().iter().collect::<Vec<_>>(),
            vec![&Expected::SyncReady]
        );
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());
    }

    #[test]
    fn simple_query_with_several_statements_and_an_error() {
        let mut state = SessionState::tracking_modifications();
        state
            .on_client_message(b'Q', b"select 1; select x; select 3\0")
            .unwrap();
        state.on_server_message(b'T', b"").unwrap();
        state.on_server_message(b'C', b"SELECT 1\0").unwrap();
        state.on_server_message(b'E', b"SERROR\0\0").unwrap();
        assert!(matches!(
            state.pending().front(),
            Some(&Expected::SimpleQuery {
                modifies: false,
                ..
            })
        ));
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());
    }

    #[test]
    fn a_query_not_read_for_modifications_may_modify_data() {
        let modifies = |state: &mut SessionState, sql: &[u8]| {
            state.on_client_message(b'Q', sql).unwrap();
            let Some(Expected::SimpleQuery { modifies, .. }) = state.pending().back() else {
                panic!("no SimpleQuery expected after a Query");
            };
            *modifies
        };
        let mut state = SessionState::tracking_modifications();
        assert!(!modifies(&mut state, b"select 1\0"));
        assert!(modifies(&mut state, b"insert into t values (1)\0"));
        state.track_modifications(false);
        assert!(modifies(&mut state, b"select 1\0"));
        state.track_modifications(true);
        assert!(!modifies(&mut state, b"select 2\0"));
    }

    #[test]
    fn portals_survive_inside_a_transaction_and_close_removes_them() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("s", "select 1"))
            .unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b'Z', b"T").unwrap();
        state.on_client_message(b'B', &bind("cur", "s")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'2', b"").unwrap();
        state.on_server_message(b'Z', b"T").unwrap();
        assert_eq!(state.transaction_status(), TransactionStatus::InTransaction);
        let portal = state.portal(b"cur").unwrap();
        assert_eq!(portal.statement.as_ref().unwrap().name.as_ref(), b"s");

        state.on_client_message(b'C', &target(b'P', "cur")).unwrap();
        state.on_client_message(b'C', &target(b'S', "s")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'3', b"").unwrap();
        state.on_server_message(b'3', b"").unwrap();
        state.on_server_message(b'Z', b"T").unwrap();
        assert!(state.portal(b"cur").is_none());
        assert!(state.statement(b"s").is_none());
    }

    #[test]
    fn describe_statement_answers_with_parameters_then_row_description() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("s", "select $1"))
            .unwrap();
        state.on_client_message(b'D', &target(b'S', "s")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b't', b"").unwrap();
        let mut row_description = 1i16.to_be_bytes().to_vec();
        row_description.extend_from_slice(b"x\0");
        row_description.extend_from_slice(&[0, 0, 0x40, 0, 0, 3, 0, 0, 0, 25, 255, 255]);
        row_description.extend_from_slice(&[255, 255, 255, 255, 0, 0]);
        state.on_server_message(b'T', &row_description).unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());
        let columns = state.statement(b"s").unwrap().columns.get().unwrap();
        let column = &columns.as_ref().unwrap()[0];
        assert_eq!(
            (column.table_oid, column.attnum, column.type_oid),
            (16384, 3, 25)
        );
    }

    #[test]
    fn portals_know_their_result_formats_and_described_columns() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("s", "select 1"))
            .unwrap();
        let mut bind_body = named("p");
        bind_body.extend_from_slice(&named("s"));
        bind_body.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 1]);
        state.on_client_message(b'B', &bind_body).unwrap();
        state.on_client_message(b'E', &execute("p")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b'2', b"").unwrap();
        // Never described: pgveil does not know the columns.
        assert_eq!(state.portal(b"p").unwrap().result_formats, vec![1]);
        assert!(state.portal(b"p").unwrap().result_columns().is_none());
        assert!(matches!(
            state.next_expected(),
            Some(Expected::ExecuteResult { .. })
        ));
    }

    #[test]
    fn simple_query_drops_the_unnamed_statement_and_copy_state_is_tracked() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("", "select 1"))
            .unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.statement(b"").is_some());
        state
            .on_client_message(b'Q', b"copy t from stdin\0")
            .unwrap();
        state.on_server_message(b'G', b"").unwrap();
        assert_eq!(state.copy_in_progress(), Some(CopyDirection::In));
        state.on_server_message(b'C', b"COPY 2\0").unwrap();
        assert_eq!(state.copy_in_progress(), None);
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.statement(b"").is_none());
    }

    #[test]
    fn deallocate_all_forgets_statements() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("s", "select 1"))
            .unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        state.on_client_message(b'Q', b"deallocate all\0").unwrap();
        state.on_server_message(b'C', b"DEALLOCATE ALL\0").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.statement(b"s").is_none());
    }

    #[test]
    fn syncs_sent_during_an_extended_copy_in_get_no_answer() {
        // libpq and tokio-postgres: P/B/D/E/S, then the data, CopyDone and Sync.
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("", "copy t from stdin"))
            .unwrap();
        state.on_client_message(b'B', &bind("", "")).unwrap();
        state.on_client_message(b'D', &target(b'P', "")).unwrap();
        state.on_client_message(b'E', &execute("")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b'2', b"").unwrap();
        state.on_server_message(b'n', b"").unwrap();
        state.on_server_message(b'G', b"").unwrap();
        // The server will ignore that first Sync.
        let pending: Vec<_> = state.pending().iter().collect();
        assert!(
            matches!(
                pending[..],
                [Expected::ExecuteResult { portal, sent_after: 0, .. }] if portal.is_empty()
            ),
            "{pending:?}"
        );
        state.on_client_message(b'd', b"1\n").unwrap();
        state.on_client_message(b'H', b"").unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_client_message(b'c', b"").unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'C', b"COPY 1\0").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());

        // The bookkeeping still matches what follows.
        state
            .on_client_message(b'P', &parse("after", "select 1"))
            .unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.statement(b"after").is_some());
    }

    #[test]
    fn copy_data_pipelined_before_the_copy_response_is_accounted_for() {
        let mut state = SessionState::new();
        state.on_client_message(b'B', &bind("", "s")).unwrap();
        state.on_client_message(b'E', &execute("")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_client_message(b'd', b"1\n").unwrap();
        state.on_client_message(b'c', b"").unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'2', b"").unwrap();
        state.on_server_message(b'G', b"").unwrap();
        state.on_server_message(b'C', b"COPY 1\0").unwrap();
        // Only the Sync after CopyDone is answered.
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());
    }

    #[test]
    fn a_failed_simple_copy_leaves_no_stale_entries() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'Q', b"copy t from stdin\0")
            .unwrap();
        state.on_server_message(b'G', b"").unwrap();
        state.on_client_message(b'd', b"bad\n").unwrap();
        state.on_server_message(b'E', b"SERROR\0\0").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        // The client had not seen the error yet and ends its copy; the server ignores it.
        state.on_client_message(b'd', b"more\n").unwrap();
        state.on_client_message(b'c', b"").unwrap();
        state.on_client_message(b'Q', b"select 1\0").unwrap();
        state.on_server_message(b'T', b"").unwrap();
        state.on_server_message(b'C', b"SELECT 1\0").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());
    }

    #[test]
    fn other_messages_during_copy_in_are_refused() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'Q', b"copy t from stdin\0")
            .unwrap();
        state.on_server_message(b'G', b"").unwrap();
        assert!(matches!(
            state.on_client_message(b'Q', b"select 1\0"),
            Err(StateError::ClientViolation(_))
        ));

        let mut pipelined = SessionState::new();
        pipelined
            .on_client_message(b'Q', b"copy t from stdin\0")
            .unwrap();
        pipelined.on_client_message(b'Q', b"select 1\0").unwrap();
        assert!(matches!(
            pipelined.on_server_message(b'G', b""),
            Err(StateError::ClientViolation(_))
        ));
    }

    #[test]
    fn sql_prepare_and_deallocate_make_statement_names_unknown() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'P', &parse("s1", "select 1 as harmless"))
            .unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'1', b"").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        state
            .on_client_message(b'Q', b"deallocate s1; prepare s1 as select 2\0")
            .unwrap();
        state.on_server_message(b'C', b"DEALLOCATE\0").unwrap();
        state.on_server_message(b'C', b"PREPARE\0").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.statement(b"s1").is_none());
        state.on_client_message(b'B', &bind("p", "s1")).unwrap();
        state.on_client_message(b'S', b"").unwrap();
        state.on_server_message(b'2', b"").unwrap();
        state.on_server_message(b'Z', b"T").unwrap();
        assert_eq!(state.portal(b"p").unwrap().statement, None);
    }

    #[test]
    fn a_response_nobody_asked_for_is_a_desync() {
        let mut state = SessionState::new();
        assert!(matches!(
            state.on_server_message(b'Z', b"I"),
            Err(StateError::Desync { response: 'Z', .. })
        ));
        let mut state = SessionState::new();
        state.on_client_message(b'S', b"").unwrap();
        assert!(matches!(
            state.on_server_message(b'1', b""),
            Err(StateError::Desync { response: '1', .. })
        ));
        // An error with nothing pending is asynchronous (admin shutdown), not a desync.
        let mut state = SessionState::new();
        state.on_server_message(b'E', b"SFATAL\0\0").unwrap();
    }

    #[test]
    fn malformed_client_messages_are_errors() {
        let mut state = SessionState::new();
        assert!(state.on_client_message(b'P', b"no terminator").is_err());
        assert!(state.on_client_message(b'D', b"Xname\0").is_err());
        assert!(state.on_server_message(b'Z', b"?").is_err());
    }
}
