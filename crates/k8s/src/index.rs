//! What the picker knows of one InferencePool, kept from Kubernetes objects as they are
//! applied and deleted: the pool, the Pods in its namespace, and the InferenceObjectives,
//! InferenceModelRewrites and legacy InferenceModels that name it.
//!
//! Pure: no client, no clock. The watch loop feeds it events; [`Index::endpoints`] and
//! [`Index::policy`] give the datastore the same endpoint specs and policy a pool file
//! gives, so Kubernetes is one more source for the same datastore, not a second path.
//!
//! Rules (DESIGN.md 4.1):
//! - a Pod is an endpoint while it is in the pool's namespace, carries every label of the
//!   pool's selector, has an IP, its `Ready` condition is `True` and it is not terminating;
//! - each target port of such a Pod is one endpoint;
//! - its engine comes from the `inference.networking.k8s.io/engine-type` label (vLLM when
//!   absent or unknown; an unknown value is reported by [`Index::problems`]);
//! - objectives, rewrites and models count when their `poolRef` names this pool (same
//!   namespace, the default group and kind); others are ignored;
//! - rewrites take precedence oldest first (by `creationTimestamp`, then namespace/name).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use infergate_api::pool_file::{PoolFile, StaticEndpoint};
use infergate_api::resources::{
    InferenceModel, InferenceModelRewrite, InferenceObjective, InferencePool, PoolRef, POOL_GROUP,
};
use infergate_core::endpoint::{EndpointSpec, Engine};
use infergate_core::Policy;
use k8s_openapi::api::core::v1::Pod;

/// The label naming a Pod's model-server engine.
pub const ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// What the index keeps of a Pod: only what decides membership and the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodState {
    labels: BTreeMap<String, String>,
    ip: Option<IpAddr>,
    ready: bool,
    terminating: bool,
}

impl PodState {
    fn of(pod: &Pod) -> PodState {
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        PodState {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// The state of one InferencePool as the picker sees it.
#[derive(Debug, Clone)]
pub struct Index {
    namespace: String,
    name: String,
    pool: Option<InferencePool>,
    /// Pods of the pool's namespace by name (whether or not they match the selector, so a
    /// label change can move one in or out).
    pods: BTreeMap<String, PodState>,
    objectives: BTreeMap<(String, String), InferenceObjective>,
    rewrites: BTreeMap<(String, String), InferenceModelRewrite>,
    models: BTreeMap<(String, String), InferenceModel>,
}

fn key(namespace: &str, name: &str) -> (String, String) {
    (namespace.to_owned(), name.to_owned())
}

impl Index {
    /// An empty index for the pool `name` in `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Index {
        Index {
            namespace: namespace.into(),
            name: name.into(),
            pool: None,
            pods: BTreeMap::new(),
            objectives: BTreeMap::new(),
            rewrites: BTreeMap::new(),
            models: BTreeMap::new(),
        }
    }

    /// Whether the pool object itself has been seen.
    pub fn has_pool(&self) -> bool {
        self.pool.is_some()
    }

    /// Applies the pool; another pool's object is ignored. Returns whether it was ours.
    pub fn apply_pool(&mut self, pool: InferencePool) -> bool {
        if pool.metadata.namespace != self.namespace || pool.metadata.name != self.name {
            return false;
        }
        self.pool = Some(pool);
        true
    }

    /// The pool was deleted: no endpoints until it comes back.
    pub fn delete_pool(&mut self, namespace: &str, name: &str) {
        if namespace == self.namespace && name == self.name {
            self.pool = None;
        }
    }

    /// Applies a Pod (added or changed); Pods of other namespaces are ignored.
    pub fn apply_pod(&mut self, pod: &Pod) {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = pod.metadata.name.as_deref() else {
            return;
        };
        if ns == self.namespace {
            self.pods.insert(name.to_owned(), PodState::of(pod));
        }
    }

    /// A Pod was deleted.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        if namespace == self.namespace {
            self.pods.remove(name);
        }
    }

    fn names_us(&self, namespace: &str, pool_ref: &PoolRef) -> bool {
        namespace == self.namespace
            && pool_ref.name == self.name
            && pool_ref.group == POOL_GROUP
            && pool_ref.kind == "InferencePool"
    }

    /// Applies an objective; one that names another pool removes any earlier version of
    /// itself (its `poolRef` may have changed) and is otherwise ignored.
    pub fn apply_objective(&mut self, o: InferenceObjective) {
        let k = key(&o.metadata.namespace, &o.metadata.name);
        if self.names_us(&o.metadata.namespace, &o.spec.pool_ref) {
            self.objectives.insert(k, o);
        } else {
            self.objectives.remove(&k);
        }
    }

    pub fn delete_objective(&mut self, namespace: &str, name: &str) {
        self.objectives.remove(&key(namespace, name));
    }

    /// Applies a rewrite (same rules as [`Index::apply_objective`]).
    pub fn apply_rewrite(&mut self, r: InferenceModelRewrite) {
        let k = key(&r.metadata.namespace, &r.metadata.name);
        if self.names_us(&r.metadata.namespace, &r.spec.pool_ref) {
            self.rewrites.insert(k, r);
        } else {
            self.rewrites.remove(&k);
        }
    }

    pub fn delete_rewrite(&mut self, namespace: &str, name: &str) {
        self.rewrites.remove(&key(namespace, name));
    }

    /// Applies a legacy InferenceModel (its `poolRef` names the pool by name only).
    pub fn apply_model(&mut self, m: InferenceModel) {
        let k = key(&m.metadata.namespace, &m.metadata.name);
        if m.metadata.namespace == self.namespace && m.spec.pool_ref.name == self.name {
            self.models.insert(k, m);
        } else {
            self.models.remove(&k);
        }
    }

    pub fn delete_model(&mut self, namespace: &str, name: &str) {
        self.models.remove(&key(namespace, name));
    }

    /// Forgets every Pod (before a full relist re-applies the current ones).
    pub fn clear_pods(&mut self) {
        self.pods.clear();
    }

    /// Forgets every objective, rewrite or legacy model (before a full relist).
    pub fn clear_objectives(&mut self) {
        self.objectives.clear();
    }

    pub fn clear_rewrites(&mut self) {
        self.rewrites.clear();
    }

    pub fn clear_models(&mut self) {
        self.models.clear();
    }

    /// Ready, selected Pods with an IP, by name.
    fn members(&self) -> impl Iterator<Item = (&String, &PodState, IpAddr)> {
        let selector = self.pool.as_ref().map(|p| &p.spec.selector.match_labels);
        self.pods.iter().filter_map(move |(name, p)| {
            let sel = selector?;
            let selected = sel.iter().all(|(k, v)| p.labels.get(k) == Some(v));
            (selected && p.ready && !p.terminating)
                .then_some(())
                .and(p.ip)
                .map(|ip| (name, p, ip))
        })
    }

    /// One endpoint per target port of every member Pod, ordered by Pod name then port.
    pub fn endpoints(&self) -> Vec<EndpointSpec> {
        let Some(pool) = &self.pool else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, p, ip) in self.members() {
            let engine = p
                .labels
                .get(ENGINE_LABEL)
                .and_then(|e| e.parse::<Engine>().ok())
                .unwrap_or(Engine::Vllm);
            for port in &pool.spec.target_ports {
                let Ok(port) = u16::try_from(port.number) else {
                    continue;
                };
                let mut spec = EndpointSpec::new(SocketAddr::new(ip, port), engine);
                spec.name = if pool.spec.target_ports.len() > 1 {
                    format!("{}/{name}:{port}", self.namespace)
                } else {
                    format!("{}/{name}", self.namespace)
                };
                spec.labels = p.labels.clone();
                out.push(spec);
            }
        }
        out
    }

    /// Objectives, rewrites (oldest first) and models, as the datastore's policy.
    pub fn policy(&self) -> Policy {
        let mut rewrites: Vec<&InferenceModelRewrite> = self.rewrites.values().collect();
        // Oldest first; RFC 3339 UTC timestamps sort as strings. An object without one
        // (never from an API server) goes last; ties by namespace/name.
        rewrites.sort_by(|a, b| {
            let ta = a.metadata.creation_timestamp.as_deref();
            let tb = b.metadata.creation_timestamp.as_deref();
            (ta.is_none(), ta, &a.metadata.namespace, &a.metadata.name).cmp(&(
                tb.is_none(),
                tb,
                &b.metadata.namespace,
                &b.metadata.name,
            ))
        });
        let file = PoolFile {
            pool: self.pool.clone(),
            endpoints: Vec::<StaticEndpoint>::new(),
            objectives: self.objectives.values().cloned().collect(),
            rewrites: rewrites.into_iter().cloned().collect(),
            models: self.models.values().cloned().collect(),
        };
        infergate_core::build::policy(&file)
    }

    /// Things worth a warning: member Pods with an engine label infergate does not know.
    pub fn problems(&self) -> Vec<String> {
        self.members()
            .filter_map(|(name, p, _)| {
                let e = p.labels.get(ENGINE_LABEL)?;
                e.parse::<Engine>().err().map(|err| {
                    format!(
                        "pod {}/{name}: label {ENGINE_LABEL}={e:?}: {err}; read as vllm",
                        self.namespace
                    )
                })
            })
            .collect()
    }
}
