//! The membership protocol on real `raftkv-node` processes on 127.0.0.1, driven by the
//! operator's own `decide` + `observe_cluster` + `execute`. A small simulated
//! "StatefulSet" stands in for Kubernetes: pod ordinal `i` is a process with raft id
//! `i+1`, a stable pair of ports, and a data directory standing for its volume claim.
//!
//! Under a steady write load the cluster goes 3 -> 5 -> 3 -> 1 -> 3; then the operator
//! is "killed" right after a raft removal (before the StatefulSet shrinks) and right after
//! a StatefulSet growth (before the learner is added), restarted, and must converge.
//! A second test wipes a member's volume under it (amnesia); the operator must replace it.
//! A third changes the pod template under load; the operator must restart the members one
//! at a time, the leader last. At the end every acknowledged write must be readable.
//!
//! Needs the node binary: `cargo build -p raftkv-node` (same target dir) first, or
//! `RAFTKV_NODE_BIN=/path/to/raftkv-node`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use raftkv_operator::crd::Operation;
use raftkv_operator::membership::{decide, Action, Observed, PodView, PvcView, Role};
use raftkv_operator::node_client::HttpNodeClient;
use raftkv_operator::orchestrate::{execute, observe_cluster, Addresses, Platform, PlatformError};
use raftkv_tests::{free_port, node_binary, Http, StatusCode};

const INITIAL: u32 = 3;
const MAX_ORDINALS: u32 = 9;

struct Pod {
    child: Child,
    uid: String,
    /// The pod template it was made from.
    template: u32,
}

struct Pvc {
    uid: String,
    dir: PathBuf,
    terminating: bool,
}

/// The simulated Kubernetes side plus the RaftKV status record.
struct World {
    root: PathBuf,
    bin: PathBuf,
    ports: BTreeMap<u32, (u16, u16)>,
    sts: u32,
    pods: BTreeMap<u32, Pod>,
    pvcs: BTreeMap<u32, Pvc>,
    operation: Option<Operation>,
    incarnations: BTreeMap<u64, String>,
    bootstrapped: bool,
    /// The StatefulSet's pod template (it sets the members' `--snapshot-count`).
    template: u32,
    next_uid: u64,
}

impl World {
    fn uid(&mut self) -> String {
        self.next_uid += 1;
        format!("u{}", self.next_uid)
    }

    fn peer_url(&self, ord: u32) -> String {
        format!("http://127.0.0.1:{}", self.ports[&ord].1)
    }

    fn initial_cluster(&self) -> String {
        (0..INITIAL).map(|o| self.peer_url(o)).collect::<Vec<_>>().join(",")
    }

    fn spawn(&mut self, ord: u32, template: u32) -> Child {
        let (client, peer) = self.ports[&ord];
        let dir = self.pvcs[&ord].dir.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("pod-{ord}.log")))
            .expect("log file");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--id")
            .arg((ord + 1).to_string())
            .arg("--cluster")
            .arg(self.initial_cluster())
            .arg("--port")
            .arg(client.to_string())
            .arg("--listen-client-addr")
            .arg(format!("127.0.0.1:{client}"))
            .arg("--peer-url")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--data-dir")
            .arg(&dir)
            .arg("--snapshot-count")
            .arg((200 + template).to_string())
            .arg("--request-timeout-ms")
            .arg("3000")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // The pod template carries RAFTKV_JOIN=true once the cluster bootstrapped.
        if self.bootstrapped {
            cmd.arg("--join");
        }
        cmd.spawn().expect("spawn raftkv-node")
    }

    fn stop(pod: &mut Pod) {
        // SIGTERM, then SIGKILL after a bounded grace period (the kubelet's behaviour).
        // SAFETY: kill(2) on a child process we own.
        unsafe {
            libc::kill(pod.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(pod.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = pod.child.kill();
        let _ = pod.child.wait();
    }

    /// One pass of the StatefulSet controller, the kubelet and PVC protection.
    // Every child ends up in `pods` and is reaped by `stop` or `Drop`; the replaced ones
    // were already reaped by `try_wait`.
    #[allow(clippy::zombie_processes)]
    fn sync(&mut self) {
        let extra: Vec<u32> = self.pods.keys().copied().filter(|o| *o >= self.sts).collect();
        for o in extra {
            if let Some(mut p) = self.pods.remove(&o) {
                Self::stop(&mut p);
            }
        }
        // Exited containers restart in place (same pod).
        let exited: Vec<u32> =
            self.pods.iter_mut().filter_map(|(o, p)| matches!(p.child.try_wait(), Ok(Some(_))).then_some(*o)).collect();
        for o in exited {
            let template = self.pods.get(&o).map_or(self.template, |p| p.template);
            let child = self.spawn(o, template);
            if let Some(p) = self.pods.get_mut(&o) {
                p.child = child;
            }
        }
        let free: Vec<u32> =
            self.pvcs.iter().filter(|(o, v)| v.terminating && !self.pods.contains_key(o)).map(|(o, _)| *o).collect();
        for o in free {
            if let Some(v) = self.pvcs.remove(&o) {
                let _ = std::fs::remove_dir_all(&v.dir);
            }
        }
        for o in 0..self.sts {
            if self.pods.contains_key(&o) || self.pvcs.get(&o).is_some_and(|v| v.terminating) {
                continue;
            }
            if !self.pvcs.contains_key(&o) {
                let uid = self.uid();
                let dir = self.root.join(format!("data-{o}-{uid}"));
                self.pvcs.insert(o, Pvc { uid, dir, terminating: false });
            }
            let template = self.template;
            let child = self.spawn(o, template);
            let uid = self.uid();
            self.pods.insert(o, Pod { child, uid, template });
        }
    }

    fn running(&mut self) -> Vec<u32> {
        self.pods.iter_mut().filter_map(|(o, p)| matches!(p.child.try_wait(), Ok(None)).then_some(*o)).collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for p in self.pods.values_mut() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Shared handle: the Platform the executor drives.
struct Sim(Mutex<World>);

impl Sim {
    fn lock(&self) -> MutexGuard<'_, World> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Platform for Sim {
    async fn record(&self, op: Option<&Operation>) -> Result<(), PlatformError> {
        self.lock().operation = op.cloned();
        Ok(())
    }
    async fn record_incarnation(&self, id: u64, incarnation: Option<&str>) -> Result<(), PlatformError> {
        let mut w = self.lock();
        match incarnation {
            Some(i) => w.incarnations.insert(id, i.to_string()),
            None => w.incarnations.remove(&id),
        };
        Ok(())
    }
    async fn scale(&self, replicas: u32) -> Result<(), PlatformError> {
        if replicas > MAX_ORDINALS {
            return Err(PlatformError(format!("{replicas} replicas exceed the test's ports")));
        }
        self.lock().sts = replicas;
        Ok(())
    }
    async fn delete_pvc(&self, ordinal: u32) -> Result<(), PlatformError> {
        if let Some(v) = self.lock().pvcs.get_mut(&ordinal) {
            v.terminating = true;
        }
        Ok(())
    }
    async fn delete_pod(&self, ordinal: u32) -> Result<(), PlatformError> {
        let mut w = self.lock();
        if let Some(mut p) = w.pods.remove(&ordinal) {
            World::stop(&mut p);
        }
        Ok(())
    }
    async fn evict_pod(&self, ordinal: u32) -> Result<bool, PlatformError> {
        // No disruption budget here: the operator's own quorum rule is what is tested.
        self.delete_pod(ordinal).await.map(|()| true)
    }
}

struct Addrs(BTreeMap<u32, (u16, u16)>);

impl Addresses for Addrs {
    fn client_url(&self, id: u64) -> String {
        let o = u32::try_from(id.saturating_sub(1)).unwrap_or(u32::MAX);
        self.0.get(&o).map_or_else(|| "http://127.0.0.1:9".to_string(), |(c, _)| format!("http://127.0.0.1:{c}"))
    }
    fn peer_url(&self, id: u64) -> String {
        let o = u32::try_from(id.saturating_sub(1)).unwrap_or(u32::MAX);
        self.0.get(&o).map_or_else(|| "http://127.0.0.1:9".to_string(), |(_, p)| format!("http://127.0.0.1:{p}"))
    }
}

/// The operator's loop: sync the fake Kubernetes, observe, decide, execute. Returns the
/// actions taken; stops early (an operator crash) right after an action `crash_after`
/// accepts.
async fn drive(
    sim: &Sim,
    addrs: &Addrs,
    node: &HttpNodeClient,
    urls: &Mutex<Vec<String>>,
    desired: u32,
    timeout: Duration,
    crash_after: &dyn Fn(&Action) -> bool,
) -> Vec<Action> {
    let deadline = Instant::now() + timeout;
    let mut trace = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no convergence to {desired} within {timeout:?}; last steps {:?}",
            &trace[trace.len().saturating_sub(8)..]
        );
        let running = {
            let mut w = sim.lock();
            w.sync();
            w.running()
        };
        let candidates: Vec<u64> = running.iter().map(|o| u64::from(*o) + 1).collect();
        let cluster = observe_cluster(node, addrs, &candidates).await;
        let observed = {
            let mut w = sim.lock();
            if let Some(c) = &cluster {
                if c.leader != 0 && c.members.len() >= INITIAL as usize {
                    w.bootstrapped = true;
                }
                if let Ok(mut u) = urls.lock() {
                    *u = c
                        .members
                        .iter()
                        .filter(|(_, m)| m.role == Role::Voter && m.healthy)
                        .map(|(id, _)| addrs.client_url(*id))
                        .collect();
                }
            }
            let running = w.running();
            Observed {
                desired,
                sts_replicas: w.sts,
                pods: w
                    .pods
                    .iter()
                    .map(|(o, p)| {
                        let template_hash = Some(p.template.to_string());
                        (*o, PodView { running: running.contains(o), terminating: false, uid: p.uid.clone(), template_hash })
                    })
                    .collect(),
                pvcs: w
                    .pvcs
                    .iter()
                    .map(|(o, v)| (*o, PvcView { uid: v.uid.clone(), terminating: v.terminating }))
                    .collect(),
                cluster: cluster.clone(),
                operation: w.operation.clone(),
                incarnations: w.incarnations.clone(),
                recorded_top: 0,
                template_hash: Some(w.template.to_string()),
                recorded_members: Default::default(),
            }
        };
        let action = decide(&observed);
        if action == Action::Done {
            return trace;
        }
        let leader = cluster.as_ref().map_or(0, |c| c.leader);
        if let Err(e) = execute(node, sim, addrs, leader, &action).await {
            // Transient (a timeout during an election, a 503): the next round retries.
            eprintln!("step {action:?} failed: {e}");
        }
        if trace.last() != Some(&action) {
            eprintln!("operator: {action:?}");
        }
        trace.push(action.clone());
        if crash_after(&action) {
            return trace;
        }
        if matches!(action, Action::Wait(_)) || trace.iter().rev().take(2).all(|a| *a == action) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Voters, learners, StatefulSet size and claims as the test sees them.
async fn shape(sim: &Sim, addrs: &Addrs, node: &HttpNodeClient) -> (Vec<u64>, Vec<u64>, u32, Vec<u32>) {
    let candidates: Vec<u64> = sim.lock().running().iter().map(|o| u64::from(*o) + 1).collect();
    let c = observe_cluster(node, addrs, &candidates).await.expect("cluster answers");
    let voters = c.members.iter().filter(|(_, m)| m.role == Role::Voter).map(|(id, _)| *id).collect();
    let learners = c.members.iter().filter(|(_, m)| m.role == Role::Learner).map(|(id, _)| *id).collect();
    let w = sim.lock();
    (voters, learners, w.sts, w.pvcs.keys().copied().collect())
}

/// Writes `w-<n>` = `v-<n>` to the healthy voters, round robin, until stopped (bounded);
/// records the writes that were acknowledged.
fn writer(urls: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<u64>>>) {
    let http = Http::new(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) && n < 50_000 && Instant::now() < deadline {
        let targets = urls.lock().map(|u| u.clone()).unwrap_or_default();
        if targets.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let url = &targets[(n as usize) % targets.len()];
        if let Ok(r) = http.put(&format!("{url}/w-{n}"), format!("v-{n}").into_bytes()) {
            if r.status.is_success() {
                if let Ok(mut a) = acked.lock() {
                    a.push(n);
                }
            }
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
}


/// Starts [`writer`] on a thread: its stop flag, its acknowledged writes, its handle.
fn start_load(urls: &Arc<Mutex<Vec<String>>>) -> (Arc<AtomicBool>, Arc<Mutex<Vec<u64>>>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (u, s, a) = (urls.clone(), stop.clone(), acked.clone());
        std::thread::spawn(move || writer(u, s, a))
    };
    (stop, acked, load)
}

/// A fresh simulated cluster (nothing started yet) and the operator's clients.
fn setup() -> (tempfile::TempDir, Sim, Addrs, HttpNodeClient, Arc<Mutex<Vec<String>>>) {
    let root = tempfile::Builder::new().prefix("raftkv-operator-test-").tempdir().expect("tempdir");
    let ports: BTreeMap<u32, (u16, u16)> = (0..MAX_ORDINALS).map(|o| (o, (free_port(), free_port()))).collect();
    let sim = Sim(Mutex::new(World {
        root: root.path().to_path_buf(),
        bin: node_binary(),
        ports: ports.clone(),
        sts: INITIAL,
        pods: BTreeMap::new(),
        pvcs: BTreeMap::new(),
        operation: None,
        incarnations: BTreeMap::new(),
        bootstrapped: false,
        template: 0,
        next_uid: 0,
    }));
    let addrs = Addrs(ports);
    let node = HttpNodeClient::new(Duration::from_secs(10)).expect("node client");
    let urls = Arc::new(Mutex::new(Vec::new()));
    (root, sim, addrs, node, urls)
}

/// Prints the tail of every pod log (on failure, before the processes go away).
fn dump_logs(root: &std::path::Path) {
    for o in 0..MAX_ORDINALS {
        if let Ok(text) = std::fs::read_to_string(root.join(format!("pod-{o}.log"))) {
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- pod {o} -----\n{}", lines[lines.len().saturating_sub(30)..].join("\n"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_3_5_3_1_3_under_load_and_survives_operator_crashes() {
    let (root, sim, addrs, node, urls) = setup();
    let never = |_: &Action| false;
    let t = Duration::from_secs(120);

    let result = std::panic::AssertUnwindSafe(async {
        // Bootstrap the initial three and start the load.
        drive(&sim, &addrs, &node, &urls, INITIAL, t, &never).await;
        let (stop, acked, load) = start_load(&urls);

        let mut started = Instant::now();
        for target in [5u32, 3, 1, 3] {
            let trace = drive(&sim, &addrs, &node, &urls, target, t, &never).await;
            let (voters, learners, sts, pvcs) = shape(&sim, &addrs, &node).await;
            let expect: Vec<u64> = (1..=u64::from(target)).collect();
            assert_eq!(voters, expect, "voters after scaling to {target}; last steps {:?}", &trace[trace.len().saturating_sub(8)..]);
            assert!(learners.is_empty(), "learners left: {learners:?}");
            assert_eq!(sts, target);
            assert_eq!(pvcs, (0..target).collect::<Vec<_>>(), "claims after scaling to {target}");
            eprintln!("scaled to {target} in {:?} ({} steps)", started.elapsed(), trace.len());
            started = Instant::now();
        }

        // Crash 1: the operator dies right after the raft removal, before the StatefulSet
        // shrinks; a restarted operator (state only in status) converges.
        let trace =
            drive(&sim, &addrs, &node, &urls, 2, t, &|a: &Action| *a == Action::RemoveMember(3)).await;
        assert_eq!(trace.last(), Some(&Action::RemoveMember(3)), "{trace:?}");
        let (voters, _, sts, _) = shape(&sim, &addrs, &node).await;
        assert_eq!((voters, sts), (vec![1, 2], 3), "crash point: removed from raft, StatefulSet unchanged");
        drive(&sim, &addrs, &node, &urls, 2, t, &never).await;
        let (voters, _, sts, pvcs) = shape(&sim, &addrs, &node).await;
        assert_eq!((voters, sts, pvcs), (vec![1, 2], 2, vec![0, 1]));

        // Crash 2: dies right after growing the StatefulSet, before adding the learner.
        let trace =
            drive(&sim, &addrs, &node, &urls, 3, t, &|a: &Action| *a == Action::ScaleStatefulSet(3)).await;
        assert_eq!(trace.last(), Some(&Action::ScaleStatefulSet(3)), "{trace:?}");
        drive(&sim, &addrs, &node, &urls, 3, t, &never).await;
        let (voters, learners, sts, pvcs) = shape(&sim, &addrs, &node).await;
        assert_eq!((voters, learners, sts, pvcs), (vec![1, 2, 3], vec![], 3, vec![0, 1, 2]));

        stop.store(true, Ordering::Relaxed);
        load.join().expect("writer thread");
        let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
        assert!(acked.len() > 100, "too few writes acknowledged under scaling: {}", acked.len());

        // Every acknowledged write is readable (linearizable reads via the leader).
        let missing = lost_writes(&sim, &addrs, &node, acked.clone()).await;
        assert!(missing.is_empty(), "{} of {} acked writes lost: {:?}", missing.len(), acked.len(), &missing[..missing.len().min(10)]);
        eprintln!("{} acknowledged writes, all readable", acked.len());
    });
    let outcome = futures::FutureExt::catch_unwind(result).await;
    if let Err(payload) = outcome {
        dump_logs(root.path());
        std::panic::resume_unwind(payload);
    }
}

/// A member's volume is wiped under it (same claim, empty data dir; the container restarts
/// in join mode). The operator must see the new incarnation, remove the member, delete its
/// claim and pod, and add it back as a new learner. Note: raftkv-node has been seen to
/// panic here (raft-rs "to_commit N is out of range [last_index 0]" on a leader heartbeat)
/// and crash-loop; the simulated kubelet restarts it at once, so the operator still sees
/// it answer between crashes. A real kubelet backs off, which delays detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_volume_is_detected_and_the_member_replaced() {
    let (root, sim, addrs, node, urls) = setup();
    let never = |_: &Action| false;
    let t = Duration::from_secs(120);
    let result = std::panic::AssertUnwindSafe(async {
        drive(&sim, &addrs, &node, &urls, INITIAL, t, &never).await;
        // Writes keep the log moving, so voters take snapshots (see "Reused ids").
        let (stop, acked, load) = start_load(&urls);
        // Lost volume: member 3's data dir is wiped under it (same claim, empty volume) and
        // its container restarts in join mode. The operator must detect the amnesia, remove
        // it, wipe claim and pod, and add it back as a new learner.
        let old_incarnation = sim.lock().incarnations.get(&3).cloned();
        assert!(old_incarnation.is_some(), "member 3's incarnation was recorded before the wipe");
        // Writes acknowledged before the wipe (the ones a lost volume could take along).
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.lock().map(|a| a.len()).unwrap_or(0) < 20 {
            assert!(Instant::now() < deadline, "the load got no writes acknowledged before the wipe");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        {
            let mut w = sim.lock();
            if let Some(mut p) = w.pods.remove(&2) {
                let _ = p.child.kill();
                let _ = p.child.wait();
                let dir = w.pvcs[&2].dir.clone();
                std::fs::remove_dir_all(&dir).expect("wipe the volume");
                let child = w.spawn(2, p.template);
                w.pods.insert(2, Pod { child, uid: p.uid, template: p.template });
            }
        }
        // Wait (bounded) until the wiped member answers with its new incarnation.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = observe_cluster(&node, &addrs, &[1, 2, 3]).await;
            let seen = c.as_ref().and_then(|c| c.members.get(&3)).and_then(|m| m.incarnation.clone());
            if seen.is_some() && seen != old_incarnation {
                break;
            }
            assert!(Instant::now() < deadline, "member 3 never answered after its volume was wiped");
            sim.lock().sync();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let trace = drive(&sim, &addrs, &node, &urls, 3, t, &never).await;
        for step in [Action::RemoveMember(3), Action::DeletePod(2), Action::AddLearner(3), Action::Promote(3)] {
            assert!(trace.contains(&step), "amnesia repair lacks {step:?}: {trace:?}");
        }
        let (voters, learners, sts, _) = shape(&sim, &addrs, &node).await;
        assert_eq!((voters, learners, sts), (vec![1, 2, 3], vec![], 3));
        let new_incarnation = sim.lock().incarnations.get(&3).cloned();
        assert!(new_incarnation.is_some() && new_incarnation != old_incarnation, "{old_incarnation:?} -> {new_incarnation:?}");
        stop.store(true, Ordering::Relaxed);
        load.join().expect("writer thread");
        // A repaired amnesiac must not cost a write: every acknowledged one reads back.
        let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
        let missing = lost_writes(&sim, &addrs, &node, acked.clone()).await;
        assert!(missing.is_empty(), "{} of {} acked writes lost: {:?}", missing.len(), acked.len(), &missing[..missing.len().min(10)]);

    });
    if let Err(payload) = futures::FutureExt::catch_unwind(result).await {
        dump_logs(root.path());
        std::panic::resume_unwind(payload);
    }
}

/// Every acknowledged write `w-<n>` reads back as `v-<n>` through the leader (a
/// linearizable read); the ones that do not.
async fn lost_writes(sim: &Sim, addrs: &Addrs, node: &HttpNodeClient, acked: Vec<u64>) -> Vec<String> {
    let leader_url = {
        let candidates: Vec<u64> = sim.lock().running().iter().map(|o| u64::from(*o) + 1).collect();
        let c = observe_cluster(node, addrs, &candidates).await.expect("cluster");
        addrs.client_url(c.leader)
    };
    // The blocking client must live off the async runtime's threads.
    tokio::task::spawn_blocking(move || {
        let http = Http::new(Duration::from_secs(10));
        let mut missing = Vec::new();
        for n in &acked {
            match http.get(&format!("{leader_url}/w-{n}")) {
                Ok(r) if r.status == StatusCode::OK && r.text() == format!("v-{n}") => {}
                Ok(r) => missing.push(format!("w-{n}: {} {}", r.status, r.text())),
                Err(e) => missing.push(format!("w-{n}: {e}")),
            }
        }
        missing
    })
    .await
    .expect("reader task")
}

/// `kubectl edit raftkv` changing the image or a flag: the pod template changes (here:
/// each member's `--snapshot-count`). Under a write load the operator restarts one member
/// at a time, each only once the one before is back, the leader last and after handing
/// leadership over; every member ends up on the new template, nothing acknowledged is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_pod_template_restarts_members_one_at_a_time_under_load() {
    let (root, sim, addrs, node, urls) = setup();
    let never = |_: &Action| false;
    let t = Duration::from_secs(120);
    let result = std::panic::AssertUnwindSafe(async {
        drive(&sim, &addrs, &node, &urls, INITIAL, t, &never).await;
        let (stop, acked, load) = start_load(&urls);
        let before: BTreeMap<u32, String> = {
            let mut w = sim.lock();
            w.template = 1;
            w.pods.iter().map(|(o, p)| (*o, p.uid.clone())).collect()
        };
        let acked_before = acked.lock().map(|a| a.len()).unwrap_or(0);
        let trace = drive(&sim, &addrs, &node, &urls, INITIAL, t, &never).await;

        // Each member restarted exactly once, onto the new template.
        {
            let w = sim.lock();
            for (o, p) in &w.pods {
                assert_eq!(p.template, 1, "pod {o} still runs the old template; steps {trace:?}");
                assert_ne!(Some(&p.uid), before.get(o), "pod {o} was not restarted");
            }
        }
        // The executor's deletions (a step repeated while it waits is one deletion: the
        // pod is gone after the first).
        let mut deleted: Vec<u32> = trace.iter().filter_map(|a| if let Action::DeletePod(o) | Action::EvictPod(o) = a { Some(*o) } else { None }).collect();
        deleted.dedup();
        let distinct: std::collections::BTreeSet<u32> = deleted.iter().copied().collect();
        assert_eq!((deleted.len(), distinct.len()), (3, 3), "one restart per member: {trace:?}");
        // One at a time: the operation that restarted a member ends before the next starts.
        let mut restarting = false;
        for a in &trace {
            match a {
                Action::Record(Some(op)) if op.kind == raftkv_operator::crd::OperationKind::Restart => {
                    assert!(!restarting, "a restart began before the previous ended: {trace:?}");
                    restarting = true;
                }
                Action::Record(None) => restarting = false,
                _ => {}
            }
        }
        // The leader's pod went last, after leadership moved away from it. The leader is
        // the one the operator moved leadership from (an election under load may have
        // changed it since the roll began).
        let leader_then = trace
            .iter()
            .find_map(|a| if let Action::TransferLeader { from, .. } = a { Some(*from) } else { None })
            .unwrap_or_else(|| panic!("leadership was never moved before the leader's restart: {trace:?}"));
        let leader_ord = u32::try_from(leader_then - 1).expect("leader");
        assert_eq!(deleted.last(), Some(&leader_ord), "the leader restarts last: {trace:?}");
        let transfer = trace.iter().position(|a| matches!(a, Action::TransferLeader { from, .. } if *from == leader_then));
        let delete_leader = trace.iter().position(|a| *a == Action::EvictPod(leader_ord));
        assert!(transfer.is_some() && transfer < delete_leader, "{trace:?}");
        let (voters, learners, sts, _) = shape(&sim, &addrs, &node).await;
        assert_eq!((voters, learners, sts), (vec![1, 2, 3], vec![], 3));

        stop.store(true, Ordering::Relaxed);
        load.join().expect("writer thread");
        let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
        assert!(acked.len() > acked_before, "no write was acknowledged while members restarted");
        let missing = lost_writes(&sim, &addrs, &node, acked.clone()).await;
        assert!(missing.is_empty(), "{} of {} acked writes lost: {:?}", missing.len(), acked.len(), &missing[..missing.len().min(10)]);
        eprintln!("3 members restarted in {} steps; {} acknowledged writes ({} during the restarts), all readable",
            trace.len(), acked.len(), acked.len() - acked_before);
    });
    if let Err(payload) = futures::FutureExt::catch_unwind(result).await {
        dump_logs(root.path());
        std::panic::resume_unwind(payload);
    }
}
