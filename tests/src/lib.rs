//! Test support for raftkv: real `raftkv-node` processes on 127.0.0.1.
//!
//! [`Cluster`] starts N nodes with raftexample-style flags, each with its own data dir
//! and log file under one temporary folder; it can `kill -9`, SIGTERM, pause (SIGSTOP)
//! and restart nodes, and add nodes with `--join`. [`Http`] is a small blocking client
//! and [`wait_for`] polls a condition until a deadline (tests never sleep blindly).
//! On a panic the cluster prints the tail of every node's log before it is torn down.

pub mod faultkit;
pub mod linearizability;
pub mod netns;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use reqwest::StatusCode;

/// Path of the `raftkv-node` binary: `$RAFTKV_NODE_BIN`, or next to the test executable
/// in the cargo target dir (`target/<profile>/raftkv-node`).
pub fn node_binary() -> PathBuf {
    if let Ok(p) = std::env::var("RAFTKV_NODE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("raftkv-node");
    assert!(bin.exists(), "{} not found: build it first (cargo build -p raftkv-node)", bin.display());
    bin
}

/// Polls `f` every 20 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1 outside the kernel's ephemeral range, never the same
/// one twice in this process (a stopped node's port stays reserved for its restart).
pub fn free_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let p = rng.gen_range(20_000..32_000);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.push(p);
            return p;
        }
    }
    panic!("no free port found");
}

/// A blocking HTTP client with a bounded timeout.
#[derive(Clone)]
pub struct Http {
    client: reqwest::blocking::Client,
    timeout: Duration,
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Resp {
    /// HTTP status.
    pub status: StatusCode,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Resp {
    /// Body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Body as JSON (panics when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

impl Default for Http {
    fn default() -> Self {
        Self::new(Duration::from_secs(15))
    }
}

impl Http {
    /// A client whose requests time out after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .pool_max_idle_per_host(4)
            .build()
            .expect("http client");
        Http { client, timeout }
    }

    /// Sends a request; Err on connection failure or timeout.
    pub fn call(&self, method: &str, url: &str, body: Option<Vec<u8>>) -> Result<Resp, String> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self.client.request(m, url);
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.bytes().map_err(|e| e.to_string())?.to_vec();
        Ok(Resp { status, body })
    }

    /// GET.
    pub fn get(&self, url: &str) -> Result<Resp, String> {
        self.call("GET", url, None)
    }
    /// PUT with a body.
    pub fn put(&self, url: &str, body: impl Into<Vec<u8>>) -> Result<Resp, String> {
        self.call("PUT", url, Some(body.into()))
    }
    /// POST with a body.
    pub fn post(&self, url: &str, body: impl Into<Vec<u8>>) -> Result<Resp, String> {
        self.call("POST", url, Some(body.into()))
    }
    /// DELETE.
    pub fn delete(&self, url: &str) -> Result<Resp, String> {
        self.call("DELETE", url, None)
    }

    /// GET a streamed answer (`/v1/watch`) and read it line by line as it arrives.
    /// Reading it is bounded by this client's timeout: per read, and in all (checked
    /// between lines, so a stream that sends a line at least every few seconds, as
    /// watch streams with `progress_ms` do, ends soon after it).
    pub fn stream(&self, url: &str) -> Result<LineStream, String> {
        let resp = self.client.get(url).send().map_err(|e| e.to_string())?;
        let status = resp.status();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let revision = header("x-raftkv-revision").and_then(|v| v.parse().ok());
        let content_type = header("content-type");
        Ok(LineStream { status, revision, content_type, reader: BufReader::new(resp), deadline: Instant::now() + self.timeout })
    }
}

/// A streamed answer read line by line ([`Http::stream`]).
pub struct LineStream {
    /// HTTP status.
    pub status: StatusCode,
    /// The `x-raftkv-revision` header, if any.
    pub revision: Option<u64>,
    /// The `content-type` header, if any.
    pub content_type: Option<String>,
    reader: BufReader<reqwest::blocking::Response>,
    deadline: Instant,
}

impl LineStream {
    /// The next line; None when the stream ended (or failed, or timed out).
    pub fn next_line(&mut self) -> Option<String> {
        if Instant::now() > self.deadline {
            return None;
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_string()),
        }
    }

    /// Every line left, up to the end of the stream; Err when it did not end cleanly
    /// (the connection was cut, or the client's timeout came first).
    pub fn rest(&mut self) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        loop {
            if Instant::now() > self.deadline {
                return Err(format!("still open at the deadline (after {} lines)", lines.len()));
            }
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Ok(lines),
                Ok(_) => lines.push(line.trim_end().to_string()),
                Err(e) => return Err(format!("{e} (after {} lines)", lines.len())),
            }
        }
    }

    /// The next line as JSON (panics when it is not).
    pub fn next_json(&mut self) -> Option<serde_json::Value> {
        let line = self.next_line()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
    }
}

/// A PUT of `value` to `url` recorded in `rec` as client `client`'s operation on `key`,
/// the response mapped honestly: 2xx acknowledged, 4xx failed (it never reached the
/// log), anything else (503 after the proposal may have been made, a timeout, a reset)
/// outcome unknown. Returns the invocation time and whether it was acknowledged.
pub fn recorded_put(
    http: &Http,
    rec: &linearizability::Recorder,
    client: u64,
    url: &str,
    key: String,
    value: Vec<u8>,
) -> (u64, bool) {
    let p = rec.begin(client, linearizability::Op::Put { key, value: value.clone() });
    let invoke = p.invoke_time();
    match http.put(url, value) {
        Ok(r) if r.status.is_success() => {
            p.ok().expect("put completion");
            (invoke, true)
        }
        Ok(r) if r.status.is_client_error() => {
            p.failed();
            (invoke, false)
        }
        _ => {
            p.unknown();
            (invoke, false)
        }
    }
}

/// A linearizable GET of `url` recorded in `rec` as client `client`'s read of `key`:
/// 200 reads the body, 404 reads "absent", anything else observed nothing and is
/// recorded as failed. Returns the invocation time and whether it was answered.
pub fn recorded_get(http: &Http, rec: &linearizability::Recorder, client: u64, url: &str, key: String) -> (u64, bool) {
    let p = rec.begin(client, linearizability::Op::Get { key, result: None });
    let invoke = p.invoke_time();
    match http.get(url) {
        Ok(r) if r.status == StatusCode::OK => {
            p.read(Some(r.body)).expect("get completion");
            (invoke, true)
        }
        Ok(r) if r.status == StatusCode::NOT_FOUND => {
            p.read(None).expect("get completion");
            (invoke, true)
        }
        _ => {
            p.failed();
            (invoke, false)
        }
    }
}

/// The leader every node in `running` names in its `/v1/status` (`status(id)`), if they
/// all name the same one and it is itself in `running`.
pub fn agreed_leader(running: &[u64], status: impl Fn(u64) -> Option<serde_json::Value>) -> Option<u64> {
    let mut leader = None;
    for id in running {
        let l = status(*id)?["leader"].as_u64()?;
        if l == 0 || leader.is_some_and(|x| x != l) {
            return None;
        }
        leader = Some(l);
    }
    leader.filter(|l| running.contains(l))
}

/// One node process of a [`Cluster`].
pub struct NodeProc {
    /// Raft id.
    pub id: u64,
    /// Peer port.
    pub peer_port: u16,
    /// Client port.
    pub client_port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// Whether it was started with --join.
    pub join: bool,
    /// The running process, if any.
    pub child: Option<Child>,
    /// Extra environment for the process (fault hooks such as `RAFTKV_FAULT_SYNC_DELAY_MS`).
    pub env: Vec<(String, String)>,
}

impl NodeProc {
    /// `http://127.0.0.1:<client port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    /// `http://127.0.0.1:<peer port>`.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
    /// OS process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts this node's process: raftexample-style flags (`--id --cluster --port`),
    /// its data dir, a client listener on 127.0.0.1, `args`, and `--join --peer-url
    /// <peer_url>` for a joiner. Its stderr goes to its log file.
    pub fn start(&mut self, cluster: &str, peer_url: &str, args: &[String]) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut cmd = Command::new(node_binary());
        cmd.arg("--id")
            .arg(self.id.to_string())
            .arg("--cluster")
            .arg(cluster)
            .arg("--port")
            .arg(self.client_port.to_string())
            .arg("--listen-client-addr")
            .arg(format!("127.0.0.1:{}", self.client_port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .env("RUST_LOG", std::env::var("RAFTKV_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if self.join {
            cmd.arg("--join").arg("--peer-url").arg(peer_url);
        }
        self.child = Some(cmd.spawn().expect("spawn raftkv-node"));
    }
}

/// Options for a test cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--snapshot-count`.
    pub snapshot_count: u64,
    /// `--request-timeout-ms`.
    pub request_timeout_ms: u64,
    /// Extra flags for every node.
    pub extra_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options { snapshot_count: 10_000, request_timeout_ms: 3_000, extra_args: Vec::new() }
    }
}

/// A cluster of real nodes on 127.0.0.1.
pub struct Cluster {
    /// Nodes by position (id = index + 1).
    pub nodes: Vec<NodeProc>,
    /// The folder holding data dirs and logs.
    pub dir: tempfile::TempDir,
    /// Options every node gets.
    pub opts: Options,
    initial: usize,
    /// Client for tests.
    pub http: Http,
}

impl Cluster {
    /// Starts `n` nodes and waits until they agree on a leader.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, Options::default())
    }

    /// Starts `n` nodes with options and waits for a leader.
    pub fn start_with(n: usize, opts: Options) -> Cluster {
        let dir = tempfile::Builder::new().prefix("raftkv-test-").tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            nodes.push(NodeProc {
                id,
                peer_port: free_port(),
                client_port: free_port(),
                data_dir: dir.path().join(format!("node-{id}")),
                log: dir.path().join(format!("node-{id}.log")),
                join: false,
                child: None,
            env: Vec::new(),
            });
        }
        let mut c = Cluster { nodes, dir, opts, initial: n, http: Http::default() };
        for id in 1..=n as u64 {
            c.spawn(id);
        }
        c.wait_leader(Duration::from_secs(20));
        c
    }

    /// The `--cluster` value: peer URLs of the initial members.
    pub fn cluster_flag(&self) -> String {
        self.nodes[..self.initial].iter().map(NodeProc::peer_url).collect::<Vec<_>>().join(",")
    }

    /// Node by id.
    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    /// Client URL of node `id`.
    pub fn url(&self, id: u64) -> String {
        self.node(id).url()
    }

    /// Starts (or restarts) node `id`'s process with the same flags.
    pub fn spawn(&mut self, id: u64) {
        let cluster = self.cluster_flag();
        let opts = self.opts.clone();
        let mut args = vec![
            "--snapshot-count".to_string(),
            opts.snapshot_count.to_string(),
            "--request-timeout-ms".to_string(),
            opts.request_timeout_ms.to_string(),
        ];
        args.extend(opts.extra_args);
        let n = &mut self.nodes[(id - 1) as usize];
        let peer_url = n.peer_url();
        n.start(&cluster, &peer_url, &args);
    }

    /// Adds a node process that starts with `--join` (not yet a raft member). Returns its id.
    pub fn spawn_joiner(&mut self) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        self.nodes.push(NodeProc {
            id,
            peer_port: free_port(),
            client_port: free_port(),
            data_dir: self.dir.path().join(format!("node-{id}")),
            log: self.dir.path().join(format!("node-{id}.log")),
            join: true,
            child: None,
            env: Vec::new(),
        });
        self.spawn(id);
        id
    }

    /// `kill -9` node `id` and reap it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.nodes[(id - 1) as usize].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal to node `id` (e.g. `libc::SIGSTOP`).
    pub fn signal(&self, id: u64, sig: i32) {
        if let Some(pid) = self.node(id).pid() {
            // SAFETY: kill(2) on a child process id we own.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// SIGTERM node `id` and wait (bounded) for it to exit; returns its exit code.
    pub fn terminate(&mut self, id: u64, timeout: Duration) -> Option<i32> {
        self.signal(id, libc::SIGTERM);
        self.wait_exit(id, timeout)
    }

    /// Waits (bounded) for node `id` to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<i32> {
        let n = &mut self.nodes[(id - 1) as usize];
        let child = n.child.as_mut()?;
        let status = wait_for(timeout, &format!("node {id} to exit"), || child.try_wait().ok().flatten());
        n.child = None;
        status.code()
    }

    /// Ids of running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.id).collect()
    }

    /// `GET /v1/status` of node `id`.
    pub fn status(&self, id: u64) -> Option<serde_json::Value> {
        let r = self.http.get(&format!("{}/v1/status", self.url(id))).ok()?;
        (r.status == StatusCode::OK).then(|| r.json())
    }

    /// Waits until every running member agrees on one leader; returns its id.
    pub fn wait_leader(&self, timeout: Duration) -> u64 {
        wait_for(timeout, "an agreed leader", || agreed_leader(&self.running(), |id| self.status(id)))
    }

    /// PUT via the raftexample route on node `id`; the status, or Err on transport failure.
    pub fn put(&self, id: u64, key: &str, value: &str) -> Result<StatusCode, String> {
        self.http.put(&format!("{}/{key}", self.url(id)), value.as_bytes().to_vec()).map(|r| r.status)
    }

    /// PUT, retried on 503/connection errors until `timeout`; panics if never acked.
    pub fn put_retry(&self, id: u64, key: &str, value: &str, timeout: Duration) {
        wait_for(timeout, &format!("PUT {key} on node {id}"), || match self.put(id, key, value) {
            Ok(s) if s.is_success() => Some(()),
            _ => None,
        })
    }

    /// Linearizable GET via the raftexample route: Some(value), None on 404, Err otherwise.
    pub fn get(&self, id: u64, key: &str) -> Result<Option<String>, String> {
        let r = self.http.get(&format!("{}/{key}", self.url(id)))?;
        match r.status {
            StatusCode::OK => Ok(Some(r.text())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(format!("GET {key} on node {id}: {s} {}", r.text())),
        }
    }

    /// Prints the last `lines` lines of every node log (used on failure).
    pub fn dump_logs(&self, lines: usize) {
        for n in &self.nodes {
            eprintln!("----- node {} log ({}) -----", n.id, n.log.display());
            for l in tail(&n.log, lines) {
                eprintln!("{l}");
            }
        }
    }
}

fn tail(path: &Path, lines: usize) -> Vec<String> {
    let Ok(f) = std::fs::File::open(path) else { return Vec::new() };
    let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].to_vec()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(40);
            if std::env::var("RAFTKV_KEEP_TEST_DIR").is_ok() {
                let p = self.dir.path().to_path_buf();
                eprintln!("keeping test dir {}", p.display());
                std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")));
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SAFETY: SIGCONT first so a paused node can die.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
