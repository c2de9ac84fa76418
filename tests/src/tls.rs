//! TLS test support: a throw-away PKI made with rcgen at test time (no checked-in keys),
//! https clients, and [`TlsCluster`] — real `raftkv-node` processes with mutual peer
//! TLS, client TLS and an admin token, on 127.0.0.1 (certificates carry IP SAN
//! 127.0.0.1, so hostname verification is real).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{free_port, wait_for, Http, NodeProc, Resp, StatusCode};

/// A certificate authority whose certificates and keys live as PEM files in a folder.
pub struct Pki {
    dir: PathBuf,
    name: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// Certificate chain (leaf only).
    pub cert: PathBuf,
    /// Private key (PKCS#8).
    pub key: PathBuf,
}

impl CertFiles {
    /// Certificate and key concatenated (what `reqwest::Identity::from_pem` wants).
    pub fn identity_pem(&self) -> Vec<u8> {
        let mut pem = std::fs::read(&self.cert).expect("read cert");
        pem.extend(std::fs::read(&self.key).expect("read key"));
        pem
    }
}

impl Pki {
    /// A new CA named `name`, writing `<name>-ca.pem` into `dir`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&ca_key).expect("ca cert");
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).expect("write ca");
        Pki { dir: dir.to_path_buf(), name: name.to_string(), ca, ca_key }
    }

    /// The CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> Vec<u8> {
        self.ca.pem().into_bytes()
    }

    /// Issues a certificate for `sans` (IP addresses or DNS names), usable as server
    /// and client certificate, written as `<ca>-<file>.pem` / `<ca>-<file>-key.pem`.
    pub fn issue(&self, file: &str, sans: &[&str]) -> CertFiles {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(rcgen::DnType::CommonName, file);
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).expect("leaf cert");
        let files = CertFiles {
            cert: self.dir.join(format!("{}-{file}.pem", self.name)),
            key: self.dir.join(format!("{}-{file}-key.pem", self.name)),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

/// A self-signed certificate for 127.0.0.1 (its own CA: a stranger's certificate).
pub fn self_signed(dir: &Path, file: &str) -> CertFiles {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("self-signed");
    let files = CertFiles { cert: dir.join(format!("{file}.pem")), key: dir.join(format!("{file}-key.pem")) };
    std::fs::write(&files.cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&files.key, ck.key_pair.serialize_pem()).expect("write key");
    files
}

/// An https client trusting `ca_pem` (PEM), presenting `identity` when given.
pub fn https_client(ca_pem: &[u8], identity: Option<&CertFiles>, timeout: Duration) -> Http {
    let mut b = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).expect("CA PEM"))
        .timeout(timeout)
        .no_proxy()
        .pool_max_idle_per_host(4);
    if let Some(id) = identity {
        b = b.identity(reqwest::Identity::from_pem(&id.identity_pem()).expect("identity PEM"));
    }
    Http { client: b.build().expect("https client"), timeout }
}

impl Http {
    /// Sends a request with `Authorization: Bearer <token>` when `token` is given.
    pub fn call_with_token(&self, method: &str, url: &str, body: Option<Vec<u8>>, token: Option<&str>) -> Result<Resp, String> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self.client.request(m, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().map_err(|e| format!("{e:?}"))?;
        let status = resp.status();
        let body = resp.bytes().map_err(|e| e.to_string())?.to_vec();
        Ok(Resp { status, body })
    }
}

/// A cluster of real nodes with client TLS, mutual peer TLS and an admin token.
pub struct TlsCluster {
    /// Nodes by position (id = index + 1). Use [`TlsCluster::url`], not `NodeProc::url`.
    pub nodes: Vec<NodeProc>,
    /// Data dirs, logs, PEM files.
    pub dir: tempfile::TempDir,
    /// The cluster CA (signs the client and peer certificates).
    pub pki: Pki,
    /// The admin token.
    pub token: String,
    /// The admin token file.
    pub token_file: PathBuf,
    /// Peer certificate of every node (one certificate for 127.0.0.1 serves all).
    pub peer_cert: CertFiles,
    /// Client listener certificate.
    pub server_cert: CertFiles,
    /// A client certificate from the cluster CA.
    pub client_cert: CertFiles,
    /// An https client trusting the cluster CA and presenting `client_cert`.
    pub http: Http,
    /// Extra flags every node gets.
    pub extra_args: Vec<String>,
    initial: usize,
}

impl TlsCluster {
    /// Starts `n` TLS nodes and waits until they agree on a leader.
    pub fn start(n: usize) -> TlsCluster {
        Self::start_with(n, |_| Vec::new())
    }

    /// Starts `n` TLS nodes with extra flags (made from the cluster's CA) and waits
    /// until they agree on a leader.
    pub fn start_with(n: usize, extra: impl FnOnce(&Pki) -> Vec<String>) -> TlsCluster {
        let dir = tempfile::Builder::new().prefix("raftkv-tls-test-").tempdir().expect("tempdir");
        let pki = Pki::new(dir.path(), "cluster");
        let peer_cert = pki.issue("peer", &["127.0.0.1", "localhost"]);
        let server_cert = pki.issue("server", &["127.0.0.1", "localhost"]);
        let token = format!("admin-{:032x}", rand::random::<u128>());
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, format!("{token}\n")).expect("write token");
        let client_cert = pki.issue("client", &["client.raftkv.test"]);
        let http = https_client(&pki.ca_pem(), Some(&client_cert), Duration::from_secs(15));
        let nodes = (1..=n as u64).map(|id| Self::new_node(dir.path(), id, false)).collect();
        let extra_args = extra(&pki);
        let mut c = TlsCluster { nodes, dir, pki, token, token_file, peer_cert, server_cert, client_cert, http, extra_args, initial: n };
        for id in 1..=n as u64 {
            c.spawn(id);
        }
        c.wait_leader(Duration::from_secs(20));
        c
    }

    fn new_node(dir: &Path, id: u64, join: bool) -> NodeProc {
        NodeProc {
            id,
            peer_port: free_port(),
            client_port: free_port(),
            data_dir: dir.join(format!("node-{id}")),
            log: dir.join(format!("node-{id}.log")),
            join,
            child: None,
            env: Vec::new(),
        }
    }

    /// `https://127.0.0.1:<client port>` of node `id`.
    pub fn url(&self, id: u64) -> String {
        format!("https://127.0.0.1:{}", self.node(id).client_port)
    }

    /// `https://127.0.0.1:<peer port>` of node `id`.
    pub fn peer_url(&self, id: u64) -> String {
        format!("https://127.0.0.1:{}", self.node(id).peer_port)
    }

    /// Node by id.
    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    /// The TLS flags every node gets.
    pub fn tls_args(&self) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        vec![
            "--peer-cert-file".into(),
            p(&self.peer_cert.cert),
            "--peer-key-file".into(),
            p(&self.peer_cert.key),
            "--peer-trusted-ca-file".into(),
            p(&self.pki.ca_file()),
            "--cert-file".into(),
            p(&self.server_cert.cert),
            "--key-file".into(),
            p(&self.server_cert.key),
            "--admin-token-file".into(),
            p(&self.token_file),
        ]
    }

    /// Starts node `id`'s process.
    pub fn spawn(&mut self, id: u64) {
        let cluster = (1..=self.initial as u64).map(|i| self.peer_url(i)).collect::<Vec<_>>().join(",");
        let mut args = vec!["--request-timeout-ms".to_string(), "3000".to_string()];
        args.extend(self.tls_args());
        args.extend(self.extra_args.iter().cloned());
        let peer_url = self.peer_url(id);
        self.nodes[(id - 1) as usize].start(&cluster, &peer_url, &args);
    }

    /// Adds a node process started with `--join` (not yet a member). Returns its id.
    pub fn spawn_joiner(&mut self) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        self.nodes.push(Self::new_node(self.dir.path(), id, true));
        self.spawn(id);
        id
    }

    /// Whether node `id`'s process is still running.
    pub fn alive(&mut self, id: u64) -> bool {
        let n = &mut self.nodes[(id - 1) as usize];
        n.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `GET /v1/status` of node `id` over https.
    pub fn status(&self, id: u64) -> Option<serde_json::Value> {
        let r = self.http.get(&format!("{}/v1/status", self.url(id))).ok()?;
        (r.status == StatusCode::OK).then(|| r.json())
    }

    /// Waits until every running node agrees on one leader; returns its id.
    pub fn wait_leader(&self, timeout: Duration) -> u64 {
        let running: Vec<u64> = self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.id).collect();
        wait_for(timeout, "an agreed leader (TLS cluster)", || crate::agreed_leader(&running, |id| self.status(id)))
    }

    /// A request with the admin token (`with_token`) or without.
    pub fn admin(&self, method: &str, url: &str, body: &str, token: Option<&str>) -> Resp {
        self.http
            .call_with_token(method, url, Some(body.as_bytes().to_vec()), token)
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    /// Prints the last `lines` lines of every node log.
    pub fn dump_logs(&self, lines: usize) {
        for n in &self.nodes {
            eprintln!("----- node {} log ({}) -----", n.id, n.log.display());
            for l in log_lines(&n.log).iter().rev().take(lines).rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Every line of a log file (empty when unreadable).
pub fn log_lines(path: &Path) -> Vec<String> {
    let Ok(f) = std::fs::File::open(path) else { return Vec::new() };
    BufReader::new(f).lines().map_while(Result::ok).collect()
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(40);
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
