//! The extended-protocol messages pgveil rewrites to encrypt parameters: Bind (every
//! parameter decoded), Parse (re-encoded with new text and parameter types) and
//! ParameterDescription (the parameter types the server reports).
//!
//! Sans-IO; values stay raw bytes and are never interpreted here. Encoders produce
//! whole frames.

use super::frame::encode_frame;
use super::messages::MalformedMessage;
use super::{read_i16, read_i32, split_cstr};

fn malformed(message: &'static str, problem: &'static str) -> MalformedMessage {
    MalformedMessage { message, problem }
}

/// A frontend Bind, fully decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Parameter format codes as sent: empty (all text), one for all, or one each.
    pub parameter_formats: Vec<i16>,
    /// Parameter values; `None` is SQL NULL.
    pub parameters: Vec<Option<&'a [u8]>>,
    pub result_formats: Vec<i16>,
}

fn count(body: &[u8], at: usize, what: &'static str) -> Result<usize, MalformedMessage> {
    let value = read_i16(body, at).ok_or(malformed("Bind", what))?;
    usize::try_from(value).map_err(|_| malformed("Bind", what))
}

impl<'a> Bind<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, MalformedMessage> {
        let (portal, rest) = split_cstr(body).ok_or(malformed("Bind", "portal name"))?;
        let (statement, rest) = split_cstr(rest).ok_or(malformed("Bind", "statement name"))?;
        let mut at = 0;
        let format_count = count(rest, at, "parameter format count")?;
        at += 2;
        let parameter_formats = (0..format_count)
            .map(|i| read_i16(rest, at + 2 * i).ok_or(malformed("Bind", "parameter formats")))
            .collect::<Result<Vec<_>, _>>()?;
        at += 2 * format_count;
        let value_count = count(rest, at, "parameter count")?;
        at += 2;
        let mut parameters = Vec::with_capacity(value_count);
        for _ in 0..value_count {
            let len = read_i32(rest, at).ok_or(malformed("Bind", "parameter length"))?;
            at += 4;
            if len < 0 {
                parameters.push(None);
                continue;
            }
            let end = at
                .checked_add(len as usize)
                .filter(|&end| end <= rest.len())
                .ok_or(malformed("Bind", "parameter runs past the message"))?;
            parameters.push(Some(&rest[at..end]));
            at = end;
        }
        let result_count = count(rest, at, "result format count")?;
        at += 2;
        let result_formats = (0..result_count)
            .map(|i| read_i16(rest, at + 2 * i).ok_or(malformed("Bind", "result formats")))
            .collect::<Result<Vec<_>, _>>()?;
        if at + 2 * result_count != rest.len() {
            return Err(malformed("Bind", "trailing bytes"));
        }
        if !matches!(parameter_formats.len(), 0 | 1) && parameter_formats.len() != value_count {
            return Err(malformed("Bind", "parameter format count"));
        }
        Ok(Bind {
            portal,
            statement,
            parameter_formats,
            parameters,
            result_formats,
        })
    }

    /// The format of parameter `index` (0-based).
    pub fn parameter_format(&self, index: usize) -> i16 {
        match self.parameter_formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many.get(index).copied().unwrap_or(0),
        }
    }
}

/// Encodes a whole Bind frame with one format code per parameter.
pub fn encode_bind(
    portal: &[u8],
    statement: &[u8],
    parameters: &[(i16, Option<&[u8]>)],
    result_formats: &[i16],
) -> Vec<u8> {
    let mut body = Vec::with_capacity(
        portal.len()
            + statement.len()
            + 8
            + parameters
                .iter()
                .map(|(_, v)| 6 + v.map_or(0, <[u8]>::len))
                .sum::<usize>()
            + 2 * result_formats.len(),
    );
    body.extend_from_slice(portal);
    body.push(0);
    body.extend_from_slice(statement);
    body.push(0);
    body.extend_from_slice(&(parameters.len() as i16).to_be_bytes());
    for (format, _) in parameters {
        body.extend_from_slice(&format.to_be_bytes());
    }
    body.extend_from_slice(&(parameters.len() as i16).to_be_bytes());
    for (_, value) in parameters {
        match value {
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(value) => {
                body.extend_from_slice(&(value.len() as i32).to_be_bytes());
                body.extend_from_slice(value);
            }
        }
    }
    body.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
    for format in result_formats {
        body.extend_from_slice(&format.to_be_bytes());
    }
    let mut frame = Vec::with_capacity(body.len() + 5);
    encode_frame(&mut frame, b'B', &body);
    frame
}

/// Encodes a whole Parse frame.
pub fn encode_parse(statement: &[u8], query: &[u8], parameter_types: &[u32]) -> Vec<u8> {
    let mut body =
        Vec::with_capacity(statement.len() + query.len() + 4 + 4 * parameter_types.len());
    body.extend_from_slice(statement);
    body.push(0);
    body.extend_from_slice(query);
    body.push(0);
    body.extend_from_slice(&(parameter_types.len() as i16).to_be_bytes());
    for oid in parameter_types {
        body.extend_from_slice(&oid.to_be_bytes());
    }
    let mut frame = Vec::with_capacity(body.len() + 5);
    encode_frame(&mut frame, b'P', &body);
    frame
}

/// The parameter type OIDs of a ParameterDescription body.
pub fn decode_parameter_description(body: &[u8]) -> Result<Vec<u32>, MalformedMessage> {
    let count = read_i16(body, 0).ok_or(malformed("ParameterDescription", "count"))?;
    let count = usize::try_from(count).map_err(|_| malformed("ParameterDescription", "count"))?;
    if body.len() != 2 + 4 * count {
        return Err(malformed("ParameterDescription", "length"));
    }
    Ok((0..count)
        .map(|i| read_i32(body, 2 + 4 * i).unwrap_or(0) as u32)
        .collect())
}

/// Encodes a whole ParameterDescription frame.
pub fn encode_parameter_description(types: &[u32]) -> Vec<u8> {
    let mut body = Vec::with_capacity(2 + 4 * types.len());
    body.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for oid in types {
        body.extend_from_slice(&oid.to_be_bytes());
    }
    let mut frame = Vec::with_capacity(body.len() + 5);
    encode_frame(&mut frame, b't', &body);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::messages::Parse;

    #[test]
    fn bind_round_trips_with_one_format_per_parameter() {
        let frame = encode_bind(b"p", b"s", &[(0, Some(b"abc")), (1, None)], &[1]);
        let bind = Bind::decode(&frame[5..]).unwrap();
        assert_eq!(bind.portal, b"p");
        assert_eq!(bind.statement, b"s");
        assert_eq!(bind.parameters, vec![Some(&b"abc"[..]), None]);
        assert_eq!(bind.parameter_format(0), 0);
        assert_eq!(bind.parameter_format(1), 1);
        assert_eq!(bind.result_formats, vec![1]);
    }

    #[test]
    fn malformed_binds_are_errors_not_panics() {
        let frame = encode_bind(b"", b"s", &[(0, Some(b"abcdef"))], &[]);
        let body = &frame[5..];
        for cut in 0..body.len() {
            assert!(Bind::decode(&body[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn parse_and_parameter_description_round_trip() {
        let frame = encode_parse(b"st", b"SELECT $1", &[25, 0]);
        let parse = Parse::decode(&frame[5..]).unwrap();
        assert_eq!(parse.query, b"SELECT $1");
        assert_eq!(parse.parameter_types, vec![25, 0]);
        let frame = encode_parameter_description(&[23, 25]);
        assert_eq!(
            decode_parameter_description(&frame[5..]).unwrap(),
            vec![23, 25]
        );
        assert!(decode_parameter_description(&frame[5..8]).is_err());
    }
}
