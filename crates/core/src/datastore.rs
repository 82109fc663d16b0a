//! The datastore: the set of endpoints, objectives and rewrites the picker currently knows.
//!
//! Sources (flags, a pool file, Kubernetes watches) write whole or partial state in; the
//! request path reads lock-free snapshots. Endpoints keep their [`Endpoint`] object (and so
//! their metrics and in-flight counters) across updates as long as their address stays.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::endpoint::{Endpoint, EndpointSpec};
use crate::objective::{Objective, Rewrite};

/// An immutable view of the pool, swapped whole on every change.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Endpoints sorted by address, so scheduling order is deterministic.
    pub endpoints: Vec<Arc<Endpoint>>,
    pub objectives: HashMap<String, Objective>,
    /// Rewrites in precedence order (oldest first); see [`crate::rewrite`].
    pub rewrites: Vec<Rewrite>,
    /// Priority by requested model name, from legacy InferenceModel objects.
    pub model_priorities: HashMap<String, i32>,
}

impl Snapshot {
    pub fn endpoint(&self, addr: SocketAddr) -> Option<&Arc<Endpoint>> {
        self.endpoints
            .binary_search_by(|e| e.spec.addr.cmp(&addr))
            .ok()
            .map(|i| &self.endpoints[i])
    }
}

/// Everything about requests (not endpoints) that a source provides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub objectives: Vec<Objective>,
    /// In precedence order.
    pub rewrites: Vec<Rewrite>,
    pub model_priorities: HashMap<String, i32>,
}

/// Shared handle to the current pool state. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Datastore {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    current: ArcSwap<Snapshot>,
    /// Serialises writers so two sources never interleave a read-modify-write.
    write: Mutex<()>,
    generation: AtomicU64,
    next_id: AtomicU32,
    synced: std::sync::atomic::AtomicBool,
}

impl Datastore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state. Hold it for one request; do not cache it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// Increases by one on every change; scrape loops poll it to notice new endpoints.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Whether a source has delivered a complete state at least once (readiness).
    pub fn is_synced(&self) -> bool {
        self.inner.synced.load(Ordering::Acquire)
    }

    pub fn mark_synced(&self) {
        self.inner.synced.store(true, Ordering::Release);
    }

    /// Replace the endpoint set. Endpoints whose address and spec are unchanged keep their
    /// state; changed or new ones start fresh.
    pub fn set_endpoints(&self, specs: Vec<EndpointSpec>) {
        self.update(|old, next| {
            let mut eps: Vec<Arc<Endpoint>> = specs
                .into_iter()
                .map(|spec| match old.endpoint(spec.addr) {
                    Some(e) if e.spec == spec => e.clone(),
                    _ => Arc::new(Endpoint::new(
                        self.inner.next_id.fetch_add(1, Ordering::Relaxed),
                        spec,
                    )),
                })
                .collect();
            eps.sort_by_key(|e| e.spec.addr);
            eps.dedup_by_key(|e| e.spec.addr);
            next.endpoints = eps;
        });
    }

    /// Add or replace one endpoint (a Kubernetes Pod event, for example).
    pub fn upsert_endpoint(&self, spec: EndpointSpec) {
        let mut specs: Vec<EndpointSpec> = self
            .snapshot()
            .endpoints
            .iter()
            .filter(|e| e.spec.addr != spec.addr)
            .map(|e| e.spec.clone())
            .collect();
        specs.push(spec);
        self.set_endpoints(specs);
    }

    /// Remove one endpoint by address.
    pub fn remove_endpoint(&self, addr: SocketAddr) {
        let specs = self
            .snapshot()
            .endpoints
            .iter()
            .filter(|e| e.spec.addr != addr)
            .map(|e| e.spec.clone())
            .collect();
        self.set_endpoints(specs);
    }

    /// Replace all objectives, rewrites and legacy per-model priorities.
    pub fn set_policy(&self, policy: Policy) {
        self.update(|_, next| {
            next.objectives = policy
                .objectives
                .into_iter()
                .map(|o| (o.name.clone(), o))
                .collect();
            next.rewrites = policy.rewrites;
            next.model_priorities = policy.model_priorities;
        });
    }

    fn update(&self, f: impl FnOnce(&Snapshot, &mut Snapshot)) {
        let _guard = self.inner.write.lock();
        let old = self.inner.current.load_full();
        let mut next = Snapshot {
            endpoints: old.endpoints.clone(),
            objectives: old.objectives.clone(),
            rewrites: old.rewrites.clone(),
            model_priorities: old.model_priorities.clone(),
        };
        f(&old, &mut next);
        self.inner.current.store(Arc::new(next));
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }
}
