//! One inference request, from arrival to the response head.
//!
//! Auth, then the body under its size and time limits, then the Director's decision, then
//! attempts at model servers. An attempt succeeds once the model server has sent its
//! response head and first body chunk (or an empty body) with a status other than 5xx/429;
//! until then nothing has reached the client, so a connect error, a reset, a timeout or a
//! 5xx/429 leads to a new decision over the endpoints not yet tried (and not ejected by the
//! breaker), after a jittered backoff, within the attempt and time budgets. After the head
//! is handed to hyper the request is never retried; `relay` takes over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE,
    HOST, WWW_AUTHENTICATE,
};
use hyper::http::{request, response};
use hyper::{Request, Response, StatusCode, Uri};
use infergate_core::director::{Decision, RequestInput};
use infergate_metrics::ErrorLabels;
use rand::rngs::SmallRng;
use rand::Rng as _;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::breaker::Verdict;
use crate::metrics::Reason;
use crate::relay::{Ledger, Peeked, Relay, RelayParts, ResponseBody};
use crate::{error_chain, error_response, fmt_duration, Gateway};

/// Names the request's InferenceObjective (its priority).
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
/// The conformance tests' endpoint restriction (honoured only when the profile has the filter).
pub const TEST_SELECTION_HEADER: &str = "test-epp-endpoint-selection";
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Serves one request on an OpenAI route; the response carries `x-request-id`.
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<ResponseBody> {
    let mut rng = gw.next_rng();
    let request_id = request_id(req.headers(), &mut rng);
    let span = tracing::info_span!(
        "request",
        request_id = request_id.to_str().unwrap_or_default(),
        model = tracing::field::Empty,
        endpoint = tracing::field::Empty,
    );
    let mut resp = proxy(gw, req, &request_id, rng, span.clone())
        .instrument(span)
        .await;
    resp.headers_mut().insert(REQUEST_ID_HEADER, request_id);
    resp
}

/// The client's `x-request-id` when it is a sane token, else a new random one.
fn request_id(headers: &HeaderMap, rng: &mut SmallRng) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID_HEADER) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(u8::is_ascii_graphic) {
            return v.clone();
        }
    }
    let id = format!("{:032x}", rng.random::<u128>());
    HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("-"))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A refusal before any model server was asked.
fn refuse(gw: &Gateway, status: StatusCode, message: &str) -> Response<ResponseBody> {
    gw.log_outcome(status.as_u16(), None, 0, Duration::ZERO, message);
    error_response(status, message)
}

/// `Ok(default objective)` for a valid key, `Err(message)` otherwise.
pub(crate) fn authorize<'a>(
    keys: &'a crate::ApiKeys,
    headers: &HeaderMap,
) -> Result<Option<&'a str>, &'static str> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err("missing API key: send the header `Authorization: Bearer YOUR_KEY`");
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or("malformed Authorization header: expected `Bearer YOUR_KEY` (invalid API key)")?;
    keys.lookup(token).ok_or("invalid API key")
}

async fn proxy(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    mut rng: SmallRng,
    span: tracing::Span,
) -> Response<ResponseBody> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();

    let key_objective = match &gw.cfg.api_keys {
        None => None,
        Some(keys) => match authorize(keys, &parts.headers) {
            Ok(objective) => objective,
            Err(message) => {
                let mut r = refuse(&gw, StatusCode::UNAUTHORIZED, message);
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        },
    };
    let objective = header_str(&parts.headers, OBJECTIVE_HEADER).or(key_objective);

    let body = match read_body(&gw, &parts.headers, body).await {
        Ok(b) => b,
        Err((status, message)) => {
            count_refusal(
                &gw,
                if status == StatusCode::REQUEST_TIMEOUT {
                    "RequestTimeout"
                } else {
                    "BadRequest"
                },
            );
            return refuse(&gw, status, &message);
        }
    };

    let mut input = RequestInput {
        path: parts.uri.path(),
        body: Some(&body),
        objective,
        test_selection: header_str(&parts.headers, TEST_SELECTION_HEADER),
        subset: match gw.candidates(&[]) {
            Candidates::Only(v) => Some(v),
            Candidates::Any | Candidates::Exhausted => None,
        },
    };
    let admitted = match gw.admission(&input).await {
        Ok(ticket) => ticket,
        Err(e) => return refuse_pick(&gw, &e),
    };
    let decided = gw.decide(&input, &mut rng);
    drop(admitted);
    let (mut decision, decided_at) = match decided {
        Ok(d) => d,
        Err(e) => return refuse_pick(&gw, &e),
    };
    span.record("model", decision.model.as_str());
    let labels = gw
        .metrics
        .model_labels(&decision.model, &decision.target_model);
    let mut ledger = Ledger::open(
        gw.clone(),
        labels,
        decision.priority,
        body.len(),
        decided_at,
        span.clone(),
    );

    let mut tried: Vec<(SocketAddr, Reason, String)> = Vec::new();
    // The last 5xx/429 answer, passed through if no later attempt does better.
    let mut kept: Option<(SocketAddr, Box<Response<Incoming>>)> = None;
    loop {
        let Some(&addr) = decision.endpoints.first() else {
            return refuse(
                &gw,
                StatusCode::INTERNAL_SERVER_ERROR,
                "the scheduler returned no endpoint",
            );
        };
        span.record("endpoint", tracing::field::display(addr));
        gw.breakers.on_dispatch(addr, (gw.clock)());
        let send = match decision.rewritten_body.take() {
            Some(b) => Bytes::from(b),
            None => body.clone(),
        };
        match gw
            .attempt(addr, &parts, send, request_id, decision.stream)
            .await
        {
            Ok(c) => {
                // Success is recorded when the body ends cleanly (see `Relay`), not at the
                // response head: a replica that starts every answer and then breaks it off
                // would otherwise reset its failure count on each request, never be ejected,
                // and, finishing fast, draw ever more traffic.
                return gw.commit(c, addr, Some(ledger), Some(decision));
            }
            Err(f) => {
                gw.gw_metrics.failure(f.reason);
                if let Verdict::Ejected(for_) = gw.breakers.on_failure(addr, (gw.clock)()) {
                    gw.ejected(addr, for_, &f.detail);
                }
                tracing::debug!(endpoint = %addr, reason = f.reason.label(), detail = %f.detail, "attempt failed");
                tried.push((addr, f.reason, f.detail));
                if let Some(r) = f.response {
                    kept = Some((addr, r));
                }
            }
        }
        // Try again elsewhere, if the budgets allow and an endpoint is left.
        let n = tried.len() as u32;
        if n >= gw.cfg.max_attempts {
            break;
        }
        let cap = gw.cfg.retry_backoff.saturating_mul(1u32 << (n - 1).min(16));
        let backoff = cap.mul_f64(rng.random::<f64>());
        if arrived.elapsed() + backoff >= gw.cfg.retry_deadline {
            break;
        }
        tokio::time::sleep(backoff).await;
        let addrs: Vec<SocketAddr> = tried.iter().map(|t| t.0).collect();
        input.subset = match gw.candidates(&addrs) {
            Candidates::Only(v) => Some(v),
            Candidates::Any => None,
            Candidates::Exhausted => break,
        };
        match gw.decide(&input, &mut rng) {
            Ok((d, _)) => {
                decision = d;
                ledger.attempts += 1;
                gw.gw_metrics.retries.inc();
            }
            Err(e) => {
                tracing::debug!(error = %e.message, "no endpoint for another attempt");
                break;
            }
        }
    }
    drop(decision);
    gw.give_up(tried, kept, ledger)
}

/// Answer a request the director refused, with its status and message.
fn refuse_pick(gw: &Gateway, e: &infergate_core::PickError) -> Response<ResponseBody> {
    count_refusal(gw, e.kind.code());
    let status = StatusCode::from_u16(e.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    refuse(gw, status, &e.message)
}

fn count_refusal(gw: &Gateway, code: &str) {
    // As the picker counts refusals: no model labels, the error kind's code.
    gw.metrics
        .request_error_total
        .get_or_create(&ErrorLabels {
            model_name: String::new(),
            target_model_name: String::new(),
            error_code: code.to_string(),
        })
        .inc();
}

/// The body under `max_body_bytes` and `body_read_timeout`; `Err` is status and message.
///
/// A body refused for its size is read on and discarded in the background (within the
/// read timeout), so the client, still sending, gets the 413 rather than a reset.
async fn read_body(
    gw: &Gateway,
    headers: &HeaderMap,
    mut body: Incoming,
) -> Result<Bytes, (StatusCode, String)> {
    let limit = gw.cfg.max_body_bytes;
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than this gateway's limit of {limit} bytes (--max-body-bytes)"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        discard(body, gw.cfg.body_read_timeout);
        return Err(too_large());
    }
    enum Stop {
        TooLarge,
        Broken(hyper::Error),
    }
    let read = async {
        // One chunk (the usual case) is kept as is; more are joined.
        let mut first: Option<Bytes> = None;
        let mut joined = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(Stop::Broken)?.into_data() else {
                continue; // trailers
            };
            let have = first.as_ref().map_or(0, Bytes::len) + joined.len();
            if have + data.len() > limit {
                return Err(Stop::TooLarge);
            }
            match first.take() {
                None if joined.is_empty() => first = Some(data),
                None => joined.extend_from_slice(&data),
                Some(f) => {
                    joined.reserve(declared.map_or(0, |n| n as usize).max(f.len() + data.len()));
                    joined.extend_from_slice(&f);
                    joined.extend_from_slice(&data);
                }
            }
        }
        Ok(first.unwrap_or_else(|| joined.freeze()))
    };
    let outcome = tokio::time::timeout(gw.cfg.body_read_timeout, read).await;
    match outcome {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(Stop::TooLarge)) => {
            discard(body, gw.cfg.body_read_timeout);
            Err(too_large())
        }
        Ok(Err(Stop::Broken(e))) => Err((
            StatusCode::BAD_REQUEST,
            format!("could not read the request body: {}", error_chain(&e)),
        )),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} (--body-read-timeout)",
                fmt_duration(gw.cfg.body_read_timeout)
            ),
        )),
    }
}

/// Reads and drops the rest of a refused body for at most `within`.
fn discard(mut body: Incoming, within: Duration) {
    tokio::spawn(tokio::time::timeout(within, async move {
        while let Some(Ok(_)) = body.frame().await {}
    }));
}

/// Which endpoints the next decision may choose from.
enum Candidates {
    /// Every ready endpoint (nothing tried, nothing ejected).
    Any,
    Only(Vec<SocketAddr>),
    /// Every ready endpoint was tried already.
    Exhausted,
}

/// A response head (and first body chunk) from a model server, ready to relay.
struct Committed {
    head: response::Parts,
    body: Incoming,
    first: Peeked,
}

/// A failed attempt; `response` holds a 5xx/429 answer, kept in case no attempt does better.
struct Failure {
    reason: Reason,
    detail: String,
    response: Option<Box<Response<Incoming>>>,
}

impl Gateway {
    fn decide(
        &self,
        input: &RequestInput<'_>,
        rng: &mut SmallRng,
    ) -> Result<(Decision, Duration), infergate_core::PickError> {
        let t0 = (self.clock)();
        let result = self.director.decide(input, t0, rng);
        let t1 = (self.clock)();
        self.metrics
            .scheduler_e2e_duration_seconds
            .observe(t1.saturating_sub(t0).as_secs_f64());
        result.map(|d| (d, t1))
    }

    /// Ready endpoints not in `tried` and not ejected; if the breaker has ejected all of
    /// them, the untried ones anyway: a request is better tried on a suspect endpoint than
    /// refused, and its outcome is the breaker's probe.
    fn candidates(&self, tried: &[SocketAddr]) -> Candidates {
        if tried.is_empty() && !self.breakers.any_tracked() {
            return Candidates::Any;
        }
        let snap = self.datastore.snapshot();
        let now = (self.clock)();
        let untried: Vec<SocketAddr> = snap
            .endpoints
            .iter()
            .map(|e| e.spec.addr)
            .filter(|a| !tried.contains(a))
            .collect();
        if untried.is_empty() {
            return if tried.is_empty() {
                Candidates::Any // an empty pool: let the Director say so
            } else {
                Candidates::Exhausted
            };
        }
        let mut healthy = untried.clone();
        self.breakers.retain_available(&mut healthy, now);
        if healthy.is_empty() {
            tracing::warn!(
                endpoints = untried.len(),
                "every remaining endpoint is ejected by the circuit breaker; trying them anyway"
            );
            return Candidates::Only(untried);
        }
        if tried.is_empty() && healthy.len() == snap.endpoints.len() {
            return Candidates::Any;
        }
        Candidates::Only(healthy)
    }

    /// One attempt at `addr`: the response head and first body chunk within
    /// `first_byte_timeout`; for a streamed request, the head within the shorter
    /// `stream_first_byte_timeout` too.
    async fn attempt(
        &self,
        addr: SocketAddr,
        parts: &request::Parts,
        body: Bytes,
        request_id: &HeaderValue,
        stream: bool,
    ) -> Result<Committed, Failure> {
        let req = self.upstream_request(addr, parts, body, request_id)?;
        let head_limit = self.cfg.stream_first_byte_timeout;
        let exchange = async {
            let pending = self.client.request(req);
            let resp = if stream && !head_limit.is_zero() {
                // vLLM sends a stream's head before generating: silence means a hung replica.
                tokio::time::timeout(head_limit, pending)
                    .await
                    .map_err(|_| Failure {
                        reason: Reason::Timeout,
                        detail: format!(
                            "sent no response head to a streamed request within {} \
                             (--stream-first-byte-timeout)",
                            fmt_duration(head_limit)
                        ),
                        response: None,
                    })?
            } else {
                pending.await
            };
            let resp = resp.map_err(|e| {
                let reason = if e.is_connect() {
                    Reason::Connect
                } else {
                    Reason::Reset
                };
                Failure {
                    reason,
                    detail: error_chain(&e),
                    response: None,
                }
            })?;
            let status = resp.status();
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(Failure {
                    reason: Reason::Status(status.as_u16()),
                    detail: format!("answered {status}"),
                    response: Some(Box::new(resp)),
                });
            }
            let (head, mut body) = resp.into_parts();
            let first = match body.frame().await {
                None => Peeked::EndOfBody,
                Some(Ok(f)) => Peeked::Frame(f),
                Some(Err(e)) => {
                    return Err(Failure {
                        reason: Reason::Reset,
                        detail: format!(
                            "broke off the response before its first byte: {}",
                            error_chain(&e)
                        ),
                        response: None,
                    })
                }
            };
            Ok(Committed { head, body, first })
        };
        match tokio::time::timeout(self.cfg.first_byte_timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Failure {
                reason: Reason::Timeout,
                detail: format!(
                    "sent no response within {} (--first-byte-timeout)",
                    fmt_duration(self.cfg.first_byte_timeout)
                ),
                response: None,
            }),
        }
    }

    /// The client's request re-addressed to `addr`: same method, path and query; headers
    /// minus hop-by-hop ones (and the client's Authorization when auth is on).
    fn upstream_request(
        &self,
        addr: SocketAddr,
        parts: &request::Parts,
        body: Bytes,
        request_id: &HeaderValue,
    ) -> Result<Request<Full<Bytes>>, Failure> {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = format!("http://{addr}{pq}").parse().map_err(|e| Failure {
            reason: Reason::Connect,
            detail: format!("cannot address {addr}{pq}: {e}"),
            response: None,
        })?;
        let src = &parts.headers;
        let mut headers = HeaderMap::with_capacity(src.len() + 3);
        let listed = src.contains_key(CONNECTION);
        for (name, value) in src {
            if is_hop_by_hop(name)
                || name == HOST
                || name == CONTENT_LENGTH
                || name == REQUEST_ID_HEADER
                || (name == AUTHORIZATION && self.cfg.api_keys.is_some())
                || (listed && named_in_connection(src, name))
            {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
            headers.insert(HOST, host);
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        headers.insert(REQUEST_ID_HEADER, request_id.clone());
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Ok(req)
    }

    /// Hand a model server's answer to the client: its status and headers (minus
    /// hop-by-hop ones), and its body through a [`Relay`].
    fn commit(
        self: &Arc<Self>,
        c: Committed,
        addr: SocketAddr,
        ledger: Option<Ledger>,
        decision: Option<Decision>,
    ) -> Response<ResponseBody> {
        let status = c.head.status;
        if status.as_u16() >= 400 {
            if let Some(l) = &ledger {
                l.error(format!("ModelServerError{}", status.as_u16()));
            }
        }
        let sse = c
            .head
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let mut headers = c.head.headers;
        strip_hop_by_hop(&mut headers);
        let rename = decision
            .as_ref()
            .filter(|d| d.target_model != d.model && !d.model.is_empty())
            .map(|d| (d.target_model.clone(), d.model.clone()));
        if rename.is_some() {
            // The name mapped back may change the length.
            headers.remove(CONTENT_LENGTH);
        }
        let relay = Relay::new(
            self.clone(),
            RelayParts {
                upstream: c.body,
                first: c.first,
                endpoint: addr,
                status: status.as_u16(),
                sse,
                rename,
                ledger,
                inflight: decision.map(|d| d.inflight),
            },
        );
        let mut resp = Response::new(ResponseBody::Relay(Box::new(relay)));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    /// Every attempt failed: pass the last 5xx/429 answer through, else 502 or 504 naming
    /// what was tried.
    fn give_up(
        self: &Arc<Self>,
        tried: Vec<(SocketAddr, Reason, String)>,
        kept: Option<(SocketAddr, Box<Response<Incoming>>)>,
        ledger: Ledger,
    ) -> Response<ResponseBody> {
        if let Some((addr, resp)) = kept {
            let (head, body) = resp.into_parts();
            return self.commit(
                Committed {
                    head,
                    body,
                    first: Peeked::Unread,
                },
                addr,
                Some(ledger),
                None,
            );
        }
        let timeout = tried.last().is_some_and(|t| t.1 == Reason::Timeout);
        let status = if timeout {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        let what: Vec<String> = tried
            .iter()
            .map(|(a, _, detail)| format!("{a} {detail}"))
            .collect();
        let message = format!(
            "no model server could take the request after {} attempt{}: {}",
            tried.len(),
            if tried.len() == 1 { "" } else { "s" },
            what.join("; ")
        );
        ledger.error(format!("ModelServerError{}", status.as_u16()));
        let _enter = ledger.span.enter();
        self.log_outcome(
            status.as_u16(),
            tried.last().map(|t| t.0),
            ledger.attempts,
            ledger.elapsed(),
            &message,
        );
        error_response(status, &message)
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "expect"
    )
}

fn named_in_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}
