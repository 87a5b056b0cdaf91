//! Per-session protocol bookkeeping, driven by the frames that pass in each direction.
//!
//! It knows the prepared statements and portals that exist on the upstream backend, the
//! queue of responses the backend still owes the client (in the order the client asked
//! for them, pipelining included), whether the backend is skipping messages after an
//! error, and the transaction status. Later stages (policy, encryption) find here which
//! statement a response belongs to. This module does no I/O and must never decide to
//! forward or drop bytes: it only observes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;

use crate::wire::messages::{
    command_tag, execute_portal, BindNames, MalformedMessage, Parse, Target, TargetName,
    TransactionStatus,
};

/// A statement prepared through the extended protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedStatement {
    pub name: Bytes,
    /// The SQL text, byte for byte as the client sent it.
    pub query: Bytes,
    /// Parameter type OIDs the client specified (0 = let the server infer).
    pub parameter_types: Vec<u32>,
}

/// A portal created by Bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    pub name: Bytes,
    /// The statement the portal was bound from; `None` when the name is not one pgveil
    /// saw prepared (for instance a statement made with SQL `PREPARE`).
    pub statement: Option<Arc<PreparedStatement>>,
}

/// One response (or group of responses) the backend still owes, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Parse → ParseComplete.
    ParseComplete(Arc<PreparedStatement>),
    /// Bind → BindComplete. The statement is resolved when BindComplete arrives, since
    /// in a pipeline its Parse may not be confirmed yet when Bind is sent.
    BindComplete { portal: Bytes, statement: Bytes },
    /// Describe of a statement → ParameterDescription, then RowDescription or NoData.
    StatementDescription { statement: Bytes },
    /// Describe of a portal → RowDescription or NoData.
    PortalDescription { portal: Bytes },
    /// Execute → rows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    ExecuteResult { portal: Bytes },
    /// Close → CloseComplete.
    CloseComplete { target: Target, name: Bytes },
    /// Sync → ReadyForQuery.
    SyncReady,
    /// Query → any number of results, then ReadyForQuery.
    SimpleQuery,
    /// FunctionCall → FunctionCallResponse, then ReadyForQuery.
    FunctionCallResult,
}

impl Expected {
    /// Whether this request ends with ReadyForQuery (errors do not discard it).
    fn ends_with_ready(&self) -> bool {
        matches!(
            self,
            Expected::SyncReady | Expected::SimpleQuery | Expected::FunctionCallResult
        )
    }
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
    terminated: bool,
    /// Responses that matched no expectation (counted, never fatal).
    unexpected_responses: u64,
}

impl SessionState {
    pub fn new() -> Self {
        SessionState::default()
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

    pub fn pending(&self) -> &VecDeque<Expected> {
        &self.pending
    }

    pub fn copy_in_progress(&self) -> Option<CopyDirection> {
        self.copy
    }

    pub fn terminated(&self) -> bool {
        self.terminated
    }

    pub fn unexpected_responses(&self) -> u64 {
        self.unexpected_responses
    }

    /// Which client message types must be seen whole.
    pub fn client_disposition(&self, tag: u8) -> Disposition {
        match tag {
            b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'F' | b'X' => Disposition::Inspect,
            _ => Disposition::Stream,
        }
    }

    /// Which server message types must be seen whole. DataRow, CopyData, notices and
    /// everything unknown stream through.
    pub fn server_disposition(&self, tag: u8) -> Disposition {
        match tag {
            b'Z' | b'1' | b'2' | b'3' | b'C' | b'E' | b'n' | b's' | b'I' | b'G' | b'H' | b'W'
            | b'T' => Disposition::Inspect,
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
    pub fn on_client_message(&mut self, tag: u8, body: &[u8]) -> Result<(), MalformedMessage> {
        match tag {
            b'Q' => self.push_expected(Expected::SimpleQuery),
            b'P' => {
                let parse = Parse::decode(body)?;
                self.push_expected(Expected::ParseComplete(Arc::new(PreparedStatement {
                    name: Bytes::copy_from_slice(parse.statement),
                    query: Bytes::copy_from_slice(parse.query),
                    parameter_types: parse.parameter_types,
                })));
            }
            b'B' => {
                let names = BindNames::decode(body)?;
                self.push_expected(Expected::BindComplete {
                    portal: Bytes::copy_from_slice(names.portal),
                    statement: Bytes::copy_from_slice(names.statement),
                });
            }
            b'D' => {
                let target = TargetName::decode("Describe", body)?;
                let name = Bytes::copy_from_slice(target.name);
                self.push_expected(match target.target {
                    Target::Statement => Expected::StatementDescription { statement: name },
                    Target::Portal => Expected::PortalDescription { portal: name },
                });
            }
            b'E' => {
                let portal = Bytes::copy_from_slice(execute_portal(body)?);
                self.push_expected(Expected::ExecuteResult { portal });
            }
            b'C' => {
                let target = TargetName::decode("Close", body)?;
                self.push_expected(Expected::CloseComplete {
                    target: target.target,
                    name: Bytes::copy_from_slice(target.name),
                });
            }
            b'S' => self.push_expected(Expected::SyncReady),
            b'F' => self.push_expected(Expected::FunctionCallResult),
            b'X' => self.terminated = true,
            _ => {}
        }
        Ok(())
    }

    fn pop_expected(
        &mut self,
        what: &'static str,
        matches: impl Fn(&Expected) -> bool,
    ) -> Option<Expected> {
        if self.pending.front().is_some_and(&matches) {
            return self.pending.pop_front();
        }
        self.unexpected_responses += 1;
        debug!(response = what, front = ?self.pending.front(), "response matches no pending request");
        None
    }

    /// Records a message the backend sent, before it is forwarded to the client.
    pub fn on_server_message(&mut self, tag: u8, body: &[u8]) -> Result<(), MalformedMessage> {
        match tag {
            b'1' => {
                if let Some(Expected::ParseComplete(statement)) =
                    self.pop_expected("ParseComplete", |e| matches!(e, Expected::ParseComplete(_)))
                {
                    self.statements.insert(statement.name.clone(), statement);
                }
            }
            b'2' => {
                if let Some(Expected::BindComplete { portal, statement }) = self
                    .pop_expected("BindComplete", |e| {
                        matches!(e, Expected::BindComplete { .. })
                    })
                {
                    let statement = self.statements.get(&statement).cloned();
                    self.portals.insert(
                        portal.clone(),
                        Portal {
                            name: portal,
                            statement,
                        },
                    );
                }
            }
            b'3' => {
                if let Some(Expected::CloseComplete { target, name }) = self
                    .pop_expected("CloseComplete", |e| {
                        matches!(e, Expected::CloseComplete { .. })
                    })
                {
                    match target {
                        Target::Statement => self.statements.remove(&name),
                        Target::Portal => self.portals.remove(&name).and(None),
                    };
                }
            }
            b'T' => {
                // Answers a Describe; inside a Query or Execute it starts a result set.
                if matches!(
                    self.pending.front(),
                    Some(
                        Expected::StatementDescription { .. } | Expected::PortalDescription { .. }
                    )
                ) {
                    self.pending.pop_front();
                }
            }
            b'n' => {
                self.pop_expected("NoData", |e| {
                    matches!(
                        e,
                        Expected::StatementDescription { .. } | Expected::PortalDescription { .. }
                    )
                });
            }
            b'C' | b'I' | b's' => {
                self.copy = None;
                if let Some(b"DEALLOCATE ALL" | b"DISCARD ALL") = Some(command_tag(body)) {
                    self.statements.clear();
                }
                if matches!(self.pending.front(), Some(Expected::ExecuteResult { .. })) {
                    self.pending.pop_front();
                } else if !matches!(self.pending.front(), Some(Expected::SimpleQuery)) {
                    self.pop_expected("CommandComplete", |_| false);
                }
            }
            b'G' => self.copy = Some(CopyDirection::In),
            b'H' => self.copy = Some(CopyDirection::Out),
            b'W' => self.copy = Some(CopyDirection::Both),
            b'E' => {
                self.copy = None;
                match self.pending.front() {
                    // A simple query or function call still ends with ReadyForQuery; an
                    // error with nothing pending is asynchronous (e.g. FATAL shutdown).
                    None | Some(Expected::SimpleQuery | Expected::FunctionCallResult) => {}
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
                // Pop up to and including the request this ReadyForQuery answers.
                loop {
                    match self.pending.pop_front() {
                        Some(Expected::SimpleQuery) => {
                            // A simple Query destroys the unnamed statement and portal.
                            self.statements.remove(&b""[..]);
                            self.portals.remove(&b""[..]);
                            break;
                        }
                        Some(expected) if expected.ends_with_ready() => break,
                        Some(other) => {
                            self.unexpected_responses += 1;
                            debug!(skipped = ?other, "ReadyForQuery before an expected response");
                        }
                        None => {
                            self.unexpected_responses += 1;
                            break;
                        }
                    }
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
        assert_eq!(state.unexpected_responses(), 0);
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
        assert_eq!(state.unexpected_responses(), 0);
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
        assert_eq!(state.unexpected_responses(), 0);
    }

    #[test]
    fn simple_query_with_several_statements_and_an_error() {
        let mut state = SessionState::new();
        state
            .on_client_message(b'Q', b"select 1; select x; select 3\0")
            .unwrap();
        state.on_server_message(b'T', b"").unwrap();
        state.on_server_message(b'C', b"SELECT 1\0").unwrap();
        state.on_server_message(b'E', b"SERROR\0\0").unwrap();
        assert_eq!(state.pending().front(), Some(&Expected::SimpleQuery));
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());
        assert_eq!(state.unexpected_responses(), 0);
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
        assert_eq!(state.unexpected_responses(), 0);
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
        state.on_server_message(b'T', b"").unwrap();
        state.on_server_message(b'Z', b"I").unwrap();
        assert!(state.pending().is_empty());
        assert_eq!(state.unexpected_responses(), 0);
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
    fn malformed_client_messages_are_errors() {
        let mut state = SessionState::new();
        assert!(state.on_client_message(b'P', b"no terminator").is_err());
        assert!(state.on_client_message(b'D', b"Xname\0").is_err());
        assert!(state.on_server_message(b'Z', b"?").is_err());
    }
}
