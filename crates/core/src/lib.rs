//! infergate's brain: the endpoint and request model, the datastore, and the scheduler
//! (filters, scorers, pickers, profiles), with the prefix index, saturation detection and
//! model rewrites.
//!
//! Pure and synchronous: no sockets, no async runtime, no clock reads (callers pass `now`
//! as a [`Duration`](std::time::Duration) since an epoch of their choosing) and no global
//! randomness (callers pass an RNG). The same code runs behind Envoy, inside the
//! standalone gateway, and inside virtual-time simulations.

pub mod build;
pub mod datastore;
pub mod director;
pub mod endpoint;
pub mod flow;
pub mod latency;
pub mod objective;
pub mod prefix;
pub mod request;
pub mod rewrite;
pub mod saturation;
pub mod scheduler;
pub mod usage;

pub use datastore::{Datastore, Policy, Snapshot};
pub use director::{
    Decision, Director, ErrorKind, PickError, Prepared, RequestInput, SchedulerConfig,
};
pub use endpoint::{
    Endpoint, EndpointMetrics, EndpointSpec, Engine, HotSample, LoraState, MetricsSample,
};
pub use flow::{Admission, FlowConfig};
