//! Real `raftkv-node` processes in network namespaces the test creates itself, so a test
//! can cut, flap and split the network between nodes (Linux, root, `ip` from iproute2).
//!
//! Layout of one [`NetCluster`] with slot `k` (1..=254, unique among running clusters):
//!
//! - one namespace per node, `rkv<k>n<id>`, with loopback up and two veth links:
//!   - `p0`, peer (raft) traffic, at `10.213.k.<1+id>/25`; its host end `rkv<k>p<id>`
//!     is a port of a peer bridge: `rkv<k>g0` normally, `rkv<k>g<g>` for partition
//!     group `g` while the network is split;
//!   - `c0`, client traffic, at `10.213.k.<129+id>/25`; its host end `rkv<k>c<id>` is a
//!     port of the client bridge `rkv<k>br`, which holds `10.213.k.129/25` so the test
//!     process (root namespace) reaches every node's client port.
//! - Faults only touch peer links ([`NetCluster::cut`] sets the host end down,
//!   [`NetCluster::partition`] moves host ends to other bridges). Clients keep reaching
//!   every node, as Jepsen's control node does, so a test sees what an isolated node
//!   answers.
//!
//! Slots are claimed under an exclusive `flock` on `$TMPDIR/raftkv-netns.lock` by
//! creating the client bridge, whose alias records the owner's pid. Parallel test
//! processes (nextest) therefore never share a slot, and leftovers of a test process
//! that was killed (its pid is gone) are swept at the next claim.
//!
//! Everything a cluster created is removed by its `Drop`, also on panic: node processes
//! are killed, then namespaces, links and bridges are deleted. On panic the tail of every
//! node's log is printed first (`RAFTKV_KEEP_TEST_DIR=1` keeps the data dirs and logs).

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{node_binary, tail, wait_for, Http, StatusCode};

/// Peer (raft) port of every node, inside its own namespace.
pub const PEER_PORT: u16 = 2380;
/// Client port of every node, inside its own namespace.
pub const CLIENT_PORT: u16 = 2379;
/// Prefix of every namespace, link and bridge this module creates.
const PREFIX: &str = "rkv";
/// Alias of a claimed client bridge: this text, the owner's pid, [`DIR_TAG`] and the
/// cluster's temporary folder.
const OWNER_TAG: &str = "raftkv-test pid=";
/// Separates the pid from the folder in a bridge alias.
const DIR_TAG: &str = " dir=";
/// Name prefix of a cluster's temporary folder (data dirs and logs).
const DIR_PREFIX: &str = "raftkv-netns-";

/// Setting up or changing the namespaces failed: the `ip` command and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetError(pub String);

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetError {}

/// Why namespace tests cannot run here (`None`: they can): not root, or no `ip` tool.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: creating network namespaces needs root (CI runs as root)".into());
    }
    match Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        _ => Some("the `ip` tool (iproute2) is missing: apt-get install iproute2".into()),
    }
}

/// A hint for when nodes cannot talk: bridged traffic passing iptables (Docker hosts
/// set the FORWARD policy to DROP).
fn bridge_filter_hint() -> String {
    let path = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => format!(
            "; note: {path} is 1, so traffic between the namespaces passes iptables' FORWARD chain: \
             if its policy drops (Docker sets DROP), allow 10.213.0.0/16 or set the sysctl to 0"
        ),
        _ => String::new(),
    }
}

/// Runs `ip <args>`; its stdout, or an error naming the command and its stderr.
fn ip(args: &[&str]) -> Result<String, NetError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError(format!("cannot run `ip {}`: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(NetError(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -j <args>` parsed as a JSON array (empty output = empty array).
fn ip_json(args: &[&str]) -> Result<Vec<serde_json::Value>, NetError> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let out = ip(&all)?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&out).map_err(|e| {
        NetError(format!(
            "`ip {}` printed no JSON array ({e}): {out}",
            all.join(" ")
        ))
    })
}

/// The slot of a name this module made (`rkv<k><letter>...`), if it is one.
fn slot_of(name: &str) -> Option<u8> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = rest[digits.len()..].chars().next()?;
    if digits.is_empty() || !after.is_ascii_lowercase() {
        return None;
    }
    digits.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// Kills every process left in namespace `ns` (best effort).
fn kill_ns_pids(ns: &str) {
    if let Ok(out) = ip(&["netns", "pids", ns]) {
        for pid in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) on a process inside a namespace this module created.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Deletes everything named for slot `k` (best effort): namespaces (after killing what
/// runs in them), then links and bridges.
fn sweep_slot(k: u8) {
    let namespaces = ip_json(&["netns", "list"]).unwrap_or_default();
    for ns in namespaces
        .iter()
        .filter_map(|n| n["name"].as_str())
        .filter(|n| slot_of(n) == Some(k))
    {
        kill_ns_pids(ns);
        let _ = ip(&["netns", "del", ns]);
    }
    let links = ip_json(&["link", "show"]).unwrap_or_default();
    let mut names: Vec<&str> = links
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| slot_of(n) == Some(k))
        .collect();
    // Ports before bridges.
    names.sort_by_key(|n| n.ends_with("br") || n.contains('g'));
    for name in names {
        let _ = ip(&["link", "del", name]);
    }
}

/// An exclusive `flock` held while slots are claimed or swept.
struct SlotLock {
    _file: File,
}

impl SlotLock {
    fn acquire() -> Result<SlotLock, NetError> {
        let path = std::env::temp_dir().join("raftkv-netns.lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| NetError(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock(2) on a descriptor we own; released when the file is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(NetError(format!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(SlotLock { _file: f })
    }
}

/// Owner pid and folder recorded in a client bridge's alias.
fn parse_owner(alias: &str) -> Option<(i32, Option<PathBuf>)> {
    let rest = alias.strip_prefix(OWNER_TAG)?;
    let (pid, dir) = match rest.split_once(DIR_TAG) {
        Some((pid, dir)) => (pid, Some(PathBuf::from(dir))),
        None => (rest, None),
    };
    Some((pid.parse().ok()?, dir))
}

/// Removes the temporary folder of a dead owner (only one this module names).
fn remove_dead_dir(dir: &Path) {
    let ours = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(DIR_PREFIX));
    if ours {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Claims a free slot: sweeps leftovers of dead owners, then creates the client bridge
/// `rkv<k>br` of a slot nobody owns, with this process and `dir` as owner. Returns the
/// slot.
fn claim_slot(dir: &Path) -> Result<u8, NetError> {
    static CLAIMS: AtomicU32 = AtomicU32::new(0);
    let _lock = SlotLock::acquire()?;
    let mut owned = BTreeSet::new();
    for b in ip_json(&["link", "show", "type", "bridge"])? {
        let Some(name) = b["ifname"].as_str() else {
            continue;
        };
        let Some(k) = slot_of(name).filter(|_| name.ends_with("br")) else {
            continue;
        };
        let owner = b["ifalias"].as_str().and_then(parse_owner);
        match owner {
            Some((pid, _)) if pid_alive(pid) => {
                owned.insert(k);
            }
            _ => {
                eprintln!("netns: sweeping slot {k} left behind by a dead test process ({name}, owner {owner:?})");
                sweep_slot(k);
                if let Some((_, Some(dir))) = owner {
                    remove_dead_dir(&dir);
                }
            }
        }
    }
    // Leftovers without a bridge (a process killed while tearing down).
    let mut stale = BTreeSet::new();
    for n in ip_json(&["netns", "list"])?
        .iter()
        .filter_map(|n| n["name"].as_str())
    {
        if let Some(k) = slot_of(n).filter(|k| !owned.contains(k)) {
            stale.insert(k);
        }
    }
    for k in stale {
        sweep_slot(k);
    }
    let start = std::process::id()
        .wrapping_mul(31)
        .wrapping_add(CLAIMS.fetch_add(1, Ordering::Relaxed) * 7);
    for off in 0..254u32 {
        let k = (1 + (start.wrapping_add(off)) % 254) as u8;
        if owned.contains(&k) {
            continue;
        }
        let br = format!("{PREFIX}{k}br");
        if ip(&["link", "add", &br, "type", "bridge"]).is_err() {
            continue; // a link of that name exists (not ours to judge): next slot
        }
        let mut alias = format!(
            "{OWNER_TAG}{}{DIR_TAG}{}",
            std::process::id(),
            dir.display()
        );
        if alias.len() > 255 {
            // IFALIASZ: with a very long $TMPDIR the folder is not recorded (nor swept).
            alias = format!("{OWNER_TAG}{}", std::process::id());
        }
        if let Err(e) = ip(&["link", "set", "dev", &br, "alias", &alias]) {
            let _ = ip(&["link", "del", &br]);
            return Err(e);
        }
        return Ok(k);
    }
    Err(NetError("no free network slot: 254 test clusters are running (or leftovers: see `ip link show type bridge`)".into()))
}

/// Namespaces, links and bridges of one cluster; deleted on drop.
struct Topology {
    slot: u8,
    namespaces: Vec<String>,
    links: Vec<String>,
    bridges: Vec<String>,
}

impl Topology {
    fn name(&self, what: &str) -> String {
        format!("{PREFIX}{}{what}", self.slot)
    }

    /// Peer bridge of partition group `g`, created on first use.
    fn group_bridge(&mut self, g: usize) -> Result<String, NetError> {
        let br = self.name(&format!("g{g}"));
        if !self.bridges.contains(&br) {
            ip(&["link", "add", &br, "type", "bridge"])?;
            self.bridges.push(br.clone());
            ip(&["link", "set", &br, "up"])?;
        }
        Ok(br)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            kill_ns_pids(ns);
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netns teardown: {e}");
            }
        }
        // Deleting a namespace deletes its veth ends, and so the pairs, but not always
        // at once: delete the host ends too, ignoring "does not exist".
        for l in &self.links {
            let _ = ip(&["link", "del", l]);
        }
        for b in self.bridges.iter().rev() {
            if let Err(e) = ip(&["link", "del", b]) {
                eprintln!("netns teardown: {e}");
            }
        }
    }
}

/// Options for a [`NetCluster`].
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// `--request-timeout-ms`.
    pub request_timeout_ms: u64,
    /// `--snapshot-count`.
    pub snapshot_count: u64,
    /// Extra flags for every node.
    pub extra_args: Vec<String>,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            request_timeout_ms: 2_000,
            snapshot_count: 10_000,
            extra_args: Vec::new(),
        }
    }
}

/// One node of a [`NetCluster`].
pub struct NsNode {
    /// Raft id.
    pub id: u64,
    /// Its namespace.
    pub ns: String,
    /// Host end of its peer link (the one faults act on).
    pub peer_link: String,
    /// Address of its peer listener.
    pub peer_ip: Ipv4Addr,
    /// Address of its client listener.
    pub client_ip: Ipv4Addr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log file (the node's stderr).
    pub log: PathBuf,
    child: Option<Child>,
}

impl NsNode {
    /// `http://<client ip>:2379`.
    pub fn url(&self) -> String {
        format!("http://{}:{CLIENT_PORT}", self.client_ip)
    }
    /// `http://<peer ip>:2380`.
    pub fn peer_url(&self) -> String {
        format!("http://{}:{PEER_PORT}", self.peer_ip)
    }
}

/// A cluster of real nodes, one per network namespace; see the module docs.
pub struct NetCluster {
    /// Nodes by position (id = index + 1).
    pub nodes: Vec<NsNode>,
    /// Client for tests (bounded timeout).
    pub http: Http,
    opts: NetOptions,
    dir: tempfile::TempDir,
    // Dropped after the processes are killed (NetCluster's Drop runs first).
    topo: Topology,
}

impl NetCluster {
    /// Like [`NetCluster::start`], but prints a SKIP line and returns `None` when
    /// [`skip_reason`] says namespace tests cannot run here. Panics on setup errors.
    pub fn start_or_skip(n: usize, opts: NetOptions) -> Option<NetCluster> {
        if let Some(why) = skip_reason() {
            eprintln!("SKIP: network partition test not run: {why}");
            return None;
        }
        Some(
            Self::start(n, opts)
                .unwrap_or_else(|e| panic!("cannot set up the namespace network: {e}")),
        )
    }

    /// Builds the network for `n` nodes, starts them and waits until they agree on a
    /// leader (panics with the nodes' logs when they do not within 30 s).
    pub fn start(n: usize, opts: NetOptions) -> Result<NetCluster, NetError> {
        assert!((1..=100).contains(&n), "1..=100 nodes");
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| NetError(format!("temporary dir: {e}")))?;
        let slot = claim_slot(dir.path())?;
        let mut topo = Topology {
            slot,
            namespaces: Vec::new(),
            links: Vec::new(),
            bridges: Vec::new(),
        };
        let client_br = topo.name("br");
        topo.bridges.push(client_br.clone());
        ip(&[
            "addr",
            "add",
            &format!("10.213.{slot}.129/25"),
            "dev",
            &client_br,
        ])?;
        ip(&["link", "set", &client_br, "up"])?;
        let peer_br = topo.group_bridge(0)?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let ns = topo.name(&format!("n{id}"));
            ip(&["netns", "add", &ns])?;
            topo.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let peer_ip = Ipv4Addr::new(10, 213, slot, 1 + id as u8);
            let client_ip = Ipv4Addr::new(10, 213, slot, 129 + id as u8);
            let peer_link = topo.name(&format!("p{id}"));
            let client_link = topo.name(&format!("c{id}"));
            for (host, inner, bridge, addr) in [
                (&peer_link, "p0", &peer_br, peer_ip),
                (&client_link, "c0", &client_br, client_ip),
            ] {
                ip(&[
                    "link", "add", host, "type", "veth", "peer", "name", inner, "netns", &ns,
                ])?;
                topo.links.push(host.clone());
                ip(&["link", "set", host, "master", bridge, "up"])?;
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/25"),
                    "dev",
                    inner,
                ])?;
                ip(&["-n", &ns, "link", "set", inner, "up"])?;
            }
            nodes.push(NsNode {
                id,
                ns,
                peer_link,
                peer_ip,
                client_ip,
                data_dir: dir.path().join(format!("node-{id}")),
                log: dir.path().join(format!("node-{id}.log")),
                child: None,
            });
        }
        let mut c = NetCluster {
            nodes,
            http: Http::new(Duration::from_secs(5)),
            opts,
            dir,
            topo,
        };
        for id in 1..=n as u64 {
            c.spawn(id)?;
        }
        let all = c.ids();
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            if let Some(l) = c.agreed_leader(&all) {
                break l;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the {n} nodes agreed on no leader within 30 s{}",
                    bridge_filter_hint()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        eprintln!("netns: slot {slot}, {n} nodes on 10.213.{slot}.0/24, leader {leader}");
        Ok(c)
    }

    /// Ids of all nodes.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Node by id.
    pub fn node(&self, id: u64) -> &NsNode {
        &self.nodes[(id - 1) as usize]
    }

    /// Client URL of node `id`.
    pub fn url(&self, id: u64) -> String {
        self.node(id).url()
    }

    /// The `--cluster` flag: every node's peer URL in id order.
    pub fn cluster_flag(&self) -> String {
        self.nodes
            .iter()
            .map(NsNode::peer_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `id`'s process in its namespace (`ip netns exec`, which execs the
    /// node in place, so the child is the node itself). The node gets SIGKILL when the
    /// calling thread ends (`PR_SET_PDEATHSIG`): call it from a thread that outlives it.
    pub fn spawn(&mut self, id: u64) -> Result<(), NetError> {
        let cluster = self.cluster_flag();
        let opts = self.opts.clone();
        let n = &mut self.nodes[(id - 1) as usize];
        assert!(n.child.is_none(), "node {id} is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&n.log)
            .map_err(|e| NetError(format!("log file {}: {e}", n.log.display())))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.ns])
            .arg(node_binary())
            .args([
                "--id",
                &id.to_string(),
                "--cluster",
                &cluster,
                "--port",
                &CLIENT_PORT.to_string(),
            ])
            .args([
                "--listen-client-addr",
                &format!("{}:{CLIENT_PORT}", n.client_ip),
            ])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args(["--request-timeout-ms", &opts.request_timeout_ms.to_string()])
            .args(["--snapshot-count", &opts.snapshot_count.to_string()])
            .args(&opts.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RAFTKV_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // SAFETY: prctl(2) is async-signal-safe; it only sets an attribute of the child.
        // PR_SET_PDEATHSIG survives the exec of `ip` and of the node: if the test process
        // dies without running Drop (SIGKILL), the node dies with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        n.child = Some(
            cmd.spawn()
                .map_err(|e| NetError(format!("spawn raftkv-node {id} in {}: {e}", n.ns)))?,
        );
        Ok(())
    }

    /// `kill -9` node `id` and reap it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.nodes[(id - 1) as usize].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `GET /v1/status` of node `id` (through its client link, which faults never touch).
    pub fn status(&self, id: u64) -> Option<serde_json::Value> {
        let r = self.http.get(&format!("{}/v1/status", self.url(id))).ok()?;
        (r.status == StatusCode::OK).then(|| r.json())
    }

    /// The leader every node of `among` reports, if they all report the same one and it
    /// is one of them.
    pub fn agreed_leader(&self, among: &[u64]) -> Option<u64> {
        let mut leader = None;
        for &id in among {
            let l = self.status(id)?["leader"].as_u64()?;
            if l == 0 || leader.is_some_and(|x| x != l) {
                return None;
            }
            leader = Some(l);
        }
        leader.filter(|l| among.contains(l))
    }

    /// Waits until the nodes `among` agree on a leader that is one of them; returns it.
    pub fn wait_leader(&self, among: &[u64], timeout: Duration) -> u64 {
        wait_for(
            timeout,
            &format!("nodes {among:?} to agree on a leader among them"),
            || self.agreed_leader(among),
        )
    }

    /// Cuts node `id` off the peer network (its peer link goes down; clients still reach it).
    pub fn cut(&self, id: u64) -> Result<(), NetError> {
        ip(&["link", "set", &self.node(id).peer_link, "down"]).map(drop)
    }

    /// Reconnects node `id`'s peer link.
    pub fn heal(&self, id: u64) -> Result<(), NetError> {
        ip(&["link", "set", &self.node(id).peer_link, "up"]).map(drop)
    }

    /// Splits the peer network: the nodes of `groups[g]` can reach each other and no one
    /// else (each group gets its own bridge). Nodes in no group keep their bridge.
    pub fn partition(&mut self, groups: &[&[u64]]) -> Result<(), NetError> {
        for (g, ids) in groups.iter().enumerate() {
            let br = self.topo.group_bridge(g)?;
            for &id in *ids {
                ip(&["link", "set", &self.node(id).peer_link, "master", &br])?;
            }
        }
        Ok(())
    }

    /// Heals every fault: all peer links up and on the one peer bridge.
    pub fn heal_all(&mut self) -> Result<(), NetError> {
        let br = self.topo.group_bridge(0)?;
        for n in &self.nodes {
            ip(&["link", "set", &n.peer_link, "master", &br, "up"])?;
        }
        Ok(())
    }

    /// Prints the last `lines` lines of every node's log.
    pub fn dump_logs(&self, lines: usize) {
        for n in &self.nodes {
            eprintln!("----- node {} log ({}) -----", n.id, n.log.display());
            for l in tail(&n.log, lines) {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(40);
            if std::env::var("RAFTKV_KEEP_TEST_DIR").is_ok() {
                match tempfile::tempdir() {
                    Ok(empty) => {
                        let kept = std::mem::replace(&mut self.dir, empty);
                        eprintln!("keeping test dir {}", kept.keep().display());
                    }
                    Err(e) => eprintln!("cannot keep the test dir: {e}"),
                }
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // The Topology field is dropped next: namespaces, links, bridges.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_parse() {
        assert_eq!(slot_of("rkv12br"), Some(12));
        assert_eq!(slot_of("rkv3n1"), Some(3));
        assert_eq!(slot_of("rkv254p10"), Some(254));
        assert_eq!(slot_of("rkv"), None);
        assert_eq!(slot_of("rkvbr"), None);
        assert_eq!(slot_of("rkv1"), None);
        assert_eq!(slot_of("rkv300br"), None);
        assert_eq!(slot_of("eth0"), None);
    }

    #[test]
    fn owner_alias_round_trips() {
        let alias = format!("{OWNER_TAG}42{DIR_TAG}/tmp/{DIR_PREFIX}x y");
        assert_eq!(
            parse_owner(&alias),
            Some((42, Some(PathBuf::from("/tmp/raftkv-netns-x y"))))
        );
        assert_eq!(parse_owner("raftkv-test pid=7"), Some((7, None)));
        assert_eq!(parse_owner("something else"), None);
        assert!(alias.len() < 256, "IFALIASZ");
    }

    #[test]
    fn link_names_fit_the_kernel_limit() {
        // IFNAMSIZ is 16 including the NUL byte.
        for name in ["rkv254br", "rkv254p100", "rkv254c100", "rkv254g100"] {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
