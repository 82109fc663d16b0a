//! What one Kubernetes event costs the picker as the namespace grows (issue 6's Measure:
//! 10,000 Pods and 1,000 pools in one namespace; an event must cost O(affected endpoints)).
//!
//! Builds a namespace of `pods` Pods spread over `pools` InferencePools (`pods / pools`
//! Pods each), indexes it for pool 0, then times the watch loop's work per event: apply
//! the object to the index, take the changes, and push what changed into a real
//! [`Datastore`]. Four kinds of event:
//! - a Pod of another pool flips readiness (should cost nothing that grows);
//! - a member Pod flips readiness (the pool's endpoint list is rebuilt and swapped);
//! - an InferenceObjective of another pool changes priority;
//! - the pool itself changes (every Pod is re-evaluated: the only O(namespace) event, and
//!   what every event cost before the index kept its members incrementally).
//!
//! `cargo run --release -p infergate-k8s --example index_cost`

use std::time::Instant;

use infergate_api::resources::{InferenceObjective, InferencePool};
use infergate_core::Datastore;
use infergate_k8s::index::Index;
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const NS: &str = "llm";

fn pool(i: usize, ports: &[u16]) -> InferencePool {
    let ports: String = ports.iter().map(|p| format!("  - number: {p}\n")).collect();
    serde_yaml_ng::from_str(&format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n\
         metadata:\n  name: pool-{i}\n  namespace: {NS}\n\
         spec:\n  selector:\n    matchLabels:\n      pool: p{i}\n  targetPorts:\n{ports}"
    ))
    .expect("pool YAML")
}

fn objective(pool: usize, priority: i32) -> InferenceObjective {
    serde_yaml_ng::from_str(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata:\n  name: obj-{pool}\n  namespace: {NS}\n\
         spec:\n  priority: {priority}\n  poolRef:\n    name: pool-{pool}\n"
    ))
    .expect("objective YAML")
}

fn pod(i: usize, pool: usize, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod-{i}")),
            namespace: Some(NS.into()),
            labels: Some(
                [
                    ("pool".to_string(), format!("p{pool}")),
                    ("app".to_string(), "vllm".to_string()),
                    ("pod-template-hash".to_string(), "5d8f7c9b6".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        status: Some(PodStatus {
            pod_ip: Some(format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255)),
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

/// The watch loop's work after one event (see `watch::run_index`).
fn push(ix: &mut Index, ds: &Datastore) {
    let c = ix.take_changes();
    if c.endpoints {
        ds.set_endpoints(ix.endpoints());
    }
    if c.policy {
        ds.set_policy(ix.policy());
    }
}

/// Mean microseconds per call of `f` over `n` calls.
fn time(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    println!("| Pods in namespace | pools | member endpoints | other pool's Pod flips | member Pod flips | other pool's objective | pool changes (full pass) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (pods, pools) in [(1_000, 100), (10_000, 1_000), (100_000, 10_000)] {
        let per = pods / pools;
        let mut ix = Index::new(NS, "pool-0");
        let ds = Datastore::new();
        ix.apply_pool(pool(0, &[8000]));
        for i in 0..pods {
            ix.apply_pod(&pod(i, i % pools, true));
        }
        push(&mut ix, &ds);
        let members = ds.snapshot().endpoints.len();
        assert_eq!(members, per);

        // Pods 1, 2, ... (mod pools != 0) belong to other pools; pod 0, pools, 2*pools...
        // are members.
        let n = 20_000;
        // Events are decoded before the clock starts: the watch gets them decoded.
        let others: Vec<Pod> = (0..n)
            .map(|k| {
                let i = 1 + k % (pools - 1);
                pod(i, i % pools, k / (pools - 1) % 2 == 1)
            })
            .collect();
        let other = time(n, |k| {
            ix.apply_pod(&others[k]);
            push(&mut ix, &ds);
        });
        let flips: Vec<Pod> = (0..n)
            .map(|k| pod((k % per) * pools, 0, k / per % 2 == 1))
            .collect();
        let member = time(n, |k| {
            ix.apply_pod(&flips[k]);
            push(&mut ix, &ds);
        });
        let objectives: Vec<InferenceObjective> = (0..2_000)
            .map(|k| objective(1 + k % (pools - 1), (k % 7) as i32))
            .collect();
        let objective_other = time(objectives.len(), |k| {
            ix.apply_objective(objectives[k].clone());
            push(&mut ix, &ds);
        });
        let full = time(20, |k| {
            let ports: &[u16] = if k % 2 == 0 { &[8000, 8001] } else { &[8000] };
            ix.apply_pool(pool(0, ports));
            push(&mut ix, &ds);
        });
        println!(
            "| {pods} | {pools} | {per} | {other:.2} µs | {member:.2} µs | {objective_other:.2} µs | {full:.0} µs |"
        );
    }
    println!("\n(mean per event: index update, change detection and the datastore push)");
}
