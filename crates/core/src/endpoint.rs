//! Endpoints: what a model-server replica is (its address, engine and labels), what its
//! last scrape said, and what the picker itself has sent it that has not yet finished.
//!
//! Nothing here does I/O. Scrapers write [`EndpointMetrics`] in with the time they were
//! taken; the scheduler reads them, together with the in-flight counters, to score.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
    inflight_requests: AtomicU64,
    inflight_tokens: AtomicU64,
}

impl Endpoint {
    pub fn new(id: u32, spec: EndpointSpec) -> Self {
        Endpoint {
            spec,
            id,
            sample: ArcSwap::from_pointee(MetricsSample::default()),
            inflight_requests: AtomicU64::new(0),
            inflight_tokens: AtomicU64::new(0),
        }
    }

    /// Record a successful scrape taken at `now`.
    pub fn set_metrics(&self, metrics: EndpointMetrics, now: Duration) {
        self.sample.store(Arc::new(MetricsSample {
            metrics,
            updated_at: Some(now),
        }));
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
