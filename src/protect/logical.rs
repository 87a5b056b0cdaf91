//! The logical types clients see for encrypted columns, and the one canonical text of a
//! value that pgveil encrypts.
//!
//! An encrypted column is stored as `text` (or `bytea`) holding ciphertext, while clients
//! keep seeing the type the policy's `type:` names. Before a value is encrypted it is
//! turned into its canonical text, whatever form the client sent it in (text or binary
//! format, `1.50` or `1.5e0`, `+08` or UTC), so that deterministic encryption gives equal
//! ciphertexts for equal values, and a value PostgreSQL would refuse for the logical type
//! is refused here, with PostgreSQL's SQLSTATE, instead of being stored. After decryption
//! the canonical text is what a text-format client receives; a binary-format client
//! receives it converted to the binary format of the logical type.
//!
//! Canonical forms; each is what PostgreSQL prints for the value with `DateStyle` ISO,
//! `TimeZone` UTC, `extra_float_digits` 1 and `bytea_output` hex, except where noted:
//!
//! - `int2`, `int4`, `int8`: decimal, `-` for negatives, no `+` and no leading zeros.
//!   Input may have surrounding whitespace, a sign and leading zeros; the underscores,
//!   `0x`/`0o`/`0b` prefixes PostgreSQL 16 also accepts are refused.
//! - `numeric`: plain decimal notation without an exponent, trailing fractional zeros
//!   removed and the point too when nothing is left after it (`1.50` → `1.5`, `1e3` →
//!   `1000`, `-0.0` → `0`); `NaN`, `Infinity`, `-Infinity`. This is PostgreSQL's output
//!   for the value with its display scale reduced to the digits that matter, so `1.50` and
//!   `1.5` are one value. Limits are PostgreSQL's: at most 131072 digits before the point,
//!   a display scale of at most 16383 (counted on the input, as the server counts it), and
//!   an exponent below 2^30; beyond them 22003. Binary input that carries more digits than
//!   its display scale is cut to the display scale, as the server cuts it.
//! - `float8`: PostgreSQL's shortest round-trip output (`1`, `1.5`, `1e+20`, `1e-05`,
//!   `-0`, `Infinity`, `-Infinity`, `NaN`), produced by [`super::pgtypes`]; see its note
//!   on rare last-digit differences from the server, which never change the value. `-0`
//!   stays `-0` (PostgreSQL prints it so), although the server compares it equal to `0`.
//!   Input: decimal notation as `strtod` reads it, `NaN`, `Infinity`, `inf` (signed,
//!   any case, surrounding whitespace); hexadecimal floats are refused, and values that
//!   overflow or underflow to zero are refused with 22003 as the server refuses them.
//! - `bool`: `t` or `f`. Input follows the server's `parse_bool`: any case, surrounding
//!   whitespace, `true`/`false`/`yes`/`no`/`on`/`off`/`1`/`0` and unique prefixes.
//! - `date`: `YYYY-MM-DD` (more year digits when needed), `infinity`, `-infinity`. Input is
//!   ISO only: a year of four to seven digits, a month and day of one or two digits, and
//!   the day must exist. Dates before 0001-01-01 (BC) and other DateStyles are refused
//!   with 22007 (text) or 22008 (binary).
//! - `timestamp`: `YYYY-MM-DD HH:MM:SS` with `.ffffff` (trailing zeros removed) when the
//!   microseconds are not zero, `infinity`, `-infinity`. Input: an ISO date, then
//!   optionally a space or `T` and `HH:MM[:SS[.f…]]`; more than six fractional digits
//!   are rounded to microseconds, half to even. `24:00:00` and a 60th second roll over as
//!   in PostgreSQL. A time zone offset after the time is checked and then ignored, as the
//!   server ignores it for `timestamp`.
//! - `timestamptz`: the UTC instant as `timestamp` prints it followed by `+00`, or
//!   `infinity`/`-infinity`. Input as `timestamp`, plus a zone that is required: `Z`,
//!   `UTC`, `GMT`, or an offset `±HH`, `±HHMM`, `±HH:MM`, `±HH:MM:SS`, `±HHMMSS` (hours up
//!   to 15), after the time or after a date alone (midnight). A value without a zone is
//!   refused (22007): the session's `TimeZone` is not known to the proxy, and guessing
//!   would store another instant. Named zones and POSIX zones such as `UTC+8` are refused
//!   for the same reason.
//! - `text`, `varchar`: the value unchanged; it must be UTF-8 without NUL bytes (22021).
//! - `bytea`: `\x` and lowercase hex. Input is either format PostgreSQL reads: hex (`\x`,
//!   pairs of hex digits, whitespace between pairs) or escape format (bytes as they are,
//!   `\\` for a backslash, `\ooo` octal); anything else is refused as the server refuses
//!   it (22023 for bad hex, 22P02 for a bad escape).
//!
//! Binary formats are PostgreSQL's `send`/`recv` formats of the logical type; a binary
//! value of the wrong length or shape is refused with 22P03.
//!
//! Nothing here may panic on input, let a short input cost more than a fixed bound (the
//! longest canonical numeric, `1e131071`, is 128 KiB, as in PostgreSQL), or put the value,
//! or any part of it, into an error message.

use std::fmt::Write as _;

use thiserror::Error;

use super::pgtypes;

/// SQLSTATEs of the errors returned here, as PostgreSQL names them.
pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
pub const INVALID_BINARY_REPRESENTATION: &str = "22P03";
pub const NUMERIC_VALUE_OUT_OF_RANGE: &str = "22003";
pub const INVALID_DATETIME_FORMAT: &str = "22007";
pub const DATETIME_FIELD_OVERFLOW: &str = "22008";
pub const INVALID_TIME_ZONE_DISPLACEMENT_VALUE: &str = "22009";
pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
pub const INVALID_PARAMETER_VALUE: &str = "22023";

/// The types a policy may give an encrypted column with `type:`, plus `bytea` for a
/// `bytea` column without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogicalType {
    Int2,
    Int4,
    Int8,
    Numeric,
    Float8,
    Bool,
    Date,
    Timestamp,
    Timestamptz,
    Text,
    Varchar,
    Bytea,
}

impl LogicalType {
    /// The type a policy `type:` names (`int4`, `timestamptz`, ...), or the stored type
    /// of a column without one (`text`, `character varying`/`varchar`, `bytea`).
    pub fn from_name(name: &str) -> Option<LogicalType> {
        Some(match name {
            "int2" => LogicalType::Int2,
            "int4" => LogicalType::Int4,
            "int8" => LogicalType::Int8,
            "numeric" => LogicalType::Numeric,
            "float8" => LogicalType::Float8,
            "bool" => LogicalType::Bool,
            "date" => LogicalType::Date,
            "timestamp" => LogicalType::Timestamp,
            "timestamptz" => LogicalType::Timestamptz,
            "text" => LogicalType::Text,
            "varchar" | "character varying" => LogicalType::Varchar,
            "bytea" => LogicalType::Bytea,
            _ => return None,
        })
    }

    /// The PostgreSQL type OID.
    pub fn oid(self) -> u32 {
        match self {
            LogicalType::Int2 => 21,
            LogicalType::Int4 => 23,
            LogicalType::Int8 => 20,
            LogicalType::Numeric => 1700,
            LogicalType::Float8 => 701,
            LogicalType::Bool => 16,
            LogicalType::Date => 1082,
            LogicalType::Timestamp => 1114,
            LogicalType::Timestamptz => 1184,
            LogicalType::Text => 25,
            LogicalType::Varchar => 1043,
            LogicalType::Bytea => 17,
        }
    }

    /// `pg_type.typlen`: the size of fixed-size types, -1 for variable-length ones.
    pub fn type_len(self) -> i16 {
        match self {
            LogicalType::Int2 => 2,
            LogicalType::Int4 | LogicalType::Date => 4,
            LogicalType::Int8
            | LogicalType::Float8
            | LogicalType::Timestamp
            | LogicalType::Timestamptz => 8,
            LogicalType::Bool => 1,
            LogicalType::Numeric
            | LogicalType::Text
            | LogicalType::Varchar
            | LogicalType::Bytea => -1,
        }
    }

    /// The name a policy uses for the type.
    pub fn name(self) -> &'static str {
        match self {
            LogicalType::Int2 => "int2",
            LogicalType::Int4 => "int4",
            LogicalType::Int8 => "int8",
            LogicalType::Numeric => "numeric",
            LogicalType::Float8 => "float8",
            LogicalType::Bool => "bool",
            LogicalType::Date => "date",
            LogicalType::Timestamp => "timestamp",
            LogicalType::Timestamptz => "timestamptz",
            LogicalType::Text => "text",
            LogicalType::Varchar => "varchar",
            LogicalType::Bytea => "bytea",
        }
    }

    /// The name PostgreSQL uses in its error messages.
    fn sql_name(self) -> &'static str {
        match self {
            LogicalType::Int2 => "smallint",
            LogicalType::Int4 => "integer",
            LogicalType::Int8 => "bigint",
            LogicalType::Numeric => "numeric",
            LogicalType::Float8 => "double precision",
            LogicalType::Bool => "boolean",
            LogicalType::Date => "date",
            LogicalType::Timestamp => "timestamp",
            LogicalType::Timestamptz => "timestamp with time zone",
            LogicalType::Text => "text",
            LogicalType::Varchar => "character varying",
            LogicalType::Bytea => "bytea",
        }
    }
}

/// A value that is not a valid value of its logical type. The message says what is wrong
/// in PostgreSQL's words, and never contains the value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct ValueError {
    /// The SQLSTATE PostgreSQL would report for the same value.
    pub sqlstate: &'static str,
    pub message: String,
}

impl ValueError {
    fn new(sqlstate: &'static str, message: impl Into<String>) -> ValueError {
        ValueError {
            sqlstate,
            message: message.into(),
        }
    }
}

fn invalid_syntax(ty: LogicalType) -> ValueError {
    let sqlstate = match ty {
        LogicalType::Date | LogicalType::Timestamp | LogicalType::Timestamptz => {
            INVALID_DATETIME_FORMAT
        }
        _ => INVALID_TEXT_REPRESENTATION,
    };
    ValueError::new(
        sqlstate,
        format!("invalid input syntax for type {}", ty.sql_name()),
    )
}

fn out_of_range(ty: LogicalType) -> ValueError {
    ValueError::new(
        NUMERIC_VALUE_OUT_OF_RANGE,
        format!("value is out of range for type {}", ty.sql_name()),
    )
}

fn bad_binary(ty: LogicalType) -> ValueError {
    ValueError::new(
        INVALID_BINARY_REPRESENTATION,
        format!("incorrect binary data format for type {}", ty.sql_name()),
    )
}

fn numeric_overflow() -> ValueError {
    ValueError::new(NUMERIC_VALUE_OUT_OF_RANGE, "value overflows numeric format")
}

fn field_out_of_range() -> ValueError {
    ValueError::new(
        DATETIME_FIELD_OVERFLOW,
        "date/time field value out of range",
    )
}

fn date_out_of_range() -> ValueError {
    ValueError::new(
        DATETIME_FIELD_OVERFLOW,
        "date out of range (pgveil accepts 0001-01-01 to 5874897-12-31)",
    )
}

fn timestamp_out_of_range() -> ValueError {
    ValueError::new(
        DATETIME_FIELD_OVERFLOW,
        "timestamp out of range (pgveil accepts 0001-01-01 to 294276-12-31)",
    )
}

fn not_utf8() -> ValueError {
    ValueError::new(
        CHARACTER_NOT_IN_REPERTOIRE,
        "invalid byte sequence for encoding \"UTF8\"",
    )
}

/// A client's text-format value (a Bind parameter in text format, the content of a SQL
/// literal, a COPY field after unescaping) → its canonical text.
pub fn canonical_from_text(ty: LogicalType, text: &[u8]) -> Result<Vec<u8>, ValueError> {
    match ty {
        LogicalType::Int2 | LogicalType::Int4 | LogicalType::Int8 => {
            Ok(parse_int(ty, text)?.to_string().into_bytes())
        }
        LogicalType::Numeric => Ok(parse_numeric(text)?.canonical().into_bytes()),
        LogicalType::Float8 => float8_canonical(parse_float8(text)?),
        LogicalType::Bool => Ok(bool_canonical(parse_bool(text)?)),
        LogicalType::Date => date_canonical(parse_date(text)?),
        LogicalType::Timestamp | LogicalType::Timestamptz => {
            timestamp_canonical(ty, parse_timestamp(ty, text)?)
        }
        LogicalType::Text | LogicalType::Varchar => Ok(check_text(text)?.to_vec()),
        LogicalType::Bytea => Ok(bytea_canonical(&parse_bytea(text)?)),
    }
}

/// A client's binary-format value of type `ty` (a Bind parameter in binary format) → its
/// canonical text.
pub fn canonical_from_binary(ty: LogicalType, value: &[u8]) -> Result<Vec<u8>, ValueError> {
    match ty {
        LogicalType::Int2 => Ok(i16::from_be_bytes(fixed(ty, value)?)
            .to_string()
            .into_bytes()),
        LogicalType::Int4 => Ok(i32::from_be_bytes(fixed(ty, value)?)
            .to_string()
            .into_bytes()),
        LogicalType::Int8 => Ok(i64::from_be_bytes(fixed(ty, value)?)
            .to_string()
            .into_bytes()),
        LogicalType::Numeric => {
            // pgtypes checks the format (sign word, digits below 10,000, scale bits) and
            // cuts the digits to the display scale as the server does; the text is then
            // read like any client's text.
            let text = pgtypes::binary_to_text(ty.oid(), value).ok_or_else(|| bad_binary(ty))?;
            Ok(parse_numeric(text.as_bytes())?.canonical().into_bytes())
        }
        LogicalType::Float8 => float8_canonical(f64::from_be_bytes(fixed(ty, value)?)),
        LogicalType::Bool => match value {
            // The server reads any non-zero byte as true.
            [byte] => Ok(bool_canonical(*byte != 0)),
            _ => Err(bad_binary(ty)),
        },
        LogicalType::Date => {
            let days = i32::from_be_bytes(fixed(ty, value)?);
            if !date_in_range(days) {
                return Err(date_out_of_range());
            }
            date_canonical(days)
        }
        LogicalType::Timestamp | LogicalType::Timestamptz => {
            let micros = i64::from_be_bytes(fixed(ty, value)?);
            if !timestamp_in_range(micros) {
                return Err(timestamp_out_of_range());
            }
            timestamp_canonical(ty, micros)
        }
        LogicalType::Text | LogicalType::Varchar => Ok(check_text(value)?.to_vec()),
        LogicalType::Bytea => Ok(bytea_canonical(value)),
    }
}

/// A canonical text (or any text-format value of the type) → the binary format of `ty`,
/// exactly as PostgreSQL sends that value, for result columns a client asked for in
/// binary format.
pub fn binary_from_canonical(ty: LogicalType, canonical: &[u8]) -> Result<Vec<u8>, ValueError> {
    match ty {
        LogicalType::Int2 => {
            let value = i16::try_from(parse_int(ty, canonical)?).map_err(|_| out_of_range(ty))?;
            Ok(value.to_be_bytes().to_vec())
        }
        LogicalType::Int4 => {
            let value = i32::try_from(parse_int(ty, canonical)?).map_err(|_| out_of_range(ty))?;
            Ok(value.to_be_bytes().to_vec())
        }
        LogicalType::Int8 => Ok(parse_int(ty, canonical)?.to_be_bytes().to_vec()),
        LogicalType::Numeric => Ok(parse_numeric(canonical)?.binary()),
        LogicalType::Float8 => Ok(parse_float8(canonical)?.to_be_bytes().to_vec()),
        LogicalType::Bool => Ok(vec![u8::from(parse_bool(canonical)?)]),
        LogicalType::Date => Ok(parse_date(canonical)?.to_be_bytes().to_vec()),
        LogicalType::Timestamp | LogicalType::Timestamptz => {
            Ok(parse_timestamp(ty, canonical)?.to_be_bytes().to_vec())
        }
        LogicalType::Text | LogicalType::Varchar => Ok(check_text(canonical)?.to_vec()),
        LogicalType::Bytea => parse_bytea(canonical),
    }
}

fn fixed<const N: usize>(ty: LogicalType, value: &[u8]) -> Result<[u8; N], ValueError> {
    value.try_into().map_err(|_| bad_binary(ty))
}

/// Whitespace as C's `isspace` sees it in the C locale, which the server's input
/// functions skip.
fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn trim_space(text: &[u8]) -> &[u8] {
    let start = text
        .iter()
        .position(|&b| !is_space(b))
        .unwrap_or(text.len());
    let end = text
        .iter()
        .rposition(|&b| !is_space(b))
        .map_or(start, |at| at + 1);
    text.get(start..end).unwrap_or_default()
}

/// Splits an optional sign off: (negative, rest).
fn split_sign(text: &[u8]) -> (bool, &[u8]) {
    match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, text),
    }
}

fn digit_count(text: &[u8]) -> usize {
    text.iter().take_while(|b| b.is_ascii_digit()).count()
}

// ---------------------------------------------------------------------------------------
// Integers

/// An integer of type `ty` (int2, int4 or int8), range-checked.
fn parse_int(ty: LogicalType, text: &[u8]) -> Result<i64, ValueError> {
    let (min, max) = match ty {
        LogicalType::Int2 => (i64::from(i16::MIN), i64::from(i16::MAX)),
        LogicalType::Int4 => (i64::from(i32::MIN), i64::from(i32::MAX)),
        _ => (i64::MIN, i64::MAX),
    };
    let (negative, digits) = split_sign(trim_space(text));
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid_syntax(ty));
    }
    // Leading zeros are allowed in any number; the magnitude saturates far above i64.
    let magnitude = digits.iter().fold(0i128, |acc, digit| {
        (acc * 10 + i128::from(digit - b'0')).min(i128::from(u64::MAX))
    });
    let value = if negative { -magnitude } else { magnitude };
    if value < i128::from(min) || value > i128::from(max) {
        return Err(out_of_range(ty));
    }
    i64::try_from(value).map_err(|_| out_of_range(ty))
}

// ---------------------------------------------------------------------------------------
// numeric

/// Most digits before the decimal point: 32768 base-10,000 digits.
const NUMERIC_MAX_INTEGER_DIGITS: i64 = 131_072;
/// Largest display scale (`NUMERIC_DSCALE_MAX`).
const NUMERIC_MAX_DSCALE: i64 = 0x3FFF;
/// Exponents the server refuses outright, before looking at the digits.
const NUMERIC_MAX_EXPONENT: i64 = (i32::MAX / 2) as i64;

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Numeric {
    NaN,
    Infinity,
    NegativeInfinity,
    /// `digits` (ASCII, no leading or trailing zeros, empty for zero) × 10^`exponent`.
    Finite {
        negative: bool,
        digits: Vec<u8>,
        exponent: i64,
    },
}

fn parse_numeric(text: &[u8]) -> Result<Numeric, ValueError> {
    let syntax = || invalid_syntax(LogicalType::Numeric);
    let text = trim_space(text);
    // The spellings float8 also accepts, in any case.
    for (word, value) in [
        (&b"nan"[..], Numeric::NaN),
        (b"infinity", Numeric::Infinity),
        (b"+infinity", Numeric::Infinity),
        (b"-infinity", Numeric::NegativeInfinity),
        (b"inf", Numeric::Infinity),
        (b"+inf", Numeric::Infinity),
        (b"-inf", Numeric::NegativeInfinity),
    ] {
        if text.eq_ignore_ascii_case(word) {
            return Ok(value);
        }
    }
    let (negative, rest) = split_sign(text);
    let (integer, rest) = rest.split_at(digit_count(rest));
    let (fraction, rest) = match rest.strip_prefix(b".") {
        Some(after) => after.split_at(digit_count(after)),
        None => (&[][..], rest),
    };
    if integer.is_empty() && fraction.is_empty() {
        return Err(syntax());
    }
    let exponent = match rest.split_first() {
        None => 0,
        Some((b'e' | b'E', exponent)) => {
            let (exponent_negative, exponent_digits) = split_sign(exponent);
            if exponent_digits.is_empty() || !exponent_digits.iter().all(u8::is_ascii_digit) {
                return Err(syntax());
            }
            let magnitude = exponent_digits.iter().fold(0i64, |acc, digit| {
                (acc * 10 + i64::from(digit - b'0')).min(NUMERIC_MAX_EXPONENT)
            });
            if magnitude >= NUMERIC_MAX_EXPONENT {
                return Err(numeric_overflow());
            }
            if exponent_negative {
                -magnitude
            } else {
                magnitude
            }
        }
        Some(_) => return Err(syntax()),
    };
    let fraction_len = i64::try_from(fraction.len()).map_err(|_| numeric_overflow())?;
    // The display scale the server would give the value, which it limits even when the
    // digits that make it are zeros.
    if fraction_len - exponent > NUMERIC_MAX_DSCALE {
        return Err(numeric_overflow());
    }
    let all = || integer.iter().chain(fraction.iter()).copied();
    let Some(first) = all().position(|d| d != b'0') else {
        return Ok(Numeric::Finite {
            negative: false,
            digits: Vec::new(),
            exponent: 0,
        });
    };
    let trailing_zeros = all().rev().take_while(|&d| d == b'0').count();
    let total = integer.len() + fraction.len();
    let digits: Vec<u8> = all()
        .skip(first)
        .take(total - first - trailing_zeros)
        .collect();
    let exponent = exponent - fraction_len + i64::try_from(trailing_zeros).unwrap_or(i64::MAX);
    let digits_len = i64::try_from(digits.len()).map_err(|_| numeric_overflow())?;
    if digits_len + exponent > NUMERIC_MAX_INTEGER_DIGITS {
        return Err(numeric_overflow());
    }
    Ok(Numeric::Finite {
        negative,
        digits,
        exponent,
    })
}

impl Numeric {
    fn canonical(&self) -> String {
        let (negative, digits, exponent) = match self {
            Numeric::NaN => return "NaN".to_string(),
            Numeric::Infinity => return "Infinity".to_string(),
            Numeric::NegativeInfinity => return "-Infinity".to_string(),
            Numeric::Finite {
                negative,
                digits,
                exponent,
            } => (*negative, digits.as_slice(), *exponent),
        };
        if digits.is_empty() {
            return "0".to_string();
        }
        // Limits checked at parsing keep these small; saturating keeps them safe.
        let zeros = |count: i64| "0".repeat(usize::try_from(count).unwrap_or(0));
        let digits_text = String::from_utf8_lossy(digits);
        let mut text = String::with_capacity(digits.len() + 8);
        if negative {
            text.push('-');
        }
        if exponent >= 0 {
            text.push_str(&digits_text);
            text.push_str(&zeros(exponent));
        } else {
            let fraction_len = usize::try_from(-exponent).unwrap_or(usize::MAX);
            if digits.len() > fraction_len {
                let (integer, fraction) = digits_text.split_at(digits.len() - fraction_len);
                text.push_str(integer);
                text.push('.');
                text.push_str(fraction);
            } else {
                text.push_str("0.");
                text.push_str(&"0".repeat(fraction_len - digits.len()));
                text.push_str(&digits_text);
            }
        }
        text
    }

    /// The binary format the server sends for this value: `ndigits`, `weight`, `sign`,
    /// `dscale`, then base-10,000 digits without leading or trailing zero digits; the
    /// display scale is the number of fractional digits of the canonical text.
    fn binary(&self) -> Vec<u8> {
        let header = |ndigits: u16, weight: i16, sign: u16, dscale: u16| {
            let mut out = Vec::with_capacity(8 + 2 * usize::from(ndigits));
            out.extend_from_slice(&ndigits.to_be_bytes());
            out.extend_from_slice(&weight.to_be_bytes());
            out.extend_from_slice(&sign.to_be_bytes());
            out.extend_from_slice(&dscale.to_be_bytes());
            out
        };
        let (negative, digits, exponent) = match self {
            Numeric::NaN => return header(0, 0, NUMERIC_NAN, 0),
            // The server sends a display scale of 32 for infinities: it reads the scale
            // bits of their short header, where the sign word's 0x1000 sits.
            Numeric::Infinity => return header(0, 0, NUMERIC_PINF, 32),
            Numeric::NegativeInfinity => return header(0, 0, NUMERIC_NINF, 32),
            Numeric::Finite {
                negative,
                digits,
                exponent,
            } => (*negative, digits.as_slice(), *exponent),
        };
        let dscale = u16::try_from((-exponent).max(0)).unwrap_or(u16::MAX);
        if digits.is_empty() {
            return header(0, 0, NUMERIC_POS, dscale);
        }
        let digits_len = i64::try_from(digits.len()).unwrap_or(i64::MAX);
        // Power of ten of the first and of the last digit.
        let top = digits_len + exponent - 1;
        let weight = top.div_euclid(4);
        let bottom = exponent.div_euclid(4);
        let group_count = usize::try_from(weight - bottom + 1).unwrap_or(0);
        let mut groups = vec![0u16; group_count];
        for (power, digit) in (exponent..=top).rev().zip(digits) {
            let index = usize::try_from(weight - power.div_euclid(4)).unwrap_or(0);
            if let Some(group) = groups.get_mut(index) {
                *group += u16::from(digit - b'0') * 10u16.pow(power.rem_euclid(4) as u32);
            }
        }
        // Parsing limits the weight to 32767 and the groups to well under 65536.
        let sign = if negative { NUMERIC_NEG } else { NUMERIC_POS };
        let mut out = header(
            u16::try_from(group_count).unwrap_or(u16::MAX),
            i16::try_from(weight).unwrap_or(i16::MAX),
            sign,
            dscale,
        );
        for group in groups {
            out.extend_from_slice(&group.to_be_bytes());
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// float8

fn parse_float8(text: &[u8]) -> Result<f64, ValueError> {
    let ty = LogicalType::Float8;
    let text = trim_space(text);
    let (negative, body) = split_sign(text);
    let signed = |value: f64| if negative { -value } else { value };
    if body.eq_ignore_ascii_case(b"nan") {
        return Ok(f64::NAN);
    }
    if body.eq_ignore_ascii_case(b"inf") || body.eq_ignore_ascii_case(b"infinity") {
        return Ok(signed(f64::INFINITY));
    }
    // Decimal notation only: digits with an optional point, at least one digit, then an
    // optional exponent. (strtod would also read hexadecimal; the server's documented
    // input is decimal, so pgveil refuses the rest.)
    let (integer, rest) = body.split_at(digit_count(body));
    let (fraction, rest) = match rest.strip_prefix(b".") {
        Some(after) => after.split_at(digit_count(after)),
        None => (&[][..], rest),
    };
    if integer.is_empty() && fraction.is_empty() {
        return Err(invalid_syntax(ty));
    }
    if let Some((marker, exponent)) = rest.split_first() {
        let (_, exponent_digits) = split_sign(exponent);
        if !matches!(marker, b'e' | b'E')
            || exponent_digits.is_empty()
            || !exponent_digits.iter().all(u8::is_ascii_digit)
        {
            return Err(invalid_syntax(ty));
        }
    }
    let value: f64 = std::str::from_utf8(text)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| invalid_syntax(ty))?;
    let nonzero_digits = integer.iter().chain(fraction).any(|&d| d != b'0');
    if value.is_infinite() || (value == 0.0 && nonzero_digits) {
        return Err(out_of_range(ty));
    }
    Ok(value)
}

fn float8_canonical(value: f64) -> Result<Vec<u8>, ValueError> {
    pgtypes::binary_to_text(LogicalType::Float8.oid(), &value.to_be_bytes())
        .map(String::into_bytes)
        .ok_or_else(|| bad_binary(LogicalType::Float8))
}

// ---------------------------------------------------------------------------------------
// bool

/// The server's `parse_bool`: whole words or unique prefixes, any case.
fn parse_bool(text: &[u8]) -> Result<bool, ValueError> {
    let text = trim_space(text).to_ascii_lowercase();
    let prefix_of = |word: &[u8], min_len: usize| text.len() >= min_len && word.starts_with(&text);
    let value = match text.first() {
        Some(b't') if prefix_of(b"true", 1) => true,
        Some(b'f') if prefix_of(b"false", 1) => false,
        Some(b'y') if prefix_of(b"yes", 1) => true,
        Some(b'n') if prefix_of(b"no", 1) => false,
        // "o" alone could be on or off.
        Some(b'o') if text == b"on" => true,
        Some(b'o') if prefix_of(b"off", 2) => false,
        Some(b'1') if text.len() == 1 => true,
        Some(b'0') if text.len() == 1 => false,
        _ => return Err(invalid_syntax(LogicalType::Bool)),
    };
    Ok(value)
}

fn bool_canonical(value: bool) -> Vec<u8> {
    vec![if value { b't' } else { b'f' }]
}

// ---------------------------------------------------------------------------------------
// date, timestamp, timestamptz

const USECS_PER_SEC: i64 = 1_000_000;
const USECS_PER_DAY: i64 = 86_400 * USECS_PER_SEC;
/// 0001-01-01 and 5874898-01-01 (the server's end of dates) as days since 2000-01-01.
const FIRST_DATE: i64 = -730_119;
const END_DATE: i64 = 2_145_031_949;
/// 0001-01-01 00:00:00 and 294277-01-01 00:00:00 (the server's end of timestamps) as
/// microseconds since 2000-01-01.
const FIRST_TIMESTAMP: i64 = FIRST_DATE * USECS_PER_DAY;
const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;
/// Days from 0000-03-01 to 2000-01-01 (proleptic Gregorian).
const EPOCH_FROM_MARCH_YEAR_ZERO: i64 = 730_425;
/// Largest zone offset hour the server accepts (`MAX_TZDISP_HOUR`).
const MAX_ZONE_HOURS: i64 = 15;

fn date_in_range(days: i32) -> bool {
    matches!(days, i32::MIN | i32::MAX) || (FIRST_DATE..END_DATE).contains(&i64::from(days))
}

fn timestamp_in_range(micros: i64) -> bool {
    matches!(micros, i64::MIN | i64::MAX) || (FIRST_TIMESTAMP..END_TIMESTAMP).contains(&micros)
}

fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 2000-01-01 of a valid proleptic Gregorian date.
///
/// Years are counted from 1 March, so that the leap day ends a year; the days before
/// each month of such a year are (153 × months since March + 2) / 5.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - EPOCH_FROM_MARCH_YEAR_ZERO
}

/// A number of one to `max` digits at the start of `text`: (value, rest).
fn leading_number(text: &[u8], max: usize) -> Option<(i64, &[u8])> {
    let count = digit_count(text);
    if count == 0 || count > max {
        return None;
    }
    let (digits, rest) = text.split_at(count);
    let value = digits
        .iter()
        .fold(0i64, |acc, digit| acc * 10 + i64::from(digit - b'0'));
    Some((value, rest))
}

/// `YYYY-MM-DD` at the start of `text`: (days since 2000-01-01, rest). Errors use `ty`.
fn parse_ymd(ty: LogicalType, text: &[u8]) -> Result<(i64, &[u8]), ValueError> {
    let syntax = || invalid_syntax(ty);
    // Four digits, or up to seven for years past 9999.
    if digit_count(text) < 4 {
        return Err(syntax());
    }
    let (year, rest) = leading_number(text, 7).ok_or_else(syntax)?;
    let rest = rest.strip_prefix(b"-").ok_or_else(syntax)?;
    let (month, rest) = leading_number(rest, 2).ok_or_else(syntax)?;
    let rest = rest.strip_prefix(b"-").ok_or_else(syntax)?;
    let (day, rest) = leading_number(rest, 2).ok_or_else(syntax)?;
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(field_out_of_range());
    }
    Ok((days_from_civil(year, month, day), rest))
}

/// `infinity` or `-infinity` in any case (the server refuses `+infinity` for dates and
/// timestamps): Some(true) for minus infinity.
fn infinity(text: &[u8]) -> Option<bool> {
    match text.strip_prefix(b"-") {
        Some(body) => body.eq_ignore_ascii_case(b"infinity").then_some(true),
        None => text.eq_ignore_ascii_case(b"infinity").then_some(false),
    }
}

fn parse_date(text: &[u8]) -> Result<i32, ValueError> {
    let ty = LogicalType::Date;
    let text = trim_space(text);
    match infinity(text) {
        Some(true) => return Ok(i32::MIN),
        Some(false) => return Ok(i32::MAX),
        None => {}
    }
    let (days, rest) = parse_ymd(ty, text)?;
    if !rest.is_empty() {
        return Err(invalid_syntax(ty));
    }
    if !(FIRST_DATE..END_DATE).contains(&days) {
        return Err(date_out_of_range());
    }
    i32::try_from(days).map_err(|_| date_out_of_range())
}

/// Microseconds since 2000-01-01 00:00:00 (the UTC instant for timestamptz).
fn parse_timestamp(ty: LogicalType, text: &[u8]) -> Result<i64, ValueError> {
    let syntax = || invalid_syntax(ty);
    let with_zone = ty == LogicalType::Timestamptz;
    let text = trim_space(text);
    match infinity(text) {
        Some(true) => return Ok(i64::MIN),
        Some(false) => return Ok(i64::MAX),
        None => {}
    }
    let (days, rest) = parse_ymd(ty, text)?;
    let (time, rest, after_date) = match rest {
        [b' ' | b'T' | b't', time @ ..] if time.first().is_some_and(u8::is_ascii_digit) => {
            let (time, rest) = parse_time(ty, time)?;
            (time, rest, false)
        }
        _ => (0, rest, true),
    };
    // A zone may follow the time, or the date alone.
    let zone = trim_space(rest);
    let offset = if zone.is_empty() {
        None
    } else if after_date
        && rest.len() == zone.len()
        && !matches!(zone.first(), Some(b'+' | b'Z' | b'z'))
    {
        // Right after a date the server reads a `-` as part of the date.
        return Err(syntax());
    } else {
        Some(parse_zone(ty, zone)?)
    };
    let offset = match (with_zone, offset) {
        (true, Some(offset)) => offset,
        (true, None) => {
            return Err(ValueError::new(
                INVALID_DATETIME_FORMAT,
                "invalid input syntax for type timestamp with time zone: pgveil needs a UTC \
                 offset (such as +08 or Z) in values for encrypted columns, because the \
                 session's TimeZone is not known to it",
            ))
        }
        // The server ignores a zone given for a timestamp without time zone.
        (false, _) => 0,
    };
    let micros = i128::from(days) * i128::from(USECS_PER_DAY) + i128::from(time)
        - i128::from(offset) * i128::from(USECS_PER_SEC);
    i64::try_from(micros)
        .ok()
        .filter(|&micros| (FIRST_TIMESTAMP..END_TIMESTAMP).contains(&micros))
        .ok_or_else(timestamp_out_of_range)
}

/// `HH:MM[:SS[.fraction]]` at the start of `text`: (microseconds since midnight, rest).
/// The fraction is rounded to microseconds, half to even; `24:00:00` and second 60 are
/// accepted and roll over, as in the server.
fn parse_time(ty: LogicalType, text: &[u8]) -> Result<(i64, &[u8]), ValueError> {
    let syntax = || invalid_syntax(ty);
    let (hour, rest) = leading_number(text, 2).ok_or_else(syntax)?;
    let rest = rest.strip_prefix(b":").ok_or_else(syntax)?;
    let (minute, mut rest) = leading_number(rest, 2).ok_or_else(syntax)?;
    let mut second = 0;
    let mut micros = 0;
    if let Some(after) = rest.strip_prefix(b":") {
        let (value, after) = leading_number(after, 2).ok_or_else(syntax)?;
        second = value;
        rest = after;
        if let Some(after) = rest.strip_prefix(b".") {
            let count = digit_count(after);
            if count == 0 {
                return Err(syntax());
            }
            let (fraction, after) = after.split_at(count);
            micros = round_fraction(fraction);
            rest = after;
        }
    }
    if minute > 59
        || second > 60
        || (second == 60 && micros > 0)
        || hour > 24
        || (hour == 24 && (minute, second, micros) != (0, 0, 0))
    {
        return Err(field_out_of_range());
    }
    Ok((
        ((hour * 60 + minute) * 60 + second) * USECS_PER_SEC + micros,
        rest,
    ))
}

/// Decimal fraction digits → microseconds, rounded half to even (may be 1,000,000).
fn round_fraction(digits: &[u8]) -> i64 {
    let mut micros = 0i64;
    for position in 0..6 {
        let digit = digits.get(position).map_or(0, |d| i64::from(d - b'0'));
        micros = micros * 10 + digit;
    }
    let rest = digits.get(6..).unwrap_or_default();
    let round_up = match rest.split_first() {
        Some((first, _)) if *first > b'5' => true,
        Some((b'5', tail)) => tail.iter().any(|&d| d != b'0') || micros % 2 == 1,
        _ => false,
    };
    micros + i64::from(round_up)
}

/// A time zone after the time: `Z`, `UTC`, `GMT`, or `±HH[[:]MM[[:]SS]]`. Returns the
/// offset east of UTC in seconds.
fn parse_zone(ty: LogicalType, text: &[u8]) -> Result<i64, ValueError> {
    let syntax = || invalid_syntax(ty);
    for name in [&b"z"[..], b"utc", b"gmt"] {
        if text.eq_ignore_ascii_case(name) {
            return Ok(0);
        }
    }
    let (negative, body) = match text.split_first() {
        Some((b'+', body)) => (false, body),
        Some((b'-', body)) => (true, body),
        _ => {
            return Err(ValueError::new(
                INVALID_DATETIME_FORMAT,
                format!(
                    "invalid input syntax for type {}: pgveil accepts a time zone only as \
                     a UTC offset (such as +08 or Z)",
                    ty.sql_name()
                ),
            ))
        }
    };
    let (hours, minutes, seconds) = if body.contains(&b':') {
        let mut parts = body.split(|&b| b == b':');
        let mut part = |max: usize| -> Result<Option<i64>, ValueError> {
            match parts.next() {
                None => Ok(None),
                Some(part) => match leading_number(part, max) {
                    Some((value, [])) => Ok(Some(value)),
                    _ => Err(syntax()),
                },
            }
        };
        let hours = part(2)?.ok_or_else(syntax)?;
        let minutes = part(2)?.ok_or_else(syntax)?;
        let seconds = part(2)?.unwrap_or(0);
        if parts.next().is_some() {
            return Err(syntax());
        }
        (hours, minutes, seconds)
    } else {
        if !body.iter().all(u8::is_ascii_digit) {
            return Err(syntax());
        }
        let number = |range: std::ops::Range<usize>| -> i64 {
            body.get(range)
                .unwrap_or_default()
                .iter()
                .fold(0, |acc, d| acc * 10 + i64::from(d - b'0'))
        };
        match body.len() {
            1 | 2 => (number(0..body.len()), 0, 0),
            4 => (number(0..2), number(2..4), 0),
            6 => (number(0..2), number(2..4), number(4..6)),
            _ => return Err(syntax()),
        }
    };
    if hours > MAX_ZONE_HOURS || minutes > 59 || seconds > 59 {
        return Err(ValueError::new(
            INVALID_TIME_ZONE_DISPLACEMENT_VALUE,
            "time zone displacement out of range",
        ));
    }
    let offset = (hours * 60 + minutes) * 60 + seconds;
    Ok(if negative { -offset } else { offset })
}

fn date_canonical(days: i32) -> Result<Vec<u8>, ValueError> {
    pgtypes::binary_to_text(LogicalType::Date.oid(), &days.to_be_bytes())
        .map(String::into_bytes)
        .ok_or_else(date_out_of_range)
}

fn timestamp_canonical(ty: LogicalType, micros: i64) -> Result<Vec<u8>, ValueError> {
    pgtypes::binary_to_text(ty.oid(), &micros.to_be_bytes())
        .map(String::into_bytes)
        .ok_or_else(timestamp_out_of_range)
}

// ---------------------------------------------------------------------------------------
// text, varchar, bytea

fn check_text(value: &[u8]) -> Result<&[u8], ValueError> {
    if value.contains(&0) || std::str::from_utf8(value).is_err() {
        return Err(not_utf8());
    }
    Ok(value)
}

fn bytea_canonical(bytes: &[u8]) -> Vec<u8> {
    let mut text = String::with_capacity(2 + 2 * bytes.len());
    text.push_str("\\x");
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text.into_bytes()
}

/// bytea input as the server reads it: hex format after `\x`, else escape format.
fn parse_bytea(text: &[u8]) -> Result<Vec<u8>, ValueError> {
    if let Some(hex) = text.strip_prefix(b"\\x") {
        let mut bytes = Vec::with_capacity(hex.len() / 2);
        let mut rest = hex;
        while let Some((&first, after)) = rest.split_first() {
            if matches!(first, b' ' | b'\n' | b'\t' | b'\r') {
                rest = after;
                continue;
            }
            let high = hex_value(first).ok_or_else(bad_hex_digit)?;
            let (&second, after) = after.split_first().ok_or_else(|| {
                ValueError::new(
                    INVALID_PARAMETER_VALUE,
                    "invalid hexadecimal data: odd number of digits",
                )
            })?;
            let low = hex_value(second).ok_or_else(bad_hex_digit)?;
            bytes.push((high << 4) | low);
            rest = after;
        }
        return Ok(bytes);
    }
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some((&byte, after)) = rest.split_first() {
        if byte != b'\\' {
            bytes.push(byte);
            rest = after;
            continue;
        }
        match after {
            [b'\\', tail @ ..] => {
                bytes.push(b'\\');
                rest = tail;
            }
            [a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', tail @ ..] => {
                bytes.push(((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'));
                rest = tail;
            }
            _ => return Err(invalid_syntax(LogicalType::Bytea)),
        }
    }
    Ok(bytes)
}

fn bad_hex_digit() -> ValueError {
    ValueError::new(INVALID_PARAMETER_VALUE, "invalid hexadecimal digit")
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::LogicalType::*;
    use super::*;

    fn text(ty: LogicalType, input: &str) -> Result<String, ValueError> {
        canonical_from_text(ty, input.as_bytes()).map(|bytes| String::from_utf8(bytes).unwrap())
    }

    fn ok(ty: LogicalType, input: &str, expected: &str) {
        assert_eq!(text(ty, input).as_deref(), Ok(expected), "{ty:?} {input:?}");
        // Canonical text is accepted as input and is its own canonical text.
        assert_eq!(
            text(ty, expected).as_deref(),
            Ok(expected),
            "{ty:?} {expected:?}"
        );
    }

    fn refused(ty: LogicalType, input: &str, sqlstate: &str) {
        match canonical_from_text(ty, input.as_bytes()) {
            Ok(value) => panic!("{ty:?} {input:?} accepted as {value:?}"),
            Err(error) => {
                assert_eq!(error.sqlstate, sqlstate, "{ty:?} {input:?}: {error}");
                let trimmed = input.trim();
                if trimmed.len() > 2 {
                    assert!(!error.message.contains(trimmed), "{error} shows the value");
                }
            }
        }
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
            .collect()
    }

    fn to_hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_binary(ty: LogicalType, value: &[u8]) -> Result<String, ValueError> {
        canonical_from_binary(ty, value).map(|bytes| String::from_utf8(bytes).unwrap())
    }

    fn to_binary(ty: LogicalType, canonical: &str) -> Vec<u8> {
        binary_from_canonical(ty, canonical.as_bytes()).unwrap()
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }

        fn digits(&mut self, count: u64) -> String {
            (0..count)
                .map(|_| char::from(b'0' + self.below(10) as u8))
                .collect()
        }
    }

    const ALL: [LogicalType; 12] = [
        Int2,
        Int4,
        Int8,
        Numeric,
        Float8,
        Bool,
        Date,
        Timestamp,
        Timestamptz,
        Text,
        Varchar,
        Bytea,
    ];

    #[test]
    fn names_oids_and_lengths() {
        for ty in ALL {
            assert_eq!(LogicalType::from_name(ty.name()), Some(ty));
            // Every policy type is known to the policy, and the other way round.
            assert_eq!(
                crate::policy::LOGICAL_TYPES.contains(&ty.name()),
                ty != Bytea,
                "{ty:?}"
            );
        }
        for name in crate::policy::LOGICAL_TYPES {
            assert!(LogicalType::from_name(name).is_some(), "{name}");
        }
        assert_eq!(LogicalType::from_name("character varying"), Some(Varchar));
        assert_eq!(LogicalType::from_name("integer"), None);
        assert_eq!(LogicalType::from_name("INT4"), None);
        assert_eq!(
            ALL.map(LogicalType::oid),
            [21, 23, 20, 1700, 701, 16, 1082, 1114, 1184, 25, 1043, 17]
        );
        assert_eq!(
            ALL.map(LogicalType::type_len),
            [2, 4, 8, -1, 8, 1, 4, 8, 8, -1, -1, -1]
        );
        for ty in ALL {
            // Fixed-size types: the binary form is exactly that long.
            if let Ok(size) = usize::try_from(ty.type_len()) {
                let sample = match ty {
                    Bool => "t",
                    Date => "2024-02-29",
                    Timestamp => "2024-02-29 12:00:00",
                    Timestamptz => "2024-02-29 12:00:00+00",
                    _ => "1",
                };
                assert_eq!(to_binary(ty, sample).len(), size, "{ty:?}");
            }
        }
    }

    #[test]
    fn integers() {
        ok(Int4, "42", "42");
        ok(Int4, "  +0042 \n", "42");
        ok(Int4, "-0", "0");
        ok(Int4, "000", "0");
        ok(Int2, "-32768", "-32768");
        ok(Int2, "32767", "32767");
        ok(Int4, "-2147483648", "-2147483648");
        ok(Int4, "2147483647", "2147483647");
        ok(Int8, "-9223372036854775808", "-9223372036854775808");
        ok(Int8, "9223372036854775807", "9223372036854775807");
        ok(Int8, "00000000000000000000000000000001", "1");
        refused(Int2, "32768", "22003");
        refused(Int2, "-32769", "22003");
        refused(Int4, "2147483648", "22003");
        refused(Int8, "9223372036854775808", "22003");
        refused(Int8, "-9223372036854775809", "22003");
        refused(Int8, &"9".repeat(100), "22003");
        for bad in [
            "", " ", "+", "-", "1.0", "1e3", "1_000", "0x10", "0o7", "0b1", "--1", "+-1", "1 2",
            "١", "12a", "a12", "1\0",
        ] {
            refused(Int4, bad, "22P02");
        }
        assert_eq!(from_binary(Int2, &(-5i16).to_be_bytes()).unwrap(), "-5");
        assert_eq!(
            from_binary(Int4, &i32::MIN.to_be_bytes()).unwrap(),
            "-2147483648"
        );
        assert_eq!(
            from_binary(Int8, &i64::MAX.to_be_bytes()).unwrap(),
            "9223372036854775807"
        );
        assert_eq!(from_binary(Int4, &[0; 8]).unwrap_err().sqlstate, "22P03");
        assert_eq!(from_binary(Int2, &[0; 3]).unwrap_err().sqlstate, "22P03");
        assert_eq!(to_binary(Int2, "-2"), vec![0xff, 0xfe]);
        assert_eq!(to_binary(Int4, "258"), vec![0, 0, 1, 2]);
        assert_eq!(to_binary(Int8, "-1"), vec![0xff; 8]);
        assert_eq!(
            binary_from_canonical(Int2, b"40000").unwrap_err().sqlstate,
            "22003"
        );
    }

    #[test]
    fn numeric_text() {
        ok(Numeric, "1.50", "1.5");
        ok(Numeric, "1.5", "1.5");
        ok(Numeric, "1e3", "1000");
        ok(Numeric, "1E+3", "1000");
        ok(Numeric, "-0.0", "0");
        ok(Numeric, "-0", "0");
        ok(Numeric, "0e-100", "0");
        ok(Numeric, "  +007.250 ", "7.25");
        ok(Numeric, ".5", "0.5");
        ok(Numeric, "5.", "5");
        ok(Numeric, "-.05e-1", "-0.005");
        ok(Numeric, "12.34e1", "123.4");
        ok(Numeric, "12.34e-5", "0.0001234");
        ok(Numeric, "100", "100");
        ok(Numeric, "100.000", "100");
        ok(Numeric, "-1234567890.0987654321", "-1234567890.0987654321");
        ok(Numeric, "NaN", "NaN");
        ok(Numeric, " nan ", "NaN");
        ok(Numeric, "Infinity", "Infinity");
        ok(Numeric, "+inf", "Infinity");
        ok(Numeric, "-INFINITY", "-Infinity");
        ok(Numeric, "-inf", "-Infinity");
        for bad in [
            "", ".", "-", "e5", "1e", "1e+", "1.2.3", "1 000", "1_000", "0x1f", "1e 5", "abc",
            "-nan", "++1", "1,5", "infinite", "1e5.0",
        ] {
            refused(Numeric, bad, "22P02");
        }
        // The server's limits: the exponent, the digits before the point, the scale.
        refused(Numeric, "1e1000000", "22003");
        refused(Numeric, "1e-1000000", "22003");
        refused(Numeric, "1e99999999999999999999", "22003");
        refused(Numeric, "0e1073741823", "22003");
        let widest = format!("1{}", "0".repeat(131_071));
        assert_eq!(text(Numeric, "1e131071").unwrap(), widest);
        refused(Numeric, "1e131072", "22003");
        refused(Numeric, &format!("{widest}0"), "22003");
        assert_eq!(
            text(Numeric, &format!("0.{}", "0".repeat(16_383))).unwrap(),
            "0"
        );
        refused(Numeric, &format!("0.{}", "0".repeat(16_384)), "22003");
        assert_eq!(
            text(Numeric, "1e-16383").unwrap(),
            format!("0.{}1", "0".repeat(16_382))
        );
        refused(Numeric, "1e-16384", "22003");
        // Leading zeros do not count.
        assert_eq!(
            text(Numeric, &format!("{}1", "0".repeat(200_000))).unwrap(),
            "1"
        );
    }

    #[test]
    fn numeric_binary_matches_what_postgres_sends() {
        // (what a PostgreSQL 15 server sent, its text, what it sends for the canonical
        // text: the same digits with the display scale of the canonical text)
        for (sent, canonical, resent) in [
            (
                "000400000000001108781615157506cc",
                "2168.56535493174",
                "000400000000000b08781615157506cc",
            ),
            (
                "000400004000000a0c3c01f01df4044c",
                "-3132.0496766811",
                "000400004000000a0c3c01f01df4044c",
            ),
            (
                "0005fffe4000001c00031a33023e2506012c",
                "-0.0000000367070574947803",
                "0005fffe4000001600031a33023e2506012c",
            ),
            (
                "0005000440000009000325ef0a8e1eb115e0",
                "-39711270278575600",
                "0005000440000000000325ef0a8e1eb115e0",
            ),
            (
                "0003fffb0000001a00030a4a1068",
                "0.00000000000000000003263442",
                "0003fffb0000001a00030a4a1068",
            ),
            ("0000000000000004", "0", "0000000000000000"),
            ("00000000c0000000", "NaN", "00000000c0000000"),
            ("00000000d0000020", "Infinity", "00000000d0000020"),
            ("00000000f0000020", "-Infinity", "00000000f0000020"),
            ("00000000d0000000", "Infinity", "00000000d0000020"),
        ] {
            assert_eq!(from_binary(Numeric, &hex(sent)).unwrap(), canonical);
            let binary = to_binary(Numeric, canonical);
            assert_eq!(to_hex(&binary), resent, "{canonical}");
            assert_eq!(
                pgtypes::binary_to_text(1700, &binary).as_deref(),
                Some(canonical)
            );
        }
        // 1.5 = [1, 5000] weight 0 scale 1; 10000 = [1] weight 1; 0.00001 = [1000]
        // weight -2 scale 5.
        assert_eq!(
            to_hex(&to_binary(Numeric, "1.5")),
            "000200000000000100011388"
        );
        assert_eq!(to_hex(&to_binary(Numeric, "10000")), "00010001000000000001");
        assert_eq!(
            to_hex(&to_binary(Numeric, "0.00001")),
            "0001fffe0000000503e8"
        );
        // Digits hidden by the display scale are cut, as the server cuts them.
        assert_eq!(
            from_binary(Numeric, &hex("000200000000000100011388")).unwrap(),
            "1.5"
        );
        assert_eq!(
            from_binary(Numeric, &hex("000200000000000000011388")).unwrap(),
            "1"
        );
        for bad in [
            "",
            "0000000000",
            "0001000000000000000a0001",
            "0001000000000000",
            "00010000000000002710",
            "0000000050000000",
            "0000000000004000",
        ] {
            assert_eq!(
                from_binary(Numeric, &hex(bad)).unwrap_err().sqlstate,
                "22P03",
                "{bad}"
            );
        }
        // The widest binary value the format can hold is a valid value.
        let mut widest = hex("80007fff00000000");
        widest.extend_from_slice(&[0x27, 0x0f].repeat(0x8000));
        let canonical = from_binary(Numeric, &widest).unwrap();
        assert_eq!(canonical, "9".repeat(131_072));
        assert_eq!(to_binary(Numeric, &canonical), widest);
    }

    #[test]
    fn numeric_round_trips() {
        let mut random = Random(0x5eed);
        for _ in 0..2000 {
            let integer = random.below(25);
            let fraction = random.below(25);
            let mut input = String::new();
            if random.below(2) == 0 {
                input.push('-');
            }
            input.push_str(&random.digits(integer));
            if fraction > 0 || integer == 0 {
                input.push('.');
                input.push_str(&random.digits(fraction.max(1)));
            }
            if random.below(4) == 0 {
                input.push_str(&format!("e{}", random.below(61) as i64 - 30));
            }
            let canonical = text(Numeric, &input).unwrap();
            // No sign on zero, no leading zeros, no trailing fractional zeros or point.
            let unsigned = canonical.strip_prefix('-').unwrap_or(&canonical);
            assert!(canonical != "-0", "{input}");
            assert!(
                !unsigned.starts_with('0') || unsigned == "0" || unsigned.starts_with("0."),
                "{input} → {canonical}"
            );
            if canonical.contains('.') {
                assert!(!canonical.ends_with(['0', '.']), "{input} → {canonical}");
            }
            let binary = to_binary(Numeric, &canonical);
            assert_eq!(
                pgtypes::binary_to_text(1700, &binary).as_deref(),
                Some(canonical.as_str()),
                "{input}"
            );
            assert_eq!(from_binary(Numeric, &binary).unwrap(), canonical);
            // The same value with more trailing zeros is the same canonical text.
            if input.contains('.') && !input.contains('e') {
                let padded = format!("{input}000");
                assert_eq!(text(Numeric, &padded).unwrap(), canonical, "{padded}");
            }
        }
    }

    #[test]
    fn float8() {
        ok(Float8, "1", "1");
        ok(Float8, "1.0", "1");
        ok(Float8, "1.50", "1.5");
        ok(Float8, "  -2.5e0 ", "-2.5");
        ok(Float8, "1e20", "1e+20");
        ok(Float8, "1E+20", "1e+20");
        ok(Float8, "0.00001", "1e-05");
        ok(Float8, "0.0001", "0.0001");
        ok(Float8, "123456789012345", "123456789012345");
        ok(Float8, "1234567890123456", "1.234567890123456e+15");
        ok(Float8, ".5", "0.5");
        ok(Float8, "5.", "5");
        ok(Float8, "0.1", "0.1");
        ok(Float8, "-0", "-0");
        ok(Float8, "0e5", "0");
        ok(Float8, "NaN", "NaN");
        ok(Float8, "-nan", "NaN");
        ok(Float8, "infinity", "Infinity");
        ok(Float8, "+Inf", "Infinity");
        ok(Float8, "-INFINITY", "-Infinity");
        ok(Float8, "1.7976931348623157e308", "1.7976931348623157e+308");
        ok(Float8, "5e-324", "5e-324");
        refused(Float8, "1e309", "22003");
        refused(Float8, "-1e400", "22003");
        refused(Float8, "1e-400", "22003");
        for bad in [
            "", ".", "e1", "1e", "1e+", "0x10", "1,5", "1.2.3", "nan(1)", "infinit", "1 2", "--1",
            "1_0", "1e1.5",
        ] {
            refused(Float8, bad, "22P02");
        }
        assert_eq!(to_binary(Float8, "1.5"), 1.5f64.to_be_bytes());
        assert_eq!(to_binary(Float8, "-0"), (-0.0f64).to_be_bytes());
        assert_eq!(to_binary(Float8, "NaN"), f64::NAN.to_be_bytes());
        assert_eq!(
            to_binary(Float8, "-Infinity"),
            f64::NEG_INFINITY.to_be_bytes()
        );
        assert_eq!(from_binary(Float8, &0.1f64.to_be_bytes()).unwrap(), "0.1");
        assert_eq!(from_binary(Float8, &[0; 4]).unwrap_err().sqlstate, "22P03");
        // Every float round-trips through its canonical text.
        let mut random = Random(0xf10a7);
        for _ in 0..5000 {
            let value = f64::from_bits(random.next());
            let canonical = from_binary(Float8, &value.to_be_bytes()).unwrap();
            assert_eq!(
                pgtypes::binary_to_text(701, &value.to_be_bytes()).as_deref(),
                Some(canonical.as_str())
            );
            let back = to_binary(Float8, &canonical);
            if value.is_nan() {
                assert!(f64::from_be_bytes(back.try_into().unwrap()).is_nan());
            } else {
                assert_eq!(back, value.to_be_bytes(), "{canonical}");
            }
            assert_eq!(text(Float8, &canonical).unwrap(), canonical);
        }
    }

    #[test]
    fn booleans() {
        for yes in [
            "t", "tr", "TRUE", " true ", "y", "ye", "yes", "on", "ON", "1",
        ] {
            ok(Bool, yes, "t");
        }
        for no in ["f", "fa", "False", "n", "no", "of", "off", "0", "\toff\n"] {
            ok(Bool, no, "f");
        }
        for bad in [
            "", "o", "tru e", "truee", "yess", "onn", "2", "10", "00", "nope",
        ] {
            refused(Bool, bad, "22P02");
        }
        assert_eq!(to_binary(Bool, "t"), vec![1]);
        assert_eq!(to_binary(Bool, "f"), vec![0]);
        assert_eq!(from_binary(Bool, &[0]).unwrap(), "f");
        assert_eq!(from_binary(Bool, &[7]).unwrap(), "t");
        assert_eq!(from_binary(Bool, &[]).unwrap_err().sqlstate, "22P03");
        assert_eq!(from_binary(Bool, &[1, 0]).unwrap_err().sqlstate, "22P03");
    }

    #[test]
    fn dates() {
        ok(Date, "2024-01-01", "2024-01-01");
        ok(Date, " 2024-1-5 ", "2024-01-05");
        ok(Date, "2024-02-29", "2024-02-29");
        ok(Date, "2000-02-29", "2000-02-29");
        ok(Date, "0001-01-01", "0001-01-01");
        ok(Date, "9999-12-31", "9999-12-31");
        ok(Date, "10000-01-01", "10000-01-01");
        ok(Date, "5874897-12-31", "5874897-12-31");
        ok(Date, "infinity", "infinity");
        ok(Date, "-INFINITY", "-infinity");
        ok(Date, "02024-01-01", "2024-01-01");
        ok(Date, "-infinity", "-infinity");
        refused(Date, "5874898-01-01", "22008");
        for bad in [
            "2023-02-29",
            "1900-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-04-31",
            "0000-01-01",
        ] {
            refused(Date, bad, "22008");
        }
        for bad in [
            "",
            "2024",
            "2024-01",
            "24-01-01",
            "2024/01/01",
            "01-02-2024",
            "2024-01-01 BC",
            "2024-001-01",
            "+infinity",
            "2024-01-01 10:00",
            "epoch",
            "today",
            "2024-01-01x",
            "12345678-01-01",
        ] {
            refused(Date, bad, "22007");
        }
        assert_eq!(to_binary(Date, "2000-01-01"), 0i32.to_be_bytes());
        assert_eq!(to_binary(Date, "1999-12-31"), (-1i32).to_be_bytes());
        assert_eq!(
            to_binary(Date, "0001-01-01"),
            (FIRST_DATE as i32).to_be_bytes()
        );
        assert_eq!(
            to_binary(Date, "5874897-12-31"),
            (END_DATE as i32 - 1).to_be_bytes()
        );
        assert_eq!(to_binary(Date, "infinity"), i32::MAX.to_be_bytes());
        assert_eq!(to_binary(Date, "-infinity"), i32::MIN.to_be_bytes());
        assert_eq!(
            from_binary(Date, &i32::MAX.to_be_bytes()).unwrap(),
            "infinity"
        );
        assert_eq!(from_binary(Date, &hex("00001f9f")).unwrap(), "2022-03-01");
        // BC dates and dates past the server's range are refused.
        assert_eq!(
            from_binary(Date, &hex("fff4dbf8")).unwrap_err().sqlstate,
            "22008"
        );
        assert_eq!(
            from_binary(Date, &(FIRST_DATE as i32 - 1).to_be_bytes())
                .unwrap_err()
                .sqlstate,
            "22008"
        );
        assert_eq!(
            from_binary(Date, &(END_DATE as i32).to_be_bytes())
                .unwrap_err()
                .sqlstate,
            "22008"
        );
        assert_eq!(from_binary(Date, &[0; 3]).unwrap_err().sqlstate, "22P03");
        // Every day from year 1 to 3000 and some beyond: text → days → text.
        let mut days = FIRST_DATE as i32;
        while days < 400_000 {
            let canonical = from_binary(Date, &days.to_be_bytes()).unwrap();
            assert_eq!(
                to_binary(Date, &canonical),
                days.to_be_bytes(),
                "{canonical}"
            );
            days += 1;
        }
        let mut random = Random(0xda7e);
        for _ in 0..2000 {
            let days = (FIRST_DATE + random.below((END_DATE - FIRST_DATE) as u64) as i64) as i32;
            let canonical = from_binary(Date, &days.to_be_bytes()).unwrap();
            assert_eq!(
                to_binary(Date, &canonical),
                days.to_be_bytes(),
                "{canonical}"
            );
        }
    }

    #[test]
    fn timestamps() {
        ok(Timestamp, "2024-01-01 10:00", "2024-01-01 10:00:00");
        ok(Timestamp, "2024-01-01T10:00:05", "2024-01-01 10:00:05");
        ok(Timestamp, "2024-01-01", "2024-01-01 00:00:00");
        ok(Timestamp, " 2024-01-01 1:02:03.5 ", "2024-01-01 01:02:03.5");
        ok(
            Timestamp,
            "2024-01-01 10:00:00.123456",
            "2024-01-01 10:00:00.123456",
        );
        ok(
            Timestamp,
            "2024-01-01 10:00:00.000000",
            "2024-01-01 10:00:00",
        );
        ok(
            Timestamp,
            "2024-02-29 23:59:59.999999",
            "2024-02-29 23:59:59.999999",
        );
        // More than six fractional digits: rounded half to even.
        ok(
            Timestamp,
            "2024-01-01 10:00:00.1234565",
            "2024-01-01 10:00:00.123456",
        );
        ok(
            Timestamp,
            "2024-01-01 10:00:00.1234575",
            "2024-01-01 10:00:00.123458",
        );
        ok(
            Timestamp,
            "2024-01-01 10:00:00.12345650001",
            "2024-01-01 10:00:00.123457",
        );
        ok(
            Timestamp,
            "2024-12-31 23:59:59.9999999",
            "2025-01-01 00:00:00",
        );
        // 24:00 and a leap second roll over, as in the server.
        ok(Timestamp, "2024-02-28 24:00:00", "2024-02-29 00:00:00");
        ok(Timestamp, "2024-12-31 23:59:60", "2025-01-01 00:00:00");
        // A zone is ignored for timestamp without time zone, as the server ignores it.
        ok(Timestamp, "2024-01-01 10:00+08", "2024-01-01 10:00:00");
        ok(Timestamp, "0001-01-01 00:00:00", "0001-01-01 00:00:00");
        ok(
            Timestamp,
            "294276-12-31 23:59:59.999999",
            "294276-12-31 23:59:59.999999",
        );
        ok(Timestamp, "infinity", "infinity");
        ok(Timestamp, "-Infinity", "-infinity");
        refused(Timestamp, "+infinity", "22007");
        ok(Timestamp, "2024-01-01+08", "2024-01-01 00:00:00");
        refused(Timestamp, "294277-01-01 00:00:00", "22008");
        for bad in [
            "2024-01-01 25:00",
            "2024-01-01 24:00:01",
            "2024-01-01 10:60",
            "2024-01-01 10:00:61",
            "2024-01-01 23:59:60.5",
            "2023-02-29 10:00",
        ] {
            refused(Timestamp, bad, "22008");
        }
        for bad in [
            "2024-01-01 10",
            "2024-01-01 10:",
            "2024-01-01 10:00:",
            "2024-01-01 10:00:00.",
            "2024-01-01  10:00",
            "2024-01-01x10:00",
            "2024-01-01 100:00",
            "2024-01-01 10:00:00 BC",
            "now",
            "2024-01-01 10:00 Asia/Shanghai",
            "2024-01-01 10:00+",
            "2024-01-01 10:00+123",
        ] {
            refused(Timestamp, bad, "22007");
        }
        refused(Timestamp, "2024-01-01 10:00+16", "22009");
        assert_eq!(
            to_binary(Timestamp, "2000-01-01 00:00:00"),
            0i64.to_be_bytes()
        );
        assert_eq!(
            to_binary(Timestamp, "2000-01-01 00:00:01.5"),
            1_500_000i64.to_be_bytes()
        );
        assert_eq!(
            to_binary(Timestamp, "1999-12-31 23:59:59.999999"),
            (-1i64).to_be_bytes()
        );
        assert_eq!(to_binary(Timestamp, "infinity"), i64::MAX.to_be_bytes());
        assert_eq!(to_binary(Timestamp, "-infinity"), i64::MIN.to_be_bytes());
        assert_eq!(
            from_binary(Timestamp, &hex("fdb362e94b0d1bdd"))
                .unwrap_err()
                .sqlstate,
            "22008"
        );
        assert_eq!(
            from_binary(Timestamp, &(FIRST_TIMESTAMP - 1).to_be_bytes())
                .unwrap_err()
                .sqlstate,
            "22008"
        );
        assert_eq!(
            from_binary(Timestamp, &END_TIMESTAMP.to_be_bytes())
                .unwrap_err()
                .sqlstate,
            "22008"
        );
        assert_eq!(
            from_binary(Timestamp, &[0; 7]).unwrap_err().sqlstate,
            "22P03"
        );
    }

    #[test]
    fn timestamps_with_time_zone() {
        // Equal instants have one canonical text.
        for input in [
            "2024-01-01 10:00+08",
            "2024-01-01 10:00:00+0800",
            "2024-01-01T10:00:00.000+08:00",
            "2024-01-01 02:00:00+00",
            "2024-01-01 02:00:00 +00:00",
            "2024-01-01 02:00:00Z",
            "2024-01-01 02:00:00 UTC",
            "2024-01-01 02:00:00 gmt",
            "2023-12-31 21:30:00-04:30",
            "2024-01-01 05:00:00+03:00:00",
            "2024-01-01 05:00:00+030000",
        ] {
            ok(Timestamptz, input, "2024-01-01 02:00:00+00");
        }
        ok(
            Timestamptz,
            "2024-03-01 01:00:00.25+02",
            "2024-02-29 23:00:00.25+00",
        );
        ok(Timestamptz, "2024-01-01 10:00+8", "2024-01-01 02:00:00+00");
        ok(Timestamptz, "2024-01-01+08", "2023-12-31 16:00:00+00");
        ok(Timestamptz, "2024-01-01 Z", "2024-01-01 00:00:00+00");
        refused(Timestamptz, "2024-01-01-04:30", "22007");
        ok(
            Timestamptz,
            "2024-01-01T10:00:00.5-0130",
            "2024-01-01 11:30:00.5+00",
        );
        ok(Timestamptz, "infinity", "infinity");
        ok(Timestamptz, "-infinity", "-infinity");
        ok(Timestamptz, "0001-01-01 01:00+01", "0001-01-01 00:00:00+00");
        ok(
            Timestamptz,
            "2024-01-01 10:00+15:59:59",
            "2023-12-31 18:00:01+00",
        );
        // A value without an offset would need the session's TimeZone.
        let error = text(Timestamptz, "2024-01-01 10:00:00").unwrap_err();
        assert_eq!(error.sqlstate, "22007");
        assert!(error.message.contains("UTC offset"), "{error}");
        refused(Timestamptz, "2024-01-01", "22007");
        refused(Timestamptz, "2024-01-01 10:00 CST", "22007");
        refused(Timestamptz, "2024-01-01 10:00 Asia/Shanghai", "22007");
        refused(Timestamptz, "2024-01-01 10:00+08:00:00:00", "22007");
        refused(Timestamptz, "2024-01-01 10:00+08:0a", "22007");
        refused(Timestamptz, "2024-01-01 10:00+16", "22009");
        refused(Timestamptz, "2024-01-01 10:00+08:60", "22009");
        // Before year 1 in UTC.
        refused(Timestamptz, "0001-01-01 00:30+01", "22008");
        refused(Timestamptz, "294276-12-31 23:30:00-01", "22008");
        assert_eq!(
            to_binary(Timestamptz, "2000-01-01 08:00:00+08"),
            0i64.to_be_bytes()
        );
        assert_eq!(
            from_binary(Timestamptz, &hex("4f78d50235e87865")).unwrap(),
            "183467-07-01 17:27:52.664165+00"
        );
        assert_eq!(
            from_binary(Timestamptz, &i64::MIN.to_be_bytes()).unwrap(),
            "-infinity"
        );
    }

    #[test]
    fn timestamps_round_trip_and_agree_with_pgtypes() {
        let mut random = Random(0x7157);
        for _ in 0..5000 {
            let span = (i128::from(END_TIMESTAMP) - i128::from(FIRST_TIMESTAMP)) as u64;
            let micros = (i128::from(FIRST_TIMESTAMP) + i128::from(random.next() % span)) as i64;
            // Many values on whole seconds, which print without a fraction.
            let micros = if random.below(3) == 0 {
                micros - micros.rem_euclid(USECS_PER_SEC)
            } else {
                micros
            };
            for ty in [Timestamp, Timestamptz] {
                let canonical = from_binary(ty, &micros.to_be_bytes()).unwrap();
                assert_eq!(
                    pgtypes::binary_to_text(ty.oid(), &micros.to_be_bytes()).as_deref(),
                    Some(canonical.as_str())
                );
                assert_eq!(
                    to_binary(ty, &canonical),
                    micros.to_be_bytes(),
                    "{canonical}"
                );
                assert_eq!(text(ty, &canonical).unwrap(), canonical);
            }
            // The same instant written with an offset.
            let canonical = from_binary(Timestamptz, &micros.to_be_bytes()).unwrap();
            if micros < END_TIMESTAMP - 10 * 3_600 * USECS_PER_SEC {
                let local = from_binary(
                    Timestamp,
                    &(micros + 5 * 3_600 * USECS_PER_SEC + 30 * 60 * USECS_PER_SEC).to_be_bytes(),
                )
                .unwrap();
                assert_eq!(
                    text(Timestamptz, &format!("{local}+05:30")).unwrap(),
                    canonical
                );
            }
        }
    }

    #[test]
    fn text_and_bytea() {
        ok(Text, "", "");
        ok(Text, " 张三 ", " 张三 ");
        ok(Varchar, "a\tb\nc", "a\tb\nc");
        for ty in [Text, Varchar] {
            assert_eq!(
                canonical_from_text(ty, b"\xff\xfe").unwrap_err().sqlstate,
                "22021"
            );
            assert_eq!(
                canonical_from_text(ty, b"a\0b").unwrap_err().sqlstate,
                "22021"
            );
            assert_eq!(
                canonical_from_binary(ty, "张".as_bytes()).unwrap(),
                "张".as_bytes()
            );
            assert_eq!(
                canonical_from_binary(ty, b"\xe5\xbc").unwrap_err().sqlstate,
                "22021"
            );
            assert_eq!(binary_from_canonical(ty, b"abc").unwrap(), b"abc");
        }
        ok(Bytea, "\\x", "\\x");
        ok(Bytea, "\\xDEADbeef", "\\xdeadbeef");
        ok(Bytea, "\\xde ad\nbe\tef\r", "\\xdeadbeef");
        // Escape format.
        ok(Bytea, "abc", "\\x616263");
        ok(Bytea, "", "\\x");
        ok(Bytea, "a\\\\b\\000\\377", "\\x615c6200ff");
        ok(Bytea, " x", "\\x2078");
        refused(Bytea, "\\xabc", "22023");
        refused(Bytea, "\\xzz", "22023");
        refused(Bytea, "\\x a b", "22023");
        refused(Bytea, "\\X00", "22P02");
        refused(Bytea, "a\\b", "22P02");
        refused(Bytea, "\\400", "22P02");
        refused(Bytea, "\\12", "22P02");
        refused(Bytea, "trailing\\", "22P02");
        assert_eq!(
            to_binary(Bytea, "\\xdeadbeef"),
            vec![0xde, 0xad, 0xbe, 0xef]
        );
        assert_eq!(from_binary(Bytea, &[0, 0x5c, 0xff]).unwrap(), "\\x005cff");
        assert_eq!(from_binary(Bytea, &[]).unwrap(), "\\x");
        let mut random = Random(0xb17e);
        for _ in 0..500 {
            let bytes: Vec<u8> = (0..random.below(40)).map(|_| random.next() as u8).collect();
            let canonical = from_binary(Bytea, &bytes).unwrap();
            assert_eq!(
                pgtypes::binary_to_text(17, &bytes).as_deref(),
                Some(canonical.as_str())
            );
            assert_eq!(to_binary(Bytea, &canonical), bytes);
        }
    }

    #[test]
    fn errors_never_show_the_value() {
        let secret = "S3CR3T-110105199001011234";
        for ty in ALL {
            for input in [
                secret.to_string(),
                format!("{secret}\u{0}"),
                format!("2024-01-01 {secret}"),
                format!("1e{secret}"),
                format!("\\x{secret}"),
                format!("\\{secret}"),
            ] {
                for result in [
                    canonical_from_text(ty, input.as_bytes()),
                    binary_from_canonical(ty, input.as_bytes()),
                    canonical_from_binary(ty, input.as_bytes()),
                ] {
                    if let Err(error) = result {
                        assert!(!error.message.contains("S3CR3T"), "{error}");
                        assert!(!error.message.contains("1234"), "{error}");
                        assert!(!format!("{error:?}").contains("S3CR3T"));
                    }
                }
            }
        }
    }

    /// Arbitrary bytes, and every prefix of valid values, never panic; whatever is
    /// accepted gives a canonical text that is a fixed point and converts to binary and
    /// back.
    #[test]
    fn arbitrary_input_never_panics() {
        let samples = [
            "-12345",
            "1.2345e-3",
            "  +Infinity ",
            "2024-02-29 23:59:59.9999995+05:30",
            "\\xdeadbeef",
            "a\\\\b\\000",
            "true",
            "294276-12-31 23:59:59.999999",
            "1e131071",
        ];
        let alphabet = b"0123456789+-.:eEtTxX \\Zinfa\xff\x00";
        let mut random = Random(0xfa22);
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for sample in samples {
            for end in 0..=sample.len() {
                inputs.push(sample.as_bytes()[..end].to_vec());
                inputs.push(sample.as_bytes()[end..].to_vec());
            }
        }
        for _ in 0..3000 {
            let len = random.below(24) as usize;
            inputs.push(
                (0..len)
                    .map(|_| {
                        if random.below(4) == 0 {
                            random.next() as u8
                        } else {
                            alphabet[random.below(alphabet.len() as u64) as usize]
                        }
                    })
                    .collect(),
            );
        }
        for input in &inputs {
            for ty in ALL {
                if let Ok(canonical) = canonical_from_text(ty, input) {
                    assert_eq!(canonical_from_text(ty, &canonical).as_ref(), Ok(&canonical));
                    let binary = binary_from_canonical(ty, &canonical).unwrap();
                    assert_eq!(
                        canonical_from_binary(ty, &binary).as_ref(),
                        Ok(&canonical),
                        "{ty:?} {input:?}"
                    );
                }
                let _ = binary_from_canonical(ty, input);
                if let Ok(canonical) = canonical_from_binary(ty, input) {
                    let binary = binary_from_canonical(ty, &canonical).unwrap();
                    assert_eq!(
                        canonical_from_binary(ty, &binary).as_ref(),
                        Ok(&canonical),
                        "{ty:?} {input:?}"
                    );
                }
            }
        }
    }
}
