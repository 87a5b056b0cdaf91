//! The admin HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the
//! process is up) and `/readyz` (a policy is loaded and the upstream server answers).
//!
//! A deliberately small HTTP/1.1 server: GET (or HEAD) only, one request per
//! connection, the request head bounded in size and time. It runs beside the proxy and
//! must never block it, nor panic on anything a client sends.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::metrics::metrics;

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;

/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Health,
    Ready,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// The route of a request head (request line and headers, without the body).
pub fn route(head: &[u8]) -> Route {
    let line_end = head
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .unwrap_or(head.len());
    let mut parts = head[..line_end].split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if parts.next().is_some() || !version.starts_with(b"HTTP/1.") {
        return Route::BadRequest;
    }
    if method != b"GET" && method != b"HEAD" {
        return Route::MethodNotAllowed;
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" => Route::Metrics,
        b"/healthz" => Route::Health,
        b"/readyz" => Route::Ready,
        _ => Route::NotFound,
    }
}

/// A whole HTTP response with `Connection: close`.
fn response(status: &str, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// Serves admin requests on `listener` until the task is dropped. `ready` says whether
/// pgveil is ready to serve, or why not.
pub async fn serve<F, Fut>(listener: TcpListener, ready: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, ready).await {
                debug!(%peer, %error, "admin request failed");
            }
        });
    }
}

async fn answer<F, Fut>(mut stream: TcpStream, ready: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok::<_, std::io::Error>(false);
            }
            head.extend_from_slice(&chunk[..read]);
        }
    })
    .await
    .unwrap_or(Ok(false))?;
    let route = if complete {
        route(&head)
    } else {
        Route::BadRequest
    };
    let head_only = head.starts_with(b"HEAD ");
    let text = "text/plain; charset=utf-8";
    let reply = match route {
        Route::Metrics => response(
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &metrics().render(),
            head_only,
        ),
        Route::Health => response("200 OK", text, b"ok\n", head_only),
        Route::Ready => match ready().await {
            Ok(()) => response("200 OK", text, b"ready\n", head_only),
            Err(reason) => response(
                "503 Service Unavailable",
                text,
                format!("not ready: {reason}\n").as_bytes(),
                head_only,
            ),
        },
        Route::NotFound => response("404 Not Found", text, b"not found\n", head_only),
        Route::MethodNotAllowed => response(
            "405 Method Not Allowed",
            text,
            b"only GET and HEAD\n",
            head_only,
        ),
        Route::BadRequest => response("400 Bad Request", text, b"bad request\n", false),
    };
    stream.write_all(&reply).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_requests() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /healthz HTTP/1.0\r\n\r\n"), Route::Health);
        assert_eq!(
            route(b"HEAD /readyz?verbose HTTP/1.1\r\n\r\n"),
            Route::Ready
        );
        assert_eq!(route(b"GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe garbage"), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
    }
}
