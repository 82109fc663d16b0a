//! A fake vLLM OpenAI-compatible server for routing tests.
//!
//! It answers `/v1/completions` and `/v1/chat/completions` like vLLM (JSON or SSE), records
//! every request exactly as received, and serves vLLM-format Prometheus text on `/metrics`
//! built from state the test sets. It generates no text worth reading: answers are made of
//! the word `tok` repeated.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// Header naming the fake server that answered, on every response.
pub const SERVED_BY: &str = "x-served-by";

type Body = BoxBody<Bytes, Infallible>;

/// One request as the fake server received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query, e.g. `/v1/completions`.
    pub path: String,
    pub headers: HeaderMap,
    /// The whole body, byte for byte.
    pub body: Bytes,
    /// When the request head arrived.
    pub arrived: Instant,
    /// The same moment as wall-clock time.
    pub arrived_at: SystemTime,
}

impl RecordedRequest {
    /// The value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `model` field of a JSON body.
    pub fn model(&self) -> Option<String> {
        self.json()?.get("model")?.as_str().map(str::to_owned)
    }
}

#[derive(Clone, Debug)]
struct Loras {
    running: Vec<String>,
    waiting: Vec<String>,
    max_lora: u32,
}

#[derive(Debug)]
struct State {
    metrics_model: String,
    waiting: u64,
    running: u64,
    kv_usage: f64,
    loras: Option<Loras>,
    block_size: u32,
    num_gpu_blocks: u64,
    metrics_body: Option<String>,
    metrics_status: StatusCode,
    delay: Duration,
    status: StatusCode,
    stream_interval: Duration,
    cached_tokens: u64,
    requests: Vec<RecordedRequest>,
}

struct Shared {
    name: String,
    state: Mutex<State>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    completed: AtomicUsize,
    next_id: AtomicUsize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock should not hide the first failure.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts a request as in flight from arrival until its response is fully written.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared.clone())
    }

    fn complete(self) {
        self.0.completed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running fake model server on 127.0.0.1; stops when dropped.
pub struct FakeModelServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FakeModelServer {
    /// Starts a server named `name` (echoed in `x-served-by`) on a free port.
    pub async fn start(name: &str) -> anyhow::Result<FakeModelServer> {
        Self::start_on(name, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a server named `name` on `addr` (another loopback address, such as
    /// 127.0.0.2:8000, lets several servers share a port as Pods of one pool do).
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<FakeModelServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            state: Mutex::new(State {
                metrics_model: "fake-model".to_owned(),
                waiting: 0,
                running: 0,
                kv_usage: 0.0,
                loras: None,
                block_size: 16,
                num_gpu_blocks: 8192,
                metrics_body: None,
                metrics_status: StatusCode::OK,
                delay: Duration::ZERO,
                status: StatusCode::OK,
                stream_interval: Duration::from_millis(10),
                cached_tokens: 0,
                requests: Vec::new(),
            }),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            next_id: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FakeModelServer {
            addr,
            shared,
            accept,
        })
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the queue, running and KV-cache figures reported on `/metrics`.
    pub fn set_state(&self, waiting: u64, running: u64, kv_usage: f64) {
        let mut s = self.shared.state();
        s.waiting = waiting;
        s.running = running;
        s.kv_usage = kv_usage;
    }

    /// Sets the LoRA adapters reported in `vllm:lora_requests_info` (absent until called,
    /// as on a vLLM started without LoRA).
    pub fn set_loras(&self, running: &[&str], waiting: &[&str], max_lora: u32) {
        self.shared.state().loras = Some(Loras {
            running: running.iter().map(|s| s.to_string()).collect(),
            waiting: waiting.iter().map(|s| s.to_string()).collect(),
            max_lora,
        });
    }

    /// Sets `num_gpu_blocks` in `vllm:cache_config_info` (default 8192; block size is 16).
    pub fn set_num_gpu_blocks(&self, blocks: u64) {
        self.shared.state().num_gpu_blocks = blocks;
    }

    /// Sets the `model_name` label on the metrics (default `fake-model`).
    pub fn set_metrics_model(&self, model: &str) {
        self.shared.state().metrics_model = model.to_owned();
    }

    /// Serves this text on `/metrics` verbatim instead of the generated one (`None` undoes).
    pub fn set_metrics_body(&self, body: Option<&str>) {
        self.shared.state().metrics_body = body.map(str::to_owned);
    }

    /// The status `/metrics` answers with (default 200).
    pub fn set_metrics_status(&self, code: u16) {
        self.shared.state().metrics_status = status_or_500(code);
    }

    /// The `/metrics` text as it would be served now.
    pub fn metrics_text(&self) -> String {
        let s = self.shared.state();
        s.metrics_body.clone().unwrap_or_else(|| render_metrics(&s))
    }

    /// Waits this long after reading a completion request before answering it.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.state().delay = delay;
    }

    /// Answers completion requests with this status and a vLLM-style error body (200 undoes).
    pub fn set_status(&self, code: u16) {
        self.shared.state().status = status_or_500(code);
    }

    /// Pause between SSE chunks of a streamed answer (default 10 ms).
    pub fn set_stream_interval(&self, interval: Duration) {
        self.shared.state().stream_interval = interval;
    }

    /// `usage.prompt_tokens_details.cached_tokens` in answers (default 0, capped at the
    /// prompt's token count).
    pub fn set_cached_tokens(&self, tokens: u64) {
        self.shared.state().cached_tokens = tokens;
    }

    /// Every completion request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().requests.clone()
    }

    /// Forgets the recorded requests and resets the counters.
    pub fn clear_requests(&self) {
        self.shared.state().requests.clear();
        self.shared.completed.store(0, Ordering::SeqCst);
        self.shared.max_in_flight.store(
            self.shared.in_flight.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    /// Completion requests whose answer has been fully written.
    pub fn count(&self) -> usize {
        self.shared.completed.load(Ordering::SeqCst)
    }

    /// Completion requests received and not yet fully answered.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The highest [`FakeModelServer::in_flight`] seen since start or the last clear.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops open connections, like a replica that died.
    pub fn stop(&self) {
        self.accept.abort();
    }
}

impl Drop for FakeModelServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn status_or_500(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // Connection tasks live in this set so that aborting the accept task closes them too.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!("fake model server accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("fake model server connection ended: {e}");
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics(&shared),
        (&Method::GET, "/health") => text(StatusCode::OK, "text/plain", String::new()),
        (&Method::GET, "/v1/models") => {
            let model = shared.state().metrics_model.clone();
            let body = json!({"object": "list", "data": [{"id": model, "object": "model"}]});
            text(StatusCode::OK, "application/json", body.to_string())
        }
        (&Method::POST, "/v1/completions") => {
            completion(shared.clone(), req, Api::Completions).await
        }
        (&Method::POST, "/v1/chat/completions") => completion(shared.clone(), req, Api::Chat).await,
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found".to_owned()),
    };
    if let Ok(v) = HeaderValue::from_str(&shared.name) {
        resp.headers_mut().insert(SERVED_BY, v);
    }
    Ok(resp)
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn metrics(shared: &Shared) -> Response<Body> {
    let s = shared.state();
    let body = s.metrics_body.clone().unwrap_or_else(|| render_metrics(&s));
    text(
        s.metrics_status,
        "text/plain; version=0.0.4; charset=utf-8",
        body,
    )
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn render_metrics(s: &State) -> String {
    use std::fmt::Write as _;
    let m = &s.metrics_model;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name}{{engine=\"0\",model_name=\"{m}\"}} {value}");
    };
    gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        format!("{:.1}", s.running as f64),
    );
    gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        format!("{:.1}", s.waiting as f64),
    );
    gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        format!("{}", s.kv_usage),
    );
    if let Some(l) = &s.loras {
        let _ = writeln!(
            out,
            "# HELP vllm:lora_requests_info Running stats on lora requests."
        );
        let _ = writeln!(out, "# TYPE vllm:lora_requests_info gauge");
        let _ = writeln!(
            out,
            "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {:.6e}",
            l.max_lora,
            l.running.join(","),
            l.waiting.join(","),
            unix_now()
        );
    }
    let _ = writeln!(
        out,
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig"
    );
    let _ = writeln!(out, "# TYPE vllm:cache_config_info gauge");
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"{}\"}} 1.0",
        s.block_size, s.num_gpu_blocks
    );
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

/// What the answer needs from a request body. Bodies that are not JSON still get an answer,
/// with model `unknown`: the fake is lenient so that routing tests can send anything.
struct Ask {
    model: String,
    stream: bool,
    include_usage: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
}

fn read_ask(body: &[u8], api: Api) -> Ask {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let prompt_chars: usize = match api {
        Api::Completions => match v.get("prompt") {
            Some(Value::String(s)) => s.len(),
            Some(other) => other.to_string().len(),
            None => 0,
        },
        Api::Chat => v
            .get("messages")
            .and_then(Value::as_array)
            .map(|msgs| {
                msgs.iter()
                    .map(|m| match m.get("content") {
                        Some(Value::String(s)) => s.len(),
                        Some(other) => other.to_string().len(),
                        None => 0,
                    })
                    .sum()
            })
            .unwrap_or(0),
    };
    // About four characters per token, as for English text with common tokenizers.
    let prompt_tokens = (prompt_chars as u64).div_ceil(4).max(1);
    let completion_tokens = v
        .get("max_tokens")
        .or_else(|| v.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(5)
        .clamp(1, 256);
    Ask {
        model,
        stream,
        include_usage,
        prompt_tokens,
        completion_tokens,
    }
}

async fn completion(shared: Arc<Shared>, req: Request<Incoming>, api: Api) -> Response<Body> {
    let arrived = Instant::now();
    let arrived_at = SystemTime::now();
    let guard = InFlight::enter(&shared);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("reading body: {e}"),
            )
        }
    };
    let (delay, status, interval, cached) = {
        let mut s = shared.state();
        s.requests.push(RecordedRequest {
            method: parts.method.clone(),
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            body: body.clone(),
            arrived,
            arrived_at,
        });
        (s.delay, s.status, s.stream_interval, s.cached_tokens)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if status != StatusCode::OK {
        let err = json!({
            "object": "error",
            "message": format!("fake model server {} set to answer {}", shared.name, status.as_u16()),
            "type": status.canonical_reason().unwrap_or("Error"),
            "param": null,
            "code": status.as_u16(),
        });
        guard.complete();
        return text(status, "application/json", err.to_string());
    }

    let ask = read_ask(&body, api);
    let n = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let id = match api {
        Api::Completions => format!("cmpl-{}-{n}", shared.name),
        Api::Chat => format!("chatcmpl-{}-{n}", shared.name),
    };
    let created = unix_now() as u64;
    let usage = json!({
        "prompt_tokens": ask.prompt_tokens,
        "completion_tokens": ask.completion_tokens,
        "total_tokens": ask.prompt_tokens + ask.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached.min(ask.prompt_tokens)},
    });

    if !ask.stream {
        let text_out = vec!["tok"; ask.completion_tokens as usize].join(" ");
        let choice = match api {
            Api::Completions => json!({
                "index": 0, "text": text_out, "logprobs": null,
                "finish_reason": "length", "stop_reason": null,
            }),
            Api::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text_out},
                "logprobs": null, "finish_reason": "length", "stop_reason": null,
            }),
        };
        let object = match api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion",
        };
        let answer = json!({
            "id": id, "object": object, "created": created, "model": ask.model,
            "choices": [choice], "usage": usage,
        });
        guard.complete();
        return text(StatusCode::OK, "application/json", answer.to_string());
    }

    // Streamed: one SSE event per token, each flushed on its own with a pause between.
    let object = match api {
        Api::Completions => "text_completion",
        Api::Chat => "chat.completion.chunk",
    };
    let mut events = Vec::new();
    for i in 0..ask.completion_tokens {
        let last = i + 1 == ask.completion_tokens;
        let finish = if last { json!("length") } else { Value::Null };
        let choice = match api {
            Api::Completions => json!({
                "index": 0, "text": " tok", "logprobs": null, "finish_reason": finish,
            }),
            Api::Chat if i == 0 => json!({
                "index": 0, "delta": {"role": "assistant", "content": "tok"},
                "logprobs": null, "finish_reason": finish,
            }),
            Api::Chat => json!({
                "index": 0, "delta": {"content": " tok"},
                "logprobs": null, "finish_reason": finish,
            }),
        };
        let chunk = json!({
            "id": id, "object": object, "created": created, "model": ask.model,
            "choices": [choice],
        });
        events.push(format!("data: {chunk}\n\n"));
    }
    if ask.include_usage {
        let chunk = json!({
            "id": id, "object": object, "created": created, "model": ask.model,
            "choices": [], "usage": usage,
        });
        events.push(format!("data: {chunk}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_owned());

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let count = events.len();
        for (i, event) in events.into_iter().enumerate() {
            if tx.send(Bytes::from(event)).await.is_err() {
                return; // client went away; not counted as completed
            }
            if i + 1 < count && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
        }
        drop(tx);
        guard.complete();
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp
}
