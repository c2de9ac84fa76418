//! Recorded client histories: the operations the linearizability checker reads, and a
//! thread-safe [`Recorder`] that timestamps them with a monotonic clock.
//!
//! A client calls [`Recorder::begin`] right before it sends a request (that takes the
//! invocation time) and finishes the returned [`Pending`] right after the response
//! arrives (that takes the completion time). A request whose fate is unknown (timeout,
//! connection lost after sending, 503 after the request may have been proposed) is
//! finished with [`Pending::unknown`], or simply dropped: a `Pending` dropped unfinished
//! is recorded as "outcome unknown", so a panic or an early `?` never loses a write
//! that may have been applied. Only a request known not to have taken effect (for
//! example: connection refused, nothing was sent) may be discarded with
//! [`Pending::failed`].
//!
//! Values are compared by bytes. Give every write a value unique to its key (for example
//! `"<client>-<seq>"`): the checker then can tell writes apart, and a compare-and-swap
//! on a revision can be recorded as a compare on the value that revision carried.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A stored value: opaque bytes.
pub type Value = Vec<u8>;

/// One key-value operation and, for reads and compare-and-swaps, what it returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The value written.
        value: Value,
    },
    /// Read `key`: `result` is the value seen, `None` when the key was absent.
    /// Ignored by the checker when the read has no completion.
    Get {
        /// The key.
        key: String,
        /// What the read returned (`None` = not found).
        result: Option<Value>,
    },
    /// Remove `key` (removing an absent key is fine and changes nothing).
    Delete {
        /// The key.
        key: String,
    },
    /// Set `key` to `new` if its current value equals `expected` (`None` = the key must
    /// be absent). A revision precondition is recorded as the value read at that
    /// revision, which is equivalent when values are unique per key.
    Cas {
        /// The key.
        key: String,
        /// The value the key must hold (`None` = must be absent).
        expected: Option<Value>,
        /// The value written on success.
        new: Value,
        /// Whether the swap happened; `None` when not known.
        succeeded: Option<bool>,
    },
}

impl Op {
    /// The key the operation touches.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. }
            | Op::Get { key, .. }
            | Op::Delete { key }
            | Op::Cas { key, .. } => key,
        }
    }

    /// Whether the operation may change the store.
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Get { .. })
    }
}

/// One operation of one client with its real-time interval.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Event {
    /// The client (process / thread) that issued it; for explanations only.
    pub client: u64,
    /// The operation and its result.
    pub op: Op,
    /// When the request was sent, in nanoseconds of a monotonic clock.
    pub invoke: u64,
    /// When the response arrived; `None` when the outcome is unknown (a write is then
    /// "possibly applied": at any time after `invoke`, or never).
    pub complete: Option<u64>,
}

/// A completing method was used on the wrong kind of operation, for example
/// [`Pending::read`] on a put. The operation is still recorded, as "outcome unknown".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MismatchError {
    /// The operation as recorded.
    pub op: Op,
    /// The completing method that was called.
    pub called: &'static str,
}

impl fmt::Display for MismatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` does not complete {:?}; recorded it with an unknown outcome",
            self.called, self.op
        )
    }
}

impl std::error::Error for MismatchError {}

/// Collects [`Event`]s from many threads; timestamps are nanoseconds since the recorder
/// was created, from [`Instant`] (monotonic, comparable across threads).
#[derive(Debug)]
pub struct Recorder {
    origin: Instant,
    events: Mutex<Vec<Event>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty recorder whose clock starts now.
    pub fn new() -> Self {
        Recorder {
            origin: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the recorder was created.
    pub fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Marks the invocation of `op` by `client` now; finish the returned [`Pending`]
    /// when the response arrives. For a [`Op::Get`] or [`Op::Cas`] the result fields
    /// of `op` are placeholders, filled in by the finishing call.
    pub fn begin(&self, client: u64, op: Op) -> Pending<'_> {
        let invoke = self.now();
        Pending {
            recorder: self,
            client,
            op: Some(op),
            invoke,
        }
    }

    /// Appends a complete event as is (for importing histories).
    pub fn record(&self, event: Event) {
        self.lock().push(event);
    }

    /// A copy of the events recorded so far, in completion order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// Number of events recorded so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The recorded events.
    pub fn into_events(self) -> Vec<Event> {
        self.events
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        // A panicking client thread must not make the history unreadable: the data is a
        // plain Vec that every push leaves consistent.
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An operation in flight. Finish it with exactly one of its methods; dropping it
/// unfinished records it with an unknown outcome.
#[derive(Debug)]
#[must_use = "finish the operation (dropping it records an unknown outcome)"]
pub struct Pending<'a> {
    recorder: &'a Recorder,
    client: u64,
    op: Option<Op>,
    invoke: u64,
}

impl Pending<'_> {
    /// When the operation was invoked (recorder nanoseconds).
    pub fn invoke_time(&self) -> u64 {
        self.invoke
    }

    /// A put or delete was acknowledged.
    pub fn ok(mut self) -> Result<(), MismatchError> {
        match self.op.take() {
            Some(op @ (Op::Put { .. } | Op::Delete { .. })) => {
                self.finish(op, true);
                Ok(())
            }
            other => self.mismatch(other, "ok"),
        }
    }

    /// A get returned `result` (`None` = key not found).
    pub fn read(mut self, result: Option<Value>) -> Result<(), MismatchError> {
        match self.op.take() {
            Some(Op::Get { key, .. }) => {
                self.finish(Op::Get { key, result }, true);
                Ok(())
            }
            other => self.mismatch(other, "read"),
        }
    }

    /// A compare-and-swap answered: swapped (`true`) or precondition failed (`false`).
    pub fn cas(mut self, succeeded: bool) -> Result<(), MismatchError> {
        match self.op.take() {
            Some(Op::Cas {
                key, expected, new, ..
            }) => {
                self.finish(
                    Op::Cas {
                        key,
                        expected,
                        new,
                        succeeded: Some(succeeded),
                    },
                    true,
                );
                Ok(())
            }
            other => self.mismatch(other, "cas"),
        }
    }

    /// The outcome is unknown (timeout, lost connection, 503 after sending): a write
    /// may or may not have taken effect.
    pub fn unknown(mut self) {
        if let Some(op) = self.op.take() {
            self.finish(op, false);
        }
    }

    /// The operation certainly did not take effect (nothing was sent); it is not
    /// recorded. When in doubt, use [`Pending::unknown`].
    pub fn failed(mut self) {
        self.op = None;
    }

    fn mismatch(&mut self, op: Option<Op>, called: &'static str) -> Result<(), MismatchError> {
        match op {
            Some(op) => {
                self.finish(op.clone(), false);
                Err(MismatchError { op, called })
            }
            // Unreachable: `op` is only taken by the consuming methods.
            None => Ok(()),
        }
    }

    fn finish(&mut self, op: Op, completed: bool) {
        let complete = completed.then(|| self.recorder.now());
        self.recorder.record(Event {
            client: self.client,
            op,
            invoke: self.invoke,
            complete,
        });
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.finish(op, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, v: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: v.into(),
        }
    }

    #[test]
    fn records_intervals_in_order_with_results() {
        let r = Recorder::new();
        let p = r.begin(1, put("k", "a"));
        p.ok().expect("put completes with ok");
        let g = r.begin(
            2,
            Op::Get {
                key: "k".into(),
                result: None,
            },
        );
        g.read(Some(b"a".to_vec()))
            .expect("get completes with read");
        let ev = r.into_events();
        assert_eq!(ev.len(), 2);
        assert_eq!(
            ev[1].op,
            Op::Get {
                key: "k".into(),
                result: Some(b"a".to_vec())
            }
        );
        let c0 = ev[0].complete.expect("completed");
        assert!(ev[0].invoke <= c0);
        assert!(c0 <= ev[1].invoke, "the get began after the put completed");
        assert!(ev[1].complete.is_some());
    }

    #[test]
    fn dropped_or_unknown_ops_have_no_completion_and_failed_ones_vanish() {
        let r = Recorder::new();
        drop(r.begin(1, put("k", "a")));
        r.begin(1, put("k", "b")).unknown();
        r.begin(1, put("k", "c")).failed();
        let ev = r.into_events();
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| e.complete.is_none()));
        assert_eq!(ev[0].op, put("k", "a"));
        assert_eq!(ev[1].op, put("k", "b"));
    }

    #[test]
    fn mismatched_completion_is_an_error_and_is_kept_as_unknown() {
        let r = Recorder::new();
        let err = r
            .begin(1, put("k", "a"))
            .read(None)
            .expect_err("read() on a put");
        assert_eq!(err.called, "read");
        let ev = r.into_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].complete, None);
    }

    #[test]
    fn cas_result_is_recorded() {
        let r = Recorder::new();
        let op = Op::Cas {
            key: "k".into(),
            expected: None,
            new: b"x".to_vec(),
            succeeded: None,
        };
        r.begin(3, op).cas(false).expect("cas completes");
        let ev = r.events();
        assert!(matches!(
            ev[0].op,
            Op::Cas {
                succeeded: Some(false),
                ..
            }
        ));
    }

    #[test]
    fn recorder_is_shared_across_threads() {
        let r = Recorder::new();
        std::thread::scope(|s| {
            for c in 0..4u64 {
                let r = &r;
                s.spawn(move || {
                    for i in 0..50 {
                        r.begin(c, put("k", &format!("{c}-{i}"))).ok().expect("put");
                    }
                });
            }
        });
        let ev = r.into_events();
        assert_eq!(ev.len(), 200);
        // Events of one client are sequential in time.
        for c in 0..4u64 {
            let mine: Vec<_> = ev.iter().filter(|e| e.client == c).collect();
            for w in mine.windows(2) {
                assert!(w[0].complete.expect("completed") <= w[1].invoke);
            }
        }
    }
}
