//! Backups: the whole state machine in one checked file, taken from a running member
//! (`GET /v1/backup`, etcd's `etcdctl snapshot save`) and turned into a new cluster
//! (`--restore-from`, etcd's `etcdutl snapshot restore`). docs/api.md and
//! docs/storage.md describe both.
//!
//! Layout: a 28-byte header — magic `RAFTKVBK`, version u32 LE, applied index u64 LE,
//! image length u64 LE — then the image (a full [`crate::kv::SnapshotImage`], the same
//! encoding a snapshot file holds), then a crc32 u32 LE over everything before it. The
//! length up front and the checksum at the end let a backup be streamed as it is
//! encoded, and let a truncated or damaged copy be told apart from a good one.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::kv::ImageSource;

/// File magic.
const MAGIC: [u8; 8] = *b"RAFTKVBK";
/// Format version written and accepted.
const VERSION: u32 = 1;
/// Header bytes before the image.
pub const HEADER_LEN: u64 = 28;
/// Checksum bytes after the image.
pub const TRAILER_LEN: u64 = 4;

/// A backup file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading the file failed.
    #[error("backup {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file is not a complete, undamaged raftkv backup.
    #[error("backup {path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// What a checked backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupInfo {
    /// Applied index of the member when the image was taken; the restored cluster's
    /// log starts there, so that every later write gets a higher revision.
    pub applied_index: u64,
    /// Bytes of the image.
    pub image_len: u64,
    /// The file's checksum (mixed into the restored cluster's id).
    pub crc: u32,
}

/// Bytes of a whole backup file whose image has `image_len` bytes.
pub fn file_len(image_len: u64) -> u64 {
    HEADER_LEN + image_len + TRAILER_LEN
}

/// A writer that checksums what goes through it.
struct Checksummed<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
}

impl<W: Write + ?Sized> Write for Checksummed<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a backup of a full image to `w`, streaming the image as it is encoded
/// ([`file_len`]`(image.encoded_len())` bytes in all). Returns the checksum.
pub fn write<W: Write + ?Sized>(image: &ImageSource, image_len: u64, w: &mut W) -> io::Result<u32> {
    let mut c = Checksummed { inner: w, crc: crc32fast::Hasher::new() };
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&image.applied().to_le_bytes());
    header.extend_from_slice(&image_len.to_le_bytes());
    c.write_all(&header)?;
    image.encode_to(&mut c)?;
    let crc = c.crc.clone().finalize();
    c.inner.write_all(&crc.to_le_bytes())?;
    Ok(crc)
}

/// Reads the header; the reader is left at the image.
fn read_header(path: &Path, r: &mut impl Read, file_len: u64) -> Result<(BackupInfo, crc32fast::Hasher), BackupError> {
    let invalid = |why: String| BackupError::Invalid { path: path.to_path_buf(), why };
    if file_len < HEADER_LEN + TRAILER_LEN {
        return Err(invalid(format!("{file_len} bytes is too short for a raftkv backup (a truncated download?)")));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut header).map_err(|source| BackupError::Io { path: path.to_path_buf(), source })?;
    if header[..8] != MAGIC {
        return Err(invalid("not a raftkv backup (bad magic; a backup starts with RAFTKVBK)".into()));
    }
    let le64 = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or([0; 4]));
    if version != VERSION {
        return Err(invalid(format!("backup format version {version}; this raftkv reads version {VERSION}")));
    }
    let (applied_index, image_len) = (le64(12), le64(20));
    if applied_index == 0 {
        return Err(invalid("applied index 0: no member ever had such a state".into()));
    }
    if applied_index >= crate::storage::MAX_INDEX {
        // The restored log continues after it, and no entry may go past MAX_INDEX.
        return Err(invalid(format!("applied index {applied_index}: no log can continue after it (at most {})", crate::storage::MAX_INDEX - 1)));
    }
    if image_len.checked_add(HEADER_LEN + TRAILER_LEN) != Some(file_len) {
        return Err(invalid(format!(
            "the header announces a {image_len}-byte image, the file has {file_len} bytes in all (truncated or padded)"
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    Ok((BackupInfo { applied_index, image_len, crc: 0 }, crc))
}

fn open(path: &Path) -> Result<(File, u64), BackupError> {
    let io = |source| BackupError::Io { path: path.to_path_buf(), source };
    let f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    Ok((f, len))
}

fn check_trailer(path: &Path, crc: crc32fast::Hasher, trailer: [u8; 4]) -> Result<u32, BackupError> {
    let (want, got) = (u32::from_le_bytes(trailer), crc.finalize());
    if want != got {
        return Err(BackupError::Invalid { path: path.to_path_buf(), why: format!("checksum mismatch (file says {want:08x}, content gives {got:08x}): the file is damaged") });
    }
    Ok(got)
}

/// Reads a backup file whole and checks it: its header and its image bytes.
pub fn read(path: &Path) -> Result<(BackupInfo, Vec<u8>), BackupError> {
    let (mut f, len) = open(path)?;
    let (mut info, mut crc) = read_header(path, &mut f, len)?;
    let image_len = usize::try_from(info.image_len).map_err(|_| BackupError::Invalid { path: path.to_path_buf(), why: "image too large for this machine".into() })?;
    let mut image = vec![0u8; image_len];
    let mut trailer = [0u8; 4];
    f.read_exact(&mut image)
        .and_then(|()| f.read_exact(&mut trailer))
        .map_err(|source| BackupError::Io { path: path.to_path_buf(), source })?;
    crc.update(&image);
    info.crc = check_trailer(path, crc, trailer)?;
    Ok((info, image))
}

/// A backup file's identity — its applied index and the checksum its trailer records —
/// read from its header and last bytes only (nothing is verified but the header).
pub fn identity(path: &Path) -> Result<(u64, u32), BackupError> {
    use std::io::{Seek, SeekFrom};
    let (mut f, len) = open(path)?;
    let (info, _) = read_header(path, &mut f, len)?;
    let io = |source| BackupError::Io { path: path.to_path_buf(), source };
    let mut trailer = [0u8; 4];
    f.seek(SeekFrom::Start(len - TRAILER_LEN)).and_then(|_| f.read_exact(&mut trailer)).map_err(io)?;
    Ok((info.applied_index, u32::from_le_bytes(trailer)))
}

/// Checks a backup file whole — header, length, checksum — reading it in chunks, so a
/// large backup is never held in memory (what [`read`] checks, without the image).
pub fn verify(path: &Path) -> Result<BackupInfo, BackupError> {
    let (f, len) = open(path)?;
    let mut f = io::BufReader::with_capacity(1 << 16, f);
    let (mut info, mut crc) = read_header(path, &mut f, len)?;
    let io = |source| BackupError::Io { path: path.to_path_buf(), source };
    let mut left = info.image_len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        f.read_exact(&mut buf[..n]).map_err(io)?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    let mut trailer = [0u8; 4];
    f.read_exact(&mut trailer).map_err(io)?;
    info.crc = check_trailer(path, crc, trailer)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{Command, KvStore, OpType};

    fn store(keys: u64) -> KvStore {
        let mut kv = KvStore::new();
        kv.set_member(1, "http://127.0.0.1:1".into());
        for i in 0..keys {
            let cmd = Command { request_id: i, op: OpType::Put as i32, key: format!("k{i:04}"), value: vec![i as u8; 100], prev_revision: None, ..Default::default() };
            kv.apply(i + 2, &cmd);
        }
        kv
    }

    fn backup_of(kv: &KvStore) -> Vec<u8> {
        let img = kv.image_source();
        let len = img.encoded_len() as u64;
        let mut out = Vec::new();
        write(&img, len, &mut out).unwrap();
        assert_eq!(out.len() as u64, file_len(len));
        out
    }

    #[test]
    fn a_backup_reads_back_as_the_same_state() {
        let kv = store(300);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        std::fs::write(&path, backup_of(&kv)).unwrap();
        let (info, image) = read(&path).unwrap();
        assert_eq!(verify(&path).unwrap(), info, "the streaming check agrees");
        assert_eq!(info.applied_index, 301);
        assert_eq!(info.image_len, image.len() as u64);
        let mut back = KvStore::new();
        back.restore(&image).unwrap();
        assert_eq!(back.len(), 300);
        assert_eq!(back.get("k0042").map(|v| (v.data.to_vec(), v.revision)), Some((vec![42u8; 100], 44)));
    }

    #[test]
    fn a_damaged_or_cut_backup_is_refused_with_the_reason() {
        let good = backup_of(&store(50));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let refused = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let why = match read(&path) {
                Err(BackupError::Invalid { why, .. }) => why,
                Err(other) => panic!("{other:?}"),
                Ok((info, _)) => panic!("accepted: {info:?}"),
            };
            // The streaming check refuses it for the same reason.
            match verify(&path) {
                Err(BackupError::Invalid { why: v, .. }) => assert_eq!(v, why),
                other => panic!("verify: {other:?}"),
            }
            why
        };
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        assert!(refused(&flipped).contains("checksum"));
        assert!(refused(&good[..good.len() - 1]).contains("truncated"));
        assert!(refused(&good[..10]).contains("too short"));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(refused(&magic).contains("magic"));
        let mut version = good.clone();
        version[8] = 9;
        assert!(refused(&version).contains("version 9"));
        let mut zero = good.clone();
        zero[12..20].copy_from_slice(&0u64.to_le_bytes());
        assert!(refused(&zero).contains("applied index 0"));
        // The storage's largest index: a member restored at it could never append.
        let mut last = good.clone();
        last[12..20].copy_from_slice(&crate::storage::MAX_INDEX.to_le_bytes());
        assert!(refused(&last).contains("no log can continue after it"), "{}", refused(&last));
        assert!(matches!(read(&dir.path().join("missing")), Err(BackupError::Io { .. })));
        assert!(matches!(verify(&dir.path().join("missing")), Err(BackupError::Io { .. })));
    }

    #[test]
    fn verify_streams_a_backup_larger_than_its_buffer() {
        let mut good = backup_of(&store(1500));
        assert!(good.len() > 2 << 16, "{} bytes: not several buffers", good.len());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        std::fs::write(&path, &good).unwrap();
        let info = verify(&path).unwrap();
        assert_eq!((info.applied_index, file_len(info.image_len)), (1501, good.len() as u64));
        assert_eq!(info, read(&path).unwrap().0);
        // A byte flipped past the first buffer is caught.
        let at = good.len() - 100;
        good[at] ^= 0x80;
        std::fs::write(&path, &good).unwrap();
        assert!(matches!(verify(&path), Err(BackupError::Invalid { why, .. }) if why.contains("checksum")));
    }
}
