//! What `infergate epp` and `infergate serve` share: the pool and scheduler flags, and the
//! "brain" they build (datastore and its sources, scrape loop, director, metrics).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use infergate_api::config::{
    parse_go_duration, EndpointPickerConfig, MetricsDataSourceParams, PluginKind, Scheme,
};
use infergate_core::{build, Datastore, Director, EndpointSpec, Engine, SchedulerConfig};
use infergate_metrics::Metrics;
use infergate_scrape::scraper::{run_with_stats, ScrapeConfig, ScrapeStats};
use infergate_scrape::{ScrapeTls, Transport, Trust};

use crate::pool_source;

/// The clock every component reads: time since the process started.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

pub fn duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s)
}

/// Where the pool comes from and how it is scheduled; the same flags in both modes, so a
/// user can move between `epp` and `serve` without rewriting anything.
#[derive(Args, Debug, Clone)]
pub struct PoolArgs {
    /// How often each model server's /metrics is scraped.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub refresh_metrics_interval: Duration,
    /// Metrics older than this are ignored when scoring.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub metrics_staleness_threshold: Duration,
    /// Timeout of one scrape.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub metrics_timeout: Duration,
    /// Scheme of the model servers' /metrics: `http` or `https`. `https` here or `scheme:
    /// https` in the config's metrics-data-source scrapes over TLS, never falling back to
    /// plain HTTP.
    #[arg(long, value_parser = ["http", "https"])]
    pub model_server_metrics_scheme: Option<String>,
    /// With https: do not verify the model servers' certificates (encrypted, but not
    /// authenticated; warned about at start). When not given, the config's
    /// metrics-data-source `insecureSkipVerify` decides (true by default, as in the
    /// reference picker); `=false` verifies against the platform trust store. Never with
    /// --model-server-metrics-ca-file.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub model_server_metrics_https_insecure_skip_verify: Option<bool>,
    /// With https: PEM bundle of the CA certificates that sign the model servers'
    /// certificates, used as the only trust roots (verification is then on). Servers are
    /// scraped by IP address, so each certificate must carry its Pod's IP as an IP SAN.
    #[arg(long, value_name = "PATH")]
    pub model_server_metrics_ca_file: Option<PathBuf>,
    /// EndpointPickerConfig YAML; the built-in `--profile` when absent.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Built-in scheduling profile when no --config-file is given: `infergate` (ours:
    /// predicted latency, queue, KV and prefix scorers, with in-flight accounting) or
    /// `reference` (the reference picker's default profile, without in-flight accounting,
    /// as it ships), to compare.
    #[arg(long, default_value = "infergate", value_parser = clap::builder::PossibleValuesParser::new(infergate_api::config::BUILTIN_PROFILES), conflicts_with = "config_file")]
    pub profile: String,
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
    /// Pool name used in metric labels (the InferencePool's name when the pool file has one);
    /// in Kubernetes mode, the InferencePool to serve.
    #[arg(long, default_value = "infergate")]
    pub pool_name: String,
    /// Kubernetes mode: watch the InferencePool `--pool-name` in this namespace, the Pods
    /// it selects, and the InferenceObjectives and InferenceModelRewrites that name it.
    /// Uses the in-cluster service account, or the kubeconfig outside a cluster.
    #[arg(long, conflicts_with_all = ["endpoints", "pool_file"])]
    pub pool_namespace: Option<String>,
    /// Kubernetes mode without an InferencePool object (the reference's standalone form):
    /// the Pods of --pool-namespace (`default` when not given) that carry all these labels,
    /// `key=value[,key=value...]`. InferenceObjectives and InferenceModelRewrites whose
    /// poolRef names --pool-name still apply.
    #[arg(long, value_parser = parse_selector, conflicts_with_all = ["endpoints", "pool_file"], requires = "endpoint_target_ports")]
    pub endpoint_selector: Option<BTreeMap<String, String>>,
    /// With --endpoint-selector: the model servers' ports (1 to 8, comma-separated); each
    /// port of each Pod is one endpoint.
    #[arg(long, value_delimiter = ',', requires = "endpoint_selector")]
    pub endpoint_target_ports: Vec<u16>,
    /// Refuse (404) requests for models no InferenceModelRewrite or InferenceModel names.
    #[arg(long)]
    pub strict_models: bool,
    /// Seed for tie-breaking and weighted choices (reproducible runs).
    #[arg(long, default_value_t = 0x1f_e9a7e)]
    pub seed: u64,
}

impl PoolArgs {
    /// Whether the pool comes from the Kubernetes API (`--pool-namespace` or
    /// `--endpoint-selector`).
    pub fn kubernetes(&self) -> bool {
        self.pool_namespace.is_some() || self.endpoint_selector.is_some()
    }

    /// The namespace watched in Kubernetes mode.
    pub fn namespace(&self) -> String {
        self.pool_namespace
            .clone()
            .unwrap_or_else(|| "default".to_string())
    }
}

/// Parses `--endpoint-selector`: equality terms `key=value` (or `key==value`), comma-separated.
fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if term.contains("!=") || term.contains(" in ") || term.contains(" notin ") {
            return Err(format!(
                "{term:?}: only equality terms (key=value) are supported, as in an InferencePool's matchLabels"
            ));
        }
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| format!("{term:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.len() > 253 || v.len() > 63 {
            return Err(format!(
                "{term:?}: a label key is 1 to 253 characters and a value at most 63"
            ));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("label {k:?} is given twice"));
        }
    }
    if out.is_empty() {
        return Err("the selector is empty; give at least one key=value".into());
    }
    Ok(out)
}

/// Load and build the scheduler config from `path`, or the built-in profile `builtin`.
pub fn scheduler_config(
    path: Option<&Path>,
    builtin: &str,
    staleness: Duration,
) -> anyhow::Result<(EndpointPickerConfig, SchedulerConfig)> {
    let cfg = match path {
        Some(p) => EndpointPickerConfig::load(p)?,
        None => EndpointPickerConfig::builtin(builtin).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown profile {builtin:?}; built in: {}",
                infergate_api::config::BUILTIN_PROFILES.join(", ")
            )
        })?,
    };
    let mut sched = build::scheduler_config(&cfg, staleness).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}",
            path.map_or(format!("profile {builtin}"), |p| p.display().to_string())
        )
    })?;
    // The reference counts nothing it sent since the last scrape; compare like with like.
    if path.is_none() && builtin == "reference" {
        sched.inflight_accounting = false;
    }
    Ok((cfg, sched))
}

/// The parameters of the config's `metrics-data-source` (the last one, if several), or
/// their defaults without one.
pub fn metrics_data_source(cfg: &EndpointPickerConfig) -> MetricsDataSourceParams {
    cfg.plugins
        .iter()
        .filter_map(|p| match &p.kind {
            PluginKind::MetricsDataSource(params) => Some(params.clone()),
            _ => None,
        })
        .next_back()
        .unwrap_or_default()
}

/// The metrics path the config's `metrics-data-source` names (`/metrics` without one).
pub fn metrics_path(cfg: &EndpointPickerConfig) -> anyhow::Result<String> {
    Ok(metrics_data_source(cfg).path)
}

/// How model servers are scraped, from the flags and the config's `metrics-data-source`:
/// over https when either asks for it; then trusting the CA bundle when one is given, else
/// skipping verification when the flag (or, without it, the config) says so, else
/// verifying against the platform trust store. Errors stop the start and name the flag.
pub fn scrape_transport(
    args: &PoolArgs,
    source: &MetricsDataSourceParams,
) -> anyhow::Result<Transport> {
    let https = source.scheme == Scheme::Https
        || args.model_server_metrics_scheme.as_deref() == Some("https");
    let ca_file = args.model_server_metrics_ca_file.as_ref();
    if !https {
        if let Some(path) = ca_file {
            anyhow::bail!(
                "--model-server-metrics-ca-file {} is given, but model servers are scraped over \
                 plain HTTP; add --model-server-metrics-scheme=https (or scheme: https in the \
                 config's metrics-data-source), or drop the CA file",
                path.display()
            );
        }
        return Ok(Transport::Http);
    }
    let skip_verify = args.model_server_metrics_https_insecure_skip_verify;
    let trust = match ca_file {
        Some(path) if skip_verify == Some(true) => anyhow::bail!(
            "--model-server-metrics-ca-file {} and --model-server-metrics-https-insecure-skip-verify \
             contradict each other (the CA file is for verifying); drop one",
            path.display()
        ),
        Some(path) => Trust::CaFile(path.clone()),
        None if skip_verify.unwrap_or(source.insecure_skip_verify) => Trust::InsecureSkipVerify,
        None => Trust::PlatformRoots,
    };
    let tls = ScrapeTls::new(trust.clone()).map_err(|e| match trust {
        Trust::PlatformRoots => anyhow::anyhow!(
            "scraping model servers over https with verification: {e}; give \
             --model-server-metrics-ca-file PATH (a PEM bundle of the CAs that sign the model \
             servers' certificates), or --model-server-metrics-https-insecure-skip-verify to \
             scrape without verifying"
        ),
        _ => anyhow::anyhow!("--model-server-metrics-ca-file: {e}"),
    })?;
    Ok(Transport::Https(tls))
}

/// The running brain: pool sources, scrape loop and director, with their metrics.
pub struct Brain {
    pub datastore: Datastore,
    pub director: Arc<Director>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// The profile runs `header-based-testing-filter` (the conformance tests' filter).
    pub test_filter: bool,
    pub pool_name: String,
    /// In Kubernetes mode: the API client and the namespace watched.
    pub kube: Option<(kube::Client, String)>,
}

impl Brain {
    /// Builds the brain and spawns its tasks on the current tokio runtime. `fallback`
    /// endpoints serve when the flags name no pool (`serve` passes its simulated replicas).
    pub async fn start(
        args: &PoolArgs,
        fallback: Option<Vec<SocketAddr>>,
    ) -> anyhow::Result<Brain> {
        let epoch = Instant::now();
        let clock: Clock = Arc::new(move || epoch.elapsed());

        let (cfg, mut sched) = scheduler_config(
            args.config_file.as_deref(),
            &args.profile,
            args.metrics_staleness_threshold,
        )?;
        sched.strict_models = args.strict_models;
        if let Some(fc) = &cfg.flow_control {
            tracing::info!(
                max_requests = fc.max_requests,
                max_bytes = fc.max_bytes,
                ttl = ?fc.default_request_ttl,
                "flow control on: requests wait at the picker while the pool is saturated \
                 (priority < 0 is still refused with 429, not queued)"
            );
        }

        let test_filter = cfg
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
        let mut synced_by_source = false;
        let mut kube = None;
        match (&args.pool_file, args.endpoints.is_empty(), fallback) {
            _ if args.kubernetes() => {
                let ns = args.namespace();
                let index = match &args.endpoint_selector {
                    Some(selector) => {
                        let ports = &args.endpoint_target_ports;
                        if !(1..=8).contains(&ports.len()) || ports.contains(&0) {
                            anyhow::bail!(
                                "--endpoint-target-ports needs 1 to 8 ports from 1 to 65535, got {ports:?}"
                            );
                        }
                        tracing::info!(
                            ?selector, ?ports,
                            "Kubernetes mode (standalone): Pods of namespace {ns} by label, pool name {pool_name}"
                        );
                        infergate_k8s::Index::standalone(&ns, &pool_name, selector.clone(), ports)
                    }
                    None => {
                        tracing::info!("Kubernetes mode: InferencePool {ns}/{pool_name}");
                        infergate_k8s::Index::new(&ns, &pool_name)
                    }
                };
                let client = kube::Client::try_default().await.context(
                    "Kubernetes mode (--pool-namespace / --endpoint-selector): no usable \
                     kubeconfig or in-cluster service account; set KUBECONFIG, or give \
                     --endpoints or --pool-file instead",
                )?;
                // Ready once every watched kind has been listed (the watch marks it).
                synced_by_source = true;
                tokio::spawn(infergate_k8s::watch::run_index(
                    client.clone(),
                    index,
                    ds.clone(),
                ));
                kube = Some((client, ns));
            }
            (Some(path), _, _) => {
                pool_source::apply_file(&ds, path)
                    .with_context(|| "cannot start with this pool file")?;
                if let Ok(f) = infergate_api::pool_file::PoolFile::load(path) {
                    if let Some(p) = f.pool {
                        pool_name = p.metadata.name;
                    }
                }
                tokio::spawn(pool_source::watch_file(
                    ds.clone(),
                    path.clone(),
                    args.pool_file_poll_interval,
                ));
            }
            (None, false, _) => ds.set_endpoints(
                args.endpoints
                    .iter()
                    .map(|a| EndpointSpec::new(*a, args.engine))
                    .collect(),
            ),
            (None, true, Some(addrs)) => ds.set_endpoints(
                addrs
                    .into_iter()
                    .map(|a| EndpointSpec::new(a, Engine::Vllm))
                    .collect(),
            ),
            (None, true, None) => anyhow::bail!(
                "no pool given: pass --endpoints ip:port[,ip:port...] (with --engine) or --pool-file FILE"
            ),
        }
        if !synced_by_source {
            ds.mark_synced();
        }

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

        let source = metrics_data_source(&cfg);
        let scrape = ScrapeConfig {
            interval: args.refresh_metrics_interval,
            timeout: args.metrics_timeout,
            transport: scrape_transport(args, &source)?,
            path: source.path,
        };
        tokio::spawn(run_with_stats(
            ds.clone(),
            scrape,
            clock.clone(),
            ScrapeStats::new(),
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
        tokio::spawn(pump_flow(director.clone(), metrics.clone(), clock.clone()));
        Ok(Brain {
            datastore: ds,
            director,
            metrics,
            clock,
            test_filter,
            pool_name,
            kube,
        })
    }
}

/// Release flow-control waiters as room appears: every 2 ms while any wait (room comes from
/// finished requests and fresh metrics, neither of which announces itself), every 50 ms
/// otherwise. A request arriving to an empty queue and a pool with room never waits for
/// this loop.
async fn pump_flow(director: Arc<Director>, metrics: Arc<Metrics>, clock: Clock) {
    loop {
        let waiting = director.flow_waiting();
        metrics.flow_control_queue_size.set(waiting as i64);
        if waiting > 0 {
            director.pump_flow(clock());
            tokio::time::sleep(Duration::from_millis(2)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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

/// Who may read `/metrics`.
#[derive(Args, Debug, Clone)]
pub struct MetricsAuthArgs {
    /// Require a bearer token on /metrics. On by default in Kubernetes mode, where the API
    /// server reviews the token (TokenReview, then a SubjectAccessReview for `get
    /// /metrics`: grant Prometheus's ServiceAccount that non-resource URL). Elsewhere off
    /// unless --metrics-bearer-token-file is given. `--metrics-endpoint-auth=false` opens it.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub metrics_endpoint_auth: Option<bool>,
    /// A file holding the one bearer token that may read /metrics (any mode; surrounding
    /// whitespace is ignored). Replaces the API server's review in Kubernetes mode.
    #[arg(long)]
    pub metrics_bearer_token_file: Option<PathBuf>,
}

/// How `/metrics` requests are authorised.
pub enum MetricsAuth {
    Open,
    Token(String),
    Kubernetes(infergate_k8s::auth::TokenReviewer),
}

impl MetricsAuth {
    /// The policy the flags ask for; `kube` is the API client in Kubernetes mode.
    pub fn from_args(args: &MetricsAuthArgs, kube: Option<&kube::Client>) -> anyhow::Result<Self> {
        match (args.metrics_endpoint_auth, &args.metrics_bearer_token_file, kube) {
            (Some(false), Some(_), _) => anyhow::bail!(
                "--metrics-endpoint-auth=false and --metrics-bearer-token-file contradict each other; drop one"
            ),
            (Some(false), None, _) => Ok(MetricsAuth::Open),
            (_, Some(path), _) => {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --metrics-bearer-token-file {}", path.display()))?
                    .trim()
                    .to_string();
                anyhow::ensure!(
                    !token.is_empty(),
                    "--metrics-bearer-token-file {} is empty; put the token in it",
                    path.display()
                );
                Ok(MetricsAuth::Token(token))
            }
            (_, None, Some(client)) => Ok(MetricsAuth::Kubernetes(
                infergate_k8s::auth::TokenReviewer::new(client.clone(), "/metrics"),
            )),
            (Some(true), None, None) => anyhow::bail!(
                "--metrics-endpoint-auth outside Kubernetes mode needs --metrics-bearer-token-file (there is no API server to review tokens)"
            ),
            (None, None, None) => Ok(MetricsAuth::Open),
        }
    }

    /// `None` when the request may read the metrics, else the refusal to send.
    async fn refuse(&self, req: &hyper::Request<hyper::body::Incoming>) -> Option<(u16, String)> {
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match (self, token) {
            (MetricsAuth::Open, _) => None,
            (_, None) => Some((
                401,
                "a bearer token is required (Authorization: Bearer ...)".into(),
            )),
            (MetricsAuth::Token(want), Some(got)) => {
                (!constant_time_eq(want.as_bytes(), got.as_bytes()))
                    .then(|| (401, "the bearer token is not valid".into()))
            }
            (MetricsAuth::Kubernetes(reviewer), Some(got)) => {
                use infergate_k8s::auth::Verdict;
                match reviewer.review(got).await {
                    Ok(Verdict::Allowed) => None,
                    Ok(Verdict::Unauthenticated(why)) => Some((401, why)),
                    Ok(Verdict::Forbidden(why)) => Some((403, why)),
                    Err(e) => {
                        tracing::warn!("cannot check a /metrics token: {e}");
                        Some((503, format!("cannot check the token now: {e}")))
                    }
                }
            }
        }
    }
}

/// Compares secrets without an early exit that would time how much of a guess is right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `GET /metrics` from `metrics` on `listener` until the process ends, to the
/// requests `auth` lets through.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    auth: Arc<MetricsAuth>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, auth) = (metrics.clone(), auth.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (metrics, auth) = (metrics.clone(), auth.clone());
                    async move {
                        let resp = if req.uri().path() != "/metrics" {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                        } else if let Some((code, why)) = auth.refuse(&req).await {
                            let mut r = hyper::Response::builder().status(code);
                            if code == 401 {
                                r = r.header(
                                    "www-authenticate",
                                    "Bearer realm=\"infergate metrics\"",
                                );
                            }
                            r.body(Full::new(Bytes::from(format!("{why}\n"))))
                        } else {
                            hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(metrics.encode())))
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

#[cfg(test)]
mod scrape_tests {
    //! The scrape flags and the config's metrics-data-source, together.

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        pool: PoolArgs,
    }

    fn mk_args(flags: &[&str]) -> PoolArgs {
        Cli::try_parse_from(std::iter::once("infergate").chain(flags.iter().copied()))
            .unwrap()
            .pool
    }

    fn mk_source(params: &str) -> MetricsDataSourceParams {
        let yaml = format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n\
             plugins:\n- type: metrics-data-source\n  parameters:\n{params}"
        );
        metrics_data_source(&EndpointPickerConfig::from_yaml_str(&yaml, "test.yaml").unwrap())
    }

    fn mk_ca_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infergate-brain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        std::fs::write(&path, ca.cert.pem()).unwrap();
        path
    }

    fn trust(t: &Transport) -> Option<&Trust> {
        match t {
            Transport::Http => None,
            Transport::Https(tls) => Some(tls.trust()),
        }
    }

    #[test]
    fn https_data_source_is_scraped_over_tls_skipping_verification_by_default() {
        let source = mk_source("    scheme: https\n    path: /secure/metrics\n");
        assert_eq!(
            (source.scheme, source.path.as_str()),
            (Scheme::Https, "/secure/metrics")
        );
        let t = scrape_transport(&mk_args(&[]), &source).unwrap();
        assert_eq!(trust(&t), Some(&Trust::InsecureSkipVerify));

        let verify = mk_source("    scheme: https\n    insecureSkipVerify: false\n");
        let ca = mk_ca_file("ca.pem");
        let flags = ["--model-server-metrics-ca-file", ca.to_str().unwrap()];
        let t = scrape_transport(&mk_args(&flags), &verify).unwrap();
        assert_eq!(trust(&t), Some(&Trust::CaFile(ca)));
    }

    #[test]
    fn reference_flags_turn_https_on_and_a_ca_file_turns_verification_on() {
        let none = metrics_data_source(&EndpointPickerConfig::default_config());
        assert_eq!(none.scheme, Scheme::Http);
        assert!(trust(&scrape_transport(&mk_args(&[]), &none).unwrap()).is_none());

        let args = mk_args(&[
            "--model-server-metrics-scheme",
            "https",
            "--model-server-metrics-https-insecure-skip-verify",
        ]);
        let t = scrape_transport(&args, &none).unwrap();
        assert_eq!(trust(&t), Some(&Trust::InsecureSkipVerify));

        let ca = mk_ca_file("ca-flag.pem");
        let args = mk_args(&[
            "--model-server-metrics-scheme=https",
            "--model-server-metrics-ca-file",
            ca.to_str().unwrap(),
        ]);
        let t = scrape_transport(&args, &none).unwrap();
        assert_eq!(trust(&t), Some(&Trust::CaFile(ca.clone())));

        let args = mk_args(&[
            "--model-server-metrics-scheme=https",
            "--model-server-metrics-https-insecure-skip-verify",
            "--model-server-metrics-ca-file",
            ca.to_str().unwrap(),
        ]);
        let err = scrape_transport(&args, &none).unwrap_err().to_string();
        assert!(err.contains("contradict"), "{err}");
    }

    #[test]
    fn unusable_or_unused_ca_file_stops_the_start_naming_it() {
        let https = mk_source("    scheme: https\n");
        let args = mk_args(&["--model-server-metrics-ca-file", "/nonexistent/ca.pem"]);
        let err = format!("{:#}", scrape_transport(&args, &https).unwrap_err());
        assert!(
            err.contains("/nonexistent/ca.pem") && err.contains("--model-server-metrics-ca-file"),
            "{err}"
        );

        let ca = mk_ca_file("unused.pem");
        let args = mk_args(&["--model-server-metrics-ca-file", ca.to_str().unwrap()]);
        let none = metrics_data_source(&EndpointPickerConfig::default_config());
        let err = scrape_transport(&args, &none).unwrap_err().to_string();
        assert!(
            err.contains("plain HTTP") && err.contains("scheme"),
            "{err}"
        );
    }
}
