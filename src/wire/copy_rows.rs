//! COPY … FROM STDIN data in text and CSV format, as rows and fields, so that pgveil can
//! rewrite the fields of encrypted columns in every row of a CopyData stream.
//!
//! [`CopyRowReader`] cuts the stream into lines exactly where the server will: rows may be
//! split across CopyData messages and one message may hold many rows; CSV quoted fields
//! may hold line breaks; the line terminator is `\n`, `\r\n` or `\r`, chosen by the first
//! line and then required of every line, as the server requires it. [`decode_row`] splits
//! one line into field values the way the server does (text-format backslash escapes,
//! CSV quoting, the NULL string compared on the raw field), and [`encode_row`] writes
//! fields back so that the server decodes exactly the values given.
//!
//! Everything is sans-IO and bounded: a line longer than the reader's limit is an error,
//! not a reason to buffer more. Where the server rejects the data (a stray carriage
//! return, an unterminated quoted field), or where server versions disagree (text before
//! an end-of-data marker on its line, which PostgreSQL 18 rejects and older servers read
//! as a last row; data after the marker, which servers ignore), the reader rejects it;
//! it also rejects NUL bytes, which no server encoding accepts. Guessing where a line
//! ends differently from the server could put a plaintext value into a column pgveil
//! believes it encrypted. (Lines and fields were cross-checked against a PostgreSQL 15
//! server on thousands of random inputs.)
//!
//! Bytes are handled as ASCII-compatible: the client encoding (or COPY's `ENCODING`
//! option) must be one in which every byte below 0x80 is the ASCII character (UTF-8, the
//! LATIN and EUC families, ...). In SJIS, BIG5, GBK, GB18030, UHC and JOHAB a backslash or
//! quote byte can be the second half of a character, so the caller must refuse COPY in
//! those encodings. The caller must also refuse COPY options that change how fields are
//! read and are not modelled here: `DEFAULT`, `FORCE_NULL`, `FORCE_NOT_NULL`, and any
//! format but text and CSV.
//!
//! Nothing here may log or put data into an error: errors name the line number and the
//! problem only.

use std::ops::Range;

use thiserror::Error;

/// The format of the data of one COPY … FROM STDIN, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFormat {
    /// `FORMAT text`: fields separated by `delimiter`, backslash escapes, `null` as the raw
    /// field that means NULL. `header` (PostgreSQL 15+) makes the first line a header.
    Text {
        delimiter: u8,
        null: Vec<u8>,
        header: bool,
    },
    /// `FORMAT csv`: fields separated by `delimiter`, optionally quoted with `quote`,
    /// `escape` before a quote (or itself) inside quotes, `null` as the unquoted field
    /// that means NULL.
    Csv {
        delimiter: u8,
        quote: u8,
        escape: u8,
        null: Vec<u8>,
        header: bool,
    },
}

impl CopyFormat {
    /// Text format with the server's defaults: tab, `\N`, no header.
    pub fn text() -> CopyFormat {
        CopyFormat::Text {
            delimiter: b'\t',
            null: b"\\N".to_vec(),
            header: false,
        }
    }

    /// CSV format with the server's defaults: comma, double quote as quote and escape, the
    /// unquoted empty field as NULL, no header.
    pub fn csv() -> CopyFormat {
        CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'"',
            null: Vec::new(),
            header: false,
        }
    }

    fn header(&self) -> bool {
        match self {
            CopyFormat::Text { header, .. } | CopyFormat::Csv { header, .. } => *header,
        }
    }

    /// The byte between fields.
    pub fn delimiter(&self) -> u8 {
        match self {
            CopyFormat::Text { delimiter, .. } | CopyFormat::Csv { delimiter, .. } => *delimiter,
        }
    }

    fn null(&self) -> &[u8] {
        match self {
            CopyFormat::Text { null, .. } | CopyFormat::Csv { null, .. } => null,
        }
    }

    /// Checks the options as the server checks them (and a little more: every special
    /// character must be ASCII and not NUL), so that reading and writing are unambiguous.
    pub fn validate(&self) -> Result<(), CopyError> {
        let problem = |problem| Err(CopyError::Format(problem));
        let special = |byte: u8| byte == 0 || byte == b'\r' || byte == b'\n' || !byte.is_ascii();
        let (delimiter, null) = match self {
            CopyFormat::Text {
                delimiter, null, ..
            } => {
                // Backslash would be ambiguous; letters, digits and the point have
                // meanings after a backslash.
                if *delimiter == b'\\'
                    || *delimiter == b'.'
                    || delimiter.is_ascii_lowercase()
                    || delimiter.is_ascii_digit()
                {
                    return problem(
                        "the delimiter cannot be a backslash, a point, a lowercase letter or a \
                         digit in text format",
                    );
                }
                (*delimiter, null)
            }
            CopyFormat::Csv {
                delimiter,
                quote,
                escape,
                null,
                ..
            } => {
                if special(*quote) || special(*escape) {
                    return problem("the quote and escape characters must be ASCII characters other than NUL, carriage return and newline");
                }
                if quote == delimiter {
                    return problem("the delimiter and the quote must be different");
                }
                if null.contains(quote) {
                    return problem("the quote character must not appear in the NULL string");
                }
                (*delimiter, null)
            }
        };
        if special(delimiter) {
            return problem(
                "the delimiter must be an ASCII character other than NUL, carriage return and newline",
            );
        }
        if null.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
            return problem("the NULL string cannot contain newline, carriage return or NUL");
        }
        if null.contains(&delimiter) {
            return problem("the delimiter must not appear in the NULL string");
        }
        Ok(())
    }
}

/// COPY data or options pgveil cannot read exactly as the server would.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CopyError {
    #[error("COPY options: {0}")]
    Format(&'static str),
    #[error("COPY data, line {line}: {problem}")]
    Data { line: u64, problem: &'static str },
    #[error("COPY data, line {line}: the line is longer than {limit} bytes")]
    LineTooLong { line: u64, limit: usize },
    /// A line [`decode_row`] cannot split; the caller knows its number.
    #[error("COPY data: {0}")]
    Row(&'static str),
}

/// What a line of COPY data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// A row of data.
    Row,
    /// The header line (`HEADER`): pass it on unchanged.
    Header,
    /// The end-of-data marker `\.` alone on its line: pass it on unchanged; the reader
    /// accepts no data after it (the server would ignore it).
    ///
    /// In CSV format only PostgreSQL up to 17 ends the data here; PostgreSQL 18 reads the
    /// line as a row whose first field is `\.`, which fails for a table of more than one
    /// column and otherwise stores the two characters as they are, never a client value.
    EndOfData,
}

/// One complete line of COPY data, borrowed from the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyLine<'a> {
    pub kind: LineKind,
    /// The line's number in the data, from 1, the header included (the server's count).
    pub number: u64,
    bytes: &'a [u8],
    terminator_len: usize,
}

impl<'a> CopyLine<'a> {
    /// The whole line as sent, terminator included.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The line without its terminator: what [`decode_row`] takes.
    pub fn content(&self) -> &'a [u8] {
        self.split().0
    }

    /// `\n`, `\r\n`, `\r`, or empty for a last line without one: what [`encode_row`]
    /// takes to keep the line's style.
    pub fn terminator(&self) -> &'a [u8] {
        self.split().1
    }

    fn split(&self) -> (&'a [u8], &'a [u8]) {
        self.bytes
            .split_at(self.bytes.len().saturating_sub(self.terminator_len))
    }
}

/// The lines found by one [`CopyRowReader::push`] or [`CopyRowReader::finish`].
#[derive(Debug, Clone)]
pub struct CopyLines<'a> {
    buffer: &'a [u8],
    lines: std::slice::Iter<'a, FoundLine>,
}

impl<'a> Iterator for CopyLines<'a> {
    type Item = CopyLine<'a>;

    fn next(&mut self) -> Option<CopyLine<'a>> {
        let line = self.lines.next()?;
        Some(CopyLine {
            kind: line.kind,
            number: line.number,
            bytes: self.buffer.get(line.range.clone()).unwrap_or_default(),
            terminator_len: line.terminator_len,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.lines.size_hint()
    }
}

impl ExactSizeIterator for CopyLines<'_> {}

#[derive(Debug, Clone)]
struct FoundLine {
    kind: LineKind,
    number: u64,
    range: Range<usize>,
    terminator_len: usize,
}

/// The line terminator of the data, fixed by its first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Unknown,
    Nl,
    CrNl,
    Cr,
}

/// Cuts a stream of CopyData payloads into lines, keeping at most one incomplete line
/// between payloads.
#[derive(Debug)]
pub struct CopyRowReader {
    format: CopyFormat,
    max_line_bytes: usize,
    /// Unconsumed bytes: lines handed out by the last call, then the incomplete line.
    buffer: Vec<u8>,
    /// Where the incomplete line starts in `buffer`.
    line_start: usize,
    /// The next byte of the incomplete line to examine.
    scan: usize,
    eol: Eol,
    /// CSV: inside a quoted field, and whether the last byte was an escape there.
    in_quote: bool,
    last_was_escape: bool,
    /// Text: the line so far is the end-of-data marker `\.`.
    end_marker: bool,
    lines_seen: u64,
    /// The end-of-data marker was seen, or `finish` was called.
    ended: bool,
    /// The first error; every later call returns it again.
    failed: Option<CopyError>,
    found: Vec<FoundLine>,
}

impl CopyRowReader {
    /// A reader for data in `format` that refuses any line (terminator included) longer
    /// than `max_line_bytes`. Invalid options make every call fail.
    pub fn new(format: CopyFormat, max_line_bytes: usize) -> CopyRowReader {
        let failed = format.validate().err();
        CopyRowReader {
            format,
            max_line_bytes,
            buffer: Vec::new(),
            line_start: 0,
            scan: 0,
            eol: Eol::Unknown,
            in_quote: false,
            last_was_escape: false,
            end_marker: false,
            lines_seen: 0,
            ended: false,
            failed,
            found: Vec::new(),
        }
    }

    /// Feeds one CopyData payload; returns the lines it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<CopyLines<'_>, CopyError> {
        self.start_call()?;
        if self.ended && !chunk.is_empty() {
            return Err(self.fail(self.lines_seen + 1, "data after the end-of-copy marker"));
        }
        self.buffer.extend_from_slice(chunk);
        self.scan_lines(false)?;
        Ok(self.lines())
    }

    /// At CopyDone: the last line, which may lack a terminator. The reader accepts no
    /// data afterwards.
    pub fn finish(&mut self) -> Result<CopyLines<'_>, CopyError> {
        self.start_call()?;
        if !self.ended {
            self.scan_lines(true)?;
            self.ended = true;
        }
        Ok(self.lines())
    }

    fn lines(&self) -> CopyLines<'_> {
        CopyLines {
            buffer: &self.buffer,
            lines: self.found.iter(),
        }
    }

    /// Drops the lines handed out by the last call.
    fn start_call(&mut self) -> Result<(), CopyError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        self.found.clear();
        if self.line_start > 0 {
            self.buffer.drain(..self.line_start);
            self.scan -= self.line_start;
            self.line_start = 0;
        }
        Ok(())
    }

    fn fail(&mut self, line: u64, problem: &'static str) -> CopyError {
        let error = CopyError::Data { line, problem };
        self.failed = Some(error.clone());
        error
    }

    fn too_long(&mut self, line: u64) -> CopyError {
        let error = CopyError::LineTooLong {
            line,
            limit: self.max_line_bytes,
        };
        self.failed = Some(error.clone());
        error
    }

    /// Finds the complete lines from `scan` on. With `at_end`, the data ends here: look-
    /// ahead that would wait for more data decides with what there is, and what is left
    /// is the last line.
    fn scan_lines(&mut self, at_end: bool) -> Result<(), CopyError> {
        let (csv, quote, escape) = match &self.format {
            CopyFormat::Text { .. } => (false, 0, None),
            // As in the server, an escape equal to the quote is no escape here: a doubled
            // quote toggles twice.
            CopyFormat::Csv { quote, escape, .. } => {
                (true, *quote, (escape != quote).then_some(*escape))
            }
        };
        let mut at = self.scan;
        loop {
            let line = self.lines_seen + 1;
            if self.ended {
                if at < self.buffer.len() {
                    return Err(self.fail(line, "data after the end-of-copy marker"));
                }
                break;
            }
            let Some(&byte) = self.buffer.get(at) else {
                break;
            };
            let next = self.buffer.get(at + 1).copied();
            if byte == 0 {
                return Err(self.fail(line, "NUL byte in data"));
            }
            if !csv && byte == b'\\' {
                match next {
                    None if at_end => {
                        // A backslash ending the data is part of the last line.
                        at += 1;
                        continue;
                    }
                    None => break,
                    Some(b'.') => {
                        if at != self.line_start {
                            return Err(
                                self.fail(line, "end-of-copy marker is not alone on its line")
                            );
                        }
                        match self.buffer.get(at + 2).copied() {
                            Some(b'\r' | b'\n') => {
                                self.end_marker = true;
                                at += 2;
                                continue;
                            }
                            None if !at_end => break,
                            _ => {
                                return Err(
                                    self.fail(line, "end-of-copy marker is not alone on its line")
                                )
                            }
                        }
                    }
                    Some(0) => return Err(self.fail(line, "NUL byte in data")),
                    // Any other byte after a backslash is data, a line break included.
                    Some(_) => {
                        at += 2;
                        continue;
                    }
                }
            }
            if csv {
                // A carriage return needs its next byte before the quote state changes.
                if byte == b'\r' && next.is_none() && !at_end {
                    break;
                }
                if self.in_quote && Some(byte) == escape {
                    self.last_was_escape = !self.last_was_escape;
                }
                if byte == quote && !self.last_was_escape {
                    self.in_quote = !self.in_quote;
                }
                if Some(byte) != escape {
                    self.last_was_escape = false;
                }
            }
            let terminator_len = match byte {
                b'\r' | b'\n' if csv && self.in_quote => 0,
                b'\r' => match self.eol {
                    Eol::Nl => {
                        return Err(self.fail(
                            line,
                            if csv {
                                "unquoted carriage return found in data"
                            } else {
                                "literal carriage return found in data"
                            },
                        ))
                    }
                    Eol::Cr => 1,
                    Eol::Unknown | Eol::CrNl => match next {
                        None if !at_end => break,
                        Some(b'\n') => {
                            self.eol = Eol::CrNl;
                            2
                        }
                        _ if self.eol == Eol::CrNl => {
                            return Err(self.fail(
                                line,
                                if csv {
                                    "unquoted carriage return found in data"
                                } else {
                                    "literal carriage return found in data"
                                },
                            ))
                        }
                        _ => {
                            self.eol = Eol::Cr;
                            1
                        }
                    },
                },
                b'\n' => {
                    if matches!(self.eol, Eol::Cr | Eol::CrNl) {
                        return Err(self.fail(
                            line,
                            if csv {
                                "unquoted newline found in data"
                            } else {
                                "literal newline found in data"
                            },
                        ));
                    }
                    self.eol = Eol::Nl;
                    1
                }
                _ => 0,
            };
            if terminator_len == 0 {
                at += 1;
                continue;
            }
            at += terminator_len;
            self.end_line(at, terminator_len)?;
        }
        self.scan = at;
        if at_end && !self.ended && self.line_start < self.buffer.len() {
            // The server reads a header line without looking at its fields.
            let header = self.lines_seen == 0 && self.format.header();
            if self.in_quote && !header {
                return Err(self.fail(self.lines_seen + 1, "unterminated CSV quoted field"));
            }
            self.end_line(self.buffer.len(), 0)?;
            self.scan = self.buffer.len();
        }
        if self.buffer.len() - self.line_start > self.max_line_bytes {
            return Err(self.too_long(self.lines_seen + 1));
        }
        Ok(())
    }

    /// Records the line from `line_start` to `end` and starts the next one.
    fn end_line(&mut self, end: usize, terminator_len: usize) -> Result<(), CopyError> {
        self.lines_seen += 1;
        let number = self.lines_seen;
        if end - self.line_start > self.max_line_bytes {
            return Err(self.too_long(number));
        }
        let content = &self.buffer[self.line_start..end - terminator_len];
        let kind = match &self.format {
            CopyFormat::Text { .. } if self.end_marker => LineKind::EndOfData,
            // PostgreSQL up to 17 ends CSV data at `\.` alone on a terminated line.
            CopyFormat::Csv { .. } if terminator_len > 0 && content == b"\\." => {
                LineKind::EndOfData
            }
            _ if number == 1 && self.format.header() => LineKind::Header,
            _ => LineKind::Row,
        };
        if kind == LineKind::EndOfData {
            self.ended = true;
        }
        self.found.push(FoundLine {
            kind,
            number,
            range: self.line_start..end,
            terminator_len,
        });
        self.line_start = end;
        self.in_quote = false;
        self.last_was_escape = false;
        self.end_marker = false;
        Ok(())
    }
}

/// The fields of one line: decoded values (None for NULL) and where each field was in
/// the line as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowFields {
    decoded: Vec<u8>,
    fields: Vec<(Option<Range<usize>>, Range<usize>)>,
}

impl RowFields {
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Field `index`: `None` past the last field, `Some(None)` for NULL.
    pub fn get(&self, index: usize) -> Option<Option<&[u8]>> {
        let (value, _) = self.fields.get(index)?;
        Some(value.clone().map(|range| &self.decoded[range]))
    }

    /// The byte range of field `index` in the line as sent (quotes and escapes included).
    pub fn raw_range(&self, index: usize) -> Option<Range<usize>> {
        self.fields.get(index).map(|(_, raw)| raw.clone())
    }

    /// The decoded values, None for NULL.
    pub fn iter(&self) -> impl Iterator<Item = Option<&[u8]>> + '_ {
        self.fields
            .iter()
            .map(|(value, _)| value.clone().map(|range| &self.decoded[range]))
    }

    fn clear(&mut self) {
        self.decoded.clear();
        self.fields.clear();
    }
}

/// Splits one line (its [`CopyLine::content`], without the terminator) into fields.
pub fn decode_row(format: &CopyFormat, line: &[u8]) -> Result<RowFields, CopyError> {
    let mut fields = RowFields::default();
    decode_row_into(format, line, &mut fields)?;
    Ok(fields)
}

/// [`decode_row`] into `fields`, reusing its allocations.
pub fn decode_row_into(
    format: &CopyFormat,
    line: &[u8],
    fields: &mut RowFields,
) -> Result<(), CopyError> {
    format.validate()?;
    fields.clear();
    if line.contains(&0) {
        return Err(CopyError::Row("NUL byte in data"));
    }
    match format {
        CopyFormat::Text {
            delimiter, null, ..
        } => decode_text(*delimiter, null, line, fields),
        CopyFormat::Csv {
            delimiter,
            quote,
            escape,
            null,
            ..
        } => decode_csv(*delimiter, *quote, *escape, null, line, fields),
    }
}

fn octal_digit(byte: Option<&u8>) -> Option<u8> {
    byte.filter(|b| (b'0'..=b'7').contains(b)).map(|b| b - b'0')
}

fn hex_digit(byte: Option<&u8>) -> Option<u8> {
    let byte = *byte?;
    char::from(byte).to_digit(16).map(|d| d as u8)
}

fn decode_text(
    delimiter: u8,
    null: &[u8],
    line: &[u8],
    fields: &mut RowFields,
) -> Result<(), CopyError> {
    let mut at = 0;
    loop {
        let raw_start = at;
        let start = fields.decoded.len();
        let mut found_delimiter = false;
        // Where the raw field ends: before its delimiter, and before a backslash ending the
        // line, which the server drops (also when it compares the field with the NULL
        // string).
        let mut raw_end = line.len();
        while let Some(&byte) = line.get(at) {
            at += 1;
            if byte == delimiter {
                found_delimiter = true;
                raw_end = at - 1;
                break;
            }
            if byte != b'\\' {
                fields.decoded.push(byte);
                continue;
            }
            let Some(&escaped) = line.get(at) else {
                raw_end = at - 1;
                break;
            };
            at += 1;
            let value = match escaped {
                b'0'..=b'7' => {
                    let mut value = escaped - b'0';
                    for _ in 0..2 {
                        match octal_digit(line.get(at)) {
                            Some(digit) => {
                                value = (value << 3) | digit;
                                at += 1;
                            }
                            None => break,
                        }
                    }
                    value
                }
                b'x' => match hex_digit(line.get(at)) {
                    Some(high) => {
                        at += 1;
                        match hex_digit(line.get(at)) {
                            Some(low) => {
                                at += 1;
                                (high << 4) | low
                            }
                            None => high,
                        }
                    }
                    None => b'x',
                },
                b'b' => 0x08,
                b'f' => 0x0c,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'v' => 0x0b,
                other => other,
            };
            fields.decoded.push(value);
        }
        let raw = raw_start..raw_end;
        if line[raw.clone()] == *null {
            fields.decoded.truncate(start);
            fields.fields.push((None, raw));
        } else {
            if fields.decoded[start..].contains(&0) {
                // An escape that makes a NUL: the server refuses it.
                return Err(CopyError::Row("NUL byte in a field"));
            }
            fields.fields.push((Some(start..fields.decoded.len()), raw));
        }
        if !found_delimiter {
            return Ok(());
        }
    }
}

fn decode_csv(
    delimiter: u8,
    quote: u8,
    escape: u8,
    null: &[u8],
    line: &[u8],
    fields: &mut RowFields,
) -> Result<(), CopyError> {
    let mut at = 0;
    loop {
        let raw_start = at;
        let start = fields.decoded.len();
        let mut saw_quote = false;
        let mut found_delimiter = false;
        let mut in_quote = false;
        while let Some(&byte) = line.get(at) {
            at += 1;
            if in_quote {
                if byte == escape {
                    if let Some(&next) = line.get(at) {
                        if next == escape || next == quote {
                            fields.decoded.push(next);
                            at += 1;
                            continue;
                        }
                    }
                }
                if byte == quote {
                    in_quote = false;
                } else {
                    fields.decoded.push(byte);
                }
            } else if byte == delimiter {
                found_delimiter = true;
                break;
            } else if byte == quote {
                saw_quote = true;
                in_quote = true;
            } else {
                fields.decoded.push(byte);
            }
        }
        if in_quote {
            return Err(CopyError::Row("unterminated CSV quoted field"));
        }
        let raw_end = if found_delimiter { at - 1 } else { at };
        let raw = raw_start..raw_end;
        if !saw_quote && line[raw.clone()] == *null {
            fields.decoded.truncate(start);
            fields.fields.push((None, raw));
        } else {
            fields.fields.push((Some(start..fields.decoded.len()), raw));
        }
        if !found_delimiter {
            return Ok(());
        }
    }
}

/// Writes `fields` (None for NULL) as one line ending in `terminator`, escaping or
/// quoting as needed, so that [`decode_row`] (and the server) read back exactly these
/// values. Two kinds of value no line can carry: one holding a NUL byte (the reader and
/// the server refuse the line; no server encoding can store it), and the empty string
/// when the NULL string is empty in text format, which reads back as NULL as it would
/// from the server's own COPY TO (neither ever comes out of [`decode_row`]).
pub fn encode_row(format: &CopyFormat, fields: &[Option<&[u8]>], terminator: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        fields
            .iter()
            .map(|f| f.map_or(2, |v| v.len() + 3))
            .sum::<usize>()
            + terminator.len(),
    );
    encode_row_into(&mut out, format, fields, terminator);
    out
}

/// [`encode_row`] appending to `out`.
pub fn encode_row_into(
    out: &mut Vec<u8>,
    format: &CopyFormat,
    fields: &[Option<&[u8]>],
    terminator: &[u8],
) {
    for (index, field) in fields.iter().copied().enumerate() {
        if index > 0 {
            out.push(format.delimiter());
        }
        encode_field_into(out, format, field);
    }
    out.extend_from_slice(terminator);
}

/// Appends one field (None for NULL), escaped or quoted as needed, without a delimiter:
/// for a caller that copies the other fields of a line as they were sent (see
/// [`RowFields::raw_range`]) and replaces only some.
pub fn encode_field_into(out: &mut Vec<u8>, format: &CopyFormat, field: Option<&[u8]>) {
    let delimiter = format.delimiter();
    let Some(value) = field else {
        out.extend_from_slice(format.null());
        return;
    };
    match format {
        CopyFormat::Text { null, .. } => {
            let start = out.len();
            encode_text(out, delimiter, value);
            if out[start..] == null[..] {
                // The value looks like the NULL string: write its first byte as an
                // octal escape, which reads back the same but no longer matches.
                out.truncate(start);
                if let Some((first, rest)) = value.split_first() {
                    out.push(b'\\');
                    out.extend_from_slice(&[
                        b'0' + (first >> 6),
                        b'0' + ((first >> 3) & 7),
                        b'0' + (first & 7),
                    ]);
                    encode_text(out, delimiter, rest);
                }
            }
        }
        CopyFormat::Csv {
            quote,
            escape,
            null,
            ..
        } => {
            let needs_quotes = value == null.as_slice()
                || value == b"\\."
                || value
                    .iter()
                    .any(|&b| b == delimiter || b == *quote || b == b'\r' || b == b'\n');
            if needs_quotes {
                out.push(*quote);
                for &byte in value {
                    if byte == *quote || byte == *escape {
                        out.push(*escape);
                    }
                    out.push(byte);
                }
                out.push(*quote);
            } else {
                out.extend_from_slice(value);
            }
        }
    }
}

fn encode_text(out: &mut Vec<u8>, delimiter: u8, value: &[u8]) {
    for &byte in value {
        let letter = match byte {
            0x08 => Some(b'b'),
            0x0c => Some(b'f'),
            b'\n' => Some(b'n'),
            b'\r' => Some(b'r'),
            b'\t' => Some(b't'),
            0x0b => Some(b'v'),
            _ => None,
        };
        match letter {
            Some(letter) => out.extend_from_slice(&[b'\\', letter]),
            None if byte == b'\\' || byte == delimiter => out.extend_from_slice(&[b'\\', byte]),
            None => out.push(byte),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }
    }

    type Lines = Vec<(LineKind, Vec<u8>)>;

    /// Feeds `chunks` and then finishes; the lines found, or the first error.
    fn read_chunks(
        format: &CopyFormat,
        limit: usize,
        chunks: &[&[u8]],
    ) -> Result<Lines, CopyError> {
        let mut reader = CopyRowReader::new(format.clone(), limit);
        let mut lines = Vec::new();
        for chunk in chunks {
            for line in reader.push(chunk)? {
                lines.push((line.kind, line.bytes().to_vec()));
            }
        }
        for line in reader.finish()? {
            lines.push((line.kind, line.bytes().to_vec()));
        }
        Ok(lines)
    }

    fn read(format: &CopyFormat, data: &[u8]) -> Result<Lines, CopyError> {
        read_chunks(format, 1 << 20, &[data])
    }

    /// Reading `data` gives the same lines however it is cut: at every single position,
    /// at every pair of positions, and byte by byte.
    fn same_however_cut(format: &CopyFormat, data: &[u8]) -> Result<Lines, CopyError> {
        let whole = read(format, data);
        for cut in 0..=data.len() {
            let (a, b) = data.split_at(cut);
            assert_eq!(read_chunks(format, 1 << 20, &[a, b]), whole, "cut at {cut}");
            for second in cut..=data.len() {
                let chunks = [&data[..cut], &data[cut..second], &data[second..]];
                assert_eq!(
                    read_chunks(format, 1 << 20, &chunks),
                    whole,
                    "cuts {cut} {second}"
                );
            }
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(read_chunks(format, 1 << 20, &bytes), whole, "byte by byte");
        if let Ok(lines) = &whole {
            // Lines are the data, cut: passing them on unchanged sends the same bytes.
            let joined: Vec<u8> = lines.iter().flat_map(|(_, bytes)| bytes.clone()).collect();
            assert_eq!(joined, data);
        }
        whole
    }

    fn rows(lines: &[&str]) -> Lines {
        lines
            .iter()
            .map(|line| (LineKind::Row, line.as_bytes().to_vec()))
            .collect()
    }

    fn fields(format: &CopyFormat, line: &str) -> Vec<Option<String>> {
        decode_row(format, line.as_bytes())
            .unwrap()
            .iter()
            .map(|value| value.map(|v| String::from_utf8(v.to_vec()).unwrap()))
            .collect()
    }

    fn some(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some(v.to_string())).collect()
    }

    fn data_error(result: Result<Lines, CopyError>) -> (u64, &'static str) {
        match result {
            Err(CopyError::Data { line, problem }) => (line, problem),
            other => panic!("expected a data error, got {other:?}"),
        }
    }

    #[test]
    fn formats_and_their_checks() {
        assert_eq!(
            CopyFormat::text(),
            CopyFormat::Text {
                delimiter: b'\t',
                null: b"\\N".to_vec(),
                header: false
            }
        );
        assert_eq!(
            CopyFormat::csv(),
            CopyFormat::Csv {
                delimiter: b',',
                quote: b'"',
                escape: b'"',
                null: Vec::new(),
                header: false
            }
        );
        assert!(CopyFormat::text().validate().is_ok());
        assert!(CopyFormat::csv().validate().is_ok());
        let text = |delimiter: u8, null: &[u8]| CopyFormat::Text {
            delimiter,
            null: null.to_vec(),
            header: false,
        };
        assert!(text(b',', b"").validate().is_ok());
        assert!(text(b'|', b"NULL").validate().is_ok());
        assert!(text(b'X', b"\\N").validate().is_ok());
        for bad in [
            text(b'\\', b"\\N"),
            text(b'.', b"\\N"),
            text(b'a', b"\\N"),
            text(b'7', b"\\N"),
            text(b'\n', b"\\N"),
            text(b'\r', b"\\N"),
            text(0, b"\\N"),
            text(0xe5, b"\\N"),
            text(b',', b"a,b"),
            text(b',', b"a\nb"),
        ] {
            assert!(
                matches!(bad.validate(), Err(CopyError::Format(_))),
                "{bad:?}"
            );
            // A reader over invalid options refuses everything.
            let mut reader = CopyRowReader::new(bad.clone(), 100);
            assert!(reader.push(b"").is_err());
            assert!(reader.finish().is_err());
            assert!(decode_row(&bad, b"x").is_err());
        }
        let csv = |delimiter: u8, quote: u8, escape: u8, null: &[u8]| CopyFormat::Csv {
            delimiter,
            quote,
            escape,
            null: null.to_vec(),
            header: true,
        };
        assert!(csv(b';', b'\'', b'\\', b"NULL").validate().is_ok());
        for bad in [
            csv(b',', b',', b'"', b""),
            csv(b',', b'\n', b'"', b""),
            csv(b',', b'"', b'\r', b""),
            csv(b',', b'"', b'"', b"\"\""),
            csv(b',', b'"', b'"', b","),
        ] {
            assert!(
                matches!(bad.validate(), Err(CopyError::Format(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn text_lines_however_the_data_is_cut() {
        let format = CopyFormat::text();
        // Escapes (a backslash before a newline makes it data), NULL, UTF-8, an empty line,
        // a last line without a newline.
        let data = "1\tAlice\t\\N\n2\tB\\\\ob\\tx\t\\\n\n3\t张\t\\\\.x\n\n4\tlast";
        let lines = same_however_cut(&format, data.as_bytes()).unwrap();
        assert_eq!(
            lines,
            rows(&[
                "1\tAlice\t\\N\n",
                "2\tB\\\\ob\\tx\t\\\n\n",
                "3\t张\t\\\\.x\n",
                "\n",
                "4\tlast",
            ])
        );
        assert_eq!(
            fields(&format, "2\tB\\\\ob\\tx\t\\\n"),
            vec![Some("2".into()), Some("B\\ob\tx".into()), Some("\n".into())]
        );
    }

    #[test]
    fn line_terminators() {
        let format = CopyFormat::text();
        let crlf = same_however_cut(&format, b"a\tb\r\nc\\\r\\\nd\r\n\r\ne").unwrap();
        assert_eq!(crlf, rows(&["a\tb\r\n", "c\\\r\\\nd\r\n", "\r\n", "e"]));
        // An escaped carriage return leaves its newline alone in the data.
        assert_eq!(
            data_error(read(&format, b"a\r\nc\\\r\nd\r\n")),
            (2, "literal newline found in data")
        );
        let cr = same_however_cut(&format, b"a\rb\\\rc\r\rd\r").unwrap();
        assert_eq!(cr, rows(&["a\r", "b\\\rc\r", "\r", "d\r"]));
        // A carriage return ending the data ends the first line.
        assert_eq!(read(&format, b"a\r").unwrap(), rows(&["a\r"]));
        // Every line must end as the first one did.
        assert_eq!(
            data_error(read(&format, b"a\nb\rc\n")),
            (2, "literal carriage return found in data")
        );
        assert_eq!(
            data_error(read(&format, b"a\r\nb\nc")),
            (2, "literal newline found in data")
        );
        assert_eq!(
            data_error(read(&format, b"a\r\nb\rc")),
            (2, "literal carriage return found in data")
        );
        assert_eq!(
            data_error(read(&format, b"a\rb\r\n")),
            (3, "literal newline found in data")
        );
        let csv = CopyFormat::csv();
        assert_eq!(
            data_error(read(&csv, b"a\nb\rc\n")),
            (2, "unquoted carriage return found in data")
        );
        // Inside quotes, line breaks of any kind are data.
        let quoted = same_however_cut(&csv, b"\"a\rb\nc\r\n\",d\r\ne,\"\r\"\r\n").unwrap();
        assert_eq!(quoted, rows(&["\"a\rb\nc\r\n\",d\r\n", "e,\"\r\"\r\n"]));
    }

    #[test]
    fn csv_lines_however_the_data_is_cut() {
        let format = CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'"',
            null: Vec::new(),
            header: true,
        };
        let data = b"id,\"na\nme\"\r\n1,\"say \"\"hi\"\"\r\nthere\"\r\n2,,\"\"\r\n\\.\r\n";
        let lines = same_however_cut(&format, data).unwrap();
        assert_eq!(
            lines,
            vec![
                (LineKind::Header, b"id,\"na\nme\"\r\n".to_vec()),
                (LineKind::Row, b"1,\"say \"\"hi\"\"\r\nthere\"\r\n".to_vec()),
                (LineKind::Row, b"2,,\"\"\r\n".to_vec()),
                (LineKind::EndOfData, b"\\.\r\n".to_vec()),
            ]
        );
        assert_eq!(
            fields(&format, "1,\"say \"\"hi\"\"\r\nthere\""),
            some(&["1", "say \"hi\"\r\nthere"])
        );
        // A different escape: only escape-quote and escape-escape inside quotes.
        let escaped = CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'\\',
            null: Vec::new(),
            header: false,
        };
        let data = b"\"a\\\"b\nc\",\"d\\\\\"\n\"e\\x\"\n";
        let lines = same_however_cut(&escaped, data).unwrap();
        assert_eq!(lines, rows(&["\"a\\\"b\nc\",\"d\\\\\"\n", "\"e\\x\"\n"]));
        assert_eq!(
            fields(&escaped, "\"a\\\"b\nc\",\"d\\\\\""),
            some(&["a\"b\nc", "d\\"])
        );
        assert_eq!(fields(&escaped, "\"e\\x\""), some(&["e\\x"]));
        assert_eq!(fields(&escaped, "a\\,b"), some(&["a\\", "b"]));
        // An unterminated quoted field at the end of the data; the header is not read.
        assert_eq!(
            data_error(read(&format, b"id\n1,\"abc\n")),
            (2, "unterminated CSV quoted field")
        );
        assert_eq!(
            read(&format, b"\"id\n").unwrap(),
            vec![(LineKind::Header, b"\"id\n".to_vec())]
        );
    }

    #[test]
    fn headers() {
        let text = CopyFormat::Text {
            delimiter: b'\t',
            null: b"\\N".to_vec(),
            header: true,
        };
        let lines = same_however_cut(&text, b"id\tname\n1\tx\n").unwrap();
        assert_eq!(
            lines,
            vec![
                (LineKind::Header, b"id\tname\n".to_vec()),
                (LineKind::Row, b"1\tx\n".to_vec())
            ]
        );
        // Without HEADER the first line is data.
        assert_eq!(
            read(&CopyFormat::text(), b"id\tname\n").unwrap(),
            rows(&["id\tname\n"])
        );
        // A header alone, without a terminator.
        assert_eq!(
            read(&text, b"id").unwrap(),
            vec![(LineKind::Header, b"id".to_vec())]
        );
        // The line numbers count the header.
        let mut reader = CopyRowReader::new(text, 100);
        let numbers: Vec<(LineKind, u64)> = reader
            .push(b"h\na\nb\n")
            .unwrap()
            .map(|line| (line.kind, line.number))
            .collect();
        assert_eq!(
            numbers,
            vec![
                (LineKind::Header, 1),
                (LineKind::Row, 2),
                (LineKind::Row, 3)
            ]
        );
    }

    #[test]
    fn end_of_data_marker() {
        let text = CopyFormat::text();
        let lines = same_however_cut(&text, b"a\n\\.\n").unwrap();
        assert_eq!(
            lines,
            vec![
                (LineKind::Row, b"a\n".to_vec()),
                (LineKind::EndOfData, b"\\.\n".to_vec())
            ]
        );
        let lines = same_however_cut(&text, b"a\r\n\\.\r\n").unwrap();
        assert_eq!(lines[1], (LineKind::EndOfData, b"\\.\r\n".to_vec()));
        let lines = same_however_cut(&text, b"\\.\r").unwrap();
        assert_eq!(lines, vec![(LineKind::EndOfData, b"\\.\r".to_vec())]);
        // An escaped backslash before a point is data.
        assert_eq!(read(&text, b"\\\\.\n").unwrap(), rows(&["\\\\.\n"]));
        for bad in [&b"a\\.\n"[..], b"\\.x\n", b"\\.", b"a\n\\.", b"x\t\\.\t\n"] {
            assert_eq!(
                data_error(read(&text, bad)).1,
                "end-of-copy marker is not alone on its line",
                "{bad:?}"
            );
        }
        // Nothing may follow the marker: the server would ignore it, pgveil refuses it.
        assert_eq!(
            data_error(read(&text, b"\\.\nsecret\n")),
            (2, "data after the end-of-copy marker")
        );
        assert_eq!(
            data_error(read_chunks(&text, 100, &[b"\\.\n", b"x"])),
            (2, "data after the end-of-copy marker")
        );
        assert_eq!(
            read_chunks(&text, 100, &[b"\\.\n", b""]).unwrap(),
            vec![(LineKind::EndOfData, b"\\.\n".to_vec())]
        );
        let mut reader = CopyRowReader::new(text.clone(), 100);
        reader.finish().unwrap();
        assert!(reader.push(b"late").is_err());
        // CSV: `\.` alone on a terminated line ends the data; elsewhere it is data.
        let csv = CopyFormat::csv();
        let lines = same_however_cut(&csv, b"a\n\\.\n").unwrap();
        assert_eq!(lines[1], (LineKind::EndOfData, b"\\.\n".to_vec()));
        assert_eq!(read(&csv, b"a\n\\.").unwrap(), rows(&["a\n", "\\."]));
        assert_eq!(read(&csv, b"\"\\.\"\n").unwrap(), rows(&["\"\\.\"\n"]));
        assert_eq!(read(&csv, b"\\.,x\n").unwrap(), rows(&["\\.,x\n"]));
        assert_eq!(
            read(&csv, b"\"a\n\\.\n\"\n").unwrap(),
            rows(&["\"a\n\\.\n\"\n"])
        );
        assert_eq!(
            data_error(read(&csv, b"\\.\n1\n")),
            (2, "data after the end-of-copy marker")
        );
    }

    #[test]
    fn lines_longer_than_the_limit() {
        let format = CopyFormat::text();
        assert_eq!(
            read_chunks(&format, 4, &[b"abc\nabcd", b"\n"]),
            Err(CopyError::LineTooLong { line: 2, limit: 4 })
        );
        assert_eq!(
            read_chunks(&format, 4, &[b"abc\n", b"abc\n"])
                .unwrap()
                .len(),
            2
        );
        // An incomplete line is refused as soon as it is too long.
        let mut reader = CopyRowReader::new(format.clone(), 8);
        assert_eq!(reader.push(b"a\n").unwrap().count(), 1);
        assert_eq!(reader.push(b"12345").unwrap().count(), 0);
        assert_eq!(
            reader.push(b"6789").err(),
            Some(CopyError::LineTooLong { line: 2, limit: 8 })
        );
        // The reader stays failed.
        assert!(reader.push(b"\n").is_err());
        assert!(reader.finish().is_err());
        // Memory stays bounded by the limit and the chunk, however long the stream.
        let mut reader = CopyRowReader::new(CopyFormat::csv(), 64);
        for _ in 0..10_000 {
            assert_eq!(reader.push(b"1,\"x\ny\"\n2,z\n").unwrap().count(), 2);
            assert!(reader.buffer.len() <= 64 + 16);
        }
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert_eq!(
            data_error(read(&CopyFormat::text(), b"a\nb\0c\n")),
            (2, "NUL byte in data")
        );
        assert_eq!(
            data_error(read(&CopyFormat::csv(), b"\"a\0\"\n")),
            (1, "NUL byte in data")
        );
        assert_eq!(
            data_error(read(&CopyFormat::text(), b"a\\\0\n")),
            (1, "NUL byte in data")
        );
        assert!(decode_row(&CopyFormat::text(), b"a\0").is_err());
        // An escape that makes a NUL, as the server refuses it.
        assert!(decode_row(&CopyFormat::text(), b"a\\000").is_err());
        assert!(decode_row(&CopyFormat::text(), b"a\\x0").is_err());
        // ... unless the field is the NULL string.
        let null_zero = CopyFormat::Text {
            delimiter: b'\t',
            null: b"\\0".to_vec(),
            header: false,
        };
        assert_eq!(
            fields(&null_zero, "\\0\tx"),
            vec![None, Some("x".to_string())]
        );
    }

    #[test]
    fn text_fields() {
        let format = CopyFormat::text();
        assert_eq!(
            fields(&format, "1\t\\N\t\t\\\\N\tN"),
            vec![
                Some("1".into()),
                None,
                Some(String::new()),
                Some("\\N".into()),
                Some("N".into())
            ]
        );
        assert_eq!(
            fields(&format, "\\b\\f\\n\\r\\t\\v\\\\\\a\\.\\N\\\t"),
            some(&["\x08\x0c\n\r\t\x0b\\a.N\t"])
        );
        // Octal: up to three digits; hex: up to two after x; x alone is x.
        assert_eq!(
            decode_row(&format, b"\\1234\\101\\7x\\x41\\x4g\\x\\xfff")
                .unwrap()
                .get(0),
            Some(Some(&b"S4A\x07xA\x04gx\xfff"[..]))
        );
        let raw = decode_row(&format, b"\\xe5\\274\\240").unwrap();
        assert_eq!(raw.get(0), Some(Some("\u{5f20}".as_bytes())));
        // A backslash ending the data is dropped, as the server drops it, also before the
        // comparison with the NULL string.
        assert_eq!(fields(&format, "ab\\"), some(&["ab"]));
        assert_eq!(fields(&format, "x\t\\N\\"), vec![Some("x".into()), None]);
        // An escaped line break is data.
        assert_eq!(fields(&format, "a\\\nb"), some(&["a\nb"]));
        assert_eq!(fields(&format, ""), some(&[""]));
        assert_eq!(fields(&format, "\t"), some(&["", ""]));
        // The NULL string is compared on the raw field.
        let custom = CopyFormat::Text {
            delimiter: b',',
            null: b"NULL".to_vec(),
            header: false,
        };
        assert_eq!(
            fields(&custom, "NULL,\\NULL,\\N,,a\\,b"),
            vec![
                None,
                Some("NULL".into()),
                Some("N".into()),
                Some(String::new()),
                Some("a,b".into())
            ]
        );
        let empty_null = CopyFormat::Text {
            delimiter: b',',
            null: Vec::new(),
            header: false,
        };
        assert_eq!(
            fields(&empty_null, ",x,"),
            vec![None, Some("x".into()), None]
        );
        // Where each field was.
        let row = decode_row(&custom, b"ab,\\N,NULL").unwrap();
        assert_eq!(row.len(), 3);
        assert_eq!(
            (0..4).map(|i| row.raw_range(i)).collect::<Vec<_>>(),
            vec![Some(0..2), Some(3..5), Some(6..10), None]
        );
        assert_eq!(row.get(3), None);
    }

    #[test]
    fn csv_fields() {
        let format = CopyFormat::csv();
        assert_eq!(
            fields(&format, "1,,\"\",\"a,b\",\"say \"\"x\"\"\",a\"b,c\"d,\"\""),
            vec![
                Some("1".into()),
                None,
                Some(String::new()),
                Some("a,b".into()),
                Some("say \"x\"".into()),
                Some("ab,cd".into()),
                Some(String::new()),
            ]
        );
        // A quoted NULL string is not NULL.
        let custom = CopyFormat::Csv {
            delimiter: b';',
            quote: b'\'',
            escape: b'\'',
            null: b"NULL".to_vec(),
            header: false,
        };
        assert_eq!(
            fields(&custom, "NULL;'NULL';;' x ';'it''s'"),
            vec![
                None,
                Some("NULL".into()),
                Some(String::new()),
                Some(" x ".into()),
                Some("it's".into())
            ]
        );
        assert_eq!(
            decode_row(&format, b"a,\"b"),
            Err(CopyError::Row("unterminated CSV quoted field"))
        );
        let row = decode_row(&format, b"\"a\"\"b\",c").unwrap();
        assert_eq!(row.raw_range(0), Some(0..6));
        assert_eq!(row.raw_range(1), Some(7..8));
        // Fields decoded into a reused RowFields.
        let mut reused = RowFields::default();
        decode_row_into(&format, b"x,y,z", &mut reused).unwrap();
        decode_row_into(&format, b"p", &mut reused).unwrap();
        assert_eq!(reused.iter().collect::<Vec<_>>(), vec![Some(&b"p"[..])]);
    }

    #[test]
    fn encoding_escapes_what_it_must() {
        let text = CopyFormat::text();
        let line = encode_row(
            &text,
            &[
                Some(b"a\tb\\c\nd\re"),
                None,
                Some(b""),
                Some(b"\\N"),
                Some(b"\x08\x0b\x0c\x01"),
            ],
            b"\n",
        );
        assert_eq!(line, b"a\\tb\\\\c\\nd\\re\t\\N\t\t\\\\N\t\\b\\v\\f\x01\n");
        // A value that looks like the NULL string.
        let custom = CopyFormat::Text {
            delimiter: b',',
            null: b"NULL".to_vec(),
            header: false,
        };
        assert_eq!(
            encode_row(&custom, &[Some(b"NULL"), Some(b"a,b")], b"\r\n"),
            b"\\116ULL,a\\,b\r\n"
        );
        let csv = CopyFormat::csv();
        assert_eq!(
            encode_row(
                &csv,
                &[
                    Some(b"plain"),
                    None,
                    Some(b""),
                    Some(b"a,\"b\"\n"),
                    Some(b"\\.")
                ],
                b"\n"
            ),
            b"plain,,\"\",\"a,\"\"b\"\"\n\",\"\\.\"\n"
        );
        let escaped = CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'\\',
            null: b"\\N".to_vec(),
            header: false,
        };
        assert_eq!(
            encode_row(
                &escaped,
                &[Some(b"a\\b"), Some(b"\"x\\"), Some(b"\\N"), None],
                b""
            ),
            b"a\\b,\"\\\"x\\\\\",\"\\\\N\",\\N"
        );
        // One field replaced, the others copied as sent.
        let line = b"1\t\\x41\t\\N";
        let row = decode_row(&text, line).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&line[row.raw_range(0).unwrap()]);
        out.push(b'\t');
        encode_field_into(&mut out, &text, Some(b"new\tvalue"));
        out.push(b'\t');
        out.extend_from_slice(&line[row.raw_range(2).unwrap()]);
        assert_eq!(out, b"1\tnew\\tvalue\t\\N");
    }

    fn random_value(random: &mut Random, alphabet: &[u8]) -> Option<Vec<u8>> {
        if random.below(8) == 0 {
            return None;
        }
        let len = random.below(8);
        Some(
            (0..len)
                .map(|_| {
                    if random.below(6) == 0 {
                        1 + random.below(255) as u8
                    } else {
                        alphabet[random.below(alphabet.len())]
                    }
                })
                .collect(),
        )
    }

    /// Random rows of awkward values: encoded, cut into random chunks, read and decoded,
    /// they come back as they were.
    #[test]
    fn encode_read_decode_round_trips() {
        let formats = [
            CopyFormat::text(),
            CopyFormat::Text {
                delimiter: b',',
                null: b"NULL".to_vec(),
                header: false,
            },
            CopyFormat::Text {
                delimiter: b'|',
                null: Vec::new(),
                header: true,
            },
            CopyFormat::csv(),
            CopyFormat::Csv {
                delimiter: b';',
                quote: b'\'',
                escape: b'\\',
                null: b"NULL".to_vec(),
                header: false,
            },
            CopyFormat::Csv {
                delimiter: b'\t',
                quote: b'"',
                escape: b'"',
                null: b"\\N".to_vec(),
                header: true,
            },
        ];
        let alphabet = b"ab\\.N\"',;|\t\r\n LUx01";
        let mut random = Random(0xc0b1);
        for format in &formats {
            for _ in 0..300 {
                let terminator: &[u8] = [&b"\n"[..], b"\r\n", b"\r"][random.below(3)];
                let mut expected: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
                let mut data = Vec::new();
                if format.header() {
                    data.extend_from_slice(b"h");
                    data.extend_from_slice(terminator);
                }
                for _ in 0..random.below(6) + 1 {
                    let count = random.below(4) + 1;
                    let mut row: Vec<Option<Vec<u8>>> = (0..count)
                        .map(|_| random_value(&mut random, alphabet))
                        .collect();
                    if matches!(format, CopyFormat::Text { null, .. } if null.is_empty()) {
                        // The one value text format cannot carry with an empty NULL string.
                        for value in &mut row {
                            if value.as_deref() == Some(b"") {
                                *value = None;
                            }
                        }
                    }
                    let borrowed: Vec<Option<&[u8]>> = row.iter().map(|v| v.as_deref()).collect();
                    encode_row_into(&mut data, format, &borrowed, terminator);
                    expected.push(row);
                }
                if random.below(2) == 0
                    && data != terminator
                    && !data.ends_with(&[terminator, terminator].concat())
                {
                    // The last line may lack its terminator (unless it would then be no
                    // line at all).
                    data.truncate(data.len() - terminator.len());
                }
                let mut chunks = Vec::new();
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let (chunk, after) = rest.split_at(random.below(rest.len() + 1).max(1));
                    chunks.push(chunk);
                    rest = after;
                }
                let lines = read_chunks(format, 1 << 16, &chunks)
                    .unwrap_or_else(|e| panic!("{format:?} {data:?}: {e}"));
                let mut decoded = Vec::new();
                for (kind, bytes) in &lines {
                    if *kind == LineKind::Header {
                        continue;
                    }
                    assert_eq!(*kind, LineKind::Row, "{format:?} {data:?}");
                    let content = bytes.strip_suffix(terminator).unwrap_or(bytes);
                    let row = decode_row(format, content).unwrap();
                    decoded.push(
                        row.iter()
                            .map(|v| v.map(<[u8]>::to_vec))
                            .collect::<Vec<_>>(),
                    );
                }
                assert_eq!(decoded, expected, "{format:?} {data:?}");
            }
        }
    }

    /// Arbitrary bytes never panic, and whatever is read cuts the data without loss.
    #[test]
    fn arbitrary_input_never_panics() {
        let formats = [
            CopyFormat::text(),
            CopyFormat::Text {
                delimiter: b',',
                null: Vec::new(),
                header: true,
            },
            CopyFormat::csv(),
            CopyFormat::Csv {
                delimiter: b',',
                quote: b'"',
                escape: b'\\',
                null: b"N".to_vec(),
                header: true,
            },
        ];
        let alphabet = b"a\\.\"\r\n,\tNx7\0";
        let mut random = Random(0xbad);
        for _ in 0..3000 {
            let data: Vec<u8> = (0..random.below(40))
                .map(|_| alphabet[random.below(alphabet.len())])
                .collect();
            for format in &formats {
                let cut = random.below(data.len() + 1);
                let limit = random.below(50) + 1;
                if let Ok(lines) = read_chunks(format, limit, &[&data[..cut], &data[cut..]]) {
                    let joined: Vec<u8> = lines.iter().flat_map(|(_, b)| b.clone()).collect();
                    assert_eq!(joined, data);
                    assert!(lines.iter().all(|(_, line)| line.len() <= limit));
                }
                let _ = decode_row(format, &data);
            }
        }
    }
}
