//! End-to-end: real Envoy 1.40 with the ext_proc filter -> `infergate epp` -> fake vLLM
//! servers on 127.0.0.1. Each test asserts routing a user of the picker would see.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures::future::join_all;
use infergate_testkit::{post_json, post_json_stream, BodyMode, HttpClient};

const PATH: &str = "/v1/completions";

async fn send(rig: &Rig, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Option<usize>, Vec<u8>) {
    let (status, h, b) = post_json(&rig.envoy.url(), PATH, headers, body)
        .await
        .unwrap();
    let who = h
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .and_then(|n| rig.index_of(n));
    (status.as_u16(), who, b.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_with_long_queue_gets_no_traffic_while_others_idle() {
    let rig = Rig::start(RigOptions::default()).await;
    rig.backends[0].set_state(40, 8, 0.9);
    rig.backends[1].set_state(0, 1, 0.1);
    rig.backends[2].set_state(0, 1, 0.1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = [0; 3];
    for i in 0..30 {
        let (status, who, _) = send(
            &rig,
            &[],
            completion("m", &format!("prompt {i} {}", "z".repeat(i))),
        )
        .await;
        assert_eq!(status, 200);
        seen[who.unwrap()] += 1;
    }
    assert_eq!(seen[0], 0, "busy backend got traffic: {seen:?}");
    assert!(
        seen[1] > 0 && seen[2] > 0,
        "idle backends should share: {seen:?}"
    );
    // Every decision and every plugin call shows in the picker's metrics.
    let m = rig.epp.metrics_text().await;
    assert_eq!(
        metric_sum(
            &m,
            "inference_extension_scheduler_e2e_duration_seconds_count"
        ),
        30.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "inference_objective_request_total{"),
        30.0,
        "{m}"
    );
    let queue_timed = m
        .lines()
        .find(|l| {
            l.starts_with("inference_extension_plugin_duration_seconds_count")
                && l.contains("plugin_type=\"queue-scorer\"")
        })
        .unwrap_or_else(|| panic!("no queue-scorer timing in\n{m}"));
    assert!(queue_timed.ends_with(" 30"), "{queue_timed}");
    assert!(m.contains("\ninference_extension_info{"), "{m}");
    // Pool gauges refresh every second.
    let mut ready = String::new();
    for _ in 0..30 {
        ready = rig.epp.metrics_text().await;
        if ready.contains("\ninference_pool_ready_pods{name=\"infergate\"} 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready.contains("\ninference_pool_ready_pods{name=\"infergate\"} 3"),
        "{ready}"
    );
}

const LORA_CONFIG: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: lora-affinity-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: lora-affinity-scorer
    weight: 5
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: max-score-picker
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_requests_go_to_the_backend_with_the_adapter_loaded() {
    let rig = Rig::start(RigOptions {
        config_yaml: Some(LORA_CONFIG.into()),
        ..Default::default()
    })
    .await;
    rig.backends[0].set_loras(&["other-a"], &[], 1);
    rig.backends[1].set_loras(&["sql-lora"], &[], 2);
    rig.backends[2].set_loras(&["other-b"], &[], 1);
    // The adapter's host is a little busier; affinity must still win.
    rig.backends[1].set_state(1, 2, 0.3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        let (status, who, _) =
            send(&rig, &[], completion("sql-lora", &format!("select {i}"))).await;
        assert_eq!((status, who), (200, Some(1)), "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_requests_stick_while_unrelated_prompts_spread() {
    let rig = Rig::start(RigOptions::default()).await;
    for b in &rig.backends {
        b.set_state(0, 0, 0.1);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let system = "You are a careful assistant that answers in French. ".repeat(80); // ~4 KB
    let mut shared = HashMap::new();
    for i in 0..20 {
        let (status, who, _) = send(
            &rig,
            &[],
            completion("m", &format!("{system}Question {i}?")),
        )
        .await;
        assert_eq!(status, 200);
        *shared.entry(who.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        shared.len(),
        1,
        "20 requests with one 4 KB prefix landed on {shared:?}"
    );
    let mut spread = HashMap::new();
    for i in 0..30 {
        let (_, who, _) = send(
            &rig,
            &[],
            completion("m", &format!("{i}: unrelated {}", "w".repeat(i * 13))),
        )
        .await;
        *spread.entry(who.unwrap()).or_insert(0) += 1;
    }
    assert!(
        spread.len() >= 2,
        "unrelated prompts all went to one backend: {spread:?}"
    );
}

const ROLLOUT_POOL: &str = r#"
apiVersion: infergate.dev/v1alpha1
kind: StaticEndpoints
metadata: {name: pool}
spec:
  endpoints:
  - {address: "{B0}", port: {P0}}
  - {address: "{B1}", port: {P1}}
  - {address: "{B2}", port: {P2}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: rollout}
spec:
  poolRef: {name: pool}
  rules:
  - matches:
    - model: {type: Exact, value: public-chat}
    targets:
    - {modelRewrite: chat-v1, weight: 70}
    - {modelRewrite: chat-v2, weight: 30}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec:
  priority: -1
  poolRef: {name: pool}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: interactive}
spec:
  priority: 10
  poolRef: {name: pool}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_rewrite_splits_70_30_and_responses_keep_the_asked_name() {
    weighted_rewrite_scenario(false).await;
}

/// The same scenario, with the rewrite read from the Kubernetes API (Kubernetes mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_rewrite_from_kubernetes_objects_splits_70_30_too() {
    weighted_rewrite_scenario(true).await;
}

async fn weighted_rewrite_scenario(kubernetes: bool) {
    let rig = Rig::start(RigOptions {
        pool_yaml: Some(ROLLOUT_POOL.into()),
        kubernetes,
        ..Default::default()
    })
    .await;
    let mut v1 = 0;
    for i in 0..400 {
        let (status, _, body) =
            send(&rig, &[], completion("public-chat", &format!("hi {i}"))).await;
        assert_eq!(status, 200);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["model"], "public-chat",
            "response must carry the asked name: {json}"
        );
    }
    let mut other = 0;
    for b in &rig.backends {
        for r in b.requests() {
            match r.model().as_deref() {
                Some("chat-v1") => v1 += 1,
                Some("chat-v2") => {}
                m => other += usize::from(m.is_some()),
            }
        }
    }
    assert_eq!(other, 0);
    let share = v1 as f64 / 400.0;
    assert!(
        (0.63..=0.77).contains(&share),
        "chat-v1 share {share} not within 7 points of 0.70"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sheddable_work_gets_429_when_every_backend_is_saturated() {
    shedding_scenario(false).await;
}

/// The same scenario, with the objectives and Pods read from the Kubernetes API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sheddable_work_named_by_a_kubernetes_objective_gets_429_too() {
    shedding_scenario(true).await;
}

async fn shedding_scenario(kubernetes: bool) {
    let rig = Rig::start(RigOptions {
        pool_yaml: Some(ROLLOUT_POOL.into()),
        kubernetes,
        ..Default::default()
    })
    .await;
    for b in &rig.backends {
        b.set_state(12, 16, 0.95);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, body) = send(
        &rig,
        &[("x-gateway-inference-objective", "batch")],
        completion("m", "x"),
    )
    .await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("saturated"));
    let (status, _, _) = send(
        &rig,
        &[("x-gateway-inference-objective", "interactive")],
        completion("m", "x"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = send(&rig, &[], completion("m", "x")).await;
    assert_eq!(status, 200, "priority 0 (no objective) is served");
    // Room again: sheddable work is served.
    rig.backends[0].set_state(0, 0, 0.1);
    rig.backends[1].set_state(0, 0, 0.1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, _) = send(
        &rig,
        &[("x-gateway-inference-objective", "batch")],
        completion("m", "x"),
    )
    .await;
    assert_eq!(status, 200);
}

const CONFORMANCE_CONFIG: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_selection_header_restricts_the_pick_and_served_endpoint_is_reported() {
    let rig = Rig::start(RigOptions {
        config_yaml: Some(CONFORMANCE_CONFIG.into()),
        ..Default::default()
    })
    .await;
    for targets in [vec![1usize], vec![0, 2]] {
        let sel: Vec<String> = targets
            .iter()
            .map(|&i| rig.backends[i].addr().to_string())
            .collect();
        let sel = sel.join(",");
        let url = rig.envoy.url();
        let client = HttpClient::new();
        let mut seen = [0; 3];
        for batch in 0..10 {
            let futs = (0..10).map(|i| {
                let (client, url, sel) = (client.clone(), url.clone(), sel.clone());
                async move {
                    client
                        .post_json(
                            &url,
                            PATH,
                            &[("test-epp-endpoint-selection", sel.as_str())],
                            completion("m", &format!("{batch}-{i}")),
                        )
                        .await
                        .unwrap()
                }
            });
            for (status, h, b) in join_all(futs).await {
                assert_eq!(status.as_u16(), 200, "{}", String::from_utf8_lossy(&b));
                let who = rig.index_of(h["x-served-by"].to_str().unwrap()).unwrap();
                let served = h
                    .get("x-conformance-test-served-endpoint")
                    .expect("served endpoint header");
                assert_eq!(
                    served.to_str().unwrap(),
                    rig.backends[who].addr().to_string()
                );
                seen[who] += 1;
            }
        }
        for (i, n) in seen.iter().enumerate() {
            assert_eq!(
                *n > 0,
                targets.contains(&i),
                "selection {targets:?} gave {seen:?}"
            );
        }
        assert_eq!(seen.iter().sum::<usize>(), 100);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_keeps_serving_without_the_picker_and_fail_close_refuses() {
    for allow in [true, false] {
        // Envoy must know the picker is gone before it streams a body to it; with full duplex a
        // connection refused after the body started is a 500 even with failure_mode_allow.
        let mut rig = Rig::start(RigOptions {
            failure_mode_allow: allow,
            envoy_health_check: true,
            ..Default::default()
        })
        .await;
        assert_eq!(send(&rig, &[], completion("m", "up")).await.0, 200);
        rig.epp.kill();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        for i in 0..5 {
            let (status, _, body) = send(&rig, &[], completion("m", &format!("down {i}"))).await;
            if allow {
                assert_eq!(status, 200, "FailOpen must keep answering");
            } else {
                assert!(status >= 500, "FailClose must refuse, got {status}");
                // Not Envoy's bare, empty 500: a JSON error that names the picker.
                let text = String::from_utf8_lossy(&body);
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("FailClose body is not JSON ({e}): {text:?}"));
                assert_eq!(
                    v["error"]["type"],
                    infergate_testkit::envoy::PICKER_UNAVAILABLE_TYPE,
                    "{text}"
                );
                assert_eq!(v["error"]["code"], status, "{text}");
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("endpoint picker is unavailable")),
                    "{text}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let rig = Rig::start(RigOptions::default()).await;
    let (status, _, body) = send(&rig, &[], b"{\"model\": \"m\", \"prompt\": ".to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("not valid JSON"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, _, body) = send(&rig, &[], br#"{"prompt":"hello"}"#.to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("\\\"model\\\""),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, _, body) = send(
        &rig,
        &[("x-gateway-inference-objective", "nope")],
        completion("m", "x"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("nope"));
    assert_eq!(
        rig.counts().iter().sum::<usize>(),
        0,
        "refused requests must not reach a backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_body_arrives_byte_for_byte() {
    for mode in [BodyMode::FullDuplexStreamed, BodyMode::Buffered] {
        let rig = Rig::start(RigOptions {
            request_body_mode: mode,
            ..Default::default()
        })
        .await;
        let prompt: String = (0..10 * 1024 * 1024 / 16)
            .map(|i| format!("{:015x} ", i))
            .collect();
        let body = completion("m", &prompt);
        assert!(body.len() > 10 * 1024 * 1024);
        let (status, who, _) = send(&rig, &[], body.clone()).await;
        assert_eq!(status, 200, "mode {mode:?}");
        let got = rig.backends[who.unwrap()].requests().pop().unwrap();
        assert_eq!(got.body.len(), body.len());
        assert!(
            got.body.as_ref() == body.as_slice(),
            "body changed in transit (mode {mode:?})"
        );
        // Envoy 1.40 re-frames a full-duplex processed body as chunked whatever length the
        // picker sets; when a length does arrive it must be the true one.
        match got.header("content-length") {
            Some(cl) => assert_eq!(cl.parse::<usize>().unwrap(), body.len(), "mode {mode:?}"),
            None => assert_eq!(
                got.header("transfer-encoding"),
                Some("chunked"),
                "mode {mode:?}"
            ),
        }
        eprintln!(
            "mode {mode:?}: content-length {:?}",
            got.header("content-length")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_supplied_destination_header_is_ignored() {
    let rig = Rig::start(RigOptions::default()).await;
    rig.backends[0].set_state(50, 10, 0.95); // the picker never chooses it
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forged = rig.backends[0].addr().to_string();
    for i in 0..10 {
        let (status, who, _) = send(
            &rig,
            &[("x-gateway-destination-endpoint", forged.as_str())],
            completion("m", &format!("f{i}")),
        )
        .await;
        assert_eq!(status, 200);
        assert_ne!(who, Some(0), "a client-chosen destination was obeyed");
    }
}

const EMPTY_POOL: &str = r#"
apiVersion: infergate.dev/v1alpha1
kind: StaticEndpoints
metadata: {name: pool}
spec:
  endpoints: []
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ready_endpoint_is_503() {
    let rig = Rig::start(RigOptions {
        pool_yaml: Some(EMPTY_POOL.into()),
        ..Default::default()
    })
    .await;
    let (status, _, body) = send(&rig, &[], completion("m", "x")).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("no ready endpoints"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_passes_through_unchanged_and_usage_is_counted() {
    let rig = Rig::start(RigOptions::default()).await;
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "m", "prompt": "count to five", "max_tokens": 5, "stream": true,
        "stream_options": {"include_usage": true}
    }))
    .unwrap();
    let (status, h, stream) = post_json_stream(&rig.envoy.url(), PATH, &[], body.clone())
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200);
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .contains("text/event-stream"));
    let who = rig.index_of(h["x-served-by"].to_str().unwrap()).unwrap();
    let chunks = stream.collect_chunks().await.unwrap();
    let via_envoy: Vec<u8> = chunks.concat();
    // The same request straight to the backend that served it gives the same bytes.
    let (_, _, direct) = post_json(&rig.backends[who].url(), PATH, &[], body)
        .await
        .unwrap();
    // Only the completion id (a per-request counter) and `created` (the second it was
    // made; the two requests may straddle a second) may differ.
    let first_event = |b: &[u8]| -> serde_json::Value {
        let first = String::from_utf8_lossy(b)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        serde_json::from_str(first.trim_start_matches("data: ")).unwrap()
    };
    let (d, e) = (first_event(&direct), first_event(&via_envoy));
    let direct = String::from_utf8_lossy(&direct)
        .replace(d["id"].as_str().unwrap(), e["id"].as_str().unwrap())
        .replace(
            &format!("\"created\":{}", d["created"]),
            &format!("\"created\":{}", e["created"]),
        );
    assert_eq!(String::from_utf8_lossy(&via_envoy), direct);
    let text = String::from_utf8_lossy(&via_envoy);
    let usage_line = text
        .lines()
        .find(|l| l.contains("\"usage\":{"))
        .expect("usage chunk");
    let usage: serde_json::Value =
        serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
    let prompt_tokens = usage["usage"]["prompt_tokens"].as_f64().unwrap();
    let completion_tokens = usage["usage"]["completion_tokens"].as_f64().unwrap();
    let mut ok = false;
    for _ in 0..40 {
        let m = rig.epp.metrics_text().await;
        if metric_sum(&m, "inference_objective_input_tokens_sum") == prompt_tokens
            && metric_sum(&m, "inference_objective_output_tokens_sum") == completion_tokens
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ok,
        "usage not in picker metrics:\n{}",
        rig.epp.metrics_text().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_within_one_scrape_interval_spreads_over_idle_backends() {
    let rig = Rig::start(RigOptions {
        backends: 4,
        ..Default::default()
    })
    .await;
    // Backend 0 looks best in every scrape; all are really idle and slow to answer.
    rig.backends[0].set_state(0, 0, 0.1);
    for b in &rig.backends[1..] {
        b.set_state(1, 0, 0.1);
    }
    for b in &rig.backends {
        b.set_delay(Duration::from_millis(600));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = HttpClient::new();
    let url = rig.envoy.url();
    let futs = (0..40).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post_json(
                    &url,
                    PATH,
                    &[],
                    completion("m", &format!("burst {i} {}", "y".repeat(i * 11))),
                )
                .await
                .unwrap()
        }
    });
    let results = join_all(futs).await;
    assert!(results.iter().all(|(s, _, _)| s.as_u16() == 200));
    let counts = rig.counts();
    let max = *counts.iter().max().unwrap();
    assert!(
        counts.iter().all(|&c| c > 0) && max <= 16,
        "burst piled up: {counts:?}"
    );
}
