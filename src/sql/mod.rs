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

use sqlparser::ast::{CopyTarget, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Span, Token, Tokenizer};

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
