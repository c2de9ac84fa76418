//! Graceful shutdown: one [`Shutdown`] signal observed by every task.
//!
//! SIGTERM or SIGINT (or the raft loop, when this node is removed) triggers it; the
//! listeners stop accepting, the raft loop hands leadership over and flushes, and the
//! process exits 0.

use tokio::sync::watch;

/// Why the node is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Still running.
    Running,
    /// A signal asked us to stop.
    Signal,
    /// This member was removed from the cluster.
    Removed,
    /// A fatal error (disk) stopped the raft loop.
    Fatal,
}

/// A cloneable shutdown trigger and observer.
#[derive(Clone)]
pub struct Shutdown {
    tx: watch::Sender<Reason>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A new, untriggered signal.
    pub fn new() -> Self {
        let (tx, _rx) = watch::channel(Reason::Running);
        Shutdown { tx }
    }

    /// Triggers shutdown (the first reason wins).
    pub fn trigger(&self, reason: Reason) {
        self.tx.send_if_modified(|r| {
            if *r == Reason::Running {
                *r = reason;
                true
            } else {
                false
            }
        });
    }

    /// The reason, or `Running`.
    pub fn reason(&self) -> Reason {
        *self.tx.borrow()
    }

    /// Whether shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        self.reason() != Reason::Running
    }

    /// Resolves once shutdown is triggered.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|r| *r != Reason::Running).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_reason_wins_and_waiters_wake() {
        let s = Shutdown::new();
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.wait().await });
        s.trigger(Reason::Removed);
        s.trigger(Reason::Signal);
        waiter.await.unwrap();
        assert_eq!(s.reason(), Reason::Removed);
    }
}
