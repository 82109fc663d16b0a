//! Latency histograms and the per-priority summary of a run.
//!
//! Percentiles come from HDR histograms at microsecond resolution with 3 significant
//! figures: a reported percentile is within 0.1% (or 1 us) of the exact nearest-rank value.
//! Latencies are taken over successful requests only (2xx, not shed, no error):
//! - TTFT = `first_token - sent`;
//! - TPOT = `(done - first_token) / (output_tokens - 1)`, for requests with at least two
//!   output tokens;
//! - end-to-end = `done - sent`.
//!
//! Throughput is successful requests (and their output tokens) per second of `duration`.
//! - ITL = each gap in [`Outcome::itl`] (the runner records them for streamed requests).
//!
//! Every field is finite: empty sets give 0, and `itl_p90` is `None` when no gap was recorded.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;

/// What one request did, as the runner records it (times in seconds from the run's start).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub index: u64,
    pub priority: i32,
    pub sent: f64,
    pub first_token: Option<f64>,
    pub done: f64,
    pub output_tokens: u32,
    pub status: u16,
    /// true when the router refused it as sheddable (429)
    pub shed: bool,
    pub error: Option<String>,
    /// Gaps between consecutive streamed chunks after the first, in seconds (empty when the
    /// runner does not see individual tokens, as with unstreamed requests).
    #[serde(skip)]
    pub itl: Vec<f32>,
}

impl Outcome {
    /// A success: 2xx, not shed, no error.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status) && !self.shed && self.error.is_none()
    }
}

/// Latency summary of a set of outcomes (one priority class, or all).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub shed: u64,
    pub ttft_p50: f64,
    pub ttft_p90: f64,
    pub ttft_p99: f64,
    pub tpot_p50: f64,
    pub tpot_p90: f64,
    pub itl_p90: Option<f64>,
    pub e2e_p50: f64,
    pub e2e_p90: f64,
    pub e2e_p99: f64,
    pub req_per_s: f64,
    pub output_tok_per_s: f64,
    pub duration: f64,
}

/// A latency histogram in seconds, stored in microseconds with 3 significant figures.
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        // Auto-resizing, so any latency fits.
        LatencyHistogram(Histogram::new(3).expect("3 significant figures is valid"))
    }

    /// Records `seconds` (negative or non-finite values are ignored as clock glitches).
    pub fn record(&mut self, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            let us = (seconds * 1e6).round().min(u64::MAX as f64 / 4.0) as u64;
            // Auto-resize grows the range; saturate only if that ever fails.
            if self.0.record(us).is_err() {
                self.0.saturating_record(us);
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q`-quantile (0..=1) in seconds; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.value_at_quantile(q) as f64 / 1e6
        }
    }
}

/// Summarises `outcomes` over a run of `duration` seconds.
pub fn summarize(outcomes: &[Outcome], duration: f64) -> Summary {
    let (mut ttft, mut tpot, mut e2e, mut itl) = (
        LatencyHistogram::new(),
        LatencyHistogram::new(),
        LatencyHistogram::new(),
        LatencyHistogram::new(),
    );
    let (mut ok, mut errors, mut shed, mut tokens) = (0u64, 0u64, 0u64, 0u64);
    for o in outcomes {
        if o.shed {
            shed += 1;
            continue;
        }
        if !o.ok() {
            errors += 1;
            continue;
        }
        ok += 1;
        tokens += u64::from(o.output_tokens);
        e2e.record(o.done - o.sent);
        for &gap in &o.itl {
            itl.record(f64::from(gap));
        }
        if let Some(ft) = o.first_token {
            ttft.record(ft - o.sent);
            if o.output_tokens >= 2 {
                tpot.record((o.done - ft) / f64::from(o.output_tokens - 1));
            }
        }
    }
    let rate = |n: u64| {
        if duration > 0.0 && duration.is_finite() {
            n as f64 / duration
        } else {
            0.0
        }
    };
    Summary {
        requests: outcomes.len() as u64,
        ok,
        errors,
        shed,
        ttft_p50: ttft.quantile(0.5),
        ttft_p90: ttft.quantile(0.9),
        ttft_p99: ttft.quantile(0.99),
        tpot_p50: tpot.quantile(0.5),
        tpot_p90: tpot.quantile(0.9),
        itl_p90: (!itl.is_empty()).then(|| itl.quantile(0.9)),
        e2e_p50: e2e.quantile(0.5),
        e2e_p90: e2e.quantile(0.9),
        e2e_p99: e2e.quantile(0.99),
        req_per_s: rate(ok),
        output_tok_per_s: rate(tokens),
        duration: if duration.is_finite() {
            duration.max(0.0)
        } else {
            0.0
        },
    }
}

/// One [`Summary`] per priority class present in `outcomes`.
pub fn by_priority(outcomes: &[Outcome], duration: f64) -> BTreeMap<i32, Summary> {
    let mut classes: BTreeMap<i32, Vec<Outcome>> = BTreeMap::new();
    for o in outcomes {
        classes.entry(o.priority).or_default().push(o.clone());
    }
    classes
        .into_iter()
        .map(|(p, os)| (p, summarize(&os, duration)))
        .collect()
}
