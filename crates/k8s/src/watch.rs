//! The watches that keep an [`Index`] current and push it into the datastore.
//!
//! Five kube-rs watchers, all in the pool's namespace: InferencePools, Pods,
//! InferenceObjectives, InferenceModelRewrites and legacy InferenceModels. kube's watcher
//! lists, then watches from the list's resource version, relists after a `410 Gone`, and
//! re-watches after a dropped connection; `default_backoff` spaces out retries while the
//! API server is away. Meanwhile the datastore keeps the last state it was given, so the
//! picker goes on serving.
//!
//! A relist arrives as `Init`, `InitApply`..., `InitDone`; objects are buffered and
//! replace that kind's state at `InitDone`, so objects deleted while the watch was down
//! disappear. The datastore is marked synced (the picker turns ready) once every kind has
//! completed its first list. A kind whose CRD is not installed (a 404 on list) counts as
//! listed and empty, with a warning: a cluster without the legacy InferenceModel CRD is
//! normal.

use std::pin::Pin;

use futures::stream::{select_all, Stream, StreamExt};
use infergate_api::resources::{
    InferenceModel, InferenceModelRewrite, InferenceObjective, InferencePool, Resource,
};
use infergate_core::Datastore;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde::de::DeserializeOwned;

use crate::index::Index;

/// The kinds watched, in the order of [`KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pool,
    Pod,
    Objective,
    Rewrite,
    Model,
}

const KINDS: [Kind; 5] = [
    Kind::Pool,
    Kind::Pod,
    Kind::Objective,
    Kind::Rewrite,
    Kind::Model,
];

impl Kind {
    fn index(self) -> usize {
        KINDS.iter().position(|k| *k == self).expect("listed")
    }

    /// Group, version, kind and plural of the custom resources.
    fn resource(self) -> Option<ApiResource> {
        let (group, version, kind, plural) = match self {
            Kind::Pod => return None,
            Kind::Pool => (
                "inference.networking.k8s.io",
                "v1",
                "InferencePool",
                "inferencepools",
            ),
            Kind::Objective => (
                "inference.networking.x-k8s.io",
                "v1alpha2",
                "InferenceObjective",
                "inferenceobjectives",
            ),
            Kind::Rewrite => (
                "inference.networking.x-k8s.io",
                "v1alpha2",
                "InferenceModelRewrite",
                "inferencemodelrewrites",
            ),
            Kind::Model => (
                "inference.networking.x-k8s.io",
                "v1alpha2",
                "InferenceModel",
                "inferencemodels",
            ),
        };
        Some(ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            plural,
        ))
    }
}

/// One object of any watched kind.
enum Object {
    Pod(Box<Pod>),
    Dynamic(Box<DynamicObject>),
}

type Item = (Kind, Result<Event<Object>, watcher::Error>);

fn pods(client: &Client, ns: &str) -> Pin<Box<dyn Stream<Item = Item> + Send>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(|r| {
            (
                Kind::Pod,
                r.map(|e| map_event(e, |p| Object::Pod(Box::new(p)))),
            )
        })
        .boxed()
}

fn dynamic(client: &Client, ns: &str, kind: Kind) -> Pin<Box<dyn Stream<Item = Item> + Send>> {
    let ar = kind.resource().expect("a custom resource");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |r| {
            (
                kind,
                r.map(|e| map_event(e, |o| Object::Dynamic(Box::new(o)))),
            )
        })
        .boxed()
}

fn map_event<A, B>(e: Event<A>, f: impl Fn(A) -> B) -> Event<B> {
    match e {
        Event::Apply(o) => Event::Apply(f(o)),
        Event::Delete(o) => Event::Delete(f(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(f(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// A custom resource as our strict type; `None` (with a warning naming every broken rule)
/// when it does not parse or breaks a rule the CRD states. An API server with our CRDs (or
/// upstream's) refuses such objects; an older or hand-edited CRD may not.
fn typed<T: DeserializeOwned + Resource>(o: &DynamicObject) -> Option<T> {
    let name = o.metadata.name.as_deref().unwrap_or("");
    let value = serde_json::to_value(o).ok()?;
    match serde_json::from_value::<T>(value) {
        Ok(t) => match t.validate() {
            Ok(()) => Some(t),
            Err(errors) => {
                let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                tracing::warn!(name, "ignoring this {}: {}", T::KIND, errors.join("; "));
                None
            }
        },
        Err(e) => {
            tracing::warn!(
                name,
                "ignoring a {} that does not match its schema: {e}",
                T::KIND
            );
            None
        }
    }
}

fn names(o: &Object) -> (String, String) {
    let meta = match o {
        Object::Pod(p) => &p.metadata,
        Object::Dynamic(d) => &d.metadata,
    };
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn apply(ix: &mut Index, kind: Kind, o: &Object) {
    match (kind, o) {
        (Kind::Pod, Object::Pod(p)) => ix.apply_pod(p),
        (Kind::Pool, Object::Dynamic(d)) => {
            if let Some(p) = typed::<InferencePool>(d) {
                ix.apply_pool(p);
            }
        }
        (Kind::Objective, Object::Dynamic(d)) => {
            if let Some(x) = typed::<InferenceObjective>(d) {
                ix.apply_objective(x);
            }
        }
        (Kind::Rewrite, Object::Dynamic(d)) => {
            if let Some(x) = typed::<InferenceModelRewrite>(d) {
                ix.apply_rewrite(x);
            }
        }
        (Kind::Model, Object::Dynamic(d)) => {
            if let Some(x) = typed::<InferenceModel>(d) {
                ix.apply_model(x);
            }
        }
        _ => {}
    }
}

fn delete(ix: &mut Index, kind: Kind, o: &Object) {
    let (ns, name) = names(o);
    match kind {
        Kind::Pool => ix.delete_pool(&ns, &name),
        Kind::Pod => ix.delete_pod(&ns, &name),
        Kind::Objective => ix.delete_objective(&ns, &name),
        Kind::Rewrite => ix.delete_rewrite(&ns, &name),
        Kind::Model => ix.delete_model(&ns, &name),
    }
}

/// A full relist of `kind`: its objects replace what the index held of that kind.
fn relist(ix: &mut Index, kind: Kind, ns: &str, pool: &str, objects: Vec<Object>) {
    match kind {
        Kind::Pod => {
            let pods = objects.iter().filter_map(|o| match o {
                Object::Pod(p) => Some(p.as_ref()),
                Object::Dynamic(_) => None,
            });
            // Pods are merged, not cleared and re-added, so an unchanged Pod costs nothing.
            ix.replace_pods(pods);
            return;
        }
        Kind::Pool => {
            let ours = objects
                .iter()
                .any(|o| names(o) == (ns.to_owned(), pool.to_owned()));
            if !ours {
                ix.delete_pool(ns, pool);
            }
        }
        Kind::Objective => ix.clear_objectives(),
        Kind::Rewrite => ix.clear_rewrites(),
        Kind::Model => ix.clear_models(),
    }
    for o in &objects {
        apply(ix, kind, o);
    }
}

/// Whether a watcher error is "this resource type does not exist here" (404). For the
/// legacy InferenceModel, which most clusters no longer have, a 403 counts too: RBAC
/// written for current releases does not grant it, and that must not keep the picker
/// unready. Any other kind's 403 is a real misconfiguration and keeps it unready.
fn not_installed(kind: Kind, e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => {
            s.code == 404 || (kind == Kind::Model && s.code == 403)
        }
        _ => false,
    }
}

/// Watches the pool `pool` in `namespace` and keeps `ds` in step until the task is
/// dropped. Returns only if every watch stream ends (it does not in practice).
pub async fn run(client: Client, namespace: &str, pool: &str, ds: Datastore) {
    run_index(client, Index::new(namespace, pool), ds).await
}

/// Like [`run`], starting from `ix` (for instance [`Index::standalone`], whose pool comes
/// from flags: then no InferencePool object is watched).
pub async fn run_index(client: Client, mut ix: Index, ds: Datastore) {
    let (namespace, pool) = (ix.namespace().to_owned(), ix.name().to_owned());
    let (namespace, pool) = (namespace.as_str(), pool.as_str());
    let mut streams: Vec<Pin<Box<dyn Stream<Item = Item> + Send>>> = vec![pods(&client, namespace)];
    let mut listed = [false; KINDS.len()];
    for kind in [Kind::Pool, Kind::Objective, Kind::Rewrite, Kind::Model] {
        if kind == Kind::Pool && ix.is_standalone() {
            listed[kind.index()] = true;
            continue;
        }
        streams.push(dynamic(&client, namespace, kind));
    }
    let mut events = select_all(streams);
    let mut buffers: [Vec<Object>; KINDS.len()] = Default::default();
    let mut absent_warned = [false; KINDS.len()];
    let mut synced = false;
    let mut last_policy = None::<infergate_core::Policy>;
    let mut warned = std::collections::HashSet::new();
    while let Some((kind, item)) = events.next().await {
        let k = kind.index();
        match item {
            Ok(Event::Init) => buffers[k].clear(),
            Ok(Event::InitApply(o)) => buffers[k].push(o),
            Ok(Event::InitDone) => {
                let objects = std::mem::take(&mut buffers[k]);
                relist(&mut ix, kind, namespace, pool, objects);
                listed[k] = true;
            }
            Ok(Event::Apply(o)) => apply(&mut ix, kind, &o),
            Ok(Event::Delete(o)) => delete(&mut ix, kind, &o),
            Err(e) if not_installed(kind, &e) => {
                if !absent_warned[k] {
                    tracing::warn!(
                        ?kind,
                        "the {kind:?} resource is not installed in this cluster (or, for the legacy InferenceModel, not granted to this service account): {e}; treating it as empty"
                    );
                    absent_warned[k] = true;
                }
                listed[k] = true;
            }
            Err(e) => {
                tracing::warn!(?kind, "watch error (retrying with backoff): {e}");
                continue;
            }
        }
        // Push what changed; the datastore keeps serving it if the API server goes away.
        // An event about another pool's Pod or objective changes nothing and costs nothing.
        let changes = ix.take_changes();
        if changes.endpoints {
            ds.set_endpoints(ix.endpoints());
            // Each problem once, whenever the Pod that has it joins (O(members)).
            for p in ix.problems() {
                if warned.insert(p.clone()) {
                    tracing::warn!("{p}");
                }
            }
        }
        if changes.policy {
            let policy = ix.policy();
            if last_policy.as_ref() != Some(&policy) {
                ds.set_policy(policy.clone());
                last_policy = Some(policy);
            }
        }
        if !synced && listed.iter().all(|l| *l) {
            if !ix.has_pool() {
                tracing::warn!(
                    "InferencePool {namespace}/{pool} does not exist (yet); serving no endpoints"
                );
            }
            ds.mark_synced();
            synced = true;
            tracing::info!(
                endpoints = ds.snapshot().endpoints.len(),
                "Kubernetes state synced for InferencePool {namespace}/{pool}"
            );
        }
    }
}
