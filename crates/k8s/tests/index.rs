//! The Kubernetes index, driven by applying and deleting objects directly (no API server):
//! which Pods are endpoints, and which objectives and rewrites apply.

use std::collections::BTreeMap;

use infergate_api::resources::{InferenceModelRewrite, InferenceObjective, InferencePool};
use infergate_core::endpoint::Engine;
use infergate_k8s::index::{Changes, Index, ENGINE_LABEL};
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

const NS: &str = "llm";

fn mk_pool(name: &str, ports: &[u16]) -> InferencePool {
    let ports: String = ports.iter().map(|p| format!("  - number: {p}\n")).collect();
    let picker = "  endpointPickerRef:\n    name: epp\n    port:\n      number: 9002\n";
    serde_yaml_ng::from_str(&format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n\
         metadata:\n  name: {name}\n  namespace: {NS}\n\
         spec:\n  selector:\n    matchLabels:\n      app: vllm\n  targetPorts:\n{ports}{picker}"
    ))
    .expect("pool YAML")
}

fn mk_pod(name: &str, ip: &str, ready: bool, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        },
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mk_objective(name: &str, pool: &str, priority: i32) -> InferenceObjective {
    serde_yaml_ng::from_str(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata:\n  name: {name}\n  namespace: {NS}\n\
         spec:\n  priority: {priority}\n  poolRef:\n    name: {pool}\n"
    ))
    .expect("objective YAML")
}

fn mk_rewrite(name: &str, created: &str, model: &str, target: &str) -> InferenceModelRewrite {
    serde_yaml_ng::from_str(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n\
         metadata:\n  name: {name}\n  namespace: {NS}\n  creationTimestamp: \"{created}\"\n\
         spec:\n  poolRef:\n    name: pool\n  rules:\n  - matches:\n    - model:\n        type: Exact\n        value: {model}\n    targets:\n    - modelRewrite: {target}\n      weight: 1\n"
    ))
    .expect("rewrite YAML")
}

fn addrs(ix: &Index) -> Vec<String> {
    ix.endpoints().iter().map(|e| e.addr.to_string()).collect()
}

#[test]
fn a_pod_is_an_endpoint_only_while_ready_selected_and_not_terminating() {
    let mut ix = Index::new(NS, "pool");
    let pod = mk_pod("a", "10.0.0.1", false, &[("app", "vllm")]);
    ix.apply_pod(&pod);
    assert!(addrs(&ix).is_empty(), "no pool yet");
    assert!(ix.apply_pool(mk_pool("pool", &[8000])));
    assert!(addrs(&ix).is_empty(), "not ready");
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[("app", "vllm")]));
    assert_eq!(addrs(&ix), ["10.0.0.1:8000"]);
    // Terminating: out at once, before the deletion arrives.
    let mut leaving = mk_pod("a", "10.0.0.1", true, &[("app", "vllm")]);
    leaving.metadata.deletion_timestamp = Some(Time(Default::default()));
    ix.apply_pod(&leaving);
    assert!(addrs(&ix).is_empty());
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[("app", "vllm")]));
    ix.delete_pod(NS, "a");
    assert!(addrs(&ix).is_empty());
    // A ready Pod without an IP yet is not an endpoint.
    let mut no_ip = mk_pod("b", "10.0.0.2", true, &[("app", "vllm")]);
    no_ip.status.as_mut().unwrap().pod_ip = None;
    ix.apply_pod(&no_ip);
    assert!(addrs(&ix).is_empty());
    // Deleting the pool empties it; it comes back with its Pods.
    ix.apply_pod(&mk_pod("b", "10.0.0.2", true, &[("app", "vllm")]));
    ix.delete_pool(NS, "pool");
    assert!(addrs(&ix).is_empty());
    ix.apply_pool(mk_pool("pool", &[8000]));
    assert_eq!(addrs(&ix), ["10.0.0.2:8000"]);
}

#[test]
fn label_changes_move_a_pod_in_and_out_and_other_namespaces_and_pools_are_ignored() {
    let mut ix = Index::new(NS, "pool");
    ix.apply_pool(mk_pool("pool", &[8000]));
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[("app", "other")]));
    assert!(addrs(&ix).is_empty());
    ix.apply_pod(&mk_pod(
        "a",
        "10.0.0.1",
        true,
        &[("app", "vllm"), ("x", "y")],
    ));
    assert_eq!(addrs(&ix), ["10.0.0.1:8000"]);
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[]));
    assert!(addrs(&ix).is_empty());
    let mut elsewhere = mk_pod("c", "10.0.0.3", true, &[("app", "vllm")]);
    elsewhere.metadata.namespace = Some("other".into());
    ix.apply_pod(&elsewhere);
    assert!(addrs(&ix).is_empty());
    // Another pool's object does not replace ours.
    assert!(!ix.apply_pool(mk_pool("another", &[9000])));
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[("app", "vllm")]));
    assert_eq!(addrs(&ix), ["10.0.0.1:8000"]);
}

#[test]
fn every_target_port_of_a_pod_is_an_endpoint_with_the_engine_from_its_label() {
    let mut ix = Index::new(NS, "pool");
    ix.apply_pool(mk_pool("pool", &[8000, 8001]));
    ix.apply_pod(&mk_pod(
        "a",
        "10.0.0.1",
        true,
        &[("app", "vllm"), (ENGINE_LABEL, "sglang")],
    ));
    ix.apply_pod(&mk_pod(
        "b",
        "10.0.0.2",
        true,
        &[("app", "vllm"), (ENGINE_LABEL, "tgi")],
    ));
    let eps = ix.endpoints();
    let got: Vec<(String, Engine, String)> = eps
        .iter()
        .map(|e| (e.addr.to_string(), e.engine, e.name.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("10.0.0.1:8000".into(), Engine::Sglang, "llm/a:8000".into()),
            ("10.0.0.1:8001".into(), Engine::Sglang, "llm/a:8001".into()),
            ("10.0.0.2:8000".into(), Engine::Vllm, "llm/b:8000".into()),
            ("10.0.0.2:8001".into(), Engine::Vllm, "llm/b:8001".into()),
        ]
    );
    // The unknown engine is read as vLLM, and said so.
    let problems = ix.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("llm/b") && problems[0].contains("tgi"),
        "{problems:?}"
    );
}

#[test]
fn objectives_appear_change_and_disappear_and_other_pools_are_ignored() {
    let mut ix = Index::new(NS, "pool");
    ix.apply_objective(mk_objective("batch", "pool", -1));
    ix.apply_objective(mk_objective("theirs", "another", 5));
    let prio = |ix: &Index| -> Vec<(String, i32)> {
        ix.policy()
            .objectives
            .iter()
            .map(|o| (o.name.clone(), o.priority))
            .collect()
    };
    assert_eq!(prio(&ix), [("batch".into(), -1)]);
    ix.apply_objective(mk_objective("batch", "pool", 3));
    assert_eq!(prio(&ix), [("batch".into(), 3)]);
    // Re-pointed at another pool: gone from ours.
    ix.apply_objective(mk_objective("batch", "another", 3));
    assert!(prio(&ix).is_empty());
    ix.apply_objective(mk_objective("batch", "pool", 3));
    ix.delete_objective(NS, "batch");
    assert!(prio(&ix).is_empty());
}

#[test]
fn conflicting_rewrites_are_ordered_oldest_first_whatever_the_arrival_order() {
    let mut ix = Index::new(NS, "pool");
    ix.apply_rewrite(mk_rewrite(
        "new",
        "2025-06-02T00:00:00Z",
        "llama",
        "llama-v2",
    ));
    ix.apply_rewrite(mk_rewrite(
        "old",
        "2025-06-01T00:00:00Z",
        "llama",
        "llama-v1",
    ));
    let order = |ix: &Index| -> Vec<String> {
        ix.policy()
            .rewrites
            .iter()
            .map(|r| r.source.clone())
            .collect()
    };
    assert_eq!(order(&ix), ["llm/old", "llm/new"]);
    // The older one goes away: the newer takes over.
    ix.delete_rewrite(NS, "old");
    assert_eq!(order(&ix), ["llm/new"]);
}

#[test]
fn only_events_that_change_this_pool_report_a_change() {
    let mut ix = Index::new(NS, "pool");
    ix.apply_pool(mk_pool("pool", &[8000]));
    ix.take_changes();

    // A Pod of another pool (labels do not match), added and made ready: nothing to push.
    ix.apply_pod(&mk_pod("other", "10.0.9.1", true, &[("app", "sglang")]));
    assert_eq!(ix.take_changes(), Changes::default());
    // A member turning ready: the endpoints changed, the policy did not.
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[("app", "vllm")]));
    assert_eq!(
        ix.take_changes(),
        Changes {
            endpoints: true,
            policy: false
        }
    );
    // The same Pod again (a resync, or a status change that does not matter): nothing.
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[("app", "vllm")]));
    assert_eq!(ix.take_changes(), Changes::default());
    // An objective of another pool: nothing. Of this pool: the policy.
    ix.apply_objective(mk_objective("x", "other-pool", 5));
    assert_eq!(ix.take_changes(), Changes::default());
    ix.apply_objective(mk_objective("y", "pool", 5));
    assert!(ix.take_changes().policy);
    ix.apply_objective(mk_objective("y", "pool", 5));
    assert!(!ix.take_changes().policy, "unchanged objective");
    // Deleting a Pod that was never a member: nothing; deleting a member: endpoints.
    ix.delete_pod(NS, "other");
    assert_eq!(ix.take_changes(), Changes::default());
    ix.delete_pod(NS, "a");
    assert!(ix.take_changes().endpoints);
    assert!(addrs(&ix).is_empty());
}

#[test]
fn a_pool_change_re_evaluates_every_pod_and_a_relist_drops_pods_that_vanished() {
    let mut ix = Index::new(NS, "pool");
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[("app", "vllm")]));
    ix.apply_pod(&mk_pod("b", "10.0.0.2", true, &[("app", "vllm")]));
    assert!(addrs(&ix).is_empty(), "no pool yet");
    ix.apply_pool(mk_pool("pool", &[8000]));
    assert!(ix.take_changes().endpoints);
    assert_eq!(addrs(&ix), ["10.0.0.1:8000", "10.0.0.2:8000"]);
    // The pool gains a port: every member gets a second endpoint.
    ix.apply_pool(mk_pool("pool", &[8000, 8001]));
    assert_eq!(
        addrs(&ix),
        [
            "10.0.0.1:8000",
            "10.0.0.1:8001",
            "10.0.0.2:8000",
            "10.0.0.2:8001"
        ]
    );
    // A relist that has only b: a is gone, b stays.
    let b = mk_pod("b", "10.0.0.2", true, &[("app", "vllm")]);
    ix.take_changes();
    ix.replace_pods([&b]);
    assert!(ix.take_changes().endpoints);
    assert_eq!(addrs(&ix), ["10.0.0.2:8000", "10.0.0.2:8001"]);
    assert_eq!(ix.pod_count(), 1);
    // The same relist again changes nothing.
    ix.replace_pods([&b]);
    assert_eq!(ix.take_changes(), Changes::default());
    // Deleting the pool empties it; the Pods are kept for when it comes back.
    ix.delete_pool(NS, "pool");
    assert!(addrs(&ix).is_empty());
    ix.apply_pool(mk_pool("pool", &[8000]));
    assert_eq!(addrs(&ix), ["10.0.0.2:8000"]);
}

#[test]
fn a_standalone_index_selects_by_flags_and_ignores_pool_objects() {
    let selector = BTreeMap::from([("app".to_string(), "vllm".to_string())]);
    let mut ix = Index::standalone(NS, "pool", selector, &[8000, 8002]);
    assert!(ix.is_standalone());
    ix.apply_pod(&mk_pod("a", "10.0.0.1", true, &[("app", "vllm")]));
    ix.apply_pod(&mk_pod("z", "10.0.0.9", true, &[("app", "other")]));
    assert_eq!(addrs(&ix), ["10.0.0.1:8000", "10.0.0.1:8002"]);
    // An InferencePool object of the same name does not override the flags.
    assert!(!ix.apply_pool(mk_pool("pool", &[9999])));
    ix.delete_pool(NS, "pool");
    assert_eq!(addrs(&ix), ["10.0.0.1:8000", "10.0.0.1:8002"]);
    // Objectives naming the pool still apply.
    ix.apply_objective(mk_objective("chat", "pool", 7));
    assert_eq!(ix.policy().objectives.len(), 1);
}
