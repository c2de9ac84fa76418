//! The operations API on real processes: learners, promotion, removal, leader transfer,
//! compare-and-swap, prefix listing, readiness, and metrics scraped by a real Prometheus.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftkv_tests::{free_port, wait_for, Cluster, Http, Options, StatusCode};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

fn member(members: &Value, id: u64) -> Option<&Value> {
    members["members"].as_array()?.iter().find(|m| m["id"] == id)
}

#[test]
fn learner_catches_up_is_promoted_then_a_voter_is_removed_and_leadership_moves() {
    let mut c = Cluster::start(3);
    for i in 0..50 {
        c.put_retry(1, &format!("k{i}"), "v", T);
    }
    let id = c.spawn_joiner();
    let body = format!(r#"{{"id":{id},"peer_url":"{}","learner":true}}"#, c.node(id).peer_url());
    let r = c.http.post(&format!("{}/v1/members", c.url(2)), body.clone()).unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    // Idempotent: the same request again is a 200, a different one a 409.
    assert_eq!(c.http.post(&format!("{}/v1/members", c.url(2)), body).unwrap().status, StatusCode::OK);
    let r = c.http.post(&format!("{}/v1/members", c.url(2)), format!(r#"{{"id":{id},"peer_url":"http://127.0.0.1:1"}}"#)).unwrap();
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.json()["code"], "member_exists");
    // Another spelling of the same address is the same member (200), and another
    // member's address in any spelling is refused (it would add a voter nobody reaches).
    let respelled = format!("{}/", c.node(id).peer_url().replace("http://127.0.0.1:", "HTTP://127.0.0.1:0"));
    let r = c.http.post(&format!("{}/v1/members", c.url(2)), format!(r#"{{"id":{id},"peer_url":"{respelled}","learner":true}}"#)).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{respelled}: {}", r.text());
    let r = c.http.post(&format!("{}/v1/members", c.url(2)), format!(r#"{{"id":9,"peer_url":"{}/"}}"#, c.node(2).peer_url())).unwrap();
    assert_eq!((r.status, r.json()["code"].clone()), (StatusCode::CONFLICT, serde_json::json!("url_in_use")), "{}", r.text());
    // The learner catches up (its match index reaches the commit index).
    wait_for(T, "the learner to catch up", || {
        let m = c.http.get(&format!("{}/v1/members", c.url(3))).ok()?.json();
        let l = member(&m, id)?;
        (l["role"] == "learner" && l["match_index"].as_u64()? >= m["commit_index"].as_u64()?).then_some(())
    });
    let r = c.http.get(&format!("{}/v1/kv/k49?consistency=serializable", c.url(id))).unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let r = c.http.post(&format!("{}/v1/members/{id}/promote", c.url(1)), "").unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["changed"], true);
    let r = c.http.post(&format!("{}/v1/members/{id}/promote", c.url(1)), "").unwrap();
    assert_eq!(r.json()["changed"], false, "{}", r.text());
    let m = c.http.get(&format!("{}/v1/members", c.url(id))).unwrap().json();
    assert_eq!(member(&m, id).unwrap()["role"], "voter");
    // A body that does not say `to` in so many words moves nothing.
    for body in [format!(r#"{{"target":{id}}}"#), format!("{id}"), format!("[{id}]")] {
        let r = c.http.post(&format!("{}/v1/leader/transfer", c.url(1)), body.clone()).unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text());
    }
    // Transfer leadership to the new voter, explicitly.
    let r = c.http.post(&format!("{}/v1/leader/transfer", c.url(1)), format!(r#"{{"to":{id}}}"#)).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.wait_leader(T), id);
    // And to "the best one".
    let r = c.http.post(&format!("{}/v1/leader/transfer", c.url(2)), "{}").unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let new_leader = r.json()["leader"].as_u64().unwrap();
    assert_ne!(new_leader, id);
    // Remove a voter that is not the leader.
    let victim = (1..=3).find(|v| *v != new_leader).unwrap();
    let r = c.http.delete(&format!("{}/v1/members/{victim}", c.url(id))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.wait_exit(victim, T), Some(0));
    let r = c.http.delete(&format!("{}/v1/members/{victim}", c.url(id))).unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let m = c.http.get(&format!("{}/v1/members", c.url(id))).unwrap().json();
    assert_eq!(m["members"].as_array().unwrap().len(), 3);
    c.put_retry(id, "after", "removal", T);
}

#[test]
fn promote_is_refused_while_the_learner_is_behind() {
    let c = Cluster::start(3);
    for i in 0..20 {
        c.put_retry(1, &format!("k{i}"), "v", T);
    }
    // A learner whose process never started cannot catch up.
    let url = format!("http://127.0.0.1:{}", free_port());
    let r = c.http.post(&format!("{}/v1/members", c.url(1)), format!(r#"{{"id":9,"peer_url":"{url}","learner":true}}"#)).unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let r = c.http.post(&format!("{}/v1/members/9/promote", c.url(2)), "").unwrap();
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text());
    assert_eq!(r.json()["code"], "learner_behind");
    assert_eq!(c.http.post(&format!("{}/v1/members/77/promote", c.url(2)), "").unwrap().status, StatusCode::NOT_FOUND);
    // The cluster still writes (a learner is not part of the quorum), and the learner goes away.
    c.put_retry(3, "still", "writable", T);
    let r = c.http.delete(&format!("{}/v1/members/9", c.url(3))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[test]
fn compare_and_swap_and_prefix_listing() {
    let c = Cluster::start(1);
    let u = c.url(1);
    let h = &c.http;
    let r = h.put(&format!("{u}/v1/kv/cas?prev_revision=0"), "a").unwrap();
    assert_eq!(r.status, StatusCode::OK, "create-if-absent");
    let rev = r.json()["revision"].as_u64().unwrap();
    let r = h.put(&format!("{u}/v1/kv/cas?prev_revision=0"), "b").unwrap();
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.json()["code"], "revision_mismatch");
    let r = h.put(&format!("{u}/v1/kv/cas?prev_revision={}", rev + 100), "b").unwrap();
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = h.put(&format!("{u}/v1/kv/cas?prev_revision={rev}"), "b").unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let rev2 = r.json()["revision"].as_u64().unwrap();
    assert!(rev2 > rev);
    assert_eq!(h.get(&format!("{u}/v1/kv/cas")).unwrap().json()["value"], "b");
    assert_eq!(h.delete(&format!("{u}/v1/kv/cas?prev_revision={rev}")).unwrap().status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(h.delete(&format!("{u}/v1/kv/cas?prev_revision={rev2}")).unwrap().status, StatusCode::OK);
    assert_eq!(h.get(&format!("{u}/v1/kv/cas")).unwrap().status, StatusCode::NOT_FOUND);
    assert_eq!(h.put(&format!("{u}/v1/kv/cas?prev_revision=x"), "b").unwrap().status, StatusCode::BAD_REQUEST);
    // A misspelt guard is refused, not dropped (the write would run unconditionally).
    for q in ["prev_revison=5", "prevRevision=5", "prev_revision=5&prev_revision=0", "consistency=serializable"] {
        let r = h.put(&format!("{u}/v1/kv/cas?{q}"), "c").unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "PUT ?{q}: {}", r.text());
    }
    let r = h.delete(&format!("{u}/v1/kv/cas?lease=1")).unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "DELETE ?lease: {}", r.text());
    assert_eq!(h.get(&format!("{u}/v1/kv/cas")).unwrap().status, StatusCode::NOT_FOUND, "none of them wrote");
    assert_eq!(h.get(&format!("{u}/v1/kv?prefix=p/&limt=3")).unwrap().status, StatusCode::BAD_REQUEST);

    for k in ["p/c", "p/a", "q/x", "p/b", "o", "p/d"] {
        assert_eq!(h.put(&format!("{u}/v1/kv/{k}"), k).unwrap().status, StatusCode::OK);
    }
    let r = h.get(&format!("{u}/v1/kv?prefix=p/&limit=3")).unwrap().json();
    let keys: Vec<&str> = r["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["p/a", "p/b", "p/c"]);
    assert_eq!(r["more"], true);
    let r = h.get(&format!("{u}/v1/kv?prefix=p/")).unwrap().json();
    assert_eq!(r["items"].as_array().unwrap().len(), 4);
    assert_eq!(r["more"], false);
    // The next page starts after the last key of this one.
    let r = h.get(&format!("{u}/v1/kv?prefix=p/&limit=3&after=p/c")).unwrap().json();
    let keys: Vec<&str> = r["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["p/d"]);
    assert_eq!(r["more"], false);
    let r = h.get(&format!("{u}/v1/kv?prefix=p/&limit=0")).unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Deleting by prefix: every key under it, at one revision; nothing else.
    let r = h.delete(&format!("{u}/v1/kv?prefix=p/")).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["deleted"], 4);
    let r = h.get(&format!("{u}/v1/kv?prefix=")).unwrap().json();
    let keys: Vec<&str> = r["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["o", "q/x"]);
    assert_eq!(h.delete(&format!("{u}/v1/kv?prefix=p/")).unwrap().json()["deleted"], 0);
    assert_eq!(h.delete(&format!("{u}/v1/kv?prefix=")).unwrap().status, StatusCode::BAD_REQUEST, "never every key");
    assert_eq!(h.delete(&format!("{u}/v1/kv")).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(h.put(&format!("{u}/v1/kv"), "x").unwrap().status, StatusCode::METHOD_NOT_ALLOWED);
    // Status carries the indexes and members.
    let st = h.get(&format!("{u}/v1/status")).unwrap().json();
    assert_eq!(st["id"], 1);
    assert_eq!(st["leader"], 1);
    let (applied, commit) = (st["applied_index"].as_u64().unwrap(), st["commit_index"].as_u64().unwrap());
    assert!(applied > 1 && applied <= commit, "applied {applied}, commit {commit}");
    assert_eq!(st["incarnation"].as_str().unwrap().len(), 16);
}

#[test]
fn readyz_is_false_on_a_node_cut_off_from_quorum() {
    let mut c = Cluster::start(3);
    for id in 1..=3 {
        let r = c.http.get(&format!("{}/readyz", c.url(id))).unwrap();
        assert_eq!(r.status, StatusCode::OK, "node {id}: {}", r.text());
    }
    c.kill(1);
    c.kill(2);
    wait_for(T, "node 3 to report not ready", || {
        let r = c.http.get(&format!("{}/readyz", c.url(3))).ok()?;
        (r.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    });
    assert_eq!(c.http.get(&format!("{}/healthz", c.url(3))).unwrap().status, StatusCode::OK, "alive, just not ready");
    c.spawn(1);
    wait_for(T, "node 3 ready again", || {
        (c.http.get(&format!("{}/readyz", c.url(3))).ok()?.status == StatusCode::OK).then_some(())
    });
}

#[test]
fn metrics_have_help_text_and_count_requests() {
    let c = Cluster::start(1);
    c.put_retry(1, "m", "v", T);
    let text = c.http.get(&format!("{}/metrics", c.url(1))).unwrap().text();
    for name in [
        "raftkv_server_has_leader 1",
        "raftkv_server_is_leader 1",
        "raftkv_server_leader_changes_seen_total",
        "raftkv_server_proposals_committed_total",
        "raftkv_server_proposals_applied_total",
        "raftkv_server_proposals_pending",
        "raftkv_server_proposals_failed_total",
        "raftkv_disk_wal_fsync_duration_seconds_bucket",
        "raftkv_disk_snapshot_save_total_duration_seconds",
        "raftkv_disk_wal_size_bytes",
        "raftkv_disk_snapshot_size_bytes",
        "raftkv_http_requests_total{code=\"204\",route=\"key_put\"}",
        "raftkv_http_request_duration_seconds_bucket",
        "raftkv_keys_total 1",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
}

#[test]
fn a_real_prometheus_scrapes_the_cluster() {
    let prom = which("prometheus").expect("prometheus is not installed: run scripts/setup.sh");
    let c = Cluster::start(3);
    for i in 0..10 {
        c.put_retry(1, &format!("p{i}"), "v", T);
    }
    let port = free_port();
    let dir = c.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let targets: Vec<String> = (1..=3).map(|id| format!("'127.0.0.1:{}'", c.node(id).client_port)).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: raftkv\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut child = std::process::Command::new(prom)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(std::mem::replace(&mut child, std::process::Command::new("true").spawn().unwrap()));
    let query = |q: &str| -> Option<Vec<Value>> {
        let r = c.http.get(&format!("http://127.0.0.1:{port}/api/v1/query?query={q}")).ok()?;
        let v = serde_json::from_slice::<Value>(&r.body).ok()?;
        v["data"]["result"].as_array().cloned()
    };
    let has_leader = wait_for(Duration::from_secs(60), "Prometheus to scrape has_leader from 3 nodes", || {
        query("raftkv_server_has_leader").filter(|r| r.len() == 3)
    });
    for series in &has_leader {
        assert_eq!(series["value"][1], "1", "{series}");
    }
    let committed = wait_for(Duration::from_secs(30), "the committed-proposals counter", || {
        query("raftkv_server_proposals_committed_total").filter(|r| r.len() == 3)
    });
    for series in &committed {
        let v: f64 = series["value"][1].as_str().unwrap().parse().unwrap();
        assert!(v >= 11.0, "committed {v}");
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| std::path::Path::new(d).join(name)).find(|p| p.exists())
}

/// A learner never campaigns, so one that missed the entry removing it (it was down, or
/// the leader dropped it before sending the entry) hears from nobody afterwards. It must
/// still find out and stop, as a removed voter does when its votes are refused.
#[test]
fn a_learner_removed_while_it_was_down_stops_when_it_comes_back() {
    let mut c = Cluster::start(3);
    c.put_retry(1, "k", "v", T);
    let leader = c.wait_leader(T);
    let id = c.spawn_joiner();
    let body = format!(r#"{{"id":{id},"peer_url":"{}","learner":true}}"#, c.node(id).peer_url());
    let r = c.http.post(&format!("{}/v1/members", c.url(leader)), body).unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    wait_for(T, "the learner to catch up", || {
        let r = c.http.get(&format!("{}/v1/kv/k?consistency=serializable", c.url(id))).ok()?;
        (r.status == StatusCode::OK).then_some(())
    });
    c.kill(id);
    let leader = c.wait_leader(T);
    let r = c.http.delete(&format!("{}/v1/members/{id}", c.url(leader))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    c.put_retry(leader, "k2", "after the removal", T);
    // Back with the log from before its removal: nobody sends it anything any more.
    c.spawn(id);
    assert_eq!(c.wait_exit(id, T), Some(0), "the removed learner finds out and exits cleanly");
    let log = std::fs::read_to_string(&c.node(id).log).unwrap();
    assert!(log.contains("removed"), "its log says why it stopped");
    // It left a tombstone: started again, it refuses at once.
    c.spawn(id);
    assert_eq!(c.wait_exit(id, T), Some(1));
    c.put_retry(leader, "k3", "still three", T);
}

#[test]
fn a_removed_id_can_be_added_again_with_a_fresh_data_dir() {
    // The operator reuses ids (pod ordinals): 3 -> 2 -> 3 removes id 3 and adds it back.
    let mut c = Cluster::start(3);
    for i in 0..30 {
        c.put_retry(1, &format!("k{i}"), "v", T);
    }
    let leader = c.wait_leader(T);
    let id = (1..=3).find(|i| *i != leader).unwrap();
    let r = c.http.delete(&format!("{}/v1/members/{id}", c.url(leader))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.wait_exit(id, T), Some(0));
    c.put_retry(leader, "between", "removal-and-re-add", T);
    // Fresh volume, same id, started to wait for its addition.
    std::fs::remove_dir_all(&c.node(id).data_dir).unwrap();
    c.nodes[(id - 1) as usize].join = true;
    c.spawn(id);
    let body = format!(r#"{{"id":{id},"peer_url":"{}","learner":true}}"#, c.node(id).peer_url());
    let r = c.http.post(&format!("{}/v1/members", c.url(leader)), body).unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    wait_for(T, "the re-added member to catch up", || {
        let r = c.http.get(&format!("{}/v1/kv/between?consistency=serializable", c.url(id))).ok()?;
        (r.status == StatusCode::OK).then_some(())
    });
    wait_for(T, "the promotion", || {
        let r = c.http.post(&format!("{}/v1/members/{id}/promote", c.url(leader)), "").ok()?;
        (r.status == StatusCode::OK).then_some(())
    });
    c.put_retry(leader, "after", "promotion", T);
    wait_for(T, "the re-added voter to apply new writes", || {
        let r = c.http.get(&format!("{}/v1/kv/after?consistency=serializable", c.url(id))).ok()?;
        (r.status == StatusCode::OK).then_some(())
    });
    // It did not replay its own old removal: still running, still a voter.
    let child = c.nodes[(id - 1) as usize].child.as_mut().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "the re-added member exited");
    let m = c.http.get(&format!("{}/v1/members", c.url(leader))).unwrap().json();
    assert_eq!(member(&m, id).unwrap()["role"], "voter");
}

#[test]
fn a_second_membership_change_while_one_is_pending_gets_409_at_once() {
    // Long ticks: the leader keeps leading (check-quorum would step it down after 10 ticks
    // without a quorum) while three of five voters are paused.
    let opts = Options { request_timeout_ms: 4_000, extra_args: vec!["--tick-ms".into(), "400".into()], ..Options::default() };
    let c = Cluster::start_with(5, opts);
    c.put_retry(1, "k", "v", T);
    let leader = c.wait_leader(T);
    let follower = (1..=5).find(|i| *i != leader).unwrap();
    let paused: Vec<u64> = (1..=5).filter(|i| *i != leader && *i != follower).collect();
    for id in &paused {
        c.signal(*id, libc::SIGSTOP);
    }
    // The first change cannot commit without the paused voters: it stays pending.
    let first = {
        let url = format!("{}/v1/members", c.url(leader));
        let body = format!(r#"{{"id":9,"peer_url":"http://127.0.0.1:{}","learner":true}}"#, free_port());
        std::thread::spawn(move || Http::new(Duration::from_secs(30)).post(&url, body).map(|r| r.status))
    };
    wait_for(Duration::from_secs(3), "the leader to report a pending change", || {
        let m = c.http.get(&format!("{}/v1/members", c.url(leader))).ok()?.json();
        (m["conf_change_pending"] == true).then_some(())
    });
    // A second one is refused at once, on the leader and on a follower (which asks the
    // leader before forwarding: raft-rs would drop it silently, and the client would wait
    // out its timeout and get 503 "outcome unknown").
    for (on, id) in [(leader, 10), (follower, 11)] {
        let body = format!(r#"{{"id":{id},"peer_url":"http://127.0.0.1:{}","learner":true}}"#, free_port());
        let r = c.http.post(&format!("{}/v1/members", c.url(on)), body).unwrap();
        assert_eq!(r.status, StatusCode::CONFLICT, "on {on}: {}", r.text());
        assert_eq!(r.json()["code"], "change_in_progress", "on {on}");
    }
    for id in &paused {
        c.signal(*id, libc::SIGCONT);
    }
    // The first change commits once the quorum is back (its client may have had 201 or,
    // if its timeout came first, 503: outcome unknown).
    let first = first.join().unwrap();
    assert!(matches!(first, Ok(StatusCode::CREATED) | Ok(StatusCode::SERVICE_UNAVAILABLE)), "{first:?}");
    wait_for(T, "learner 9 to be a member", || {
        let m = c.http.get(&format!("{}/v1/members", c.url(follower))).ok()?.json();
        member(&m, 9).map(|_| ())
    });
    let m = c.http.get(&format!("{}/v1/members", c.url(c.wait_leader(T)))).unwrap().json();
    assert!(member(&m, 10).is_none() && member(&m, 11).is_none(), "{m}");
    assert_eq!(m["conf_change_pending"], false, "{m}");
}

fn metric_sum(c: &Cluster, name: &str) -> u64 {
    (1..=c.nodes.len() as u64)
        .filter_map(|id| c.http.get(&format!("{}/metrics", c.url(id))).ok())
        .flat_map(|r| r.text().lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).collect::<Vec<_>>())
        .sum::<f64>() as u64
}

#[test]
fn writes_through_followers_ride_out_leadership_transfers() {
    // A leader transferring leadership drops the proposals followers forward to it. It
    // now tells them, and they propose again: no client waits out its timeout for a 503.
    let c = Cluster::start_with(3, Options { request_timeout_ms: 8_000, ..Options::default() });
    c.put_retry(1, "warm", "up", T);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..6u64)
        .map(|t| {
            let urls: Vec<String> = (1..=3).map(|id| c.url(id)).collect();
            let (stop, failures, acked) = (stop.clone(), failures.clone(), acked.clone());
            std::thread::spawn(move || {
                let http = Http::new(Duration::from_secs(20));
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{t}-{i}");
                    let url = &urls[(t + i) as usize % urls.len()];
                    match http.put(&format!("{url}/{key}"), i.to_string()) {
                        Ok(r) if r.status == StatusCode::NO_CONTENT => acked.lock().unwrap().push(key),
                        Ok(r) => failures.lock().unwrap().push(format!("{key} via {url}: {} {}", r.status, r.text())),
                        Err(e) => failures.lock().unwrap().push(format!("{key} via {url}: {e}")),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    // Move leadership around until some follower has had a forwarded proposal dropped
    // and proposed it again (each transfer opens a window of a round trip or so).
    let mut transfers = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while metric_sum(&c, "raftkv_server_proposals_retried_total") == 0 && std::time::Instant::now() < deadline {
        let leader = c.wait_leader(T);
        let to = leader % 3 + 1;
        let r = c.http.post(&format!("{}/v1/leader/transfer", c.url(leader)), format!(r#"{{"to":{to}}}"#)).unwrap();
        if r.status == StatusCode::OK {
            transfers += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let retried = metric_sum(&c, "raftkv_server_proposals_retried_total");
    let failures = failures.lock().unwrap();
    let acked = acked.lock().unwrap();
    eprintln!("{transfers} transfers, {} writes acknowledged, {retried} proposals proposed again", acked.len());
    assert!(retried > 0, "no forwarded proposal was dropped in {transfers} transfers");
    assert!(failures.is_empty(), "{} writes failed, first: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    // Every acknowledged write is there.
    let leader = c.wait_leader(T);
    for key in acked.iter() {
        let r = c.http.get(&format!("{}/v1/kv/{key}?consistency=serializable", c.url(leader))).unwrap();
        assert_eq!(r.status, StatusCode::OK, "{key}");
    }
}

fn revision(c: &Cluster, id: u64, key: &str) -> u64 {
    let r = c.http.get(&format!("{}/v1/kv/{key}", c.url(id))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{key} on node {id}: {}", r.text());
    r.json()["revision"].as_u64().unwrap()
}

/// A single-member cluster's process on fresh ports, data in `dir/name`, started with
/// `args`: the child, its client URL and its log file.
fn spawn_single(dir: &std::path::Path, name: &str, args: &[&str]) -> (std::process::Child, String, std::path::PathBuf) {
    let log = dir.join(format!("{name}.log"));
    let client = format!("127.0.0.1:{}", free_port());
    let child = std::process::Command::new(raftkv_tests::node_binary())
        .args(["--id", "1", "--cluster", &format!("http://127.0.0.1:{}", free_port())])
        .args(["--port", &free_port().to_string(), "--listen-client-addr", &client])
        .arg("--data-dir")
        .arg(dir.join(name))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    (child, format!("http://{client}"), log)
}

/// [`spawn_single`], then waits (bounded) for it to exit: its exit code and its log.
fn run_to_exit(dir: &std::path::Path, name: &str, args: &[&str]) -> (Option<i32>, String) {
    let (mut child, _, log) = spawn_single(dir, name, args);
    let status = wait_for(T, &format!("{name} to exit"), || child.try_wait().ok().flatten());
    (status.code(), std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn a_backup_restores_into_a_new_cluster_with_its_keys_and_revisions() {
    let c = Cluster::start(3);
    for i in 0..30 {
        c.put_retry(1, &format!("b{i}"), &format!("v{i}"), T);
    }
    assert_eq!(c.http.delete(&format!("{}/v1/kv/b7", c.url(1))).unwrap().status, StatusCode::OK);
    let revs: Vec<u64> = (0..30).filter(|i| *i != 7).map(|i| revision(&c, 1, &format!("b{i}"))).collect();
    // A linearizable backup from a follower holds every acknowledged write.
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let r = c.http.get(&format!("{}/v1/backup", c.url(follower))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(&r.body[..8], b"RAFTKVBK");
    let applied = u64::from_le_bytes(r.body[12..20].try_into().unwrap());
    assert!(applied >= *revs.iter().max().unwrap(), "backup at {applied}, revisions {revs:?}");
    let backup = c.dir.path().join("cluster.backup");
    std::fs::write(&backup, &r.body).unwrap();
    // Serializable: this member's own state, no barrier; bad requests are refused.
    let r = c.http.get(&format!("{}/v1/backup?consistency=serializable", c.url(leader))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.http.get(&format!("{}/v1/backup?consistency=eventual", c.url(1))).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(c.http.post(&format!("{}/v1/backup", c.url(1)), "").unwrap().status, StatusCode::METHOD_NOT_ALLOWED);

    // A damaged copy is refused with a message, and nothing is bootstrapped from it.
    let mut damaged = r.body.clone();
    damaged.truncate(damaged.len() - 1);
    let bad = c.dir.path().join("truncated.backup");
    std::fs::write(&bad, &damaged).unwrap();
    let (code, log) = run_to_exit(c.dir.path(), "from-truncated", &["--restore-from", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("truncated.backup"), "{log}");
    assert!(raftkv_tests::faultkit::snapshot_files(&c.dir.path().join("from-truncated")).is_empty());
    // The data dir is still new: the good file restores into it.
    let (mut single, url, _) = spawn_single(c.dir.path(), "from-truncated", &["--restore-from", backup.to_str().unwrap()]);
    wait_for(T, "a single member restored after a refused file", || {
        let r = c.http.get(&format!("{url}/v1/kv/b29")).ok()?;
        (r.status == StatusCode::OK).then(|| assert_eq!(r.json()["value"], "v29"))
    });
    let _ = single.kill();
    let _ = single.wait();
    // Naming another backup for a directory restored already, or restoring over data
    // that never came from a backup (a forgotten wipe), is refused: it would look like a
    // restore while keeping the old data.
    c.put_retry(1, "later", "x", T);
    let other = c.dir.path().join("other.backup");
    std::fs::write(&other, c.http.get(&format!("{}/v1/backup", c.url(1))).unwrap().body).unwrap();
    let (code, log) = run_to_exit(c.dir.path(), "from-truncated", &["--restore-from", other.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("is not new") && log.contains("restored from another backup"), "{log}");
    let (mut plain, url, _) = spawn_single(c.dir.path(), "plain", &[]);
    wait_for(T, "a plain single member to serve", || (c.http.get(&format!("{url}/readyz")).ok()?.status == StatusCode::OK).then_some(()));
    let _ = plain.kill();
    let _ = plain.wait();
    let (code, log) = run_to_exit(c.dir.path(), "plain", &["--restore-from", backup.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("not restored from a backup"), "{log}");
    // With a revision bump (etcdutl's --bump-revision --mark-compacted): keys keep their
    // revisions, new writes start a million beyond the backup, and a watch from a
    // revision the lost cluster may have handed out after the backup is told compacted.
    let (mut bumped, url, _) = spawn_single(c.dir.path(), "bumped", &["--restore-from", backup.to_str().unwrap(), "--restore-bump-revision", "1000000"]);
    wait_for(T, "a member restored with a revision bump", || {
        let r = c.http.get(&format!("{url}/v1/kv/b29")).ok()?;
        (r.status == StatusCode::OK).then(|| assert_eq!(r.json()["revision"].as_u64(), revs.last().copied()))
    });
    let r = c.http.put(&format!("{url}/v1/kv/new"), "x").unwrap();
    assert!(r.json()["revision"].as_u64().unwrap() > applied + 1_000_000, "{}", r.text());
    let r = c.http.get(&format!("{url}/v1/watch?start_revision={}", applied + 5)).unwrap();
    assert_eq!((r.status, r.json()["code"].clone()), (StatusCode::GONE, serde_json::json!("compacted")), "{}", r.text());
    let _ = bumped.kill();
    let _ = bumped.wait();
    // A joining member takes its state from the leader, never from a backup.
    let (code, log) = run_to_exit(c.dir.path(), "join-and-restore", &["--join", "--restore-from", backup.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("--restore-from"), "{log}");

    // A new 3-member cluster from the file: the same keys with the same revisions.
    let opts = Options { extra_args: vec!["--restore-from".into(), backup.to_str().unwrap().into()], ..Options::default() };
    let mut d = Cluster::start_with(3, opts);
    for (k, i) in (0..30).filter(|i| *i != 7).enumerate() {
        for id in 1..=3 {
            assert_eq!(d.get(id, &format!("b{i}")).unwrap().as_deref(), Some(format!("v{i}").as_str()));
        }
        assert_eq!(revision(&d, 2, &format!("b{i}")), revs[k], "b{i}");
    }
    assert_eq!(d.get(1, "b7").unwrap(), None, "deleted before the backup");
    // New writes get revisions after everything in the backup.
    let r = d.http.put(&format!("{}/v1/kv/after", d.url(3)), "restore").unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.json()["revision"].as_u64().unwrap() > applied);
    // The restored cluster is not the old one: another id, so their members refuse
    // each other's raft messages.
    let old_id = c.status(1).unwrap()["cluster_id"].clone();
    let new_id = d.status(1).unwrap()["cluster_id"].clone();
    assert!(new_id.is_string() && new_id != old_id, "{old_id} {new_id}");
    // A restart keeps the member's own data; the flag still given is ignored.
    d.kill(1);
    d.spawn(1);
    wait_for(T, "node 1 back with the write made after the restore", || {
        let r = d.http.get(&format!("{}/v1/kv/after", d.url(1))).ok()?;
        (r.status == StatusCode::OK).then_some(())
    });
    assert!(raftkv_tests::faultkit::log_contains(&d.node(1).log, "--restore-from is ignored"));
    assert_eq!(d.status(1).unwrap()["cluster_id"], new_id);
}

/// The next change on a watch stream, skipping progress lines: (type, key, value, revision).
fn next_change(s: &mut raftkv_tests::LineStream) -> (String, String, Option<String>, u64) {
    loop {
        let line = s.next_json().expect("the watch stream ended or timed out");
        if line["type"] == "progress" {
            continue;
        }
        let value = line["value"].as_str().map(str::to_string);
        return (line["type"].as_str().unwrap().to_string(), line["key"].as_str().unwrap().to_string(), value, line["revision"].as_u64().unwrap());
    }
}

#[test]
fn watches_stream_every_change_in_order_from_now_or_from_a_revision() {
    let mut c = Cluster::start_with(3, Options { extra_args: vec!["--watch-history".into(), "50".into(), "--watch-prev-kv".into()], ..Options::default() });
    let put = |c: &Cluster, id: u64, k: &str, v: &str| -> u64 {
        let r = c.http.put(&format!("{}/v1/kv/{k}", c.url(id)), v.to_string()).unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        r.json()["revision"].as_u64().unwrap()
    };
    let first = put(&c, 1, "w/a", "1");
    // From now (linearizable): the stream starts at or after the acknowledged write.
    let long = Http::new(Duration::from_secs(60));
    let mut now = long.stream(&format!("{}/v1/watch?prefix=w/", c.url(2))).unwrap();
    assert_eq!(now.status, StatusCode::OK);
    assert_eq!(now.content_type.as_deref(), Some("application/x-ndjson"));
    assert!(now.revision.unwrap() >= first);
    let mut one_key = long.stream(&format!("{}/v1/watch?key=w/b", c.url(3))).unwrap();
    let r2 = put(&c, 3, "w/a", "2");
    let r3 = put(&c, 2, "w/b", "x");
    put(&c, 1, "elsewhere", "z");
    let r = c.http.delete(&format!("{}/v1/kv/w/a", c.url(1))).unwrap();
    let r4 = r.json()["revision"].as_u64().unwrap();
    assert_eq!(next_change(&mut now), ("put".into(), "w/a".into(), Some("2".into()), r2));
    assert_eq!(next_change(&mut now), ("put".into(), "w/b".into(), Some("x".into()), r3));
    assert_eq!(next_change(&mut now), ("delete".into(), "w/a".into(), None, r4));
    assert_eq!(next_change(&mut one_key), ("put".into(), "w/b".into(), Some("x".into()), r3));
    // From a revision, on another member: the same changes with the same revisions.
    let mut from = long.stream(&format!("{}/v1/watch?prefix=w/&start_revision={first}", c.url(1))).unwrap();
    assert_eq!(from.status, StatusCode::OK);
    assert_eq!(from.revision, Some(first - 1));
    assert_eq!(next_change(&mut from), ("put".into(), "w/a".into(), Some("1".into()), first));
    assert_eq!(next_change(&mut from).3, r2);
    assert_eq!(next_change(&mut from).3, r3);
    assert_eq!(next_change(&mut from).3, r4);
    // With prev_kv=true each change also carries the key's previous value (none for a
    // new key; for a delete, what it removed).
    let mut with_prev = long.stream(&format!("{}/v1/watch?prefix=w/&start_revision={first}&prev_kv=true", c.url(3))).unwrap();
    let mut prevs = Vec::new();
    for _ in 0..4 {
        let line = loop {
            let l = with_prev.next_json().expect("the prev_kv stream ended");
            if l["type"] != "progress" {
                break l;
            }
        };
        prevs.push((line["revision"].as_u64().unwrap(), line["prev"].clone()));
    }
    assert_eq!(
        prevs,
        [
            (first, Value::Null),
            (r2, serde_json::json!({"value": "1", "revision": first})),
            (r3, Value::Null),
            (r4, serde_json::json!({"value": "2", "revision": r2})),
        ]
    );
    let mut without = long.stream(&format!("{}/v1/watch?prefix=w/&start_revision={r2}", c.url(3))).unwrap();
    let line = without.next_json().expect("a change");
    assert_eq!(line["revision"], r2);
    assert!(line.get("prev").is_none(), "a prev without prev_kv: {line}");
    // A list's revision is where a watch takes over without a gap or a repeat.
    let list = c.http.get(&format!("{}/v1/kv?prefix=w/", c.url(2))).unwrap().json();
    let at = list["revision"].as_u64().unwrap();
    assert!(at >= r4, "{list}");
    let mut after_list = long.stream(&format!("{}/v1/watch?prefix=w/&start_revision={}&progress_ms=200", c.url(2), at + 1)).unwrap();
    let r5 = put(&c, 2, "w/c", "after the list");
    assert_eq!(next_change(&mut after_list), ("put".into(), "w/c".into(), Some("after the list".into()), r5));
    // A quiet stream says how far it has looked.
    let progress = after_list.next_json().unwrap();
    assert_eq!(progress["type"], "progress", "{progress}");
    assert!(progress["revision"].as_u64().unwrap() >= r5);
    // The history is bounded: older revisions get 410 compacted.
    for i in 0..60 {
        put(&c, 1, &format!("fill{i}"), "v");
    }
    let r = c.http.get(&format!("{}/v1/watch?start_revision={first}", c.url(1))).unwrap();
    assert_eq!(r.status, StatusCode::GONE, "{}", r.text());
    assert_eq!(r.json()["code"], "compacted");
    // Bad requests.
    for q in ["key=a&prefix=b", "keys=a", "prefix=a&prefix=b", "key=", "start_revision=0", "start_revision=x", "consistency=eventual", "progress_ms=5", "prev_kv=yes"] {
        let r = c.http.get(&format!("{}/v1/watch?{q}", c.url(1))).unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.text());
    }
    assert_eq!(c.http.put(&format!("{}/v1/watch", c.url(1)), "x").unwrap().status, StatusCode::METHOD_NOT_ALLOWED);
    let metrics = c.http.get(&format!("{}/metrics", c.url(2))).unwrap().text();
    assert!(metrics.contains("raftkv_watch_streams 2"), "two streams open on node 2");
    // A stopping member ends its streams (cleanly: the body ends) instead of waiting
    // for them and then cutting their connections.
    assert_eq!(c.terminate(2, T), Some(0));
    let started = std::time::Instant::now();
    let rest = now.rest();
    eprintln!("stream ended {:?} after exit: {rest:?}", started.elapsed());
    assert!(rest.is_ok(), "{rest:?}");
    assert!(after_list.rest().is_ok());
}

#[test]
fn a_stream_that_falls_behind_the_history_is_told_so_and_ends() {
    let c = Cluster::start_with(3, Options { extra_args: vec!["--watch-history".into(), "10".into()], ..Options::default() });
    c.put_retry(1, "before", "v", T);
    // Without --watch-prev-kv a member keeps no previous values, and says so.
    let r = c.http.get(&format!("{}/v1/watch?prev_kv=true", c.url(1))).unwrap();
    assert_eq!((r.status, r.json()["code"].clone()), (StatusCode::BAD_REQUEST, serde_json::json!("prev_kv_disabled")));
    // A bound for the whole stream, 80 MiB of writes included (about 25 s on a busy
    // 2-core machine).
    let long = Http::new(Duration::from_secs(120));
    let mut s = long.stream(&format!("{}/v1/watch?progress_ms=1000", c.url(3))).unwrap();
    assert_eq!(s.status, StatusCode::OK);
    let from = s.revision.unwrap();
    // The client reads nothing while 80 MiB of changes go by: the socket's buffers and
    // the stream's queue hold far less, so the stream waits, and the history (10
    // changes) moves past it.
    let value = vec![b'v'; 1 << 20];
    for i in 0..80 {
        let r = c.http.put(&format!("{}/v1/kv/big{i}", c.url(1)), value.clone()).unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let mut puts = 0;
    let last = loop {
        let line = s.next_json().expect("the stream ended without a compacted line");
        match line["type"].as_str() {
            Some("put") => puts += 1,
            Some("compacted") => break line,
            _ => {}
        }
    };
    assert!(puts < 80, "every change arrived: the stream never fell behind");
    let start = last["revision"].as_u64().unwrap();
    assert!(start > from + 1, "{last}");
    assert!(last["error"].as_str().unwrap().contains("list the keys again"), "{last}");
    assert_eq!(s.rest(), Ok(Vec::new()), "the compacted line is the last");
    let r = c.http.get(&format!("{}/v1/watch?start_revision={}", c.url(3), from + 1)).unwrap();
    assert_eq!(r.status, StatusCode::GONE, "{}", r.text());
    let metrics = c.http.get(&format!("{}/metrics", c.url(3))).unwrap().text();
    assert!(metrics.contains("raftkv_watch_compacted_total 1"), "{metrics}");
    assert!(metrics.contains("raftkv_watch_streams 0"), "the stream's slot is given back");
}

#[test]
fn a_transaction_swaps_two_keys_atomically_or_runs_its_failure_branch() {
    let c = Cluster::start(3);
    let put = |k: &str, v: &str| c.http.put(&format!("{}/v1/kv/{k}", c.url(1)), v.to_string()).unwrap().json()["revision"].as_u64().unwrap();
    let (ra, rb) = (put("x/a", "1"), put("x/b", "2"));
    let long = Http::new(Duration::from_secs(60));
    let mut watch = long.stream(&format!("{}/v1/watch?prefix=x/", c.url(3))).unwrap();
    let swap = format!(
        r#"{{"compare":[{{"key":"x/a","revision":{ra}}},{{"key":"x/b","revision":{rb}}}],
            "success":[{{"op":"put","key":"x/a","value":"2"}},{{"op":"put","key":"x/b","value":"1"}}],
            "failure":[{{"op":"put","key":"x/conflict","value_base64":"AP8="}},{{"op":"get","key":"x/a"}},{{"op":"get","key":"x/none"}}]}}"#
    );
    // Through a follower: committed by a quorum, answered once applied.
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let r = c.http.post(&format!("{}/v1/txn", c.url(follower)), swap.clone()).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let body = r.json();
    assert_eq!(body["succeeded"], true, "{body}");
    let rev = body["revision"].as_u64().unwrap();
    assert_eq!(body["results"], serde_json::json!([{"op":"put","key":"x/a","existed":true},{"op":"put","key":"x/b","existed":true}]));
    for (id, k, v) in [(1, "x/a", "2"), (2, "x/b", "1"), (3, "x/a", "2")] {
        let r = c.http.get(&format!("{}/v1/kv/{k}", c.url(id))).unwrap().json();
        assert_eq!((r["value"].as_str(), r["revision"].as_u64()), (Some(v), Some(rev)), "{k} on {id}");
    }
    // Watchers see both writes at the one revision.
    assert_eq!(next_change(&mut watch), ("put".into(), "x/a".into(), Some("2".into()), rev));
    assert_eq!(next_change(&mut watch), ("put".into(), "x/b".into(), Some("1".into()), rev));
    // The same transaction again: its compares no longer hold, the failure branch runs.
    let r = c.http.post(&format!("{}/v1/txn", c.url(leader)), swap).unwrap().json();
    assert_eq!(r["succeeded"], false, "{r}");
    // Its gets read, atomically with the failed compares, what made them fail.
    assert_eq!(
        r["results"],
        serde_json::json!([{"op":"put","key":"x/conflict","existed":false},{"op":"get","key":"x/a","found":true,"value":"2","revision":rev},{"op":"get","key":"x/none","found":false}])
    );
    let r = c.http.get(&format!("{}/v1/kv/x/conflict", c.url(2))).unwrap().json();
    assert_eq!(r["value_base64"], "AP8=");
    assert_eq!(c.get(1, "x/a").unwrap().as_deref(), Some("2"), "untouched");
    // A lock: take it if free, else learn who holds it. Both through followers.
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let lock = |id: u64, me: &str| {
        let body = format!(r#"{{"compare":[{{"key":"x/lock","revision":0}}],"success":[{{"op":"put","key":"x/lock","value":"{me}"}}],"failure":[{{"op":"get","key":"x/lock"}}]}}"#);
        c.http.post(&format!("{}/v1/txn", c.url(id)), body).unwrap().json()
    };
    let first = lock(others[0], "one");
    assert_eq!(first["succeeded"], true, "{first}");
    let second = lock(others[1], "two");
    assert_eq!(second["succeeded"], false, "{second}");
    assert_eq!(second["results"], serde_json::json!([{"op":"get","key":"x/lock","found":true,"value":"one","revision":first["revision"]}]));
    // An ephemeral lock (etcd's concurrency mutex): taken with a lease in the same
    // transaction, gone with the lease.
    let r = c.http.post(&format!("{}/v1/leases", c.url(others[0])), r#"{"ttl":60}"#).unwrap();
    let lease = r.json()["id"].as_u64().unwrap();
    let body = format!(r#"{{"compare":[{{"key":"x/elock","revision":0}}],"success":[{{"op":"put","key":"x/elock","value":"one","lease":{lease}}}]}}"#);
    let r = c.http.post(&format!("{}/v1/txn", c.url(others[1])), body).unwrap().json();
    assert_eq!(r["succeeded"], true, "{r}");
    assert_eq!(c.http.get(&format!("{}/v1/kv/x/elock", c.url(leader))).unwrap().json()["lease"], lease);
    assert_eq!(c.http.delete(&format!("{}/v1/leases/{lease}", c.url(leader))).unwrap().json()["deleted"], 1);
    assert_eq!(c.http.get(&format!("{}/v1/kv/x/elock", c.url(others[0]))).unwrap().status, StatusCode::NOT_FOUND);
    // A lease that is gone: 404, and nothing of the branch is written.
    let body = format!(r#"{{"success":[{{"op":"put","key":"x/plain","value":"p"}},{{"op":"put","key":"x/elock","value":"two","lease":{lease}}}]}}"#);
    let r = c.http.post(&format!("{}/v1/txn", c.url(others[0])), body).unwrap();
    assert_eq!((r.status, r.json()["code"].clone()), (StatusCode::NOT_FOUND, serde_json::json!("lease_not_found")), "{}", r.text());
    assert_eq!(c.http.get(&format!("{}/v1/kv/x/plain", c.url(leader))).unwrap().status, StatusCode::NOT_FOUND);
    // Refused before anything is proposed.
    let r = c.http.post(&format!("{}/v1/txn", c.url(1)), r#"{"success":[{"op":"put","key":"x/a"}]}"#).unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(c.http.get(&format!("{}/v1/txn", c.url(1))).unwrap().status, StatusCode::METHOD_NOT_ALLOWED);
    let big = format!(r#"{{"success":[{{"op":"put","key":"k","value":"{}"}}]}}"#, "v".repeat(2 << 20));
    assert_eq!(c.http.post(&format!("{}/v1/txn", c.url(1)), big).unwrap().status, StatusCode::PAYLOAD_TOO_LARGE);
    // Gets that read more than 1 MiB are answered as a stream, one result at a time:
    // the same JSON, whole.
    let value = "\u{1}".repeat(1 << 20);
    assert_eq!(c.http.put(&format!("{}/v1/kv/x/big", c.url(1)), value.clone()).unwrap().status, StatusCode::OK);
    let body = r#"{"success":[{"op":"get","key":"x/big"},{"op":"put","key":"x/small","value":"s"},{"op":"get","key":"x/big"},{"op":"get","key":"x/none"}]}"#;
    let r = reqwest::blocking::Client::new().post(format!("{}/v1/txn", c.url(2))).body(body).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("content-length").is_none(), "streamed (chunked), not one buffer: {:?}", r.headers());
    let j: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    assert_eq!(j["succeeded"], true);
    assert!(j["revision"].as_u64().unwrap() > 0, "{}", j["revision"]);
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[0]["value"] == value.as_str() && results[2]["value"] == value.as_str(), "both gets carry the whole value");
    assert_eq!((results[1]["op"].as_str(), results[1]["existed"].as_bool()), (Some("put"), Some(false)));
    assert_eq!(results[3]["found"], false);
}

#[test]
fn a_leased_key_lives_while_kept_alive_goes_when_it_expires_and_survives_a_leader_kill() {
    let mut c = Cluster::start(3);
    let grant = |c: &Cluster, id: u64, ttl: u64| {
        let r = c.http.post(&format!("{}/v1/leases", c.url(id)), format!(r#"{{"ttl":{ttl}}}"#)).unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        r.json()["id"].as_u64().unwrap()
    };
    let present = |c: &Cluster, id: u64, key: &str| c.http.get(&format!("{}/v1/kv/{key}", c.url(id))).unwrap().status == StatusCode::OK;
    let long = Http::new(Duration::from_secs(60));
    let mut watch = long.stream(&format!("{}/v1/watch?prefix=l/", c.url(2))).unwrap();
    // A TTL of 4 s: the requests before the first keepalive must not outlast it on a
    // loaded machine.
    let lease = grant(&c, 1, 4);
    let r = c.http.put(&format!("{}/v1/kv/l/a?lease={lease}", c.url(2)), "held").unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = c.http.get(&format!("{}/v1/leases/{lease}", c.url(3))).unwrap().json();
    assert_eq!((r["ttl"].as_u64(), r["keys"].clone()), (Some(4), serde_json::json!(["l/a"])));
    assert_eq!(c.http.get(&format!("{}/v1/kv/l/a", c.url(3))).unwrap().json()["lease"], lease);
    // Listings show the lease of a leased key (outside the watched prefix: a plain key).
    assert_eq!(c.http.put(&format!("{}/v1/kv/lp", c.url(1)), "v").unwrap().status, StatusCode::OK);
    let r = c.http.get(&format!("{}/v1/kv?prefix=l", c.url(3))).unwrap().json();
    assert_eq!((r["items"][0]["key"].as_str(), r["items"][0]["lease"].as_u64()), (Some("l/a"), Some(lease)), "{r}");
    assert_eq!((r["items"][1]["key"].as_str(), r["items"][1].get("lease")), (Some("lp"), None), "{r}");
    // Kept alive (every 300 ms, through every member) for over twice its TTL: still there.
    let until = std::time::Instant::now() + Duration::from_millis(9000);
    let mut n = 0;
    while std::time::Instant::now() < until {
        n += 1;
        let r = c.http.post(&format!("{}/v1/leases/{lease}/keepalive", c.url(1 + n % 3)), "").unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        std::thread::sleep(Duration::from_millis(300)); // the renewal rhythm, not a wait
    }
    assert!(present(&c, 1, "l/a"), "expired while kept alive");
    // Left alone, it expires: the key goes, watchers see the delete, the lease is gone.
    let gone_after = std::time::Instant::now();
    wait_for(T, "the leased key to expire", || (!present(&c, 3, "l/a")).then_some(()));
    eprintln!("expired {:?} after the last renewal", gone_after.elapsed());
    assert_eq!(next_change(&mut watch).0, "put");
    let (kind, key, _, _) = next_change(&mut watch);
    assert_eq!((kind.as_str(), key.as_str()), ("delete", "l/a"));
    let r = c.http.post(&format!("{}/v1/leases/{lease}/keepalive", c.url(1)), "").unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["code"], "lease_not_found");
    // A lease outlives its leader: the new leader starts its time to live again. Kept
    // alive for longer than its TTL first, so the followers' own deadlines (they never
    // see a keepalive) have long passed: a new leader acting on them would revoke it.
    let lease = grant(&c, 2, 2);
    assert_eq!(c.http.put(&format!("{}/v1/kv/l/b?lease={lease}", c.url(1)), "v").unwrap().status, StatusCode::OK);
    let keep_alive = |c: &Cluster, through: &[u64], for_ms: u64| {
        let until = std::time::Instant::now() + Duration::from_millis(for_ms);
        let mut n = 0;
        while std::time::Instant::now() < until {
            n += 1;
            let id = through[n % through.len()];
            let r = c.http.post(&format!("{}/v1/leases/{lease}/keepalive", c.url(id)), "").unwrap();
            // During the election a keepalive may find no leader (503): renew again.
            assert!(r.status == StatusCode::OK || r.status == StatusCode::SERVICE_UNAVAILABLE, "{} {}", r.status, r.text());
            std::thread::sleep(Duration::from_millis(300)); // the renewal rhythm, not a wait
        }
    };
    keep_alive(&c, &[1, 2, 3], 3500);
    let leader = c.wait_leader(T);
    c.kill(leader);
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let other = others[0];
    keep_alive(&c, &others, 4000);
    c.wait_leader(T);
    assert!(present(&c, other, "l/b"), "a new leader revoked a lease kept alive through the election");
    let r = c.http.post(&format!("{}/v1/leases/{lease}/keepalive", c.url(other)), "").unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Revoked by hand: its keys go at once.
    let r = c.http.delete(&format!("{}/v1/leases/{lease}", c.url(other))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["deleted"], 1);
    assert!(!present(&c, other, "l/b"));
    // Bad requests.
    let r = c.http.put(&format!("{}/v1/kv/l/c?lease=12345", c.url(other)), "v").unwrap();
    assert_eq!((r.status, r.json()["code"].clone()), (StatusCode::NOT_FOUND, serde_json::json!("lease_not_found")));
    assert!(!present(&c, other, "l/c"), "nothing written");
    for body in ["{}", r#"{"ttl":0}"#, r#"{"ttl":"5"}"#, r#"{"ttl":5,"id":3}"#, "x"] {
        assert_eq!(c.http.post(&format!("{}/v1/leases", c.url(other)), body).unwrap().status, StatusCode::BAD_REQUEST, "{body}");
    }
    assert_eq!(c.http.get(&format!("{}/v1/leases/0", c.url(other))).unwrap().status, StatusCode::BAD_REQUEST);
    assert_eq!(c.http.get(&format!("{}/v1/leases/99", c.url(other))).unwrap().status, StatusCode::NOT_FOUND);
    assert_eq!(c.http.put(&format!("{}/v1/leases/99", c.url(other)), "").unwrap().status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(c.http.get(&format!("{}/v1/leases", c.url(other))).unwrap().json()["leases"], serde_json::json!([]));
}

#[test]
fn keepalives_are_renewed_by_the_leader_without_raft_entries() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(T);
    let r = c.http.post(&format!("{}/v1/leases", c.url(1)), r#"{"ttl":60}"#).unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let lease = r.json()["id"].as_u64().unwrap();
    let applied = |id: u64| c.status(id).and_then(|s| s["applied_index"].as_u64()).unwrap_or(0);
    let applied_at = |id: u64, want: u64| wait_for(T, "the grant applied everywhere", || (applied(id) >= want).then_some(()));
    let before = applied(leader);
    for id in 1..=3 {
        applied_at(id, before);
    }
    // Thirty keepalives through every member (two of three forwarded to the leader):
    // all renewed, and the log does not grow (a raft write each would add thirty).
    for n in 0..30u64 {
        let r = c.http.post(&format!("{}/v1/leases/{lease}/keepalive", c.url(1 + n % 3)), "").unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["ttl"], 60);
    }
    let after = applied(leader);
    assert!(after < before + 3, "keepalives wrote raft entries: applied {before} -> {after}");
    let r = c.http.post(&format!("{}/v1/leases/999/keepalive", c.url(1 + leader % 3)), "").unwrap();
    assert_eq!((r.status, r.json()["code"].clone()), (StatusCode::NOT_FOUND, serde_json::json!("lease_not_found")));
    // The peer route members forward them on: the leader renews, a follower points at
    // the leader, bad requests get 400.
    let peer = |id: u64| c.node(id).peer_url();
    let client = reqwest::blocking::Client::builder().timeout(T).no_proxy().build().unwrap();
    let renew = |id: u64, from: Option<&str>, body: Vec<u8>| {
        let mut req = client.post(format!("{}/raft/lease-renew", peer(id))).body(body);
        if let Some(f) = from {
            req = req.header("x-raftkv-from", f);
        }
        let resp = req.send().unwrap();
        (resp.status(), resp.text().unwrap_or_default())
    };
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let (st, body) = renew(leader, Some(&follower.to_string()), lease.to_be_bytes().to_vec());
    assert_eq!(st, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["renewed"], 60000, "{body}");
    assert!(v["revision"].as_u64().unwrap() >= after, "{body}");
    let (st, body) = renew(leader, Some(&follower.to_string()), 999u64.to_be_bytes().to_vec());
    assert_eq!((st, body.as_str()), (StatusCode::OK, r#"{"not_found":true}"#));
    let (st, body) = renew(follower, Some(&leader.to_string()), lease.to_be_bytes().to_vec());
    assert_eq!((st, body), (StatusCode::OK, format!(r#"{{"not_leader":{leader}}}"#)));
    assert_eq!(renew(leader, None, lease.to_be_bytes().to_vec()).0, StatusCode::BAD_REQUEST, "no sender");
    assert_eq!(renew(leader, Some(&follower.to_string()), vec![1, 2, 3]).0, StatusCode::BAD_REQUEST, "not an id");
    let resp = client.get(format!("{}/raft/lease-renew", peer(leader))).send().unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[test]
fn leases_survive_kill_9_of_every_member_through_snapshots_and_still_expire() {
    // Snapshots every 20 entries: the lease is restored from a snapshot image, not only
    // replayed from the log.
    let mut c = Cluster::start_with(3, Options { snapshot_count: 20, ..Options::default() });
    let r = c.http.post(&format!("{}/v1/leases", c.url(1)), r#"{"ttl":3}"#).unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let lease = r.json()["id"].as_u64().unwrap();
    assert_eq!(c.http.put(&format!("{}/v1/kv/eph?lease={lease}", c.url(2)), "v").unwrap().status, StatusCode::OK);
    for i in 0..60 {
        c.put_retry(1 + i % 3, &format!("fill{i}"), "v", T);
    }
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.spawn(id);
    }
    c.wait_leader(T);
    // Still there after the restart (every member restarts the lease's TTL)...
    let r = c.http.get(&format!("{}/v1/leases/{lease}", c.url(3))).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["keys"], serde_json::json!(["eph"]));
    assert_eq!(c.http.get(&format!("{}/v1/kv/eph", c.url(1))).unwrap().json()["lease"], lease);
    // ...and, left alone, it expires with its key.
    wait_for(T, "the restored lease to expire", || {
        (c.http.get(&format!("{}/v1/kv/eph", c.url(2))).ok()?.status == StatusCode::NOT_FOUND).then_some(())
    });
    assert_eq!(c.http.get(&format!("{}/v1/leases/{lease}", c.url(1))).unwrap().status, StatusCode::NOT_FOUND);
    assert!(c.get(1, "fill59").unwrap().is_some(), "other keys stay");
}

/// A lease granted through a follower is answered once the follower applied it, which
/// can be before the leader has: the leader commits on its followers' acks while its
/// own fsync runs, and applies only after it. Here the leader's disk is slow
/// (`RAFTKV_FAULT_SYNC_DELAY_MS`), so that always happens. The client's first
/// keepalive, forwarded to the leader at once, must still find the lease: the leader
/// says "not found" only after its read barrier, never from a state that has not
/// applied the grant yet.
#[test]
fn a_keepalive_right_after_a_grant_through_a_follower_finds_the_lease() {
    let mut c = Cluster::start(3);
    let first = c.wait_leader(T);
    // Member `slow` gets a slow disk (a restart with the fault hook), then leadership.
    let slow = 1 + first % 3;
    c.kill(slow);
    c.nodes[(slow - 1) as usize].env = vec![("RAFTKV_FAULT_SYNC_DELAY_MS".into(), "40".into())];
    c.spawn(slow);
    wait_for(T, "the slow member to lead", || {
        if c.status(slow)?["role"] == "leader" {
            return Some(());
        }
        let leader = c.wait_leader(T);
        let _ = c.http.post(&format!("{}/v1/leader/transfer", c.url(leader)), format!(r#"{{"to":{slow}}}"#));
        None
    });
    let follower = 1 + slow % 3;
    let mut renewed = 0;
    for _ in 0..20 {
        let r = c.http.post(&format!("{}/v1/leases", c.url(follower)), r#"{"ttl":60}"#).unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let lease = r.json()["id"].as_u64().unwrap();
        let r = c.http.post(&format!("{}/v1/leases/{lease}/keepalive", c.url(follower)), "").unwrap();
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            continue; // no leader for a moment: the client renews again
        }
        assert_eq!(r.status, StatusCode::OK, "keepalive right after the grant of {lease}: {}", r.text());
        renewed += 1;
    }
    assert!(renewed >= 15, "only {renewed} of 20 keepalives answered");
    println!("operations checked: 20 grants, {renewed} keepalives right after them");
}
