//! The storage error type and its mapping onto raft-rs's errors.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the WAL and snapshot storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A filesystem operation failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory the operation was about.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A WAL segment or snapshot file holds data that cannot be trusted. The message
    /// points at the recovery procedure (re-adding the member with an empty data dir).
    #[error(
        "{} corrupt: {} at offset {offset}: {reason} (the member must be recovered: see docs/storage.md, \"Recovering a damaged member\")",
        corrupt_kind(path),
        path.display()
    )]
    Corrupt {
        /// The damaged file (or directory).
        path: PathBuf,
        /// Byte offset of the damage inside the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Another process holds the data directory's lock.
    #[error("data directory {} is in use by another process (lock file {})", dir.display(), dir.join(super::LOCK_FILE).display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// A snapshot older than the one in force was offered.
    #[error("snapshot at index {given} is older than the current one (first index {first_index}, snapshot index {current})")]
    SnapshotOutOfDate {
        /// Index of the offered snapshot.
        given: u64,
        /// Index of the snapshot in force.
        current: u64,
        /// First index of the log.
        first_index: u64,
    },
    /// Entries handed to `append` do not fit the log.
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    /// A snapshot handed to `apply_snapshot` is unusable.
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    /// A hard state handed to `set_hard_state` holds a term or commit beyond what the
    /// WAL can read back (2^63 - 1).
    #[error("invalid hard state: {0}")]
    InvalidHardState(String),
    /// The requested index is past the end of the log.
    #[error("index {index} is not in the log yet (last index {last_index})")]
    Unavailable {
        /// Requested index.
        index: u64,
        /// Last index of the log.
        last_index: u64,
    },
    /// The requested index was compacted away.
    #[error("index {index} was compacted (first index {first_index})")]
    Compacted {
        /// Requested index.
        index: u64,
        /// First index of the log.
        first_index: u64,
    },
    /// A single record or snapshot does not fit the on-disk format's length fields.
    #[error("{what} of {size} bytes is too large for the on-disk format")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: u64,
    },
    /// An earlier failure left the WAL in a state that only a restart can clear.
    #[error("storage is unusable after an earlier failure ({0}); restart the node")]
    Broken(String),
    /// A thread panicked while holding the storage lock.
    #[error("storage lock poisoned by a panicked thread")]
    Poisoned,
}

fn corrupt_kind(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("snap") | Some("delta") => return "snapshot",
        Some("wal") => return "WAL",
        _ => {}
    }
    // Whole-log checks name the directory itself.
    match path.file_name().and_then(|n| n.to_str()) {
        Some("wal") => "WAL",
        Some("snap") => "snapshot",
        _ => "storage",
    }
}

impl StorageError {
    /// True when the error is a full disk (ENOSPC) or an exhausted quota (EDQUOT): the
    /// caller may retry once space is freed; the storage stays consistent.
    pub fn is_no_space(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
                    || source.kind() == io::ErrorKind::StorageFull
            }
            _ => false,
        }
    }

    /// True when the error means the data on disk is damaged.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StorageError::Corrupt { .. })
    }
}

/// Builds a closure that wraps an `io::Error` with the path it concerns.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_path_buf(), source }
}

/// A `Corrupt` error.
pub(crate) fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt { path: path.to_path_buf(), offset, reason: reason.into() }
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> raft::Error {
        match e {
            StorageError::Compacted { .. } => raft::Error::Store(raft::StorageError::Compacted),
            StorageError::Unavailable { .. } => raft::Error::Store(raft::StorageError::Unavailable),
            StorageError::SnapshotOutOfDate { .. } => raft::Error::Store(raft::StorageError::SnapshotOutOfDate),
            other => raft::Error::Store(raft::StorageError::Other(Box::new(other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_no_space() {
        let e = StorageError::Io { path: "x".into(), source: io::Error::from_raw_os_error(28) };
        assert!(e.is_no_space());
        let e = StorageError::Io { path: "x".into(), source: io::Error::from_raw_os_error(libc::EIO) };
        assert!(!e.is_no_space());
        assert!(!StorageError::Poisoned.is_no_space());
    }

    #[test]
    fn corrupt_display_names_file_and_offset() {
        let e = corrupt(Path::new("/d/wal/0000000000000001-0000000000000001.wal"), 4096, "crc mismatch");
        assert_eq!(
            e.to_string(),
            "WAL corrupt: /d/wal/0000000000000001-0000000000000001.wal at offset 4096: crc mismatch \
             (the member must be recovered: see docs/storage.md, \"Recovering a damaged member\")"
        );
        let e = corrupt(Path::new("/d/snap/a.snap"), 12, "bad");
        assert!(e.to_string().starts_with("snapshot corrupt: /d/snap/a.snap at offset 12"));
        let e = corrupt(Path::new("/d/snap/a.delta"), 12, "bad");
        assert!(e.to_string().starts_with("snapshot corrupt: /d/snap/a.delta at offset 12"));
    }

    #[test]
    fn maps_onto_raft_errors() {
        let e: raft::Error = StorageError::Compacted { index: 1, first_index: 2 }.into();
        assert_eq!(e, raft::Error::Store(raft::StorageError::Compacted));
        let e: raft::Error = StorageError::Poisoned.into();
        assert!(matches!(e, raft::Error::Store(raft::StorageError::Other(_))));
    }
}
