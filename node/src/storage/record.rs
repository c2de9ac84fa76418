//! WAL record framing and payloads.
//!
//! A record is `[len u32 LE][len_crc u32 LE][crc u32 LE][type u8][payload]` where `len`
//! counts the type byte and the payload, `len_crc = crc32(len bytes)` and
//! `crc = crc32(type byte + payload)`. See docs/storage.md.

use prost::Message;
use raft::eraftpb::{Entry, EntryType, HardState};

use super::error::StorageError;

/// Bytes before a record's body.
pub(crate) const HEADER_LEN: usize = 12;

/// Payload bytes after which an `Entries` batch is split into another record.
pub(crate) const MAX_ENTRIES_PAYLOAD: usize = 16 << 20;

/// Record type bytes.
pub(crate) mod kind {
    /// First record of every segment: snapshot in force and hard state.
    pub const META: u8 = 1;
    /// A contiguous batch of log entries; replaces any suffix from its first index.
    pub const ENTRIES: u8 = 2;
    /// A new hard state.
    pub const HARD_STATE: u8 = 3;
    /// The local state machine saved a snapshot; the log is kept.
    pub const SNAPSHOT_SAVED: u8 = 4;
    /// A snapshot from the leader was installed; the log is reset after it.
    pub const SNAPSHOT_APPLIED: u8 = 5;
}

/// Payload of a `Meta` record.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MetaRecord {
    /// Index of the snapshot in force (0: none).
    #[prost(uint64, tag = "1")]
    pub snapshot_index: u64,
    /// Term of the snapshot in force.
    #[prost(uint64, tag = "2")]
    pub snapshot_term: u64,
    /// The hard state at the start of the segment.
    #[prost(message, optional, tag = "3")]
    pub hard_state: Option<HardState>,
}

/// Payload of the snapshot records: which snapshot.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SnapRef {
    /// Snapshot index.
    #[prost(uint64, tag = "1")]
    pub index: u64,
    /// Snapshot term.
    #[prost(uint64, tag = "2")]
    pub term: u64,
}

/// Payload of an `Entries` record (field 1 repeated, like a protobuf `repeated Entry`).
#[derive(Clone, PartialEq, prost::Message)]
struct EntryBatch {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<Entry>,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    /// See [`kind::META`].
    Meta(MetaRecord),
    /// See [`kind::ENTRIES`].
    Entries(Vec<Entry>),
    /// See [`kind::HARD_STATE`].
    HardState(HardState),
    /// See [`kind::SNAPSHOT_SAVED`].
    SnapshotSaved(SnapRef),
    /// See [`kind::SNAPSHOT_APPLIED`].
    SnapshotApplied(SnapRef),
}

/// Appends one framed record to `buf`; `encode` appends the payload.
fn push_framed(buf: &mut Vec<u8>, ty: u8, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), StorageError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    buf.push(ty);
    encode(buf);
    let body_len = buf.len() - start - HEADER_LEN;
    let Ok(len) = u32::try_from(body_len) else {
        buf.truncate(start);
        return Err(StorageError::TooLarge { what: "WAL record", size: body_len as u64 });
    };
    let len_bytes = len.to_le_bytes();
    let crc = crc32fast::hash(&buf[start + HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&len_bytes);
    buf[start + 4..start + 8].copy_from_slice(&crc32fast::hash(&len_bytes).to_le_bytes());
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Appends `Entries` records for `ents` (split every [`MAX_ENTRIES_PAYLOAD`] bytes).
/// Entries are encoded straight into `buf`, never cloned. An entry recovery would refuse
/// (see [`check_entry`]) is refused here (`InvalidAppend`), before anything is buffered.
pub(crate) fn push_entries(buf: &mut Vec<u8>, ents: &[Entry]) -> Result<(), StorageError> {
    ents.iter().try_for_each(check_entry).map_err(StorageError::InvalidAppend)?;
    let mut rest = ents;
    while !rest.is_empty() {
        let mut size = 0usize;
        let mut n = 0usize;
        for e in rest {
            let len = e.encoded_len();
            if n > 0 && size + len > MAX_ENTRIES_PAYLOAD {
                break;
            }
            size += prost::encoding::key_len(1) + prost::encoding::encoded_len_varint(len as u64) + len;
            n += 1;
        }
        let (batch, tail) = rest.split_at(n);
        push_framed(buf, kind::ENTRIES, |b| {
            b.reserve(size);
            for e in batch {
                prost::encoding::message::encode(1, e, b);
            }
        })?;
        rest = tail;
    }
    Ok(())
}

/// Appends a `HardState` record; a term or commit beyond [`MAX_INDEX`] is refused
/// (`InvalidHardState`).
pub(crate) fn push_hard_state(buf: &mut Vec<u8>, hs: &HardState) -> Result<(), StorageError> {
    check_hard_state(hs).map_err(StorageError::InvalidHardState)?;
    push_framed(buf, kind::HARD_STATE, |b| hs.encode_raw(b))
}

/// Appends a `Meta` record.
pub(crate) fn push_meta(buf: &mut Vec<u8>, meta: &MetaRecord) -> Result<(), StorageError> {
    push_framed(buf, kind::META, |b| meta.encode_raw(b))
}

/// Appends a `SnapshotSaved` (`applied == false`) or `SnapshotApplied` record; an index
/// or term beyond [`MAX_INDEX`] is refused (`InvalidSnapshot`).
pub(crate) fn push_snapshot(buf: &mut Vec<u8>, applied: bool, index: u64, term: u64) -> Result<(), StorageError> {
    check_snapshot(index, term).map_err(StorageError::InvalidSnapshot)?;
    let ty = if applied { kind::SNAPSHOT_APPLIED } else { kind::SNAPSHOT_SAVED };
    push_framed(buf, ty, |b| SnapRef { index, term }.encode_raw(b))
}

/// The outcome of reading the record at some offset of a segment's bytes.
#[derive(Debug, PartialEq)]
pub(crate) enum Scan<'a> {
    /// A record whose checksums pass: its body (type byte + payload) and where the next
    /// record starts.
    Record { body: &'a [u8], next: usize },
    /// Clean end of data.
    End,
    /// An incomplete final write: everything from this offset on may be cut off, but only
    /// in the last segment.
    Torn(&'static str),
    /// Damage that an interrupted append cannot explain.
    Corrupt(String),
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Reads the record framed at `off` in `data` and classifies problems as torn or corrupt.
pub(crate) fn scan(data: &[u8], off: usize) -> Scan<'_> {
    let rest = &data[off.min(data.len())..];
    if rest.is_empty() {
        return Scan::End;
    }
    // Zeros from here to the end of the file: the normal end of a preallocated segment.
    // A real record never starts with 12 zero bytes (`len >= 1`, and `len_crc` of a zero
    // length is not zero), so this cannot hide a record.
    let head = &rest[..rest.len().min(HEADER_LEN)];
    if all_zero(head) && all_zero(rest) {
        return Scan::End;
    }
    if rest.len() < HEADER_LEN {
        return Scan::Torn("incomplete record header at end of file");
    }
    let len_bytes = &rest[0..4];
    if crc32fast::hash(len_bytes) != u32_at(rest, 4) {
        if all_zero(&rest[HEADER_LEN..]) {
            return Scan::Torn("unwritten (zeroed) tail");
        }
        return Scan::Corrupt("record length checksum mismatch".into());
    }
    let len = u32_at(rest, 0) as usize;
    if len == 0 {
        return Scan::Corrupt("zero-length record".into());
    }
    let end = HEADER_LEN + len;
    if end > rest.len() {
        return Scan::Torn("record extends past end of file");
    }
    let body = &rest[HEADER_LEN..end];
    if crc32fast::hash(body) != u32_at(rest, 8) {
        if all_zero(&rest[end..]) {
            return Scan::Torn("checksum mismatch on the final record");
        }
        return Scan::Corrupt("crc mismatch".into());
    }
    Scan::Record { body, next: off + end }
}

/// Largest log index or term a record may carry (2^63 - 1): recovery refuses anything
/// larger, so the write path refuses it too (what is written can always be read back).
/// Real logs never get near it; a larger value is damage (or a forged file), and
/// refusing it keeps `index + 1` and the like from overflowing anywhere after recovery.
/// The transport's bound on peers' terms and indexes is derived from it.
pub const MAX_INDEX: u64 = i64::MAX as u64;

fn at_most(what: &str, v: u64) -> Result<(), String> {
    if v > MAX_INDEX {
        Err(format!("{what} {v} is beyond the largest possible ({MAX_INDEX})"))
    } else {
        Ok(())
    }
}

/// Refuses an entry recovery could not read back: index or term beyond [`MAX_INDEX`],
/// index 0, or an unknown entry type (raft-rs panics on those when they are applied).
pub(crate) fn check_entry(e: &Entry) -> Result<(), String> {
    if e.index == 0 {
        return Err("entry index 0 (raft log indexes start at 1)".to_string());
    }
    if EntryType::from_i32(e.entry_type).is_none() {
        return Err(format!("entry {}: unknown entry type {}", e.index, e.entry_type));
    }
    at_most("entry index", e.index).and(at_most("entry term", e.term))
}

/// Refuses a hard state whose term or commit is beyond [`MAX_INDEX`].
pub(crate) fn check_hard_state(hs: &HardState) -> Result<(), String> {
    at_most("hard state term", hs.term).and(at_most("hard state commit", hs.commit))
}

/// Refuses a snapshot index or term beyond [`MAX_INDEX`].
pub(crate) fn check_snapshot(index: u64, term: u64) -> Result<(), String> {
    at_most("snapshot index", index).and(at_most("snapshot term", term))
}

/// Refuses indexes and terms beyond [`MAX_INDEX`], entries at index 0 and entries of an
/// unknown type: the same checks the write path makes.
fn check_bounds(rec: &Record) -> Result<(), String> {
    match rec {
        Record::Meta(m) => {
            check_snapshot(m.snapshot_index, m.snapshot_term)?;
            m.hard_state.as_ref().map_or(Ok(()), check_hard_state)
        }
        Record::Entries(ents) => ents.iter().try_for_each(check_entry),
        Record::HardState(hs) => check_hard_state(hs),
        Record::SnapshotSaved(r) | Record::SnapshotApplied(r) => check_snapshot(r.index, r.term),
    }
}

/// Decodes a record body (type byte + payload); indexes and terms beyond [`MAX_INDEX`]
/// are an error.
pub(crate) fn decode(body: &[u8]) -> Result<Record, String> {
    let rec = decode_unchecked(body)?;
    check_bounds(&rec)?;
    Ok(rec)
}

fn decode_unchecked(body: &[u8]) -> Result<Record, String> {
    let (&ty, payload) = body.split_first().ok_or_else(|| "empty record body".to_string())?;
    let bad = |what: &str, e: prost::DecodeError| format!("undecodable {what} record: {e}");
    Ok(match ty {
        kind::META => Record::Meta(MetaRecord::decode(payload).map_err(|e| bad("meta", e))?),
        kind::ENTRIES => Record::Entries(EntryBatch::decode(payload).map_err(|e| bad("entries", e))?.entries),
        kind::HARD_STATE => Record::HardState(HardState::decode(payload).map_err(|e| bad("hard state", e))?),
        kind::SNAPSHOT_SAVED => {
            Record::SnapshotSaved(SnapRef::decode(payload).map_err(|e| bad("snapshot saved", e))?)
        }
        kind::SNAPSHOT_APPLIED => {
            Record::SnapshotApplied(SnapRef::decode(payload).map_err(|e| bad("snapshot applied", e))?)
        }
        other => return Err(format!("unknown record type {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, data: data.to_vec(), ..Default::default() }
    }

    fn scan_all(data: &[u8]) -> (Vec<Record>, Scan<'_>) {
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            match scan(data, off) {
                Scan::Record { body, next } => {
                    out.push(decode(body).expect("decode"));
                    off = next;
                }
                other => return (out, other),
            }
        }
    }

    #[test]
    fn round_trip_every_kind() {
        let mut buf = Vec::new();
        let ents = vec![entry(5, 2, b"a"), entry(6, 2, b"bb")];
        let hs = HardState { term: 3, vote: 2, commit: 6 };
        let meta = MetaRecord { snapshot_index: 4, snapshot_term: 1, hard_state: Some(hs.clone()) };
        push_meta(&mut buf, &meta).expect("meta");
        push_entries(&mut buf, &ents).expect("entries");
        push_hard_state(&mut buf, &hs).expect("hs");
        push_snapshot(&mut buf, false, 6, 2).expect("saved");
        push_snapshot(&mut buf, true, 9, 3).expect("applied");
        let (recs, end) = scan_all(&buf);
        assert_eq!(end, Scan::End);
        assert_eq!(
            recs,
            vec![
                Record::Meta(meta),
                Record::Entries(ents),
                Record::HardState(hs),
                Record::SnapshotSaved(SnapRef { index: 6, term: 2 }),
                Record::SnapshotApplied(SnapRef { index: 9, term: 3 }),
            ]
        );
    }

    #[test]
    fn big_batches_are_split_but_keep_every_entry() {
        let big = vec![0xabu8; MAX_ENTRIES_PAYLOAD / 3 + 1];
        let ents: Vec<Entry> = (1..=7).map(|i| entry(i, 1, &big)).collect();
        let mut buf = Vec::new();
        push_entries(&mut buf, &ents).expect("entries");
        let (recs, end) = scan_all(&buf);
        assert_eq!(end, Scan::End);
        assert!(recs.len() >= 3, "expected a split, got {} records", recs.len());
        let back: Vec<Entry> = recs
            .into_iter()
            .flat_map(|r| match r {
                Record::Entries(e) => e,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(back, ents);
    }

    #[test]
    fn torn_and_corrupt_are_told_apart() {
        let mut buf = Vec::new();
        push_hard_state(&mut buf, &HardState { term: 1, vote: 1, commit: 0 }).expect("hs");
        let first_end = buf.len();
        push_entries(&mut buf, &[entry(1, 1, b"payload")]).expect("entries");
        let full = buf.clone();

        // Every cut inside the second record is a torn tail.
        for cut in first_end + 1..full.len() {
            assert!(matches!(scan(&full[..cut], first_end), Scan::Torn(_)), "cut {cut}");
        }
        // Zeroes after the last record are the end (a preallocated segment).
        let mut z = full.clone();
        z.extend_from_slice(&[0u8; 40]);
        assert_eq!(scan(&z, full.len()), Scan::End);
        // A header cut after its first bytes, zeros after it: torn.
        let mut z = full[..first_end + 3].to_vec();
        z.extend_from_slice(&[0u8; 40]);
        assert!(matches!(scan(&z, first_end), Scan::Torn(_)));
        // A bad body crc on the last record: torn; with data after it: corrupt.
        let mut flipped = full.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        assert!(matches!(scan(&flipped, first_end), Scan::Torn(_)));
        let mut mid = full.clone();
        mid[first_end - 1] ^= 0x01;
        assert!(matches!(scan(&mid, 0), Scan::Corrupt(ref r) if r == "crc mismatch"));
        // A bad length checksum with non-zero data after it: corrupt.
        let mut badlen = full.clone();
        badlen[0] ^= 0x40;
        assert!(matches!(scan(&badlen, 0), Scan::Corrupt(_)));
    }

    #[test]
    fn zeros_after_the_last_record_end_the_log_but_zeros_before_data_are_corrupt() {
        let mut buf = Vec::new();
        push_hard_state(&mut buf, &HardState { term: 1, vote: 1, commit: 0 }).expect("hs");
        let end = buf.len();
        for pad in [0usize, 1, 5, 11, 12, 13, 4096] {
            let mut z = buf.clone();
            z.resize(end + pad, 0);
            assert_eq!(scan(&z, end), Scan::End, "pad {pad}");
        }
        // A zero header followed by anything non-zero is not the end.
        let mut z = buf.clone();
        z.resize(end + 100, 0);
        z[end + 60] = 1;
        assert!(matches!(scan(&z, end), Scan::Corrupt(_)));
        // A short non-zero remainder is an incomplete header.
        let mut z = buf.clone();
        z.extend_from_slice(&[0, 0, 3]);
        assert!(matches!(scan(&z, end), Scan::Torn(_)));
    }

    #[test]
    fn out_of_bound_indexes_and_terms_index_zero_and_unknown_entry_types_are_an_error() {
        // The write path refuses these (below), so the records are framed by hand.
        let raw_entries = |buf: &mut Vec<u8>, ents: Vec<Entry>| {
            push_framed(buf, kind::ENTRIES, |b| EntryBatch { entries: ents }.encode_raw(b)).expect("entries")
        };
        let mut buf = Vec::new();
        raw_entries(&mut buf, vec![entry(MAX_INDEX, 1, b""), entry(MAX_INDEX + 1, 1, b"")]);
        push_framed(&mut buf, kind::HARD_STATE, |b| HardState { term: u64::MAX, vote: 1, commit: 0 }.encode_raw(b)).expect("hs");
        push_framed(&mut buf, kind::SNAPSHOT_APPLIED, |b| SnapRef { index: u64::MAX, term: 1 }.encode_raw(b)).expect("snap");
        let meta = MetaRecord { snapshot_index: 1, snapshot_term: MAX_INDEX + 1, hard_state: None };
        push_meta(&mut buf, &meta).expect("meta");
        raw_entries(&mut buf, vec![entry(0, 1, b"")]);
        raw_entries(&mut buf, vec![Entry { entry_type: 3, ..entry(1, 1, b"") }]);
        let mut off = 0;
        let mut errors = Vec::new();
        while let Scan::Record { body, next } = scan(&buf, off) {
            errors.push(decode(body).expect_err("out of bounds"));
            off = next;
        }
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(errors[5].contains("unknown entry type 3"), "{}", errors[5]);
        assert!(errors[0].contains("entry index 9223372036854775808"), "{}", errors[0]);
        let mut ok = Vec::new();
        push_entries(&mut ok, &[entry(MAX_INDEX - 1, MAX_INDEX, b""), entry(MAX_INDEX, 1, b"")]).expect("entries");
        let Scan::Record { body, .. } = scan(&ok, 0) else { panic!("no record") };
        assert!(decode(body).is_ok());
    }

    #[test]
    fn the_write_path_refuses_what_recovery_would_refuse_and_buffers_nothing() {
        let mut buf = Vec::new();
        let refused = [
            push_entries(&mut buf, &[entry(MAX_INDEX, 1, b""), entry(MAX_INDEX + 1, 1, b"")]),
            push_entries(&mut buf, &[entry(5, MAX_INDEX + 1, b"")]),
            push_entries(&mut buf, &[entry(0, 1, b"")]),
            push_entries(&mut buf, &[Entry { entry_type: 3, ..entry(1, 1, b"") }]),
            push_hard_state(&mut buf, &HardState { term: MAX_INDEX + 1, vote: 1, commit: 0 }),
            push_hard_state(&mut buf, &HardState { term: 1, vote: 1, commit: u64::MAX }),
            push_snapshot(&mut buf, false, MAX_INDEX + 1, 1),
            push_snapshot(&mut buf, true, 1, u64::MAX),
        ];
        for (i, r) in refused.into_iter().enumerate() {
            let err = r.expect_err("refused");
            assert!(
                matches!(err, StorageError::InvalidAppend(_) | StorageError::InvalidHardState(_) | StorageError::InvalidSnapshot(_)),
                "case {i}: {err}"
            );
        }
        assert!(buf.is_empty(), "nothing was buffered");
        // The bound itself is accepted, and reads back.
        push_entries(&mut buf, &[entry(MAX_INDEX, MAX_INDEX, b"")]).expect("entries");
        push_hard_state(&mut buf, &HardState { term: MAX_INDEX, vote: 1, commit: MAX_INDEX }).expect("hs");
        push_snapshot(&mut buf, true, MAX_INDEX, MAX_INDEX).expect("snap");
        let (recs, end) = scan_all(&buf);
        assert_eq!((recs.len(), end), (3, Scan::End));
    }

    #[test]
    fn unknown_type_is_an_error() {
        assert!(decode(&[99, 1, 2]).is_err());
        assert!(decode(&[kind::ENTRIES, 0xff, 0xff]).is_err());
    }
}
