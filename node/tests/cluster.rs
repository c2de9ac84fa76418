//! Cluster tests on real `raftkv-node` processes (issue: raftexample rebuilt, durable and
//! linearizable). Each test starts its own cluster on 127.0.0.1 with fresh data dirs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftkv_tests::{wait_for, Cluster, Http, Options, StatusCode};

const T: Duration = Duration::from_secs(20);

#[test]
fn write_on_one_node_is_read_on_every_other_at_once() {
    let c = Cluster::start(3);
    for round in 0..20 {
        let writer = (round % 3) + 1;
        let value = format!("v{round}");
        assert_eq!(c.put(writer, "k", &value).unwrap(), StatusCode::NO_CONTENT);
        // The PUT was acknowledged: a linearizable read anywhere must see it, immediately.
        for reader in 1..=3 {
            assert_eq!(c.get(reader, "k").unwrap().as_deref(), Some(value.as_str()), "stale read on node {reader}");
        }
    }
    // The versioned API agrees and carries the revision.
    let r = c.http.get(&format!("{}/v1/kv/k", c.url(2))).unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["value"], "v19");
    assert!(r.json()["revision"].as_u64().unwrap() > 1);
}

#[test]
fn kill_9_of_every_node_loses_no_acked_write() {
    let mut c = Cluster::start(3);
    for i in 0..200 {
        c.put_retry((i % 3) + 1, &format!("key{i}"), &format!("value{i}"), T);
    }
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.spawn(id);
    }
    c.wait_leader(T);
    for i in 0..200 {
        let got = wait_for(T, "a read after restart", || c.get((i % 3) + 1, &format!("key{i}")).ok());
        assert_eq!(got.as_deref(), Some(format!("value{i}").as_str()), "key{i} lost");
    }
}

#[test]
fn acked_writes_from_8_clients_survive_kill_9_mid_load() {
    let mut c = Cluster::start(3);
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = (1..=3).map(|id| c.url(id)).collect();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (acked, stop, urls) = (acked.clone(), stop.clone(), urls.clone());
            std::thread::spawn(move || {
                let http = Http::new(Duration::from_secs(5));
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 5_000 {
                    let key = format!("w{w}-{i}");
                    let val = format!("{w}:{i}");
                    let url = format!("{}/{key}", urls[(i as usize + w) % 3]);
                    if let Ok(r) = http.put(&url, val.clone()) {
                        if r.status.is_success() {
                            acked.lock().unwrap().insert(key, val);
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    wait_for(T, "some acked writes", || (acked.lock().unwrap().len() >= 300).then_some(()));
    for id in 1..=3 {
        c.kill(id);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for id in 1..=3 {
        c.spawn(id);
    }
    c.wait_leader(T);
    for (n, (k, v)) in acked.iter().enumerate() {
        let got = wait_for(T, "a read after restart", || c.get((n as u64 % 3) + 1, k).ok());
        assert_eq!(got.as_deref(), Some(v.as_str()), "acked write {k} lost");
    }
    eprintln!("{} acked writes checked", acked.len());
}

#[test]
fn follower_down_across_snapshot_and_compaction_catches_up() {
    let mut c = Cluster::start_with(3, Options { snapshot_count: 50, ..Default::default() });
    let leader = c.wait_leader(T);
    let down = (1..=3).find(|id| *id != leader).unwrap();
    c.kill(down);
    let up = (1..=3).find(|id| *id != down).unwrap();
    // Well past several snapshots and the compaction point (tail <= snapshot count).
    for i in 0..400 {
        c.put_retry(up, &format!("s{i}"), &format!("{i}"), T);
    }
    // Snapshots are saved off the raft loop: wait for the one past 350 (a slow disk may
    // still be writing it when the last put is answered).
    wait_for(T, "a snapshot past index 350 on the live side", || {
        (c.status(up)?["snapshot_index"].as_u64()? >= 350).then_some(())
    });
    c.spawn(down);
    // Serializable reads on the revived node show its own state: it must catch up.
    wait_for(T, "the follower to catch up by snapshot", || {
        let r = c.http.get(&format!("{}/v1/kv/s399?consistency=serializable", c.url(down))).ok()?;
        (r.status == StatusCode::OK && r.json()["value"] == "399").then_some(())
    });
    for i in (0..400).step_by(37) {
        let r = c.http.get(&format!("{}/v1/kv/s{i}?consistency=serializable", c.url(down))).unwrap();
        assert_eq!(r.json()["value"], format!("{i}"));
    }
}

/// The value of `raftkv_disk_snapshots_saved_total{kind}` on node `id`.
fn snapshots_saved(c: &Cluster, id: u64, kind: &str) -> u64 {
    let text = c
        .http
        .get(&format!("{}/metrics", c.url(id)))
        .map(|r| r.text())
        .unwrap_or_default();
    let line = format!("raftkv_disk_snapshots_saved_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn kill_9_of_every_node_with_delta_snapshots_in_force_loses_nothing() {
    let mut c = Cluster::start_with(
        3,
        Options {
            snapshot_count: 100,
            ..Default::default()
        },
    );
    let mut model = BTreeMap::new();
    for i in 0..600 {
        let (k, v) = (format!("d{i:03}"), format!("first {i}"));
        c.put_retry((i % 3) + 1, &k, &v, T);
        model.insert(k, v);
    }
    // Some deletes, then a few keys over and over: the next snapshots are small deltas,
    // so the deletes are in a delta of the chain in force when every member is killed.
    for i in (5..600).step_by(50) {
        let k = format!("d{i:03}");
        let r = c.http.delete(&format!("{}/v1/kv/{k}", c.url(1))).unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        model.remove(&k);
    }
    for round in 0..50 {
        for i in (0..600).step_by(60) {
            let (k, v) = (format!("d{i:03}"), format!("round {round}"));
            c.put_retry(round % 3 + 1, &k, &v, T);
            model.insert(k, v);
        }
    }
    for id in 1..=3 {
        // Every member saved deltas (so the restart below restores a chain).
        wait_for(T, "a delta snapshot on every member", || {
            (snapshots_saved(&c, id, "delta") > 0).then_some(())
        });
    }
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.spawn(id);
    }
    c.wait_leader(T);
    let list = |id: u64| -> Option<BTreeMap<String, String>> {
        // Serializable: this member's own state, restored from its chain and its WAL.
        let r = c
            .http
            .get(&format!(
                "{}/v1/kv?prefix=d&limit=1000&consistency=serializable",
                c.url(id)
            ))
            .ok()?;
        (r.status == StatusCode::OK).then_some(())?;
        let items = r.json()["items"].as_array()?.clone();
        Some(
            items
                .iter()
                .map(|kv| {
                    (
                        kv["key"].as_str().unwrap_or_default().into(),
                        kv["value"].as_str().unwrap_or_default().into(),
                    )
                })
                .collect(),
        )
    };
    for id in 1..=3 {
        // It may still be learning the last commits from the leader: wait, then compare.
        let deadline = Instant::now() + T / 2;
        let got = wait_for(T, "the member to list its keys", || {
            list(id).filter(|got| *got == model || Instant::now() > deadline)
        });
        assert_eq!(got, model, "member {id} after restart");
    }
}

#[test]
fn a_follower_behind_a_delta_snapshot_catches_up_with_no_write_after_it() {
    let mut c = Cluster::start_with(3, Options { snapshot_count: 50, ..Default::default() });
    let leader = c.wait_leader(T);
    let down = (1..=3).find(|id| *id != leader).unwrap();
    c.kill(down);
    // Enough keys that snapshots become deltas (a delta must touch under half the keys).
    for i in 0..400 {
        c.put_retry(leader, &format!("u{i:03}"), "first", T);
    }
    // Rewrite a few keys one at a time until a write triggers a delta snapshot and then
    // stop: the leader's snapshot in force is a delta at its applied index, the log
    // before it is compacted, and nothing more is applied. The follower's full snapshot
    // must then be made from that state, with no write to trigger it.
    let index = |st: &serde_json::Value, k: &str| st[k].as_u64().unwrap_or(0);
    let mut n = 0u64;
    let (key, last) = loop {
        assert!(n < 3000, "no write ended on a delta snapshot");
        let before = c.status(leader).expect("status");
        let deltas = snapshots_saved(&c, leader, "delta");
        let (key, value) = (format!("u{:03}", n % 10), format!("w{n}"));
        n += 1;
        c.put_retry(leader, &key, &value, T);
        let applied = index(&c.status(leader).expect("status"), "applied_index");
        if applied - index(&before, "snapshot_index") < 50 {
            continue;
        }
        // This write triggered a snapshot at `applied`: wait for it, then see its kind.
        // (If one was still being saved, the next lands at an earlier index: go on.)
        let deadline = Instant::now() + Duration::from_secs(3);
        let at_applied = || index(&c.status(leader).unwrap_or_default(), "snapshot_index") == applied;
        while !at_applied() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if at_applied() && snapshots_saved(&c, leader, "delta") > deltas {
            break (key, value);
        }
    };
    c.spawn(down);
    // Usually by a full snapshot made at the delta's index for it (the newest full one
    // is compacted past); if a full one made earlier is still usable, by that one.
    wait_for(T, "the follower to catch up", || {
        let st = c.status(down)?;
        (index(&st, "applied_index") >= index(&c.status(leader)?, "applied_index")).then_some(())
    });
    for i in 0..10 {
        let r = c.http.get(&format!("{}/v1/kv/u{i:03}?consistency=serializable", c.url(down))).unwrap();
        assert_eq!(r.status, StatusCode::OK, "u{i:03}: {}", r.text());
    }
    let r = c.http.get(&format!("{}/v1/kv/{key}?consistency=serializable", c.url(down))).unwrap();
    assert_eq!(r.json()["value"], last.as_str(), "the follower has the last write");
}

#[test]
fn a_fourth_node_joins_with_join() {
    let mut c = Cluster::start(3);
    c.put_retry(1, "before", "join", T);
    let id = c.spawn_joiner();
    // Waiting to be added: alive, not ready, no panic.
    wait_for(T, "the joiner to serve /healthz", || {
        c.http.get(&format!("{}/healthz", c.url(id))).ok().filter(|r| r.status == StatusCode::OK)
    });
    let r = c.http.get(&format!("{}/readyz", c.url(id))).unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // raftexample's way: POST /<id> with the peer URL.
    let r = c.http.post(&format!("{}/{id}", c.url(2)), c.node(id).peer_url()).unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    c.put_retry(3, "after", "join", T);
    wait_for(T, "the joiner to read both keys", || {
        (c.get(id, "before").ok()?? == "join" && c.get(id, "after").ok()?? == "join").then_some(())
    });
    let members = c.http.get(&format!("{}/v1/members", c.url(id))).unwrap().json();
    assert_eq!(members["members"].as_array().unwrap().len(), 4);
    // And it survives a restart as a full member.
    c.kill(id);
    c.spawn(id);
    wait_for(T, "the joiner to come back", || (c.get(id, "after").ok()?? == "join").then_some(()));
}

/// `raftkv_network_peer_refused_messages_total{reason="cluster_id_mismatch"}` of node `id`.
fn cluster_refusals(c: &Cluster, id: u64) -> u64 {
    let text = c.http.get(&format!("{}/metrics", c.url(id))).map(|r| r.text()).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("raftkv_network_peer_refused_messages_total{reason=\"cluster_id_mismatch\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// `POST /raft` with an empty body and `headers` to `peer_port`: the status and the
/// answer's cluster id header.
fn post_raft_with(peer_port: u16, headers: &str) -> (u16, Option<String>) {
    let req = format!("POST /raft HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\nx-raftkv-from: 9\r\n{headers}\r\n");
    let answer = raw_exchange(peer_port, req.as_bytes());
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let id = answer.lines().find_map(|l| l.strip_prefix("x-raftkv-cluster-id: ").map(|v| v.trim().to_string()));
    (status, id)
}

/// Every member of a cluster reports its id (`/v1/status` `cluster_id`). A node of
/// another cluster that takes one of them for a member of its own gets 412 for each
/// message: the member counts the refusal, the stranger logs that the peer belongs to
/// another cluster, and nothing changes in the cluster.
#[test]
fn a_node_of_another_cluster_gets_412_and_changes_nothing() {
    let a = Cluster::start(3);
    let id_of = |c: &Cluster, n: u64| c.status(n).and_then(|s| s["cluster_id"].as_str().map(str::to_string)).expect("a cluster_id");
    let ours = id_of(&a, 1);
    assert_eq!(ours.len(), 16, "{ours}");
    for n in [2, 3] {
        assert_eq!(id_of(&a, n), ours, "member {n}");
    }
    // By hand: no header (a member still joining) passes, another id gets 412 and this
    // member's id, a malformed one 400.
    let port = a.node(2).peer_port;
    assert_eq!(post_raft_with(port, "").0, 204);
    assert_eq!(post_raft_with(port, &format!("x-raftkv-cluster-id: {ours}\r\n")).0, 204);
    assert_eq!(post_raft_with(port, "x-raftkv-cluster-id: 0000000000000001\r\n"), (412, Some(ours.clone())));
    assert_eq!(post_raft_with(port, "x-raftkv-cluster-id: zz\r\n").0, 400);
    assert_eq!(cluster_refusals(&a, 2), 1);

    let stranger = Cluster::start(1);
    let theirs = id_of(&stranger, 1);
    assert_ne!(theirs, ours);
    // The stranger adds a's member 2 as a learner of its own and replicates to it.
    let body = format!(r#"{{"id":2,"peer_url":"{}","learner":true}}"#, a.node(2).peer_url());
    let r = stranger.http.post(&format!("{}/v1/members", stranger.url(1)), body).unwrap();
    assert!(r.status.is_success(), "{} {}", r.status, r.text());
    wait_for(T, "a's member 2 to refuse the stranger", || (cluster_refusals(&a, 2) > 1).then_some(()));
    wait_for(T, "the stranger to log the refusal", || {
        std::fs::read_to_string(&stranger.node(1).log).ok()?.contains("belongs to another cluster").then_some(())
    });
    a.put_retry(1, "after-the-stranger", "v", T);
    wait_for(T, "member 2 to read the write", || (a.get(2, "after-the-stranger").ok()?? == "v").then_some(()));
    let st = a.status(2).unwrap();
    assert_eq!(st["cluster_id"], ours.as_str());
    assert_eq!(st["members"].as_array().map(Vec::len), Some(3), "{st}");
}

#[test]
fn a_removed_node_exits_and_cannot_rejoin_with_old_data() {
    let mut c = Cluster::start(3);
    c.put_retry(1, "k", "v", T);
    let leader = c.wait_leader(T);
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let r = c.http.delete(&format!("{}/{victim}", c.url(leader))).unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(c.wait_exit(victim, T), Some(0), "a removed node exits cleanly");
    let others: Vec<u64> = (1..=3).filter(|id| *id != victim).collect();
    c.put_retry(others[0], "k2", "v2", T);
    assert_eq!(c.get(others[1], "k2").unwrap().as_deref(), Some("v2"));
    // Restarting the removed member with its old data dir is refused.
    c.spawn(victim);
    let code = c.wait_exit(victim, T);
    assert_eq!(code, Some(1));
    let log = std::fs::read_to_string(&c.node(victim).log).unwrap();
    assert!(log.contains("removed"), "the refusal names the removal");
    // Removing the leader hands leadership over first, then removes it.
    let leader = c.wait_leader(T);
    let r = c.http.delete(&format!("{}/v1/members/{leader}", c.url(leader))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.wait_exit(leader, T), Some(0));
    let last = others.iter().copied().find(|id| *id != leader).unwrap();
    c.put_retry(last, "alone", "yes", T);
}

#[test]
fn writes_resume_within_seconds_after_the_leader_is_killed() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader(T);
    c.put_retry(leader, "a", "1", T);
    c.kill(leader);
    let killed_at = Instant::now();
    let other = (1..=3).find(|id| *id != leader).unwrap();
    // put_retry's deadline is the bound: writes resume within 10 s.
    c.put_retry(other, "b", "2", Duration::from_secs(10));
    eprintln!("writes resumed {:?} after the leader was killed", killed_at.elapsed());
    c.spawn(leader);
    wait_for(T, "the old leader, back, to read the new leader's write", || {
        let r = c.http.get(&format!("{}/v1/kv/b", c.url(leader))).ok()?;
        (r.status == StatusCode::OK && r.json()["value"] == "2").then_some(())
    });
}

#[test]
fn with_two_of_three_down_a_write_gets_503_never_2xx() {
    let mut c = Cluster::start_with(3, Options { request_timeout_ms: 1_500, ..Default::default() });
    c.put_retry(1, "k", "before", T);
    let leader = c.wait_leader(T);
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    for id in 1..=3 {
        if id != survivor {
            c.kill(id);
        }
    }
    // A client that waits 15 s at most: a write left hanging (never answered) is an
    // error here, not a 503.
    let patient = Http::new(Duration::from_secs(15));
    for i in 0..3 {
        let r = patient.put(&format!("{}/k", c.url(survivor)), format!("after{i}")).expect("answered, not left hanging");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "write without quorum: {}", r.text());
        let r = c.http.get(&format!("{}/v1/kv/k", c.url(survivor))).unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "linearizable read without quorum");
    }
    let r = c.http.get(&format!("{}/readyz", c.url(survivor))).unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn bad_input_gets_its_status_and_the_node_stays_up() {
    let opts = Options { extra_args: vec!["--request-body-timeout-ms".into(), "500".into()], ..Options::default() };
    let c = Cluster::start_with(1, opts);
    let u = c.url(1);
    let h = &c.http;
    // 413 above --max-request-bytes (default 1.5 MiB).
    let r = h.put(&format!("{u}/big"), vec![b'x'; 2 * 1024 * 1024]).unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // 404 for a path under /v1/leases/ or /v1/members/ that is no route; 400 for a bad
    // id in one that is; 405 for a wrong method on one.
    for (method, path) in [("GET", "/v1/leases/5/foo"), ("POST", "/v1/leases/5/6/keepalive"), ("POST", "/v1/members/5/foo"), ("DELETE", "/v1/members/5/promote/x")] {
        let r = h.call(method, &format!("{u}{path}"), None).unwrap();
        assert_eq!((r.status, r.json()["code"].clone()), (StatusCode::NOT_FOUND, serde_json::json!("not_found")), "{method} {path}");
    }
    assert_eq!(h.get(&format!("{u}/v1/leases/x")).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.delete(&format!("{u}/v1/members/x")).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.get(&format!("{u}/v1/leases/5/keepalive")).unwrap().status, StatusCode::METHOD_NOT_ALLOWED);
    // 400 for a bad member id or URL.
    assert_eq!(h.post(&format!("{u}/abc"), "http://127.0.0.1:1").unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.post(&format!("{u}/0"), "http://127.0.0.1:1").unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.post(&format!("{u}/5"), "not a url").unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.delete(&format!("{u}/x")).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.post(&format!("{u}/v1/members"), "{not json").unwrap().status, StatusCode::BAD_REQUEST);
    let r = h.post(&format!("{u}/v1/members"), r#"{"id":7,"peer_url":"ftp://x"}"#).unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["code"], "bad_request");
    // 405 for other methods.
    let r = h.call("PATCH", &format!("{u}/k"), None).unwrap();
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    // Bad escapes, bad query values, unknown /v1 routes.
    assert_eq!(h.get(&format!("{u}/v1/kv/%zz")).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.get(&format!("{u}/v1/kv/k?consistency=weird")).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.get(&format!("{u}/v1/nope")).unwrap().status, StatusCode::NOT_FOUND);
    // 404 for a missing key, both APIs.
    assert_eq!(h.get(&format!("{u}/missing")).unwrap().status, StatusCode::NOT_FOUND);
    assert_eq!(h.get(&format!("{u}/v1/kv/missing")).unwrap().status, StatusCode::NOT_FOUND);
    // Garbage on the client and peer sockets.
    use std::io::{Read, Write};
    for port in [c.node(1).client_port, c.node(1).peer_port] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"\x00\xff\xfe garbage \r\n\r\n\x16\x03\x01").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    // Garbage raft frames on the peer route: 400, node alive.
    let peer = format!("{}/raft", c.node(1).peer_url());
    assert_eq!(h.post(&peer, vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3]).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.post(&peer, vec![3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap().status, StatusCode::BAD_REQUEST);
    // A 405 names the allowed methods; the probes and /metrics take GET only.
    let port = c.node(1).client_port;
    let allow = |head: &str| head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("allow: ").map(str::to_string));
    let head = raw_exchange(port, b"PATCH /k HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert_eq!(allow(&head).as_deref(), Some("put, get, post, delete"), "{head}");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let head = raw_exchange(port, format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes());
        assert!(head.starts_with("HTTP/1.1 405"), "{path}: {head}");
        assert_eq!(allow(&head).as_deref(), Some("get"), "{path}: {head}");
        assert!(head.contains("method_not_allowed"), "{path}: {head}");
    }
    // A body that does not arrive within --request-body-timeout-ms: 408, not a held connection.
    let head = raw_exchange(port, b"PUT /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly-part");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("body_timeout"), "{head}");
    assert_eq!(h.get(&format!("{u}/slow")).unwrap().status, StatusCode::NOT_FOUND, "nothing was written");
    // Still serving, still writable.
    assert_eq!(c.put(1, "still", "up").unwrap(), StatusCode::NO_CONTENT);
    assert_eq!(c.get(1, "still").unwrap().as_deref(), Some("up"));
}

/// Sends `request` on a new connection and returns what comes back within 10 s (the
/// server's answer, as text).
fn raw_exchange(port: u16, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read until the server closes or the headers and a JSON body are in.
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A proposal forwarded with a command this version does not know (a newer member's, or
/// garbage) is refused by the leader unappended: nothing stops, the cluster goes on.
#[test]
fn a_forwarded_command_of_an_unknown_kind_is_refused_and_the_cluster_goes_on() {
    use prost::Message as _;
    use raft::eraftpb::{Entry, Message, MessageType};
    use raftkv_node::kv::Command;
    let c = Cluster::start(3);
    c.put_retry(1, "before", "ok", T);
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let cmd = Command { request_id: 42, op: 99, key: "k".into(), value: b"v".to_vec(), prev_revision: None, ..Default::default() };
    let m = Message {
        msg_type: MessageType::MsgPropose as i32,
        to: leader,
        from: follower,
        entries: vec![Entry { data: cmd.encode_to_vec(), ..Default::default() }],
        ..Default::default()
    };
    let body = raftkv_node::transport::encode_frames(&[m]);
    let r = c.http.call("POST", &format!("{}/raft", c.node(leader).peer_url()), Some(body.to_vec())).unwrap();
    assert!(r.status.is_success(), "{} {}", r.status, r.text());
    wait_for(T, "the leader to count the refusal", || {
        let text = c.http.get(&format!("{}/metrics", c.url(leader))).ok()?.text();
        text.lines().any(|l| l.starts_with("raftkv_network_peer_refused_messages_total{reason=\"unknown_command\"} 1")).then_some(())
    });
    c.put_retry(follower, "after", "ok", T);
    for id in 1..=3 {
        assert_eq!(c.get(id, "after").unwrap().as_deref(), Some("ok"), "member {id}");
        assert_eq!(c.get(id, "k").unwrap(), None, "member {id}");
    }
}

/// A committed command this version cannot apply (appended by a newer leader; here
/// written into the stopped member's WAL) stops the member with a message before
/// anything after it is applied, and again at every restart until it is upgraded: going
/// on without it would leave its state apart from the newer members' while it serves.
#[test]
fn a_committed_command_of_an_unknown_kind_stops_the_member_until_upgraded() {
    use prost::Message as _;
    use raft::eraftpb::{Entry, HardState};
    use raft::Storage as _;
    use raftkv_node::kv::{Command, OpType};
    use raftkv_node::storage::{DiskStorage, StorageOptions};
    let mut c = Cluster::start(1);
    c.put_retry(1, "before", "ok", T);
    assert_eq!(c.terminate(1, T), Some(0));
    {
        let s = DiskStorage::open(&c.node(1).data_dir, StorageOptions::default()).expect("open");
        let (last, hs) = (s.last_index().expect("last"), s.hard_state());
        let unknown = Command { request_id: 7, op: 99, key: "k".into(), value: b"v".to_vec(), prev_revision: None, ..Default::default() };
        let after = Command { request_id: 8, op: OpType::Put as i32, key: "after".into(), value: b"x".to_vec(), prev_revision: None, ..Default::default() };
        let entry = |index: u64, cmd: &Command| Entry { index, term: hs.term, data: cmd.encode_to_vec(), ..Default::default() };
        s.append(&[entry(last + 1, &unknown), entry(last + 2, &after)]).expect("append");
        s.set_hard_state(&HardState { commit: last + 2, ..hs }).expect("hard state");
        s.sync().expect("sync");
    }
    for round in 0..2 {
        c.spawn(1);
        assert_eq!(c.wait_exit(1, T), Some(1), "round {round}");
        let log = std::fs::read_to_string(&c.node(1).log).unwrap_or_default();
        assert!(log.matches("operation this version does not know").count() > round, "{log}");
    }
    // Nothing after it was applied: the WAL still ends with both entries, and no
    // snapshot covers them.
    let s = DiskStorage::open(&c.node(1).data_dir, StorageOptions::default()).expect("open");
    assert!(s.snapshot_index() < s.last_index().expect("last"));
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    let bin = raftkv_tests::node_binary();
    for args in [
        vec!["--id", "0"],
        vec!["--id", "nope"],
        vec!["--cluster", "127.0.0.1:1"],
        vec!["--id", "3", "--cluster", "http://127.0.0.1:1"],
        vec!["--snapshot-count", "0"],
        vec!["--request-timeout-ms", "18446744073709551615"],
        vec!["--request-body-timeout-ms", "0"],
        vec!["--max-request-bytes", "512"],
        vec!["--max-request-bytes", "4294967296"],
        vec!["--frobnicate"],
    ] {
        let out = std::process::Command::new(&bin).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no message");
    }
}

#[test]
fn sigterm_hands_leadership_over_and_exits_0() {
    let mut c = Cluster::start(3);
    c.put_retry(1, "k", "v", T);
    let leader = c.wait_leader(T);
    let code = c.terminate(leader, T);
    assert_eq!(code, Some(0));
    // Leadership was handed over, not won by an election after a timeout: the member the
    // stopping leader named leads.
    let log = std::fs::read_to_string(&c.node(leader).log).unwrap_or_default();
    let to: u64 = log
        .lines()
        .find(|l| l.contains("stopping: handing leadership over"))
        .and_then(|l| l.split("to=").nth(1))
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the stopping leader named no successor (RUST_LOG must include info):\n{log}"));
    assert_ne!(to, leader);
    let started = Instant::now();
    let new_leader = c.wait_leader(T);
    assert_eq!(new_leader, to, "the named member leads");
    eprintln!("new leader {new_leader} seen {:?} after exit", started.elapsed());
    let other = c.running()[0];
    c.put_retry(other, "k", "v2", T);
}
