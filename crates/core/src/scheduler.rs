//! Scheduling: filters narrow the candidates, scorers rate each in [0, 1], weights combine
//! the ratings, and one picker chooses the primary endpoint and its fallbacks.
//!
//! The vocabulary (Filter, Scorer, Picker, Profile) and the plugin names follow the GIE's
//! scheduler so configurations carry over; the per-request [`EndpointView`] adds what the
//! picker itself has sent since the last scrape, so bursts between scrapes do not herd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, RngCore};

use crate::endpoint::{Endpoint, LoraState};
use crate::latency::LatencyView;

/// One candidate as the scheduler sees it for one request: plain numbers copied from the
/// endpoint's last scrape and counters, so scoring touches no locks or reference counts.
#[derive(Debug, Clone)]
pub struct EndpointView<'a> {
    pub endpoint: &'a Arc<Endpoint>,
    /// Metrics younger than the staleness threshold.
    pub fresh: bool,
    /// When the last successful scrape completed; `None` before the first.
    pub updated_at: Option<Duration>,
    /// Waiting requests: scraped, plus what this picker sent that the scrape cannot show yet.
    pub waiting: f64,
    pub running: f64,
    /// Scraped KV-cache use, whatever its age; `None` when the engine does not report it.
    pub kv_cache_usage: Option<f64>,
    /// How well the request's adapter fits (see [`LoraAffinityScorer`]); 0 when unknown.
    pub lora_affinity: f64,
    pub inflight_requests: u64,
    pub inflight_tokens: u64,
    /// Leading prompt blocks this endpoint probably has cached.
    pub prefix_blocks: usize,
    /// Prefill this picker has queued there, and its observed speed.
    pub latency: LatencyView,
}

impl<'a> EndpointView<'a> {
    /// A view of `endpoint` at `now` with in-flight accounting and no LoRA request.
    pub fn new(endpoint: &'a Arc<Endpoint>, now: Duration, staleness: Duration) -> Self {
        Self::build(endpoint, now, staleness, true, "")
    }

    /// Build a view of `endpoint` at `now` for a request served by `target_model`.
    ///
    /// In-flight estimate: the server's `waiting + running` already counts what it has
    /// received; if the picker has more requests outstanding there than that, the surplus is
    /// in transit or queued since the scrape, so it is added to `waiting`. With several
    /// pickers or other clients the server's own count is larger and wins. `use_inflight`
    /// switches this off, to compare.
    pub fn build(
        endpoint: &'a Arc<Endpoint>,
        now: Duration,
        staleness: Duration,
        use_inflight: bool,
        target_model: &str,
    ) -> Self {
        let (inflight_requests, inflight_tokens) = if use_inflight {
            (endpoint.inflight_requests(), endpoint.inflight_tokens())
        } else {
            (0, 0)
        };
        let hot = endpoint.hot();
        let fresh = hot
            .updated_at
            .is_some_and(|t| now.saturating_sub(t) <= staleness);
        let (w, r) = if fresh {
            (f64::from(hot.waiting), f64::from(hot.running))
        } else {
            (0.0, 0.0)
        };
        let unseen = (inflight_requests as f64 - (w + r)).max(0.0);
        // Only LoRA state lives solely in the full sample; read it when it can matter.
        let lora_affinity = if fresh && hot.has_lora && !target_model.is_empty() {
            endpoint.with_sample(|s| {
                s.metrics
                    .lora
                    .as_ref()
                    .map_or(0.0, |l| lora_affinity(l, target_model))
            })
        } else {
            0.0
        };
        EndpointView {
            endpoint,
            fresh,
            updated_at: hot.updated_at,
            waiting: w + unseen,
            running: r,
            kv_cache_usage: hot.kv_cache_usage,
            lora_affinity,
            inflight_requests,
            inflight_tokens,
            prefix_blocks: 0,
            latency: if use_inflight {
                endpoint.latency().view(now)
            } else {
                LatencyView::default()
            },
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.spec.addr
    }

    /// KV-cache use if the metrics are fresh and the engine reports it.
    pub fn kv_usage(&self) -> Option<f64> {
        self.kv_cache_usage.filter(|_| self.fresh)
    }
}

/// Per-request inputs shared by all plugins.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// The model the endpoint will serve (after rewrite); doubles as the LoRA adapter name.
    pub target_model: String,
    /// Number of hashed prompt blocks (the prefix scorer's denominator).
    pub prompt_blocks: usize,
    pub prompt_tokens: u64,
    /// `test-epp-endpoint-selection` header values, when present.
    pub test_selection: Option<Vec<String>>,
}

/// Narrows the candidate list (indices into the views).
pub trait Filter: Send + Sync + std::fmt::Debug {
    fn type_name(&self) -> &'static str;
    fn filter(&self, req: &RequestFacts, views: &[EndpointView<'_>], cands: &mut Vec<usize>);
}

/// Rates each candidate in [0, 1]; `out[i]` belongs to `cands[i]`.
pub trait Scorer: Send + Sync + std::fmt::Debug {
    fn type_name(&self) -> &'static str;
    /// Whether it reads [`EndpointView::prefix_blocks`] (so the prefix index must be kept).
    fn uses_prefix(&self) -> bool {
        false
    }
    fn score(
        &self,
        req: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
        out: &mut [f64],
    );
}

/// Chooses the primary endpoint and fallbacks, best first.
pub trait Picker: Send + Sync + std::fmt::Debug {
    fn type_name(&self) -> &'static str;
    fn pick(&self, cands: &[usize], scores: &[f64], rng: &mut dyn RngCore) -> Vec<usize>;
}

// ---------------------------------------------------------------------------------------
// Scorers

/// `(max - x) / (max - min)` over fresh candidates; 1 when all equal; 0 for stale ones.
fn score_lower_is_better(
    views: &[EndpointView<'_>],
    cands: &[usize],
    out: &mut [f64],
    value: impl Fn(&EndpointView<'_>) -> f64,
) {
    normalise_lower_is_better(views, cands, out, |v| v.fresh.then(|| value(v)));
}

/// `(max - x) / (max - min)` over the candidates that have a value; 1 when all equal; 0
/// for those without one.
fn normalise_lower_is_better(
    views: &[EndpointView<'_>],
    cands: &[usize],
    out: &mut [f64],
    value: impl Fn(&EndpointView<'_>) -> Option<f64>,
) {
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in cands.iter().filter_map(|&i| value(&views[i])) {
        min = min.min(v);
        max = max.max(v);
    }
    for (o, &i) in out.iter_mut().zip(cands) {
        *o = match value(&views[i]) {
            None => 0.0,
            Some(v) if max > min => (max - v) / (max - min),
            Some(_) => 1.0,
        };
    }
}

/// `queue-scorer`: fewer waiting requests is better.
#[derive(Debug, Default)]
pub struct QueueScorer;
impl Scorer for QueueScorer {
    fn type_name(&self) -> &'static str {
        "queue-scorer"
    }
    fn score(
        &self,
        _: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
        out: &mut [f64],
    ) {
        score_lower_is_better(views, cands, out, |v| v.waiting);
    }
}

/// `running-requests-size-scorer`: fewer running requests is better.
#[derive(Debug, Default)]
pub struct RunningRequestsScorer;
impl Scorer for RunningRequestsScorer {
    fn type_name(&self) -> &'static str {
        "running-requests-size-scorer"
    }
    fn score(
        &self,
        _: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
        out: &mut [f64],
    ) {
        score_lower_is_better(views, cands, out, |v| {
            v.running.max(v.inflight_requests as f64 - v.waiting)
        });
    }
}

/// `kv-cache-utilization-scorer`: `1 - usage`. Unknown usage (llama.cpp, stale) scores 0.5,
/// neither rewarded nor punished.
#[derive(Debug, Default)]
pub struct KvCacheScorer;
impl Scorer for KvCacheScorer {
    fn type_name(&self) -> &'static str {
        "kv-cache-utilization-scorer"
    }
    fn score(
        &self,
        _: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
        out: &mut [f64],
    ) {
        for (o, &i) in out.iter_mut().zip(cands) {
            *o = match views[i].kv_usage() {
                Some(u) => (1.0 - u).clamp(0.0, 1.0),
                None if views[i].fresh => 0.5,
                None => 0.0,
            };
        }
    }
}

/// `prefix-cache-scorer`: share of the prompt's blocks the endpoint probably holds.
#[derive(Debug, Default)]
pub struct PrefixCacheScorer;
impl Scorer for PrefixCacheScorer {
    fn type_name(&self) -> &'static str {
        "prefix-cache-scorer"
    }
    fn uses_prefix(&self) -> bool {
        true
    }
    fn score(
        &self,
        req: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
        out: &mut [f64],
    ) {
        for (o, &i) in out.iter_mut().zip(cands) {
            *o = if req.prompt_blocks == 0 {
                0.0
            } else {
                views[i].prefix_blocks as f64 / req.prompt_blocks as f64
            };
        }
    }
}

/// Where adapter `model` stands on an endpoint with this LoRA state.
fn lora_affinity(lora: &LoraState, model: &str) -> f64 {
    if lora.running.iter().any(|a| a == model) {
        1.0
    } else if lora.waiting.iter().any(|a| a == model) {
        0.6
    } else if ((lora.running.len() + lora.waiting.len()) as u32) < lora.max_loras {
        0.8
    } else {
        0.0
    }
}

/// `lora-affinity-scorer`: 1.0 adapter active, 0.6 waiting to load, 0.8 room to load it,
/// 0 otherwise.
#[derive(Debug, Default)]
pub struct LoraAffinityScorer;
impl Scorer for LoraAffinityScorer {
    fn type_name(&self) -> &'static str {
        "lora-affinity-scorer"
    }
    fn score(
        &self,
        _: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
        out: &mut [f64],
    ) {
        for (o, &i) in out.iter_mut().zip(cands) {
            *o = views[i].lora_affinity;
        }
    }
}

/// `token-load-scorer`: fewer prompt tokens in flight from this picker is better.
#[derive(Debug, Default)]
pub struct TokenLoadScorer;
impl Scorer for TokenLoadScorer {
    fn type_name(&self) -> &'static str {
        "token-load-scorer"
    }
    fn score(
        &self,
        _: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
        out: &mut [f64],
    ) {
        // In-flight counts are the picker's own, fresh whatever the scrape's age.
        normalise_lower_is_better(views, cands, out, |v| Some(v.inflight_tokens as f64));
    }
}

/// `inflight-load-scorer` (ours): fewer requests in flight from this picker is better.
/// Works without any scrape, so it also covers the first moments after start-up.
#[derive(Debug, Default)]
pub struct InflightLoadScorer;
impl Scorer for InflightLoadScorer {
    fn type_name(&self) -> &'static str {
        "inflight-load-scorer"
    }
    fn score(
        &self,
        _: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
        out: &mut [f64],
    ) {
        normalise_lower_is_better(views, cands, out, |v| Some(v.inflight_requests as f64));
    }
}

// ---------------------------------------------------------------------------------------
// Filters

/// Keep the candidates `keep` accepts, unless that would remove all of them: a filter
/// narrows the choice, it never empties the pool on its own (the reference behaves alike).
fn keep_some(cands: &mut Vec<usize>, keep: impl Fn(usize) -> bool) {
    if cands.iter().any(|&i| keep(i)) {
        cands.retain(|&i| keep(i));
    }
}

/// `header-based-testing-filter`: the conformance hook. With `test-epp-endpoint-selection`
/// present, only the endpoints it names (by IP or `ip:port`) remain, possibly none.
#[derive(Debug, Default)]
pub struct HeaderTestingFilter;
impl Filter for HeaderTestingFilter {
    fn type_name(&self) -> &'static str {
        "header-based-testing-filter"
    }
    fn filter(&self, req: &RequestFacts, views: &[EndpointView<'_>], cands: &mut Vec<usize>) {
        let Some(sel) = &req.test_selection else {
            return;
        };
        cands.retain(|&i| {
            let a = views[i].addr();
            sel.iter().any(|s| match s.parse::<SocketAddr>() {
                Ok(sa) => sa == a,
                Err(_) => s.parse::<std::net::IpAddr>().is_ok_and(|ip| ip == a.ip()),
            })
        });
    }
}

/// `least-queue-filter`: keep endpoints whose queue is within `(max - min) / n` of the least.
#[derive(Debug, Default)]
pub struct LeastQueueFilter;
impl Filter for LeastQueueFilter {
    fn type_name(&self) -> &'static str {
        "least-queue-filter"
    }
    fn filter(&self, _: &RequestFacts, views: &[EndpointView<'_>], cands: &mut Vec<usize>) {
        least_by(views, cands, |v| v.fresh.then_some(v.waiting));
    }
}

/// `least-kv-cache-filter`: keep endpoints whose KV use is within `(max - min) / n` of the least.
#[derive(Debug, Default)]
pub struct LeastKvCacheFilter;
impl Filter for LeastKvCacheFilter {
    fn type_name(&self) -> &'static str {
        "least-kv-cache-filter"
    }
    fn filter(&self, _: &RequestFacts, views: &[EndpointView<'_>], cands: &mut Vec<usize>) {
        least_by(views, cands, |v| v.kv_usage());
    }
}

fn least_by(
    views: &[EndpointView<'_>],
    cands: &mut Vec<usize>,
    value: impl Fn(&EndpointView<'_>) -> Option<f64>,
) {
    let vals: Vec<f64> = cands.iter().filter_map(|&i| value(&views[i])).collect();
    if vals.is_empty() {
        return;
    }
    let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let limit = min + (max - min) / cands.len() as f64;
    keep_some(cands, |i| value(&views[i]).is_some_and(|v| v <= limit));
}

/// `low-queue-filter`: keep endpoints with fewer than `threshold` waiting requests.
#[derive(Debug)]
pub struct LowQueueFilter {
    pub threshold: f64,
}
impl Filter for LowQueueFilter {
    fn type_name(&self) -> &'static str {
        "low-queue-filter"
    }
    fn filter(&self, _: &RequestFacts, views: &[EndpointView<'_>], cands: &mut Vec<usize>) {
        keep_some(cands, |i| {
            views[i].fresh && views[i].waiting < self.threshold
        });
    }
}

/// `lora-affinity-filter`: prefer endpoints with the adapter active, else with room for it.
#[derive(Debug, Default)]
pub struct LoraAffinityFilter;
impl Filter for LoraAffinityFilter {
    fn type_name(&self) -> &'static str {
        "lora-affinity-filter"
    }
    fn filter(&self, _: &RequestFacts, views: &[EndpointView<'_>], cands: &mut Vec<usize>) {
        keep_some(cands, |i| views[i].lora_affinity >= 1.0);
        keep_some(cands, |i| views[i].lora_affinity >= 0.8);
    }
}

/// `prefix-cache-affinity-filter`: keep endpoints holding at least `threshold` of the prompt.
#[derive(Debug)]
pub struct PrefixAffinityFilter {
    pub threshold: f64,
}
impl Filter for PrefixAffinityFilter {
    fn type_name(&self) -> &'static str {
        "prefix-cache-affinity-filter"
    }
    fn filter(&self, req: &RequestFacts, views: &[EndpointView<'_>], cands: &mut Vec<usize>) {
        if req.prompt_blocks == 0 {
            return;
        }
        keep_some(cands, |i| {
            views[i].prefix_blocks as f64 / req.prompt_blocks as f64 >= self.threshold
        });
    }
}

// ---------------------------------------------------------------------------------------
// Pickers

/// `max-score-picker`: highest score first, ties broken at random; `max_endpoints > 1`
/// yields fallbacks.
#[derive(Debug)]
pub struct MaxScorePicker {
    pub max_endpoints: usize,
}
impl Picker for MaxScorePicker {
    fn type_name(&self) -> &'static str {
        "max-score-picker"
    }
    fn pick(&self, cands: &[usize], scores: &[f64], rng: &mut dyn RngCore) -> Vec<usize> {
        if self.max_endpoints <= 1 {
            // One pass: the best score, ties broken uniformly (reservoir sampling).
            let mut best: Option<usize> = None;
            let mut ties = 0u32;
            for (k, &s) in scores.iter().enumerate() {
                match best {
                    Some(b) if s < scores[b] => {}
                    Some(b) if s == scores[b] => {
                        ties += 1;
                        if rng.random_range(0..ties) == 0 {
                            best = Some(k);
                        }
                    }
                    _ => {
                        best = Some(k);
                        ties = 1;
                    }
                }
            }
            return best.map(|k| vec![cands[k]]).unwrap_or_default();
        }
        let mut order: Vec<usize> = (0..cands.len()).collect();
        order.shuffle(rng);
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        order.truncate(self.max_endpoints);
        order.into_iter().map(|k| cands[k]).collect()
    }
}

/// `random-picker`: uniformly random, ignoring scores.
#[derive(Debug)]
pub struct RandomPicker {
    pub max_endpoints: usize,
}
impl Picker for RandomPicker {
    fn type_name(&self) -> &'static str {
        "random-picker"
    }
    fn pick(&self, cands: &[usize], _: &[f64], rng: &mut dyn RngCore) -> Vec<usize> {
        let mut c = cands.to_vec();
        c.shuffle(rng);
        c.truncate(self.max_endpoints.max(1));
        c
    }
}

/// `weighted-random-picker`: random in proportion to score (A-Res: key `u^(1/w)`).
#[derive(Debug)]
pub struct WeightedRandomPicker {
    pub max_endpoints: usize,
}
impl Picker for WeightedRandomPicker {
    fn type_name(&self) -> &'static str {
        "weighted-random-picker"
    }
    fn pick(&self, cands: &[usize], scores: &[f64], rng: &mut dyn RngCore) -> Vec<usize> {
        let mut keyed: Vec<(f64, usize)> = cands
            .iter()
            .zip(scores)
            .map(|(&c, &s)| {
                let w = s.max(1e-9);
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                (u.powf(1.0 / w), c)
            })
            .collect();
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        keyed.truncate(self.max_endpoints.max(1));
        keyed.into_iter().map(|(_, c)| c).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Profiles

/// A named pipeline: filters, weighted scorers, one picker.
#[derive(Debug)]
pub struct Profile {
    pub name: String,
    pub filters: Vec<Box<dyn Filter>>,
    pub scorers: Vec<(Box<dyn Scorer>, f64)>,
    pub picker: Box<dyn Picker>,
}

/// Times each plugin call, for `inference_extension_plugin_duration_seconds`. The caller
/// supplies the clock so `core` reads none itself.
pub struct PluginTimer<'a> {
    pub clock: &'a (dyn Fn() -> Duration + Send + Sync),
    /// Called with the extension point (`Filter`, `Scorer`, `Picker`), plugin type and time.
    pub observe: &'a (dyn Fn(&'static str, &'static str, Duration) + Send + Sync),
}

impl PluginTimer<'_> {
    fn time<R>(&self, point: &'static str, plugin: &'static str, f: impl FnOnce() -> R) -> R {
        let t0 = (self.clock)();
        let r = f();
        (self.observe)(point, plugin, (self.clock)().saturating_sub(t0));
        r
    }
}

/// Run `f`, timed when a timer is given.
fn timed<R>(
    timer: Option<&PluginTimer<'_>>,
    point: &'static str,
    plugin: &'static str,
    f: impl FnOnce() -> R,
) -> R {
    match timer {
        Some(t) => t.time(point, plugin, f),
        None => f(),
    }
}

impl Profile {
    /// The reference's default: queue 2, KV cache 2, prefix 3, max-score picker.
    pub fn default_profile() -> Self {
        Profile {
            name: "default".into(),
            filters: vec![],
            scorers: vec![
                (Box::new(QueueScorer), 2.0),
                (Box::new(KvCacheScorer), 2.0),
                (Box::new(PrefixCacheScorer), 3.0),
            ],
            picker: Box::new(MaxScorePicker { max_endpoints: 1 }),
        }
    }

    /// Whether any plugin needs the prefix index.
    pub fn uses_prefix(&self) -> bool {
        self.scorers.iter().any(|(s, _)| s.uses_prefix())
            || self
                .filters
                .iter()
                .any(|f| f.type_name() == "prefix-cache-affinity-filter")
    }

    /// Run the pipeline over `cands`; returns chosen view indices, best first (maybe empty).
    /// After the profile's filters, candidates for which `avoid` holds are dropped unless
    /// that would drop all (used to steer around saturated endpoints without ever
    /// overriding a filter's hard choice).
    pub fn run(
        &self,
        req: &RequestFacts,
        views: &[EndpointView<'_>],
        mut cands: Vec<usize>,
        avoid: &dyn Fn(usize) -> bool,
        rng: &mut dyn RngCore,
        timer: Option<&PluginTimer<'_>>,
    ) -> Vec<usize> {
        for f in &self.filters {
            timed(timer, "Filter", f.type_name(), || {
                f.filter(req, views, &mut cands)
            });
            if cands.is_empty() {
                return cands;
            }
        }
        keep_some(&mut cands, |i| !avoid(i));
        let mut total = vec![0.0; cands.len()];
        let mut buf = vec![0.0; cands.len()];
        for (s, w) in &self.scorers {
            timed(timer, "Scorer", s.type_name(), || {
                s.score(req, views, &cands, &mut buf)
            });
            for (t, b) in total.iter_mut().zip(&buf) {
                *t += b.clamp(0.0, 1.0) * w;
            }
        }
        timed(timer, "Picker", self.picker.type_name(), || {
            self.picker.pick(&cands, &total, rng)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{EndpointMetrics, EndpointSpec, Engine, LoraState};
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    const NOW: Duration = Duration::from_secs(100);
    const STALE: Duration = Duration::from_secs(2);

    fn mk_endpoint(port: u16, waiting: u32, running: u32, kv: f64) -> Arc<Endpoint> {
        let e = Arc::new(Endpoint::new(
            port as u32,
            EndpointSpec::new(([127, 0, 0, 1], port).into(), Engine::Vllm),
        ));
        e.set_metrics(
            EndpointMetrics {
                waiting,
                running,
                kv_cache_usage: Some(kv),
                ..Default::default()
            },
            NOW,
        );
        e
    }

    fn views(eps: &[Arc<Endpoint>]) -> Vec<EndpointView<'_>> {
        views_for(eps, "")
    }

    fn views_for<'a>(eps: &'a [Arc<Endpoint>], model: &str) -> Vec<EndpointView<'a>> {
        eps.iter()
            .map(|e| EndpointView::build(e, NOW, STALE, true, model))
            .collect()
    }

    fn scores(s: &dyn Scorer, req: &RequestFacts, v: &[EndpointView<'_>]) -> Vec<f64> {
        let cands: Vec<usize> = (0..v.len()).collect();
        let mut out = vec![0.0; v.len()];
        s.score(req, v, &cands, &mut out);
        out
    }

    #[test]
    fn queue_scorer_prefers_shorter_queue_and_is_flat_when_equal() {
        let eps = [
            mk_endpoint(1, 0, 0, 0.0),
            mk_endpoint(2, 10, 0, 0.0),
            mk_endpoint(3, 5, 0, 0.0),
        ];
        let v = views(&eps);
        assert_eq!(
            scores(&QueueScorer, &RequestFacts::default(), &v),
            vec![1.0, 0.0, 0.5]
        );
        let eps = [mk_endpoint(1, 3, 0, 0.0), mk_endpoint(2, 3, 0, 0.0)];
        let v = views(&eps);
        assert_eq!(
            scores(&QueueScorer, &RequestFacts::default(), &v),
            vec![1.0, 1.0]
        );
    }

    #[test]
    fn stale_metrics_score_zero_on_load() {
        let eps = [mk_endpoint(1, 0, 0, 0.0), mk_endpoint(2, 4, 0, 0.5)];
        let v: Vec<_> = eps
            .iter()
            .map(|e| EndpointView::new(e, NOW + Duration::from_secs(3), STALE))
            .collect();
        assert!(v.iter().all(|x| !x.fresh));
        assert_eq!(
            scores(&QueueScorer, &RequestFacts::default(), &v),
            vec![0.0, 0.0]
        );
        assert_eq!(
            scores(&KvCacheScorer, &RequestFacts::default(), &v),
            vec![0.0, 0.0]
        );
    }

    #[test]
    fn inflight_beyond_scraped_load_counts_as_waiting() {
        let e = mk_endpoint(1, 1, 1, 0.0);
        for _ in 0..5 {
            e.add_inflight(10);
        }
        let v = EndpointView::new(&e, NOW, STALE);
        // Server knows of 2, picker sent 5: 3 more are in transit.
        assert_eq!(v.waiting, 4.0);
        let busy = mk_endpoint(2, 9, 1, 0.0);
        busy.add_inflight(10);
        assert_eq!(EndpointView::new(&busy, NOW, STALE).waiting, 9.0);
    }

    #[test]
    fn kv_scorer_is_one_minus_usage_and_neutral_when_unknown() {
        let unknown = mk_endpoint(3, 0, 0, 0.0);
        unknown.set_metrics(EndpointMetrics::default(), NOW);
        let eps = [
            mk_endpoint(1, 0, 0, 0.25),
            mk_endpoint(2, 0, 0, 1.0),
            unknown,
        ];
        let v = views(&eps);
        assert_eq!(
            scores(&KvCacheScorer, &RequestFacts::default(), &v),
            vec![0.75, 0.0, 0.5]
        );
    }

    #[test]
    fn lora_scorer_ranks_active_waiting_room_full() {
        let mk = |port, running: &[&str], waiting: &[&str], max| {
            let e = mk_endpoint(port, 0, 0, 0.0);
            e.set_metrics(
                EndpointMetrics {
                    lora: Some(LoraState {
                        running: running.iter().map(|s| s.to_string()).collect(),
                        waiting: waiting.iter().map(|s| s.to_string()).collect(),
                        max_loras: max,
                    }),
                    ..Default::default()
                },
                NOW,
            );
            e
        };
        let eps = [
            mk(1, &["x"], &[], 2),
            mk(2, &["a"], &["x"], 2),
            mk(3, &["a"], &[], 2),
            mk(4, &["a", "b"], &[], 2),
        ];
        let v = views_for(&eps, "x");
        let req = RequestFacts {
            target_model: "x".into(),
            ..Default::default()
        };
        assert_eq!(
            scores(&LoraAffinityScorer, &req, &v),
            vec![1.0, 0.6, 0.8, 0.0]
        );
        let mut cands = vec![0, 1, 2, 3];
        LoraAffinityFilter.filter(&req, &v, &mut cands);
        assert_eq!(cands, vec![0]);
    }

    #[test]
    fn inflight_scorers_rank_by_the_pickers_own_counts_even_when_stale() {
        let eps = [
            mk_endpoint(1, 0, 0, 0.0),
            mk_endpoint(2, 0, 0, 0.0),
            mk_endpoint(3, 0, 0, 0.0),
        ];
        for (e, n) in eps.iter().zip([0, 2, 4]) {
            for _ in 0..n {
                e.add_inflight(100);
            }
        }
        // Long after the last scrape: load scorers give up, in-flight ones still rank.
        let late = NOW + Duration::from_secs(60);
        let v: Vec<_> = eps
            .iter()
            .map(|e| EndpointView::new(e, late, STALE))
            .collect();
        let req = RequestFacts::default();
        assert_eq!(scores(&InflightLoadScorer, &req, &v), vec![1.0, 0.5, 0.0]);
        assert_eq!(scores(&TokenLoadScorer, &req, &v), vec![1.0, 0.5, 0.0]);
        assert_eq!(scores(&QueueScorer, &req, &v), vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn prefix_scorer_is_matched_over_total() {
        let eps = [mk_endpoint(1, 0, 0, 0.0), mk_endpoint(2, 0, 0, 0.0)];
        let mut v = views(&eps);
        v[0].prefix_blocks = 3;
        let req = RequestFacts {
            prompt_blocks: 4,
            ..Default::default()
        };
        assert_eq!(scores(&PrefixCacheScorer, &req, &v), vec![0.75, 0.0]);
    }

    #[test]
    fn testing_filter_keeps_only_named_endpoints() {
        let eps = [
            mk_endpoint(1, 0, 0, 0.0),
            mk_endpoint(2, 0, 0, 0.0),
            mk_endpoint(3, 0, 0, 0.0),
        ];
        let v = views(&eps);
        let mut cands = vec![0, 1, 2];
        let req = RequestFacts {
            test_selection: Some(vec!["127.0.0.1:2".into(), "10.0.0.1".into()]),
            ..Default::default()
        };
        HeaderTestingFilter.filter(&req, &v, &mut cands);
        assert_eq!(cands, vec![1]);
        // By IP only, every port of that IP stays.
        let mut cands = vec![0, 1, 2];
        let req = RequestFacts {
            test_selection: Some(vec!["127.0.0.1".into()]),
            ..Default::default()
        };
        HeaderTestingFilter.filter(&req, &v, &mut cands);
        assert_eq!(cands, vec![0, 1, 2]);
    }

    #[test]
    fn least_queue_filter_keeps_the_low_band_and_never_empties() {
        let eps = [
            mk_endpoint(1, 0, 0, 0.0),
            mk_endpoint(2, 9, 0, 0.0),
            mk_endpoint(3, 2, 0, 0.0),
        ];
        let v = views(&eps);
        let mut cands = vec![0, 1, 2];
        LeastQueueFilter.filter(&RequestFacts::default(), &v, &mut cands);
        assert_eq!(cands, vec![0, 2]);
        let mut cands = vec![1];
        LowQueueFilter { threshold: 5.0 }.filter(&RequestFacts::default(), &v, &mut cands);
        assert_eq!(cands, vec![1]);
    }

    #[test]
    fn max_score_picker_orders_best_first_with_fallbacks() {
        let mut rng = SmallRng::seed_from_u64(1);
        let p = MaxScorePicker { max_endpoints: 2 };
        assert_eq!(
            p.pick(&[10, 11, 12], &[0.1, 0.9, 0.5], &mut rng),
            vec![11, 12]
        );
    }

    #[test]
    fn max_score_picker_breaks_ties_at_random() {
        let mut rng = SmallRng::seed_from_u64(7);
        let p = MaxScorePicker { max_endpoints: 1 };
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[p.pick(&[0, 1, 2], &[1.0, 1.0, 1.0], &mut rng)[0]] += 1;
        }
        assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
    }

    #[test]
    fn weighted_random_picker_follows_scores() {
        let mut rng = SmallRng::seed_from_u64(3);
        let p = WeightedRandomPicker { max_endpoints: 1 };
        let mut hits = [0; 2];
        for _ in 0..4000 {
            hits[p.pick(&[0, 1], &[3.0, 1.0], &mut rng)[0]] += 1;
        }
        let share = hits[0] as f64 / 4000.0;
        assert!((0.70..0.80).contains(&share), "{share}");
    }

    #[test]
    fn default_profile_avoids_the_long_queue() {
        let eps = [
            mk_endpoint(1, 30, 4, 0.9),
            mk_endpoint(2, 0, 1, 0.1),
            mk_endpoint(3, 1, 1, 0.2),
        ];
        let v = views(&eps);
        let mut rng = SmallRng::seed_from_u64(1);
        let picked = Profile::default_profile().run(
            &RequestFacts::default(),
            &v,
            vec![0, 1, 2],
            &|_| false,
            &mut rng,
            None,
        );
        assert_eq!(picked, vec![1]);
    }
}
