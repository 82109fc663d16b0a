//! Open-loop load on a running `infergate sim` (many replicas on consecutive ports), to
//! measure whether one process keeps up in real time and what it costs in CPU.
//!
//! ```text
//! infergate sim --port 18000 --replicas 64 &
//! cargo run --release -p infergate-sim --example realtime_load -- \
//!     --port 18000 --replicas 64 --rate 1000 --seconds 30 --pid $!
//! ```
//!
//! Sends streaming completions (token-id prompts of `--input` tokens, `--output` tokens with
//! `ignore_eos`) as a Poisson process spread round-robin over the replicas. Prints what the
//! clients saw (TTFT, time per output token, throughput, errors), what the replicas report
//! (their TTFT histograms and the driver's lag figures) and the simulator's CPU use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infergate_testkit::procstat::cpu_seconds;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug)]
struct Args {
    port: u16,
    replicas: u16,
    rate: f64,
    seconds: f64,
    input: u32,
    output: u32,
    pid: Option<u32>,
    stream: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        port: 18000,
        replicas: 64,
        rate: 1000.0,
        seconds: 30.0,
        input: 230,
        output: 200,
        pid: None,
        stream: true,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = || argv.get(i + 1).expect("flag needs a value").clone();
        match argv[i].as_str() {
            "--port" => a.port = v().parse().expect("port"),
            "--replicas" => a.replicas = v().parse().expect("replicas"),
            "--rate" => a.rate = v().parse().expect("rate"),
            "--seconds" => a.seconds = v().parse().expect("seconds"),
            "--input" => a.input = v().parse().expect("input"),
            "--output" => a.output = v().parse().expect("output"),
            "--pid" => a.pid = Some(v().parse().expect("pid")),
            "--no-stream" => {
                a.stream = false;
                i += 1;
                continue;
            }
            other => panic!("unknown flag {other}"),
        }
        i += 2;
    }
    a
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
    tokens: AtomicU64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let a = parse_args();
    // One worker: the load generator shares the machine with the simulator it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(conn);
    let base = |i: u16| format!("http://127.0.0.1:{}", a.port + i);

    let models = client
        .get(format!("{}/v1/models", base(0)).parse().unwrap())
        .await
        .expect("the simulator answers /v1/models");
    let body = models.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let model = v["data"][0]["id"].as_str().expect("a model").to_owned();

    let prompt: Vec<u32> = (0..a.input.max(2)).map(|i| 1000 + i).collect();
    let run_salt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tally = Arc::new(Tally::default());
    let samples = Arc::new(parking_lot::Mutex::new(Vec::<(f64, f64)>::new()));
    let before = replica_figures(&client, &base, a.replicas).await;
    let cpu0 = a.pid.and_then(|p| cpu_seconds(&p.to_string()));
    let start = Instant::now();
    let mut rng = SmallRng::seed_from_u64(1);
    let mut t = 0.0;
    let mut n = 0u64;
    let mut tasks = Vec::new();
    while t < a.seconds {
        t += -(1.0 - rng.random::<f64>()).ln() / a.rate;
        tokio::time::sleep_until((start + Duration::from_secs_f64(t)).into()).await;
        let replica = (n % a.replicas as u64) as u16;
        // Unique leading tokens so prompts hit neither each other's prefix cache nor that
        // of an earlier run against the same replicas.
        let mut p = prompt.clone();
        p[0] = n as u32;
        p[1] = run_salt;
        let body = serde_json::json!({
            "model": model, "prompt": p, "max_tokens": a.output, "ignore_eos": true,
            "stream": a.stream, "stream_options": {"include_usage": true},
        });
        let req = Request::post(format!("{}/v1/completions", base(replica)))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (client, tally, samples) = (client.clone(), tally.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let resp = match client.request(req).await {
                Ok(r) if r.status().is_success() => r,
                _ => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let mut body = resp.into_body();
            let mut first: Option<f64> = None;
            let mut events = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if let Some(d) = frame.data_ref() {
                    if first.is_none() {
                        first = Some(sent.elapsed().as_secs_f64());
                    }
                    events += d.windows(6).filter(|w| w == b"data: ").count() as u64;
                }
            }
            let total = sent.elapsed().as_secs_f64();
            let ttft = first.unwrap_or(total);
            tally.ok.fetch_add(1, Ordering::Relaxed);
            tally.tokens.fetch_add(events, Ordering::Relaxed);
            let tokens = events.saturating_sub(2).max(2) as f64;
            samples.lock().push((ttft, (total - ttft) / (tokens - 1.0)));
        }));
        n += 1;
    }
    let sent_for = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    for task in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, task).await;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (a.pid, cpu0) {
        (Some(pid), Some(c0)) => cpu_seconds(&pid.to_string()).map(|c1| (c1 - c0) / wall),
        _ => None,
    };

    let mut s = samples.lock().clone();
    let mut ttft: Vec<f64> = s.iter().map(|x| x.0).collect();
    let mut tpot: Vec<f64> = s.drain(..).map(|x| x.1).collect();
    println!(
        "load: {n} requests in {sent_for:.1} s ({:.0} req/s offered) to {} replicas, {} in / {} out, stream {}",
        n as f64 / sent_for,
        a.replicas,
        a.input,
        a.output,
        a.stream
    );
    println!(
        "clients: {} ok, {} errors, {} SSE events; TTFT p50 {:.1} ms p99 {:.1} ms; TPOT p50 {:.2} ms p99 {:.2} ms",
        tally.ok.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        tally.tokens.load(Ordering::Relaxed),
        pct(&mut ttft, 0.5) * 1e3,
        pct(&mut ttft, 0.99) * 1e3,
        pct(&mut tpot, 0.5) * 1e3,
        pct(&mut tpot, 0.99) * 1e3,
    );
    if let Some(c) = cpu {
        println!(
            "simulator CPU: {:.0}% of one core over {wall:.1} s",
            c * 100.0
        );
    }

    // What the replicas say about themselves, over this run only.
    let after = replica_figures(&client, &base, a.replicas).await;
    let d: Vec<f64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
    let (ttft_sum, ttft_n, lag_sum, steps, on_time, resyncs) = (d[0], d[1], d[2], d[3], d[4], d[5]);
    println!(
        "replicas: mean TTFT {:.1} ms (engine clock); {steps:.0} steps, mean wake-up lag {:.2} ms, {:.1}% of steps more than 5 ms late, {resyncs:.0} clock resyncs",
        ttft_sum / ttft_n.max(1.0) * 1e3,
        lag_sum / steps.max(1.0) * 1e3,
        (steps - on_time) / steps.max(1.0) * 100.0
    );
}

/// Sums over the replicas' `/metrics`: TTFT sum and count, wake-up lag sum and count, steps
/// at most 5 ms late, clock resyncs.
async fn replica_figures(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &dyn Fn(u16) -> String,
    replicas: u16,
) -> [f64; 6] {
    const SERIES: [&str; 6] = [
        "vllm:time_to_first_token_seconds_sum",
        "vllm:time_to_first_token_seconds_count",
        "infergate_sim_step_lag_seconds_sum",
        "infergate_sim_step_lag_seconds_count",
        "infergate_sim_step_lag_seconds_bucket{le=\"0.005\"}",
        "infergate_sim_lag_resyncs_total",
    ];
    let mut f = [0.0; 6];
    for i in 0..replicas {
        let Ok(r) = client
            .get(format!("{}/metrics", base(i)).parse().unwrap())
            .await
        else {
            continue;
        };
        let text = r.into_body().collect().await.unwrap().to_bytes();
        for line in String::from_utf8_lossy(&text).lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            // Labels other than `le` are dropped for the match: `name{..,le="x"}` -> `name{le="x"}`.
            let key = match name.split_once('{') {
                Some((n, labels)) => match labels.split(',').find(|l| l.starts_with("le=")) {
                    Some(le) => format!("{n}{{{}}}", le.trim_end_matches('}')),
                    None => n.to_owned(),
                },
                None => name.to_owned(),
            };
            if let Some(slot) = SERIES.iter().position(|s| *s == key) {
                f[slot] += value.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    f
}
