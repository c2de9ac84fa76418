//! Durable storage: write-ahead log and snapshots; raft-rs's `Storage`.
//!
//! [`DiskStorage`] answers raft-rs exactly like `raft::storage::MemStorage` (it keeps the
//! log since the last compaction in memory) and makes it durable:
//!
//! * `dir/wal/` — segment files of checksummed records ([`wal`], [`record`]). `append`,
//!   `set_hard_state` only buffer; [`DiskStorage::sync`] makes them durable with one
//!   write and one `fdatasync` (group commit: once per raft `Ready`).
//! * `dir/snap/` — snapshot files ([`snapshot`]), written atomically, referenced by WAL
//!   records, read back on demand (the data is never kept in memory).
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
pub use markers::{data_dir_incarnation, read_tombstone, write_tombstone};

use error::corrupt;
use log::MemLog;
use snapshot::SnapFile;
use wal::Wal;

/// The lock file that keeps two processes from opening one data directory.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// How many snapshot files `compact` keeps.
const KEEP_SNAPSHOTS: usize = 2;

/// Options for opening the storage.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// A WAL segment that reached this size is closed and a new one started (64 MiB).
    pub segment_bytes: u64,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions { segment_bytes: 64 << 20 }
    }
}

/// The raft log, hard state and snapshots of one node, on disk. Cheap to clone (shared).
#[derive(Clone)]
pub struct DiskStorage {
    inner: Arc<Inner>,
}

struct Inner {
    snap_dir: PathBuf,
    /// Lock order: `core` before `wal`.
    core: RwLock<Core>,
    wal: Mutex<Wal>,
    fresh: bool,
    wal_bytes: Arc<AtomicU64>,
    snap_bytes: AtomicU64,
    _lock: fsutil::DirLock,
}

struct Core {
    log: MemLog,
    /// Snapshot files on disk, oldest first.
    snap_files: Vec<SnapFile>,
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
        let wal_was_empty = std::fs::read_dir(&wal_dir)
            .map_err(error::io_err(&wal_dir))?
            .next()
            .is_none();
        if wal_was_empty && !snap_files.is_empty() {
            return Err(corrupt(
                &wal_dir,
                0,
                format!("the WAL is empty but {} snapshot file(s) exist: the WAL was lost", snap_files.len()),
            ));
        }
        let wal_bytes = Arc::new(AtomicU64::new(0));
        let recovered = wal::recover(&wal_dir, opts.segment_bytes, wal_bytes.clone())?;
        let mut log = recovered.log;

        // Snapshot files newer than the WAL's snapshot: a crash between file and record.
        let mut orphans = false;
        snap_files.retain(|f| {
            if f.index > log.snap_index {
                warn!(file = %f.path.display(), wal_snapshot = log.snap_index, "removing orphan snapshot file");
                if let Err(e) = std::fs::remove_file(&f.path) {
                    warn!(file = %f.path.display(), error = %e, "cannot remove orphan snapshot file");
                }
                orphans = true;
                false
            } else {
                true
            }
        });
        if orphans {
            fsutil::sync_dir(&snap_dir)?;
        }
        if log.snap_index > 0 {
            let path = snap_dir.join(snapshot::file_name(log.snap_term, log.snap_index));
            if !snap_files.iter().any(|f| f.path == path) {
                return Err(corrupt(&path, 0, "snapshot file referenced by the WAL is missing"));
            }
            let snap = snapshot::read(&path, false)?;
            let meta = snap.metadata.unwrap_or_default();
            if (meta.index, meta.term) != (log.snap_index, log.snap_term) {
                return Err(corrupt(
                    &path,
                    snapshot::HEADER_LEN as u64,
                    format!("metadata says index {} term {}, the file name disagrees", meta.index, meta.term),
                ));
            }
            log.conf_state = meta.conf_state.unwrap_or_default();
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
                snap_dir,
                core: RwLock::new(Core { log, snap_files }),
                wal: Mutex::new(recovered.wal),
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

    /// True when the directory held no raft state at open (no WAL records, no snapshot).
    pub fn is_fresh(&self) -> bool {
        self.inner.fresh
    }

    /// Appends entries (buffered, not yet durable), truncating any conflicting suffix
    /// in memory and logically in the WAL (an entry record with index <= last index
    /// replaces the suffix on replay). Entries must be contiguous; error otherwise.
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

    /// Records a new hard state (buffered).
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
    pub fn sync(&self) -> Result<Duration, StorageError> {
        self.wal()?.sync()
    }

    /// Installs a snapshot received from the leader (or the bootstrap snapshot at
    /// index 1): writes the snapshot file atomically (tmp, fsync, rename, dir fsync),
    /// then a WAL record, syncs; clears in-memory entries; first_index = index + 1.
    /// Rejects a snapshot older than the current one (SnapshotOutOfDate). Installing the
    /// current snapshot again (a retry after a failed sync) is allowed.
    pub fn apply_snapshot(&self, snap: Snapshot) -> Result<(), StorageError> {
        let Snapshot { data, metadata } = snap;
        let meta = metadata.unwrap_or_default();
        if meta.index == 0 {
            return Err(StorageError::InvalidSnapshot("no metadata or index 0".into()));
        }
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
            let (path, size) = snapshot::write(&self.inner.snap_dir, &meta, &data)?;
            drop(data);
            core.snap_files.retain(|f| f.path != path);
            core.snap_files.push(SnapFile { term: meta.term, index: meta.index, path, size });
            self.recount_snap_bytes(&core);
        }
        let mut wal = self.wal()?;
        wal.push_snapshot(true, meta.index, meta.term)?;
        core.log.reset_to_snapshot(meta.index, meta.term, meta.conf_state.clone().unwrap_or_default());
        wal.sync()?;
        info!(index = meta.index, term = meta.term, "snapshot installed");
        Ok(())
    }

    /// Saves a snapshot the local state machine made at `index` (term looked up from the
    /// log) with `conf_state` and opaque `data`: file first (atomic), then a WAL record,
    /// synced. Keeps entries. Returns the duration. It becomes what
    /// `raft::Storage::snapshot()` hands out (read from the file on demand). Saving at the
    /// current snapshot's index again is a no-op.
    pub fn save_snapshot(&self, index: u64, conf_state: &ConfState, data: Vec<u8>) -> Result<Duration, StorageError> {
        let start = Instant::now();
        let check = |log: &MemLog| -> Result<Option<u64>, StorageError> {
            if index == log.snap_index {
                return Ok(None);
            }
            if index < log.snap_index {
                return Err(StorageError::SnapshotOutOfDate {
                    given: index,
                    current: log.snap_index,
                    first_index: log.first_index(),
                });
            }
            log.term(index).map(Some)
        };
        let Some(term) = check(&self.rl()?.log)? else {
            debug!(index, "snapshot at this index already saved");
            return Ok(Duration::ZERO);
        };
        // The file is written without holding the lock: readers are not held up by it.
        let meta = SnapshotMetadata { conf_state: Some(conf_state.clone()), index, term };
        let (path, size) = snapshot::write(&self.inner.snap_dir, &meta, &data)?;
        drop(data);
        let mut core = self.wl()?;
        if check(&core.log)? != Some(term) {
            // The log changed under us (a leader's snapshot arrived): the file is stale and
            // older than the snapshot in force; compaction removes it.
            return Err(StorageError::SnapshotOutOfDate {
                given: index,
                current: core.log.snap_index,
                first_index: core.log.first_index(),
            });
        }
        core.snap_files.retain(|f| f.path != path);
        core.snap_files.push(SnapFile { term, index, path, size });
        self.recount_snap_bytes(&core);
        let mut wal = self.wal()?;
        wal.push_snapshot(false, index, term)?;
        core.log.snap_index = index;
        core.log.snap_term = term;
        core.log.conf_state = conf_state.clone();
        drop(core);
        wal.sync()?;
        Ok(start.elapsed())
    }

    fn recount_snap_bytes(&self, core: &Core) {
        let total = core.snap_files.iter().map(|f| f.size).sum();
        self.inner.snap_bytes.store(total, Ordering::Relaxed);
    }

    /// Drops entries before `compact_index` from memory (clamped so no gap opens after
    /// the latest snapshot: compact_index <= snapshot index + 1) and deletes WAL segments
    /// that hold nothing needed any more, and snapshot files older than the two newest.
    pub fn compact(&self, compact_index: u64) -> Result<(), StorageError> {
        let mut core = self.wl()?;
        let clamped = compact_index.min(core.log.snap_index + 1);
        core.log.compact(clamped);
        let first = core.log.first_index();
        let deleted = self.wal()?.purge(first)?;
        let current = core.log.snap_index;
        let mut removed = 0;
        while core.snap_files.len() > KEEP_SNAPSHOTS && core.snap_files[0].index < current {
            let path = core.snap_files[0].path.clone();
            std::fs::remove_file(&path).map_err(error::io_err(&path))?;
            core.snap_files.remove(0);
            removed += 1;
        }
        if removed > 0 {
            fsutil::sync_dir(&self.inner.snap_dir)?;
            self.recount_snap_bytes(&core);
        }
        debug!(compact_index = clamped, first_index = first, segments_deleted = deleted, snapshots_deleted = removed, "compacted");
        Ok(())
    }

    /// The newest snapshot (metadata + data) or None — used at start to restore the KV.
    pub fn latest_snapshot(&self) -> Result<Option<Snapshot>, StorageError> {
        match self.latest_snapshot_path()? {
            None => Ok(None),
            Some(path) => snapshot::read(&path, true).map(Some),
        }
    }

    /// Path of the newest snapshot file (files are immutable, so it is read unlocked).
    fn latest_snapshot_path(&self) -> Result<Option<PathBuf>, StorageError> {
        let core = self.rl()?;
        if core.log.snap_index == 0 {
            return Ok(None);
        }
        Ok(Some(self.inner.snap_dir.join(snapshot::file_name(core.log.snap_term, core.log.snap_index))))
    }

    /// Test hook: the next WAL write (`at_sync == false`) or fdatasync fails with `errno`.
    #[cfg(test)]
    pub(crate) fn inject_failure(&self, at_sync: bool, errno: i32) {
        if let Ok(mut w) = self.wal() {
            w.inject = Some((at_sync, errno));
        }
    }

    /// Index of the newest snapshot (0 when none).
    pub fn snapshot_index(&self) -> u64 {
        self.rl().map(|c| c.log.snap_index).unwrap_or(0)
    }

    /// Current hard state (as last set).
    pub fn hard_state(&self) -> HardState {
        self.rl().map(|c| c.log.hs.clone()).unwrap_or_default()
    }

    /// Bytes of WAL segments on disk.
    pub fn wal_bytes(&self) -> u64 {
        self.inner.wal_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of snapshot files on disk.
    pub fn snapshot_bytes(&self) -> u64 {
        self.inner.snap_bytes.load(Ordering::Relaxed)
    }
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

    /// The newest snapshot, read from its file. `SnapshotTemporarilyUnavailable` when
    /// there is none, when it is older than `request_index`, or when the file cannot be
    /// read (logged; raft-rs retries later instead of panicking).
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        let path = {
            let core = self.rl()?;
            if core.log.snap_index == 0 || core.log.snap_index < request_index {
                return Err(unavailable());
            }
            self.inner.snap_dir.join(snapshot::file_name(core.log.snap_term, core.log.snap_index))
        };
        match snapshot::read(&path, true) {
            Ok(s) => Ok(s),
            Err(e) => {
                error!(error = %e, to, "cannot read the snapshot for a follower");
                Err(unavailable())
            }
        }
    }
}

#[cfg(test)]
mod tests;
