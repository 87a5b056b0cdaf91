//! Lexical facts about SQL text that need no parser: which command a statement starts
//! with. It must never be used to decide that a statement is harmless, only to pick
//! statements that need a closer look.

/// The first keyword of `sql`, lower-cased, after whitespace, comments and opening
/// parentheses; `None` when the text holds no keyword.
pub fn leading_keyword(sql: &[u8]) -> Option<String> {
    let mut rest = sql;
    loop {
        match rest {
            [first, tail @ ..] if first.is_ascii_whitespace() || *first == b'(' => rest = tail,
            [b'-', b'-', tail @ ..] => {
                let end = tail.iter().position(|&b| b == b'\n').unwrap_or(tail.len());
                rest = &tail[end..];
            }
            [b'/', b'*', tail @ ..] => rest = skip_block_comment(tail),
            _ => break,
        }
    }
    let word: String = rest
        .iter()
        .take_while(|b| b.is_ascii_alphabetic() || **b == b'_')
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect();
    (!word.is_empty()).then_some(word)
}

/// The text after a block comment whose opening `/*` was already consumed; block
/// comments nest in PostgreSQL.
fn skip_block_comment(mut rest: &[u8]) -> &[u8] {
    let mut depth = 1;
    while depth > 0 {
        match rest {
            [] => return rest,
            [b'*', b'/', tail @ ..] => {
                depth -= 1;
                rest = tail;
            }
            [b'/', b'*', tail @ ..] => {
                depth += 1;
                rest = tail;
            }
            [_, tail @ ..] => rest = tail,
        }
    }
    rest
}

/// Whether a statement's rows are produced by another statement or cursor looked up
/// only when it runs (SQL `FETCH` of a cursor, SQL `EXECUTE` of a prepared statement),
/// so its description at Bind may not match them.
pub fn runs_another_statement(sql: &[u8]) -> bool {
    matches!(leading_keyword(sql).as_deref(), Some("fetch" | "execute"))
}

/// Whether `sql` may run a command that rules rewrite (INSERT, UPDATE, DELETE, MERGE),
/// or a prepared statement that may be one (EXECUTE). A word search, no parsing: an
/// identifier that contains one of the words only makes pgveil stricter.
pub fn may_modify_data(sql: &[u8]) -> bool {
    const WORDS: [&[u8]; 5] = [b"insert", b"update", b"delete", b"merge", b"execute"];
    WORDS.iter().any(|word| {
        sql.windows(word.len())
            .any(|window| window.eq_ignore_ascii_case(word))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_keyword() {
        assert_eq!(leading_keyword(b"select 1").as_deref(), Some("select"));
        assert_eq!(
            leading_keyword(b"  -- note\n /* a /* nested */ one */ (FETCH ALL c)").as_deref(),
            Some("fetch")
        );
        assert_eq!(leading_keyword(b"Execute q(1)").as_deref(), Some("execute"));
        assert_eq!(leading_keyword(b"/* unterminated"), None);
        assert_eq!(leading_keyword(b"-- only a comment"), None);
        assert_eq!(leading_keyword(b""), None);
    }

    #[test]
    fn knows_statements_that_run_others() {
        assert!(runs_another_statement(b"fetch 10 from c"));
        assert!(runs_another_statement(b"/**/EXECUTE p"));
        assert!(!runs_another_statement(b"select * from fetch"));
        assert!(!runs_another_statement(b"explain execute p"));
    }

    #[test]
    fn knows_statements_that_may_modify_data() {
        assert!(may_modify_data(b"INSERT INTO t VALUES (1)"));
        assert!(may_modify_data(b"with x as (select 1) Delete from t"));
        assert!(may_modify_data(b"EXECUTE q(1)"));
        assert!(!may_modify_data(b"SELECT count(*) FROM t"));
    }
}
