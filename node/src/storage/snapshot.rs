//! Snapshot files: `snap/<term:016x>-<index:016x>.snap` (a full image of the state
//! machine) and `snap/<term:016x>-<index:016x>.delta` (the changes since the snapshot
//! file before it; the state machine defines both images, storage only chains them).
//!
//! Layout: a 28-byte header — magic `RAFTKVSN`, version u32 LE, payload length u64 LE,
//! payload crc32 u32 LE, header crc32 u32 LE (over the 24 bytes before it) — then the
//! payload, a prost-encoded `eraftpb::Snapshot` (data + metadata). Files are written
//! atomically (tmp, fdatasync, rename, directory fsync) and never modified afterwards.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, skip_field, DecodeContext, WireType};
use prost::Message;
use raft::eraftpb::{Snapshot, SnapshotMetadata};

use super::error::{corrupt, io_err, StorageError};
use super::fsutil::{self, write_atomic};

/// File magic.
const MAGIC: [u8; 8] = *b"RAFTKVSN";
/// Format version written and accepted.
const VERSION: u32 = 1;
/// Header bytes before the payload.
pub(crate) const HEADER_LEN: usize = 28;

/// Where the durable WAL ended when a snapshot file was written: the active segment's
/// seq and its durable length. Kept in the file (payload field [`WAL_MARK_FIELD`]) so
/// that recovery can tell a file whose WAL record was never synced (a crash: the WAL
/// still reaches the mark, the file is an orphan) from one whose record the WAL lost
/// (the WAL ends before the mark: damage). Files written before the mark existed have none.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub(crate) struct WalMark {
    /// Seq of the active segment.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Durable bytes of that segment.
    #[prost(uint64, tag = "2")]
    pub offset: u64,
}

impl WalMark {
    /// Whether the WAL, ending at `end`, reaches this mark.
    pub(crate) fn reached_by(&self, end: WalMark) -> bool {
        (self.seq, self.offset) <= (end.seq, end.offset)
    }
}

/// Payload field of the [`WalMark`]: raftkv's own (`eraftpb.Snapshot` has fields 1 and
/// 2); other protobuf readers skip it.
const WAL_MARK_FIELD: u32 = 15;

/// A snapshot file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapFile {
    /// Term from the name.
    pub term: u64,
    /// Index from the name.
    pub index: u64,
    /// Full path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// A delta (`.delta`) rather than a full image (`.snap`).
    pub delta: bool,
}

/// The file name of the snapshot at (`term`, `index`).
pub(crate) fn file_name(term: u64, index: u64) -> String {
    super::fsutil::pair_name(term, index, "snap")
}

/// The file name of the delta snapshot at (`term`, `index`).
pub(crate) fn delta_file_name(term: u64, index: u64) -> String {
    super::fsutil::pair_name(term, index, "delta")
}

/// Parses a snapshot file name into (term, index).
pub(crate) fn parse_name(name: &str) -> Option<(u64, u64)> {
    super::fsutil::parse_pair_name(name, "snap")
}

/// Parses a snapshot file name of either kind into (term, index, is a delta).
fn parse_any_name(name: &str) -> Option<(u64, u64, bool)> {
    match parse_name(name) {
        Some((t, i)) => Some((t, i, false)),
        None => super::fsutil::parse_pair_name(name, "delta").map(|(t, i)| (t, i, true)),
    }
}

/// Lists the snapshot files in `dir`, oldest (lowest index) first, a full snapshot after
/// a delta at the same index (it supersedes it). Leftover temporary
/// files from an interrupted write are deleted; unknown files are logged and ignored.
pub(crate) fn list(dir: &Path) -> Result<Vec<SnapFile>, StorageError> {
    let mut out: Vec<SnapFile> = fsutil::list_files(dir, "snapshot", parse_any_name)?
        .into_iter()
        .map(|((term, index, delta), path, size)| SnapFile { term, index, path, size, delta })
        .collect();
    out.sort_by_key(|f| (f.index, f.term, !f.delta));
    Ok(out)
}

/// Writes the snapshot file for `meta` + `data` atomically into `dir`, with the WAL's
/// durable end `mark` (None only in tests: a file as written before marks existed).
/// Returns its path and size.
pub(crate) fn write(
    dir: &Path,
    meta: &SnapshotMetadata,
    mark: Option<WalMark>,
    data: &[u8],
) -> Result<(PathBuf, u64), StorageError> {
    write_streamed(dir, meta, mark, false, data.len() as u64, |w| w.write_all(data))
}

/// Writes the snapshot file for `meta` atomically into `dir`, its data produced by
/// `fill`, which must write exactly `data_len` bytes. The data goes through a small
/// buffer straight to the file and is checksummed on the way; the header (which holds
/// the checksum) is written last, at the start of the file, before the fsync. A `delta`
/// gets the `.delta` name; the format is the same. `mark` (the WAL's durable end) is
/// written after the metadata. Returns the path and size.
pub(crate) fn write_streamed(
    dir: &Path,
    meta: &SnapshotMetadata,
    mark: Option<WalMark>,
    delta: bool,
    data_len: u64,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(PathBuf, u64), StorageError> {
    use std::os::unix::fs::FileExt;
    let name = if delta { delta_file_name(meta.term, meta.index) } else { file_name(meta.term, meta.index) };
    let path = dir.join(name);
    let mut prefix = Vec::with_capacity(16);
    if data_len > 0 {
        encode_key(1, WireType::LengthDelimited, &mut prefix);
        encode_varint(data_len, &mut prefix);
    }
    let mut suffix = Vec::new();
    prost::encoding::message::encode(2, meta, &mut suffix);
    if let Some(mark) = &mark {
        prost::encoding::message::encode(WAL_MARK_FIELD, mark, &mut suffix);
    }
    let payload_len = prefix.len() as u64 + data_len + suffix.len() as u64;
    write_atomic(&path, |f| {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&prefix);
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut *f);
        w.write_all(&[0u8; HEADER_LEN])?;
        w.write_all(&prefix)?;
        let mut counted = Checksummed { inner: &mut w, crc, written: 0 };
        fill(&mut counted)?;
        let Checksummed { written, mut crc, .. } = counted;
        if written != data_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("snapshot data was {written} bytes, {data_len} announced"),
            ));
        }
        crc.update(&suffix);
        w.write_all(&suffix)?;
        w.flush()?;
        drop(w);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&payload_len.to_le_bytes());
        header.extend_from_slice(&crc.finalize().to_le_bytes());
        let hcrc = crc32fast::hash(&header);
        header.extend_from_slice(&hcrc.to_le_bytes());
        f.write_all_at(&header, 0)
    })?;
    Ok((path, HEADER_LEN as u64 + payload_len))
}

/// A writer that checksums and counts what passes through it.
struct Checksummed<'a, W: Write> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for Checksummed<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads and verifies a snapshot file (header, lengths, payload crc, metadata). With
/// `with_data == false` the data is not kept (the returned snapshot has empty data) —
/// the file is still read and checked in full.
///
/// The data is read straight into its own exact-size buffer (`pread` of the pieces
/// around it), so a large snapshot costs one read and one allocation, never a copy.
pub(crate) fn read(path: &Path, with_data: bool) -> Result<Snapshot, StorageError> {
    read_marked(path, with_data).map(|(snap, _)| snap)
}

/// [`read`], also returning the file's [`WalMark`] (None in a file written before marks).
pub(crate) fn read_marked(path: &Path, with_data: bool) -> Result<(Snapshot, Option<WalMark>), StorageError> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let read_at = |buf: &mut [u8], off: u64| f.read_exact_at(buf, off).map_err(io_err(path));
    if file_len < HEADER_LEN as u64 {
        return Err(corrupt(path, 0, format!("file of {file_len} bytes is shorter than the header")));
    }
    let mut header = [0u8; HEADER_LEN];
    read_at(&mut header, 0)?;
    let (payload_len, payload_crc) = check_header(path, &header, file_len)?;
    // The data field (1) comes first in files we write; locate it from a short prefix.
    let mut head = vec![0u8; (payload_len.min(16)) as usize];
    read_at(&mut head, HEADER_LEN as u64)?;
    // A damaged length can be anything up to u64::MAX: compare without overflowing.
    let data_at = data_field(&head).filter(|&(start, len)| (start as u64).checked_add(len).is_some_and(|end| end <= payload_len));
    let Some((start, len)) = data_at else {
        // Some other field order: read the payload whole and parse it.
        let mut payload = vec![0u8; payload_len as usize];
        read_at(&mut payload, HEADER_LEN as u64)?;
        if crc32fast::hash(&payload) != payload_crc {
            return Err(corrupt(path, HEADER_LEN as u64, "payload crc mismatch"));
        }
        let (meta, range, mark) = parse_payload(&payload).map_err(|r| corrupt(path, HEADER_LEN as u64, r))?;
        let data = match (with_data, range) {
            (true, Some((s, e))) => payload[s..e].to_vec(),
            _ => Vec::new(),
        };
        return Ok((Snapshot { data, metadata: Some(meta) }, mark));
    };
    let len = usize::try_from(len).map_err(|_| corrupt(path, HEADER_LEN as u64, "data field too long"))?;
    let mut data = vec![0u8; len];
    let data_off = HEADER_LEN as u64 + start as u64;
    read_at(&mut data, data_off)?;
    let rest_off = data_off + len as u64;
    let mut rest = vec![0u8; (file_len - rest_off) as usize];
    read_at(&mut rest, rest_off)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..start]);
    h.update(&data);
    h.update(&rest);
    if h.finalize() != payload_crc {
        return Err(corrupt(path, HEADER_LEN as u64, "payload crc mismatch"));
    }
    let (meta, more_data, mark) = parse_payload(&rest).map_err(|r| corrupt(path, rest_off, r))?;
    if more_data.is_some() {
        return Err(corrupt(path, rest_off, "bad payload: a second data field"));
    }
    if !with_data {
        data = Vec::new();
    }
    Ok((Snapshot { data, metadata: Some(meta) }, mark))
}

/// Checks the 28-byte header against the file length; returns (payload length, crc).
fn check_header(path: &Path, h: &[u8; HEADER_LEN], file_len: u64) -> Result<(u64, u32), StorageError> {
    if h[0..8] != MAGIC {
        return Err(corrupt(path, 0, "bad magic (not a raftkv snapshot file)"));
    }
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    if crc32fast::hash(&h[0..24]) != u32_at(24) {
        return Err(corrupt(path, 0, "header checksum mismatch"));
    }
    let version = u32_at(8);
    if version != VERSION {
        return Err(corrupt(path, 8, format!("unsupported snapshot format version {version}")));
    }
    let mut lb = [0u8; 8];
    lb.copy_from_slice(&h[12..20]);
    let payload_len = u64::from_le_bytes(lb);
    let actual = file_len - HEADER_LEN as u64;
    if payload_len != actual {
        return Err(corrupt(
            path,
            HEADER_LEN as u64 + payload_len.min(actual),
            format!("payload is {actual} bytes, header says {payload_len}"),
        ));
    }
    Ok((payload_len, u32_at(20)))
}

/// If `head` (the payload's first bytes) starts with the data field (1, length
/// delimited), returns where its bytes start and how many there are.
fn data_field(head: &[u8]) -> Option<(usize, u64)> {
    let mut rest = head;
    let (tag, wt) = decode_key(&mut rest).ok()?;
    if (tag, wt) != (1, WireType::LengthDelimited) {
        return None;
    }
    let len = decode_varint(&mut rest).ok()?;
    Some((head.len() - rest.len(), len))
}

/// What [`parse_payload`] finds: the metadata, where the data is, the WAL mark.
type Parsed = (SnapshotMetadata, Option<(usize, usize)>, Option<WalMark>);

/// Walks the protobuf fields of a `Snapshot`: decodes the metadata and the WAL mark,
/// locates the data.
fn parse_payload(payload: &[u8]) -> Result<Parsed, String> {
    let mut rest: &[u8] = payload;
    let mut meta = None;
    let mut data = None;
    let mut mark = None;
    while !rest.is_empty() {
        let (tag, wt) = decode_key(&mut rest).map_err(|e| format!("bad payload: {e}"))?;
        match (tag, wt) {
            (1, WireType::LengthDelimited) | (2, WireType::LengthDelimited) => {
                let len = decode_varint(&mut rest).map_err(|e| format!("bad payload: {e}"))?;
                let len = usize::try_from(len).map_err(|_| "bad payload: field too long".to_string())?;
                if len > rest.len() {
                    return Err("bad payload: field runs past the end".into());
                }
                let start = payload.len() - rest.len();
                if tag == 1 {
                    data = Some((start, start + len));
                } else {
                    let m = SnapshotMetadata::decode(&rest[..len]).map_err(|e| format!("bad metadata: {e}"))?;
                    meta = Some(m);
                }
                rest = &rest[len..];
            }
            (WAL_MARK_FIELD, WireType::LengthDelimited) => {
                let len = decode_varint(&mut rest).map_err(|e| format!("bad payload: {e}"))?;
                let len = usize::try_from(len).map_err(|_| "bad payload: field too long".to_string())?;
                if len > rest.len() {
                    return Err("bad payload: field runs past the end".into());
                }
                mark = Some(WalMark::decode(&rest[..len]).map_err(|e| format!("bad WAL mark: {e}"))?);
                rest = &rest[len..];
            }
            _ => skip_field(wt, tag, &mut rest, DecodeContext::default())
                .map_err(|e| format!("bad payload: {e}"))?,
        }
    }
    let meta = meta.ok_or_else(|| "payload has no snapshot metadata".to_string())?;
    Ok((meta, data, mark))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::ConfState;

    fn meta(index: u64, term: u64) -> SnapshotMetadata {
        SnapshotMetadata {
            conf_state: Some(ConfState { voters: vec![1, 2, 3], ..Default::default() }),
            index,
            term,
        }
    }

    #[test]
    fn write_read_round_trip_matches_prost() {
        let d = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mark = WalMark { seq: 3, offset: 4096 };
        let (path, size) = write(d.path(), &meta(10, 2), Some(mark), &data).expect("write");
        assert_eq!(path.file_name().and_then(|n| n.to_str()), Some("0000000000000002-000000000000000a.snap"));
        assert_eq!(fs::metadata(&path).expect("stat").len(), size);
        let snap = read(&path, true).expect("read");
        assert_eq!(snap.data, data);
        assert_eq!(snap.metadata, Some(meta(10, 2)));
        // The payload is exactly what prost would produce for the same message.
        let raw = fs::read(&path).expect("raw");
        assert_eq!(Snapshot::decode(&raw[HEADER_LEN..]).expect("prost"), snap);
        let (light, got_mark) = read_marked(&path, false).expect("meta only");
        assert!(light.data.is_empty());
        assert_eq!((light.metadata, got_mark), (Some(meta(10, 2)), Some(mark)));
        // A file written before WAL marks has none.
        let (old, _) = write(d.path(), &meta(11, 2), None, &data).expect("write");
        assert_eq!(read_marked(&old, true).expect("read").1, None);
    }

    #[test]
    fn empty_data_round_trips() {
        let d = tempfile::tempdir().expect("tempdir");
        let (path, _) = write(d.path(), &meta(1, 1), None, &[]).expect("write");
        let snap = read(&path, true).expect("read");
        assert!(snap.data.is_empty());
        assert_eq!(snap.metadata, Some(meta(1, 1)));
    }

    #[test]
    fn any_bit_flip_is_corrupt_and_names_the_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let (path, size) = write(d.path(), &meta(5, 1), Some(WalMark { seq: 1, offset: 77 }), b"some state machine image").expect("write");
        let good = fs::read(&path).expect("read");
        for at in [0usize, 9, 13, 21, 25, HEADER_LEN, HEADER_LEN + 7, size as usize - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            fs::write(&path, &bad).expect("write bad");
            let err = read(&path, true).expect_err("must be corrupt");
            assert!(err.is_corrupt(), "flip at {at}: {err}");
            assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        }
        fs::write(&path, &good[..good.len() - 3]).expect("truncate");
        assert!(read(&path, true).expect_err("truncated").is_corrupt());
    }

    #[test]
    fn a_data_length_near_u64_max_is_corrupt_not_an_overflow() {
        // Found by the snapshot_decode fuzz target: `start + len` wrapped past the bound
        // check and the reader then tried to allocate ~2^64 bytes.
        let d = tempfile::tempdir().expect("tempdir");
        let mut payload = vec![0x0a];
        encode_varint(u64::MAX - 1, &mut payload);
        payload.extend_from_slice(&[1, 2, 3]);
        let mut file = Vec::new();
        file.extend_from_slice(&MAGIC);
        file.extend_from_slice(&VERSION.to_le_bytes());
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        let hcrc = crc32fast::hash(&file);
        file.extend_from_slice(&hcrc.to_le_bytes());
        file.extend_from_slice(&payload);
        let path = d.path().join(file_name(1, 2));
        fs::write(&path, &file).expect("write");
        assert!(read(&path, true).expect_err("corrupt").is_corrupt());
    }

    #[test]
    fn list_sorts_and_removes_tmp() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), &meta(20, 3), None, b"b").expect("write");
        write(d.path(), &meta(7, 2), None, b"a").expect("write");
        fs::write(d.path().join("0000000000000003-0000000000000030.snap.tmp"), b"junk").expect("tmp");
        fs::write(d.path().join("README"), b"x").expect("other");
        write_streamed(d.path(), &meta(20, 3), None, true, 1, |w| w.write_all(b"d")).expect("delta");
        write_streamed(d.path(), &meta(9, 2), None, true, 1, |w| w.write_all(b"d")).expect("delta");
        let files = list(d.path()).expect("list");
        let idx: Vec<(u64, bool)> = files.iter().map(|f| (f.index, f.delta)).collect();
        // The full snapshot at 20 supersedes the delta at 20: it sorts after it.
        assert_eq!(idx, vec![(7, false), (9, true), (20, true), (20, false)]);
        assert!(files[2].path.to_string_lossy().ends_with(".delta"));
        assert!(!d.path().join("0000000000000003-0000000000000030.snap.tmp").exists());
        assert!(d.path().join("README").exists());
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(parse_name(&file_name(3, 0x1234)), Some((3, 0x1234)));
        assert_eq!(parse_name("3-4.snap"), None);
        assert_eq!(parse_any_name(&delta_file_name(3, 9)), Some((3, 9, true)));
        assert_eq!(parse_any_name(&file_name(3, 9)), Some((3, 9, false)));
        assert_eq!(parse_name(&delta_file_name(3, 9)), None);
        assert_eq!(parse_name("000000000000000g-0000000000000001.snap"), None);
    }
}
