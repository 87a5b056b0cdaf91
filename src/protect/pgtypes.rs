//! PostgreSQL binary-format values turned into the text PostgreSQL would have sent, so
//! that a column a client asked for in binary format can still be masked.
//!
//! Text output follows the server defaults: `DateStyle` ISO, `bytea_output` hex,
//! timestamps with time zone shown in UTC (`+00`), `extra_float_digits` 1 (shortest
//! round-trip floats). Text-like values are returned as they came, which is only right
//! for a UTF-8 client encoding; other bytes are refused rather than guessed at.
//!
//! This module must never panic on input and never produce a text for a value it cannot
//! decode exactly: `None` means "unsupported or malformed", and the caller must then
//! treat the value as unmaskable (fail closed), never pass it through.

use std::fmt::Write as _;

const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const CHAR: u32 = 18;
const NAME: u32 = 19;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const UNKNOWN: u32 = 705;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;
const UUID: u32 = 2950;
const JSONB: u32 = 3802;

/// Whether values of this type are character strings whose binary format is their text.
pub fn is_text_like(type_oid: u32) -> bool {
    matches!(type_oid, TEXT | VARCHAR | BPCHAR | NAME | CHAR | UNKNOWN)
}

/// The text format of a binary-format value of type `type_oid` (never NULL: the caller
/// handles NULL), or `None` when the type is not supported or the value is malformed.
pub fn binary_to_text(type_oid: u32, value: &[u8]) -> Option<String> {
    match type_oid {
        CHAR => char_text(value),
        TEXT | VARCHAR | BPCHAR | NAME | UNKNOWN | JSON => utf8(value),
        JSONB => match value.split_first() {
            // Version 1 is the only jsonb binary format; a later one may not be text.
            Some((1, text)) => utf8(text),
            _ => None,
        },
        BOOL => match value {
            // The server reads any non-zero byte as true, and so do we.
            [0] => Some("f".to_string()),
            [_] => Some("t".to_string()),
            _ => None,
        },
        INT2 => Some(i16::from_be_bytes(value.try_into().ok()?).to_string()),
        INT4 => Some(i32::from_be_bytes(value.try_into().ok()?).to_string()),
        INT8 => Some(i64::from_be_bytes(value.try_into().ok()?).to_string()),
        OID => Some(u32::from_be_bytes(value.try_into().ok()?).to_string()),
        FLOAT4 => {
            let v = f32::from_be_bytes(value.try_into().ok()?);
            float_text(
                v.is_nan(),
                v.is_infinite(),
                v.is_sign_negative(),
                v == 0.0,
                &format!("{:e}", v.abs()),
                FLOAT4_MAX_FIXED_EXPONENT,
            )
        }
        FLOAT8 => {
            let v = f64::from_be_bytes(value.try_into().ok()?);
            float_text(
                v.is_nan(),
                v.is_infinite(),
                v.is_sign_negative(),
                v == 0.0,
                &format!("{:e}", v.abs()),
                FLOAT8_MAX_FIXED_EXPONENT,
            )
        }
        NUMERIC => numeric_text(value),
        DATE => date_text(value),
        TIMESTAMP => timestamp_text(value, false),
        TIMESTAMPTZ => timestamp_text(value, true),
        UUID => uuid_text(value),
        BYTEA => {
            let mut text = String::with_capacity(2 + 2 * value.len());
            text.push_str("\\x");
            push_hex(&mut text, value);
            Some(text)
        }
        _ => None,
    }
}

fn utf8(value: &[u8]) -> Option<String> {
    std::str::from_utf8(value).ok().map(str::to_string)
}

fn push_hex(text: &mut String, bytes: &[u8]) {
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(text, "{byte:02x}");
    }
}

/// `"char"` is one byte; the server prints bytes with the high bit set as `\ooo` octal
/// (they are not characters in any encoding on their own) and a zero byte as "".
fn char_text(value: &[u8]) -> Option<String> {
    let [byte] = value else {
        return None;
    };
    Some(match *byte {
        0 => String::new(),
        0x80.. => format!("\\{byte:03o}"),
        _ => char::from(*byte).to_string(),
    })
}

/// Largest decimal exponent printed without an exponent, as C's `%g` with FLT_DIG and
/// DBL_DIG significant digits; PostgreSQL's shortest float output uses these thresholds.
const FLOAT4_MAX_FIXED_EXPONENT: i32 = 5;
const FLOAT8_MAX_FIXED_EXPONENT: i32 = 14;

/// Formats a float in PostgreSQL's layout for `extra_float_digits` > 0: `1e+20`,
/// `1.5e-05`, and plain decimals for exponents from -4 to the type's limit.
///
/// The digits are Rust's shortest round-trip digits (`{:e}` of the absolute value).
/// PostgreSQL's Ryu port picks the same digits except in rare boundary cases (about 1%
/// of random values, always in the last digit): it never uses a decimal lying exactly
/// halfway to a neighbouring float, and breaks exact ties to even where Rust rounds up.
/// Both texts read back to the same float; matching bit for bit would need an exact
/// shortest-digit search of our own, which masking does not justify.
fn float_text(
    nan: bool,
    infinite: bool,
    negative: bool,
    zero: bool,
    scientific: &str,
    max_fixed_exponent: i32,
) -> Option<String> {
    if nan {
        return Some("NaN".to_string());
    }
    let mut text = String::new();
    if negative {
        text.push('-');
    }
    if infinite {
        text.push_str("Infinity");
        return Some(text);
    }
    if zero {
        text.push('0');
        return Some(text);
    }
    let (mantissa, exponent) = scientific.split_once('e')?;
    let exponent: i32 = exponent.parse().ok()?;
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if (-4..=max_fixed_exponent).contains(&exponent) {
        if exponent < 0 {
            text.push_str("0.");
            for _ in 0..(-exponent - 1) {
                text.push('0');
            }
            text.push_str(&digits);
        } else {
            let integer_len = usize::try_from(exponent).ok()? + 1;
            if digits.len() <= integer_len {
                text.push_str(&digits);
                for _ in digits.len()..integer_len {
                    text.push('0');
                }
            } else {
                let (integer, fraction) = digits.split_at(integer_len);
                text.push_str(integer);
                text.push('.');
                text.push_str(fraction);
            }
        }
    } else {
        let (first, rest) = digits.split_at(1);
        text.push_str(first);
        if !rest.is_empty() {
            text.push('.');
            text.push_str(rest);
        }
        let sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(text, "e{sign}{:02}", exponent.unsigned_abs());
    }
    Some(text)
}

/// Sign words of the numeric binary format.
const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
/// Display scale bits; the server refuses a scale with other bits set.
const NUMERIC_DSCALE_MASK: u16 = 0x3FFF;
/// Numeric digits are base 10,000: four decimal digits each.
const NBASE: i16 = 10_000;

/// numeric: `ndigits` u16, `weight` i16 (base-10,000 exponent of the first digit),
/// `sign` u16, `dscale` u16 (decimal digits after the point), then the digits.
fn numeric_text(value: &[u8]) -> Option<String> {
    let header = value.get(..8)?;
    let word = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*header.get(at)?, *header.get(at + 1)?]))
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(i16::from_be_bytes(word(2)?.to_be_bytes()));
    let sign = word(4)?;
    let dscale = word(6)?;
    let body = value.get(8..)?;
    if body.len() != 2 * ndigits {
        return None;
    }
    match sign {
        NUMERIC_NAN => return Some("NaN".to_string()),
        NUMERIC_PINF => return Some("Infinity".to_string()),
        NUMERIC_NINF => return Some("-Infinity".to_string()),
        NUMERIC_POS | NUMERIC_NEG => {}
        _ => return None,
    }
    if dscale & NUMERIC_DSCALE_MASK != dscale {
        return None;
    }
    let mut digits = Vec::with_capacity(ndigits);
    for pair in body.chunks_exact(2) {
        let digit = i16::from_be_bytes([pair[0], pair[1]]);
        if !(0..NBASE).contains(&digit) {
            return None;
        }
        digits.push(digit);
    }
    // Positions outside the stored digits are zeros (the server strips them).
    let digit_at = |position: i32| -> i16 {
        usize::try_from(position)
            .ok()
            .and_then(|p| digits.get(p).copied())
            .unwrap_or(0)
    };

    let mut text = String::new();
    let mut position = 0;
    if weight < 0 {
        text.push('0');
    } else {
        while position <= weight {
            let digit = digit_at(position);
            // Only the first group drops its leading zeros.
            let _ = if position == 0 {
                write!(text, "{digit}")
            } else {
                write!(text, "{digit:04}")
            };
            position += 1;
        }
    }
    let dscale = usize::from(dscale);
    if dscale > 0 {
        text.push('.');
        let mut fraction = String::with_capacity(dscale + 4);
        position = weight + 1;
        while fraction.len() < dscale {
            let _ = write!(fraction, "{:04}", digit_at(position));
            position += 1;
        }
        // Digits beyond the display scale are cut off, not rounded, as the server
        // truncates a received value to its dscale.
        fraction.truncate(dscale);
        text.push_str(&fraction);
    }
    // A value that shows as zero is zero, and the server never prints "-0".
    if sign == NUMERIC_NEG && text.bytes().any(|b| matches!(b, b'1'..=b'9')) {
        text.insert(0, '-');
    }
    Some(text)
}

/// Days from 0000-03-01 (proleptic Gregorian, astronomical years) to 2000-01-01, the
/// PostgreSQL epoch: five 400-year cycles minus January and the leap February of 2000.
const EPOCH_FROM_MARCH_YEAR_ZERO: i64 = 5 * DAYS_PER_400_YEARS - 60;
const DAYS_PER_400_YEARS: i64 = 146_097;
/// Dates the server accepts: from Julian day 0 (4714-11-24 BC) up to, not including,
/// 5874898-01-01, as days since 2000-01-01.
const MIN_DATE: i64 = -2_451_545;
const END_DATE: i64 = 2_145_031_949;
const USECS_PER_DAY: i64 = 86_400_000_000;
/// Timestamps the server accepts: 4714-11-24 BC up to, not including, 294277-01-01.
const MIN_TIMESTAMP: i64 = MIN_DATE * USECS_PER_DAY;
const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;

/// Converts days since 2000-01-01 to (astronomical year, month, day).
///
/// Counting from a 1 March makes the leap day the last day of a year, so every cycle
/// (400, 100, 4 and 1 years) has its optional extra day at its very end.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + EPOCH_FROM_MARCH_YEAR_ZERO;
    let cycles = shifted.div_euclid(DAYS_PER_400_YEARS);
    let mut rest = shifted.rem_euclid(DAYS_PER_400_YEARS);
    // The last century of a cycle is a day longer; cap so its leap day stays in it.
    let centuries = (rest / 36_524).min(3);
    rest -= centuries * 36_524;
    let quads = rest / 1_461;
    rest -= quads * 1_461;
    let years = (rest / 365).min(3);
    rest -= years * 365;
    let mut year = cycles * 400 + centuries * 100 + quads * 4 + years;
    // March to January: the year's months from March; February takes what is left.
    const MONTHS_FROM_MARCH: [(u32, i64); 11] = [
        (3, 31),
        (4, 30),
        (5, 31),
        (6, 30),
        (7, 31),
        (8, 31),
        (9, 30),
        (10, 31),
        (11, 30),
        (12, 31),
        (1, 31),
    ];
    let mut month = 2;
    for (candidate, length) in MONTHS_FROM_MARCH {
        if rest < length {
            month = candidate;
            break;
        }
        rest -= length;
    }
    if month <= 2 {
        year += 1;
    }
    // rest < 31 here, so the conversion cannot fail.
    let day = u32::try_from(rest + 1).unwrap_or(1);
    (year, month, day)
}

/// `YYYY-MM-DD`, and whether the year is BC (astronomical year 0 is 1 BC).
fn push_date(text: &mut String, days: i64) -> bool {
    let (year, month, day) = civil_from_days(days);
    let (shown, bc) = if year > 0 {
        (year, false)
    } else {
        (1 - year, true)
    };
    let _ = write!(text, "{shown:04}-{month:02}-{day:02}");
    bc
}

fn date_text(value: &[u8]) -> Option<String> {
    let days = i32::from_be_bytes(value.try_into().ok()?);
    match days {
        i32::MAX => return Some("infinity".to_string()),
        i32::MIN => return Some("-infinity".to_string()),
        _ => {}
    }
    let days = i64::from(days);
    if !(MIN_DATE..END_DATE).contains(&days) {
        return None;
    }
    let mut text = String::with_capacity(16);
    if push_date(&mut text, days) {
        text.push_str(" BC");
    }
    Some(text)
}

fn timestamp_text(value: &[u8], with_time_zone: bool) -> Option<String> {
    let micros = i64::from_be_bytes(value.try_into().ok()?);
    match micros {
        i64::MAX => return Some("infinity".to_string()),
        i64::MIN => return Some("-infinity".to_string()),
        _ => {}
    }
    if !(MIN_TIMESTAMP..END_TIMESTAMP).contains(&micros) {
        return None;
    }
    let days = micros.div_euclid(USECS_PER_DAY);
    let time = micros.rem_euclid(USECS_PER_DAY);
    let mut text = String::with_capacity(40);
    let bc = push_date(&mut text, days);
    let seconds = time / 1_000_000;
    let fraction = time % 1_000_000;
    let _ = write!(
        text,
        " {:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    );
    if fraction != 0 {
        let digits = format!("{fraction:06}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    if with_time_zone {
        text.push_str("+00");
    }
    // The era comes after the time zone in PostgreSQL's ISO output.
    if bc {
        text.push_str(" BC");
    }
    Some(text)
}

fn uuid_text(value: &[u8]) -> Option<String> {
    let bytes: &[u8; 16] = value.try_into().ok()?;
    let mut text = String::with_capacity(36);
    for (group, range) in [0..4, 4..6, 6..8, 8..10, 10..16].into_iter().enumerate() {
        if group > 0 {
            text.push('-');
        }
        push_hex(&mut text, &bytes[range]);
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(type_oid: u32, value: &[u8]) -> Option<String> {
        binary_to_text(type_oid, value)
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn text_like_types() {
        for oid in [TEXT, VARCHAR, BPCHAR, NAME, CHAR, UNKNOWN] {
            assert!(is_text_like(oid), "{oid}");
        }
        for oid in [BOOL, INT4, JSON, JSONB, BYTEA, NUMERIC, 0] {
            assert!(!is_text_like(oid), "{oid}");
        }
        for oid in [TEXT, VARCHAR, BPCHAR, NAME, UNKNOWN, JSON] {
            assert_eq!(text(oid, b"hello"), some("hello"));
            assert_eq!(text(oid, "张三丰".as_bytes()), some("张三丰"));
            assert_eq!(text(oid, b""), some(""));
            assert_eq!(text(oid, &[0xff, 0xfe]), None);
        }
    }

    #[test]
    fn char_type() {
        assert_eq!(text(CHAR, b"a"), some("a"));
        assert_eq!(text(CHAR, &[0]), some(""));
        assert_eq!(text(CHAR, &[0x80]), some("\\200"));
        assert_eq!(text(CHAR, &[0xff]), some("\\377"));
        assert_eq!(text(CHAR, b""), None);
        assert_eq!(text(CHAR, b"ab"), None);
    }

    #[test]
    fn jsonb_needs_version_1() {
        assert_eq!(text(JSONB, b"\x01{\"a\": 1}"), some("{\"a\": 1}"));
        assert_eq!(text(JSONB, b"\x02{}"), None);
        assert_eq!(text(JSONB, b""), None);
        assert_eq!(text(JSONB, b"\x01\xff"), None);
    }

    #[test]
    fn booleans() {
        assert_eq!(text(BOOL, &[1]), some("t"));
        assert_eq!(text(BOOL, &[0]), some("f"));
        assert_eq!(text(BOOL, &[2]), some("t"));
        assert_eq!(text(BOOL, &[]), None);
        assert_eq!(text(BOOL, &[1, 0]), None);
    }

    #[test]
    fn integers() {
        assert_eq!(text(INT2, &(-2i16).to_be_bytes()), some("-2"));
        assert_eq!(text(INT2, &i16::MIN.to_be_bytes()), some("-32768"));
        assert_eq!(text(INT4, &123_456i32.to_be_bytes()), some("123456"));
        assert_eq!(text(INT4, &i32::MIN.to_be_bytes()), some("-2147483648"));
        assert_eq!(
            text(INT8, &i64::MIN.to_be_bytes()),
            some("-9223372036854775808")
        );
        assert_eq!(text(OID, &u32::MAX.to_be_bytes()), some("4294967295"));
        assert_eq!(text(INT2, &[0, 0, 0]), None);
        assert_eq!(text(INT4, &[0, 0]), None);
        assert_eq!(text(INT8, &[0; 4]), None);
        assert_eq!(text(OID, &[0; 8]), None);
    }

    fn float4(v: f32) -> Option<String> {
        text(FLOAT4, &v.to_be_bytes())
    }

    fn float8(v: f64) -> Option<String> {
        text(FLOAT8, &v.to_be_bytes())
    }

    // Expected texts are what PostgreSQL 15 prints for the same values (see
    // `float_text` for the rare last-digit cases where the two differ).
    #[test]
    fn float4_like_postgres() {
        assert_eq!(float4(1.5), some("1.5"));
        assert_eq!(float4(-2.25), some("-2.25"));
        assert_eq!(float4(0.1), some("0.1"));
        assert_eq!(float4(100_000.0), some("100000"));
        assert_eq!(float4(1_000_000.0), some("1e+06"));
        assert_eq!(float4(1_234_567.0), some("1.234567e+06"));
        assert_eq!(float4(0.0001), some("0.0001"));
        assert_eq!(float4(0.00001), some("1e-05"));
        assert_eq!(float4(f32::MAX), some("3.4028235e+38"));
        assert_eq!(float4(0.0), some("0"));
        assert_eq!(float4(-0.0), some("-0"));
        assert_eq!(float4(f32::NAN), some("NaN"));
        assert_eq!(float4(f32::INFINITY), some("Infinity"));
        assert_eq!(float4(f32::NEG_INFINITY), some("-Infinity"));
        assert_eq!(text(FLOAT4, &[0; 8]), None);
    }

    #[test]
    fn float8_like_postgres() {
        assert_eq!(float8(0.1), some("0.1"));
        assert_eq!(float8(-2.5), some("-2.5"));
        assert_eq!(float8(1e14), some("100000000000000"));
        assert_eq!(float8(1e15), some("1e+15"));
        assert_eq!(
            float8(123_456_789_012_345_680.0),
            some("1.2345678901234568e+17")
        );
        assert_eq!(float8(1.5e-5), some("1.5e-05"));
        assert_eq!(float8(0.000123), some("0.000123"));
        assert_eq!(float8(1e300), some("1e+300"));
        assert_eq!(float8(5e-324), some("5e-324"));
        assert_eq!(float8(std::f64::consts::PI), some("3.141592653589793"));
        assert_eq!(float8(-0.0), some("-0"));
        assert_eq!(float8(f64::NAN), some("NaN"));
        assert_eq!(float8(f64::NEG_INFINITY), some("-Infinity"));
        assert_eq!(text(FLOAT8, &[0; 4]), None);
    }

    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(digits.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&weight.to_be_bytes());
        bytes.extend_from_slice(&sign.to_be_bytes());
        bytes.extend_from_slice(&dscale.to_be_bytes());
        for digit in digits {
            bytes.extend_from_slice(&digit.to_be_bytes());
        }
        bytes
    }

    fn num(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Option<String> {
        text(NUMERIC, &numeric(weight, sign, dscale, digits))
    }

    #[test]
    fn numerics() {
        assert_eq!(num(0, NUMERIC_POS, 0, &[]), some("0"));
        assert_eq!(num(0, NUMERIC_POS, 2, &[]), some("0.00"));
        assert_eq!(num(0, NUMERIC_POS, 0, &[42]), some("42"));
        assert_eq!(num(0, NUMERIC_POS, 2, &[123, 4500]), some("123.45"));
        assert_eq!(num(0, NUMERIC_NEG, 2, &[123, 4500]), some("-123.45"));
        assert_eq!(num(0, NUMERIC_POS, 3, &[1, 5000]), some("1.500"));
        assert_eq!(num(0, NUMERIC_POS, 6, &[1, 5000]), some("1.500000"));
        assert_eq!(num(-1, NUMERIC_POS, 5, &[1, 2000]), some("0.00012"));
        assert_eq!(num(-1, NUMERIC_NEG, 5, &[1, 2000]), some("-0.00012"));
        assert_eq!(num(-2, NUMERIC_POS, 8, &[1]), some("0.00000001"));
        assert_eq!(num(1, NUMERIC_POS, 0, &[1]), some("10000"));
        assert_eq!(num(5, NUMERIC_POS, 0, &[1]), some("100000000000000000000"));
        assert_eq!(
            num(1, NUMERIC_NEG, 1, &[1234, 5678, 9000]),
            some("-12345678.9")
        );
        assert_eq!(num(1, NUMERIC_POS, 0, &[1, 2]), some("10002"));
        assert_eq!(num(0, NUMERIC_POS, 1, &[0, 9]), some("0.0"));
    }

    #[test]
    fn numeric_sign_of_zero_and_truncation() {
        assert_eq!(num(0, NUMERIC_NEG, 2, &[]), some("0.00"));
        // Digits beyond dscale are cut off, and what shows as zero has no sign.
        assert_eq!(num(-2, NUMERIC_NEG, 2, &[5]), some("0.00"));
        assert_eq!(num(0, NUMERIC_POS, 1, &[1, 9999]), some("1.9"));
    }

    #[test]
    fn numeric_special_values() {
        assert_eq!(num(0, NUMERIC_NAN, 0, &[]), some("NaN"));
        assert_eq!(num(0, NUMERIC_PINF, 0, &[]), some("Infinity"));
        assert_eq!(num(0, NUMERIC_NINF, 0, &[]), some("-Infinity"));
    }

    #[test]
    fn malformed_numerics() {
        assert_eq!(text(NUMERIC, &[]), None);
        assert_eq!(text(NUMERIC, &[0; 7]), None);
        let mut short = numeric(0, NUMERIC_POS, 0, &[1, 2]);
        short.pop();
        assert_eq!(text(NUMERIC, &short), None);
        let mut long = numeric(0, NUMERIC_POS, 0, &[1]);
        long.extend_from_slice(&[0, 0]);
        assert_eq!(text(NUMERIC, &long), None);
        assert_eq!(num(0, NUMERIC_POS, 0, &[10_000]), None);
        assert_eq!(num(0, NUMERIC_POS, 0, &[-1]), None);
        assert_eq!(num(0, 0x1234, 0, &[1]), None);
        assert_eq!(num(0, NUMERIC_POS, 0x4000, &[1]), None);
    }

    #[test]
    fn numeric_extremes_stay_bounded() {
        let wide = num(i16::MAX, NUMERIC_POS, NUMERIC_DSCALE_MASK, &[9999]).unwrap();
        assert_eq!(wide.len(), 4 * 32_768 + 1 + 16_383);
        let tiny = num(i16::MIN, NUMERIC_POS, NUMERIC_DSCALE_MASK, &[1]).unwrap();
        assert!(tiny.starts_with("0.000") && !tiny.contains('1'));
    }

    fn date(days: i32) -> Option<String> {
        text(DATE, &days.to_be_bytes())
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), some("2000-01-01"));
        assert_eq!(date(-1), some("1999-12-31"));
        assert_eq!(date(59), some("2000-02-29"));
        assert_eq!(date(366), some("2001-01-01"));
        assert_eq!(date(-10_957), some("1970-01-01"));
        assert_eq!(date(-36_465), some("1900-03-01"));
        assert_eq!(date(-36_466), some("1900-02-28"));
        assert_eq!(date(9_132), some("2025-01-01"));
        assert_eq!(date(i32::MAX), some("infinity"));
        assert_eq!(date(i32::MIN), some("-infinity"));
        assert_eq!(text(DATE, &[0; 3]), None);
        assert_eq!(text(DATE, &[0; 8]), None);
    }

    #[test]
    fn dates_bc_and_limits() {
        assert_eq!(date(-730_119), some("0001-01-01"));
        assert_eq!(date(-730_120), some("0001-12-31 BC"));
        // 1 BC is a leap year in the proleptic Gregorian calendar.
        assert_eq!(date(-730_120 - 306), some("0001-02-29 BC"));
        assert_eq!(date(-2_451_545), some("4714-11-24 BC"));
        assert_eq!(date(-2_451_546), None);
        assert_eq!(date(2_145_031_948), some("5874897-12-31"));
        assert_eq!(date(2_145_031_949), None);
    }

    fn timestamp(micros: i64) -> Option<String> {
        text(TIMESTAMP, &micros.to_be_bytes())
    }

    fn timestamptz(micros: i64) -> Option<String> {
        text(TIMESTAMPTZ, &micros.to_be_bytes())
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), some("2000-01-01 00:00:00"));
        assert_eq!(timestamp(1_500_000), some("2000-01-01 00:00:01.5"));
        assert_eq!(timestamp(123_456), some("2000-01-01 00:00:00.123456"));
        assert_eq!(timestamp(-1), some("1999-12-31 23:59:59.999999"));
        assert_eq!(
            timestamp(-10_957 * USECS_PER_DAY + 45_296_000_000),
            some("1970-01-01 12:34:56")
        );
        assert_eq!(timestamp(i64::MAX), some("infinity"));
        assert_eq!(timestamp(i64::MIN), some("-infinity"));
        assert_eq!(timestamp(MIN_TIMESTAMP), some("4714-11-24 00:00:00 BC"));
        assert_eq!(timestamp(MIN_TIMESTAMP - 1), None);
        assert_eq!(
            timestamp(END_TIMESTAMP - 1),
            some("294276-12-31 23:59:59.999999")
        );
        assert_eq!(timestamp(END_TIMESTAMP), None);
        assert_eq!(text(TIMESTAMP, &[0; 4]), None);
    }

    #[test]
    fn timestamps_with_time_zone_are_utc() {
        assert_eq!(timestamptz(0), some("2000-01-01 00:00:00+00"));
        assert_eq!(timestamptz(-1), some("1999-12-31 23:59:59.999999+00"));
        assert_eq!(
            timestamptz(-730_120 * USECS_PER_DAY + 1),
            some("0001-12-31 00:00:00.000001+00 BC")
        );
        assert_eq!(timestamptz(i64::MAX), some("infinity"));
        assert_eq!(text(TIMESTAMPTZ, &[0; 9]), None);
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
            .collect()
    }

    /// Binary values and their text output taken from a PostgreSQL 15 server
    /// (`numeric_send(x)`, `date_send(x)`, ... next to `x::text`).
    #[test]
    fn values_sent_by_postgres() {
        for (oid, binary, expected) in [
            (
                NUMERIC,
                "000400000000001108781615157506cc",
                "2168.56535493174000000",
            ),
            (
                NUMERIC,
                "000400004000000a0c3c01f01df4044c",
                "-3132.0496766811",
            ),
            (
                NUMERIC,
                "0005fffe4000001c00031a33023e2506012c",
                "-0.0000000367070574947803000000",
            ),
            (
                NUMERIC,
                "0005000440000009000325ef0a8e1eb115e0",
                "-39711270278575600.000000000",
            ),
            (
                NUMERIC,
                "0003fffb0000001a00030a4a1068",
                "0.00000000000000000003263442",
            ),
            (NUMERIC, "0000000000000004", "0.0000"),
            (DATE, "ffe3ea8e", "3041-11-20 BC"),
            (DATE, "fff4dbf8", "0001-12-31 BC"),
            (
                TIMESTAMP,
                "fdb362e94b0d1bdd",
                "3252-10-23 07:47:23.475933 BC",
            ),
            (
                TIMESTAMPTZ,
                "4f78d50235e87865",
                "183467-07-01 17:27:52.664165+00",
            ),
            (CHAR, "80", "\\200"),
        ] {
            assert_eq!(text(oid, &hex(binary)), some(expected), "{binary}");
        }
    }

    #[test]
    fn uuids_bytea_and_unsupported() {
        let uuid: Vec<u8> = (0u8..16).map(|b| b * 17).collect();
        assert_eq!(
            text(UUID, &uuid),
            some("00112233-4455-6677-8899-aabbccddeeff")
        );
        assert_eq!(text(UUID, &uuid[..15]), None);
        assert_eq!(text(BYTEA, &[]), some("\\x"));
        assert_eq!(
            text(BYTEA, &[0xde, 0xad, 0xbe, 0xef, 0]),
            some("\\xdeadbeef00")
        );
        assert_eq!(text(0, b"x"), None);
        assert_eq!(text(1186, &[0; 16]), None);
    }
}
