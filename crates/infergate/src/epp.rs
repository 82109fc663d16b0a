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

use crate::brain::{
    duration, scheduler_config, serve_metrics, shutdown_signal, Brain, MetricsAuth,
    MetricsAuthArgs, PoolArgs,
};
use crate::tls::ServerIdentity;

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
    #[command(flatten)]
    pub metrics_auth: MetricsAuthArgs,
    /// Request bodies above this many bytes are refused with 413.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Drop an ext_proc stream (and its in-flight count) after this long without a message.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub exchange_idle_timeout: Duration,
    /// Kubernetes mode: replicas elect one active picker per pool on a coordination.k8s.io
    /// Lease; the standby keeps its watches warm but reports readiness NOT_SERVING, so the
    /// gateway sends to the leader only. On by default in Kubernetes mode;
    /// `--ha-enable-leader-election=false` makes every replica active.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ha_enable_leader_election: Option<bool>,
    /// Serve ext_proc over TLS (default on, as the reference picker). Gateways connect with
    /// TLS and by default do not verify the certificate; `--secure-serving=false` serves
    /// plaintext gRPC, for a gateway configured without TLS to the picker.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_value_t = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub secure_serving: bool,
    /// Directory holding `tls.crt` and `tls.key` (PEM; a mounted kubernetes.io/tls Secret)
    /// for ext_proc. Without it, a self-signed certificate is made at start.
    #[arg(long, value_name = "DIR")]
    pub cert_path: Option<std::path::PathBuf>,
    /// The Lease's name (in the watched namespace); `<pool-name>-epp` by default.
    #[arg(long)]
    pub ha_lease_name: Option<String>,
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
        let (cfg, s) = scheduler_config(Some(p), "infergate", Duration::from_secs(2))?;
        crate::brain::metrics_path(&cfg).with_context(|| p.display().to_string())?;
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
    crate::tls::install_crypto_provider();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        rt.worker_threads(args.worker_threads);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(serve(args))
}

/// The ext_proc server's certificate: none with `--secure-serving=false`, the files under
/// `--cert-path`, or a fresh self-signed one. Checked here so that a bad file stops the start.
fn ext_proc_identity(args: &EppArgs) -> anyhow::Result<Option<tonic::transport::Identity>> {
    if !args.secure_serving {
        if let Some(dir) = &args.cert_path {
            tracing::warn!(
                cert_path = %dir.display(),
                "--cert-path is ignored: --secure-serving=false serves plaintext gRPC"
            );
        }
        tracing::info!("ext_proc serves plaintext gRPC (--secure-serving=false)");
        return Ok(None);
    }
    let identity = match &args.cert_path {
        Some(dir) => {
            let id = ServerIdentity::from_dir(dir).with_context(|| {
                format!(
                    "--cert-path {}: cannot serve ext_proc over TLS",
                    dir.display()
                )
            })?;
            tracing::info!(
                cert_path = %dir.display(), sha256 = %id.fingerprint,
                "ext_proc serves TLS with the certificate in --cert-path"
            );
            id
        }
        None => {
            let id = ServerIdentity::self_signed(
                &crate::tls::hostname().into_iter().collect::<Vec<_>>(),
            )?;
            tracing::info!(
                sha256 = %id.fingerprint,
                "ext_proc serves TLS with a self-signed certificate made at start \
                 (--cert-path to use your own, --secure-serving=false for plaintext)"
            );
            id
        }
    };
    Ok(Some(tonic::transport::Identity::from_pem(
        identity.cert_pem,
        identity.key_pem,
    )))
}

async fn serve(args: EppArgs) -> anyhow::Result<()> {
    let tls = ext_proc_identity(&args)?;
    let election = match (args.ha_enable_leader_election, args.pool.kubernetes()) {
        (Some(true), false) => anyhow::bail!(
            "--ha-enable-leader-election needs Kubernetes mode (--pool-namespace or \
             --endpoint-selector): the Lease lives in the API server"
        ),
        (on, k8s) => k8s && on.unwrap_or(true),
    };
    let brain = Brain::start(&args.pool, None).await?;

    // SIGINT/SIGTERM stops the ext_proc server and releases the Lease, both at once.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Without an election this replica is always the leader.
    let (leader_tx, leader_rx) = tokio::sync::watch::channel(!election);
    // Without an election the sender stays here, so the readiness loop's receiver stays open.
    let mut fixed_leader = None;
    let lease_task = match (&brain.kube, election) {
        (Some((client, ns)), true) => {
            let name = args
                .ha_lease_name
                .clone()
                .unwrap_or_else(|| format!("{}-epp", brain.pool_name));
            let cfg = infergate_k8s::lease::LeaseConfig::new(
                ns.clone(),
                name.clone(),
                infergate_k8s::lease::default_identity(),
            );
            tracing::info!(
                lease = %format!("{ns}/{name}"), identity = %cfg.identity,
                "leader election on; this replica serves once it holds the Lease"
            );
            Some(tokio::spawn(infergate_k8s::lease::run(
                client.clone(),
                cfg,
                leader_tx,
                stopped(stop_rx.clone()),
            )))
        }
        _ => {
            fixed_leader = Some(leader_tx);
            None
        }
    };
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
    let auth = MetricsAuth::from_args(&args.metrics_auth, brain.kube.as_ref().map(|(c, _)| c))?;
    tokio::spawn(serve_metrics(
        metrics_listener,
        brain.metrics.clone(),
        std::sync::Arc::new(auth),
    ));

    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, false).await;
    tokio::spawn(readiness(reporter, brain.datastore.clone(), leader_rx));
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
        ext_proc = %grpc_addr, tls = tls.is_some(), health = %health_addr, metrics = %metrics_addr,
        endpoints = brain.datastore.snapshot().endpoints.len(), pool = %brain.pool_name,
        "infergate epp ready"
    );
    serve_extproc(Picker::new(ctx), grpc_addr, tls, stopped(stop_rx)).await?;
    if let Some(task) = lease_task {
        // The release is bounded inside the lease loop; this only waits for it.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    drop(fixed_leader);
    tracing::info!("infergate epp stopped");
    Ok(())
}

/// Keeps the gRPC health services in step: `readiness` (and the ext_proc service) serve
/// while the datastore has synced and this replica leads; `liveness` always does.
async fn readiness(
    reporter: tonic_health::server::HealthReporter,
    ds: infergate_core::Datastore,
    mut leader: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let (synced, leads) = (ds.is_synced(), *leader.borrow_and_update());
        let serving = synced && leads;
        if last != Some(serving) {
            set_health(&reporter, serving).await;
            if serving {
                tracing::info!("ready: synced, and the leader (or no election)");
            } else if last.is_some() || synced {
                tracing::info!(synced, leader = leads, "not ready");
            }
            last = Some(serving);
        }
        // The sync flag has no notification; 20 ms of polling costs nothing measurable.
        tokio::select! {
            r = leader.changed() => {
                if r.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}
