//! Tests of `DiskStorage`: durability across reopen, torn tails, corruption, snapshots,
//! compaction, and MemStorage equivalence (proptest).

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, Storage};

use super::*;

fn e(index: u64, term: u64) -> Entry {
    Entry { index, term, data: format!("value-{index}-{term}").into_bytes(), ..Default::default() }
}

fn ents(lo: u64, hi: u64, term: u64) -> Vec<Entry> {
    (lo..=hi).map(|i| e(i, term)).collect()
}

fn cs(voters: &[u64]) -> ConfState {
    ConfState { voters: voters.to_vec(), ..Default::default() }
}

fn snap(index: u64, term: u64, data: &[u8]) -> Snapshot {
    Snapshot {
        data: data.to_vec(),
        metadata: Some(SnapshotMetadata { conf_state: Some(cs(&[1, 2, 3])), index, term }),
    }
}

fn open(dir: &Path) -> DiskStorage {
    DiskStorage::open(dir, StorageOptions::default()).expect("open")
}

fn open_small(dir: &Path, segment_bytes: u64) -> DiskStorage {
    DiskStorage::open(dir, StorageOptions { segment_bytes, ..StorageOptions::default() }).expect("open")
}

fn all_entries(s: &DiskStorage) -> Vec<Entry> {
    let (lo, hi) = (s.first_index().expect("first"), s.last_index().expect("last"));
    s.entries(lo, hi + 1, None, GetEntriesContext::empty(false)).expect("entries")
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

/// Bytes of a segment up to the end of its last intact record (segments are
/// preallocated, so this is not the file's size).
fn file_len(p: &Path) -> u64 {
    let data = fs::read(p).expect("read segment");
    let mut off = wal::SEGMENT_HEADER_LEN;
    while let record::Scan::Record { next, .. } = record::scan(&data, off) {
        off = next;
    }
    off as u64
}

#[test]
fn fresh_then_round_trip() {
    let d = tempfile::tempdir().expect("tempdir");
    let hs = HardState { term: 3, vote: 2, commit: 4 };
    {
        let s = open(d.path());
        assert!(s.is_fresh());
        assert_eq!(s.sync().expect("noop sync"), Duration::ZERO);
        s.append(&ents(1, 5, 3)).expect("append");
        s.set_hard_state(&hs).expect("hs");
        s.sync().expect("sync");
        assert!(s.wal_bytes() > 0);
    }
    let s = open(d.path());
    assert!(!s.is_fresh());
    assert_eq!(all_entries(&s), ents(1, 5, 3));
    assert_eq!(s.hard_state(), hs);
    assert_eq!(s.initial_state().expect("state").hard_state, hs);
    assert_eq!(s.wal_bytes(), segments(d.path()).iter().map(|p| file_len(p)).sum::<u64>());
}

#[test]
fn unsynced_records_are_not_durable_but_synced_ones_are() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open(d.path());
        s.append(&ents(1, 3, 1)).expect("append");
        s.sync().expect("sync");
        s.append(&ents(4, 6, 1)).expect("append, never synced");
    }
    let s = open(d.path());
    assert_eq!(all_entries(&s), ents(1, 3, 1));
}

#[test]
fn conflicting_suffix_overwrite_survives_reopen() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open(d.path());
        s.append(&ents(1, 10, 1)).expect("append");
        s.sync().expect("sync");
        s.append(&ents(6, 7, 2)).expect("overwrite");
        s.sync().expect("sync");
        assert_eq!(s.last_index().expect("last"), 7);
    }
    let s = open(d.path());
    let mut want = ents(1, 5, 1);
    want.extend(ents(6, 7, 2));
    assert_eq!(all_entries(&s), want);
}

#[test]
fn append_rejects_gaps_and_compacted_overwrites() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open(d.path());
    s.append(&ents(1, 3, 1)).expect("append");
    assert!(matches!(s.append(&ents(5, 6, 1)), Err(StorageError::InvalidAppend(_))));
    assert!(matches!(s.append(&[e(4, 1), e(6, 1)]), Err(StorageError::InvalidAppend(_))));
    s.apply_snapshot(snap(10, 2, b"x")).expect("snapshot");
    assert!(matches!(s.append(&ents(9, 11, 2)), Err(StorageError::InvalidAppend(_))));
    s.append(&ents(11, 12, 2)).expect("after snapshot");
}

/// Recovery refuses indexes and terms beyond `MAX_INDEX` (2^63 - 1); the write path must
/// refuse them too, with an error, or a node could write a WAL it cannot restart from.
#[test]
fn indexes_and_terms_beyond_what_recovery_reads_are_refused_when_written() {
    let d = tempfile::tempdir().expect("tempdir");
    let hs = HardState { term: MAX_INDEX, vote: 1, commit: MAX_INDEX };
    {
        let s = open(d.path());
        assert!(matches!(s.append(&[e(1, MAX_INDEX + 1)]), Err(StorageError::InvalidAppend(_))));
        assert!(matches!(s.append(&[Entry { entry_type: 7, ..e(1, 1) }]), Err(StorageError::InvalidAppend(_))));
        assert!(matches!(
            s.set_hard_state(&HardState { term: MAX_INDEX + 1, ..HardState::default() }),
            Err(StorageError::InvalidHardState(_))
        ));
        assert!(matches!(s.apply_snapshot(snap(MAX_INDEX + 1, 1, b"x")), Err(StorageError::InvalidSnapshot(_))));
        assert!(matches!(s.apply_snapshot(snap(5, u64::MAX, b"x")), Err(StorageError::InvalidSnapshot(_))));
        assert!(snap_names(d.path()).is_empty(), "no snapshot file for a refused snapshot");
        assert!(s.is_fresh() && s.last_index().expect("last") == 0 && s.hard_state() == HardState::default());
        // The bound itself is fine, and an entry past it is refused.
        s.apply_snapshot(snap(MAX_INDEX, MAX_INDEX, b"at the bound")).expect("snapshot at the bound");
        assert!(matches!(s.append(&[e(MAX_INDEX + 1, MAX_INDEX)]), Err(StorageError::InvalidAppend(_))));
        assert!(matches!(
            s.set_hard_state(&HardState { commit: MAX_INDEX + 1, ..hs.clone() }),
            Err(StorageError::InvalidHardState(_))
        ));
        s.set_hard_state(&hs).expect("hard state at the bound");
        s.sync().expect("sync");
    }
    // Everything that was written reads back.
    let s = open(d.path());
    assert_eq!((s.snapshot_index(), s.hard_state()), (MAX_INDEX, hs));
    assert_eq!(s.latest_snapshot().expect("latest").expect("some").full.data, b"at the bound");
}

/// Writes three single-entry records and returns the segment path and the file lengths
/// before/after each record.
fn three_records(dir: &Path) -> (PathBuf, Vec<u64>) {
    let s = open(dir);
    let seg = segments(dir).pop().expect("segment");
    let mut lens = vec![file_len(&seg)];
    for i in 1..=3 {
        s.append(&[e(i, 1)]).expect("append");
        s.sync().expect("sync");
        lens.push(file_len(&seg));
    }
    (seg, lens)
}

#[test]
fn torn_tail_is_truncated_at_every_cut_point() {
    let d = tempfile::tempdir().expect("tempdir");
    let (seg, lens) = three_records(d.path());
    let good = fs::read(&seg).expect("read");
    let (start, end) = (lens[2], lens[3]);
    for cut in start + 1..end {
        fs::write(&seg, &good[..cut as usize]).expect("cut");
        let s = open(d.path());
        assert_eq!(all_entries(&s), ents(1, 2, 1), "cut at {cut}");
        drop(s);
        assert_eq!(file_len(&seg), start, "file truncated to the last good record (cut {cut})");
    }
    // A zero-filled tail (pre-allocated or lost data blocks) is torn too.
    let mut zeros = good.clone();
    zeros.extend_from_slice(&[0u8; 4096]);
    fs::write(&seg, &zeros).expect("zeros");
    let s = open(d.path());
    assert_eq!(all_entries(&s), ents(1, 3, 1));
    drop(s);
    assert_eq!(file_len(&seg), end);
    // A flipped bit in the very last record, written in full (no sector of it is
    // zeros): damaged after it was synced, so corruption, not a torn write.
    let mut flipped = good.clone();
    flipped[end as usize - 2] ^= 0x04;
    fs::write(&seg, &flipped).expect("flip");
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must be corrupt");
    match &err {
        StorageError::Corrupt { path, offset, .. } => assert_eq!((path, *offset), (&seg, start), "{err}"),
        other => panic!("expected Corrupt, got {other}"),
    }
    // The same record cut short (an append that never completed): torn, dropped.
    fs::write(&seg, &good[..end as usize - 2]).expect("cut");
    let s = open(d.path());
    assert_eq!(all_entries(&s), ents(1, 2, 1));
    // And the storage keeps working after the truncation.
    s.append(&ents(3, 4, 2)).expect("append");
    s.sync().expect("sync");
    drop(s);
    let s = open(d.path());
    let mut want = ents(1, 2, 1);
    want.extend(ents(3, 4, 2));
    assert_eq!(all_entries(&s), want);
}

#[test]
fn bit_flip_in_a_middle_record_is_corrupt_with_file_and_offset() {
    let d = tempfile::tempdir().expect("tempdir");
    let (seg, lens) = three_records(d.path());
    let good = fs::read(&seg).expect("read");
    // Body byte of the second record, then its length field.
    for at in [lens[2] - 3, lens[1] + 1] {
        let mut bad = good.clone();
        bad[at as usize] ^= 0x20;
        fs::write(&seg, &bad).expect("write");
        let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must fail");
        match &err {
            StorageError::Corrupt { path, offset, .. } => {
                assert_eq!(path, &seg);
                assert_eq!(*offset, lens[1], "flip at {at}");
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.starts_with("WAL corrupt: "), "{msg}");
        assert!(msg.contains(&seg.display().to_string()) && msg.contains(&format!("offset {}", lens[1])), "{msg}");
    }
}

#[test]
fn bad_record_in_a_non_final_segment_is_corrupt() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open_small(d.path(), 300);
        for i in 1..=20 {
            s.append(&[e(i, 1)]).expect("append");
            s.sync().expect("sync");
        }
    }
    let segs = segments(d.path());
    assert!(segs.len() >= 3);
    let first = &segs[0];
    let data = fs::read(first).expect("read");
    fs::write(first, &data[..data.len() - 5]).expect("cut");
    let err = DiskStorage::open(d.path(), StorageOptions { segment_bytes: 300, ..StorageOptions::default() }).err().expect("must fail");
    assert!(matches!(&err, StorageError::Corrupt { path, .. } if path == first), "{err}");
}

#[test]
fn snapshot_bit_flip_is_corrupt_naming_the_file() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open(d.path());
        s.apply_snapshot(snap(5, 2, b"image of the state machine")).expect("apply");
    }
    let path = d.path().join("snap").join(snapshot::file_name(2, 5));
    let mut data = fs::read(&path).expect("read");
    let n = data.len();
    data[n - 10] ^= 0x01;
    fs::write(&path, &data).expect("write");
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must fail");
    assert!(matches!(&err, StorageError::Corrupt { path: p, .. } if *p == path), "{err}");
    assert!(err.to_string().starts_with("snapshot corrupt: "), "{err}");
}

#[test]
fn missing_referenced_snapshot_is_corrupt() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open(d.path());
        s.apply_snapshot(snap(5, 2, b"x")).expect("apply");
    }
    fs::remove_file(d.path().join("snap").join(snapshot::file_name(2, 5))).expect("rm");
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must fail");
    assert!(err.is_corrupt(), "{err}");
}

#[test]
fn streamed_snapshot_reads_back_and_a_wrong_length_leaves_no_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let meta = SnapshotMetadata { conf_state: Some(cs(&[1])), index: 7, term: 2 };
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (path, size) = snapshot::write_streamed(dir, &meta, None, false, data.len() as u64, |w| {
        for chunk in data.chunks(4096) {
            w.write_all(chunk)?;
        }
        Ok(())
    })
    .expect("write");
    assert_eq!(fs::metadata(&path).expect("meta").len(), size);
    let back = snapshot::read(&path, true).expect("read back");
    assert_eq!(back.data, data);
    assert_eq!(back.metadata, Some(meta.clone()));
    // A producer that writes fewer bytes than announced fails; nothing is left behind.
    let meta9 = SnapshotMetadata { index: 9, ..meta };
    let err = snapshot::write_streamed(dir, &meta9, None, false, 10, |w| w.write_all(b"short")).expect_err("short data");
    assert!(err.to_string().contains("5 bytes, 10 announced"), "{err}");
    let names: Vec<_> = fs::read_dir(dir).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// The WAL's durable end as a snapshot file's mark: the newest segment and its length.
fn wal_end(dir: &Path) -> snapshot::WalMark {
    let seg = segments(dir).pop().expect("a segment");
    let name = seg.file_name().and_then(|n| n.to_str()).expect("name");
    let (seq, _) = wal::parse_segment_name(name).expect("segment name");
    snapshot::WalMark { seq, offset: file_len(&seg) }
}

/// A data dir with the boot snapshot at 1 and entries 2..=9 synced, closed again.
fn booted_with_log_to_9() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open(d.path());
    s.apply_snapshot(snap(1, 1, b"boot")).expect("apply");
    s.append(&ents(2, 9, 1)).expect("append");
    s.sync().expect("sync");
    d
}

#[test]
fn orphan_snapshot_file_is_ignored_and_removed() {
    let d = booted_with_log_to_9();
    // A crash after the file was renamed in but before its WAL record was durable: the
    // WAL reaches the file's mark. A file an older version wrote has no mark.
    let meta = SnapshotMetadata { conf_state: Some(cs(&[1])), index: 8, term: 1 };
    let (orphan, _) = snapshot::write(&d.path().join("snap"), &meta, Some(wal_end(d.path())), b"newer").expect("write");
    let meta = SnapshotMetadata { index: 9, ..meta };
    let (unmarked, _) = snapshot::write(&d.path().join("snap"), &meta, None, b"newer, unmarked").expect("write");
    fs::write(d.path().join("snap").join("0000000000000001-0000000000000009.snap.tmp"), b"half").expect("tmp");
    let s = open(d.path());
    assert_eq!(s.snapshot_index(), 1);
    assert!(!orphan.exists() && !unmarked.exists());
    assert!(!d.path().join("snap").join("0000000000000001-0000000000000009.snap.tmp").exists());
    let latest = s.latest_snapshot().expect("latest").expect("some");
    assert_eq!(latest.full.data, b"boot");
    assert_eq!(s.initial_state().expect("state").conf_state, cs(&[1, 2, 3]));
}

/// An orphan whose unlink fails is set aside under a name the listing ignores: left as
/// it was, it would pass for a live file once the snapshot in force passed its index.
#[test]
fn an_orphan_snapshot_that_cannot_be_deleted_is_set_aside() {
    let d = booted_with_log_to_9();
    let meta = SnapshotMetadata { conf_state: Some(cs(&[1])), index: 8, term: 1 };
    let (orphan, _) = snapshot::write(&d.path().join("snap"), &meta, Some(wal_end(d.path())), b"newer").expect("write");
    fsutil::UNLINK_FAILS.with(|c| c.set(1));
    let s = open(d.path());
    fsutil::UNLINK_FAILS.with(|c| c.set(0));
    assert_eq!(s.snapshot_index(), 1);
    assert!(!orphan.exists(), "not under its own name");
    assert!(orphan_aside(&orphan).exists(), "set aside");
    // A snapshot in force beyond the orphan's index: a restart does not take it up.
    s.apply_snapshot(snap(12, 1, b"later")).expect("apply");
    s.sync().expect("sync");
    drop(s);
    let s = open(d.path());
    assert_eq!(s.snapshot_index(), 12);
    assert_eq!(s.latest_snapshot().expect("latest").expect("some").full.data, b"later");
    assert!(orphan_aside(&orphan).exists(), "ignored, left for the operator");
}

/// The real crash window: a save whose file is written but whose WAL record never
/// becomes durable (the sync fails, then the process dies). The file is an orphan.
#[test]
fn a_save_whose_record_never_became_durable_leaves_an_orphan_that_open_removes() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open_with_log(d.path(), 30);
        s.save_snapshot(10, &cs(&[1, 2, 3]), b"full 10".to_vec()).expect("save");
        s.inject_failure(true, libc::EIO);
        s.save_snapshot(20, &cs(&[1, 2, 3]), b"full 20".to_vec()).expect_err("the record's sync fails");
        s.append(&ents(31, 31, 2)).expect("append");
        assert!(s.sync().is_err(), "the WAL is broken: nothing more becomes durable");
    }
    assert_eq!(snap_names(d.path()).len(), 3, "boot, 10 and the orphan 20");
    let s = open(d.path());
    assert_eq!((s.snapshot_index(), s.last_index().expect("last")), (10, 30));
    assert_eq!(snap_names(d.path()), [snapshot::file_name(1, 1), snapshot::file_name(2, 10)]);
    assert_eq!(s.latest_snapshot().expect("latest").expect("some").full.data, b"full 10");
}

/// Outside damage: the newest WAL segment, which holds the record of the newest
/// snapshot, is cut short or deleted. The snapshot is then newer than anything the WAL
/// knows; it is no orphan, and deleting it would destroy the newest copy of the state.
#[test]
fn a_snapshot_newer_than_a_wal_that_lost_its_end_is_corrupt_and_kept() {
    let d = tempfile::tempdir().expect("tempdir");
    let seg_bytes = 512;
    let newest;
    {
        let s = open_small(d.path(), seg_bytes);
        s.apply_snapshot(snap(1, 1, b"boot")).expect("boot");
        for i in 2..=55u64 {
            s.append(&[e(i, 1)]).expect("append");
            s.set_hard_state(&HardState { term: 1, vote: 1, commit: i }).expect("hs");
            s.sync().expect("sync");
            if i == 30 {
                s.save_snapshot(i, &cs(&[1]), b"snap 30".to_vec()).expect("save");
            }
        }
        let before = segments(d.path());
        s.save_snapshot(55, &cs(&[1]), b"snap 55".to_vec()).expect("save");
        newest = segments(d.path()).pop().expect("segment");
        assert_eq!(segments(d.path()), before, "the record of 55 went into the segment active when its file was written");
        assert!(before.len() >= 4, "{} segments", before.len());
    }
    let names = snap_names(d.path());
    assert_eq!(names, [snapshot::file_name(1, 1), snapshot::file_name(1, 30), snapshot::file_name(1, 55)]);
    let opts = || StorageOptions { segment_bytes: seg_bytes, ..StorageOptions::default() };
    // The newest segment cut back to its first records: recovery finds a clean end there.
    let good = fs::read(&newest).expect("read");
    let h = wal::SEGMENT_HEADER_LEN;
    let meta_end = h + record::HEADER_LEN + u32::from_le_bytes([good[h], good[h + 1], good[h + 2], good[h + 3]]) as usize;
    assert!(file_len(&newest) as usize > meta_end + 200, "the segment has records after its meta");
    fs::write(&newest, &good[..meta_end]).expect("cut");
    let err = DiskStorage::open(d.path(), opts()).err().expect("a WAL that lost its end");
    let msg = err.to_string();
    assert!(err.is_corrupt() && msg.starts_with("WAL corrupt: "), "{msg}");
    assert!(msg.contains(&snapshot::file_name(1, 55)) && msg.contains("newer than anything the WAL knows"), "{msg}");
    assert!(msg.contains("records at its end are missing"), "{msg}");
    assert_eq!(snap_names(d.path()), names, "every snapshot file is kept");
    // The newest segment gone: segments 1..n-1 replay cleanly, but the snapshot at 55 was
    // written while segment n was active.
    fs::remove_file(&newest).expect("rm");
    let err = DiskStorage::open(d.path(), opts()).err().expect("a WAL that lost its newest segment");
    let msg = err.to_string();
    assert!(err.is_corrupt() && msg.starts_with("WAL corrupt: "), "{msg}");
    assert!(msg.contains(&snapshot::file_name(1, 55)) && msg.contains("segment(s) are missing"), "{msg}");
    assert_eq!(snap_names(d.path()), names, "every snapshot file is kept");
    // Put back, the WAL names the snapshot again and nothing is lost.
    fs::write(&newest, &good).expect("restore");
    let s = DiskStorage::open(d.path(), opts()).expect("open");
    assert_eq!((s.snapshot_index(), s.last_index().expect("last")), (55, 55));
}

#[test]
fn wal_lost_with_snapshots_present_is_corrupt() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open(d.path());
        s.apply_snapshot(snap(3, 1, b"x")).expect("apply");
    }
    for p in segments(d.path()) {
        fs::remove_file(p).expect("rm");
    }
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must fail");
    assert!(err.is_corrupt(), "{err}");
    // Leftovers that are not segments do not hide the loss, and the snapshots survive
    // the refused open (recovery must not start a new WAL and drop them as orphans).
    fs::write(d.path().join("wal").join(format!("{}.tmp", wal::segment_name(1, 1))), b"").expect("tmp");
    fs::write(d.path().join("wal").join("notes.txt"), b"stray").expect("stray");
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must still fail");
    assert!(err.is_corrupt(), "{err}");
    assert!(err.to_string().starts_with("WAL corrupt: ") && err.to_string().contains("the WAL was lost"), "{err}");
    assert_eq!(fs::read_dir(d.path().join("snap")).expect("snap dir").count(), 1, "the snapshot file is kept");
}

#[test]
fn segment_names_at_the_end_of_the_sequence_are_corrupt_not_a_panic() {
    let d = tempfile::tempdir().expect("tempdir");
    drop(open(d.path()));
    let seg = segments(d.path()).pop().expect("a segment");
    let wal = d.path().join("wal");
    for first in [1, 2] {
        fs::copy(&seg, wal.join(wal::segment_name(u64::MAX, first))).expect("copy");
    }
    fs::remove_file(&seg).expect("rm");
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must fail");
    assert!(err.is_corrupt() && err.to_string().contains("segment(s) missing"), "{err}");
}

#[test]
fn second_open_of_the_same_dir_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open(d.path());
    assert!(matches!(DiskStorage::open(d.path(), StorageOptions::default()), Err(StorageError::Locked { .. })));
    drop(s);
    open(d.path());
}

#[test]
fn snapshots_save_apply_and_serve() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open(d.path());
    let unavailable = raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
    assert_eq!(s.snapshot(0, 2).expect_err("none yet"), unavailable);
    assert_eq!(s.latest_snapshot().expect("latest"), None);

    s.apply_snapshot(snap(1, 1, b"boot")).expect("bootstrap");
    assert_eq!((s.first_index().expect("f"), s.last_index().expect("l")), (2, 1));
    assert_eq!(s.hard_state().commit, 1);
    // Installing the same snapshot again (a retried Ready) is fine.
    s.apply_snapshot(snap(1, 1, b"boot")).expect("again");
    s.append(&ents(2, 20, 2)).expect("append");
    s.set_hard_state(&HardState { term: 2, vote: 1, commit: 15 }).expect("hs");
    s.sync().expect("sync");

    let took = s.save_snapshot(15, &cs(&[1, 2]), b"at fifteen".to_vec()).expect("save");
    assert!(took > Duration::ZERO);
    assert_eq!(s.snapshot_index(), 15);
    assert_eq!(s.term(15).expect("term"), 2);
    assert_eq!(all_entries(&s), ents(2, 20, 2), "saving keeps the log");
    let got = s.snapshot(0, 2).expect("snapshot");
    assert_eq!(got.data, b"at fifteen");
    let m = got.metadata.expect("meta");
    assert_eq!((m.index, m.term, m.conf_state), (15, 2, Some(cs(&[1, 2]))));
    assert_eq!(s.snapshot(16, 2).expect_err("too old for the request"), unavailable);
    assert_eq!(s.save_snapshot(15, &cs(&[1, 2]), b"same".to_vec()).expect("no-op"), Duration::ZERO);
    assert!(matches!(
        s.save_snapshot(10, &cs(&[1]), vec![]),
        Err(StorageError::SnapshotOutOfDate { given: 10, current: 15, .. })
    ));
    assert!(matches!(s.save_snapshot(21, &cs(&[1]), vec![]), Err(StorageError::Unavailable { .. })));
    assert!(matches!(s.apply_snapshot(snap(12, 2, b"old")), Err(StorageError::SnapshotOutOfDate { .. })));
    let raft_err: raft::Error = StorageError::SnapshotOutOfDate { given: 1, current: 2, first_index: 3 }.into();
    assert_eq!(raft_err, raft::Error::Store(raft::StorageError::SnapshotOutOfDate));

    s.compact(16).expect("compact");
    assert_eq!(s.first_index().expect("first"), 16);
    s.compact(100).expect("clamped to snapshot + 1");
    assert_eq!(s.first_index().expect("first"), 16);
    assert_eq!(s.term(15).expect("snapshot term"), 2);
    assert!(matches!(s.term(14), Err(raft::Error::Store(raft::StorageError::Compacted))));
    drop(s);

    let s = open(d.path());
    assert_eq!(s.snapshot_index(), 15);
    assert_eq!(s.initial_state().expect("state").conf_state, cs(&[1, 2]));
    assert_eq!(s.latest_snapshot().expect("latest").expect("some").full.data, b"at fifteen");
    assert_eq!(s.hard_state(), HardState { term: 2, vote: 1, commit: 15 });
    assert_eq!(s.last_index().expect("last"), 20);
    assert!(s.first_index().expect("first") <= 16);

    // A leader's snapshot past our log resets it.
    s.apply_snapshot(snap(30, 3, b"thirty")).expect("apply");
    assert_eq!((s.first_index().expect("f"), s.last_index().expect("l")), (31, 30));
    assert_eq!(s.hard_state(), HardState { term: 3, vote: 1, commit: 30 });
    drop(s);
    let s = open(d.path());
    assert_eq!((s.first_index().expect("f"), s.last_index().expect("l")), (31, 30));
    assert_eq!(s.hard_state(), HardState { term: 3, vote: 1, commit: 30 });
    assert_eq!(s.latest_snapshot().expect("latest").expect("some").full.data, b"thirty");
}

fn save_delta(s: &DiskStorage, index: u64, base: u64, data: &[u8]) -> Result<Duration, StorageError> {
    s.save_delta_streamed(index, base, &cs(&[1, 2, 3]), data.len() as u64, |w| w.write_all(data))
}

/// Opens `dir` with the bootstrap snapshot and entries 2..=`last` (term 2) committed.
fn open_with_log(dir: &Path, last: u64) -> DiskStorage {
    let s = open(dir);
    s.apply_snapshot(snap(1, 1, b"boot")).expect("boot");
    s.append(&ents(2, last, 2)).expect("append");
    s.set_hard_state(&HardState { term: 2, vote: 1, commit: last }).expect("hs");
    s.sync().expect("sync");
    s
}

fn snap_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join("snap"))
        .expect("snap dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn delta_snapshots_chain_on_a_full_one_and_followers_get_only_full_ones() {
    let d = tempfile::tempdir().expect("tempdir");
    let unavailable = raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
    let s = open_with_log(d.path(), 60);
    s.save_snapshot(10, &cs(&[1, 2, 3]), b"full 10".to_vec()).expect("full");
    assert!(save_delta(&s, 20, 10, b"delta 20").expect("delta") > Duration::ZERO);
    save_delta(&s, 30, 20, b"delta 30").expect("delta");
    assert_eq!(s.snapshot_index(), 30);
    assert!(s.in_force_is_delta());
    let (full, deltas, n) = s.snapshot_chain_bytes();
    assert!(full > 0 && deltas > full && n == 2, "{full} {deltas} {n}");
    // A delta must apply on top of the snapshot in force.
    assert!(matches!(save_delta(&s, 40, 20, b"x"), Err(StorageError::SnapshotOutOfDate { given: 40, current: 30, .. })));
    assert_eq!(save_delta(&s, 30, 30, b"again").expect("no-op"), Duration::ZERO);
    // Followers get the full snapshot, never a delta.
    assert_eq!(s.snapshot(0, 2).expect("full for a follower").data, b"full 10");
    assert_eq!(s.snapshot(11, 2).expect_err("older than the request"), unavailable);
    s.compact(25).expect("compact");
    assert_eq!(s.snapshot(0, 2).expect_err("the log after it is gone"), unavailable);
    // The chain in force and one full snapshot before it are kept: nothing is deleted.
    assert_eq!(snap_names(d.path()).len(), 4, "{:?}", snap_names(d.path()));
    drop(s);

    let s = open(d.path());
    assert_eq!(s.snapshot_index(), 30);
    let chain = s.latest_snapshot().expect("latest").expect("some");
    assert_eq!(chain.full.data, b"full 10");
    assert_eq!(chain.deltas.iter().map(|d| d.data.as_slice()).collect::<Vec<_>>(), [b"delta 20", b"delta 30"]);
    assert_eq!(chain.metadata().index, 30);
    // A second call reads the files again, and gets the same.
    assert_eq!(s.latest_snapshot().expect("latest").expect("some"), chain);

    // A follower needs a full image: one at the index of the delta in force replaces it.
    assert!(s.save_snapshot(30, &cs(&[1, 2, 3]), b"full 30".to_vec()).expect("upgrade") > Duration::ZERO);
    assert!(!s.in_force_is_delta());
    assert_eq!(s.save_snapshot(30, &cs(&[1, 2, 3]), b"x".to_vec()).expect("no-op"), Duration::ZERO);
    assert_eq!(s.snapshot(0, 2).expect("full").data, b"full 30");
    s.compact(25).expect("compact");
    assert_eq!(
        snap_names(d.path()),
        [snapshot::file_name(2, 10), snapshot::file_name(2, 30)],
        "deltas before the newest full snapshot are deleted, one older full one is kept"
    );
    save_delta(&s, 40, 30, b"delta 40").expect("delta");
    drop(s);
    let s = open(d.path());
    let chain = s.latest_snapshot().expect("latest").expect("some");
    assert_eq!((chain.full.data.as_slice(), chain.deltas.len()), (&b"full 30"[..], 1));
    assert_eq!(chain.metadata().index, 40);
}

#[test]
fn a_delta_chain_without_its_full_snapshot_or_with_a_damaged_delta_is_corrupt() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open_with_log(d.path(), 30);
        s.save_snapshot(10, &cs(&[1, 2, 3]), b"full 10".to_vec()).expect("full");
        save_delta(&s, 20, 10, b"delta 20").expect("delta");
        s.compact(5).expect("compact");
    }
    let delta = d.path().join("snap").join(snapshot::delta_file_name(2, 20));
    let good = fs::read(&delta).expect("read");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    fs::write(&delta, &bad).expect("damage");
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("damaged delta");
    assert!(err.is_corrupt() && err.to_string().starts_with("snapshot corrupt: ") && err.to_string().contains(".delta"), "{err}");
    fs::write(&delta, &good).expect("repair");
    open(d.path());
    // Without the full snapshots before it, the delta has nothing to apply on top of.
    for name in [snapshot::file_name(2, 10), snapshot::file_name(1, 1)] {
        fs::remove_file(d.path().join("snap").join(name)).expect("rm");
    }
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("no full snapshot");
    assert!(err.is_corrupt() && err.to_string().contains("without a full snapshot"), "{err}");
}

#[test]
fn rotation_and_compaction_delete_old_segments_and_snapshots() {
    let d = tempfile::tempdir().expect("tempdir");
    let seg_bytes = 4096;
    {
        let s = open_small(d.path(), seg_bytes);
        s.apply_snapshot(snap(1, 1, b"boot")).expect("boot");
        for i in 2..=400u64 {
            s.append(&[e(i, 1)]).expect("append");
            s.set_hard_state(&HardState { term: 1, vote: 1, commit: i }).expect("hs");
            s.sync().expect("sync");
            if i % 100 == 0 {
                s.save_snapshot(i, &cs(&[1]), format!("snap {i}").into_bytes()).expect("save");
                s.compact(i.saturating_sub(20)).expect("compact");
            }
        }
        let before = segments(d.path()).len();
        assert!(before >= 2, "{before} segments");
        let snaps = fs::read_dir(d.path().join("snap")).expect("snap dir").count();
        assert_eq!(snaps, 2, "two newest snapshot files kept");
        assert_eq!(
            s.snapshot_bytes(),
            fs::read_dir(d.path().join("snap"))
                .expect("snap dir")
                .map(|f| f.expect("f").metadata().expect("meta").len())
                .sum::<u64>()
        );
        assert_eq!(s.wal_bytes(), segments(d.path()).iter().map(|p| file_len(p)).sum::<u64>());
    }
    let segs = segments(d.path());
    let total_written: u64 = segs.iter().map(|p| file_len(p)).sum();
    assert!(total_written < 400 * 60, "old segments were deleted ({} segments, {total_written} bytes)", segs.len());
    assert!(!segs[0].ends_with("0000000000000001-0000000000000001.wal"), "first segment deleted");
    let s = open_small(d.path(), seg_bytes);
    assert_eq!(s.snapshot_index(), 400);
    assert_eq!(s.last_index().expect("last"), 400);
    let first = s.first_index().expect("first");
    assert!(first <= 380, "first index {first}");
    assert_eq!(all_entries(&s), (first..=400).map(|i| e(i, 1)).collect::<Vec<_>>());
    assert_eq!(s.hard_state().commit, 400);
}

/// Makes unlinks succeed again when dropped (also when the test fails).
struct UnlinksFailLater;

impl Drop for UnlinksFailLater {
    fn drop(&mut self) {
        fsutil::UNLINK_FAILS.with(|c| c.set(0));
    }
}

/// A store on 1 KiB segments holding entries 1-120 (term 1, all committed and synced)
/// and snapshots at 1, 40, 80 and 120: many segments and files for compaction to free.
fn small_segments_120_entries_snapshots_every_40() -> (tempfile::TempDir, DiskStorage) {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open_small(d.path(), 1024);
    s.apply_snapshot(snap(1, 1, b"boot")).expect("boot");
    for i in 2..=120u64 {
        s.append(&[e(i, 1)]).expect("append");
        s.set_hard_state(&HardState { term: 1, vote: 1, commit: i }).expect("hs");
        s.sync().expect("sync");
        if i % 40 == 0 {
            s.save_snapshot(i, &cs(&[1]), format!("snap {i}").into_bytes()).expect("save");
        }
    }
    (d, s)
}

/// A failed unlink at compaction (EIO injected through the `fsutil::remove_file` seam)
/// must not leak the file until a restart: the next compaction deletes it.
#[test]
fn a_file_compaction_could_not_delete_is_deleted_by_the_next_compaction() {
    let _reset = UnlinksFailLater;
    let (d, s) = small_segments_120_entries_snapshots_every_40();
    let (segs_before, snaps_before) = (segments(d.path()), snap_names(d.path()));
    assert_eq!(snaps_before.len(), 4, "{snaps_before:?}");
    fsutil::UNLINK_FAILS.with(|c| c.set(usize::MAX));
    s.compact(110).expect("a failed unlink is not an error");
    assert_eq!((segments(d.path()), snap_names(d.path())), (segs_before.clone(), snaps_before), "nothing could be deleted");
    fsutil::UNLINK_FAILS.with(|c| c.set(0));
    // Nothing new to compact: only the files left over from the failed unlinks go.
    s.compact(110).expect("compact");
    assert_eq!(snap_names(d.path()), [snapshot::file_name(1, 80), snapshot::file_name(1, 120)]);
    let segs_after = segments(d.path());
    assert!(segs_after.len() + 3 < segs_before.len(), "{} segments of {}", segs_after.len(), segs_before.len());
    assert_eq!(s.wal_bytes(), segs_after.iter().map(|p| file_len(p)).sum::<u64>());
    drop(s);
    let s = open_small(d.path(), 1024);
    assert_eq!((s.snapshot_index(), s.last_index().expect("last")), (120, 120));
    assert!(s.first_index().expect("first") <= 110);
}

#[test]
fn a_segment_that_cannot_be_deleted_leaves_no_gap_behind_it() {
    let _reset = UnlinksFailLater;
    let (d, s) = small_segments_120_entries_snapshots_every_40();
    let segs_before = segments(d.path());
    // Only the first unlink fails: the oldest segment stays, and so must every later
    // one the compaction freed (a gap would make the WAL unreadable).
    fsutil::UNLINK_FAILS.with(|c| c.set(1));
    s.compact(110).expect("a failed unlink is not an error");
    assert_eq!(segments(d.path()), segs_before, "nothing deleted past the segment that stayed");
    assert!(s.files_pending_delete() >= 2, "the one that failed and the newer ones it holds back are counted");
    drop(s);
    // A restart now reads the WAL whole.
    let s = open_small(d.path(), 1024);
    assert_eq!((s.snapshot_index(), s.last_index().expect("last")), (120, 120));
    // The restarted store's own compaction frees them (the retry list was in memory).
    s.compact(110).expect("compact");
    assert!(segments(d.path()).len() + 3 < segs_before.len());
    drop(s);
    let s = open_small(d.path(), 1024);
    assert_eq!(s.last_index().expect("last"), 120);
}

#[test]
fn wal_rejects_a_gap_in_entry_indexes() {
    // A hand-made WAL whose second record skips an index.
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open(d.path());
        s.append(&ents(1, 2, 1)).expect("append");
        s.sync().expect("sync");
    }
    let seg = segments(d.path()).pop().expect("seg");
    let len = file_len(&seg);
    let mut data = fs::read(&seg).expect("read");
    data.truncate(len as usize);
    record::push_entries(&mut data, &ents(5, 6, 1)).expect("encode");
    fs::write(&seg, &data).expect("write");
    let err = DiskStorage::open(d.path(), StorageOptions::default()).err().expect("must fail");
    match err {
        StorageError::Corrupt { path, offset, reason } => {
            assert_eq!((path, offset), (seg, len));
            assert!(reason.contains("gap"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn full_disk_on_write_or_fsync_is_retried_without_loss_or_duplicates() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open(d.path());
    let seg = segments(d.path()).pop().expect("segment");
    s.append(&ents(1, 3, 1)).expect("append");
    s.sync().expect("sync");
    let mut durable = file_len(&seg);
    for at_sync in [false, true] {
        let lo = s.last_index().expect("last") + 1;
        s.append(&ents(lo, lo + 2, 1)).expect("append");
        s.set_hard_state(&HardState { term: 1, vote: 1, commit: lo }).expect("hs");
        s.inject_failure(at_sync, libc::ENOSPC);
        let err = s.sync().expect_err("injected ENOSPC");
        assert!(err.is_no_space(), "{err}");
        assert_eq!(file_len(&seg), durable, "rolled back to the durable length");
        s.sync().expect("retry succeeds");
        assert!(file_len(&seg) > durable);
        durable = file_len(&seg);
    }
    assert_eq!(s.sync().expect("nothing pending"), Duration::ZERO);
    drop(s);
    let s = open(d.path());
    assert_eq!(all_entries(&s), ents(1, 9, 1));
    assert_eq!(s.hard_state().commit, 7);
}

/// A disk without room for a whole preallocated segment (`fallocate` fails with
/// ENOSPC) still gets its new segments, growing as written, at rotation and at open:
/// a node that freed a little space after a full disk must not wait for 64 MiB.
#[test]
fn no_room_to_preallocate_still_rotates_and_opens() {
    struct Hook;
    impl Drop for Hook {
        fn drop(&mut self) {
            fsutil::PREALLOC_NO_SPACE.with(|c| c.set(false));
        }
    }
    let _hook = Hook;
    fsutil::PREALLOC_NO_SPACE.with(|c| c.set(true));
    let d = tempfile::tempdir().expect("tempdir");
    let seg_bytes = 1024;
    {
        let s = open_small(d.path(), seg_bytes);
        for i in 1..=60 {
            s.append(&ents(i, i, 1)).expect("append");
            s.set_hard_state(&HardState { term: 1, vote: 1, commit: i }).expect("hs");
            s.sync().expect("sync without preallocation");
        }
    }
    let segs = segments(d.path());
    assert!(segs.len() >= 3, "rotations expected, got {} segment(s)", segs.len());
    for p in &segs {
        let len = fs::metadata(p).expect("size").len();
        assert_eq!(len, file_len(p), "{} is exactly its records (not preallocated)", p.display());
    }
    let s = open_small(d.path(), seg_bytes);
    assert_eq!(all_entries(&s), ents(1, 60, 1));
    s.append(&ents(61, 61, 1)).expect("append after reopen");
    s.sync().expect("sync after reopen");
    drop(s);
    // With room again, the active segment is preallocated at the next open.
    fsutil::PREALLOC_NO_SPACE.with(|c| c.set(false));
    let s = open_small(d.path(), seg_bytes);
    assert_eq!(all_entries(&s), ents(1, 61, 1));
    let active = segments(d.path()).pop().expect("segment");
    let len = fs::metadata(&active).expect("size").len();
    assert!(len >= seg_bytes, "active segment of {len} bytes: not preallocated");
}

#[test]
fn compaction_keeps_the_durable_chain_while_a_leader_snapshot_is_not_yet_synced() {
    let d = tempfile::tempdir().expect("tempdir");
    {
        let s = open_with_log(d.path(), 60);
        s.save_snapshot(10, &cs(&[1, 2, 3]), b"full 10".to_vec()).expect("full");
        save_delta(&s, 20, 10, b"delta 20").expect("delta");
        save_delta(&s, 30, 20, b"delta 30").expect("delta");
        // A leader snapshot at 50 whose WAL record cannot be synced (the disk is full):
        // installed in memory, not durable. The durable snapshot is still delta 30.
        s.inject_failure(true, libc::ENOSPC);
        let err = s.apply_snapshot(snap(50, 2, b"leader 50")).expect_err("sync fails");
        assert!(err.is_no_space(), "{err}");
        assert_eq!(s.snapshot_index(), 50, "installed in memory");
        // The snapshot thread compacts meanwhile.
        s.compact(50).expect("compact");
        let names = snap_names(d.path());
        for needed in [snapshot::file_name(2, 10), snapshot::delta_file_name(2, 20), snapshot::delta_file_name(2, 30)] {
            assert!(names.contains(&needed), "{needed} was deleted: {names:?}");
        }
        // The process dies before the record is ever synced.
    }
    let s = open(d.path());
    assert_eq!(s.snapshot_index(), 30, "the durable snapshot");
    let chain = s.latest_snapshot().expect("latest").expect("some");
    assert_eq!(chain.full.data, b"full 10");
    assert_eq!(chain.deltas.iter().map(|d| d.data.as_slice()).collect::<Vec<_>>(), [b"delta 20", b"delta 30"]);
}

#[test]
fn other_write_errors_break_the_wal_until_restart() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open(d.path());
    s.append(&ents(1, 2, 1)).expect("append");
    s.sync().expect("sync");
    s.append(&ents(3, 4, 1)).expect("append");
    s.inject_failure(true, libc::EIO);
    let err = s.sync().expect_err("EIO");
    assert!(!err.is_no_space());
    assert!(matches!(s.sync(), Err(StorageError::Broken(_))));
    drop(s);
    let s = open(d.path());
    assert_eq!(all_entries(&s), ents(1, 2, 1), "only what was durable before the failure");
}

/// Operations for the MemStorage comparison.
#[derive(Debug, Clone)]
enum Op {
    /// Append `n` entries starting `back` positions before last + 1, with a term bump.
    Append { back: u64, n: u64, bump: bool },
    /// Save a snapshot at `pos` (fraction of the log) and compact to `keep` before it.
    SaveCompact { pos: u8, keep: u64 },
    /// Install a leader snapshot `ahead` past max(first index, snapshot index).
    Apply { ahead: u64 },
    /// Drop and reopen the storage.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..4, 1u64..6, any::<bool>()).prop_map(|(back, n, bump)| Op::Append { back, n, bump }),
        2 => (any::<u8>(), 0u64..5).prop_map(|(pos, keep)| Op::SaveCompact { pos, keep }),
        1 => (0u64..8).prop_map(|ahead| Op::Apply { ahead }),
        2 => Just(Op::Reopen),
    ]
}

/// Compares DiskStorage with MemStorage. After a reopen DiskStorage may hold more of the
/// compacted prefix (it replays whole segments), so its first index may be lower.
fn compare(disk: &DiskStorage, mem: &MemStorage, mem_snap: u64, exact_first: bool) -> Result<(), TestCaseError> {
    let (df, mf) = (disk.first_index().expect("first"), mem.first_index().expect("first"));
    let last = mem.last_index().expect("last");
    prop_assert_eq!(disk.last_index().expect("last"), last);
    if exact_first {
        prop_assert_eq!(df, mf);
    } else {
        prop_assert!(df <= mf, "disk first {} > mem first {}", df, mf);
    }
    for i in mf..=last {
        prop_assert_eq!(disk.term(i).expect("disk term"), mem.term(i).expect("mem term"), "term {}", i);
    }
    prop_assert_eq!(disk.term(last + 1).err(), mem.term(last + 1).err());
    if df == mf && mf > 1 && disk.snapshot_index() != mf - 1 && mem_snap != mf - 1 {
        prop_assert_eq!(disk.term(mf - 1).err(), mem.term(mf - 1).err());
    }
    let ctx = || GetEntriesContext::empty(false);
    if mf <= last {
        let all = mem.entries(mf, last + 1, None, ctx()).expect("mem");
        prop_assert_eq!(&disk.entries(mf, last + 1, None, ctx()).expect("disk"), &all);
        let one = prost::Message::encoded_len(&all[0]) as u64;
        for max in [0, one, one * 3 + 1, u64::MAX] {
            prop_assert_eq!(
                disk.entries(mf, last + 1, max, ctx()).expect("disk"),
                mem.entries(mf, last + 1, max, ctx()).expect("mem")
            );
        }
    }
    if exact_first && mf > 1 {
        prop_assert_eq!(disk.entries(mf - 1, last + 1, None, ctx()).err(), mem.entries(mf - 1, last + 1, None, ctx()).err());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn behaves_like_memstorage(ops in proptest::collection::vec(op(), 1..40), seg in 200u64..2000) {
        let d = tempfile::tempdir().expect("tempdir");
        let opts = || StorageOptions { segment_bytes: seg, ..StorageOptions::default() };
        let mut disk = Some(DiskStorage::open(d.path(), opts()).expect("open"));
        let mem = MemStorage::new();
        let mut term = 1u64;
        let mut exact = true;
        let mut mem_snap = 0;
        for op in ops {
            let s = disk.as_ref().expect("open storage");
            match op {
                Op::Append { back, n, bump } => {
                    let first = mem.first_index().expect("first");
                    let next = mem.last_index().expect("last") + 1;
                    let at = next.saturating_sub(back).max(first).max(s.snapshot_index() + 1);
                    if bump { term += 1; }
                    let batch: Vec<Entry> = (at..at + n).map(|i| e(i, term)).collect();
                    mem.wl().append(&batch).expect("mem append");
                    s.append(&batch).expect("disk append");
                    let hs = HardState { term, vote: 1, commit: mem.rl().hard_state().commit };
                    mem.wl().set_hardstate(hs.clone());
                    s.set_hard_state(&hs).expect("hs");
                    s.sync().expect("sync");
                }
                Op::SaveCompact { pos, keep } => {
                    let (first, last) = (mem.first_index().expect("f"), mem.last_index().expect("l"));
                    let lo = first.max(s.snapshot_index() + 1);
                    if lo <= last {
                        let idx = lo + (last - lo) * u64::from(pos) / 255;
                        s.save_snapshot(idx, &cs(&[1]), idx.to_le_bytes().to_vec()).expect("save");
                        let c = idx.saturating_sub(keep).max(1);
                        s.compact(c).expect("disk compact");
                        if c > first { mem.wl().compact(c).expect("mem compact"); }
                    }
                }
                Op::Apply { ahead } => {
                    let idx = mem.first_index().expect("f").max(s.snapshot_index() + 1) + ahead;
                    term += 1;
                    s.apply_snapshot(snap(idx, term, b"leader")).expect("disk apply");
                    mem.wl().apply_snapshot(snap(idx, term, b"leader")).expect("mem apply");
                    exact = true;
                    mem_snap = idx;
                }
                Op::Reopen => {
                    drop(disk.take());
                    disk = Some(DiskStorage::open(d.path(), opts()).expect("reopen"));
                    exact = false;
                }
            }
            let s = disk.as_ref().expect("open storage");
            compare(s, &mem, mem_snap, exact)?;
            prop_assert_eq!(s.hard_state(), mem.rl().hard_state().clone());
        }
    }
}

/// Throughput of the write path (`append` + `set_hard_state` + `sync`), single entries
/// and batches. Run: `cargo test -p raftkv-node --release --lib storage::tests::bench_ -- --ignored --nocapture`
/// (`RAFTKV_BENCH_DIR` picks the filesystem; default: the temp dir).
#[test]
#[ignore]
fn bench_write_path() {
    let base = std::env::var_os("RAFTKV_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    for preallocate in [false, true] {
        println!("preallocate: {preallocate} (8 MiB segments)");
        let d = tempfile::tempdir_in(&base).expect("tempdir");
        let value = vec![0x5au8; 256];
        let opts = || StorageOptions { segment_bytes: 8 << 20, preallocate };
        let s = DiskStorage::open(d.path(), opts()).expect("open");
        let mut next = 1u64;
        for (batch, rounds) in [(1u64, 2000u64), (16, 1000), (128, 300)] {
            let mut fsync = Vec::with_capacity(rounds as usize);
            let mut whole = Vec::with_capacity(rounds as usize);
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                let b: Vec<Entry> = (next..next + batch)
                    .map(|i| Entry { index: i, term: 1, data: value.clone(), ..Default::default() })
                    .collect();
                s.append(&b).expect("append");
                s.set_hard_state(&HardState { term: 1, vote: 1, commit: next }).expect("hs");
                let t = std::time::Instant::now();
                fsync.push(s.sync().expect("sync"));
                whole.push(t.elapsed());
                next += batch;
            }
            let secs = start.elapsed().as_secs_f64();
            fsync.sort();
            whole.sort();
            println!(
                "  batch {batch:>3}: {:>6.0} syncs/s {:>7.0} entries/s ({:.1} MB/s); fdatasync p50 {:?} p99 {:?}; \
                 sync() max {:?} (rotations included)",
                rounds as f64 / secs,
                (rounds * batch) as f64 / secs,
                (rounds * batch * 256) as f64 / secs / 1e6,
                fsync[fsync.len() / 2],
                fsync[fsync.len() * 99 / 100],
                whole[whole.len() - 1],
            );
        }
        println!("  segments: {}", segments(d.path()).len());
        let start = std::time::Instant::now();
        drop(s);
        let s = DiskStorage::open(d.path(), opts()).expect("reopen");
        println!("  reopen with {} entries: {:?}", next - 1, start.elapsed());
        assert_eq!(s.last_index().expect("last"), next - 1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
    /// A crash may cut the last segment anywhere after its meta record: the reopened
    /// storage must equal the state after some prefix of the (synced) operations, and
    /// never lose an operation that lives in an earlier segment.
    #[test]
    fn torn_last_segment_recovers_a_synced_prefix(
        ops in proptest::collection::vec((0u64..3, 1u64..4, any::<bool>()), 1..60),
        cut in any::<prop::sample::Index>(),
        seg in 300u64..1500,
        zero_fill in any::<bool>(),
    ) {
        let d = tempfile::tempdir().expect("tempdir");
        let opts = || StorageOptions { segment_bytes: seg, ..StorageOptions::default() };
        // (entries from index 1, hard state) after each synced operation
        let mut states: Vec<(Vec<Entry>, HardState)> = vec![(vec![], HardState::default())];
        // (segment count, length of the last segment) after each operation
        let mut ends: Vec<(usize, u64)> = vec![(1, 0)];
        let mut term = 1;
        {
            let s = DiskStorage::open(d.path(), opts()).expect("open");
            for (back, n, bump) in ops {
                let at = (s.last_index().expect("last") + 1).saturating_sub(back).max(1);
                if bump { term += 1; }
                let batch: Vec<Entry> = (at..at + n).map(|i| e(i, term)).collect();
                s.append(&batch).expect("append");
                let hs = HardState { term, vote: 1, commit: 0 };
                s.set_hard_state(&hs).expect("hs");
                s.sync().expect("sync");
                let mut ents = states.last().expect("state").0.clone();
                ents.truncate((at - 1) as usize);
                ents.extend(batch);
                states.push((ents, hs));
                let segs = segments(d.path());
                ends.push((segs.len(), file_len(segs.last().expect("segment"))));
            }
        }
        let segs = segments(d.path());
        let last = segs.last().expect("segment");
        let data = fs::read(last).expect("read");
        // Keep at least the header and the meta record (created atomically).
        let h = wal::SEGMENT_HEADER_LEN;
        let meta_len = u32::from_le_bytes([data[h], data[h + 1], data[h + 2], data[h + 3]]) as usize;
        let min = h + record::HEADER_LEN + meta_len;
        let written = file_len(last) as usize;
        let keep = if written > min { min + cut.index(written - min + 1) } else { written };
        // Disks write whole sectors: a crash in a preallocated segment leaves zeros from
        // a sector boundary on (never in the middle of one), or from the first record.
        let keep = if zero_fill { (keep / 512 * 512).max(min) } else { keep };
        if zero_fill {
            // A crash in a preallocated segment: the unwritten part reads as zeros and
            // the file keeps its size.
            let mut z = data.clone();
            z[keep..written].fill(0);
            fs::write(last, &z).expect("zero fill");
        } else {
            fs::write(last, &data[..keep]).expect("cut");
        }
        let s = DiskStorage::open(d.path(), opts()).expect("reopen after a torn tail");
        let got = all_entries(&s);
        let hs = s.hard_state();
        // The newest operation whose records all survived the cut.
        let expect = ends
            .iter()
            .rposition(|&(n, len)| n < segs.len() || len <= keep as u64)
            .unwrap_or(0);
        let exact = states[expect].0 == got && states[expect].1 == hs;
        // One sync writes the entries then the hard state: a cut may fall between them.
        let partial = expect + 1 < states.len() && states[expect + 1].0 == got && states[expect].1 == hs;
        prop_assert!(
            exact || partial,
            "recovered {} entries and {:?}; expected the state after operation {} of {}",
            got.len(), hs, expect, states.len() - 1
        );
    }
}

/// Child half of `killed_writer_loses_nothing_it_synced`: appends, syncs, saves
/// snapshots and compacts on `RAFTKV_CRASH_DIR`, printing each synced index. Bounded: it
/// stops by itself after 60 s.
#[test]
#[ignore]
fn crash_child() {
    let Some(dir) = std::env::var_os("RAFTKV_CRASH_DIR") else { return };
    use std::io::Write as _;
    let s = DiskStorage::open(Path::new(&dir), StorageOptions { segment_bytes: 16 << 10, ..StorageOptions::default() }).expect("child open");
    if s.is_fresh() {
        s.apply_snapshot(snap(1, 1, b"boot")).expect("boot");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut out = std::io::stdout().lock();
    let mut n = 0u64;
    while std::time::Instant::now() < deadline {
        n += 1;
        let lo = s.last_index().expect("last") + 1;
        let batch = ents(lo, lo + n % 7, 1);
        let hi = lo + n % 7;
        s.append(&batch).expect("append");
        s.set_hard_state(&HardState { term: 1, vote: 1, commit: hi }).expect("hs");
        s.sync().expect("sync");
        if n % 50 == 0 {
            s.save_snapshot(hi, &cs(&[1]), hi.to_le_bytes().to_vec()).expect("save");
            s.compact(hi.saturating_sub(30)).expect("compact");
        }
        if writeln!(out, "synced {hi}").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

/// SIGKILLs a writer process at several points (mid-append, mid-rotation, mid-compaction
/// as chance has it), restarting it on the same directory each time: every index it
/// reported as synced must be there, with the right content.
#[test]
fn killed_writer_loses_nothing_it_synced() {
    use std::io::BufRead as _;
    let d = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut reported = 0u64;
    for round in 1..=4u64 {
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", "storage::tests::crash_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("RAFTKV_CRASH_DIR", d.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let target = reported + 300 * round;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.strip_prefix("synced ").and_then(|v| v.parse::<u64>().ok()) {
                reported = v;
            }
            if reported >= target || std::time::Instant::now() > deadline {
                break;
            }
        }
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(reported >= target, "child stopped early at {reported} (round {round})");
        let s = open_small(d.path(), 16 << 10);
        let last = s.last_index().expect("last");
        assert!(last >= reported, "round {round}: synced up to {reported}, recovered {last}");
        assert!(s.hard_state().commit >= reported);
        let first = s.first_index().expect("first");
        assert_eq!(all_entries(&s), ents(first, last, 1), "round {round}");
        assert!(s.snapshot_index() >= first.saturating_sub(1));
    }
}
