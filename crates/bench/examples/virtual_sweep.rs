//! A QPS sweep on the virtual clock: the blog's shape (10 replicas, chat-like traffic) or
//! shared-prefix traffic, through round robin, the reference's default profile, and the same profile with
//! infergate's in-flight accounting.
//!
//! `cargo run --release -p infergate-bench --example virtual_sweep -- [chat|prefix] [seconds] [out-dir]`
//!
//! Prints a Markdown table; with `out-dir`, also writes `<kind>.json` and `<kind>-ttft-p90.svg`
//! (TTFT p90 against QPS, one line per router) there.

use std::time::Instant;

use infergate_bench::report::{svg_chart, to_json, to_markdown};
use infergate_bench::virtual_run::{run_report, Router, VirtualPool};
use infergate_bench::workload::{Arrivals, Shape, Stage, Workload};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind = args.first().map(String::as_str).unwrap_or("chat");
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60.0);
    let pool = VirtualPool::of_profile("llama3-8b-h100", 10)?;
    let (shape, rates): (Shape, Vec<f64>) = match kind {
        "prefix" => (
            Shape::inference_perf_shared_prefix(),
            vec![10.0, 20.0, 40.0, 60.0],
        ),
        _ => (
            Shape::sharegpt(),
            vec![100.0, 200.0, 300.0, 350.0, 400.0, 450.0],
        ),
    };
    let mut reports = Vec::new();
    for qps in rates {
        let wl = Workload {
            shape: shape.clone(),
            arrivals: Arrivals::Poisson,
            stages: vec![Stage { qps, seconds }],
            lora: None,
            priorities: None,
            seed: 7,
        };
        let specs = wl.generate();
        for (name, router) in [
            ("round-robin", Router::RoundRobin),
            ("reference-default", Router::reference_default()?),
            ("infergate", Router::infergate()?),
        ] {
            let wall = Instant::now();
            reports.push(run_report(&pool, &router, name, kind, qps, &specs));
            eprintln!(
                "{name} at {qps} qps: {} requests in {:.1} s wall",
                specs.len(),
                wall.elapsed().as_secs_f64()
            );
        }
    }
    println!("{}", to_markdown(&reports));
    if let Some(dir) = args.get(2) {
        let dir = std::path::Path::new(dir);
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{kind}.json")), to_json(&reports))?;
        let svg = svg_chart(
            &reports,
            &format!("{kind} traffic, 10 simulated replicas: TTFT p90"),
            |s| s.ttft_p90 * 1e3,
            "TTFT p90 (ms)",
        );
        std::fs::write(dir.join(format!("{kind}-ttft-p90.svg")), svg)?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}
