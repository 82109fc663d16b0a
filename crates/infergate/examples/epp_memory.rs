//! Memory and CPU of `infergate epp` scraping a large pool.
//!
//! This one process binds N (default 1,000) listeners on 127.0.0.1, each a tiny hyper server
//! answering `GET /metrics` with a fixed vLLM page (and any POST with a fixed completion),
//! writes a pool file (`StaticEndpoints`) naming them, and starts the release
//! `infergate epp --pool-file ...`. It reads the picker's VmRSS / VmHWM from
//! `/proc/<pid>/status` and its CPU time (utime + stime from `/proc/<pid>/stat`) at 10 s
//! and 30 s after start, and counts the scrapes the fake servers answered.
//!
//! With `--requests K`, it also starts Envoy (ext_proc to the picker) and sends K
//! completions requests (~2 KB prompts, 32 shared prefixes) at 50 req/s between the two
//! samples, so the prefix index and per-request state are populated too.
//!
//! ```sh
//! cargo build --release -p infergate --bin infergate --example epp_memory
//! target/release/examples/epp_memory [--endpoints 1000] [--page small|vllm] [--requests 0]
//!     [--first-sample-secs 10] [--secs 30] [-- <extra infergate epp flags>]
//! ```
//!
//! Example extra flags: `-- --refresh-metrics-interval 200ms`.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use infergate_testkit::procstat::cpu_seconds;
use infergate_testkit::{free_port, wait_for_port, Envoy, EnvoyConfig, HttpClient};

struct Args {
    endpoints: usize,
    page: String,
    requests: usize,
    first_sample: f64,
    secs: f64,
    extra: Vec<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        endpoints: 1_000,
        page: "small".into(),
        requests: 0,
        first_sample: 10.0,
        secs: 30.0,
        extra: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--" {
            a.extra = it.by_ref().collect();
            break;
        }
        let v = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))?;
        match k.as_str() {
            "--endpoints" => a.endpoints = v.parse()?,
            "--page" => a.page = v,
            "--requests" => a.requests = v.parse()?,
            "--first-sample-secs" => a.first_sample = v.parse()?,
            "--secs" => a.secs = v.parse()?,
            other => anyhow::bail!(
                "unknown argument {other:?} (known: --endpoints N, --page small|vllm, --requests K, --first-sample-secs S, --secs S, -- EPP_FLAGS)"
            ),
        }
    }
    anyhow::ensure!(
        a.page == "small" || a.page == "vllm",
        "--page is small or vllm"
    );
    a.endpoints = a.endpoints.clamp(1, 5_000);
    a.requests = a.requests.min(10_000);
    a.secs = a.secs.clamp(2.0, 300.0);
    a.first_sample = a.first_sample.clamp(1.0, a.secs - 1.0);
    Ok(a)
}

/// The page the fake testkit server serves (~1 KB): the gauges the picker reads.
fn small_page() -> String {
    let m = "model_name=\"fake-model\"";
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",{m}}} 3.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",{m}}} 1.0\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",{m}}} 0.25\n\
         # HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
         # TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"8192\"}} 1.0\n"
    )
}

/// A page shaped like a real vLLM v1 server's: the small page plus its counters and
/// latency/token histograms (~30 KB).
fn vllm_page() -> String {
    use std::fmt::Write as _;
    let mut s = small_page();
    let lbl = "engine=\"0\",model_name=\"fake-model\"";
    for c in [
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ] {
        let _ = write!(
            s,
            "# HELP {c} Counter.\n# TYPE {c} counter\n{c}{{{lbl}}} 123456.0\n"
        );
    }
    for reason in ["stop", "length", "abort"] {
        let _ = writeln!(
            s,
            "vllm:request_success_total{{{lbl},finished_reason=\"{reason}\"}} 4242.0"
        );
    }
    let secs = [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    ];
    let tokens = [
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
        20000.0, 50000.0, 100000.0,
    ];
    let hists: [(&str, &[f64]); 12] = [
        ("vllm:time_to_first_token_seconds", &secs),
        ("vllm:time_per_output_token_seconds", &secs),
        ("vllm:inter_token_latency_seconds", &secs),
        ("vllm:e2e_request_latency_seconds", &secs),
        ("vllm:request_queue_time_seconds", &secs),
        ("vllm:request_inference_time_seconds", &secs),
        ("vllm:request_prefill_time_seconds", &secs),
        ("vllm:request_decode_time_seconds", &secs),
        ("vllm:request_prompt_tokens", &tokens),
        ("vllm:request_generation_tokens", &tokens),
        ("vllm:request_params_max_tokens", &tokens),
        ("vllm:iteration_tokens_total", &tokens),
    ];
    for (name, buckets) in hists {
        let _ = write!(s, "# HELP {name} Histogram.\n# TYPE {name} histogram\n");
        for (i, b) in buckets.iter().enumerate() {
            let _ = writeln!(s, "{name}_bucket{{{lbl},le=\"{b:?}\"}} {}.0", 100 * (i + 1));
        }
        let _ = writeln!(
            s,
            "{name}_bucket{{{lbl},le=\"+Inf\"}} {}.0",
            100 * (buckets.len() + 1)
        );
        let _ = writeln!(s, "{name}_count{{{lbl}}} {}.0", 100 * (buckets.len() + 1));
        let _ = writeln!(s, "{name}_sum{{{lbl}}} 98765.4321");
    }
    s
}

const COMPLETION: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"fake-model","choices":[{"index":0,"text":" tok tok tok tok","finish_reason":"length"}],"usage":{"prompt_tokens":512,"completion_tokens":4,"total_tokens":516}}"#;

struct Counters {
    scrapes: AtomicU64,
    posts: AtomicU64,
}

async fn handle(
    page: Bytes,
    counters: Arc<Counters>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let resp = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        counters.scrapes.fetch_add(1, Ordering::Relaxed);
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(page))
    } else {
        counters.posts.fetch_add(1, Ordering::Relaxed);
        let _ = req.into_body().collect().await;
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(COMPLETION.as_bytes())))
    };
    Ok(resp.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// One tiny server: an accept loop whose connections are served by hyper's HTTP/1.
async fn serve(listener: tokio::net::TcpListener, page: Bytes, counters: Arc<Counters>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (page, counters) = (page.clone(), counters.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req| handle(page.clone(), counters.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `/proc/<pid>/status` field in kB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn threads(pid: u32) -> Option<u64> {
    status_kb(pid, "Threads:")
}

struct Sample {
    at: Duration,
    rss_kb: u64,
    hwm_kb: u64,
    cpu: f64,
    own_cpu: f64,
    scrapes: u64,
    posts: u64,
}

fn sample(pid: u32, t0: Instant, c: &Counters) -> Sample {
    Sample {
        at: t0.elapsed(),
        rss_kb: status_kb(pid, "VmRSS:").unwrap_or(0),
        hwm_kb: status_kb(pid, "VmHWM:").unwrap_or(0),
        cpu: cpu_seconds(&pid.to_string()).unwrap_or(f64::NAN),
        own_cpu: cpu_seconds("self").unwrap_or(f64::NAN),
        scrapes: c.scrapes.load(Ordering::Relaxed),
        posts: c.posts.load(Ordering::Relaxed),
    }
}

fn report(label: &str, prev: &Sample, s: &Sample, endpoints: usize) {
    let dt = (s.at - prev.at).as_secs_f64();
    let scrapes_per_s = (s.scrapes - prev.scrapes) as f64 / dt;
    println!(
        "{label:<10} t={:>5.1}s  RSS {:>6.1} MB  HWM {:>6.1} MB  picker CPU {:>5.1}%  load-gen+servers CPU {:>5.1}%  scrapes {:>7.0}/s ({:.1}/s per endpoint)  posts {}",
        s.at.as_secs_f64(),
        s.rss_kb as f64 / 1024.0,
        s.hwm_kb as f64 / 1024.0,
        100.0 * (s.cpu - prev.cpu) / dt,
        100.0 * (s.own_cpu - prev.own_cpu) / dt,
        scrapes_per_s,
        scrapes_per_s / endpoints as f64,
        s.posts - prev.posts,
    );
}

struct Epp(Child);
impl Drop for Epp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mk_body(i: usize) -> Bytes {
    let group = i % 32;
    let mut prompt = format!("[system prompt of tenant {group}] ");
    while prompt.len() < 1_000 {
        prompt.push_str("You are a helpful assistant that answers concisely. ");
    }
    prompt.push_str(&format!("[question {i}] "));
    while prompt.len() < 2_000 {
        prompt.push_str("Explain the routing decision in detail. ");
    }
    Bytes::from(
        serde_json::to_vec(
            &serde_json::json!({"model": "fake-model", "prompt": prompt, "max_tokens": 4}),
        )
        .expect("json"),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let page = Bytes::from(if a.page == "vllm" {
        vllm_page()
    } else {
        small_page()
    });
    let counters = Arc::new(Counters {
        scrapes: AtomicU64::new(0),
        posts: AtomicU64::new(0),
    });
    let mut addrs = Vec::with_capacity(a.endpoints);
    for _ in 0..a.endpoints {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        addrs.push(l.local_addr()?);
        tokio::spawn(serve(l, page.clone(), counters.clone()));
    }
    let dir = std::env::temp_dir().join(format!("epp_memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pool = dir.join("pool.yaml");
    let mut y = String::from(
        "apiVersion: infergate.dev/v1alpha1\nkind: StaticEndpoints\nmetadata:\n  name: bench\nspec:\n  endpoints:\n",
    );
    for addr in &addrs {
        y.push_str(&format!(
            "  - address: {}\n    port: {}\n",
            addr.ip(),
            addr.port()
        ));
    }
    std::fs::write(&pool, y)?;

    let bin = infergate_testkit::release_infergate()?;
    let (grpc, health, metrics) = (free_port(), free_port(), free_port());
    let t0 = Instant::now();
    let child = Command::new(&bin)
        .arg("epp")
        .args(["--listen-address", "127.0.0.1"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &health.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .arg("--pool-file")
        .arg(&pool)
        .args(&a.extra)
        .env("INFERGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("epp.log"))?)
        .spawn()?;
    let pid = child.id();
    let epp = Epp(child);
    let grpc_addr: SocketAddr = ([127, 0, 0, 1], grpc).into();
    wait_for_port(grpc_addr, Duration::from_secs(20)).await?;
    println!(
        "epp_memory: {} endpoints, page {} ({} B), picker pid {pid}, extra flags {:?}, ready after {:.2} s",
        a.endpoints,
        a.page,
        page.len(),
        a.extra,
        t0.elapsed().as_secs_f64()
    );

    let envoy = if a.requests > 0 {
        Some(
            Envoy::start(
                EnvoyConfig::new()
                    .ext_proc(grpc_addr)
                    .pool(addrs.iter().copied()),
            )
            .await?,
        )
    } else {
        None
    };
    let start = Sample {
        at: Duration::ZERO,
        rss_kb: 0,
        hwm_kb: 0,
        cpu: 0.0,
        own_cpu: cpu_seconds("self").unwrap_or(0.0),
        scrapes: 0,
        posts: 0,
    };
    tokio::time::sleep_until((t0 + Duration::from_secs_f64(a.first_sample)).into()).await;
    let s1 = sample(pid, t0, &counters);
    report("0..first", &start, &s1, a.endpoints);

    let mut failed = 0usize;
    if let Some(envoy) = &envoy {
        let client = HttpClient::new();
        let url = envoy.url();
        let mut tasks = Vec::new();
        for i in 0..a.requests {
            let at =
                t0 + Duration::from_secs_f64(a.first_sample) + Duration::from_millis(20 * i as u64);
            if at > t0 + Duration::from_secs_f64(a.secs - 0.5) {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                matches!(
                    tokio::time::timeout(
                        Duration::from_secs(10),
                        client.post_json(&url, "/v1/completions", &[], mk_body(i))
                    )
                    .await,
                    Ok(Ok((s, _, _))) if s == 200
                )
            }));
        }
        for t in tasks {
            if !t.await.unwrap_or(false) {
                failed += 1;
            }
        }
    }
    tokio::time::sleep_until((t0 + Duration::from_secs_f64(a.secs)).into()).await;
    let s2 = sample(pid, t0, &counters);
    report("first..end", &s1, &s2, a.endpoints);
    println!(
        "picker threads {}; requests through Envoy: {} answered by the fake servers, {} failed",
        threads(pid).unwrap_or(0),
        s2.posts,
        failed
    );
    if let Ok(log) = std::fs::read_to_string(dir.join("epp.log")) {
        let lines: Vec<&str> = log.lines().collect();
        if !lines.is_empty() {
            println!(
                "picker log: {} lines; last: {}",
                lines.len(),
                lines[lines.len() - 1]
            );
        }
    }
    drop(envoy);
    drop(epp);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
