//! Result-set messages pgveil must look inside to protect values: RowDescription (which
//! table column each result column comes from) and DataRow (the values), plus the result
//! format codes a frontend Bind asks for.
//!
//! Decoders borrow from the frame body; values stay raw bytes and are never interpreted
//! here. A DataRow is re-encoded only from the fields of the row it was decoded from.

use std::ops::Range;

use bytes::Bytes;

use super::messages::MalformedMessage;
use super::{read_i16, read_i32, split_cstr};

fn malformed(message: &'static str, problem: &'static str) -> MalformedMessage {
    MalformedMessage { message, problem }
}

/// Result value formats, as the protocol numbers them.
pub const TEXT_FORMAT: i16 = 0;
pub const BINARY_FORMAT: i16 = 1;

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: Bytes,
    /// OID of the table the column comes from, 0 when it is computed.
    pub table_oid: u32,
    /// Attribute number in that table, 0 when computed.
    pub attnum: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary; always 0 in the answer to Describe of a statement, where the
    /// formats are not known yet.
    pub format: i16,
}

/// Decodes a RowDescription body.
pub fn decode_row_description(body: &[u8]) -> Result<Vec<FieldDescription>, MalformedMessage> {
    let count = read_i16(body, 0).ok_or(malformed("RowDescription", "field count"))?;
    let count = usize::try_from(count).map_err(|_| malformed("RowDescription", "field count"))?;
    let mut rest = &body[2..];
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        let (name, after) = split_cstr(rest).ok_or(malformed("RowDescription", "field name"))?;
        let fixed = after
            .get(..18)
            .ok_or(malformed("RowDescription", "field attributes"))?;
        let int = |at| read_i32(fixed, at).unwrap_or(0);
        let short = |at| read_i16(fixed, at).unwrap_or(0);
        fields.push(FieldDescription {
            name: Bytes::copy_from_slice(name),
            table_oid: int(0) as u32,
            attnum: short(4),
            type_oid: int(6) as u32,
            type_len: short(10),
            type_modifier: int(12),
            format: short(16),
        });
        rest = &after[18..];
    }
    if !rest.is_empty() {
        return Err(malformed("RowDescription", "trailing bytes"));
    }
    Ok(fields)
}

/// Whether the fields of a RowDescription body come, in order, from exactly these
/// (relation OID, attribute number) pairs. Read in place, without decoding: it runs
/// for every result of a restricted role. A malformed body matches nothing.
pub fn row_description_sources_are(body: &[u8], sources: &[(u32, i16)]) -> bool {
    let Some(count) = read_i16(body, 0) else {
        return false;
    };
    if usize::try_from(count).ok() != Some(sources.len()) {
        return false;
    }
    let mut rest = &body[2..];
    for &(table_oid, attnum) in sources {
        let Some((_, after)) = split_cstr(rest) else {
            return false;
        };
        let Some(fixed) = after.get(..18) else {
            return false;
        };
        if read_i32(fixed, 0) != Some(table_oid as i32) || read_i16(fixed, 4) != Some(attnum) {
            return false;
        }
        rest = &after[18..];
    }
    rest.is_empty()
}

/// Encodes a whole RowDescription frame.
pub fn encode_row_description(fields: &[FieldDescription]) -> Vec<u8> {
    let mut body = Vec::with_capacity(2 + fields.iter().map(|f| f.name.len() + 19).sum::<usize>());
    body.extend_from_slice(&(fields.len() as i16).to_be_bytes());
    for field in fields {
        body.extend_from_slice(&field.name);
        body.push(0);
        body.extend_from_slice(&field.table_oid.to_be_bytes());
        body.extend_from_slice(&field.attnum.to_be_bytes());
        body.extend_from_slice(&field.type_oid.to_be_bytes());
        body.extend_from_slice(&field.type_len.to_be_bytes());
        body.extend_from_slice(&field.type_modifier.to_be_bytes());
        body.extend_from_slice(&field.format.to_be_bytes());
    }
    let mut frame = Vec::with_capacity(body.len() + 5);
    super::frame::encode_frame(&mut frame, b'T', &body);
    frame
}

/// The value ranges of a DataRow body: `None` for SQL NULL, else the byte range of the
/// value inside the body.
pub fn decode_data_row(body: &[u8]) -> Result<Vec<Option<Range<usize>>>, MalformedMessage> {
    let count = read_i16(body, 0).ok_or(malformed("DataRow", "column count"))?;
    let count = usize::try_from(count).map_err(|_| malformed("DataRow", "column count"))?;
    let mut at = 2;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let len = read_i32(body, at).ok_or(malformed("DataRow", "value length"))?;
        at += 4;
        if len == -1 {
            values.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| malformed("DataRow", "value length"))?;
        let end = at
            .checked_add(len)
            .filter(|&end| end <= body.len())
            .ok_or(malformed("DataRow", "value runs past the message"))?;
        values.push(Some(at..end));
        at = end;
    }
    if at != body.len() {
        return Err(malformed("DataRow", "trailing bytes"));
    }
    Ok(values)
}

/// Appends a whole DataRow frame with `values` (None = NULL) to `out`.
pub fn encode_data_row<'a>(
    out: &mut Vec<u8>,
    values: impl ExactSizeIterator<Item = Option<&'a [u8]>> + Clone,
) {
    let body_len: usize = 2 + values
        .clone()
        .map(|value| 4 + value.map_or(0, <[u8]>::len))
        .sum::<usize>();
    out.reserve(1 + 4 + body_len);
    out.push(b'D');
    out.extend_from_slice(&((body_len + 4) as i32).to_be_bytes());
    out.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for value in values {
        match value {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(bytes) => {
                out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }
}

/// The result format codes of a frontend Bind body: empty means all text, one code
/// applies to every column, otherwise one per column.
pub fn bind_result_formats(body: &[u8]) -> Result<Vec<i16>, MalformedMessage> {
    let (_, rest) = split_cstr(body).ok_or(malformed("Bind", "portal name"))?;
    let (_, rest) = split_cstr(rest).ok_or(malformed("Bind", "statement name"))?;
    let mut at = 0;
    let format_count = read_i16(rest, at).ok_or(malformed("Bind", "parameter format count"))?;
    let format_count =
        usize::try_from(format_count).map_err(|_| malformed("Bind", "parameter format count"))?;
    at += 2 + 2 * format_count;
    let value_count = read_i16(rest, at).ok_or(malformed("Bind", "parameter count"))?;
    let value_count =
        usize::try_from(value_count).map_err(|_| malformed("Bind", "parameter count"))?;
    at += 2;
    for _ in 0..value_count {
        let len = read_i32(rest, at).ok_or(malformed("Bind", "parameter length"))?;
        at += 4;
        if len >= 0 {
            at = at
                .checked_add(len as usize)
                .filter(|&end| end <= rest.len())
                .ok_or(malformed("Bind", "parameter runs past the message"))?;
        }
    }
    let result_count = read_i16(rest, at).ok_or(malformed("Bind", "result format count"))?;
    let result_count =
        usize::try_from(result_count).map_err(|_| malformed("Bind", "result format count"))?;
    at += 2;
    let formats = (0..result_count)
        .map(|i| read_i16(rest, at + 2 * i).ok_or(malformed("Bind", "result formats")))
        .collect::<Result<Vec<_>, _>>()?;
    if at + 2 * result_count != rest.len() {
        return Err(malformed("Bind", "trailing bytes"));
    }
    Ok(formats)
}

/// The format of result column `index` under Bind's result format codes.
pub fn format_of(formats: &[i16], index: usize) -> i16 {
    match formats {
        [] => TEXT_FORMAT,
        [all] => *all,
        each => each.get(index).copied().unwrap_or(TEXT_FORMAT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_description(fields: &[(&str, u32, i16, u32, i16)]) -> Vec<u8> {
        let mut body = (fields.len() as i16).to_be_bytes().to_vec();
        for (name, table, attnum, type_oid, format) in fields {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&table.to_be_bytes());
            body.extend_from_slice(&attnum.to_be_bytes());
            body.extend_from_slice(&type_oid.to_be_bytes());
            body.extend_from_slice(&(-1i16).to_be_bytes());
            body.extend_from_slice(&(-1i32).to_be_bytes());
            body.extend_from_slice(&format.to_be_bytes());
        }
        body
    }

    #[test]
    fn decodes_row_descriptions() {
        let body = row_description(&[("id", 16384, 1, 23, 0), ("phone", 16384, 3, 25, 1)]);
        let fields = decode_row_description(&body).unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[1].name, Bytes::from_static(b"phone"));
        assert_eq!((fields[1].table_oid, fields[1].attnum), (16384, 3));
        assert_eq!((fields[1].type_oid, fields[1].format), (25, 1));
        assert!(decode_row_description(&body[..body.len() - 1]).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode_row_description(&longer).is_err());
    }

    #[test]
    fn compares_the_sources_of_row_descriptions_in_place() {
        let body = row_description(&[("id", 16384, 1, 23, 0), ("phone", 16384, 3, 25, 1)]);
        assert!(row_description_sources_are(
            &body,
            &[(16384, 1), (16384, 3)]
        ));
        assert!(!row_description_sources_are(
            &body,
            &[(16384, 1), (16384, 4)]
        ));
        assert!(!row_description_sources_are(
            &body,
            &[(16385, 1), (16384, 3)]
        ));
        assert!(!row_description_sources_are(&body, &[(16384, 1)]));
        assert!(!row_description_sources_are(
            &body,
            &[(16384, 1), (16384, 3), (16384, 5)]
        ));
        assert!(!row_description_sources_are(
            &body[..body.len() - 1],
            &[(16384, 1), (16384, 3)]
        ));
        let mut longer = body.clone();
        longer.push(0);
        assert!(!row_description_sources_are(
            &longer,
            &[(16384, 1), (16384, 3)]
        ));
        let oid_above_i32 = row_description(&[("x", 3_000_000_000, 2, 25, 0)]);
        assert!(row_description_sources_are(
            &oid_above_i32,
            &[(3_000_000_000, 2)]
        ));
        assert!(row_description_sources_are(&row_description(&[]), &[]));
        assert!(!row_description_sources_are(b"", &[]));
    }

    #[test]
    fn data_rows_round_trip_with_nulls() {
        let mut frame = Vec::new();
        let values: [Option<&[u8]>; 3] = [Some(b"1"), None, Some("张三".as_bytes())];
        encode_data_row(&mut frame, values.iter().copied());
        assert_eq!(frame[0], b'D');
        let body = &frame[5..];
        let ranges = decode_data_row(body).unwrap();
        let decoded: Vec<Option<&[u8]>> = ranges
            .iter()
            .map(|range| range.clone().map(|r| &body[r]))
            .collect();
        assert_eq!(decoded, values);
        assert_eq!(
            i32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize,
            frame.len() - 1
        );
    }

    #[test]
    fn malformed_data_rows_are_refused() {
        assert!(decode_data_row(b"").is_err());
        assert!(decode_data_row(b"\0\x01\0\0\0\x05ab").is_err());
        assert!(decode_data_row(b"\0\x01\xff\xff\xff\xfe").is_err());
        assert!(decode_data_row(b"\0\x00x").is_err());
    }

    #[test]
    fn reads_bind_result_formats() {
        let mut body = b"portal\0stmt\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        assert_eq!(bind_result_formats(&body).unwrap(), vec![0, 1]);
        assert!(bind_result_formats(&body[..body.len() - 1]).is_err());
        assert_eq!(format_of(&[], 3), TEXT_FORMAT);
        assert_eq!(format_of(&[1], 3), BINARY_FORMAT);
        assert_eq!(format_of(&[0, 1], 1), BINARY_FORMAT);
    }
}
