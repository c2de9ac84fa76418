//! Client-free builders of the objects a `RaftKV` owns: the StatefulSet, the headless
//! peer Service, the client Service and the PodDisruptionBudget; with `spec.backup`, the
//! backup CronJob and the backups claim. Names, ports, labels and
//! environment follow the conventions listed at the top of docs/membership.md.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{AntiAffinityPreset, RaftKV};

/// Client API port (also serves `/metrics`, `/healthz`, `/readyz`).
pub const CLIENT_PORT: i32 = 2379;
/// Raft peer port.
pub const PEER_PORT: i32 = 2380;
/// Data directory inside the container.
pub const DATA_DIR: &str = "/var/lib/raftkv";
/// Name of the volume claim template (claims are `data-<name>-<ordinal>`).
pub const DATA_VOLUME: &str = "data";
/// Field manager for server-side apply.
pub const MANAGER: &str = "raftkv-operator";
/// Default snapshot interval when the spec has none.
pub const DEFAULT_SNAPSHOT_COUNT: i64 = 10_000;

/// Default node image: `raftkv-node:<operator version>`.
pub fn default_image() -> String {
    format!("raftkv-node:{}", env!("CARGO_PKG_VERSION"))
}

/// Labels selecting the pods (and claims) of cluster `name`.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "raftkv".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
    ])
}

/// Selector labels plus `managed-by`.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert("app.kubernetes.io/managed-by".to_string(), "raftkv-operator".to_string());
    l
}

/// The selector as a string (`status.selector`, `kubectl get pods -l`).
pub fn selector_string(name: &str) -> String {
    selector_labels(name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Name of the headless peer Service.
pub fn peer_service_name(name: &str) -> String {
    format!("{name}-peer")
}

/// Pod name of an ordinal.
pub fn pod_name(name: &str, ordinal: u32) -> String {
    format!("{name}-{ordinal}")
}

/// Claim name of an ordinal.
pub fn pvc_name(name: &str, ordinal: u32) -> String {
    format!("{DATA_VOLUME}-{name}-{ordinal}")
}

/// Ordinal of the pod `<name>-<i>` of this cluster.
pub fn pod_ordinal(cluster: &str, pod_name: &str) -> Option<u32> {
    ordinal_after(pod_name.strip_prefix(cluster)?)
}

/// Ordinal of the volume claim `data-<name>-<i>` of this cluster. Separate from
/// [`pod_ordinal`]: a cluster may itself be named `data-...`, and its pod `data-x-0`
/// must not be read as the claim of a cluster `x`.
pub fn pvc_ordinal(cluster: &str, claim_name: &str) -> Option<u32> {
    ordinal_after(claim_name.strip_prefix(DATA_VOLUME)?.strip_prefix('-')?.strip_prefix(cluster)?)
}

/// `-<i>` with `i` a decimal number without leading zeros.
fn ordinal_after(rest: &str) -> Option<u32> {
    let n = rest.strip_prefix('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok()
}

/// Peer URL of raft id `id` (ordinal `id - 1`).
pub fn peer_url(name: &str, namespace: &str, id: u64) -> String {
    format!("http://{name}-{}.{}.{namespace}.svc:{PEER_PORT}", id.saturating_sub(1), peer_service_name(name))
}

/// Client URL of raft id `id`, reached through the headless Service's per-pod DNS name.
pub fn client_url(name: &str, namespace: &str, id: u64) -> String {
    format!("http://{name}-{}.{}.{namespace}.svc:{CLIENT_PORT}", id.saturating_sub(1), peer_service_name(name))
}

/// Peer URLs of the initial cluster of `size` members.
pub fn initial_cluster(name: &str, namespace: &str, size: u32) -> Vec<String> {
    (1..=u64::from(size)).map(|id| peer_url(name, namespace, id)).collect()
}

/// Owner reference making `rkv` the controller of an object.
pub fn owner_ref(rkv: &RaftKV) -> Option<OwnerReference> {
    rkv.controller_owner_ref(&())
}

fn meta(rkv: &RaftKV, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: rkv.namespace(),
        labels: Some(labels(&rkv.name_any())),
        owner_references: owner_ref(rkv).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        ..ServicePort::default()
    }
}

/// Label telling a cluster's two Services apart: `peer` or `client`. A ServiceMonitor
/// selects `peer` to scrape every pod exactly once, ready or not.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

fn service_meta(rkv: &RaftKV, name: String, component: &str) -> ObjectMeta {
    let mut m = meta(rkv, name);
    m.labels.get_or_insert_with(BTreeMap::new).insert(COMPONENT_LABEL.to_string(), component.to_string());
    m
}

/// Headless Service `<name>-peer` giving each pod a DNS name, ready or not (label
/// `app.kubernetes.io/component: peer`). It also lists the client port, which the
/// operator reaches each member on.
pub fn peer_service(rkv: &RaftKV) -> Service {
    let name = rkv.name_any();
    Service {
        metadata: service_meta(rkv, peer_service_name(&name), "peer"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("peer", PEER_PORT), port("client", CLIENT_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Client Service `<name>` on port 2379 (ready pods only; also serves `/metrics`; label
/// `app.kubernetes.io/component: client`).
pub fn client_service(rkv: &RaftKV) -> Service {
    let name = rkv.name_any();
    Service {
        metadata: service_meta(rkv, name.clone(), "client"),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("client", CLIENT_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// PodDisruptionBudget `<name>`: with `voters` voters, at most `voters - majority`
/// pods may be disrupted at once (0 for one or two voters: any disruption loses quorum).
pub fn pdb(rkv: &RaftKV, voters: u32) -> PodDisruptionBudget {
    let name = rkv.name_any();
    let majority = voters / 2 + 1;
    let max_unavailable = voters.saturating_sub(majority);
    PodDisruptionBudget {
        metadata: meta(rkv, name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(i32::try_from(max_unavailable).unwrap_or(0))),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(&name)), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.into()), ..EnvVar::default() }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(CLIENT_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn affinity(rkv: &RaftKV) -> Option<Affinity> {
    if let Some(a) = &rkv.spec.affinity {
        return Some(a.clone());
    }
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(&rkv.name_any())),
            ..LabelSelector::default()
        }),
        topology_key: "kubernetes.io/hostname".to_string(),
        ..PodAffinityTerm::default()
    };
    let anti = match rkv.spec.pod_anti_affinity.unwrap_or_default() {
        AntiAffinityPreset::None => return None,
        AntiAffinityPreset::Soft => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: term,
            }]),
            ..PodAntiAffinity::default()
        },
        AntiAffinityPreset::Hard => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
    };
    Some(Affinity { pod_anti_affinity: Some(anti), ..Affinity::default() })
}

/// The StatefulSet `<name>` with `replicas` pods. `initial_cluster` is the fixed
/// RAFTKV_CLUSTER; once `bootstrapped`, pods with an empty volume start in join mode
/// (RAFTKV_JOIN=true) so a lost volume never bootstraps a second cluster. The resource's
/// uid is the cluster token, so a RaftKV deleted and created again under the same name
/// (same pod and peer names) gets another cluster id, and pods of the old one are refused.
///
/// The update strategy is OnDelete: the operator, not the StatefulSet controller, decides
/// when a member restarts. The pod template carries [`TEMPLATE_HASH_ANNOTATION`] (see
/// [`template_hash`]), which pods keep, so the operator tells which run an older one.
pub fn statefulset(rkv: &RaftKV, replicas: u32, initial_cluster: &[String], bootstrapped: bool) -> StatefulSet {
    let name = rkv.name_any();
    let spec = &rkv.spec;
    let mut envs = vec![
        env("RAFTKV_ID_FROM_HOSTNAME", "true"),
        env("RAFTKV_CLUSTER", initial_cluster.join(",")),
        env("RAFTKV_INITIAL_CLUSTER_TOKEN", rkv.uid().unwrap_or_else(|| name.clone())),
        env("RAFTKV_PORT", CLIENT_PORT.to_string()),
        env("RAFTKV_DATA_DIR", DATA_DIR),
        env("RAFTKV_SNAPSHOT_COUNT", spec.snapshot_count.unwrap_or(DEFAULT_SNAPSHOT_COUNT).to_string()),
        // Peer URL of this pod (needed when its id is beyond the initial cluster).
        EnvVar {
            name: "POD_NAME".to_string(),
            value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                    field_path: "metadata.name".to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..EnvVar::default()
        },
        env(
            "RAFTKV_PEER_URL",
            format!("http://$(POD_NAME).{}.{}.svc:{PEER_PORT}", peer_service_name(&name), rkv.namespace().unwrap_or_default()),
        ),
    ];
    if bootstrapped {
        envs.push(env("RAFTKV_JOIN", "true"));
    }
    if spec.watch_prev_kv == Some(true) {
        envs.push(env("RAFTKV_WATCH_PREV_KV", "true"));
    }
    let container = Container {
        name: NODE_CONTAINER.to_string(),
        image: Some(spec.image.clone().unwrap_or_else(default_image)),
        image_pull_policy: spec.image_pull_policy.clone(),
        env: Some(envs),
        ports: Some(vec![
            ContainerPort { name: Some("client".into()), container_port: CLIENT_PORT, ..ContainerPort::default() },
            ContainerPort { name: Some("peer".into()), container_port: PEER_PORT, ..ContainerPort::default() },
        ]),
        // The node serves HTTP only once it has loaded its snapshot and replayed its
        // log, which takes a while for a large store on a slow volume: until /healthz
        // first answers (up to 30 minutes) the liveness probe waits, so that it never
        // kills a member that is still loading (it would start loading again, for ever).
        startup_probe: Some(http_probe("/healthz", 10, 180)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        resources: spec.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_VOLUME.to_string(),
            mount_path: DATA_DIR.to_string(),
            ..VolumeMount::default()
        }]),
        // The node writes only to its data volume.
        security_context: Some(restricted_container()),
        ..Container::default()
    };
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), CLIENT_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_string()),
            labels: Some(labels(&name)),
            ..ObjectMeta::default()
        },
        spec: Some(rwo_claim(&spec.storage.size, spec.storage.storage_class_name.as_deref())),
        ..PersistentVolumeClaim::default()
    };
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(&name)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            node_selector: spec.node_selector.clone(),
            tolerations: spec.tolerations.clone(),
            affinity: affinity(rkv),
            termination_grace_period_seconds: Some(30),
            security_context: Some(restricted_pod()),
            ..PodSpec::default()
        }),
    };
    let hash = template_hash(&template);
    if let Some(a) = template.metadata.as_mut().and_then(|m| m.annotations.as_mut()) {
        a.insert(TEMPLATE_HASH_ANNOTATION.to_string(), hash);
    }
    StatefulSet {
        metadata: meta(rkv, name.clone()),
        spec: StatefulSetSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            service_name: Some(peer_service_name(&name)),
            pod_management_policy: Some("Parallel".to_string()),
            update_strategy: Some(StatefulSetUpdateStrategy { type_: Some("OnDelete".to_string()), ..Default::default() }),
            selector: LabelSelector { match_labels: Some(selector_labels(&name)), ..LabelSelector::default() },
            template,
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// Name of the node's container in member pods.
pub const NODE_CONTAINER: &str = "raftkv";

/// Pod-template annotation holding [`template_hash`]; the pods made from it keep it.
pub const TEMPLATE_HASH_ANNOTATION: &str = "raftkv.dev/template-hash";

/// A stable hash (FNV-1a, 64 bits, hex) of what a member pod runs: the pod template as
/// JSON, without `RAFTKV_JOIN` (set once the cluster has bootstrapped; it changes nothing
/// for a pod that has data, so it must not restart every member) and without this hash.
/// A pod whose [`TEMPLATE_HASH_ANNOTATION`] differs from the StatefulSet's runs an older
/// template and is restarted (see `membership::decide`).
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let mut t = template.clone();
    if let Some(a) = t.metadata.as_mut().and_then(|m| m.annotations.as_mut()) {
        a.remove(TEMPLATE_HASH_ANNOTATION);
    }
    for c in t.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
        if let Some(env) = c.env.as_mut() {
            env.retain(|e| e.name != "RAFTKV_JOIN");
        }
    }
    let bytes = serde_json::to_vec(&t).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The [`template_hash`] a StatefulSet's pod template carries, if any.
pub fn statefulset_template_hash(sts: &StatefulSet) -> Option<String> {
    sts.spec.template.metadata.as_ref()?.annotations.as_ref()?.get(TEMPLATE_HASH_ANNOTATION).cloned()
}

/// Every object the operator creates for a new `rkv` (before any member exists: the
/// StatefulSet at `spec.replicas`, the initial cluster of that size, a PDB for as many
/// voters), as JSON in the order they are applied; for `raftkv-operator render` and for
/// validating the builders against the Kubernetes schemas (scripts/check-chart.sh).
pub fn initial_objects(rkv: &RaftKV) -> Vec<serde_json::Value> {
    let name = rkv.name_any();
    let replicas = u32::try_from(rkv.spec.replicas.clamp(1, crate::crd::MAX_REPLICAS)).unwrap_or(1);
    let init = initial_cluster(&name, &rkv.namespace().unwrap_or_default(), replicas);
    let mut out = vec![
        with_kind(serde_json::to_value(peer_service(rkv)), "v1", "Service"),
        with_kind(serde_json::to_value(client_service(rkv)), "v1", "Service"),
        with_kind(serde_json::to_value(statefulset(rkv, replicas, &init, false)), "apps/v1", "StatefulSet"),
        with_kind(serde_json::to_value(pdb(rkv, replicas)), "policy/v1", "PodDisruptionBudget"),
    ];
    if let Some(claim) = backup_pvc(rkv) {
        out.push(with_kind(serde_json::to_value(claim), "v1", "PersistentVolumeClaim"));
    }
    if let Some(cron) = backup_cronjob(rkv) {
        out.push(with_kind(serde_json::to_value(cron), "batch/v1", "CronJob"));
    }
    out
}

/// The object with its `apiVersion` and `kind` (k8s-openapi's serializer writes them;
/// set here too, so the output never depends on that).
fn with_kind(v: serde_json::Result<serde_json::Value>, api_version: &str, kind: &str) -> serde_json::Value {
    let mut v = v.unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("apiVersion".into(), api_version.into());
        o.insert("kind".into(), kind.into());
    }
    v
}

/// The uid and gid the node image runs as (images/node.Dockerfile).
pub const NODE_UID: i64 = 65532;

/// A container that writes only to its volumes: no privilege escalation, a read-only
/// root filesystem, no capabilities (members and backup jobs alike).
fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        ..SecurityContext::default()
    }
}

/// The pod security of members and backup jobs (the `restricted` standard): the image
/// runs as 65532; fsGroup makes a fresh volume writable for it on storage that hands out
/// root-owned volumes.
fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NODE_UID),
        run_as_group: Some(NODE_UID),
        fs_group: Some(NODE_UID),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..PodSecurityContext::default()
    }
}

/// A ReadWriteOnce claim spec of `size`, in `class` (the cluster default when None).
fn rwo_claim(size: &str, class: Option<&str>) -> PersistentVolumeClaimSpec {
    PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".to_string()]),
        storage_class_name: class.map(str::to_string),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([("storage".to_string(), Quantity(size.to_string()))])),
            ..VolumeResourceRequirements::default()
        }),
        ..PersistentVolumeClaimSpec::default()
    }
}

/// Where the backup job mounts the backups claim.
pub const BACKUP_DIR: &str = "/backups";

/// Name of the backup CronJob of cluster `name`.
pub fn backup_cronjob_name(name: &str) -> String {
    format!("{name}-backup")
}

/// Name of the volume claim holding the backups of cluster `name`.
pub fn backup_pvc_name(name: &str) -> String {
    format!("{name}-backups")
}

/// Labels of the backup CronJob, its pods and the backups claim. Not the members'
/// selector labels: a backup pod must never count as a member (Services, the PDB, the
/// operator's own pod listing).
pub fn backup_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "raftkv-backup".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "raftkv-operator".to_string()),
    ])
}

/// The claim `<name>-backups` for `spec.backup` (None without it). It has no owner
/// reference: backups outlive the cluster they were taken from.
pub fn backup_pvc(rkv: &RaftKV) -> Option<PersistentVolumeClaim> {
    let backup = rkv.spec.backup.as_ref()?;
    let name = rkv.name_any();
    Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(backup_pvc_name(&name)),
            namespace: rkv.namespace(),
            labels: Some(backup_labels(&name)),
            ..ObjectMeta::default()
        },
        spec: Some(rwo_claim(&backup.storage.size, backup.storage.storage_class_name.as_deref())),
        ..PersistentVolumeClaim::default()
    })
}

/// The CronJob `<name>-backup` for `spec.backup` (None without it): on the schedule, one
/// job at a time, `raftkv-node backup` (the node image) fetches a linearizable backup
/// through the client Service, checks it, writes it to the backups claim and keeps the
/// newest `keep`.
pub fn backup_cronjob(rkv: &RaftKV) -> Option<CronJob> {
    let backup = rkv.spec.backup.as_ref()?;
    let name = rkv.name_any();
    let ns = rkv.namespace().unwrap_or_default();
    let endpoint = format!("http://{name}.{ns}.svc:{CLIENT_PORT}");
    let container = Container {
        name: "backup".to_string(),
        image: Some(rkv.spec.image.clone().unwrap_or_else(default_image)),
        image_pull_policy: rkv.spec.image_pull_policy.clone(),
        args: Some(vec![
            "backup".to_string(),
            "--endpoints".to_string(),
            endpoint,
            "--dir".to_string(),
            BACKUP_DIR.to_string(),
            "--keep".to_string(),
            backup.keep.clamp(1, 1000).to_string(),
        ]),
        volume_mounts: Some(vec![VolumeMount { name: "backups".to_string(), mount_path: BACKUP_DIR.to_string(), ..VolumeMount::default() }]),
        security_context: Some(restricted_container()),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".to_string()),
        node_selector: rkv.spec.node_selector.clone(),
        tolerations: rkv.spec.tolerations.clone(),
        volumes: Some(vec![Volume {
            name: "backups".to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource { claim_name: backup_pvc_name(&name), read_only: None }),
            ..Volume::default()
        }]),
        security_context: Some(restricted_pod()),
        ..PodSpec::default()
    };
    let labels = backup_labels(&name);
    Some(CronJob {
        metadata: ObjectMeta { labels: Some(labels.clone()), ..meta(rkv, backup_cronjob_name(&name)) },
        spec: CronJobSpec {
            schedule: backup.schedule.clone(),
            suspend: Some(backup.suspend),
            // A backup still running when the next one is due: skip the next one.
            concurrency_policy: Some("Forbid".to_string()),
            // A schedule missed (the controller was down) by more than this is skipped.
            starting_deadline_seconds: Some(300),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels.clone()), ..ObjectMeta::default() }),
                spec: Some(JobSpec {
                    backoff_limit: Some(2),
                    active_deadline_seconds: Some(3600),
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                        spec: Some(pod),
                    },
                    ..JobSpec::default()
                }),
            },
            ..CronJobSpec::default()
        },
        ..CronJob::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{RaftKVSpec, StorageSpec};

    #[test]
    fn node_pods_run_restricted_and_own_their_volume() {
        let init = vec!["http://kv-0.kv-peer.ns.svc:2380".to_string()];
        let sts = statefulset(&rkv(), 1, &init, false);
        let pod = sts.spec.template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.fs_group, Some(NODE_UID));
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let csc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(csc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    }

    fn rkv() -> RaftKV {
        let mut r = RaftKV::new(
            "kv",
            RaftKVSpec {
                replicas: 3,
                image: None,
                image_pull_policy: None,
                storage: StorageSpec { size: "2Gi".into(), storage_class_name: Some("fast".into()) },
                resources: None,
                snapshot_count: Some(500),
                node_selector: None,
                tolerations: None,
                affinity: None,
                pod_anti_affinity: None,
                watch_prev_kv: None,
                backup: None,
            },
        );
        r.metadata.namespace = Some("db".into());
        r.metadata.uid = Some("uid-1".into());
        r
    }

    fn env_of(sts: &StatefulSet) -> BTreeMap<String, String> {
        let c = &sts.spec.template.spec.as_ref().expect("pod").containers[0];
        c.env.clone().unwrap_or_default().into_iter().map(|e| (e.name, e.value.unwrap_or_default())).collect()
    }

    #[test]
    fn names_and_urls() {
        assert_eq!(peer_url("kv", "db", 1), "http://kv-0.kv-peer.db.svc:2380");
        assert_eq!(client_url("kv", "db", 3), "http://kv-2.kv-peer.db.svc:2379");
        assert_eq!(pvc_name("kv", 4), "data-kv-4");
        assert_eq!(pod_ordinal("kv", "kv-12"), Some(12));
        assert_eq!(pvc_ordinal("kv", "data-kv-0"), Some(0));
        assert_eq!(pod_ordinal("kv", "data-kv-0"), None);
        assert_eq!(pvc_ordinal("kv", "kv-0"), None);
        assert_eq!(pod_ordinal("kv", "kv-peer"), None);
        assert_eq!(pod_ordinal("kv", "kvx-1"), None);
        assert_eq!(pod_ordinal("kv", "kv-01"), None);
        // A cluster whose name starts with the claim prefix sees its own pods and claims.
        assert_eq!(pod_ordinal("data-store", "data-store-2"), Some(2));
        assert_eq!(pvc_ordinal("data-store", "data-data-store-2"), Some(2));
        assert_eq!(pvc_ordinal("store", "data-store-2"), Some(2));
        assert_eq!(pod_ordinal("store", "data-store-2"), None);
        assert_eq!(pod_ordinal("data", "data-1"), Some(1));
        assert_eq!(pvc_ordinal("data", "data-data-1"), Some(1));
        assert_eq!(selector_string("kv"), "app.kubernetes.io/instance=kv,app.kubernetes.io/name=raftkv");
    }

    #[test]
    fn statefulset_follows_the_conventions() {
        let init = initial_cluster("kv", "db", 3);
        let sts = statefulset(&rkv(), 4, &init, false);
        let spec = &sts.spec;
        assert_eq!(spec.replicas, Some(4));
        assert_eq!(spec.service_name.as_deref(), Some("kv-peer"));
        assert_eq!(sts.metadata.owner_references.as_ref().expect("owner")[0].uid, "uid-1");
        let env = env_of(&sts);
        assert_eq!(env["RAFTKV_CLUSTER"], init.join(","));
        assert_eq!(env["RAFTKV_ID_FROM_HOSTNAME"], "true");
        assert_eq!(env["RAFTKV_INITIAL_CLUSTER_TOKEN"], "uid-1");
        assert_eq!(env["RAFTKV_PORT"], "2379");
        assert_eq!(env["RAFTKV_DATA_DIR"], DATA_DIR);
        assert_eq!(env["RAFTKV_SNAPSHOT_COUNT"], "500");
        assert!(!env.contains_key("RAFTKV_JOIN"));
        assert!(env_of(&statefulset(&rkv(), 3, &init, true)).contains_key("RAFTKV_JOIN"));
        assert!(!env.contains_key("RAFTKV_WATCH_PREV_KV"));
        let mut prev = rkv();
        prev.spec.watch_prev_kv = Some(true);
        assert_eq!(env_of(&statefulset(&prev, 3, &init, true))["RAFTKV_WATCH_PREV_KV"], "true");
        let pod = spec.template.spec.as_ref().expect("pod");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some(default_image().as_str()));
        let probe_path = |p: &Option<Probe>| p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone());
        assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
        // Loading a large store must not be cut short by the liveness probe.
        assert_eq!(probe_path(&c.startup_probe).as_deref(), Some("/healthz"));
        let budget = |p: &Option<Probe>| p.as_ref().map(|p| p.period_seconds.unwrap_or(10) * p.failure_threshold.unwrap_or(3)).unwrap_or(0);
        assert!(budget(&c.startup_probe) >= 1800 && budget(&c.liveness_probe) <= 30, "startup {} s, liveness {} s", budget(&c.startup_probe), budget(&c.liveness_probe));
        assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
        let ann = spec.template.metadata.as_ref().and_then(|m| m.annotations.clone()).expect("annotations");
        assert_eq!(ann["prometheus.io/scrape"], "true");
        assert_eq!(ann["prometheus.io/port"], "2379");
        let claim = &spec.volume_claim_templates.as_ref().expect("claims")[0];
        assert_eq!(claim.metadata.name.as_deref(), Some("data"));
        let cs = claim.spec.as_ref().expect("claim spec");
        assert_eq!(cs.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(cs.resources.as_ref().and_then(|r| r.requests.as_ref()).expect("req")["storage"].0, "2Gi");
        assert!(pod.affinity.as_ref().and_then(|a| a.pod_anti_affinity.as_ref()).is_some());
    }

    #[test]
    fn the_template_hash_follows_what_pods_run_but_not_the_join_flag() {
        let init = initial_cluster("kv", "ns", 3);
        let hash = |r: &RaftKV, bootstrapped: bool| {
            let sts = statefulset(r, 3, &init, bootstrapped);
            let h = statefulset_template_hash(&sts).expect("annotated");
            assert_eq!(h, template_hash(&sts.spec.template), "the annotation is the template's own hash");
            h
        };
        let base = hash(&rkv(), false);
        // Pinned: a change of the template the operator builds (a new env var, a probe, a
        // k8s-openapi upgrade that serializes differently, a new version, which is the
        // default image's tag) restarts every member once when the new operator rolls
        // out. Update this value knowingly, and say so in the CHANGELOG.
        assert_eq!(base, "b53737932ad8b3dd");
        assert_eq!(hash(&rkv(), true), base, "RAFTKV_JOIN after bootstrap restarts nobody");
        let five = statefulset(&rkv(), 5, &init, true);
        assert_eq!(statefulset_template_hash(&five), Some(base.clone()), "the pod count is not in the template");
        let mut image = rkv();
        image.spec.image = Some("example.org/raftkv:next".into());
        assert_ne!(hash(&image, false), base);
        let mut prev = rkv();
        prev.spec.watch_prev_kv = Some(true);
        assert_ne!(hash(&prev, false), base);
    }

    #[test]
    fn services() {
        let peer = peer_service(&rkv());
        let s = peer.spec.expect("spec");
        assert_eq!(peer.metadata.name.as_deref(), Some("kv-peer"));
        assert_eq!(s.cluster_ip.as_deref(), Some("None"));
        assert_eq!(s.publish_not_ready_addresses, Some(true));
        assert!(s.ports.expect("ports").iter().any(|p| p.port == 2380 && p.name.as_deref() == Some("peer")));
        let client = client_service(&rkv());
        assert_eq!(client.metadata.name.as_deref(), Some("kv"));
        let ports = client.spec.and_then(|s| s.ports).expect("ports");
        assert_eq!((ports[0].port, ports[0].name.as_deref()), (2379, Some("client")));
        // Both carry the cluster's labels, so only the component label tells them apart:
        // a monitor selecting on the others alone would scrape every pod twice.
        let component = |l: Option<&BTreeMap<String, String>>| l.and_then(|l| l.get(COMPONENT_LABEL)).cloned();
        assert_eq!(component(peer.metadata.labels.as_ref()).as_deref(), Some("peer"));
        assert_eq!(component(client.metadata.labels.as_ref()).as_deref(), Some("client"));
        for svc in [&peer.metadata, &client.metadata] {
            let l = svc.labels.as_ref().expect("labels");
            assert_eq!(l.get("app.kubernetes.io/name").map(String::as_str), Some("raftkv"));
            assert_eq!(l.get("app.kubernetes.io/instance").map(String::as_str), Some("kv"));
        }
    }

    #[test]
    fn pdb_keeps_a_majority() {
        let mu = |v| pdb(&rkv(), v).spec.and_then(|s| s.max_unavailable);
        assert_eq!(mu(1), Some(IntOrString::Int(0)));
        assert_eq!(mu(2), Some(IntOrString::Int(0)));
        assert_eq!(mu(3), Some(IntOrString::Int(1)));
        assert_eq!(mu(4), Some(IntOrString::Int(1)));
        assert_eq!(mu(5), Some(IntOrString::Int(2)));
        assert_eq!(mu(9), Some(IntOrString::Int(4)));
    }

    #[test]
    fn backup_cronjob_and_claim_follow_the_spec_and_never_pass_for_members() {
        assert!(backup_cronjob(&rkv()).is_none() && backup_pvc(&rkv()).is_none(), "no spec.backup, no objects");
        let mut r = rkv();
        r.spec.image = Some("reg/raftkv-node:1".into());
        r.spec.image_pull_policy = Some("Always".into());
        r.spec.node_selector = Some(BTreeMap::from([("disk".to_string(), "ssd".to_string())]));
        r.spec.backup = Some(crate::crd::BackupSpec {
            schedule: "@daily".into(),
            keep: 3,
            suspend: true,
            storage: crate::crd::BackupStorageSpec { size: "10Gi".into(), storage_class_name: None },
        });
        let cron = backup_cronjob(&r).expect("a CronJob");
        assert_eq!(cron.metadata.name.as_deref(), Some("kv-backup"));
        assert_eq!(cron.metadata.namespace.as_deref(), Some("db"));
        assert_eq!(cron.metadata.owner_references.as_ref().map(|o| o[0].uid.as_str()), Some("uid-1"), "goes with the cluster");
        let spec = &cron.spec;
        assert_eq!((spec.schedule.as_str(), spec.suspend, spec.concurrency_policy.as_deref()), ("@daily", Some(true), Some("Forbid")));
        let job = spec.job_template.spec.as_ref().expect("job");
        let pod = job.template.spec.as_ref().expect("pod");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.node_selector, r.spec.node_selector);
        let c = &pod.containers[0];
        assert_eq!((c.image.as_deref(), c.image_pull_policy.as_deref()), (Some("reg/raftkv-node:1"), Some("Always")));
        let args = c.args.clone().unwrap_or_default();
        assert_eq!(args, ["backup", "--endpoints", "http://kv.db.svc:2379", "--dir", BACKUP_DIR, "--keep", "3"]);
        assert_eq!(c.volume_mounts.as_ref().map(|m| m[0].mount_path.as_str()), Some(BACKUP_DIR));
        let vol = &pod.volumes.as_ref().expect("volumes")[0];
        assert_eq!(vol.persistent_volume_claim.as_ref().map(|p| p.claim_name.as_str()), Some("kv-backups"));
        // Restricted like the members.
        let psc = pod.security_context.clone().expect("pod security");
        assert_eq!((psc.run_as_non_root, psc.fs_group), (Some(true), Some(NODE_UID)));
        let csc = c.security_context.clone().expect("container security");
        assert_eq!((csc.read_only_root_filesystem, csc.allow_privilege_escalation), (Some(true), Some(false)));
        // A backup pod must never match the members' selector (Services, PDB, the
        // operator's pod listing).
        let members = selector_labels("kv");
        let pod_labels = job.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        assert!(!members.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{pod_labels:?}");
        let claim = backup_pvc(&r).expect("a claim");
        assert_eq!(claim.metadata.name.as_deref(), Some("kv-backups"));
        assert!(claim.metadata.owner_references.is_none(), "backups outlive the cluster");
        let claim_labels = claim.metadata.labels.clone().unwrap_or_default();
        assert!(!members.iter().all(|(k, v)| claim_labels.get(k) == Some(v)), "{claim_labels:?}");
        assert_eq!(pvc_ordinal("kv", "kv-backups"), None);
        assert_eq!(pod_ordinal("kv", "kv-backups"), None);
        let req = claim.spec.and_then(|s| s.resources).and_then(|r| r.requests).unwrap_or_default();
        assert_eq!(req.get("storage").map(|q| q.0.as_str()), Some("10Gi"));
    }
}
