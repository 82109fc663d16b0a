//! The real-time load generator: a workload sent over HTTP to OpenAI-compatible servers.
//!
//! [`run`] posts each [`RequestSpec`] to `{base}/v1/completions` of one of the configured
//! base URLs (round robin over them when there are several: client-side load balancing, the
//! "Kubernetes Service" baseline) and records one [`Outcome`] per spec, in spec order.
//!
//! # Modes
//! - [`Mode::Open`]: each request goes out at its `at` offset from the start of the run,
//!   whether or not earlier ones have finished (how a real user population behaves).
//! - [`Mode::Closed`]: requests go out in spec order with `concurrency` of them outstanding;
//!   the next one starts as soon as one finishes.
//!
//! # What is measured
//! Times are seconds since the start of the run, read when the runner sees the bytes:
//! `sent` just before the request is handed to the client, `first_token` at the first SSE
//! event carrying text, `done` at the end of the response. `itl` holds the gaps between
//! consecutive text events after the first. Output tokens come from the stream's usage
//! chunk (we ask for it with `stream_options.include_usage`), else the number of text
//! events. Unstreamed requests have `first_token == done` and no gaps.
//!
//! A stream that ends without `data: [DONE]` is an error ("stream ended early"), as is a
//! non-2xx answer (its body summarised), a connection failure, a per-request timeout, or a
//! request still open at the run's deadline ("cancelled at deadline"). A 429 is recorded as
//! shed.
//!
//! # Cost
//! One hyper client (pooled keep-alive connections) serves the whole run and every request
//! is a future polled by the runner's own task: no thread or task per request, so the
//! generator stays cheap next to the servers it measures on a small machine.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;

use crate::stats::Outcome;
use crate::workload::RequestSpec;

/// The header naming a request's InferenceObjective (Gateway API Inference Extension).
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";

/// How requests are paced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each request at its spec's `at` seconds from the start, never waiting for others.
    Open,
    /// Specs in order with this many outstanding at once (at least 1).
    Closed { concurrency: usize },
}

/// What to send where.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Base URLs such as `http://127.0.0.1:8000`; several are used round robin.
    pub urls: Vec<String>,
    /// The `model` of requests without a LoRA adapter.
    pub model: String,
    /// Stream answers as server-sent events (default true); needed for TTFT and ITL.
    pub stream: bool,
    /// Bound on one request, from send to the end of its answer.
    pub timeout: Duration,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    pub mode: Mode,
    /// Bound on the whole run: requests still open then are cancelled, unsent ones skipped.
    pub deadline: Option<Duration>,
}

impl HttpConfig {
    /// Open loop, streamed, 10-minute request timeout, no key, no deadline.
    pub fn new(urls: Vec<String>, model: impl Into<String>) -> HttpConfig {
        HttpConfig {
            urls,
            model: model.into(),
            stream: true,
            timeout: Duration::from_secs(600),
            api_key: None,
            mode: Mode::Open,
            deadline: None,
        }
    }
}

/// Where a run is, reported after every finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Requests with an outcome so far.
    pub done: usize,
    pub total: usize,
    /// Of `done`, those that are not successes (errors and shed).
    pub errors: usize,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(10)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

/// `{base}{path}` as a URI; only plain `http://` is supported (no TLS client here).
fn endpoint(base: &str, path: &str) -> anyhow::Result<Uri> {
    let s = format!("{}{path}", base.trim_end_matches('/'));
    let uri: Uri = s
        .parse()
        .with_context(|| format!("{base:?} is not a valid URL"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(uri),
        Some("https") => anyhow::bail!("{base}: https is not supported, use http://"),
        _ => anyhow::bail!("{base:?} is not an http:// URL"),
    }
}

/// The model ids a server lists at `GET {base}/v1/models`, in its order.
///
/// Fails when the server cannot be reached within `timeout`, answers with a non-2xx status,
/// or answers something other than an OpenAI model list.
pub async fn list_models(
    base: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Model {
        id: String,
    }
    #[derive(Deserialize)]
    struct List {
        data: Vec<Model>,
    }
    let uri = endpoint(base, "/v1/models")?;
    let mut req = Request::get(uri);
    if let Some(k) = api_key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req.body(Full::new(Bytes::new()))?;
    let fetch = async {
        let resp = client()
            .request(req)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", error_chain(&e)))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{base}: reading /v1/models: {e}"))?
            .to_bytes();
        if !status.is_success() {
            anyhow::bail!(
                "{base}/v1/models answered {status}: {}",
                summarise_error(&body)
            );
        }
        let list: List = serde_json::from_slice(&body)
            .with_context(|| format!("{base}/v1/models is not an OpenAI model list"))?;
        Ok(list.data.into_iter().map(|m| m.id).collect())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| anyhow::anyhow!("cannot reach {base}: no answer within {timeout:?}"))?
}

/// An error and its sources, `: `-separated (hyper's top-level message alone is vague).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// A short description of an error body: OpenAI's `error.message`, else `message`, else
/// the first 200 characters of the text.
fn summarise_error(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let msg = v
            .pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error").filter(|e| e.is_string()));
        if let Some(m) = msg.and_then(|m| m.as_str()) {
            return m.chars().take(200).collect();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        text.chars().take(200).collect()
    }
}

/// The JSON body of `spec`'s request.
fn request_body(spec: &RequestSpec, model: &str, stream: bool) -> Vec<u8> {
    let mut body = serde_json::json!({
        "model": spec.lora.as_deref().unwrap_or(model),
        "prompt": spec.prompt,
        "max_tokens": spec.output_tokens,
        "ignore_eos": true,
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({ "include_usage": true });
    }
    serde_json::to_vec(&body).expect("a JSON value serialises")
}

/// The POST of `spec` to `uri`: JSON body, the objective header when the spec has one,
/// the bearer key when configured.
fn build_request(
    spec: &RequestSpec,
    cfg: &HttpConfig,
    uri: Uri,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let body = request_body(spec, &cfg.model, cfg.stream);
    let accept = if cfg.stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut req = Request::post(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, accept);
    if let Some(k) = &cfg.api_key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    if let Some(obj) = &spec.objective {
        req = req.header(OBJECTIVE_HEADER, obj.as_str());
    }
    req.body(Full::new(Bytes::from(body)))
}

/// The parts of an OpenAI completion (or chat) chunk the runner reads.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    completion_tokens: u32,
}

impl Chunk<'_> {
    fn has_text(&self) -> bool {
        self.choices.iter().any(|c| {
            c.text.as_deref().is_some_and(|t| !t.is_empty())
                || c.delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .is_some_and(|t| !t.is_empty())
        })
    }
}

/// An incremental server-sent-events reader: feed it body frames as they come, in any
/// split, and it hands back each event's data (lines of one event joined by `\n`).
#[derive(Default)]
struct SseReader {
    buf: Vec<u8>,
    /// Start of the unread part of `buf`.
    pos: usize,
    data: Vec<u8>,
    has_data: bool,
}

impl SseReader {
    /// Appends `bytes` and calls `on_event` with every event now complete.
    fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(&[u8])) {
        self.buf.extend_from_slice(bytes);
        while let Some(nl) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
            let end = self.pos + nl;
            let mut line = &self.buf[self.pos..end];
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            if line.is_empty() {
                if self.has_data {
                    on_event(&self.data);
                }
                self.data.clear();
                self.has_data = false;
            } else if let Some(v) = line.strip_prefix(b"data:") {
                let v = v.strip_prefix(b" ").unwrap_or(v);
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(v);
                self.has_data = true;
            }
            // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing we use.
            self.pos = end + 1;
        }
        // Keep the buffer small: drop what has been read.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// At the end of the body: an event left without its closing blank line (or even
    /// without the end of its last line).
    fn finish(&mut self, mut on_event: impl FnMut(&[u8])) {
        if self.buf.len() > self.pos {
            self.feed(b"\n", &mut on_event);
        }
        if self.has_data {
            on_event(&self.data);
            self.has_data = false;
        }
    }
}

/// What the stream has shown so far.
#[derive(Default)]
struct StreamState {
    text_events: u32,
    usage_tokens: Option<u32>,
    last_text: Option<Instant>,
    done_seen: bool,
    error: Option<String>,
}

impl StreamState {
    fn event(&mut self, data: &[u8], now: Instant, t0: Instant, o: &mut Outcome) {
        if data == b"[DONE]" {
            self.done_seen = true;
            return;
        }
        let chunk: Chunk = match serde_json::from_slice(data) {
            Ok(c) => c,
            Err(e) => {
                self.error
                    .get_or_insert_with(|| format!("unreadable stream event: {e}"));
                return;
            }
        };
        if let Some(err) = &chunk.error {
            let msg = err
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| err.to_string());
            self.error
                .get_or_insert_with(|| format!("error in stream: {msg}"));
        }
        if let Some(u) = &chunk.usage {
            self.usage_tokens = Some(u.completion_tokens);
        }
        if chunk.has_text() {
            self.text_events += 1;
            match self.last_text {
                None => o.first_token = Some(secs(now, t0)),
                Some(prev) => o
                    .itl
                    .push(now.saturating_duration_since(prev).as_secs_f32()),
            }
            self.last_text = Some(now);
        }
    }
}

fn secs(t: Instant, t0: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64()
}

/// Everything one request needs.
struct Job<'a> {
    client: &'a HttpClient,
    uri: Uri,
    spec: &'a RequestSpec,
    cfg: &'a HttpConfig,
    t0: Instant,
    sent: Instant,
}

/// Sends one request and records what happened; never fails, errors go in the outcome.
async fn one(job: Job<'_>) -> Outcome {
    let mut o = Outcome {
        index: job.spec.index,
        priority: job.spec.priority,
        sent: secs(job.sent, job.t0),
        ..Outcome::default()
    };
    let (timeout, stream) = (job.cfg.timeout, job.cfg.stream);
    let t0 = job.t0;
    let until = job.sent + timeout;
    if tokio::time::timeout_at(until.into(), drive(job, &mut o))
        .await
        .is_err()
    {
        o.error = Some(format!("timeout after {:.1} s", timeout.as_secs_f64()));
    }
    o.done = secs(Instant::now(), t0).max(o.sent);
    if !stream && o.first_token.is_some() {
        // Unstreamed: the whole answer arrives at once.
        o.first_token = Some(o.done);
    }
    o
}

/// The request itself; writes into `o` as it goes (so a timeout keeps what was seen).
async fn drive(job: Job<'_>, o: &mut Outcome) {
    let req = match build_request(job.spec, job.cfg, job.uri) {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(format!("cannot build request: {e}"));
            return;
        }
    };
    let resp: Response<Incoming> = match job.client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(format!("request failed: {}", error_chain(&e)));
            return;
        }
    };
    let status = resp.status();
    o.status = status.as_u16();
    let mut body = resp.into_body();
    if !status.is_success() {
        o.shed = status == StatusCode::TOO_MANY_REQUESTS;
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        o.error = Some(format!("HTTP {}: {}", status, summarise_error(&bytes)));
        return;
    }
    if !job.cfg.stream {
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                o.error = Some(format!("body broken: {}", error_chain(&e)));
                return;
            }
        };
        o.first_token = Some(secs(Instant::now(), job.t0));
        match serde_json::from_slice::<Chunk>(&bytes) {
            Ok(c) => {
                o.output_tokens = c.usage.map_or(0, |u| u.completion_tokens);
                if let Some(err) = c.error {
                    o.error = Some(format!("error in answer: {err}"));
                }
            }
            Err(e) => o.error = Some(format!("unreadable answer: {e}")),
        }
        return;
    }
    let mut sse = SseReader::default();
    let mut st = StreamState::default();
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                st.error
                    .get_or_insert_with(|| format!("stream broken: {}", error_chain(&e)));
                break;
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let now = Instant::now();
                    sse.feed(&data, |ev| st.event(ev, now, job.t0, o));
                }
            }
        }
    }
    let now = Instant::now();
    sse.finish(|ev| st.event(ev, now, job.t0, o));
    o.output_tokens = st.usage_tokens.unwrap_or(st.text_events);
    if st.error.is_none() && !st.done_seen {
        st.error = Some("stream ended early".into());
    }
    o.error = st.error;
}

/// Sends `specs` as `cfg` says and returns one outcome per spec, in spec order.
///
/// `progress` is called after every finished request (and once at the end). Fails only on
/// a bad configuration (no URL, an invalid URL, zero concurrency); everything that goes
/// wrong with a request is recorded in its outcome.
pub async fn run(
    cfg: &HttpConfig,
    specs: &[RequestSpec],
    progress: &(dyn Fn(Progress) + Sync),
) -> anyhow::Result<Vec<Outcome>> {
    if cfg.urls.is_empty() {
        anyhow::bail!("no URL to send requests to");
    }
    let uris = cfg
        .urls
        .iter()
        .map(|u| endpoint(u, "/v1/completions"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let concurrency = match cfg.mode {
        Mode::Closed { concurrency: 0 } => anyhow::bail!("concurrency must be at least 1"),
        Mode::Closed { concurrency } => Some(concurrency),
        Mode::Open => None,
    };
    let client = client();
    let total = specs.len();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; total];
    let mut sent_at: Vec<Option<Instant>> = vec![None; total];
    let (mut done, mut errors) = (0usize, 0usize);
    let t0 = Instant::now();
    let deadline = cfg.deadline.map(|d| t0 + d);
    let mut inflight = FuturesUnordered::new();
    let mut next = 0usize;
    loop {
        if next == total && inflight.is_empty() {
            break;
        }
        // When the next spec may go out (None: not before something finishes).
        let launch: Option<Instant> = if next == total {
            None
        } else {
            match concurrency {
                None => Some(t0 + Duration::from_secs_f64(specs[next].at.max(0.0))),
                Some(n) if inflight.len() < n => Some(t0),
                Some(_) => None,
            }
        };
        let far = t0 + Duration::from_secs(86_400 * 365);
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline.unwrap_or(far).into()), if deadline.is_some() => break,
            Some((i, o)) = inflight.next(), if !inflight.is_empty() => {
                let o: Outcome = o;
                done += 1;
                if !o.ok() {
                    errors += 1;
                }
                outcomes[i] = Some(o);
                progress(Progress { done, total, errors });
            }
            _ = tokio::time::sleep_until(launch.unwrap_or(far).into()), if launch.is_some() => {
                let i = next;
                next += 1;
                let now = Instant::now();
                sent_at[i] = Some(now);
                let job = Job {
                    client: &client,
                    uri: uris[i % uris.len()].clone(),
                    spec: &specs[i],
                    cfg,
                    t0,
                    sent: now,
                };
                inflight.push(async move { (i, one(job).await) });
            }
        }
    }
    drop(inflight);
    // Whatever is left was cut by the deadline.
    let end = secs(Instant::now(), t0);
    let out: Vec<Outcome> = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.unwrap_or_else(|| {
                let spec = &specs[i];
                let (sent, error) = match sent_at[i] {
                    Some(s) => (secs(s, t0), "cancelled at deadline"),
                    None => (end, "not sent before the deadline"),
                };
                done += 1;
                errors += 1;
                Outcome {
                    index: spec.index,
                    priority: spec.priority,
                    sent,
                    done: end,
                    error: Some(error.into()),
                    ..Outcome::default()
                }
            })
        })
        .collect();
    progress(Progress {
        done,
        total,
        errors,
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(parts: &[&str]) -> Vec<String> {
        let mut r = SseReader::default();
        let mut out = Vec::new();
        for p in parts {
            r.feed(p.as_bytes(), |e| {
                out.push(String::from_utf8(e.to_vec()).unwrap())
            });
        }
        r.finish(|e| out.push(String::from_utf8(e.to_vec()).unwrap()));
        out
    }

    #[test]
    fn sse_events_split_anywhere_are_reassembled() {
        let whole = "data: {\"a\":1}\n\n: comment\n\ndata: [DONE]\n\n";
        let expect = vec!["{\"a\":1}".to_string(), "[DONE]".to_string()];
        for cut in 0..whole.len() {
            assert_eq!(events(&[&whole[..cut], &whole[cut..]]), expect, "cut {cut}");
        }
        assert_eq!(
            events(&["data: x\r\n", "data: y\r\n\r\ndata:z"]),
            vec!["x\ny".to_string(), "z".to_string()]
        );
    }

    #[test]
    fn text_chunks_and_usage_are_recognised() {
        let c: Chunk = serde_json::from_str(r#"{"choices":[{"index":0,"text":" hi"}]}"#).unwrap();
        assert!(c.has_text());
        let c: Chunk = serde_json::from_str(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}"#,
        )
        .unwrap();
        assert!(!c.has_text());
        assert_eq!(c.usage.unwrap().completion_tokens, 7);
        let c: Chunk = serde_json::from_str(r#"{"choices":[{"delta":{"content":"x"}}]}"#).unwrap();
        assert!(c.has_text());
    }

    #[test]
    fn error_bodies_are_summarised() {
        assert_eq!(
            summarise_error(br#"{"error":{"message":"no such model","code":404}}"#),
            "no such model"
        );
        assert_eq!(summarise_error(b"  plain text "), "plain text");
        assert_eq!(summarise_error(b""), "(empty body)");
    }

    #[test]
    fn only_plain_http_urls_are_accepted() {
        assert!(endpoint("http://127.0.0.1:8000/", "/v1/models").is_ok());
        assert_eq!(
            endpoint("http://127.0.0.1:8000/", "/v1/models")
                .unwrap()
                .to_string(),
            "http://127.0.0.1:8000/v1/models"
        );
        assert!(endpoint("https://x", "/v1/models").is_err());
        assert!(endpoint("127.0.0.1:8000", "/v1/models").is_err());
    }

    fn spec(lora: Option<&str>, objective: Option<&str>) -> RequestSpec {
        RequestSpec {
            index: 3,
            at: 0.0,
            prompt: "a b c".into(),
            prompt_tokens: 3,
            output_tokens: 17,
            lora: lora.map(str::to_owned),
            objective: objective.map(str::to_owned),
            priority: 0,
            group: None,
        }
    }

    async fn sent(
        spec: &RequestSpec,
        cfg: &HttpConfig,
    ) -> (hyper::http::request::Parts, serde_json::Value) {
        let uri: Uri = "http://127.0.0.1:1/v1/completions".parse().unwrap();
        let (parts, body) = build_request(spec, cfg, uri).unwrap().into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn requests_carry_model_objective_key_and_stream_options() {
        let mut cfg = HttpConfig::new(vec![], "base-model");
        let (parts, body) = sent(&spec(None, None), &cfg).await;
        assert_eq!(parts.method, hyper::Method::POST);
        assert_eq!(
            body,
            serde_json::json!({
                "model": "base-model", "prompt": "a b c", "max_tokens": 17,
                "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
        assert!(parts.headers.get(OBJECTIVE_HEADER).is_none());
        assert!(parts.headers.get("authorization").is_none());

        cfg.stream = false;
        cfg.api_key = Some("sk-1".into());
        let (parts, body) = sent(&spec(Some("adapter-2"), Some("batch")), &cfg).await;
        assert_eq!(
            body,
            serde_json::json!({
                "model": "adapter-2", "prompt": "a b c", "max_tokens": 17, "ignore_eos": true,
            })
        );
        assert_eq!(parts.headers[OBJECTIVE_HEADER], "batch");
        assert_eq!(parts.headers["authorization"], "Bearer sk-1");
        assert_eq!(parts.headers["content-type"], "application/json");
    }
}
