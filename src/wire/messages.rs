//! The few regular messages pgveil reads or writes itself, decoded from and encoded to
//! frame bodies.
//!
//! Decoders borrow from the frame body and never copy or reinterpret names and SQL text
//! as UTF-8. Everything pgveil does not need stays an opaque frame and is forwarded as
//! it came.

use thiserror::Error;

use super::frame::encode_frame;
use super::{read_i16, read_i32, split_cstr};

/// A message body that does not have the shape its type byte promises.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed {message} message: {problem}")]
pub struct MalformedMessage {
    pub message: &'static str,
    pub problem: &'static str,
}

fn malformed(message: &'static str, problem: &'static str) -> MalformedMessage {
    MalformedMessage { message, problem }
}

/// Frontend Parse: `name`, `query`, parameter type OIDs.
#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    pub statement: &'a [u8],
    pub query: &'a [u8],
    pub parameter_types: Vec<u32>,
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, MalformedMessage> {
        let (statement, rest) = split_cstr(body).ok_or(malformed("Parse", "statement name"))?;
        let (query, rest) = split_cstr(rest).ok_or(malformed("Parse", "query string"))?;
        let count = read_i16(rest, 0).ok_or(malformed("Parse", "parameter count"))?;
        let count = usize::try_from(count).map_err(|_| malformed("Parse", "parameter count"))?;
        if rest.len() != 2 + 4 * count {
            return Err(malformed("Parse", "parameter types"));
        }
        let parameter_types = (0..count)
            .map(|i| read_i32(rest, 2 + 4 * i).unwrap_or(0) as u32)
            .collect();
        Ok(Parse {
            statement,
            query,
            parameter_types,
        })
    }
}

/// The names a frontend Bind refers to; parameters and formats stay undecoded.
#[derive(Debug, PartialEq, Eq)]
pub struct BindNames<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
}

impl<'a> BindNames<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, MalformedMessage> {
        let (portal, rest) = split_cstr(body).ok_or(malformed("Bind", "portal name"))?;
        let (statement, _) = split_cstr(rest).ok_or(malformed("Bind", "statement name"))?;
        Ok(BindNames { portal, statement })
    }
}

/// Whether a Describe or Close names a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// Frontend Describe and Close: a target kind and a name.
#[derive(Debug, PartialEq, Eq)]
pub struct TargetName<'a> {
    pub target: Target,
    pub name: &'a [u8],
}

impl<'a> TargetName<'a> {
    pub fn decode(message: &'static str, body: &'a [u8]) -> Result<Self, MalformedMessage> {
        let target = match body.first() {
            Some(b'S') => Target::Statement,
            Some(b'P') => Target::Portal,
            _ => return Err(malformed(message, "target must be 'S' or 'P'")),
        };
        let (name, rest) = split_cstr(&body[1..]).ok_or(malformed(message, "name"))?;
        if !rest.is_empty() {
            return Err(malformed(message, "bytes after the name"));
        }
        Ok(TargetName { target, name })
    }
}

/// Frontend Execute: the portal name (the row limit stays undecoded).
pub fn execute_portal(body: &[u8]) -> Result<&[u8], MalformedMessage> {
    split_cstr(body)
        .map(|(portal, _)| portal)
        .ok_or(malformed("Execute", "portal name"))
}

/// Transaction status reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransactionStatus {
    #[default]
    Idle,
    InTransaction,
    Failed,
}

impl TransactionStatus {
    pub fn decode_ready_for_query(body: &[u8]) -> Result<Self, MalformedMessage> {
        match body {
            [b'I'] => Ok(TransactionStatus::Idle),
            [b'T'] => Ok(TransactionStatus::InTransaction),
            [b'E'] => Ok(TransactionStatus::Failed),
            _ => Err(malformed("ReadyForQuery", "status byte")),
        }
    }
}

/// The value of ParameterStatus `body` when it reports `name`.
pub fn parameter_status<'a>(body: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut parts = body.split(|&b| b == 0);
    if parts.next()? != name {
        return None;
    }
    parts.next()
}

/// The command tag of a CommandComplete.
pub fn command_tag(body: &[u8]) -> &[u8] {
    split_cstr(body).map(|(tag, _)| tag).unwrap_or(body)
}

/// Severity of an ErrorResponse, from the non-localized `V` field (or `S` for servers
/// older than 9.6).
pub fn error_severity(body: &[u8]) -> Option<&[u8]> {
    let mut fallback = None;
    let mut rest = body;
    while let Some((&field, after_type)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let (value, after_value) = split_cstr(after_type)?;
        match field {
            b'V' => return Some(value),
            b'S' => fallback = Some(value),
            _ => {}
        }
        rest = after_value;
    }
    fallback
}

/// Whether an ErrorResponse ends the session (FATAL or PANIC).
pub fn error_is_fatal(body: &[u8]) -> bool {
    matches!(error_severity(body), Some(b"FATAL") | Some(b"PANIC"))
}

/// Fields of a server error or notice that can quote stored values: DETAIL ("Key
/// (id_card)=(…) already exists", "Failing row contains (…)"), CONTEXT, and the internal
/// query with its position.
const VALUE_BEARING_FIELDS: &[u8] = b"DWqp";

/// SQLSTATEs of failed lookups by name whose message quotes the name looked up, which
/// can be a value cast to a reg* type or passed to `nextval`, `current_setting` or a
/// file function (`relation "13812345678" does not exist`).
const LOOKUP_FAILURES: &[&[u8]] = &[b"42P01", b"42704", b"42883", b"3F000", b"58P01"];

/// A message with everything from its first double quote to its last replaced by
/// `"…"`. First to last, because PostgreSQL does not escape quotes inside the names it
/// quotes.
fn mask_quoted(message: &[u8]) -> Vec<u8> {
    let first = message.iter().position(|&b| b == b'"');
    let last = message.iter().rposition(|&b| b == b'"');
    match (first, last) {
        (Some(first), Some(last)) => {
            let mut out = message[..first].to_vec();
            out.extend_from_slice("\"…\"".as_bytes());
            if last > first {
                out.extend_from_slice(&message[last + 1..]);
            }
            out
        }
        _ => message.to_vec(),
    }
}

/// An ErrorResponse or NoticeResponse body for a client that may not see every stored
/// value: without the fields that quote values; for SQLSTATE class 22 (data exceptions
/// such as `invalid input syntax for type integer: "…"`) with the message replaced; for
/// failed lookups by name (see `LOOKUP_FAILURES`) with the quoted name masked. `None`
/// when nothing needed to change.
pub fn scrub_report(body: &[u8]) -> Result<Option<Vec<u8>>, MalformedMessage> {
    let malformed_field = || malformed("ErrorResponse", "field");
    let mut fields: Vec<(u8, &[u8])> = Vec::new();
    let mut rest = body;
    while let Some((&code, after_code)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let (value, after_value) = split_cstr(after_code).ok_or_else(malformed_field)?;
        fields.push((code, value));
        rest = after_value;
    }
    let sqlstate = fields
        .iter()
        .find(|(code, _)| *code == b'C')
        .map(|(_, value)| *value)
        .unwrap_or_default();
    let data_exception = sqlstate.starts_with(b"22");
    let lookup_failure = LOOKUP_FAILURES.contains(&sqlstate);
    let changes = fields.iter().any(|(code, _)| {
        VALUE_BEARING_FIELDS.contains(code) || ((data_exception || lookup_failure) && *code == b'M')
    });
    if !changes {
        return Ok(None);
    }
    let replacement = format!(
        "pgveil: the server rejected a value (SQLSTATE {}); its message is withheld because it can quote stored values",
        String::from_utf8_lossy(sqlstate)
    );
    let mut out = Vec::with_capacity(body.len());
    for (code, value) in fields {
        if VALUE_BEARING_FIELDS.contains(&code) {
            continue;
        }
        out.push(code);
        if data_exception && code == b'M' {
            out.extend_from_slice(replacement.as_bytes());
        } else if lookup_failure && code == b'M' {
            out.extend_from_slice(&mask_quoted(value));
        } else {
            out.extend_from_slice(value);
        }
        out.push(0);
    }
    out.push(0);
    Ok(Some(out))
}

/// Severity of an error pgveil sends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Severity::Error => b"ERROR",
            Severity::Fatal => b"FATAL",
        }
    }
}

/// An ErrorResponse pgveil writes itself. Messages must start with `pgveil:` and never
/// contain a protected value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport {
    pub severity: Severity,
    pub sqlstate: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorReport {
    pub fn new(severity: Severity, sqlstate: &'static str, message: impl Into<String>) -> Self {
        ErrorReport {
            severity,
            sqlstate,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The whole ErrorResponse frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 + self.message.len());
        let mut field = |code: u8, value: &[u8]| {
            body.push(code);
            // A NUL inside a field would end it early and desynchronise the client.
            body.extend(value.iter().map(|&b| if b == 0 { b'?' } else { b }));
            body.push(0);
        };
        field(b'S', self.severity.as_bytes());
        field(b'V', self.severity.as_bytes());
        field(b'C', self.sqlstate.as_bytes());
        field(b'M', self.message.as_bytes());
        if let Some(detail) = &self.detail {
            field(b'D', detail.as_bytes());
        }
        if let Some(hint) = &self.hint {
            field(b'H', hint.as_bytes());
        }
        body.push(0);
        let mut frame = Vec::new();
        encode_frame(&mut frame, b'E', &body);
        frame
    }
}

/// Authentication request codes of the backend `R` message.
pub mod auth {
    pub const OK: i32 = 0;
    pub const KERBEROS_V5: i32 = 2;
    pub const CLEARTEXT_PASSWORD: i32 = 3;
    pub const MD5_PASSWORD: i32 = 5;
    pub const GSS: i32 = 7;
    pub const GSS_CONTINUE: i32 = 8;
    pub const SSPI: i32 = 9;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// The request code of an Authentication message.
pub fn authentication_code(body: &[u8]) -> Result<i32, MalformedMessage> {
    read_i32(body, 0).ok_or(malformed("Authentication", "request code"))
}

/// The SASL mechanism that binds the exchange to the TLS channel: it cannot work across
/// two TLS sessions, so pgveil never offers it to a client.
pub const SCRAM_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

/// Rewrites an AuthenticationSASL body without the channel-binding mechanism; `None`
/// when no other mechanism is left.
pub fn sasl_mechanisms_without_channel_binding(
    body: &[u8],
) -> Result<Option<Vec<u8>>, MalformedMessage> {
    let mut rest = body
        .get(4..)
        .ok_or(malformed("AuthenticationSASL", "request code"))?;
    let mut kept = Vec::with_capacity(body.len());
    kept.extend_from_slice(&auth::SASL.to_be_bytes());
    let mut any = false;
    loop {
        let (mechanism, after) =
            split_cstr(rest).ok_or(malformed("AuthenticationSASL", "mechanism list"))?;
        if mechanism.is_empty() {
            break;
        }
        if mechanism != SCRAM_PLUS {
            kept.extend_from_slice(mechanism);
            kept.push(0);
            any = true;
        }
        rest = after;
    }
    kept.push(0);
    Ok(any.then_some(kept))
}

/// The GS2 channel-binding flag of a SASLInitialResponse (`n`, `y` or `p`).
pub fn sasl_initial_channel_binding_flag(body: &[u8]) -> Option<u8> {
    let (_mechanism, rest) = split_cstr(body)?;
    let length = read_i32(rest, 0)?;
    if length <= 0 {
        return None;
    }
    rest.get(4).copied()
}

/// BackendKeyData: process id and secret (4 bytes in protocol 3.0).
pub fn backend_key_data(body: &[u8]) -> Result<(i32, [u8; 4]), MalformedMessage> {
    if body.len() != 8 {
        return Err(malformed("BackendKeyData", "length"));
    }
    let pid = read_i32(body, 0).ok_or(malformed("BackendKeyData", "process id"))?;
    Ok((pid, [body[4], body[5], body[6], body[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_parse_with_types_and_raw_text() {
        let body = b"s1\0select \xff $1\0\0\x01\0\0\0\x17";
        let parse = Parse::decode(body).unwrap();
        assert_eq!(parse.statement, b"s1");
        assert_eq!(parse.query, b"select \xff $1");
        assert_eq!(parse.parameter_types, vec![23]);
        assert!(Parse::decode(b"s1\0select\0\0\x02\0\0\0\x17").is_err());
        assert!(Parse::decode(b"s1\0select").is_err());
    }

    #[test]
    fn decodes_bind_names() {
        let names = BindNames::decode(b"p1\0s1\0\0\0\0\0\0\0").unwrap();
        assert_eq!((names.portal, names.statement), (&b"p1"[..], &b"s1"[..]));
        assert!(BindNames::decode(b"p1").is_err());
    }

    #[test]
    fn decodes_describe_and_close_targets() {
        let target = TargetName::decode("Describe", b"Sname\0").unwrap();
        assert_eq!(target.target, Target::Statement);
        assert_eq!(target.name, b"name");
        assert_eq!(
            TargetName::decode("Close", b"P\0").unwrap().target,
            Target::Portal
        );
        assert!(TargetName::decode("Close", b"X\0").is_err());
        assert!(TargetName::decode("Close", b"").is_err());
    }

    #[test]
    fn reads_error_severity_and_fatality() {
        let fatal = ErrorReport::new(Severity::Fatal, "08006", "pgveil: gone").encode();
        assert!(error_is_fatal(&fatal[5..]));
        let error = ErrorReport::new(Severity::Error, "42501", "pgveil: no").encode();
        assert!(!error_is_fatal(&error[5..]));
        assert_eq!(error_severity(b"SFATAL\0\0"), Some(&b"FATAL"[..]));
    }

    #[test]
    fn error_report_encodes_fields_in_order() {
        let frame = ErrorReport::new(Severity::Error, "53300", "pgveil: full")
            .with_hint("later")
            .encode();
        assert_eq!(
            frame,
            b"E\0\0\0\x2fSERROR\0VERROR\0C53300\0Mpgveil: full\0Hlater\0\0".to_vec()
        );
    }

    #[test]
    fn strips_scram_plus_from_mechanisms() {
        let mut body = auth::SASL.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let rewritten = sasl_mechanisms_without_channel_binding(&body)
            .unwrap()
            .unwrap();
        let mut expected = auth::SASL.to_be_bytes().to_vec();
        expected.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert_eq!(rewritten, expected);

        let mut only_plus = auth::SASL.to_be_bytes().to_vec();
        only_plus.extend_from_slice(b"SCRAM-SHA-256-PLUS\0\0");
        assert_eq!(
            sasl_mechanisms_without_channel_binding(&only_plus).unwrap(),
            None
        );
    }

    #[test]
    fn reads_the_gs2_flag() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&8i32.to_be_bytes());
        body.extend_from_slice(b"y,,n=,r=");
        assert_eq!(sasl_initial_channel_binding_flag(&body), Some(b'y'));
        assert_eq!(sasl_initial_channel_binding_flag(b"SCRAM"), None);
    }

    #[test]
    fn transaction_status_from_ready_for_query() {
        assert_eq!(
            TransactionStatus::decode_ready_for_query(b"T").unwrap(),
            TransactionStatus::InTransaction
        );
        assert!(TransactionStatus::decode_ready_for_query(b"").is_err());
    }
}

#[cfg(test)]
mod scrub_tests {
    use super::*;

    fn body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (code, value) in fields {
            out.push(*code);
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        }
        out.push(0);
        out
    }

    #[test]
    fn drops_detail_and_context_but_keeps_the_rest() {
        let original = body(&[
            (b'S', "ERROR"),
            (b'C', "23505"),
            (
                b'M',
                "duplicate key value violates unique constraint \"c_key\"",
            ),
            (b'D', "Key (id_card)=(110105199001011234) already exists."),
            (b'W', "SQL statement \"insert ...\""),
            (b'n', "c_key"),
        ]);
        let scrubbed = scrub_report(&original).unwrap().unwrap();
        assert_eq!(
            scrubbed,
            body(&[
                (b'S', "ERROR"),
                (b'C', "23505"),
                (
                    b'M',
                    "duplicate key value violates unique constraint \"c_key\""
                ),
                (b'n', "c_key"),
            ])
        );
    }

    #[test]
    fn replaces_the_message_of_a_data_exception() {
        let original = body(&[
            (b'C', "22P02"),
            (
                b'M',
                "invalid input syntax for type integer: \"110105199001011234\"",
            ),
        ]);
        let scrubbed = scrub_report(&original).unwrap().unwrap();
        let text = String::from_utf8_lossy(&scrubbed);
        assert!(!text.contains("110105"), "{text}");
        assert!(text.contains("SQLSTATE 22P02"), "{text}");
    }

    #[test]
    fn masks_the_name_a_failed_lookup_quotes() {
        let original = body(&[
            (b'C', "42P01"),
            (b'M', "relation \"138\"12345678\" does not exist"),
        ]);
        let scrubbed = scrub_report(&original).unwrap().unwrap();
        assert_eq!(
            scrubbed,
            body(&[(b'C', "42P01"), (b'M', "relation \"…\" does not exist")])
        );
    }

    #[test]
    fn leaves_harmless_reports_alone_and_refuses_broken_ones() {
        let harmless = body(&[(b'C', "42601"), (b'M', "syntax error at or near \"selec\"")]);
        assert_eq!(scrub_report(&harmless), Ok(None));
        assert!(scrub_report(b"Cunterminated").is_err());
    }
}
