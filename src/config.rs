//! The proxy configuration file (YAML, SPEC.md "Config file") and command-line overrides.
//!
//! Loading validates everything it can before the proxy starts: unknown keys, bad
//! addresses and impossible limits are errors with `FILE:LINE:COL` where the YAML parser
//! knows them. Relative paths resolve against the config file's folder. This module never
//! reads secrets itself: a password is named by the environment variable that holds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// How pgveil secures its connection to the upstream server (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without certificate verification; else plain.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not verified.
    Require,
    /// TLS with the certificate verified against `ca` and the host name.
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default = "default_upstream_host")]
    pub host: String,
    #[serde(default = "default_upstream_port")]
    pub port: u16,
    #[serde(default)]
    pub sslmode: SslMode,
    /// CA certificates (PEM) for `verify-full`; the system bundle when absent.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: default_upstream_host(),
            port: default_upstream_port(),
            sslmode: SslMode::default(),
            ca: None,
        }
    }
}

/// The service login pgveil uses for its own catalog queries (used by the policy
/// engine; accepted and validated now so config files stay stable).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    pub user: String,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub database: Option<String>,
}

/// TLS for applications connecting to pgveil.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuditFailureMode {
    #[default]
    Refuse,
    Continue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub path: String,
    #[serde(default)]
    pub all_statements: bool,
    #[serde(default)]
    pub on_failure: AuditFailureMode,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most client sessions open at once; more are refused with SQLSTATE 53300.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long open sessions may run before they are cut.
    #[serde(default = "default_shutdown_grace_seconds")]
    pub shutdown_grace_seconds: u64,
    /// Time allowed for TLS negotiation, startup and authentication of a new client.
    #[serde(default = "default_startup_timeout_seconds")]
    pub startup_timeout_seconds: u64,
    /// Time allowed to open the TCP connection to the upstream server.
    #[serde(default = "default_connect_timeout_seconds")]
    pub connect_timeout_seconds: u64,
    /// Largest server message pgveil will hold whole to apply the policy (a DataRow it
    /// must mask, an error it must scrub). A larger one ends the session: streaming it
    /// unseen could pass protected plaintext, buffering it without bound could exhaust
    /// memory.
    #[serde(default = "default_max_inspected_message_bytes")]
    pub max_inspected_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            shutdown_grace_seconds: default_shutdown_grace_seconds(),
            startup_timeout_seconds: default_startup_timeout_seconds(),
            connect_timeout_seconds: default_connect_timeout_seconds(),
            max_inspected_message_bytes: default_max_inspected_message_bytes(),
        }
    }
}

impl Limits {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout_seconds)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_seconds)
    }
}

/// The whole proxy configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub catalog: Option<CatalogConfig>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub policy: Option<PathBuf>,
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    #[serde(default)]
    pub limits: Limits,
    /// Event-loop threads that run sessions: 0 = one per CPU core.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            upstream: UpstreamConfig::default(),
            catalog: None,
            tls: None,
            policy: None,
            keyring: None,
            admin: None,
            audit: None,
            limits: Limits::default(),
            workers: default_workers(),
        }
    }
}

fn default_workers() -> usize {
    0
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}
fn default_upstream_host() -> String {
    "127.0.0.1".to_string()
}
fn default_upstream_port() -> u16 {
    5432
}
fn default_max_connections() -> usize {
    1000
}
fn default_shutdown_grace_seconds() -> u64 {
    30
}
fn default_startup_timeout_seconds() -> u64 {
    60
}
fn default_connect_timeout_seconds() -> u64 {
    10
}

fn default_max_inspected_message_bytes() -> usize {
    64 << 20
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: shown.clone(),
            error,
        })?;
        let mut config = Config::parse(&text, &shown)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        config.resolve_paths(base);
        config.validate(&shown)?;
        Ok(config)
    }

    /// Parses config YAML; `shown` names the source in errors.
    pub fn parse(text: &str, shown: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str::<Config>(text).map_err(|error| {
            let (line, column) = error
                .location()
                .map(|location| (location.line(), location.column()))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: shown.to_string(),
                line,
                column,
                message: parser_message(&error.to_string()),
            }
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        if let Some(ca) = self.upstream.ca.as_mut() {
            resolve(ca);
        }
        if let Some(tls) = self.tls.as_mut() {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
        if let Some(policy) = self.policy.as_mut() {
            resolve(policy);
        }
        if let Some(keyring) = self.keyring.as_mut() {
            resolve(keyring);
        }
        if let Some(audit) = self.audit.as_mut() {
            if audit.path != "-" && Path::new(&audit.path).is_relative() {
                audit.path = base.join(&audit.path).display().to_string();
            }
        }
    }

    /// Checks what the types alone cannot express.
    pub fn validate(&self, shown: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: shown.to_string(),
            message,
        };
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections must be at least 1".into()));
        }
        if self.upstream.host.trim().is_empty() {
            return Err(invalid("upstream.host must not be empty".into()));
        }
        if self.upstream.port == 0 {
            return Err(invalid("upstream.port must not be 0".into()));
        }
        if self.limits.startup_timeout_seconds == 0 || self.limits.connect_timeout_seconds == 0 {
            return Err(invalid("limits timeouts must be at least 1 second".into()));
        }
        Ok(())
    }

    /// Applies `--upstream HOST:PORT` (IPv6 hosts in brackets: `[::1]:5432`).
    pub fn set_upstream(&mut self, address: &str) -> Result<(), ConfigError> {
        let invalid = || ConfigError::Invalid {
            path: "--upstream".into(),
            message: format!("expected HOST:PORT, got {address:?}"),
        };
        let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
        let port: u16 = port.parse().map_err(|_| invalid())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(invalid());
        }
        self.upstream.host = host.to_string();
        self.upstream.port = port;
        Ok(())
    }
}

/// The parser's message without its own "error: line N column M:" prefix, which the
/// `FILE:LINE:COL:` prefix already says.
pub(crate) fn parser_message(text: &str) -> String {
    let first = text.lines().next().unwrap_or(text).trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first.strip_prefix("line ") {
        Some(rest) if rest.contains(" column ") => rest
            .split_once(": ")
            .map(|(_, message)| message)
            .unwrap_or(first)
            .to_string(),
        _ => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = Config::parse("", "c.yaml").unwrap();
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.upstream.port, 5432);
        assert_eq!(config.upstream.sslmode, SslMode::Prefer);
        assert_eq!(config.limits.max_connections, 1000);
    }

    #[test]
    fn parses_the_documented_keys() {
        let config = Config::parse(
            "listen: 0.0.0.0:7000\nupstream:\n  host: db\n  port: 5433\n  sslmode: verify-full\n  ca: ca.pem\ntls:\n  cert: s.crt\n  key: s.key\nlimits:\n  max_connections: 5\n",
            "c.yaml",
        )
        .unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.upstream.host, "db");
        assert_eq!(config.upstream.sslmode, SslMode::VerifyFull);
        assert_eq!(config.limits.max_connections, 5);
        assert!(config.tls.is_some());
        assert_eq!(config.workers, 0);
        let single = Config::parse("workers: 1\n", "c.yaml").unwrap();
        assert_eq!(single.workers, 1);
    }

    #[test]
    fn unknown_keys_are_errors_with_a_location() {
        let error = Config::parse("listen: 127.0.0.1:1\nupstrem:\n  host: x\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("c.yaml:2:1: unknown field `upstrem`"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(Config::parse("listen: nowhere\n", "c.yaml").is_err());
        assert!(Config::parse("upstream:\n  sslmode: maybe\n", "c.yaml").is_err());
        let config = Config::parse("limits:\n  max_connections: 0\n", "c.yaml").unwrap();
        assert!(config.validate("c.yaml").is_err());
    }

    #[test]
    fn duplicate_keys_are_errors() {
        assert!(Config::parse("listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n", "c.yaml").is_err());
    }

    #[test]
    fn upstream_override_accepts_host_port_and_ipv6() {
        let mut config = Config::default();
        config.set_upstream("db.internal:6000").unwrap();
        assert_eq!(
            (config.upstream.host.as_str(), config.upstream.port),
            ("db.internal", 6000)
        );
        config.set_upstream("[::1]:5432").unwrap();
        assert_eq!(config.upstream.host, "::1");
        assert!(config.set_upstream("nohost").is_err());
        assert!(config.set_upstream("h:0").is_err());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let mut config =
            Config::parse("tls:\n  cert: s.crt\n  key: /abs/s.key\n", "c.yaml").unwrap();
        config.resolve_paths(Path::new("/etc/pgveil"));
        let tls = config.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/pgveil/s.crt"));
        assert_eq!(tls.key, PathBuf::from("/abs/s.key"));
    }
}
