//! One scheduling decision (`Director::decide`) at 10 to 10,000 endpoints, and its parts.
//!
//! Setup per pool size: every endpoint has fresh metrics with varied queue (0-6 waiting) and
//! KV use (5-85 %), so about a third are past the default saturation thresholds and get
//! steered around; the prefix index is warmed by routing every request body several times
//! under re-drawn metrics, so each group's shared prefix is held by several endpoints.
//! Bodies are ~2 KB completions requests: a ~1 KB prefix shared within a group plus a
//! ~1 KB unique tail. Each `Decision` is dropped at once (it holds an in-flight guard).
//!
//! Groups:
//! - `decide/default`: the reference's default profile (queue 2, kv 2, prefix 3, max-score).
//! - `decide/queue_only`: queue-scorer + max-score picker (no prefix hashing or index).
//! - `decide/no_body`: default profile, request without a body (load-only pick).
//! - `parts/*`: body parsing, block hashing, index lookup, view building, scoring and picking,
//!   each on its own, to show where the time of one decision goes.
//!
//! `cargo bench -p infergate-core --bench pick` runs criterion; afterwards a per-call
//! distribution (median, p10, p90, p99 of individually timed calls) is printed for the
//! `decide` variants. `PICK_SIZES=1000` limits the pool sizes.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use infergate_core::prefix::{block_hashes, PrefixIndex};
use infergate_core::request::{parse_body, ApiKind};
use infergate_core::scheduler::{
    EndpointView, MaxScorePicker, Picker, Profile, QueueScorer, RequestFacts,
};
use infergate_core::{
    Datastore, Director, EndpointMetrics, EndpointSpec, Engine, RequestInput, SchedulerConfig,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const NOW: Duration = Duration::from_secs(1_000);
const PATH: &str = "/v1/completions";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const BODIES_PER_GROUP: usize = 4;
const WARM_ROUNDS: usize = 4;

fn sizes() -> Vec<usize> {
    match std::env::var("PICK_SIZES") {
        Ok(s) if !s.trim().is_empty() => s
            .split(',')
            .filter_map(|x| x.trim().replace('_', "").parse().ok())
            .collect(),
        _ => vec![10, 100, 1_000, 10_000],
    }
}

fn mk_addr(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
    SocketAddr::new(ip.into(), 8000)
}

/// Deterministic pseudo-words, so prompts look like text and hash like text.
fn words(rng: &mut SmallRng, bytes: usize) -> String {
    const W: [&str; 16] = [
        "the", "model", "server", "prefix", "cache", "request", "token", "gateway", "queue",
        "replica", "latency", "prompt", "answer", "system", "user", "context",
    ];
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        s.push_str(W[rng.random_range(0..W.len())]);
        s.push(' ');
    }
    s.truncate(bytes);
    s
}

/// ~2 KB completions bodies: `groups` shared ~1 KB prefixes, each with unique ~1 KB tails.
fn mk_bodies(groups: usize) -> Vec<Vec<u8>> {
    let mut rng = SmallRng::seed_from_u64(42);
    let mut out = Vec::new();
    for g in 0..groups {
        let prefix = format!("[group {g}] {}", words(&mut rng, 1_000));
        for k in 0..BODIES_PER_GROUP {
            let prompt = format!("{prefix} [q {k}] {}", words(&mut rng, 1_000));
            let body = serde_json::json!({
                "model": MODEL, "prompt": prompt, "max_tokens": 128, "temperature": 0.7,
            });
            out.push(serde_json::to_vec(&body).expect("json"));
        }
    }
    out
}

fn set_random_metrics(ds: &Datastore, rng: &mut SmallRng) {
    for e in &ds.snapshot().endpoints {
        e.set_metrics(
            EndpointMetrics {
                waiting: rng.random_range(0..=6),
                running: rng.random_range(0..=64),
                kv_cache_usage: Some(rng.random_range(0.05..0.85)),
                block_size: Some(16),
                num_gpu_blocks: Some(8192),
                ..Default::default()
            },
            NOW,
        );
    }
}

struct Rig {
    director: Director,
    bodies: Vec<Vec<u8>>,
    rng: SmallRng,
    next: usize,
}

impl Rig {
    fn new(n: usize, config: SchedulerConfig) -> Rig {
        let ds = Datastore::new();
        ds.set_endpoints(
            (0..n)
                .map(|i| EndpointSpec::new(mk_addr(i), Engine::Vllm))
                .collect(),
        );
        let director = Director::new(ds.clone(), config);
        let groups = (n / 4).clamp(8, 256);
        let bodies = mk_bodies(groups);
        let mut rng = SmallRng::seed_from_u64(7);
        // Warm the prefix index: route every body under several draws of the metrics, so
        // each group's prefix lands on several endpoints.
        for _ in 0..WARM_ROUNDS {
            set_random_metrics(&ds, &mut rng);
            for b in &bodies {
                let input = RequestInput {
                    path: PATH,
                    body: Some(b),
                    ..Default::default()
                };
                drop(
                    director
                        .decide(&input, NOW, &mut rng)
                        .expect("warm-up pick"),
                );
            }
        }
        set_random_metrics(&ds, &mut rng);
        Rig {
            director,
            bodies,
            rng,
            next: 0,
        }
    }

    /// One decision on the next body; the decision (and its in-flight guard) is dropped.
    fn decide(&mut self, with_body: bool) -> usize {
        self.next = (self.next + 1) % self.bodies.len();
        let input = RequestInput {
            path: PATH,
            body: with_body.then_some(self.bodies[self.next].as_slice()),
            ..Default::default()
        };
        let d = self
            .director
            .decide(&input, NOW, &mut self.rng)
            .expect("pick");
        d.prefix_hit_blocks
    }
}

fn queue_only() -> SchedulerConfig {
    SchedulerConfig {
        profile: Profile {
            name: "queue-only".into(),
            filters: vec![],
            scorers: vec![(Box::new(QueueScorer), 2.0)],
            picker: Box::new(MaxScorePicker { max_endpoints: 1 }),
        },
        ..SchedulerConfig::default()
    }
}

fn bench_decide(c: &mut Criterion, sizes: &[usize]) {
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));
    for &n in sizes {
        let mut rig = Rig::new(n, SchedulerConfig::default());
        g.bench_with_input(BenchmarkId::new("default", n), &n, |b, _| {
            b.iter(|| black_box(rig.decide(true)))
        });
        g.bench_with_input(BenchmarkId::new("no_body", n), &n, |b, _| {
            b.iter(|| black_box(rig.decide(false)))
        });
        let mut rig = Rig::new(n, queue_only());
        g.bench_with_input(BenchmarkId::new("queue_only", n), &n, |b, _| {
            b.iter(|| black_box(rig.decide(true)))
        });
    }
    g.finish();
}

/// The steps of one default decision, timed apart (same data as `decide/default`).
fn bench_parts(c: &mut Criterion, sizes: &[usize]) {
    let mut g = c.benchmark_group("parts");
    g.throughput(Throughput::Elements(1));
    let cfg = SchedulerConfig::default();
    let bodies = mk_bodies(8);
    let body = bodies[1].clone();
    g.bench_function("parse_body_2KB", |b| {
        b.iter(|| {
            black_box(
                parse_body(ApiKind::Completions, black_box(&body))
                    .expect("parse")
                    .prompt_bytes,
            )
        })
    });
    let parsed = parse_body(ApiKind::Completions, &body).expect("parse");
    g.bench_function("block_hashes_2KB", |b| {
        b.iter(|| black_box(block_hashes(&cfg.prefix, MODEL, &parsed.prompt_parts).len()))
    });
    let hashes = block_hashes(&cfg.prefix, MODEL, &parsed.prompt_parts);
    for &n in sizes {
        let ds = Datastore::new();
        ds.set_endpoints(
            (0..n)
                .map(|i| EndpointSpec::new(mk_addr(i), Engine::Vllm))
                .collect(),
        );
        let mut rng = SmallRng::seed_from_u64(9);
        set_random_metrics(&ds, &mut rng);
        let snap = ds.snapshot();
        // An index where this prompt's prefix is held by 8 endpoints (half of it by 4).
        let mut index = PrefixIndex::new(cfg.prefix);
        for k in 0..8u32 {
            let upto = if k < 4 {
                hashes.len() / 2
            } else {
                hashes.len()
            };
            index.insert(k * (n as u32 / 8).max(1), &hashes[..upto], Some(8192));
        }
        g.bench_with_input(BenchmarkId::new("index_lookup", n), &n, |b, _| {
            b.iter(|| black_box(index.longest_matches(black_box(&hashes)).len()))
        });
        g.bench_with_input(BenchmarkId::new("build_views", n), &n, |b, _| {
            b.iter(|| {
                let views: Vec<EndpointView> = snap
                    .endpoints
                    .iter()
                    .map(|e| EndpointView::build(e, NOW, cfg.staleness, true, MODEL))
                    .collect();
                black_box(views.len())
            })
        });
        let mut views: Vec<EndpointView> = snap
            .endpoints
            .iter()
            .map(|e| EndpointView::build(e, NOW, cfg.staleness, true, MODEL))
            .collect();
        for (i, v) in views.iter_mut().enumerate().take(8) {
            v.prefix_blocks = if i < 4 {
                hashes.len() / 2
            } else {
                hashes.len()
            };
        }
        let facts = RequestFacts {
            target_model: MODEL.into(),
            prompt_blocks: hashes.len(),
            prompt_tokens: 512,
            test_selection: None,
        };
        let sat = cfg.saturation;
        g.bench_with_input(BenchmarkId::new("saturation_pool_score", n), &n, |b, _| {
            let all: Vec<usize> = (0..views.len()).collect();
            b.iter(|| black_box(sat.pool_score(&views, &all, NOW)))
        });
        g.bench_with_input(BenchmarkId::new("profile_run_default", n), &n, |b, _| {
            b.iter(|| {
                let all: Vec<usize> = (0..views.len()).collect();
                let avoid = |i: usize| sat.endpoint_score(&views[i], NOW) >= 1.0;
                black_box(cfg.profile.run(&facts, &views, all, &avoid, &mut rng, None))
            })
        });
        let picker = MaxScorePicker { max_endpoints: 1 };
        let scores: Vec<f64> = (0..views.len())
            .map(|_| rng.random_range(0.0..7.0))
            .collect();
        g.bench_with_input(BenchmarkId::new("max_score_picker", n), &n, |b, _| {
            let all: Vec<usize> = (0..views.len()).collect();
            b.iter(|| black_box(picker.pick(&all, &scores, &mut rng)))
        });
    }
    g.finish();
}

/// Individually timed calls: the median and tails criterion's mean-of-batches hides.
fn per_call_distribution(sizes: &[usize]) {
    println!();
    println!(
        "per-call distribution ({} timed calls each, after 200 untimed)",
        3_000
    );
    println!(
        "{:<22} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "variant", "n", "p10 us", "median us", "p90 us", "p99 us"
    );
    for &n in sizes {
        for (name, cfg, with_body) in [
            ("decide/default", SchedulerConfig::default(), true),
            ("decide/no_body", SchedulerConfig::default(), false),
            ("decide/queue_only", queue_only(), true),
        ] {
            let mut rig = Rig::new(n, cfg);
            for _ in 0..200 {
                black_box(rig.decide(with_body));
            }
            let mut t: Vec<f64> = (0..3_000)
                .map(|_| {
                    let start = Instant::now();
                    black_box(rig.decide(with_body));
                    start.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            t.sort_by(f64::total_cmp);
            let q = |p: f64| t[((t.len() - 1) as f64 * p).round() as usize];
            println!(
                "{:<22} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                name,
                n,
                q(0.10),
                q(0.50),
                q(0.90),
                q(0.99)
            );
        }
    }
}

fn main() {
    let sizes = sizes();
    let mut c = Criterion::default()
        .sample_size(40)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_decide(&mut c, &sizes);
    bench_parts(&mut c, &sizes);
    c.final_summary();
    // `cargo bench -- --test` (or a filter) is a quick check, not a measurement.
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    if !quick && std::env::var_os("PICK_NO_DISTRIBUTION").is_none() {
        per_call_distribution(&sizes);
    }
}
