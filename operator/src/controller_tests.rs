//! Reconcile tests against a mocked Kubernetes API server (tower-test `mock::pair`) and a
//! fake node API: each test scripts the API calls reconcile must make, in order, checks
//! their method, path and body, and answers them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use http::{Request, Response};
use kube::client::Body;
use kube::runtime::events::Reporter;
use serde_json::{json, Value};

use super::*;
use crate::crd::{OperationStage, RaftKVSpec};
use crate::leader::Fence;
use crate::node_client::{Member, Members, NodeError, NodeStatus, Promotion};

// ------------------------------------------------------------------------------------
// Fake node API.

#[derive(Default)]
struct FakeNode {
    /// Members list, or None: every node unreachable.
    members: Option<Members>,
    /// Status by raft id.
    statuses: BTreeMap<u64, NodeStatus>,
    /// Mutating calls received, as "verb id".
    calls: Mutex<Vec<String>>,
    /// Revoked when a status is asked for (the lease lost while observing).
    revoke_on_status: Option<Fence>,
    /// How long adding a learner takes (a slow node).
    add_learner_takes: Option<Duration>,
}

fn id_of(base: &str) -> u64 {
    // http://kv-<ordinal>.kv-peer.db.svc:2379
    base.split('-').nth(1).and_then(|s| s.split('.').next()).and_then(|s| s.parse::<u64>().ok()).map_or(0, |o| o + 1)
}

fn unreachable(base: &str) -> NodeError {
    NodeError::Unreachable { url: base.to_string(), reason: "fake: down".into() }
}

impl FakeNode {
    fn cluster(voters: &[u64], learners: &[u64], leader: u64) -> FakeNode {
        let mut members = Vec::new();
        let mut statuses = BTreeMap::new();
        for (id, role) in voters.iter().map(|i| (*i, "voter")).chain(learners.iter().map(|i| (*i, "learner"))) {
            members.push(Member {
                id,
                peer_url: resources::peer_url("kv", "db", id),
                role: role.into(),
                match_index: Some(100),
                reachable: Some(true),
                is_leader: id == leader,
            });
            statuses.insert(
                id,
                NodeStatus {
                    id,
                    leader,
                    term: 2,
                    role: if id == leader { "leader".into() } else { "follower".into() },
                    commit_index: 100,
                    applied_index: 100,
                    snapshot_index: 50,
                    incarnation: format!("{id:016x}"),
                },
            );
        }
        FakeNode { members: Some(Members { leader, members, commit_index: None }), statuses, ..FakeNode::default() }
    }

    fn log(&self, s: String) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(s);
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl NodeApi for FakeNode {
    async fn status(&self, base: &str) -> Result<NodeStatus, NodeError> {
        if let Some(f) = &self.revoke_on_status {
            f.revoke();
        }
        self.statuses.get(&id_of(base)).cloned().ok_or_else(|| unreachable(base))
    }
    async fn members(&self, base: &str) -> Result<Members, NodeError> {
        self.members.clone().ok_or_else(|| unreachable(base))
    }
    async fn add_learner(&self, base: &str, id: u64, peer_url: &str) -> Result<(), NodeError> {
        if let Some(d) = self.add_learner_takes {
            tokio::time::sleep(d).await;
        }
        self.log(format!("add_learner {id} {peer_url} via {}", id_of(base)));
        Ok(())
    }
    async fn promote(&self, base: &str, id: u64) -> Result<Promotion, NodeError> {
        self.log(format!("promote {id} via {}", id_of(base)));
        Ok(Promotion::Behind)
    }
    async fn remove(&self, base: &str, id: u64) -> Result<(), NodeError> {
        self.log(format!("remove {id} via {}", id_of(base)));
        Ok(())
    }
    async fn transfer_leader(&self, base: &str, to: u64) -> Result<(), NodeError> {
        self.log(format!("transfer {to} via {}", id_of(base)));
        Ok(())
    }
}

// ------------------------------------------------------------------------------------
// Scripted API server.

/// One expected request and the answer to give.
#[derive(Clone)]
struct Expect {
    method: &'static str,
    path: String,
    status: u16,
    response: Value,
}

fn expect(method: &'static str, path: &str, response: Value) -> Expect {
    Expect { method, path: path.to_string(), status: 200, response }
}

fn not_found(method: &'static str, path: &str) -> Expect {
    Expect {
        method,
        path: path.to_string(),
        status: 404,
        response: json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    }
}

/// A request the server received: method, path, query, JSON body.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    body: Value,
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Serves the script in order; returns what was received. Fails on any deviation.
async fn serve(mut handle: Handle, script: Vec<Expect>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for e in script {
        let Some((req, send)) = handle.next_request().await else {
            panic!("client stopped before {} {}; seen so far: {seen:#?}", e.method, e.path)
        };
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("json body") };
        assert_eq!((method.as_str(), path.as_str()), (e.method, e.path.as_str()), "unexpected request; body {body}");
        seen.push(Seen { method, path, query, body });
        let resp = Response::builder()
            .status(e.status)
            .body(Body::from(serde_json::to_vec(&e.response).expect("response json")))
            .expect("response");
        send.send_response(resp);
    }
    seen
}

fn rkv(replicas: i32, status: Option<RaftKVStatus>) -> RaftKV {
    let mut r = RaftKV::new("kv", RaftKVSpec { image: Some("raftkv-node:test".into()), ..RaftKVSpec::with_replicas(replicas) });
    r.metadata.namespace = Some("db".into());
    r.metadata.uid = Some("uid-kv".into());
    r.metadata.generation = Some(3);
    r.status = status;
    r
}

fn running_status(operation: Option<Operation>) -> RaftKVStatus {
    RaftKVStatus {
        initial_cluster: resources::initial_cluster("kv", "db", 3),
        bootstrapped: true,
        operation,
        incarnations: (1..=3u64).map(|id| (id.to_string(), format!("{id:016x}"))).collect(),
        ..RaftKVStatus::default()
    }
}

fn sts_json(replicas: u32) -> Value {
    let r = rkv(3, None);
    serde_json::to_value(resources::statefulset(&r, replicas, &resources::initial_cluster("kv", "db", 3), true))
        .expect("sts json")
}

/// The template hash of the StatefulSet the fixtures' RaftKV makes.
fn current_template() -> String {
    let sts: StatefulSet = serde_json::from_value(sts_json(3)).expect("sts");
    resources::statefulset_template_hash(&sts).expect("annotated")
}

/// A running pod made from the current pod template.
fn pod_json(ordinal: u32) -> Value {
    pod_json_from(ordinal, &current_template())
}

fn pod_json_from(ordinal: u32, template: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("kv-{ordinal}"), "namespace": "db", "uid": format!("pod-{ordinal}"),
            "annotations": {resources::TEMPLATE_HASH_ANNOTATION: template}},
        "status": {"phase": "Running", "containerStatuses": [{"name": "raftkv", "ready": true, "restartCount": 0,
            "image": "i", "imageID": "", "state": {"running": {}}}]}})
}

fn pvc_json(ordinal: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": format!("data-kv-{ordinal}"), "namespace": "db", "uid": format!("pvc-{ordinal}")}})
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn echo_rkv(r: &RaftKV) -> Value {
    serde_json::to_value(r).expect("rkv json")
}

const RKV_STATUS: &str = "/apis/raftkv.dev/v1alpha1/namespaces/db/raftkvs/kv/status";
const STS: &str = "/apis/apps/v1/namespaces/db/statefulsets/kv";
const PEER_SVC: &str = "/api/v1/namespaces/db/services/kv-peer";
const CLIENT_SVC: &str = "/api/v1/namespaces/db/services/kv";
const PODS: &str = "/api/v1/namespaces/db/pods";
const PVCS: &str = "/api/v1/namespaces/db/persistentvolumeclaims";
const PDB: &str = "/apis/policy/v1/namespaces/db/poddisruptionbudgets/kv";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/db/events";

/// The calls every reconcile of an existing cluster starts with.
fn prelude(sts_replicas: u32, pods: u32, pvcs: &[u32]) -> Vec<Expect> {
    vec![
        expect("GET", STS, sts_json(sts_replicas)),
        expect("PATCH", PEER_SVC, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kv-peer"}})),
        expect("PATCH", CLIENT_SVC, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kv"}})),
        expect("PATCH", STS, sts_json(sts_replicas)),
        expect("GET", PODS, list("PodList", (0..pods).map(pod_json).collect())),
        expect("GET", PVCS, list("PersistentVolumeClaimList", pvcs.iter().map(|o| pvc_json(*o)).collect())),
    ]
}

fn event_ok() -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": null})
}

fn pdb_ok() -> Value {
    json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "kv"}})
}

async fn run_reconcile(r: RaftKV, node: FakeNode, script: Vec<Expect>) -> (Result<Requeue, Error>, Vec<Seen>, Arc<Context<FakeNode>>) {
    run_reconcile_fenced(r, node, script, Fence::open()).await
}

async fn run_reconcile_fenced(
    r: RaftKV,
    node: FakeNode,
    script: Vec<Expect>,
    fence: Fence,
) -> (Result<Requeue, Error>, Vec<Seen>, Arc<Context<FakeNode>>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter { controller: "raftkv-operator".into(), instance: Some("t".into()) }),
        client,
        node,
        metrics: Arc::new(Metrics::new().expect("metrics")),
        fence,
    });
    let server = tokio::spawn(serve(handle, script));
    let result = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(r), ctx.clone()))
        .await
        .expect("reconcile finished in time");
    let seen = tokio::time::timeout(Duration::from_secs(5), server).await.expect("server done").expect("server ok");
    (result, seen, ctx)
}

fn find<'a>(seen: &'a [Seen], method: &str, path: &str) -> Vec<&'a Seen> {
    seen.iter().filter(|s| s.method == method && s.path == path).collect()
}

#[tokio::test]
async fn new_cluster_records_initial_members_then_creates_objects() {
    let r = rkv(3, None);
    let mut script = vec![expect("PATCH", RKV_STATUS, echo_rkv(&r)), not_found("GET", STS)];
    script.extend([
        expect("PATCH", PEER_SVC, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kv-peer"}})),
        expect("PATCH", CLIENT_SVC, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kv"}})),
        expect("PATCH", STS, sts_json(3)),
        expect("GET", PODS, list("PodList", vec![])),
        expect("GET", PVCS, list("PersistentVolumeClaimList", vec![])),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, _) = run_reconcile(r, FakeNode::default(), script).await;
    assert!(res.is_ok(), "{res:?}");
    // The initial cluster is recorded before any object exists.
    let first = &seen[0];
    assert_eq!(first.path, RKV_STATUS);
    assert_eq!(first.body["status"]["initialCluster"], json!(resources::initial_cluster("kv", "db", 3)));
    // Server-side apply with our field manager, forced.
    let sts = find(&seen, "PATCH", STS)[0];
    assert!(sts.query.contains("fieldManager=raftkv-operator") && sts.query.contains("force=true"), "{}", sts.query);
    assert_eq!(sts.body["spec"]["replicas"], 3);
    assert_eq!(sts.body["metadata"]["ownerReferences"][0]["uid"], "uid-kv");
    let env = sts.body["spec"]["template"]["spec"]["containers"][0]["env"].as_array().expect("env");
    assert!(!env.iter().any(|e| e["name"] == "RAFTKV_JOIN"), "not bootstrapped yet: no join mode");
    let peer = find(&seen, "PATCH", PEER_SVC)[0];
    assert_eq!(peer.body["spec"]["publishNotReadyAddresses"], true);
    // Nothing answers yet: status says Creating, not Available, with the reason.
    let status = &seen.last().expect("status").body["status"];
    assert_eq!(status["phase"], "Creating");
    assert_eq!(status["message"], "no raft member answers its API");
    let available = status["conditions"].as_array().expect("conditions").iter().find(|c| c["type"] == "Available");
    assert_eq!(available.expect("Available")["status"], "False");
    assert!(status.get("operation").is_none(), "status write must not touch the operation");
}

#[tokio::test]
async fn scale_up_records_intent_before_anything_else() {
    let r = rkv(4, Some(running_status(None)));
    let script = replacement_recorded(&r);
    let node = FakeNode::cluster(&[1, 2, 3], &[], 1);
    let (res, seen, ctx) = run_reconcile(r, node, script).await;
    assert!(res.is_ok(), "{res:?}");
    let record = find(&seen, "PATCH", RKV_STATUS)[0];
    assert_eq!(record.body, json!({"status": {"operation": {"kind": "ScaleUp", "id": 4, "stage": "Started"}}}));
    assert!(ctx.node.calls().is_empty(), "no raft change before the intent is recorded");
    let ev = find(&seen, "POST", EVENTS)[0];
    assert_eq!(ev.body["reason"], "OperationRecorded");
    let pdb = find(&seen, "PATCH", PDB)[0];
    assert_eq!(pdb.body["spec"]["maxUnavailable"], 1);
    let status = &seen.last().expect("status").body["status"];
    assert_eq!(status["leader"], 1);
    assert_eq!(status["replicas"], 3);
    assert_eq!(status["readyReplicas"], 3);
    assert_eq!(status["phase"], "Scaling", "{status}");
}

#[tokio::test]
async fn scale_up_in_flight_grows_the_statefulset_by_one() {
    let r = rkv(5, Some(running_status(Some(Operation::new(OperationKind::ScaleUp, 4)))));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script.extend([
        expect("PATCH", STS, sts_json(4)),
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, _) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 2), script).await;
    assert!(res.is_ok(), "{res:?}");
    let scale = find(&seen, "PATCH", STS)[1];
    assert_eq!(scale.body, json!({"spec": {"replicas": 4}}));
    assert!(!scale.query.contains("fieldManager=raftkv-operator"), "a merge patch, not an apply");
    assert_eq!(seen.last().expect("status").body["status"]["phase"], "Scaling");
}

#[tokio::test]
async fn learner_is_added_through_the_leader_and_promotion_waits_for_catch_up() {
    let r = rkv(4, Some(running_status(Some(Operation::new(OperationKind::ScaleUp, 4)))));
    let mut script = prelude(4, 4, &[0, 1, 2, 3]);
    script.extend([
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, ctx) = run_reconcile(r.clone(), FakeNode::cluster(&[1, 2, 3], &[], 2), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(ctx.node.calls(), vec![format!("add_learner 4 {} via 2", resources::peer_url("kv", "db", 4))]);
    assert_eq!(find(&seen, "POST", EVENTS)[0].body["reason"], "LearnerAdded");

    // Next round: it is a learner; promote answers learner_behind -> no event, requeue.
    let mut script = prelude(4, 4, &[0, 1, 2, 3]);
    script.extend([expect("PATCH", PDB, pdb_ok()), expect("PATCH", RKV_STATUS, echo_rkv(&r))]);
    let (res, seen, ctx) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[4], 2), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(ctx.node.calls(), vec!["promote 4 via 2".to_string()]);
    assert!(find(&seen, "POST", EVENTS).is_empty());
    // The status says what it waits for, and the operation keeps the phase at Scaling.
    let status = &find(&seen, "PATCH", RKV_STATUS)[0].body["status"];
    assert_eq!(status["message"], "learner 4 is catching up", "{status}");
    assert_eq!(status["phase"], "Scaling", "{status}");
    let text = ctx.metrics.render();
    assert!(text.contains(r#"raftkv_operator_membership_operations_total{action="Promote",result="not_yet"} 1"#), "{text}");
}

#[tokio::test]
async fn scale_down_of_the_leader_transfers_leadership_first() {
    let r = rkv(2, Some(running_status(Some(Operation::new(OperationKind::ScaleDown, 3)))));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script.extend([
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, ctx) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 3), script).await;
    assert!(res.is_ok(), "{res:?}");
    let calls = ctx.node.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].starts_with("transfer ") && calls[0].ends_with("via 3"), "{calls:?}");
    assert_eq!(find(&seen, "POST", EVENTS)[0].body["reason"], "LeaderTransferred");
}

#[tokio::test]
async fn the_disruption_budget_is_lowered_before_a_voter_is_removed() {
    // 5 voters allow 2 disruptions, the 4 left after the removal only 1: the budget
    // must say 1 before the removal is asked for, not one reconcile later.
    let r = rkv(4, Some(running_status(Some(Operation::new(OperationKind::ScaleDown, 5)))));
    let mut script = prelude(5, 5, &[0, 1, 2, 3, 4]);
    script.extend([
        expect("PATCH", PDB, pdb_ok()),
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, ctx) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3, 4, 5], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(ctx.node.calls(), ["remove 5 via 1"]);
    let pdbs = find(&seen, "PATCH", PDB);
    assert_eq!(pdbs.len(), 2, "{seen:?}");
    for p in pdbs {
        assert_eq!(p.body["spec"]["maxUnavailable"], 1, "{}", p.body);
    }
    // The budget came before the removal's Event (the mock answers in script order).
    let at = |m: &str, path: &str| seen.iter().position(|x| x.method == m && x.path == path).unwrap();
    assert!(at("PATCH", PDB) < at("POST", EVENTS));
}

#[tokio::test]
async fn removed_member_claim_is_deleted_after_the_pod_is_gone() {
    let r = rkv(2, Some(running_status(Some(Operation::new(OperationKind::ScaleDown, 3)))));
    let mut script = prelude(2, 2, &[0, 1, 2]);
    script.extend([
        expect("DELETE", "/api/v1/namespaces/db/persistentvolumeclaims/data-kv-2", pvc_json(2)),
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, ctx) = run_reconcile(r, FakeNode::cluster(&[1, 2], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert!(ctx.node.calls().is_empty());
    assert_eq!(find(&seen, "PATCH", PDB)[0].body["spec"]["maxUnavailable"], 0, "two voters tolerate no disruption");
}

#[tokio::test]
async fn node_failure_is_an_error_with_a_warning_event_and_status_still_written() {
    struct Refusing(FakeNode);
    impl NodeApi for Refusing {
        async fn status(&self, b: &str) -> Result<NodeStatus, NodeError> {
            self.0.status(b).await
        }
        async fn members(&self, b: &str) -> Result<Members, NodeError> {
            self.0.members(b).await
        }
        async fn add_learner(&self, b: &str, _: u64, _: &str) -> Result<(), NodeError> {
            Err(NodeError::Status { url: b.into(), status: 503, code: "no_leader".into(), message: "x".into() })
        }
        async fn promote(&self, b: &str, id: u64) -> Result<Promotion, NodeError> {
            self.0.promote(b, id).await
        }
        async fn remove(&self, b: &str, id: u64) -> Result<(), NodeError> {
            self.0.remove(b, id).await
        }
        async fn transfer_leader(&self, b: &str, to: u64) -> Result<(), NodeError> {
            self.0.transfer_leader(b, to).await
        }
    }
    let r = rkv(4, Some(running_status(Some(Operation::new(OperationKind::ScaleUp, 4)))));
    let mut script = prelude(4, 4, &[0, 1, 2, 3]);
    script.extend([
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter { controller: "raftkv-operator".into(), instance: None }),
        client,
        node: Refusing(FakeNode::cluster(&[1, 2, 3], &[], 1)),
        metrics: Arc::new(Metrics::new().expect("metrics")),
        fence: Fence::open(),
    });
    let server = tokio::spawn(serve(handle, script));
    let res = reconcile(Arc::new(r.clone()), ctx.clone()).await;
    let seen = server.await.expect("server");
    let err = res.expect_err("step failed");
    assert_eq!(err.kind(), "node");
    let ev = find(&seen, "POST", EVENTS)[0];
    assert_eq!(ev.body["type"], "Warning");
    assert_eq!(ev.body["reason"], "MembershipStepFailed");
    let _ = error_policy(Arc::new(r), &err, ctx.clone());
    assert!(ctx.metrics.render().contains(r#"raftkv_operator_reconcile_errors_total{kind="node"} 1"#));
}

fn member_statuses(ids: std::ops::RangeInclusive<u64>) -> Vec<MemberStatus> {
    ids.map(|id| MemberStatus {
        id,
        pod: resources::pod_name("kv", u32::try_from(id - 1).expect("small")),
        peer_url: resources::peer_url("kv", "db", id),
        role: if id == 1 { "leader".into() } else { "voter".into() },
        healthy: true,
    })
    .collect()
}

#[tokio::test]
async fn deleted_statefulset_comes_back_with_a_pod_for_every_member_last_seen() {
    // Five members (grown from an initial three); the StatefulSet was deleted and no
    // member answers. Re-creating it with the initial three pods would leave the five
    // without a quorum for good.
    let mut st = running_status(None);
    st.members = member_statuses(1..=5);
    st.replicas = 5;
    let r = rkv(5, Some(st));
    let script = vec![
        not_found("GET", STS),
        expect("PATCH", PEER_SVC, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kv-peer"}})),
        expect("PATCH", CLIENT_SVC, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kv"}})),
        expect("PATCH", STS, sts_json(5)),
        expect("GET", PODS, list("PodList", vec![])),
        expect("GET", PVCS, list("PersistentVolumeClaimList", (0..5).map(pvc_json).collect())),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ];
    let (res, seen, _) = run_reconcile(r, FakeNode::default(), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(find(&seen, "PATCH", STS)[0].body["spec"]["replicas"], 5);
    // The PDB still protects five voters (two may go), not the initial three (one).
    assert_eq!(find(&seen, "PATCH", PDB)[0].body["spec"]["maxUnavailable"], 2);
    // Status keeps the members last seen, none healthy, no leader.
    let status = &find(&seen, "PATCH", RKV_STATUS)[0].body["status"];
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 5, "{status}");
    assert!(members.iter().all(|m| m["healthy"] == false && m["role"] == "voter"), "{status}");
    assert_eq!(status["leader"], Value::Null);
    assert_eq!(status["phase"], "Degraded");
}

#[tokio::test]
async fn statefulset_scaled_below_quorum_is_scaled_back_without_a_leader() {
    // `kubectl scale sts kv --replicas=1`: member 1 alone knows no leader.
    let mut st = running_status(None);
    st.members = member_statuses(1..=3);
    let r = rkv(3, Some(st));
    let mut node = FakeNode::cluster(&[1, 2, 3], &[], 0);
    node.statuses.retain(|id, _| *id == 1);
    let mut script = prelude(1, 1, &[0, 1, 2]);
    script.extend([
        expect("PATCH", STS, sts_json(3)),
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, _) = run_reconcile(r, node, script).await;
    assert!(res.is_ok(), "{res:?}");
    let patches = find(&seen, "PATCH", STS);
    assert_eq!(patches.last().expect("scale").body, json!({"spec": {"replicas": 3}}));
}

#[tokio::test]
async fn a_statefulset_the_api_server_refuses_is_reported_in_an_event_and_status() {
    let r = rkv(3, Some(running_status(None)));
    let refusal = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
        "message": "StatefulSet.apps \"kv\" is invalid: spec.volumeClaimTemplates[0].spec.resources[storage]: Invalid value: \"ten gigs\""});
    let script = vec![
        expect("GET", STS, sts_json(3)),
        expect("PATCH", PEER_SVC, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kv-peer"}})),
        expect("PATCH", CLIENT_SVC, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kv"}})),
        Expect { method: "PATCH", path: STS.to_string(), status: 422, response: refusal },
        expect("POST", EVENTS, event_ok()),
        // The cluster is still observed, and status written from what was seen; no step.
        expect("GET", PODS, list("PodList", (0..2).map(pod_json).collect())),
        expect("GET", PVCS, list("PersistentVolumeClaimList", (0..3).map(pvc_json).collect())),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ];
    // Member 3 went down meanwhile: status must say so although the spec is refused.
    let mut node = FakeNode::cluster(&[1, 2, 3], &[], 1);
    node.statuses.remove(&3);
    let (res, seen, ctx) = run_reconcile(r, node, script).await;
    assert!(res.is_err(), "{res:?}");
    assert!(ctx.node.calls().is_empty(), "no membership step: {:?}", ctx.node.calls());
    let event = &find(&seen, "POST", EVENTS)[0].body;
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["reason"], "ApplyRefused", "{event}");
    assert!(event["note"].as_str().unwrap_or("").contains("ten gigs"), "{event}");
    let status = &find(&seen, "PATCH", RKV_STATUS)[0].body["status"];
    assert!(status["message"].as_str().unwrap_or("").starts_with("the API server refused the StatefulSet (422 Invalid)"), "{status}");
    assert_eq!(status["readyReplicas"], 2, "{status}");
    assert_eq!(status["phase"], "Degraded", "{status}");
}

#[tokio::test]
async fn nothing_is_done_once_the_lease_may_be_lost() {
    let fence = Fence::closed();
    fence.extend_to(std::time::Instant::now() + Duration::from_secs(60));
    fence.revoke();
    // A scale-up is due; the scripted server fails on any request.
    let r = rkv(4, Some(running_status(None)));
    let (res, seen, _) = run_reconcile_fenced(r, FakeNode::cluster(&[1, 2, 3], &[], 1), vec![], fence).await;
    let err = res.expect_err("fenced");
    assert_eq!(err.kind(), "lease_lost");
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn a_lease_lost_while_observing_stops_the_step() {
    // The lease is lost after the reconcile started: the observation runs, the step
    // (recording the scale-up) does not.
    let fence = Fence::closed();
    fence.extend_to(std::time::Instant::now() + Duration::from_secs(60));
    let r = rkv(4, Some(running_status(None)));
    let node = FakeNode { revoke_on_status: Some(fence.clone()), ..FakeNode::cluster(&[1, 2, 3], &[], 1) };
    let (res, seen, _) = run_reconcile_fenced(r, node, prelude(3, 3, &[0, 1, 2]), fence).await;
    assert_eq!(res.expect_err("fenced").kind(), "lease_lost");
    assert!(find(&seen, "PATCH", RKV_STATUS).is_empty(), "{seen:?}");
}

#[tokio::test]
async fn a_step_cannot_outlast_the_fence_and_nothing_is_written_after_it() {
    // The lease is surely ours for 1.5 s (observing takes milliseconds); adding the
    // learner takes 30 s.
    let fence = Fence::closed();
    fence.extend_to(std::time::Instant::now() + Duration::from_millis(1500));
    let r = rkv(4, Some(running_status(Some(Operation::new(OperationKind::ScaleUp, 4)))));
    let node = FakeNode { add_learner_takes: Some(Duration::from_secs(30)), ..FakeNode::cluster(&[1, 2, 3], &[], 2) };
    let (res, seen, ctx) = run_reconcile_fenced(r, node, prelude(4, 4, &[0, 1, 2, 3]), fence).await;
    assert_eq!(res.expect_err("fenced").kind(), "lease_lost");
    assert!(ctx.node.calls().is_empty(), "the step was cut short: {:?}", ctx.node.calls());
    assert!(find(&seen, "PATCH", PDB).is_empty() && find(&seen, "PATCH", RKV_STATUS).is_empty(), "{seen:?}");
}

/// The API calls of a reconcile of three running members that records a replacement:
/// observe, record the operation, its Event, the PDB, the status.
fn replacement_recorded(r: &RaftKV) -> Vec<Expect> {
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script.extend([
        expect("PATCH", RKV_STATUS, echo_rkv(r)),
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(r)),
    ]);
    script
}

#[tokio::test]
async fn status_counts_an_amnesiac_member_unhealthy_as_decide_does() {
    // Member 3 came back with another data dir (incarnation): it answers, but is no
    // longer a voter with the log it promised to keep.
    let r = rkv(3, Some(running_status(None)));
    let mut node = FakeNode::cluster(&[1, 2, 3], &[], 1);
    if let Some(st) = node.statuses.get_mut(&3) {
        st.incarnation = "ffffffffffffffff".into();
    }
    let script = replacement_recorded(&r);
    let (res, seen, _) = run_reconcile(r, node, script).await;
    assert!(res.is_ok(), "{res:?}");
    // The step records the replacement; then the status shows why.
    assert_eq!(find(&seen, "PATCH", RKV_STATUS)[0].body["status"]["operation"]["kind"], "ReplaceAmnesiac");
    let status = &find(&seen, "PATCH", RKV_STATUS)[1].body["status"];
    let m3 = status["members"].as_array().and_then(|ms| ms.iter().find(|m| m["id"] == 3)).cloned().unwrap_or_default();
    assert_eq!(m3["healthy"], false, "{status}");
    assert_eq!(status["conditions"].as_array().map(|c| c.iter().any(|c| c["type"] == "Available" && c["status"] == "True")), Some(true), "two of three healthy voters: {status}");
}

#[tokio::test]
async fn an_object_being_deleted_is_left_to_the_garbage_collector() {
    let mut r = rkv(3, Some(running_status(None)));
    r.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    // No API call at all: the scripted server fails on any request.
    let (res, seen, _) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 1), vec![]).await;
    assert_eq!(res.expect("reconcile"), Requeue::await_change());
    assert!(seen.is_empty());
}

#[tokio::test]
async fn amnesiac_member_starts_a_replacement() {
    let r = rkv(3, Some(running_status(None)));
    let mut node = FakeNode::cluster(&[1, 2, 3], &[], 1);
    // Member 2 came back with an empty volume: new incarnation, nothing applied.
    if let Some(s) = node.statuses.get_mut(&2) {
        s.incarnation = "ffffffffffffffff".into();
        s.applied_index = 0;
    }
    let script = replacement_recorded(&r);
    let (res, seen, _) = run_reconcile(r, node, script).await;
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(
        find(&seen, "PATCH", RKV_STATUS)[0].body["status"]["operation"],
        json!({"kind": "ReplaceAmnesiac", "id": 2, "stage": "Started"})
    );
    let _ = OperationStage::Started;
}

#[test]
fn status_is_never_available_without_quorum() {
    let r = rkv(3, None);
    let mut c = ClusterView { leader: 1, commit_index: 5, members: BTreeMap::new() };
    for id in 1..=3 {
        c.members.insert(
            id,
            crate::membership::MemberView {
                role: Role::Voter,
                match_index: Some(5),
                healthy: id == 1,
                applied_index: Some(5),
                incarnation: None,
                snapshot_index: Some(0),
                leader: Some(1),
            },
        );
    }
    let s = compute_status(&r, Some(&c), None, &Action::Done, true);
    let avail = s.conditions.iter().find(|c| c.type_ == "Available").expect("Available");
    assert_eq!(avail.status, "False");
    assert_eq!(s.phase, Some(Phase::Degraded));
    c.members.get_mut(&2).expect("m2").healthy = true;
    let s = compute_status(&r, Some(&c), None, &Action::Done, true);
    assert_eq!(s.conditions.iter().find(|c| c.type_ == "Available").expect("Available").status, "True");
    assert_eq!(s.phase, Some(Phase::Degraded), "one member still unhealthy");
    assert_eq!(s.members.iter().find(|m| m.id == 1).expect("m1").role, "leader");
    c.leader = 0;
    let s = compute_status(&r, Some(&c), None, &Action::Done, true);
    assert_eq!(s.conditions.iter().find(|c| c.type_ == "Available").expect("Available").reason, "NoLeader");
}

// ------------------------------------------------------------------------------------
// Scheduled backups.

const BACKUP_PVC: &str = "/api/v1/namespaces/db/persistentvolumeclaims/kv-backups";
const CRONJOB: &str = "/apis/batch/v1/namespaces/db/cronjobs/kv-backup";

fn with_backup(mut r: RaftKV) -> RaftKV {
    r.spec.backup = Some(crate::crd::BackupSpec {
        schedule: "0 */6 * * *".into(),
        keep: 5,
        suspend: false,
        storage: crate::crd::BackupStorageSpec { size: "5Gi".into(), storage_class_name: Some("fast".into()) },
    });
    r
}

fn cronjob_ok() -> Value {
    json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "kv-backup"}, "spec": {"schedule": "0 */6 * * *", "jobTemplate": {}}})
}

fn backup_pvc_ok() -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "kv-backups", "namespace": "db", "uid": "pvc-b"}})
}

#[tokio::test]
async fn a_backup_schedule_creates_its_claim_once_and_applies_the_cronjob() {
    let r = with_backup(rkv(3, Some(running_status(None))));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script.extend([
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
        not_found("GET", BACKUP_PVC),
        expect("POST", PVCS, backup_pvc_ok()),
        expect("PATCH", CRONJOB, cronjob_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, _) = run_reconcile(r.clone(), FakeNode::cluster(&[1, 2, 3], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    // The flag is recorded before the CronJob can exist, so a later removal of
    // spec.backup always deletes it.
    let statuses = find(&seen, "PATCH", RKV_STATUS);
    assert_eq!(statuses[0].body, json!({"status": {"backupsScheduled": true}}));
    let order: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    let flag_at = order.iter().position(|p| *p == RKV_STATUS).unwrap_or(usize::MAX);
    assert!(flag_at < order.iter().position(|p| *p == CRONJOB).unwrap_or(0), "{order:?}");
    let pvc = &find(&seen, "POST", PVCS)[0].body;
    assert_eq!(pvc["metadata"]["name"], "kv-backups");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(pvc["spec"]["storageClassName"], "fast");
    assert!(pvc["metadata"].get("ownerReferences").is_none(), "backups outlive the cluster: {pvc}");
    let cron = find(&seen, "PATCH", CRONJOB)[0];
    assert!(cron.query.contains("fieldManager=raftkv-operator") && cron.query.contains("force=true"), "{}", cron.query);
    assert_eq!(cron.body["spec"]["schedule"], "0 */6 * * *");
    assert_eq!(cron.body["metadata"]["ownerReferences"][0]["uid"], "uid-kv");
    let args = &cron.body["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args, &json!(["backup", "--endpoints", "http://kv.db.svc:2379", "--dir", "/backups", "--keep", "5"]));
    assert!(seen.last().expect("status").body["status"].get("backupsScheduled").is_none(), "set once, before");

    // Next time: the claim exists and is left alone (it is the user's); the CronJob is
    // applied again; status unchanged, so not written.
    let mut st = running_status(None);
    st.backups_scheduled = true;
    let r = with_backup(rkv(3, Some(st)));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script.extend([
        expect("PATCH", PDB, pdb_ok()),
        expect("GET", BACKUP_PVC, backup_pvc_ok()),
        expect("PATCH", CRONJOB, cronjob_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, _) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert!(seen.last().expect("status").body["status"].get("backupsScheduled").is_none());
}

#[tokio::test]
async fn removing_the_backup_schedule_deletes_the_cronjob_and_keeps_the_backups() {
    let mut st = running_status(None);
    st.backups_scheduled = true;
    let r = rkv(3, Some(st));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script.extend([
        expect("PATCH", PDB, pdb_ok()),
        expect("DELETE", CRONJOB, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, _) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert!(find(&seen, "DELETE", BACKUP_PVC).is_empty(), "the backups claim stays");
    assert_eq!(seen.last().expect("status").body["status"]["backupsScheduled"], false);
    // Already gone (deleted by hand): fine, and the flag is cleared all the same.
    let mut st = running_status(None);
    st.backups_scheduled = true;
    let r = rkv(3, Some(st));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script.extend([expect("PATCH", PDB, pdb_ok()), not_found("DELETE", CRONJOB), expect("PATCH", RKV_STATUS, echo_rkv(&r))]);
    let (res, seen, _) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(seen.last().expect("status").body["status"]["backupsScheduled"], false);
}

#[tokio::test]
async fn a_refused_cronjob_does_not_hold_up_membership_and_is_reported() {
    // A scale-up is due and the CronJob is refused: the step still happens, a Warning
    // Event says why, status does not claim a schedule, and the error policy retries.
    let r = with_backup(rkv(4, Some(running_status(None))));
    let refusal = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
        "message": "CronJob.batch \"kv-backup\" is invalid: spec.schedule: Invalid value: \"61 * * * *\""});
    let mut script = replacement_recorded(&r);
    let status_patch = script.pop().expect("the status write");
    script.extend([
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
        expect("GET", BACKUP_PVC, backup_pvc_ok()),
        Expect { method: "PATCH", path: CRONJOB.to_string(), status: 422, response: refusal },
        expect("POST", EVENTS, event_ok()),
        status_patch,
    ]);
    let (res, seen, _) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 1), script).await;
    assert!(res.is_err(), "{res:?}");
    assert_eq!(find(&seen, "PATCH", RKV_STATUS)[0].body["status"]["operation"]["kind"], "ScaleUp", "the step went ahead");
    let warning = find(&seen, "POST", EVENTS).into_iter().map(|e| &e.body).find(|b| b["reason"] == "BackupScheduleFailed").cloned();
    let warning = warning.expect("a BackupScheduleFailed event");
    assert_eq!(warning["type"], "Warning");
    assert!(warning["note"].as_str().unwrap_or("").contains("61 * * * *"), "{warning}");
    // The flag was recorded before the apply was tried: a removal of spec.backup will
    // make sure no CronJob is left.
    assert_eq!(find(&seen, "PATCH", RKV_STATUS)[1].body, json!({"status": {"backupsScheduled": true}}));
    assert!(seen.last().expect("status").body["status"].get("backupsScheduled").is_none());
}

#[test]
fn a_pod_runs_when_the_node_container_runs_whatever_a_sidecar_does() {
    let pod = |node: &str, sidecar: &str| -> Pod {
        let state = |s: &str| if s == "running" { json!({"running": {}}) } else { json!({"waiting": {"reason": "CrashLoopBackOff"}}) };
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kv-0", "uid": "u"},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "istio-proxy", "ready": false, "restartCount": 3, "image": "i", "imageID": "", "state": state(sidecar)},
                {"name": "raftkv", "ready": true, "restartCount": 0, "image": "i", "imageID": "", "state": state(node)}]}}))
        .expect("pod")
    };
    assert!(pod_view(&pod("running", "waiting")).running, "a crashing sidecar does not make the member's pod down");
    assert!(!pod_view(&pod("waiting", "running")).running);
    assert!(pod_view(&pod("running", "running")).running);
    let v = pod_view(&serde_json::from_value::<Pod>(pod_json(1)).expect("pod"));
    assert_eq!(v.template_hash, Some(current_template()), "the annotation is read");
}

#[tokio::test]
async fn a_pod_on_an_older_template_is_restarted_after_recording_it() {
    // Pod 2 (member 3, a follower) runs an older template: the restart is recorded first.
    let r = rkv(3, Some(running_status(None)));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    let pods = vec![pod_json(0), pod_json(1), pod_json_from(2, "0123456789abcdef")];
    script[4] = expect("GET", PODS, list("PodList", pods.clone()));
    script.extend([
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, ctx) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert!(ctx.node.calls().is_empty());
    let op = &find(&seen, "PATCH", RKV_STATUS)[0].body["status"]["operation"];
    assert_eq!(op, &json!({"kind": "Restart", "id": 3, "stage": "Started", "podUid": "pod-2"}));

    // Next reconcile: that pod is deleted (the StatefulSet makes it again from the
    // current template), with an Event saying so.
    let r = rkv(3, Some(running_status(Some(Operation { pod_uid: Some("pod-2".into()), ..Operation::new(OperationKind::Restart, 3) }))));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script[4] = expect("GET", PODS, list("PodList", pods));
    let mut refused = script.clone();
    script.extend([
        expect("POST", EVICTION_2, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, ctx) = run_reconcile(r.clone(), FakeNode::cluster(&[1, 2, 3], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    assert!(ctx.node.calls().is_empty());
    let eviction = &find(&seen, "POST", EVICTION_2)[0].body;
    assert_eq!(eviction["metadata"]["name"], "kv-2", "{eviction}");
    assert_eq!(find(&seen, "POST", EVENTS)[0].body["reason"], "PodEvicted");
    assert_eq!(find(&seen, "PATCH", RKV_STATUS)[0].body["status"]["phase"], "Updating");
    assert_eq!(find(&seen, "PATCH", RKV_STATUS)[0].body["status"]["updatedReplicas"], 2, "pods 0 and 1 are on the current template");

    // The budget refuses (a drain took another pod): no error, the wait shows in status.
    refused.extend([
        Expect {
            method: "POST",
            path: EVICTION_2.to_string(),
            status: 429,
            response: json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "TooManyRequests",
                "message": "Cannot evict pod as it would violate the pod's disruption budget.", "code": 429}),
        },
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, _) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 1), refused).await;
    assert!(res.is_ok(), "{res:?}");
    let status = &find(&seen, "PATCH", RKV_STATUS)[0].body["status"];
    assert_eq!(status["message"], "the PodDisruptionBudget refused to evict pod ordinal 2 for now", "{status}");
}

const EVICTION_2: &str = "/api/v1/namespaces/db/pods/kv-2/eviction";

#[tokio::test]
async fn the_leaders_pod_is_restarted_only_after_leadership_moved() {
    let r = rkv(3, Some(running_status(Some(Operation { pod_uid: Some("pod-0".into()), ..Operation::new(OperationKind::Restart, 1) }))));
    let mut script = prelude(3, 3, &[0, 1, 2]);
    script[4] = expect("GET", PODS, list("PodList", vec![pod_json_from(0, "old"), pod_json(1), pod_json(2)]));
    script.extend([
        expect("POST", EVENTS, event_ok()),
        expect("PATCH", PDB, pdb_ok()),
        expect("PATCH", RKV_STATUS, echo_rkv(&r)),
    ]);
    let (res, seen, ctx) = run_reconcile(r, FakeNode::cluster(&[1, 2, 3], &[], 1), script).await;
    assert!(res.is_ok(), "{res:?}");
    let calls = ctx.node.calls();
    assert!(calls.len() == 1 && calls[0].starts_with("transfer ") && calls[0].ends_with("via 1"), "{calls:?}");
    assert!(find(&seen, "DELETE", "/api/v1/namespaces/db/pods/kv-0").is_empty());
}
