//! Command-line flags and environment variables, validated into a [`Config`].
//!
//! raftexample's flags (`--id`, `--cluster`, `--port`, `--join`) work unchanged, also in
//! Go's single-dash spelling (`-id 1`). Every flag has a `RAFTKV_*` environment variable
//! for Kubernetes. Bad flags print a clear message and exit with code 2 (clap's usage
//! error code), before anything touches the data directory.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use clap::Parser;

use crate::auth::AdminToken;
use crate::tls::{ClientAuth, PeerTls, ServerFiles};

/// Raw flags as parsed by clap. Use [`Args::into_config`] to validate them.
#[derive(Debug, Parser)]
#[command(name = "raftkv-node", version, about = "A replicated key-value store node (raft).")]
pub struct Args {
    /// Raft id of this node (1-based: node N listens on entry N of --cluster).
    #[arg(long, env = "RAFTKV_ID")]
    pub id: Option<u64>,
    /// Take the id from $HOSTNAME's trailing ordinal plus one (StatefulSet pods: `kv-0` -> 1).
    #[arg(long, env = "RAFTKV_ID_FROM_HOSTNAME", num_args = 0..=1, default_missing_value = "true")]
    pub id_from_hostname: Option<bool>,
    /// Comma-separated peer URLs of the initial members, in id order.
    #[arg(long, env = "RAFTKV_CLUSTER", default_value = "http://127.0.0.1:9021")]
    pub cluster: String,
    /// Client API port (listens on all interfaces, as raftexample does).
    #[arg(long, env = "RAFTKV_PORT", default_value_t = 9121)]
    pub port: u16,
    /// Join an existing cluster: start empty and wait to be added as a member.
    #[arg(long, env = "RAFTKV_JOIN", num_args = 0..=1, default_missing_value = "true")]
    pub join: Option<bool>,
    /// Data directory (write-ahead log, snapshots). Default: `raftkv-<id>`.
    #[arg(long, env = "RAFTKV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Start a new cluster from this backup file (`GET /v1/backup`) when the data
    /// directory is new: every initial member must be given the same file. Ignored once
    /// the data directory was restored from it; refused when it holds other data.
    #[arg(long, env = "RAFTKV_RESTORE_FROM")]
    pub restore_from: Option<PathBuf>,
    /// With --restore-from: start the new cluster's revisions this far beyond the
    /// backup's (as etcdutl's --bump-revision, with --mark-compacted), so that no
    /// revision the lost cluster handed out after the backup names another change;
    /// watches from before are told `compacted`. Every initial member must be given the
    /// same value. At most 10^12.
    #[arg(long, env = "RAFTKV_RESTORE_BUMP_REVISION", default_value_t = 0)]
    pub restore_bump_revision: u64,
    /// Applied entries between two snapshots (then the log is compacted).
    #[arg(long, env = "RAFTKV_SNAPSHOT_COUNT", default_value_t = 10_000)]
    pub snapshot_count: u64,
    /// Largest accepted client request body, in bytes (etcd's default, 1.5 MiB).
    #[arg(long, env = "RAFTKV_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: usize,
    /// This node's advertised peer URL (default: entry `<id>` of `--cluster`).
    #[arg(long, env = "RAFTKV_PEER_URL")]
    pub peer_url: Option<String>,
    /// Address the peer listener binds (default: host:port of the peer URL, or
    /// 0.0.0.0:port when the host is a name).
    #[arg(long, env = "RAFTKV_LISTEN_PEER_ADDR")]
    pub listen_peer_addr: Option<SocketAddr>,
    /// Address the client listener binds (default `0.0.0.0:<port>`).
    #[arg(long, env = "RAFTKV_LISTEN_CLIENT_ADDR")]
    pub listen_client_addr: Option<SocketAddr>,
    /// How long a request may wait for a leader, a quorum or its commit, in milliseconds.
    #[arg(long, env = "RAFTKV_REQUEST_TIMEOUT_MS", default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// How long a client may take to send a request body, in milliseconds (then 408).
    #[arg(long, env = "RAFTKV_REQUEST_BODY_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_body_timeout_ms: u64,
    /// Raft tick interval in milliseconds (election timeout is 10 ticks, heartbeat 1).
    #[arg(long, env = "RAFTKV_TICK_MS", default_value_t = 100)]
    pub tick_ms: u64,
    /// A learner is promotable when its match index is at most this far behind the commit index.
    #[arg(long, env = "RAFTKV_PROMOTE_MAX_LAG", default_value_t = 1_000)]
    pub promote_max_lag: u64,
    /// Worker threads of the HTTP runtime (client and peer listeners, peer senders).
    /// Raft, fsync and snapshots have threads of their own; one worker avoids
    /// cross-thread wake-ups and measured fastest on 2 cores. Raise it for heavy
    /// serializable-read loads on many cores.
    #[arg(long, env = "RAFTKV_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Recent changes (puts and deletes) kept in memory for watchers, who can start
    /// from any revision they cover (1 to 1000000; also at most 64 MiB of keys and values).
    #[arg(long, env = "RAFTKV_WATCH_HISTORY", default_value_t = crate::watch::DEFAULT_HISTORY)]
    pub watch_history: usize,
    /// Keep, in the watch history, the value each put replaced, so that watches may ask
    /// for it (`prev_kv=true`; a delete's is always there). Costs memory: the history
    /// then holds the replaced values too.
    #[arg(long, env = "RAFTKV_WATCH_PREV_KV", num_args = 0..=1, default_missing_value = "true")]
    pub watch_prev_kv: Option<bool>,
    /// Client listener TLS certificate chain (PEM). With --key-file, clients must use https.
    #[arg(long, env = "RAFTKV_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// Client listener TLS private key (PEM).
    #[arg(long, env = "RAFTKV_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// CA bundle (PEM) for client certificates on the client listener.
    #[arg(long, env = "RAFTKV_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require client certificates signed by --trusted-ca-file on the client listener.
    #[arg(long, env = "RAFTKV_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: Option<bool>,
    /// Peer TLS certificate (PEM), presented by the peer listener and the peer client.
    #[arg(long, env = "RAFTKV_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// Peer TLS private key (PEM).
    #[arg(long, env = "RAFTKV_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// Peer CA bundle (PEM): peers must present certificates it signed (mutual TLS).
    #[arg(long, env = "RAFTKV_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// File holding the admin bearer token for membership and leadership routes
    /// (required with client TLS).
    #[arg(long, env = "RAFTKV_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Mixed into the cluster id a new cluster gets at bootstrap (etcd's flag): give
    /// clusters with the same --cluster URLs different tokens. Ignored once bootstrapped
    /// and when joining.
    #[arg(long, env = "RAFTKV_INITIAL_CLUSTER_TOKEN", default_value = "raftkv-cluster")]
    pub initial_cluster_token: String,
}

/// Validated configuration of one node.
#[derive(Debug, Clone)]
pub struct Config {
    /// Raft id (never 0).
    pub id: u64,
    /// Initial members: (id, peer URL), ids 1..=n in order.
    pub initial_members: Vec<(u64, String)>,
    /// The id a cluster bootstrapped from this configuration gets: [`cluster_id`] of
    /// the initial members and `--initial-cluster-token`.
    pub initial_cluster_id: u64,
    /// This node's advertised peer URL.
    pub peer_url: String,
    /// Whether a fresh node waits to be added instead of bootstrapping.
    pub join: bool,
    /// A backup a new cluster starts from (`--restore-from`; never with `join`).
    pub restore_from: Option<PathBuf>,
    /// How far beyond the backup's the restored cluster's revisions start
    /// (`--restore-bump-revision`; 0 without `restore_from`).
    pub restore_bump_revision: u64,
    /// `--initial-cluster-token`: the cluster id of a restored cluster mixes it with
    /// the backup's checksum ([`restored_cluster_id`]).
    pub initial_cluster_token: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Applied entries between snapshots.
    pub snapshot_count: u64,
    /// Largest client request body.
    pub max_request_bytes: usize,
    /// Peer listener address.
    pub listen_peer_addr: SocketAddr,
    /// Client listener address.
    pub listen_client_addr: SocketAddr,
    /// Bound on waiting for leader/quorum/commit.
    pub request_timeout: Duration,
    /// Bound on receiving a request body.
    pub request_body_timeout: Duration,
    /// Raft tick interval.
    pub tick: Duration,
    /// Promotion lag bound for learners.
    pub promote_max_lag: u64,
    /// Worker threads of the HTTP runtime.
    pub worker_threads: usize,
    /// Changes kept for watchers.
    pub watch_history: usize,
    /// Whether the watch history keeps the values puts replaced.
    pub watch_prev_kv: bool,
    /// TLS for the client listener (`None`: plaintext).
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    /// Mutual TLS between peers (`None`: plaintext peer traffic).
    pub peer_tls: Option<PeerTls>,
    /// Bearer token the membership and leadership routes require (`None`: open).
    pub admin_token: Option<AdminToken>,
}

/// The id of a cluster bootstrapped with `members` and `token`, as etcd derives its
/// cluster id from the initial members and `--initial-cluster-token`: every initial
/// member computes the same one alone, and clusters that differ in either get different
/// ones. FNV-1a (64-bit) of the token and each `id=url`, never 0 (0 means "not known").
/// A URL counts as its scheme, host and port (so `http://A:1/` is `http://a:1`).
/// Peers send it with every raft message, so a node of another cluster is refused.
pub fn cluster_id(members: &[(u64, String)], token: &str) -> u64 {
    // Not [`canonical_peer_url`]: this spelling (an IPv6 host without brackets) is part
    // of every existing cluster's id and must not change.
    let canonical = |url: &str| match parse_peer_url(url) {
        Ok((host, port)) => {
            let scheme = if url.starts_with("https://") { "https" } else { "http" };
            format!("{scheme}://{}:{port}", host.to_ascii_lowercase())
        }
        Err(_) => url.to_string(),
    };
    let mut sorted: Vec<(u64, String)> = members.iter().map(|(id, url)| (*id, canonical(url))).collect();
    sorted.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(token.as_bytes());
    for (id, url) in sorted {
        feed(b"\n");
        feed(format!("{id}={url}").as_bytes());
    }
    h.max(1)
}

/// The id of a cluster restored from a backup with checksum `crc` taken at
/// `applied_index`: [`cluster_id`] with both mixed into the token, so that members
/// restored from different backups (or the old cluster, at the same URLs) refuse each
/// other's messages instead of mixing two histories.
pub fn restored_cluster_id(members: &[(u64, String)], token: &str, crc: u32, applied_index: u64) -> u64 {
    cluster_id(members, &format!("{token}\nrestored from backup {crc:08x} at {applied_index}"))
}

/// A flag value that does not make sense.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Largest `--max-request-bytes` (32 MiB): a raft entry holding one such request still
/// fits a peer stream frame (64 MiB) and goes to a follower in one message well within
/// the peer request timeout (etcd's own limit is 1.5 MiB by default, 10 MiB advised).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// Largest request and body timeout (an hour): far past any use, and far from the
/// overflow of a deadline computed from it.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Rewrites Go-style single-dash long flags (`-id 1`, `-cluster=...`) to `--id`, so
/// raftexample command lines work unchanged.
pub fn normalize_go_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    const LONG: &[&str] = &["id", "cluster", "port", "join"];
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            if i > 0 && a.starts_with('-') && !a.starts_with("--") {
                let name = a[1..].split('=').next().unwrap_or("");
                if LONG.contains(&name) {
                    return format!("-{a}");
                }
            }
            a
        })
        .collect()
}

/// Parses a peer URL: `http://host:port` (https when TLS is configured). Returns host and port.
pub fn parse_peer_url(url: &str) -> Result<(String, u16), ConfigError> {
    let rest = match url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) {
        Some(r) => r,
        None => return err(format!("peer URL {url:?} must start with http:// or https://")),
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') || hostport.contains('?') || hostport.contains('@') {
        return err(format!("peer URL {url:?} must be scheme://host:port with no path"));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p),
        None => return err(format!("peer URL {url:?} has no port")),
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => return err(format!("peer URL {url:?} has a bad port")),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
        return err(format!("peer URL {url:?} has a bad host"));
    }
    Ok((host.to_string(), port))
}

/// A peer URL in one spelling: lowercase scheme and host, the port as a plain number,
/// no trailing slash (`HTTP://Node-1:02380/` is `http://node-1:2380`). Two spellings of
/// one address compare equal only in this form.
pub fn canonical_peer_url(url: &str) -> Result<String, ConfigError> {
    let (host, port) = parse_peer_url(&url.to_ascii_lowercase())?;
    let scheme = if url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")) { "https" } else { "http" };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    Ok(format!("{scheme}://{host}:{port}"))
}

/// The largest `--restore-bump-revision` (etcd suggests 10^9 for a Kubernetes store).
pub const MAX_RESTORE_BUMP: u64 = 1_000_000_000_000;

fn ordinal_from_hostname(hostname: &str) -> Result<u64, ConfigError> {
    let digits: String = hostname.rsplit('-').next().unwrap_or("").to_string();
    match digits.parse::<u64>() {
        Ok(n) if n < u64::MAX => Ok(n + 1),
        Ok(_) => err(format!("--id-from-hostname: the ordinal of {hostname:?} is too large")),
        Err(_) => err(format!("--id-from-hostname: hostname {hostname:?} has no trailing -<ordinal>")),
    }
}

impl Args {
    /// Validates the flags into a [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let id = match (self.id, self.id_from_hostname.unwrap_or(false)) {
            (Some(id), false) => id,
            (None, true) | (Some(_), true) => {
                let host = std::env::var("HOSTNAME")
                    .ok()
                    .filter(|h| !h.is_empty())
                    .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
                    .unwrap_or_default();
                ordinal_from_hostname(&host)?
            }
            (None, false) => 1,
        };
        if id == 0 {
            return err("--id must be 1 or more");
        }
        let urls: Vec<String> = self
            .cluster
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if urls.is_empty() {
            return err("--cluster must list at least one peer URL");
        }
        for u in &urls {
            parse_peer_url(u)?;
        }
        // One address in two spellings (`http://h:1` and `http://H:01/`) is one member:
        // listed twice, a member that should exist never would.
        let mut seen = std::collections::HashMap::new();
        for u in &urls {
            if let Some(first) = seen.insert(canonical_peer_url(u)?, u) {
                return err(format!("--cluster lists one address twice ({first} and {u})"));
            }
        }
        let join_flag = self.join.unwrap_or(false);
        let peer_url = match self.peer_url.clone() {
            Some(u) => {
                parse_peer_url(&u)?;
                // An initial member is reached at its --cluster entry: advertising
                // another address (as etcd refuses too) leaves it unreachable, or on
                // another member's port. Listening elsewhere is --listen-peer-addr's job.
                if let Some(entry) = urls.get((id - 1) as usize).filter(|_| !join_flag) {
                    if canonical_peer_url(entry)? != canonical_peer_url(&u)? {
                        return err(format!(
                            "--peer-url {u} is not this member's --cluster entry ({entry}, entry {id}); give the same address, or --listen-peer-addr to listen on another"
                        ));
                    }
                }
                u
            }
            None => match urls.get((id - 1) as usize) {
                Some(u) => u.clone(),
                None => {
                    return err(format!(
                        "--id {id} has no entry in --cluster ({} URLs); give --peer-url",
                        urls.len()
                    ))
                }
            },
        };
        let join = join_flag || id as usize > urls.len();
        let (host, port) = parse_peer_url(&peer_url)?;
        let listen_peer_addr = match self.listen_peer_addr {
            Some(a) => a,
            None => match host.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, port),
                Err(_) if host == "localhost" => SocketAddr::from(([127, 0, 0, 1], port)),
                Err(_) => SocketAddr::from(([0, 0, 0, 0], port)),
            },
        };
        let listen_client_addr =
            self.listen_client_addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], self.port)));
        if listen_client_addr.port() == listen_peer_addr.port()
            && (listen_client_addr.ip() == listen_peer_addr.ip()
                || listen_client_addr.ip().is_unspecified()
                || listen_peer_addr.ip().is_unspecified())
        {
            return err(format!("client port {} is also the peer port", listen_client_addr.port()));
        }
        if self.snapshot_count == 0 {
            return err("--snapshot-count must be 1 or more");
        }
        if !(1024..=MAX_REQUEST_BYTES).contains(&self.max_request_bytes) {
            return err(format!("--max-request-bytes must be between 1024 and {MAX_REQUEST_BYTES} (32 MiB)"));
        }
        if !(100..=MAX_TIMEOUT_MS).contains(&self.request_timeout_ms) {
            return err(format!("--request-timeout-ms must be between 100 and {MAX_TIMEOUT_MS}"));
        }
        if !(100..=MAX_TIMEOUT_MS).contains(&self.request_body_timeout_ms) {
            return err(format!("--request-body-timeout-ms must be between 100 and {MAX_TIMEOUT_MS}"));
        }
        if self.tick_ms == 0 || self.tick_ms > 10_000 {
            return err("--tick-ms must be between 1 and 10000");
        }
        if self.watch_history == 0 || self.watch_history > 1_000_000 {
            return err("--watch-history must be 1 to 1000000 (a stream keeps up only while it reads changes before that many more are applied)");
        }
        if self.worker_threads == 0 || self.worker_threads > 1024 {
            return err("--worker-threads must be between 1 and 1024");
        }
        let security = Security::load(&self, &urls, &peer_url)?;
        if self.initial_cluster_token.is_empty() || self.initial_cluster_token.len() > 256 {
            return err("--initial-cluster-token must be 1 to 256 bytes");
        }
        if self.restore_from.is_some() && join {
            return err("--restore-from starts a new cluster from a backup; a joining member (--join, or an id beyond --cluster) gets its state from the leader instead");
        }
        if self.restore_bump_revision > 0 && self.restore_from.is_none() {
            return err("--restore-bump-revision applies to a restore: give --restore-from too");
        }
        if self.restore_bump_revision > MAX_RESTORE_BUMP {
            return err(format!("--restore-bump-revision must be at most {MAX_RESTORE_BUMP}"));
        }
        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from(format!("raftkv-{id}")));
        let initial_members: Vec<(u64, String)> = urls.iter().enumerate().map(|(i, u)| (i as u64 + 1, u.clone())).collect();
        Ok(Config {
            id,
            initial_cluster_id: cluster_id(&initial_members, &self.initial_cluster_token),
            initial_members,
            peer_url,
            join,
            restore_from: self.restore_from,
            restore_bump_revision: self.restore_bump_revision,
            initial_cluster_token: self.initial_cluster_token,
            data_dir,
            snapshot_count: self.snapshot_count,
            max_request_bytes: self.max_request_bytes,
            listen_peer_addr,
            listen_client_addr,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            request_body_timeout: Duration::from_millis(self.request_body_timeout_ms),
            tick: Duration::from_millis(self.tick_ms),
            promote_max_lag: self.promote_max_lag,
            worker_threads: self.worker_threads,
            watch_history: self.watch_history,
            watch_prev_kv: self.watch_prev_kv.unwrap_or(false),
            client_tls: security.client_tls,
            peer_tls: security.peer_tls,
            admin_token: security.admin_token,
        })
    }
}

/// Checks that a peer URL's scheme fits the peer transport: `https://` exactly when
/// peer TLS is configured.
pub fn check_peer_scheme(url: &str, peer_tls: bool) -> Result<(), ConfigError> {
    match (url.starts_with("https://"), peer_tls) {
        (true, true) | (false, false) => Ok(()),
        (true, false) => err(format!(
            "peer URL {url} is https:// but peer TLS is not configured (give --peer-cert-file, --peer-key-file and --peer-trusted-ca-file)"
        )),
        (false, true) => err(format!("peer URL {url} must be https:// when peer TLS is configured")),
    }
}

/// The TLS and credential part of the configuration, loaded from its files.
struct Security {
    client_tls: Option<Arc<rustls::ServerConfig>>,
    peer_tls: Option<PeerTls>,
    admin_token: Option<AdminToken>,
}

impl Security {
    fn load(a: &Args, urls: &[String], peer_url: &str) -> Result<Security, ConfigError> {
        let cert_auth = a.client_cert_auth.unwrap_or(false);
        let client_tls = match (&a.cert_file, &a.key_file) {
            (Some(cert), Some(key)) => {
                if cert_auth && a.trusted_ca_file.is_none() {
                    return err("--client-cert-auth needs --trusted-ca-file (the CA that signs client certificates)");
                }
                let auth = match (cert_auth, a.trusted_ca_file.is_some()) {
                    (true, _) => ClientAuth::Required,
                    (false, true) => ClientAuth::Optional,
                    (false, false) => ClientAuth::None,
                };
                let files = ServerFiles {
                    flags: ("--cert-file", "--key-file", "--trusted-ca-file"),
                    cert,
                    key,
                    ca: a.trusted_ca_file.as_deref(),
                    auth,
                };
                Some(crate::tls::server_config(&files).map_err(|e| ConfigError(e.to_string()))?)
            }
            (None, None) => {
                if cert_auth || a.trusted_ca_file.is_some() {
                    return err("--trusted-ca-file and --client-cert-auth need client TLS (--cert-file and --key-file)");
                }
                None
            }
            (Some(_), None) => return err("--cert-file needs --key-file"),
            (None, Some(_)) => return err("--key-file needs --cert-file"),
        };
        let peer_tls = match (&a.peer_cert_file, &a.peer_key_file, &a.peer_trusted_ca_file) {
            (Some(cert), Some(key), Some(ca)) => {
                Some(crate::tls::peer_tls(cert, key, ca).map_err(|e| ConfigError(e.to_string()))?)
            }
            (None, None, None) => None,
            (c, k, ca) => {
                let missing: Vec<&str> = [
                    (c.is_none(), "--peer-cert-file"),
                    (k.is_none(), "--peer-key-file"),
                    (ca.is_none(), "--peer-trusted-ca-file"),
                ]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, f)| *f)
                .collect();
                return err(format!(
                    "peer TLS is mutual and needs --peer-cert-file, --peer-key-file and --peer-trusted-ca-file; missing {}",
                    missing.join(", ")
                ));
            }
        };
        for u in urls.iter().map(String::as_str).chain(std::iter::once(peer_url)) {
            check_peer_scheme(u, peer_tls.is_some())?;
        }
        let admin_token = match &a.admin_token_file {
            Some(p) => Some(AdminToken::from_file(p).map_err(|e| ConfigError(e.to_string()))?),
            None if client_tls.is_some() => {
                return err("client TLS (--cert-file) needs --admin-token-file: the membership and leadership routes require the admin token when TLS is on")
            }
            None => None,
        };
        Ok(Security { client_tls, peer_tls, admin_token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let argv = normalize_go_flags(std::iter::once("raftkv-node".to_string()).chain(args.iter().map(|s| s.to_string())));
        let a = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        a.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn raftexample_command_line_works() {
        let c = parse(&["--id", "2", "--cluster", "http://127.0.0.1:12379,http://127.0.0.1:22379,http://127.0.0.1:32379", "--port", "22380"]).unwrap();
        assert_eq!(c.id, 2);
        assert_eq!(c.peer_url, "http://127.0.0.1:22379");
        assert_eq!(c.listen_peer_addr, "127.0.0.1:22379".parse().unwrap());
        assert_eq!(c.listen_client_addr.port(), 22380);
        assert!(!c.join);
        assert_eq!(c.data_dir, PathBuf::from("raftkv-2"));
    }

    #[test]
    fn the_cluster_id_depends_on_the_members_and_the_token_only() {
        let urls = "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3";
        let id_of = |args: &[&str]| parse(args).unwrap().initial_cluster_id;
        let one = id_of(&["--id", "1", "--cluster", urls]);
        assert_ne!(one, 0);
        assert_eq!(id_of(&["--id", "3", "--cluster", urls, "--port", "7"]), one, "the same for every initial member");
        assert_ne!(id_of(&["--id", "1", "--cluster", urls, "--initial-cluster-token", "other"]), one, "another token");
        assert_ne!(id_of(&["--id", "1", "--cluster", "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:4"]), one, "another member");
        let m = |v: &[(u64, &str)]| v.iter().map(|(i, u)| (*i, u.to_string())).collect::<Vec<_>>();
        assert_eq!(cluster_id(&m(&[(1, "a"), (2, "b")]), "t"), cluster_id(&m(&[(2, "b"), (1, "a")]), "t"), "order does not matter");
        assert_ne!(cluster_id(&m(&[(1, "b"), (2, "a")]), "t"), cluster_id(&m(&[(1, "a"), (2, "b")]), "t"), "ids do");
        let spelled = |u: &str| cluster_id(&m(&[(1, u)]), "t");
        assert_eq!(spelled("http://Node-1.example:80/"), spelled("http://node-1.example:80"), "spelling does not matter");
        assert_ne!(spelled("https://node-1.example:80"), spelled("http://node-1.example:80"), "the scheme does");
        assert!(parse(&["--initial-cluster-token", ""]).unwrap_err().contains("--initial-cluster-token"));
    }

    #[test]
    fn restore_from_is_for_initial_members_and_its_backup_changes_the_cluster_id() {
        let urls = "http://127.0.0.1:1,http://127.0.0.1:2";
        let c = parse(&["--id", "2", "--cluster", urls, "--restore-from", "b.backup"]).unwrap();
        assert_eq!(c.restore_from, Some(PathBuf::from("b.backup")));
        assert_eq!(parse(&["--id", "2", "--cluster", urls]).unwrap().restore_from, None);
        assert!(parse(&["--id", "2", "--cluster", urls, "--join", "--restore-from", "b"]).unwrap_err().contains("--restore-from"));
        let beyond = ["--id", "3", "--cluster", urls, "--peer-url", "http://127.0.0.1:3", "--restore-from", "b"];
        assert!(parse(&beyond).unwrap_err().contains("--restore-from"), "an id beyond --cluster joins");
        let m = vec![(1, "http://a".to_string()), (2, "http://b".to_string())];
        let plain = cluster_id(&m, "t");
        let restored = restored_cluster_id(&m, "t", 0xdead_beef, 40);
        assert_ne!(restored, plain, "not the old cluster");
        assert_eq!(restored_cluster_id(&m, "t", 0xdead_beef, 40), restored, "every member computes the same id");
        assert_ne!(restored_cluster_id(&m, "t", 0xdead_beee, 40), restored, "another backup");
        assert_ne!(restored_cluster_id(&m, "t", 0xdead_beef, 41), restored, "another index");
        assert_ne!(restored_cluster_id(&m, "u", 0xdead_beef, 40), restored, "another token");
    }

    #[test]
    fn go_single_dash_and_join() {
        let c = parse(&["-id", "4", "-cluster", "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3,http://127.0.0.1:4", "-port", "5", "-join"]).unwrap();
        assert_eq!(c.id, 4);
        assert!(c.join);
        let c = parse(&["--id=1", "--join=false", "--cluster=http://127.0.0.1:7"]).unwrap();
        assert!(!c.join);
    }

    #[test]
    fn id_beyond_cluster_needs_peer_url_and_implies_join() {
        assert!(parse(&["--id", "3", "--cluster", "http://127.0.0.1:1"]).unwrap_err().contains("--peer-url"));
        let c = parse(&["--id", "3", "--cluster", "http://127.0.0.1:1", "--peer-url", "http://127.0.0.1:3"]).unwrap();
        assert!(c.join);
    }

    #[test]
    fn peer_urls_have_one_canonical_spelling() {
        for (url, want) in [
            ("http://127.0.0.1:2380", "http://127.0.0.1:2380"),
            ("http://127.0.0.1:2380/", "http://127.0.0.1:2380"),
            ("HTTP://LocalHost:02380", "http://localhost:2380"),
            ("https://Node-1.svc:443/", "https://node-1.svc:443"),
            ("http://[::1]:2380", "http://[::1]:2380"),
        ] {
            assert_eq!(canonical_peer_url(url).unwrap(), want, "{url}");
        }
        assert!(canonical_peer_url("ftp://a:1").is_err());
        assert!(canonical_peer_url("http://a:1/path").is_err());
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(parse(&["--id", "0"]).is_err());
        assert!(parse(&["--id", "x"]).is_err());
        assert!(parse(&["--cluster", "127.0.0.1:1"]).unwrap_err().contains("http://"));
        assert!(parse(&["--cluster", "http://127.0.0.1"]).unwrap_err().contains("port"));
        assert!(parse(&["--cluster", "http://127.0.0.1:1,http://127.0.0.1:1"]).unwrap_err().contains("twice"));
        for respelled in ["http://127.0.0.1:1/", "http://127.0.0.1:01"] {
            let e = parse(&["--cluster", &format!("http://127.0.0.1:1,{respelled}")]).unwrap_err();
            assert!(e.contains("twice"), "{respelled}: {e}");
        }
        // An initial member advertises its own --cluster entry (in any spelling).
        let two = "http://127.0.0.1:7001,http://127.0.0.1:7002";
        let e = parse(&["--cluster", two, "--peer-url", "http://127.0.0.1:7002"]).unwrap_err();
        assert!(e.contains("--peer-url") && e.contains("entry 1"), "{e}");
        assert!(parse(&["--cluster", two, "--peer-url", "http://127.0.0.1:07001/"]).is_ok());
        assert!(parse(&["--id", "3", "--cluster", two, "--peer-url", "http://127.0.0.1:7003"]).is_ok(), "beyond the list: its own");
        assert!(parse(&["--id", "2", "--join", "--cluster", two, "--peer-url", "http://127.0.0.1:7009"]).is_ok(), "a joiner's address is the leader's business");
        assert!(parse(&["--snapshot-count", "0"]).is_err());
        assert!(parse(&["--port", "9021"]).unwrap_err().contains("peer port"));
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--worker-threads", "0"]).unwrap_err().contains("--worker-threads"));
        assert_eq!(parse(&["--worker-threads", "4"]).unwrap().worker_threads, 4);
        assert_eq!(parse(&[]).unwrap().worker_threads, 1);
        assert_eq!(parse(&[]).unwrap().watch_history, 10_000);
        assert_eq!(parse(&["--watch-history", "1"]).unwrap().watch_history, 1);
        assert!(!parse(&[]).unwrap().watch_prev_kv);
        assert!(parse(&["--watch-prev-kv"]).unwrap().watch_prev_kv);
        assert!(parse(&["--watch-prev-kv=true"]).unwrap().watch_prev_kv);
        assert!(!parse(&["--watch-prev-kv=false"]).unwrap().watch_prev_kv);
        assert!(parse(&["--watch-history", "0"]).unwrap_err().contains("--watch-history"));
        assert!(parse(&["--watch-history", "1000001"]).unwrap_err().contains("--watch-history"));
        assert!(parse(&["--restore-bump-revision", "5"]).unwrap_err().contains("give --restore-from"));
        let e = parse(&["--restore-from", "b.backup", "--restore-bump-revision", "1000000000001"]).unwrap_err();
        assert!(e.contains("at most"), "{e}");
        assert_eq!(parse(&["--restore-from", "b.backup", "--restore-bump-revision", "1000"]).unwrap().restore_bump_revision, 1000);
        assert!(parse(&["--max-request-bytes", "1023"]).unwrap_err().contains("--max-request-bytes"));
        assert!(parse(&["--max-request-bytes", "33554433"]).unwrap_err().contains("32 MiB"));
        assert_eq!(parse(&["--max-request-bytes", "33554432"]).unwrap().max_request_bytes, MAX_REQUEST_BYTES);
    }

    fn all<'a>(parts: &[&[&'a str]]) -> Vec<&'a str> {
        parts.concat()
    }

    #[test]
    fn tls_flags_are_checked_together() {
        let k = crate::tls::Pki::new();
        let f = |n: &str| k.p(n).display().to_string();
        std::fs::write(k.p("token"), "0123456789abcdef-admin\n").unwrap();
        let peer = ["--peer-cert-file", &f("cert.pem"), "--peer-key-file", &f("key.pem"), "--peer-trusted-ca-file", &f("ca.pem")];
        let https = ["--cluster", "https://127.0.0.1:7001"];
        let client = ["--cert-file", &f("cert.pem"), "--key-file", &f("key.pem")];
        let token = ["--admin-token-file", &f("token")];

        let c = parse(&all(&[&https, &peer, &client, &token])).unwrap();
        assert!(c.peer_tls.is_some() && c.client_tls.is_some() && c.admin_token.is_some());
        let c = parse(&all(&[&https, &peer])).unwrap();
        assert!(c.peer_tls.is_some() && c.client_tls.is_none() && c.admin_token.is_none());

        let e = parse(&all(&[&https, &peer, &client])).unwrap_err();
        assert!(e.contains("--admin-token-file"), "{e}");
        let e = parse(&all(&[&https, &peer[..4]])).unwrap_err();
        assert!(e.contains("missing --peer-trusted-ca-file"), "{e}");
        let e = parse(&peer).unwrap_err();
        assert!(e.contains("must be https://"), "{e}");
        let e = parse(&https).unwrap_err();
        assert!(e.contains("peer TLS is not configured"), "{e}");
        let e = parse(&all(&[&client[..2], &token])).unwrap_err();
        assert!(e.contains("--cert-file needs --key-file"), "{e}");
        let e = parse(&all(&[&client[2..], &token])).unwrap_err();
        assert!(e.contains("--key-file needs --cert-file"), "{e}");
        let e = parse(&all(&[&client, &token, &["--client-cert-auth"]])).unwrap_err();
        assert!(e.contains("--trusted-ca-file"), "{e}");
        let e = parse(&["--trusted-ca-file", &f("ca.pem")]).unwrap_err();
        assert!(e.contains("need client TLS"), "{e}");
        let e = parse(&all(&[&client, &["--admin-token-file", &f("nope")]])).unwrap_err();
        assert!(e.contains("--admin-token-file") && e.contains("cannot read"), "{e}");
        let e = parse(&all(&[&["--cert-file", &f("garbage.pem"), "--key-file", &f("key.pem")], &token])).unwrap_err();
        assert!(e.contains("--cert-file") && e.contains("garbage.pem"), "{e}");
        let c = parse(&all(&[&client, &token, &["--trusted-ca-file", &f("ca.pem"), "--client-cert-auth"]])).unwrap();
        assert!(c.client_tls.is_some());
    }

    #[test]
    fn hostname_ordinal() {
        assert_eq!(ordinal_from_hostname("kv-0").unwrap(), 1);
        assert_eq!(ordinal_from_hostname("my-kv-12").unwrap(), 13);
        assert!(ordinal_from_hostname("kv").is_err());
        assert!(ordinal_from_hostname("kv-18446744073709551614").is_ok());
        assert!(ordinal_from_hostname("kv-18446744073709551615").unwrap_err().to_string().contains("too large"));
    }
}
