//! The upstream side of a session: opening the connection (TCP, then TLS per
//! `sslmode`) and relaying the authentication exchange between client and server.
//!
//! pgveil never sees a password it could use: cleartext, MD5 and SCRAM messages pass
//! through unchanged. The one rewrite is removing SCRAM-SHA-256-PLUS from the server's
//! mechanism list, because channel binding cannot span the client's TLS session with
//! pgveil and pgveil's TLS session with the server.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::debug;

use super::conn::{Conn, Framed, Peer};
use super::{ProxyContext, SessionError};
use crate::config::SslMode;
use crate::wire::messages::{
    auth, authentication_code, backend_key_data, error_is_fatal, sasl_initial_channel_binding_flag,
    sasl_mechanisms_without_channel_binding, ErrorReport, Severity,
};
use crate::wire::startup::{encode_negotiate_protocol_version, CancelKey, StartupMessage};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Largest client message accepted before authentication completes (PostgreSQL's
/// `PG_MAX_AUTH_TOKEN_LENGTH`): nobody unauthenticated makes pgveil buffer more.
const MAX_CLIENT_AUTH_MESSAGE: usize = 65_536;

/// Largest server message expected during authentication and start-up.
const MAX_SERVER_STARTUP_MESSAGE: usize = 1 << 20;

/// Opens the upstream connection and, per `sslmode`, TLS on it.
pub async fn connect(ctx: &ProxyContext) -> Result<(Framed, SocketAddr), SessionError> {
    let upstream = &ctx.config.upstream;
    let address = format!("{}:{}", upstream.host, upstream.port);
    let unreachable = |reason: String| SessionError::UpstreamUnreachable {
        address: address.clone(),
        reason,
    };
    let mut socket = match timeout(
        ctx.config.limits.connect_timeout(),
        TcpStream::connect((upstream.host.as_str(), upstream.port)),
    )
    .await
    {
        Err(_) => return Err(unreachable("connection timed out".into())),
        Ok(Err(error)) => return Err(unreachable(error.to_string())),
        Ok(Ok(socket)) => socket,
    };
    super::tune_socket(&socket);
    let peer = socket.peer_addr().map_err(|e| unreachable(e.to_string()))?;
    let Some(tls) = ctx.upstream_tls.as_ref() else {
        return Ok((
            Framed::new(Conn::Plain(socket), BytesMut::new(), Peer::Upstream),
            peer,
        ));
    };
    socket
        .write_all(&SSL_REQUEST)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let answer = socket
        .read_u8()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    match answer {
        b'S' => {
            let stream = tls
                .connector
                .connect(tls.server_name.clone(), socket)
                .await
                .map_err(|e| SessionError::UpstreamTls {
                    address: address.clone(),
                    reason: format!("TLS handshake failed: {e}"),
                })?;
            let conn = Conn::UpstreamTls(Box::new(stream));
            Ok((Framed::new(conn, BytesMut::new(), Peer::Upstream), peer))
        }
        b'N' if ctx.config.upstream.sslmode == SslMode::Prefer => Ok((
            Framed::new(Conn::Plain(socket), BytesMut::new(), Peer::Upstream),
            peer,
        )),
        b'N' => Err(SessionError::UpstreamTls {
            address: address.clone(),
            reason: "the server does not accept TLS, but upstream.sslmode requires it".into(),
        }),
        other => Err(unreachable(format!(
            "unexpected answer {:?} to SSLRequest",
            char::from(other)
        ))),
    }
}

/// How the authentication exchange ended.
pub enum AuthOutcome {
    /// Authenticated; the server sent ReadyForQuery.
    Ready(Established),
    /// The server refused (its error was forwarded) or the client left.
    Ended,
}

/// What the server said about a session it accepted.
#[derive(Debug, Default)]
pub struct Established {
    /// The backend's cancel key.
    pub cancel_key: Option<CancelKey>,
    /// The `client_encoding` its ParameterStatus reported.
    pub client_encoding: Option<String>,
}

/// Sends the startup message upstream and relays everything up to the first
/// ReadyForQuery.
pub async fn relay_authentication(
    client: &mut Framed,
    upstream: &mut Framed,
    startup: &StartupMessage,
) -> Result<AuthOutcome, SessionError> {
    let options: Vec<_> = startup.protocol_options().cloned().collect();
    if startup.minor_version > 0 || !options.is_empty() {
        client
            .write_all(&encode_negotiate_protocol_version(options.iter()))
            .await?;
    }
    upstream.write_all(&startup.encode_v3_0()).await?;

    let mut established = Established::default();
    loop {
        let Some((tag, body)) = upstream.read_message(MAX_SERVER_STARTUP_MESSAGE).await? else {
            return Err(SessionError::UpstreamClosed);
        };
        match tag {
            b'R' => {
                let code = authentication_code(&body)
                    .map_err(|e| SessionError::UpstreamProtocol(e.to_string()))?;
                debug!(code, "authentication request from upstream");
                match code {
                    auth::OK | auth::SASL_FINAL => client.write_message(tag, &body).await?,
                    auth::CLEARTEXT_PASSWORD | auth::MD5_PASSWORD | auth::SASL_CONTINUE => {
                        client.write_message(tag, &body).await?;
                        if !relay_client_response(client, upstream, false).await? {
                            return Ok(AuthOutcome::Ended);
                        }
                    }
                    auth::SASL => {
                        let Some(offered) = sasl_mechanisms_without_channel_binding(&body)
                            .map_err(|e| SessionError::UpstreamProtocol(e.to_string()))?
                        else {
                            return Err(SessionError::Refused(
                                ErrorReport::new(
                                    Severity::Fatal,
                                    "28000",
                                    "pgveil: the server offers only SCRAM-SHA-256-PLUS, which cannot be relayed",
                                )
                                .with_hint("allow plain SCRAM-SHA-256 for this login on the server"),
                            ));
                        };
                        client.write_message(tag, &offered).await?;
                        let both_tls = client.conn.is_tls() && upstream.conn.is_tls();
                        if !relay_client_response(client, upstream, both_tls).await? {
                            return Ok(AuthOutcome::Ended);
                        }
                    }
                    auth::KERBEROS_V5 | auth::GSS | auth::GSS_CONTINUE | auth::SSPI => {
                        return Err(SessionError::Refused(
                            ErrorReport::new(
                                Severity::Fatal,
                                "28000",
                                "pgveil: GSSAPI, SSPI and Kerberos authentication cannot be relayed",
                            )
                            .with_hint("use scram-sha-256, md5 or password for logins through pgveil"),
                        ))
                    }
                    other => {
                        return Err(SessionError::UpstreamProtocol(format!(
                            "unknown authentication request {other}"
                        )))
                    }
                }
            }
            b'K' => {
                let (process_id, secret) = backend_key_data(&body)
                    .map_err(|e| SessionError::UpstreamProtocol(e.to_string()))?;
                established.cancel_key = Some(CancelKey { process_id, secret });
                client.write_message(tag, &body).await?;
            }
            b'Z' => {
                client.write_message(tag, &body).await?;
                return Ok(AuthOutcome::Ready(established));
            }
            b'E' => {
                client.write_message(tag, &body).await?;
                if error_is_fatal(&body) {
                    return Ok(AuthOutcome::Ended);
                }
            }
            b'S' => {
                if let Some(value) =
                    crate::wire::messages::parameter_status(&body, b"client_encoding")
                {
                    established.client_encoding = Some(String::from_utf8_lossy(value).into_owned());
                }
                client.write_message(tag, &body).await?
            }
            // NoticeResponse, NegotiateProtocolVersion and anything newer pass unchanged.
            _ => client.write_message(tag, &body).await?,
        }
    }
}

/// Relays the client's answer to an authentication request. `false` when the client
/// closed instead (libpq does that to prompt for a password, then reconnects).
async fn relay_client_response(
    client: &mut Framed,
    upstream: &mut Framed,
    check_channel_binding_flag: bool,
) -> Result<bool, SessionError> {
    let Some((tag, body)) = client.read_message(MAX_CLIENT_AUTH_MESSAGE).await? else {
        return Ok(false);
    };
    if tag != b'p' {
        return Err(SessionError::ClientProtocol(format!(
            "expected a password or SASL response, got message type {:?}",
            char::from(tag)
        )));
    }
    if check_channel_binding_flag && sasl_initial_channel_binding_flag(&body) == Some(b'y') {
        // The client supports channel binding and saw no -PLUS mechanism; the TLS server
        // would take that as a downgrade attack and refuse. Say why, clearly.
        return Err(SessionError::Refused(
            ErrorReport::new(
                Severity::Fatal,
                "28000",
                "pgveil: SCRAM channel binding cannot span two TLS sessions",
            )
            .with_detail("The client is on TLS to pgveil and pgveil is on TLS to the server; each session has its own certificate.")
            .with_hint("connect with channel_binding=disable, or set upstream.sslmode: disable on a trusted network"),
        ));
    }
    upstream.write_message(tag, &body).await?;
    Ok(true)
}
