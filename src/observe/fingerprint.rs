//! Statement fingerprints for the audit log: the SQL with every literal replaced by
//! `?` and comments removed, so a record says what was asked without any value.
//!
//! A lexer, not a parser: it knows PostgreSQL's literal and comment syntax (quoted
//! strings with their prefixes, dollar quotes, numbers, booleans) and nothing else. It
//! must never let a literal through: text it cannot read to the end (an unterminated
//! string or comment) is cut off behind a `?`.

use crate::sqltext::{
    block_comment_end, dollar_quote_end, is_identifier_part, is_identifier_start, number_end,
    quoted_end,
};

/// The fingerprint of `sql`.
///
/// A backslash makes string boundaries depend on the session: with
/// `standard_conforming_strings` off, `\'` inside '…' does not end it, and in client
/// encodings such as GBK or SJIS the second byte of a character can be a backslash. So
/// when the text holds one, everything from its first quote on is cut off.
pub fn fingerprint(sql: &[u8]) -> String {
    if sql.contains(&b'\\') {
        if let Some(quote) = sql.iter().position(|&b| b == b'\'') {
            let mut print = lex_fingerprint(&sql[..quote]);
            print.push_str(if print.is_empty() { "?" } else { " ?" });
            return print;
        }
    }
    lex_fingerprint(sql)
}

fn lex_fingerprint(sql: &[u8]) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(sql.len());
    let mut at = 0;
    // Whether the last thing written was whitespace (runs are collapsed to one space).
    let mut spaced = true;
    let push_space = |out: &mut Vec<u8>, spaced: &mut bool| {
        if !*spaced {
            out.push(b' ');
            *spaced = true;
        }
    };
    while at < sql.len() {
        let byte = sql[at];
        let next = sql.get(at + 1).copied();
        match byte {
            b if b.is_ascii_whitespace() => {
                push_space(&mut out, &mut spaced);
                at += 1;
                continue;
            }
            b'-' if next == Some(b'-') => {
                at = sql[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(sql.len(), |end| at + end);
                push_space(&mut out, &mut spaced);
                continue;
            }
            b'/' if next == Some(b'*') => {
                match block_comment_end(sql, at + 2) {
                    Some(end) => at = end,
                    None => {
                        // Unterminated: nothing after it can be trusted to be SQL.
                        out.extend_from_slice(b" ?");
                        break;
                    }
                }
                push_space(&mut out, &mut spaced);
                continue;
            }
            b'\'' => match quoted_end(sql, at, false) {
                Some(end) => {
                    out.push(b'?');
                    at = end;
                }
                None => {
                    out.push(b'?');
                    break;
                }
            },
            b'"' => {
                // A quoted identifier: a name, not a value; kept. Unterminated, it may
                // hold anything: cut off like an unterminated string.
                match sql[at + 1..].iter().position(|&b| b == b'"') {
                    Some(end) => {
                        let end = at + 1 + end + 1;
                        out.extend_from_slice(&sql[at..end]);
                        at = end;
                    }
                    None => {
                        out.push(b'?');
                        break;
                    }
                }
            }
            b'$' if next.is_some_and(|b| b.is_ascii_digit()) => {
                // A parameter: `$1`.
                let end = sql[at + 1..]
                    .iter()
                    .position(|b| !b.is_ascii_digit())
                    .map_or(sql.len(), |end| at + 1 + end);
                out.extend_from_slice(&sql[at..end]);
                at = end;
            }
            b'$' => match dollar_quote_end(sql, at) {
                Some(Ok(end)) => {
                    out.push(b'?');
                    at = end;
                }
                Some(Err(())) => {
                    out.push(b'?');
                    break;
                }
                None => {
                    out.push(byte);
                    at += 1;
                }
            },
            b if b.is_ascii_digit() || (b == b'.' && next.is_some_and(|n| n.is_ascii_digit())) => {
                out.push(b'?');
                at = number_end(sql, at);
            }
            b if is_identifier_start(b) => {
                let end = sql[at..]
                    .iter()
                    .position(|&b| !is_identifier_part(b))
                    .map_or(sql.len(), |end| at + end);
                let word = &sql[at..end];
                let prefixed_string = sql.get(end) == Some(&b'\'')
                    && (word.eq_ignore_ascii_case(b"e")
                        || word.eq_ignore_ascii_case(b"b")
                        || word.eq_ignore_ascii_case(b"x")
                        || word.eq_ignore_ascii_case(b"n"));
                let unicode_string = word.eq_ignore_ascii_case(b"u")
                    && sql.get(end) == Some(&b'&')
                    && sql.get(end + 1) == Some(&b'\'');
                if prefixed_string || unicode_string {
                    let quote = if unicode_string { end + 1 } else { end };
                    let backslashes = word.eq_ignore_ascii_case(b"e");
                    out.push(b'?');
                    match quoted_end(sql, quote, backslashes) {
                        Some(after) => at = after,
                        None => break,
                    }
                } else if word.eq_ignore_ascii_case(b"true") || word.eq_ignore_ascii_case(b"false")
                {
                    out.push(b'?');
                    at = end;
                } else {
                    out.extend_from_slice(word);
                    at = end;
                }
            }
            _ => {
                out.push(byte);
                at += 1;
            }
        }
        spaced = false;
    }
    while out.last() == Some(&b' ') {
        out.pop();
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(sql: &str, expected: &str) {
        assert_eq!(fingerprint(sql.as_bytes()), expected, "{sql}");
    }

    #[test]
    fn literals_become_placeholders() {
        check(
            "SELECT name FROM customers WHERE phone = '13812345678' AND id = 42",
            "SELECT name FROM customers WHERE phone = ? AND id = ?",
        );
        check("select 1.5e-3, .5, 10", "select ?, ?, ?");
        check("SELECT 'it''s', B'0101', X'1F', N'x'", "SELECT ?, ?, ?, ?");
        // A backslash anywhere: everything from the first quote is cut off.
        check(
            "SELECT id FROM t WHERE a = E'a\\'b' AND b = 'c'",
            "SELECT id FROM t WHERE a = E ?",
        );
        check(
            "SELECT $$dollar 'quoted'$$ || $tag$x$y$tag$",
            "SELECT ? || ?",
        );
        check(
            "UPDATE t SET vip = TRUE WHERE flag = false",
            "UPDATE t SET vip = ? WHERE flag = ?",
        );
        check(
            "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
            "INSERT INTO t VALUES (?, ?), (?, ?)",
        );
    }

    #[test]
    fn names_parameters_and_casts_stay() {
        check(
            "SELECT \"Phone 1\", col2, t1.x FROM s1.t1 WHERE a = $1 AND b = $12::int",
            "SELECT \"Phone 1\", col2, t1.x FROM s1.t1 WHERE a = $1 AND b = $12::int",
        );
        check("SELECT NULL", "SELECT NULL");
    }

    #[test]
    fn comments_go_and_whitespace_collapses() {
        check(
            "SELECT /* customer 13812345678 */ id  -- phone 139\n\tFROM t",
            "SELECT id FROM t",
        );
        check("/* a /* nested */ comment */ SELECT 1", "SELECT ?");
    }

    #[test]
    fn unterminated_text_never_leaks() {
        for sql in [
            "SELECT 'unterminated 13812345678",
            "SELECT E'esc \\' 13812345678",
            "SELECT $q$ 13812345678",
            "SELECT /* 13812345678",
            "SELECT \"x FROM t WHERE phone = '13812345678'",
            // standard_conforming_strings = off: the string goes on after \'.
            "SELECT 1 FROM t WHERE phone = 'a\\' zhang.wei@example.com 13812345678'",
        ] {
            let print = fingerprint(sql.as_bytes());
            assert!(!print.contains("138"), "{sql} -> {print}");
        }
    }

    #[test]
    fn non_utf8_input_is_handled() {
        let print = fingerprint(b"SELECT '\xff\xfe' FROM t\xe4");
        assert!(print.starts_with("SELECT ? FROM t"), "{print}");
    }
}
