//! Test harness for infergate: the real components that integration tests start.
//!
//! - [`envoy`]: installs and runs a real Envoy 1.40 with a generated config that wires the
//!   ext_proc filter to a picker the way a GIE gateway does.
//! - [`model_server`]: a fake vLLM OpenAI server with settable `/metrics` and request recording.
//! - [`ports`]: free ports and waiting for a port to accept.
//! - [`http`]: a small keep-alive HTTP client for tests, plain and streaming.
//! - [`kube_api`]: a scripted Kubernetes API server (list and watch) for Kubernetes mode.
//!
//! ```no_run
//! use infergate_testkit::{post_json, Envoy, EnvoyConfig, FakeModelServer};
//!
//! # async fn demo(picker: std::net::SocketAddr) -> anyhow::Result<()> {
//! let replica = FakeModelServer::start("replica-a").await?;
//! let envoy = Envoy::start(EnvoyConfig::new().ext_proc(picker).pool([replica.addr()])).await?;
//! let (status, headers, _body) =
//!     post_json(&envoy.url(), "/v1/completions", &[], r#"{"model":"m","prompt":"hi"}"#).await?;
//! assert_eq!(status, 200);
//! assert_eq!(headers["x-served-by"], "replica-a");
//! # Ok(())
//! # }
//! ```
//!
//! Everything listens on 127.0.0.1 only. This crate is for tests; it panics on nothing that a
//! test could report as an error instead, but it does not try to be a library for production.

pub mod envoy;
pub mod http;
pub mod kube_api;
pub mod model_server;
pub mod peer_routers;
pub mod poll;
pub mod ports;
pub mod procstat;

pub use envoy::{envoy_binary, BodyMode, Envoy, EnvoyConfig};
pub use http::{get, post_json, post_json_stream, ChunkStream, HttpClient};
pub use model_server::{FakeModelServer, RecordedRequest};
pub use ports::{free_port, wait_for_port};

/// Root of the Cargo workspace (where `scripts/` and `target/` live).
pub fn repo_root() -> std::path::PathBuf {
    // crates/testkit -> crates -> repo
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(|p| p.parent())
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// The workspace's build directory: `$CARGO_TARGET_DIR` if set, else `<repo>/target`.
pub fn target_dir() -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = std::path::PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// The release `infergate` binary the benchmark examples start: `$INFERGATE_BIN` if set,
/// else `<target>/release/infergate`; an error says how to build it when it is missing.
pub fn release_infergate() -> anyhow::Result<std::path::PathBuf> {
    let bin = std::env::var_os("INFERGATE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/infergate"));
    anyhow::ensure!(
        bin.is_file(),
        "{} not found; build it with `cargo build --release -p infergate --bin infergate`",
        bin.display()
    );
    Ok(bin)
}
