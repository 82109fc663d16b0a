//! Per-engine metric mappings: turn the samples of one model server's `/metrics` page into
//! the engine-neutral [`EndpointMetrics`] the scheduler reads.
//!
//! Each engine names queue depth, running batch size and KV-cache usage differently
//! (DESIGN.md 4.4). When a name has several series (vLLM labels by model and engine
//! index, Triton by model and version), queue and running are summed and KV usage takes
//! the fullest cache. A page without the queue or running metric is an error that names
//! the engine, because the usual cause is an endpoint configured with the wrong engine.
//! Values no healthy server reports (negative, NaN, a queue over ten million, a KV
//! fraction over 1.5) are errors too, so a broken exporter is noticed rather than
//! steering traffic. Pure functions over parsed samples; no I/O.

use infergate_core::{EndpointMetrics, Engine, LoraState};

use crate::text::Sample;

/// Largest queue or running count accepted as real.
const MAX_COUNT: f64 = 1e7;
/// Largest KV fraction accepted; values in (1, 1.5] are rounding and clamped to 1.
const MAX_KV_FRACTION: f64 = 1.5;

/// Why a page could not be turned into [`EndpointMetrics`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractError {
    #[error(
        "no `{metric}` on the metrics page; is this endpoint really a {engine} server? \
         (the engine comes from the `inference.networking.k8s.io/engine-type` pod label \
         or the endpoint's `engine` in the pool file)"
    )]
    MissingMetric {
        engine: Engine,
        metric: &'static str,
    },
    #[error("{engine} metric `{metric}` is {value}, which {problem}")]
    BadValue {
        engine: Engine,
        metric: &'static str,
        value: f64,
        problem: &'static str,
    },
    #[error("{engine} metric `{metric}` has label {label}={value:?}, which {problem}")]
    BadLabel {
        engine: Engine,
        metric: &'static str,
        label: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// A metric name, optionally narrowed to series with one label value, as the engines'
/// PromQL selectors do.
#[derive(Debug, Clone, Copy)]
struct Selector {
    name: &'static str,
    label: Option<(&'static str, &'static str)>,
    /// How errors print it, e.g. `nv_trt_llm_request_metrics{request_type="waiting"}`.
    shown: &'static str,
}

impl Selector {
    const fn name(name: &'static str) -> Self {
        Selector {
            name,
            label: None,
            shown: name,
        }
    }

    const fn with_label(
        name: &'static str,
        label: &'static str,
        value: &'static str,
        shown: &'static str,
    ) -> Self {
        Selector {
            name,
            label: Some((label, value)),
            shown,
        }
    }

    fn matches(&self, s: &Sample<'_>) -> bool {
        s.name == self.name
            && match self.label {
                None => true,
                Some((k, v)) => s.label(k) == Some(v),
            }
    }
}

/// The metric names one engine uses for the three core signals.
struct Mapping {
    waiting: Selector,
    running: Selector,
    /// Tried in order; the first present wins. Empty when the engine has no KV metric.
    kv: &'static [Selector],
}

const VLLM: Mapping = Mapping {
    waiting: Selector::name("vllm:num_requests_waiting"),
    running: Selector::name("vllm:num_requests_running"),
    kv: &[
        Selector::name("vllm:kv_cache_usage_perc"),
        // Name before vLLM 0.10; same meaning.
        Selector::name("vllm:gpu_cache_usage_perc"),
    ],
};
const SGLANG: Mapping = Mapping {
    waiting: Selector::name("sglang:num_queue_reqs"),
    running: Selector::name("sglang:num_running_reqs"),
    kv: &[Selector::name("sglang:token_usage")],
};
const TRTLLM_SERVE: Mapping = Mapping {
    waiting: Selector::name("trtllm_num_requests_waiting"),
    running: Selector::name("trtllm_num_requests_running"),
    kv: &[Selector::name("trtllm_kv_cache_utilization")],
};
const TRITON_REQUESTS: &str = "nv_trt_llm_request_metrics";
const TRITON_KV_BLOCKS: &str = "nv_trt_llm_kv_cache_block_metrics";
const TRITON: Mapping = Mapping {
    waiting: Selector::with_label(
        TRITON_REQUESTS,
        "request_type",
        "waiting",
        "nv_trt_llm_request_metrics{request_type=\"waiting\"}",
    ),
    running: Selector::with_label(
        TRITON_REQUESTS,
        "request_type",
        "scheduled",
        "nv_trt_llm_request_metrics{request_type=\"scheduled\"}",
    ),
    kv: &[Selector::with_label(
        TRITON_KV_BLOCKS,
        "kv_cache_block_type",
        "fraction",
        "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"}",
    )],
};
const LLAMACPP: Mapping = Mapping {
    waiting: Selector::name("llamacpp:requests_deferred"),
    running: Selector::name("llamacpp:requests_processing"),
    kv: &[],
};

/// Whether [`extract`] reads metric family `name` for `engine`. The scraper parses only
/// these lines, so histograms and counters (most of a vLLM page) cost a name comparison.
pub fn reads(engine: Engine, name: &str) -> bool {
    let map = mapping(engine);
    if name == map.waiting.name || name == map.running.name || map.kv.iter().any(|k| k.name == name)
    {
        return true;
    }
    match engine {
        Engine::Vllm => name == "vllm:lora_requests_info" || name == "vllm:cache_config_info",
        Engine::Sglang => name == "sglang:cache_config_info",
        Engine::Triton => name == TRITON_KV_BLOCKS,
        Engine::TrtllmServe | Engine::Llamacpp => false,
    }
}

fn mapping(engine: Engine) -> &'static Mapping {
    match engine {
        Engine::Vllm => &VLLM,
        Engine::Sglang => &SGLANG,
        Engine::TrtllmServe => &TRTLLM_SERVE,
        Engine::Triton => &TRITON,
        Engine::Llamacpp => &LLAMACPP,
    }
}

/// Read one engine's metrics from a parsed page.
///
/// ```
/// use infergate_core::Engine;
/// let page = "vllm:num_requests_waiting 2\nvllm:num_requests_running 5\n\
///             vllm:kv_cache_usage_perc 0.25\n";
/// let samples = infergate_scrape::text::parse(page).unwrap();
/// let m = infergate_scrape::engines::extract(Engine::Vllm, &samples).unwrap();
/// assert_eq!((m.waiting, m.running, m.kv_cache_usage), (2, 5, Some(0.25)));
/// ```
pub fn extract(engine: Engine, samples: &[Sample<'_>]) -> Result<EndpointMetrics, ExtractError> {
    let map = mapping(engine);
    let ctx = Ctx { engine, samples };
    let waiting = ctx.required_count(&map.waiting)?;
    let running = ctx.required_count(&map.running)?;
    let mut kv_cache_usage = None;
    for sel in map.kv {
        if let Some(kv) = ctx.kv_fraction(sel)? {
            kv_cache_usage = Some(kv);
            break;
        }
    }
    let mut metrics = EndpointMetrics {
        waiting,
        running,
        kv_cache_usage,
        ..EndpointMetrics::default()
    };
    match engine {
        Engine::Vllm => {
            metrics.lora = ctx.vllm_lora()?;
            (metrics.block_size, metrics.num_gpu_blocks) = ctx.cache_config(
                "vllm:cache_config_info",
                &[("block_size", "num_gpu_blocks")],
            )?;
        }
        Engine::Sglang => {
            (metrics.block_size, metrics.num_gpu_blocks) = ctx.cache_config(
                "sglang:cache_config_info",
                &[("page_size", "num_pages"), ("block_size", "num_gpu_blocks")],
            )?;
        }
        Engine::Triton => {
            let tokens_per = Selector::with_label(
                TRITON_KV_BLOCKS,
                "kv_cache_block_type",
                "tokens_per",
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"tokens_per\"}",
            );
            let max = Selector::with_label(
                TRITON_KV_BLOCKS,
                "kv_cache_block_type",
                "max",
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"}",
            );
            metrics.block_size = ctx.max_count(&tokens_per)?.map(|v| v as u32);
            metrics.num_gpu_blocks = ctx.max_count(&max)?.map(|v| v as u64);
        }
        Engine::TrtllmServe | Engine::Llamacpp => {}
    }
    Ok(metrics)
}

struct Ctx<'s, 'a> {
    engine: Engine,
    samples: &'s [Sample<'a>],
}

impl<'s, 'a> Ctx<'s, 'a> {
    fn series(&self, sel: &Selector) -> impl Iterator<Item = &'s Sample<'a>> + '_ {
        let sel = *sel;
        self.samples.iter().filter(move |s| sel.matches(s))
    }

    fn bad_value(&self, sel: &Selector, value: f64, problem: &'static str) -> ExtractError {
        ExtractError::BadValue {
            engine: self.engine,
            metric: sel.shown,
            value,
            problem,
        }
    }

    fn check_count(&self, sel: &Selector, v: f64) -> Result<f64, ExtractError> {
        if v.is_nan() {
            Err(self.bad_value(sel, v, "is not a number"))
        } else if v < 0.0 {
            Err(self.bad_value(sel, v, "is negative"))
        } else if v > MAX_COUNT {
            Err(self.bad_value(sel, v, "is over 10 million and cannot be real"))
        } else {
            Ok(v)
        }
    }

    /// Sum over all matching series; `None` when there are none.
    fn sum_count(&self, sel: &Selector) -> Result<Option<u32>, ExtractError> {
        let mut total: Option<f64> = None;
        for s in self.series(sel) {
            let v = self.check_count(sel, s.value)?;
            *total.get_or_insert(0.0) += v;
        }
        match total {
            None => Ok(None),
            Some(t) => Ok(Some(self.check_count(sel, t)?.round() as u32)),
        }
    }

    fn required_count(&self, sel: &Selector) -> Result<u32, ExtractError> {
        self.sum_count(sel)?.ok_or(ExtractError::MissingMetric {
            engine: self.engine,
            metric: sel.shown,
        })
    }

    /// Largest value over all matching series, checked like a count.
    fn max_count(&self, sel: &Selector) -> Result<Option<f64>, ExtractError> {
        let mut max: Option<f64> = None;
        for s in self.series(sel) {
            let v = self.check_count(sel, s.value)?.round();
            max = Some(max.map_or(v, |m: f64| m.max(v)));
        }
        Ok(max)
    }

    /// The fullest cache over all matching series, clamped into [0, 1].
    fn kv_fraction(&self, sel: &Selector) -> Result<Option<f64>, ExtractError> {
        let mut max: Option<f64> = None;
        for s in self.series(sel) {
            let v = s.value;
            if v.is_nan() {
                return Err(self.bad_value(sel, v, "is not a number"));
            }
            if !(0.0..=MAX_KV_FRACTION).contains(&v) {
                return Err(self.bad_value(sel, v, "is outside the KV-cache fraction range 0..=1"));
            }
            max = Some(max.map_or(v, |m: f64| m.max(v)));
        }
        Ok(max.map(|v| v.min(1.0)))
    }

    /// `vllm:lora_requests_info`: one series per change, its value the time of the change;
    /// the newest series is the current state.
    fn vllm_lora(&self) -> Result<Option<LoraState>, ExtractError> {
        const METRIC: &str = "vllm:lora_requests_info";
        let sel = Selector::name(METRIC);
        let mut newest: Option<&Sample<'_>> = None;
        for s in self.series(&sel) {
            if !s.value.is_finite() {
                return Err(self.bad_value(&sel, s.value, "is not a timestamp"));
            }
            if newest.is_none_or(|n| s.value > n.value) {
                newest = Some(s);
            }
        }
        let Some(s) = newest else { return Ok(None) };
        let max_loras = match s.label("max_lora") {
            None => 0,
            Some(text) => text
                .trim()
                .parse::<u32>()
                .map_err(|_| ExtractError::BadLabel {
                    engine: self.engine,
                    metric: METRIC,
                    label: "max_lora",
                    value: text.to_string(),
                    problem: "is not a whole number",
                })?,
        };
        Ok(Some(LoraState {
            running: adapter_list(s.label("running_lora_adapters")),
            waiting: adapter_list(s.label("waiting_lora_adapters")),
            max_loras,
        }))
    }

    /// Block size and block count from an info metric's labels. `label_pairs` are tried in
    /// order; a value of `None` (Python's, printed before the engine has sized its cache)
    /// or an empty one means unknown.
    fn cache_config(
        &self,
        metric: &'static str,
        label_pairs: &[(&'static str, &'static str)],
    ) -> Result<(Option<u32>, Option<u64>), ExtractError> {
        let Some(s) = self.series(&Selector::name(metric)).next() else {
            return Ok((None, None));
        };
        for &(size_label, count_label) in label_pairs {
            if s.label(size_label).is_none() && s.label(count_label).is_none() {
                continue;
            }
            let size = self.number_label::<u32>(s, metric, size_label)?;
            let count = self.number_label::<u64>(s, metric, count_label)?;
            return Ok((size, count));
        }
        Ok((None, None))
    }

    fn number_label<T: std::str::FromStr>(
        &self,
        s: &Sample<'_>,
        metric: &'static str,
        label: &'static str,
    ) -> Result<Option<T>, ExtractError> {
        match s.label(label).map(str::trim) {
            None | Some("" | "None") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| ExtractError::BadLabel {
                engine: self.engine,
                metric,
                label,
                value: text.to_string(),
                problem: "is not a whole number",
            }),
        }
    }
}

/// A comma-separated adapter list; empty strings and stray blanks give no names.
fn adapter_list(label: Option<&str>) -> Vec<String> {
    label
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}
