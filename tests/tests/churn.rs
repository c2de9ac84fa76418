//! Membership churn under load and faults, checked for linearizability.
//!
//! Six clients read and write through every current member while the test repeatedly
//! grows and shrinks the cluster the way an operator does: start a fresh process with
//! `--join`, add it as a learner (`POST /v1/members`), wait until it has caught up,
//! promote it, then remove another member. Rounds cycle through five removals: a
//! follower, the leader (which hands leadership over first), a follower through
//! raftexample's `DELETE /<id>`, the leader again, and a follower that is down when it is
//! removed (the operator replacing a failed member; restarted afterwards, it must learn
//! it was removed and stop, and then refuse to start on its tombstone). Faults are
//! interleaved: a random member is killed with SIGKILL and restarted while a membership
//! request is in flight and between steps, and the leader is paused with SIGSTOP once
//! during a promotion. At most one member is down at a time and never the one being
//! removed while it runs, so a quorum of the voters (3 → 4 → 3) stays alive.
//! Membership requests that answer 503 or 409 (`change_in_progress`, `learner_behind`)
//! are retried until a deadline, as the operator does. Every other round the joiner is
//! not a new id but the one removed last, on a wiped data dir with the same peer URL, as
//! the operator reuses pod ordinals (`RAFTKV_CHURN_REUSE_IDS=0` turns that off).
//!
//! At the end every key is read once more (linearizable) into the history, the checker
//! decides, the member list must be exactly the expected voters, every removed member
//! must have exited 0 by itself, and every remaining member must serve the final values
//! from its own state. `RAFTKV_SOAK=1` runs more rounds; `RAFTKV_CHURN_SEED=<n>`
//! seeds the schedule's random choices (which node is killed, which follower removed,
//! when in a request a kill lands); the timing of elections still varies run to run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use raftkv_tests::linearizability::history::{Op, Recorder};
use raftkv_tests::linearizability::{check, CheckResult};
use raftkv_tests::{agreed_leader, recorded_get, recorded_put, wait_for, Cluster, Http, Options, StatusCode};
use serde_json::Value;

const KEYS: usize = 100;
const CLIENTS: u64 = 6;
/// Deadline of one membership step, retries included (the operator's patience).
const STEP_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for the cluster to settle after a fault (leader, restart, exit).
const SETTLE: Duration = Duration::from_secs(30);
/// How long a killed member stays down, and a paused leader stays paused.
const HOLD_DOWN: Duration = Duration::from_millis(800);
const HOLD_PAUSED: Duration = Duration::from_millis(1500);
/// Client id of the final reads in the history.
const FINAL_READER: u64 = 99;

/// Client URLs of the current members; the load threads pick from it on every request.
type Targets = Arc<RwLock<Vec<String>>>;

/// Sets the stop flag when dropped, so a failing test does not leave load threads
/// spinning against dead nodes.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn client_loop(targets: Targets, rec: Arc<Recorder>, stop: Arc<AtomicBool>, client: u64) {
    let http = Http::new(Duration::from_secs(4));
    let mut rng = StdRng::seed_from_u64(client);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("k{}", rng.gen_range(0..KEYS));
        let base = {
            let t = targets.read().unwrap_or_else(|e| e.into_inner());
            t[rng.gen_range(0..t.len())].clone()
        };
        let url = format!("{base}/{key}");
        if rng.gen_bool(0.5) {
            seq += 1;
            recorded_put(&http, &rec, client, &url, key, format!("{client}-{seq}").into_bytes());
        } else {
            recorded_get(&http, &rec, client, &url, key);
        }
    }
}

/// One membership change, as the operator sends it.
#[derive(Clone, Debug)]
enum Change {
    AddLearner { id: u64, peer_url: String },
    Promote(u64),
    Remove(u64),
    /// raftexample's `DELETE /<id>`.
    RemoveCompat(u64),
}

impl Change {
    fn request(&self) -> (&'static str, String, Option<Vec<u8>>) {
        match self {
            Change::AddLearner { id, peer_url } => (
                "POST",
                "/v1/members".into(),
                Some(format!(r#"{{"id":{id},"peer_url":"{peer_url}","learner":true}}"#).into_bytes()),
            ),
            Change::Promote(id) => ("POST", format!("/v1/members/{id}/promote"), Some(Vec::new())),
            Change::Remove(id) => ("DELETE", format!("/v1/members/{id}"), None),
            Change::RemoveCompat(id) => ("DELETE", format!("/{id}"), None),
        }
    }
}

/// Sends `change` to random members of `urls` until it is done, retrying transport
/// errors, 503 and the retryable 409s until [`STEP_DEADLINE`]. Err describes an answer
/// the API must not give, or the deadline.
fn run_change(http: &Http, urls: &[String], change: &Change, seed: u64) -> Result<u32, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (method, path, body) = change.request();
    let deadline = Instant::now() + STEP_DEADLINE;
    // Whether an earlier attempt may have taken effect without us hearing about it.
    let mut ambiguous = false;
    let mut attempts = 0u32;
    let mut last = String::new();
    while Instant::now() < deadline {
        attempts += 1;
        let url = format!("{}{path}", urls[rng.gen_range(0..urls.len())]);
        match http.call(method, &url, body.clone()) {
            Err(e) => {
                ambiguous = true;
                last = format!("{url}: {e}");
            }
            Ok(r) => {
                let code = serde_json::from_slice::<Value>(&r.body)
                    .ok()
                    .and_then(|v| v["code"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let done = match (change, r.status.as_u16()) {
                    (Change::AddLearner { .. }, 200 | 201) => true,
                    (Change::Promote(_), 200) => {
                        let role = r.json()["role"].clone();
                        assert_eq!(role, "voter", "promote answered 200 without a voter role: {}", r.text());
                        true
                    }
                    (Change::Remove(_), 200) | (Change::RemoveCompat(_), 204) => true,
                    // The removal was applied by an attempt whose answer we lost.
                    (Change::Remove(_) | Change::RemoveCompat(_), 404) if ambiguous && code == "not_member" => true,
                    (_, 503) => {
                        ambiguous = true;
                        false
                    }
                    (_, 409) if code == "change_in_progress" => false,
                    (Change::Promote(_), 409) if code == "learner_behind" => false,
                    (_, s) => {
                        return Err(format!("{change:?} via {url}: unexpected answer {s} {}", r.text()));
                    }
                };
                if done {
                    return Ok(attempts);
                }
                last = format!("{url}: {} {}", r.status, r.text());
            }
        }
        // Poll interval between retries (the operator requeues too).
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{change:?} not done after {STEP_DEADLINE:?} ({attempts} attempts); last answer {last}"))
}

/// A fault held while a membership request is in flight.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `kill -9` this node, hold it down, restart it.
    Kill(u64),
    /// SIGSTOP the leader, hold, SIGCONT.
    PauseLeader,
}

/// The test's model of the cluster and its fault schedule.
struct Churn {
    c: Cluster,
    /// Ids of the current members (voters, and the learner between add and promote).
    members: BTreeSet<u64>,
    targets: Targets,
    http: Http,
    rng: StdRng,
    /// Ids removed so far, in order (a later round may add one back).
    removed: Vec<u64>,
    changes: usize,
    kills: usize,
    pauses: usize,
}

impl Churn {
    fn member_urls(&self) -> Vec<String> {
        self.members.iter().map(|id| self.c.url(*id)).collect()
    }

    fn publish_targets(&self) {
        *self.targets.write().unwrap_or_else(|e| e.into_inner()) = self.member_urls();
    }

    /// `GET /v1/status` of node `id`, with a short timeout.
    fn status(&self, id: u64) -> Option<Value> {
        let r = self.http.get(&format!("{}/v1/status", self.c.url(id))).ok()?;
        (r.status == StatusCode::OK).then(|| r.json())
    }

    /// Waits until every running member names the same leader, a running member.
    fn wait_leader(&self) -> u64 {
        wait_for(SETTLE, "the members to agree on a leader", || {
            let running: Vec<u64> = self.members.iter().copied().filter(|id| self.c.node(*id).child.is_some()).collect();
            agreed_leader(&running, |id| self.status(id))
        })
    }

    /// A random member (or `extra`, a joiner not yet added) other than `except`, to be
    /// killed.
    fn kill_victim(&mut self, extra: Option<u64>, except: Option<u64>) -> u64 {
        let pool: Vec<u64> = self.members.iter().copied().chain(extra).filter(|id| Some(*id) != except).collect();
        pool[self.rng.gen_range(0..pool.len())]
    }

    /// Restarts a killed node and waits until it serves again (a member: knows the
    /// leader; a joiner not yet added: answers `/healthz`).
    fn restart(&mut self, id: u64) {
        self.c.spawn(id);
        let member = self.members.contains(&id);
        wait_for(SETTLE, &format!("node {id} to serve again after its restart"), || {
            if member {
                (self.status(id)?["leader"].as_u64()? != 0).then_some(())
            } else {
                let r = self.http.get(&format!("{}/healthz", self.c.url(id))).ok()?;
                (r.status == StatusCode::OK).then_some(())
            }
        });
    }

    /// Kills `id`, holds it down, restarts it: a fault between membership steps.
    fn kill_and_restart(&mut self, id: u64) {
        eprintln!("  kill -9 node {id} (between steps)");
        self.c.kill(id);
        self.kills += 1;
        std::thread::sleep(HOLD_DOWN);
        self.restart(id);
    }

    /// Runs `change` on another thread while `fault` is injected after a random delay.
    fn change_under(&mut self, change: Change, fault: Option<Fault>) {
        let urls = self.member_urls();
        let http = self.http.clone();
        let seed = self.rng.gen();
        let ch = change.clone();
        let started = Instant::now();
        let worker = std::thread::spawn(move || run_change(&http, &urls, &ch, seed));
        match fault {
            None => {}
            Some(Fault::Kill(id)) => {
                // Holding: the kill lands 0–300 ms into the request (usually inside it; a
                // request that finished first just gets a kill between steps).
                std::thread::sleep(Duration::from_millis(self.rng.gen_range(0..300)));
                eprintln!("  kill -9 node {id} during {change:?}");
                self.c.kill(id);
                self.kills += 1;
                std::thread::sleep(HOLD_DOWN);
                self.restart(id);
            }
            Some(Fault::PauseLeader) => {
                let leader = self.wait_leader();
                eprintln!("  SIGSTOP leader {leader} during {change:?}");
                self.c.signal(leader, libc::SIGSTOP);
                self.pauses += 1;
                std::thread::sleep(HOLD_PAUSED);
                self.c.signal(leader, libc::SIGCONT);
                self.wait_leader();
            }
        }
        let attempts = worker.join().expect("membership request thread").unwrap_or_else(|e| panic!("{e}"));
        self.changes += 1;
        eprintln!("  {change:?} done in {:?} ({attempts} attempts)", started.elapsed());
    }

    /// Waits until the leader reports learner `id` reachable with a match index within a
    /// few entries of the commit index (what the operator waits for before promoting).
    fn wait_caught_up(&self, id: u64) {
        wait_for(STEP_DEADLINE, &format!("learner {id} to catch up"), || {
            let r = self.http.get(&format!("{}/v1/members", self.c.url(*self.members.first()?))).ok()?;
            if r.status != StatusCode::OK {
                return None;
            }
            let m = r.json();
            let commit = m["commit_index"].as_u64()?;
            let l = m["members"].as_array()?.iter().find(|x| x["id"] == id)?;
            let matched = l["match_index"].as_u64()?;
            (l["reachable"] == true && matched > 0 && matched + 20 >= commit).then_some(())
        });
    }

    /// Moves leadership to `to` (`POST /v1/leader/transfer`), retrying 503 and transport
    /// errors; returns the leader the members agree on afterwards (normally `to`).
    fn transfer_leader(&self, to: u64) -> u64 {
        eprintln!("  leader transfer to node {to}");
        wait_for(STEP_DEADLINE, &format!("leadership to move to node {to}"), || {
            let from = *self.members.first()?;
            let r = self.http.post(&format!("{}/v1/leader/transfer", self.c.url(from)), format!(r#"{{"to":{to}}}"#)).ok()?;
            match r.status {
                StatusCode::OK => Some(()),
                StatusCode::SERVICE_UNAVAILABLE => None,
                s => panic!("leader transfer to {to}: unexpected answer {s} {}", r.text()),
            }
        });
        self.wait_leader()
    }

    /// One round: join, add as learner, catch up, promote, then remove a member as
    /// `removal` says.
    fn round(&mut self, round: usize, removal: Removal) {
        // Every other round the operator's way: the id (and peer URL) removed last comes
        // back on a wiped data dir; else a new id (RAFTKV_CHURN_REUSE_IDS=0: always new).
        let reuse_ids = std::env::var("RAFTKV_CHURN_REUSE_IDS").map_or(true, |v| v != "0");
        let reuse = if reuse_ids && round % 2 == 0 { self.removed.last().copied() } else { None };
        let joiner = match reuse {
            Some(id) => {
                let n = &mut self.c.nodes[(id - 1) as usize];
                assert!(n.child.is_none(), "removed node {id} still runs");
                std::fs::remove_dir_all(&n.data_dir).expect("wipe the removed member's data dir");
                n.join = true;
                self.c.spawn(id);
                id
            }
            None => self.c.spawn_joiner(),
        };
        let peer_url = self.c.node(joiner).peer_url();
        eprintln!(
            "round {round}: node {joiner} joins{}; members {:?}; then {removal:?}",
            if reuse.is_some() { " (a removed id again, wiped data dir)" } else { "" },
            self.members
        );

        // Add as learner while a random member (or the joiner itself) is killed.
        let k = self.kill_victim(Some(joiner), None);
        self.change_under(Change::AddLearner { id: joiner, peer_url }, Some(Fault::Kill(k)));
        self.members.insert(joiner);
        self.publish_targets();

        // Between add and promote: kill someone (the learner too) and restart it.
        let k = self.kill_victim(None, None);
        self.kill_and_restart(k);
        self.wait_caught_up(joiner);

        // Promote, with the leader paused once, else a kill in flight.
        let fault = if round == 0 { Fault::PauseLeader } else { Fault::Kill(self.kill_victim(None, None)) };
        self.change_under(Change::Promote(joiner), Some(fault));

        let mut leader = self.wait_leader();
        for _ in 0..5 {
            if !(removal == Removal::Leader && leader == joiner) {
                break;
            }
            // The newcomer won an election; remove an older leader instead.
            let others: Vec<u64> = self.members.iter().copied().filter(|id| *id != joiner).collect();
            let to = others[self.rng.gen_range(0..others.len())];
            leader = self.transfer_leader(to);
        }
        assert!(!(removal == Removal::Leader && leader == joiner), "leadership never moved off the newcomer {joiner}");
        let victim = if removal == Removal::Leader {
            leader
        } else {
            let followers: Vec<u64> = self.members.iter().copied().filter(|id| *id != leader && *id != joiner).collect();
            followers[self.rng.gen_range(0..followers.len())]
        };
        eprintln!("  removing node {victim} ({})", if victim == leader { "the leader" } else { "a follower" });
        match removal {
            Removal::Leader | Removal::Follower | Removal::FollowerCompat => {
                // Another member is killed meanwhile, never the one being removed: with
                // 4 voters, 3 stay up and the removal commits.
                let k = self.kill_victim(None, Some(victim));
                let change = if removal == Removal::FollowerCompat { Change::RemoveCompat(victim) } else { Change::Remove(victim) };
                self.change_under(change, Some(Fault::Kill(k)));
                self.members.remove(&victim);
                self.publish_targets();
                let code = self.c.wait_exit(victim, SETTLE);
                assert_eq!(code, Some(0), "removed node {victim} must stop by itself with exit code 0");
                self.removed.push(victim);
            }
            Removal::DeadFollower => {
                // The operator's replacement of a failed member: it is down (the only one
                // down: no other fault), it is removed, then its process comes back on its
                // old data dir, learns from a peer (410 Gone) that it was removed, writes
                // its tombstone and stops by itself.
                eprintln!("  kill -9 node {victim} (removed while down)");
                self.c.kill(victim);
                self.kills += 1;
                self.members.remove(&victim);
                self.publish_targets();
                self.change_under(Change::Remove(victim), None);
                self.c.spawn(victim);
                let code = self.c.wait_exit(victim, SETTLE);
                assert_eq!(code, Some(0), "node {victim}, removed while down and restarted, must stop by itself with exit code 0");
                // Its tombstone keeps it out for good.
                self.c.spawn(victim);
                let code = self.c.wait_exit(victim, SETTLE);
                assert_eq!(code, Some(1), "node {victim} restarted on a tombstoned data dir must refuse to start");
                self.removed.push(victim);
            }
        }
        self.wait_leader();
    }
}

/// Which member a round removes, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    /// A running follower, through `DELETE /v1/members/<id>`.
    Follower,
    /// The leader (it hands leadership over first).
    Leader,
    /// A running follower, through raftexample's `DELETE /<id>`.
    FollowerCompat,
    /// A follower that is down (killed) when it is removed; restarted afterwards.
    DeadFollower,
}

impl Removal {
    /// The schedule: rounds cycle through every kind.
    fn for_round(round: usize) -> Removal {
        match round % 5 {
            0 => Removal::Follower,
            1 | 3 => Removal::Leader,
            2 => Removal::FollowerCompat,
            _ => Removal::DeadFollower,
        }
    }
}

/// The final value of every key: read once more through the members (linearizable),
/// recorded into the history.
fn final_reads(rec: &Recorder, http: &Http, urls: &[String]) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut values = BTreeMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let url = format!("{}/{key}", urls[k % urls.len()]);
        let v = wait_for(SETTLE, &format!("a final read of {key}"), || {
            let p = rec.begin(FINAL_READER, Op::Get { key: key.clone(), result: None });
            match http.get(&url) {
                Ok(r) if r.status == StatusCode::OK || r.status == StatusCode::NOT_FOUND => {
                    let v = (r.status == StatusCode::OK).then(|| r.body.clone());
                    p.read(v.clone()).expect("completion");
                    Some(v)
                }
                _ => {
                    p.failed();
                    None
                }
            }
        });
        values.insert(key, v);
    }
    values
}

#[test]
fn membership_churn_under_load_and_faults_stays_linearizable() {
    let seed: u64 = std::env::var("RAFTKV_CHURN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(11);
    let rounds = if std::env::var("RAFTKV_SOAK").is_ok() { 20 } else { 5 };
    eprintln!("churn: seed {seed}, {rounds} rounds");
    let started = Instant::now();
    // Frequent snapshots: learners catch up from a snapshot as well as from the log.
    let opts = Options { snapshot_count: 300, ..Options::default() };
    let c = Cluster::start_with(3, opts);
    let targets: Targets = Arc::new(RwLock::new(Vec::new()));
    let mut churn = Churn {
        c,
        members: (1..=3).collect(),
        targets: targets.clone(),
        http: Http::new(Duration::from_secs(5)),
        rng: StdRng::seed_from_u64(seed),
        removed: Vec::new(),
        changes: 0,
        kills: 0,
        pauses: 0,
    };
    churn.publish_targets();
    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (targets, rec, stop) = (targets.clone(), rec.clone(), stop.clone());
            std::thread::spawn(move || client_loop(targets, rec, stop, client))
        })
        .collect();

    for round in 0..rounds {
        churn.round(round, Removal::for_round(round));
        eprintln!("round {round} done at {:?}: members {:?}, {} ops so far", started.elapsed(), churn.members, rec.len());
    }

    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().expect("client thread");
    }
    // A write that answered 503 may still commit: a write acked by the current leader
    // in its term commits everything before it, so nothing changes after the final reads.
    let leader = churn.wait_leader();
    churn.c.put_retry(leader, "churn-barrier", "done", SETTLE);
    let urls = churn.member_urls();
    let values = final_reads(&rec, &churn.http, &urls);

    let events = rec.events();
    let writes_acked = events.iter().filter(|e| e.op.is_write() && e.complete.is_some()).count();
    let operations = events.len();
    eprintln!(
        "{operations} operations ({writes_acked} acknowledged writes), {} membership changes, {} kills, {} pauses in {:?}",
        churn.changes,
        churn.kills,
        churn.pauses,
        started.elapsed()
    );
    assert!(writes_acked > 200, "too little load got through: {writes_acked} acknowledged writes");
    let checking = Instant::now();
    match check(&events, Duration::from_secs(60)).expect("well-formed history") {
        CheckResult::Ok => eprintln!("linearizable (checked in {:?})", checking.elapsed()),
        other => panic!("history of {operations} operations is not proven linearizable: {other}"),
    }

    // The member list: exactly the expected voters, in the leader's view and each member's.
    let expected: Vec<u64> = churn.members.iter().copied().collect();
    let leader = churn.wait_leader();
    let m = churn.http.get(&format!("{}/v1/members", churn.c.url(leader))).expect("GET /v1/members").json();
    let mut listed: Vec<(u64, String)> = m["members"]
        .as_array()
        .expect("members array")
        .iter()
        .map(|x| (x["id"].as_u64().expect("member id"), x["role"].as_str().unwrap_or_default().to_owned()))
        .collect();
    listed.sort();
    let want: Vec<(u64, String)> = expected.iter().map(|id| (*id, "voter".to_owned())).collect();
    assert_eq!(listed, want, "the leader's member list");
    for id in &expected {
        let st = churn.status(*id).unwrap_or_else(|| panic!("status of member {id}"));
        let mut ids: Vec<u64> =
            st["members"].as_array().expect("members in status").iter().filter_map(|x| x["id"].as_u64()).collect();
        ids.sort_unstable();
        assert_eq!(ids, expected, "member {id}'s own member list");
    }

    // Every remaining member serves the final values from its own state.
    let commit = churn.status(leader).and_then(|s| s["commit_index"].as_u64()).expect("leader commit index");
    for id in &expected {
        wait_for(SETTLE, &format!("member {id} to apply index {commit}"), || {
            (churn.status(*id)?["applied_index"].as_u64()? >= commit).then_some(())
        });
        for (key, want) in &values {
            let r = churn
                .http
                .get(&format!("{}/v1/kv/{key}?consistency=serializable", churn.c.url(*id)))
                .unwrap_or_else(|e| panic!("serializable GET {key} on member {id}: {e}"));
            let got = match r.status {
                StatusCode::OK => Some(r.json()["value"].as_str().expect("utf-8 value").as_bytes().to_vec()),
                StatusCode::NOT_FOUND => None,
                s => panic!("serializable GET {key} on member {id}: {s} {}", r.text()),
            };
            assert_eq!(
                got.as_deref().map(String::from_utf8_lossy),
                want.as_deref().map(String::from_utf8_lossy),
                "member {id}'s value of {key}"
            );
        }
    }
    println!(
        "operations checked: {operations} (acked writes {writes_acked}), membership changes: {}",
        churn.changes
    );
}

/// The leader's `reachable` flag of a healthy member must not flicker: the operator reads
/// it as health, and removing the leader picks its successor among reachable voters.
#[test]
fn reachable_stays_true_for_healthy_members() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(SETTLE);
    let http = Http::new(Duration::from_secs(5));
    let url = format!("{}/v1/members", c.url(leader));
    let (mut samples, mut bad) = (0u32, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let r = http.get(&url).expect("GET /v1/members");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let m = r.json();
        assert_eq!(m["leader"], leader, "the leader changed on an idle cluster: {m}");
        samples += 1;
        let unreachable: Vec<u64> = m["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|x| x["reachable"] != true)
            .filter_map(|x| x["id"].as_u64())
            .collect();
        if !unreachable.is_empty() {
            bad.push((samples, unreachable));
        }
    }
    eprintln!("{samples} samples of the leader's member list, {} with a healthy member shown unreachable", bad.len());
    assert!(bad.is_empty(), "healthy members shown unreachable in {} of {samples} samples (sample, ids): {bad:?}", bad.len());
}

/// The operator reuses ids: a member removed and added back on a wiped data dir must not
/// be turned away by a peer whose state still lists it as removed. Here a follower saves
/// a snapshot after the removal and is down while the id comes back and takes the lead;
/// restarted from that snapshot, the follower must still take the re-added leader's
/// messages (which carry the re-addition it has not applied yet).
#[test]
fn a_reused_id_survives_a_peer_that_restarts_behind_its_re_addition() {
    let mut c = Cluster::start_with(4, Options { snapshot_count: 10, ..Options::default() });
    let http = Http::new(Duration::from_secs(5));
    let post = |url: String, body: String| {
        wait_for(STEP_DEADLINE, &format!("POST {url} {body}"), || {
            let r = http.post(&url, body.clone()).ok()?;
            match r.status.as_u16() {
                200 | 201 => Some(()),
                409 | 503 => None,
                s => panic!("POST {url} {body}: unexpected {s} {}", r.text()),
            }
        })
    };
    let mut leader = c.wait_leader(SETTLE);
    if leader == 4 {
        post(format!("{}/v1/leader/transfer", c.url(4)), r#"{"to":1}"#.into());
        leader = c.wait_leader(SETTLE);
    }
    for i in 0..20 {
        c.put_retry(leader, &format!("k{i}"), "before", SETTLE);
    }
    // Remove 4; every member applies the removal.
    let r = http.delete(&format!("{}/v1/members/4", c.url(leader))).expect("DELETE /v1/members/4");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(c.wait_exit(4, SETTLE), Some(0));
    let removed_at = c.status(leader).and_then(|s| s["commit_index"].as_u64()).expect("leader commit index");
    let y = (1..=3).find(|id| *id != leader).expect("a follower");
    // Enough writes for y to save a snapshot past the removal.
    let mut i = 0;
    wait_for(SETTLE, &format!("node {y} to snapshot past the removal of 4 (index {removed_at})"), || {
        i += 1;
        c.put_retry(leader, &format!("between-{i}"), "x", SETTLE);
        let st = c.status(y)?;
        let gone = !st["members"].as_array()?.iter().any(|m| m["id"] == 4);
        (gone && st["snapshot_index"].as_u64()? >= removed_at).then_some(())
    });
    // Follower y goes down; id 4 comes back on a wiped dir, is promoted and takes the lead.
    c.kill(y);
    std::fs::remove_dir_all(&c.node(4).data_dir).expect("wipe node 4's data dir");
    c.nodes[3].join = true;
    c.spawn(4);
    let body = format!(r#"{{"id":4,"peer_url":"{}","learner":true}}"#, c.node(4).peer_url());
    post(format!("{}/v1/members", c.url(leader)), body);
    post(format!("{}/v1/members/4/promote", c.url(leader)), String::new());
    post(format!("{}/v1/leader/transfer", c.url(leader)), r#"{"to":4}"#.into());
    assert_eq!(c.wait_leader(SETTLE), 4);
    c.put_retry(4, "after", "re-add", SETTLE);
    // y comes back behind the re-addition; it must catch up from leader 4.
    c.spawn(y);
    let caught_up = {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(Some(status)) = c.nodes[3].child.as_mut().map(|ch| ch.try_wait().ok().flatten()) {
                panic!("re-added node 4 stopped ({status}) when node {y} came back; its log says why");
            }
            let r = http.get(&format!("{}/v1/kv/after?consistency=serializable", c.url(y)));
            if r.is_ok_and(|r| r.status == StatusCode::OK) {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(caught_up, "node {y} did not catch up from leader 4 within {SETTLE:?}");
    let st = c.status(y).expect("status of y");
    assert!(st["members"].as_array().expect("members").iter().any(|m| m["id"] == 4), "node {y} lists 4: {st}");
    let child = c.nodes[3].child.as_mut().expect("node 4 process");
    assert!(child.try_wait().expect("try_wait").is_none(), "re-added node 4 stopped");
}

/// A learner killed while it catches up (by snapshot: the leader compacts often) must
/// catch up after its restart.
#[test]
fn a_learner_killed_while_catching_up_catches_up_after_restart() {
    let mut c = Cluster::start_with(3, Options { snapshot_count: 50, ..Options::default() });
    let http = Http::new(Duration::from_secs(5));
    let leader = c.wait_leader(SETTLE);
    let big = "v".repeat(4096);
    for i in 0..400 {
        c.put_retry(leader, &format!("k{i}"), &big, SETTLE);
    }
    let mut rng = StdRng::seed_from_u64(5);
    let attempts = if std::env::var("RAFTKV_SOAK").is_ok() { 30 } else { 8 };
    for attempt in 0..attempts {
        let leader = c.wait_leader(SETTLE);
        let id = c.spawn_joiner();
        let body = format!(r#"{{"id":{id},"peer_url":"{}","learner":true}}"#, c.node(id).peer_url());
        let r = http.post(&format!("{}/v1/members", c.url(leader)), body).expect("POST /v1/members");
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        // Every other attempt the leader dies first: a new leader catches the learner up.
        let kill_leader = attempt % 2 == 1;
        if kill_leader {
            c.kill(leader);
        }
        // Holding: the kill lands somewhere in the catch-up.
        let delay = rng.gen_range(0..1500);
        std::thread::sleep(Duration::from_millis(delay));
        c.kill(id);
        c.spawn(id);
        if kill_leader {
            c.spawn(leader);
        }
        let key = format!("k{}", 399);
        wait_for(SETTLE, &format!("learner {id} (killed {delay} ms after its addition) to catch up"), || {
            let r = http.get(&format!("{}/v1/kv/{key}?consistency=serializable", c.url(id))).ok()?;
            (r.status == StatusCode::OK).then_some(())
        });
        let leader = c.wait_leader(SETTLE);
        let r = http.delete(&format!("{}/v1/members/{id}", c.url(leader))).expect("DELETE");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(c.wait_exit(id, SETTLE), Some(0));
        eprintln!("attempt {attempt}: learner {id} killed after {delay} ms (leader killed first: {kill_leader}) caught up");
    }
}

/// A TCP forwarder on 127.0.0.1 in front of a node's peer port: it passes the first
/// request/response exchange, then refuses every connection (each send fails at once)
/// until [`CutProxy::heal`]. Its threads stop with the connections and the test.
struct CutProxy {
    port: u16,
    /// 0: pass the first exchange, then cut; 1: cut; 2: pass everything.
    mode: Arc<std::sync::atomic::AtomicU8>,
    stop: Arc<AtomicBool>,
}

impl CutProxy {
    fn start(target: u16) -> CutProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::AtomicU8;
        let port = raftkv_tests::free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let mode = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (mode.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        // Poll interval of the non-blocking accept loop.
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                if m.load(Ordering::SeqCst) == 1 {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let (Ok(mut c_read), Ok(mut u_write)) = (client.try_clone(), upstream.try_clone()) else { continue };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut u_write);
                    let _ = u_write.shutdown(Shutdown::Write);
                });
                let m = m.clone();
                std::thread::spawn(move || {
                    let (mut u_read, mut c_write) = (upstream, client);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match u_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        // The first response went through: cut this connection and refuse
                        // new ones.
                        if m.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst).is_ok() || m.load(Ordering::SeqCst) == 1 {
                            break;
                        }
                    }
                    let _ = c_write.shutdown(Shutdown::Both);
                    let _ = u_read.shutdown(Shutdown::Both);
                });
            }
        });
        CutProxy { port, mode, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Passes everything from now on.
    fn heal(&self) {
        self.mode.store(2, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A learner that answers the leader once (rejecting its first append: the learner's log
/// is empty), then becomes unreachable while the leader starts sending it a snapshot,
/// must still catch up once the link is back: a snapshot that could not be delivered
/// has to be reported as failed so raft sends it again.
#[test]
fn a_learner_cut_off_while_the_leader_sends_its_snapshot_catches_up_after_the_link_heals() {
    let mut c = Cluster::start_with(3, Options { snapshot_count: 50, ..Options::default() });
    let http = Http::new(Duration::from_secs(5));
    let leader = c.wait_leader(SETTLE);
    for i in 0..120 {
        c.put_retry(leader, &format!("k{i}"), "v", SETTLE);
    }
    for attempt in 0..4 {
        let leader = c.wait_leader(SETTLE);
        let id = c.spawn_joiner();
        let proxy = CutProxy::start(c.node(id).peer_port);
        let body = format!(r#"{{"id":{id},"peer_url":"{}","learner":true}}"#, proxy.url());
        let r = http.post(&format!("{}/v1/members", c.url(leader)), body).expect("POST /v1/members");
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        // Writes keep the leader replicating (each one makes it try the learner again)
        // while the link is cut: the snapshot is sent into a failing link.
        let cut_until = Instant::now() + Duration::from_secs(3);
        let mut i = 0;
        while Instant::now() < cut_until {
            i += 1;
            c.put_retry(leader, &format!("cut-{attempt}-{i}"), "v", SETTLE);
        }
        // The cut happened, and the learner has not got the data through it.
        assert_eq!(proxy.mode.load(Ordering::SeqCst), 1, "the proxy never cut the link (no exchange went through it)");
        let early = http.get(&format!("{}/v1/kv/k0?consistency=serializable", c.url(id)));
        assert!(!early.is_ok_and(|r| r.status == StatusCode::OK), "the learner had the data before the link healed");
        proxy.heal();
        c.put_retry(leader, &format!("healed-{attempt}"), "v", SETTLE);
        let url = format!("{}/v1/kv/healed-{attempt}?consistency=serializable", c.url(id));
        let deadline = Instant::now() + Duration::from_secs(20);
        let caught_up = loop {
            if http.get(&url).is_ok_and(|r| r.status == StatusCode::OK) {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let m = http.get(&format!("{}/v1/members", c.url(leader))).map(|r| r.text()).unwrap_or_default();
        assert!(caught_up, "attempt {attempt}: learner {id} never caught up after its link healed; the leader's view: {m}");
        let r = http.delete(&format!("{}/v1/members/{id}", c.url(leader))).expect("DELETE");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(c.wait_exit(id, SETTLE), Some(0));
        eprintln!("attempt {attempt}: learner {id} caught up after its link healed");
    }
}
