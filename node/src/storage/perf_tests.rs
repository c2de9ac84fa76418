//! Tests of the performance features: segment preallocation, the snapshot cache and its
//! hand-over at start, snapshot saving on another thread; an ignored start-up benchmark.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, Storage};

use super::*;

fn e(index: u64, term: u64) -> Entry {
    Entry { index, term, data: format!("value-{index}-{term}").into_bytes(), ..Default::default() }
}

fn cs(voters: &[u64]) -> ConfState {
    ConfState { voters: voters.to_vec(), ..Default::default() }
}

fn boot(s: &DiskStorage) {
    let snap = Snapshot {
        data: b"boot".to_vec(),
        metadata: Some(SnapshotMetadata { conf_state: Some(cs(&[1, 2, 3])), index: 1, term: 1 }),
    };
    s.apply_snapshot(snap).expect("bootstrap");
}

fn open_opts(dir: &Path, segment_bytes: u64, preallocate: bool) -> DiskStorage {
    DiskStorage::open(dir, StorageOptions { segment_bytes, preallocate }).expect("open")
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("wal"))
        .expect("wal dir")
        .map(|d| d.expect("entry").path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("wal"))
        .collect();
    v.sort();
    v
}

fn size(p: &Path) -> u64 {
    fs::metadata(p).expect("stat").len()
}

/// End of the last intact record of a segment.
fn written(p: &Path) -> u64 {
    let data = fs::read(p).expect("read segment");
    let mut off = wal::SEGMENT_HEADER_LEN;
    while let record::Scan::Record { next, .. } = record::scan(&data, off) {
        off = next;
    }
    off as u64
}

/// (start, end) of the last intact record of a segment.
fn last_record(p: &Path) -> (u64, u64) {
    let data = fs::read(p).expect("read segment");
    let (mut start, mut off) = (0, wal::SEGMENT_HEADER_LEN);
    while let record::Scan::Record { next, .. } = record::scan(&data, off) {
        start = off;
        off = next;
    }
    (start as u64, off as u64)
}

fn all_entries(s: &DiskStorage) -> Vec<Entry> {
    let (lo, hi) = (s.first_index().expect("first"), s.last_index().expect("last"));
    s.entries(lo, hi + 1, None, GetEntriesContext::empty(false)).expect("entries")
}

fn append_synced(s: &DiskStorage, lo: u64, hi: u64) {
    for i in lo..=hi {
        s.append(&[e(i, 1)]).expect("append");
        s.sync().expect("sync");
    }
}

#[test]
fn segments_are_preallocated_and_zeros_after_the_last_record_end_them() {
    let d = tempfile::tempdir().expect("tempdir");
    let seg_bytes = 32 << 10;
    let s = open_opts(d.path(), seg_bytes, true);
    append_synced(&s, 1, 40);
    let segs = segments(d.path());
    assert_eq!(segs.len(), 1);
    assert_eq!(size(&segs[0]), seg_bytes, "the segment is preallocated");
    assert_eq!(s.wal_bytes(), written(&segs[0]), "wal_bytes counts written bytes only");
    // Enough to rotate a few times: every segment is preallocated.
    append_synced(&s, 41, 3000);
    let segs = segments(d.path());
    assert!(segs.len() >= 3, "{} segments", segs.len());
    for p in &segs {
        assert!(size(p) >= seg_bytes, "{} is {} bytes", p.display(), size(p));
    }
    assert_eq!(s.wal_bytes(), segs.iter().map(|p| written(p)).sum::<u64>());
    drop(s);

    // Non-final segments are written up to (or past) their preallocated size before the
    // next one starts; zeros end the last one.
    let s = open_opts(d.path(), seg_bytes, true);
    assert_eq!(all_entries(&s), (1..=3000).map(|i| e(i, 1)).collect::<Vec<_>>());
    drop(s);

    // A torn final append inside the preallocated range: its tail never reached the disk
    // (zeros). The record is dropped, the segment keeps its preallocation.
    let last = segs.last().expect("segment").clone();
    let (rec_start, end) = last_record(&last);
    // Sectors are written whole: the part of the record in its last sector (or all of
    // it, when it lies in one sector) never landed.
    let from = ((end - 1) / 512 * 512).max(rec_start);
    let f = fs::OpenOptions::new().write(true).open(&last).expect("open segment");
    f.write_all_at(&vec![0u8; (end - from) as usize], from).expect("zero the tail");
    drop(f);
    let s = open_opts(d.path(), seg_bytes, true);
    assert_eq!(s.last_index().expect("last"), 2999);
    assert!(size(&last) >= seg_bytes);
    // And the log goes on from there.
    append_synced(&s, 3000, 3001);
    drop(s);
    let s = open_opts(d.path(), seg_bytes, true);
    assert_eq!(s.last_index().expect("last"), 3001);
    drop(s);

    // Non-zero bytes after the zeros are not the end: damage, the node refuses to start.
    let end = written(&last);
    let f = fs::OpenOptions::new().write(true).open(&last).expect("open segment");
    f.write_all_at(&[0x42], end + 1000).expect("garbage");
    drop(f);
    let err = DiskStorage::open(d.path(), StorageOptions { segment_bytes: seg_bytes, preallocate: true })
        .err()
        .expect("must be corrupt");
    match err {
        StorageError::Corrupt { path, offset, .. } => assert_eq!((path, offset), (last.clone(), end)),
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn without_preallocation_segments_grow_and_either_kind_reopens() {
    let d = tempfile::tempdir().expect("tempdir");
    let seg_bytes = 16 << 10;
    let s = open_opts(d.path(), seg_bytes, false);
    append_synced(&s, 1, 500);
    for p in segments(d.path()) {
        assert_eq!(size(&p), written(&p), "{} grows as written", p.display());
    }
    drop(s);
    // Reopened with preallocation: the active segment is extended, the records stay.
    let s = open_opts(d.path(), seg_bytes, true);
    let active = segments(d.path()).pop().expect("segment");
    assert_eq!(size(&active), seg_bytes);
    append_synced(&s, 501, 1000);
    drop(s);
    let s = open_opts(d.path(), seg_bytes, false);
    assert_eq!(all_entries(&s), (1..=1000).map(|i| e(i, 1)).collect::<Vec<_>>());
}

fn blob(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

fn snap_path(dir: &Path, term: u64, index: u64) -> PathBuf {
    dir.join("snap").join(snapshot::file_name(term, index))
}

#[test]
fn snapshot_is_read_once_and_cached_until_a_newer_one_is_saved() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open_opts(d.path(), 1 << 20, true);
    boot(&s);
    s.append(&(2..=20).map(|i| e(i, 1)).collect::<Vec<_>>()).expect("append");
    s.sync().expect("sync");
    let a = blob(1, 300_000);
    s.save_snapshot(10, &cs(&[1, 2]), a.clone()).expect("save");
    assert_eq!(s.snapshot(0, 2).expect("first read").data, a);
    // Served from memory now: the file is not read again.
    fs::remove_file(snap_path(d.path(), 1, 10)).expect("rm");
    for _ in 0..3 {
        let got = s.snapshot(5, 2).expect("cached");
        assert_eq!(got.data, a);
        assert_eq!(got.metadata.expect("meta").index, 10);
    }
    // A newer snapshot replaces it.
    let b = blob(2, 200_000);
    s.save_snapshot(15, &cs(&[1, 2, 3]), b.clone()).expect("save");
    let got = s.snapshot(11, 2).expect("newer");
    assert_eq!(got.data, b);
    assert_eq!(got.metadata.expect("meta").conf_state, Some(cs(&[1, 2, 3])));
    // An installed leader's snapshot replaces it too.
    let c = blob(3, 1000);
    s.apply_snapshot(Snapshot {
        data: c.clone(),
        metadata: Some(SnapshotMetadata { conf_state: Some(cs(&[1, 2])), index: 30, term: 2 }),
    })
    .expect("apply");
    assert_eq!(s.snapshot(0, 2).expect("installed").data, c);
    drop(s);

    // At start, the bytes open() read are handed over once, then the cache is empty.
    let s = open_opts(d.path(), 1 << 20, true);
    fs::remove_file(snap_path(d.path(), 2, 30)).expect("rm");
    assert_eq!(s.latest_snapshot().expect("latest").expect("some").full.data, c);
    assert!(s.latest_snapshot().expect_err("not kept: the file is gone").to_string().contains("snap"));
    assert_eq!(
        s.snapshot(0, 2).expect_err("nothing to serve"),
        raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable)
    );
}

#[test]
fn corrupt_snapshot_is_found_at_open() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open_opts(d.path(), 1 << 20, true);
        boot(&s);
        s.append(&[e(2, 1)]).expect("append");
        s.sync().expect("sync");
        s.save_snapshot(2, &cs(&[1]), blob(4, 100_000)).expect("save");
    }
    let path = snap_path(d.path(), 1, 2);
    let f = fs::OpenOptions::new().write(true).open(&path).expect("open");
    f.write_all_at(&[0xff], 50_000).expect("flip");
    drop(f);
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must fail");
    assert!(err.is_corrupt() && err.to_string().contains("payload crc mismatch"), "{err}");
}

/// The raft thread appends and syncs while another thread saves snapshots and compacts
/// (what the node does): nothing is lost, every snapshot is served with its own data,
/// and the reopened storage has the whole log and the newest snapshot.
#[test]
fn snapshots_saved_on_another_thread_while_appending() {
    const LAST: u64 = 3000;
    let d = tempfile::tempdir().expect("tempdir");
    let s = open_opts(d.path(), 32 << 10, true);
    boot(&s);
    let synced = AtomicU64::new(1);
    let done = AtomicBool::new(false);
    // Snapshots saved so far: the appender waits for one every 500 entries, so the two
    // threads overlap however the scheduler runs them (on tmpfs the appender alone
    // could finish before the snapshot thread first ran).
    let saved_so_far = AtomicU64::new(0);
    let data_for = |i: u64| format!("state at {i};").repeat(2000).into_bytes();
    let (saved, last_saved) = std::thread::scope(|sc| {
        let snapper = sc.spawn(|| {
            let mut saved = 0u32;
            let mut last = 1u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let finished = done.load(Ordering::Acquire);
                let idx = synced.load(Ordering::Acquire);
                if idx >= last + 100 || (finished && idx > last) {
                    s.save_snapshot(idx, &cs(&[1, 2, 3]), data_for(idx)).expect("save");
                    let got = s.snapshot(idx, 2).expect("serve");
                    assert_eq!(got.metadata.as_ref().map(|m| m.index), Some(idx));
                    assert_eq!(got.data, data_for(idx));
                    s.compact(idx.saturating_sub(50)).expect("compact");
                    saved += 1;
                    saved_so_far.store(u64::from(saved), Ordering::Release);
                    last = idx;
                } else if finished {
                    break;
                } else {
                    std::thread::yield_now();
                }
            }
            (saved, last)
        });
        for i in 2..=LAST {
            s.append(&[e(i, 1)]).expect("append");
            s.set_hard_state(&HardState { term: 1, vote: 1, commit: i }).expect("hs");
            s.sync().expect("sync");
            synced.store(i, Ordering::Release);
            if i % 500 == 0 {
                let want = i / 500;
                let deadline = Instant::now() + Duration::from_secs(30);
                while saved_so_far.load(Ordering::Acquire) < want && Instant::now() < deadline {
                    std::thread::yield_now();
                }
            }
        }
        done.store(true, Ordering::Release);
        snapper.join().expect("snapshot thread")
    });
    assert!(saved >= 5, "only {saved} snapshots were saved concurrently");
    assert_eq!(last_saved, LAST);
    drop(s);
    let s = open_opts(d.path(), 32 << 10, true);
    assert_eq!(s.snapshot_index(), LAST);
    assert_eq!(s.last_index().expect("last"), LAST);
    assert_eq!(s.hard_state().commit, LAST);
    let first = s.first_index().expect("first");
    assert!(first <= LAST - 49, "first index {first}");
    assert_eq!(all_entries(&s), (first..=LAST).map(|i| e(i, 1)).collect::<Vec<_>>());
    assert_eq!(s.latest_snapshot().expect("latest").expect("some").full.data, data_for(LAST));
}

/// Start-up with a ~300 MB snapshot (1M keys of 256 B, fabricated) and a 10k-entry WAL:
/// `open` + `latest_snapshot`, and serving it to followers.
/// `cargo test -p raftkv-node --release --lib storage::perf_tests::bench_ -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_startup_with_a_big_snapshot() {
    let base = std::env::var_os("RAFTKV_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let d = tempfile::tempdir_in(base).expect("tempdir");
    let keys = 1_000_000usize;
    let big = blob(7, keys * 300);
    {
        let s = open_opts(d.path(), 64 << 20, true);
        boot(&s);
        let value = vec![0x5au8; 256];
        for lo in (2..=10_001u64).step_by(100) {
            let b: Vec<Entry> = (lo..lo + 100)
                .map(|i| Entry { index: i, term: 1, data: value.clone(), ..Default::default() })
                .collect();
            s.append(&b).expect("append");
            s.set_hard_state(&HardState { term: 1, vote: 1, commit: lo + 99 }).expect("hs");
            s.sync().expect("sync");
        }
        let t = Instant::now();
        s.save_snapshot(5_000, &cs(&[1, 2, 3]), big.clone()).expect("save");
        println!("save_snapshot of {} MB: {:?}", big.len() >> 20, t.elapsed());
    }
    let mut total = Duration::ZERO;
    for cold in [false, true] {
        if cold {
            // Evict this directory's files from the page cache (only these files).
            let mut files = segments(d.path());
            files.push(snap_path(d.path(), 1, 5_000));
            for p in files {
                let f = fs::File::open(&p).expect("open for fadvise");
                // SAFETY: fadvise on a file descriptor we own; no memory is involved.
                let rc = unsafe {
                    libc::posix_fadvise(std::os::unix::io::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED)
                };
                assert_eq!(rc, 0, "fadvise");
            }
        }
        let t = Instant::now();
        let s = open_opts(d.path(), 64 << 20, true);
        let opened = t.elapsed();
        let snap = s.latest_snapshot().expect("latest").expect("some");
        let took = t.elapsed();
        assert_eq!(snap.full.data.len(), big.len());
        assert!(snap.full.data == big);
        drop(snap);
        let cache = if cold { "cold" } else { "warm" };
        println!("open: {opened:?}; open + latest_snapshot: {took:?} (page cache {cache})");
        total = total.max(took);
    }
    let s = open_opts(d.path(), 64 << 20, true);
    drop(s.latest_snapshot().expect("latest"));
    let t = Instant::now();
    let first = s.snapshot(0, 2).expect("snapshot");
    let t1 = t.elapsed();
    drop(first);
    let t = Instant::now();
    let again = s.snapshot(0, 2).expect("snapshot");
    let t2 = t.elapsed();
    assert_eq!(again.data.len(), big.len());
    println!("snapshot() for a follower: first {t1:?} (read + check), then {t2:?} (cached, one copy)");
    assert!(total < Duration::from_secs(5), "start-up took {total:?}");
}
