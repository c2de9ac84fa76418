//! Fault-injection helpers for the fault suite (tests/tests/fault_suite.rs): disk damage
//! to a stopped node's WAL segments.

use std::path::{Path, PathBuf};

/// WAL segments (`wal/*.wal`) of a data dir, sorted by name (sequence order).
pub fn wal_segments(data_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(data_dir.join("wal")) else { return Vec::new() };
    let mut v: Vec<PathBuf> =
        rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "wal")).collect();
    v.sort();
    v
}

/// Cuts `bytes` off the written part of `file` (the part before the preallocated zero
/// tail), simulating a torn last write. Returns the new length.
pub fn tear_tail(file: &Path, bytes: u64) -> std::io::Result<u64> {
    let data = std::fs::read(file)?;
    let end = data.iter().rposition(|b| *b != 0).map_or(0, |i| i as u64 + 1);
    let new_len = end.saturating_sub(bytes);
    std::fs::OpenOptions::new().write(true).open(file)?.set_len(new_len)?;
    Ok(new_len)
}
