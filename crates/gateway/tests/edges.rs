//! What a client gets when something is wrong with its request or with the pool, and the
//! operational routes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use infergate_core::objective::{Objective, Rewrite, RewriteRule, RewriteTarget};
use infergate_core::{Datastore, EndpointSpec, Engine, Policy};
use infergate_gateway::{ApiKeys, GatewayConfig};
use infergate_testkit::{get, post_json, FakeModelServer, HttpClient};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Sends raw bytes, then waits up to 3 s for the whole answer (until the server closes or
/// `wait` passes after the head).
async fn raw(gw: &TestGateway, request: &[u8], then_wait: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(3) + then_wait;
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") => break,
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_a_missing_or_wrong_key_gets_401_and_the_key_never_reaches_upstream() {
    let up = FakeModelServer::start("up").await.unwrap();
    let gw = mk_gateway(
        &[up.addr()],
        GatewayConfig {
            api_keys: Some(ApiKeys::from_env_value("secret").unwrap()),
            ..GatewayConfig::default()
        },
    )
    .await;
    let body = r#"{"model":"m","prompt":"x"}"#;
    for headers in [
        vec![],
        vec![("authorization", "Bearer nope")],
        vec![("authorization", "secret")],
    ] {
        let (status, h, b) = post_json(&gw.url(), "/v1/completions", &headers, body)
            .await
            .unwrap();
        assert_eq!(status, 401);
        assert_eq!(h["www-authenticate"], "Bearer");
        let e = error_of(&b);
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains("api key"),
            "{e}"
        );
        assert_eq!(e["type"], "authentication_error");
        assert_eq!(e["code"], 401);
        assert!(e["param"].is_null());
    }
    let (status, _, _) = get(&gw.url(), "/v1/models").await.unwrap();
    assert_eq!(status, 401);
    assert_eq!(up.count(), 0);

    let (status, _, _) = post_json(
        &gw.url(),
        "/v1/completions",
        &[("authorization", "Bearer secret")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(up.requests()[0].header("authorization"), None);
    // Probes and Prometheus need no key.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(&gw.url(), path).await.unwrap().0, 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_default_objective_applies_unless_the_header_names_one() {
    let up = FakeModelServer::start("up").await.unwrap();
    let ds = Datastore::new();
    ds.set_endpoints(vec![EndpointSpec::new(up.addr(), Engine::Vllm)]);
    ds.set_policy(Policy {
        objectives: vec![Objective {
            name: "interactive".into(),
            priority: 5,
        }],
        ..Default::default()
    });
    ds.mark_synced();
    let gw = mk_gateway_on(
        ds,
        GatewayConfig {
            api_keys: Some(ApiKeys::from_env_value("k1:no-such-objective,k2:interactive").unwrap()),
            ..GatewayConfig::default()
        },
    )
    .await;
    let body = r#"{"model":"m","prompt":"x"}"#;
    let (status, _, b) = post_json(
        &gw.url(),
        "/v1/completions",
        &[("authorization", "Bearer k1")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    assert!(error_of(&b)["message"]
        .as_str()
        .unwrap()
        .contains("no-such-objective"));
    let (status, _, _) = post_json(
        &gw.url(),
        "/v1/completions",
        &[
            ("authorization", "Bearer k1"),
            ("x-gateway-inference-objective", "interactive"),
        ],
        body,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = post_json(
        &gw.url(),
        "/v1/completions",
        &[("authorization", "Bearer k2")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let page = gateway_metrics(&gw).await;
    assert_eq!(
        metric_sum(&page, "inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"5\"}"),
        2.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_naming_the_limit_and_the_flag() {
    let up = FakeModelServer::start("up").await.unwrap();
    let gw = mk_gateway(
        &[up.addr()],
        GatewayConfig {
            max_body_bytes: 1000,
            ..GatewayConfig::default()
        },
    )
    .await;
    // Declared too large: refused without reading it (8 MB the client is still sending).
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "a".repeat(50 << 20));
    let (status, _, b) = post_json(&gw.url(), "/v1/completions", &[], big)
        .await
        .unwrap();
    assert_eq!(status, 413);
    let msg = error_of(&b)["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("1000") && msg.contains("--max-body-bytes"),
        "{msg}"
    );

    // Chunked, no length: refused once it passes the limit.
    let chunk = "a".repeat(1500);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let answer = raw(&gw, req.as_bytes(), Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("--max-body-bytes"), "{answer}");
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_arrives_too_slowly_gets_408() {
    let up = FakeModelServer::start("up").await.unwrap();
    let gw = mk_gateway(
        &[up.addr()],
        GatewayConfig {
            body_read_timeout: Duration::from_millis(200),
            ..GatewayConfig::default()
        },
    )
    .await;
    let answer = raw(
        &gw,
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"model\"",
        Duration::from_millis(300),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("200ms") && answer.contains("--body-read-timeout"),
        "{answer}"
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_wrong_methods_and_bad_bodies_get_json_errors() {
    let up = FakeModelServer::start("up").await.unwrap();
    let gw = mk_gateway(&[up.addr()], GatewayConfig::default()).await;
    let (status, _, b) = get(&gw.url(), "/v1/nothing").await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(error_of(&b)["type"], "not_found_error");
    let (status, h, b) = get(&gw.url(), "/v1/chat/completions").await.unwrap();
    assert_eq!(status, 405);
    assert_eq!(h["allow"], "POST");
    assert!(error_of(&b)["message"]
        .as_str()
        .unwrap()
        .contains("use POST"));
    let (status, _, b) = post_json(&gw.url(), "/v1/chat/completions", &[], "{not json")
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(error_of(&b)["message"]
        .as_str()
        .unwrap()
        .to_lowercase()
        .contains("json"));
    let (status, _, b) = post_json(&gw.url(), "/v1/chat/completions", &[], r#"{"messages":[]}"#)
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(error_of(&b)["message"].as_str().unwrap().contains("model"));
    assert_eq!(up.count(), 0);
    // A model server's own 4xx is passed through unchanged, not retried.
    up.set_status(404);
    let (status, h, b) = post_json(
        &gw.url(),
        "/v1/completions",
        &[],
        r#"{"model":"gpt-9","prompt":"x"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    assert_eq!(h["x-served-by"], "up");
    assert!(String::from_utf8_lossy(&b).contains("set to answer 404"));
    assert_eq!(up.count(), 1);
    let page = gateway_metrics(&gw).await;
    assert_eq!(
        metric_sum(&page, "infergate_gateway_requests_total{code=\"400\"}"),
        2.0,
        "{page}"
    );
    assert_eq!(
        metric_sum(&page, "inference_objective_request_error_total{model_name=\"\",target_model_name=\"\",error_code=\"BadRequest\"}"),
        2.0
    );
    assert_eq!(
        metric_sum(&page, "inference_objective_request_error_total{model_name=\"gpt-9\",target_model_name=\"gpt-9\",error_code=\"ModelServerError404\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_with_a_reason_until_the_pool_has_an_endpoint() {
    let ds = Datastore::new();
    let gw = mk_gateway_on(ds.clone(), GatewayConfig::default()).await;
    let (status, _, b) = get(&gw.url(), "/ready").await.unwrap();
    assert_eq!(status, 503);
    assert!(error_of(&b)["message"]
        .as_str()
        .unwrap()
        .contains("not been loaded"));
    ds.mark_synced();
    let (status, _, b) = get(&gw.url(), "/ready").await.unwrap();
    assert_eq!(status, 503);
    assert!(error_of(&b)["message"]
        .as_str()
        .unwrap()
        .contains("no ready endpoints"));
    assert_eq!(get(&gw.url(), "/health").await.unwrap().0, 200);
    // With no endpoint, inference is 503 from the Director.
    let (status, _, b) = post_json(
        &gw.url(),
        "/v1/completions",
        &[],
        r#"{"model":"m","prompt":"x"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 503);
    assert_eq!(error_of(&b)["type"], "service_unavailable");

    let up = FakeModelServer::start("up").await.unwrap();
    ds.set_endpoints(vec![EndpointSpec::new(up.addr(), Engine::Vllm)]);
    assert_eq!(get(&gw.url(), "/ready").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_merged_over_the_pool_with_the_rewrite_names() {
    let a = FakeModelServer::start("a").await.unwrap();
    let b = FakeModelServer::start("b").await.unwrap();
    a.set_metrics_model("llama");
    b.set_metrics_model("qwen");
    let dead = dead_addr().await;
    let ds = Datastore::new();
    ds.set_endpoints(
        [a.addr(), b.addr(), dead]
            .iter()
            .map(|x| EndpointSpec::new(*x, Engine::Vllm))
            .collect(),
    );
    ds.set_policy(Policy {
        rewrites: vec![Rewrite {
            source: "default/r".into(),
            rules: vec![RewriteRule {
                matches: vec!["public".into(), "llama".into()],
                targets: vec![RewriteTarget {
                    model: "llama".into(),
                    weight: 1,
                }],
            }],
        }],
        ..Default::default()
    });
    ds.mark_synced();
    let gw = mk_gateway_on(ds, GatewayConfig::default()).await;
    let (status, _, body) = get(&gw.url(), "/v1/models").await.unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["llama", "public", "qwen"]);
    assert_eq!(v["object"], "list");

    // Cached for a moment: a new model on a replica shows up after the TTL.
    b.set_metrics_model("mistral");
    let (_, _, again) = get(&gw.url(), "/v1/models").await.unwrap();
    assert_eq!(again, body);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, _, later) = get(&gw.url(), "/v1/models").await.unwrap();
    assert!(String::from_utf8_lossy(&later).contains("mistral"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_request_headers_are_refused() {
    let up = FakeModelServer::start("up").await.unwrap();
    let gw = mk_gateway(
        &[up.addr()],
        GatewayConfig {
            max_headers: 8,
            ..GatewayConfig::default()
        },
    )
    .await;
    let headers: Vec<(String, String)> = (0..20).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let status = match HttpClient::new()
        .post_json(
            &gw.url(),
            "/v1/completions",
            &headers,
            r#"{"model":"m","prompt":"x"}"#,
        )
        .await
    {
        Ok((s, _, _)) => s.as_u16(),
        Err(_) => 0, // the connection was closed instead: also refused
    };
    assert!(status == 431 || status == 0, "{status}");
    assert_eq!(up.count(), 0);
}
