//! The standalone gateway's data plane: an OpenAI-compatible HTTP server (HTTP/1.1 and h2c,
//! or HTTPS with either) that schedules each request with the picker's [`Director`] and
//! forwards it to the chosen model server.
//!
//! - `proxy`: one inference request: auth, body limits, scheduling, attempts and retries.
//! - `relay`: the response body relayed frame by frame, with usage and picker metrics.
//! - `breaker`: the per-endpoint circuit breaker.
//! - `rename`: a rewritten model name mapped back in responses.
//! - `models`: `GET /v1/models` aggregated over the pool.
//! - `keys`: API keys for bearer-token auth.
//! - `metrics`: the gateway's own Prometheus metrics.
//!
//! This module holds the configuration, the accept loop with graceful shutdown, and the
//! small operational routes (`/health`, `/ready`, `/metrics`).
//!
//! Authentication, when configured, covers the OpenAI routes (`/v1/*`). `/health`, `/ready`
//! and `/metrics` are never authenticated, so probes and Prometheus need no key; bind the
//! gateway to a private address or filter `/metrics` in front of it if that page must stay
//! private.

mod admission;
mod breaker;
mod keys;
mod metrics;
mod models;
mod proxy;
mod relay;
mod rename;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use infergate_core::{Datastore, Director};
use infergate_metrics::Metrics;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use infergate_core::director::Clock;
pub use keys::{ApiKeys, KeysError};
pub use proxy::{OBJECTIVE_HEADER, REQUEST_ID_HEADER};
pub use relay::ResponseBody;

use breaker::{BreakerConfig, Breakers};
use metrics::GatewayMetrics;

/// Limits, timeouts and policies of the data plane. `Default` gives the values of
/// `infergate serve`'s flags.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Request bodies above this many bytes are refused with 413 (default 32 MiB).
    pub max_body_bytes: usize,
    /// Most request headers accepted on HTTP/1.1; more is refused with 431 (default 100).
    pub max_headers: usize,
    /// Largest header block accepted on HTTP/2, in bytes (default 64 KiB).
    pub max_header_list_bytes: u32,
    /// A client must send its request head within this long, and an idle keep-alive
    /// connection is closed after it (HTTP/1.1; default 10 s).
    pub header_read_timeout: Duration,
    /// A client must send its whole body within this long, else 408 (default 30 s).
    pub body_read_timeout: Duration,
    /// Connecting to a model server must succeed within this long (default 2 s).
    pub connect_timeout: Duration,
    /// A model server must send its response head (and, so that a stream that dies before
    /// its first byte can still be retried, its first body chunk) within this long of the
    /// attempt's start (default 300 s: a non-streamed completion answers only when done).
    pub first_byte_timeout: Duration,
    /// For a streamed request (`"stream": true`), the model server must send its response
    /// head within this long of the attempt's start (default 5 s; zero turns it off). vLLM
    /// sends a stream's head before generating, so a replica silent this long is taken as
    /// hung and the request, with nothing sent to the client yet, is tried elsewhere. The
    /// first body chunk (the first token, after any queueing) is still bounded only by
    /// `first_byte_timeout`. Keep it below `retry_deadline`, else a timed-out request is
    /// answered 504 rather than retried.
    pub stream_first_byte_timeout: Duration,
    /// A stream with no bytes from the model server for this long is ended (default 60 s;
    /// zero turns it off).
    pub idle_stream_timeout: Duration,
    /// Attempts per request, the first included (default 3).
    pub max_attempts: u32,
    /// Base of the exponential backoff between attempts, with full jitter (default 20 ms).
    pub retry_backoff: Duration,
    /// No new attempt starts this long after the request was scheduled (default 10 s).
    pub retry_deadline: Duration,
    /// Consecutive failures that eject a model server (default 5).
    pub breaker_failures: u32,
    /// How long an ejected model server rests before one probe request (default 5 s); it
    /// doubles on each repeated ejection up to `breaker_max_cooldown`.
    pub breaker_cooldown: Duration,
    /// Cap of the doubling cooldown (default 60 s).
    pub breaker_max_cooldown: Duration,
    /// Bearer-token keys; `None` turns auth off.
    pub api_keys: Option<ApiKeys>,
    /// After shutdown is asked, in-flight requests get this long to finish (default 30 s).
    pub shutdown_grace: Duration,
    /// How long `GET /v1/models` waits for each model server (default 1 s).
    pub models_timeout: Duration,
    /// How long an aggregated model list is reused (default 1 s).
    pub models_cache_ttl: Duration,
    /// Log each request's outcome at info level (default); `false` logs it at debug.
    pub access_log: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 32 << 20,
            max_headers: 100,
            max_header_list_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(300),
            stream_first_byte_timeout: Duration::from_secs(5),
            idle_stream_timeout: Duration::from_secs(60),
            max_attempts: 3,
            retry_backoff: Duration::from_millis(20),
            retry_deadline: Duration::from_secs(10),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
            breaker_max_cooldown: Duration::from_secs(60),
            api_keys: None,
            shutdown_grace: Duration::from_secs(30),
            models_timeout: Duration::from_secs(1),
            models_cache_ttl: Duration::from_secs(1),
            access_log: true,
        }
    }
}

type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// The gateway: configuration, the brain it routes with, and its upstream connection pool.
pub struct Gateway {
    cfg: GatewayConfig,
    datastore: Datastore,
    director: Arc<Director>,
    metrics: Arc<Metrics>,
    clock: Clock,
    seed: AtomicU64,
    client: UpstreamClient,
    breakers: Breakers,
    gw_metrics: GatewayMetrics,
    models: models::ModelsCache,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway routing with `director` over `datastore`'s pool. `clock` is the brain's
    /// (time since an epoch); `seed` makes tie-breaking, rewrites and jitter reproducible.
    pub fn new(
        cfg: GatewayConfig,
        datastore: Datastore,
        director: Arc<Director>,
        metrics: Arc<Metrics>,
        clock: Clock,
        seed: u64,
    ) -> Arc<Gateway> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        let breakers = Breakers::new(BreakerConfig {
            failures: cfg.breaker_failures,
            cooldown: cfg.breaker_cooldown,
            max_cooldown: cfg.breaker_max_cooldown,
        });
        Arc::new(Gateway {
            cfg,
            datastore,
            director,
            metrics,
            clock,
            seed: AtomicU64::new(seed),
            client,
            breakers,
            gw_metrics: GatewayMetrics::new(),
            models: models::ModelsCache::default(),
        })
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.cfg
    }

    /// Serves HTTP/1.1 and h2c on `listener` until `shutdown` resolves, then stops accepting
    /// and lets in-flight requests finish within `shutdown_grace`; connections still open
    /// after that are closed.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        self.serve_with_tls(listener, None, shutdown).await
    }

    /// As [`Gateway::serve`]; with `tls`, every connection first completes a TLS handshake
    /// (within the header read timeout) and then speaks HTTP/1.1 or HTTP/2, as ALPN chose.
    pub async fn serve_with_tls(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .max_headers(self.cfg.max_headers)
            .header_read_timeout(self.cfg.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(self.cfg.max_header_list_bytes);
        let builder = Arc::new(builder);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        connections.spawn(self.clone().accept_connection(
                            stream,
                            tls.clone(),
                            builder.clone(),
                            stop_rx.clone(),
                        ));
                    }
                    Err(e) => {
                        // Usually out of file descriptors: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed; retrying in 50ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let open = connections.len();
        tracing::info!(
            open_connections = open,
            grace = %fmt_duration(self.cfg.shutdown_grace),
            "shutting down: no new connections; in-flight requests may finish"
        );
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.cfg.shutdown_grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open_connections = connections.len(),
                "shutdown grace ({}) passed; closing the remaining connections (--shutdown-grace)",
                fmt_duration(self.cfg.shutdown_grace)
            );
            connections.shutdown().await;
        }
        Ok(())
    }

    /// The TLS handshake, when configured, runs here on the connection's own task, so a
    /// slow client never holds up the accept loop.
    async fn accept_connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
        stop: watch::Receiver<bool>,
    ) {
        let Some(acceptor) = tls else {
            return self.serve_connection(stream, builder, stop).await;
        };
        match tokio::time::timeout(self.cfg.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => self.serve_connection(stream, builder, stop).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake with a client failed"),
            Err(_) => tracing::debug!("TLS handshake with a client timed out"),
        }
    }

    async fn serve_connection<S>(
        self: Arc<Self>,
        stream: S,
        builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
        mut stop: watch::Receiver<bool>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let gw = self;
        let svc = hyper::service::service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, Infallible>(gw.route(req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %error_chain(&*e), "client connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|s| *s) => {}
        }
        // Finish the request in progress (if any), then close.
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        let resp = match (req.method(), req.uri().path()) {
            (
                &Method::POST,
                "/v1/completions" | "/v1/chat/completions" | "/v1/embeddings" | "/v1/responses",
            ) => proxy::handle(self.clone(), req).await,
            (&Method::GET, "/v1/models") => models::handle(self.clone(), req).await,
            (&Method::GET | &Method::HEAD, "/health") => {
                json_response(StatusCode::OK, r#"{"status":"ok"}"#.into())
            }
            (&Method::GET | &Method::HEAD, "/ready") => self.ready(),
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(ResponseBody::full(
                    self.gw_metrics.encode_with(&self.metrics),
                ));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (m, path) => match allowed_methods(path) {
                Some(allow) => {
                    let mut r = error_response(
                        StatusCode::METHOD_NOT_ALLOWED,
                        &format!("{m} is not allowed on {path}; use {allow}"),
                    );
                    r.headers_mut()
                        .insert(ALLOW, HeaderValue::from_static(allow));
                    r
                }
                None => error_response(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "no route for {m} {path}; this gateway serves POST /v1/completions, \
                         /v1/chat/completions, /v1/embeddings, /v1/responses and GET /v1/models"
                    ),
                ),
            },
        };
        self.gw_metrics.response(resp.status().as_u16());
        resp
    }

    fn ready(&self) -> Response<ResponseBody> {
        if !self.datastore.is_synced() {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the pool has not been loaded yet",
            );
        }
        let n = self.datastore.snapshot().endpoints.len();
        if n == 0 {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the pool has no ready endpoints (check --endpoints or the pool file)",
            );
        }
        json_response(
            StatusCode::OK,
            format!(r#"{{"status":"ready","endpoints":{n}}}"#).into(),
        )
    }

    fn next_rng(&self) -> SmallRng {
        // Distinct, reproducible streams per request without a global RNG.
        SmallRng::seed_from_u64(
            self.seed
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed),
        )
    }

    /// The one log line of a request's outcome (inside the request's span).
    fn log_outcome(
        &self,
        status: u16,
        endpoint: Option<SocketAddr>,
        attempts: u32,
        took: Duration,
        outcome: &str,
    ) {
        let ms = took.as_secs_f64() * 1e3;
        let endpoint = endpoint.map(tracing::field::display);
        if self.cfg.access_log {
            tracing::info!(status, endpoint, attempts, duration_ms = ms, "{outcome}");
        } else {
            tracing::debug!(status, endpoint, attempts, duration_ms = ms, "{outcome}");
        }
    }

    fn ejected(&self, addr: SocketAddr, for_: Duration, why: &str) {
        self.gw_metrics.ejections.inc();
        tracing::warn!(
            endpoint = %addr,
            cooldown = %fmt_duration(for_),
            last_error = why,
            "model server ejected after {} consecutive failures; one probe request after the cooldown",
            self.cfg.breaker_failures
        );
    }
}

fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/v1/completions" | "/v1/chat/completions" | "/v1/embeddings" | "/v1/responses" => {
            Some("POST")
        }
        "/v1/models" | "/metrics" => Some("GET"),
        "/health" | "/ready" => Some("GET, HEAD"),
        _ => None,
    }
}

pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An OpenAI-style error: `{"error":{"message","type","param":null,"code"}}`, where `code`
/// is the HTTP status and `type` its OpenAI-style class.
pub fn error_response(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "error": {"message": message, "type": error_type(status), "param": null, "code": status.as_u16()}
    });
    json_response(status, Bytes::from(body.to_string()))
}

/// The `type` of an error body, in OpenAI's words where OpenAI has one.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        502 => "upstream_error",
        503 => "service_unavailable",
        504 => "upstream_timeout",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// A duration as flags write it: `300ms`, `2s`, `1.5s`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// An error and its causes, `outer: inner: innermost`.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_flags_take_them() {
        assert_eq!(fmt_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
    }
}
