//! `infergate epp` in Kubernetes mode behind a real Envoy, fed by a scripted Kubernetes API
//! server (`infergate_testkit::kube_api`; no real API server can run here). Pods are fake
//! model servers on 127.0.0.2 and 127.0.0.3 sharing the pool's one target port, as Pods of
//! a pool do; Pods turning ready, unready and deleted change where requests go.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use infergate_testkit::kube_api::{
    kubeconfig, pod, pool, serve, FakeKubeApi, NS, OBJECTIVES, PODS, POOLS, REWRITES,
};
use infergate_testkit::{free_port, post_json, Envoy, EnvoyConfig, FakeModelServer};

async fn served_by(envoy: &Envoy, n: usize) -> BTreeSet<String> {
    let mut who = BTreeSet::new();
    for i in 0..n {
        let body = format!(r#"{{"model":"fake-model","prompt":"hello {i}","max_tokens":2}}"#);
        let (status, h, _) = post_json(&envoy.url(), "/v1/completions", &[], body)
            .await
            .unwrap();
        assert_eq!(status, 200);
        who.insert(h["x-served-by"].to_str().unwrap().to_owned());
    }
    who
}

async fn eventually_served_by(envoy: &Envoy, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let mut last = BTreeSet::new();
    for _ in 0..40 {
        last = served_by(envoy, 12).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("requests went to {last:?}, expected {want:?}");
}

/// Waits (at most 10 s) for the picker's readiness to be SERVING.
async fn wait_ready(epp: &Epp) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if epp.is_ready().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A scripted API server with `pods` and empty objective and rewrite lists, and a
/// kubeconfig file for it.
async fn api_with(
    pods: Vec<serde_json::Value>,
    pools: Option<Vec<serde_json::Value>>,
) -> (FakeKubeApi, tokio::task::JoinHandle<()>, std::path::PathBuf) {
    let api = FakeKubeApi::default();
    if let Some(pools) = pools {
        api.set_list(POOLS, pools);
    }
    api.set_list(PODS, pods);
    api.set_list(OBJECTIVES, vec![]);
    api.set_list(REWRITES, vec![]);
    let (addr, server) = serve(api.clone()).await;
    let cfg = std::env::temp_dir().join(format!(
        "infergate-kubeconfig-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::write(&cfg, kubeconfig(addr, NS)).unwrap();
    (api, server, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_turning_ready_unready_and_deleted_steer_traffic_through_envoy() {
    let port = free_port();
    let a = FakeModelServer::start_on("pod-a", ([127, 0, 0, 2], port).into())
        .await
        .unwrap();
    let b = FakeModelServer::start_on("pod-b", ([127, 0, 0, 3], port).into())
        .await
        .unwrap();

    let api = FakeKubeApi::default();
    api.set_list(POOLS, vec![pool(port)]);
    api.set_list(
        PODS,
        vec![
            pod("a", "127.0.0.2", true, 10),
            pod("b", "127.0.0.3", false, 10),
        ],
    );
    api.set_list(OBJECTIVES, vec![]);
    api.set_list(REWRITES, vec![]);
    let (api_addr, server) = serve(api.clone()).await;
    let dir = std::env::temp_dir().join(format!("infergate-k8s-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("kubeconfig");
    std::fs::write(&cfg, kubeconfig(api_addr, NS)).unwrap();

    let epp = Epp::start_with_env(
        &[
            "--pool-namespace".into(),
            NS.into(),
            "--pool-name".into(),
            "pool".into(),
        ],
        &[("KUBECONFIG", cfg.to_str().unwrap())],
    )
    .await;
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(epp.grpc)
            .pool([a.addr(), b.addr()]),
    )
    .await
    .unwrap();

    // Synced, and the leader of its Lease (election is on by default): ready.
    assert!(
        wait_ready(&epp).await,
        "the picker never turned ready; log:\n{}",
        epp.log_text()
    );
    assert!(
        api.lease(NS, "pool-epp").is_some(),
        "the picker took the Lease <pool>-epp"
    );
    // Only the ready Pod serves.
    eventually_served_by(&envoy, &["pod-a"]).await;
    // b turns ready: both serve. Printed: how long from the event to b's first request
    // (the watch, the datastore, the picker's next decision; a figure for BENCHMARKS).
    let t0 = std::time::Instant::now();
    api.event(PODS, "MODIFIED", pod("b", "127.0.0.3", true, 11));
    while b.count() == 0 && t0.elapsed() < Duration::from_secs(10) {
        served_by(&envoy, 1).await;
    }
    eprintln!(
        "pod ready -> first request: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    eventually_served_by(&envoy, &["pod-a", "pod-b"]).await;
    // a is deleted: only b.
    api.event(PODS, "DELETED", pod("a", "127.0.0.2", true, 12));
    eventually_served_by(&envoy, &["pod-b"]).await;
    // The API server goes away: the picker keeps routing to what it knew.
    server.abort();
    api.drop_watches(PODS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served_by(&envoy, 6).await,
        BTreeSet::from(["pod-b".to_string()])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_form_selects_pods_by_label_without_an_inference_pool() {
    let port = free_port();
    let a = FakeModelServer::start_on("pod-a", ([127, 0, 0, 2], port).into())
        .await
        .unwrap();
    let c = FakeModelServer::start_on("pod-c", ([127, 0, 0, 4], port).into())
        .await
        .unwrap();
    // c is Ready but carries another app label: not selected.
    let mut other = pod("c", "127.0.0.4", true, 10);
    other["metadata"]["labels"]["app"] = "sglang".into();
    let (_api, _server, cfg) = api_with(vec![pod("a", "127.0.0.2", true, 10), other], None).await;
    let epp = Epp::start_with_env(
        &[
            "--pool-namespace".into(),
            NS.into(),
            "--endpoint-selector".into(),
            "app=vllm".into(),
            "--endpoint-target-ports".into(),
            port.to_string(),
            "--ha-enable-leader-election=false".into(),
        ],
        &[("KUBECONFIG", cfg.to_str().unwrap())],
    )
    .await;
    assert!(wait_ready(&epp).await, "log:\n{}", epp.log_text());
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .ext_proc(epp.grpc)
            .pool([a.addr(), c.addr()]),
    )
    .await
    .unwrap();
    eventually_served_by(&envoy, &["pod-a"]).await;
    assert_eq!(c.count(), 0);
    let _ = std::fs::remove_file(&cfg);
}

/// Two pickers for one pool, as the Deployment runs them: one leads and is ready, the
/// other keeps its view in sync but is not ready; when the leader stops, the standby takes
/// over. Printed: the takeover time after a SIGTERM (the leader releases the Lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pickers_elect_one_ready_leader_and_the_standby_takes_over_on_sigterm() {
    let port = free_port();
    let a = FakeModelServer::start_on("pod-a", ([127, 0, 0, 2], port).into())
        .await
        .unwrap();
    let (api, _server, cfg) = api_with(
        vec![pod("a", "127.0.0.2", true, 10)],
        Some(vec![pool(port)]),
    )
    .await;
    let start = |id: &'static str| {
        let cfg = cfg.clone();
        async move {
            Epp::start_with_env(
                &[
                    "--pool-namespace".into(),
                    NS.into(),
                    "--pool-name".into(),
                    "pool".into(),
                ],
                &[("KUBECONFIG", cfg.to_str().unwrap()), ("POD_NAME", id)],
            )
            .await
        }
    };
    let mut first = start("epp-1").await;
    assert!(wait_ready(&first).await, "log:\n{}", first.log_text());
    let second = start("epp-2").await;
    // The second has synced (it would be ready but for the Lease) and stays not ready.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(first.is_ready().await);
    assert!(!second.is_ready().await, "a standby must not be ready");
    assert_eq!(
        api.lease(NS, "pool-epp").unwrap()["spec"]["holderIdentity"],
        "epp-1"
    );
    // /metrics needs a token the API server accepts and authorises for `get /metrics`
    // (on by default in Kubernetes mode).
    api.add_token("prom-token", "system:serviceaccount:monitoring:prometheus");
    api.add_token("app-token", "system:serviceaccount:llm:app");
    api.allow_metrics("system:serviceaccount:monitoring:prometheus");
    assert_eq!(second.metrics_with_token(None).await.0, 401);
    assert_eq!(second.metrics_with_token(Some("made-up")).await.0, 401);
    assert_eq!(second.metrics_with_token(Some("app-token")).await.0, 403);
    // The standby's view is current: it counts the pool's one endpoint as well.
    let (status, text) = second.metrics_with_token(Some("prom-token")).await;
    assert_eq!(status, 200, "{text}");
    assert!(text
        .lines()
        .any(|l| l.starts_with("inference_pool_ready_pods") && l.ends_with(" 1")));

    let t0 = std::time::Instant::now();
    assert!(first.terminate(), "the leader exits on SIGTERM");
    assert!(wait_ready(&second).await, "the standby never took over");
    let took = t0.elapsed();
    eprintln!(
        "leader SIGTERM -> standby ready: {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(
        took < Duration::from_secs(5),
        "a released Lease is taken at the standby's next retry (2 s), not after the 15 s lease"
    );
    assert_eq!(
        api.lease(NS, "pool-epp").unwrap()["spec"]["holderIdentity"],
        "epp-2"
    );
    let envoy = Envoy::start(EnvoyConfig::new().ext_proc(second.grpc).pool([a.addr()]))
        .await
        .unwrap();
    eventually_served_by(&envoy, &["pod-a"]).await;
    let _ = std::fs::remove_file(&cfg);
}
