//! One client connection from accept to close: opening negotiation, upstream connect,
//! authentication relay, then the two pumps until either side ends.
//!
//! Every failure a client can be told about becomes a clear ErrorResponse (SQLSTATE
//! 08006 when the upstream is unreachable or gone, 08P01 for protocol violations, 53300
//! when the proxy is full). A failing session never affects another one and never
//! panics on input.

pub mod audit;
pub mod cancel;
pub mod conn;
pub mod copy_in;
pub mod crypt;
pub mod guard;
pub mod lineage;
pub mod negotiate;
pub mod pump;
pub mod state;
pub mod upstream;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::engine::Engine;
use crate::observe::audit_log::AuditLog;
use crate::wire::messages::{ErrorReport, Severity};
use crate::wire::startup::StartupError;
use audit::SessionAudit;
use cancel::CancelRegistry;
use conn::Framed;
use guard::{GuardError, ReadGuard};
use negotiate::{negotiate, Opening};
use pump::{Direction, Pump, PumpEnd, PumpError, Shared};
use state::StateError;
use upstream::AuthOutcome;

/// Why a session ended abnormally.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("client I/O: {0}")]
    ClientIo(io::Error),
    #[error("client TLS handshake: {0}")]
    ClientTls(io::Error),
    #[error("invalid startup packet: {0}")]
    ClientStartup(StartupError),
    #[error("protocol violation by client: {0}")]
    ClientProtocol(String),
    #[error("upstream I/O: {0}")]
    UpstreamIo(io::Error),
    #[error("cannot connect to upstream database {address}: {reason}")]
    UpstreamUnreachable { address: String, reason: String },
    #[error("TLS to upstream database {address}: {reason}")]
    UpstreamTls { address: String, reason: String },
    #[error("upstream closed the connection")]
    UpstreamClosed,
    #[error("protocol violation by upstream: {0}")]
    UpstreamProtocol(String),
    #[error("{}", .0.message)]
    Refused(ErrorReport),
    #[error("lost track of the protocol state: {0}")]
    Desync(String),
    #[error("the proxy is shutting down")]
    ProxyShuttingDown,
    #[error("startup did not complete within {0:?}")]
    StartupTimeout(Duration),
    #[error("policy unavailable: {0}")]
    PolicyUnavailable(String),
}

impl SessionError {
    /// The error to send the client, if any is worth sending.
    fn report(&self) -> Option<ErrorReport> {
        let fatal = |code, message: String| ErrorReport::new(Severity::Fatal, code, message);
        match self {
            SessionError::ClientIo(_) | SessionError::ClientTls(_) => None,
            SessionError::ClientStartup(error) => Some(fatal("08P01", format!("pgveil: {error}"))),
            SessionError::ClientProtocol(message) => {
                Some(fatal("08P01", format!("pgveil: protocol violation: {message}")))
            }
            SessionError::UpstreamUnreachable { address, reason } => Some(
                fatal(
                    "08006",
                    format!("pgveil: cannot connect to upstream database {address}: {reason}"),
                )
                .with_hint("check that PostgreSQL is running and that upstream in the pgveil config points at it"),
            ),
            SessionError::UpstreamTls { address, reason } => Some(
                fatal(
                    "08006",
                    format!("pgveil: cannot connect to upstream database {address}: {reason}"),
                )
                .with_hint("check upstream.sslmode and upstream.ca in the pgveil config against the server's TLS setup"),
            ),
            SessionError::UpstreamIo(error) => Some(fatal(
                "08006",
                format!("pgveil: connection to upstream database lost: {error}"),
            )),
            SessionError::UpstreamClosed => Some(fatal(
                "08006",
                "pgveil: upstream database closed the connection unexpectedly".into(),
            )),
            SessionError::UpstreamProtocol(message) => Some(fatal(
                "08006",
                format!("pgveil: upstream database sent an invalid message: {message}"),
            )),
            SessionError::Refused(report) => Some(report.clone()),
            SessionError::ProxyShuttingDown => Some(
                fatal("57P01", "pgveil: terminating connection because the proxy is shutting down".into())
                    .with_hint("reconnect when pgveil is back"),
            ),
            SessionError::Desync(problem) => Some(
                fatal(
                    "08P01",
                    format!("pgveil: lost track of the protocol state ({problem}); closing the session"),
                )
                .with_hint("this is a pgveil bug or an unusual client; please report it with the client's name"),
            ),
            SessionError::PolicyUnavailable(reason) => Some(
                fatal(
                    "08006",
                    format!("pgveil: cannot load what the policy protects in this database: {reason}"),
                )
                .with_hint("check the `catalog` login in the pgveil config; pgveil serves no session it cannot protect"),
            ),
            SessionError::StartupTimeout(limit) => Some(fatal(
                "08P01",
                format!("pgveil: startup and authentication did not complete within {} s", limit.as_secs()),
            )),
        }
    }
}

/// TLS towards the upstream server.
pub struct UpstreamTls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// Everything sessions share: configuration, TLS, the cancel registry and counters.
pub struct ProxyContext {
    pub config: Config,
    pub client_tls: Option<TlsAcceptor>,
    pub upstream_tls: Option<UpstreamTls>,
    /// The policy and catalogs, when a policy is configured.
    pub engine: Option<Arc<Engine>>,
    /// The audit log, when one is configured.
    pub audit: Option<Arc<AuditLog>>,
    pub cancels: CancelRegistry,
    sessions: AtomicUsize,
    /// Connections accepted and still negotiating (not yet sessions).
    opening: AtomicUsize,
    /// Set when the shutdown grace period is over: sessions say goodbye and close.
    closing: watch::Sender<bool>,
}

impl ProxyContext {
    pub fn new(
        config: Config,
        client_tls: Option<TlsAcceptor>,
        upstream_tls: Option<UpstreamTls>,
        engine: Option<Arc<Engine>>,
        audit: Option<Arc<AuditLog>>,
    ) -> Self {
        ProxyContext {
            config,
            client_tls,
            upstream_tls,
            engine,
            audit,
            cancels: CancelRegistry::default(),
            sessions: AtomicUsize::new(0),
            opening: AtomicUsize::new(0),
            closing: watch::Sender::new(false),
        }
    }

    /// Tells every open session to end now (FATAL 57P01 to its client).
    pub fn close_sessions(&self) {
        self.closing.send_replace(true);
    }

    /// Client sessions currently open.
    pub fn open_sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    fn try_admit(&self) -> Option<Admission<'_>> {
        Admission::take(&self.sessions, self.config.limits.max_connections)
    }

    /// A slot for a connection that has not finished its startup; as many may be
    /// starting as may be open.
    fn try_open(&self) -> Option<Admission<'_>> {
        Admission::take(&self.opening, self.config.limits.max_connections)
    }
}

impl<'a> Admission<'a> {
    fn take(counter: &'a AtomicUsize, limit: usize) -> Option<Self> {
        let before = counter.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Admission(counter))
    }
}

/// A counted slot, released on drop.
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// TCP keepalive: a peer that vanishes without a FIN (network partition, powered-off
/// host) is noticed within about two minutes instead of holding its slot forever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 6;

/// No Nagle delay (the protocol is request/response) and keepalive probes.
pub(crate) fn tune_socket(socket: &TcpStream) {
    let _ = socket.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(error) = socket2::SockRef::from(socket).set_tcp_keepalive(&keepalive) {
        debug!(%error, "cannot enable TCP keepalive");
    }
}

/// Serves one accepted client connection to the end.
pub async fn serve_client(socket: TcpStream, peer: SocketAddr, ctx: Arc<ProxyContext>) {
    // Connections still negotiating hold a file descriptor too: bound them like sessions.
    let Some(starting) = ctx.try_open() else {
        warn!(%peer, "too many connections still starting up; closing this one");
        return;
    };
    tune_socket(&socket);
    let startup_limit = ctx.config.limits.startup_timeout();
    // One deadline for TLS, startup and authentication together.
    let deadline = tokio::time::Instant::now() + startup_limit;
    let mut client = negotiate::accept(socket);
    let opening = match timeout_at(deadline, negotiate(&mut client, ctx.client_tls.as_ref())).await
    {
        Ok(Ok(Some(opening))) => opening,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            info!(%peer, %error, "client opening refused");
            tell_client(&mut client.conn, &error).await;
            return;
        }
        Err(_) => {
            info!(%peer, "client sent no startup packet in time");
            tell_client(
                &mut client.conn,
                &SessionError::StartupTimeout(startup_limit),
            )
            .await;
            return;
        }
    };
    drop(starting);
    match opening {
        Opening::Cancel(key) => cancel::forward(&ctx.cancels, key).await,
        Opening::Session(startup) => {
            let Some(_admission) = ctx.try_admit() else {
                warn!(%peer, limit = ctx.config.limits.max_connections, "connection limit reached");
                let report = ErrorReport::new(
                    Severity::Fatal,
                    "53300",
                    "pgveil: sorry, too many clients already",
                )
                .with_hint(format!(
                    "limits.max_connections is {}; raise it or close idle sessions",
                    ctx.config.limits.max_connections
                ));
                let _ = send_report(&mut client.conn, &report).await;
                return;
            };
            let _open = OpenConnection::new();
            let user = startup
                .parameter(b"user")
                .map(|u| String::from_utf8_lossy(u).into_owned())
                .unwrap_or_default();
            debug!(%peer, %user, "session starting");
            let (upstream, upstream_address, established) =
                match authenticate(&mut client, &startup, &ctx, deadline, startup_limit).await {
                    Ok(Some(ready)) => ready,
                    Ok(None) => return,
                    Err(error) => {
                        info!(%peer, %user, %error, "session refused");
                        count_upstream_error(&error);
                        tell_client(&mut client.conn, &error).await;
                        return;
                    }
                };
            let cancel_key = established.cancel_key;
            let _registration = cancel_key.map(|key| ctx.cancels.register(key, upstream_address));
            let database = startup
                .parameter(b"database")
                .map(|d| String::from_utf8_lossy(d).into_owned())
                .unwrap_or_else(|| user.clone());
            let audit = ctx.audit.as_ref().map(|log| {
                let session = audit::new_session_id();
                info!(%peer, %user, %session, backend_pid = cancel_key.map(|key| key.process_id), "audited session started");
                SessionAudit::new(
                    log.clone(),
                    session,
                    peer,
                    user.clone(),
                    database.clone(),
                    startup
                        .parameter(b"application_name")
                        .map(|name| String::from_utf8_lossy(name).into_owned())
                        .unwrap_or_default(),
                )
            });
            let guard = match &ctx.engine {
                None => None,
                Some(engine) => {
                    match read_guard(engine, database, user.clone(), ctx.audit.clone()).await {
                        Ok(mut guard) => {
                            guard.client_encoding_reported(established.client_encoding.as_deref());
                            Some(guard)
                        }
                        Err(error) => {
                            warn!(%peer, %user, %error, "session refused: policy unavailable");
                            tell_client(&mut client.conn, &error).await;
                            return;
                        }
                    }
                }
            };
            let inspect_limit = ctx.config.limits.max_inspected_message_bytes;
            match relay(
                client,
                upstream,
                guard,
                audit,
                inspect_limit,
                ctx.closing.subscribe(),
            )
            .await
            {
                None => debug!(%peer, %user, "session ended"),
                Some(error) => {
                    count_upstream_error(&error);
                    info!(%peer, %user, %error, "session ended with an error")
                }
            }
        }
    }
}

/// An admitted client session, counted in `pgveil_client_connections` while it lives
/// and in `pgveil_connections_total` once.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        let metrics = crate::observe::metrics();
        metrics.connections_total.inc();
        metrics.client_connections.inc();
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        crate::observe::metrics().client_connections.dec();
    }
}

/// Counts a session failure caused by the upstream server.
fn count_upstream_error(error: &SessionError) {
    if matches!(
        error,
        SessionError::UpstreamUnreachable { .. }
            | SessionError::UpstreamTls { .. }
            | SessionError::UpstreamIo(_)
            | SessionError::UpstreamClosed
            | SessionError::UpstreamProtocol(_)
    ) {
        crate::observe::metrics().upstream_errors_total.inc();
    }
}

/// Sends the client the report for `error`, when there is one worth sending.
async fn tell_client<W: AsyncWrite + Unpin>(writer: &mut W, error: &SessionError) {
    if let Some(report) = error.report() {
        let _ = send_report(writer, &report).await;
    }
}

/// Writes one of pgveil's own errors, without waiting long for a client that does not
/// read.
async fn send_report<W: AsyncWrite + Unpin>(
    writer: &mut W,
    report: &ErrorReport,
) -> io::Result<()> {
    let send = async {
        writer.write_all(&report.encode()).await?;
        writer.flush().await
    };
    match timeout(Duration::from_secs(5), send).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client did not read",
        )),
    }
}

/// Connects upstream and relays authentication. `Ok(None)` when the exchange ended
/// without a session (refused login, already reported by the server; or client gone).
async fn authenticate(
    client: &mut Framed,
    startup: &crate::wire::startup::StartupMessage,
    ctx: &ProxyContext,
    deadline: tokio::time::Instant,
    startup_limit: Duration,
) -> Result<Option<(Framed, SocketAddr, upstream::Established)>, SessionError> {
    let exchange = async {
        let (mut upstream, upstream_address) = upstream::connect(ctx).await?;
        let outcome = upstream::relay_authentication(client, &mut upstream, startup).await?;
        Ok::<_, SessionError>(match outcome {
            AuthOutcome::Ready(established) => Some((upstream, upstream_address, established)),
            AuthOutcome::Ended => None,
        })
    };
    timeout_at(deadline, exchange)
        .await
        .map_err(|_| SessionError::StartupTimeout(startup_limit))?
}

/// The read path of a session: its database's protection and the login's role.
async fn read_guard(
    engine: &Arc<Engine>,
    database: String,
    user: String,
    audit: Option<Arc<AuditLog>>,
) -> Result<ReadGuard, SessionError> {
    let unavailable =
        |error: crate::engine::EngineError| SessionError::PolicyUnavailable(error.to_string());
    let protection = engine.protection(&database).await.map_err(unavailable)?;
    let memberships = engine
        .memberships(&database, &user)
        .await
        .map_err(unavailable)?;
    Ok(ReadGuard::new(
        engine.clone(),
        database,
        user,
        memberships,
        protection,
        audit,
    ))
}

/// Runs both pumps until one side ends, then says what happened to the client when it
/// can still be told.
async fn relay(
    client: Framed,
    upstream: Framed,
    guard: Option<ReadGuard>,
    audit: Option<SessionAudit>,
    inspect_limit: usize,
    mut closing: watch::Receiver<bool>,
) -> Option<SessionError> {
    let state = Mutex::new(Shared::new(guard, audit));
    let (mut client_read, mut client_write) = client.conn.split();
    let (mut upstream_read, mut upstream_write) = upstream.conn.split();
    let mut to_server = Pump::new(Direction::ClientToServer, client.buf);
    let mut to_client =
        Pump::new(Direction::ServerToClient, upstream.buf).with_inspect_limit(inspect_limit);

    enum Ended {
        Client(Result<PumpEnd, PumpError>),
        Upstream(Result<PumpEnd, PumpError>),
        ProxyClosing,
    }
    let ended = tokio::select! {
        end = to_server.run(&mut client_read, &mut upstream_write, &state) => Ended::Client(end),
        end = to_client.run(&mut upstream_read, &mut client_write, &state) => Ended::Upstream(end),
        _ = closing.wait_for(|closing| *closing) => Ended::ProxyClosing,
    };
    let error = match ended {
        Ended::Client(Ok(PumpEnd::Terminated)) => {
            let _ = upstream_write.shutdown().await;
            None
        }
        Ended::Client(Ok(PumpEnd::Eof)) => {
            // The client closed its sending side. Like PostgreSQL, still deliver the
            // answers to what it sent: close upstream's sending side too and forward
            // until the server is done.
            let _ = upstream_write.shutdown().await;
            match to_client
                .run(&mut upstream_read, &mut client_write, &state)
                .await
            {
                Ok(_) | Err(PumpError::Write(_)) => None,
                Err(error) => Some(upstream_failure(error)),
            }
        }
        // The client is gone; dropping the upstream connection frees its backend.
        Ended::Client(Err(PumpError::Read(_))) => None,
        Ended::Client(Err(PumpError::Write(error))) => Some(SessionError::UpstreamIo(error)),
        Ended::Client(Err(error)) => Some(SessionError::ClientProtocol(error.to_string())),
        Ended::Upstream(Ok(_)) => {
            (!to_client.last_was_fatal_error()).then_some(SessionError::UpstreamClosed)
        }
        Ended::Upstream(Err(PumpError::Write(_))) => None,
        Ended::Upstream(Err(error)) => Some(upstream_failure(error)),
        Ended::ProxyClosing => {
            let _ = upstream_write.write_all(TERMINATE).await;
            Some(SessionError::ProxyShuttingDown)
        }
    };
    // Only between messages: a report inside a half-sent row would garble both.
    if let (Some(error), true) = (&error, to_client.at_message_boundary()) {
        tell_client(&mut client_write, error).await;
    }
    let _ = timeout(Duration::from_secs(1), client_write.shutdown()).await;
    error
}

const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// What a failure of the server→client direction means for the client.
fn upstream_failure(error: PumpError) -> SessionError {
    match error {
        PumpError::State(StateError::Desync { .. }) => SessionError::Desync(error.to_string()),
        PumpError::Read(error) | PumpError::Write(error) => SessionError::UpstreamIo(error),
        PumpError::Guard(GuardError::Refused(report)) => SessionError::Refused(*report),
        PumpError::TooLargeToInspect { .. } => SessionError::Refused(
            ErrorReport::new(Severity::Fatal, "54000", format!("pgveil: {error}; closing the session"))
                .with_hint("select fewer or smaller values per row, or raise limits.max_inspected_message_bytes in the pgveil config"),
        ),
        other => SessionError::UpstreamProtocol(other.to_string()),
    }
}
