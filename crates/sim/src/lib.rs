//! A vLLM simulator faithful enough to judge routing on.
//!
//! The engine ([`Engine`]) is pure and steppable like `infergate-core`: it never reads a
//! clock, never sleeps and does no I/O. Time is passed in, randomness comes from a seed.
//! A step is two calls: [`Engine::begin_step`] schedules a batch the way vLLM's V1
//! scheduler does and returns how long the GPU would take to run it; the driver waits that
//! long (really, or on a virtual clock) and calls [`Engine::finish_step`], which applies the
//! batch and reports the tokens produced. Requests may arrive or be aborted between the two
//! calls, as they can in vLLM while a forward pass runs.
//!
//! - [`kv`]: the paged KV cache with automatic prefix caching (chained block hashes, an LRU
//!   queue of free blocks that still hold cached content);
//! - [`engine`]: continuous batching with a token budget, chunked prefill, preemption by
//!   recompute, LoRA slots;
//! - [`profile`]: the step-time model and the named hardware/model profiles with the public
//!   figures they were fitted to;
//! - [`tokens`]: the deterministic token-count approximation and prompt block hashing;
//! - [`vclock`]: a discrete-event driver for many engines on a virtual clock;
//! - [`calibrate`]: reproduces each profile's published figures on the engine;
//! - [`server`]: the real-time HTTP front (OpenAI API, vLLM `/metrics`, faults), on tokio.

pub mod calibrate;
pub mod engine;
pub mod hist;
pub mod kv;
pub mod profile;
pub mod server;
pub mod tokens;
pub mod vclock;

pub use engine::{
    Engine, EngineConfig, EngineStats, FinishReason, Output, RequestId, SimRequest, StepPlan,
};
pub use profile::{Profile, StepModel};
pub use tokens::Prompt;
