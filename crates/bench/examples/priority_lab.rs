//! Mixed priorities on the virtual clock: does interactive work keep its latency while the
//! sheddable share absorbs the overload? 10 replicas, chat-like traffic, 30% batch work
//! (objective `batch`, priority -1), the rest `interactive` (priority 10), at loads from
//! comfortable to 2x the pool's capacity.
//!
//! `cargo run --release -p infergate-bench --example priority_lab -- [seconds]`

use infergate_bench::virtual_run::{run_report, Router, VirtualPool};
use infergate_bench::workload::{Arrivals, PriorityMix, Shape, Stage, Workload};

fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let pool = VirtualPool::of_profile("llama3-8b-h100", 10)?;
    println!("| router | QPS | class | requests | shed % | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p90 (ms) |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    for qps in [300.0, 400.0, 600.0, 800.0] {
        let specs = Workload {
            shape: Shape::sharegpt(),
            arrivals: Arrivals::Poisson,
            stages: vec![Stage { qps, seconds }],
            lora: None,
            priorities: Some(PriorityMix { batch_share: 0.3 }),
            seed: 7,
        }
        .generate();
        for (name, router) in [
            ("round-robin", Router::RoundRobin),
            ("infergate", Router::infergate()?),
        ] {
            let report = run_report(&pool, &router, name, "chat", qps, &specs);
            for (prio, s) in report.by_priority.iter().rev() {
                let class = if *prio < 0 { "batch" } else { "interactive" };
                println!(
                    "| {name} | {qps} | {class} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    s.requests,
                    s.shed as f64 * 100.0 / s.requests.max(1) as f64,
                    s.ttft_p50 * 1e3,
                    s.ttft_p90 * 1e3,
                    s.tpot_p90 * 1e3
                );
            }
        }
    }
    Ok(())
}
