//! Process faults under load, checked for linearizability: 8 clients read and write
//! through every node while nodes are killed with SIGKILL and restarted, and the leader
//! is paused with SIGSTOP and resumed. Every operation goes into a history (writes that
//! got no answer are "outcome unknown"); at the end every key is read once more, so a
//! lost acknowledged write is a violation too. The checker decides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
