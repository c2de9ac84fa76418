//! Peer transport: raft messages over HTTP/1.1 with hyper (HTTPS with mutual TLS when
//! peer TLS is configured; a stranger without a certificate from the peer CA is refused
//! at the handshake, in [`crate::http::serve_tls`], and never reaches this code).
//!
//! Outgoing: one task and one bounded queue per peer. A task takes every message queued
//! for its peer (batching), frames them (`u32` little-endian length + prost-encoded
//! `eraftpb::Message`, repeated) into one `POST /raft`, and reuses a keep-alive
//! connection. A full queue drops messages (raft retransmits), so a dead or slow peer
//! never blocks the raft loop or the other peers. Failures are reported to raft
//! (`report_unreachable`, snapshot failure) and retried with a short back-off.
//!
//! Incoming: the peer listener decodes the frames and hands each message to the raft
//! loop. Garbage gets a 400 and the node stays up; a message from a member that was
//! removed gets 410 Gone, which tells the sender to stop (etcd does the same).

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use prost::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeTransition, ConfChangeType, ConfChangeV2, EntryType, Message, MessageType};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::kv::KvStore;
use crate::metrics::metrics;
use crate::raft_loop::Request;
use crate::tls::PeerTls;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;
/// Messages per HTTP request at most.
const MAX_BATCH: usize = 4096;
/// Largest accepted peer request body (snapshots travel in one message).
pub const MAX_PEER_BODY: usize = 1 << 31;
/// Header carrying the sender's raft id.
pub const FROM_HEADER: &str = "x-raftkv-from";
/// Header carrying the sender's peer URL (lets a joining node answer a leader it never heard of).
pub const URL_HEADER: &str = "x-raftkv-peer-url";
/// Header of a 410 answer: the applied index of the member that refused, so the sender
/// can tell a lagging peer's stale view from its own removal.
pub const APPLIED_HEADER: &str = "x-raftkv-applied";

/// The peer HTTP client: plain HTTP, or HTTPS with the node's peer certificate.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Peer {
    url: String,
    queue: mpsc::Sender<Message>,
}

struct Inner {
    id: u64,
    self_url: String,
    peers: RwLock<HashMap<u64, Peer>>,
    raft: Sender<Request>,
    client: HttpClient,
    rt: tokio::runtime::Handle,
}

/// Sends raft messages to peers. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

/// The peer client with keep-alive, shared by the transport and API forwarding. With
/// peer TLS it speaks only `https://`, presents the peer certificate and trusts only the
/// peer CA (hostname/IP SANs are verified); without, only `http://`.
pub fn peer_client(tls: Option<&PeerTls>) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(2)));
    conn.enforce_http(false);
    let builder = match tls {
        Some(t) => HttpsConnectorBuilder::new().with_tls_config((*t.client).clone()).https_only(),
        None => HttpsConnectorBuilder::new().with_tls_config((*crate::tls::untrusting_client_config()).clone()).https_or_http(),
    };
    let conn = builder.enable_http1().wrap_connector(conn);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(conn)
}

/// Encodes messages as length-prefixed frames.
pub fn encode_frames(msgs: &[Message]) -> Bytes {
    let mut buf = BytesMut::with_capacity(msgs.iter().map(|m| m.encoded_len() + 4).sum());
    for m in msgs {
        buf.put_u32_le(m.encoded_len() as u32);
        // Encoding into a buffer with enough capacity cannot fail.
        let _ = m.encode(&mut buf);
    }
    buf.freeze()
}

/// Why a peer body did not decode.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than a frame header or its announced length.
    #[error("truncated frame at byte {0}")]
    Truncated(usize),
    /// A frame that is not a raft message.
    #[error("bad raft message at byte {offset}: {source}")]
    Decode {
        /// Offset of the frame.
        offset: usize,
        /// Cause.
        source: prost::DecodeError,
    },
    /// A raft message with a value raft-rs cannot take (it would panic on it): an
    /// unknown message, entry or conf change type, a term or index beyond 2^63 - 1, an
    /// empty proposal, an append whose entries do not follow its index, a vote without
    /// a term.
    #[error("invalid raft message at byte {offset}: {reason}")]
    Invalid {
        /// Offset of the frame.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Largest term or index a peer message may carry (as the WAL: 2^63 - 1).
const MAX_TERM_OR_INDEX: u64 = i64::MAX as u64;

/// Checks the enum fields raft-rs reads with panicking accessors (`get_msg_type`,
/// `get_entry_type`, and the conf change types when an entry is applied): protobuf
/// decoding accepts any number there. Also refuses terms and indexes beyond
/// [`MAX_TERM_OR_INDEX`] and two shapes raft-rs is fatal on.
fn check_message(m: &Message) -> Result<(), String> {
    let Some(ty) = MessageType::from_i32(m.msg_type) else {
        return Err(format!("unknown message type {}", m.msg_type));
    };
    for e in &m.entries {
        let unknown = |what: &str, v: i32| format!("entry {}: unknown {what} {v}", e.index);
        match EntryType::from_i32(e.entry_type) {
            None => return Err(unknown("entry type", e.entry_type)),
            Some(EntryType::EntryNormal) => {}
            Some(EntryType::EntryConfChange) => {
                let cc = ConfChange::decode(e.data.as_slice()).map_err(|err| format!("entry {}: bad conf change: {err}", e.index))?;
                if ConfChangeType::from_i32(cc.change_type).is_none() {
                    return Err(unknown("conf change type", cc.change_type));
                }
            }
            Some(EntryType::EntryConfChangeV2) => {
                let cc = ConfChangeV2::decode(e.data.as_slice()).map_err(|err| format!("entry {}: bad conf change: {err}", e.index))?;
                if ConfChangeTransition::from_i32(cc.transition).is_none() {
                    return Err(unknown("conf change transition", cc.transition));
                }
                if let Some(c) = cc.changes.iter().find(|c| ConfChangeType::from_i32(c.change_type).is_none()) {
                    return Err(unknown("conf change type", c.change_type));
                }
            }
        }
    }
    // Terms and indexes are far below 2^63 in any real cluster; raft-rs adds to them
    // unchecked (a term of u64::MAX overflows at the next campaign).
    let snap_meta = m.snapshot.as_ref().and_then(|s| s.metadata.as_ref());
    let numbers = [
        ("term", m.term),
        ("log term", m.log_term),
        ("index", m.index),
        ("commit", m.commit),
        ("commit term", m.commit_term),
        ("reject hint", m.reject_hint),
        ("snapshot index", snap_meta.map_or(0, |s| s.index)),
        ("snapshot term", snap_meta.map_or(0, |s| s.term)),
    ];
    let entry_numbers = m.entries.iter().flat_map(|e| [("entry index", e.index), ("entry term", e.term)]);
    if let Some((what, v)) = numbers.into_iter().chain(entry_numbers).find(|(_, v)| *v > MAX_TERM_OR_INDEX) {
        return Err(format!("{what} {v} is beyond any real cluster's ({MAX_TERM_OR_INDEX})"));
    }
    // Shapes no correct peer sends and raft-rs does not survive: an empty proposal
    // (`fatal!`), an append whose entries do not follow its index one by one (a
    // "conflict" with committed entries is fatal too).
    if ty == MessageType::MsgPropose && m.entries.is_empty() {
        return Err("empty proposal".into());
    }
    // A (pre-)vote and its answer always carry the term being campaigned for; raft-rs
    // answers a term-0 pre-vote with a term-0 message and is fatal on sending it.
    let votes = [
        MessageType::MsgRequestVote,
        MessageType::MsgRequestVoteResponse,
        MessageType::MsgRequestPreVote,
        MessageType::MsgRequestPreVoteResponse,
    ];
    if votes.contains(&ty) && m.term == 0 {
        return Err(format!("{ty:?} without a term"));
    }
    if ty == MessageType::MsgAppend {
        for (i, e) in m.entries.iter().enumerate() {
            if m.index.checked_add(i as u64 + 1) != Some(e.index) {
                return Err(format!("append at index {}: entry {i} has index {}", m.index, e.index));
            }
        }
    }
    Ok(())
}

/// Decodes length-prefixed frames; any malformed frame fails the whole body, and so
/// does a message raft-rs could not take (see [`FrameError::Invalid`]).
pub fn decode_frames(mut body: &[u8]) -> Result<Vec<Message>, FrameError> {
    let total = body.len();
    let mut out = Vec::new();
    while !body.is_empty() {
        let offset = total - body.len();
        if body.len() < 4 {
            return Err(FrameError::Truncated(offset));
        }
        let len = body.get_u32_le() as usize;
        if body.len() < len {
            return Err(FrameError::Truncated(offset));
        }
        let m = Message::decode(&body[..len]).map_err(|source| FrameError::Decode { offset, source })?;
        check_message(&m).map_err(|reason| FrameError::Invalid { offset, reason })?;
        body.advance(len);
        out.push(m);
    }
    Ok(out)
}

impl Transport {
    /// A transport for node `id` advertising `self_url`; feedback goes to `raft`.
    /// `tls` is the peer TLS of the node (`None`: plaintext peers).
    pub fn new(id: u64, self_url: String, tls: Option<&PeerTls>, raft: Sender<Request>, rt: tokio::runtime::Handle) -> Self {
        let client = peer_client(tls);
        Transport { inner: Arc::new(Inner { id, self_url, peers: RwLock::new(HashMap::new()), raft, client, rt }) }
    }

    /// Adds or updates a peer's URL (starting its sender task).
    pub fn set_peer(&self, id: u64, url: &str) {
        let mut peers = match self.inner.peers.write() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        if peers.get(&id).is_some_and(|p| p.url == url) {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let inner = self.inner.clone();
        let url_owned = url.trim_end_matches('/').to_string();
        self.inner.rt.spawn(run_peer(inner, id, url_owned.clone(), rx));
        peers.insert(id, Peer { url: url_owned, queue: tx });
        debug!(peer = id, url, "peer set");
    }

    /// Forgets a peer (its task ends when its queue closes).
    pub fn remove_peer(&self, id: u64) {
        let mut peers = match self.inner.peers.write() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        peers.remove(&id);
    }

    /// A peer's URL.
    pub fn peer_url(&self, id: u64) -> Option<String> {
        let peers = match self.inner.peers.read() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        peers.get(&id).map(|p| p.url.clone())
    }

    /// Queues messages for their peers; never blocks.
    pub fn send(&self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let peers = match self.inner.peers.read() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        for m in msgs {
            let to = m.to;
            let is_snap = m.get_msg_type() == MessageType::MsgSnapshot;
            let ok = match peers.get(&to) {
                Some(p) => p.queue.try_send(m).is_ok(),
                None => false,
            };
            if !ok {
                metrics().peer_dropped_messages.with_label_values(&[&to.to_string()]).inc();
                if is_snap {
                    let _ = self.inner.raft.send(Request::SnapshotSent(to, false));
                }
                let _ = self.inner.raft.send(Request::Unreachable(to));
            }
        }
    }
}

async fn run_peer(inner: Arc<Inner>, id: u64, url: String, mut rx: mpsc::Receiver<Message>) {
    let endpoint = format!("{url}/raft");
    let label = id.to_string();
    let mut batch = Vec::new();
    let mut backoff = Duration::from_millis(50);
    let mut last_tls_warning: Option<Instant> = None;
    while let Some(m) = rx.recv().await {
        batch.push(m);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshot = batch.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let body = encode_frames(&batch);
        let len = body.len() as u64;
        batch.clear();
        let req = HttpRequest::builder()
            .method(Method::POST)
            .uri(&endpoint)
            .header(FROM_HEADER, inner.id.to_string())
            .header(URL_HEADER, &inner.self_url)
            .header("content-type", "application/x-raftkv-frames")
            .body(Full::new(body));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = id, url = %url, error = %e, "bad peer URL; dropping messages");
                if snapshot {
                    let _ = inner.raft.send(Request::SnapshotSent(id, false));
                }
                continue;
            }
        };
        let limit = if snapshot { Duration::from_secs(120) } else { Duration::from_secs(5) };
        let started = Instant::now();
        let outcome = tokio::time::timeout(limit, inner.client.request(req)).await;
        let ok = match outcome {
            Ok(Ok(resp)) if resp.status().is_success() => {
                metrics().peer_round_trip_seconds.with_label_values(&[&label]).observe(started.elapsed().as_secs_f64());
                metrics().peer_sent_bytes.with_label_values(&[&label]).inc_by(len);
                let _ = resp.into_body().collect().await;
                true
            }
            Ok(Ok(resp)) if resp.status() == StatusCode::GONE => {
                let peer_applied =
                    resp.headers().get(APPLIED_HEADER).and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok());
                debug!(peer = id, ?peer_applied, "peer says this member was removed from the cluster");
                let _ = inner.raft.send(Request::Removed { peer_applied });
                false
            }
            Ok(Ok(resp)) => {
                debug!(peer = id, status = %resp.status(), "peer refused messages");
                false
            }
            Ok(Err(e)) => {
                match tls_error_in(&e) {
                    // A refused certificate is configuration, not a network blip: say so
                    // (at most every 30 s per peer).
                    Some(tls) if last_tls_warning.is_none_or(|t| t.elapsed() >= TLS_WARN_EVERY) => {
                        warn!(peer = id, url = %url, error = %tls, "peer TLS handshake failed (check the peer certificates, CA and SANs)");
                        last_tls_warning = Some(Instant::now());
                    }
                    _ => debug!(peer = id, error = %e, "peer unreachable"),
                }
                false
            }
            Err(_) => {
                debug!(peer = id, "peer timed out");
                false
            }
        };
        if snapshot {
            let _ = inner.raft.send(Request::SnapshotSent(id, ok));
        }
        if ok {
            backoff = Duration::from_millis(50);
        } else {
            let _ = inner.raft.send(Request::Unreachable(id));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            // Whatever queued up meanwhile is stale; raft will resend what matters. A
            // dropped snapshot must be reported, or raft waits for it forever (the
            // peer's progress stays in the snapshot state, sent nothing but heartbeats).
            while let Ok(m) = rx.try_recv() {
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    let _ = inner.raft.send(Request::SnapshotSent(id, false));
                }
            }
        }
    }
}

/// How often a peer's TLS failure is logged as a warning.
const TLS_WARN_EVERY: Duration = Duration::from_secs(30);

/// The TLS failure (a rustls error, or an alert from the other side) behind a client
/// error, if that is what it was.
pub fn tls_error_in(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        // An io::Error's source() skips the error it wraps; look inside it directly.
        cur = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Handles one request on the peer listener.
pub async fn handle_peer_request(
    req: HttpRequest<Incoming>,
    my_id: u64,
    raft: Sender<Request>,
    transport: Transport,
    kv: Arc<RwLock<KvStore>>,
    status: impl Fn() -> Arc<crate::raft_loop::NodeStatus>,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/raft") => {}
        (&Method::GET, "/members") => {
            let mut r = text(StatusCode::OK, crate::api::members_json(&status()).to_string());
            r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
            return r;
        }
        (_, "/raft") => return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => return text(StatusCode::NOT_FOUND, "not a raftkv peer route\n"),
    }
    let from_hdr: Option<u64> = req.headers().get(FROM_HEADER).and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok());
    let from_url = req.headers().get(URL_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = match Limited::new(req.into_body(), MAX_PEER_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("unreadable body: {e}\n")),
    };
    let msgs = match decode_frames(&body) {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, from = ?from_hdr, "garbage from a peer");
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    // The sender is named by the header (a forwarded MsgTransferLeader carries the
    // transferee in `from`, so `from` is not always the sender).
    let sender = from_hdr.or_else(|| msgs.first().map(|m| m.from)).unwrap_or(0);
    for m in &msgs {
        if m.to != my_id {
            return text(StatusCode::BAD_REQUEST, format!("message for member {} sent to member {my_id}\n", m.to));
        }
        // No member is 0, and no member sends to itself over the network (a forwarded
        // MsgTransferLeader names the transferee in `from`, which may be this member).
        if m.from == 0 || (m.from == my_id && m.get_msg_type() != MessageType::MsgTransferLeader) {
            return text(StatusCode::BAD_REQUEST, format!("{:?} claims to come from member {}\n", m.get_msg_type(), m.from));
        }
    }
    let (removed, applied) = kv.read().map(|k| (k.is_removed(sender), k.applied())).unwrap_or((false, 0));
    // A removed member that was never told keeps sending; it gets 410 and stops. But its
    // id may have been re-added after the removal this member knows of (this member is
    // behind, e.g. restarted from an older snapshot), and then refusing it would keep
    // this member from ever catching up. Such a sender is let through when it shows
    // newer history: a commit index or a snapshot beyond everything applied here, or leader traffic
    // (append, heartbeat, snapshot) of this member's term or a later one. A removed
    // member can show neither: it cannot know a commit beyond its own removal without
    // applying it and stopping, and it cannot win an election (members refuse its
    // votes), so its leader traffic is from a term older than the one this member
    // learned the removal in (a leader that commits its own removal stops when it
    // applies it, and a restarted node is never a leader).
    let newer = |m: &Message| {
        let snapshot_index = m.snapshot.as_ref().and_then(|s| s.metadata.as_ref()).map_or(0, |md| md.index);
        m.commit > applied
            || snapshot_index > applied
            || (matches!(m.get_msg_type(), MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot)
                && m.term >= status().term)
    };
    if removed && !msgs.iter().any(newer) {
        let mut r = text(StatusCode::GONE, format!("member {sender} was removed from this cluster\n"));
        r.headers_mut().insert(APPLIED_HEADER, hyper::header::HeaderValue::from(applied));
        return r;
    }
    if let Some(url) = from_url {
        if sender != 0 && transport.peer_url(sender).is_none() && crate::config::parse_peer_url(&url).is_ok() {
            transport.set_peer(sender, &url);
        }
    }
    metrics().peer_received_bytes.with_label_values(&[&sender.to_string()]).inc_by(body.len() as u64);
    for m in msgs {
        if raft.send(Request::Raft(Box::new(m))).is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "node is stopping\n");
        }
    }
    text(StatusCode::NO_CONTENT, Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{ConfChangeSingle, Entry, Snapshot};

    /// Serves `/ok` over mutual TLS with the test PKI; returns the port.
    async fn tls_server(tls: &PeerTls) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = crate::shutdown::Shutdown::new();
        tokio::spawn(crate::http::serve_tls(listener, Some(tls.server.clone()), stop, |_req| async {
            text(StatusCode::OK, "ok")
        }));
        port
    }

    async fn get(client: &HttpClient, url: &str) -> Result<StatusCode, hyper_util::client::legacy::Error> {
        let req = HttpRequest::get(url).body(Full::new(Bytes::new())).unwrap();
        client.request(req).await.map(|r| r.status())
    }

    #[tokio::test]
    async fn peer_client_verifies_the_server_name_and_presents_its_certificate() {
        let k = crate::tls::Pki::new();
        let tls = crate::tls::peer_tls(&k.p("cert.pem"), &k.p("key.pem"), &k.p("ca.pem")).unwrap();
        let port = tls_server(&tls).await;
        let client = peer_client(Some(&tls));
        assert_eq!(get(&client, &format!("https://127.0.0.1:{port}/ok")).await.unwrap(), StatusCode::OK);
        // The certificate names 127.0.0.1 only: "localhost" is refused by name.
        let e = get(&client, &format!("https://localhost:{port}/ok")).await.unwrap_err();
        let why = tls_error_in(&e).unwrap_or_else(|| panic!("not a TLS error: {e:?}"));
        assert!(why.contains("not valid for name") || why.contains("NotValidForName"), "{why}");
        // A TLS peer client never speaks plaintext.
        assert!(get(&client, &format!("http://127.0.0.1:{port}/ok")).await.is_err());
        // A plaintext cluster's client cannot talk to the TLS listener at all.
        let plain = peer_client(None);
        let e = get(&plain, &format!("https://127.0.0.1:{port}/ok")).await.unwrap_err();
        assert!(tls_error_in(&e).is_some(), "{e:?}");
        assert!(tls_error_in(&std::io::Error::other("plain")).is_none());
    }

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let msgs: Vec<Message> = (1..4)
            .map(|i| Message { to: 2, from: 1, term: i, index: i * 10, ..Default::default() })
            .collect();
        let body = encode_frames(&msgs);
        assert_eq!(decode_frames(&body).unwrap(), msgs);
        assert!(decode_frames(&body[..body.len() - 1]).is_err());
        assert!(decode_frames(&[1, 2]).is_err());
        assert!(decode_frames(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_frames(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_frames(&[]).unwrap().is_empty());
    }

    #[test]
    fn unknown_enum_values_are_refused_not_handed_to_raft() {
        let ok = |m: Message| decode_frames(&encode_frames(&[m]));
        let base = Message { to: 2, from: 1, term: 1, ..Default::default() };
        // raft-rs's get_msg_type() panics on this one.
        let err = ok(Message { msg_type: 42, ..base.clone() }).unwrap_err();
        assert!(matches!(err, FrameError::Invalid { offset: 0, .. }), "{err}");
        assert!(err.to_string().contains("unknown message type 42"), "{err}");
        let entry = |entry_type: i32, data: Vec<u8>| Entry { entry_type, index: 5, term: 1, data, ..Default::default() };
        let append = |e: Entry| Message { msg_type: MessageType::MsgAppend as i32, index: 4, entries: vec![e], ..base.clone() };
        assert!(ok(append(entry(7, vec![]))).unwrap_err().to_string().contains("unknown entry type 7"));
        let cc = ConfChange { change_type: 9, node_id: 3, ..Default::default() }.encode_to_vec();
        assert!(ok(append(entry(EntryType::EntryConfChange as i32, cc))).is_err());
        let cc2 = ConfChangeV2 { transition: 5, ..Default::default() }.encode_to_vec();
        assert!(ok(append(entry(EntryType::EntryConfChangeV2 as i32, cc2))).is_err());
        let cc2 = ConfChangeV2 { changes: vec![ConfChangeSingle { change_type: -1, node_id: 2 }], ..Default::default() };
        assert!(ok(append(entry(EntryType::EntryConfChangeV2 as i32, cc2.encode_to_vec()))).is_err());
        assert!(ok(append(entry(EntryType::EntryConfChange as i32, vec![0xff]))).is_err());
        // What a leader sends passes: entries, an empty conf change (auto leave), a snapshot.
        let good = ConfChangeV2 { changes: vec![ConfChangeSingle { change_type: 2, node_id: 4 }], ..Default::default() };
        for e in [entry(0, b"cmd".to_vec()), entry(2, vec![]), entry(2, good.encode_to_vec())] {
            assert!(ok(append(e)).is_ok());
        }
        assert!(ok(Message { msg_type: MessageType::MsgSnapshot as i32, ..base.clone() }).is_ok());
        // raft-rs is fatal on an empty proposal; an append must continue its index.
        assert!(ok(Message { msg_type: MessageType::MsgPropose as i32, ..base.clone() }).is_err());
        assert!(ok(Message { msg_type: MessageType::MsgPropose as i32, entries: vec![entry(0, vec![])], ..base.clone() }).is_ok());
        let gap = Message { index: 3, ..append(entry(0, vec![])) };
        assert!(ok(gap).unwrap_err().to_string().contains("append at index 3: entry 0 has index 5"));
        let wrap = Message { index: u64::MAX, ..append(entry(0, vec![])) };
        assert!(ok(wrap).is_err());
        assert!(ok(Message { index: 4, ..append(entry(0, vec![])) }).is_ok());
        for ty in [MessageType::MsgRequestPreVote, MessageType::MsgRequestVoteResponse] {
            assert!(ok(Message { msg_type: ty as i32, term: 0, ..base.clone() }).unwrap_err().to_string().contains("without a term"));
            assert!(ok(Message { msg_type: ty as i32, ..base.clone() }).is_ok());
        }
        // Terms and indexes beyond 2^63 - 1 (raft-rs overflows on u64::MAX terms).
        let huge = i64::MAX as u64 + 1;
        assert!(ok(Message { term: u64::MAX, ..base.clone() }).unwrap_err().to_string().contains("term 18446744073709551615"));
        assert!(ok(Message { commit: huge, ..base.clone() }).is_err());
        assert!(ok(Message { reject_hint: huge, ..base.clone() }).is_err());
        assert!(ok(append(Entry { term: huge, ..entry(0, vec![]) })).is_err());
        let snap = Snapshot { metadata: Some(raft::eraftpb::SnapshotMetadata { index: huge, ..Default::default() }), ..Default::default() };
        assert!(ok(Message { msg_type: MessageType::MsgSnapshot as i32, snapshot: Some(snap), ..base.clone() }).is_err());
        assert!(ok(Message { term: huge - 1, commit: huge - 1, ..base.clone() }).is_ok());
    }
}
