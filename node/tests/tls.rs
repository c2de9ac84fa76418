//! TLS on real processes: a 3-node cluster with mutual peer TLS and client TLS serves
//! https; stranger peers (self-signed certificate, no certificate, plaintext) are refused
//! at the handshake and never reach raft; the admin routes need the admin token;
//! plaintext clients get a clean refusal; bad TLS flags exit 2 before touching the data
//! directory. Certificates are made at test time with rcgen.

use std::process::Command;
use std::time::Duration;

use raft::eraftpb::{Message, MessageType};
use raftkv_node::transport::encode_frames;
use raftkv_tests::tls::{https_client, log_lines, self_signed, Pki, TlsCluster};
use raftkv_tests::{free_port, node_binary, wait_for, Http, StatusCode};

const T: Duration = Duration::from_secs(20);

fn member(members: &serde_json::Value, id: u64) -> Option<&serde_json::Value> {
    members["members"].as_array()?.iter().find(|m| m["id"] == id)
}

#[test]
fn mutual_tls_cluster_writes_and_reads_over_https() {
    let c = TlsCluster::start(3);
    let leader = c.wait_leader(T);
    for i in 0..20 {
        let url = format!("{}/key{i}", c.url(1 + i % 3));
        wait_for(T, "an https write", || {
            c.http.put(&url, format!("value{i}")).ok().filter(|r| r.status == StatusCode::NO_CONTENT)
        });
    }
    for id in 1..=3 {
        let r = c.http.get(&format!("{}/key19", c.url(id))).unwrap();
        assert_eq!((r.status, r.text()), (StatusCode::OK, "value19".to_string()), "node {id}");
        let r = c.http.get(&format!("{}/v1/kv/key7", c.url(id))).unwrap();
        assert_eq!(r.json()["value"], "value7");
    }
    // Replication really ran over the TLS peer links: every follower applied the writes.
    for id in (1..=3).filter(|i| *i != leader) {
        let r = c.http.get(&format!("{}/v1/kv/key0?consistency=serializable", c.url(id))).unwrap();
        assert_eq!(r.status, StatusCode::OK, "follower {id}: {}", r.text());
    }
    // The peer URLs the cluster knows are https.
    let m = c.http.get(&format!("{}/v1/members", c.url(1))).unwrap().json();
    for id in 1..=3 {
        assert_eq!(member(&m, id).unwrap()["peer_url"], c.peer_url(id));
    }
}

fn vote_request(from: u64, to: u64) -> bytes::Bytes {
    let m = Message {
        msg_type: MessageType::MsgRequestVote as i32,
        from,
        to,
        term: 1_000_000,
        log_term: 1_000_000,
        index: 1_000_000,
        ..Default::default()
    };
    encode_frames(&[m])
}

fn post_frames(http: &Http, url: &str, body: bytes::Bytes) -> Result<raftkv_tests::Resp, String> {
    http.call_with_token("POST", url, Some(body.to_vec()), None)
}

#[test]
fn stranger_peers_are_refused_at_the_handshake_and_never_reach_raft() {
    let c = TlsCluster::start(3);
    let leader = c.wait_leader(T);
    let victim = (1..=3).find(|i| *i != leader).unwrap();
    let raft_url = format!("{}/raft", c.peer_url(victim));
    let ca = c.pki.ca_pem();

    // A stranger with a self-signed certificate, one signed by another CA, and one with
    // no certificate at all: every one of them is refused.
    let stranger = self_signed(c.dir.path(), "stranger");
    let other_ca = Pki::new(c.dir.path(), "other");
    let other = other_ca.issue("peer", &["127.0.0.1"]);
    let clients = [
        ("self-signed", https_client(&ca, Some(&stranger), Duration::from_secs(5))),
        ("other CA", https_client(&ca, Some(&other), Duration::from_secs(5))),
        ("no certificate", https_client(&ca, None, Duration::from_secs(5))),
    ];
    for (what, http) in &clients {
        for _ in 0..3 {
            let r = post_frames(http, &raft_url, vote_request(99, victim));
            assert!(r.is_err(), "{what}: a stranger's raft frames were answered: {:?}", r.map(|r| (r.status, r.text())));
        }
    }
    // Plain HTTP to the peer port: a clean 400, never raft.
    let plain = Http::new(Duration::from_secs(5));
    let r = plain.post(&format!("http://127.0.0.1:{}/raft", c.node(victim).peer_port), vote_request(99, victim).to_vec()).unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.json()["code"], "tls_required");

    // Positive control: the same path with the cluster's peer certificate does reach the
    // peer handler (garbage frames get its 400), so the refusals above are the handshake's.
    let member_client = https_client(&ca, Some(&c.peer_cert), Duration::from_secs(5));
    let r = member_client.call_with_token("POST", &raft_url, Some(vec![1, 2]), None).unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(r.text().contains("truncated frame"), "{}", r.text());
    let r = member_client.get(&format!("{}/members", c.peer_url(victim))).unwrap();
    assert_eq!(r.status, StatusCode::OK);

    // The refusals are logged, the stranger's vote never moved the term, and no byte from
    // raft id 99 was counted, and the cluster still serves writes with the same leader.
    wait_for(T, "the handshake refusals in the log", || {
        let n = log_lines(&c.node(victim).log).iter().filter(|l| l.contains("TLS handshake failed")).count();
        (n >= 6).then_some(())
    });
    for id in 1..=3 {
        let st = c.status(id).unwrap();
        assert!(st["term"].as_u64().unwrap() < 1_000_000, "node {id} saw the stranger's term: {st}");
    }
    let metrics = c.http.get(&format!("{}/metrics", c.url(victim))).unwrap().text();
    assert!(!metrics.contains("from=\"99\""), "bytes from the stranger were counted");
    assert!(metrics.contains("raftkv_network_peer_received_bytes_total"), "the peer metric exists");
    wait_for(T, "a write after the strangers", || {
        c.http.put(&format!("{}/after", c.url(victim)), "ok").ok().filter(|r| r.status == StatusCode::NO_CONTENT)
    });
    assert_eq!(c.wait_leader(T), leader);
}

#[test]
fn admin_routes_need_the_token_and_plaintext_clients_are_refused() {
    let mut c = TlsCluster::start(3);
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let token = c.token.clone();
    let transfer = format!("{}/v1/leader/transfer", c.url(leader));

    // Missing → 401 with a challenge, wrong → 403, right → 200.
    let r = c.admin("POST", &transfer, "{}", None);
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["code"], "unauthenticated");
    let r = c.admin("POST", &transfer, "{}", Some("wrong-token-but-long-enough"));
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.json()["code"], "permission_denied");
    for (method, path) in [("POST", "/v1/members"), ("DELETE", "/v1/members/2"), ("POST", "/v1/members/2/promote"), ("POST", "/9"), ("DELETE", "/2")] {
        let r = c.admin(method, &format!("{}{path}", c.url(follower)), "", None);
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}: {}", r.text());
    }
    assert_eq!(c.wait_leader(T), leader, "a refused transfer moved leadership");
    let r = c.admin("POST", &transfer, "{}", Some(&token));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let new_leader = r.json()["leader"].as_u64().unwrap();
    assert_ne!(new_leader, leader);
    assert_eq!(c.wait_leader(T), new_leader);

    // Reads, key writes and probes need no token.
    assert_eq!(c.http.put(&format!("{}/k", c.url(follower)), "v").unwrap().status, StatusCode::NO_CONTENT);
    assert_eq!(c.http.get(&format!("{}/v1/members", c.url(follower))).unwrap().status, StatusCode::OK);
    for p in ["/healthz", "/metrics", "/v1/status"] {
        assert_eq!(c.http.get(&format!("{}{p}", c.url(follower))).unwrap().status, StatusCode::OK, "{p}");
    }

    let follower = (1..=3).find(|i| *i != new_leader).unwrap();
    // Membership with the token: an http:// peer URL is refused on a TLS cluster; a
    // joiner is added as a learner over mutual TLS and promoted via a follower (which
    // asks the leader's peer listener for its view, with the peer certificate).
    let r = c.admin("POST", &format!("{}/v1/members", c.url(follower)), r#"{"id":4,"peer_url":"http://127.0.0.1:1","learner":true}"#, Some(&token));
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(r.text().contains("https"), "{}", r.text());
    let id = c.spawn_joiner();
    let body = format!(r#"{{"id":{id},"peer_url":"{}","learner":true}}"#, c.peer_url(id));
    let r = c.admin("POST", &format!("{}/v1/members", c.url(follower)), &body, Some(&token));
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    wait_for(T, "the learner to catch up over TLS", || {
        let m = c.http.get(&format!("{}/v1/members", c.url(follower))).ok()?.json();
        let l = member(&m, id)?;
        (l["match_index"].as_u64()? >= m["commit_index"].as_u64()?).then_some(())
    });
    let promote = format!("{}/v1/members/{id}/promote", c.url(follower));
    let r = wait_for(T, "the promotion", || {
        Some(c.admin("POST", &promote, "", Some(&token))).filter(|r| r.status == StatusCode::OK)
    });
    assert_eq!(r.json()["role"], "voter");
    let r = c.http.get(&format!("{}/k", c.url(id))).unwrap();
    assert_eq!((r.status, r.text()), (StatusCode::OK, "v".to_string()));

    // Plaintext clients get a clean 400 naming the problem; the node stays up.
    let plain = Http::new(Duration::from_secs(5));
    let plain_url = format!("http://127.0.0.1:{}/k", c.node(follower).client_port);
    for _ in 0..3 {
        let r = plain.get(&plain_url).unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.json()["code"], "tls_required");
    }
    // Raw garbage and a connection closed mid-handshake are shrugged off too.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", c.node(follower).client_port)).unwrap();
        let _ = s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3]);
    }
    assert!(c.alive(follower));
    assert_eq!(c.http.get(&format!("{}/healthz", c.url(follower))).unwrap().status, StatusCode::OK);
}

#[test]
fn client_cert_auth_requires_a_client_certificate_from_the_ca() {
    let c = TlsCluster::start_with(1, |pki| {
        vec!["--trusted-ca-file".into(), pki.ca_file().display().to_string(), "--client-cert-auth".into()]
    });
    let url = format!("{}/v1/status", c.url(1));
    // The cluster's client (it presents a certificate from the CA) is served.
    assert_eq!(c.http.get(&url).unwrap().status, StatusCode::OK);
    // No certificate, or one from another CA: refused at the handshake.
    let other = Pki::new(c.dir.path(), "other-client").issue("client", &["client.raftkv.test"]);
    for (what, cert) in [("no certificate", None), ("other CA", Some(&other))] {
        let http = https_client(&c.pki.ca_pem(), cert, Duration::from_secs(5));
        let r = http.get(&url);
        assert!(r.is_err(), "{what}: served {:?}", r.map(|r| r.status));
    }
    assert!(c.http.get(&format!("{}/healthz", c.url(1))).unwrap().status.is_success());
}

/// Runs the node binary with `args`; returns (exit code, stderr).
fn run_node(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(node_binary()).args(args).output().expect("run raftkv-node");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_tls_flags_exit_2_before_touching_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "ca");
    let cert = pki.issue("node", &["127.0.0.1"]);
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let data = dir.path().join("data");
    let p = |p: &std::path::Path| p.display().to_string();
    let base = |cluster: &str| -> Vec<String> {
        vec!["--id".into(), "1".into(), "--cluster".into(), cluster.into(), "--port".into(), "1".into(), "--data-dir".into(), p(&data)]
    };
    let peer = vec![
        "--peer-cert-file".to_string(),
        p(&cert.cert),
        "--peer-key-file".into(),
        p(&cert.key),
        "--peer-trusted-ca-file".into(),
        p(&pki.ca_file()),
    ];
    let client = vec!["--cert-file".to_string(), p(&cert.cert), "--key-file".into(), p(&cert.key)];
    let cases: Vec<(Vec<String>, &str)> = vec![
        ([base("https://127.0.0.1:7001"), client.clone(), peer.clone()].concat(), "--admin-token-file"),
        ([base("http://127.0.0.1:7001"), peer.clone()].concat(), "must be https://"),
        (base("https://127.0.0.1:7001"), "peer TLS is not configured"),
        ([base("https://127.0.0.1:7001"), peer[..4].to_vec()].concat(), "--peer-trusted-ca-file"),
        ([base("http://127.0.0.1:7001"), client[2..].to_vec(), vec!["--admin-token-file".into(), p(&token)]].concat(), "--key-file needs --cert-file"),
        (
            [base("http://127.0.0.1:7001"), vec!["--cert-file".into(), p(&garbage), "--key-file".into(), p(&cert.key), "--admin-token-file".into(), p(&token)]].concat(),
            "garbage.pem",
        ),
        (
            [base("http://127.0.0.1:7001"), client.clone(), vec!["--admin-token-file".into(), p(&dir.path().join("missing"))]].concat(),
            "cannot read",
        ),
        ([base("http://127.0.0.1:7001"), client.clone(), vec!["--admin-token-file".into(), p(&token), "--client-cert-auth".into()]].concat(), "--trusted-ca-file"),
    ];
    for (args, want) in cases {
        let (code, stderr) = run_node(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
        assert!(!data.exists(), "{args:?} created the data dir");
    }
    // The same files, complete and consistent, are accepted: the node gets past its
    // configuration and creates its data dir (then it is stopped).
    let (peer_port, client_port) = (free_port(), free_port());
    let mut ok = [base(&format!("https://127.0.0.1:{peer_port}")), client, peer, vec!["--admin-token-file".into(), p(&token)]].concat();
    ok.extend(["--listen-client-addr".to_string(), format!("127.0.0.1:{client_port}")]);
    let mut child = Command::new(node_binary()).args(&ok).stderr(std::process::Stdio::null()).spawn().unwrap();
    let started = std::panic::catch_unwind(|| wait_for(T, "the data dir of a good TLS config", || data.exists().then_some(())));
    let _ = child.kill();
    let _ = child.wait();
    assert!(started.is_ok(), "a good TLS configuration did not start");
}
