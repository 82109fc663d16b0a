//! `infergate bench`: a load test against OpenAI-compatible servers (a gateway, `infergate
//! sim` replicas, vLLM), with the workloads of the bench lab, written out as a report.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use infergate_bench::http::{self, HttpConfig, Mode, Progress};
use infergate_bench::report::{self, RunReport};
use infergate_bench::stats::{by_priority, summarize, Outcome};
use infergate_bench::workload::{Arrivals, LoraMix, PriorityMix, Shape, Stage, Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// ShareGPT-like chat: log-normal lengths, means 230 prompt / 203 output tokens.
    Chat,
    /// inference-perf's shared_prefix: groups of prompts sharing a system prompt.
    Prefix,
    /// Chat requests spread over LoRA adapters with Zipf popularity.
    Lora,
    /// Long prompts (uniform between --long-min-len and --long-max-len tokens).
    Long,
    /// Chat requests, a share of them sheddable batch work (objective "batch").
    Priority,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrivalKind {
    /// Exponential gaps between requests (mean 1/QPS).
    Poisson,
    /// One request every 1/QPS seconds exactly.
    Constant,
}

/// What the requests look like: `--workload` and its knobs. Scenario files take the same
/// knobs under `workload:` (with `kind` for `--workload`), hence the serde derive; the
/// defaults of both must agree (see [`Default`] below).
#[derive(Args, Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadArgs {
    /// What the requests look like.
    #[arg(long, value_enum, default_value = "chat")]
    #[serde(rename = "kind")]
    pub workload: WorkloadKind,
    /// prefix: number of groups sharing a system prompt (inference-perf num_groups).
    #[arg(long, default_value_t = 150)]
    pub groups: u32,
    /// prefix: prompts per group (inference-perf num_prompts_per_group).
    #[arg(long, default_value_t = 5)]
    pub prompts_per_group: u32,
    /// prefix: tokens of each group's system prompt (inference-perf system_prompt_len).
    #[arg(long, default_value_t = 6000)]
    pub system_len: u32,
    /// prefix: tokens of each request's own question (inference-perf question_len).
    #[arg(long, default_value_t = 1200)]
    pub question_len: u32,
    /// prefix and long: output tokens per request (inference-perf output_len; default 1000
    /// for prefix, 256 for long).
    #[arg(long)]
    pub output_len: Option<u32>,
    /// long: shortest prompt in tokens.
    #[arg(long, default_value_t = 8000)]
    pub long_min_len: u32,
    /// long: longest prompt in tokens.
    #[arg(long, default_value_t = 32000)]
    pub long_max_len: u32,
    /// lora: number of adapters (adapter-0 .. adapter-N-1, Zipf popularity, s = 1).
    #[arg(long, default_value_t = 8)]
    pub adapters: u32,
    /// priority: fraction (0..=1) of requests that are sheddable batch work.
    #[arg(long, default_value_t = 0.3)]
    pub batch_share: f64,

    /// Open loop: arrival process.
    #[arg(long, value_enum, default_value = "poisson")]
    pub arrivals: ArrivalKind,
}

impl Default for WorkloadArgs {
    fn default() -> Self {
        WorkloadArgs {
            workload: WorkloadKind::Chat,
            groups: 150,
            prompts_per_group: 5,
            system_len: 6000,
            question_len: 1200,
            output_len: None,
            long_min_len: 8000,
            long_max_len: 32000,
            adapters: 8,
            batch_share: 0.3,
            arrivals: ArrivalKind::Poisson,
        }
    }
}

/// `infergate bench` subcommands.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Run a scenario file: a simulated pool, a workload and a QPS sweep, through each of
    /// several routers in turn, into one report.
    Scenario(crate::scenario::ScenarioArgs),
}

/// Flags of `infergate bench`.
#[derive(Args, Debug)]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// Base URL of a server (http://HOST:PORT). Repeat it to spread requests round robin
    /// over several servers (client-side load balancing, like a Kubernetes Service).
    #[arg(long = "url", value_name = "URL", required = true)]
    pub urls: Vec<String>,
    /// Model to request (default: the first id of GET {url}/v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// API key, sent as "Authorization: Bearer KEY".
    #[arg(long, env = "INFERGATE_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Name of this setup in the report's "router" column (default: the URL, or
    /// "round-robin xN" for several).
    #[arg(long)]
    pub label: Option<String>,

    #[command(flatten)]
    pub w: WorkloadArgs,

    /// Open loop: request rates to run, comma separated (each a stage of --stage-seconds,
    /// reported as its own row). Default 5 unless --concurrency is given.
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub qps: Vec<f64>,
    /// Open loop: seconds of arrivals per QPS stage.
    #[arg(long, default_value_t = 30.0)]
    pub stage_seconds: f64,
    /// Closed loop: keep this many requests outstanding (instead of --qps).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Closed loop: requests to send in all.
    #[arg(long, default_value_t = 100, requires = "concurrency")]
    pub requests: usize,

    /// Seed of the workload; every stage uses the same one.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Ask for whole answers instead of streams (no TTFT or ITL then: first token = end).
    #[arg(long)]
    pub no_stream: bool,
    /// Seconds one request may take before it counts as an error.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Bound on the whole benchmark in seconds: requests open then are cancelled (errors)
    /// and later stages are skipped.
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// Directory for report.json, report.md and ttft-p90.svg (created if missing).
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
}

/// Exit status for a server that cannot be reached (1 is any other failure).
const EXIT_UNREACHABLE: i32 = 2;

fn positive_secs(v: f64, flag: &str) -> anyhow::Result<Duration> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        anyhow::bail!("{flag} must be a positive number of seconds, not {v}")
    }
}

impl WorkloadArgs {
    /// The workload's name in reports ("chat", "prefix", ...).
    pub fn name(&self) -> String {
        format!("{:?}", self.workload).to_lowercase()
    }

    fn shape(&self) -> Shape {
        match self.workload {
            WorkloadKind::Chat | WorkloadKind::Lora | WorkloadKind::Priority => Shape::sharegpt(),
            WorkloadKind::Prefix => Shape::SharedPrefix {
                groups: self.groups,
                prompts_per_group: self.prompts_per_group,
                system_len: self.system_len,
                question_len: self.question_len,
                output_len: self.output_len.unwrap_or(1000),
            },
            WorkloadKind::Long => Shape::LongContext {
                min_input: self.long_min_len,
                max_input: self.long_max_len,
                output: self.output_len.unwrap_or(256),
            },
        }
    }

    /// The workload with these knobs, `stages` and `seed`.
    pub fn build(&self, stages: Vec<Stage>, seed: u64) -> Workload {
        Workload {
            shape: self.shape(),
            arrivals: match self.arrivals {
                ArrivalKind::Poisson => Arrivals::Poisson,
                ArrivalKind::Constant => Arrivals::Constant,
            },
            stages,
            lora: (self.workload == WorkloadKind::Lora).then_some(LoraMix {
                adapters: self.adapters,
                zipf_s: 1.0,
                share: 1.0,
            }),
            priorities: (self.workload == WorkloadKind::Priority).then_some(PriorityMix {
                batch_share: self.batch_share,
            }),
            seed,
        }
    }

    /// Rejects knob values that make no workload (named as the command-line flags).
    pub fn check(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.batch_share) {
            anyhow::bail!("--batch-share must be in 0..=1, not {}", self.batch_share);
        }
        if self.workload == WorkloadKind::Lora && self.adapters == 0 {
            anyhow::bail!("--adapters must be at least 1");
        }
        if self.workload == WorkloadKind::Long && self.long_min_len > self.long_max_len {
            anyhow::bail!("--long-min-len must not exceed --long-max-len");
        }
        if self.workload == WorkloadKind::Prefix
            && (self.groups == 0 || self.prompts_per_group == 0)
        {
            anyhow::bail!("--groups and --prompts-per-group must be at least 1");
        }
        Ok(())
    }
}

impl BenchArgs {
    fn workload(&self, stages: Vec<Stage>) -> Workload {
        self.w.build(stages, self.seed)
    }

    fn check(&self) -> anyhow::Result<()> {
        positive_secs(self.timeout, "--timeout")?;
        if let Some(m) = self.max_seconds {
            positive_secs(m, "--max-seconds")?;
        }
        if self.concurrency.is_none() {
            positive_secs(self.stage_seconds, "--stage-seconds")?;
            if let Some(q) = self.qps.iter().find(|q| !(q.is_finite() && **q > 0.0)) {
                anyhow::bail!("--qps values must be positive numbers, not {q}");
            }
        }
        if self.concurrency == Some(0) {
            anyhow::bail!("--concurrency must be at least 1");
        }
        self.w.check()
    }

    fn label(&self) -> String {
        match (&self.label, self.urls.as_slice()) {
            (Some(l), _) => l.clone(),
            (None, [one]) => one.clone(),
            (None, many) => format!("round-robin x{}", many.len()),
        }
    }
}

pub fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchCommand::Scenario(s)) = args.command.take() {
        return crate::scenario::run(s);
    }
    args.check()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

/// Checks each URL answers (GET /v1/models); exits with status 2 if one does not.
async fn probe(args: &BenchArgs) -> anyhow::Result<String> {
    let key = args.api_key.as_deref();
    let mut first_list = None;
    for url in &args.urls {
        match http::list_models(url, key, Duration::from_secs(5)).await {
            Ok(list) => {
                first_list.get_or_insert(Ok(list));
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if msg.starts_with("cannot reach") {
                    eprintln!(
                        "infergate bench: {msg}\n\
                         Is a server listening at {url}? Start simulated replicas with \
                         `infergate sim --replicas N` or a gateway with `infergate serve`."
                    );
                    std::process::exit(EXIT_UNREACHABLE);
                }
                // It answers, just not with a model list: fine when --model is given.
                first_list.get_or_insert(Err(e));
            }
        }
    }
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let list = first_list
        .expect("at least one URL")
        .context("cannot pick a model; pass --model")?;
    list.into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("{}/v1/models lists no model; pass --model", args.urls[0]))
}

pub(crate) fn progress_bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    // Redraw twice a second so the elapsed time moves while requests are in flight.
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let model = probe(&args).await?;
    let label = args.label();
    let workload_name = args.w.name();
    let started = Instant::now();
    let bound = args.max_seconds.map(Duration::from_secs_f64);
    let mut cfg = HttpConfig::new(args.urls.clone(), model.clone());
    cfg.stream = !args.no_stream;
    cfg.timeout = Duration::from_secs_f64(args.timeout);
    cfg.api_key = args.api_key.clone();

    // (QPS of the row, the requests) of each run.
    let runs: Vec<(Option<f64>, Vec<_>)> = match args.concurrency {
        Some(n) => {
            cfg.mode = Mode::Closed { concurrency: n };
            vec![(None, args.workload(Vec::new()).generate_n(args.requests))]
        }
        None => {
            let qps = if args.qps.is_empty() {
                vec![5.0]
            } else {
                args.qps.clone()
            };
            qps.iter()
                .map(|&q| {
                    let w = args.workload(vec![Stage {
                        qps: q,
                        seconds: args.stage_seconds,
                    }]);
                    (Some(q), w.generate())
                })
                .collect()
        }
    };
    eprintln!(
        "infergate bench: {} workload, model {model}, {} -> {}",
        workload_name,
        match args.concurrency {
            Some(n) => format!("closed loop, concurrency {n}, {} requests", args.requests),
            None => format!(
                "open loop, QPS {:?} x {} s",
                runs.iter().filter_map(|r| r.0).collect::<Vec<_>>(),
                args.stage_seconds
            ),
        },
        args.urls.join(", ")
    );

    let mut reports = Vec::new();
    for (qps, specs) in &runs {
        if let Some(b) = bound {
            let left = b.saturating_sub(started.elapsed());
            if left.is_zero() {
                eprintln!("infergate bench: --max-seconds reached; skipping the remaining stages");
                break;
            }
            cfg.deadline = Some(left);
        }
        let what = match qps {
            Some(q) => format!("QPS {q}"),
            None => format!("concurrency {}", args.concurrency.unwrap_or(0)),
        };
        let bar = progress_bar(specs.len() as u64, &what);
        let on_progress = |p: Progress| {
            bar.set_position(p.done as u64);
            if p.errors > 0 {
                bar.set_message(format!("{} errors", p.errors));
            }
        };
        let out = http::run(&cfg, specs, &on_progress).await?;
        bar.finish_and_clear();
        let row = report_row(&label, &workload_name, *qps, &out);
        let s = &row.summary;
        eprintln!(
            "infergate bench: {what}: {} ok, {} errors, {} shed of {}",
            s.ok, s.errors, s.shed, s.requests
        );
        if s.errors > 0 {
            if let Some(e) = out.iter().find_map(|o| o.error.as_deref()) {
                eprintln!("infergate bench: first error: {e}");
            }
        }
        reports.push(row);
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let write = |name: &str, text: &str| {
        let p = args.out.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    let md = report::to_markdown(&reports);
    write("report.json", &report::to_json(&reports))?;
    write("report.md", &md)?;
    write(
        "ttft-p90.svg",
        &report::svg_chart(
            &reports,
            &format!("TTFT p90, {workload_name} workload"),
            |s| s.ttft_p90 * 1e3,
            "TTFT p90 (ms)",
        ),
    )?;
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{md}")?;
    stdout.flush()?;
    eprintln!(
        "infergate bench: report in {} (report.json, report.md, ttft-p90.svg)",
        args.out.display()
    );
    Ok(())
}

/// One report row; a closed-loop run's "QPS" is the request rate it achieved.
pub(crate) fn report_row(
    label: &str,
    workload: &str,
    qps: Option<f64>,
    out: &[Outcome],
) -> RunReport {
    let duration = out.iter().map(|o| o.done).fold(0.0, f64::max);
    let summary = summarize(out, duration);
    RunReport {
        router: label.to_owned(),
        workload: workload.to_owned(),
        stage_qps: qps.unwrap_or((summary.req_per_s * 100.0).round() / 100.0),
        by_priority: by_priority(out, duration),
        summary,
    }
}
