//! Fault suite: disk faults injected into real raftkv-node clusters on 127.0.0.1.
//!
//! * a torn WAL tail (an append that never completed) is cut off at start-up;
//! * a WAL that lost synced, acknowledged entries makes the node stop with a message;
//! * a corrupted WAL record or snapshot file makes the node refuse to start, naming the
//!   file and the offset; the member is then recovered by the documented procedure
//!   (docs/storage.md, "Recovering a damaged member"): wipe, remove, re-add, promote;
//! * a member whose volume was lost comes back empty and stays out of raft (`lost_log`)
//!   across a leader change and its own restart, until its id is removed and added again;
//! * a full disk (ENOSPC on a real, size-limited tmpfs; needs root, else the tests say
//!   SKIPPED and pass): a follower stalls and catches up, a single node answers 503, a
//!   follower that needs the leader's snapshot installs it once space returns.
//!
//! Each test prints "operations checked: N".

use std::time::{Duration, Instant};

use raftkv_tests::faultkit::{self, TornWrite};
use raftkv_tests::{wait_for, Cluster, Options, StatusCode};

const T: Duration = Duration::from_secs(30);

/// PUTs `n` keys `<prefix>-<i>` = `v<i>-<prefix>` through node `via` (retried until
/// acknowledged); returns them.
fn write_keys(c: &Cluster, via: u64, prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let (k, v) = (format!("{prefix}-{i}"), format!("v{i}-{prefix}"));
            c.put_retry(via, &k, &v, T);
            (k, v)
        })
        .collect()
}

/// Waits until node `id` serves every key with its value (serializable reads: what the
/// node itself has applied). Returns how many were checked.
fn check_keys(c: &Cluster, id: u64, keys: &[(String, String)]) -> usize {
    for (k, v) in keys {
        let url = format!("{}/v1/kv/{k}?consistency=serializable", c.url(id));
        let got = wait_for(T, &format!("{k} on node {id}"), || {
            let r = c.http.get(&url).ok()?;
            (r.status == StatusCode::OK).then(|| r.json()["value"].as_str().map(str::to_owned)).flatten()
        });
        assert_eq!(&got, v, "node {id} has a wrong value for {k}");
    }
    keys.len()
}

/// Waits until the leader reports that follower `id` has made everything committed
/// durable (its match index equals the commit index).
fn wait_replicated(c: &Cluster, leader: u64, id: u64) {
    wait_for(T, &format!("node {id} to match the leader's commit"), || {
        let m = c.http.get(&format!("{}/v1/members", c.url(leader))).ok()?.json();
        let commit = m["commit_index"].as_u64()?;
        let matched = m["members"].as_array()?.iter().find(|x| x["id"] == id)?["match_index"].as_u64()?;
        (matched == commit).then_some(())
    });
}

/// Waits (bounded) for node `id` to exit by itself and returns its exit code; panics
/// with the log's tail when it keeps running.
fn expect_exit(c: &mut Cluster, id: u64, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let child = c.nodes[(id - 1) as usize].child.as_mut().expect("node was started");
        if let Ok(Some(st)) = child.try_wait() {
            c.nodes[(id - 1) as usize].child = None;
            return st.code();
        }
        assert!(Instant::now() < deadline, "node {id} kept running (expected it to refuse)");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The recovery procedure of docs/storage.md ("Recovering a damaged member"), step by
/// step: wipe the data dir, remove the member on the leader, start the node again with
/// `--join` (same id, empty data dir), add it as a learner, promote it once it caught up.
fn recover_member(c: &mut Cluster, leader: u64, id: u64) {
    std::fs::remove_dir_all(&c.node(id).data_dir).expect("wipe the data dir");
    let r = c.http.delete(&format!("{}/v1/members/{id}", c.url(leader))).expect("DELETE member");
    assert_eq!(r.status, StatusCode::OK, "remove member {id}: {}", r.text());
    c.nodes[(id - 1) as usize].join = true;
    c.spawn(id);
    let body = format!(r#"{{"id":{id},"peer_url":"{}","learner":true}}"#, c.node(id).peer_url());
    let r = c.http.post(&format!("{}/v1/members", c.url(leader)), body).expect("POST member");
    assert_eq!(r.status, StatusCode::CREATED, "add learner {id}: {}", r.text());
    let mut answers: Vec<(u16, usize, String)> = Vec::new();
    wait_for(T, &format!("promotion of {id}"), || {
        let r = c.http.post(&format!("{}/v1/members/{id}/promote", c.url(leader)), "").ok()?;
        let code = r.status.as_u16();
        match answers.last_mut() {
            Some((c, n, _)) if *c == code => *n += 1,
            _ => answers.push((code, 1, r.text().trim().to_string())),
        }
        (r.status == StatusCode::OK).then_some(())
    });
    println!("promote answers (status, times, first body): {answers:?}");
    // The leader's member list shows the change once it is applied there.
    wait_for(T, &format!("{id} listed as a voter"), || {
        let m = c.http.get(&format!("{}/v1/members", c.url(leader))).ok()?.json();
        let me = m["members"].as_array()?.iter().find(|x| x["id"] == id)?.clone();
        (me["role"] == "voter").then_some(())
    });
}

/// Node `id`'s `lost_log` stays true for `window` (checked every 20 ms).
fn stays_quarantined(c: &Cluster, id: u64, window: Duration) -> usize {
    let end = Instant::now() + window;
    let mut looks = 0;
    while Instant::now() < end {
        if let Some(st) = c.status(id) {
            assert_eq!(st["lost_log"], true, "node {id} left its quarantine: {st}");
            looks += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(looks > 0, "node {id} never answered /v1/status");
    looks
}

/// A member's volume is lost: it comes back empty with `--join` (same id). The leader
/// that knew its log tells it so, and it takes no part in raft (`lost_log`): no vote, no
/// acknowledgement. A new leader starts every follower's progress at 0 and its
/// heartbeats claim nothing for the member, so neither a leader change nor a restart of
/// the member may end the quarantine (its vote could elect a candidate without entries
/// the member once acknowledged); only the removal and re-addition of its id do.
#[test]
fn a_member_with_a_lost_volume_stays_out_of_raft_across_a_leader_change_and_a_restart_until_re_added() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader(T);
    let keys = write_keys(&c, leader, "amnesia", 30);
    let victim = follower_of(leader);
    let third = (1..=3).find(|i| *i != leader && *i != victim).expect("a third member");
    wait_replicated(&c, leader, victim);
    c.kill(victim);
    std::fs::remove_dir_all(&c.node(victim).data_dir).expect("wipe the data dir");
    c.nodes[(victim - 1) as usize].join = true;
    c.spawn(victim);
    wait_for(T, "the victim to be quarantined", || (c.status(victim)?["lost_log"] == true).then_some(()));

    // Leadership moves to the third member.
    let r = c.http.post(&format!("{}/v1/leader/transfer", c.url(leader)), format!(r#"{{"to":{third}}}"#)).expect("transfer");
    assert!(r.status.is_success(), "transfer: {} {}", r.status, r.text());
    wait_for(T, "the third member to lead", || (c.status(third)?["role"] == "leader").then_some(()));
    let mut looks = stays_quarantined(&c, victim, Duration::from_secs(3));
    // A restart of the victim keeps it out too.
    c.kill(victim);
    c.spawn(victim);
    wait_for(T, "the victim to answer", || c.status(victim).map(|_| ()));
    looks += stays_quarantined(&c, victim, Duration::from_secs(3));

    // Removed and added again (as the operator does): the quarantine ends, the member
    // catches up from the leader and serves every acknowledged write.
    let r = c.http.delete(&format!("{}/v1/members/{victim}", c.url(third))).expect("DELETE member");
    assert_eq!(r.status, StatusCode::OK, "remove member {victim}: {}", r.text());
    let body = format!(r#"{{"id":{victim},"peer_url":"{}","learner":true}}"#, c.node(victim).peer_url());
    let r = c.http.post(&format!("{}/v1/members", c.url(third)), body).expect("POST member");
    assert_eq!(r.status, StatusCode::CREATED, "add learner {victim}: {}", r.text());
    let added_at = r.json()["members"].as_array().and_then(|m| m.iter().find(|x| x["id"] == victim).map(|x| x["added_at"].clone()));
    assert!(added_at.as_ref().is_some_and(|a| a.as_u64().is_some()), "the member list names the entry that added it: {added_at:?}");
    wait_for(T, "the quarantine to end", || (c.status(victim)?["lost_log"] == false).then_some(()));
    wait_for(T, &format!("promotion of {victim}"), || {
        let r = c.http.post(&format!("{}/v1/members/{victim}/promote", c.url(third)), "").ok()?;
        (r.status == StatusCode::OK).then_some(())
    });
    let n = check_keys(&c, victim, &keys);
    println!("operations checked: {n} acked writes read back, {looks} looks at the quarantine");
}

fn follower_of(leader: u64) -> u64 {
    if leader == 1 {
        2
    } else {
        1
    }
}

/// Torn WAL tail: a follower is killed with -9 and an incomplete append is added to the
/// written part of its last segment (a batch of copies of its last record cut at a
/// sector boundary, or a header promising more bytes than follow) — what a power loss
/// in the middle of an unacknowledged append leaves. It must start, cut the tail off (logged), and serve every acked write.
#[test]
fn torn_wal_tail_is_cut_off_and_the_node_has_every_acked_write() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader(T);
    let mut keys = write_keys(&c, leader, "torn", 40);
    let victim = follower_of(leader);
    let mut checked = 0;
    // Two rounds (one of each kind); RAFTKV_SOAK=1: twenty.
    let rounds = if std::env::var("RAFTKV_SOAK").is_ok() { 20 } else { 2 };
    let kinds = [TornWrite::BatchCutAtASectorBoundary, TornWrite::HeaderClaimingMore];
    for (round, how) in kinds.into_iter().cycle().take(rounds).enumerate() {
        wait_replicated(&c, leader, victim);
        c.kill(victim);
        let seg = faultkit::wal_segments(&c.node(victim).data_dir).pop().expect("victim has WAL segments");
        let (off, n) = faultkit::append_torn_record(&seg, how).expect("append a torn record");
        println!("{how:?}: {n} bytes at offset {off} of {}", seg.display());
        c.spawn(victim);
        let log = c.node(victim).log.clone();
        // Offsets only grow from round to round: this line is this round's.
        let line = format!("offset={off} ");
        wait_for(T, &format!("the truncation at {off} logged"), || {
            let text = String::from_utf8_lossy(&std::fs::read(&log).ok()?).into_owned();
            text.lines().any(|l| l.contains("truncating the torn tail") && l.contains(&line)).then_some(())
        });
        checked += check_keys(&c, victim, &keys);
        // It goes on working: new writes reach it, and the cut tail is gone for good.
        let more = write_keys(&c, leader, &format!("after-{round}"), 10);
        checked += check_keys(&c, victim, &more);
        keys.extend(more);
    }
    // A third, clean restart: nothing left to cut, nothing lost.
    wait_replicated(&c, leader, victim);
    c.kill(victim);
    c.spawn(victim);
    checked += check_keys(&c, victim, &keys);
    println!("operations checked: {checked} reads of acked writes on the restarted follower");
}

/// A flipped byte in the *last* record of a single node's WAL: the record was written
/// in full (every sector holds data) and synced, so this is damage to an acknowledged
/// record, not a torn write. The node must refuse to start naming the file and offset —
/// with no other member to fill the gap, cutting it off would silently lose it.
#[test]
fn bit_rot_in_the_last_synced_wal_record_is_refused_not_cut_off() {
    let mut c = Cluster::start(1);
    let keys = write_keys(&c, 1, "rot", 20);
    assert_eq!(c.terminate(1, T), Some(0));
    let seg = faultkit::wal_segments(&c.node(1).data_dir).pop().expect("WAL segment");
    let last = *faultkit::wal_records(&seg).expect("records").last().expect("a record");
    faultkit::flip_byte(&seg, last.end() - 1).expect("flip");
    c.spawn(1);
    let code = expect_exit(&mut c, 1, T);
    assert!(code.is_some_and(|x| x != 0), "exit code {code:?}");
    let log = c.node(1).log.clone();
    let expected = format!("WAL corrupt: {} at offset {}", seg.display(), last.offset);
    assert!(faultkit::log_contains(&log, &expected), "log lacks {expected:?}");
    assert!(!faultkit::log_contains(&log, "truncating the torn tail"), "the damaged record was cut off");
    // Flipped back, the node starts with everything.
    faultkit::flip_byte(&seg, last.end() - 1).expect("flip back");
    c.spawn(1);
    c.wait_leader(T);
    let n = check_keys(&c, 1, &keys);
    println!("operations checked: {n} acked writes after undoing the damage (refused with exit code {code:?})");
}

/// Synced, acknowledged entries cut off a follower's WAL (not a torn write: data loss,
/// e.g. a disk that dropped writes it confirmed). The storage cannot tell this from a
/// torn tail and opens; the leader's commit for this member is then beyond its log, and
/// the node must stop with exit code != 0 and a message saying how to recover — never
/// panic, never vote or ack without the data.
#[test]
fn acked_entries_cut_off_a_wal_stop_the_node_with_a_message() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader(T);
    let keys = write_keys(&c, leader, "lost", 30);
    let victim = follower_of(leader);
    wait_replicated(&c, leader, victim);
    c.kill(victim);
    let seg = faultkit::wal_segments(&c.node(victim).data_dir).pop().expect("victim has WAL segments");
    let off = faultkit::lose_last_entries(&seg).expect("cut the last entries");
    println!("zeroed {} from inside the Entries record at offset {off}", seg.display());
    c.spawn(victim);
    let code = expect_exit(&mut c, victim, T);
    assert!(code.is_some_and(|x| x != 0), "exit code {code:?}");
    let log = c.node(victim).log.clone();
    assert!(faultkit::log_contains(&log, "lost entries it acknowledged"), "no lost-entries message in the log");
    assert!(faultkit::log_contains(&log, "Recovering a damaged member"), "the message does not point at the procedure");
    // The other two go on; the member comes back by the documented procedure.
    recover_member(&mut c, leader, victim);
    let n = check_keys(&c, victim, &keys);
    println!("operations checked: {n} acked writes read back after the recovery (exit code {code:?})");
}

/// A byte flipped inside an early WAL record of a stopped follower: a restart refuses
/// (exit code != 0) naming the file and the record's offset; the documented recovery
/// brings the member back with all data.
#[test]
fn corrupted_wal_record_refuses_to_start_then_the_member_is_recovered() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader(T);
    let mut keys = write_keys(&c, leader, "walrot", 50);
    let victim = follower_of(leader);
    wait_replicated(&c, leader, victim);
    c.terminate(victim, T);
    let seg = faultkit::wal_segments(&c.node(victim).data_dir).pop().expect("victim has WAL segments");
    let recs = faultkit::wal_records(&seg).expect("records");
    // An early Entries record with good records after it: damage, not a torn write.
    let rec = *recs.iter().filter(|r| r.kind == faultkit::REC_ENTRIES).nth(2).expect("a third Entries record");
    assert!(recs.last().is_some_and(|l| l.offset > rec.offset + 1000), "the record is not early enough");
    faultkit::flip_byte(&seg, rec.offset + faultkit::RECORD_HEADER_LEN + 3).expect("flip");
    c.spawn(victim);
    let code = expect_exit(&mut c, victim, T);
    assert!(code.is_some_and(|x| x != 0), "exit code {code:?}");
    let log = c.node(victim).log.clone();
    let expected = format!("WAL corrupt: {} at offset {}", seg.display(), rec.offset);
    assert!(faultkit::log_contains(&log, &expected), "log lacks {expected:?}");
    assert!(faultkit::log_contains(&log, "Recovering a damaged member"), "the message does not point at the procedure");
    // Writes go on with two of three.
    keys.extend(write_keys(&c, leader, "walrot-degraded", 10));
    recover_member(&mut c, leader, victim);
    let mut checked = check_keys(&c, victim, &keys);
    // A restart of the recovered member keeps everything.
    c.kill(victim);
    c.spawn(victim);
    checked += check_keys(&c, victim, &keys);
    println!("operations checked: {checked} reads of acked writes on the recovered member (refused with exit code {code:?})");
}

/// A byte flipped in a stopped follower's newest snapshot file: a restart refuses
/// (exit code != 0) naming the file; the documented recovery brings it back.
#[test]
fn corrupted_snapshot_refuses_to_start_then_the_member_is_recovered() {
    let opts = Options { snapshot_count: 50, ..Options::default() };
    let mut c = Cluster::start_with(3, opts);
    let leader = c.wait_leader(T);
    let mut keys = write_keys(&c, leader, "snaprot", 300);
    let victim = follower_of(leader);
    wait_replicated(&c, leader, victim);
    c.terminate(victim, T);
    let snaps = faultkit::snapshot_files(&c.node(victim).data_dir);
    // The newest snapshot the WAL refers to (a newer file whose save the stop cut short
    // is an orphan: recovery deletes it, so damaging it would prove nothing).
    let newest = faultkit::snapshot_in_force(&c.node(victim).data_dir).expect("read the WAL").expect("a snapshot in force");
    assert!(snaps.contains(&newest), "{} not among {snaps:?}", newest.display());
    let len = std::fs::metadata(&newest).expect("snapshot size").len();
    println!("{} snapshot files; flipping a byte in {} ({len} bytes)", snaps.len(), newest.display());
    faultkit::flip_byte(&newest, len / 2).expect("flip");
    c.spawn(victim);
    let code = expect_exit(&mut c, victim, T);
    assert!(code.is_some_and(|x| x != 0), "exit code {code:?}");
    let log = c.node(victim).log.clone();
    let expected = format!("snapshot corrupt: {} at offset", newest.display());
    assert!(faultkit::log_contains(&log, &expected), "log lacks {expected:?}");
    assert!(faultkit::log_contains(&log, "Recovering a damaged member"), "the message does not point at the procedure");
    keys.extend(write_keys(&c, leader, "snaprot-degraded", 10));
    recover_member(&mut c, leader, victim);
    let mut checked = check_keys(&c, victim, &keys);
    c.kill(victim);
    c.spawn(victim);
    checked += check_keys(&c, victim, &keys);
    println!("operations checked: {checked} reads of acked writes on the recovered member (refused with exit code {code:?})");
}

/// Stops node `id` (SIGTERM), mounts a tmpfs of `mib` MiB, copies the node's data dir
/// onto it and restarts the node from there. `Err` when no tmpfs can be mounted.
fn move_to_tmpfs(c: &mut Cluster, id: u64, mib: u64) -> Result<faultkit::Tmpfs, String> {
    let fs = faultkit::Tmpfs::mount(&c.dir.path().join(format!("tmpfs-{id}")), mib)?;
    let code = c.terminate(id, T);
    assert_eq!(code, Some(0), "node {id} did not stop cleanly");
    let to = fs.dir.join("data");
    copy_dir(&c.node(id).data_dir, &to).expect("copy the data dir onto the tmpfs");
    c.nodes[(id - 1) as usize].data_dir = to;
    c.spawn(id);
    Ok(fs)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// A value of about 1 MB (the WAL's 64 MiB segments are preallocated, so a full disk
/// shows up when a segment fills and the next one cannot be created).
fn big_value(i: usize) -> String {
    format!("{i}:{}", "x".repeat(1_000_000))
}

fn is_running(c: &mut Cluster, id: u64) -> bool {
    let child = c.nodes[(id - 1) as usize].child.as_mut();
    child.is_some_and(|ch| matches!(ch.try_wait(), Ok(None)))
}

/// ENOSPC on one follower: its data dir is on a tmpfs filled to the last byte. Writes
/// through the leader keep being acknowledged (two of three have space); the full node
/// stays up; when the space returns it catches up with every acked write, and a restart
/// keeps them.
#[test]
fn a_follower_with_a_full_disk_stays_up_and_catches_up_when_space_returns() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader(T);
    let mut keys = write_keys(&c, leader, "pre", 10);
    let victim = follower_of(leader);
    // 100 MiB: the first (preallocated) 64 MiB segment, the rest filled; 80 MB of writes
    // fill that segment and need a second one.
    let fs = match move_to_tmpfs(&mut c, victim, 100) {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    check_keys(&c, victim, &keys);
    let filled = fs.fill("filler").expect("fill the tmpfs");
    println!("filler {filled} bytes, {} bytes free", fs.free_bytes());
    let mut readyz = Vec::new();
    let mut via_victim = Vec::new();
    for i in 0..80 {
        let (k, v) = (format!("big-{i}"), big_value(i));
        c.put_retry(leader, &k, &v, T);
        keys.push((k, v));
        if i % 10 == 9 {
            let r = c.http.get(&format!("{}/readyz", c.url(victim))).map(|r| r.status.as_u16());
            readyz.push(r);
            let w = c.put(victim, &format!("via-{i}"), "x").map(|s| s.as_u16());
            via_victim.push(w);
            assert!(is_running(&mut c, victim), "the follower with a full disk exited after {i} writes");
        }
    }
    println!("full follower: /readyz {readyz:?}; PUT through it {via_victim:?}");
    let log = c.node(victim).log.clone();
    assert!(faultkit::log_contains(&log, "disk full"), "the follower never hit the full disk");
    // Stalled: a write through it is not acknowledged while its disk is full.
    assert_eq!(via_victim.last(), Some(&Ok(503)), "a write through the full follower");
    std::fs::remove_file(fs.dir.join("filler")).expect("free the space");
    let mut checked = check_keys(&c, victim, &keys);
    // The backlog may have gone into the full segment in one write; the next writes
    // start a new segment. Less than 64 MiB came back, so it grows as written.
    let more = write_keys(&c, leader, "post", 3);
    checked += check_keys(&c, victim, &more);
    keys.extend(more);
    faultkit::wait_log(&log, "not enough free space to preallocate", T);
    c.kill(victim);
    c.spawn(victim);
    checked += check_keys(&c, victim, &keys);
    println!("operations checked: {checked} reads of acked writes on the follower that was full");
}

/// ENOSPC on a single-node cluster: once the disk is full, PUTs get 503 (never 2xx) and
/// the process stays up; after space is freed PUTs succeed; every acked write survives
/// kill -9 and a restart.
#[test]
fn a_single_node_with_a_full_disk_answers_503_then_recovers() {
    let mut c = Cluster::start(1);
    let fs = match move_to_tmpfs(&mut c, 1, 80) {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    c.wait_leader(T);
    let mut keys = write_keys(&c, 1, "pre", 5);
    let filled = fs.fill("filler").expect("fill the tmpfs");
    println!("filler {filled} bytes, {} bytes free", fs.free_bytes());
    let mut refused = None;
    for i in 0..100 {
        let (k, v) = (format!("big-{i}"), big_value(i));
        match c.put(1, &k, &v) {
            Ok(s) if s.is_success() => keys.push((k, v)),
            other => {
                println!("PUT {k} after {i} acked 1 MB writes: {other:?}");
                refused = Some(other);
                break;
            }
        }
    }
    let refused = refused.expect("100 MB acked on an 80 MiB filesystem");
    assert_eq!(refused, Ok(StatusCode::SERVICE_UNAVAILABLE));
    let mut bodies = Vec::new();
    for i in 0..5 {
        let r = c.http.put(&format!("{}/while-full-{i}", c.url(1)), "x").map(|r| (r.status, r.text()));
        assert!(!r.as_ref().is_ok_and(|(s, _)| s.is_success()), "a write was acked on a full disk: {r:?}");
        assert!(is_running(&mut c, 1), "the node exited on a full disk");
        bodies.push(r);
    }
    println!("PUTs on the full disk: {bodies:?}");
    assert!(
        bodies.iter().any(|r| r.as_ref().is_ok_and(|(s, b)| *s == StatusCode::SERVICE_UNAVAILABLE && b.contains("disk full"))),
        "no 503 saying the disk is full"
    );
    std::fs::remove_file(fs.dir.join("filler")).expect("free the space");
    keys.extend(write_keys(&c, 1, "after", 5));
    // A 503 leaves the outcome unknown: report whether the refused writes were applied.
    let applied: Vec<bool> = (0..5).map(|i| c.get(1, &format!("while-full-{i}")).is_ok_and(|v| v.is_some())).collect();
    println!("writes answered 503 on the full disk, applied after all: {applied:?}");
    faultkit::wait_log(&c.node(1).log, "not enough free space to preallocate", T);
    let mut checked = check_keys(&c, 1, &keys);
    c.kill(1);
    c.spawn(1);
    checked += check_keys(&c, 1, &keys);
    println!("operations checked: {checked} reads of acked writes");
}

/// ENOSPC while a follower needs a snapshot: it is paused while the leader writes and
/// compacts past it, its disk is full (its preallocated WAL segment still has room, the
/// snapshot files do not). It must stay up, and install the leader's snapshot and catch
/// up once space returns; a restart keeps everything.
#[test]
fn a_follower_with_a_full_disk_installs_the_leaders_snapshot_when_space_returns() {
    let opts = Options { snapshot_count: 20, ..Options::default() };
    let mut c = Cluster::start_with(3, opts);
    let leader = c.wait_leader(T);
    let mut keys = write_keys(&c, leader, "pre", 30);
    let victim = follower_of(leader);
    let fs = match move_to_tmpfs(&mut c, victim, 80) {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    check_keys(&c, victim, &keys);
    let filled = fs.fill("filler").expect("fill the tmpfs");
    println!("filler {filled} bytes, {} bytes free", fs.free_bytes());
    let victim_applied = c.status(victim).and_then(|s| s["applied_index"].as_u64()).expect("victim's applied index");
    c.signal(victim, libc::SIGSTOP);
    keys.extend(write_keys(&c, leader, "while-paused", 100));
    // The leader must have compacted past the paused follower (it keeps 20 entries behind
    // each snapshot), or the follower would catch up from the log instead.
    let mut more = 0;
    wait_for(T, "the leader to compact past the paused follower", || {
        let snap = c.status(leader)?["snapshot_index"].as_u64()?;
        if snap > victim_applied + 40 {
            return Some(());
        }
        more += 1;
        keys.extend(write_keys(&c, leader, &format!("while-paused-{more}"), 20));
        None
    });
    // Hold the pause past the leader's peer request timeout (5 s): appends it already
    // sent optimistically sit in the paused follower's socket and would let it catch up
    // from the log; once that request fails they are dropped and only a snapshot helps.
    std::thread::sleep(Duration::from_secs(6));
    c.signal(victim, libc::SIGCONT);
    let log = c.node(victim).log.clone();
    faultkit::wait_log(&log, "No space left on device", T);
    // Let it retry for a while: it must not exit.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert!(is_running(&mut c, victim), "the follower exited on a full disk");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(fs.dir.join("filler")).expect("free the space");
    let mut checked = check_keys(&c, victim, &keys);
    let text = String::from_utf8_lossy(&std::fs::read(&log).expect("log")).into_owned();
    let full = text.lines().filter(|l| l.contains("No space left")).collect::<Vec<_>>();
    println!("{} ENOSPC log lines, first: {:?}", full.len(), full.first());
    // The snapshot may fit in what the filler left (then it is installed before the WAL
    // hits ENOSPC) or not (then writing it is retried): either way it comes from the leader.
    assert!(text.contains("installed snapshot from leader"), "the follower caught up without the leader's snapshot");
    c.kill(victim);
    c.spawn(victim);
    checked += check_keys(&c, victim, &keys);
    println!("operations checked: {checked} reads of acked writes on the follower that was full");
}
