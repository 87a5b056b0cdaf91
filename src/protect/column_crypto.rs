//! The values of encrypted columns as they cross pgveil: what a client sends (text or
//! binary format, in the column's logical type) becomes the stored form of an envelope
//! (its `pgv1:` text in text/varchar columns, its bytes in bytea columns), and stored
//! values become what the client asked for again.
//!
//! What is encrypted is always the value's canonical text (`protect::logical`), so equal
//! values give equal deterministic ciphertexts whatever spelling the client used. Errors
//! never contain a value.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use super::envelope::{self, CipherMode, ColumnCipher, ColumnIdentity, DecryptError, EncryptError};
use super::keyring::Keyring;
use super::logical::{self, LogicalType, ValueError};
use crate::policy::file::EncryptMode;
use crate::policy::{ColumnId, Policy};
use crate::wire::rows::BINARY_FORMAT;

/// Type OIDs of the stored forms.
pub const TEXT_OID: u32 = 25;
pub const BYTEA_OID: u32 = 17;

/// One encrypted column: its keys, the type clients see, and how it is stored.
#[derive(Debug)]
pub struct ColumnCrypto {
    pub cipher: ColumnCipher,
    pub logical: LogicalType,
    /// Stored as bytea (the envelope's bytes) rather than text (its `pgv1:` form).
    pub bytea: bool,
}

impl ColumnCrypto {
    /// The canonical text of a value a client sent in `format`.
    pub fn canonical(&self, format: i16, value: &[u8]) -> Result<Vec<u8>, ValueError> {
        if format == BINARY_FORMAT {
            logical::canonical_from_binary(self.logical, value)
        } else {
            logical::canonical_from_text(self.logical, value)
        }
    }

    /// The envelope of a canonical value under the active key.
    pub fn seal(&self, canonical: &[u8]) -> Result<Vec<u8>, EncryptError> {
        crate::observe::metrics::metrics()
            .encrypted_values_total
            .inc();
        self.cipher.encrypt(canonical)
    }

    /// The envelopes of a canonical value under every key, active first (equality
    /// lookups must find rows not yet moved to the active key).
    pub fn seal_under_every_key(&self, canonical: &[u8]) -> Result<Vec<Vec<u8>>, EncryptError> {
        self.cipher.encrypt_under_every_key(canonical)
    }

    /// A SQL literal holding the stored form of `envelope`. Neither form contains a
    /// quote or a backslash, so it reads the same under any `standard_conforming_strings`.
    pub fn literal(&self, envelope: &[u8]) -> String {
        if self.bytea {
            let mut out = String::with_capacity(envelope.len() * 2 + 24);
            out.push_str("decode('");
            for byte in envelope {
                let _ = write!(out, "{byte:02x}");
            }
            out.push_str("', 'hex')");
            out
        } else {
            format!("'{}'", envelope::to_text(envelope))
        }
    }

    /// A Bind parameter holding the stored form: (format code, value).
    pub fn parameter(&self, envelope: Vec<u8>) -> (i16, Vec<u8>) {
        if self.bytea {
            (BINARY_FORMAT, envelope)
        } else {
            (0, envelope::to_text(&envelope).into_bytes())
        }
    }

    /// The stored form as COPY text/CSV data (before COPY's own escaping).
    pub fn copy_field(&self, envelope: &[u8]) -> Vec<u8> {
        if self.bytea {
            let mut out = Vec::with_capacity(2 + envelope.len() * 2);
            out.extend_from_slice(b"\\x");
            for byte in envelope {
                out.extend_from_slice(format!("{byte:02x}").as_bytes());
            }
            out
        } else {
            envelope::to_text(envelope).into_bytes()
        }
    }

    /// The canonical text of a stored value the server sent in `format`.
    pub fn open(&self, stored: &[u8], format: i16) -> Result<Vec<u8>, DecryptError> {
        let envelope = if self.bytea {
            if format == BINARY_FORMAT {
                stored.to_vec()
            } else {
                decode_bytea_hex(stored).ok_or(DecryptError::NotAnEnvelope)?
            }
        } else {
            envelope::from_text(stored).ok_or(DecryptError::NotAnEnvelope)?
        };
        let plaintext = self.cipher.decrypt(&envelope)?;
        crate::observe::metrics::metrics()
            .decrypted_values_total
            .inc();
        Ok(plaintext)
    }

    /// A canonical value in the format the client asked for.
    pub fn present(&self, canonical: Vec<u8>, format: i16) -> Result<Vec<u8>, ValueError> {
        if format == BINARY_FORMAT {
            logical::binary_from_canonical(self.logical, &canonical)
        } else {
            Ok(canonical)
        }
    }
}

/// `\x0a1b…` (bytea hex output) to bytes.
fn decode_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks(2)
        .map(|pair| {
            let digit = |b: u8| (b as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// The ciphers of every encrypted column of a policy, for one database's catalog.
#[derive(Debug, Default)]
pub struct Ciphers {
    columns: Vec<Option<Arc<ColumnCrypto>>>,
    /// The keyring holds a single key.
    pub single_key: bool,
    /// Encrypted columns that cannot be used, with the reason (no such column in the
    /// database, or a type that cannot hold ciphertext).
    pub unusable: HashMap<ColumnId, String>,
}

impl Ciphers {
    /// Builds the ciphers of `policy`'s encrypted columns; `column_types` are the stored
    /// types (`format_type`) the catalog found.
    pub fn build(
        policy: &Policy,
        column_types: &HashMap<ColumnId, String>,
        keyring: Option<&Keyring>,
    ) -> Ciphers {
        let mut ciphers = Ciphers {
            columns: Vec::with_capacity(policy.columns.len()),
            single_key: keyring.is_some_and(|k| k.key_ids().len() == 1),
            unusable: HashMap::new(),
        };
        for (id, column) in policy.columns.iter().enumerate() {
            let mode = match column.encrypt {
                EncryptMode::None => {
                    ciphers.columns.push(None);
                    continue;
                }
                EncryptMode::Randomized => CipherMode::Randomized,
                EncryptMode::Deterministic => CipherMode::Deterministic,
            };
            let built = (|| {
                let keyring = keyring.ok_or("no keyring is configured")?;
                let stored = column_types
                    .get(&id)
                    .ok_or("the database has no such column")?;
                let bytea = match stored.as_str() {
                    "bytea" => true,
                    "text" => false,
                    s if s.starts_with("character varying") => false,
                    _ => return Err(
                        "its type cannot hold ciphertext: run `pgveil encrypt`, which widens it",
                    ),
                };
                let logical = match &column.logical_type {
                    Some(name) => {
                        LogicalType::from_name(name).ok_or("its `type` is not supported")?
                    }
                    None => LogicalType::from_name(stored).unwrap_or(if bytea {
                        LogicalType::Bytea
                    } else {
                        LogicalType::Text
                    }),
                };
                let table = &policy.tables[column.table];
                let identity = ColumnIdentity::new(&table.schema, &table.name, &column.name);
                let cipher = ColumnCipher::new(keyring, identity, mode)
                    .map_err(|_| "its keys cannot be derived")?;
                Ok(ColumnCrypto {
                    cipher,
                    logical,
                    bytea,
                })
            })();
            match built {
                Ok(crypto) => ciphers.columns.push(Some(Arc::new(crypto))),
                Err(reason) => {
                    ciphers.unusable.insert(id, reason.to_string());
                    ciphers.columns.push(None);
                }
            }
        }
        ciphers
    }

    pub fn get(&self, column: ColumnId) -> Option<&Arc<ColumnCrypto>> {
        self.columns.get(column).and_then(Option::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytea_hex_decodes_and_refuses_junk() {
        assert_eq!(decode_bytea_hex(b"\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_bytea_hex(b"\\x0"), None);
        assert_eq!(decode_bytea_hex(b"00"), None);
        assert_eq!(decode_bytea_hex(b"\\xzz"), None);
    }
}
