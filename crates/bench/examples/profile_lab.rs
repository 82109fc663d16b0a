//! Compares scheduling profiles on the virtual clock at a few loads around the knee, on
//! chat-like and shared-prefix traffic: a quick loop for designing the best profile.
//!
//! `cargo run --release -p infergate-bench --example profile_lab -- [seconds]`

use infergate_bench::report::to_markdown;
use infergate_bench::virtual_run::{run_report, Router, VirtualPool};
use infergate_bench::workload::{Arrivals, Shape, Stage, Workload};

/// A single-profile config with these scorer weights; a scorer may carry parameters as
/// `type{k: v, ...}`.
fn profile_yaml(scorers: &[(&str, u32)]) -> String {
    let mut plugins = String::new();
    let mut refs = String::new();
    for (i, (t, w)) in scorers.iter().enumerate() {
        let (ty, params) = t.split_once('{').map_or((*t, ""), |(a, b)| (a, b));
        plugins.push_str(&format!("- name: s{i}\n  type: {ty}\n"));
        if !params.is_empty() {
            plugins.push_str(&format!("  parameters: {{{params}\n"));
        }
        refs.push_str(&format!("  - pluginRef: s{i}\n    weight: {w}\n"));
    }
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n{plugins}- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n{refs}  - pluginRef: max-score-picker\n"
    )
}

fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let pool = VirtualPool::of_profile("llama3-8b-h100", 10)?;
    let mut candidates: Vec<(String, String)> = vec![(
        "q2-kv2-prefix3".into(),
        profile_yaml(&[
            ("queue-scorer", 2),
            ("kv-cache-utilization-scorer", 2),
            ("prefix-cache-scorer", 3),
        ]),
    )];
    let combos: Vec<(&str, Vec<(&str, u32)>)> = vec![
        (
            "pred",
            vec![("predicted-latency-scorer{duplicateCost: 3}", 1)],
        ),
        (
            "pred3-kv1-inflight1",
            vec![
                ("predicted-latency-scorer{duplicateCost: 3}", 3),
                ("kv-cache-utilization-scorer", 1),
                ("inflight-load-scorer", 1),
            ],
        ),
        (
            "pred1-q2-kv2-prefix3",
            vec![
                ("predicted-latency-scorer{duplicateCost: 3}", 1),
                ("queue-scorer", 2),
                ("kv-cache-utilization-scorer", 2),
                ("prefix-cache-scorer", 3),
            ],
        ),
        (
            "pred3-kv2-prefix2",
            vec![
                ("predicted-latency-scorer{duplicateCost: 3}", 3),
                ("kv-cache-utilization-scorer", 2),
                ("prefix-cache-scorer", 2),
            ],
        ),
    ];
    for (name, sc) in combos {
        candidates.push((name.into(), profile_yaml(&sc)));
    }
    let mut reports = Vec::new();
    for (kind, shape, rates) in [
        ("chat", Shape::sharegpt(), vec![300.0, 400.0, 450.0]),
        (
            "prefix",
            Shape::inference_perf_shared_prefix(),
            vec![20.0, 40.0, 60.0],
        ),
    ] {
        for qps in rates {
            let specs = Workload {
                shape: shape.clone(),
                arrivals: Arrivals::Poisson,
                stages: vec![Stage { qps, seconds }],
                lora: None,
                priorities: None,
                seed: std::env::var("SEED")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(7),
            }
            .generate();
            let mut routers: Vec<(String, Router)> = vec![
                ("round-robin".into(), Router::RoundRobin),
                ("reference".into(), Router::reference_default()?),
                ("infergate".into(), Router::infergate()?),
            ];
            for (name, yaml) in &candidates {
                routers.push((name.to_string(), Router::from_yaml(yaml, true)?));
            }
            for (name, router) in routers {
                reports.push(run_report(&pool, &router, &name, kind, qps, &specs));
            }
        }
    }
    println!("{}", to_markdown(&reports));
    Ok(())
}
