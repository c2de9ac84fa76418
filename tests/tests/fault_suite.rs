//! Fault suite: faults injected into real raftkv-node clusters on 127.0.0.1.

use std::time::Duration;

use raftkv_tests::{faultkit, Cluster, StatusCode};

/// Torn WAL tail: a follower is killed with -9, its last segment loses a few bytes of
/// its written part; it must restart, and every acked write must be readable from it.
#[test]
#[ignore = "bug: cutting 5 bytes off the last synced WAL record of a killed follower makes the restarted node start with a log shorter than the commit the leader sends; the raft loop panics in raft-0.7 RaftLog::commit_to (to_commit out of range) instead of refusing to start with a clear error naming the file and offset"]
fn torn_wal_tail_restarts_with_all_data() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader(Duration::from_secs(20));
    let n = 60;
    for i in 0..n {
        c.put_retry(leader, &format!("torn-{i}"), &format!("v{i}"), Duration::from_secs(10));
    }
    let victim = if leader == 1 { 2 } else { 1 };
    let dir = c.node(victim).data_dir.clone();
    c.kill(victim);
    let segs = faultkit::wal_segments(&dir);
    let last = segs.last().expect("victim has WAL segments");
    let len = faultkit::tear_tail(last, 5).expect("tear tail");
    println!("tore {} to {len} bytes", last.display());
    c.spawn(victim);
    for i in 0..n {
        let url = format!("{}/v1/kv/torn-{i}?consistency=serializable", c.url(victim));
        raftkv_tests::wait_for(Duration::from_secs(30), &format!("torn-{i} on node {victim}"), || {
            let r = c.http.get(&url).ok()?;
            (r.status == StatusCode::OK).then(|| r.json())
        });
    }
    println!("operations checked: {n} acked writes read back from the restarted node");
}
