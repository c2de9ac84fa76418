//! The `RaftKV` custom resource (`raftkv.dev/v1alpha1`).
//!
//! The Rust types below are the single source of the CRD schema: their `///` docs become
//! the field descriptions shown by `kubectl explain`. [`crd_yaml`] renders the CRD
//! deterministically for `raftkv-operator crd` and for the chart's drift test.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the custom resource.
pub const GROUP: &str = "raftkv.dev";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";
/// Smallest allowed `spec.replicas`.
pub const MIN_REPLICAS: i32 = 1;
/// Largest allowed `spec.replicas`.
pub const MAX_REPLICAS: i32 = 9;

/// Desired state of a raftkv cluster: a replicated key-value store run as a StatefulSet,
/// one raft member per pod. Changing `replicas` grows or shrinks the raft cluster one
/// member at a time without losing quorum.
// Several `printcolumn(...)` entries are intended, not duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "raftkv.dev",
    version = "v1alpha1",
    kind = "RaftKV",
    plural = "raftkvs",
    singular = "raftkv",
    shortname = "rkv",
    namespaced,
    status = "RaftKVStatus",
    doc = "A raftkv cluster: a replicated key-value store on raft, managed by raftkv-operator.",
    // Names the API server would accept here but whose pods it would refuse: each pod
    // gets the label controller-revision-hash=<name>-<hash> (at most 63 characters).
    // (A name that is no DNS-1035 label is refused as a Service, which is reported.)
    // Only size(): its cost does not grow with the string, so no CEL cost budget binds.
    validation = Rule::new("self.metadata.name.size() <= 52")
        .message("the name must have at most 52 characters (its pods are labelled <name>-<10-character hash>, at most 63)"),
    // `<name>-peer` is the headless Service of the RaftKV `<name>`: a RaftKV named so
    // would fight over it (its client Service has its own name).
    validation = Rule::new("!self.metadata.name.endsWith('-peer')")
        .message("the name must not end in -peer (<name>-peer is the peer Service of the RaftKV <name>)"),
    validation = Rule::new("!has(self.spec.backup) || self.metadata.name.size() <= 45")
        .message("spec.backup needs a name of at most 45 characters (its CronJob <name>-backup has at most 52)"),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas", description = "Desired raft members"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas", description = "Ready raft members"),
    printcolumn(name = "Updated", type_ = "integer", json_path = ".status.updatedReplicas", description = "Member pods on the current pod template"),
    printcolumn(name = "Leader", type_ = "integer", json_path = ".status.leader", description = "Raft id of the leader"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct RaftKVSpec {
    /// Number of raft voters (and pods). 1 to 9; odd numbers tolerate the most failures
    /// per member. Changes are applied one member at a time.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 9").message("replicas must be between 1 and 9"))]
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,

    /// Container image of raftkv-node. Defaults to `raftkv-node:<operator version>`.
    /// Changing it (or any field the pods run with) restarts the members one at a time,
    /// the leader last, each once the one before follows the leader again and caught up;
    /// with it unset, so does upgrading the operator.
    #[schemars(regex(pattern = r"^\S+$"), length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Image pull policy for the node container: Always, IfNotPresent or Never (the
    /// Kubernetes default when unset).
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']").message("imagePullPolicy must be Always, IfNotPresent or Never"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,

    /// Persistent storage of each member's data directory. Immutable: a StatefulSet
    /// cannot change its volume claim template.
    // `self == oldSelf` on the optional `storageClassName` alone would let it be added or
    // dropped (a transition rule runs only when both values exist); `storage` itself is
    // always there (defaulted), so the rule on it sees every change.
    #[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)").message("storage.storageClassName is immutable"))]
    #[serde(default)]
    pub storage: StorageSpec,

    /// Compute resources of the node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Number of applied entries between snapshots (passed as RAFTKV_SNAPSHOT_COUNT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub snapshot_count: Option<i64>,

    /// Node selector for the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations for the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity for the pods. When unset, `podAntiAffinity` chooses a preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Preset anti-affinity between members when `affinity` is unset: `Soft` (default)
    /// prefers one member per node, `Hard` requires it, `None` adds nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_anti_affinity: Option<AntiAffinityPreset>,

    /// Let watches ask for each change's previous value (`prev_kv=true`, as Kubernetes'
    /// watch cache does with etcd): every member keeps the values puts replaced in its
    /// watch history (`--watch-prev-kv`), which costs memory. Off by default. Like any pod
    /// template change, it restarts the members one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_prev_kv: Option<bool>,

    /// Scheduled backups: when set, a CronJob `<name>-backup` takes a checked backup of
    /// the cluster (`raftkv-node backup` against the client Service: `GET /v1/backup`,
    /// linearizable) on `schedule` into the volume claim `<name>-backups`, keeping the
    /// newest `keep`. Removing it deletes the CronJob; the claim and its backups stay,
    /// also when the RaftKV is deleted. Needs a RaftKV name of at most 45 characters
    /// (a CronJob name has at most 52).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
}

impl RaftKVSpec {
    /// A spec of `replicas` members with every optional field unset (their defaults apply).
    pub fn with_replicas(replicas: i32) -> Self {
        RaftKVSpec {
            replicas,
            image: None,
            image_pull_policy: None,
            storage: StorageSpec::default(),
            resources: None,
            snapshot_count: None,
            node_selector: None,
            tolerations: None,
            affinity: None,
            pod_anti_affinity: None,
            watch_prev_kv: None,
            backup: None,
        }
    }
}

/// Preset pod anti-affinity between the members of one cluster, used when `affinity` is
/// unset: `Soft` (default) prefers one member per node, `Hard` requires it, `None` adds
/// nothing.
// The CRD shows this text, not the field's: the schema of an enum field is the enum's.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum AntiAffinityPreset {
    /// Prefer spreading members over nodes (preferredDuringScheduling).
    #[default]
    Soft,
    /// Require one member per node (requiredDuringScheduling).
    Hard,
    /// No anti-affinity.
    None,
}

/// Scheduled backups of a cluster (see `spec.backup`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// When to take a backup, in the CronJob's syntax: five fields (minute hour
    /// day-of-month month day-of-week, e.g. `0 */6 * * *`) or a macro such as `@hourly`
    /// or `@daily`; times are in the kube-controller-manager's time zone (UTC unless
    /// configured otherwise).
    #[schemars(regex(pattern = BACKUP_SCHEDULE_PATTERN), length(max = 200))]
    pub schedule: String,

    /// How many backups to keep in the volume (the newest; older ones are deleted after
    /// each successful backup). 1 to 1000, default 7.
    #[serde(default = "default_backup_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: i32,

    /// Stop taking backups for now (the CronJob's `suspend`), keeping the schedule.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// The volume claim `<name>-backups` the backups are written to: created once, when
    /// first needed; from then on the claim is yours (the operator never changes or
    /// deletes it, so a later change here is not applied to it). Give it room for `keep`
    /// backups, each about the size of a member's snapshot.
    #[serde(default)]
    pub storage: BackupStorageSpec,
}

/// The backups volume claim (`spec.backup.storage`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStorageSpec {
    /// Size of the claim, e.g. `10Gi` (a quantity, as `storage.size`). Default `1Gi`.
    #[schemars(regex(pattern = STORAGE_SIZE_PATTERN))]
    #[serde(default = "default_storage_size")]
    pub size: String,

    /// Storage class of the claim; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for BackupStorageSpec {
    fn default() -> Self {
        BackupStorageSpec { size: default_storage_size(), storage_class_name: None }
    }
}

fn default_backup_keep() -> i32 {
    7
}

/// One value of a cron field: a number, or a month or day name.
macro_rules! cron_value {
    () => {
        r"(?:[0-9]+|JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC|SUN|MON|TUE|WED|THU|FRI|SAT|jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec|sun|mon|tue|wed|thu|fri|sat)"
    };
}
/// One item of a cron field's list: `*`, `?`, a value or a range, with an optional step.
macro_rules! cron_item {
    () => {
        concat!(r"(?:\*|\?|", cron_value!(), r"(?:-", cron_value!(), r")?)(?:/[0-9]+)?")
    };
}
/// A cron field: a comma-separated list of items.
macro_rules! cron_field {
    () => {
        concat!(cron_item!(), r"(?:,", cron_item!(), r")*")
    };
}

/// What `backup.schedule` must match: five cron fields in the syntax Kubernetes' CronJob
/// parser takes (numbers, `*`, `?`, ranges `a-b`, steps `/n`, lists `a,b`, month and day
/// names in capitals or lower case), or a macro. Numbers out of a field's range are left
/// to the API server.
pub const BACKUP_SCHEDULE_PATTERN: &str = concat!(
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|",
    cron_field!(),
    r"(?: +",
    cron_field!(),
    r"){4})$"
);


/// Storage of each member's data directory (a volume claim template named `data`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each member's volume, e.g. `1Gi`: a positive number with an optional
    /// binary (`Ki` `Mi` `Gi` `Ti` `Pi` `Ei`) or decimal (`k` `M` `G` `T` `P` `E`) suffix.
    /// Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage.size is immutable"))]
    #[schemars(regex(pattern = STORAGE_SIZE_PATTERN))]
    #[serde(default = "default_storage_size")]
    pub size: String,

    /// Storage class of the volumes; the cluster default when unset. Immutable (it can
    /// be neither changed, set nor unset after creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// What `storage.size` must match (the CRD checks it; a volume size is a Kubernetes
/// quantity, and one the API server would refuse in the StatefulSet is refused here).
pub const STORAGE_SIZE_PATTERN: &str = r"^(0*[1-9][0-9]*(\.[0-9]+)?|0*\.[0-9]*[1-9][0-9]*)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

fn default_storage_size() -> String {
    "1Gi".to_string()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec { size: default_storage_size(), storage_class_name: None }
    }
}

/// Observed state of a raftkv cluster, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RaftKVStatus {
    /// Raft voters currently in the cluster (for the scale subresource).
    #[serde(default)]
    pub replicas: i32,
    /// Members that are healthy voters or learners seen by the leader.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods made from the StatefulSet's current pod template (the rest are restarted
    /// onto it one at a time).
    #[serde(default)]
    pub updated_replicas: i32,
    /// Raft members as reported by the leader.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// Raft id of the current leader; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    /// Lifecycle phase: Creating, Running, Scaling, Repairing, Updating, Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Standard conditions: Available, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Label selector of the pods, as a string (for the scale subresource).
    #[serde(default)]
    pub selector: String,
    /// Peer URLs of the initial members, fixed at creation (RAFTKV_CLUSTER).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub initial_cluster: Vec<String>,
    /// True once the initial cluster has elected a leader; from then on pods with an
    /// empty data directory start in join mode instead of bootstrapping.
    #[serde(default)]
    pub bootstrapped: bool,
    /// The membership operation in flight, recorded before each mutation so a restarted
    /// operator resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    /// Data-directory incarnation (16 hex digits) of each member id, as first seen after it
    /// joined; a different value later means the member lost its data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub incarnations: BTreeMap<String, String>,
    /// Human-readable explanation of the current wait, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// True while the operator keeps a backup CronJob for this cluster (`spec.backup`
    /// set); it deletes the CronJob when `spec.backup` goes away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backups_scheduled: bool,
}

/// Lifecycle phase of a cluster: `Creating` (initial members not yet serving), `Running`
/// (membership matches the spec), `Scaling` (a membership operation in flight),
/// `Repairing` (replacing a member that lost its data, or fixing the StatefulSet size or a
/// leftover volume claim), `Updating` (restarting members one at a time onto a changed
/// pod template), `Degraded` (no leader or healthy voter majority, or an unhealthy
/// member).
// The CRD shows this text, not the field's: the schema of an enum field is the enum's.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Objects created, initial members not yet serving.
    Creating,
    /// Membership matches the spec and a leader exists.
    Running,
    /// A membership operation is in flight: a scale-up or scale-down, including one
    /// started to finish an orphan learner or to remove members above `replicas`.
    Scaling,
    /// Replacing a member that lost its data, or a step outside any operation (the
    /// StatefulSet's size or a leftover volume claim brought back in line).
    Repairing,
    /// No leader or no healthy voter majority, or (with no operation in flight) a member
    /// is unhealthy.
    Degraded,
    /// Members are restarted one at a time onto a changed pod template (image,
    /// resources, flags).
    Updating,
}

/// One raft member as seen by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Raft id (pod ordinal + 1).
    pub id: u64,
    /// Name of the pod running this member.
    pub pod: String,
    /// Advertised peer URL.
    #[serde(rename = "peerURL")]
    pub peer_url: String,
    /// `leader`, `voter` or `learner`.
    pub role: String,
    /// Reachable from the leader and answering its API.
    pub healthy: bool,
}

/// Kind of a membership operation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum OperationKind {
    /// Adding member `id`: grow the StatefulSet, add as learner, promote.
    ScaleUp,
    /// Removing member `id`: move leadership, remove, shrink the StatefulSet, delete its PVC.
    ScaleDown,
    /// Replacing member `id` that lost its data: remove, wipe its volume, re-add, promote.
    ReplaceAmnesiac,
    /// Restarting member `id` on the current pod template (image, resources, flags
    /// changed): move leadership away, delete its pod (`podUid`), wait until the new pod's
    /// member is healthy again. Its volume and raft membership stay.
    Restart,
}

/// Progress marker of a [`OperationKind::ReplaceAmnesiac`] operation (the other kinds are
/// derived from observation alone).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum OperationStage {
    /// Nothing done yet that observation cannot show.
    #[default]
    Started,
    /// The member was seen removed from raft.
    Removed,
    /// Deleting the pod and volume claim whose UIDs are recorded in the operation.
    Wiping,
    /// The old pod and claim are gone; the member is re-added as a learner, then promoted.
    Wiped,
}

/// A membership operation recorded in status before the operator mutates anything.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// What is being done.
    pub kind: OperationKind,
    /// Raft id of the member concerned (pod ordinal + 1).
    pub id: u64,
    /// Progress marker (ReplaceAmnesiac only).
    #[serde(default)]
    pub stage: OperationStage,
    /// UID of the pod being wiped (ReplaceAmnesiac, stage Wiping) or restarted (Restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// UID of the volume claim being wiped (stage Wiping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc_uid: Option<String>,
}

impl Operation {
    /// A new operation at its first stage.
    pub fn new(kind: OperationKind, id: u64) -> Self {
        Operation { kind, id, stage: OperationStage::Started, pod_uid: None, pvc_uid: None }
    }

    /// The same operation at another stage.
    pub fn at(&self, stage: OperationStage) -> Self {
        Operation { stage, ..self.clone() }
    }
}

/// Renders the CRD as YAML. Deterministic: same binary, same bytes.
pub fn crd_yaml() -> String {
    // The CRD value is built from fixed types; serde_json maps iterate in a fixed order
    // (sorted, or insertion order with `preserve_order`), so the output is stable.
    let value = serde_json::to_value(RaftKV::crd()).unwrap_or_default();
    match serde_yaml::to_string(&value) {
        Ok(s) => s,
        // Serializing a serde_json::Value to YAML cannot fail; keep a visible marker anyway.
        Err(e) => format!("# failed to render CRD: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd_json() -> serde_json::Value {
        serde_json::to_value(RaftKV::crd()).expect("crd serializes")
    }

    #[test]
    fn names_and_scope_are_the_published_conventions() {
        let crd = crd_json();
        assert_eq!(crd["metadata"]["name"], "raftkvs.raftkv.dev");
        assert_eq!(crd["spec"]["group"], GROUP);
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["kind"], "RaftKV");
        assert_eq!(crd["spec"]["names"]["plural"], "raftkvs");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "rkv");
        assert_eq!(crd["spec"]["versions"][0]["name"], VERSION);
    }

    #[test]
    fn scale_and_status_subresources() {
        let crd = crd_json();
        let sub = &crd["spec"]["versions"][0]["subresources"];
        assert!(sub["status"].is_object());
        assert_eq!(sub["scale"]["specReplicasPath"], ".spec.replicas");
        assert_eq!(sub["scale"]["statusReplicasPath"], ".status.replicas");
        assert_eq!(sub["scale"]["labelSelectorPath"], ".status.selector");
    }

    #[test]
    fn printer_columns() {
        let crd = crd_json();
        let cols: Vec<String> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c["name"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(cols, ["Replicas", "Ready", "Updated", "Leader", "Phase", "Age"]);
    }

    #[test]
    fn validation_rules_are_in_the_schema() {
        let yaml = crd_yaml();
        assert!(yaml.contains("self >= 1 && self <= 9"), "{yaml}");
        assert!(yaml.contains("self == oldSelf"), "{yaml}");
        let crd = crd_json();
        let replicas = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["replicas"];
        assert_eq!(replicas["minimum"].as_f64(), Some(1.0), "{replicas}");
        assert_eq!(replicas["maximum"].as_f64(), Some(9.0), "{replicas}");
    }

    #[test]
    fn field_docs_become_descriptions() {
        let crd = crd_json();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let d = spec["properties"]["replicas"]["description"].as_str().unwrap_or_default();
        assert!(d.contains("Number of raft voters"), "{d}");
        // Enum fields show the enum's doc: it must explain every value.
        let d = spec["properties"]["podAntiAffinity"]["description"].as_str().unwrap_or_default().replace('\n', " ");
        for v in ["`Soft` (default)", "`Hard` requires", "`None`"] {
            assert!(d.contains(v), "podAntiAffinity's description lacks {v}: {d}");
        }
        let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
        // Doc comments keep their line breaks; read the text as one line.
        let d = status["properties"]["phase"]["description"].as_str().unwrap_or_default().replace('\n', " ");
        for v in ["Creating", "Running", "Scaling", "Repairing", "Updating", "Degraded"] {
            assert!(d.contains(&format!("`{v}` (")), "phase's description does not explain {v}: {d}");
        }
        let spec_props = &spec["properties"];
        let pull = spec_props["imagePullPolicy"]["x-kubernetes-validations"][0]["rule"].as_str().unwrap_or_default();
        assert!(pull.contains("'IfNotPresent'"), "imagePullPolicy has no value rule: {}", spec_props["imagePullPolicy"]);
        let storage = spec_props["storage"]["x-kubernetes-validations"][0]["rule"].as_str().unwrap_or_default();
        assert!(storage.contains("has(oldSelf.storageClassName)"), "storage has no class transition rule: {}", spec_props["storage"]);
        // The image: a pattern and a length (not CEL: a regex over an unbounded string can
        // exceed the API server's estimated cost budget and get the whole CRD refused).
        assert_eq!(spec_props["image"]["pattern"], r"^\S+$", "{}", spec_props["image"]);
        assert_eq!(spec_props["image"]["maxLength"], 1024, "{}", spec_props["image"]);
        let image = regex::Regex::new(spec_props["image"]["pattern"].as_str().unwrap_or_default()).expect("regex");
        assert!(image.is_match("reg.example/raftkv-node:1.2@sha256:ab"));
        for bad in ["", " raftkv-node", "raftkv-node ", "raft kv"] {
            assert!(!image.is_match(bad), "{bad:?}");
        }
        // Root rules: the name (DNS-1035, at most 52; at most 45 with backups).
        let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"];
        let rules: Vec<&str> = root.as_array().map(|a| a.iter().filter_map(|r| r["rule"].as_str()).collect()).unwrap_or_default();
        assert!(rules.iter().any(|r| r.contains("self.metadata.name.size() <= 52")), "{root}");
        assert!(rules.iter().any(|r| r.contains("!self.metadata.name.endsWith('-peer')")), "{root}");
        assert!(rules.iter().any(|r| r.contains("has(self.spec.backup)") && r.contains("<= 45")), "{root}");
    }

    #[test]
    fn crd_yaml_is_deterministic() {
        assert_eq!(crd_yaml(), crd_yaml());
        assert!(crd_yaml().starts_with("apiVersion: apiextensions.k8s.io/v1"));
    }

    #[test]
    fn spec_defaults_apply() {
        let spec: RaftKVSpec = serde_json::from_value(serde_json::json!({"replicas": 3})).expect("parses");
        assert_eq!(spec.storage.size, "1Gi");
        assert_eq!(spec.image, None);
    }

    #[test]
    fn storage_size_pattern_takes_quantities_and_refuses_the_rest() {
        let re = regex::Regex::new(STORAGE_SIZE_PATTERN).expect("pattern compiles");
        for ok in ["1Gi", "10Gi", "1.5Gi", "1.0Gi", "0.5Gi", ".5Gi", "500Mi", "1", "100G", "2Ti", "1k", "010Gi"] {
            assert!(re.is_match(ok), "{ok} refused");
        }
        for bad in ["", "0", "0Gi", "0.0Gi", "-1Gi", "1 Gi", "1GB", "1gi", "Gi", "ten gigs", "1.Gi", "1Gi ", "1e3"] {
            assert!(!re.is_match(bad), "{bad:?} taken");
        }
        // The generated CRD carries it.
        let crd = serde_json::to_value(RaftKV::crd()).expect("crd json");
        let size = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["storage"]["properties"]["size"];
        assert_eq!(size["pattern"], STORAGE_SIZE_PATTERN, "{size}");
    }

    #[test]
    fn backup_schedule_pattern_takes_cron_lines_and_macros() {
        let re = regex::Regex::new(BACKUP_SCHEDULE_PATTERN).expect("pattern compiles");
        for ok in ["0 */6 * * *", "*/15 * * * *", "30 2 * * 1-5", "0 0 1 JAN,JUL *", "0 3 * * SUN", "0 3 ? * mon-fri", "5,35 1-23/2 * * *", "@daily", "@hourly", "@weekly", "0  4 * * *"] {
            assert!(re.is_match(ok), "{ok} refused");
        }
        // What Kubernetes' cron parser refuses: Quartz's L, W and #, words, six fields,
        // a time zone prefix.
        for bad in ["", "* * * *", "* * * * * *", "@often", "daily", " 0 * * * *", "0 * * * * ", "0 * * * *; rm -rf /", "TZ=UTC 0 * * * *", "0 0 L * *", "0 0 15W * *", "0 0 * * 5#3", "a b c d e", "0 0 * * Sunday", "0 0 * * Sun", "0 0 1-/2 * *", "0 0 ,1 * *"] {
            assert!(!re.is_match(bad), "{bad:?} taken");
        }
        let crd = crd_json();
        let backup = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["backup"];
        let props = &backup["properties"];
        assert_eq!(props["schedule"]["pattern"], BACKUP_SCHEDULE_PATTERN, "{backup}");
        assert_eq!((props["keep"]["minimum"].as_f64(), props["keep"]["maximum"].as_f64()), (Some(1.0), Some(1000.0)), "{backup}");
        assert!(backup["description"].as_str().unwrap_or_default().contains("CronJob"), "{backup}");
        let spec: RaftKVSpec = serde_json::from_value(serde_json::json!({"replicas": 3, "backup": {"schedule": "@daily"}})).expect("parses");
        let b = spec.backup.expect("backup");
        assert_eq!((b.keep, b.suspend, b.storage.size.as_str()), (7, false, "1Gi"), "defaults");
    }
}
