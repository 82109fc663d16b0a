//! What `infergate epp` adds to a request's latency behind a real Envoy.
//!
//! One fake vLLM server (testkit), and in the same run two Envoys in front of it:
//! (a) a plain proxy onto the pool (no ext_proc filter), and (b) Envoy with the ext_proc
//! filter (request and response bodies FULL_DUPLEX_STREAMED) calling the release
//! `infergate epp`. Open-loop constant arrivals (default 200 req/s, each request on its own
//! task, one pooled keep-alive client) for a fixed time per path, first with small
//! completions bodies (~200 B), then with ~220 KB prompts. Latency is from just before the
//! request is sent until the whole response has been read.
//!
//! ```sh
//! cargo build --release -p infergate --bin infergate --example envoy_overhead
//! target/release/examples/envoy_overhead [--rate 200] [--secs 15] [--warmup-secs 3] [--b-first]
//!     [--response-body-none]
//! ```
//!
//! `--response-body-none` sets the filter's response body mode to NONE (the picker still sees
//! response headers), to show what the response-body round trips cost.
//!
//! `INFERGATE_BIN` overrides the picker binary (default `<target>/release/infergate`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use infergate_testkit::{
    free_port, wait_for_port, BodyMode, Envoy, EnvoyConfig, FakeModelServer, HttpClient,
};
use tokio::sync::Mutex;

struct Args {
    rate: f64,
    secs: f64,
    warmup_secs: f64,
    b_first: bool,
    response_body_none: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        rate: 200.0,
        secs: 15.0,
        warmup_secs: 3.0,
        b_first: false,
        response_body_none: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || -> anyhow::Result<f64> {
            Ok(it
                .next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))?
                .parse()?)
        };
        match k.as_str() {
            "--rate" => a.rate = val()?,
            "--secs" => a.secs = val()?,
            "--warmup-secs" => a.warmup_secs = val()?,
            "--b-first" => a.b_first = true,
            "--response-body-none" => a.response_body_none = true,
            other => anyhow::bail!(
                "unknown argument {other:?} (known: --rate R, --secs S, --warmup-secs S, --b-first, --response-body-none)"
            ),
        }
    }
    // Bounded load, whatever is asked.
    a.rate = a.rate.clamp(1.0, 2_000.0);
    a.secs = a.secs.clamp(1.0, 120.0);
    a.warmup_secs = a.warmup_secs.clamp(0.0, 30.0);
    Ok(a)
}

/// The release picker, killed by PID when dropped.
struct Epp {
    child: Child,
    grpc: SocketAddr,
}

impl Drop for Epp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn infergate_bin() -> PathBuf {
    std::env::var_os("INFERGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| infergate_testkit::target_dir().join("release/infergate"))
}

async fn start_epp(backend: SocketAddr) -> anyhow::Result<Epp> {
    let bin = infergate_bin();
    anyhow::ensure!(
        bin.is_file(),
        "{} not found; build it with `cargo build --release -p infergate --bin infergate`",
        bin.display()
    );
    let (grpc, health, metrics) = (free_port(), free_port(), free_port());
    let log = std::env::temp_dir().join(format!("envoy_overhead-epp-{}.log", std::process::id()));
    let child = Command::new(&bin)
        .arg("epp")
        .args(["--listen-address", "127.0.0.1"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &health.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(["--endpoints", &backend.to_string()])
        .env("INFERGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let epp = Epp {
        child,
        grpc: ([127, 0, 0, 1], grpc).into(),
    };
    wait_for_port(epp.grpc, Duration::from_secs(20)).await?;
    // Let the first scrapes land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(epp)
}

/// utime + stime of a process in seconds (`/proc/<pid>/stat`, 100 ticks per second).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some(close) = text.rfind(')') else {
        return f64::NAN;
    };
    let f: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let tick = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // Field 3 (state) is index 0 here; utime and stime are fields 14 and 15.
    (tick(11) + tick(12)) / 100.0
}

/// Latencies (ms) of one phase plus its errors.
struct Phase {
    lat_ms: Vec<f64>,
    errors: usize,
    sent: usize,
    wall: Duration,
    /// CPU use over the phase, percent of one core: picker, the Envoy under test, this
    /// process (client and fake model server).
    cpu: [f64; 3],
}

impl Phase {
    fn q(&self, p: f64) -> f64 {
        if self.lat_ms.is_empty() {
            return f64::NAN;
        }
        self.lat_ms[((self.lat_ms.len() - 1) as f64 * p).round() as usize]
    }
}

/// Open-loop arrivals at `rate` for `secs`: one task per request, whatever is in flight.
async fn run_phase(
    client: &HttpClient,
    url: &str,
    bodies: &[Bytes],
    rate: f64,
    secs: f64,
    pids: [String; 3],
) -> Phase {
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_secs(p)).collect();
    let n = (rate * secs).round() as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let results = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(n);
    let start = Instant::now();
    // Absolute schedule, so a late tick does not shift the ones after it.
    for i in 0..n {
        tokio::time::sleep_until((start + period * i as u32).into()).await;
        let (client, url, body) = (
            client.clone(),
            url.to_string(),
            bodies[i % bodies.len()].clone(),
        );
        let (results, errors) = (results.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                client.post_json(&url, "/v1/completions", &[], body),
            )
            .await;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            match r {
                Ok(Ok((status, _, resp))) if status == 200 && !resp.is_empty() => {
                    results.lock().await.push(ms)
                }
                _ => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = start.elapsed();
    let mut cpu = [0.0; 3];
    for (i, p) in pids.iter().enumerate() {
        cpu[i] = 100.0 * (cpu_secs(p) - cpu0[i]) / wall.as_secs_f64();
    }
    let mut lat_ms = std::mem::take(&mut *results.lock().await);
    lat_ms.sort_by(f64::total_cmp);
    Phase {
        lat_ms,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        sent: n,
        wall,
        cpu,
    }
}

fn completion(prompt: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "model": "fake-model", "prompt": prompt, "max_tokens": 8,
        }))
        .expect("json"),
    )
}

/// ~200 B bodies, each prompt different.
fn small_bodies() -> Vec<Bytes> {
    (0..64)
        .map(|i| {
            completion(&format!(
                "Request {i:03}: summarise why a gateway should route by queue depth and prefix cache, briefly please, thanks."
            ))
        })
        .collect()
}

/// ~220 KB prompts; 16 distinct ones, cycled.
fn large_bodies() -> Vec<Bytes> {
    let text =
        "The quick brown fox jumps over the lazy dog while the model server warms its KV cache. ";
    (0..16)
        .map(|i| {
            let mut p = format!("Document {i}: ");
            while p.len() < 220_000 {
                p.push_str(text);
            }
            p.truncate(220_000);
            completion(&p)
        })
        .collect()
}

fn print_row(label: &str, p: &Phase) {
    println!(
        "{:<34} {:>6} {:>5} {:>8.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3}   {:>4.0}/{:>4.0}/{:>4.0}",
        label,
        p.lat_ms.len(),
        p.errors,
        p.sent as f64 / p.wall.as_secs_f64(),
        p.q(0.5),
        p.q(0.9),
        p.q(0.99),
        p.lat_ms.iter().sum::<f64>() / p.lat_ms.len().max(1) as f64,
        p.cpu[0],
        p.cpu[1],
        p.cpu[2],
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let backend = FakeModelServer::start("b0").await?;
    // The fake server records every request; forget them so 220 KB bodies do not pile up.
    let recorder = {
        let b = Arc::new(backend);
        let b2 = b.clone();
        (
            b,
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    b2.clear_requests();
                }
            }),
        )
    };
    let backend = recorder.0.clone();
    let epp = start_epp(backend.addr()).await?;
    let direct = Envoy::start(EnvoyConfig::new().without_ext_proc().pool([backend.addr()])).await?;
    let picked = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(epp.grpc)
            .request_body_mode(BodyMode::FullDuplexStreamed)
            .response_body_mode(if a.response_body_none {
                BodyMode::None
            } else {
                BodyMode::FullDuplexStreamed
            })
            .pool([backend.addr()]),
    )
    .await?;
    let client = HttpClient::new();
    println!(
        "envoy_overhead: rate {} req/s, {} s per phase after {} s warm-up, order {}, response body mode {}; picker pid {}, envoy pids a={} b={}",
        a.rate,
        a.secs,
        a.warmup_secs,
        if a.b_first { "b,a" } else { "a,b" },
        if a.response_body_none { "NONE" } else { "FULL_DUPLEX_STREAMED" },
        epp.child.id(),
        direct.pid(),
        picked.pid()
    );
    // Check both paths really route, and that (b) went through the picker.
    for (name, envoy) in [("a", &direct), ("b", &picked)] {
        let (status, headers, _) = client
            .post_json(
                &envoy.url(),
                "/v1/completions",
                &[],
                small_bodies()[0].clone(),
            )
            .await?;
        anyhow::ensure!(status == 200, "path {name} answered {status}");
        anyhow::ensure!(
            headers.get("x-served-by").is_some(),
            "path {name}: no x-served-by"
        );
    }
    println!(
        "{:<34} {:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8}   CPU% epp/envoy/client+server",
        "phase", "ok", "err", "req/s", "p50 ms", "p90 ms", "p99 ms", "mean ms",
    );
    for (size, bodies) in [
        ("small ~200 B", small_bodies()),
        ("large ~220 KB", large_bodies()),
    ] {
        let order: [(&str, &Envoy); 2] = if a.b_first {
            [("b envoy+epp", &picked), ("a envoy direct", &direct)]
        } else {
            [("a envoy direct", &direct), ("b envoy+epp", &picked)]
        };
        let mut p50 = [0.0; 2];
        for (label, envoy) in order {
            let pids = [
                epp.child.id().to_string(),
                envoy.pid().to_string(),
                "self".to_string(),
            ];
            if a.warmup_secs > 0.0 {
                run_phase(
                    &client,
                    &envoy.url(),
                    &bodies,
                    a.rate,
                    a.warmup_secs,
                    pids.clone(),
                )
                .await;
            }
            let p = run_phase(&client, &envoy.url(), &bodies, a.rate, a.secs, pids).await;
            print_row(&format!("{size}, {label}"), &p);
            p50[usize::from(label.starts_with('b'))] = p.q(0.5);
        }
        println!(
            "{:<34} added median (b - a): {:.3} ms",
            size,
            p50[1] - p50[0]
        );
    }
    let stats = picked.stats("ext_proc").await.unwrap_or_default();
    let interesting: Vec<&str> = stats
        .lines()
        .filter(|l| {
            l.contains("streams_started")
                || l.contains("streams_failed")
                || l.contains("failure_mode_allowed")
                || l.contains("message_timeouts")
        })
        .collect();
    println!("envoy (b) ext_proc stats: {}", interesting.join("; "));
    recorder.1.abort();
    drop(picked);
    drop(direct);
    drop(epp);
    Ok(())
}
