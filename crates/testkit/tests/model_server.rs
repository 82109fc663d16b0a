//! The fake vLLM server on its own, without Envoy.

use std::time::Duration;

use infergate_testkit::{get, post_json, post_json_stream, FakeModelServer};

fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_look_like_vllm_prometheus_text() {
    let s = FakeModelServer::start("r1").await.unwrap();
    s.set_state(3, 7, 0.42);
    s.set_loras(&["sql-lora", "chat-lora"], &[], 4);
    s.set_num_gpu_blocks(1234);

    let (status, headers, body) = get(&s.url(), "/metrics").await.unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();

    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for line in text.lines() {
        // Every line is a comment or `name{labels} value`.
        assert!(
            line.starts_with("# HELP ") || line.starts_with("# TYPE ") || {
                let (series, value) = line.rsplit_once(' ').unwrap();
                series.starts_with("vllm:") && value.parse::<f64>().is_ok()
            },
            "odd line: {line}"
        );
    }
    assert_eq!(metric_value(&text, "vllm:num_requests_waiting"), Some(3.0));
    assert_eq!(metric_value(&text, "vllm:num_requests_running"), Some(7.0));
    assert_eq!(metric_value(&text, "vllm:kv_cache_usage_perc"), Some(0.42));
    assert!(text.contains(
        r#"vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,chat-lora",waiting_lora_adapters=""} "#
    ));
    let stamp = metric_value(&text, "vllm:lora_requests_info").unwrap();
    assert!(
        stamp > 1.7e9,
        "lora info value must be a unix timestamp, got {stamp}"
    );
    assert!(text.contains(r#"block_size="16""#) && text.contains(r#"num_gpu_blocks="1234""#));
}

#[tokio::test]
async fn metrics_can_be_garbage_or_fail() {
    let s = FakeModelServer::start("r1").await.unwrap();
    s.set_metrics_body(Some("this is not prometheus {{{"));
    s.set_metrics_status(503);

    let (status, _, body) = get(&s.url(), "/metrics").await.unwrap();

    assert_eq!(status, 503);
    assert_eq!(&body[..], b"this is not prometheus {{{");
    assert!(!s.metrics_text().contains("vllm:"));
}

#[tokio::test]
async fn completion_echoes_model_and_records_request() {
    let s = FakeModelServer::start("r1").await.unwrap();
    s.set_cached_tokens(2);
    let body =
        r#"{"model":"llama-3","prompt":"one two three four five six seven eight","max_tokens":3}"#;

    let (status, headers, reply) =
        post_json(&s.url(), "/v1/completions", &[("x-test", "yes")], body)
            .await
            .unwrap();
    let text = String::from_utf8(reply.to_vec()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();

    assert_eq!(status, 200);
    assert_eq!(headers["x-served-by"], "r1");
    assert!(text.contains(r#""model":"llama-3""#), "{text}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    assert_eq!(
        v["usage"]["total_tokens"].as_u64(),
        Some(v["usage"]["prompt_tokens"].as_u64().unwrap() + 3)
    );
    let recs = s.requests();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].path, "/v1/completions");
    assert_eq!(recs[0].body, body.as_bytes());
    assert_eq!(recs[0].header("x-test"), Some("yes"));
    assert_eq!(recs[0].model().as_deref(), Some("llama-3"));
    assert_eq!(s.count(), 1);
}

#[tokio::test]
async fn chat_completion_answers_with_message() {
    let s = FakeModelServer::start("r1").await.unwrap();
    let body = r#"{"model":"chat-m","messages":[{"role":"user","content":"hello"}]}"#;

    let (status, _, reply) = post_json(&s.url(), "/v1/chat/completions", &[], body)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();

    assert_eq!(status, 200);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "chat-m");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
}

#[tokio::test]
async fn streaming_arrives_in_several_chunks_with_usage_and_done() {
    let s = FakeModelServer::start("r1").await.unwrap();
    s.set_stream_interval(Duration::from_millis(20));
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":4,"stream_options":{"include_usage":true}}"#;

    let (status, headers, stream) = post_json_stream(&s.url(), "/v1/chat/completions", &[], body)
        .await
        .unwrap();
    let chunks = stream.collect_chunks().await.unwrap();

    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // 4 tokens + usage + [DONE], each flushed on its own.
    assert_eq!(chunks.len(), 6, "{chunks:?}");
    for c in &chunks[..5] {
        let line = std::str::from_utf8(c).unwrap();
        assert!(
            line.starts_with("data: {") && line.ends_with("\n\n"),
            "{line}"
        );
        assert!(line.contains(r#""model":"m""#), "{line}");
    }
    assert!(std::str::from_utf8(&chunks[4])
        .unwrap()
        .contains(r#""usage":{"#));
    assert_eq!(&chunks[5][..], b"data: [DONE]\n\n");
    assert_eq!(s.count(), 1);
    assert_eq!(s.in_flight(), 0);
}

#[tokio::test]
async fn streaming_without_include_usage_has_no_usage_chunk() {
    let s = FakeModelServer::start("r1").await.unwrap();
    let body = r#"{"model":"m","prompt":"hi","stream":true,"max_tokens":2}"#;

    let (_, _, stream) = post_json_stream(&s.url(), "/v1/completions", &[], body)
        .await
        .unwrap();
    let text = String::from_utf8(stream.concat().await.unwrap().to_vec()).unwrap();

    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    assert!(!text.contains("usage"));
}

#[tokio::test]
async fn delay_holds_requests_in_flight() {
    let s = FakeModelServer::start("r1").await.unwrap();
    s.set_delay(Duration::from_millis(300));
    let url = s.url();
    let burst: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                post_json(&url, "/v1/completions", &[], r#"{"model":"m"}"#).await
            })
        })
        .collect();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while s.in_flight() < 5 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.in_flight(), 5);
    assert_eq!(s.count(), 0);
    for b in burst {
        assert_eq!(b.await.unwrap().unwrap().0, 200);
    }
    assert_eq!(s.in_flight(), 0);
    assert_eq!(s.max_in_flight(), 5);
    assert_eq!(s.count(), 5);
}

#[tokio::test]
async fn error_status_is_answered_and_counted() {
    let s = FakeModelServer::start("r1").await.unwrap();
    s.set_status(429);

    let (status, headers, body) = post_json(&s.url(), "/v1/completions", &[], r#"{"model":"m"}"#)
        .await
        .unwrap();

    assert_eq!(status, 429);
    assert_eq!(headers["x-served-by"], "r1");
    assert!(String::from_utf8_lossy(&body).contains(r#""code":429"#));
    assert_eq!(s.count(), 1);
}

#[tokio::test]
async fn twenty_megabyte_body_is_recorded_exactly() {
    let s = FakeModelServer::start("r1").await.unwrap();
    // Every byte value, so that any mangling shows.
    let body: Vec<u8> = (0..20 * 1024 * 1024).map(|i| (i % 251) as u8).collect();

    let (status, _, _) = post_json(&s.url(), "/v1/completions", &[], body.clone())
        .await
        .unwrap();

    assert_eq!(status, 200);
    assert!(s.requests()[0].body == body, "recorded body differs");
}

#[tokio::test]
async fn stopped_server_refuses_connections() {
    let s = FakeModelServer::start("r1").await.unwrap();
    let addr = s.addr();
    s.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
