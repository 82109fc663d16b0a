//! Property tests of the scheduler: promises a user of the picker would notice, checked over
//! random pools, metrics, profiles and request streams rather than a few hand-picked cases.
//!
//! Case counts are sized so the whole file runs in seconds in a debug build.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use infergate_api::EndpointPickerConfig;
use infergate_core::build::scheduler_config;
use infergate_core::director::{Director, ErrorKind, InflightGuard, RequestInput};
use infergate_core::objective::{Objective, Rewrite, RewriteRule, RewriteTarget};
use infergate_core::prefix::{block_hashes, PrefixConfig, PrefixIndex};
use infergate_core::rewrite;
use infergate_core::{
    Datastore, Endpoint, EndpointMetrics, EndpointSpec, Engine, LoraState, Policy, Snapshot,
};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::SeedableRng;

const NOW: Duration = Duration::from_secs(1000);
/// `--metrics-staleness-threshold` for every director here; generated scrape ages stay well
/// clear of it on either side so freshness is never decided by a rounding.
const STALENESS: Duration = Duration::from_secs(2);
const ADAPTERS: [&str; 3] = ["a1", "a2", "a3"];
/// Requested models: the base model, then the adapters.
const MODELS: [&str; 4] = ["base", "a1", "a2", "a3"];

// ---------------------------------------------------------------------------------------
// Fixtures

/// A small address space, so subsets, selections and removals hit real endpoints often.
fn mk_addr(i: usize) -> SocketAddr {
    const IPS: [&str; 4] = ["10.0.0.1", "10.0.0.2", "10.0.1.7", "fd00::5"];
    const PORTS: [u16; 3] = [8000, 8001, 9000];
    let ip: IpAddr = IPS[i % IPS.len()].parse().expect("literal");
    SocketAddr::new(ip, PORTS[(i / IPS.len()) % PORTS.len()])
}
const ADDRS: usize = 12;

/// One generated scrape of an endpoint.
#[derive(Debug, Clone)]
struct Scrape {
    waiting: u32,
    running: u32,
    kv: Option<f64>,
    /// Bit masks over [`ADAPTERS`] and the adapter slot count.
    lora: Option<(u8, u8, u32)>,
    gpu_blocks: Option<u64>,
    /// How long before `NOW` it was taken.
    age: Duration,
}

fn arb_scrape() -> impl Strategy<Value = Scrape> {
    (
        0u32..12,
        0u32..12,
        proptest::option::of(0.0f64..=1.0),
        proptest::option::of((0u8..8, 0u8..8, 0u32..4)),
        proptest::option::of(1u64..64),
        // Fresh (well under the threshold) or stale (well over it).
        prop_oneof![0u64..1_500, 3_000u64..60_000],
    )
        .prop_map(|(waiting, running, kv, lora, gpu_blocks, age_ms)| Scrape {
            waiting,
            running,
            kv,
            lora,
            gpu_blocks,
            age: Duration::from_millis(age_ms),
        })
}

fn adapters(mask: u8) -> Vec<String> {
    ADAPTERS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, a)| a.to_string())
        .collect()
}

fn apply_scrape(e: &Endpoint, s: &Scrape) {
    e.set_metrics(
        EndpointMetrics {
            waiting: s.waiting,
            running: s.running,
            kv_cache_usage: s.kv,
            lora: s.lora.map(|(run, wait, max_loras)| LoraState {
                running: adapters(run),
                waiting: adapters(wait),
                max_loras,
            }),
            block_size: Some(16),
            num_gpu_blocks: s.gpu_blocks,
        },
        NOW - s.age,
    );
}

/// An endpoint as a source would announce it, with its first scrape (or none yet).
#[derive(Debug, Clone)]
struct EndpointGen {
    addr: usize,
    engine: usize,
    zone: Option<u8>,
    scrape: Option<Scrape>,
}

fn arb_endpoint() -> impl Strategy<Value = EndpointGen> {
    (
        0..ADDRS,
        0..Engine::ALL.len(),
        proptest::option::of(0u8..3),
        proptest::option::of(arb_scrape()),
    )
        .prop_map(|(addr, engine, zone, scrape)| EndpointGen {
            addr,
            engine,
            zone,
            scrape,
        })
}

fn mk_spec(g: &EndpointGen) -> EndpointSpec {
    let mut spec = EndpointSpec::new(mk_addr(g.addr), Engine::ALL[g.engine]);
    if let Some(z) = g.zone {
        spec.labels = BTreeMap::from([("zone".to_string(), format!("z{z}"))]);
    }
    spec
}

fn join(ds: &Datastore, g: &EndpointGen) {
    ds.upsert_endpoint(mk_spec(g));
    if let (Some(s), Some(e)) = (&g.scrape, ds.snapshot().endpoint(mk_addr(g.addr))) {
        apply_scrape(e, s);
    }
}

fn mk_pool(eps: &[EndpointGen]) -> Datastore {
    let ds = Datastore::new();
    ds.set_endpoints(eps.iter().map(mk_spec).collect());
    for g in eps {
        if let (Some(s), Some(e)) = (&g.scrape, ds.snapshot().endpoint(mk_addr(g.addr))) {
            apply_scrape(e, s);
        }
    }
    ds.set_policy(Policy {
        objectives: vec![Objective {
            name: "batch".into(),
            priority: -1,
        }],
        ..Default::default()
    });
    ds
}

/// The profiles under test: the two built-ins and three configurations with filters.
const PROFILES: usize = 5;

/// Whether profile `i` has the `header-based-testing-filter` and the `lora-affinity-filter`
/// (in that order, before any other filter).
fn profile_filters(i: usize) -> (bool, bool) {
    match i {
        0 | 1 => (false, false),
        2 | 3 => (true, true),
        _ => (true, false),
    }
}

fn mk_config(i: usize) -> infergate_core::SchedulerConfig {
    let epp = match i {
        0 => EndpointPickerConfig::builtin("infergate").expect("built-in"),
        1 => EndpointPickerConfig::builtin("reference").expect("built-in"),
        _ => {
            let text = match i {
                // Fallbacks from a max-score picker, and a small prefix index.
                2 => {
                    "
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: lora-affinity-filter
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 4, lruCapacityPerServer: 16, maxIndexEntries: 40}
- type: lora-affinity-scorer
- type: queue-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 3}
schedulingProfiles:
- name: p
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: lora-affinity-filter
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: lora-affinity-scorer
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"
                }
                // Soft filters after the hard ones, and a weighted random picker.
                3 => {
                    "
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: lora-affinity-filter
- type: least-queue-filter
- type: prefix-cache-affinity-filter
  parameters: {threshold: 0.5}
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 2, maxIndexEntries: 25}
- type: kv-cache-utilization-scorer
- type: weighted-random-picker
  parameters: {maxNumOfEndpoints: 2}
schedulingProfiles:
- name: p
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: lora-affinity-filter
  - pluginRef: least-queue-filter
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: weighted-random-picker
"
                }
                // A random picker, saturation steering with headroom.
                _ => {
                    "
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: low-queue-filter
- type: inflight-load-scorer
- type: random-picker
  parameters: {maxNumOfEndpoints: 4}
- type: utilization-detector
  parameters: {queueDepthThreshold: 3, kvCacheUtilThreshold: 0.5, headroom: 0.2}
saturationDetector: {pluginRef: utilization-detector}
schedulingProfiles:
- name: p
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: low-queue-filter
  - pluginRef: inflight-load-scorer
  - pluginRef: random-picker
"
                }
            };
            EndpointPickerConfig::from_yaml_str(text, "props.yaml").expect("valid test config")
        }
    };
    scheduler_config(&epp, STALENESS).expect("buildable test config")
}

fn completion(model: &str, prompt: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 4}))
        .expect("serialisable")
}

/// A prompt from one of a few long shared prefixes plus a private tail, so prefix scoring
/// and the index see both hits and misses.
fn mk_prompt(shared: usize, shared_len: usize, tail: usize) -> String {
    let head = ["You are terse. ", "Answer in French. ", "Cite sources. "][shared % 3];
    let mut p = head.repeat(shared_len / head.len() + 1);
    p.truncate(shared_len);
    p.push_str(&format!(" q{tail} "));
    p.push_str(&"z".repeat(tail % 97));
    p
}

// ---------------------------------------------------------------------------------------
// 1. Picks stay inside the pool, the subset and the filters.

/// One element of a generated `test-epp-endpoint-selection` header.
#[derive(Debug, Clone)]
enum Sel {
    IpPort(usize),
    Ip(usize),
    Foreign,
    Garbage,
}

fn arb_sel() -> impl Strategy<Value = Sel> {
    prop_oneof![
        4 => (0..ADDRS).prop_map(Sel::IpPort),
        2 => (0..ADDRS).prop_map(Sel::Ip),
        1 => Just(Sel::Foreign),
        1 => Just(Sel::Garbage),
    ]
}

fn selection_header(sels: &[Sel]) -> String {
    sels.iter()
        .map(|s| match s {
            Sel::IpPort(i) => mk_addr(*i).to_string(),
            Sel::Ip(i) => mk_addr(*i).ip().to_string(),
            Sel::Foreign => "10.9.9.9:1".to_string(),
            Sel::Garbage => "not-an-address".to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone)]
enum PoolOp {
    Decide {
        model: usize,
        prompt: (usize, usize, usize),
        /// The gateway's subset hint, as indices into the address space.
        subset: Option<Vec<usize>>,
        selection: Option<Vec<Sel>>,
        sheddable: bool,
        /// Keep the request in flight (it then weighs on later picks).
        hold: bool,
        /// An endpoint that leaves after the request is built and before it is decided.
        remove_first: Option<usize>,
    },
    Remove(usize),
    Join(EndpointGen),
    Scrape(usize, Scrape),
}

fn arb_pool_op() -> impl Strategy<Value = PoolOp> {
    let decide = (
        0..MODELS.len(),
        (0usize..3, 0usize..400, 0usize..300),
        proptest::option::weighted(0.4, proptest::collection::vec(0..ADDRS, 0..6)),
        proptest::option::weighted(0.4, proptest::collection::vec(arb_sel(), 0..4)),
        proptest::bool::weighted(0.2),
        any::<bool>(),
        proptest::option::weighted(0.3, 0..ADDRS),
    )
        .prop_map(
            |(model, prompt, subset, selection, sheddable, hold, remove_first)| PoolOp::Decide {
                model,
                prompt,
                subset,
                selection,
                sheddable,
                hold,
                remove_first,
            },
        );
    prop_oneof![
        6 => decide,
        1 => (0..ADDRS).prop_map(PoolOp::Remove),
        1 => arb_endpoint().prop_map(PoolOp::Join),
        1 => (0..ADDRS, arb_scrape()).prop_map(|(a, s)| PoolOp::Scrape(a, s)),
    ]
}

/// Where `target_model` stands as an adapter on `e` (see the `lora-affinity-scorer`):
/// computed here from the endpoint's last scrape, independently of the scheduler.
fn lora_affinity(e: &Endpoint, target_model: &str) -> f64 {
    let sample = e.sample();
    let fresh = sample
        .updated_at
        .is_some_and(|t| NOW.saturating_sub(t) <= STALENESS);
    match (&sample.metrics.lora, fresh) {
        (Some(l), true) => {
            if l.running.iter().any(|a| a == target_model) {
                1.0
            } else if l.waiting.iter().any(|a| a == target_model) {
                0.6
            } else if ((l.running.len() + l.waiting.len()) as u32) < l.max_loras {
                0.8
            } else {
                0.0
            }
        }
        _ => 0.0,
    }
}

/// The endpoints a request may land on: live, in the subset hint, named by the testing
/// header (when the profile has that filter), and among the best LoRA fits (when the
/// profile has the `lora-affinity-filter`, which narrows to "adapter active", else "room
/// to load it", unless nobody qualifies).
fn eligible(
    snap: &Snapshot,
    subset: Option<&[SocketAddr]>,
    selection: Option<&str>,
    profile: usize,
    target_model: &str,
) -> Vec<SocketAddr> {
    let (header_filter, lora_filter) = profile_filters(profile);
    let mut cands: Vec<&Arc<Endpoint>> = snap
        .endpoints
        .iter()
        .filter(|e| subset.is_none_or(|s| s.contains(&e.spec.addr)))
        .collect();
    if let (true, Some(sel)) = (header_filter, selection) {
        let names: Vec<&str> = sel
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        cands.retain(|e| {
            names.iter().any(|n| match n.parse::<SocketAddr>() {
                Ok(a) => a == e.spec.addr,
                Err(_) => n.parse::<IpAddr>() == Ok(e.spec.addr.ip()),
            })
        });
    }
    if lora_filter {
        for bar in [1.0, 0.8] {
            if cands.iter().any(|e| lora_affinity(e, target_model) >= bar) {
                cands.retain(|e| lora_affinity(e, target_model) >= bar);
            }
        }
    }
    cands.iter().map(|e| e.spec.addr).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// A request is only ever sent to an endpoint that is in the pool right now (never one
    /// that left, even between the request arriving and the decision), that the gateway's
    /// subset hint allows, and that the profile's filters let through; fallbacks too. When
    /// no endpoint qualifies the client gets a 503, never a pick.
    #[test]
    fn picks_only_live_endpoints_in_the_subset_that_pass_the_filters(
        pool in proptest::collection::vec(arb_endpoint(), 0..10),
        ops in proptest::collection::vec(arb_pool_op(), 1..12),
        profile in 0..PROFILES,
        seed in any::<u64>(),
    ) {
        let ds = mk_pool(&pool);
        let d = Director::new(ds.clone(), mk_config(profile));
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut held = Vec::new();
        for op in ops {
            match op {
                PoolOp::Remove(a) => ds.remove_endpoint(mk_addr(a)),
                PoolOp::Join(g) => join(&ds, &g),
                PoolOp::Scrape(a, s) => {
                    if let Some(e) = ds.snapshot().endpoint(mk_addr(a)) {
                        apply_scrape(e, &s);
                    }
                }
                PoolOp::Decide { model, prompt, subset, selection, sheddable, hold, remove_first } => {
                    let model = MODELS[model];
                    let body = completion(model, &mk_prompt(prompt.0, prompt.1, prompt.2));
                    let subset: Option<Vec<SocketAddr>> =
                        subset.map(|s| s.into_iter().map(mk_addr).collect());
                    let header = selection.map(|s| selection_header(&s));
                    let input = RequestInput {
                        path: "/v1/completions",
                        body: Some(&body),
                        objective: sheddable.then_some("batch"),
                        test_selection: header.as_deref(),
                        subset: subset.clone(),
                    };
                    if let Some(a) = remove_first {
                        ds.remove_endpoint(mk_addr(a));
                    }
                    let snap = ds.snapshot();
                    let ok = eligible(&snap, subset.as_deref(), header.as_deref(), profile, model);
                    match d.decide(&input, NOW, &mut rng) {
                        Ok(dec) => {
                            prop_assert!(!ok.is_empty(), "picked {:?} though nothing qualifies", dec.endpoints);
                            prop_assert!(!dec.endpoints.is_empty());
                            let distinct: HashSet<_> = dec.endpoints.iter().collect();
                            prop_assert_eq!(distinct.len(), dec.endpoints.len(), "repeated fallback");
                            for a in &dec.endpoints {
                                prop_assert!(snap.endpoint(*a).is_some(), "{} is not in the pool", a);
                                if let Some(s) = &subset {
                                    prop_assert!(s.contains(a), "{} is outside the subset {:?}", a, s);
                                }
                                prop_assert!(ok.contains(a), "{} fails the filters; eligible {:?}", a, ok);
                            }
                            // The in-flight count lands on the live endpoint object.
                            let primary = snap.endpoint(dec.endpoints[0]).expect("checked above");
                            prop_assert!(Arc::ptr_eq(dec.inflight.endpoint(), primary));
                            if hold {
                                held.push(dec);
                            }
                        }
                        Err(e) => {
                            if ok.is_empty() {
                                prop_assert!(
                                    e.kind == ErrorKind::NoEndpoints || (sheddable && e.kind == ErrorKind::Shed),
                                    "{:?}", e
                                );
                                if !sheddable {
                                    prop_assert_eq!(e.kind.status(), 503);
                                }
                            } else {
                                prop_assert!(sheddable && e.kind == ErrorKind::Shed,
                                    "refused with {:?} though {:?} qualify", e, ok);
                            }
                        }
                    }
                }
            }
            let stats = d.prefix_stats();
            prop_assert!(stats.entries <= stats.max_entries, "{:?}", stats);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Rewrite weights.

/// Whether `hits` of `n` draws is within five standard deviations (plus one for
/// discreteness) of a binomial with success probability `p`.
fn binomial_ok(hits: u64, n: u64, p: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (hits as f64 - mean).abs() <= 5.0 * sd + 1.0
}

fn mk_split(weights: &[u32]) -> Vec<Rewrite> {
    vec![
        // An older rule for another model and a catch-all: neither may take any traffic.
        Rewrite {
            source: "ns/other".into(),
            rules: vec![RewriteRule {
                matches: vec!["other".into()],
                targets: vec![RewriteTarget {
                    model: "decoy".into(),
                    weight: 1_000_000,
                }],
            }],
        },
        Rewrite {
            source: "ns/catch-all".into(),
            rules: vec![RewriteRule {
                matches: vec![],
                targets: vec![RewriteTarget {
                    model: "decoy".into(),
                    weight: 1,
                }],
            }],
        },
        Rewrite {
            source: "ns/split".into(),
            rules: vec![RewriteRule {
                matches: vec!["public".into()],
                targets: weights
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| RewriteTarget {
                        model: format!("t{i}"),
                        weight: w,
                    })
                    .collect(),
            }],
        },
    ]
}

fn check_shares(counts: &[u64], weights: &[u32], n: u64) -> Result<(), TestCaseError> {
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    for (i, (&c, &w)) in counts.iter().zip(weights).enumerate() {
        let p = f64::from(w) / total;
        prop_assert!(
            binomial_ok(c, n, p),
            "target t{} (weight {} of {}) got {} of {} draws, expected {:.1}",
            i,
            w,
            total,
            c,
            n,
            p * n as f64
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Traffic to a rewritten model splits across its targets as the weights say: over
    /// 20,000 requests each target's share is within 5 binomial standard deviations of
    /// weight / sum, and no other rule's target gets any.
    #[test]
    fn rewrite_shares_converge_to_the_weights(
        weights in proptest::collection::vec(1u32..=1_000_000, 1..=5),
        seed in any::<u64>(),
    ) {
        const N: u64 = 20_000;
        let rewrites = mk_split(&weights);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut counts = vec![0u64; weights.len()];
        for _ in 0..N {
            let t = rewrite::choose(&rewrites, "public", &mut rng);
            let i = t
                .and_then(|t| t.strip_prefix('t'))
                .and_then(|i| i.parse::<usize>().ok());
            prop_assert!(i.is_some(), "drew {:?}", t);
            counts[i.unwrap_or_default()] += 1;
        }
        check_shares(&counts, &weights, N)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// The same split seen end to end: the director's decisions (target model and the
    /// rewritten body) follow the weights over 5,000 requests.
    #[test]
    fn director_decisions_follow_the_rewrite_weights(
        weights in proptest::collection::vec(1u32..=1_000_000, 1..=5),
        seed in any::<u64>(),
    ) {
        const N: u64 = 5_000;
        let ds = mk_pool(&[EndpointGen { addr: 0, engine: 0, zone: None, scrape: None }]);
        ds.set_policy(Policy { rewrites: mk_split(&weights), ..Default::default() });
        let d = Director::new(ds, mk_config(1));
        let mut rng = SmallRng::seed_from_u64(seed);
        let body = completion("public", "hi");
        let input = RequestInput { path: "/v1/completions", body: Some(&body), ..Default::default() };
        let mut counts = vec![0u64; weights.len()];
        for _ in 0..N {
            let dec = d.decide(&input, NOW, &mut rng).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let i = dec.target_model.strip_prefix('t').and_then(|i| i.parse::<usize>().ok());
            prop_assert!(i.is_some(), "rewrote to {:?}", dec.target_model);
            let new_body = dec.rewritten_body.as_deref().unwrap_or(&body);
            prop_assert_eq!(
                serde_json::from_slice::<serde_json::Value>(new_body).ok()
                    .and_then(|v| v["model"].as_str().map(str::to_string)),
                Some(dec.target_model.clone())
            );
            counts[i.unwrap_or_default()] += 1;
        }
        check_shares(&counts, &weights, N)?;
    }
}

// ---------------------------------------------------------------------------------------
// 3. The prefix index's memory bound.

#[derive(Debug, Clone)]
enum IndexOp {
    Insert {
        endpoint: u32,
        prompt: (usize, usize, usize),
        /// The endpoint's own cache size in blocks, as auto-tune would read it.
        capacity: Option<usize>,
    },
    Remove(u32),
}

fn arb_index_op() -> impl Strategy<Value = IndexOp> {
    prop_oneof![
        8 => (
            0u32..40,
            (0usize..3, 0usize..600, 0usize..400),
            proptest::option::of(1usize..80),
        )
            .prop_map(|(endpoint, prompt, capacity)| IndexOp::Insert { endpoint, prompt, capacity }),
        1 => (0u32..40).prop_map(IndexOp::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// The prefix index never holds more than `maxIndexEntries` entries, whatever the
    /// prompts, the number of endpoints or their churn, so the picker's memory stays
    /// bounded. An endpoint that left is never matched again, and forgetting every endpoint
    /// empties the index exactly.
    #[test]
    fn prefix_index_stays_within_its_bound(
        block_size_tokens in 1usize..5,
        max_blocks in 1usize..64,
        lru in 1usize..64,
        max_total in 1usize..256,
        auto_tune in any::<bool>(),
        ops in proptest::collection::vec(arb_index_op(), 1..80),
    ) {
        let cfg = PrefixConfig {
            block_size_tokens,
            max_blocks,
            lru_capacity_per_endpoint: lru,
            max_total_entries: max_total,
            auto_tune,
        };
        let mut idx = PrefixIndex::new(cfg);
        let mut gone: HashSet<u32> = HashSet::new();
        for op in &ops {
            match *op {
                IndexOp::Insert { endpoint, prompt, capacity } => {
                    let text = mk_prompt(prompt.0, prompt.1, prompt.2);
                    let hashes = block_hashes(&cfg, "m", &[text.as_bytes()]);
                    idx.insert(endpoint, &hashes, capacity);
                    gone.remove(&endpoint);
                    prop_assert!(idx.len() <= max_total, "{} entries > bound {}", idx.len(), max_total);
                    let m = idx.longest_matches(&hashes);
                    prop_assert!(m.keys().all(|e| !gone.contains(e)), "departed endpoint matched: {:?}", m);
                    prop_assert!(m.values().all(|&n| n <= hashes.len()));
                }
                IndexOp::Remove(e) => {
                    idx.remove_endpoint(e);
                    gone.insert(e);
                }
            }
        }
        for e in 0..40 {
            idx.remove_endpoint(e);
        }
        prop_assert!(idx.is_empty(), "{} entries left after every endpoint left", idx.len());
    }
}

// ---------------------------------------------------------------------------------------
// 4. In-flight accounting.

#[derive(Debug, Clone)]
enum FlightOp {
    /// Schedule a request and keep it in flight.
    Dispatch {
        prompt: (usize, usize, usize),
        subset: Option<Vec<usize>>,
    },
    /// The gateway served request `guard` at another endpoint (a fallback or a retry).
    MoveTo {
        guard: usize,
        endpoint: usize,
    },
    /// Request `guard` streamed its first token `after` its dispatch.
    FirstToken {
        guard: usize,
        after_ms: u64,
    },
    /// Request `guard` ended: completed, reset by the client or timed out, all of which
    /// the gateway reports by dropping the guard.
    End {
        guard: usize,
    },
    Remove(usize),
    Rejoin(EndpointGen),
    /// Switch to another profile (and so maybe another prefix index) mid-stream.
    Reload(usize),
}

fn arb_flight_op() -> impl Strategy<Value = FlightOp> {
    prop_oneof![
        6 => (
            (0usize..3, 0usize..400, 0usize..300),
            proptest::option::weighted(0.3, proptest::collection::vec(0..ADDRS, 0..4)),
        )
            .prop_map(|(prompt, subset)| FlightOp::Dispatch { prompt, subset }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(guard, endpoint)| FlightOp::MoveTo { guard, endpoint }),
        3 => (any::<usize>(), 0u64..5_000).prop_map(|(guard, after_ms)| FlightOp::FirstToken { guard, after_ms }),
        4 => any::<usize>().prop_map(|guard| FlightOp::End { guard }),
        1 => (0..ADDRS).prop_map(FlightOp::Remove),
        1 => arb_endpoint().prop_map(FlightOp::Rejoin),
        1 => (0..PROFILES).prop_map(FlightOp::Reload),
    ]
}

/// A request in flight and what the test expects it to hold.
struct Flight {
    guard: InflightGuard,
    tokens: u64,
    prefill_pending: bool,
}

/// Every endpoint object the datastore has held, including departed ones guards still point to.
fn remember(seen: &mut Vec<Arc<Endpoint>>, ds: &Datastore) {
    for e in &ds.snapshot().endpoints {
        if !seen.iter().any(|s| Arc::ptr_eq(s, e)) {
            seen.push(e.clone());
        }
    }
}

/// Each endpoint's counters equal what the live guards on it account for, exactly (so a
/// double decrement hidden by a saturating counter shows up too).
fn check_counters(seen: &[Arc<Endpoint>], flights: &[Flight]) -> Result<(), TestCaseError> {
    for e in seen {
        let mine: Vec<&Flight> = flights
            .iter()
            .filter(|f| Arc::ptr_eq(f.guard.endpoint(), e))
            .collect();
        let pending: Vec<&&Flight> = mine.iter().filter(|f| f.prefill_pending).collect();
        let lat = e.latency().view(NOW);
        prop_assert_eq!(
            e.inflight_requests(),
            mine.len() as u64,
            "requests at {}",
            e.spec.addr
        );
        prop_assert_eq!(
            e.inflight_tokens(),
            mine.iter().map(|f| f.tokens).sum::<u64>(),
            "tokens at {}",
            e.spec.addr
        );
        prop_assert_eq!(
            lat.prefill_requests,
            pending.len() as u64,
            "prefills at {}",
            e.spec.addr
        );
        prop_assert!(
            lat.prefill_tokens <= pending.iter().map(|f| f.tokens).sum::<u64>(),
            "prefill tokens at {}: {}",
            e.spec.addr,
            lat.prefill_tokens
        );
        if pending.is_empty() {
            prop_assert_eq!(lat.prefill_tokens, 0);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// The picker's view of each endpoint's load never drifts: whatever mix of dispatches,
    /// moves to fallbacks, first tokens, completions, resets and timeouts, and endpoints
    /// leaving and rejoining, every endpoint's in-flight requests, tokens and queued prefill
    /// equal what is actually outstanding there (never below, never wrapped), and are
    /// exactly zero once every request has ended.
    #[test]
    fn inflight_counters_return_to_zero(
        pool in proptest::collection::vec(arb_endpoint(), 1..6),
        ops in proptest::collection::vec(arb_flight_op(), 1..60),
        profile in 0..PROFILES,
        seed in any::<u64>(),
    ) {
        let ds = mk_pool(&pool);
        let d = Director::new(ds.clone(), mk_config(profile));
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut seen: Vec<Arc<Endpoint>> = Vec::new();
        remember(&mut seen, &ds);
        let mut flights: Vec<Flight> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            let now = NOW + Duration::from_millis(10 * step as u64);
            match op {
                FlightOp::Dispatch { prompt, subset } => {
                    let body = completion("base", &mk_prompt(prompt.0, prompt.1, prompt.2));
                    let input = RequestInput {
                        path: "/v1/completions",
                        body: Some(&body),
                        subset: subset.map(|s| s.into_iter().map(mk_addr).collect()),
                        ..Default::default()
                    };
                    if let Ok(dec) = d.decide(&input, now, &mut rng) {
                        flights.push(Flight {
                            tokens: dec.prompt_tokens,
                            prefill_pending: true,
                            guard: dec.inflight,
                        });
                    }
                }
                FlightOp::MoveTo { guard, endpoint } => {
                    if !flights.is_empty() && !seen.is_empty() {
                        let n = flights.len();
                        flights[guard % n].guard.move_to(seen[endpoint % seen.len()].clone());
                    }
                }
                FlightOp::FirstToken { guard, after_ms } => {
                    if !flights.is_empty() {
                        let n = flights.len();
                        let f = &mut flights[guard % n];
                        f.guard.first_token(now + Duration::from_millis(after_ms));
                        f.prefill_pending = false;
                    }
                }
                FlightOp::End { guard } => {
                    if !flights.is_empty() {
                        let n = flights.len();
                        drop(flights.swap_remove(guard % n));
                    }
                }
                FlightOp::Remove(a) => ds.remove_endpoint(mk_addr(a)),
                FlightOp::Rejoin(g) => join(&ds, &g),
                FlightOp::Reload(p) => d.reload(mk_config(p)),
            }
            remember(&mut seen, &ds);
            check_counters(&seen, &flights)?;
        }
        flights.clear();
        for e in &seen {
            let lat = e.latency().view(NOW);
            prop_assert_eq!(
                (e.inflight_requests(), e.inflight_tokens(), lat.prefill_requests, lat.prefill_tokens),
                (0, 0, 0, 0),
                "{} after every request ended", e.spec.addr
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Eviction keeps a prompt's head (this found a bug: the index used to age a prompt's blocks
// head first, so eviction took the first block and the whole prompt stopped matching).

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A prompt just sent to an endpoint is credited there on the next request, for as
    /// many leading blocks as the endpoint may hold: model servers evict a request's tail
    /// blocks first, so the head of the prompt is what stays cached.
    #[test]
    fn prompt_longer_than_the_capacity_keeps_its_head(
        lru in 1usize..32,
        len in 0usize..800,
    ) {
        let cfg = PrefixConfig {
            block_size_tokens: 1,
            max_blocks: 256,
            lru_capacity_per_endpoint: lru,
            max_total_entries: 1_000_000,
            auto_tune: false,
        };
        let mut idx = PrefixIndex::new(cfg);
        let text = mk_prompt(0, len, 0);
        let hashes = block_hashes(&cfg, "m", &[text.as_bytes()]);
        idx.insert(7, &hashes, None);
        let held = idx.longest_matches(&hashes).get(&7).copied().unwrap_or(0);
        prop_assert_eq!(held, hashes.len().min(lru), "{} blocks, capacity {}", hashes.len(), lru);
    }
}

/// The same under ordinary LRU pressure: a prompt arriving at a full endpoint evicts the
/// tail of an older prompt, not its first block, so the older prompt still matches there
/// for the blocks it kept.
#[test]
fn endpoint_under_lru_pressure_keeps_the_head_of_older_prompts() {
    let cfg = PrefixConfig {
        block_size_tokens: 1,
        max_blocks: 256,
        lru_capacity_per_endpoint: 4,
        max_total_entries: 1_000_000,
        auto_tune: false,
    };
    let mut idx = PrefixIndex::new(cfg);
    let older = block_hashes(&cfg, "m", &[b"aaaabbbbcccc"]);
    let newer = block_hashes(&cfg, "m", &[b"xxxxyyyy"]);
    idx.insert(1, &older, None);
    idx.insert(1, &newer, None);
    // Capacity 4 holds 2 of the older prompt's 3 blocks; only the first two can match.
    assert_eq!(idx.longest_matches(&older).get(&1), Some(&2));
}
