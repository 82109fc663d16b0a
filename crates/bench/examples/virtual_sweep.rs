//! QPS sweeps on the virtual clock, for BENCHMARKS.md: the blog's shape (10 replicas,
//! chat-like traffic), shared-prefix traffic, multi-LoRA traffic and mixed priorities,
//! through round robin, the reference's default profile as it ships (no in-flight
//! accounting), the same profile with our in-flight accounting, and infergate's profile.
//!
//! `cargo run --release -p infergate-bench --example virtual_sweep -- [chat|prefix|lora|priority|mixed|all] [seconds] [out-dir]`
//!
//! `mixed` is chat traffic on a pool of mixed GPUs: every other replica twice as slow.
//!
//! Prints a Markdown table per workload; with `out-dir`, also writes `<kind>.json` and
//! `<kind>-ttft-p90.svg` (TTFT p90 against QPS, one line per router) there.

use std::time::Instant;

use infergate_bench::report::{svg_chart, to_json, to_markdown};
use infergate_bench::virtual_run::{run_report, Router, VirtualPool};
use infergate_bench::workload::{Arrivals, LoraMix, PriorityMix, Shape, Stage, Workload};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind = args.first().map(String::as_str).unwrap_or("chat");
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60.0);
    let kinds: Vec<&str> = match kind {
        "all" => vec!["chat", "prefix", "lora", "priority", "mixed"],
        k => vec![k],
    };
    for kind in kinds {
        sweep(kind, seconds, args.get(2).map(std::path::Path::new))?;
    }
    Ok(())
}

fn sweep(kind: &str, seconds: f64, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut pool = VirtualPool::of_profile("llama3-8b-h100", 10)?;
    let mut workload = Workload {
        shape: Shape::sharegpt(),
        arrivals: Arrivals::Poisson,
        stages: Vec::new(),
        lora: None,
        priorities: None,
        seed: 7,
    };
    let rates = match kind {
        "chat" => vec![100.0, 200.0, 300.0, 350.0, 400.0, 450.0, 500.0],
        "prefix" => {
            workload.shape = Shape::inference_perf_shared_prefix();
            vec![10.0, 20.0, 40.0, 60.0]
        }
        "lora" => {
            // 15 adapters, Zipf-popular, 3 GPU slots and all 15 in host memory per replica.
            pool.engine.max_loras = 3;
            pool.engine.max_cpu_loras = 15;
            workload.lora = Some(LoraMix {
                adapters: 15,
                zipf_s: 1.0,
                share: 1.0,
            });
            vec![50.0, 100.0, 200.0, 300.0]
        }
        "mixed" => {
            // Mixed GPUs: half the replicas take twice as long per step (an older GPU).
            pool.slowdown = vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0];
            vec![100.0, 150.0, 200.0, 250.0, 300.0]
        }
        "priority" => {
            workload.priorities = Some(PriorityMix { batch_share: 0.3 });
            vec![300.0, 400.0, 600.0, 800.0]
        }
        other => {
            anyhow::bail!(
                "unknown workload {other:?}; use chat, prefix, lora, priority, mixed or all"
            )
        }
    };
    let mut reports = Vec::new();
    for qps in rates {
        workload.stages = vec![Stage { qps, seconds }];
        let specs = workload.generate();
        for (name, router) in [
            ("round-robin", Router::RoundRobin),
            ("random", Router::Random),
            ("reference", Router::reference_default()?),
            ("reference+inflight", Router::reference_with_inflight()?),
            ("infergate", Router::infergate()?),
        ] {
            let wall = Instant::now();
            reports.push(run_report(&pool, &router, name, kind, qps, &specs));
            eprintln!(
                "{kind}: {name} at {qps} qps: {} requests in {:.1} s wall",
                specs.len(),
                wall.elapsed().as_secs_f64()
            );
        }
    }
    println!("## {kind}\n\n{}", to_markdown(&reports));
    if kind == "priority" {
        println!("Per class (TTFT p90 ms / shed %):\n");
        println!(
            "| router | QPS | interactive p90 | batch p90 | batch shed % | interactive shed % |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &reports {
            let cls = |p: i32| r.by_priority.get(&p);
            let (Some(i), Some(b)) = (cls(10), cls(-1)) else {
                continue;
            };
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r.router,
                r.stage_qps,
                i.ttft_p90 * 1e3,
                b.ttft_p90 * 1e3,
                b.shed as f64 * 100.0 / b.requests.max(1) as f64,
                i.shed as f64 * 100.0 / i.requests.max(1) as f64,
            );
        }
        println!();
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{kind}.json")), to_json(&reports))?;
        let svg = svg_chart(
            &reports,
            &format!("{kind} traffic, 10 simulated replicas: TTFT p90"),
            |s| s.ttft_p90 * 1e3,
            "TTFT p90 (ms)",
        );
        std::fs::write(dir.join(format!("{kind}-ttft-p90.svg")), svg)?;
        eprintln!(
            "wrote {}/{kind}.json and {kind}-ttft-p90.svg",
            dir.display()
        );
    }
    Ok(())
}
