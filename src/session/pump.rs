//! The hot path: one pump per direction copies bytes from one peer to the other,
//! splitting them into messages only as far as the session state asks.
//!
//! Message types the state does not inspect (DataRow, CopyData, notices, unknown types)
//! are streamed: their bodies are forwarded as they arrive, never buffered whole, so
//! memory per session stays bounded whatever the result size. Inspected messages are
//! shown to [`SessionState`] before they are written, so every expectation is queued
//! before its answer can arrive. Bytes are forwarded exactly as received.

use std::io;
use std::sync::Mutex;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::state::{Disposition, SessionState, StateError};
use crate::wire::frame::{max_frontend_message_length, FrameError, FrameHeader, HEADER_LEN};
use crate::wire::messages::error_is_fatal;

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
        }
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
        state: &Mutex<SessionState>,
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
                let mut state = state.lock().unwrap_or_else(|poison| poison.into_inner());
                self.scan(&mut state)
            };
            if scanned.forward > 0 {
                self.writing = true;
                writer
                    .write_all(&self.buf[..scanned.forward])
                    .await
                    .map_err(PumpError::Write)?;
                self.writing = false;
                self.buf.advance(scanned.forward);
                if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
                    self.buf = BytesMut::with_capacity(READ_CHUNK);
                }
            }
            if let Some(error) = scanned.error {
                return Err(error);
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

    /// Walks the buffered bytes: how many can be forwarded now, how many more bytes the
    /// next inspected message needs, and the error that stops the pump after the valid
    /// messages before it are forwarded.
    fn scan(&mut self, state: &mut SessionState) -> Scanned {
        let mut pos = 0;
        match self.scan_from(state, &mut pos) {
            Ok(scanned) => scanned,
            Err(error) => Scanned {
                forward: pos,
                need: 0,
                terminated: false,
                error: Some(error),
            },
        }
    }

    fn scan_from(
        &mut self,
        state: &mut SessionState,
        pos: &mut usize,
    ) -> Result<Scanned, PumpError> {
        let len = self.buf.len();
        loop {
            if self.streaming > 0 {
                let take = self.streaming.min(len - *pos);
                *pos += take;
                self.streaming -= take;
                if self.streaming > 0 {
                    return Ok(Scanned::forward(*pos));
                }
            }
            let Some(header) = FrameHeader::parse(&self.buf[*pos..])? else {
                return Ok(Scanned::forward(*pos));
            };
            if self.direction == Direction::ClientToServer {
                header.check_limit(max_frontend_message_length(header.tag))?;
            }
            let disposition = match self.direction {
                Direction::ClientToServer => state.client_disposition(header.tag),
                Direction::ServerToClient => state.server_disposition(header.tag),
            };
            if disposition == Disposition::Stream {
                self.last_was_fatal_error = false;
                *pos += HEADER_LEN;
                self.streaming = header.body_len;
                continue;
            }
            let total = header.frame_len();
            if len - *pos < total {
                return Ok(Scanned {
                    forward: *pos,
                    need: total - (len - *pos),
                    terminated: false,
                    error: None,
                });
            }
            let body = &self.buf[*pos + HEADER_LEN..*pos + total];
            match self.direction {
                Direction::ClientToServer => state.on_client_message(header.tag, body)?,
                Direction::ServerToClient => {
                    state.on_server_message(header.tag, body)?;
                    self.last_was_fatal_error = header.tag == b'E' && error_is_fatal(body);
                }
            }
            *pos += total;
            if self.direction == Direction::ClientToServer && header.tag == b'X' {
                // Nothing after Terminate is forwarded.
                return Ok(Scanned {
                    forward: *pos,
                    need: 0,
                    terminated: true,
                    error: None,
                });
            }
        }
    }
}

struct Scanned {
    forward: usize,
    need: usize,
    terminated: bool,
    error: Option<PumpError>,
}

impl Scanned {
    fn forward(forward: usize) -> Self {
        Scanned {
            forward,
            need: 0,
            terminated: false,
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::encode_frame;

    async fn pump_bytes(
        direction: Direction,
        input: &[u8],
    ) -> (Vec<u8>, Result<PumpEnd, PumpError>) {
        let state = Mutex::new(SessionState::new());
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
        let state = Mutex::new(SessionState::new());
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
