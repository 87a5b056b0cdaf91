//! Statement analysis on sqlparser ASTs: parsing with the PostgreSQL dialect, source
//! positions as byte offsets, and text rewrites spliced into the client's own SQL.
//!
//! Only statements that name a relation with encrypted columns are parsed (the caller
//! prefilters on names). Rewrites replace exact byte ranges of the original text and
//! leave every other byte as the client sent it; this module never re-prints an AST,
//! whose output could differ from what the client wrote. Nothing here may log or put into
//! an error the value of a literal.

pub mod encryption;
pub mod lineage;
pub mod plan_cache;

use std::ops::Range;

use sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopyTarget, Ident, JoinConstraint,
    JoinOperator, ObjectName, ObjectNamePart, Statement,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Span, Token, Tokenizer};

use crate::wire::copy_out::CopyOutFormat;
use crate::wire::copy_rows::CopyFormat;

/// The statements of `sql`, or the parser's complaint (which may quote the text, so it
/// is for logs at debug level only, never for clients).
pub fn parse(sql: &str) -> Result<Vec<Statement>, String> {
    let statements =
        Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|error| error.to_string())?;
    let copies_from_stdin = statements.iter().any(|statement| {
        matches!(
            statement,
            Statement::Copy {
                target: CopyTarget::Stdin,
                to: false,
                ..
            }
        )
    });
    // The parser reads whatever follows `COPY … FROM STDIN;` as the COPY's inline data
    // (psql dump style), but the server runs it as statements: it must not go unseen.
    if copies_from_stdin && statement_count(sql)? > statements.len() {
        return Err("statements follow a COPY … FROM STDIN in the same text".into());
    }
    Ok(statements)
}

/// How many non-empty statements the tokens of `sql` hold, split at semicolons.
fn statement_count(sql: &str) -> Result<usize, String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize()
        .map_err(|error| error.to_string())?;
    let mut count = 0;
    let mut current_has_tokens = false;
    for token in tokens {
        match token {
            Token::SemiColon => {
                count += usize::from(current_has_tokens);
                current_has_tokens = false;
            }
            Token::Whitespace(_) | Token::EOF => {}
            _ => current_has_tokens = true,
        }
    }
    Ok(count + usize::from(current_has_tokens))
}

/// An identifier as PostgreSQL resolves it: unquoted folds to lower case, quoted is
/// kept as written.
/// The constraint (ON, USING, NATURAL, none) of a join, for the joins that have one.
pub(crate) fn join_constraint(operator: &JoinOperator) -> Option<&JoinConstraint> {
    use JoinOperator as J;
    match operator {
        J::Join(c)
        | J::Inner(c)
        | J::Left(c)
        | J::LeftOuter(c)
        | J::Right(c)
        | J::RightOuter(c)
        | J::FullOuter(c)
        | J::CrossJoin(c)
        | J::Semi(c)
        | J::LeftSemi(c)
        | J::RightSemi(c)
        | J::Anti(c)
        | J::LeftAnti(c)
        | J::RightAnti(c)
        | J::StraightJoin(c) => Some(c),
        J::AsOf { constraint, .. } => Some(constraint),
        J::CrossApply | J::OuterApply | J::ArrayJoin | J::LeftArrayJoin | J::InnerArrayJoin => None,
    }
}

pub(crate) fn normalise(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

/// The normalised parts of a dotted name (`schema.table`); a part that is not an
/// identifier is empty.
pub(crate) fn name_parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => normalise(ident),
            ObjectNamePart::Function(_) => String::new(),
        })
        .collect()
}

/// Which way a COPY moves data, for the options each direction allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyDirection {
    /// COPY … FROM: pgveil reads (and may rewrite) the client's rows; binary data and
    /// the FORCE options are not modelled.
    From,
    /// COPY … TO: pgveil reads the server's rows; binary data is modelled, and
    /// FORCE_QUOTE only changes quoting, which the reader follows.
    To,
}

/// Builds the format of a COPY's data from its options; `Err` names what is not
/// supported (for the message).
pub(crate) fn copy_data_format(
    options: &[CopyOption],
    legacy: &[CopyLegacyOption],
    direction: CopyDirection,
) -> Result<CopyOutFormat, &'static str> {
    let to = direction == CopyDirection::To;
    let mut binary = false;
    let mut csv = false;
    let mut delimiter = None;
    let mut null = None;
    let mut header = false;
    let mut quote = b'"';
    let mut escape = None;
    // Options that only make sense for text or CSV data (binary refuses them).
    let mut row_options = false;
    let mut force_quote = false;
    let byte = |c: char| u8::try_from(u32::from(c)).ok().filter(u8::is_ascii);
    for option in options {
        match option {
            CopyOption::Format(name) => match name.value.to_lowercase().as_str() {
                "csv" => (csv, binary) = (true, false),
                "text" => (csv, binary) = (false, false),
                "binary" if to => (csv, binary) = (false, true),
                _ if to => return Err("an unknown FORMAT"),
                _ => return Err("a binary or unknown FORMAT"),
            },
            CopyOption::Delimiter(c) => {
                delimiter = Some(byte(*c).ok_or("a non-ASCII DELIMITER")?);
                row_options = true;
            }
            CopyOption::Null(s) => {
                null = Some(s.as_bytes().to_vec());
                row_options = true;
            }
            CopyOption::Header(h) => {
                header = *h;
                row_options = true;
            }
            CopyOption::Quote(c) => {
                quote = byte(*c).ok_or("a non-ASCII QUOTE")?;
                row_options = true;
            }
            CopyOption::Escape(c) => {
                escape = Some(byte(*c).ok_or("a non-ASCII ESCAPE")?);
                row_options = true;
            }
            CopyOption::Encoding(name) => {
                if !encryption::ascii_safe_encoding(name) {
                    return Err("an ENCODING whose characters can contain ASCII bytes");
                }
            }
            CopyOption::Freeze(_) => {}
            CopyOption::ForceQuote(_) if to => force_quote = true,
            CopyOption::ForceQuote(_) | CopyOption::ForceNotNull(_) | CopyOption::ForceNull(_) => {
                return Err("FORCE options")
            }
        }
    }
    for option in legacy {
        match option {
            CopyLegacyOption::Binary if to => binary = true,
            CopyLegacyOption::Binary => return Err("FORMAT binary"),
            CopyLegacyOption::Delimiter(c) => {
                delimiter = Some(byte(*c).ok_or("a non-ASCII DELIMITER")?);
                row_options = true;
            }
            CopyLegacyOption::Null(s) => {
                null = Some(s.as_bytes().to_vec());
                row_options = true;
            }
            CopyLegacyOption::Csv(csv_options) => {
                csv = true;
                for csv_option in csv_options {
                    match csv_option {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(c) => {
                            quote = byte(*c).ok_or("a non-ASCII QUOTE")?
                        }
                        CopyLegacyCsvOption::Escape(c) => {
                            escape = Some(byte(*c).ok_or("a non-ASCII ESCAPE")?)
                        }
                        CopyLegacyCsvOption::ForceQuote(_) if to => force_quote = true,
                        _ => return Err("FORCE options"),
                    }
                }
            }
            CopyLegacyOption::Header => {
                header = true;
                row_options = true;
            }
            _ => return Err("options pgveil does not model"),
        }
    }
    if binary {
        // The server refuses text and CSV options on binary data.
        if csv || row_options || force_quote {
            return Err("options the server refuses");
        }
        return Ok(CopyOutFormat::Binary);
    }
    if force_quote && !csv {
        return Err("options the server refuses");
    }
    let format = if csv {
        CopyFormat::Csv {
            delimiter: delimiter.unwrap_or(b','),
            quote,
            escape: escape.unwrap_or(quote),
            null: null.unwrap_or_default(),
            header,
        }
    } else {
        CopyFormat::Text {
            delimiter: delimiter.unwrap_or(b'\t'),
            null: null.unwrap_or_else(|| b"\\N".to_vec()),
            header,
        }
    };
    // The server refuses such options too; pgveil must not read the data otherwise.
    format
        .validate()
        .map_err(|_| "options the server refuses")?;
    Ok(CopyOutFormat::Rows(format))
}

/// Converts sqlparser's line/column positions (1-based, columns counted in characters)
/// into byte offsets of one text.
pub struct Offsets<'a> {
    pub(crate) text: &'a str,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
}

impl<'a> Offsets<'a> {
    pub fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(
            text.bytes()
                .enumerate()
                .filter(|&(_, byte)| byte == b'\n')
                .map(|(index, _)| index + 1),
        );
        Offsets { text, line_starts }
    }

    /// The byte offset of `location`, or `None` for an empty or impossible location.
    pub fn offset(&self, location: Location) -> Option<usize> {
        if location.line == 0 || location.column == 0 {
            return None;
        }
        let line = usize::try_from(location.line - 1).ok()?;
        let start = *self.line_starts.get(line)?;
        let end = self
            .line_starts
            .get(line + 1)
            .copied()
            .unwrap_or(self.text.len());
        let line_text = self.text.get(start..end)?;
        let column = usize::try_from(location.column - 1).ok()?;
        if column == 0 {
            return Some(start);
        }
        match line_text.char_indices().nth(column) {
            Some((index, _)) => Some(start + index),
            // Just past the line's last character.
            None if line_text.chars().count() == column => Some(end),
            None => None,
        }
    }

    /// The byte range of `span`, or `None` when sqlparser did not record one.
    pub fn range(&self, span: Span) -> Option<Range<usize>> {
        let start = self.offset(span.start)?;
        let end = self.offset(span.end)?;
        (start < end && end <= self.text.len()).then_some(start..end)
    }
}

/// `text` with each range replaced; ranges must not overlap (checked: overlapping edits
/// are an error, never a silently mangled statement).
pub fn splice(text: &str, mut edits: Vec<(Range<usize>, String)>) -> Result<String, String> {
    edits.sort_by_key(|(range, _)| range.start);
    let mut out = String::with_capacity(text.len() + edits.len() * 64);
    let mut copied = 0;
    for (range, replacement) in edits {
        if range.start < copied || range.end > text.len() {
            return Err("overlapping rewrites".into());
        }
        let before = text
            .get(copied..range.start)
            .ok_or_else(|| "rewrite inside a character".to_string())?;
        out.push_str(before);
        out.push_str(&replacement);
        copied = range.end;
    }
    out.push_str(
        text.get(copied..)
            .ok_or_else(|| "rewrite inside a character".to_string())?,
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::ast::{Expr, SetExpr, Spanned};

    #[test]
    fn statements_after_copy_from_stdin_are_not_taken_for_its_data() {
        for sql in [
            "COPY t FROM STDIN; SELECT 1",
            "COPY t FROM STDIN;\nUPDATE u SET a = 'x'\n",
            "SELECT 1; COPY t FROM STDIN; DELETE FROM u",
            "COPY t FROM STDIN; /* c */ DROP TABLE u",
        ] {
            assert!(parse(sql).is_err(), "{sql}");
        }
        for (sql, statements) in [
            ("COPY t FROM STDIN", 1),
            ("COPY t FROM STDIN;", 1),
            ("COPY t FROM STDIN;\n  ", 1),
            ("COPY t FROM STDIN; -- done", 1),
            ("SELECT ';'; COPY t FROM STDIN", 2),
        ] {
            assert_eq!(parse(sql).map(|s| s.len()), Ok(statements), "{sql}");
        }
    }

    #[test]
    fn spans_become_byte_offsets_across_lines_and_wide_characters() {
        let sql = "SELECT '名字',\n  x FROM t WHERE y = 'ü'";
        let statements = parse(sql).unwrap();
        let Statement::Query(query) = &statements[0] else {
            panic!()
        };
        let SetExpr::Select(select) = query.body.as_ref() else {
            panic!()
        };
        let offsets = Offsets::new(sql);
        let Some(Expr::BinaryOp { right, .. }) = &select.selection else {
            panic!()
        };
        let range = offsets.range(right.span()).unwrap();
        assert_eq!(&sql[range], "'ü'");
        let first = offsets.range(select.projection[0].span()).unwrap();
        assert_eq!(&sql[first], "'名字'");
    }

    #[test]
    fn splice_replaces_ranges_and_refuses_overlaps() {
        let text = "abcdef";
        assert_eq!(
            splice(text, vec![(4..5, "E".into()), (0..1, "AA".into())]).unwrap(),
            "AAbcdEf"
        );
        assert!(splice(text, vec![(0..3, "x".into()), (2..4, "y".into())]).is_err());
    }
}
