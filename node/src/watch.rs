//! Watches (`GET /v1/watch`, etcd's watch): a bounded history of the puts and deletes
//! this member applied, and the streams that follow it.
//!
//! The raft loop publishes each applied batch's changes ([`WatchHub::publish`]) before
//! it answers the reads waiting for them, so a stream started after a linearizable
//! barrier misses nothing acknowledged before it. Every stream reads the one shared
//! history from its own position (a slow client costs its position and a bounded queue
//! of encoded chunks, see `crate::api`), and one that falls behind the history's start
//! is told so (`compacted`) and must list again; one that reads nothing at all is cut
//! off by the connection's write-stall bound (`crate::http::WRITE_STALL`). Revisions are raft indexes, the same on every member, so a
//! client may resume on any member whose history still covers its position.
//!
//! docs/api.md describes the route and the stream's lines.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::kv::Event;

/// Default number of changes a member keeps for watchers (`--watch-history`).
pub const DEFAULT_HISTORY: usize = 10_000;

/// The history never keeps more than this many bytes of keys and values (a few
/// changes to large values must not pin gigabytes).
pub const MAX_HISTORY_BYTES: usize = 64 << 20;

/// Streams one member serves at most; more get `429 too_many_watches`.
pub const MAX_STREAMS: usize = 1024;

/// Which keys a stream follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Exactly this key.
    Key(String),
    /// Every key starting with this (every key when empty).
    Prefix(String),
}

impl Filter {
    /// Whether a change to `key` belongs to the stream.
    pub fn matches(&self, key: &str) -> bool {
        match self {
            Filter::Key(k) => k == key,
            Filter::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// Recent changes, oldest first.
#[derive(Debug)]
struct History {
    /// Every change with a revision above this is in `events`.
    start: u64,
    /// The applied index published last: the history is complete up to it.
    applied: u64,
    events: VecDeque<Event>,
    bytes: usize,
}

/// What one read of the history gave a stream.
#[derive(Debug)]
pub struct Batch {
    /// The matching changes after the stream's position, oldest first.
    pub events: Vec<Event>,
    /// The stream's new position: every change up to it has been looked at.
    pub position: u64,
    /// Whether the position is the end of the history (nothing more to read now).
    pub caught_up: bool,
}

/// The history and the streams following it; shared by the raft loop and the API.
#[derive(Debug)]
pub struct WatchHub {
    history: Mutex<History>,
    max_events: usize,
    /// The applied index last published, for streams waiting for more.
    applied_tx: tokio::sync::watch::Sender<u64>,
    streams: AtomicUsize,
    closed: AtomicBool,
}

/// One open stream's place among [`MAX_STREAMS`]; given back on drop.
#[derive(Debug)]
pub struct StreamSlot(Arc<WatchHub>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::metrics().watch_streams.dec();
    }
}

impl WatchHub {
    /// A hub whose history starts complete after `applied`, keeping at most
    /// `max_events` changes (and [`MAX_HISTORY_BYTES`]).
    pub fn new(applied: u64, max_events: usize) -> Arc<WatchHub> {
        let (applied_tx, _) = tokio::sync::watch::channel(applied);
        Arc::new(WatchHub {
            history: Mutex::new(History { start: applied, applied, events: VecDeque::new(), bytes: 0 }),
            max_events,
            applied_tx,
            streams: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        // The history holds no invariant a panic elsewhere could break halfway.
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the changes applied up to `applied` (oldest first) and wakes the streams.
    pub fn publish(&self, events: Vec<Event>, applied: u64) {
        {
            let mut h = self.lock();
            for e in events {
                h.bytes += e.size();
                h.events.push_back(e);
            }
            while h.events.len() > self.max_events || (h.bytes > MAX_HISTORY_BYTES && h.events.len() > 1) {
                let Some(old) = h.events.pop_front() else { break };
                h.bytes -= old.size();
                h.start = old.revision();
            }
            if self.max_events == 0 {
                h.start = h.start.max(applied);
            }
            if applied <= h.applied {
                return;
            }
            h.applied = applied;
        }
        self.applied_tx.send_replace(applied);
    }

    /// The state machine jumped to `applied` (a snapshot from the leader): the changes
    /// in between are unknown, so the history starts again there.
    pub fn reset(&self, applied: u64) {
        {
            let mut h = self.lock();
            h.events.clear();
            h.bytes = 0;
            h.start = applied;
            h.applied = applied;
        }
        self.applied_tx.send_replace(applied);
    }

    /// The applied index published last (changes up to it are in the history).
    pub fn applied(&self) -> u64 {
        self.lock().applied
    }

    /// The oldest position a stream can start from (its changes after it are all kept).
    pub fn start(&self) -> u64 {
        self.lock().start
    }

    /// Up to `max` changes matching `filter` after `position` (more when the last
    /// revision holds several), looking at no more than `max_scan` changes (likewise); `Err(start)` when the history no longer reaches back to
    /// `position` (it starts after `start`).
    pub fn read(&self, position: u64, filter: &Filter, max: usize, max_scan: usize) -> Result<Batch, u64> {
        let h = self.lock();
        if position < h.start {
            return Err(h.start);
        }
        let first = h.events.partition_point(|e| e.revision() <= position);
        let mut events = Vec::new();
        let mut last = position;
        for (scanned, e) in h.events.range(first..).enumerate() {
            // Never between two changes of one revision (a transaction): the position
            // says every change up to it was looked at.
            if (scanned >= max_scan || events.len() >= max) && e.revision() != last {
                return Ok(Batch { events, position: last, caught_up: false });
            }
            last = e.revision();
            if filter.matches(e.key()) {
                events.push(e.clone());
            }
        }
        Ok(Batch { events, position: position.max(h.applied), caught_up: true })
    }

    /// Wakes when something is published after the value last seen.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// A place for one more stream, or None when [`MAX_STREAMS`] are open.
    pub fn open_stream(self: &Arc<Self>) -> Option<StreamSlot> {
        let taken = self.streams.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_STREAMS).then_some(n + 1));
        taken.ok().map(|_| {
            crate::metrics::metrics().watch_streams.inc();
            StreamSlot(self.clone())
        })
    }

    /// The node is stopping: every stream ends now instead of holding up the shutdown.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.applied_tx.send_modify(|_| {});
    }

    /// Whether [`WatchHub::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{Command, KvStore, OpType, Txn, TxnOp};

    /// Applies puts (`Some`) and deletes (`None`) at increasing indexes from `first`,
    /// and returns the events they made.
    fn changes(kv: &mut KvStore, first: u64, ops: &[(&str, Option<&str>)]) -> Vec<Event> {
        kv.record_events();
        for (i, (k, v)) in ops.iter().enumerate() {
            let op = if v.is_some() { OpType::Put } else { OpType::Delete };
            let cmd = Command { request_id: i as u64, op: op as i32, key: k.to_string(), value: v.unwrap_or("").as_bytes().to_vec(), prev_revision: None, ..Default::default() };
            kv.apply(first + i as u64, &cmd);
        }
        kv.take_events()
    }

    fn keys(b: &Batch) -> Vec<(String, u64, bool)> {
        b.events.iter().map(|e| (e.key().to_string(), e.revision(), e.value().is_some())).collect()
    }

    #[test]
    fn a_stream_reads_matching_changes_after_its_position() {
        let mut kv = KvStore::new();
        let hub = WatchHub::new(9, 100);
        let ev = changes(&mut kv, 10, &[("a/1", Some("x")), ("b", Some("y")), ("a/2", Some("z")), ("a/1", None), ("nope", None)]);
        assert_eq!(ev.len(), 4, "deleting an absent key changes nothing");
        hub.publish(ev, 14);
        let all = Filter::Prefix(String::new());
        let b = hub.read(9, &Filter::Prefix("a/".into()), 100, 100).unwrap();
        assert_eq!(keys(&b), [("a/1".into(), 10, true), ("a/2".into(), 12, true), ("a/1".into(), 13, false)]);
        assert!(b.caught_up);
        assert_eq!(b.position, 14, "through the last applied index, events or not");
        assert_eq!(hub.read(11, &Filter::Key("a/1".into()), 100, 100).unwrap().events.len(), 1);
        assert!(hub.read(14, &all, 100, 100).unwrap().events.is_empty());
        // A position in the future waits there.
        let b = hub.read(20, &all, 100, 100).unwrap();
        assert_eq!((b.events.len(), b.position, b.caught_up), (0, 20, true));
        // Bounded reads resume where they stopped.
        let b = hub.read(9, &all, 2, 100).unwrap();
        assert_eq!((keys(&b).len(), b.position, b.caught_up), (2, 11, false));
        let b = hub.read(9, &Filter::Key("a/1".into()), 100, 2).unwrap();
        assert_eq!((keys(&b).len(), b.position, b.caught_up), (1, 11, false), "scanned two, one matched");
        let b = hub.read(b.position, &Filter::Key("a/1".into()), 100, 2).unwrap();
        assert_eq!((keys(&b).len(), b.position, b.caught_up), (1, 14, true));
        assert_eq!(hub.read(8, &all, 100, 100).unwrap_err(), 9, "before the history");
    }

    #[test]
    fn a_read_never_stops_inside_a_transaction() {
        let mut kv = KvStore::new();
        kv.record_events();
        let op = |key: &str| TxnOp { op: OpType::Put as i32, key: key.into(), value: b"v".to_vec(), lease: 0 };
        let txn = Txn { compare: Vec::new(), success: vec![op("t/1"), op("t/2"), op("t/3")], failure: Vec::new() };
        kv.apply(5, &Command { op: OpType::Txn as i32, txn: Some(txn), ..Default::default() });
        let mut ev = kv.take_events();
        ev.extend(changes(&mut kv, 6, &[("after", Some("x"))]));
        let hub = WatchHub::new(4, 100);
        hub.publish(ev, 6);
        let all = Filter::Prefix(String::new());
        let b = hub.read(4, &all, 1, 100).unwrap();
        assert_eq!(keys(&b).iter().map(|k| k.1).collect::<Vec<_>>(), [5, 5, 5], "all of revision 5, though max is 1");
        assert_eq!((b.position, b.caught_up), (5, false));
        let b = hub.read(4, &all, 100, 1).unwrap();
        assert_eq!((b.events.len(), b.position), (3, 5), "likewise for max_scan");
        let b = hub.read(5, &all, 1, 100).unwrap();
        assert_eq!(keys(&b), [("after".into(), 6, true)]);
    }

    #[test]
    fn the_history_is_bounded_and_a_snapshot_restarts_it() {
        let mut kv = KvStore::new();
        let hub = WatchHub::new(0, 3);
        hub.publish(changes(&mut kv, 1, &[("a", Some("1")), ("b", Some("2")), ("c", Some("3")), ("d", Some("4")), ("e", Some("5"))]), 5);
        let all = Filter::Prefix(String::new());
        assert_eq!(hub.read(1, &all, 100, 100).unwrap_err(), 2, "changes 1 and 2 are gone");
        let b = hub.read(2, &all, 100, 100).unwrap();
        assert_eq!(keys(&b).iter().map(|k| k.1).collect::<Vec<_>>(), [3, 4, 5]);
        hub.reset(50);
        assert_eq!(hub.read(5, &all, 100, 100).unwrap_err(), 50);
        assert_eq!(hub.read(50, &all, 100, 100).unwrap().position, 50);
        // Large values are bounded by bytes too.
        let hub = WatchHub::new(0, 1000);
        let big = "x".repeat(MAX_HISTORY_BYTES / 3);
        hub.publish(changes(&mut kv, 100, &[("a", Some(&big)), ("b", Some(&big)), ("c", Some(&big))]), 102);
        assert!(hub.read(99, &all, 100, 100).is_err());
        assert_eq!(hub.start(), 100, "only the first was dropped");
        // No history at all: only the future can be watched.
        let hub = WatchHub::new(0, 0);
        hub.publish(changes(&mut kv, 200, &[("a", Some("1"))]), 200);
        assert_eq!(hub.read(199, &all, 10, 10).unwrap_err(), 200);
        assert!(hub.read(200, &all, 10, 10).unwrap().events.is_empty());
    }

    #[test]
    fn publishing_wakes_subscribers_and_slots_are_bounded() {
        let hub = WatchHub::new(0, 10);
        let mut rx = hub.subscribe();
        rx.borrow_and_update();
        hub.publish(Vec::new(), 3);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);
        hub.publish(Vec::new(), 3);
        assert!(!rx.has_changed().unwrap(), "nothing new");
        hub.close();
        assert!(rx.has_changed().unwrap() && hub.is_closed());
        let slots: Vec<StreamSlot> = (0..MAX_STREAMS).map(|_| hub.open_stream().unwrap()).collect();
        assert!(hub.open_stream().is_none());
        drop(slots);
        assert!(hub.open_stream().is_some());
    }
}
