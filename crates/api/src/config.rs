//! The EndpointPickerConfig: which scheduler plugins exist, with typed parameters, and how
//! scheduling profiles combine them.
//!
//! Loading is strict: an unknown key anywhere, an unknown plugin type or a reference to an
//! undefined plugin is an error naming the file, the line and the field path. (The reference
//! picker ignores misplaced keys silently.) After checking, defaults are filled in so that
//! consumers see a complete configuration:
//! - no `schedulingProfiles` and no filter, scorer or picker plugins: the reference's default,
//!   profile `default` with `queue-scorer` (weight 2), `kv-cache-utilization-scorer` (2),
//!   `prefix-cache-scorer` (3) and `max-score-picker`;
//! - no `schedulingProfiles` but such plugins: profile `default` lists them all, in order;
//! - a profile without a picker gets `max-score-picker` (maxNumOfEndpoints 1);
//! - no profile handler: `single-profile-handler`;
//! - a `prefix-cache-scorer` without an `approx-prefix-cache-producer`: one is added;
//! - no `saturationDetector`: the first `utilization-detector`, added with defaults if absent.
//!
//! Plugins added this way are named after their type and appended to `plugins`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::error::{FieldError, FieldPath, LoadError, Problem};
use crate::resources::Ignored;
use crate::yaml::{check_syntax, deserialize_at, line_of, problem_from_yaml};

/// apiVersion of the EndpointPickerConfig.
pub const CONFIG_API_VERSION: &str = "inference.networking.x-k8s.io/v1alpha1";
/// kind of the EndpointPickerConfig.
pub const CONFIG_KIND: &str = "EndpointPickerConfig";
/// Feature gates the picker knows.
pub const KNOWN_FEATURE_GATES: &[&str] = &["flowControl", "dataLayer", "enableLegacyMetrics"];

/// A loaded, checked and completed EndpointPickerConfig.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointPickerConfig {
    /// Every plugin instance, user-defined first, then those added as defaults.
    pub plugins: Vec<PluginSpec>,
    /// At least one profile; each has exactly one picker.
    pub scheduling_profiles: Vec<SchedulingProfile>,
    /// Name of the plugin (a saturation detector) that judges whether the pool is saturated.
    pub saturation_detector: String,
    /// Enabled feature gates, each one of [`KNOWN_FEATURE_GATES`].
    pub feature_gates: Vec<String>,
    /// Flow-control settings; `Some` exactly when the `flowControl` feature gate is on
    /// (defaults filled in when the gate is on and the section is absent).
    pub flow_control: Option<FlowControlConfig>,
    /// Metric sources and their extractors.
    pub data_layer: Option<DataLayer>,
    /// The request parser (`openai-parser` when absent).
    pub parser: Option<PluginRef>,
}

/// One plugin instance.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    /// Unique name; profiles refer to it. Defaults to the type name.
    pub name: String,
    /// The type and its parameters.
    pub kind: PluginKind,
}

/// A scheduling profile: filters in order, weighted scorers, one picker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SchedulingProfile {
    /// Unique name.
    pub name: String,
    /// The plugins it runs, by name.
    #[serde(default)]
    pub plugins: Vec<ProfilePlugin>,
}

/// A plugin used by a profile.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfilePlugin {
    /// The plugin's name.
    pub plugin_ref: String,
    /// Scorer weight (>= 0); only scorers may carry one.
    #[serde(default)]
    pub weight: Option<f64>,
}

impl ProfilePlugin {
    /// The scorer weight: 1 when unset.
    pub fn weight(&self) -> f64 {
        self.weight.unwrap_or(1.0)
    }
}

/// A reference to a plugin by name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginRef {
    /// The plugin's name.
    pub plugin_ref: String,
}

/// The `dataLayer` section: where metrics come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataLayer {
    /// Metric sources.
    #[serde(default)]
    pub sources: Vec<DataLayerSource>,
}

/// A metric source and the extractors applied to what it returns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataLayerSource {
    /// A data-source plugin.
    pub plugin_ref: String,
    /// Extractor plugins.
    #[serde(default)]
    pub extractors: Vec<PluginRef>,
}

/// What role a plugin plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginCategory {
    /// Removes candidate endpoints.
    Filter,
    /// Scores candidates in [0, 1].
    Scorer,
    /// Chooses among scored candidates.
    Picker,
    /// Chooses which profiles run.
    ProfileHandler,
    /// Judges whether the pool is saturated.
    SaturationDetector,
    /// Collects or extracts endpoint metrics.
    DataSource,
    /// Anything else (for example a data producer).
    Other,
}

impl PluginCategory {
    fn describe(self) -> &'static str {
        match self {
            PluginCategory::Filter => "a filter",
            PluginCategory::Scorer => "a scorer",
            PluginCategory::Picker => "a picker",
            PluginCategory::ProfileHandler => "a profile handler",
            PluginCategory::SaturationDetector => "a saturation detector",
            PluginCategory::DataSource => "a data source",
            PluginCategory::Other => "not a scheduling plugin",
        }
    }
}

/// A plugin type with its typed parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginKind {
    /// `queue-scorer`: fewer waiting requests score higher.
    QueueScorer,
    /// `kv-cache-utilization-scorer` (also read as `kv-cache-scorer`): 1 - KV-cache usage.
    KvCacheUtilizationScorer,
    /// `running-requests-size-scorer`: fewer running requests score higher.
    RunningRequestsSizeScorer,
    /// `lora-affinity-scorer`: prefers endpoints with the request's adapter loaded.
    LoraAffinityScorer,
    /// `prefix-cache-scorer`: share of the prompt's prefix blocks an endpoint likely holds.
    PrefixCacheScorer(PrefixCacheParams),
    /// `token-load-scorer`: fewer tokens in flight score higher.
    TokenLoadScorer,
    /// `inflight-load-scorer` (infergate's own): fewer requests dispatched by us score higher.
    InflightLoadScorer,
    /// `predicted-latency-scorer` (infergate's own): lowest predicted time to first token
    /// scores highest.
    PredictedLatencyScorer(PredictedLatencyParams),
    /// `max-score-picker`: highest score, ties at random.
    MaxScorePicker(PickerParams),
    /// `random-picker`: uniformly at random.
    RandomPicker(PickerParams),
    /// `weighted-random-picker`: at random, weighted by score.
    WeightedRandomPicker(PickerParams),
    /// `header-based-testing-filter`: the conformance suite's filter (endpoint named by header).
    HeaderBasedTestingFilter,
    /// `prefix-cache-affinity-filter`: keep endpoints whose prefix match clears a threshold.
    PrefixCacheAffinityFilter(PrefixCacheAffinityParams),
    /// `least-queue-filter`: keep endpoints with the shortest queues.
    LeastQueueFilter,
    /// `least-kv-cache-filter`: keep endpoints with the least KV-cache usage.
    LeastKvCacheFilter,
    /// `lora-affinity-filter`: keep endpoints with the adapter loaded (with a probability).
    LoraAffinityFilter(LoraAffinityParams),
    /// `low-queue-filter`: keep endpoints whose queue is under a threshold.
    LowQueueFilter(LowQueueParams),
    /// `single-profile-handler`: runs the one profile.
    SingleProfileHandler,
    /// `utilization-detector`: saturation from queue depth, KV usage and staleness.
    UtilizationDetector(UtilizationDetectorParams),
    ConcurrencyDetector(ConcurrencyDetectorParams),
    /// `approx-prefix-cache-producer`: maintains the approximate prefix index.
    ApproxPrefixCacheProducer,
    /// `metrics-data-source`: scrapes model-server metrics.
    MetricsDataSource(MetricsDataSourceParams),
    /// `core-metrics-extractor`: turns scraped metrics into queue, KV and LoRA state.
    CoreMetricsExtractor,
}

/// Every plugin type name, in the order used in messages.
pub const KNOWN_PLUGIN_TYPES: &[&str] = &[
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "running-requests-size-scorer",
    "lora-affinity-scorer",
    "prefix-cache-scorer",
    "token-load-scorer",
    "inflight-load-scorer",
    "predicted-latency-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "header-based-testing-filter",
    "prefix-cache-affinity-filter",
    "least-queue-filter",
    "least-kv-cache-filter",
    "lora-affinity-filter",
    "low-queue-filter",
    "single-profile-handler",
    "utilization-detector",
    "concurrency-detector",
    "approx-prefix-cache-producer",
    "metrics-data-source",
    "core-metrics-extractor",
];

impl PluginKind {
    /// The type name as written in the config's `type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            PluginKind::QueueScorer => "queue-scorer",
            PluginKind::KvCacheUtilizationScorer => "kv-cache-utilization-scorer",
            PluginKind::RunningRequestsSizeScorer => "running-requests-size-scorer",
            PluginKind::LoraAffinityScorer => "lora-affinity-scorer",
            PluginKind::PrefixCacheScorer(_) => "prefix-cache-scorer",
            PluginKind::TokenLoadScorer => "token-load-scorer",
            PluginKind::InflightLoadScorer => "inflight-load-scorer",
            PluginKind::PredictedLatencyScorer(_) => "predicted-latency-scorer",
            PluginKind::MaxScorePicker(_) => "max-score-picker",
            PluginKind::RandomPicker(_) => "random-picker",
            PluginKind::WeightedRandomPicker(_) => "weighted-random-picker",
            PluginKind::HeaderBasedTestingFilter => "header-based-testing-filter",
            PluginKind::PrefixCacheAffinityFilter(_) => "prefix-cache-affinity-filter",
            PluginKind::LeastQueueFilter => "least-queue-filter",
            PluginKind::LeastKvCacheFilter => "least-kv-cache-filter",
            PluginKind::LoraAffinityFilter(_) => "lora-affinity-filter",
            PluginKind::LowQueueFilter(_) => "low-queue-filter",
            PluginKind::SingleProfileHandler => "single-profile-handler",
            PluginKind::UtilizationDetector(_) => "utilization-detector",
            PluginKind::ConcurrencyDetector(_) => "concurrency-detector",
            PluginKind::ApproxPrefixCacheProducer => "approx-prefix-cache-producer",
            PluginKind::MetricsDataSource(_) => "metrics-data-source",
            PluginKind::CoreMetricsExtractor => "core-metrics-extractor",
        }
    }

    /// The role the plugin plays.
    pub fn category(&self) -> PluginCategory {
        use PluginCategory::*;
        match self {
            PluginKind::QueueScorer
            | PluginKind::KvCacheUtilizationScorer
            | PluginKind::RunningRequestsSizeScorer
            | PluginKind::LoraAffinityScorer
            | PluginKind::PrefixCacheScorer(_)
            | PluginKind::TokenLoadScorer
            | PluginKind::InflightLoadScorer
            | PluginKind::PredictedLatencyScorer(_) => Scorer,
            PluginKind::MaxScorePicker(_)
            | PluginKind::RandomPicker(_)
            | PluginKind::WeightedRandomPicker(_) => Picker,
            PluginKind::HeaderBasedTestingFilter
            | PluginKind::PrefixCacheAffinityFilter(_)
            | PluginKind::LeastQueueFilter
            | PluginKind::LeastKvCacheFilter
            | PluginKind::LoraAffinityFilter(_)
            | PluginKind::LowQueueFilter(_) => Filter,
            PluginKind::SingleProfileHandler => ProfileHandler,
            PluginKind::UtilizationDetector(_) | PluginKind::ConcurrencyDetector(_) => {
                SaturationDetector
            }
            PluginKind::MetricsDataSource(_) | PluginKind::CoreMetricsExtractor => DataSource,
            PluginKind::ApproxPrefixCacheProducer => Other,
        }
    }

    /// Builds the kind for `type_name`, reading parameters through `params`;
    /// `None` when the type is unknown.
    fn parse(type_name: &str, params: &Params<'_>) -> Option<Result<Self, serde_yaml_ng::Error>> {
        use PluginKind::*;
        let none = |kind: PluginKind| params.get::<NoParameters>().map(|_| kind);
        Some(match type_name {
            "queue-scorer" => none(QueueScorer),
            // `kv-cache-scorer` is the name used by GIE v1.0 sample configs.
            "kv-cache-utilization-scorer" | "kv-cache-scorer" => none(KvCacheUtilizationScorer),
            "running-requests-size-scorer" => none(RunningRequestsSizeScorer),
            "lora-affinity-scorer" => none(LoraAffinityScorer),
            "prefix-cache-scorer" => params.get().map(PrefixCacheScorer),
            "token-load-scorer" => none(TokenLoadScorer),
            "inflight-load-scorer" => none(InflightLoadScorer),
            "predicted-latency-scorer" => params.get().map(PredictedLatencyScorer),
            "max-score-picker" => params.get().map(MaxScorePicker),
            "random-picker" => params.get().map(RandomPicker),
            "weighted-random-picker" => params.get().map(WeightedRandomPicker),
            "header-based-testing-filter" => none(HeaderBasedTestingFilter),
            "prefix-cache-affinity-filter" => params.get().map(PrefixCacheAffinityFilter),
            "least-queue-filter" => none(LeastQueueFilter),
            "least-kv-cache-filter" => none(LeastKvCacheFilter),
            "lora-affinity-filter" => params.get().map(LoraAffinityFilter),
            "low-queue-filter" => params.get().map(LowQueueFilter),
            "single-profile-handler" => none(SingleProfileHandler),
            "utilization-detector" => params.get().map(UtilizationDetector),
            "concurrency-detector" => params.get().map(ConcurrencyDetector),
            "approx-prefix-cache-producer" => none(ApproxPrefixCacheProducer),
            "metrics-data-source" => params.get().map(MetricsDataSource),
            "core-metrics-extractor" => none(CoreMetricsExtractor),
            _ => return None,
        })
    }

    /// Range checks on parameters; `at` is the path of the `parameters` key.
    fn check(&self, at: &FieldPath, errors: &mut Vec<FieldError>) {
        let at_least_one = |errors: &mut Vec<FieldError>, key: &str, value: u32| {
            if value < 1 {
                errors.push(FieldError::new(at.key(key), "must be at least 1"));
            }
        };
        let unit = |errors: &mut Vec<FieldError>, key: &str, value: f64| {
            if !(0.0..=1.0).contains(&value) {
                errors.push(FieldError::new(
                    at.key(key),
                    format!("{value} is out of range 0..=1"),
                ));
            }
        };
        match self {
            PluginKind::PrefixCacheScorer(p) => {
                at_least_one(errors, "blockSizeTokens", p.block_size_tokens);
                if let Some(chars) = p.block_size {
                    at_least_one(errors, "blockSize", chars);
                }
                at_least_one(
                    errors,
                    "maxPrefixBlocksToMatch",
                    p.max_prefix_blocks_to_match,
                );
                at_least_one(errors, "lruCapacityPerServer", p.lru_capacity_per_server);
                at_least_one(errors, "maxIndexEntries", p.max_index_entries);
            }
            PluginKind::MaxScorePicker(p)
            | PluginKind::RandomPicker(p)
            | PluginKind::WeightedRandomPicker(p) => {
                at_least_one(errors, "maxNumOfEndpoints", p.max_num_of_endpoints);
            }
            PluginKind::PrefixCacheAffinityFilter(p) => unit(errors, "threshold", p.threshold),
            PluginKind::PredictedLatencyScorer(p) => {
                if !(p.duplicate_cost.is_finite() && p.duplicate_cost >= 0.0) {
                    errors.push(FieldError::new(
                        at.key("duplicateCost"),
                        format!("{} must be a number >= 0", p.duplicate_cost),
                    ));
                }
                if !(p.prior_tokens_per_second.is_finite() && p.prior_tokens_per_second > 0.0) {
                    errors.push(FieldError::new(
                        at.key("priorTokensPerSecond"),
                        format!("{} must be a number > 0", p.prior_tokens_per_second),
                    ));
                }
            }
            PluginKind::LoraAffinityFilter(p) => unit(errors, "threshold", p.threshold),
            PluginKind::ConcurrencyDetector(p) => {
                at_least_one(errors, "maxConcurrency", p.max_concurrency);
                if p.max_token_concurrency < 1 {
                    errors.push(FieldError::new(
                        at.key("maxTokenConcurrency"),
                        "must be at least 1",
                    ));
                }
                if !(p.headroom.is_finite() && p.headroom >= 0.0) {
                    errors.push(FieldError::new(
                        at.key("headroom"),
                        format!("{} must be a number >= 0", p.headroom),
                    ));
                }
            }
            PluginKind::UtilizationDetector(p) => {
                at_least_one(errors, "queueDepthThreshold", p.queue_depth_threshold);
                if !(p.kv_cache_util_threshold > 0.0 && p.kv_cache_util_threshold <= 1.0) {
                    errors.push(FieldError::new(
                        at.key("kvCacheUtilThreshold"),
                        format!(
                            "{} is out of range (0, 1] (a share of the KV cache)",
                            p.kv_cache_util_threshold
                        ),
                    ));
                }
                if p.metrics_staleness_threshold.is_zero() {
                    errors.push(FieldError::new(
                        at.key("metricsStalenessThreshold"),
                        "must be longer than 0",
                    ));
                }
                if !(p.headroom.is_finite() && p.headroom >= 0.0) {
                    errors.push(FieldError::new(
                        at.key("headroom"),
                        format!("{} must be a number >= 0", p.headroom),
                    ));
                }
            }
            PluginKind::MetricsDataSource(p) if !p.path.starts_with('/') => {
                errors.push(FieldError::new(
                    at.key("path"),
                    format!("{:?} must start with /", p.path),
                ));
            }
            _ => {}
        }
    }
}

/// Parameters of `prefix-cache-scorer`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PrefixCacheParams {
    /// Tokens per hashed block (a block is this many tokens times 4 characters).
    pub block_size_tokens: u32,
    /// Legacy block size in characters (`hashBlockSize` in GIE v1.0); overrides the above.
    #[serde(alias = "hashBlockSize")]
    pub block_size: Option<u32>,
    /// At most this many leading blocks of a prompt are hashed and matched.
    pub max_prefix_blocks_to_match: u32,
    /// Capacity of each endpoint's block LRU.
    pub lru_capacity_per_server: u32,
    /// Take each endpoint's capacity from its model server's cache config
    /// (`num_gpu_blocks`) when known.
    pub auto_tune: bool,
    /// infergate's own bound on entries over all endpoints (about 60 bytes each), so the
    /// index's memory is bounded however many endpoints the pool has.
    pub max_index_entries: u32,
}

impl Default for PrefixCacheParams {
    fn default() -> Self {
        PrefixCacheParams {
            block_size_tokens: 16,
            block_size: None,
            max_prefix_blocks_to_match: 256,
            lru_capacity_per_server: 31_250,
            auto_tune: true,
            max_index_entries: 4_000_000,
        }
    }
}

/// Parameters of the pickers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PickerParams {
    /// How many endpoints to return; more than 1 gives the gateway fallbacks.
    pub max_num_of_endpoints: u32,
}

impl Default for PickerParams {
    fn default() -> Self {
        PickerParams {
            max_num_of_endpoints: 1,
        }
    }
}

/// Parameters of `prefix-cache-affinity-filter`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PrefixCacheAffinityParams {
    /// Share of prefix blocks (0 to 1) an endpoint must hold to be kept.
    pub threshold: f64,
}

impl Default for PrefixCacheAffinityParams {
    fn default() -> Self {
        PrefixCacheAffinityParams { threshold: 0.5 }
    }
}

/// Parameters of `lora-affinity-filter`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LoraAffinityParams {
    /// Probability (0 to 1) of keeping only endpoints with the adapter already loaded.
    pub threshold: f64,
}

impl Default for LoraAffinityParams {
    fn default() -> Self {
        LoraAffinityParams { threshold: 0.999 }
    }
}

/// Parameters of `low-queue-filter`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LowQueueParams {
    /// Endpoints with at most this many waiting requests are kept.
    pub threshold: u32,
}

impl Default for LowQueueParams {
    fn default() -> Self {
        LowQueueParams { threshold: 128 }
    }
}

/// Parameters of `utilization-detector`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct UtilizationDetectorParams {
    /// Waiting requests at which an endpoint counts as saturated.
    pub queue_depth_threshold: u32,
    /// KV-cache usage (0 to 1) at which an endpoint counts as saturated.
    pub kv_cache_util_threshold: f64,
    /// Metrics older than this count as saturated (Go duration in YAML, like `200ms`).
    #[serde(deserialize_with = "deserialize_go_duration")]
    pub metrics_staleness_threshold: Duration,
    /// Extra room above the thresholds before an endpoint is filtered out.
    pub headroom: f64,
}

impl Default for UtilizationDetectorParams {
    fn default() -> Self {
        UtilizationDetectorParams {
            queue_depth_threshold: 5,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}

/// `flowControl`: hold requests at the gateway while the pool is saturated and release them
/// by priority as room appears. Only the global limits are supported; per-band settings
/// (`priorityBands`, `defaultPriorityBand`) are refused as unknown keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FlowControlConfig {
    /// Most requests waiting at once; an arrival beyond it displaces the newest waiting
    /// request of lower priority, or is refused with 429.
    pub max_requests: u64,
    /// Most body bytes waiting at once (same rule as `maxRequests`).
    pub max_bytes: u64,
    /// How long a request may wait before it is answered 503 (Go duration, like `30s`).
    #[serde(
        rename = "defaultRequestTTL",
        deserialize_with = "deserialize_go_duration"
    )]
    pub default_request_ttl: Duration,
}

impl Default for FlowControlConfig {
    fn default() -> Self {
        FlowControlConfig {
            max_requests: 10_000,
            // The reference's default per band.
            max_bytes: 1 << 30,
            default_request_ttl: Duration::from_secs(30),
        }
    }
}

/// Parameters of `concurrency-detector`: an endpoint is saturated when this picker has
/// `maxConcurrency` requests (or `maxTokenConcurrency` prompt tokens) in flight on it. It
/// needs no scrape, and set below the server's own batch limit (vLLM `--max-num-seqs`) it
/// keeps room on every replica for work that is not sheddable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConcurrencyDetectorParams {
    /// Requests in flight on one endpoint at which it counts as saturated.
    pub max_concurrency: u32,
    /// Prompt tokens in flight on one endpoint at which it counts as saturated.
    pub max_token_concurrency: u64,
    /// Extra room above the limits before an endpoint is avoided.
    pub headroom: f64,
}

impl Default for ConcurrencyDetectorParams {
    fn default() -> Self {
        // The reference's defaults.
        ConcurrencyDetectorParams {
            max_concurrency: 100,
            max_token_concurrency: 1_000_000,
            headroom: 0.0,
        }
    }
}

/// Parameters of `predicted-latency-scorer`. Durations are Go durations in YAML (`50ms`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PredictedLatencyParams {
    /// Prefill speed assumed before any endpoint has returned a first token.
    pub prior_tokens_per_second: f64,
    /// Fixed part of the TTFT assumed before any sample.
    #[serde(deserialize_with = "deserialize_go_duration")]
    pub prior_overhead: Duration,
    /// Cost of loading an adapter into a free slot.
    #[serde(deserialize_with = "deserialize_go_duration")]
    pub lora_load_time: Duration,
    /// Cost of an adapter request landing where every slot holds another adapter.
    #[serde(deserialize_with = "deserialize_go_duration")]
    pub lora_wait_time: Duration,
    /// How fast an endpoint's learned speed fades toward the pool's when it stops
    /// returning samples.
    #[serde(deserialize_with = "deserialize_go_duration")]
    pub memory: Duration,
    /// Extra cost, in prompt tokens per token, of recomputing a prefix another endpoint
    /// already holds (0 prices only the request's own prefill).
    pub duplicate_cost: f64,
}

impl Default for PredictedLatencyParams {
    fn default() -> Self {
        PredictedLatencyParams {
            prior_tokens_per_second: 30_000.0,
            prior_overhead: Duration::from_millis(20),
            lora_load_time: Duration::from_millis(50),
            lora_wait_time: Duration::from_secs(2),
            memory: Duration::from_secs(2),
            duplicate_cost: 0.0,
        }
    }
}

/// Parameters of `metrics-data-source`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MetricsDataSourceParams {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// The metrics path.
    pub path: String,
    /// Skip TLS certificate checks (model servers often use self-signed certificates).
    pub insecure_skip_verify: bool,
}

impl Default for MetricsDataSourceParams {
    fn default() -> Self {
        MetricsDataSourceParams {
            scheme: Scheme::Http,
            path: "/metrics".to_string(),
            insecure_skip_verify: true,
        }
    }
}

/// URL scheme of a metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

/// For plugin types without parameters: any key is an unknown field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParameters {}

/// Parses a Go duration string such as `200ms`, `2s`, `1m30s` or `1.5h`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if text.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let bad = || format!("{text:?} is not a duration like 200ms, 2s or 1m30s");
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("{text:?} needs a unit (ns, us, ms, s, m or h)")),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        nanos += number * scale;
    }
    if !nanos.is_finite() || nanos > u64::MAX as f64 {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

fn deserialize_go_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    // Parse inside the visitor, so that an error carries the value's own path and line.
    struct GoDuration;
    impl serde::de::Visitor<'_> for GoDuration {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration like 200ms, 2s or 1m30s")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            parse_go_duration(text).map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Duration, E> {
            self.visit_str(&value.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Duration, E> {
            self.visit_str(&value.to_string())
        }
    }
    deserializer.deserialize_any(GoDuration)
}

/// The document as written, before plugin parameters are typed.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    api_version: String,
    kind: String,
    #[serde(default)]
    feature_gates: Vec<String>,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    scheduling_profiles: Option<Vec<SchedulingProfile>>,
    #[serde(default)]
    saturation_detector: Option<PluginRef>,
    #[serde(default)]
    data_layer: Option<DataLayer>,
    #[serde(default)]
    flow_control: Option<FlowControlConfig>,
    #[serde(default)]
    parser: Option<PluginRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "type")]
    type_name: String,
    // Read again, typed, once the type is known (see `Params`).
    #[serde(default)]
    #[allow(dead_code)]
    parameters: Option<Ignored>,
}

/// Reads `plugins[i].parameters` as the type its plugin needs, straight from the text so that
/// errors keep their line and full path.
struct Params<'a> {
    text: &'a str,
    doc: usize,
    path: FieldPath,
}

impl Params<'_> {
    fn get<P: DeserializeOwned + Default>(&self) -> Result<P, serde_yaml_ng::Error> {
        let params = deserialize_at::<Option<P>>(self.text, self.doc, &self.path)?;
        Ok(params.flatten().unwrap_or_default())
    }
}

/// The profiles infergate ships, by the name `--profile` takes.
pub const BUILTIN_PROFILES: &[&str] = &["infergate", "reference"];

/// infergate's default profile, chosen in the benchmark lab (BENCHMARKS.md): the
/// reference's scorers, the LoRA-affinity scorer, and our predicted-latency scorer.
pub const INFERGATE_PROFILE_YAML: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-scorer
  parameters: {duplicateCost: 3}
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
- type: max-score-picker
schedulingProfiles:
- name: infergate
  plugins:
  - pluginRef: predicted-latency-scorer
    weight: 1
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: lora-affinity-scorer
    weight: 2
  - pluginRef: max-score-picker
";

impl EndpointPickerConfig {
    /// A built-in profile by name (see [`BUILTIN_PROFILES`]): `reference` is the
    /// reference's default, `infergate` ours.
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "reference" => Some(Self::default_config()),
            "infergate" => Some(
                Self::from_yaml_str(INFERGATE_PROFILE_YAML, "<builtin infergate>")
                    .expect("the built-in profile is valid (tested)"),
            ),
            _ => None,
        }
    }

    /// The configuration used when no file is given: the reference's default profile.
    pub fn default_config() -> Self {
        let raw = RawConfig {
            api_version: CONFIG_API_VERSION.to_string(),
            kind: CONFIG_KIND.to_string(),
            feature_gates: Vec::new(),
            plugins: Vec::new(),
            scheduling_profiles: None,
            saturation_detector: None,
            data_layer: None,
            flow_control: None,
            parser: None,
        };
        let mut resolver = Resolver {
            text: "",
            file: "<default>",
            doc: 0,
            problems: Vec::new(),
        };
        // Resolving an empty configuration only adds defaults, which cannot clash.
        resolver.resolve(raw)
    }

    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_yaml_str(&text, &file)
    }

    /// Parses and checks a configuration; `source` names it in messages. A text with no
    /// document (empty, or only comments) gives [`EndpointPickerConfig::default_config`].
    ///
    /// ```
    /// use infergate_api::EndpointPickerConfig;
    ///
    /// let text = "\
    /// apiVersion: inference.networking.x-k8s.io/v1alpha1
    /// kind: EndpointPickerConfig
    /// plugins:
    /// - type: qeue-scorer
    /// ";
    /// let err = EndpointPickerConfig::from_yaml_str(text, "epp.yaml").unwrap_err();
    /// assert!(err.to_string().starts_with(
    ///     "epp.yaml:4: plugins[0].type: \"qeue-scorer\" is unknown (known: queue-scorer, "
    /// ));
    /// ```
    pub fn from_yaml_str(text: &str, source: &str) -> Result<Self, LoadError> {
        let invalid = |problems| LoadError::Invalid { problems };
        if let Err(err) = check_syntax(text) {
            return Err(invalid(vec![problem_from_yaml(&err, source, None)]));
        }
        let mut found: Option<(usize, RawConfig)> = None;
        for (doc, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            if found.is_some() {
                match Option::<serde::de::IgnoredAny>::deserialize(document) {
                    Ok(None) => continue,
                    Ok(Some(_)) => {
                        return Err(invalid(vec![Problem {
                            file: source.to_string(),
                            line: line_of(text, doc, &FieldPath::root()),
                            object: None,
                            path: FieldPath::root(),
                            message: "a second YAML document; the configuration is one document"
                                .to_string(),
                        }]))
                    }
                    Err(err) => return Err(invalid(vec![problem_from_yaml(&err, source, None)])),
                }
            }
            match Option::<RawConfig>::deserialize(document) {
                Ok(Some(raw)) => found = Some((doc, raw)),
                Ok(None) => {}
                Err(err) => {
                    let object = Some(CONFIG_KIND.to_string());
                    return Err(invalid(vec![problem_from_yaml(&err, source, object)]));
                }
            }
        }
        let Some((doc, raw)) = found else {
            return Ok(Self::default_config());
        };
        let mut resolver = Resolver {
            text,
            file: source,
            doc,
            problems: Vec::new(),
        };
        let config = resolver.resolve(raw);
        if resolver.problems.is_empty() {
            Ok(config)
        } else {
            Err(invalid(resolver.problems))
        }
    }

    /// The plugin named `name`.
    pub fn plugin(&self, name: &str) -> Option<&PluginSpec> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// The profile named `name`.
    pub fn profile(&self, name: &str) -> Option<&SchedulingProfile> {
        self.scheduling_profiles.iter().find(|p| p.name == name)
    }
}

/// Checks a raw configuration and fills in defaults, collecting problems as it goes.
struct Resolver<'a> {
    text: &'a str,
    file: &'a str,
    doc: usize,
    problems: Vec<Problem>,
}

impl Resolver<'_> {
    fn problem(&mut self, path: FieldPath, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_string(),
            line: line_of(self.text, self.doc, &path),
            object: Some(CONFIG_KIND.to_string()),
            path,
            message: message.into(),
        });
    }

    fn resolve(&mut self, raw: RawConfig) -> EndpointPickerConfig {
        if raw.api_version != CONFIG_API_VERSION {
            self.problem(
                FieldPath::parse("apiVersion"),
                format!(
                    "{:?} is not supported (expected {CONFIG_API_VERSION})",
                    raw.api_version
                ),
            );
        }
        if raw.kind != CONFIG_KIND {
            self.problem(
                FieldPath::parse("kind"),
                format!("{:?} is not {CONFIG_KIND}", raw.kind),
            );
        }
        for (i, gate) in raw.feature_gates.iter().enumerate() {
            if !KNOWN_FEATURE_GATES.contains(&gate.as_str()) {
                self.problem(
                    FieldPath::parse("featureGates").index(i),
                    format!(
                        "{gate:?} is unknown (known: {})",
                        KNOWN_FEATURE_GATES.join(", ")
                    ),
                );
            }
        }

        let mut plugins = self.plugins(&raw.plugins);
        let profiles = self.profiles(raw.scheduling_profiles, &mut plugins);
        self.profile_handler(&mut plugins, profiles.len());
        if plugins
            .iter()
            .any(|p| matches!(p.kind, PluginKind::PrefixCacheScorer(_)))
            && !plugins
                .iter()
                .any(|p| p.kind == PluginKind::ApproxPrefixCacheProducer)
        {
            self.ensure_plugin(&mut plugins, PluginKind::ApproxPrefixCacheProducer);
        }
        let saturation_detector = self.saturation_detector(raw.saturation_detector, &mut plugins);
        let gate_on = raw.feature_gates.iter().any(|g| g == "flowControl");
        let flow_control = match (gate_on, raw.flow_control) {
            (true, section) => Some(section.unwrap_or_default()),
            (false, Some(_)) => {
                self.problem(
                    FieldPath::parse("flowControl"),
                    "is set but the flowControl feature gate is off, so it would be ignored; \
                     add flowControl to featureGates or remove this section",
                );
                None
            }
            (false, None) => None,
        };
        if let Some(fc) = &flow_control {
            if fc.default_request_ttl.is_zero() {
                self.problem(
                    FieldPath::parse("flowControl.defaultRequestTTL"),
                    "must be more than 0 (a request could never wait)",
                );
            }
        }
        if let Some(layer) = &raw.data_layer {
            self.data_layer(layer, &plugins);
        }

        EndpointPickerConfig {
            plugins,
            scheduling_profiles: profiles,
            saturation_detector,
            feature_gates: raw.feature_gates,
            flow_control,
            data_layer: raw.data_layer,
            parser: raw.parser,
        }
    }

    fn plugins(&mut self, raw: &[RawPlugin]) -> Vec<PluginSpec> {
        let mut plugins: Vec<PluginSpec> = Vec::new();
        for (i, plugin) in raw.iter().enumerate() {
            let at = FieldPath::parse("plugins").index(i);
            let params = Params {
                text: self.text,
                doc: self.doc,
                path: at.key("parameters"),
            };
            let kind = match PluginKind::parse(&plugin.type_name, &params) {
                None => {
                    self.problem(
                        at.key("type"),
                        format!(
                            "{:?} is unknown (known: {})",
                            plugin.type_name,
                            KNOWN_PLUGIN_TYPES.join(", ")
                        ),
                    );
                    continue;
                }
                Some(Err(err)) => {
                    let object = Some(CONFIG_KIND.to_string());
                    self.problems
                        .push(problem_from_yaml(&err, self.file, object));
                    continue;
                }
                Some(Ok(kind)) => kind,
            };
            let mut errors = Vec::new();
            kind.check(&at.key("parameters"), &mut errors);
            for error in errors {
                self.problem(error.path, error.message);
            }
            // The type as written, so that profiles may refer to a legacy alias by its name.
            let name = plugin
                .name
                .clone()
                .unwrap_or_else(|| plugin.type_name.clone());
            if name.is_empty() {
                self.problem(at.key("name"), "must not be empty");
            } else if let Some(first) = plugins.iter().position(|p| p.name == name) {
                let path = if plugin.name.is_some() {
                    at.key("name")
                } else {
                    at.key("type")
                };
                self.problem(
                    path,
                    format!(
                        "plugin name {name:?} is already used by plugins[{first}]; give one of \
                         them a distinct name"
                    ),
                );
            } else {
                plugins.push(PluginSpec { name, kind });
            }
        }
        plugins
    }

    /// Adds a plugin named after its type unless one by that name exists; returns its name.
    fn ensure_plugin(&mut self, plugins: &mut Vec<PluginSpec>, kind: PluginKind) -> String {
        let name = kind.type_name().to_string();
        match plugins.iter().find(|p| p.name == name) {
            Some(existing) if existing.kind.type_name() != kind.type_name() => {
                let message = format!(
                    "a default {name} plugin is needed, but the name {name:?} is taken by a {} \
                     plugin; rename that plugin",
                    existing.kind.type_name()
                );
                self.problem(FieldPath::parse("plugins"), message);
            }
            Some(_) => {}
            None => plugins.push(PluginSpec {
                name: name.clone(),
                kind,
            }),
        }
        name
    }

    fn profiles(
        &mut self,
        raw: Option<Vec<SchedulingProfile>>,
        plugins: &mut Vec<PluginSpec>,
    ) -> Vec<SchedulingProfile> {
        let mut profiles = match raw {
            Some(profiles) if !profiles.is_empty() => {
                self.check_profiles(&profiles, plugins);
                profiles
            }
            _ => vec![self.default_profile(plugins)],
        };
        for profile in &mut profiles {
            let has_picker = profile
                .plugins
                .iter()
                .any(|r| category_of(plugins, &r.plugin_ref) == Some(PluginCategory::Picker));
            if !has_picker {
                let picker = self
                    .ensure_plugin(plugins, PluginKind::MaxScorePicker(PickerParams::default()));
                profile.plugins.push(ProfilePlugin {
                    plugin_ref: picker,
                    weight: None,
                });
            }
        }
        profiles
    }

    fn default_profile(&mut self, plugins: &mut Vec<PluginSpec>) -> SchedulingProfile {
        let scheduling: Vec<&PluginSpec> = plugins
            .iter()
            .filter(|p| {
                matches!(
                    p.kind.category(),
                    PluginCategory::Filter | PluginCategory::Scorer | PluginCategory::Picker
                )
            })
            .collect();
        if scheduling.is_empty() {
            let defaults = [
                (PluginKind::QueueScorer, 2.0),
                (PluginKind::KvCacheUtilizationScorer, 2.0),
                (
                    PluginKind::PrefixCacheScorer(PrefixCacheParams::default()),
                    3.0,
                ),
            ];
            let mut refs = Vec::new();
            for (kind, weight) in defaults {
                let name = self.ensure_plugin(plugins, kind);
                refs.push(ProfilePlugin {
                    plugin_ref: name,
                    weight: Some(weight),
                });
            }
            return SchedulingProfile {
                name: "default".to_string(),
                plugins: refs,
            };
        }
        let pickers: Vec<usize> = plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind.category() == PluginCategory::Picker)
            .map(|(i, _)| i)
            .collect();
        if let Some(&second) = pickers.get(1) {
            self.problem(
                FieldPath::parse("plugins").index(second),
                "a second picker, but no schedulingProfiles say which to use; the default \
                 profile takes every filter, scorer and picker, and a profile has one picker",
            );
        }
        SchedulingProfile {
            name: "default".to_string(),
            plugins: scheduling
                .into_iter()
                .map(|p| ProfilePlugin {
                    plugin_ref: p.name.clone(),
                    weight: None,
                })
                .collect(),
        }
    }

    fn check_profiles(&mut self, profiles: &[SchedulingProfile], plugins: &[PluginSpec]) {
        let defined = || {
            plugins
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut names = HashSet::new();
        for (i, profile) in profiles.iter().enumerate() {
            let at = FieldPath::parse("schedulingProfiles").index(i);
            if profile.name.is_empty() {
                self.problem(at.key("name"), "must not be empty");
            } else if !names.insert(profile.name.as_str()) {
                self.problem(
                    at.key("name"),
                    format!("profile name {:?} is used twice", profile.name),
                );
            }
            let mut picker: Option<&str> = None;
            let mut seen = HashSet::new();
            for (j, plugin_ref) in profile.plugins.iter().enumerate() {
                let at = at.key("plugins").index(j);
                let name = plugin_ref.plugin_ref.as_str();
                if !seen.insert(name) {
                    self.problem(
                        at.key("pluginRef"),
                        format!("{name:?} is listed twice in this profile"),
                    );
                    continue;
                }
                let Some(category) = category_of(plugins, name) else {
                    let known = defined();
                    let known = if known.is_empty() {
                        "none".to_string()
                    } else {
                        known
                    };
                    self.problem(
                        at.key("pluginRef"),
                        format!("{name:?} is not defined in plugins (defined: {known})"),
                    );
                    continue;
                };
                match category {
                    PluginCategory::Scorer => {}
                    PluginCategory::Filter | PluginCategory::Picker => {
                        if plugin_ref.weight.is_some() {
                            self.problem(
                                at.key("weight"),
                                format!(
                                    "{name:?} is {}; only scorers take a weight",
                                    category.describe()
                                ),
                            );
                        }
                    }
                    other => {
                        self.problem(
                            at.key("pluginRef"),
                            format!(
                                "{name:?} is {}; a profile lists only filters, scorers and \
                                 one picker",
                                other.describe()
                            ),
                        );
                        continue;
                    }
                }
                if let Some(weight) = plugin_ref.weight {
                    if !(weight.is_finite() && weight >= 0.0) {
                        self.problem(at.key("weight"), format!("{weight} must be a number >= 0"));
                    }
                }
                if category == PluginCategory::Picker {
                    if let Some(first) = picker {
                        self.problem(
                            at.key("pluginRef"),
                            format!(
                                "{name:?} is a second picker; this profile already uses \
                                 {first:?}, and a profile has one picker"
                            ),
                        );
                    }
                    picker = Some(name);
                }
            }
        }
    }

    fn profile_handler(&mut self, plugins: &mut Vec<PluginSpec>, profile_count: usize) {
        let handlers: Vec<usize> = plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind.category() == PluginCategory::ProfileHandler)
            .map(|(i, _)| i)
            .collect();
        if let Some(&second) = handlers.get(1) {
            self.problem(
                FieldPath::parse("plugins").index(second),
                "a second profile handler; at most one may be defined",
            );
        }
        if handlers.is_empty() {
            self.ensure_plugin(plugins, PluginKind::SingleProfileHandler);
        }
        if profile_count > 1 {
            // single-profile-handler is the only handler type.
            self.problem(
                FieldPath::parse("schedulingProfiles"),
                format!("{profile_count} profiles, but single-profile-handler runs exactly one"),
            );
        }
    }

    fn saturation_detector(
        &mut self,
        raw: Option<PluginRef>,
        plugins: &mut Vec<PluginSpec>,
    ) -> String {
        if let Some(reference) = raw {
            let name = reference.plugin_ref;
            match category_of(plugins, &name) {
                Some(PluginCategory::SaturationDetector) => {}
                Some(other) => self.problem(
                    FieldPath::parse("saturationDetector.pluginRef"),
                    format!(
                        "{name:?} is {}, not a saturation detector",
                        other.describe()
                    ),
                ),
                None => self.problem(
                    FieldPath::parse("saturationDetector.pluginRef"),
                    format!("{name:?} is not defined in plugins"),
                ),
            }
            return name;
        }
        match plugins
            .iter()
            .find(|p| p.kind.category() == PluginCategory::SaturationDetector)
        {
            Some(detector) => detector.name.clone(),
            None => self.ensure_plugin(
                plugins,
                PluginKind::UtilizationDetector(UtilizationDetectorParams::default()),
            ),
        }
    }

    fn data_layer(&mut self, layer: &DataLayer, plugins: &[PluginSpec]) {
        for (i, source) in layer.sources.iter().enumerate() {
            let at = FieldPath::parse("dataLayer.sources").index(i);
            self.data_ref(plugins, &source.plugin_ref, at.key("pluginRef"));
            for (j, extractor) in source.extractors.iter().enumerate() {
                let path = at.key("extractors").index(j).key("pluginRef");
                self.data_ref(plugins, &extractor.plugin_ref, path);
            }
        }
    }

    fn data_ref(&mut self, plugins: &[PluginSpec], name: &str, path: FieldPath) {
        match category_of(plugins, name) {
            Some(PluginCategory::DataSource) => {}
            Some(other) => self.problem(
                path,
                format!("{name:?} is {}, not a data-layer plugin", other.describe()),
            ),
            None => self.problem(path, format!("{name:?} is not defined in plugins")),
        }
    }
}

fn category_of(plugins: &[PluginSpec], name: &str) -> Option<PluginCategory> {
    plugins
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.kind.category())
}

#[cfg(test)]
mod tests;
