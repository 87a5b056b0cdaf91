//! The server's data of one COPY … TO STDOUT, taken apart row by row so the read policy
//! can transform single fields (decrypt, mask, redact), and put back together with every
//! other byte as the server sent it. Text, CSV and binary formats. Sans-IO.
//!
//! Nothing here may log or put data into an error: errors name the row number and the
//! problem only.
//!
//! # What the server sends, and what is relied on
//!
//! PostgreSQL sends one CopyData message per row (text and CSV: the line with its `\n`;
//! binary: the tuple, with the 19-byte file header in front of the first one and the
//! trailer in a message of its own). [`CopyOutRewriter`] does not rely on these
//! boundaries: it buffers an incomplete row until the next payload, hands back complete
//! rows only, and [`CopyOutRewriter::finish`] refuses data that stops inside a row (or,
//! binary, without header or trailer).
//!
//! Text and CSV lines are cut by the rules of the server's *output*, which are simpler
//! than those of COPY FROM input (and so are not [`super::copy_rows::CopyRowReader`]'s):
//! every line ends with `\n` (a CR or LF in a value is written `\r` / `\n` in text format
//! and only inside quotes in CSV); there is no end-of-data marker in protocol 3, so a line
//! `\.` (a NULL with the NULL string `\.`) is a row like any other. Fields are then split
//! and decoded with [`super::copy_rows::decode_row_into`], the model of the server's own
//! reader, so the callback sees what a `COPY … FROM` of the same data would store.
//!
//! # Rewritten fields
//!
//! A field the callback keeps, and every byte around the rewritten fields (delimiters,
//! other fields, the line end, the tuple's field count and other fields' lengths), is
//! passed on as the server sent it; a row with no replaced field is copied in one piece.
//! A replaced field is written the way the server writes a value:
//!
//! * text ([`super::copy_rows::encode_field_into`], PostgreSQL's `CopyAttributeOutText`):
//!   `\b \f \n \r \t \v \\` and a backslash before the delimiter; NULL as the NULL string.
//!   One deliberate difference: a value equal to the NULL string (say `NULL` with
//!   `NULL 'NULL'`) has its first byte written as an octal escape, so it reads back as
//!   that value, where the server writes it as it is and it would read back as NULL. The
//!   empty value with an empty NULL string cannot be told apart from NULL; like the
//!   server, it is written empty.
//! * CSV (PostgreSQL's `CopyAttributeOutCSV`): quoted when it contains the delimiter, the
//!   quote, CR or LF, equals the NULL string, or starts with `\.` (the server quotes
//!   exactly `\.`, and only in a one-column COPY; quoting more reads back the same),
//!   with the quote and escape characters doubled by the escape character inside the
//!   quotes; NULL as the NULL string, unquoted. A replacement for a field the server had
//!   quoted is quoted too, so `FORCE_QUOTE` output keeps its look.
//! * binary: int32 length and the bytes, or -1 for NULL.
//!
//! Bytes are handled as ASCII-compatible, as in [`super::copy_rows`]: the client
//! encoding must be one where every byte below 0x80 is that ASCII character.

use thiserror::Error;

use super::copy_rows::{decode_row_into, encode_field_into, CopyError, CopyFormat, RowFields};
use super::{read_i16, read_i32};

/// The longest row (or binary header) kept waiting for the rest of its bytes:
/// PostgreSQL's own limit for one row. Longer is refused rather than buffered.
const MAX_ROW_BYTES: usize = 1 << 30;

/// The binary format's signature, the first 11 bytes of the data.
const BINARY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// The binary header before its extension: signature, flags, extension length.
const BINARY_HEADER_BYTES: usize = 19;

/// Flag bit 16: every tuple carries an OID first (servers before 12, `WITH OIDS`).
const BINARY_FLAG_OIDS: u32 = 1 << 16;

/// Flag bits 17-31: critical, their meaning unknown to pgveil.
const BINARY_FLAGS_CRITICAL_UNKNOWN: u32 = !0 << 17;

/// The format of a COPY … TO's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyOutFormat {
    /// Text or CSV, with its options.
    Rows(CopyFormat),
    /// `FORMAT binary`.
    Binary,
}

/// What to do with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldChange {
    Keep,
    /// The new value (`None`: NULL), in the format of the data (text for text and CSV,
    /// the type's binary form for binary).
    Replace(Option<Vec<u8>>),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CopyOutError<E> {
    /// The data is not what the format says (row number, 1-based, and the problem). The
    /// row is the data row being read when the problem was found (the header line is not
    /// counted); 0 for a problem in the binary file header or in the rewriter's setup.
    #[error("COPY data row {row}: {problem}")]
    Malformed { row: u64, problem: &'static str },
    /// The field callback refused a value (`field`: the 0-based position in the row).
    #[error("COPY data row {row}: field {field} refused")]
    Field { row: u64, field: usize, error: E },
}

/// Decides the fate of the field at a position, given its value (`None`: NULL).
pub type FieldCallback<'a, E> = dyn FnMut(usize, Option<&[u8]>) -> Result<FieldChange, E> + 'a;

/// Where binary data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinaryPart {
    Header,
    Tuples,
    /// After the trailer: nothing more may come.
    Ended,
}

/// What one complete unit of the data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// The binary file header, or the header line of text and CSV: passed on as it is.
    Header,
    /// A data row.
    Row,
    /// The binary trailer.
    Trailer,
}

/// How far the incomplete unit (row, header) has been looked at.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    /// The next byte to look at, from the unit's start (binary: the next field's length
    /// word, or past a field's end while its bytes are missing; 0 before the field count).
    at: usize,
    /// CSV: inside a quoted field at `at`.
    in_quote: bool,
    /// Text and CSV: delimiters outside quotes so far in the line.
    delimiters: usize,
}

/// Rewrites the fields at chosen positions of every row of one COPY … TO STDOUT.
pub struct CopyOutRewriter {
    format: CopyOutFormat,
    width: usize,
    /// Sorted, without duplicates.
    rewrite: Vec<usize>,
    /// [`MAX_ROW_BYTES`], smaller in tests.
    limit: usize,
    /// Options or positions that make every call fail.
    setup_error: Option<&'static str>,
    /// The incomplete row (or binary header) the last payloads ended with.
    pending: Vec<u8>,
    /// Scanning state of the incomplete unit.
    scan: Scan,
    /// Text and CSV: the next line is the header line.
    header_line: bool,
    binary: BinaryPart,
    /// Binary: the fields of the tuple so far: where the bytes start, and the length
    /// (-1: NULL).
    binary_fields: Vec<(usize, i32)>,
    /// Data rows passed on.
    rows: u64,
    /// The first error: every later call fails with it.
    failed: Option<(u64, &'static str)>,
    finished: bool,
    /// Decoded fields of the current text or CSV row, reused.
    decoded: RowFields,
}

impl CopyOutRewriter {
    /// `width`: fields of every row; `rewrite`: positions (0-based) whose values go
    /// through the callback of [`Self::push`]. Invalid text or CSV options, or a position
    /// not below `width`, make every call fail.
    pub fn new(format: CopyOutFormat, width: usize, rewrite: Vec<usize>) -> CopyOutRewriter {
        CopyOutRewriter::with_limit(format, width, rewrite, MAX_ROW_BYTES)
    }

    fn with_limit(
        format: CopyOutFormat,
        width: usize,
        mut rewrite: Vec<usize>,
        limit: usize,
    ) -> CopyOutRewriter {
        rewrite.sort_unstable();
        rewrite.dedup();
        let mut setup_error = None;
        let mut header_line = false;
        if let CopyOutFormat::Rows(rows) = &format {
            if let Err(error) = rows.validate() {
                setup_error = Some(copy_problem(&error));
            }
            header_line = match rows {
                CopyFormat::Text { header, .. } | CopyFormat::Csv { header, .. } => *header,
            };
        }
        if rewrite.last().is_some_and(|&last| last >= width) {
            setup_error = Some("a position to rewrite is not below the row width");
        }
        CopyOutRewriter {
            format,
            width,
            rewrite,
            limit,
            setup_error,
            pending: Vec::new(),
            scan: Scan::default(),
            header_line,
            binary: BinaryPart::Header,
            binary_fields: Vec::new(),
            rows: 0,
            failed: None,
            finished: false,
            decoded: RowFields::default(),
        }
    }

    /// One CopyData payload from the server. Returns the bytes to send to the client in
    /// its place: every complete row (and header, trailer) so far, rewritten; an
    /// incomplete row at the end is kept for the next payload.
    pub fn push<E>(
        &mut self,
        payload: &[u8],
        field: &mut FieldCallback<'_, E>,
    ) -> Result<Vec<u8>, CopyOutError<E>> {
        let mut out = Vec::with_capacity(payload.len() + self.pending.len());
        self.push_into(payload, &mut out, field)?;
        Ok(out)
    }

    /// [`Self::push`] appending to `out`, so that a caller can reuse one buffer (or put
    /// the message header in front). On error `out` is left as it was.
    pub fn push_into<E>(
        &mut self,
        payload: &[u8],
        out: &mut Vec<u8>,
        field: &mut FieldCallback<'_, E>,
    ) -> Result<(), CopyOutError<E>> {
        self.check_usable()
            .map_err(|(row, problem)| CopyOutError::Malformed { row, problem })?;
        let mark = out.len();
        let result = if self.pending.is_empty() {
            // The usual case, one or more whole rows: read them where they are.
            self.process(payload, out, field).map(|consumed| {
                self.pending.extend_from_slice(&payload[consumed..]);
            })
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(payload);
            let result = self.process(&pending, out, field);
            if let Ok(consumed) = result {
                pending.drain(..consumed);
            }
            self.pending = pending;
            result.map(|_| ())
        };
        if let Err(error) = &result {
            out.truncate(mark);
            self.failed = Some(match error {
                CopyOutError::Malformed { row, problem } => (*row, *problem),
                CopyOutError::Field { row, .. } => (*row, "a field was refused"),
            });
        }
        result
    }

    /// CopyDone: nothing may be left over (and binary data must have ended with its
    /// trailer).
    pub fn finish(&mut self) -> Result<(), CopyOutError<std::convert::Infallible>> {
        let result = self.check_usable().and_then(|()| {
            if self.binary == BinaryPart::Header && self.format == CopyOutFormat::Binary {
                return Err((0, "the binary header is incomplete"));
            }
            if !self.pending.is_empty() {
                return Err((self.rows + 1, "the data ends inside a row"));
            }
            if self.format == CopyOutFormat::Binary && self.binary != BinaryPart::Ended {
                return Err((self.rows + 1, "the binary data ends without its trailer"));
            }
            Ok(())
        });
        self.finished = true;
        result.map_err(|(row, problem)| {
            self.failed.get_or_insert((row, problem));
            CopyOutError::Malformed { row, problem }
        })
    }

    /// Data rows passed on so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn check_usable(&self) -> Result<(), (u64, &'static str)> {
        if let Some(failed) = self.failed {
            return Err(failed);
        }
        if let Some(problem) = self.setup_error {
            return Err((0, problem));
        }
        if self.finished {
            return Err((self.rows + 1, "data after the end of the COPY data"));
        }
        Ok(())
    }

    fn malformed<E>(&self, problem: &'static str) -> CopyOutError<E> {
        CopyOutError::Malformed {
            row: self.rows + 1,
            problem,
        }
    }

    /// Passes on every complete unit at the start of `data`; returns how many bytes they
    /// took. The scanning state is left at the incomplete unit that follows.
    fn process<E>(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        field: &mut FieldCallback<'_, E>,
    ) -> Result<usize, CopyOutError<E>> {
        let mut start = 0;
        loop {
            let rest = &data[start..];
            if self.binary == BinaryPart::Ended {
                if !rest.is_empty() {
                    return Err(self.malformed("data after the binary trailer"));
                }
                return Ok(start);
            }
            if rest.is_empty() {
                return Ok(start);
            }
            let found = match &self.format {
                CopyOutFormat::Binary => self.frame_binary(rest)?,
                CopyOutFormat::Rows(format) => {
                    let found = frame_line(format, rest, &mut self.scan);
                    found.map(|end| {
                        let kind = if std::mem::take(&mut self.header_line) {
                            Unit::Header
                        } else {
                            Unit::Row
                        };
                        (end, kind)
                    })
                }
            };
            let Some((end, kind)) = found else {
                if rest.len() > self.limit {
                    return Err(self.malformed("a row is longer than 1 GiB"));
                }
                return Ok(start);
            };
            let unit = &rest[..end];
            match kind {
                Unit::Header => {
                    out.extend_from_slice(unit);
                    if self.format == CopyOutFormat::Binary {
                        self.binary = BinaryPart::Tuples;
                    }
                }
                Unit::Trailer => {
                    out.extend_from_slice(unit);
                    self.binary = BinaryPart::Ended;
                }
                Unit::Row => {
                    self.rewrite_row(unit, out, field)?;
                    self.rows += 1;
                }
            }
            self.scan = Scan::default();
            self.binary_fields.clear();
            start += end;
        }
    }

    /// The end of the binary unit at the start of `data` (the header, a tuple or the
    /// trailer) and what it is, or `None` while bytes are missing.
    fn frame_binary<E>(&mut self, data: &[u8]) -> Result<Option<(usize, Unit)>, CopyOutError<E>> {
        if self.binary == BinaryPart::Header {
            let header_error = |problem| CopyOutError::Malformed { row: 0, problem };
            let known = data.len().min(BINARY_SIGNATURE.len());
            if data[..known] != BINARY_SIGNATURE[..known] {
                return Err(header_error("not the binary COPY signature"));
            }
            let Some(flags) = read_i32(data, 11) else {
                return Ok(None);
            };
            let flags = flags as u32;
            if flags & BINARY_FLAG_OIDS != 0 {
                return Err(header_error("the binary data includes OIDs"));
            }
            if flags & BINARY_FLAGS_CRITICAL_UNKNOWN != 0 {
                return Err(header_error("unknown critical flags in the binary header"));
            }
            let Some(extension) = read_i32(data, 15) else {
                return Ok(None);
            };
            let extension = usize::try_from(extension)
                .map_err(|_| header_error("negative binary header extension length"))?;
            let end = BINARY_HEADER_BYTES + extension;
            if end > self.limit {
                return Err(header_error("the binary header extension is too long"));
            }
            return Ok((data.len() >= end).then_some((end, Unit::Header)));
        }
        if self.scan.at == 0 {
            let Some(count) = read_i16(data, 0) else {
                return Ok(None);
            };
            if count == -1 {
                return Ok(Some((2, Unit::Trailer)));
            }
            if usize::try_from(count).ok() != Some(self.width) {
                return Err(self.malformed("the row does not have the expected number of fields"));
            }
            self.scan.at = 2;
        }
        loop {
            if self.scan.at > data.len() {
                return Ok(None);
            }
            if self.binary_fields.len() == self.width {
                return Ok(Some((self.scan.at, Unit::Row)));
            }
            let Some(length) = read_i32(data, self.scan.at) else {
                return Ok(None);
            };
            let start = self.scan.at + 4;
            let end = match length {
                -1 => start,
                0.. => start + length as usize,
                _ => return Err(self.malformed("negative field length")),
            };
            if end > self.limit {
                return Err(self.malformed("a row is longer than 1 GiB"));
            }
            self.binary_fields.push((start, length));
            self.scan.at = end;
        }
    }

    /// Passes on one data row (a line with its `\n`, or a binary tuple), the fields at
    /// the rewritten positions through the callback.
    fn rewrite_row<E>(
        &mut self,
        row: &[u8],
        out: &mut Vec<u8>,
        field: &mut FieldCallback<'_, E>,
    ) -> Result<(), CopyOutError<E>> {
        let number = self.rows + 1;
        match &self.format {
            CopyOutFormat::Binary => {
                // Where the row has been copied up to.
                let mut copied = 0;
                for &position in &self.rewrite {
                    let (start, length) = self.binary_fields[position];
                    let value = usize::try_from(length)
                        .ok()
                        .map(|length| &row[start..start + length]);
                    let change = field(position, value).map_err(|error| CopyOutError::Field {
                        row: number,
                        field: position,
                        error,
                    })?;
                    let FieldChange::Replace(new) = change else {
                        continue;
                    };
                    out.extend_from_slice(&row[copied..start - 4]);
                    match new {
                        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                        Some(new) => {
                            let length =
                                i32::try_from(new.len()).map_err(|_| CopyOutError::Malformed {
                                    row: number,
                                    problem: "a replacement value is too long",
                                })?;
                            out.extend_from_slice(&length.to_be_bytes());
                            out.extend_from_slice(&new);
                        }
                    }
                    copied = start + value.map_or(0, <[u8]>::len);
                }
                out.extend_from_slice(&row[copied..]);
            }
            CopyOutFormat::Rows(format) => {
                let content = &row[..row.len() - 1];
                let malformed = |problem| CopyOutError::Malformed {
                    row: number,
                    problem,
                };
                let wrong_count = malformed("the row does not have the expected number of fields");
                if self.rewrite.is_empty() {
                    // The fields were counted while looking for the line's end. A table
                    // without columns gives empty lines.
                    let fields_ok = if self.width == 0 {
                        content.is_empty()
                    } else {
                        self.scan.delimiters + 1 == self.width
                    };
                    if !fields_ok {
                        return Err(wrong_count);
                    }
                    out.extend_from_slice(row);
                    return Ok(());
                }
                decode_row_into(format, content, &mut self.decoded)
                    .map_err(|error| malformed(copy_problem(&error)))?;
                if self.decoded.len() != self.width {
                    return Err(wrong_count);
                }
                let mut copied = 0;
                for &position in &self.rewrite {
                    let value = self.decoded.get(position).flatten();
                    let change = field(position, value).map_err(|error| CopyOutError::Field {
                        row: number,
                        field: position,
                        error,
                    })?;
                    let FieldChange::Replace(new) = change else {
                        continue;
                    };
                    let raw = self.decoded.raw_range(position).unwrap_or_default();
                    out.extend_from_slice(&row[copied..raw.start]);
                    match format {
                        CopyFormat::Text { .. } => encode_field_into(out, format, new.as_deref()),
                        CopyFormat::Csv {
                            delimiter,
                            quote,
                            escape,
                            null,
                            ..
                        } => {
                            let was_quoted = row.get(raw.start) == Some(quote);
                            match new {
                                None => out.extend_from_slice(null),
                                Some(new) => encode_csv(
                                    out,
                                    &new,
                                    CsvOptions {
                                        delimiter: *delimiter,
                                        quote: *quote,
                                        escape: *escape,
                                        null,
                                    },
                                    was_quoted,
                                ),
                            }
                        }
                    }
                    copied = raw.end;
                }
                out.extend_from_slice(&row[copied..]);
            }
        }
        Ok(())
    }
}

/// The static problem of a [`CopyError`] (none of them carries data).
fn copy_problem(error: &CopyError) -> &'static str {
    match error {
        CopyError::Format(problem) | CopyError::Row(problem) => problem,
        CopyError::Data { problem, .. } => problem,
        CopyError::LineTooLong { .. } => "a row is too long",
    }
}

/// The length of the line at the start of `data`, its `\n` included, or `None` while it
/// is incomplete; resumes from and records the scanning state in `state`. The server
/// writes every line end as `\n`, and a line break in a value as the escape `\n` (text)
/// or inside quotes (CSV), so the first `\n` outside quotes ends the line. Counts the
/// delimiters outside quotes and escapes on the way.
fn frame_line(format: &CopyFormat, data: &[u8], state: &mut Scan) -> Option<usize> {
    let mut at = state.at;
    let mut delimiters = state.delimiters;
    let mut found = None;
    match format {
        CopyFormat::Text { delimiter, .. } => {
            let delimiter = *delimiter;
            while let Some(&byte) = data.get(at) {
                if byte == b'\n' {
                    found = Some(at + 1);
                    break;
                }
                if byte == b'\\' {
                    // The escaped byte is data, even the delimiter; a line end is not
                    // escaped in server output (no value makes `\` + LF).
                    match data.get(at + 1) {
                        None => break,
                        Some(b'\n') => at += 1,
                        Some(_) => at += 2,
                    }
                    continue;
                }
                if byte == delimiter {
                    delimiters += 1;
                }
                at += 1;
            }
        }
        CopyFormat::Csv {
            delimiter,
            quote,
            escape,
            ..
        } => {
            let (delimiter, quote, escape) = (*delimiter, *quote, *escape);
            let mut in_quote = state.in_quote;
            while let Some(&byte) = data.get(at) {
                if in_quote {
                    // As the server reads it: inside quotes the escape character before a
                    // quote or escape makes it data; a quote ends the quoted part. (With
                    // the escape equal to the quote, a doubled quote ends and restarts it.)
                    if byte == escape && escape != quote {
                        match data.get(at + 1) {
                            None => break,
                            Some(&next) if next == escape || next == quote => {
                                at += 2;
                                continue;
                            }
                            Some(_) => {}
                        }
                    }
                    if byte == quote {
                        in_quote = false;
                    }
                } else if byte == b'\n' {
                    found = Some(at + 1);
                    break;
                } else if byte == delimiter {
                    delimiters += 1;
                } else if byte == quote {
                    in_quote = true;
                }
                at += 1;
            }
            state.in_quote = in_quote;
        }
    }
    state.at = at;
    state.delimiters = delimiters;
    found
}

/// The special characters of CSV data.
struct CsvOptions<'a> {
    delimiter: u8,
    quote: u8,
    escape: u8,
    null: &'a [u8],
}

/// Appends a non-NULL CSV value as PostgreSQL's `CopyAttributeOutCSV` writes it (quoted
/// also when it starts with `\.`, or when `force_quote`).
fn encode_csv(out: &mut Vec<u8>, value: &[u8], options: CsvOptions<'_>, force_quote: bool) {
    let CsvOptions {
        delimiter,
        quote,
        escape,
        null,
    } = options;
    let needs_quotes = force_quote
        || value == null
        || value.starts_with(b"\\.")
        || value
            .iter()
            .any(|&b| b == delimiter || b == quote || b == b'\n' || b == b'\r');
    if !needs_quotes {
        out.extend_from_slice(value);
        return;
    }
    out.reserve(value.len() + 2);
    out.push(quote);
    for &byte in value {
        if byte == quote || byte == escape {
            out.push(escape);
        }
        out.push(byte);
    }
    out.push(quote);
}

#[cfg(test)]
mod tests;
