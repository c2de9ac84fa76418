//! Bodies of raftkv's fuzz targets.
//!
//! The libFuzzer binaries in `fuzz/fuzz_targets/` call these, and so does the stable
//! smoke test `node/tests/hostile_input.rs` (it includes this file with `#[path]`), so the
//! CI run and a long local fuzzing run check exactly the same things. Every body takes
//! arbitrary bytes and panics only on a defect:
//!
//! * a decoder that panics (overflow, slicing, allocation) instead of returning its error;
//! * a round trip that does not hold (what was written reads back the same; a store that
//!   opened once opens again to the same state);
//! * a client request answered with a 5xx other than 503, or never answered.
//!
//! Inputs are read with [`Input`]: the first byte picks a mode — raw bytes, which find
//! framing bugs, or a structured mode that frames fuzzer-chosen fields with valid
//! checksums so the input reaches the payload decoders behind them.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};
use raft::{GetEntriesContext, Storage};
use raftkv_node::kv::KvStore;
use raftkv_node::storage::{DiskStorage, StorageError, StorageOptions};
use raftkv_node::transport::{decode_frames, encode_frames, FrameError};

// ----- input reader ------------------------------------------------------------------

/// Reads fuzzer bytes as a stream of small decisions; past the end everything is zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    /// Whether everything was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// One byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }
    /// A chunk whose length is the next byte.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = self.u8() as usize;
        self.take(n)
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
    /// A number biased towards the edges: small values, values near `u64::MAX`, any value.
    pub fn num(&mut self) -> u64 {
        let b = self.u8();
        match b % 4 {
            0 | 1 => (b >> 2) as u64,
            2 => u64::MAX - (b >> 2) as u64,
            _ => {
                let mut v = [0u8; 8];
                let t = self.take(8);
                v[..t.len()].copy_from_slice(t);
                u64::from_le_bytes(v)
            }
        }
    }
}

/// Where the bodies put their scratch directories: tmpfs when there is one (fast
/// fsyncs), else the system temporary directory.
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn scratch() -> tempfile::TempDir {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(scratch_root);
    tempfile::Builder::new().prefix("raftkv-fuzz-").tempdir_in(root).expect("scratch directory")
}

// ----- on-disk formats, written independently of the node's writers -----------------

/// WAL segment header (docs/storage.md): magic, version, seq, first index, crc.
pub fn segment_header(seq: u64, first_index: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(32);
    h.extend_from_slice(b"RAFTKVWL");
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&first_index.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Appends one WAL record: `[len][crc(len)][crc(body)][type][payload]`.
pub fn frame_record(buf: &mut Vec<u8>, ty: u8, payload: &[u8]) {
    let mut body = Vec::with_capacity(payload.len() + 1);
    body.push(ty);
    body.extend_from_slice(payload);
    let len = (body.len() as u32).to_le_bytes();
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&crc32fast::hash(&len).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    buf.extend_from_slice(&body);
}

/// A snapshot file: header (magic, version, payload length, payload crc, header crc) + payload.
pub fn snapshot_file(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(28 + payload.len());
    f.extend_from_slice(b"RAFTKVSN");
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hcrc = crc32fast::hash(&f);
    f.extend_from_slice(&hcrc.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn pair_name(a: u64, b: u64, ext: &str) -> String {
    format!("{a:016x}-{b:016x}.{ext}")
}

/// Protobuf payload of the `Meta` record (snapshot index, term, hard state).
fn meta_payload(snap_index: u64, snap_term: u64, hs: &HardState) -> Vec<u8> {
    let mut b = Vec::new();
    prost::encoding::uint64::encode(1, &snap_index, &mut b);
    prost::encoding::uint64::encode(2, &snap_term, &mut b);
    prost::encoding::message::encode(3, hs, &mut b);
    b
}

/// Protobuf payload of the snapshot records (index, term).
fn snapref_payload(index: u64, term: u64) -> Vec<u8> {
    let mut b = Vec::new();
    prost::encoding::uint64::encode(1, &index, &mut b);
    prost::encoding::uint64::encode(2, &term, &mut b);
    b
}

fn hard_state(r: &mut Input) -> HardState {
    HardState { term: r.num(), vote: r.num(), commit: r.num() }
}

const STORE_OPTS: StorageOptions = StorageOptions { segment_bytes: 1 << 20, preallocate: false };

/// Everything raft can ask a recovered storage, asked; panics if it does not hang together.
fn observe(st: &DiskStorage) -> (HardState, ConfState, u64, u64, Vec<Entry>) {
    let rs = st.initial_state().expect("initial_state of an opened storage");
    let first = st.first_index().expect("first_index");
    let last = st.last_index().expect("last_index");
    assert!(first <= last.wrapping_add(1), "first index {first} beyond last {last} + 1");
    let mut ents = Vec::new();
    if last >= first {
        ents = st.entries(first, last + 1, None, GetEntriesContext::empty(false)).expect("entries first..=last");
        assert_eq!(ents.len() as u64, last - first + 1, "entries returned for {first}..={last}");
        for (i, e) in ents.iter().enumerate() {
            assert_eq!(e.index, first + i as u64, "entry indexes are contiguous");
            assert_eq!(st.term(e.index).expect("term of a stored entry"), e.term);
        }
    }
    // The term of the entry before the first one (the snapshot's) must be known.
    let _ = st.term(first - 1).expect("term of first_index - 1");
    if let Some(after) = last.checked_add(1) {
        assert!(st.term(after).is_err(), "term beyond the last index");
    }
    assert!(rs.hard_state.commit <= last, "commit {} beyond last {last}", rs.hard_state.commit);
    (rs.hard_state, rs.conf_state, first, last, ents)
}

fn open_typed(dir: &Path) -> Option<DiskStorage> {
    match DiskStorage::open(dir, STORE_OPTS) {
        Ok(st) => Some(st),
        Err(e) => {
            check_storage_error(&e);
            None
        }
    }
}

/// Damage on disk must come back as a precise `Corrupt` error (file, offset, reason).
fn check_storage_error(e: &StorageError) {
    assert!(e.is_corrupt(), "damaged data gave a non-corruption error: {e}");
    assert!(!e.to_string().is_empty());
}

// ----- wal_records -------------------------------------------------------------------

/// WAL recovery over hostile segment files, and the writer/reader round trip.
///
/// Modes (first byte % 3): 0 raw bytes after a valid segment header; 1 records with
/// valid checksums built from fuzzer-chosen fields (some raw, some with a flipped crc,
/// more segments); 2 the node's own writer (append, hard state, sync) then recovery,
/// which must read back exactly what was synced.
pub fn wal_records(data: &[u8]) {
    let mut r = Input::new(data);
    let mode = r.u8() % 3;
    let dir = scratch();
    if mode == 2 {
        return wal_writer_round_trip(dir.path(), &mut r);
    }
    let mut segments = vec![(1u64, 1u64, segment_header(1, 1))];
    if mode == 0 {
        segments[0].2.extend_from_slice(r.rest());
    } else {
        while !r.is_empty() {
            let ctl = r.u8();
            let cur = &mut segments.last_mut().expect("one segment").2;
            let payload: Vec<u8> = if ctl & 0x80 != 0 {
                let n = r.u8() as usize * 4;
                r.take(n).to_vec()
            } else {
                match ctl % 8 {
                    0 => {
                        let (i, t) = (r.num(), r.num());
                        meta_payload(i, t, &hard_state(&mut r))
                    }
                    1 => {
                        let n = r.u8() % 6;
                        let first = r.num();
                        let gaps = ctl & 0x40 != 0;
                        let mut b = Vec::new();
                        for k in 0..n as u64 {
                            let index = if gaps { r.num() } else { first.wrapping_add(k) };
                            let e = Entry { index, term: r.num(), data: r.chunk().to_vec(), ..Default::default() };
                            prost::encoding::message::encode(1, &e, &mut b);
                        }
                        b
                    }
                    2 => hard_state(&mut r).encode_to_vec(),
                    3 | 4 => snapref_payload(r.num(), r.num()),
                    _ => r.chunk().to_vec(),
                }
            };
            match ctl % 8 {
                5 => {
                    // Bytes that are not a record at all.
                    cur.extend_from_slice(&payload);
                    continue;
                }
                6 => {
                    let (seq, _, _) = *segments.last().expect("one segment");
                    let first = r.num();
                    let mut h = segment_header(seq + 1, first);
                    frame_record(&mut h, 1, &payload);
                    segments.push((seq + 1, first, h));
                    continue;
                }
                _ => {}
            }
            let ty = match ctl % 8 {
                7 => r.u8(),
                k => k + 1,
            };
            let at = cur.len();
            frame_record(cur, ty, &payload);
            if ctl & 0x20 != 0 && ctl & 0x40 != 0 {
                // A flipped bit somewhere in this record.
                let span = cur.len() - at;
                let pos = at + r.u8() as usize % span;
                cur[pos] ^= 1 << (r.u8() % 8);
            }
        }
    }
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal).expect("mkdir wal");
    for (seq, first, bytes) in &segments {
        std::fs::write(wal.join(pair_name(*seq, *first, "wal")), bytes).expect("write segment");
    }
    let Some(st) = open_typed(dir.path()) else { return };
    let seen = observe(&st);
    drop(st);
    // Recovery may cut a torn tail; whatever it accepted must open again, identically.
    let again = DiskStorage::open(dir.path(), STORE_OPTS).expect("a WAL that opened once must open again");
    assert_eq!(observe(&again), seen, "the second recovery disagrees with the first");
}

fn wal_writer_round_trip(dir: &Path, r: &mut Input) {
    let st = DiskStorage::open(dir, STORE_OPTS).expect("open an empty directory");
    let mut synced = observe(&st);
    while !r.is_empty() {
        match r.u8() % 4 {
            0 | 1 => {
                let n = r.u8() % 5 + 1;
                let first = match r.u8() % 3 {
                    0 => st.last_index().expect("last") + 1,
                    1 => st.last_index().expect("last").saturating_sub(r.u8() as u64),
                    // Anywhere (raft never goes near the index bound).
                    _ => r.num() % (1 << 40),
                };
                // Raft never replaces committed entries.
                let first = first.max(st.hard_state().commit + 1);
                let ents: Vec<Entry> = (0..n as u64)
                    .map(|k| Entry {
                        index: first.wrapping_add(k),
                        term: r.u8() as u64,
                        data: r.chunk().to_vec(),
                        ..Default::default()
                    })
                    .collect();
                // Bad batches are refused with an error; good ones are buffered.
                let _ = st.append(&ents);
            }
            2 => {
                // As raft sets it: commit never beyond the log, terms far from the bound.
                let last = st.last_index().expect("last");
                let hs = HardState { term: r.u8() as u64, vote: r.u8() as u64, commit: r.num().min(last) };
                let _ = st.set_hard_state(&hs);
            }
            _ => {
                st.sync().expect("sync on tmpfs");
                synced = observe(&st);
            }
        }
    }
    st.sync().expect("sync on tmpfs");
    let live = observe(&st);
    drop(st);
    let back = DiskStorage::open(dir, STORE_OPTS).expect("reopen what the writer wrote");
    let back = observe(&back);
    assert_eq!(back, live, "recovery does not give back what was synced");
    let _ = synced;
}

// ----- snapshot_decode ---------------------------------------------------------------

/// Snapshot files and state-machine images.
///
/// Modes (first byte % 4): 0 a raw snapshot file; 1 a valid header around a raw
/// payload; 2 a well-formed snapshot (fuzzer data and voters, either field order) that
/// must open and read back byte for byte; 3 a raw state-machine image. Every image that
/// restores must encode and restore again to the same image.
pub fn snapshot_decode(data: &[u8]) {
    let mut r = Input::new(data);
    let mode = r.u8() % 4;
    if mode == 3 {
        return kv_image(r.rest());
    }
    let (index, term) = (2 + r.u8() as u64, 1 + r.u8() as u64);
    let mut expect_data = None;
    let file = match mode {
        0 => r.rest().to_vec(),
        1 => snapshot_file(r.rest()),
        _ => {
            let flags = r.u8();
            let voters: Vec<u64> = (0..r.u8() % 5).map(|_| r.num()).collect();
            let meta = SnapshotMetadata {
                conf_state: Some(ConfState { voters, ..Default::default() }),
                index,
                term,
            };
            let body = r.rest().to_vec();
            let mut payload = Vec::new();
            if flags & 1 == 0 {
                prost::encoding::bytes::encode(1, &body, &mut payload);
                prost::encoding::message::encode(2, &meta, &mut payload);
            } else {
                prost::encoding::message::encode(2, &meta, &mut payload);
                prost::encoding::bytes::encode(1, &body, &mut payload);
            }
            if flags & 2 != 0 {
                // An unknown field: skipped by every protobuf reader.
                prost::encoding::uint64::encode(9, &u64::from(flags), &mut payload);
            }
            expect_data = Some(body);
            snapshot_file(&payload)
        }
    };
    let dir = scratch();
    let (wal, snap) = (dir.path().join("wal"), dir.path().join("snap"));
    std::fs::create_dir_all(&wal).expect("mkdir wal");
    std::fs::create_dir_all(&snap).expect("mkdir snap");
    let mut seg = segment_header(1, 1);
    frame_record(&mut seg, 1, &meta_payload(index, term, &HardState { term, vote: 0, commit: index }));
    std::fs::write(wal.join(pair_name(1, 1, "wal")), seg).expect("write segment");
    std::fs::write(snap.join(pair_name(term, index, "snap")), &file).expect("write snapshot");
    let opened = open_typed(dir.path());
    let Some(st) = opened else {
        assert!(expect_data.is_none(), "a well-formed snapshot file was refused");
        return;
    };
    let snap = st.latest_snapshot().expect("latest snapshot").expect("the snapshot in force");
    let meta = snap.metadata();
    assert_eq!((meta.index, meta.term), (index, term));
    if let Some(want) = expect_data {
        assert_eq!(snap.full.data, want, "snapshot data does not read back");
    }
    let _ = observe(&st);
    kv_image(&snap.full.data);
}

/// A state-machine image: restores with a typed error, or round-trips.
pub fn kv_image(bytes: &[u8]) {
    // As a delta on top of an empty store: a typed error, or it applies.
    if let Err(e) = KvStore::new().apply_delta(bytes) {
        assert!(!e.to_string().is_empty());
    }
    let mut kv = KvStore::new();
    if let Err(e) = kv.restore(bytes) {
        assert!(!e.to_string().is_empty());
        return;
    }
    let img = kv.snapshot_image();
    let mut again = KvStore::new();
    again.restore(&img).expect("an image we encoded must restore");
    assert_eq!(again.snapshot_image(), img, "image encode/restore is not stable");
    assert_eq!(again.applied(), kv.applied());
    assert_eq!(again.members(), kv.members());
    assert_eq!(again.len(), kv.len());
}

// ----- peer_frames -------------------------------------------------------------------

/// The peer body decoder: typed errors, and decode(encode(msgs)) == msgs.
///
/// Modes (first byte % 2): 0 a raw body; 1 a body whose frame lengths are right and
/// whose frames are raw bytes, so the input reaches the raft message decoder.
pub fn peer_frames(data: &[u8]) {
    let mut r = Input::new(data);
    let body = if r.u8() % 2 == 0 {
        r.rest().to_vec()
    } else {
        let mut b = Vec::new();
        while !r.is_empty() {
            let n = r.u8() as usize * 2;
            let f = r.take(n);
            b.extend_from_slice(&(f.len() as u32).to_le_bytes());
            b.extend_from_slice(f);
        }
        b
    };
    match decode_frames(&body) {
        Ok(msgs) => {
            // What the decoder accepts goes to raft-rs, whose accessors panic on enum
            // values they do not know: every one must be known.
            for m in &msgs {
                let _ = m.get_msg_type();
                for e in &m.entries {
                    let _ = e.get_entry_type();
                    conf_change_enums(e);
                }
            }
            let again = encode_frames(&msgs);
            let back = decode_frames(&again).expect("frames we encoded must decode");
            assert_eq!(back, msgs, "peer frames do not round-trip");
        }
        Err(e) => {
            let offset = match &e {
                FrameError::Truncated(o) => *o,
                FrameError::Decode { offset, .. } | FrameError::Invalid { offset, .. } => *offset,
            };
            assert!(offset < body.len(), "error offset {offset} outside a body of {}", body.len());
        }
    }
}

/// Reads the enum fields of a conf change entry the way the raft loop and raft-rs do
/// when they apply it (they panic on unknown values).
fn conf_change_enums(e: &Entry) {
    use raft::eraftpb::{ConfChange, ConfChangeV2, EntryType};
    match e.get_entry_type() {
        EntryType::EntryConfChange => {
            if let Ok(cc) = ConfChange::decode(e.data.as_slice()) {
                let _ = cc.get_change_type();
            }
        }
        EntryType::EntryConfChangeV2 => {
            if let Ok(cc) = ConfChangeV2::decode(e.data.as_slice()) {
                let _ = cc.get_transition();
                for c in &cc.changes {
                    let _ = c.get_change_type();
                }
            }
        }
        EntryType::EntryNormal => {}
    }
}

// ----- http_request ------------------------------------------------------------------

use raftkv_node::api::Api;
use clap::Parser as _;
use raftkv_node::config::Args;
use raftkv_node::raft_loop::{self, Request};
use raftkv_node::shutdown::{Reason, Shutdown};
use raftkv_node::transport::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The admin token of the in-process node: only the structured mode sends it, with
/// peer URLs it builds itself (loopback only).
const ADMIN_TOKEN: &str = "fuzz-admin-token-4f1c9a";

/// A single-member node without listeners: raft loop + storage on tmpfs + the client API.
struct LiveNode {
    api: Api,
    tx: std::sync::mpsc::Sender<Request>,
    shutdown: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl LiveNode {
    fn start(rt: &tokio::runtime::Runtime) -> LiveNode {
        let dir = scratch();
        let url = "http://127.0.0.1:9".to_string();
        // The node's own flag parsing, then the fields a fuzzing node needs changed
        // (robust to new settings: they keep their defaults).
        let data_dir = dir.path().join("data");
        let argv = ["raftkv-fuzz", "--id", "1", "--cluster", url.as_str(), "--data-dir", data_dir.to_str().expect("utf-8 path")];
        let mut cfg = Args::try_parse_from(argv).expect("flags").into_config().expect("config");
        cfg.snapshot_count = 500;
        cfg.max_request_bytes = 64 << 10;
        cfg.request_timeout = Duration::from_millis(300);
        // Short ticks: a fresh single member elects itself within 20-40 ms.
        cfg.tick = Duration::from_millis(2);
        cfg.admin_token = Some(raftkv_node::auth::AdminToken::new(ADMIN_TOKEN).expect("admin token"));
        let (tx, rx) = std::sync::mpsc::channel();
        let shutdown = Shutdown::new();
        let transport = Transport::new(1, url, None, tx.clone(), rt.handle().clone());
        let started = {
            let _guard = rt.enter();
            raft_loop::start(cfg.clone(), transport, shutdown.clone(), tx.clone(), rx).expect("start the raft loop")
        };
        // Watch streams end at once (as on a stopping node): the exchange reads every
        // answer to its end, and a live stream has none.
        started.watch.close();
        let api = Api { cfg: Arc::new(cfg), raft: started.handle.clone(), status: started.status.clone(), kv: started.kv.clone(), watch: started.watch.clone(), transport: None };
        let node = LiveNode { api, tx, shutdown, thread: Some(started.thread), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.healthy() {
            assert!(Instant::now() < deadline, "the in-process node elected no leader in 20 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        node
    }

    /// Sole voter and leader, no learners: anything else (a fuzzer-added member) means
    /// the next requests would only time out, so the harness starts a new node.
    fn healthy(&self) -> bool {
        let st = match self.api.status.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        st.leader == 1 && st.voters == [1] && st.learners.is_empty() && !st.stopping
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Request::Stop);
        self.shutdown.trigger(Reason::Signal);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LiveNode {
    fn drop(&mut self) {
        self.stop();
    }
}

struct HttpHarness {
    rt: tokio::runtime::Runtime,
    node: Mutex<Option<LiveNode>>,
}

fn http_harness() -> &'static HttpHarness {
    static H: OnceLock<HttpHarness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        HttpHarness { rt, node: Mutex::new(None) }
    })
}

const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT"];
const PATHS: &[&str] = &[
    "/v1/kv/", "/v1/kv", "/v1/members", "/v1/members/", "/v1/leader/transfer", "/v1/status", "/v1/", "/v1", "/",
    "/healthz", "/readyz", "/metrics", "/v1/members/2/promote", "/v1/txn", "/v1/leases", "/v1/leases/",
    "/v1/watch", "/v1/backup",
];
const QUERY_KEYS: &[&str] = &["prefix", "limit", "consistency", "prev_revision", "", "lease", "start_revision", "key", "progress_ms"];
const VALUES: &[&str] = &["linearizable", "serializable", "0", "1", "10000", "10001", "-1", "%", "%zz", "%2F", "%ff", "18446744073709551616"];

/// Bytes for a URL: mostly printable ASCII and escapes, sometimes anything.
fn url_bytes(r: &mut Input, out: &mut Vec<u8>) {
    for &b in r.chunk() {
        match b % 8 {
            0 => out.extend_from_slice(format!("%{:02X}", b).as_bytes()),
            1 => out.push(b'%'),
            7 => out.push(b),
            _ => out.push(b'!' + b % 94),
        }
    }
}

fn json_body(r: &mut Input) -> Vec<u8> {
    let url = if r.u8() % 2 == 0 {
        format!("http://127.0.0.1:{}", 1 + r.u8() as u16)
    } else {
        // No ':' and no '.': never a usable address, so never leaves the machine.
        r.chunk().iter().map(|b| (b'a' + b % 26) as char).collect()
    };
    let id = match r.u8() % 4 {
        0 => "2".to_string(),
        1 => r.num().to_string(),
        2 => "\"3\"".to_string(),
        _ => "-1".to_string(),
    };
    let learner = ["true", "false", "null", "1", "\"yes\""][r.u8() as usize % 5];
    match r.u8() % 6 {
        0 => format!("{{\"id\":{id},\"peer_url\":\"{url}\",\"learner\":{learner}}}").into_bytes(),
        1 => format!("{{\"to\":{id}}}").into_bytes(),
        2 => url.into_bytes(),
        // A transaction and a lease grant (their routes are among PATHS).
        3 => format!(
            "{{\"compare\":[{{\"key\":\"{url}\",\"revision\":{id}}}],\"success\":[{{\"op\":\"put\",\"key\":\"k\",\"value\":\"{url}\",\"lease\":{id}}}],\"failure\":[{{\"op\":\"delete\",\"key\":\"k\"}},{{\"op\":\"get\",\"key\":\"{url}\"}}]}}"
        )
        .into_bytes(),
        4 => format!("{{\"ttl\":{id}}}").into_bytes(),
        _ => r.chunk().iter().map(|b| if b.is_ascii_punctuation() { *b } else { b'{' }).collect(),
    }
}

/// One or more HTTP/1.1 requests from fuzzer bytes.
fn build_requests(r: &mut Input) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + r.u8() % 3 {
        let ctl = r.u8();
        let method = if ctl & 0x80 != 0 {
            r.chunk().to_vec()
        } else {
            METHODS[ctl as usize % METHODS.len()].as_bytes().to_vec()
        };
        let mut target = PATHS[r.u8() as usize % PATHS.len()].as_bytes().to_vec();
        url_bytes(r, &mut target);
        if ctl & 0x40 != 0 {
            let mut sep = b'?';
            for _ in 0..r.u8() % 4 {
                target.push(sep);
                sep = b'&';
                target.extend_from_slice(QUERY_KEYS[r.u8() as usize % QUERY_KEYS.len()].as_bytes());
                if r.u8() % 4 != 0 {
                    target.push(b'=');
                }
                match r.u8() % 2 {
                    0 => target.extend_from_slice(VALUES[r.u8() as usize % VALUES.len()].as_bytes()),
                    _ => url_bytes(r, &mut target),
                }
            }
        }
        let admin = ctl & 0x20 != 0;
        let body = if admin { json_body(r) } else { r.chunk().to_vec() };
        // Without the token, a fuzzer-written body can never add a member: it is refused
        // with 401 before it is parsed, so no peer URL but loopback is ever dialled.
        let body = if admin { body } else { body.into_iter().map(|b| if b == b':' { b';' } else { b }).collect() };
        out.extend_from_slice(&method);
        out.push(b' ');
        out.extend_from_slice(&target);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: raftkv\r\n");
        if admin {
            out.extend_from_slice(format!("authorization: Bearer {ADMIN_TOKEN}\r\n").as_bytes());
        }
        match ctl % 4 {
            0 => {}
            1 => out.extend_from_slice(format!("content-length: {}\r\n", r.num()).as_bytes()),
            _ => out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
    }
    out
}

/// Writes `input` to the API over an in-memory connection and returns all it answered.
async fn exchange(api: Api, input: Vec<u8>) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(1 << 16);
    let conn = tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
            .await;
    });
    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = async move {
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    };
    let reader = async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let both = async { tokio::join!(writer, reader).1 };
    let out = tokio::time::timeout(Duration::from_secs(20), both).await;
    conn.abort();
    out.expect("the API did not answer or close the connection within 20 s")
}

/// Status codes of the responses in `raw` (`HTTP/1.1 NNN` at the start of a line).
fn statuses(raw: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(p) = raw[i..].windows(9).position(|w| w == b"HTTP/1.1 ") {
        let at = i + p;
        if at == 0 || raw[at - 1] == b'\n' {
            if let Some(code) = raw.get(at + 9..at + 12).and_then(|c| std::str::from_utf8(c).ok()?.parse().ok()) {
                out.push(code);
            }
        }
        i = at + 9;
    }
    out
}

/// `%` and exactly two hex digits make one byte; the result must be UTF-8.
fn percent_decode_reference(s: &[u8]) -> Option<String> {
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let (h, l) = (hex(*s.get(i + 1)?)?, hex(*s.get(i + 2)?)?);
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Client requests against an in-process single-member node (raft loop, WAL on tmpfs,
/// the real router and handlers behind hyper's HTTP/1.1 parser).
///
/// Modes (first byte % 2): 0 raw bytes on the connection; 1 requests assembled from
/// methods, route prefixes, fuzzed path bytes, query strings, headers and bodies.
/// Every response must be below 500 or exactly 503; the connection must be answered
/// or closed within 20 s. The input as text also checks `api::percent_decode` against
/// a reference decoder.
pub fn http_request(data: &[u8]) {
    // The key/query decoder against a plain reading of RFC 3986 percent-encoding.
    let text = String::from_utf8_lossy(data);
    assert_eq!(
        raftkv_node::api::percent_decode(&text).ok(),
        percent_decode_reference(text.as_bytes()),
        "percent_decode disagrees on {text:?}"
    );
    let mut r = Input::new(data);
    let input = if r.u8() % 2 == 0 { r.rest().to_vec() } else { build_requests(&mut r) };
    let h = http_harness();
    let mut slot = h.node.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_none_or(|n| !n.healthy()) {
        // A fuzzer-made member change costs the sole node its quorum; start afresh.
        // The old one may wait seconds to hand leadership to a voter that does not
        // exist; it stops (and its directory goes) on a thread of its own.
        if let Some(old) = slot.take() {
            std::thread::spawn(move || drop(old));
        }
        *slot = Some(LiveNode::start(&h.rt));
    }
    let node = slot.as_ref().expect("node");
    let raw = h.rt.block_on(exchange(node.api.clone(), input.clone()));
    for code in statuses(&raw) {
        assert!(
            code < 500 || code == 503,
            "status {code} for request {:?}\nresponse: {:?}",
            String::from_utf8_lossy(&input),
            String::from_utf8_lossy(&raw)
        );
    }
    // A learner the input added is removed again through the API (much cheaper than a
    // new node; an added voter cannot be: the node lost its quorum).
    let learners = node.api.status.read().map(|s| s.learners.clone()).unwrap_or_default();
    for id in learners {
        let req = format!("DELETE /v1/members/{id} HTTP/1.1\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\r\n");
        let raw = h.rt.block_on(exchange(node.api.clone(), req.into_bytes()));
        assert!(statuses(&raw).iter().all(|c| *c < 500 || *c == 503), "removing learner {id}: {:?}", String::from_utf8_lossy(&raw));
    }
}
