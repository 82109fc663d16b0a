//! The endpoint-picker protocol over Envoy ext_proc, one HTTP exchange at a time.
//!
//! [`Exchange`] is a state machine fed the [`ProcessingRequest`]s of one gRPC stream and
//! answering with the [`ProcessingResponse`]s to send back; it does no I/O, so tests can
//! play Envoy's part message by message. The rules it follows (DESIGN.md 4.5):
//! - `FULL_DUPLEX_STREAMED` request bodies: nothing is answered until the body ends; then
//!   the request-headers reply carries the destination (header and `envoy.lb` metadata) and
//!   `clear_route_cache`, followed by the body in chunks of at most 62,000 bytes.
//! - `BUFFERED` request bodies: headers are let through at once; the body reply carries the
//!   destination as a header mutation.
//! - Headers with `end_of_stream`: picked on load alone, no body information.
//! - Responses: passed through chunk by chunk; usage is read from JSON or SSE; a rewritten
//!   model name is mapped back to the name the client asked for.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_request::Request, processing_response::Response, BodyMutation,
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody, HttpHeaders,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use infergate_core::director::{Decision, Director, PickError, RequestInput};
use infergate_core::flow::{self, Admission, Ticket, Waiter};
use infergate_core::ErrorKind;
use infergate_metrics::{ErrorLabels, Metrics, ModelLabels, RequestLabels, RunningLabels};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use infergate_core::rewrite::map_model_back;
use infergate_core::usage::{self, SseUsage, Usage};

/// Header and metadata key naming the chosen endpoint(s).
pub const DESTINATION_KEY: &str = "x-gateway-destination-endpoint";
/// Metadata key the gateway sets to the endpoint that actually served.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// Metadata namespace of the destination and served keys.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Metadata namespace and key of the gateway's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
pub const TEST_SELECTION_HEADER: &str = "test-epp-endpoint-selection";
/// Response header reporting the served endpoint, as the GIE conformance suite reads it.
pub const CONFORMANCE_SERVED_HEADER: &str = "x-conformance-test-served-endpoint";
/// Largest body chunk sent back to Envoy in one streamed mutation.
pub const MAX_CHUNK: usize = 62_000;
/// Non-streaming response bodies larger than this are passed through without usage parsing.
const MAX_BUFFERED_RESPONSE: usize = 16 << 20;

/// Envoy's `BodySendMode` numbers, as carried in `protocol_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    None,
    Streamed,
    Buffered,
    BufferedPartial,
    FullDuplex,
}

impl BodyMode {
    /// Modes in which Envoy sends the body as one message and waits for its reply.
    fn is_buffered(self) -> bool {
        matches!(self, BodyMode::Buffered | BodyMode::BufferedPartial)
    }

    fn from_i32(v: i32) -> BodyMode {
        match v {
            0 => BodyMode::None,
            1 => BodyMode::Streamed,
            2 => BodyMode::Buffered,
            3 => BodyMode::BufferedPartial,
            _ => BodyMode::FullDuplex,
        }
    }
}

/// Settings of the service that are not scheduling.
#[derive(Debug, Clone)]
pub struct Options {
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// Report the served endpoint in `x-conformance-test-served-endpoint`.
    pub conformance_headers: bool,
    /// An exchange that hears nothing from Envoy for this long is dropped, releasing its
    /// in-flight count (a safety net; Envoy normally closes the stream itself).
    pub idle_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_body_bytes: 64 << 20,
            conformance_headers: false,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// What every exchange shares.
pub struct Context {
    pub director: Arc<Director>,
    pub metrics: Arc<Metrics>,
    /// Monotonic time since an epoch of the caller's choosing.
    pub clock: Arc<dyn Fn() -> Duration + Send + Sync>,
    pub options: Options,
    seed: AtomicU64,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        director: Arc<Director>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Fn() -> Duration + Send + Sync>,
        options: Options,
        seed: u64,
    ) -> Self {
        Context {
            director,
            metrics,
            clock,
            options,
            seed: AtomicU64::new(seed),
        }
    }

    fn next_rng(&self) -> SmallRng {
        // Distinct, reproducible streams per exchange without a global RNG.
        SmallRng::seed_from_u64(
            self.seed
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed),
        )
    }
}

#[derive(Debug, Default)]
struct RequestState {
    path: String,
    objective: Option<String>,
    test_selection: Option<String>,
    subset: Option<Vec<SocketAddr>>,
    body: Vec<u8>,
    decided: bool,
}

#[derive(Debug, Default)]
struct ResponseState {
    started: bool,
    sse: bool,
    bytes: u64,
    /// Unemitted tail of a streamed response being rewritten (after the last newline).
    held: Vec<u8>,
    /// Whole non-streaming body, for usage (and rewriting) at its end.
    buffered: Vec<u8>,
    buffer_overflow: bool,
    sse_usage: SseUsage,
    first_byte_at: Option<Duration>,
    finished: bool,
    /// The response's status, once its headers came.
    status: u16,
}

/// One HTTP request/response through the picker.
pub struct Exchange {
    ctx: Arc<Context>,
    rng: SmallRng,
    request_mode: BodyMode,
    response_mode: BodyMode,
    req: RequestState,
    resp: ResponseState,
    decision: Option<Decision>,
    decided_at: Duration,
    labels: Option<ModelLabels>,
    /// A request waiting in the flow-control queue (see [`Exchange::take_waiter`]).
    queued: Option<Queued>,
}

/// What to do when a queued request is released.
#[derive(Debug)]
struct Queued {
    has_body: bool,
    body_eos: bool,
    priority: i32,
    since: Duration,
    waiter: Option<Waiter>,
}

impl Exchange {
    pub fn new(ctx: Arc<Context>) -> Self {
        let rng = ctx.next_rng();
        Exchange {
            ctx,
            rng,
            request_mode: BodyMode::FullDuplex,
            response_mode: BodyMode::FullDuplex,
            req: RequestState::default(),
            resp: ResponseState::default(),
            decision: None,
            decided_at: Duration::ZERO,
            labels: None,
            queued: None,
        }
    }

    /// Handle one message from Envoy; returns the replies to send, in order.
    pub fn on_message(&mut self, mut msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        if let Some(pc) = &msg.protocol_config {
            self.request_mode = BodyMode::from_i32(pc.request_body_mode);
            self.response_mode = BodyMode::from_i32(pc.response_body_mode);
        }
        match msg.request.take() {
            Some(Request::RequestHeaders(h)) => self.on_request_headers(h, &msg),
            Some(Request::RequestBody(b)) => self.on_request_body(b),
            Some(Request::RequestTrailers(_)) => self.on_request_trailers(),
            Some(Request::ResponseHeaders(h)) => self.on_response_headers(h, &msg),
            Some(Request::ResponseBody(b)) => self.on_response_body(b),
            Some(Request::ResponseTrailers(_)) => {
                self.finish();
                vec![reply(Response::ResponseTrailers(
                    TrailersResponse::default(),
                ))]
            }
            None => vec![],
        }
    }

    fn on_request_headers(
        &mut self,
        h: HttpHeaders,
        msg: &ProcessingRequest,
    ) -> Vec<ProcessingResponse> {
        for hv in h.headers.iter().flat_map(|m| m.headers.iter()) {
            let key = hv.key.as_str();
            match key {
                ":path" => self.req.path = header_value(hv),
                OBJECTIVE_HEADER => self.req.objective = Some(header_value(hv)),
                TEST_SELECTION_HEADER => self.req.test_selection = Some(header_value(hv)),
                _ => {}
            }
        }
        self.req.subset = subset_hint(msg);
        if h.end_of_stream {
            return self.decide_and_route(false);
        }
        match self.request_mode {
            // The body follows without waiting; answer when it ends.
            BodyMode::FullDuplex => vec![],
            // Envoy waits for this reply before sending the body: let the headers through
            // now and route from the body reply.
            BodyMode::Buffered | BodyMode::BufferedPartial => {
                vec![reply(Response::RequestHeaders(HeadersResponse {
                    response: Some(CommonResponse::default()),
                }))]
            }
            // The body is never sent to us: route on the headers alone.
            BodyMode::None => self.decide_and_route(false),
            // Headers go upstream before any body chunk could inform the pick.
            BodyMode::Streamed => {
                self.req.decided = true;
                vec![self.refuse(
                    PickError {
                        kind: ErrorKind::Internal,
                        message: "the gateway's ext_proc filter uses request_body_mode STREAMED, \
                                  which routes before the body is seen; configure \
                                  FULL_DUPLEX_STREAMED (recommended) or BUFFERED"
                            .to_string(),
                    },
                    500,
                )]
            }
        }
    }

    fn on_request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if self.req.decided {
            return vec![];
        }
        if self.req.body.len() + b.body.len() > self.ctx.options.max_body_bytes {
            self.req.decided = true;
            return vec![self.refuse(
                PickError {
                    kind: ErrorKind::BadRequest,
                    message: format!(
                        "request body exceeds the picker's limit of {} bytes (--max-body-bytes)",
                        self.ctx.options.max_body_bytes
                    ),
                },
                413,
            )];
        }
        if self.req.body.is_empty() {
            self.req.body = b.body;
        } else {
            self.req.body.extend_from_slice(&b.body);
        }
        if self.request_mode == BodyMode::BufferedPartial && !b.end_of_stream {
            // Envoy's buffer limit cut the body short: say so rather than "invalid JSON".
            self.req.decided = true;
            return vec![self.refuse(
                PickError {
                    kind: ErrorKind::BadRequest,
                    message: format!(
                        "the gateway sent only the first {} bytes of the body (BUFFERED_PARTIAL \
                         hit its buffer limit); use FULL_DUPLEX_STREAMED or raise the limit",
                        self.req.body.len()
                    ),
                },
                413,
            )];
        }
        // In the buffered modes one message is all the body Envoy will send before it waits
        // for our reply (trailers may still follow).
        let buffered = self.request_mode.is_buffered();
        if b.end_of_stream || buffered {
            return self.decide_and_route(true);
        }
        vec![]
    }

    fn on_request_trailers(&mut self) -> Vec<ProcessingResponse> {
        let mut out = if self.req.decided {
            vec![]
        } else {
            self.decide_and_route_with(true, false)
        };
        out.push(reply(
            Response::RequestTrailers(TrailersResponse::default()),
        ));
        out
    }

    fn decide_and_route(&mut self, has_body: bool) -> Vec<ProcessingResponse> {
        self.decide_and_route_with(has_body, true)
    }

    /// Schedule, then answer in the shape the body mode requires. `body_eos`: whether the
    /// last body chunk we send ends the stream (false when trailers follow).
    fn decide_and_route_with(&mut self, has_body: bool, body_eos: bool) -> Vec<ProcessingResponse> {
        self.req.decided = true;
        self.route(has_body, body_eos, None)
    }

    /// With flow control on and the pool saturated, the request waits: the caller takes
    /// this future, awaits it under the time limit it is given, and passes the outcome to
    /// [`Exchange::resume`]. Until then the exchange answers nothing.
    pub fn take_waiter(&mut self) -> Option<(Waiter, Duration)> {
        let waiter = self.queued.as_mut()?.waiter.take()?;
        let ttl = self
            .ctx
            .director
            .config()
            .flow
            .map_or(Duration::from_secs(30), |f| f.ttl);
        Some((waiter, ttl))
    }

    /// Continue a request that waited in the flow-control queue: schedule it (released) or
    /// refuse it (displaced, or waited too long).
    pub fn resume(&mut self, admitted: Result<Ticket, PickError>) -> Vec<ProcessingResponse> {
        let Some(q) = self.queued.take() else {
            return vec![];
        };
        let waited = (self.ctx.clock)().saturating_sub(q.since);
        self.ctx
            .metrics
            .flow_wait(q.priority, flow::outcome_label(&admitted), waited);
        match admitted {
            Ok(ticket) => self.route(q.has_body, q.body_eos, Some(ticket)),
            Err(e) => {
                let status = e.kind.status();
                vec![self.refuse(e, status)]
            }
        }
    }

    /// Schedule, then answer. `admitted`: the flow-control ticket of a request released
    /// from the queue; `None` asks for admission first.
    fn route(
        &mut self,
        has_body: bool,
        body_eos: bool,
        admitted: Option<Ticket>,
    ) -> Vec<ProcessingResponse> {
        let ctx = self.ctx.clone();
        let t0 = (ctx.clock)();
        let body = std::mem::take(&mut self.req.body);
        let input = RequestInput {
            path: &self.req.path,
            body: has_body.then_some(body.as_slice()),
            objective: self.req.objective.as_deref(),
            test_selection: self.req.test_selection.as_deref(),
            subset: self.req.subset.take(),
        };
        let prepared = match ctx.director.prepare(&input) {
            Ok(p) => p,
            Err(e) => {
                let status = e.kind.status();
                return vec![self.refuse(e, status)];
            }
        };
        let priority = prepared.priority();
        let _ticket = match admitted {
            Some(t) => t,
            None => match ctx.director.admit(priority, body.len() as u64, t0) {
                Admission::Now(t) => t,
                Admission::Refused(e) => {
                    // Only flow control refuses here.
                    ctx.metrics.flow_wait(priority, "rejected", Duration::ZERO);
                    let status = e.kind.status();
                    return vec![self.refuse(e, status)];
                }
                Admission::Wait(waiter) => {
                    drop(prepared);
                    let RequestInput { subset, .. } = input;
                    self.req.subset = subset;
                    self.req.body = body;
                    self.queued = Some(Queued {
                        has_body,
                        body_eos,
                        priority,
                        since: t0,
                        waiter: Some(waiter),
                    });
                    return vec![];
                }
            },
        };
        let result = ctx.director.pick(prepared, &input, t0, &mut self.rng);
        let t1 = (ctx.clock)();
        ctx.metrics
            .scheduler_e2e_duration_seconds
            .observe(t1.saturating_sub(t0).as_secs_f64());
        let decision = match result {
            Ok(d) => d,
            Err(e) => {
                let status = e.kind.status();
                return vec![self.refuse(e, status)];
            }
        };
        self.decided_at = t1;
        let labels = ctx
            .metrics
            .model_labels(&decision.model, &decision.target_model);
        ctx.metrics
            .request_total
            .get_or_create(&RequestLabels {
                model_name: labels.model_name.clone(),
                target_model_name: labels.target_model_name.clone(),
                priority: decision.priority.to_string(),
            })
            .inc();
        ctx.metrics
            .request_sizes
            .get_or_create(&labels)
            .observe(body.len() as f64);
        ctx.metrics
            .running_requests
            .get_or_create(&RunningLabels {
                model_name: labels.model_name.clone(),
            })
            .inc();
        self.labels = Some(labels);

        let dest = decision
            .endpoints
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let new_body: &[u8] = decision.rewritten_body.as_deref().unwrap_or(&body);
        let mut set_headers = vec![set_header(DESTINATION_KEY, &dest)];
        if has_body {
            // Envoy drops the length when a processor streams the body; restore it (with the
            // new size if the model was rewritten) so servers see what the client sent.
            set_headers.push(set_header("content-length", &new_body.len().to_string()));
        }
        let header_mutation = Some(HeaderMutation {
            set_headers,
            remove_headers: vec![SERVED_KEY.to_string()],
        });
        let metadata = Some(lb_metadata(&dest));
        let mut out = Vec::new();
        let buffered = self.request_mode.is_buffered();
        if has_body && buffered {
            let body_mutation = decision.rewritten_body.as_ref().map(|b| BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(b.clone())),
            });
            out.push(ProcessingResponse {
                dynamic_metadata: metadata,
                response: Some(Response::RequestBody(BodyResponse {
                    response: Some(CommonResponse {
                        header_mutation,
                        body_mutation,
                        clear_route_cache: true,
                        ..Default::default()
                    }),
                })),
                ..Default::default()
            });
        } else {
            out.push(ProcessingResponse {
                dynamic_metadata: metadata,
                response: Some(Response::RequestHeaders(HeadersResponse {
                    response: Some(CommonResponse {
                        header_mutation,
                        clear_route_cache: true,
                        ..Default::default()
                    }),
                })),
                ..Default::default()
            });
            if has_body {
                push_streamed_body(&mut out, new_body, body_eos, true);
            }
        }
        self.decision = Some(decision);
        out
    }

    fn refuse(&mut self, e: PickError, status: u16) -> ProcessingResponse {
        let labels = ErrorLabels {
            model_name: String::new(),
            target_model_name: String::new(),
            error_code: e.kind.code().to_string(),
        };
        self.ctx
            .metrics
            .request_error_total
            .get_or_create(&labels)
            .inc();
        tracing::debug!(status, error = %e.message, "request refused");
        let body = serde_json::json!({
            "error": { "message": e.message, "type": e.kind.code(), "code": status }
        });
        ProcessingResponse {
            response: Some(Response::ImmediateResponse(ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: Some(HeaderMutation {
                    set_headers: vec![set_header("content-type", "application/json")],
                    remove_headers: vec![],
                }),
                body: body.to_string().into_bytes(),
                details: format!("infergate_{}", e.kind.code()),
                grpc_status: None,
            })),
            ..Default::default()
        }
    }

    fn on_response_headers(
        &mut self,
        h: HttpHeaders,
        msg: &ProcessingRequest,
    ) -> Vec<ProcessingResponse> {
        let mut status = 200u16;
        for hv in h.headers.iter().flat_map(|m| m.headers.iter()) {
            match hv.key.as_str() {
                ":status" => status = header_value(hv).parse().unwrap_or(0),
                "content-type" => self.resp.sse = header_value(hv).contains("text/event-stream"),
                _ => {}
            }
        }
        self.resp.started = true;
        self.resp.status = status;
        let mut set_headers = Vec::new();
        let mut remove_headers = Vec::new();
        if let Some(d) = self.decision.as_mut() {
            // The gateway may have served from a fallback: move the in-flight count there.
            if let Some(served) = served_endpoint(msg) {
                if let Some(ep) = self.ctx.director.datastore().snapshot().endpoint(served) {
                    d.inflight.move_to(ep.clone());
                }
            }
            if self.ctx.options.conformance_headers {
                let served =
                    served_endpoint(msg).unwrap_or_else(|| d.inflight.endpoint().spec.addr);
                set_headers.push(set_header(CONFORMANCE_SERVED_HEADER, &served.to_string()));
            }
            if d.target_model != d.model {
                // The body is rewritten on the way back, so its length may change.
                remove_headers.push("content-length".to_string());
            }
        }
        if status >= 400 {
            let labels = self.labels.clone().unwrap_or(ModelLabels {
                model_name: String::new(),
                target_model_name: String::new(),
            });
            self.ctx
                .metrics
                .request_error_total
                .get_or_create(&ErrorLabels {
                    model_name: labels.model_name,
                    target_model_name: labels.target_model_name,
                    error_code: format!("ModelServerError{status}"),
                })
                .inc();
        }
        let mutation =
            (!set_headers.is_empty() || !remove_headers.is_empty()).then_some(HeaderMutation {
                set_headers,
                remove_headers,
            });
        let out = vec![reply(Response::ResponseHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: mutation,
                ..Default::default()
            }),
        }))];
        if h.end_of_stream {
            self.finish();
        }
        out
    }

    fn on_response_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        let now = (self.ctx.clock)();
        let HttpBody {
            body,
            end_of_stream: eos,
            ..
        } = b;
        if self.resp.first_byte_at.is_none() && !body.is_empty() {
            self.resp.first_byte_at = Some(now);
            // A stream's first bytes carry its first token: the prefill is done, and the
            // picker learns the endpoint's speed from it (see core::latency).
            if self.resp.sse {
                if let Some(d) = self.decision.as_mut() {
                    d.inflight.first_token(now);
                }
            }
        }
        self.resp.bytes += body.len() as u64;
        if self.resp.sse {
            self.resp.sse_usage.feed(&body);
        }
        let rename = self
            .decision
            .as_ref()
            .filter(|d| d.target_model != d.model)
            .map(|d| (d.target_model.clone(), d.model.clone()));
        // What goes to the client for this message; `None` holds it back for now.
        let emit = match &rename {
            None => {
                if !self.resp.sse {
                    self.keep_for_usage(&body, false);
                }
                Some(body)
            }
            // Rewrite whole SSE lines only, so a name split across chunks is still found.
            Some((from, to)) if self.resp.sse => {
                self.resp.held.extend_from_slice(&body);
                let cut = if eos {
                    self.resp.held.len()
                } else {
                    self.resp
                        .held
                        .iter()
                        .rposition(|&c| c == b'\n')
                        .map_or(0, |p| p + 1)
                };
                let ready: Vec<u8> = self.resp.held.drain(..cut).collect();
                Some(map_model_back(&ready, from, to))
            }
            // JSON: hold the whole document, then map the name back in one go; past the cap,
            // flush what is held and map chunk by chunk (best effort).
            Some((from, to)) => {
                self.keep_for_usage(&body, true);
                if self.resp.buffer_overflow {
                    // `held` has whatever was kept before this chunk (once), then nothing.
                    let mut pending = std::mem::take(&mut self.resp.held);
                    pending.extend_from_slice(&body);
                    Some(map_model_back(&pending, from, to))
                } else if eos {
                    Some(map_model_back(&self.resp.buffered, from, to))
                } else {
                    None
                }
            }
        };
        let mut out = Vec::new();
        if self.response_mode == BodyMode::FullDuplex {
            // Nothing ready yet (an SSE line still incomplete) needs no message.
            if let Some(bytes) = emit.filter(|b| !b.is_empty() || eos) {
                push_streamed_body(&mut out, &bytes, eos, false);
            }
        } else {
            // One reply per message: unchanged when nothing is renamed, otherwise this
            // message's bytes are replaced by what is ready (possibly nothing yet).
            let mutation = rename.is_some().then(|| BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(emit.unwrap_or_default())),
            });
            out.push(reply(Response::ResponseBody(BodyResponse {
                response: Some(CommonResponse {
                    body_mutation: mutation,
                    ..Default::default()
                }),
            })));
        }
        if eos {
            self.finish();
        }
        out
    }

    /// Keep a non-streaming body for usage parsing (and rewriting) up to a cap. When the cap
    /// is passed, usage is given up; a rewriting exchange (`unsent`) gets what was kept back
    /// in `held` so it can still be sent.
    fn keep_for_usage(&mut self, chunk: &[u8], unsent: bool) {
        if self.resp.buffer_overflow {
            return;
        }
        if self.resp.buffered.len() + chunk.len() <= MAX_BUFFERED_RESPONSE {
            self.resp.buffered.extend_from_slice(chunk);
        } else {
            self.resp.buffer_overflow = true;
            let kept = std::mem::take(&mut self.resp.buffered);
            if unsent {
                self.resp.held = kept;
            }
        }
    }

    /// The response has ended: record usage and timings, release the in-flight count.
    fn finish(&mut self) {
        if self.resp.finished {
            return;
        }
        self.resp.finished = true;
        if self.resp.started {
            self.response_ended(self.resp.status < 500);
        }
        let Some(labels) = self.labels.clone() else {
            return;
        };
        let m = &self.ctx.metrics;
        let now = (self.ctx.clock)();
        let e2e = now.saturating_sub(self.decided_at).as_secs_f64();
        m.request_duration_seconds
            .get_or_create(&labels)
            .observe(e2e);
        m.response_sizes
            .get_or_create(&labels)
            .observe(self.resp.bytes as f64);
        if let Some(t) = self.resp.first_byte_at {
            m.request_ttft_seconds
                .get_or_create(&labels)
                .observe(t.saturating_sub(self.decided_at).as_secs_f64());
        }
        let usage: Option<Usage> = if self.resp.sse {
            self.resp.sse_usage.finish();
            self.resp.sse_usage.usage
        } else if !self.resp.buffer_overflow {
            usage::from_json(&self.resp.buffered)
        } else {
            None
        };
        if let Some(u) = usage {
            m.input_tokens
                .get_or_create(&labels)
                .observe(u.prompt_tokens as f64);
            m.output_tokens
                .get_or_create(&labels)
                .observe(u.completion_tokens as f64);
            m.prompt_cached_tokens
                .get_or_create(&labels)
                .observe(u.cached_tokens as f64);
            if u.completion_tokens > 0 {
                m.normalized_time_per_output_token_seconds
                    .get_or_create(&labels)
                    .observe(e2e / u.completion_tokens as f64);
            }
        }
        self.release();
    }

    /// Tell the serving endpoint how its response ended. A response cut off after its
    /// headers counts as broken; so, unavoidably, does one whose client went away, which
    /// ext_proc cannot tell apart. Only runs of broken responses make an endpoint avoided.
    fn response_ended(&self, complete: bool) {
        let Some(d) = &self.decision else { return };
        let ep = d.inflight.endpoint();
        if let Some(for_) = ep.response_ended(complete, (self.ctx.clock)()) {
            tracing::warn!(
                endpoint = %ep.spec.addr,
                avoided_for = ?for_,
                "{} responses in a row from this endpoint ended broken (cut off after their \
                 headers, or 5xx); sending requests elsewhere while other endpoints remain",
                infergate_core::endpoint::BROKEN_RESPONSES_TO_AVOID
            );
        }
    }

    fn release(&mut self) {
        if let (Some(labels), Some(_)) = (&self.labels, self.decision.take()) {
            self.ctx
                .metrics
                .running_requests
                .get_or_create(&RunningLabels {
                    model_name: labels.model_name.clone(),
                })
                .dec();
        }
    }

    /// The model the client asked for and the one served, once decided.
    pub fn decision(&self) -> Option<&Decision> {
        self.decision.as_ref()
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Stream reset, timeout or gateway gone: the request is over either way.
        if self.resp.started && !self.resp.finished {
            self.response_ended(false);
        }
        self.release();
    }
}

fn reply(r: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

fn header_value(hv: &HeaderValue) -> String {
    if hv.raw_value.is_empty() {
        hv.value.clone()
    } else {
        String::from_utf8_lossy(&hv.raw_value).into_owned()
    }
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn lb_metadata(dest: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_KEY.to_string(), string_value(dest))]
            .into_iter()
            .collect(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// Addresses in a metadata value: a list of strings or one comma-separated string.
fn addrs_in(v: &Value) -> Vec<Option<SocketAddr>> {
    let parse = |s: &str| -> Vec<Option<SocketAddr>> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().ok())
            .collect()
    };
    match &v.kind {
        Some(Kind::StringValue(s)) => parse(s),
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .flat_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => parse(s),
                _ => vec![None],
            })
            .collect(),
        _ => vec![None],
    }
}

/// The gateway's subset hint; `Some(empty)` when present but naming no usable endpoint.
fn subset_hint(msg: &ProcessingRequest) -> Option<Vec<SocketAddr>> {
    let v = msg
        .metadata_context
        .as_ref()?
        .filter_metadata
        .get(SUBSET_NAMESPACE)?
        .fields
        .get(SUBSET_KEY)?;
    Some(addrs_in(v).into_iter().flatten().collect())
}

/// The endpoint that served, from the protocol's metadata or Envoy's `upstream.address`.
fn served_endpoint(msg: &ProcessingRequest) -> Option<SocketAddr> {
    let from_md = msg
        .metadata_context
        .as_ref()
        .and_then(|m| m.filter_metadata.get(LB_NAMESPACE))
        .and_then(|s| s.fields.get(SERVED_KEY))
        .and_then(|v| addrs_in(v).into_iter().flatten().next());
    from_md.or_else(|| {
        msg.attributes.values().find_map(|s| {
            match s
                .fields
                .get("upstream.address")
                .and_then(|v| v.kind.as_ref())
            {
                Some(Kind::StringValue(a)) => a.parse().ok(),
                _ => None,
            }
        })
    })
}

/// Append the body as streamed chunks of at most [`MAX_CHUNK`] bytes (request path).
fn push_streamed_body(out: &mut Vec<ProcessingResponse>, body: &[u8], eos: bool, request: bool) {
    let mut chunks: Vec<&[u8]> = body.chunks(MAX_CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let last = i + 1 == n;
        let br = BodyResponse {
            response: Some(CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::StreamedResponse(
                        StreamedBodyResponse {
                            body: c.to_vec(),
                            end_of_stream: eos && last,
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            }),
        };
        out.push(reply(if request {
            Response::RequestBody(br)
        } else {
            Response::ResponseBody(br)
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_never_exceed_62000_bytes() {
        let mut out = Vec::new();
        push_streamed_body(&mut out, &vec![7u8; 130_001], true, true);
        assert_eq!(out.len(), 3);
        let sizes: Vec<(usize, bool)> = out
            .iter()
            .map(|r| match &r.response {
                Some(Response::RequestBody(BodyResponse { response: Some(c) })) => {
                    match &c.body_mutation {
                        Some(BodyMutation {
                            mutation: Some(body_mutation::Mutation::StreamedResponse(s)),
                        }) => (s.body.len(), s.end_of_stream),
                        _ => panic!("not streamed"),
                    }
                }
                _ => panic!("not a request body reply"),
            })
            .collect();
        assert_eq!(sizes, vec![(62_000, false), (62_000, false), (6_001, true)]);
    }
}
