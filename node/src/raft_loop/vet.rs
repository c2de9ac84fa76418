//! Checks a peer's raft message against this member's raft state before raft-rs steps it.
//!
//! raft-rs trusts its peers. A few well-formed messages that no correct peer sends make
//! it panic: a heartbeat commit beyond this member's log, an append whose log term is
//! older than this member's commit, a snapshot whose configuration cannot be restored,
//! vote grants that arrive before the campaign's state is on disk and a hand-over to a
//! member whose log is not on disk yet (a leader with unpersisted entries: an
//! assertion), a leadership transfer that a non-leader would forward with its term. A few more let any sender steer this member: a read-index answer or a
//! leadership hand-over from a member that is not the leader, a proposal from a
//! non-member, a snapshot that rewrites committed entries. The transport refuses what it
//! can judge from a message alone (`transport::check_message`); [`vet`] refuses what
//! needs this member's state. A correct member's message breaks no rule except in two
//! rare windows where dropping it costs a retry: a hand-over reaching a member that
//! restarted and has not heard from the leader yet, or that has entries not yet on disk
//! (the transfer times out), a proposal
//! forwarded to a new leader that has not yet applied the sender's addition (the client
//! retries).
//!
//! What is not covered: raft is not Byzantine fault tolerant, and a sender that is a
//! voter of this member's configuration is trusted as raft trusts it; nothing ties the
//! `from` of a message to its sender's identity (peer TLS proves "a member", not which).
//! A heartbeat from a voter whose commit is beyond this log means this member lost
//! entries it acknowledged, and stops it ([`claims_lost_entries`]). Such a heartbeat
//! from a sender that is not a voter here is dropped: a liar, or a leader added since
//! this member last applied, when this member's loss goes unnoticed (it is logged). A
//! sender that is not a member can still disturb (a higher term makes this member a
//! follower, as in any raft): the peer port is for members only (peer TLS,
//! docs/security.md).

use std::collections::BTreeSet;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfState, Message, MessageType};
use raft::{Changer, ProgressTracker, Raft, StateRole, Storage};

/// Why [`vet`] dropped a message: a fixed label, also the `reason` of the metric.
pub type Reason = &'static str;

/// `Ok` when raft-rs may step `m`, or why it must not.
pub fn vet<S: Storage>(raft: &Raft<S>, m: &Message) -> Result<(), Reason> {
    let conf = raft.prs().conf();
    let last = raft.raft_log.last_index();
    let committed = raft.raft_log.committed;
    // raft-rs ignores, or only answers, messages of an older term.
    let current = m.term >= raft.term;
    let configured = || !conf.voters().ids().is_empty();
    let member = || conf.voters().contains(m.from) || conf.learners().contains(&m.from) || conf.learners_next().contains(&m.from);
    match m.get_msg_type() {
        // A leader sends `min(match, commit)`; a commit beyond this log from a voter is
        // lost entries ([`claims_lost_entries`]), from anyone else a lie raft-rs would
        // panic on. A member still joining (no configuration yet) has its own check.
        MessageType::MsgHeartbeat if m.commit > last && configured() && !conf.voters().contains(m.from) => {
            Err("heartbeat_commit_beyond_log")
        }
        // A leader's log holds every committed entry, so its term at any index from this
        // member's commit on is at least this member's term at its commit. raft-rs looks
        // for the conflict below an older one and panics when it reaches the snapshot.
        MessageType::MsgAppend if current && m.index >= committed && m.log_term < raft.raft_log.term(committed).unwrap_or(0) => {
            Err("append_older_than_commit")
        }
        MessageType::MsgSnapshot if current => vet_snapshot(raft, m),
        // A candidate's vote requests leave only once its Ready is on disk, and it adds no
        // entries while it campaigns, so a real grant finds its log persisted. raft-rs
        // asserts that when the grants make it leader.
        MessageType::MsgRequestVoteResponse | MessageType::MsgRequestPreVoteResponse if raft.raft_log.persisted < last => {
            Err("vote_answer_before_the_request")
        }
        // Only this term's leader answers read-index requests and hands leadership over;
        // raft-rs takes either from anyone (a forged read index would serve a stale read).
        MessageType::MsgReadIndexResp | MessageType::MsgTimeoutNow if m.from != raft.leader_id || m.term != raft.term => {
            Err("not_from_the_leader")
        }
        // A hand-over starts a campaign at once, and raft-rs asserts that a member that
        // wins one (alone, if it is the only voter) has its log on disk. The leader hands
        // over only to a member that acknowledged its whole log, so a correct one gets
        // here only if entries arrived since: the transfer then times out.
        MessageType::MsgTimeoutNow if raft.raft_log.persisted < last => Err("campaign_before_the_log_is_on_disk"),
        // Followers forward client proposals to the leader; nobody else proposes.
        MessageType::MsgPropose if !member() => Err("proposal_from_a_non_member"),
        // A member forwards a leadership transfer to the one it takes for the leader,
        // with its term. A non-leader would forward it again with that term, and raft-rs
        // is fatal on that; a correct member's transfer never gets there (a leader that
        // steps down knows no leader at that term, and a newer term ignores it).
        MessageType::MsgTransferLeader if raft.state != StateRole::Leader => Err("transfer_to_a_non_leader"),
        // A follower acknowledges (or refuses) an append the leader sent, so at an index
        // of the leader's log.
        MessageType::MsgAppendResponse if m.index > last => Err("answer_beyond_log"),
        _ => Ok(()),
    }
}

/// Whether `m` says this member lost log entries it acknowledged: a heartbeat of the
/// current term or a later one whose commit is beyond this log (a leader's heartbeat
/// carries `min(match, commit)`, and this member reports a match only for durable
/// entries). [`vet`] has let it through, so it comes from a voter or to a member still
/// joining.
pub fn claims_lost_entries<S: Storage>(raft: &Raft<S>, m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgHeartbeat && m.term >= raft.term && m.commit > raft.raft_log.last_index()
}

fn vet_snapshot<S: Storage>(raft: &Raft<S>, m: &Message) -> Result<(), Reason> {
    let Some(meta) = m.snapshot.as_ref().and_then(|s| s.metadata.as_ref()) else {
        return Err("snapshot_without_metadata");
    };
    if meta.index <= raft.raft_log.committed {
        // raft-rs ignores it, or fast-forwards to it if this log agrees; at the commit
        // index with another term it would replace committed entries. (Term 0: compacted
        // here, nothing to compare.)
        return match raft.raft_log.term(meta.index) {
            Ok(t) if t != 0 && t != meta.term => Err("snapshot_conflicts_with_commit"),
            _ => Ok(()),
        };
    }
    // A leader's snapshot holds entries of its term or earlier ones.
    if meta.term == 0 || meta.term > m.term {
        return Err("snapshot_term_out_of_range");
    }
    match meta.conf_state.as_ref() {
        Some(cs) if restores(cs) => Ok(()),
        _ => Err("snapshot_configuration_invalid"),
    }
}

/// Whether raft-rs restores `cs` without a fatal error: the changes its restore makes
/// from an empty configuration (voters of the outgoing half one by one, then the joint
/// change into the incoming half), applied on a scratch tracker, succeed and describe
/// `cs` again. It has a voter, and no member is 0.
fn restores(cs: &ConfState) -> bool {
    let ids = || cs.voters.iter().chain(&cs.learners).chain(&cs.voters_outgoing).chain(&cs.learners_next);
    if cs.voters.is_empty() || ids().any(|id| *id == 0) {
        return false;
    }
    let change = |node_id: u64, t: ConfChangeType| ConfChangeSingle { node_id, change_type: t as i32 };
    let outgoing: Vec<_> = cs.voters_outgoing.iter().map(|id| change(*id, ConfChangeType::AddNode)).collect();
    let mut incoming: Vec<_> = cs.voters_outgoing.iter().map(|id| change(*id, ConfChangeType::RemoveNode)).collect();
    incoming.extend(cs.voters.iter().map(|id| change(*id, ConfChangeType::AddNode)));
    incoming.extend(cs.learners.iter().chain(&cs.learners_next).map(|id| change(*id, ConfChangeType::AddLearnerNode)));
    let mut tracker = ProgressTracker::new(1);
    let simple = |tracker: &mut ProgressTracker, ccs: &[ConfChangeSingle]| match Changer::new(tracker).simple(ccs) {
        Ok((cfg, changes)) => {
            tracker.apply_conf(cfg, changes, 1);
            true
        }
        Err(_) => false,
    };
    if outgoing.is_empty() {
        if !incoming.iter().all(|cc| simple(&mut tracker, std::slice::from_ref(cc))) {
            return false;
        }
    } else {
        if !outgoing.iter().all(|cc| simple(&mut tracker, std::slice::from_ref(cc))) {
            return false;
        }
        match Changer::new(&tracker).enter_joint(cs.auto_leave, &incoming) {
            Ok((cfg, changes)) => tracker.apply_conf(cfg, changes, 1),
            Err(_) => return false,
        }
    }
    let got = tracker.conf().to_conf_state();
    let same = |a: &[u64], b: &[u64]| a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>();
    same(&got.voters, &cs.voters)
        && same(&got.learners, &cs.learners)
        && same(&got.voters_outgoing, &cs.voters_outgoing)
        && same(&got.learners_next, &cs.learners_next)
        && got.auto_leave == cs.auto_leave
}

#[cfg(test)]
mod tests;
