//! The listener and its workers: accepts client connections, hands each to one of
//! `workers` single-threaded event loops as a task, and shuts down gracefully on
//! SIGTERM or SIGINT (stop accepting, let sessions finish for the grace period, then
//! close what is left; a second signal closes at once).
//!
//! Start-up fails early and clearly: the listen address, TLS files and upstream TLS
//! settings are checked before the first client is accepted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::observe;
use crate::observe::audit_log::{AuditLog, AuditLogError};
use crate::session::{serve_client, ProxyContext, UpstreamTls};
use crate::tls::{self, TlsError};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {address}: {error}")]
    Listen {
        address: String,
        error: std::io::Error,
    },
    #[error("tls: {0}")]
    ClientTls(TlsError),
    #[error("upstream TLS: {0}")]
    UpstreamTls(TlsError),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot start worker threads: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Policy(#[from] EngineError),
    #[error("audit: {0}")]
    Audit(#[from] AuditLogError),
}

/// How often every loaded catalog is read again, to notice DDL that did not pass
/// through pgveil.
const CATALOG_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// How often the policy file is checked for changes.
const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Builds the shared context: loads TLS material once, up front.
pub fn build_context(config: Config) -> Result<ProxyContext, ServerError> {
    let client_tls = match &config.tls {
        Some(settings) => Some(TlsAcceptor::from(
            tls::server_config(&settings.cert, &settings.key).map_err(ServerError::ClientTls)?,
        )),
        None => None,
    };
    let upstream_tls =
        match tls::upstream_config(config.upstream.sslmode, config.upstream.ca.as_deref())
            .map_err(ServerError::UpstreamTls)?
        {
            Some(client_config) => Some(UpstreamTls {
                connector: TlsConnector::from(client_config),
                server_name: tls::upstream_server_name(&config.upstream.host)
                    .map_err(ServerError::UpstreamTls)?,
            }),
            None => None,
        };
    let engine = match &config.policy {
        Some(_) => Some(Arc::new(Engine::new(&config)?)),
        None => None,
    };
    let audit = match &config.audit {
        Some(settings) => {
            let log = AuditLog::start(settings)?;
            match log.problem() {
                None => {
                    info!(path = %log.target(), all_statements = settings.all_statements, "audit log open")
                }
                Some(problem) => {
                    error!(%problem, "audit log cannot be written yet; retrying every second")
                }
            }
            Some(log)
        }
        None => None,
    };
    Ok(ProxyContext::new(
        config,
        client_tls,
        upstream_tls,
        engine,
        audit,
    ))
}

/// Binds the admin endpoint up front, so a busy port stops start-up with a clear error.
fn bind_admin(address: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    let listen_failed = |error| ServerError::Listen {
        address: format!("admin {address}"),
        error,
    };
    let listener = std::net::TcpListener::bind(address).map_err(listen_failed)?;
    listener.set_nonblocking(true).map_err(listen_failed)?;
    info!(%address, "admin endpoint listening: /metrics /healthz /readyz");
    Ok(listener)
}

/// What `/readyz` reports: the policy's catalog is loaded (when one is configured) and
/// the upstream server accepts TCP connections.
async fn readiness(ctx: &ProxyContext) -> Result<(), String> {
    if let Some(engine) = &ctx.engine {
        engine.readiness()?;
    }
    if let Some(problem) = ctx.audit.as_ref().and_then(|audit| audit.problem()) {
        return Err(format!("audit log: {problem}"));
    }
    let upstream = (ctx.config.upstream.host.as_str(), ctx.config.upstream.port);
    match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(upstream)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!(
            "upstream {}:{} is unreachable: {error}",
            upstream.0, upstream.1
        )),
        Err(_) => Err(format!(
            "upstream {}:{} did not accept a connection within 2 s",
            upstream.0, upstream.1
        )),
    }
}

/// Raises the soft open-file limit to the hard limit: each session holds two
/// descriptors (client and upstream), and connections still starting hold one more.
fn raise_open_file_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let needed = (3 * max_connections + 64) as libc::rlim_t;
    if limit.rlim_cur < needed {
        warn!(
            open_files = limit.rlim_cur,
            needed,
            "the open-file limit is below what limits.max_connections needs; raise it (ulimit -n) or lower max_connections"
        );
    }
}

/// Runs the proxy until a shutdown signal and the end of the grace period. Blocks the
/// calling thread.
///
/// Thread-per-core: `workers` threads each run a single-threaded event loop that owns
/// whole sessions, so a session's two pumps never wait for another thread to wake up;
/// the acceptor hands each new connection to the worker with the fewest.
pub fn run(config: Config) -> Result<(), ServerError> {
    raise_open_file_limit(config.limits.max_connections);
    let ctx = Arc::new(build_context(config)?);
    let count = match ctx.config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let workers = (0..count)
        .map(|index| Worker::start(index, Arc::clone(&ctx)))
        .collect::<Result<Vec<_>, _>>()?;
    let acceptor = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let admin = match ctx.config.admin {
        Some(address) => Some(bind_admin(address)?),
        None => None,
    };
    let result = acceptor.block_on(async {
        if let Some(engine) = &ctx.engine {
            engine.check_startup().await?;
            tokio::spawn(maintain_policy(engine.clone()));
        }
        if let Some(audit) = &ctx.audit {
            tokio::spawn(reopen_audit_on_hangup(audit.clone()));
        }
        if let Some(admin) = admin {
            let listener = TcpListener::from_std(admin).map_err(|error| ServerError::Listen {
                address: format!("admin {:?}", ctx.config.admin),
                error,
            })?;
            let ready_ctx = ctx.clone();
            tokio::spawn(observe::http::serve(listener, move || {
                let ctx = ready_ctx.clone();
                async move { readiness(&ctx).await }
            }));
        }
        accept_until_shutdown(&ctx, &workers).await
    });
    for Worker {
        commands, thread, ..
    } in workers
    {
        // Without a Drain (start-up failed), a closed inbox stops the worker at once.
        drop(commands);
        if thread.join().is_err() {
            error!("a worker thread panicked");
        }
    }
    if let Some(audit) = &ctx.audit {
        if !audit.flush(AUDIT_FLUSH_LIMIT) {
            error!(path = %audit.target(), "audit records still queued at exit could not be written");
        }
    }
    info!("pgveil stopped");
    result
}

/// How long pgveil waits at exit for queued audit records to be written.
const AUDIT_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Reopens the audit log on SIGHUP, so logrotate can move the file away.
async fn reopen_audit_on_hangup(audit: Arc<AuditLog>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            warn!(%error, "cannot watch SIGHUP; the audit log will not be reopened after rotation");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        info!(path = %audit.target(), "SIGHUP received: reopening the audit log");
        audit.reopen();
    }
}

/// What the acceptor tells a worker.
enum WorkerCommand {
    Serve(std::net::TcpStream, SocketAddr),
    /// Accept nothing more; let sessions run until they end or the deadline passes.
    Drain {
        deadline: Instant,
    },
    /// Close every session now.
    Close,
}

struct Worker {
    commands: mpsc::UnboundedSender<WorkerCommand>,
    /// Connections handed to this worker and not finished yet.
    load: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

/// Stack of each worker thread (reserved address space; pages are used as touched).
const WORKER_STACK_BYTES: usize = 64 << 20;

impl Worker {
    fn start(index: usize, ctx: Arc<ProxyContext>) -> Result<Worker, ServerError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServerError::Runtime)?;
        let (commands, inbox) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(0));
        let worker_load = Arc::clone(&load);
        let thread = std::thread::Builder::new()
            .name(format!("pgveil-worker-{index}"))
            // sqlparser recurses once per nesting level of a statement (up to its
            // limit of 50); deep statements need more than the default 2 MiB, and a
            // stack overflow would end every session of the process.
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || runtime.block_on(serve_connections(inbox, ctx, worker_load)))
            .map_err(ServerError::Runtime)?;
        Ok(Worker {
            commands,
            load,
            thread,
        })
    }
}

/// A worker's event loop: serves the connections it is handed until told to stop.
async fn serve_connections(
    mut inbox: mpsc::UnboundedReceiver<WorkerCommand>,
    ctx: Arc<ProxyContext>,
    load: Arc<AtomicUsize>,
) {
    let mut sessions = JoinSet::new();
    let mut deadline: Option<Instant> = None;
    let mut inbox_open = true;
    let close_now = loop {
        if deadline.is_some() && sessions.is_empty() {
            break false;
        }
        let grace_over = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = inbox.recv(), if inbox_open => match command {
                Some(WorkerCommand::Serve(socket, peer)) => match TcpStream::from_std(socket) {
                    Ok(socket) => {
                        let ctx = Arc::clone(&ctx);
                        let load = Arc::clone(&load);
                        sessions.spawn(async move {
                            serve_client(socket, peer, ctx).await;
                            load.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Err(error) => {
                        load.fetch_sub(1, Ordering::Relaxed);
                        error!(%peer, %error, "cannot register connection");
                    }
                },
                Some(WorkerCommand::Drain { deadline: until }) => deadline = Some(until),
                Some(WorkerCommand::Close) => break true,
                None if deadline.is_some() => inbox_open = false,
                None => break true,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = grace_over => {
                warn!(open_sessions = sessions.len(), "grace period over; closing the remaining sessions");
                break true;
            }
        }
    };
    if close_now {
        // Sessions tell their clients (57P01) and close; whatever still hangs is cut.
        ctx.close_sessions();
        let said_goodbye = async { while sessions.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), said_goodbye).await;
    }
    sessions.shutdown().await;
}

/// Accepts connections and hands them to workers until SIGTERM/SIGINT; then tells the
/// workers to drain, and to close at once on a second signal.
async fn accept_until_shutdown(ctx: &ProxyContext, workers: &[Worker]) -> Result<(), ServerError> {
    let address = ctx.config.listen;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|error| ServerError::Listen {
            address: address.to_string(),
            error,
        })?;
    let bound = listener.local_addr().unwrap_or(address);
    info!(
        listen = %bound,
        upstream = %format!("{}:{}", ctx.config.upstream.host, ctx.config.upstream.port),
        tls = ctx.client_tls.is_some(),
        workers = workers.len(),
        "pgveil is listening"
    );

    let mut signals = Signals::install()?;
    loop {
        tokio::select! {
            _ = signals.next() => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => hand_over(workers, socket, peer),
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    error!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);

    let grace = ctx.config.limits.shutdown_grace();
    info!(
        open_sessions = ctx.open_sessions(),
        grace_seconds = grace.as_secs(),
        "shutting down: no longer accepting; waiting for open sessions"
    );
    let deadline = Instant::now() + grace;
    for worker in workers {
        let _ = worker.commands.send(WorkerCommand::Drain { deadline });
    }
    let all_finished = async {
        while !workers.iter().all(|worker| worker.thread.is_finished()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = all_finished => {}
        _ = signals.next() => {
            warn!("second signal; closing the remaining sessions now");
            for worker in workers {
                let _ = worker.commands.send(WorkerCommand::Close);
            }
        }
    }
    Ok(())
}

/// Keeps the policy and catalogs current: reloads the policy when its file changes or
/// on SIGHUP, and refreshes every loaded catalog on a timer. A reload that fails keeps
/// the running policy and says why in the log.
async fn maintain_policy(engine: Arc<Engine>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            warn!(%error, "cannot watch SIGHUP; the policy reloads only when its file changes");
            None
        }
    };
    let path = engine.policy_path().to_path_buf();
    let mut seen = file_stamp(&path);
    let mut poll = tokio::time::interval(POLICY_POLL_INTERVAL);
    let mut refresh = tokio::time::interval(CATALOG_REFRESH_INTERVAL);
    refresh.reset();
    loop {
        let reload = tokio::select! {
            _ = async {
                match hangup.as_mut() {
                    Some(hangup) => { hangup.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                info!("SIGHUP received: reloading the policy");
                seen = file_stamp(&path);
                true
            }
            _ = poll.tick() => {
                engine.watch_schema_changes();
                let stamp = file_stamp(&path);
                let changed = stamp != seen;
                seen = stamp;
                if changed {
                    info!(policy = %path.display(), "policy file changed: reloading");
                }
                changed
            }
            _ = refresh.tick() => {
                engine.refresh_all().await;
                false
            }
        };
        if reload {
            let reloads = &observe::metrics().policy_reloads_total;
            match engine.reload_policy().await {
                Ok(()) => reloads.with_label_values(&["ok"]).inc(),
                Err(error) => {
                    reloads.with_label_values(&["error"]).inc();
                    error!("policy reload failed; the running policy stays in force: {error}");
                }
            }
        }
    }
}

/// What identifies a version of the policy file: modification time, size and content
/// hash (an editor may write within the same second and keep the size).
fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::hash::{Hash, Hasher};
    let metadata = std::fs::metadata(path).ok()?;
    let content = std::fs::read(path).ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    content.hash(&mut hasher);
    Some((metadata.modified().ok()?, metadata.len(), hasher.finish()))
}

/// Gives a new connection to the worker with the fewest.
fn hand_over(workers: &[Worker], socket: TcpStream, peer: SocketAddr) {
    let Some(worker) = workers
        .iter()
        .min_by_key(|worker| worker.load.load(Ordering::Relaxed))
    else {
        return;
    };
    let socket = match socket.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            error!(%peer, %error, "cannot hand over connection");
            return;
        }
    };
    worker.load.fetch_add(1, Ordering::Relaxed);
    if worker
        .commands
        .send(WorkerCommand::Serve(socket, peer))
        .is_err()
    {
        worker.load.fetch_sub(1, Ordering::Relaxed);
        error!(%peer, "worker is gone; connection dropped");
    }
}

/// SIGTERM and SIGINT as one stream of shutdown requests.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ServerError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).map_err(ServerError::Signal)?,
            interrupt: signal(SignalKind::interrupt()).map_err(ServerError::Signal)?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => info!("SIGTERM received"),
            _ = self.interrupt.recv() => info!("SIGINT received"),
        }
    }
}
