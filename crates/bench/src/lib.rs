//! The benchmark lab.
//!
//! - [`workload`]: seeded request generators (chat-like, shared-prefix, multi-LoRA,
//!   long-context, mixed priorities) and arrival processes;
//! - [`stats`]: latency histograms and the per-priority summary of a run;
//! - [`http`]: the real-time load generator (open or closed loop over HTTP, client-side
//!   round robin over several servers);
//! - [`report`]: JSON and Markdown reports;
//! - [`virtual_run`]: a workload on the simulator's virtual clock with a router in the loop
//!   (round robin, or `core`'s Director with any profile), no sockets, no sleeping.

pub mod http;
pub mod report;
pub mod stats;
pub mod virtual_run;
pub mod workload;
