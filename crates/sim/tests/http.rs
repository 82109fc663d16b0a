//! The simulator's HTTP front, served for real on 127.0.0.1 and driven like a client would:
//! the OpenAI API, vLLM's `/metrics` read back by the picker's own parser, LoRA adapters,
//! disconnects, and every injectable fault.

use std::time::{Duration, Instant};

use infergate_sim::engine::EosModel;
use infergate_sim::profile;
use infergate_sim::server::{Server, ServerConfig};
use infergate_testkit::{get, post_json, post_json_stream};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const MODEL: &str = "sim-model";

/// A replica of the 8B profile running 20x faster than real time, without jitter and with
/// answers exactly `max_tokens` long unless a test changes that.
async fn mk_server(tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut cfg = ServerConfig::for_profile(profile::by_name("llama3-8b-h100").unwrap());
    cfg.served_model_name = MODEL.into();
    cfg.time_scale = 20.0;
    cfg.engine.jitter = 0.0;
    cfg.engine.eos = EosModel::Never;
    tweak(&mut cfg);
    Server::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

fn url(s: &Server) -> String {
    format!("http://{}", s.local_addr())
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
        "stream_options": {"include_usage": true},
    }))
    .unwrap()
}

/// The `data:` payloads of an SSE body.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

async fn metrics_page(s: &Server) -> String {
    let (status, _, body) = get(&url(s), "/metrics").await.unwrap();
    assert_eq!(status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of the first sample line starting with `prefix`.
fn sample(page: &str, prefix: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

async fn set_faults(s: &Server, patch: Value) -> (u16, Value) {
    let (status, _, body) = post_json(&url(s), "/admin/faults", &[], patch.to_string())
        .await
        .unwrap();
    (status.as_u16(), serde_json::from_slice(&body).unwrap())
}

/// Sends a raw HTTP/1.1 request and returns the socket, for tests that hang up or watch
/// the connection itself.
async fn raw_request(s: &Server, path: &str, body: &[u8]) -> tokio::net::TcpStream {
    let mut sock = tokio::net::TcpStream::connect(s.local_addr())
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body).await.unwrap();
    sock
}

/// Reads from `sock` until `needle` appears; returns everything read.
async fn read_until(sock: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("no data within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before {needle:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn streamed_completion_chunks_parse_and_add_up_to_the_token_count() {
    let s = mk_server(|_| {}).await;
    let (status, headers, body) = post_json_stream(
        &url(&s),
        "/v1/completions",
        &[],
        completion("Tell me a story.", 20, true),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = events(&body.concat().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (tokens, usage) = chunks.split_at(chunks.len() - 1);
    assert_eq!(tokens.len(), 20);
    let text: String = tokens
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(infergate_sim::tokens::tokenize(&text).len(), 20, "{text:?}");
    assert!(tokens.iter().all(
        |c| c["object"] == "text_completion" && c["id"].as_str().unwrap().starts_with("cmpl-")
    ));
    assert_eq!(tokens[19]["choices"][0]["finish_reason"], "length");
    assert!(tokens[..19]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(usage[0]["choices"], json!([]));
    assert_eq!(usage[0]["usage"]["completion_tokens"], 20);
    assert_eq!(usage[0]["usage"]["prompt_tokens"], 5);
    assert_eq!(usage[0]["usage"]["total_tokens"], 25);

    // The driver reports how late it woke up for each step.
    let page = metrics_page(&s).await;
    assert!(
        sample(&page, "infergate_sim_step_lag_seconds_count").unwrap() >= 20.0,
        "{page}"
    );
    assert_eq!(sample(&page, "vllm:generation_tokens_total"), Some(20.0));
}

#[tokio::test]
async fn streamed_chat_opens_with_the_assistant_role_and_omits_usage_unless_asked() {
    let s = mk_server(|_| {}).await;
    let req = json!({
        "model": MODEL, "max_completion_tokens": 7, "stream": true,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
    });
    let (status, _, body) =
        post_json_stream(&url(&s), "/v1/chat/completions", &[], req.to_string())
            .await
            .unwrap();
    assert_eq!(status, 200);
    let events = events(&body.concat().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        chunks.len(),
        1 + 7,
        "no usage chunk without stream_options.include_usage"
    );
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(infergate_sim::tokens::tokenize(&text).len(), 7);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[7]["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn repeated_long_prompt_is_served_from_the_prefix_cache() {
    let s = mk_server(|_| {}).await;
    let system = "You are a careful assistant who answers in full sentences. ".repeat(60);
    let chat = |q: &str| {
        json!({"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": q},
        ]})
        .to_string()
    };
    let mut cached = Vec::new();
    for q in [
        "What is a KV cache?",
        "What is a KV cache?",
        "Why route by prefix?",
    ] {
        let (status, _, body) = post_json(&url(&s), "/v1/chat/completions", &[], chat(q))
            .await
            .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["usage"]["completion_tokens"], 4);
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 600);
        cached.push(
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(cached[0], 0);
    assert!(cached[1] > 600, "same prompt again: {cached:?}");
    assert!(
        cached[2] > 600,
        "same system prompt, other question: {cached:?}"
    );
    let page = metrics_page(&s).await;
    assert!(
        sample(&page, "vllm:prefix_cache_hits_total").unwrap() >= (cached[1] + cached[2]) as f64
    );
}

#[tokio::test]
async fn unknown_model_gets_vllms_404_wording() {
    let s = mk_server(|_| {}).await;
    let req = json!({"model": "gpt-5", "prompt": "hi"}).to_string();
    let (status, _, body) = post_json(&url(&s), "/v1/completions", &[], req)
        .await
        .unwrap();
    assert_eq!(status, 404);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"object": "error", "message": "The model `gpt-5` does not exist.", "type": "NotFoundError", "param": null, "code": 404})
    );
}

#[tokio::test]
async fn bad_requests_get_400_and_oversized_bodies_413() {
    let s = mk_server(|c| {
        c.max_body_bytes = 4096;
        c.engine.max_model_len = 1000;
    })
    .await;
    let u = url(&s);
    let cases = [
        ("{not json", "Invalid request body"),
        (
            r#"{"model":"sim-model","prompt":["a","b"]}"#,
            "one prompt per request",
        ),
        (
            r#"{"model":"sim-model","prompt":"hi","max_tokens":5000}"#,
            "maximum context length is 1000 tokens",
        ),
        (
            r#"{"model":"sim-model","prompt":"hi","max_tokens":-1}"#,
            "Invalid request body",
        ),
        (r#"{"model":"sim-model"}"#, "prompt is required"),
    ];
    for (body, want) in cases {
        let (status, _, resp) = post_json(&u, "/v1/completions", &[], body).await.unwrap();
        let v: Value = serde_json::from_slice(&resp).unwrap();
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["type"], "BadRequestError");
        assert!(v["message"].as_str().unwrap().contains(want), "{body}: {v}");
    }
    let big = completion(&"word ".repeat(2000), 1, false);
    let (status, _, resp) = post_json(&u, "/v1/completions", &[], big).await.unwrap();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&resp));
    // The engine took none of them.
    assert_eq!(s.with_engine(|e| e.counters().prompt_tokens), 0);
}

#[tokio::test]
async fn client_disconnect_frees_the_batch_slot_at_once() {
    // Real time: a 100k-token answer would run for minutes.
    let s = mk_server(|c| c.time_scale = 1.0).await;
    for stream in [true, false] {
        let mut sock = raw_request(
            &s,
            "/v1/completions",
            &completion("Write forever.", 100_000, stream),
        )
        .await;
        if stream {
            read_until(&mut sock, "data: ").await;
        } else {
            assert!(eventually(Duration::from_secs(2), || s.stats().num_running == 1).await);
        }
        let page = metrics_page(&s).await;
        assert_eq!(
            sample(&page, "vllm:num_requests_running{"),
            Some(1.0),
            "stream={stream}"
        );
        drop(sock);
        let freed = eventually(Duration::from_secs(2), || s.stats().num_running == 0).await;
        assert!(
            freed,
            "stream={stream}: slot still held after the client left"
        );
        assert_eq!(
            sample(&metrics_page(&s).await, "vllm:num_requests_running{"),
            Some(0.0)
        );
        assert!(
            eventually(Duration::from_secs(1), || s
                .with_engine(|e| e.pool().usage())
                == 0.0)
            .await
        );
    }
    let page = metrics_page(&s).await;
    assert!(page.contains("finished_reason=\"abort\"} 2.0"), "{page}");
}

#[tokio::test]
async fn lora_adapters_load_list_serve_and_unload_like_vllm() {
    let s = mk_server(|c| c.lora_modules = vec![("pre".into(), "/adapters/pre".into())]).await;
    let u = url(&s);
    let load = |name: &str| {
        json!({"lora_name": name, "lora_path": format!("/adapters/{name}")}).to_string()
    };
    let (status, _, body) = post_json(&u, "/v1/load_lora_adapter", &[], load("sql"))
        .await
        .unwrap();
    assert_eq!(
        (status.as_u16(), &body[..]),
        (200, &b"Success: LoRA adapter 'sql' added successfully."[..])
    );
    let (status, _, _) = post_json(&u, "/v1/load_lora_adapter", &[], load("sql"))
        .await
        .unwrap();
    assert_eq!(status, 400);

    let (_, _, body) = get(&u, "/v1/models").await.unwrap();
    let models: Value = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, "pre", "sql"]);
    assert_eq!(
        models["data"][0]["max_model_len"],
        131_072.min(s.config().engine.max_model_len)
    );
    assert_eq!(models["data"][2]["parent"], MODEL);
    assert_eq!(models["data"][2]["root"], "/adapters/sql");

    let req = json!({"model": "sql", "prompt": "select", "max_tokens": 2}).to_string();
    let (status, _, body) = post_json(&u, "/v1/completions", &[], req.clone())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["model"],
        "sql"
    );

    let unload = json!({"lora_name": "sql"}).to_string();
    let (status, _, body) = post_json(&u, "/v1/unload_lora_adapter", &[], unload.clone())
        .await
        .unwrap();
    assert_eq!(
        (status.as_u16(), &body[..]),
        (
            200,
            &b"Success: LoRA adapter 'sql' removed successfully."[..]
        )
    );
    let (status, _, _) = post_json(&u, "/v1/unload_lora_adapter", &[], unload)
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _, _) = post_json(&u, "/v1/completions", &[], req).await.unwrap();
    assert_eq!(status, 404);
    let (status, _, body) = get(&u, "/health").await.unwrap();
    assert_eq!((status.as_u16(), body.len()), (200, 0));
}

#[tokio::test]
async fn pickers_parser_reads_the_metrics_page_as_the_engine_sees_itself() {
    use infergate_core::Engine as Kind;
    use infergate_scrape::{engines, text};
    // A clock so slow that the first step never ends: the state holds still to be compared.
    let s = mk_server(|c| {
        c.time_scale = 1e-6;
        c.engine.max_loras = 2;
        c.engine.max_cpu_loras = 2;
        c.lora_modules = ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), format!("/{n}")))
            .collect();
    })
    .await;
    let send = |model: &'static str| {
        let u = url(&s);
        tokio::spawn(async move {
            let req =
                json!({"model": model, "prompt": "x ".repeat(100), "max_tokens": 10}).to_string();
            let _ = post_json(&u, "/v1/completions", &[], req).await;
        })
    };
    let _a = send("a");
    assert!(eventually(Duration::from_secs(2), || s.stats().num_running == 1).await);
    let _rest = [send("b"), send("c"), send(MODEL)];
    assert!(eventually(Duration::from_secs(2), || s.stats().num_waiting == 3).await);

    let page = metrics_page(&s).await;
    let stats = s.stats();
    let samples = text::parse_only(&page, |n| engines::reads(Kind::Vllm, n)).unwrap();
    let m = engines::extract(Kind::Vllm, &samples).unwrap();
    assert_eq!(
        (m.waiting, m.running),
        (stats.num_waiting, stats.num_running)
    );
    assert!(stats.kv_usage > 0.0);
    assert_eq!(m.kv_cache_usage, Some(stats.kv_usage));
    let lora = m.lora.expect("lora_requests_info");
    let names = |v: &[std::sync::Arc<str>]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    assert_eq!(lora.running, names(&stats.running_loras));
    assert_eq!(lora.waiting, names(&stats.waiting_loras));
    assert_eq!(lora.running, vec!["a"]);
    assert_eq!(lora.waiting, vec!["b", "c"]);
    assert_eq!(lora.max_loras, 2);
    let cfg = &s.config().engine;
    assert_eq!(m.block_size, Some(cfg.block_size));
    assert_eq!(m.num_gpu_blocks, Some(u64::from(cfg.num_gpu_blocks)));
    // The whole page is valid Prometheus text, histograms and all.
    assert!(text::parse(&page).is_ok());
    for family in [
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:request_success_total",
        "vllm:prefix_cache_queries_total",
        "infergate_sim_lag_resyncs_total",
    ] {
        assert!(page.contains(family), "no {family}");
    }
}

#[tokio::test]
async fn error_rate_one_answers_with_the_configured_status_and_is_counted() {
    let s = mk_server(|_| {}).await;
    let (status, faults) = set_faults(&s, json!({"error_rate": 1.0, "error_status": 503})).await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            faults["error_rate"].as_f64(),
            faults["error_status"].as_u64()
        ),
        (Some(1.0), Some(503))
    );
    for _ in 0..3 {
        let (status, _, _) =
            post_json(&url(&s), "/v1/completions", &[], completion("hi", 2, false))
                .await
                .unwrap();
        assert_eq!(status, 503);
    }
    let page = metrics_page(&s).await;
    assert_eq!(
        sample(
            &page,
            "infergate_sim_faults_injected_total{model_name=\"sim-model\",kind=\"error\"}"
        ),
        Some(3.0)
    );
    // POST merges: turning the rate off keeps the status.
    let (_, faults) = set_faults(&s, json!({"error_rate": 0.0})).await;
    assert_eq!(faults["error_status"], 503);
    let (status, _, _) = post_json(&url(&s), "/v1/completions", &[], completion("hi", 2, false))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, v) = set_faults(&s, json!({"eror_rate": 1.0})).await;
    assert_eq!(status, 400);
    assert!(
        v["message"].as_str().unwrap().contains("known: error_rate"),
        "{v}"
    );
}

#[tokio::test]
async fn error_rate_dice_follow_the_seed() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let s = mk_server(|c| {
            c.seed = 42;
            c.faults.error_rate = 0.5;
        })
        .await;
        let mut statuses = Vec::new();
        for _ in 0..12 {
            let (status, _, _) =
                post_json(&url(&s), "/v1/completions", &[], completion("hi", 1, false))
                    .await
                    .unwrap();
            statuses.push(status.as_u16());
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(
        runs[0].contains(&500) && runs[0].contains(&200),
        "{:?}",
        runs[0]
    );
}

#[tokio::test]
async fn drop_after_tokens_cuts_the_stream_mid_way() {
    let s = mk_server(|_| {}).await;
    set_faults(&s, json!({"drop_after_tokens": 3})).await;
    let (status, _, mut body) =
        post_json_stream(&url(&s), "/v1/completions", &[], completion("hi", 20, true))
            .await
            .unwrap();
    assert_eq!(status, 200);
    let mut got = Vec::new();
    let ended = loop {
        match body.next_chunk().await {
            Some(Ok(c)) => got.extend_from_slice(&c),
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    assert!(
        ended.is_err(),
        "the stream ended cleanly; a dropped connection must not"
    );
    let events = events(&got);
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    // The engine let the request go with the connection.
    assert!(eventually(Duration::from_secs(2), || s.stats().num_running == 0).await);
}

#[tokio::test]
async fn metrics_faults_garbage_missing_and_hang() {
    let s = mk_server(|_| {}).await;
    set_faults(&s, json!({"metrics": "garbage"})).await;
    let (status, _, body) = get(&url(&s), "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(infergate_scrape::text::parse(&String::from_utf8_lossy(&body)).is_err());

    set_faults(&s, json!({"metrics": "missing"})).await;
    let (status, _, _) = get(&url(&s), "/metrics").await.unwrap();
    assert_eq!(status, 404);

    set_faults(&s, json!({"metrics": "hang"})).await;
    let answer = tokio::time::timeout(Duration::from_millis(300), get(&url(&s), "/metrics")).await;
    assert!(answer.is_err(), "a hung /metrics answered");

    set_faults(&s, json!({"metrics": "ok"})).await;
    let page = metrics_page(&s).await;
    for kind in ["metrics_garbage", "metrics_missing", "metrics_hang"] {
        assert!(
            page.contains(&format!("kind=\"{kind}\"}} 1.0")),
            "{kind} not counted"
        );
    }
}

#[tokio::test]
async fn added_latency_delays_the_answer_and_hang_never_answers() {
    let s = mk_server(|c| c.faults.added_latency_ms = 300).await;
    let t = Instant::now();
    let (status, _, _) = post_json(&url(&s), "/v1/completions", &[], completion("hi", 1, false))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    set_faults(&s, json!({"added_latency_ms": 0, "hang": true})).await;
    let answer = tokio::time::timeout(
        Duration::from_millis(500),
        post_json(&url(&s), "/v1/completions", &[], completion("hi", 1, false)),
    )
    .await;
    assert!(answer.is_err(), "a hung replica answered");
    let (status, _, _) = get(&url(&s), "/health").await.unwrap();
    assert_eq!(status, 200, "hang affects completions only");
}

#[tokio::test]
async fn exit_closes_the_port_and_drops_open_streams() {
    let s = mk_server(|c| c.time_scale = 1.0).await;
    let mut sock = raw_request(
        &s,
        "/v1/completions",
        &completion("Write forever.", 100_000, true),
    )
    .await;
    let before = read_until(&mut sock, "data: ").await;
    let (status, _) = set_faults(&s, json!({"exit": true})).await;
    assert_eq!(status, 200);
    tokio::time::timeout(Duration::from_secs(2), s.stopped())
        .await
        .expect("replica did not stop");
    // The open stream ends without the chunked terminator or [DONE].
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), sock.read_to_end(&mut rest))
        .await
        .expect("stream still open");
    let all = before + &String::from_utf8_lossy(&rest);
    assert!(
        !all.contains("[DONE]") && !all.ends_with("0\r\n\r\n"),
        "stream ended cleanly"
    );
    let refused = eventually(Duration::from_secs(2), || {
        std::net::TcpStream::connect(s.local_addr()).is_err()
    })
    .await;
    assert!(refused, "port still accepts connections after exit");
}
