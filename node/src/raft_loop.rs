//! The raft loop: the only owner of [`RawNode`].
//!
//! It runs on a dedicated thread, takes [`Request`]s from the API, the transport and its
//! helper threads over one channel, ticks, and handles each `Ready` in this order: send
//! the leader's messages (a leader replicates in parallel with its own write); install a
//! received snapshot; answer ReadIndex states; apply committed entries (raft only hands
//! out entries that are already durable here) and wake their waiters; append the new
//! entries and hard state to the WAL buffer; hand the fsync to the **persist thread**
//! (raft-rs's async Ready: `advance_append_async`, then `on_persist_ready` when the
//! fsync is done). Messages that vouch for a Ready — a follower's append response, a
//! vote — are held until that Ready is durable. While an fsync runs, the loop keeps
//! stepping messages, committing and applying; proposals that arrive meanwhile share the
//! next fsync (group commit). The client commands gathered in one loop iteration are
//! proposed as one raft message (one append and one broadcast on a leader, one forward
//! on a follower), and raft merges the appends for one follower in one Ready into one
//! message (`batch_append`). Clients are answered only after their entry is committed
//! and applied, so an acknowledged write is on a quorum's disks.
//!
//! A peer's message is stepped only after [`vet`] has checked it against this member's
//! state: raft-rs trusts its peers, and panics on some messages no correct member sends.
//!
//! Reads use raft's ReadIndex: every read gathered in one loop iteration shares one
//! `read_index` call (batching); a read is answered once the applied index reaches the
//! read index. Unanswered read contexts are re-issued, because a leader that has not yet
//! committed an entry in its term drops them silently.
//!
//! Snapshots are taken every `--snapshot-count` applied entries: the state machine is
//! frozen with an O(1) clone and a **snapshot thread** encodes and saves it — a delta of
//! what changed since the snapshot in force when that pays, else a full image (see
//! docs/storage.md) — then compacts the log and reports back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message,
    MessageType, Snapshot, SnapshotMetadata,
};
use std::sync::atomic::{AtomicBool, Ordering};

use raft::{GetEntriesContext, RaftState, RawNode, SnapshotStatus, StateRole, Storage};
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::kv::{ApplyOutcome, Command, ConfContext, KvStore};
use crate::metrics::metrics;
use crate::shutdown::{Reason, Shutdown};
use crate::storage::{self, DiskStorage, StorageError, StorageOptions};
use crate::transport::Transport;
use crate::watch::WatchHub;

mod vet;

/// Election timeout in ticks (heartbeats go every tick).
const ELECTION_TICKS: u32 = 10;
/// A learner that has heard from no peer for this long asks the voters whether it is
/// still a member (see [`RaftLoop::probe_membership`]), and again as often while the
/// silence lasts.
const LEARNER_PROBE_AFTER: Duration = Duration::from_secs(5);
/// Entries kept behind a snapshot for slow followers (etcd keeps 5000).
const CATCH_UP_ENTRIES: u64 = 5_000;
/// Longest chain of delta snapshots after a full one (restart applies them all).
const MAX_DELTAS: usize = 32;
/// Least time between two warnings about dropped peer messages.
const VET_WARN_EVERY: Duration = Duration::from_secs(30);
/// How long a ReadIndex context may stay unanswered before it is re-issued.
const READ_RETRY: Duration = Duration::from_millis(300);
/// Longest a SIGTERM'd leader waits for its leadership transfer.
const TRANSFER_ON_STOP: Duration = Duration::from_secs(3);
/// Bytes of client commands gathered into one proposal message before it is stepped.
const PROPOSAL_BATCH_BYTES: usize = 1 << 20;

/// raft-rs's view of [`DiskStorage`]. The one difference: when the newest snapshot does
/// not yet contain the member it is meant for (a member added after it was taken), it
/// answers "temporarily unavailable" and asks the loop for a fresh snapshot, which raft
/// then sends on its next attempt (etcd sends a freshly merged snapshot the same way).
#[derive(Clone)]
pub struct RaftStorage {
    disk: DiskStorage,
    want_snapshot: Arc<AtomicBool>,
    /// Index of the conf change that last added each member. A member must never get a
    /// snapshot from before that point: an id that was removed and added again would
    /// replay its own old removal from the log and stop.
    added_at: Arc<std::sync::Mutex<HashMap<u64, u64>>>,
}

impl Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.disk.initial_state()
    }
    fn entries(&self, low: u64, high: u64, max: impl Into<Option<u64>>, ctx: GetEntriesContext) -> raft::Result<Vec<Entry>> {
        self.disk.entries(low, high, max, ctx)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.disk.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.disk.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.disk.last_index()
    }
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        let snap = match self.disk.snapshot(request_index, to) {
            Ok(s) => s,
            Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable)) => {
                self.want_snapshot.store(true, Ordering::Relaxed);
                return Err(unavailable());
            }
            Err(e) => return Err(e),
        };
        let meta = snap.metadata.as_ref();
        let cs = meta.and_then(|m| m.conf_state.as_ref());
        let added_at = match self.added_at.lock() {
            Ok(m) => m.get(&to).copied().unwrap_or(0),
            Err(p) => p.into_inner().get(&to).copied().unwrap_or(0),
        };
        let fresh_enough = meta.is_some_and(|m| m.index >= added_at);
        if fresh_enough && cs.is_some_and(|cs| cs.voters.contains(&to) || cs.learners.contains(&to)) {
            Ok(snap)
        } else {
            self.want_snapshot.store(true, Ordering::Relaxed);
            Err(unavailable())
        }
    }
}

/// Why a request to the raft loop failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known (election in progress, or no quorum); retryable.
    #[error("no leader")]
    NoLeader,
    /// Raft refused the proposal.
    #[error("proposal refused: {0}")]
    Refused(String),
    /// The node is shutting down. `proposed`: the write was already proposed (it may
    /// still be committed by the other members: its outcome is unknown).
    #[error("{}", if *proposed {
        "node is stopping: the write had been proposed and may still be committed (outcome unknown)"
    } else {
        "node is stopping: the write was not proposed"
    })]
    Stopping {
        /// Whether the write was proposed already.
        proposed: bool,
    },
    /// Another membership change is proposed and not yet applied (raft takes one at a
    /// time; raft-rs would silently turn a second one into an empty entry).
    #[error("another membership change is still being applied; retry when it is done")]
    ConfChangeInProgress,
    /// This member has just become leader and has not yet applied its log up to its
    /// election: it takes no membership change before (raft-rs would drop it). Retryable.
    #[error("the new leader is not ready for a membership change yet")]
    LeaderNotReady,
    /// The leader refused this member's forwarded proposal without appending it (a
    /// leadership transfer was under way, or it was no longer leader): proposing it
    /// again is safe.
    #[error("the leader dropped the forwarded proposal")]
    Dropped,
    /// This node's disk is full. `proposed`: the write was already in the log (it may
    /// still be committed: its outcome is unknown); otherwise it was never proposed.
    #[error("{}", if *proposed {
        "disk full: the write had been proposed and may still be committed (outcome unknown)"
    } else {
        "disk full: the write was not proposed (retry when space returns)"
    })]
    DiskFull {
        /// Whether the write was in the log already.
        proposed: bool,
    },
}

/// Reply channel for a proposal.
pub type ProposeReply = oneshot::Sender<Result<ApplyOutcome, ProposeError>>;
/// Reply channel for a conf change: the conf state after it was applied.
pub type ConfReply = oneshot::Sender<Result<ConfState, ProposeError>>;
/// Reply channel for a read: Ok once the local state is at least the read index.
pub type ReadReply = oneshot::Sender<Result<(), ProposeError>>;

/// What a member answers [`Request::RenewLease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed: its time to live starts again from (at the latest) when the leader took
    /// the request, and this member was confirmed leader after that.
    Renewed {
        /// The lease's time to live.
        ttl_ms: u64,
        /// The leader's applied index when it answered.
        revision: u64,
    },
    /// No such lease: never granted, revoked, or expired (its revocation is under way).
    NotFound,
    /// This member is not the leader, or stopped being it before a quorum confirmed it;
    /// the leader it knows (0: none).
    NotLeader {
        /// The leader's id, 0 when unknown.
        leader: u64,
    },
}

/// Where a [`Renewal`] goes.
pub type RenewReply = oneshot::Sender<Renewal>;

/// A renewal done on the leader, waiting for its leadership to be confirmed.
struct PendingRenewal {
    /// The lease: it must still exist when the answer goes (a revocation committed
    /// meanwhile — an expiry an earlier leader proposed, committed with this leader's
    /// first entry — wins).
    lease: u64,
    /// The term the leader renewed in: the answer needs it to be leader of it still.
    term: u64,
    /// The lease's time to live when the renewal came, or None when this leader had not
    /// applied its grant yet (looked up again after the barrier).
    ttl_ms: Option<u64>,
    /// Answered by the read barrier issued with it.
    confirmed: oneshot::Receiver<Result<(), ProposeError>>,
    reply: RenewReply,
}

/// A request to the raft loop.
pub enum Request {
    /// Propose an encoded [`Command`] with its request id.
    Propose {
        /// The command's request id.
        request_id: u64,
        /// Encoded command.
        data: Vec<u8>,
        /// Where the outcome goes, once applied.
        reply: ProposeReply,
    },
    /// Propose a membership change.
    ConfChange {
        /// The single change.
        change: ConfChangeSingle,
        /// URL of an added member (empty otherwise).
        peer_url: String,
        /// Where the new conf state goes, once applied.
        reply: ConfReply,
    },
    /// A linearizable read barrier.
    Read {
        /// Answered once the read index is applied.
        reply: ReadReply,
    },
    /// Renew lease `lease` here, on the leader, without a raft entry (etcd's keepalive):
    /// its deadline moves, and the answer waits until a quorum has confirmed that this
    /// member was still the leader of the same term afterwards.
    RenewLease {
        /// The lease.
        lease: u64,
        /// Where the answer goes.
        reply: RenewReply,
    },
    /// A raft message from a peer.
    Raft(Box<Message>),
    /// The transport could not reach a peer.
    Unreachable(u64),
    /// Outcome of sending a snapshot to a peer.
    SnapshotSent(u64, bool),
    /// A peer told us we were removed from the cluster; `peer_applied` is the applied
    /// index behind its answer, when it said (an older peer does not).
    Removed {
        /// The peer's applied index.
        peer_applied: Option<u64>,
    },
    /// Member `from` dropped the proposals with these request ids (client commands or
    /// membership changes), which this member had forwarded to it, without appending them.
    ProposalsDropped {
        /// The member that dropped them (honoured only for proposals forwarded to it).
        from: u64,
        /// Request ids of the dropped proposals.
        ids: Vec<u64>,
    },
    /// A member's list says this (quarantined, `lost_log`) member's id was last added by
    /// the entry at `added_at` (see [`RaftLoop::quarantined`]).
    Readmitted {
        /// Index of the conf change that last added this member, as the peer knows it.
        added_at: u64,
    },
    /// Move leadership to `to`.
    TransferLeader(u64),
    /// Stop: hand leadership over if leader, flush, exit.
    Stop,
    /// The persist thread made every Ready up to `number` durable.
    Persisted {
        /// Highest Ready number synced.
        number: u64,
        /// How long the fsync took.
        took: Duration,
    },
    /// The persist thread hit a full disk (it keeps retrying).
    DiskFull,
    /// The persist thread failed for good.
    PersistFailed(StorageError),
    /// The snapshot thread finished (or failed) saving the snapshot at `index`.
    SnapshotSaved {
        /// Index of the snapshot.
        index: u64,
        /// How long saving took, or why it failed.
        result: Result<Duration, StorageError>,
        /// After a save, the index the log was compacted to, and how that went.
        compacted: Option<(u64, Result<(), StorageError>)>,
        /// A full image (not a delta).
        full: bool,
    },
}

/// A cheap handle to send requests to the raft loop.
#[derive(Clone)]
pub struct RaftHandle {
    tx: Sender<Request>,
}

impl RaftHandle {
    /// A handle sending on `tx` (tests stand in for the loop at the other end).
    #[cfg(test)]
    pub(crate) fn from_sender(tx: Sender<Request>) -> Self {
        RaftHandle { tx }
    }

    /// Sends a request; false when the loop has stopped.
    pub fn send(&self, req: Request) -> bool {
        self.tx.send(req).is_ok()
    }
}

/// One member's replication progress, as seen by the leader.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerProgress {
    /// Raft id.
    pub id: u64,
    /// Highest index known to be replicated on it.
    pub match_index: u64,
    /// Whether it answered recently.
    pub recent_active: bool,
}

/// A snapshot of the node's raft state, published after every loop iteration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStatus {
    /// This node's id.
    pub id: u64,
    /// Leader id, 0 when unknown.
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// leader, follower, candidate, pre_candidate or learner.
    pub role: &'static str,
    /// Commit index.
    pub commit_index: u64,
    /// Applied index.
    pub applied_index: u64,
    /// Newest snapshot index.
    pub snapshot_index: u64,
    /// WAL bytes on disk.
    pub wal_bytes: u64,
    /// Voter ids.
    pub voters: Vec<u64>,
    /// Learner ids.
    pub learners: Vec<u64>,
    /// Member peer URLs.
    pub member_urls: Vec<(u64, String)>,
    /// Replication progress (only on the leader).
    pub progress: Vec<PeerProgress>,
    /// Random id of this data directory.
    pub incarnation: u64,
    /// Whether this node is stopping.
    pub stopping: bool,
    /// This empty data dir holds an id the cluster knows with a longer log: the node
    /// takes no part in raft until the id is removed and added again.
    pub lost_log: bool,
    /// Index of the conf change that last added each member, for those added since
    /// this member's state was last restored from a snapshot (others: not known).
    pub added_at: Vec<(u64, u64)>,
    /// The disk is full: new writes are refused until space returns.
    pub disk_full: bool,
    /// This member leads and a membership change proposed in its term is not yet
    /// applied: another one gets 409 (followers ask the leader before forwarding one).
    pub conf_change_pending: bool,
}

/// Shared, read-mostly view of the status.
pub type StatusCell = Arc<RwLock<Arc<NodeStatus>>>;

/// Errors starting the raft loop.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be opened or is corrupt.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// `--restore-from` names a backup, but the data directory already holds other data.
    #[error("--restore-from {}: the data directory {} is not new: {why}. A restore needs an empty data directory: move it away to restore, or start without --restore-from to keep its data", backup.display(), dir.display())]
    RestoreOverData {
        /// The backup named.
        backup: PathBuf,
        /// The data directory.
        dir: PathBuf,
        /// What the directory holds instead.
        why: String,
    },
    /// This member was removed from its cluster earlier.
    #[error("this member was removed from the cluster ({reason}); its data dir {dir} must not rejoin. Remove the directory and add the node again as a new member")]
    Removed {
        /// Tombstone text.
        reason: String,
        /// Data dir.
        dir: PathBuf,
    },
    /// raft-rs refused the configuration or state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The snapshot's state machine image does not decode.
    #[error("snapshot image: {0}")]
    Image(#[from] crate::kv::KvError),
    /// The backup to restore from (`--restore-from`) cannot be used.
    #[error("{0}")]
    Backup(#[from] crate::backup::BackupError),
}

/// What the rest of the node needs from a started raft loop.
pub struct Started {
    /// Send requests.
    pub handle: RaftHandle,
    /// Read the status.
    pub status: StatusCell,
    /// Read the state machine.
    pub kv: Arc<RwLock<KvStore>>,
    /// The changes the loop applied, for watch streams.
    pub watch: Arc<WatchHub>,
    /// The loop thread; joins when it has stopped.
    pub thread: std::thread::JoinHandle<()>,
}

/// A Ready whose durability is pending, with the messages that must wait for it.
struct Unpersisted {
    number: u64,
    needs_sync: bool,
    held: Vec<Message>,
}

/// The waiters of proposed client commands, by request id, in the order proposed.
type Waiters = Vec<(u64, ProposeReply)>;

/// Only the request id of an encoded [`Command`] (same tag): decoding it skips the key
/// and value without copying them.
#[derive(Clone, PartialEq, prost::Message)]
struct RequestIdOnly {
    #[prost(uint64, tag = "1")]
    request_id: u64,
    /// [`Command`]'s op.
    #[prost(int32, tag = "2")]
    op: i32,
    /// [`Command`]'s transaction (whose writes' ops must be known too).
    #[prost(message, optional, tag = "6")]
    txn: Option<crate::kv::Txn>,
    /// [`Command`]'s `lease_renewed`: set only on a leader's own expiry revocations.
    #[prost(uint64, optional, tag = "9")]
    lease_renewed: Option<u64>,
}

/// What a proposal forwarded by a peer holds, read in one pass over its entries.
#[derive(Debug, Default, PartialEq)]
struct ForwardedScan {
    /// Request ids of its client commands and membership changes (from their
    /// [`ConfContext`]): what a dropped-proposal notice names.
    ids: Vec<u64>,
    /// A client command whose operation this version does not know (or that does not
    /// decode): a leader must not append it (every member of this version would stop at it).
    unknown_command: bool,
    /// A membership change.
    conf_change: bool,
    /// A lease expiry revocation (`lease_renewed` set): a leader proposes those only for
    /// itself, from its own deadlines. One forwarded was decided by a member that has
    /// lost leadership since, blind to the keepalives its successor acknowledged.
    expiry: bool,
}

fn scan_forwarded(entries: &[Entry]) -> ForwardedScan {
    let mut scan = ForwardedScan::default();
    for e in entries {
        let conf_id = |context: &[u8]| ConfContext::decode(context).ok().map(|c| c.request_id);
        let id = match e.get_entry_type() {
            EntryType::EntryNormal if e.data.is_empty() => None,
            EntryType::EntryNormal => match RequestIdOnly::decode(e.data.as_slice()) {
                Ok(c) => {
                    scan.unknown_command |= !crate::kv::is_known(c.op, c.txn.as_ref());
                    scan.expiry |= c.op == crate::kv::OpType::LeaseRevoke as i32 && c.lease_renewed.is_some();
                    Some(c.request_id)
                }
                Err(_) => {
                    scan.unknown_command = true;
                    None
                }
            },
            EntryType::EntryConfChangeV2 => {
                scan.conf_change = true;
                ConfChangeV2::decode(e.data.as_slice()).ok().and_then(|cc| conf_id(&cc.context))
            }
            EntryType::EntryConfChange => {
                scan.conf_change = true;
                ConfChange::decode(e.data.as_slice()).ok().and_then(|cc| conf_id(&cc.context))
            }
        };
        scan.ids.extend(id.filter(|id| *id != 0));
    }
    scan
}

/// Client commands waiting to be proposed together: one `MsgPropose` means one append
/// and one broadcast on a leader, one forward to the leader on a follower.
#[derive(Default)]
struct ProposalBatch {
    entries: Vec<Entry>,
    replies: Waiters,
    bytes: usize,
}

impl ProposalBatch {
    /// Adds a command; true when the batch is full ([`PROPOSAL_BATCH_BYTES`]) and must be
    /// proposed now. A bounded batch stays far below raft's uncommitted-size limit, which
    /// would drop a whole batch of large values every time.
    fn push(&mut self, request_id: u64, data: Vec<u8>, reply: ProposeReply) -> bool {
        self.bytes += data.len();
        self.entries.push(Entry { data, ..Default::default() });
        self.replies.push((request_id, reply));
        self.bytes >= PROPOSAL_BATCH_BYTES
    }

    /// Empties the batch: its entries and their waiters, or `None` when it was empty.
    fn take(&mut self) -> Option<(Vec<Entry>, Waiters)> {
        if self.entries.is_empty() {
            return None;
        }
        self.bytes = 0;
        Some((std::mem::take(&mut self.entries), std::mem::take(&mut self.replies)))
    }
}

struct PendingRead {
    replies: Vec<ReadReply>,
    issued: Instant,
}

/// The loop's state. Only this struct touches the `RawNode`.
struct RaftLoop {
    cfg: Config,
    raw: RawNode<RaftStorage>,
    storage: DiskStorage,
    want_snapshot: Arc<AtomicBool>,
    added_at: Arc<std::sync::Mutex<HashMap<u64, u64>>>,
    kv: Arc<RwLock<KvStore>>,
    /// Where applied changes go for watch streams.
    watch: Arc<WatchHub>,
    transport: Transport,
    status: StatusCell,
    shutdown: Shutdown,
    rx: Receiver<Request>,
    self_tx: Sender<Request>,
    persist_tx: Sender<u64>,
    unpersisted: std::collections::VecDeque<Unpersisted>,
    snapshot_in_flight: bool,
    conf_state: ConfState,
    incarnation: u64,
    proposals: HashMap<u64, ProposeReply>,
    /// The leader each of this member's proposals was forwarded to (none while this
    /// member leads): only its word that it dropped one counts.
    forwarded_to: HashMap<u64, u64>,
    /// Client commands gathered in this loop iteration, proposed together by
    /// [`RaftLoop::flush_proposals`].
    batch: ProposalBatch,
    conf_waiters: HashMap<u64, ConfReply>,
    new_reads: Vec<ReadReply>,
    reads_inflight: HashMap<u64, PendingRead>,
    reads_ready: Vec<(u64, Vec<ReadReply>)>,
    next_ctx: u64,
    last_leader: u64,
    /// When each peer's last message arrived (the leader's view of who is reachable).
    last_heard: HashMap<u64, Instant>,
    stop_deadline: Option<Instant>,
    removed: bool,
    /// Set when this node must stop: why (a failed fsync, a log that lost entries).
    fatal: Option<&'static str>,
    /// Started in join mode on an empty data dir (nothing acknowledged from here yet).
    empty_joiner: bool,
    /// The cluster knows this id by a log this (empty) data dir never had: quarantined.
    lost_log: bool,
    /// The highest commit index a leader claimed for this member while `lost_log`: the
    /// id must have been added again by a later entry before the quarantine ends.
    lost_log_commit: u64,
    /// When this quarantined member last asked a leader whether its id was added again,
    /// and whether that question is still out.
    readmit_asked: Option<Instant>,
    readmit_inflight: Arc<AtomicBool>,
    /// `added_at` as published in the status (sorted by id).
    added_at_view: Vec<(u64, u64)>,
    /// When a dropped peer message (see [`vet`]) was last logged as a warning.
    last_vet_warning: Option<Instant>,
    /// The last write to the disk failed for want of space; new writes are refused.
    disk_full: bool,
    /// The state machine of the last snapshot message, decoded when it arrived.
    decoded_snapshot: Option<(u64, KvStore)>,
    /// After a failed snapshot save: when to try again, and the back-off used.
    snapshot_retry: Option<(Instant, Duration)>,
    /// When the loop started (the silence of a learner that never heard from a peer
    /// counts from here).
    started: Instant,
    /// The earliest time a learner sends its next membership probe.
    next_probe: Instant,
    /// When each lease expires unless renewed, as this member saw its grant or last
    /// renewal applied, and that entry's index (only the leader acts on it: it proposes
    /// the revocation, void if a later renewal is applied first).
    lease_deadlines: HashMap<u64, (Instant, u64)>,
    /// Leases whose revocation this member proposed, and when (proposed again if it has
    /// not been applied within the request timeout).
    revoking: HashMap<u64, Instant>,
    /// Lease renewals waiting for a quorum to confirm this leader.
    renewals: Vec<PendingRenewal>,
    /// The term in which this member, as leader, last started every lease's time to
    /// live again ([`RaftLoop::take_over_leases`], done before it renews or expires one
    /// in a new term: followers never see keepalives, so their deadlines are no measure
    /// of a lease's life).
    leases_term: u64,
}

/// When a lease with `ttl_ms` renewed at `now` expires (a TTL too long for the clock,
/// which only a hostile proposal could carry, is a century).
fn lease_deadline(now: Instant, ttl_ms: u64) -> Instant {
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(Duration::from_millis(ttl_ms).min(century)).unwrap_or(now)
}

/// A keepalive taken by the leader: lease `id` lives at least `ttl_ms` from now (a later
/// deadline already set stays).
fn extend_lease(deadlines: &mut HashMap<u64, (Instant, u64)>, id: u64, ttl_ms: u64, renewed: u64) {
    let deadline = lease_deadline(Instant::now(), ttl_ms);
    let entry = deadlines.entry(id).or_insert((deadline, renewed));
    entry.0 = entry.0.max(deadline);
}

/// A lease command applied: a grant or renewal starts its time to live again here; a
/// revocation (or a renewal finding the lease gone) ends it.
fn track_lease(deadlines: &mut HashMap<u64, (Instant, u64)>, revoking: &mut HashMap<u64, Instant>, cmd: &Command, outcome: &ApplyOutcome) {
    use crate::kv::OpType;
    match (OpType::from_i32(cmd.op), outcome) {
        (Some(OpType::LeaseGrant | OpType::LeaseKeepAlive), ApplyOutcome::LeaseKept { ttl_ms, revision }) => {
            deadlines.insert(cmd.lease, (lease_deadline(Instant::now(), *ttl_ms), *revision));
        }
        // An expiry revocation made void by a renewal: the renewal set the deadline.
        (Some(OpType::LeaseRevoke), ApplyOutcome::LeaseMismatch { exists: true }) => {
            revoking.remove(&cmd.lease);
        }
        (Some(OpType::LeaseRevoke | OpType::LeaseKeepAlive), _) => {
            deadlines.remove(&cmd.lease);
            revoking.remove(&cmd.lease);
        }
        _ => {}
    }
}

fn lock_err<T>(_: T) -> StorageError {
    StorageError::Io { path: PathBuf::from("<lock>"), source: std::io::Error::other("poisoned lock") }
}

/// Opens the data dir, restores the state machine and starts the loop thread.
pub fn start(
    cfg: Config,
    transport: Transport,
    shutdown: Shutdown,
    tx: Sender<Request>,
    rx: Receiver<Request>,
) -> Result<Started, StartError> {
    // `DiskStorage::open` creates the data directory, fsyncing the parent of each
    // directory it creates, so a new member's directory entry is as durable as its files.
    if let Some(reason) = storage::read_tombstone(&cfg.data_dir)? {
        return Err(StartError::Removed { reason, dir: cfg.data_dir.clone() });
    }
    let storage = DiskStorage::open(&cfg.data_dir, StorageOptions::default())?;
    let incarnation = storage::data_dir_incarnation(&cfg.data_dir)?;
    if storage.is_fresh() && !cfg.join {
        // A new cluster: every initial member writes the same bootstrap snapshot at
        // index 1, term 1 — or, restored from a backup, at the backup's applied index
        // with its keys. Joining nodes receive it from the leader instead.
        let voters: Vec<u64> = cfg.initial_members.iter().map(|(id, _)| *id).collect();
        let (data, index) = match &cfg.restore_from {
            None => (KvStore::bootstrap_image(&cfg.initial_members, 1, cfg.initial_cluster_id), 1),
            Some(path) => {
                let (info, image) = crate::backup::read(path)?;
                let bump = cfg.restore_bump_revision;
                let start = info.applied_index.checked_add(bump).filter(|s| *s < storage::MAX_INDEX).ok_or_else(|| {
                    StartError::Backup(crate::backup::BackupError::Invalid {
                        path: path.clone(),
                        why: format!("applied index {} plus --restore-bump-revision {bump} leaves no room for a log", info.applied_index),
                    })
                })?;
                // The bump is in the id: members restored with different bumps (different
                // logs) refuse each other.
                let id = crate::config::restored_cluster_id(&cfg.initial_members, &cfg.initial_cluster_token, info.crc, start);
                let (data, applied) = KvStore::restored_image(&image, &cfg.initial_members, id, bump)?;
                if applied != start {
                    return Err(StartError::Backup(crate::backup::BackupError::Invalid {
                        path: path.clone(),
                        why: format!("the header says applied index {}, the image {}", info.applied_index, applied - bump),
                    }));
                }
                info!(backup = %path.display(), applied = info.applied_index, bump, crc = format!("{:08x}", info.crc), "restoring a new cluster from a backup");
                // Before the state: a crash in between leaves a fresh directory (restored
                // again at the next start), never restored data without its marker.
                storage::write_restored_from(&cfg.data_dir, info.applied_index, info.crc, bump)?;
                (data, applied)
            }
        };
        let snap = Snapshot {
            data,
            metadata: Some(SnapshotMetadata {
                conf_state: Some(ConfState { voters, ..Default::default() }),
                index,
                term: 1,
            }),
        };
        storage.apply_snapshot(snap)?;
        info!(members = cfg.initial_members.len(), index, "bootstrapped a new cluster");
    } else if let (Some(path), false) = (&cfg.restore_from, storage.is_fresh()) {
        // Restarting with the command line of the restore is fine; naming another backup
        // (or restoring over data that was never restored: a forgotten wipe) is refused,
        // rather than looking like a restore that kept the old data.
        let marker = storage::read_restored_from(&cfg.data_dir)?;
        match (crate::backup::identity(path), marker) {
            (Ok(named), Some((applied, crc, bump))) if named == (applied, crc) => {
                info!(backup = %path.display(), "the data directory was restored from this backup already: --restore-from is ignored");
                if bump != cfg.restore_bump_revision {
                    warn!(restored_with = bump, given = cfg.restore_bump_revision, "--restore-bump-revision differs from the restore's: it applies only to a restore, and is ignored");
                }
            }
            (Err(e), Some(_)) => {
                warn!(backup = %path.display(), error = %e, "the data directory was restored from a backup already and this one cannot be read: --restore-from is ignored");
            }
            (_, done) => {
                let why = match done {
                    Some((applied, crc, _)) => format!("it was restored from another backup (applied index {applied}, checksum {crc:08x})"),
                    None => "it holds data that was not restored from a backup".to_string(),
                };
                return Err(StartError::RestoreOverData { backup: path.clone(), dir: cfg.data_dir.clone(), why });
            }
        }
    } else if storage.is_fresh() {
        info!("fresh node waiting to be added to the cluster (join)");
    }
    let started_empty = storage.is_fresh() && cfg.join;
    // A quarantine (see `RaftLoop::quarantined`) outlives restarts: a leader elected
    // since would not tell again (its heartbeats claim nothing for this member).
    let lost_log_commit = match storage::read_lost_log(&cfg.data_dir)? {
        Some(commit) if started_empty => {
            warn!(commit, "this empty data dir was found to be an old member's lost volume: staying out of raft until the id is added again");
            Some(commit)
        }
        Some(_) => {
            storage::clear_lost_log(&cfg.data_dir)?;
            None
        }
        None => None,
    };
    let mut kv = KvStore::new();
    if let Some(chain) = storage.latest_snapshot()? {
        kv.restore(&chain.full.data)?;
        for d in &chain.deltas {
            kv.apply_delta(&d.data)?;
        }
        let idx = chain.metadata().index;
        kv.set_applied(idx);
        info!(index = idx, keys = kv.len(), deltas = chain.deltas.len(), "restored state machine from snapshot");
    }
    let conf_state = raft::Storage::initial_state(&storage)?.conf_state;
    // Peers: initial members from the flags are hints; the state machine's members win.
    for (id, url) in &cfg.initial_members {
        if *id != cfg.id {
            transport.set_peer(*id, url);
        }
    }
    for (id, url) in kv.members() {
        if *id != cfg.id {
            transport.set_peer(*id, url);
        }
    }
    // A joining member learns it from the leader's snapshot (`install_snapshot`).
    transport.set_cluster_id(kv.cluster_id());
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: ELECTION_TICKS as usize,
        heartbeat_tick: 1,
        applied: kv.applied(),
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        max_uncommitted_size: 256 * 1024 * 1024,
        max_committed_size_per_ready: 64 * 1024 * 1024,
        // Appends to one follower made in one Ready go out as one message.
        batch_append: true,
        ..Default::default()
    };
    raft_cfg.validate()?;
    let want_snapshot = Arc::new(AtomicBool::new(false));
    let added_at = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let raft_storage = RaftStorage { disk: storage.clone(), want_snapshot: want_snapshot.clone(), added_at: added_at.clone() };
    let raw = RawNode::new(&raft_cfg, raft_storage, &crate::logger::raft_logger(cfg.id))?;
    let status: StatusCell = Arc::new(RwLock::new(Arc::new(NodeStatus::default())));
    let watch = WatchHub::new(kv.applied(), cfg.watch_history);
    kv.record_events();
    kv.keep_previous_values(cfg.watch_prev_kv);
    let kv = Arc::new(RwLock::new(kv));
    let (persist_tx, persist_rx) = std::sync::mpsc::channel::<u64>();
    {
        let (storage, tx, shutdown) = (storage.clone(), tx.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("persist".into())
            .spawn(move || persist_thread(storage, persist_rx, tx, shutdown))
            .map_err(|source| StorageError::Io { path: PathBuf::from("<thread>"), source })?;
    }
    let mut lp = RaftLoop {
        cfg,
        raw,
        storage,
        want_snapshot,
        added_at,
        kv: kv.clone(),
        watch: watch.clone(),
        transport,
        status: status.clone(),
        shutdown,
        rx,
        self_tx: tx.clone(),
        persist_tx,
        unpersisted: std::collections::VecDeque::new(),
        snapshot_in_flight: false,
        conf_state,
        incarnation,
        proposals: HashMap::new(),
        forwarded_to: HashMap::new(),
        batch: ProposalBatch::default(),
        conf_waiters: HashMap::new(),
        new_reads: Vec::new(),
        reads_inflight: HashMap::new(),
        reads_ready: Vec::new(),
        next_ctx: rand::random::<u64>() >> 1,
        last_leader: 0,
        last_heard: HashMap::new(),
        stop_deadline: None,
        removed: false,
        fatal: None,
        empty_joiner: started_empty,
        lost_log: lost_log_commit.is_some(),
        lost_log_commit: lost_log_commit.unwrap_or(0),
        readmit_asked: None,
        readmit_inflight: Arc::new(AtomicBool::new(false)),
        added_at_view: Vec::new(),
        last_vet_warning: None,
        disk_full: false,
        decoded_snapshot: None,
        snapshot_retry: None,
        started: Instant::now(),
        next_probe: Instant::now(),
        lease_deadlines: HashMap::new(),
        revoking: HashMap::new(),
        renewals: Vec::new(),
        leases_term: 0,
    };
    lp.renew_all_leases();
    lp.publish_status();
    let fatal = lp.shutdown.clone();
    let thread = std::thread::Builder::new()
        .name("raft-loop".into())
        .spawn(move || {
            // raft-rs panics on states it cannot reconcile, typically a member whose log
            // was lost under it (a wiped data dir rejoining with its old id). Never leave
            // the process serving without its raft loop.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lp.run())).is_err() {
                error!("the raft loop panicked (if this member's data dir was wiped or replaced, remove it from the cluster and add it back as a new member); stopping");
                fatal.trigger(Reason::Fatal);
            }
        })
        .map_err(|source| StorageError::Io { path: PathBuf::from("<thread>"), source })?;
    Ok(Started { handle: RaftHandle { tx }, status, kv, watch, thread })
}

impl RaftLoop {
    fn run(mut self) {
        let tick = self.cfg.tick;
        let mut next_tick = Instant::now() + tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(req) => self.handle(req),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Gather everything already queued: one Ready, one fsync for all of it.
            for _ in 0..8192 {
                match self.rx.try_recv() {
                    Ok(req) => self.handle(req),
                    Err(_) => break,
                }
            }
            self.flush_proposals();
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
                self.housekeeping(now);
            }
            self.issue_reads(now);
            let ready = if let Some(why) = self.fatal {
                Err(StorageError::Io { path: self.cfg.data_dir.clone(), source: std::io::Error::other(why) })
            } else {
                self.on_ready()
            };
            // A snapshot stepped in this iteration was installed by this Ready, if raft
            // took it at all; do not hold a second copy of the state beyond that.
            self.decoded_snapshot = None;
            if let Err(e) = ready {
                error!(error = %e, "storage failed; stopping this node");
                self.fail_all(|proposed| ProposeError::Stopping { proposed });
                self.shutdown.trigger(Reason::Fatal);
                break;
            }
            self.answer_renewals();
            self.publish_status();
            if self.removed {
                self.fail_all(|proposed| ProposeError::Stopping { proposed });
                break;
            }
            if let Some(deadline) = self.stop_deadline {
                let still_leader = self.raw.raft.state == StateRole::Leader && self.other_voters().next().is_some();
                if !still_leader || Instant::now() >= deadline {
                    info!(leader = self.raw.raft.leader_id, "raft loop stopping");
                    self.fail_all(|proposed| ProposeError::Stopping { proposed });
                    break;
                }
            }
        }
        if let Err(e) = self.storage.sync() {
            error!(error = %e, "final WAL sync failed");
        }
        let mut st = (*self.current_status()).clone();
        st.stopping = true;
        st.leader = 0;
        self.store_status(st);
    }

    fn other_voters(&self) -> impl Iterator<Item = u64> + '_ {
        let me = self.cfg.id;
        self.conf_state.voters.iter().copied().filter(move |v| *v != me)
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Propose { request_id, data, reply } => {
                if self.stop_deadline.is_some() {
                    let _ = reply.send(Err(ProposeError::Stopping { proposed: false }));
                    return;
                }
                if self.disk_full {
                    let _ = reply.send(Err(ProposeError::DiskFull { proposed: false }));
                    return;
                }
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                    return;
                }
                if self.batch.push(request_id, data, reply) {
                    self.flush_proposals();
                }
            }
            Request::ConfChange { change, peer_url, reply } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                    return;
                }
                self.clamp_pending_conf();
                if let Some(busy) = self.conf_change_refusal(self.raw.raft.raft_log.applied) {
                    let _ = reply.send(Err(busy));
                    return;
                }
                let request_id = rand::random::<u64>();
                let ctx = ConfContext { request_id, peer_url }.encode_to_vec();
                let cc = ConfChangeV2 { changes: vec![change], context: ctx.clone(), ..Default::default() };
                match self.raw.propose_conf_change(ctx, cc) {
                    Ok(()) => {
                        let r = &self.raw.raft;
                        if r.state != StateRole::Leader && r.leader_id != 0 {
                            // raft forwarded it to the leader it knows.
                            self.forwarded_to.insert(request_id, r.leader_id);
                        }
                        self.conf_waiters.insert(request_id, reply);
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(ProposeError::NoLeader));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Refused(e.to_string())));
                    }
                }
            }
            Request::Read { reply } => self.new_reads.push(reply),
            Request::RenewLease { lease, reply } => self.renew_lease(lease, reply),
            Request::Raft(m) => {
                if let Err(reason) = vet::vet(&self.raw.raft, &m) {
                    metrics().peer_refused_messages.with_label_values(&[reason]).inc();
                    // A warning at most every 30 s (a flood must not flood the log).
                    if self.last_vet_warning.is_none_or(|t| t.elapsed() >= VET_WARN_EVERY) {
                        self.last_vet_warning = Some(Instant::now());
                        warn!(from = m.from, msg_type = ?m.get_msg_type(), term = m.term, reason, "dropped a peer message no correct member sends (more are counted in raftkv_network_peer_refused_messages_total)");
                    } else {
                        debug!(from = m.from, msg_type = ?m.get_msg_type(), term = m.term, reason, "dropped a peer message no correct member sends");
                    }
                    return;
                }
                if self.lost_acknowledged_entries(&m) || self.quarantined(&m) || !self.snapshot_decodes(&m) {
                    return;
                }
                self.last_heard.insert(m.from, Instant::now());
                // A forwarded proposal raft drops is not appended: tell its proposer, who
                // would otherwise wait out the request timeout, so it can propose again.
                let forwarded = (m.get_msg_type() == MessageType::MsgPropose && m.from != self.cfg.id)
                    .then(|| (m.from, scan_forwarded(&m.entries)));
                if let Some((from, scan)) = &forwarded {
                    // Refused here, unappended, and its proposer told (it proposes again):
                    let refused = if self.raw.raft.state != StateRole::Leader {
                        // not the leader (any more): raft-rs would forward it once more, and
                        // the leader's notice would not count at the proposer, which
                        // forwarded it here;
                        Some("a forwarded proposal reached a member that is not the leader")
                    } else if scan.unknown_command {
                        // a newer member's command (or garbage): every member of this
                        // version would stop when it applies it;
                        metrics().peer_refused_messages.with_label_values(&["unknown_command"]).inc();
                        warn!(from, "refused a forwarded proposal with a command this version does not know");
                        Some("unknown command")
                    } else if scan.expiry {
                        // an expiry decided by a former leader (see `expire_leases`);
                        Some("a lease expiry decided by a member that no longer leads")
                    } else if scan.conf_change {
                        // a membership change raft-rs cannot take now: it would turn it
                        // into an empty entry, silently (the proposer asks again and gets
                        // 409 if another change is pending).
                        self.clamp_pending_conf();
                        self.conf_change_refusal(self.raw.raft.raft_log.applied).map(|_| "a membership change the leader cannot take now")
                    } else {
                        None
                    };
                    if let Some(why) = refused {
                        debug!(to = from, why, "refused a forwarded proposal; telling its proposer");
                        if !scan.ids.is_empty() {
                            self.transport.notify_dropped(*from, scan.ids.clone());
                        }
                        return;
                    }
                }
                match self.raw.step(*m) {
                    Ok(()) => {}
                    Err(raft::Error::ProposalDropped) => {
                        if let Some((from, scan)) = forwarded.filter(|(_, scan)| !scan.ids.is_empty()) {
                            debug!(to = from, count = scan.ids.len(), "dropped forwarded proposals; telling their proposer");
                            self.transport.notify_dropped(from, scan.ids);
                        }
                    }
                    Err(e) => debug!(error = %e, "raft refused a peer message"),
                }
            }
            Request::Unreachable(id) => self.raw.report_unreachable(id),
            Request::Readmitted { added_at } => self.on_readmitted(added_at),
            Request::SnapshotSent(id, ok) => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.raw.report_snapshot(id, status);
            }
            Request::Removed { peer_applied } => {
                let applied = self.raw.raft.raft_log.applied;
                match peer_applied {
                    // The peer is behind this member: the removal it knows of was undone by
                    // a re-addition it has not applied yet (the same id re-added after a
                    // removal). It catches up from this member's newer messages.
                    Some(theirs) if theirs < applied => {
                        debug!(peer_applied = theirs, applied, "a lagging peer still counts this member as removed; ignored");
                    }
                    _ => {
                        warn!("a peer reports this member was removed from the cluster");
                        self.mark_removed("a peer reported this member as removed");
                    }
                }
            }
            Request::ProposalsDropped { from, ids } => {
                // Only the word of the member a proposal was forwarded to counts: raft
                // there either appended (or forwarded) it or dropped it, never both. A
                // notice for a proposal appended after all would have it proposed twice.
                for id in ids {
                    if self.forwarded_to.get(&id) == Some(&from) {
                        self.forwarded_to.remove(&id);
                        if let Some(w) = self.proposals.remove(&id) {
                            let _ = w.send(Err(ProposeError::Dropped));
                        } else if let Some(w) = self.conf_waiters.remove(&id) {
                            let _ = w.send(Err(ProposeError::Dropped));
                        }
                    } else {
                        debug!(from, id, "ignored a dropped-proposal notice for a proposal not forwarded to its sender");
                    }
                }
            }
            Request::TransferLeader(to) => {
                // Commands that came first are proposed first, as when each was proposed alone.
                self.flush_proposals();
                self.raw.transfer_leader(to)
            }
            Request::SnapshotSaved { index, result, compacted, full } => self.on_snapshot_saved(index, result, compacted, full),
            Request::Persisted { number, took } => self.on_persisted(number, took),
            Request::DiskFull => self.on_disk_full(),
            Request::PersistFailed(e) => {
                error!(error = %e, "WAL fsync failed; stopping this node");
                self.fatal = Some("WAL fsync failed");
            }
            Request::Stop => {
                self.flush_proposals();
                if self.stop_deadline.is_none() {
                    self.stop_deadline = Some(Instant::now() + TRANSFER_ON_STOP);
                    if self.raw.raft.state == StateRole::Leader {
                        if let Some(to) = self.best_transferee() {
                            info!(to, "stopping: handing leadership over");
                            self.raw.transfer_leader(to);
                        }
                    }
                }
            }
        }
    }

    /// Proposes the gathered client commands as one `MsgPropose` (what
    /// `RawNode::propose` steps, with one entry per command); raft takes or drops them
    /// together.
    fn flush_proposals(&mut self) {
        let Some((entries, replies)) = self.batch.take() else { return };
        let m = Message {
            msg_type: MessageType::MsgPropose as i32,
            from: self.cfg.id,
            entries,
            ..Default::default()
        };
        match self.raw.raft.step(m) {
            Ok(()) => {
                let r = &self.raw.raft;
                if r.state != StateRole::Leader && r.leader_id != 0 {
                    // raft forwarded them to the leader it knows.
                    self.forwarded_to.extend(replies.iter().map(|(id, _)| (*id, r.leader_id)));
                }
                self.proposals.extend(replies)
            }
            Err(e) => {
                let err = match e {
                    raft::Error::ProposalDropped => ProposeError::NoLeader,
                    e => ProposeError::Refused(e.to_string()),
                };
                for (_, reply) in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// A leader's heartbeat carries `min(match, commit)` for this member, and this
    /// member reports a match only for entries it has made durable. A heartbeat commit
    /// beyond the last index of the log means this member's disk lost entries it had
    /// acknowledged (a WAL cut short by something other than a torn last write, a
    /// restored backup, a replaced volume). raft-rs would panic on it; continuing would
    /// let this member vote and count towards quorums without data it promised to keep.
    /// Stops the node with a message that says how to recover.
    ///
    /// [`vet::vet`] has already dropped such a heartbeat from a sender that is not a
    /// voter here (no leader is), unless this member is still joining.
    fn lost_acknowledged_entries(&mut self, m: &Message) -> bool {
        if !vet::claims_lost_entries(&self.raw.raft, m) {
            return false;
        }
        let last = self.raw.raft.raft_log.last_index();
        if self.empty_joiner && last == 0 {
            // Nothing was ever written here: this is an old member's id on a new, empty
            // data dir (a lost or replaced volume). Stay up, answer /v1/status (the
            // operator tells amnesia by the incarnation) and take no part in raft until
            // the id is removed and added again (see `quarantined`).
            if !self.lost_log {
                error!(
                    leader = m.from,
                    leader_commit = m.commit,
                    data_dir = %self.cfg.data_dir.display(),
                    "the cluster knows member {} with a log this empty data dir does not have (a lost or replaced volume?); \
                     taking no part in raft until the member is removed (DELETE /v1/members/{}) and added again",
                    self.cfg.id,
                    self.cfg.id
                );
                self.lost_log = true;
            }
            if m.commit > self.lost_log_commit {
                self.lost_log_commit = m.commit;
                if let Err(e) = storage::write_lost_log(&self.cfg.data_dir, m.commit) {
                    warn!(error = %e, "cannot record the quarantine in the data dir (it holds until this process stops)");
                }
            }
            return true;
        }
        error!(
            leader = m.from,
            leader_commit = m.commit,
            last_index = last,
            data_dir = %self.cfg.data_dir.display(),
            "this member's log lost entries it acknowledged: the leader's commit for it is {} but the log ends at {}; \
             the data dir was truncated, restored from a backup or replaced. Refusing to go on: \
             remove this member (DELETE /v1/members/{}), wipe its data dir and add it back (docs/storage.md, \
             \"Recovering a damaged member\")",
            m.commit,
            last,
            self.cfg.id
        );
        self.fatal = Some("this member's log lost acknowledged entries");
        true
    }

    /// Whether peer `id` sent a message within an election timeout. raft-rs's
    /// `Progress::recent_active` is not usable for this: the leader resets it for every
    /// follower at each check-quorum round, so it reads false for healthy members until
    /// their next answer.
    fn reachable(&self, id: u64, now: Instant) -> bool {
        id == self.cfg.id
            || self.last_heard.get(&id).is_some_and(|t| now.duration_since(*t) < self.cfg.tick * ELECTION_TICKS)
    }

    /// While this empty joiner is known to the cluster by an older log (`lost_log`), it
    /// drops every raft message: it must not vote or acknowledge, nor quietly catch up
    /// as the member it is not. Only proof that the id was removed and added again after
    /// the quarantine began ends it: the member list of the leader that sends heartbeats
    /// (asked at most once a second) names a later entry as the one that added this id.
    /// A heartbeat's commit is no such proof: any newly elected leader starts every
    /// follower's progress at 0, and would lift the quarantine of a member whose vote
    /// could then elect a candidate that lacks entries this member once acknowledged.
    fn quarantined(&mut self, m: &Message) -> bool {
        if !self.lost_log {
            return false;
        }
        if m.get_msg_type() == MessageType::MsgHeartbeat {
            self.ask_if_readmitted(m.from);
        }
        true
    }

    /// Asks member `leader` (its peer port's member list) when this member's id was last
    /// added; the answer comes back as [`Request::Readmitted`].
    fn ask_if_readmitted(&mut self, leader: u64) {
        let now = Instant::now();
        if self.readmit_inflight.load(Ordering::Relaxed) || self.readmit_asked.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        let Some(url) = self.transport.peer_url(leader) else { return };
        self.readmit_asked = Some(now);
        self.readmit_inflight.store(true, Ordering::Relaxed);
        let (cfg, tx, inflight, me) = (self.cfg.clone(), self.self_tx.clone(), self.readmit_inflight.clone(), self.cfg.id);
        self.transport.spawn(async move {
            if let Some(added_at) = crate::api::member_added_at(&cfg, &url, me).await {
                let _ = tx.send(Request::Readmitted { added_at });
            }
            inflight.store(false, Ordering::Relaxed);
        });
    }

    /// A peer's member list names the entry that last added this member.
    fn on_readmitted(&mut self, added_at: u64) {
        if !self.lost_log || added_at <= self.lost_log_commit {
            return;
        }
        info!(added_at, quarantined_at = self.lost_log_commit, "the cluster added this member again; taking part in raft");
        self.lost_log = false;
        if let Err(e) = storage::clear_lost_log(&self.cfg.data_dir) {
            warn!(error = %e, "cannot remove the quarantine marker; a restart checks the member list again");
        }
        self.publish_status();
    }

    /// A snapshot message's image must decode before raft sees the message: raft-rs
    /// adopts a snapshot when it steps it, and one this node cannot restore would stop
    /// it. An unreadable one is dropped (the leader tries again); a readable one is kept
    /// decoded for [`RaftLoop::install_snapshot`].
    fn snapshot_decodes(&mut self, m: &Message) -> bool {
        if m.get_msg_type() != MessageType::MsgSnapshot {
            return true;
        }
        let Some(snap) = m.snapshot.as_ref() else { return true };
        let index = snap.metadata.as_ref().map_or(0, |md| md.index);
        let mut kv = KvStore::new();
        match kv.restore(&snap.data) {
            Ok(()) => {
                self.decoded_snapshot = Some((index, kv));
                true
            }
            Err(e) => {
                warn!(from = m.from, index, error = %e, "dropped a snapshot whose state-machine image does not decode");
                false
            }
        }
    }

    /// The most caught-up other voter that answered recently.
    fn best_transferee(&self) -> Option<u64> {
        let prs = self.raw.raft.prs();
        let now = Instant::now();
        self.other_voters()
            .filter_map(|id| prs.get(id).map(|p| (id, p.matched, self.reachable(id, now))))
            .filter(|(_, _, active)| *active)
            .max_by_key(|(id, matched, _)| (*matched, u64::MAX - *id))
            .map(|(id, _, _)| id)
    }

    fn mark_removed(&mut self, why: &str) {
        if let Err(e) = storage::write_tombstone(&self.cfg.data_dir, why) {
            error!(error = %e, "could not write the removal tombstone");
        }
        self.removed = true;
        self.shutdown.trigger(Reason::Removed);
    }

    fn housekeeping(&mut self, now: Instant) {
        self.proposals.retain(|_, r| !r.is_closed());
        let (proposals, conf_waiters) = (&self.proposals, &self.conf_waiters);
        self.forwarded_to.retain(|id, _| proposals.contains_key(id) || conf_waiters.contains_key(id));
        self.conf_waiters.retain(|_, r| !r.is_closed());
        metrics().proposals_pending.set(self.proposals.len() as i64);
        metrics().files_pending_delete.set(i64::try_from(self.storage.files_pending_delete()).unwrap_or(i64::MAX));
        self.probe_membership(now);
        self.expire_leases(now);
    }

    /// Every lease's time to live starts again now: at start-up, after a snapshot, and
    /// when this member becomes the leader (as etcd's lessor does on promotion), so that
    /// no lease expires earlier than its holder could expect, whatever this member saw.
    fn renew_all_leases(&mut self) {
        let now = Instant::now();
        let Ok(kv) = self.kv.read() else { return };
        self.lease_deadlines = kv.leases().map(|(id, ttl, renewed)| (id, (lease_deadline(now, ttl), renewed))).collect();
        self.revoking.clear();
    }

    /// A keepalive, on the leader: no raft entry, as etcd's. The lease's deadline moves
    /// now (only ever later), and the answer waits for a read barrier: a quorum confirms
    /// that this member was still the leader, of the same term, after the deadline
    /// moved. A member elected after that restarts every lease's time to live when it
    /// takes over, so the renewal holds whoever leads. A lease whose revocation is under
    /// way is not found (it expired).
    fn renew_lease(&mut self, id: u64, reply: RenewReply) {
        let leader = self.raw.raft.leader_id;
        if self.raw.raft.state != StateRole::Leader || self.stop_deadline.is_some() {
            let leader = if leader == self.cfg.id { 0 } else { leader };
            let _ = reply.send(Renewal::NotLeader { leader });
            return;
        }
        self.take_over_leases();
        if self.revoking.contains_key(&id) {
            let _ = reply.send(Renewal::NotFound);
            return;
        }
        // A lease this leader does not know may be one whose grant is committed but not
        // applied here yet (a follower can apply it first, answer the grant, and forward
        // the client's first keepalive): "not found" only after the barrier.
        let lease = self.kv.read().ok().and_then(|kv| kv.lease_ttl(id));
        if let Some((ttl_ms, renewed)) = lease {
            extend_lease(&mut self.lease_deadlines, id, ttl_ms, renewed);
        }
        let ttl_ms = lease.map(|(ttl, _)| ttl);
        let (tx, confirmed) = oneshot::channel();
        self.new_reads.push(tx);
        self.renewals.push(PendingRenewal { lease: id, term: self.raw.raft.term, ttl_ms, confirmed, reply });
    }

    /// Answers the renewals whose barrier came back (renewed, if this member is still
    /// the leader of their term), and those whose leader stepped down meanwhile.
    fn answer_renewals(&mut self) {
        if self.renewals.is_empty() {
            return;
        }
        let raft = &self.raw.raft;
        let (leading, term) = (raft.state == StateRole::Leader && self.stop_deadline.is_none(), raft.term);
        let leader = if raft.leader_id == self.cfg.id { 0 } else { raft.leader_id };
        let Ok(kv) = self.kv.read() else { return };
        let revision = kv.applied();
        for mut r in std::mem::take(&mut self.renewals) {
            if r.reply.is_closed() {
                continue;
            }
            let same = leading && term == r.term;
            let answer = match r.confirmed.try_recv() {
                // Everything committed before the barrier is applied now: a revocation
                // among it removed the lease.
                Ok(Ok(())) if same => match kv.lease_ttl(r.lease) {
                    Some(_) if self.revoking.contains_key(&r.lease) => Renewal::NotFound,
                    None => Renewal::NotFound,
                    Some((ttl_ms, renewed)) => {
                        if r.ttl_ms.is_none() {
                            // Its grant was applied after the renewal came: renewed from now.
                            extend_lease(&mut self.lease_deadlines, r.lease, ttl_ms, renewed);
                        }
                        Renewal::Renewed { ttl_ms: r.ttl_ms.unwrap_or(ttl_ms), revision }
                    }
                },
                Err(oneshot::error::TryRecvError::Empty) if same => {
                    self.renewals.push(r);
                    continue;
                }
                // The barrier failed, or leadership (or its term) changed meanwhile.
                _ => Renewal::NotLeader { leader },
            };
            let _ = r.reply.send(answer);
        }
    }

    /// On the leader, once per term, before it renews or expires any lease: every lease's
    /// time to live starts again, and revocations of an earlier term are forgotten. Its
    /// deadlines until then are a follower's, blind to every keepalive the last leader
    /// took (whether or not the Ready that made this member leader was handled yet).
    /// Whether it did so now.
    fn take_over_leases(&mut self) -> bool {
        if self.leases_term == self.raw.raft.term {
            return false;
        }
        self.renew_all_leases();
        self.leases_term = self.raw.raft.term;
        true
    }

    /// The leader proposes the revocation of every lease past its deadline.
    fn expire_leases(&mut self, now: Instant) {
        if self.raw.raft.state != StateRole::Leader || self.stop_deadline.is_some() || self.disk_full {
            return;
        }
        if self.take_over_leases() {
            return;
        }
        let timeout = self.cfg.request_timeout;
        let expired: Vec<(u64, u64)> = self
            .lease_deadlines
            .iter()
            .filter(|(id, (deadline, _))| *deadline <= now && self.revoking.get(*id).is_none_or(|at| now.duration_since(*at) >= timeout))
            .map(|(id, (_, renewed))| (*id, *renewed))
            .collect();
        let mut proposed = Vec::with_capacity(expired.len());
        for (id, renewed) in expired {
            info!(lease = id, "lease expired; revoking it and its keys");
            let request_id = rand::random::<u64>();
            let cmd = Command { request_id, op: crate::kv::OpType::LeaseRevoke as i32, lease: id, lease_renewed: Some(renewed), ..Default::default() };
            // Nobody waits for the outcome; the receiver only tells whether raft took it.
            let (tx, rx) = oneshot::channel();
            if self.batch.push(request_id, cmd.encode_to_vec(), tx) {
                self.flush_proposals();
            }
            proposed.push((id, rx));
        }
        // Proposed now, while this member leads: a batch left for the next iteration
        // would be forwarded if leadership moved meanwhile, and the new leader, which
        // restarted every lease's time to live and may have acknowledged keepalives
        // since, would append an expiry decided from the old deadlines.
        self.flush_proposals();
        // Keepalives for a lease being revoked are answered "not found"; one raft
        // dropped (a leadership transfer under way) is not being revoked: it is tried
        // again at the next tick, and keepalives meanwhile go through the barrier.
        for (id, mut rx) in proposed {
            match rx.try_recv() {
                Ok(Err(e)) => debug!(lease = id, error = %e, "the lease's revocation was not proposed; trying again"),
                _ => {
                    self.revoking.insert(id, now);
                }
            }
        }
    }

    /// A removed voter that missed the entry removing it finds out when it campaigns:
    /// the members refuse its votes with 410 Gone. A learner never campaigns, and once
    /// removed nobody sends it anything (the leader drops it from replication, maybe
    /// before the entry reached it; or it was down and comes back with its old log), so
    /// it would wait forever. A learner that has heard from no peer for
    /// [`LEARNER_PROBE_AFTER`] therefore sends each voter a heartbeat response of its
    /// term: a member that knows of the removal answers 410 and this member stops as
    /// removed (`Request::Removed`); a leader that still counts it resumes replicating
    /// to it; a follower ignores it.
    fn probe_membership(&mut self, now: Instant) {
        let me = self.cfg.id;
        if self.removed || !self.conf_state.learners.contains(&me) || now < self.next_probe {
            return;
        }
        let last = self.last_heard.values().copied().fold(self.started, Instant::max);
        if now.duration_since(last) < LEARNER_PROBE_AFTER {
            return;
        }
        self.next_probe = now + LEARNER_PROBE_AFTER;
        let term = self.raw.raft.term;
        let probes: Vec<Message> = self
            .other_voters()
            .map(|to| Message {
                msg_type: MessageType::MsgHeartbeatResponse as i32,
                to,
                from: me,
                term,
                ..Default::default()
            })
            .collect();
        debug!(silent_ms = now.duration_since(last).as_millis() as u64, voters = probes.len(), "learner heard from nobody; asking the voters whether it is still a member");
        self.transport.send(probes);
    }

    fn issue_reads(&mut self, now: Instant) {
        // Re-issue contexts nobody answered (leader change, leader without a commit in its term).
        let stale: Vec<u64> = self
            .reads_inflight
            .iter()
            .filter(|(_, p)| now.duration_since(p.issued) >= READ_RETRY)
            .map(|(k, _)| *k)
            .collect();
        for ctx in stale {
            if let Some(p) = self.reads_inflight.remove(&ctx) {
                self.new_reads.extend(p.replies.into_iter().filter(|r| !r.is_closed()));
            }
        }
        if self.new_reads.is_empty() {
            return;
        }
        if self.raw.raft.leader_id == 0 {
            // Keep them queued; they are retried until their HTTP deadline passes.
            self.new_reads.retain(|r| !r.is_closed());
            return;
        }
        self.next_ctx = self.next_ctx.wrapping_add(1);
        let ctx = self.next_ctx;
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        let replies = std::mem::take(&mut self.new_reads);
        self.reads_inflight.insert(ctx, PendingRead { replies, issued: now });
    }

    fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.raw.has_ready() {
            return self.maybe_snapshot();
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        // A leader's own messages (appends, heartbeats) go out before its fsync: it may
        // replicate in parallel with its own write (raft thesis 10.2.1).
        if !rd.messages().is_empty() {
            self.transport.send(rd.take_messages());
        }
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.retry_no_space(|lp| lp.install_snapshot(snap.clone()))?;
        }
        for rs in rd.take_read_states() {
            let ctx = rs.request_ctx.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if let Some(p) = self.reads_inflight.remove(&ctx) {
                self.reads_ready.push((rs.index, p.replies));
            }
        }
        // Committed entries handed out by raft are already durable here, so they are
        // applied and answered before this Ready's own entries reach the disk.
        let committed = rd.take_committed_entries();
        self.apply(committed)?;
        self.answer_reads();
        if !rd.entries().is_empty() {
            self.storage.append(rd.entries())?;
        }
        if let Some(hs) = rd.hs() {
            self.storage.set_hard_state(hs)?;
            metrics().term.set(hs.term as i64);
        }
        let number = rd.number();
        let must_sync = rd.must_sync();
        let held = rd.take_persisted_messages();
        if !rd.snapshot().is_empty() {
            // Rare: persist synchronously, so raft knows the snapshot is durable before
            // the applied index moves to it. The fsync covers every queued Ready too.
            let took = self.retry_no_space(|lp| lp.storage.sync())?;
            self.raw.advance_append_async(rd);
            self.on_persisted(number, took);
            self.raw.on_persist_ready(number);
            self.transport.send(held);
            self.raw.advance_apply();
            return self.maybe_snapshot();
        }
        self.raw.advance_append_async(rd);
        self.raw.advance_apply();
        // Only new entries, a snapshot or a term/vote change need an fsync (etcd's
        // MustSync); a commit-index-only hard state rides along with the next fsync. The
        // fsync runs on the persist thread while this loop keeps stepping messages,
        // committing and applying. Messages that vouch for this Ready (a follower's
        // append response, a vote) wait until it is durable; Readies persist in order.
        if must_sync || !self.unpersisted.is_empty() {
            self.unpersisted.push_back(Unpersisted { number, needs_sync: must_sync, held });
            if must_sync && self.persist_tx.send(number).is_err() {
                return Err(StorageError::Io {
                    path: self.cfg.data_dir.clone(),
                    source: std::io::Error::other("the persist thread has stopped"),
                });
            }
        } else {
            self.raw.on_persist_ready(number);
            self.transport.send(held);
        }
        self.maybe_snapshot()?;
        Ok(())
    }

    /// The persist thread made every Ready up to `number` durable.
    fn on_persisted(&mut self, number: u64, took: Duration) {
        if self.disk_full {
            info!("the disk takes writes again");
            self.disk_full = false;
        }
        metrics().wal_fsync_seconds.observe(took.as_secs_f64());
        let mut durable = 0;
        while let Some(front) = self.unpersisted.front() {
            // Readies up to `number` were synced; a Ready right behind them that needed
            // no fsync of its own is durable as soon as they are.
            if front.number <= number || !front.needs_sync {
                durable = front.number;
                if let Some(u) = self.unpersisted.pop_front() {
                    self.transport.send(u.held);
                }
            } else {
                break;
            }
        }
        if durable > 0 {
            self.raw.on_persist_ready(durable);
        }
    }

    fn retry_no_space<T>(&mut self, mut op: impl FnMut(&mut Self) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match op(self) {
                Err(e) if e.is_no_space() && !self.shutdown.is_triggered() => {
                    warn!(error = %e, "disk full; retrying");
                    self.on_disk_full();
                    self.publish_status();
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                other => {
                    if other.is_ok() {
                        self.disk_full = false;
                    }
                    return other;
                }
            }
        }
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), StorageError> {
        let meta = snap.metadata.clone().unwrap_or_default();
        let mut kv = KvStore::new();
        let decoded = match self.decoded_snapshot.take() {
            Some((index, decoded)) if index == meta.index => {
                kv = decoded;
                Ok(())
            }
            _ => kv.restore(&snap.data),
        };
        if let Err(e) = decoded {
            // A leader sent an image we cannot read: refuse it rather than apply garbage.
            return Err(StorageError::Io {
                path: PathBuf::from("<snapshot from leader>"),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            });
        }
        self.storage.apply_snapshot(snap)?;
        kv.set_applied(meta.index);
        for (id, url) in kv.members() {
            if *id != self.cfg.id {
                self.transport.set_peer(*id, url);
            }
        }
        self.transport.set_cluster_id(kv.cluster_id());
        metrics().keys.set(kv.len() as i64);
        kv.record_events();
        kv.keep_previous_values(self.cfg.watch_prev_kv);
        *self.kv.write().map_err(lock_err)? = kv;
        // The changes between the old state and this one are not known here.
        self.watch.reset(meta.index);
        self.renew_all_leases();
        self.conf_state = meta.conf_state.unwrap_or_default();
        info!(index = meta.index, term = meta.term, "installed snapshot from leader");
        Ok(())
    }

    fn on_soft_state(&mut self, leader: u64, role: StateRole) {
        let m = metrics();
        m.has_leader.set((leader != 0) as i64);
        m.is_leader.set((role == StateRole::Leader) as i64);
        if leader != self.last_leader {
            if leader != 0 {
                m.leader_changes.inc();
            }
            info!(from = self.last_leader, to = leader, term = self.raw.raft.term, "leader changed");
            self.last_leader = leader;
            if leader == self.cfg.id {
                self.take_over_leases();
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&e)?,
                EntryType::EntryConfChangeV2 => match ConfChangeV2::decode(e.data.as_slice()) {
                    Ok(cc) => self.apply_conf_change(e.index, &cc, &cc.context.clone())?,
                    Err(err) => error!(index = e.index, error = %err, "undecodable conf change; skipped"),
                },
                EntryType::EntryConfChange => match ConfChange::decode(e.data.as_slice()) {
                    Ok(cc) => {
                        let ctx = cc.context.clone();
                        let v2 = ConfChangeV2 {
                            changes: vec![ConfChangeSingle { change_type: cc.change_type, node_id: cc.node_id }],
                            ..Default::default()
                        };
                        self.apply_conf_change(e.index, &v2, &ctx)?
                    }
                    Err(err) => error!(index = e.index, error = %err, "undecodable conf change; skipped"),
                },
            }
            if self.removed {
                break;
            }
        }
        let mut kv = self.kv.write().map_err(lock_err)?;
        metrics().keys.set(kv.len() as i64);
        let (events, applied) = (kv.take_events(), kv.applied());
        drop(kv);
        // Before the reads waiting for these entries are answered (`answer_reads`).
        self.watch.publish(events, applied);
        Ok(())
    }

    fn apply_normal(&mut self, e: &Entry) -> Result<(), StorageError> {
        let mut kv = self.kv.write().map_err(lock_err)?;
        if e.data.is_empty() {
            kv.set_applied(e.index);
            return Ok(());
        }
        match Command::decode(e.data.as_slice()) {
            Ok(cmd) => {
                let outcome = kv.apply(e.index, &cmd);
                if let ApplyOutcome::UnknownOp { op } = outcome {
                    // Going on would leave this member's state behind the newer members'
                    // while it answers reads: stop before applying anything after it.
                    // A restart stops here again until this member is upgraded.
                    error!(index = e.index, op, "a committed command has an operation this version does not know (a newer member proposed it); stopping: upgrade this member");
                    self.fatal = Some("a committed command has an operation this version does not know; upgrade this member");
                    return Err(StorageError::Io {
                        path: self.cfg.data_dir.clone(),
                        source: std::io::Error::other(format!("entry {} holds operation {op}, unknown to this version: upgrade this member", e.index)),
                    });
                }
                track_lease(&mut self.lease_deadlines, &mut self.revoking, &cmd, &outcome);
                self.forwarded_to.remove(&cmd.request_id);
                if let Some(w) = self.proposals.remove(&cmd.request_id) {
                    // What a client reads right after its answer includes its write.
                    metrics().keys.set(kv.len() as i64);
                    let _ = w.send(Ok(outcome));
                }
            }
            Err(err) => {
                error!(index = e.index, error = %err, "undecodable entry; skipped");
                kv.set_applied(e.index);
            }
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, index: u64, cc: &ConfChangeV2, ctx: &[u8]) -> Result<(), StorageError> {
        let ctx = ConfContext::decode(ctx).unwrap_or_default();
        let was_member = |id: u64, cs: &ConfState| cs.voters.contains(&id) || cs.learners.contains(&id);
        let before = self.conf_state.clone();
        let result = self.raw.apply_conf_change(cc);
        let mut kv = self.kv.write().map_err(lock_err)?;
        kv.set_applied(index);
        match result {
            Ok(cs) => {
                for ch in &cc.changes {
                    let id = ch.node_id;
                    match ch.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            if !was_member(id, &before) {
                                let mut m = match self.added_at.lock() {
                                    Ok(m) => m,
                                    Err(p) => p.into_inner(),
                                };
                                m.insert(id, index);
                                self.added_at_view = m.iter().map(|(k, v)| (*k, *v)).collect();
                                self.added_at_view.sort_unstable();
                            }
                            if !ctx.peer_url.is_empty() {
                                kv.set_member(id, ctx.peer_url.clone());
                                if id != self.cfg.id {
                                    self.transport.set_peer(id, &ctx.peer_url);
                                }
                            }
                            let role = if ch.get_change_type() == ConfChangeType::AddNode { "voter" } else { "learner" };
                            info!(index, member = id, role, url = %ctx.peer_url, "membership change applied: add");
                        }
                        ConfChangeType::RemoveNode => {
                            kv.remove_member(id);
                            if id != self.cfg.id {
                                self.transport.remove_peer(id);
                            }
                            info!(index, member = id, "membership change applied: remove");
                        }
                    }
                }
                drop(kv);
                self.conf_state = cs.clone();
                self.forwarded_to.remove(&ctx.request_id);
                if let Some(w) = self.conf_waiters.remove(&ctx.request_id) {
                    // The client's next request (often another membership change) must
                    // see this change in the published status, which would otherwise be
                    // refreshed only after the whole Ready.
                    self.publish_status();
                    let _ = w.send(Ok(cs));
                }
                let me_removed = cc
                    .changes
                    .iter()
                    .any(|c| c.node_id == self.cfg.id && c.get_change_type() == ConfChangeType::RemoveNode);
                if me_removed {
                    info!("this member was removed from the cluster; stopping");
                    self.mark_removed(&format!("removed by the conf change at index {index}"));
                }
            }
            Err(e) => {
                warn!(index, error = %e, "conf change rejected by raft");
                if let Some(w) = self.conf_waiters.remove(&ctx.request_id) {
                    let _ = w.send(Err(ProposeError::Refused(e.to_string())));
                }
            }
        }
        Ok(())
    }

    fn answer_reads(&mut self) {
        if self.reads_ready.is_empty() {
            return;
        }
        let applied = match self.kv.read() {
            Ok(kv) => kv.applied(),
            Err(_) => return,
        };
        let mut keep = Vec::new();
        for (index, replies) in self.reads_ready.drain(..) {
            if index <= applied {
                for r in replies {
                    let _ = r.send(Ok(()));
                }
            } else {
                keep.push((index, replies));
            }
        }
        self.reads_ready = keep;
    }

    /// Starts a snapshot when `--snapshot-count` entries were applied since the last one
    /// (or raft needs a fresh one for a new member). The state is frozen with an O(1)
    /// clone; encoding and writing happen on a helper thread, so the loop keeps going.
    /// The helper also compacts the log once the snapshot is saved (deleting files can
    /// take long on a busy disk), then reports back ([`Request::SnapshotSaved`]).
    fn maybe_snapshot(&mut self) -> Result<(), StorageError> {
        if self.snapshot_in_flight {
            return Ok(());
        }
        if let Some((until, _)) = self.snapshot_retry {
            if Instant::now() < until {
                return Ok(());
            }
        }
        let applied = self.raw.raft.raft_log.applied;
        let last_snap = self.storage.snapshot_index();
        let wanted = self.want_snapshot.load(Ordering::Relaxed);
        // A follower needs a full image, and the one in force is a delta: make a full one
        // even with nothing applied since.
        let upgrade = wanted && applied == last_snap && self.storage.in_force_is_delta();
        if applied < last_snap
            || (applied == last_snap && !upgrade)
            || (applied - last_snap < self.cfg.snapshot_count && !wanted)
        {
            return Ok(());
        }
        self.want_snapshot.store(false, Ordering::Relaxed);
        // The snapshot must never be ahead of the durable commit index (raft-rs refuses
        // to start with applied > commit).
        self.retry_no_space(|lp| lp.storage.sync())?;
        // A delta unless a follower wants a full image, or the deltas since the last full
        // one add up to its size (restarts then apply at most that much on top of it).
        let (full_bytes, delta_bytes, deltas) = self.storage.snapshot_chain_bytes();
        let try_delta = !wanted && delta_bytes < full_bytes && deltas < MAX_DELTAS;
        let image = self.kv.write().map_err(lock_err)?.take_image(try_delta.then_some(last_snap));
        let index = image.applied();
        let conf_state = self.conf_state.clone();
        let storage = self.storage.clone();
        let tx = self.self_tx.clone();
        let keep = CATCH_UP_ENTRIES.min(self.cfg.snapshot_count);
        let spawned = std::thread::Builder::new().name("snapshot".into()).spawn(move || {
            let len = image.encoded_len() as u64;
            let delta = image.delta_base();
            let result = match delta {
                Some(base) => storage.save_delta_streamed(index, base, &conf_state, len, |w| image.encode_to(w)),
                None => storage.save_snapshot_streamed(index, &conf_state, len, |w| image.encode_to(w)),
            };
            drop(image);
            if result.is_ok() {
                let kind = if delta.is_some() { "delta" } else { "full" };
                metrics().snapshots_saved.with_label_values(&[kind]).inc();
            }
            let compacted = result.is_ok().then(|| {
                let compact_to = index.saturating_sub(keep).max(1);
                (compact_to, storage.compact(compact_to))
            });
            let _ = tx.send(Request::SnapshotSaved { index, result, compacted, full: delta.is_none() });
        });
        match spawned {
            Ok(_) => self.snapshot_in_flight = true,
            Err(e) => warn!(error = %e, "cannot start the snapshot thread; will retry"),
        }
        Ok(())
    }

    fn on_snapshot_saved(
        &mut self,
        index: u64,
        result: Result<Duration, StorageError>,
        compacted: Option<(u64, Result<(), StorageError>)>,
        full: bool,
    ) {
        self.snapshot_in_flight = false;
        if full && result.is_ok() {
            // Followers that asked for a full snapshot while this one was being made get
            // it now; one that still needs a newer one asks again.
            self.want_snapshot.store(false, Ordering::Relaxed);
        }
        match result {
            Ok(took) => {
                self.snapshot_retry = None;
                metrics().snapshot_save_seconds.observe(took.as_secs_f64());
                let compact_to = match compacted {
                    Some((to, Ok(()))) => to,
                    Some((to, Err(e))) => {
                        warn!(error = %e, compact_to = to, "log compaction failed; will retry after the next snapshot");
                        0
                    }
                    None => 0,
                };
                info!(index, compacted_to = compact_to, took_ms = took.as_millis() as u64, "snapshot saved, log compacted");
            }
            // A snapshot installed from the leader meanwhile makes ours moot; a full disk
            // is retried at the next trigger. Neither is fatal: the WAL still holds it all.
            // After a failure (a full disk) the next attempt waits, backing off from
            // 100 ms to 10 s, rather than being retried at every loop iteration.
            Err(e) => {
                let backoff = self.snapshot_retry.map_or(Duration::from_millis(100), |(_, b)| (b * 2).min(Duration::from_secs(10)));
                warn!(index, error = %e, retry_in_ms = backoff.as_millis() as u64, "snapshot not saved");
                self.snapshot_retry = Some((Instant::now() + backoff, backoff));
            }
        }
    }

    /// The disk is full: waiting writes may or may not get committed (they are in the
    /// log); new ones are refused until a write to the disk succeeds again.
    fn on_disk_full(&mut self) {
        if !self.disk_full {
            warn!("disk full: refusing new writes until space returns");
        }
        self.disk_full = true;
        self.fail_all(|proposed| ProposeError::DiskFull { proposed });
    }

    /// Why a membership change cannot be proposed now, on a leader: raft-rs takes one
    /// at a time and turns another into an empty entry, silently (its proposer would
    /// wait out the request timeout). `pending_conf_index` is set by a conf change
    /// proposed in this term (its index has this term), or by the election to the last
    /// index of earlier terms (the leader must apply its log up to there first).
    ///
    /// `applied`: raft-rs's applied index when deciding (the loop between Readys), or the
    /// state machine's when publishing the status in the middle of applying a Ready (raft-rs
    /// learns of the applied entries at its end; the change just applied is not pending).
    fn conf_change_refusal(&self, applied: u64) -> Option<ProposeError> {
        let r = &self.raw.raft;
        if r.state != StateRole::Leader || r.pending_conf_index <= applied {
            return None;
        }
        let this_term = r.raft_log.term(r.pending_conf_index).is_ok_and(|t| t == r.term);
        Some(if this_term { ProposeError::ConfChangeInProgress } else { ProposeError::LeaderNotReady })
    }

    /// raft-rs sets `pending_conf_index` to the index a membership change would get
    /// before appending it; when the append is then refused (the uncommitted-size limit)
    /// it names an entry that never existed, and raft-rs would refuse every change until
    /// the log grows that far. Nothing beyond the log's end can be pending.
    fn clamp_pending_conf(&mut self) {
        // The refused change was accepted only because none was pending (the index was at
        // most the applied one): that is exactly where it goes back to.
        let (last, applied) = (self.raw.raft.raft_log.last_index(), self.raw.raft.raft_log.applied);
        if self.raw.raft.pending_conf_index > last {
            debug!(pending = self.raw.raft.pending_conf_index, last, applied, "pending conf index beyond the log (a dropped append); reset");
            self.raw.raft.pending_conf_index = applied;
        }
    }

    /// Fails every waiting command with `err(proposed)`: `proposed` is false for the
    /// commands still gathered in the batch (never proposed), true for the rest (their
    /// outcome is unknown: the other members may still commit them).
    fn fail_all(&mut self, err: impl Fn(bool) -> ProposeError) {
        if let Some((_, replies)) = self.batch.take() {
            for (_, w) in replies {
                let _ = w.send(Err(err(false)));
                metrics().proposals_failed.inc();
            }
        }
        self.forwarded_to.clear();
        for (_, w) in self.proposals.drain() {
            let _ = w.send(Err(err(true)));
            metrics().proposals_failed.inc();
        }
        for (_, w) in self.conf_waiters.drain() {
            let _ = w.send(Err(err(true)));
        }
    }

    fn current_status(&self) -> Arc<NodeStatus> {
        match self.status.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn store_status(&self, st: NodeStatus) {
        let m = metrics();
        m.proposals_committed.set(st.commit_index as i64);
        m.proposals_applied.set(st.applied_index as i64);
        m.wal_bytes.set(st.wal_bytes as i64);
        m.snapshot_bytes.set(self.storage.snapshot_bytes() as i64);
        m.snapshot_index.set(st.snapshot_index as i64);
        match self.status.write() {
            Ok(mut s) => *s = Arc::new(st),
            Err(p) => *p.into_inner() = Arc::new(st),
        }
    }

    fn publish_status(&mut self) {
        let r = &self.raw.raft;
        let role = match r.state {
            StateRole::Leader => "leader",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre_candidate",
            StateRole::Follower if self.conf_state.learners.contains(&self.cfg.id) => "learner",
            StateRole::Follower => "follower",
        };
        let now = Instant::now();
        let progress = if r.state == StateRole::Leader {
            let mut v: Vec<PeerProgress> = r
                .prs()
                .iter()
                .map(|(id, p)| PeerProgress { id: *id, match_index: p.matched, recent_active: self.reachable(*id, now) })
                .collect();
            v.sort_by_key(|p| p.id);
            v
        } else {
            Vec::new()
        };
        let (member_urls, kv_applied) = match self.kv.read() {
            Ok(kv) => (kv.members().iter().map(|(k, v)| (*k, v.clone())).collect(), kv.applied()),
            Err(_) => (Vec::new(), 0),
        };
        let applied = r.raft_log.applied.max(kv_applied);
        let mut voters = self.conf_state.voters.clone();
        voters.sort_unstable();
        let mut learners = self.conf_state.learners.clone();
        learners.sort_unstable();
        let st = NodeStatus {
            id: self.cfg.id,
            leader: if self.stop_deadline.is_some() && self.raw.raft.leader_id == self.cfg.id { 0 } else { r.leader_id },
            term: r.term,
            role,
            commit_index: r.raft_log.committed,
            applied_index: r.raft_log.applied,
            snapshot_index: self.storage.snapshot_index(),
            wal_bytes: self.storage.wal_bytes(),
            voters,
            learners,
            member_urls,
            progress,
            incarnation: self.incarnation,
            stopping: self.stop_deadline.is_some() || self.removed,
            lost_log: self.lost_log,
            added_at: self.added_at_view.clone(),
            disk_full: self.disk_full,
            conf_change_pending: self.conf_change_refusal(applied) == Some(ProposeError::ConfChangeInProgress),
        };
        self.store_status(st);
    }
}


/// Fault hook for tests: `RAFTKV_FAULT_SYNC_DELAY_MS=N` makes every WAL sync of the
/// persist thread start N ms late (at most 10 s), as a slow disk would: a member whose
/// own fsync lags its followers'. Logged at start-up; unset in production.
fn sync_delay() -> Option<Duration> {
    let ms: u64 = std::env::var("RAFTKV_FAULT_SYNC_DELAY_MS").ok()?.parse().ok()?;
    let d = Duration::from_millis(ms.min(10_000));
    warn!(delay_ms = d.as_millis() as u64, "fault hook RAFTKV_FAULT_SYNC_DELAY_MS: every WAL sync starts late");
    Some(d)
}

/// Makes buffered WAL records durable off the raft loop. Requests (Ready numbers) that
/// queue up while an fsync runs are served by the next one (group commit); the loop is
/// told the highest Ready number covered. A full disk is retried until space returns.
fn persist_thread(storage: DiskStorage, rx: Receiver<u64>, raft: Sender<Request>, shutdown: Shutdown) {
    let delay = sync_delay();
    while let Ok(mut number) = rx.recv() {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        while let Ok(n) = rx.try_recv() {
            number = number.max(n);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match storage.sync() {
                Ok(took) => {
                    if raft.send(Request::Persisted { number, took }).is_err() {
                        return;
                    }
                    break;
                }
                Err(e) if e.is_no_space() && !shutdown.is_triggered() => {
                    warn!(error = %e, "disk full; retrying the WAL fsync");
                    let _ = raft.send(Request::DiskFull);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    let _ = raft.send(Request::PersistFailed(e));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proposal_batch_fills_at_its_byte_bound_and_empties_when_taken() {
        let mut batch = ProposalBatch::default();
        assert!(batch.take().is_none(), "an empty batch proposes nothing");
        let chunk = 64 << 10;
        let mut pushed = 0usize;
        loop {
            let (tx, _rx) = oneshot::channel();
            pushed += 1;
            if batch.push(pushed as u64, vec![pushed as u8; chunk], tx) {
                break;
            }
            assert!(pushed * chunk < PROPOSAL_BATCH_BYTES, "not reported full at {} bytes", pushed * chunk);
        }
        assert_eq!(pushed * chunk, PROPOSAL_BATCH_BYTES);
        let (entries, replies) = batch.take().expect("a full batch");
        assert_eq!(entries.len(), pushed);
        // Entries keep the order the commands came in, each beside its own waiter.
        for (i, (e, (id, _))) in entries.iter().zip(&replies).enumerate() {
            assert_eq!(*id, i as u64 + 1);
            assert_eq!(e.data[0], (i + 1) as u8);
            assert_eq!(e.data.len(), chunk);
        }
        assert!(batch.take().is_none(), "taking empties the batch");
        let (tx, _rx) = oneshot::channel();
        assert!(!batch.push(99, vec![0; 10], tx), "the byte count starts over");
    }

    #[test]
    fn lease_deadlines_never_overflow_the_clock() {
        let now = Instant::now();
        assert_eq!(lease_deadline(now, 1500), now + Duration::from_millis(1500));
        assert!(lease_deadline(now, u64::MAX) > now + Duration::from_secs(3600 * 24 * 365));
        let mut deadlines = HashMap::new();
        let mut revoking = HashMap::new();
        let grant = Command { op: crate::kv::OpType::LeaseGrant as i32, lease: 3, ttl_ms: u64::MAX, ..Default::default() };
        track_lease(&mut deadlines, &mut revoking, &grant, &ApplyOutcome::LeaseKept { revision: 1, ttl_ms: u64::MAX });
        assert!(deadlines.contains_key(&3));
        let revoke = Command { op: crate::kv::OpType::LeaseRevoke as i32, lease: 3, ..Default::default() };
        // A void expiry revocation (renewed meanwhile) keeps the renewal's deadline.
        revoking.insert(3, now);
        track_lease(&mut deadlines, &mut revoking, &revoke, &ApplyOutcome::LeaseMismatch { exists: true });
        assert!(deadlines.contains_key(&3) && revoking.is_empty());
        revoking.insert(3, now);
        track_lease(&mut deadlines, &mut revoking, &revoke, &ApplyOutcome::KeysRemoved { revision: 2, deleted: 0 });
        assert!(deadlines.is_empty() && revoking.is_empty());
    }

    #[test]
    fn a_forwarded_proposal_is_read_in_one_pass() {
        use prost::Message as _;
        let cmd = |id: u64| Entry {
            data: Command { request_id: id, op: 0, key: "k".into(), value: vec![7; 300], prev_revision: None, ..Default::default() }.encode_to_vec(),
            ..Default::default()
        };
        let ctx = |id: u64| ConfContext { request_id: id, peer_url: "http://a:1".into() }.encode_to_vec();
        let v2 = Entry {
            entry_type: EntryType::EntryConfChangeV2 as i32,
            data: ConfChangeV2 { context: ctx(7), ..Default::default() }.encode_to_vec(),
            ..Default::default()
        };
        let v1 = Entry {
            entry_type: EntryType::EntryConfChange as i32,
            data: ConfChange { context: ctx(8), ..Default::default() }.encode_to_vec(),
            ..Default::default()
        };
        let empty = Entry::default();
        assert_eq!(scan_forwarded(&[cmd(3), cmd(4)]).ids, [3, 4]);
        assert!(!scan_forwarded(&[cmd(3), empty.clone()]).conf_change);
        assert_eq!(scan_forwarded(&[v2.clone(), v1.clone(), empty]).ids, [7, 8]);
        assert!(scan_forwarded(&[v2]).conf_change && scan_forwarded(&[v1]).conf_change);
        // Garbage names nothing (and never panics).
        let junk = Entry { data: vec![0xff; 9], ..Default::default() };
        assert!(scan_forwarded(&[junk]).ids.is_empty());
        // Commands this version cannot apply: an unknown op, or a transaction holding a
        // write of an unknown kind.
        use crate::kv::{OpType, Txn, TxnOp};
        let txn = |op: i32| Entry {
            data: Command {
                request_id: 9,
                op: OpType::Txn as i32,
                txn: Some(Txn { success: vec![TxnOp { op, key: "k".into(), value: vec![], lease: 0 }], ..Default::default() }),
                ..Default::default()
            }
            .encode_to_vec(),
            ..Default::default()
        };
        assert!(!scan_forwarded(&[cmd(3), txn(OpType::Put as i32)]).unknown_command);
        assert!(scan_forwarded(&[cmd(3), txn(OpType::Txn as i32)]).unknown_command);
        let odd = Entry { data: Command { request_id: 5, op: 99, ..Default::default() }.encode_to_vec(), ..Default::default() };
        assert!(scan_forwarded(&[odd]).unknown_command);
        // A lease expiry decided by a (former) leader, and a client's revocation.
        let revoke = |renewed: Option<u64>| Entry {
            data: Command { request_id: 6, op: OpType::LeaseRevoke as i32, lease: 4, lease_renewed: renewed, ..Default::default() }
                .encode_to_vec(),
            ..Default::default()
        };
        assert!(scan_forwarded(&[cmd(3), revoke(Some(12))]).expiry);
        assert!(!scan_forwarded(&[cmd(3), revoke(None)]).expiry, "a client may revoke through a follower");
        assert!(!scan_forwarded(&[cmd(3)]).expiry);
    }
}
