//! Small HTTP plumbing shared by the client API and the peer listener: an accept loop
//! with graceful stop and optional TLS, and response builders.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::shutdown::Shutdown;

/// A response body: one buffer, or chunks another task streams ([`ChannelBody`]).
pub type Body = Either<Full<Bytes>, ChannelBody>;

/// The response type every client API handler returns.
pub type Resp = Response<Body>;

/// A body whose chunks arrive on a channel, so that a large answer (a backup) is sent
/// as it is produced instead of built in memory first, and an endless one (a watch)
/// can be sent at all. The producer ends it early by sending an error (the connection
/// is then closed: the client sees a short body, never a wrong one of the announced
/// length), or normally by dropping the sender.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    len: Option<u64>,
}

/// Where a [`ChannelBody`]'s chunks are sent.
pub type ChunkSender = tokio::sync::mpsc::Sender<std::io::Result<Bytes>>;

impl ChannelBody {
    /// A body of exactly `len` bytes and the sender its chunks go to.
    pub fn new(len: u64, depth: usize) -> (ChunkSender, ChannelBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        (tx, ChannelBody { rx, len: Some(len) })
    }

    /// A body of unknown length (sent chunked), and the sender its chunks go to.
    pub fn unsized_stream(depth: usize) -> (ChunkSender, ChannelBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        (tx, ChannelBody { rx, len: None })
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// A response with a status, content type and body.
pub fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = status;
    if !content_type.is_empty() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    }
    r
}

/// `value` as one line of JSON (with its newline).
pub fn json_line(value: &serde_json::Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    response(status, "application/json", json_line(value))
}

/// A JSON error `{"error": message, "code": code}`.
pub fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Resp {
    json(status, &serde_json::json!({ "error": message.to_string(), "code": code }))
}

/// Serves plaintext HTTP/1.1 on `listener` until `shutdown` fires; see [`serve_tls`].
pub async fn serve<F, Fut, B>(listener: TcpListener, shutdown: Shutdown, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_tls(listener, None, shutdown, handler).await
}

/// TCP keepalive on every connection: probes after 30 s of silence, every 10 s, 3 of
/// them; a peer or client whose host died or was cut off without a FIN or RST is then
/// found within about a minute, and its connection task and buffers go (a stream
/// receiver otherwise waits for bytes that never come).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// Sets [`KEEPALIVE_IDLE`] and the rest of the keepalive on an accepted socket.
pub fn set_keepalive(stream: &TcpStream) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// How long a new connection may take to start and finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 on `listener` until `shutdown` fires, over TLS when `tls` is given.
/// Each connection runs in its own task; a connection sending garbage, failing the TLS
/// handshake (a stranger's certificate, none where one is required) or speaking
/// plaintext to a TLS listener gets closed and nothing else happens.
pub async fn serve_tls<F, Fut, B>(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, shutdown: Shutdown, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                if let Err(e) = set_keepalive(&stream) {
                    warn!(error = %e, "cannot set TCP keepalive on a connection");
                }
                let handler = handler.clone();
                let stop = shutdown.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => serve_connection(stream, stop, handler).await,
                        Some(acceptor) => {
                            let handshake = tokio::select! {
                                h = tls_handshake(stream, &acceptor, remote) => h,
                                _ = stop.wait() => None,
                            };
                            if let Some(tls_stream) = handshake {
                                serve_connection(tls_stream, stop, handler).await
                            }
                        }
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The answer to plaintext HTTP on a TLS listener.
fn plaintext_reply() -> Vec<u8> {
    let body = "{\"error\":\"this listener speaks TLS only: use https://\",\"code\":\"tls_required\"}\n";
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Runs the server side of a TLS handshake (bounded). A client that sends plaintext
/// HTTP instead gets a 400 naming the problem, like Go's servers do.
async fn tls_handshake(
    stream: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    remote: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
            debug!(%remote, "plaintext request on a TLS listener");
            reject_plaintext(stream).await;
            return None;
        }
        Ok(Ok(1)) => {}
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => return None,
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            warn!(%remote, error = %e, "TLS handshake failed; connection refused");
            None
        }
        Err(_) => {
            debug!(%remote, "TLS handshake timed out");
            None
        }
    }
}

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn reject_plaintext(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Read the request head first (bounded): closing a socket with unread input resets
    // the connection, and the client would never see the reply.
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while seen < buf.len() && !buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf[seen..])).await {
            Ok(Ok(n)) if n > 0 => seen += n,
            _ => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&plaintext_reply())).await;
    let _ = stream.shutdown().await;
    // Let the client read the reply; drop whatever else it sends (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

/// How long a connection's writes may wait for the other side to take any byte before
/// the connection is cut ([`WriteStallGuard`]).
pub const WRITE_STALL: Duration = Duration::from_secs(120);

/// A connection's IO whose writes give up (`TimedOut`) once the other side has taken no
/// byte for `stall`. Without it a client that stops reading a large answer (a backup, a
/// watch stream, a page of keys) would keep the connection, its queued chunks and
/// whatever the sending task holds (a backup slot, a watch slot) for as long as it keeps
/// the socket open: hyper has no write timeout. Any progress starts the bound again.
pub struct WriteStallGuard<I> {
    io: I,
    stall: Duration,
    /// Running while writes wait; reset by any progress.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteStallGuard<I> {
    /// Wraps `io`.
    pub fn new(io: I, stall: Duration) -> Self {
        WriteStallGuard { io, stall, waiting: None }
    }

    /// After a write that could not go on: `Some(error)` once the bound has passed
    /// (else the timer wakes this task when it does).
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let stall = self.stall;
        let timer = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        timer.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the other side took no byte for {} s", stall.as_secs()))
        })
    }

    /// Maps a write's outcome: progress (or an error) resets the bound; waiting counts.
    fn track<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Pending => match self.stalled(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => {
                self.waiting = None;
                ready
            }
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStallGuard<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStallGuard<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.track(cx, r)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.track(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.track(cx, r)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.track(cx, r)
    }
}

async fn serve_connection<I, F, Fut, B>(io: I, stop: Shutdown, handler: F)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let svc = service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h(req).await) }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(WriteStallGuard::new(io, WRITE_STALL)), svc)
        // Peer streams upgrade their connection (see `transport`).
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "connection ended with an error") },
        _ = stop.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_get_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let sock = socket2::SockRef::from(&accepted);
        assert!(!sock.keepalive().expect("SO_KEEPALIVE"), "off by default");
        set_keepalive(&accepted).expect("set");
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().expect("TCP_KEEPCNT"), KEEPALIVE_PROBES);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_too_long_fails_and_progress_restarts_the_bound() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut guarded = WriteStallGuard::new(ours, Duration::from_secs(120));
        guarded.write_all(&[1u8; 1024]).await.expect("fits the buffer");
        // They read a little after 100 s, and again 100 s later: each write waits, but
        // less than the bound, so it goes on.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_secs(100)).await;
                theirs.read_exact(&mut buf).await.expect("read");
            }
            theirs
        });
        guarded.write_all(&[2u8; 512]).await.expect("taken after 100 s");
        guarded.write_all(&[3u8; 512]).await.expect("taken after another 100 s");
        let _theirs = reader.await.expect("reader");
        // Then they read nothing: the write fails once 120 s have passed.
        let started = tokio::time::Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(300), guarded.write_all(&[4u8; 2048])).await;
        let e = waited.expect("the guard gives up within 300 s").expect_err("nobody reads");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert_eq!(started.elapsed(), Duration::from_secs(120));
    }

    #[test]
    fn plaintext_reply_is_well_formed() {
        let reply = plaintext_reply();
        let text = std::str::from_utf8(&reply).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head} / {}", body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], "tls_required");
    }
}
