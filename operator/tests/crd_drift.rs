//! Drift test: the checked-in CRD copies (`deploy/crd.yaml`, the chart's
//! `crds/raftkv.yaml`) must be exactly what `raftkv_operator::crd::crd_yaml()` renders,
//! and the chart and examples must use the CRD's group, version, kind and plural.
//!
//! Fix a failure with `bash scripts/gen-manifests.sh` (regenerates the copies and
//! `deploy/operator.yaml`), then commit the regenerated files.

use std::path::{Path, PathBuf};

use raftkv_operator::crd::crd_yaml;

const REGENERATE: &str = "regenerate with: bash scripts/gen-manifests.sh";

/// Checked-in copies of the CRD, relative to the repository root.
const CRD_COPIES: [&str; 2] = ["deploy/crd.yaml", "charts/raftkv-operator/crds/raftkv.yaml"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent directory")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; {REGENERATE}", path.display()))
}

/// Describes the first difference between two texts, line-wise.
fn first_difference(expected: &str, actual: &str) -> String {
    let (mut e, mut a) = (expected.lines(), actual.lines());
    let mut line = 1;
    loop {
        match (e.next(), a.next()) {
            (Some(x), Some(y)) if x == y => line += 1,
            (None, None) => return "texts differ only in trailing newlines".to_string(),
            (x, y) => {
                return format!(
                    "first difference at line {line}:\n  generated:  {}\n  checked in: {}",
                    x.unwrap_or("<end of text>"),
                    y.unwrap_or("<end of text>")
                )
            }
        }
    }
}

#[test]
fn checked_in_crd_copies_match_the_generator() {
    let generated = crd_yaml();
    assert!(
        generated.starts_with("apiVersion: apiextensions.k8s.io/v1"),
        "crd_yaml() does not render a CRD:\n{generated}"
    );
    let stale: Vec<String> = CRD_COPIES
        .iter()
        .filter_map(|rel| {
            let checked_in = read(rel);
            (checked_in != generated)
                .then(|| format!("{rel} is stale; {}", first_difference(&generated, &checked_in)))
        })
        .collect();
    assert!(stale.is_empty(), "{}\n{REGENERATE}", stale.join("\n"));
}

#[test]
fn first_difference_points_at_the_changed_line() {
    let msg = first_difference("a\nb\nc\n", "a\nx\nc\n");
    assert!(msg.contains("line 2") && msg.contains("generated:  b") && msg.contains("checked in: x"), "{msg}");
    assert!(first_difference("a\n", "a\nb\n").contains("<end of text>"));
}

/// Group, served version, kind and plural of the generated CRD.
fn crd_names() -> (String, String, String, String) {
    let crd: serde_yaml::Value = serde_yaml::from_str(&crd_yaml()).expect("generated CRD parses");
    let spec = &crd["spec"];
    let text = |v: &serde_yaml::Value, what: &str| {
        v.as_str().unwrap_or_else(|| panic!("generated CRD has no {what}")).to_string()
    };
    let versions = spec["versions"].as_sequence().expect("CRD has versions");
    let served = versions
        .iter()
        .find(|v| v["served"].as_bool() == Some(true) && v["storage"].as_bool() == Some(true))
        .expect("CRD has a served storage version");
    (
        text(&spec["group"], "spec.group"),
        text(&served["name"], "storage version"),
        text(&spec["names"]["kind"], "spec.names.kind"),
        text(&spec["names"]["plural"], "spec.names.plural"),
    )
}

#[test]
fn chart_and_examples_use_the_crd_names() {
    let (group, version, kind, plural) = crd_names();
    let api_version = format!("apiVersion: {group}/{version}");
    let kind_line = format!("kind: {kind}");
    for rel in ["charts/raftkv-operator/templates/raftkv.yaml", "deploy/examples/raftkv.yaml"] {
        let text = read(rel);
        assert!(text.contains(&api_version), "{rel} lacks `{api_version}`");
        assert!(text.contains(&kind_line), "{rel} lacks `{kind_line}`");
    }
    let rbac = read("charts/raftkv-operator/templates/rbac.yaml");
    for needle in [
        format!("apiGroups: [\"{group}\"]"),
        format!("resources: [\"{plural}\"]"),
        format!("resources: [\"{plural}/status\"]"),
    ] {
        assert!(rbac.contains(&needle), "chart ClusterRole lacks `{needle}`");
    }
}

/// The `matchLabels` of the chart's node ServiceMonitor (`<fullname>-nodes`), read from
/// the template: the lines under `matchLabels:` that follow the `-nodes` name.
fn node_monitor_selector() -> Vec<(String, String)> {
    let rel = "charts/raftkv-operator/templates/servicemonitor.yaml";
    let text = read(rel);
    let nodes = text
        .find("}}-nodes")
        .unwrap_or_else(|| panic!("{rel} has no `-nodes` ServiceMonitor"));
    let mut lines = text[nodes..].lines().skip_while(|l| l.trim() != "matchLabels:");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let head = lines.next().unwrap_or_else(|| panic!("{rel}: the node ServiceMonitor has no matchLabels"));
    lines
        .take_while(|l| indent(l) > indent(head))
        .map(|l| {
            let (k, v) = l.trim().split_once(": ").unwrap_or_else(|| panic!("{rel}: not a label: {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn the_node_service_monitor_selects_each_pod_once() {
    use raftkv_operator::crd::{RaftKV, RaftKVSpec};
    use raftkv_operator::resources::{client_service, peer_service};
    let mut rkv = RaftKV::new("kv", RaftKVSpec::with_replicas(3));
    rkv.metadata.namespace = Some("ns".into());
    let selector = node_monitor_selector();
    assert!(!selector.is_empty(), "the node ServiceMonitor selects nothing");
    let matches = |svc: &k8s_openapi::api::core::v1::Service| {
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    // The peer Service lists every pod (ready or not) with its client port; the client
    // Service lists the ready ones again. Selecting both would scrape each pod twice.
    assert!(matches(&peer_service(&rkv)), "the node ServiceMonitor {selector:?} misses the peer Service");
    assert!(!matches(&client_service(&rkv)), "the node ServiceMonitor {selector:?} also selects the client Service");
    let ports = peer_service(&rkv).spec.and_then(|s| s.ports).unwrap_or_default();
    assert!(
        ports.iter().any(|p| p.name.as_deref() == Some("client")),
        "the peer Service has no `client` port for the ServiceMonitor's endpoint"
    );
}
