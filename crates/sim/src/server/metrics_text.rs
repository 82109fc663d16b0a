//! `/metrics` in vLLM V1's Prometheus text format (names, labels and buckets as vLLM's
//! `v1/metrics/loggers.py` writes them), plus the simulator's own health of its clock and
//! the faults it injected.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use rand::Rng as _;

use crate::engine::Engine;
use crate::hist::Histogram;

use super::faults::MetricsFault;
use super::{openai, response, Body, Shared};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The adapter lists last shown in `vllm:lora_requests_info` and when they changed: vLLM
/// keeps one series per change with the change's time as value, and readers take the newest.
#[derive(Clone, Debug)]
pub struct LoraInfo {
    running: String,
    waiting: String,
    changed_at: f64,
}

impl LoraInfo {
    pub fn new(now_unix: f64) -> LoraInfo {
        LoraInfo {
            running: String::new(),
            waiting: String::new(),
            changed_at: now_unix,
        }
    }

    /// Notes the current lists; returns (running, waiting, time of the last change).
    pub fn update(&mut self, engine: &Engine, now_unix: f64) -> (String, String, f64) {
        let s = engine.stats();
        let join = |v: &[Arc<str>]| v.iter().map(|a| &**a).collect::<Vec<_>>().join(",");
        let (running, waiting) = (join(&s.running_loras), join(&s.waiting_loras));
        if running != self.running || waiting != self.waiting {
            self.running = running;
            self.waiting = waiting;
            self.changed_at = now_unix;
        }
        (self.running.clone(), self.waiting.clone(), self.changed_at)
    }
}

/// Writes the vLLM part of the page for `engine`, labelled with `model`.
pub fn render_vllm(out: &mut String, engine: &Engine, model: &str, lora: &(String, String, f64)) {
    let cfg = engine.config();
    let s = engine.stats();
    let c = engine.counters();
    let l = format!("engine=\"0\",model_name=\"{}\"", escape(model));

    gauge(
        out,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        &l,
        s.num_running as f64,
    );
    gauge(
        out,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        &l,
        s.num_waiting as f64,
    );
    gauge(
        out,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        &l,
        s.kv_usage,
    );
    header(
        out,
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
        cfg.max_loras,
        escape(&lora.0),
        escape(&lora.1),
        num(lora.2)
    );
    header(
        out,
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        "gauge",
    );
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"{}\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"0\",num_gpu_blocks=\"{}\",num_gpu_blocks_override=\"None\"}} 1.0",
        cfg.block_size,
        if cfg.enable_prefix_caching { "True" } else { "False" },
        cfg.num_gpu_blocks
    );

    counter(
        out,
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        &l,
        c.preemptions as f64,
    );
    counter(
        out,
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        &l,
        c.prompt_tokens as f64,
    );
    counter(
        out,
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        &l,
        c.generation_tokens as f64,
    );
    counter(
        out,
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        &l,
        c.prefix_queries as f64,
    );
    counter(
        out,
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        &l,
        c.prefix_hits as f64,
    );
    header(
        out,
        "vllm:request_success",
        "Count of successfully processed requests.",
        "counter",
    );
    for (reason, n) in [
        ("stop", c.finished_stop),
        ("length", c.finished_length),
        ("abort", c.aborted),
    ] {
        let _ = writeln!(
            out,
            "vllm:request_success_total{{{l},finished_reason=\"{reason}\"}} {}",
            num(n as f64)
        );
    }

    histogram(
        out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &l,
        &c.ttft,
    );
    histogram(
        out,
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &l,
        &c.itl,
    );
    histogram(
        out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &l,
        &c.e2e,
    );
    histogram(
        out,
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &l,
        &c.queue_time,
    );
}

/// The whole page: vLLM's metrics, then the simulator's own.
pub(crate) fn render(shared: &Shared) -> String {
    let mut out = String::with_capacity(16 * 1024);
    {
        let core = shared.core.lock();
        let lora = shared
            .lora_info
            .lock()
            .update(&core.engine, super::unix_now() as f64);
        render_vllm(&mut out, &core.engine, &shared.cfg.served_model_name, &lora);
    }
    let l = format!("model_name=\"{}\"", escape(&shared.cfg.served_model_name));
    {
        let lag = shared.lag.lock();
        histogram(
            &mut out,
            "infergate_sim_step_lag_seconds",
            "How late (engine seconds) the simulator woke up for each step's end.",
            &l,
            &lag.hist,
        );
        counter(
            &mut out,
            "infergate_sim_lag_resyncs",
            "Times the simulator fell more than 50 ms (engine time) behind and restarted its clock.",
            &l,
            lag.resyncs as f64,
        );
    }
    gauge(
        &mut out,
        "infergate_sim_time_scale",
        "Simulated seconds per real second.",
        &l,
        shared.cfg.time_scale,
    );
    header(
        &mut out,
        "infergate_sim_faults_injected",
        "Faults the simulator injected, by kind.",
        "counter",
    );
    for (kind, n) in shared.faults_injected.lock().iter() {
        let _ = writeln!(
            out,
            "infergate_sim_faults_injected_total{{{l},kind=\"{kind}\"}} {}",
            num(*n as f64)
        );
    }
    out
}

pub(crate) async fn handle(shared: &Shared) -> Response<Body> {
    let fault = shared.faults.lock().metrics;
    match fault {
        MetricsFault::Ok => response(StatusCode::OK, CONTENT_TYPE, Bytes::from(render(shared))),
        MetricsFault::Missing => {
            shared.count_fault("metrics_missing");
            openai::error(StatusCode::NOT_FOUND, "Not Found (metrics fault: missing)")
        }
        MetricsFault::Garbage => {
            shared.count_fault("metrics_garbage");
            // A leading '{' cannot start a Prometheus line, whatever random bytes follow.
            let mut bytes = vec![b'{'];
            let mut rng = shared.fault_rng.lock();
            bytes.extend((0..512).map(|_| rng.random::<u8>()));
            response(StatusCode::OK, CONTENT_TYPE, Bytes::from(bytes))
        }
        MetricsFault::Hang => {
            shared.count_fault("metrics_hang");
            std::future::pending().await
        }
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, labels: &str, v: f64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name}{{{labels}}} {}", num(v));
}

fn counter(out: &mut String, name: &str, help: &str, labels: &str, v: f64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name}_total{{{labels}}} {}", num(v));
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    header(out, name, help, "histogram");
    for (le, n) in h.cumulative() {
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"{}\"}} {}",
            num(le),
            num(n as f64)
        );
    }
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", num(h.count as f64));
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", num(h.sum));
}

/// Numbers as Python's prometheus_client prints them: `1.0`, `0.25`, `+Inf`.
fn num(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
