//! `infergate serve`: the standalone OpenAI-compatible gateway, with the picker's brain
//! in-process. With no pool configured it starts simulated vLLM replicas of its own, so the
//! first command a newcomer runs works on a machine with nothing else installed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use infergate_gateway::{ApiKeys, Gateway, GatewayConfig};
use infergate_sim::server::{Server, ServerConfig};

use crate::brain::{duration, shutdown_signal, Brain, PoolArgs};
use crate::tls::ServerIdentity;

/// Flags of `infergate serve`. The pool and scheduler flags are the same as `infergate epp`'s.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// HTTP port (HTTP/1.1 and h2c).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to bind; 0.0.0.0 to serve other machines.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen_address: IpAddr,
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Request bodies above this many bytes are refused with 413.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Most request headers accepted (HTTP/1.1); more is refused with 431.
    #[arg(long, default_value_t = 100)]
    pub max_headers: usize,
    /// A client must send its request head within this long.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// A client must send its whole body within this long (408 otherwise).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub body_read_timeout: Duration,
    /// Connecting to a model server must succeed within this long.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// A model server must answer (status and headers) within this long. A non-streamed
    /// completion answers only when it is complete, so keep this above your longest one.
    #[arg(long, default_value = "300s", value_parser = duration)]
    pub first_byte_timeout: Duration,
    /// A model server must send the response head of a streamed request within this long
    /// (vLLM sends it before generating); else the request is tried on another replica, or
    /// answered 504. Keep it below --retry-deadline so that it can be retried. 0 turns it off.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub stream_first_byte_timeout: Duration,
    /// A stream that goes this long without a byte from the model server is ended.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub idle_stream_timeout: Duration,
    /// Attempts per request, the first included, before any byte reached the client.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Base of the exponential backoff between attempts (with full jitter).
    #[arg(long, default_value = "20ms", value_parser = duration)]
    pub retry_backoff: Duration,
    /// No new attempt starts after this long from the request's arrival.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub retry_deadline: Duration,
    /// Consecutive failures that eject a model server for a while.
    #[arg(long, default_value_t = 5)]
    pub breaker_failures: u32,
    /// How long an ejected model server rests before one probe request (doubles on repeats).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub breaker_cooldown: Duration,
    /// API keys, one per line: `KEY [OBJECTIVE]`; requests then need `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// API keys as `KEY[:OBJECTIVE],...` (read from the environment so keys stay out of `ps`).
    #[arg(long, env = "INFERGATE_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key-file). Off by default:
    /// OpenAI clients speak plain HTTP to a local gateway unless given an https:// base URL.
    #[arg(long, requires = "tls_key_file", value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of --tls-cert-file.
    #[arg(long, requires = "tls_cert_file", value_name = "FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// On SIGINT/SIGTERM, in-flight requests get this long to finish.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Simulated replicas to start when no pool is given (--endpoints / --pool-file).
    #[arg(long, default_value_t = 4)]
    pub sim_replicas: u16,
    /// Profile of those replicas (see `infergate sim --calibrate`).
    #[arg(long, default_value = "llama3-8b-h100")]
    pub sim_profile: String,
    /// Threads serving requests and scrapes; 0 means one per core.
    #[arg(long, env = "INFERGATE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        rt.worker_threads(args.worker_threads);
    }
    rt.enable_all().build()?.block_on(serve(args))
}

fn api_keys(args: &ServeArgs) -> anyhow::Result<Option<ApiKeys>> {
    let mut keys = match &args.api_key_file {
        Some(path) => Some(ApiKeys::from_file(path)?),
        None => None,
    };
    if let Some(v) = &args.api_keys {
        let env = ApiKeys::from_env_value(v).context("INFERGATE_API_KEYS / --api-keys")?;
        keys = Some(match keys {
            Some(k) => k.merge(env),
            None => env,
        });
    }
    Ok(keys)
}

/// Starts `n` simulated replicas on free ports of 127.0.0.1.
async fn start_sims(n: u16, profile: &str) -> anyhow::Result<Vec<Server>> {
    let p = infergate_sim::profile::by_name(profile).with_context(|| {
        format!(
            "unknown --sim-profile {profile:?}; known: {}",
            infergate_sim::profile::names().join(", ")
        )
    })?;
    let mut servers = Vec::new();
    for i in 0..n.max(1) {
        let mut cfg = ServerConfig::for_profile(p);
        cfg.seed = i as u64;
        let s = Server::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
            .await
            .context("cannot start a simulated replica")?;
        servers.push(s);
    }
    Ok(servers)
}

/// The HTTPS config from --tls-cert-file/--tls-key-file, checked before anything starts.
fn tls_config(args: &ServeArgs) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&args.tls_cert_file, &args.tls_key_file) else {
        return Ok(None);
    };
    let id = ServerIdentity::from_files(cert, key)
        .context("--tls-cert-file/--tls-key-file: cannot serve HTTPS")?;
    tracing::info!(cert = %cert.display(), sha256 = %id.fingerprint, "serving HTTPS");
    // Offer h2 first, as the plaintext port serves both HTTP/1.1 and h2c.
    Ok(Some(id.rustls_config(&[b"h2", b"http/1.1"])?))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tls = tls_config(&args)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let keys = api_keys(&args)?;
    let auth_on = keys.is_some();
    let sims = if args.pool.endpoints.is_empty()
        && args.pool.pool_file.is_none()
        && !args.pool.kubernetes()
    {
        start_sims(args.sim_replicas, &args.sim_profile).await?
    } else {
        Vec::new()
    };
    let fallback = (!sims.is_empty()).then(|| sims.iter().map(|s| s.local_addr()).collect());
    let brain = Brain::start(&args.pool, fallback).await?;

    let addr = SocketAddr::new(args.listen_address, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--port, --listen-address)"))?;
    let local = listener.local_addr()?;
    let cfg = GatewayConfig {
        max_body_bytes: args.max_body_bytes,
        max_headers: args.max_headers,
        header_read_timeout: args.header_read_timeout,
        body_read_timeout: args.body_read_timeout,
        connect_timeout: args.connect_timeout,
        first_byte_timeout: args.first_byte_timeout,
        stream_first_byte_timeout: args.stream_first_byte_timeout,
        idle_stream_timeout: args.idle_stream_timeout,
        max_attempts: args.max_attempts.max(1),
        retry_backoff: args.retry_backoff,
        retry_deadline: args.retry_deadline,
        breaker_failures: args.breaker_failures.max(1),
        breaker_cooldown: args.breaker_cooldown,
        api_keys: keys,
        shutdown_grace: args.shutdown_grace,
        ..GatewayConfig::default()
    };
    let gateway = Gateway::new(
        cfg,
        brain.datastore.clone(),
        brain.director.clone(),
        brain.metrics.clone(),
        brain.clock.clone(),
        args.pool.seed,
    );

    let endpoints = brain.datastore.snapshot().endpoints.len();
    tracing::info!(%local, endpoints, pool = %brain.pool_name, "infergate serve ready");
    if let Some(first) = sims.first() {
        let model = &first.config().served_model_name;
        let list: Vec<String> = sims.iter().map(|s| s.local_addr().to_string()).collect();
        println!(
            "no pool given (--endpoints or --pool-file), so {} simulated {} replicas serve {model}: {}",
            sims.len(),
            args.sim_profile,
            list.join(", ")
        );
        let auth = if auth_on {
            " -H 'authorization: Bearer YOUR_KEY'"
        } else {
            ""
        };
        // A certificate curl does not know yet (say, self-signed) would fail the first try.
        let insecure = if scheme == "https" { "k" } else { "" };
        println!("try:");
        println!(
            "  curl -s{insecure} {scheme}://{local}/v1/chat/completions -H 'content-type: application/json'{auth} \\\n    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 32}}'"
        );
    }
    // Last, so whoever waits for this line has the whole banner.
    println!("infergate serve: listening on {scheme}://{local}");
    gateway
        .serve_with_tls(listener, tls, shutdown_signal())
        .await?;
    for s in &sims {
        s.shutdown(Duration::from_secs(1)).await;
    }
    tracing::info!("infergate serve stopped");
    Ok(())
}
