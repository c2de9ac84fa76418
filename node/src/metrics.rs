//! Prometheus metrics, named in etcd's style with a `raftkv_` prefix.
//!
//! One process-wide registry ([`metrics()`]); `GET /metrics` renders it in the text format.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    /// 1 when a leader is known.
    pub has_leader: IntGauge,
    /// 1 when this node is the leader.
    pub is_leader: IntGauge,
    /// Leader changes seen by this node.
    pub leader_changes: IntCounter,
    /// Current raft term.
    pub term: IntGauge,
    /// Commit index (etcd: proposals_committed_total).
    pub proposals_committed: IntGauge,
    /// Applied index (etcd: proposals_applied_total).
    pub proposals_applied: IntGauge,
    /// Client proposals waiting for their commit.
    pub proposals_pending: IntGauge,
    /// Client proposals that failed (dropped, timed out, refused by the disk).
    pub proposals_failed: IntCounter,
    /// Forwarded client proposals the leader dropped unappended, proposed again.
    pub proposals_dropped: IntCounter,
    /// WAL fsync latency.
    pub wal_fsync_seconds: Histogram,
    /// Snapshot save latency.
    pub snapshot_save_seconds: Histogram,
    /// Snapshots saved, by kind (`full`, `delta`).
    pub snapshots_saved: IntCounterVec,
    /// Bytes of WAL segments on disk.
    pub wal_bytes: IntGauge,
    /// Bytes of snapshot files on disk.
    pub snapshot_bytes: IntGauge,
    /// Files compaction freed but could not delete yet.
    pub files_pending_delete: IntGauge,
    /// Index of the newest snapshot.
    pub snapshot_index: IntGauge,
    /// Bytes sent to peers, by peer id.
    pub peer_sent_bytes: IntCounterVec,
    /// Bytes received from peers, by peer id.
    pub peer_received_bytes: IntCounterVec,
    /// Raft messages dropped because a peer's queue was full or it was unknown, by peer.
    pub peer_dropped_messages: IntCounterVec,
    /// Peer requests refused as from another cluster (`cluster_id_mismatch`), and raft
    /// messages from peers dropped before raft saw them because no correct member sends
    /// them (`raft_loop` vetting), by reason.
    pub peer_refused_messages: IntCounterVec,
    /// Round trip of a batch of raft messages to a peer, by peer.
    pub peer_round_trip_seconds: HistogramVec,
    /// Client HTTP requests by route and status code.
    pub http_requests: IntCounterVec,
    /// Client HTTP request latency by route.
    pub http_request_seconds: HistogramVec,
    /// Keys in the store.
    pub keys: IntGauge,
    /// Watch streams open on this member.
    pub watch_streams: IntGauge,
    /// Watch streams ended because they fell behind the history.
    pub watch_compacted: IntCounter,
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        // Metric definitions are static; a failure here is a programming error caught by tests.
        let disk = exponential_buckets(0.0005, 2.0, 14).expect("buckets");
        let net = exponential_buckets(0.0001, 2.0, 16).expect("buckets");
        let http = exponential_buckets(0.0001, 2.0, 18).expect("buckets");
        Metrics {
            has_leader: gauge(&r, "raftkv_server_has_leader", "Whether a leader exists: 1 if one is known, 0 if not."),
            is_leader: gauge(&r, "raftkv_server_is_leader", "Whether this member is the leader: 1 if it is, 0 if not."),
            leader_changes: counter(&r, "raftkv_server_leader_changes_seen_total", "Number of leader changes seen by this member."),
            term: gauge(&r, "raftkv_server_term", "The current raft term of this member."),
            proposals_committed: gauge(&r, "raftkv_server_proposals_committed_total", "The total number of consensus proposals committed (the commit index)."),
            proposals_applied: gauge(&r, "raftkv_server_proposals_applied_total", "The total number of consensus proposals applied (the applied index)."),
            proposals_pending: gauge(&r, "raftkv_server_proposals_pending", "Client proposals from this member waiting for their commit."),
            proposals_failed: counter(&r, "raftkv_server_proposals_failed_total", "Client proposals that failed: dropped, timed out or refused by the disk."),
            proposals_dropped: counter(&r, "raftkv_server_proposals_retried_total", "Client proposals this member forwarded that the leader dropped without appending them (a leadership transfer), proposed again."),
            wal_fsync_seconds: histogram(&r, "raftkv_disk_wal_fsync_duration_seconds", "Latency of WAL fsync calls (one per raft Ready).", disk.clone()),
            snapshot_save_seconds: histogram(&r, "raftkv_disk_snapshot_save_total_duration_seconds", "Latency of saving a snapshot to disk.", disk),
            snapshots_saved: counter_vec(&r, "raftkv_disk_snapshots_saved_total", "Snapshots saved by this member, by kind: full image or delta.", &["kind"]),
            wal_bytes: gauge(&r, "raftkv_disk_wal_size_bytes", "Bytes of write-ahead-log segments on disk."),
            snapshot_bytes: gauge(&r, "raftkv_disk_snapshot_size_bytes", "Bytes of snapshot files on disk."),
            files_pending_delete: gauge(&r, "raftkv_disk_files_pending_delete", "WAL segments and snapshot files log compaction freed but could not delete yet (failing unlinks, retried at every compaction)."),
            snapshot_index: gauge(&r, "raftkv_server_snapshot_index", "Raft index of the newest snapshot."),
            peer_sent_bytes: counter_vec(&r, "raftkv_network_peer_sent_bytes_total", "Bytes of raft messages sent to a peer.", &["to"]),
            peer_received_bytes: counter_vec(&r, "raftkv_network_peer_received_bytes_total", "Bytes of raft messages received from a peer.", &["from"]),
            peer_dropped_messages: counter_vec(&r, "raftkv_network_peer_dropped_messages_total", "Raft messages dropped for a peer (queue full, unknown peer).", &["to"]),
            peer_refused_messages: counter_vec(&r, "raftkv_network_peer_refused_messages_total", "Peer requests from another cluster, and raft messages no correct member sends, refused before raft saw them.", &["reason"]),
            peer_round_trip_seconds: histogram_vec(&r, "raftkv_network_peer_round_trip_time_seconds", "Round trip of one batch of raft messages to a peer.", &["to"], net),
            http_requests: counter_vec(&r, "raftkv_http_requests_total", "Client HTTP requests by route and status code.", &["route", "code"]),
            http_request_seconds: histogram_vec(&r, "raftkv_http_request_duration_seconds", "Client HTTP request latency by route.", &["route"], http),
            keys: gauge(&r, "raftkv_keys_total", "Number of keys in the store."),
            watch_streams: gauge(&r, "raftkv_watch_streams", "Watch streams open on this member."),
            watch_compacted: counter(&r, "raftkv_watch_compacted_total", "Watch streams ended because they fell behind this member's history of changes (the client must list again)."),
            registry: r,
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_with_help_text() {
        let m = super::metrics();
        m.has_leader.set(1);
        m.http_requests.with_label_values(&["kv_get", "200"]).inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("# HELP raftkv_server_has_leader"));
        assert!(text.contains("raftkv_server_has_leader 1"));
        assert!(text.contains("raftkv_http_requests_total{code=\"200\",route=\"kv_get\"} 1"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert!(text.contains(&format!("# HELP {name} ")), "{name} lacks HELP");
        }
    }
}
