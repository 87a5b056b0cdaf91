//! `pgveil keys generate` and `pgveil keys rotate` as a user runs them: files with mode
//! 0600 that `Keyring::load` reads, no key ever printed, existing keyrings never
//! replaced without `--force`, old keys kept by rotation, and one-line errors with exit 1.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pgveil::protect::keyring::Keyring;

fn pgveil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgveil"))
        .args(args)
        .env_remove("PGVEIL_KEYRING")
        .output()
        .expect("run pgveil")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A fresh empty folder, removed when dropped.
struct Folder(PathBuf);

impl Folder {
    fn new(name: &str) -> Folder {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "pgveil-keys-cli-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Folder(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The base64 keys of the file, by id.
fn keys_in(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("  "))
        .filter_map(|line| line.split_once(": "))
        .map(|(id, key)| (id.to_string(), key.to_string()))
        .collect()
}

fn assert_no_key_printed(output: &Output, path: &Path) {
    for (_, key) in keys_in(path) {
        assert!(!stdout(output).contains(&key) && !stderr(output).contains(&key));
        assert!(!stdout(output).contains(key.trim_end_matches('=')));
    }
}

#[test]
fn generate_writes_a_private_keyring_and_never_replaces_one() {
    let folder = Folder::new("generate");
    let path = folder.file("keyring.yaml");
    let path_text = path.to_str().unwrap();

    let output = pgveil(&["keys", "generate", "--out", path_text]);
    assert!(output.status.success(), "{}", stderr(&output));
    let said = stdout(&output);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains(path_text) && said.contains("k1"), "{said}");
    assert_eq!(mode_of(&path), 0o600);
    assert_no_key_printed(&output, &path);
    let keyring = Keyring::load(&path).unwrap();
    assert_eq!(keyring.active_id(), "k1");
    assert_eq!(keyring.key_ids(), ["k1"]);
    let first = keys_in(&path);

    // A second generate refuses, in one line, and leaves the keys alone.
    let output = pgveil(&["keys", "generate", "--out", path_text]);
    assert_eq!(output.status.code(), Some(1));
    let error = stderr(&output);
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(
        error.starts_with("pgveil: ") && error.contains("--force"),
        "{error}"
    );
    assert_eq!(keys_in(&path), first);

    // --force replaces it with a new key.
    let output = pgveil(&["keys", "generate", "--out", path_text, "--force"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_ne!(keys_in(&path), first);
    assert_eq!(mode_of(&path), 0o600);
    assert_eq!(folder.names(), ["keyring.yaml"]);

    // Two keyrings generated apart differ.
    let other = folder.file("other.yaml");
    let output = pgveil(&["keys", "generate", "--out", other.to_str().unwrap()]);
    assert!(output.status.success());
    assert_ne!(keys_in(&other), keys_in(&path));
}

#[test]
fn rotate_adds_an_active_key_and_keeps_the_old_ones() {
    let folder = Folder::new("rotate");
    let path = folder.file("keyring.yaml");
    let path_text = path.to_str().unwrap();
    assert!(pgveil(&["keys", "generate", "--out", path_text])
        .status
        .success());
    let first = keys_in(&path);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();

    let output = pgveil(&["keys", "rotate", "--keyring", path_text]);
    assert!(output.status.success(), "{}", stderr(&output));
    let said = stdout(&output);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("k2") && said.contains("reencrypt"), "{said}");
    assert_no_key_printed(&output, &path);
    assert_eq!(mode_of(&path), 0o600);
    let keyring = Keyring::load(&path).unwrap();
    assert_eq!(keyring.active_id(), "k2");
    assert_eq!(keyring.key_ids(), ["k1", "k2"]);
    let after = keys_in(&path);
    assert_eq!(after[0], first[0], "k1 is kept as it was");

    let output = pgveil(&["keys", "rotate", "--keyring", path_text]);
    assert!(output.status.success());
    assert_eq!(Keyring::load(&path).unwrap().active_id(), "k3");
    assert_eq!(keys_in(&path)[..2], after[..]);
    assert_eq!(folder.names(), ["keyring.yaml"]);
}

#[test]
fn rotate_refuses_what_it_cannot_read_and_leaves_it_alone() {
    let folder = Folder::new("bad");
    let missing = folder.file("missing.yaml");
    let output = pgveil(&["keys", "rotate", "--keyring", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let error = stderr(&output);
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(error.contains("missing.yaml"), "{error}");
    assert!(!missing.exists());

    let bad = folder.file("bad.yaml");
    let text = "active: k2\nkeys:\n  k1: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n";
    std::fs::write(&bad, text).unwrap();
    let output = pgveil(&["keys", "rotate", "--keyring", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let error = stderr(&output);
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(
        error.contains("bad.yaml") && error.contains("active key k2"),
        "{error}"
    );
    assert!(!error.contains("AAECAwQF"), "{error}");
    assert_eq!(std::fs::read_to_string(&bad).unwrap(), text);

    let output = pgveil(&[
        "keys",
        "generate",
        "--out",
        "/nonexistent-pgveil/keyring.yaml",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output).lines().count(), 1);
}

#[test]
fn every_keys_command_answers_help() {
    for args in [
        &["keys", "--help"][..],
        &["keys", "generate", "--help"],
        &["keys", "rotate", "--help"],
    ] {
        let output = pgveil(args);
        assert!(output.status.success(), "{args:?}");
        assert!(stdout(&output).contains("Usage: pgveil keys"), "{args:?}");
    }
}
