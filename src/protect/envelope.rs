//! The encryption envelope of one protected column value (docs/ENVELOPE.md): per-column
//! keys derived from the keyring, AES-256-GCM for randomized columns, AES-256-SIV
//! (RFC 5297) for deterministic ones, and the `pgv1:` text form for text columns.
//!
//! Pure functions on bytes: no I/O except the operating system's random source for GCM
//! nonces, and no panics on any input. Plaintexts are opaque bytes (the caller passes a
//! value's canonical text). Nothing here ever puts a plaintext, a key or a derived key
//! into an error, a `Debug` string or a log; derived keys are wiped when dropped.
//! Decryption either authenticates a value against its column and key or fails: it
//! never hands back bytes it could not authenticate.

use aes_gcm::aead::{AeadInPlace as _, KeyInit as _};
use aes_gcm::Aes256Gcm;
use aes_siv::siv::Aes256Siv;
use base64::Engine as _;
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize as _, Zeroizing};

use super::keyring::{is_key_id, Keyring, MAX_KEY_ID_LEN};

/// Byte 0 of every envelope.
pub const FORMAT_VERSION: u8 = 1;
/// What starts the text form of an envelope (text and varchar columns).
pub const TEXT_PREFIX: &str = "pgv1:";
/// HKDF salt of per-column keys.
const DERIVATION_SALT: &[u8] = b"pgveil column key v1";
const GCM_NONCE_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;
const SIV_TAG_LEN: usize = 16;
const TEXT_ENGINE: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::STANDARD_NO_PAD;

/// How a column is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherMode {
    /// AES-256-GCM with a random nonce: equal values give different ciphertexts.
    Randomized,
    /// AES-256-SIV: equal values of one column under one key give equal ciphertexts,
    /// so the database can compare them for equality.
    Deterministic,
}

impl CipherMode {
    /// Byte 1 of the envelope.
    pub fn byte(self) -> u8 {
        match self {
            CipherMode::Randomized => 1,
            CipherMode::Deterministic => 2,
        }
    }

    pub fn from_byte(byte: u8) -> Option<CipherMode> {
        match byte {
            1 => Some(CipherMode::Randomized),
            2 => Some(CipherMode::Deterministic),
            _ => None,
        }
    }

    /// The name used in the policy file (`encrypt: randomized | deterministic`).
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Randomized => "randomized",
            CipherMode::Deterministic => "deterministic",
        }
    }

    /// Bytes of the derived column key.
    fn key_len(self) -> usize {
        match self {
            CipherMode::Randomized => 32,
            CipherMode::Deterministic => 64,
        }
    }

    /// Fewest bytes after the header.
    fn min_body_len(self) -> usize {
        match self {
            CipherMode::Randomized => GCM_NONCE_LEN + GCM_TAG_LEN,
            CipherMode::Deterministic => SIV_TAG_LEN,
        }
    }
}

impl std::fmt::Display for CipherMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The column a value belongs to. Part of every column key and every envelope's
/// associated data, so a ciphertext copied into another column does not decrypt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ColumnIdentity {
    pub schema: String,
    pub table: String,
    pub column: String,
}

impl ColumnIdentity {
    pub fn new(
        schema: impl Into<String>,
        table: impl Into<String>,
        column: impl Into<String>,
    ) -> ColumnIdentity {
        ColumnIdentity {
            schema: schema.into(),
            table: table.into(),
            column: column.into(),
        }
    }

    /// Each of schema, table and column as a big-endian u16 byte length, then its
    /// UTF-8 bytes.
    fn encode(&self) -> Result<Vec<u8>, EncryptError> {
        let parts = [
            ("schema", &self.schema),
            ("table", &self.table),
            ("column", &self.column),
        ];
        let mut out = Vec::with_capacity(6 + parts.iter().map(|(_, p)| p.len()).sum::<usize>());
        for (part, name) in parts {
            let len = u16::try_from(name.len()).map_err(|_| EncryptError::NameTooLong {
                part,
                len: name.len(),
            })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        Ok(out)
    }
}

impl std::fmt::Display for ColumnIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.schema, self.table, self.column)
    }
}

/// Why a value could not be encrypted. The statement carrying it must be refused.
#[derive(Debug, Error)]
pub enum EncryptError {
    #[error("the {part} name is {len} bytes long; a column identity allows at most 65535")]
    NameTooLong { part: &'static str, len: usize },
    #[error("the keyring has no key for its active id")]
    NoActiveKey,
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(String),
    #[error("equality lookups need deterministic encryption; this column is randomized")]
    NotDeterministic,
    #[error("the cipher refused the value (too long to encrypt)")]
    Cipher,
}

/// Why stored bytes do not decrypt. Never names the plaintext or key bytes; key ids,
/// which are not secret, may be named.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecryptError {
    #[error("not a pgveil envelope")]
    NotAnEnvelope,
    #[error("envelope format version {0} is not supported by this pgveil (it reads version 1)")]
    UnsupportedVersion(u8),
    #[error("the envelope was made in the other encryption mode than this column's")]
    WrongMode,
    #[error("the envelope names key {0}, which is not in the keyring")]
    UnknownKey(String),
    #[error("the ciphertext fails authentication: altered, truncated, or from another column")]
    Authentication,
}

/// The parsed header of an envelope.
struct Header<'a> {
    mode: CipherMode,
    key_id: &'a str,
    /// Bytes of version, mode, length and key id.
    len: usize,
}

/// Reads the header (version, mode, key id length, key id). `NotAnEnvelope` when the
/// bytes do not have its shape; `UnsupportedVersion` when they have it but byte 0 is
/// another version.
fn parse_header(bytes: &[u8]) -> Result<Header<'_>, DecryptError> {
    let [version, mode, id_len, rest @ ..] = bytes else {
        return Err(DecryptError::NotAnEnvelope);
    };
    let mode = CipherMode::from_byte(*mode).ok_or(DecryptError::NotAnEnvelope)?;
    let id_len = usize::from(*id_len);
    if id_len == 0 || id_len > MAX_KEY_ID_LEN {
        return Err(DecryptError::NotAnEnvelope);
    }
    let key_id = rest
        .get(..id_len)
        .filter(|id| is_key_id(id))
        .and_then(|id| std::str::from_utf8(id).ok())
        .ok_or(DecryptError::NotAnEnvelope)?;
    if *version != FORMAT_VERSION {
        return Err(DecryptError::UnsupportedVersion(*version));
    }
    Ok(Header {
        mode,
        key_id,
        len: 3 + id_len,
    })
}

/// Whether `bytes` start with an envelope header (format 1, a mode, a well-formed key
/// id). Cheap; says nothing about authenticity. Stored bytes of an encrypted column for
/// which this is true but [`ColumnCipher::decrypt`] fails are corrupt.
pub fn looks_like_envelope(bytes: &[u8]) -> bool {
    parse_header(bytes).is_ok()
}

/// The key id an envelope names, when `envelope` has an envelope header.
pub fn key_id(envelope: &[u8]) -> Option<&str> {
    parse_header(envelope).ok().map(|header| header.key_id)
}

/// The text form of an envelope: `pgv1:` then unpadded standard base64.
pub fn to_text(envelope: &[u8]) -> String {
    let mut text = String::with_capacity(TEXT_PREFIX.len() + envelope.len().div_ceil(3) * 4);
    text.push_str(TEXT_PREFIX);
    TEXT_ENGINE.encode_string(envelope, &mut text);
    text
}

/// The envelope in a text form; `None` when `text` is not `pgv1:` followed by canonical
/// unpadded standard base64.
pub fn from_text(text: &[u8]) -> Option<Vec<u8>> {
    let encoded = text.strip_prefix(TEXT_PREFIX.as_bytes())?;
    TEXT_ENGINE.decode(encoded).ok()
}

/// HKDF-SHA256(salt = "pgveil column key v1", IKM = keyring key,
/// info = mode byte ‖ identity encoding), 32 bytes for GCM and 64 for SIV.
fn derive_column_key(
    keyring_key: &[u8; 32],
    mode: CipherMode,
    identity: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EncryptError> {
    let mut okm = Zeroizing::new(vec![0u8; mode.key_len()]);
    Hkdf::<Sha256>::new(Some(DERIVATION_SALT), keyring_key)
        .expand_multi_info(&[&[mode.byte()], identity], &mut okm)
        .map_err(|_| EncryptError::Cipher)?;
    Ok(okm)
}

enum Engine {
    /// Holds the expanded AES key; the `aes` crate wipes it on drop.
    Gcm(Box<Aes256Gcm>),
    /// The 64-byte SIV key (MAC half, then CTR half); a cipher is built from it per
    /// call because `aes_siv` needs `&mut` to encrypt.
    Siv(Zeroizing<[u8; 64]>),
}

impl Engine {
    fn new(mode: CipherMode, key: &[u8]) -> Result<Engine, EncryptError> {
        match mode {
            CipherMode::Randomized => Aes256Gcm::new_from_slice(key)
                .map(|cipher| Engine::Gcm(Box::new(cipher)))
                .map_err(|_| EncryptError::Cipher),
            CipherMode::Deterministic => {
                let mut siv_key = Zeroizing::new([0u8; 64]);
                if key.len() != siv_key.len() {
                    return Err(EncryptError::Cipher);
                }
                siv_key.copy_from_slice(key);
                Ok(Engine::Siv(siv_key))
            }
        }
    }
}

fn siv(key: &[u8; 64]) -> Aes256Siv {
    <Aes256Siv as aes_siv::KeyInit>::new(key.into())
}

/// One keyring key's derived key for the column, with the header and associated data
/// of its envelopes.
struct ColumnKey {
    id: String,
    /// Header (version, mode, key id length, key id) then the column identity: the
    /// associated data of every envelope under this key. Its first `header_len` bytes
    /// start each envelope.
    associated_data: Vec<u8>,
    header_len: usize,
    engine: Engine,
}

impl ColumnKey {
    fn header(&self) -> &[u8] {
        self.associated_data.get(..self.header_len).unwrap_or(&[])
    }

    /// The envelope of `plaintext`; `nonce` only for GCM.
    fn seal(&self, plaintext: &[u8], nonce: [u8; GCM_NONCE_LEN]) -> Result<Vec<u8>, EncryptError> {
        let header = self.header();
        match &self.engine {
            Engine::Gcm(cipher) => {
                let mut out = Vec::with_capacity(
                    header.len() + GCM_NONCE_LEN + plaintext.len() + GCM_TAG_LEN,
                );
                out.extend_from_slice(header);
                out.extend_from_slice(&nonce);
                let start = out.len();
                out.extend_from_slice(plaintext);
                let body = out.get_mut(start..).ok_or(EncryptError::Cipher)?;
                let tag = cipher
                    .encrypt_in_place_detached(&nonce.into(), &self.associated_data, body)
                    .map_err(|_| EncryptError::Cipher)?;
                out.extend_from_slice(&tag);
                Ok(out)
            }
            Engine::Siv(key) => {
                let mut out = Vec::with_capacity(header.len() + SIV_TAG_LEN + plaintext.len());
                out.extend_from_slice(header);
                out.extend_from_slice(&[0u8; SIV_TAG_LEN]);
                let tag_at = header.len();
                out.extend_from_slice(plaintext);
                let body = out
                    .get_mut(tag_at + SIV_TAG_LEN..)
                    .ok_or(EncryptError::Cipher)?;
                let tag = siv(key)
                    .encrypt_in_place_detached([self.associated_data.as_slice()], body)
                    .map_err(|_| EncryptError::Cipher)?;
                out.get_mut(tag_at..tag_at + SIV_TAG_LEN)
                    .ok_or(EncryptError::Cipher)?
                    .copy_from_slice(&tag);
                Ok(out)
            }
        }
    }

    /// The plaintext of `body` (what follows the header), authenticated.
    fn open(&self, body: &[u8]) -> Result<Vec<u8>, DecryptError> {
        match &self.engine {
            Engine::Gcm(cipher) => {
                let (nonce, rest) = body
                    .split_first_chunk::<GCM_NONCE_LEN>()
                    .ok_or(DecryptError::Authentication)?;
                let (ciphertext, tag) = rest
                    .split_last_chunk::<GCM_TAG_LEN>()
                    .ok_or(DecryptError::Authentication)?;
                let mut plaintext = ciphertext.to_vec();
                match cipher.decrypt_in_place_detached(
                    &(*nonce).into(),
                    &self.associated_data,
                    &mut plaintext,
                    &(*tag).into(),
                ) {
                    Ok(()) => Ok(plaintext),
                    Err(_) => {
                        plaintext.zeroize();
                        Err(DecryptError::Authentication)
                    }
                }
            }
            Engine::Siv(key) => {
                let (tag, ciphertext) = body
                    .split_first_chunk::<SIV_TAG_LEN>()
                    .ok_or(DecryptError::Authentication)?;
                let mut plaintext = ciphertext.to_vec();
                match siv(key).decrypt_in_place_detached(
                    [self.associated_data.as_slice()],
                    &mut plaintext,
                    &(*tag).into(),
                ) {
                    Ok(()) => Ok(plaintext),
                    Err(_) => {
                        plaintext.zeroize();
                        Err(DecryptError::Authentication)
                    }
                }
            }
        }
    }
}

/// The keys of one column derived from every key of the keyring, ready to use. Built
/// once per policy or keyring load; `encrypt` and `decrypt` take `&self` and are cheap.
pub struct ColumnCipher {
    identity: ColumnIdentity,
    mode: CipherMode,
    /// The active key first, then the others in [`Keyring::key_ids`] order.
    keys: Vec<ColumnKey>,
}

impl std::fmt::Debug for ColumnCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColumnCipher")
            .field("identity", &self.identity.to_string())
            .field("mode", &self.mode)
            .field(
                "key_ids",
                &self.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ColumnCipher {
    /// Derives the column's key from every key of `keyring`. Fails only on names longer
    /// than 65535 bytes (PostgreSQL allows 63).
    pub fn new(
        keyring: &Keyring,
        identity: ColumnIdentity,
        mode: CipherMode,
    ) -> Result<ColumnCipher, EncryptError> {
        let encoded_identity = identity.encode()?;
        let active = keyring.active_id();
        let ids =
            std::iter::once(active).chain(keyring.key_ids().into_iter().filter(|id| *id != active));
        let mut keys = Vec::new();
        for id in ids {
            let keyring_key = keyring.key_bytes(id).ok_or(EncryptError::NoActiveKey)?;
            let derived = derive_column_key(keyring_key, mode, &encoded_identity)?;
            let id_len = u8::try_from(id.len()).map_err(|_| EncryptError::Cipher)?;
            let mut associated_data = Vec::with_capacity(3 + id.len() + encoded_identity.len());
            associated_data.extend_from_slice(&[FORMAT_VERSION, mode.byte(), id_len]);
            associated_data.extend_from_slice(id.as_bytes());
            let header_len = associated_data.len();
            associated_data.extend_from_slice(&encoded_identity);
            keys.push(ColumnKey {
                id: id.to_string(),
                associated_data,
                header_len,
                engine: Engine::new(mode, &derived)?,
            });
        }
        Ok(ColumnCipher {
            identity,
            mode,
            keys,
        })
    }

    pub fn mode(&self) -> CipherMode {
        self.mode
    }

    pub fn identity(&self) -> &ColumnIdentity {
        &self.identity
    }

    pub fn active_key_id(&self) -> &str {
        self.keys.first().map(|key| key.id.as_str()).unwrap_or("")
    }

    /// Key ids the column can read, the active one first.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|key| key.id.as_str())
    }

    fn active(&self) -> Result<&ColumnKey, EncryptError> {
        self.keys.first().ok_or(EncryptError::NoActiveKey)
    }

    /// The binary envelope of `plaintext` under the active key (a fresh random nonce
    /// for randomized columns).
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, EncryptError> {
        let mut nonce = [0u8; GCM_NONCE_LEN];
        if self.mode == CipherMode::Randomized {
            getrandom::getrandom(&mut nonce)
                .map_err(|error| EncryptError::Random(error.to_string()))?;
        }
        self.active()?.seal(plaintext, nonce)
    }

    /// The envelope of a randomized column under the active key with a chosen nonce:
    /// only for the test vectors of docs/ENVELOPE.md.
    #[cfg(test)]
    pub(crate) fn encrypt_with_nonce(
        &self,
        plaintext: &[u8],
        nonce: [u8; GCM_NONCE_LEN],
    ) -> Result<Vec<u8>, EncryptError> {
        self.active()?.seal(plaintext, nonce)
    }

    /// Deterministic columns only: the envelope of `plaintext` under every key of the
    /// keyring, the active key first, so that an equality lookup also finds rows still
    /// encrypted under older keys (`col IN (…)`).
    pub fn encrypt_under_every_key(&self, plaintext: &[u8]) -> Result<Vec<Vec<u8>>, EncryptError> {
        if self.mode != CipherMode::Deterministic {
            return Err(EncryptError::NotDeterministic);
        }
        self.keys
            .iter()
            .map(|key| key.seal(plaintext, [0u8; GCM_NONCE_LEN]))
            .collect()
    }

    /// The plaintext of an envelope of this column, authenticated.
    pub fn decrypt(&self, envelope: &[u8]) -> Result<Vec<u8>, DecryptError> {
        let header = parse_header(envelope)?;
        if header.mode != self.mode {
            return Err(DecryptError::WrongMode);
        }
        let key = self
            .keys
            .iter()
            .find(|key| key.id == header.key_id)
            .ok_or_else(|| DecryptError::UnknownKey(header.key_id.to_string()))?;
        let body = envelope
            .get(header.len..)
            .filter(|body| body.len() >= self.mode.min_body_len())
            .ok_or(DecryptError::Authentication)?;
        key.open(body)
    }

    /// What stored bytes are, for `pgveil encrypt` and `reencrypt`: `Ok(Some(key id))`
    /// for an authentic envelope of this column, `Ok(None)` for bytes without an
    /// envelope header (plaintext), and an error for bytes with one that do not decrypt
    /// (another column's, another mode's, altered, or under a key not in the keyring).
    pub fn classify(&self, stored: &[u8]) -> Result<Option<String>, DecryptError> {
        match parse_header(stored) {
            Err(DecryptError::NotAnEnvelope) => Ok(None),
            Err(error) => Err(error),
            Ok(header) => {
                let id = header.key_id.to_string();
                let mut plaintext = self.decrypt(stored)?;
                plaintext.zeroize();
                Ok(Some(id))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const ID_CARD: &[u8] = b"110105199001011234";

    fn sample_keyring() -> Keyring {
        Keyring::parse(&format!("active: k1\nkeys:\n  k1: {KEY}\n"), "k.yaml").unwrap()
    }

    fn id_card() -> ColumnIdentity {
        ColumnIdentity::new("public", "customers", "id_card")
    }

    fn column_cipher(keyring: &Keyring, mode: CipherMode) -> ColumnCipher {
        ColumnCipher::new(keyring, id_card(), mode).unwrap()
    }

    const MODES: [CipherMode; 2] = [CipherMode::Randomized, CipherMode::Deterministic];

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn round_trips_in_both_modes() {
        let keyring = sample_keyring();
        for mode in MODES {
            let cipher = column_cipher(&keyring, mode);
            for plaintext in [&b""[..], b"x", ID_CARD, "张三".as_bytes(), &[0u8; 1000]] {
                let envelope = cipher.encrypt(plaintext).unwrap();
                assert_eq!(envelope[..5], [1, mode.byte(), 2, b'k', b'1']);
                assert!(looks_like_envelope(&envelope));
                assert_eq!(key_id(&envelope), Some("k1"));
                assert_eq!(cipher.decrypt(&envelope).unwrap(), plaintext, "{mode}");
                assert_eq!(cipher.classify(&envelope).unwrap().as_deref(), Some("k1"));
                let text = to_text(&envelope);
                assert!(text.starts_with("pgv1:") && !text.ends_with('='));
                assert_eq!(from_text(text.as_bytes()).unwrap(), envelope);
            }
        }
    }

    #[test]
    fn deterministic_is_equal_per_column_and_key_only() {
        let keyring = sample_keyring();
        let column = column_cipher(&keyring, CipherMode::Deterministic);
        assert_eq!(
            column.encrypt(ID_CARD).unwrap(),
            column.encrypt(ID_CARD).unwrap()
        );
        assert_ne!(
            column.encrypt(ID_CARD).unwrap(),
            column.encrypt(b"110105199001011235").unwrap()
        );
        for other in [
            ColumnIdentity::new("public", "customers", "id_card2"),
            ColumnIdentity::new("public", "customer", "sid_card"),
            ColumnIdentity::new("crm", "customers", "id_card"),
        ] {
            let other = ColumnCipher::new(&keyring, other, CipherMode::Deterministic).unwrap();
            let (a, b) = (
                column.encrypt(ID_CARD).unwrap(),
                other.encrypt(ID_CARD).unwrap(),
            );
            assert_ne!(a[5..], b[5..]);
        }
        let mut rotated = sample_keyring();
        rotated.rotate().unwrap();
        let under_k2 = column_cipher(&rotated, CipherMode::Deterministic);
        assert_ne!(
            under_k2.encrypt(ID_CARD).unwrap(),
            column.encrypt(ID_CARD).unwrap()
        );
    }

    #[test]
    fn randomized_differs_per_call() {
        let cipher = column_cipher(&sample_keyring(), CipherMode::Randomized);
        let a = cipher.encrypt(ID_CARD).unwrap();
        let b = cipher.encrypt(ID_CARD).unwrap();
        assert_ne!(a, b);
        assert_eq!(cipher.decrypt(&a).unwrap(), cipher.decrypt(&b).unwrap());
    }

    #[test]
    fn ciphertexts_do_not_move_between_columns() {
        let keyring = sample_keyring();
        for mode in MODES {
            let envelope = column_cipher(&keyring, mode).encrypt(ID_CARD).unwrap();
            // Names that encode to the same concatenation still differ by their lengths.
            for other in [
                ColumnIdentity::new("public", "customers", "phone"),
                ColumnIdentity::new("public", "customersid", "_card"),
                ColumnIdentity::new("other", "customers", "id_card"),
            ] {
                let other = ColumnCipher::new(&keyring, other, mode).unwrap();
                assert_eq!(other.decrypt(&envelope), Err(DecryptError::Authentication));
                assert_eq!(other.classify(&envelope), Err(DecryptError::Authentication));
            }
        }
    }

    #[test]
    fn every_flipped_bit_fails() {
        let keyring = sample_keyring();
        for mode in MODES {
            let cipher = column_cipher(&keyring, mode);
            let envelope = cipher.encrypt(ID_CARD).unwrap();
            for bit in 0..envelope.len() * 8 {
                let mut altered = envelope.clone();
                altered[bit / 8] ^= 1 << (bit % 8);
                let result = cipher.decrypt(&altered);
                assert!(result.is_err(), "{mode} bit {bit}");
                assert!(cipher.classify(&altered).is_err() || !looks_like_envelope(&altered));
            }
        }
    }

    #[test]
    fn truncations_and_extensions_fail_without_panicking() {
        let keyring = sample_keyring();
        for mode in MODES {
            let cipher = column_cipher(&keyring, mode);
            for plaintext in [&b""[..], ID_CARD] {
                let envelope = cipher.encrypt(plaintext).unwrap();
                for len in 0..envelope.len() {
                    assert!(cipher.decrypt(&envelope[..len]).is_err(), "{mode} {len}");
                    let _ = cipher.classify(&envelope[..len]);
                    let _ = key_id(&envelope[..len]);
                    let _ = from_text(to_text(&envelope[..len]).as_bytes());
                    let text = to_text(&envelope);
                    let _ = from_text(&text.as_bytes()[..len.min(text.len())]);
                }
                let mut longer = envelope.clone();
                longer.push(0);
                assert_eq!(cipher.decrypt(&longer), Err(DecryptError::Authentication));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let keyring = sample_keyring();
        let ciphers = MODES.map(|mode| column_cipher(&keyring, mode));
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 80) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Often a plausible header, so the paths past it are exercised too.
            if len >= 5 && next() % 2 == 0 {
                bytes[..5].copy_from_slice(&[1, 1 + (next() % 2) as u8, 2, b'k', b'1']);
            }
            for cipher in &ciphers {
                assert!(cipher.decrypt(&bytes).is_err());
                let _ = cipher.classify(&bytes);
            }
            let _ = (
                looks_like_envelope(&bytes),
                key_id(&bytes),
                from_text(&bytes),
            );
        }
    }

    #[test]
    fn unknown_keys_wrong_modes_and_versions_are_named() {
        let keyring = sample_keyring();
        let mut other =
            Keyring::parse(&format!("active: k9\nkeys:\n  k9: {KEY}\n"), "o.yaml").unwrap();
        other.rotate().unwrap();
        let foreign = column_cipher(&other, CipherMode::Randomized)
            .encrypt(ID_CARD)
            .unwrap();
        let ours = column_cipher(&keyring, CipherMode::Randomized);
        assert_eq!(
            ours.decrypt(&foreign),
            Err(DecryptError::UnknownKey("k10".into()))
        );
        assert_eq!(
            ours.classify(&foreign),
            Err(DecryptError::UnknownKey("k10".into()))
        );
        assert!(DecryptError::UnknownKey("k10".into())
            .to_string()
            .contains("key k10"));

        let deterministic = column_cipher(&keyring, CipherMode::Deterministic);
        let envelope = ours.encrypt(ID_CARD).unwrap();
        assert_eq!(
            deterministic.decrypt(&envelope),
            Err(DecryptError::WrongMode)
        );
        assert_eq!(
            deterministic.classify(&envelope),
            Err(DecryptError::WrongMode)
        );

        let mut future = envelope.clone();
        future[0] = 2;
        assert_eq!(
            ours.decrypt(&future),
            Err(DecryptError::UnsupportedVersion(2))
        );
        assert_eq!(
            ours.classify(&future),
            Err(DecryptError::UnsupportedVersion(2))
        );
        assert!(!looks_like_envelope(&future));
    }

    #[test]
    fn plaintext_is_classified_as_plaintext() {
        let cipher = column_cipher(&sample_keyring(), CipherMode::Deterministic);
        for stored in [
            &b""[..],
            ID_CARD,
            "张三".as_bytes(),
            b"\x01\x02",
            b"\x01\x01\x00k1",
            b"\x01\x03\x02k1aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            b"\x01\x01\x02k.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert_eq!(cipher.classify(stored), Ok(None), "{stored:?}");
            assert_eq!(cipher.decrypt(stored), Err(DecryptError::NotAnEnvelope));
        }
        assert_eq!(from_text(b"110105199001011234"), None);
        assert_eq!(from_text(b"pgv1:not base64!"), None);
        assert_eq!(
            from_text(b"pgv1:AQ=="),
            None,
            "padding is not the text form"
        );
        assert_eq!(from_text(b"pgv1:AR"), None, "non-canonical trailing bits");
        assert_eq!(from_text(b"pgv1:AQ"), Some(vec![1]));
        assert_eq!(from_text(b"PGV1:AQ"), None);
    }

    #[test]
    fn rotation_keeps_old_envelopes_readable() {
        let mut keyring = sample_keyring();
        let before = MODES.map(|mode| column_cipher(&keyring, mode).encrypt(ID_CARD).unwrap());
        assert_eq!(keyring.rotate().unwrap(), "k2");
        for (mode, old) in MODES.into_iter().zip(&before) {
            let cipher = column_cipher(&keyring, mode);
            assert_eq!(cipher.active_key_id(), "k2");
            assert_eq!(cipher.key_ids().collect::<Vec<_>>(), ["k2", "k1"]);
            assert_eq!(cipher.decrypt(old).unwrap(), ID_CARD);
            assert_eq!(cipher.classify(old).unwrap().as_deref(), Some("k1"));
            let new = cipher.encrypt(ID_CARD).unwrap();
            assert_eq!(key_id(&new), Some("k2"));
            assert_eq!(cipher.classify(&new).unwrap().as_deref(), Some("k2"));
        }
    }

    #[test]
    fn equality_lookups_cover_every_key() {
        let mut keyring = sample_keyring();
        let old = column_cipher(&keyring, CipherMode::Deterministic)
            .encrypt(ID_CARD)
            .unwrap();
        keyring.rotate().unwrap();
        keyring.rotate().unwrap();
        let cipher = column_cipher(&keyring, CipherMode::Deterministic);
        let all = cipher.encrypt_under_every_key(ID_CARD).unwrap();
        let ids: Vec<_> = all.iter().map(|e| key_id(e).unwrap()).collect();
        assert_eq!(ids, ["k3", "k1", "k2"]);
        assert_eq!(all[0], cipher.encrypt(ID_CARD).unwrap());
        assert!(all.contains(&old));
        let randomized = column_cipher(&keyring, CipherMode::Randomized);
        assert!(matches!(
            randomized.encrypt_under_every_key(ID_CARD),
            Err(EncryptError::NotDeterministic)
        ));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let keyring = sample_keyring();
        let key = keyring.key_bytes("k1").unwrap();
        for mode in MODES {
            let cipher = column_cipher(&keyring, mode);
            let shown = format!("{cipher:?} {keyring:?}");
            assert!(shown.contains("public.customers.id_card") && shown.contains("k1"));
            let derived = derive_column_key(key, mode, &id_card().encode().unwrap()).unwrap();
            for secret in [
                hex(key),
                hex(&derived),
                KEY.to_string(),
                format!("{:?}", &key[..]),
            ] {
                assert!(!shown.contains(&secret), "{shown}");
            }
        }
    }

    #[test]
    fn ciphers_are_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<ColumnCipher>();
    }

    #[test]
    fn overlong_names_are_refused() {
        let identity = ColumnIdentity::new("public", "t".repeat(70_000), "c");
        let error =
            ColumnCipher::new(&sample_keyring(), identity, CipherMode::Randomized).unwrap_err();
        assert!(
            error.to_string().contains("table name is 70000 bytes"),
            "{error}"
        );
    }

    /// The value after `label: ` on its own line of docs/ENVELOPE.md.
    fn documented(label: &str) -> String {
        let doc = include_str!("../../docs/ENVELOPE.md");
        let prefix = format!("{label}: ");
        let mut found = doc
            .lines()
            .filter_map(|line| line.trim().strip_prefix(&prefix));
        let value = found.next().unwrap_or_else(|| panic!("no `{label}:` line"));
        assert!(found.next().is_none(), "two `{label}:` lines");
        value.trim().to_string()
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_documented_test_vectors_hold() {
        let key = unhex(&documented("keyring key k1 (hex)"));
        assert_eq!(key, (0u8..32).collect::<Vec<_>>());
        let keyring = sample_keyring();
        assert_eq!(keyring.key_bytes("k1").unwrap()[..], key[..]);
        assert_eq!(documented("column identity"), id_card().to_string());
        let plaintext = documented("plaintext (UTF-8)");
        assert_eq!(plaintext.as_bytes(), ID_CARD);
        let identity = id_card().encode().unwrap();
        assert_eq!(hex(&identity), documented("identity encoding (hex)"));

        let key = keyring.key_bytes("k1").unwrap();
        let derived = derive_column_key(key, CipherMode::Randomized, &identity).unwrap();
        assert_eq!(hex(&derived), documented("randomized column key (hex)"));
        let derived = derive_column_key(key, CipherMode::Deterministic, &identity).unwrap();
        assert_eq!(hex(&derived), documented("deterministic column key (hex)"));

        let deterministic = column_cipher(&keyring, CipherMode::Deterministic);
        assert_eq!(
            hex(&deterministic.keys[0].associated_data),
            documented("deterministic associated data (hex)")
        );
        let envelope = deterministic.encrypt(ID_CARD).unwrap();
        assert_eq!(hex(&envelope), documented("deterministic envelope (hex)"));
        assert_eq!(
            to_text(&envelope),
            documented("deterministic envelope (text)")
        );
        let text = documented("deterministic envelope (text)");
        assert_eq!(
            deterministic
                .decrypt(&from_text(text.as_bytes()).unwrap())
                .unwrap(),
            ID_CARD
        );

        let randomized = column_cipher(&keyring, CipherMode::Randomized);
        assert_eq!(
            hex(&randomized.keys[0].associated_data),
            documented("randomized associated data (hex)")
        );
        let nonce: [u8; 12] = unhex(&documented("randomized nonce (hex)"))
            .try_into()
            .unwrap();
        let envelope = randomized.encrypt_with_nonce(ID_CARD, nonce).unwrap();
        assert_eq!(hex(&envelope), documented("randomized envelope (hex)"));
        assert_eq!(to_text(&envelope), documented("randomized envelope (text)"));
        let text = documented("randomized envelope (text)");
        assert_eq!(
            randomized
                .decrypt(&from_text(text.as_bytes()).unwrap())
                .unwrap(),
            ID_CARD
        );
    }
}
