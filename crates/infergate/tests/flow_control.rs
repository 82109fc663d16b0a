//! Flow control (feature gate `flowControl`), through both modes: `epp` behind a real
//! Envoy and `serve`. The model servers are the testkit's fake vLLM servers, whose
//! `/metrics` the test sets, so the pool's load is exact: a request waits while the pool is
//! saturated, the best priority leaves the queue first, sheddable work is refused at once,
//! and a request that waits too long gets 503.

mod common;

use std::time::{Duration, Instant};

use common::*;
use infergate_testkit::{get, post_json, FakeModelServer};

/// One waiting request per endpoint saturates (queueDepthThreshold 1), so the test decides
/// exactly how many requests the pool has room for.
const CONFIG: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
flowControl:
  defaultRequestTTL: 1500ms
plugins:
- type: utilization-detector
  parameters: {queueDepthThreshold: 1}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"#;

const POOL: &str = r#"
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

/// Where requests go and where the router's metrics are.
struct Target<'a> {
    url: String,
    metrics_url: String,
    backends: &'a [FakeModelServer],
}

async fn send(url: &str, objective: Option<&str>, prompt: &str) -> (u16, String, Instant) {
    let headers: Vec<(&str, &str)> = objective
        .map(|o| vec![("x-gateway-inference-objective", o)])
        .unwrap_or_default();
    let (status, _, body) = post_json(url, "/v1/completions", &headers, completion("m", prompt))
        .await
        .unwrap();
    (
        status.as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
        Instant::now(),
    )
}

async fn metric(t: &Target<'_>, name: &str) -> f64 {
    let (_, _, page) = get(&t.metrics_url, "/metrics").await.unwrap();
    metric_sum(&String::from_utf8_lossy(&page), name)
}

async fn scenario(t: &Target<'_>) {
    // Every endpoint has two waiting: saturated (score 2 against 1).
    for b in t.backends {
        b.set_state(2, 4, 0.2);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Sheddable work is refused at once, not queued.
    let t0 = Instant::now();
    let (status, body, _) = send(&t.url, Some("batch"), "shed me").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("not queued"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    // A priority-0 request, then an interactive one, both wait.
    let url = t.url.clone();
    let low = tokio::spawn(async move { send(&url, None, "low").await });
    assert!(
        infergate_testkit::poll::eventually(Duration::from_secs(5), || async {
            metric(t, "inference_extension_flow_control_queue_size").await == 1.0
        })
        .await,
        "the priority-0 request never showed up in the queue"
    );
    let url = t.url.clone();
    let high = tokio::spawn(async move { send(&url, Some("interactive"), "high").await });
    assert!(
        infergate_testkit::poll::eventually(Duration::from_secs(5), || async {
            metric(t, "inference_extension_flow_control_queue_size").await == 2.0
        })
        .await,
        "the interactive request never showed up in the queue"
    );
    assert_eq!(t.backends.iter().map(|b| b.count()).sum::<usize>(), 0);

    // Room for one: the interactive request leaves first although it came second. The
    // backends answer slowly, so while it runs its endpoint counts it and the pool stays
    // full; the priority-0 request goes only when it is done.
    for b in t.backends {
        b.set_delay(Duration::from_millis(400));
    }
    t.backends[0].set_state(1, 4, 0.2);
    t.backends[1].set_state(1, 4, 0.2);
    // Nothing running there either, so the picker's own in-flight count is all it has.
    t.backends[2].set_state(0, 0, 0.2);
    let (hs, hbody, h_done) = high.await.unwrap();
    let (ls, lbody, l_done) = low.await.unwrap();
    assert_eq!(hs, 200, "{hbody}");
    assert_eq!(ls, 200, "{lbody}");
    assert!(
        l_done > h_done + Duration::from_millis(300),
        "the priority-0 request finished {:?} after the interactive one; it should have waited for it",
        l_done.saturating_duration_since(h_done)
    );
    let served: Vec<String> = t.backends[2]
        .requests()
        .iter()
        .filter_map(|r| r.json())
        .map(|j| j["prompt"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        served,
        ["high", "low"],
        "release order at the endpoint with room"
    );

    // Saturated again: a request waits its time limit and gets 503 saying so.
    t.backends[2].set_state(2, 4, 0.2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (status, body, _) = send(&t.url, None, "too late").await;
    let waited = t0.elapsed();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("defaultRequestTTL"), "{body}");
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5),
        "waited {waited:?}, the limit is 1.5 s"
    );
    let (_, _, page) = get(&t.metrics_url, "/metrics").await.unwrap();
    let page = String::from_utf8_lossy(&page);
    let waits = |outcome: &str| -> f64 {
        page.lines()
            .filter(|l| {
                l.starts_with(
                    "inference_extension_flow_control_request_queue_duration_seconds_count",
                ) && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(waits("dispatched"), 2.0, "{page}");
    assert_eq!(waits("expired"), 1.0, "{page}");
    assert_eq!(waits("rejected"), 1.0, "{page}");
    // The gauge follows the queue within the release loop's 50 ms idle period.
    assert!(
        infergate_testkit::poll::eventually(Duration::from_secs(2), || async {
            metric(t, "inference_extension_flow_control_queue_size").await == 0.0
        })
        .await,
        "the queue-size gauge should return to 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_behind_envoy_queues_by_priority_sheds_and_expires() {
    let rig = Rig::start(RigOptions {
        config_yaml: Some(CONFIG.into()),
        pool_yaml: Some(POOL.into()),
        // Envoy's default. In FULL_DUPLEX_STREAMED mode it does not bound the time the
        // picker takes to answer the body, so requests may wait longer than this.
        message_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    let t = Target {
        url: rig.envoy.url(),
        metrics_url: format!("http://{}", rig.epp.metrics),
        backends: &rig.backends,
    };
    scenario(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_queues_by_priority_sheds_and_expires() {
    let mut backends = Vec::new();
    for i in 0..3 {
        backends.push(FakeModelServer::start(&format!("b{i}")).await.unwrap());
    }
    let dir = std::env::temp_dir().join(format!("infergate-flow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (pool, config) = (dir.join("pool.yaml"), dir.join("config.yaml"));
    std::fs::write(&pool, fill_addrs(POOL, &backends)).unwrap();
    std::fs::write(&config, CONFIG).unwrap();
    let serve = Serve::start(&[
        "--pool-file",
        pool.to_str().unwrap(),
        "--config-file",
        config.to_str().unwrap(),
    ]);
    let t = Target {
        url: serve.url(),
        metrics_url: serve.url(),
        backends: &backends,
    };
    scenario(&t).await;
    let _ = std::fs::remove_dir_all(&dir);
}
