//! Client for the raftkv-node operations API (`/v1/status`, `/v1/members`, promotion,
//! removal, leader transfer), behind the [`NodeApi`] trait so tests can fake it.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Connection refused, timeout, DNS failure.
    #[error("node {url} unreachable: {reason}")]
    Unreachable {
        /// Request URL.
        url: String,
        /// Transport error text.
        reason: String,
    },
    /// The node answered with an error status.
    #[error("node {url} answered {status} ({code}): {message}")]
    Status {
        /// Request URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Machine-readable code from the JSON error body (empty if none).
        code: String,
        /// Error message from the body.
        message: String,
    },
    /// The body was not what the contract says.
    #[error("node {url} sent an unexpected body: {reason}")]
    Decode {
        /// Request URL.
        url: String,
        /// Parse error.
        reason: String,
    },
}

impl NodeError {
    /// HTTP status of a [`NodeError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            NodeError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The JSON `code` of a [`NodeError::Status`].
    pub fn code(&self) -> Option<&str> {
        match self {
            NodeError::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// `GET /v1/status` of one node.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct NodeStatus {
    /// Raft id.
    pub id: u64,
    /// Leader id as this node knows it (0 = none).
    #[serde(default)]
    pub leader: u64,
    /// Current term.
    #[serde(default)]
    pub term: u64,
    /// leader, follower, candidate, pre_candidate or learner.
    #[serde(default)]
    pub role: String,
    /// Commit index.
    #[serde(default)]
    pub commit_index: u64,
    /// Applied index.
    #[serde(default)]
    pub applied_index: u64,
    /// Index of the latest snapshot (the log is compacted up to it).
    #[serde(default)]
    pub snapshot_index: u64,
    /// Data-dir incarnation (16 hex digits).
    #[serde(default)]
    pub incarnation: String,
}

/// One entry of `GET /v1/members`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Member {
    /// Raft id.
    pub id: u64,
    /// Advertised peer URL.
    #[serde(default)]
    pub peer_url: String,
    /// `voter` or `learner`.
    pub role: String,
    /// Leader's match index for it.
    #[serde(default)]
    pub match_index: Option<u64>,
    /// Whether the leader reaches it.
    #[serde(default)]
    pub reachable: Option<bool>,
    /// Is the leader.
    #[serde(default)]
    pub is_leader: bool,
}

/// `GET /v1/members`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Members {
    /// Leader id (0 = none).
    #[serde(default)]
    pub leader: u64,
    /// All members.
    #[serde(default)]
    pub members: Vec<Member>,
    /// The answering member's commit index, read with the match indexes (absent from
    /// older nodes).
    #[serde(default)]
    pub commit_index: Option<u64>,
}

/// Outcome of a promotion request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Promotion {
    /// It is a voter now (or already was).
    Done,
    /// 409 learner_behind: try again after it caught up.
    Behind,
}

/// The node operations the operator uses. `base` is a client URL like
/// `http://host:2379`.
pub trait NodeApi: Send + Sync + 'static {
    /// `GET /v1/status`.
    fn status(&self, base: &str) -> impl Future<Output = Result<NodeStatus, NodeError>> + Send;
    /// `GET /v1/members`.
    fn members(&self, base: &str) -> impl Future<Output = Result<Members, NodeError>> + Send;
    /// `POST /v1/members` as learner; an existing identical member is success.
    fn add_learner(&self, base: &str, id: u64, peer_url: &str) -> impl Future<Output = Result<(), NodeError>> + Send;
    /// `POST /v1/members/<id>/promote`.
    fn promote(&self, base: &str, id: u64) -> impl Future<Output = Result<Promotion, NodeError>> + Send;
    /// `DELETE /v1/members/<id>`; a non-member is success.
    fn remove(&self, base: &str, id: u64) -> impl Future<Output = Result<(), NodeError>> + Send;
    /// `POST /v1/leader/transfer`.
    fn transfer_leader(&self, base: &str, to: u64) -> impl Future<Output = Result<(), NodeError>> + Send;
}

/// [`NodeApi`] over HTTP with reqwest.
#[derive(Clone, Debug)]
pub struct HttpNodeClient {
    http: reqwest::Client,
}

impl HttpNodeClient {
    /// A client whose requests time out after `timeout` (membership changes wait for a
    /// commit, so give them a few seconds).
    pub fn new(timeout: Duration) -> Result<Self, NodeError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| NodeError::Unreachable { url: String::new(), reason: e.to_string() })?;
        Ok(HttpNodeClient { http })
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<(u16, bytes::Bytes), NodeError> {
        let resp = req
            .send()
            .await
            .map_err(|e| NodeError::Unreachable { url: url.to_string(), reason: e.to_string() })?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| NodeError::Unreachable { url: url.to_string(), reason: e.to_string() })?;
        Ok((status, body))
    }

    /// Sends and maps non-2xx answers to [`NodeError::Status`].
    async fn call(&self, req: reqwest::RequestBuilder, url: &str) -> Result<bytes::Bytes, NodeError> {
        let (status, body) = self.send(req, url).await?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(status_error(url, status, &body))
        }
    }
}

/// Builds a [`NodeError::Status`] from an error body `{"error": .., "code": ..}`.
pub fn status_error(url: &str, status: u16, body: &[u8]) -> NodeError {
    #[derive(Deserialize)]
    struct ErrBody {
        #[serde(default)]
        error: String,
        #[serde(default)]
        code: String,
    }
    let (message, code) = match serde_json::from_slice::<ErrBody>(body) {
        Ok(b) => (b.error, b.code),
        Err(_) => (String::from_utf8_lossy(body).chars().take(200).collect(), String::new()),
    };
    NodeError::Status { url: url.to_string(), status, code, message }
}

fn decode<T: serde::de::DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, NodeError> {
    serde_json::from_slice(body).map_err(|e| NodeError::Decode { url: url.to_string(), reason: e.to_string() })
}

fn join(base: &str, path: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path)
}

impl NodeApi for HttpNodeClient {
    async fn status(&self, base: &str) -> Result<NodeStatus, NodeError> {
        let url = join(base, "/v1/status");
        let body = self.call(self.http.get(&url), &url).await?;
        decode(&url, &body)
    }

    async fn members(&self, base: &str) -> Result<Members, NodeError> {
        let url = join(base, "/v1/members");
        let body = self.call(self.http.get(&url), &url).await?;
        decode(&url, &body)
    }

    async fn add_learner(&self, base: &str, id: u64, peer_url: &str) -> Result<(), NodeError> {
        let url = join(base, "/v1/members");
        let req = self.http.post(&url).json(&serde_json::json!({"id": id, "peer_url": peer_url, "learner": true}));
        match self.call(req, &url).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("member_exists") => {
                // The node answers 200 for the same id, URL and role, so this is the id
                // as a voter (a promotion raced this call) or with another peer URL.
                // The first is this member: done. The second is not ours to promote.
                let view = self.members(base).await?;
                match view.members.iter().find(|m| m.id == id) {
                    Some(m) if m.peer_url != peer_url => Err(NodeError::Status {
                        url,
                        status: 409,
                        code: "member_exists".to_string(),
                        message: format!("member {id} exists with peer URL {}, not {peer_url}", m.peer_url),
                    }),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn promote(&self, base: &str, id: u64) -> Result<Promotion, NodeError> {
        let url = join(base, &format!("/v1/members/{id}/promote"));
        match self.call(self.http.post(&url), &url).await {
            Ok(_) => Ok(Promotion::Done),
            Err(e) if e.status() == Some(409) && e.code() == Some("learner_behind") => Ok(Promotion::Behind),
            Err(e) => Err(e),
        }
    }

    async fn remove(&self, base: &str, id: u64) -> Result<(), NodeError> {
        let url = join(base, &format!("/v1/members/{id}"));
        match self.call(self.http.delete(&url), &url).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn transfer_leader(&self, base: &str, to: u64) -> Result<(), NodeError> {
        let url = join(base, "/v1/leader/transfer");
        let req = self.http.post(&url).json(&serde_json::json!({"to": to}));
        self.call(req, &url).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_parsed() {
        let e = status_error("http://x/v1/members/4/promote", 409, br#"{"error":"behind","code":"learner_behind"}"#);
        assert_eq!(e.status(), Some(409));
        assert_eq!(e.code(), Some("learner_behind"));
        let e = status_error("u", 500, b"plain text");
        assert_eq!(e.code(), Some(""));
        assert!(e.to_string().contains("plain text"), "{e}");
    }

    #[test]
    fn contract_bodies_decode() {
        let s: NodeStatus = decode(
            "u",
            br#"{"id":1,"leader":1,"term":3,"role":"leader","commit_index":9,"applied_index":9,"snapshot_index":0,"wal_bytes":10,"incarnation":"00ff00ff00ff00ff","members":[]}"#,
        )
        .expect("status decodes");
        assert_eq!((s.id, s.leader, s.applied_index), (1, 1, 9));
        let m: Members = decode(
            "u",
            br#"{"leader":1,"members":[{"id":1,"peer_url":"http://a:2380","role":"voter","match_index":9,"reachable":true,"is_leader":true},{"id":2,"peer_url":"http://b:2380","role":"learner","match_index":null,"reachable":null,"is_leader":false}]}"#,
        )
        .expect("members decode");
        assert_eq!(m.members.len(), 2);
        assert_eq!(m.members[1].match_index, None);
        assert!(decode::<Members>("u", b"{").is_err());
    }

    #[test]
    fn urls_join_without_double_slash() {
        assert_eq!(join("http://h:1/", "/v1/status"), "http://h:1/v1/status");
        assert_eq!(join("http://h:1", "/v1/status"), "http://h:1/v1/status");
    }

    /// Serves one canned answer per request, in order, on loopback (one request per
    /// connection); returns its base URL and the request lines it saw.
    async fn canned(answers: Vec<(u16, &'static str)>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for (status, body) in answers {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then the body its Content-Length announces.
                loop {
                    let Ok(n) = conn.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                            .unwrap_or(0usize);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let line = String::from_utf8_lossy(&buf).lines().next().unwrap_or_default().to_string();
                if let Ok(mut l) = log.lock() {
                    l.push(line);
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            }
        });
        (base, seen)
    }

    #[tokio::test]
    async fn an_existing_member_is_this_learner_only_with_its_peer_url() {
        let exists = (409, r#"{"error":"member 4 already exists","code":"member_exists"}"#);
        let c = HttpNodeClient::new(Duration::from_secs(5)).expect("client");
        // The id exists as a voter with our URL (a promotion raced the call): done.
        let (base, seen) = canned(vec![
            exists,
            (200, r#"{"leader":1,"members":[{"id":4,"peer_url":"http://kv-3:2380","role":"voter"}]}"#),
        ])
        .await;
        c.add_learner(&base, 4, "http://kv-3:2380").await.expect("our member");
        let seen = seen.lock().expect("log").clone();
        assert_eq!(seen, ["POST /v1/members HTTP/1.1", "GET /v1/members HTTP/1.1"]);
        // The id exists with another peer URL: someone else's member, an error.
        let (base, _) = canned(vec![
            exists,
            (200, r#"{"leader":1,"members":[{"id":4,"peer_url":"http://elsewhere:2380","role":"learner"}]}"#),
        ])
        .await;
        let e = c.add_learner(&base, 4, "http://kv-3:2380").await.expect_err("a foreign member");
        assert_eq!(e.code(), Some("member_exists"));
        assert!(e.to_string().contains("http://elsewhere:2380"), "{e}");
        // A plain success needs no second request.
        let (base, seen) = canned(vec![(201, r#"{"members":[]}"#)]).await;
        c.add_learner(&base, 4, "http://kv-3:2380").await.expect("added");
        assert_eq!(seen.lock().expect("log").len(), 1);
    }

    #[tokio::test]
    async fn unreachable_node_is_an_error_not_a_panic() {
        // Port 9 on loopback: nothing listens there in the test environment.
        let c = HttpNodeClient::new(Duration::from_millis(500)).expect("client");
        let e = c.status("http://127.0.0.1:9").await.expect_err("no server");
        assert!(matches!(e, NodeError::Unreachable { .. }), "{e}");
    }
}
