//! One side of a session as a byte stream (plain TCP or TLS), plus the small buffered
//! reader used during startup and authentication, before the pumps take over.
//!
//! The startup reader never reads past what it needs to decide: whatever arrives after a
//! packet stays in its buffer and is handed to the pump, so no client byte is lost.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::SessionError;
use crate::wire::frame::try_split_frame;
use crate::wire::startup::{try_split_startup, StartupPacket};

/// A client or upstream connection, encrypted or not.
pub enum Conn {
    /// A connection handed over to a TLS handshake that did not give it back.
    Closed,
    Plain(TcpStream),
    ClientTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    UpstreamTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::ClientTls(_) | Conn::UpstreamTls(_))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Closed => Poll::Ready(Ok(())),
            Conn::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Conn::ClientTls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            Conn::UpstreamTls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Conn::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Conn::ClientTls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            Conn::UpstreamTls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Closed => Poll::Ready(Ok(())),
            Conn::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Conn::ClientTls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            Conn::UpstreamTls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Closed => Poll::Ready(Ok(())),
            Conn::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Conn::ClientTls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            Conn::UpstreamTls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Which peer a [`Framed`] talks to, so errors blame the right side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Client,
    Upstream,
}

/// A connection with a read buffer, for the message-at-a-time startup phase.
pub struct Framed {
    pub conn: Conn,
    pub buf: BytesMut,
    peer: Peer,
}

const STARTUP_BUFFER: usize = 8 * 1024;

impl Framed {
    pub fn new(conn: Conn, buf: BytesMut, peer: Peer) -> Self {
        Framed { conn, buf, peer }
    }

    fn io_error(&self, error: io::Error) -> SessionError {
        match self.peer {
            Peer::Client => SessionError::ClientIo(error),
            Peer::Upstream => SessionError::UpstreamIo(error),
        }
    }

    /// Reads more bytes; `false` at end of stream.
    async fn fill(&mut self) -> Result<bool, SessionError> {
        self.buf.reserve(STARTUP_BUFFER);
        let read = self.conn.read_buf(&mut self.buf).await;
        match read {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(error) => Err(self.io_error(error)),
        }
    }

    /// The next startup packet; `None` when the peer closed before sending one.
    pub async fn read_startup(&mut self) -> Result<Option<StartupPacket>, SessionError> {
        loop {
            if let Some((packet, used)) =
                try_split_startup(&self.buf).map_err(SessionError::ClientStartup)?
            {
                let _ = self.buf.split_to(used);
                return Ok(Some(packet));
            }
            if !self.fill().await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(SessionError::ClientProtocol(
                    "connection closed inside a startup packet".into(),
                ));
            }
        }
    }

    fn protocol_error(&self, message: String) -> SessionError {
        match self.peer {
            Peer::Client => SessionError::ClientProtocol(message),
            Peer::Upstream => SessionError::UpstreamProtocol(message),
        }
    }

    /// The next whole message, at most `limit` bytes long (checked on the header,
    /// before anything is buffered); `None` when the peer closed at a message boundary.
    pub async fn read_message(
        &mut self,
        limit: usize,
    ) -> Result<Option<(u8, Bytes)>, SessionError> {
        loop {
            let split = try_split_frame(&self.buf, limit)
                .map_err(|error| self.protocol_error(error.to_string()))?;
            if let Some((frame, used)) = split {
                let tag = frame.tag;
                let mut whole = self.buf.split_to(used);
                let body = whole.split_off(crate::wire::frame::HEADER_LEN).freeze();
                return Ok(Some((tag, body)));
            }
            if !self.fill().await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(self.protocol_error("connection closed inside a message".into()));
            }
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        match self.conn.write_all(bytes).await {
            Ok(()) => Ok(()),
            Err(error) => Err(self.io_error(error)),
        }
    }

    /// Writes one message with `tag` and `body`.
    pub async fn write_message(&mut self, tag: u8, body: &[u8]) -> Result<(), SessionError> {
        let mut frame = Vec::with_capacity(body.len() + 5);
        crate::wire::frame::encode_frame(&mut frame, tag, body);
        self.write_all(&frame).await
    }
}

/// The reading half of a [`Conn`]. Plain TCP splits without a lock; TLS needs
/// `tokio::io::split`, since reads and writes share one TLS state.
pub enum ConnReader {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Shared(tokio::io::ReadHalf<Conn>),
}

/// The writing half of a [`Conn`].
pub enum ConnWriter {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Shared(tokio::io::WriteHalf<Conn>),
}

impl Conn {
    /// Splits the connection so both directions can be pumped at once.
    pub fn split(self) -> (ConnReader, ConnWriter) {
        match self {
            Conn::Plain(stream) => {
                let (reader, writer) = stream.into_split();
                (ConnReader::Tcp(reader), ConnWriter::Tcp(writer))
            }
            other => {
                let (reader, writer) = tokio::io::split(other);
                (ConnReader::Shared(reader), ConnWriter::Shared(writer))
            }
        }
    }
}

impl AsyncRead for ConnReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnReader::Tcp(half) => Pin::new(half).poll_read(cx, buf),
            ConnReader::Shared(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWriter::Tcp(half) => Pin::new(half).poll_write(cx, buf),
            ConnWriter::Shared(half) => Pin::new(half).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWriter::Tcp(half) => Pin::new(half).poll_flush(cx),
            ConnWriter::Shared(half) => Pin::new(half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWriter::Tcp(half) => Pin::new(half).poll_shutdown(cx),
            ConnWriter::Shared(half) => Pin::new(half).poll_shutdown(cx),
        }
    }
}
