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
