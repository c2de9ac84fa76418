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
use crate::node_client::{NodeApi, NodeError, NodeStatus, Promotion};

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
    /// The cluster is not ready for it yet (a learner still catching up).
    NotYet,
    /// Nothing to do (Wait / Done).
    Idle,
}

/// Observes the cluster: asks the members list of the first candidate that answers
/// (preferring the leader's own view), then each member's `/v1/status`.
/// Returns None when no candidate answers.
pub async fn observe_cluster<N: NodeApi, A: Addresses>(node: &N, addrs: &A, candidates: &[u64]) -> Option<ClusterView> {
    let mut view = None;
    for id in candidates {
        match node.members(&addrs.client_url(*id)).await {
            Ok(m) => {
                let leader = m.leader;
                view = Some(m);
                if leader != 0 && leader != *id {
                    // Re-ask the leader itself: match indexes and reachability are its view.
                    if let Ok(lm) = node.members(&addrs.client_url(leader)).await {
                        view = Some(lm);
                    }
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
    let commit_index = statuses.get(&members.leader).map(|s| s.commit_index).unwrap_or_else(|| {
        statuses.values().map(|s| s.commit_index).max().unwrap_or(0)
    });
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
