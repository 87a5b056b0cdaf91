//! The client's opening: SSLRequest and GSSENCRequest answered, TLS set up when
//! configured, then either a CancelRequest or a StartupMessage.
//!
//! Rule: after answering SSLRequest, no plaintext byte the client sent before the TLS
//! handshake may be treated as part of the encrypted session (CVE-2021-23214).

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::conn::{Conn, Framed, Peer};
use super::SessionError;
use crate::wire::startup::{CancelKey, StartupMessage, StartupPacket};

/// What a new client connection turned out to be.
pub enum Opening {
    Cancel(CancelKey),
    Session(StartupMessage),
}

/// A fresh client connection, ready for [`negotiate`].
pub fn accept(socket: TcpStream) -> Framed {
    Framed::new(Conn::Plain(socket), BytesMut::new(), Peer::Client)
}

/// Runs the opening exchange on `client`, upgrading it to TLS when asked and
/// configured. `Ok(None)` when the client left without asking anything.
pub async fn negotiate(
    client: &mut Framed,
    tls: Option<&TlsAcceptor>,
) -> Result<Option<Opening>, SessionError> {
    let mut answered_ssl = false;
    let mut answered_gss = false;
    loop {
        let Some(packet) = client.read_startup().await? else {
            return Ok(None);
        };
        match packet {
            StartupPacket::SslRequest => {
                if answered_ssl || client.conn.is_tls() {
                    return Err(SessionError::ClientProtocol("duplicate SSLRequest".into()));
                }
                answered_ssl = true;
                if !client.buf.is_empty() {
                    return Err(SessionError::ClientProtocol(
                        "received unencrypted data after SSLRequest".into(),
                    ));
                }
                let Some(acceptor) = tls else {
                    client.write_all(b"N").await?;
                    continue;
                };
                let Conn::Plain(mut socket) = std::mem::replace(&mut client.conn, Conn::Closed)
                else {
                    return Err(SessionError::ClientProtocol(
                        "SSLRequest on a TLS connection".into(),
                    ));
                };
                socket
                    .write_all(b"S")
                    .await
                    .map_err(SessionError::ClientIo)?;
                let stream = acceptor
                    .accept(socket)
                    .await
                    .map_err(SessionError::ClientTls)?;
                client.conn = Conn::ClientTls(Box::new(stream));
            }
            StartupPacket::GssEncRequest => {
                if answered_gss || client.conn.is_tls() {
                    return Err(SessionError::ClientProtocol(
                        "unexpected GSSENCRequest".into(),
                    ));
                }
                answered_gss = true;
                if !client.buf.is_empty() {
                    return Err(SessionError::ClientProtocol(
                        "received unencrypted data after GSSENCRequest".into(),
                    ));
                }
                client.write_all(b"N").await?;
            }
            StartupPacket::Cancel(key) => return Ok(Some(Opening::Cancel(key))),
            StartupPacket::Startup(startup) => return Ok(Some(Opening::Session(startup))),
        }
    }
}
