//! infergate's endpoint picker as an Envoy External Processing (ext_proc) server.
//!
//! [`protocol`] holds the per-request state machine (pure, testable message by message);
//! [`service`] wires it to tonic's gRPC stream and serves the gRPC health service.

pub mod protocol;
pub mod service;
/// Response usage parsing lives in `core`, shared with the standalone gateway.
pub use infergate_core::usage;

pub use protocol::{Context, Exchange, Options};
