//! A scripted Kubernetes API server on 127.0.0.1, for tests of the Kubernetes mode: no real
//! API server can run here, so this answers the list and watch requests kube-rs's watcher
//! makes from collections the test sets, streams the watch events the test sends, and can
//! drop watch connections. Paths not set answer 404 (a CRD that is not installed).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Default)]
pub struct Script {
    /// Current items per collection path, returned by a list.
    lists: HashMap<String, Vec<Value>>,
    /// Open watch streams per path.
    watches: HashMap<String, Vec<mpsc::UnboundedSender<Bytes>>>,
    /// How many watch requests each path has had.
    watch_count: HashMap<String, usize>,
}

/// The fake API server's script; clone it to drive the server from a test.
#[derive(Clone, Default)]
pub struct FakeKubeApi(Arc<Mutex<Script>>);

impl FakeKubeApi {
    /// The items a list of `path` returns (and makes `path` exist).
    pub fn set_list(&self, path: &str, items: Vec<Value>) {
        self.0.lock().unwrap().lists.insert(path.into(), items);
    }

    /// Sends one watch event to every open watch of `path`.
    pub fn event(&self, path: &str, kind: &str, object: Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        let s = self.0.lock().unwrap();
        for tx in s.watches.get(path).into_iter().flatten() {
            let _ = tx.send(Bytes::from(line.clone()));
        }
    }

    /// Closes every open watch of `path` (a dropped connection).
    pub fn drop_watches(&self, path: &str) {
        self.0.lock().unwrap().watches.remove(path);
    }

    /// How many watch requests `path` has had.
    pub fn watch_count(&self, path: &str) -> usize {
        *self.0.lock().unwrap().watch_count.get(path).unwrap_or(&0)
    }

    /// Watches of `path` still open.
    pub fn open_watches(&self, path: &str) -> usize {
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

/// Serves `api` on 127.0.0.1; abort the task to take the API server away.
pub async fn serve(api: FakeKubeApi) -> (SocketAddr, tokio::task::JoinHandle<()>) {
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

/// A kubeconfig that points kube-rs at the fake server at `addr`, namespace `ns`.
pub fn kubeconfig(addr: SocketAddr, ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    namespace: {ns}\n    user: fake\n\
         current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
    )
}

/// The namespace the helpers below put objects in.
pub const NS: &str = "llm";
/// Collection paths in [`NS`] of the kinds Kubernetes mode watches.
pub const PODS: &str = "/api/v1/namespaces/llm/pods";
pub const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools";
pub const OBJECTIVES: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/llm/inferenceobjectives";
pub const REWRITES: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/llm/inferencemodelrewrites";

/// A Pod in [`NS`] labelled `app: vllm` (with the vLLM engine label), with `ip` and a
/// `Ready` condition, at resource version `rv`.
pub fn pod(name: &str, ip: &str, ready: bool, rv: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": rv.to_string(),
                     "labels": {"app": "vllm", "inference.networking.k8s.io/engine-type": "vllm"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}})
}

/// The InferencePool `pool` in [`NS`], selecting `app: vllm` on target port `port`.
pub fn pool(port: u16) -> Value {
    json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": NS, "resourceVersion": "5", "uid": "x"},
        "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": port}],
                 "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}})
}

/// An InferenceObjective for the pool `pool`.
pub fn objective(name: &str, priority: i32) -> Value {
    json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "6"},
        "spec": {"priority": priority, "poolRef": {"name": "pool"}}})
}
