//! The listener: accepts client connections, spawns one task per session, and shuts
//! down gracefully on SIGTERM or SIGINT (stop accepting, let sessions finish for the
//! grace period, then close what is left; a second signal closes at once).
//!
//! Start-up fails early and clearly: the listen address, TLS files and upstream TLS
//! settings are checked before the first client is accepted.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{error, info, warn};

use crate::config::Config;
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
}

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
    Ok(ProxyContext::new(config, client_tls, upstream_tls))
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

/// Runs the proxy until a shutdown signal and the end of the grace period.
pub async fn run(config: Config) -> Result<(), ServerError> {
    raise_open_file_limit(config.limits.max_connections);
    let ctx = Arc::new(build_context(config)?);
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
        "pgveil is listening"
    );

    let mut signals = Signals::install()?;
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = signals.next() => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    sessions.spawn(serve_client(socket, peer, Arc::clone(&ctx)));
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    error!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    drop(listener);

    let grace = ctx.config.limits.shutdown_grace();
    info!(
        open_sessions = ctx.open_sessions(),
        grace_seconds = grace.as_secs(),
        "shutting down: no longer accepting; waiting for open sessions"
    );
    let drained = async { while sessions.join_next().await.is_some() {} };
    tokio::select! {
        finished = tokio::time::timeout(grace, drained) => {
            if finished.is_err() {
                warn!(open_sessions = ctx.open_sessions(), "grace period over; closing the remaining sessions");
            }
        }
        _ = signals.next() => warn!("second signal; closing the remaining sessions now"),
    }
    // Sessions tell their clients (57P01) and close; whatever still hangs is cut.
    ctx.close_sessions();
    let said_goodbye = async { while sessions.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), said_goodbye).await;
    sessions.shutdown().await;
    info!("pgveil stopped");
    Ok(())
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
