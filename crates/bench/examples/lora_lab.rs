//! Multi-LoRA traffic on the virtual clock, in the shape of the reference's regression test
//! (DESIGN.md section 8): 15 adapters with Zipf popularity on servers that run at most 3 in
//! a batch. Round robin, the default profile, and the default profile plus
//! `lora-affinity-scorer`.
//!
//! `cargo run --release -p infergate-bench --example lora_lab -- [seconds]`

use infergate_bench::report::{to_markdown, RunReport};
use infergate_bench::stats::{by_priority, summarize};
use infergate_bench::virtual_run::{run, Router, VirtualPool};
use infergate_bench::workload::{Arrivals, LoraMix, Shape, Stage, Workload};
use infergate_sim::{profile, EngineConfig};

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
    let p = profile::by_name("llama3-8b-h100").expect("profile");
    let mut engine = EngineConfig::for_profile(p);
    engine.max_loras = 3;
    engine.max_cpu_loras = 15;
    let pool = VirtualPool {
        replicas: 10,
        engine,
        model: p.model.to_owned(),
        scrape_interval: 0.05,
        objectives: Vec::new(),
        seed: 1,
    };
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
            ("infergate-default", Router::infergate_default()?),
            (
                "default+lora-affinity",
                Router::from_yaml(WITH_LORA_AFFINITY, true)?,
            ),
        ] {
            let out = run(&pool, &router, &specs);
            let duration = out.iter().map(|o| o.done).fold(0.0, f64::max);
            reports.push(RunReport {
                router: name.to_owned(),
                workload: "multi-lora".to_owned(),
                stage_qps: qps,
                summary: summarize(&out, duration),
                by_priority: by_priority(&out, duration),
            });
        }
    }
    println!("{}", to_markdown(&reports));
    Ok(())
}
