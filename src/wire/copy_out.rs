//! The server's data of one COPY … TO STDOUT, taken apart row by row so the read policy
//! can transform single fields (decrypt, mask, redact), and put back together with every
//! other byte as the server sent it. Text, CSV and binary formats. Sans-IO.
//!
//! Nothing here may log or put data into an error: errors name the row number and the
//! problem only.

use thiserror::Error;

use super::copy_rows::CopyFormat;

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
    /// The data is not what the format says (row number, 1-based, and the problem).
    #[error("COPY data row {row}: {problem}")]
    Malformed { row: u64, problem: &'static str },
    /// The field callback refused a value.
    #[error("COPY data row {row}: field {field} refused")]
    Field { row: u64, field: usize, error: E },
}

/// Decides the fate of the field at a position, given its value (`None`: NULL).
pub type FieldCallback<'a, E> = dyn FnMut(usize, Option<&[u8]>) -> Result<FieldChange, E> + 'a;

/// Rewrites the fields at chosen positions of every row of one COPY … TO STDOUT.
pub struct CopyOutRewriter {
    format: CopyOutFormat,
    width: usize,
    rewrite: Vec<usize>,
}

impl CopyOutRewriter {
    /// `width`: fields of every row; `rewrite`: positions (0-based) whose values go
    /// through the callback of [`Self::push`].
    pub fn new(format: CopyOutFormat, width: usize, rewrite: Vec<usize>) -> CopyOutRewriter {
        CopyOutRewriter {
            format,
            width,
            rewrite,
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
        let _ = (payload, field, &self.format, self.width, &self.rewrite);
        Err(CopyOutError::Malformed {
            row: 0,
            problem: "not built yet",
        })
    }

    /// CopyDone: nothing may be left over (and binary data must have ended with its
    /// trailer).
    pub fn finish(&mut self) -> Result<(), CopyOutError<std::convert::Infallible>> {
        Err(CopyOutError::Malformed {
            row: 0,
            problem: "not built yet",
        })
    }
}
