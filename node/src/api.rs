//! The client HTTP API: raftexample's routes, the versioned `/v1` API, probes, metrics.
//!
//! Every write is answered after its entry is committed and applied; every default read
//! goes through ReadIndex (linearizable). Waiting for a leader, a quorum or a commit is
//! bounded by `--request-timeout-ms`; past it the client gets 503 with a reason. See
//! docs/api.md for every route and status code.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request as HttpRequest, StatusCode};
use prost::Message as _;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfState};
use serde_json::{json, Value as Json};
use tokio::sync::oneshot;

use crate::config::Config;
use crate::http::{error, json, response, ChannelBody, ChunkSender, Resp};
use crate::kv::{ApplyOutcome, Command, KvStore, OpType, Txn, TxnCompare, TxnOp, TxnResult};
use crate::metrics::metrics;
use crate::raft_loop::{NodeStatus, ProposeError, RaftHandle, Request, StatusCell};
use crate::watch::{Filter, WatchHub};

/// Everything a request handler needs.
#[derive(Clone)]
pub struct Api {
    /// Node configuration.
    pub cfg: Arc<Config>,
    /// Raft loop handle.
    pub raft: RaftHandle,
    /// Published status.
    pub status: StatusCell,
    /// The state machine (read side).
    pub kv: Arc<RwLock<KvStore>>,
    /// The recent changes watch streams follow.
    pub watch: Arc<WatchHub>,
    /// The peer transport, to forward lease keepalives to the leader (None in unit
    /// tests without peers).
    pub transport: Option<crate::transport::Transport>,
}

/// An API failure: status, machine-readable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The `Allow` header of a 405.
    allow: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), allow: None }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
    fn into_response(self) -> Resp {
        let mut r = error(self.status, self.code, self.message);
        if let Some(v) = self.allow.and_then(|a| hyper::header::HeaderValue::from_str(&a).ok()) {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
        r
    }
}

type ApiResult = Result<Resp, ApiError>;

/// How a membership-change attempt ended when it did not succeed.
enum ConfError {
    /// The answer to give.
    Fail(ApiError),
    /// Nothing was appended: start over (checks included) until the request timeout,
    /// then answer this.
    Again(ApiError),
}

impl From<ApiError> for ConfError {
    fn from(e: ApiError) -> Self {
        ConfError::Fail(e)
    }
}

/// What to do after a membership-change attempt: `Some` answer, or `None` to start over
/// (checks included: the membership may have changed meanwhile, and a change approved
/// against the old one must not go through) after a short pause, while the request
/// timeout allows.
async fn settle<T>(attempt: Result<T, ConfError>, deadline: tokio::time::Instant) -> Option<Result<T, ApiError>> {
    match attempt {
        Ok(v) => Some(Ok(v)),
        Err(ConfError::Fail(e)) => Some(Err(e)),
        Err(ConfError::Again(e)) => {
            if sleep_before(deadline, Duration::from_millis(20)).await {
                None
            } else {
                Some(Err(e))
            }
        }
    }
}

/// Decodes `%XX` escapes; errors on bad escapes or invalid UTF-8.
pub fn percent_decode(s: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Exactly two hex digits (`from_str_radix` alone would take "+f").
            let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit)).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => out.push(v),
                None => return Err(ApiError::bad(format!("bad percent escape in {s:?}"))),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad("key is not valid UTF-8"))
}

fn query_param(req: &HttpRequest<Incoming>, name: &str) -> Result<Option<String>, ApiError> {
    let Some(q) = req.uri().query() else { return Ok(None) };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

/// Refuses a query parameter the route does not take, or one given twice: a misspelt
/// `prev_revision` must not turn a compare-and-swap into a plain write.
fn only_params(req: &HttpRequest<Incoming>, allowed: &[&str]) -> Result<(), ApiError> {
    let Some(q) = req.uri().query() else { return Ok(()) };
    let mut seen: Vec<&str> = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let k = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !allowed.contains(&k) {
            let takes = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
            return Err(ApiError::bad(format!("unknown query parameter {k:?} (this request takes: {takes})")));
        }
        if seen.contains(&k) {
            return Err(ApiError::bad(format!("query parameter {k:?} given twice")));
        }
        seen.push(k);
    }
    Ok(())
}

/// Whether a read asks for linearizability (`consistency=linearizable`, the default)
/// rather than this member's local state (`consistency=serializable`).
fn linearizable(req: &HttpRequest<Incoming>) -> Result<bool, ApiError> {
    match query_param(req, "consistency")?.as_deref() {
        None | Some("linearizable") => Ok(true),
        Some("serializable") => Ok(false),
        Some(other) => Err(ApiError::bad(format!("consistency must be linearizable or serializable, not {other:?}"))),
    }
}

fn parse_member_id(s: &str) -> Result<u64, ApiError> {
    match s.parse::<u64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ApiError::bad(format!("bad member id {s:?}: want a positive integer"))),
    }
}

/// Keys and values one page of `GET /v1/kv` holds at most (past its first pair): a page
/// of 10 000 large values must not be built in memory whole.
pub const LIST_PAGE_BYTES: usize = 4 << 20;

/// Oversized bodies up to this size are read and dropped before the 413 is sent.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// Reads a request body of at most `cfg.max_request_bytes` (413 above), arriving within
/// `cfg.request_body_timeout` (408 after: a client trickling a body must not hold a
/// connection and its buffer for ever).
async fn read_body(req: HttpRequest<Incoming>, cfg: &Config) -> Result<Bytes, ApiError> {
    let timeout = cfg.request_body_timeout;
    match tokio::time::timeout(timeout, read_body_within(req, cfg.max_request_bytes)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {} ms", timeout.as_millis()),
        )),
    }
}

async fn read_body_within(req: HttpRequest<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let too_big = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("request body over {limit} bytes"));
    let declared = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|l| l > limit as u64) {
        // Read (and drop) a moderately oversized body first so the client, which is
        // still sending it, reads our 413 instead of a reset connection.
        if declared.is_some_and(|l| l <= DRAIN_LIMIT) {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        }
        return Err(too_big());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Err(e) => Err(ApiError::bad(format!("unreadable body: {e}"))),
    }
}

/// Labels a request for metrics with a bounded set of route names.
fn route_label(method: &Method, path: &str) -> &'static str {
    let m = method.as_str();
    match path {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        "/v1/status" => "v1_status",
        "/v1/backup" => "v1_backup",
        "/v1/watch" => "v1_watch",
        "/v1/txn" => "v1_txn",
        "/v1/kv" if m == "DELETE" => "v1_kv_delete_prefix",
        "/v1/kv" => "v1_kv_list",
        "/v1/members" => "v1_members",
        "/v1/leases" => "v1_leases",
        "/v1/leader/transfer" => "v1_leader_transfer",
        "/v1" => "v1_unknown",
        p if p.starts_with("/v1/kv/") => match m {
            "GET" => "v1_kv_get",
            "PUT" => "v1_kv_put",
            "DELETE" => "v1_kv_delete",
            _ => "v1_kv_other",
        },
        p if p.starts_with("/v1/members/") => "v1_member",
        p if p.starts_with("/v1/leases/") => "v1_lease",
        p if p.starts_with("/v1/") => "v1_unknown",
        _ => match m {
            "GET" => "key_get",
            "PUT" => "key_put",
            "POST" => "member_add",
            "DELETE" => "member_remove",
            _ => "other",
        },
    }
}

impl Api {
    /// Handles one client request (never panics on input; errors become JSON responses).
    pub async fn handle(self, req: HttpRequest<Incoming>) -> Resp {
        let started = Instant::now();
        let label = route_label(req.method(), req.uri().path());
        let resp = match self.route(req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let m = metrics();
        m.http_requests.with_label_values(&[label, resp.status().as_str()]).inc();
        m.http_request_seconds.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
        resp
    }

    async fn route(&self, req: HttpRequest<Incoming>) -> ApiResult {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if let Some(token) = &self.cfg.admin_token {
            if is_admin_route(&method, &path) {
                if let Some(refused) = admin_refusal(token.check(req.headers())) {
                    return Ok(refused);
                }
            }
        }
        match (method.clone(), path.as_str()) {
            (Method::GET, "/healthz") => Ok(response(StatusCode::OK, "text/plain", "ok\n")),
            (Method::GET, "/readyz") => Ok(self.readyz()),
            (Method::GET, "/metrics") => Ok(response(StatusCode::OK, "text/plain; version=0.0.4", metrics().render())),
            (_, "/healthz" | "/readyz" | "/metrics") => Err(method_not_allowed(&[Method::GET])),
            (_, "/v1/status") => self.only(&method, &[Method::GET]).map(|_| self.status_json()),
            (_, "/v1/kv") => match method {
                Method::GET => self.list(&req).await,
                Method::DELETE => self.delete_prefix(&req).await,
                _ => Err(method_not_allowed(&[Method::GET, Method::DELETE])),
            },
            (_, "/v1/backup") => {
                self.only(&method, &[Method::GET])?;
                self.backup(&req).await
            }
            (_, "/v1/watch") => {
                self.only(&method, &[Method::GET])?;
                self.watch(&req).await
            }
            (_, "/v1/txn") => {
                self.only(&method, &[Method::POST])?;
                let body = read_body(req, &self.cfg).await?;
                self.txn(&body).await
            }
            (_, "/v1/members") => match method {
                Method::GET => self.members().await,
                Method::POST => {
                    let body = read_body(req, &self.cfg).await?;
                    self.add_member_json(&body).await
                }
                _ => Err(method_not_allowed(&[Method::GET, Method::POST])),
            },
            (_, "/v1/leader/transfer") => {
                self.only(&method, &[Method::POST])?;
                let body = read_body(req, &self.cfg).await?;
                self.transfer(&body).await
            }
            (_, p) if p.starts_with("/v1/kv/") => {
                let key = percent_decode(&p["/v1/kv/".len()..])?;
                self.v1_kv(method, key, req).await
            }
            (_, "/v1/leases") => match method {
                Method::GET => {
                    self.read_barrier().await?;
                    let leases: Vec<Json> = self.kv.read().map_err(|_| internal())?.leases().map(|(id, ttl, _)| json!({ "id": id, "ttl": ttl / 1000 })).collect();
                    Ok(json(StatusCode::OK, &json!({ "leases": leases })))
                }
                Method::POST => {
                    let body = read_body(req, &self.cfg).await?;
                    self.grant_lease(&body).await
                }
                _ => Err(method_not_allowed(&[Method::GET, Method::POST])),
            },
            // `/v1/leases/<id>[/keepalive]` and `/v1/members/<id>[/promote]`: a path with
            // more segments is no route (404), not a bad id (400) or a wrong method (405).
            (_, p) if p.strip_prefix("/v1/leases/").is_some_and(|r| !id_route(r, "keepalive"))
                || p.strip_prefix("/v1/members/").is_some_and(|r| !id_route(r, "promote")) =>
            {
                Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {p}")))
            }
            (_, p) if p.starts_with("/v1/leases/") => {
                let rest = &p["/v1/leases/".len()..];
                match rest.strip_suffix("/keepalive") {
                    Some(id) => {
                        self.only(&method, &[Method::POST])?;
                        self.keepalive(parse_lease_id(id)?).await
                    }
                    None => match method {
                        Method::GET => {
                            let id = parse_lease_id(rest)?;
                            self.read_barrier().await?;
                            match self.kv.read().map_err(|_| internal())?.lease(id) {
                                Some((ttl, keys)) => Ok(json(StatusCode::OK, &json!({ "id": id, "ttl": ttl / 1000, "keys": keys }))),
                                None => Err(lease_not_found(id)),
                            }
                        }
                        Method::DELETE => self.lease_command(OpType::LeaseRevoke, parse_lease_id(rest)?).await,
                        _ => Err(method_not_allowed(&[Method::GET, Method::DELETE])),
                    },
                }
            }
            (_, p) if p.starts_with("/v1/members/") => {
                let rest = &p["/v1/members/".len()..];
                if let Some(id) = rest.strip_suffix("/promote") {
                    self.only(&method, &[Method::POST])?;
                    self.promote(parse_member_id(id)?).await
                } else {
                    self.only(&method, &[Method::DELETE])?;
                    self.remove_member(parse_member_id(rest)?).await.map(|st| json(StatusCode::OK, &st))
                }
            }
            (_, p) if p.starts_with("/v1/") || p == "/v1" => {
                Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {p}")))
            }
            _ => self.raftexample(method, path, req).await,
        }
    }

    fn only(&self, method: &Method, allowed: &[Method]) -> Result<(), ApiError> {
        if allowed.contains(method) {
            Ok(())
        } else {
            Err(method_not_allowed(allowed))
        }
    }

    // ----- raftexample compatibility -------------------------------------------------

    async fn raftexample(&self, method: Method, path: String, req: HttpRequest<Incoming>) -> ApiResult {
        let raw = path.strip_prefix('/').unwrap_or(&path).to_string();
        match method {
            Method::PUT => {
                let key = percent_decode(&raw)?;
                check_key(&key)?;
                let value = read_body(req, &self.cfg).await?;
                self.write(OpType::Put, key, value.to_vec(), None).await?;
                Ok(response(StatusCode::NO_CONTENT, "", Bytes::new()))
            }
            Method::GET => {
                let key = percent_decode(&raw)?;
                check_key(&key)?;
                self.read_barrier().await?;
                match self.get_local(&key) {
                    Some(v) => Ok(response(StatusCode::OK, "application/octet-stream", v.data)),
                    None => Ok(response(StatusCode::NOT_FOUND, "text/plain", "Failed to GET\n")),
                }
            }
            Method::POST => {
                let id = parse_member_id(&raw)?;
                let body = read_body(req, &self.cfg).await?;
                let url = std::str::from_utf8(&body).map_err(|_| ApiError::bad("peer URL is not UTF-8"))?.trim().to_string();
                self.add_member(id, url, false).await?;
                Ok(response(StatusCode::NO_CONTENT, "", Bytes::new()))
            }
            Method::DELETE => {
                let id = parse_member_id(&raw)?;
                self.remove_member(id).await?;
                Ok(response(StatusCode::NO_CONTENT, "", Bytes::new()))
            }
            _ => Err(method_not_allowed(&[Method::PUT, Method::GET, Method::POST, Method::DELETE])),
        }
    }

    // ----- keys ------------------------------------------------------------------------

    async fn v1_kv(&self, method: Method, key: String, req: HttpRequest<Incoming>) -> ApiResult {
        check_key(&key)?;
        match method {
            Method::GET => only_params(&req, &["consistency"])?,
            Method::PUT => only_params(&req, &["prev_revision", "lease"])?,
            Method::DELETE => only_params(&req, &["prev_revision"])?,
            _ => {}
        }
        let prev = match query_param(&req, "prev_revision")? {
            Some(s) => Some(s.parse::<u64>().map_err(|_| ApiError::bad("prev_revision must be a non-negative integer"))?),
            None => None,
        };
        match method {
            Method::GET => {
                if linearizable(&req)? {
                    self.read_barrier().await?;
                }
                let found = {
                    let kv = self.kv.read().map_err(|_| internal())?;
                    kv.get(&key).map(|v| (v, kv.lease_of(&key)))
                };
                match found {
                    Some((v, lease)) => {
                        let mut body = value_json(&key, &v.data, v.revision);
                        if let Some(id) = lease {
                            body["lease"] = json!(id);
                        }
                        Ok(json(StatusCode::OK, &body))
                    }
                    None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("key {key:?} not found"))),
                }
            }
            Method::PUT => {
                let lease = match query_param(&req, "lease")? {
                    Some(s) => parse_lease_id(&s)?,
                    None => 0,
                };
                let value = read_body(req, &self.cfg).await?;
                let cmd = Command { op: OpType::Put as i32, key: key.clone(), value: value.to_vec(), prev_revision: prev, lease, ..Default::default() };
                let (revision, _) = self.write_command(cmd).await?;
                Ok(json(StatusCode::OK, &json!({ "key": key, "revision": revision })))
            }
            Method::DELETE => {
                let (revision, existed) = self.write(OpType::Delete, key.clone(), Vec::new(), prev).await?;
                if existed {
                    Ok(json(StatusCode::OK, &json!({ "key": key, "revision": revision, "deleted": true })))
                } else {
                    Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("key {key:?} not found")))
                }
            }
            _ => Err(method_not_allowed(&[Method::GET, Method::PUT, Method::DELETE])),
        }
    }

    async fn list(&self, req: &HttpRequest<Incoming>) -> ApiResult {
        only_params(req, &["prefix", "limit", "after", "consistency"])?;
        let prefix = query_param(req, "prefix")?.unwrap_or_default();
        let limit = match query_param(req, "limit")? {
            Some(s) => s.parse::<usize>().ok().filter(|l| (1..=10_000).contains(l)).ok_or_else(|| ApiError::bad("limit must be 1..=10000"))?,
            None => 1000,
        };
        let after = query_param(req, "after")?;
        if linearizable(req)? {
            self.read_barrier().await?;
        }
        let ((items, more), leases, revision) = {
            let kv = self.kv.read().map_err(|_| internal())?;
            let page = kv.list_page(&prefix, after.as_deref(), limit, LIST_PAGE_BYTES);
            let leases: Vec<Option<u64>> = page.0.iter().map(|(k, _)| kv.lease_of(k)).collect();
            (page, leases, kv.applied())
        };
        let items: Vec<Json> = items
            .iter()
            .zip(leases)
            .map(|((k, v), lease)| {
                let mut item = value_json(k, &v.data, v.revision);
                if let Some(id) = lease {
                    item["lease"] = json!(id);
                }
                item
            })
            .collect();
        Ok(json(StatusCode::OK, &json!({ "items": items, "more": more, "revision": revision })))
    }

    /// `DELETE /v1/kv?prefix=<p>`: removes every key starting with `p` (not empty), in
    /// one raft entry: atomically, all at one revision (etcd's `del --prefix`).
    async fn delete_prefix(&self, req: &HttpRequest<Incoming>) -> ApiResult {
        only_params(req, &["prefix"])?;
        let prefix = match query_param(req, "prefix")? {
            Some(p) if !p.is_empty() => p,
            _ => return Err(ApiError::bad("prefix= is required and must not be empty (keys are deleted one by one with DELETE /v1/kv/<key>)")),
        };
        let cmd = Command { op: OpType::DeletePrefix as i32, key: prefix.clone(), ..Default::default() };
        match self.propose(cmd).await? {
            ApplyOutcome::KeysRemoved { revision, deleted } => Ok(json(StatusCode::OK, &json!({ "prefix": prefix, "deleted": deleted, "revision": revision }))),
            other => Err(unexpected(other)),
        }
    }

    /// `GET /v1/backup`: the whole state machine as a backup file (see [`crate::backup`]),
    /// streamed as it is encoded from a frozen copy (the keys an O(1) clone, the leases copied), so writes go on meanwhile.
    /// Linearizable by default: it holds every write acknowledged before the request.
    async fn backup(&self, req: &HttpRequest<Incoming>) -> ApiResult {
        only_params(req, &["consistency"])?;
        if linearizable(req)? {
            self.read_barrier().await?;
        }
        let Some(slot) = BackupSlot::take() else {
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "backup_in_progress", "another backup is being sent by this member; retry when it is done"));
        };
        let image = self.kv.read().map_err(|_| internal())?.image_source();
        // Sizing the image walks every pair: off the runtime's threads.
        let (image, image_len) = tokio::task::spawn_blocking(move || {
            let n = image.encoded_len() as u64;
            (image, n)
        })
        .await
        .map_err(|_| internal())?;
        let applied = image.applied();
        if applied == 0 {
            // A member that holds no state yet (a joining member before its first
            // snapshot, asked for a serializable backup): no file could restore it.
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_state", "this member holds no state yet; ask another member"));
        }
        let (tx, body) = ChannelBody::new(crate::backup::file_len(image_len), 4);
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let mut w = ChunkWriter { tx, buf: Vec::with_capacity(BACKUP_CHUNK), rt, stall: BACKUP_STALL };
            let written = crate::backup::write(&image, image_len, &mut w).and_then(|_| w.send_buffered());
            if let Err(e) = written {
                // The client went away (nothing to tell), or encoding failed: end the
                // body early so the client sees a short file, never a wrong one.
                tracing::debug!(error = %e, "backup not sent whole");
                // try_send: a stalled client's queue is full, and waiting on it again
                // is what the stall bound is there to stop; the body ends short when
                // this thread drops its sender either way.
                let _ = w.tx.try_send(Err(e));
            }
        });
        let mut r = response(StatusCode::OK, "application/octet-stream", Bytes::new());
        *r.body_mut() = http_body_util::Either::Right(body);
        r.headers_mut().insert("x-raftkv-applied-index", hyper::header::HeaderValue::from(applied));
        if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("attachment; filename=\"raftkv-{}-{applied}.backup\"", self.cfg.id)) {
            r.headers_mut().insert(hyper::header::CONTENT_DISPOSITION, v);
        }
        Ok(r)
    }

    /// `GET /v1/watch`: a stream of the changes to one key (`key=`) or to the keys under
    /// a prefix (`prefix=`, every key by default), one JSON object per line, from
    /// `start_revision` (the history permitting) or from now. "Now" is linearizable
    /// by default: the stream holds every change after the writes acknowledged before
    /// the request. See docs/api.md.
    async fn watch(&self, req: &HttpRequest<Incoming>) -> ApiResult {
        only_params(req, &["key", "prefix", "start_revision", "progress_ms", "prev_kv", "consistency"])?;
        let filter = match (query_param(req, "key")?, query_param(req, "prefix")?) {
            (Some(_), Some(_)) => return Err(ApiError::bad("give key or prefix, not both")),
            (Some(k), None) if k.is_empty() => return Err(ApiError::bad("key must not be empty (prefix= watches every key)")),
            (Some(k), None) => Filter::Key(k),
            (None, p) => Filter::Prefix(p.unwrap_or_default()),
        };
        let start = match query_param(req, "start_revision")? {
            None => None,
            Some(s) => Some(s.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| ApiError::bad("start_revision must be a positive integer"))?),
        };
        let progress = match query_param(req, "progress_ms")? {
            None => WATCH_PROGRESS,
            Some(s) => s
                .parse::<u64>()
                .ok()
                .filter(|ms| (100..=3_600_000).contains(ms))
                .map(Duration::from_millis)
                .ok_or_else(|| ApiError::bad("progress_ms must be 100 to 3600000"))?,
        };
        let prev = match query_param(req, "prev_kv")?.as_deref() {
            None | Some("false") => false,
            Some("true") if self.cfg.watch_prev_kv => true,
            Some("true") => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "prev_kv_disabled",
                    "this member keeps no previous values: start it with --watch-prev-kv (RAFTKV_WATCH_PREV_KV=true) to watch with prev_kv=true",
                ))
            }
            Some(other) => return Err(ApiError::bad(format!("prev_kv must be true or false, not {other:?}"))),
        };
        // From a given revision no barrier is needed: that revision fixes the start.
        if linearizable(req)? && start.is_none() {
            self.read_barrier().await?;
        }
        let Some(slot) = self.watch.open_stream() else {
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_watches", format!("this member serves {} watch streams already", crate::watch::MAX_STREAMS)));
        };
        let position = match start {
            Some(n) => n - 1,
            None => self.watch.applied(),
        };
        let oldest = self.watch.start();
        // From now: never 410 (the history may have moved since `applied` was read; the
        // stream's first read then ends it with a `compacted` line, which is the truth).
        if start.is_some() && position < oldest {
            return Err(ApiError::new(
                StatusCode::GONE,
                "compacted",
                format!("revision {} is older than this member's history of changes, which starts at revision {}: list the keys again and watch from the list's revision + 1", position + 1, oldest + 1),
            ));
        }
        let (tx, body) = ChannelBody::unsized_stream(WATCH_QUEUE);
        tokio::spawn(stream_watch(self.watch.clone(), WatchOptions { filter, progress, prev }, position, tx, slot));
        let mut r = response(StatusCode::OK, "application/x-ndjson", Bytes::new());
        *r.body_mut() = http_body_util::Either::Right(body);
        r.headers_mut().insert("x-raftkv-revision", hyper::header::HeaderValue::from(position));
        Ok(r)
    }

    /// `POST /v1/leases {"ttl": seconds}`: grants a lease (a new id, chosen here).
    async fn grant_lease(&self, body: &[u8]) -> ApiResult {
        let v: Json = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("body must be JSON: {e}")))?;
        let o = v.as_object().ok_or_else(|| ApiError::bad("body must be a JSON object {\"ttl\": seconds}"))?;
        only_fields(o, "the lease", &["ttl"])?;
        let ttl = o
            .get("ttl")
            .and_then(Json::as_u64)
            .filter(|t| (1..=MAX_LEASE_TTL_S).contains(t))
            .ok_or_else(|| ApiError::bad(format!("\"ttl\" must be a whole number of seconds, 1 to {MAX_LEASE_TTL_S}")))?;
        // Below 2^53: exact as a JSON number in every client.
        let id = rand::random::<u64>() % ((1 << 53) - 1) + 1;
        let cmd = Command { op: OpType::LeaseGrant as i32, lease: id, ttl_ms: ttl * 1000, ..Default::default() };
        match self.propose(cmd).await? {
            ApplyOutcome::LeaseKept { revision, .. } => Ok(json(StatusCode::CREATED, &json!({ "id": id, "ttl": ttl, "revision": revision }))),
            ApplyOutcome::LeaseMismatch { .. } => Err(ApiError::new(StatusCode::CONFLICT, "lease_exists", format!("lease {id} exists already; retry"))),
            other => Err(unexpected(other)),
        }
    }

    /// `POST /v1/leases/<id>/keepalive`: renewed by the leader without a raft entry (as
    /// etcd's keepalives), here or forwarded to it over the peer port; through raft
    /// (a renewal entry) when the leader is of an older version that cannot.
    async fn keepalive(&self, id: u64) -> ApiResult {
        use crate::raft_loop::Renewal;
        use crate::transport::PeerRenewal;
        let here = self.ask_loop(|reply| Request::RenewLease { lease: id, reply }).await?;
        let timeout = self.cfg.request_timeout;
        let answer = match (here, &self.transport) {
            (Renewal::NotLeader { leader }, Some(transport)) if leader != 0 && leader != self.cfg.id => {
                match transport.renew_lease(leader, id, timeout).await {
                    Ok(PeerRenewal::Answer(r)) => r,
                    Ok(PeerRenewal::Unsupported) => return self.lease_command(OpType::LeaseKeepAlive, id).await,
                    Err(why) => return Err(ApiError::unavailable("unavailable", why)),
                }
            }
            (r, _) => r,
        };
        match answer {
            Renewal::Renewed { ttl_ms, revision } => Ok(json(StatusCode::OK, &json!({ "id": id, "ttl": ttl_ms / 1000, "revision": revision }))),
            Renewal::NotFound => Err(lease_not_found(id)),
            Renewal::NotLeader { .. } => Err(ApiError::unavailable("no_leader", "no leader to renew the lease (an election is under way); retry")),
        }
    }

    /// Revokes (`DELETE /v1/leases/<id>`) a lease through raft; renews one through raft
    /// when the leader cannot renew it itself (an older version).
    async fn lease_command(&self, op: OpType, id: u64) -> ApiResult {
        let cmd = Command { op: op as i32, lease: id, ..Default::default() };
        match self.propose(cmd).await? {
            ApplyOutcome::LeaseKept { revision, ttl_ms } => Ok(json(StatusCode::OK, &json!({ "id": id, "ttl": ttl_ms / 1000, "revision": revision }))),
            ApplyOutcome::KeysRemoved { revision, deleted } => Ok(json(StatusCode::OK, &json!({ "id": id, "deleted": deleted, "revision": revision }))),
            ApplyOutcome::LeaseMismatch { .. } => Err(lease_not_found(id)),
            other => Err(unexpected(other)),
        }
    }

    /// `POST /v1/txn`: etcd's transaction. If every compare holds, the `success` branch
    /// runs, otherwise the `failure` branch (puts, deletes and gets): atomically, at one
    /// revision, after a quorum commit. See docs/api.md.
    async fn txn(&self, body: &[u8]) -> ApiResult {
        let txn = parse_txn(body)?;
        let cmd = Command { op: OpType::Txn as i32, txn: Some(txn.clone()), ..Default::default() };
        match self.propose(cmd).await? {
            ApplyOutcome::Txn { revision, succeeded, results } => {
                let ops = if succeeded { txn.success } else { txn.failure };
                let read: usize = results.iter().map(|r| if let TxnResult::Read(Some((v, _))) = r { v.data.len() } else { 0 }).sum();
                if read <= TXN_BUFFERED_READ_BYTES {
                    let results: Vec<Json> = ops.iter().zip(results).map(|(o, r)| txn_result_json(o, r)).collect();
                    return Ok(json(StatusCode::OK, &json!({ "succeeded": succeeded, "revision": revision, "results": results })));
                }
                // Up to 128 gets of one large value: encoded (up to 6 bytes per value
                // byte) one result at a time as the client reads, never all at once.
                // A client that stops reading for BACKUP_STALL loses the rest of the
                // answer (it is ended: what it then reads is not whole JSON), as a
                // backup's does: it must not pin the values.
                let (tx, body) = ChannelBody::unsized_stream(2);
                tokio::spawn(async move {
                    let head = format!(r#"{{"succeeded":{succeeded},"revision":{revision},"results":["#);
                    if !send_or_cut(&tx, Bytes::from(head)).await {
                        return;
                    }
                    for (i, (o, r)) in ops.iter().zip(results).enumerate() {
                        // Encoded one at a time, as the client reads.
                        let mut chunk = if i == 0 { Vec::new() } else { b",".to_vec() };
                        chunk.extend_from_slice(&serde_json::to_vec(&txn_result_json(o, r)).unwrap_or_default());
                        if !send_or_cut(&tx, Bytes::from(chunk)).await {
                            return;
                        }
                    }
                    send_or_cut(&tx, Bytes::from_static(b"]}\n")).await;
                });
                let mut r = response(StatusCode::OK, "application/json", Bytes::new());
                *r.body_mut() = http_body_util::Either::Right(body);
                Ok(r)
            }
            ApplyOutcome::LeaseMismatch { .. } => {
                let mut ids: Vec<u64> = txn.success.iter().chain(&txn.failure).filter(|o| o.op == OpType::LeasedPut as i32).map(|o| o.lease).collect();
                ids.sort_unstable();
                ids.dedup();
                let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
                Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "lease_not_found",
                    format!("a lease a put of the branch that ran attaches its key to is not found (expired or revoked?); the transaction's leases: {}; nothing was written", ids.join(", ")),
                ))
            }
            other => Err(unexpected(other)),
        }
    }

    fn get_local(&self, key: &str) -> Option<crate::kv::Value> {
        self.kv.read().ok().and_then(|kv| kv.get(key))
    }

    /// Proposes a put/delete and waits for it to be applied. Returns (revision, existed).
    async fn write(&self, op: OpType, key: String, value: Vec<u8>, prev: Option<u64>) -> Result<(u64, bool), ApiError> {
        self.write_command(Command { op: op as i32, key, value, prev_revision: prev, ..Default::default() }).await
    }

    /// Proposes a put or delete command and waits for it to be applied.
    async fn write_command(&self, cmd: Command) -> Result<(u64, bool), ApiError> {
        let lease = cmd.lease;
        match self.propose(cmd).await? {
            ApplyOutcome::Applied { revision, existed } => Ok((revision, existed)),
            ApplyOutcome::LeaseMismatch { .. } => Err(lease_not_found(lease)),
            ApplyOutcome::PreconditionFailed { current } => {
                Err(ApiError::new(StatusCode::PRECONDITION_FAILED, "revision_mismatch", format!("precondition failed: current revision is {current}")))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Proposes a command (its request id is chosen here) and waits for its outcome.
    async fn propose(&self, mut cmd: Command) -> Result<ApplyOutcome, ApiError> {
        let request_id = rand::random::<u64>();
        cmd.request_id = request_id;
        let data = cmd.encode_to_vec();
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        loop {
            let (tx, rx) = oneshot::channel();
            if !self.raft.send(Request::Propose { request_id, data: data.clone(), reply: tx }) {
                return Err(ApiError::unavailable("stopping", "node is stopping"));
            }
            match tokio::time::timeout_at(deadline, rx).await {
                Err(_) => {
                    metrics().proposals_failed.inc();
                    return Err(ApiError::unavailable("timeout", "timed out waiting for the write to commit (no quorum?); its outcome is unknown"));
                }
                Ok(Err(_)) => {
                    metrics().proposals_failed.inc();
                    return Err(ApiError::unavailable("stopping", "node is stopping; the write's outcome is unknown"));
                }
                Ok(Ok(Ok(outcome))) => return Ok(outcome),
                Ok(Ok(Err(ProposeError::NoLeader))) => {
                    if !sleep_before(deadline, Duration::from_millis(50)).await {
                        metrics().proposals_failed.inc();
                        return Err(ApiError::unavailable("no_leader", "no leader elected within the request timeout"));
                    }
                }
                Ok(Ok(Err(ProposeError::Dropped))) => {
                    // Not appended anywhere: proposing the same command again is safe.
                    if !sleep_before(deadline, Duration::from_millis(10)).await {
                        metrics().proposals_failed.inc();
                        return Err(ApiError::unavailable("no_leader", "the leader kept dropping the write (leadership moving?) within the request timeout; it was not committed"));
                    }
                    metrics().proposals_dropped.inc();
                }
                Ok(Ok(Err(e @ ProposeError::DiskFull { .. }))) => {
                    metrics().proposals_failed.inc();
                    return Err(ApiError::unavailable("disk_full", e.to_string()));
                }
                Ok(Ok(Err(e @ ProposeError::Stopping { .. }))) => {
                    return Err(ApiError::unavailable("stopping", e.to_string()));
                }
                Ok(Ok(Err(e))) => {
                    metrics().proposals_failed.inc();
                    return Err(ApiError::unavailable("unavailable", e.to_string()));
                }
            }
        }
    }

    /// Waits until the local state machine reflects everything committed before now.
    async fn read_barrier(&self) -> Result<(), ApiError> {
        self.ask_loop(|reply| Request::Read { reply }).await?.map_err(|e| ApiError::unavailable("unavailable", e.to_string()))
    }

    /// Sends the raft loop a request that confirms leadership with a quorum (a read
    /// barrier, a lease renewal) and waits for its answer, within the request timeout.
    async fn ask_loop<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        if !self.raft.send(request(tx)) {
            return Err(ApiError::unavailable("stopping", "node is stopping"));
        }
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Err(_) => Err(ApiError::unavailable("timeout", "timed out confirming leadership with a quorum (no leader or no quorum)")),
            Ok(Err(_)) => Err(ApiError::unavailable("stopping", "node is stopping")),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    // ----- status, probes ---------------------------------------------------------------

    fn status(&self) -> Arc<NodeStatus> {
        match self.status.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn status_json(&self) -> Resp {
        let st = self.status();
        let (keys, cluster_id) = self.kv.read().map(|k| (k.len(), k.cluster_id())).unwrap_or((0, 0));
        json(
            StatusCode::OK,
            &json!({
                "id": st.id,
                "leader": st.leader,
                "term": st.term,
                "role": st.role,
                "commit_index": st.commit_index,
                "applied_index": st.applied_index,
                "snapshot_index": st.snapshot_index,
                "wal_bytes": st.wal_bytes,
                "incarnation": format!("{:016x}", st.incarnation),
                "cluster_id": (cluster_id != 0).then(|| format!("{cluster_id:016x}")),
                "lost_log": st.lost_log,
                "disk_full": st.disk_full,
                "keys": keys,
                "members": local_members(&st),
            }),
        )
    }

    fn readyz(&self) -> Resp {
        let st = self.status();
        let lag = st.commit_index.saturating_sub(st.applied_index);
        let reason = if st.stopping {
            Some("stopping".to_string())
        } else if st.disk_full {
            Some("disk full: writes are refused until space returns".to_string())
        } else if st.lost_log {
            Some("this empty data dir holds a member id the cluster knows with a longer log: remove the member and add it again".to_string())
        } else if st.leader == 0 {
            Some("no leader (election in progress or no quorum)".to_string())
        } else if lag > self.cfg.promote_max_lag {
            Some(format!("applying: {lag} committed entries not yet applied"))
        } else if !st.voters.contains(&st.id) && !st.learners.contains(&st.id) {
            Some("not a member yet (waiting to be added)".to_string())
        } else {
            None
        };
        match reason {
            None => response(StatusCode::OK, "text/plain", "ok\n"),
            Some(r) => error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", r),
        }
    }

    // ----- membership -------------------------------------------------------------------

    /// The member list from the leader's point of view (match index, reachability).
    async fn members_view(&self) -> Result<Json, ApiError> {
        let st = self.status();
        if st.leader == st.id && st.role == "leader" {
            return Ok(members_json(&st));
        }
        if st.leader != 0 {
            if let Some(url) = st.member_urls.iter().find(|(id, _)| *id == st.leader).map(|(_, u)| u.clone()) {
                if let Ok(v) = fetch_json(&self.cfg, &format!("{url}/members")).await {
                    return Ok(v);
                }
            }
        }
        Ok(members_json(&st))
    }

    async fn members(&self) -> ApiResult {
        Ok(json(StatusCode::OK, &self.members_view().await?))
    }

    async fn add_member_json(&self, body: &[u8]) -> ApiResult {
        let v: Json = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("body must be JSON: {e}")))?;
        // A misspelt "learner" must not add a voter: unknown fields are refused.
        let o = v.as_object().ok_or_else(|| ApiError::bad("body must be a JSON object"))?;
        only_fields(o, "member", &["id", "peer_url", "learner"])?;
        let id = v.get("id").and_then(Json::as_u64).filter(|i| *i > 0).ok_or_else(|| ApiError::bad("\"id\" must be a positive integer"))?;
        let url = v.get("peer_url").and_then(Json::as_str).ok_or_else(|| ApiError::bad("\"peer_url\" is required"))?;
        let learner = match v.get("learner") {
            None | Some(Json::Null) => false,
            Some(Json::Bool(b)) => *b,
            Some(_) => return Err(ApiError::bad("\"learner\" must be true or false")),
        };
        let (created, _cs) = self.add_member(id, url.to_string(), learner).await?;
        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
        Ok(json(status, &self.members_view().await?))
    }

    /// Adds a member; Ok(false) when it already was one with the same URL and role.
    async fn add_member(&self, id: u64, url: String, learner: bool) -> Result<(bool, Option<ConfState>), ApiError> {
        // One spelling per address: `http://h:1/` and `http://H:01` name the same member.
        let url = crate::config::canonical_peer_url(&url).map_err(|e| ApiError::bad(e.to_string()))?;
        crate::config::check_peer_scheme(&url, self.cfg.peer_tls.is_some()).map_err(|e| ApiError::bad(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        loop {
            if let Some(done) = settle(self.add_member_once(id, &url, learner, deadline).await, deadline).await {
                return done;
            }
        }
    }

    /// One attempt of [`Api::add_member`]: the checks against the leader's member list
    /// (this node's when the leader cannot be asked), then the change.
    async fn add_member_once(
        &self,
        id: u64,
        url: &str,
        learner: bool,
        deadline: tokio::time::Instant,
    ) -> Result<(bool, Option<ConfState>), ConfError> {
        let view = self.members_view().await?;
        let members = view.get("members").and_then(Json::as_array).cloned().unwrap_or_default();
        let field = |m: &Json, k: &str| m.get(k).and_then(Json::as_str).map(str::to_string).unwrap_or_default();
        // Members added before URLs were made canonical may hold another spelling.
        let peer_url = |m: &Json| {
            let u = field(m, "peer_url");
            crate::config::canonical_peer_url(&u).unwrap_or(u)
        };
        if let Some(m) = members.iter().find(|m| m.get("id").and_then(Json::as_u64) == Some(id)) {
            if peer_url(m) == url && (field(m, "role") == "learner") == learner {
                return Ok((false, None));
            }
            return Err(ApiError::new(StatusCode::CONFLICT, "member_exists", format!("member {id} already exists")).into());
        }
        if members.iter().any(|m| m.get("id").and_then(Json::as_u64) != Some(id) && peer_url(m) == url) {
            return Err(ApiError::new(StatusCode::CONFLICT, "url_in_use", format!("peer URL {url} belongs to another member")).into());
        }
        let ty = if learner { ConfChangeType::AddLearnerNode } else { ConfChangeType::AddNode };
        let cs = self.conf_change(id, ty, url.to_string(), deadline, &view).await?;
        Ok((true, Some(cs)))
    }

    /// The role of member `id` ("voter"/"learner") in the leader's view (falls back to
    /// this node's view when the leader cannot be asked). A follower's own view can lag
    /// a change that was just committed elsewhere.
    fn role_in(view: &Json, id: u64) -> Option<String> {
        view.get("members")?
            .as_array()?
            .iter()
            .find(|m| m.get("id").and_then(Json::as_u64) == Some(id))
            .and_then(|m| m.get("role").and_then(Json::as_str).map(str::to_string))
    }

    async fn promote(&self, id: u64) -> ApiResult {
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        loop {
            if let Some(done) = settle(self.promote_once(id, deadline).await, deadline).await {
                return done;
            }
        }
    }

    async fn promote_once(&self, id: u64, deadline: tokio::time::Instant) -> Result<Resp, ConfError> {
        let st = self.status();
        let view = self.members_view().await?;
        // Either view showing a voter settles it: conf changes apply in log order, and the
        // leader's published view can trail a change this node has just applied.
        if st.voters.contains(&id) {
            return Ok(json(StatusCode::OK, &json!({ "id": id, "role": "voter", "changed": false })));
        }
        match Self::role_in(&view, id).as_deref() {
            Some("voter") => return Ok(json(StatusCode::OK, &json!({ "id": id, "role": "voter", "changed": false }))),
            Some("learner") => {}
            _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "not_member", format!("{id} is not a learner of this cluster")).into()),
        }
        let commit = view.get("commit_index").and_then(Json::as_u64).unwrap_or(st.commit_index);
        let matched = view
            .get("members")
            .and_then(Json::as_array)
            .and_then(|ms| ms.iter().find(|m| m.get("id").and_then(Json::as_u64) == Some(id)))
            .and_then(|m| m.get("match_index").and_then(Json::as_u64));
        match matched {
            Some(m) if m > 0 && m.saturating_add(self.cfg.promote_max_lag) >= commit => {}
            Some(m) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "learner_behind",
                    format!("learner {id} is behind: match index {m}, commit index {commit}"),
                )
                .into())
            }
            None => return Err(ApiError::unavailable("no_leader", "the leader's view of the learner is unavailable").into()),
        }
        self.conf_change(id, ConfChangeType::AddNode, String::new(), deadline, &view).await?;
        Ok(json(StatusCode::OK, &json!({ "id": id, "role": "voter", "changed": true })))
    }

    async fn remove_member(&self, id: u64) -> Result<Json, ApiError> {
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        loop {
            if let Some(done) = settle(self.remove_member_once(id, deadline).await, deadline).await {
                return done;
            }
        }
    }

    async fn remove_member_once(&self, id: u64, deadline: tokio::time::Instant) -> Result<Json, ConfError> {
        let st = self.status();
        let view = self.members_view().await?;
        let is_voter = match Self::role_in(&view, id).as_deref() {
            Some("voter") => true,
            Some(_) => false,
            None => return Err(ApiError::new(StatusCode::NOT_FOUND, "not_member", format!("{id} is not a member")).into()),
        };
        let voters = view
            .get("members")
            .and_then(Json::as_array)
            .map(|ms| ms.iter().filter(|m| m.get("role").and_then(Json::as_str) == Some("voter")).count())
            .unwrap_or(st.voters.len());
        if is_voter && voters == 1 {
            return Err(ApiError::new(StatusCode::CONFLICT, "last_voter", "cannot remove the last voter").into());
        }
        if is_voter && st.leader == id {
            // Move leadership first so the cluster never waits out an election.
            self.transfer_to(None, Some(id)).await?;
        }
        self.conf_change(id, ConfChangeType::RemoveNode, String::new(), deadline, &view).await?;
        Ok(json!({ "removed": id }))
    }

    /// One attempt at a membership change, checked by the caller against `view` (the
    /// leader's member list, or this node's): proposes it and waits for it to apply.
    async fn conf_change(
        &self,
        id: u64,
        ty: ConfChangeType,
        peer_url: String,
        deadline: tokio::time::Instant,
        view: &Json,
    ) -> Result<ConfState, ConfError> {
        let change = ConfChangeSingle { change_type: ty as i32, node_id: id };
        let busy = |m: String| ConfError::Fail(ApiError::new(StatusCode::CONFLICT, "change_in_progress", m));
        let not_made = |why: &str| {
            ConfError::Again(ApiError::unavailable("no_leader", format!("{why} within the request timeout; the membership change was not made")))
        };
        // A follower forwards the change to the leader, which takes one at a time: the
        // leader's list says whether one is pending (409 at once). One proposed in between
        // makes the leader drop ours unappended and say so; the caller starts over.
        if self.status().role != "leader" && view.get("conf_change_pending").and_then(Json::as_bool) == Some(true) {
            return Err(busy(ProposeError::ConfChangeInProgress.to_string()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ConfError::Fail(ApiError::unavailable("timeout", "the request timeout passed before the membership change could be proposed; it was not made")));
        }
        let (tx, rx) = oneshot::channel();
        if !self.raft.send(Request::ConfChange { change, peer_url, reply: tx }) {
            return Err(ApiError::unavailable("stopping", "node is stopping").into());
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(ApiError::unavailable("timeout", "timed out waiting for the membership change to commit; its outcome is unknown").into()),
            Ok(Err(_)) => Err(ApiError::unavailable("stopping", "node is stopping").into()),
            Ok(Ok(Ok(cs))) => Ok(cs),
            Ok(Ok(Err(ProposeError::NoLeader))) => Err(not_made("no leader was elected")),
            Ok(Ok(Err(e @ ProposeError::ConfChangeInProgress))) => Err(busy(e.to_string())),
            // A new leader applies its log up to its election first (milliseconds); a
            // dropped change was not appended.
            Ok(Ok(Err(ProposeError::LeaderNotReady | ProposeError::Dropped))) => Err(not_made("the leader did not take the change")),
            Ok(Ok(Err(e))) => Err(ApiError::unavailable("unavailable", e.to_string()).into()),
        }
    }

    async fn transfer(&self, body: &[u8]) -> ApiResult {
        let to = if body.iter().all(|b| b.is_ascii_whitespace()) {
            None
        } else {
            let v: Json = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("body must be JSON: {e}")))?;
            // `{"target": 2}` must not move leadership to a member the caller did not name.
            let o = v.as_object().ok_or_else(|| ApiError::bad("body must be a JSON object"))?;
            only_fields(o, "transfer", &["to"])?;
            match o.get("to") {
                None | Some(Json::Null) => None,
                Some(t) => Some(t.as_u64().filter(|t| *t > 0).ok_or_else(|| ApiError::bad("\"to\" must be a positive integer"))?),
            }
        };
        let leader = self.transfer_to(to, None).await?;
        Ok(json(StatusCode::OK, &json!({ "leader": leader })))
    }

    /// Moves leadership to `to` (or the best voter other than `avoid`/the leader) and
    /// waits until it moved. Returns the new leader.
    async fn transfer_to(&self, to: Option<u64>, avoid: Option<u64>) -> Result<u64, ApiError> {
        let st = self.status();
        if st.leader == 0 {
            return Err(ApiError::unavailable("no_leader", "no leader"));
        }
        let target = match to {
            Some(t) => {
                if !st.voters.contains(&t) {
                    return Err(ApiError::new(StatusCode::CONFLICT, "not_voter", format!("{t} is not a voter")));
                }
                t
            }
            None => {
                let view = self.members_view().await?;
                let avoid = avoid.unwrap_or(st.leader);
                view.get("members")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|m| m.get("role").and_then(Json::as_str) == Some("voter"))
                    .filter(|m| m.get("reachable").and_then(Json::as_bool).unwrap_or(true))
                    .filter_map(|m| Some((m.get("id")?.as_u64()?, m.get("match_index").and_then(Json::as_u64).unwrap_or(0))))
                    .filter(|(id, _)| *id != avoid && *id != st.leader)
                    .max_by_key(|(id, matched)| (*matched, u64::MAX - *id))
                    .map(|(id, _)| id)
                    .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "no_target", "no other reachable voter to take leadership"))?
            }
        };
        if st.leader == target {
            return Ok(target);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        loop {
            if !self.raft.send(Request::TransferLeader(target)) {
                return Err(ApiError::unavailable("stopping", "node is stopping"));
            }
            // Poll for the change; re-send now and then (a transfer can be dropped).
            for _ in 0..10 {
                if self.status().leader == target {
                    return Ok(target);
                }
                if !sleep_before(deadline, Duration::from_millis(20)).await {
                    return Err(ApiError::unavailable("timeout", format!("leadership did not move to {target} in time")));
                }
            }
        }
    }
}

/// Sleeps `d` unless that would pass `deadline`; false when the deadline is (nearly) up.
async fn sleep_before(deadline: tokio::time::Instant, d: Duration) -> bool {
    if tokio::time::Instant::now() + d >= deadline {
        return false;
    }
    tokio::time::sleep(d).await;
    true
}

/// The longest lease, in seconds (a year).
pub const MAX_LEASE_TTL_S: u64 = 365 * 24 * 3600;

fn parse_lease_id(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>().ok().filter(|id| *id > 0).ok_or_else(|| ApiError::bad(format!("bad lease id {s:?}: want a positive integer")))
}

fn lease_not_found(id: u64) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "lease_not_found", format!("lease {id} not found (expired or revoked?)"))
}

/// Sends one chunk of a streamed answer; a client that has not taken it within
/// [`BACKUP_STALL`] gets its body ended with an error (the connection is cut), so it
/// pins nothing for longer. False when the answer is over.
async fn send_or_cut(tx: &ChunkSender, chunk: Bytes) -> bool {
    match tx.send_timeout(Ok(chunk), BACKUP_STALL).await {
        Ok(()) => true,
        Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
            let _ = tx.try_send(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")));
            false
        }
        Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => false,
    }
}

/// A transaction whose gets read more value bytes than this is answered as a stream,
/// one result at a time, instead of from one buffer (128 gets of one 1.5 MiB value
/// would otherwise need over 1 GiB of memory at once).
const TXN_BUFFERED_READ_BYTES: usize = 1 << 20;

/// Compares, and operations per branch, one transaction holds at most (as etcd's default
/// `--max-txn-ops`).
pub const TXN_MAX_OPS: usize = 128;

/// Reads a transaction from its JSON body (docs/api.md): unknown fields, a compare
/// without a condition, a write of an unknown kind, an empty key or a key written twice
/// in one branch are refused.
fn parse_txn(body: &[u8]) -> Result<Txn, ApiError> {
    let v: Json = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("body must be JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| ApiError::bad("body must be a JSON object with compare, success and failure"))?;
    only_fields(obj, "the transaction", &["compare", "success", "failure"])?;
    let list = |name: &str| -> Result<&[Json], ApiError> {
        match obj.get(name) {
            None | Some(Json::Null) => Ok(&[]),
            Some(Json::Array(a)) if a.len() <= TXN_MAX_OPS => Ok(a),
            Some(Json::Array(_)) => Err(ApiError::bad(format!("{name:?} holds more than {TXN_MAX_OPS} entries"))),
            Some(_) => Err(ApiError::bad(format!("{name:?} must be an array"))),
        }
    };
    let mut compare = Vec::new();
    for (i, c) in list("compare")?.iter().enumerate() {
        let what = format!("compare[{i}]");
        let o = c.as_object().ok_or_else(|| ApiError::bad(format!("{what} must be an object")))?;
        only_fields(o, &what, &["key", "revision", "value", "value_base64"])?;
        let revision = match o.get("revision") {
            None => None,
            Some(r) => Some(r.as_u64().ok_or_else(|| ApiError::bad(format!("{what}.revision must be a non-negative integer (0: the key is absent)")))?),
        };
        let value = txn_value(o, &what)?;
        if revision.is_none() && value.is_none() {
            return Err(ApiError::bad(format!("{what} needs a revision or a value to compare")));
        }
        compare.push(TxnCompare { key: txn_key(o, &what)?, revision, value });
    }
    Ok(Txn { compare, success: txn_ops("success", list("success")?)?, failure: txn_ops("failure", list("failure")?)? })
}

/// One entry of a transaction's `results`: a write's `existed`, or a get's value.
fn txn_result_json(o: &TxnOp, r: TxnResult) -> Json {
    match r {
        TxnResult::Wrote { existed } => {
            let put = o.op == OpType::Put as i32 || o.op == OpType::LeasedPut as i32;
            json!({ "op": if put { "put" } else { "delete" }, "key": o.key, "existed": existed })
        }
        TxnResult::Read(Some((v, lease))) => {
            let mut body = value_json(&o.key, &v.data, v.revision);
            body["op"] = json!("get");
            body["found"] = json!(true);
            if let Some(id) = lease {
                body["lease"] = json!(id);
            }
            body
        }
        TxnResult::Read(None) => json!({ "op": "get", "key": o.key, "found": false }),
    }
}

fn txn_ops(name: &str, ops: &[Json]) -> Result<Vec<TxnOp>, ApiError> {
    let mut out: Vec<TxnOp> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let what = format!("{name}[{i}]");
        let o = op.as_object().ok_or_else(|| ApiError::bad(format!("{what} must be an object")))?;
        let key = txn_key(o, &what)?;
        let mut lease = 0;
        let (kind, value) = match o.get("op").and_then(Json::as_str) {
            Some("put") => {
                only_fields(o, &what, &["op", "key", "value", "value_base64", "lease"])?;
                let value = txn_value(o, &what)?.ok_or_else(|| ApiError::bad(format!("{what}: a put needs a value (or value_base64)")))?;
                match o.get("lease") {
                    None => (OpType::Put, value),
                    Some(l) => {
                        lease = l.as_u64().filter(|id| *id > 0).ok_or_else(|| ApiError::bad(format!("{what}.lease must be a lease id (a positive integer)")))?;
                        (OpType::LeasedPut, value)
                    }
                }
            }
            Some("delete") => {
                only_fields(o, &what, &["op", "key"])?;
                (OpType::Delete, Vec::new())
            }
            Some("get") => {
                only_fields(o, &what, &["op", "key"])?;
                (OpType::Get, Vec::new())
            }
            _ => return Err(ApiError::bad(format!("{what}.op must be \"put\", \"delete\" or \"get\""))),
        };
        // A key may be read any number of times, but written once per branch.
        let writes = |op: i32| op != OpType::Get as i32;
        if writes(kind as i32) && out.iter().any(|p| writes(p.op) && p.key == key) {
            return Err(ApiError::bad(format!("{what}: key {key:?} is written twice in {name}")));
        }
        out.push(TxnOp { op: kind as i32, key, value, lease });
    }
    Ok(out)
}

fn only_fields(o: &serde_json::Map<String, Json>, what: &str, allowed: &[&str]) -> Result<(), ApiError> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad(format!("{what}: unknown field {k:?} (allowed: {})", allowed.join(", ")))),
        None => Ok(()),
    }
}

fn txn_key(o: &serde_json::Map<String, Json>, what: &str) -> Result<String, ApiError> {
    match o.get("key").and_then(Json::as_str) {
        Some(k) if !k.is_empty() => Ok(k.to_string()),
        _ => Err(ApiError::bad(format!("{what}.key must be a non-empty string"))),
    }
}

/// `value` (a string) or `value_base64` (any bytes), not both.
fn txn_value(o: &serde_json::Map<String, Json>, what: &str) -> Result<Option<Vec<u8>>, ApiError> {
    use base64::Engine;
    match (o.get("value"), o.get("value_base64")) {
        (Some(_), Some(_)) => Err(ApiError::bad(format!("{what}: value or value_base64, not both"))),
        (Some(v), None) => v.as_str().map(|s| Some(s.as_bytes().to_vec())).ok_or_else(|| ApiError::bad(format!("{what}.value must be a string"))),
        (None, Some(v)) => v
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("{what}.value_base64 must be standard base64"))),
        (None, None) => Ok(None),
    }
}

/// Chunks of a watch stream queued for a slow client before its stream waits.
const WATCH_QUEUE: usize = 16;

/// Changes one read of the history hands a watch stream at most.
const WATCH_CHUNK_EVENTS: usize = 512;

/// A watch stream's chunk is sent once it holds this many bytes (or the read's last
/// change).
const WATCH_CHUNK_BYTES: usize = 256 << 10;

/// Changes a watch stream looks at per read of the history (it yields in between).
const WATCH_SCAN: usize = 8192;

/// A quiet watch stream sends a `progress` line this often (unless `progress_ms` says).
const WATCH_PROGRESS: Duration = Duration::from_secs(10);

/// Follows the history from `position` for one client until it goes away, falls behind
/// the history (a last `compacted` line), or the node stops (the body just ends).
/// What a watch stream was asked for.
struct WatchOptions {
    /// The keys it follows.
    filter: Filter,
    /// How often a quiet stream sends a `progress` line.
    progress: Duration,
    /// Whether each change also carries the key's previous value (`prev_kv=true`).
    prev: bool,
}

async fn stream_watch(hub: Arc<WatchHub>, opts: WatchOptions, mut position: u64, tx: ChunkSender, _slot: crate::watch::StreamSlot) {
    let WatchOptions { filter, progress, prev } = opts;
    let mut changed = hub.subscribe();
    let mut last_sent = tokio::time::Instant::now();
    loop {
        // Marked seen before the closed flag is read: a close() in between still wakes
        // the select below (it sets the flag, then notifies).
        changed.borrow_and_update();
        if hub.is_closed() {
            return;
        }
        match hub.read(position, &filter, WATCH_CHUNK_EVENTS, WATCH_SCAN) {
            Err(start) => {
                metrics().watch_compacted.inc();
                let line = json!({
                    "type": "compacted",
                    "revision": start + 1,
                    "error": format!("this stream fell behind this member's history of changes, which now starts at revision {}: list the keys again and watch from the list's revision + 1", start + 1),
                });
                let _ = tx.send(Ok(json_chunk(&line))).await;
                return;
            }
            Ok(batch) => {
                position = batch.position;
                if !batch.events.is_empty() {
                    // Chunks of about WATCH_CHUNK_BYTES: what a slow client's queue
                    // holds stays bounded by bytes, not only by changes.
                    let mut buf = Vec::new();
                    for (i, e) in batch.events.iter().enumerate() {
                        let (kind, mut line) = match e.value() {
                            Some(v) => ("put", value_json(e.key(), &v.data, v.revision)),
                            None => ("delete", json!({ "key": e.key(), "revision": e.revision() })),
                        };
                        line["type"] = json!(kind);
                        if let Some(p) = e.prev().filter(|_| prev) {
                            let mut old = value_json(e.key(), &p.data, p.revision);
                            if let Some(o) = old.as_object_mut() {
                                o.remove("key");
                            }
                            line["prev"] = old;
                        }
                        buf.extend_from_slice(&crate::http::json_line(&line));
                        let full = buf.len() >= WATCH_CHUNK_BYTES || i + 1 == batch.events.len();
                        if full && tx.send(Ok(Bytes::from(std::mem::take(&mut buf)))).await.is_err() {
                            return;
                        }
                    }
                    last_sent = tokio::time::Instant::now();
                }
                if !batch.caught_up {
                    tokio::task::yield_now().await;
                    continue;
                }
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(last_sent + progress) => {
                if tx.send(Ok(json_chunk(&json!({ "type": "progress", "revision": position })))).await.is_err() {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
            _ = tx.closed() => return,
        }
    }
}

fn json_chunk(v: &Json) -> Bytes {
    Bytes::from(crate::http::json_line(v))
}

/// Bytes of a backup sent per chunk.
const BACKUP_CHUNK: usize = 256 << 10;
/// How long a backup waits for a client that reads nothing before it gives up on it.
const BACKUP_STALL: Duration = Duration::from_secs(60);

/// The one backup a member sends at a time (each holds a frozen copy of the state
/// machine and a blocking thread while it streams): taken, and given back on drop.
struct BackupSlot;

static BACKUP_RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl BackupSlot {
    fn take() -> Option<BackupSlot> {
        use std::sync::atomic::Ordering;
        BACKUP_RUNNING.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| BackupSlot)
    }
}

impl Drop for BackupSlot {
    fn drop(&mut self) {
        BACKUP_RUNNING.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Cuts what the backup writer writes into chunks for a [`ChannelBody`]; fails once the
/// client is gone, which stops the encoding.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
    /// The runtime the body is sent on (the writer runs on a blocking thread).
    rt: tokio::runtime::Handle,
    /// How long one chunk may wait for the client to take the previous ones.
    stall: Duration,
}

impl ChunkWriter {
    /// Sends the buffered bytes as one chunk. A client that takes nothing for
    /// `stall` is given up on (`TimedOut`): it would otherwise hold the member's one
    /// backup slot, and its frozen copy of the store, for as long as it keeps the
    /// connection open.
    fn send_buffered(&mut self) -> std::io::Result<()> {
        use tokio::sync::mpsc::error::SendTimeoutError;
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(BACKUP_CHUNK)));
        match self.rt.block_on(self.tx.send_timeout(Ok(chunk), self.stall)) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Closed(_)) => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client closed the connection")),
            Err(SendTimeoutError::Timeout(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s", self.stall.as_secs()),
            )),
        }
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BACKUP_CHUNK {
            self.send_buffered()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An outcome that does not belong to the command proposed (a bug), or an operation
/// this member does not know (it stops).
fn unexpected(outcome: ApplyOutcome) -> ApiError {
    match outcome {
        ApplyOutcome::UnknownOp { op } => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("this member does not know operation {op}")),
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected outcome {other:?}")),
    }
}

fn internal() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal lock poisoned")
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad("empty key"));
    }
    Ok(())
}

fn method_not_allowed(allowed: &[Method]) -> ApiError {
    let list = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
    let mut e = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("method not allowed; allowed: {list}"));
    e.allow = Some(list);
    e
}

fn value_json(key: &str, data: &[u8], revision: u64) -> Json {
    match std::str::from_utf8(data) {
        Ok(s) => json!({ "key": key, "value": s, "revision": revision }),
        Err(_) => json!({ "key": key, "value_base64": base64(data), "revision": revision }),
    }
}

/// Standard base64 (for values that are not UTF-8).
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn local_members(st: &NodeStatus) -> Vec<Json> {
    let mut ids: Vec<u64> = st.voters.iter().chain(st.learners.iter()).copied().collect();
    ids.sort_unstable();
    ids.iter()
        .map(|id| {
            let url = st.member_urls.iter().find(|(i, _)| i == id).map(|(_, u)| u.clone()).unwrap_or_default();
            json!({
                "id": id,
                "peer_url": url,
                "role": if st.voters.contains(id) { "voter" } else { "learner" },
                "is_leader": st.leader == *id,
            })
        })
        .collect()
}

/// The member list with the leader's progress (match index, reachability) when this
/// node is the leader; `null` for those fields otherwise.
pub fn members_json(st: &NodeStatus) -> Json {
    let mut members = local_members(st);
    for m in &mut members {
        let id = m.get("id").and_then(Json::as_u64).unwrap_or(0);
        let p = st.progress.iter().find(|p| p.id == id);
        m["match_index"] = p.map(|p| json!(p.match_index)).unwrap_or(Json::Null);
        m["reachable"] = p.map(|p| json!(p.recent_active)).unwrap_or(Json::Null);
        m["added_at"] = st.added_at.iter().find(|(m, _)| *m == id).map(|(_, i)| json!(i)).unwrap_or(Json::Null);
    }
    json!({
        "leader": st.leader,
        "term": st.term,
        "commit_index": st.commit_index,
        "conf_change_pending": st.conf_change_pending,
        "members": members,
    })
}

/// Whether a route changes membership or leadership (needs the admin token when one is
/// configured): raftexample's `POST`/`DELETE /<id>`, `POST /v1/members`,
/// `/v1/members/<id>[/promote]` and `/v1/leader/transfer`. Reads and key writes are not.
pub fn is_admin_route(method: &Method, path: &str) -> bool {
    match path {
        "/healthz" | "/readyz" | "/metrics" => false,
        "/v1/members" => method != Method::GET,
        "/v1/leader/transfer" => true,
        p if p.starts_with("/v1/members/") => true,
        p if p.starts_with("/v1/") || p == "/v1" => false,
        _ => method == Method::POST || method == Method::DELETE,
    }
}

/// The response refusing an admin request, if it must be refused.
fn admin_refusal(check: crate::auth::Check) -> Option<Resp> {
    use crate::auth::Check;
    match check {
        Check::Allowed => None,
        Check::Missing => {
            let mut r = error(StatusCode::UNAUTHORIZED, "unauthenticated", "this route needs the admin token: Authorization: Bearer <token>");
            r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer realm=\"raftkv\""));
            Some(r)
        }
        Check::Wrong => Some(error(StatusCode::FORBIDDEN, "permission_denied", "wrong admin token")),
    }
}

/// Whether `rest`, a path after `/v1/leases/` or `/v1/members/`, is `<id>` or
/// `<id>/<action>`.
fn id_route(rest: &str, action: &str) -> bool {
    rest.split_once('/').is_none_or(|(_, a)| a == action)
}

/// The index of the entry that last added member `id`, from the member list of the
/// member at peer URL `peer_url` (None: not known there, or no answer).
pub(crate) async fn member_added_at(cfg: &Config, peer_url: &str, id: u64) -> Option<u64> {
    let v = fetch_json(cfg, &format!("{}/members", peer_url.trim_end_matches('/'))).await.ok()?;
    v.get("members")?.as_array()?.iter().find(|m| m.get("id").and_then(Json::as_u64) == Some(id))?.get("added_at")?.as_u64()
}

async fn fetch_json(cfg: &Config, url: &str) -> Result<Json, ApiError> {
    let client = crate::transport::peer_client(cfg.peer_tls.as_ref());
    let req = HttpRequest::get(url).body(Full::new(Bytes::new())).map_err(|e| ApiError::bad(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(2), client.request(req))
        .await
        .map_err(|_| ApiError::unavailable("timeout", "leader did not answer"))?
        .map_err(|e| ApiError::unavailable("unavailable", e.to_string()))?;
    let body = resp.into_body().collect().await.map_err(|e| ApiError::unavailable("unavailable", e.to_string()))?.to_bytes();
    serde_json::from_slice(&body).map_err(|e| ApiError::unavailable("unavailable", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c").unwrap(), "a/b c");
        assert!(percent_decode("a%2").is_err());
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%ff").is_err());
        assert!(percent_decode("%+f").is_err(), "a sign is not a hex digit");
        assert!(percent_decode("%+4").is_err());
        assert_eq!(percent_decode("%e2%82%AC").unwrap(), "€");
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn member_ids() {
        assert_eq!(parse_member_id("4").unwrap(), 4);
        assert!(parse_member_id("0").is_err());
        assert!(parse_member_id("x").is_err());
        assert!(parse_member_id("").is_err());
    }

    #[test]
    fn admin_routes() {
        for (m, p) in [
            (Method::POST, "/4"),
            (Method::DELETE, "/4"),
            (Method::POST, "/v1/members"),
            (Method::DELETE, "/v1/members/4"),
            (Method::POST, "/v1/members/4/promote"),
            (Method::POST, "/v1/leader/transfer"),
            (Method::GET, "/v1/leader/transfer"),
        ] {
            assert!(is_admin_route(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::GET, "/k"),
            (Method::PUT, "/k"),
            (Method::GET, "/v1/members"),
            (Method::PUT, "/v1/kv/k"),
            (Method::DELETE, "/v1/kv/k"),
            (Method::GET, "/v1/status"),
            (Method::GET, "/v1/backup"),
            (Method::GET, "/v1/watch"),
            (Method::POST, "/v1/txn"),
            (Method::GET, "/healthz"),
            (Method::GET, "/readyz"),
            (Method::GET, "/metrics"),
        ] {
            assert!(!is_admin_route(&m, p), "{m} {p}");
        }
    }

    #[test]
    fn route_labels_are_bounded() {
        assert_eq!(route_label(&Method::GET, "/v1/kv/anything"), "v1_kv_get");
        assert_eq!(route_label(&Method::PUT, "/whatever"), "key_put");
        assert_eq!(route_label(&Method::PATCH, "/x"), "other");
        assert_eq!(route_label(&Method::PATCH, "/v1/kv/k"), "v1_kv_other");
        // `/v1` is a route (404), not a key: it must not count as a key read or write.
        assert_eq!(route_label(&Method::GET, "/v1"), "v1_unknown");
        assert_eq!(route_label(&Method::PUT, "/v1"), "v1_unknown");
        assert_eq!(route_label(&Method::GET, "/v1/backup"), "v1_backup");
        assert_eq!(route_label(&Method::POST, "/v1/txn"), "v1_txn");
        assert_eq!(route_label(&Method::DELETE, "/v1/kv"), "v1_kv_delete_prefix");
        assert_eq!(route_label(&Method::GET, "/v1/kv"), "v1_kv_list");
        assert_eq!(route_label(&Method::GET, "/v1/watch"), "v1_watch");
    }

    #[test]
    fn transactions_are_parsed_or_refused_with_the_reason() {
        let t = parse_txn(br#"{"compare":[{"key":"a","revision":0},{"key":"b","value":"x"},{"key":"c","value_base64":"AP8="}],
            "success":[{"op":"put","key":"a","value":"1"},{"op":"delete","key":"b"}],"failure":[{"op":"put","key":"z","value_base64":"AA=="}]}"#)
        .unwrap();
        assert_eq!(t.compare.len(), 3);
        assert_eq!((t.compare[0].revision, t.compare[0].value.as_deref()), (Some(0), None));
        assert_eq!(t.compare[1].value.as_deref(), Some(&b"x"[..]));
        assert_eq!(t.compare[2].value.as_deref(), Some(&[0u8, 0xff][..]));
        assert_eq!((t.success[0].op, t.success[1].op), (OpType::Put as i32, OpType::Delete as i32));
        assert_eq!(t.failure[0].value, [0u8]);
        assert_eq!(parse_txn(b"{}").unwrap(), Txn::default(), "an empty transaction is a (linearizable) no-op");
        // A put with a lease attaches its key (a kind of its own in the log).
        let t = parse_txn(br#"{"success":[{"op":"put","key":"lock","value":"me","lease":7},{"op":"put","key":"x","value":"1"}]}"#).unwrap();
        assert_eq!((t.success[0].op, t.success[0].lease), (OpType::LeasedPut as i32, 7));
        assert_eq!((t.success[1].op, t.success[1].lease), (OpType::Put as i32, 0));
        for bad in [r#"{"success":[{"op":"put","key":"k","value":"v","lease":0}]}"#, r#"{"success":[{"op":"put","key":"k","value":"v","lease":"7"}]}"#, r#"{"success":[{"op":"delete","key":"k","lease":7}]}"#] {
            assert_eq!(parse_txn(bad.as_bytes()).unwrap_err().status, StatusCode::BAD_REQUEST, "{bad}");
        }
        // Gets: any number of times, also of a key the branch writes (before or after).
        let t = parse_txn(br#"{"failure":[{"op":"get","key":"a"},{"op":"put","key":"a","value":"1"},{"op":"get","key":"a"}]}"#).unwrap();
        assert_eq!(t.failure.iter().map(|o| o.op).collect::<Vec<_>>(), [OpType::Get as i32, OpType::Put as i32, OpType::Get as i32]);
        let too_many = format!(r#"{{"success":[{}]}}"#, (0..=TXN_MAX_OPS).map(|i| format!(r#"{{"op":"delete","key":"k{i}"}}"#)).collect::<Vec<_>>().join(","));
        for (body, why) in [
            (&b"nope"[..], "JSON"),
            (b"[]", "object"),
            (br#"{"compares":[]}"#, "unknown field"),
            (br#"{"compare":{}}"#, "array"),
            (br#"{"compare":[{"key":"a"}]}"#, "revision or a value"),
            (br#"{"compare":[{"key":"","revision":1}]}"#, "non-empty"),
            (br#"{"compare":[{"key":"a","revision":-1}]}"#, "non-negative"),
            (br#"{"compare":[{"key":"a","value":"x","value_base64":"eA=="}]}"#, "not both"),
            (br#"{"compare":[{"key":"a","value_base64":"!!"}]}"#, "base64"),
            (br#"{"success":[{"op":"range","key":"a"}]}"#, "\"put\", \"delete\" or \"get\""),
            (br#"{"success":[{"op":"get","key":"a","value":"x"}]}"#, "unknown field"),
            (br#"{"success":[{"op":"get","key":""}]}"#, "non-empty"),
            (br#"{"success":[{"op":"put","key":"a"}]}"#, "needs a value"),
            (br#"{"success":[{"op":"delete","key":"a","value":"x"}]}"#, "unknown field"),
            (br#"{"failure":[{"op":"delete","key":"a"},{"op":"put","key":"a","value":""}]}"#, "written twice"),
            (too_many.as_bytes(), "more than 128"),
        ] {
            let e = parse_txn(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(why), "{}: {}", String::from_utf8_lossy(body), e.message);
        }
    }

    #[test]
    fn a_backup_writer_gives_up_on_a_client_that_reads_nothing() {
        use std::io::Write as _;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build().expect("runtime");
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let stall = Duration::from_millis(200);
        let mut w = ChunkWriter { tx, buf: Vec::new(), rt: rt.handle().clone(), stall };
        w.write_all(&vec![1u8; BACKUP_CHUNK]).expect("the first chunk fits the queue");
        let started = std::time::Instant::now();
        let e = w.write_all(&vec![2u8; BACKUP_CHUNK]).expect_err("nobody reads");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() >= stall, "gave up after {:?}", started.elapsed());
        // A client that reads gets each chunk whole, in order.
        assert_eq!(rx.try_recv().expect("first chunk").expect("data")[0], 1);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(c) = rx.blocking_recv() {
                got.push(c.expect("data")[0]);
            }
            got
        });
        for b in 3..6u8 {
            w.write_all(&vec![b; BACKUP_CHUNK]).expect("a reading client keeps up");
        }
        drop(w);
        assert_eq!(reader.join().expect("reader"), [3, 4, 5]);
        // A client gone: the writer stops at once.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let mut w = ChunkWriter { tx, buf: Vec::new(), rt: rt.handle().clone(), stall: Duration::from_secs(60) };
        let e = w.write_all(&vec![0u8; BACKUP_CHUNK]).expect_err("closed");
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn one_backup_at_a_time_and_the_slot_comes_back() {
        let first = BackupSlot::take().expect("free at first");
        assert!(BackupSlot::take().is_none(), "a second backup while one runs");
        drop(first);
        assert!(BackupSlot::take().is_some(), "free again once the first is done");
    }

    /// An `Api` of member 1, leader of voters 1-3, whose raft loop is `answer`, called
    /// with each membership change's number (1, 2, ...) and the status to change.
    fn api_with_fake_loop(
        answer: impl Fn(u32, &StatusCell) -> Result<ConfState, ProposeError> + Send + 'static,
    ) -> (Api, std::thread::JoinHandle<u32>) {
        api_with_fake_loop_and(&[], answer, |_| Err(ProposeError::NoLeader))
    }

    /// As [`api_with_fake_loop`], with extra flags, and `write` answering client writes.
    fn api_with_fake_loop_and(
        flags: &[&str],
        answer: impl Fn(u32, &StatusCell) -> Result<ConfState, ProposeError> + Send + 'static,
        write: impl Fn(u64) -> Result<ApplyOutcome, ProposeError> + Send + 'static,
    ) -> (Api, std::thread::JoinHandle<u32>) {
        use clap::Parser as _;
        let mut args = vec!["raftkv-node", "--id", "1", "--cluster", "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3"];
        args.extend_from_slice(flags);
        let cfg = crate::config::Args::try_parse_from(args).expect("args").into_config().expect("config");
        let st = NodeStatus {
            id: 1,
            leader: 1,
            term: 2,
            role: "leader",
            voters: vec![1, 2, 3],
            member_urls: (1..=3u64).map(|i| (i, format!("http://127.0.0.1:{i}"))).collect(),
            ..NodeStatus::default()
        };
        let status: StatusCell = Arc::new(RwLock::new(Arc::new(st)));
        let (tx, rx) = std::sync::mpsc::channel();
        let api = Api {
            cfg: Arc::new(cfg),
            raft: RaftHandle::from_sender(tx),
            status: status.clone(),
            kv: Arc::new(RwLock::new(KvStore::new())),
            watch: WatchHub::new(0, 10),
            transport: None,
        };
        let fake = std::thread::spawn(move || {
            let mut proposed = 0;
            while let Ok(req) = rx.recv_timeout(Duration::from_secs(10)) {
                match req {
                    Request::ConfChange { reply, .. } => {
                        proposed += 1;
                        let _ = reply.send(answer(proposed, &status));
                    }
                    Request::Propose { request_id, reply, .. } => {
                        let _ = reply.send(write(request_id));
                    }
                    _ => {}
                }
            }
            proposed
        });
        (api, fake)
    }

    #[tokio::test]
    async fn a_retried_membership_change_runs_its_checks_again() {
        // The first change is dropped unappended while another one (voter 4 at another
        // URL) is applied; any later one would be taken.
        let (api, fake) = api_with_fake_loop(|n, status| {
            if n > 1 {
                return Ok(ConfState::default());
            }
            let mut s = (**status.read().expect("status")).clone();
            s.voters.push(4);
            s.member_urls.push((4, "http://127.0.0.1:9".into()));
            *status.write().expect("status") = Arc::new(s);
            Err(ProposeError::Dropped)
        });
        let err = api.add_member(4, "http://127.0.0.1:8".into(), true).await.expect_err("member 4 exists by now");
        assert_eq!((err.status, err.code), (StatusCode::CONFLICT, "member_exists"), "{}", err.message);
        drop(api);
        assert_eq!(fake.join().expect("fake loop"), 1, "proposed once: the retry stopped at its checks");
    }

    #[tokio::test]
    async fn a_change_a_new_leader_is_not_ready_for_is_proposed_again() {
        let (api, fake) = api_with_fake_loop(|n, _| if n < 3 { Err(ProposeError::LeaderNotReady) } else { Ok(ConfState::default()) });
        let (created, _) = api.add_member(4, "http://127.0.0.1:8".into(), true).await.expect("added once the leader is ready");
        assert!(created);
        drop(api);
        assert_eq!(fake.join().expect("fake loop"), 3);
    }

    #[tokio::test]
    async fn a_change_refused_as_in_progress_is_409_at_once() {
        let (api, fake) = api_with_fake_loop(|_, _| Err(ProposeError::ConfChangeInProgress));
        let err = api.remove_member(3).await.expect_err("refused");
        assert_eq!((err.status, err.code), (StatusCode::CONFLICT, "change_in_progress"));
        drop(api);
        assert_eq!(fake.join().expect("fake loop"), 1, "not retried");
    }

    #[tokio::test]
    async fn a_promotion_with_the_largest_lag_bound_does_not_overflow() {
        // --promote-max-lag u64::MAX: any learner with a match index is promotable (the
        // check `match + lag >= commit` overflowed).
        let (api, fake) =
            api_with_fake_loop_and(&["--promote-max-lag", "18446744073709551615"], |_, _| Ok(ConfState::default()), |_| Err(ProposeError::NoLeader));
        {
            let mut s = (**api.status.read().expect("status")).clone();
            s.learners = vec![4];
            s.member_urls.push((4, "http://127.0.0.1:4".into()));
            s.commit_index = 100;
            s.progress = vec![crate::raft_loop::PeerProgress { id: 4, match_index: 5, recent_active: true }];
            *api.status.write().expect("status") = Arc::new(s);
        }
        let r = api.promote(4).await.map_err(|e| e.message).expect("promoted");
        assert_eq!(r.status(), StatusCode::OK);
        drop(api);
        assert_eq!(fake.join().expect("fake loop"), 1);
    }

    #[tokio::test]
    async fn a_write_failed_by_a_stopping_node_says_whether_its_outcome_is_known() {
        // Proposed when the node stopped, then not.
        let (api, fake) = api_with_fake_loop_and(&[], |_, _| Ok(ConfState::default()), |_| Err(ProposeError::Stopping { proposed: true }));
        let err = api.write(OpType::Put, "k".into(), b"v".to_vec(), None).await.expect_err("stopping");
        assert_eq!((err.status, err.code), (StatusCode::SERVICE_UNAVAILABLE, "stopping"));
        assert!(err.message.contains("outcome unknown"), "{}", err.message);
        drop(api);
        fake.join().expect("fake loop");
        let (api, fake) = api_with_fake_loop_and(&[], |_, _| Ok(ConfState::default()), |_| Err(ProposeError::Stopping { proposed: false }));
        let err = api.write(OpType::Put, "k".into(), b"v".to_vec(), None).await.expect_err("stopping");
        assert!(err.message.contains("not proposed"), "{}", err.message);
        drop(api);
        fake.join().expect("fake loop");
    }
}
