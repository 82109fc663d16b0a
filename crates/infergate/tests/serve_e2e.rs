//! `infergate serve` as a user runs it: the real binary in front of real `infergate sim`
//! replicas (and, with no pool, its own simulated ones), over real HTTP on 127.0.0.1.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, metric_sum, Serve, Sim};
use infergate_testkit::{get, post_json, post_json_stream, HttpClient};
use serde_json::{json, Value};

const MODEL: &str = "m";

fn endpoints(sim: &Sim) -> String {
    sim.replicas
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn chat(max_tokens: u32, stream: bool) -> String {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about routing."}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// The `data:` payloads of an SSE body, in order.
fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// What each event is: a token, the usage chunk, `[DONE]`, or an error.
fn shape(events: &[String]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| {
            if e == "[DONE]" {
                return "done";
            }
            let v: Value = serde_json::from_str(e).expect("every event is JSON");
            if v.get("error").is_some() {
                "error"
            } else if v["choices"].as_array().is_some_and(|c| c.is_empty()) {
                "usage"
            } else {
                "token"
            }
        })
        .collect()
}

async fn running(sim: &Sim, i: usize) -> f64 {
    let (_, _, page) = get(&sim.url(i), "/metrics").await.unwrap();
    metric_sum(&String::from_utf8_lossy(&page), "vllm:num_requests_running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_pool_it_starts_simulated_replicas_and_its_curl_line_works() {
    let serve = Serve::start(&["--sim-replicas", "2"]);
    let banner = serve.banner.join("\n");
    assert!(
        banner.contains("2 simulated llama3-8b-h100 replicas"),
        "{banner}"
    );
    // The printed curl line, run as printed (its JSON body, to its URL).
    // The curl command and its continuation line.
    let curl = banner
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("curl "))
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let url = curl
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL in the curl line");
    let body = curl
        .split("-d '")
        .nth(1)
        .and_then(|b| b.strip_suffix('\''))
        .expect("a -d '...' body");
    let (base, path) = url.split_at(url.find("/v1/").unwrap());
    let (status, headers, answer) = post_json(base, path, &[], body.to_owned()).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let v: Value = serde_json::from_slice(&answer).unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(headers.contains_key("x-request-id"));
    let (status, _, _) = get(&serve.url(), "/ready").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_relayed_as_they_arrive_with_the_replicas_framing() {
    let sim = Sim::start(&["--port", "0", "--served-model-name", MODEL], 1);
    let serve = Serve::start(&["--endpoints", &endpoints(&sim)]);

    // About 0.7 s of tokens at the profile's speed: a buffering gateway would deliver the
    // first chunk at the end.
    let started = Instant::now();
    let (status, headers, mut body) =
        post_json_stream(&serve.url(), "/v1/chat/completions", &[], chat(100, true))
            .await
            .unwrap();
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let first = body.next_chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    let mut all = first.to_vec();
    while let Some(c) = body.next_chunk().await {
        all.extend_from_slice(&c.unwrap());
    }
    let total = started.elapsed();
    assert!(
        first_at < total / 3,
        "first chunk after {first_at:?} of a {total:?} stream: the gateway held it back"
    );
    let through = sse_events(&all);

    let (_, _, direct) = post_json(&sim.url(0), "/v1/chat/completions", &[], chat(100, true))
        .await
        .unwrap();
    let direct = sse_events(&direct);
    assert_eq!(shape(&through), shape(&direct));
    // The role chunk, 100 tokens, usage, [DONE].
    assert_eq!(
        shape(&through).iter().filter(|s| **s == "token").count(),
        101
    );
    let usage: Value = serde_json::from_str(&through[through.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_four_replicas_mid_run_loses_no_request_that_had_not_started_streaming() {
    // Four requests run at a time per replica and the rest queue, so when replica 2 dies
    // some of its requests are streaming and others have not produced a byte yet.
    let sim = Sim::start(
        &[
            "--port",
            "0",
            "--replicas",
            "4",
            "--max-num-seqs",
            "4",
            "--served-model-name",
            MODEL,
        ],
        4,
    );
    let serve = Serve::start(&["--endpoints", &endpoints(&sim)]);
    let url = serve.url();

    const TOTAL: usize = 500;
    const CONCURRENCY: usize = 40;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    #[derive(Debug, Default)]
    struct Tally {
        complete: usize,
        clean_error_after_tokens: usize,
        error_before_any_token: Vec<String>,
        broken: Vec<String>,
    }
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (url, next, done, tally) = (url.clone(), next.clone(), done.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            let client = HttpClient::new();
            while next.fetch_add(1, Ordering::Relaxed) < TOTAL {
                let res = client
                    .post_json_stream(&url, "/v1/chat/completions", &[], chat(30, true))
                    .await;
                let outcome = match res {
                    Err(e) => Err(format!("no response: {e:#}")),
                    Ok((status, _, _)) if status != 200 => Err(format!("status {status}")),
                    Ok((_, _, body)) => match body.concat().await {
                        Err(e) => Err(format!("broken stream: {e:#}")),
                        Ok(b) => Ok(shape(&sse_events(&b))),
                    },
                };
                let mut t = tally.lock().unwrap();
                match outcome {
                    Ok(s) if s.last() == Some(&"done") => t.complete += 1,
                    Ok(s) if s.last() == Some(&"error") => {
                        if s.contains(&"token") {
                            t.clean_error_after_tokens += 1
                        } else {
                            t.error_before_any_token.push(format!("{s:?}"))
                        }
                    }
                    Ok(s) => t.broken.push(format!("ended without [DONE]: {s:?}")),
                    Err(e) => t.broken.push(e),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // A third of the way in, replica 2 dies: its port closes and its streams are cut.
    assert!(
        eventually(Duration::from_secs(60), || done.load(Ordering::Relaxed)
            >= TOTAL / 3)
        .await
    );
    let (status, _, _) = post_json(&sim.url(2), "/admin/faults", &[], r#"{"exit": true}"#)
        .await
        .unwrap();
    assert_eq!(status, 200);
    for w in workers {
        w.await.unwrap();
    }
    // A copy, so no lock is held across the awaits below.
    let t = std::mem::take(&mut *tally.lock().unwrap());
    assert_eq!(
        t.complete + t.clean_error_after_tokens + t.error_before_any_token.len() + t.broken.len(),
        TOTAL
    );
    assert!(
        t.broken.is_empty(),
        "requests lost or broken: {:?}",
        t.broken
    );
    assert!(
        t.error_before_any_token.is_empty(),
        "requests failed before their first token (they should have been retried): {:?}",
        t.error_before_any_token
    );
    // Some streams were on replica 2 when it died; they end with the error event.
    assert!(t.clean_error_after_tokens <= 4, "{t:?}");
    assert!(t.complete >= TOTAL - CONCURRENCY, "{t:?}");
    let (_, _, page) = get(&serve.url(), "/metrics").await.unwrap();
    let page = String::from_utf8_lossy(&page);
    let gw: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("infergate_gateway"))
        .collect();
    eprintln!("outcomes: {t:?}; gateway: {gw:?}");
    // The requests queued on the dead replica had sent nothing to their clients: they were
    // retried elsewhere, and completed (counted above).
    assert!(
        metric_sum(&page, "infergate_gateway_retries_total") > 0.0,
        "no request was retried: {gw:#?} {t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_the_replicas_slot() {
    let sim = Sim::start(&["--port", "0", "--served-model-name", MODEL], 1);
    let serve = Serve::start(&["--endpoints", &endpoints(&sim)]);
    let (status, _, mut body) =
        post_json_stream(&serve.url(), "/v1/chat/completions", &[], chat(2000, true))
            .await
            .unwrap();
    assert_eq!(status, 200);
    for _ in 0..3 {
        body.next_chunk().await.unwrap().unwrap();
    }
    assert_eq!(running(&sim, 0).await, 1.0);
    drop(body);
    let mut freed = false;
    for _ in 0..40 {
        if running(&sim, 0).await == 0.0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "the replica still runs the abandoned request");
}

fn pool_file(sim: &Sim) -> String {
    let eps: String = sim
        .replicas
        .iter()
        .map(|a| format!("  - address: {}\n    port: {}\n", a.ip(), a.port()))
        .collect();
    format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: StaticEndpoints\nmetadata:\n  name: sims\nspec:\n  endpoints:\n{eps}---\n\
         apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata:\n  name: batch\nspec:\n  priority: -1\n  poolRef:\n    name: infergate\n---\n\
         apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\nmetadata:\n  name: interactive\nspec:\n  priority: 10\n  poolRef:\n    name: infergate\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_saturation_sheddable_work_gets_429_first_and_the_rest_is_served() {
    // One request at a time per replica: everything else queues, so the pool saturates.
    let sim = Sim::start(
        &[
            "--port",
            "0",
            "--replicas",
            "2",
            "--max-num-seqs",
            "1",
            "--served-model-name",
            MODEL,
        ],
        2,
    );
    let dir = std::env::temp_dir().join(format!("infergate-shed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = dir.join("pool.yaml");
    std::fs::write(&pool, pool_file(&sim)).unwrap();
    // Keys carry objectives: `bk` is batch work, `ik` interactive.
    let serve = Serve::start_with_env(
        &["--pool-file", pool.to_str().unwrap()],
        &[("INFERGATE_API_KEYS", "bk:batch,ik:interactive,plain")],
    );
    let url = serve.url();

    // Fill both replicas' queues with long requests.
    let mut fill = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        fill.push(tokio::spawn(async move {
            let c = HttpClient::new();
            let (_, _, mut body) = c
                .post_json_stream(
                    &url,
                    "/v1/chat/completions",
                    &[("authorization", "Bearer plain")],
                    chat(3000, true),
                )
                .await
                .unwrap();
            while let Some(Ok(_)) = body.next_chunk().await {}
        }));
    }
    // Wait until both replicas report deep queues (scraped every 50 ms).
    let mut saturated = false;
    for _ in 0..100 {
        let mut waiting = 0.0;
        for i in 0..2 {
            let (_, _, page) = get(&sim.url(i), "/metrics").await.unwrap();
            waiting += metric_sum(&String::from_utf8_lossy(&page), "vllm:num_requests_waiting");
        }
        if waiting >= 12.0 {
            saturated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saturated, "the replicas' queues never filled");
    // Let the gateway's scraper see it.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Priority -1 by header and by key: refused with 429 and a reason.
    for headers in [
        vec![
            ("authorization", "Bearer plain"),
            ("x-gateway-inference-objective", "batch"),
        ],
        vec![("authorization", "Bearer bk")],
    ] {
        let (status, _, body) = post_json(&url, "/v1/chat/completions", &headers, chat(5, false))
            .await
            .unwrap();
        assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("saturated"),
            "{v}"
        );
    }
    // Priority >= 0 is still taken while the pool is saturated: it is admitted and waits
    // its turn in a replica's queue. Once the long requests are called off, it is served.
    let interactive = {
        let url = url.clone();
        tokio::spawn(async move {
            HttpClient::new()
                .post_json(
                    &url,
                    "/v1/chat/completions",
                    &[("authorization", "Bearer ik")],
                    chat(5, false),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    if interactive.is_finished() {
        let got = match interactive.await.unwrap() {
            Ok((status, _, body)) => format!("{status} {}", String::from_utf8_lossy(&body)),
            Err(e) => format!("{e:#}"),
        };
        panic!(
            "it should be queued, not answered at once; got {got}\nserve's log:\n{}",
            serve.log_text()
        );
    }
    for f in fill {
        f.abort();
    }
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(20), interactive)
        .await
        .expect("served within 20 s once the queue cleared")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_a_clear_message() {
    let sim = Sim::start(&["--port", "0", "--served-model-name", MODEL], 1);
    let serve = Serve::start_with_env(
        &[
            "--endpoints",
            &endpoints(&sim),
            "--max-body-bytes",
            "1048576",
        ],
        &[("INFERGATE_API_KEYS", "secret")],
    );
    let url = serve.url();
    let auth = ("authorization", "Bearer secret");
    let check = |status: u16, want: u16, body: &[u8], needle: &str| {
        let text = String::from_utf8_lossy(body);
        assert_eq!(status, want, "{text}");
        let v: Value = serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {text}"));
        // Ours are OpenAI-shaped (`error.message`); a replica's own errors pass through in
        // vLLM's shape (`message` at the top).
        let msg = v["error"]["message"]
            .as_str()
            .or(v["message"].as_str())
            .unwrap_or_default()
            .to_lowercase();
        assert!(msg.contains(needle), "{want}: {msg:?} lacks {needle:?}");
    };

    let (s, _, b) = post_json(&url, "/v1/chat/completions", &[], chat(5, false))
        .await
        .unwrap();
    check(s.as_u16(), 401, &b, "api key");
    let (s, _, b) = post_json(
        &url,
        "/v1/chat/completions",
        &[("authorization", "Bearer nope")],
        chat(5, false),
    )
    .await
    .unwrap();
    check(s.as_u16(), 401, &b, "api key");
    let (s, _, b) = post_json(&url, "/v1/chat/completions", &[auth], "{not json")
        .await
        .unwrap();
    check(s.as_u16(), 400, &b, "json");
    let (s, _, b) = post_json(&url, "/v1/chat/completions", &[auth], r#"{"messages": []}"#)
        .await
        .unwrap();
    check(s.as_u16(), 400, &b, "model");
    let (s, _, b) = post_json(
        &url,
        "/v1/chat/completions",
        &[auth, ("x-gateway-inference-objective", "no-such-objective")],
        chat(5, false),
    )
    .await
    .unwrap();
    check(s.as_u16(), 400, &b, "no-such-objective");
    let unknown = json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]});
    let (s, _, b) = post_json(&url, "/v1/chat/completions", &[auth], unknown.to_string())
        .await
        .unwrap();
    check(s.as_u16(), 404, &b, "gpt-9");
    let big = format!(
        r#"{{"model": "{MODEL}", "prompt": "{}"}}"#,
        "a".repeat(50 << 20)
    );
    let (s, _, b) = post_json(&url, "/v1/completions", &[auth], big)
        .await
        .unwrap();
    check(s.as_u16(), 413, &b, "1048576");
    let (s, _, b) = get(&url, "/v1/nothing-here").await.unwrap();
    assert_eq!(s, 404, "{}", String::from_utf8_lossy(&b));

    // A replica that never answers: 504 once the first-byte timeout passes.
    let hung = Sim::start(
        &["--port", "0", "--served-model-name", MODEL, "--fault-hang"],
        1,
    );
    let serve = Serve::start(&[
        "--endpoints",
        &endpoints(&hung),
        "--first-byte-timeout",
        "300ms",
        "--max-attempts",
        "1",
    ]);
    let (s, _, b) = post_json(&serve.url(), "/v1/chat/completions", &[], chat(5, false))
        .await
        .unwrap();
    check(s.as_u16(), 504, &b, "300ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_stream_finish_then_exits() {
    let sim = Sim::start(&["--port", "0", "--served-model-name", MODEL], 1);
    let mut serve = Serve::start(&["--endpoints", &endpoints(&sim)]);
    let (status, _, body) =
        post_json_stream(&serve.url(), "/v1/chat/completions", &[], chat(100, true))
            .await
            .unwrap();
    assert_eq!(status, 200);
    let pid = serve.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let all = body
        .concat()
        .await
        .expect("the stream finishes despite SIGTERM");
    assert_eq!(shape(&sse_events(&all)).last(), Some(&"done"));
    let mut code = None;
    for _ in 0..100 {
        if let Some(s) = serve.child.try_wait().unwrap() {
            code = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(code.expect("still running 5 s after SIGTERM").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_while_its_request_is_queued_leaves_the_queue() {
    // One request at a time: a long one runs, the next waits in the replica's queue, and the
    // gateway holds its response until the first token, so that client sees nothing yet.
    let sim = Sim::start(
        &[
            "--port",
            "0",
            "--max-num-seqs",
            "1",
            "--served-model-name",
            MODEL,
        ],
        1,
    );
    let serve = Serve::start(&["--endpoints", &endpoints(&sim)]);
    let url = serve.url();
    let (status, _, mut running_body) =
        post_json_stream(&url, "/v1/chat/completions", &[], chat(3000, true))
            .await
            .unwrap();
    assert_eq!(status, 200);
    running_body.next_chunk().await.unwrap().unwrap();
    let queued = {
        let url = url.clone();
        tokio::spawn(async move {
            let c = HttpClient::new();
            c.post_json_stream(&url, "/v1/chat/completions", &[], chat(10, true))
                .await
        })
    };
    let waiting =
        |page: &[u8]| metric_sum(&String::from_utf8_lossy(page), "vllm:num_requests_waiting");
    let mut seen = false;
    for _ in 0..40 {
        let (_, _, page) = get(&sim.url(0), "/metrics").await.unwrap();
        if waiting(&page) == 1.0 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen, "the second request never queued");
    queued.abort();
    let mut left = false;
    for _ in 0..40 {
        let (_, _, page) = get(&sim.url(0), "/metrics").await.unwrap();
        if waiting(&page) == 0.0 {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        left,
        "the abandoned request still waits in the replica's queue"
    );
}
