//! The picker's own Prometheus metrics (DESIGN.md 4.6), shared by every front end.
//!
//! Names, labels and meanings follow the GIE reference picker (`inference_objective_*`,
//! `inference_pool_*`, `inference_extension_*`) so its Grafana dashboards work unchanged.
//! Recording is lock-free on the hot path except for first use of a label set.

use std::time::Duration;

use infergate_core::director::PrefixStats;
use infergate_core::Datastore;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model_name: String,
    pub target_model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model_name: String,
    pub target_model_name: String,
    pub priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub model_name: String,
    pub target_model_name: String,
    pub error_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunningLabels {
    pub model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub extension_point: &'static str,
    pub plugin_type: &'static str,
    pub plugin_name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub priority: String,
    /// `dispatched`, `rejected` (not queued), `displaced` (by higher priority), `expired`
    /// (waited its whole time limit) or `cancelled` (the client went away).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub name: String,
    pub model_server_pod: String,
}

/// Builds each labelled histogram with the family's buckets.
#[derive(Clone, Debug)]
pub struct Buckets(std::sync::Arc<[f64]>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

pub type Hist = Family<ModelLabels, Histogram, Buckets>;

fn hist(buckets: impl Iterator<Item = f64>) -> Hist {
    Family::new_with_constructor(Buckets(buckets.collect()))
}

/// Every metric the picker exports. Cheap to share behind an `Arc`.
pub struct Metrics {
    pub registry: Registry,
    pub request_total: Family<RequestLabels, Counter>,
    pub request_error_total: Family<ErrorLabels, Counter>,
    pub request_duration_seconds: Hist,
    pub request_sizes: Hist,
    pub response_sizes: Hist,
    pub input_tokens: Hist,
    pub output_tokens: Hist,
    pub prompt_cached_tokens: Hist,
    pub normalized_time_per_output_token_seconds: Hist,
    pub request_ttft_seconds: Hist,
    pub running_requests: Family<RunningLabels, Gauge>,
    pub pool_average_kv_cache_utilization:
        Family<PoolLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub pool_average_queue_size: Family<PoolLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub pool_ready_pods: Family<PoolLabels, Gauge>,
    pub pool_per_pod_queue_size: Family<PodLabels, Gauge>,
    pub scheduler_e2e_duration_seconds: Histogram,
    pub plugin_duration_seconds: Family<PluginLabels, Histogram, Buckets>,
    pub prefix_indexer_size: Gauge,
    pub prefix_indexer_max_entries: Gauge,
    pub prefix_indexer_hit_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub flow_control_request_queue_duration_seconds: Family<FlowLabels, Histogram, Buckets>,
    pub flow_control_queue_size: Gauge,
    pub pool_name: String,
    /// Model names already used as label values (see [`Metrics::model_labels`]).
    model_names: parking_lot::RwLock<std::collections::HashSet<String>>,
}

/// Distinct model names (requested or target) kept as label values; later ones are
/// counted under [`OTHER_MODEL`]. Clients choose model names, and every name makes a dozen
/// series (histograms with their buckets), so without a bound a client sending random
/// names could grow the picker's memory and every scrape without limit.
pub const MAX_MODEL_LABELS: usize = 500;
/// The label value of model names past [`MAX_MODEL_LABELS`].
pub const OTHER_MODEL: &str = "other";

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Record how long a request waited in the flow-control queue and how that ended.
    pub fn flow_wait(&self, priority: i32, outcome: &'static str, waited: Duration) {
        self.flow_control_request_queue_duration_seconds
            .get_or_create(&FlowLabels {
                priority: priority.to_string(),
                outcome,
            })
            .observe(waited.as_secs_f64());
    }

    /// The label values for a request for `model`, served as `target`: the names
    /// themselves while fewer than [`MAX_MODEL_LABELS`] distinct names have been seen,
    /// [`OTHER_MODEL`] for new names after that.
    pub fn model_labels(&self, model: &str, target: &str) -> ModelLabels {
        ModelLabels {
            model_name: self.bounded_model(model),
            target_model_name: self.bounded_model(target),
        }
    }

    fn bounded_model(&self, name: &str) -> String {
        if name.is_empty() || self.model_names.read().contains(name) {
            return name.to_owned();
        }
        let mut names = self.model_names.write();
        if names.contains(name) {
            return name.to_owned();
        }
        if names.len() >= MAX_MODEL_LABELS {
            return OTHER_MODEL.to_owned();
        }
        if names.len() + 1 == MAX_MODEL_LABELS {
            tracing::warn!(
                "{MAX_MODEL_LABELS} distinct model names are now labelled in the metrics; \
                 requests for further names are counted as model_name=\"{OTHER_MODEL}\""
            );
        }
        names.insert(name.to_owned());
        name.to_owned()
    }

    /// Build and register every metric; `pool_name` labels the pool gauges.
    pub fn new(pool_name: &str) -> Self {
        let mut r = Registry::default();
        let latency = || exponential_buckets(0.005, 2.0, 14); // 5 ms .. ~41 s
        let sizes = || exponential_buckets(64.0, 4.0, 12); // 64 B .. ~268 MB
        let tokens = || exponential_buckets(1.0, 2.0, 20); // 1 .. ~524k tokens
        let m = Metrics {
            request_total: Family::default(),
            request_error_total: Family::default(),
            request_duration_seconds: hist(latency()),
            request_sizes: hist(sizes()),
            response_sizes: hist(sizes()),
            input_tokens: hist(tokens()),
            output_tokens: hist(tokens()),
            prompt_cached_tokens: hist(tokens()),
            normalized_time_per_output_token_seconds: hist(exponential_buckets(0.001, 2.0, 14)),
            request_ttft_seconds: hist(latency()),
            running_requests: Family::default(),
            pool_average_kv_cache_utilization: Family::default(),
            pool_average_queue_size: Family::default(),
            pool_ready_pods: Family::default(),
            pool_per_pod_queue_size: Family::default(),
            scheduler_e2e_duration_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 20)),
            plugin_duration_seconds: Family::new_with_constructor(Buckets(
                exponential_buckets(1e-7, 2.0, 20).collect(),
            )),
            prefix_indexer_size: Gauge::default(),
            prefix_indexer_max_entries: Gauge::default(),
            prefix_indexer_hit_ratio: Gauge::default(),
            flow_control_request_queue_duration_seconds: Family::new_with_constructor(Buckets(
                exponential_buckets(0.001, 2.0, 16).collect(), // 1 ms .. ~33 s
            )),
            flow_control_queue_size: Gauge::default(),
            pool_name: pool_name.to_string(),
            registry: Registry::default(),
            model_names: Default::default(),
        };
        // prometheus-client appends `_total` to counters itself.
        r.register(
            "inference_objective_request",
            "Requests by model and priority",
            m.request_total.clone(),
        );
        r.register(
            "inference_objective_request_error",
            "Requests that failed, by error code",
            m.request_error_total.clone(),
        );
        r.register(
            "inference_objective_request_duration_seconds",
            "End-to-end request latency",
            m.request_duration_seconds.clone(),
        );
        r.register(
            "inference_objective_request_sizes",
            "Request body sizes in bytes",
            m.request_sizes.clone(),
        );
        r.register(
            "inference_objective_response_sizes",
            "Response body sizes in bytes",
            m.response_sizes.clone(),
        );
        r.register(
            "inference_objective_input_tokens",
            "Prompt tokens per request, from usage",
            m.input_tokens.clone(),
        );
        r.register(
            "inference_objective_output_tokens",
            "Completion tokens per request, from usage",
            m.output_tokens.clone(),
        );
        r.register(
            "inference_objective_prompt_cached_tokens",
            "Prompt tokens served from the prefix cache, from usage",
            m.prompt_cached_tokens.clone(),
        );
        r.register(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Request latency divided by output tokens",
            m.normalized_time_per_output_token_seconds.clone(),
        );
        r.register(
            "inference_objective_request_ttft_seconds",
            "Time to first response byte",
            m.request_ttft_seconds.clone(),
        );
        r.register(
            "inference_objective_running_requests",
            "Requests in flight through the picker",
            m.running_requests.clone(),
        );
        r.register(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache use over ready endpoints",
            m.pool_average_kv_cache_utilization.clone(),
        );
        r.register(
            "inference_pool_average_queue_size",
            "Mean waiting requests over ready endpoints",
            m.pool_average_queue_size.clone(),
        );
        r.register(
            "inference_pool_ready_pods",
            "Endpoints in the pool",
            m.pool_ready_pods.clone(),
        );
        r.register(
            "inference_pool_per_pod_queue_size",
            "Waiting requests per endpoint",
            m.pool_per_pod_queue_size.clone(),
        );
        r.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time to schedule one request",
            m.scheduler_e2e_duration_seconds.clone(),
        );
        r.register(
            "inference_extension_plugin_duration_seconds",
            "Time spent in one scheduling plugin",
            m.plugin_duration_seconds.clone(),
        );
        r.register(
            "inference_extension_prefix_indexer_size",
            "Entries in the prefix index",
            m.prefix_indexer_size.clone(),
        );
        r.register(
            "inference_extension_prefix_indexer_max_entries",
            "Configured bound on prefix index entries (maxIndexEntries)",
            m.prefix_indexer_max_entries.clone(),
        );
        r.register(
            "inference_extension_prefix_indexer_hit_ratio",
            "Share of prompt blocks found in the prefix index",
            m.prefix_indexer_hit_ratio.clone(),
        );
        r.register(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Time requests spent in the flow-control queue, by priority and outcome",
            m.flow_control_request_queue_duration_seconds.clone(),
        );
        r.register(
            "inference_extension_flow_control_queue_size",
            "Requests waiting in the flow-control queue",
            m.flow_control_queue_size.clone(),
        );
        r.register(
            // prometheus-client adds the `_info` suffix itself.
            "inference_extension",
            "Build information",
            Info::new(vec![
                ("commit", env!("CARGO_PKG_VERSION")),
                ("build_ref", "infergate"),
            ]),
        );
        Metrics { registry: r, ..m }
    }

    /// Refresh the pool gauges from the datastore at `now`, skipping stale endpoints.
    pub fn refresh_pool(
        &self,
        ds: &Datastore,
        now: Duration,
        staleness: Duration,
        prefix: PrefixStats,
    ) {
        let snap = ds.snapshot();
        let pool = PoolLabels {
            name: self.pool_name.clone(),
        };
        self.pool_ready_pods
            .get_or_create(&pool)
            .set(snap.endpoints.len() as i64);
        let (mut kv_sum, mut kv_n, mut q_sum, mut q_n) = (0.0, 0u32, 0.0, 0u32);
        self.pool_per_pod_queue_size.clear();
        for e in &snap.endpoints {
            let s = e.sample();
            let fresh = s
                .updated_at
                .is_some_and(|t| now.saturating_sub(t) <= staleness);
            if !fresh {
                continue;
            }
            if let Some(kv) = s.metrics.kv_cache_usage {
                kv_sum += kv;
                kv_n += 1;
            }
            q_sum += f64::from(s.metrics.waiting);
            q_n += 1;
            self.pool_per_pod_queue_size
                .get_or_create(&PodLabels {
                    name: self.pool_name.clone(),
                    model_server_pod: e.spec.name.clone(),
                })
                .set(i64::from(s.metrics.waiting));
        }
        self.pool_average_kv_cache_utilization
            .get_or_create(&pool)
            .set(if kv_n > 0 {
                kv_sum / f64::from(kv_n)
            } else {
                0.0
            });
        self.pool_average_queue_size
            .get_or_create(&pool)
            .set(if q_n > 0 { q_sum / f64::from(q_n) } else { 0.0 });
        self.prefix_indexer_size.set(prefix.entries as i64);
        self.prefix_indexer_max_entries
            .set(prefix.max_entries as i64);
        self.prefix_indexer_hit_ratio.set(prefix.hit_ratio);
    }

    /// Record one plugin call (the director's plugin observer).
    pub fn observe_plugin(
        &self,
        extension_point: &'static str,
        plugin_type: &'static str,
        took: Duration,
    ) {
        self.plugin_duration_seconds
            .get_or_create(&PluginLabels {
                extension_point,
                plugin_type,
                plugin_name: plugin_type,
            })
            .observe(took.as_secs_f64());
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        self.encode_with(None)
    }

    /// The registry followed by `extra`'s metrics (a front end's own), one page, one `# EOF`.
    pub fn encode_with(&self, extra: Option<&Registry>) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(r) = extra {
            let _ = encode_registry(&mut out, r);
        }
        let _ = encode_eof(&mut out);
        out
    }
}
