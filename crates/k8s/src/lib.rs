//! Kubernetes mode: an InferencePool, the Pods its selector matches, and the
//! InferenceObjectives and InferenceModelRewrites that name it, as a source for the
//! picker's datastore.
//!
//! [`index`] is the pure part (objects in, endpoint specs and policy out); the watches
//! that feed it come next.

pub mod index;

pub use index::Index;
