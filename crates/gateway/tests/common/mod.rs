//! Fixtures: a gateway on 127.0.0.1 in front of simulated replicas, fake model servers or
//! small hand-written upstreams.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use infergate_core::{Datastore, Director, EndpointSpec, Engine, SchedulerConfig};
use infergate_gateway::{Gateway, GatewayConfig};
use infergate_metrics::Metrics;
use infergate_sim::server::{Faults, Server, ServerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL: &str = "m";

/// A running gateway; `stop()` asks it to shut down gracefully.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub datastore: Datastore,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Asks for shutdown and returns the serve task, to await.
    pub fn stop(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().expect("stopped once")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// A gateway over `endpoints` (all ready, datastore synced) with `cfg`.
pub async fn mk_gateway(endpoints: &[SocketAddr], cfg: GatewayConfig) -> TestGateway {
    let ds = Datastore::new();
    ds.set_endpoints(
        endpoints
            .iter()
            .map(|a| EndpointSpec::new(*a, Engine::Vllm))
            .collect(),
    );
    ds.mark_synced();
    mk_gateway_on(ds, cfg).await
}

pub async fn mk_gateway_on(ds: Datastore, cfg: GatewayConfig) -> TestGateway {
    let director = Arc::new(Director::new(ds.clone(), SchedulerConfig::default()));
    let metrics = Arc::new(Metrics::new("test"));
    let epoch = Instant::now();
    let gw = Gateway::new(
        cfg,
        ds.clone(),
        director,
        metrics,
        Arc::new(move || epoch.elapsed()),
        7,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(gw.serve(listener, async {
        let _ = rx.await;
    }));
    TestGateway {
        addr,
        datastore: ds,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A simulated vLLM replica serving [`MODEL`], `time_scale` times faster than real time.
pub async fn mk_sim(time_scale: f64, faults: Faults) -> Server {
    let profile = infergate_sim::profile::by_name("llama3-8b-h100").unwrap();
    let mut cfg = ServerConfig::for_profile(profile);
    cfg.served_model_name = MODEL.to_string();
    cfg.time_scale = time_scale;
    cfg.faults = faults;
    Server::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

/// A port nothing listens on (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

pub type HandBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A hand-written upstream: every request is answered by `f`.
pub async fn mk_upstream<F, Fut>(f: F) -> (SocketAddr, JoinHandle<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<HandBody>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A body that yields each `(delay, chunk)` after its delay.
pub fn timed_body(parts: Vec<(Duration, &'static [u8])>) -> HandBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
    >(4);
    tokio::spawn(async move {
        for (delay, chunk) in parts {
            tokio::time::sleep(delay).await;
            if tx
                .send(Ok(hyper::body::Frame::data(Bytes::from_static(chunk))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    http_body_util::StreamBody::new(tokio_stream_from(rx)).boxed()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

pub fn full(status: u16, content_type: &str, body: &'static [u8]) -> Response<HandBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            http_body_util::Full::new(Bytes::from_static(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

pub fn chat(prompt: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// The sum of every sample of `name` (with any labels) on a Prometheus page.
pub fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn gateway_metrics(gw: &TestGateway) -> String {
    let (_, _, page) = infergate_testkit::get(&gw.url(), "/metrics").await.unwrap();
    String::from_utf8_lossy(&page).into_owned()
}

/// The error object of an OpenAI-style error body.
pub fn error_of(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    v["error"].clone()
}
