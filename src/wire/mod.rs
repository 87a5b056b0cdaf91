//! PostgreSQL wire protocol 3.0: framing, startup packets and the few messages pgveil
//! must read or write.
//!
//! Everything here is sans-IO: functions over byte slices that return typed values or
//! errors, so they can be unit-tested and fuzzed without sockets. Nothing in this module
//! may decode bytes lossily: names, SQL text and values stay `&[u8]`/`Bytes` so that
//! non-UTF-8 input round-trips byte for byte.

pub mod bind;
pub mod copy_out;
pub mod copy_rows;
pub mod frame;
pub mod messages;
pub mod rows;
pub mod startup;

/// Reads a big-endian `i32` at `at`, or `None` when the slice is too short.
pub(crate) fn read_i32(bytes: &[u8], at: usize) -> Option<i32> {
    let slice = bytes.get(at..at.checked_add(4)?)?;
    Some(i32::from_be_bytes([slice[0], slice[1], slice[2], slice[3]]))
}

/// Reads a big-endian `i16` at `at`, or `None` when the slice is too short.
pub(crate) fn read_i16(bytes: &[u8], at: usize) -> Option<i16> {
    let slice = bytes.get(at..at.checked_add(2)?)?;
    Some(i16::from_be_bytes([slice[0], slice[1]]))
}

/// Splits a NUL-terminated string off the front of `bytes`: `(string, rest)`.
pub(crate) fn split_cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..nul], &bytes[nul + 1..]))
}
