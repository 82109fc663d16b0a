//! `infergate bench scenario FILE`: one YAML file names a simulated pool, a workload, a QPS
//! sweep and the routers to compare; each router gets a fresh pool in turn, the same
//! requests (same seed), and a row per QPS stage in one combined report.
//!
//! In real time every piece is a process of its own on 127.0.0.1 (the replicas are one
//! `infergate sim` child, the router another, Envoy a third), started for that router only
//! and killed by PID before the next router starts. With `--virtual` the same scenario
//! runs on the simulator's virtual clock instead (no sockets), for the routers that exist
//! there.
//!
//! ```yaml
//! name: chat sweep            # optional, shown in the report title
//! replicas: 10
//! profile: llama3-8b-h100     # `infergate sim` profile (default llama3-8b-h100)
//! engine:                     # optional engine knobs, as `infergate sim` flags
//!   max_loras: 4
//! workload:                   # `infergate bench --workload` and its knobs
//!   kind: prefix              # chat | prefix | lora | long | priority
//!   system_len: 2000
//! qps: [2, 4, 8]
//! stage_seconds: 20
//! seed: 1                     # default 1
//! stream: true                # default true
//! timeout: 120                # seconds per request (default 300)
//! max_seconds: 300            # optional bound on each router's stages
//! routers: [round-robin, infergate-reference, infergate]
//! picker_config: |            # optional EndpointPickerConfig for `infergate` and
//!   apiVersion: ...           # `infergate-epp-envoy` (their `--config-file`)
//! ```
//!
//! In real time, the report also has, per stage, what the infergate routers (`serve`,
//! `epp`) did themselves: their resident memory (and Envoy's), sampled once per second,
//! and their scheduling latency from their own `/metrics` histogram (see
//! [`RouterStageStats`]).

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use infergate_bench::http::{self, HttpConfig, Progress};
use infergate_bench::report::{self, RouterStageStats, RunReport};
use infergate_bench::virtual_run::{self, VirtualPool};
use infergate_bench::workload::{RequestSpec, Stage};
use serde::Deserialize;

use crate::bench::{progress_bar, report_row, WorkloadArgs, WorkloadKind};

/// The routers a scenario can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterKind {
    /// Client-side round robin over the replicas (the Kubernetes Service baseline).
    RoundRobin,
    /// `infergate serve --profile reference`.
    InfergateReference,
    /// `infergate serve --profile infergate`.
    Infergate,
    /// `infergate epp` behind a real Envoy (full-duplex streamed bodies).
    InfergateEppEnvoy,
    /// sglang-router with `--policy cache_aware`.
    SglangCacheAware,
    /// vllm-router with `--policy cache_aware`.
    VllmCacheAware,
    /// vllm-router with `--policy power_of_two`.
    VllmPowerOfTwo,
}

pub const ROUTER_NAMES: [&str; 7] = [
    "round-robin",
    "infergate-reference",
    "infergate",
    "infergate-epp-envoy",
    "sglang-cache-aware",
    "vllm-cache-aware",
    "vllm-power-of-two",
];

impl RouterKind {
    pub fn name(self) -> &'static str {
        ROUTER_NAMES[self as usize]
    }

    fn parse(s: &str) -> anyhow::Result<RouterKind> {
        serde_yaml_ng::from_str::<RouterKind>(s.trim()).map_err(|_| {
            anyhow::anyhow!("unknown router {s:?}; known: {}", ROUTER_NAMES.join(", "))
        })
    }

    /// Whether the scenario's `picker_config` is passed to this router (`--config-file`).
    fn uses_picker_config(self) -> bool {
        matches!(self, RouterKind::Infergate | RouterKind::InfergateEppEnvoy)
    }

    fn is_peer(self) -> bool {
        matches!(
            self,
            RouterKind::SglangCacheAware | RouterKind::VllmCacheAware | RouterKind::VllmPowerOfTwo
        )
    }
}

/// Engine knobs of the simulated replicas, named as `infergate sim`'s flags.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineKnobs {
    pub max_loras: Option<u32>,
    pub max_cpu_loras: Option<u32>,
    pub max_num_seqs: Option<u32>,
    pub max_num_batched_tokens: Option<u32>,
    pub num_gpu_blocks: Option<u32>,
    pub block_size: Option<u32>,
    pub jitter: Option<f64>,
    pub lora_load_ms: Option<f64>,
    /// Simulated seconds per real second (real-time runs only).
    pub time_scale: Option<f64>,
}

fn default_profile() -> String {
    "llama3-8b-h100".into()
}
fn default_slowdown() -> f64 {
    2.0
}
fn default_seed() -> u64 {
    1
}
fn yes() -> bool {
    true
}

/// A scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub name: Option<String>,
    pub replicas: u16,
    #[serde(default = "default_profile")]
    pub profile: String,
    #[serde(default)]
    pub engine: EngineKnobs,
    /// A pool of mixed GPUs: this many of the replicas run `slowdown` times slower than the
    /// profile (in real time, a second `infergate sim` at `--time-scale 1/slowdown`).
    #[serde(default)]
    pub slow_replicas: u16,
    #[serde(default = "default_slowdown")]
    pub slowdown: f64,
    #[serde(default)]
    pub workload: WorkloadArgs,
    pub qps: Vec<f64>,
    pub stage_seconds: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "yes")]
    pub stream: bool,
    /// Seconds one request may take before it counts as an error (default 300).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Bound on each router's stages in seconds: requests still open then are cancelled
    /// (errors) and later stages skipped.
    #[serde(default)]
    pub max_seconds: Option<f64>,
    pub routers: Vec<RouterKind>,
    /// An EndpointPickerConfig (the YAML `--config-file` takes), inline as a block string
    /// (`picker_config: |`). In real time it is written to `<out>/logs/picker-config.yaml`,
    /// checked with `infergate config check` before anything starts (a config the router
    /// would refuse stops the scenario with the router's error), and passed as
    /// `--config-file` to the `infergate` router (`serve`, instead of `--profile
    /// infergate`) and to `infergate-epp-envoy` (`epp`). `infergate-reference` keeps the
    /// reference profile; round-robin and the peer routers (sglang-cache-aware,
    /// vllm-cache-aware, vllm-power-of-two) ignore it, and so does the virtual clock.
    #[serde(default)]
    pub picker_config: Option<String>,
}

impl Scenario {
    pub fn from_yaml(text: &str, origin: &str) -> anyhow::Result<Scenario> {
        let s: Scenario =
            serde_yaml_ng::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        s.check().with_context(|| origin.to_owned())?;
        Ok(s)
    }

    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario file {}", path.display()))?;
        Scenario::from_yaml(&text, &path.display().to_string())
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.replicas == 0 {
            anyhow::bail!("replicas must be at least 1");
        }
        if self.slow_replicas > self.replicas {
            anyhow::bail!(
                "slow_replicas ({}) cannot exceed replicas ({})",
                self.slow_replicas,
                self.replicas
            );
        }
        if !(self.slowdown.is_finite() && self.slowdown >= 1.0) {
            anyhow::bail!("slowdown must be a number >= 1, not {}", self.slowdown);
        }
        if self.slow_replicas > 0 && self.engine.time_scale.is_some() {
            anyhow::bail!("slow_replicas sets each sim's time scale; drop engine.time_scale");
        }
        if infergate_sim::profile::by_name(&self.profile).is_none() {
            anyhow::bail!(
                "profile {:?} is unknown (known: {})",
                self.profile,
                infergate_sim::profile::names().join(", ")
            );
        }
        if self.qps.is_empty() {
            anyhow::bail!("qps must list at least one rate");
        }
        if let Some(q) = self.qps.iter().find(|q| !(q.is_finite() && **q > 0.0)) {
            anyhow::bail!("qps values must be positive numbers, not {q}");
        }
        for (v, what) in [
            (Some(self.stage_seconds), "stage_seconds"),
            (self.timeout, "timeout"),
            (self.max_seconds, "max_seconds"),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    anyhow::bail!("{what} must be a positive number of seconds, not {v}");
                }
            }
        }
        if let Some(c) = &self.picker_config {
            if c.trim().is_empty() {
                anyhow::bail!("picker_config is empty; give an EndpointPickerConfig or drop it");
            }
        }
        if self.routers.is_empty() {
            anyhow::bail!(
                "routers must name at least one of: {}",
                ROUTER_NAMES.join(", ")
            );
        }
        self.workload.check()
    }

    fn title(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{} workload", self.workload.name()),
        }
    }

    /// The requests of one QPS stage (the same for every router).
    fn stage_specs(&self, qps: f64) -> Vec<RequestSpec> {
        self.workload
            .build(
                vec![Stage {
                    qps,
                    seconds: self.stage_seconds,
                }],
                self.seed,
            )
            .generate()
    }

    fn model(&self) -> String {
        infergate_sim::profile::by_name(&self.profile)
            .map(|p| p.model.to_owned())
            .unwrap_or_default()
    }
}

/// Flags of `infergate bench scenario`.
#[derive(Args, Debug)]
pub struct ScenarioArgs {
    /// The scenario file (YAML; see docs/scenarios/).
    pub file: PathBuf,
    /// Run on the simulator's virtual clock (round-robin, infergate-reference and
    /// infergate only; others are skipped with a note).
    #[arg(long = "virtual")]
    pub virtual_clock: bool,
    /// Routers to run instead of the file's list, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub routers: Vec<String>,
    /// Directory for report.json, report.md, ttft-p90.svg and run.json (created if missing).
    #[arg(long, default_value = "scenario-out")]
    pub out: PathBuf,
}

pub fn run(args: ScenarioArgs) -> anyhow::Result<()> {
    let mut scn = Scenario::load(&args.file)?;
    if !args.routers.is_empty() {
        scn.routers = args
            .routers
            .iter()
            .map(|r| RouterKind::parse(r))
            .collect::<anyhow::Result<_>>()?;
    }
    run_scenario(&scn, args.virtual_clock, &args.out).map(|_| ())
}

/// What happened to one router.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RouterRun {
    pub router: String,
    /// "ran" or "skipped".
    pub status: String,
    pub reason: Option<String>,
    pub wall_seconds: f64,
    /// Addresses this router's processes listened on (replicas, router, Envoy).
    pub addresses: Vec<String>,
}

/// The outcome of a scenario: the report rows and what happened to each router.
pub struct Outcome {
    pub rows: Vec<RunReport>,
    pub routers: Vec<RouterRun>,
    pub wall_seconds: f64,
}

/// Runs `scn` and writes the report to `out`; prints the table to stdout.
pub fn run_scenario(scn: &Scenario, virtual_clock: bool, out: &Path) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = Instant::now();
    let mode = if virtual_clock {
        "virtual clock"
    } else {
        "real time"
    };
    eprintln!(
        "infergate scenario: {}: {} x {} replicas, {} workload, QPS {:?} x {} s, routers {} ({mode})",
        scn.title(),
        scn.replicas,
        scn.profile,
        scn.workload.name(),
        scn.qps,
        scn.stage_seconds,
        scn.routers.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
    );
    let mut rows = Vec::new();
    let mut stats = Vec::new();
    let mut routers = Vec::new();
    if virtual_clock {
        if scn.picker_config.is_some() {
            eprintln!(
                "infergate scenario: picker_config is not used on the virtual clock (real-time runs only)"
            );
        }
        for &r in &scn.routers {
            let t = Instant::now();
            match run_virtual(scn, r)? {
                Some(mut rs) => {
                    stats.resize(stats.len() + rs.len(), RouterStageStats::default());
                    rows.append(&mut rs);
                    let secs = t.elapsed().as_secs_f64();
                    eprintln!(
                        "infergate scenario: {}: done in {secs:.1} s of wall time",
                        r.name()
                    );
                    routers.push(RouterRun {
                        router: r.name().into(),
                        status: "ran".into(),
                        reason: None,
                        wall_seconds: secs,
                        addresses: vec![],
                    });
                }
                None => {
                    let why = "not available on the virtual clock (only round-robin, infergate-reference and infergate are)";
                    eprintln!("infergate scenario: {}: skipped: {why}", r.name());
                    routers.push(skipped(r, why.into()));
                }
            }
        }
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let log_dir = out.join("logs");
        std::fs::create_dir_all(&log_dir)?;
        if scn.picker_config.is_some() && scn.routers.iter().any(|r| r.uses_picker_config()) {
            check_picker_config(scn, &log_dir)?;
        }
        let mut peers: Option<Result<PathBuf, String>> = None;
        for &r in &scn.routers {
            let t = Instant::now();
            if r.is_peer() {
                let python = peers.get_or_insert_with(routers_python);
                if let Err(why) = python {
                    eprintln!("infergate scenario: {}: skipped: {why}", r.name());
                    routers.push(skipped(r, why.clone()));
                    continue;
                }
            }
            let python = peers.as_ref().and_then(|p| p.as_ref().ok()).cloned();
            match rt.block_on(run_real(scn, r, python.as_deref(), &log_dir)) {
                Ok((rs, addresses)) => {
                    for (row, st) in rs {
                        rows.push(row);
                        stats.push(st);
                    }
                    routers.push(RouterRun {
                        router: r.name().into(),
                        status: "ran".into(),
                        reason: None,
                        wall_seconds: t.elapsed().as_secs_f64(),
                        addresses,
                    });
                }
                Err(RealError::Skip(Skip(why))) => {
                    eprintln!("infergate scenario: {}: skipped: {why}", r.name());
                    routers.push(skipped(r, why));
                }
                Err(RealError::Fatal(why)) => {
                    anyhow::bail!(
                        "{}: the router did not start with the scenario's picker_config: {why}",
                        r.name()
                    );
                }
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    write_report(scn, out, &rows, &stats, &routers, virtual_clock, wall)?;
    Ok(Outcome {
        rows,
        routers,
        wall_seconds: wall,
    })
}

fn skipped(r: RouterKind, why: String) -> RouterRun {
    RouterRun {
        router: r.name().into(),
        status: "skipped".into(),
        reason: Some(why),
        wall_seconds: 0.0,
        addresses: vec![],
    }
}

/// For each stage after the first router's, the p90 TTFT of every other router against the
/// first one's (the baseline), in words.
pub fn verdicts(rows: &[RunReport]) -> Vec<String> {
    let Some(base) = rows.first().map(|r| r.router.clone()) else {
        return vec![];
    };
    let mut out = Vec::new();
    for b in rows.iter().filter(|r| r.router == base) {
        for o in rows
            .iter()
            .filter(|r| r.router != base && r.stage_qps == b.stage_qps)
        {
            let (bt, ot) = (b.summary.ttft_p90, o.summary.ttft_p90);
            let line = if !(bt > 0.0 && ot > 0.0) {
                format!(
                    "QPS {}: {} vs {}: no TTFT to compare",
                    b.stage_qps, o.router, base
                )
            } else if ot <= bt {
                format!(
                    "QPS {}: {} p90 TTFT {:.0} ms vs {} {:.0} ms: {:.2}x faster",
                    b.stage_qps,
                    o.router,
                    ot * 1e3,
                    base,
                    bt * 1e3,
                    bt / ot
                )
            } else {
                format!(
                    "QPS {}: {} p90 TTFT {:.0} ms vs {} {:.0} ms: {:.2}x slower",
                    b.stage_qps,
                    o.router,
                    ot * 1e3,
                    base,
                    bt * 1e3,
                    ot / bt
                )
            };
            out.push(line);
        }
    }
    out
}

fn write_report(
    scn: &Scenario,
    out: &Path,
    rows: &[RunReport],
    stats: &[RouterStageStats],
    routers: &[RouterRun],
    virtual_clock: bool,
    wall: f64,
) -> anyhow::Result<()> {
    let write = |name: &str, text: &str| {
        let p = out.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    let mut md = report::to_markdown(rows);
    let own = report::router_stats_markdown(rows, stats);
    if !own.is_empty() {
        md.push_str(
            "\nThe routers' own figures per stage: resident memory (VmRSS, sampled once per \
             second) and scheduling time from their `inference_extension_scheduler_e2e_duration_seconds` \
             histogram over the stage (upper bounds of the buckets the quantiles fall in).\n\n",
        );
        md.push_str(&own);
    }
    let notes: Vec<String> = routers
        .iter()
        .filter_map(|r| {
            r.reason
                .as_ref()
                .map(|why| format!("- {} skipped: {why}", r.router))
        })
        .collect();
    if !notes.is_empty() {
        md.push('\n');
        md.push_str(&notes.join("\n"));
        md.push('\n');
    }
    write("report.json", &report::to_json_with_stats(rows, stats))?;
    write("report.md", &md)?;
    let clock = if virtual_clock { ", virtual clock" } else { "" };
    write(
        "ttft-p90.svg",
        &report::svg_chart(
            rows,
            &format!(
                "TTFT p90, {} ({} replicas{clock})",
                scn.title(),
                scn.replicas
            ),
            |s| s.ttft_p90 * 1e3,
            "TTFT p90 (ms)",
        ),
    )?;
    let run = serde_json::json!({
        "name": scn.title(),
        "mode": if virtual_clock { "virtual" } else { "real-time" },
        "replicas": scn.replicas,
        "profile": scn.profile,
        "workload": scn.workload.name(),
        "qps": scn.qps,
        "stage_seconds": scn.stage_seconds,
        "seed": scn.seed,
        "picker_config": scn.picker_config,
        "wall_seconds": wall,
        "routers": routers,
    });
    write(
        "run.json",
        &serde_json::to_string_pretty(&run).expect("serialisable"),
    )?;
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{md}")?;
    stdout.flush()?;
    eprintln!(
        "infergate scenario: {:.1} s of wall time; report in {} (report.json, report.md, ttft-p90.svg, run.json)",
        wall,
        out.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Virtual clock

fn run_virtual(scn: &Scenario, r: RouterKind) -> anyhow::Result<Option<Vec<RunReport>>> {
    let router = match r {
        RouterKind::RoundRobin => virtual_run::Router::RoundRobin,
        RouterKind::InfergateReference => virtual_run::Router::reference_default()?,
        RouterKind::Infergate => virtual_run::Router::infergate()?,
        _ => return Ok(None),
    };
    let mut pool = VirtualPool::of_profile(&scn.profile, usize::from(scn.replicas))?;
    pool.seed = scn.seed;
    let k = &scn.engine;
    let e = &mut pool.engine;
    if let Some(v) = k.block_size {
        e.block_size = v;
    }
    if let Some(v) = k.num_gpu_blocks {
        e.num_gpu_blocks = v;
    }
    if k.block_size.is_some() || k.num_gpu_blocks.is_some() {
        let p = infergate_sim::profile::by_name(&scn.profile).expect("checked");
        e.max_model_len = p
            .max_model_len
            .min(e.num_gpu_blocks.saturating_mul(e.block_size));
    }
    if let Some(v) = k.max_num_seqs {
        e.max_num_seqs = v;
    }
    if let Some(v) = k.max_num_batched_tokens {
        e.max_num_batched_tokens = v;
    }
    if let Some(v) = k.max_loras {
        e.max_loras = v;
    }
    e.max_cpu_loras = k.max_cpu_loras.unwrap_or(e.max_cpu_loras.max(e.max_loras));
    if let Some(v) = k.jitter {
        e.jitter = v;
    }
    if let Some(ms) = k.lora_load_ms {
        e.lora_load_time = ms / 1e3;
    }
    if let Some(why) = pool.engine.validate() {
        anyhow::bail!("invalid engine settings: {why}");
    }
    let fast = usize::from(scn.replicas - scn.slow_replicas);
    pool.slowdown = (0..usize::from(scn.replicas))
        .map(|i| if i < fast { 1.0 } else { scn.slowdown })
        .collect();
    let mut rows = Vec::new();
    for &q in &scn.qps {
        let specs = scn.stage_specs(q);
        let t = Instant::now();
        let row =
            virtual_run::run_report(&pool, &router, r.name(), &scn.workload.name(), q, &specs);
        let s = &row.summary;
        eprintln!(
            "infergate scenario: {} QPS {q}: {} ok, {} errors, {} shed of {} ({:.1} s wall)",
            r.name(),
            s.ok,
            s.errors,
            s.shed,
            s.requests,
            t.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    Ok(Some(rows))
}

// ---------------------------------------------------------------------------------------
// Real time: processes

/// Why a router could not run (recorded as skipped; the scenario goes on).
struct Skip(String);

/// How one router's real-time turn failed.
enum RealError {
    /// Recorded as skipped; the scenario goes on.
    Skip(Skip),
    /// The router did not start with the scenario's `picker_config`: the scenario stops.
    Fatal(String),
}

impl From<Skip> for RealError {
    fn from(s: Skip) -> RealError {
        RealError::Skip(s)
    }
}

/// Where a real-time run writes the scenario's `picker_config`.
fn picker_config_path(log_dir: &Path) -> PathBuf {
    log_dir.join("picker-config.yaml")
}

/// Writes the scenario's `picker_config` to the run's log directory and has
/// `infergate config check` load it as the routers will: a config they would refuse stops
/// the scenario here, with their error.
fn check_picker_config(scn: &Scenario, log_dir: &Path) -> anyhow::Result<()> {
    let Some(text) = &scn.picker_config else {
        return Ok(());
    };
    let path = picker_config_path(log_dir);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    let out = Command::new(exe()?)
        .args(["config", "check", "--config-file"])
        .arg(&path)
        .env("INFERGATE_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .context("cannot run `infergate config check`")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        let err = err.strip_prefix("infergate: ").unwrap_or(err);
        anyhow::bail!(
            "picker_config (written to {}) is refused by the router: {err}",
            path.display()
        );
    }
    Ok(())
}

/// `infergate serve`'s arguments in a scenario: the built-in `profile`, or the scenario's
/// picker config when `config_file` is given (the two flags exclude each other).
fn serve_args(pool_file: &str, profile: &str, config_file: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = ["serve", "--listen-address", "127.0.0.1", "--port", "0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["--pool-file".into(), pool_file.into()]);
    match config_file {
        Some(c) => a.extend(["--config-file".into(), c.display().to_string()]),
        None => a.extend(["--profile".into(), profile.into()]),
    }
    a
}

/// `infergate epp`'s arguments in a scenario (its built-in profile unless `config_file`).
fn epp_args(
    grpc: u16,
    health: u16,
    metrics: u16,
    pool_file: &str,
    config_file: Option<&Path>,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "epp".into(),
        "--listen-address".into(),
        "127.0.0.1".into(),
        "--grpc-port".into(),
        grpc.to_string(),
        "--grpc-health-port".into(),
        health.to_string(),
        "--metrics-port".into(),
        metrics.to_string(),
        "--pool-file".into(),
        pool_file.into(),
    ];
    if let Some(c) = config_file {
        a.extend(["--config-file".into(), c.display().to_string()]);
    }
    a
}

// ---------------------------------------------------------------------------------------
// Real time: the router's own figures

/// What is watched of one router during its stages.
struct Watch {
    router_pid: u32,
    envoy_pid: Option<u32>,
    /// Base URL of the router's Prometheus `/metrics`.
    metrics_url: String,
}

/// The scheduling-latency histogram every infergate router exports.
const SCHEDULER_HISTOGRAM: &str = "inference_extension_scheduler_e2e_duration_seconds";

/// Resident memory of a process in MiB (VmRSS of /proc/PID/status), if it can be read.
fn rss_mib(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Peak and last of a series of samples.
#[derive(Clone, Copy, Debug, Default)]
struct PeakLast {
    peak: Option<f64>,
    last: Option<f64>,
}

impl PeakLast {
    fn add(&mut self, v: Option<f64>) {
        if let Some(v) = v {
            self.peak = Some(self.peak.map_or(v, |p| p.max(v)));
            self.last = Some(v);
        }
    }
}

/// Samples the RSS of `pids` once per second on a thread of its own until told to stop
/// (then once more, so the last sample is the stage's end).
struct RssSampler {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Vec<PeakLast>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let (stop, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut got = vec![PeakLast::default(); pids.len()];
            loop {
                for (g, &pid) in got.iter_mut().zip(&pids) {
                    g.add(rss_mib(pid));
                }
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => break,
                }
            }
            for (g, &pid) in got.iter_mut().zip(&pids) {
                g.add(rss_mib(pid));
            }
            got
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> Vec<PeakLast> {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_default()
    }
}

/// The router's `/metrics` page, or `None` (with a note) when it cannot be read.
async fn metrics_page(url: &str) -> Option<String> {
    let client = infergate_testkit::http::HttpClient::new();
    let got = tokio::time::timeout(Duration::from_secs(5), client.get(url, "/metrics")).await;
    match got {
        Ok(Ok((status, _, body))) if status.is_success() => {
            Some(String::from_utf8_lossy(&body).into_owned())
        }
        Ok(Ok((status, _, _))) => {
            eprintln!("infergate scenario: {url}/metrics answered {status}");
            None
        }
        Ok(Err(e)) => {
            eprintln!("infergate scenario: cannot read {url}/metrics: {e:#}");
            None
        }
        Err(_) => {
            eprintln!("infergate scenario: {url}/metrics did not answer within 5 s");
            None
        }
    }
}

/// The cumulative buckets `(le, count)` of histogram `name` in a Prometheus text page,
/// summed over its label sets, sorted by `le` (the last is `+Inf`).
fn histogram_buckets(page: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket");
    let mut got: Vec<(f64, f64)> = Vec::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some(close) = rest.find('}') else {
            continue;
        };
        let (labels, value) = (&rest[..close], &rest[close + 1..]);
        let Some(le) = labels.split(',').find_map(|kv| {
            let v = kv.trim().strip_prefix("le=")?.trim_matches('"');
            match v {
                "+Inf" | "Inf" | "inf" | "+inf" => Some(f64::INFINITY),
                v => v.parse::<f64>().ok(),
            }
        }) else {
            continue;
        };
        let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        match got.iter_mut().find(|(l, _)| *l == le) {
            Some((_, c)) => *c += v,
            None => got.push((le, v)),
        }
    }
    got.sort_by(|a, b| a.0.total_cmp(&b.0));
    got
}

/// p50, p99 (seconds) and the count of the observations histogram `name` gained between
/// pages `before` and `after`: each quantile is the upper bound of the bucket it falls in
/// (the largest finite bound when it falls in `+Inf`). `None` when `after` lacks the
/// histogram; the quantiles are `None` when nothing was observed. A counter that went
/// down (the router restarted) counts from zero.
fn stage_quantiles(
    before: &str,
    after: &str,
    name: &str,
) -> Option<(Option<f64>, Option<f64>, u64)> {
    let b = histogram_buckets(before, name);
    let a = histogram_buckets(after, name);
    if a.is_empty() {
        return None;
    }
    let reset = a
        .iter()
        .any(|(le, c)| b.iter().any(|(l, bc)| l == le && bc > c));
    let delta: Vec<(f64, f64)> = a
        .iter()
        .map(|&(le, c)| {
            let was = if reset {
                0.0
            } else {
                b.iter().find(|(l, _)| *l == le).map_or(0.0, |&(_, v)| v)
            };
            (le, c - was)
        })
        .collect();
    let count = delta.last().map_or(0.0, |&(_, c)| c).max(0.0);
    let top_finite = delta
        .iter()
        .rev()
        .map(|&(le, _)| le)
        .find(|le| le.is_finite());
    let quantile = |q: f64| -> Option<f64> {
        if count < 1.0 {
            return None;
        }
        let rank = (q * count).ceil().max(1.0);
        let le = delta.iter().find(|&&(_, c)| c >= rank).map(|&(le, _)| le)?;
        if le.is_finite() {
            Some(le)
        } else {
            top_finite
        }
    };
    Some((quantile(0.5), quantile(0.99), count.round() as u64))
}

/// The router's figures for one stage: RSS samples and the scheduling histogram's pages
/// at the stage's start and end.
fn stage_stats(
    rss: &[PeakLast],
    envoy: bool,
    before: Option<&str>,
    after: Option<&str>,
) -> RouterStageStats {
    let mut st = RouterStageStats::default();
    if let Some(r) = rss.first() {
        st.router_rss_mb_peak = r.peak;
        st.router_rss_mb_end = r.last;
    }
    if envoy {
        if let Some(e) = rss.get(1) {
            st.envoy_rss_mb_peak = e.peak;
            st.envoy_rss_mb_end = e.last;
        }
    }
    if let (Some(b), Some(a)) = (before, after) {
        if let Some((p50, p99, n)) = stage_quantiles(b, a, SCHEDULER_HISTOGRAM) {
            st.scheduler_p50_us = p50.map(|s| s * 1e6);
            st.scheduler_p99_us = p99.map(|s| s * 1e6);
            st.scheduler_decisions = Some(n);
        }
    }
    st
}

impl<E: std::fmt::Display> From<E> for Skip {
    fn from(e: E) -> Skip {
        Skip(e.to_string())
    }
}

/// A child process we started; killed by its PID and waited for when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr (and stdout unless `pipe_stdout`) to `<log_dir>/<name>.log`.
    fn spawn(
        name: &str,
        cmd: &mut Command,
        log_dir: &Path,
        pipe_stdout: bool,
    ) -> anyhow::Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let stdout = if pipe_stdout {
            Stdio::piped()
        } else {
            Stdio::from(file.try_clone()?)
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Lines of the child's piped stdout, read on a thread of their own until EOF.
    fn stdout_lines(&mut self) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        if let Some(out) = self.child.stdout.take() {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        // Nobody listens any more; keep draining so the child never blocks.
                        continue;
                    }
                }
            });
        }
        rx
    }

    fn failure(&mut self, what: &str) -> String {
        let status = self
            .exited()
            .map(|s| format!(" (exited: {s})"))
            .unwrap_or_default();
        format!(
            "{}: {what}{status}; log {}:\n{}",
            self.name,
            self.log.display(),
            self.log_tail(15)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "infergate scenario: {} (pid {}) did not exit within 5 s of SIGKILL",
            self.name,
            self.child.id()
        );
    }
}

/// Waits for lines of `rx` until `want` of them match `parse`, or `timeout`.
fn wait_lines<T>(
    proc: &mut Proc,
    rx: &mpsc::Receiver<String>,
    want: usize,
    timeout: Duration,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, Skip> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => got.extend(parse(&line)),
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                if proc.exited().is_some() {
                    return Err(Skip(proc.failure("exited during start-up")));
                }
            }
            _ => return Err(Skip(proc.failure("did not announce its address"))),
        }
    }
    Ok(got)
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the infergate executable")
}

/// `infergate sim` with the scenario's replicas, each on a port the system picks: one
/// process, or two when some replicas are slow (fast ones first).
fn start_sims(
    scn: &Scenario,
    log_dir: &Path,
    tag: &str,
) -> Result<(Vec<Proc>, Vec<SocketAddr>), Skip> {
    let fast = scn.replicas - scn.slow_replicas;
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for (n, time_scale, suffix) in [
        (fast, scn.engine.time_scale, "sim"),
        (scn.slow_replicas, Some(1.0 / scn.slowdown), "sim-slow"),
    ] {
        if n == 0 {
            continue;
        }
        let (p, a) = start_sim_process(scn, n, time_scale, log_dir, &format!("{tag}-{suffix}"))?;
        procs.push(p);
        addrs.extend(a);
    }
    Ok((procs, addrs))
}

fn start_sim_process(
    scn: &Scenario,
    replicas: u16,
    time_scale: Option<f64>,
    log_dir: &Path,
    tag: &str,
) -> Result<(Proc, Vec<SocketAddr>), Skip> {
    let mut cmd = Command::new(exe()?);
    cmd.arg("sim")
        .args(["--port", "0", "--host", "127.0.0.1"])
        .args(["--replicas", &replicas.to_string()])
        .args(["--profile", &scn.profile])
        .args(["--seed", &scn.seed.to_string()])
        .env("INFERGATE_LOG", "warn");
    let k = &scn.engine;
    let flags: [(&str, Option<String>); 9] = [
        ("--max-loras", k.max_loras.map(|v| v.to_string())),
        ("--max-cpu-loras", k.max_cpu_loras.map(|v| v.to_string())),
        ("--max-num-seqs", k.max_num_seqs.map(|v| v.to_string())),
        (
            "--max-num-batched-tokens",
            k.max_num_batched_tokens.map(|v| v.to_string()),
        ),
        ("--num-gpu-blocks", k.num_gpu_blocks.map(|v| v.to_string())),
        ("--block-size", k.block_size.map(|v| v.to_string())),
        ("--jitter", k.jitter.map(|v| v.to_string())),
        ("--lora-load-ms", k.lora_load_ms.map(|v| v.to_string())),
        ("--time-scale", time_scale.map(|v| v.to_string())),
    ];
    for (flag, v) in flags {
        if let Some(v) = v {
            cmd.args([flag, &v]);
        }
    }
    if scn.workload.workload == WorkloadKind::Lora {
        cmd.arg("--lora-modules");
        for i in 0..scn.workload.adapters {
            cmd.arg(format!(
                "{}=/adapters/{i}",
                infergate_bench::workload::adapter_name(i)
            ));
        }
    }
    let mut proc = Proc::spawn(tag, &mut cmd, log_dir, true)?;
    let rx = proc.stdout_lines();
    let addrs = wait_lines(
        &mut proc,
        &rx,
        usize::from(replicas),
        Duration::from_secs(30),
        |l| addr_after(l, "listening on http://"),
    )?;
    Ok((proc, addrs))
}

/// The processes of one router's turn; dropping it stops them all (router first).
struct Setup {
    envoy: Option<infergate_testkit::Envoy>,
    router: Option<Proc>,
    /// What to sample of the router during the stages (infergate's own routers only).
    watch: Option<Watch>,
    _sims: Vec<Proc>,
    urls: Vec<String>,
    addresses: Vec<String>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.envoy.take();
        self.router.take();
    }
}

/// A pool file: the replicas as StaticEndpoints (vLLM), and the objectives `interactive`
/// (priority 10) and `batch` (-1) that the priority workload sends.
fn pool_file_text(replicas: &[SocketAddr]) -> String {
    let eps: String = replicas
        .iter()
        .map(|a| format!("  - address: {}\n    port: {}\n", a.ip(), a.port()))
        .collect();
    let objective = |name: &str, priority: i32| {
        format!(
            "---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
             metadata:\n  name: {name}\nspec:\n  priority: {priority}\n  poolRef:\n    name: infergate\n"
        )
    };
    format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: StaticEndpoints\nmetadata:\n  name: sims\nspec:\n  endpoints:\n{eps}{}{}",
        objective("interactive", 10),
        objective("batch", -1)
    )
}

async fn start_router(
    scn: &Scenario,
    r: RouterKind,
    python: Option<&Path>,
    log_dir: &Path,
) -> Result<Setup, Skip> {
    let (sims, replicas) = start_sims(scn, log_dir, r.name())?;
    let mut addresses: Vec<String> = replicas.iter().map(|a| a.to_string()).collect();
    // The replicas and the objectives the workloads name (`interactive` 10, `batch` -1,
    // as on the virtual clock), for the routers that read a pool file.
    let pool_file = log_dir.join(format!("{}-pool.yaml", r.name()));
    std::fs::write(&pool_file, pool_file_text(&replicas))
        .map_err(|e| Skip(format!("cannot write {}: {e}", pool_file.display())))?;
    let pool_file = pool_file.display().to_string();
    let worker_urls: Vec<String> = replicas.iter().map(|a| format!("http://{a}")).collect();
    let free = infergate_testkit::free_port;
    let config_file = scn
        .picker_config
        .as_ref()
        .filter(|_| r.uses_picker_config())
        .map(|_| picker_config_path(log_dir));
    if let Some(c) = &config_file {
        if !c.is_file() {
            // Normally written (and checked) by run_scenario already.
            std::fs::write(c, scn.picker_config.as_deref().unwrap_or_default())
                .map_err(|e| Skip(format!("cannot write {}: {e}", c.display())))?;
        }
    }
    let mut setup = Setup {
        envoy: None,
        router: None,
        watch: None,
        _sims: sims,
        urls: vec![],
        addresses: vec![],
    };
    match r {
        RouterKind::RoundRobin => setup.urls = worker_urls,
        RouterKind::Infergate | RouterKind::InfergateReference => {
            let profile = if r == RouterKind::Infergate {
                "infergate"
            } else {
                "reference"
            };
            let mut cmd = Command::new(exe()?);
            cmd.args(serve_args(&pool_file, profile, config_file.as_deref()))
                .env("INFERGATE_LOG", "warn");
            let mut proc = Proc::spawn(r.name(), &mut cmd, log_dir, true)?;
            let rx = proc.stdout_lines();
            let addr = wait_lines(&mut proc, &rx, 1, Duration::from_secs(30), |l| {
                addr_after(l, "infergate serve: listening on http://")
            })?[0];
            addresses.push(addr.to_string());
            setup.urls = vec![format!("http://{addr}")];
            setup.watch = Some(Watch {
                router_pid: proc.child.id(),
                envoy_pid: None,
                metrics_url: format!("http://{addr}"),
            });
            setup.router = Some(proc);
        }
        RouterKind::InfergateEppEnvoy => {
            let binary = tokio::task::spawn_blocking(infergate_testkit::envoy_binary)
                .await
                .map_err(|e| Skip(e.to_string()))?
                .map_err(|e| {
                    Skip(format!(
                        "no Envoy binary ({e:#}); run scripts/install-envoy.sh"
                    ))
                })?;
            tracing::debug!(envoy = %binary.display(), "using Envoy");
            let (grpc, health, metrics) = (free(), free(), free());
            let mut cmd = Command::new(exe()?);
            cmd.args(epp_args(
                grpc,
                health,
                metrics,
                &pool_file,
                config_file.as_deref(),
            ))
            .env("INFERGATE_LOG", "warn");
            let mut proc = Proc::spawn(r.name(), &mut cmd, log_dir, false)?;
            let grpc_addr = SocketAddr::from(([127, 0, 0, 1], grpc));
            // Until the port opens, 20 s at most; an epp that exits (a config it refuses)
            // is reported at once with its log.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if infergate_testkit::wait_for_port(grpc_addr, Duration::from_millis(300))
                    .await
                    .is_ok()
                {
                    break;
                }
                if proc.exited().is_some() {
                    return Err(Skip(proc.failure("exited during start-up")));
                }
                if Instant::now() >= deadline {
                    return Err(Skip(proc.failure("ext_proc port never opened")));
                }
            }
            let router_pid = proc.child.id();
            setup.router = Some(proc);
            let envoy = infergate_testkit::Envoy::start(
                infergate_testkit::EnvoyConfig::new()
                    .ext_proc(grpc_addr)
                    .request_body_mode(infergate_testkit::BodyMode::FullDuplexStreamed)
                    .response_body_mode(infergate_testkit::BodyMode::FullDuplexStreamed)
                    .route_timeout(Duration::from_secs(600))
                    .concurrency(1)
                    .log_level("warn")
                    .pool(replicas.iter().copied()),
            )
            .await
            .map_err(|e| Skip(format!("Envoy did not start: {e:#}")))?;
            addresses.push(grpc_addr.to_string());
            addresses.push(envoy.listener_addr().to_string());
            setup.urls = vec![envoy.url()];
            setup.watch = Some(Watch {
                router_pid,
                envoy_pid: Some(envoy.pid()),
                metrics_url: format!("http://127.0.0.1:{metrics}"),
            });
            setup.envoy = Some(envoy);
        }
        RouterKind::SglangCacheAware | RouterKind::VllmCacheAware | RouterKind::VllmPowerOfTwo => {
            let python = python.ok_or_else(|| Skip("no python with the peer routers".into()))?;
            let port = free();
            let (module, policy) = match r {
                RouterKind::SglangCacheAware => ("sglang_router.launch_router", "cache_aware"),
                RouterKind::VllmCacheAware => ("vllm_router.launch_router", "cache_aware"),
                _ => ("vllm_router.launch_router", "power_of_two"),
            };
            let mut cmd = Command::new(python);
            cmd.args(["-m", module])
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .arg("--worker-urls")
                .args(&worker_urls)
                .args(["--policy", policy])
                .args(["--prometheus-host", "127.0.0.1"])
                .args(["--prometheus-port", &free().to_string()])
                .args([
                    "--log-level",
                    if module.starts_with("sglang") {
                        "warn"
                    } else {
                        "warning"
                    },
                ])
                .env("RUST_LOG", "warn");
            let proc = Proc::spawn(r.name(), &mut cmd, log_dir, false)?;
            addresses.push(format!("127.0.0.1:{port}"));
            setup.urls = vec![format!("http://127.0.0.1:{port}")];
            setup.router = Some(proc);
        }
    }
    setup.addresses = addresses;
    Ok(setup)
}

/// Waits until a one-token completion through every URL succeeds (workers registered,
/// first scrapes in), 60 s at most.
async fn wait_ready(scn: &Scenario, setup: &mut Setup) -> Result<(), Skip> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let spec = RequestSpec {
        index: 0,
        at: 0.0,
        prompt: "Hello there".into(),
        prompt_tokens: 2,
        output_tokens: 1,
        lora: None,
        objective: None,
        priority: 0,
        group: None,
    };
    for url in setup.urls.clone() {
        let mut cfg = HttpConfig::new(vec![url.clone()], scn.model());
        cfg.stream = scn.stream;
        cfg.timeout = Duration::from_secs(5);
        let mut last;
        loop {
            if let Some(p) = setup.router.as_mut() {
                if p.exited().is_some() {
                    return Err(Skip(p.failure("exited during start-up")));
                }
            }
            match http::run(&cfg, std::slice::from_ref(&spec), &|_| {}).await {
                Ok(o) if o[0].ok() => break,
                Ok(o) => {
                    last = o[0]
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("status {}", o[0].status))
                }
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                let tail = setup
                    .router
                    .as_mut()
                    .map(|p| p.failure("not ready"))
                    .unwrap_or_default();
                return Err(Skip(format!(
                    "{url} did not serve a completion within 60 s (last: {last}) {tail}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

async fn run_real(
    scn: &Scenario,
    r: RouterKind,
    python: Option<&Path>,
    log_dir: &Path,
) -> Result<(Vec<(RunReport, RouterStageStats)>, Vec<String>), RealError> {
    eprintln!(
        "infergate scenario: {}: starting {} replicas and the router",
        r.name(),
        scn.replicas
    );
    let mut setup = match start_router(scn, r, python, log_dir).await {
        Ok(s) => s,
        Err(Skip(why)) if scn.picker_config.is_some() && r.uses_picker_config() => {
            return Err(RealError::Fatal(why))
        }
        Err(e) => return Err(e.into()),
    };
    wait_ready(scn, &mut setup).await?;
    let mut cfg = HttpConfig::new(setup.urls.clone(), scn.model());
    cfg.stream = scn.stream;
    cfg.timeout = Duration::from_secs_f64(scn.timeout.unwrap_or(300.0));
    let started = Instant::now();
    let bound = scn.max_seconds.map(Duration::from_secs_f64);
    let mut rows = Vec::new();
    for &q in &scn.qps {
        if let Some(b) = bound {
            let left = b.saturating_sub(started.elapsed());
            if left.is_zero() {
                eprintln!(
                    "infergate scenario: {}: max_seconds reached; skipping the remaining stages",
                    r.name()
                );
                break;
            }
            cfg.deadline = Some(left);
        }
        let specs = scn.stage_specs(q);
        let what = format!("{} QPS {q}", r.name());
        let bar = progress_bar(specs.len() as u64, &what);
        let on_progress = |p: Progress| {
            bar.set_position(p.done as u64);
            if p.errors > 0 {
                bar.set_message(format!("{} errors", p.errors));
            }
        };
        let (sampler, before) = match &setup.watch {
            Some(w) => {
                let pids = std::iter::once(w.router_pid).chain(w.envoy_pid).collect();
                (
                    Some(RssSampler::start(pids)),
                    metrics_page(&w.metrics_url).await,
                )
            }
            None => (None, None),
        };
        let out = http::run(&cfg, &specs, &on_progress)
            .await
            .map_err(|e| Skip(format!("load generator failed: {e:#}")))?;
        bar.finish_and_clear();
        let own = match (&setup.watch, sampler) {
            (Some(w), Some(sampler)) => {
                let after = metrics_page(&w.metrics_url).await;
                let rss = sampler.finish();
                stage_stats(
                    &rss,
                    w.envoy_pid.is_some(),
                    before.as_deref(),
                    after.as_deref(),
                )
            }
            _ => RouterStageStats::default(),
        };
        let row = report_row(r.name(), &scn.workload.name(), Some(q), &out);
        let s = &row.summary;
        eprintln!(
            "infergate scenario: {what}: {} ok, {} errors, {} shed of {}; TTFT p90 {:.0} ms",
            s.ok,
            s.errors,
            s.shed,
            s.requests,
            s.ttft_p90 * 1e3
        );
        if s.errors > 0 {
            if let Some(e) = out.iter().find_map(|o| o.error.as_deref()) {
                eprintln!("infergate scenario: first error: {e}");
            }
        }
        if !own.is_empty() {
            let f = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
            eprintln!(
                "infergate scenario: {what}: router RSS peak {} MiB, end {} MiB; scheduling p50 {} us, p99 {} us over {} decisions",
                f(own.router_rss_mb_peak, 1),
                f(own.router_rss_mb_end, 1),
                f(own.scheduler_p50_us, 0),
                f(own.scheduler_p99_us, 0),
                own.scheduler_decisions.map_or("-".into(), |n| n.to_string()),
            );
        }
        rows.push((row, own));
    }
    let addresses = setup.addresses.clone();
    drop(setup);
    Ok((rows, addresses))
}

/// The python that imports both peer routers, installing them with
/// scripts/install-routers.sh when needed (600 s at most). `Err` says why they cannot run.
fn routers_python() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("INFERGATE_ROUTERS_PYTHON").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let root = infergate_testkit::repo_root();
    let venv_python = infergate_testkit::target_dir().join("venv-routers/bin/python");
    let importable = |py: &Path| {
        Command::new(py)
            .args([
                "-c",
                "import sglang_router.launch_router, vllm_router.launch_router",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if venv_python.is_file() && importable(&venv_python) {
        return Ok(venv_python);
    }
    let script = root.join("scripts/install-routers.sh");
    if !script.is_file() {
        return Err(format!(
            "peer routers not installed and {} not found",
            script.display()
        ));
    }
    eprintln!(
        "infergate scenario: installing the peer routers with {} (PyPI, into target/venv-routers)",
        script.display()
    );
    infergate_testkit::peer_routers::run_install_script(&script)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two `/metrics` pages from the real encoder: 10 decisions before the stage, 100
    /// during it (98 at 20 us, 2 at 1 ms).
    fn two_pages() -> (String, String) {
        let m = infergate_metrics::Metrics::new("pool");
        for _ in 0..10 {
            m.scheduler_e2e_duration_seconds.observe(3e-6);
        }
        let before = m.encode();
        for _ in 0..98 {
            m.scheduler_e2e_duration_seconds.observe(20e-6);
        }
        for _ in 0..2 {
            m.scheduler_e2e_duration_seconds.observe(1e-3);
        }
        (before, m.encode())
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() <= b * 1e-9)
    }

    #[test]
    fn scenario_stage_quantiles_come_from_the_histogram_delta() {
        let (before, after) = two_pages();
        assert!(before.contains(SCHEDULER_HISTOGRAM), "{before}");
        let b = histogram_buckets(&before, SCHEDULER_HISTOGRAM);
        assert_eq!(b.len(), 21, "20 bounds and +Inf: {b:?}");
        assert_eq!(b.last().unwrap(), &(f64::INFINITY, 10.0));

        let (p50, p99, n) = stage_quantiles(&before, &after, SCHEDULER_HISTOGRAM).unwrap();
        assert_eq!(n, 100);
        // Upper bounds of the buckets: 20 us falls in (16, 32] us, 1 ms in (512, 1024] us.
        assert!(close(p50, 32e-6), "{p50:?}");
        assert!(close(p99, 1.024e-3), "{p99:?}");

        // As the report has them, with RSS samples.
        let rss = [
            PeakLast {
                peak: Some(30.0),
                last: Some(28.5),
            },
            PeakLast {
                peak: Some(50.0),
                last: Some(49.0),
            },
        ];
        let st = stage_stats(&rss, true, Some(&before), Some(&after));
        assert!(close(st.scheduler_p50_us, 32.0), "{st:?}");
        assert!(close(st.scheduler_p99_us, 1024.0), "{st:?}");
        assert_eq!(st.scheduler_decisions, Some(100));
        assert_eq!(st.router_rss_mb_peak, Some(30.0));
        assert_eq!(st.envoy_rss_mb_end, Some(49.0));
        let serve = stage_stats(&rss[..1], false, Some(&before), Some(&after));
        assert_eq!(serve.envoy_rss_mb_peak, None);

        // A stage without decisions: a count of 0 and no quantiles.
        assert_eq!(
            stage_quantiles(&after, &after, SCHEDULER_HISTOGRAM),
            Some((None, None, 0))
        );
        // A page without the histogram: nothing.
        assert_eq!(
            stage_quantiles(&before, "up 1\n", SCHEDULER_HISTOGRAM),
            None
        );
    }

    #[test]
    fn scenario_stage_quantiles_sum_label_sets_and_cap_at_the_top_bound() {
        let page = |a: u64, b: u64, inf: u64| {
            format!(
                "# TYPE h histogram\n\
                 h_bucket{{profile=\"x\",le=\"0.001\"}} {a}\n\
                 h_bucket{{profile=\"x\",le=\"0.01\"}} {b} 1700000000000\n\
                 h_bucket{{profile=\"x\",le=\"+Inf\"}} {inf}\n\
                 h_bucket{{profile=\"y\",le=\"0.001\"}} 1\n\
                 h_bucket{{profile=\"y\",le=\"0.01\"}} 1\n\
                 h_bucket{{profile=\"y\",le=\"+Inf\"}} 1\n\
                 h_sum 1.0\nh_count {}\n",
                inf + 1
            )
        };
        // 10 observations: 5 under 1 ms, 4 more under 10 ms, 1 above the top bound.
        let (p50, p99, n) = stage_quantiles(&page(0, 0, 0), &page(5, 9, 10), "h").unwrap();
        assert_eq!(n, 10);
        assert!(close(p50, 0.001), "{p50:?}");
        assert!(close(p99, 0.01), "above the top bound reads as it: {p99:?}");
        // The router restarted (counters went down): the after page counts from zero.
        let (_, _, n) = stage_quantiles(&page(50, 90, 100), &page(5, 9, 10), "h").unwrap();
        assert_eq!(n, 11);
    }

    #[test]
    fn scenario_picker_config_parses_and_reaches_the_infergate_routers() {
        let scn = Scenario::from_yaml(
            "replicas: 2\n\
             qps: [2]\n\
             stage_seconds: 5\n\
             routers: [infergate, infergate-epp-envoy, infergate-reference, round-robin]\n\
             picker_config: |\n  \
               apiVersion: inference.networking.x-k8s.io/v1alpha1\n  \
               kind: EndpointPickerConfig\n  \
               plugins:\n  \
               - type: queue-scorer\n",
            "test",
        )
        .unwrap();
        let text = scn.picker_config.as_deref().unwrap();
        assert!(text.starts_with("apiVersion: inference.networking.x-k8s.io/v1alpha1\n"));
        assert!(text.contains("\n- type: queue-scorer\n"), "{text:?}");
        let uses: Vec<bool> = scn.routers.iter().map(|r| r.uses_picker_config()).collect();
        assert_eq!(uses, [true, true, false, false]);
        for peer in [
            RouterKind::SglangCacheAware,
            RouterKind::VllmCacheAware,
            RouterKind::VllmPowerOfTwo,
        ] {
            assert!(!peer.uses_picker_config());
        }

        let cfg = picker_config_path(Path::new("/tmp/out/logs"));
        let after = |args: &[String], flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].clone())
        };
        let serve = serve_args("/p.yaml", "infergate", Some(&cfg));
        assert_eq!(serve[0], "serve");
        assert_eq!(
            after(&serve, "--config-file").as_deref(),
            Some("/tmp/out/logs/picker-config.yaml")
        );
        assert_eq!(after(&serve, "--pool-file").as_deref(), Some("/p.yaml"));
        // --profile and --config-file exclude each other.
        assert!(!serve.contains(&"--profile".to_string()), "{serve:?}");
        let plain = serve_args("/p.yaml", "reference", None);
        assert_eq!(after(&plain, "--profile").as_deref(), Some("reference"));
        assert!(!plain.contains(&"--config-file".to_string()));

        let epp = epp_args(1, 2, 3, "/p.yaml", Some(&cfg));
        assert_eq!(epp[0], "epp");
        assert_eq!(after(&epp, "--metrics-port").as_deref(), Some("3"));
        assert_eq!(
            after(&epp, "--config-file").as_deref(),
            Some("/tmp/out/logs/picker-config.yaml")
        );
        assert!(!epp_args(1, 2, 3, "/p.yaml", None).contains(&"--config-file".to_string()));

        // An empty one is refused.
        let err = Scenario::from_yaml(
            "replicas: 2\nqps: [2]\nstage_seconds: 5\nrouters: [infergate]\npicker_config: ''\n",
            "test",
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("picker_config is empty"),
            "{err:#}"
        );
    }
}
