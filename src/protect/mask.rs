//! The masks of SPEC.md "Policy file": parsing a mask specification such as `keep(3,4)`
//! and applying it to one column value in text format.
//!
//! Masks work on Unicode characters (`char`), never on bytes, so Chinese text keeps its
//! shape. Every mask fails closed: a value a mask does not recognise gets a stricter mask,
//! never its plaintext, and no mask ever shows a whole non-empty value (see [`Mask::Keep`]
//! for the rule on short values). SQL NULL is not a value here: the caller forwards NULL
//! (or applies `redact`) itself and never passes it in.
//!
//! This module must never log, and must never put a column value into an error: the only
//! errors it returns describe mask specifications, which come from the policy file.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

/// Every mask specification form, for error messages.
const KNOWN_MASKS: &str = "full, keep(F,L), keep(F,L,'c'), email, cn_mobile, cn_id_card, \
     cn_bank_card, cn_name, cn_address, hash, year, constant('text'), \
     regex('pattern','replacement')";

/// The character that replaces hidden characters unless `keep` names another.
const DEFAULT_FILL: char = '*';

/// Two-character Chinese surnames; a name starting with one keeps both characters.
const COMPOUND_SURNAMES: [[char; 2]; 18] = [
    ['欧', '阳'],
    ['司', '马'],
    ['上', '官'],
    ['诸', '葛'],
    ['东', '方'],
    ['皇', '甫'],
    ['尉', '迟'],
    ['公', '孙'],
    ['慕', '容'],
    ['长', '孙'],
    ['宇', '文'],
    ['司', '徒'],
    ['夏', '侯'],
    ['令', '狐'],
    ['端', '木'],
    ['西', '门'],
    ['独', '孤'],
    ['南', '宫'],
];

/// A mask specification that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaskError {
    #[error("empty mask (known: {KNOWN_MASKS})")]
    Empty,
    #[error("unknown mask `{name}` (known: {KNOWN_MASKS})")]
    Unknown { name: String },
    #[error("mask `{spec}`: {problem}")]
    Syntax { spec: String, problem: &'static str },
    #[error("mask `{name}` takes no arguments")]
    NoArguments { name: String },
    #[error("keep(F,L): expected two non-negative integers, optionally followed by a fill character like '#'")]
    KeepArguments,
    #[error("keep(F,L,'c'): the fill must be exactly one character in single quotes, like '#'")]
    KeepFill,
    #[error("constant('text'): expected exactly one single-quoted string")]
    ConstantArguments,
    #[error("regex('pattern','replacement'): expected exactly two single-quoted strings")]
    RegexArguments,
    #[error("regex: invalid pattern: {0}")]
    RegexPattern(String),
}

/// How a protected value is shown to a role whose action is `mask`.
#[derive(Debug, Clone)]
pub enum Mask {
    /// Every character becomes `*`; the length in characters is kept.
    Full,
    /// The first `first` and last `last` characters are kept, every other one becomes
    /// `fill`.
    ///
    /// Short values: when a value has no more than `first + last` characters, keeping
    /// them as configured would show all of it. Such a value instead reveals at most
    /// `(n - 1) / 2` of its `n` characters (rounded down), so strictly more than half of
    /// it stays hidden; that budget is split between the start and the end in the
    /// proportion `first : last`, rounded to the nearest character. One character or two
    /// reveal nothing. A longer value keeps exactly `first` and `last`.
    Keep {
        first: usize,
        last: usize,
        fill: char,
    },
    /// First character of the local part, `***`, then `@` and the domain.
    Email,
    /// Mainland mobile number: the first 3 and last 4 of its 11 digits.
    CnMobile,
    /// Resident identity card number: the first 6 and last 4 characters.
    CnIdCard,
    /// Bank card number: the first 6 and last 4 digits, separators in place.
    CnBankCard,
    /// Personal name: the surname (Chinese) or each word's initial (Latin script).
    CnName,
    /// Postal address: the first 6 characters.
    CnAddress,
    /// HMAC-SHA-256 under the keyring's hash key, lowercase hex.
    Hash,
    /// Only the year of a date or timestamp.
    Year,
    /// Always this text, whatever the value.
    Constant(String),
    /// Every match of `pattern` replaced by `replacement` (`$1` names a group).
    Regex {
        pattern: regex_lite::Regex,
        replacement: String,
    },
}

/// The key of the `hash` mask: 32 bytes from the keyring.
///
/// The key never appears in `Debug` output and is overwritten with zeros when dropped.
/// It is deliberately not `Clone`, so exactly one copy exists per key (share it behind
/// an `Arc`); the array passed to [`HashKey::new`] is moved in, and wiping the caller's
/// own buffers is the caller's job.
pub struct HashKey([u8; 32]);

impl HashKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        HashKey(bytes)
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(<redacted>)")
    }
}

impl Drop for HashKey {
    fn drop(&mut self) {
        for byte in self.0.iter_mut() {
            // SAFETY: `byte` is a valid, aligned, exclusive reference into our own array.
            // A volatile write, unlike a plain one, cannot be removed by the optimiser as
            // a dead store to memory that is about to be freed.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl Mask {
    /// Parses a mask specification from the policy file.
    ///
    /// Names are lowercase; arguments are non-negative integers or single-quoted strings
    /// (`''` inside one stands for a quote); whitespace around names, parentheses,
    /// commas and arguments is ignored. Anything else is an error.
    pub fn parse(spec: &str) -> Result<Mask, MaskError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(MaskError::Empty);
        }
        let name_end = spec
            .find(|c: char| c == '(' || c.is_whitespace())
            .unwrap_or(spec.len());
        let (name, rest) = spec.split_at(name_end);
        if name.is_empty() {
            return Err(syntax(spec, "expected a mask name before `(`"));
        }
        // The name is checked before the arguments, so a misspelt name is reported as
        // such rather than as whatever its arguments got wrong.
        let simple = match name {
            "full" => Some(Mask::Full),
            "email" => Some(Mask::Email),
            "cn_mobile" => Some(Mask::CnMobile),
            "cn_id_card" => Some(Mask::CnIdCard),
            "cn_bank_card" => Some(Mask::CnBankCard),
            "cn_name" => Some(Mask::CnName),
            "cn_address" => Some(Mask::CnAddress),
            "hash" => Some(Mask::Hash),
            "year" => Some(Mask::Year),
            "keep" | "constant" | "regex" => None,
            _ => {
                return Err(MaskError::Unknown {
                    name: name.to_string(),
                })
            }
        };
        let args = parse_arguments(spec, rest)?;
        if let Some(mask) = simple {
            return match args {
                None => Ok(mask),
                Some(_) => Err(MaskError::NoArguments {
                    name: name.to_string(),
                }),
            };
        }
        let args = args.unwrap_or_default();
        match name {
            "keep" => parse_keep(&args),
            "constant" => match args.as_slice() {
                [Arg::Quoted(text)] => Ok(Mask::Constant(text.clone())),
                _ => Err(MaskError::ConstantArguments),
            },
            _ => match args.as_slice() {
                [Arg::Quoted(pattern), Arg::Quoted(replacement)] => Ok(Mask::Regex {
                    pattern: regex_lite::Regex::new(pattern)
                        .map_err(|error| MaskError::RegexPattern(error.to_string()))?,
                    replacement: replacement.clone(),
                }),
                _ => Err(MaskError::RegexArguments),
            },
        }
    }

    /// Whether [`Mask::apply`] needs the keyring's hash key (without one it falls back to
    /// `full`). The policy loader uses this to require a keyring.
    pub fn needs_hash_key(&self) -> bool {
        matches!(self, Mask::Hash)
    }

    /// Masks one value (never NULL: the caller handles NULL).
    ///
    /// `hash_key` is used only by `hash`; a `hash` mask without a key masks like `full`.
    pub fn apply(&self, value: &str, hash_key: Option<&HashKey>) -> String {
        match self {
            Mask::Full => full(value),
            Mask::Keep { first, last, fill } => keep(value, *first, *last, *fill),
            Mask::Email => email(value),
            Mask::CnMobile => cn_mobile(value),
            Mask::CnIdCard => keep(value, 6, 4, DEFAULT_FILL),
            Mask::CnBankCard => cn_bank_card(value),
            Mask::CnName => cn_name(value),
            Mask::CnAddress => keep(value, 6, 0, DEFAULT_FILL),
            Mask::Hash => hash_key
                .and_then(|key| hmac_hex(key, value.as_bytes()))
                .unwrap_or_else(|| full(value)),
            Mask::Year => year(value),
            Mask::Constant(text) => text.clone(),
            Mask::Regex {
                pattern,
                replacement,
            } => regex_replace(value, pattern, replacement),
        }
    }

    /// Masks one value as it appears in a text-format DataRow: bytes in the client
    /// encoding, never NULL.
    ///
    /// UTF-8 values are masked by [`Mask::apply`]. Other bytes cannot be split into
    /// characters safely, so they become one `*` per byte and no original byte is kept,
    /// except for the two masks whose output never depends on the characters: `constant`
    /// gives its text and `hash` (with a key) the HMAC of the raw bytes, so equal values
    /// still hash equally. The output is UTF-8; it is ASCII unless the mask itself (fill,
    /// constant, replacement) or a kept character is not.
    pub fn apply_bytes(&self, value: &[u8], hash_key: Option<&HashKey>) -> Vec<u8> {
        if let Ok(text) = std::str::from_utf8(value) {
            return self.apply(text, hash_key).into_bytes();
        }
        match self {
            Mask::Constant(text) => text.clone().into_bytes(),
            Mask::Hash => hash_key
                .and_then(|key| hmac_hex(key, value))
                .map(String::into_bytes)
                .unwrap_or_else(|| vec![b'*'; value.len()]),
            _ => vec![b'*'; value.len()],
        }
    }
}

impl fmt::Display for Mask {
    /// The canonical specification: [`Mask::parse`] reads it back to the same mask.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mask::Full => f.write_str("full"),
            Mask::Keep { first, last, fill } if *fill == DEFAULT_FILL => {
                write!(f, "keep({first},{last})")
            }
            Mask::Keep { first, last, fill } => {
                write!(f, "keep({first},{last},{})", quote(&fill.to_string()))
            }
            Mask::Email => f.write_str("email"),
            Mask::CnMobile => f.write_str("cn_mobile"),
            Mask::CnIdCard => f.write_str("cn_id_card"),
            Mask::CnBankCard => f.write_str("cn_bank_card"),
            Mask::CnName => f.write_str("cn_name"),
            Mask::CnAddress => f.write_str("cn_address"),
            Mask::Hash => f.write_str("hash"),
            Mask::Year => f.write_str("year"),
            Mask::Constant(text) => write!(f, "constant({})", quote(text)),
            Mask::Regex {
                pattern,
                replacement,
            } => write!(
                f,
                "regex({},{})",
                quote(pattern.as_str()),
                quote(replacement)
            ),
        }
    }
}

/// One argument of a mask specification, before the mask gives it a meaning.
#[derive(Debug)]
enum Arg {
    /// A single-quoted string, `''` already turned into `'`.
    Quoted(String),
    /// Anything else up to the next `,` or `)`, trimmed: a number, or a mistake the mask
    /// reports in its own terms.
    Bare(String),
}

fn syntax(spec: &str, problem: &'static str) -> MaskError {
    MaskError::Syntax {
        spec: spec.to_string(),
        problem,
    }
}

/// Parses what follows a mask name: nothing (`None`) or a parenthesised argument list.
fn parse_arguments(spec: &str, rest: &str) -> Result<Option<Vec<Arg>>, MaskError> {
    let rest = rest.trim_start();
    if rest.is_empty() {
        return Ok(None);
    }
    let Some(mut rest) = rest.strip_prefix('(') else {
        return Err(syntax(spec, "expected `(` or the end after the mask name"));
    };
    let mut args = Vec::new();
    rest = rest.trim_start();
    if let Some(after) = rest.strip_prefix(')') {
        rest = after;
    } else {
        loop {
            rest = rest.trim_start();
            let (arg, after) = match rest.strip_prefix('\'') {
                Some(quoted) => parse_quoted(spec, quoted)?,
                None => {
                    let end = rest.find([',', ')']).unwrap_or(rest.len());
                    let (bare, after) = rest.split_at(end);
                    (Arg::Bare(bare.trim().to_string()), after)
                }
            };
            args.push(arg);
            rest = after.trim_start();
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if let Some(after) = rest.strip_prefix(')') {
                rest = after;
                break;
            } else if rest.is_empty() {
                return Err(syntax(spec, "missing closing `)`"));
            } else {
                return Err(syntax(spec, "expected `,` or `)` after an argument"));
            }
        }
    }
    if !rest.trim().is_empty() {
        return Err(syntax(spec, "unexpected text after `)`"));
    }
    Ok(Some(args))
}

/// Reads a quoted string whose opening quote is already consumed; returns it and the
/// text after its closing quote.
fn parse_quoted<'a>(spec: &str, text: &'a str) -> Result<(Arg, &'a str), MaskError> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        if c != '\'' {
            value.push(c);
            continue;
        }
        if text[at + 1..].starts_with('\'') {
            // A doubled quote is a quote inside the string (SQL's convention).
            value.push('\'');
            chars.next();
            continue;
        }
        return Ok((Arg::Quoted(value), &text[at + 1..]));
    }
    Err(syntax(spec, "unterminated quoted string"))
}

fn parse_count(arg: &Arg) -> Result<usize, MaskError> {
    match arg {
        // `usize::from_str` would also take a leading `+`; the policy language does not.
        Arg::Bare(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().map_err(|_| MaskError::KeepArguments)
        }
        _ => Err(MaskError::KeepArguments),
    }
}

fn parse_keep(args: &[Arg]) -> Result<Mask, MaskError> {
    let (first, last, fill) = match args {
        [first, last] => (first, last, None),
        [first, last, fill] => (first, last, Some(fill)),
        _ => return Err(MaskError::KeepArguments),
    };
    let first = parse_count(first)?;
    let last = parse_count(last)?;
    let fill = match fill {
        None => DEFAULT_FILL,
        Some(Arg::Quoted(text)) => {
            let mut chars = text.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => c,
                _ => return Err(MaskError::KeepFill),
            }
        }
        Some(Arg::Bare(_)) => return Err(MaskError::KeepFill),
    };
    Ok(Mask::Keep { first, last, fill })
}

/// Quotes `text` for a mask specification.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn full(value: &str) -> String {
    value.chars().map(|_| DEFAULT_FILL).collect()
}

/// How many characters a keep rule shows at the start and at the end of a value of `n`
/// characters (the short-value rule is documented on [`Mask::Keep`]).
fn revealed(n: usize, first: usize, last: usize) -> (usize, usize) {
    if first.saturating_add(last) < n {
        return (first, last);
    }
    let budget = n.saturating_sub(1) / 2;
    // u128 because `first` and `last` come from the policy file and may be huge.
    let total = first as u128 + last as u128;
    if budget == 0 || total == 0 {
        return (0, 0);
    }
    let shown_first = (2 * budget as u128 * first as u128 + total) / (2 * total);
    let shown_first = usize::try_from(shown_first).map_or(0, |f| f.min(first));
    let shown_last = budget.saturating_sub(shown_first).min(last);
    (shown_first, shown_last)
}

/// Applies a keep rule to the characters `selected` picks, leaving the others (such as
/// separators) in place; they neither count nor get masked.
fn keep_selected(
    value: &str,
    first: usize,
    last: usize,
    fill: char,
    selected: impl Fn(char) -> bool,
) -> String {
    let n = value.chars().filter(|c| selected(*c)).count();
    let (first, last) = revealed(n, first, last);
    let last_start = n.saturating_sub(last);
    let mut out = String::with_capacity(value.len());
    let mut index = 0;
    for c in value.chars() {
        if !selected(c) {
            out.push(c);
            continue;
        }
        out.push(if index < first || index >= last_start {
            c
        } else {
            fill
        });
        index += 1;
    }
    out
}

fn keep(value: &str, first: usize, last: usize, fill: char) -> String {
    keep_selected(value, first, last, fill, |_| true)
}

fn email(value: &str) -> String {
    // The last `@` separates the domain: a quoted local part may contain `@` itself.
    let Some(at) = value.rfind('@') else {
        return full(value);
    };
    let (local, domain) = value.split_at(at);
    let mut local_chars = local.chars();
    let Some(initial) = local_chars.next() else {
        return full(value);
    };
    let mut out = String::with_capacity(value.len() + 3);
    // A one-character local part would be shown whole, so it is hidden too.
    if local_chars.next().is_some() {
        out.push(initial);
    }
    out.push_str("***");
    out.push_str(domain);
    out
}

/// Whether `body` is an 11-digit mainland mobile number (1, then 3–9, then 9 digits),
/// possibly split by spaces or dashes.
fn is_cn_mobile_body(body: &str) -> bool {
    if !body
        .chars()
        .all(|c| c.is_ascii_digit() || c == ' ' || c == '-')
    {
        return false;
    }
    let mut digits = body.chars().filter(char::is_ascii_digit);
    body.chars().filter(char::is_ascii_digit).count() == 11
        && digits.next() == Some('1')
        && matches!(digits.next(), Some('3'..='9'))
}

fn cn_mobile(value: &str) -> String {
    // The country code is not personal, so it stays as written; "" comes last so that
    // a number with a code is never read as a longer number without one.
    for prefix in ["+86", "86", ""] {
        if let Some(body) = value.strip_prefix(prefix) {
            if is_cn_mobile_body(body) {
                let mut out = String::with_capacity(value.len());
                out.push_str(prefix);
                out.push_str(&keep_selected(body, 3, 4, DEFAULT_FILL, |c| {
                    c.is_ascii_digit()
                }));
                return out;
            }
        }
    }
    keep(value, 3, 4, DEFAULT_FILL)
}

fn cn_bank_card(value: &str) -> String {
    let only_digits_and_separators = value
        .chars()
        .all(|c| c.is_ascii_digit() || c == ' ' || c == '-');
    if only_digits_and_separators && value.chars().any(|c| c.is_ascii_digit()) {
        keep_selected(value, 6, 4, DEFAULT_FILL, |c| c.is_ascii_digit())
    } else {
        keep(value, 6, 4, DEFAULT_FILL)
    }
}

/// CJK ideographs (the unified blocks, their extensions and the compatibility blocks).
fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{3400}'..='\u{4DBF}'
        | '\u{4E00}'..='\u{9FFF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2FA1F}'
        | '\u{30000}'..='\u{323AF}')
}

fn cn_name(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let Some(&initial) = chars.first() else {
        return String::new();
    };
    let masked: String = if is_cjk(initial) {
        // A compound surname alone with nothing after it is more likely a two-character
        // name with a one-character surname (欧阳 is also the name 欧 阳), and keeping
        // both would show it whole.
        let surname = if chars.len() >= 3 && COMPOUND_SURNAMES.iter().any(|s| chars.starts_with(s))
        {
            2
        } else {
            1
        };
        chars
            .iter()
            .enumerate()
            .map(|(i, &c)| if i < surname { c } else { DEFAULT_FILL })
            .collect()
    } else {
        // Latin script: each word keeps its initial, spaces stay as they are.
        let mut word_start = true;
        chars
            .iter()
            .map(|&c| {
                if c.is_whitespace() {
                    word_start = true;
                    c
                } else if word_start {
                    word_start = false;
                    c
                } else {
                    DEFAULT_FILL
                }
            })
            .collect()
    };
    // A lone character, or initials only ("J K"), would otherwise be shown whole.
    if masked == value {
        full(value)
    } else {
        masked
    }
}

fn hmac_hex(key: &HashKey, bytes: &[u8]) -> Option<String> {
    // HMAC accepts keys of any length, so this cannot fail; if it ever did, the caller
    // falls back to `full` rather than showing anything.
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.0).ok()?;
    mac.update(bytes);
    let tag = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(tag.len() * 2);
    for byte in tag {
        hex.push(char::from(HEX_DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(HEX_DIGITS[usize::from(byte & 0x0f)]));
    }
    Some(hex)
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn year(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut found = None;
    let mut at = 0;
    while at < bytes.len() {
        if !bytes[at].is_ascii_digit() {
            at += 1;
            continue;
        }
        let start = at;
        while at < bytes.len() && bytes[at].is_ascii_digit() {
            at += 1;
        }
        // Exactly four digits: a day, month, time field or a 5+ digit number is not a
        // year; there is no year 0000 in PostgreSQL's output (1 BC comes before 1 AD).
        let run = value.get(start..at).unwrap_or("");
        if run.len() == 4 && run != "0000" {
            found = Some(run);
            break;
        }
    }
    let Some(found) = found else {
        return full(value);
    };
    let mut out = found.to_string();
    // PostgreSQL marks years before 1 AD with a trailing " BC"; without it the year
    // would read as AD.
    if value.trim_end().ends_with(" BC") {
        out.push_str(" BC");
    }
    // A value that is nothing but a year would be shown whole.
    if out == value {
        full(value)
    } else {
        out
    }
}

fn regex_replace(value: &str, pattern: &regex_lite::Regex, replacement: &str) -> String {
    // Fail closed: a pattern written for another format must not let the value through.
    if !pattern.is_match(value) {
        return full(value);
    }
    let replaced = pattern.replace_all(value, replacement);
    if replaced == value {
        full(value)
    } else {
        replaced.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(spec: &str) -> Mask {
        Mask::parse(spec).unwrap()
    }

    fn apply(spec: &str, value: &str) -> String {
        mask(spec).apply(value, None)
    }

    fn key() -> HashKey {
        HashKey::new([7; 32])
    }

    /// Display → parse → Display is a fixed point, and the parsed mask behaves the same.
    fn assert_round_trip(spec: &str) {
        let parsed = mask(spec);
        let canonical = parsed.to_string();
        let reparsed = mask(&canonical);
        assert_eq!(reparsed.to_string(), canonical, "spec {spec}");
        for sample in ["", "a", "张三丰", "zhang.san@example.com", "13812345678"] {
            assert_eq!(
                parsed.apply(sample, Some(&key())),
                reparsed.apply(sample, Some(&key())),
                "spec {spec}, sample {sample}"
            );
        }
    }

    const NOT_UTF8: &[u8] = &[0xff, b'a', 0xfe, b'b', 0xc3];

    /// Non-UTF-8 input never keeps an original byte.
    fn assert_not_utf8_hidden(spec: &str) {
        let out = mask(spec).apply_bytes(NOT_UTF8, Some(&key()));
        assert_eq!(out, b"*****", "spec {spec}");
    }

    // ----- full -----

    #[test]
    fn full_masks_every_character() {
        assert_eq!(apply("full", ""), "");
        assert_eq!(apply("full", "a"), "*");
        assert_eq!(apply("full", "secret"), "******");
        assert_eq!(apply("full", "张三丰"), "***");
        assert_not_utf8_hidden("full");
        assert_round_trip("full");
    }

    // ----- keep -----

    #[test]
    fn keep_keeps_first_and_last() {
        assert_eq!(apply("keep(3,4)", "13812345678"), "138****5678");
        assert_eq!(apply("keep(3, 4, '#')", "13812345678"), "138####5678");
        assert_eq!(apply("keep(1,1)", "北京市朝阳区"), "北****区");
        assert_eq!(apply("keep(0,2)", "abcdef"), "****ef");
        assert_eq!(apply("keep(2,0)", "abcdef"), "ab****");
        assert_eq!(apply("keep(0,0)", "abc"), "***");
        assert_eq!(apply("keep(3,4)", ""), "");
    }

    #[test]
    fn keep_one_more_than_kept_hides_one() {
        assert_eq!(apply("keep(3,4)", "abcdefgh"), "abc*efgh");
    }

    #[test]
    fn keep_short_values_hide_more_than_half() {
        // n = 7 = F + L: budget 3, split 3:4 → 1 first, 2 last.
        assert_eq!(apply("keep(3,4)", "abcdefg"), "a****fg");
        // n = 4: budget 1 → rounds to 1 at the end (3/7 of 1 rounds to 0 first).
        assert_eq!(apply("keep(3,4)", "abcd"), "***d");
        // n = 3: budget 1.
        assert_eq!(apply("keep(2,2)", "abc"), "a**");
        // One or two characters reveal nothing.
        assert_eq!(apply("keep(3,4)", "ab"), "**");
        assert_eq!(apply("keep(3,4)", "a"), "*");
        assert_eq!(apply("keep(1,1)", "ab"), "**");
        // Chinese, shorter than kept.
        assert_eq!(apply("keep(3,0)", "张三丰"), "张**");
        assert_eq!(apply("keep(0,4)", "张三丰"), "**丰");
    }

    #[test]
    fn keep_never_shows_half_or_more_of_a_short_value() {
        for (first, last) in [(0, 1), (1, 0), (1, 1), (3, 4), (6, 4), (6, 0), (10, 10)] {
            for n in 1..=(first + last) {
                let value: String = "abcdefghijklmnopqrstuvwxyz".chars().take(n).collect();
                let out = keep(&value, first, last, '*');
                let shown = out.chars().filter(|&c| c != '*').count();
                assert_eq!(out.chars().count(), n);
                assert!(2 * shown < n, "keep({first},{last}) on {value}: {out}");
            }
        }
    }

    #[test]
    fn keep_tolerates_huge_counts() {
        let spec = format!("keep({},{})", usize::MAX, usize::MAX);
        assert_eq!(apply(&spec, "abcde"), "a***e");
    }

    #[test]
    fn keep_fill_quote_round_trips() {
        assert_eq!(apply("keep(1,1,'''')", "abcd"), "a''d");
        assert_round_trip("keep(1,1,'''')");
        assert_eq!(mask("keep( 3 , 4 , '*' )").to_string(), "keep(3,4)");
        assert_eq!(mask("keep(3,4,'＊')").to_string(), "keep(3,4,'＊')");
        assert_round_trip("keep(3,4)");
        assert_round_trip("keep(3,4,'#')");
        assert_not_utf8_hidden("keep(1,1)");
    }

    #[test]
    fn keep_argument_errors() {
        for spec in [
            "keep",
            "keep()",
            "keep(3)",
            "keep(-1,2)",
            "keep(a,b)",
            "keep(1.5,2)",
            "keep(+1,2)",
            "keep(3,)",
            "keep('3','4')",
            "keep(1,2,'#',4)",
            "keep(99999999999999999999999999,1)",
        ] {
            assert_eq!(
                Mask::parse(spec).unwrap_err(),
                MaskError::KeepArguments,
                "{spec}"
            );
        }
        for spec in ["keep(1,2,'')", "keep(1,2,'ab')", "keep(1,2,#)"] {
            assert_eq!(
                Mask::parse(spec).unwrap_err(),
                MaskError::KeepFill,
                "{spec}"
            );
        }
        assert_eq!(
            MaskError::KeepArguments.to_string(),
            "keep(F,L): expected two non-negative integers, optionally followed by a fill \
             character like '#'"
        );
    }

    // ----- email -----

    #[test]
    fn email_keeps_initial_and_domain() {
        assert_eq!(apply("email", "zhang.san@example.com"), "z***@example.com");
        assert_eq!(apply("email", "张三@例子.中国"), "张***@例子.中国");
        assert_eq!(apply("email", "\"a@b\"@example.com"), "\"***@example.com");
        assert_round_trip("email");
        assert_not_utf8_hidden("email");
    }

    #[test]
    fn email_short_or_malformed_fails_closed() {
        assert_eq!(apply("email", ""), "");
        assert_eq!(apply("email", "z@example.com"), "***@example.com");
        assert_eq!(apply("email", "@example.com"), "************");
        assert_eq!(apply("email", "not-an-email"), "************");
    }

    // ----- cn_mobile -----

    #[test]
    fn cn_mobile_masks_the_middle_four() {
        assert_eq!(apply("cn_mobile", "13812345678"), "138****5678");
        assert_eq!(apply("cn_mobile", "+8613812345678"), "+86138****5678");
        assert_eq!(apply("cn_mobile", "8613812345678"), "86138****5678");
        assert_eq!(apply("cn_mobile", "+86 138-1234-5678"), "+86 138-****-5678");
        assert_eq!(apply("cn_mobile", "138 1234 5678"), "138 **** 5678");
        assert_round_trip("cn_mobile");
        assert_not_utf8_hidden("cn_mobile");
    }

    #[test]
    fn cn_mobile_other_values_use_keep_3_4() {
        assert_eq!(apply("cn_mobile", ""), "");
        assert_eq!(apply("cn_mobile", "010-12345678"), "010*****5678");
        assert_eq!(apply("cn_mobile", "12345"), "1***5");
        assert_eq!(apply("cn_mobile", "电话号码"), "***码");
        assert_eq!(apply("cn_mobile", "1"), "*");
    }

    // ----- cn_id_card -----

    #[test]
    fn cn_id_card_keeps_6_and_4() {
        assert_eq!(
            apply("cn_id_card", "110105199001011234"),
            "110105********1234"
        );
        assert_eq!(
            apply("cn_id_card", "11010519900101123X"),
            "110105********123X"
        );
        assert_eq!(apply("cn_id_card", "110105900101123"), "110105*****1123");
        assert_eq!(apply("cn_id_card", ""), "");
        assert_eq!(apply("cn_id_card", "12345"), "1***5");
        assert_eq!(apply("cn_id_card", "身份证号码未知"), "身份****知");
        assert_round_trip("cn_id_card");
        assert_not_utf8_hidden("cn_id_card");
    }

    // ----- cn_bank_card -----

    #[test]
    fn cn_bank_card_keeps_6_and_4_digits() {
        assert_eq!(
            apply("cn_bank_card", "6222021234567890123"),
            "622202*********0123"
        );
        assert_eq!(
            apply("cn_bank_card", "6222 0212 3456 7890 123"),
            "6222 02** **** ***0 123"
        );
        assert_eq!(
            apply("cn_bank_card", "6222-0212-3456-7890"),
            "6222-02**-****-7890"
        );
        assert_round_trip("cn_bank_card");
        assert_not_utf8_hidden("cn_bank_card");
    }

    #[test]
    fn cn_bank_card_short_or_odd_values() {
        assert_eq!(apply("cn_bank_card", ""), "");
        assert_eq!(apply("cn_bank_card", "1234 5678"), "12** ***8");
        // Not a number at all: keep(6,4) on its characters, short-value rule included.
        assert_eq!(apply("cn_bank_card", "----"), "-***");
        assert_eq!(
            apply("cn_bank_card", "卡号6222021234567890"),
            "卡号6222********7890"
        );
    }

    // ----- cn_name -----

    #[test]
    fn cn_name_keeps_the_surname() {
        assert_eq!(apply("cn_name", "张三丰"), "张**");
        assert_eq!(apply("cn_name", "张三"), "张*");
        assert_eq!(apply("cn_name", "张"), "*");
        assert_eq!(apply("cn_name", "欧阳修"), "欧阳*");
        assert_eq!(apply("cn_name", "诸葛孔明"), "诸葛**");
        assert_eq!(apply("cn_name", "欧阳"), "欧*");
        assert_eq!(apply("cn_name", ""), "");
        assert_round_trip("cn_name");
        assert_not_utf8_hidden("cn_name");
    }

    #[test]
    fn cn_name_latin_keeps_initials() {
        assert_eq!(apply("cn_name", "Zhang San"), "Z**** S**");
        assert_eq!(apply("cn_name", "Jean  Luc"), "J***  L**");
        assert_eq!(apply("cn_name", "J"), "*");
        assert_eq!(apply("cn_name", "J K"), "***");
    }

    // ----- cn_address -----

    #[test]
    fn cn_address_keeps_six() {
        assert_eq!(
            apply("cn_address", "北京市朝阳区建国路88号"),
            "北京市朝阳区******"
        );
        assert_eq!(apply("cn_address", "北京市朝阳区"), "北京****");
        assert_eq!(apply("cn_address", "北京"), "**");
        assert_eq!(apply("cn_address", ""), "");
        assert_eq!(apply("cn_address", "1 Main Street"), "1 Main*******");
        assert_round_trip("cn_address");
        assert_not_utf8_hidden("cn_address");
    }

    // ----- hash -----

    #[test]
    fn hash_is_keyed_hex_hmac() {
        let key = key();
        let a = mask("hash").apply("张三", Some(&key));
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(a, mask("hash").apply("张三", Some(&key)));
        assert_ne!(a, mask("hash").apply("张四", Some(&key)));
        assert_ne!(a, mask("hash").apply("张三", Some(&HashKey::new([8; 32]))));
        assert_eq!(mask("hash").apply("", Some(&key)).len(), 64);
        assert!(mask("hash").needs_hash_key());
        assert!(!mask("full").needs_hash_key());
        assert_round_trip("hash");
    }

    #[test]
    fn hash_known_answer() {
        // RFC 4231 test case 2. HMAC pads short keys with zeros to the block size, so
        // "Jefe" padded to 32 bytes is the same key and gives the RFC's published tag.
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(b"Jefe");
        let out = Mask::Hash.apply("what do ya want for nothing?", Some(&HashKey::new(bytes)));
        assert_eq!(
            out,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hash_without_key_is_full() {
        assert_eq!(apply("hash", "secret"), "******");
        assert_eq!(mask("hash").apply_bytes(NOT_UTF8, None), b"*****");
    }

    #[test]
    fn hash_of_non_utf8_hashes_the_bytes() {
        let key = key();
        let out = mask("hash").apply_bytes(NOT_UTF8, Some(&key));
        assert_eq!(out.len(), 64);
        assert!(out.iter().all(u8::is_ascii_hexdigit));
        assert_eq!(
            mask("hash").apply_bytes("张三".as_bytes(), Some(&key)),
            mask("hash").apply("张三", Some(&key)).into_bytes()
        );
    }

    #[test]
    fn hash_key_debug_hides_the_key() {
        let printed = format!("{:?}", HashKey::new([0xab; 32]));
        assert!(!printed.contains("171") && !printed.to_lowercase().contains("ab,"));
        assert_eq!(printed, "HashKey(<redacted>)");
    }

    // ----- year -----

    #[test]
    fn year_keeps_the_year() {
        assert_eq!(apply("year", "1990-05-17"), "1990");
        assert_eq!(apply("year", "05/17/1990"), "1990");
        assert_eq!(apply("year", "17.05.1990"), "1990");
        assert_eq!(apply("year", "Thu May 17 1990"), "1990");
        assert_eq!(apply("year", "Thu May 17 10:11:12 1990 PST"), "1990");
        assert_eq!(apply("year", "1990-05-17 10:11:12+08"), "1990");
        assert_eq!(apply("year", "0044-03-15 BC"), "0044 BC");
        assert_eq!(apply("year", "1990年5月17日"), "1990");
        assert_round_trip("year");
        assert_not_utf8_hidden("year");
    }

    #[test]
    fn year_without_a_year_is_full() {
        assert_eq!(apply("year", ""), "");
        assert_eq!(apply("year", "infinity"), "********");
        assert_eq!(apply("year", "12345-01-01"), "***********");
        assert_eq!(apply("year", "05/17/90"), "********");
        assert_eq!(apply("year", "1990"), "****");
        assert_eq!(apply("year", "五月"), "**");
    }

    // ----- constant -----

    #[test]
    fn constant_replaces_everything() {
        assert_eq!(apply("constant('hidden')", "secret"), "hidden");
        assert_eq!(apply("constant('hidden')", ""), "hidden");
        assert_eq!(apply("constant('已隐藏')", "张三"), "已隐藏");
        assert_eq!(apply("constant('it''s')", "x"), "it's");
        assert_eq!(apply("constant('')", "x"), "");
        assert_eq!(
            mask("constant('n/a')").apply_bytes(NOT_UTF8, None),
            b"n/a".to_vec()
        );
        assert_round_trip("constant('it''s, (odd)')");
        assert_round_trip("constant('')");
        assert_eq!(mask(" constant ( 'a b' ) ").to_string(), "constant('a b')");
    }

    #[test]
    fn constant_argument_errors() {
        for spec in ["constant", "constant()", "constant(x)", "constant('a','b')"] {
            assert_eq!(
                Mask::parse(spec).unwrap_err(),
                MaskError::ConstantArguments,
                "{spec}"
            );
        }
    }

    // ----- regex -----

    #[test]
    fn regex_replaces_matches() {
        assert_eq!(
            apply(r"regex('(\d{3})\d{4}(\d{4})','$1****$2')", "13812345678"),
            "138****5678"
        );
        assert_eq!(apply(r"regex('\d','#')", "a1b2"), "a#b#");
        assert_eq!(apply("regex('三','*')", "张三丰"), "张*丰");
        assert_round_trip(r"regex('(\d{3})\d{4}(\d{4})','$1****$2')");
        assert_round_trip("regex('it''s','x')");
        assert_not_utf8_hidden(r"regex('\d','#')");
    }

    #[test]
    fn regex_fails_closed() {
        assert_eq!(apply(r"regex('\d','#')", ""), "");
        assert_eq!(apply(r"regex('\d','#')", "abc"), "***");
        assert_eq!(apply("regex('a','a')", "abc"), "***");
        assert_eq!(apply(r"regex('\d','#')", "张三"), "**");
    }

    #[test]
    fn regex_argument_errors() {
        for spec in ["regex", "regex('a')", "regex(a,b)", "regex('a','b','c')"] {
            assert_eq!(
                Mask::parse(spec).unwrap_err(),
                MaskError::RegexArguments,
                "{spec}"
            );
        }
        let error = Mask::parse("regex('(','x')").unwrap_err();
        assert!(matches!(error, MaskError::RegexPattern(_)));
        assert!(error.to_string().starts_with("regex: invalid pattern: "));
    }

    // ----- parsing in general -----

    #[test]
    fn parse_tolerates_whitespace() {
        assert_eq!(mask("  full ").to_string(), "full");
        assert_eq!(mask("keep ( 3 ,4 )").to_string(), "keep(3,4)");
        assert_eq!(
            mask("regex( 'a b' , ' c ' )").to_string(),
            "regex('a b',' c ')"
        );
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        assert_eq!(Mask::parse("").unwrap_err(), MaskError::Empty);
        assert_eq!(Mask::parse("   ").unwrap_err(), MaskError::Empty);
        let unknown = Mask::parse("foo").unwrap_err();
        assert_eq!(
            unknown,
            MaskError::Unknown {
                name: "foo".to_string()
            }
        );
        assert!(unknown
            .to_string()
            .starts_with("unknown mask `foo` (known: full, keep(F,L), "));
        assert!(matches!(
            Mask::parse("Full").unwrap_err(),
            MaskError::Unknown { .. }
        ));
        assert!(matches!(
            Mask::parse("foo(((").unwrap_err(),
            MaskError::Unknown { .. }
        ));
        assert_eq!(
            Mask::parse("full()").unwrap_err(),
            MaskError::NoArguments {
                name: "full".to_string()
            }
        );
        assert!(matches!(
            Mask::parse("hash(1)").unwrap_err(),
            MaskError::NoArguments { .. }
        ));
        for (spec, problem) in [
            ("(3,4)", "expected a mask name before `(`"),
            ("full x", "expected `(` or the end after the mask name"),
            ("keep(3,4", "missing closing `)`"),
            ("constant('abc)", "unterminated quoted string"),
            ("constant('a' 'b')", "expected `,` or `)` after an argument"),
            ("keep(3,4) x", "unexpected text after `)`"),
        ] {
            assert_eq!(
                Mask::parse(spec).unwrap_err(),
                MaskError::Syntax {
                    spec: spec.to_string(),
                    problem
                },
                "{spec}"
            );
        }
    }
}
