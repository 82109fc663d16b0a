//! The watch plumbing against a scripted API server: the real kube-rs client and watcher,
//! talking HTTP to a small server on 127.0.0.1 that answers list and watch requests from
//! a script. (A mock: no Kubernetes API server can run here.) It covers the initial list,
//! watch events, a `410 Gone` relist, a dropped watch connection, a CRD that is not
//! installed, and the API server going away.

mod common;
use common::mk_client;

use std::time::Duration;

use infergate_core::Datastore;
use infergate_testkit::kube_api::{
    objective, pod, pool, serve, FakeKubeApi as FakeApi, MODELS, NS, OBJECTIVES, PODS, POOLS,
    REWRITES,
};
use serde_json::json;

fn addrs(ds: &Datastore) -> Vec<String> {
    let mut v: Vec<String> = ds
        .snapshot()
        .endpoints
        .iter()
        .map(|e| e.spec.addr.to_string())
        .collect();
    v.sort();
    v
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_watches_relists_after_410_rewatches_after_a_drop_and_survives_the_api_going_away() {
    let api = FakeApi::default();
    api.set_list(POOLS, vec![pool(8000)]);
    api.set_list(PODS, vec![pod("a", "10.0.0.1", true, 10)]);
    api.set_list(OBJECTIVES, vec![objective("batch", -1)]);
    api.set_list(REWRITES, vec![]);
    // No InferenceModel CRD in this cluster: 404, which must not block readiness.
    let (addr, server) = serve(api.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let ds = Datastore::new();
    let task = tokio::spawn(infergate_k8s::watch::run(client, NS, "pool", ds.clone()));

    // Initial list: synced (ready), one endpoint, the objective known.
    eventually("initial sync", || ds.is_synced()).await;
    assert_eq!(addrs(&ds), ["10.0.0.1:8000"]);
    assert_eq!(ds.snapshot().objectives["batch"].priority, -1);

    // Watch events: a Pod added, then the first one no longer ready.
    eventually("pod watch open", || api.open_watches(PODS) > 0).await;
    api.event(PODS, "ADDED", pod("b", "10.0.0.2", true, 11));
    eventually("b added", || {
        addrs(&ds) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    })
    .await;
    api.event(PODS, "MODIFIED", pod("a", "10.0.0.1", false, 12));
    eventually("a not ready", || addrs(&ds) == ["10.0.0.2:8000"]).await;
    api.event(OBJECTIVES, "MODIFIED", objective("batch", 4));
    eventually("objective changed", || {
        ds.snapshot().objectives.get("batch").map(|o| o.priority) == Some(4)
    })
    .await;

    // 410 Gone: the watcher relists. Pod b vanished while nobody was looking and c
    // appeared; the relist must drop b.
    api.set_list(PODS, vec![pod("c", "10.0.0.3", true, 20)]);
    let before = api.watch_count(PODS);
    api.event(
        PODS,
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
               "code": 410, "message": "too old resource version"}),
    );
    eventually("relist after 410", || addrs(&ds) == ["10.0.0.3:8000"]).await;
    eventually("watch again after relist", || {
        api.watch_count(PODS) > before
    })
    .await;

    // A dropped watch connection: the watcher watches again and sees later events.
    let before = api.watch_count(PODS);
    api.drop_watches(PODS);
    eventually("re-watch after a drop", || {
        api.watch_count(PODS) > before && api.open_watches(PODS) > 0
    })
    .await;
    api.event(PODS, "ADDED", pod("d", "10.0.0.4", true, 21));
    eventually("d added", || {
        addrs(&ds) == ["10.0.0.3:8000", "10.0.0.4:8000"]
    })
    .await;

    // The API server goes away: the picker keeps serving the last state it had.
    server.abort();
    api.drop_watches(PODS);
    api.drop_watches(POOLS);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(addrs(&ds), ["10.0.0.3:8000", "10.0.0.4:8000"]);
    assert!(ds.is_synced());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pool_object_the_picker_syncs_with_no_endpoints_until_it_appears() {
    let api = FakeApi::default();
    api.set_list(POOLS, vec![]);
    api.set_list(PODS, vec![pod("a", "10.0.0.1", true, 10)]);
    api.set_list(OBJECTIVES, vec![]);
    api.set_list(REWRITES, vec![]);
    let (addr, server) = serve(api.clone()).await;
    let client = mk_client(addr);
    let ds = Datastore::new();
    let task = tokio::spawn(infergate_k8s::watch::run(client, NS, "pool", ds.clone()));
    eventually("sync", || ds.is_synced()).await;
    assert!(addrs(&ds).is_empty());
    eventually("pool watch open", || api.open_watches(POOLS) > 0).await;
    api.event(POOLS, "ADDED", pool(8000));
    eventually("pool applied", || addrs(&ds) == ["10.0.0.1:8000"]).await;
    api.event(POOLS, "DELETED", pool(8000));
    eventually("pool deleted", || addrs(&ds).is_empty()).await;
    task.abort();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_objects_are_skipped_and_a_forbidden_legacy_kind_does_not_block_sync() {
    let api = FakeApi::default();
    api.set_list(POOLS, vec![pool(8000)]);
    api.set_list(PODS, vec![pod("a", "10.0.0.1", true, 10)]);
    // One good objective and one whose poolRef name is empty (the CRD forbids it).
    let mut broken = objective("broken", 3);
    broken["spec"]["poolRef"]["name"] = "".into();
    api.set_list(OBJECTIVES, vec![objective("chat", 5), broken]);
    api.set_list(REWRITES, vec![]);
    // RBAC for current releases does not grant the legacy InferenceModel.
    api.forbid(MODELS);
    let (addr, server) = serve(api.clone()).await;
    let client = mk_client(addr);
    let ds = Datastore::new();
    let task = tokio::spawn(infergate_k8s::watch::run(client, NS, "pool", ds.clone()));
    eventually("sync despite the 403 on InferenceModels", || ds.is_synced()).await;
    assert_eq!(addrs(&ds), ["10.0.0.1:8000"]);
    let snap = ds.snapshot();
    let names: Vec<&String> = snap.objectives.keys().collect();
    assert_eq!(
        names,
        ["chat"],
        "the broken objective is skipped, the good one kept"
    );
    task.abort();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_pod_list_keeps_the_picker_unready() {
    let api = FakeApi::default();
    api.set_list(POOLS, vec![pool(8000)]);
    api.set_list(OBJECTIVES, vec![]);
    api.set_list(REWRITES, vec![]);
    api.forbid(PODS);
    let (addr, server) = serve(api.clone()).await;
    let client = mk_client(addr);
    let ds = Datastore::new();
    let task = tokio::spawn(infergate_k8s::watch::run(client, NS, "pool", ds.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !ds.is_synced(),
        "without Pods the picker must not claim to be ready"
    );
    task.abort();
    server.abort();
}
