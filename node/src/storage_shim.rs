//! TEMPORARY in-memory stand-in for `storage` with the same API (not durable).
#![allow(missing_docs, dead_code)]
use std::path::{Path, PathBuf};
use std::time::Duration;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};

#[derive(Default)]
pub struct StorageOptions { pub segment_bytes: u64 }

#[derive(Clone)]
pub struct DiskStorage { mem: MemStorage, snap: std::sync::Arc<std::sync::Mutex<Option<Snapshot>>> }

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("io {path:?}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}
impl StorageError { pub fn is_no_space(&self) -> bool { false } }

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> { self.mem.initial_state() }
    fn entries(&self, l: u64, h: u64, m: impl Into<Option<u64>>, c: GetEntriesContext) -> raft::Result<Vec<Entry>> { self.mem.entries(l, h, m, c) }
    fn term(&self, i: u64) -> raft::Result<u64> { self.mem.term(i) }
    fn first_index(&self) -> raft::Result<u64> { self.mem.first_index() }
    fn last_index(&self) -> raft::Result<u64> { self.mem.last_index() }
    fn snapshot(&self, r: u64, to: u64) -> raft::Result<Snapshot> {
        match self.snap.lock().unwrap().clone() { Some(s) if s.get_metadata().index >= r => Ok(s), _ => self.mem.snapshot(r, to) }
    }
}

impl DiskStorage {
    pub fn open(_dir: &Path, _o: StorageOptions) -> Result<Self, StorageError> { Ok(DiskStorage { mem: MemStorage::new(), snap: Default::default() }) }
    pub fn is_fresh(&self) -> bool { self.snap.lock().unwrap().is_none() && self.mem.last_index().unwrap_or(0) == 0 }
    pub fn append(&self, e: &[Entry]) -> Result<(), StorageError> { Ok(self.mem.wl().append(e)?) }
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StorageError> { self.mem.wl().set_hardstate(hs.clone()); Ok(()) }
    pub fn sync(&self) -> Result<Duration, StorageError> { Ok(Duration::ZERO) }
    pub fn apply_snapshot(&self, s: Snapshot) -> Result<(), StorageError> { self.mem.wl().apply_snapshot(s.clone())?; *self.snap.lock().unwrap() = Some(s); Ok(()) }
    pub fn save_snapshot(&self, index: u64, cs: &ConfState, data: Vec<u8>) -> Result<Duration, StorageError> {
        let term = self.mem.term(index)?;
        *self.snap.lock().unwrap() = Some(Snapshot { data, metadata: Some(SnapshotMetadata { conf_state: Some(cs.clone()), index, term }) });
        Ok(Duration::ZERO)
    }
    pub fn compact(&self, i: u64) -> Result<(), StorageError> { Ok(self.mem.wl().compact(i)?) }
    pub fn latest_snapshot(&self) -> Result<Option<Snapshot>, StorageError> { Ok(self.snap.lock().unwrap().clone()) }
    pub fn snapshot_index(&self) -> u64 { self.snap.lock().unwrap().as_ref().map(|s| s.get_metadata().index).unwrap_or(0) }
    pub fn hard_state(&self) -> HardState { self.mem.initial_state().map(|s| s.hard_state).unwrap_or_default() }
    pub fn wal_bytes(&self) -> u64 { 0 }
    pub fn snapshot_bytes(&self) -> u64 { 0 }
}
pub fn write_tombstone(dir: &Path, reason: &str) -> Result<(), StorageError> { std::fs::write(dir.join("REMOVED"), reason).map_err(|source| StorageError::Io { path: dir.into(), source }) }
pub fn read_tombstone(dir: &Path) -> Result<Option<String>, StorageError> { Ok(std::fs::read_to_string(dir.join("REMOVED")).ok()) }
pub fn data_dir_incarnation(_dir: &Path) -> Result<u64, StorageError> { Ok(42) }
