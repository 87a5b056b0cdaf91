//! The keyring file (SPEC.md "Keyring file"): named 32-byte keys and which one is active.
//!
//! Read from the `keyring` file or the `PGVEIL_KEYRING` variable holding the YAML itself;
//! generated, rotated and written back (mode 0600, atomically) by `pgveil keys`.
//! Key bytes never appear in `Debug` output, logs or errors, and are zeroed on drop; key
//! ids are not secret and are named freely.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroizing;

use super::mask::HashKey;

pub const KEYRING_ENV: &str = "PGVEIL_KEYRING";

/// Longest key id: it is stored in every envelope, whose header gives it one length byte.
pub const MAX_KEY_ID_LEN: usize = 64;

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
    #[error("{source_name}: cannot write keyring: {message}")]
    Write {
        source_name: String,
        message: String,
    },
    #[error(
        "{source_name}: already exists; refusing to replace a keyring (its keys would be lost)"
    )]
    Exists { source_name: String },
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(String),
}

/// How [`Keyring::write_file`] treats a file already at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail with [`KeyringError::Exists`] when the path exists (checked atomically).
    CreateNew,
    /// Replace the file in one rename, keeping its owner and group.
    Replace,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    active: String,
    keys: BTreeMap<String, String>,
}

/// A 32-byte key, zeroed when dropped.
pub struct Key(Zeroizing<[u8; 32]>);

impl Key {
    fn random() -> Result<Key, KeyringError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        fill_random(bytes.as_mut())?;
        Ok(Key(bytes))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Fills `buffer` from the operating system's random source.
pub(crate) fn fill_random(buffer: &mut [u8]) -> Result<(), KeyringError> {
    getrandom::getrandom(buffer).map_err(|error| KeyringError::Random(error.to_string()))
}

/// Whether `id` is a key id: `[A-Za-z0-9_-]{1,64}`.
pub fn is_key_id(id: &[u8]) -> bool {
    (1..=MAX_KEY_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

/// Why `id` cannot be a key id (`[A-Za-z0-9_-]{1,64}`), or `None` when it can. The
/// message does not repeat an invalid id: it may be a key pasted in the wrong place.
pub fn key_id_problem(id: &str) -> Option<String> {
    if is_key_id(id.as_bytes()) {
        return None;
    }
    if id.is_empty() {
        return Some("a key id cannot be empty".to_string());
    }
    let looks_like_a_key = base64::engine::general_purpose::STANDARD
        .decode(id)
        .is_ok_and(|bytes| bytes.len() == 32);
    let hint = if looks_like_a_key {
        " (it looks like a key: is a key where its id should be?)"
    } else {
        ""
    };
    if id.len() > MAX_KEY_ID_LEN {
        return Some(format!(
            "a key id is {} bytes long; at most {MAX_KEY_ID_LEN} are allowed{hint}",
            id.len()
        ));
    }
    if let Some((at, bad)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Some(format!(
            "a key id contains {bad:?} (character {}); ids may use only letters A-Z a-z, \
             digits, '_' and '-'{hint}",
            at + 1
        ));
    }
    None
}

pub struct Keyring {
    active: String,
    keys: BTreeMap<String, Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

impl Keyring {
    /// The keyring from `PGVEIL_KEYRING` when set, else from `path`; `None` when
    /// neither is given.
    pub fn from_env_or_file(path: Option<&Path>) -> Result<Option<Keyring>, KeyringError> {
        if let Ok(text) = std::env::var(KEYRING_ENV) {
            let text = Zeroizing::new(text);
            return Keyring::parse(&text, KEYRING_ENV).map(Some);
        }
        match path {
            Some(path) => Keyring::load(path).map(Some),
            None => Ok(None),
        }
    }

    /// The keyring in the file at `path` (never `PGVEIL_KEYRING`).
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| KeyringError::Read {
            source_name: source_name.clone(),
            error,
        })?;
        let text = Zeroizing::new(text);
        Keyring::parse(&text, &source_name)
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
            let encoded = Zeroizing::new(encoded);
            if let Some(problem) = key_id_problem(&id) {
                return Err(invalid(problem));
            }
            let bytes = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|_| invalid(format!("key {id}: not valid base64")))?,
            );
            let mut key = Zeroizing::new([0u8; 32]);
            if bytes.len() != key.len() {
                return Err(invalid(format!(
                    "key {id}: expected 32 bytes, found {}",
                    bytes.len()
                )));
            }
            key.copy_from_slice(&bytes);
            keys.insert(id, Key(key));
        }
        if let Some(problem) = key_id_problem(&file.active) {
            return Err(invalid(format!("active: {problem}")));
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

    /// A new keyring with one fresh random key, `k1`, active.
    pub fn generate() -> Result<Keyring, KeyringError> {
        let mut keys = BTreeMap::new();
        keys.insert("k1".to_string(), Key::random()?);
        Ok(Keyring {
            active: "k1".to_string(),
            keys,
        })
    }

    /// Adds a fresh random key and makes it active; returns its id, `kN` with N one more
    /// than the highest N among the ids of that shape (and more than the number of keys).
    /// The other keys stay, for reading values encrypted under them.
    pub fn rotate(&mut self) -> Result<String, KeyringError> {
        let id = self.next_id();
        let key = Key::random()?;
        self.keys.insert(id.clone(), key);
        self.active = id.clone();
        Ok(id)
    }

    fn next_id(&self) -> String {
        let highest = self.keys.keys().filter_map(|id| numbered(id)).max();
        let floor = self.keys.len() as u64;
        let mut n = highest.unwrap_or(0).max(floor).saturating_add(1);
        // Only reached with ids near u64::MAX: walk up from the count instead.
        if self.keys.contains_key(&format!("k{n}")) {
            n = floor.saturating_add(1);
        }
        while self.keys.contains_key(&format!("k{n}")) {
            n = n.saturating_add(1);
        }
        format!("k{n}")
    }

    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// Every key id, `k1 k2 … k10` in numeric order, then any others by name.
    pub fn key_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_by_key(|id| (numbered(id).is_none(), numbered(id), *id));
        ids
    }

    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// The bytes of key `id`, for deriving column keys (`envelope.rs`). Never print them.
    pub(crate) fn key_bytes(&self, id: &str) -> Option<&[u8; 32]> {
        self.keys.get(id).map(|key| &*key.0)
    }

    /// The keyring as YAML in SPEC.md's shape (`active:` then `keys:`, standard base64
    /// with padding). It holds the keys: it is wiped when dropped.
    pub fn to_yaml(&self) -> Zeroizing<String> {
        // Room for everything up front: a growing String would leave copies of the keys
        // in the buffers it frees. Ids are at most 64 bytes (66 quoted), keys 44.
        let mut text = Zeroizing::new(String::with_capacity(256 + 128 * self.keys.len()));
        text.push_str(
            "# pgveil keyring: keep it secret. Older keys stay to read values encrypted under them.\n",
        );
        text.push_str("active: ");
        text.push_str(&yaml_id(&self.active));
        text.push_str("\nkeys:\n");
        for id in self.key_ids() {
            if let Some(key) = self.keys.get(id) {
                text.push_str("  ");
                text.push_str(&yaml_id(id));
                text.push_str(": ");
                base64::engine::general_purpose::STANDARD
                    .encode_string(key.0.as_slice(), &mut text);
                text.push('\n');
            }
        }
        text
    }

    /// Writes [`Keyring::to_yaml`] to `path` with mode 0600: into a new temporary file in
    /// the same folder, synced, then renamed (or linked, for `CreateNew`) into place, so
    /// a crash leaves either the old file or the new one, never a half-written keyring.
    /// When replacing, a symbolic link is followed and the old file's owner and group are
    /// kept.
    pub fn write_file(&self, path: &Path, mode: WriteMode) -> Result<(), KeyringError> {
        let source_name = path.display().to_string();
        let fail = |message: String| KeyringError::Write {
            source_name: source_name.clone(),
            message,
        };
        let (target, previous) = match mode {
            WriteMode::CreateNew => {
                if path.symlink_metadata().is_ok() {
                    return Err(KeyringError::Exists { source_name });
                }
                (path.to_path_buf(), None)
            }
            WriteMode::Replace => match std::fs::canonicalize(path) {
                Ok(target) => {
                    let previous =
                        std::fs::metadata(&target).map_err(|error| fail(error.to_string()))?;
                    (target, Some(previous))
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    (path.to_path_buf(), None)
                }
                Err(error) => return Err(fail(error.to_string())),
            },
        };
        let temporary = TemporaryFile::create(&target).map_err(|error| fail(error.to_string()))?;
        if let Some(previous) = &previous {
            keep_owner(&temporary.file, previous).map_err(&fail)?;
        }
        let text = self.to_yaml();
        let mut file = &temporary.file;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|error| fail(error.to_string()))?;
        match mode {
            // A link fails when the name exists, where a rename would replace it.
            WriteMode::CreateNew => match std::fs::hard_link(&temporary.path, &target) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(KeyringError::Exists { source_name });
                }
                // File systems without hard links: check, then rename.
                Err(_) if target.symlink_metadata().is_ok() => {
                    return Err(KeyringError::Exists { source_name });
                }
                Err(_) => std::fs::rename(&temporary.path, &target)
                    .map_err(|error| fail(error.to_string()))?,
            },
            WriteMode::Replace => std::fs::rename(&temporary.path, &target)
                .map_err(|error| fail(error.to_string()))?,
        }
        drop(temporary);
        // The rename or link is durable once the folder is synced; a folder that cannot
        // be opened or synced (some file systems) still holds the new file.
        if let Ok(folder) = File::open(parent_folder(&target)) {
            let _ = folder.sync_all();
        }
        Ok(())
    }

    /// The key of the `hash` mask, derived from the active key so it is never the
    /// encryption key itself. Rotating the active key changes every hash.
    pub fn mask_hash_key(&self) -> Option<HashKey> {
        let key = self.keys.get(&self.active)?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&*key.0).ok()?;
        mac.update(b"pgveil mask hash v1");
        let derived: [u8; 32] = mac.finalize().into_bytes().into();
        Some(HashKey::new(derived))
    }
}

/// N of an id `kN` (N decimal without leading zeros), else `None`.
fn numbered(id: &str) -> Option<u64> {
    let digits = id.strip_prefix('k')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A key id as a YAML scalar: plain when it cannot be read as anything but a string,
/// else double-quoted (ids have no character that needs escaping).
fn yaml_id(id: &str) -> String {
    let plain = id.starts_with(|c: char| c.is_ascii_alphabetic())
        && !matches!(
            id.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null"
        );
    if plain {
        id.to_string()
    } else {
        format!("\"{id}\"")
    }
}

fn parent_folder(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Gives `file` the owner and group of `previous`: a keyring rotated by root stays
/// readable by the account pgveil runs as. The group is kept when allowed (mode 0600
/// gives it no access anyway); the owner must be.
fn keep_owner(file: &File, previous: &std::fs::Metadata) -> Result<(), String> {
    let (uid, gid) = (previous.uid(), previous.gid());
    if std::os::unix::fs::fchown(file, Some(uid), Some(gid)).is_ok() {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(uid), None).map_err(|error| {
        format!(
            "cannot give the new file the owner of the old one (uid {uid}): {error}; \
             run this as that user or as root"
        )
    })
}

/// A file created with mode 0600 next to the keyring, removed on drop unless renamed.
struct TemporaryFile {
    path: PathBuf,
    file: File,
}

impl TemporaryFile {
    fn create(target: &Path) -> std::io::Result<TemporaryFile> {
        let name = target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keyring".to_string());
        let mut suffix = [0u8; 8];
        fill_random(&mut suffix).map_err(|error| std::io::Error::other(error.to_string()))?;
        let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let path = parent_folder(target).join(format!(".{name}.{suffix}.tmp"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // The mode given to open() is reduced by the umask; 0600 is what we promise.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(TemporaryFile { path, file })
    }
}

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        // After a rename this name is gone (NotFound); after a hard link it is the
        // second name of the new keyring.
        let _ = std::fs::remove_file(&self.path);
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

    #[test]
    fn parse_errors_never_show_key_material() {
        for text in [
            "active: k1\nkeys: SECRETKEY\n",
            "active: k1\nkeys:\n  - SECRETKEY\n",
            "active: k1\nkeys:\n  k1: [SECRETKEY\n",
            "active: k1\nkeys:\n  k1:\n    x: SECRETKEY\n",
            "active: k1\nkeys:\n  k1: SECRETKEY\n  k1: SECRETKEY\n",
            "active: k1\nkeys:\n  k1: SECRETKEY\nother: SECRETKEY\n",
            "active: k1\nkeys:\n  k1: SECRETKEY\n",
            "SECRETKEY",
        ] {
            let error = Keyring::parse(text, "k.yaml").unwrap_err().to_string();
            assert!(error.starts_with("k.yaml:"), "{error}");
            assert!(!error.contains("SECRETKEY"), "{error}");
        }
    }

    #[test]
    fn key_ids_are_short_and_plain() {
        for good in ["k1", "A", "2024-q1_main", &"x".repeat(64)] {
            assert_eq!(key_id_problem(good), None, "{good}");
        }
        for bad in ["", "k 1", "k.1", "ключ", "k1\n", &"x".repeat(65)] {
            assert!(key_id_problem(bad).is_some(), "{bad:?}");
        }
        let text = format!("active: 'k.1'\nkeys:\n  'k.1': {KEY}\n");
        let error = Keyring::parse(&text, "k.yaml").unwrap_err().to_string();
        assert!(error.contains("contains '.' (character 2)"), "{error}");
        let long = "y".repeat(65);
        let text = format!("active: {long}\nkeys:\n  {long}: {KEY}\n");
        let error = Keyring::parse(&text, "k.yaml").unwrap_err().to_string();
        assert!(error.contains("65 bytes long"), "{error}");
        assert!(!error.contains(&long), "{error}");
        // A key where the id should be is not repeated.
        for text in [
            format!("active: {KEY}\nkeys:\n  k1: {KEY}\n"),
            format!("active: k1\nkeys:\n  k1: {KEY}\n  {KEY}: {KEY}\n"),
        ] {
            let error = Keyring::parse(&text, "k.yaml").unwrap_err().to_string();
            assert!(error.contains("looks like a key"), "{error}");
            assert!(!error.contains(&KEY[..8]), "{error}");
        }
    }

    #[test]
    fn generate_rotate_and_yaml_round_trip() {
        let mut keyring = Keyring::generate().unwrap();
        assert_eq!(keyring.active_id(), "k1");
        assert_eq!(keyring.key_ids(), ["k1"]);
        let first = *keyring.key_bytes("k1").unwrap();
        assert_ne!(first, [0u8; 32]);
        assert_eq!(keyring.rotate().unwrap(), "k2");
        assert_eq!(keyring.active_id(), "k2");
        assert_ne!(keyring.key_bytes("k2").unwrap(), &first);
        assert_eq!(keyring.key_bytes("k1").unwrap(), &first);
        for _ in 0..9 {
            keyring.rotate().unwrap();
        }
        assert_eq!(keyring.active_id(), "k11");
        assert_eq!(keyring.key_ids()[..3], ["k1", "k2", "k3"]);
        assert_eq!(keyring.key_ids().last(), Some(&"k11"));

        let yaml = keyring.to_yaml();
        assert!(yaml.contains("\nactive: k11\nkeys:\n  k1: "), "{}", *yaml);
        let parsed = Keyring::parse(&yaml, "k.yaml").unwrap();
        assert_eq!(parsed.active_id(), "k11");
        assert_eq!(parsed.key_ids(), keyring.key_ids());
        for id in keyring.key_ids() {
            assert_eq!(parsed.key_bytes(id), keyring.key_bytes(id));
        }
        assert!(!format!("{keyring:?}").contains(&yaml[yaml.len() - 46..]));
    }

    #[test]
    fn rotation_numbers_after_the_highest_id() {
        let text = format!(
            "active: main\nkeys:\n  main: {KEY}\n  k7: {KEY}\n  k03: {KEY}\n  \"123\": {KEY}\n  \"true\": {KEY}\n"
        );
        let mut keyring = Keyring::parse(&text, "k.yaml").unwrap();
        assert_eq!(keyring.rotate().unwrap(), "k8");
        let mut keyring = Keyring::parse(&keyring.to_yaml(), "k.yaml").unwrap();
        assert!(keyring.contains("123") && keyring.contains("true") && keyring.contains("k03"));
        assert_eq!(keyring.active_id(), "k8");
        assert_eq!(keyring.rotate().unwrap(), "k9");
        // The YAML fits the room set aside for it, even with the longest quoted ids.
        let long = ["0", "1", "2"].map(|first| format!("{first}{}", "-".repeat(63)));
        let text = format!(
            "active: \"{}\"\nkeys:\n  \"{}\": {KEY}\n  \"{}\": {KEY}\n  \"{}\": {KEY}\n",
            long[0], long[0], long[1], long[2]
        );
        let keyring = Keyring::parse(&text, "k.yaml").unwrap();
        let yaml = keyring.to_yaml();
        assert!(yaml.len() <= 256 + 128 * 3, "{}", yaml.len());
        assert_eq!(Keyring::parse(&yaml, "k.yaml").unwrap().key_ids(), long);
        let text = format!("active: a\nkeys:\n  a: {KEY}\n  b: {KEY}\n  c: {KEY}\n");
        let mut keyring = Keyring::parse(&text, "k.yaml").unwrap();
        assert_eq!(keyring.rotate().unwrap(), "k4");
        let text =
            format!("active: k18446744073709551615\nkeys:\n  k18446744073709551615: {KEY}\n");
        let mut keyring = Keyring::parse(&text, "k.yaml").unwrap();
        assert_eq!(keyring.rotate().unwrap(), "k2");
    }

    fn scratch_folder(name: &str) -> PathBuf {
        let mut suffix = [0u8; 6];
        fill_random(&mut suffix).unwrap();
        let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let folder = std::env::temp_dir().join(format!("pgveil-keyring-{name}-{suffix}"));
        std::fs::create_dir_all(&folder).unwrap();
        folder
    }

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn written_files_are_private_and_never_clobbered() {
        let folder = scratch_folder("write");
        let path = folder.join("keyring.yaml");
        let mut keyring = Keyring::generate().unwrap();
        keyring.write_file(&path, WriteMode::CreateNew).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.key_bytes("k1"), keyring.key_bytes("k1"));

        let other = Keyring::generate().unwrap();
        let error = other.write_file(&path, WriteMode::CreateNew).unwrap_err();
        assert!(matches!(error, KeyringError::Exists { .. }), "{error}");
        assert_eq!(
            Keyring::load(&path).unwrap().key_bytes("k1"),
            keyring.key_bytes("k1")
        );

        // Replacing a file that had looser permissions still leaves 0600.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        keyring.rotate().unwrap();
        keyring.write_file(&path, WriteMode::Replace).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.active_id(), "k2");
        assert_eq!(loaded.key_bytes("k1"), keyring.key_bytes("k1"));

        // Through a symbolic link the target is replaced and the link kept.
        let link = folder.join("link.yaml");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        keyring.rotate().unwrap();
        keyring.write_file(&link, WriteMode::Replace).unwrap();
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(Keyring::load(&path).unwrap().active_id(), "k3");

        // Nothing else is left in the folder: the temporary files are gone.
        let mut names: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["keyring.yaml", "link.yaml"]);
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn a_missing_folder_is_a_write_error() {
        let keyring = Keyring::generate().unwrap();
        let path = Path::new("/nonexistent-pgveil-folder/keyring.yaml");
        let error = keyring.write_file(path, WriteMode::CreateNew).unwrap_err();
        assert!(
            error.to_string().contains("cannot write keyring"),
            "{error}"
        );
    }
}
