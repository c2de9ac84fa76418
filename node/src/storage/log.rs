//! The in-memory raft log: MemStorage's semantics (first/last index, term, entries with
//! a size limit, compaction, snapshot reset), shared by live operation and WAL replay.

use raft::eraftpb::{ConfState, Entry, HardState};

use super::error::StorageError;

/// Entries since the last compaction, the snapshot in force and the hard state.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct MemLog {
    /// Current hard state.
    pub hs: HardState,
    /// Index of the newest snapshot (0: none).
    pub snap_index: u64,
    /// Term of the newest snapshot.
    pub snap_term: u64,
    /// Conf state of the newest snapshot.
    pub conf_state: ConfState,
    /// Contiguous entries; may start below `snap_index` (a locally saved snapshot keeps
    /// the log) but never above `snap_index + 1`.
    pub entries: Vec<Entry>,
}

/// MemStorage's hard-state update when a snapshot is installed: commit moves to the
/// snapshot index, the term never goes backwards.
pub(crate) fn hs_after_snapshot(hs: &HardState, index: u64, term: u64) -> HardState {
    HardState { term: hs.term.max(term), vote: hs.vote, commit: index }
}

/// Checks that `ents` is non-empty and contiguous; returns a reason otherwise.
pub(crate) fn check_contiguous(ents: &[Entry]) -> Result<(), String> {
    let Some(first) = ents.first() else {
        return Err("empty entry batch".into());
    };
    for (i, e) in ents.iter().enumerate() {
        if first.index.checked_add(i as u64) != Some(e.index) {
            return Err(format!("entries not contiguous: index {} at position {i} after {}", e.index, first.index));
        }
    }
    Ok(())
}

impl MemLog {
    /// First index available in the log (snapshot index + 1 when there are no entries).
    pub(crate) fn first_index(&self) -> u64 {
        match self.entries.first() {
            Some(e) => e.index,
            None => self.snap_index + 1,
        }
    }

    /// Last index of the log (the snapshot index when there are no entries).
    pub(crate) fn last_index(&self) -> u64 {
        match self.entries.last() {
            Some(e) => e.index.max(self.snap_index),
            None => self.snap_index,
        }
    }

    /// The term of entry `idx`, as MemStorage answers it.
    pub(crate) fn term(&self, idx: u64) -> Result<u64, StorageError> {
        if idx == self.snap_index {
            return Ok(self.snap_term);
        }
        let first = self.first_index();
        if idx < first {
            return Err(StorageError::Compacted { index: idx, first_index: first });
        }
        match self.entries.get((idx - first) as usize) {
            Some(e) => Ok(e.term),
            None => Err(StorageError::Unavailable { index: idx, last_index: self.last_index() }),
        }
    }

    /// Validates an append the way MemStorage does, as an error instead of a panic.
    pub(crate) fn check_append(&self, ents: &[Entry]) -> Result<(), StorageError> {
        check_contiguous(ents).map_err(StorageError::InvalidAppend)?;
        let at = ents[0].index;
        let first = self.first_index();
        if at < first {
            return Err(StorageError::InvalidAppend(format!(
                "entry {at} would overwrite the compacted log (first index {first})"
            )));
        }
        if at <= self.snap_index {
            return Err(StorageError::InvalidAppend(format!(
                "entry {at} would overwrite the snapshot at index {}",
                self.snap_index
            )));
        }
        let last = self.last_index();
        if at > last + 1 {
            return Err(StorageError::InvalidAppend(format!("entry {at} leaves a gap after last index {last}")));
        }
        Ok(())
    }

    /// Appends `ents` (already checked), replacing any suffix from `ents[0].index`.
    pub(crate) fn append(&mut self, ents: &[Entry]) {
        let Some(e0) = ents.first() else { return };
        let first = self.first_index();
        let keep = e0.index.saturating_sub(first) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
    }

    /// Entries `[low, high)`, cut to `max_size` by `raft::util::limit_size` (at least one).
    pub(crate) fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, StorageError> {
        let first = self.first_index();
        if low < first {
            return Err(StorageError::Compacted { index: low, first_index: first });
        }
        let last = self.last_index();
        if high > last + 1 || low > high {
            return Err(StorageError::Unavailable { index: high.saturating_sub(1), last_index: last });
        }
        let (lo, hi) = ((low - first) as usize, (high - first) as usize);
        let slice = self.entries.get(lo..hi).unwrap_or(&[]);
        // Count what fits before cloning, so a small limit never clones the whole range.
        let n = match max_size {
            None | Some(raft::NO_LIMIT) => slice.len(),
            Some(max) => {
                let mut size = 0u64;
                let mut n = 0;
                for e in slice {
                    size += prost::Message::encoded_len(e) as u64;
                    if n > 0 && size > max {
                        break;
                    }
                    n += 1;
                }
                n
            }
        };
        let mut out = slice[..n].to_vec();
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    /// Drops entries before `compact_index`; never past the last index + 1.
    pub(crate) fn compact(&mut self, compact_index: u64) {
        let first = self.first_index();
        if compact_index <= first {
            return;
        }
        let n = ((compact_index - first) as usize).min(self.entries.len());
        self.entries.drain(..n);
    }

    /// Installs a snapshot: entries cleared, snapshot and conf state replaced, hard state
    /// updated like MemStorage.
    pub(crate) fn reset_to_snapshot(&mut self, index: u64, term: u64, conf_state: ConfState) {
        self.entries.clear();
        self.snap_index = index;
        self.snap_term = term;
        self.conf_state = conf_state;
        self.hs = hs_after_snapshot(&self.hs, index, term);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u64, term: u64) -> Entry {
        Entry { index, term, ..Default::default() }
    }

    fn log_3_to_5() -> MemLog {
        MemLog { snap_index: 2, snap_term: 2, entries: vec![e(3, 3), e(4, 4), e(5, 5)], ..Default::default() }
    }

    #[test]
    fn contiguity_check_does_not_overflow() {
        assert!(check_contiguous(&[e(u64::MAX, 1), e(0, 1)]).is_err());
        assert!(check_contiguous(&[e(u64::MAX - 1, 1), e(u64::MAX, 1)]).is_ok());
        assert!(log_3_to_5().check_append(&[e(u64::MAX, 1), e(0, 1)]).is_err());
    }

    #[test]
    fn term_and_bounds_like_memstorage() {
        let l = log_3_to_5();
        assert_eq!(l.first_index(), 3);
        assert_eq!(l.last_index(), 5);
        assert_eq!(l.term(2).expect("snap"), 2);
        assert!(matches!(l.term(1), Err(StorageError::Compacted { .. })));
        assert_eq!(l.term(4).expect("t"), 4);
        assert!(matches!(l.term(6), Err(StorageError::Unavailable { .. })));
    }

    #[test]
    fn append_truncates_conflicting_suffix_and_rejects_gaps() {
        let mut l = log_3_to_5();
        l.check_append(&[e(4, 6), e(5, 6)]).expect("ok");
        l.append(&[e(4, 6)]);
        assert_eq!(l.entries, vec![e(3, 3), e(4, 6)]);
        assert!(l.check_append(&[e(6, 6)]).is_err(), "gap");
        assert!(l.check_append(&[e(2, 6)]).is_err(), "compacted");
        assert!(l.check_append(&[e(5, 6), e(7, 6)]).is_err(), "not contiguous");
        assert!(l.check_append(&[]).is_err(), "empty");
    }

    #[test]
    fn entries_respects_max_size_but_returns_one() {
        let l = log_3_to_5();
        let one = prost::Message::encoded_len(&e(3, 3)) as u64;
        assert_eq!(l.entries(3, 6, None).expect("all").len(), 3);
        assert_eq!(l.entries(3, 6, Some(0)).expect("one").len(), 1);
        assert_eq!(l.entries(3, 6, Some(one * 2)).expect("two").len(), 2);
        assert_eq!(l.entries(4, 4, None).expect("empty").len(), 0);
        assert!(matches!(l.entries(2, 4, None), Err(StorageError::Compacted { .. })));
        assert!(matches!(l.entries(3, 7, None), Err(StorageError::Unavailable { .. })));
    }

    #[test]
    fn compact_and_snapshot_reset() {
        let mut l = log_3_to_5();
        l.compact(5);
        assert_eq!(l.first_index(), 5);
        l.compact(3);
        assert_eq!(l.first_index(), 5);
        l.hs = HardState { term: 9, vote: 1, commit: 4 };
        l.reset_to_snapshot(7, 6, ConfState { voters: vec![1], ..Default::default() });
        assert_eq!((l.first_index(), l.last_index()), (8, 7));
        assert_eq!(l.hs, HardState { term: 9, vote: 1, commit: 7 });
    }
}
