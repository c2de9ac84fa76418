//! [`vet`] against raft-rs itself: random well-formed messages from voters, a learner
//! and a stranger are stepped into a real `RawNode` (on raft-rs's `MemStorage`) in each
//! role. With the vetting none may panic; without it the same messages must, or this
//! harness would prove nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};

use prost::Message as _;
use raft::eraftpb::{ConfChangeV2, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::storage::MemStorage;
use raft::{Config, RawNode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// The message types a peer sends over the network (raft-rs refuses the local ones).
const NETWORK_TYPES: [MessageType; 14] = [
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgTransferLeader,
    MessageType::MsgTimeoutNow,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
    MessageType::MsgPropose,
];

/// Member 1 of voters {1, 2, 3} and learner 4: a snapshot at index 5 (term 2), entries
/// 6..=12 of terms 2 to 5, commit 10, term 5. `role`: 0 follower without a leader, 1
/// follower of 2, 2 pre-candidate, 3 candidate, 4 leader.
fn node(role: u32) -> RawNode<MemStorage> {
    let storage = MemStorage::new();
    let snap = Snapshot {
        metadata: Some(SnapshotMetadata {
            conf_state: Some(ConfState { voters: vec![1, 2, 3], learners: vec![4], ..Default::default() }),
            index: 5,
            term: 2,
        }),
        ..Default::default()
    };
    storage.wl().apply_snapshot(snap).expect("snapshot");
    let terms = [2, 2, 3, 3, 4, 5, 5];
    let entries: Vec<Entry> = (6..=12).map(|i| Entry { index: i, term: terms[(i - 6) as usize], ..Default::default() }).collect();
    storage.wl().append(&entries).expect("entries");
    storage.wl().set_hardstate(HardState { term: 5, vote: 2, commit: 10 });
    let cfg = Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 1,
        applied: 5,
        check_quorum: true,
        pre_vote: true,
        batch_append: true,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    let mut raw = RawNode::new(&cfg, storage, &crate::logger::raft_logger(1)).expect("raw node");
    match role {
        1 => {
            let hb = Message { msg_type: MessageType::MsgHeartbeat as i32, to: 1, from: 2, term: 5, commit: 10, ..Default::default() };
            raw.step(hb).expect("heartbeat");
        }
        2 => raw.raft.become_pre_candidate(),
        3 => raw.raft.become_candidate(),
        4 => {
            raw.raft.become_candidate();
            raw.raft.become_leader();
        }
        _ => {}
    }
    handle_ready(&mut raw);
    raw
}

/// Takes the next Ready, writes its snapshot, entries and hard state to `MemStorage` and
/// applies its committed entries, as the raft loop does before the fsync (messages are
/// dropped). `None`: nothing is ready.
fn write_ready(raw: &mut RawNode<MemStorage>) -> Option<raft::Ready> {
    if !raw.has_ready() {
        return None;
    }
    let store = raw.store().clone();
    let mut rd = raw.ready();
    if !rd.snapshot().is_empty() {
        store.wl().apply_snapshot(rd.snapshot().clone()).expect("a snapshot raft handed over");
    }
    store.wl().append(rd.entries()).expect("entries raft handed over");
    if let Some(hs) = rd.hs() {
        store.wl().set_hardstate(hs.clone());
    }
    let committed = rd.take_committed_entries();
    apply(raw, committed);
    Some(rd)
}

/// What the raft loop does with a Ready, its fsync done at once.
fn handle_ready(raw: &mut RawNode<MemStorage>) {
    let Some(rd) = write_ready(raw) else { return };
    let store = raw.store().clone();
    let mut light = raw.advance(rd);
    if let Some(commit) = light.commit_index() {
        store.wl().mut_hard_state().commit = commit;
    }
    apply(raw, light.take_committed_entries());
    raw.advance_apply();
}

/// What the raft loop does with a Ready whose fsync goes to the persist thread: the
/// writes land, raft-rs hears they are durable only at [`persist`]. Meanwhile its
/// `persisted` lags its log, as in the real loop while an fsync runs.
fn handle_ready_async(raw: &mut RawNode<MemStorage>, pending: &mut Vec<u64>) {
    let Some(rd) = write_ready(raw) else { return };
    let number = rd.number();
    let snapshot = !rd.snapshot().is_empty();
    pending.push(number);
    raw.advance_append_async(rd);
    if snapshot {
        // As the raft loop: a snapshot is made durable before the applied index moves.
        persist(raw, pending);
    }
    raw.advance_apply();
}

/// The persist thread's fsync is done: every pending Ready is durable.
fn persist(raw: &mut RawNode<MemStorage>, pending: &mut Vec<u64>) {
    if let Some(number) = pending.iter().copied().max() {
        raw.on_persist_ready(number);
    }
    pending.clear();
}

fn apply(raw: &mut RawNode<MemStorage>, entries: Vec<Entry>) {
    for e in entries {
        if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            if let Ok(cc) = ConfChangeV2::decode(e.data.as_slice()) {
                // The raft loop logs a refused change and goes on.
                let _ = raw.apply_conf_change(&cc);
            }
        }
    }
}

/// A random message to member 1 with numbers near its state, as `check_message` lets
/// through most of the time.
fn message(rng: &mut StdRng, raft: &Raft<MemStorage>) -> Message {
    let last = raft.raft_log.last_index();
    let committed = raft.raft_log.committed;
    let near = |rng: &mut StdRng, base: u64| base.saturating_add_signed(rng.gen_range(-6i64..=4));
    let msg_type = NETWORK_TYPES[rng.gen_range(0..NETWORK_TYPES.len())];
    let term = match rng.gen_range(0..6) {
        0 => raft.term.saturating_sub(1),
        1 | 2 => raft.term,
        3 => raft.term + 1,
        4 => raft.term + 2,
        _ => rng.gen_range(0..=raft.term + 3),
    };
    let index = near(rng, last);
    let log_term = rng.gen_range(0..=term);
    let entries = match msg_type {
        MessageType::MsgAppend | MessageType::MsgPropose | MessageType::MsgReadIndex | MessageType::MsgReadIndexResp => {
            let n = rng.gen_range(0..4);
            (0..n)
                .map(|i| {
                    let conf = rng.gen_ratio(1, 5);
                    let data = if conf {
                        let change = ConfChangeSingle { node_id: rng.gen_range(1..=5), change_type: rng.gen_range(0..3) };
                        ConfChangeV2 { changes: vec![change], ..Default::default() }.encode_to_vec()
                    } else {
                        vec![rng.gen(); rng.gen_range(0..4)]
                    };
                    Entry {
                        entry_type: if conf { EntryType::EntryConfChangeV2 as i32 } else { EntryType::EntryNormal as i32 },
                        index: if msg_type == MessageType::MsgAppend { index + i + 1 } else { 0 },
                        term: if msg_type == MessageType::MsgAppend { rng.gen_range(log_term..=term) } else { 0 },
                        data,
                        ..Default::default()
                    }
                })
                .collect()
        }
        _ => Vec::new(),
    };
    let ids = |rng: &mut StdRng, p: f64| (1..=5).filter(|_| rng.gen_bool(p)).collect::<Vec<u64>>();
    let snapshot = (msg_type == MessageType::MsgSnapshot).then(|| {
        let conf_state = ConfState {
            voters: ids(rng, 0.6),
            learners: ids(rng, 0.2),
            voters_outgoing: if rng.gen_ratio(1, 5) { ids(rng, 0.5) } else { Vec::new() },
            learners_next: if rng.gen_ratio(1, 10) { ids(rng, 0.3) } else { Vec::new() },
            auto_leave: rng.gen_ratio(1, 5),
        };
        let index = near(rng, committed) + rng.gen_range(0..8);
        Snapshot {
            metadata: Some(SnapshotMetadata { conf_state: Some(conf_state), index, term: rng.gen_range(0..=term + 1) }),
            ..Default::default()
        }
    });
    Message {
        msg_type: msg_type as i32,
        to: 1,
        from: [2, 2, 3, 3, 4, 5][rng.gen_range(0..6)],
        term,
        log_term,
        index,
        entries,
        commit: if rng.gen() { near(rng, committed) } else { near(rng, last) },
        snapshot,
        reject: rng.gen_ratio(1, 3),
        reject_hint: near(rng, last),
        ..Default::default()
    }
}

/// What [`fuzz`] saw.
#[derive(Default)]
struct Outcome {
    /// Messages raft-rs stepped.
    stepped: usize,
    /// Messages [`vet`] dropped.
    dropped: usize,
    /// The first raft-rs panic (or stop of the node): the message and what it said.
    panic: Option<(Message, String)>,
}

/// Steps `count` random messages into fresh nodes of every role, through the
/// transport's check and [`vet`] (but not for messages of the `unvetted` types), as the
/// raft loop does, until raft-rs panics.
fn fuzz(seed: u64, count: usize, unvetted: &[MessageType]) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Outcome::default();
    let mut raw = node(0);
    // Odd seeds persist each Ready later, as the persist thread does.
    let lazy = seed % 2 == 1;
    let mut pending = Vec::new();
    for i in 0..count {
        if i % 200 == 0 {
            raw = node((i / 200) as u32 % 5);
            pending.clear();
        }
        if i % 7 == 0 {
            raw.tick();
        }
        let m = message(&mut rng, &raw.raft);
        if crate::transport::check_message(&m).is_err() {
            continue;
        }
        if !unvetted.contains(&m.get_msg_type()) && vet(&raw.raft, &m).is_err() {
            out.dropped += 1;
            continue;
        }
        if claims_lost_entries(&raw.raft, &m) {
            // The raft loop stops the node here: right for a voter (a leader) saying so,
            // as bad as a panic for anyone else.
            if !raw.raft.prs().conf().voters().contains(m.from) {
                out.panic = Some((m, "the node stops: a non-voter claims it lost entries".into()));
                break;
            }
            continue;
        }
        out.stepped += 1;
        let persist_now = rng.gen_ratio(1, 8);
        let step = catch_unwind(AssertUnwindSafe(|| {
            let _ = raw.step(m.clone());
            if lazy {
                handle_ready_async(&mut raw, &mut pending);
                if persist_now {
                    persist(&mut raw, &mut pending);
                }
            } else {
                handle_ready(&mut raw);
            }
        }));
        if let Err(panic) = step {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            out.panic = Some((m, what.unwrap_or_default()));
            break;
        }
    }
    out
}

const MESSAGES: usize = 20_000;

/// Seeds to try: 3, or `RAFTKV_VET_SEEDS` for a longer run by hand.
fn seeds() -> u64 {
    std::env::var("RAFTKV_VET_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3)
}

#[test]
fn raft_rs_survives_every_message_that_passes_the_vetting() {
    for seed in 0..seeds() {
        let out = fuzz(seed, MESSAGES, &[]);
        if let Some((m, what)) = out.panic {
            panic!("seed {seed}: raft-rs panicked ({what}) on a vetted message: {m:?}");
        }
        // Most messages must reach raft-rs, or this proves little.
        assert!(out.stepped > MESSAGES / 3, "seed {seed}: only {} of {MESSAGES} messages stepped ({} vetted out)", out.stepped, out.dropped);
    }
}

/// The harness has teeth: with every message vetted but those of one type, raft-rs
/// panics (or the node stops) on a message of that type, for snapshots, appends and
/// heartbeats.
#[test]
fn without_the_vetting_the_same_messages_make_raft_rs_panic() {
    // (Vote answers need a candidate whose log is not yet on disk, which random traffic
    // seldom makes: `vote_grants_before_the_campaign_is_persisted_are_dropped` builds one.)
    let kinds: [&[MessageType]; 3] = [&[MessageType::MsgSnapshot], &[MessageType::MsgAppend], &[MessageType::MsgHeartbeat]];
    for unvetted in kinds {
        let found = (0..8).filter_map(|seed| fuzz(seed, MESSAGES, unvetted).panic).find(|(m, _)| unvetted.contains(&m.get_msg_type()));
        assert!(found.is_some(), "no seed made raft-rs panic on an unvetted {unvetted:?}: the fuzz cannot fail");
    }
}

fn heartbeat(from: u64, term: u64, commit: u64) -> Message {
    Message { msg_type: MessageType::MsgHeartbeat as i32, to: 1, from, term, commit, ..Default::default() }
}

#[test]
fn a_heartbeat_commit_beyond_the_log_is_lost_entries_from_a_voter_and_dropped_from_anyone_else() {
    let raw = node(1);
    let beyond = raw.raft.raft_log.last_index() + 1;
    for from in [2, 3] {
        let m = heartbeat(from, 5, beyond);
        assert_eq!(vet(&raw.raft, &m), Ok(()), "voter {from}");
        assert!(claims_lost_entries(&raw.raft, &m), "voter {from}");
    }
    for from in [4, 5] {
        assert_eq!(vet(&raw.raft, &heartbeat(from, 5, beyond)), Err("heartbeat_commit_beyond_log"), "non-voter {from}");
    }
    // Within the log, from anyone: raft's business.
    assert_eq!(vet(&raw.raft, &heartbeat(5, 6, 10)), Ok(()));
    assert!(!claims_lost_entries(&raw.raft, &heartbeat(2, 5, 12)));
    // An older term: raft-rs only answers it.
    assert!(!claims_lost_entries(&raw.raft, &heartbeat(2, 4, beyond)));
}

#[test]
fn read_index_answers_and_leadership_hand_overs_come_only_from_this_terms_leader() {
    let raw = node(1);
    for msg_type in [MessageType::MsgReadIndexResp, MessageType::MsgTimeoutNow] {
        let m = |from, term| Message { msg_type: msg_type as i32, to: 1, from, term, index: 3, ..Default::default() };
        assert_eq!(vet(&raw.raft, &m(2, 5)), Ok(()), "{msg_type:?} from the leader");
        assert_eq!(vet(&raw.raft, &m(3, 5)), Err("not_from_the_leader"), "{msg_type:?} from a follower");
        assert_eq!(vet(&raw.raft, &m(2, 6)), Err("not_from_the_leader"), "{msg_type:?} of another term");
    }
}

#[test]
fn proposals_come_only_from_members() {
    let raw = node(4);
    let m = |from| Message {
        msg_type: MessageType::MsgPropose as i32,
        to: 1,
        from,
        entries: vec![Entry { data: b"x".to_vec(), ..Default::default() }],
        ..Default::default()
    };
    assert_eq!(vet(&raw.raft, &m(2)), Ok(()));
    assert_eq!(vet(&raw.raft, &m(4)), Ok(()), "a learner forwards its clients' writes");
    assert_eq!(vet(&raw.raft, &m(5)), Err("proposal_from_a_non_member"));
}

#[test]
fn an_append_older_than_this_commit_is_dropped() {
    let raw = node(1);
    // Entry 10 (the commit) has term 4.
    let m = |log_term| Message { msg_type: MessageType::MsgAppend as i32, to: 1, from: 2, term: 5, index: 11, log_term, ..Default::default() };
    assert_eq!(vet(&raw.raft, &m(3)), Err("append_older_than_commit"));
    assert_eq!(vet(&raw.raft, &m(4)), Ok(()));
    assert_eq!(vet(&raw.raft, &m(5)), Ok(()));
}

#[test]
fn snapshots_are_checked_for_term_and_configuration() {
    let raw = node(1);
    let snap = |index, term, cs: ConfState| Message {
        msg_type: MessageType::MsgSnapshot as i32,
        to: 1,
        from: 2,
        term: 5,
        snapshot: Some(Snapshot { metadata: Some(SnapshotMetadata { conf_state: Some(cs), index, term }), ..Default::default() }),
        ..Default::default()
    };
    let voters = |v: &[u64]| ConfState { voters: v.to_vec(), ..Default::default() };
    assert_eq!(vet(&raw.raft, &snap(20, 5, voters(&[1, 2, 3]))), Ok(()));
    assert_eq!(vet(&raw.raft, &snap(20, 0, voters(&[1, 2, 3]))), Err("snapshot_term_out_of_range"));
    assert_eq!(vet(&raw.raft, &snap(20, 6, voters(&[1, 2, 3]))), Err("snapshot_term_out_of_range"));
    assert_eq!(vet(&raw.raft, &snap(10, 4, voters(&[1, 2, 3]))), Ok(()), "the commit, as this log has it");
    assert_eq!(vet(&raw.raft, &snap(10, 5, voters(&[1, 2, 3]))), Err("snapshot_conflicts_with_commit"));
    assert_eq!(vet(&raw.raft, &snap(3, 1, voters(&[1, 2, 3]))), Ok(()), "compacted here: raft-rs ignores it");
    let bad = [
        voters(&[]),
        voters(&[0, 1]),
        ConfState { voters: vec![1, 2], learners: vec![2], ..Default::default() },
        ConfState { voters: vec![1], learners_next: vec![2], ..Default::default() },
    ];
    for cs in bad {
        assert_eq!(vet(&raw.raft, &snap(20, 5, cs.clone())), Err("snapshot_configuration_invalid"), "{cs:?}");
    }
    let joint = ConfState { voters: vec![1, 2, 3], voters_outgoing: vec![1, 2, 4], learners_next: vec![4], ..Default::default() };
    assert_eq!(vet(&raw.raft, &snap(20, 5, joint)), Ok(()));
    let m = Message { snapshot: Some(Snapshot::default()), ..snap(20, 5, voters(&[1])) };
    assert_eq!(vet(&raw.raft, &m), Err("snapshot_without_metadata"));
}


/// raft-rs asserts that a new leader's log is on disk; vote grants forged before the
/// campaign's Ready is persisted would break that.
#[test]
fn vote_grants_before_the_campaign_is_persisted_are_dropped() {
    let mut raw = node(1);
    // An entry from the leader, not yet persisted (no Ready handled), then a campaign.
    let append = Message {
        msg_type: MessageType::MsgAppend as i32,
        to: 1,
        from: 2,
        term: 5,
        index: 12,
        log_term: 5,
        commit: 10,
        entries: vec![Entry { index: 13, term: 5, ..Default::default() }],
        ..Default::default()
    };
    raw.step(append).expect("append");
    raw.raft.become_candidate();
    assert!(raw.raft.raft_log.persisted < raw.raft.raft_log.last_index());
    let grant = |from| Message { msg_type: MessageType::MsgRequestVoteResponse as i32, to: 1, from, term: 6, ..Default::default() };
    assert_eq!(vet(&raw.raft, &grant(2)), Err("vote_answer_before_the_request"));
    // Stepped anyway, two grants make it leader with an unpersisted entry: raft-rs panics.
    let stepped = catch_unwind(AssertUnwindSafe(|| {
        let _ = raw.step(grant(2));
        let _ = raw.step(grant(3));
    }));
    assert!(stepped.is_err(), "raft-rs took forged grants for a campaign not on disk");
    // Once the Ready is persisted, grants are stepped.
    let mut raw = node(1);
    raw.raft.become_candidate();
    handle_ready(&mut raw);
    assert_eq!(vet(&raw.raft, &grant(2)), Ok(()));
}

/// A hand-over starts a campaign at once: not while entries are not yet on disk (the
/// fuzz found raft-rs's assertion through it with Readys persisted later).
#[test]
fn a_hand_over_waits_for_the_log_to_be_on_disk() {
    let mut raw = node(1);
    let timeout_now = Message { msg_type: MessageType::MsgTimeoutNow as i32, to: 1, from: 2, term: 5, ..Default::default() };
    assert_eq!(vet(&raw.raft, &timeout_now), Ok(()));
    let append = Message {
        msg_type: MessageType::MsgAppend as i32,
        to: 1,
        from: 2,
        term: 5,
        index: 12,
        log_term: 5,
        entries: vec![Entry { index: 13, term: 5, ..Default::default() }],
        ..Default::default()
    };
    raw.step(append).expect("append");
    assert_eq!(vet(&raw.raft, &timeout_now), Err("campaign_before_the_log_is_on_disk"));
}

#[test]
fn a_leadership_transfer_is_stepped_only_by_the_leader() {
    let transfer = Message { msg_type: MessageType::MsgTransferLeader as i32, to: 1, from: 3, term: 6, ..Default::default() };
    let leader = node(4);
    assert_eq!(vet(&leader.raft, &transfer), Ok(()));
    for role in [0, 1, 2, 3] {
        assert_eq!(vet(&node(role).raft, &transfer), Err("transfer_to_a_non_leader"), "role {role}");
    }
}
