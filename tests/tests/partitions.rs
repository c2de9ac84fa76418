//! Network partitions under load, checked for linearizability. Each node runs in its own
//! network namespace (raftkv_tests::netns); faults cut, flap or split the peer (raft)
//! links while 8 clients keep reading and writing through every node's client link.
//! Every operation goes into a history (writes that got no clear answer are "outcome
//! unknown", failed reads observed nothing); at the end every key is read once more
//! through a linearizable GET, so a lost acknowledged write is a violation too, every
//! node must converge to those final values (serializable reads of its local state),
//! and the checker decides. Besides the history, each scenario asserts what the cut-off
//! side must not do: answer a write or a linearizable read it got after the cut.
//!
//! Needs root and `ip` (iproute2); prints SKIP otherwise. `RAFTKV_SOAK=1` runs more and
//! longer rounds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use raftkv_tests::linearizability::history::{Event, Op, Recorder};
use raftkv_tests::linearizability::{check, CheckResult};
use raftkv_tests::netns::{NetCluster, NetOptions};
use raftkv_tests::{recorded_get, recorded_put, wait_for, Http, StatusCode};
use rand::{Rng, SeedableRng};

const KEYS: usize = 40;
const CLIENTS: u64 = 8;
/// The client of the final reads in the history.
const FINAL_READER: u64 = 1_000;

fn soak() -> bool {
    std::env::var("RAFTKV_SOAK").is_ok()
}

/// `n` rounds normally, `soak_n` with `RAFTKV_SOAK`.
fn rounds(n: usize, soak_n: usize) -> usize {
    if soak() {
        soak_n
    } else {
        n
    }
}

fn key(k: usize) -> String {
    format!("k{k}")
}

/// One request as seen from the client side: which node it went to and how it ended.
#[derive(Clone, Copy, Debug)]
struct NodeOp {
    node: u64,
    write: bool,
    /// The client and its write sequence number (0 for reads): the value written is
    /// `"<client>-<seq>"`.
    client: u64,
    seq: u64,
    /// Recorder nanoseconds.
    invoke: u64,
    complete: u64,
    /// 2xx for a write; 200/404 for a read.
    ok: bool,
}

/// Clients reading and writing random keys through random nodes until stopped.
struct Load {
    rec: Arc<Recorder>,
    ops: Arc<Mutex<Vec<NodeOp>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(c: &NetCluster, seed: u64) -> Load {
        let rec = Arc::new(Recorder::new());
        let ops = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let urls: Vec<(u64, String)> = c.ids().into_iter().map(|id| (id, c.url(id))).collect();
        let threads = (0..CLIENTS)
            .map(|client| {
                let (urls, rec, ops, stop) = (urls.clone(), rec.clone(), ops.clone(), stop.clone());
                std::thread::spawn(move || client_loop(&urls, &rec, &ops, &stop, client, seed))
            })
            .collect();
        Load {
            rec,
            ops,
            stop,
            threads,
        }
    }

    /// Recorder time now (nanoseconds).
    fn now(&self) -> u64 {
        self.rec.now()
    }

    fn ops(&self) -> Vec<NodeOp> {
        self.ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until at least `count` recorded requests match `pred`.
    fn wait_ops(
        &self,
        timeout: Duration,
        what: &str,
        count: usize,
        pred: impl Fn(&NodeOp) -> bool,
    ) {
        wait_for(timeout, what, || {
            (self.ops().iter().filter(|o| pred(o)).count() >= count).then_some(())
        });
    }

    /// Stops the clients and waits for them.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("client thread");
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn client_loop(
    urls: &[(u64, String)],
    rec: &Recorder,
    ops: &Mutex<Vec<NodeOp>>,
    stop: &AtomicBool,
    client: u64,
    seed: u64,
) {
    let http = Http::new(Duration::from_secs(5));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1_000 + client);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = key(rng.gen_range(0..KEYS));
        let (node, base) = &urls[rng.gen_range(0..urls.len())];
        let url = format!("{base}/{key}");
        let write = rng.gen_bool(0.5);
        let (invoke, ok) = if write {
            seq += 1;
            recorded_put(&http, rec, client, &url, key, format!("{client}-{seq}").into_bytes())
        } else {
            recorded_get(&http, rec, client, &url, key)
        };
        let op = NodeOp {
            node: *node,
            write,
            client,
            seq: if write { seq } else { 0 },
            invoke,
            complete: rec.now(),
            ok,
        };
        ops.lock().unwrap_or_else(PoisonError::into_inner).push(op);
    }
}

/// A window during which `nodes` were cut off from the quorum.
struct Cut {
    nodes: Vec<u64>,
    from: u64,
    to: u64,
}

/// Asserts that the cut-off nodes answered no write and no linearizable read that they
/// received after the cut, and that no write they acknowledged completed later than the
/// request timeout (plus slack) after the cut. Returns how many requests they failed.
fn cut_side_acked_nothing(
    ops: &[NodeOp],
    cut: &Cut,
    request_timeout: Duration,
) -> Result<usize, String> {
    let late = cut.from + (request_timeout + Duration::from_secs(1)).as_nanos() as u64;
    let ms = |t: u64| t.saturating_sub(cut.from) / 1_000_000;
    let mut refused = 0;
    for o in ops
        .iter()
        .filter(|o| cut.nodes.contains(&o.node) && o.complete <= cut.to)
    {
        let what = if o.write {
            "write"
        } else {
            "linearizable read"
        };
        if o.invoke >= cut.from {
            if o.ok {
                return Err(format!(
                    "node {} (cut off) answered a {what} sent {} ms after the cut, completed {} ms after it",
                    o.node,
                    ms(o.invoke),
                    ms(o.complete)
                ));
            }
            refused += 1;
        } else if o.ok && o.write && o.complete > late {
            return Err(format!(
                "node {} (cut off) acknowledged a write {} ms after the cut (sent before it)",
                o.node,
                ms(o.complete)
            ));
        }
    }
    if refused == 0 {
        return Err(format!(
            "no request reached the cut-off nodes {:?}: the check proved nothing",
            cut.nodes
        ));
    }
    Ok(refused)
}

/// [`cut_side_acked_nothing`], panicking with its finding.
fn assert_cut_side_acked_nothing(ops: &[NodeOp], cut: &Cut, request_timeout: Duration) -> usize {
    cut_side_acked_nothing(ops, cut, request_timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Values of the writes sent to the cut-off nodes after the cut that failed before the
/// heal. When the cut-off side held the leader, these were at most appended to the old
/// leader's log at the old term, which the new leader's log overrides: raft must never
/// apply them (linearizability alone would allow it: their outcome is unknown).
fn doomed_writes(ops: &[NodeOp], cut: &Cut) -> Vec<Vec<u8>> {
    ops.iter()
        .filter(|o| o.write && !o.ok && cut.nodes.contains(&o.node))
        .filter(|o| o.invoke >= cut.from && o.complete <= cut.to)
        .map(|o| format!("{}-{}", o.client, o.seq).into_bytes())
        .collect()
}

/// Asserts that no read of the history returned one of the `doomed` values.
fn assert_never_observed(events: &[Event], doomed: &[Vec<u8>]) {
    for e in events {
        if let Op::Get {
            key,
            result: Some(v),
        } = &e.op
        {
            assert!(
                !doomed.contains(v),
                "client {} read {key} = {:?}: a write the cut-off leader could never commit was applied",
                e.client,
                String::from_utf8_lossy(v)
            );
        }
    }
}

/// The current term of each of `ids`.
fn terms(c: &NetCluster, ids: &[u64]) -> Vec<(u64, u64)> {
    ids.iter()
        .map(|&id| {
            let t = wait_for(
                Duration::from_secs(10),
                &format!("node {id}'s status"),
                || index(c, id, "term"),
            );
            (id, t)
        })
        .collect()
}

/// Pre-vote: a node cut off from the quorum never wins a pre-vote, so it never raises
/// its term (and cannot disrupt the cluster when it comes back).
fn assert_terms_kept(c: &NetCluster, before: &[(u64, u64)]) {
    let ids: Vec<u64> = before.iter().map(|(id, _)| *id).collect();
    for (&(id, term), (_, now)) in before.iter().zip(terms(c, &ids)) {
        assert_eq!(now, term, "node {id} raised its term from {term} to {now} while cut off (pre-vote should prevent it)");
    }
}

fn status_field(c: &NetCluster, id: u64, field: &str) -> Option<serde_json::Value> {
    c.status(id).map(|s| s[field].clone())
}

fn role(c: &NetCluster, id: u64) -> Option<String> {
    status_field(c, id, "role").and_then(|v| v.as_str().map(str::to_owned))
}

fn index(c: &NetCluster, id: u64, field: &str) -> Option<u64> {
    status_field(c, id, field).and_then(|v| v.as_u64())
}

/// Node `id`'s local (serializable) view of the keys: key -> value.
fn local_view(c: &NetCluster, id: u64) -> Option<BTreeMap<String, Vec<u8>>> {
    let url = format!(
        "{}/v1/kv?prefix=k&limit=10000&consistency=serializable",
        c.url(id)
    );
    let r = c.http.get(&url).ok()?;
    if r.status != StatusCode::OK {
        return None;
    }
    let body = r.json();
    let mut m = BTreeMap::new();
    for item in body["items"].as_array()? {
        m.insert(
            item["key"].as_str()?.to_owned(),
            item["value"].as_str()?.as_bytes().to_vec(),
        );
    }
    Some(m)
}

type View = BTreeMap<String, Vec<u8>>;

/// Reads every key once through a linearizable GET (recorded in the history, retried
/// until answered); the values found.
fn final_reads(c: &NetCluster, rec: &Recorder) -> View {
    let all = c.ids();
    let http = Http::new(Duration::from_secs(5));
    let mut found = BTreeMap::new();
    for k in 0..KEYS {
        let key = key(k);
        let node = all[k % all.len()];
        let url = format!("{}/{key}", c.url(node));
        let what = format!("a final read of {key} on node {node}");
        let value = wait_for(Duration::from_secs(20), &what, || {
            let op = Op::Get {
                key: key.clone(),
                result: None,
            };
            let p = rec.begin(FINAL_READER, op);
            match http.get(&url) {
                Ok(r) if r.status == StatusCode::OK => {
                    p.read(Some(r.body.clone())).expect("get completion");
                    Some(Some(r.body))
                }
                Ok(r) if r.status == StatusCode::NOT_FOUND => {
                    p.read(None).expect("get completion");
                    Some(None)
                }
                _ => {
                    p.failed();
                    None
                }
            }
        });
        if let Some(v) = value {
            found.insert(key, v);
        }
    }
    found
}

/// The keys where two views differ, for humans.
fn view_diff(a: &View, b: &View) -> Vec<String> {
    let show = |x: Option<&Vec<u8>>| x.map(|b| String::from_utf8_lossy(b).into_owned());
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {:?} vs {:?}", show(a.get(k)), show(b.get(k))))
        .collect()
}

/// How [`wait_views`] ended without every node showing `expected`.
enum NotConverged {
    /// Every node shows the same state, but not `expected`: a write whose outcome was
    /// unknown was applied after the final reads (a forwarded proposal that sat in a
    /// peer connection during a cut may arrive seconds later).
    LateWrite(View),
}

/// Waits until every node's local (serializable) state equals `expected`. Panics with
/// the differences and every node's status when the nodes still disagree after
/// `timeout`.
fn wait_views(c: &NetCluster, expected: &View, timeout: Duration) -> Result<(), NotConverged> {
    let deadline = Instant::now() + timeout;
    loop {
        let views: Vec<Option<View>> = c.ids().into_iter().map(|id| local_view(c, id)).collect();
        if views.iter().all(|v| v.as_ref() == Some(expected)) {
            return Ok(());
        }
        if let Some(Some(first)) = views.first() {
            if views.iter().all(|v| v.as_ref() == Some(first)) {
                return Err(NotConverged::LateWrite(first.clone()));
            }
        }
        if Instant::now() >= deadline {
            for (i, v) in views.iter().enumerate() {
                let id = i as u64 + 1;
                match v {
                    Some(v) => eprintln!(
                        "node {id} vs the final reads: {:#?}",
                        view_diff(v, expected)
                    ),
                    None => eprintln!("node {id}: local state unreadable"),
                }
                eprintln!("status of node {id}: {:?}", c.status(id));
            }
            panic!("the nodes' local states did not converge to the final linearizable reads within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Final reads, then every node must show exactly those values. When a late write
/// changed a key after its final read (all nodes agree on a newer state), the reads are
/// repeated (they stay in the history, so the checker judges the late write too).
fn converge(c: &NetCluster, rec: &Recorder) -> View {
    for attempt in 1..=3 {
        let expected = final_reads(c, rec);
        match wait_views(c, &expected, Duration::from_secs(30)) {
            Ok(()) => return expected,
            Err(NotConverged::LateWrite(seen)) => eprintln!(
                "attempt {attempt}: every node agrees on a state newer than the final reads \
                 (a write with unknown outcome applied late): {:?}; reading again",
                view_diff(&seen, &expected)
            ),
        }
    }
    panic!(
        "the state kept changing after the load stopped: 3 rounds of final reads were overtaken"
    );
}

/// Stops the load, reads every key once more through a linearizable GET (recorded),
/// waits until every node's local state shows exactly those values, and checks the
/// history. Returns the history.
fn finish(c: &NetCluster, mut load: Load, started: Instant) -> Vec<Event> {
    load.stop();
    let all = c.ids();
    c.wait_leader(&all, Duration::from_secs(30));
    let expected = converge(c, &load.rec);
    let events = load.rec.events();
    let acked = events
        .iter()
        .filter(|e| e.op.is_write() && e.complete.is_some())
        .count();
    let unknown = events
        .iter()
        .filter(|e| e.op.is_write() && e.complete.is_none())
        .count();
    eprintln!(
        "{} operations ({acked} acknowledged writes, {unknown} unknown) in {:?}; every node shows the {} final values",
        events.len(),
        started.elapsed(),
        expected.len()
    );
    assert!(
        acked > 60,
        "too little load got through: {acked} acknowledged writes"
    );
    match check(&events, Duration::from_secs(60)).expect("well-formed history") {
        CheckResult::Ok => {}
        other => panic!(
            "history of {} operations is not proven linearizable: {other}",
            events.len()
        ),
    }
    println!(
        "operations checked: {} (acked writes {acked})",
        events.len()
    );
    events
}

fn others(all: &[u64], out: &[u64]) -> Vec<u64> {
    all.iter().copied().filter(|id| !out.contains(id)).collect()
}

/// Waits for `count` writes acknowledged through `nodes` that were sent at or after `since`.
fn wait_writes(load: &Load, nodes: &[u64], since: u64, count: usize, what: &str) {
    load.wait_ops(Duration::from_secs(30), what, count, |o| {
        o.write && o.ok && o.invoke >= since && nodes.contains(&o.node)
    });
}

/// Waits until the nodes `cut` have answered (failed) both writes and reads sent after
/// `since`, so the window holds requests to judge.
fn wait_cut_side_answered(load: &Load, cut: &[u64], since: u64) {
    for write in [true, false] {
        load.wait_ops(
            Duration::from_secs(30),
            "answers from the cut-off side",
            2,
            |o| o.write == write && o.invoke >= since && cut.contains(&o.node),
        );
    }
}

/// (a) The leader is isolated from the majority under load.
#[test]
fn isolated_leader_acks_nothing_and_catches_up_after_heal() {
    let opts = NetOptions::default();
    let rt = Duration::from_millis(opts.request_timeout_ms);
    let Some(c) = NetCluster::start_or_skip(3, opts) else {
        return;
    };
    let started = Instant::now();
    let load = Load::start(&c, 1);
    let all = c.ids();
    wait_writes(&load, &all, 0, 20, "warm-up writes");
    let mut doomed = Vec::new();
    for round in 0..rounds(1, 5) {
        let old = c.wait_leader(&all, Duration::from_secs(20));
        let rest = others(&all, &[old]);
        c.cut(old).expect("cut the leader");
        let cut_as_leader = role(&c, old).as_deref() == Some("leader");
        let terms = terms(&c, &[old]);
        let from = load.now();
        let t = Instant::now();
        let new = c.wait_leader(&rest, Duration::from_secs(20));
        let elected = t.elapsed();
        wait_for(
            Duration::from_secs(20),
            "the isolated leader to step down",
            || role(&c, old).filter(|r| r != "leader"),
        );
        let stepped_down = t.elapsed();
        wait_writes(
            &load,
            &rest,
            from,
            20,
            "writes acknowledged by the majority during the cut",
        );
        wait_cut_side_answered(&load, &[old], from);
        let to = load.now();
        assert_terms_kept(&c, &terms);
        c.heal(old).expect("heal");
        let cut = Cut {
            nodes: vec![old],
            from,
            to,
        };
        let refused = assert_cut_side_acked_nothing(&load.ops(), &cut, rt);
        if cut_as_leader {
            doomed.extend(doomed_writes(&load.ops(), &cut));
        } else {
            eprintln!("round {round}: {old} had lost leadership before the cut; its writes are not judged");
        }
        // After the heal the old leader follows the new term and catches up.
        let term = index(&c, new, "term").expect("new leader's term");
        let commit = index(&c, new, "commit_index").expect("new leader's commit index");
        wait_for(
            Duration::from_secs(30),
            "the old leader to rejoin as a follower and catch up",
            || {
                let st = c.status(old)?;
                (st["role"] == "follower"
                    && st["term"].as_u64()? >= term
                    && st["applied_index"].as_u64()? >= commit)
                    .then_some(())
            },
        );
        let healed = load.now();
        wait_writes(
            &load,
            &all,
            healed,
            20,
            "writes acknowledged after the heal",
        );
        eprintln!(
            "round {round}: isolated leader {old}; {new} elected after {elected:?}, {old} stepped down after \
             {stepped_down:?}; {old} failed all {refused} requests sent to it while cut; caught up to {commit}"
        );
    }
    let events = finish(&c, load, started);
    assert_never_observed(&events, &doomed);
    println!(
        "doomed writes (sent to the cut-off leader's side) never observed: {}",
        doomed.len()
    );
}

/// What a node logs when it installs a snapshot (storage/mod.rs).
const SNAPSHOT_INSTALLED: &str = "snapshot installed";

/// How many snapshots node `id` installed so far, from its log.
fn snapshot_installs(c: &NetCluster, id: u64) -> usize {
    std::fs::read_to_string(&c.node(id).log)
        .map(|log| {
            log.lines()
                .filter(|l| l.contains(SNAPSHOT_INSTALLED))
                .count()
        })
        .unwrap_or(0)
}

/// (b) A minority follower is cut off: the majority keeps serving; the follower catches
/// up after the heal (here from a snapshot: the log is compacted while it is away).
#[test]
fn cut_follower_misses_writes_then_catches_up() {
    let opts = NetOptions {
        snapshot_count: 20,
        ..NetOptions::default()
    };
    let rt = Duration::from_millis(opts.request_timeout_ms);
    let Some(c) = NetCluster::start_or_skip(3, opts) else {
        return;
    };
    let started = Instant::now();
    let load = Load::start(&c, 2);
    let all = c.ids();
    wait_writes(&load, &all, 0, 20, "warm-up writes");
    for round in 0..rounds(1, 5) {
        let leader = c.wait_leader(&all, Duration::from_secs(20));
        let follower = others(&all, &[leader])[round % 2];
        let rest = others(&all, &[follower]);
        let behind = index(&c, follower, "applied_index").expect("follower's applied index");
        c.cut(follower).expect("cut the follower");
        let terms = terms(&c, &[follower]);
        let from = load.now();
        wait_writes(
            &load,
            &rest,
            from,
            50,
            "writes acknowledged by the majority while the follower is cut",
        );
        wait_cut_side_answered(&load, &[follower], from);
        // Hold the cut until the leader compacted past what the follower has.
        wait_for(
            Duration::from_secs(30),
            "the leader to snapshot past the cut follower",
            || {
                let l = c.agreed_leader(&rest)?;
                (index(&c, l, "snapshot_index")? > behind + 60).then_some(())
            },
        );
        let to = load.now();
        let acked_while_cut = load
            .ops()
            .iter()
            .filter(|o| o.write && o.ok && o.invoke >= from && o.complete <= to)
            .count();
        let term_before = index(&c, leader, "term");
        let installs_before = snapshot_installs(&c, follower);
        assert_terms_kept(&c, &terms);
        c.heal(follower).expect("heal");
        let cut = Cut {
            nodes: vec![follower],
            from,
            to,
        };
        let refused = assert_cut_side_acked_nothing(&load.ops(), &cut, rt);
        let l = c.wait_leader(&all, Duration::from_secs(20));
        let commit = index(&c, l, "commit_index").expect("commit index");
        let t = Instant::now();
        wait_for(Duration::from_secs(30), "the follower to catch up", || {
            (index(&c, follower, "applied_index")? >= commit).then_some(())
        });
        // The leader compacted its log past the follower's last entry: only a snapshot
        // can have brought it back.
        let installs = snapshot_installs(&c, follower) - installs_before;
        assert!(
            installs >= 1,
            "follower {follower} caught up without installing a snapshot (no new \"{SNAPSHOT_INSTALLED}\" line in its log)"
        );
        let healed = load.now();
        wait_writes(
            &load,
            &all,
            healed,
            20,
            "writes acknowledged after the heal",
        );
        eprintln!(
            "round {round}: follower {follower} cut at applied index {behind}; the majority acked \
             {acked_while_cut} writes meanwhile; {follower} failed all {refused} requests; caught up to \
             {commit} in {:?} ({installs} snapshot installed); leader {leader} -> {l}, term {term_before:?} -> {:?}",
            t.elapsed(),
            index(&c, l, "term")
        );
    }
    finish(&c, load, started);
}

/// Cuts and heals `victim`'s peer link at random intervals around 300 ms for `span`.
fn flap(c: &NetCluster, victim: u64, span: Duration, rng: &mut impl Rng) -> usize {
    let end = Instant::now() + span;
    let mut flips = 0;
    while Instant::now() < end {
        c.cut(victim).expect("cut");
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..450)));
        c.heal(victim).expect("heal");
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..450)));
        flips += 1;
    }
    flips
}

/// (c) A flapping link: a follower's, then the leader's peer link goes down and up
/// every ~300 ms for a few seconds; then healed.
#[test]
fn flapping_links_stay_linearizable_and_converge() {
    let Some(c) = NetCluster::start_or_skip(3, NetOptions::default()) else {
        return;
    };
    let started = Instant::now();
    let load = Load::start(&c, 3);
    let all = c.ids();
    wait_writes(&load, &all, 0, 20, "warm-up writes");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let span = Duration::from_secs(if soak() { 10 } else { 3 });
    for round in 0..rounds(1, 4) {
        for target in ["follower", "leader"] {
            let leader = c.wait_leader(&all, Duration::from_secs(20));
            let victim = if target == "leader" {
                leader
            } else {
                others(&all, &[leader])[0]
            };
            let flips = flap(&c, victim, span, &mut rng);
            let t = Instant::now();
            let after = c.wait_leader(&all, Duration::from_secs(20));
            let since = load.now();
            wait_writes(
                &load,
                &all,
                since,
                10,
                "writes acknowledged after the link settled",
            );
            eprintln!(
                "round {round}: flapped the {target}'s ({victim}) link {flips} times; leader {leader} -> {after}, \
                 serving again {:?} after the heal",
                t.elapsed()
            );
        }
    }
    finish(&c, load, started);
}

/// (d) A symmetric split of 5 nodes, 2 | 3, with the leader on the 2 side.
#[test]
fn split_two_three_with_leader_on_the_minority() {
    let opts = NetOptions::default();
    let rt = Duration::from_millis(opts.request_timeout_ms);
    let Some(mut c) = NetCluster::start_or_skip(5, opts) else {
        return;
    };
    let started = Instant::now();
    let load = Load::start(&c, 4);
    let all = c.ids();
    wait_writes(&load, &all, 0, 20, "warm-up writes");
    let mut doomed = Vec::new();
    for round in 0..rounds(1, 4) {
        let old = c.wait_leader(&all, Duration::from_secs(20));
        let minority = vec![old, others(&all, &[old])[round % 4]];
        let majority = others(&all, &minority);
        c.partition(&[&majority, &minority]).expect("split");
        let cut_as_leader = role(&c, old).as_deref() == Some("leader");
        let terms = terms(&c, &minority);
        let from = load.now();
        let t = Instant::now();
        let new = c.wait_leader(&majority, Duration::from_secs(20));
        let elected = t.elapsed();
        wait_for(
            Duration::from_secs(20),
            "the minority's leader to step down",
            || role(&c, old).filter(|r| r != "leader"),
        );
        wait_writes(
            &load,
            &majority,
            from,
            30,
            "writes acknowledged by the majority side",
        );
        wait_cut_side_answered(&load, &minority, from);
        let to = load.now();
        assert_terms_kept(&c, &terms);
        c.heal_all().expect("heal");
        let cut = Cut {
            nodes: minority.clone(),
            from,
            to,
        };
        let refused = assert_cut_side_acked_nothing(&load.ops(), &cut, rt);
        if cut_as_leader {
            doomed.extend(doomed_writes(&load.ops(), &cut));
        } else {
            eprintln!("round {round}: {old} had lost leadership before the cut; its writes are not judged");
        }
        c.wait_leader(&all, Duration::from_secs(20));
        let healed = load.now();
        wait_writes(
            &load,
            &all,
            healed,
            20,
            "writes acknowledged after the heal",
        );
        eprintln!(
            "round {round}: split {minority:?} | {majority:?}; {new} elected on the majority after {elected:?}; \
             the minority failed all {refused} requests sent to it"
        );
    }
    let events = finish(&c, load, started);
    assert_never_observed(&events, &doomed);
    println!(
        "doomed writes (sent to the cut-off leader's side) never observed: {}",
        doomed.len()
    );
}

/// The cut-side assertion itself: it accepts refusals and catches an answer.
#[test]
fn cut_side_check_accepts_refusals_and_catches_answers() {
    let ms = |m: u64| m * 1_000_000;
    let op = |node, write, invoke, complete, ok| NodeOp {
        node,
        write,
        client: 0,
        seq: 0,
        invoke: ms(invoke),
        complete: ms(complete),
        ok,
    };
    let cut = Cut {
        nodes: vec![1],
        from: ms(1_000),
        to: ms(10_000),
    };
    let rt = Duration::from_secs(2);
    let fine = vec![
        op(1, true, 900, 1_050, true), // committed before the cut, answered just after
        op(1, true, 1_100, 3_100, false), // 503 after the request timeout
        op(1, false, 1_200, 3_200, false),
        op(2, true, 1_300, 1_400, true),  // the majority serves
        op(1, true, 9_000, 11_000, true), // completed after the heal
    ];
    assert_eq!(cut_side_acked_nothing(&fine, &cut, rt), Ok(2));
    for bad in [
        op(1, true, 1_100, 1_200, true), // a write sent after the cut acknowledged
        op(1, false, 1_100, 1_200, true), // a linearizable read sent after the cut answered
        op(1, true, 500, 5_000, true),   // an old write acknowledged long after the cut
    ] {
        let mut ops = fine.clone();
        ops.push(bad);
        assert!(
            cut_side_acked_nothing(&ops, &cut, rt).is_err(),
            "not caught: {bad:?}"
        );
    }
    let nothing = vec![op(2, true, 1_300, 1_400, true)];
    assert!(
        cut_side_acked_nothing(&nothing, &cut, rt).is_err(),
        "a window without requests to the cut side must not pass"
    );
}
