//! The write-ahead log: segment files `wal/<seq:016x>-<first_index:016x>.wal`.
//!
//! Every segment starts with a 32-byte header (magic `RAFTKVWL`, version, seq, first
//! index, crc) and a `Meta` record; then framed records (see [`super::record`]). Writes
//! are buffered in one `Vec` and reach the disk in a [`SyncJob`]: one `pwrite` plus one
//! `fdatasync`, run without the WAL's lock (the buffer is swapped out first), so new
//! records are buffered while it runs. Recovery ([`recover`]) replays all segments in order.
//!
//! Segments are preallocated (`fallocate`) to the segment size when created, so a sync
//! inside that range does not change the file size, and zeros are written ahead of the
//! records a chunk at a time, so most syncs do not convert unwritten extents either (see
//! [`ZERO_CHUNK`]); zeros after the last record are the normal end of a segment.
//! Filesystems that cannot preallocate get growing files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfState, Entry, HardState};
use tracing::{debug, error, info, warn};

use super::error::{corrupt, io_err, StorageError};
use super::fsutil::{self, write_atomic, Prealloc};
use super::log::{check_contiguous, hs_after_snapshot, MemLog};
use super::record::{self, MetaRecord, Record, Scan};
use super::snapshot::WalMark;

/// Segment file magic.
const MAGIC: [u8; 8] = *b"RAFTKVWL";
/// Segment format version written and accepted.
const VERSION: u32 = 1;
/// Bytes of the segment header.
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;
/// A pending buffer that grew beyond this is shrunk back after a sync.
const KEEP_BUFFER: usize = 8 << 20;
/// Bytes of zeros written ahead of the records at a time in a preallocated segment.
/// `fallocate` leaves unwritten extents: the first write into one changes the extent
/// tree, so its fdatasync must also commit the filesystem journal (on ext4 and XFS).
/// Zeroing the region ahead, once per chunk, makes the fsyncs of the records after it
/// plain data flushes (measured here, three writers on one disk: 1.1 -> 0.6 ms).
const ZERO_CHUNK: u64 = 512 << 10;
/// A sync zeroes the next chunk when fewer than this many zeroed bytes are left ahead.
const ZERO_AHEAD: u64 = 128 << 10;
/// A buffer of zeros to write from.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// One segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Sequence number (from 1, contiguous).
    pub seq: u64,
    /// The log index expected next when the segment was created (informative).
    pub first_index: u64,
    /// Full path.
    pub path: PathBuf,
    /// Bytes written and synced.
    pub size: u64,
    /// Lowest first index of any durable `Entries` record in it (`u64::MAX`: none).
    pub min_index: u64,
}

/// The segment file name for (`seq`, `first_index`).
pub(crate) fn segment_name(seq: u64, first_index: u64) -> String {
    fsutil::pair_name(seq, first_index, "wal")
}

/// Parses a segment file name into (seq, first_index).
pub(crate) fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    fsutil::parse_pair_name(name, "wal")
}

fn segment_header(seq: u64, first_index: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(SEGMENT_HEADER_LEN);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&first_index.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

fn check_segment_header(path: &Path, data: &[u8], seq: u64, first_index: u64) -> Result<(), StorageError> {
    if data.len() < SEGMENT_HEADER_LEN {
        return Err(corrupt(path, 0, format!("file of {} bytes is shorter than the segment header", data.len())));
    }
    if data[0..8] != MAGIC {
        return Err(corrupt(path, 0, "bad magic (not a raftkv WAL segment)"));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let crc = u32::from_le_bytes([data[28], data[29], data[30], data[31]]);
    if crc32fast::hash(&data[0..28]) != crc {
        return Err(corrupt(path, 0, "segment header checksum mismatch"));
    }
    let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
    if version != VERSION {
        return Err(corrupt(path, 8, format!("unsupported WAL format version {version}")));
    }
    if u64_at(12) != seq || u64_at(20) != first_index {
        return Err(corrupt(
            path,
            12,
            format!("header says seq {} first index {}, the file name disagrees", u64_at(12), u64_at(20)),
        ));
    }
    Ok(())
}

/// The state the records written so far lead to (what a new segment's `Meta` records).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct WalState {
    /// Hard state.
    pub hs: HardState,
    /// Snapshot in force: index.
    pub snap_index: u64,
    /// Snapshot in force: term.
    pub snap_term: u64,
    /// Last log index.
    pub last_index: u64,
}

impl WalState {
    fn meta(&self) -> MetaRecord {
        MetaRecord { snapshot_index: self.snap_index, snapshot_term: self.snap_term, hard_state: Some(self.hs.clone()) }
    }
}

/// The writer side of the WAL.
pub(crate) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Preallocate segments (asked for, and the filesystem has not refused yet).
    prealloc: bool,
    /// The active segment is preallocated to `segment_bytes`: zeros are written ahead of
    /// the records (see [`ZERO_CHUNK`]).
    zero_ahead: bool,
    /// The active segment holds written data or zeros up to here.
    zeroed: u64,
    /// Oldest first; the last one is the active segment.
    segments: Vec<Segment>,
    /// The active segment (shared with a [`SyncJob`] writing to it).
    file: Arc<File>,
    pending: Vec<u8>,
    /// The buffer of the last finished job, reused as the next `pending`.
    spare: Vec<u8>,
    pending_min_index: u64,
    /// State after the durable records.
    written: WalState,
    /// State after the durable and the pending records.
    next: WalState,
    broken: Option<String>,
    bytes: Arc<AtomicU64>,
    /// Test hook: fail the next write (`false`) or fdatasync (`true`) with this errno.
    #[cfg(test)]
    pub(crate) inject: Option<(bool, i32)>,
}

/// One write of buffered records, taken by [`Wal::begin_sync`] and run with no lock
/// held, so the raft thread keeps buffering records while the fsync runs.
pub(crate) struct SyncJob {
    file: Arc<File>,
    path: PathBuf,
    /// Where the records go: the active segment's durable length.
    off: u64,
    buf: Vec<u8>,
    min_index: u64,
    /// The state once these records are durable.
    next: WalState,
    /// Zeros to write ahead of the records, as [start, end) offsets (empty: none).
    zeros: (u64, u64),
    /// Test hook taken from the WAL: fail the write (`false`) or fdatasync (`true`).
    inject: Option<(bool, i32)>,
}

impl SyncJob {
    /// One `pwrite` and one `fdatasync`. Returns the fsync's duration.
    pub(crate) fn run(&mut self) -> std::io::Result<Duration> {
        let inject = self.inject.take();
        let injected = |at_sync: bool| match inject {
            Some((s, errno)) if s == at_sync => Err(std::io::Error::from_raw_os_error(errno)),
            _ => Ok(()),
        };
        self.file.write_all_at(&self.buf, self.off).and_then(|()| injected(false))?;
        let (mut at, to) = self.zeros;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        let start = Instant::now();
        self.file.sync_data().and_then(|()| injected(true))?;
        Ok(start.elapsed())
    }
}

/// What [`recover`] found.
pub(crate) struct Recovered {
    /// The writer, positioned after the last good record.
    pub wal: Wal,
    /// The replayed log (conf state not filled in: it lives in the snapshot file).
    pub log: MemLog,
}

impl Wal {
    /// Buffers `Entries` records for `ents` (contiguous, non-empty: checked by the caller).
    pub(crate) fn push_entries(&mut self, ents: &[Entry]) -> Result<(), StorageError> {
        let (Some(first), Some(last)) = (ents.first(), ents.last()) else { return Ok(()) };
        let mark = self.pending.len();
        if let Err(e) = record::push_entries(&mut self.pending, ents) {
            self.pending.truncate(mark);
            return Err(e);
        }
        self.pending_min_index = self.pending_min_index.min(first.index);
        self.next.last_index = last.index;
        Ok(())
    }

    /// Buffers a `HardState` record.
    pub(crate) fn push_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        record::push_hard_state(&mut self.pending, hs)?;
        self.next.hs = hs.clone();
        Ok(())
    }

    /// Buffers a snapshot record (`applied`: installed from the leader, log reset).
    pub(crate) fn push_snapshot(&mut self, applied: bool, index: u64, term: u64) -> Result<(), StorageError> {
        record::push_snapshot(&mut self.pending, applied, index, term)?;
        self.next.snap_index = index;
        self.next.snap_term = term;
        if applied {
            self.next.last_index = index;
            self.next.hs = hs_after_snapshot(&self.next.hs, index, term);
        }
        Ok(())
    }

    /// Writes the pending records with one write and one fdatasync, holding `self`
    /// throughout (tests; [`super::DiskStorage::sync`] uses the three steps
    /// below so that appends go on during the fsync). Returns the fsync's duration. A
    /// failed write or fsync is rolled back (the file truncated to its last durable
    /// length) and the records stay pending, so a later call retries them; an error
    /// other than a full disk, or a failed rollback, leaves the WAL broken.
    #[cfg(test)]
    pub(crate) fn sync(&mut self) -> Result<Duration, StorageError> {
        let Some(mut job) = self.begin_sync()? else { return Ok(Duration::ZERO) };
        let result = job.run();
        self.finish_sync(job, result)
    }

    /// Takes the pending records out of the buffer for one write (rotating to a new
    /// segment first if the active one is full). `None`: nothing pending. New records
    /// may be buffered while the returned job runs; they go with the next one. Jobs must
    /// not overlap: the caller finishes one before it begins the next.
    pub(crate) fn begin_sync(&mut self) -> Result<Option<SyncJob>, StorageError> {
        if let Some(why) = &self.broken {
            return Err(StorageError::Broken(why.clone()));
        }
        if self.pending.is_empty() {
            return Ok(None);
        }
        if self.active().size >= self.segment_bytes {
            self.rotate()?;
        }
        let buf = std::mem::replace(&mut self.pending, std::mem::take(&mut self.spare));
        let off = self.active().size;
        let end = off + buf.len() as u64;
        let mut zeros = (0, 0);
        if self.zero_ahead && self.zeroed < end + ZERO_AHEAD {
            let from = self.zeroed.max(end);
            let to = (from + ZERO_CHUNK).min(self.segment_bytes);
            if from < to {
                zeros = (from, to);
            }
        }
        Ok(Some(SyncJob {
            file: self.file.clone(),
            path: self.active().path.clone(),
            off,
            buf,
            zeros,
            min_index: std::mem::replace(&mut self.pending_min_index, u64::MAX),
            next: self.next.clone(),
            inject: self.take_injection(),
        }))
    }

    /// Records the outcome of a job from [`Wal::begin_sync`]. On success its records
    /// are durable; on failure the segment is rolled back to its durable length and the
    /// records are put back in front of those buffered since, for a retry.
    pub(crate) fn finish_sync(&mut self, job: SyncJob, result: std::io::Result<Duration>) -> Result<Duration, StorageError> {
        let SyncJob { path, off, mut buf, min_index, next, zeros, .. } = job;
        match result {
            Ok(took) => {
                let n = buf.len() as u64;
                self.zeroed = self.zeroed.max(off + n).max(zeros.1);
                let active = self.active_mut();
                active.size += n;
                active.min_index = active.min_index.min(min_index);
                self.bytes.fetch_add(n, Ordering::Relaxed);
                self.written = next;
                buf.clear();
                if buf.capacity() > KEEP_BUFFER {
                    buf.shrink_to(KEEP_BUFFER / 8);
                }
                self.spare = buf;
                Ok(took)
            }
            Err(e) => {
                buf.extend_from_slice(&self.pending);
                self.pending = buf;
                self.pending_min_index = self.pending_min_index.min(min_index);
                Err(self.fail(off, io_err(&path)(e)))
            }
        }
    }

    #[cfg(test)]
    fn take_injection(&mut self) -> Option<(bool, i32)> {
        self.inject.take()
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn take_injection(&mut self) -> Option<(bool, i32)> {
        None
    }

    fn fail(&mut self, durable_len: u64, err: StorageError) -> StorageError {
        let path = self.active().path.clone();
        if let Err(e) = self.file.set_len(durable_len) {
            let why = format!("cannot roll back {} to {durable_len} bytes after a failed write: {e}", path.display());
            error!("{why}");
            self.broken = Some(why);
        } else if !err.is_no_space() {
            let why = format!("WAL write failed: {err}");
            error!("{why}");
            self.broken = Some(why);
        } else {
            warn!(error = %err, "WAL write failed for lack of space; records kept for a retry");
        }
        // The rollback cut everything after the durable records off.
        self.zeroed = durable_len;
        self.zero_ahead = false;
        if self.broken.is_none() && self.prealloc {
            // Put the preallocated space back if there is room.
            match fsutil::preallocate(&self.file, self.segment_bytes) {
                Ok(Prealloc::Done) => self.zero_ahead = true,
                Ok(how) => debug!(?how, "cannot preallocate the segment again after a rollback"),
                Err(e) => debug!(error = %e, "cannot preallocate the segment again after a rollback"),
            }
        }
        err
    }

    fn active(&self) -> &Segment {
        // `segments` is never empty: recovery creates the first segment.
        &self.segments[self.segments.len() - 1]
    }

    fn active_mut(&mut self) -> &mut Segment {
        let i = self.segments.len() - 1;
        &mut self.segments[i]
    }

    /// Starts a new segment: header + `Meta` of the durable state, written atomically,
    /// preallocated to the segment size (one `fallocate` of unwritten extents: no data is
    /// written, so this adds little to the sync that rotates).
    fn rotate(&mut self) -> Result<(), StorageError> {
        let active = self.active();
        let seq = active.seq.checked_add(1).ok_or_else(|| corrupt(&active.path, 0, "segment sequence number exhausted"))?;
        let first_index = self.written.last_index + 1;
        let prealloc = self.prealloc.then_some(self.segment_bytes);
        let (seg, preallocated) = create_segment(&self.dir, seq, first_index, &self.written.meta(), prealloc)?;
        match preallocated {
            Some(Prealloc::Unsupported) => {
                warn!(dir = %self.dir.display(), "the filesystem cannot preallocate; WAL segments grow as written");
                self.prealloc = false;
            }
            Some(Prealloc::NoSpace) => warn!(
                segment = %seg.path.display(),
                segment_bytes = self.segment_bytes,
                "not enough free space to preallocate the new WAL segment; it grows as written"
            ),
            Some(Prealloc::Done) | None => {}
        }
        let file = OpenOptions::new().write(true).open(&seg.path).map_err(io_err(&seg.path))?;
        debug!(segment = %seg.path.display(), "WAL segment rotated");
        self.bytes.fetch_add(seg.size, Ordering::Relaxed);
        self.file = Arc::new(file);
        self.zero_ahead = matches!(preallocated, Some(Prealloc::Done));
        self.zeroed = seg.size;
        self.segments.push(seg);
        Ok(())
    }

    /// Deletes the oldest segments that replay no longer needs, given that the log is
    /// needed from `first_needed` on. Returns how many were deleted.
    #[cfg(test)]
    pub(crate) fn purge(&mut self, first_needed: u64) -> Result<usize, StorageError> {
        let mut dead = self.detach_unneeded(first_needed);
        fsutil::delete_files(&self.dir, &mut dead, true)
    }

    /// Where the durable records end: the active segment's seq and durable length.
    pub(crate) fn durable_end(&self) -> WalMark {
        WalMark { seq: self.active().seq, offset: self.active().size }
    }

    /// The active (last) segment's path.
    pub(crate) fn active_path(&self) -> &Path {
        &self.active().path
    }

    /// The snapshot in force in the durable records: (index, term).
    pub(crate) fn durable_snapshot(&self) -> (u64, u64) {
        (self.written.snap_index, self.written.snap_term)
    }

    /// Takes the oldest segments that replay no longer needs (the log is needed from
    /// `first_needed` on) off the segment list and returns their paths, for the caller
    /// to delete with [`fsutil::delete_files`] once it holds no lock: a file left behind by a
    /// crash before that is replayed harmlessly (it is older than what replaces it).
    ///
    /// A live entry comes from the newest segment holding an `Entries` record that covers
    /// it; such records always replace a suffix, so if any later segment has a durable
    /// record starting at or below `first_needed`, every needed entry lives in later
    /// segments, and their `Meta` records carry the snapshot and hard state.
    ///
    /// The durable snapshot clamps `first_needed` (a snapshot record not yet synced
    /// covers nothing a restart would replay).
    pub(crate) fn detach_unneeded(&mut self, first_needed: u64) -> Vec<PathBuf> {
        let n = self.segments.len();
        if n < 2 {
            return Vec::new();
        }
        // Never beyond what the durable snapshot covers: a snapshot record that is still
        // pending (its sync failed) must not let replay lose the entries after the
        // durable one.
        let first_needed = first_needed.min(self.written.snap_index + 1);
        let nothing_needed = first_needed > self.written.last_index;
        // suffix_min[j] = min of min_index over segments j+1..n
        let mut deletable = 0;
        let mut suffix_min = u64::MAX;
        let mut mins = vec![u64::MAX; n];
        for j in (0..n).rev() {
            mins[j] = suffix_min;
            suffix_min = suffix_min.min(self.segments[j].min_index);
        }
        for (j, &later_min) in mins.iter().enumerate().take(n - 1) {
            if nothing_needed || later_min <= first_needed {
                deletable = j + 1;
            } else {
                break;
            }
        }
        self.segments
            .drain(..deletable)
            .map(|seg| {
                self.bytes.fetch_sub(seg.size, Ordering::Relaxed);
                seg.path
            })
            .collect()
    }

    /// Bytes of buffered, not yet durable records.
    #[cfg(test)]
    pub(crate) fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// The segments on disk, oldest first.
    #[cfg(test)]
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

/// Creates a segment file atomically with its header and `Meta` record, preallocated to
/// `prealloc` bytes if given. Returns what the preallocation achieved (`None`: not
/// asked). A disk too full for the whole preallocation still gets the segment (it grows
/// as written) as long as its header and `Meta` record fit.
fn create_segment(
    dir: &Path,
    seq: u64,
    first_index: u64,
    meta: &MetaRecord,
    prealloc: Option<u64>,
) -> Result<(Segment, Option<Prealloc>), StorageError> {
    let path = dir.join(segment_name(seq, first_index));
    let mut buf = segment_header(seq, first_index);
    record::push_meta(&mut buf, meta)?;
    let mut preallocated = None;
    write_atomic(&path, |f| {
        if let Some(len) = prealloc {
            preallocated = Some(fsutil::preallocate(f, len)?);
        }
        f.write_all(&buf)
    })?;
    Ok((Segment { seq, first_index, path, size: buf.len() as u64, min_index: u64::MAX }, preallocated))
}

/// Replays records into a log, with the checks recovery makes.
struct Replay {
    log: MemLog,
    /// Whether the log's start is known: false until the first `Entries` or
    /// `SnapshotApplied` record (older segments may have been deleted).
    anchored: bool,
    started: bool,
}

impl Replay {
    /// Applies one record. Returns the first index of an `Entries` record.
    fn apply(&mut self, rec: Record, first_in_segment: bool) -> Result<Option<u64>, String> {
        match (&rec, first_in_segment) {
            (Record::Meta(_), false) => return Err("meta record in the middle of a segment".into()),
            (Record::Meta(_), true) => {}
            (_, true) => return Err("segment does not start with a meta record".into()),
            _ => {}
        }
        match rec {
            Record::Meta(m) => {
                let hs = m.hard_state.unwrap_or_default();
                if !self.started {
                    self.started = true;
                    self.log.snap_index = m.snapshot_index;
                    self.log.snap_term = m.snapshot_term;
                    self.log.hs = hs;
                } else if (m.snapshot_index, m.snapshot_term) != (self.log.snap_index, self.log.snap_term)
                    || hs != self.log.hs
                {
                    return Err(format!(
                        "segment meta (snapshot {}/{}, hard state {:?}) disagrees with the preceding \
                         segments (snapshot {}/{}, hard state {:?})",
                        m.snapshot_index, m.snapshot_term, hs, self.log.snap_index, self.log.snap_term, self.log.hs
                    ));
                }
                Ok(None)
            }
            Record::Entries(ents) => {
                check_contiguous(&ents)?;
                let b0 = ents[0].index;
                if (self.log.entries.is_empty() && !self.anchored) || b0 < self.log.first_index() {
                    self.log.entries = ents;
                } else if b0 > self.log.last_index() + 1 {
                    return Err(format!("gap in the log: entry {b0} follows last index {}", self.log.last_index()));
                } else {
                    self.log.append(&ents);
                }
                self.anchored = true;
                Ok(Some(b0))
            }
            Record::HardState(hs) => {
                self.log.hs = hs;
                Ok(None)
            }
            Record::SnapshotSaved(r) => {
                if r.index < self.log.snap_index {
                    return Err(format!("snapshot record {} is older than snapshot {}", r.index, self.log.snap_index));
                }
                let first = self.log.first_index();
                if r.index >= first {
                    if let Some(e) = self.log.entries.get((r.index - first) as usize) {
                        if e.term != r.term {
                            return Err(format!(
                                "snapshot {} has term {} but the log's entry has term {}",
                                r.index, r.term, e.term
                            ));
                        }
                    }
                }
                self.log.snap_index = r.index;
                self.log.snap_term = r.term;
                Ok(None)
            }
            Record::SnapshotApplied(r) => {
                if r.index < self.log.snap_index {
                    return Err(format!("snapshot record {} is older than snapshot {}", r.index, self.log.snap_index));
                }
                self.log.reset_to_snapshot(r.index, r.term, ConfState::default());
                self.anchored = true;
                Ok(None)
            }
        }
    }
}

/// Lists segment files (oldest first), removing leftover temporary files.
fn list_segments(dir: &Path) -> Result<Vec<Segment>, StorageError> {
    let mut segs: Vec<Segment> = fsutil::list_files(dir, "WAL", parse_segment_name)?
        .into_iter()
        .map(|((seq, first_index), path, size)| Segment { seq, first_index, path, size, min_index: u64::MAX })
        .collect();
    segs.sort_by_key(|s| s.seq);
    for pair in segs.windows(2) {
        if pair[0].seq.checked_add(1) != Some(pair[1].seq) {
            return Err(corrupt(
                &pair[1].path,
                0,
                format!("segment(s) missing: expected seq {} after {}", pair[0].seq.wrapping_add(1), pair[0].seq),
            ));
        }
    }
    Ok(segs)
}

/// The unit a disk writes atomically (a sector; 4 KiB devices write whole multiples).
const SECTOR: usize = 512;

/// Whether the final record at `off` (its checksum failed) was written in full: its
/// header checks out, its body lies inside `data` (the segment from offset 0), and no
/// sector-aligned piece of it reads as zeros. Sectors are written atomically and
/// everything after a segment's written end is zeros (preallocated, rolled back or cut
/// off and preallocated again), so an append interrupted by a crash always leaves a
/// zero piece (or a short file). A record with data in every sector whose checksum fails
/// was damaged after it was written — and synced, hence acknowledged: dropping it as a
/// torn write would silently lose it. (etcd's WAL applies the same rule.)
fn written_in_full(data: &[u8], off: usize) -> bool {
    let h = record::HEADER_LEN;
    let Some(hdr) = data.get(off..off + h) else { return false };
    let len_bytes = [hdr[0], hdr[1], hdr[2], hdr[3]];
    if crc32fast::hash(&len_bytes) != u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) {
        return false;
    }
    let end = off + h + u32::from_le_bytes(len_bytes) as usize;
    if end > data.len() {
        return false;
    }
    let mut lo = off;
    while lo < end {
        let hi = ((lo / SECTOR + 1) * SECTOR).min(end);
        if data[lo..hi].iter().all(|b| *b == 0) {
            return false;
        }
        lo = hi;
    }
    true
}

fn truncate_file(path: &Path, len: u64) -> Result<(), StorageError> {
    let f = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
    f.set_len(len).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Opens the WAL in `dir` (which must exist): replays every segment, cuts a torn tail
/// off the last one, validates the result. An empty directory gets its first segment.
///
/// With `preallocate`, the active segment is (re)extended to `segment_bytes` with
/// `fallocate` (unless the filesystem refuses).
/// Reads a segment up to the end of what was written. A preallocated segment is mostly
/// zeros past its records; reading all of it would cost `segment_bytes` of memory at
/// every start. The end is found by hopping over record headers (length + length
/// checksum) from the segment header; anything non-zero beyond the first header that does
/// not check out is read too, so the recovery rules (torn tail vs corruption) see every
/// byte that matters. Only a run of zeros at the very end is left out.
fn read_written(path: &Path) -> std::io::Result<Vec<u8>> {
    const BLOCK: u64 = 1 << 20;
    let hl = record::HEADER_LEN as u64;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut off = SEGMENT_HEADER_LEN as u64;
    let mut hdr = [0u8; record::HEADER_LEN];
    while off + hl <= len {
        f.read_exact_at(&mut hdr, off)?;
        let body = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as u64;
        let check = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        if body == 0 || crc32fast::hash(&hdr[0..4]) != check {
            break;
        }
        off += hl + body;
    }
    let mut end = (off + hl).min(len);
    // Non-zero bytes after that point (corruption, or a torn record) are kept.
    let mut buf = vec![0u8; BLOCK as usize];
    let mut hi = len;
    while hi > end {
        let lo = hi.saturating_sub(BLOCK).max(end);
        let chunk = &mut buf[..(hi - lo) as usize];
        f.read_exact_at(chunk, lo)?;
        if let Some(i) = chunk.iter().rposition(|b| *b != 0) {
            end = lo + i as u64 + 1;
            break;
        }
        hi = lo;
    }
    let mut data = vec![0u8; end as usize];
    f.read_exact_at(&mut data, 0)?;
    Ok(data)
}

pub(crate) fn recover(
    dir: &Path,
    segment_bytes: u64,
    preallocate: bool,
    bytes: Arc<AtomicU64>,
) -> Result<Recovered, StorageError> {
    let segment_bytes = segment_bytes.max(1);
    let mut segments = list_segments(dir)?;
    if segments.is_empty() {
        let (seg, _) = create_segment(dir, 1, 1, &WalState::default().meta(), preallocate.then_some(segment_bytes))?;
        info!(segment = %seg.path.display(), "created a new WAL");
        segments.push(seg);
    }
    let mut rp = Replay { log: MemLog::default(), anchored: false, started: false };
    let n = segments.len();
    for (i, seg) in segments.iter_mut().enumerate() {
        let is_last = i + 1 == n;
        let data = read_written(&seg.path).map_err(io_err(&seg.path))?;
        check_segment_header(&seg.path, &data, seg.seq, seg.first_index)?;
        let mut off = SEGMENT_HEADER_LEN;
        let mut first = true;
        loop {
            match record::scan(&data, off) {
                Scan::Record { body, next } => {
                    let rec = record::decode(body).map_err(|r| corrupt(&seg.path, off as u64, r))?;
                    let min = rp.apply(rec, first).map_err(|r| corrupt(&seg.path, off as u64, r))?;
                    if let Some(m) = min {
                        seg.min_index = seg.min_index.min(m);
                    }
                    first = false;
                    off = next;
                }
                Scan::End => break,
                Scan::Torn(_) if is_last && !first && written_in_full(&data, off) => {
                    return Err(corrupt(
                        &seg.path,
                        off as u64,
                        "crc mismatch in the final record, whose every sector was written: \
                         damaged after it was synced (an acknowledged record), not a torn write",
                    ));
                }
                Scan::Torn(why) if is_last && !first => {
                    warn!(
                        segment = %seg.path.display(),
                        offset = off,
                        dropped_bytes = data.len() - off,
                        reason = why,
                        "truncating the torn tail of the WAL (an interrupted write)"
                    );
                    truncate_file(&seg.path, off as u64)?;
                    break;
                }
                Scan::Torn(why) => {
                    let what = if is_last { "damaged meta record" } else { "incomplete record in a non-final segment" };
                    return Err(corrupt(&seg.path, off as u64, format!("{what}: {why}")));
                }
                Scan::Corrupt(why) => return Err(corrupt(&seg.path, off as u64, why)),
            }
        }
        if first {
            return Err(corrupt(&seg.path, SEGMENT_HEADER_LEN as u64, "segment has no meta record"));
        }
        seg.size = off as u64;
    }
    let log = rp.log;
    let wal_dir_err = |reason: String| corrupt(dir, 0, reason);
    if let Some(e0) = log.entries.first() {
        if e0.index > log.snap_index + 1 {
            return Err(wal_dir_err(format!(
                "log starts at {} but the snapshot in force is at {}: entries in between are missing",
                e0.index, log.snap_index
            )));
        }
        if log.snap_index >= e0.index {
            if let Some(e) = log.entries.get((log.snap_index - e0.index) as usize) {
                if e.term != log.snap_term {
                    return Err(wal_dir_err(format!(
                        "entry {} has term {} but the snapshot says {}",
                        log.snap_index, e.term, log.snap_term
                    )));
                }
            }
        }
    }
    if log.hs.commit > log.last_index() {
        return Err(wal_dir_err(format!(
            "hard state commit {} is beyond the last log index {}",
            log.hs.commit,
            log.last_index()
        )));
    }
    let active = &segments[n - 1];
    let file = OpenOptions::new().write(true).open(&active.path).map_err(io_err(&active.path))?;
    let mut prealloc = preallocate;
    if prealloc && active.size < segment_bytes {
        let len = file.metadata().map_err(io_err(&active.path))?.len();
        if len < segment_bytes {
            // A new WAL, a truncated torn tail, or a segment written without preallocation.
            match fsutil::preallocate(&file, segment_bytes).map_err(io_err(&active.path))? {
                Prealloc::Done => file.sync_data().map_err(io_err(&active.path))?,
                Prealloc::Unsupported => {
                    warn!(dir = %dir.display(), "the filesystem cannot preallocate; WAL segments grow as written");
                    prealloc = false;
                }
                Prealloc::NoSpace => warn!(
                    segment = %active.path.display(),
                    segment_bytes,
                    "not enough free space to preallocate the active WAL segment; it grows as written"
                ),
            }
        }
    }
    let total: u64 = segments.iter().map(|s| s.size).sum();
    bytes.store(total, Ordering::Relaxed);
    let zeroed = active.size;
    let zero_ahead = prealloc && file.metadata().is_ok_and(|m| m.len() >= segment_bytes);
    let state = WalState {
        hs: log.hs.clone(),
        snap_index: log.snap_index,
        snap_term: log.snap_term,
        last_index: log.last_index(),
    };
    let wal = Wal {
        dir: dir.to_path_buf(),
        segment_bytes,
        prealloc,
        zero_ahead,
        zeroed,
        segments,
        file: Arc::new(file),
        pending: Vec::with_capacity(64 << 10),
        spare: Vec::with_capacity(64 << 10),
        pending_min_index: u64::MAX,
        written: state.clone(),
        next: state,
        broken: None,
        bytes,
        #[cfg(test)]
        inject: None,
    };
    Ok(Recovered { wal, log })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn e(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 100], ..Default::default() }
    }

    fn open(dir: &Path, seg: u64) -> Recovered {
        recover(dir, seg, true, Arc::new(AtomicU64::new(0))).expect("recover")
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(parse_segment_name(&segment_name(1, 77)), Some((1, 77)));
        assert_eq!(parse_segment_name("1-2.wal"), None);
    }

    #[test]
    fn replay_round_trip_and_rotation() {
        let d = tempfile::tempdir().expect("tempdir");
        {
            let mut r = open(d.path(), 1024);
            for i in 1..=50 {
                r.wal.push_entries(&[e(i, 1)]).expect("push");
                r.wal.push_hard_state(&HardState { term: 1, vote: 1, commit: i }).expect("hs");
                r.wal.sync().expect("sync");
            }
            assert!(r.wal.segments().len() > 3, "rotation expected");
            assert_eq!(r.wal.pending_bytes(), 0);
        }
        let r = open(d.path(), 1024);
        assert_eq!(r.log.entries, (1..=50).map(|i| e(i, 1)).collect::<Vec<_>>());
        assert_eq!(r.log.hs.commit, 50);
    }

    #[test]
    fn records_buffered_during_a_sync_follow_it_and_a_failed_one_is_retried_in_order() {
        let d = tempfile::tempdir().expect("tempdir");
        {
            let mut r = open(d.path(), 1 << 20);
            r.wal.push_entries(&[e(1, 1), e(2, 1)]).expect("push");
            let mut job = r.wal.begin_sync().expect("begin").expect("a job");
            // Buffered while the job runs: not part of it.
            r.wal.push_entries(&[e(3, 1)]).expect("push");
            let result = job.run();
            r.wal.finish_sync(job, result).expect("finish");
            assert!(r.wal.pending_bytes() > 0, "entry 3 waits for the next sync");

            // A job that fails puts its records back in front of the newer ones.
            let mut job = r.wal.begin_sync().expect("begin").expect("a job");
            r.wal.push_entries(&[e(4, 1)]).expect("push");
            let _ = job.run();
            let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
            r.wal.finish_sync(job, Err(enospc)).expect_err("the failure is reported");
            r.wal.sync().expect("the retry writes 3 and 4");
            assert_eq!(r.wal.pending_bytes(), 0);
        }
        let r = open(d.path(), 1 << 20);
        assert_eq!(r.log.entries, (1..=4).map(|i| e(i, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn zeros_are_written_ahead_of_the_records_in_a_preallocated_segment() {
        let d = tempfile::tempdir().expect("tempdir");
        let seg = 4 * ZERO_CHUNK;
        {
            let mut r = open(d.path(), seg);
            if !r.wal.zero_ahead {
                eprintln!("this filesystem cannot preallocate; nothing to check");
                return;
            }
            let mut i = 0;
            while r.wal.segments().len() == 1 {
                let batch: Vec<Entry> = (i + 1..=i + 20).map(|j| e(j, 1)).collect();
                i += 20;
                r.wal.push_entries(&batch).expect("push");
                r.wal.sync().expect("sync");
                if r.wal.segments().len() > 1 {
                    break;
                }
                let size = r.wal.active().size;
                // Always some zeroed room ahead, never beyond the preallocated length.
                assert!(r.wal.zeroed >= (size + ZERO_AHEAD).min(seg), "zeroed {} at size {size}", r.wal.zeroed);
                assert!(r.wal.zeroed <= seg.max(size), "zeroed {} beyond the segment", r.wal.zeroed);
                let len = fs::metadata(&r.wal.active().path).expect("meta").len();
                assert!(len >= seg, "the zeros stay inside the preallocated length ({len})");
            }
            // The new segment starts over: zeroed from its records on.
            assert!(r.wal.zero_ahead);
            let size = r.wal.active().size;
            assert!(r.wal.zeroed >= size + ZERO_AHEAD && r.wal.zeroed <= size + ZERO_CHUNK, "zeroed {} at {size}", r.wal.zeroed);
            // A failed write rolls the zeros back with the records.
            r.wal.push_entries(&[e(i + 1, 1)]).expect("push");
            r.wal.inject = Some((true, libc::ENOSPC));
            r.wal.sync().expect_err("injected ENOSPC");
            assert_eq!(r.wal.zeroed, r.wal.active().size);
            r.wal.sync().expect("the retry");
            assert!(r.wal.zeroed > r.wal.active().size);
            i += 1;
            assert!(i > 100, "only {i} entries");
        }
        // Zeros are the normal end of a segment: everything replays.
        let r = open(d.path(), seg);
        assert_eq!(r.log.last_index(), r.log.entries.last().map_or(0, |e| e.index));
        assert!(r.log.last_index() > 100);
    }

    #[test]
    fn missing_middle_segment_is_corrupt() {
        let d = tempfile::tempdir().expect("tempdir");
        {
            let mut r = open(d.path(), 512);
            for i in 1..=30 {
                r.wal.push_entries(&[e(i, 1)]).expect("push");
                r.wal.sync().expect("sync");
            }
            let segs = r.wal.segments().to_vec();
            assert!(segs.len() >= 3);
            fs::remove_file(&segs[1].path).expect("rm");
        }
        let err = recover(d.path(), 512, true, Arc::new(AtomicU64::new(0))).err().expect("must fail");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn purge_keeps_what_replay_needs() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut r = open(d.path(), 600);
        for i in 1..=40 {
            r.wal.push_entries(&[e(i, 1)]).expect("push");
            r.wal.sync().expect("sync");
        }
        let before = r.wal.segments().len();
        r.wal.push_snapshot(false, 30, 1).expect("snap");
        r.wal.sync().expect("sync");
        let deleted = r.wal.purge(25).expect("purge");
        assert!(deleted > 0 && deleted < before, "deleted {deleted} of {before}");
        drop(r);
        let r = open(d.path(), 600);
        assert!(r.log.first_index() <= 25, "first {}", r.log.first_index());
        assert_eq!(r.log.last_index(), 40);
        assert_eq!(r.log.snap_index, 30);
        let first = r.log.first_index();
        assert_eq!(r.log.entries, (first..=40).map(|i| e(i, 1)).collect::<Vec<_>>());
    }
}
