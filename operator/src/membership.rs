//! The membership protocol as a pure function: [`decide`] maps observed state (raft
//! members from the node API, pods, volume claims, spec, and the operation recorded in
//! status) to exactly one next [`Action`]. Nothing here performs I/O; the executor in
//! `orchestrate` carries the action out and the controller calls `decide` again.
//!
//! Invariants kept (see docs/membership.md):
//! - members are raft ids `1..=k` (pod ordinals `0..k`); growth adds `k+1`, shrinking
//!   removes `k`, one member at a time;
//! - every mutation is preceded by recording its operation in status ([`Action::Record`]);
//! - a voter is removed only when the current voters can commit the change and the
//!   remaining voters keep a healthy majority, and never while it is the leader;
//! - a removed member's volume claim is deleted before its ordinal is used again;
//! - a member's pod is restarted onto a new pod template one member at a time, never
//!   while it leads (leadership moves first) and only while the other voters keep a
//!   healthy majority; a healthy member only when every member follows the leader, the
//!   next only once the restarted one follows it again and has caught up.

use std::collections::{BTreeMap, BTreeSet};

use crate::crd::{Operation, OperationKind, OperationStage};

/// Raft role of a member as the leader reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Counts towards quorum.
    Voter,
    /// Receives the log, does not vote.
    Learner,
}

/// One raft member as seen by the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// Voter or learner.
    pub role: Role,
    /// Leader's match index for this member (None when unknown).
    pub match_index: Option<u64>,
    /// Reachable from the leader and its own API answered.
    pub healthy: bool,
    /// Applied index the member itself reports (None when it did not answer).
    pub applied_index: Option<u64>,
    /// Data-dir incarnation the member itself reports (None when it did not answer).
    pub incarnation: Option<String>,
    /// Index of the member's latest snapshot (its log starts after it); None when unknown.
    pub snapshot_index: Option<u64>,
    /// The leader the member itself follows (0: none known); None when it did not answer.
    /// A restarted member knows the leader only once it heard from it again.
    pub leader: Option<u64>,
}

/// The raft cluster as observed through the node API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// Leader id (0 = none known).
    pub leader: u64,
    /// Leader's commit index.
    pub commit_index: u64,
    /// Members by raft id.
    pub members: BTreeMap<u64, MemberView>,
}

/// A pod of the StatefulSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// The container runs (phase Running, not being deleted).
    pub running: bool,
    /// Being deleted.
    pub terminating: bool,
    /// Pod UID (tells a recreated pod from the old one).
    pub uid: String,
    /// Hash of the pod template the pod was made from (the operator's annotation on it),
    /// None when it carries none.
    pub template_hash: Option<String>,
}

/// A `data` volume claim of a pod ordinal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvcView {
    /// Claim UID.
    pub uid: String,
    /// Being deleted (waits for its pod to go).
    pub terminating: bool,
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// `spec.replicas`.
    pub desired: u32,
    /// The StatefulSet's `spec.replicas`.
    pub sts_replicas: u32,
    /// Existing pods by ordinal.
    pub pods: BTreeMap<u32, PodView>,
    /// `data` volume claims by pod ordinal.
    pub pvcs: BTreeMap<u32, PvcView>,
    /// The raft cluster, or None when no member answered.
    pub cluster: Option<ClusterView>,
    /// The operation recorded in status.
    pub operation: Option<Operation>,
    /// Incarnations recorded in status, by raft id.
    pub incarnations: BTreeMap<u64, String>,
    /// [`pods_needed_top`] of `status.members`: the membership last seen, kept while no
    /// member answers (0 before the first one did).
    pub recorded_top: u64,
    /// Hash of the pod template the StatefulSet has now; pods made from another one are
    /// restarted one by one. None: unknown, nothing is restarted.
    pub template_hash: Option<String>,
    /// Raft ids in `status.members`: the membership last seen (used while no member
    /// answers).
    pub recorded_members: BTreeSet<u64>,
}

/// Why nothing is done now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// No member answered the API.
    NoMemberReachable,
    /// The members know no leader.
    NoLeader,
    /// The pod of a member is not running yet.
    PodNotRunning(u32),
    /// A removed member's pod still exists.
    PodTerminating(u32),
    /// A volume claim is being deleted.
    PvcTerminating(u32),
    /// A learner is behind the leader's log.
    LearnerCatchingUp(u64),
    /// The change would leave the voters without a healthy majority.
    WouldLoseQuorum(u64),
    /// No healthy voter can take leadership from the member to remove.
    NoTransferTarget(u64),
    /// Member `id` runs on an older pod template; it is restarted once every member is
    /// healthy.
    RestartWaitsForHealth(u64),
    /// Restarted member `id` is not healthy yet.
    MemberRecovering(u64),
    /// The PodDisruptionBudget refused to evict the pod of this ordinal (another pod is
    /// disrupted, a node drain say).
    EvictionRefused(u32),
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitReason::NoMemberReachable => write!(f, "no raft member answers its API"),
            WaitReason::NoLeader => write!(f, "the raft cluster has no leader"),
            WaitReason::PodNotRunning(o) => write!(f, "waiting for pod ordinal {o} to run"),
            WaitReason::PodTerminating(o) => write!(f, "waiting for pod ordinal {o} to terminate"),
            WaitReason::PvcTerminating(o) => write!(f, "waiting for the volume claim of ordinal {o} to go"),
            WaitReason::LearnerCatchingUp(id) => write!(f, "learner {id} is catching up"),
            WaitReason::WouldLoseQuorum(id) => {
                write!(f, "changing member {id} now would leave no healthy voter majority")
            }
            WaitReason::NoTransferTarget(id) => {
                write!(f, "no healthy voter can take leadership from member {id}")
            }
            WaitReason::RestartWaitsForHealth(id) => {
                write!(f, "member {id} runs an older pod template; it restarts once every member follows the leader and caught up")
            }
            WaitReason::MemberRecovering(id) => write!(f, "restarted member {id} is not healthy yet"),
            WaitReason::EvictionRefused(o) => {
                write!(f, "the PodDisruptionBudget refused to evict pod ordinal {o} for now")
            }
        }
    }
}

/// The one next step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write this operation (or None: clear it) to status. Always done before a mutation.
    Record(Option<Operation>),
    /// Record the incarnation a member reports (first sighting after it joined).
    RecordIncarnation {
        /// Raft id.
        id: u64,
        /// Its incarnation.
        incarnation: String,
    },
    /// Set the StatefulSet's replicas.
    ScaleStatefulSet(u32),
    /// Add `id` as a learner through the leader.
    AddLearner(u64),
    /// Promote learner `id` to voter.
    Promote(u64),
    /// Ask the leader to hand leadership to `to`.
    TransferLeader {
        /// Current leader.
        from: u64,
        /// New leader.
        to: u64,
    },
    /// Remove member `id` through the leader.
    RemoveMember(u64),
    /// Delete the `data` volume claim of a pod ordinal.
    DeletePvc(u32),
    /// Delete the pod of an ordinal (the StatefulSet recreates it).
    DeletePod(u32),
    /// Evict the pod of an ordinal (a deletion the PodDisruptionBudget may refuse, as a
    /// node drain's; the StatefulSet recreates it).
    EvictPod(u32),
    /// Replace the recorded incarnation of a member that left by a removal marker
    /// (`removed@<index>`, see [`removal_marker`]), so a later member with the same id is
    /// told apart from the one that left.
    MarkRemoved {
        /// Raft id.
        id: u64,
        /// A commit index at or after the removal.
        at: u64,
    },
    /// Nothing can be done now.
    Wait(WaitReason),
    /// Membership, pods and volumes match the spec.
    Done,
}

impl Action {
    /// True when the action changes raft membership or Kubernetes objects.
    pub fn is_mutation(&self) -> bool {
        !matches!(
            self,
            Action::Wait(_)
                | Action::Done
                | Action::Record(_)
                | Action::RecordIncarnation { .. }
                | Action::MarkRemoved { .. }
        )
    }
}

/// How far (entries) a member's match index may be behind the commit index for it to
/// count as caught up after a restart: the node's default `--promote-max-lag`.
pub const CAUGHT_UP_LAG: u64 = 1_000;

/// Prefix of a removal marker stored in place of an incarnation.
pub const REMOVED_PREFIX: &str = "removed@";

/// The index of a removal marker `removed@<index>`, if `recorded` is one.
pub fn removal_marker(recorded: Option<&String>) -> Option<u64> {
    recorded.and_then(|r| r.strip_prefix(REMOVED_PREFIX)).and_then(|n| n.parse().ok())
}

/// Is `recorded` a real incarnation (not absent, not a removal marker).
fn is_incarnation(recorded: Option<&String>) -> bool {
    recorded.is_some_and(|r| !r.starts_with(REMOVED_PREFIX))
}

/// Majority of `n` voters.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// The highest id among `members` (id, is a voter) whose pod the StatefulSet must keep:
/// voters, and learners up to the one a scale-up adds (`desired + 1`). A learner added by
/// hand with a far higher id must not make the StatefulSet grow to it: it is removed as
/// an orphan instead. 0 when there is none. The controller computes
/// [`Observed::recorded_top`] from `status.members` with it too.
pub fn pods_needed_top(members: impl IntoIterator<Item = (u64, bool)>, desired: u32) -> u64 {
    members.into_iter().filter(|(id, voter)| *voter || *id <= u64::from(desired) + 1).map(|(id, _)| id).max().unwrap_or(0)
}

/// Pods needed for members up to id `top`, capped at what a spec can ask plus the one
/// member a scale-up adds.
fn members_pods(top: u64) -> u32 {
    ordinal(top.min(u64::from(crate::crd::MAX_REPLICAS.unsigned_abs()) + 1)) + 1
}

fn ordinal(id: u64) -> u32 {
    // Ids are at most a few dozen (replicas <= 9 plus one in flight).
    u32::try_from(id.saturating_sub(1)).unwrap_or(u32::MAX)
}

fn op(kind: OperationKind, id: u64) -> Operation {
    Operation::new(kind, id)
}

impl ClusterView {
    fn has_member_above(&self, id: u64) -> bool {
        self.members.keys().next_back().is_some_and(|top| *top > id)
    }

    fn voters(&self) -> BTreeSet<u64> {
        self.members.iter().filter(|(_, m)| m.role == Role::Voter).map(|(id, _)| *id).collect()
    }

    fn healthy(&self, id: u64) -> bool {
        self.members.get(&id).is_some_and(|m| m.healthy)
    }

    /// Healthy, following the current leader (a member that restarted has heard from it
    /// again, not only answered its own API), and caught up: the leader's match index for
    /// it at most [`CAUGHT_UP_LAG`] behind the commit index (a member that was down for a
    /// while is far behind until it acknowledges the entries it missed).
    fn following(&self, id: u64) -> bool {
        self.healthy(id)
            && self.members.get(&id).is_some_and(|m| {
                m.leader == Some(self.leader)
                    && (id == self.leader || m.match_index.is_some_and(|mi| mi.saturating_add(CAUGHT_UP_LAG) >= self.commit_index))
            })
    }

    /// Can voter `id` be removed: the current voters commit the change and the remaining
    /// ones keep a healthy majority. A learner can always be removed.
    fn can_remove(&self, id: u64) -> bool {
        let voters = self.voters();
        if !voters.contains(&id) {
            return true;
        }
        if voters.len() <= 1 {
            return false;
        }
        let healthy_now = voters.iter().filter(|v| self.healthy(**v)).count();
        let healthy_after = voters.iter().filter(|v| **v != id && self.healthy(**v)).count();
        healthy_now >= majority(voters.len()) && healthy_after >= majority(voters.len() - 1)
    }

    /// Can member `id` go down for a restart: the other voters keep a healthy majority.
    /// Clusters of one or two voters have no such majority; they restart a member when
    /// all of them are healthy, and are unavailable until it is back.
    fn can_restart(&self, id: u64) -> bool {
        let voters = self.voters();
        if !voters.contains(&id) {
            return true;
        }
        let others = voters.iter().filter(|v| **v != id && self.healthy(**v)).count();
        others >= majority(voters.len()) || (voters.len() < 3 && others + 1 == voters.len())
    }

    /// Can learner `id` be promoted without the new voter set lacking a healthy majority.
    fn can_promote(&self, id: u64) -> bool {
        let voters = self.voters();
        let healthy = voters.iter().filter(|v| self.healthy(**v)).count() + usize::from(self.healthy(id));
        healthy >= majority(voters.len() + 1)
    }

    /// The healthy voter other than `not` with the highest match index.
    fn transfer_target(&self, not: u64) -> Option<u64> {
        self.members
            .iter()
            .filter(|(id, m)| **id != not && m.role == Role::Voter && m.healthy)
            .max_by_key(|(id, m)| (m.match_index.unwrap_or(0), std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    /// A member that lost its data: its incarnation differs from the recorded one, or it
    /// is a voter reporting applied index 0 while the cluster has committed entries.
    fn is_amnesiac(&self, id: u64, recorded: Option<&String>) -> bool {
        let Some(m) = self.members.get(&id) else { return false };
        if let (Some(seen), Some(rec)) = (m.incarnation.as_ref(), recorded.filter(|r| is_incarnation(Some(r)))) {
            if seen != rec {
                return true;
            }
        }
        m.role == Role::Voter && m.applied_index == Some(0) && self.commit_index > 0
    }
}

fn pod_running(o: &Observed, ordinal: u32) -> bool {
    o.pods.get(&ordinal).is_some_and(|p| p.running && !p.terminating)
}

/// `c` with the members that lost their data (see [`ClusterView::is_amnesiac`]) marked
/// unhealthy, and their ids: they answer, but must count towards no quorum.
pub fn amnesiacs_unhealthy(c: &ClusterView, incarnations: &BTreeMap<u64, String>) -> (ClusterView, Vec<u64>) {
    let amnesiacs: Vec<u64> = c.members.keys().copied().filter(|id| c.is_amnesiac(*id, incarnations.get(id))).collect();
    let mut view = c.clone();
    for id in &amnesiacs {
        if let Some(m) = view.members.get_mut(id) {
            m.healthy = false;
        }
    }
    (view, amnesiacs)
}

/// Decides the next step. Pure: same input, same output.
pub fn decide(o: &Observed) -> Action {
    // The pods of every member must exist. A StatefulSet scaled down out of band
    // (`kubectl scale sts`) or re-created smaller can take the quorum away, and then no
    // leader or no member answers: growing it back needs neither.
    // Every step below keeps the pods of all members (a removal shrinks the StatefulSet
    // only after the member is gone), so this never undoes one of them; it also comes
    // first while an operation is in flight (a learner without its pod never catches up).
    let known_top = o
        .cluster
        .as_ref()
        .map(|c| pods_needed_top(c.members.iter().map(|(id, m)| (*id, m.role == Role::Voter)), o.desired))
        .filter(|top| *top > 0)
        .unwrap_or(o.recorded_top);
    if known_top > 0 && o.sts_replicas < members_pods(known_top) {
        return Action::ScaleStatefulSet(members_pods(known_top));
    }
    if let Some(ord) = stuck_outdated_pod(o, known_top) {
        return Action::DeletePod(ord);
    }
    let Some(c) = o.cluster.as_ref() else {
        return Action::Wait(WaitReason::NoMemberReachable);
    };
    if c.leader == 0 || !c.members.contains_key(&c.leader) {
        return Action::Wait(WaitReason::NoLeader);
    }
    // A member that lost its data answers, but must not count towards a quorum.
    let (view, amnesiacs) = amnesiacs_unhealthy(c, &o.incarnations);
    let c = &view;
    match o.operation.as_ref() {
        Some(cur) => {
            let next = continue_operation(o, c, cur);
            // A scaling step recorded while a member was down can find that member
            // amnesiac, and then wait for good on the quorum it takes away: replace the
            // member first. Only a step that waits and has not removed its member yet is
            // dropped; next_operation finds it again from what it left (a grown
            // StatefulSet, a learner). A removal already done finishes (its volume must go).
            // A restart waiting for a member that came back without its data gives way
            // to replacing that very member.
            let other = amnesiacs.iter().copied().find(|id| *id != cur.id || cur.kind == OperationKind::Restart);
            let droppable = matches!(cur.kind, OperationKind::ScaleUp | OperationKind::Restart)
                || (cur.kind == OperationKind::ScaleDown && c.members.contains_key(&cur.id));
            match (other, &next) {
                (Some(id), Action::Wait(_)) if droppable => Action::Record(Some(op(OperationKind::ReplaceAmnesiac, id))),
                // A restart that waits (its successor cannot be scheduled, the quorum rule)
                // never holds up a membership change: it ends, and is found again later
                // from the pods' templates.
                (_, Action::Wait(_)) if cur.kind == OperationKind::Restart && membership_work(&next_operation(o, c)) => {
                    Action::Record(None)
                }
                _ => next,
            }
        }
        None => next_operation(o, c),
    }
}

fn continue_operation(o: &Observed, c: &ClusterView, op: &Operation) -> Action {
    match op.kind {
        OperationKind::ScaleUp => scale_up(o, c, op.id),
        OperationKind::ScaleDown => scale_down(o, c, op.id),
        OperationKind::ReplaceAmnesiac => replace_amnesiac(o, c, op),
        OperationKind::Restart => restart(o, c, op),
    }
}

/// Steps of adding member `id`: StatefulSet to `id` pods, learner, promote.
fn scale_up(o: &Observed, c: &ClusterView, id: u64) -> Action {
    let member = c.members.get(&id);
    // Latched spec change: the target dropped below `id` before it became a voter; undo
    // by turning this into the removal of the same member (idempotent from any point).
    // Only the top member is undone; a member below others fills a gap and is re-added.
    if u64::from(o.desired) < id && member.is_none_or(|m| m.role == Role::Learner) && !c.has_member_above(id) {
        return Action::Record(Some(op(OperationKind::ScaleDown, id)));
    }
    let ord = ordinal(id);
    match member {
        None => {
            if o.sts_replicas <= ord {
                if let Some(v) = o.pvcs.get(&ord).filter(|_| !o.pods.contains_key(&ord)) {
                    // A claim left from an earlier member would make the new pod rejoin
                    // with stale data (or a tombstone): start clean.
                    return if v.terminating {
                        Action::Wait(WaitReason::PvcTerminating(ord))
                    } else {
                        Action::DeletePvc(ord)
                    };
                }
                return Action::ScaleStatefulSet(ord + 1);
            }
            if !pod_running(o, ord) {
                return Action::Wait(WaitReason::PodNotRunning(ord));
            }
            // A reused id is safe to add at once: the node never hands a member a
            // snapshot older than its latest addition, so it cannot replay the removal
            // of the previous member with its id.
            Action::AddLearner(id)
        }
        Some(m) if m.role == Role::Learner => {
            if !c.can_promote(id) {
                return Action::Wait(WaitReason::WouldLoseQuorum(id));
            }
            Action::Promote(id)
        }
        Some(m) => {
            if let Some(inc) = m.incarnation.as_ref().filter(|_| !is_incarnation(o.incarnations.get(&id))) {
                return Action::RecordIncarnation { id, incarnation: inc.clone() };
            }
            Action::Record(None)
        }
    }
}

/// Steps of removing member `id`: move leadership, remove, shrink, wait for the pod, PVC.
fn scale_down(o: &Observed, c: &ClusterView, id: u64) -> Action {
    let ord = ordinal(id);
    if let Some(m) = c.members.get(&id) {
        // Latched spec change: still a voter and wanted again: nothing was undone yet, so
        // abandon the removal.
        if m.role == Role::Voter && u64::from(o.desired) >= id {
            return Action::Record(None);
        }
        if c.leader == id {
            return match c.transfer_target(id) {
                Some(to) => Action::TransferLeader { from: id, to },
                None => Action::Wait(WaitReason::NoTransferTarget(id)),
            };
        }
        if !c.can_remove(id) {
            return Action::Wait(WaitReason::WouldLoseQuorum(id));
        }
        return Action::RemoveMember(id);
    }
    if c.has_member_above(id) {
        // Not the top member: its pod stays (the StatefulSet cannot drop a middle
        // ordinal); the gap repair wipes and re-adds it.
        if removal_marker(o.incarnations.get(&id)).is_none() {
            return Action::MarkRemoved { id, at: c.commit_index };
        }
        return Action::Record(None);
    }
    if o.sts_replicas > ord {
        return Action::ScaleStatefulSet(ord);
    }
    if o.pods.contains_key(&ord) {
        return Action::Wait(WaitReason::PodTerminating(ord));
    }
    if let Some(v) = o.pvcs.get(&ord) {
        return if v.terminating { Action::Wait(WaitReason::PvcTerminating(ord)) } else { Action::DeletePvc(ord) };
    }
    if removal_marker(o.incarnations.get(&id)).is_none() {
        return Action::MarkRemoved { id, at: c.commit_index };
    }
    Action::Record(None)
}

/// Steps of replacing a member that lost its data: remove it, delete its pod and volume
/// claim (recorded by UID so a recreated pod is told apart), re-add it as a learner, promote.
fn replace_amnesiac(o: &Observed, c: &ClusterView, op: &Operation) -> Action {
    let id = op.id;
    let ord = ordinal(id);
    let member = c.members.get(&id);
    match op.stage {
        OperationStage::Started | OperationStage::Removed if member.is_some() => {
            if c.leader == id {
                return match c.transfer_target(id) {
                    Some(to) => Action::TransferLeader { from: id, to },
                    None => Action::Wait(WaitReason::NoTransferTarget(id)),
                };
            }
            if !c.can_remove(id) {
                return Action::Wait(WaitReason::WouldLoseQuorum(id));
            }
            Action::RemoveMember(id)
        }
        OperationStage::Started => Action::Record(Some(op.at(OperationStage::Removed))),
        OperationStage::Removed => {
            if removal_marker(o.incarnations.get(&id)).is_none() {
                return Action::MarkRemoved { id, at: c.commit_index };
            }
            Action::Record(Some(Operation {
                pod_uid: o.pods.get(&ord).map(|p| p.uid.clone()),
                pvc_uid: o.pvcs.get(&ord).map(|v| v.uid.clone()),
                ..op.at(OperationStage::Wiping)
            }))
        }
        OperationStage::Wiping => {
            if member.is_some() {
                // Someone re-added it before the wipe finished: remove it again.
                return Action::Record(Some(op.at(OperationStage::Started)));
            }
            let old_pvc = o.pvcs.get(&ord).filter(|v| Some(&v.uid) == op.pvc_uid.as_ref());
            let old_pod = o.pods.get(&ord).filter(|p| Some(&p.uid) == op.pod_uid.as_ref());
            if old_pvc.is_some_and(|v| !v.terminating) {
                // Marks the claim for deletion; it goes once the old pod is gone.
                return Action::DeletePvc(ord);
            }
            // While the old claim exists, any pod at this ordinal mounts it (claims are
            // named by ordinal) and keeps it from going: the old pod, or one the
            // StatefulSet made again meanwhile (it was scaled down and up out of band).
            let holder = if old_pvc.is_some() { o.pods.get(&ord) } else { old_pod };
            if let Some(p) = holder {
                if !p.terminating {
                    return Action::DeletePod(ord);
                }
                return Action::Wait(WaitReason::PodTerminating(ord));
            }
            if old_pvc.is_some() {
                return Action::Wait(WaitReason::PvcTerminating(ord));
            }
            Action::Record(Some(op.at(OperationStage::Wiped)))
        }
        OperationStage::Wiped => {
            // A scale-up's learner left waiting when this replacement took over (it was
            // dropped for it): settle it first, so the re-added member is the only
            // learner. Promoted when wanted and the quorum rule allows, removed when not
            // wanted any more.
            if let Some(other) = c.members.iter().find(|(i, m)| m.role == Role::Learner && **i != id).map(|(i, _)| *i) {
                return if u64::from(o.desired) < other {
                    Action::RemoveMember(other)
                } else if c.can_promote(other) {
                    Action::Promote(other)
                } else {
                    Action::Wait(WaitReason::WouldLoseQuorum(other))
                };
            }
            match scale_up(o, c, id) {
                Action::Record(None) => Action::Record(None),
                other => other,
            }
        }
    }
}

/// A pod made from an older pod template that does not run, which under OnDelete only
/// its deletion moves to the new template, where nothing else would:
/// - the pod of no member (a scale-up's new pod, a replaced member's, made from a bad
///   template since fixed): an operation may wait for it, and it counts in no quorum;
/// - a member's pod, only once the current template is proven (no member's pod made
///   from it fails to run: otherwise a member whose container merely crashed on the old
///   template, which the kubelet would restart, would be moved onto a template that may
///   not run at all), and, with a leader known, only when it is not the leader and the
///   other voters keep a healthy majority (an operation waiting for the quorum this
///   member gives, a scale-down say, would otherwise wait for good).
///
/// Not when its member answers as healthy: then the pod does run.
fn stuck_outdated_pod(o: &Observed, known_top: u64) -> Option<u32> {
    // Members that lost their data count in no quorum here either.
    let view = o.cluster.as_ref().map(|c| amnesiacs_unhealthy(c, &o.incarnations).0);
    let leader_known = view.as_ref().is_some_and(|c| c.leader != 0 && c.members.contains_key(&c.leader));
    let is_member = |id: u64| match &view {
        Some(c) if !c.members.is_empty() => c.members.contains_key(&id),
        _ if !o.recorded_members.is_empty() => o.recorded_members.contains(&id),
        _ => id <= known_top,
    };
    let healthy = |id: u64| view.as_ref().is_some_and(|c| c.healthy(id));
    let proven = template_proven(o, is_member);
    let may_go = |id: u64| match &view {
        _ if !is_member(id) => true,
        Some(c) if leader_known => proven && id != c.leader && c.can_restart(id),
        _ => proven,
    };
    o.pods
        .iter()
        .filter(|(_, p)| !p.running && !p.terminating && outdated(o, p))
        .map(|(ord, _)| (*ord, u64::from(*ord) + 1))
        .find(|(_, id)| !healthy(*id) && may_go(*id))
        .map(|(ord, _)| ord)
}

/// No member's pod made from the current pod template fails to run (one starting counts
/// as failing until it runs), and no member within the StatefulSet lacks its pod (one the
/// API server refuses to create from this template, for a quota, a policy or a bad
/// image name, never shows up at all): moving a member that is down onto it cannot make
/// things worse. Pods of no member do not count: they may fail for another reason (the
/// tombstone of a removed member, an empty volume waiting to be added).
fn template_proven(o: &Observed, is_member: impl Fn(u64) -> bool) -> bool {
    let missing = (0..o.sts_replicas).any(|ord| !o.pods.contains_key(&ord) && is_member(u64::from(ord) + 1));
    !missing
        && o.pods.iter().all(|(ord, p)| p.terminating || p.running || outdated(o, p) || !is_member(u64::from(*ord) + 1))
}

/// Does the pod run an older pod template than the StatefulSet's (unknown: no).
fn outdated(o: &Observed, pod: &PodView) -> bool {
    o.template_hash.as_ref().is_some_and(|want| pod.template_hash.as_ref() != Some(want))
}

fn restart_op(id: u64, pod: &PodView) -> Action {
    Action::Record(Some(Operation { pod_uid: Some(pod.uid.clone()), ..op(OperationKind::Restart, id) }))
}

/// Steps of restarting member `id` on the current pod template: move leadership away,
/// delete the recorded pod, wait for its successor's member to be healthy.
fn restart(o: &Observed, c: &ClusterView, op: &Operation) -> Action {
    let id = op.id;
    let ord = ordinal(id);
    if !c.members.contains_key(&id) {
        // Removed meanwhile (a scale-down or a repair took over): nothing to restart.
        return Action::Record(None);
    }
    match o.pods.get(&ord) {
        None => Action::Wait(WaitReason::PodNotRunning(ord)),
        Some(p) if p.terminating => Action::Wait(WaitReason::PodTerminating(ord)),
        Some(p) if Some(&p.uid) == op.pod_uid.as_ref() => {
            // The spec went back to this pod's template meanwhile: nothing to do.
            if !outdated(o, p) {
                return Action::Record(None);
            }
            // Another member's pod on the current template does not run (since this
            // restart was recorded): the template may be bad; the roll stops here.
            if !template_proven(o, |m| c.members.contains_key(&m)) {
                return Action::Wait(WaitReason::RestartWaitsForHealth(id));
            }
            // Also for a member that looks down: "unhealthy" may only be an API call
            // that timed out, while it still votes or leads.
            if c.leader == id && c.voters().len() > 1 {
                return match c.transfer_target(id) {
                    Some(to) => Action::TransferLeader { from: id, to },
                    None => Action::Wait(WaitReason::NoTransferTarget(id)),
                };
            }
            if !c.can_restart(id) {
                return Action::Wait(WaitReason::WouldLoseQuorum(id));
            }
            // A cluster that tolerates a disruption restarts by eviction, so a node drain
            // evicting another member meanwhile cannot add up with it (the
            // PodDisruptionBudget counts both; a pod that does not run is evicted while
            // the budget is healthy). One or two voters tolerate none: their budget
            // refuses every eviction, so their pods are deleted.
            if c.voters().len() >= 3 {
                return Action::EvictPod(ord);
            }
            Action::DeletePod(ord)
        }
        Some(p) => {
            // The successor. One made from an older template yet (the StatefulSet had not
            // seen the new one, or the template changed again while it could not start,
            // e.g. a bad image then fixed) is restarted too, under the same checks.
            if outdated(o, p) && !c.healthy(id) {
                return restart_op(id, p);
            }
            if !p.running {
                return Action::Wait(WaitReason::PodNotRunning(ord));
            }
            if !c.following(id) {
                return Action::Wait(WaitReason::MemberRecovering(id));
            }
            Action::Record(None)
        }
    }
}

/// Would `next_operation`'s answer change membership or repair something (as opposed to
/// restarting a member, waiting, or nothing)?
fn membership_work(a: &Action) -> bool {
    match a {
        Action::Record(Some(op)) => op.kind != OperationKind::Restart,
        Action::Wait(_) | Action::Done | Action::Record(None) => false,
        _ => true,
    }
}

/// A member to restart on the current pod template, if any: one that looks down first
/// (its restart still moves leadership away and keeps the quorum rule, see [`restart`]);
/// else, with every member following the leader and every pod running, the highest
/// follower, the leader last.
fn next_restart(o: &Observed, c: &ClusterView) -> Option<Action> {
    let stale: Vec<(u64, &PodView)> = c
        .members
        .keys()
        .filter_map(|id| o.pods.get(&ordinal(*id)).map(|p| (*id, p)))
        .filter(|(_, p)| !p.terminating && outdated(o, p))
        .collect();
    // Only onto a template that runs: a member that crashed on the old one is better
    // left to the kubelet than moved next to a pod that cannot start.
    if let Some((id, p)) = stale.iter().find(|(id, _)| !c.healthy(*id)).filter(|_| template_proven(o, |id| c.members.contains_key(&id))) {
        return Some(restart_op(*id, p));
    }
    let (first, _) = stale.first()?;
    let all_well = c.members.keys().all(|id| c.following(*id) && pod_running(o, ordinal(*id)));
    if !all_well {
        return Some(Action::Wait(WaitReason::RestartWaitsForHealth(*first)));
    }
    let (id, p) = stale.iter().rev().find(|(id, _)| *id != c.leader).or_else(|| stale.first())?;
    Some(restart_op(*id, p))
}

/// No operation in flight: find the next one, or repair, or report done.
fn next_operation(o: &Observed, c: &ClusterView) -> Action {
    // Amnesia first: a voter that forgot its log endangers safety.
    for id in c.members.keys() {
        if c.is_amnesiac(*id, o.incarnations.get(id)) {
            return Action::Record(Some(op(OperationKind::ReplaceAmnesiac, *id)));
        }
    }
    // Record incarnations of members seen for the first time (bootstrap members).
    for (id, m) in &c.members {
        if let (Some(inc), false) = (m.incarnation.as_ref(), is_incarnation(o.incarnations.get(id))) {
            if m.role == Role::Voter && (m.applied_index.unwrap_or(0) > 0 || c.commit_index == 0) {
                return Action::RecordIncarnation { id: *id, incarnation: inc.clone() };
            }
        }
    }
    let top = c.members.keys().next_back().copied().unwrap_or(0);
    // A gap in 1..=top: a member was removed out of band; re-add it cleanly.
    for id in 1..=top {
        if !c.members.contains_key(&id) && u64::from(o.desired) >= id {
            return Action::Record(Some(op(OperationKind::ReplaceAmnesiac, id).at(OperationStage::Removed)));
        }
    }
    // An orphan learner (operator died between add and promote, or someone added it).
    for (id, m) in &c.members {
        if m.role == Role::Learner {
            let kind = if u64::from(o.desired) >= *id && *id == top {
                OperationKind::ScaleUp
            } else {
                OperationKind::ScaleDown
            };
            return Action::Record(Some(op(kind, *id)));
        }
    }
    let desired = u64::from(o.desired);
    // Pods beyond the members (StatefulSet grown out of band or a crash before recording).
    let sts_top = u64::from(o.sts_replicas);
    if top > desired {
        return Action::Record(Some(op(OperationKind::ScaleDown, top)));
    }
    if sts_top > top && sts_top > desired {
        return Action::Record(Some(op(OperationKind::ScaleDown, sts_top)));
    }
    if top < desired {
        return Action::Record(Some(op(OperationKind::ScaleUp, top + 1)));
    }
    if sts_top < top {
        // StatefulSet shrunk out of band: bring the members' pods back.
        return Action::ScaleStatefulSet(ordinal(top) + 1);
    }
    // Volume claims left over beyond the StatefulSet (a removal interrupted long ago).
    if let Some(ord) = o
        .pvcs
        .iter()
        .find(|(ord, v)| u64::from(**ord) >= top && !v.terminating && !o.pods.contains_key(ord))
        .map(|(ord, _)| *ord)
    {
        return Action::DeletePvc(ord);
    }
    // Pods made from an older pod template (image, resources, flags): one at a time.
    if let Some(a) = next_restart(o, c) {
        return a;
    }
    Action::Done
}

#[cfg(test)]
#[path = "membership_tests.rs"]
mod tests;
