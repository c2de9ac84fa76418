//! Orchestration shared by the Kubernetes controller and the process-level tests:
//! observing the raft cluster through the node API ([`observe_cluster`]) and executing one
//! [`Action`] chosen by [`decide`](crate::membership::decide) ([`execute`]).
//!
//! The platform side (StatefulSet, claims, pods, the status record) is the [`Platform`]
//! trait; the node side is [`NodeApi`]; addresses come from [`Addresses`].

use std::collections::BTreeMap;
use std::future::Future;

use futures::future::join_all;

use crate::crd::Operation;
use crate::membership::{Action, ClusterView, MemberView, Role};
use crate::node_client::{Members, NodeApi, NodeError, NodeStatus, Promotion};

/// Where members are reached.
pub trait Addresses: Send + Sync {
    /// Client API base URL of raft id `id`.
    fn client_url(&self, id: u64) -> String;
    /// Peer URL of raft id `id`.
    fn peer_url(&self, id: u64) -> String;
}

/// Errors of the platform side.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlatformError(pub String);

/// The non-raft side the executor changes.
pub trait Platform: Send + Sync {
    /// Persist the operation in flight (None: clear it).
    fn record(&self, op: Option<&Operation>) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Persist a member's incarnation (None: forget it).
    fn record_incarnation(
        &self,
        id: u64,
        incarnation: Option<&str>,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Set the number of pods.
    fn scale(&self, replicas: u32) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Delete the volume claim of an ordinal (absent is success).
    fn delete_pvc(&self, ordinal: u32) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Delete the pod of an ordinal (absent is success).
    fn delete_pod(&self, ordinal: u32) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Evict the pod of an ordinal (absent is success): false when the disruption budget
    /// refuses it for now.
    fn evict_pod(&self, ordinal: u32) -> impl Future<Output = Result<bool, PlatformError>> + Send;
}

/// Errors executing a step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A node refused or could not be reached.
    #[error("node API: {0}")]
    Node(#[from] NodeError),
    /// The platform refused.
    #[error("platform: {0}")]
    Platform(#[from] PlatformError),
    /// The action needs a leader and there is none.
    #[error("no leader to send {0:?} to")]
    NoLeader(Action),
}

/// What executing a step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The action was carried out.
    Applied,
    /// The cluster is not ready for it yet (a learner still catching up, an eviction the
    /// disruption budget refused).
    NotYet,
    /// Nothing to do (Wait / Done).
    Idle,
}

/// Observes the cluster: asks candidates for the members list until one knows a leader
/// (then re-asks the leader itself), then each member's `/v1/status`.
/// Returns None when no candidate answers.
pub async fn observe_cluster<N: NodeApi, A: Addresses>(node: &N, addrs: &A, candidates: &[u64]) -> Option<ClusterView> {
    let mut view = None;
    for id in candidates {
        match node.members(&addrs.client_url(*id)).await {
            Ok(m) if m.leader == 0 => {
                // A member cut off from the leader: keep its answer only as a fallback.
                if view.is_none() {
                    view = Some(m);
                }
            }
            Ok(m) => {
                let leader = m.leader;
                if leader != *id {
                    // Re-ask the leader itself: match indexes and reachability are its view.
                    match node.members(&addrs.client_url(leader)).await {
                        Ok(lm) => view = Some(lm),
                        // A follower that could not reach the leader either answers from
                        // its own view (no progress at all), which may lag the leader's
                        // by membership changes it has not applied yet: not a view to
                        // change the membership on. Kept as a leaderless one (its members
                        // still guide what needs no leader).
                        Err(_) if m.members.iter().all(|x| x.match_index.is_none()) => {
                            view = Some(Members { leader: 0, commit_index: None, ..m });
                            continue;
                        }
                        // The leader's view, passed on by the follower over the peer port.
                        Err(_) => view = Some(m),
                    }
                } else {
                    view = Some(m);
                }
                break;
            }
            Err(e) => tracing::debug!(id, error = %e, "members query failed"),
        }
    }
    let members = view?;
    let ids: Vec<u64> = members.members.iter().map(|m| m.id).collect();
    let statuses: Vec<Result<NodeStatus, NodeError>> =
        join_all(ids.iter().map(|id| {
            let url = addrs.client_url(*id);
            async move { node.status(&url).await }
        }))
        .await;
    let statuses: BTreeMap<u64, NodeStatus> =
        ids.iter().zip(statuses).filter_map(|(id, s)| s.ok().filter(|s| s.id == *id).map(|s| (*id, s))).collect();
    // The leader's commit index from the same answer as its match indexes (compared with
    // them: a later one would make a caught-up member look behind under load).
    let commit_index = members
        .commit_index
        .filter(|_| members.leader != 0)
        .or_else(|| statuses.get(&members.leader).map(|s| s.commit_index))
        .unwrap_or_else(|| statuses.values().map(|s| s.commit_index).max().unwrap_or(0));
    let view = ClusterView {
        leader: members.leader,
        commit_index,
        members: members
            .members
            .iter()
            .map(|m| {
                let st = statuses.get(&m.id);
                (
                    m.id,
                    MemberView {
                        role: if m.role == "learner" { Role::Learner } else { Role::Voter },
                        match_index: m.match_index,
                        healthy: st.is_some() && m.reachable != Some(false),
                        applied_index: st.map(|s| s.applied_index),
                        incarnation: st.map(|s| s.incarnation.clone()).filter(|i| !i.is_empty()),
                        snapshot_index: st.map(|s| s.snapshot_index),
                        leader: st.map(|s| s.leader),
                    },
                )
            })
            .collect(),
    };
    Some(view)
}

/// Executes one action. Node actions go to the leader `leader`.
pub async fn execute<N: NodeApi, P: Platform, A: Addresses>(
    node: &N,
    platform: &P,
    addrs: &A,
    leader: u64,
    action: &Action,
) -> Result<Outcome, StepError> {
    let leader_url = || {
        if leader == 0 {
            Err(StepError::NoLeader(action.clone()))
        } else {
            Ok(addrs.client_url(leader))
        }
    };
    match action {
        Action::Record(op) => platform.record(op.as_ref()).await?,
        Action::RecordIncarnation { id, incarnation } => platform.record_incarnation(*id, Some(incarnation)).await?,
        Action::MarkRemoved { id, at } => {
            let marker = format!("{}{at}", crate::membership::REMOVED_PREFIX);
            platform.record_incarnation(*id, Some(&marker)).await?
        }
        Action::ScaleStatefulSet(n) => platform.scale(*n).await?,
        Action::DeletePvc(o) => platform.delete_pvc(*o).await?,
        Action::DeletePod(o) => platform.delete_pod(*o).await?,
        Action::EvictPod(o) => {
            if !platform.evict_pod(*o).await? {
                return Ok(Outcome::NotYet);
            }
        }
        Action::AddLearner(id) => node.add_learner(&leader_url()?, *id, &addrs.peer_url(*id)).await?,
        Action::Promote(id) => {
            if node.promote(&leader_url()?, *id).await? == Promotion::Behind {
                return Ok(Outcome::NotYet);
            }
        }
        Action::TransferLeader { to, .. } => node.transfer_leader(&leader_url()?, *to).await?,
        Action::RemoveMember(id) => node.remove(&leader_url()?, *id).await?,
        Action::Wait(_) | Action::Done => return Ok(Outcome::Idle),
    }
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::crd::OperationKind;
    use crate::membership::WaitReason;
    use crate::node_client::Member;

    /// Node `i` answers on `http://n<i>`; per-node members views and statuses.
    #[derive(Default)]
    struct Fake {
        views: BTreeMap<u64, Members>,
        statuses: BTreeMap<u64, NodeStatus>,
        calls: Mutex<Vec<String>>,
        promote_behind: bool,
    }

    fn id(base: &str) -> u64 {
        base.trim_start_matches("http://n").parse().unwrap_or(0)
    }

    fn down(base: &str) -> NodeError {
        NodeError::Unreachable { url: base.into(), reason: "down".into() }
    }

    impl Fake {
        fn log(&self, s: String) {
            if let Ok(mut c) = self.calls.lock() {
                c.push(s);
            }
        }
    }

    impl NodeApi for Fake {
        async fn status(&self, b: &str) -> Result<NodeStatus, NodeError> {
            self.statuses.get(&id(b)).cloned().ok_or_else(|| down(b))
        }
        async fn members(&self, b: &str) -> Result<Members, NodeError> {
            self.views.get(&id(b)).cloned().ok_or_else(|| down(b))
        }
        async fn add_learner(&self, b: &str, m: u64, url: &str) -> Result<(), NodeError> {
            self.log(format!("add {m} {url} @{}", id(b)));
            Ok(())
        }
        async fn promote(&self, b: &str, m: u64) -> Result<Promotion, NodeError> {
            self.log(format!("promote {m} @{}", id(b)));
            Ok(if self.promote_behind { Promotion::Behind } else { Promotion::Done })
        }
        async fn remove(&self, b: &str, m: u64) -> Result<(), NodeError> {
            self.log(format!("remove {m} @{}", id(b)));
            Ok(())
        }
        async fn transfer_leader(&self, b: &str, to: u64) -> Result<(), NodeError> {
            self.log(format!("transfer {to} @{}", id(b)));
            Ok(())
        }
    }

    struct A;
    impl Addresses for A {
        fn client_url(&self, id: u64) -> String {
            format!("http://n{id}")
        }
        fn peer_url(&self, id: u64) -> String {
            format!("http://p{id}")
        }
    }

    #[derive(Default)]
    struct P(Mutex<Vec<String>>);
    impl Platform for P {
        async fn record(&self, op: Option<&Operation>) -> Result<(), PlatformError> {
            self.0.lock().map_err(|e| PlatformError(e.to_string()))?.push(format!("record {op:?}"));
            Ok(())
        }
        async fn record_incarnation(&self, id: u64, inc: Option<&str>) -> Result<(), PlatformError> {
            self.0.lock().map_err(|e| PlatformError(e.to_string()))?.push(format!("inc {id} {inc:?}"));
            Ok(())
        }
        async fn scale(&self, n: u32) -> Result<(), PlatformError> {
            self.0.lock().map_err(|e| PlatformError(e.to_string()))?.push(format!("scale {n}"));
            Ok(())
        }
        async fn delete_pvc(&self, o: u32) -> Result<(), PlatformError> {
            self.0.lock().map_err(|e| PlatformError(e.to_string()))?.push(format!("pvc {o}"));
            Ok(())
        }
        async fn delete_pod(&self, o: u32) -> Result<(), PlatformError> {
            self.0.lock().map_err(|e| PlatformError(e.to_string()))?.push(format!("pod {o}"));
            Ok(())
        }
        async fn evict_pod(&self, o: u32) -> Result<bool, PlatformError> {
            self.0.lock().map_err(|e| PlatformError(e.to_string()))?.push(format!("evict {o}"));
            Ok(o != 9)
        }
    }

    fn member(id: u64, role: &str, reachable: Option<bool>) -> Member {
        Member { id, peer_url: format!("http://p{id}"), role: role.into(), match_index: Some(id * 10), reachable, is_leader: false }
    }

    fn status(id: u64, applied: u64) -> NodeStatus {
        NodeStatus {
            id,
            leader: 3,
            term: 1,
            role: "follower".into(),
            commit_index: 90 + id,
            applied_index: applied,
            snapshot_index: 7,
            incarnation: format!("{id:016x}"),
        }
    }

    #[tokio::test]
    async fn observation_skips_leaderless_members_and_uses_the_leaders_view() {
        let mut f = Fake::default();
        f.views.insert(1, Members { leader: 0, members: vec![member(1, "voter", None)], commit_index: None });
        let leader_view = Members {
            leader: 3,
            members: vec![member(1, "voter", Some(false)), member(2, "voter", Some(true)), member(3, "voter", None), member(4, "learner", Some(true))],
            commit_index: Some(95),
        };
        f.views.insert(2, Members { leader: 3, members: vec![member(2, "voter", None)], commit_index: None });
        f.views.insert(3, leader_view);
        for id in [1, 2, 3] {
            f.statuses.insert(id, status(id, 50));
        }
        let c = observe_cluster(&f, &A, &[1, 2, 3]).await.expect("a view");
        assert_eq!(c.leader, 3);
        assert_eq!(c.commit_index, 95, "the leader's commit index, read with its match indexes");
        let mut older = Fake::default();
        older.views.insert(3, Members { commit_index: None, ..f.views[&3].clone() });
        older.statuses = f.statuses.clone();
        let c = observe_cluster(&older, &A, &[3]).await.expect("a view");
        assert_eq!(c.commit_index, 93, "a node without it in /v1/members: its /v1/status");
        assert_eq!(c.members.len(), 4, "the leader's member list, not node 2's");
        assert!(!c.members[&1].healthy, "leader cannot reach 1");
        assert!(c.members[&2].healthy && c.members[&3].healthy);
        assert!(!c.members[&4].healthy, "4 does not answer its own API");
        assert_eq!(c.members[&4].role, Role::Learner);
        assert_eq!(c.members[&2].snapshot_index, Some(7));
        assert_eq!(c.members[&2].incarnation.as_deref(), Some("0000000000000002"));
        assert!(observe_cluster(&f, &A, &[7]).await.is_none(), "nobody answers");
    }

    #[tokio::test]
    async fn a_followers_own_view_is_not_taken_for_the_leaders() {
        // The leader (3) does not answer its API; follower 1 could not reach it either and
        // answers from its own view (no progress), which misses member 4.
        let mut f = Fake::default();
        let own = |id: u64| Member { match_index: None, reachable: None, ..member(id, "voter", None) };
        f.views.insert(1, Members { leader: 3, members: vec![own(1), own(2), own(3)], commit_index: None });
        for id in [1, 2] {
            f.statuses.insert(id, status(id, 50));
        }
        let c = observe_cluster(&f, &A, &[1]).await.expect("a view");
        assert_eq!(c.leader, 0, "no leader to act through: decide waits");
        assert_eq!(c.members.len(), 3);
        // Follower 2 passes the leader's view on (progress known): that one counts.
        let leader_view = Members {
            leader: 3,
            members: vec![member(1, "voter", Some(true)), member(2, "voter", Some(true)), member(3, "voter", None), member(4, "learner", Some(true))],
            commit_index: Some(95),
        };
        f.views.insert(2, leader_view);
        let c = observe_cluster(&f, &A, &[1, 2]).await.expect("a view");
        assert_eq!((c.leader, c.members.len()), (3, 4), "the leader's view, through a follower");
    }

    #[tokio::test]
    async fn execution_routes_node_steps_to_the_leader_and_platform_steps_to_the_platform() {
        let f = Fake { promote_behind: true, ..Fake::default() };
        let p = P::default();
        let op = Operation::new(OperationKind::ScaleUp, 4);
        let run = |a: Action, leader: u64| {
            let (f, p) = (&f, &p);
            async move { execute(f, p, &A, leader, &a).await }
        };
        assert_eq!(run(Action::AddLearner(4), 2).await.expect("add"), Outcome::Applied);
        assert_eq!(run(Action::Promote(4), 2).await.expect("promote"), Outcome::NotYet);
        assert_eq!(run(Action::RemoveMember(3), 2).await.expect("remove"), Outcome::Applied);
        assert_eq!(run(Action::TransferLeader { from: 2, to: 1 }, 2).await.expect("transfer"), Outcome::Applied);
        assert!(matches!(run(Action::RemoveMember(3), 0).await, Err(StepError::NoLeader(_))));
        assert_eq!(run(Action::Record(Some(op.clone())), 0).await.expect("record"), Outcome::Applied);
        assert_eq!(run(Action::MarkRemoved { id: 3, at: 42 }, 0).await.expect("mark"), Outcome::Applied);
        assert_eq!(run(Action::ScaleStatefulSet(5), 0).await.expect("scale"), Outcome::Applied);
        assert_eq!(run(Action::EvictPod(2), 0).await.expect("evict"), Outcome::Applied);
        assert_eq!(run(Action::EvictPod(9), 0).await.expect("evict"), Outcome::NotYet, "refused by the budget");
        assert_eq!(run(Action::Wait(WaitReason::NoLeader), 0).await.expect("wait"), Outcome::Idle);
        let calls = f.calls.lock().map(|c| c.clone()).unwrap_or_default();
        assert_eq!(calls, ["add 4 http://p4 @2", "promote 4 @2", "remove 3 @2", "transfer 1 @2"]);
        let plat = p.0.lock().map(|c| c.clone()).unwrap_or_default();
        assert_eq!(
            plat,
            [format!("record {:?}", Some(&op)), "inc 3 Some(\"removed@42\")".to_string(), "scale 5".to_string(), "evict 2".to_string(), "evict 9".to_string()]
        );
    }
}
