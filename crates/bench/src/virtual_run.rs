//! A workload on the simulator's virtual clock, with a router in the loop.
//!
//! Replicas are [`infergate_sim::Engine`]s on one [`Cluster`]; no sockets, no sleeping. The
//! router sees them the way it would in production: `core`'s [`Director`] reads endpoint
//! metrics that a simulated scrape copies from each engine every `scrape_interval` of
//! virtual time (so it works from 50 ms-old figures, plus its own in-flight accounting), and
//! decides on the same JSON body a client would send. Round robin needs no metrics.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use infergate_core::director::{ErrorKind, InflightGuard, RequestInput, SchedulerConfig};
use infergate_core::endpoint::{EndpointMetrics, LoraState};
use infergate_core::{Datastore, Director, EndpointSpec, Engine as EngineKind, Policy};
use infergate_sim::tokens::tokenize;
use infergate_sim::vclock::{Cluster, Event};
use infergate_sim::{Engine, EngineConfig, Prompt, RequestId, SimRequest};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::report::RunReport;
use crate::stats::{by_priority, summarize, Outcome};
use crate::workload::RequestSpec;

/// Who picks the replica.
pub enum Router {
    /// A Kubernetes Service in IPVS mode (round robin): the baseline of issue 5.
    RoundRobin,
    /// A Kubernetes Service in kube-proxy's default iptables mode: each connection goes to
    /// a backend chosen uniformly at random.
    Random,
    /// `core`'s Director; each run builds a fresh scheduler (and prefix index) from this.
    Director(Box<dyn Fn() -> SchedulerConfig>),
}

impl Router {
    /// The reference picker as it ships: its default profile, and no accounting of what it
    /// sent since the last scrape (the reference has none).
    pub fn reference_default() -> anyhow::Result<Router> {
        Self::default_profile(false)
    }

    /// The reference's profile with our in-flight accounting on.
    pub fn reference_with_inflight() -> anyhow::Result<Router> {
        Self::default_profile(true)
    }

    /// infergate's built-in profile, as `infergate serve` and `infergate epp` run by default.
    pub fn infergate() -> anyhow::Result<Router> {
        let cfg = infergate_api::config::EndpointPickerConfig::builtin("infergate")
            .ok_or_else(|| anyhow::anyhow!("no built-in profile \"infergate\""))?;
        Self::from_config(cfg, true)
    }

    /// A profile from EndpointPickerConfig YAML (what `--config-file` takes), for comparing
    /// profiles in the lab.
    pub fn from_yaml(yaml: &str, inflight_accounting: bool) -> anyhow::Result<Router> {
        let cfg = infergate_api::config::EndpointPickerConfig::from_yaml_str(yaml, "<lab>")?;
        Self::from_config(cfg, inflight_accounting)
    }

    fn default_profile(inflight_accounting: bool) -> anyhow::Result<Router> {
        Self::from_config(
            infergate_api::config::EndpointPickerConfig::default_config(),
            inflight_accounting,
        )
    }

    fn from_config(
        cfg: infergate_api::config::EndpointPickerConfig,
        inflight_accounting: bool,
    ) -> anyhow::Result<Router> {
        // Fail now rather than in the middle of a run.
        infergate_core::build::scheduler_config(&cfg, Duration::from_secs(2))
            .map_err(|e| anyhow::anyhow!("default config: {e}"))?;
        Ok(Router::Director(Box::new(move || {
            let mut s = infergate_core::build::scheduler_config(&cfg, Duration::from_secs(2))
                .expect("checked when the router was made");
            s.inflight_accounting = inflight_accounting;
            s
        })))
    }
}

/// The simulated pool.
#[derive(Clone, Debug)]
pub struct VirtualPool {
    pub replicas: usize,
    pub engine: EngineConfig,
    /// The model name requests carry.
    pub model: String,
    /// Seconds of virtual time between scrapes of every replica (the picker's 50 ms).
    pub scrape_interval: f64,
    /// InferenceObjectives the Director knows: name and priority.
    pub objectives: Vec<(String, i32)>,
    pub seed: u64,
    /// Per-replica step-time multipliers (replica `i` takes `slowdown[i]`, 1 past the end):
    /// a pool of mixed GPUs. Empty means every replica runs at the profile's speed.
    pub slowdown: Vec<f64>,
}

impl VirtualPool {
    /// `replicas` replicas of the built-in simulator profile `profile` with vLLM's defaults,
    /// serving its model, scraped every 50 ms, with objectives `interactive` (priority 10)
    /// and `batch` (-1).
    pub fn of_profile(profile: &str, replicas: usize) -> anyhow::Result<VirtualPool> {
        let p = infergate_sim::profile::by_name(profile).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown profile {profile:?}; known: {}",
                infergate_sim::profile::names().join(", ")
            )
        })?;
        Ok(VirtualPool {
            replicas,
            engine: EngineConfig::for_profile(p),
            model: p.model.to_owned(),
            scrape_interval: 0.05,
            objectives: vec![("interactive".into(), 10), ("batch".into(), -1)],
            seed: 1,
            slowdown: Vec::new(),
        })
    }
}

/// Runs `specs` through `router` and summarises the run as one report row.
pub fn run_report(
    pool: &VirtualPool,
    router: &Router,
    router_name: &str,
    workload: &str,
    qps: f64,
    specs: &[RequestSpec],
) -> RunReport {
    let out = run(pool, router, specs);
    let duration = out.iter().map(|o| o.done).fold(0.0, f64::max);
    RunReport {
        router: router_name.to_owned(),
        workload: workload.to_owned(),
        stage_qps: qps,
        summary: summarize(&out, duration),
        by_priority: by_priority(&out, duration),
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1),
        8000,
    ))
}

struct Live {
    spec_index: usize,
    first_token: Option<f64>,
    /// Held until the request finishes; told of the first token, as a streaming gateway is.
    guard: Option<InflightGuard>,
}

/// Runs `specs` (in arrival order) through `router` on a fresh pool; one outcome per spec,
/// in spec order. Times are virtual seconds from the start.
pub fn run(pool: &VirtualPool, router: &Router, specs: &[RequestSpec]) -> Vec<Outcome> {
    let engines = (0..pool.replicas)
        .map(|i| {
            let mut cfg = pool.engine.clone();
            if let Some(&k) = pool.slowdown.get(i) {
                let st = &mut cfg.step;
                st.base *= k;
                st.prefill_token *= k;
                st.decode_seq *= k;
                st.context_token *= k;
                st.prefill_pair *= k;
            }
            Engine::new(cfg, pool.seed.wrapping_add(i as u64))
        })
        .collect();
    let mut cluster = Cluster::new(engines);
    let (ds, director) = match router {
        Router::RoundRobin | Router::Random => (None, None),
        Router::Director(build) => {
            let ds = Datastore::new();
            ds.set_endpoints(
                (0..pool.replicas)
                    .map(|i| EndpointSpec::new(addr(i), EngineKind::Vllm))
                    .collect(),
            );
            ds.set_policy(Policy {
                objectives: pool
                    .objectives
                    .iter()
                    .map(|(name, priority)| infergate_core::objective::Objective {
                        name: name.clone(),
                        priority: *priority,
                    })
                    .collect(),
                ..Policy::default()
            });
            ds.mark_synced();
            let director = Director::new(ds.clone(), build());
            (Some(ds), Some(director))
        }
    };
    let index_of: HashMap<SocketAddr, usize> = (0..pool.replicas).map(|i| (addr(i), i)).collect();
    let mut rng = SmallRng::seed_from_u64(pool.seed ^ 0x5eed);
    let mut outcomes: Vec<Outcome> = specs
        .iter()
        .map(|s| Outcome {
            index: s.index,
            priority: s.priority,
            sent: s.at,
            first_token: None,
            done: s.at,
            output_tokens: 0,
            status: 0,
            shed: false,
            error: None,
            itl: Vec::new(),
        })
        .collect();
    let mut live: HashMap<(usize, RequestId), Live> = HashMap::new();
    let mut events: Vec<Event> = Vec::new();
    let mut next_scrape = 0.0;
    let mut rr = 0usize;
    let bs = pool.engine.block_size;

    let handle = |events: &mut Vec<Event>,
                  live: &mut HashMap<(usize, RequestId), Live>,
                  outcomes: &mut Vec<Outcome>| {
        for e in events.drain(..) {
            let key = (e.engine, e.output.id);
            let Some(l) = live.get_mut(&key) else {
                continue;
            };
            if l.first_token.is_none() {
                l.first_token = Some(e.time);
                if let Some(g) = &mut l.guard {
                    g.first_token(Duration::from_secs_f64(e.time));
                }
            }
            if let Some(f) = e.output.finished {
                let l = live.remove(&key).expect("live");
                let o = &mut outcomes[l.spec_index];
                o.first_token = l.first_token;
                o.done = e.time;
                o.output_tokens = f.completion_tokens;
                o.status = 200;
            }
        }
    };

    for (si, spec) in specs.iter().enumerate() {
        // Scrapes due before this arrival, with the engine steps in between.
        while let Some(ds) = &ds {
            if next_scrape > spec.at {
                break;
            }
            cluster.run_until(next_scrape, &mut events);
            handle(&mut events, &mut live, &mut outcomes);
            scrape(ds, &cluster, next_scrape);
            next_scrape += pool.scrape_interval;
        }
        cluster.run_until(spec.at, &mut events);
        handle(&mut events, &mut live, &mut outcomes);

        let (target, guard) = match &director {
            None if matches!(router, Router::Random) => (rng.random_range(0..pool.replicas), None),
            None => {
                rr = (rr + 1) % pool.replicas;
                (rr, None)
            }
            Some(d) => {
                // A LoRA request names its adapter as the model, as clients of vLLM do.
                let model = spec.lora.as_deref().unwrap_or(&pool.model);
                let body = serde_json::json!({
                    "model": model, "prompt": spec.prompt,
                    "max_tokens": spec.output_tokens, "ignore_eos": true,
                })
                .to_string();
                let input = RequestInput {
                    path: "/v1/completions",
                    body: Some(body.as_bytes()),
                    objective: spec.objective.as_deref(),
                    ..RequestInput::default()
                };
                match d.decide(&input, Duration::from_secs_f64(spec.at), &mut rng) {
                    Ok(decision) => {
                        let i = index_of[&decision.endpoints[0]];
                        (i, Some(decision.inflight))
                    }
                    Err(e) => {
                        let o = &mut outcomes[si];
                        o.status = e.kind.status();
                        o.shed = e.kind == ErrorKind::Shed;
                        o.error = Some(e.message);
                        continue;
                    }
                }
            }
        };
        let ids = tokenize(&spec.prompt);
        let id = cluster.submit(
            target,
            SimRequest {
                prompt: Prompt::from_ids(&ids, bs),
                max_tokens: spec.output_tokens.max(1),
                ignore_eos: true,
                lora: spec.lora.as_deref().map(Arc::from),
            },
        );
        live.insert(
            (target, id),
            Live {
                spec_index: si,
                first_token: None,
                guard,
            },
        );
    }
    cluster.run_to_idle(&mut events);
    handle(&mut events, &mut live, &mut outcomes);
    outcomes
}

/// What a scrape of every replica would have read at `now`.
fn scrape(ds: &Datastore, cluster: &Cluster, now: f64) {
    let snap = ds.snapshot();
    for (i, ep) in snap.endpoints.iter().enumerate() {
        let e = cluster.engine(i);
        let s = e.stats();
        let cfg = e.config();
        ep.set_metrics(
            EndpointMetrics {
                waiting: s.num_waiting,
                running: s.num_running,
                kv_cache_usage: Some(s.kv_usage),
                lora: Some(LoraState {
                    running: s.running_loras.iter().map(|l| l.to_string()).collect(),
                    waiting: s.waiting_loras.iter().map(|l| l.to_string()).collect(),
                    max_loras: cfg.max_loras,
                }),
                block_size: Some(cfg.block_size),
                num_gpu_blocks: Some(cfg.num_gpu_blocks as u64),
            },
            Duration::from_secs_f64(now),
        );
    }
}
