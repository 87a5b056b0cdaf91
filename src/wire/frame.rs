//! Framing of regular protocol messages: one type byte, a big-endian `i32` length that
//! counts itself, then the body.
//!
//! [`FrameHeader::parse`] validates a header; [`try_split_frame`] takes one whole frame
//! off a buffer. The session pump uses the header alone to stream large message bodies
//! through without buffering them. This module never allocates and never panics on
//! input.

use thiserror::Error;

/// Largest message length accepted (the length field, which counts itself). PostgreSQL
/// itself refuses messages over 1 GiB.
pub const MAX_FRAME_LENGTH: usize = 1 << 30;

/// Size of a frame header: the type byte and the length field.
pub const HEADER_LEN: usize = 5;

/// PostgreSQL's limit for frontend messages that never carry data (Close, Describe,
/// Execute, Flush, Sync, Terminate, CopyDone, CopyFail); see `PQ_SMALL_MESSAGE_LIMIT`.
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;

/// Largest length a client may declare for a message of type `tag`.
pub fn max_frontend_message_length(tag: u8) -> usize {
    match tag {
        b'C' | b'D' | b'E' | b'H' | b'S' | b'X' | b'c' | b'f' => SMALL_MESSAGE_LIMIT,
        _ => MAX_FRAME_LENGTH,
    }
}

/// A frame header that is not acceptable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {length} for message type {tag:?} (below 4)")]
    TooShort { tag: char, length: i64 },
    #[error("message of type {tag:?} is {length} bytes long, over the 1 GiB limit")]
    TooLong { tag: char, length: i64 },
    #[error("message of type {tag:?} is {length} bytes long, over its limit of {limit}")]
    TooLongForType {
        tag: char,
        length: usize,
        limit: usize,
    },
}

/// The type byte and total length of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub tag: u8,
    /// Length of the body, without the type byte and the length field.
    pub body_len: usize,
}

impl FrameHeader {
    /// Parses the header at the start of `bytes`; `Ok(None)` when fewer than five bytes
    /// are available.
    pub fn parse(bytes: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
        if bytes.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = bytes[0];
        let length = i64::from(i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]));
        if length < 4 {
            return Err(FrameError::TooShort {
                tag: char::from(tag),
                length,
            });
        }
        if length > MAX_FRAME_LENGTH as i64 {
            return Err(FrameError::TooLong {
                tag: char::from(tag),
                length,
            });
        }
        Ok(Some(FrameHeader {
            tag,
            body_len: (length - 4) as usize,
        }))
    }

    /// Length of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len
    }

    /// Checks the declared length against `limit` (which counts the length field).
    pub fn check_limit(&self, limit: usize) -> Result<(), FrameError> {
        let length = self.body_len + 4;
        if length > limit {
            return Err(FrameError::TooLongForType {
                tag: char::from(self.tag),
                length,
                limit,
            });
        }
        Ok(())
    }
}

/// One complete message borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    pub body: &'a [u8],
}

/// Takes the first whole frame off `bytes`: `Ok(Some((frame, frame_len)))`, or `Ok(None)`
/// when more bytes are needed. A declared length over `limit` (which counts the length
/// field) is an error as soon as the header is in, before any body is waited for.
pub fn try_split_frame(
    bytes: &[u8],
    limit: usize,
) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(header) = FrameHeader::parse(bytes)? else {
        return Ok(None);
    };
    header.check_limit(limit)?;
    let total = header.frame_len();
    if bytes.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            tag: header.tag,
            body: &bytes[HEADER_LEN..total],
        },
        total,
    )))
}

/// Appends a frame with `tag` and `body` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.reserve(HEADER_LEN + body.len());
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_five_bytes_for_a_header() {
        assert_eq!(FrameHeader::parse(b"Q\0\0\0").unwrap(), None);
    }

    #[test]
    fn splits_a_whole_frame_and_leaves_the_rest() {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, b'Q', b"select 1\0");
        bytes.extend_from_slice(b"S\0\0");
        let (frame, used) = try_split_frame(&bytes, MAX_FRAME_LENGTH).unwrap().unwrap();
        assert_eq!(frame.tag, b'Q');
        assert_eq!(frame.body, b"select 1\0");
        assert_eq!(used, 14);
        assert_eq!(
            try_split_frame(&bytes[used..], MAX_FRAME_LENGTH).unwrap(),
            None
        );
    }

    #[test]
    fn waits_for_the_whole_body() {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, b'Q', b"select 1\0");
        assert_eq!(
            try_split_frame(&bytes[..10], MAX_FRAME_LENGTH).unwrap(),
            None
        );
    }

    #[test]
    fn refuses_lengths_below_four() {
        for length in [0i32, 3, -1, i32::MIN] {
            let mut bytes = vec![b'Q'];
            bytes.extend_from_slice(&length.to_be_bytes());
            assert!(matches!(
                FrameHeader::parse(&bytes),
                Err(FrameError::TooShort { .. })
            ));
        }
    }

    #[test]
    fn refuses_lengths_over_one_gibibyte() {
        let mut bytes = vec![b'D'];
        bytes.extend_from_slice(&((MAX_FRAME_LENGTH as i32) + 1).to_be_bytes());
        assert!(matches!(
            FrameHeader::parse(&bytes),
            Err(FrameError::TooLong { .. })
        ));
        let mut bytes = vec![b'D'];
        bytes.extend_from_slice(&(MAX_FRAME_LENGTH as i32).to_be_bytes());
        assert_eq!(
            FrameHeader::parse(&bytes).unwrap().unwrap().body_len,
            MAX_FRAME_LENGTH - 4
        );
    }

    #[test]
    fn a_length_over_the_limit_fails_on_the_header_alone() {
        // Only the five header bytes are there; the claimed 1 GiB never needs to arrive.
        assert!(matches!(
            try_split_frame(b"p\x40\0\0\0", 65_536),
            Err(FrameError::TooLongForType { limit: 65_536, .. })
        ));
        assert_eq!(try_split_frame(b"p\0\0\x01\0", 65_536).unwrap(), None);
    }

    #[test]
    fn small_frontend_messages_have_their_own_limit() {
        let sync = FrameHeader {
            tag: b'S',
            body_len: 0,
        };
        assert!(sync.check_limit(max_frontend_message_length(b'S')).is_ok());
        let huge_sync = FrameHeader {
            tag: b'S',
            body_len: SMALL_MESSAGE_LIMIT,
        };
        assert!(matches!(
            huge_sync.check_limit(max_frontend_message_length(b'S')),
            Err(FrameError::TooLongForType {
                limit: SMALL_MESSAGE_LIMIT,
                ..
            })
        ));
        let query = FrameHeader {
            tag: b'Q',
            body_len: 1 << 20,
        };
        assert!(query.check_limit(max_frontend_message_length(b'Q')).is_ok());
    }

    #[test]
    fn an_empty_body_is_a_frame() {
        let (frame, used) = try_split_frame(b"S\0\0\0\x04", MAX_FRAME_LENGTH)
            .unwrap()
            .unwrap();
        assert_eq!((frame.tag, frame.body, used), (b'S', &b""[..], 5));
    }
}
