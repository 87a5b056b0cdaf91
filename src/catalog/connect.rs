//! The `catalog` service login: a tokio-postgres connection with the same upstream
//! address and TLS rules (`upstream.sslmode`, `upstream.ca`) as client sessions.
//!
//! The password comes from the environment variable the config names and is never
//! logged. This module only opens connections; what is asked over them is in `load`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::AsyncMessage;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::CatalogError;
use crate::config::{Config, SslMode};

/// How pgveil reaches the database for its own catalog queries.
#[derive(Clone)]
pub struct CatalogLogin {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    /// Fixed database, or `None` for each client's database.
    pub database: Option<String>,
    sslmode: SslMode,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for CatalogLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogLogin")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl CatalogLogin {
    /// The login of `config.catalog`; an error when it is missing or its password
    /// variable is unset.
    pub fn from_config(config: &Config) -> Result<CatalogLogin, CatalogError> {
        let catalog = config.catalog.as_ref().ok_or(CatalogError::NotConfigured)?;
        let password = match &catalog.password_env {
            None => None,
            Some(variable) => {
                Some(
                    std::env::var(variable).map_err(|_| CatalogError::PasswordUnset {
                        variable: variable.clone(),
                    })?,
                )
            }
        };
        let tls = match crate::tls::upstream_config(
            config.upstream.sslmode,
            config.upstream.ca.as_deref(),
        )
        .map_err(|error| CatalogError::Tls(error.to_string()))?
        {
            Some(client) => Some((
                client,
                crate::tls::upstream_server_name(&config.upstream.host)
                    .map_err(|error| CatalogError::Tls(error.to_string()))?,
            )),
            None => None,
        };
        Ok(CatalogLogin {
            host: config.upstream.host.clone(),
            port: config.upstream.port,
            user: catalog.user.clone(),
            password,
            database: catalog.database.clone(),
            sslmode: config.upstream.sslmode,
            tls,
            connect_timeout: config.limits.connect_timeout(),
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Opens a connection to `database`; the connection task runs on the current
    /// runtime and ends when the returned client is dropped.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client, CatalogError> {
        self.open(database, None).await
    }

    /// A connection that listens on `channel`: the receiver gets one message per
    /// notification and ends when the connection does. Keep the client alive as long
    /// as the notifications are wanted.
    pub async fn listen(
        &self,
        database: &str,
        channel: &str,
    ) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<()>), CatalogError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let client = self.open(database, Some(sender)).await?;
        client
            .batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))
            .await
            .map_err(|error| CatalogError::Query {
                what: "LISTEN",
                reason: error.to_string(),
            })?;
        Ok((client, receiver))
    }

    async fn open(
        &self,
        database: &str,
        notifications: Option<mpsc::UnboundedSender<()>>,
    ) -> Result<tokio_postgres::Client, CatalogError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(database)
            .application_name("pgveil-catalog")
            .connect_timeout(self.connect_timeout)
            .ssl_mode(match self.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
            });
        if let Some(password) = &self.password {
            config.password(password);
        }
        let failed = |error: tokio_postgres::Error| CatalogError::Connect {
            database: database.to_string(),
            user: self.user.clone(),
            reason: error.to_string(),
        };
        let client = match &self.tls {
            None => {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(failed)?;
                tokio::spawn(drive(connection, notifications));
                client
            }
            Some((client_config, server_name)) => {
                let tls = RustlsConnect {
                    connector: TlsConnector::from(client_config.clone()),
                    server_name: server_name.clone(),
                };
                let (client, connection) = config.connect(tls).await.map_err(failed)?;
                tokio::spawn(drive(connection, notifications));
                client
            }
        };
        Ok(client)
    }
}

/// Runs a catalog connection until it ends, passing on notifications when asked to.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notifications: Option<mpsc::UnboundedSender<()>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(_))) => {
                if let Some(sender) = &notifications {
                    if sender.send(()).is_err() {
                        return;
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                debug!(%error, "catalog connection ended");
                return;
            }
            None => return,
        }
    }
}

/// rustls behind tokio-postgres's TLS traits.
#[derive(Clone)]
struct RustlsConnect {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<RustlsConnect, io::Error> {
        Ok(self.clone())
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = self.connector.connect(self.server_name, stream).await?;
            Ok(RustlsStream(stream))
        })
    }
}

struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // The catalog login uses SCRAM without channel binding, like client sessions.
        ChannelBinding::none()
    }
}
