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
