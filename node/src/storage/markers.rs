//! Small marker files in the data directory: the removal tombstone and the incarnation id.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use super::error::{corrupt, io_err, StorageError};
use super::fsutil::{ensure_dir, write_atomic};

/// Name of the tombstone file.
pub(crate) const TOMBSTONE_FILE: &str = "tombstone";
/// Name of the incarnation file.
pub(crate) const INCARNATION_FILE: &str = "incarnation";
/// Name of the lost-log marker (a quarantined empty joiner; see [`write_lost_log`]).
pub(crate) const LOST_LOG_FILE: &str = "lost-log";

/// Name of the marker of a data directory restored from a backup (see
/// [`write_restored_from`]).
pub(crate) const RESTORED_FROM_FILE: &str = "restored-from";

/// Records, before the restored state is written, which backup (applied index and
/// checksum) a new data directory is restored from, and with which revision bump: a
/// later start that names another backup is refused instead of silently keeping the
/// data it has.
pub fn write_restored_from(dir: &Path, applied_index: u64, crc: u32, bump: u64) -> Result<(), StorageError> {
    ensure_dir(dir)?;
    write_atomic(&dir.join(RESTORED_FROM_FILE), |f| writeln!(f, "{applied_index} {crc:08x} {bump}"))
}

/// The backup this data directory was restored from, as (applied index, checksum,
/// revision bump); `None` when it was not restored from one.
pub fn read_restored_from(dir: &Path) -> Result<Option<(u64, u32, u64)>, StorageError> {
    let path = dir.join(RESTORED_FROM_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => {
            let mut parts = s.split_whitespace();
            let applied = parts.next().map(str::parse::<u64>);
            let crc = parts.next().map(|c| u32::from_str_radix(c, 16));
            let bump = parts.next().map_or(Ok(0), str::parse::<u64>);
            match (applied, crc, bump) {
                (Some(Ok(applied)), Some(Ok(crc)), Ok(bump)) => Ok(Some((applied, crc, bump))),
                _ => Err(corrupt(&path, 0, format!("restored-from marker holds {:?}, expected \"<applied index> <crc32 hex> <bump>\"", s.trim()))),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Marks the data directory as belonging to a member that was removed from its cluster
/// and must not rejoin. `reason` is kept for the operator (written atomically).
pub fn write_tombstone(dir: &Path, reason: &str) -> Result<(), StorageError> {
    ensure_dir(dir)?;
    write_atomic(&dir.join(TOMBSTONE_FILE), |f| f.write_all(reason.as_bytes()))
}

/// The tombstone's reason, or `None` when the directory has no tombstone.
pub fn read_tombstone(dir: &Path) -> Result<Option<String>, StorageError> {
    let path = dir.join(TOMBSTONE_FILE);
    match fs::read(&path) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Marks an empty data directory as that of a member the cluster knows by a log this
/// directory never had (a lost or replaced volume), seen with commit index `commit`:
/// the member stays out of raft, across restarts too, until the cluster added its id
/// again after that index.
pub fn write_lost_log(dir: &Path, commit: u64) -> Result<(), StorageError> {
    ensure_dir(dir)?;
    write_atomic(&dir.join(LOST_LOG_FILE), |f| writeln!(f, "{commit}"))
}

/// The commit index of the lost-log marker, or `None` without one.
pub fn read_lost_log(dir: &Path) -> Result<Option<u64>, StorageError> {
    let path = dir.join(LOST_LOG_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(v) => Ok(Some(v)),
            Err(_) => Err(corrupt(&path, 0, format!("lost-log marker holds {:?}, expected a number", s.trim()))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Removes the lost-log marker (the member was added again), durably.
pub fn clear_lost_log(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join(LOST_LOG_FILE);
    match fs::remove_file(&path) {
        Ok(()) => super::fsutil::sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// The data directory's incarnation: a random non-zero u64 created with the directory's
/// first use and kept in `dir/incarnation` (16 hex digits). A member whose incarnation
/// changed has lost its volume.
pub fn data_dir_incarnation(dir: &Path) -> Result<u64, StorageError> {
    let path = dir.join(INCARNATION_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => {
            let t = s.trim();
            match u64::from_str_radix(t, 16) {
                Ok(v) if v != 0 && t.len() == 16 => Ok(v),
                _ => Err(corrupt(&path, 0, format!("incarnation file holds {t:?}, expected 16 hex digits"))),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ensure_dir(dir)?;
            let v = random_nonzero_u64().map_err(io_err(Path::new("/dev/urandom")))?;
            write_atomic(&path, |f| writeln!(f, "{v:016x}"))?;
            Ok(v)
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn random_nonzero_u64() -> io::Result<u64> {
    let mut f = fs::File::open("/dev/urandom")?;
    loop {
        let mut b = [0u8; 8];
        f.read_exact(&mut b)?;
        let v = u64::from_le_bytes(b);
        if v != 0 {
            return Ok(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstone_round_trip() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_tombstone(d.path()).expect("read"), None);
        write_tombstone(d.path(), "removed at index 42").expect("write");
        assert_eq!(read_tombstone(d.path()).expect("read").as_deref(), Some("removed at index 42"));
    }

    #[test]
    fn lost_log_marker_round_trip() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_lost_log(d.path()).expect("read"), None);
        write_lost_log(d.path(), 150).expect("write");
        assert_eq!(read_lost_log(d.path()).expect("read"), Some(150));
        clear_lost_log(d.path()).expect("clear");
        clear_lost_log(d.path()).expect("clear again");
        assert_eq!(read_lost_log(d.path()).expect("read"), None);
        fs::write(d.path().join(LOST_LOG_FILE), "x").expect("write");
        assert!(read_lost_log(d.path()).expect_err("corrupt").is_corrupt());
    }

    #[test]
    fn incarnation_is_stable_per_dir_and_differs_between_dirs() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let x = data_dir_incarnation(a.path()).expect("a");
        assert_eq!(data_dir_incarnation(a.path()).expect("again"), x);
        assert_ne!(data_dir_incarnation(b.path()).expect("b"), x);
        fs::write(a.path().join(INCARNATION_FILE), "garbage").expect("write");
        assert!(data_dir_incarnation(a.path()).expect_err("corrupt").is_corrupt());
    }
}
