//! Lexical facts about SQL text that need no parser: which command a statement starts
//! with. It must never be used to decide that a statement is harmless, only to pick
//! statements that need a closer look.

/// The first keyword of `sql`, lower-cased, after whitespace, comments and opening
/// parentheses; `None` when the text holds no keyword.
pub fn leading_keyword(sql: &[u8]) -> Option<String> {
    leading_word(sql).map(|word| String::from_utf8_lossy(word).to_ascii_lowercase())
}

/// The first keyword of `sql` as written (ASCII letters and underscores), after
/// whitespace, comments and opening parentheses.
fn leading_word(sql: &[u8]) -> Option<&[u8]> {
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
    let len = rest
        .iter()
        .take_while(|b| b.is_ascii_alphabetic() || **b == b'_')
        .count();
    (len > 0).then(|| &rest[..len])
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
    // Once per Execute: compared in place, not lower-cased into a new string.
    leading_word(sql).is_some_and(|word| {
        word.eq_ignore_ascii_case(b"fetch") || word.eq_ignore_ascii_case(b"execute")
    })
}

/// Whether `sql` may run a command that rules rewrite (INSERT, UPDATE, DELETE, MERGE),
/// or a prepared statement that may be one (EXECUTE). A word search, no parsing: an
/// identifier that contains one of the words only makes pgveil stricter.
pub fn may_modify_data(sql: &[u8]) -> bool {
    const WORDS: [&[u8]; 5] = [b"insert", b"update", b"delete", b"merge", b"execute"];
    // One pass, comparing only where a word could start.
    (0..sql.len()).any(|at| {
        let first = sql[at].to_ascii_lowercase();
        matches!(first, b'i' | b'u' | b'd' | b'm' | b'e')
            && WORDS.iter().any(|word| {
                word[0] == first
                    && sql
                        .get(at..at + word.len())
                        .is_some_and(|window| window.eq_ignore_ascii_case(word))
            })
    })
}

/// What the lexer reports of SQL text: names, and the punctuation that delimits
/// statements. Literals, comments and operators are skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lexeme<'a> {
    /// An identifier or keyword as PostgreSQL resolves it: unquoted ones folded to
    /// lower case (ASCII only, as PostgreSQL does for multibyte encodings), quoted ones
    /// exact with `""` turned into `"`.
    Name(std::borrow::Cow<'a, str>),
    Semicolon,
    Open,
    Close,
    /// A dollar-quoted string (`$$…$$`, `$tag$…$tag$`): often a function body.
    DollarQuoted,
    /// Anything else that is not whitespace or a comment (literals, operators).
    Other,
    /// The rest of the text, which cannot be read to its end: an unterminated string,
    /// quoted name, dollar quote or comment. Always the last lexeme.
    Unreadable,
}

/// The lexemes of `sql`, each with the byte offset just past it.
pub fn lexemes(sql: &[u8]) -> impl Iterator<Item = (Lexeme<'_>, usize)> {
    lex(sql, |word, quoted| Lexeme::Name(folded_name(word, quoted)))
}

/// A name as PostgreSQL resolves it: an unquoted identifier folded to lower case
/// (borrowed when it already is), a quoted one's content with `""` turned into `"`.
fn folded_name(word: &[u8], quoted: bool) -> std::borrow::Cow<'_, str> {
    if quoted {
        return match String::from_utf8_lossy(word) {
            std::borrow::Cow::Borrowed(text) if !text.contains("\"\"") => text.into(),
            text => text.replace("\"\"", "\"").into(),
        };
    }
    match std::str::from_utf8(word) {
        Ok(text) if !word.iter().any(u8::is_ascii_uppercase) => text.into(),
        _ => String::from_utf8_lossy(word).to_ascii_lowercase().into(),
    }
}

/// The lexer, with `name` making the lexeme of each name from its bytes (an unquoted
/// identifier as written, or a quoted one's content with `""` still doubled) and
/// whether it was quoted.
fn lex<'a>(
    sql: &'a [u8],
    mut name: impl FnMut(&'a [u8], bool) -> Lexeme<'a>,
) -> impl Iterator<Item = (Lexeme<'a>, usize)> {
    let mut at = 0;
    let unreadable = (Lexeme::Unreadable, sql.len());
    std::iter::from_fn(move || loop {
        let byte = *sql.get(at)?;
        let next = sql.get(at + 1).copied();
        let (lexeme, end) = match byte {
            b if b.is_ascii_whitespace() => {
                at += 1;
                continue;
            }
            b'-' if next == Some(b'-') => {
                at = sql[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(sql.len(), |end| at + end);
                continue;
            }
            b'/' if next == Some(b'*') => match block_comment_end(sql, at + 2) {
                Some(end) => {
                    at = end;
                    continue;
                }
                None => unreadable.clone(),
            },
            b';' => (Lexeme::Semicolon, at + 1),
            b'(' => (Lexeme::Open, at + 1),
            b')' => (Lexeme::Close, at + 1),
            b'\'' => quoted_end(sql, at, false)
                .map_or_else(|| unreadable.clone(), |end| (Lexeme::Other, end)),
            b'"' => {
                let mut end = at + 1;
                let closed = loop {
                    match sql.get(end) {
                        None => break false,
                        Some(b'"') if sql.get(end + 1) == Some(&b'"') => end += 2,
                        Some(b'"') => break true,
                        Some(_) => end += 1,
                    }
                };
                if closed {
                    (name(&sql[at + 1..end], true), end + 1)
                } else {
                    unreadable.clone()
                }
            }
            b'$' if next.is_some_and(|b| b.is_ascii_digit()) => {
                let end = sql[at + 1..]
                    .iter()
                    .position(|b| !b.is_ascii_digit())
                    .map_or(sql.len(), |end| at + 1 + end);
                (Lexeme::Other, end)
            }
            b'$' => match dollar_quote_end(sql, at) {
                Some(Ok(end)) => (Lexeme::DollarQuoted, end),
                Some(Err(())) => unreadable.clone(),
                None => (Lexeme::Other, at + 1),
            },
            b if b.is_ascii_digit() || (b == b'.' && next.is_some_and(|n| n.is_ascii_digit())) => {
                (Lexeme::Other, number_end(sql, at))
            }
            b if is_identifier_start(b) => {
                let end = sql[at..]
                    .iter()
                    .position(|&b| !is_identifier_part(b))
                    .map_or(sql.len(), |end| at + end);
                let word = &sql[at..end];
                let string_prefix = matches!(
                    word,
                    [b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N']
                ) && sql.get(end) == Some(&b'\'');
                let unicode = matches!(word, [b'u' | b'U']) && sql.get(end) == Some(&b'&');
                if string_prefix {
                    let backslashes = matches!(word, [b'e' | b'E']);
                    quoted_end(sql, end, backslashes)
                        .map_or_else(|| unreadable.clone(), |end| (Lexeme::Other, end))
                } else if unicode && sql.get(end + 1) == Some(&b'"') {
                    // A name with Unicode escapes: not decoded here, so it may be any.
                    unreadable.clone()
                } else if unicode {
                    // U&'…': skip the prefix; the string is read next.
                    (Lexeme::Other, end + 1)
                } else {
                    (name(word, false), end)
                }
            }
            _ => (Lexeme::Other, at + 1),
        };
        at = end;
        return Some((lexeme, end));
    })
}

/// The statements of a simple Query, split at semicolons outside parentheses,
/// literals and comments; empty ones are left out, as PostgreSQL skips them. Text the
/// lexer cannot read to its end is one last statement.
pub fn split_statements(sql: &[u8]) -> Vec<&[u8]> {
    // Where the lexer may misread string boundaries (see `fingerprint`), or where
    // semicolons do not end statements (`BEGIN ATOMIC … END` bodies), the text stays
    // whole.
    let whole = sql.contains(&b'\\')
        || lexemes(sql).any(|(lexeme, _)| matches!(lexeme, Lexeme::Name(name) if name == "atomic"));
    if whole {
        let trimmed = sql.trim_ascii();
        return if trimmed.is_empty() {
            Vec::new()
        } else {
            vec![trimmed]
        };
    }
    let mut statements = Vec::new();
    let mut start = 0;
    let mut depth = 0usize;
    let mut empty = true;
    for (lexeme, after) in lexemes(sql) {
        match lexeme {
            Lexeme::Semicolon if depth == 0 => {
                if !empty {
                    statements.push(sql[start..after - 1].trim_ascii());
                }
                start = after;
                empty = true;
                continue;
            }
            Lexeme::Open => depth += 1,
            Lexeme::Close => depth = depth.saturating_sub(1),
            _ => {}
        }
        empty = false;
    }
    if !empty {
        statements.push(sql[start..].trim_ascii());
    }
    statements
}

/// Whether `sql` names one of `names` (relation names as the catalog spells them),
/// schema-qualified or not, quoted or not. Text in which no name of the set appears
/// (see [`NameSet::may_appear_in`]) names none. Otherwise, text that cannot be read to
/// its end, or whose string boundaries depend on session settings (a backslash), may
/// name anything, so it counts as naming one.
pub fn names_any(sql: &[u8], names: &NameSet) -> bool {
    if !names.may_appear_in(sql) {
        return false;
    }
    // String boundaries may be misread (see `fingerprint`): assume the worst.
    if sql.contains(&b'\\') {
        return true;
    }
    // Dollar-quoted text is often code (DO, CREATE FUNCTION): look inside it too.
    if has_dollar_quote(sql) {
        let lower = sql.to_ascii_lowercase();
        if names.iter().any(|name| {
            let name = name.to_ascii_lowercase();
            lower
                .windows(name.len().max(1))
                .any(|window| window == name.as_bytes())
        }) {
            return true;
        }
    }
    lexemes(sql).any(|(lexeme, _)| match lexeme {
        Lexeme::Name(name) => names.contains(name.as_ref()),
        Lexeme::Unreadable => true,
        _ => false,
    })
}

/// Whether `sql` holds dollar-quoted text (a lexical pass only when it has a `$`).
fn has_dollar_quote(sql: &[u8]) -> bool {
    sql.contains(&b'$') && lexemes(sql).any(|(lexeme, _)| lexeme == Lexeme::DollarQuoted)
}

/// Words of statements that make, run or drop cursors and prepared statements: texts
/// holding one are analysed even when they name no protected relation, so that FETCH
/// and EXECUTE find what they run (see `CatalogSnapshot`'s name tests).
pub const CURSOR_WORDS: [&str; 6] = ["declare", "fetch", "move", "prepare", "execute", "close"];

/// Two [`NameSet`]s looked for in one pass over a text ([`NameSetPair::names_either`]),
/// with the union of their anchors built once rather than for every text.
#[derive(Debug, Clone, Default)]
pub struct NameSetPair {
    first: NameSet,
    second: NameSet,
    /// Both sets' anchors (see [`NameSet`]); none when both are empty.
    anchor_pairs: Option<Box<PairBits>>,
}

impl NameSetPair {
    pub fn new(first: NameSet, second: NameSet) -> Self {
        let anchor_pairs = match (&first.anchor_pairs, &second.anchor_pairs) {
            (Some(first), Some(second)) => {
                let mut union = first.clone();
                for (bits, more) in union.iter_mut().zip(second.iter()) {
                    *bits |= more;
                }
                Some(union)
            }
            (Some(only), None) | (None, Some(only)) => Some(only.clone()),
            (None, None) => None,
        };
        NameSetPair {
            first,
            second,
            anchor_pairs,
        }
    }

    pub fn first(&self) -> &NameSet {
        &self.first
    }

    /// [`names_any`] of both sets in one pass: whether `sql` names one of the first
    /// set, and one of the second.
    pub fn names_either(&self, sql: &[u8]) -> (bool, bool) {
        let (first, second) = (&self.first, &self.second);
        // Most statements of most applications mention no name of either set at all.
        let [may_name_first, may_name_second] = match &self.anchor_pairs {
            Some(union) => may_appear([first, second], union, sql),
            None => [false, false],
        };
        if !may_name_first && !may_name_second {
            return (false, false);
        }
        // Backslashes and dollar quotes take the careful path of `names_any`.
        if sql.contains(&b'\\') || has_dollar_quote(sql) {
            return (names_any(sql, first), names_any(sql, second));
        }
        // Names are looked up as they are lexed, without allocating: this runs for every
        // statement of a restricted role.
        let found_first = std::cell::Cell::new(false);
        let found_second = std::cell::Cell::new(false);
        let lexemes = lex(sql, |word, quoted| {
            if !quoted && word.is_ascii() {
                if !found_first.get() && first.contains_unquoted(word) {
                    found_first.set(true);
                }
                if !found_second.get() && second.contains_unquoted(word) {
                    found_second.set(true);
                }
            } else {
                let name = folded_name(word, quoted);
                if !found_first.get() && first.contains(&name) {
                    found_first.set(true);
                }
                if !found_second.get() && second.contains(&name) {
                    found_second.set(true);
                }
            }
            Lexeme::Other
        });
        for (lexeme, _) in lexemes {
            if lexeme == Lexeme::Unreadable {
                found_first.set(found_first.get() || !first.is_empty());
                found_second.set(found_second.get() || !second.is_empty());
            }
            if found_first.get() && found_second.get() {
                break;
            }
        }
        // An unreadable text names only the sets whose names occur in it (see `names_any`).
        (
            may_name_first && found_first.get(),
            may_name_second && found_second.get(),
        )
    }
}

/// Names (folded as PostgreSQL folds identifiers: see [`names_any`]) for the lexical
/// prefilters: [`NameSet::may_appear_in`] passes over most texts in one cheap scan,
/// and a bitmap over each name's length and first and last bytes answers "not here"
/// for most words the lexer finds without hashing them. The set itself uses a fast
/// hash, which is safe because it is built from the policy and the catalog only:
/// client text is looked up, never inserted. Names are compared as bytes: a client
/// whose `client_encoding` is not UTF-8 spells a non-ASCII name in other bytes (see
/// [`NameSet::is_ascii`] and the name tests of `CatalogSnapshot`).
#[derive(Debug, Clone, Default)]
pub struct NameSet {
    names: std::collections::HashSet<String, rustc_hash::FxBuildHasher>,
    /// 256 bits, one set for each name (see [`NameSet::bit`]).
    bloom: [u64; 4],
    /// 65536 bits, one for each ordered pair of bytes (empty when the set is): set for
    /// both ASCII cases of each name's anchor, the pair of adjacent bytes in it that is
    /// rarest in SQL (see [`anchor_of`]), for [`NameSet::may_appear_in`].
    anchor_pairs: Option<Box<PairBits>>,
    /// The names in ASCII lower case with the offset of their anchor in them, by the
    /// anchor in lower case (see [`folded_pair`]).
    by_anchor: rustc_hash::FxHashMap<u16, Vec<AnchoredName>>,
    /// A name may be named without occurring as it is: one holding a `"`, which a
    /// quoted identifier writes doubled (or the empty name, which occurs anywhere).
    may_hide: bool,
    /// A name has a byte outside ASCII.
    non_ascii: bool,
}

impl NameSet {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Whether every name is ASCII, and so spelled alike in every client encoding
    /// PostgreSQL supports.
    pub fn is_ascii(&self) -> bool {
        !self.non_ascii
    }

    /// Whether one of the names may appear in `sql`: `false` only when none occurs
    /// in it as a substring, ignoring ASCII case. Text in which a name does not occur
    /// cannot name it, however its strings, comments and quotes are read: an unquoted
    /// identifier is folded by ASCII case only, a quoted one holds the name as it is
    /// (unless the name has a `"`, which is written doubled: such sets always answer
    /// `true`), and PostgreSQL's truncation of long identifiers only shortens a word
    /// that holds the name. The exception is an identifier with Unicode escapes
    /// (`U&"\0063ustomers"`), which needs a `&`: text with one always answers `true`.
    /// In client encodings other than UTF-8, bytes that look like ASCII inside
    /// multibyte characters are not ASCII to the server, which only makes this answer
    /// `true` more often; but a non-ASCII name is written in other bytes there, which
    /// the caller must allow for (see [`NameSet::is_ascii`]).
    pub fn may_appear_in(&self, sql: &[u8]) -> bool {
        match &self.anchor_pairs {
            Some(anchor_pairs) => {
                let [found] = may_appear([self], anchor_pairs, sql);
                found
            }
            None => false,
        }
    }

    /// Whether one of the names occurs in `sql` with its anchor at `at` (followed by
    /// `next`, or a zero byte at the end of the text), or may occur in it written
    /// with Unicode escapes, which need the `&` that every set anchors too.
    fn occurs_anchored_at(&self, sql: &[u8], at: usize, next: u8) -> bool {
        if sql[at] == b'&' {
            return !self.names.is_empty();
        }
        self.by_anchor
            .get(&folded_pair(sql[at], next))
            .is_some_and(|names| {
                names.iter().any(|name| {
                    at.checked_sub(name.anchor_offset)
                        .is_some_and(|start| starts_with_folded(&sql[start..], &name.lower))
                })
            })
    }

    /// Whether `name`, already folded, is in the set.
    pub fn contains(&self, name: &str) -> bool {
        let bytes = name.as_bytes();
        let (first, last) = (bytes.first(), bytes.last());
        self.may_contain(bytes.len(), first.copied(), last.copied()) && self.names.contains(name)
    }

    /// Whether an unquoted ASCII identifier, as written, names one of the set: it is
    /// folded to lower case first (on the stack, up to 64 bytes).
    fn contains_unquoted(&self, word: &[u8]) -> bool {
        let first = word.first().map(u8::to_ascii_lowercase);
        let last = word.last().map(u8::to_ascii_lowercase);
        if !self.may_contain(word.len(), first, last) {
            return false;
        }
        let mut buffer = [0u8; 64];
        match buffer.get_mut(..word.len()) {
            Some(folded) => {
                folded.copy_from_slice(word);
                folded.make_ascii_lowercase();
                std::str::from_utf8(folded).is_ok_and(|name| self.names.contains(name))
            }
            None => self.names.contains(&folded_name(word, false)[..]),
        }
    }

    fn may_contain(&self, len: usize, first: Option<u8>, last: Option<u8>) -> bool {
        let bit = Self::bit(len, first, last);
        self.bloom[bit / 64] & (1 << (bit % 64)) != 0
    }

    /// The bitmap's bit for a name of `len` bytes starting and ending with these bytes.
    fn bit(len: usize, first: Option<u8>, last: Option<u8>) -> usize {
        let mixed = (len as u32).wrapping_mul(0x9E37_79B9)
            ^ u32::from(first.unwrap_or(0)).wrapping_mul(0x85EB_CA6B)
            ^ u32::from(last.unwrap_or(0)).wrapping_mul(0xC2B2_AE35);
        (mixed >> 24) as usize
    }
}

/// [`NameSet::may_appear_in`] for several sets, in one pass over `sql`; `union` holds
/// the anchors of them all.
fn may_appear<const N: usize>(sets: [&NameSet; N], union: &PairBits, sql: &[u8]) -> [bool; N] {
    let mut found = [false; N];
    let mut looking = 0;
    for (set, found) in sets.iter().zip(&mut found) {
        if set.names.is_empty() {
            continue;
        }
        if set.may_hide {
            *found = true;
            continue;
        }
        looking += 1;
    }
    if looking == 0 {
        return found;
    }
    // Most places hold no anchor: one bit for the pair of bytes there says so. The
    // last byte is paired with a zero byte, which one-byte names allow.
    let mut look_closer = |at: usize, next: u8| {
        for (set, found) in sets.iter().zip(&mut found) {
            if !*found && set.occurs_anchored_at(sql, at, next) {
                *found = true;
                looking -= 1;
            }
        }
        looking == 0
    };
    let anchored = |pair: u16| union[usize::from(pair >> 6)] & (1 << (pair & 63)) != 0;
    let Some((&last, _)) = sql.split_last() else {
        return found;
    };
    let mut pair = u16::from(sql[0]);
    for (at, &next) in sql[1..].iter().enumerate() {
        pair = pair << 8 | u16::from(next);
        if anchored(pair) && look_closer(at, next) {
            return found;
        }
    }
    if anchored(u16::from(last) << 8) {
        look_closer(sql.len() - 1, 0);
    }
    found
}

/// A name of a [`NameSet`] in ASCII lower case, and where its anchor starts in it.
#[derive(Debug, Clone)]
struct AnchoredName {
    anchor_offset: usize,
    lower: Box<[u8]>,
}

/// 65536 bits, one for each ordered pair of bytes (see [`NameSet`]).
type PairBits = [u64; 1024];

/// Two bytes in ASCII lower case, as one number.
fn folded_pair(first: u8, second: u8) -> u16 {
    u16::from(first.to_ascii_lowercase()) << 8 | u16::from(second.to_ascii_lowercase())
}

/// The offset of the pair of adjacent bytes of `lower` (a name in ASCII lower case,
/// of at least two bytes) least common in SQL, by a sample of keywords and
/// identifiers typical of applications' statements: the prefilter looks closer
/// wherever a name's anchor occurs, so a rare one makes it look closer seldom.
fn anchor_of(lower: &[u8]) -> usize {
    static COMMON_SQL: &[u8] =
        b"select distinct from where and or not null is in exists between like \
        ilike as on join left right inner outer full cross lateral using group by order \
        asc desc nulls first last having limit offset fetch next rows only for update \
        share nowait skip locked insert into values default returning conflict do \
        nothing set delete truncate with recursive union all intersect except case \
        when then else end cast coalesce nullif count sum avg min max now current_date \
        current_timestamp true false begin commit rollback savepoint release \
        transaction isolation level read committed show reset create table index view \
        alter drop primary key references id name status type created_at updated_at \
        user_id account_id order_id item_id code value amount price quantity total date \
        description email phone address number balance tenant_id deleted_at version";
    let count = |pair: &[u8]| {
        COMMON_SQL
            .windows(2)
            .filter(|window| *window == pair)
            .count()
    };
    lower
        .windows(2)
        .enumerate()
        .min_by_key(|(_, pair)| count(pair))
        .map_or(0, |(offset, _)| offset)
}

/// Whether `text` starts with `lower` (ASCII lower case), ignoring ASCII case. Most
/// calls find a difference at the second byte: it returns there.
fn starts_with_folded(text: &[u8], lower: &[u8]) -> bool {
    text.len() >= lower.len()
        && text
            .iter()
            .zip(lower)
            .all(|(byte, lower)| byte.to_ascii_lowercase() == *lower)
}

impl FromIterator<String> for NameSet {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Self {
        let mut set = NameSet::default();
        let mut anchor_pairs = Box::new([0u64; 1024]);
        for name in names {
            let bytes = name.as_bytes();
            let bit = Self::bit(bytes.len(), bytes.first().copied(), bytes.last().copied());
            set.bloom[bit / 64] |= 1 << (bit % 64);
            set.may_hide |= bytes.is_empty() || bytes.contains(&b'"');
            set.non_ascii |= !bytes.is_ascii();
            let lower: Box<[u8]> = bytes.to_ascii_lowercase().into();
            // The anchors: a name's rarest pair, or for a one-byte name, its byte
            // followed by any byte (or by the end of the text).
            let anchors: Vec<(usize, u8, u8)> = match *lower {
                [] => Vec::new(),
                [only] => (0..=u8::MAX).map(|next| (0, only, next)).collect(),
                _ => {
                    let offset = anchor_of(&lower);
                    vec![(offset, lower[offset], lower[offset + 1])]
                }
            };
            if !set.names.insert(name) {
                continue;
            }
            for (offset, first, second) in anchors {
                for byte in [first, first.to_ascii_uppercase()] {
                    for next in [second, second.to_ascii_uppercase()] {
                        let pair = usize::from(byte) << 8 | usize::from(next);
                        anchor_pairs[pair >> 6] |= 1 << (pair & 63);
                    }
                }
                let names = set.by_anchor.entry(folded_pair(first, second)).or_default();
                if !names.iter().any(|known| known.lower == lower) {
                    names.push(AnchoredName {
                        anchor_offset: offset,
                        lower: lower.clone(),
                    });
                }
            }
        }
        if !set.names.is_empty() {
            // `&` followed by anything: a name written with Unicode escapes may be any.
            for next in 0..=u8::MAX {
                let pair = usize::from(b'&') << 8 | usize::from(next);
                anchor_pairs[pair >> 6] |= 1 << (pair & 63);
            }
            set.anchor_pairs = Some(anchor_pairs);
        }
        set
    }
}

impl<'a> FromIterator<&'a str> for NameSet {
    fn from_iter<I: IntoIterator<Item = &'a str>>(names: I) -> Self {
        names.into_iter().map(str::to_string).collect()
    }
}

pub(crate) fn is_identifier_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_' || byte >= 0x80
}

pub(crate) fn is_identifier_part(byte: u8) -> bool {
    is_identifier_start(byte) || byte.is_ascii_digit() || byte == b'$'
}

/// Where a quoted string starting at `start` (its opening quote) ends, just past its
/// closing quote; `None` when it is not closed. `''` is a quote inside; with
/// `backslashes` (E'…'), so is `\'`.
pub(crate) fn quoted_end(sql: &[u8], start: usize, backslashes: bool) -> Option<usize> {
    let mut at = start + 1;
    while at < sql.len() {
        match sql[at] {
            b'\\' if backslashes => at += 2,
            b'\'' if sql.get(at + 1) == Some(&b'\'') => at += 2,
            b'\'' => return Some(at + 1),
            _ => at += 1,
        }
    }
    None
}

/// Just past the `*/` closing a block comment whose body starts at `from`; block
/// comments nest.
pub(crate) fn block_comment_end(sql: &[u8], from: usize) -> Option<usize> {
    let mut depth = 1;
    let mut at = from;
    while at + 1 < sql.len() {
        match (sql[at], sql[at + 1]) {
            (b'*', b'/') => {
                depth -= 1;
                at += 2;
                if depth == 0 {
                    return Some(at);
                }
            }
            (b'/', b'*') => {
                depth += 1;
                at += 2;
            }
            _ => at += 1,
        }
    }
    None
}

/// A dollar-quoted string starting at `start`: `Some(Ok(end))` just past its closing
/// delimiter, `Some(Err(()))` when it is never closed, `None` when the `$` starts no
/// dollar quote.
pub(crate) fn dollar_quote_end(sql: &[u8], start: usize) -> Option<Result<usize, ()>> {
    let tag_len = sql[start + 1..]
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80))?;
    let close = start + 1 + tag_len;
    if sql.get(close) != Some(&b'$') {
        return None;
    }
    if tag_len > 0 && sql[start + 1].is_ascii_digit() {
        return None;
    }
    let delimiter = &sql[start..=close];
    let body = close + 1;
    Some(
        sql[body..]
            .windows(delimiter.len())
            .position(|window| window == delimiter)
            .map(|found| body + found + delimiter.len())
            .ok_or(()),
    )
}

/// Just past a numeric literal starting at `start`.
pub(crate) fn number_end(sql: &[u8], start: usize) -> usize {
    let mut at = start;
    let mut seen_exponent = false;
    while at < sql.len() {
        let byte = sql[at];
        if byte.is_ascii_digit() || byte == b'.' || byte == b'_' {
            at += 1;
        } else if (byte == b'e' || byte == b'E') && !seen_exponent {
            seen_exponent = true;
            at += 1;
            if matches!(sql.get(at), Some(b'+' | b'-')) {
                at += 1;
            }
        } else {
            break;
        }
    }
    at
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
    fn splits_a_query_into_its_statements() {
        let split = |sql: &str| -> Vec<String> {
            split_statements(sql.as_bytes())
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        };
        assert_eq!(split("select 1"), ["select 1"]);
        assert_eq!(split("select 1; select 2;"), ["select 1", "select 2"]);
        assert_eq!(
            split("select ';' ; /* ; */ select $$;$$ -- ;\n; ;"),
            ["select ';'", "/* ; */ select $$;$$ -- ;"]
        );
        assert_eq!(
            split("create rule r as on insert to t do also (insert into a values (1); delete from b); select 1"),
            ["create rule r as on insert to t do also (insert into a values (1); delete from b)", "select 1"]
        );
        assert_eq!(
            split("select 'unterminated; select 2"),
            ["select 'unterminated; select 2"]
        );
        assert!(split(" ; -- nothing").is_empty());
        assert_eq!(
            split("create function f() returns int language sql begin atomic select 1; select 2; end; select 3"),
            ["create function f() returns int language sql begin atomic select 1; select 2; end; select 3"]
        );
        assert_eq!(split("select 'a\\'; select 2"), ["select 'a\\'; select 2"]);
    }

    #[test]
    fn finds_names_whatever_their_case_or_quoting() {
        let names: NameSet = ["customers", "Mixed Case"].into_iter().collect();
        assert!(names_any(b"SELECT * FROM Customers", &names));
        assert!(names_any(b"select 1 from public.\"customers\" c", &names));
        assert!(names_any(b"update \"Mixed Case\" set x = 1", &names));
        assert!(!names_any(
            b"select 'customers', \"Customers\" from t -- customers",
            &names
        ));
        assert!(!names_any(b"select * from customers_archive", &names));
        // Unreadable text may name anything, when a name occurs in it at all.
        assert!(names_any(
            b"select * from t /* unterminated customers",
            &names
        ));
        assert!(!names_any(b"select * from t /* unterminated", &names));
        assert!(names_any(b"select 'a\\' , 'customers' ; update x", &names));
        assert!(!names_any(b"select 'a\\' , ' ; update x", &names));
        assert!(names_any(b"update U&\"\\0063ustomers\" set x = 1", &names));
        assert!(names_any(
            b"DO $$BEGIN UPDATE CUSTOMERS SET x = 1; END$$",
            &names
        ));
        assert!(!names_any(
            b"DO $$BEGIN UPDATE orders SET x = 1; END$$",
            &names
        ));
        assert!(!names_any(b"select * from \"mixed case\"", &names));
    }

    #[test]
    fn a_name_may_appear_only_where_it_occurs_ignoring_ascii_case() {
        let names: NameSet = ["customers", "Mixed Case", "客户"].into_iter().collect();
        for sql in [
            &b"select * from CUSTOMERS"[..],
            b"select 'customers_archive'",
            b"select 1 -- cUsToMeRs",
            b"update \"Mixed Case\" set x = 1",
            b"select * from \"MIXED CASE\"",
            "select 1 from 客户".as_bytes(),
            b"select * from u&\"\\0063ustomers\"",
            b"select 1 & 2",
            b"customers",
        ] {
            assert!(names.may_appear_in(sql), "{}", String::from_utf8_lossy(sql));
        }
        for sql in [
            &b"select abalance from pgbench_accounts where aid = 1"[..],
            b"select * from customer s",
            b"select 'unterminated",
            b"",
            "select 1 from 客 户".as_bytes(),
        ] {
            assert!(
                !names.may_appear_in(sql),
                "{}",
                String::from_utf8_lossy(sql)
            );
        }
        assert!(!NameSet::default().may_appear_in(b"select * from customers"));
        // A name with a double quote is written doubled in a quoted identifier.
        let quoted: NameSet = ["say \"hi\""].into_iter().collect();
        assert!(quoted.may_appear_in(b"select 1 from \"say \"\"hi\"\"\""));
        assert!(names_any(b"select 1 from \"say \"\"hi\"\"\"", &quoted));
        assert!(quoted.may_appear_in(b"select 1"));
        assert!(!names_any(b"select 1", &quoted));
    }

    #[test]
    fn a_name_may_appear_exactly_where_it_occurs_as_a_substring() {
        // Names anchored anywhere in them, one byte long, non-ASCII and sharing
        // anchors; texts built from pieces of them at random, in both cases.
        let names = [
            "customers",
            "fetch",
            "t",
            "x_y",
            "客户",
            "ab",
            "abab",
            "select",
            "_",
            "order_items",
        ];
        let pieces: [&[u8]; 14] = [
            b"cust",
            b"omers",
            b"FE",
            b"tch",
            b"T",
            b"x_",
            b"Y",
            "客".as_bytes(),
            "户".as_bytes(),
            b"AB",
            b"ab",
            b" ",
            b"sElEcT",
            b"order_",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |bound: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize % bound
        };
        for _ in 0..3000 {
            let set: NameSet = (0..1 + next(3)).map(|_| names[next(names.len())]).collect();
            let mut sql = Vec::new();
            for _ in 0..next(10) {
                sql.extend_from_slice(pieces[next(pieces.len())]);
            }
            let lower = sql.to_ascii_lowercase();
            let occurs = set.iter().any(|name| {
                lower
                    .windows(name.len())
                    .any(|window| window == name.as_bytes())
            });
            assert_eq!(
                set.may_appear_in(&sql),
                occurs,
                "{:?} in {}",
                set.iter().collect::<Vec<_>>(),
                String::from_utf8_lossy(&sql)
            );
        }
    }

    #[test]
    fn a_name_the_lexer_finds_always_may_appear() {
        // What the prefilter skips, the lexer must never have found: texts made of
        // fragments that open and close quotes, comments and dollar quotes at random.
        let sets: [NameSet; 3] = [
            ["customers", "Mixed Case", "客户"].into_iter().collect(),
            ["q", "declare", "fetch", "execute", "close"]
                .into_iter()
                .collect(),
            ["say \"hi\""].into_iter().collect(),
        ];
        let fragments: [&[u8]; 30] = [
            b"select ",
            b" ",
            b"customers",
            b"CUSTOMERS",
            b"\"customers\"",
            b"\"Mixed Case\"",
            b"'",
            b"--",
            b"/*",
            b"*/",
            b"\n",
            b"x",
            b"q",
            b"Q",
            b"1",
            b"$$",
            b"$1",
            b";",
            b"(",
            b")",
            b"cust",
            b"omers",
            b"\"",
            b"public.",
            "客户".as_bytes(),
            b"\"say \"\"hi\"\"\"",
            b"e'",
            b"DECLARE",
            b"Fetch",
            b"u&",
        ];
        let pair = NameSetPair::new(sets[0].clone(), sets[1].clone());
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |bound: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize % bound
        };
        for _ in 0..5000 {
            let mut sql = Vec::new();
            for _ in 0..next(12) {
                sql.extend_from_slice(fragments[next(fragments.len())]);
            }
            for set in &sets {
                let found = lexemes(&sql).any(|(lexeme, _)| match lexeme {
                    Lexeme::Name(name) => set.contains(&name),
                    _ => false,
                });
                assert!(
                    !found || set.may_appear_in(&sql),
                    "{:?} found in {}",
                    set.iter().collect::<Vec<_>>(),
                    String::from_utf8_lossy(&sql)
                );
            }
            let [first, second] = [&sets[0], &sets[1]];
            assert_eq!(
                pair.names_either(&sql),
                (names_any(&sql, first), names_any(&sql, second)),
                "{}",
                String::from_utf8_lossy(&sql)
            );
        }
        // A one-byte name, at the end of the text too.
        assert!(sets[1].may_appear_in(b"select * from q"));
        assert!(sets[1].may_appear_in(b"select * from Q"));
        assert!(sets[1].may_appear_in(b"select * from Q;"));
        assert!(!sets[1].may_appear_in(b"select 1"));
    }

    #[test]
    fn names_either_answers_like_names_any_for_both_sets() {
        let tables: NameSet = ["customers", "Mixed Case"].into_iter().collect();
        let words: NameSet = ["declare", "fetch"].into_iter().collect();
        let names_either = |sql: &[u8], first: &NameSet, second: &NameSet| {
            NameSetPair::new(first.clone(), second.clone()).names_either(sql)
        };
        for sql in [
            &b"SELECT * FROM Customers"[..],
            b"DECLARE c CURSOR FOR SELECT 1",
            b"Declare c cursor for select * from \"Mixed Case\"",
            b"select 'customers', 'fetch' from t -- declare",
            b"select * from t /* unterminated",
            b"select 'a\\' , ' ; fetch x from customers",
            b"DO $$BEGIN FETCH c; UPDATE CUSTOMERS SET x = 1; END$$",
            b"select * from orders where aid = 1",
            b"SELECT * FROM CUSTOMERS",
            b"select * from \"Mixed Case\", \"say \"\"hi\"\"\"",
            b"select * from \"MIXED CASE\"",
            "select * from 客户, \"客户\" where 名字 = 1".as_bytes(),
            b"select * from a_very_long_identifier_that_is_longer_than_sixty_four_bytes_by_some_margin_customers",
            b"FETCH ALL FROM C",
        ] {
            assert_eq!(
                names_either(sql, &tables, &words),
                (names_any(sql, &tables), names_any(sql, &words)),
                "{}",
                String::from_utf8_lossy(sql)
            );
        }
        assert_eq!(
            names_either(b"FETCH 2 FROM c", &tables, &words),
            (false, true)
        );
        // Either set may be empty.
        let none = NameSet::default();
        assert_eq!(
            names_either(b"FETCH 2 FROM c", &none, &words),
            (false, true)
        );
        assert_eq!(
            names_either(b"select * from CUSTOMERS", &tables, &none),
            (true, false)
        );
        assert_eq!(
            NameSetPair::default().names_either(b"fetch 1 from customers"),
            (false, false)
        );
        let long: NameSet = [
            "a_very_long_identifier_that_is_longer_than_sixty_four_bytes_by_some_margin_customers",
            "客户",
            "say \"hi\"",
        ]
        .into_iter()
        .collect();
        assert_eq!(
            names_either(
                b"SELECT 1 FROM A_VERY_LONG_IDENTIFIER_THAT_IS_LONGER_THAN_SIXTY_FOUR_BYTES_BY_SOME_MARGIN_CUSTOMERS",
                &long,
                &words
            ),
            (true, false)
        );
        assert_eq!(
            names_either("select 1 from 客户".as_bytes(), &long, &words),
            (true, false)
        );
        assert_eq!(
            names_either(b"select 1 from \"say \"\"hi\"\"\"", &long, &words),
            (true, false)
        );
    }

    #[test]
    fn knows_statements_that_may_modify_data() {
        assert!(may_modify_data(b"INSERT INTO t VALUES (1)"));
        assert!(may_modify_data(b"with x as (select 1) Delete from t"));
        assert!(may_modify_data(b"EXECUTE q(1)"));
        assert!(!may_modify_data(b"SELECT count(*) FROM t"));
        assert!(may_modify_data(b"select 1; mErGe into t using s on true"));
        assert!(!may_modify_data(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        ));
        assert!(may_modify_data(b"upd; update"));
        assert!(!may_modify_data(b"upd"));
    }
}
