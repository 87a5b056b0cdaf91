//! The hot path: one pump per direction copies bytes from one peer to the other,
//! splitting them into messages only as far as the session state asks.
//!
//! Message types nobody inspects (DataRow of unprotected results, CopyData, notices,
//! unknown types) are streamed: their bodies are forwarded as they arrive, never
//! buffered whole, so memory per session stays bounded whatever the result size.
//! Inspected messages are shown to [`SessionState`] before they are written, so every
//! expectation is queued before its answer can arrive, and, when a policy is loaded, to
//! the [`ReadGuard`], which may replace or drop them. Everything else is forwarded
//! exactly as received.

use std::io;
use std::sync::Mutex;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::audit::SessionAudit;
use super::guard::{GuardError, ReadGuard, Refresh, Verdict};
use super::state::{Disposition, Expected, SessionState, StateError};
use crate::observe::metrics::QueryMeter;
use crate::wire::frame::{
    encode_frame, max_frontend_message_length, FrameError, FrameHeader, HEADER_LEN,
};
use crate::wire::messages::{command_tag, error_is_fatal};

/// The `role` label (and audit `role`) of statements in sessions without a policy.
pub(crate) const NO_POLICY_ROLE: &str = "none";

/// Initial read buffer per direction; it grows only to hold one inspected message.
const READ_CHUNK: usize = 16 * 1024;

/// The buffer grows by at most this much ahead of the bytes that actually arrived, so
/// a header that merely claims a huge length reserves nothing.
const MAX_RESERVE_STEP: usize = 1 << 20;

/// An empty buffer larger than this is given back after a large message.
const SHRINK_ABOVE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

/// Why a pump stopped without error.
#[derive(Debug, PartialEq, Eq)]
pub enum PumpEnd {
    /// The sending peer closed its side at a message boundary.
    Eof,
    /// The client sent Terminate (already forwarded).
    Terminated,
}

#[derive(Debug, Error)]
pub enum PumpError {
    #[error("read failed: {0}")]
    Read(io::Error),
    #[error("write failed: {0}")]
    Write(io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error(
        "a {kind:?} message of {length} bytes exceeds limits.max_inspected_message_bytes ({limit})"
    )]
    TooLargeToInspect {
        kind: char,
        length: usize,
        limit: usize,
    },
}

/// What both pumps of a session share.
pub struct Shared {
    pub state: SessionState,
    /// The policy's read path; `None` when no policy is loaded.
    pub guard: Option<ReadGuard>,
    /// Counts completed statements for `pgveil_queries_total` and their durations.
    meter: QueryMeter,
    /// Records statements in the audit log; `None` when no audit log is kept.
    audit: Option<SessionAudit>,
}

impl Shared {
    pub fn new(guard: Option<ReadGuard>, audit: Option<SessionAudit>) -> Self {
        let state = if guard.is_some() {
            SessionState::tracking_modifications()
        } else {
            SessionState::new()
        };
        Shared {
            state: if audit.is_some() {
                state.keeping_query_text()
            } else {
                state
            },
            guard,
            meter: QueryMeter::default(),
            audit,
        }
    }

    /// Shows a server message to the audit bookkeeping, after the read guard and before
    /// the session state.
    fn audit_server_message(&mut self, tag: u8, body: &[u8]) {
        if let Some(audit) = self.audit.as_mut() {
            audit.on_server_message(&self.state, self.guard.as_mut(), tag, body);
        }
    }

    /// Counts a statement whose CommandComplete is about to be forwarded, with the time
    /// since its Query or Execute was sent.
    fn count_completion(&mut self, body: &[u8]) {
        let sent_at = match self.state.next_expected() {
            Some(
                Expected::SimpleQuery { sent_at, .. } | Expected::ExecuteResult { sent_at, .. },
            ) => *sent_at,
            _ => return,
        };
        let role = self
            .guard
            .as_ref()
            .map_or(NO_POLICY_ROLE, |g| g.role_name());
        self.meter
            .record(role, command_tag(body), sent_at.elapsed());
    }

    fn disposition(&self, direction: Direction, tag: u8) -> Disposition {
        match direction {
            // CopyData of a COPY into encrypted columns: its rows are rewritten.
            Direction::ClientToServer
                if tag == b'd' && self.guard.as_ref().is_some_and(|g| g.rewrites_copy_data()) =>
            {
                Disposition::Inspect
            }
            Direction::ClientToServer => self.state.client_disposition(tag),
            // ParameterStatus: the audit log follows `SET application_name`, the write
            // path `client_encoding`.
            Direction::ServerToClient
                if tag == b'S' && (self.audit.is_some() || self.guard.is_some()) =>
            {
                Disposition::Inspect
            }
            Direction::ServerToClient => {
                match self.guard.as_ref().and_then(|g| g.must_inspect_server(tag)) {
                    Some(true) => Disposition::Inspect,
                    Some(false) => Disposition::Stream,
                    None => self.state.server_disposition(tag),
                }
            }
        }
    }
}

/// One direction of a session.
pub struct Pump {
    direction: Direction,
    buf: BytesMut,
    /// Body bytes of a streamed message still to forward.
    streaming: usize,
    /// A write was started and has not completed (it may have been cancelled midway).
    writing: bool,
    /// The last message forwarded was a FATAL or PANIC ErrorResponse.
    last_was_fatal_error: bool,
    /// Output being assembled when messages were replaced or dropped.
    edited: Vec<u8>,
    /// Largest server message held whole for inspection.
    inspect_limit: usize,
}

impl Pump {
    /// A pump that first processes `already_read` (bytes read during startup).
    pub fn new(direction: Direction, already_read: BytesMut) -> Self {
        let mut buf = already_read;
        buf.reserve(READ_CHUNK);
        Pump {
            direction,
            buf,
            streaming: 0,
            writing: false,
            last_was_fatal_error: false,
            edited: Vec::new(),
            inspect_limit: usize::MAX,
        }
    }

    /// Bounds the server messages this pump holds whole (client messages have their
    /// own per-type limits).
    pub fn with_inspect_limit(mut self, limit: usize) -> Self {
        self.inspect_limit = limit;
        self
    }

    /// Whether the receiving peer is between messages, so pgveil may send one of its own.
    pub fn at_message_boundary(&self) -> bool {
        !self.writing && self.streaming == 0
    }

    pub fn last_was_fatal_error(&self) -> bool {
        self.last_was_fatal_error
    }

    /// Pumps until end of stream, Terminate, or an error.
    pub async fn run<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        shared: &Mutex<Shared>,
    ) -> Result<PumpEnd, PumpError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let scanned = {
                // Both pumps of a session run inside one task, so a panic in either
                // unwinds the other too: no pump ever sees this lock poisoned. Taking
                // the guard either way only avoids an unwrap.
                let mut shared = shared.lock().unwrap_or_else(|poison| poison.into_inner());
                self.scan(&mut shared)
            };
            if scanned.consumed > 0 {
                self.writing = true;
                let output = if scanned.edited {
                    &self.edited[..]
                } else {
                    &self.buf[..scanned.consumed]
                };
                writer.write_all(output).await.map_err(PumpError::Write)?;
                self.writing = false;
                self.buf.advance(scanned.consumed);
                self.edited.clear();
                if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
                    self.buf = BytesMut::with_capacity(READ_CHUNK);
                }
                if self.edited.capacity() > SHRINK_ABOVE {
                    self.edited = Vec::new();
                }
            }
            if let Some(error) = scanned.error {
                return Err(error);
            }
            if let Some(refresh) = scanned.await_catalog {
                let waiting = {
                    let shared = shared.lock().unwrap_or_else(|poison| poison.into_inner());
                    shared
                        .guard
                        .as_ref()
                        .map(|guard| (guard.engine().clone(), guard.database().to_string()))
                };
                if let Some((engine, database)) = waiting {
                    if let Err(error) = engine
                        .refresh(&database, refresh.newer_than, refresh.changes_needed)
                        .await
                    {
                        tracing::warn!(%database, %error, "catalog refresh failed");
                    }
                }
                let mut shared = shared.lock().unwrap_or_else(|poison| poison.into_inner());
                if let Some(guard) = shared.guard.as_mut() {
                    guard.catalog_refreshed(refresh);
                }
                continue;
            }
            if scanned.await_memberships {
                let waiting = {
                    let shared = shared.lock().unwrap_or_else(|poison| poison.into_inner());
                    shared.guard.as_ref().map(|guard| {
                        (
                            guard.engine().clone(),
                            guard.database().to_string(),
                            guard.user().to_string(),
                        )
                    })
                };
                let memberships = match waiting {
                    Some((engine, database, user)) => {
                        match engine.memberships(&database, &user).await {
                            Ok(memberships) => Some(memberships),
                            Err(error) => {
                                tracing::warn!(%database, %user, %error, "cannot read role memberships again");
                                None
                            }
                        }
                    }
                    None => None,
                };
                let mut shared = shared.lock().unwrap_or_else(|poison| poison.into_inner());
                if let Some(guard) = shared.guard.as_mut() {
                    guard.memberships_refreshed(memberships);
                }
                continue;
            }
            if scanned.terminated {
                writer.flush().await.map_err(PumpError::Write)?;
                return Ok(PumpEnd::Terminated);
            }
            if scanned.need > 0 {
                self.buf.reserve(scanned.need.min(MAX_RESERVE_STEP));
            } else if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let read = reader
                .read_buf(&mut self.buf)
                .await
                .map_err(PumpError::Read)?;
            if read == 0 {
                if self.buf.is_empty() && self.streaming == 0 {
                    return Ok(PumpEnd::Eof);
                }
                return Err(PumpError::Truncated);
            }
        }
    }

    /// Walks the buffered bytes: how many can be consumed now (and what to write for
    /// them), how many more bytes the next inspected message needs, and the error that
    /// stops the pump after the valid messages before it are forwarded.
    fn scan(&mut self, shared: &mut Shared) -> Scanned {
        if self.direction == Direction::ClientToServer {
            if let Some(guard) = shared.guard.as_mut() {
                guard.client_bytes_arrived();
            }
        }
        let mut pos = 0;
        let mut copied = 0;
        let result = self.scan_from(shared, &mut pos, &mut copied);
        // A Describe inserted ahead of the first message leaves `copied` at 0 but
        // `edited` non-empty.
        let edited = copied > 0 || !self.edited.is_empty();
        if edited {
            self.edited.extend_from_slice(&self.buf[copied..pos]);
        }
        let mut scanned = Scanned {
            consumed: pos,
            edited,
            need: 0,
            terminated: false,
            await_catalog: None,
            await_memberships: false,
            error: None,
        };
        match result {
            Ok(Stop::More(need)) => scanned.need = need,
            Ok(Stop::Terminated) => scanned.terminated = true,
            Ok(Stop::AwaitCatalog(refresh)) => scanned.await_catalog = Some(refresh),
            Ok(Stop::AwaitMemberships) => scanned.await_memberships = true,
            Err(error) => scanned.error = Some(error),
        }
        scanned
    }

    /// Scans from `pos`; `copied` is how far the buffer was copied into `edited`
    /// (0 while nothing was replaced or dropped).
    fn scan_from(
        &mut self,
        shared: &mut Shared,
        pos: &mut usize,
        copied: &mut usize,
    ) -> Result<Stop, PumpError> {
        let len = self.buf.len();
        loop {
            if self.streaming > 0 {
                let take = self.streaming.min(len - *pos);
                *pos += take;
                self.streaming -= take;
                if self.streaming > 0 {
                    return Ok(Stop::More(0));
                }
            }
            let Some(header) = FrameHeader::parse(&self.buf[*pos..])? else {
                return Ok(Stop::More(0));
            };
            if self.direction == Direction::ClientToServer {
                header.check_limit(max_frontend_message_length(header.tag))?;
            }
            if shared.disposition(self.direction, header.tag) == Disposition::Stream {
                if header.tag == b'D' && self.direction == Direction::ServerToClient {
                    if let Some(guard) = shared.guard.as_mut() {
                        guard.row_streamed();
                    }
                }
                self.last_was_fatal_error = false;
                *pos += HEADER_LEN;
                self.streaming = header.body_len;
                continue;
            }
            if self.direction == Direction::ServerToClient && header.body_len > self.inspect_limit {
                return Err(PumpError::TooLargeToInspect {
                    kind: char::from(header.tag),
                    length: header.body_len,
                    limit: self.inspect_limit,
                });
            }
            let total = header.frame_len();
            if len - *pos < total {
                return Ok(Stop::More(total - (len - *pos)));
            }
            let body = &self.buf[*pos + HEADER_LEN..*pos + total];
            let verdict = match self.direction {
                Direction::ClientToServer => {
                    let verdict = match shared.guard.as_mut() {
                        Some(guard) => {
                            let verdict =
                                guard.on_client_message(&shared.state, header.tag, body)?;
                            if header.tag == b'Q' {
                                shared
                                    .state
                                    .track_modifications(guard.tracks_modifications());
                            }
                            verdict
                        }
                        None => Verdict::Forward,
                    };
                    if let Verdict::DescribeFirst(portal) = &verdict {
                        shared.state.on_internal_portal_describe(portal);
                    }
                    match &verdict {
                        Verdict::Forward | Verdict::DescribeFirst(_) => {
                            shared.state.on_client_message(header.tag, body)?;
                        }
                        // The server sees the substitute or the rewritten messages
                        // (a CopyData may become a CopyFail): so must the session state.
                        Verdict::Substitute(frames) | Verdict::Replace(frames) => {
                            let mut rest = &frames[..];
                            while let Some(sent) = FrameHeader::parse(rest)? {
                                let total = sent.frame_len();
                                let body = rest.get(HEADER_LEN..total).unwrap_or_default();
                                shared.state.on_client_message(sent.tag, body)?;
                                rest = rest.get(total..).unwrap_or_default();
                            }
                        }
                        _ => {}
                    }
                    verdict
                }
                Direction::ServerToClient => {
                    let verdict = match shared.guard.as_mut() {
                        Some(guard) => {
                            match guard.on_server_message(&shared.state, header.tag, body) {
                                Ok(verdict) => verdict,
                                Err(error) => {
                                    // A refusal that ends the session is audited too.
                                    shared.audit_server_message(header.tag, body);
                                    return Err(error.into());
                                }
                            }
                        }
                        None => Verdict::Forward,
                    };
                    if header.tag == b'C' && verdict == Verdict::Forward {
                        shared.count_completion(body);
                    }
                    if !matches!(
                        verdict,
                        Verdict::AwaitCatalog(_) | Verdict::AwaitMemberships
                    ) {
                        shared.audit_server_message(header.tag, body);
                        shared.state.on_server_message(header.tag, body)?;
                    }
                    verdict
                }
            };
            let start = *pos;
            match verdict {
                Verdict::AwaitCatalog(refresh) => return Ok(Stop::AwaitCatalog(refresh)),
                Verdict::AwaitMemberships => return Ok(Stop::AwaitMemberships),
                Verdict::Forward => {
                    if self.direction == Direction::ServerToClient {
                        self.last_was_fatal_error = header.tag == b'E' && error_is_fatal(body);
                    }
                }
                Verdict::Replace(replacement) | Verdict::Substitute(replacement) => {
                    self.edited.extend_from_slice(&self.buf[*copied..start]);
                    self.edited.extend_from_slice(&replacement);
                    *copied = start + total;
                    self.last_was_fatal_error = false;
                }
                Verdict::Drop => {
                    self.edited.extend_from_slice(&self.buf[*copied..start]);
                    *copied = start + total;
                }
                Verdict::DescribeFirst(portal) => {
                    self.edited.extend_from_slice(&self.buf[*copied..start]);
                    let mut describe = Vec::with_capacity(portal.len() + 2);
                    describe.push(b'P');
                    describe.extend_from_slice(&portal);
                    describe.push(0);
                    encode_frame(&mut self.edited, b'D', &describe);
                    // The Execute itself follows, copied from the buffer.
                    *copied = start;
                }
            }
            *pos += total;
            if self.direction == Direction::ClientToServer && header.tag == b'X' {
                // Nothing after Terminate is forwarded.
                return Ok(Stop::Terminated);
            }
        }
    }
}

/// Why a scan stopped.
enum Stop {
    /// The buffer is used up; the next inspected message needs this many more bytes.
    More(usize),
    Terminated,
    AwaitCatalog(Refresh),
    AwaitMemberships,
}

struct Scanned {
    /// Buffer bytes done with.
    consumed: usize,
    /// Whether `Pump::edited` holds what to write for them instead of the bytes.
    edited: bool,
    need: usize,
    terminated: bool,
    await_catalog: Option<Refresh>,
    await_memberships: bool,
    error: Option<PumpError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pump_bytes(
        direction: Direction,
        input: &[u8],
    ) -> (Vec<u8>, Result<PumpEnd, PumpError>) {
        let state = Mutex::new(Shared::new(None, None));
        let mut pump = Pump::new(direction, BytesMut::new());
        let mut reader = input;
        let mut output = Vec::new();
        let end = pump.run(&mut reader, &mut output, &state).await;
        (output, end)
    }

    #[tokio::test]
    async fn forwards_every_byte_unchanged() {
        let mut input = Vec::new();
        encode_frame(&mut input, b'Q', b"select '\xff\xfe'\0");
        encode_frame(&mut input, b'?', b"unknown message type");
        encode_frame(&mut input, b'F', b"\0\0\0\x01\0\0\0\0\0\0");
        encode_frame(&mut input, b'd', &vec![7u8; 100_000]);
        let (output, end) = pump_bytes(Direction::ClientToServer, &input).await;
        assert_eq!(end.unwrap(), PumpEnd::Eof);
        assert_eq!(output, input);
    }

    #[tokio::test]
    async fn stops_after_terminate() {
        let mut input = Vec::new();
        encode_frame(&mut input, b'X', b"");
        encode_frame(&mut input, b'Q', b"select 1\0");
        let (output, end) = pump_bytes(Direction::ClientToServer, &input).await;
        assert_eq!(end.unwrap(), PumpEnd::Terminated);
        assert_eq!(output, b"X\0\0\0\x04");
    }

    #[tokio::test]
    async fn refuses_a_bad_length_after_forwarding_what_came_before() {
        let mut input = Vec::new();
        encode_frame(&mut input, b'Q', b"select 1\0");
        input.extend_from_slice(b"Q\0\0\0\x02");
        let (output, end) = pump_bytes(Direction::ClientToServer, &input).await;
        assert!(matches!(
            end,
            Err(PumpError::Frame(FrameError::TooShort { .. }))
        ));
        assert_eq!(output.len(), 14);
    }

    #[tokio::test]
    async fn a_truncated_message_is_an_error() {
        let mut input = Vec::new();
        encode_frame(&mut input, b'D', b"0123456789");
        input.truncate(input.len() - 3);
        let (_, end) = pump_bytes(Direction::ServerToClient, &input).await;
        assert!(matches!(end, Err(PumpError::Truncated)));
    }

    #[tokio::test]
    async fn inspected_messages_larger_than_the_buffer_are_reassembled() {
        let mut input = Vec::new();
        let mut body = vec![b'a'; 3 * READ_CHUNK];
        body.push(0);
        encode_frame(&mut input, b'Q', &body);
        let (output, end) = pump_bytes(Direction::ClientToServer, &input).await;
        assert_eq!(end.unwrap(), PumpEnd::Eof);
        assert_eq!(output, input);
    }

    #[tokio::test]
    async fn remembers_a_fatal_error() {
        let mut input = Vec::new();
        encode_frame(&mut input, b'E', b"SFATAL\0VFATAL\0C57P01\0Mbye\0\0");
        let state = Mutex::new(Shared::new(None, None));
        let mut pump = Pump::new(Direction::ServerToClient, BytesMut::new());
        let mut output = Vec::new();
        let end = pump
            .run(&mut &input[..], &mut output, &state)
            .await
            .unwrap();
        assert_eq!(end, PumpEnd::Eof);
        assert!(pump.last_was_fatal_error());
        assert!(pump.at_message_boundary());
    }
}
