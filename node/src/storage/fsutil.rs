//! Small filesystem helpers: directory fsync, atomic file replacement, the dir lock.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::error::{io_err, StorageError};

/// fsyncs a directory so that creations, renames and deletions inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    let f = File::open(dir).map_err(io_err(dir))?;
    f.sync_all().map_err(io_err(dir))
}

/// Creates `dir` (and parents) if missing; fsyncs the parent of every directory created.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), StorageError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            ensure_dir(parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    }
    // A relative name of one component (`raftkv-1`) lives in the working directory.
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// The files of `dir` whose names `parse` accepts, with their paths and sizes, in
/// directory order. Leftover `*.tmp` files of an interrupted write are deleted (and the
/// deletion made durable); other names are logged and ignored. `what` names the files
/// in the logs ("WAL", "snapshot").
pub(crate) fn list_files<T>(
    dir: &Path,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<(T, PathBuf, u64)>, StorageError> {
    let mut out = Vec::new();
    let mut removed = false;
    for ent in fs::read_dir(dir).map_err(io_err(dir))? {
        let ent = ent.map_err(io_err(dir))?;
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            tracing::warn!(file = %path.display(), "removing leftover temporary {what} file");
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed = true;
            continue;
        }
        match parse(&name) {
            Some(parsed) => {
                let size = ent.metadata().map_err(io_err(&path))?.len();
                out.push((parsed, path, size));
            }
            None => tracing::warn!(file = %path.display(), "ignoring unknown file in the {what} directory"),
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(out)
}

/// The temporary name `path` is written under before the rename.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    suffixed(path, ".tmp")
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes a file atomically: `<path>.tmp`, write, fdatasync, rename, fsync the directory.
/// `write` receives the open temporary file. A failure removes the temporary file.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), StorageError> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        write(&mut f)?;
        f.flush()?;
        f.sync_data()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    sync_dir(dir)
}

/// What [`preallocate`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prealloc {
    /// The blocks are reserved: the file is at least the asked length.
    Done,
    /// The filesystem (or platform) cannot preallocate: fall back to growing files.
    Unsupported,
    /// Not enough free space (ENOSPC/EDQUOT) for the whole length right now. The file
    /// may have been extended in part (zeros); it can still grow as written while any
    /// space is left.
    NoSpace,
}

#[cfg(test)]
thread_local! {
    /// Test hook: while set, [`preallocate`] answers [`Prealloc::NoSpace`] on this thread.
    pub(crate) static PREALLOC_NO_SPACE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Allocates disk blocks for `file` up to `len` bytes (the file's size becomes at least
/// `len`; new bytes read as zeros), so later writes inside that range need no size
/// change — `fdatasync` then has less metadata to commit. A full disk is not an error
/// ([`Prealloc::NoSpace`]): a preallocation is an optimisation, and refusing to create
/// or open a segment because 64 MiB are not free would stall a node that still has room
/// for its next writes. Never emulated by writing zeros.
pub(crate) fn preallocate(file: &File, len: u64) -> std::io::Result<Prealloc> {
    #[cfg(test)]
    if PREALLOC_NO_SPACE.with(std::cell::Cell::get) {
        return Ok(Prealloc::NoSpace);
    }
    #[cfg(target_os = "linux")]
    {
        let Ok(len) = libc::off_t::try_from(len) else { return Ok(Prealloc::Unsupported) };
        loop {
            // SAFETY: fallocate on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
            if rc == 0 {
                return Ok(Prealloc::Done);
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(Prealloc::Unsupported),
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => return Ok(Prealloc::NoSpace),
                _ => return Err(err),
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, len);
        Ok(Prealloc::Unsupported)
    }
}

/// An exclusive advisory lock (`flock`) on a file; released when dropped.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir/<name>` without waiting; `Locked` if another holder exists.
    pub(crate) fn acquire(dir: &Path, name: &str) -> Result<DirLock, StorageError> {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StorageError::Locked { dir: dir.to_path_buf() });
            }
            return Err(io_err(&path)(err));
        }
        Ok(DirLock { _file: file })
    }
}

/// A file name `<a:016x>-<b:016x>.<ext>` (WAL segments, snapshot files).
pub(crate) fn pair_name(a: u64, b: u64, ext: &str) -> String {
    format!("{a:016x}-{b:016x}.{ext}")
}

/// Parses a name made by [`pair_name`] with extension `ext` into (a, b).
pub(crate) fn parse_pair_name(name: &str, ext: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    let (a, b) = stem.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
}

#[cfg(test)]
thread_local! {
    /// Test hook: the next this many [`remove_file`] calls on this thread fail with EIO
    /// (`usize::MAX`: all of them).
    pub(crate) static UNLINK_FAILS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `fs::remove_file`, through a seam tests can make fail ([`UNLINK_FAILS`]).
pub(crate) fn remove_file(path: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    {
        let left = UNLINK_FAILS.with(std::cell::Cell::get);
        if left > 0 {
            UNLINK_FAILS.with(|c| c.set(if left == usize::MAX { left } else { left - 1 }));
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
    }
    fs::remove_file(path)
}

/// Deletes files of `dir` that are no longer needed (WAL segments or snapshots), then
/// fsyncs `dir` once if any was deleted. Meant to run with no storage lock held: an
/// unlink and a directory fsync can take many milliseconds on a disk busy writing a
/// snapshot back. A file that cannot be deleted is logged (warning) and left in `paths`
/// for the caller to try again later; the others are taken out (a file already gone
/// counts as deleted). Returns how many were deleted. An error means the directory
/// fsync failed (the deletions may not be durable: the files may come back after a
/// crash, which recovery treats as if the compaction had not happened).
///
/// With `in_order` (WAL segments, oldest first) the first file that cannot be deleted
/// stops the deletion: it and every file after it stay, because recovery refuses a gap
/// in the segment sequence (deleting 8 and 9 while 7 stays would leave one). Without,
/// the others are deleted regardless (snapshot files: any subset may go).
pub(crate) fn delete_files(dir: &Path, paths: &mut Vec<PathBuf>, in_order: bool) -> Result<usize, StorageError> {
    let before = paths.len();
    let mut stopped = false;
    paths.retain(|path| {
        if stopped {
            return true;
        }
        match remove_file(path) {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete a file compaction freed; will retry at the next compaction");
                stopped = in_order;
                true
            }
        }
    });
    let deleted = before - paths.len();
    if deleted > 0 {
        sync_dir(dir)?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_tmp() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        write_atomic(&p, |f| f.write_all(b"one")).expect("write");
        write_atomic(&p, |f| f.write_all(b"two")).expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn failed_write_removes_tmp_and_keeps_old() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        write_atomic(&p, |f| f.write_all(b"old")).expect("write");
        let err = write_atomic(&p, |_| Err(std::io::Error::from_raw_os_error(libc::ENOSPC)))
            .expect_err("must fail");
        assert!(err.is_no_space());
        assert_eq!(fs::read(&p).expect("read"), b"old");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn second_lock_is_refused_until_first_dropped() {
        let d = tempfile::tempdir().expect("tempdir");
        let l = DirLock::acquire(d.path(), "LOCK").expect("first");
        assert!(matches!(DirLock::acquire(d.path(), "LOCK"), Err(StorageError::Locked { .. })));
        drop(l);
        DirLock::acquire(d.path(), "LOCK").expect("after drop");
    }

    #[test]
    fn ensure_dir_creates_nested() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a/b/c");
        ensure_dir(&p).expect("create");
        assert!(p.is_dir());
        ensure_dir(&p).expect("idempotent");
    }
}
