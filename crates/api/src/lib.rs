//! Kubernetes resource types of the Gateway API Inference Extension, the EndpointPickerConfig
//! file format and infergate's static pool file, with strict loading.
//!
//! Everything here is pure: text in, typed values or precise errors out. The only I/O is the
//! `load(path)` helpers, which read one file.
//!
//! - [`resources`]: InferencePool, InferenceObjective, InferenceModelRewrite, InferenceModel.
//! - [`pool_file`]: the multi-document pool file of `infergate epp --pool-file`.
//! - [`config`]: the scheduler's EndpointPickerConfig, with typed plugin parameters.
//! - [`LoadError`]: what went wrong, where (`file:line`), in which field of which object.

pub mod config;
pub mod error;
pub mod pool_file;
pub mod resources;
mod yaml;

pub use config::EndpointPickerConfig;
pub use error::{FieldError, FieldPath, LoadError, Problem, Segment};
pub use pool_file::{Engine, PoolFile, StaticEndpoint};
pub use resources::{
    InferenceModel, InferenceModelRewrite, InferenceObjective, InferencePool, Resource,
};
