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
//!     [--response-body-none] [--floor] [--plaintext-picker]
//! ```
//!
//! The picker serves ext_proc over TLS (its default) and Envoy connects with TLS without
//! verification, as a gateway does; `--plaintext-picker` runs it with
//! `--secure-serving=false` behind a plaintext cluster instead, to show what TLS costs. The
//! trivial picker of `--floor` is always plaintext.
//!
//! `--response-body-none` sets the filter's response body mode to NONE (the picker still sees
//! response headers), to show what the response-body round trips cost.
//!
//! `--floor` adds two phases with the same load and bodies, to show the ext_proc floor in this
//! harness: (c) Envoy + a trivial ext_proc picker running in this process (request body
//! BUFFERED, response body NONE; request headers answered with an empty CONTINUE, the buffered
//! body with a fixed `x-gateway-destination-endpoint` and a cleared route cache; no parsing),
//! and (d) Envoy + the release `infergate epp` with exactly the same filter modes, so that
//! c and d differ only by the picker. Envoy always sends response headers to the processor
//! here; the trivial picker answers them with an empty HeadersResponse.
//!
//! `INFERGATE_BIN` overrides the picker binary (default `<target>/release/infergate`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, processing_response, BodyResponse, CommonResponse, HeaderMutation,
    HeadersResponse, ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use infergate_testkit::{
    envoy::DESTINATION_HEADER, free_port, wait_for_port, BodyMode, Envoy, EnvoyConfig,
    FakeModelServer, HttpClient,
};
use tokio::sync::Mutex;
use tokio_stream::wrappers::ReceiverStream;

struct Args {
    rate: f64,
    secs: f64,
    warmup_secs: f64,
    b_first: bool,
    response_body_none: bool,
    floor: bool,
    plaintext_picker: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        rate: 200.0,
        secs: 15.0,
        warmup_secs: 3.0,
        b_first: false,
        response_body_none: false,
        floor: false,
        plaintext_picker: false,
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
            "--floor" => a.floor = true,
            "--plaintext-picker" => a.plaintext_picker = true,
            other => anyhow::bail!(
                "unknown argument {other:?} (known: --rate R, --secs S, --warmup-secs S, --b-first, --response-body-none, --floor, --plaintext-picker)"
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

async fn start_epp(backend: SocketAddr, plaintext: bool) -> anyhow::Result<Epp> {
    let bin = infergate_testkit::release_infergate()?;
    let (grpc, health, metrics) = (free_port(), free_port(), free_port());
    let log = std::env::temp_dir().join(format!("envoy_overhead-epp-{}.log", std::process::id()));
    let child = Command::new(&bin)
        .arg("epp")
        .args(["--listen-address", "127.0.0.1"])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &health.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(["--endpoints", &backend.to_string()])
        .args(plaintext.then_some("--secure-serving=false"))
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

/// The floor picker of phase (c): every request goes to one fixed endpoint, nothing parsed.
/// Request headers get an empty CONTINUE; the (BUFFERED) request body gets the destination
/// header with a cleared route cache; anything else an empty answer of its kind.
#[derive(Clone)]
struct TrivialPicker {
    destination: Vec<u8>,
}

fn reply(response: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

impl TrivialPicker {
    fn body_reply(&self) -> ProcessingResponse {
        reply(processing_response::Response::RequestBody(BodyResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation {
                    set_headers: vec![HeaderValueOption {
                        header: Some(HeaderValue {
                            key: DESTINATION_HEADER.to_owned(),
                            raw_value: self.destination.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                clear_route_cache: true,
                ..Default::default()
            }),
        }))
    }
}

#[tonic::async_trait]
impl ExternalProcessor for TrivialPicker {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, tonic::Status>>;

    async fn process(
        &self,
        request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let picker = self.clone();
        tokio::spawn(async move {
            use processing_request::Request as In;
            use processing_response::Response as Out;
            while let Ok(Some(msg)) = inbound.message().await {
                let out = match msg.request {
                    Some(In::RequestHeaders(_)) => {
                        reply(Out::RequestHeaders(HeadersResponse::default()))
                    }
                    Some(In::RequestBody(_)) => picker.body_reply(),
                    Some(In::RequestTrailers(_)) => {
                        reply(Out::RequestTrailers(TrailersResponse::default()))
                    }
                    Some(In::ResponseHeaders(_)) => {
                        reply(Out::ResponseHeaders(HeadersResponse::default()))
                    }
                    Some(In::ResponseBody(_)) => reply(Out::ResponseBody(BodyResponse::default())),
                    Some(In::ResponseTrailers(_)) => {
                        reply(Out::ResponseTrailers(TrailersResponse::default()))
                    }
                    None => continue,
                };
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves [`TrivialPicker`] on 127.0.0.1 in this process; returns its gRPC address. Same
/// server settings as `infergate epp` (TCP_NODELAY via `serve`, fixed 4 MB stream and 16 MB
/// connection windows), so that only the picker differs.
async fn start_trivial_picker(destination: SocketAddr) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let picker = TrivialPicker {
        destination: destination.to_string().into_bytes(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .add_service(
                ExternalProcessorServer::new(picker).max_decoding_message_size(64 * 1024 * 1024),
            )
            .serve(addr),
    );
    wait_for_port(addr, Duration::from_secs(10)).await?;
    Ok(addr)
}

/// CPU seconds of a process, NaN when it cannot be read.
fn cpu_secs(pid: &str) -> f64 {
    infergate_testkit::procstat::cpu_seconds(pid).unwrap_or(f64::NAN)
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

/// One path under test: its letter (a, b, c, d), what it is, its Envoy and the process that
/// does the picking (for the CPU column; "self" for the in-process trivial picker).
struct Path {
    letter: char,
    label: &'static str,
    envoy: Envoy,
    picker_pid: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let backend = Arc::new(FakeModelServer::start("b0").await?);
    let epp = start_epp(backend.addr(), a.plaintext_picker).await?;
    // Envoy's side of the picker connection, as the picker serves it.
    let to_picker = |cfg: EnvoyConfig| {
        if a.plaintext_picker {
            cfg.ext_proc_plaintext()
        } else {
            cfg
        }
    };
    let epp_pid = epp.child.id().to_string();
    let mut paths = vec![
        Path {
            letter: 'a',
            label: "a envoy direct",
            envoy: Envoy::start(EnvoyConfig::new().without_ext_proc().pool([backend.addr()]))
                .await?,
            picker_pid: epp_pid.clone(),
        },
        Path {
            letter: 'b',
            label: "b envoy+epp",
            envoy: Envoy::start(
                to_picker(EnvoyConfig::new())
                    .ext_proc(epp.grpc)
                    .request_body_mode(BodyMode::FullDuplexStreamed)
                    .response_body_mode(if a.response_body_none {
                        BodyMode::None
                    } else {
                        BodyMode::FullDuplexStreamed
                    })
                    .pool([backend.addr()]),
            )
            .await?,
            picker_pid: epp_pid.clone(),
        },
    ];
    if a.b_first {
        paths.swap(0, 1);
    }
    if a.floor {
        let trivial = start_trivial_picker(backend.addr()).await?;
        let buffered = || {
            EnvoyConfig::new()
                .request_body_mode(BodyMode::Buffered)
                .response_body_mode(BodyMode::None)
                .pool([backend.addr()])
        };
        paths.push(Path {
            letter: 'c',
            label: "c envoy+trivial (BUF)",
            envoy: Envoy::start(buffered().ext_proc(trivial).ext_proc_plaintext()).await?,
            picker_pid: "self".to_string(),
        });
        paths.push(Path {
            letter: 'd',
            label: "d envoy+epp (BUF)",
            envoy: Envoy::start(to_picker(buffered()).ext_proc(epp.grpc)).await?,
            picker_pid: epp_pid.clone(),
        });
    }
    let client = HttpClient::new();
    let envoy_pids: Vec<String> = paths
        .iter()
        .map(|p| format!("{}={}", p.letter, p.envoy.pid()))
        .collect();
    println!(
        "envoy_overhead: rate {} req/s, {} s per phase after {} s warm-up, order {}, (b) response body mode {}; picker pid {}, envoy pids {}",
        a.rate,
        a.secs,
        a.warmup_secs,
        paths.iter().map(|p| p.letter.to_string()).collect::<Vec<_>>().join(","),
        if a.response_body_none { "NONE" } else { "FULL_DUPLEX_STREAMED" },
        epp_pid,
        envoy_pids.join(" "),
    );
    // Check every path really routes, and that only (a) skipped a picker: the pickers set the
    // destination header, which Envoy forwards upstream.
    for p in &paths {
        backend.clear_requests();
        let (status, headers, _) = client
            .post_json(
                &p.envoy.url(),
                "/v1/completions",
                &[],
                small_bodies()[0].clone(),
            )
            .await?;
        anyhow::ensure!(status == 200, "path {} answered {status}", p.letter);
        anyhow::ensure!(
            headers.get("x-served-by").is_some(),
            "path {}: no x-served-by",
            p.letter
        );
        let dest = backend
            .requests()
            .last()
            .and_then(|r| r.header(DESTINATION_HEADER).map(str::to_owned));
        anyhow::ensure!(
            dest.is_some() == (p.letter != 'a'),
            "path {}: destination header upstream: {dest:?}",
            p.letter
        );
    }
    // The fake server records every request; forget them so 220 KB bodies do not pile up.
    let recorder = {
        let b = backend.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                b.clear_requests();
            }
        })
    };
    println!(
        "{:<34} {:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8}   CPU% picker/envoy/client+server",
        "phase", "ok", "err", "req/s", "p50 ms", "p90 ms", "p99 ms", "mean ms",
    );
    for (size, bodies) in [
        ("small ~200 B", small_bodies()),
        ("large ~220 KB", large_bodies()),
    ] {
        let mut p50 = [f64::NAN; 4];
        for p in &paths {
            let pids = [
                p.picker_pid.clone(),
                p.envoy.pid().to_string(),
                "self".to_string(),
            ];
            let url = p.envoy.url();
            if a.warmup_secs > 0.0 {
                run_phase(&client, &url, &bodies, a.rate, a.warmup_secs, pids.clone()).await;
            }
            let ph = run_phase(&client, &url, &bodies, a.rate, a.secs, pids).await;
            print_row(&format!("{size}, {}", p.label), &ph);
            p50[(p.letter as u8 - b'a') as usize] = ph.q(0.5);
        }
        if a.floor {
            println!(
                "{:<34} added median: c - a {:.3} ms, d - a {:.3} ms, b - a {:.3} ms",
                size,
                p50[2] - p50[0],
                p50[3] - p50[0],
                p50[1] - p50[0]
            );
        } else {
            println!(
                "{:<34} added median (b - a): {:.3} ms",
                size,
                p50[1] - p50[0]
            );
        }
    }
    for p in paths.iter().filter(|p| p.letter != 'a') {
        let stats = p.envoy.stats("ext_proc").await.unwrap_or_default();
        let interesting: Vec<&str> = stats
            .lines()
            .filter(|l| {
                l.contains("streams_started")
                    || l.contains("streams_failed")
                    || l.contains("failure_mode_allowed")
                    || l.contains("message_timeouts")
            })
            .collect();
        println!(
            "envoy ({}) ext_proc stats: {}",
            p.letter,
            interesting.join("; ")
        );
    }
    recorder.abort();
    drop(paths);
    drop(epp);
    Ok(())
}
