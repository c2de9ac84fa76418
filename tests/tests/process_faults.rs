//! Process faults under load, checked for linearizability: 8 clients read and write
//! through every node while nodes are killed with SIGKILL and restarted, and the leader
//! is paused with SIGSTOP and resumed. Every operation goes into a history (writes that
//! got no answer are "outcome unknown"); at the end every key is read once more, so a
//! lost acknowledged write is a violation too. The checker decides.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use raftkv_tests::linearizability::history::{Op, Recorder};
use raftkv_tests::linearizability::{check, CheckResult};
use raftkv_tests::{recorded_get, recorded_put, wait_for, Cluster, Http, StatusCode};

const KEYS: usize = 100;
const CLIENTS: u64 = 8;

fn client_loop(urls: Vec<String>, rec: Arc<Recorder>, stop: Arc<AtomicBool>, client: u64) {
    let http = Http::new(Duration::from_secs(4));
    let mut rng = rand::rngs::StdRng::seed_from_u64(client);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("k{}", rng.gen_range(0..KEYS));
        let url = format!("{}/{key}", urls[rng.gen_range(0..urls.len())]);
        if rng.gen_bool(0.5) {
            seq += 1;
            recorded_put(&http, &rec, client, &url, key, format!("{client}-{seq}").into_bytes());
        } else {
            recorded_get(&http, &rec, client, &url, key);
        }
    }
}

#[test]
fn kill_9_and_a_paused_leader_under_load_stay_linearizable() {
    let mut c = Cluster::start(3);
    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = (1..=3).map(|id| c.url(id)).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (urls, rec, stop) = (urls.clone(), rec.clone(), stop.clone());
            std::thread::spawn(move || client_loop(urls, rec, stop, client))
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let rounds = if std::env::var("RAFTKV_SOAK").is_ok() { 40 } else { 4 };
    let started = Instant::now();
    for round in 0..rounds {
        // Hold each fault for a while under load (holding, not waiting for a condition).
        std::thread::sleep(Duration::from_millis(600));
        let victim = rng.gen_range(1..=3u64);
        c.kill(victim);
        std::thread::sleep(Duration::from_millis(800));
        c.spawn(victim);
        let leader = c.wait_leader(Duration::from_secs(20));
        c.signal(leader, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(1500));
        c.signal(leader, libc::SIGCONT);
        c.wait_leader(Duration::from_secs(20));
        eprintln!("round {round}: killed {victim}, paused leader {leader}, {} ops so far", rec.len());
    }
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().expect("client thread");
    }
    // Final reads of every key: an acknowledged write that got lost shows up here.
    let http = Http::new(Duration::from_secs(5));
    for k in 0..KEYS {
        let key = format!("k{k}");
        let url = format!("{}/{key}", c.url(1 + (k as u64 % 3)));
        let r = wait_for(Duration::from_secs(20), "a final read", || {
            let p = rec.begin(99, Op::Get { key: key.clone(), result: None });
            match http.get(&url) {
                Ok(r) if r.status == StatusCode::OK || r.status == StatusCode::NOT_FOUND => {
                    let v = (r.status == StatusCode::OK).then_some(r.body.clone());
                    p.read(v).expect("completion");
                    Some(r)
                }
                _ => {
                    p.failed();
                    None
                }
            }
        });
        drop(r);
    }
    let events = rec.events();
    let writes_acked = events.iter().filter(|e| e.op.is_write() && e.complete.is_some()).count();
    eprintln!("{} operations ({writes_acked} acknowledged writes) in {:?}", events.len(), started.elapsed());
    assert!(writes_acked > 200, "too little load got through: {writes_acked} acknowledged writes");
    match check(&events, Duration::from_secs(60)).expect("well-formed history") {
        CheckResult::Ok => {}
        other => panic!("history of {} operations is not proven linearizable: {other}", events.len()),
    }
}

/// A change a watcher saw: key, value (None: a delete), revision.
type Seen = (String, Option<String>, u64);

/// Follows `prefix=s/` from revision `from` across members: whenever a stream ends (its
/// member was killed, or the client's 5 s bound ran out), it resumes on the next member
/// with `start_revision` = one past the last revision it knows it has every change of.
fn follow(urls: Vec<String>, from: u64, stop: Arc<AtomicBool>, seen: Arc<Mutex<Vec<Seen>>>, next_out: Arc<AtomicU64>, streams: Arc<AtomicU64>) {
    let http = Http::new(Duration::from_secs(5));
    let mut next = from;
    let mut member = 0;
    while !stop.load(Ordering::Relaxed) {
        let url = format!("{}/v1/watch?prefix=s/&start_revision={next}&progress_ms=200", urls[member % urls.len()]);
        member += 1;
        let Ok(mut s) = http.stream(&url) else {
            // A killed member refuses at once: a short pause before the next one.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        assert_ne!(s.status, StatusCode::GONE, "{url}: the history lost revision {next}");
        if s.status != StatusCode::OK {
            continue;
        }
        streams.fetch_add(1, Ordering::Relaxed);
        while let Some(line) = s.next_json() {
            let rev = line["revision"].as_u64().expect("revision");
            match line["type"].as_str() {
                Some("put") | Some("delete") => {
                    assert!(rev >= next, "{url}: revision {rev} before the stream's start {next}: {line}");
                    let value = line["value"].as_str().map(str::to_string);
                    seen.lock().unwrap().push((line["key"].as_str().unwrap().to_string(), value, rev));
                    next = rev + 1;
                }
                Some("progress") => next = next.max(rev + 1),
                _ => panic!("unexpected line {line}"),
            }
            next_out.store(next, Ordering::Relaxed);
        }
    }
}

#[test]
fn watch_streams_resume_across_kill_9_with_no_change_missed_or_repeated() {
    let mut c = Cluster::start(3);
    let urls: Vec<String> = (1..=3).map(|id| c.url(id)).collect();
    let from = c.status(1).unwrap()["applied_index"].as_u64().unwrap() + 1;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU64::new(from));
    let streams = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (urls, stop, seen, next, streams) = (urls.clone(), stop.clone(), seen.clone(), next.clone(), streams.clone());
        std::thread::spawn(move || follow(urls, from, stop, seen, next, streams))
    };
    // One writer, key s/<i> = <i>, through any member; a write without an answer is
    // tried again (it may then be applied twice: both are changes the watcher sees).
    let acked = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let writer = {
        let (urls, stop, acked) = (urls.clone(), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let http = Http::new(Duration::from_secs(4));
            let mut i = 0u64;
            let mut member = 0;
            while !stop.load(Ordering::Relaxed) {
                member += 1;
                let key = format!("s/{i}");
                match http.put(&format!("{}/v1/kv/{key}", urls[member % urls.len()]), i.to_string()) {
                    Ok(r) if r.status == StatusCode::OK => {
                        acked.lock().unwrap().push((key, r.json()["revision"].as_u64().unwrap()));
                        i += 1;
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    let acked_count = || acked.lock().unwrap().len();
    let rounds = if std::env::var("RAFTKV_SOAK").is_ok() { 30 } else { 3 };
    for round in 0..rounds {
        for victim in 1..=3u64 {
            let before = acked_count();
            wait_for(Duration::from_secs(20), "writes before the kill", || (acked_count() >= before + 30).then_some(()));
            c.kill(victim);
            let during = acked_count();
            wait_for(Duration::from_secs(20), "writes with a member down", || (acked_count() >= during + 30).then_some(()));
            c.spawn(victim);
        }
        eprintln!("round {round}: {} writes acknowledged, {} streams so far", acked_count(), streams.load(Ordering::Relaxed));
    }
    let after_restart = acked_count();
    let last = wait_for(Duration::from_secs(20), "more writes after the last restart", || {
        let n = acked_count();
        (n >= after_restart + 30).then(|| acked.lock().unwrap()[n - 1].1)
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let last = acked.lock().unwrap().last().map_or(last, |a| a.1);
    wait_for(Duration::from_secs(30), "the watcher to catch up", || (next.load(Ordering::Relaxed) > last).then_some(()));
    watcher.join().expect("watcher");
    let seen = seen.lock().unwrap();
    let acked = acked.lock().unwrap();
    eprintln!("{} writes acknowledged, {} changes seen over {} streams", acked.len(), seen.len(), streams.load(Ordering::Relaxed));
    // Nothing repeated, in order: revisions strictly increase.
    for w in seen.windows(2) {
        assert!(w[0].2 < w[1].2, "out of order or repeated: {:?} then {:?}", w[0], w[1]);
    }
    // Only what was written: a write tried again may appear twice, with the same value.
    for s in seen.iter() {
        assert_eq!(s.1.as_deref(), s.0.strip_prefix("s/"), "{s:?}");
    }
    // Nothing missed: every acknowledged write is there, at its revision, with its value.
    let by_rev: std::collections::HashMap<u64, &Seen> = seen.iter().map(|s| (s.2, s)).collect();
    for (key, rev) in acked.iter() {
        let s = by_rev.get(rev).unwrap_or_else(|| panic!("acknowledged {key} at {rev} never seen"));
        assert_eq!(&s.0, key);
        assert_eq!(s.1.as_deref(), key.strip_prefix("s/"));
    }
    assert!(streams.load(Ordering::Relaxed) > 3 * rounds as u64, "the watcher never had to resume");
}
