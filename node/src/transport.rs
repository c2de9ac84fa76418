//! Peer transport: raft messages over HTTP/1.1 with hyper (HTTPS with mutual TLS when
//! peer TLS is configured; a stranger without a certificate from the peer CA is refused
//! at the handshake, in [`crate::http::serve_tls`], and never reaches this code).
//!
//! Outgoing: one task and one bounded queue per peer. The task opens a **stream** to the
//! peer: `GET /raft/stream` upgraded (HTTP/1.1 `Upgrade: raftkv-raft/1`, like etcd's
//! rafthttp streams) to a long-lived connection that carries length-prefixed frames
//! (`u32` little-endian length + prost-encoded `eraftpb::Message`, repeated) in order,
//! with no request/response round trip per batch: the task takes every message queued
//! for its peer (batching) and writes them as soon as the previous write is done. The
//! receiver answers on the same connection with 9-byte control frames: an ack (how many
//! messages it has handed to raft so far) after each batch, or "gone" (below). A stream
//! whose acks stop for [`STREAM_STALL`] is dropped and reopened, so a dead peer behind a
//! live-looking socket is noticed. Snapshots, and any message too large for a stream
//! frame, go as a `POST /raft` of their own in a task of their own (the answer tells
//! raft whether the snapshot arrived, and appends and heartbeats keep flowing
//! meanwhile). A peer that does not know streams (404: an older version) gets every
//! batch as a `POST /raft` for a minute before a stream is tried again.
//!
//! A full queue drops messages (raft retransmits), so a dead or slow peer never blocks
//! the raft loop or the other peers. Failures are reported to raft
//! (`report_unreachable`, snapshot failure) and retried with a short back-off.
//!
//! Incoming: the peer listener decodes the frames (of a POST body, or of a stream as
//! they arrive) and hands each message to the raft loop. Garbage gets a 400 (on a
//! stream: the stream is closed) and the node stays up; a message from a member that
//! was removed gets 410 Gone (on a stream: a "gone" control frame), which tells the
//! sender to stop (etcd does the same).

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use prost::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeTransition, ConfChangeType, ConfChangeV2, EntryType, Message, MessageType};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::kv::KvStore;
use crate::metrics::metrics;
use crate::raft_loop::{Renewal, Request};
use crate::shutdown::Shutdown;
use crate::tls::PeerTls;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;
/// Messages per HTTP request at most.
const MAX_BATCH: usize = 4096;
/// Largest accepted peer request body (snapshots travel in one message).
pub const MAX_PEER_BODY: usize = 1 << 31;
/// A peer request body that stops arriving for this long is refused (see
/// [`collect_peer_body`]).
const PEER_BODY_IDLE: Duration = Duration::from_secs(30);
/// Header carrying the sender's raft id.
pub const FROM_HEADER: &str = "x-raftkv-from";
/// Header carrying the sender's peer URL (lets a joining node answer a leader it never heard of).
pub const URL_HEADER: &str = "x-raftkv-peer-url";
/// Header of a 410 answer: the applied index of the member that refused, so the sender
/// can tell a lagging peer's stale view from its own removal.
pub const APPLIED_HEADER: &str = "x-raftkv-applied";
/// Header carrying the sender's cluster id (16 hex digits; absent while the sender does
/// not know it, as a joining node before its first snapshot). A peer of another cluster
/// gets 412 with this member's id in the same header.
pub const CLUSTER_HEADER: &str = "x-raftkv-cluster-id";
/// The path a peer stream is opened on.
pub const STREAM_PATH: &str = "/raft/stream";
/// The path a leader tells a member on: proposals it forwarded were dropped without
/// being appended (body: their request ids, `u64` big-endian each).
pub const DROPPED_PATH: &str = "/raft/dropped";
/// The path a member forwards a client's lease keepalive on, to the leader (etcd's
/// followers do the same): body the lease id (`u64` big-endian); `200` with a JSON
/// [`Renewal`] (`{"renewed":ttl_ms,"revision":applied}`, `{"not_found":true}` or
/// `{"not_leader":id}`).
/// A member of an older version answers `404`: the keepalive then goes through raft.
pub const RENEW_PATH: &str = "/raft/lease-renew";
/// How long the leader's peer listener waits for a forwarded renewal's confirmation.
const RENEW_WAIT: Duration = Duration::from_secs(5);

/// A [`Renewal`] as the peer route carries it.
fn renewal_json(r: Renewal) -> serde_json::Value {
    match r {
        Renewal::Renewed { ttl_ms, revision } => serde_json::json!({ "renewed": ttl_ms, "revision": revision }),
        Renewal::NotFound => serde_json::json!({ "not_found": true }),
        Renewal::NotLeader { leader } => serde_json::json!({ "not_leader": leader }),
    }
}

/// Reads [`renewal_json`]'s output back.
fn renewal_from_json(v: &serde_json::Value) -> Option<Renewal> {
    if let Some(ttl_ms) = v.get("renewed").and_then(serde_json::Value::as_u64) {
        let revision = v.get("revision").and_then(serde_json::Value::as_u64)?;
        Some(Renewal::Renewed { ttl_ms, revision })
    } else if v.get("not_found").is_some() {
        Some(Renewal::NotFound)
    } else {
        v.get("not_leader").and_then(serde_json::Value::as_u64).map(|leader| Renewal::NotLeader { leader })
    }
}

/// What the leader said of a forwarded lease renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRenewal {
    /// Its answer.
    Answer(Renewal),
    /// It does not know the route (an older version): renew through raft instead.
    Unsupported,
}

/// Most request ids one dropped-proposal notice may carry.
const MAX_DROPPED_IDS: usize = 1 << 16;
/// The `Upgrade` token of a peer stream (its version is in the name).
pub const STREAM_PROTOCOL: &str = "raftkv-raft/1";
/// Largest message sent on a stream; larger ones (snapshots) go as a `POST /raft`.
pub const MAX_STREAM_FRAME: usize = 64 << 20;
/// A stream with messages unacknowledged for this long is dropped and reopened.
pub const STREAM_STALL: Duration = Duration::from_secs(5);
/// How long a peer that answered 404 to a stream gets POSTs before streams are tried again.
const STREAM_RETRY: Duration = Duration::from_secs(60);
/// Control frame from the receiver of a stream: the number of messages it has handed to
/// raft so far follows (`u64` little-endian). Sent right after the batch it covers, so
/// the sender takes its delay as the round trip.
const CONTROL_ACK: u8 = 1;
/// As [`CONTROL_ACK`], but sent late: batches that came within [`ACK_EVERY`] of the
/// previous ack wait for the next batch's ack, or, if none comes, are acked together
/// twice that long after the previous ack. Not a round trip.
const CONTROL_ACK_LATE: u8 = 3;
/// A stream receiver acks at most this often (the rest is acked late, together): one
/// ack per batch would double the system calls and wake-ups of a busy stream.
const ACK_EVERY: Duration = Duration::from_millis(50);
/// Control frame from the receiver of a stream: the sender was removed from the cluster;
/// the receiver's applied index follows. The stream ends after it.
const CONTROL_GONE: u8 = 2;
/// Bytes of a control frame: a tag and a `u64`.
const CONTROL_LEN: usize = 9;

/// The peer HTTP client: plain HTTP, or HTTPS with the node's peer certificate.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Peer {
    url: String,
    queue: mpsc::Sender<Message>,
}

struct Inner {
    id: u64,
    self_url: String,
    /// This member's cluster id (0: not known yet), sent with every request.
    cluster_id: std::sync::atomic::AtomicU64,
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
    conn.set_keepalive(Some(crate::http::KEEPALIVE_IDLE));
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
        encode_frame(m, &mut buf);
    }
    buf.freeze()
}

/// Appends one length-prefixed frame to `buf`.
fn encode_frame(m: &Message, buf: &mut BytesMut) {
    buf.put_u32_le(m.encoded_len() as u32);
    // Encoding into a growable buffer cannot fail.
    let _ = m.encode(buf);
}

/// The length of the complete frames at the front of `buf` (a frame still arriving is
/// left out), or the announced length of a frame larger than `max`.
fn complete_frames(buf: &[u8], max: usize) -> Result<usize, usize> {
    let mut at = 0;
    while let Some(head) = buf.get(at..at + 4) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > max {
            return Err(len);
        }
        if buf.len() < at + 4 + len {
            break;
        }
        at += 4 + len;
    }
    Ok(at)
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
    /// a term, a read-index request without its one context entry, a forwarded proposal
    /// or read-index request with a term, any other message without one.
    #[error("invalid raft message at byte {offset}: {reason}")]
    Invalid {
        /// Offset of the frame.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Largest term or index a peer message may carry: 2^62, half the WAL's bound
/// ([`crate::storage::MAX_INDEX`], 2^63 - 1). raft-rs adds to what peers send (a campaign
/// bumps the term, an append extends the index), so a peer's value must leave room for
/// what this node then writes, or storage would refuse to write it.
const MAX_TERM_OR_INDEX: u64 = crate::storage::MAX_INDEX / 2 + 1;
const _: () = assert!(MAX_TERM_OR_INDEX == 1 << 62);

/// Checks the enum fields raft-rs reads with panicking accessors (`get_msg_type`,
/// `get_entry_type`, and the conf change types when an entry is applied): protobuf
/// decoding accepts any number there. Also refuses terms and indexes beyond
/// [`MAX_TERM_OR_INDEX`] and two shapes raft-rs is fatal on.
pub(crate) fn check_message(m: &Message) -> Result<(), String> {
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
    // A read-index request carries its context as its one entry; a leader indexes it.
    if ty == MessageType::MsgReadIndex && m.entries.len() != 1 {
        return Err(format!("read index request with {} entries instead of 1", m.entries.len()));
    }
    // A follower forwards proposals and read-index requests to the leader as raft-rs
    // made them, without a term; raft-rs is fatal on forwarding one that has a term.
    let forwarded = matches!(ty, MessageType::MsgPropose | MessageType::MsgReadIndex);
    if forwarded && m.term != 0 {
        return Err(format!("{ty:?} with term {} (forwarded requests carry none)", m.term));
    }
    // Everything else carries its sender's term (a vote the term campaigned for).
    // raft-rs steps a term-0 message as one of its own, with no term check at all, and
    // answers a term-0 pre-vote with a term-0 message it is fatal on sending.
    if !forwarded && m.term == 0 {
        return Err(format!("{ty:?} without a term"));
    }
    if ty == MessageType::MsgAppend {
        // A leader's entries are of its term or older ones, in order, none older than
        // the entry they follow.
        let mut prev_term = m.log_term;
        for (i, e) in m.entries.iter().enumerate() {
            if m.index.checked_add(i as u64 + 1) != Some(e.index) {
                return Err(format!("append at index {}: entry {i} has index {}", m.index, e.index));
            }
            if e.term < prev_term || e.term > m.term {
                return Err(format!("append of term {}: entry {} has term {} after term {prev_term}", m.term, e.index, e.term));
            }
            prev_term = e.term;
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
        let cluster_id = std::sync::atomic::AtomicU64::new(0);
        Transport { inner: Arc::new(Inner { id, self_url, cluster_id, peers: RwLock::new(HashMap::new()), raft, client, rt }) }
    }

    /// Runs `fut` on the node's runtime (for the raft loop, which has none of its own).
    pub fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.inner.rt.spawn(fut);
    }

    /// Sets the cluster id sent to peers (the raft loop's, once its state machine has it).
    pub fn set_cluster_id(&self, id: u64) {
        self.inner.cluster_id.store(id, std::sync::atomic::Ordering::Relaxed);
    }

    /// This member's cluster id as last set (0: not known yet).
    pub fn cluster_id(&self) -> u64 {
        self.inner.cluster_id.load(std::sync::atomic::Ordering::Relaxed)
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

    /// Tells member `to` that the proposals with these request ids, which it forwarded,
    /// were dropped without being appended, so it can propose them again instead of
    /// waiting out its request timeout. Best effort, in the background: a lost notice
    /// leaves the proposer to its timeout, as before.
    pub fn notify_dropped(&self, to: u64, ids: Vec<u64>) {
        let Some(url) = self.peer_url(to) else { return };
        let inner = self.inner.clone();
        self.inner.rt.spawn(async move {
            let mut body = BytesMut::with_capacity(ids.len().min(MAX_DROPPED_IDS) * 8);
            for id in ids.iter().take(MAX_DROPPED_IDS) {
                body.put_u64(*id);
            }
            let req = match peer_request(&inner, &url, Method::POST, DROPPED_PATH).body(Full::new(body.freeze())) {
                Ok(r) => r,
                Err(e) => return debug!(peer = to, error = %e, "bad peer URL; dropped-proposal notice not sent"),
            };
            match tokio::time::timeout(Duration::from_secs(2), inner.client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {}
                Ok(Ok(resp)) => debug!(peer = to, status = %resp.status(), "dropped-proposal notice refused"),
                Ok(Err(e)) => debug!(peer = to, error = %e, "dropped-proposal notice not delivered"),
                Err(_) => debug!(peer = to, "dropped-proposal notice timed out"),
            }
        });
    }

    /// Forwards a client's lease keepalive to member `leader` ([`RENEW_PATH`]) and
    /// returns its answer, within `timeout`.
    pub async fn renew_lease(&self, leader: u64, lease: u64, timeout: Duration) -> Result<PeerRenewal, String> {
        let url = self.peer_url(leader).ok_or_else(|| format!("no address known for the leader (member {leader})"))?;
        let body = Full::new(Bytes::copy_from_slice(&lease.to_be_bytes()));
        let req = peer_request(&self.inner, &url, Method::POST, RENEW_PATH).body(body).map_err(|e| format!("bad peer URL {url}: {e}"))?;
        let answer = async {
            let resp = self.inner.client.request(req).await.map_err(|e| format!("the leader (member {leader}) did not answer: {e}"))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 4096).collect().await.map_err(|e| format!("the leader's answer was cut: {e}"))?.to_bytes();
            match status {
                StatusCode::OK => serde_json::from_slice(&body)
                    .ok()
                    .as_ref()
                    .and_then(renewal_from_json)
                    .map(PeerRenewal::Answer)
                    .ok_or_else(|| format!("the leader's answer is not a renewal: {}", String::from_utf8_lossy(&body))),
                StatusCode::NOT_FOUND => Ok(PeerRenewal::Unsupported),
                other => Err(format!("the leader answered {other}: {}", String::from_utf8_lossy(&body).trim())),
            }
        };
        tokio::time::timeout(timeout, answer).await.map_err(|_| format!("the leader (member {leader}) did not answer in time"))?
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

/// What a peer task keeps between batches.
#[derive(Clone)]
struct PeerLink {
    inner: Arc<Inner>,
    id: u64,
    url: String,
    label: String,
    last_tls_warning: Option<Instant>,
    last_cluster_warning: Option<Instant>,
}

/// How opening a stream failed.
enum OpenError {
    /// The peer does not serve streams (an older version): use POSTs.
    Unsupported,
    /// The peer refused or could not be reached; already logged.
    Failed,
}

/// True for a message that goes as a `POST /raft` of its own, never on a stream.
fn posted_alone(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot || m.encoded_len() + 4 > MAX_STREAM_FRAME
}

/// Moves every message already queued into `batch` (up to [`MAX_BATCH`]).
fn drain_into(rx: &mut mpsc::Receiver<Message>, batch: &mut Vec<Message>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
}

async fn run_peer(inner: Arc<Inner>, id: u64, url: String, mut rx: mpsc::Receiver<Message>) {
    let mut link = PeerLink { label: id.to_string(), inner, id, url, last_tls_warning: None, last_cluster_warning: None };
    let mut backoff = Duration::from_millis(50);
    let mut posts_until: Option<Instant> = None;
    while let Some(m) = rx.recv().await {
        let mut batch = vec![m];
        drain_into(&mut rx, &mut batch);
        let ok = if posts_until.is_some_and(|t| Instant::now() < t) {
            link.post(batch).await
        } else {
            match link.open_stream().await {
                Ok(io) => {
                    posts_until = None;
                    backoff = Duration::from_millis(50);
                    // Runs until the stream breaks; whatever was on it is lost (raft resends).
                    link.stream(io, &mut rx, batch).await;
                    false
                }
                Err(OpenError::Unsupported) => {
                    debug!(peer = id, "peer does not serve streams; sending POSTs");
                    posts_until = Some(Instant::now() + STREAM_RETRY);
                    link.post(batch).await
                }
                Err(OpenError::Failed) => {
                    for m in batch.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot) {
                        let _ = link.inner.raft.send(Request::SnapshotSent(m.to, false));
                    }
                    false
                }
            }
        };
        if ok {
            backoff = Duration::from_millis(50);
            continue;
        }
        let _ = link.inner.raft.send(Request::Unreachable(id));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
        // Whatever queued up meanwhile is stale; raft will resend what matters. A
        // dropped snapshot must be reported, or raft waits for it forever (the
        // peer's progress stays in the snapshot state, sent nothing but heartbeats).
        while let Ok(m) = rx.try_recv() {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let _ = link.inner.raft.send(Request::SnapshotSent(id, false));
            }
        }
    }
}

/// Acknowledgements of one stream, shared by its writer and its back-channel reader.
#[derive(Default)]
struct Acks {
    /// Messages the peer has handed to raft.
    acked: u64,
    /// When `acked` last grew.
    last: Option<Instant>,
    /// (messages sent in total after a write, when it was written), oldest first: for
    /// the round-trip metric.
    writes: std::collections::VecDeque<(u64, Instant)>,
}

/// A request to the peer at `url` with this member's id, URL and cluster id.
fn peer_request(inner: &Inner, url: &str, method: Method, path: &str) -> hyper::http::request::Builder {
    let b = HttpRequest::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header(FROM_HEADER, inner.id.to_string())
        .header(URL_HEADER, &inner.self_url);
    match inner.cluster_id.load(std::sync::atomic::Ordering::Relaxed) {
        0 => b,
        id => b.header(CLUSTER_HEADER, format!("{id:016x}")),
    }
}

impl PeerLink {
    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        peer_request(&self.inner, &self.url, method, path)
    }

    /// Logs a peer's 412: it belongs to another cluster (at most every 30 s per peer).
    fn other_cluster<B>(&mut self, resp: &Response<B>) {
        if self.last_cluster_warning.is_some_and(|t| t.elapsed() < TLS_WARN_EVERY) {
            return;
        }
        let theirs = resp.headers().get(CLUSTER_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("?");
        let ours = self.inner.cluster_id.load(std::sync::atomic::Ordering::Relaxed);
        warn!(
            peer = self.id,
            url = %self.url,
            peer_cluster = theirs,
            cluster = %format!("{ours:016x}"),
            "the peer at this URL belongs to another cluster; nothing is sent to it (check --cluster, --initial-cluster-token and the data dirs)"
        );
        self.last_cluster_warning = Some(Instant::now());
    }

    /// Logs a failed request: a refused certificate as a warning (configuration, not a
    /// network blip; at most every 30 s per peer), anything else at debug level.
    fn log_failure(&mut self, e: &hyper_util::client::legacy::Error) {
        match tls_error_in(e) {
            Some(tls) if self.last_tls_warning.is_none_or(|t| t.elapsed() >= TLS_WARN_EVERY) => {
                warn!(peer = self.id, url = %self.url, error = %tls, "peer TLS handshake failed (check the peer certificates, CA and SANs)");
                self.last_tls_warning = Some(Instant::now());
            }
            _ => debug!(peer = self.id, error = %e, "peer unreachable"),
        }
    }

    /// Asks the peer for a stream. A 410 is reported to raft like a POST's.
    async fn open_stream(&mut self) -> Result<hyper::upgrade::Upgraded, OpenError> {
        let req = self
            .request(Method::GET, STREAM_PATH)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, STREAM_PROTOCOL)
            .body(Full::new(Bytes::new()));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = self.id, url = %self.url, error = %e, "bad peer URL");
                return Err(OpenError::Failed);
            }
        };
        let resp = match tokio::time::timeout(Duration::from_secs(5), self.inner.client.request(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                self.log_failure(&e);
                return Err(OpenError::Failed);
            }
            Err(_) => {
                debug!(peer = self.id, "peer timed out");
                return Err(OpenError::Failed);
            }
        };
        match resp.status() {
            StatusCode::SWITCHING_PROTOCOLS => match tokio::time::timeout(Duration::from_secs(5), hyper::upgrade::on(resp)).await {
                Ok(Ok(io)) => Ok(io),
                Ok(Err(e)) => {
                    debug!(peer = self.id, error = %e, "peer stream upgrade failed");
                    Err(OpenError::Failed)
                }
                Err(_) => Err(OpenError::Failed),
            },
            StatusCode::NOT_FOUND => Err(OpenError::Unsupported),
            StatusCode::GONE => {
                self.gone(&resp);
                Err(OpenError::Failed)
            }
            StatusCode::PRECONDITION_FAILED => {
                self.other_cluster(&resp);
                Err(OpenError::Failed)
            }
            status => {
                debug!(peer = self.id, %status, "peer refused a stream");
                Err(OpenError::Failed)
            }
        }
    }

    fn gone<B>(&self, resp: &Response<B>) {
        let peer_applied = resp.headers().get(APPLIED_HEADER).and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok());
        debug!(peer = self.id, ?peer_applied, "peer says this member was removed from the cluster");
        let _ = self.inner.raft.send(Request::Removed { peer_applied });
    }

    /// Sends `batch` on the stream `io`, then everything the queue brings, until the
    /// stream breaks, stalls or the peer says this member is gone. Snapshots go as POSTs
    /// of their own, in tasks of their own.
    async fn stream(&mut self, io: hyper::upgrade::Upgraded, rx: &mut mpsc::Receiver<Message>, mut batch: Vec<Message>) {
        let (rd, mut wr) = tokio::io::split(TokioIo::new(io));
        let acks = Arc::new(std::sync::Mutex::new(Acks::default()));
        let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(read_control(rd, self.inner.clone(), self.id, self.label.clone(), acks.clone(), closed_tx));
        let mut sent = 0u64;
        let mut waiting_since = Instant::now();
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            let mut n = 0u64;
            for m in batch.drain(..) {
                if posted_alone(&m) {
                    let mut alone = self.clone();
                    tokio::spawn(async move {
                        alone.post(vec![m]).await;
                    });
                    continue;
                }
                encode_frame(&m, &mut buf);
                n += 1;
            }
            if n > 0 {
                let now = Instant::now();
                if let Ok(mut a) = acks.lock() {
                    if a.acked >= sent {
                        // Nothing was outstanding: the stall clock starts now.
                        waiting_since = now;
                    }
                    sent += n;
                    a.writes.push_back((sent, now));
                }
                let len = buf.len() as u64;
                let wrote = tokio::time::timeout(STREAM_STALL, async {
                    wr.write_all(&buf).await?;
                    wr.flush().await
                })
                .await;
                buf.clear();
                if buf.capacity() > 8 << 20 {
                    buf = BytesMut::with_capacity(64 << 10);
                }
                match wrote {
                    Ok(Ok(())) => metrics().peer_sent_bytes.with_label_values(&[&self.label]).inc_by(len),
                    Ok(Err(e)) => {
                        debug!(peer = self.id, error = %e, "peer stream broke");
                        break;
                    }
                    Err(_) => {
                        debug!(peer = self.id, "peer stream write stalled");
                        break;
                    }
                }
            }
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        batch.push(m);
                        drain_into(rx, &mut batch);
                    }
                    None => break,
                },
                _ = &mut closed => break,
                _ = check.tick() => {
                    let stalled = acks.lock().map(|a| {
                        let since = a.last.map_or(waiting_since, |l| l.max(waiting_since));
                        a.acked < sent && since.elapsed() >= STREAM_STALL
                    });
                    if stalled.unwrap_or(true) {
                        debug!(peer = self.id, "peer stream unacknowledged; reopening it");
                        break;
                    }
                }
            }
        }
        reader.abort();
    }

    /// Sends `batch` as one `POST /raft`. True when the peer took it.
    async fn post(&mut self, batch: Vec<Message>) -> bool {
        let snapshot = batch.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let body = encode_frames(&batch);
        drop(batch);
        let len = body.len() as u64;
        let req = self.request(Method::POST, "/raft").header("content-type", "application/x-raftkv-frames").body(Full::new(body));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = self.id, url = %self.url, error = %e, "bad peer URL; dropping messages");
                if snapshot {
                    let _ = self.inner.raft.send(Request::SnapshotSent(self.id, false));
                }
                return false;
            }
        };
        let limit = if snapshot { Duration::from_secs(120) } else { Duration::from_secs(5) };
        let started = Instant::now();
        let outcome = tokio::time::timeout(limit, self.inner.client.request(req)).await;
        let ok = match outcome {
            Ok(Ok(resp)) if resp.status().is_success() => {
                metrics().peer_round_trip_seconds.with_label_values(&[&self.label]).observe(started.elapsed().as_secs_f64());
                metrics().peer_sent_bytes.with_label_values(&[&self.label]).inc_by(len);
                let _ = resp.into_body().collect().await;
                true
            }
            Ok(Ok(resp)) if resp.status() == StatusCode::GONE => {
                self.gone(&resp);
                false
            }
            Ok(Ok(resp)) if resp.status() == StatusCode::PRECONDITION_FAILED => {
                self.other_cluster(&resp);
                false
            }
            Ok(Ok(resp)) => {
                debug!(peer = self.id, status = %resp.status(), "peer refused messages");
                false
            }
            Ok(Err(e)) => {
                self.log_failure(&e);
                false
            }
            Err(_) => {
                debug!(peer = self.id, "peer timed out");
                false
            }
        };
        if snapshot {
            let _ = self.inner.raft.send(Request::SnapshotSent(self.id, ok));
        }
        ok
    }
}

/// Reads a stream's control frames (acks, "gone") until it ends; then tells the writer.
async fn read_control<R: AsyncRead + Unpin>(
    mut rd: R,
    inner: Arc<Inner>,
    id: u64,
    label: String,
    acks: Arc<std::sync::Mutex<Acks>>,
    closed: tokio::sync::oneshot::Sender<()>,
) {
    let mut frame = [0u8; CONTROL_LEN];
    while rd.read_exact(&mut frame).await.is_ok() {
        let mut v = [0u8; 8];
        v.copy_from_slice(&frame[1..]);
        let v = u64::from_le_bytes(v);
        match frame[0] {
            CONTROL_ACK | CONTROL_ACK_LATE => {
                let now = Instant::now();
                let Ok(mut a) = acks.lock() else { break };
                a.acked = v;
                a.last = Some(now);
                let mut newest = None;
                while a.writes.front().is_some_and(|(n, _)| *n <= v) {
                    newest = a.writes.pop_front();
                }
                if let Some((n, at)) = newest.filter(|_| frame[0] == CONTROL_ACK) {
                    // An ack of exactly one write's batch, sent as soon as it was taken.
                    if n == v {
                        metrics().peer_round_trip_seconds.with_label_values(&[&label]).observe(now.duration_since(at).as_secs_f64());
                    }
                }
            }
            CONTROL_GONE => {
                debug!(peer = id, peer_applied = v, "peer says this member was removed from the cluster");
                let _ = inner.raft.send(Request::Removed { peer_applied: Some(v) });
                break;
            }
            other => {
                debug!(peer = id, tag = other, "unknown control frame on a peer stream");
                break;
            }
        }
    }
    let _ = closed.send(());
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

/// Why messages from a peer are refused.
enum Refusal {
    /// Not messages this member may take (400; a stream is closed).
    Bad(String),
    /// The sender was removed from the cluster (410); this member's applied index.
    Gone(u64),
}

/// What the peer listener's handlers share. Cheap to clone.
#[derive(Clone)]
pub struct PeerListener {
    /// This member's id.
    pub my_id: u64,
    /// The raft loop, which gets the messages.
    pub raft: Sender<Request>,
    /// This member's transport (learns senders' URLs).
    pub transport: Transport,
    /// The state machine (who was removed, what is applied).
    pub kv: Arc<RwLock<KvStore>>,
    /// The raft loop's published status.
    pub status: crate::raft_loop::StatusCell,
    /// Fires when the peer listener stops; ends the streams it serves.
    pub stop: Shutdown,
}

/// A request header as text.
/// Reads a peer's request body of at most `limit` bytes. A sender that sends nothing for
/// `idle` is cut off: a peer trickling a body (or one that hung) must not hold a task and
/// its buffer for ever, while a large snapshot on a slow link may take as long as it
/// keeps coming.
async fn collect_peer_body<B>(body: B, limit: usize, idle: Duration) -> Result<Bytes, String>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(format!("no bytes for {} s in the middle of the body", idle.as_secs())),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        return Err(format!("body over {limit} bytes"));
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

fn header(req: &HttpRequest<Incoming>, name: impl hyper::header::AsHeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Checks decoded messages from `sender` before they reach raft.
fn admit(msgs: &[Message], sender: u64, my_id: u64, kv: &RwLock<KvStore>, term: impl Fn() -> u64) -> Result<(), Refusal> {
    for m in msgs {
        if m.to != my_id {
            return Err(Refusal::Bad(format!("message for member {} sent to member {my_id}", m.to)));
        }
        // No member is 0, and no member sends to itself over the network (a forwarded
        // MsgTransferLeader names the transferee in `from`, which may be this member).
        if m.from == 0 || (m.from == my_id && m.get_msg_type() != MessageType::MsgTransferLeader) {
            return Err(Refusal::Bad(format!("{:?} claims to come from member {}", m.get_msg_type(), m.from)));
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
                && m.term >= term())
    };
    if removed && !msgs.iter().any(newer) {
        return Err(Refusal::Gone(applied));
    }
    Ok(())
}

impl PeerListener {
    fn current_status(&self) -> Arc<crate::raft_loop::NodeStatus> {
        match self.status.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn admit(&self, msgs: &[Message], sender: u64) -> Result<(), Refusal> {
        admit(msgs, sender, self.my_id, &self.kv, || self.current_status().term)
    }

    /// The refusal of a request from another cluster: 412 when the sender names a
    /// cluster other than this member's (both known), 400 when its cluster header is not
    /// an id. `None`: go on.
    fn refuse_other_cluster(&self, req: &HttpRequest<Incoming>) -> Option<Response<Full<Bytes>>> {
        // Present but not text is malformed (400), not absent.
        let theirs = req.headers().get(CLUSTER_HEADER)?.to_str().unwrap_or("");
        let parsed = (theirs.len() == 16 && theirs.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u64::from_str_radix(theirs, 16).ok());
        let Some(Some(theirs)) = parsed else {
            return Some(text(StatusCode::BAD_REQUEST, format!("`{CLUSTER_HEADER}` must be 16 hex digits\n")));
        };
        let mine = self.transport.cluster_id();
        if mine == 0 || theirs == 0 || mine == theirs {
            return None;
        }
        let from = header(req, FROM_HEADER).unwrap_or("?");
        let url = header(req, URL_HEADER).unwrap_or("?");
        warn!(
            from,
            url,
            sender_cluster = %format!("{theirs:016x}"),
            cluster = %format!("{mine:016x}"),
            "refused raft traffic from a member of another cluster"
        );
        metrics().peer_refused_messages.with_label_values(&["cluster_id_mismatch"]).inc();
        let mut r = text(
            StatusCode::PRECONDITION_FAILED,
            format!("this member belongs to cluster {mine:016x}, the sender to cluster {theirs:016x}\n"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("{mine:016x}")) {
            r.headers_mut().insert(CLUSTER_HEADER, v);
        }
        Some(r)
    }

    /// Learns the peer URL of a sender this member has no address for: a joining node
    /// (not yet in any configuration) answering a leader it never heard of, or a member
    /// of the configuration this member applied. Not any id a caller names: each learned
    /// one holds a sender task and its queue for good. (A lagging member that has not
    /// applied the sender's addition learns its URL when it applies it.)
    fn learn_sender(&self, sender: u64, url: Option<&str>) {
        let Some(url) = url else { return };
        if sender == 0 || self.transport.peer_url(sender).is_some() || crate::config::parse_peer_url(url).is_err() {
            return;
        }
        let st = self.current_status();
        let joining = st.voters.is_empty() && st.learners.is_empty();
        if joining || st.voters.contains(&sender) || st.learners.contains(&sender) {
            self.transport.set_peer(sender, url);
        }
    }

    /// The `from` label of a sender's metrics: its id when it is a member this member
    /// knows, else `other` (so callers cannot grow the label set).
    fn sender_label(&self, sender: u64) -> String {
        let st = self.current_status();
        if st.member_urls.iter().any(|(id, _)| *id == sender) || st.voters.contains(&sender) || st.learners.contains(&sender) {
            sender.to_string()
        } else {
            "other".to_string()
        }
    }

    /// Handles one request on the peer listener.
    pub async fn handle(self, req: HttpRequest<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/raft") => {}
            (&Method::GET, STREAM_PATH) => return self.open_stream(req),
            (&Method::POST, DROPPED_PATH) => return self.dropped(req).await,
            (&Method::POST, RENEW_PATH) => return self.renew(req).await,
            (&Method::GET, "/members") => {
                let mut r = text(StatusCode::OK, crate::api::members_json(&self.current_status()).to_string());
                r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
                return r;
            }
            (_, "/raft") => return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
            (_, STREAM_PATH) => return text(StatusCode::METHOD_NOT_ALLOWED, "use GET with Upgrade\n"),
            (_, DROPPED_PATH) | (_, RENEW_PATH) => return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
            _ => return text(StatusCode::NOT_FOUND, "not a raftkv peer route\n"),
        }
        if let Some(refused) = self.refuse_other_cluster(&req) {
            return refused;
        }
        let from_hdr: Option<u64> = match req.headers().get(FROM_HEADER) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(|s| s.parse().ok()) {
                Some(id) => Some(id),
                None => return text(StatusCode::BAD_REQUEST, format!("`{FROM_HEADER}` must be a member id\n")),
            },
        };
        let from_url = header(&req, URL_HEADER).map(str::to_string);
        let body = match collect_peer_body(req.into_body(), MAX_PEER_BODY, PEER_BODY_IDLE).await {
            Ok(b) => b,
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
        match self.admit(&msgs, sender) {
            Ok(()) => {}
            Err(Refusal::Bad(why)) => return text(StatusCode::BAD_REQUEST, format!("{why}\n")),
            Err(Refusal::Gone(applied)) => {
                let mut r = text(StatusCode::GONE, format!("member {sender} was removed from this cluster\n"));
                r.headers_mut().insert(APPLIED_HEADER, HeaderValue::from(applied));
                return r;
            }
        }
        self.learn_sender(sender, from_url.as_deref());
        metrics().peer_received_bytes.with_label_values(&[&self.sender_label(sender)]).inc_by(body.len() as u64);
        for m in msgs {
            if self.raft.send(Request::Raft(Box::new(m))).is_err() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "node is stopping\n");
            }
        }
        text(StatusCode::NO_CONTENT, Bytes::new())
    }

    /// Answers `POST /raft/dropped`: a member dropped proposals this member forwarded to
    /// it. The raft loop honours it only for proposals it forwarded to that member.
    async fn dropped(self, req: HttpRequest<Incoming>) -> Response<Full<Bytes>> {
        let from = match self.sender(&req, "a dropped-proposal notice") {
            Ok(id) => id,
            Err(refused) => return *refused,
        };
        if let Some(refused) = self.refuse_other_cluster(&req) {
            return refused;
        }
        let body = match Limited::new(req.into_body(), MAX_DROPPED_IDS * 8).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("unreadable body: {e}\n")),
        };
        if body.len() % 8 != 0 {
            return text(StatusCode::BAD_REQUEST, "the body must be request ids of 8 bytes each\n");
        }
        let ids: Vec<u64> = body.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        if self.raft.send(Request::ProposalsDropped { from, ids }).is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "node is stopping\n");
        }
        text(StatusCode::NO_CONTENT, Bytes::new())
    }

    /// The sender's member id from [`FROM_HEADER`] (not 0, not this member), or the 400
    /// that `what` (a kind of request) gets without one.
    fn sender(&self, req: &HttpRequest<Incoming>, what: &str) -> Result<u64, Box<Response<Full<Bytes>>>> {
        match header(req, FROM_HEADER).and_then(|s| s.parse::<u64>().ok()) {
            Some(id) if id != 0 && id != self.my_id => Ok(id),
            _ => Err(Box::new(text(StatusCode::BAD_REQUEST, format!("{what} needs `{FROM_HEADER}`: the sender's member id\n")))),
        }
    }

    /// Answers [`RENEW_PATH`]: a lease keepalive a member forwarded, renewed here if
    /// this member leads (see `Request::RenewLease`).
    async fn renew(self, req: HttpRequest<Incoming>) -> Response<Full<Bytes>> {
        if let Err(refused) = self.sender(&req, "a lease renewal") {
            return *refused;
        }
        if let Some(refused) = self.refuse_other_cluster(&req) {
            return refused;
        }
        let body = match Limited::new(req.into_body(), 8).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("unreadable body: {e}\n")),
        };
        let Ok(id) = <[u8; 8]>::try_from(body.as_ref()).map(u64::from_be_bytes) else {
            return text(StatusCode::BAD_REQUEST, "the body must be a lease id of 8 bytes\n");
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.raft.send(Request::RenewLease { lease: id, reply: tx }).is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "node is stopping\n");
        }
        match tokio::time::timeout(RENEW_WAIT, rx).await {
            Ok(Ok(r)) => {
                let mut resp = text(StatusCode::OK, renewal_json(r).to_string());
                resp.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
                resp
            }
            Ok(Err(_)) => text(StatusCode::SERVICE_UNAVAILABLE, "node is stopping\n"),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "no quorum confirmed this leader in time\n"),
        }
    }

    /// Answers `GET /raft/stream`: 101 and a task reading the stream, or why not.
    fn open_stream(self, mut req: HttpRequest<Incoming>) -> Response<Full<Bytes>> {
        if !header(&req, UPGRADE).is_some_and(|v| v.eq_ignore_ascii_case(STREAM_PROTOCOL)) {
            return text(StatusCode::BAD_REQUEST, format!("a peer stream needs `Upgrade: {STREAM_PROTOCOL}`\n"));
        }
        let sender = match self.sender(&req, "a peer stream") {
            Ok(id) => id,
            Err(refused) => return *refused,
        };
        if let Some(refused) = self.refuse_other_cluster(&req) {
            return refused;
        }
        self.learn_sender(sender, header(&req, URL_HEADER));
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(io) => self.read_stream(TokioIo::new(io), sender).await,
                Err(e) => debug!(from = sender, error = %e, "peer stream upgrade failed"),
            }
        });
        let mut r = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("upgrade"));
        r.headers_mut().insert(UPGRADE, HeaderValue::from_static(STREAM_PROTOCOL));
        r
    }

    /// Reads frames from a peer stream as they arrive and hands them to raft, acking each
    /// batch, until the peer closes it, it carries garbage, the sender turns out removed
    /// (a "gone" frame is sent first) or this node stops.
    async fn read_stream<S: AsyncRead + AsyncWrite + Unpin>(self, io: S, sender: u64) {
        let (mut rd, mut wr) = tokio::io::split(io);
        let label = self.sender_label(sender);
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut handed = 0u64;
        let mut acked = 0u64;
        let mut last_ack: Option<Instant> = None;
        loop {
            let late_ack = async {
                match last_ack {
                    Some(at) if acked < handed => tokio::time::sleep_until((at + 2 * ACK_EVERY).into()).await,
                    _ => std::future::pending().await,
                }
            };
            // Room for a large frame to arrive in big reads, not a few bytes at a time.
            if buf.capacity() - buf.len() < 16 << 10 {
                buf.reserve(64 << 10);
            }
            let read = tokio::select! {
                r = rd.read_buf(&mut buf) => r,
                _ = late_ack => {
                    if write_control(&mut wr, CONTROL_ACK_LATE, handed).await.is_err() {
                        return;
                    }
                    acked = handed;
                    last_ack = Some(Instant::now());
                    continue;
                }
                _ = self.stop.wait() => return,
            };
            match read {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    debug!(from = sender, error = %e, "peer stream ended");
                    return;
                }
            }
            let complete = match complete_frames(&buf, MAX_STREAM_FRAME) {
                Ok(n) => n,
                Err(len) => {
                    warn!(from = sender, len, "peer stream frame too large; closing the stream");
                    return;
                }
            };
            if complete == 0 {
                continue;
            }
            let chunk = buf.split_to(complete);
            let msgs = match decode_frames(&chunk) {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, from = sender, "garbage on a peer stream; closing it");
                    return;
                }
            };
            match self.admit(&msgs, sender) {
                Ok(()) => {}
                Err(Refusal::Bad(why)) => {
                    warn!(from = sender, why, "refused messages on a peer stream; closing it");
                    return;
                }
                Err(Refusal::Gone(applied)) => {
                    let _ = write_control(&mut wr, CONTROL_GONE, applied).await;
                    return;
                }
            }
            metrics().peer_received_bytes.with_label_values(&[&label]).inc_by(chunk.len() as u64);
            handed += msgs.len() as u64;
            for m in msgs {
                if self.raft.send(Request::Raft(Box::new(m))).is_err() {
                    return;
                }
            }
            if last_ack.is_none_or(|at| at.elapsed() >= ACK_EVERY) {
                if write_control(&mut wr, CONTROL_ACK, handed).await.is_err() {
                    return;
                }
                acked = handed;
                last_ack = Some(Instant::now());
            }
        }
    }
}

async fn write_control<W: AsyncWrite + Unpin>(wr: &mut W, tag: u8, value: u64) -> std::io::Result<()> {
    let mut frame = [0u8; CONTROL_LEN];
    frame[0] = tag;
    frame[1..].copy_from_slice(&value.to_le_bytes());
    wr.write_all(&frame).await?;
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{ConfChangeSingle, Entry, Snapshot};

    #[tokio::test]
    async fn a_peer_body_is_read_whole_unless_it_stalls_or_grows_too_large() {
        use crate::http::ChannelBody;
        let idle = Duration::from_millis(200);
        let (tx, body) = ChannelBody::unsized_stream(4);
        tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
        tx.send(Ok(Bytes::from_static(b"def"))).await.unwrap();
        drop(tx);
        assert_eq!(collect_peer_body(body, 6, idle).await.unwrap(), Bytes::from_static(b"abcdef"));

        let (tx, body) = ChannelBody::unsized_stream(4);
        tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
        let e = collect_peer_body(body, 6, idle).await.unwrap_err();
        assert!(e.contains("no bytes"), "a sender that stops sending (kept open) is cut off: {e}");
        drop(tx);

        let (tx, body) = ChannelBody::unsized_stream(4);
        tx.send(Ok(Bytes::from_static(b"abcd"))).await.unwrap();
        tx.send(Ok(Bytes::from_static(b"efg"))).await.unwrap();
        let e = collect_peer_body(body, 6, idle).await.unwrap_err();
        assert!(e.contains("over 6 bytes"), "{e}");
    }

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

    fn heartbeat(to: u64, from: u64, commit: u64) -> Message {
        Message { msg_type: MessageType::MsgHeartbeat as i32, to, from, term: 1, commit, ..Default::default() }
    }

    fn read_control_frame(buf: &[u8]) -> (u8, u64) {
        let mut v = [0u8; 8];
        v.copy_from_slice(&buf[1..CONTROL_LEN]);
        (buf[0], u64::from_le_bytes(v))
    }

    /// A joining member learns any sender's URL (it knows no configuration yet); a member
    /// learns only members of its configuration, and labels other senders `other`.
    #[tokio::test]
    async fn only_a_joiner_or_a_configured_member_is_learned_as_a_sender() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let status: crate::raft_loop::StatusCell = Default::default();
        let listener = PeerListener {
            my_id: 1,
            raft: tx.clone(),
            transport: Transport::new(1, "http://127.0.0.1:1".into(), None, tx.clone(), tokio::runtime::Handle::current()),
            kv: Arc::new(RwLock::new(KvStore::new())),
            status: status.clone(),
            stop: Shutdown::new(),
        };
        // Joining: no configuration yet.
        listener.learn_sender(7, Some("http://127.0.0.1:7"));
        assert_eq!(listener.transport.peer_url(7).as_deref(), Some("http://127.0.0.1:7"));
        // A member of {1, 2, 3} (learner 4): a stranger's id is neither learned nor labelled.
        let st = crate::raft_loop::NodeStatus { voters: vec![1, 2, 3], learners: vec![4], ..Default::default() };
        *status.write().unwrap() = Arc::new(st);
        for id in 100..110 {
            listener.learn_sender(id, Some(&format!("http://127.0.0.1:{id}")));
            assert_eq!(listener.transport.peer_url(id), None, "stranger {id} learned");
            assert_eq!(listener.sender_label(id), "other");
        }
        listener.learn_sender(4, Some("http://127.0.0.1:4"));
        assert_eq!(listener.transport.peer_url(4).as_deref(), Some("http://127.0.0.1:4"));
        assert_eq!((listener.sender_label(2), listener.sender_label(4)), ("2".to_string(), "4".to_string()));
    }

    /// The receiving side of a stream: messages reach raft in order with acks counting
    /// them; a sender that was removed gets a "gone" frame; garbage closes the stream.
    #[tokio::test]
    async fn a_stream_hands_messages_to_raft_in_order_acks_them_and_closes_on_garbage() {
        let (tx, rx) = std::sync::mpsc::channel();
        let kv = Arc::new(RwLock::new(KvStore::new()));
        let listener = PeerListener {
            my_id: 1,
            raft: tx.clone(),
            transport: Transport::new(1, "http://127.0.0.1:1".into(), None, tx.clone(), tokio::runtime::Handle::current()),
            kv: kv.clone(),
            status: Default::default(),
            stop: Shutdown::new(),
        };
        let (mut peer, node) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(listener.clone().read_stream(node, 2));
        // 300 messages, written in pieces that split frames anywhere.
        let msgs: Vec<Message> = (1..=300).map(|i| heartbeat(1, 2, i)).collect();
        let bytes = encode_frames(&msgs);
        for piece in bytes.chunks(777) {
            peer.write_all(piece).await.unwrap();
        }
        let mut acked = 0;
        let mut frame = [0u8; CONTROL_LEN];
        while acked < 300 {
            tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut frame)).await.expect("an ack").unwrap();
            let (tag, n) = read_control_frame(&frame);
            assert!(tag == CONTROL_ACK || tag == CONTROL_ACK_LATE, "tag {tag}");
            assert!(n > acked, "acks grow: {n} after {acked}");
            acked = n;
        }
        assert_eq!(acked, 300);
        let got: Vec<u64> = rx
            .try_iter()
            .map(|r| match r {
                Request::Raft(m) => m.commit,
                _ => panic!("only raft messages expected"),
            })
            .collect();
        assert_eq!(got, (1..=300).collect::<Vec<_>>());
        // A message for another member closes the stream and reaches nobody.
        peer.write_all(&encode_frames(&[heartbeat(3, 2, 1)])).await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), peer.read(&mut frame)).await.unwrap().unwrap(), 0);
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        assert!(rx.try_recv().is_err());

        // Garbage: the same.
        let (mut peer, node) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(listener.clone().read_stream(node, 2));
        peer.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), peer.read(&mut frame)).await.unwrap().unwrap(), 0);
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        // A frame announcing more than a stream frame may hold.
        let (mut peer, node) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(listener.clone().read_stream(node, 2));
        peer.write_all(&(MAX_STREAM_FRAME as u32 + 1).to_le_bytes()).await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), peer.read(&mut frame)).await.unwrap().unwrap(), 0);
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();

        // A removed sender with nothing newer to show: "gone" with the applied index.
        kv.write().unwrap().remove_member(2);
        kv.write().unwrap().set_applied(7);
        let (mut peer, node) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(listener.clone().read_stream(node, 2));
        // (An answer to a heartbeat: not leader traffic, and no commit beyond this member's.)
        let answer = Message { msg_type: MessageType::MsgHeartbeatResponse as i32, ..heartbeat(1, 2, 3) };
        peer.write_all(&encode_frames(&[answer])).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut frame)).await.unwrap().unwrap();
        assert_eq!(read_control_frame(&frame), (CONTROL_GONE, 7));
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        assert!(rx.try_recv().is_err(), "nothing from a removed member reaches raft");
    }

    /// What a fake peer saw: messages, and how many streams were opened to it.
    #[derive(Default)]
    struct Seen {
        msgs: Vec<Message>,
        streams: usize,
        posts: usize,
    }

    /// A fake peer on a fresh port. `streams`: serve streams (acking them unless
    /// `ack_first` is false for the first one); otherwise answer 404 to them, as a
    /// version without streams does. POSTs are always taken.
    async fn fake_peer(streams: bool, ack_first: bool) -> (u16, Arc<std::sync::Mutex<Seen>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let s = seen.clone();
        tokio::spawn(crate::http::serve(listener, Shutdown::new(), move |mut req: HttpRequest<Incoming>| {
            let seen = s.clone();
            async move {
                if req.uri().path() == STREAM_PATH {
                    if !streams {
                        return text(StatusCode::NOT_FOUND, "no streams here\n");
                    }
                    let nth = {
                        let mut g = seen.lock().unwrap();
                        g.streams += 1;
                        g.streams
                    };
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let io = TokioIo::new(on.await.unwrap());
                        let (mut rd, mut wr) = tokio::io::split(io);
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        let mut count = 0u64;
                        while let Ok(n) = rd.read(&mut chunk).await {
                            if n == 0 {
                                break;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                            let at = complete_frames(&buf, MAX_STREAM_FRAME).unwrap();
                            let msgs = decode_frames(&buf[..at]).unwrap();
                            buf.drain(..at);
                            count += msgs.len() as u64;
                            seen.lock().unwrap().msgs.extend(msgs);
                            if (nth > 1 || ack_first) && write_control(&mut wr, CONTROL_ACK, count).await.is_err() {
                                break;
                            }
                        }
                    });
                    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
                    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    r.headers_mut().insert(UPGRADE, HeaderValue::from_static(STREAM_PROTOCOL));
                    return r;
                }
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut g = seen.lock().unwrap();
                g.posts += 1;
                g.msgs.extend(decode_frames(&body).unwrap());
                text(StatusCode::NO_CONTENT, Bytes::new())
            }
        }));
        (port, seen)
    }

    async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_go_on_one_stream_in_order() {
        let (port, seen) = fake_peer(true, true).await;
        let (tx, _rx) = std::sync::mpsc::channel();
        let t = Transport::new(1, "http://127.0.0.1:1".into(), None, tx, tokio::runtime::Handle::current());
        t.set_peer(2, &format!("http://127.0.0.1:{port}"));
        for round in 0..20u64 {
            t.send((1..=100).map(|i| heartbeat(2, 1, round * 100 + i)).collect());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wait_until("2000 messages", || seen.lock().unwrap().msgs.len() >= 2000).await;
        let g = seen.lock().unwrap();
        assert_eq!(g.msgs.iter().map(|m| m.commit).collect::<Vec<_>>(), (1..=2000).collect::<Vec<_>>());
        assert_eq!((g.streams, g.posts), (1, 0), "one stream carries everything");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_without_streams_gets_posts() {
        let (port, seen) = fake_peer(false, true).await;
        let (tx, _rx) = std::sync::mpsc::channel();
        let t = Transport::new(1, "http://127.0.0.1:1".into(), None, tx, tokio::runtime::Handle::current());
        t.set_peer(2, &format!("http://127.0.0.1:{port}"));
        for i in 1..=50 {
            t.send(vec![heartbeat(2, 1, i)]);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wait_until("50 messages", || seen.lock().unwrap().msgs.len() >= 50).await;
        let g = seen.lock().unwrap();
        assert_eq!(g.msgs.iter().map(|m| m.commit).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
        assert!(g.posts >= 1 && g.streams == 0);
    }

    /// A stream whose peer takes the bytes but never acks (a dead peer behind a live
    /// socket) is given up after [`STREAM_STALL`]: raft hears the peer is unreachable
    /// and a new stream is opened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unacknowledged_stream_is_reopened_and_raft_told() {
        let (port, seen) = fake_peer(true, false).await;
        let (tx, rx) = std::sync::mpsc::channel();
        let t = Transport::new(1, "http://127.0.0.1:1".into(), None, tx, tokio::runtime::Handle::current());
        t.set_peer(2, &format!("http://127.0.0.1:{port}"));
        let started = Instant::now();
        let mut i = 0;
        while seen.lock().unwrap().streams < 2 {
            assert!(started.elapsed() < STREAM_STALL * 3, "no second stream after {:?}", started.elapsed());
            i += 1;
            t.send(vec![heartbeat(2, 1, i)]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.elapsed() >= STREAM_STALL, "reopened after {:?}, before the stall limit", started.elapsed());
        assert!(rx.try_iter().any(|r| matches!(r, Request::Unreachable(2))), "raft was told");
        // The second stream is acked and carries the traffic.
        let before = seen.lock().unwrap().msgs.len();
        t.send(vec![heartbeat(2, 1, 1_000_000)]);
        wait_until("a message on the new stream", || seen.lock().unwrap().msgs.len() > before).await;
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
    fn a_renewal_reads_back_as_it_was_sent() {
        for r in [Renewal::Renewed { ttl_ms: 60_000, revision: 7 }, Renewal::NotFound, Renewal::NotLeader { leader: 3 }, Renewal::NotLeader { leader: 0 }] {
            assert_eq!(renewal_from_json(&renewal_json(r)), Some(r));
        }
        for junk in [serde_json::json!({}), serde_json::json!({"renewed": "60"}), serde_json::json!({"renewed": 60}), serde_json::json!([1]), serde_json::json!({"not_leader": -1})] {
            assert_eq!(renewal_from_json(&junk), None, "{junk}");
        }
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
        // raft-rs is fatal on an empty proposal, and on forwarding a proposal or a
        // read-index request with a term; a read-index request carries one context
        // entry. An append must continue its index.
        let forwarded = |ty: MessageType, entries: Vec<Entry>| Message { msg_type: ty as i32, term: 0, entries, ..base.clone() };
        assert!(ok(forwarded(MessageType::MsgPropose, vec![])).unwrap_err().to_string().contains("empty proposal"));
        assert!(ok(forwarded(MessageType::MsgPropose, vec![entry(0, vec![])])).is_ok());
        assert!(ok(forwarded(MessageType::MsgReadIndex, vec![entry(0, b"ctx".to_vec())])).is_ok());
        assert!(ok(forwarded(MessageType::MsgReadIndex, vec![])).unwrap_err().to_string().contains("0 entries instead of 1"));
        for ty in [MessageType::MsgPropose, MessageType::MsgReadIndex] {
            let m = Message { term: 3, ..forwarded(ty, vec![entry(0, vec![])]) };
            assert!(ok(m).unwrap_err().to_string().contains("with term 3"), "{ty:?}");
        }
        // Entries of an append: none newer than the message's term, none older than the
        // entry they follow or the one before.
        let terms = |log_term: u64, ts: &[u64]| Message {
            log_term,
            term: 3,
            entries: ts.iter().enumerate().map(|(i, t)| Entry { index: 5 + i as u64, term: *t, ..Default::default() }).collect(),
            ..append(entry(0, vec![]))
        };
        assert!(ok(terms(1, &[1, 2, 3])).is_ok());
        assert!(ok(terms(2, &[1])).unwrap_err().to_string().contains("entry 5 has term 1 after term 2"));
        assert!(ok(terms(1, &[3, 2])).is_err());
        assert!(ok(terms(1, &[4])).is_err());
        let gap = Message { index: 3, ..append(entry(0, vec![])) };
        assert!(ok(gap).unwrap_err().to_string().contains("append at index 3: entry 0 has index 5"));
        let wrap = Message { index: u64::MAX, ..append(entry(0, vec![])) };
        assert!(ok(wrap).is_err());
        assert!(ok(Message { index: 4, ..append(entry(0, vec![])) }).is_ok());
        let carry_terms = [
            MessageType::MsgRequestPreVote,
            MessageType::MsgRequestVoteResponse,
            MessageType::MsgAppend,
            MessageType::MsgHeartbeat,
            MessageType::MsgTransferLeader,
        ];
        for ty in carry_terms {
            assert!(ok(Message { msg_type: ty as i32, term: 0, ..base.clone() }).unwrap_err().to_string().contains("without a term"));
            assert!(ok(Message { msg_type: ty as i32, ..base.clone() }).is_ok());
        }
        // Terms and indexes beyond 2^62 (raft-rs overflows on u64::MAX terms, and a term
        // just below the WAL's 2^63 - 1 bound would pass it at the next campaign).
        let huge = MAX_TERM_OR_INDEX + 1;
        assert!(ok(Message { term: i64::MAX as u64, ..base.clone() }).is_err(), "no room for a campaign");
        assert!(ok(Message { term: u64::MAX, ..base.clone() }).unwrap_err().to_string().contains("term 18446744073709551615"));
        assert!(ok(Message { commit: huge, ..base.clone() }).is_err());
        assert!(ok(Message { reject_hint: huge, ..base.clone() }).is_err());
        assert!(ok(append(Entry { term: huge, ..entry(0, vec![]) })).is_err());
        let snap = Snapshot { metadata: Some(raft::eraftpb::SnapshotMetadata { index: huge, ..Default::default() }), ..Default::default() };
        assert!(ok(Message { msg_type: MessageType::MsgSnapshot as i32, snapshot: Some(snap), ..base.clone() }).is_err());
        assert!(ok(Message { term: huge - 1, commit: huge - 1, ..base.clone() }).is_ok());
    }
}
