//! Endpoints: what a model-server replica is (its address, engine and labels), what its
//! last scrape said, and what the picker itself has sent it that has not yet finished.
//!
//! Nothing here does I/O. Scrapers write [`EndpointMetrics`] in with the time they were
//! taken; the scheduler reads them, together with the in-flight counters, to score.

use crate::latency::EndpointLatency;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

/// The model-server software behind an endpoint; decides which metric names are scraped.
/// One type for files, flags and Kubernetes labels, defined with the file formats.
pub use infergate_api::pool_file::{Engine, UnknownEngine};

/// The static description of one endpoint, as a source (file, flags, Kubernetes) gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// A stable human name (pod name and rank in Kubernetes, `ip:port` otherwise).
    pub name: String,
    pub addr: SocketAddr,
    pub engine: Engine,
    pub labels: BTreeMap<String, String>,
}

impl EndpointSpec {
    pub fn new(addr: SocketAddr, engine: Engine) -> Self {
        EndpointSpec {
            name: addr.to_string(),
            addr,
            engine,
            labels: BTreeMap::new(),
        }
    }
}

/// LoRA adapter state as vLLM reports it in `vllm:lora_requests_info`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraState {
    pub running: Vec<String>,
    pub waiting: Vec<String>,
    pub max_loras: u32,
}

/// One scrape's worth of a model server's state, engine-neutral.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointMetrics {
    /// Requests waiting for a batch slot.
    pub waiting: u32,
    /// Requests in the running batch.
    pub running: u32,
    /// Fraction of KV-cache blocks in use, 0..=1; `None` when the engine does not say
    /// (llama.cpp), which is unknown, not empty.
    pub kv_cache_usage: Option<f64>,
    /// `None` when the engine has no LoRA metric.
    pub lora: Option<LoraState>,
    /// Tokens per KV block and number of blocks, from `cache_config_info` where given.
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u64>,
}

/// The latest scrape of an endpoint and when it was taken, on the caller's clock.
#[derive(Debug, Clone, Default)]
pub struct MetricsSample {
    pub metrics: EndpointMetrics,
    /// When the scrape that produced `metrics` completed; `None` before the first success.
    pub updated_at: Option<Duration>,
}

/// A live endpoint: its spec, its last metrics, and the picker's own in-flight counters.
///
/// Shared between the scrape loop (writes metrics), the scheduler (reads) and the request
/// path (increments and decrements in-flight counters), so everything mutable is atomic or
/// behind a short lock.
#[derive(Debug)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    /// Small dense number, unique among the endpoints the datastore has ever held; used as
    /// the key in the prefix index so it never stores addresses.
    pub id: u32,
    sample: ArcSwap<MetricsSample>,
    /// The figures every pick reads, copied out of `sample` so scoring reads one small
    /// struct per endpoint instead of following a pointer to the sample.
    hot: HotMetrics,
    inflight_requests: AtomicU64,
    inflight_tokens: AtomicU64,
    /// Prefill queued here by this picker and the endpoint's observed speed.
    latency: EndpointLatency,
    outlier: Outlier,
}

/// Responses that ended broken in a row before an endpoint is avoided (as Envoy's outlier
/// detection counts five consecutive 5xx).
pub const BROKEN_RESPONSES_TO_AVOID: u32 = 5;
/// How long an endpoint with that many broken responses in a row is avoided.
pub const AVOID_FOR: Duration = Duration::from_secs(10);

/// Consecutive broken responses and, once there were enough, until when to avoid the
/// endpoint. Nanoseconds of the caller's clock, plus one; 0 for not avoided.
#[derive(Debug, Default)]
struct Outlier {
    broken_in_a_row: AtomicU32,
    avoid_until_nanos: AtomicU64,
}

/// Lock-free copies of the scraped numbers the scheduler reads on every request. Fields
/// are written one by one, so a reader may see two consecutive scrapes mixed, which is
/// harmless for scoring.
#[derive(Debug, Default)]
struct HotMetrics {
    waiting: AtomicU32,
    running: AtomicU32,
    /// `f64` bits of the KV-cache use; `u64::MAX` (a NaN) for none.
    kv_bits: AtomicU64,
    /// Nanoseconds of `updated_at` plus one; 0 before the first scrape.
    updated_nanos: AtomicU64,
    has_lora: AtomicBool,
}

/// The hot figures of one endpoint, as [`Endpoint::hot`] returns them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HotSample {
    pub waiting: u32,
    pub running: u32,
    pub kv_cache_usage: Option<f64>,
    pub updated_at: Option<Duration>,
    /// Whether the full sample carries LoRA state (see [`Endpoint::with_sample`]).
    pub has_lora: bool,
}

impl Endpoint {
    pub fn new(id: u32, spec: EndpointSpec) -> Self {
        Endpoint {
            spec,
            id,
            sample: ArcSwap::from_pointee(MetricsSample::default()),
            hot: HotMetrics {
                kv_bits: AtomicU64::new(u64::MAX),
                ..Default::default()
            },
            inflight_requests: AtomicU64::new(0),
            inflight_tokens: AtomicU64::new(0),
            latency: EndpointLatency::default(),
            outlier: Outlier::default(),
        }
    }

    /// A response served here has ended at `now`: `complete` when it reached its end with a
    /// status below 500, not when it was cut off, reset or answered 5xx. Returns how long the
    /// endpoint will be avoided when this response made it [`BROKEN_RESPONSES_TO_AVOID`] in
    /// a row.
    pub fn response_ended(&self, complete: bool, now: Duration) -> Option<Duration> {
        let o = &self.outlier;
        if complete {
            o.broken_in_a_row.store(0, Ordering::Relaxed);
            return None;
        }
        let n = o.broken_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n < BROKEN_RESPONSES_TO_AVOID {
            return None;
        }
        o.broken_in_a_row.store(0, Ordering::Relaxed);
        let until = now.saturating_add(AVOID_FOR).as_nanos() as u64 + 1;
        o.avoid_until_nanos.store(until, Ordering::Relaxed);
        Some(AVOID_FOR)
    }

    /// Whether recent responses from here ended broken often enough that the scheduler
    /// should send requests elsewhere while any other candidate remains.
    pub fn avoided(&self, now: Duration) -> bool {
        let until = self.outlier.avoid_until_nanos.load(Ordering::Relaxed);
        until > 0 && (now.as_nanos() as u64) < until - 1
    }

    /// Record a successful scrape taken at `now`.
    pub fn set_metrics(&self, metrics: EndpointMetrics, now: Duration) {
        let h = &self.hot;
        h.waiting.store(metrics.waiting, Ordering::Relaxed);
        h.running.store(metrics.running, Ordering::Relaxed);
        h.kv_bits.store(
            metrics.kv_cache_usage.map_or(u64::MAX, f64::to_bits),
            Ordering::Relaxed,
        );
        h.has_lora.store(metrics.lora.is_some(), Ordering::Relaxed);
        self.sample.store(Arc::new(MetricsSample {
            metrics,
            updated_at: Some(now),
        }));
        // Last, with release: a reader that sees the new time sees the figures before it.
        let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX - 1);
        h.updated_nanos.store(nanos + 1, Ordering::Release);
    }

    /// The figures scoring needs, without touching the full sample.
    pub fn hot(&self) -> HotSample {
        let h = &self.hot;
        let nanos = h.updated_nanos.load(Ordering::Acquire);
        let kv = f64::from_bits(h.kv_bits.load(Ordering::Relaxed));
        HotSample {
            waiting: h.waiting.load(Ordering::Relaxed),
            running: h.running.load(Ordering::Relaxed),
            kv_cache_usage: (!kv.is_nan()).then_some(kv),
            updated_at: (nanos > 0).then(|| Duration::from_nanos(nanos - 1)),
            has_lora: h.has_lora.load(Ordering::Relaxed),
        }
    }

    /// The latest scrape; a reference-count increment, no copy.
    pub fn sample(&self) -> Arc<MetricsSample> {
        self.sample.load_full()
    }

    /// Run `f` on the latest scrape without taking a reference count (the hot path).
    pub fn with_sample<R>(&self, f: impl FnOnce(&MetricsSample) -> R) -> R {
        f(&self.sample.load())
    }

    /// Age of the latest scrape at `now`; `None` if never scraped.
    pub fn metrics_age(&self, now: Duration) -> Option<Duration> {
        self.sample.load().updated_at.map(|t| now.saturating_sub(t))
    }

    /// Requests dispatched here by this picker and not yet seen complete.
    pub fn inflight_requests(&self) -> u64 {
        self.inflight_requests.load(Ordering::Relaxed)
    }

    /// Prompt tokens of those requests.
    pub fn inflight_tokens(&self) -> u64 {
        self.inflight_tokens.load(Ordering::Relaxed)
    }

    /// Queued prefill and the fitted TTFT line (see [`crate::latency`]).
    pub fn latency(&self) -> &EndpointLatency {
        &self.latency
    }

    pub(crate) fn add_inflight(&self, tokens: u64) {
        self.inflight_requests.fetch_add(1, Ordering::Relaxed);
        self.inflight_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    pub(crate) fn sub_inflight(&self, tokens: u64) {
        // Saturating: a counter must never wrap even if a source misreports.
        let _ = self
            .inflight_requests
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
        let _ = self
            .inflight_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(tokens))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_figures_follow_the_latest_scrape() {
        let e = Endpoint::new(
            1,
            EndpointSpec::new(([127, 0, 0, 1], 8000).into(), Engine::Vllm),
        );
        let h = e.hot();
        assert_eq!(
            (h.updated_at, h.kv_cache_usage, h.has_lora),
            (None, None, false)
        );
        e.set_metrics(
            EndpointMetrics {
                waiting: 3,
                running: 7,
                kv_cache_usage: Some(0.25),
                lora: Some(LoraState::default()),
                ..Default::default()
            },
            Duration::from_millis(1500),
        );
        let h = e.hot();
        assert_eq!(
            h,
            HotSample {
                waiting: 3,
                running: 7,
                kv_cache_usage: Some(0.25),
                updated_at: Some(Duration::from_millis(1500)),
                has_lora: true
            }
        );
        // An engine without a KV metric reads as unknown, not as zero.
        e.set_metrics(EndpointMetrics::default(), Duration::ZERO);
        assert_eq!(e.hot().kv_cache_usage, None);
        assert_eq!(e.hot().updated_at, Some(Duration::ZERO));
    }
}
