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
//!
//! Cost: a namespace may hold thousands of Pods of other pools. The index keeps each Pod's
//! endpoints as it applies the Pod, so an event costs O(that Pod's endpoints) plus a
//! log-time map update, not a pass over the namespace. Only a change of the pool itself
//! (its selector or ports) re-evaluates every Pod. [`Index::take_changes`] tells the caller
//! what to push: nothing for a Pod of another pool, endpoints for a member, the policy for
//! an objective or rewrite of this pool.

use std::collections::{BTreeMap, BTreeSet};
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

/// What changed since the last [`Index::take_changes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Changes {
    /// The endpoint list differs.
    pub endpoints: bool,
    /// The objectives, rewrites or legacy models differ.
    pub policy: bool,
}

/// The state of one InferencePool as the picker sees it.
#[derive(Debug, Clone)]
pub struct Index {
    namespace: String,
    name: String,
    pool: Option<InferencePool>,
    /// The pool came from flags (`--endpoint-selector`), not from an InferencePool object.
    standalone: bool,
    /// Pods of the pool's namespace by name (whether or not they match the selector, so a
    /// label change can move one in or out).
    pods: BTreeMap<String, PodState>,
    /// The endpoints of each member Pod, kept up to date as Pods are applied.
    members: BTreeMap<String, Vec<EndpointSpec>>,
    objectives: BTreeMap<(String, String), InferenceObjective>,
    rewrites: BTreeMap<(String, String), InferenceModelRewrite>,
    models: BTreeMap<(String, String), InferenceModel>,
    changes: Changes,
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
            standalone: false,
            pods: BTreeMap::new(),
            members: BTreeMap::new(),
            objectives: BTreeMap::new(),
            rewrites: BTreeMap::new(),
            models: BTreeMap::new(),
            changes: Changes::default(),
        }
    }

    /// An index whose Pods are chosen by `selector` and `ports` (the reference's
    /// `--endpoint-selector` and `--endpoint-target-ports`) instead of an InferencePool
    /// object. Objectives and rewrites whose `poolRef` names `name` still apply.
    pub fn standalone(
        namespace: impl Into<String>,
        name: impl Into<String>,
        selector: BTreeMap<String, String>,
        ports: &[u16],
    ) -> Index {
        let mut ix = Index::new(namespace, name);
        let mut metadata = infergate_api::resources::ObjectMeta::named(ix.name.clone());
        metadata.namespace = ix.namespace.clone();
        ix.apply_pool(InferencePool {
            api_version: infergate_api::resources::POOL_API_VERSION.into(),
            kind: "InferencePool".into(),
            metadata,
            spec: infergate_api::resources::InferencePoolSpec {
                selector: infergate_api::resources::LabelSelector {
                    match_labels: selector,
                },
                target_ports: ports
                    .iter()
                    .map(|p| infergate_api::resources::Port {
                        number: i32::from(*p),
                    })
                    .collect(),
                app_protocol: Default::default(),
                endpoint_picker_ref: None,
            },
            status: Default::default(),
        });
        ix.standalone = true;
        ix
    }

    /// The namespace watched.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the pool comes from flags; then no InferencePool object is watched.
    pub fn is_standalone(&self) -> bool {
        self.standalone
    }

    /// Whether the pool object itself has been seen.
    pub fn has_pool(&self) -> bool {
        self.pool.is_some()
    }

    /// What changed since the last call, and resets it.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Applies the pool; another pool's object is ignored. Returns whether it was ours.
    /// A changed selector or port list re-evaluates every Pod of the namespace.
    pub fn apply_pool(&mut self, pool: InferencePool) -> bool {
        if self.standalone
            || pool.metadata.namespace != self.namespace
            || pool.metadata.name != self.name
        {
            return false;
        }
        if self.pool.as_ref() != Some(&pool) {
            self.pool = Some(pool);
            self.recompute_members();
            self.changes.policy = true;
        }
        true
    }

    /// The pool was deleted: no endpoints until it comes back.
    pub fn delete_pool(&mut self, namespace: &str, name: &str) {
        if !self.standalone && namespace == self.namespace && name == self.name {
            if self.pool.take().is_some() {
                self.changes.policy = true;
            }
            self.recompute_members();
        }
    }

    /// Applies a Pod (added or changed); Pods of other namespaces are ignored.
    pub fn apply_pod(&mut self, pod: &Pod) {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = pod.metadata.name.as_deref() else {
            return;
        };
        if ns == self.namespace {
            let state = PodState::of(pod);
            let eps = self.endpoints_of(name, &state);
            self.pods.insert(name.to_owned(), state);
            self.set_member(name, eps);
        }
    }

    /// A Pod was deleted.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        if namespace == self.namespace {
            self.pods.remove(name);
            self.set_member(name, Vec::new());
        }
    }

    /// Records `eps` as the endpoints of Pod `name` and notes whether that changed.
    fn set_member(&mut self, name: &str, eps: Vec<EndpointSpec>) {
        let old = if eps.is_empty() {
            self.members.remove(name)
        } else {
            self.members.insert(name.to_owned(), eps.clone())
        };
        if old.unwrap_or_default() != eps {
            self.changes.endpoints = true;
        }
    }

    fn recompute_members(&mut self) {
        let members: BTreeMap<String, Vec<EndpointSpec>> = self
            .pods
            .iter()
            .map(|(name, p)| (name.clone(), self.endpoints_of(name, p)))
            .filter(|(_, eps)| !eps.is_empty())
            .collect();
        if members != self.members {
            self.members = members;
            self.changes.endpoints = true;
        }
    }

    /// The endpoints Pod `name` gives: one per target port while it is a member, else none.
    fn endpoints_of(&self, name: &str, p: &PodState) -> Vec<EndpointSpec> {
        let Some(pool) = &self.pool else {
            return Vec::new();
        };
        let selected = pool
            .spec
            .selector
            .match_labels
            .iter()
            .all(|(k, v)| p.labels.get(k) == Some(v));
        let ip = match p.ip {
            Some(ip) if selected && p.ready && !p.terminating => ip,
            _ => return Vec::new(),
        };
        let engine = p
            .labels
            .get(ENGINE_LABEL)
            .and_then(|e| e.parse::<Engine>().ok())
            .unwrap_or(Engine::Vllm);
        let ports = &pool.spec.target_ports;
        ports
            .iter()
            .filter_map(|port| u16::try_from(port.number).ok())
            .map(|port| {
                let mut spec = EndpointSpec::new(SocketAddr::new(ip, port), engine);
                spec.name = if ports.len() > 1 {
                    format!("{}/{name}:{port}", self.namespace)
                } else {
                    format!("{}/{name}", self.namespace)
                };
                spec.labels = p.labels.clone();
                spec
            })
            .collect()
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
        let ours = self.names_us(&o.metadata.namespace, &o.spec.pool_ref);
        self.changes.policy |= upsert(&mut self.objectives, k, ours.then_some(o));
    }

    pub fn delete_objective(&mut self, namespace: &str, name: &str) {
        self.changes.policy |= upsert(&mut self.objectives, key(namespace, name), None);
    }

    /// Applies a rewrite (same rules as [`Index::apply_objective`]).
    pub fn apply_rewrite(&mut self, r: InferenceModelRewrite) {
        let k = key(&r.metadata.namespace, &r.metadata.name);
        let ours = self.names_us(&r.metadata.namespace, &r.spec.pool_ref);
        self.changes.policy |= upsert(&mut self.rewrites, k, ours.then_some(r));
    }

    pub fn delete_rewrite(&mut self, namespace: &str, name: &str) {
        self.changes.policy |= upsert(&mut self.rewrites, key(namespace, name), None);
    }

    /// Applies a legacy InferenceModel (its `poolRef` names the pool by name only).
    pub fn apply_model(&mut self, m: InferenceModel) {
        let k = key(&m.metadata.namespace, &m.metadata.name);
        let ours = m.metadata.namespace == self.namespace && m.spec.pool_ref.name == self.name;
        self.changes.policy |= upsert(&mut self.models, k, ours.then_some(m));
    }

    pub fn delete_model(&mut self, namespace: &str, name: &str) {
        self.changes.policy |= upsert(&mut self.models, key(namespace, name), None);
    }

    /// Replaces every Pod with `pods` (a full relist): Pods missing from it are gone.
    pub fn replace_pods<'a>(&mut self, pods: impl IntoIterator<Item = &'a Pod>) {
        let mut seen = BTreeSet::new();
        for pod in pods {
            if let Some(name) = &pod.metadata.name {
                seen.insert(name.clone());
            }
            self.apply_pod(pod);
        }
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            let ns = self.namespace.clone();
            self.delete_pod(&ns, &name);
        }
    }

    /// Forgets every objective, rewrite or legacy model (before a full relist).
    pub fn clear_objectives(&mut self) {
        self.changes.policy |= !self.objectives.is_empty();
        self.objectives.clear();
    }

    pub fn clear_rewrites(&mut self) {
        self.changes.policy |= !self.rewrites.is_empty();
        self.rewrites.clear();
    }

    pub fn clear_models(&mut self) {
        self.changes.policy |= !self.models.is_empty();
        self.models.clear();
    }

    /// One endpoint per target port of every member Pod, ordered by Pod name then port.
    /// Costs O(the pool's endpoints), not O(the namespace's Pods).
    pub fn endpoints(&self) -> Vec<EndpointSpec> {
        self.members.values().flatten().cloned().collect()
    }

    /// How many Pods of the namespace the index holds (members or not).
    pub fn pod_count(&self) -> usize {
        self.pods.len()
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
        self.members
            .keys()
            .filter_map(|name| {
                let e = self.pods.get(name)?.labels.get(ENGINE_LABEL)?;
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

/// Inserts (`Some`) or removes (`None`) `k`; returns whether the map changed.
fn upsert<V: PartialEq>(
    map: &mut BTreeMap<(String, String), V>,
    k: (String, String),
    v: Option<V>,
) -> bool {
    match v {
        Some(v) if map.get(&k) == Some(&v) => false,
        Some(v) => {
            map.insert(k, v);
            true
        }
        None => map.remove(&k).is_some(),
    }
}
