//! How fast the virtual clock runs: N replicas under Poisson arrivals, routed to the replica
//! with the fewest requests (running + waiting), for a span of simulated time.
//!
//! `cargo run --release -p infergate-sim --example vclock_speed -- [replicas] [rate] [seconds]`
//! (defaults 16, 500, 600). Prints simulated seconds per wall second and what was simulated.

use std::time::Instant;

use infergate_sim::engine::EosModel;
use infergate_sim::vclock::Cluster;
use infergate_sim::{profile, Engine, EngineConfig, Prompt, SimRequest};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: replicas rate seconds"))
        .collect();
    let replicas = args.first().copied().unwrap_or(16.0) as usize;
    let rate = args.get(1).copied().unwrap_or(500.0);
    let span = args.get(2).copied().unwrap_or(600.0);

    let mut cfg = EngineConfig::for_profile(profile::by_name("llama3-8b-h100").unwrap());
    cfg.eos = EosModel::Never;
    let engines = (0..replicas)
        .map(|i| Engine::new(cfg.clone(), i as u64))
        .collect();
    let mut cluster = Cluster::new(engines);
    let mut rng = SmallRng::seed_from_u64(1);
    let mut events = Vec::new();
    let (mut t, mut n, mut tokens, mut finished) = (0.0, 0u64, 0u64, 0u64);
    let (mut ttft_sum, mut queue_max) = (0.0, 0.0f64);
    let wall = Instant::now();
    while t < span {
        t += -(1.0 - rng.random::<f64>()).ln() / rate;
        cluster.run_until(t, &mut events);
        for e in events.drain(..) {
            tokens += 1;
            if let Some(f) = e.output.finished {
                finished += 1;
                ttft_sum += f.ttft;
                queue_max = queue_max.max(f.queue_time);
            }
        }
        // Log-normal lengths with ShareGPT's means (230 in / 200 out): median = mean / e^(s^2/2).
        let input = (167.0 * (0.8 * normal(&mut rng)).exp()).clamp(4.0, 4000.0) as u32;
        let output = (145.0 * (0.8 * normal(&mut rng)).exp()).clamp(1.0, 2000.0) as u32;
        let target = (0..cluster.len())
            .min_by_key(|&i| {
                let e = cluster.engine(i);
                e.num_running() + e.num_waiting()
            })
            .unwrap();
        cluster.submit(
            target,
            SimRequest {
                prompt: Prompt::synthetic(input, 0, 0, n, cfg.block_size),
                max_tokens: output,
                ignore_eos: true,
                lora: None,
            },
        );
        n += 1;
    }
    let elapsed = wall.elapsed().as_secs_f64();
    println!(
        "{replicas} replicas, {rate} req/s, {span} simulated s: {n} requests ({finished} finished), {tokens} tokens, {} steps",
        cluster.steps()
    );
    println!(
        "wall {elapsed:.2} s: {:.0}x real time; mean TTFT {:.1} ms, max queue time {:.2} s",
        span / elapsed,
        ttft_sum / finished.max(1) as f64 * 1e3,
        queue_max
    );
}

fn normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
