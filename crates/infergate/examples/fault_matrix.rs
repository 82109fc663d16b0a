//! A scripted, repeatable fault matrix (issue 7, part 3): what a client sees when a model
//! server or the router fails under steady load, for `infergate serve` and for
//! `infergate epp` behind Envoy.
//!
//! Per (mode, fault) everything is fresh: six `infergate sim` processes (one real-time
//! replica each, `llama3-8b-h100`, answers always `max_tokens` long) on their own ports, and
//! the router over them: `infergate serve --endpoints ...`, or `infergate epp --endpoints
//! ...` behind Envoy (fail closed unless the fault says otherwise; the pool as Envoy's
//! fallback cluster). With `--retry on` (the default) the picker returns 3 endpoints per
//! pick (the built-in profile with `maxNumOfEndpoints: 3`), Envoy routes picked requests
//! with the `override_host` policy over the pool and retries twice (connect failure,
//! refused stream, reset, 503) on the next endpoint, and a failed picker exchange is a 503
//! with a JSON body; `--retry off` is the earlier setup (an `ORIGINAL_DST` cluster, one
//! endpoint per pick, no retries, Envoy's 500). An open-loop client sends 10 streamed chat completions per second
//! (`max_tokens` 16) for `--secs` seconds; the fault is injected at a third of the run, on
//! the replicas that served the most requests so far (see `Rig::by_load`):
//! - `kill 2 replicas`: SIGKILL two sim processes;
//! - `hang 1 replica`: one replica accepts completions and never answers;
//! - `garbage /metrics`: one replica's `/metrics` answers 200 with random bytes;
//! - `drop streams`: one replica cuts every stream after 3 tokens;
//! - `restart router`: SIGKILL the router and start it again on the same ports (for epp,
//!   once with Envoy failing open and health-checking the picker, once failing closed);
//!   it stays down `--down-ms` (default 1000) first, as a supervisor's restart would.
//!
//! Per request it records the send time, the status (or the connection error), whether the
//! first chunk arrived and whether the stream ended with `data: [DONE]`. One row per
//! (mode, fault): sent, ok, lost (never started and not answered), cut (started, not
//! completed), errors by kind, and the time from the fault to the start of the first
//! 2-second window in which every request succeeded.
//!
//! ```sh
//! cargo build --release -p infergate --bin infergate --example fault_matrix
//! target/release/examples/fault_matrix [--mode serve|epp|both] [--secs 16]
//!     [--faults baseline,kill,hang,garbage,drop,restart] [--down-ms 1000] [--retry on|off]
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use infergate_testkit::envoy::{PickedCluster, RetryPolicy};
use infergate_testkit::{free_port, wait_for_port, Envoy, EnvoyConfig, HttpClient};

const REPLICAS: usize = 6;
const RATE_PER_SEC: f64 = 10.0;
const MAX_TOKENS: u32 = 16;
const MODEL: &str = "fm";
/// Every request gives up after this long, streaming included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A fault counts as recovered from at the start of a window this long where all succeeded.
const CLEAN_WINDOW: Duration = Duration::from_secs(2);
/// Endpoints per pick (primary plus fallbacks) with `--retry on`.
const ENDPOINTS_PER_PICK: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Serve,
    Epp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Baseline,
    KillTwo,
    Hang,
    GarbageMetrics,
    DropStreams,
    /// Kill the router and start it again; `fail_open` only matters behind Envoy.
    RestartRouter {
        fail_open: bool,
    },
}

impl Fault {
    fn label(self, mode: Mode) -> &'static str {
        match (self, mode) {
            (Fault::Baseline, _) => "baseline (no fault)",
            (Fault::KillTwo, _) => "kill 2 replicas",
            (Fault::Hang, _) => "hang 1 replica",
            (Fault::GarbageMetrics, _) => "garbage /metrics on 1",
            (Fault::DropStreams, _) => "1 drops streams @3 tok",
            (Fault::RestartRouter { .. }, Mode::Serve) => "restart serve",
            (Fault::RestartRouter { fail_open: true }, Mode::Epp) => "restart epp (fail-open)",
            (Fault::RestartRouter { fail_open: false }, Mode::Epp) => "restart epp (fail-closed)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Fault::Baseline => "baseline",
            Fault::KillTwo => "kill",
            Fault::Hang => "hang",
            Fault::GarbageMetrics => "garbage",
            Fault::DropStreams => "drop",
            Fault::RestartRouter { .. } => "restart",
        }
    }
}

/// A child process, killed (SIGKILL, by its PID) and reaped when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child,
            name: name.to_owned(),
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// An error naming the process when it has already exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited early with {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The router under test and how to start it again on the same ports.
enum Router {
    Serve {
        proc: Proc,
        addr: SocketAddr,
    },
    Epp {
        proc: Proc,
        ports: [u16; 3],
        envoy: Envoy,
    },
}

/// One (mode, fault) setup: the replicas, the router and a folder for logs.
struct Rig {
    /// First, so that it is dropped (killed) before the replicas and logs no scrape errors
    /// about them at teardown.
    router: Router,
    bin: PathBuf,
    dir: PathBuf,
    sims: Vec<Proc>,
    replicas: Vec<SocketAddr>,
    restarts: u32,
    /// How long the router stays down when restarted.
    down: Duration,
    /// The picker's `--config-file`, when it is not the built-in profile.
    epp_config: Option<PathBuf>,
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(dir.join(name)).with_context(|| format!("creating {name}"))
}

fn endpoints_arg(replicas: &[SocketAddr]) -> String {
    let list: Vec<String> = replicas.iter().map(SocketAddr::to_string).collect();
    list.join(",")
}

fn start_serve(
    bin: &Path,
    dir: &Path,
    port: u16,
    replicas: &[SocketAddr],
    n: u32,
) -> anyhow::Result<Proc> {
    Proc::spawn(
        "infergate serve",
        Command::new(bin)
            .arg("serve")
            .args(["--port", &port.to_string()])
            .args(["--endpoints", &endpoints_arg(replicas)])
            .args(["--seed", "1"])
            .env("INFERGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file(dir, &format!("serve-{n}.log"))?),
    )
}

fn start_epp(
    bin: &Path,
    dir: &Path,
    ports: [u16; 3],
    replicas: &[SocketAddr],
    config: Option<&Path>,
    n: u32,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.args(["epp", "--listen-address", "127.0.0.1"])
        .args(["--grpc-port", &ports[0].to_string()])
        .args(["--grpc-health-port", &ports[1].to_string()])
        .args(["--metrics-port", &ports[2].to_string()])
        .args(["--endpoints", &endpoints_arg(replicas)])
        .args(["--seed", "1"]);
    if let Some(config) = config {
        cmd.arg("--config-file").arg(config);
    }
    Proc::spawn(
        "infergate epp",
        cmd.env("INFERGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file(dir, &format!("epp-{n}.log"))?),
    )
}

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

impl Rig {
    async fn start(
        bin: &Path,
        root: &Path,
        mode: Mode,
        fault: Fault,
        down: Duration,
        retry: bool,
    ) -> anyhow::Result<Rig> {
        let dir = root.join(format!(
            "{mode:?}-{}",
            fault.label(mode).replace([' ', '/', '(', ')', '@'], "_")
        ));
        std::fs::create_dir_all(&dir)?;
        let mut sims = Vec::new();
        let mut replicas = Vec::new();
        for i in 0..REPLICAS {
            let port = free_port();
            sims.push(Proc::spawn(
                &format!("sim {i}"),
                Command::new(bin)
                    .args(["sim", "--replicas", "1", "--port", &port.to_string()])
                    .args(["--profile", "llama3-8b-h100", "--time-scale", "1"])
                    .args(["--served-model-name", MODEL, "--eos", "never"])
                    .args(["--seed", &i.to_string()])
                    .env("INFERGATE_LOG", "error")
                    .stdout(Stdio::null())
                    .stderr(log_file(&dir, &format!("sim-{i}.log"))?),
            )?);
            replicas.push(local(port));
        }
        for (sim, addr) in sims.iter_mut().zip(&replicas) {
            wait_for_port(*addr, Duration::from_secs(20)).await?;
            sim.check_alive()?;
        }
        let mut epp_config = None;
        let router = match mode {
            Mode::Serve => {
                let port = free_port();
                let mut proc = start_serve(bin, &dir, port, &replicas, 0)?;
                wait_for_port(local(port), Duration::from_secs(20)).await?;
                proc.check_alive()?;
                Router::Serve {
                    proc,
                    addr: local(port),
                }
            }
            Mode::Epp => {
                let ports = [free_port(), free_port(), free_port()];
                if retry {
                    // The built-in profile, its picker returning fallback endpoints too.
                    let yaml = infergate_api::config::INFERGATE_PROFILE_YAML.replacen(
                        "- type: max-score-picker\n",
                        &format!(
                            "- type: max-score-picker\n  parameters: {{maxNumOfEndpoints: {ENDPOINTS_PER_PICK}}}\n"
                        ),
                        1,
                    );
                    anyhow::ensure!(
                        yaml.contains("maxNumOfEndpoints"),
                        "the built-in profile has no max-score-picker line to extend"
                    );
                    let path = dir.join("picker.yaml");
                    std::fs::write(&path, yaml)?;
                    epp_config = Some(path);
                }
                let mut proc = start_epp(bin, &dir, ports, &replicas, epp_config.as_deref(), 0)?;
                wait_for_port(local(ports[0]), Duration::from_secs(20)).await?;
                proc.check_alive()?;
                let fail_open = fault == Fault::RestartRouter { fail_open: true };
                let mut cfg = EnvoyConfig::new()
                    .ext_proc(local(ports[0]))
                    .failure_mode_allow(fail_open)
                    .ext_proc_health_check(fail_open.then_some(Duration::from_millis(200)))
                    .pool(replicas.iter().copied());
                cfg = if retry {
                    cfg.picked_cluster(PickedCluster::OverrideHost)
                        .retry_policy(Some(RetryPolicy::default()))
                        .status_on_error(503)
                } else {
                    cfg.picked_cluster(PickedCluster::OriginalDst)
                        .retry_policy(None)
                };
                let envoy = Envoy::start(cfg).await?;
                Router::Epp { proc, ports, envoy }
            }
        };
        // Let the first scrapes land.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        Ok(Rig {
            router,
            bin: bin.to_owned(),
            dir,
            sims,
            replicas,
            restarts: 0,
            down,
            epp_config,
        })
    }

    fn url(&self) -> String {
        match &self.router {
            Router::Serve { addr, .. } => format!("http://{addr}"),
            Router::Epp { envoy, .. } => envoy.url(),
        }
    }

    /// Kills the router, waits `self.down` (a supervisor's restart delay) and starts it
    /// again on the same ports; returns how long until the new one accepted connections.
    async fn restart_router(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.restarts += 1;
        match &mut self.router {
            Router::Serve { proc, addr } => {
                proc.kill();
                tokio::time::sleep(self.down).await;
                *proc = start_serve(
                    &self.bin,
                    &self.dir,
                    addr.port(),
                    &self.replicas,
                    self.restarts,
                )?;
                wait_for_port(*addr, Duration::from_secs(20)).await?;
            }
            Router::Epp { proc, ports, .. } => {
                proc.kill();
                tokio::time::sleep(self.down).await;
                *proc = start_epp(
                    &self.bin,
                    &self.dir,
                    *ports,
                    &self.replicas,
                    self.epp_config.as_deref(),
                    self.restarts,
                )?;
                wait_for_port(local(ports[0]), Duration::from_secs(20)).await?;
            }
        }
        Ok(t.elapsed())
    }

    /// Merges `patch` into the faults of replica `i` (`POST /admin/faults`).
    async fn set_faults(&self, i: usize, patch: serde_json::Value) -> anyhow::Result<()> {
        let url = format!("http://{}", self.replicas[i]);
        let (status, _, body) = tokio::time::timeout(
            Duration::from_secs(2),
            HttpClient::new().post_json(&url, "/admin/faults", &[], patch.to_string()),
        )
        .await
        .context("POST /admin/faults timed out")??;
        anyhow::ensure!(
            status == 200,
            "POST /admin/faults on {url}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        Ok(())
    }

    /// Replica indexes by requests served so far (finished plus running, from each one's
    /// `/metrics`), busiest first. The faults hit the busiest replicas: at light load the
    /// router may send nearly everything to one, and a fault on an idle replica shows
    /// nothing, so this keeps the rows comparable from run to run.
    async fn by_load(&self) -> (Vec<usize>, Vec<u64>) {
        let http = HttpClient::new();
        let mut served = Vec::new();
        for addr in &self.replicas {
            let url = format!("http://{addr}");
            let text = match tokio::time::timeout(
                Duration::from_secs(1),
                http.get(&url, "/metrics"),
            )
            .await
            {
                Ok(Ok((_, _, body))) => String::from_utf8_lossy(&body).into_owned(),
                _ => String::new(),
            };
            let n: f64 = text
                .lines()
                .filter(|l| {
                    l.starts_with("vllm:request_success_total")
                        || l.starts_with("vllm:num_requests_running")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            served.push(n as u64);
        }
        let mut order: Vec<usize> = (0..served.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(served[i]));
        (order, served)
    }

    /// Injects `fault`; returns a note for the report (empty when nothing to say).
    async fn inject(&mut self, fault: Fault) -> anyhow::Result<String> {
        let (order, served) = self.by_load().await;
        let on = |k: usize| -> String {
            let who: Vec<String> = order[..k]
                .iter()
                .map(|&i| format!("replica {i} ({} served)", served[i]))
                .collect();
            let total: u64 = served.iter().sum();
            format!("fault on the busiest: {} of {total}", who.join(", "))
        };
        match fault {
            Fault::Baseline => {}
            Fault::KillTwo => {
                self.sims[order[0]].kill();
                self.sims[order[1]].kill();
                return Ok(on(2));
            }
            Fault::Hang => {
                self.set_faults(order[0], serde_json::json!({"hang": true}))
                    .await?;
                return Ok(on(1));
            }
            Fault::GarbageMetrics => {
                self.set_faults(order[0], serde_json::json!({"metrics": "garbage"}))
                    .await?;
                return Ok(on(1));
            }
            Fault::DropStreams => {
                self.set_faults(order[0], serde_json::json!({"drop_after_tokens": 3}))
                    .await?;
                return Ok(on(1));
            }
            Fault::RestartRouter { .. } => {
                let took = self.restart_router().await?;
                return Ok(format!(
                    "router listening again {:.0} ms after the kill",
                    took.as_secs_f64() * 1e3
                ));
            }
        }
        Ok(String::new())
    }
}

/// What one request saw.
#[derive(Default)]
struct Rec {
    sent: Duration,
    status: Option<u16>,
    /// The first chunk of a 200 arrived.
    started: bool,
    /// The stream ended with `data: [DONE]`.
    done: bool,
    /// How it failed, when it did.
    kind: String,
    msg: String,
}

impl Rec {
    fn ok(&self) -> bool {
        self.status == Some(200) && self.done
    }
}

fn snippet(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim().replace('\n', " ");
    let mut out: String = s.chars().take(200).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

async fn stream_one(http: &HttpClient, url: &str, i: u64, rec: &mut Rec) {
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("request {i}: tell me something short")}],
        "max_tokens": MAX_TOKENS,
        "stream": true,
    })
    .to_string();
    let (status, _, mut stream) = match http
        .post_json_stream(url, "/v1/chat/completions", &[], body)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            rec.kind = "connection error".into();
            rec.msg = format!("{e:#}");
            return;
        }
    };
    rec.status = Some(status.as_u16());
    let mut text = Vec::new();
    while let Some(chunk) = stream.next_chunk().await {
        match chunk {
            Ok(b) => {
                rec.started |= status == 200;
                text.extend_from_slice(&b);
            }
            Err(e) => {
                rec.kind = if rec.started {
                    "stream cut (body error)".into()
                } else {
                    format!("http {} then body error", status.as_u16())
                };
                rec.msg = format!("{e:#}");
                return;
            }
        }
    }
    if status != 200 {
        rec.kind = format!("http {}", status.as_u16());
        rec.msg = snippet(&text);
    } else if text.windows(12).any(|w| w == b"data: [DONE]") {
        rec.done = true;
    } else if rec.started {
        rec.kind = "stream ended without [DONE]".into();
        let text = String::from_utf8_lossy(&text);
        let last = text.trim_end().rsplit("\n\n").next().unwrap_or_default();
        rec.msg = snippet(last.as_bytes());
    } else {
        rec.kind = "200 with empty body".into();
    }
}

async fn request(http: HttpClient, url: String, i: u64, sent: Duration) -> Rec {
    let mut rec = Rec {
        sent,
        ..Rec::default()
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, stream_one(&http, &url, i, &mut rec))
        .await
        .is_err()
    {
        rec.kind = match (rec.started, rec.status) {
            (true, _) => "timeout after first chunk",
            (false, Some(_)) => "timeout after headers",
            (false, None) => "timeout before response",
        }
        .into();
        rec.msg = format!("no end within {REQUEST_TIMEOUT:?}");
    }
    rec
}

/// One printed row and its details.
struct Row {
    mode: Mode,
    fault: Fault,
    sent: usize,
    ok: usize,
    lost: usize,
    cut: usize,
    /// kind -> (count, first message)
    errors: BTreeMap<String, (usize, String)>,
    recover: String,
    note: String,
}

/// From `fault_at` to the start of the first `CLEAN_WINDOW` (ending before `end`) whose
/// requests all succeeded.
fn recovery(recs: &[Rec], fault_at: Duration, end: Duration) -> Option<Duration> {
    let mut starts: Vec<Duration> = vec![fault_at];
    starts.extend(recs.iter().map(|r| r.sent).filter(|s| *s >= fault_at));
    starts.sort();
    starts.into_iter().find_map(|t| {
        if t + CLEAN_WINDOW > end {
            return None;
        }
        let mut window = recs
            .iter()
            .filter(|r| r.sent >= t && r.sent < t + CLEAN_WINDOW);
        let mut any = false;
        window
            .all(|r| {
                any = true;
                r.ok()
            })
            .then_some(())
            .filter(|_| any)
            .map(|_| t - fault_at)
    })
}

async fn run_one(
    bin: &Path,
    root: &Path,
    mode: Mode,
    fault: Fault,
    secs: f64,
    down: Duration,
    retry: bool,
) -> anyhow::Result<Row> {
    let mut rig = Rig::start(bin, root, mode, fault, down, retry).await?;
    let url = rig.url();
    let total = Duration::from_secs_f64(secs);
    let fault_at = total / 3;
    let n = (secs * RATE_PER_SEC).round() as u64;
    let gap = Duration::from_secs_f64(1.0 / RATE_PER_SEC);
    let t0 = Instant::now();
    let http = HttpClient::new();
    let load = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            tokio::time::sleep_until((t0 + gap * i as u32).into()).await;
            set.spawn(request(http.clone(), url.clone(), i, t0.elapsed()));
        }
        set
    });
    tokio::time::sleep_until((t0 + fault_at).into()).await;
    let injected_at = t0.elapsed();
    let note = match rig.inject(fault).await {
        Ok(note) => note,
        Err(e) => format!("injecting the fault failed: {e:#}"),
    };
    let mut set = load.await?;
    let mut recs = Vec::new();
    // Requests end by themselves within REQUEST_TIMEOUT; this only bounds a stuck task.
    let drain = tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), async {
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                recs.push(r);
            }
        }
    })
    .await;
    if drain.is_err() {
        set.abort_all();
    }
    recs.sort_by_key(|r| r.sent);
    let mut errors: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for r in recs.iter().filter(|r| !r.ok()) {
        let e = errors.entry(r.kind.clone()).or_insert((0, r.msg.clone()));
        e.0 += 1;
    }
    let failed_sent: Vec<f64> = recs
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.sent.as_secs_f64() - injected_at.as_secs_f64())
        .collect();
    let mut note = note;
    if let (Some(first), Some(last)) = (failed_sent.first(), failed_sent.last()) {
        if !note.is_empty() {
            note.push_str("; ");
        }
        note.push_str(&format!(
            "failed requests were sent from {first:+.1} s to {last:+.1} s after the fault"
        ));
    }
    if let Router::Epp { envoy, .. } = &rig.router {
        // What Envoy's retries did, over both routes' clusters.
        let stats = envoy.stats("upstream_rq_retry").await.unwrap_or_default();
        let sum = |name: &str| -> u64 {
            stats
                .lines()
                .filter(|l| {
                    l.split(':')
                        .next()
                        .is_some_and(|n| n.trim().ends_with(name) && !n.contains("ext_proc"))
                })
                .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
                .sum()
        };
        let (retries, succeeded, overflow) = (
            sum(".upstream_rq_retry"),
            sum(".upstream_rq_retry_success"),
            sum(".upstream_rq_retry_overflow"),
        );
        if retries + overflow > 0 {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(&format!(
                "Envoy retried {retries} time(s), {succeeded} succeeded, {overflow} refused by the retry circuit breaker"
            ));
        }
    }
    let recover = if fault == Fault::Baseline {
        "-".to_owned()
    } else {
        match recovery(&recs, injected_at, total) {
            Some(d) => format!("{:.1} s", d.as_secs_f64()),
            None => "not recovered".to_owned(),
        }
    };
    let row = Row {
        mode,
        fault,
        sent: n as usize,
        ok: recs.iter().filter(|r| r.ok()).count(),
        lost: recs.iter().filter(|r| !r.ok() && !r.started).count() + (n as usize - recs.len()),
        cut: recs.iter().filter(|r| !r.ok() && r.started).count(),
        errors,
        recover,
        note,
    };
    drop(rig);
    Ok(row)
}

fn print_table(rows: &[Row], failed: &[(Mode, Fault, String)]) {
    println!(
        "{:<6} {:<26} {:>5} {:>5} {:>5} {:>5}  {:<14} errors",
        "mode", "fault", "sent", "ok", "lost", "cut", "recover"
    );
    for r in rows {
        let errs: Vec<String> = r
            .errors
            .iter()
            .map(|(k, (n, _))| format!("{k} x{n}"))
            .collect();
        println!(
            "{:<6} {:<26} {:>5} {:>5} {:>5} {:>5}  {:<14} {}",
            format!("{:?}", r.mode).to_lowercase(),
            r.fault.label(r.mode),
            r.sent,
            r.ok,
            r.lost,
            r.cut,
            r.recover,
            if errs.is_empty() {
                "-".to_owned()
            } else {
                errs.join("; ")
            }
        );
    }
    for (mode, fault, e) in failed {
        println!(
            "{:<6} {:<26} setup failed: {e}",
            format!("{mode:?}").to_lowercase(),
            fault.label(*mode)
        );
    }
    println!("\nfirst error message per kind:");
    for r in rows {
        let who = format!("{:?} / {}", r.mode, r.fault.label(r.mode)).to_lowercase();
        if !r.note.is_empty() {
            println!("  {who}: note: {}", r.note);
        }
        for (k, (_, msg)) in &r.errors {
            println!("  {who}: {k}: {msg}");
        }
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let modes = match arg("--mode").as_deref().unwrap_or("both") {
        "serve" => vec![Mode::Serve],
        "epp" => vec![Mode::Epp],
        "both" => vec![Mode::Serve, Mode::Epp],
        other => anyhow::bail!("--mode {other:?}: expected serve, epp or both"),
    };
    let secs: f64 = match arg("--secs") {
        Some(s) => s
            .parse()
            .with_context(|| format!("--secs {s:?}: expected seconds"))?,
        None => 16.0,
    };
    anyhow::ensure!(
        secs >= 6.0,
        "--secs {secs}: at least 6, for a fault and a 2 s window after it"
    );
    let down = Duration::from_millis(match arg("--down-ms") {
        Some(s) => s
            .parse()
            .with_context(|| format!("--down-ms {s:?}: expected milliseconds"))?,
        None => 1000,
    });
    let retry = match arg("--retry").as_deref().unwrap_or("on") {
        "on" => true,
        "off" => false,
        other => anyhow::bail!("--retry {other:?}: expected on or off"),
    };
    let only: Option<Vec<String>> =
        arg("--faults").map(|s| s.split(',').map(str::to_owned).collect());
    let bin = infergate_testkit::release_infergate()?;
    let root = std::env::temp_dir().join(format!("fault_matrix-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let started = Instant::now();
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for mode in modes {
        let mut faults = vec![
            Fault::Baseline,
            Fault::KillTwo,
            Fault::Hang,
            Fault::GarbageMetrics,
            Fault::DropStreams,
        ];
        match mode {
            Mode::Serve => faults.push(Fault::RestartRouter { fail_open: false }),
            Mode::Epp => faults.extend([
                Fault::RestartRouter { fail_open: true },
                Fault::RestartRouter { fail_open: false },
            ]),
        }
        for fault in faults {
            if only
                .as_ref()
                .is_some_and(|o| !o.iter().any(|k| k == fault.key()))
            {
                continue;
            }
            eprintln!(
                "[{:>5.1} s] {mode:?}: {}",
                started.elapsed().as_secs_f64(),
                fault.label(mode)
            );
            match run_one(&bin, &root, mode, fault, secs, down, retry).await {
                Ok(row) => rows.push(row),
                Err(e) => failed.push((mode, fault, format!("{e:#}"))),
            }
        }
    }
    println!(
        "fault_matrix: {REPLICAS} sim replicas, {RATE_PER_SEC} req/s of streamed chat completions (max_tokens {MAX_TOKENS}) for {secs} s per row, fault at {:.1} s, request timeout {REQUEST_TIMEOUT:?}, router down {down:?} on restart; took {:.0} s",
        secs / 3.0,
        started.elapsed().as_secs_f64()
    );
    println!(
        "epp behind Envoy: {}\n",
        if retry {
            "--retry on: picker returns 3 endpoints per pick; override_host cluster, 2 retries (connect-failure, refused-stream, reset, 503) on the next endpoint; status_on_error 503 with a JSON body"
        } else {
            "--retry off: ORIGINAL_DST cluster, 1 endpoint per pick, no retries, Envoy's 500 on a failed picker exchange"
        }
    );
    print_table(&rows, &failed);
    println!("\nlogs (sims, router) in {}", root.display());
    Ok(())
}
