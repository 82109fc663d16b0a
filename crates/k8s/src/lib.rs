//! Kubernetes mode: an InferencePool, the Pods its selector matches, and the
//! InferenceObjectives and InferenceModelRewrites that name it, as a source for the
//! picker's datastore.
//!
//! [`index`] is the pure part (objects in, endpoint specs and policy out); [`watch`] runs
//! the kube-rs watchers that feed it and pushes the result into the datastore.

pub mod auth;
pub mod crd;
pub mod index;
pub mod lease;
pub mod watch;

pub use index::Index;
