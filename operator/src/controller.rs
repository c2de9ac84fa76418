//! The Kubernetes controller: [`reconcile`] applies the owned objects, observes pods,
//! claims and the raft cluster, asks [`decide`] for one step, executes it through
//! [`KubePlatform`] and the node API, publishes an Event for it, keeps the backup
//! CronJob in line with `spec.backup`, and writes status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{MemberStatus, Operation, OperationKind, Phase, RaftKV, RaftKVStatus};
use crate::membership::{decide, majority, Action, ClusterView, Observed, PodView, PvcView, Role, WaitReason};
use crate::metrics::Metrics;
use crate::node_client::NodeApi;
use crate::orchestrate::{execute, observe_cluster, Addresses, Outcome, Platform, PlatformError, StepError};
use crate::resources::{self, MANAGER};

/// Requeue after a step was executed (the next one usually follows at once).
pub const REQUEUE_AFTER_STEP: Duration = Duration::from_secs(2);
/// Requeue while waiting on the cluster.
pub const REQUEUE_WAITING: Duration = Duration::from_secs(5);
/// Requeue when converged.
pub const REQUEUE_STEADY: Duration = Duration::from_secs(30);

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A membership step failed.
    #[error("membership step: {0}")]
    Step(#[from] StepError),
    /// The object has no namespace (the CRD is namespaced, so this is a bug elsewhere).
    #[error("RaftKV {0} has no namespace")]
    NoNamespace(String),
    /// The leader-election lease may have passed to another replica.
    #[error(transparent)]
    LeaseLost(#[from] crate::leader::LeaseLost),
}

impl Error {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Step(StepError::Node(_)) => "node",
            Error::Step(StepError::Platform(_)) => "platform",
            Error::Step(StepError::NoLeader(_)) => "no_leader",
            Error::NoNamespace(_) => "invalid",
            Error::LeaseLost(_) => "lease_lost",
        }
    }
}

/// Shared state of the controller.
pub struct Context<N: NodeApi> {
    /// Kubernetes client.
    pub client: Client,
    /// Node API client.
    pub node: N,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Kubernetes Events (aggregates repeats into series).
    pub recorder: Recorder,
    /// Checked before every change: closed once the leader-election lease may be lost.
    pub fence: crate::leader::Fence,
}

/// Kubernetes DNS addresses of the members of one cluster.
pub struct KubeAddresses {
    name: String,
    namespace: String,
}

impl Addresses for KubeAddresses {
    fn client_url(&self, id: u64) -> String {
        resources::client_url(&self.name, &self.namespace, id)
    }
    fn peer_url(&self, id: u64) -> String {
        resources::peer_url(&self.name, &self.namespace, id)
    }
}

/// [`Platform`] on Kubernetes for one RaftKV.
pub struct KubePlatform {
    client: Client,
    name: String,
    namespace: String,
}

/// How long one eviction request may take, the client's own retries included.
const EVICTION_WAIT: Duration = Duration::from_secs(10);

fn perr(e: kube::Error) -> PlatformError {
    PlatformError(e.to_string())
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl KubePlatform {
    async fn patch_status(&self, patch: serde_json::Value) -> Result<(), kube::Error> {
        let api: Api<RaftKV> = Api::namespaced(self.client.clone(), &self.namespace);
        api.patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
    }
}

impl Platform for KubePlatform {
    async fn record(&self, op: Option<&Operation>) -> Result<(), PlatformError> {
        self.patch_status(json!({"status": {"operation": op}})).await.map_err(perr)
    }

    async fn record_incarnation(&self, id: u64, incarnation: Option<&str>) -> Result<(), PlatformError> {
        self.patch_status(json!({"status": {"incarnations": {id.to_string(): incarnation}}})).await.map_err(perr)
    }

    async fn scale(&self, replicas: u32) -> Result<(), PlatformError> {
        let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = json!({"spec": {"replicas": replicas}});
        api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ()).map_err(perr)
    }

    async fn delete_pvc(&self, ordinal: u32) -> Result<(), PlatformError> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.delete(&resources::pvc_name(&self.name, ordinal), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(perr(e)),
        }
    }

    async fn delete_pod(&self, ordinal: u32) -> Result<(), PlatformError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.delete(&resources::pod_name(&self.name, ordinal), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(perr(e)),
        }
    }

    async fn evict_pod(&self, ordinal: u32) -> Result<bool, PlatformError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        // kube's client retries a 429 (the budget's refusal) with backoff for minutes;
        // the reconcile asks again anyway, on a fresh observation: give it a few seconds.
        let (pod, params) = (resources::pod_name(&self.name, ordinal), kube::api::EvictParams::default());
        match tokio::time::timeout(EVICTION_WAIT, api.evict(&pod, &params)).await {
            Err(_) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if is_not_found(&e) => Ok(true),
            // The PodDisruptionBudget allows no disruption now (429), or its update
            // conflicted (504): try again later. Anything else (a second budget over the
            // pods, 500; no RBAC for pods/eviction, 403) needs someone to act: an error,
            // with a Warning Event.
            Ok(Err(kube::Error::Api(st))) if st.code == 429 || st.code == 504 => Ok(false),
            Ok(Err(e)) => Err(perr(e)),
        }
    }
}

fn pod_view(p: &Pod) -> PodView {
    let terminating = p.metadata.deletion_timestamp.is_some();
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    // The node's container: a sidecar injected by a mesh or an agent that is not running
    // does not make the member's pod look down (the operator deletes pods it takes for
    // down ones on an older template).
    let started = p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).is_some_and(|cs| {
        let running = |c: &k8s_openapi::api::core::v1::ContainerStatus| c.state.as_ref().is_some_and(|st| st.running.is_some());
        match cs.iter().find(|c| c.name == resources::NODE_CONTAINER) {
            Some(node) => running(node),
            None => !cs.is_empty() && cs.iter().all(running),
        }
    });
    PodView {
        running: phase == "Running" && started && !terminating,
        terminating,
        uid: p.uid().unwrap_or_default(),
        template_hash: p.annotations().get(resources::TEMPLATE_HASH_ANNOTATION).cloned(),
    }
}

/// Event reason and note for an executed action.
fn event_for(action: &Action) -> Option<(&'static str, String)> {
    Some(match action {
        Action::Record(Some(op)) => ("OperationRecorded", format!("{:?} of member {} ({:?})", op.kind, op.id, op.stage)),
        Action::Record(None) => ("OperationFinished", "membership operation finished".to_string()),
        Action::ScaleStatefulSet(n) => ("StatefulSetScaled", format!("StatefulSet scaled to {n}")),
        Action::AddLearner(id) => ("LearnerAdded", format!("member {id} added as learner")),
        Action::Promote(id) => ("MemberPromoted", format!("member {id} promoted to voter")),
        Action::TransferLeader { from, to } => ("LeaderTransferred", format!("leadership moved from {from} to {to}")),
        Action::RemoveMember(id) => ("MemberRemoved", format!("member {id} removed from raft")),
        Action::DeletePvc(o) => ("VolumeClaimDeleted", format!("volume claim of ordinal {o} deleted")),
        Action::DeletePod(o) => ("PodDeleted", format!("pod of ordinal {o} deleted")),
        Action::EvictPod(o) => ("PodEvicted", format!("pod of ordinal {o} evicted (restart onto the current pod template)")),
        Action::RecordIncarnation { .. } | Action::MarkRemoved { .. } | Action::Wait(_) | Action::Done => return None,
    })
}

fn action_label(action: &Action) -> &'static str {
    match action {
        Action::Record(_) => "Record",
        Action::RecordIncarnation { .. } => "RecordIncarnation",
        Action::MarkRemoved { .. } => "MarkRemoved",
        Action::ScaleStatefulSet(_) => "ScaleStatefulSet",
        Action::AddLearner(_) => "AddLearner",
        Action::Promote(_) => "Promote",
        Action::TransferLeader { .. } => "TransferLeader",
        Action::RemoveMember(_) => "RemoveMember",
        Action::DeletePvc(_) => "DeletePvc",
        Action::DeletePod(_) => "DeletePod",
        Action::EvictPod(_) => "EvictPod",
        Action::Wait(_) => "Wait",
        Action::Done => "Done",
    }
}

/// An owned object the API server refused (a 4xx other than a conflict or throttling:
/// a spec it finds invalid, an admission webhook, a quota) will be refused again until
/// someone acts: say so where `kubectl describe` and `kubectl get` show it, a Warning
/// Event and `status.message`. Best effort; the error still goes to the error policy.
/// What to tell about an object the API server refused for good (a 4xx other than
/// conflict and throttling: the spec is wrong, a policy or a quota says no), or None
/// for a failure worth retrying as it is.
fn refusal_note(kind: &str, e: &kube::Error) -> Option<String> {
    let kube::Error::Api(st) = e else { return None };
    if !(400..500).contains(&st.code) || st.code == 409 || st.code == 429 {
        return None;
    }
    Some(format!("the API server refused the {kind} ({} {}): {}", st.code, st.reason, st.message))
}

async fn publish(recorder: &Recorder, rkv: &RaftKV, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.to_string(), note: Some(note), action: "Reconcile".to_string(), secondary: None };
    if let Err(e) = recorder.publish(&ev, &rkv.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing event failed");
    }
}

fn condition(type_: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>, old: &[Condition]) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// Computes the status fields reconcile owns (everything but `operation`,
/// `incarnations` and `initialCluster`, which are written step by step).
pub fn compute_status(
    rkv: &RaftKV,
    cluster: Option<&ClusterView>,
    operation: Option<&Operation>,
    action: &Action,
    bootstrapped: bool,
) -> RaftKVStatus {
    let name = rkv.name_any();
    let ns = rkv.namespace().unwrap_or_default();
    let old = rkv.status.clone().unwrap_or_default();
    let generation = rkv.metadata.generation;
    let (members, leader, voters, healthy_voters) = match cluster {
        Some(c) => {
            let members: Vec<MemberStatus> = c
                .members
                .iter()
                .map(|(id, m)| MemberStatus {
                    id: *id,
                    pod: resources::pod_name(&name, u32::try_from(id.saturating_sub(1)).unwrap_or(u32::MAX)),
                    peer_url: resources::peer_url(&name, &ns, *id),
                    role: match (m.role, *id == c.leader) {
                        (_, true) => "leader".to_string(),
                        (Role::Voter, false) => "voter".to_string(),
                        (Role::Learner, false) => "learner".to_string(),
                    },
                    healthy: m.healthy,
                })
                .collect();
            let voters = c.members.values().filter(|m| m.role == Role::Voter).count();
            let healthy = c.members.values().filter(|m| m.role == Role::Voter && m.healthy).count();
            (members, (c.leader != 0).then_some(c.leader), voters, healthy)
        }
        None => {
            // No member answered: keep the membership last seen (it guides decide() and
            // the PDB), none of it known healthy.
            let members: Vec<MemberStatus> = old
                .members
                .iter()
                .map(|m| MemberStatus {
                    role: if m.role == "learner" { m.role.clone() } else { "voter".to_string() },
                    healthy: false,
                    ..m.clone()
                })
                .collect();
            let voters = members.iter().filter(|m| m.role == "voter").count();
            (members, None, voters, 0)
        }
    };
    let available = leader.is_some() && voters > 0 && healthy_voters >= majority(voters);
    let all_healthy = members.iter().all(|m| m.healthy);
    let progressing = operation.is_some() || action.is_mutation();
    let phase = if !bootstrapped && !available {
        Phase::Creating
    } else if !available {
        Phase::Degraded
    } else if let Some(op) = operation {
        match op.kind {
            OperationKind::ReplaceAmnesiac => Phase::Repairing,
            OperationKind::Restart => Phase::Updating,
            OperationKind::ScaleUp | OperationKind::ScaleDown => Phase::Scaling,
        }
    } else if progressing {
        Phase::Repairing
    } else if !all_healthy {
        Phase::Degraded
    } else {
        Phase::Running
    };
    let message = match action {
        Action::Wait(r) => Some(r.to_string()),
        _ => None,
    };
    let msg = message.clone().unwrap_or_default();
    let conditions = vec![
        condition(
            "Available",
            available,
            if available { "QuorumHealthy" } else if leader.is_none() { "NoLeader" } else { "NoQuorum" },
            &format!("{healthy_voters} of {voters} voters healthy"),
            generation,
            &old.conditions,
        ),
        condition(
            "Progressing",
            progressing,
            if progressing { "MembershipChanging" } else { "Converged" },
            &msg,
            generation,
            &old.conditions,
        ),
        condition(
            "Degraded",
            !available || !all_healthy,
            if !available { "QuorumAtRisk" } else if !all_healthy { "MemberUnhealthy" } else { "AllHealthy" },
            &msg,
            generation,
            &old.conditions,
        ),
    ];
    let ready = members.iter().filter(|m| m.healthy).count();
    RaftKVStatus {
        replicas: i32::try_from(voters).unwrap_or(i32::MAX),
        ready_replicas: i32::try_from(ready).unwrap_or(i32::MAX),
        members,
        leader,
        phase: Some(phase),
        conditions,
        observed_generation: generation,
        selector: resources::selector_string(&name),
        bootstrapped,
        message,
        ..RaftKVStatus::default()
    }
}

/// One reconcile of a RaftKV.
pub async fn reconcile<N: NodeApi>(rkv: Arc<RaftKV>, ctx: Arc<Context<N>>) -> Result<Requeue, Error> {
    ctx.metrics.reconciles.inc();
    let _timer = ctx.metrics.duration.start_timer();
    let name = rkv.name_any();
    let ns = rkv.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    ctx.fence.check()?;
    if rkv.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes the owned objects; re-creating
        // them or changing the membership now would only fight it.
        tracing::info!(rkv = %name, namespace = %ns, "being deleted: nothing to reconcile");
        return Ok(Requeue::await_change());
    }
    let client = ctx.client.clone();
    let status = rkv.status.clone().unwrap_or_default();
    let desired = u32::try_from(rkv.spec.replicas.clamp(1, crate::crd::MAX_REPLICAS)).unwrap_or(1);
    let rkv_api: Api<RaftKV> = Api::namespaced(client.clone(), &ns);
    let ssa = PatchParams::apply(MANAGER).force();

    // 1. The initial cluster is fixed once, before any pod exists.
    let initial = if status.initial_cluster.is_empty() {
        let init = resources::initial_cluster(&name, &ns, desired);
        let patch = json!({"status": {"initialCluster": init, "selector": resources::selector_string(&name),
            "phase": Phase::Creating}});
        rkv_api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        init
    } else {
        status.initial_cluster.clone()
    };

    // 2. Owned objects. The StatefulSet keeps its current replica count: only decide()
    //    changes it.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let existing = sts_api.get_opt(&name).await?;
    let initial_size = u32::try_from(initial.len()).unwrap_or(1);
    // As decide() counts them: voters, and learners up to the one a scale-up adds.
    let recorded_top =
        crate::membership::pods_needed_top(status.members.iter().map(|m| (m.id, m.role != "learner")), desired);
    // A StatefulSet deleted out of band comes back with a pod for every member last
    // seen, not with the initial size (that could leave the members without a quorum).
    let sts_replicas = existing
        .as_ref()
        .and_then(|s| s.spec.replicas)
        .map(|r| u32::try_from(r).unwrap_or(0))
        .unwrap_or_else(|| initial_size.max(u32::try_from(recorded_top.min(10)).unwrap_or(1)));
    let sts = resources::statefulset(&rkv, sts_replicas, &initial, status.bootstrapped);
    let template_hash = resources::statefulset_template_hash(&sts);
    let applied = async {
        let peer = resources::peer_service(&rkv);
        svc_api.patch(&resources::peer_service_name(&name), &ssa, &Patch::Apply(&peer)).await.map_err(|e| ("Service", e))?;
        svc_api.patch(&name, &ssa, &Patch::Apply(&resources::client_service(&rkv))).await.map_err(|e| ("Service", e))?;
        sts_api.patch(&name, &ssa, &Patch::Apply(&sts)).await.map_err(|e| ("StatefulSet", e))?;
        Ok::<(), (&str, kube::Error)>(())
    }
    .await;
    // An object the API server refuses for good is reported (a Warning Event, the status
    // message), and the cluster is still observed so that status stays true meanwhile;
    // no membership step is taken (it may need the refused object). Anything else is
    // retried by the error policy at once.
    let refused = match applied {
        Ok(()) => None,
        Err((kind, e)) => match refusal_note(kind, &e) {
            Some(note) => {
                publish(&ctx.recorder, &rkv, EventType::Warning, "ApplyRefused", note.clone()).await;
                Some((note, e))
            }
            None => return Err(e.into()),
        },
    };

    // 3. Observe pods, claims and the raft cluster.
    let lp = ListParams::default().labels(&resources::selector_string(&name));
    let pods: BTreeMap<u32, PodView> = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&lp)
        .await?
        .items
        .iter()
        .filter_map(|p| resources::pod_ordinal(&name, &p.name_any()).map(|o| (o, pod_view(p))))
        .collect();
    let pvcs: BTreeMap<u32, PvcView> = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .list(&lp)
        .await?
        .items
        .iter()
        .filter_map(|v| {
            resources::pvc_ordinal(&name, &v.name_any()).map(|o| {
                (o, PvcView { uid: v.uid().unwrap_or_default(), terminating: v.metadata.deletion_timestamp.is_some() })
            })
        })
        .collect();
    let addrs = KubeAddresses { name: name.clone(), namespace: ns.clone() };
    let mut candidates: Vec<u64> = pods.iter().filter(|(_, p)| p.running).map(|(o, _)| u64::from(*o) + 1).collect();
    if candidates.is_empty() {
        candidates = (1..=u64::from(sts_replicas)).collect();
    }
    let cluster = observe_cluster(&ctx.node, &addrs, &candidates).await;
    let incarnations: BTreeMap<u64, String> =
        status.incarnations.iter().filter_map(|(k, v)| k.parse().ok().map(|id| (id, v.clone()))).collect();
    let observed = Observed {
        desired,
        sts_replicas,
        pods,
        pvcs,
        cluster: cluster.clone(),
        operation: status.operation.clone(),
        incarnations,
        recorded_top,
        template_hash,
        recorded_members: status.members.iter().map(|m| m.id).collect(),
    };

    // 4. One step (none while an object is refused).
    let action = if refused.is_some() { Action::Done } else { decide(&observed) };
    tracing::info!(rkv = %name, namespace = %ns, ?action, "decided");
    let leader = cluster.as_ref().map(|c| c.leader).unwrap_or(0);
    let platform = KubePlatform { client: client.clone(), name: name.clone(), namespace: ns.clone() };
    // A voter about to go: the disruption budget is lowered first, for the voters left,
    // so that a drain running meanwhile cannot evict as many of them as the old count
    // allowed (5 voters allow 2, the 4 left only 1).
    let voters_after_removal = match (&action, &cluster) {
        (Action::RemoveMember(id), Some(c)) if c.members.get(id).is_some_and(|m| m.role == Role::Voter) => {
            Some(c.members.values().filter(|m| m.role == Role::Voter).count().saturating_sub(1).max(1))
        }
        _ => None,
    };
    if let Some(left) = voters_after_removal {
        ctx.fence.check()?;
        let pdb: PodDisruptionBudget = resources::pdb(&rkv, u32::try_from(left).unwrap_or(1));
        Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns).patch(&name, &ssa, &Patch::Apply(&pdb)).await?;
    }
    // Observing took a while: act only if the lease is still surely ours.
    ctx.fence.check()?;
    // A step may not outlast the fence (renewals extend it meanwhile): one cut short is
    // as after a crash (steps are idempotent). A request already delivered to a node
    // still takes effect there.
    let outcome = tokio::select! {
        outcome = execute(&ctx.node, &platform, &addrs, leader, &action) => outcome,
        () = ctx.fence.until_closed() => return Err(crate::leader::LeaseLost.into()),
    };
    let label = action_label(&action);
    match &outcome {
        Ok(o) => {
            let result = match o {
                Outcome::Applied => "applied",
                Outcome::NotYet => "not_yet",
                Outcome::Idle => "idle",
            };
            if *o != Outcome::Idle {
                ctx.metrics.membership_ops.with_label_values(&[label, result]).inc();
            }
            if *o == Outcome::Applied {
                if let Some((reason, note)) = event_for(&action) {
                    publish(&ctx.recorder, &rkv, EventType::Normal, reason, note).await;
                }
            }
        }
        Err(e) => {
            ctx.metrics.membership_ops.with_label_values(&[label, "error"]).inc();
            publish(&ctx.recorder, &rkv, EventType::Warning, "MembershipStepFailed", format!("{label}: {e}"))
                .await;
        }
    }

    // 5. Status and the PDB from the voter count.
    let operation_now = match (&action, &outcome) {
        (Action::Record(op), Ok(Outcome::Applied)) => op.clone(),
        _ => status.operation.clone(),
    };
    let bootstrapped = status.bootstrapped
        || cluster.as_ref().is_some_and(|c| c.leader != 0 && c.members.len() >= initial.len());
    // A promotion the leader refused for now (the learner is behind) is a wait: say so.
    let shown = match (&action, &outcome) {
        (Action::Promote(id), Ok(Outcome::NotYet)) => Action::Wait(WaitReason::LearnerCatchingUp(*id)),
        (Action::EvictPod(o), Ok(Outcome::NotYet)) => Action::Wait(WaitReason::EvictionRefused(*o)),
        _ => action.clone(),
    };
    // Status counts health as decide() does: a member that lost its data is not healthy.
    let shown_cluster = cluster.as_ref().map(|c| crate::membership::amnesiacs_unhealthy(c, &observed.incarnations).0);
    let mut new_status = compute_status(&rkv, shown_cluster.as_ref(), operation_now.as_ref(), &shown, bootstrapped);
    let updated = observed
        .pods
        .values()
        .filter(|p| !p.terminating && p.template_hash.is_some() && p.template_hash == observed.template_hash)
        .count();
    new_status.updated_replicas = i32::try_from(updated).unwrap_or(i32::MAX);
    if let Some((note, _)) = &refused {
        new_status.message = Some(note.clone());
    }
    // Voters seen now, or last seen when no member answers; the initial size only
    // before any member was ever seen.
    let voters = match usize::try_from(new_status.replicas).unwrap_or(0) {
        0 => initial.len(),
        n => n,
    };
    // After a removal (or an attempt: its outcome may be unknown) the budget stays at
    // the lower count until the next observation says otherwise.
    let voters = voters_after_removal.map_or(voters, |left| voters.min(left));
    let pdb: PodDisruptionBudget = resources::pdb(&rkv, u32::try_from(voters).unwrap_or(1));
    // The PDB and status come from what was observed before the step: not after the
    // lease may have passed (another replica may have changed the membership since).
    ctx.fence.check()?;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns).patch(&name, &ssa, &Patch::Apply(&pdb)).await?;

    // 6. Scheduled backups, after the membership step: a CronJob the API server refuses
    //    never holds up membership changes (a Warning Event says why; the error policy
    //    retries).
    let backups = reconcile_backups(&client, &rkv, &ns, status.backups_scheduled, &ssa).await;
    if let Err((kind, e)) = &backups {
        publish(&ctx.recorder, &rkv, EventType::Warning, "BackupScheduleFailed", format!("{kind}: {e}")).await;
    }
    let mut status_json = serde_json::to_value(&new_status).unwrap_or_default();
    if let Some(obj) = status_json.as_object_mut() {
        // Written step by step by the executor; never overwritten here.
        for k in ["operation", "incarnations", "initialCluster", "backupsScheduled"] {
            obj.remove(k);
        }
        // Set before the CronJob is applied (in `reconcile_backups`); cleared here once
        // it is deleted.
        if backups.as_ref().is_ok_and(|scheduled| !scheduled) && status.backups_scheduled {
            obj.insert("backupsScheduled".into(), json!(false));
        }
        // Explicit nulls clear stale values under a merge patch.
        for k in ["leader", "message"] {
            obj.entry(k).or_insert(serde_json::Value::Null);
        }
        obj.entry("members").or_insert(json!([]));
    }
    rkv_api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({"status": status_json}))).await?;

    if let Some((_, e)) = refused {
        return Err(e.into());
    }
    outcome?;
    backups.map_err(|(_, e)| e)?;
    Ok(match action {
        Action::Done => Requeue::requeue(REQUEUE_STEADY),
        Action::Wait(_) => Requeue::requeue(REQUEUE_WAITING),
        _ => Requeue::requeue(REQUEUE_AFTER_STEP),
    })
}

/// Keeps the backup objects in line with `spec.backup`: with it, records
/// `status.backupsScheduled` (first, unless `scheduled` says it is), then the backups
/// claim (created once, never changed: it is the user's from then on) and the CronJob
/// (server-side apply); without it, deletes the CronJob this operator may have made
/// (`scheduled`). Answers whether a CronJob is scheduled now, or the kind of the object
/// that failed.
async fn reconcile_backups(client: &Client, rkv: &RaftKV, ns: &str, scheduled: bool, ssa: &PatchParams) -> Result<bool, (&'static str, kube::Error)> {
    let name = rkv.name_any();
    let cron_api: Api<CronJob> = Api::namespaced(client.clone(), ns);
    let (Some(pvc), Some(cron)) = (resources::backup_pvc(rkv), resources::backup_cronjob(rkv)) else {
        if scheduled {
            let dp = DeleteParams::background();
            match cron_api.delete(&resources::backup_cronjob_name(&name), &dp).await {
                Ok(_) => tracing::info!(rkv = %name, namespace = %ns, "spec.backup removed: backup CronJob deleted"),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(("CronJob", e)),
            }
        }
        return Ok(false);
    };
    if !scheduled {
        // Recorded before the CronJob may exist (as membership operations are): had the
        // apply landed and this write failed, or the operator stopped in between, a later
        // removal of spec.backup would never delete it.
        let api: Api<RaftKV> = Api::namespaced(client.clone(), ns);
        let patch = json!({"status": {"backupsScheduled": true}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| ("RaftKV status", e))?;
    }
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc_name = resources::backup_pvc_name(&name);
    if pvc_api.get_opt(&pvc_name).await.map_err(|e| ("PersistentVolumeClaim", e))?.is_none() {
        match pvc_api.create(&PostParams::default(), &pvc).await {
            Ok(_) => tracing::info!(rkv = %name, namespace = %ns, claim = %pvc_name, "backups claim created"),
            // Created meanwhile (another reconcile, or the user): it is there, as wanted.
            Err(kube::Error::Api(st)) if st.code == 409 => {}
            Err(e) => return Err(("PersistentVolumeClaim", e)),
        }
    }
    cron_api.patch(&resources::backup_cronjob_name(&name), ssa, &Patch::Apply(&cron)).await.map_err(|e| ("CronJob", e))?;
    Ok(true)
}

/// Backs off after a failed reconcile.
pub fn error_policy<N: NodeApi>(rkv: Arc<RaftKV>, error: &Error, ctx: Arc<Context<N>>) -> Requeue {
    ctx.metrics.errors.with_label_values(&[error.kind()]).inc();
    tracing::warn!(rkv = %rkv.name_any(), error = %error, "reconcile failed");
    Requeue::requeue(REQUEUE_WAITING)
}

/// Runs the controller until `shutdown` resolves.
pub async fn run<N: NodeApi>(
    ctx: Arc<Context<N>>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::StreamExt;
    use kube::runtime::{watcher, Controller};
    let client = ctx.client.clone();
    let (rkvs, stss, svcs, pdbs): (Api<RaftKV>, Api<StatefulSet>, Api<Service>, Api<PodDisruptionBudget>) =
        match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone()), Api::all(client)),
        };
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=raftkv-operator");
    Controller::new(rkvs, watcher::Config::default())
        .owns(stss, owned.clone())
        .owns(svcs, owned.clone())
        .owns(pdbs, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
