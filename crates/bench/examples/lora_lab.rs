//! Multi-LoRA traffic on the virtual clock, in the shape of the reference's regression test
//! (DESIGN.md section 8): 15 adapters with Zipf popularity on servers that run at most 3 in
//! a batch. Round robin, the default profile, and the default profile plus
//! `lora-affinity-scorer`.
//!
//! `cargo run --release -p infergate-bench --example lora_lab -- [seconds]`

use infergate_bench::report::to_markdown;
use infergate_bench::virtual_run::{run_report, Router, VirtualPool};
use infergate_bench::workload::{Arrivals, LoraMix, Shape, Stage, Workload};

const WITH_LORA_AFFINITY: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: lora-affinity-scorer
    weight: 2
  - pluginRef: max-score-picker
";

fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let mut pool = VirtualPool::of_profile("llama3-8b-h100", 10)?;
    pool.engine.max_loras = 3;
    pool.engine.max_cpu_loras = 15;
    let mut reports = Vec::new();
    for qps in [50.0, 100.0, 200.0, 300.0] {
        let specs = Workload {
            shape: Shape::sharegpt(),
            arrivals: Arrivals::Poisson,
            stages: vec![Stage { qps, seconds }],
            lora: Some(LoraMix {
                adapters: 15,
                zipf_s: 1.0,
                share: 1.0,
            }),
            priorities: None,
            seed: 7,
        }
        .generate();
        for (name, router) in [
            ("round-robin", Router::RoundRobin),
            ("infergate", Router::infergate()?),
            (
                "default+lora-affinity",
                Router::from_yaml(WITH_LORA_AFFINITY, true)?,
            ),
        ] {
            reports.push(run_report(&pool, &router, name, "multi-lora", qps, &specs));
        }
    }
    println!("{}", to_markdown(&reports));
    Ok(())
}
