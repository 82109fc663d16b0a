//! Forwarding as a client sees it: streams relayed as they arrive, retries before the first
//! byte and never after, the circuit breaker, disconnects, HTTP/2 and graceful shutdown.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use infergate_gateway::GatewayConfig;
use infergate_sim::server::Faults;
use infergate_testkit::poll::eventually;
use infergate_testkit::{get, post_json, post_json_stream, FakeModelServer, HttpClient};

fn cfg() -> GatewayConfig {
    GatewayConfig {
        retry_backoff: Duration::from_millis(1),
        ..GatewayConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_relayed_byte_for_byte_and_its_first_chunk_is_not_held_back() {
    const ONE: &[u8] = b"data: {\"n\":1}\n\n";
    const TWO: &[u8] = b"data: {\"n\":2,\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
    let (up, _t) = mk_upstream(|_req| async {
        let mut r = full(200, "text/event-stream", b"");
        *r.body_mut() = timed_body(vec![
            (Duration::ZERO, ONE),
            (Duration::from_millis(300), TWO),
        ]);
        r
    })
    .await;
    let gw = mk_gateway(&[up], cfg()).await;

    let started = Instant::now();
    let (status, headers, mut body) = post_json_stream(
        &gw.url(),
        "/v1/chat/completions",
        &[],
        chat("hello", 2, true),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert!(headers.contains_key("x-request-id"));
    let first = body.next_chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(&first[..], ONE);
    assert!(
        first_at < Duration::from_millis(200),
        "first chunk after {first_at:?}: the gateway held it back until the second"
    );
    let mut all = first.to_vec();
    while let Some(c) = body.next_chunk().await {
        all.extend_from_slice(&c.unwrap());
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(all, [ONE, TWO].concat());

    // Usage was read on the way and the request was counted as the picker counts it.
    let page = gateway_metrics(&gw).await;
    assert_eq!(
        metric_sum(&page, "inference_objective_output_tokens_sum"),
        2.0,
        "{page}"
    );
    assert_eq!(metric_sum(&page, "inference_objective_request_total"), 1.0);
    assert_eq!(
        metric_sum(&page, "inference_objective_running_requests"),
        0.0
    );
    assert_eq!(
        metric_sum(&page, "inference_objective_request_ttft_seconds_count"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_on_another_endpoint() {
    let sim = mk_sim(20.0, Faults::default()).await;
    let dead = dead_addr().await;
    let gw = mk_gateway(&[dead, sim.local_addr()], cfg()).await;
    for i in 0..20 {
        let (status, _, body) = post_json(
            &gw.url(),
            "/v1/chat/completions",
            &[],
            chat(&format!("question {i}"), 2, false),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let page = gateway_metrics(&gw).await;
    assert!(
        metric_sum(&page, "infergate_gateway_retries_total") >= 1.0,
        "{page}"
    );
    assert!(
        metric_sum(
            &page,
            "infergate_gateway_upstream_failures_total{reason=\"connect\"}"
        ) >= 1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_on_another_endpoint_and_the_client_never_sees_it() {
    let bad = FakeModelServer::start("bad").await.unwrap();
    bad.set_status(503);
    let good = FakeModelServer::start("good").await.unwrap();
    let gw = mk_gateway(&[bad.addr(), good.addr()], cfg()).await;
    for i in 0..12 {
        let (status, headers, body) = post_json(
            &gw.url(),
            "/v1/completions",
            &[],
            format!(r#"{{"model":"m","prompt":"p{i}"}}"#),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["x-served-by"], "good");
    }
    assert!(bad.count() >= 1, "the failing endpoint was never tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_its_first_bytes_ends_with_an_error_event_and_is_not_retried() {
    let sim = mk_sim(
        20.0,
        Faults {
            drop_after_tokens: Some(3),
            ..Faults::default()
        },
    )
    .await;
    let gw = mk_gateway(&[sim.local_addr()], cfg()).await;
    let (status, _, body) = post_json_stream(
        &gw.url(),
        "/v1/chat/completions",
        &[],
        chat("tell me", 50, true),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let all = body
        .concat()
        .await
        .expect("a clean end, not a broken connection");
    let text = String::from_utf8_lossy(&all);
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    assert!(events.len() >= 2, "{text}");
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "{text}");
    assert_eq!(last["error"]["code"], 502);
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("broke off"));
    assert!(!events.contains(&"[DONE]"));
    let page = gateway_metrics(&gw).await;
    assert_eq!(metric_sum(&page, "infergate_gateway_retries_total"), 0.0);
    assert_eq!(
        metric_sum(&page, "inference_objective_running_requests"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_a_retry_was_possible_is_still_not_retried() {
    // Two endpoints, both cutting streams: the client gets exactly one attempt's bytes.
    let a = mk_sim(
        20.0,
        Faults {
            drop_after_tokens: Some(2),
            ..Faults::default()
        },
    )
    .await;
    let b = mk_sim(
        20.0,
        Faults {
            drop_after_tokens: Some(2),
            ..Faults::default()
        },
    )
    .await;
    let gw = mk_gateway(&[a.local_addr(), b.local_addr()], cfg()).await;
    let (status, _, body) = post_json_stream(
        &gw.url(),
        "/v1/completions",
        &[],
        r#"{"model":"m","prompt":"x","max_tokens":20,"stream":true}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let all = body.concat().await.unwrap();
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("\"error\"").count(), 1, "{text}");
    let page = gateway_metrics(&gw).await;
    assert_eq!(metric_sum(&page, "infergate_gateway_retries_total"), 0.0);
    assert_eq!(
        metric_sum(
            &page,
            "infergate_gateway_upstream_failures_total{reason=\"mid_stream\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_endpoint_answers_429_or_5xx_the_last_answer_is_passed_through() {
    let a = FakeModelServer::start("a").await.unwrap();
    let b = FakeModelServer::start("b").await.unwrap();
    a.set_status(429);
    b.set_status(429);
    let gw = mk_gateway(&[a.addr(), b.addr()], cfg()).await;
    let (status, headers, body) = post_json(
        &gw.url(),
        "/v1/completions",
        &[],
        r#"{"model":"m","prompt":"x"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 429);
    assert!(String::from_utf8_lossy(&body).contains("set to answer 429"));
    assert_eq!(a.count() + b.count(), 2, "both endpoints tried once");
    let last = headers["x-served-by"].to_str().unwrap().to_string();
    let first_tried = if a.requests()[0].arrived < b.requests()[0].arrived {
        "a"
    } else {
        "b"
    };
    assert_ne!(last, first_tried, "the last answer is passed through");

    a.set_status(500);
    b.set_status(502);
    let (status, _, _) = post_json(
        &gw.url(),
        "/v1/completions",
        &[],
        r#"{"model":"m","prompt":"y"}"#,
    )
    .await
    .unwrap();
    assert!(status == 500 || status == 502, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_never_answers_gives_504_naming_the_timeout() {
    let hung = mk_sim(
        20.0,
        Faults {
            hang: true,
            ..Faults::default()
        },
    )
    .await;
    let gw = mk_gateway(
        &[hung.local_addr()],
        GatewayConfig {
            first_byte_timeout: Duration::from_millis(300),
            ..cfg()
        },
    )
    .await;
    let started = Instant::now();
    let (status, _, body) = post_json(&gw.url(), "/v1/chat/completions", &[], chat("hi", 5, false))
        .await
        .unwrap();
    assert_eq!(status, 504);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let e = error_of(&body);
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("300ms") && msg.contains("--first-byte-timeout"),
        "{msg}"
    );
    assert!(msg.contains(&hung.local_addr().to_string()), "{msg}");
    assert_eq!(e["type"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_ejects_a_failing_endpoint_and_lets_it_back_after_the_cooldown() {
    let bad = FakeModelServer::start("bad").await.unwrap();
    bad.set_status(500);
    let good = FakeModelServer::start("good").await.unwrap();
    let gw = mk_gateway(
        &[bad.addr(), good.addr()],
        GatewayConfig {
            breaker_failures: 2,
            breaker_cooldown: Duration::from_millis(400),
            ..cfg()
        },
    )
    .await;
    let send = |i: usize| {
        let url = gw.url();
        async move {
            let (status, headers, _) = post_json(
                &url,
                "/v1/completions",
                &[],
                format!(r#"{{"model":"m","prompt":"q{i}"}}"#),
            )
            .await
            .unwrap();
            assert_eq!(status, 200);
            headers["x-served-by"].to_str().unwrap().to_string()
        }
    };
    let mut i = 0;
    while bad.count() < 2 {
        send(i).await;
        i += 1;
        assert!(i < 200, "the bad endpoint was never picked");
    }
    let page = gateway_metrics(&gw).await;
    assert_eq!(metric_sum(&page, "infergate_gateway_ejections_total"), 1.0);
    // Ejected: nothing reaches it.
    let seen = bad.count();
    for _ in 0..20 {
        send(i).await;
        i += 1;
    }
    assert_eq!(bad.count(), seen, "an ejected endpoint got requests");

    // It recovers; after the cooldown one probe goes through and closes the breaker.
    bad.set_status(200);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut served_by_bad = 0;
    for _ in 0..40 {
        if send(i).await == "bad" {
            served_by_bad += 1;
        }
        i += 1;
    }
    assert!(
        served_by_bad >= 2,
        "the endpoint did not come back ({served_by_bad} of 40)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_the_replicas_slot() {
    let sim = mk_sim(1.0, Faults::default()).await;
    let gw = mk_gateway(&[sim.local_addr()], cfg()).await;
    let client = HttpClient::new();
    let (status, _, mut body) = client
        .post_json_stream(
            &gw.url(),
            "/v1/chat/completions",
            &[],
            chat("long", 2000, true),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    for _ in 0..3 {
        body.next_chunk().await.unwrap().unwrap();
    }
    assert_eq!(sim.stats().num_running, 1);
    drop(body);
    drop(client);
    assert!(
        eventually(Duration::from_secs(2), || async {
            sim.stats().num_running == 0
        })
        .await,
        "the replica still runs the abandoned request"
    );
    let page = gateway_metrics(&gw).await;
    assert_eq!(
        metric_sum(&page, "inference_objective_running_requests"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_requests_are_served() {
    let sim = mk_sim(20.0, Faults::default()).await;
    let gw = mk_gateway(&[sim.local_addr()], cfg()).await;
    let h2 = HttpClient::http2();
    let (status, _, body) = h2
        .post_json(&gw.url(), "/v1/chat/completions", &[], chat("hi", 4, false))
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let (status, _, body) = h2
        .post_json_stream(&gw.url(), "/v1/chat/completions", &[], chat("hi", 4, true))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body.concat().await.unwrap()).ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_stream_finish_and_refuses_new_connections() {
    let sim = mk_sim(1.0, Faults::default()).await;
    let mut gw = mk_gateway(&[sim.local_addr()], cfg()).await;
    let (status, _, body) = post_json_stream(
        &gw.url(),
        "/v1/chat/completions",
        &[],
        chat("story", 40, true),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let task = gw.stop();
    let all = body
        .concat()
        .await
        .expect("the stream finishes during shutdown");
    assert!(String::from_utf8_lossy(&all).ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returns once the stream is done")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_forwarded_with_a_request_id_and_a_rewritten_model_gets_a_new_length() {
    let up = FakeModelServer::start("up").await.unwrap();
    let ds = infergate_core::Datastore::new();
    ds.set_endpoints(vec![infergate_core::EndpointSpec::new(
        up.addr(),
        infergate_core::Engine::Vllm,
    )]);
    ds.set_policy(infergate_core::Policy {
        rewrites: vec![infergate_core::objective::Rewrite {
            source: "default/r".into(),
            rules: vec![infergate_core::objective::RewriteRule {
                matches: vec!["public".into()],
                targets: vec![infergate_core::objective::RewriteTarget {
                    model: "served-v2".into(),
                    weight: 1,
                }],
            }],
        }],
        ..Default::default()
    });
    ds.mark_synced();
    let gw = mk_gateway_on(ds, cfg()).await;
    let (status, headers, body) = post_json(
        &gw.url(),
        "/v1/completions?trace=1",
        &[
            ("x-request-id", "abc-123"),
            ("x-custom", "kept"),
            ("connection", "keep-alive, x-drop"),
            ("x-drop", "1"),
        ],
        r#"{"model":"public","prompt":"hi"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-request-id"], "abc-123");
    // The client sees the name it asked for, in JSON and in a stream.
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["model"], "public", "{answer}");
    let r = &up.requests()[0];
    assert_eq!(r.path, "/v1/completions?trace=1");
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(r.header("x-custom"), Some("kept"));
    assert_eq!(
        r.header("x-drop"),
        None,
        "a header named in Connection is hop-by-hop"
    );
    assert_eq!(r.header("host"), Some(up.addr().to_string().as_str()));
    assert_eq!(r.model().as_deref(), Some("served-v2"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );

    let (_, _, stream) = post_json_stream(
        &gw.url(),
        "/v1/completions",
        &[],
        r#"{"model":"public","prompt":"hi","stream":true,"max_tokens":3}"#,
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&stream.concat().await.unwrap()).into_owned();
    assert!(text.contains(r#""model":"public""#), "{text}");
    assert!(!text.contains("served-v2"), "{text}");
    up.clear_requests();

    // Without a client id one is made up, and sent both ways.
    let (_, headers, _) = post_json(
        &gw.url(),
        "/v1/completions",
        &[],
        r#"{"model":"m","prompt":"x"}"#,
    )
    .await
    .unwrap();
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(up.requests()[0].header("x-request-id"), Some(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_all_complete_and_leave_nothing_in_flight() {
    let sim = mk_sim(50.0, Faults::default()).await;
    let gw = mk_gateway(&[sim.local_addr()], cfg()).await;
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (url, ok) = (gw.url(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let (status, _, body) = post_json_stream(
                &url,
                "/v1/chat/completions",
                &[],
                chat(&format!("q{i}"), 20, true),
            )
            .await
            .unwrap();
            assert_eq!(status, 200);
            let all = body.concat().await.unwrap();
            if String::from_utf8_lossy(&all).ends_with("data: [DONE]\n\n") {
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ok.load(Ordering::Relaxed), 16);
    let page = gateway_metrics(&gw).await;
    assert_eq!(
        metric_sum(&page, "inference_objective_running_requests"),
        0.0
    );
    assert_eq!(
        metric_sum(&page, "inference_objective_input_tokens_count"),
        16.0
    );
    let (status, _, _) = get(&gw.url(), "/health").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_goes_quiet_is_ended_with_an_error_event_after_the_idle_timeout() {
    let (up, _t) = mk_upstream(|_req| async {
        let mut r = full(200, "text/event-stream", b"");
        *r.body_mut() = timed_body(vec![
            (Duration::ZERO, b"data: {\"n\":1}\n\n"),
            (Duration::from_secs(5), b"data: [DONE]\n\n"),
        ]);
        r
    })
    .await;
    let gw = mk_gateway(
        &[up],
        GatewayConfig {
            idle_stream_timeout: Duration::from_millis(200),
            ..cfg()
        },
    )
    .await;
    let started = Instant::now();
    let (status, _, body) =
        post_json_stream(&gw.url(), "/v1/chat/completions", &[], chat("x", 2, true))
            .await
            .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body.concat().await.unwrap()).into_owned();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        text.starts_with("data: {\"n\":1}\n\ndata: {\"error\""),
        "{text}"
    );
    assert!(
        text.contains("upstream_timeout") && text.contains("--idle-stream-timeout"),
        "{text}"
    );
    assert!(text.ends_with("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_json_answer_is_counted_as_complete_with_its_usage() {
    // hyper stops polling a body of known length once it has sent it all; the relay must
    // still book it as a completed request, not as a client that went away.
    let sim = mk_sim(20.0, Faults::default()).await;
    let gw = mk_gateway(&[sim.local_addr()], cfg()).await;
    let (status, _, body) = post_json(
        &gw.url(),
        "/v1/chat/completions",
        &[],
        chat("hello", 7, false),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let page = gateway_metrics(&gw).await;
    assert_eq!(
        metric_sum(&page, "inference_objective_output_tokens_sum"),
        7.0,
        "{page}"
    );
    assert_eq!(
        metric_sum(&page, "inference_objective_request_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        metric_sum(&page, "inference_objective_running_requests"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_first_tokens_teach_the_picker_each_endpoints_speed() {
    let sim = mk_sim(1.0, Faults::default()).await;
    let gw = mk_gateway(&[sim.local_addr()], cfg()).await;
    let endpoint = gw.datastore.snapshot().endpoints[0].clone();
    let later = Duration::from_secs(1_000_000);
    // Unstreamed answers arrive whole, long after their first token: no sample.
    for i in 0..3 {
        let (status, _, _) = post_json(
            &gw.url(),
            "/v1/chat/completions",
            &[],
            chat(&format!("u{i}"), 5, false),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(endpoint.latency().view(later).line, None);
    // Each stream's first bytes release its queued prefill and add one sample.
    for i in 0..4 {
        let (status, _, body) = post_json_stream(
            &gw.url(),
            "/v1/chat/completions",
            &[],
            chat(&format!("s{i}"), 5, true),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        body.concat().await.unwrap();
    }
    let v = endpoint.latency().view(later);
    let (line, weight, _) = v.line.expect("a fitted line after four streams");
    assert!(weight > 3.5 && weight <= 4.0, "{weight}");
    // A simulated H100 answers a short prompt in milliseconds, not seconds.
    assert!(line.at(50.0) > 0.0 && line.at(50.0) < 0.5, "{line:?}");
    assert_eq!((v.prefill_requests, v.prefill_tokens), (0, 0));
}

/// A replica that starts every stream and then breaks it off is ejected like one that
/// fails outright: its response heads must not count as successes that reset its
/// failures (found by the fault matrix: such a replica ended up with most of the traffic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_breaks_every_stream_after_its_head_is_ejected() {
    let breaking = mk_sim(
        20.0,
        Faults {
            drop_after_tokens: Some(2),
            ..Faults::default()
        },
    )
    .await;
    let good = mk_sim(20.0, Faults::default()).await;
    let gw = mk_gateway(
        &[breaking.local_addr(), good.local_addr()],
        GatewayConfig {
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(60),
            ..cfg()
        },
    )
    .await;
    let mut cut = 0;
    for i in 0..40 {
        let (status, _, body) = post_json_stream(
            &gw.url(),
            "/v1/chat/completions",
            &[],
            chat(&format!("question {i}"), 8, true),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body.concat().await.unwrap()).into_owned();
        if text.contains("broke off") {
            cut += 1;
        }
    }
    let page = gateway_metrics(&gw).await;
    assert_eq!(
        metric_sum(&page, "infergate_gateway_ejections_total"),
        1.0,
        "the breaking replica must be ejected ({cut} streams cut)\n{page}"
    );
    assert!(
        cut <= 3,
        "after the ejection no more streams are cut, got {cut}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_costs_a_streamed_request_only_the_short_head_limit() {
    let hung = mk_sim(
        20.0,
        Faults {
            hang: true,
            ..Faults::default()
        },
    )
    .await;
    let good = mk_sim(20.0, Faults::default()).await;
    let limit = Duration::from_millis(300);
    let gw = mk_gateway(
        &[hung.local_addr(), good.local_addr()],
        GatewayConfig {
            stream_first_byte_timeout: limit,
            // High, so that the hung replica stays in the pool and keeps being tried.
            breaker_failures: 100,
            ..cfg()
        },
    )
    .await;
    let timeouts = |page: &str| {
        metric_sum(
            page,
            "infergate_gateway_upstream_failures_total{reason=\"timeout\"}",
        )
    };
    let mut i = 0;
    while timeouts(&gateway_metrics(&gw).await) < 1.0 {
        assert!(i < 30, "the hung replica was never picked");
        let started = Instant::now();
        let (status, _, body) = post_json_stream(
            &gw.url(),
            "/v1/chat/completions",
            &[],
            chat(&format!("question {i}"), 2, true),
        )
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&body.concat().await.unwrap()).into_owned();
        let took = started.elapsed();
        assert_eq!(status, 200, "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        // The first-byte limit (300 s) never comes into it: at most the head limit, then
        // the healthy replica's answer.
        assert!(took < limit + Duration::from_millis(1500), "took {took:?}");
        i += 1;
    }
    let page = gateway_metrics(&gw).await;
    assert!(
        metric_sum(&page, "infergate_gateway_retries_total") >= 1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_request_to_only_a_hung_replica_gets_504_naming_the_stream_limit() {
    let hung = mk_sim(
        20.0,
        Faults {
            hang: true,
            ..Faults::default()
        },
    )
    .await;
    let gw = mk_gateway(
        &[hung.local_addr()],
        GatewayConfig {
            stream_first_byte_timeout: Duration::from_millis(300),
            first_byte_timeout: Duration::from_millis(1200),
            ..cfg()
        },
    )
    .await;
    let started = Instant::now();
    let (status, _, body) = post_json(&gw.url(), "/v1/chat/completions", &[], chat("hi", 5, true))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1200),
        "took {took:?}"
    );
    let e = error_of(&body);
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("300ms") && msg.contains("--stream-first-byte-timeout"),
        "{msg}"
    );
    assert!(msg.contains(&hung.local_addr().to_string()), "{msg}");
    assert_eq!(e["type"], "upstream_timeout");

    // A request that is not streamed is not held to the short limit.
    let started = Instant::now();
    let (status, _, body) = post_json(&gw.url(), "/v1/chat/completions", &[], chat("hi", 5, false))
        .await
        .unwrap();
    assert_eq!(status, 504);
    assert!(started.elapsed() >= Duration::from_millis(1200));
    let msg = error_of(&body)["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("--first-byte-timeout") && !msg.contains("--stream-first-byte-timeout"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_head_limit_does_not_cover_a_first_token_that_waits_in_a_queue() {
    // The head at once, the first token later than the head limit (a queued request).
    let (up, _t) = mk_upstream(|_req| async {
        let mut r = full(200, "text/event-stream", b"");
        *r.body_mut() = timed_body(vec![
            (Duration::from_millis(600), b"data: {\"n\":1}\n\n"),
            (Duration::ZERO, b"data: [DONE]\n\n"),
        ]);
        r
    })
    .await;
    let gw = mk_gateway(
        &[up],
        GatewayConfig {
            stream_first_byte_timeout: Duration::from_millis(200),
            ..cfg()
        },
    )
    .await;
    let (status, _, body) =
        post_json_stream(&gw.url(), "/v1/chat/completions", &[], chat("x", 2, true))
            .await
            .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body.concat().await.unwrap()).into_owned();
    assert_eq!(text, "data: {\"n\":1}\n\ndata: [DONE]\n\n");
}
