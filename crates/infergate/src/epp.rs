//! `infergate epp`: the endpoint picker. Wires the datastore, its sources, the scrape loop,
//! the director, the ext_proc and health gRPC servers and the metrics endpoint.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use infergate_extproc::service::{serve_extproc, set_health, Picker};
use infergate_extproc::{Context, Options};

use crate::brain::{duration, scheduler_config, serve_metrics, shutdown_signal, Brain, PoolArgs};

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
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Request bodies above this many bytes are refused with 413.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Drop an ext_proc stream (and its in-flight count) after this long without a message.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub exchange_idle_timeout: Duration,
    /// Threads serving requests and scrapes; 0 means one per core.
    #[arg(long, env = "INFERGATE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

/// `infergate config check`.
pub fn check(config: Option<&Path>, pool: Option<&Path>) -> anyhow::Result<()> {
    if config.is_none() && pool.is_none() {
        anyhow::bail!("nothing to check: pass --config-file and/or --pool-file");
    }
    if let Some(p) = config {
        let (_, s) = scheduler_config(Some(p), "infergate", Duration::from_secs(2))?;
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
    let brain = Brain::start(&args.pool, None).await?;
    let ctx = Arc::new(Context::new(
        brain.director.clone(),
        brain.metrics.clone(),
        brain.clock.clone(),
        Options {
            max_body_bytes: args.max_body_bytes,
            conformance_headers: brain.test_filter,
            idle_timeout: args.exchange_idle_timeout,
        },
        args.pool.seed,
    ));

    let metrics_addr = SocketAddr::new(args.listen_address, args.metrics_port);
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} for metrics (--metrics-port)"))?;
    tokio::spawn(serve_metrics(metrics_listener, brain.metrics.clone()));

    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, brain.datastore.is_synced()).await;
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
        endpoints = brain.datastore.snapshot().endpoints.len(), pool = %brain.pool_name,
        "infergate epp ready"
    );
    serve_extproc(Picker::new(ctx), grpc_addr, shutdown_signal()).await?;
    tracing::info!("infergate epp stopped");
    Ok(())
}
