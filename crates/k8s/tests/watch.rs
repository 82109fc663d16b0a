//! The watch plumbing against a scripted API server: the real kube-rs client and watcher,
//! talking HTTP to a small server on 127.0.0.1 that answers list and watch requests from
//! a script. (A mock: no Kubernetes API server can run here.) It covers the initial list,
//! watch events, a `410 Gone` relist, a dropped watch connection, a CRD that is not
//! installed, and the API server going away.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use infergate_core::Datastore;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const NS: &str = "llm";
const PODS: &str = "/api/v1/namespaces/llm/pods";
const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools";
const OBJECTIVES: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/llm/inferenceobjectives";
const REWRITES: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/llm/inferencemodelrewrites";

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Script {
    /// Current items per collection path, returned by a list.
    lists: HashMap<String, Vec<Value>>,
    /// Open watch streams per path.
    watches: HashMap<String, Vec<mpsc::UnboundedSender<Bytes>>>,
    /// How many watch requests each path has had.
    watch_count: HashMap<String, usize>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<Script>>);

impl FakeApi {
    fn set_list(&self, path: &str, items: Vec<Value>) {
        self.0.lock().unwrap().lists.insert(path.into(), items);
    }

    /// Sends one watch event to every open watch of `path`.
    fn event(&self, path: &str, kind: &str, object: Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        let s = self.0.lock().unwrap();
        for tx in s.watches.get(path).into_iter().flatten() {
            let _ = tx.send(Bytes::from(line.clone()));
        }
    }

    /// Closes every open watch of `path` (a dropped connection).
    fn drop_watches(&self, path: &str) {
        self.0.lock().unwrap().watches.remove(path);
    }

    fn watch_count(&self, path: &str) -> usize {
        *self.0.lock().unwrap().watch_count.get(path).unwrap_or(&0)
    }

    fn open_watches(&self, path: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .watches
            .get(path)
            .map_or(0, |v| v.iter().filter(|t| !t.is_closed()).count())
    }

    fn respond(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("");
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let mut s = self.0.lock().unwrap();
        let Some(items) = s.lists.get(&path).cloned() else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"});
            return Response::builder()
                .status(404)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(status.to_string())).boxed())
                .unwrap();
        };
        if watch {
            *s.watch_count.entry(path.clone()).or_default() += 1;
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            s.watches.entry(path).or_default().push(tx);
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            return Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(stream).boxed())
                .unwrap();
        }
        let list = json!({"apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": "100"}, "items": items});
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(list.to_string())).boxed())
            .unwrap()
    }
}

async fn serve(api: FakeApi) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let api = api.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let r = api.respond(req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

fn pod(name: &str, ip: &str, ready: bool, rv: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": rv.to_string(),
                     "labels": {"app": "vllm"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}})
}

fn pool() -> Value {
    json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": NS, "resourceVersion": "5", "uid": "x"},
        "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}],
                 "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}})
}

fn objective(name: &str, priority: i32) -> Value {
    json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "6"},
        "spec": {"priority": priority, "poolRef": {"name": "pool"}}})
}

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
    api.set_list(POOLS, vec![pool()]);
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
    let client =
        kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap()))
            .unwrap();
    let ds = Datastore::new();
    let task = tokio::spawn(infergate_k8s::watch::run(client, NS, "pool", ds.clone()));
    eventually("sync", || ds.is_synced()).await;
    assert!(addrs(&ds).is_empty());
    eventually("pool watch open", || api.open_watches(POOLS) > 0).await;
    api.event(POOLS, "ADDED", pool());
    eventually("pool applied", || addrs(&ds) == ["10.0.0.1:8000"]).await;
    api.event(POOLS, "DELETED", pool());
    eventually("pool deleted", || addrs(&ds).is_empty()).await;
    task.abort();
    server.abort();
}
