//! A scripted Kubernetes API server on 127.0.0.1, for tests of the Kubernetes mode: no real
//! API server can run here, so this answers the list and watch requests kube-rs's watcher
//! makes from collections the test sets, streams the watch events the test sends, and can
//! drop watch connections. Paths not set answer 404 (a CRD that is not installed).
//!
//! It also stores `coordination.k8s.io/v1` Leases the way an API server does, for leader
//! election: get (404 when absent), create (409 `AlreadyExists` when present) and replace
//! (409 `Conflict` unless the body carries the stored `resourceVersion`), each write giving
//! the object a new `resourceVersion`. [`FakeKubeApi::set_unavailable`] makes every request
//! answer 503, as an API server that is down behind a load balancer does.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response};
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
    /// Leases by (namespace, name).
    leases: HashMap<(String, String), Value>,
    /// The last resourceVersion given to a stored Lease (one counter, as etcd's revision).
    revision: u64,
    /// Every request answers 503 while set.
    unavailable: bool,
    /// Collection paths that answer 403 Forbidden (RBAC does not grant them).
    forbidden: std::collections::HashSet<String>,
    /// Bearer tokens a TokenReview accepts, with the user each names.
    tokens: HashMap<String, String>,
    /// Users a SubjectAccessReview allows to `get /metrics`.
    metrics_readers: std::collections::HashSet<String>,
    /// TokenReviews and SubjectAccessReviews answered.
    reviews: usize,
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

    /// The stored Lease `ns`/`name`, as a get would return it.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.0
            .lock()
            .unwrap()
            .leases
            .get(&(ns.into(), name.into()))
            .cloned()
    }

    /// Stores `lease` as `ns`/`name` unconditionally (another client's write), with a new
    /// resourceVersion.
    pub fn put_lease(&self, ns: &str, name: &str, lease: Value) {
        self.0.lock().unwrap().store_lease(ns, name, lease);
    }

    /// While `down`, every new request answers `503 Service Unavailable` (watches already
    /// open stay open; [`Self::drop_watches`] closes them).
    pub fn set_unavailable(&self, down: bool) {
        self.0.lock().unwrap().unavailable = down;
    }

    /// Makes list and watch requests on `path` answer 403, as when the service account's
    /// Role does not grant that resource.
    pub fn forbid(&self, path: &str) {
        self.0.lock().unwrap().forbidden.insert(path.into());
    }

    /// A bearer token that TokenReviews accept as `user`.
    pub fn add_token(&self, token: &str, user: &str) {
        let mut s = self.0.lock().unwrap();
        s.tokens.insert(token.into(), user.into());
    }

    /// Lets `user` `get /metrics` (a ClusterRole with that non-resource URL, bound).
    pub fn allow_metrics(&self, user: &str) {
        self.0.lock().unwrap().metrics_readers.insert(user.into());
    }

    /// How many TokenReviews and SubjectAccessReviews have been answered.
    pub fn reviews(&self) -> usize {
        self.0.lock().unwrap().reviews
    }

    async fn respond(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        if self.0.lock().unwrap().unavailable {
            return status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            );
        }
        if parts.method == Method::POST && (path == TOKEN_REVIEWS || path == SUBJECT_ACCESS_REVIEWS)
        {
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut review: Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut s = self.0.lock().unwrap();
            s.reviews += 1;
            if path == TOKEN_REVIEWS {
                let token = review["spec"]["token"].as_str().unwrap_or("");
                review["status"] = match s.tokens.get(token) {
                    Some(user) => json!({"authenticated": true,
                        "user": {"username": user, "uid": "u-1", "groups": ["system:serviceaccounts"]}}),
                    None => json!({"authenticated": false, "error": "invalid bearer token"}),
                };
            } else {
                let user = review["spec"]["user"].as_str().unwrap_or("");
                let attrs = &review["spec"]["nonResourceAttributes"];
                let allowed = s.metrics_readers.contains(user)
                    && attrs["path"] == "/metrics"
                    && attrs["verb"] == "get";
                review["status"] = if allowed {
                    json!({"allowed": true})
                } else {
                    json!({"allowed": false, "reason": "no RBAC policy matched"})
                };
            }
            return ok(201, &review);
        }
        if let Some((ns, name)) = lease_path(&path) {
            // A list or watch of Leases is answered from `set_list`, as for any collection.
            if !name.is_empty() || parts.method == Method::POST {
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return self
                    .0
                    .lock()
                    .unwrap()
                    .lease_request(&parts.method, ns, name, &body);
            }
        }
        let query = parts.uri.query().unwrap_or("");
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let mut s = self.0.lock().unwrap();
        if s.forbidden.contains(&path) {
            return status(
                403,
                "Forbidden",
                &format!("{path} is forbidden: the service account may not list or watch it"),
            );
        }
        let Some(items) = s.lists.get(&path).cloned() else {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
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

impl Script {
    /// A get, create or replace of a Lease; `name` is empty for the collection.
    fn lease_request(
        &mut self,
        method: &Method,
        ns: &str,
        name: &str,
        body: &[u8],
    ) -> Response<Body> {
        let key = (ns.to_owned(), name.to_owned());
        let what = format!("leases.coordination.k8s.io \"{name}\"");
        let parse = || {
            serde_json::from_slice::<Value>(body)
                .ok()
                .filter(Value::is_object)
        };
        match (method, name.is_empty()) {
            (&Method::GET, false) => match self.leases.get(&key) {
                Some(lease) => ok(200, lease),
                None => status(404, "NotFound", &format!("{what} not found")),
            },
            (&Method::POST, true) => {
                let Some(lease) = parse() else {
                    return status(400, "BadRequest", "the request body is not a JSON object");
                };
                let Some(name) = lease["metadata"]["name"].as_str().map(str::to_owned) else {
                    return status(
                        422,
                        "Invalid",
                        "Lease.coordination.k8s.io is invalid: metadata.name: Required value",
                    );
                };
                if self.leases.contains_key(&(ns.to_owned(), name.clone())) {
                    let what = format!("leases.coordination.k8s.io \"{name}\"");
                    return status(409, "AlreadyExists", &format!("{what} already exists"));
                }
                ok(201, &self.store_lease(ns, &name, lease))
            }
            (&Method::PUT, false) => {
                let Some(lease) = parse() else {
                    return status(400, "BadRequest", "the request body is not a JSON object");
                };
                if lease["metadata"]["name"].as_str() != Some(name) {
                    return status(
                        400,
                        "BadRequest",
                        "the name of the object does not match the name on the URL",
                    );
                }
                let Some(stored) = self.leases.get(&key) else {
                    return status(404, "NotFound", &format!("{what} not found"));
                };
                // An update without a resourceVersion is unconditional, as for a real Lease.
                if let Some(rv) = lease["metadata"]["resourceVersion"].as_str() {
                    if Some(rv) != stored["metadata"]["resourceVersion"].as_str() {
                        return status(409, "Conflict", &format!(
                            "Operation cannot be fulfilled on {what}: the object has been modified; \
                             please apply your changes to the latest version and try again"));
                    }
                }
                ok(200, &self.store_lease(ns, name, lease))
            }
            _ => status(
                405,
                "MethodNotAllowed",
                &format!("{method} is not supported on {what}"),
            ),
        }
    }

    /// Stores `lease` with its namespace, name and a new resourceVersion; returns it.
    fn store_lease(&mut self, ns: &str, name: &str, mut lease: Value) -> Value {
        self.revision += 1;
        lease["apiVersion"] = json!("coordination.k8s.io/v1");
        lease["kind"] = json!("Lease");
        if !lease["metadata"].is_object() {
            lease["metadata"] = json!({});
        }
        lease["metadata"]["namespace"] = json!(ns);
        lease["metadata"]["name"] = json!(name);
        lease["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.leases.insert((ns.into(), name.into()), lease.clone());
        lease
    }
}

/// The namespace and name (empty for the collection) of a Lease path.
fn lease_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/apis/coordination.k8s.io/v1/namespaces/")?;
    let (ns, tail) = rest.split_once('/')?;
    match tail.strip_prefix("leases")? {
        "" => Some((ns, "")),
        name => name
            .strip_prefix('/')
            .filter(|n| !n.contains('/'))
            .map(|n| (ns, n)),
    }
}

fn ok(code: u16, object: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(object.to_string())).boxed())
        .unwrap()
}

/// A `Status` failure, which kube-rs turns into `kube::Error::Api`.
fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": reason, "code": code, "message": message});
    ok(code, &status)
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
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.respond(req).await) }
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
pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
pub const SUBJECT_ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
/// Collection paths in [`NS`] of the kinds Kubernetes mode watches.
pub const PODS: &str = "/api/v1/namespaces/llm/pods";
pub const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools";
pub const OBJECTIVES: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/llm/inferenceobjectives";
pub const REWRITES: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/llm/inferencemodelrewrites";
pub const MODELS: &str =
    "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/llm/inferencemodels";

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
