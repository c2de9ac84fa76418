//! Durable storage: write-ahead log and snapshots; raft-rs's `Storage`.
//!
//! [`DiskStorage`] answers raft-rs exactly like `raft::storage::MemStorage` (it keeps the
//! log since the last compaction in memory) and makes it durable:
//!
//! * `dir/wal/` — segment files of checksummed records ([`wal`], [`record`]). `append`,
//!   `set_hard_state` only buffer; [`DiskStorage::sync`] makes them durable with one
//!   write and one `fdatasync` (group commit: once per raft `Ready`).
//! * `dir/snap/` — snapshot files ([`snapshot`]), written atomically, referenced by WAL
//!   records: full images (`.snap`) and deltas (`.delta`, the changes since the file
//!   before). The snapshot in force is the newest full one plus the deltas after it
//!   ([`SnapshotChain`]). Followers only ever get a full one: the newest full snapshot's
//!   bytes are cached after the first read for a follower (dropped after the sync that
//!   follows saving or installing a newer full snapshot, or replaced when a read finds a
//!   newer one); see [`DiskStorage::snapshot`]. Each file records where the durable WAL
//!   ended when it was written, so that `open` tells an orphan (its record never
//!   synced) from a snapshot whose record the WAL lost.
//! * `dir/tombstone`, `dir/incarnation` — markers ([`write_tombstone`],
//!   [`data_dir_incarnation`]); `dir/LOCK` keeps a second process out.
//!
//! The on-disk format is documented in docs/storage.md.

mod error;
mod fsutil;
mod log;
mod markers;
mod record;
mod snapshot;
mod wal;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use tracing::{debug, error, info, warn};

pub use error::StorageError;
pub use markers::{
    clear_lost_log, data_dir_incarnation, read_lost_log, read_restored_from, read_tombstone, write_lost_log, write_restored_from,
    write_tombstone,
};
pub use record::MAX_INDEX;

use error::corrupt;
use log::MemLog;
use snapshot::SnapFile;
use wal::Wal;

/// The lock file that keeps two processes from opening one data directory.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// The snapshot in force as its files: the newest full image and the deltas saved
/// after it, oldest first (empty when the full one is in force). The state machine
/// restores `full`, then applies each delta in turn.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotChain {
    /// The newest full snapshot at or before the one in force.
    pub full: Snapshot,
    /// Delta snapshots after `full`, oldest first; the last is the one in force.
    pub deltas: Vec<Snapshot>,
}

impl SnapshotChain {
    /// Metadata of the snapshot in force (the last delta, else the full snapshot).
    pub fn metadata(&self) -> SnapshotMetadata {
        self.deltas.last().unwrap_or(&self.full).metadata.clone().unwrap_or_default()
    }
}

/// Options for opening the storage.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// A WAL segment that reached this size is closed and a new one started (64 MiB).
    pub segment_bytes: u64,
    /// Preallocate each segment to `segment_bytes` (`fallocate`) so that syncs do not
    /// change the file size (true). Ignored where the filesystem cannot do it.
    pub preallocate: bool,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions { segment_bytes: 64 << 20, preallocate: true }
    }
}

/// The raft log, hard state and snapshots of one node, on disk. Cheap to clone (shared).
#[derive(Clone)]
pub struct DiskStorage {
    inner: Arc<Inner>,
}

struct Inner {
    wal_dir: PathBuf,
    snap_dir: PathBuf,
    /// Held while a snapshot file is written and recorded (`save_snapshot`,
    /// `apply_snapshot`): one snapshot writer at a time, without blocking log appends.
    /// Lock order (docs/storage.md): `snap_write`, `cache`, `sync_one`, `core`, `wal`;
    /// a lock is only taken under locks before it in this list. `sync_one` is never
    /// held together with `core` (a sync takes `wal` itself, briefly). `cache` takes
    /// `core` under it, briefly; `snap_write` may be held (`drop_cache` after a
    /// snapshot). `opened` and `doomed` are taken with no other lock held.
    snap_write: Mutex<()>,
    /// Held for a whole WAL sync (write + fdatasync): one at a time, in order.
    sync_one: Mutex<()>,
    core: RwLock<Core>,
    wal: Mutex<Wal>,
    /// The newest full snapshot's content, once read (see [`DiskStorage::snapshot`]).
    cache: Mutex<Option<Arc<Snapshot>>>,
    /// The chain in force as `open` read and checked it, until `latest_snapshot` takes it.
    opened: Mutex<Option<SnapshotChain>>,
    /// Files compaction took off the lists but could not delete yet (a failed unlink):
    /// retried at the next `compact`. Taken with no other lock held, only by `compact`.
    doomed: Mutex<Doomed>,
    /// How many files `doomed` holds, as of the last `compact` (read without its lock).
    pending_delete: AtomicU64,
    fresh: bool,
    wal_bytes: Arc<AtomicU64>,
    snap_bytes: AtomicU64,
    _lock: fsutil::DirLock,
}

/// Where an orphan snapshot file that cannot be deleted is moved: `<name>.orphan`, a
/// name the snapshot listing logs and ignores.
fn orphan_aside(path: &Path) -> PathBuf {
    fsutil::suffixed(path, ".orphan")
}

/// Files taken off the segment and snapshot lists whose unlink failed, to retry.
#[derive(Default)]
struct Doomed {
    segments: Vec<PathBuf>,
    snapshots: Vec<PathBuf>,
}

struct Core {
    log: MemLog,
    /// Snapshot files on disk, oldest first (a full one after a delta at the same index).
    snap_files: Vec<SnapFile>,
}

impl Core {
    /// Positions in `snap_files` of the chain in force: the newest full snapshot, then
    /// the deltas after it up to the one in force. Empty when there is no snapshot.
    fn chain(&self) -> Vec<usize> {
        self.chain_at(self.log.snap_index, self.log.snap_term)
    }

    /// Positions in `snap_files` of the chain ending at the snapshot (`index`, `term`).
    fn chain_at(&self, index: u64, term: u64) -> Vec<usize> {
        let Some(top) = self.snap_files.iter().rposition(|f| (f.index, f.term) == (index, term)) else {
            return Vec::new();
        };
        let mut out = vec![top];
        let mut at = top;
        while self.snap_files[at].delta && at > 0 {
            at -= 1;
            out.push(at);
        }
        out.reverse();
        out
    }

    /// The newest full snapshot file, if any.
    fn newest_full(&self) -> Option<&SnapFile> {
        self.snap_files.iter().rev().find(|f| !f.delta)
    }

    /// Whether the snapshot in force is a delta (no full image at its index).
    fn in_force_is_delta(&self) -> bool {
        let key = (self.log.snap_index, self.log.snap_term);
        self.snap_files.iter().rev().find(|f| (f.index, f.term) == key).is_some_and(|f| f.delta)
    }
}

impl DiskStorage {
    /// Opens or creates `dir` (creates `dir/wal/`, `dir/snap/`), recovers: newest valid
    /// snapshot file referenced by the WAL + replay of the WAL. Errors on corruption.
    pub fn open(dir: &Path, opts: StorageOptions) -> Result<DiskStorage, StorageError> {
        let wal_dir = dir.join("wal");
        let snap_dir = dir.join("snap");
        fsutil::ensure_dir(dir)?;
        let lock = fsutil::DirLock::acquire(dir, LOCK_FILE)?;
        fsutil::ensure_dir(&wal_dir)?;
        fsutil::ensure_dir(&snap_dir)?;

        let mut snap_files = snapshot::list(&snap_dir)?;
        // Only segments count: a leftover `.tmp` or a stray file does not make a WAL, and
        // recovery would otherwise start a new one and delete every snapshot as an orphan.
        let mut wal_was_empty = true;
        for ent in std::fs::read_dir(&wal_dir).map_err(error::io_err(&wal_dir))? {
            let ent = ent.map_err(error::io_err(&wal_dir))?;
            if wal::parse_segment_name(&ent.file_name().to_string_lossy()).is_some() {
                wal_was_empty = false;
                break;
            }
        }
        if wal_was_empty && !snap_files.is_empty() {
            return Err(corrupt(
                &wal_dir,
                0,
                format!("the WAL is empty but {} snapshot file(s) exist: the WAL was lost", snap_files.len()),
            ));
        }
        let wal_bytes = Arc::new(AtomicU64::new(0));
        let recovered = wal::recover(&wal_dir, opts.segment_bytes, opts.preallocate, wal_bytes.clone())?;
        let log = recovered.log;

        // Snapshot files newer than the WAL's snapshot: a crash between file and record
        // leaves one (an orphan, deleted below), and so does a WAL that lost its newest
        // records (damage: refused, every file kept). Each file carries where the durable
        // WAL ended when it was written (its mark); the WAL only ever grows past what was
        // durable, so a WAL that ends before a file's mark lost records.
        let wal_end = recovered.wal.durable_end();
        let mut orphans = Vec::new();
        for f in snap_files.iter().filter(|f| f.index > log.snap_index) {
            match snapshot::read_marked(&f.path, false)?.1 {
                Some(mark) if mark.reached_by(wal_end) => orphans.push(f.path.clone()),
                Some(mark) => {
                    let lost = if mark.seq > wal_end.seq {
                        format!(
                            "it was written when the WAL had reached segment {}, but the last segment is {}: the newest \
                             segment(s) are missing",
                            mark.seq, wal_end.seq
                        )
                    } else {
                        format!(
                            "it was written when this segment held {} durable bytes, but it ends at {}: records at its \
                             end are missing",
                            mark.offset, wal_end.offset
                        )
                    };
                    return Err(corrupt(
                        recovered.wal.active_path(),
                        wal_end.offset,
                        format!(
                            "snapshot file {} (index {}, term {}) is newer than anything the WAL knows (its snapshot is at \
                             index {}, its log ends at {}); {lost}. The snapshot files are kept",
                            f.path.display(),
                            f.index,
                            f.term,
                            log.snap_index,
                            log.last_index()
                        ),
                    ));
                }
                None => {
                    // Written before marks existed: it cannot be checked; an orphan, as before.
                    warn!(file = %f.path.display(), "snapshot file newer than the WAL's snapshot has no WAL mark (an older version wrote it); taken for an orphan");
                    orphans.push(f.path.clone());
                }
            }
        }
        snap_files.retain(|f| !orphans.contains(&f.path));
        let mut opened = None;
        let core = Core { log, snap_files };
        if core.log.snap_index > 0 {
            let chain = core.chain();
            if chain.is_empty() {
                let path = snap_dir.join(snapshot::file_name(core.log.snap_term, core.log.snap_index));
                return Err(corrupt(&path, 0, "snapshot file referenced by the WAL is missing"));
            }
            if core.snap_files[chain[0]].delta {
                return Err(corrupt(&core.snap_files[chain[0]].path, 0, "delta snapshot without a full snapshot before it"));
            }
            // Read (and checked) once here; `latest_snapshot` hands these bytes over.
            let mut snaps = Vec::with_capacity(chain.len());
            for &at in &chain {
                let f = &core.snap_files[at];
                let snap = snapshot::read(&f.path, true)?;
                let meta = snap.metadata.clone().unwrap_or_default();
                if (meta.index, meta.term) != (f.index, f.term) {
                    return Err(corrupt(
                        &f.path,
                        snapshot::HEADER_LEN as u64,
                        format!("metadata says index {} term {}, the file name disagrees", meta.index, meta.term),
                    ));
                }
                snaps.push(snap);
            }
            let full = snaps.remove(0);
            opened = Some(SnapshotChain { full, deltas: snaps });
        }
        let Core { mut log, snap_files } = core;
        if let Some(chain) = &opened {
            log.conf_state = chain.metadata().conf_state.unwrap_or_default();
        }
        // Deleted only now that the WAL and the chain in force have passed every check.
        for path in &orphans {
            warn!(file = %path.display(), wal_snapshot = log.snap_index, "removing orphan snapshot file (its WAL record was never synced)");
            if let Err(e) = fsutil::remove_file(path) {
                // Left under its name it would count as a live file once the snapshot in
                // force passes its index, and break the chain a later start restores
                // (a full file in the middle of a delta chain): renamed to a name the
                // listing ignores. A directory that cannot even rename is broken.
                let aside = orphan_aside(path);
                warn!(file = %path.display(), error = %e, aside = %aside.display(), "cannot remove orphan snapshot file; setting it aside (delete it by hand)");
                std::fs::rename(path, &aside).map_err(|e| StorageError::Io { path: path.clone(), source: e })?;
            }
        }
        if !orphans.is_empty() {
            fsutil::sync_dir(&snap_dir)?;
        }
        let fresh = log.hs == HardState::default() && log.snap_index == 0 && log.entries.is_empty();
        let snap_total: u64 = snap_files.iter().map(|f| f.size).sum();
        info!(
            dir = %dir.display(),
            fresh,
            snapshot_index = log.snap_index,
            first_index = log.first_index(),
            last_index = log.last_index(),
            commit = log.hs.commit,
            term = log.hs.term,
            "storage opened"
        );
        Ok(DiskStorage {
            inner: Arc::new(Inner {
                wal_dir,
                snap_dir,
                snap_write: Mutex::new(()),
                sync_one: Mutex::new(()),
                core: RwLock::new(Core { log, snap_files }),
                wal: Mutex::new(recovered.wal),
                cache: Mutex::new(None),
                opened: Mutex::new(opened),
                doomed: Mutex::new(Doomed::default()),
                pending_delete: AtomicU64::new(0),
                fresh,
                wal_bytes,
                snap_bytes: AtomicU64::new(snap_total),
                _lock: lock,
            }),
        })
    }

    fn rl(&self) -> Result<RwLockReadGuard<'_, Core>, StorageError> {
        self.inner.core.read().map_err(|_| StorageError::Poisoned)
    }

    fn wl(&self) -> Result<RwLockWriteGuard<'_, Core>, StorageError> {
        self.inner.core.write().map_err(|_| StorageError::Poisoned)
    }

    fn wal(&self) -> Result<MutexGuard<'_, Wal>, StorageError> {
        self.inner.wal.lock().map_err(|_| StorageError::Poisoned)
    }

    fn snap_writer(&self) -> Result<MutexGuard<'_, ()>, StorageError> {
        self.inner.snap_write.lock().map_err(|_| StorageError::Poisoned)
    }

    fn cache(&self) -> Result<MutexGuard<'_, Option<Arc<Snapshot>>>, StorageError> {
        self.inner.cache.lock().map_err(|_| StorageError::Poisoned)
    }

    /// Drops the cached snapshot content (a newer snapshot is in force). Call with no
    /// other lock held.
    fn drop_cache(&self) {
        match self.inner.cache.lock() {
            Ok(mut c) => *c = None,
            Err(p) => *p.into_inner() = None,
        }
    }

    /// True when the directory held no raft state at open (no WAL records, no snapshot).
    pub fn is_fresh(&self) -> bool {
        self.inner.fresh
    }

    /// Appends entries (buffered, not yet durable), truncating any conflicting suffix
    /// in memory and logically in the WAL (an entry record with index <= last index
    /// replaces the suffix on replay). Entries must be contiguous; error otherwise. An
    /// index or term beyond [`MAX_INDEX`], index 0 or an unknown entry type is refused
    /// (`InvalidAppend`): recovery could not read it back.
    pub fn append(&self, entries: &[Entry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut core = self.wl()?;
        core.log.check_append(entries)?;
        self.wal()?.push_entries(entries)?;
        core.log.append(entries);
        Ok(())
    }

    /// Records a new hard state (buffered). A term or commit beyond [`MAX_INDEX`] is
    /// refused (`InvalidHardState`): recovery could not read it back.
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StorageError> {
        let mut core = self.wl()?;
        if core.log.hs == *hs {
            return Ok(());
        }
        self.wal()?.push_hard_state(hs)?;
        core.log.hs = hs.clone();
        Ok(())
    }

    /// Flushes and fdatasyncs the WAL: everything appended/set before is durable when
    /// this returns. Returns how long the fsync took (for a metric). Cheap no-op when
    /// nothing is buffered. After a full-disk error the records stay buffered and the
    /// next call retries them.
    ///
    /// The write and the fsync run holding only `sync_one` (one sync at a time, so
    /// writes land in order): the `wal` lock is taken just to take the buffer out and
    /// to record the outcome, so the raft thread keeps appending during the fsync.
    pub fn sync(&self) -> Result<Duration, StorageError> {
        let _one = self.inner.sync_one.lock().map_err(|_| StorageError::Poisoned)?;
        let Some(mut job) = self.wal()?.begin_sync()? else { return Ok(Duration::ZERO) };
        let result = job.run();
        self.wal()?.finish_sync(job, result)
    }

    /// Installs a snapshot received from the leader (or the bootstrap snapshot at
    /// index 1): writes the snapshot file atomically (tmp, fsync, rename, dir fsync),
    /// then a WAL record, syncs; clears in-memory entries; first_index = index + 1.
    /// Rejects a snapshot older than the current one (SnapshotOutOfDate). Installing the
    /// current snapshot again (a retry after a failed sync) is allowed. Waits for a
    /// `save_snapshot` in progress on another thread.
    pub fn apply_snapshot(&self, snap: Snapshot) -> Result<(), StorageError> {
        let Snapshot { data, metadata } = snap;
        let meta = metadata.unwrap_or_default();
        if meta.index == 0 {
            return Err(StorageError::InvalidSnapshot("no metadata or index 0".into()));
        }
        // Refused before the file is written: recovery could not read its record back.
        record::check_snapshot(meta.index, meta.term).map_err(StorageError::InvalidSnapshot)?;
        let _writer = self.snap_writer()?;
        let mut core = self.wl()?;
        let log = &core.log;
        let again = log.snap_index > 0 && (meta.index, meta.term) == (log.snap_index, log.snap_term);
        if !again && (log.first_index() > meta.index || meta.index < log.snap_index) {
            return Err(StorageError::SnapshotOutOfDate {
                given: meta.index,
                current: log.snap_index,
                first_index: log.first_index(),
            });
        }
        if !again {
            let mark = self.wal()?.durable_end();
            let (path, size) = snapshot::write(&self.inner.snap_dir, &meta, Some(mark), &data)?;
            drop(data);
            core.snap_files.retain(|f| f.path != path);
            core.snap_files.push(SnapFile { term: meta.term, index: meta.index, path, size, delta: false });
            self.recount_snap_bytes(&core);
        }
        let mut wal = self.wal()?;
        wal.push_snapshot(true, meta.index, meta.term)?;
        core.log.reset_to_snapshot(meta.index, meta.term, meta.conf_state.clone().unwrap_or_default());
        drop(core);
        drop(wal);
        let synced = self.sync();
        if !again {
            self.drop_cache();
        }
        synced?;
        info!(index = meta.index, term = meta.term, "snapshot installed");
        Ok(())
    }

    /// Saves a snapshot the local state machine made at `index` (term looked up from the
    /// log) with `conf_state` and opaque `data`: file first (atomic), then a WAL record,
    /// synced. Keeps entries. Returns the duration. It becomes what
    /// `raft::Storage::snapshot()` hands out (read from the file on demand). Saving at the
    /// current snapshot's index again is a no-op.
    ///
    /// Meant to run on a background thread while the raft thread keeps appending and
    /// syncing: the file is written and fdatasynced holding only the snapshot-writer lock
    /// (appends, syncs and reads go on); then, under the log locks for a moment, the
    /// index is checked again and the `SnapshotSaved` record is buffered *after* whatever
    /// the raft thread buffered before it, and synced. Every entry up to `index` is in
    /// the log at that point, so on disk each is either durable already or earlier in
    /// the same write as the record: a crash can never leave the record without them.
    /// `apply_snapshot` waits for a save in progress (one snapshot writer at a time);
    /// should the log nevertheless no longer hold `index` with its term at the end, the
    /// file is removed and `SnapshotOutOfDate` returned. Locking: docs/storage.md.
    pub fn save_snapshot(&self, index: u64, conf_state: &ConfState, data: Vec<u8>) -> Result<Duration, StorageError> {
        self.save_snapshot_streamed(index, conf_state, data.len() as u64, |w| w.write_all(&data))
    }

    /// [`DiskStorage::save_snapshot`] with the data streamed to the file by `fill`
    /// (exactly `data_len` bytes), so a large state machine is never encoded into
    /// memory as a whole.
    pub fn save_snapshot_streamed(
        &self,
        index: u64,
        conf_state: &ConfState,
        data_len: u64,
        fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<Duration, StorageError> {
        self.save_image(index, conf_state, None, data_len, fill)
    }

    /// Saves a delta snapshot at `index`: `fill` writes the changes since the snapshot
    /// in force, which must be the one at `base` (else `SnapshotOutOfDate`, and nothing
    /// is saved). Otherwise as [`DiskStorage::save_snapshot_streamed`]. The delta is in
    /// force from then on; followers are still sent the newest full snapshot.
    pub fn save_delta_streamed(
        &self,
        index: u64,
        base: u64,
        conf_state: &ConfState,
        data_len: u64,
        fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<Duration, StorageError> {
        self.save_image(index, conf_state, Some(base), data_len, fill)
    }

    /// Saves a full image (`delta_base` None) or a delta on top of the snapshot at
    /// `delta_base`.
    fn save_image(
        &self,
        index: u64,
        conf_state: &ConfState,
        delta_base: Option<u64>,
        data_len: u64,
        fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<Duration, StorageError> {
        let start = Instant::now();
        let _writer = self.snap_writer()?;
        let check = |core: &Core| -> Result<Option<u64>, StorageError> {
            let log = &core.log;
            let out_of_date =
                || StorageError::SnapshotOutOfDate { given: index, current: log.snap_index, first_index: log.first_index() };
            if delta_base.is_some_and(|b| b != log.snap_index) || index < log.snap_index {
                return Err(out_of_date());
            }
            // A full image at the index of a delta in force replaces the delta (a
            // follower needs one); anything else at the current index is saved already.
            if index == log.snap_index && (delta_base.is_some() || !core.in_force_is_delta()) {
                return Ok(None);
            }
            log.term(index).map(Some)
        };
        let Some(term) = check(&*self.rl()?)? else {
            debug!(index, "snapshot at this index already saved");
            return Ok(Duration::ZERO);
        };
        // The file is written without holding the lock: readers are not held up by it.
        let meta = SnapshotMetadata { conf_state: Some(conf_state.clone()), index, term };
        let delta = delta_base.is_some();
        let mark = self.wal()?.durable_end();
        let (path, size) = snapshot::write_streamed(&self.inner.snap_dir, &meta, Some(mark), delta, data_len, fill)?;
        let mut core = self.wl()?;
        if check(&core).ok().flatten() != Some(term) {
            // The log changed under us (a leader's snapshot arrived): the file is stale.
            // It is not the file in force (that one has another index or term), unless
            // a leader's snapshot with the very same index and term was installed.
            let in_force = (core.log.snap_index, core.log.snap_term) == (index, term);
            if !in_force {
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(file = %path.display(), error = %e, "cannot remove a stale snapshot file");
                }
            }
            return Err(StorageError::SnapshotOutOfDate {
                given: index,
                current: core.log.snap_index,
                first_index: core.log.first_index(),
            });
        }
        core.snap_files.retain(|f| f.path != path);
        core.snap_files.push(SnapFile { term, index, path, size, delta });
        core.snap_files.sort_by_key(|f| (f.index, f.term, !f.delta));
        self.recount_snap_bytes(&core);
        let mut wal = self.wal()?;
        wal.push_snapshot(false, index, term)?;
        core.log.snap_index = index;
        core.log.snap_term = term;
        core.log.conf_state = conf_state.clone();
        drop(core);
        drop(wal);
        let synced = self.sync();
        if !delta {
            self.drop_cache();
        }
        synced?;
        Ok(start.elapsed())
    }

    /// Sizes of the chain in force: (bytes of its full snapshot, bytes of its deltas,
    /// number of deltas). The state machine weighs a new delta against a new full image
    /// with them.
    pub fn snapshot_chain_bytes(&self) -> (u64, u64, usize) {
        let Ok(core) = self.rl() else { return (0, 0, 0) };
        let (mut full, mut deltas, mut n) = (0, 0, 0);
        for at in core.chain() {
            let f = &core.snap_files[at];
            if f.delta {
                deltas += f.size;
                n += 1;
            } else {
                full = f.size;
            }
        }
        (full, deltas, n)
    }

    /// Whether the snapshot in force is a delta.
    pub fn in_force_is_delta(&self) -> bool {
        self.rl().map(|c| c.in_force_is_delta()).unwrap_or(false)
    }

    fn recount_snap_bytes(&self, core: &Core) {
        let total = core.snap_files.iter().map(|f| f.size).sum();
        self.inner.snap_bytes.store(total, Ordering::Relaxed);
    }

    /// Drops entries before `compact_index` from memory (clamped so no gap opens after
    /// the latest snapshot: compact_index <= snapshot index + 1) and deletes WAL segments
    /// that hold nothing needed any more, and snapshot files older than the chain in
    /// force in the durable WAL, except the full snapshot before it.
    /// The files are deleted after the locks are released, so appends, syncs and reads
    /// on other threads never wait for an unlink or a directory fsync. A file whose
    /// unlink fails is logged (warning) and kept for the next `compact` to try again;
    /// it is not an error. An error means a directory fsync failed.
    pub fn compact(&self, compact_index: u64) -> Result<(), StorageError> {
        let (clamped, first, segments, snapshots) = {
            let mut core = self.wl()?;
            let clamped = compact_index.min(core.log.snap_index + 1);
            core.log.compact(clamped);
            let first = core.log.first_index();
            let (segments, (durable_index, durable_term)) = {
                let mut wal = self.wal()?;
                (wal.detach_unneeded(first), wal.durable_snapshot())
            };
            let mut snapshots = Vec::new();
            // Files are kept from the chain the *durable* WAL names: a leader snapshot
            // installed in memory whose record is not yet synced (a sync pending, or
            // retried on a full disk) must not cost the chain a restart would need.
            if let Some(&base) = core.chain_at(durable_index, durable_term).first() {
                let previous_full = core.snap_files[..base].iter().rposition(|f| !f.delta);
                let mut at = 0;
                core.snap_files.retain(|f| {
                    let keep = at >= base || Some(at) == previous_full;
                    if !keep {
                        snapshots.push(f.path.clone());
                    }
                    at += 1;
                    keep
                });
            }
            if !snapshots.is_empty() {
                self.recount_snap_bytes(&core);
            }
            (clamped, first, segments, snapshots)
        };
        // Files whose unlink failed at an earlier compaction go again, oldest first. A
        // name on these lists cannot come back as a live file: it is older than the
        // durable snapshot, and neither a save nor an install goes below the one in force.
        let mut doomed = self.inner.doomed.lock().unwrap_or_else(|p| p.into_inner());
        doomed.segments.extend(segments);
        doomed.snapshots.extend(snapshots);
        // Segments strictly oldest first (names sort by sequence number): a failed
        // unlink stops there, so no gap opens in the sequence recovery replays.
        doomed.segments.sort();
        doomed.segments.dedup();
        let segments_deleted = fsutil::delete_files(&self.inner.wal_dir, &mut doomed.segments, true)?;
        let snapshots_deleted = fsutil::delete_files(&self.inner.snap_dir, &mut doomed.snapshots, false)?;
        let left = doomed.segments.len() + doomed.snapshots.len();
        self.inner.pending_delete.store(left as u64, Ordering::Relaxed);
        if left > 0 {
            warn!(segments = doomed.segments.len(), snapshots = doomed.snapshots.len(), "files compaction freed are still on disk (unlinks failing; see the warnings above)");
        }
        debug!(
            compact_index = clamped,
            first_index = first,
            segments_deleted,
            snapshots_deleted,
            left_to_delete = doomed.segments.len() + doomed.snapshots.len(),
            "compacted"
        );
        Ok(())
    }

    /// The snapshot in force as its chain of files (metadata + data) or None — used at
    /// start to restore the KV.
    ///
    /// The first call after `open` gets the bytes `open` read and checked, moved out
    /// (no second read, no copy, not held twice while the caller restores from them).
    /// Later calls read the files.
    pub fn latest_snapshot(&self) -> Result<Option<SnapshotChain>, StorageError> {
        let opened = self.inner.opened.lock().map_err(|_| StorageError::Poisoned)?.take();
        let files: Vec<PathBuf> = {
            let core = self.rl()?;
            core.chain().into_iter().map(|at| core.snap_files[at].path.clone()).collect()
        };
        let Some(first) = files.first() else { return Ok(None) };
        if let Some(chain) = opened {
            let current = self.current_snapshot()?.unwrap_or_default();
            let m = chain.metadata();
            if (m.term, m.index) == current && files.len() == chain.deltas.len() + 1 {
                return Ok(Some(chain));
            }
        }
        let full = snapshot::read(first, true)?;
        let deltas = files[1..].iter().map(|p| snapshot::read(p, true)).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(SnapshotChain { full, deltas }))
    }

    /// (term, index) of the snapshot in force, None when there is none.
    fn current_snapshot(&self) -> Result<Option<(u64, u64)>, StorageError> {
        let core = self.rl()?;
        Ok((core.log.snap_index > 0).then_some((core.log.snap_term, core.log.snap_index)))
    }

    /// (term, index) of the newest full snapshot, None when there is none.
    fn newest_full(&self) -> Result<Option<(u64, u64)>, StorageError> {
        Ok(self.rl()?.newest_full().map(|f| (f.term, f.index)))
    }

    /// The newest full snapshot for a follower: from the cache, else read from its file
    /// (checked) and cached. None when there is none, when it is older than
    /// `request_index`, or when the log no longer holds the entries right after it (the
    /// follower could not catch up from it; deltas were saved and the log compacted
    /// since). The cache lock is held while the file is read, so concurrent callers
    /// read it once.
    fn cached_snapshot(&self, request_index: u64) -> Result<Option<Arc<Snapshot>>, StorageError> {
        let mut cache = self.cache()?;
        let Some((term, index)) = self.newest_full()? else { return Ok(None) };
        if index < request_index || index + 1 < self.rl()?.log.first_index() {
            return Ok(None);
        }
        if let Some(c) = cache.as_ref() {
            if snap_key(c) == (term, index) {
                return Ok(Some(c.clone()));
            }
        }
        *cache = None; // drop a stale blob before reading the new one
        let path = self.inner.snap_dir.join(snapshot::file_name(term, index));
        let snap = Arc::new(snapshot::read(&path, true)?);
        // Keep it only if it is still the newest (a save may have finished meanwhile).
        if self.newest_full()? == Some((term, index)) {
            *cache = Some(snap.clone());
        }
        Ok(Some(snap))
    }

    /// Test hook: the next WAL write (`at_sync == false`) or fdatasync fails with `errno`.
    #[cfg(test)]
    pub(crate) fn inject_failure(&self, at_sync: bool, errno: i32) {
        if let Ok(mut w) = self.wal() {
            w.inject = Some((at_sync, errno));
        }
    }

    /// Files compaction freed but could not delete yet (failing unlinks; a segment that
    /// cannot go keeps every newer freed one), as of the last compaction.
    pub fn files_pending_delete(&self) -> u64 {
        self.inner.pending_delete.load(Ordering::Relaxed)
    }

    /// Index of the newest snapshot (0 when none).
    pub fn snapshot_index(&self) -> u64 {
        self.rl().map(|c| c.log.snap_index).unwrap_or(0)
    }

    /// Current hard state (as last set).
    pub fn hard_state(&self) -> HardState {
        self.rl().map(|c| c.log.hs.clone()).unwrap_or_default()
    }

    /// Bytes of WAL records written to the segments on disk (the segments' preallocated
    /// but unwritten tails are not counted; each segment allocates up to `segment_bytes`).
    pub fn wal_bytes(&self) -> u64 {
        self.inner.wal_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of snapshot files on disk.
    pub fn snapshot_bytes(&self) -> u64 {
        self.inner.snap_bytes.load(Ordering::Relaxed)
    }
}

/// (term, index) of a snapshot.
fn snap_key(s: &Snapshot) -> (u64, u64) {
    s.metadata.as_ref().map(|m| (m.term, m.index)).unwrap_or((0, 0))
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.rl()?;
        Ok(RaftState { hard_state: core.log.hs.clone(), conf_state: core.log.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        Ok(self.rl()?.log.entries(low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        Ok(self.rl()?.log.term(idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl()?.log.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl()?.log.last_index())
    }

    /// The newest full snapshot (never a delta). Its content is read from the file (and
    /// its checksum checked) once, then served from memory until a newer full snapshot is
    /// saved or installed; each call still copies the data (raft-rs wants an owned `Vec`),
    /// which is far cheaper than reading and checking the file.
    /// `SnapshotTemporarilyUnavailable` when there is none, when it is older than
    /// `request_index` or the log after it is compacted (the node then makes a fresh
    /// one), or when the file cannot be read (logged; raft-rs retries later instead of
    /// panicking).
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        match self.cached_snapshot(request_index) {
            Ok(Some(s)) => Ok((*s).clone()),
            Ok(None) => Err(unavailable()),
            Err(e) => {
                error!(error = %e, to, "cannot read the snapshot for a follower");
                Err(unavailable())
            }
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod perf_tests;
