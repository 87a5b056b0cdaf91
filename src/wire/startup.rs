//! Startup packets: the untyped, length-prefixed messages a client sends before the
//! regular message flow (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest).
//!
//! Decoding validates lengths and codes and keeps parameter names and values as raw
//! bytes. Nothing here performs I/O or trusts a length it has not checked.

use bytes::Bytes;
use thiserror::Error;

use super::{read_i32, split_cstr};

/// PostgreSQL's own limit on the size of a startup packet.
pub const MAX_STARTUP_PACKET_LENGTH: usize = 10_000;

const SSL_REQUEST_CODE: i32 = (1234 << 16) | 5679;
const GSSENC_REQUEST_CODE: i32 = (1234 << 16) | 5680;
const CANCEL_REQUEST_CODE: i32 = (1234 << 16) | 5678;
const PROTOCOL_3_0: i32 = 3 << 16;

/// A startup packet that cannot be accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    BadLength(i64),
    #[error("unsupported frontend protocol {major}.{minor}: pgveil speaks protocol 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("unknown startup request code {0}")]
    UnknownRequestCode(i32),
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
}

/// The key a CancelRequest carries (protocol 3.0: a process id and a 4-byte secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub process_id: i32,
    pub secret: [u8; 4],
}

impl CancelKey {
    /// The 16-byte CancelRequest packet for this key.
    pub fn encode_request(&self) -> [u8; 16] {
        let mut packet = [0u8; 16];
        packet[0..4].copy_from_slice(&16i32.to_be_bytes());
        packet[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        packet[8..12].copy_from_slice(&self.process_id.to_be_bytes());
        packet[12..16].copy_from_slice(&self.secret);
        packet
    }
}

/// A protocol 3.x StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// Minor protocol version the client asked for (pgveil answers 3.0).
    pub minor_version: u16,
    /// Every parameter in the order the client sent it, as raw bytes.
    pub parameters: Vec<(Bytes, Bytes)>,
}

impl StartupMessage {
    /// The value of parameter `name`, if the client sent it.
    pub fn parameter(&self, name: &[u8]) -> Option<&Bytes> {
        self.parameters
            .iter()
            .find(|(key, _)| key.as_ref() == name)
            .map(|(_, value)| value)
    }

    /// Protocol options (`_pq_.*`) the client asked for; pgveil supports none of them.
    pub fn protocol_options(&self) -> impl Iterator<Item = &Bytes> {
        self.parameters
            .iter()
            .map(|(key, _)| key)
            .filter(|key| key.starts_with(b"_pq_."))
    }

    /// The protocol 3.0 StartupMessage to send upstream: every parameter except the
    /// `_pq_.*` protocol options, byte for byte.
    pub fn encode_v3_0(&self) -> Vec<u8> {
        let mut packet = vec![0u8; 8];
        packet[4..8].copy_from_slice(&PROTOCOL_3_0.to_be_bytes());
        for (key, value) in &self.parameters {
            if key.starts_with(b"_pq_.") {
                continue;
            }
            packet.extend_from_slice(key);
            packet.push(0);
            packet.extend_from_slice(value);
            packet.push(0);
        }
        packet.push(0);
        let length = packet.len() as i32;
        packet[0..4].copy_from_slice(&length.to_be_bytes());
        packet
    }
}

/// Any packet a client may open a connection with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// Takes one startup packet off the front of `bytes`: `Ok(Some((packet, used)))`, or
/// `Ok(None)` when more bytes are needed.
pub fn try_split_startup(bytes: &[u8]) -> Result<Option<(StartupPacket, usize)>, StartupError> {
    let Some(length) = read_i32(bytes, 0) else {
        return Ok(None);
    };
    let length = i64::from(length);
    if !(8..=MAX_STARTUP_PACKET_LENGTH as i64).contains(&length) {
        return Err(StartupError::BadLength(length));
    }
    let length = length as usize;
    if bytes.len() < length {
        return Ok(None);
    }
    let packet = &bytes[..length];
    let code = read_i32(packet, 4).ok_or(StartupError::Malformed("missing request code"))?;
    let body = &packet[8..];
    let decoded = match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => {
            return Err(StartupError::Malformed("request carries unexpected bytes"))
        }
        SSL_REQUEST_CODE => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            if body.len() != 8 {
                return Err(StartupError::Malformed("cancel request must be 16 bytes"));
            }
            let process_id = read_i32(body, 0).ok_or(StartupError::Malformed("cancel key"))?;
            StartupPacket::Cancel(CancelKey {
                process_id,
                secret: [body[4], body[5], body[6], body[7]],
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major == 1234 {
                return Err(StartupError::UnknownRequestCode(code));
            }
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            StartupPacket::Startup(StartupMessage {
                minor_version: minor,
                parameters: decode_parameters(body)?,
            })
        }
    };
    Ok(Some((decoded, length)))
}

fn decode_parameters(mut body: &[u8]) -> Result<Vec<(Bytes, Bytes)>, StartupError> {
    let mut parameters = Vec::new();
    loop {
        let (key, rest) =
            split_cstr(body).ok_or(StartupError::Malformed("parameter name not terminated"))?;
        if key.is_empty() {
            if !rest.is_empty() {
                return Err(StartupError::Malformed("bytes after the parameter list"));
            }
            return Ok(parameters);
        }
        let (value, rest) =
            split_cstr(rest).ok_or(StartupError::Malformed("parameter value not terminated"))?;
        parameters.push((Bytes::copy_from_slice(key), Bytes::copy_from_slice(value)));
        body = rest;
    }
}

/// The NegotiateProtocolVersion message: pgveil supports minor version 0 and none of
/// the listed protocol options.
pub fn encode_negotiate_protocol_version<'a>(
    unsupported_options: impl Iterator<Item = &'a Bytes>,
) -> Vec<u8> {
    let options: Vec<&Bytes> = unsupported_options.collect();
    let mut body = Vec::new();
    body.extend_from_slice(&0i32.to_be_bytes());
    body.extend_from_slice(&(options.len() as i32).to_be_bytes());
    for option in options {
        body.extend_from_slice(option);
        body.push(0);
    }
    let mut frame = Vec::new();
    super::frame::encode_frame(&mut frame, b'v', &body);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, body: &[u8]) -> Vec<u8> {
        let mut bytes = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&code.to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn decodes_a_startup_message_with_raw_parameters() {
        let bytes = packet(
            PROTOCOL_3_0,
            b"user\0alice\0database\0caf\xe9\0options\0-c x=1\0\0",
        );
        let (decoded, used) = try_split_startup(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        let StartupPacket::Startup(message) = decoded else {
            panic!("not a startup message: {decoded:?}")
        };
        assert_eq!(message.parameter(b"user").unwrap().as_ref(), b"alice");
        assert_eq!(message.parameter(b"database").unwrap().as_ref(), b"caf\xe9");
        assert_eq!(message.encode_v3_0(), bytes);
    }

    #[test]
    fn drops_protocol_options_when_reencoding() {
        let bytes = packet(
            (3 << 16) | 2,
            b"user\0bob\0_pq_.test\0on\0application_name\0app\0\0",
        );
        let (StartupPacket::Startup(message), _) = try_split_startup(&bytes).unwrap().unwrap()
        else {
            panic!("not a startup message")
        };
        assert_eq!(message.minor_version, 2);
        assert_eq!(
            message.protocol_options().collect::<Vec<_>>(),
            vec![&Bytes::from_static(b"_pq_.test")]
        );
        let expected = packet(PROTOCOL_3_0, b"user\0bob\0application_name\0app\0\0");
        assert_eq!(message.encode_v3_0(), expected);
    }

    #[test]
    fn decodes_requests() {
        assert_eq!(
            try_split_startup(&packet(SSL_REQUEST_CODE, b"")).unwrap(),
            Some((StartupPacket::SslRequest, 8))
        );
        assert_eq!(
            try_split_startup(&packet(GSSENC_REQUEST_CODE, b"")).unwrap(),
            Some((StartupPacket::GssEncRequest, 8))
        );
        let key = CancelKey {
            process_id: 4242,
            secret: [1, 2, 3, 4],
        };
        assert_eq!(
            try_split_startup(&key.encode_request()).unwrap(),
            Some((StartupPacket::Cancel(key), 16))
        );
    }

    #[test]
    fn waits_for_the_whole_packet() {
        let bytes = packet(PROTOCOL_3_0, b"user\0alice\0\0");
        assert_eq!(try_split_startup(&bytes[..3]).unwrap(), None);
        assert_eq!(try_split_startup(&bytes[..bytes.len() - 1]).unwrap(), None);
    }

    #[test]
    fn refuses_bad_lengths_and_codes() {
        assert_eq!(
            try_split_startup(&[0, 0, 0, 4, 0, 0, 0, 0]),
            Err(StartupError::BadLength(4))
        );
        assert_eq!(
            try_split_startup(b"GET / HTTP/1.1\r\n"),
            Err(StartupError::BadLength(0x4745_5420))
        );
        assert_eq!(
            try_split_startup(&packet(2 << 16, b"\0")),
            Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
        );
        assert_eq!(
            try_split_startup(&packet((1234 << 16) | 9999, b"")),
            Err(StartupError::UnknownRequestCode((1234 << 16) | 9999))
        );
        assert!(matches!(
            try_split_startup(&packet(PROTOCOL_3_0, b"user\0alice")),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            try_split_startup(&packet(PROTOCOL_3_0, b"user\0alice\0\0junk")),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            try_split_startup(&packet(CANCEL_REQUEST_CODE, b"\0\0")),
            Err(StartupError::Malformed(_))
        ));
    }

    #[test]
    fn negotiate_protocol_version_lists_options() {
        let option = Bytes::from_static(b"_pq_.x");
        let frame = encode_negotiate_protocol_version([&option].into_iter());
        assert_eq!(frame, b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0");
    }
}
