//! The keyring file (SPEC.md "Keyring file"): named 32-byte keys and which one is active.
//!
//! Read from the `keyring` file or the `PGVEIL_KEYRING` variable holding the YAML itself.
//! Key bytes never appear in `Debug` output, logs or errors, and are zeroed on drop.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use thiserror::Error;

use super::mask::HashKey;

pub const KEYRING_ENV: &str = "PGVEIL_KEYRING";

#[derive(Debug, Error)]
pub enum KeyringError {
    #[error("{source_name}: cannot read keyring: {error}")]
    Read {
        source_name: String,
        error: std::io::Error,
    },
    #[error("{source_name}:{line}:{column}: {message}")]
    Parse {
        source_name: String,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    active: String,
    keys: BTreeMap<String, String>,
}

/// A 32-byte key, zeroed when dropped.
pub struct Key([u8; 32]);

impl Drop for Key {
    fn drop(&mut self) {
        // Volatile writes so the compiler cannot drop the wipe of a dead value.
        for byte in self.0.iter_mut() {
            // SAFETY: `byte` is a valid, aligned, exclusive reference.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

pub struct Keyring {
    active: String,
    keys: BTreeMap<String, Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// The keyring from `PGVEIL_KEYRING` when set, else from `path`; `None` when
    /// neither is given.
    pub fn from_env_or_file(path: Option<&Path>) -> Result<Option<Keyring>, KeyringError> {
        if let Ok(text) = std::env::var(KEYRING_ENV) {
            return Keyring::parse(&text, KEYRING_ENV).map(Some);
        }
        let Some(path) = path else {
            return Ok(None);
        };
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| KeyringError::Read {
            source_name: source_name.clone(),
            error,
        })?;
        Keyring::parse(&text, &source_name).map(Some)
    }

    pub fn parse(text: &str, source_name: &str) -> Result<Keyring, KeyringError> {
        let file: KeyringFile = serde_saphyr::from_str(text).map_err(|error| {
            let (line, column) = error
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            KeyringError::Parse {
                source_name: source_name.to_string(),
                line,
                column,
                message: crate::config::parser_message(&error.to_string()),
            }
        })?;
        let invalid = |message: String| KeyringError::Invalid {
            source_name: source_name.to_string(),
            message,
        };
        let mut keys = BTreeMap::new();
        for (id, encoded) in file.keys {
            let mut bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| invalid(format!("key {id}: not valid base64")))?;
            let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                invalid(format!(
                    "key {id}: expected 32 bytes, found {}",
                    bytes.len()
                ))
            })?;
            bytes.iter_mut().for_each(|b| *b = 0);
            keys.insert(id, Key(key));
        }
        if !keys.contains_key(&file.active) {
            return Err(invalid(format!(
                "active key {} is not among the keys",
                file.active
            )));
        }
        Ok(Keyring {
            active: file.active,
            keys,
        })
    }

    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// The key of the `hash` mask, derived from the active key so it is never the
    /// encryption key itself. Rotating the active key changes every hash.
    pub fn mask_hash_key(&self) -> Option<HashKey> {
        let key = self.keys.get(&self.active)?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.0).ok()?;
        mac.update(b"pgveil mask hash v1");
        let derived: [u8; 32] = mac.finalize().into_bytes().into();
        Some(HashKey::new(derived))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn parses_and_derives_a_hash_key() {
        let keyring =
            Keyring::parse(&format!("active: k1\nkeys:\n  k1: {KEY}\n"), "k.yaml").unwrap();
        assert_eq!(keyring.active_id(), "k1");
        assert!(keyring.mask_hash_key().is_some());
        assert!(!format!("{keyring:?}").contains(KEY));
    }

    #[test]
    fn refuses_bad_keyrings() {
        let error = Keyring::parse(&format!("active: k2\nkeys:\n  k1: {KEY}\n"), "k.yaml");
        assert!(error.unwrap_err().to_string().contains("active key k2"));
        let error = Keyring::parse("active: k1\nkeys:\n  k1: c2hvcnQ=\n", "k.yaml");
        assert!(error.unwrap_err().to_string().contains("expected 32 bytes"));
        let error = Keyring::parse("active: k1\nkeys:\n  k1: '%%%'\n", "k.yaml");
        assert!(error.unwrap_err().to_string().contains("base64"));
    }
}
