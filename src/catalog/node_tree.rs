//! Parser for PostgreSQL's `pg_node_tree` text: the serialized node trees that the
//! server stores in catalogs such as `pg_rewrite.ev_action` (a view's query tree).
//!
//! The text is what PostgreSQL's `outfuncs.c` writes: `{NAME :field value ...}` for a
//! node, `(...)` for a list (`(i ...)`, `(o ...)`, `(x ...)` for integer, OID and
//! transaction-id lists, `(b ...)` for a bitmapset), `<>` for a null pointer or an empty
//! list, `"..."` for a string value node, `4 [ 1 0 0 0 ... ]` for a `Const`'s datum, and
//! bare tokens in which a backslash protects the next character. This module turns that
//! into a generic [`Node`] tree without knowing what any node means; the meaning is for
//! its callers (see `catalog::lineage`).
//!
//! The text comes from the upstream server, which pgveil does not trust to be
//! well-formed, so this module must never panic on input, never recurse (parsing uses
//! an explicit stack), and never build a tree deeper than [`MAX_DEPTH`]: callers walk
//! the tree recursively and rely on that bound.

use thiserror::Error;

/// Deepest nesting of nodes and lists accepted. PostgreSQL's own reader recurses without
/// a fixed bound, but real view definitions stay far below this; a deeper text is
/// refused so that recursive walks over the tree have a known stack bound.
pub const MAX_DEPTH: usize = 1000;

/// One value of a parsed node tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// `<>`: a null pointer, an empty list or an empty string field.
    Null,
    /// A bare token, with its backslash escapes removed: a number, a name, `true`...
    Atom(String),
    /// A string value node, written `"..."` (for example in an alias's `:colnames`).
    Str(String),
    /// `{NAME :field value ...}`; fields keep their order and drop the leading colon.
    Struct {
        name: String,
        fields: Vec<(String, Node)>,
    },
    /// `( ... )`: a list of nodes.
    List(Vec<Node>),
    /// `(i ...)`: a list of integers.
    IntList(Vec<i64>),
    /// `(o ...)`: a list of OIDs.
    OidList(Vec<u32>),
    /// `(x ...)`: a list of transaction ids.
    XidList(Vec<u32>),
    /// `(b ...)`: the members of a bitmapset.
    Bitmapset(Vec<u32>),
    /// A `Const`'s value: the declared length and the bytes that follow it in brackets.
    /// For pass-by-value types PostgreSQL writes all bytes of a `Datum`, so the count
    /// can exceed the length.
    Datum { length: u64, bytes: Vec<u8> },
}

impl Node {
    /// The node's type name (`QUERY`, `VAR`...) when this is a node.
    pub fn struct_name(&self) -> Option<&str> {
        match self {
            Node::Struct { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether this is a node of type `name`.
    pub fn is_struct(&self, name: &str) -> bool {
        self.struct_name() == Some(name)
    }

    /// The value of field `name` (without the colon) of a node.
    pub fn field(&self, name: &str) -> Option<&Node> {
        match self {
            Node::Struct { fields, .. } => fields
                .iter()
                .find(|(label, _)| label == name)
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The elements of a list. `<>` counts as the empty list, because that is how
    /// PostgreSQL writes an empty (`NIL`) list.
    pub fn as_list(&self) -> Option<&[Node]> {
        match self {
            Node::List(items) => Some(items),
            Node::Null => Some(&[]),
            _ => None,
        }
    }

    /// A bare token read as a signed integer.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Node::Atom(text) => text.parse().ok(),
            _ => None,
        }
    }

    /// A bare `true` or `false`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Node::Atom(text) if text == "true" => Some(true),
            Node::Atom(text) if text == "false" => Some(false),
            _ => None,
        }
    }

    /// The text of a bare token or of a string value node.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Atom(text) | Node::Str(text) => Some(text),
            _ => None,
        }
    }

    /// Whether this is `<>`.
    pub fn is_null(&self) -> bool {
        matches!(self, Node::Null)
    }
}

/// Why a text is not a node tree this parser accepts. Offsets are byte offsets into the
/// text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("node tree ends early")]
    UnexpectedEnd,
    #[error("unexpected token {token:?} at byte {offset}")]
    UnexpectedToken { token: String, offset: usize },
    #[error("backslash with nothing after it at byte {offset}")]
    DanglingEscape { offset: usize },
    #[error("node tree nests deeper than {limit} at byte {offset}")]
    TooDeep { limit: usize, offset: usize },
    #[error("text after the end of the node tree at byte {offset}")]
    TrailingInput { offset: usize },
    #[error("{token:?} at byte {offset} is not a valid {what}")]
    BadNumber {
        token: String,
        offset: usize,
        what: &'static str,
    },
}

/// Parses one complete node tree; anything but whitespace after it is an error.
pub fn parse(text: &str) -> Result<Node, ParseError> {
    let mut lexer = Lexer::new(text);
    let mut stack: Vec<Frame> = Vec::new();
    let root = loop {
        let token = lexer.next_token()?.ok_or(ParseError::UnexpectedEnd)?;
        let expecting = match stack.last() {
            None => Expect::Value,
            Some(Frame::Struct { label: None, .. }) => Expect::LabelOrEnd,
            Some(Frame::Struct { .. }) => Expect::Value,
            Some(Frame::List(_)) => Expect::ElementOrEnd,
        };
        let completed = match expecting {
            Expect::LabelOrEnd if token.raw == "}" => match stack.pop() {
                Some(Frame::Struct { name, fields, .. }) => Some(Node::Struct { name, fields }),
                _ => return Err(token.unexpected()),
            },
            Expect::LabelOrEnd => {
                // Field labels are fixed identifiers in outfuncs.c and never escaped.
                let label = token
                    .raw
                    .strip_prefix(':')
                    .filter(|rest| !rest.is_empty())
                    .ok_or_else(|| token.unexpected())?;
                if let Some(Frame::Struct { label: slot, .. }) = stack.last_mut() {
                    *slot = Some(label.to_owned());
                }
                None
            }
            Expect::ElementOrEnd if token.raw == ")" => match stack.pop() {
                Some(Frame::List(items)) => Some(Node::List(items)),
                _ => return Err(token.unexpected()),
            },
            Expect::Value | Expect::ElementOrEnd => start_value(token, &mut lexer, &mut stack)?,
        };
        if let Some(node) = completed {
            match stack.last_mut() {
                None => break node,
                Some(Frame::List(items)) => items.push(node),
                Some(Frame::Struct { fields, label, .. }) => match label.take() {
                    Some(label) => fields.push((label, node)),
                    // A value is only started once its label was read, so this cannot
                    // happen; still, refuse rather than panic.
                    None => return Err(ParseError::UnexpectedEnd),
                },
            }
        }
    };
    match lexer.next_token()? {
        Some(token) => Err(ParseError::TrailingInput {
            offset: token.offset,
        }),
        None => Ok(root),
    }
}

/// What the innermost open construct accepts next.
enum Expect {
    Value,
    LabelOrEnd,
    ElementOrEnd,
}

/// A node or list that has been opened and not yet closed.
enum Frame {
    Struct {
        name: String,
        fields: Vec<(String, Node)>,
        /// The label read whose value has not arrived yet.
        label: Option<String>,
    },
    List(Vec<Node>),
}

/// Reads the value that `token` begins. Returns the value when it is complete already,
/// or `None` after opening a node or list on `stack`.
fn start_value(
    token: Token<'_>,
    lexer: &mut Lexer<'_>,
    stack: &mut Vec<Frame>,
) -> Result<Option<Node>, ParseError> {
    match token.raw {
        "{" => {
            check_depth(stack, &token)?;
            let name = lexer.next_token()?.ok_or(ParseError::UnexpectedEnd)?;
            if name.is_special() {
                return Err(name.unexpected());
            }
            stack.push(Frame::Struct {
                name: name.unescaped()?,
                fields: Vec::new(),
                label: None,
            });
            Ok(None)
        }
        "(" => {
            check_depth(stack, &token)?;
            let first = lexer.peek_token()?.ok_or(ParseError::UnexpectedEnd)?;
            match first.raw {
                ")" => {
                    lexer.next_token()?;
                    Ok(Some(Node::List(Vec::new())))
                }
                "i" => {
                    lexer.next_token()?;
                    Ok(Some(Node::IntList(read_numbers(lexer, "integer")?)))
                }
                "o" => {
                    lexer.next_token()?;
                    Ok(Some(Node::OidList(read_numbers(lexer, "OID")?)))
                }
                "x" => {
                    lexer.next_token()?;
                    Ok(Some(Node::XidList(read_numbers(lexer, "transaction id")?)))
                }
                "b" => {
                    lexer.next_token()?;
                    Ok(Some(Node::Bitmapset(read_numbers(
                        lexer,
                        "bitmapset member",
                    )?)))
                }
                _ => {
                    stack.push(Frame::List(Vec::new()));
                    Ok(None)
                }
            }
        }
        ")" | "}" => Err(token.unexpected()),
        // Only an unescaped `<>` means null: outToken writes a string "<>" as `\<>`.
        "<>" => Ok(Some(Node::Null)),
        raw if raw.len() >= 2 && raw.starts_with('"') && raw.ends_with('"') => {
            // The quotes are judged on the raw token, as PostgreSQL's reader does: a
            // bare token that begins with a quote has it escaped.
            let inner = &raw[1..raw.len() - 1];
            Ok(Some(Node::Str(unescape(inner, token.offset + 1)?)))
        }
        _ => {
            let is_datum = lexer.peek_token()?.is_some_and(|next| next.raw == "[");
            if is_datum {
                lexer.next_token()?;
                Ok(Some(read_datum(&token, lexer)?))
            } else {
                Ok(Some(Node::Atom(token.unescaped()?)))
            }
        }
    }
}

fn check_depth(stack: &[Frame], token: &Token<'_>) -> Result<(), ParseError> {
    if stack.len() >= MAX_DEPTH {
        return Err(ParseError::TooDeep {
            limit: MAX_DEPTH,
            offset: token.offset,
        });
    }
    Ok(())
}

/// Reads the members of a typed list up to its closing parenthesis.
fn read_numbers<T: std::str::FromStr>(
    lexer: &mut Lexer<'_>,
    what: &'static str,
) -> Result<Vec<T>, ParseError> {
    let mut values = Vec::new();
    loop {
        let token = lexer.next_token()?.ok_or(ParseError::UnexpectedEnd)?;
        if token.raw == ")" {
            return Ok(values);
        }
        values.push(token.number(what)?);
    }
}

/// Reads a datum's bytes after `length [`, up to `]`. PostgreSQL prints each byte as a
/// signed `char` on most platforms, so both -128..-1 and 128..255 stand for the same
/// byte values.
fn read_datum(length: &Token<'_>, lexer: &mut Lexer<'_>) -> Result<Node, ParseError> {
    let length = length.number("datum length")?;
    let mut bytes = Vec::new();
    loop {
        let token = lexer.next_token()?.ok_or(ParseError::UnexpectedEnd)?;
        if token.raw == "]" {
            return Ok(Node::Datum { length, bytes });
        }
        let value: i16 = token.number("datum byte")?;
        let byte = match value {
            // Two's complement: -1 is 255, -128 is 128.
            -128..=-1 => (value + 256) as u8,
            0..=255 => value as u8,
            _ => {
                return Err(ParseError::BadNumber {
                    token: token.raw.to_owned(),
                    offset: token.offset,
                    what: "datum byte",
                })
            }
        };
        bytes.push(byte);
    }
}

/// One token as it appears in the text, escapes included.
#[derive(Clone, Copy)]
struct Token<'a> {
    raw: &'a str,
    offset: usize,
}

impl Token<'_> {
    fn is_special(&self) -> bool {
        matches!(self.raw, "(" | ")" | "{" | "}")
    }

    fn unexpected(&self) -> ParseError {
        ParseError::UnexpectedToken {
            token: self.raw.to_owned(),
            offset: self.offset,
        }
    }

    fn unescaped(&self) -> Result<String, ParseError> {
        unescape(self.raw, self.offset)
    }

    fn number<T: std::str::FromStr>(&self, what: &'static str) -> Result<T, ParseError> {
        self.raw.parse().map_err(|_| ParseError::BadNumber {
            token: self.raw.to_owned(),
            offset: self.offset,
            what,
        })
    }
}

/// Removes the backslashes that protect the character after them.
fn unescape(raw: &str, offset: usize) -> Result<String, ParseError> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.char_indices();
    while let Some((at, c)) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some((_, escaped)) => out.push(escaped),
                None => {
                    return Err(ParseError::DanglingEscape {
                        offset: offset + at,
                    })
                }
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Splits the text into tokens the way PostgreSQL's `pg_strtok` does: whitespace
/// separates tokens, each of `(){}` is a token by itself, and a backslash makes the
/// next character part of the current token whatever it is.
struct Lexer<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Lexer { text, pos: 0 }
    }

    fn peek_token(&self) -> Result<Option<Token<'a>>, ParseError> {
        Ok(self.scan()?.map(|(token, _)| token))
    }

    fn next_token(&mut self) -> Result<Option<Token<'a>>, ParseError> {
        match self.scan()? {
            Some((token, end)) => {
                self.pos = end;
                Ok(Some(token))
            }
            None => {
                self.pos = self.text.len();
                Ok(None)
            }
        }
    }

    /// Finds the token at or after the current position and where it ends.
    fn scan(&self) -> Result<Option<(Token<'a>, usize)>, ParseError> {
        let bytes = self.text.as_bytes();
        let mut start = self.pos;
        while start < bytes.len() && matches!(bytes[start], b' ' | b'\n' | b'\t' | b'\r') {
            start += 1;
        }
        if start >= bytes.len() {
            return Ok(None);
        }
        let mut end = start;
        if matches!(bytes[start], b'(' | b')' | b'{' | b'}') {
            end += 1;
        } else {
            while end < bytes.len() {
                match bytes[end] {
                    b' ' | b'\n' | b'\t' | b'\r' | b'(' | b')' | b'{' | b'}' => break,
                    b'\\' => {
                        // The escaped character may be multi-byte; step over all of it
                        // so that the token ends on a character boundary.
                        let escaped = self.text[end + 1..]
                            .chars()
                            .next()
                            .ok_or(ParseError::DanglingEscape { offset: end })?;
                        end += 1 + escaped.len_utf8();
                    }
                    // Any other byte, including those inside a multi-byte character,
                    // which never equal the ASCII delimiters above.
                    _ => end += 1,
                }
            }
        }
        Ok(Some((
            Token {
                raw: &self.text[start..end],
                offset: start,
            },
            end,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atom(text: &str) -> Node {
        Node::Atom(text.to_owned())
    }

    #[test]
    fn parses_nodes_fields_and_lists() {
        let tree = parse("({VAR :varno 3 :varattno -1 :flag true :name <>} <> ())").unwrap();
        let items = tree.as_list().unwrap();
        assert_eq!(items.len(), 3);
        let var = &items[0];
        assert!(var.is_struct("VAR"));
        assert_eq!(var.field("varno").and_then(Node::as_int), Some(3));
        assert_eq!(var.field("varattno").and_then(Node::as_int), Some(-1));
        assert_eq!(var.field("flag").and_then(Node::as_bool), Some(true));
        assert!(var.field("name").unwrap().is_null());
        assert_eq!(var.field("missing"), None);
        assert_eq!(items[1], Node::Null);
        assert_eq!(items[2], Node::List(Vec::new()));
        assert_eq!(items[1].as_list(), Some(&[][..]));
    }

    #[test]
    fn parses_typed_lists() {
        let tree =
            parse("{X :a (i 1 -2) :b (o 23 4294967295) :c (x 7) :d (b) :e (b 8 9)}").unwrap();
        assert_eq!(tree.field("a"), Some(&Node::IntList(vec![1, -2])));
        assert_eq!(tree.field("b"), Some(&Node::OidList(vec![23, u32::MAX])));
        assert_eq!(tree.field("c"), Some(&Node::XidList(vec![7])));
        assert_eq!(tree.field("d"), Some(&Node::Bitmapset(Vec::new())));
        assert_eq!(tree.field("e"), Some(&Node::Bitmapset(vec![8, 9])));
    }

    #[test]
    fn strings_and_escapes() {
        // As PostgreSQL writes the column names `my col`, `(x) {y}`, `q"uote`, `"` and
        // the empty name, and a field whose value is the string `"a` or `<>`.
        let text = r#"{ALIAS :aliasname \"a :other \<> :colnames ("my\ col" "\(x\)\ \{y\}" "q"uote" "\"" "")}"#;
        let tree = parse(text).unwrap();
        assert_eq!(tree.field("aliasname"), Some(&atom("\"a")));
        assert_eq!(tree.field("other"), Some(&atom("<>")));
        let names: Vec<&str> = tree
            .field("colnames")
            .and_then(Node::as_list)
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(names, ["my col", "(x) {y}", "q\"uote", "\"", ""]);
    }

    #[test]
    fn a_label_like_value_is_a_value() {
        // A table alias named ":x" is written as a bare `:x`; one value per field.
        let tree = parse("{ALIAS :aliasname :x :colnames <>}").unwrap();
        assert_eq!(tree.field("aliasname"), Some(&atom(":x")));
        assert!(tree.field("colnames").unwrap().is_null());
    }

    #[test]
    fn multibyte_text_survives() {
        let tree = parse(r#"{A :n h\ é :s "ü\ ß"}"#).unwrap();
        assert_eq!(tree.field("n"), Some(&atom("h é")));
        assert_eq!(tree.field("s"), Some(&Node::Str("ü ß".to_owned())));
    }

    #[test]
    fn parses_const_datums() {
        let text = "{CONST :consttype 23 :constlen 4 :constvalue 4 [ 42 0 0 0 0 0 0 0 ] :constisnull false}";
        let tree = parse(text).unwrap();
        assert_eq!(
            tree.field("constvalue"),
            Some(&Node::Datum {
                length: 4,
                bytes: vec![42, 0, 0, 0, 0, 0, 0, 0]
            })
        );
        assert_eq!(
            tree.field("constisnull").and_then(Node::as_bool),
            Some(false)
        );
        let signed = parse("{C :constvalue 3 [ -1 -128 127 ] :x 1}").unwrap();
        assert_eq!(
            signed.field("constvalue"),
            Some(&Node::Datum {
                length: 3,
                bytes: vec![255, 128, 127]
            })
        );
        let null = parse("{C :constvalue <> :constisnull true}").unwrap();
        assert!(null.field("constvalue").unwrap().is_null());
    }

    #[test]
    fn rejects_malformed_text() {
        let cases: &[(&str, ParseError)] = &[
            ("", ParseError::UnexpectedEnd),
            ("   ", ParseError::UnexpectedEnd),
            ("({A :x 1}", ParseError::UnexpectedEnd),
            ("{A :x", ParseError::UnexpectedEnd),
            ("{", ParseError::UnexpectedEnd),
            (
                "{A x 1}",
                ParseError::UnexpectedToken {
                    token: "x".into(),
                    offset: 3,
                },
            ),
            (
                "{A : 1}",
                ParseError::UnexpectedToken {
                    token: ":".into(),
                    offset: 3,
                },
            ),
            (
                "{}",
                ParseError::UnexpectedToken {
                    token: "}".into(),
                    offset: 1,
                },
            ),
            (
                ")",
                ParseError::UnexpectedToken {
                    token: ")".into(),
                    offset: 0,
                },
            ),
            (
                "{A :x }",
                ParseError::UnexpectedToken {
                    token: "}".into(),
                    offset: 6,
                },
            ),
            (
                "(1 })",
                ParseError::UnexpectedToken {
                    token: "}".into(),
                    offset: 3,
                },
            ),
            ("<> 1", ParseError::TrailingInput { offset: 3 }),
            ("{A :x ab\\", ParseError::DanglingEscape { offset: 8 }),
            (r#"{A :s "a\"}"#, ParseError::DanglingEscape { offset: 8 }),
            (
                "(i 1 x)",
                ParseError::BadNumber {
                    token: "x".into(),
                    offset: 5,
                    what: "integer",
                },
            ),
            (
                "(o -1)",
                ParseError::BadNumber {
                    token: "-1".into(),
                    offset: 3,
                    what: "OID",
                },
            ),
            (
                "{C :v 4 [ 1 256 ]}",
                ParseError::BadNumber {
                    token: "256".into(),
                    offset: 12,
                    what: "datum byte",
                },
            ),
            (
                "{C :v x [ 1 ]}",
                ParseError::BadNumber {
                    token: "x".into(),
                    offset: 6,
                    what: "datum length",
                },
            ),
            ("{C :v 4 [ 1 2", ParseError::UnexpectedEnd),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text).as_ref(), Err(expected), "input {text:?}");
        }
    }

    #[test]
    fn depth_is_bounded() {
        let ok = format!("{}{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let nested = format!(
            "{}{}",
            "{A :a ".repeat(MAX_DEPTH - 1),
            "1".to_owned() + &"}".repeat(MAX_DEPTH - 1)
        );
        assert!(parse(&nested).is_ok());
        // Far too deep: refused at the first level beyond the limit, without recursing.
        let hostile = "(".repeat(1_000_000);
        assert_eq!(
            parse(&hostile),
            Err(ParseError::TooDeep {
                limit: MAX_DEPTH,
                offset: MAX_DEPTH
            })
        );
    }

    #[test]
    fn parses_every_fixture() {
        for (name, text) in crate::catalog::lineage::fixtures::ALL {
            let tree = parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let queries = tree.as_list().unwrap();
            assert_eq!(queries.len(), 1, "{name}");
            assert!(queries[0].is_struct("QUERY"), "{name}");
        }
    }
}
