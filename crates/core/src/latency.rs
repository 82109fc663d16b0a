//! Predicted time to first token: what each endpoint has learned about its own speed, and
//! the `predicted-latency-scorer` that routes each request to the endpoint expected to
//! answer first.
//!
//! The model is a straight line per endpoint, `ttft = intercept + slope * work`, where
//! `work` is the prompt tokens the endpoint must prefill before this request's first token:
//! the uncached part of this prompt plus the prefill this picker has queued there (requests
//! sent whose first token has not come back). `slope` is the endpoint's observed seconds
//! per prefill token under its current decode load; `intercept` covers what does not scale
//! with the queue (a step's fixed cost, a full batch waiting for a slot). Each endpoint fits
//! its line by exponentially weighted least squares over the first tokens it returns, so a
//! slower or busier replica shows up within a few dozen requests.
//!
//! An endpoint that has not answered lately (because the scorer steered traffic away, or
//! it just joined) would otherwise keep an old estimate forever; its line is blended toward
//! the pool's, the more the older its last sample.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::scheduler::{EndpointView, RequestFacts, Scorer};

/// Weight kept by older samples at each new one (about 30 samples of memory).
const DECAY: f64 = 0.97;
/// Samples (in decayed weight) before an endpoint's own line is trusted fully.
const FULL_TRUST_SAMPLES: f64 = 8.0;
/// Seconds per prefill token are kept within this range, whatever the samples say.
const SLOPE_RANGE: (f64, f64) = (1e-7, 1.0);

/// A line `ttft = intercept + slope * work_tokens`, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    pub intercept: f64,
    pub slope: f64,
}

impl Line {
    pub fn at(&self, work_tokens: f64) -> f64 {
        self.intercept + self.slope * work_tokens
    }

    fn blend(self, other: Line, w: f64) -> Line {
        Line {
            intercept: w * self.intercept + (1.0 - w) * other.intercept,
            slope: w * self.slope + (1.0 - w) * other.slope,
        }
    }
}

/// Exponentially weighted least squares of TTFT on work tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TtftFit {
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

impl TtftFit {
    /// Adds one observation: `ttft` seconds for `work` tokens of prefill.
    pub fn observe(&mut self, work: f64, ttft: f64) {
        if !(work.is_finite() && ttft.is_finite() && work >= 0.0 && ttft >= 0.0) {
            return;
        }
        self.n = DECAY * self.n + 1.0;
        self.sx = DECAY * self.sx + work;
        self.sy = DECAY * self.sy + ttft;
        self.sxx = DECAY * self.sxx + work * work;
        self.sxy = DECAY * self.sxy + work * ttft;
    }

    /// Decayed sample weight.
    pub fn weight(&self) -> f64 {
        self.n
    }

    /// The fitted line, `None` before any sample. With too little spread in `work` to
    /// separate slope from intercept, the line goes through the origin.
    pub fn line(&self) -> Option<Line> {
        if self.n <= 0.0 {
            return None;
        }
        let var = self.n * self.sxx - self.sx * self.sx;
        let slope = if var > 1e-6 * self.n * self.sxx && var > 0.0 {
            (self.n * self.sxy - self.sx * self.sy) / var
        } else if self.sx > 0.0 {
            self.sy / self.sx
        } else {
            SLOPE_RANGE.0
        };
        let slope = slope.clamp(SLOPE_RANGE.0, SLOPE_RANGE.1);
        let intercept = ((self.sy - slope * self.sx) / self.n).max(0.0);
        Some(Line { intercept, slope })
    }
}

/// Per-endpoint state: the prefill this picker has queued there, and the fitted line.
/// Counters are atomic (touched on every dispatch); the fit sits behind a lock taken once
/// per first token, and its line is republished to atomics for the scorer.
#[derive(Debug)]
pub struct EndpointLatency {
    prefill_requests: AtomicU64,
    prefill_tokens: AtomicU64,
    fit: Mutex<TtftFit>,
    /// `f64` bits of intercept, slope and weight; NaN before the first sample.
    intercept: AtomicU64,
    slope: AtomicU64,
    weight: AtomicU64,
    /// Nanoseconds (plus one) of the last sample; 0 for none.
    last_sample: AtomicU64,
}

impl Default for EndpointLatency {
    fn default() -> Self {
        EndpointLatency {
            prefill_requests: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
            fit: Mutex::new(TtftFit::default()),
            intercept: AtomicU64::new(f64::NAN.to_bits()),
            slope: AtomicU64::new(f64::NAN.to_bits()),
            weight: AtomicU64::new(0f64.to_bits()),
            last_sample: AtomicU64::new(0),
        }
    }
}

/// What the scorer reads of one endpoint's latency state at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencyView {
    /// This picker's requests there still waiting for their first token.
    pub prefill_requests: u64,
    /// Their uncached prompt tokens.
    pub prefill_tokens: u64,
    /// The endpoint's own line, its sample weight and the age of its last sample.
    pub line: Option<(Line, f64, Duration)>,
}

impl EndpointLatency {
    pub(crate) fn add_prefill(&self, tokens: u64) {
        self.prefill_requests.fetch_add(1, Ordering::Relaxed);
        self.prefill_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    pub(crate) fn sub_prefill(&self, tokens: u64) {
        let _ = self
            .prefill_requests
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
        let _ = self
            .prefill_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(tokens))
            });
    }

    /// Prefill tokens queued here by this picker.
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Ordering::Relaxed)
    }

    /// Records that a request with `work` tokens of prefill ahead of and including its own
    /// returned its first token `ttft` after dispatch, at `now`.
    pub fn observe(&self, work: f64, ttft: f64, now: Duration) {
        let mut fit = self.fit.lock();
        fit.observe(work, ttft);
        if let Some(l) = fit.line() {
            self.intercept
                .store(l.intercept.to_bits(), Ordering::Relaxed);
            self.slope.store(l.slope.to_bits(), Ordering::Relaxed);
            self.weight.store(fit.weight().to_bits(), Ordering::Relaxed);
            let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX - 1);
            self.last_sample.store(nanos + 1, Ordering::Release);
        }
    }

    /// The state at `now`.
    pub fn view(&self, now: Duration) -> LatencyView {
        let last = self.last_sample.load(Ordering::Acquire);
        let line = (last > 0).then(|| {
            let l = Line {
                intercept: f64::from_bits(self.intercept.load(Ordering::Relaxed)),
                slope: f64::from_bits(self.slope.load(Ordering::Relaxed)),
            };
            let w = f64::from_bits(self.weight.load(Ordering::Relaxed));
            (l, w, now.saturating_sub(Duration::from_nanos(last - 1)))
        });
        LatencyView {
            prefill_requests: self.prefill_requests.load(Ordering::Relaxed),
            prefill_tokens: self.prefill_tokens(),
            line: line.filter(|(l, _, _)| l.intercept.is_finite() && l.slope.is_finite()),
        }
    }
}

/// `predicted-latency-scorer` (ours): each candidate's predicted TTFT for this request, as
/// `best / predicted` (1 for the fastest, less for the rest in proportion).
///
/// Predicted TTFT = the endpoint's line at (queued prefill + uncached prompt tokens) plus,
/// for an adapter request, the cost of getting the adapter into the batch. The prefix cache
/// enters only through the uncached tokens, so a cache hit wins exactly while the queue in
/// front of it costs less than recomputing the prefix elsewhere; stickiness breaks on its
/// own when it no longer pays.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictedLatencyScorer {
    /// The line used before an endpoint (or the pool) has any sample of its own.
    pub prior: Line,
    /// Time for an adapter to be loaded into a free slot.
    pub lora_load: Duration,
    /// Time an adapter request waits when every slot holds another adapter.
    pub lora_wait: Duration,
    /// How fast an endpoint's own line fades into the pool's after its last sample.
    pub memory: Duration,
    /// Extra cost, in prompt tokens per token, of recomputing a prefix that another
    /// candidate holds: the copy takes cache room that other prompts need and splits the
    /// group's later requests. 0 prices only this request's own prefill.
    pub duplicate_cost: f64,
}

impl Default for PredictedLatencyScorer {
    fn default() -> Self {
        PredictedLatencyScorer {
            // 30k prompt tokens/s and a 20 ms fixed part: an 8B model on one H100.
            prior: Line {
                intercept: 0.02,
                slope: 1.0 / 30_000.0,
            },
            lora_load: Duration::from_millis(50),
            lora_wait: Duration::from_secs(2),
            memory: Duration::from_secs(2),
            duplicate_cost: 0.0,
        }
    }
}

impl PredictedLatencyScorer {
    /// Predicted TTFT in seconds of each candidate, in `cands` order.
    pub fn predict(
        &self,
        req: &RequestFacts,
        views: &[EndpointView<'_>],
        cands: &[usize],
    ) -> Vec<f64> {
        // The pool's line: the sample-weighted mean of the endpoints' recent lines.
        let (mut wsum, mut a, mut b) = (0.0, 0.0, 0.0);
        for v in views {
            if let Some((l, w, age)) = v.latency.line {
                let w = w * self.recency(age);
                wsum += w;
                a += w * l.intercept;
                b += w * l.slope;
            }
        }
        let pool = if wsum > 0.0 {
            Line {
                intercept: a / wsum,
                slope: b / wsum,
            }
        } else {
            self.prior
        };
        // The adapter matters only if some endpoint has it active or queued; a base-model
        // request (or an adapter nobody holds yet) pays nothing anywhere.
        let known_adapter = views
            .iter()
            .any(|v| v.lora_affinity == 1.0 || v.lora_affinity == 0.6);
        let prompt = req.prompt_tokens as f64;
        let share = |v: &EndpointView<'_>| {
            if req.prompt_blocks > 0 {
                (v.prefix_blocks as f64 / req.prompt_blocks as f64).min(1.0)
            } else {
                0.0
            }
        };
        let best_share = cands.iter().map(|&i| share(&views[i])).fold(0.0, f64::max);
        cands
            .iter()
            .map(|&i| {
                let v = &views[i];
                let mut line = match v.latency.line {
                    Some((l, w, age)) => {
                        l.blend(pool, (w / FULL_TRUST_SAMPLES).min(1.0) * self.recency(age))
                    }
                    None => pool,
                };
                // When TTFT is set by something other than prefill (a full batch, a full
                // cache), the fitted slope collapses toward zero and cached tokens would
                // look free; prefill is never faster than the prior's speed.
                line.slope = line.slope.max(self.prior.slope);
                let cached = share(v);
                let duplicate = self.duplicate_cost * (best_share - cached) * prompt;
                // Waiting requests beyond everything this picker has outstanding there come
                // from elsewhere (other pickers, other clients); count each as a prompt
                // like this one. (Comparing with all outstanding requests, not just those
                // in prefill, keeps a 50 ms-old scrape from counting ours twice.)
                let others = (v.waiting - v.inflight_requests as f64).max(0.0);
                let queued = v.latency.prefill_tokens as f64 + others * prompt;
                let lora = if !known_adapter || v.lora_affinity >= 1.0 {
                    0.0
                } else if v.lora_affinity >= 0.8 {
                    self.lora_load.as_secs_f64()
                } else if v.lora_affinity >= 0.6 {
                    self.lora_load.as_secs_f64() / 2.0
                } else {
                    self.lora_wait.as_secs_f64()
                };
                line.at(queued + prompt * (1.0 - cached) + duplicate) + lora
            })
            .collect()
    }

    fn recency(&self, age: Duration) -> f64 {
        let m = self.memory.as_secs_f64();
        if m <= 0.0 {
            1.0
        } else {
            (-age.as_secs_f64() / m).exp()
        }
    }
}

impl Scorer for PredictedLatencyScorer {
    fn type_name(&self) -> &'static str {
        "predicted-latency-scorer"
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
        let pred = self.predict(req, views, cands);
        let best = pred.iter().copied().fold(f64::INFINITY, f64::min);
        for (o, p) in out.iter_mut().zip(&pred) {
            // A millisecond floor keeps the ratio meaningful when predictions are ~0.
            *o = (best + 1e-3) / (p + 1e-3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Endpoint, EndpointMetrics, EndpointSpec, Engine, LoraState};
    use std::sync::Arc;

    const NOW: Duration = Duration::from_secs(10);

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let e = Arc::new(Endpoint::new(
                    u32::from(i),
                    EndpointSpec::new(([127, 0, 0, 1], 9000 + i).into(), Engine::Vllm),
                ));
                e.set_metrics(EndpointMetrics::default(), NOW);
                e
            })
            .collect()
    }

    fn predicted(eps: &[Arc<Endpoint>], req: &RequestFacts, prefix: &[usize]) -> Vec<f64> {
        let mut views: Vec<EndpointView<'_>> = eps
            .iter()
            .map(|e| EndpointView::build(e, NOW, Duration::from_secs(2), true, &req.target_model))
            .collect();
        for (v, &p) in views.iter_mut().zip(prefix) {
            v.prefix_blocks = p;
        }
        let cands: Vec<usize> = (0..eps.len()).collect();
        PredictedLatencyScorer::default().predict(req, &views, &cands)
    }

    #[test]
    fn a_cache_hit_wins_until_the_queue_in_front_of_it_costs_more() {
        let eps = endpoints(2);
        let req = RequestFacts {
            prompt_tokens: 6000,
            prompt_blocks: 375,
            ..Default::default()
        };
        // Endpoint 0 holds 90% of the prompt: it wins while idle.
        let p = predicted(&eps, &req, &[337, 0]);
        assert!(p[0] < p[1], "{p:?}");
        // 2,000 queued prefill tokens there still leave it ahead (600 + 2,000 < 6,000)...
        eps[0].latency().add_prefill(2000);
        let p = predicted(&eps, &req, &[337, 0]);
        assert!(p[0] < p[1], "{p:?}");
        // ...but 8,000 do not: stickiness breaks.
        eps[0].latency().add_prefill(6000);
        let p = predicted(&eps, &req, &[337, 0]);
        assert!(p[0] > p[1], "{p:?}");
    }

    #[test]
    fn a_slower_replica_learns_its_speed_and_loses_traffic() {
        let eps = endpoints(2);
        for k in 0..40 {
            let work = 200.0 + 50.0 * f64::from(k % 7);
            eps[0].latency().observe(work, 0.01 + work * 4e-5, NOW);
            eps[1].latency().observe(work, 0.01 + work * 1e-4, NOW);
        }
        let req = RequestFacts {
            prompt_tokens: 1000,
            ..Default::default()
        };
        let p = predicted(&eps, &req, &[0, 0]);
        assert!(
            (p[0] - 0.05).abs() < 0.005 && (p[1] - 0.11).abs() < 0.02,
            "{p:?}"
        );
        // Even with 1,000 tokens queued, the fast one is predicted first.
        eps[0].latency().add_prefill(1000);
        let p = predicted(&eps, &req, &[0, 0]);
        assert!(p[0] < p[1], "{p:?}");
    }

    #[test]
    fn an_adapter_request_prices_loading_and_full_slots() {
        let eps = endpoints(3);
        let lora = |running: &[&str]| LoraState {
            running: running.iter().map(|s| s.to_string()).collect(),
            waiting: vec![],
            max_loras: 2,
        };
        for (e, l) in eps
            .iter()
            .zip([lora(&["x"]), lora(&["a"]), lora(&["a", "b"])])
        {
            e.set_metrics(
                EndpointMetrics {
                    lora: Some(l),
                    ..Default::default()
                },
                NOW,
            );
        }
        let req = RequestFacts {
            target_model: "x".into(),
            prompt_tokens: 300,
            ..Default::default()
        };
        let p = predicted(&eps, &req, &[0, 0, 0]);
        assert!(p[0] < p[1] && p[1] < p[2], "{p:?}");
        // A base-model request (no endpoint runs it as an adapter) pays no LoRA cost.
        let base = RequestFacts {
            target_model: "base".into(),
            prompt_tokens: 300,
            ..Default::default()
        };
        let p = predicted(&eps, &base, &[0, 0, 0]);
        assert!(p.iter().all(|&x| x == p[0]), "{p:?}");
    }

    #[test]
    fn fit_recovers_a_line_from_exact_samples() {
        let mut f = TtftFit::default();
        for w in [100.0, 400.0, 1600.0, 50.0, 3000.0, 800.0] {
            f.observe(w, 0.01 + w * 2e-5);
        }
        let l = f.line().unwrap();
        assert!((l.intercept - 0.01).abs() < 1e-9, "{l:?}");
        assert!((l.slope - 2e-5).abs() < 1e-12, "{l:?}");
    }

    #[test]
    fn fit_without_spread_goes_through_the_origin_and_never_negative() {
        let mut f = TtftFit::default();
        assert_eq!(f.line(), None);
        f.observe(500.0, 0.5);
        f.observe(500.0, 0.5);
        let l = f.line().unwrap();
        assert!(
            (l.slope - 1e-3).abs() < 1e-12 && l.intercept.abs() < 1e-9,
            "{l:?}"
        );
        // Samples that would give a negative slope are clamped to the floor.
        let mut g = TtftFit::default();
        g.observe(100.0, 1.0);
        g.observe(1000.0, 0.1);
        let l = g.line().unwrap();
        assert_eq!(l.slope, SLOPE_RANGE.0);
        assert!(l.intercept > 0.0);
        // Garbage is ignored.
        g.observe(f64::NAN, 1.0);
        g.observe(1.0, -1.0);
        assert!((g.weight() - (1.0 + DECAY)).abs() < 1e-12);
    }

    #[test]
    fn old_samples_fade_as_new_ones_arrive() {
        let mut f = TtftFit::default();
        for w in [100.0, 1000.0, 300.0, 2000.0] {
            f.observe(w, w * 1e-4);
        }
        for _ in 0..200 {
            for w in [100.0, 1000.0, 300.0, 2000.0] {
                f.observe(w, w * 1e-5);
            }
        }
        let l = f.line().unwrap();
        assert!((l.slope - 1e-5).abs() < 1e-7, "{l:?}");
    }

    #[test]
    fn endpoint_publishes_its_line_and_its_age() {
        let e = EndpointLatency::default();
        assert_eq!(e.view(Duration::from_secs(1)).line, None);
        e.add_prefill(300);
        e.add_prefill(200);
        e.sub_prefill(300);
        e.observe(100.0, 0.1, Duration::from_secs(1));
        let v = e.view(Duration::from_secs(3));
        assert_eq!((v.prefill_requests, v.prefill_tokens), (1, 200));
        let (l, w, age) = v.line.unwrap();
        assert_eq!((w, age), (1.0, Duration::from_secs(2)));
        assert!((l.at(100.0) - 0.1).abs() < 1e-9);
        // Counters never wrap.
        e.sub_prefill(10_000);
        e.sub_prefill(1);
        assert_eq!(e.view(Duration::ZERO).prefill_tokens, 0);
    }
}
