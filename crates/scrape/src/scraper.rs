//! The scrape loop: one task per endpoint in the datastore, each fetching that endpoint's
//! `/metrics` page on a fixed interval and writing the result into its [`Endpoint`].
//!
//! Tasks are independent, so one slow or hung model server never delays another; every
//! fetch is bounded by a timeout and a body-size cap. A failed scrape leaves the previous
//! sample in place, so it ages and the scheduler's staleness rules take over. Failures are
//! logged once when an endpoint starts failing and once when it recovers, never per
//! scrape; [`ScrapeStats`] counts every outcome for the binary to export.
//!
//! This module owns the HTTP client and the tasks; parsing and engine mappings live in
//! [`crate::text`] and [`crate::engines`], the TLS setup for `https` in [`crate::tls`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::header::{HeaderValue, ACCEPT, CONTENT_LENGTH, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioExecutor;
use infergate_core::{Datastore, Endpoint, EndpointMetrics, Engine};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{interval, timeout, MissedTickBehavior};

use crate::engines::{self, ExtractError};
use crate::text::{self, ParseError, MAX_PAGE_BYTES};
use crate::tls::{Transport, Trust};

/// The clock scrape times are read from; the same clock the scheduler judges staleness by.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// How often, how patiently and where to scrape.
#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// Time between the starts of two scrapes of one endpoint (GIE default 50 ms).
    pub interval: Duration,
    /// Longest one scrape may take, connect to last body byte (GIE default 1 s).
    pub timeout: Duration,
    /// HTTP path of the metrics page.
    pub path: String,
    /// Plain HTTP, or HTTPS and whom to trust.
    pub transport: Transport,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            path: "/metrics".to_string(),
            transport: Transport::Http,
        }
    }
}

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("cannot build a scrape URL from address {addr} and path {path:?}")]
    BadUrl { addr: SocketAddr, path: String },
    #[error("request failed: {0}")]
    Request(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0} (expected 200)")]
    Status(StatusCode),
    #[error("metrics page is over the {limit}-byte limit")]
    BodyTooLarge { limit: usize },
    #[error("reading the metrics page failed: {0}")]
    Body(String),
    #[error("metrics page is not UTF-8")]
    NotUtf8,
    #[error("metrics page does not parse: {0}")]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Extract(#[from] ExtractError),
}

/// Counts of scrape outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrapeCounts {
    pub successes: u64,
    pub failures: u64,
    /// Times an endpoint went from healthy (or new) to failing; one warning each.
    pub became_failing: u64,
    /// Times an endpoint went from failing to healthy; one info line each.
    pub recovered: u64,
}

/// Scrape health of one current endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointScrapeHealth {
    /// The datastore's [`Endpoint::id`].
    pub id: u32,
    pub name: String,
    pub addr: SocketAddr,
    /// Whether the latest scrape failed.
    pub failing: bool,
    /// While failing, the error of the scrape that started the failing streak.
    pub failure: Option<String>,
    pub counts: ScrapeCounts,
}

/// Shared, cheap-to-clone scrape counters: a total, and one entry per endpoint currently
/// being scraped (entries go when their endpoint leaves the datastore; the total stays).
#[derive(Debug, Clone, Default)]
pub struct ScrapeStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    total: Counters,
    endpoints: Mutex<HashMap<u32, Arc<EndpointStats>>>,
}

#[derive(Debug, Default)]
struct Counters {
    successes: AtomicU64,
    failures: AtomicU64,
    became_failing: AtomicU64,
    recovered: AtomicU64,
}

impl Counters {
    fn read(&self) -> ScrapeCounts {
        ScrapeCounts {
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            became_failing: self.became_failing.load(Ordering::Relaxed),
            recovered: self.recovered.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
struct EndpointStats {
    id: u32,
    name: String,
    addr: SocketAddr,
    counters: Counters,
    failing: AtomicBool,
    /// Written only on transitions, so a failing endpoint costs no allocation per scrape.
    failure: Mutex<Option<String>>,
}

impl ScrapeStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Outcomes over all endpoints, past and present.
    pub fn total(&self) -> ScrapeCounts {
        self.inner.total.read()
    }

    /// Health of every endpoint being scraped, sorted by address.
    pub fn endpoints(&self) -> Vec<EndpointScrapeHealth> {
        let mut all: Vec<_> = self
            .inner
            .endpoints
            .lock()
            .values()
            .map(|e| e.health())
            .collect();
        all.sort_by_key(|h| (h.addr, h.id));
        all
    }

    /// Health of the endpoint at `addr`, if it is being scraped.
    pub fn endpoint(&self, addr: SocketAddr) -> Option<EndpointScrapeHealth> {
        self.inner
            .endpoints
            .lock()
            .values()
            .find(|e| e.addr == addr)
            .map(|e| e.health())
    }

    fn register(&self, ep: &Endpoint) -> Arc<EndpointStats> {
        let stats = Arc::new(EndpointStats {
            id: ep.id,
            name: ep.spec.name.clone(),
            addr: ep.spec.addr,
            counters: Counters::default(),
            failing: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        self.inner.endpoints.lock().insert(ep.id, stats.clone());
        stats
    }

    fn unregister(&self, id: u32) {
        self.inner.endpoints.lock().remove(&id);
    }

    /// Records a success; true when the endpoint was failing until now.
    fn record_success(&self, ep: &EndpointStats) -> bool {
        self.inner.total.successes.fetch_add(1, Ordering::Relaxed);
        ep.counters.successes.fetch_add(1, Ordering::Relaxed);
        let recovered = ep.failing.swap(false, Ordering::Relaxed);
        if recovered {
            *ep.failure.lock() = None;
            self.inner.total.recovered.fetch_add(1, Ordering::Relaxed);
            ep.counters.recovered.fetch_add(1, Ordering::Relaxed);
        }
        recovered
    }

    /// Records a failure; true when the endpoint was healthy (or new) until now.
    fn record_failure(&self, ep: &EndpointStats, error: &ScrapeError) -> bool {
        self.inner.total.failures.fetch_add(1, Ordering::Relaxed);
        ep.counters.failures.fetch_add(1, Ordering::Relaxed);
        let became_failing = !ep.failing.swap(true, Ordering::Relaxed);
        if became_failing {
            *ep.failure.lock() = Some(error.to_string());
            self.inner
                .total
                .became_failing
                .fetch_add(1, Ordering::Relaxed);
            ep.counters.became_failing.fetch_add(1, Ordering::Relaxed);
        }
        became_failing
    }
}

impl EndpointStats {
    fn health(&self) -> EndpointScrapeHealth {
        EndpointScrapeHealth {
            id: self.id,
            name: self.name.clone(),
            addr: self.addr,
            failing: self.failing.load(Ordering::Relaxed),
            failure: self.failure.lock().clone(),
            counts: self.counters.read(),
        }
    }
}

/// The scrape client: plain HTTP, or HTTPS only (never falling back to plain HTTP).
#[derive(Clone)]
enum HttpClient {
    Http(Client<HttpConnector, Empty<Bytes>>),
    Https(Client<HttpsConnector<HttpConnector>, Empty<Bytes>>),
}

impl HttpClient {
    fn request(&self, request: Request<Empty<Bytes>>) -> ResponseFuture {
        match self {
            HttpClient::Http(c) => c.request(request),
            HttpClient::Https(c) => c.request(request),
        }
    }
}

/// Scrape every endpoint of `datastore` until the returned future is dropped, with fresh
/// counters. See [`run_with_stats`] to read the counters.
pub async fn run(datastore: Datastore, config: ScrapeConfig, clock: Clock) {
    run_with_stats(datastore, config, clock, ScrapeStats::new()).await
}

/// How often [`run_with_stats`] looks for added or removed endpoints.
const NEW_ENDPOINT_CHECK: Duration = Duration::from_millis(5);

/// Scrape every endpoint of `datastore` until the returned future is dropped, counting
/// outcomes in `stats`.
///
/// Watches [`Datastore::generation`] every 5 ms (or each interval, if shorter) and keeps exactly one task per
/// current endpoint (keyed by [`Endpoint::id`], which changes when an endpoint's spec
/// does). Dropping the future stops every task.
pub async fn run_with_stats(
    datastore: Datastore,
    config: ScrapeConfig,
    clock: Clock,
    stats: ScrapeStats,
) {
    let config = Arc::new(ScrapeConfig {
        // A zero period would make tokio's interval panic.
        interval: config.interval.max(Duration::from_millis(1)),
        ..config
    });
    match &config.transport {
        Transport::Http => {}
        Transport::Https(tls) if *tls.trust() == Trust::InsecureSkipVerify => tracing::warn!(
            "scraping model servers over https WITHOUT certificate verification: the traffic is \
             encrypted but anyone on the path can serve fake metrics; give a CA bundle to verify"
        ),
        Transport::Https(tls) => tracing::info!(
            trust = %tls.trust(),
            "scraping model servers over https, verifying their certificates against their IP address"
        ),
    }
    let client = new_client(&config);
    let mut tasks = Tasks {
        running: HashMap::new(),
        stats: stats.clone(),
    };
    let mut seen_generation = None;
    // The endpoint set is checked more often than endpoints are scraped: a new endpoint is
    // scored as stale (and so loses to every scraped one) until its first scrape lands, so
    // that scrape should start at once. A check is one atomic load.
    let mut ticker = interval(config.interval.min(NEW_ENDPOINT_CHECK));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let generation = datastore.generation();
        if seen_generation == Some(generation) {
            continue;
        }
        seen_generation = Some(generation);
        let snapshot = datastore.snapshot();
        tasks.retain(|id| snapshot.endpoints.iter().any(|e| e.id == id));
        for ep in &snapshot.endpoints {
            tasks.running.entry(ep.id).or_insert_with(|| {
                tokio::spawn(scrape_endpoint(
                    ep.clone(),
                    client.clone(),
                    config.clone(),
                    clock.clone(),
                    stats.clone(),
                    stats.register(ep),
                ))
            });
        }
    }
}

/// The per-endpoint tasks; aborts them all when dropped so no scrape outlives [`run`].
struct Tasks {
    running: HashMap<u32, JoinHandle<()>>,
    stats: ScrapeStats,
}

impl Tasks {
    fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        let stats = &self.stats;
        self.running.retain(|&id, handle| {
            let kept = keep(id);
            if !kept {
                handle.abort();
                stats.unregister(id);
            }
            kept
        });
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (id, handle) in self.running.drain() {
            handle.abort();
            self.stats.unregister(id);
        }
    }
}

fn new_client(config: &ScrapeConfig) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.timeout));
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    // One kept-alive connection per endpoint is all a sequential scraper uses; over TLS it
    // also spares a handshake per scrape.
    builder
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(Duration::from_secs(30));
    match &config.transport {
        Transport::Http => HttpClient::Http(builder.build(connector)),
        Transport::Https(tls) => {
            connector.enforce_http(false);
            // The server name is the URI's host, the endpoint's IP address, so a verified
            // certificate must name that IP in its subject alternative names.
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.client_config())
                .https_only()
                .enable_http1()
                .wrap_connector(connector);
            HttpClient::Https(builder.build(connector))
        }
    }
}

fn scrape_uri(addr: SocketAddr, path: &str, scheme: &str) -> Result<Uri, ScrapeError> {
    let slash = if path.starts_with('/') { "" } else { "/" };
    format!("{scheme}://{addr}{slash}{path}")
        .parse()
        .map_err(|_| ScrapeError::BadUrl {
            addr,
            path: path.to_string(),
        })
}

async fn scrape_endpoint(
    ep: Arc<Endpoint>,
    client: HttpClient,
    config: Arc<ScrapeConfig>,
    clock: Clock,
    stats: ScrapeStats,
    ep_stats: Arc<EndpointStats>,
) {
    let uri = scrape_uri(ep.spec.addr, &config.path, config.transport.scheme()).ok();
    let mut ticker = interval(config.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let outcome = match &uri {
            None => Err(ScrapeError::BadUrl {
                addr: ep.spec.addr,
                path: config.path.clone(),
            }),
            Some(uri) => timeout(config.timeout, scrape_once(&client, uri, ep.spec.engine))
                .await
                .unwrap_or(Err(ScrapeError::Timeout(config.timeout))),
        };
        match outcome {
            Ok(metrics) => {
                ep.set_metrics(metrics, clock());
                if stats.record_success(&ep_stats) {
                    tracing::info!(
                        endpoint = %ep.spec.name,
                        addr = %ep.spec.addr,
                        "metrics scrape recovered"
                    );
                }
            }
            Err(error) => {
                if stats.record_failure(&ep_stats, &error) {
                    tracing::warn!(
                        endpoint = %ep.spec.name,
                        addr = %ep.spec.addr,
                        engine = %ep.spec.engine,
                        %error,
                        "metrics scrape failing; keeping the last sample until it goes stale"
                    );
                }
            }
        }
    }
}

/// One fetch, parse and extract; the caller bounds it with the timeout.
async fn scrape_once(
    client: &HttpClient,
    uri: &Uri,
    engine: Engine,
) -> Result<EndpointMetrics, ScrapeError> {
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = uri.clone();
    let headers = request.headers_mut();
    // Ask for the classic text format; some exporters otherwise answer in OpenMetrics.
    headers.insert(ACCEPT, HeaderValue::from_static("text/plain;version=0.0.4"));
    headers.insert(USER_AGENT, HeaderValue::from_static("infergate-scrape"));
    let response = client.request(request).await.map_err(|e| {
        if is_tls_error(&e) {
            ScrapeError::Tls(error_chain(&e))
        } else {
            ScrapeError::Request(error_chain(&e))
        }
    })?;
    if response.status() != StatusCode::OK {
        return Err(ScrapeError::Status(response.status()));
    }
    let declared_len = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > MAX_PAGE_BYTES as u64) {
        return Err(ScrapeError::BodyTooLarge {
            limit: MAX_PAGE_BYTES,
        });
    }
    let body = Limited::new(response.into_body(), MAX_PAGE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                ScrapeError::BodyTooLarge {
                    limit: MAX_PAGE_BYTES,
                }
            } else {
                ScrapeError::Body(error_chain(e.as_ref()))
            }
        })?
        .to_bytes();
    let page = std::str::from_utf8(&body).map_err(|_| ScrapeError::NotUtf8)?;
    let samples = text::parse_only(page, |name| engines::reads(engine, name))?;
    Ok(engines::extract(engine, &samples)?)
}

/// Whether a rustls error (a refused certificate, a server not speaking TLS) is among the
/// causes of `e`. hyper-rustls wraps it in an `io::Error` inside another `io::Error`, and
/// `io::Error::source` skips what it wraps, so those are opened with `get_ref`.
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<rustls::Error>() {
            return true;
        }
        cause = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}

/// An error and its sources on one line; hyper's top-level messages alone are vague
/// ("client error (Connect)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_reference_picker() {
        let c = ScrapeConfig::default();
        assert_eq!(c.interval, Duration::from_millis(50));
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!(c.path, "/metrics");
    }

    #[test]
    fn scrape_uri_handles_ipv6_and_missing_slash() {
        let v4: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:8000".parse().unwrap();
        assert_eq!(
            scrape_uri(v4, "/metrics", "http").unwrap().to_string(),
            "http://10.0.0.1:8000/metrics"
        );
        assert_eq!(
            scrape_uri(v6, "metrics", "http").unwrap().to_string(),
            "http://[fd00::1]:8000/metrics"
        );
        assert_eq!(
            scrape_uri(v6, "/metrics", "https").unwrap().to_string(),
            "https://[fd00::1]:8000/metrics"
        );
        assert!(scrape_uri(v4, "/bad path", "http").is_err());
    }

    #[test]
    fn stats_count_transitions_not_failures() {
        let stats = ScrapeStats::new();
        let ep = Endpoint::new(
            7,
            infergate_core::EndpointSpec::new("10.0.0.1:8000".parse().unwrap(), Engine::Vllm),
        );
        let es = stats.register(&ep);
        let timeout = ScrapeError::Timeout(Duration::from_secs(1));
        let status = ScrapeError::Status(StatusCode::BAD_GATEWAY);
        assert!(!stats.record_success(&es));
        assert!(stats.record_failure(&es, &timeout));
        assert!(!stats.record_failure(&es, &status));
        assert!(!stats.record_failure(&es, &status));
        let h = stats.endpoint(ep.spec.addr).unwrap();
        assert!(h.failing);
        assert_eq!(h.failure.as_deref(), Some("no complete answer within 1s"));
        assert!(stats.record_success(&es));
        assert!(!stats.record_success(&es));
        let want = ScrapeCounts {
            successes: 3,
            failures: 3,
            became_failing: 1,
            recovered: 1,
        };
        assert_eq!(stats.total(), want);
        let h = stats.endpoint(ep.spec.addr).unwrap();
        assert_eq!(
            (h.id, h.failing, h.failure, h.counts),
            (7, false, None, want)
        );
        stats.unregister(7);
        assert!(stats.endpoints().is_empty());
        assert_eq!(stats.total(), want);
    }
}
