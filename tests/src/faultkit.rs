//! Fault-injection helpers for the fault suite (tests/tests/fault_suite.rs): damage to a
//! stopped node's WAL segments and snapshot files, log-file checks, and a real full
//! filesystem (a size-limited tmpfs) for ENOSPC.
//!
//! The WAL format these helpers parse is documented in docs/storage.md: a 32-byte
//! segment header, then records `[len u32][len_crc u32][crc u32][type u8][payload]`,
//! then (in a preallocated segment) zeros up to the end of the file.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Bytes of a WAL segment header.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Bytes of a WAL record header (`len`, `len_crc`, `crc`).
pub const RECORD_HEADER_LEN: u64 = 12;
/// WAL record type of a `Meta` record (first of every segment).
pub const REC_META: u8 = 1;
/// WAL record type of an `Entries` record.
pub const REC_ENTRIES: u8 = 2;
/// WAL record type of a `HardState` record.
pub const REC_HARD_STATE: u8 = 3;

/// WAL segments (`wal/*.wal`) of a data dir, sorted by name (sequence order).
pub fn wal_segments(data_dir: &Path) -> Vec<PathBuf> {
    files_with_extension(&data_dir.join("wal"), "wal")
}

/// Snapshot files (`snap/*.snap`, full, and `snap/*.delta`) of a data dir, oldest first
/// (names sort by term, index).
pub fn snapshot_files(data_dir: &Path) -> Vec<PathBuf> {
    let dir = data_dir.join("snap");
    let mut v = files_with_extension(&dir, "snap");
    v.extend(files_with_extension(&dir, "delta"));
    v.sort();
    v
}

fn files_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> =
        rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == ext)).collect();
    v.sort();
    v
}

/// One framed record found in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRecord {
    /// Offset of the record header in the file.
    pub offset: u64,
    /// Total bytes (header + type + payload).
    pub len: u64,
    /// Record type byte ([`REC_META`], [`REC_ENTRIES`], ...).
    pub kind: u8,
}

impl WalRecord {
    /// Offset just past the record.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The records of a segment whose framing and checksums check out, in file order, up
/// to the first one that does not (the written end of the segment).
pub fn wal_records(segment: &Path) -> io::Result<Vec<WalRecord>> {
    let data = std::fs::read(segment)?;
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_LEN as usize;
    let h = RECORD_HEADER_LEN as usize;
    while off + h < data.len() {
        let u32_at = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let len = u32_at(off) as usize;
        if len == 0 || crc32(&data[off..off + 4]) != u32_at(off + 4) || off + h + len > data.len() {
            break;
        }
        if crc32(&data[off + h..off + h + len]) != u32_at(off + 8) {
            break;
        }
        out.push(WalRecord { offset: off as u64, len: (h + len) as u64, kind: data[off + h] });
        off += h + len;
    }
    Ok(out)
}

/// Where the written part of a segment ends (just after its last good record).
pub fn written_end(segment: &Path) -> io::Result<u64> {
    Ok(wal_records(segment)?.last().map_or(SEGMENT_HEADER_LEN, WalRecord::end))
}

/// WAL record type of a `SnapshotSaved` record.
pub const REC_SNAPSHOT_SAVED: u8 = 4;
/// WAL record type of a `SnapshotApplied` record.
pub const REC_SNAPSHOT_APPLIED: u8 = 5;

/// The snapshot file the WAL of `data_dir` says is in force: the one named by the last
/// `SnapshotSaved`/`SnapshotApplied` record of the last segment holding one (the full
/// file at that index if there is one, else the delta). A newer
/// file without its record (a save interrupted by the stop) is an orphan that recovery
/// deletes, so damaging that one proves nothing. `None` when no record is found.
pub fn snapshot_in_force(data_dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut found = None;
    for seg in wal_segments(data_dir) {
        let data = std::fs::read(&seg)?;
        for r in wal_records(&seg)? {
            if r.kind == REC_SNAPSHOT_SAVED || r.kind == REC_SNAPSHOT_APPLIED {
                let payload = &data[(r.offset + RECORD_HEADER_LEN + 1) as usize..r.end() as usize];
                found = Some(decode_snap_ref(payload).ok_or_else(|| io::Error::other("bad snapshot record"))?);
            }
        }
    }
    Ok(found.map(|(index, term)| {
        let full = data_dir.join("snap").join(format!("{term:016x}-{index:016x}.snap"));
        let delta = full.with_extension("delta");
        if !full.exists() && delta.exists() {
            delta
        } else {
            full
        }
    }))
}

/// Decodes a `SnapRef { 1: index u64, 2: term u64 }` protobuf payload.
fn decode_snap_ref(mut b: &[u8]) -> Option<(u64, u64)> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let (mut index, mut term) = (0, 0);
    while !b.is_empty() {
        match varint(&mut b)? {
            0x08 => index = varint(&mut b)?,
            0x10 => term = varint(&mut b)?,
            _ => return None,
        }
    }
    Some((index, term))
}

/// Bytes a disk writes atomically (a sector): a crash can only tear a write at sector
/// boundaries, and what did not land reads as zeros (the segment is preallocated).
pub const SECTOR: u64 = 512;

/// How [`append_torn_record`] imitates a write that never completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TornWrite {
    /// A batch of copies of the last record(s), longer than what remains of the current
    /// sector, of which only that remainder landed: complete copies (valid records that
    /// repeat what is already there — harmless) and then the first part of one more,
    /// whose later sectors read as zeros.
    BatchCutAtASectorBoundary,
    /// A valid header (length and length checksum) claiming a 4 KiB body, followed by
    /// only 100 bytes of it: the record's later sectors never landed.
    HeaderClaimingMore,
}

/// Appends an incomplete record just after the last good record of `segment` (inside
/// its preallocated zeros, or growing the file): the state a power loss in the middle
/// of an unacknowledged append leaves. Returns (offset of the partial record, bytes
/// written).
pub fn append_torn_record(segment: &Path, how: TornWrite) -> io::Result<(u64, u64)> {
    let recs = wal_records(segment)?;
    let last = *recs.last().ok_or_else(|| io::Error::other("segment has no records"))?;
    let f = OpenOptions::new().read(true).write(true).open(segment)?;
    let w = last.end();
    let (partial_at, bytes) = match how {
        TornWrite::BatchCutAtASectorBoundary => {
            let read = |r: &WalRecord| -> io::Result<Vec<u8>> {
                let mut b = vec![0u8; r.len as usize];
                f.read_exact_at(&mut b, r.offset)?;
                Ok(b)
            };
            let mut unit = read(&last)?;
            if SECTOR % last.len == 0 && recs.len() >= 2 {
                // Copies of one record that divides a sector could end exactly on a
                // boundary: use the last two records as the unit instead.
                let mut two = read(&recs[recs.len() - 2])?;
                two.extend_from_slice(&unit);
                unit = two;
            }
            let u = unit.len() as u64;
            // The first sector boundary after `w` that falls inside a record of a copy
            // (not between two records).
            let first = u - last.len;
            let cut = (1..=64)
                .map(|k| (w / SECTOR + k) * SECTOR)
                .find(|b| (b - w) % u != 0 && (first == 0 || (b - w) % u != first))
                .ok_or_else(|| io::Error::other("no sector boundary falls inside a copy"))?;
            let bytes: Vec<u8> = unit.iter().copied().cycle().take((cut - w) as usize).collect();
            // The partial copy starts after the last complete unit; inside a two-record
            // unit, possibly after its complete first record.
            let mut at = w + (cut - w) / u * u;
            if first > 0 && cut - at > first {
                at += first;
            }
            (at, bytes)
        }
        TornWrite::HeaderClaimingMore => {
            let len: u32 = 4096;
            let mut b = Vec::new();
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&crc32(&len.to_le_bytes()).to_le_bytes());
            b.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
            b.push(REC_ENTRIES);
            b.extend((0..99u8).map(|i| i.wrapping_mul(7).wrapping_add(1)));
            (w, b)
        }
    };
    f.write_all_at(&bytes, w)?;
    f.sync_all()?;
    Ok((partial_at, bytes.len() as u64))
}

/// Zeroes the last `Entries` record of `segment` from a sector boundary in its second
/// half (or from its start, when it lies in one sector) to the written end; the file
/// keeps its length, as a preallocated file would. Entries that were synced — and
/// acknowledged — are gone. This is data loss, not a torn write. Returns the offset of
/// the damaged record.
pub fn lose_last_entries(segment: &Path) -> io::Result<u64> {
    let recs = wal_records(segment)?;
    let rec = *recs
        .iter()
        .rev()
        .find(|r| r.kind == REC_ENTRIES)
        .ok_or_else(|| io::Error::other("segment has no Entries record"))?;
    let end = recs.last().map_or(rec.end(), WalRecord::end);
    let from = ((rec.offset + rec.len / 2) / SECTOR * SECTOR).max(rec.offset);
    let f = OpenOptions::new().write(true).open(segment)?;
    f.write_all_at(&vec![0u8; (end - from) as usize], from)?;
    f.sync_all()?;
    Ok(rec.offset)
}

/// Flips all bits of the byte at `offset` of `file`.
pub fn flip_byte(file: &Path, offset: u64) -> io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).open(file)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset)?;
    b[0] ^= 0xff;
    f.write_all_at(&b, offset)?;
    f.sync_all()
}

/// Whether the text of `log` contains `needle`.
pub fn log_contains(log: &Path, needle: &str) -> bool {
    std::fs::read(log).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle))
}

/// Waits (bounded) until the text of `log` contains `needle`.
pub fn wait_log(log: &Path, needle: &str, timeout: Duration) {
    crate::wait_for(timeout, &format!("{needle:?} in {}", log.display()), || log_contains(log, needle).then_some(()));
}

fn crc32(data: &[u8]) -> u32 {
    // CRC-32 (IEEE, reflected, polynomial 0xEDB88320), bit by bit: small inputs only.
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A size-limited tmpfs mounted for one test (a real filesystem that fills up and then
/// fails writes with ENOSPC). Unmounted (lazily, so a process still inside cannot block
/// it) when dropped.
pub struct Tmpfs {
    /// The mount point.
    pub dir: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB at `dir` (created). `Err` says why it cannot (not
    /// root, no `mount`, or a container without CAP_SYS_ADMIN): callers skip the test.
    pub fn mount(dir: &Path, mib: u64) -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs { dir: dir.to_path_buf(), mounted: true })
    }

    /// Free bytes on the filesystem (statvfs).
    pub fn free_bytes(&self) -> u64 {
        free_bytes(&self.dir)
    }

    /// Creates `name` on the tmpfs and writes to it until the filesystem is full
    /// (ENOSPC): 1 MiB chunks, then 4 KiB ones. Returns the bytes written. Delete the
    /// file to give the space back.
    pub fn fill(&self, name: &str) -> io::Result<u64> {
        let path = self.dir.join(name);
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut total = 0u64;
        for chunk in [1usize << 20, 4096] {
            let buf = vec![0x5au8; chunk];
            // Bounded: the tmpfs has a fixed size.
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        f.sync_all()?;
        Ok(total)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            self.mounted = false;
        }
    }
}

/// Free bytes on the filesystem holding `path` (0 when it cannot be asked).
pub fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn snap_ref_decodes_varints() {
        assert_eq!(decode_snap_ref(&[0x08, 0xAD, 0x02, 0x10, 0x02]), Some((301, 2)));
        assert_eq!(decode_snap_ref(&[]), Some((0, 0)));
        assert_eq!(decode_snap_ref(&[0x08]), None);
        assert_eq!(decode_snap_ref(&[0x18, 0x01]), None);
    }

    fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![kind];
        body.extend_from_slice(payload);
        let len = (body.len() as u32).to_le_bytes();
        let mut r = Vec::new();
        r.extend_from_slice(&len);
        r.extend_from_slice(&crc32(&len).to_le_bytes());
        r.extend_from_slice(&crc32(&body).to_le_bytes());
        r.extend_from_slice(&body);
        r
    }

    #[test]
    fn records_torn_tails_and_lost_entries_on_a_synthetic_segment() {
        let d = tempfile::tempdir().expect("tempdir");
        let seg = d.path().join("wal").join("0000000000000001-0000000000000001.wal");
        std::fs::create_dir_all(seg.parent().expect("parent")).expect("mkdir");
        let mut data = vec![7u8; SEGMENT_HEADER_LEN as usize];
        let recs = [record(REC_META, b"m"), record(REC_ENTRIES, &[1; 40]), record(REC_SNAPSHOT_SAVED, &[0x08, 0x05, 0x10, 0x01])];
        for r in &recs {
            data.extend_from_slice(r);
        }
        let written = data.len() as u64;
        data.resize(4096, 0);
        std::fs::write(&seg, &data).expect("write");
        let found = wal_records(&seg).expect("records");
        assert_eq!(found.iter().map(|r| r.kind).collect::<Vec<_>>(), vec![REC_META, REC_ENTRIES, REC_SNAPSHOT_SAVED]);
        assert_eq!(written_end(&seg).expect("end"), written);
        assert_eq!(
            snapshot_in_force(d.path()).expect("scan"),
            Some(d.path().join("snap").join("0000000000000001-0000000000000005.snap"))
        );
        for how in [TornWrite::BatchCutAtASectorBoundary, TornWrite::HeaderClaimingMore] {
            let (off, n) = append_torn_record(&seg, how).expect("tear");
            assert!(n > 0);
            // Complete copies parse; the partial record does not: the written end is
            // where it starts, and the write stops at a sector boundary or inside it.
            assert_eq!(written_end(&seg).expect("end"), off, "{how:?}");
            assert!(off >= written && off < written + n, "{how:?}");
            if how == TornWrite::BatchCutAtASectorBoundary {
                assert_eq!((written + n) % SECTOR, 0);
            }
            let f = OpenOptions::new().write(true).open(&seg).expect("open");
            f.write_all_at(&vec![0u8; n as usize], written).expect("clear");
        }
        let at = lose_last_entries(&seg).expect("lose");
        assert_eq!(at, found[1].offset);
        assert_eq!(wal_records(&seg).expect("records").len(), 1, "only the meta record is left");
        assert_eq!(std::fs::metadata(&seg).expect("len").len(), 4096, "the file keeps its length");
    }
}
