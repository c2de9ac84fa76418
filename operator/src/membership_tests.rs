//! Tests of [`decide`]: scenario unit tests, and a property test that runs the protocol
//! against a model of raft + StatefulSet + volume claims with crashes, spec changes,
//! elections, pod failures and data loss injected between any two steps.

use super::*;
use crate::crd::{Operation, OperationKind, OperationStage};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// A model of the world the operator drives.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Data {
    /// Empty volume: the node starts in join mode and waits to be added.
    Fresh,
    /// Holds member state.
    Member,
    /// The member applied its own removal: the node refuses to start.
    Tombstone,
}

#[derive(Clone, Debug)]
struct Pod {
    uid: String,
    running: bool,
    terminating: bool,
    /// The pod template it was made from.
    template: u64,
}

#[derive(Clone, Debug)]
struct Pvc {
    uid: String,
    terminating: bool,
    data: Data,
}

#[derive(Clone, Debug)]
struct Model {
    desired: u32,
    sts: u32,
    pods: BTreeMap<u32, Pod>,
    pvcs: BTreeMap<u32, Pvc>,
    /// id -> (role, caught up)
    members: BTreeMap<u64, (Role, bool)>,
    leader: u64,
    /// Members whose pods are down (crashed, not yet restarted).
    down: BTreeSet<u64>,
    /// Members up and voting whose `/v1/status` times out: the operator sees them
    /// unhealthy.
    flaky: BTreeSet<u64>,
    commit: u64,
    /// Every voter's latest snapshot index (logs hold only entries after it).
    snapshot: u64,
    /// Index at which each id was last removed from raft.
    removed_at: BTreeMap<u64, u64>,
    operation: Option<Operation>,
    incarnations: BTreeMap<u64, String>,
    /// The StatefulSet's pod template now.
    template: u64,
    /// Templates whose pods never start (a bad image), or are never even created.
    bad_templates: BTreeSet<u64>,
    /// Templates the API server refuses to create pods from (a quota, a policy): also
    /// in `bad_templates`.
    refused_templates: BTreeSet<u64>,
    next_uid: u64,
    /// Every violation of a safety invariant seen.
    violations: Vec<String>,
}

impl Model {
    /// A bootstrapped cluster of `n` voters.
    fn new(n: u32) -> Model {
        let mut m = Model {
            desired: n,
            sts: n,
            pods: BTreeMap::new(),
            pvcs: BTreeMap::new(),
            members: BTreeMap::new(),
            leader: 1,
            down: BTreeSet::new(),
            flaky: BTreeSet::new(),
            commit: 10,
            snapshot: 10,
            removed_at: BTreeMap::new(),
            operation: None,
            incarnations: BTreeMap::new(),
            template: 0,
            bad_templates: BTreeSet::new(),
            refused_templates: BTreeSet::new(),
            next_uid: 0,
            violations: Vec::new(),
        };
        for ord in 0..n {
            let pvc = m.uid();
            let pod = m.uid();
            m.pvcs.insert(ord, Pvc { uid: pvc.clone(), terminating: false, data: Data::Member });
            m.pods.insert(ord, Pod { uid: pod, running: true, terminating: false, template: 0 });
            m.members.insert(u64::from(ord) + 1, (Role::Voter, true));
            m.incarnations.insert(u64::from(ord) + 1, pvc);
        }
        m
    }

    fn uid(&mut self) -> String {
        self.next_uid += 1;
        format!("u{}", self.next_uid)
    }

    fn node_up(&self, id: u64) -> bool {
        let ord = ordinal(id);
        !self.down.contains(&id)
            && self.pods.get(&ord).is_some_and(|p| p.running && !p.terminating)
            && self.pvcs.get(&ord).is_some_and(|v| v.data != Data::Tombstone)
    }

    /// A member whose volume no longer holds its state.
    fn amnesiac(&self, id: u64) -> bool {
        self.pvcs.get(&ordinal(id)).is_none_or(|v| v.data != Data::Member)
    }

    /// After a fault was applied: a quorum is left, and the good voters would still be a
    /// majority with one voter fewer (faults are only injected where that holds).
    fn fault_tolerated(&self) -> bool {
        self.has_quorum() && self.good_voters() >= majority(self.voters().saturating_sub(1))
    }

    /// Voters that are up and remember their log.
    fn good_voters(&self) -> usize {
        self.members
            .iter()
            .filter(|(id, (r, _))| *r == Role::Voter && self.node_up(**id) && !self.amnesiac(**id))
            .count()
    }

    fn voters(&self) -> usize {
        self.members.values().filter(|(r, _)| *r == Role::Voter).count()
    }

    fn has_quorum(&self) -> bool {
        self.good_voters() >= majority(self.voters())
    }

    fn observe(&self) -> Observed {
        let answering: Vec<u64> = self.members.keys().copied().filter(|id| self.node_up(*id)).collect();
        let cluster = if answering.is_empty() {
            None
        } else {
            let leader = if self.has_quorum() && self.node_up(self.leader) { self.leader } else { 0 };
            let members = self
                .members
                .iter()
                .map(|(id, (role, caught))| {
                    let up = self.node_up(*id) && !self.flaky.contains(id);
                    let amnesiac = self.amnesiac(*id);
                    let inc = self.pvcs.get(&ordinal(*id)).map(|v| v.uid.clone());
                    let applied = if amnesiac || (*role == Role::Learner && !caught) { 0 } else { self.commit };
                    // A voter that restarted is behind until it acknowledged what it missed.
                    let match_index = match (*caught, amnesiac, *role) {
                        (true, false, _) => Some(self.commit),
                        (false, false, Role::Voter) => None,
                        _ => Some(0),
                    };
                    (
                        *id,
                        MemberView {
                            role: *role,
                            match_index,
                            healthy: up,
                            applied_index: up.then_some(applied),
                            incarnation: if up { inc } else { None },
                            snapshot_index: up.then_some(self.snapshot),
                            leader: up.then_some(leader),
                        },
                    )
                })
                .collect();
            Some(ClusterView { leader, commit_index: self.commit, members })
        };
        Observed {
            desired: self.desired,
            sts_replicas: self.sts,
            pods: self
                .pods
                .iter()
                .map(|(o, p)| {
                    let template_hash = Some(p.template.to_string());
                    (*o, PodView { running: p.running, terminating: p.terminating, uid: p.uid.clone(), template_hash })
                })
                .collect(),
            pvcs: self
                .pvcs
                .iter()
                .map(|(o, v)| (*o, PvcView { uid: v.uid.clone(), terminating: v.terminating }))
                .collect(),
            cluster,
            operation: self.operation.clone(),
            incarnations: self.incarnations.clone(),
            // The controller's status.members is the membership of its last reconcile.
            recorded_top: pods_needed_top(self.members.iter().map(|(id, (r, _))| (*id, *r == Role::Voter)), self.desired),
            template_hash: Some(self.template.to_string()),
            recorded_members: self.members.keys().copied().collect(),
        }
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// Carries out an action as the real executor would (API calls are atomic).
    fn apply(&mut self, a: &Action) {
        match a {
            Action::Record(op) => self.operation = op.clone(),
            Action::RecordIncarnation { id, incarnation } => {
                self.incarnations.insert(*id, incarnation.clone());
            }
            Action::MarkRemoved { id, at } => {
                self.incarnations.insert(*id, format!("{REMOVED_PREFIX}{at}"));
            }
            Action::ScaleStatefulSet(n) => self.sts = *n,
            Action::AddLearner(id) => {
                if self.members.contains_key(id) {
                    return;
                }
                if !self.has_quorum() {
                    return; // 503: no quorum, nothing changes
                }
                let ord = ordinal(*id);
                match self.pvcs.get_mut(&ord) {
                    Some(v) if v.data == Data::Fresh && self.pods.get(&ord).is_some_and(|p| p.running) => {
                        v.data = Data::Member;
                        self.members.insert(*id, (Role::Learner, false));
                        self.commit += 1;
                    }
                    other => {
                        let what = format!("AddLearner({id}) onto a pod without a fresh volume: {other:?}");
                        self.violation(what);
                    }
                }
            }
            Action::Promote(id) => {
                let Some((role, caught)) = self.members.get(id).copied() else { return };
                if role == Role::Voter || !caught || !self.has_quorum() {
                    return; // 200 unchanged, or 409 learner_behind, or 503
                }
                self.members.insert(*id, (Role::Voter, true));
                self.commit += 1;
                if !self.has_quorum() {
                    self.violation(format!("Promote({id}) lost quorum"));
                }
            }
            Action::TransferLeader { from, to } => {
                if self.leader == *from
                    && self.node_up(*to)
                    && self.members.get(to).is_some_and(|(r, _)| *r == Role::Voter)
                {
                    self.leader = *to;
                }
            }
            Action::RemoveMember(id) => {
                if !self.members.contains_key(id) || !self.has_quorum() {
                    return;
                }
                if *id == self.leader {
                    self.violation(format!("RemoveMember({id}) of the leader"));
                }
                self.members.remove(id);
                self.commit += 1;
                self.removed_at.insert(*id, self.commit);
                if let Some(v) = self.pvcs.get_mut(&ordinal(*id)) {
                    if self.pods.get(&ordinal(*id)).is_some_and(|p| p.running) {
                        v.data = Data::Tombstone;
                    }
                }
                if !self.has_quorum() {
                    self.violation(format!("RemoveMember({id}) lost quorum"));
                }
                if self.members.values().all(|(r, _)| *r != Role::Voter) {
                    self.violation("no voter left".into());
                }
            }
            Action::DeletePvc(ord) => {
                if let Some(v) = self.pvcs.get_mut(ord) {
                    v.terminating = true;
                }
            }
            Action::DeletePod(ord) | Action::EvictPod(ord) => {
                let id = u64::from(*ord) + 1;
                if matches!(a, Action::EvictPod(_)) {
                    // The PodDisruptionBudget (maxUnavailable = voters - majority): a running
                    // pod goes only while fewer are disrupted; one that does not run while
                    // the budget is healthy (the default unhealthyPodEvictionPolicy). Both
                    // come to: the other voters' healthy pods are a majority.
                    let voters = self.voters();
                    let healthy = self
                        .members
                        .iter()
                        .filter(|(m, (r, _))| *r == Role::Voter && **m != id && self.node_up(**m))
                        .count();
                    if healthy < majority(voters) {
                        return; // 429
                    }
                }
                let was_up = self.node_up(id) && self.members.get(&id).is_some_and(|(r, _)| *r == Role::Voter);
                let had_quorum = self.has_quorum();
                let repairing = self.operation.as_ref().is_some_and(|op| op.kind == OperationKind::ReplaceAmnesiac);
                let on_bad = self
                    .pods
                    .iter()
                    .filter(|(o, p)| **o != *ord && !p.terminating && p.template == self.template)
                    .any(|(o, _)| self.members.contains_key(&(u64::from(*o) + 1)))
                    // A member whose pod the current template cannot even create.
                    || (self.refused_templates.contains(&self.template)
                        && (0..self.sts).any(|o| {
                            o != *ord && !self.pods.contains_key(&o) && self.members.contains_key(&(u64::from(o) + 1))
                        }));
                let target_on_old = self.pods.get(ord).is_some_and(|p| p.template != self.template);
                if self.members.contains_key(&id) && self.bad_templates.contains(&self.template) && on_bad && target_on_old {
                    self.violation(format!("{a:?}: a second member onto a template that does not run"));
                }
                if self.node_up(id) && !repairing && self.pods.get(ord).is_some_and(|p| p.template == self.template) {
                    self.violation(format!("DeletePod({ord}) of a running pod on the current template"));
                }
                if let Some(p) = self.pods.get_mut(ord) {
                    p.terminating = true;
                }
                if let Some((_, caught)) = self.members.get_mut(&id) {
                    *caught = false;
                }
                // One or two voters cannot restart one without losing the quorum.
                if was_up && had_quorum && !self.has_quorum() && self.voters() >= 3 {
                    self.violation(format!("DeletePod({ord}) of a voter lost quorum"));
                }
                if was_up && id == self.leader && self.voters() > 1 {
                    self.violation(format!("DeletePod({ord}) of the leader"));
                }
            }
            Action::Wait(_) | Action::Done => {}
        }
        self.check_shape();
    }

    /// Structural invariants: one change at a time.
    fn check_shape(&mut self) {
        let learners = self.members.values().filter(|(r, _)| *r == Role::Learner).count();
        if learners > 1 {
            self.violation(format!("{learners} learners at once: {:?}", self.members));
        }
        let top = self.members.keys().next_back().copied().unwrap_or(0);
        let gaps: Vec<u64> = (1..=top).filter(|id| !self.members.contains_key(id)).collect();
        if gaps.len() > 1 {
            self.violation(format!("two members missing at once: {gaps:?}"));
        }
    }

    /// The Kubernetes side moves on: StatefulSet controller, kubelet, PVC protection,
    /// learners catching up.
    fn progress(&mut self) {
        // Pods going away.
        let gone: Vec<u32> = self.pods.iter().filter(|(_, p)| p.terminating).map(|(o, _)| *o).collect();
        for o in gone {
            self.pods.remove(&o);
        }
        for (o, p) in self.pods.iter_mut() {
            if *o >= self.sts {
                p.terminating = true;
            }
        }
        // Claims go once no pod uses them.
        let free: Vec<u32> =
            self.pvcs.iter().filter(|(o, v)| v.terminating && !self.pods.contains_key(o)).map(|(o, _)| *o).collect();
        for o in free {
            self.pvcs.remove(&o);
        }
        // Pods start (only on a healthy volume, from a template that works) and get created.
        for (o, p) in self.pods.iter_mut() {
            if !p.terminating
                && !self.bad_templates.contains(&p.template)
                && self.pvcs.get(o).is_some_and(|v| v.data != Data::Tombstone && !v.terminating)
            {
                p.running = true;
            }
        }
        for o in 0..self.sts {
            if !self.pods.contains_key(&o) {
                if self.pvcs.get(&o).is_some_and(|v| v.terminating) {
                    continue;
                }
                if !self.pvcs.contains_key(&o) {
                    let uid = self.uid();
                    self.pvcs.insert(o, Pvc { uid, terminating: false, data: Data::Fresh });
                }
                if self.refused_templates.contains(&self.template) {
                    continue;
                }
                let uid = self.uid();
                self.pods.insert(o, Pod { uid, running: false, terminating: false, template: self.template });
            }
        }
        // Voters take snapshots as the log grows.
        self.snapshot = self.commit;
        let up: BTreeSet<u64> = self.members.keys().copied().filter(|id| self.node_up(*id)).collect();
        for (id, (_, caught)) in self.members.iter_mut() {
            if up.contains(id) {
                *caught = true;
            }
        }
    }

    /// Runs the pod part of `progress` again without compacting.
    fn progress_pods_only(&mut self) {
        let snap = self.snapshot;
        self.progress();
        self.snapshot = snap;
    }

    fn elect(&mut self) {
        if self.node_up(self.leader) && self.members.contains_key(&self.leader) && self.has_quorum() {
            return;
        }
        if self.has_quorum() {
            if let Some(id) = self
                .members
                .iter()
                .find(|(id, (r, _))| *r == Role::Voter && self.node_up(**id) && !self.amnesiac(**id))
                .map(|(id, _)| *id)
            {
                self.leader = id;
            }
        }
    }

    fn converged(&self) -> bool {
        let n = u64::from(self.desired);
        self.members.len() as u64 == n
            && self.members.iter().all(|(id, (r, _))| *r == Role::Voter && *id <= n)
            && self.sts == self.desired
            && self.pvcs.keys().copied().eq(0..self.desired)
            && self.pods.keys().copied().eq(0..self.desired)
            && self.operation.is_none()
            && self.members.keys().all(|id| !self.amnesiac(*id))
            && self.pods.values().all(|p| p.template == self.template)
    }
}

// ---------------------------------------------------------------------------------------
// Scenario tests.

/// `n` operator steps (elect, decide, apply), each followed by the world's progress
/// when `progress`; the actions taken.
fn run_steps(m: &mut Model, n: usize, progress: bool) -> Vec<Action> {
    let mut trace = Vec::new();
    for _ in 0..n {
        m.elect();
        let a = decide(&m.observe());
        trace.push(a.clone());
        m.apply(&a);
        if progress {
            m.progress();
        }
    }
    trace
}

fn run_until_done(m: &mut Model, max_steps: usize) -> Vec<Action> {
    let mut trace = Vec::new();
    for _ in 0..max_steps {
        m.elect();
        let a = decide(&m.observe());
        trace.push(a.clone());
        if a == Action::Done {
            return trace;
        }
        m.apply(&a);
        m.progress();
    }
    panic!("did not converge in {max_steps} steps; model {m:#?}\ntrace {trace:?}");
}

#[test]
fn steady_cluster_is_done() {
    let m = Model::new(3);
    assert_eq!(decide(&m.observe()), Action::Done);
}

#[test]
fn no_leader_waits() {
    let mut m = Model::new(3);
    m.down.insert(2);
    m.down.insert(3);
    assert_eq!(decide(&m.observe()), Action::Wait(WaitReason::NoLeader));
    m.down.insert(1);
    assert_eq!(decide(&m.observe()), Action::Wait(WaitReason::NoMemberReachable));
}

#[test]
fn quorum_taken_away_by_the_statefulset_is_given_back_without_a_leader() {
    // `kubectl scale sts --replicas=1`: two of three members lose their pods.
    let mut m = Model::new(3);
    m.sts = 1;
    m.progress();
    m.progress();
    m.elect();
    let o = m.observe();
    assert_eq!(o.cluster.as_ref().map(|c| c.leader), Some(0), "{o:?}");
    assert_eq!(decide(&o), Action::ScaleStatefulSet(3));
    // Scaled to zero: no member answers; the last recorded membership is the guide.
    m.sts = 0;
    m.progress();
    m.progress();
    let o = m.observe();
    assert!(o.cluster.is_none(), "{o:?}");
    assert_eq!(decide(&o), Action::ScaleStatefulSet(3));
    run_until_done(&mut m, 50);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
    // Before any member was ever seen there is nothing to go by.
    let mut o = m.observe();
    o.cluster = None;
    o.recorded_top = 0;
    o.sts_replicas = 0;
    assert_eq!(decide(&o), Action::Wait(WaitReason::NoMemberReachable));
}

#[test]
fn a_learner_added_by_hand_far_above_does_not_grow_the_statefulset_to_it() {
    let mut m = Model::new(3);
    m.members.insert(12, (Role::Learner, true));
    // Answered by the members: the orphan learner is removed; the StatefulSet stays at 3.
    assert_eq!(decide(&m.observe()), Action::Record(Some(Operation::new(OperationKind::ScaleDown, 12))));
    // No member answers, and the StatefulSet was shrunk: it comes back to the voters'
    // 3 pods, not to 12 for the learner recorded with them.
    m.sts = 0;
    m.progress();
    m.progress();
    let o = m.observe();
    assert!(o.cluster.is_none(), "{o:?}");
    assert_eq!(o.recorded_top, 3);
    assert_eq!(decide(&o), Action::ScaleStatefulSet(3));
    assert_eq!(pods_needed_top([(1, true), (2, true), (12, false), (4, false)], 3), 4);
    assert_eq!(pods_needed_top([(1, true), (12, true)], 3), 12, "a voter's pod is always needed");
}

#[test]
fn scale_up_records_intent_then_grows_adds_learner_promotes() {
    let mut m = Model::new(3);
    m.desired = 4;
    let mut o = m.observe();
    assert_eq!(decide(&o), Action::Record(Some(Operation::new(OperationKind::ScaleUp, 4))));
    o.operation = Some(Operation::new(OperationKind::ScaleUp, 4));
    assert_eq!(decide(&o), Action::ScaleStatefulSet(4));
    o.sts_replicas = 4;
    assert_eq!(decide(&o), Action::Wait(WaitReason::PodNotRunning(3)));
    o.pods.insert(3, PodView { running: true, terminating: false, uid: "p".into(), template_hash: Some("0".into()) });
    assert_eq!(decide(&o), Action::AddLearner(4));
    let c = o.cluster.as_mut().expect("cluster");
    c.members.insert(
        4,
        MemberView {
            role: Role::Learner,
            match_index: Some(0),
            healthy: true,
            applied_index: Some(0),
            incarnation: Some("i4".into()),
            snapshot_index: Some(0),
            leader: Some(1),
        },
    );
    assert_eq!(decide(&o), Action::Promote(4));
    o.cluster.as_mut().expect("cluster").members.get_mut(&4).expect("m4").role = Role::Voter;
    assert_eq!(decide(&o), Action::RecordIncarnation { id: 4, incarnation: "i4".into() });
    o.incarnations.insert(4, "i4".into());
    assert_eq!(decide(&o), Action::Record(None));
    let trace = run_until_done(&mut m, 50);
    assert!(m.violations.is_empty(), "{:?}", m.violations);
    assert!(m.converged(), "{m:#?} {trace:?}");
}

#[test]
fn scale_down_moves_leadership_first_and_deletes_the_claim_last() {
    let mut m = Model::new(3);
    m.leader = 3;
    m.desired = 2;
    let trace = run_until_done(&mut m, 50);
    let pos = |pred: &dyn Fn(&Action) -> bool| trace.iter().position(pred).expect("action present");
    let transfer = pos(&|a| matches!(a, Action::TransferLeader { from: 3, .. }));
    let remove = pos(&|a| *a == Action::RemoveMember(3));
    let shrink = pos(&|a| *a == Action::ScaleStatefulSet(2));
    let pvc = pos(&|a| *a == Action::DeletePvc(2));
    assert!(transfer < remove && remove < shrink && shrink < pvc, "{trace:?}");
    assert!(m.violations.is_empty(), "{:?}", m.violations);
    assert!(m.converged());
}

#[test]
fn scale_down_waits_when_quorum_would_be_lost() {
    let mut m = Model::new(3);
    m.down.insert(2);
    m.desired = 2;
    m.operation = Some(Operation::new(OperationKind::ScaleDown, 3));
    // Voters {1,2,3} with 2 down: removing 3 leaves {1,2} with one healthy member.
    assert_eq!(decide(&m.observe()), Action::Wait(WaitReason::WouldLoseQuorum(3)));
    m.down.clear();
    assert_eq!(decide(&m.observe()), Action::RemoveMember(3));
}

#[test]
fn removing_a_down_member_is_allowed_when_the_rest_hold_quorum() {
    let mut m = Model::new(3);
    m.down.insert(3);
    m.desired = 2;
    m.operation = Some(Operation::new(OperationKind::ScaleDown, 3));
    assert_eq!(decide(&m.observe()), Action::RemoveMember(3));
}

#[test]
fn orphan_learner_is_promoted_or_removed() {
    let mut m = Model::new(3);
    m.sts = 4;
    m.progress();
    m.progress();
    m.desired = 4;
    m.apply(&Action::AddLearner(4));
    assert_eq!(decide(&m.observe()), Action::Record(Some(Operation::new(OperationKind::ScaleUp, 4))));
    m.desired = 3;
    assert_eq!(decide(&m.observe()), Action::Record(Some(Operation::new(OperationKind::ScaleDown, 4))));
    run_until_done(&mut m, 50);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn crash_after_raft_removal_before_statefulset_shrink_converges() {
    let mut m = Model::new(5);
    m.desired = 3;
    // Run until member 5 is removed from raft, then "crash" (no in-memory state exists).
    for _ in 0..20 {
        let a = decide(&m.observe());
        m.apply(&a);
        if a == Action::RemoveMember(5) {
            break;
        }
    }
    assert!(!m.members.contains_key(&5) && m.sts == 5);
    assert_eq!(decide(&m.observe()), Action::ScaleStatefulSet(4));
    run_until_done(&mut m, 80);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn spec_change_mid_scale_up_is_latched_and_undone() {
    let mut m = Model::new(3);
    m.desired = 5;
    // Until member 4 is a learner.
    for _ in 0..20 {
        let a = decide(&m.observe());
        m.apply(&a);
        m.progress();
        if m.members.get(&4).is_some_and(|(r, _)| *r == Role::Learner) {
            break;
        }
    }
    m.desired = 3;
    assert_eq!(decide(&m.observe()), Action::Record(Some(Operation::new(OperationKind::ScaleDown, 4))));
    run_until_done(&mut m, 80);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn amnesiac_member_is_removed_wiped_and_re_added() {
    let mut m = Model::new(3);
    // Member 2 lost its volume: new claim, fresh data, new pod.
    let uid = m.uid();
    m.pvcs.insert(1, Pvc { uid, terminating: false, data: Data::Fresh });
    let uid = m.uid();
    m.pods.insert(1, Pod { uid, running: true, terminating: false, template: m.template });
    let a = decide(&m.observe());
    assert_eq!(a, Action::Record(Some(Operation::new(OperationKind::ReplaceAmnesiac, 2))));
    let trace = run_until_done(&mut m, 80);
    assert!(trace.contains(&Action::RemoveMember(2)), "{trace:?}");
    assert!(trace.contains(&Action::AddLearner(2)), "{trace:?}");
    assert!(trace.contains(&Action::Promote(2)), "{trace:?}");
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn voter_reporting_applied_zero_is_amnesiac_even_without_recorded_incarnation() {
    let mut m = Model::new(3);
    m.incarnations.clear();
    m.pvcs.get_mut(&2).expect("pvc").data = Data::Fresh;
    assert_eq!(
        decide(&m.observe()),
        Action::Record(Some(Operation::new(OperationKind::ReplaceAmnesiac, 3)))
    );
}

#[test]
fn member_removed_out_of_band_is_re_added_cleanly() {
    let mut m = Model::new(3);
    m.members.remove(&2);
    m.pvcs.get_mut(&1).expect("pvc").data = Data::Tombstone;
    m.pods.get_mut(&1).expect("pod").running = false;
    assert_eq!(
        decide(&m.observe()),
        Action::Record(Some(Operation::new(OperationKind::ReplaceAmnesiac, 2).at(OperationStage::Removed)))
    );
    run_until_done(&mut m, 80);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn leftover_claim_is_deleted_before_its_ordinal_is_reused() {
    let mut m = Model::new(3);
    let uid = m.uid();
    m.pvcs.insert(3, Pvc { uid, terminating: false, data: Data::Tombstone });
    assert_eq!(decide(&m.observe()), Action::DeletePvc(3));
    m.desired = 4;
    m.operation = Some(Operation::new(OperationKind::ScaleUp, 4));
    assert_eq!(decide(&m.observe()), Action::DeletePvc(3));
    run_until_done(&mut m, 50);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn majority_sizes() {
    assert_eq!(majority(1), 1);
    assert_eq!(majority(2), 2);
    assert_eq!(majority(3), 2);
    assert_eq!(majority(4), 3);
    assert_eq!(majority(5), 3);
}

// ---------------------------------------------------------------------------------------
// Property test: random interleavings of operator steps, crashes and world events.

/// What a changed pod template does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TemplateKind {
    /// Its pods run.
    Works,
    /// Its pods are created but never run (a bad image).
    NeverRuns,
    /// The API server refuses to create its pods (a quota, a policy).
    Refused,
}

#[derive(Clone, Debug)]
enum Event {
    /// The operator takes one step (decide + execute).
    Step,
    /// The operator dies after deciding, before executing; it restarts from status.
    CrashBeforeExecute,
    /// The StatefulSet controller and kubelet move on.
    Progress,
    /// A user changes spec.replicas.
    SetReplicas(u32),
    /// A member's pod crashes (only when the rest keep a healthy majority).
    PodDown(u64),
    /// Crashed pods come back; API calls stop timing out.
    PodsUp,
    /// A member's `/v1/status` times out (it still votes, and may lead).
    Flaky(u64),
    /// A member's container crashes (only when the rest keep a healthy majority); the
    /// kubelet restarts it at the next `Progress`.
    ContainerCrash(u64),
    /// Leadership moves to some healthy voter.
    Election(u64),
    /// A member's volume is lost (only when the rest keep a healthy majority).
    LoseVolume(u64),
    /// Someone runs `kubectl scale sts --replicas=n` (may take the quorum away).
    ShrinkStatefulSet(u32),
    /// A user changes the pod template (image, resources).
    ChangeTemplate(TemplateKind),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        8 => Just(Event::Step),
        2 => Just(Event::CrashBeforeExecute),
        4 => Just(Event::Progress),
        1 => (1u32..=9).prop_map(Event::SetReplicas),
        1 => (1u64..=9).prop_map(Event::PodDown),
        2 => Just(Event::PodsUp),
        1 => (1u64..=9).prop_map(Event::Flaky),
        1 => (1u64..=9).prop_map(Event::ContainerCrash),
        1 => (1u64..=9).prop_map(Event::Election),
        1 => (1u64..=9).prop_map(Event::LoseVolume),
        1 => (0u32..=4).prop_map(Event::ShrinkStatefulSet),
        1 => prop_oneof![7 => Just(TemplateKind::Works), 2 => Just(TemplateKind::NeverRuns), 1 => Just(TemplateKind::Refused)]
            .prop_map(Event::ChangeTemplate),
    ]
}

impl Model {
    fn world(&mut self, e: &Event) {
        match e {
            Event::Step => {
                let a = decide(&self.observe());
                self.apply(&a);
            }
            Event::CrashBeforeExecute => {
                let _ = decide(&self.observe());
            }
            Event::Progress => self.progress(),
            Event::SetReplicas(n) => self.desired = *n,
            Event::PodDown(id) => {
                if self.members.contains_key(id) && !self.down.contains(id) {
                    self.down.insert(*id);
                    if !self.fault_tolerated() {
                        self.down.remove(id);
                    }
                }
            }
            Event::PodsUp => {
                self.down.clear();
                self.flaky.clear();
            }
            Event::Flaky(id) => {
                if self.members.contains_key(id) {
                    self.flaky.insert(*id);
                }
            }
            Event::ContainerCrash(id) => {
                // As PodDown: only when the rest keep a healthy majority.
                let ord = ordinal(*id);
                if self.members.contains_key(id) {
                    if let Some(p) = self.pods.get_mut(&ord).filter(|p| p.running) {
                        p.running = false;
                        if !self.fault_tolerated() {
                            if let Some(p) = self.pods.get_mut(&ord) {
                                p.running = true;
                            }
                        }
                    }
                }
            }
            Event::ShrinkStatefulSet(n) => self.sts = self.sts.min(*n),
            Event::ChangeTemplate(kind) => {
                self.template += 1;
                if *kind != TemplateKind::Works {
                    self.bad_templates.insert(self.template);
                }
                if *kind == TemplateKind::Refused {
                    self.refused_templates.insert(self.template);
                }
            }
            Event::Election(id) => {
                if self.node_up(*id)
                    && !self.amnesiac(*id)
                    && self.members.get(id).is_some_and(|(r, _)| *r == Role::Voter)
                {
                    self.leader = *id;
                }
            }
            Event::LoseVolume(id) => {
                // Only a voter that is not the leader, one fault at a time, and only when
                // the others keep a healthy majority even counting one more failure.
                let ord = ordinal(*id);
                let eligible = *id != self.leader
                    && self.operation.is_none()
                    && self.down.is_empty()
                    && self.members.get(id).is_some_and(|(r, _)| *r == Role::Voter)
                    && self.members.keys().all(|m| !self.amnesiac(*m))
                    && self.good_voters() > majority(self.voters());
                if eligible {
                    let uid = self.uid();
                    self.pvcs.insert(ord, Pvc { uid, terminating: false, data: Data::Fresh });
                    // The container restarts on the wiped volume, in the same pod.
                    let template = self.pods.get(&ord).map_or(self.template, |p| p.template);
                    let uid = self.uid();
                    self.pods.insert(ord, Pod { uid, running: !self.bad_templates.contains(&template), terminating: false, template });
                }
            }
        }
        self.elect();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn converges_from_any_interleaving(
        initial in 1u32..=5,
        events in proptest::collection::vec(event(), 0..120),
        last in 1u32..=9,
    ) {
        let mut m = Model::new(initial);
        for e in &events {
            m.world(e);
            prop_assert!(m.violations.is_empty(), "violations {:?} after {:?}", m.violations, e);
        }
        // Faults stop; the last spec stands (a working template); the operator must converge.
        m.down.clear();
        m.flaky.clear();
        m.desired = last;
        if m.bad_templates.contains(&m.template) {
            m.template += 1;
        }
        m.elect();
        let mut done = false;
        for _ in 0..400 {
            m.elect();
            let a = decide(&m.observe());
            if a == Action::Done {
                // Done is "nothing for the operator to do": the StatefulSet may still be
                // creating pods (a step's, or ones it re-creates after an out-of-band
                // shrink). Let the world settle: one pass creates them, one starts them.
                m.progress();
                m.progress();
                m.elect();
                if decide(&m.observe()) == Action::Done {
                    done = true;
                    break;
                }
                continue;
            }
            m.apply(&a);
            m.progress();
            prop_assert!(m.violations.is_empty(), "violations {:?} after {:?}", m.violations, a);
        }
        prop_assert!(done, "no convergence: {:#?}", m);
        prop_assert!(m.converged(), "done but not converged: {:#?}", m);
    }
}

#[test]
fn reused_id_is_added_again_without_waiting_for_compaction() {
    let mut m = Model::new(3);
    m.desired = 2;
    run_until_done(&mut m, 50);
    assert_eq!(m.incarnations.get(&3).map(String::as_str), Some("removed@11"));
    m.desired = 3;
    m.snapshot = 5; // the voters' logs still hold the removal at index 11
    m.operation = Some(Operation::new(OperationKind::ScaleUp, 3));
    m.sts = 3;
    m.progress();
    m.snapshot = 5;
    m.progress_pods_only();
    assert_eq!(decide(&m.observe()), Action::AddLearner(3));
    run_until_done(&mut m, 50);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn an_amnesiac_member_found_during_a_scale_down_is_replaced_first() {
    // The scale-down of 3 was recorded while amnesiac member 2 was down. Removing 3 with
    // 2 counted healthy would leave {1, 2} with one good copy of the log: no quorum.
    let mut m = Model::new(3);
    for e in [Event::LoseVolume(2), Event::ShrinkStatefulSet(0), Event::Step, Event::PodDown(2), Event::SetReplicas(1), Event::Step] {
        m.world(&e);
    }
    assert_eq!(m.operation.as_ref().map(|o| (o.kind, o.id)), Some((OperationKind::ScaleDown, 3)), "{m:#?}");
    m.down.clear();
    m.elect();
    assert_eq!(decide(&m.observe()), Action::Record(Some(Operation::new(OperationKind::ReplaceAmnesiac, 2))));
    run_until_done(&mut m, 80);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

// ---------------------------------------------------------------------------------------
// Restarts onto a new pod template.

/// Ordinals of the pods deleted in `trace`, in order.
fn deleted_pods(trace: &[Action]) -> Vec<u32> {
    trace.iter().filter_map(|a| if let Action::DeletePod(o) | Action::EvictPod(o) = a { Some(*o) } else { None }).collect()
}

#[test]
fn a_new_pod_template_restarts_followers_one_at_a_time_then_the_leader() {
    let mut m = Model::new(3);
    m.leader = 3;
    m.template = 1;
    let o = m.observe();
    let restart = |id: u64, uid: &str| {
        Action::Record(Some(Operation { pod_uid: Some(uid.into()), ..Operation::new(OperationKind::Restart, id) }))
    };
    // The highest follower first; the leader, 3, last.
    let uid2 = o.pods[&1].uid.clone();
    assert_eq!(decide(&o), restart(2, &uid2));
    m.apply(&decide(&o));
    // A running pod of three voters goes by eviction (the budget allows one).
    assert_eq!(decide(&m.observe()), Action::EvictPod(1));
    m.apply(&Action::EvictPod(1));
    // While its pod is replaced and its member comes back, nothing else happens.
    m.progress_pods_only(); // old pod gone, new one created
    m.elect();
    assert_eq!(decide(&m.observe()), Action::Wait(WaitReason::PodNotRunning(1)));
    m.down.insert(2); // running, but the member does not answer yet
    m.progress_pods_only();
    assert_eq!(decide(&m.observe()), Action::Wait(WaitReason::MemberRecovering(2)));
    m.down.clear();
    // It follows the leader again but has not acknowledged what it missed.
    assert_eq!(decide(&m.observe()), Action::Wait(WaitReason::MemberRecovering(2)));
    m.progress_pods_only();
    assert_eq!(decide(&m.observe()), Action::Record(None));
    let trace = run_until_done(&mut m, 60);
    assert_eq!(deleted_pods(&trace), [0, 2], "{trace:?}");
    let transfer = trace.iter().position(|a| matches!(a, Action::TransferLeader { from: 3, .. }));
    let delete_leader = trace.iter().position(|a| *a == Action::EvictPod(2));
    assert!(transfer.is_some() && transfer < delete_leader, "leadership moves before its pod goes: {trace:?}");
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn a_restart_waits_for_every_member_to_be_healthy_but_a_member_down_goes_first() {
    let mut m = Model::new(5);
    m.template = 1;
    m.down.insert(2);
    m.down.insert(4);
    // Members 2 and 4 are down anyway: the lower one restarts first (the others stay
    // a healthy majority of five).
    let a = decide(&m.observe());
    assert!(matches!(&a, Action::Record(Some(op)) if op.kind == OperationKind::Restart && op.id == 2), "{a:?}");
    // Once the down members were restarted, the rest waits while one is unhealthy.
    let mut m = Model::new(3);
    m.template = 1;
    for o in 0..3 {
        m.pods.get_mut(&o).expect("pod").template = if o == 1 { 1 } else { 0 };
    }
    m.down.insert(2);
    assert_eq!(decide(&m.observe()), Action::Wait(WaitReason::RestartWaitsForHealth(1)));
    m.down.clear();
    run_until_done(&mut m, 60);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn a_template_whose_pods_never_start_stops_the_roll_and_a_fixed_one_resumes_it() {
    let mut m = Model::new(3);
    m.template = 1;
    m.bad_templates.insert(1);
    let trace = run_steps(&mut m, 40, true);
    assert_eq!(deleted_pods(&trace), [2], "only one member is taken down: {trace:?}");
    assert_eq!(trace.last(), Some(&Action::Wait(WaitReason::PodNotRunning(2))));
    assert!(m.violations.is_empty(), "{m:#?}");
    // The user fixes the image: the stuck pod is replaced at once, then the others roll.
    m.template = 2;
    let trace = run_until_done(&mut m, 80);
    assert_eq!(deleted_pods(&trace).first(), Some(&2), "{trace:?}");
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn a_single_member_is_restarted_and_unknown_templates_restart_nothing() {
    let mut m = Model::new(1);
    m.template = 1;
    let trace = run_until_done(&mut m, 20);
    assert_eq!(deleted_pods(&trace), [0], "{trace:?}");
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
    let mut m = Model::new(3);
    m.template = 1;
    let mut o = m.observe();
    o.template_hash = None;
    assert_eq!(decide(&o), Action::Done, "no template hash known: no restart");
}

#[test]
fn a_restart_of_a_member_removed_meanwhile_ends() {
    let mut m = Model::new(3);
    m.operation = Some(Operation { pod_uid: Some("gone".into()), ..Operation::new(OperationKind::Restart, 3) });
    m.members.remove(&3);
    assert_eq!(decide(&m.observe()), Action::Record(None));
}

#[test]
fn an_eviction_the_budget_refuses_changes_nothing_and_is_retried() {
    let mut m = Model::new(3);
    m.template = 1;
    m.apply(&decide(&m.observe())); // Restart of 3 recorded
    // A node drain takes member 1's pod meanwhile; the budget (one disruption) is spent.
    m.down.insert(1);
    let before = m.pods[&2].uid.clone();
    m.apply(&Action::EvictPod(2));
    assert!(!m.pods[&2].terminating && m.pods[&2].uid == before, "refused: nothing changed");
    // decide() itself waits too: the others are no healthy majority without member 1.
    m.elect();
    assert!(matches!(decide(&m.observe()), Action::Wait(_) | Action::TransferLeader { .. }), "{:?}", decide(&m.observe()));
    m.down.clear();
    run_until_done(&mut m, 60);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}


#[test]
fn an_amnesia_repair_inside_a_scale_up_settles_the_waiting_learner_first() {
    // Found by the model: member 4 loses its data while the scale-up to 6 waits to
    // promote learner 6 (two members look down). The repair takes over, removes 4 and
    // must not re-add it while learner 6 still waits: two learners at once.
    let mut m = Model::new(5);
    for e in [
        Event::LoseVolume(4),
        Event::SetReplicas(6),
        Event::ShrinkStatefulSet(3),
        Event::Progress,
        Event::Step,
        Event::Step,
        Event::Step,
        Event::Progress,
        Event::Progress,
        Event::Step,
        Event::PodDown(5),
        Event::Flaky(1),
        Event::Step,
        Event::Step,
        Event::Progress,
        Event::Step,
    ] {
        m.world(&e);
        assert!(m.violations.is_empty(), "violations {:?} after {e:?}: {m:#?}", m.violations);
    }
    m.down.clear();
    m.flaky.clear();
    m.elect();
    run_until_done(&mut m, 120);
    assert!(m.converged() && m.violations.is_empty(), "{m:#?}");
}

#[test]
fn a_template_whose_pods_are_never_created_is_not_proven_by_their_absence() {
    // Five members; the new template's pods are refused at creation (say, a quota): the
    // first member restarted never comes back, and the roll stops there.
    let mut m = Model::new(5);
    m.template = 1;
    m.bad_templates.insert(1);
    m.refused_templates.insert(1);
    let trace = run_steps(&mut m, 40, true);
    let first = deleted_pods(&trace);
    assert_eq!(first.len(), 1, "one member is taken down: {trace:?}");
    assert!(!m.pods.contains_key(&first[0]), "its pod is never created");
    // Another member's container now crashes on the old template, and stays down: it
    // must not be moved onto the template that cannot even create its pod.
    let other = (0..5u32).find(|o| *o != first[0] && u64::from(*o) + 1 != m.leader).expect("a follower");
    if let Some(p) = m.pods.get_mut(&other) {
        p.running = false;
    }
    let trace = run_steps(&mut m, 20, false);
    assert!(deleted_pods(&trace).is_empty(), "no second member goes: {trace:?}");
    assert!(m.violations.is_empty(), "{:?}", m.violations);
}
