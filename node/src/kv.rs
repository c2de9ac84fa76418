//! The key-value state machine, decoupled from raft (as raftexample's kvstore).
//!
//! It applies committed [`Command`]s in log order and knows the cluster's member URLs
//! (carried in conf-change contexts). Its whole state serializes into a snapshot.
//! Revisions are raft log indexes: a value's revision is the index of the entry that
//! last wrote it.
//!
//! Pairs live in a persistent ordered set (`imbl::OrdSet`), so taking a snapshot is an
//! O(1) clone of them (leases are copied: a cost in the number of leased keys): the
//! image is encoded and written on another thread while the raft loop keeps applying. Each pair (key, value, revision) is one allocation behind a
//! reference count ([`Pair`]): the store costs little beyond the bytes it holds.
//!
//! An image is full (version 1: every pair) or a delta (version 2: the pairs written
//! and the keys deleted since the image at `base_index`, plus the members). The store
//! remembers which pairs changed since the last image it took or restored, so a delta
//! costs what changed, not what is stored ([`KvStore::take_image`]).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;

/// What a command does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum OpType {
    /// Set a key.
    Put = 0,
    /// Remove a key.
    Delete = 1,
    /// A transaction: compares, then the writes of one branch (`Command::txn`).
    Txn = 2,
    /// Remove every key starting with `Command::key` (a non-empty prefix).
    DeletePrefix = 3,
    /// Create lease `Command::lease` with `Command::ttl_ms`.
    LeaseGrant = 4,
    /// Remove lease `Command::lease` and every key attached to it (expiry, or a client).
    LeaseRevoke = 5,
    /// Renew lease `Command::lease`: its time to live starts again where it is applied.
    LeaseKeepAlive = 6,
    /// Read a key: an operation of a transaction's branch (`TxnOp`), whose result
    /// carries the key's value at that point of the branch. As a command of its own it
    /// changes nothing (the API never proposes one).
    Get = 7,
    /// A put attaching its key to a lease (`TxnOp::lease`), inside a transaction: a kind
    /// of its own, so that a member that could not attach it refuses the transaction
    /// (stops) instead of applying it without the lease. As a command of its own, a put
    /// with `Command::lease`.
    LeasedPut = 8,
}

/// A client command as stored in a raft entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    /// Proposer-chosen request id, so the proposer can find its waiter.
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// The operation.
    #[prost(enumeration = "OpType", tag = "2")]
    pub op: i32,
    /// The key.
    #[prost(string, tag = "3")]
    pub key: String,
    /// The value (puts).
    #[prost(bytes = "vec", tag = "4")]
    pub value: Vec<u8>,
    /// Compare-and-swap precondition: the key's current revision must equal this (0 = absent).
    #[prost(uint64, optional, tag = "5")]
    pub prev_revision: Option<u64>,
    /// A transaction's compares and branches ([`OpType::Txn`] only).
    #[prost(message, optional, tag = "6")]
    pub txn: Option<Txn>,
    /// A put: the lease the key is attached to (0: none). Lease commands: the lease.
    #[prost(uint64, tag = "7")]
    pub lease: u64,
    /// [`OpType::LeaseGrant`]: the lease's time to live.
    #[prost(uint64, tag = "8")]
    pub ttl_ms: u64,
    /// [`OpType::LeaseRevoke`] of an expired lease: revoke it only if its last grant or
    /// renewal is still the entry at this index (a renewal applied in between wins).
    #[prost(uint64, optional, tag = "9")]
    pub lease_renewed: Option<u64>,
}

/// A lease as snapshots hold it: its id, time to live and keys.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRecord {
    /// Lease id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Time to live.
    #[prost(uint64, tag = "2")]
    pub ttl_ms: u64,
    /// Keys attached to it, in order.
    #[prost(string, repeated, tag = "3")]
    pub keys: Vec<String>,
    /// Index of the entry that granted or last renewed it.
    #[prost(uint64, tag = "4")]
    pub renewed: u64,
}

/// A lease in the state machine.
#[derive(Debug, Clone, Default)]
struct LeaseState {
    ttl_ms: u64,
    /// Index of the entry that granted or last renewed it.
    renewed: u64,
    keys: BTreeSet<String>,
}

/// A transaction, as etcd's: if every compare holds, the `success` writes are applied,
/// otherwise the `failure` writes; all at one revision (the entry's index), atomically.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Txn {
    /// Conditions on the current state.
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<TxnCompare>,
    /// Writes when every compare holds.
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<TxnOp>,
    /// Writes otherwise.
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<TxnOp>,
}

/// One condition of a [`Txn`]; the ones given must all hold.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnCompare {
    /// The key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The key's revision equals this (0: the key is absent).
    #[prost(uint64, optional, tag = "2")]
    pub revision: Option<u64>,
    /// The key exists and holds exactly these bytes.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub value: Option<Vec<u8>>,
}

/// One operation of a [`Txn`]'s branch: a put, a delete or a get.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnOp {
    /// [`OpType::Put`], [`OpType::LeasedPut`], [`OpType::Delete`] or [`OpType::Get`].
    #[prost(enumeration = "OpType", tag = "1")]
    pub op: i32,
    /// The key.
    #[prost(string, tag = "2")]
    pub key: String,
    /// The value (puts).
    #[prost(bytes = "vec", tag = "3")]
    pub value: Vec<u8>,
    /// [`OpType::LeasedPut`]: the lease the key is attached to.
    #[prost(uint64, tag = "4")]
    pub lease: u64,
}

/// Context attached to a conf change: who asked, and the new member's URL.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfContext {
    /// Proposer-chosen request id.
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// Peer URL of an added member.
    #[prost(string, tag = "2")]
    pub peer_url: String,
}

/// One stored value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredValue {
    /// Key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Value bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    /// Revision (index of the entry that last wrote it).
    #[prost(uint64, tag = "3")]
    pub revision: u64,
}

/// A member's address as the state machine knows it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MemberRecord {
    /// Raft id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Peer URL.
    #[prost(string, tag = "2")]
    pub peer_url: String,
}

/// Version of a full [`SnapshotImage`].
pub const FULL_IMAGE: u32 = 1;
/// Version of a delta [`SnapshotImage`].
pub const DELTA_IMAGE: u32 = 2;

/// The state machine image inside a snapshot.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotImage {
    /// Format version: [`FULL_IMAGE`] or [`DELTA_IMAGE`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Applied index the image reflects.
    #[prost(uint64, tag = "2")]
    pub applied_index: u64,
    /// All keys, in order (a delta: the keys written since the base, in order).
    #[prost(message, repeated, tag = "3")]
    pub values: Vec<StoredValue>,
    /// Member URLs.
    #[prost(message, repeated, tag = "4")]
    pub members: Vec<MemberRecord>,
    /// Ids removed from the cluster (their messages are refused).
    #[prost(uint64, repeated, tag = "5")]
    pub removed: Vec<u64>,
    /// A delta: the applied index of the image it applies on top of.
    #[prost(uint64, tag = "6")]
    pub base_index: u64,
    /// A delta: the keys deleted since the base, in order.
    #[prost(string, repeated, tag = "7")]
    pub deleted: Vec<String>,
    /// The cluster's id, fixed when it was bootstrapped (see
    /// [`crate::config::cluster_id`]); 0 in images written before cluster ids.
    #[prost(uint64, tag = "8")]
    pub cluster_id: u64,
    /// Every lease with its keys (in full in deltas too, like the members).
    #[prost(message, repeated, tag = "9")]
    pub leases: Vec<LeaseRecord>,
}

/// Result of applying a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied; the new revision (the entry index).
    Applied {
        /// Entry index.
        revision: u64,
        /// For deletes: whether the key existed.
        existed: bool,
    },
    /// The compare-and-swap precondition failed; the key's current revision (0 = absent).
    PreconditionFailed {
        /// Current revision.
        current: u64,
    },
    /// A transaction was applied: which branch ran, and what each of its operations
    /// did.
    Txn {
        /// Entry index: the revision of every write of the transaction.
        revision: u64,
        /// Whether every compare held (the `success` branch ran).
        succeeded: bool,
        /// Per operation of the branch that ran, in order.
        results: Vec<TxnResult>,
    },
    /// The lease a command names does not exist (a put attaching a key to it, a
    /// revoke, a renewal), or (a grant) already does, or (a revocation on expiry) was
    /// renewed after the leader decided to revoke it. Nothing was changed.
    LeaseMismatch {
        /// Whether the lease exists.
        exists: bool,
    },
    /// A lease was granted or renewed; its time to live.
    LeaseKept {
        /// Entry index.
        revision: u64,
        /// Time to live.
        ttl_ms: u64,
    },
    /// Keys under a prefix (or a revoked lease's keys) were removed.
    KeysRemoved {
        /// Entry index.
        revision: u64,
        /// How many keys were removed.
        deleted: u64,
    },
    /// The command's operation is unknown to this version; nothing was changed, not
    /// even the applied index.
    UnknownOp {
        /// The operation's number.
        op: i32,
    },
}

/// What one operation of an applied transaction's branch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnResult {
    /// A put or a delete: whether its key existed before it.
    Wrote {
        /// Whether the key existed before the write.
        existed: bool,
    },
    /// A get: the key's value and lease at that point of the branch (after the
    /// branch's earlier writes), or `None` when it was absent.
    Read(Option<(Value, Option<u64>)>),
}

/// A value read from the store. Its bytes are shared with the store, not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// Bytes.
    pub data: Bytes,
    /// Revision.
    pub revision: u64,
}

/// One applied change to a key, as watchers see it (`crate::watch`): a put with the new
/// value, or a delete. Its revision is the raft index of the entry that made it. Cloning
/// is a reference count: the pair is shared with the store (or, for a delete, is the
/// pair the delete removed).
#[derive(Clone)]
pub struct Event {
    pair: Pair,
    /// A put over an existing key: the pair it replaced (etcd's `prev_kv`).
    prev: Option<Pair>,
    revision: u64,
    deleted: bool,
}

impl Event {
    /// The key changed.
    pub fn key(&self) -> &str {
        self.pair.key()
    }
    /// The raft index of the change.
    pub fn revision(&self) -> u64 {
        self.revision
    }
    /// The new value (its revision is the event's), or None for a delete.
    pub fn value(&self) -> Option<Value> {
        (!self.deleted).then(|| self.pair.value())
    }
    /// The key's value before the change (etcd's `prev_kv`): for a put, what it
    /// replaced (None for a new key, or when the store keeps no previous values:
    /// [`KvStore::keep_previous_values`]); for a delete, what it removed.
    pub fn prev(&self) -> Option<Value> {
        if self.deleted {
            Some(self.pair.value())
        } else {
            self.prev.as_ref().map(Pair::value)
        }
    }
    /// Bytes this event keeps alive (key and values), for bounding a history of events.
    pub fn size(&self) -> usize {
        self.pair.bytes.len() + self.prev.as_ref().map_or(0, |p| p.bytes.len())
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}@{}", if self.deleted { "delete" } else { "put" }, self.key(), self.revision)
    }
}

/// Errors decoding state-machine data.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// An entry or snapshot that does not decode.
    #[error("undecodable {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Cause.
        source: prost::DecodeError,
    },
    /// A snapshot image of an unknown (or, where a full one is needed, delta) version.
    #[error("unknown snapshot image version {0}")]
    Version(u32),
    /// An image whose values are malformed (decoded by hand: see [`decode_image`]).
    #[error("undecodable snapshot image: {0}")]
    BadImage(&'static str),
    /// A delta image that does not apply on top of the current state.
    #[error("delta snapshot image applies on top of index {base}, but the state is at index {applied}")]
    DeltaBase {
        /// The delta's base index.
        base: u64,
        /// The state's applied index.
        applied: u64,
    },
}

/// Whether this version knows operation `op` and every write of `txn`: a leader refuses
/// to append a command its members could not apply.
pub fn is_known(op: i32, txn: Option<&Txn>) -> bool {
    OpType::from_i32(op).is_some() && unknown_txn_op(txn).is_none()
}

/// A transaction's operation that is not a put, a delete or a get (one this version
/// does not know): nothing of the transaction may be applied.
fn unknown_txn_op(txn: Option<&Txn>) -> Option<i32> {
    let txn = txn?;
    txn.success.iter().chain(&txn.failure).map(|o| o.op).find(|op| !matches!(OpType::from_i32(*op), Some(OpType::Put | OpType::LeasedPut | OpType::Delete | OpType::Get)))
}

/// Changes tracked for a delta never exceed half the store (then a full image is no
/// bigger), or this many when the store is small.
const MIN_TRACKED: usize = 1024;

/// One stored key-value pair in a single allocation:
/// `[revision: u64 LE][key length: u32 LE][key][value]`. Cloning is a reference count.
/// Pairs are ordered, and looked up through `Borrow<[u8]>`, by the key's bytes, which
/// for UTF-8 keys is the order of the keys as strings.
///
/// The key's first 8 bytes are also kept beside the pointer (`head`, big-endian, zero
/// padded), so most comparisons while a pair is inserted are decided without reading
/// the other pair's allocation: a B-tree insert of 100k keys compares about 17 pairs,
/// and each read of a cold allocation is a cache miss (`Pair::cmp` was the raft
/// loop's largest user-space cost under PUT load).
#[derive(Clone)]
struct Pair {
    head: u64,
    bytes: Arc<[u8]>,
}

/// The first 8 bytes of `key`, zero padded, as a big-endian number: for keys `a < b`,
/// `key_head(a) <= key_head(b)`, so equal heads fall back to comparing the keys.
fn key_head(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

/// Bytes before the key in a [`Pair`].
const PAIR_HEADER: usize = 12;

impl Pair {
    fn new(key: &str, value: &[u8], revision: u64) -> Pair {
        let klen = (key.len() as u32).to_le_bytes();
        let rev = revision.to_le_bytes();
        // A chain of slices has an exact length: collected straight into the Arc.
        let bytes: Arc<[u8]> = rev.iter().chain(&klen).chain(key.as_bytes()).chain(value).copied().collect();
        Pair { head: key_head(key.as_bytes()), bytes }
    }

    fn revision(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[..8]);
        u64::from_le_bytes(b)
    }

    fn key_len(&self) -> usize {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[8..PAIR_HEADER]);
        u32::from_le_bytes(b) as usize
    }

    fn key_bytes(&self) -> &[u8] {
        &self.bytes[PAIR_HEADER..PAIR_HEADER + self.key_len()]
    }

    /// The key; pairs are only ever made from `&str` keys.
    fn key(&self) -> &str {
        std::str::from_utf8(self.key_bytes()).unwrap_or_default()
    }

    fn value_bytes(&self) -> &[u8] {
        &self.bytes[PAIR_HEADER + self.key_len()..]
    }

    /// The value as [`Bytes`] sharing this pair's allocation.
    fn value(&self) -> Value {
        let start = PAIR_HEADER + self.key_len();
        Value { data: Bytes::from_owner(self.bytes.clone()).slice(start..), revision: self.revision() }
    }
}

impl Borrow<[u8]> for Pair {
    fn borrow(&self) -> &[u8] {
        self.key_bytes()
    }
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.head == other.head && self.key_bytes() == other.key_bytes()
    }
}

impl Eq for Pair {}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pair {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.head.cmp(&other.head).then_with(|| self.key_bytes().cmp(other.key_bytes()))
    }
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}@{} ({} bytes)", self.key(), self.revision(), self.value_bytes().len())
    }
}

/// The state machine.
#[derive(Debug, Default)]
pub struct KvStore {
    data: imbl::OrdSet<Pair>,
    members: BTreeMap<u64, String>,
    removed: BTreeSet<u64>,
    applied: u64,
    /// The cluster's id (0: not known, a member still joining or data from before
    /// cluster ids).
    cluster_id: u64,
    /// Pairs written (the new pair) or deleted (the old one) since the image at
    /// `changes_since`, repeats included: what the next delta holds.
    changes: Vec<Pair>,
    /// Applied index of the last image taken or restored, while changes are tracked
    /// (None: not tracked, the next image is full).
    changes_since: Option<u64>,
    /// Changes applied since the raft loop last took them ([`KvStore::take_events`]),
    /// when it asked for them ([`KvStore::record_events`]).
    events: Option<Vec<Event>>,
    /// Whether a put's event keeps the pair it replaced ([`KvStore::keep_previous_values`]).
    events_prev: bool,
    /// Leases: time to live in ms and attached keys.
    leases: BTreeMap<u64, LeaseState>,
    /// The lease each attached key belongs to.
    key_lease: std::collections::HashMap<String, u64>,
}

impl KvStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Index of the last applied entry.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Records that entries up to `index` have been applied (no-op or conf entries).
    pub fn set_applied(&mut self, index: u64) {
        if index > self.applied {
            self.applied = index;
        }
    }

    /// Applies a decoded command at `index`.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> ApplyOutcome {
        let Some(op) = OpType::from_i32(cmd.op) else {
            // Not a command this version knows (a newer member proposed it): nothing is
            // applied, not even the index. The caller must stop rather than go on with a
            // state the newer members do not have.
            return ApplyOutcome::UnknownOp { op: cmd.op };
        };
        if let Some(unknown) = unknown_txn_op(cmd.txn.as_ref()) {
            return ApplyOutcome::UnknownOp { op: unknown };
        }
        self.set_applied(index);
        if let Some(expect) = cmd.prev_revision {
            let current = self.data.get(cmd.key.as_bytes()).map(Pair::revision).unwrap_or(0);
            if expect != current {
                return ApplyOutcome::PreconditionFailed { current };
            }
        }
        if matches!(op, OpType::Put | OpType::LeasedPut) && cmd.lease != 0 && !self.leases.contains_key(&cmd.lease) {
            return ApplyOutcome::LeaseMismatch { exists: false };
        }
        match op {
            OpType::Put | OpType::LeasedPut => {
                let existed = self.put(index, &cmd.key, &cmd.value);
                if cmd.lease != 0 {
                    self.attach(&cmd.key, cmd.lease);
                }
                ApplyOutcome::Applied { revision: index, existed }
            }
            OpType::LeaseGrant => {
                if cmd.lease == 0 || self.leases.contains_key(&cmd.lease) {
                    return ApplyOutcome::LeaseMismatch { exists: cmd.lease != 0 };
                }
                self.leases.insert(cmd.lease, LeaseState { ttl_ms: cmd.ttl_ms, renewed: index, keys: BTreeSet::new() });
                ApplyOutcome::LeaseKept { revision: index, ttl_ms: cmd.ttl_ms }
            }
            OpType::LeaseKeepAlive => match self.leases.get_mut(&cmd.lease) {
                Some(l) => {
                    l.renewed = index;
                    ApplyOutcome::LeaseKept { revision: index, ttl_ms: l.ttl_ms }
                }
                None => ApplyOutcome::LeaseMismatch { exists: false },
            },
            OpType::LeaseRevoke => {
                match (self.leases.get(&cmd.lease), cmd.lease_renewed) {
                    (None, _) => return ApplyOutcome::LeaseMismatch { exists: false },
                    (Some(l), Some(seen)) if l.renewed != seen => return ApplyOutcome::LeaseMismatch { exists: true },
                    _ => {}
                }
                let Some(LeaseState { keys, .. }) = self.leases.remove(&cmd.lease) else {
                    return ApplyOutcome::LeaseMismatch { exists: false };
                };
                for k in &keys {
                    self.delete(index, k);
                }
                ApplyOutcome::KeysRemoved { revision: index, deleted: keys.len() as u64 }
            }
            OpType::Delete => ApplyOutcome::Applied { revision: index, existed: self.delete(index, &cmd.key) },
            // A read on its own is no write: the index is applied and nothing changes.
            OpType::Get => ApplyOutcome::Applied { revision: index, existed: self.data.contains(cmd.key.as_bytes()) },
            OpType::DeletePrefix => {
                let pre = cmd.key.as_bytes();
                // An empty prefix would be every key: the API never proposes one, and
                // a command holding one removes nothing.
                let doomed: Vec<Pair> = if pre.is_empty() {
                    Vec::new()
                } else {
                    self.data.range::<_, [u8]>((std::ops::Bound::Included(pre), std::ops::Bound::Unbounded)).take_while(|p| p.key_bytes().starts_with(pre)).cloned().collect()
                };
                for p in &doomed {
                    self.delete(index, p.key());
                }
                ApplyOutcome::KeysRemoved { revision: index, deleted: doomed.len() as u64 }
            }
            OpType::Txn => {
                let txn = cmd.txn.as_ref();
                let succeeded = txn.is_none_or(|t| t.compare.iter().all(|c| self.holds(c)));
                let ops = txn.map(|t| if succeeded { &t.success } else { &t.failure });
                // A leased put whose lease is gone: nothing of the branch is applied, as a
                // plain put with a missing lease writes nothing.
                let leased = |o: &&TxnOp| o.op == OpType::LeasedPut as i32;
                if ops.into_iter().flatten().filter(leased).any(|o| !self.leases.contains_key(&o.lease)) {
                    return ApplyOutcome::LeaseMismatch { exists: false };
                }
                let results = ops
                    .into_iter()
                    .flatten()
                    .map(|o| match OpType::from_i32(o.op) {
                        Some(OpType::Put) => TxnResult::Wrote { existed: self.put(index, &o.key, &o.value) },
                        Some(OpType::LeasedPut) => {
                            let existed = self.put(index, &o.key, &o.value);
                            self.attach(&o.key, o.lease);
                            TxnResult::Wrote { existed }
                        }
                        Some(OpType::Get) => TxnResult::Read(self.get(&o.key).map(|v| (v, self.lease_of(&o.key)))),
                        // Only puts, deletes and gets get here (`unknown_txn_op`).
                        _ => TxnResult::Wrote { existed: self.delete(index, &o.key) },
                    })
                    .collect();
                ApplyOutcome::Txn { revision: index, succeeded, results }
            }
        }
    }

    /// Attaches `key` (just written) to `lease`, which exists.
    fn attach(&mut self, key: &str, lease: u64) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.insert(key.to_string());
            self.key_lease.insert(key.to_string(), lease);
        }
    }

    /// Detaches `key` from its lease, if any (it was rewritten or deleted).
    fn detach(&mut self, key: &str) {
        if let Some(lease) = self.key_lease.remove(key) {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.remove(key);
            }
        }
    }

    /// Every lease: id, time to live, and the index of its grant or last renewal.
    pub fn leases(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.leases.iter().map(|(id, l)| (*id, l.ttl_ms, l.renewed))
    }

    /// A lease's time to live and the index of its grant or last renewal entry.
    pub fn lease_ttl(&self, id: u64) -> Option<(u64, u64)> {
        self.leases.get(&id).map(|l| (l.ttl_ms, l.renewed))
    }

    /// A lease's time to live and keys.
    pub fn lease(&self, id: u64) -> Option<(u64, Vec<String>)> {
        self.leases.get(&id).map(|l| (l.ttl_ms, l.keys.iter().cloned().collect()))
    }

    /// The lease `key` is attached to.
    pub fn lease_of(&self, key: &str) -> Option<u64> {
        self.key_lease.get(key).copied()
    }

    /// Sets `key` at revision `index` (attached to no lease: the caller attaches it);
    /// whether it existed.
    fn put(&mut self, index: u64, key: &str, value: &[u8]) -> bool {
        if !self.key_lease.is_empty() {
            self.detach(key);
        }
        // One walk of the tree: the replaced pair tells whether the key existed.
        let pair = Pair::new(key, value, index);
        self.track(&pair);
        let event_pair = self.events.is_some().then(|| pair.clone());
        let old = self.data.insert(pair);
        let existed = old.is_some();
        if let (Some(events), Some(pair)) = (&mut self.events, event_pair) {
            let prev = if self.events_prev { old } else { None };
            events.push(Event { pair, prev, revision: index, deleted: false });
        }
        existed
    }

    /// Removes `key` at revision `index`; whether it existed.
    fn delete(&mut self, index: u64, key: &str) -> bool {
        if !self.key_lease.is_empty() {
            self.detach(key);
        }
        let old = self.data.remove(key.as_bytes());
        if let Some(p) = &old {
            self.track(p);
            if let Some(events) = &mut self.events {
                events.push(Event { pair: p.clone(), prev: None, revision: index, deleted: true });
            }
        }
        old.is_some()
    }

    /// Whether a transaction's compare holds now.
    fn holds(&self, c: &TxnCompare) -> bool {
        let current = self.data.get(c.key.as_bytes());
        c.revision.is_none_or(|r| current.map_or(0, Pair::revision) == r)
            && c.value.as_ref().is_none_or(|v| current.is_some_and(|p| p.value_bytes() == v.as_slice()))
    }

    /// Remembers a changed pair for the next delta, or stops tracking when the delta
    /// would be no smaller than a full image.
    fn track(&mut self, p: &Pair) {
        if self.changes_since.is_none() {
            return;
        }
        if self.changes.len() >= (self.data.len() / 2).max(MIN_TRACKED) {
            self.changes_since = None;
            self.changes = Vec::new();
        } else {
            self.changes.push(p.clone());
        }
    }

    /// From now on, keep every applied put and delete for [`KvStore::take_events`]
    /// (the raft loop feeds watchers with them; nothing else asks).
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// Whether a put's event keeps the value it replaced ([`Event::prev`]; a delete's
    /// always has what it removed). Off by default: it keeps those values alive as long
    /// as the events are (the watch history), which costs memory.
    pub fn keep_previous_values(&mut self, keep: bool) {
        self.events_prev = keep;
    }

    /// The changes applied since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        match &mut self.events {
            Some(v) => std::mem::take(v),
            None => Vec::new(),
        }
    }

    /// Looks a key up.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.data.get(key.as_bytes()).map(Pair::value)
    }

    /// Keys with `prefix`, in order, at most `limit`; also whether more exist.
    pub fn list(&self, prefix: &str, limit: usize) -> (Vec<(String, Value)>, bool) {
        self.list_page(prefix, None, limit, usize::MAX)
    }

    /// One page of the keys with `prefix`, in order: those after `after` (exclusive) when
    /// given, at most `limit` of them and, past the first, no more than `max_bytes` of keys
    /// and values in all (one pair larger than that still makes a page of its own). Also
    /// whether more exist.
    pub fn list_page(&self, prefix: &str, after: Option<&str>, limit: usize, max_bytes: usize) -> (Vec<(String, Value)>, bool) {
        use std::ops::Bound;
        let mut out = Vec::new();
        let mut more = false;
        let mut bytes = 0usize;
        let pre: &[u8] = prefix.as_bytes();
        let start = match after {
            Some(a) if a.as_bytes() >= pre => Bound::Excluded(a.as_bytes()),
            _ => Bound::Included(pre),
        };
        for p in self.data.range::<_, [u8]>((start, Bound::Unbounded)) {
            if !p.key_bytes().starts_with(pre) {
                break;
            }
            let size = p.key_bytes().len().saturating_add(p.value_bytes().len());
            if out.len() == limit || (!out.is_empty() && bytes.saturating_add(size) > max_bytes) {
                more = true;
                break;
            }
            bytes = bytes.saturating_add(size);
            out.push((p.key().to_string(), p.value()));
        }
        (out, more)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Records a member's peer URL (added or updated); clears a removal mark.
    pub fn set_member(&mut self, id: u64, url: String) {
        self.removed.remove(&id);
        self.members.insert(id, url);
    }

    /// Forgets a removed member and remembers the removal.
    pub fn remove_member(&mut self, id: u64) {
        self.members.remove(&id);
        self.removed.insert(id);
    }

    /// Member URLs by id.
    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    /// The cluster's id, as its bootstrap image set it (0: not known yet, or data from
    /// before cluster ids).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Whether `id` was removed from the cluster (and not re-added).
    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.contains(&id)
    }

    /// Serializes the whole state (on the calling thread).
    pub fn snapshot_image(&self) -> Vec<u8> {
        self.image_source().encode()
    }

    /// An O(1) frozen copy of the whole state to encode elsewhere (see
    /// [`ImageSource::encode`]). Unlike [`KvStore::take_image`] it leaves the tracking
    /// of changes alone.
    pub fn image_source(&self) -> ImageSource {
        ImageSource {
            data: self.data.clone(),
            leases: self
                .leases
                .iter()
                .map(|(id, l)| LeaseRecord { id: *id, ttl_ms: l.ttl_ms, keys: l.keys.iter().cloned().collect(), renewed: l.renewed })
                .collect(),
            members: self.members.clone(),
            removed: self.removed.clone(),
            applied: self.applied,
            cluster_id: self.cluster_id,
            delta: None,
        }
    }

    /// A frozen copy of the state for the next snapshot, and the start of tracking
    /// changes for the one after it. A delta on top of the image at `delta_base` when
    /// asked for one and the changes since that image are known and fewer than half the
    /// keys; a full image otherwise.
    pub fn take_image(&mut self, delta_base: Option<u64>) -> ImageSource {
        let changes = std::mem::take(&mut self.changes);
        let delta = match (delta_base, self.changes_since) {
            (Some(base), Some(since)) if base == since && changes.len() * 2 < self.data.len() => {
                Some(DeltaPart { base, changes, resolved: std::sync::OnceLock::new() })
            }
            _ => None,
        };
        self.changes_since = Some(self.applied);
        ImageSource { delta, ..self.image_source() }
    }

    /// Replaces the state with a full snapshot image.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), KvError> {
        let (img, pairs) = decode_image(bytes, "snapshot image")?;
        if img.version != FULL_IMAGE {
            return Err(KvError::Version(img.version));
        }
        self.data = pairs.into_iter().collect();
        self.adopt(img);
        Ok(())
    }

    /// Takes an image's members, removed ids and applied index (an image has both in
    /// full, delta or not), and tracks changes from that image on.
    fn adopt(&mut self, img: SnapshotImage) {
        self.key_lease = img.leases.iter().flat_map(|l| l.keys.iter().map(move |k| (k.clone(), l.id))).collect();
        self.leases = img.leases.into_iter().map(|l| (l.id, LeaseState { ttl_ms: l.ttl_ms, renewed: l.renewed, keys: l.keys.into_iter().collect() })).collect();
        self.members = img.members.into_iter().map(|m| (m.id, m.peer_url)).collect();
        self.removed = img.removed.into_iter().collect();
        self.applied = img.applied_index;
        self.cluster_id = img.cluster_id;
        self.changes = Vec::new();
        self.changes_since = Some(self.applied);
    }

    /// Applies a delta image on top of the current state, which must be at its base.
    pub fn apply_delta(&mut self, bytes: &[u8]) -> Result<(), KvError> {
        let (mut img, pairs) = decode_image(bytes, "delta snapshot image")?;
        if img.version != DELTA_IMAGE {
            return Err(KvError::Version(img.version));
        }
        if img.base_index != self.applied || img.applied_index < img.base_index {
            return Err(KvError::DeltaBase { base: img.base_index, applied: self.applied });
        }
        for p in pairs {
            self.data.insert(p);
        }
        for k in std::mem::take(&mut img.deleted) {
            self.data.remove(k.as_bytes());
        }
        self.adopt(img);
        Ok(())
    }

    /// The bootstrap image of a new cluster restored from a backup's full `image`: the
    /// backup's keys with their revisions, at its applied index (returned with the
    /// image), but the new cluster's members and id, and no removed ids.
    pub fn restored_image(image: &[u8], members: &[(u64, String)], cluster_id: u64, bump: u64) -> Result<(Vec<u8>, u64), KvError> {
        let mut kv = KvStore::new();
        kv.restore(image)?;
        // The new log (and so every new revision) starts `bump` beyond the backup's.
        kv.applied = kv.applied.saturating_add(bump);
        kv.members.clear();
        kv.removed.clear();
        for (id, url) in members {
            kv.set_member(*id, url.clone());
        }
        kv.cluster_id = cluster_id;
        Ok((kv.snapshot_image(), kv.applied))
    }

    /// The image of a brand-new cluster: no keys, the initial members.
    pub fn bootstrap_image(members: &[(u64, String)], applied: u64, cluster_id: u64) -> Vec<u8> {
        let mut kv = KvStore::new();
        for (id, url) in members {
            kv.set_member(*id, url.clone());
        }
        kv.applied = applied;
        kv.cluster_id = cluster_id;
        kv.snapshot_image()
    }
}

/// Decodes a [`SnapshotImage`]: its values straight into [`Pair`]s, without a `String`
/// and a `Vec` per value first (a restart restores a million of them: this halves the
/// time), everything else with prost. Same rules as prost: unknown fields are skipped,
/// the last occurrence of a field wins, a key must be UTF-8. The returned image has no
/// `values`.
fn decode_image(bytes: &[u8], what: &'static str) -> Result<(SnapshotImage, Vec<Pair>), KvError> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext};
    let err = |source| KvError::Decode { what, source };
    let mut rest: &[u8] = bytes;
    let mut others = Vec::new();
    let mut pairs = Vec::new();
    while !rest.is_empty() {
        let start = bytes.len() - rest.len();
        let (tag, wt) = decode_key(&mut rest).map_err(err)?;
        if tag != 3 {
            skip_field(wt, tag, &mut rest, DecodeContext::default()).map_err(err)?;
            others.extend_from_slice(&bytes[start..bytes.len() - rest.len()]);
            continue;
        }
        if wt != WireType::LengthDelimited {
            return Err(KvError::BadImage("a value record is not length-delimited"));
        }
        let len = decode_varint(&mut rest).map_err(err)?;
        let len = usize::try_from(len).ok().filter(|&n| n <= rest.len()).ok_or(KvError::BadImage("a value record runs past the end"))?;
        let (mut rec, after) = rest.split_at(len);
        rest = after;
        let (mut key, mut value, mut revision): (&[u8], &[u8], u64) = (&[], &[], 0);
        while !rec.is_empty() {
            let (tag, wt) = decode_key(&mut rec).map_err(err)?;
            match (tag, wt) {
                (1 | 2, WireType::LengthDelimited) => {
                    let n = decode_varint(&mut rec).map_err(err)?;
                    let n = usize::try_from(n).ok().filter(|&n| n <= rec.len()).ok_or(KvError::BadImage("a key or value runs past its record"))?;
                    let (field, after) = rec.split_at(n);
                    rec = after;
                    if tag == 1 {
                        key = field;
                    } else {
                        value = field;
                    }
                }
                (3, WireType::Varint) => revision = decode_varint(&mut rec).map_err(err)?,
                (1..=3, _) => return Err(KvError::BadImage("a value record field has the wrong wire type")),
                _ => skip_field(wt, tag, &mut rec, DecodeContext::default()).map_err(err)?,
            }
        }
        let key = std::str::from_utf8(key).map_err(|_| KvError::BadImage("a key is not UTF-8"))?;
        pairs.push(Pair::new(key, value, revision));
    }
    let img = SnapshotImage::decode(others.as_slice()).map_err(err)?;
    Ok((img, pairs))
}

/// A frozen copy of the state machine, cheap to take, encoded off the raft loop: the
/// whole state, or (a delta) what changed since an earlier image.
pub struct ImageSource {
    data: imbl::OrdSet<Pair>,
    leases: Vec<LeaseRecord>,
    members: BTreeMap<u64, String>,
    removed: BTreeSet<u64>,
    applied: u64,
    cluster_id: u64,
    delta: Option<DeltaPart>,
}

/// The changes a delta image holds.
struct DeltaPart {
    base: u64,
    /// Changed pairs as tracked (unsorted, with repeats).
    changes: Vec<Pair>,
    /// The changed keys sorted and looked up in the frozen state, once, by whichever
    /// of `encoded_len` and `encode_to` runs first: the pairs written, the keys deleted.
    resolved: std::sync::OnceLock<(Vec<Pair>, Vec<String>)>,
}

impl ImageSource {
    /// Applied index the image reflects.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// For a delta: the applied index of the image it applies on top of.
    pub fn delta_base(&self) -> Option<u64> {
        self.delta.as_ref().map(|d| d.base)
    }

    /// The pairs this image holds: all of them, or for a delta those written since its
    /// base; and for a delta the keys deleted since.
    fn contents(&self) -> (Box<dyn Iterator<Item = &Pair> + '_>, &[String]) {
        let Some(d) = &self.delta else { return (Box::new(self.data.iter()), &[]) };
        let (puts, deleted) = d.resolved.get_or_init(|| {
            let mut keys: Vec<&Pair> = d.changes.iter().collect();
            keys.sort();
            keys.dedup();
            let mut puts = Vec::with_capacity(keys.len());
            let mut deleted = Vec::new();
            for k in keys {
                match self.data.get(k.key_bytes()) {
                    Some(p) => puts.push(p.clone()),
                    None => deleted.push(k.key().to_string()),
                }
            }
            (puts, deleted)
        });
        (Box::new(puts.iter()), deleted)
    }

    /// Encodes the [`SnapshotImage`] into one buffer (small stores, tests, the bootstrap
    /// image). Large images are streamed with [`ImageSource::encode_to`] instead.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        // Writing into a Vec cannot fail.
        let _ = self.encode_to(&mut buf);
        buf
    }

    /// Bytes [`ImageSource::encode_to`] writes.
    pub fn encoded_len(&self) -> usize {
        let values: usize = self
            .contents()
            .0
            .map(|p| {
                let n = value_len(p);
                key_len(3) + encoded_len_varint(n as u64) + n
            })
            .sum();
        self.header().encoded_len() + values
    }

    /// Streams a [`SnapshotImage`] straight from the map to `w`, without building the
    /// message or the encoded image in memory (a snapshot of a large store costs a
    /// small buffer, not a second copy of the store). Exactly
    /// [`ImageSource::encoded_len`] bytes.
    pub fn encode_to<W: std::io::Write + ?Sized>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.header().encode_to_vec())?;
        // Field order does not matter to protobuf decoders; the values go last.
        let mut buf = Vec::with_capacity(512);
        for p in self.contents().0 {
            let (k, v, revision) = (p.key_bytes(), p.value_bytes(), p.revision());
            buf.clear();
            encode_key(3, WireType::LengthDelimited, &mut buf);
            encode_varint(value_len(p) as u64, &mut buf);
            if !k.is_empty() {
                encode_key(1, WireType::LengthDelimited, &mut buf);
                encode_varint(k.len() as u64, &mut buf);
                buf.put_slice(k);
            }
            if !v.is_empty() {
                encode_key(2, WireType::LengthDelimited, &mut buf);
                encode_varint(v.len() as u64, &mut buf);
            }
            w.write_all(&buf)?;
            buf.clear();
            w.write_all(v)?;
            if revision != 0 {
                encode_key(3, WireType::Varint, &mut buf);
                encode_varint(revision, &mut buf);
                w.write_all(&buf)?;
            }
        }
        Ok(())
    }

    /// The image without its values (members, removed ids, applied index).
    fn header(&self) -> SnapshotImage {
        SnapshotImage {
            version: if self.delta.is_some() { DELTA_IMAGE } else { FULL_IMAGE },
            applied_index: self.applied,
            values: Vec::new(),
            members: self.members.iter().map(|(id, url)| MemberRecord { id: *id, peer_url: url.clone() }).collect(),
            removed: self.removed.iter().copied().collect(),
            base_index: self.delta_base().unwrap_or(0),
            deleted: self.contents().1.to_vec(),
            cluster_id: self.cluster_id,
            leases: self.leases.clone(),
        }
    }
}

/// Encoded length of one `ValueRecord` of the image.
fn value_len(p: &Pair) -> usize {
    let (k, v, revision) = (p.key_bytes(), p.value_bytes(), p.revision());
    let mut n = 0;
    if !k.is_empty() {
        n += key_len(1) + encoded_len_varint(k.len() as u64) + k.len();
    }
    if !v.is_empty() {
        n += key_len(2) + encoded_len_varint(v.len() as u64) + v.len();
    }
    if revision != 0 {
        n += key_len(3) + encoded_len_varint(revision);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, prev: Option<u64>) -> Command {
        Command { request_id: 1, op: OpType::Put as i32, key: key.into(), value: value.as_bytes().to_vec(), prev_revision: prev, ..Default::default() }
    }

    #[test]
    fn put_get_delete_and_cas() {
        let mut kv = KvStore::new();
        assert_eq!(kv.apply(5, &put("a", "1", None)), ApplyOutcome::Applied { revision: 5, existed: false });
        assert_eq!(&kv.get("a").unwrap().data[..], b"1");
        assert_eq!(kv.apply(6, &put("a", "2", Some(4))), ApplyOutcome::PreconditionFailed { current: 5 });
        assert_eq!(&kv.get("a").unwrap().data[..], b"1");
        assert_eq!(kv.apply(7, &put("a", "2", Some(5))), ApplyOutcome::Applied { revision: 7, existed: true });
        assert_eq!(kv.apply(8, &put("b", "x", Some(0))), ApplyOutcome::Applied { revision: 8, existed: false });
        let del = Command { op: OpType::Delete as i32, ..put("a", "", None) };
        assert_eq!(kv.apply(9, &del), ApplyOutcome::Applied { revision: 9, existed: true });
        assert!(kv.get("a").is_none());
        assert_eq!(kv.applied(), 9);
    }

    #[test]
    fn list_is_ordered_and_bounded() {
        let mut kv = KvStore::new();
        for (i, k) in ["p/c", "p/a", "q", "p/b", "o"].iter().enumerate() {
            kv.apply(i as u64 + 1, &put(k, "v", None));
        }
        let (items, more) = kv.list("p/", 2);
        assert_eq!(items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["p/a", "p/b"]);
        assert!(more);
        let (items, more) = kv.list("p/", 10);
        assert_eq!(items.len(), 3);
        assert!(!more);
    }

    #[test]
    fn a_page_continues_after_a_key_and_is_bounded_in_bytes() {
        let mut kv = KvStore::new();
        for (i, k) in ["p/a", "p/b", "p/c", "p/d", "q"].iter().enumerate() {
            kv.apply(i as u64 + 1, &put(k, "0123456789", None));
        }
        let keys = |items: Vec<(String, Value)>| items.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        // After a key: exclusive; an `after` before the prefix starts at the prefix.
        let (items, more) = kv.list_page("p/", Some("p/b"), 10, usize::MAX);
        assert_eq!((keys(items), more), (vec!["p/c".to_string(), "p/d".to_string()], false));
        let (items, _) = kv.list_page("p/", Some("a"), 1, usize::MAX);
        assert_eq!(keys(items), ["p/a"]);
        let (items, more) = kv.list_page("p/", Some("p/d"), 10, usize::MAX);
        assert!(items.is_empty() && !more);
        // 13 bytes a pair: 30 bytes hold two, and a budget below one pair still gives one.
        let (items, more) = kv.list_page("p/", None, 10, 30);
        assert_eq!((keys(items), more), (vec!["p/a".to_string(), "p/b".to_string()], true));
        let (items, more) = kv.list_page("p/", Some("p/b"), 10, 1);
        assert_eq!((keys(items), more), (vec!["p/c".to_string()], true));
    }

    #[test]
    fn an_unknown_operation_changes_nothing() {
        let mut kv = KvStore::new();
        kv.apply(1, &put("a", "1", None));
        let odd = Command { op: 99, ..put("a", "2", None) };
        assert_eq!(kv.apply(2, &odd), ApplyOutcome::UnknownOp { op: 99 });
        assert_eq!(&kv.get("a").unwrap().data[..], b"1");
        assert_eq!(kv.get("a").unwrap().revision, 1);
        assert_eq!(kv.applied(), 1, "not applied: the index stays");
        let odd_new = Command { op: 99, ..put("b", "2", None) };
        kv.apply(3, &odd_new);
        assert!(kv.get("b").is_none());
    }

    fn txn(compare: Vec<TxnCompare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> Command {
        Command { op: OpType::Txn as i32, txn: Some(Txn { compare, success, failure }), ..Default::default() }
    }

    fn w(op: OpType, key: &str, value: &str) -> TxnOp {
        TxnOp { op: op as i32, key: key.into(), value: value.as_bytes().to_vec(), lease: 0 }
    }

    fn cmp(key: &str, revision: Option<u64>, value: Option<&str>) -> TxnCompare {
        TxnCompare { key: key.into(), revision, value: value.map(|v| v.as_bytes().to_vec()) }
    }

    #[test]
    fn leases_hold_keys_until_revoked_and_survive_images() {
        let lease = |op: OpType, id: u64, ttl_ms: u64| Command { op: op as i32, lease: id, ttl_ms, ..Default::default() };
        let leased = |key: &str, id: u64| Command { lease: id, ..put(key, "v", None) };
        let mut kv = KvStore::new();
        kv.record_events();
        assert_eq!(kv.apply(1, &lease(OpType::LeaseGrant, 7, 5000)), ApplyOutcome::LeaseKept { revision: 1, ttl_ms: 5000 });
        assert_eq!(kv.apply(2, &lease(OpType::LeaseGrant, 7, 1000)), ApplyOutcome::LeaseMismatch { exists: true });
        assert_eq!(kv.apply(3, &leased("a", 8)), ApplyOutcome::LeaseMismatch { exists: false }, "no lease 8");
        assert!(kv.get("a").is_none());
        kv.apply(4, &leased("a", 7));
        kv.apply(5, &leased("b", 7));
        kv.apply(6, &leased("c", 7));
        kv.apply(7, &put("free", "v", None));
        assert_eq!(kv.lease(7), Some((5000, vec!["a".into(), "b".into(), "c".into()])));
        assert_eq!(kv.lease_of("a"), Some(7));
        // Rewritten without the lease, or deleted: no longer the lease's.
        kv.apply(8, &put("b", "w", None));
        kv.apply(9, &Command { op: OpType::Delete as i32, key: "c".into(), ..Default::default() });
        assert_eq!(kv.lease(7).unwrap().1, ["a"]);
        assert_eq!(kv.lease_of("b"), None);
        assert_eq!(kv.apply(10, &lease(OpType::LeaseKeepAlive, 7, 0)), ApplyOutcome::LeaseKept { revision: 10, ttl_ms: 5000 });
        assert_eq!(kv.apply(11, &lease(OpType::LeaseKeepAlive, 9, 0)), ApplyOutcome::LeaseMismatch { exists: false });
        // Images (full and delta) keep leases and their keys (more keys first, so that
        // a delta is smaller than a full image).
        for i in 0..30 {
            kv.apply(12 + i, &put(&format!("f{i:02}"), "v", None));
        }
        let base = kv.applied();
        let mut follower = KvStore::new();
        follower.restore(&kv.take_image(None).encode()).unwrap();
        assert_eq!(follower.lease(7), kv.lease(7));
        assert_eq!(follower.lease_of("a"), Some(7));
        kv.apply(50, &lease(OpType::LeaseGrant, 9, 2000));
        kv.apply(51, &leased("d", 9));
        let delta = kv.take_image(Some(base));
        assert!(delta.delta_base().is_some());
        follower.apply_delta(&delta.encode()).unwrap();
        assert_eq!(follower.lease(9), Some((2000, vec!["d".into()])));
        assert_eq!(follower.lease_of("d"), Some(9));
        // Revoking removes the lease and its keys, at its revision.
        let _ = kv.take_events();
        assert_eq!(kv.apply(52, &lease(OpType::LeaseRevoke, 7, 0)), ApplyOutcome::KeysRemoved { revision: 52, deleted: 1 });
        assert!(kv.get("a").is_none() && kv.get("b").is_some() && kv.get("free").is_some());
        assert_eq!(kv.lease(7), None);
        assert_eq!(kv.take_events().iter().map(|e| format!("{e:?}")).collect::<Vec<_>>(), ["delete \"a\"@52"]);
        assert_eq!(kv.apply(53, &lease(OpType::LeaseRevoke, 7, 0)), ApplyOutcome::LeaseMismatch { exists: false });
        assert_eq!(kv.leases().collect::<Vec<_>>(), [(9, 2000, 50)]);
        // An expiry revocation loses to a renewal applied after the leader decided it.
        let expire = |seen: u64| Command { lease_renewed: Some(seen), ..lease(OpType::LeaseRevoke, 9, 0) };
        kv.apply(54, &lease(OpType::LeaseKeepAlive, 9, 0));
        assert_eq!(kv.apply(55, &expire(50)), ApplyOutcome::LeaseMismatch { exists: true });
        assert!(kv.get("d").is_some());
        assert_eq!(kv.apply(56, &expire(54)), ApplyOutcome::KeysRemoved { revision: 56, deleted: 1 });
        assert!(kv.get("d").is_none() && kv.leases().next().is_none());
    }

    #[test]
    fn delete_prefix_removes_exactly_the_keys_under_it_at_one_revision() {
        let mut kv = KvStore::new();
        kv.record_events();
        for (i, k) in ["p", "p/a", "p/b", "p0", "q/a", "o"].iter().enumerate() {
            kv.apply(i as u64 + 1, &put(k, "v", None));
        }
        // More keys, so that a delta of the deletes is smaller than a full image.
        for i in 0..20 {
            kv.apply(100 + i, &put(&format!("f{i:02}"), "v", None));
        }
        let base = kv.applied();
        let mut follower = KvStore::new();
        follower.restore(&kv.take_image(None).encode()).unwrap();
        let _ = kv.take_events();
        let del = |prefix: &str| Command { op: OpType::DeletePrefix as i32, key: prefix.into(), ..Default::default() };
        assert_eq!(kv.apply(200, &del("p/")), ApplyOutcome::KeysRemoved { revision: 200, deleted: 2 });
        let left: Vec<String> = kv.list("", 100).0.into_iter().map(|(k, _)| k).filter(|k| !k.starts_with('f')).collect();
        assert_eq!(left, ["o", "p", "p0", "q/a"]);
        let events: Vec<String> = kv.take_events().iter().map(|e| format!("{e:?}")).collect();
        assert_eq!(events, ["delete \"p/a\"@200", "delete \"p/b\"@200"]);
        assert_eq!(kv.apply(201, &del("zzz")), ApplyOutcome::KeysRemoved { revision: 201, deleted: 0 });
        assert_eq!(kv.apply(202, &del("")), ApplyOutcome::KeysRemoved { revision: 202, deleted: 0 }, "never every key");
        assert_eq!(kv.len(), 24);
        // Its deletes reach a delta snapshot.
        let delta = kv.take_image(Some(base));
        assert!(delta.delta_base().is_some());
        follower.apply_delta(&delta.encode()).unwrap();
        assert!(follower.get("p/a").is_none() && follower.get("p").is_some());
        assert_eq!(follower.len(), 24);
    }

    #[test]
    fn a_transaction_runs_one_branch_atomically_at_one_revision() {
        let mut kv = KvStore::new();
        kv.apply(1, &put("a", "1", None));
        kv.apply(2, &put("b", "2", None));
        // Every compare holds: a swap of a and b, and a new key, all at revision 3.
        let swap = txn(
            vec![cmp("a", Some(1), Some("1")), cmp("b", None, Some("2")), cmp("new", Some(0), None)],
            vec![w(OpType::Put, "a", "2"), w(OpType::Put, "b", "1"), w(OpType::Put, "new", "n"), w(OpType::Delete, "gone", "")],
            vec![w(OpType::Put, "failed", "x")],
        );
        assert_eq!(kv.apply(3, &swap), ApplyOutcome::Txn { revision: 3, succeeded: true, results: wrote(&[true, true, false, false]) });
        for (k, v) in [("a", "2"), ("b", "1"), ("new", "n")] {
            assert_eq!(kv.get(k).map(|x| (x.data.to_vec(), x.revision)), Some((v.as_bytes().to_vec(), 3)), "{k}");
        }
        assert!(kv.get("failed").is_none());
        // One compare fails (a's revision is now 3; a value that differs; a key that
        // exists compared as absent): only the failure branch runs.
        for failing in [cmp("a", Some(1), None), cmp("a", None, Some("1")), cmp("new", Some(0), None), cmp("nope", None, Some(""))] {
            let t = txn(vec![cmp("b", Some(3), None), failing.clone()], vec![w(OpType::Delete, "a", "")], vec![w(OpType::Put, "failed", "x")]);
            assert_eq!(kv.apply(4, &t), ApplyOutcome::Txn { revision: 4, succeeded: false, results: wrote(&[false]) }, "{failing:?}");
            assert_eq!(kv.get("a").unwrap().revision, 3, "{failing:?}");
            kv.apply(4, &Command { op: OpType::Delete as i32, key: "failed".into(), ..Default::default() });
        }
        // No compares: success; no writes: nothing changes but the applied index.
        assert_eq!(kv.apply(5, &txn(vec![], vec![], vec![])), ApplyOutcome::Txn { revision: 5, succeeded: true, results: vec![] });
        assert_eq!(kv.applied(), 5);
        // A write of a kind this version does not know: nothing of it is applied.
        let odd = txn(vec![], vec![w(OpType::Delete, "a", ""), TxnOp { op: 2, key: "b".into(), value: vec![], lease: 0 }], vec![]);
        assert_eq!(kv.apply(6, &odd), ApplyOutcome::UnknownOp { op: 2 });
        assert!(kv.get("a").is_some());
        assert_eq!(kv.applied(), 5);
        assert!(!is_known(odd.op, odd.txn.as_ref()));
        assert!(is_known(swap.op, swap.txn.as_ref()));
        assert!(!is_known(99, None));
        // A transaction's changes reach a delta snapshot like any other write (a delta
        // needs changes to fewer than half the keys).
        let filler = (0..10).map(|i| w(OpType::Put, &format!("f{i}"), "v")).collect();
        kv.apply(6, &txn(vec![], filler, vec![]));
        let base = kv.applied();
        let mut follower = KvStore::new();
        follower.restore(&kv.take_image(None).encode()).unwrap();
        kv.apply(7, &txn(vec![], vec![w(OpType::Delete, "a", ""), w(OpType::Put, "c", "3")], vec![]));
        let delta = kv.take_image(Some(base));
        assert!(delta.delta_base().is_some(), "a delta");
        follower.apply_delta(&delta.encode()).unwrap();
        assert!(follower.get("a").is_none());
        assert_eq!(follower.get("c").unwrap().revision, 7);
    }

    #[test]
    fn events_carry_the_value_before_the_change() {
        let mut kv = KvStore::new();
        kv.record_events();
        // By default a put's event keeps nothing of what it replaced (memory); a delete's
        // is the removed pair itself.
        kv.apply(1, &put("k", "one", None));
        kv.apply(2, &put("k", "two", None));
        kv.apply(3, &Command { op: OpType::Delete as i32, key: "k".into(), ..Default::default() });
        let prev: Vec<Option<u64>> = kv.take_events().iter().map(|e| e.prev().map(|v| v.revision)).collect();
        assert_eq!(prev, [None, None, Some(2)]);
        let mut kv = KvStore::new();
        kv.record_events();
        kv.keep_previous_values(true);
        kv.apply(1, &put("k", "one", None));
        kv.apply(2, &put("k", "two", None));
        kv.apply(3, &Command { op: OpType::Delete as i32, key: "k".into(), ..Default::default() });
        kv.apply(4, &txn(vec![], vec![w(OpType::Put, "k", "four"), w(OpType::Put, "t", "t")], vec![]));
        kv.apply(5, &txn(vec![], vec![w(OpType::Put, "k", "five")], vec![]));
        let events = kv.take_events();
        let prev: Vec<Option<(Vec<u8>, u64)>> = events.iter().map(|e| e.prev().map(|v| (v.data.to_vec(), v.revision))).collect();
        assert_eq!(
            prev,
            [None, Some((b"one".to_vec(), 1)), Some((b"two".to_vec(), 2)), None, None, Some((b"four".to_vec(), 4))],
            "{events:?}"
        );
        // A history bounded by bytes counts the previous value a put keeps alive.
        assert!(events[1].size() > events[0].size());
        // (a put over "one" holds "two" and "one"; the delete holds the "two" it removed)
        assert_eq!(events[2].size(), events[1].size() - events[0].size());
    }

    #[test]
    fn a_transaction_put_attaches_its_key_to_a_lease_or_nothing_is_written() {
        let mut kv = KvStore::new();
        kv.apply(1, &Command { op: OpType::LeaseGrant as i32, lease: 5, ttl_ms: 5000, ..Default::default() });
        let leased = |key: &str, lease: u64| TxnOp { op: OpType::LeasedPut as i32, key: key.into(), value: b"me".to_vec(), lease };
        // Take the lock with the lease, if free.
        let take = txn(vec![cmp("lock", Some(0), None)], vec![leased("lock", 5), w(OpType::Put, "plain", "p")], vec![]);
        assert!(is_known(take.op, take.txn.as_ref()));
        assert_eq!(kv.apply(2, &take), ApplyOutcome::Txn { revision: 2, succeeded: true, results: wrote(&[false, false]) });
        assert_eq!((kv.lease_of("lock"), kv.lease_of("plain")), (Some(5), None));
        // A branch naming a lease that is gone writes nothing at all.
        let stale = txn(vec![], vec![w(OpType::Put, "other", "o"), leased("lock2", 6)], vec![]);
        assert_eq!(kv.apply(3, &stale), ApplyOutcome::LeaseMismatch { exists: false });
        assert!(kv.get("other").is_none() && kv.get("lock2").is_none());
        assert_eq!(kv.applied(), 3);
        // Only the branch that runs is checked.
        let other_branch = txn(vec![cmp("lock", Some(0), None)], vec![leased("never", 6)], vec![w(OpType::Get, "lock", "")]);
        assert!(matches!(kv.apply(4, &other_branch), ApplyOutcome::Txn { succeeded: false, .. }));
        // Revoking the lease removes the key the transaction attached.
        assert_eq!(kv.apply(5, &Command { op: OpType::LeaseRevoke as i32, lease: 5, ..Default::default() }), ApplyOutcome::KeysRemoved { revision: 5, deleted: 1 });
        assert!(kv.get("lock").is_none() && kv.get("plain").is_some());
    }

    fn wrote(existed: &[bool]) -> Vec<TxnResult> {
        existed.iter().map(|&existed| TxnResult::Wrote { existed }).collect()
    }

    #[test]
    fn a_transaction_get_reads_the_key_where_it_stands_in_its_branch() {
        let mut kv = KvStore::new();
        kv.apply(1, &put("owner", "me", None));
        kv.apply(2, &Command { op: OpType::LeaseGrant as i32, lease: 9, ttl_ms: 5000, ..Default::default() });
        kv.apply(3, &Command { op: OpType::Put as i32, key: "eph".into(), value: b"e".to_vec(), lease: 9, ..Default::default() });
        let read = |kv: &KvStore, key: &str| TxnResult::Read(kv.get(key).map(|v| (v, kv.lease_of(key))));
        let (owner, eph) = (read(&kv, "owner"), read(&kv, "eph"));
        assert!(matches!(&eph, TxnResult::Read(Some((_, Some(9))))), "a leased key reads with its lease");
        // The lock is taken (the compare on its absence fails): the failure branch reads
        // who holds it, atomically with the compare, and writes nothing.
        let take = txn(vec![cmp("owner", Some(0), None)], vec![w(OpType::Put, "owner", "you")], vec![w(OpType::Get, "owner", ""), w(OpType::Get, "eph", ""), w(OpType::Get, "nobody", "")]);
        assert!(is_known(take.op, take.txn.as_ref()));
        assert_eq!(kv.apply(4, &take), ApplyOutcome::Txn { revision: 4, succeeded: false, results: vec![owner, eph, TxnResult::Read(None)] });
        assert_eq!(kv.get("owner").unwrap().revision, 1, "a read changes nothing");
        // A get sees the writes before it in its branch, not those after it.
        let t = txn(vec![], vec![w(OpType::Get, "k", ""), w(OpType::Put, "k", "v"), w(OpType::Get, "k", ""), w(OpType::Delete, "owner", ""), w(OpType::Get, "owner", "")], vec![]);
        let ApplyOutcome::Txn { results, .. } = kv.apply(5, &t) else { panic!("not a transaction's outcome") };
        assert_eq!(results[0], TxnResult::Read(None));
        assert_eq!(results[1], TxnResult::Wrote { existed: false });
        assert_eq!(results[2], TxnResult::Read(Some((Value { data: Bytes::from_static(b"v"), revision: 5 }, None))));
        assert_eq!(results[3], TxnResult::Wrote { existed: true });
        assert_eq!(results[4], TxnResult::Read(None));
        // Reads leave no change for watchers or deltas.
        kv.record_events();
        kv.apply(6, &txn(vec![], vec![w(OpType::Get, "k", "")], vec![]));
        assert!(kv.take_events().is_empty());
        // A get proposed as a command of its own (the API never does) changes nothing.
        assert_eq!(kv.apply(7, &Command { op: OpType::Get as i32, key: "k".into(), ..Default::default() }), ApplyOutcome::Applied { revision: 7, existed: true });
        assert_eq!(kv.get("k").unwrap().revision, 5);
        assert_eq!(kv.applied(), 7);
    }

    #[test]
    fn pairs_behave_like_a_btreemap_of_strings() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut kv = KvStore::new();
        let mut model: BTreeMap<String, (Vec<u8>, u64)> = BTreeMap::new();
        // Keys sharing their first 8 bytes, and zero bytes where a short key's head is
        // padded with zeros: ordered by the bytes after the head, as a BTreeMap does.
        let keys = [
            "", "a", "ab", "b", "é", "z\u{10348}", "p/a", "p/b", "p\u{0}", "abcdefg", "abcdefg\u{0}", "abcdefgh",
            "abcdefgh\u{0}", "abcdefghi", "abcdefgh\u{1}z", "abcdefgi",
        ];
        for index in 2..2000u64 {
            let key = keys[rng.gen_range(0..keys.len())];
            if rng.gen_bool(0.8) {
                let value: Vec<u8> = (0..rng.gen_range(0..40)).map(|_| rng.gen()).collect();
                kv.apply(index, &Command { request_id: index, op: OpType::Put as i32, key: key.into(), value: value.clone(), prev_revision: None, ..Default::default() });
                model.insert(key.to_string(), (value, index));
            } else {
                kv.apply(index, &Command { request_id: index, op: OpType::Delete as i32, key: key.into(), value: vec![], prev_revision: None, ..Default::default() });
                model.remove(key);
            }
            if index % 97 == 0 {
                let listed: Vec<(String, Vec<u8>, u64)> =
                    kv.list("", 100).0.into_iter().map(|(k, v)| (k, v.data.to_vec(), v.revision)).collect();
                let expected: Vec<(String, Vec<u8>, u64)> =
                    model.iter().map(|(k, (v, r))| (k.clone(), v.clone(), *r)).collect();
                assert_eq!(listed, expected);
            }
        }
        for key in keys {
            assert_eq!(kv.get(key).map(|v| (v.data.to_vec(), v.revision)), model.get(key).cloned(), "{key:?}");
        }
        let mut back = KvStore::new();
        back.restore(&kv.snapshot_image()).unwrap();
        assert_eq!(back.list("", 100).0, kv.list("", 100).0);
        let p: Vec<String> = kv.list("p/", 10).0.into_iter().map(|(k, _)| k).collect();
        assert!(p.iter().all(|k| k.starts_with("p/")));
    }

    #[test]
    fn snapshot_round_trip() {
        let mut kv = KvStore::new();
        kv.apply(3, &put("k", "v", None));
        kv.set_member(1, "http://127.0.0.1:1".into());
        kv.set_member(2, "http://127.0.0.1:2".into());
        kv.remove_member(2);
        let img = kv.snapshot_image();
        let mut back = KvStore::new();
        back.restore(&img).unwrap();
        assert_eq!(back.get("k").unwrap().revision, 3);
        assert_eq!(back.members().len(), 1);
        assert!(back.is_removed(2));
        assert_eq!(back.applied(), 3);
        assert!(back.restore(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn the_cluster_id_of_the_bootstrap_image_is_kept_by_every_later_image() {
        let members = [(1, "http://127.0.0.1:1".to_string())];
        let mut kv = KvStore::new();
        kv.restore(&KvStore::bootstrap_image(&members, 1, 0xabc)).unwrap();
        assert_eq!(kv.cluster_id(), 0xabc);
        for i in 0..10u64 {
            kv.apply(i + 2, &put(&format!("k{i}"), "v", None));
        }
        let full_image = kv.take_image(None).encode();
        kv.apply(20, &put("k0", "w", None));
        let delta = kv.take_image(Some(11)).encode();
        let mut back = KvStore::new();
        back.restore(&full_image).unwrap();
        assert_eq!(back.cluster_id(), 0xabc, "a full image");
        back.apply_delta(&delta).unwrap();
        assert_eq!(back.cluster_id(), 0xabc, "a delta");
        // An image from before cluster ids (no field 8) has none.
        let mut old = SnapshotImage::decode(full_image.as_slice()).unwrap();
        old.cluster_id = 0;
        let mut legacy = KvStore::new();
        legacy.restore(&old.encode_to_vec()).unwrap();
        assert_eq!(legacy.cluster_id(), 0);
        assert_eq!(legacy.len(), 10);
    }

    /// The full image of `kv`, decoded (for comparing states).
    fn full(kv: &KvStore) -> SnapshotImage {
        SnapshotImage::decode(kv.snapshot_image().as_slice()).unwrap()
    }

    #[test]
    fn a_delta_on_top_of_its_base_gives_the_same_state_as_a_full_image() {
        let mut kv = KvStore::new();
        kv.set_member(1, "http://127.0.0.1:1".into());
        for i in 0..100u64 {
            kv.apply(i + 2, &put(&format!("k{i:03}"), "v", None));
        }
        // A new store tracks nothing: its first image is full even when asked for a delta.
        let base = kv.take_image(Some(0));
        assert_eq!((base.delta_base(), base.applied()), (None, 101));
        let mut back = KvStore::new();
        back.restore(&base.encode()).unwrap();

        kv.apply(200, &put("k000", "new", None));
        kv.apply(201, &put("k000", "newer", None));
        kv.apply(202, &put("fresh", "x", None));
        kv.apply(203, &put("gone-soon", "x", None));
        kv.apply(204, &Command { op: OpType::Delete as i32, key: "gone-soon".into(), ..Default::default() });
        kv.apply(205, &Command { op: OpType::Delete as i32, key: "k050".into(), ..Default::default() });
        kv.apply(206, &Command { op: OpType::Delete as i32, key: "never-was".into(), ..Default::default() });
        kv.apply(207, &put("k001", "cas lost", Some(1)));
        kv.set_member(2, "http://127.0.0.1:2".into());
        kv.remove_member(1);
        let delta = kv.take_image(Some(101));
        assert_eq!(delta.delta_base(), Some(101));
        // Frozen: later writes are in neither this delta nor its state.
        kv.apply(300, &put("k002", "later", None));
        let bytes = delta.encode();
        assert_eq!(bytes.len(), delta.encoded_len());
        let img = SnapshotImage::decode(bytes.as_slice()).unwrap();
        assert_eq!(img.version, DELTA_IMAGE);
        let keys: Vec<&str> = img.values.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(keys, ["fresh", "k000"], "written keys once each, in order");
        assert_eq!(img.deleted, ["gone-soon", "k050"]);
        assert!(bytes.len() * 10 < base.encode().len(), "a delta holds what changed");

        assert!(matches!(back.restore(&bytes), Err(KvError::Version(DELTA_IMAGE))), "not a full image");
        back.apply_delta(&bytes).unwrap();
        assert_eq!(back.applied(), 207);
        let mut expected = full(&kv);
        expected.values.retain(|v| v.key != "k002");
        expected.values.push(StoredValue { key: "k002".into(), value: b"v".to_vec(), revision: 4 });
        expected.values.sort_by(|a, b| a.key.cmp(&b.key));
        expected.applied_index = 207;
        assert_eq!(full(&back), expected);
        // Applied twice, or on the wrong base: refused, state unchanged.
        assert!(matches!(back.apply_delta(&bytes), Err(KvError::DeltaBase { base: 101, applied: 207 })));
        assert!(matches!(back.apply_delta(&base.encode()), Err(KvError::Version(FULL_IMAGE))));
        assert!(back.apply_delta(b"\xff\xff").is_err());
        assert_eq!(full(&back), expected);

        // The next delta starts where this one ended, and holds only k002.
        let next = kv.take_image(Some(207));
        back.apply_delta(&next.encode()).unwrap();
        assert_eq!(full(&back), full(&kv));
    }

    #[test]
    fn a_full_image_is_taken_when_a_delta_would_not_apply_or_not_pay() {
        let mut kv = KvStore::new();
        for i in 0..4000u64 {
            kv.apply(i + 2, &put(&format!("k{i:04}"), "v", None));
        }
        let _ = kv.take_image(None);
        kv.apply(5000, &put("k0000", "w", None));
        // The base asked for is not the image the changes were tracked from.
        assert_eq!(kv.take_image(Some(17)).delta_base(), None);
        kv.apply(5001, &put("k0001", "w", None));
        assert_eq!(kv.take_image(Some(4001)).delta_base(), None, "tracking restarted at 5000");
        kv.apply(5002, &put("k0002", "w", None));
        assert_eq!(kv.take_image(Some(5001)).delta_base(), Some(5001));
        // Rewriting more than half the keys: tracking stops, the next image is full.
        for i in 0..2500u64 {
            kv.apply(6000 + i, &put(&format!("k{i:04}"), "x", None));
        }
        assert!(kv.changes.is_empty() && kv.changes_since.is_none());
        assert_eq!(kv.take_image(Some(5002)).delta_base(), None);
        // A restored store tracks from its image on.
        let mut back = KvStore::new();
        back.restore(&kv.snapshot_image()).unwrap();
        back.apply(9000, &put("k0003", "y", None));
        assert_eq!(back.take_image(Some(8499)).delta_base(), Some(8499));
    }

    #[test]
    fn the_image_decoder_agrees_with_prost_and_refuses_what_prost_refuses() {
        let img = SnapshotImage {
            version: FULL_IMAGE,
            applied_index: 9,
            values: vec![
                StoredValue { key: String::new(), value: vec![], revision: 0 },
                StoredValue { key: "a".into(), value: b"1".to_vec(), revision: 3 },
                StoredValue { key: "é".into(), value: vec![0; 300], revision: 7 },
            ],
            members: vec![MemberRecord { id: 1, peer_url: "http://127.0.0.1:1".into() }],
            removed: vec![4],
            ..Default::default()
        };
        let mut bytes = img.encode_to_vec();
        // An unknown top-level field, and a value record with an unknown field, its
        // fields out of order and its key given twice (the last one wins).
        prost::encoding::uint64::encode(15, &5, &mut bytes);
        let mut rec = Vec::new();
        prost::encoding::uint64::encode(3, &8, &mut rec);
        prost::encoding::string::encode(1, &"x".to_string(), &mut rec);
        prost::encoding::bytes::encode(9, &vec![1u8, 2], &mut rec);
        prost::encoding::bytes::encode(2, &b"v".to_vec(), &mut rec);
        prost::encoding::string::encode(1, &"b".to_string(), &mut rec);
        prost::encoding::bytes::encode(3, &rec, &mut bytes);
        let expected = SnapshotImage::decode(bytes.as_slice()).unwrap();
        let (header, pairs) = decode_image(&bytes, "test").unwrap();
        let got: Vec<StoredValue> = pairs
            .iter()
            .map(|p| StoredValue { key: p.key().to_string(), value: p.value_bytes().to_vec(), revision: p.revision() })
            .collect();
        assert_eq!(got, expected.values);
        assert_eq!(SnapshotImage { values: expected.values.clone(), ..header }, expected);
        let mut kv = KvStore::new();
        kv.restore(&bytes).unwrap();
        assert_eq!(kv.get("b").map(|v| (v.data.to_vec(), v.revision)), Some((b"v".to_vec(), 8)));

        // What prost refuses, this refuses too.
        let mut bad_utf8 = Vec::new();
        let mut rec = Vec::new();
        prost::encoding::bytes::encode(1, &vec![0xff, 0xfe], &mut rec);
        prost::encoding::bytes::encode(3, &rec, &mut bad_utf8);
        let mut wrong_type = Vec::new();
        prost::encoding::uint64::encode(3, &1, &mut wrong_type);
        let mut bad_revision = Vec::new();
        let mut rec = Vec::new();
        prost::encoding::bytes::encode(3, &vec![1u8], &mut rec);
        prost::encoding::bytes::encode(3, &rec, &mut bad_revision);
        let truncated = img.encode_to_vec()[..20].to_vec();
        for (name, b) in [("bad utf8", bad_utf8), ("wrong type", wrong_type), ("bad revision", bad_revision), ("truncated", truncated)] {
            assert!(SnapshotImage::decode(b.as_slice()).is_err(), "{name}: prost accepts it");
            let e = KvStore::new().restore(&b).expect_err(name);
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn streamed_image_equals_the_prost_image_and_is_frozen() {
        let mut kv = KvStore::new();
        for i in 0..100u64 {
            kv.apply(i + 2, &put(&format!("k{i:03}"), &"x".repeat(i as usize), None));
        }
        kv.apply(200, &put("", "empty key is fine here", None));
        kv.set_member(1, "http://127.0.0.1:1".into());
        let src = kv.image_source();
        // Later writes do not leak into the frozen copy.
        kv.apply(300, &put("k000", "changed", None));
        let streamed = src.encode();
        let expected = SnapshotImage {
            version: 1,
            applied_index: 200,
            values: src
                .data
                .iter()
                .map(|p| StoredValue { key: p.key().to_string(), value: p.value_bytes().to_vec(), revision: p.revision() })
                .collect(),
            members: vec![MemberRecord { id: 1, peer_url: "http://127.0.0.1:1".into() }],
            removed: vec![],
            ..Default::default()
        };
        assert_eq!(SnapshotImage::decode(streamed.as_slice()).unwrap(), expected);
        assert_eq!(streamed.len(), expected.encoded_len());
        let mut back = KvStore::new();
        back.restore(&streamed).unwrap();
        assert_eq!(&back.get("k000").unwrap().data[..], b"");
        assert_eq!(back.len(), 101);
    }
}

#[cfg(test)]
mod restore_timing {
    use super::*;

    /// Time to restore an image of 1M pairs (8 B keys, 256 B values). A measurement, not
    /// a test: `cargo test --release -p raftkv-node --lib restore_timing -- --ignored
    /// --nocapture` (docs/performance.md).
    #[test]
    #[ignore]
    fn restore_1m() {
        let mut kv = KvStore::new();
        let value = vec![7u8; 256];
        for i in 0..1_000_000u64 {
            kv.apply(i + 2, &Command { op: OpType::Put as i32, key: format!("{i:08}"), value: value.clone(), ..Default::default() });
        }
        let img = kv.snapshot_image();
        drop(kv);
        for _ in 0..2 {
            let t = std::time::Instant::now();
            let mut back = KvStore::new();
            back.restore(&img).expect("restore");
            println!("restore of {} keys ({} MB image): {:?}", back.len(), img.len() >> 20, t.elapsed());
        }
    }
}
