//! The audit log's record format and its hash chain: how a record becomes one JSON
//! line, and how `pgveil audit verify` checks a file of them.
//!
//! Each line is a JSON object with SPEC.md's fields, `hash` last. `hash` is the hex
//! SHA-256 of the previous record's `hash` followed by the line as it would be without
//! its `hash` member; the first record's `prev_hash` is 64 zeros. Editing a record
//! breaks its hash, removing or reordering records breaks the next `prev_hash` (and the
//! `seq` sequence). A chain cannot show that records were cut off its end; keep the
//! last hash elsewhere (or ship records off the machine) to detect that.
//!
//! Records carry statement fingerprints, names and counts, never a value.

use std::io::BufRead;

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One protected column a statement touched, and what the role got of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditColumn {
    pub table: String,
    pub column: String,
    pub action: String,
}

/// One audit record, without its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    pub session: String,
    /// `ip:port` of the client.
    pub client: String,
    pub user: String,
    pub role: String,
    pub database: String,
    pub application_name: String,
    pub kind: String,
    /// The statement's fingerprint (see `fingerprint`): never a value.
    pub statement: String,
    pub columns: Vec<AuditColumn>,
    pub rows: u64,
    /// `ok`, `denied` or `error`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The record as written, in SPEC.md's field order, before `hash` is added.
#[derive(Serialize)]
struct Chained<'a> {
    seq: u64,
    #[serde(flatten)]
    record: &'a AuditRecord,
    prev_hash: &'a str,
}

/// Hex SHA-256 over `prev_hash` and the record text without its hash.
fn chain_hash(prev_hash: &str, unhashed: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(unhashed.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The JSON line (without newline) of record `seq` following `prev_hash`, and its hash.
pub fn encode(
    seq: u64,
    record: &AuditRecord,
    prev_hash: &str,
) -> Result<(String, String), serde_json::Error> {
    let unhashed = serde_json::to_string(&Chained {
        seq,
        record,
        prev_hash,
    })?;
    let hash = chain_hash(prev_hash, &unhashed);
    // `unhashed` is a JSON object: it ends with `}`.
    let mut line = unhashed;
    line.pop();
    line.push_str(",\"hash\":\"");
    line.push_str(&hash);
    line.push_str("\"}");
    Ok((line, hash))
}

/// The first record of a file that breaks the chain.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("line {line}: {problem}")]
pub struct ChainBroken {
    pub line: u64,
    pub problem: String,
}

/// Checks every line of an audit file that starts the chain; the number of records
/// when the chain is intact.
pub fn verify(reader: impl BufRead) -> Result<u64, ChainBroken> {
    ChainVerifier::from_genesis().check(reader)
}

/// Follows one hash chain through one or more files (a log and its rotations, oldest
/// first).
pub struct ChainVerifier {
    /// The `seq` and `prev_hash` the next record must have; `None` until the first
    /// record of a chain checked from its middle.
    expected: Option<(u64, String)>,
    /// Where a chain checked from its middle started: its first `seq` and `prev_hash`.
    started_at: Option<(u64, String)>,
}

impl ChainVerifier {
    /// A chain whose first record is `seq` 1 after the genesis hash.
    pub fn from_genesis() -> ChainVerifier {
        ChainVerifier {
            expected: Some((1, GENESIS_HASH.to_string())),
            started_at: None,
        }
    }

    /// A chain checked from wherever its first record is: for a file whose earlier
    /// records were rotated away. Records removed before that first one cannot be
    /// noticed; [`Self::started_at`] says what to match against the previous file.
    pub fn from_anywhere() -> ChainVerifier {
        ChainVerifier {
            expected: None,
            started_at: None,
        }
    }

    /// The first `seq` and `prev_hash` of a chain checked from its middle.
    pub fn started_at(&self) -> Option<&(u64, String)> {
        self.started_at.as_ref()
    }

    /// Checks the next file of the chain; the number of records in it. Line numbers in
    /// the error count from this file's start.
    pub fn check(&mut self, reader: impl BufRead) -> Result<u64, ChainBroken> {
        let mut count = 0u64;
        for (index, line) in reader.lines().enumerate() {
            let line_number = index as u64 + 1;
            let broken = |problem: String| ChainBroken {
                line: line_number,
                problem,
            };
            let line = line.map_err(|error| broken(format!("cannot read: {error}")))?;
            if line.is_empty() {
                return Err(broken("empty line".into()));
            }
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|error| broken(format!("not a JSON record: {error}")))?;
            let seq = value.get("seq").and_then(serde_json::Value::as_u64);
            let prev_hash = value.get("prev_hash").and_then(serde_json::Value::as_str);
            let hash = value.get("hash").and_then(serde_json::Value::as_str);
            let (Some(seq), Some(prev_hash), Some(hash)) = (seq, prev_hash, hash) else {
                return Err(broken("record lacks seq, prev_hash or hash".into()));
            };
            let (expected_seq, expected_prev) = match &self.expected {
                Some(expected) => expected.clone(),
                None => {
                    self.started_at = Some((seq, prev_hash.to_string()));
                    (seq, prev_hash.to_string())
                }
            };
            if seq != expected_seq {
                let hint = if expected_seq == 1 && self.started_at.is_none() && count == 0 {
                    " (a rotated log continues the chain of the file before it: give that file first, or use --partial)"
                } else {
                    ""
                };
                return Err(broken(format!(
                    "record seq {seq} where {expected_seq} was expected: records were removed, added or reordered{hint}"
                )));
            }
            if prev_hash != expected_prev {
                return Err(broken(format!(
                    "record seq {seq}: prev_hash does not match the hash of the record before it"
                )));
            }
            let suffix = format!(",\"hash\":\"{hash}\"}}");
            let Some(unhashed_body) = line.strip_suffix(&suffix) else {
                return Err(broken(format!(
                    "record seq {seq}: hash is not the last member"
                )));
            };
            let unhashed = format!("{unhashed_body}}}");
            if chain_hash(prev_hash, &unhashed) != hash {
                return Err(broken(format!(
                    "record seq {seq}: hash does not match its content (the record was edited)"
                )));
            }
            self.expected = Some((seq + 1, hash.to_string()));
            count += 1;
        }
        Ok(count)
    }
}

/// RFC 3339 UTC with milliseconds for a time since the Unix epoch.
pub fn rfc3339_millis(since_epoch: std::time::Duration) -> String {
    let seconds = since_epoch.as_secs();
    let millis = since_epoch.subsec_millis();
    let days = (seconds / 86_400) as i64;
    let of_day = seconds % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60
    )
}

/// A record with fixed, value-free fields, for unit tests.
#[cfg(test)]
pub(crate) fn sample_record(statement: &str, rows: u64) -> AuditRecord {
    AuditRecord {
        ts: "2026-11-22T10:00:00.000Z".into(),
        session: "s1".into(),
        client: "127.0.0.1:50000".into(),
        user: "alice".into(),
        role: "support".into(),
        database: "crm".into(),
        application_name: "psql".into(),
        kind: "select".into(),
        statement: statement.into(),
        columns: vec![AuditColumn {
            table: "public.customers".into(),
            column: "phone".into(),
            action: "mask".into(),
        }],
        rows,
        outcome: "ok".into(),
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(statement: &str) -> AuditRecord {
        sample_record(statement, 1)
    }

    fn chain(count: u64) -> Vec<String> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=count)
            .map(|seq| {
                let (line, hash) =
                    encode(seq, &record(&format!("SELECT phone FROM t{seq}")), &prev).unwrap();
                prev = hash;
                line
            })
            .collect()
    }

    fn verify_lines(lines: &[String]) -> Result<u64, ChainBroken> {
        verify(lines.join("\n").as_bytes())
    }

    #[test]
    fn a_record_has_the_spec_fields_in_order_with_hash_last() {
        let lines = chain(1);
        let value: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for key in [
            "seq",
            "ts",
            "session",
            "client",
            "user",
            "role",
            "database",
            "application_name",
            "kind",
            "statement",
            "columns",
            "rows",
            "outcome",
            "prev_hash",
            "hash",
        ] {
            assert!(keys.contains(&key), "{key} missing from {}", lines[0]);
        }
        assert!(lines[0].starts_with("{\"seq\":1,\"ts\":"));
        assert!(lines[0].ends_with("\"}"));
        assert_eq!(value["prev_hash"], GENESIS_HASH);
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify_lines(&chain(5)), Ok(5));
        assert_eq!(verify(&b""[..]), Ok(0));
    }

    #[test]
    fn edits_removals_and_reorders_are_found() {
        let lines = chain(4);
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"rows\":1", "\"rows\":7");
        assert_eq!(verify_lines(&edited).unwrap_err().line, 3);

        let mut removed = lines.clone();
        removed.remove(1);
        assert_eq!(verify_lines(&removed).unwrap_err().line, 2);

        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert_eq!(verify_lines(&swapped).unwrap_err().line, 2);

        // An edit that also renumbers and recomputes its own hash still breaks the
        // link to the next record.
        let mut forged = lines.clone();
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let (line, _) = encode(2, &record("SELECT 1"), first["hash"].as_str().unwrap()).unwrap();
        forged[1] = line;
        assert_eq!(verify_lines(&forged).unwrap_err().line, 3);

        let mut garbage = lines;
        garbage[0] = "not json".into();
        assert_eq!(verify_lines(&garbage).unwrap_err().line, 1);
    }

    #[test]
    fn a_chain_continues_across_files_and_may_be_checked_from_its_middle() {
        let lines = chain(5);
        let (old, new) = lines.split_at(3);
        let mut across = ChainVerifier::from_genesis();
        assert_eq!(across.check(old.join("\n").as_bytes()), Ok(3));
        assert_eq!(across.check(new.join("\n").as_bytes()), Ok(2));

        // The newer file alone does not start the chain...
        let alone = verify(new.join("\n").as_bytes()).unwrap_err();
        assert!(alone.problem.contains("--partial"), "{alone}");
        // ...but checks as a fragment, reporting where it starts.
        let mut fragment = ChainVerifier::from_anywhere();
        assert_eq!(fragment.check(new.join("\n").as_bytes()), Ok(2));
        assert_eq!(fragment.started_at().unwrap().0, 4);

        // A fragment still has to hold together.
        let mut gap = new.to_vec();
        gap.insert(0, lines[1].clone());
        let mut fragment = ChainVerifier::from_anywhere();
        assert_eq!(
            fragment.check(gap.join("\n").as_bytes()).unwrap_err().line,
            2
        );
    }

    /// Expected values checked with Python's `datetime.fromtimestamp(…, timezone.utc)`.
    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        use std::time::Duration;
        assert_eq!(
            rfc3339_millis(Duration::from_millis(0)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(Duration::from_millis(1_795_349_045_123)),
            "2026-11-22T12:04:05.123Z"
        );
        assert_eq!(
            rfc3339_millis(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
