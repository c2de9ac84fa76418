//! `raftkv-node backup`: the client side of `GET /v1/backup`, for scheduled backups (an
//! operator CronJob runs it).
//!
//! It asks the endpoints of `--endpoints` in order for a backup and keeps the first whole,
//! checked one: the body is streamed to `DIR/.backup-<pid>-<random>.tmp` (never held in memory),
//! each endpoint bounded by `--timeout`, and the file is checked with
//! [`backup::verify`]. A non-200 answer, a connection failure, a timeout or a damaged
//! or truncated file moves on to the next endpoint. The good file is fsynced, renamed to
//! `DIR/backup-<UTC YYYYMMDDTHHMMSSZ>-<applied index, 16 hex digits>.raftkv` and DIR
//! fsynced; then the older files of exactly that name pattern are deleted down to
//! `--keep` (no other file is touched), and one JSON line says what was done.
//!
//! Exit codes: 0 a backup was written; 1 no endpoint delivered one (nothing is left
//! behind), or the local disk failed; 2 bad flags.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{CommandFactory, Parser};
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::ClientConfig;

use crate::backup;

/// Most backups `--keep` may keep.
pub const MAX_KEEP: u64 = 10_000;

/// Flags of `raftkv-node backup`, parsed apart from the node's own flags
/// ([`crate::config::Args`]). Use [`BackupArgs::into_config`] to validate them.
#[derive(Debug, Parser)]
#[command(
    name = "raftkv-node backup",
    bin_name = "raftkv-node backup",
    version,
    about = "Take a backup (GET /v1/backup) from the first member that delivers a whole one; keep the newest --keep.",
    after_help = "Backups are written as DIR/backup-<UTC YYYYMMDDTHHMMSSZ>-<applied index, 16 hex digits>.raftkv \
(mode 0600); files of exactly that pattern beyond --keep are deleted, oldest name first; no other file is touched. \
On success one JSON line goes to stdout: {\"file\", \"endpoint\", \"applied_index\", \"bytes\", \"pruned\"}.\n\
Exit codes: 0 a backup was written; 1 no endpoint delivered a good backup (no file is left behind) or the disk failed; 2 bad flags."
)]
pub struct BackupArgs {
    /// Client URLs of members, http://host:port or https://host:port, comma-separated (or
    /// the flag repeated). Tried in order until one delivers a whole, checked backup.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    /// Folder the backups go to; created when missing.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Backups to keep in DIR, the new one included (1 to 10000).
    #[arg(long, value_name = "N", default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=MAX_KEEP))]
    pub keep: u64,
    /// Seconds one endpoint may take to deliver the whole backup, connecting included;
    /// then the next endpoint is tried.
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=7 * 86_400))]
    pub timeout: u64,
    /// CA bundle (PEM) that https endpoints' certificates must chain to (default: the
    /// system's root certificates).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Client certificate chain (PEM) to present to https endpoints, for members started
    /// with `--client-cert-auth`; with --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Ask for `?consistency=serializable`: the member's own state, without the
    /// linearizable read barrier (needs no quorum; may miss the latest writes).
    #[arg(long)]
    pub serializable: bool,
}

/// Validated settings of `raftkv-node backup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupConfig {
    /// Endpoints in the order they are tried, `scheme://host:port` without a trailing `/`.
    pub endpoints: Vec<String>,
    /// Where backups go.
    pub dir: PathBuf,
    /// Backups kept, the new one included (1..=[`MAX_KEEP`]).
    pub keep: usize,
    /// Bound on one endpoint's whole transfer.
    pub timeout: Duration,
    /// CA bundle for https endpoints.
    pub cacert: Option<PathBuf>,
    /// Client certificate chain and key for https endpoints.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Whether to ask for a serializable backup.
    pub serializable: bool,
}

/// Why `raftkv-node backup` did not write a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupClientError {
    /// Bad flags, or an unusable `--dir` or `--cacert` (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// One endpoint did not deliver a good backup; the next one is tried.
    #[error("{endpoint}: {why}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        why: String,
    },
    /// Every endpoint failed (exit code 1).
    #[error("no endpoint delivered a good backup ({tried} tried); nothing was written")]
    AllFailed {
        /// Endpoints tried.
        tried: usize,
    },
    /// The local disk failed (exit code 1).
    #[error("{what} {path}: {source}")]
    Disk {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The async runtime could not start (exit code 1).
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    /// SIGTERM or SIGINT arrived during a transfer (exit code 1; the temporary file is removed).
    #[error("interrupted by a signal; nothing was written")]
    Interrupted,
}

impl BackupClientError {
    /// The process exit code for this error: 2 for [`BackupClientError::Usage`], else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            BackupClientError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// What a successful run did (printed as one JSON line by [`Done::json_line`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The new backup file.
    pub file: PathBuf,
    /// The endpoint it came from.
    pub endpoint: String,
    /// Applied index the backup holds.
    pub applied_index: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Older backups deleted, oldest first.
    pub pruned: Vec<PathBuf>,
}

impl Done {
    /// `{"file": ..., "endpoint": ..., "applied_index": N, "bytes": N, "pruned": [...]}`.
    pub fn json_line(&self) -> String {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        serde_json::json!({
            "file": path(&self.file),
            "endpoint": self.endpoint,
            "applied_index": self.applied_index,
            "bytes": self.bytes,
            "pruned": self.pruned.iter().map(path).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

fn usage<T>(msg: impl Into<String>) -> Result<T, BackupClientError> {
    Err(BackupClientError::Usage(msg.into()))
}

/// Checks one `--endpoints` entry: `http(s)://host:port`, nothing after the port but an
/// optional `/`. Returns it without the `/`.
pub fn parse_endpoint(raw: &str) -> Result<String, BackupClientError> {
    let url = raw.trim().trim_end_matches('/');
    let bad = |why: &str| usage(format!("--endpoints: {raw:?} {why} (want http://host:port or https://host:port)"));
    let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else {
        return bad("does not start with http:// or https://");
    };
    if rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_whitespace) {
        return bad("has a path, query, user or spaces");
    }
    let Some((host, port)) = rest.rsplit_once(':') else { return bad("has no port") };
    if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
        return bad("has a bad port");
    }
    let bracketed = host.len() > 2 && host.starts_with('[') && host.ends_with(']');
    if host.is_empty() || (host.contains(':') && !bracketed) || (!bracketed && host.contains(['[', ']'])) {
        return bad("has a bad host");
    }
    if url.parse::<hyper::Uri>().is_err() {
        return bad("is not a valid URL");
    }
    Ok(url.to_string())
}

impl BackupArgs {
    /// Validates the flags (touches nothing; [`prepare_dir`] sees to DIR).
    pub fn into_config(self) -> Result<BackupConfig, BackupClientError> {
        let mut endpoints = Vec::new();
        for raw in self.endpoints.iter().filter(|e| !e.trim().is_empty()) {
            endpoints.push(parse_endpoint(raw)?);
        }
        if endpoints.is_empty() {
            return usage("--endpoints: no endpoint given");
        }
        if self.dir.as_os_str().is_empty() {
            return usage("--dir: empty path");
        }
        let keep = usize::try_from(self.keep).ok().filter(|k| (1..=MAX_KEEP as usize).contains(k));
        let Some(keep) = keep else { return usage(format!("--keep: {} is not in 1..={MAX_KEEP}", self.keep)) };
        if self.timeout == 0 {
            return usage("--timeout: must be at least 1 second");
        }
        if self.cert.is_some() && !endpoints.iter().any(|e: &String| e.starts_with("https://")) {
            return usage("--cert/--key: a client certificate is for https endpoints, and none is given");
        }
        Ok(BackupConfig {
            endpoints,
            dir: self.dir,
            keep,
            timeout: Duration::from_secs(self.timeout),
            cacert: self.cacert,
            identity: self.cert.zip(self.key),
            serializable: self.serializable,
        })
    }
}

/// Makes sure `dir` is a directory: creates it (and its parents) when missing; a path
/// that exists as something else is a usage error.
pub fn prepare_dir(dir: &Path) -> Result<(), BackupClientError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => usage(format!("--dir {}: exists and is not a directory", dir.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).or_else(|e| usage(format!("--dir {}: cannot create it: {e}", dir.display())))
        }
        Err(e) => usage(format!("--dir {}: {e}", dir.display())),
    }
}

/// `YYYYMMDDTHHMMSSZ` (UTC) of `secs` seconds after the Unix epoch.
pub fn utc_stamp(secs: u64) -> String {
    let (y, m, d) = civil_from_days(secs / 86_400);
    let s = secs % 86_400;
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian calendar).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The file name of a backup taken at `secs` (Unix time) holding `applied_index`:
/// `backup-<YYYYMMDDTHHMMSSZ>-<16 lowercase hex digits>.raftkv`. Names sort by time.
pub fn backup_file_name(secs: u64, applied_index: u64) -> String {
    format!("backup-{}-{applied_index:016x}.raftkv", utc_stamp(secs))
}

/// Whether `name` is exactly of the [`backup_file_name`] pattern (only such files are pruned).
pub fn is_backup_name(name: &str) -> bool {
    let b = name.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 47
        && name.starts_with("backup-")
        && digits(7..15)
        && b[15] == b'T'
        && digits(16..22)
        && b[22] == b'Z'
        && b[23] == b'-'
        && b[24..40].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        && name.ends_with(".raftkv")
}

/// Which of `names` (a folder's file names) to delete so that `keep` backups remain:
/// the backup-pattern names other than `new`, newest (greatest) name first, beyond the
/// first `keep - 1`. `new` itself is never pruned, even when a clock that went back
/// makes it sort below older files. Returned oldest first.
pub fn prune_plan(names: &[String], new: &str, keep: usize) -> Vec<String> {
    let mut older: Vec<&String> = names.iter().filter(|n| is_backup_name(n) && n.as_str() != new).collect();
    older.sort_unstable_by(|a, b| b.cmp(a));
    older.dedup();
    let mut gone: Vec<String> = older.into_iter().skip(keep.saturating_sub(1)).cloned().collect();
    gone.sort();
    gone
}

/// The HTTP(S) client of `raftkv-node backup`.
type BackupHttp = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The TLS client config: `--cacert`'s roots, else the system's when an endpoint is
/// https, else none (plain http only).
fn tls_config(cacert: Option<&Path>, identity: Option<(&Path, &Path)>, https: bool) -> Result<ClientConfig, BackupClientError> {
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .or_else(|e| usage(format!("TLS: {e}")))?;
    let builder = match (cacert, https) {
        (Some(path), _) => {
            let roots = crate::tls::load_roots("--cacert", path).or_else(|e| usage(e.to_string()))?;
            builder.with_root_certificates(roots)
        }
        (None, true) => match builder.with_native_roots() {
            Ok(b) => b,
            Err(e) => return usage(format!("https endpoints need CA certificates: {e}; give --cacert FILE")),
        },
        (None, false) => return Ok((*crate::tls::untrusting_client_config()).clone()),
    };
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = crate::tls::load_certs("--cert", cert).or_else(|e| usage(e.to_string()))?;
            let key = crate::tls::load_key("--key", key).or_else(|e| usage(e.to_string()))?;
            builder.with_client_auth_cert(chain, key).or_else(|e| usage(format!("--cert/--key: {e}")))
        }
    }
}

fn http_client(tls: ClientConfig, timeout: Duration) -> BackupHttp {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(timeout.min(Duration::from_secs(10))));
    conn.enforce_http(false);
    let conn = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(conn);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(conn)
}

/// An error and its causes, `a: b: c` (hyper's own message alone is terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The lock file in DIR that serialises renaming and pruning between runs.
const LOCK_FILE: &str = ".backup.lock";

/// Takes an exclusive `flock` on `DIR/.backup.lock`, waiting up to `wait` for another
/// run's rename and prune (which are short; one stuck longer, on a hung volume, makes
/// this run fail instead of waiting for ever); released when the file is dropped.
fn lock_dir(dir: &Path, wait: Duration) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let f = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join(LOCK_FILE))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) | Some(libc::EINTR) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50)); // polling another run's lock
            }
            Some(libc::EWOULDBLOCK) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("another backup run held the lock for over {} s", wait.as_secs())))
            }
            _ => return Err(e),
        }
    }
}

/// Deletes temp files (`.backup-*.tmp`) that earlier runs killed mid-transfer left in
/// DIR (a run removes its own otherwise), once untouched for `stale`: a run still
/// writing one keeps its modification time fresh. Returns those deleted.
fn sweep_stale_temps(dir: &Path, stale: Duration) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".backup-") && name.ends_with(".tmp")) {
            continue;
        }
        let old = e.metadata().ok().filter(std::fs::Metadata::is_file).and_then(|m| m.modified().ok()).is_some_and(|t| now.duration_since(t).is_ok_and(|age| age >= stale));
        if old {
            let path = e.path();
            match fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(err) => eprintln!("raftkv-node backup: cannot remove the stale temp file {}: {err}", path.display()),
            }
        }
    }
    removed
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!("raftkv-node backup: cannot remove {}: {e}", path.display());
        }
    }
}

/// Downloads one endpoint's backup into `tmp`, fsynced; returns its size.
async fn fetch(client: &BackupHttp, endpoint: &str, serializable: bool, tmp: &Path) -> Result<u64, BackupClientError> {
    let failed = |why: String| BackupClientError::Endpoint { endpoint: endpoint.to_string(), why };
    let url = format!("{endpoint}/v1/backup{}", if serializable { "?consistency=serializable" } else { "" });
    let uri: hyper::Uri = url.parse().map_err(|e| failed(format!("bad URL {url}: {e}")))?;
    let req = hyper::Request::get(uri)
        .header(hyper::header::USER_AGENT, concat!("raftkv-node-backup/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(format!("bad request: {e}")))?;
    let resp = client.request(req).await.map_err(|e| failed(chain(&e)))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if status != StatusCode::OK {
        // The JSON error's first KiB says why.
        let mut text = Vec::new();
        while text.len() < 1024 {
            match body.frame().await {
                Some(Ok(f)) => text.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
                _ => break,
            }
        }
        text.truncate(1024);
        return Err(failed(format!("HTTP {status}: {}", String::from_utf8_lossy(&text).trim())));
    }
    let disk = |what: &'static str| move |source| BackupClientError::Disk { what, path: tmp.to_path_buf(), source };
    let file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(tmp).map_err(disk("cannot create"))?;
    let mut w = BufWriter::with_capacity(1 << 18, file);
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| failed(format!("transfer cut after {bytes} bytes: {}", chain(&e))))?;
        if let Ok(data) = frame.into_data() {
            w.write_all(&data).map_err(disk("cannot write"))?;
            bytes += data.len() as u64;
        }
    }
    let file = w.into_inner().map_err(|e| BackupClientError::Disk { what: "cannot write", path: tmp.to_path_buf(), source: e.into_error() })?;
    file.sync_all().map_err(disk("cannot fsync"))?;
    Ok(bytes)
}

/// Resolves on SIGTERM or SIGINT (never when the handlers cannot be installed).
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

/// Takes one backup per `cfg` (DIR must exist: [`prepare_dir`]), on a current-thread
/// runtime of its own. Progress and endpoint failures go to stderr.
pub fn run(cfg: &BackupConfig) -> Result<Done, BackupClientError> {
    let https = cfg.endpoints.iter().any(|e| e.starts_with("https://"));
    let identity = cfg.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    let client_tls = tls_config(cfg.cacert.as_deref(), identity, https)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(BackupClientError::Runtime)?;
    // The pid alone repeats across containers (under tini it is nearly fixed): a random
    // part keeps two runs sharing the volume (a job replacing a pod still terminating)
    // off each other's temp file.
    let tmp = cfg.dir.join(format!(".backup-{}-{:08x}.tmp", std::process::id(), rand::random::<u32>()));
    // What runs killed mid-transfer left (an OOM kill, a job's grace period): untouched
    // for an hour, or twice --timeout if longer, no run is still writing it.
    for stale in sweep_stale_temps(&cfg.dir, (cfg.timeout * 2).max(Duration::from_secs(3600))) {
        eprintln!("raftkv-node backup: removed {}, left by an interrupted run", stale.display());
    }
    let fetched = rt.block_on(async {
        let client = http_client(client_tls, cfg.timeout);
        let stop = stop_signal();
        tokio::pin!(stop);
        for (i, endpoint) in cfg.endpoints.iter().enumerate() {
            let attempt = async {
                let bytes = match tokio::time::timeout(cfg.timeout, fetch(&client, endpoint, cfg.serializable, &tmp)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(BackupClientError::Endpoint {
                            endpoint: endpoint.clone(),
                            why: format!("no whole backup within --timeout {} s", cfg.timeout.as_secs()),
                        })
                    }
                };
                let info = backup::verify(&tmp).map_err(|e| BackupClientError::Endpoint { endpoint: endpoint.clone(), why: e.to_string() })?;
                Ok((endpoint.clone(), info, bytes))
            };
            let outcome = tokio::select! {
                r = attempt => r,
                _ = &mut stop => Err(BackupClientError::Interrupted),
            };
            match outcome {
                Ok(got) => return Ok(got),
                Err(e @ BackupClientError::Endpoint { .. }) => {
                    remove_quietly(&tmp);
                    let next = if i + 1 < cfg.endpoints.len() { "; trying the next endpoint" } else { "" };
                    eprintln!("raftkv-node backup: {e}{next}");
                }
                Err(e) => {
                    remove_quietly(&tmp);
                    return Err(e);
                }
            }
        }
        Err(BackupClientError::AllFailed { tried: cfg.endpoints.len() })
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    let (endpoint, info, bytes) = fetched?;

    // Rename and prune under an exclusive lock of DIR: two overlapping runs with
    // --keep 1 would otherwise each delete the other's new file and leave none.
    let _lock = lock_dir(&cfg.dir, cfg.timeout).map_err(|source| BackupClientError::Disk { what: "cannot lock", path: cfg.dir.join(LOCK_FILE), source })?;
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let name = backup_file_name(secs, info.applied_index);
    let file = cfg.dir.join(&name);
    if let Err(source) = fs::rename(&tmp, &file) {
        remove_quietly(&tmp);
        return Err(BackupClientError::Disk { what: "cannot rename the backup to", path: file, source });
    }
    File::open(&cfg.dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| BackupClientError::Disk { what: "cannot fsync", path: cfg.dir.clone(), source })?;
    let pruned = prune(&cfg.dir, &name, cfg.keep);
    Ok(Done { file, endpoint, applied_index: info.applied_index, bytes, pruned })
}

/// Deletes the backups beyond `keep` ([`prune_plan`]) among DIR's regular files; returns
/// those deleted. A failure is reported on stderr and leaves the file.
fn prune(dir: &Path, new: &str, keep: usize) -> Vec<PathBuf> {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            eprintln!("raftkv-node backup: cannot list {} to prune old backups: {e}", dir.display());
            return Vec::new();
        }
    };
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let mut pruned = Vec::new();
    for name in prune_plan(&names, new, keep) {
        let path = dir.join(&name);
        match fs::remove_file(&path) {
            Ok(()) => pruned.push(path),
            Err(e) => eprintln!("raftkv-node backup: cannot delete old backup {}: {e}", path.display()),
        }
    }
    pruned
}

fn print_usage_error(msg: &str) {
    let e = BackupArgs::command().error(clap::error::ErrorKind::ValueValidation, msg);
    let _ = e.print();
}

/// `raftkv-node backup ...`: `argv[0]` is `backup`, the rest its flags. Returns the
/// process exit code (0 written, 1 failed, 2 bad flags); `--help` prints and returns 0.
pub fn main(argv: impl IntoIterator<Item = String>) -> i32 {
    let args = match BackupArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) if e.exit_code() == 0 => {
            let _ = e.print(); // --help, --version
            return 0;
        }
        Err(e) => {
            // Some of clap's errors (a bad value) leave the usage line out: put it in.
            let mut text = e.render().to_string();
            if !text.contains("Usage:") {
                let usage = BackupArgs::command().render_usage().to_string();
                text = text.replacen("\nFor more information", &format!("\n{usage}\n\nFor more information"), 1);
            }
            eprint!("{text}");
            return e.exit_code();
        }
    };
    let cfg = match args.into_config().and_then(|c| prepare_dir(&c.dir).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            print_usage_error(&e.to_string());
            return e.exit_code();
        }
    };
    match run(&cfg) {
        Ok(done) => {
            let mut out = io::stdout().lock();
            if let Err(e) = writeln!(out, "{}", done.json_line()).and_then(|()| out.flush()) {
                eprintln!("raftkv-node backup: wrote {} but cannot print the result: {e}", done.file.display());
            }
            0
        }
        Err(e @ BackupClientError::Usage(_)) => {
            print_usage_error(&e.to_string());
            e.exit_code()
        }
        Err(e) => {
            eprintln!("raftkv-node backup: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_lock_is_exclusive_between_runs() {
        let d = tempfile::tempdir().expect("tempdir");
        let held = lock_dir(d.path(), Duration::from_secs(1)).expect("lock");
        let e = lock_dir(d.path(), Duration::from_millis(200)).expect_err("held by another run");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.path().to_path_buf();
        let other = std::thread::spawn(move || {
            let f = lock_dir(&dir, Duration::from_secs(30)).expect("lock");
            tx.send(()).expect("send");
            drop(f);
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "a second run waits while the first holds the lock");
        drop(held);
        rx.recv_timeout(Duration::from_secs(10)).expect("the second run gets it once released");
        other.join().expect("thread");
    }

    #[test]
    fn temp_files_of_interrupted_runs_are_swept_once_stale() {
        let d = tempfile::tempdir().expect("tempdir");
        let old = d.path().join(".backup-1-0000abcd.tmp");
        let fresh = d.path().join(".backup-1-0000beef.tmp");
        let other = d.path().join("notes.tmp");
        for p in [&old, &fresh, &other] {
            fs::write(p, b"partial").expect("write");
        }
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for p in [&old, &other] {
            File::options().write(true).open(p).and_then(|f| f.set_modified(two_hours_ago)).expect("mtime");
        }
        assert_eq!(sweep_stale_temps(d.path(), Duration::from_secs(3600)), vec![old.clone()]);
        assert!(!old.exists() && fresh.exists() && other.exists(), "only a stale temp file of ours goes");
    }

    fn parse(args: &[&str]) -> Result<BackupArgs, clap::Error> {
        BackupArgs::try_parse_from(std::iter::once("backup").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Result<BackupConfig, String> {
        parse(args).map_err(|e| format!("clap {}: {e}", e.exit_code()))?.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn utc_stamp_of_known_instants() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(86_399), "19700101T235959Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z"); // a leap day of a century leap year
        assert_eq!(utc_stamp(951_868_800), "20000301T000000Z");
        assert_eq!(utc_stamp(1_234_567_890), "20090213T233130Z");
        assert_eq!(utc_stamp(1_700_000_000), "20231114T221320Z");
        assert_eq!(utc_stamp(1_709_164_799), "20240228T235959Z");
        assert_eq!(utc_stamp(1_709_164_800), "20240229T000000Z");
        assert_eq!(utc_stamp(4_102_444_799), "20991231T235959Z");
        assert_eq!(utc_stamp(4_107_456_000), "21000228T000000Z");
        assert_eq!(utc_stamp(4_107_542_400), "21000301T000000Z"); // a day later: 2100 is no leap year
        assert_eq!(utc_stamp(253_402_300_799), "99991231T235959Z");
    }

    #[test]
    fn backup_names_are_recognised_exactly() {
        let name = backup_file_name(1_700_000_000, 0x1234);
        assert_eq!(name, "backup-20231114T221320Z-0000000000001234.raftkv");
        assert!(is_backup_name(&name));
        assert!(is_backup_name(&backup_file_name(0, u64::MAX)));
        for other in [
            "backup-20231114T221320Z-0000000000001234.raftkv.bak",
            "backup-20231114T221320Z-0000000000001234.raftkv~",
            "xbackup-20231114T221320Z-0000000000001234.raftkv",
            "backup-20231114T221320Z-000000000000123.raftkv",
            "backup-20231114T221320Z-00000000000012345.raftkv",
            "backup-20231114T221320Z-000000000000123A.raftkv",
            "backup-20231114T221320Z-000000000000123g.raftkv",
            "backup-2023111XT221320Z-0000000000001234.raftkv",
            "backup-20231114t221320Z-0000000000001234.raftkv",
            "backup-20231114T221320z-0000000000001234.raftkv",
            "backup-20231114T221320Z_0000000000001234.raftkv",
            "backup-20231114T221320Z-0000000000001234.RAFTKV",
            "backup-20231114T2213200Z-000000000001234.raftkv",
            ".backup-4242.tmp",
            "backup-old.raftkv",
            "raftkv-1-1234.backup",
            "notes.txt",
            "",
        ] {
            assert!(!is_backup_name(other), "{other:?}");
        }
    }

    #[test]
    fn pruning_keeps_the_newest_names_and_never_the_rest() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let b = |secs: u64, idx: u64| backup_file_name(secs, idx);
        let (b1, b2, b3, b4) = (b(1_000, 5), b(2_000, 9), b(3_000, 12), b(3_000, 13));
        let dir = names(&[&b3, "notes.txt", &b1, &format!("{b1}.bak"), &b4, &b2, ".backup-7.tmp"]);
        assert_eq!(prune_plan(&dir, &b4, 2), vec![b1.clone(), b2.clone()]);
        assert_eq!(prune_plan(&dir, &b4, 1), vec![b1.clone(), b2.clone(), b3.clone()]);
        assert_eq!(prune_plan(&dir, &b4, 4), Vec::<String>::new());
        assert_eq!(prune_plan(&dir, &b4, 10_000), Vec::<String>::new());
        // The new file survives a clock that went back: the newest others fill the rest.
        let old_clock = b(500, 14);
        let mut with_new = dir.clone();
        with_new.push(old_clock.clone());
        assert_eq!(prune_plan(&with_new, &old_clock, 2), vec![b1, b2, b3]);
    }

    #[test]
    fn flags_are_validated() {
        let c = config(&["--endpoints", "http://127.0.0.1:2379/,https://kv-0.kv:2379", "--dir", "/backups"]).unwrap();
        assert_eq!(c.endpoints, vec!["http://127.0.0.1:2379".to_string(), "https://kv-0.kv:2379".to_string()]);
        assert_eq!((c.keep, c.timeout, c.serializable, c.cacert), (7, Duration::from_secs(600), false, None));
        let c = config(&["--endpoints", "http://[::1]:1,", "--endpoints", "http://a:2", "--dir", "d", "--keep", "10000", "--timeout", "5", "--serializable", "--cacert", "ca.pem"]).unwrap();
        assert_eq!(c.endpoints, vec!["http://[::1]:1".to_string(), "http://a:2".to_string()]);
        assert_eq!((c.keep, c.timeout, c.serializable), (10_000, Duration::from_secs(5), true));
        assert_eq!(c.cacert, Some(PathBuf::from("ca.pem")));

        // Usage errors, from clap (exit 2) or from validation (exit 2 too).
        for (args, want) in [
            (&["--dir", "d"][..], "--endpoints"),
            (&["--endpoints", "http://a:1"][..], "--dir"),
            (&["--endpoints", "http://a:1", "--dir", "d", "--keep", "0"][..], "--keep"),
            (&["--endpoints", "http://a:1", "--dir", "d", "--keep", "10001"][..], "--keep"),
            (&["--endpoints", "http://a:1", "--dir", "d", "--keep", "-1"][..], "-1"),
            (&["--endpoints", "http://a:1", "--dir", "d", "--timeout", "0"][..], "--timeout"),
            (&["--endpoints", ",", "--dir", "d"][..], "no endpoint"),
            (&["--endpoints", "", "--dir", "d"][..], "no endpoint"),
            (&["--endpoints", "ftp://a:1", "--dir", "d"][..], "http://"),
            (&["--endpoints", "127.0.0.1:2379", "--dir", "d"][..], "http://"),
            (&["--endpoints", "http://a", "--dir", "d"][..], "no port"),
            (&["--endpoints", "http://a:0", "--dir", "d"][..], "bad port"),
            (&["--endpoints", "http://a:99999", "--dir", "d"][..], "bad port"),
            (&["--endpoints", "http://a:1/v1", "--dir", "d"][..], "path"),
            (&["--endpoints", "http://u@a:1", "--dir", "d"][..], "user"),
            (&["--endpoints", "http://:1", "--dir", "d"][..], "bad host"),
            (&["--endpoints", "http://::1:1", "--dir", "d"][..], "bad host"),
            (&["--endpoints", "http://a:1", "--dir", ""][..], "--dir"),
            (&["--endpoints", "http://a:1", "--dir", "d", "--bogus"][..], "--bogus"),
        ] {
            match parse(args) {
                Err(e) => {
                    assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
                    assert!(e.to_string().contains(want), "{args:?}: {e}");
                }
                Ok(a) => {
                    let e = a.into_config().expect_err(&format!("{args:?} accepted"));
                    assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
                    assert!(e.to_string().contains(want), "{args:?}: {e}");
                }
            }
        }
        // --help documents every flag and exits 0.
        let help = parse(&["--help"]).unwrap_err();
        assert_eq!(help.exit_code(), 0);
        let text = help.to_string();
        for flag in ["--endpoints", "--dir", "--keep", "--timeout", "--cacert", "--serializable", "Exit codes"] {
            assert!(text.contains(flag), "{flag} not in --help:\n{text}");
        }
    }

    #[test]
    fn dir_is_created_when_missing_and_refused_when_not_a_directory() {
        let t = tempfile::tempdir().unwrap();
        let nested = t.path().join("a/b");
        prepare_dir(&nested).unwrap();
        assert!(nested.is_dir());
        prepare_dir(&nested).unwrap();
        let file = t.path().join("file");
        fs::write(&file, "x").unwrap();
        let e = prepare_dir(&file).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = prepare_dir(&file.join("below")).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
    }

    #[test]
    fn a_bad_cacert_or_client_key_is_a_usage_error() {
        let t = tempfile::tempdir().unwrap();
        let e = tls_config(Some(&t.path().join("missing.pem")), None, true).unwrap_err();
        assert!(e.exit_code() == 2 && e.to_string().contains("--cacert"), "{e}");
        let garbage = t.path().join("garbage.pem");
        fs::write(&garbage, "hello\n").unwrap();
        let e = tls_config(Some(&garbage), None, false).unwrap_err();
        assert!(e.exit_code() == 2 && e.to_string().contains("--cacert"), "{e}");
        tls_config(None, None, false).unwrap();
        let e = tls_config(None, Some((&garbage, &garbage)), true);
        // (without system roots on this machine the roots fail first; either way exit 2)
        assert!(e.is_err_and(|e| e.exit_code() == 2));
        // --cert needs --key and the other way round.
        assert!(config(&["--endpoints", "https://a:1", "--dir", "d", "--cert", "c.pem"]).is_err());
        assert!(config(&["--endpoints", "https://a:1", "--dir", "d", "--key", "k.pem"]).is_err());
        assert!(config(&["--endpoints", "http://a:1", "--dir", "d", "--cert", "c.pem", "--key", "k.pem"]).unwrap_err().contains("https"));
        let c = config(&["--endpoints", "https://a:1", "--dir", "d", "--cert", "c.pem", "--key", "k.pem"]).unwrap();
        assert_eq!(c.identity, Some((PathBuf::from("c.pem"), PathBuf::from("k.pem"))));
    }
}
