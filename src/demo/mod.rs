//! `pgveil demo`: a working pgveil with no set-up. It starts a throwaway PostgreSQL,
//! loads a small CRM data set (`crm.sql`), writes a demo policy (`policy.yaml`), a
//! keyring and a config, prints one ready `psql` line per demo role, and runs the proxy
//! in front of the cluster until Ctrl-C.
//!
//! Everything lives in one fresh temporary folder. A drop guard stops the cluster and
//! removes the folder (unless `keep`) on every way out: normal end, error, panic.
//! This module must never touch a PostgreSQL server or a folder it did not create,
//! never run PostgreSQL as root (initdb refuses; the demo uses `runuser -u postgres`),
//! and never listen beyond 127.0.0.1: the throwaway cluster trusts every local login.

use std::ffi::OsStr;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
use crate::server::ServerError;

#[cfg(test)]
mod spec_shape;

/// The demo data set: roles, tables, views, grants. Run as the superuser in `crm`.
const CRM_SQL: &str = include_str!("crm.sql");
/// The demo policy, written beside the config as it is.
const POLICY_YAML: &str = include_str!("policy.yaml");

/// The demo database.
const DATABASE: &str = "crm";
/// The cluster's superuser (initdb `-U`): loads the data set.
const SUPERUSER: &str = "postgres";
/// The OS account PostgreSQL runs as when the demo is started by root.
const OS_USER: &str = "postgres";
/// pgveil's own catalog login (config `catalog.user`).
const CATALOG_LOGIN: &str = "pgveil";

const CONFIG_FILE: &str = "pgveil.yaml";
const POLICY_FILE: &str = "policy.yaml";
/// The audit log, in the demo folder.
const AUDIT_FILE: &str = "audit.jsonl";
const KEYRING_FILE: &str = "keyring.yaml";
const SQL_FILE: &str = "crm.sql";
/// Subfolder owned by the PostgreSQL account: data directory, server log, socket.
const CLUSTER_DIR: &str = "cluster";

/// How long open sessions may run after Ctrl-C. Short: psql sessions left open in other
/// terminals should not hold the demo up (a second Ctrl-C ends them at once anyway).
const SHUTDOWN_GRACE_SECONDS: u64 = 3;
/// Attempts to start the cluster, each on a fresh free port (another process may take
/// the port between our probe and the server's bind).
const START_ATTEMPTS: u32 = 3;

/// A demo login and what it is meant to show.
struct DemoLogin {
    /// The policy role it resolves to.
    role: &'static str,
    /// The PostgreSQL login.
    login: &'static str,
    /// What it sees through pgveil, in one line.
    sees: &'static str,
}

/// The logins `crm.sql` creates, in the order the banner lists them.
const LOGINS: [DemoLogin; 4] = [
    DemoLogin {
        role: "billing",
        login: "billing_svc",
        sees: "phone, id_card, bank_card in plaintext; name, email, address masked",
    },
    DemoLogin {
        role: "support",
        login: "alice",
        sees: "via group crm_support: id_card masked instead of denied; bank_card denied; 200 rows",
    },
    DemoLogin {
        role: "analyst",
        login: "bi_reader",
        sees: "email as a keyed hash; id_card, bank_card denied; 100 rows; no COPY TO",
    },
    DemoLogin {
        role: "default",
        login: "guest",
        sees: "matches no role: level defaults (L4 denied, L2/L3 masked); 20 rows",
    },
];

/// What `pgveil demo` is asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Port pgveil listens on, on 127.0.0.1 (0: any free port).
    pub listen_port: u16,
    /// Keep the demo folder (data directory, config, policy, keyring) after exit.
    pub keep: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            listen_port: 6432,
            keep: false,
        }
    }
}

/// Why the demo could not start or run.
#[derive(Debug, Error)]
pub enum DemoError {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb, pg_ctl and postgres in PATH, \
         in `pg_config --bindir` and in /usr/lib/postgresql/*/bin); install PostgreSQL \
         (Debian/Ubuntu: apt-get install postgresql) and try again"
    )]
    NoServerBinaries,
    #[error(
        "psql not found (looked in {bindir} and in PATH); install the PostgreSQL client \
         (Debian/Ubuntu: apt-get install postgresql-client)"
    )]
    NoPsql { bindir: String },
    #[error(
        "running as root, but {problem}: PostgreSQL refuses to run as root, so the demo runs \
         it as user `{OS_USER}`; {hint}"
    )]
    CannotDropRoot { problem: String, hint: String },
    #[error("127.0.0.1:{port} is already in use (another pgveil or a connection pooler?); {hint}")]
    PortBusy { port: u16, hint: String },
    #[error("cannot listen on 127.0.0.1:{port}: {error}")]
    Listen { port: u16, error: std::io::Error },
    #[error("no free port on 127.0.0.1 for the demo PostgreSQL: {0}")]
    NoFreePort(std::io::Error),
    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot run {program}: {error}")]
    Spawn {
        program: String,
        error: std::io::Error,
    },
    #[error("{step} failed ({status}): {output}")]
    Step {
        step: &'static str,
        status: String,
        output: String,
    },
    #[error(
        "PostgreSQL did not start ({attempts} attempts); last lines of {}: {tail}",
        log.display()
    )]
    ClusterStart {
        attempts: u32,
        log: PathBuf,
        tail: String,
    },
    #[error("interrupted during set-up")]
    Interrupted,
    #[error("demo config: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Server(ServerError),
}

/// Runs the demo until SIGINT or SIGTERM; blocks the calling thread. Stops the cluster
/// and removes the demo folder (unless `keep`) before it returns, whatever happened.
pub fn run(options: DemoOptions) -> Result<(), DemoError> {
    // Checked first: a busy port is the likeliest failure, and the cheapest to report
    // before a cluster has been created for nothing.
    let listen_port = claim_listen_port(options.listen_port)?;
    let tools = Tools::discover()?;
    catch_interrupts();

    let workspace = Workspace::create(tools, options.keep)?;
    info!(dir = %workspace.dir.display(), "creating a throwaway PostgreSQL cluster");
    workspace.init_cluster()?;
    let upstream_port = workspace.start_cluster()?;
    let server_version = workspace.load_data(upstream_port)?;
    let config_path = workspace.write_proxy_files(listen_port, upstream_port)?;
    let config = Config::load(&config_path)?;
    if interrupted() {
        return Err(DemoError::Interrupted);
    }

    print!(
        "{}",
        banner(&BannerFacts {
            listen_port,
            upstream_port,
            server_version: &server_version,
            dir: &workspace.dir,
            psql: &workspace.tools.psql_shown,
            keep: options.keep,
        })
    );
    let _ = std::io::stdout().flush();

    let result = crate::server::run(config).map_err(|error| match error {
        ServerError::Listen { error, .. } if error.kind() == ErrorKind::AddrInUse => {
            DemoError::PortBusy {
                port: listen_port,
                hint: port_hint(listen_port),
            }
        }
        other => DemoError::Server(other),
    });
    // Stop the cluster and remove the folder now, not whenever the caller drops us.
    drop(workspace);
    result
}

// --- PostgreSQL binaries -------------------------------------------------------------

/// The PostgreSQL programs the demo runs, and how.
struct Tools {
    /// Holds initdb, pg_ctl and postgres.
    bindir: PathBuf,
    psql: PathBuf,
    /// How the banner names psql: `psql` when PATH finds it, else its full path.
    psql_shown: String,
    /// Run server programs through `runuser -u postgres` (we are root).
    as_os_user: bool,
}

impl Tools {
    fn discover() -> Result<Tools, DemoError> {
        let path = std::env::var_os("PATH");
        let bindir = find_server_bindir(
            path.as_deref(),
            pg_config_bindir,
            Path::new("/usr/lib/postgresql"),
        )
        .ok_or(DemoError::NoServerBinaries)?;
        let on_path = path.as_deref().and_then(|path| find_on_path(path, "psql"));
        let psql = Some(bindir.join("psql"))
            .filter(|psql| psql.is_file())
            .or_else(|| on_path.clone())
            .ok_or_else(|| DemoError::NoPsql {
                bindir: bindir.display().to_string(),
            })?;
        let psql_shown = match on_path {
            Some(_) => "psql".to_string(),
            None => psql.display().to_string(),
        };
        let as_os_user = is_root();
        if as_os_user {
            check_os_user(path.as_deref())?;
        }
        info!(bindir = %bindir.display(), "using PostgreSQL server binaries");
        Ok(Tools {
            bindir,
            psql,
            psql_shown,
            as_os_user,
        })
    }

    /// A PostgreSQL server program, run as `postgres` when we are root.
    fn server(&self, program: &str, cwd: &Path) -> Command {
        let program = self.bindir.join(program);
        let mut command = if self.as_os_user {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", OS_USER, "--"]).arg(program);
            runuser
        } else {
            Command::new(program)
        };
        // The caller's folder may be closed to the postgres account (root's home is);
        // initdb and pg_ctl complain when they cannot stat their working directory.
        command.current_dir(cwd).stdin(Stdio::null());
        command
    }

    /// psql as the superuser over TCP to `database`, stopping at the first error.
    fn psql(&self, port: u16, database: &str) -> Command {
        let mut command = Command::new(&self.psql);
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={port} user={SUPERUSER} dbname={database} \
                 sslmode=disable client_encoding=UTF8 application_name=pgveil-demo"
            ))
            .stdin(Stdio::null());
        command
    }
}

/// Finds the folder holding initdb, pg_ctl and postgres, in the order SPEC.md gives:
/// PATH (following a symlinked initdb to its real folder, as Debian's
/// /usr/lib/postgresql/N/bin tools are often linked from /usr/local/bin), then
/// `pg_config --bindir`, then the newest `versions_root/*/bin`.
fn find_server_bindir(
    path: Option<&OsStr>,
    pg_config: impl FnOnce() -> Option<PathBuf>,
    versions_root: &Path,
) -> Option<PathBuf> {
    if let Some(path) = path {
        for dir in std::env::split_paths(path) {
            let initdb = dir.join("initdb");
            if !initdb.is_file() {
                continue;
            }
            // The real folder first: it also holds the psql of the same version.
            if let Some(real) = initdb
                .canonicalize()
                .ok()
                .and_then(|real| real.parent().map(Path::to_path_buf))
                .filter(|real| is_server_bindir(real))
            {
                return Some(real);
            }
            if is_server_bindir(&dir) {
                return Some(dir);
            }
        }
    }
    if let Some(dir) = pg_config().filter(|dir| is_server_bindir(dir)) {
        return Some(dir);
    }
    newest_versioned_bindir(versions_root)
}

/// The `bin` folder of the highest version under `root` (`15` beats `9.6`).
fn newest_versioned_bindir(root: &Path) -> Option<PathBuf> {
    let entries = fs::read_dir(root).ok()?;
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            is_server_bindir(&bin).then_some((version, bin))
        })
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, bin)| bin)
}

fn is_server_bindir(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|program| dir.join(program).is_file())
}

fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let dir = text.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

fn find_on_path(path: &OsStr, program: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// As root, PostgreSQL must run as `postgres`: that account and runuser must exist.
fn check_os_user(path: Option<&OsStr>) -> Result<(), DemoError> {
    if path
        .and_then(|path| find_on_path(path, "runuser"))
        .is_none()
    {
        return Err(DemoError::CannotDropRoot {
            problem: "runuser is not installed".into(),
            hint: "install util-linux, or run `pgveil demo` as an ordinary user".into(),
        });
    }
    let known = Command::new("id")
        .args(["-u", OS_USER])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !known {
        return Err(DemoError::CannotDropRoot {
            problem: format!("there is no `{OS_USER}` user"),
            hint: format!(
                "create it (useradd --system {OS_USER}), or run `pgveil demo` as an ordinary user"
            ),
        });
    }
    Ok(())
}

// --- ports -----------------------------------------------------------------------------

/// Checks that pgveil can listen on `port` (0: picks a free one).
fn claim_listen_port(port: u16) -> Result<u16, DemoError> {
    if port == 0 {
        return free_port().map_err(|error| DemoError::Listen { port, error });
    }
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(port),
        Err(error) if error.kind() == ErrorKind::AddrInUse => Err(DemoError::PortBusy {
            port,
            hint: port_hint(port),
        }),
        Err(error) => Err(DemoError::Listen { port, error }),
    }
}

/// "start the demo on another port with --port 6433", naming a port that is free now.
fn port_hint(busy: u16) -> String {
    let free = (busy.saturating_add(1)..=busy.saturating_add(50))
        .filter(|&port| port != busy)
        .find(|&port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
    match free {
        Some(port) => format!("start the demo on another port with --port, e.g. --port {port}"),
        None => "start the demo on another port with --port PORT".to_string(),
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> std::io::Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
}

// --- interrupts during set-up ----------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Until the proxy takes over SIGINT and SIGTERM, a Ctrl-C during set-up would kill the
/// process before the guard could stop the cluster and remove the folder. Instead it is
/// noted here: the child being run (initdb, psql; pg_ctl has its own process group and
/// finishes) dies of it, and the set-up step returns `Interrupted`, which unwinds
/// through the guard. (The proxy's handlers, installed later by tokio, chain to this
/// one; it only sets the flag.)
fn catch_interrupts() {
    // A flag left from an earlier demo in the same process must not stop this one.
    INTERRUPTED.store(false, Ordering::SeqCst);
    let handler = note_interrupt as extern "C" fn(libc::c_int);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe;
        // `signal` installs it with restartable system calls on Linux and macOS.
        unsafe {
            libc::signal(signal, handler as libc::sighandler_t);
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

// --- the demo folder and cluster ---------------------------------------------------------

/// The demo folder and the cluster in it. Dropping it stops the cluster (if its
/// postmaster.pid says it runs) and removes the folder unless `keep`.
struct Workspace {
    dir: PathBuf,
    keep: bool,
    tools: Tools,
}

impl Workspace {
    fn create(tools: Tools, keep: bool) -> Result<Workspace, DemoError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("pgveil-demo-{}-{nanos:08x}", std::process::id()));
        // `create`, not `create_all`: the name must be new, never a folder someone
        // prepared for us.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|error| DemoError::Io {
                what: "cannot create the demo folder",
                path: dir.clone(),
                error,
            })?;
        // From here on the guard owns the folder.
        let workspace = Workspace { dir, keep, tools };
        let cluster = workspace.cluster_dir();
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&cluster)
            .map_err(|error| DemoError::Io {
                what: "cannot create",
                path: cluster.clone(),
                error,
            })?;
        if workspace.tools.as_os_user {
            // The postgres account may pass through the demo folder (not list it, and
            // not read the keyring) to reach the cluster folder it owns.
            fs::set_permissions(&workspace.dir, fs::Permissions::from_mode(0o711)).map_err(
                |error| DemoError::Io {
                    what: "cannot set permissions of",
                    path: workspace.dir.clone(),
                    error,
                },
            )?;
            run_step(
                "chown of the cluster folder",
                Command::new("chown")
                    .arg(format!("{OS_USER}:"))
                    .arg(&cluster)
                    .stdin(Stdio::null()),
            )?;
        }
        Ok(workspace)
    }

    fn cluster_dir(&self) -> PathBuf {
        self.dir.join(CLUSTER_DIR)
    }

    fn data_dir(&self) -> PathBuf {
        self.cluster_dir().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.cluster_dir().join("postgres.log")
    }

    fn init_cluster(&self) -> Result<(), DemoError> {
        let cluster = self.cluster_dir();
        run_step(
            "initdb",
            self.tools
                .server("initdb", &cluster)
                .arg("-D")
                .arg(self.data_dir())
                .args([
                    "--auth=trust",
                    "-U",
                    SUPERUSER,
                    "--encoding=UTF8",
                    "--locale=C",
                    // A throwaway cluster: no point waiting for the disk.
                    "--no-sync",
                ]),
        )?;
        Ok(())
    }

    /// Starts the cluster on a free loopback port and waits until it accepts
    /// connections; returns the port.
    fn start_cluster(&self) -> Result<u16, DemoError> {
        let cluster = self.cluster_dir();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port().map_err(DemoError::NoFreePort)?;
            let mut command = self.tools.server("pg_ctl", &cluster);
            command
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_file())
                .arg("-o")
                .arg(server_options(port, &cluster))
                .args(["-w", "-t", "60", "start"])
                // Out of the terminal's process group: a Ctrl-C now must not kill pg_ctl
                // between forking the server and its postmaster.pid appearing, or the
                // guard would not know there is a server to stop. The flag is checked
                // when pg_ctl returns.
                .process_group(0);
            match run_step("pg_ctl start", &mut command) {
                Ok(_) => {
                    info!(port, "PostgreSQL is ready");
                    return Ok(port);
                }
                Err(DemoError::Interrupted) => return Err(DemoError::Interrupted),
                Err(error) => warn!(attempt, port, %error, "PostgreSQL did not start"),
            }
        }
        let log = self.log_file();
        Err(DemoError::ClusterStart {
            attempts: START_ATTEMPTS,
            tail: fs::read_to_string(&log)
                .map(|text| last_lines(&text, 5))
                .unwrap_or_else(|error| format!("(cannot read it: {error})")),
            log,
        })
    }

    /// Creates the database and loads the data set; returns the server version.
    fn load_data(&self, port: u16) -> Result<String, DemoError> {
        run_step(
            "CREATE DATABASE",
            self.tools
                .psql(port, "postgres")
                .arg("-c")
                .arg(format!("CREATE DATABASE {DATABASE}")),
        )?;
        // Written to the folder, not piped, so that --keep shows what was loaded.
        let sql = self.dir.join(SQL_FILE);
        write_new_file(&sql, CRM_SQL, 0o644)?;
        run_step(
            "loading the demo data set",
            self.tools
                .psql(port, DATABASE)
                .arg("--single-transaction")
                .arg("-f")
                .arg(&sql),
        )?;
        let facts = run_step(
            "checking the demo data set",
            self.tools.psql(port, DATABASE).args([
                "-t",
                "-A",
                "-c",
                "SELECT current_setting('server_version'), \
                 (SELECT count(*) FROM customers), (SELECT count(*) FROM orders)",
            ]),
        )?;
        let mut fields = facts.trim().split('|');
        let version = fields.next().unwrap_or_default().to_string();
        info!(
            version = %version,
            customers = fields.next().unwrap_or("?"),
            orders = fields.next().unwrap_or("?"),
            "demo CRM loaded"
        );
        Ok(version)
    }

    /// Writes the policy, a fresh keyring and the proxy config; returns the config path.
    fn write_proxy_files(
        &self,
        listen_port: u16,
        upstream_port: u16,
    ) -> Result<PathBuf, DemoError> {
        write_new_file(&self.dir.join(POLICY_FILE), POLICY_YAML, 0o644)?;
        let mut key = [0u8; 32];
        let random = Path::new("/dev/urandom");
        fs::File::open(random)
            .and_then(|mut source| source.read_exact(&mut key))
            .map_err(|error| DemoError::Io {
                what: "cannot read",
                path: random.to_path_buf(),
                error,
            })?;
        // Only pgveil's own user may read the key: not the postgres account, which is
        // exactly who must never hold it.
        write_new_file(&self.dir.join(KEYRING_FILE), &keyring_yaml(&key), 0o600)?;
        let config = self.dir.join(CONFIG_FILE);
        write_new_file(&config, &config_yaml(listen_port, upstream_port), 0o644)?;
        Ok(config)
    }

    /// Stops the cluster if it runs: `-m fast` ends sessions and rolls back, which is
    /// all a throwaway cluster needs; `immediate` if that fails.
    fn stop_cluster(&self) {
        if !self.data_dir().join("postmaster.pid").exists() {
            return;
        }
        for mode in ["fast", "immediate"] {
            let mut command = self.tools.server("pg_ctl", &self.dir);
            command
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", mode, "-w", "-t", "30", "stop"])
                // An impatient second Ctrl-C must not cut the stop short.
                .process_group(0);
            match command.output() {
                Ok(output) if output.status.success() => {
                    info!("PostgreSQL stopped");
                    return;
                }
                Ok(output) => warn!(
                    mode,
                    output = %one_line(&output),
                    "pg_ctl stop failed"
                ),
                Err(error) => warn!(mode, %error, "cannot run pg_ctl stop"),
            }
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.stop_cluster();
        if self.keep {
            eprintln!(
                "pgveil demo: kept {} (config {CONFIG_FILE}, {POLICY_FILE}, {KEYRING_FILE}, \
                 {SQL_FILE}, PostgreSQL data in {CLUSTER_DIR}/data)",
                self.dir.display()
            );
            return;
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => info!(dir = %self.dir.display(), "demo folder removed"),
            Err(error) => warn!(dir = %self.dir.display(), %error, "cannot remove the demo folder"),
        }
    }
}

/// The postgres options pg_ctl passes on: loopback only, the socket in our folder (not
/// /var/run/postgresql, which may not exist or belong to a real cluster), and no
/// durability, since everything is deleted at the end. pg_ctl hands the string to a
/// shell, hence the quoting.
fn server_options(port: u16, socket_dir: &Path) -> String {
    format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off",
        shell_quote(socket_dir.as_os_str())
    )
}

fn shell_quote(text: &OsStr) -> String {
    format!("'{}'", text.to_string_lossy().replace('\'', r"'\''"))
}

/// Creates `path` (which must not exist) with `mode` and writes `text`.
fn write_new_file(path: &Path, text: &str, mode: u32) -> Result<(), DemoError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|error| DemoError::Io {
            what: "cannot write",
            path: path.to_path_buf(),
            error,
        })
}

/// Runs a set-up step and returns its stdout; a failure carries the tool's own words.
fn run_step(step: &'static str, command: &mut Command) -> Result<String, DemoError> {
    debug!(step, ?command, "running");
    let output = command.output().map_err(|error| DemoError::Spawn {
        program: command.get_program().to_string_lossy().into_owned(),
        error,
    })?;
    if interrupted() {
        return Err(DemoError::Interrupted);
    }
    if !output.status.success() {
        return Err(DemoError::Step {
            step,
            status: output.status.to_string(),
            output: one_line(&output),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A tool's complaint on one line: the end of stderr (stdout when stderr is empty).
fn one_line(output: &std::process::Output) -> String {
    let stream = if output.stderr.iter().all(u8::is_ascii_whitespace) {
        &output.stdout
    } else {
        &output.stderr
    };
    last_lines(&String::from_utf8_lossy(stream), 6)
}

/// The last `count` non-empty lines of `text`, joined with " | ", at most 800 characters.
fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let joined = lines[lines.len().saturating_sub(count)..].join(" | ");
    match joined.char_indices().nth(800) {
        Some((end, _)) => format!("{}…", &joined[..end]),
        None if joined.is_empty() => "(no output)".to_string(),
        None => joined,
    }
}

// --- generated text ----------------------------------------------------------------------

/// The proxy config for the demo (SPEC.md "Config file"). Paths are relative: they
/// resolve against the config's folder, so a kept folder stays self-contained.
fn config_yaml(listen_port: u16, upstream_port: u16) -> String {
    format!(
        "# pgveil demo config, written by `pgveil demo` (format: SPEC.md \"Config file\").\n\
         # Relative paths resolve against this file's folder.\n\
         listen: 127.0.0.1:{listen_port}\n\
         upstream:\n\
         \x20 host: 127.0.0.1\n\
         \x20 port: {upstream_port}\n\
         \x20 # The throwaway cluster listens on loopback only and has no certificate.\n\
         \x20 sslmode: disable\n\
         catalog:\n\
         \x20 user: {CATALOG_LOGIN}\n\
         \x20 database: {DATABASE}\n\
         policy: {POLICY_FILE}\n\
         keyring: {KEYRING_FILE}\n\
         # Every statement touching a protected column, or refused, is one record here.\n\
         audit:\n\
         \x20 path: {AUDIT_FILE}\n\
         limits:\n\
         \x20 # psql sessions left open should not hold Ctrl-C up for long.\n\
         \x20 shutdown_grace_seconds: {SHUTDOWN_GRACE_SECONDS}\n"
    )
}

/// A keyring with one active key (SPEC.md "Keyring file").
fn keyring_yaml(key: &[u8; 32]) -> String {
    format!(
        "# pgveil demo keyring: one random key, for the `hash` mask. It exists only for this\n\
         # demo and is deleted with it.\n\
         active: k1\n\
         keys:\n\
         \x20 k1: {}\n",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// What the banner reports.
struct BannerFacts<'a> {
    listen_port: u16,
    upstream_port: u16,
    server_version: &'a str,
    dir: &'a Path,
    psql: &'a str,
    keep: bool,
}

fn connect_line(psql: &str, port: u16, user: &str) -> String {
    format!("{psql} \"host=127.0.0.1 port={port} user={user} dbname={DATABASE}\"")
}

/// The text printed once everything is ready.
fn banner(facts: &BannerFacts) -> String {
    let version = facts
        .server_version
        .split_whitespace()
        .next()
        .unwrap_or("?");
    let mut text = format!(
        "\npgveil demo: a throwaway PostgreSQL {version} with a small CRM (database {DATABASE}: \
         customers, orders,\nviews customer_contacts and support_queue), pgveil in front of it \
         on 127.0.0.1:{}.\n\nConnect as one of the demo roles (no passwords):\n\n",
        facts.listen_port
    );
    for login in &LOGINS {
        text.push_str(&format!(
            "  {:<8} {}\n           {}\n",
            login.role,
            connect_line(facts.psql, facts.listen_port, login.login),
            login.sees
        ));
    }
    text.push_str(&format!(
        "\n  the database itself, around pgveil (superuser, to compare):\n           {}\n",
        connect_line(facts.psql, facts.upstream_port, SUPERUSER)
    ));
    text.push_str(
        "\nThen try:\n\
         \x20 SELECT name, phone, id_card, email FROM customers LIMIT 3;\n\
         \x20 SELECT name, phone, email, address FROM customers LIMIT 3;\n\
         \x20 SELECT * FROM support_queue LIMIT 3;   -- a view over a view: same rules\n",
    );
    let files = if facts.keep {
        "kept after exit"
    } else {
        "deleted on exit"
    };
    text.push_str(&format!(
        "\nFiles ({files}): {dir}/{CONFIG_FILE}, {dir}/{POLICY_FILE} (edit it: pgveil reloads it),\n\
         {dir}/{AUDIT_FILE} (the audit log: pgveil audit verify {dir}/{AUDIT_FILE})\n\
         Ctrl-C stops pgveil and PostgreSQL{removes}.\n\n",
        dir = facts.dir.display(),
        removes = if facts.keep {
            ""
        } else {
            " and deletes the demo data"
        }
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::fs::symlink;

    /// A fresh folder under the system temp folder, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "pgveil-demo-test-{name}-{}-{:x}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_nanos())
                    .unwrap_or(0)
            ));
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        /// A folder with empty files named after `programs`.
        fn bindir(&self, relative: &str, programs: &[&str]) -> PathBuf {
            let dir = self.0.join(relative);
            fs::create_dir_all(&dir).unwrap();
            for program in programs {
                fs::write(dir.join(program), "").unwrap();
            }
            dir
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const SERVER: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

    fn path_of(dirs: &[&Path]) -> OsString {
        std::env::join_paths(dirs).unwrap()
    }

    #[test]
    fn path_comes_first_and_needs_all_three_programs() {
        let scratch = Scratch::new("path");
        let lonely = scratch.bindir("lonely", &["initdb"]);
        let full = scratch.bindir("full", &SERVER);
        let versions = scratch.bindir("lib", &[]);
        scratch.bindir("lib/16/bin", &SERVER);
        let path = path_of(&[&lonely, &full]);
        let found = find_server_bindir(Some(&path), || None, &versions);
        assert_eq!(found, Some(full));
    }

    #[test]
    fn a_symlinked_initdb_on_path_leads_to_its_real_folder() {
        let scratch = Scratch::new("symlink");
        let real = scratch.bindir("usr/lib/postgresql/15/bin", &SERVER);
        let local = scratch.bindir("usr/local/bin", &[]);
        symlink(real.join("initdb"), local.join("initdb")).unwrap();
        let path = path_of(&[&local]);
        let found = find_server_bindir(Some(&path), || None, &scratch.0.join("nowhere"));
        let real = real.canonicalize().unwrap();
        assert_eq!(found.as_ref(), Some(&real));
        // Also when all three are linked there (the real folder has psql too).
        for program in ["pg_ctl", "postgres"] {
            symlink(real.join(program), local.join(program)).unwrap();
        }
        let found = find_server_bindir(Some(&path), || None, &scratch.0.join("nowhere"));
        assert_eq!(found, Some(real));
    }

    #[test]
    fn pg_config_comes_before_the_versioned_folders() {
        let scratch = Scratch::new("pgconfig");
        let configured = scratch.bindir("configured", &SERVER);
        let versions = scratch.bindir("lib", &[]);
        scratch.bindir("lib/16/bin", &SERVER);
        let found = find_server_bindir(None, || Some(configured.clone()), &versions);
        assert_eq!(found, Some(configured));
        // A pg_config that names a folder without the server programs is skipped.
        let client_only = scratch.bindir("client", &["psql"]);
        let found = find_server_bindir(None, || Some(client_only), &versions);
        assert_eq!(found, Some(versions.join("16/bin")));
    }

    #[test]
    fn the_newest_complete_version_wins() {
        let scratch = Scratch::new("versions");
        let root = scratch.bindir("lib", &[]);
        scratch.bindir("lib/9.6/bin", &SERVER);
        scratch.bindir("lib/15/bin", &SERVER);
        scratch.bindir("lib/17/bin", &["psql"]); // client only
        scratch.bindir("lib/notes", &[]);
        assert_eq!(newest_versioned_bindir(&root), Some(root.join("15/bin")));
        assert_eq!(
            find_server_bindir(Some(OsStr::new("")), || None, &root.join("none")),
            None
        );
    }

    #[test]
    fn the_config_is_valid_and_points_at_the_demo_files() {
        let config = Config::parse(&config_yaml(6432, 54321), "demo.yaml").unwrap();
        config.validate("demo.yaml").unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:6432");
        assert_eq!(config.upstream.host, "127.0.0.1");
        assert_eq!(config.upstream.port, 54321);
        assert_eq!(config.upstream.sslmode, crate::config::SslMode::Disable);
        let catalog = config.catalog.unwrap();
        assert_eq!(catalog.user, CATALOG_LOGIN);
        assert_eq!(catalog.database.as_deref(), Some(DATABASE));
        assert_eq!(config.policy, Some(PathBuf::from(POLICY_FILE)));
        assert_eq!(config.keyring, Some(PathBuf::from(KEYRING_FILE)));
        assert_eq!(config.limits.shutdown_grace_seconds, SHUTDOWN_GRACE_SECONDS);
        assert_eq!(
            config.audit.map(|audit| audit.path).as_deref(),
            Some(AUDIT_FILE)
        );
        assert!(config.tls.is_none());
    }

    #[test]
    fn config_load_resolves_the_demo_files_beside_it() {
        let scratch = Scratch::new("load");
        let path = scratch.0.join(CONFIG_FILE);
        fs::write(&path, config_yaml(7000, 7001)).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.policy, Some(scratch.0.join(POLICY_FILE)));
        assert_eq!(config.keyring, Some(scratch.0.join(KEYRING_FILE)));
        let audit = config.audit.map(|audit| PathBuf::from(audit.path));
        assert_eq!(audit, Some(scratch.0.join(AUDIT_FILE)));
    }

    #[test]
    fn the_keyring_holds_one_active_32_byte_key() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let text = keyring_yaml(&key);
        assert!(text.contains("\nactive: k1\n"), "{text}");
        let encoded = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("k1: "))
            .unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, key);
    }

    #[test]
    fn written_files_are_new_and_keep_their_mode() {
        let scratch = Scratch::new("write");
        let path = scratch.0.join("keyring.yaml");
        write_new_file(&path, "active: k1\n", 0o600).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Never overwrites: the demo folder is new, so an existing file is a surprise.
        assert!(write_new_file(&path, "x", 0o600).is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "active: k1\n");
    }

    #[test]
    fn the_banner_has_a_ready_psql_line_per_role() {
        let text = banner(&BannerFacts {
            listen_port: 6432,
            upstream_port: 54321,
            server_version: "15.18 (Debian 15.18-0+deb12u1)",
            dir: Path::new("/tmp/pgveil-demo-1"),
            psql: "psql",
            keep: false,
        });
        assert!(
            text.contains(
                "  billing  psql \"host=127.0.0.1 port=6432 user=billing_svc dbname=crm\""
            ),
            "{text}"
        );
        for login in &LOGINS {
            assert!(
                text.contains(&format!("port=6432 user={} dbname=crm", login.login)),
                "{text}"
            );
        }
        assert!(
            text.contains("port=54321 user=postgres dbname=crm"),
            "{text}"
        );
        assert!(text.contains("SELECT name, phone, id_card, email FROM customers LIMIT 3;"));
        assert!(text.contains("PostgreSQL 15.18 "), "{text}");
        assert!(text.contains("deletes the demo data"), "{text}");
    }

    #[test]
    fn the_data_set_creates_every_demo_role() {
        for role in LOGINS
            .iter()
            .map(|login| login.login)
            .chain([CATALOG_LOGIN])
        {
            assert!(
                CRM_SQL.contains(&format!("CREATE ROLE {role} LOGIN;")),
                "crm.sql does not create login {role}"
            );
        }
        assert!(CRM_SQL.contains("CREATE ROLE crm_support NOLOGIN;"));
        assert!(CRM_SQL.contains("GRANT crm_support TO alice;"));
        assert!(CRM_SQL.contains("CREATE VIEW public.customer_contacts AS"));
        assert!(CRM_SQL.contains("CREATE VIEW public.support_queue AS"));
        // The policy's member names are the roles crm.sql creates.
        for member in ["billing_svc", "crm_support", "bi_reader"] {
            assert!(
                POLICY_YAML.contains(&format!("members: [{member}]")),
                "{member}"
            );
        }
    }

    #[test]
    fn the_data_set_has_every_table_and_column_the_policy_names() {
        let policy = spec_shape::parse(POLICY_YAML).unwrap();
        assert!(!policy.tables.is_empty());
        for (table, spec) in &policy.tables {
            let columns = spec_shape::create_table_columns(CRM_SQL, table)
                .unwrap_or_else(|| panic!("crm.sql has no CREATE TABLE {table}"));
            for column in spec.columns.keys() {
                assert!(
                    columns.contains(column),
                    "policy names {table}.{column}, which crm.sql does not create: {columns:?}"
                );
            }
        }
    }

    #[test]
    fn the_data_set_rows_look_like_what_the_masks_expect() {
        let Some(start) = CRM_SQL.find("INSERT INTO public.customers") else {
            panic!("no customers INSERT");
        };
        let rows: Vec<&str> = CRM_SQL[start..]
            .lines()
            .skip(1)
            .take_while(|line| line.trim_start().starts_with('('))
            .collect();
        assert_eq!(rows.len(), 20);
        for row in rows {
            let fields: Vec<&str> = row.split('\'').collect();
            // ('name', 'phone', 'id_card', ...: the quoted values sit at odd indexes.
            let phone = fields[3];
            let id_card = fields[5];
            assert!(
                phone.len() == 11
                    && phone.starts_with('1')
                    && phone.bytes().all(|b| b.is_ascii_digit()),
                "{row}"
            );
            assert_eq!(id_card.len(), 18, "{row}");
            assert_eq!(
                id_card_check_digit(&id_card[..17]),
                id_card.as_bytes()[17],
                "{row}"
            );
        }
    }

    /// GB 11643 check character of the first 17 digits of a resident ID.
    fn id_card_check_digit(first17: &str) -> u8 {
        const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
        let sum: u32 = first17
            .bytes()
            .zip(WEIGHTS)
            .map(|(digit, weight)| u32::from(digit - b'0') * weight)
            .sum();
        b"10X98765432"[(sum % 11) as usize]
    }

    #[test]
    fn the_demo_and_example_policies_follow_the_spec_format() {
        for (name, text) in [
            ("src/demo/policy.yaml", POLICY_YAML),
            ("policies/crm.yaml", include_str!("../../policies/crm.yaml")),
            ("policies/erp.yaml", include_str!("../../policies/erp.yaml")),
        ] {
            let policy = spec_shape::parse(text).unwrap_or_else(|error| panic!("{name}: {error}"));
            if let Err(error) = spec_shape::check(&policy) {
                panic!("{name}: {error}");
            }
        }
        // The demo uses no encryption: its data is loaded in plaintext.
        let demo = spec_shape::parse(POLICY_YAML).unwrap();
        assert!(demo
            .tables
            .values()
            .flat_map(|table| table.columns.values())
            .all(|column| column.encrypt.as_deref().unwrap_or("none") == "none"));
    }

    #[test]
    fn server_options_quote_the_socket_folder_for_the_shell() {
        let options = server_options(5555, Path::new("/tmp/it's here"));
        assert!(
            options.starts_with("-p 5555 -k '/tmp/it'\\''s here' "),
            "{options}"
        );
        assert!(options.contains("listen_addresses=127.0.0.1"));
        assert!(options.contains("fsync=off"));
    }

    #[test]
    fn a_busy_port_is_reported_with_a_hint() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let error = claim_listen_port(port).unwrap_err().to_string();
        assert!(
            error.contains(&format!("127.0.0.1:{port} is already in use")),
            "{error}"
        );
        assert!(error.contains("--port"), "{error}");
        assert_ne!(claim_listen_port(0).unwrap(), 0);
    }

    #[test]
    fn tool_output_becomes_one_line() {
        assert_eq!(last_lines("a\n\n b \nc\nd\n", 2), "c | d");
        assert_eq!(last_lines("", 3), "(no output)");
        let long = "长".repeat(1000);
        assert_eq!(last_lines(&long, 1).chars().count(), 801);
    }
}
