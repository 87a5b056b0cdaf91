//! Test harness: one throwaway PostgreSQL cluster per test binary, and pgveil processes
//! in front of it.
//!
//! The cluster is created on first use (initdb and pg_ctl through `runuser -u postgres`
//! when the tests run as root), listens on a free loopback port with fsync off, serves
//! TLS with a throwaway certificate, and is stopped and deleted when the test binary
//! exits. Each `Proxy` is a real `pgveil run` child process, killed when dropped.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Logins the cluster knows, with the authentication pg_hba demands for each over TCP.
pub const MD5_USER: &str = "md5_user";
pub const SCRAM_USER: &str = "scram_user";
pub const CLEARTEXT_USER: &str = "cleartext_user";
pub const PASSWORD: &str = "s3cret-pässword";
pub const SUPERUSER: &str = "postgres";

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    pub bin: PathBuf,
    /// The test CA's certificate.
    pub ca: PathBuf,
    /// Server certificate (CN localhost, SAN localhost and 127.0.0.1) signed by `ca`,
    /// and its key; used by the cluster and by pgveil's client-facing TLS.
    pub cert: PathBuf,
    pub key: PathBuf,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static CLEANUP: Mutex<Option<(PathBuf, PathBuf)>> = Mutex::new(None);

/// The shared cluster of this test binary, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(Cluster::start)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL server binary as the `postgres` user when we are root.
fn pg_command(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        command
    } else {
        Command::new(bin.join(tool))
    }
}

fn find_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    candidates.sort_by_key(|path| {
        path.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates
        .pop()
        .expect("no PostgreSQL server binaries: install postgresql or set PG_BINDIR")
}

/// A TCP port nothing listens on right now.
/// Writes `policy` to `policy.yaml` in a fresh folder of the cluster's directory and
/// returns its path.
pub fn write_policy(policy: &str) -> PathBuf {
    let dir = cluster().dir.join(format!("policy-{}", free_port()));
    std::fs::create_dir_all(&dir).expect("policy dir");
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy).expect("write policy");
    path
}

/// Config lines (for `ProxyOptions::extra_yaml`) that load the policy at `path` and
/// read the catalog of database `postgres` as `catalog_user`.
pub fn policy_yaml(catalog_user: &str, path: &Path) -> String {
    format!(
        "catalog:\n  user: {catalog_user}\n  database: postgres\npolicy: {}\n",
        path.display()
    )
}

/// A new, empty directory under the target's temp dir, named `prefix-PID-N`. That dir
/// outlives test runs: a name that can come round again (a port number) could hand a
/// test the files and subdirectories an earlier run left behind.
pub fn fresh_target_dir(prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => panic!("cannot empty {}: {error}", dir.display()),
    }
    std::fs::create_dir_all(&dir).expect("test dir");
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("no free port")
}

fn run_ok(command: &mut Command, what: &str) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

extern "C" fn stop_cluster_at_exit() {
    let Ok(mut guard) = CLEANUP.lock() else {
        return;
    };
    if let Some((bin, dir)) = guard.take() {
        let _ = pg_command(&bin, "pg_ctl")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl Cluster {
    fn start() -> Cluster {
        let bin = find_bindir();
        let dir = std::env::temp_dir().join(format!(
            "pgveil-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        if is_root() {
            run_ok(
                Command::new("chown").arg("postgres:postgres").arg(&dir),
                "chown cluster dir",
            );
        }
        let data = dir.join("data");
        run_ok(
            pg_command(&bin, "initdb").arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]),
            "initdb",
        );

        // TLS material for the cluster and for pgveil's own TLS tests: a CA, and a
        // server certificate it signed (CN localhost, SAN localhost and 127.0.0.1).
        let ca = dir.join("ca.crt");
        let ca_key = dir.join("ca.key");
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        let csr = dir.join("server.csr");
        let extensions = dir.join("server.ext");
        run_ok(
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=pgveil test CA"])
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca),
            "openssl CA",
        );
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
            "openssl server key",
        );
        std::fs::write(
            &extensions,
            "basicConstraints=CA:FALSE
subjectAltName=DNS:localhost,IP:127.0.0.1
",
        )
        .expect("write extensions");
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&extensions)
                .arg("-out")
                .arg(&cert),
            "openssl sign server certificate",
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        if is_root() {
            run_ok(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&cert)
                    .arg(&key),
                "chown TLS files",
            );
        }

        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 host all {MD5_USER} 127.0.0.1/32 md5\n\
                 host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
                 host all {CLEARTEXT_USER} 127.0.0.1/32 password\n\
                 host all all 127.0.0.1/32 trust\n"
            ),
        )
        .expect("write pg_hba.conf");

        *CLEANUP.lock().expect("cleanup lock") = Some((bin.clone(), dir.clone()));
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(stop_cluster_at_exit);
        }

        let mut port = 0;
        for attempt in 0..5 {
            port = free_port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
                 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                dir.display(),
                cert.display(),
                key.display()
            );
            let status = pg_command(&bin, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(&options)
                .arg("-l")
                .arg(dir.join("postgres.log"))
                .args(["-w", "-t", "60", "start"])
                .stdout(Stdio::null())
                .status()
                .expect("pg_ctl start");
            if status.success() {
                break;
            }
            assert!(
                attempt < 4,
                "PostgreSQL did not start; see {}",
                dir.join("postgres.log").display()
            );
        }
        let cluster = Cluster {
            port,
            dir,
            bin,
            ca,
            cert,
            key,
        };
        cluster.psql_ok(
            SUPERUSER,
            &format!(
                "SET password_encryption = 'md5'; \
                 CREATE ROLE {MD5_USER} LOGIN PASSWORD '{PASSWORD}'; \
                 SET password_encryption = 'scram-sha-256'; \
                 CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{PASSWORD}'; \
                 CREATE ROLE {CLEARTEXT_USER} LOGIN PASSWORD '{PASSWORD}'; \
                 GRANT ALL ON SCHEMA public TO PUBLIC;"
            ),
        );
        cluster
    }

    /// Runs SQL directly against the cluster (around pgveil) and returns stdout.
    pub fn psql_ok(&self, user: &str, sql: &str) -> String {
        let output = run_ok(
            Command::new(self.bin.join("psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .arg(format!(
                    "host=127.0.0.1 port={} user={user} dbname=postgres sslmode=disable",
                    self.port
                ))
                .arg("-c")
                .arg(sql),
            "psql (direct)",
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A tokio-postgres connection straight to the cluster, bypassing pgveil.
    pub async fn direct(&self) -> tokio_postgres::Client {
        connect_to(self.port, SUPERUSER, None).await
    }
}

/// A running `pgveil run` process.
pub struct Proxy {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    log: PathBuf,
}

/// Settings of a test proxy beyond the defaults.
#[derive(Clone, Default)]
pub struct ProxyOptions {
    /// Extra YAML appended to the generated config (top-level keys).
    pub extra_yaml: String,
    /// `upstream.sslmode` (default `prefer`).
    pub sslmode: Option<String>,
    /// Upstream port instead of the cluster's.
    pub upstream_port: Option<u16>,
    /// `upstream.ca` (for `verify-full`).
    pub upstream_ca: Option<PathBuf>,
    /// Serve TLS to clients with the harness certificate.
    pub tls: bool,
}

impl Proxy {
    /// pgveil with the default test config in front of the shared cluster.
    pub fn start() -> Proxy {
        Proxy::start_with(ProxyOptions::default())
    }

    pub fn start_with(options: ProxyOptions) -> Proxy {
        let cluster = cluster();
        let dir = cluster.dir.join(format!("proxy-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("proxy dir");
        let port = free_port();
        let mut config = format!(
            "listen: 127.0.0.1:{port}\nupstream:\n  host: 127.0.0.1\n  port: {}\n  sslmode: {}\n",
            options.upstream_port.unwrap_or(cluster.port),
            options.sslmode.as_deref().unwrap_or("prefer"),
        );
        if let Some(ca) = &options.upstream_ca {
            config.push_str(&format!("  ca: {}\n", ca.display()));
        }
        if options.tls {
            config.push_str(&format!(
                "tls:\n  cert: {}\n  key: {}\n",
                cluster.cert.display(),
                cluster.key.display()
            ));
        }
        config.push_str(&options.extra_yaml);
        let config_path = dir.join("pgveil.yaml");
        std::fs::write(&config_path, config).expect("write proxy config");
        let log = dir.join("pgveil.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pgveil"))
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("PGVEIL_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("proxy log"))
            .spawn()
            .expect("spawn pgveil");
        let mut proxy = Proxy {
            child,
            port,
            dir,
            log,
        };
        proxy.wait_until_listening();
        proxy
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pgveil exited early ({status}):\n{}", self.log());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pgveil did not start listening:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the pgveil process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with a valid pid of our own child.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub async fn connect(&self, user: &str) -> tokio_postgres::Client {
        connect_to(self.port, user, None).await
    }

    /// A superuser connection to a proxy on `port` (for tasks that cannot borrow it).
    pub async fn connect_port(port: u16) -> tokio_postgres::Client {
        connect_to(port, SUPERUSER, None).await
    }

    pub async fn connect_with_password(
        &self,
        user: &str,
        password: &str,
    ) -> tokio_postgres::Client {
        connect_to(self.port, user, Some(password)).await
    }

    pub async fn try_connect(
        &self,
        user: &str,
        password: Option<&str>,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        try_connect_to(self.port, user, password).await
    }

    /// Runs psql through pgveil with `args` and returns its output (not asserted).
    pub fn psql<I, S>(&self, user: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.psql_env(user, args, &[])
    }

    pub fn psql_env<I, S>(&self, user: &str, args: I, env: &[(&str, &str)]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(cluster().bin.join("psql"));
        command
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={} user={user} dbname=postgres",
                self.port
            ))
            .args(args)
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().expect("run psql")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pgveil log ---\n{}", self.log());
        }
    }
}

async fn try_connect_to(
    port: u16,
    user: &str,
    password: Option<&str>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname("postgres")
        .application_name("pgveil-tests")
        .connect_timeout(Duration::from_secs(10));
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn connect_to(port: u16, user: &str, password: Option<&str>) -> tokio_postgres::Client {
    try_connect_to(port, user, password)
        .await
        .unwrap_or_else(|e| panic!("connect as {user} to port {port}: {e:?}"))
}

/// The SQLSTATE of a tokio-postgres error, or a description of why there is none.
pub fn sqlstate(error: &tokio_postgres::Error) -> String {
    error
        .code()
        .map(|code| code.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {error:?}"))
}

/// A hand-driven protocol client for what no client library sends: malformed frames,
/// FunctionCall, unknown message types, explicit pipelines.
pub struct RawClient {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

/// One backend message.
#[derive(Debug, Clone)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Message {
    /// A field of an ErrorResponse or NoticeResponse (`b'C'` = SQLSTATE, `b'M'` = message).
    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&kind, after)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let end = after.iter().position(|&b| b == 0)?;
            if kind == code {
                return Some(String::from_utf8_lossy(&after[..end]).into_owned());
            }
            rest = &after[end + 1..];
        }
        None
    }
}

pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = (3i32 << 16).to_be_bytes().to_vec();
    for (key, value) in params {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

pub fn cstr(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

impl RawClient {
    /// A TCP connection with nothing sent yet.
    pub fn open(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect raw client");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        RawClient {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Connected and authenticated (trust) as `user`, after the first ReadyForQuery.
    pub fn login(port: u16, user: &str, application_name: &str) -> RawClient {
        let mut client = RawClient::open(port);
        client.send(&startup_packet(&[
            ("user", user),
            ("database", "postgres"),
            ("application_name", application_name),
        ]));
        let messages = client.read_until(b'Z');
        assert!(
            messages.iter().any(|m| m.tag == b'R'),
            "no authentication message: {messages:?}"
        );
        client
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw send");
    }

    /// The next message, or `None` at end of stream.
    pub fn read_message(&mut self) -> Option<Message> {
        loop {
            if self.buffer.len() >= 5 {
                let length = i32::from_be_bytes([
                    self.buffer[1],
                    self.buffer[2],
                    self.buffer[3],
                    self.buffer[4],
                ]) as usize;
                if self.buffer.len() > length {
                    let body = self.buffer[5..1 + length].to_vec();
                    let tag = self.buffer[0];
                    self.buffer.drain(..1 + length);
                    return Some(Message { tag, body });
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("raw read: {e}"),
            }
        }
    }

    /// Reads messages up to and including the first with `tag`.
    pub fn read_until(&mut self, tag: u8) -> Vec<Message> {
        let mut messages = Vec::new();
        loop {
            let message = self.read_message().unwrap_or_else(|| {
                panic!(
                    "connection closed before {:?}: {messages:?}",
                    char::from(tag)
                )
            });
            let done = message.tag == tag;
            messages.push(message);
            if done {
                return messages;
            }
        }
    }

    /// Reads everything until the connection closes.
    pub fn read_to_end(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        while let Some(message) = self.read_message() {
            messages.push(message);
        }
        messages
    }

    /// Whether the peer has closed the connection (reads to end, ignoring bytes).
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream
            .set_read_timeout(Some(limit))
            .expect("read timeout");
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// The tags of `messages` as a string, for compact assertions (`"12TDCZ"`).
pub fn tags(messages: &[Message]) -> String {
    messages.iter().map(|m| char::from(m.tag)).collect()
}

/// Waits until `condition` holds, polling every 50 ms, up to `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
