//! The EPP protocol over a real gRPC stream (DESIGN.md 4.5).
//!
//! Each test starts the `Picker` service in-process on 127.0.0.1:0 and plays Envoy's part
//! with a tonic `ExternalProcessorClient`, message by message, asserting both the replies
//! and the silences the protocol requires. The pool, objectives and rewrites come from a
//! `Datastore` built by the `mk_*` helpers; no Envoy and no model server are involved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderMap, HeaderValue, Metadata,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_request::Request, processing_response::Response,
    CommonResponse, HttpBody, HttpHeaders, HttpTrailers, ImmediateResponse, ProcessingRequest,
    ProcessingResponse, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use infergate_core::objective::{Objective, Rewrite, RewriteRule, RewriteTarget};
use infergate_core::{
    Datastore, Director, EndpointMetrics, EndpointSpec, Engine, Policy, SchedulerConfig,
};
use infergate_extproc::service::Picker;
use infergate_extproc::{Context, Options};
use infergate_metrics::Metrics;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Server};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const DEST: &str = "x-gateway-destination-endpoint";
const SERVED: &str = "x-gateway-destination-endpoint-served";
const FULL_DUPLEX: i32 = 4;
const BUFFERED: i32 = 2;
/// The fixed time of the test clock; endpoint metrics are stamped with it so they are fresh.
const NOW: Duration = Duration::from_secs(100);
/// How long a "no reply" is waited for.
const SILENCE: Duration = Duration::from_millis(150);
const POOL: [&str; 3] = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A picker served on a loopback port, with the state the tests inspect.
struct Harness {
    ds: Datastore,
    metrics: Arc<Metrics>,
    client: ExternalProcessorClient<Channel>,
}

/// Envoy's side of one ext_proc stream.
struct Stream {
    tx: Option<mpsc::Sender<ProcessingRequest>>,
    rx: tonic::Streaming<ProcessingResponse>,
}

fn mk_addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn mk_datastore(pool: &[&str]) -> Datastore {
    let ds = Datastore::new();
    ds.set_endpoints(
        pool.iter()
            .map(|a| EndpointSpec::new(mk_addr(a), Engine::Vllm))
            .collect(),
    );
    for (i, e) in ds.snapshot().endpoints.iter().enumerate() {
        e.set_metrics(
            EndpointMetrics {
                waiting: 0,
                running: i as u32,
                kv_cache_usage: Some(0.1),
                ..Default::default()
            },
            NOW,
        );
    }
    ds.mark_synced();
    ds
}

async fn mk_harness_with(ds: Datastore, options: Options) -> Harness {
    let metrics = Arc::new(Metrics::new("test"));
    let director = Arc::new(Director::new(ds.clone(), SchedulerConfig::default()));
    let clock: Arc<dyn Fn() -> Duration + Send + Sync> = Arc::new(|| NOW);
    let ctx = Arc::new(Context::new(director, metrics.clone(), clock, options, 7));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(
        Server::builder()
            .add_service(Picker::new(ctx).into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to picker");
    Harness {
        ds,
        metrics,
        client,
    }
}

async fn mk_harness() -> Harness {
    mk_harness_with(mk_datastore(&POOL), Options::default()).await
}

impl Harness {
    async fn open(&self) -> Stream {
        let (tx, rx) = mpsc::channel(64);
        let rx = self
            .client
            .clone()
            .process(ReceiverStream::new(rx))
            .await
            .expect("open ext_proc stream")
            .into_inner();
        Stream { tx: Some(tx), rx }
    }

    fn inflight(&self, addr: SocketAddr) -> u64 {
        self.ds
            .snapshot()
            .endpoint(addr)
            .expect("endpoint in pool")
            .inflight_requests()
    }

    fn total_inflight(&self) -> u64 {
        self.ds
            .snapshot()
            .endpoints
            .iter()
            .map(|e| e.inflight_requests())
            .sum()
    }

    /// Sum of every series of `name` in the Prometheus text (0 when absent).
    fn metric_sum(&self, name: &str) -> f64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Stream {
    async fn send(&self, msg: ProcessingRequest) {
        self.tx
            .as_ref()
            .expect("stream still open")
            .send(msg)
            .await
            .expect("picker stream accepts messages");
    }

    async fn recv(&mut self) -> ProcessingResponse {
        timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a reply within 5 s")
            .expect("no gRPC error")
            .expect("stream not ended")
    }

    async fn assert_silent(&mut self, after: &str) {
        if let Ok(r) = timeout(SILENCE, self.rx.message()).await {
            panic!("expected no reply after {after}, got {r:?}");
        }
    }

    /// Replies up to and including the streamed body chunk that ends the stream.
    async fn recv_until_body_eos(&mut self) -> Vec<ProcessingResponse> {
        let mut out = Vec::new();
        loop {
            let r = self.recv().await;
            let end = streamed(&r).is_some_and(|(_, eos)| eos);
            out.push(r);
            if end {
                return out;
            }
        }
    }
}

fn mk_header(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value: String::new(),
        raw_value: value.as_bytes().to_vec(),
    }
}

fn mk_header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    HeaderMap {
        headers: pairs.iter().map(|(k, v)| mk_header(k, v)).collect(),
    }
}

fn protocol_config(request_mode: i32, response_mode: i32) -> ProtocolConfiguration {
    ProtocolConfiguration {
        request_body_mode: request_mode,
        response_body_mode: response_mode,
        send_body_without_waiting_for_header_response: false,
    }
}

/// Request headers of a POST to `path`, full-duplex mode, body to follow.
fn mk_headers(path: &str, extra: &[(&str, &str)]) -> ProcessingRequest {
    mk_headers_eos(path, extra, false, FULL_DUPLEX)
}

fn mk_headers_eos(
    path: &str,
    extra: &[(&str, &str)],
    end_of_stream: bool,
    mode: i32,
) -> ProcessingRequest {
    let mut pairs = vec![
        (":method", if end_of_stream { "GET" } else { "POST" }),
        (":path", path),
        (":authority", "gateway.test"),
        ("content-type", "application/json"),
    ];
    pairs.extend_from_slice(extra);
    ProcessingRequest {
        protocol_config: Some(protocol_config(mode, mode)),
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(mk_header_map(&pairs)),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn mk_body(bytes: &[u8], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestBody(HttpBody {
            body: bytes.to_vec(),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn mk_trailers() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestTrailers(HttpTrailers {
            trailers: Some(mk_header_map(&[("x-checksum", "abc")])),
        })),
        ..Default::default()
    }
}

fn mk_response_headers(content_type: &str) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::ResponseHeaders(HttpHeaders {
            headers: Some(mk_header_map(&[
                (":status", "200"),
                ("content-type", content_type),
            ])),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn mk_response_body(bytes: &[u8], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::ResponseBody(HttpBody {
            body: bytes.to_vec(),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn mk_string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// Attach the gateway's subset hint as a list of `ip:port` strings.
fn with_subset_hint(mut msg: ProcessingRequest, addrs: &[&str]) -> ProcessingRequest {
    let list = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: addrs.iter().map(|a| mk_string(a)).collect(),
        })),
    };
    let hint = Struct {
        fields: [("x-gateway-destination-endpoint-subset".to_string(), list)].into(),
    };
    msg.metadata_context = Some(Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_string(), hint)].into(),
        ..Default::default()
    });
    msg
}

/// Attach Envoy's `upstream.address` attribute, as on the response path.
fn with_upstream_address(mut msg: ProcessingRequest, addr: &str) -> ProcessingRequest {
    let attrs = Struct {
        fields: [("upstream.address".to_string(), mk_string(addr))].into(),
    };
    msg.attributes = HashMap::from([("envoy.filters.http.ext_proc".to_string(), attrs)]);
    msg
}

fn mk_completion(model: &str, prompt_len: usize) -> Vec<u8> {
    serde_json::json!({ "model": model, "prompt": "p".repeat(prompt_len), "max_tokens": 8 })
        .to_string()
        .into_bytes()
}

fn mk_rewrite_policy(from: &str, to: &str) -> Policy {
    Policy {
        rewrites: vec![Rewrite {
            source: "default/rewrite".to_string(),
            rules: vec![RewriteRule {
                matches: vec![from.to_string()],
                targets: vec![RewriteTarget {
                    model: to.to_string(),
                    weight: 1,
                }],
            }],
        }],
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Reading replies
// ---------------------------------------------------------------------------------------

fn request_headers_common(r: &ProcessingResponse) -> &CommonResponse {
    match &r.response {
        Some(Response::RequestHeaders(h)) => h.response.as_ref().expect("CommonResponse"),
        other => panic!("expected a RequestHeaders reply, got {other:?}"),
    }
}

fn request_body_common(r: &ProcessingResponse) -> &CommonResponse {
    match &r.response {
        Some(Response::RequestBody(b)) => b.response.as_ref().expect("CommonResponse"),
        other => panic!("expected a RequestBody reply, got {other:?}"),
    }
}

/// The streamed chunk of a request- or response-body reply.
fn streamed(r: &ProcessingResponse) -> Option<(&[u8], bool)> {
    let c = match &r.response {
        Some(Response::RequestBody(b)) | Some(Response::ResponseBody(b)) => b.response.as_ref()?,
        _ => return None,
    };
    match c.body_mutation.as_ref()?.mutation.as_ref()? {
        Mutation::StreamedResponse(s) => Some((&s.body, s.end_of_stream)),
        _ => None,
    }
}

fn set_header(c: &CommonResponse, key: &str) -> Option<String> {
    let m = c.header_mutation.as_ref()?;
    m.set_headers.iter().find_map(|o| {
        let h = o.header.as_ref()?;
        (h.key == key).then(|| {
            assert_eq!(
                o.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                "{key} must overwrite any client-supplied value"
            );
            String::from_utf8_lossy(&h.raw_value).into_owned()
        })
    })
}

fn removes_header(c: &CommonResponse, key: &str) -> bool {
    c.header_mutation
        .as_ref()
        .is_some_and(|m| m.remove_headers.iter().any(|h| h == key))
}

fn lb_destination(r: &ProcessingResponse) -> Option<String> {
    let md = r.dynamic_metadata.as_ref()?;
    let Some(Kind::StructValue(lb)) = md.fields.get("envoy.lb")?.kind.as_ref() else {
        return None;
    };
    match lb.fields.get(DEST)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Asserts a routing reply names one pool member in both header and metadata; returns it.
fn assert_routed(r: &ProcessingResponse, c: &CommonResponse) -> SocketAddr {
    let header = set_header(c, DEST).expect("destination header set");
    assert_eq!(
        lb_destination(r).as_deref(),
        Some(header.as_str()),
        "envoy.lb metadata must equal the header"
    );
    assert!(c.clear_route_cache, "route cache must be cleared");
    assert!(
        removes_header(c, SERVED),
        "client copies of {SERVED} must be removed"
    );
    let primary = header.split(',').next().unwrap_or_default();
    assert!(
        POOL.contains(&primary),
        "destination {header:?} is not a pool member"
    );
    mk_addr(primary)
}

fn immediate(r: &ProcessingResponse) -> (&ImmediateResponse, serde_json::Value) {
    match &r.response {
        Some(Response::ImmediateResponse(i)) => {
            let body = serde_json::from_slice(&i.body).expect("error body is JSON");
            (i, body)
        }
        other => panic!("expected an ImmediateResponse, got {other:?}"),
    }
}

/// Asserts an ImmediateResponse with `status` whose JSON message mentions `reason`.
fn assert_refused(r: &ProcessingResponse, status: i32, reason: &str) {
    let (i, body) = immediate(r);
    assert_eq!(i.status.as_ref().map(|s| s.code), Some(status), "{body}");
    assert_eq!(body["error"]["code"], status, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(reason),
        "error message {message:?} should mention {reason:?}"
    );
}

/// Concatenated streamed bodies, checking chunk sizes and that only the last ends the stream.
fn concat_streamed(replies: &[ProcessingResponse], want_last_eos: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, r) in replies.iter().enumerate() {
        let (bytes, eos) = streamed(r).unwrap_or_else(|| panic!("reply {i} not streamed: {r:?}"));
        assert!(bytes.len() <= 62_000, "chunk {i} is {} bytes", bytes.len());
        let last = i + 1 == replies.len();
        assert_eq!(eos, last && want_last_eos, "end_of_stream on chunk {i}");
        out.extend_from_slice(bytes);
    }
    out
}

/// Route a full-duplex request with `body` sent in one message; returns the destination
/// and the body the picker forwarded.
async fn route(s: &mut Stream, path: &str, body: &[u8]) -> (SocketAddr, Vec<u8>, CommonResponse) {
    s.send(mk_headers(path, &[])).await;
    s.send(mk_body(body, true)).await;
    let head = s.recv().await;
    let c = request_headers_common(&head).clone();
    let dest = assert_routed(&head, &c);
    let replies = s.recv_until_body_eos().await;
    (dest, concat_streamed(&replies, true), c)
}

/// Send response headers and chunks (the last with EOS); returns the streamed body.
async fn respond(s: &mut Stream, content_type: &str, chunks: &[&[u8]]) -> Vec<u8> {
    s.send(mk_response_headers(content_type)).await;
    let r = s.recv().await;
    assert!(
        matches!(r.response, Some(Response::ResponseHeaders(_))),
        "expected a ResponseHeaders reply, got {r:?}"
    );
    for (i, c) in chunks.iter().enumerate() {
        s.send(mk_response_body(c, i + 1 == chunks.len())).await;
    }
    let replies = s.recv_until_body_eos().await;
    concat_streamed(&replies, true)
}

// ---------------------------------------------------------------------------------------
// 1. Full duplex
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn full_duplex_routes_after_body_end_and_streams_body_back_in_chunks() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let body = mk_completion("m", 200_000);
    s.send(mk_headers(
        "/v1/completions",
        &[(DEST, "6.6.6.6:1"), (SERVED, "6.6.6.6:1")],
    ))
    .await;
    s.assert_silent("request headers without EOS").await;

    let cuts = [0, 1, 1000, 71_000, 71_005, body.len()];
    for w in cuts.windows(2) {
        let last = w[1] == body.len();
        s.send(mk_body(&body[w[0]..w[1]], last)).await;
        if !last {
            s.assert_silent("a body chunk without EOS").await;
        }
    }

    let head = s.recv().await;
    let c = request_headers_common(&head);
    let dest = assert_routed(&head, c);
    assert_eq!(
        set_header(c, DEST).as_deref(),
        Some(dest.to_string().as_str())
    );
    assert_eq!(
        set_header(c, "content-length"),
        Some(body.len().to_string())
    );
    assert!(c.body_mutation.is_none());

    let replies = s.recv_until_body_eos().await;
    assert!(replies
        .iter()
        .all(|r| matches!(r.response, Some(Response::RequestBody(_)))));
    assert_eq!(replies.len(), body.len().div_ceil(62_000));
    assert!(
        concat_streamed(&replies, true) == body,
        "forwarded body differs from the sent body"
    );
    s.assert_silent("the last body chunk").await;
}

// ---------------------------------------------------------------------------------------
// 2. Buffered
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn buffered_mode_passes_headers_then_routes_from_the_body_reply() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    s.send(mk_headers_eos("/v1/completions", &[], false, BUFFERED))
        .await;
    let r = s.recv().await;
    let c = request_headers_common(&r);
    assert_eq!(c, &CommonResponse::default(), "headers reply must be empty");
    assert!(r.dynamic_metadata.is_none());

    let body = mk_completion("m", 500);
    s.send(mk_body(&body, true)).await;
    let r = s.recv().await;
    let c = request_body_common(&r);
    assert_routed(&r, c);
    assert_eq!(
        set_header(c, "content-length"),
        Some(body.len().to_string())
    );
    assert!(
        c.body_mutation.is_none(),
        "body must not be mutated when the model is not rewritten"
    );
    s.assert_silent("the buffered body reply").await;
}

#[tokio::test]
async fn buffered_body_followed_by_trailers_gets_its_own_body_reply() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    s.send(mk_headers_eos("/v1/completions", &[], false, BUFFERED))
        .await;
    request_headers_common(&s.recv().await);
    s.send(mk_body(&mk_completion("m", 100), false)).await;
    let r = s.recv().await;
    let c = request_body_common(&r);
    assert_routed(&r, c);
    s.send(mk_trailers()).await;
    let r = s.recv().await;
    assert!(
        matches!(r.response, Some(Response::RequestTrailers(_))),
        "{r:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. No body
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn headers_with_end_of_stream_are_routed_at_once() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    s.send(mk_headers_eos("/v1/models", &[], true, FULL_DUPLEX))
        .await;
    let r = s.recv().await;
    let c = request_headers_common(&r);
    let dest = assert_routed(&r, c);
    assert_eq!(set_header(c, "content-length"), None);
    assert_eq!(h.inflight(dest), 1);
    s.assert_silent("the headers reply").await;
}

// ---------------------------------------------------------------------------------------
// 4. Errors
// ---------------------------------------------------------------------------------------

async fn refusal_for(h: &Harness, headers: ProcessingRequest, body: &[u8]) -> ProcessingResponse {
    let mut s = h.open().await;
    s.send(headers).await;
    s.send(mk_body(body, true)).await;
    let r = s.recv().await;
    s.assert_silent("an ImmediateResponse").await;
    r
}

#[tokio::test]
async fn malformed_json_gets_400() {
    let h = mk_harness().await;
    let r = refusal_for(&h, mk_headers("/v1/completions", &[]), b"{\"model\": ").await;
    assert_refused(&r, 400, "not valid JSON");
}

#[tokio::test]
async fn missing_model_gets_400() {
    let h = mk_harness().await;
    let r = refusal_for(
        &h,
        mk_headers("/v1/completions", &[]),
        br#"{"prompt":"hi"}"#,
    )
    .await;
    assert_refused(&r, 400, "no \"model\" field");
}

#[tokio::test]
async fn unknown_objective_gets_400_naming_it() {
    let h = mk_harness().await;
    h.ds.set_policy(Policy {
        objectives: vec![Objective {
            name: "gold".to_string(),
            priority: 10,
        }],
        ..Default::default()
    });
    let headers = mk_headers(
        "/v1/completions",
        &[("x-gateway-inference-objective", "platinum")],
    );
    let r = refusal_for(&h, headers, &mk_completion("m", 10)).await;
    assert_refused(&r, 400, "\"platinum\"");
    assert_refused(&r, 400, "known: gold");
}

#[tokio::test]
async fn empty_pool_gets_503() {
    let h = mk_harness_with(mk_datastore(&[]), Options::default()).await;
    let r = refusal_for(
        &h,
        mk_headers("/v1/completions", &[]),
        &mk_completion("m", 10),
    )
    .await;
    assert_refused(&r, 503, "no ready endpoints");
}

#[tokio::test]
async fn body_over_max_body_bytes_gets_413_without_waiting_for_its_end() {
    let options = Options {
        max_body_bytes: 1_000,
        ..Default::default()
    };
    let h = mk_harness_with(mk_datastore(&POOL), options).await;
    let mut s = h.open().await;
    let body = mk_completion("m", 1_500);
    s.send(mk_headers("/v1/completions", &[])).await;
    s.send(mk_body(&body[..600], false)).await;
    s.assert_silent("a chunk under the limit").await;
    s.send(mk_body(&body[600..1_200], false)).await;
    let r = s.recv().await;
    assert_refused(&r, 413, "limit of 1000 bytes");
    s.send(mk_body(&body[1_200..], true)).await;
    s.assert_silent("the rest of a refused body").await;
    assert_eq!(h.total_inflight(), 0);
}

#[tokio::test]
async fn subset_hint_naming_no_pool_member_gets_503() {
    let h = mk_harness().await;
    let headers = with_subset_hint(
        mk_headers("/v1/completions", &[]),
        &["10.9.9.9:8000", "10.0.0.1:9999"],
    );
    let r = refusal_for(&h, headers, &mk_completion("m", 10)).await;
    assert_refused(&r, 503, "subset hint");
}

#[tokio::test]
async fn empty_subset_hint_gets_503() {
    let h = mk_harness().await;
    let headers = with_subset_hint(mk_headers("/v1/completions", &[]), &[]);
    let r = refusal_for(&h, headers, &mk_completion("m", 10)).await;
    assert_refused(&r, 503, "subset hint");
}

#[tokio::test]
async fn subset_hint_naming_one_member_always_picks_it() {
    let h = mk_harness().await;
    // The least loaded endpoint is 10.0.0.1 (running 0); hint the busiest so the pick
    // cannot coincide with what load alone would choose.
    let wanted = POOL[2];
    for i in 0..20 {
        let mut s = h.open().await;
        let headers = with_subset_hint(
            mk_headers("/v1/completions", &[]),
            &[wanted, "10.9.9.9:8000"],
        );
        s.send(headers).await;
        s.send(mk_body(&mk_completion("m", 10), true)).await;
        let r = s.recv().await;
        let dest = assert_routed(&r, request_headers_common(&r));
        assert_eq!(dest, mk_addr(wanted), "try {i}");
    }
}

// ---------------------------------------------------------------------------------------
// 5. Model rewrite
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn rewritten_model_is_sent_upstream_and_mapped_back_in_json_response() {
    let h = mk_harness().await;
    h.ds.set_policy(mk_rewrite_policy("public", "served-v2"));
    let mut s = h.open().await;
    let body = mk_completion("public", 300);
    let (_, forwarded, c) = route(&mut s, "/v1/completions", &body).await;
    let json: serde_json::Value = serde_json::from_slice(&forwarded).expect("forwarded JSON");
    assert_eq!(json["model"], "served-v2");
    assert_eq!(json["prompt"], "p".repeat(300));
    assert_eq!(
        set_header(&c, "content-length"),
        Some(forwarded.len().to_string())
    );
    assert_ne!(forwarded.len(), body.len());

    let resp = br#"{"id":"cmpl-1","object":"text_completion","model":"served-v2","choices":[{"text":"hi"}]}"#;
    let cut = find(resp, b"served-v2") + 4; // inside the name
    s.send(mk_response_headers("application/json")).await;
    let r = s.recv().await;
    match &r.response {
        Some(Response::ResponseHeaders(hr)) => {
            let c = hr.response.as_ref().expect("CommonResponse");
            assert!(
                removes_header(c, "content-length"),
                "a response whose body is rewritten must drop its content-length"
            );
        }
        other => panic!("expected ResponseHeaders reply, got {other:?}"),
    }
    s.send(mk_response_body(&resp[..cut], false)).await;
    s.send(mk_response_body(&resp[cut..], true)).await;
    let back = concat_streamed(&s.recv_until_body_eos().await, true);
    let want = String::from_utf8_lossy(resp).replace("served-v2", "public");
    assert_eq!(String::from_utf8_lossy(&back), want);
}

#[tokio::test]
async fn rewritten_model_is_mapped_back_in_sse_split_mid_line() {
    let h = mk_harness().await;
    h.ds.set_policy(mk_rewrite_policy("public", "served-v2"));
    let sse: &[u8] =
        b"data: {\"id\":\"1\",\"model\":\"served-v2\",\"choices\":[{\"text\":\"a\"}]}\n\n\
data: {\"id\":\"1\",\"model\":\"served-v2\",\"choices\":[{\"text\":\"b\"}]}\n\n\
data: [DONE]\n\n";
    let want = String::from_utf8_lossy(sse).replace("served-v2", "public");
    let first = find(sse, b"served-v2");
    let second = first + 20 + find(&sse[first + 20..], b"served-v2");
    let cut_sets: [Vec<usize>; 4] = [
        vec![first + 3],
        vec![first + 3, second + 5],
        vec![10, first + 1, 70, second + 8, sse.len() - 3],
        (1..sse.len()).step_by(7).collect(),
    ];
    for cuts in cut_sets {
        let mut s = h.open().await;
        route(&mut s, "/v1/completions", &mk_completion("public", 20)).await;
        let mut bounds = vec![0];
        bounds.extend(&cuts);
        bounds.push(sse.len());
        let chunks: Vec<&[u8]> = bounds.windows(2).map(|w| &sse[w[0]..w[1]]).collect();
        let back = respond(&mut s, "text/event-stream", &chunks).await;
        assert_eq!(String::from_utf8_lossy(&back), want, "cuts {cuts:?}");
    }
}

#[tokio::test]
async fn rewritten_json_response_over_16_mib_loses_no_bytes() {
    let h = mk_harness().await;
    h.ds.set_policy(mk_rewrite_policy("public", "served-v2"));
    let mut s = h.open().await;
    route(&mut s, "/v1/completions", &mk_completion("public", 20)).await;
    let pad = 16 << 20;
    let resp = format!(r#"{{"model":"served-v2","pad":"{}"}}"#, "x".repeat(pad)).into_bytes();
    let chunks: Vec<&[u8]> = resp.chunks(4 << 20).collect();
    assert!(chunks.len() > 4, "the body must overflow 16 MiB");
    let back = respond(&mut s, "application/json", &chunks).await;
    let xs = back.iter().filter(|&&b| b == b'x').count();
    assert_eq!(
        xs,
        pad,
        "response bytes were lost ({} of {})",
        back.len(),
        resp.len()
    );
}

/// What a non-streamed body reply makes of `chunk`: its replacement, or the chunk itself.
fn replaced_body(r: &ProcessingResponse, chunk: &[u8]) -> Vec<u8> {
    let c = match &r.response {
        Some(Response::RequestBody(b)) | Some(Response::ResponseBody(b)) => b.response.as_ref(),
        other => panic!("expected a body reply, got {other:?}"),
    };
    match c
        .and_then(|c| c.body_mutation.as_ref())
        .and_then(|m| m.mutation.as_ref())
    {
        Some(Mutation::Body(b)) => b.clone(),
        None => chunk.to_vec(),
        Some(other) => panic!("expected a whole-chunk mutation, got {other:?}"),
    }
}

#[tokio::test]
async fn streamed_response_mode_with_rewrite_does_not_repeat_earlier_chunks() {
    let h = mk_harness().await;
    h.ds.set_policy(mk_rewrite_policy("public", "served-v2"));
    let mut s = h.open().await;
    let mut headers = mk_headers("/v1/completions", &[]);
    headers.protocol_config = Some(protocol_config(FULL_DUPLEX, 1));
    s.send(headers).await;
    s.send(mk_body(&mk_completion("public", 20), true)).await;
    request_headers_common(&s.recv().await);
    s.recv_until_body_eos().await;

    let resp = br#"{"id":"1","model":"served-v2","choices":[{"text":"hello"}]}"#;
    s.send(mk_response_headers("application/json")).await;
    s.recv().await;
    let mut back = Vec::new();
    for (i, chunk) in resp.chunks(20).enumerate() {
        let eos = (i + 1) * 20 >= resp.len();
        s.send(mk_response_body(chunk, eos)).await;
        back.extend(replaced_body(&s.recv().await, chunk));
    }
    let want = String::from_utf8_lossy(resp).replace("served-v2", "public");
    assert_eq!(String::from_utf8_lossy(&back), want);
}

#[tokio::test]
async fn streamed_request_mode_is_refused_with_500_naming_the_supported_modes() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    s.send(mk_headers_eos("/v1/completions", &[], false, 1))
        .await;
    assert_refused(&s.recv().await, 500, "FULL_DUPLEX_STREAMED");
    s.send(mk_body(&mk_completion("m", 100), true)).await;
    s.assert_silent("a body after the refusal").await;
    assert_eq!(h.total_inflight(), 0);
}

#[tokio::test]
async fn body_mode_none_routes_on_the_headers() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    s.send(mk_headers_eos("/v1/completions", &[], false, 0))
        .await;
    let r = s.recv().await;
    let dest = assert_routed(&r, request_headers_common(&r));
    assert_eq!(h.inflight(dest), 1);
    s.assert_silent("the headers reply").await;
}

// ---------------------------------------------------------------------------------------
// 6. In-flight accounting
// ---------------------------------------------------------------------------------------

async fn wait_for_inflight(h: &Harness, addr: SocketAddr, want: u64) {
    for _ in 0..200 {
        if h.inflight(addr) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "in-flight on {addr} stayed {} instead of {want} for 2 s",
        h.inflight(addr)
    );
}

#[tokio::test]
async fn inflight_count_is_held_until_response_end() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let (dest, _, _) = route(&mut s, "/v1/completions", &mk_completion("m", 40)).await;
    assert_eq!(h.inflight(dest), 1);
    assert_eq!(h.total_inflight(), 1);

    s.send(mk_response_headers("application/json")).await;
    s.recv().await;
    s.send(mk_response_body(b"{\"choices\":[", false)).await;
    s.recv().await;
    assert_eq!(h.inflight(dest), 1, "still in flight mid-response");
    s.send(mk_response_body(b"]}", true)).await;
    s.recv_until_body_eos().await;
    assert_eq!(h.inflight(dest), 0, "released at response end");
}

#[tokio::test]
async fn inflight_count_is_released_when_the_stream_is_dropped_mid_response() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let (dest, _, _) = route(&mut s, "/v1/completions", &mk_completion("m", 40)).await;
    s.send(mk_response_headers("text/event-stream")).await;
    s.recv().await;
    s.send(mk_response_body(b"data: {\"choices\":[]}\n\n", false))
        .await;
    s.recv().await;
    assert_eq!(h.inflight(dest), 1);
    drop(s);
    wait_for_inflight(&h, dest, 0).await;
}

#[tokio::test]
async fn inflight_count_is_released_when_envoy_half_closes_mid_response() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let (dest, _, _) = route(&mut s, "/v1/completions", &mk_completion("m", 40)).await;
    s.send(mk_response_headers("application/json")).await;
    s.recv().await;
    assert_eq!(h.inflight(dest), 1);
    s.tx = None; // close Envoy's send side only; the reply stream stays open
    wait_for_inflight(&h, dest, 0).await;
    let end = timeout(Duration::from_secs(2), s.rx.message()).await;
    assert!(
        matches!(end, Ok(Ok(None))),
        "picker should end its reply stream, got {end:?}"
    );
}

#[tokio::test]
async fn served_endpoint_from_upstream_address_moves_the_inflight_count() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let (dest, _, _) = route(&mut s, "/v1/completions", &mk_completion("m", 40)).await;
    let other = POOL
        .iter()
        .map(|a| mk_addr(a))
        .find(|a| *a != dest)
        .expect("another member");
    s.send(with_upstream_address(
        mk_response_headers("application/json"),
        &other.to_string(),
    ))
    .await;
    s.recv().await;
    assert_eq!(h.inflight(dest), 0, "count left the picked endpoint");
    assert_eq!(h.inflight(other), 1, "count moved to the served endpoint");
    s.send(mk_response_body(b"{}", true)).await;
    s.recv_until_body_eos().await;
    assert_eq!(h.total_inflight(), 0);
}

#[tokio::test]
async fn served_endpoint_from_envoy_lb_metadata_moves_the_inflight_count() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let (dest, _, _) = route(&mut s, "/v1/completions", &mk_completion("m", 40)).await;
    let other = POOL
        .iter()
        .map(|a| mk_addr(a))
        .find(|a| *a != dest)
        .expect("another member");
    let mut msg = mk_response_headers("application/json");
    msg.metadata_context = Some(Metadata {
        filter_metadata: [(
            "envoy.lb".to_string(),
            Struct {
                fields: [(SERVED.to_string(), mk_string(&other.to_string()))].into(),
            },
        )]
        .into(),
        ..Default::default()
    });
    s.send(msg).await;
    s.recv().await;
    assert_eq!(h.inflight(dest), 0);
    assert_eq!(h.inflight(other), 1);
}

#[tokio::test]
async fn idle_stream_is_dropped_and_releases_its_inflight_count() {
    let options = Options {
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let h = mk_harness_with(mk_datastore(&POOL), options).await;
    let mut s = h.open().await;
    let (dest, _, _) = route(&mut s, "/v1/completions", &mk_completion("m", 40)).await;
    assert_eq!(h.inflight(dest), 1);
    wait_for_inflight(&h, dest, 0).await;
    let end = timeout(Duration::from_secs(2), s.rx.message()).await;
    assert!(
        matches!(end, Ok(Ok(None))),
        "picker should end an idle stream, got {end:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Usage
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn usage_from_json_and_sse_responses_is_counted() {
    let h = mk_harness().await;
    let input = "inference_objective_input_tokens_sum";
    let output = "inference_objective_output_tokens_sum";
    let cached = "inference_objective_prompt_cached_tokens_sum";
    assert_eq!(h.metric_sum(input), 0.0);

    let mut s = h.open().await;
    route(&mut s, "/v1/completions", &mk_completion("m", 40)).await;
    let json = br#"{"id":"x","model":"m","choices":[{"text":"ok"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":4}}}"#;
    let back = respond(&mut s, "application/json", &[&json[..40], &json[40..]]).await;
    assert_eq!(back, json.to_vec());
    assert_eq!(h.metric_sum(input), 12.0);
    assert_eq!(h.metric_sum(output), 5.0);
    assert_eq!(h.metric_sum(cached), 4.0);

    let mut s = h.open().await;
    route(&mut s, "/v1/chat/completions", br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#).await;
    let sse: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n\
data: [DONE]\n\n";
    let cut = find(sse, b"completion_tokens");
    let back = respond(
        &mut s,
        "text/event-stream; charset=utf-8",
        &[&sse[..cut], &sse[cut..]],
    )
    .await;
    assert_eq!(back, sse.to_vec());
    assert_eq!(h.metric_sum(input), 19.0);
    assert_eq!(h.metric_sum(output), 8.0);
}

// ---------------------------------------------------------------------------------------
// 8. Trailers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn request_trailers_end_the_body_and_are_answered_last() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let body = mk_completion("m", 100_000);
    s.send(mk_headers("/v1/completions", &[])).await;
    s.send(mk_body(&body[..30_000], false)).await;
    s.send(mk_body(&body[30_000..], false)).await;
    s.assert_silent("body chunks without EOS").await;
    s.send(mk_trailers()).await;

    let head = s.recv().await;
    assert_routed(&head, request_headers_common(&head));
    let mut chunks = Vec::new();
    loop {
        let r = s.recv().await;
        if matches!(r.response, Some(Response::RequestTrailers(_))) {
            break;
        }
        chunks.push(r);
    }
    assert_eq!(chunks.len(), body.len().div_ceil(62_000));
    assert!(
        concat_streamed(&chunks, false) == body,
        "forwarded body differs"
    );
    s.assert_silent("the trailers reply").await;
}

// ---------------------------------------------------------------------------------------
// 9. gRPC health
// ---------------------------------------------------------------------------------------

async fn health_status(client: &mut HealthClient<Channel>, name: &str) -> ServingStatus {
    let r = client
        .check(HealthCheckRequest {
            service: name.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("health check of {name:?} failed: {e}"))
        .into_inner();
    ServingStatus::try_from(r.status).expect("known status")
}

#[tokio::test]
async fn health_reports_liveness_readiness_and_extproc() {
    let (reporter, service) = infergate_extproc::service::health_service().await;
    infergate_extproc::service::set_health(&reporter, true).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("health uri")
        .connect()
        .await
        .expect("connect to health");
    let mut client = HealthClient::new(channel);
    for name in [
        "liveness",
        "readiness",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        assert_eq!(
            health_status(&mut client, name).await,
            ServingStatus::Serving,
            "{name}"
        );
    }

    infergate_extproc::service::set_health(&reporter, false).await;
    assert_eq!(
        health_status(&mut client, "liveness").await,
        ServingStatus::Serving
    );
    assert_eq!(
        health_status(&mut client, "readiness").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health_status(&mut client, "envoy.service.ext_proc.v3.ExternalProcessor").await,
        ServingStatus::NotServing
    );
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in test data")
}

#[tokio::test]
async fn buffered_partial_body_cut_by_the_gateway_gets_413_saying_why() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let mut headers = mk_headers("/v1/completions", &[]);
    headers.protocol_config = Some(protocol_config(3, FULL_DUPLEX));
    s.send(headers).await;
    s.recv().await; // headers pass at once, as in BUFFERED
    let body = mk_completion("m", 5_000);
    s.send(mk_body(&body[..2_000], false)).await;
    let r = s.recv().await;
    assert_refused(&r, 413, "BUFFERED_PARTIAL");
    assert_eq!(h.total_inflight(), 0);
}

#[tokio::test]
async fn a_streams_first_bytes_release_its_queued_prefill_and_teach_the_speed_model() {
    let h = mk_harness().await;
    let mut s = h.open().await;
    let (dest, _, _) = route(&mut s, "/v1/completions", &mk_completion("m", 400)).await;
    let ep = h.ds.snapshot().endpoint(dest).expect("endpoint").clone();
    let v = ep.latency().view(NOW);
    assert_eq!(v.prefill_requests, 1);
    assert!(v.prefill_tokens > 0);
    assert_eq!(v.line, None);
    s.send(mk_response_headers("text/event-stream")).await;
    s.recv().await;
    // Headers alone say nothing about the first token (vLLM sends them at once).
    assert_eq!(ep.latency().view(NOW).prefill_requests, 1);
    s.send(mk_response_body(b"data: {\"choices\":[]}\n\n", false))
        .await;
    s.recv().await;
    let v = ep.latency().view(NOW);
    assert_eq!((v.prefill_requests, v.prefill_tokens), (0, 0));
    assert!(v.line.is_some(), "the first token is a speed sample");
    assert_eq!(h.inflight(dest), 1, "still decoding");

    // An unstreamed answer keeps its prefill queued until it ends, and teaches nothing.
    let h = mk_harness().await;
    let mut s = h.open().await;
    let (dest, _, _) = route(&mut s, "/v1/completions", &mk_completion("m", 400)).await;
    let ep = h.ds.snapshot().endpoint(dest).expect("endpoint").clone();
    s.send(mk_response_headers("application/json")).await;
    s.recv().await;
    s.send(mk_response_body(b"{\"choices\":", false)).await;
    s.recv().await;
    assert_eq!(ep.latency().view(NOW).prefill_requests, 1);
    s.send(mk_response_body(b"[]}", true)).await;
    s.recv_until_body_eos().await;
    wait_for_inflight(&h, dest, 0).await;
    let v = ep.latency().view(NOW);
    assert_eq!((v.prefill_requests, v.line), (0, None));
}
