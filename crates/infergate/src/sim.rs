//! `infergate sim`: one or more simulated vLLM replicas on consecutive ports.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use infergate_sim::engine::EosModel;
use infergate_sim::server::{Faults, MetricsFault, Server, ServerConfig};
use infergate_sim::{profile, EngineConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Eos {
    /// Always generate max_tokens.
    Never,
    /// Answer lengths log-normal around 200 tokens, capped at max_tokens (ShareGPT-like).
    Lognormal,
}

/// Flags of `infergate sim`; engine knobs are named as vLLM's engine arguments.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// First port; replica i listens on PORT+i. 0 lets the system pick each port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Independent replicas to serve from this process.
    #[arg(long, default_value_t = 1)]
    pub replicas: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Model-on-hardware profile (see --calibrate).
    #[arg(long, default_value = "llama3-8b-h100")]
    pub profile: String,
    /// Simulated seconds per real second (10 = a GPU ten times faster than real time).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Model name clients must send (default: the profile's model).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seed of replica 0; replica i uses seed+i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the profile's calibration against published figures and exit.
    #[arg(long)]
    pub calibrate: bool,
    /// Request bodies above this many bytes get 413.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,

    /// Tokens per KV-cache block (vLLM default 16)
    #[arg(long)]
    pub block_size: Option<u32>,
    /// KV-cache blocks (default: the profile's, as vLLM would find at 0.9 GPU memory)
    #[arg(long, alias = "num-gpu-blocks-override")]
    pub num_gpu_blocks: Option<u32>,
    /// Most requests in one batch (default 256)
    #[arg(long)]
    pub max_num_seqs: Option<u32>,
    /// Token budget of one step, prefill chunks included (default 8192)
    #[arg(long)]
    pub max_num_batched_tokens: Option<u32>,
    /// Default: the profile's, capped at what the KV cache holds.
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Turn automatic prefix caching off
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Adapters that may run in one batch (vLLM default 1)
    #[arg(long)]
    pub max_loras: Option<u32>,
    /// Default: max(--max-loras, 1).
    #[arg(long)]
    pub max_cpu_loras: Option<u32>,
    /// Milliseconds to load an adapter not in host memory.
    #[arg(long)]
    pub lora_load_ms: Option<f64>,
    /// Milliseconds to copy a host-resident adapter into a GPU slot.
    #[arg(long)]
    pub lora_swap_ms: Option<f64>,
    /// Each step's time varies by a uniform factor in 1 +- JITTER.
    #[arg(long)]
    pub jitter: Option<f64>,
    /// How answers end when the request does not set ignore_eos.
    #[arg(long, value_enum, default_value = "lognormal")]
    pub eos: Eos,
    /// LoRA adapters loaded at start, as name=path (no file is read).
    #[arg(long, num_args = 1.., value_parser = lora_module)]
    pub lora_modules: Vec<(String, String)>,

    /// Fraction (0..=1) of completion requests answered at once with --fault-error-status.
    #[arg(long, default_value_t = 0.0)]
    pub fault_error_rate: f64,
    #[arg(long, default_value_t = 500)]
    pub fault_error_status: u16,
    /// Milliseconds added before each completion request is served.
    #[arg(long, default_value_t = 0)]
    pub fault_latency_ms: u64,
    /// Cut streamed responses (connection closed) after this many tokens.
    #[arg(long)]
    pub fault_drop_after_tokens: Option<u32>,
    /// /metrics behaviour: ok, garbage, missing or hang.
    #[arg(long, default_value = "ok")]
    pub fault_metrics: MetricsFault,
    /// Accept completion requests and never answer.
    #[arg(long)]
    pub fault_hang: bool,
    /// Every replica stops (port closed, connections dropped) after this many seconds.
    #[arg(long)]
    pub fault_exit_after: Option<f64>,
}

fn lora_module(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_owned(), p.to_owned())),
        _ => Err(format!("{s:?} is not name=path")),
    }
}

fn engine_config(args: &SimArgs, p: &profile::Profile) -> EngineConfig {
    let mut cfg = EngineConfig::for_profile(p);
    if let Some(v) = args.block_size {
        cfg.block_size = v;
    }
    if let Some(v) = args.num_gpu_blocks {
        cfg.num_gpu_blocks = v;
    }
    if let Some(v) = args.max_num_seqs {
        cfg.max_num_seqs = v;
    }
    if let Some(v) = args.max_num_batched_tokens {
        cfg.max_num_batched_tokens = v;
    }
    cfg.max_model_len = match args.max_model_len {
        Some(v) => v,
        None => p
            .max_model_len
            .min(cfg.num_gpu_blocks.saturating_mul(cfg.block_size)),
    };
    cfg.enable_prefix_caching = !args.no_enable_prefix_caching;
    if let Some(v) = args.max_loras {
        cfg.max_loras = v;
    }
    cfg.max_cpu_loras = args
        .max_cpu_loras
        .unwrap_or(cfg.max_cpu_loras.max(cfg.max_loras));
    if let Some(ms) = args.lora_load_ms {
        cfg.lora_load_time = ms / 1e3;
    }
    if let Some(ms) = args.lora_swap_ms {
        cfg.lora_swap_time = ms / 1e3;
    }
    if let Some(j) = args.jitter {
        cfg.jitter = j;
    }
    if let Eos::Never = args.eos {
        cfg.eos = EosModel::Never;
    }
    cfg
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let Some(profile) = profile::by_name(&args.profile) else {
        anyhow::bail!(
            "--profile {:?} is unknown (known: {})",
            args.profile,
            profile::names().join(", ")
        );
    };
    let engine = engine_config(&args, profile);
    if args.calibrate {
        print!("{}", infergate_sim::calibrate::report(profile, &engine));
        return Ok(());
    }
    if args.replicas == 0 {
        anyhow::bail!("--replicas must be at least 1");
    }
    if args.port != 0 && u32::from(args.port) + u32::from(args.replicas) - 1 > u32::from(u16::MAX) {
        anyhow::bail!(
            "ports {}..{} go past 65535; lower --port or --replicas",
            args.port,
            u32::from(args.port) + u32::from(args.replicas) - 1
        );
    }
    let cfg = ServerConfig {
        engine,
        seed: args.seed,
        served_model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| profile.model.to_owned()),
        model_root: profile.model.to_owned(),
        time_scale: args.time_scale,
        max_body_bytes: args.max_body_bytes,
        lora_modules: args.lora_modules.clone(),
        faults: Faults {
            error_rate: args.fault_error_rate,
            error_status: args.fault_error_status,
            added_latency_ms: args.fault_latency_ms,
            hang: args.fault_hang,
            drop_after_tokens: args.fault_drop_after_tokens,
            metrics: args.fault_metrics,
            exit: false,
        },
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid simulator settings: {e}"))?;
    let exit_after = match args.fault_exit_after {
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            anyhow::bail!("--fault-exit-after must be a non-negative number of seconds, not {s}")
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args, profile.name, cfg, exit_after))
}

async fn serve(
    args: SimArgs,
    profile: &str,
    cfg: ServerConfig,
    exit_after: Option<Duration>,
) -> anyhow::Result<()> {
    let mut servers = Vec::new();
    for i in 0..args.replicas {
        let port = if args.port == 0 { 0 } else { args.port + i };
        let addr = SocketAddr::new(args.host, port);
        let mut c = cfg.clone();
        c.seed = cfg.seed.wrapping_add(u64::from(i));
        let server = Server::start(addr, c)
            .await
            .with_context(|| format!("replica {i}: cannot listen on {addr}"))?;
        servers.push(server);
    }
    for (i, s) in servers.iter().enumerate() {
        println!(
            "replica {i} listening on http://{} (model {}, profile {profile})",
            s.local_addr(),
            cfg.served_model_name
        );
    }
    let servers: Vec<Arc<Server>> = servers.into_iter().map(Arc::new).collect();
    let exit_timer = async {
        if let Some(after) = exit_after {
            tokio::time::sleep(after).await;
            tracing::warn!("--fault-exit-after: every replica stops now");
            for s in &servers {
                s.exit();
            }
        }
        std::future::pending::<()>().await
    };
    let all_stopped = async {
        for s in &servers {
            s.stopped().await;
        }
    };
    tokio::select! {
        _ = all_stopped => tracing::info!("every replica has stopped"),
        _ = exit_timer => {}
        _ = crate::brain::shutdown_signal() => {
            tracing::info!("shutting down: letting open requests finish for up to 5 s");
            let drains: Vec<_> = servers
                .iter()
                .map(|s| {
                    let s = s.clone();
                    tokio::spawn(async move { s.shutdown(Duration::from_secs(5)).await })
                })
                .collect();
            for d in drains {
                let _ = d.await;
            }
        }
    }
    Ok(())
}
