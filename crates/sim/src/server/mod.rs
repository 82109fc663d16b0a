//! The real-time HTTP front: one [`Server`] is one simulated vLLM replica on one port.
//!
//! It runs an [`Engine`] on the wall clock (optionally sped up by `time_scale`) and speaks
//! what clients and the picker expect of vLLM: the OpenAI API ([`openai`]), `/v1/models`,
//! `/health`, LoRA adapter loading, and vLLM's Prometheus `/metrics` page
//! ([`metrics_text`]). Faults can be switched on at start or at run time through
//! `/admin/faults` ([`faults`]). The step loop lives in [`driver`].
//!
//! This module owns all the I/O of the crate; the engine stays pure.

pub mod driver;
pub mod faults;
pub mod metrics_text;
pub mod openai;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rustc_hash::FxHashMap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};

use crate::engine::{Engine, EngineConfig, EngineStats, Output, RequestId};
use crate::profile::Profile;
pub use faults::{Faults, MetricsFault};

/// Errors a response body may end with; an error makes hyper cut the connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response.
pub type Body = BoxBody<Bytes, BoxError>;

/// Everything one replica needs to start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub engine: EngineConfig,
    /// Seeds the engine, generated text and the fault dice.
    pub seed: u64,
    /// The name clients put in `model` (vLLM `--served-model-name`).
    pub served_model_name: String,
    /// What `/v1/models` shows as the base model's `root` (vLLM's `--model`).
    pub model_root: String,
    /// Simulated seconds per real second: 10 makes the simulated GPU ten times faster.
    pub time_scale: f64,
    /// Request bodies above this many bytes are refused with 413.
    pub max_body_bytes: usize,
    /// LoRA adapters loaded at start, as `(name, path)`.
    pub lora_modules: Vec<(String, String)>,
    pub faults: Faults,
}

impl ServerConfig {
    /// vLLM's defaults for `profile`, serving the profile's model name at real time.
    pub fn for_profile(profile: &Profile) -> ServerConfig {
        ServerConfig {
            engine: EngineConfig::for_profile(profile),
            seed: 0,
            served_model_name: profile.model.to_owned(),
            model_root: profile.model.to_owned(),
            time_scale: 1.0,
            max_body_bytes: 32 << 20,
            lora_modules: Vec::new(),
            faults: Faults::default(),
        }
    }

    /// A problem with the values, in words.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = self.engine.validate() {
            return Err(p);
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(format!(
                "time scale must be a positive number, not {}",
                self.time_scale
            ));
        }
        if self.served_model_name.is_empty() {
            return Err("the served model name must not be empty".into());
        }
        for (name, _) in &self.lora_modules {
            if name.is_empty() || name == &self.served_model_name {
                return Err(format!(
                    "LoRA module name {name:?} must be non-empty and differ from the served model name"
                ));
            }
        }
        self.faults.validate()
    }
}

/// Where a replica is in its life; connections and the driver watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    /// Not accepting; open connections finish what they are doing.
    Draining,
    /// Listener closed, connections dropped, driver stopped.
    Stopped,
}

/// The engine and the channel of every request it holds.
pub(crate) struct Core {
    pub engine: Engine,
    pub streams: FxHashMap<RequestId, mpsc::UnboundedSender<Output>>,
}

/// State shared by the driver, the connections and [`Server`].
pub(crate) struct Shared {
    pub cfg: ServerConfig,
    pub core: Mutex<Core>,
    /// Signalled on arrivals and aborts, so an idle driver looks again.
    pub wake: Notify,
    t0: Instant,
    /// Unix seconds at start (the `created` of `/v1/models`).
    pub started_unix: u64,
    pub adapters: Mutex<Vec<(String, String)>>,
    pub faults: Mutex<Faults>,
    pub fault_rng: Mutex<SmallRng>,
    pub faults_injected: Mutex<BTreeMap<&'static str, u64>>,
    pub lag: Mutex<driver::LagStats>,
    pub lora_info: Mutex<metrics_text::LoraInfo>,
    state: watch::Sender<RunState>,
    /// One clone per open connection, to know when draining is done.
    connections: Arc<()>,
}

impl Shared {
    /// Engine time now: real seconds since start times the time scale.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * self.cfg.time_scale
    }

    /// The real instant at which engine time reaches `t`; `None` if too far to represent.
    pub fn instant_at(&self, t: f64) -> Option<Instant> {
        let secs = t / self.cfg.time_scale;
        if !(secs.is_finite() && secs < 1e9) {
            return None;
        }
        self.t0.checked_add(Duration::from_secs_f64(secs.max(0.0)))
    }

    pub fn count_fault(&self, kind: &'static str) {
        *self.faults_injected.lock().entry(kind).or_insert(0) += 1;
    }

    fn stop(&self) {
        self.state.send_replace(RunState::Stopped);
        self.wake.notify_one();
    }
}

/// Waits until the replica's state satisfies `f`.
async fn until(rx: &mut watch::Receiver<RunState>, f: impl FnMut(&RunState) -> bool) {
    let _ = rx.wait_for(f).await;
}

/// A running replica. Dropping it stops the replica at once.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `addr` (port 0 picks one), starts the step driver and starts serving.
    pub async fn start(addr: SocketAddr, cfg: ServerConfig) -> std::io::Result<Server> {
        cfg.validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let started_unix = unix_now();
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                engine: Engine::new(cfg.engine.clone(), cfg.seed),
                streams: FxHashMap::default(),
            }),
            wake: Notify::new(),
            t0: Instant::now(),
            started_unix,
            adapters: Mutex::new(cfg.lora_modules.clone()),
            faults: Mutex::new(cfg.faults.clone()),
            fault_rng: Mutex::new(SmallRng::seed_from_u64(cfg.seed ^ 0xfa17_5eed)),
            faults_injected: Mutex::new(BTreeMap::new()),
            lag: Mutex::new(driver::LagStats::new()),
            lora_info: Mutex::new(metrics_text::LoraInfo::new(started_unix as f64)),
            state: watch::Sender::new(RunState::Running),
            connections: Arc::new(()),
            cfg,
        });
        tokio::spawn(driver::run(shared.clone()));
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Server { addr, shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &ServerConfig {
        &self.shared.cfg
    }

    /// The engine's gauges as of now.
    pub fn stats(&self) -> EngineStats {
        self.shared.core.lock().engine.stats()
    }

    /// Runs `f` on the engine under its lock (tests and reports).
    pub fn with_engine<R>(&self, f: impl FnOnce(&Engine) -> R) -> R {
        f(&self.shared.core.lock().engine)
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults.lock().clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock() = faults;
    }

    /// The `exit` fault: closes the listener and drops every open connection now.
    pub fn exit(&self) {
        self.shared.count_fault("exit");
        self.shared.stop();
    }

    /// Resolves once the replica has stopped (by [`exit`](Self::exit), the `exit` fault or
    /// [`shutdown`](Self::shutdown)).
    pub async fn stopped(&self) {
        until(&mut self.shared.state.subscribe(), |s| {
            *s == RunState::Stopped
        })
        .await;
    }

    /// Stops accepting, lets open requests finish for up to `grace`, then stops.
    pub async fn shutdown(&self, grace: Duration) {
        self.shared.state.send_if_modified(|s| {
            let change = *s == RunState::Running;
            if change {
                *s = RunState::Draining;
            }
            change
        });
        let deadline = Instant::now() + grace;
        while Arc::strong_count(&self.shared.connections) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.stop();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut state = shared.state.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, shared.clone()));
                }
                Err(e) => {
                    // Usually out of file descriptors; back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = until(&mut state, |s| *s != RunState::Running) => break,
        }
    }
    // Dropping the listener closes the port: new connections are refused.
}

async fn serve_connection(stream: tokio::net::TcpStream, shared: Arc<Shared>) {
    let _open = shared.connections.clone();
    let _ = stream.set_nodelay(true);
    let mut state = shared.state.subscribe();
    let svc = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req| route(shared.clone(), req))
    };
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = until(&mut state, |s| *s != RunState::Running) => {}
    }
    if *state.borrow() == RunState::Stopped {
        return; // dropping the connection closes the socket mid-response
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = until(&mut state, |s| *s == RunState::Stopped) => {}
    }
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let resp = match (&method, path.as_str()) {
        (&Method::POST, "/v1/completions") => {
            openai::generate(shared, req, openai::Api::Completions).await
        }
        (&Method::POST, "/v1/chat/completions") => {
            openai::generate(shared, req, openai::Api::Chat).await
        }
        (&Method::GET, "/v1/models") => openai::models(&shared),
        (&Method::GET, "/health") => text(StatusCode::OK, ""),
        (&Method::GET, "/metrics") => metrics_text::handle(&shared).await,
        (&Method::POST, "/v1/load_lora_adapter") => openai::load_lora(&shared, req).await,
        (&Method::POST, "/v1/unload_lora_adapter") => openai::unload_lora(&shared, req).await,
        (&Method::GET, "/admin/faults") => faults::get(&shared),
        (&Method::POST, "/admin/faults") => faults::post(&shared, req).await,
        (
            _,
            "/v1/completions"
            | "/v1/chat/completions"
            | "/v1/models"
            | "/health"
            | "/metrics"
            | "/v1/load_lora_adapter"
            | "/v1/unload_lora_adapter"
            | "/admin/faults",
        ) => openai::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("Method {method} is not allowed on {path}."),
        ),
        _ => openai::error(
            StatusCode::NOT_FOUND,
            &format!("No route for {method} {path}."),
        ),
    };
    Ok(resp)
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", body.into())
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    response(status, "application/json", Bytes::from(value.to_string()))
}

pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Reads a whole request body of at most `limit` bytes; `Err` is the response to send.
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
) -> Result<Bytes, Box<Response<Body>>> {
    let too_large = || {
        Box::new(openai::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Request body is larger than the {limit}-byte limit (--max-body-bytes)."),
        ))
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Box::new(openai::error(
            StatusCode::BAD_REQUEST,
            &format!("Could not read the request body: {e}"),
        ))),
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
