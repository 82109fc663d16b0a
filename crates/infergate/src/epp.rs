//! `infergate epp`: the endpoint picker. Wires the datastore, its sources, the scrape loop,
//! the director, the ext_proc and health gRPC servers and the metrics endpoint.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use infergate_api::config::{parse_go_duration, EndpointPickerConfig, PluginKind};
use infergate_core::{build, Datastore, Director, EndpointSpec, Engine};
use infergate_extproc::service::{serve_extproc, set_health, Picker};
use infergate_extproc::{Context, Options};
use infergate_metrics::Metrics;
use infergate_scrape::scraper::{run_with_stats, ScrapeConfig, ScrapeStats};

use crate::pool_source;

fn duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s)
}

/// Flags of `infergate epp`; names and defaults follow the reference picker where it has them.
#[derive(Args, Debug)]
pub struct EppArgs {
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// gRPC health port (services liveness, readiness, envoy.service.ext_proc.v3.ExternalProcessor).
    #[arg(long, default_value_t = 9003)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port (/metrics).
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address every server binds; use 0.0.0.0 inside a Pod.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen_address: IpAddr,
    /// How often each model server's /metrics is scraped.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub refresh_metrics_interval: Duration,
    /// Metrics older than this are ignored when scoring.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub metrics_staleness_threshold: Duration,
    /// Timeout of one scrape.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub metrics_timeout: Duration,
    /// EndpointPickerConfig YAML; the reference's default profile when absent.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Static pool: comma-separated ip:port list.
    #[arg(long, value_delimiter = ',', conflicts_with = "pool_file")]
    pub endpoints: Vec<SocketAddr>,
    /// Engine of the `--endpoints` servers: vllm, sglang, trtllm-serve, triton or llamacpp.
    #[arg(long, default_value = "vllm")]
    pub engine: Engine,
    /// Static pool file: StaticEndpoints, InferenceObjective, InferenceModelRewrite (and
    /// optional InferencePool) documents; edits are applied without a restart.
    #[arg(long)]
    pub pool_file: Option<PathBuf>,
    /// How often the pool file is checked for edits.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub pool_file_poll_interval: Duration,
    /// Pool name used in metric labels (the InferencePool's name when the pool file has one).
    #[arg(long, default_value = "infergate")]
    pub pool_name: String,
    /// Request bodies above this many bytes are refused with 413.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Refuse (404) requests for models no InferenceModelRewrite or InferenceModel names.
    #[arg(long)]
    pub strict_models: bool,
    /// Drop an ext_proc stream (and its in-flight count) after this long without a message.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub exchange_idle_timeout: Duration,
    /// Threads serving requests and scrapes; 0 means one per core.
    #[arg(long, env = "INFERGATE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Seed for tie-breaking and weighted choices (reproducible runs).
    #[arg(long, default_value_t = 0x1f_e9a7e)]
    pub seed: u64,
}

/// Load and build the scheduler config, or the default one.
fn scheduler_config(
    path: Option<&Path>,
    staleness: Duration,
) -> anyhow::Result<(EndpointPickerConfig, infergate_core::SchedulerConfig)> {
    let cfg = match path {
        Some(p) => EndpointPickerConfig::load(p)?,
        None => EndpointPickerConfig::default_config(),
    };
    let sched = build::scheduler_config(&cfg, staleness).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}",
            path.map_or("default config".into(), |p| p.display().to_string())
        )
    })?;
    Ok((cfg, sched))
}

/// `infergate config check`.
pub fn check(config: Option<&Path>, pool: Option<&Path>) -> anyhow::Result<()> {
    if config.is_none() && pool.is_none() {
        anyhow::bail!("nothing to check: pass --config-file and/or --pool-file");
    }
    if let Some(p) = config {
        let (_, s) = scheduler_config(Some(p), Duration::from_secs(2))?;
        let scorers: Vec<String> = s
            .profile
            .scorers
            .iter()
            .map(|(s, w)| format!("{} (weight {w})", s.type_name()))
            .collect();
        let filters: Vec<&str> = s.profile.filters.iter().map(|f| f.type_name()).collect();
        println!(
            "{}: ok: profile {:?}: filters [{}], scorers [{}], picker {}",
            p.display(),
            s.profile.name,
            filters.join(", "),
            scorers.join(", "),
            s.profile.picker.type_name()
        );
    }
    if let Some(p) = pool {
        let file = infergate_api::pool_file::PoolFile::load(p)?;
        println!(
            "{}: ok: {} endpoints, {} objectives, {} rewrites, {} legacy models",
            p.display(),
            file.endpoints.len(),
            file.objectives.len(),
            file.rewrites.len(),
            file.models.len()
        );
    }
    Ok(())
}

pub fn run(args: EppArgs) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        rt.worker_threads(args.worker_threads);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(serve(args))
}

async fn serve(args: EppArgs) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let clock: Arc<dyn Fn() -> Duration + Send + Sync> = Arc::new(move || epoch.elapsed());

    let (cfg, mut sched) = scheduler_config(
        args.config_file.as_deref(),
        args.metrics_staleness_threshold,
    )?;
    sched.strict_models = args.strict_models;
    if cfg.flow_control.is_some() || cfg.feature_gates.iter().any(|g| g == "flowControl") {
        // Say it loudly rather than pretend: queueing by fairness and priority bands is not
        // built yet; saturation shedding by priority still applies.
        tracing::warn!(
            "the config enables flowControl, which infergate does not implement yet; \
             requests are not queued, and priority < 0 is shed with 429 while the pool is saturated"
        );
    }
    let conformance = cfg
        .plugins
        .iter()
        .any(|p| matches!(p.kind, PluginKind::HeaderBasedTestingFilter))
        && sched
            .profile
            .filters
            .iter()
            .any(|f| f.type_name() == "header-based-testing-filter");

    let ds = Datastore::new();
    let mut pool_name = args.pool_name.clone();
    match (&args.pool_file, args.endpoints.is_empty()) {
        (Some(path), _) => {
            pool_source::apply_file(&ds, path).with_context(|| "cannot start with this pool file")?;
            if let Ok(f) = infergate_api::pool_file::PoolFile::load(path) {
                if let Some(p) = f.pool {
                    pool_name = p.metadata.name;
                }
            }
            tokio::spawn(pool_source::watch_file(ds.clone(), path.clone(), args.pool_file_poll_interval));
        }
        (None, false) => {
            ds.set_endpoints(args.endpoints.iter().map(|a| EndpointSpec::new(*a, args.engine)).collect());
        }
        (None, true) => anyhow::bail!(
            "no pool given: pass --endpoints ip:port[,ip:port...] (with --engine) or --pool-file FILE"
        ),
    }
    ds.mark_synced();

    let metrics = Arc::new(Metrics::new(&pool_name));
    let observer = {
        let metrics = metrics.clone();
        Arc::new(
            move |point: &'static str, plugin: &'static str, took: Duration| {
                metrics.observe_plugin(point, plugin, took)
            },
        )
    };
    let director =
        Arc::new(Director::new(ds.clone(), sched).with_plugin_timing(clock.clone(), observer));
    let ctx = Arc::new(Context::new(
        director.clone(),
        metrics.clone(),
        clock.clone(),
        Options {
            max_body_bytes: args.max_body_bytes,
            conformance_headers: conformance,
            idle_timeout: args.exchange_idle_timeout,
        },
        args.seed,
    ));

    let stats = ScrapeStats::new();
    tokio::spawn(run_with_stats(
        ds.clone(),
        ScrapeConfig {
            interval: args.refresh_metrics_interval,
            timeout: args.metrics_timeout,
            ..Default::default()
        },
        clock.clone(),
        stats,
    ));

    {
        let (metrics, director, clock, ds) =
            (metrics.clone(), director.clone(), clock.clone(), ds.clone());
        let staleness = args.metrics_staleness_threshold;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                metrics.refresh_pool(&ds, clock(), staleness, director.prefix_stats());
            }
        });
    }

    let metrics_addr = SocketAddr::new(args.listen_address, args.metrics_port);
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} for metrics (--metrics-port)"))?;
    tokio::spawn(serve_metrics(metrics_listener, metrics.clone()));

    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ds.is_synced()).await;
    let health_addr = SocketAddr::new(args.listen_address, args.grpc_health_port);
    let health_listener = tokio::net::TcpListener::bind(health_addr)
        .await
        .with_context(|| {
            format!("cannot listen on {health_addr} for gRPC health (--grpc-health-port)")
        })?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                health_listener,
            )),
    );

    let grpc_addr = SocketAddr::new(args.listen_address, args.grpc_port);
    // Bind first so a busy port is reported clearly before anything is announced.
    drop(
        std::net::TcpListener::bind(grpc_addr)
            .with_context(|| format!("cannot listen on {grpc_addr} for ext_proc (--grpc-port)"))?,
    );
    tracing::info!(
        ext_proc = %grpc_addr, health = %health_addr, metrics = %metrics_addr,
        endpoints = ds.snapshot().endpoints.len(), pool = %pool_name,
        "infergate epp ready"
    );
    serve_extproc(Picker::new(ctx), grpc_addr, shutdown_signal()).await?;
    tracing::info!("infergate epp stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(metrics.encode())))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                        };
                        Ok::<_, Infallible>(resp.unwrap_or_default())
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
