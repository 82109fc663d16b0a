//! What each fuzz target feeds to the code that faces the network, and what must hold
//! whatever the input. The cargo-fuzz targets in `fuzz/` are one-line wrappers around
//! these functions; `tests/replay.rs` runs every file of the committed corpora
//! (`fuzz/corpus/<target>/`) and of the crashes found and fixed
//! (`fuzz/regressions/<target>/`) through them as ordinary tests, so CI replays what the
//! fuzzers learnt without a nightly toolchain.
//!
//! Each function panics only when a promise is broken (that panic is the fuzzer's crash):
//! - `openai_body`: a parsed body's model span holds the model's JSON string, and splicing
//!   a new model name keeps the body parseable with the same prompt;
//! - `sse_usage`: the usage read from a stream does not depend on how it was chunked;
//! - `prometheus_text`: reading only some families gives the same samples as reading all
//!   and filtering; extraction for every engine returns (a value or an error);
//! - `pool_file`, `picker_config`: loading gives a value or an error, and a loaded value
//!   builds into the datastore's policy or a scheduler;
//! - `extproc`: any sequence of ext_proc messages gets well-formed replies (an immediate
//!   response carries a 4xx/5xx status), and once the exchange is gone no endpoint has a
//!   request or prefill token still counted in flight.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, processing_response::Response, HttpBody, HttpHeaders,
    HttpTrailers, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use infergate_core::objective::{Objective, Rewrite, RewriteRule, RewriteTarget};
use infergate_core::request::{parse_body, splice_model, ApiKind};
use infergate_core::usage::SseUsage;
use infergate_core::{
    Datastore, Director, EndpointMetrics, EndpointSpec, Engine, Policy, SchedulerConfig,
};
use infergate_extproc::protocol::{Exchange, SUBSET_KEY, SUBSET_NAMESPACE};
use infergate_extproc::{Context, Options};
use infergate_scrape::{engines, text};

/// A fuzz target: a name (its `fuzz/fuzz_targets/<name>.rs` and corpus folder) and the
/// function it calls.
pub type Target = (&'static str, fn(&[u8]));

/// The fuzz targets.
pub const TARGETS: [Target; 6] = [
    ("openai_body", openai_body),
    ("sse_usage", sse_usage),
    ("prometheus_text", prometheus_text),
    ("pool_file", pool_file),
    ("picker_config", picker_config),
    ("extproc", extproc),
];

const APIS: [ApiKind; 5] = [
    ApiKind::Completions,
    ApiKind::ChatCompletions,
    ApiKind::Responses,
    ApiKind::Conversations,
    ApiKind::Embeddings,
];

/// First byte: the API; the rest: the request body.
pub fn openai_body(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let api = APIS[usize::from(pick) % APIS.len()];
    let Ok(parsed) = parse_body(api, body) else {
        return;
    };
    let literal = &body[parsed.model_span.clone()];
    let named: String = serde_json::from_slice(literal).expect("the model span is a JSON string");
    assert_eq!(named, parsed.model, "the model span holds the model");
    let spliced = splice_model(body, parsed.model_span.clone(), "fuzz-target-\"model\"");
    let again = parse_body(api, &spliced).expect("a spliced body still parses");
    assert_eq!(again.model, "fuzz-target-\"model\"");
    assert_eq!(
        again.prompt_bytes, parsed.prompt_bytes,
        "the prompt is untouched"
    );
    assert_eq!(again.stream, parsed.stream);
}

/// First byte: the chunk size (1 to 256); the rest: an SSE response body.
pub fn sse_usage(data: &[u8]) {
    let Some((&size, stream)) = data.split_first() else {
        return;
    };
    let mut whole = SseUsage::default();
    whole.feed(stream);
    whole.finish();
    let mut chunked = SseUsage::default();
    for chunk in stream.chunks(usize::from(size) + 1) {
        chunked.feed(chunk);
    }
    chunked.finish();
    assert_eq!(
        whole.usage, chunked.usage,
        "usage must not depend on how the stream was chunked"
    );
    let _ = infergate_core::usage::from_json(stream);
}

const ENGINES: [Engine; 5] = [
    Engine::Vllm,
    Engine::Sglang,
    Engine::TrtllmServe,
    Engine::Triton,
    Engine::Llamacpp,
];

/// A `/metrics` page, as bytes.
pub fn prometheus_text(data: &[u8]) {
    let Ok(page) = std::str::from_utf8(data) else {
        return;
    };
    let all = text::parse(page);
    for engine in ENGINES {
        let some = text::parse_only(page, |name| engines::reads(engine, name));
        if let Ok(all) = &all {
            let some = some.expect("a page that parses whole parses in part");
            let filtered: Vec<_> = all
                .iter()
                .filter(|s| engines::reads(engine, s.name))
                .cloned()
                .collect();
            assert!(
                same_samples(&some, &filtered),
                "reading some families = reading all, filtered:\n{some:?}\n{filtered:?}"
            );
            let _ = engines::extract(engine, &some);
        }
    }
}

/// Equal samples, where a NaN value equals a NaN (pages may say `NaN`; it is not an error).
fn same_samples(a: &[text::Sample<'_>], b: &[text::Sample<'_>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.labels == y.labels
                && x.timestamp_ms == y.timestamp_ms
                && (x.value == y.value || (x.value.is_nan() && y.value.is_nan()))
        })
}

/// A pool file (YAML, several documents).
pub fn pool_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = infergate_api::pool_file::PoolFile::from_yaml_str(text, "fuzz.yaml") {
        let _ = infergate_core::build::endpoints(&file);
        let _ = infergate_core::build::policy(&file);
    }
}

/// An EndpointPickerConfig (YAML).
pub fn picker_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = infergate_api::config::EndpointPickerConfig::from_yaml_str(text, "fuzz.yaml") {
        let _ = infergate_core::build::scheduler_config(&cfg, Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------------------------------
// ext_proc message sequences

/// The endpoints of the fuzzed pool.
pub const POOL: [&str; 3] = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];

/// One shared picker (a new one per input would make the fuzzer slow); every exchange is
/// dropped before the input ends, so state that must return to zero can be checked.
fn context() -> &'static Arc<Context> {
    static CTX: OnceLock<Arc<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let ds = Datastore::new();
        ds.set_endpoints(
            POOL.iter()
                .map(|a| EndpointSpec::new(a.parse().expect("pool address"), Engine::Vllm))
                .collect(),
        );
        for (i, e) in ds.snapshot().endpoints.iter().enumerate() {
            let metrics = EndpointMetrics {
                waiting: i as u32,
                running: 1,
                kv_cache_usage: Some(0.2 * i as f64),
                ..Default::default()
            };
            e.set_metrics(metrics, Duration::from_secs(1));
        }
        ds.set_policy(Policy {
            objectives: vec![
                Objective {
                    name: "interactive".into(),
                    priority: 10,
                },
                Objective {
                    name: "batch".into(),
                    priority: -1,
                },
            ],
            rewrites: vec![Rewrite {
                source: "fuzz/rollout".into(),
                rules: vec![RewriteRule {
                    matches: vec!["chat".into()],
                    targets: vec![
                        RewriteTarget {
                            model: "chat-v1".into(),
                            weight: 3,
                        },
                        RewriteTarget {
                            model: "chat-v2".into(),
                            weight: 1,
                        },
                    ],
                }],
            }],
            model_priorities: Default::default(),
        });
        ds.mark_synced();
        let director = Arc::new(Director::new(ds, SchedulerConfig::default()));
        let metrics = Arc::new(infergate_metrics::Metrics::new("fuzz"));
        let options = Options {
            max_body_bytes: 64 << 10,
            ..Options::default()
        };
        Arc::new(Context::new(
            director,
            metrics,
            Arc::new(|| Duration::from_secs(1)),
            options,
            7,
        ))
    })
}

/// Reads the fuzzer's bytes as a sequence of small choices.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    /// A length byte, then that many bytes (a length of 255 reads a second byte and means
    /// up to 255 * 64 bytes, so large bodies are reachable).
    fn blob(&mut self) -> Vec<u8> {
        let n = match self.byte().unwrap_or(0) {
            255 => usize::from(self.byte().unwrap_or(0)) * 64,
            n => usize::from(n),
        };
        self.take(n).to_vec()
    }
}

const HEADER_KEYS: [&str; 12] = [
    ":path",
    ":method",
    ":authority",
    "content-type",
    "content-length",
    "x-request-id",
    "x-gateway-inference-objective",
    "x-gateway-model-name-rewrite",
    "x-gateway-destination-endpoint",
    "x-gateway-inference-fairness-id",
    "test-epp-endpoint-selection",
    ":status",
];

const PATHS: [&str; 6] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/conversations/x/items",
    "/",
];

const SUBSETS: [&[&str]; 5] = [
    &[],
    &["10.0.0.1:8000"],
    &["10.0.0.2:8000", "10.0.0.3:8000"],
    &["10.9.9.9:8000"],
    &["not an address", ""],
];

fn header_map(b: &mut Bytes<'_>) -> HeaderMap {
    let n = b.byte().unwrap_or(0) % 6;
    let mut headers = vec![HeaderValue {
        key: ":path".into(),
        raw_value: PATHS[usize::from(b.byte().unwrap_or(0)) % PATHS.len()].into(),
        ..Default::default()
    }];
    for _ in 0..n {
        let key = HEADER_KEYS[usize::from(b.byte().unwrap_or(0)) % HEADER_KEYS.len()];
        let value = b.blob();
        // Envoy sends either `value` or `raw_value`; both are exercised.
        let (value, raw_value) = if value.first().is_some_and(|v| v % 2 == 0) {
            (String::from_utf8_lossy(&value).into_owned(), Vec::new())
        } else {
            (String::new(), value)
        };
        headers.push(HeaderValue {
            key: key.into(),
            value,
            raw_value,
        });
    }
    HeaderMap { headers }
}

fn subset_metadata(choice: u8) -> Option<Metadata> {
    let addrs = SUBSETS.get(usize::from(choice))?;
    let list = ListValue {
        values: addrs
            .iter()
            .map(|a| Value {
                kind: Some(Kind::StringValue((*a).into())),
            })
            .collect(),
    };
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        SUBSET_KEY.to_string(),
        Value {
            kind: Some(Kind::ListValue(list)),
        },
    );
    let mut md = Metadata::default();
    md.filter_metadata
        .insert(SUBSET_NAMESPACE.to_string(), Struct { fields });
    Some(md)
}

/// One ext_proc message from the next bytes; `None` when the input is used up.
fn next_message(b: &mut Bytes<'_>) -> Option<ProcessingRequest> {
    let op = b.byte()?;
    let eos = op & 0x80 != 0;
    let mut msg = ProcessingRequest::default();
    msg.request = Some(match op & 0x07 {
        0 => {
            msg.metadata_context = subset_metadata(b.byte().unwrap_or(0) % 8);
            Request::RequestHeaders(HttpHeaders {
                headers: Some(header_map(b)),
                end_of_stream: eos,
                ..Default::default()
            })
        }
        1 => Request::RequestBody(HttpBody {
            body: b.blob(),
            end_of_stream: eos,
            ..Default::default()
        }),
        2 => Request::RequestTrailers(HttpTrailers::default()),
        3 => Request::ResponseHeaders(HttpHeaders {
            headers: Some(header_map(b)),
            end_of_stream: eos,
            ..Default::default()
        }),
        4 => Request::ResponseBody(HttpBody {
            body: b.blob(),
            end_of_stream: eos,
            ..Default::default()
        }),
        5 => Request::ResponseTrailers(HttpTrailers::default()),
        6 => {
            let modes = b.byte().unwrap_or(0);
            msg.protocol_config = Some(ProtocolConfiguration {
                request_body_mode: i32::from(modes & 0x07),
                response_body_mode: i32::from((modes >> 3) & 0x07),
                ..Default::default()
            });
            return Some(msg);
        }
        _ => return Some(msg),
    });
    Some(msg)
}

/// A sequence of ext_proc messages (see `next_message` for the encoding).
pub fn extproc(data: &[u8]) {
    extproc_replies(data);
}

/// [`extproc`], returning the picker's replies in order (for tests of the seeds).
pub fn extproc_replies(data: &[u8]) -> Vec<ProcessingResponse> {
    let ctx = context();
    let mut replies = Vec::new();
    {
        let mut exchange = Exchange::new(ctx.clone());
        let mut bytes = Bytes(data);
        while let Some(msg) = next_message(&mut bytes) {
            for reply in exchange.on_message(msg) {
                match &reply.response {
                    Some(Response::ImmediateResponse(r)) => {
                        let code = r.status.as_ref().map_or(0, |s| s.code);
                        assert!(
                            (400..600).contains(&code),
                            "an immediate response is an error status, got {code}"
                        );
                    }
                    Some(_) => {}
                    None => panic!("a reply without a response"),
                }
                replies.push(reply);
            }
        }
    }
    for e in &ctx.director.datastore().snapshot().endpoints {
        assert_eq!(
            e.inflight_requests(),
            0,
            "{} still counts a request",
            e.spec.addr
        );
        assert_eq!(
            e.inflight_tokens(),
            0,
            "{} still counts tokens",
            e.spec.addr
        );
    }
    replies
}

/// Encodes a message sequence in `extproc`'s input format, for seeds and tests.
pub mod encode {
    /// Request headers for `path_index` (into the path table) with `headers`, as
    /// (key index, value) pairs, and the subset choice (0..=4; 5 or more: no hint).
    pub fn request_headers(
        subset: u8,
        path_index: u8,
        headers: &[(u8, &[u8])],
        eos: bool,
    ) -> Vec<u8> {
        let mut out = vec![if eos { 0x80 } else { 0 }, subset];
        out.extend(header_list(path_index, headers));
        out
    }

    pub fn response_headers(headers: &[(u8, &[u8])], eos: bool) -> Vec<u8> {
        let mut out = vec![if eos { 0x83 } else { 3 }];
        out.extend(header_list(0, headers));
        out
    }

    fn header_list(path_index: u8, headers: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = vec![headers.len() as u8, path_index];
        for (k, v) in headers {
            out.push(*k);
            out.extend(blob(v));
        }
        out
    }

    pub fn request_body(body: &[u8], eos: bool) -> Vec<u8> {
        let mut out = vec![if eos { 0x81 } else { 1 }];
        out.extend(blob(body));
        out
    }

    pub fn response_body(body: &[u8], eos: bool) -> Vec<u8> {
        let mut out = vec![if eos { 0x84 } else { 4 }];
        out.extend(blob(body));
        out
    }

    /// Body modes (Envoy's numbers: 2 buffered, 4 full duplex) in a protocol_config.
    pub fn protocol_config(request: u8, response: u8) -> Vec<u8> {
        vec![6, (request & 7) | ((response & 7) << 3)]
    }

    fn blob(v: &[u8]) -> Vec<u8> {
        if v.len() < 255 {
            let mut out = vec![v.len() as u8];
            out.extend_from_slice(v);
            out
        } else {
            let units = v.len().div_ceil(64).min(255);
            let mut out = vec![255, units as u8];
            let mut padded = v.to_vec();
            padded.resize(units * 64, b' ');
            out.extend_from_slice(&padded);
            out
        }
    }
}
