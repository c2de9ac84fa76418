//! One keep-alive HTTP/1.1 connection (hyper 1 client, `TCP_NODELAY`), as used by each
//! worker.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::endpoint::Endpoint;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        /// Where to.
        endpoint: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The HTTP/1.1 handshake failed.
    #[error("HTTP handshake with {endpoint}: {source}")]
    Handshake {
        /// Where to.
        endpoint: String,
        /// Underlying error.
        source: hyper::Error,
    },
    /// The request could not be built (bad path).
    #[error("building request: {0}")]
    Build(#[from] http::Error),
    /// The connection failed while sending the request or reading the answer.
    #[error("request failed: {0}")]
    Io(#[from] hyper::Error),
}

/// A keep-alive connection to one endpoint.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    host: HeaderValue,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// An HTTP answer: status and the whole body.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Complete body.
    pub body: Bytes,
}

impl Conn {
    /// Opens a connection to `endpoint`.
    pub async fn connect(endpoint: &Endpoint) -> Result<Conn, ClientError> {
        let stream =
            TcpStream::connect(endpoint.addr)
                .await
                .map_err(|source| ClientError::Connect {
                    endpoint: endpoint.to_string(),
                    source,
                })?;
        // Small requests: do not let Nagle delay them.
        stream
            .set_nodelay(true)
            .map_err(|source| ClientError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Handshake {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
        let host = HeaderValue::from_str(&endpoint.authority).map_err(http::Error::from)?;
        Ok(Conn {
            sender,
            host,
            driver,
        })
    }

    /// Sends one request and reads the whole answer. After an error the connection
    /// should be dropped and a new one opened.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: Option<&'static str>,
    ) -> Result<Answer, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone());
        if let Some(ct) = content_type {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        let req = builder.body(Full::new(body))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer { status, body })
    }
}

/// Opens a connection, sends one request and closes it (for set-up queries).
pub async fn request_once(
    endpoint: &Endpoint,
    method: Method,
    path: &str,
    body: Bytes,
    content_type: Option<&'static str>,
) -> Result<Answer, ClientError> {
    let mut conn = Conn::connect(endpoint).await?;
    conn.send(method, path, body, content_type).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A tiny HTTP/1.1 server answering every request on one connection with the request
    /// line echoed in the body; returns its endpoint.
    async fn echo_server() -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            for _ in 0..3 {
                // Read one request: headers up to \r\n\r\n plus a Content-Length body.
                let (head_end, len) = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                    let n = sock.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "client closed early");
                    buf.extend_from_slice(&chunk[..n]);
                };
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap();
                    assert!(n > 0);
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let line = head.lines().next().unwrap().to_string();
                let has_host = head.to_lowercase().contains("\r\nhost: 127.0.0.1:");
                let reply = format!("{line} host={has_host} body={len}");
                buf.drain(..head_end + len);
                let resp = format!(
                    "HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\r\n{}",
                    reply.len(),
                    reply
                );
                sock.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        format!("http://{addr}").parse().unwrap()
    }

    #[tokio::test]
    async fn keeps_the_connection_alive_across_requests() {
        let ep = echo_server().await;
        let mut conn = Conn::connect(&ep).await.unwrap();
        // The server accepts only one connection: three answers prove keep-alive.
        for i in 0..3 {
            let path = format!("/v1/kv/{i}");
            let a = conn
                .send(Method::PUT, &path, Bytes::from_static(b"abcd"), None)
                .await
                .unwrap();
            assert_eq!(a.status, 201);
            assert_eq!(
                std::str::from_utf8(&a.body).unwrap(),
                format!("PUT /v1/kv/{i} HTTP/1.1 host=true body=4")
            );
        }
    }

    #[tokio::test]
    async fn connect_errors_are_reported() {
        // Bind then drop to get a port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let ep: Endpoint = format!("http://127.0.0.1:{port}").parse().unwrap();
        assert!(matches!(
            Conn::connect(&ep).await,
            Err(ClientError::Connect { .. })
        ));
    }
}
