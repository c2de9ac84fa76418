//! `raftkv-node backup` on real processes: it skips endpoints that are dead, answer an
//! error, time out or send a damaged or cut file, writes timestamped backups into a folder
//! and prunes the older ones to `--keep` without touching other files; the newest one
//! restores into a new cluster; over https it checks the server against `--cacert`; bad
//! flags exit 2 and a run where no endpoint delivers exits 1, leaving nothing behind.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use raftkv_node::backup::verify;
use raftkv_tests::tls::{self_signed, TlsCluster};
use raftkv_tests::{free_port, node_binary, wait_for, Cluster, Options, StatusCode};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

/// A finished `raftkv-node backup` run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Kills and reaps the child if the test gives up on it.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `raftkv-node backup <args>` and waits (bounded) for it to exit.
fn backup(args: &[&str]) -> Run {
    let child = Command::new(node_binary())
        .arg("backup")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn raftkv-node backup");
    let mut child = Reap(child);
    let status = wait_for(Duration::from_secs(60), "raftkv-node backup to exit", || child.0.try_wait().ok().flatten());
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    Run { code: status.code(), stdout, stderr }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The one JSON line of a successful run, checked against the file it names; returns
/// the file and its applied index.
fn check_output(r: &Run, dir: &Path, endpoint: &str) -> (PathBuf, u64, Value) {
    assert_eq!(r.code, Some(0), "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    let j: Value = serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stdout));
    assert_eq!(j["endpoint"], endpoint, "{j}");
    let file = PathBuf::from(j["file"].as_str().unwrap());
    assert_eq!(file.parent(), Some(dir), "{j}");
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    let applied = j["applied_index"].as_u64().unwrap();
    assert!(name.starts_with("backup-") && name.len() == 47, "{name}");
    assert!(name.ends_with(&format!("Z-{applied:016x}.raftkv")), "{name} vs applied index {applied}");
    assert_eq!(j["bytes"].as_u64(), Some(std::fs::metadata(&file).unwrap().len()), "{j}");
    let info = verify(&file).unwrap();
    assert_eq!(info.applied_index, applied);
    (file, applied, j)
}

#[test]
fn backup_cli_skips_a_dead_endpoint_prunes_to_keep_and_the_newest_backup_restores() {
    let c = Cluster::start(3);
    for i in 0..20 {
        c.put_retry(1 + i % 3, &format!("k{i}"), &format!("v{i}"), T);
    }
    let dir = c.dir.path().join("backups");
    std::fs::create_dir(&dir).unwrap();
    // Files that are not backups of this pattern stay; a matching one (older than any
    // new backup) is pruned like one.
    let others = ["notes.txt", "backup-20000101T000000Z-0000000000000001.raftkv.bak", "backup-old.raftkv"];
    for f in others {
        std::fs::write(dir.join(f), format!("{f} stays")).unwrap();
    }
    let stale = dir.join("backup-20000101T000000Z-0000000000000001.raftkv");
    std::fs::write(&stale, "an old backup").unwrap();

    let dead = format!("http://127.0.0.1:{}", free_port());
    let live = c.url(2);
    let endpoints = format!("{dead},{live}/");
    let mut taken: Vec<(PathBuf, u64)> = Vec::new();
    for run in 0..3 {
        let r = backup(&["--endpoints", &endpoints, "--dir", s(&dir), "--keep", "2", "--timeout", "30"]);
        let (file, applied, j) = check_output(&r, &dir, &live);
        assert!(r.stderr.contains(&dead), "the dead endpoint's failure is told: {}", r.stderr);
        let pruned: Vec<&str> = j["pruned"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        let want: Vec<&str> = match run {
            0 => vec![],
            1 => vec![s(&stale)],
            _ => vec![s(&taken[0].0)],
        };
        assert_eq!(pruned, want, "run {run}: {j}");
        if let Some((_, before)) = taken.last() {
            assert!(applied > *before, "run {run}: applied index {applied} after {before}");
        }
        taken.push((file, applied));
        c.put_retry(1, &format!("between{run}"), &format!("after backup {run}"), T);
    }
    // Exactly the two newest backups, the other files and the runs' lock file; no
    // temporary file.
    let mut want: BTreeSet<String> = others.iter().map(|f| f.to_string()).collect();
    want.insert(".backup.lock".to_string());
    for (f, _) in &taken[1..] {
        want.insert(f.file_name().unwrap().to_str().unwrap().to_string());
    }
    assert_eq!(names(&dir), want);
    for f in others {
        assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap(), format!("{f} stays"));
    }

    // The newest backup starts a new cluster holding every write made before it.
    let newest = taken[2].0.clone();
    let opts = Options { extra_args: vec!["--restore-from".into(), s(&newest).into()], ..Options::default() };
    let d = Cluster::start_with(1, opts);
    for i in 0..20 {
        assert_eq!(d.get(1, &format!("k{i}")).unwrap().as_deref(), Some(format!("v{i}").as_str()), "k{i}");
    }
    assert_eq!(d.get(1, "between0").unwrap().as_deref(), Some("after backup 0"));
    assert_eq!(d.get(1, "between1").unwrap().as_deref(), Some("after backup 1"));
    assert_eq!(d.get(1, "between2").unwrap(), None, "written after the newest backup");
}

/// A one-connection HTTP server on 127.0.0.1 that reads a request and answers `response`
/// (or, when `None`, never answers and waits for the client to hang up). Returns its URL.
fn fake_server(response: Option<Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else { return };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        match response {
            Some(r) => {
                let _ = conn.write_all(&r);
            }
            // Until the client gives up and closes the connection.
            None => while matches!(conn.read(&mut buf), Ok(n) if n > 0) {},
        }
    });
    url
}

fn answer(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nconnection: close\r\n{headers}\r\n").into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn backup_cli_exits_1_leaving_nothing_when_no_endpoint_delivers_and_2_on_bad_flags() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("backups");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "stays").unwrap();
    let before = names(&dir);

    // A backup-shaped file whose checksum is wrong.
    let mut damaged = b"RAFTKVBK".to_vec();
    damaged.extend_from_slice(&1u32.to_le_bytes());
    damaged.extend_from_slice(&5u64.to_le_bytes());
    damaged.extend_from_slice(&10u64.to_le_bytes());
    damaged.extend_from_slice(&[7u8; 10]);
    damaged.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
    let dead = format!("http://127.0.0.1:{}", free_port());
    let unavailable = fake_server(Some(answer("503 Service Unavailable", "content-length: 26\r\n", br#"{"code":"no_leader_here"}"#)));
    let bad_file = fake_server(Some(answer("200 OK", &format!("content-length: {}\r\n", damaged.len()), &damaged)));
    let cut = fake_server(Some(answer("200 OK", "content-length: 100000\r\n", &damaged)));
    let silent = fake_server(None);
    let endpoints = [dead.as_str(), &unavailable, &bad_file, &cut, &silent].join(",");
    let r = backup(&["--endpoints", &endpoints, "--dir", s(&dir), "--timeout", "2"]);
    assert_eq!(r.code, Some(1), "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "", "no result line");
    let lines: Vec<&str> = r.stderr.lines().collect();
    let line = |endpoint: &str| {
        let at = format!("{endpoint}: ");
        lines.iter().find(|l| l.contains(&at)).unwrap_or_else(|| panic!("{endpoint} not in {}", r.stderr)).to_string()
    };
    assert!(line(&dead).contains("onnect"), "{}", r.stderr);
    assert!(line(&unavailable).contains("503") && line(&unavailable).contains("no_leader_here"), "{}", r.stderr);
    assert!(line(&bad_file).contains("checksum"), "{}", r.stderr);
    assert!(line(&cut).contains("cut"), "{}", r.stderr);
    assert!(line(&silent).contains("--timeout 2"), "{}", r.stderr);
    assert!(r.stderr.contains("no endpoint delivered a good backup (5 tried)"), "{}", r.stderr);
    assert_eq!(names(&dir), before, "no backup and no temporary file left");

    // Bad flags: exit 2 with a usage message, before any transfer.
    let file = dir.join("notes.txt");
    for (args, want) in [
        (vec!["--endpoints", &dead, "--dir", s(&dir), "--keep", "0"], "--keep"),
        (vec!["--dir", s(&dir)], "--endpoints"),
        (vec!["--endpoints", "", "--dir", s(&dir)], "no endpoint"),
        (vec!["--endpoints", "ftp://127.0.0.1:1", "--dir", s(&dir)], "http://"),
        (vec!["--endpoints", "127.0.0.1:1", "--dir", s(&dir)], "http://"),
        (vec!["--endpoints", &dead, "--dir", s(&file)], "not a directory"),
        (vec!["--endpoints", "https://127.0.0.1:1", "--dir", s(&dir), "--cacert", s(&file)], "--cacert"),
    ] {
        let r = backup(&args);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want) && r.stderr.contains("Usage: raftkv-node backup"), "{args:?}: {}", r.stderr);
    }
    assert_eq!(names(&dir), before);
    // A missing DIR is created.
    let new_dir = t.path().join("a/b");
    let r = backup(&["--endpoints", &dead, "--dir", s(&new_dir)]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(new_dir.is_dir() && names(&new_dir).is_empty());

    // `backup --help` documents every flag; the node's own flags are untouched.
    let r = backup(&["--help"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for flag in ["--endpoints", "--dir", "--keep", "--timeout", "--cacert", "--serializable"] {
        assert!(r.stdout.contains(flag), "{flag}: {}", r.stdout);
    }
    let out = Command::new(node_binary()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && help.contains("--cluster") && !help.contains("--endpoints"), "{help}");
}

#[test]
fn backup_cli_over_https_verifies_the_server_against_cacert() {
    let c = TlsCluster::start(1);
    let url = c.url(1);
    wait_for(T, "an https write", || c.http.put(&format!("{url}/v1/kv/secure"), "yes").ok().filter(|r| r.status == StatusCode::OK));
    let dir = c.dir.path().join("backups");
    let ca = c.pki.ca_file();
    let r = backup(&["--endpoints", &url, "--dir", s(&dir), "--cacert", s(&ca), "--serializable"]);
    let (_, applied, _) = check_output(&r, &dir, &url);
    assert!(applied > 0);
    let kept = names(&dir);
    // A server whose certificate does not chain to --cacert is refused.
    let stranger = self_signed(c.dir.path(), "stranger");
    let r = backup(&["--endpoints", &url, "--dir", s(&dir), "--cacert", s(&stranger.cert)]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.to_lowercase().contains("certificate"), "{}", r.stderr);
    assert_eq!(names(&dir), kept);
}

#[test]
fn backup_cli_presents_a_client_certificate_to_members_that_require_one() {
    let c = TlsCluster::start_with(1, |pki| vec!["--trusted-ca-file".into(), pki.ca_file().display().to_string(), "--client-cert-auth".into()]);
    let url = c.url(1);
    wait_for(T, "an https write", || c.http.put(&format!("{url}/v1/kv/secure"), "yes").ok().filter(|r| r.status == StatusCode::OK));
    let dir = c.dir.path().join("backups");
    let ca = c.pki.ca_file();
    // Without a certificate the member refuses the handshake: no backup, exit 1.
    let r = backup(&["--endpoints", &url, "--dir", s(&dir), "--cacert", s(&ca)]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));
    // With the cluster CA's client certificate it is let in.
    let (cert, key) = (&c.client_cert.cert, &c.client_cert.key);
    let r = backup(&["--endpoints", &url, "--dir", s(&dir), "--cacert", s(&ca), "--cert", s(cert), "--key", s(key)]);
    let (_, applied, _) = check_output(&r, &dir, &url);
    assert!(applied > 0);
}
