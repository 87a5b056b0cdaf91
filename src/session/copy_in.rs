//! The rows of one COPY … FROM STDIN into encrypted columns, rewritten on their way to
//! the server: every field bound for an encrypted column is replaced by its ciphertext,
//! every other byte of the line stays as the client sent it.
//!
//! Sans-IO: CopyData payloads in, CopyData payloads out. Lines are cut where the server
//! will cut them (`wire::copy_rows`), so a field is never mistaken for another. It must
//! never pass on a line it could not rewrite: any doubt (a line it cannot split, a field
//! count that differs from the COPY's columns, a value that is not valid for the column's
//! type) is an error, and the caller fails the whole COPY. Errors name the line and the
//! column, never a value.

use std::sync::Arc;

use super::crypt::{value_refusal, WriteRefusal};
use crate::engine::Protection;
use crate::observe::metrics::DenyReason;
use crate::policy::ColumnId;
use crate::protect::column_crypto::ColumnCrypto;
use crate::wire::copy_rows::{
    decode_row_into, encode_field_into, CopyError, CopyFormat, CopyLines, CopyRowReader, LineKind,
    RowFields,
};

/// Longest line of COPY data pgveil holds while waiting for its end. PostgreSQL's own
/// limit on a field is 1 GB; a line this long in an encrypted table is a mistake or an
/// attack, and refusing it keeps a session's memory bounded.
pub const MAX_COPY_LINE_BYTES: usize = 64 * 1024 * 1024;

/// One field of a COPY row that is encrypted: its column and cipher.
pub type EncryptedField = Option<(ColumnId, Arc<ColumnCrypto>)>;

/// A COPY … FROM STDIN whose rows pgveil is rewriting.
#[derive(Debug)]
pub struct CopyStream {
    /// The executing request that started it (its `sent_after`): when pgveil fails the
    /// copy, the server's error for that request is replaced by pgveil's.
    pub request: u64,
    /// The COPY statement, for the audit log.
    pub statement: Vec<u8>,
    /// Per field of a row, the encrypted column it fills.
    fields: Vec<EncryptedField>,
    format: CopyFormat,
    reader: CopyRowReader,
    /// Reused for every row.
    row: RowFields,
    /// pgveil failed the copy: what else the client sends for it is dropped.
    pub failed: bool,
}

impl CopyStream {
    pub fn new(
        request: u64,
        statement: Vec<u8>,
        fields: Vec<EncryptedField>,
        format: CopyFormat,
    ) -> CopyStream {
        CopyStream {
            request,
            statement,
            fields,
            reader: CopyRowReader::new(format.clone(), MAX_COPY_LINE_BYTES),
            format,
            row: RowFields::default(),
            failed: false,
        }
    }

    /// The payload to send for one client CopyData payload: its complete lines,
    /// rewritten (empty while a line is still incomplete).
    pub fn data(
        &mut self,
        protection: &Protection,
        payload: &[u8],
    ) -> Result<Vec<u8>, Box<WriteRefusal>> {
        let lines = self.reader.push(payload).map_err(copy_refusal);
        rewrite(
            protection,
            &self.fields,
            &self.format,
            &mut self.row,
            lines,
            payload.len(),
        )
    }

    /// At CopyDone: the last line, which may lack a terminator.
    pub fn done(&mut self, protection: &Protection) -> Result<Vec<u8>, Box<WriteRefusal>> {
        let lines = self.reader.finish().map_err(copy_refusal);
        rewrite(
            protection,
            &self.fields,
            &self.format,
            &mut self.row,
            lines,
            0,
        )
    }
}

fn rewrite(
    protection: &Protection,
    fields: &[EncryptedField],
    format: &CopyFormat,
    row: &mut RowFields,
    lines: Result<CopyLines<'_>, Box<WriteRefusal>>,
    size_hint: usize,
) -> Result<Vec<u8>, Box<WriteRefusal>> {
    let lines = lines?;
    let mut out = Vec::with_capacity(size_hint + size_hint / 2);
    for line in lines {
        if line.kind != LineKind::Row {
            // The header and the end-of-data marker carry no values.
            out.extend_from_slice(line.bytes());
            continue;
        }
        let content = line.content();
        decode_row_into(format, content, row).map_err(|error| {
            copy_refusal(match error {
                CopyError::Row(problem) => CopyError::Data {
                    line: line.number,
                    problem,
                },
                other => other,
            })
        })?;
        if row.len() != fields.len() {
            return Err(data_refusal(
                line.number,
                &format!(
                    "the line has {} fields where the COPY names {} columns",
                    row.len(),
                    fields.len()
                ),
            ));
        }
        for (index, field) in fields.iter().enumerate() {
            if index > 0 {
                out.push(format.delimiter());
            }
            let value = row.get(index).flatten();
            match (field, value) {
                (Some((column, crypto)), Some(value)) => {
                    let stored = encrypt(protection, *column, crypto, value)
                        .map_err(|refusal| at_line(refusal, line.number))?;
                    encode_field_into(&mut out, format, Some(&stored));
                }
                // Plain fields and NULLs go on exactly as sent.
                _ => {
                    let raw = row.raw_range(index).unwrap_or_default();
                    out.extend_from_slice(content.get(raw).unwrap_or_default());
                }
            }
        }
        out.extend_from_slice(line.terminator());
    }
    Ok(out)
}

/// The stored form of a COPY text value for an encrypted column.
fn encrypt(
    protection: &Protection,
    column: ColumnId,
    crypto: &ColumnCrypto,
    value: &[u8],
) -> Result<Vec<u8>, Box<WriteRefusal>> {
    let canonical = crypto
        .canonical(0, value)
        .map_err(|error| value_refusal(protection, column, &error.message, error.sqlstate))?;
    let envelope = crypto
        .seal(&canonical)
        .map_err(|error| value_refusal(protection, column, error, "XX000"))?;
    Ok(crypto.copy_field(&envelope))
}

fn at_line(mut refusal: Box<WriteRefusal>, line: u64) -> Box<WriteRefusal> {
    refusal.message = format!("{} (COPY data, line {line})", refusal.message);
    refusal
}

const COPY_HINT: &str =
    "pgveil encrypts COPY rows it can read exactly as the server would; fix the data or load it with INSERT";

fn data_refusal(line: u64, problem: &str) -> Box<WriteRefusal> {
    Box::new(WriteRefusal {
        sqlstate: "22P04",
        reason: DenyReason::WriteRefused,
        column: None,
        message: format!("pgveil: COPY data, line {line}: {problem}"),
        hint: COPY_HINT.into(),
    })
}

fn copy_refusal(error: CopyError) -> Box<WriteRefusal> {
    let sqlstate = match error {
        CopyError::LineTooLong { .. } => "54000",
        _ => "22P04",
    };
    Box::new(WriteRefusal {
        sqlstate,
        reason: DenyReason::WriteRefused,
        column: None,
        message: format!("pgveil: {error}"),
        hint: COPY_HINT.into(),
    })
}
