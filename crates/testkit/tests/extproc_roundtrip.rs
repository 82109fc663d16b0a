//! The generated Envoy config with a minimal picker in the loop: proves that a destination
//! chosen over ext_proc is honoured (route cache cleared, ORIGINAL_DST on the header), that
//! the `envoy.lb` metadata comes back on the response path, what `upstream.address` looks
//! like there, and that 20 MB bodies survive the full-duplex round trip.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_request, processing_response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest, ProcessingResponse,
    StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use infergate_testkit::{
    post_json, post_json_stream, BodyMode, Envoy, EnvoyConfig, FakeModelServer,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// What the test picker saw when Envoy sent it the response headers.
#[derive(Clone, Debug, Default)]
struct ResponseSeen {
    /// `attributes` flattened to `name -> string value`.
    attributes: HashMap<String, String>,
    /// `metadata_context.filter_metadata["envoy.lb"]` flattened the same way.
    lb_metadata: HashMap<String, String>,
    /// Bytes of request body the picker received.
    request_body_len: usize,
}

/// A picker that sends every request to one fixed endpoint, the GIE way.
#[derive(Clone)]
struct FixedPicker {
    destination: String,
    seen: Arc<Mutex<Vec<ResponseSeen>>>,
}

fn flatten(s: &Struct, out: &mut HashMap<String, String>) {
    for (k, v) in &s.fields {
        match &v.kind {
            Some(Kind::StringValue(text)) => {
                out.insert(k.clone(), text.clone());
            }
            Some(Kind::StructValue(inner)) => flatten(inner, out),
            Some(other) => {
                out.insert(k.clone(), format!("{other:?}"));
            }
            None => {}
        }
    }
}

fn mk_string(text: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(text.to_owned())),
    }
}

fn mk_reply(response: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

fn mk_streamed_body(chunk: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body: chunk,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    }
}

impl FixedPicker {
    fn destination_reply(&self) -> ProcessingResponse {
        let header = HeaderValueOption {
            header: Some(HeaderValue {
                key: "x-gateway-destination-endpoint".to_owned(),
                raw_value: self.destination.clone().into_bytes(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let lb = Struct {
            fields: [(
                "x-gateway-destination-endpoint".to_owned(),
                mk_string(&self.destination),
            )]
            .into(),
        };
        let metadata = Struct {
            fields: [(
                "envoy.lb".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(lb)),
                },
            )]
            .into(),
        };
        ProcessingResponse {
            dynamic_metadata: Some(metadata),
            ..mk_reply(processing_response::Response::RequestHeaders(
                HeadersResponse {
                    response: Some(CommonResponse {
                        header_mutation: Some(HeaderMutation {
                            set_headers: vec![header],
                            ..Default::default()
                        }),
                        clear_route_cache: true,
                        ..Default::default()
                    }),
                },
            ))
        }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for FixedPicker {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let picker = self.clone();
        tokio::spawn(async move {
            let mut body = Vec::new();
            while let Ok(Some(msg)) = inbound.message().await {
                use processing_request::Request as In;
                use processing_response::Response as Out;
                let replies = match msg.request {
                    Some(In::RequestHeaders(h)) if h.end_of_stream => {
                        vec![picker.destination_reply()]
                    }
                    Some(In::RequestHeaders(_)) => vec![], // answered at the body's end
                    Some(In::RequestBody(b)) => {
                        body.extend_from_slice(&b.body);
                        if !b.end_of_stream {
                            vec![]
                        } else {
                            let mut out = vec![picker.destination_reply()];
                            let chunks: Vec<&[u8]> = body.chunks(62_000).collect();
                            if chunks.is_empty() {
                                out.push(mk_reply(Out::RequestBody(mk_streamed_body(
                                    vec![],
                                    true,
                                ))));
                            }
                            for (i, c) in chunks.iter().enumerate() {
                                let last = i + 1 == chunks.len();
                                out.push(mk_reply(Out::RequestBody(mk_streamed_body(
                                    c.to_vec(),
                                    last,
                                ))));
                            }
                            out
                        }
                    }
                    Some(In::RequestTrailers(_)) => {
                        vec![mk_reply(Out::RequestTrailers(TrailersResponse::default()))]
                    }
                    Some(In::ResponseHeaders(_)) => {
                        let mut seen = ResponseSeen {
                            request_body_len: body.len(),
                            ..Default::default()
                        };
                        for s in msg.attributes.values() {
                            flatten(s, &mut seen.attributes);
                        }
                        if let Some(lb) = msg
                            .metadata_context
                            .as_ref()
                            .and_then(|m| m.filter_metadata.get("envoy.lb"))
                        {
                            flatten(lb, &mut seen.lb_metadata);
                        }
                        picker.seen.lock().unwrap().push(seen);
                        vec![mk_reply(Out::ResponseHeaders(HeadersResponse::default()))]
                    }
                    Some(In::ResponseBody(b)) => {
                        vec![mk_reply(Out::ResponseBody(mk_streamed_body(
                            b.body,
                            b.end_of_stream,
                        )))]
                    }
                    Some(In::ResponseTrailers(_)) => {
                        vec![mk_reply(Out::ResponseTrailers(TrailersResponse::default()))]
                    }
                    None => vec![],
                };
                for r in replies {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn mk_picker(destination: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<ResponseSeen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let picker = FixedPicker {
        destination: destination.to_string(),
        seen: seen.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                ExternalProcessorServer::new(picker).max_decoding_message_size(64 * 1024 * 1024),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, seen)
}

#[tokio::test]
async fn picked_endpoint_serves_and_metadata_returns_on_response_path() {
    let fallback = FakeModelServer::start("fallback").await.unwrap();
    let picked = FakeModelServer::start("picked").await.unwrap();
    let (picker, seen) = mk_picker(picked.addr()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(picker)
            .ext_proc_plaintext()
            .pool([fallback.addr()]),
    )
    .await
    .unwrap();

    let body = r#"{"model":"m","prompt":"hi"}"#;
    let (status, headers, reply) = post_json(&envoy.url(), "/v1/completions", &[], body)
        .await
        .unwrap();

    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    assert_eq!(headers["x-served-by"], "picked");
    assert_eq!(fallback.count(), 0);
    let rec = &picked.requests()[0];
    assert_eq!(rec.body, body.as_bytes());
    assert_eq!(
        rec.header("x-gateway-destination-endpoint"),
        Some(picked.addr().to_string().as_str())
    );
    let seen = seen.lock().unwrap()[0].clone();
    println!("response-path view: {seen:?}");
    assert_eq!(
        seen.lb_metadata.get("x-gateway-destination-endpoint"),
        Some(&picked.addr().to_string()),
        "envoy.lb metadata must be forwarded back to the picker"
    );
    assert_eq!(
        seen.attributes.get("upstream.address"),
        Some(&picked.addr().to_string()),
        "upstream.address attribute on the response path"
    );
}

#[tokio::test]
async fn twenty_megabyte_body_round_trips_in_full_duplex_mode() {
    let picked = FakeModelServer::start("picked").await.unwrap();
    let (picker, seen) = mk_picker(picked.addr()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(picker)
            .ext_proc_plaintext()
            .request_body_mode(BodyMode::FullDuplexStreamed),
    )
    .await
    .unwrap();

    let prompt = "abcdefghij".repeat(2_000_000);
    let body = format!(r#"{{"model":"big","prompt":"{prompt}"}}"#);
    let (status, _, reply) = post_json(&envoy.url(), "/v1/completions", &[], body.clone())
        .await
        .unwrap();

    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    assert_eq!(seen.lock().unwrap()[0].request_body_len, body.len());
    assert!(
        picked.requests()[0].body == body.as_bytes(),
        "body changed on the way"
    );
}

#[tokio::test]
async fn streamed_answer_passes_through_picker_in_chunks() {
    let picked = FakeModelServer::start("picked").await.unwrap();
    let (picker, _) = mk_picker(picked.addr()).await;
    let envoy = Envoy::start(EnvoyConfig::new().ext_proc(picker).ext_proc_plaintext())
        .await
        .unwrap();

    let body = r#"{"model":"m","prompt":"hi","stream":true,"max_tokens":4,"stream_options":{"include_usage":true}}"#;
    let (status, headers, stream) = post_json_stream(&envoy.url(), "/v1/completions", &[], body)
        .await
        .unwrap();
    let chunks = stream.collect_chunks().await.unwrap();

    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(chunks.len() > 1, "got {} chunk(s)", chunks.len());
    let all: Vec<u8> = chunks.concat();
    let text = String::from_utf8(all).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains(r#""usage":{"#), "{text}");
}
